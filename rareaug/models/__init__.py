"""Models: the frozen Stable Diffusion base (hub id, folder, single file, or `tiny` for tests)."""
from .base import DEFAULT_BASE_MODEL, BaseModel, check_base_model_spec, load_base_model
from .tiny import build_tiny_components, check_tokenizer, clip_tokenizer

__all__ = [
    "BaseModel",
    "DEFAULT_BASE_MODEL",
    "build_tiny_components",
    "check_base_model_spec",
    "check_tokenizer",
    "clip_tokenizer",
    "load_base_model",
]
