"""One command at a time per run directory, by an operating-system advisory lock on RUN/.lock.

`fcntl.flock` dies with its holder (a kill -9 frees it, and a rerun resumes), so no stale lock file is ever
left to delete by hand; no library in our stack offers this, hence the small module. The lock is taken once per
launch: only rank 0 of a torchrun/accelerate command takes it (its other ranks work under it), Ray workers never
call a stage, and a stage that calls another (sweep-ratio making a pool) finds it already held.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import RareaugError

LOCK_NAME = ".lock"
_held: dict[Path, int] = {}  # resolved run directory -> open file descriptor holding its lock


def lock_run(folder: Path) -> None:
    """Take the run's lock until `release_all` (the end of the command) or the process's end. A run folder that
    does not exist yet is left alone: it is locked by the stage that creates it."""
    from . import distributed

    folder = Path(folder).resolve()
    if folder in _held or not folder.is_dir() or not distributed.is_main():
        return
    import fcntl

    descriptor = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(descriptor, 32, 0).decode(errors="replace").strip() or "another process"
        os.close(descriptor)
        raise RareaugError(f"{folder}: in use by another rareaug command (pid {holder}); wait for it to finish, "
                           "or use another --run") from None
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, str(os.getpid()).encode(), 0)
    _held[folder] = descriptor


def release_all() -> None:
    """Free every lock this process holds (closing the descriptor releases the flock)."""
    while _held:
        _, descriptor = _held.popitem()
        os.close(descriptor)
