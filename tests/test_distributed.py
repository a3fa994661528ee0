"""Several processes, one run: `torchrun` (as `accelerate launch` starts it) shards fit and generate over 2 gloo
processes on the CPU; the result equals a 1-process run with the same seed."""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

FAST = ("--base-model", "tiny", "--resolution", "64", "--steps", "4")


def launch(*args, processes: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node N -m rareaug -- ...`, as a user would type it (accelerate launch starts the same).
    The `--` keeps torchrun's own parser off rareaug's options (it would take --run for its --run-path)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "300"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "-m", "rareaug", "--", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_two_process_fit_equals_one_process(invoke, folder_data, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched process runs (OMP_NUM_THREADS=1): the same float sums
    try:
        code, _, err = invoke("fit", "--data", folder_data, "--rare", "crack", "--run", one, *FAST, "--batch-size", "2")
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    result = launch("fit", "--data", folder_data, "--rare", "crack", "--run", two, *FAST, "--batch-size", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trained 6 LoRA(s)" in result.stdout + result.stderr and "(2 processes)" in result.stdout + result.stderr

    # Same split, same LoRAs (within float tolerance), one merged index and loss file, no shards left.
    assert (one / "split.csv").read_text() == (two / "split.csv").read_text()
    loras_one, loras_two = one / "loras" / "loft", two / "loras" / "loft"
    files = sorted(p.name for p in loras_one.glob("*.safetensors"))
    assert files == sorted(p.name for p in loras_two.glob("*.safetensors")) and len(files) == 6
    for name in files:
        a, b = load_file(loras_one / name), load_file(loras_two / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    key = lambda row: row["image_id"]  # noqa: E731
    index_one, index_two = (sorted(rows(loras_one / "index.csv"), key=key),
                            sorted(rows(loras_two / "index.csv"), key=key))
    assert ([(r["image_id"], r["steps_done"]) for r in index_one]
            == [(r["image_id"], r["steps_done"]) for r in index_two])
    for a, b in zip(index_one, index_two):
        assert float(a["final_loss"]) == pytest.approx(float(b["final_loss"]), rel=1e-3)
    assert len(rows(loras_two / "losses.csv")) == len(rows(loras_one / "losses.csv")) == 6 * 4
    assert not list(loras_two.glob("*.part-*.csv")) and not list((loras_two / "checkpoints").glob("*.ckpt.safetensors"))
    timings = (two / "timings.json").read_text()
    assert timings.count('"fit loft"') == 1

    # A rerun finds everything the two processes trained (the merged index; no shard is left to read).
    code, out, err = invoke("fit", "--data", folder_data, "--rare", "crack", "--run", two, *FAST, "--batch-size", "2")
    assert code == 0 and "already trained" in out + err


def test_generate_on_two_processes_makes_the_same_pool(invoke, folder_data, tmp_path):
    one = tmp_path / "one"
    code, _, err = invoke("fit", "--data", folder_data, "--rare", "crack", "--run", one, *FAST)
    assert code == 0, err
    two = shutil.copytree(one, tmp_path / "two")  # the same LoRAs: only the number of processes differs
    args = ("generate", "--n", "7", "--steps", "2", "--batch-size", "2", "--guard-threshold", "0.01")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, _, err = invoke(*args, "--run", one)
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    result = launch(*args, "--run", two)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(2 processes)" in result.stdout + result.stderr

    pool_one, pool_two = next((one / "synthetic").iterdir()), next((two / "synthetic").iterdir())
    same = ("pool_index", "file", "kept", "loras", "weights", "seed", "attempt")
    manifest_one, manifest_two = rows(pool_one / "manifest.csv"), rows(pool_two / "manifest.csv")
    assert [{k: r.get(k) for k in same} for r in manifest_one] == [{k: r.get(k) for k in same} for r in manifest_two]
    assert len([r for r in manifest_two if r["kept"] == "1"]) == 7 and not list(pool_two.glob("manifest.part-*"))
    for row in manifest_one:
        a = np.asarray(Image.open(pool_one / row["file"]), dtype=int)
        b = np.asarray(Image.open(pool_two / row["file"]), dtype=int)
        assert np.abs(a - b).max() <= 2  # 8-bit rounding of float sums taken in another batch order


def test_rounds_make_the_pool_a_single_process_would_whatever_the_sharing():
    """A slot's outcome depends on the slot alone; rounds over any sharing end with the same kept prefix."""
    from rareaug.generate.stage import slots_to_make

    rejected = {1, 4, 5, 9, 10, 11, 17}
    target = 12
    sequential, slot = [], 0  # one process: slots in order until `target` are kept
    while sum(s not in rejected for s in sequential) < target:
        sequential.append(slot)
        slot += 1
    for processes in (1, 2, 3, 5):
        made: dict[int, dict] = {}
        while missing := slots_to_make(list(made.values()), target):
            for share in range(processes):  # each process makes its round-robin share
                for s in missing[share::processes]:
                    made[s] = {"pool_index": str(s), "kept": "0" if s in rejected else "1"}
        assert sorted(made) == sequential


def test_index_and_loss_shards_of_a_stopped_run_count_and_merge(tmp_path):
    """A multi-process fit stopped before rank 0 merged: its shards count as done, and the next fit merges them."""
    from rareaug.lora.store import INDEX_COLUMNS, finished_units, merge_shards

    def index(path, ids):
        lines = [",".join(INDEX_COLUMNS)] + [f"{i},{i},crack,loft,4,0.1,tiny" for i in ids]
        path.write_text("\n".join(lines) + "\n")

    index(tmp_path / "index.csv", ["r1"])
    index(tmp_path / "index.part-1.csv", ["r2", "r3"])
    (tmp_path / "losses.csv").write_text("lora,image_id,step,loss\nr1,r1,1,0.5\n")
    (tmp_path / "losses.part-1.csv").write_text("lora,image_id,step,loss\nr2,r2,1,0.4\nr3,r3,1,0.3\n")
    for name in ("r1", "r2", "r3"):
        (tmp_path / f"{name}.safetensors").write_bytes(b"")
    assert finished_units(tmp_path, 4) == {"r1", "r2", "r3"}
    merge_shards(tmp_path)
    assert [r["image_id"] for r in rows(tmp_path / "index.csv")] == ["r1", "r2", "r3"]
    assert [r["lora"] for r in rows(tmp_path / "losses.csv")] == ["r1", "r2", "r3"]
    assert not list(tmp_path.glob("*.part-*.csv"))
