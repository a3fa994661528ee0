"""May rareaug download, and how to say what is missing.

rareaug follows the libraries' conventions: on a machine that is online, a model or weights file that is not in
its standard cache (the Hugging Face hub cache, torchvision's `torch.hub.get_dir()/checkpoints`, TORCH_HOME
respected) is downloaded there on first use by the library's own function, with its progress bar. One that is
already cached loads from the cache without a network call. `HF_HUB_OFFLINE=1` (which `--offline` sets) forbids
every download: what is missing ends in one `RareaugError` line naming it and the command that fetches it.
"""
from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

from .errors import RareaugError, one_line

T = TypeVar("T")
OFFLINE_HOW = "--offline or HF_HUB_OFFLINE=1"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def offline() -> bool:
    """True when downloads are forbidden: HF_HUB_OFFLINE (or its alias TRANSFORMERS_OFFLINE) read now, with
    huggingface_hub's own truthy values, so `--offline` set later in the process counts."""
    from huggingface_hub.constants import ENV_VARS_TRUE_VALUES

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in ENV_VARS_TRUE_VALUES


def go_offline() -> None:
    """Forbid downloads for the rest of the process: rareaug's own loads and diffusers/transformers/hub calls."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:  # read once at import; transformers and the hub's HTTP session ask it later
        constants.HF_HUB_OFFLINE = True


def hf_download(repo: str, include: tuple[str, ...] = ()) -> str:
    """The command that puts `repo` in the Hugging Face cache (the current CLI; `huggingface-cli` was its old name)."""
    patterns = "".join(f" --include '{pattern}'" for pattern in include)  # a list option: repeated
    return f"`hf download {repo}{patterns}`"


# ---------------------------------------------------------------------------------------------- the hub
def is_hub_id(spec: str) -> bool:
    """`owner/name`, the form of a Hugging Face hub id (callers check first that it is not a local path)."""
    return bool(_HUB_ID.match(spec))


def cached_hub_file(repo: str, filename: str) -> str | None:
    """The local path of `filename` of `repo` in the Hugging Face cache (main revision), or None."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo, filename)
    except Exception:  # an id the hub would reject is not cached either
        return None
    return found if isinstance(found, str) else None


def hub_revision(repo: str, filename: str) -> str | None:
    """The commit of the cached snapshot `repo` loads from (`.../snapshots/<commit>/<filename>`), for provenance."""
    found = cached_hub_file(repo, filename)
    if found is None:
        return None
    snapshot = Path(found).parent  # `filename` is at the snapshot's top level (model_index.json, config.json)
    return snapshot.name if snapshot.parent.name == "snapshots" else None


def from_hub(load: Callable[[bool], T], repo: str, what: str, alternatives: str, probe: str,
             include: tuple[str, ...] = ()) -> T:
    """`load(local_files_only)` the library way: from the cache when `probe` is cached; else, online, a download
    into the standard cache by the library itself (with its progress bars); offline, one line saying what is
    missing and how to get it.

    Args:
        load: calls the library's `from_pretrained` / `snapshot_download` with the given `local_files_only`.
        repo: the hub id.
        what: how the user named it, e.g. "--base-model 'owner/name'".
        alternatives: the other fixes, e.g. "pass --base-model /path/to/folder".
        probe: a file every copy of the repo has (model_index.json, config.json): is the repo cached?
        include: the file patterns that suffice (for the `hf download` hint).
    """
    command = hf_download(repo, include)
    if cached_hub_file(repo, probe) is not None:
        try:
            return load(True)
        except Exception as error:  # typically a half-finished download: online, the library completes it
            if offline():
                raise RareaugError(f"{what} is in the local Hugging Face cache but did not load ({one_line(error)}); "
                                   f"finish the download with {command}, or {alternatives}") from error
    elif offline():
        raise RareaugError(f"{what} is not in the local Hugging Face cache and nothing is downloaded ({OFFLINE_HOW}); "
                           f"download it once with {command} on a connected machine, or {alternatives}")
    try:
        return load(False)
    except Exception as error:  # no connection, no such repo, a gated one: the library's reason, in one line
        raise RareaugError(f"{what} could not be downloaded from the Hugging Face hub ({one_line(error)}); run "
                           f"{command} on a connected machine and copy its cache here, or {alternatives}; on a "
                           f"machine without internet use {OFFLINE_HOW} to load only local files") from error


# ------------------------------------------------------------------------------------------ torch hub
def torch_hub_path(url: str) -> Path:
    """Where torchvision's weights enums keep `url`'s file: `torch.hub.get_dir()/checkpoints/<its name>`."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def torch_hub_file(url: str, what: str, alternatives: str = "") -> Path:
    """The path of `url`'s file in torchvision's cache (`torch.hub.get_dir()/checkpoints`, as its weights
    enums use), downloaded there first when missing and allowed, with torch.hub's progress bar and hash check."""
    import torch.hub

    path = torch_hub_path(url)
    if path.is_file():
        return path
    other = f", or {alternatives}" if alternatives else ""
    if offline():
        raise RareaugError(f"{what}: not at {path} (torchvision cache) and nothing is downloaded ({OFFLINE_HOW}); "
                           f"download {url} to that path on a connected machine{other}")
    match = torch.hub.HASH_REGEX.search(path.name)  # torchvision names carry the sha256 prefix, as torch.hub checks
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # a read-only TORCH_HOME is one line too
        torch.hub.download_url_to_file(url, str(path), match.group(1) if match else None, progress=True)
    except Exception as error:  # URLError, a hash mismatch, a full disk, a read-only cache
        raise RareaugError(f"{what}: could not download {url} ({one_line(error)}); put that file at {path} "
                           f"(downloaded on a connected machine){other}") from error
    return path
