"""Training one cell: a binary rare-vs-rest classifier, the same number of optimizer steps at every ratio
(so more synthetic data does not simply mean more training), BCE with a positive weight, AdamW with a
cosine schedule, and the state with the best validation loss kept."""
from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler

from ..config import AugmentConfig, SweepConfig
from ..device import bf16_autocast
from .data import CellData, Example, ImageCache


@dataclasses.dataclass
class CellOutcome:
    val_scores: list[float]
    test_scores: list[float]
    best_step: int
    best_val_loss: float
    pos_weight: float


def positive_weight(rule: str, cell: CellData, real_train: list[Example]) -> float:
    """train: negatives / positives of the cell's own training set (the paper's rule); real: of the real
    data alone, so only the data changes across ratios."""
    examples = cell.train if rule == "train" else real_train
    positives = sum(e.label for e in examples)
    negatives = len(examples) - positives
    return negatives / max(positives, 1)


def class_weights(rule: str, cell: CellData, real_train: list[Example], n_classes: int) -> torch.Tensor:
    """Multi-class: inverse class frequency (n / (classes * n_c)), by the same train / real rule."""
    examples = cell.train if rule == "train" else real_train
    counts = torch.bincount(torch.tensor([e.target for e in examples]), minlength=n_classes).float()
    return len(examples) / (n_classes * counts.clamp(min=1))


def augment(images: torch.Tensor, augment_config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """The classifier's light augmentation, the same for every cell: flips the recipe allows, a small
    random crop. Deliberately mild: the `classic` baseline is where heavy augmentation is compared."""
    batch, _, size, _ = images.shape
    out = images
    if augment_config.hflip:
        flip = torch.rand(batch, generator=generator) < 0.5
        out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    if augment_config.vflip:
        flip = torch.rand(batch, generator=generator) < 0.5
        out = torch.where(flip[:, None, None, None], out.flip(-2), out)
    pad = max(1, size // 16)
    padded = F.pad(out, (pad, pad, pad, pad), mode="reflect")
    dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
    return padded[:, :, dy:dy + size, dx:dx + size]


def train_cell(model, cell: CellData, cache: ImageCache, sweep: SweepConfig, augment_config: AugmentConfig,
               pos_weight: float, seed: int, device: torch.device, weights: torch.Tensor | None = None) -> CellOutcome:
    """Binary (one logit, BCE with `pos_weight`) or, when class `weights` are given, multi-class (softmax,
    weighted cross-entropy); the score is the rare class's probability either way (its index is 0)."""
    generator = torch.Generator().manual_seed(seed)
    model.to(device)
    params = list(model.trainable_parameters())
    optimizer = _adamw(params, sweep)
    schedule = cosine_schedule(optimizer, sweep)
    weight = (torch.tensor([pos_weight]) if weights is None else weights).to(device)
    best = (float("inf"), 0, copy.deepcopy(model.state_dict()))
    order: list[int] = []
    for step in range(1, sweep.steps + 1):
        model.train()
        examples, images, order = next_batch(cell, order, sweep, generator, cache, augment_config)
        with bf16_autocast(device):
            logits = model(images.to(device)).float()
        loss = _criterion(logits, examples, weight, weights is not None)
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if is_check_step(step, sweep):
            val_loss = _loss(model, cell.val, cache, weight, device) if cell.val else float(step)
            if val_loss < best[0]:
                best = (val_loss, step, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[2])
    return CellOutcome(scores(model, cell.val, cache, device), scores(model, cell.test, cache, device), best[1],
                       best[0], pos_weight)


def next_batch(cell: CellData, order: list[int], sweep: SweepConfig, generator: torch.Generator, cache: ImageCache,
               augment_config: AugmentConfig) -> tuple[list[Example], torch.Tensor, list[int]]:
    """The next batch of a cell's training images, augmented, and the rest of its order: epochs of seeded
    permutations, so a cell draws the same batches whether it trains alone or in a group."""
    if len(order) < sweep.batch_size:
        order = order + torch.randperm(len(cell.train), generator=generator).tolist()
    picks, order = order[:sweep.batch_size], order[sweep.batch_size:]
    examples = [cell.train[i] for i in picks]
    return examples, augment(cache.batch(examples), augment_config, generator), order


def cosine_schedule(optimizer, sweep: SweepConfig):
    return get_scheduler("cosine", optimizer, num_warmup_steps=max(1, sweep.steps // 20),
                         num_training_steps=sweep.steps)




def is_check_step(step: int, sweep: SweepConfig) -> bool:
    """Validation-loss checks: every eval_every steps (default a tenth of the run) and at the last step."""
    return step % (sweep.eval_every or max(1, sweep.steps // 10)) == 0 or step == sweep.steps


def _adamw(params, sweep: SweepConfig) -> torch.optim.AdamW:
    """The fused kernel where this torch has it (CPU and CUDA since 2.4): on 2 CPU cores the per-parameter
    loop took 73 ms of a 165 ms ResNet18 step at 32 px, the fused one 11 ms. Same update rule; results
    differ from the loop's only by float rounding."""
    try:
        return torch.optim.AdamW(params, lr=sweep.lr, weight_decay=sweep.weight_decay, fused=True)
    except (RuntimeError, TypeError):  # an older torch, or a device without the fused kernel
        return torch.optim.AdamW(params, lr=sweep.lr, weight_decay=sweep.weight_decay)


def _criterion(logits: torch.Tensor, examples: list[Example], weight: torch.Tensor, multiclass: bool) -> torch.Tensor:
    if multiclass:
        targets = torch.tensor([e.target for e in examples], device=logits.device)
        return F.cross_entropy(logits, targets, weight=weight)
    labels = torch.tensor([float(e.label) for e in examples], device=logits.device)
    return F.binary_cross_entropy_with_logits(logits, labels, pos_weight=weight)


@torch.no_grad()
def _logits(model, examples: list[Example], cache: ImageCache, device: torch.device, batch: int = 64) -> torch.Tensor:
    model.eval()
    parts = [model(cache.batch(examples[start:start + batch]).to(device)).float().cpu()
             for start in range(0, len(examples), batch)]
    return torch.cat(parts)


def scores(model, examples: list[Example], cache: ImageCache, device: torch.device) -> list[float]:
    """The rare class's probability: sigmoid of the one logit, or softmax at the rare index (0)."""
    logits = _logits(model, examples, cache, device)
    return (torch.sigmoid(logits) if logits.ndim == 1 else logits.softmax(dim=1)[:, 0]).tolist()


@torch.no_grad()
def _loss(model, examples: list[Example], cache: ImageCache, weight: torch.Tensor, device: torch.device) -> float:
    logits = _logits(model, examples, cache, device)
    return float(_criterion(logits, examples, weight.cpu(), logits.ndim == 2))
