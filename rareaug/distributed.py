"""Several processes, one run: `accelerate launch -m rareaug fit ...` or `torchrun -m rareaug fit ...`.

LoRAs and synthetic images are independent of one another, so the processes never synchronise gradients:
each takes its share of the work, writes its own files (LoRA files, index and manifest shards) and waits at
a barrier; rank 0 alone writes what the run shares (the split, stage configs, merged indexes, timings).
The launchers set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; torch.distributed reads them
(gloo on CPUs, NCCL on GPUs). Without them this module is a no-op: rank 0 of 1.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

from .errors import RareaugError

T = TypeVar("T")


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def setup(device: str) -> None:
    """Join the launcher's process group once, before any shared file is touched; no-op for one process."""
    if world_size() <= 1 or not dist.is_available() or dist.is_initialized():
        return
    backend = "nccl" if device != "cpu" and torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # Long stages (one rank loading a model while another waits at a barrier) must not time out.
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(hours=6))


def local_device(name: str) -> str:
    """`auto` / `cuda` mean this process's own GPU (LOCAL_RANK) when several processes share a machine."""
    if world_size() > 1 and name in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return name


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block (making the split, a cache), then the others, who find its files there. When
    rank 0 fails (bad input, say), every rank stops with its message instead of waiting for it."""
    if world_size() <= 1 or not dist.is_initialized():
        yield
        return
    if is_main():
        try:
            yield
        except BaseException as error:
            broadcast(str(error) or type(error).__name__)
            raise
        broadcast(None)
    else:
        failure = broadcast(None)
        if failure is not None:
            raise RareaugError(f"rank 0 stopped: {failure}")
        yield


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share, round robin: item i goes to rank i mod world size."""
    return list(items[rank()::world_size()])


def gather(value: T) -> list[T]:
    """Every rank's value, in rank order (a list of one without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    found: list = [None] * dist.get_world_size()
    dist.all_gather_object(found, value)
    return found


def broadcast(value: T) -> T:
    """Rank 0's value on every rank (so that a decision made there, such as an error, is everyone's)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
