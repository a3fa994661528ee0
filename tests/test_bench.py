"""The benchmark scripts still run (tiny model, CPU). Not a timing test: no speed is asserted."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize("script,args,keys", [
    ("bench_fit.py", ["--adapters", "2", "--steps", "2", "--warmup", "1", "--reference-steps", "2", "--checkpointed", "2"],
     {"reference", "bank", "bank_checkpointed", "speedup_vs_reference", "flops_per_adapter_step"}),
    ("bench_generate.py", ["--batches", "2", "--steps", "2", "--reference-images", "1", "--adapters", "3"],
     {"reference", "batched", "speedup_vs_reference", "minutes_for_1000_images"}),
])
def test_benchmark_runs_and_writes_its_summary(tmp_path, script, args, keys):
    out = tmp_path / "result.json"
    result = subprocess.run([sys.executable, str(BENCH / script), "--model", "tiny", "--device", "cpu", *args,
                             "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(out.read_text())
    assert keys <= set(summary) and summary["model"] == "tiny" and summary["command"]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) >= 4  # each figure printed as it was measured, then the summary
