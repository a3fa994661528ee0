"""Online, models and weights download on first use by the libraries' own functions; offline (HF_HUB_OFFLINE=1
or --offline), never. No test reaches a hub: the download functions are replaced, and each test checks the
decision (called with local_files_only=False / progress=True, or not called at all) and the one-line errors."""
from __future__ import annotations

import json

import pytest
import torch
import torchvision

from rareaug import downloads
from rareaug.errors import RareaugError

RESNET18_FILE = "resnet18-f37072fd.pth"
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
REVISION = "1" * 40


@pytest.fixture
def caches(empty_hub_cache, tmp_path, monkeypatch):
    """Empty Hugging Face and torchvision caches of our own; offline, as every test is unless it says so."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    return {"hub": empty_hub_cache, "torch": tmp_path / "torch-home" / "hub" / "checkpoints"}


@pytest.fixture
def online(caches, monkeypatch):
    """Downloads allowed (HF_HUB_OFFLINE unset), caches empty."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return caches


@pytest.fixture
def fake_torch_download(monkeypatch):
    """torch.hub's download, replaced: records its calls and writes a state dict of the right shapes (all zeros,
    stored as one element each, so it costs nothing to write)."""
    calls = []

    def download(url, dst, hash_prefix=None, progress=True):
        calls.append({"url": url, "dst": dst, "hash_prefix": hash_prefix, "progress": progress})
        build = torchvision.models.alexnet if "alexnet" in url else torchvision.models.resnet18
        with torch.device("meta"):
            shapes = {key: (value.shape, value.dtype) for key, value in build(weights=None).state_dict().items()}
        torch.save({key: torch.zeros((), dtype=dtype).expand(shape) for key, (shape, dtype) in shapes.items()}, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    return calls


def _failing(calls: list, error: Exception):
    def fail(*args, **kwargs):
        calls.append(kwargs)
        raise error

    return fail


def _one_line(call, *args, **kwargs) -> str:
    with pytest.raises(RareaugError) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


# --- the switch ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("value", "expected"), [("1", True), ("ON", True), ("yes", True), ("True", True),
                                                 ("0", False), ("", False), ("false", False), (None, False)])
def test_offline_reads_hf_hub_offline_now_with_the_hubs_values(monkeypatch, value, expected):
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    if value is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert downloads.offline() is expected


