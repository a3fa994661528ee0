"""Binary rare-vs-rest classifiers for the ratio sweep, behind a small registry in the style of timm's.

Every classifier is an `nn.Module` with one output logit. Callers pass float images in [0, 1], shaped
(batch, 3, H, W) or (batch, 1, H, W); the module repeats grey to 3 channels and normalises with its backbone's
own mean/std, so data loading never needs to know which backbone it feeds.

ResNet weights come from torchvision's cache (`torch.hub.get_dir()/checkpoints/`) or an explicit `--weights PATH`,
CLIP from a local folder or a hub id; what is not cached is downloaded on first use unless the machine is offline
(`rareaug.downloads`). A missing file ends in one `RareaugError` line naming what was looked for and the fix
(`--no-pretrained`, `--weights PATH`, `--clip-model FOLDER`, `hf download`).

    >>> model = create_classifier("resnet18", pretrained=False, tiny=True)
    >>> model(torch.rand(4, 3, model.input_size, model.input_size)).shape
    torch.Size([4])
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..downloads import from_hub, hub_revision, is_hub_id, torch_hub_file, torch_hub_path
from ..errors import RareaugError, one_line

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch16"
CLIP_LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}
TINY_INPUT_SIZE = 32

_classifier_entrypoints: dict[str, Callable[..., Classifier]] = {}


# --------------------------------------------------------------------------------------------------- registry
def register_classifier(fn: Callable[..., Classifier]) -> Callable[..., Classifier]:
    """Register an entrypoint under its function name (timm's `register_model`).

    The entrypoint takes `pretrained`, `weights_path`, `tiny` and `clip_model` as keywords and returns a
    `Classifier`.
    """
    _classifier_entrypoints[fn.__name__] = fn
    return fn


def list_classifiers() -> list[str]:
    """The registered classifier names, sorted: ["clip", "resnet18", "resnet50"]."""
    return sorted(_classifier_entrypoints)


def is_classifier(name: str) -> bool:
    return name in _classifier_entrypoints


def create_classifier(
    name: str,
    pretrained: bool = True,
    weights_path: str | os.PathLike | None = None,
    tiny: bool = False,
    clip_model: str | os.PathLike | None = None,
    num_outputs: int = 1,
) -> Classifier:
    """Build a registered classifier: one logit (rare vs rest) or `num_outputs` (multi-class).

    Args:
        name: one of `list_classifiers()`.
        pretrained: start from pretrained weights (ImageNet for ResNets, CLIP for clip), cached or downloaded on
            first use unless offline; False builds the same architecture with random weights. Ignored when `tiny`.
        weights_path: ResNets only: a torchvision-format state dict (the 1000-class `fc` is dropped) loaded
            instead of the cache file; it wins over `pretrained`.
        tiny: a small random model of the same family, for tests and smoke runs (input_size 32).
        clip_model: clip only: a local folder or a hub id (default `openai/clip-vit-base-patch16`). Ignored by
            the ResNets.

    Raises:
        RareaugError: unknown name, or weights that are not on this machine (one line, with the fix).
    """
    if name not in _classifier_entrypoints:
        raise RareaugError(f"classifier {name!r} is unknown; choose one of {', '.join(list_classifiers())}")
    model = _classifier_entrypoints[name](
        pretrained=pretrained, weights_path=weights_path, tiny=tiny, clip_model=clip_model
    )
    if num_outputs != 1:
        model.head = nn.Linear(model.num_features, num_outputs)
    return model


# ------------------------------------------------------------------------------------------------ base class
class Classifier(nn.Module):
    """A backbone plus a `Linear(num_features, 1)` head; takes [0, 1] images, returns (batch,) logits.

    Attributes:
        name: the registry name it was built under.
        input_size: the square side, in pixels, that callers should resize to (224; 32 when tiny).
        num_features: width of the pooled embedding that `forward_features` returns.
        head: the `Linear(num_features, 1)`.
        source: where the backbone weights came from: "random", a file or folder by its last component (paths
            stay on this machine), or a hub id with its revision (`owner/name@commit`).
    """

    def __init__(self, name: str, input_size: int, num_features: int, mean, std, source: str):
        super().__init__()
        self.name = name
        self.input_size = input_size
        self.num_features = num_features
        self.source = source
        self.head = nn.Linear(num_features, 1)
        # Not persistent: constants of the backbone, kept out of saved state dicts.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] images (batch, 1 or 3, H, W) -> 3-channel images normalised to the backbone's mean/std."""
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"{self.name}: expected images (batch, 1 or 3, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return (x.to(self.mean.dtype) - self.mean) / self.std

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> pooled embedding (batch, num_features). Normalisation happens here."""
        raise NotImplementedError

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Pooled embedding (batch, num_features) -> logits (batch,), or (batch, classes) for multi-class."""
        logits = self.head(features)
        return logits.squeeze(-1) if logits.shape[-1] == 1 else logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer should train (every parameter with requires_grad)."""
        return [p for p in self.parameters() if p.requires_grad]


# --------------------------------------------------------------------------------------------------- ResNets
class ResNetClassifier(Classifier):
    """A torchvision ResNet whose 1000-class `fc` is replaced by the one-logit head. Everything trains."""

    def __init__(self, name: str, backbone: nn.Module, input_size: int, source: str):
        num_features = backbone.fc.in_features
        super().__init__(name, input_size, num_features, IMAGENET_MEAN, IMAGENET_STD, source)
        backbone.fc = nn.Identity()
        self.backbone = backbone

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(x))


def _weights_enum(arch: str):
    from torchvision.models import ResNet18_Weights, ResNet50_Weights

    return {"resnet18": ResNet18_Weights, "resnet50": ResNet50_Weights}[arch]


def _cached_weight_files(arch: str) -> list[Path]:
    """The files torchvision would download for `arch`, DEFAULT first, inside its cache (cached or not)."""
    enum = _weights_enum(arch)
    ordered = [enum.DEFAULT] + [w for w in enum if w is not enum.DEFAULT]
    return [torch_hub_path(w.url) for w in ordered]


def _read_state_dict(path: Path, what: str) -> dict[str, torch.Tensor]:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and tensor errors alike: the user needs one line
        detail = one_line(error, 160)
        raise RareaugError(f"{what} {path}: cannot be read as a PyTorch state dict "
                           f"({type(error).__name__}: {detail})") from None
    for key in ("state_dict", "model"):  # common checkpoint wrappers
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise RareaugError(f"{what} {path}: not a state dict (a mapping of parameter names to tensors)")
    return {k.removeprefix("module."): v for k, v in loaded.items()}


def _load_backbone_weights(backbone: nn.Module, path: Path, arch: str, what: str) -> None:
    """Load a torchvision-format state dict into `backbone` (its `fc` is dropped; the head is new)."""
    state = {k: v for k, v in _read_state_dict(path, what).items() if not k.startswith("fc.")}
    expected = {k for k in backbone.state_dict() if not k.startswith("fc.")}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        parts = ([f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"] if missing else []) + (
            [f"unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}"] if unexpected else [])
        raise RareaugError(f"{what} {path}: not a torchvision {arch} state dict ({'; '.join(parts)})")
    try:
        backbone.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches: another architecture's weights
        first = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line), str(error))
        raise RareaugError(f"{what} {path}: does not fit torchvision {arch} ({first[:160]})") from None


def _build_resnet(arch: str, pretrained: bool, weights_path, tiny: bool) -> ResNetClassifier:
    from torchvision.models import resnet18 as tv_resnet18
    from torchvision.models import resnet50 as tv_resnet50
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

    if tiny:
        if weights_path is not None:
            raise RareaugError("--weights does not apply to the tiny test classifier (its weights are random)")
        block = BasicBlock if arch == "resnet18" else Bottleneck
        return ResNetClassifier(arch, ResNet(block, [1, 1, 1, 1]), TINY_INPUT_SIZE, "random")

    backbone = (tv_resnet18 if arch == "resnet18" else tv_resnet50)(weights=None)  # never downloads
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise RareaugError(f"--weights {path}: no such file; give a torchvision {arch} state dict (.pth)")
        _load_backbone_weights(backbone, path, arch, "--weights")
        return ResNetClassifier(arch, backbone, 224, path.name)
    if pretrained:
        found = _imagenet_weights(arch)
        _load_backbone_weights(backbone, found, arch, "ImageNet weights")
        return ResNetClassifier(arch, backbone, 224, found.name)
    return ResNetClassifier(arch, backbone, 224, "random")


def _imagenet_weights(arch: str) -> Path:
    """A cached ImageNet file of `arch` (torchvision's DEFAULT, else any other version already there); none
    cached: DEFAULT's, downloaded into the cache unless offline."""
    found = next((path for path in _cached_weight_files(arch) if path.is_file()), None)
    return found or torch_hub_file(_weights_enum(arch).DEFAULT.url, f"{arch} ImageNet weights",
                                   f"pass --no-pretrained to train from random weights, or --weights PATH to a local "
                                   f"{arch} .pth")


@register_classifier
def resnet18(pretrained: bool = True, weights_path=None, tiny: bool = False, clip_model=None) -> Classifier:
    """torchvision ResNet-18 (ImageNet weights from torchvision's cache) with a one-logit head."""
    return _build_resnet("resnet18", pretrained, weights_path, tiny)


@register_classifier
def resnet50(pretrained: bool = True, weights_path=None, tiny: bool = False, clip_model=None) -> Classifier:
    """torchvision ResNet-50 (ImageNet weights from torchvision's cache) with a one-logit head."""
    return _build_resnet("resnet50", pretrained, weights_path, tiny)


# ------------------------------------------------------------------------------------------------------ CLIP
class CLIPClassifier(Classifier):
    """A frozen CLIP image encoder with LoRA on its attention q/v projections and a head on the image embedding.

    Only the LoRA matrices and the head train. `forward_features` returns CLIP's projected image embedding
    (`image_embeds`, the vector CLIP matches against text).
    """

    def __init__(self, vision_model: nn.Module, source: str):
        from peft import LoraConfig, get_peft_model

        config = vision_model.config
        super().__init__("clip", config.image_size, config.projection_dim, CLIP_MEAN, CLIP_STD, source)
        for parameter in vision_model.parameters():
            parameter.requires_grad_(False)
        with warnings.catch_warnings():  # peft asks transformers 5 a deprecated gradient-checkpointing question
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            self.encoder = get_peft_model(vision_model, LoraConfig(**CLIP_LORA))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        other_size = tuple(x.shape[-2:]) != (self.input_size, self.input_size)
        return self.encoder(pixel_values=x, interpolate_pos_encoding=other_size).image_embeds


def _vit_b16_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            patch_size=16, image_size=224, projection_dim=512)


def _tiny_clip_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                            image_size=TINY_INPUT_SIZE, patch_size=8, projection_dim=16)


