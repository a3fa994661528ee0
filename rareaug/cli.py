"""The `rareaug` command: thin typer commands that build the config and call one library function each."""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from . import __version__
from .config import Config, build_config
from .errors import USER_ERRORS, RareaugError
from .run_lock import release_all

app = typer.Typer(
    name="rareaug",
    help="Few real images of a rare class -> faithful, diverse synthetic images -> an honest ratio sweep.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
error_console = Console(stderr=True)

# Options shared by the stage commands, defined once. `None` means "not given": recipe or default applies.
RunOpt = Annotated[Optional[Path], typer.Option("--run", help="Run directory (default runs/<rare>).")]
ConfigOpt = Annotated[Optional[str], typer.Option(
    "--config", help="Recipe name (chest_xray, magnetic_tile, mvtec, natural, fashion_mnist) or a YAML path.")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Seed for every random choice (default 0).")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda, cuda:1, ...")]


def _offline(value: bool) -> bool:
    """--offline acts while the command line is parsed, before any stage (or hub library) is imported. It is a
    property of the machine, not of the experiment: it never enters the run's config."""
    if value:
        from .downloads import go_offline

        go_offline()
    return value


OfflineOpt = Annotated[bool, typer.Option(
    "--offline", callback=_offline, is_eager=True,
    help="Never download: use only local files and caches (as HF_HUB_OFFLINE=1).")]
DataOpt = Annotated[Optional[Path], typer.Option("--data", help="Folder of images, a dataset root, or a CSV file.")]
LayoutOpt = Annotated[Optional[str], typer.Option(
    "--layout", help="folder, mt, mvtec, nih-cxr14, csv (default: detected).")]
RareOpt = Annotated[Optional[str], typer.Option(
    "--rare", help="The rare class (case-insensitive), e.g. crack or Pneumothorax; fit takes a,b,c: one run per class, "
                   "RUN/<class>.")]
NegativesOpt = Annotated[Optional[str], typer.Option(
    "--negatives", help="normal (default): the normal class only; all-other: every non-rare image.")]
MaxRareOpt = Annotated[Optional[int], typer.Option(
    "--max-rare", help="Keep N rare images for train/val; the rest go to test.")]
MaxPerClassOpt = Annotated[Optional[int], typer.Option(
    "--max-per-class", help="Subsample every negative class to N images (seeded).")]
TestDataOpt = Annotated[Optional[Path], typer.Option(
    "--test-data", help="A separate labelled folder used as the test split.")]
TestFractionOpt = Annotated[Optional[float], typer.Option(
    "--test-fraction", help="Share of every class held out for test (default 0.2).")]
ValFractionOpt = Annotated[Optional[float], typer.Option(
    "--val-fraction", help="Share of the rest for validation (default 0.2).")]
FoldsOpt = Annotated[Optional[int], typer.Option(
    "--folds", help="Cross-validation folds over the non-test images (default 1).")]
GuardRuleOpt = Annotated[Optional[str], typer.Option(
    "--guard-rule", help="relative (default): a near-copy is much closer to one real image than to the next ones; "
                         "absolute: under a fixed distance (implied by --guard-threshold).")]
GuardRatioOpt = Annotated[Optional[float], typer.Option(
    "--guard-ratio", help="relative rule: near-copy when closer than this x the mean distance to the next nearest real "
                          "images (0.5).")]
GuardThresholdOpt = Annotated[Optional[float], typer.Option(
    "--guard-threshold", help="absolute rule: distance under which an image counts as a copy (default: calibrated on "
                              "the real images).")]

FrameOpt = Annotated[Optional[int], typer.Option(
    "--frame", help="Frame of multi-frame DICOMs to use (default 0, the first).")]
OnBadFileOpt = Annotated[Optional[str], typer.Option(
    "--on-bad-file", help="skip (default): list and skip unreadable files; fail: stop.")]


def guard_rule_of(rule: str | None, threshold: float | None) -> str | None:
    """A threshold is a distance for the absolute rule: giving one alone picks that rule."""
    return "absolute" if rule is None and threshold is not None else rule


