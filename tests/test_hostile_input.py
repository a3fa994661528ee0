"""Input a hostile or careless user gives, through the CLI in-process: one line on stderr and exit 2 (or it works),
never a traceback, and nothing recorded that blocks the corrected command. Each case is a row; add rows."""
from __future__ import annotations

import os

import pytest
from conftest import write_image

FLAGS = [
    # (command and options after the data/run ones, the flag the error must name)
    (("fit", "--lr", "nan"), "--lr"),
    (("sweep-ratio", "--lr", "inf"), "--lr"),
    (("generate", "--ratio", "nan"), "--ratio"),
    (("generate", "--ratio", "inf"), "--ratio"),
    (("generate", "--guidance", "nan", "--no-guard"), "--guidance"),
    (("generate", "--guidance", "-1"), "--guidance"),
    (("generate", "--guard-threshold", "nan"), "--guard-threshold"),
    (("generate", "--beta-alpha", "inf"), "--beta-alpha"),
    (("generate", "--guard-ratio", "nan"), "--guard-ratio"),
    (("generate", "--guard-ratio", "1.5"), "--guard-ratio"),
    (("generate", "--guard-rule", "fuzzy"), "--guard-rule"),
    (("generate", "--guard-rule", "relative", "--guard-threshold", "0.2"), "--guard-rule absolute"),
    (("sweep-ratio", "--guard-ratio", "0"), "--guard-ratio"),
    (("generate", "--lambda", "nan"), "--lambda"),
    (("sweep-ratio", "--ratios", "0,inf"), "--ratios"),
    (("sweep-ratio", "--ratios", "nan"), "--ratios"),
    (("sweep-ratio", "--ratios", ""), "--ratios"),
    (("sweep-ratio", "--ratios", ",,"), "--ratios"),
    (("inspect", "--seed", "-1"), "--seed"),
    (("inspect", "--seed", str(2**40)), "--seed"),
    (("inspect", "--test-fraction", "nan"), "--test-fraction"),
]


