"""The benchmark script's quick mode runs, and its deterministic targets hold (recompilations
and frozen-backbone state size); timings are reported by it, never asserted here."""

import os
import subprocess
import sys
from pathlib import Path


def test_quick_benchmarks_run_and_meet_their_exact_targets(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    out = subprocess.run(
        [sys.executable, "benchmarks/run.py", "--quick", "--strict", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = Path(tmp_path, "RESULTS.md").read_text()
    assert "0 vs 1" in results and "| 3 |" in results
