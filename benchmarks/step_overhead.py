"""1. Step-time overhead against a plain jitted optax step with the same optimizer

Step time / `optax` step time, interleaved. `optax`: a hand-jitted donating step without
multipliers; `A/A`: the same compiled step on buffers of its own (its ratio is the noise);
`floor`: the same optax step with each leaf's multipliers baked in as Python numbers
(`harness.constants`: recompiles on any change; the cheapest a per-leaf multiplier can be);
`runtime floor`: the same numbers read at run time from blocks of 8 in the state
(`harness.runtime_constants`: lrmult's layout without its lookup, tracking, schedules and
freezing; the cheapest hand-written multiplier a change does not recompile);
`chain`: the same hand-jitted step with `lrmult.<opt>(..., param_dict=pd)`; `Trainer`:
`lrmult.Trainer(pd, opt, ...).train_step`. lrmult runs with `lr_mult = 0.1`, `wd_mult = 0.5` on
the first half of the leaves. Inputs: buffers of the compiled step (`input_shardings` of
`jit(step).lower(...).compile()`; the Trainer's jitted step is private: parameters, `opt_state`
arrays and batch). sgd = SGD + momentum 0.9, adam = Adam (both coupled weight decay 1e-4),
adamw = AdamW (decoupled, 1e-4).
"""

from __future__ import annotations

import sys
from typing import Any

import harness as h
import jax
import optax

import lrmult

RECIPES = {  # plain optax, lrmult's optax-level chain, Trainer arguments (the same math), and
    # the floor: optax with per-leaf (lr_mult, wd_mult) baked in as numbers (`mul`, `dec`: the
    # links applying them; `harness.runtime_constants` / `runtime_decay` give the runtime floor)
    "sgd": (
        lambda: optax.chain(optax.add_decayed_weights(h.WD), optax.sgd(h.LR_SGD, momentum=0.9)),
        lambda pd: lrmult.sgd(h.LR_SGD, momentum=0.9, weight_decay=h.WD, param_dict=pd),
        {"learning_rate": h.LR_SGD, "momentum": 0.9, "wd": h.WD},
        lambda lr, wd, mul=h.constants, dec=h.decay_constants: optax.chain(
            dec([h.WD * w for w in wd]), optax.sgd(h.LR_SGD, momentum=0.9), mul(lr)
        ),
    ),
    "adam": (
        lambda: optax.chain(optax.add_decayed_weights(h.WD), optax.adam(h.LR)),
        lambda pd: lrmult.adam(h.LR, weight_decay=h.WD, param_dict=pd),
        {"learning_rate": h.LR, "wd": h.WD},
        lambda lr, wd, mul=h.constants, dec=h.decay_constants: optax.chain(
            dec([h.WD * w for w in wd]), optax.adam(h.LR), mul(lr)
        ),
    ),
    "adamw": (
        lambda: optax.adamw(h.LR, weight_decay=h.WD),
        lambda pd: lrmult.adamw(h.LR, weight_decay=h.WD, param_dict=pd),
        {"learning_rate": h.LR, "wd": h.WD},
        lambda lr, wd, mul=h.constants, dec=h.decay_constants: optax.chain(
            optax.scale_by_adam(),
            dec([h.WD * w for w in wd]),
            optax.scale_by_learning_rate(h.LR),
            mul(lr),
        ),
    ),
}
FULL = (h.MLP(4, 512, 64), h.MLP(32, 128, 64), h.MLP(256, 32, 16, False))
FULL += (h.MLP(1024, 32, 16, False),)
QUICK = (h.MLP(4, 64, 16),)


VARIANTS = ("A/A", "floor", "runtime floor", "chain", "Trainer")


def runtime_floor(floor: Any, params: Any) -> optax.GradientTransformation:
    """The floor with its numbers read at run time from blocks of 8 (`harness.runtime_*`)."""
    return floor(*half_numbers(params), mul=h.runtime_constants, dec=h.runtime_decay)


def half_set(params) -> lrmult.ParamDict:
    pd = h.param_dict(params)
    for p in list(pd.values())[: len(pd) // 2]:
        p.lr_mult, p.wd_mult = 0.1, 0.5
    return pd


def half_numbers(params) -> tuple[list[float], list[float]]:
    """`half_set`'s (lr_mult, wd_mult) as numbers, in the leaves' order (a ParamDict's order)."""
    n = len(jax.tree.leaves(params))
    return [0.1] * (n // 2) + [1.0] * (n - n // 2), [0.5] * (n // 2) + [1.0] * (n - n // 2)


def run(quick: bool) -> h.Report:
    models, opts = (QUICK, ("adam",)) if quick else (FULL, tuple(RECIPES))
    rounds, block_s = (4, 0.01) if quick else (60, 0.04)
    rows = []
    for model in models:
        params, batch = model.init(), model.batch_data()
        for opt in opts:
            plain, chain, trainer_opts, floor = RECIPES[opt]
            base = h.OptaxRunner(plain(), params, batch)
            runners = {
                "optax": base,
                "A/A": base.twin(),
                "floor": h.OptaxRunner(floor(*half_numbers(params)), params, batch),
                "runtime floor": h.OptaxRunner(runtime_floor(floor, params), params, batch),
                "chain": h.OptaxRunner(chain(half_set(params)), params, batch),
                "Trainer": h.TrainerRunner(half_set(params), opt, trainer_opts, batch),
            }
            t = h.interleave(runners, rounds, block_s)
            ratios = [c for k in VARIANTS for c in h.ratio(t[k], t["optax"])]
            inputs = [str(runners[k].input_buffers()) for k in ("optax", "chain", "Trainer")]
            rows.append([model.describe(), opt, h.fmt_time(h.median(t["optax"])), *ratios])
            rows[-1].append(" / ".join(inputs))
            del runners, base
    header = ["model", "opt", "optax step"]
    header += [f"{k} {m}" for k in VARIANTS for m in ("med", "min")]
    header += ["inputs optax / chain / Trainer"]
    return h.Report(__doc__, [f"{rounds} rounds.", h.table(header, rows)])


if __name__ == "__main__":
    sys.exit(h.main(run, __doc__))
