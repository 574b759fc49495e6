"""6. Multipliers that are schedules: every leaf with its own warmup, against constant multipliers

AdamW on kernels 32² (batch 16); `constant`: `lr_mult = 0.5 ** (i % 4)` on every leaf;
`warmup`: every leaf its own `lrmult.schedules.linear_warmup(0.5 ** (i % 4), 50 + i)` (its numbers
are optimizer state: one compiled step for all of them); `A/A`: the constant runner's compiled
step on buffers of its own; `built apart`: the constant chain built last against the same built
first (each variant is built twice in a mirrored order and its two builds' times averaged;
`harness.mirrored`). Hand-jitted donating steps (`chain`) and `Trainer.train_step`. First
call: `jax.clear_caches()`, a new runner, its first step (trace + compile + run).
"""

from __future__ import annotations

import sys

import harness as h

import lrmult
from lrmult import schedules


def multipliers(params, scheduled: bool) -> lrmult.ParamDict:
    pd = h.param_dict(params)
    for i, p in enumerate(pd.values()):
        m = 0.5 ** (i % 4)
        p.lr_mult = schedules.linear_warmup(m, 50 + i) if scheduled else m
    return pd


def run(quick: bool) -> h.Report:
    leaves, rounds, first_rounds = (8, 3, 0) if quick else (200, 60, 2)  # quick: no first calls
    model = h.MLP(leaves, 32, 16, False)
    params, batch = model.init(), model.batch_data()
    opts = {"learning_rate": h.LR, "wd": h.WD}
    build = {
        "chain constant": lambda: h.OptaxRunner(
            lrmult.adamw(h.LR, weight_decay=h.WD, param_dict=multipliers(params, False)),
            params,
            batch,
        ),
        "chain warmup": lambda: h.OptaxRunner(
            lrmult.adamw(h.LR, weight_decay=h.WD, param_dict=multipliers(params, True)),
            params,
            batch,
        ),
        "Trainer constant": lambda: h.TrainerRunner(
            multipliers(params, False), "adamw", opts, batch
        ),
        "Trainer warmup": lambda: h.TrainerRunner(multipliers(params, True), "adamw", opts, batch),
    }
    runners = h.mirrored(build)
    runners["A/A"] = runners["chain constant"].twin()
    times = h.interleave(runners, rounds, 0.01 if quick else 0.04)
    first_built = "chain constant (built first)"
    t = {
        **h.pooled(times, list(build)),
        "A/A": times["A/A"],
        "built apart": times[h.second("chain constant")],
        first_built: times["chain constant"],
    }
    first = h.first_calls(build, first_rounds)
    pairs = [
        ("A/A", first_built, False),
        ("built apart", first_built, False),
        ("chain warmup", "chain constant", True),
        ("Trainer warmup", "Trainer constant", True),
    ]
    rows = []
    for k, base, first_call in pairs:
        row = [k, base, h.fmt_time(h.median(t[k])), *h.ratio(t[k], t[base])]
        row += h.ratio(first[k], first[base], 2) if first_call and first_rounds else ["", ""]
        rows.append(row)
    header = ["variant", "against", "step", "step med", "step min", "first call med", "… min"]
    note = f"{leaves} leaves, {rounds} step-timing rounds, {first_rounds} first-call round(s)."
    kernels = {k: runners[k].kernels() for k in ("chain constant", "chain warmup")}
    counted = (
        "Kernels of the compiled step (`harness.OptaxRunner.kernels`): "
        + ", ".join(f"{k} {n}" for k, n in kernels.items())
        + "."
    )
    return h.Report(__doc__, [note, h.table(header, rows), counted])


if __name__ == "__main__":
    sys.exit(h.main(run, __doc__))
