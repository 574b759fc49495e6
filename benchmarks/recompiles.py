"""3. Recompilations when a multiplier, an override or the learning rate changes

Each way runs N steps, each after a change to a new value (for lrmult, one change beforehand,
not counted, warms up the small eager computations it runs). Compilations are XLA backend
compilations counted with `jax.monitoring` (every function, eager ops included). The rebuilt
chain is the closure approach: `optax.chain(scale_by_adam(), stateless(u * m, m a Python
float), scale_by_learning_rate(lr))` rebuilt with the new constant and re-jitted, its state
kept."""

from __future__ import annotations

import sys
import time
from functools import partial

import harness as h
import jax
import optax

import lrmult


class Rebuilt(h.OptaxRunner):
    """Multipliers and learning rate as Python constants of the chain: re-jitted per change."""

    def __init__(self, params, batch) -> None:
        self.treedef, self.lr = jax.tree.structure(params), h.LR
        self.mults = dict.fromkeys(h.param_dict(params), 1.0)
        super().__init__(self.tx(), params, batch)

    def tx(self) -> optax.GradientTransformation:
        m = jax.tree.unflatten(self.treedef, list(self.mults.values()))
        scale = optax.stateless(lambda u, p=None: jax.tree.map(lambda a, b: a * b, u, m))
        return optax.chain(optax.scale_by_adam(), scale, optax.scale_by_learning_rate(self.lr))

    def change(self, name: str | None, v: float) -> None:  # name None: the learning rate
        if name is None:
            self.lr = h.LR * v
        else:
            self.mults[name] = v
        self.fn = h.jit_step(self.tx())


def changed_steps(runner, change, warm: bool, n: int, r: int) -> tuple[float, int]:
    """(seconds, compilations) of n steps, each after change(v) to a value v new in round r."""
    for i in range(-1 if warm else 0, n):
        if i == 0:
            before, t0 = h.compiles(), time.perf_counter()
        change(0.1 * (i + 2 + r * (n + 1)))
        jax.block_until_ready(runner())
    return time.perf_counter() - t0, h.compiles() - before


def run(quick: bool) -> h.Report:
    model, n, rounds = (h.MLP(2, 32, 8), 2, 1) if quick else (h.MLP(8, 256, 64), 10, 2)
    params, batch = model.init(), model.batch_data()
    pd, pd_opt = h.param_dict(params), h.param_dict(params)
    k0, k1 = list(pd)[1], list(pd)[3]  # layers/0/kernel, layers/1/kernel
    tr = h.TrainerRunner(pd, "adam", {"learning_rate": h.LR}, batch)
    chain = h.OptaxRunner(lrmult.adam(h.LR, param_dict=pd_opt), params, batch)
    rebuilt = Rebuilt(params, batch)

    def setattr_refresh(v: float) -> None:
        pd_opt[k0].lr_mult = v
        chain.state = lrmult.refresh(chain.state, pd_opt)

    t = tr.trainer
    scenarios = [  # label, lrmult runner, lrmult change, what the rebuilt chain changes
        (f"`pd[{k0!r}].lr_mult = v` (Trainer)", tr, lambda v: setattr(pd[k0], "lr_mult", v), k0),
        (f"`trainer.set_lr_mult({{{k1!r}: v}})`", tr, lambda v: t.set_lr_mult({k1: v}), k1),
        ("`trainer.set_learning_rate(lr)`", tr, lambda v: t.set_learning_rate(h.LR * v), None),
        ("`setattr` + `lrmult.refresh` (optax level)", chain, setattr_refresh, k0),
    ]
    rep, rows = h.Report(__doc__, [f"{model.describe()}, Adam; N = {n}, {rounds} round(s)."]), []
    for label, runner, change, key in scenarios:
        ways = {"lrmult": (runner, change, True)}
        ways["rebuilt"] = (rebuilt, partial(rebuilt.change, key), False)
        secs, counts = {w: [] for w in ways}, dict.fromkeys(ways, 0)
        for r in range(rounds):
            for way in list(ways)[r % 2 :] + list(ways)[: r % 2]:
                wall, c = changed_steps(*ways[way], n, r)
                secs[way].append(wall)
                counts[way] += c
        per = {way: c / (n * rounds) for way, c in counts.items()}
        rows.append([label, f"{per['lrmult']:g}", f"{per['rebuilt']:g}"])
        rows[-1] += [h.fmt_time(h.median(secs[w]) / n) for w in ways]
        rows[-1] += h.ratio(secs["rebuilt"], secs["lrmult"], 0)
        rep.figures[label] = per
        rep.checks[f"{label}: 0 compilations per change (lrmult)"] = per["lrmult"] == 0
        rep.checks[f"{label}: 1 compilation per change (rebuilt chain)"] = per["rebuilt"] == 1
    header = ["change", "compiles / change, lrmult", "… rebuilt", "changed step, lrmult"]
    header += ["… rebuilt", "rebuilt / lrmult med", "… min"]
    rep.text.append(h.table(header, rows))
    return rep


if __name__ == "__main__":
    sys.exit(h.main(run, __doc__))
