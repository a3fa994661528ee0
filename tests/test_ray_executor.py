"""`sweep-ratio --executor ray` on a local Ray cluster the test starts (2 CPUs): the same metrics.csv as the
local executor, and a run killed midway finishes on rerun without redoing finished cells."""
from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

ray = pytest.importorskip("ray", reason="the Ray executor is an optional extra (pip install 'rareaug[ray]')")

GRID = ("--model", "tiny-resnet18", "--steps", "6", "--batch-size", "8", "--no-pretrained", "--generate-steps", "2",
        "--guard-threshold", "0.01", "--ratios", "0,1,2", "--methods", "loft,classic")
# Copies only: cells that need no sampling, for the tests about runs and resuming rather than pools.
COPIES = (*GRID[:-1], "classic")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    from conftest import fitted_run

    return fitted_run(tmp_path_factory, n_rare=10, n_normal=20, fit_steps=2)


def metrics(run):
    with open(run / "sweep" / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_ray_executor_gives_the_local_executors_metrics(cluster, fitted, tmp_path, invoke):
    local, remote = shutil.copytree(fitted, tmp_path / "local"), shutil.copytree(fitted, tmp_path / "ray")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each Ray task runs (--cpus-per-cell 1): the same float sums
    try:
        local_result = invoke("sweep-ratio", "--run", local, "--seeds", "1", *GRID)
        ray_result = invoke("sweep-ratio", "--run", remote, "--seeds", "1", *GRID, "--executor", "ray",
                            "--ray-address", cluster, "--cpus-per-cell", "1")
    finally:
        torch.set_num_threads(threads)
    assert local_result[0] == 0, local_result[2]
    assert ray_result[0] == 0, ray_result[2]
    ours, theirs = metrics(local), metrics(remote)
    assert len(ours) == len(theirs) == 1 + 2 * 2
    assert [row["cell"] for row in ours] == [row["cell"] for row in theirs]
    for a, b in zip(ours, theirs):
        for column, value in a.items():
            try:
                assert float(value) == pytest.approx(float(b[column]), rel=1e-6, abs=1e-9, nan_ok=True), column
            except ValueError:
                assert value == b[column], column
    assert (local / "sweep" / "summary.json").read_text() == (remote / "sweep" / "summary.json").read_text()


def test_a_killed_ray_sweep_resumes_without_redoing_finished_cells(cluster, fitted, tmp_path, invoke):
    run = shutil.copytree(fitted, tmp_path / "run")
    cells = run / "sweep" / "cells"
    args = ("sweep-ratio", "--run", str(run), "--seeds", "2", *COPIES, "--executor", "ray", "--ray-address", cluster)
    driver = subprocess.Popen([sys.executable, "-m", "rareaug", *args], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list(cells.glob("*.json"))) < 2 and driver.poll() is None:
        time.sleep(0.2)
    driver.send_signal(signal.SIGKILL)  # a hard kill: no cleanup runs
    driver.wait()
    done = {path.name: path.stat().st_mtime_ns for path in cells.glob("*.json")}
    total = 2 * (1 + 2)
    assert 2 <= len(done) < total, f"{len(done)} cells were done when the driver was killed"

    code, _, err = invoke(*args)
    assert code == 0, err
    assert len(metrics(run)) == total
    after = {path.name: path.stat().st_mtime_ns for path in cells.glob("*.json")}
    assert len(after) == total
    assert all(after[name] == mtime for name, mtime in done.items())  # finished cells were not run again


def test_ray_options_are_checked(invoke, fitted):
    code, _, err = invoke("sweep-ratio", "--run", fitted, *GRID, "--executor", "ray", "--gpus-per-cell", "-1")
    assert code == 2 and "--gpus-per-cell" in err and len(err.strip().splitlines()) == 1
    code, _, err = invoke("sweep-ratio", "--run", fitted, *GRID, "--executor", "spark")
    assert code == 2 and "choose one of local, ray" in err and len(err.strip().splitlines()) == 1


def test_a_missing_ray_is_one_line(invoke, fitted, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails, as where it is not installed
    run = shutil.copytree(fitted, tmp_path / "run")
    code, _, err = invoke("sweep-ratio", "--run", run, *GRID, "--seeds", "1", "--executor", "ray")
    assert code == 2 and "pip install 'rareaug[ray]'" in err and len(err.strip().splitlines()) == 1


def test_several_rare_classes_get_their_own_runs_and_share_the_cluster(cluster, folder_data, tmp_path, invoke):
    parent = tmp_path / "runs"
    code, _, err = invoke("fit", "--data", folder_data, "--rare", "crack,scratch", "--run", parent, "--base-model",
                          "tiny", "--resolution", "64", "--steps", "2")
    assert code == 0, err
    assert {p.name for p in parent.iterdir()} == {"crack", "scratch"}
    for name in ("crack", "scratch"):
        split = list(csv.DictReader(open(parent / name / "split.csv", newline="")))
        assert {r["class"] for r in split if r["rare"] == "1"} == {name}
        assert list((parent / name / "loras" / "loft").glob("*.safetensors"))
    code, _, err = invoke("sweep-ratio", "--run", parent, "--rare", "crack,scratch", "--seeds", "1", *COPIES,
                          "--executor", "ray", "--ray-address", cluster)
    assert code == 0, err
    for name in ("crack", "scratch"):
        assert len(metrics(parent / name)) == 1 + 2
    code, _, err = invoke("fit", "--data", folder_data, "--rare", "crack,Crack", "--run", parent,
                          "--base-model", "tiny")
    assert code == 2 and "named twice" in err