def one_line(invoke, *args) -> str:
    code, out, err = invoke(*args)
    assert code == 2, (out, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("args,flag", FLAGS, ids=[" ".join(args) for args, _ in FLAGS])
def test_non_finite_or_out_of_range_numbers_are_one_line(invoke, folder_data, tmp_path, args, flag):
    command, *options = args
    run = tmp_path / "run"
    data = ("--data", folder_data, "--rare", "crack") if command in ("fit", "inspect") else ()
    err = one_line(invoke, command, *data, "--run", run, *options)
    assert flag in err
    assert not run.exists() or not any(run.rglob("*")), "a refused command left files in the run"


def test_a_refused_fit_does_not_block_the_corrected_one(invoke, folder_data, tmp_path):
    run = tmp_path / "run"
    base = ("fit", "--data", folder_data, "--rare", "crack", "--run", run, "--base-model", "tiny", "--resolution", "64",
            "--steps", "1")
    assert "--lr" in one_line(invoke, *base, "--lr", "nan")
    code, _, err = invoke(*base, "--lr", "0.001")
    assert code == 0, err


def test_a_recipe_mixing_number_and_name_keys_is_one_line(invoke, folder_data, tmp_path):
    recipe = tmp_path / "mixed.yaml"
    recipe.write_text("fit:\n  1: 2\n  steps: 3\n")
    err = one_line(invoke, "inspect", "--config", recipe, "--data", folder_data, "--rare", "crack")
    assert str(recipe) in err and "1" in err and "fit.steps" in err
    recipe.write_text("fit:\n  lr: .nan\n")  # YAML's NaN
    err = one_line(invoke, "inspect", "--config", recipe, "--data", folder_data, "--rare", "crack")
    assert str(recipe) in err and "fit.lr" in err and "finite" in err


def test_names_are_shown_verbatim_not_read_as_markup(invoke, tmp_path):
    root = tmp_path / "data [x"
    for i in range(8):
        write_image(root / "crack[bold]" / f"c{i}.png")
        write_image(root / "normal" / f"n{i}.png")
    (root / "normal" / "[bold red]y.png").write_bytes(b"not a png")  # corrupt, with markup in its name
    code, out, err = invoke("inspect", "--data", root, "--rare", "crack[bold]")
    assert code == 0, err
    flat = " ".join(out.split())
    assert "crack[bold]" in flat and "[bold red]y.png" in flat


def small_data(root):
    for i in range(8):
        write_image(root / "crack" / f"c{i}.png")
        write_image(root / "normal" / f"n{i}.png")
    return root


def test_outputs_inside_the_data_folder_are_refused_and_the_data_is_untouched(invoke, tmp_path):
    from conftest import tree_snapshot

    data = small_data(tmp_path / "data")
    before = tree_snapshot(data)
    err = one_line(invoke, "inspect", "--data", data, "--rare", "crack", "--run", data / "run")
    assert "--run" in err and "inside the data folder" in err
    err = one_line(invoke, "inspect", "--data", data, "--rare", "crack", "--run", tmp_path)  # data inside the run
    assert "inside --run" in err
    err = one_line(invoke, "inspect", "--data", data, "--test-data", data, "--rare", "crack", "--run", tmp_path / "r")
    assert "--test-data" in err and "overlaps" in err
    err = one_line(invoke, "inspect", "--data", data, "--test-data", data / "normal", "--rare", "crack",
                   "--run", tmp_path / "r")
    assert "overlaps" in err
    run = tmp_path / "run"
    assert invoke("inspect", "--data", data, "--rare", "crack", "--run", run)[0] == 0
    assert (run / ".rareaug").exists()
    err = one_line(invoke, "export", "--run", run, "--out", data / "export", "--ratio", "0")
    assert "--out" in err and "inside the data folder" in err
    assert tree_snapshot(data) == before


def test_inspect_leaves_out_synthetic_images_and_rareaug_folders_in_the_data(invoke, tmp_path):
    import torch

    from rareaug.generate.manifest import save_png

    data = small_data(tmp_path / "data")
    save_png(data / "crack" / "s000001.png", torch.rand(1, 32, 32), True, "loft-l0.5", 1)  # as generate writes it
    old_run = data / "normal" / "old-run"  # a run someone made inside the data folder before
    write_image(old_run / "export" / "normal" / "r0001.png")
    (old_run / ".rareaug").write_text("")
    code, out, err = invoke("inspect", "--json", "--data", data, "--rare", "crack")
    assert code == 0, err
    import json

    summary = json.loads(out)
    assert summary["classes"] == {"crack": 8, "normal": 8}
    kinds = {problem["kind"] for problem in summary["problems"]}
    assert {"synthetic image", "rareaug folder"} <= kinds


def test_a_run_in_use_by_another_command_is_one_line_and_freed_when_that_command_dies(invoke, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    data, run = small_data(tmp_path / "data"), tmp_path / "run"
    assert invoke("inspect", "--data", data, "--rare", "crack", "--run", run)[0] == 0
    # Another command holds the run (as rareaug.run_lock takes it), then is killed without any cleanup.
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from rareaug.run_lock import lock_run; "
                               f"lock_run({str(run)!r}); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        err = one_line(invoke, "sweep-ratio", "--run", run, "--model", "tiny-resnet18", "--no-pretrained")
        assert "in use by another rareaug command" in err and f"pid {holder.pid}" in err
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    time.sleep(0.1)
    from rareaug.run_lock import lock_run, release_all

    lock_run(run)  # the dead holder's lock is gone with it: nothing to delete by hand
    release_all()


def test_more_folds_than_rare_images_are_refused_by_inspect_before_the_split_is_frozen(invoke, tmp_path):
    data, run = small_data(tmp_path / "data"), tmp_path / "run"
    err = one_line(invoke, "inspect", "--data", data, "--rare", "crack", "--run", run, "--folds", "20")
    assert "--folds" in err and "no rare image" in err
    assert not (run / "split.csv").exists()
    assert invoke("inspect", "--data", data, "--rare", "crack", "--run", run, "--folds", "2")[0] == 0


def test_missing_imagenet_weights_stop_the_sweep_before_any_pool_is_made(invoke, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-cache"))  # offline (conftest): nothing downloads
    data, run = small_data(tmp_path / "data"), tmp_path / "run"
    assert invoke("inspect", "--data", data, "--rare", "crack", "--run", run)[0] == 0
    err = one_line(invoke, "sweep-ratio", "--run", run, "--model", "resnet18")
    assert "resnet18 ImageNet weights: not at" in err and "--no-pretrained" in err
    assert not (run / "synthetic").exists() and not (run / "loras").exists()


def test_an_impossible_run_path_is_one_line(invoke, tmp_path):
    data = small_data(tmp_path / "data")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    err = one_line(invoke, "inspect", "--data", data, "--rare", "crack", "--run", blocker / "run")
    assert str(blocker) in err and "check that the path exists" in err


def test_a_file_name_that_is_not_utf8_is_skipped_with_the_fix(invoke, tmp_path):
    import json
    import os

    data = small_data(tmp_path / "data")
    odd = os.path.join(os.fsencode(data / "normal"), b"caf\xe9.png")  # latin-1 bytes, as a Windows share may hold
    with open(odd, "wb") as handle:
        handle.write((data / "normal" / "n0.png").read_bytes())
    run = tmp_path / "run"
    code, out, err = invoke("inspect", "--json", "--data", data, "--rare", "crack", "--run", run)
    assert code == 0, err
    summary = json.loads(out)
    assert "file name not UTF-8" in {problem["kind"] for problem in summary["problems"]}
    assert summary["classes"]["normal"] == 8 and (run / "split.csv").is_file()


def test_an_unreadable_class_folder_is_one_line(invoke, tmp_path, monkeypatch):
    data = small_data(tmp_path / "data")
    locked = data / "normal"
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # root reads every folder: refuse the listing as a mount would
        real_scandir = os.scandir

        def scandir(path="."):
            if os.fspath(path) == os.fspath(locked):
                raise PermissionError(13, "Permission denied", os.fspath(path))
            return real_scandir(path)

        monkeypatch.setattr(os, "scandir", scandir)
    locked.chmod(0)
    try:
        err = one_line(invoke, "inspect", "--data", data, "--rare", "crack")
        assert str(locked) in err and "chmod" in err
    finally:
        locked.chmod(0o755)
