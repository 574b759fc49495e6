"""5. Stacked layers: layer-wise lr decay and the bottom 4 of 12 layers frozen, against plain optax

One `(12, d, d)` kernel and one `(12, d)` bias, run with `jax.lax.scan` (tanh after every layer,
MSE), declared with `ParamDict.from_pytree(tree, stacked={"layers": 1})`; AdamW (decoupled weight
decay 1e-4). lrmult: `presets.layerwise_lr_decay(pd, 0.8)` (`lr_mult` 0.8 ** (12 - i) on layer
`i`), then, in the `4 frozen` rows, `pd.select("layers/[0-3]/").setattr("frozen", True)`; the
`LLRD only` rows set the multipliers alone. Baseline `optax`: the same model, a hand-jitted
donating step with plain `optax.adamw` (no multipliers, nothing frozen); `A/A`: the same step on
buffers of its own (step time) or built and compiled a second time (first call), i.e. the noise;
`chain`: that step with `lrmult.adamw(..., param_dict=pd)`; `Trainer`: `lrmult.Trainer(pd,
"adamw", ...).train_step`. A frozen layer still gets its gradient (its rows live in the same
stacked leaf) but no Adam state, no decay and no update. First call: `jax.clear_caches()`, a new
runner (not timed), its first step (trace + compile + run). Targets: step time within 3% of
`optax`, first call within 5%.
"""

from __future__ import annotations

import sys
import time

import harness as h
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lrmult

LAYERS, FROZEN, DECAY = 12, 4, 0.8


def stacked_loss(params, x, y):
    def layer(carry, kb):
        return jnp.tanh(carry @ kb[0] + kb[1]), None

    layers = params["layers"]
    out, _ = jax.lax.scan(layer, x, (layers["kernel"], layers["bias"]))
    return jnp.mean((out - y) ** 2)


def llrd(params, frozen: bool) -> lrmult.ParamDict:
    pd = lrmult.ParamDict.from_pytree(h.fresh(params), stacked={"layers": 1})
    lrmult.presets.layerwise_lr_decay(pd, DECAY)
    if frozen:
        pd.select(f"layers/[0-{FROZEN - 1}]/").setattr("frozen", True)
    return pd


def builders(params, batch) -> dict:
    adamw, loss = {"learning_rate": h.LR, "wd": h.WD}, stacked_loss

    def plain():
        return h.OptaxRunner(optax.adamw(h.LR, weight_decay=h.WD), params, batch, loss)

    def chain(frozen):
        def make():
            tx = lrmult.adamw(h.LR, weight_decay=h.WD, param_dict=llrd(params, frozen))
            return h.OptaxRunner(tx, params, batch, loss)

        return make

    def trainer(frozen):
        return lambda: h.TrainerRunner(llrd(params, frozen), "adamw", adamw, batch, loss)

    return {
        "optax": plain,
        "A/A": plain,
        f"chain, LLRD + {FROZEN} frozen": chain(True),
        f"Trainer, LLRD + {FROZEN} frozen": trainer(True),
        "chain, LLRD only": chain(False),
        "Trainer, LLRD only": trainer(False),
    }


def run(quick: bool) -> h.Report:
    d, batch_size = (64, 64) if quick else (256, 64)
    rounds, block_s, first_rounds = (4, 0.01, 1) if quick else (24, 0.04, 6)
    rng = np.random.default_rng(0)
    kernel = jnp.asarray(rng.normal(size=(LAYERS, d, d)) / np.sqrt(d), jnp.float32)
    params = {"layers": {"kernel": kernel, "bias": jnp.zeros((LAYERS, d))}}
    batch = tuple(jnp.asarray(rng.normal(size=(batch_size, d)), jnp.float32) for _ in range(2))
    build, first = builders(params, batch), {}
    if quick:  # smoke test: the frozen rows only (the LLRD-only ones run the same code)
        build = {k: b for k, b in build.items() if "only" not in k}

    def first_call(k: str, clear: bool = True):
        """`jax.clear_caches()`, a new runner (not timed), its first step (timed)."""
        if clear:
            jax.clear_caches()
        runner = build[k]()
        t0 = time.perf_counter()
        jax.block_until_ready(runner())
        first.setdefault(k, []).append(time.perf_counter() - t0)
        return runner

    if quick:  # one clear_caches, then each runner's first step: they compile once, not twice
        jax.clear_caches()
        runners = {k: first_call(k, clear=False) for k in build if k != "A/A"}
    else:
        for r in range(first_rounds):  # rotated, balanced orders as for the step times
            for k in (list(build)[i] for i in h.orders(len(build))[r % len(build)]):
                first_call(k)
        runners = {k: b() for k, b in build.items() if k != "A/A"}
    runners = {"optax": runners["optax"], "A/A": runners["optax"].twin(), **runners}
    t = h.interleave(runners, rounds, block_s)
    trainable = h.tree_bytes(params) * (LAYERS - FROZEN) // LAYERS
    rep = h.Report(__doc__, figures={"trainable_bytes": trainable})
    for k, r in runners.items():
        moments = h.tree_bytes(r.state, min_size=LAYERS)  # Adam's moments, not the multipliers
        rep.figures[k] = {"moment_bytes": moments, "step": t[k].tolist()}
        rep.figures[k]["first_call"] = first.get(k, [])
        if "frozen" in k:
            name = f"{k}: moments = 2 × bytes of the {LAYERS - FROZEN} trainable layers"
            rep.checks[name] = moments == 2 * trainable
    del runners
    rows = []
    for k in build:
        rows.append([k, h.fmt_time(h.median(t[k])), *h.ratio(t[k], t["optax"])])
        if k in first:
            rows[-1] += [h.fmt_time(h.median(first[k])), *h.ratio(first[k], first["optax"])]
        else:  # quick mode's A/A: no first call of its own
            rows[-1] += ["–"] * 3
    header = ["variant", "step", "step vs optax med", "… min", "first call"]
    header += ["first call vs optax med", "… min"]
    rep.text += [
        f"{LAYERS} stacked layers: kernel ({LAYERS}, {d}, {d}) and bias ({LAYERS}, {d}), batch "
        f"{batch_size}; {rounds} step-timing rounds, {first_rounds} first-call round(s)"
        + (" (quick: one `clear_caches()` before all first calls)." if quick else "."),
        h.table(header, rows),
    ]
    return rep


if __name__ == "__main__":
    sys.exit(h.main(run, __doc__))