def user_errors(command):
    """Bad input ends in one line on stderr and exit 2, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except USER_ERRORS as error:
            error_console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except OSError as error:  # an unwritable or impossible path, a full disk: the path and the fix, no traceback
            where = error.filename or "a file"
            error_console.print(f"[bold red]error:[/] {escape(str(where))}: {escape(error.strerror or str(error))}; "
                                "check that the path exists, is a folder where one is needed, and that you may "
                                "write there (and that the disk has room)", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            error_console.print("interrupted; finished outputs are kept, rerun the same command to resume")
            raise typer.Exit(130) from None
        finally:
            release_all()  # the run directories this command locked

    return wrapper


def make_config(config: str | None, **flags) -> tuple[Config, set[str]]:
    """Recipe values < CLI flags. Flags are given as section__key=value; None means not given."""
    overrides = {key.replace("__", "."): (str(value) if isinstance(value, Path) else value)
                 for key, value in flags.items() if value is not None}
    return build_config(config, overrides), set(overrides)


def _data_flags(data, layout, rare, negatives, max_rare, max_per_class, test_data, on_bad_file, test_fraction,
                val_fraction, folds, frame) -> dict:
    """The data and split options every command that may create the split accepts."""
    return dict(data__data=data, data__layout=layout, data__rare=rare, data__negatives=negatives,
                data__max_rare=max_rare, data__max_per_class=max_per_class, data__test_data=test_data,
                data__on_bad_file=on_bad_file, split__test_fraction=test_fraction, split__val_fraction=val_fraction,
                split__folds=folds, data__frame=frame)


def _version(value: bool) -> None:
    if value:
        console.print(f"rareaug {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Show the version.")] = False,
) -> None:
    """rareaug: per-image LoRAs (LoFT) for rare classes, ratio sweeps and reports."""


@app.command()
@user_errors
def inspect(
    data: DataOpt = None,
    layout: LayoutOpt = None,
    rare: RareOpt = None,
    run: RunOpt = None,
    negatives: NegativesOpt = None,
    max_rare: MaxRareOpt = None,
    max_per_class: MaxPerClassOpt = None,
    test_data: TestDataOpt = None,
    test_fraction: TestFractionOpt = None,
    val_fraction: ValFractionOpt = None,
    folds: FoldsOpt = None,
    on_bad_file: OnBadFileOpt = None,
    frame: FrameOpt = None,
    config: ConfigOpt = None,
    seed: SeedOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
) -> None:
    """Count classes per split, image sizes, modes, bit depths, patients and problems. With --run, freeze the split."""
    from .inspect import inspect_data, render

    cfg, given = make_config(config, run=run, seed=seed, **_data_flags(
        data, layout, rare, negatives, max_rare, max_per_class, test_data, on_bad_file, test_fraction, val_fraction,
        folds, frame))
    summary = inspect_data(cfg, given)
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    else:
        render(summary, console)


@app.command()
@user_errors
def fit(
    data: DataOpt = None,
    rare: RareOpt = None,
    run: RunOpt = None,
    method: Annotated[Optional[str], typer.Option(
        "--method", help="loft (default): one LoRA per image; datadream: one per class; chimera: shared A + one B head "
                         "per image.")] = None,
    base_model: Annotated[Optional[str], typer.Option(
        "--base-model", help="Hub id (downloaded on first use), diffusers folder, .safetensors file, mini (shipped, "
                             "32 px), adapted[:<variant>] (made by `rareaug adapt`) or tiny (tests).")] = None,
    steps: Annotated[Optional[int], typer.Option(
        "--steps", help="Optimizer steps per LoRA (loft 600, datadream 400).")] = None,
    rank: Annotated[Optional[int], typer.Option("--rank", help="LoRA rank (loft 2, datadream 16).")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Learning rate (loft 1e-3, datadream 1e-4).")] = None,
    resolution: Annotated[Optional[int], typer.Option(
        "--resolution", help="Training resolution in pixels, a multiple of 8.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(
        "--batch-size", help="Samples per UNet pass (loft: LoRAs trained together); default sized to the GPU.")] = None,
    gradient_checkpointing: Annotated[Optional[bool], typer.Option(
        "--gradient-checkpointing/--no-gradient-checkpointing",
        help="Trade compute for memory (for 24 GB cards).")] = None,
    text_encoder_lora: Annotated[Optional[bool], typer.Option(
        "--text-encoder-lora/--no-text-encoder-lora",
        help="datadream: also a LoRA on the text encoder's attention.")] = None,
    semantic_boost: Annotated[Optional[bool], typer.Option(
        "--semantic-boost/--no-semantic-boost",
        help="chimera (default on): the shared A also trains on random crops that keep each image's mask box "
             "whole; images without a mask train it on their standard crop.")] = None,
    layout: LayoutOpt = None,
    negatives: NegativesOpt = None,
    max_rare: MaxRareOpt = None,
    max_per_class: MaxPerClassOpt = None,
    test_data: TestDataOpt = None,
    test_fraction: TestFractionOpt = None,
    val_fraction: ValFractionOpt = None,
    folds: FoldsOpt = None,
    on_bad_file: OnBadFileOpt = None,
    frame: FrameOpt = None,
    config: ConfigOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    offline: OfflineOpt = False,
    force: Annotated[bool, typer.Option(
        "--force", help="Start this method's fit over under a different config (its LoRAs are deleted).")] = False,
) -> None:
    """Train LoRAs on the rare class's training images: every per-image LoRA at once in one batched UNet pass."""
    from .fit import fit as run_fit

    cfg, given = make_config(
        config, run=run, seed=seed, device=device, **_data_flags(data, layout, rare, negatives, max_rare,
        max_per_class, test_data, on_bad_file, test_fraction, val_fraction, folds, frame),
        recipe__resolution=resolution, fit__method=method,
        fit__base_model=base_model, fit__steps=steps, fit__rank=rank, fit__lr=lr, fit__batch_size=batch_size,
        fit__gradient_checkpointing=gradient_checkpointing, fit__text_encoder_lora=text_encoder_lora,
        fit__semantic_boost=semantic_boost,
    )
    for one_class in cfg.per_rare_class():
        run_fit(one_class, given, force=force, console=console)


