"""Reading and writing the run directory's files. Writes are atomic: a file is either its old self or its new
self, never half of each (Ctrl-C, a full disk). CSV files are UTF-8 with "\n" line ends, one writer and one
reader for all of them."""
from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from .errors import RareaugError, one_line


def read_json(path: Path) -> Any:
    """A JSON file rareaug wrote: None when it is not there yet; one line naming it when it is damaged."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise RareaugError(f"{path}: unreadable ({one_line(error)}); rerun the stage that writes it") from error


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


def write_csv(path: Path, columns: Sequence[str], rows: Iterable[Sequence[Any] | Mapping[str, Any]]) -> None:
    """Write a header and rows (sequences in column order, or mappings: missing keys empty, extra keys dropped)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([row.get(column, "") for column in columns] if isinstance(row, Mapping) else row)
    atomic_write_text(path, buffer.getvalue())


def read_csv(path: Path, columns: Sequence[str] | None = None, missing_ok: bool = True,
             fix: str = "rerun the stage that writes it") -> list[dict[str, str]]:
    """A CSV file's rows as dicts: [] when it is not there (unless `missing_ok` is False); one line naming the
    file and `fix` when it is unreadable or, with `columns`, has another header."""
    path = Path(path)
    if not path.is_file():
        if missing_ok:
            return []
        raise RareaugError(f"{path}: missing; {fix}")
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if columns is not None and tuple(reader.fieldnames or ()) != tuple(columns):
                raise RareaugError(f"{path}: not the file rareaug writes there (columns {reader.fieldnames}); {fix}")
            return list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise RareaugError(f"{path}: unreadable ({one_line(error)}); {fix}") from error
