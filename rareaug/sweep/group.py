"""Many cells trained at once: cells of one architecture that differ in data, seed and ratio, as LoFT's LoRAs do.

Their weights are stacked (`torch.func.stack_module_state`) and one `vmap`-ed forward and backward trains them
all per step: each cell keeps its own batches, augmentation draws, batch-norm statistics, positive weight,
AdamW state (an element-wise rule, so a stacked tensor updates exactly as its slices would), validation checks
and best state. A cell trained in a group equals the same cell trained alone (`train.train_cell`) within float
rounding (tests/test_sweep_group.py; with dropout off: dropout masks are drawn per cell, not as alone). Frozen
weights (CLIP's encoder under LoRA) are shared, not stacked.

Written here because no library trains an ensemble of differently-fed models with per-member optimizer
checkpoints; torch.func gives the stacking and vmap, the loop is train_cell's.
"""
from __future__ import annotations

import copy

import torch
from torch.func import functional_call, stack_module_state, vmap

from ..config import AugmentConfig, SweepConfig
from ..device import bf16_autocast
from .data import CellData, ImageCache
from .train import (
    CellOutcome,
    _adamw,
    _criterion,
    _loss,
    cosine_schedule,
    is_check_step,
    next_batch,
    scores,
    train_cell,
)


def train_group(models: list, cells: list[CellData], cache: ImageCache, sweep: SweepConfig,
                augment_config: AugmentConfig, pos_weights: list[float], seeds: list[int], device: torch.device,
                weights: list[torch.Tensor | None]) -> list[CellOutcome]:
    """train_cell for every (model, cell) pair at once; the models end holding their best states."""
    if len(models) == 1:  # nothing to share: the plain loop, with no vmap overhead
        return [train_cell(models[0], cells[0], cache, sweep, augment_config, pos_weights[0], seeds[0], device,
                           weights[0])]
    for model in models:
        model.to(device).train()
    trainable = [name for name, p in models[0].named_parameters() if p.requires_grad]
    stacked, buffers = stack_module_state(models)
    params = {name: stacked[name] for name in trainable}  # leaves with requires_grad: what AdamW updates
    # Frozen weights the cells share (a pretrained CLIP encoder) are passed once; frozen weights that differ
    # (a randomly initialised one, seeded per cell) are stacked like the buffers.
    per_model = [dict(model.named_parameters()) for model in models]
    frozen_names = [name for name, p in models[0].named_parameters() if not p.requires_grad]
    differ = {name for name in frozen_names if any(not torch.equal(m[name], per_model[0][name]) for m in per_model)}
    shared = {name: per_model[0][name].detach() for name in frozen_names if name not in differ}
    buffers = {**buffers, **{name: stacked[name].detach() for name in differ}}
    base = copy.deepcopy(models[0]).to("meta")

    def forward(own, state, images):
        return functional_call(base, (own, shared, state), (images,))

    # Dropout (CLIP's LoRA) draws a mask per cell; alone, a cell draws from the global generator too, so its masks
    # were never seeded per cell: the group keeps their distribution, not their values.
    batched = vmap(forward, in_dims=(0, 0, 0), randomness="different")
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    optimizer = _adamw(list(params.values()), sweep)
    schedule = cosine_schedule(optimizer, sweep)
    losses_weight = [(torch.tensor([w]) if wt is None else wt).to(device) for w, wt in zip(pos_weights, weights)]
    best = [(float("inf"), 0, copy.deepcopy(model.state_dict())) for model in models]
    orders: list[list[int]] = [[] for _ in models]
    for step in range(1, sweep.steps + 1):
        batches, chosen = [], []
        for k, cell in enumerate(cells):  # each cell draws exactly as train_cell would
            examples, images, orders[k] = next_batch(cell, orders[k], sweep, generators[k], cache, augment_config)
            chosen.append(examples)
            batches.append(images)
        with bf16_autocast(device):
            logits = batched(params, buffers, torch.stack(batches).to(device)).float()
        loss = sum(_criterion(logits[k], chosen[k], losses_weight[k], weights[k] is not None)
                   for k in range(len(cells)))
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if is_check_step(step, sweep):
            for k, (model, cell) in enumerate(zip(models, cells)):
                _load_slice(model, params, buffers, k)
                val_loss = _loss(model, cell.val, cache, losses_weight[k], device) if cell.val else float(step)
                model.train()
                if val_loss < best[k][0]:
                    best[k] = (val_loss, step, copy.deepcopy(model.state_dict()))
    outcomes = []
    for k, (model, cell) in enumerate(zip(models, cells)):
        model.load_state_dict(best[k][2])
        outcomes.append(CellOutcome(scores(model, cell.val, cache, device), scores(model, cell.test, cache, device),
                                    best[k][1], best[k][0], pos_weights[k]))
    return outcomes


@torch.no_grad()
def _load_slice(model, params: dict, buffers: dict, k: int) -> None:
    """Cell k's current weights and batch-norm statistics into its own module (for validation and keeping)."""
    state = model.state_dict()
    for name, value in {**params, **buffers}.items():
        if name in state:
            state[name].copy_(value[k])
