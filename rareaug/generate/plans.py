"""Fusion plans: what each pool slot mixes, as a pure function of (seed, slot).

A slot's LoRAs and weights never depend on how many images are asked for, so pools nest: ratio r's
images are always the first ones of ratio r' > r.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools

import numpy as np


@dataclasses.dataclass(frozen=True)
class Mix:
    """One slot's recipe: adapters (ids), their weights, and (chimera) the shared A's class."""

    loras: tuple[str, ...]
    weights: tuple[float, ...]


def stream(*keys) -> np.random.Generator:
    """An independent random stream per key tuple, e.g. (seed, "pairs", epoch)."""
    digest = hashlib.sha256(":".join(str(k) for k in keys).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def image_seed(seed: int, pool_index: int, attempt: int) -> int:
    """The seed of one image (initial noise and sampler noise): (run seed, pool index, attempt)."""
    digest = hashlib.sha256(f"{seed}:image:{pool_index}:{attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class LoftPairs:
    """Ordered pairs (i != j) of the same class, drawn without replacement until every pair is used,
    then reshuffled; weights (lambda, 1 - lambda), lambda fixed or ~ Beta(alpha, alpha).

    lambda = 1 is the single-LoRA ablation: each slot takes one adapter, cycling without replacement.
    """

    def __init__(self, ids: list[str], seed: int, lam: float | None = 0.5, beta_alpha: float | None = None):
        if len(ids) < 2:
            raise ValueError("LoFT fuses pairs: at least two LoRAs are needed")
        self.ids, self.seed, self.lam, self.beta_alpha = list(ids), seed, lam, beta_alpha
        self.single = beta_alpha is None and lam == 1.0
        self.units = ([(i,) for i in range(len(ids))] if self.single
                      else list(itertools.permutations(range(len(ids)), 2)))

    def __call__(self, slot: int) -> Mix:
        epoch, position = divmod(slot, len(self.units))
        order = stream(self.seed, "loft-pairs", epoch).permutation(len(self.units))
        unit = self.units[int(order[position])]
        if self.single:
            return Mix((self.ids[unit[0]],), (1.0,))
        lam = (self.lam if self.beta_alpha is None
               else float(stream(self.seed, "loft-lambda", slot).beta(self.beta_alpha, self.beta_alpha)))
        return Mix((self.ids[unit[0]], self.ids[unit[1]]), (lam, 1.0 - lam))


class ChimeraMix:
    """k heads of the class (all by default) with weights ~ Dirichlet(alpha * 1), new weights per slot."""

    def __init__(self, heads: list[str], seed: int, k: int | None = None, alpha: float = 1.0):
        self.heads, self.seed, self.alpha = list(heads), seed, alpha
        self.k = len(heads) if k is None else min(k, len(heads))
        if self.k < 1:
            raise ValueError("ChimeraLoRA needs at least one head")

    def __call__(self, slot: int) -> Mix:
        rng = stream(self.seed, "chimera", slot)
        chosen = sorted(rng.choice(len(self.heads), size=self.k, replace=False).tolist())
        weights = rng.dirichlet([self.alpha] * self.k)
        return Mix(tuple(self.heads[i] for i in chosen), tuple(float(w) for w in weights))


class SingleAdapter:
    """DataDream's class LoRA (or, for `classic`, the real image each copy is made from), in epochs."""

    def __init__(self, ids: list[str], seed: int, shuffle: bool = False):
        self.ids, self.seed, self.shuffle = list(ids), seed, shuffle

    def __call__(self, slot: int) -> Mix:
        epoch, position = divmod(slot, len(self.ids))
        order = stream(self.seed, "single", epoch).permutation(len(self.ids)) if self.shuffle else range(len(self.ids))
        return Mix((self.ids[int(order[position])],), (1.0,))


class NoAdapter:
    """ClassPrompt: the base model and the prompt alone."""

    def __call__(self, slot: int) -> Mix:
        return Mix((), ())
