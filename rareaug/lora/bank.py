"""The LoRA bank: every adapter of a run in stacked tensors, each sample routed to its own mix.

A targeted Linear computes `W x + scale * sum_k w[b,k] * B[ib[b,k]] A[ia[b,k]] x` with two batched matmuls:
a K-way mix is a rank-K*r LoRA per sample. peft cannot do this (its per-sample `adapter_names` is
inference-only, one adapter per sample, no weights), hence a module of our own; it stays numerically
the same as peft/diffusers LoRA layers, which the tests check.

Separate A and B indices serve ChimeraLoRA (one shared A per class, one B head per image); LoFT and
DataDream route A and B with the same index.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Iterator

import torch
from torch import nn

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclasses.dataclass
class Routing:
    """Per-sample adapter choice, shared by every bank layer of a model. None = LoRA off."""

    a_idx: torch.Tensor | None = None  # (batch, K) long
    b_idx: torch.Tensor | None = None  # (batch, K) long
    weights: torch.Tensor | None = None  # (batch, K) float


class LoRABankLinear(nn.Module):
    """A frozen Linear plus a bank of LoRA factors: A (n_a, r, in) and B (n_b, out, r)."""

    def __init__(self, base: nn.Linear, n_a: int, n_b: int, rank: int, alpha: float, routing: Routing):
        super().__init__()
        self.base = base
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.routing = routing
        # Factors train in float32 under fp16/bf16 bases, and stay float64 under a float64 base (the exactness tests).
        factory = {"device": base.weight.device, "dtype": torch.promote_types(base.weight.dtype, torch.float32)}
        self.lora_A = nn.Parameter(torch.zeros(n_a, rank, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(n_b, base.out_features, rank, **factory))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        routing = self.routing
        if routing.a_idx is None:
            return out
        batch, k = routing.a_idx.shape
        if x.shape[0] != batch:
            raise RuntimeError(f"LoRA bank routed for batch {batch}, called with batch {x.shape[0]}")
        flat = x.reshape(batch, -1, x.shape[-1])
        dtype = flat.dtype
        a = self.lora_A[routing.a_idx].reshape(batch, k * self.rank, -1).to(dtype)  # (b, K*r, in)
        b = self.lora_B[routing.b_idx]  # (b, K, out, r)
        b = b.permute(0, 2, 1, 3).reshape(batch, -1, k * self.rank).to(dtype)  # (b, out, K*r)
        mix = (routing.weights * self.scale).repeat_interleave(self.rank, dim=1).to(dtype)  # (b, K*r)
        hidden = torch.bmm(flat, a.transpose(1, 2)) * mix[:, None, :]
        delta = torch.bmm(hidden, b.transpose(1, 2))
        return out + delta.reshape(out.shape)


def _pad(a_idx, b_idx, weights):
    width = max(len(row) for row in a_idx)
    b_idx = a_idx if b_idx is None else b_idx
    weights = [[1.0] * len(row) for row in a_idx] if weights is None else weights
    fill = lambda rows, value: [list(row) + [value] * (width - len(row)) for row in rows]  # noqa: E731
    return fill(a_idx, 0), fill(b_idx, 0), fill(weights, 0.0)


class LoRABank:
    """Installs bank layers into a model's targeted Linears and routes, initialises, saves them."""

    def __init__(self, model: nn.Module, n_a: int, n_b: int | None = None, rank: int = 2, alpha: float = 2.0,
                 targets: tuple[str, ...] = DEFAULT_TARGETS):
        self.model = model
        self.n_a, self.n_b = n_a, (n_a if n_b is None else n_b)
        self.rank, self.alpha = rank, alpha
        self.routing = Routing()
        self.layers: dict[str, LoRABankLinear] = {}
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
                layer = LoRABankLinear(module, self.n_a, self.n_b, rank, alpha, self.routing)
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
                self.layers[name] = layer
        if not self.layers:
            raise ValueError(f"no Linear layer named {targets} in the model")

    # --- routing -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def route(self, a_idx, b_idx=None, weights=None) -> Iterator[None]:
        """Route sample b through adapters a_idx[b, :] / b_idx[b, :] with weights[b, :] (default 1).

        Ragged lists (samples mixing different numbers of adapters) are padded with weight-0 entries.
        """
        device = next(iter(self.layers.values())).lora_A.device
        if isinstance(a_idx, (list, tuple)) and a_idx and isinstance(a_idx[0], (list, tuple)):
            a_idx, b_idx, weights = _pad(a_idx, b_idx, weights)
        a_idx = torch.as_tensor(a_idx, dtype=torch.long, device=device)
        if a_idx.ndim == 1:
            a_idx = a_idx[:, None]
        b_idx = a_idx if b_idx is None else torch.as_tensor(b_idx, dtype=torch.long, device=device).reshape(a_idx.shape)
        weights = (torch.ones(a_idx.shape, device=device) if weights is None
                   else torch.as_tensor(weights, dtype=torch.float32, device=device).reshape(a_idx.shape))
        previous = dataclasses.astuple(self.routing)
        self.routing.a_idx, self.routing.b_idx, self.routing.weights = a_idx, b_idx, weights
        try:
            yield
        finally:
            self.routing.a_idx, self.routing.b_idx, self.routing.weights = previous

    # --- parameters --------------------------------------------------------------------------------

    def a_parameters(self) -> list[nn.Parameter]:
        return [layer.lora_A for layer in self.layers.values()]

    def b_parameters(self) -> list[nn.Parameter]:
        return [layer.lora_B for layer in self.layers.values()]

    def parameters(self) -> list[nn.Parameter]:
        return self.a_parameters() + self.b_parameters()

    @torch.no_grad()
    def init_a(self, slot: int, generator: torch.Generator, kind: str = "kaiming") -> None:
        """Initialise one A slot from its own generator, so its values never depend on its neighbours.

        kaiming: peft's default for Linear LoRA (kaiming-uniform, a=sqrt(5)); gaussian: standard deviation
        1/r, as ChimeraLoRA's shared A.
        """
        for layer in self.layers.values():
            shape = layer.lora_A.shape[1:]
            if kind == "kaiming":
                bound = 1.0 / math.sqrt(shape[1])  # kaiming_uniform with a=sqrt(5): gain*sqrt(3/fan_in)
                values = (torch.rand(shape, generator=generator, device=generator.device) * 2 - 1) * bound
            elif kind == "gaussian":
                values = torch.randn(shape, generator=generator, device=generator.device) / self.rank
            else:
                raise ValueError(f"unknown init {kind!r}")
            layer.lora_A[slot] = values.to(layer.lora_A.device)

    @torch.no_grad()
    def zero_b(self, slot: int | None = None) -> None:
        for layer in self.layers.values():
            if slot is None:
                layer.lora_B.zero_()
            else:
                layer.lora_B[slot].zero_()

    @torch.no_grad()
    def get_slot(self, a_slot: int, b_slot: int | None = None) -> dict[str, torch.Tensor]:
        """One adapter's raw factors: {"<layer>.A": (r, in), "<layer>.B": (out, r)}, on the CPU."""
        b_slot = a_slot if b_slot is None else b_slot
        state = {}
        for name, layer in self.layers.items():
            state[f"{name}.A"] = layer.lora_A[a_slot].detach().cpu().clone()
            state[f"{name}.B"] = layer.lora_B[b_slot].detach().cpu().clone()
        return state

    @torch.no_grad()
    def set_slot(self, state: dict[str, torch.Tensor], a_slot: int, b_slot: int | None = None) -> None:
        b_slot = a_slot if b_slot is None else b_slot
        for name, layer in self.layers.items():
            layer.lora_A[a_slot] = state[f"{name}.A"].to(layer.lora_A.device)
            layer.lora_B[b_slot] = state[f"{name}.B"].to(layer.lora_B.device)

    def remove(self) -> None:
        """Put the original Linear layers back."""
        for name, layer in self.layers.items():
            parent_name, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent_name) if parent_name else self.model, child, layer.base)
        self.layers = {}
