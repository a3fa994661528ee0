"""The benchmark scripts still run (tiny model, CPU). Not a timing test: no speed is asserted.

Each runs in this process as `python bench/<script>` would run it (runpy, its own argv): a subprocess would
spend 10 s importing torch and diffusers again, for each script."""
from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run_script(monkeypatch, capsys, script: str, *args) -> str:
    """Run bench/<script> as __main__ with these arguments; returns what it printed. A failure raises."""
    monkeypatch.setattr(sys, "argv", [str(BENCH / script), *map(str, args)])
    monkeypatch.setattr(sys, "path", [str(BENCH), *sys.path])
    try:
        runpy.run_path(str(BENCH / script), run_name="__main__")
    except SystemExit as exit_:
        assert not exit_.code, capsys.readouterr().err[-2000:]
    return capsys.readouterr().out


@pytest.mark.parametrize("script,args,keys", [
    ("bench_fit.py", ["--adapters", "2", "--steps", "2", "--warmup", "1", "--reference-steps", "2",
                      "--checkpointed", "2"],
     {"reference", "bank", "bank_checkpointed", "speedup_vs_reference", "flops_per_adapter_step"}),
    ("bench_generate.py", ["--batches", "2", "--steps", "2", "--reference-images", "1", "--adapters", "3"],
     {"reference", "batched", "speedup_vs_reference", "minutes_for_1000_images"}),
])
def test_benchmark_runs_and_writes_its_summary(tmp_path, monkeypatch, capsys, script, args, keys):
    out = tmp_path / "result.json"
    printed = run_script(monkeypatch, capsys, script, "--model", "tiny", "--device", "cpu", *args, "--out", out)
    summary = json.loads(out.read_text())
    assert keys <= set(summary) and summary["model"] == "tiny" and summary["command"]
    lines = [json.loads(line) for line in printed.splitlines() if line.startswith("{")]
    assert len(lines) >= 4  # each figure printed as it was measured, then the summary


def test_evidence_smoke_run_writes_its_table(tmp_path, monkeypatch, capsys):
    """bench/evidence.py end to end on the mini model at a smoke size: real Fashion-MNIST, one method of each kind
    (fused LoRAs, real images noised and denoised, copies; the others go through the same stage commands, whose
    own tests cover them)."""
    from rareaug.errors import RareaugError
    from rareaug.samples.fashion_mnist import fashion_mnist_folder

    try:
        fashion_mnist_folder()
    except RareaugError:
        pytest.skip("dataset-fashion-mnist is not installed (.ci/run installs it)")
    out = tmp_path / "results"
    run_script(monkeypatch, capsys, "evidence.py", "--rare", "coat", "--k", "6", "--seeds", "1", "--ratios", "0,1",
               "--fit-steps", "4", "--sweep-steps", "4", "--test-per-class", "20", "--other-per-class", "20",
               "--in-process", "--methods", "loft,img2img,classic", "--device", "cpu", "--work", tmp_path / "work",
               "--out-dir", out)
    evidence = json.loads((out / "evidence-coat-k6.json").read_text())
    assert evidence["n_test_pos"] == 20 and evidence["n_test_neg"] == 180 and evidence["n_other"] == 20
    methods = {key.split("|")[1] for key in evidence["table"]}
    assert methods == {"loft", "img2img", "classic"}
    for row in evidence["table"].values():
        assert row["f1"]["low"] <= row["f1"]["mean"] <= row["f1"]["high"]
    text = (out / "evidence-coat-k6.md").read_text()
    assert "## loft (resnet18)" in text and "Memorisation guard" in text and "rareaug sweep-ratio" in text


def test_sweep_benchmark_runs_and_writes_its_summary(tmp_path, monkeypatch, capsys):
    out = tmp_path / "sweep.json"
    run_script(monkeypatch, capsys, "bench_sweep.py", "--device", "cpu", "--cells", "2", "--group", "2", "--steps", "2",
               "--out", out)
    summary = json.loads(out.read_text())
    assert summary["alone_cells_per_minute"] > 0 and summary["grouped"]["2"]["cells_per_minute"] > 0
    assert summary["command"].startswith("python bench/bench_sweep.py")


def test_readme_headlines_equal_the_committed_evidence():
    """Every headline table in the README is exactly what bench/evidence.py's headline() makes of the committed
    JSON: validation's choices only, the figures as measured."""
    import re

    sys.path.insert(0, str(BENCH))
    import evidence

    readme = (BENCH.parent / "README.md").read_text()
    blocks = re.findall(r"<!-- headline: (\S+) model=(\S+) -->\n(.*?)\n<!-- /headline -->", readme, re.S)
    assert blocks, "the README has no headline block"
    for path, model, text in blocks:
        committed = json.loads((BENCH.parent / path).read_text())
        assert text.strip() == evidence.headline(committed, model).strip(), path


def test_adapted_arm_sits_beside_the_unadapted_one_at_each_runs_own_validation_choice():
    sys.path.insert(0, str(BENCH))
    import evidence

    def run(f1, ratio, gain=None):
        row = {"f1": {"mean": f1, "low": f1 - 0.1, "high": f1 + 0.1},
               "pr_auc": {"mean": 0.5, "low": 0.4, "high": 0.6}}
        entry = {"recommended_ratio": ratio, "gain_over_ratio_0": gain or {}}
        return {"summary": {"models": {"resnet18": {"loft": entry}}}, "table": {f"resnet18|loft|{ratio:g}": row}}

    adapted = {**run(0.4, 2.0, {"diff": 0.1, "low": 0.02, "high": 0.2, "runs": 9}),
               "adapt": {"conditioning": "language-free", "variant": "language-free-abc"}}
    text = evidence.adapted_side_by_side(adapted, run(0.3, 0.0))
    lines = [line for line in text.splitlines() if line.startswith("| loft")]
    assert lines[0].startswith("| loft | unadapted | 0× | 0.300")
    assert lines[1].startswith("| loft | adapted | 2× | 0.400")
    assert "+0.100 [+0.020, +0.200]" in lines[1] and "`language-free-abc`" in text
