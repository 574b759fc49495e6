"""8. Where a per-leaf multiplier can live: the layouts lrmult weighed, side by side

One link after `optax.adamw` multiplies each leaf's update by its own runtime number (half of
them 0.1), held in one of these layouts; AdamW on tiny 32² kernels (batch 16), where per-leaf
costs dominate. `floor`: the numbers baked into the step as Python constants (recompiles on
any change). `scalar`: one f32[] buffer per leaf. `blocks of B`: B leaves' numbers per f32[B]
buffer, each leaf reading a static slice (lrmult's layout is B = 8). `one vector`: all numbers in
one buffer. `+k buffers`: optax with k f32[8] arrays passed through its state untouched (the
price of a buffer alone). What it shows on XLA:CPU: each input buffer of the step costs a few µs
a step, and each distinct slice offset makes the per-leaf kernels it is fused into compile once
more (identical kernels are compiled once), so buffers cost step time and offsets cost first-call
time; a layout with a distinct address per leaf pays one or the other. Step: interleaved rounds,
paired median and min-of-rounds ratios against plain optax, A/A control. First call:
`jax.clear_caches()`, trace + compile + first step, variants taking turns.
"""

from __future__ import annotations

import sys

import harness as h
import jax
import jax.numpy as jnp
import numpy as np
import optax


def multiplied(layout: str, factors: np.ndarray) -> optax.GradientTransformation:
    """Each leaf's update times its factor, the factors held as `layout` says."""
    if layout == "floor":
        return h.constants([float(f) for f in factors])
    if layout.startswith("B"):
        return h.runtime_constants(factors, int(layout[1:]))

    def init(params):
        if layout == "scalar":
            return [jnp.asarray(f) for f in factors]
        return jnp.asarray(factors)

    def read(state, i):
        if layout == "scalar":
            return state[i]
        return jax.lax.reshape(jax.lax.slice(state, (i,), (i + 1,)), ())

    def update(updates, state, params=None):
        leaves, treedef = jax.tree.flatten(updates)
        return treedef.unflatten([u * read(state, i) for i, u in enumerate(leaves)]), state

    return optax.GradientTransformation(init, update)


def passed_through(k: int) -> optax.GradientTransformation:
    """k f32[8] arrays in the state, returned untouched."""
    return optax.GradientTransformation(
        lambda params: [jnp.ones(8, jnp.float32) for _ in range(k)], lambda u, s, p=None: (u, s)
    )


LAYOUTS = {
    "floor": "floor",
    "scalar": "scalar",
    "blocks of 1": "B1",
    "blocks of 8 (lrmult)": "B8",
    "blocks of 32": "B32",
    "one vector": "vector",
}


def builders(params, batch, quick: bool) -> dict:
    n = len(jax.tree.leaves(params))
    factors = np.where(np.arange(n) < n // 2, 0.1, 1.0).astype(np.float32)

    def adamw():
        return optax.adamw(h.LR, weight_decay=h.WD)

    out = {"optax": lambda: h.OptaxRunner(adamw(), params, batch)}
    out["A/A"] = out["optax"]
    for name, layout in LAYOUTS.items():
        tx = lambda layout=layout: optax.chain(adamw(), multiplied(layout, factors))  # noqa: E731
        out[name] = lambda tx=tx: h.OptaxRunner(tx(), params, batch)
    for k in (n // 8,) if quick else (n // 8, n):
        tx = lambda k=k: optax.chain(adamw(), passed_through(k))  # noqa: E731
        out[f"+{k} buffers"] = lambda tx=tx: h.OptaxRunner(tx(), params, batch)
    return out


def run(quick: bool) -> h.Report:
    leaves, rounds, block_s, first_rounds = (16, 4, 0.01, 1) if quick else (200, 24, 0.08, 4)
    model = h.MLP(leaves, 32, 16, False)
    build = builders(model.init(), model.batch_data(), quick)
    runners = {k: b() for k, b in build.items()}
    runners["A/A"] = runners["optax"].twin()
    t = h.interleave(runners, rounds, block_s)
    first = h.first_calls(build, first_rounds)
    rows = []
    for k, r in runners.items():
        rows.append([k, r.input_buffers(), h.fmt_time(h.median(t[k])), *h.ratio(t[k], t["optax"])])
        rows[-1] += [h.fmt_time(h.median(first[k])), *h.ratio(first[k], first["optax"], 2)]
    header = ["layout", "inputs", "step", "step med", "step min", "first call"]
    header += ["first call med", "… min"]
    note = f"{leaves} leaves; {rounds} step-timing rounds, {first_rounds} first-call rounds."
    return h.Report(__doc__, [note, h.table(header, rows)])


if __name__ == "__main__":
    sys.exit(h.main(run, __doc__))