@app.command()
@user_errors
def adapt(
    run: RunOpt = None,
    data: DataOpt = None,
    rare: RareOpt = None,
    conditioning: Annotated[Optional[str], typer.Option(
        "--conditioning", help="labels (default): the recipe prompt with each image's class; domain: one domain "
                               "prompt for all; language-free: Lafite2 pseudo text from CLIP (no captions).")] = None,
    base_model: Annotated[Optional[str], typer.Option(
        "--base-model", help="The model to adapt (default: the run's base model).")] = None,
    unlabeled: Annotated[Optional[Path], typer.Option(
        "--unlabeled", help="A folder of extra images of the domain, without labels (copies of held-out images are "
                            "refused).")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Optimizer steps per fold (1000).")] = None,
    rank: Annotated[Optional[int], typer.Option(
        "--rank", help="Rank of the UNet LoRA (64); 0 = full fine-tuning of the UNet.")] = None,
    lr: Annotated[Optional[float], typer.Option(
        "--lr", help="Learning rate (1e-4 with a LoRA, 1e-5 full).")] = None,
    resolution: Annotated[Optional[int], typer.Option(
        "--resolution", help="Training resolution in pixels, a multiple of 8.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(
        "--batch-size", help="Images per step (default sized to the device).")] = None,
    domain_prompt: Annotated[Optional[str], typer.Option(
        "--domain-prompt", help="The domain's prompt, e.g. 'a chest x-ray' (domain conditioning; unlabeled images "
                                "under labels).")] = None,
    clip_model: Annotated[Optional[str], typer.Option(
        "--clip-model", help="language-free: CLIP folder or hub id whose text tower is the base's text encoder "
                             "(mini's own for mini).")] = None,
    captions: Annotated[Optional[Path], typer.Option(
        "--captions", help="language-free: a text file of captions whose words join the retrieval bank.")] = None,
    pseudo_tokens: Annotated[Optional[int], typer.Option(
        "--pseudo-tokens", help="language-free: 0 (default) = one pseudo-token per image; N = one per k-means "
                                "cluster.")] = None,
    perturbation: Annotated[Optional[float], typer.Option(
        "--perturbation", help="language-free: Lafite's noise on the pseudo text, relative to its norm (0.1).")] = None,
    layout: LayoutOpt = None,
    negatives: NegativesOpt = None,
    max_rare: MaxRareOpt = None,
    max_per_class: MaxPerClassOpt = None,
    test_data: TestDataOpt = None,
    test_fraction: TestFractionOpt = None,
    val_fraction: ValFractionOpt = None,
    folds: FoldsOpt = None,
    on_bad_file: OnBadFileOpt = None,
    frame: FrameOpt = None,
    config: ConfigOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    offline: OfflineOpt = False,
    force: Annotated[bool, typer.Option(
        "--force", help="Start this adapted model over under a different config.")] = False,
) -> None:
    """Adapt the base model to your domain on the run's training images (every class) before the LoRAs;
    then fit and generate with --base-model adapted[:<variant>]."""
    from .adapt.stage import adapt as run_adapt

    cfg, given = make_config(
        config, run=run, seed=seed, device=device, **_data_flags(data, layout, rare, negatives, max_rare,
        max_per_class, test_data, on_bad_file, test_fraction, val_fraction, folds, frame),
        recipe__resolution=resolution, adapt__conditioning=conditioning, adapt__base_model=base_model,
        adapt__unlabeled=unlabeled, adapt__steps=steps, adapt__rank=rank, adapt__lr=lr, adapt__batch_size=batch_size,
        adapt__domain_prompt=domain_prompt, adapt__clip_model=clip_model, adapt__captions=captions,
        adapt__pseudo_tokens=pseudo_tokens, adapt__perturbation=perturbation,
    )
    for one_class in cfg.per_rare_class():  # each class's run has its own split, so its own adapted model
        run_adapt(one_class, given, force=force, console=console)


@app.command()
@user_errors
def generate(
    run: RunOpt = None,
    rare: Annotated[Optional[str], typer.Option(
        "--rare", help="The run's rare class; a,b,c: each class's run under --run (RUN/<class>).")] = None,
    n: Annotated[Optional[int], typer.Option("--n", help="Kept synthetic images the pool must hold.")] = None,
    ratio: Annotated[Optional[float], typer.Option(
        "--ratio", help="R x (real rare train images) kept synthetic images.")] = None,
    method: Annotated[Optional[str], typer.Option(
        "--method", help="loft (default), datadream, chimera, classprompt (no LoRA), img2img (real images noised "
                         "to --strength, denoised), classic (albumentations copies), cutpaste or perlin (defects on "
                         "normal images, with masks).")] = None,
    strength: Annotated[Optional[float], typer.Option(
        "--strength", help="img2img: how far each real image is noised, 0-1 (0.5); small stays near the "
                           "source.")] = None,
    lora: Annotated[Optional[str], typer.Option(
        "--lora", help="img2img: none (default, the base model) or datadream (the class LoRA; fit it "
                       "first).")] = None,
    lam: Annotated[Optional[float], typer.Option(
        "--lambda", help="LoFT: weight of the first LoRA of a pair (0.5); 1 = one LoRA alone.")] = None,
    beta_alpha: Annotated[Optional[float], typer.Option(
        "--beta-alpha", help="LoFT: draw lambda ~ Beta(A, A) per image instead.")] = None,
    k: Annotated[Optional[int], typer.Option("--k", help="Chimera: heads mixed per image (default all).")] = None,
    dirichlet_alpha: Annotated[Optional[float], typer.Option(
        "--dirichlet-alpha", help="Chimera: head weights ~ Dirichlet(A) (1).")] = None,
    guidance: Annotated[Optional[float], typer.Option(
        "--guidance", help="Classifier-free guidance scale (2.0).")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Sampling steps (50).")] = None,
    scheduler: Annotated[Optional[str], typer.Option(
        "--scheduler", help="default (the model's), ddim, pndm, euler, euler-a, dpm++, unipc, heun, or a diffusers "
                            "class name.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(
        "--batch-size", help="Images per UNet pass (default sized to the device).")] = None,
    fold: Annotated[Optional[int], typer.Option(
        "--fold", help="Fuse only the LoRAs of images outside this fold.")] = None,
    base_model: Annotated[Optional[str], typer.Option(
        "--base-model", help="classprompt only: the model to sample (LoRA methods use the one they were fitted "
                             "on).")] = None,
    guard: Annotated[Optional[bool], typer.Option(
        "--guard/--no-guard", help="Reject near-copies of real images (on by default).")] = None,
    guard_rule: GuardRuleOpt = None,
    guard_ratio: GuardRatioOpt = None,
    guard_threshold: GuardThresholdOpt = None,
    guard_distance: Annotated[Optional[str], typer.Option(
        "--guard-distance", help="ssim (1 - SSIM, no weights needed) or lpips.")] = None,
    config: ConfigOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    offline: OfflineOpt = False,
    force: Annotated[bool, typer.Option(
        "--force", help="Start this pool over under a different config (its images are deleted).")] = False,
) -> None:
    """Fill a variant's ordered pool of synthetic rare images: fused LoRA pairs in large batches, guarded."""
    from .generate.stage import generate as run_generate

    cfg, given = make_config(
        config, run=run, seed=seed, device=device, data__rare=rare, generate__n=n, generate__ratio=ratio,
        generate__method=method, generate__strength=strength, generate__lora=lora,
        generate__lam=lam, generate__beta_alpha=beta_alpha, generate__k=k, generate__dirichlet_alpha=dirichlet_alpha,
        generate__guidance=guidance, generate__steps=steps, generate__scheduler=scheduler,
        generate__batch_size=batch_size, generate__fold=fold, generate__base_model=base_model, generate__guard=guard,
        generate__guard_rule=guard_rule_of(guard_rule, guard_threshold), generate__guard_ratio=guard_ratio,
        generate__guard_threshold=guard_threshold, generate__guard_distance=guard_distance,
    )
    for one_class in cfg.per_rare_class():
        run_generate(one_class, given, force=force, console=console)


def pool_maker(console: Console):
    """The sweep's pools come from the generate stage; the CLI wires the two (stages never import each other)."""
    from .generate.stage import generate

    def make_pool(config: Config) -> tuple[Path, Optional[str]]:
        result = generate(config, set(), console=console)
        return result.folder, result.stopped

    return make_pool


@app.command("sweep-ratio")
@user_errors
def sweep_ratio(
    run: RunOpt = None,
    rare: Annotated[Optional[str], typer.Option(
        "--rare", help="The run's rare class; a,b,c: each class's run under --run (RUN/<class>), their cells on the "
                       "same executor.")] = None,
    ratios: Annotated[Optional[str], typer.Option(
        "--ratios", help="Synthetic-to-real ratios (default 0,0.5,1,2,4,10,20).")] = None,
    methods: Annotated[Optional[str], typer.Option(
        "--methods", help="Synthetic sources, e.g. loft,img2img,classic,classprompt (default loft); cutpaste, "
                          "perlin for defect data.")] = None,
    model: Annotated[Optional[list[str]], typer.Option(
        "--model", help="resnet18 (default), resnet50, clip; repeat or comma-separate.")] = None,
    seeds: Annotated[Optional[int], typer.Option("--seeds", help="Seeds per cell (default 3).")] = None,
    steps: Annotated[Optional[int], typer.Option(
        "--steps", help="Optimizer steps per cell, the same at every ratio (default 500).")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Images per step (default 32).")] = None,
    input_size: Annotated[Optional[int], typer.Option(
        "--input-size", help="Classifier input side in pixels (default the model's own, 224 for ResNets; small images "
                             "train far faster at their own size).")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="AdamW learning rate (default 1e-4).")] = None,
    pretrained: Annotated[Optional[bool], typer.Option(
        "--pretrained/--no-pretrained",
        help="ImageNet / CLIP weights (default; downloaded on first use) or random init.")] = None,
    weights: Annotated[Optional[str], typer.Option(
        "--weights", help="A local ImageNet checkpoint for the ResNets.")] = None,
    clip_model: Annotated[Optional[str], typer.Option(
        "--clip-model", help="A CLIP folder or hub id (default openai/clip-vit-base-patch16).")] = None,
    pos_weight: Annotated[Optional[str], typer.Option(
        "--pos-weight", help="train (default): negatives/positives of each cell's training set; real: of the real "
                             "data.")] = None,
    task: Annotated[Optional[str], typer.Option(
        "--task", help="binary (default): rare vs rest; multiclass: every class, metrics for the rare one.")] = None,
    folds: FoldsOpt = None,
    executor: Annotated[Optional[str], typer.Option(
        "--executor", help="local (default): cells one after another here; ray: every cell a Ray task (pip install "
                           "'rareaug[ray]').")] = None,
    ray_address: Annotated[Optional[str], typer.Option(
        "--ray-address", help="ray: auto or host:port joins a running cluster (default: start a local one).")] = None,
    gpus_per_cell: Annotated[Optional[float], typer.Option(
        "--gpus-per-cell", help="ray: GPUs per cell; 0.5 puts two cells on a GPU (default 0).")] = None,
    cpus_per_cell: Annotated[Optional[float], typer.Option(
        "--cpus-per-cell", help="ray: CPUs (and torch threads) per cell (default 1).")] = None,
    group_cells: Annotated[Optional[int], typer.Option(
        "--group-cells", help="local: cells of one model trained at once as one stacked model (default 16 on a GPU, 1 "
                              "on a CPU).")] = None,
    generate_steps: Annotated[Optional[int], typer.Option(
        "--generate-steps", help="Sampling steps for pools made on demand.")] = None,
    strength: Annotated[Optional[float], typer.Option(
        "--strength", help="img2img pools: how far each real image is noised, 0-1 (0.5).")] = None,
    lora: Annotated[Optional[str], typer.Option(
        "--lora", help="img2img pools: none (default) or datadream (the class LoRA).")] = None,
    guard_rule: GuardRuleOpt = None,
    guard_ratio: GuardRatioOpt = None,
    guard_threshold: GuardThresholdOpt = None,
    config: ConfigOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    offline: OfflineOpt = False,
) -> None:
    """Train classifiers at synthetic-to-real ratios over seeds and folds; metrics with intervals; a recommended \
ratio."""
    from .sweep.stage import sweep_classes

    cfg, given = make_config(
        config, run=run, seed=seed, device=device, data__rare=rare, split__folds=folds, sweep__ratios=ratios,
        sweep__methods=methods, sweep__models=",".join(model) if model else None, sweep__seeds=seeds,
        sweep__steps=steps, sweep__batch_size=batch_size, sweep__input_size=input_size, sweep__lr=lr,
        sweep__pretrained=pretrained, sweep__weights=weights,
        sweep__clip_model=clip_model, sweep__pos_weight=pos_weight, sweep__task=task, sweep__executor=executor,
        sweep__ray_address=ray_address, sweep__gpus_per_cell=gpus_per_cell, sweep__cpus_per_cell=cpus_per_cell,
        sweep__group_cells=group_cells,
        sweep__generate_steps=generate_steps, generate__strength=strength, generate__lora=lora,
        generate__guard_rule=guard_rule_of(guard_rule, guard_threshold),
        generate__guard_ratio=guard_ratio, generate__guard_threshold=guard_threshold,
    )
    sweep_classes(cfg.per_rare_class(), pool_maker(console), given, console=console)


@app.command("export-mix")
@user_errors
def export_mix(
    run: Annotated[Path, typer.Option("--run", help="Run directory with a chimera fit.")],
    heads: Annotated[str, typer.Option("--heads", help="Head weights, e.g. r0001=0.5,r0003=0.5.")],
    out: Annotated[Path, typer.Option("--out", help="Where to write the plain diffusers LoRA file.")],
    cls: Annotated[Optional[str], typer.Option("--class", help="The class (default: the run's rare class).")] = None,
    fold: Annotated[Optional[int], typer.Option(
        "--fold", help="With folds: the fold whose Chimera fit to use.")] = None,
) -> None:
    """Export a ChimeraLoRA head mix (shared A, B = sum of w_i B_i) as a LoRA file plain diffusers loads."""
    from .lora.store import export_mix as export
    from .lora.store import safe_name
    from .run_dir import RunDir
    from .split import read_split

    weights = {}
    for part in heads.split(","):
        name, _, value = part.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise typer.BadParameter(f"{part!r}: write each head as id=weight, e.g. r0001=0.5") from None
    if cls is None:
        cls = next((row.cls for row in read_split(RunDir(run).split_csv) if row.rare), None)
    stem = cls if fold is None else f"{cls}-f{fold}"
    source = RunDir(run).loras("chimera") / f"{safe_name(stem or '')}.safetensors"
    if not source.exists():
        raise RareaugError(f"{source}: no chimera LoRA; run `rareaug fit --run {run} --method chimera` first")
    console.print(f"wrote {export(source, weights, out)}")


# The demo's own shorter settings on the shipped mini model, so that `make demo` (install included) ends within
# about five minutes on 2 CPU cores: measured 76 s for 15 LoRAs at 300 steps and 0.25 s a ResNet18 step (32 px).
DEMO_SIZES = {"fit__steps": 300, "sweep__steps": 80}


@app.command()
@user_errors
def demo(
    out: Annotated[Optional[Path], typer.Option("--out", "--run", help="Run directory (default runs/demo).")] = None,
    data: Annotated[Optional[Path], typer.Option(
        "--data", help="Your own data instead of the shipped sample (needs --rare).")] = None,
    rare: Annotated[Optional[str], typer.Option("--rare", help="The rare class of --data.")] = None,
    base_model: Annotated[Optional[str], typer.Option(
        "--base-model", help="Your own SD 1.x/2.x model (default: the shipped mini).")] = None,
    device: DeviceOpt = None,
    offline: OfflineOpt = False,
) -> None:
    """The whole job (inspect, fit, generate, sweep-ratio, report) on real images shipped with the package and the
    shipped mini base model, in minutes on a CPU; it needs no download (online, LPIPS's AlexNet weights are fetched
    for the diversity figure)."""
    from .fit import fit as run_fit
    from .generate.stage import generate as run_generate
    from .inspect import inspect_data, render
    from .report import write_report
    from .run_dir import RunDir
    from .samples import FASHION_RARE, fashion_root
    from .sweep.stage import sweep

    if (data is None) != (rare is None):
        raise RareaugError("--data and --rare go together: your data folder and which class of it is the rare one")
    if data is not None and base_model is None:
        raise RareaugError("--data needs --base-model: your SD 1.x/2.x model (a folder, a .safetensors file or a "
                           "hub id); --base-model mini runs the 32-px garment model on it, as a smoke test only")
    run = out or Path("runs/demo")
    # Real Fashion-MNIST images; rareaug-mini never saw a pullover, so it plays the rare class. Sizes are cut so
    # that a laptop CPU finishes in minutes: shorter LoRA training, ratios up to 2, one seed, 32-px classifiers.
    own_model = base_model is not None and base_model != "mini"
    if data is None:  # a copy the user can look at and reuse: the shipped sample is a plain class-folder data set
        data = run.parent / f"{run.name}-sample-data"  # beside the run: data never sits inside a run directory
        if not data.is_dir():  # copied whole, then renamed: an interrupted copy is never taken for the sample
            import shutil

            partial = run.parent / f".{run.name}-sample-data.partial"
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(fashion_root(), partial)
            partial.rename(data)
    sizes = {} if own_model else DEMO_SIZES
    flags = dict(run=run, device=device, data__data=data, data__rare=rare or FASHION_RARE, fit__base_model=base_model,
                 generate__ratio=2.0, sweep__ratios="0,1,2", sweep__seeds=1, **sizes)
    cfg, given = make_config(None if own_model else "fashion_mnist", **flags)
    model = cfg.fit.base_model
    console.print(f"[bold]rareaug demo[/] on "
                  f"{'your data' if rare else f'real Fashion-MNIST images shipped with the package, copied to {data}'}"
                  f" (rare class: {cfg.data.rare}), base model {model}"
                  + ("" if own_model else " (32 px, shipped; it never saw a pullover)") + f" -> {run}")
    console.rule("1. inspect")
    render(inspect_data(cfg, given), console)
    console.rule(f"2. fit (one LoFT LoRA per real {cfg.data.rare} image)")
    run_fit(cfg, given, console=console)
    console.rule("3. generate (ratio 2: two fused images per real training image)")
    result = run_generate(cfg, given, console=console)
    console.rule("4. sweep-ratio (ratios 0, 1, 2, one seed)")
    sweep(cfg, pool_maker(console), given, console=console)
    console.print(RunDir(run).sweep_summary_md.read_text(), markup=False, highlight=False)
    console.rule("5. report")
    page = write_report(run)
    console.print(f"[bold]done[/]: {result.kept} synthetic images in {result.folder}; the sweep in {run}/sweep.")
    console.print(f"Report: [bold]{page}[/] (open it in a browser). The sample is small: read the intervals, "
                  "not the point figures.")


@app.command("export")
@user_errors
def export_set(
    run: Annotated[Path, typer.Option("--run", help="Run directory.")],
    out: Annotated[Path, typer.Option(
        "--out", help="New folder for the training set (class/image + manifest.csv; see --masks).")],
    method: Annotated[str, typer.Option(
        "--method", help="Whose synthetic images: loft (default), datadream, chimera, classprompt, img2img, classic, "
                         "cutpaste, perlin.")] = "loft",
    ratio: Annotated[Optional[float], typer.Option(
        "--ratio", help="R x (real rare train images) synthetic images.")] = None,
    recommended: Annotated[bool, typer.Option(
        "--recommended", help="The ratio the sweep recommended on validation.")] = False,
    model: Annotated[Optional[str], typer.Option(
        "--model", help="With --recommended and several swept models: whose recommendation.")] = None,
    variant: Annotated[Optional[str], typer.Option(
        "--variant", help="The pool folder under RUN/synthetic when the method has several.")] = None,
    fold: Annotated[Optional[int], typer.Option(
        "--fold", help="Cross-validated runs: export fold F's training images and pool.")] = None,
    frame: Annotated[int, typer.Option("--frame", help="Frame of multi-frame DICOMs (as the run used).")] = 0,
    masks: Annotated[bool, typer.Option(
        "--masks", help="MVTec AD / anomalib layout instead of class folders: train/good, test/<defect>, "
        "ground_truth/<defect>/<id>_mask.png.")] = False,
) -> None:
    """Export real train images (re-encoded as PNG, no metadata) + kept synthetic images of one pool and ratio as a
    class-folder training set, or with --masks in the MVTec AD layout with defect masks."""
    from .export import export_training_set

    result = export_training_set(run, out, method, ratio, recommended, model, variant, fold, frame, masks)
    console.print(f"wrote {result.out}: {result.real} real and {result.synthetic} synthetic images "
                  f"({result.variant or 'none'}, ratio {result.ratio:g}), manifest.csv beside them")
    if masks:
        console.print(result.masks_summary(), markup=False, highlight=False)


@app.command()
@user_errors
def report(
    run: Annotated[Path, typer.Option("--run", help="Run directory to report on.")],
    open_page: Annotated[bool, typer.Option("--open", help="Open the report in the default browser.")] = False,
    real_images: Annotated[bool, typer.Option(
        "--real-images/--no-real-images",
        help="Show real images (leave them out for a report shared outside the hospital or plant).")] = True,
) -> None:
    """Write RUN/report.html: images, metric-vs-ratio curves, the recommended ratio, the guard, the config."""
    from .report import write_report

    path = write_report(run, real_images=real_images)
    console.print(f"wrote {path}")
    if open_page:
        import webbrowser

        webbrowser.open(path.resolve().as_uri())


def main() -> None:
    app()
