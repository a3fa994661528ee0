"""The frozen split: train / val / test plus a fold number, grouped by patient, stratified by class.

Written once to `RUN_DIR/split.csv` and only read afterwards. Records get opaque ids (r0001 for rare,
n0001 for negatives); patient groups are salted hashes whose salt is never stored.

Hand-written rather than sklearn's StratifiedGroupKFold: that gives equal folds only, while we need
arbitrary fractions, a layout's fixed test split, and at least one rare image in validation.
"""
from __future__ import annotations

import dataclasses
import hashlib
import secrets
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from data_adapters import Record

from .config import Config
from .errors import RareaugError, one_line
from .io import read_csv, write_csv

COLUMNS = ("id", "root", "path", "mask", "class", "rare", "split", "fold", "group")
SPLITS = ("train", "val", "test")


@dataclasses.dataclass
class SplitRow:
    id: str
    root: str
    path: str
    mask: str
    cls: str
    rare: bool
    split: str
    fold: int
    group: str

    @property
    def abs_path(self) -> Path:
        return Path(self.root) / self.path

    @property
    def abs_mask(self) -> Path | None:
        return Path(self.root) / self.mask if self.mask else None


@dataclasses.dataclass(frozen=True)
class FoldView:
    """What one fold of the split may see. The leakage rule, written once: a fold validates on its own
    non-test images and trains (classifiers, class-level LoRAs, the pools it fuses) on every non-test image
    outside it; without folds, `train` trains and `val` validates. The test images are nobody's training data."""

    train: list[SplitRow]
    validate: list[SplitRow]
    test: list[SplitRow]

    @property
    def rare_train(self) -> list[SplitRow]:
        """The real rare images this fold's synthetic data may come from."""
        return [row for row in self.train if row.rare]


def split_folds(rows: list[SplitRow]) -> int:
    """How many folds a split has (1 when it was made without --folds)."""
    return max((row.fold for row in rows), default=0) + 1


def chosen_fold(folds: int, fold: int | None) -> int:
    """The fold a user's --fold names: required with folds, refused without (0 stands for the plain split)."""
    if folds > 1 and fold is None:
        raise RareaugError(f"this run's split has {folds} folds: pass --fold F (0..{folds - 1})")
    if folds == 1 and fold is not None:
        raise RareaugError("--fold: this run's split has no folds (made with --folds 1); drop --fold, or make a "
                           "new run with --folds K")
    return fold or 0


def fold_view(rows: list[SplitRow], folds: int, fold: int = 0) -> FoldView:
    """Fold `fold`'s train / validate / test rows (0..folds-1, as the sweep's cells number them); a split
    without folds has the one view, fold 0, where the split column decides. A fold out of range is one line."""
    if not 0 <= fold < folds:
        raise RareaugError(f"--fold {fold} is out of range: this run's split has {folds} folds (0..{folds - 1})")
    test = [row for row in rows if row.split == "test"]
    if folds == 1:
        return FoldView([row for row in rows if row.split == "train"], [row for row in rows if row.split == "val"],
                        test)
    seen = seen_rows(rows)
    return FoldView([row for row in seen if row.fold != fold], [row for row in seen if row.fold == fold], test)


def seen_rows(rows: list[SplitRow]) -> list[SplitRow]:
    """The rows some fold trains or validates on: all but the test images."""
    return [row for row in rows if row.split != "test"]


def lora_images(rows: list[SplitRow], folds: int) -> list[SplitRow]:
    """The rare images that get per-image LoRAs: those some fold trains on (every non-test rare image with
    folds; each fold then fuses only the LoRAs of its own training images)."""
    views = [fold_view(rows, folds, k) for k in range(folds)]
    chosen = {row.id for view in views for row in view.rare_train}
    return [row for row in rows if row.id in chosen]


@dataclasses.dataclass
class _Group:
    members: list[int]  # indices into the record list
    counts: Counter  # class -> images
    fixed: str | None  # "test" / "trainval" when the layout fixes it
    n_rare: int  # rare images in the group

    @property
    def rare(self) -> bool:
        return self.n_rare > 0


