"""Everything the report shows, read from the run directory's files (never from the data folder's names).

Only opaque ids leave here: split.csv's paths are used to open real images, never to label them.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
from collections import Counter, defaultdict
from pathlib import Path

from ..errors import RareaugError
from ..generate.manifest import Manifest, kept_rows
from ..io import read_csv, read_json
from ..run_dir import RunDir
from ..split import SplitRow, read_split
from ..sweep.curves import patient_groups

VERSIONED = ("rareaug", "torch", "diffusers", "peft", "transformers", "scikit-learn")


@dataclasses.dataclass
class Pool:
    """One synthetic variant: its manifest rows (kept and rejected) and its summary."""

    variant: str
    method: str
    folder: Path
    rows: list[dict]
    summary: dict

    @property
    def kept(self) -> list[dict]:
        return kept_rows(self.rows)

    @property
    def rejected(self) -> list[dict]:
        return [r for r in self.rows if r.get("kept") == "0"]


@dataclasses.dataclass
class ReportData:
    run: Path
    rows: list[SplitRow]
    rare: str
    counts: dict[str, Counter]  # class -> split -> images
    data: dict  # data.json (inspect), {} when inspect never ran
    pools: list[Pool]
    summary: dict | None  # sweep/summary.json
    metrics: list[dict]  # sweep/metrics.csv
    stages: dict[str, str]  # stage config name -> YAML text
    timings: dict
    versions: dict[str, str]

    def real(self, image_id: str) -> SplitRow | None:
        return self._by_id.get(image_id)

    def __post_init__(self):
        self._by_id = {row.id: row for row in self.rows}
        self.groups = patient_groups(self.rows)  # for the bootstrap


def gather(run_path: Path) -> ReportData:
    run = RunDir(run_path)
    if not run.split_csv.is_file():
        raise RareaugError(f"{run.path}: not a run directory (no split.csv); run `rareaug inspect --run {run.path}` "
                           "or `rareaug fit` first")
    rows = read_split(run.split_csv)
    rare = next((row.cls for row in rows if row.rare), "")
    counts: dict[str, Counter] = defaultdict(Counter)
    for row in rows:
        counts[row.cls][row.split] += 1
    return ReportData(
        run=run.path, rows=rows, rare=rare, counts=dict(counts),
        data=read_json(run.data_json) or {},
        pools=read_pools(run.synthetic),
        summary=read_json(run.sweep_summary_json),
        metrics=_csv(run.sweep_metrics),
        stages={p.stem: p.read_text() for p in sorted(run.stages.glob("*.yaml"))},
        timings=read_json(run.timings_json) or {},
        versions=package_versions(VERSIONED),
    )


def read_pools(folder: Path) -> list[Pool]:
    """Every synthetic pool under RUN/synthetic with its manifest (shards of an interrupted run included)."""
    pools = []
    for pool in sorted({manifest.parent for manifest in folder.glob("*/manifest*.csv")}):
        summary = read_json(pool / "summary.json") or {}
        rows = Manifest(pool).rows()
        method = summary.get("method") or (rows[0]["method"] if rows else pool.name.split("-")[0])
        pools.append(Pool(pool.name, method, pool, rows, summary))
    return pools


def _csv(path: Path) -> list[dict]:
    return read_csv(path, fix="rerun `rareaug sweep-ratio` on this run")


def package_versions(names) -> dict[str, str]:
    """Installed versions, for the provenance of a report or a benchmark."""
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found
