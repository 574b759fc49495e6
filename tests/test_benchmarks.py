"""The benchmarks' quick mode runs, and its deterministic targets hold: no recompilation when an
lrmult multiplier, override or learning rate changes (one for a rebuilt optax chain), a frozen
backbone's optimizer state is Adam's two moments of the trainable leaves only, and so is that of
a stacked leaf with its bottom layers frozen. Timings are printed by the benchmarks, never
asserted."""

import json
import os
import subprocess
import sys
from pathlib import Path


def test_quick_benchmarks_meet_their_deterministic_targets(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    cmd = [sys.executable, "benchmarks/run.py", "--quick", "--strict", "--out", str(tmp_path)]
    out = subprocess.run(
        [*cmd, "--json", str(tmp_path / "results.json")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = json.loads(Path(tmp_path, "results.json").read_text())
    assert results["checks"] and all(results["checks"].values())
    recompiles = results["figures"]["recompiles"]
    assert len(recompiles) == 4  # attribute, set_lr_mult, set_learning_rate, refresh
    assert all(c == {"lrmult": 0, "rebuilt": 1} for c in recompiles.values()), recompiles
    frozen = results["figures"]["frozen"]
    trainable = frozen["trainable_bytes"]
    for variant in ("Trainer, backbone frozen", "lrmult.adam (optax level), backbone frozen"):
        assert frozen[variant]["moment_bytes"] == 2 * trainable
        assert frozen[variant]["state_bytes"] < 2 * trainable + 256  # scalars besides
    stacked = results["figures"]["stacked"]
    for variant in ("chain, LLRD + 4 frozen", "Trainer, LLRD + 4 frozen"):
        assert stacked[variant]["moment_bytes"] == 2 * stacked["trainable_bytes"]
        assert len(stacked[variant]["first_call"]) >= 1
    tables = Path(tmp_path, "RESULTS.md").read_text()
    for title in (
        "## 1.",
        "## 2.",
        "## 3.",
        "## 4.",
        "## 5.",
        "## 6.",
        "## 7.",
        "## 8.",
        "## Machine",
    ):
        assert title in tables


def test_the_floors_step_exactly_as_the_chain_they_are_compared_with():
    """Benchmarks 1 and 7 compare like with like: the floor (numbers baked in), the runtime
    floor (numbers read from blocks of 8) and lrmult's chain take the same steps, bit for bit,
    and the multipliers act (the plain optax step differs)."""
    sys.path.insert(0, str(Path("benchmarks").resolve()))
    try:
        import harness as h
        import numpy as np
        import step_overhead as so
    finally:
        sys.path.pop(0)
    model = h.MLP(10, 8, 4, False)
    params, batch = model.init(), model.batch_data()
    for opt, (plain, chain, _, floor) in so.RECIPES.items():
        runners = {
            "optax": h.OptaxRunner(plain(), params, batch),
            "floor": h.OptaxRunner(floor(*so.half_numbers(params)), params, batch),
            "runtime floor": h.OptaxRunner(so.runtime_floor(floor, params), params, batch),
            "chain": h.OptaxRunner(chain(so.half_set(params)), params, batch),
        }
        for _ in range(3):
            for r in runners.values():
                r()
        got = {
            k: np.concatenate([np.ravel(x) for x in r.params["layers"][0].values()])
            for k, r in runners.items()
        }
        np.testing.assert_array_equal(got["runtime floor"], got["floor"], err_msg=opt)
        np.testing.assert_array_equal(got["chain"], got["floor"], err_msg=opt)
        assert np.abs(got["optax"] - got["floor"]).max() > 1e-6, opt