def make_split(records: list[Record], test_records: list[Record], config: Config) -> list[SplitRow]:
    """Assign ids, splits and folds. `test_records` come from --test-data and are all test."""
    rng = np.random.default_rng(config.seed)
    everything = list(records) + list(test_records)
    groups = _groups(everything, n_main=len(records))
    split_of = {}

    # 1. Test: the layout's own test split, --test-data, or a test fraction of every class without one.
    classes_with_fixed_test = {cls for group in groups if group.fixed == "test" for cls in group.counts}
    free = [index for index, group in enumerate(groups) if group.fixed is None]
    if not test_records:
        candidates = [groups[i] for i in free]
        targets = _targets(candidates, config.split.test_fraction, skip=classes_with_fixed_test)
        needs_rare = _rare_class(everything) not in classes_with_fixed_test
        for position in _pick(candidates, targets, rng, min_rare=int(needs_rare), keep_rare_groups=2):
            split_of[free[position]] = "test"
    for index, group in enumerate(groups):
        if group.fixed == "test":
            split_of[index] = "test"

    # 2. --max-rare: keep N rare images out of test for training and validation; the rest goes to test.
    if config.data.max_rare is not None:
        for index in _surplus_rare(groups, split_of, config.data.max_rare, rng):
            split_of[index] = "test"

    # 3. Validation: a fraction of every class among the rest, at least one rare image.
    rest = [index for index in range(len(groups)) if index not in split_of]
    targets = _targets([groups[i] for i in rest], config.split.val_fraction)
    for position in _pick([groups[i] for i in rest], targets, rng, min_rare=1):
        split_of[rest[position]] = "val"
    for index in rest:
        split_of.setdefault(index, "train")

    # 4. Folds over every non-test image (rare images included, grouped), for the cross-validated sweep.
    fold_of = _folds([groups[i] for i in rest], config.split.folds, rng)

    return _rows(everything, groups, split_of, dict(zip(rest, fold_of)))


def _rare_class(records: list[Record]) -> str | None:
    return next((record.cls for record in records if record.is_rare), None)


def _groups(records: list[Record], n_main: int) -> list[_Group]:
    """One group per patient (or per image when patients are unknown), in a deterministic order."""
    by_key: dict[tuple, list[int]] = defaultdict(list)
    for index, record in enumerate(records):
        # One key per patient across --data and --test-data: a patient in the test folder takes their
        # images in the main data to test too.
        key = ("patient", record.patient) if record.patient else ("image", index)
        by_key[key].append(index)
    groups = []
    for members in sorted(by_key.values(),
                          key=lambda m: min((records[i].root.as_posix(), records[i].rel_path) for i in m)):
        fixed = {records[i].fixed_split for i in members}
        if any(i >= n_main for i in members):
            fixed = {"test"}
        # A patient with any image in a fixed test split goes to test whole: patients never straddle splits.
        group_fixed = "test" if "test" in fixed else ("trainval" if "trainval" in fixed else None)
        n_rare = sum(records[i].is_rare for i in members)
        groups.append(_Group(members, Counter(records[i].cls for i in members), group_fixed, n_rare))
    return groups


def _targets(groups: list[_Group], fraction: float, skip: set[str] = frozenset()) -> dict[str, float]:
    totals = Counter()
    for group in groups:
        totals.update(group.counts)
    return {cls: (0.0 if cls in skip else fraction * total) for cls, total in totals.items()}


def _pick(groups: list[_Group], targets: dict[str, float], rng, min_rare: int = 0,
          keep_rare_groups: int = 1) -> list[int]:
    """Greedy: visit groups in a seeded order, rare-holding groups first, and take a group when it brings
    the held-out counts closer to every class's target (deviations weighted by 1/target, so the rare
    class counts as much as a large one)."""
    order = [int(i) for i in rng.permutation(len(groups))]
    order.sort(key=lambda i: not groups[i].rare)  # stable: keeps the seeded order within each half
    held = Counter()

    def cost(counts: Counter) -> float:
        return sum(abs(counts[cls] - target) / max(target, 1.0) for cls, target in targets.items())

    chosen, current = [], cost(held)
    for i in order:
        trial = held + groups[i].counts
        trial_cost = cost(trial)
        if trial_cost < current - 1e-12:
            chosen.append(i)
            held, current = trial, trial_cost
    if min_rare and not any(groups[i].rare for i in chosen):
        rare_groups = [i for i in order if groups[i].rare]
        # Leave `keep_rare_groups` rare groups behind: the later splits need rare images too.
        if len(rare_groups) > keep_rare_groups:
            chosen.append(min(rare_groups, key=lambda i: len(groups[i].members)))
    return chosen


