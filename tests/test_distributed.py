"""Two processes joined by jax.distributed (CPU collectives on localhost) train one model."""

import os
import subprocess
import sys


def test_two_processes_end_with_the_single_process_parameters():
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    env.pop("XLA_FLAGS", None)
    out = subprocess.run(
        [sys.executable, "examples/distributed.py", "--steps", "10", "--timeout", "150"],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "MATCH" in out.stdout and "MISMATCH" not in out.stdout