def _load_clip_vision(spec: str) -> tuple[nn.Module, str]:
    """CLIPVisionModelWithProjection from a local folder or a hub id (downloaded on first use unless offline),
    and its source.

    A full CLIPModel checkpoint (like openai/clip-vit-base-patch16) works: its text weights are skipped. Any
    missing vision weight is refused rather than left at random init.
    """
    fix = ("pass a local CLIP folder with --clip-model, or --no-pretrained to train from a randomly initialised "
           "ViT-B/16")
    path = Path(spec).expanduser()
    if path.is_dir():
        where, source = f"--clip-model {path}", path.name
        try:
            model, info = _clip_vision(str(path), local_files_only=True)
        except Exception as error:  # OSError for no weights, ValueError for a folder of another model, ...
            raise RareaugError(f"{where}: cannot load a CLIP vision model ({one_line(error, 160)}); {fix}") from None
    elif is_hub_id(spec):
        where = f"--clip-model {spec}"
        model, info = from_hub(lambda local: _clip_vision(spec, local), spec, where, fix, probe="config.json")
        revision = hub_revision(spec, "config.json")
        source = f"{spec}@{revision}" if revision else spec
    else:
        raise RareaugError(f"--clip-model {spec}: no such folder; {fix}")
    missing = sorted(info["missing_keys"]) + sorted(str(k) for k in info.get("mismatched_keys") or ())
    if missing:
        raise RareaugError(f"{where}: not a full CLIP image encoder ({len(missing)} weights missing or of the "
                           f"wrong shape, e.g. {missing[0]}); {fix}")
    return model.float(), source