def test_go_offline_tells_the_libraries_too(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    downloads.go_offline()
    assert downloads.offline() and huggingface_hub.constants.HF_HUB_OFFLINE


def test_the_hint_names_the_current_cli_with_repeated_include():
    assert downloads.hf_download("a/b") == "`hf download a/b`"
    assert downloads.hf_download("a/b", ("*.json", "*.txt")) == "`hf download a/b --include '*.json' --include '*.txt'`"


@pytest.mark.parametrize("command", ["fit", "adapt", "generate", "sweep-ratio", "demo"])
def test_every_command_that_loads_a_model_takes_offline(invoke, command):
    code, out, err = invoke(command, "--help")
    assert code == 0 and "--offline" in out


# --- Stable Diffusion base models from the hub -------------------------------------------------------------------
SD_UNET = {"_class_name": "UNet2DConditionModel", "in_channels": 4, "out_channels": 4, "cross_attention_dim": 1024}


@pytest.fixture
def fake_config_download(monkeypatch, tmp_path):
    """huggingface_hub's snapshot_download, replaced: online it 'downloads' the two small configs of an SD 2.x
    model (or of the UNet the test puts in `unet`); from the cache alone it finds nothing."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    state = {"calls": [], "unet": SD_UNET}

    def snapshot_download(repo, **kwargs):
        state["calls"].append((repo, kwargs))
        if kwargs["local_files_only"]:
            raise LocalEntryNotFoundError("not cached")
        folder = tmp_path / "configs" / repo.replace("/", "--")
        (folder / "unet").mkdir(parents=True, exist_ok=True)
        (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                             "unet": ["diffusers", "UNet2DConditionModel"]}))
        (folder / "unet" / "config.json").write_text(json.dumps(state["unet"]))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return state


@pytest.fixture
def fake_pipeline_download(monkeypatch, fake_config_download):
    """diffusers' from_pretrained, replaced: with local_files_only=False it 'downloads' (model_index.json into the
    cache, at REVISION) and returns the tiny model's pipeline; from the cache alone it finds nothing."""
    from diffusers import StableDiffusionPipeline

    from rareaug.models import build_tiny_components

    calls = []

    def from_pretrained(repo, **kwargs):
        calls.append(kwargs)
        if kwargs["local_files_only"]:
            raise OSError("not cached")
        import huggingface_hub.constants

        folder = huggingface_hub.constants.HF_HUB_CACHE + f"/models--{repo.replace('/', '--')}"
        (snapshot := __import__("pathlib").Path(folder) / "snapshots" / REVISION).mkdir(parents=True)
        (snapshot / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
        (snapshot.parent.parent / "refs").mkdir()
        (snapshot.parent.parent / "refs" / "main").write_text(REVISION)
        return StableDiffusionPipeline(**build_tiny_components(), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)

    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", from_pretrained)
    return calls


def test_online_a_hub_model_not_cached_is_downloaded_by_diffusers_and_its_revision_kept(online,
                                                                                         fake_pipeline_download):
    from rareaug.models import load_base_model

    model = load_base_model("someone/new-model")
    assert [call["local_files_only"] for call in fake_pipeline_download] == [False]
    assert model.revision == REVISION and not model.is_tiny


def test_offline_a_hub_model_not_cached_is_never_downloaded(caches, fake_pipeline_download):
    from rareaug.models import load_base_model

    message = _one_line(load_base_model, "someone/new-model")
    assert not fake_pipeline_download
    assert "hf download someone/new-model" in message and "--base-model" in message and "offline" in message


def test_online_a_hub_model_that_is_not_sd_is_refused_before_its_weights_download(online, fake_pipeline_download,
                                                                                 fake_config_download):
    from rareaug.models import load_base_model

    fake_config_download["unet"] = {**SD_UNET, "cross_attention_dim": 2048, "addition_embed_type": "text_time"}
    message = _one_line(load_base_model, "someone/sdxl-model")
    assert "SDXL" in message and not fake_pipeline_download  # only the two small configs were fetched
    repo, kwargs = fake_config_download["calls"][-1]
    assert repo == "someone/sdxl-model" and kwargs["allow_patterns"] == ["model_index.json", "unet/config.json"]


def test_a_failed_download_is_one_line_with_the_fixes(online, monkeypatch, fake_config_download):
    from diffusers import StableDiffusionPipeline

    from rareaug.models import load_base_model

    calls = []
    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", _failing(calls, OSError(
        "We couldn't connect to 'https://huggingface.co' to load the files.\nCheck your internet connection")))
    message = _one_line(load_base_model, "someone/new-model")
    assert [call["local_files_only"] for call in calls] == [False]
    assert "could not be downloaded" in message and "We couldn't connect" in message
    assert "hf download someone/new-model" in message and "--offline" in message


def test_cli_offline_flag_forbids_the_download(online, fake_pipeline_download, invoke, folder_data, tmp_path):
    code, out, err = invoke("fit", "--data", folder_data, "--rare", "crack", "--run", tmp_path / "run",
                            "--base-model", "someone/new-model", "--offline")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "hf download someone/new-model" in err and not fake_pipeline_download


def test_cli_failed_download_is_exit_2_in_one_line(online, monkeypatch, invoke, folder_data, tmp_path,
                                                   fake_config_download):
    from diffusers import StableDiffusionPipeline

    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", _failing([], ConnectionError("no route")))
    code, out, err = invoke("fit", "--data", folder_data, "--rare", "crack", "--run", tmp_path / "run",
                            "--base-model", "someone/new-model")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "could not be downloaded" in err and "no route" in err


