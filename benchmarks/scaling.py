"""2. Per-leaf learning rates: lrmult against optax.partition with one label per leaf

Adam on Dense 32² layers (batch 16), each leaf with its own `lr_mult` (0.5 ** (i % 4));
`optax.partition({name: optax.adam(lr * lr_mult)}, labels)` is optax's route to the same
update. `vs optax`: step time / plain `optax.adam` (no multipliers); `partition / this`:
partition's step time / this one's. First call: `jax.clear_caches()`, a new runner (not
timed), its first step (trace + compile + run). Hand-jitted donating steps but the Trainer's.
"""

from __future__ import annotations

import sys

import harness as h
import jax
import optax

import lrmult


def per_leaf(params) -> lrmult.ParamDict:
    pd = h.param_dict(params)
    for i, p in enumerate(pd.values()):
        p.lr_mult = 0.5 ** (i % 4)
    return pd


def partition(params) -> optax.GradientTransformation:
    pd = per_leaf(params)
    labels = jax.tree.unflatten(jax.tree.structure(params), list(pd))
    return optax.partition({n: optax.adam(h.LR * p.lr_mult) for n, p in pd.items()}, labels)


def builders(params, batch) -> dict:
    adam = {"learning_rate": h.LR}
    return {
        "optax": lambda: h.OptaxRunner(optax.adam(h.LR), params, batch),
        "lrmult.adam": lambda: h.OptaxRunner(
            lrmult.adam(h.LR, param_dict=per_leaf(params)), params, batch
        ),
        "Trainer": lambda: h.TrainerRunner(per_leaf(params), "adam", adam, batch),
        "optax.partition": lambda: h.OptaxRunner(partition(params), params, batch),
    }


def run(quick: bool) -> h.Report:
    sizes, rounds, first_rounds = ((10,), 4, 1) if quick else ((20, 100, 200), 8, 2)
    rows = []
    for leaves in sizes:
        model = h.MLP(leaves // 2, 32, 16)
        build = builders(model.init(), model.batch_data())
        t = h.interleave({k: b() for k, b in build.items()}, rounds, 0.01 if quick else 0.04)
        first = h.first_calls(build, first_rounds)
        for k in build:
            rows.append([leaves, k, h.fmt_time(h.median(t[k])), *h.ratio(t[k], t["optax"], 2)])
            rows[-1] += [*h.ratio(t["optax.partition"], t[k], 1), h.fmt_time(h.median(first[k]))]
            rows[-1] += h.ratio(first[k], first["optax"], 2)
    header = ["leaves", "variant", "step", "vs optax med", "vs optax min"]
    header += ["partition / this med", "partition / this min", "first call"]
    header += ["first call vs optax med", "… min"]
    note = f"{rounds} step-timing rounds, {first_rounds} first-call round(s)."
    return h.Report(__doc__, [note, h.table(header, rows)])


if __name__ == "__main__":
    sys.exit(h.main(run, __doc__))
