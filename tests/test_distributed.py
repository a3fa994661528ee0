"""Several processes, one run: `torchrun` (as `accelerate launch` starts it) shards fit and generate over 2 gloo
processes on the CPU; the result equals a 1-process run with the same seed."""
from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch
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


def test_two_process_fit_and_generate_equal_one_process(invoke, folder_data, tmp_path):
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
    index_one, index_two = sorted(rows(loras_one / "index.csv"), key=key), sorted(rows(loras_two / "index.csv"), key=key)
    assert [(r["image_id"], r["steps_done"]) for r in index_one] == [(r["image_id"], r["steps_done"]) for r in index_two]
    for a, b in zip(index_one, index_two):
        assert float(a["final_loss"]) == pytest.approx(float(b["final_loss"]), rel=1e-3)
    assert len(rows(loras_two / "losses.csv")) == len(rows(loras_one / "losses.csv")) == 6 * 4
    assert not list(loras_two.glob("*.part-*.csv")) and not list((loras_two / "checkpoints").glob("*.pt"))
    timings = (two / "timings.json").read_text()
    assert timings.count('"fit loft"') == 1

    # A rerun on 2 processes finds everything trained.
    again = launch("fit", "--data", folder_data, "--rare", "crack", "--run", two, *FAST, "--batch-size", "2")
    assert again.returncode == 0 and "already trained" in again.stdout + again.stderr
