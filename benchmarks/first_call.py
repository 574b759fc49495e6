"""7. First call (trace + compile + first step) against plain optax, with its floor

`jax.clear_caches()`, a new runner (not timed), its first step, per variant, variants taking
turns. AdamW on tiny 32² kernels (batch 16), `lr_mult = 0.1`, `wd_mult = 0.5` on the first half
of the leaves, as in section 1. `optax`: `optax.adamw`; `A/A`: the same again (its ratio is the
noise); `floor`: optax with the multipliers baked in as Python numbers (`harness.constants`);
`runtime floor`: the same numbers read at run time from blocks of 8 (`harness.runtime_constants`,
lrmult's layout without its machinery: the cheapest hand-written multiplier a change does not
recompile);
`chain`: `lrmult.adamw(..., param_dict=pd)` in a hand-jitted donating step; `Trainer`:
`lrmult.Trainer(pd, "adamw", ...).train_step`. Plain optax itself compiles superlinearly in the
number of leaves on XLA:CPU; 1024 leaves is measured in full mode only.
"""

from __future__ import annotations

import sys

import harness as h
import step_overhead

PLAIN, CHAIN, TRAINER_OPTS, FLOOR = step_overhead.RECIPES["adamw"]


def builders(params, batch) -> dict:
    lr, wd = step_overhead.half_numbers(params)
    half = step_overhead.half_set
    return {
        "optax": lambda: h.OptaxRunner(PLAIN(), params, batch),
        "A/A": lambda: h.OptaxRunner(PLAIN(), params, batch),
        "floor": lambda: h.OptaxRunner(FLOOR(lr, wd), params, batch),
        "runtime floor": lambda: h.OptaxRunner(
            step_overhead.runtime_floor(FLOOR, params), params, batch
        ),
        "chain": lambda: h.OptaxRunner(CHAIN(half(params)), params, batch),
        "Trainer": lambda: h.TrainerRunner(half(params), "adamw", TRAINER_OPTS, batch),
    }


def run(quick: bool) -> h.Report:
    sizes = ((16, 1),) if quick else ((200, 5), (1024, 2))  # (leaves, rounds)
    rows = []
    for leaves, rounds in sizes:
        model = h.MLP(leaves, 32, 16, False)
        first = h.first_calls(builders(model.init(), model.batch_data()), rounds)
        row = [leaves, rounds, h.fmt_time(h.median(first["optax"]))]
        for k in step_overhead.VARIANTS:
            row += h.ratio(first[k], first["optax"], 2)
        rows.append(row)
    header = ["leaves", "rounds", "optax first call"]
    header += [f"{k} {m}" for k in step_overhead.VARIANTS for m in ("med", "min")]
    return h.Report(__doc__, [h.table(header, rows)])


if __name__ == "__main__":
    sys.exit(h.main(run, __doc__))