def _clip_vision(source: str, local_files_only: bool):
    """transformers' own loader, with its loading report (it lists every skipped text weight) kept quiet."""
    import transformers
    from transformers import CLIPVisionModelWithProjection

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        return CLIPVisionModelWithProjection.from_pretrained(source, local_files_only=local_files_only,
                                                             dtype=torch.float32, output_loading_info=True)
    finally:
        transformers.logging.set_verbosity(verbosity)


@register_classifier
def clip(pretrained: bool = True, weights_path=None, tiny: bool = False, clip_model=None) -> Classifier:
    """CLIP ViT-B/16 image encoder + LoRA (rank 16, alpha 32, dropout 0.1 on q_proj/v_proj) + one-logit head."""
    from transformers import CLIPVisionModelWithProjection

    if weights_path is not None:
        raise RareaugError("--weights applies to the resnet classifiers; for clip pass a local folder with "
                           "--clip-model")
    if tiny:
        return CLIPClassifier(CLIPVisionModelWithProjection(_tiny_clip_config()), "random")
    if pretrained:
        return CLIPClassifier(*_load_clip_vision(str(clip_model) if clip_model is not None else DEFAULT_CLIP_MODEL))
    return CLIPClassifier(CLIPVisionModelWithProjection(_vit_b16_config()), "random")


__all__ = [
    "CLIPClassifier",
    "Classifier",
    "ResNetClassifier",
    "create_classifier",
    "is_classifier",
    "list_classifiers",
    "register_classifier",
]