def _surplus_rare(groups: list[_Group], split_of: dict[int, str], max_rare: int, rng) -> list[int]:
    """Rare groups (seeded order) beyond the first `max_rare` rare images, to be moved to test."""
    candidates = [i for i in range(len(groups)) if i not in split_of and groups[i].rare]
    kept, surplus = 0, []
    for j in rng.permutation(len(candidates)):
        i = candidates[int(j)]
        if kept + groups[i].n_rare <= max_rare:
            kept += groups[i].n_rare
        else:
            surplus.append(i)
    return surplus


def _folds(groups: list[_Group], k: int, rng) -> list[int]:
    if k == 1:
        return [0] * len(groups)
    fold = [-1] * len(groups)
    remaining = list(range(len(groups)))
    for f in range(k - 1):
        subset = [groups[i] for i in remaining]
        picked = _pick(subset, _targets(subset, 1.0 / (k - f)), rng)
        for position in picked:
            fold[remaining[position]] = f
        remaining = [i for i in remaining if fold[i] == -1]
    for i in remaining:
        fold[i] = k - 1
    return fold


def _rows(records, groups, split_of, fold_of) -> list[SplitRow]:
    salt = secrets.token_bytes(16)  # never stored: the hash only has to group, not to be reversible
    rows_by_record: dict[int, tuple[str, int, str]] = {}
    for index, group in enumerate(groups):
        split = split_of[index]
        fold = fold_of.get(index, -1) if split != "test" else -1
        for member in group.members:
            patient = records[member].patient
            tag = hashlib.sha256(salt + patient.encode()).hexdigest()[:12] if patient else ""
            rows_by_record[member] = (split, fold, tag)
    order = sorted(range(len(records)),
                   key=lambda i: (not records[i].is_rare, records[i].root.as_posix(), records[i].rel_path))
    n_rare = sum(record.is_rare for record in records)
    width = max(4, len(str(max(n_rare, len(records) - n_rare))))
    rows, counters = [], Counter()
    for i in order:
        record = records[i]
        prefix = "r" if record.is_rare else "n"
        counters[prefix] += 1
        split, fold, tag = rows_by_record[i]
        rows.append(SplitRow(f"{prefix}{counters[prefix]:0{width}d}", record.root.as_posix(), record.rel_path,
                             record.rel_mask_path, record.cls, record.is_rare, split, fold, tag))
    return rows


# --- file I/O --------------------------------------------------------------------------------------

def write_split(path: Path, rows: list[SplitRow]) -> None:
    write_csv(path, COLUMNS, ([row.id, row.root, row.path, row.mask, row.cls, int(row.rare), row.split, row.fold,
                               row.group] for row in rows))


def read_split(path: Path) -> list[SplitRow]:
    fix = "restore it or use a new --run"
    rows = read_csv(path, COLUMNS, missing_ok=False, fix=fix)
    try:
        return [SplitRow(r["id"], r["root"], r["path"], r["mask"], r["class"], r["rare"] == "1", r["split"],
                         int(r["fold"]), r["group"]) for r in rows]
    except (ValueError, TypeError) as error:
        raise RareaugError(f"{path}: unreadable split file ({one_line(error)}); {fix}") from None


def split_counts(rows: list[SplitRow]) -> dict[str, dict[str, int]]:
    counts: dict[str, Counter] = {split: Counter() for split in SPLITS}
    for row in rows:
        counts[row.split][row.cls] += 1
    return {split: dict(sorted(counter.items())) for split, counter in counts.items()}
