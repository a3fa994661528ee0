"""Atomic writes: a file is either its old self or its new self, never half of each (Ctrl-C, a full disk)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml


def read_json(path: Path) -> Any:
    """A JSON file rareaug wrote: None when it is not there yet; one line naming it when it is damaged."""
    from .errors import RareaugError

    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise RareaugError(f"{path}: unreadable ({error}); rerun the stage that writes it") from error


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, 0o644)  # mkstemp makes 0600; outputs are meant to be read (a report, a manifest)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, content: Any) -> None:
    atomic_write_text(path, json.dumps(content, indent=2, sort_keys=False) + "\n")


def atomic_write_yaml(path: Path, content: Any) -> None:
    atomic_write_text(path, yaml.safe_dump(content, sort_keys=False))