def test_offline_flag_stays_out_of_the_run_config(invoke, folder_data, tmp_path):
    """--offline is the machine's, not the experiment's: a run made with it resumes without it, and back."""
    run = tmp_path / "run"
    assert invoke("inspect", "--data", folder_data, "--rare", "crack", "--run", run)[0] == 0
    code, out, err = invoke("generate", "--run", run, "--method", "classic", "--n", "2", "--offline")
    assert code == 0, err
    configs = list((run / "stages").glob("*.yaml"))
    assert configs and not any("offline" in path.read_text() for path in configs)
    code, out, err = invoke("generate", "--run", run, "--method", "classic", "--n", "2")
    assert code == 0 and "--force" not in out + err, err


def test_online_single_file_configs_are_fetched_with_the_hubs_snapshot_download(online, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError
    from safetensors.torch import save_file

    from rareaug.models import load_base_model

    calls = []

    def snapshot_download(repo, **kwargs):
        calls.append((repo, kwargs))
        if kwargs["local_files_only"]:
            raise LocalEntryNotFoundError("not cached")
        return str(tmp_path)  # no configs in it: the load itself fails next, in one line

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    weights = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 4, 3, 3)}, str(weights))
    _one_line(load_base_model, str(weights))
    repo, kwargs = calls[-1]
    assert repo == "stable-diffusion-v1-5/stable-diffusion-v1-5" and not kwargs["local_files_only"]
    assert "*.json" in kwargs["allow_patterns"] and not any("safetensors" in p for p in kwargs["allow_patterns"])


# --- torchvision weights: the ResNets' ImageNet files ---------------------------------------------------------------
def test_online_resnet_weights_download_with_torch_hub_into_torch_home(online, fake_torch_download):
    from rareaug.sweep.classifiers import create_classifier

    model = create_classifier("resnet18", pretrained=True)
    assert len(fake_torch_download) == 1 and fake_torch_download[0]["progress"]
    assert fake_torch_download[0]["url"].endswith(RESNET18_FILE) and fake_torch_download[0]["hash_prefix"] == "f37072fd"
    assert (online["torch"] / RESNET18_FILE).is_file()
    assert model.source == RESNET18_FILE  # the file by its name: paths stay on this machine
    create_classifier("resnet18", pretrained=True)
    assert len(fake_torch_download) == 1  # cached now


def test_offline_resnet_weights_are_never_downloaded(caches, fake_torch_download):
    from rareaug.sweep.classifiers import create_classifier

    message = _one_line(create_classifier, "resnet18", pretrained=True)
    assert not fake_torch_download
    assert str(caches["torch"] / RESNET18_FILE) in message and "https://download.pytorch.org/models/" in message
    assert "--no-pretrained" in message


def test_a_failed_weights_download_is_one_line(online, monkeypatch):
    from urllib.error import URLError

    from rareaug.sweep.classifiers import create_classifier

    monkeypatch.setattr(torch.hub, "download_url_to_file", _failing([], URLError("Name or service not known")))
    message = _one_line(create_classifier, "resnet18", pretrained=True)
    assert "could not download" in message and "Name or service not known" in message and "--weights" in message


# --- CLIP: the sweep's classifier and adapt's language-free conditioning ---------------------------------------------
def test_clip_classifier_downloads_online_and_refuses_offline(online, monkeypatch):
    from transformers import CLIPVisionModelWithProjection

    from rareaug.sweep.classifiers import _tiny_clip_config, create_classifier

    calls = []

    def from_pretrained(source, **kwargs):
        calls.append(kwargs)
        return CLIPVisionModelWithProjection(_tiny_clip_config()), {"missing_keys": [], "mismatched_keys": []}

    monkeypatch.setattr(CLIPVisionModelWithProjection, "from_pretrained", from_pretrained)
    model = create_classifier("clip", pretrained=True)
    assert [call["local_files_only"] for call in calls] == [False] and model.source == "openai/clip-vit-base-patch16"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = _one_line(create_classifier, "clip", pretrained=True)
    assert len(calls) == 1 and "hf download openai/clip-vit-base-patch16" in message and "--clip-model" in message


