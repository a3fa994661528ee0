"""The sweep's classifier registry: tiny random models on CPU, and offline-only weight loading."""
from __future__ import annotations

import pytest
import torch
import torchvision

from rareaug.errors import RareaugError
from rareaug.sweep.classifiers import create_classifier, list_classifiers


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread is faster, and immune to a busy machine's OpenMP contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_registry_names():
    assert list_classifiers() == ["clip", "resnet18", "resnet50"]


def test_unknown_name_lists_registered_names():
    with pytest.raises(RareaugError) as info:
        create_classifier("vgg16", pretrained=False)
    message = str(info.value)
    assert "\n" not in message and "vgg16" in message
    assert all(name in message for name in list_classifiers())


@pytest.mark.parametrize("name", list_classifiers())
def test_tiny_forward_backward(name):
    torch.manual_seed(0)
    model = create_classifier(name, pretrained=False, tiny=True)
    assert model.input_size == 32
    model.train()
    x = torch.rand(4, 3, model.input_size, model.input_size)
    features = model.forward_features(x)
    assert features.shape == (4, model.num_features)
    logits = model.forward_head(features)
    assert logits.shape == (4,)
    logits.sum().backward()

    trainable = {id(p) for p in model.trainable_parameters()}
    assert trainable
    for param_name, param in model.named_parameters():
        if id(param) in trainable:
            assert param.grad is not None, f"{name}: no gradient on trainable {param_name}"
        else:
            assert not param.requires_grad and param.grad is None, f"{name}: gradient on frozen {param_name}"

    names = {n for n, p in model.named_parameters() if id(p) in trainable}
    if name == "clip":
        assert names and all("lora_" in n or n.startswith("head.") for n in names)
        assert any("q_proj.lora_A" in n for n in names) and any("v_proj.lora_B" in n for n in names)
        assert {"head.weight", "head.bias"} <= names
        assert len(trainable) < sum(1 for _ in model.parameters())  # the base weights are frozen
    else:
        assert len(trainable) == sum(1 for _ in model.parameters())  # ResNets train everything


@pytest.mark.parametrize("name", list_classifiers())
def test_one_channel_input_matches_repeated_grey(name):
    model = create_classifier(name, pretrained=False, tiny=True).eval()
    grey = torch.rand(2, 1, model.input_size, model.input_size)
    with torch.no_grad():
        one = model(grey)
        three = model(grey.repeat(1, 3, 1, 1))
    assert one.shape == (2,)
    torch.testing.assert_close(one, three)


def test_normalisation_is_inside_the_model():
    resnet = create_classifier("resnet18", pretrained=False, tiny=True)
    clip = create_classifier("clip", pretrained=False, tiny=True)
    white = torch.ones(1, 3, 4, 4)
    torch.testing.assert_close(resnet.normalize(white)[0, :, 0, 0],
                               (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225]))
    torch.testing.assert_close(clip.normalize(white)[0, :, 0, 0],
                               (1 - torch.tensor([0.48145466, 0.4578275, 0.40821073]))
                               / torch.tensor([0.26862954, 0.26130258, 0.27577711]))


def test_resnet_pretrained_without_cache_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(RareaugError) as info:
        create_classifier("resnet18", pretrained=True)
    message = str(info.value)
    assert "\n" not in message
    assert "--no-pretrained" in message and "--weights" in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in message


def test_resnet_pretrained_uses_local_cache_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    reference = torchvision.models.resnet18(weights=None)
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference.state_dict(), cache / "resnet18-f37072fd.pth")
    model = create_classifier("resnet18", pretrained=True)
    assert model.input_size == 224 and model.num_features == 512
    assert torch.equal(model.backbone.conv1.weight, reference.conv1.weight)


def test_resnet_weights_path_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    torch.manual_seed(1)
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = create_classifier("resnet18", pretrained=True, weights_path=str(path))
    assert torch.equal(model.backbone.conv1.weight, reference.conv1.weight)
    assert torch.equal(model.backbone.layer4[1].bn2.running_mean, reference.layer4[1].bn2.running_mean)
    assert model.head.out_features == 1
    x = torch.rand(1, 3, 64, 64)
    assert model(x).shape == (1,)


def test_resnet_weights_path_of_wrong_model_is_one_line(tmp_path):
    path = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    with pytest.raises(RareaugError) as info:
        create_classifier("resnet18", weights_path=path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    with pytest.raises(RareaugError) as info:
        create_classifier("resnet18", weights_path=tmp_path / "missing.pth")
    assert "\n" not in str(info.value) and "missing.pth" in str(info.value)


def test_clip_pretrained_missing_folder_is_one_line(tmp_path):
    with pytest.raises(RareaugError) as info:
        create_classifier("clip", pretrained=True, clip_model=str(tmp_path / "no-such-clip"))
    message = str(info.value)
    assert "\n" not in message
    assert "no-such-clip" in message and "--clip-model" in message and "--no-pretrained" in message


def test_clip_uncached_hub_id_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RareaugError) as info:
        create_classifier("clip", pretrained=True, clip_model="nobody-here/not-a-clip-model")
    assert "\n" not in str(info.value) and "nobody-here/not-a-clip-model" in str(info.value)


def test_clip_loads_a_local_full_clip_folder(tmp_path):
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig

    from rareaug.sweep.classifiers import _tiny_clip_config

    text = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                          vocab_size=100, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=16)
    torch.manual_seed(2)
    full = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=_tiny_clip_config().to_dict(),
                                projection_dim=16))
    full.save_pretrained(tmp_path / "clip")
    model = create_classifier("clip", pretrained=True, clip_model=str(tmp_path / "clip"))
    assert model.input_size == 32 and model.num_features == 16
    encoder = model.encoder.get_base_model()
    assert torch.equal(encoder.visual_projection.weight, full.visual_projection.weight)
    assert torch.equal(encoder.vision_model.encoder.layers[0].self_attn.q_proj.base_layer.weight,
                       full.vision_model.encoder.layers[0].self_attn.q_proj.weight)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2,)


def test_weights_path_is_refused_for_clip(tmp_path):
    with pytest.raises(RareaugError) as info:
        create_classifier("clip", pretrained=False, weights_path=tmp_path / "x.pth")
    assert "--clip-model" in str(info.value)