def test_language_free_clip_downloads_online_and_refuses_offline(online, monkeypatch):
    import huggingface_hub
    from transformers import CLIPModel

    from rareaug.adapt.language_free import load_clip
    from rareaug.models import build_tiny_components

    text_encoder = build_tiny_components()["text_encoder"]
    tiny_clip = load_clip(None, "tiny", text_encoder)  # a CLIP whose text tower is the tiny base's
    calls = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name, **kwargs: calls.append((name, kwargs)))
    monkeypatch.setattr(CLIPModel, "from_pretrained", lambda repo, **kwargs: calls.append(kwargs) or tiny_clip)
    load_clip("someone/clip", "tiny", text_encoder)
    assert calls == [("preprocessor_config.json", {"local_files_only": False}), {"local_files_only": False}]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = _one_line(load_clip, "someone/clip", "tiny", text_encoder)
    assert len(calls) == 2 and "hf download someone/clip" in message


# --- LPIPS: the guard's distance and the sweep's diversity ----------------------------------------------------------
def _images(n: int) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(n))


def test_online_diversity_downloads_the_lpips_backbone_and_uses_it(online, fake_torch_download):
    from rareaug.sweep.diversity import diversity

    result = diversity(_images(2), _images(2))
    assert result["diversity_metric"] == "lpips_alex"
    assert [call["url"].rsplit("/", 1)[1] for call in fake_torch_download] == [ALEXNET_FILE]
    assert fake_torch_download[0]["progress"] and (online["torch"] / ALEXNET_FILE).is_file()


def test_offline_diversity_falls_back_to_ms_ssim_without_a_download(caches, fake_torch_download):
    from rareaug.sweep.diversity import diversity, diversity_measure

    measure = diversity_measure()
    assert measure.metric == "1-ms_ssim" and ALEXNET_FILE in measure.fallback_reason
    assert diversity(_images(2), _images(2), measure=measure)["diversity_metric"] == "1-ms_ssim"
    assert not fake_torch_download


def test_a_failed_lpips_download_falls_back_and_says_why(online, monkeypatch):
    from rareaug.sweep.diversity import diversity_measure

    monkeypatch.setattr(torch.hub, "download_url_to_file", _failing([], OSError("connection reset")))
    measure = diversity_measure()
    assert measure.metric == "1-ms_ssim" and "could not download" in measure.fallback_reason


def test_guard_lpips_is_refused_offline_in_one_line(caches, fake_torch_download):
    """The guard loads LPIPS where diversity does (rareaug.perceptual): online it downloads as above."""
    from rareaug.generate.guard import Guard

    message = _one_line(Guard, _images(4), ["a", "b", "c", "d"], distance="lpips")
    assert "--guard-distance ssim" in message and ALEXNET_FILE in message and not fake_torch_download


def test_sweep_summary_names_the_diversity_metric():
    from rareaug.sweep.stage import summary_markdown

    entry = {"ratios": {"0": _ratio(None), "1": _ratio(0.25)}, "recommended_ratio": 0.0}
    text = summary_markdown({"decision_rule": "rule", "failed_cells": [], "models": {"resnet18": {"loft": entry}},
                             "diversity_metric": "1-ms_ssim", "classifier_weights": {"resnet18": RESNET18_FILE}})
    assert "Diversity (`1-ms_ssim`)" in text and "diversity (1-ms_ssim) |" in text and "| 0.250 |" in text
    assert f"resnet18 from {RESNET18_FILE}" in text


def _ratio(diversity: float | None) -> dict:
    return {"n_synth": 4, "val_f1": 0.5, "test_f1_mean": 0.5, "test_f1_sd": 0.1, "test_recall_mean": 0.5,
            "test_pr_auc_mean": 0.5, "diversity": diversity}
