"""Shared harness of the lrmult benchmarks: models, runners, interleaved timing, ratio tables.

Timing: each variant is warmed up, then timed in blocks of steps (calibrated to about
`block_s`, after one untimed step), the blocks of all variants alternating round-robin in
rotated, balanced orders (each variant follows each other equally often), results awaited with
`jax.block_until_ready` once per block. A ratio `med` is the median over rounds of variant /
baseline in the same round (paired); `min` is fastest round / fastest round.
"""

from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import datetime
import gc
import os
import platform
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lrmult

LR, LR_SGD, WD = 1e-3, 1e-2, 1e-4
EVENTS: collections.Counter = collections.Counter()  # jax.monitoring events seen so far
jax.monitoring.register_event_duration_secs_listener(lambda ev, secs, **kw: EVENTS.update([ev]))


def compiles() -> int:
    """XLA compilations so far in this process (every function, eager ops included)."""
    return EVENTS["/jax/core/compile/backend_compile_duration"]


# ------------------------------------------------------------------------------ model and steps
@dataclasses.dataclass(frozen=True)
class MLP:
    """`layers` Dense(width -> width) layers (kernel, and bias if `bias`), tanh between, MSE."""

    layers: int
    width: int
    batch: int
    bias: bool = True

    @property
    def leaves(self) -> int:
        return self.layers * (2 if self.bias else 1)

    def describe(self) -> str:
        kind = "Dense" if self.bias else "kernel"
        return f"{self.leaves} leaves: {self.layers} × {kind} {self.width}², batch {self.batch}"

    def init(self, seed: int = 0) -> dict[str, Any]:
        keys = jax.random.split(jax.random.PRNGKey(seed), self.layers)
        bias = {"bias": jnp.zeros((self.width,), jnp.float32)} if self.bias else {}
        w = [jax.random.normal(k, (self.width,) * 2) / np.sqrt(self.width) for k in keys]
        return {"layers": [{"kernel": k, **bias} for k in w]}

    def batch_data(self, seed: int = 1) -> tuple[jax.Array, jax.Array]:
        kx, ky = jax.random.split(jax.random.PRNGKey(seed))
        shape = (self.batch, self.width)
        return jax.random.normal(kx, shape), jax.random.normal(ky, shape)


def mlp_loss(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    h, layers = x, params["layers"]
    for i, layer in enumerate(layers):
        h = h @ layer["kernel"] + layer.get("bias", 0.0)
        if i < len(layers) - 1:
            h = jnp.tanh(h)
    return jnp.mean((h - y) ** 2)


def fresh(tree: Any) -> Any:
    """Copies of the arrays of `tree` (each runner donates buffers of its own)."""
    return jax.tree.map(jnp.copy, tree)


def jit_step(tx: optax.GradientTransformation, loss_fn: Callable = mlp_loss) -> Callable:
    """A user's hand-written step: value_and_grad, update, apply; donates params and state."""

    def step(params, state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    return jax.jit(step, donate_argnums=(0, 1))


class OptaxRunner:
    """A training loop around a hand-jitted step (a fresh `jax.jit` per runner)."""

    def __init__(
        self, tx: optax.GradientTransformation, params: Any, batch: tuple, loss_fn=mlp_loss
    ) -> None:
        self.fn, self.params, self.batch = jit_step(tx, loss_fn), fresh(params), batch
        self.state = tx.init(self.params)

    def __call__(self) -> Any:
        self.params, self.state, loss = self.fn(self.params, self.state, *self.batch)
        return loss, self.params, self.state

    def twin(self) -> OptaxRunner:
        """The same compiled step on buffers of its own: an A/A control."""
        other = copy.copy(self)
        other.params, other.state = fresh(self.params), fresh(self.state)
        return other

    def compiled(self) -> Any:
        """The step compiled anew for the runner's current arguments (not the jit cache's)."""
        return self.fn.lower(self.params, self.state, *self.batch).compile()

    def input_buffers(self) -> int:
        """Inputs of the compiled step, read from `jit(...).lower(...).compile()`."""
        return len(jax.tree.leaves(self.compiled().input_shardings))

    def kernels(self) -> int:
        """Ops the compiled step runs: its entry computation's instructions but parameters,
        tuples, bitcasts and constants (on XLA:CPU, a kernel each)."""
        text = self.compiled().as_text()
        ops = re.findall(r"= (?:\([^=]*?\)|\S+) ([a-z-]+)\(", text[text.index("ENTRY") :])
        free = {"parameter", "tuple", "get-tuple-element", "bitcast", "constant"}
        return sum(op not in free for op in ops)


class TrainerRunner:
    """`lrmult.Trainer(pd, optimizer, opts).train_step(loss_fn, *batch)`, `mlp_loss` by default."""

    def __init__(
        self, pd: lrmult.ParamDict, optimizer: str, opts: dict, batch: tuple, loss_fn=mlp_loss
    ) -> None:
        self.trainer = lrmult.Trainer(pd, optimizer, opts)
        self.n_params, self.batch, self.loss_fn = len(pd), batch, loss_fn

    @property
    def state(self) -> Any:
        return self.trainer.opt_state

    def __call__(self) -> Any:
        # The loss comes out of the same compiled step as the new state: waiting for it waits
        # for the step (reading `opt_state` every step would time a join users rarely ask for).
        return self.trainer.train_step(self.loss_fn, *self.batch)

    def input_buffers(self) -> int:
        """Arrays the Trainer's step is handed: parameters, optimizer state, batch (its jitted
        function is not public, so this is counted from the public state, not compiled)."""
        state = jax.tree.leaves(self.trainer.opt_state)
        return self.n_params + sum(isinstance(x, jax.Array) for x in state) + len(self.batch)


def constants(factors: Sequence[float]) -> optax.GradientTransformation:
    """Each leaf's update times its own Python number, baked into the compiled step.

    A new number means a new step to compile: the floor a runtime per-leaf multiplier can reach.
    """

    def update(updates, state, params=None):
        leaves, treedef = jax.tree.flatten(updates)
        return treedef.unflatten([u * f for u, f in zip(leaves, factors, strict=True)]), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def decay_constants(rates: Sequence[float]) -> optax.GradientTransformation:
    """`rate · param` added to each leaf's update, each rate a Python number (see `constants`)."""

    def update(updates, state, params):
        leaves, treedef = jax.tree.flatten(updates)
        ps = jax.tree.leaves(params)
        out = [u + r * p for u, r, p in zip(leaves, rates, ps, strict=True)]
        return treedef.unflatten(out), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def blocks_of(numbers: Sequence[float], width: int = 8) -> list[jax.Array]:
    """`numbers` in f32[width] buffers (padding 1.0): the layout lrmult's state uses."""
    padded = np.ones(-(-len(numbers) // width) * width, np.float32)
    padded[: len(numbers)] = numbers
    return [jnp.asarray(b) for b in padded.reshape(-1, width)]


def block_read(blocks: Sequence[jax.Array], i: int) -> jax.Array:
    """Number `i` of `blocks_of(...)`, as a static slice of its block (f32[])."""
    width = blocks[0].shape[0]
    at = i % width
    return jax.lax.reshape(jax.lax.slice(blocks[i // width], (at,), (at + 1,)), ())


def runtime_constants(factors: Sequence[float], width: int = 8) -> optax.GradientTransformation:
    """`constants`, each number read at run time from blocks of `width` in the state.

    The cheapest hand-written multiplier that a new number does not recompile: lrmult's layout
    without its machinery (lookup, tracking, schedules, freezing), to measure that machinery.
    """

    def update(updates, state, params=None):
        leaves, treedef = jax.tree.flatten(updates)
        return treedef.unflatten([u * block_read(state, i) for i, u in enumerate(leaves)]), state

    return optax.GradientTransformation(lambda params: blocks_of(factors, width), update)


def runtime_decay(rates: Sequence[float]) -> optax.GradientTransformation:
    """`decay_constants`, each rate read at run time from blocks of 8 (see `runtime_constants`)."""

    def update(updates, state, params):
        leaves, treedef = jax.tree.flatten(updates)
        pairs = enumerate(zip(leaves, jax.tree.leaves(params), strict=True))
        out = [u + block_read(state, i) * p for i, (u, p) in pairs]
        return treedef.unflatten(out), state

    return optax.GradientTransformation(lambda params: blocks_of(rates), update)


def tree_bytes(tree: Any, min_size: int = 0) -> int:
    """Bytes of the arrays of `tree` with more than `min_size` entries (shape metadata only)."""
    return sum(
        x.nbytes for x in jax.tree.leaves(tree) if isinstance(x, jax.Array) and x.size > min_size
    )


def param_dict(params: Any) -> lrmult.ParamDict:
    return lrmult.ParamDict.from_pytree(fresh(params))


# -------------------------------------------------------------------------------------- timing
def orders(n: int) -> list[list[int]]:
    """Rotated orders in which every variant follows every other equally often (Williams)."""
    seq = [0] + [(k + 1) // 2 if k % 2 else n - k // 2 for k in range(1, n)]  # 0, 1, n-1, 2, …
    rows = [[(x + r) % n for x in seq] for r in range(n)]
    return rows if n % 2 == 0 else rows + [row[::-1] for row in rows]


def interleave(
    runners: Mapping[str, Callable[[], Any]], rounds: int, block_s: float, max_steps: int = 500
) -> dict[str, np.ndarray]:
    """Seconds per step of each runner, one value per interleaved round (see module doc)."""
    names, steps = list(runners), {}
    for name in names:
        for _ in range(2):
            jax.block_until_ready(runners[name]())
        t0 = time.perf_counter()
        jax.block_until_ready(runners[name]())
        steps[name] = int(np.clip(round(block_s / (time.perf_counter() - t0)), 1, max_steps))
    out, order = {name: np.empty(rounds) for name in names}, orders(len(names))
    gc.collect()
    for r in range(rounds):
        for name in (names[i] for i in order[r % len(order)]):
            run, n = runners[name], steps[name]
            jax.block_until_ready(run())  # one untimed step: the block starts warm
            t0 = time.perf_counter()
            for _ in range(n):
                res = run()
            jax.block_until_ready(res)
            out[name][r] = (time.perf_counter() - t0) / n
    return out


def second(name: str) -> str:
    """The name `mirrored` gives a variant's second build."""
    return f"{name} #2"


def mirrored(build: Mapping[str, Callable[[], Any]]) -> dict[str, Any]:
    """Two runners of each variant, built in a mirrored order (A B … B A): `k` and `second(k)`.

    In one process, a runner built later can step slower than an identical one built earlier
    (seen on XLA:CPU at 200 tiny leaves: the 4th build of a chain 1.05–1.14× of the 1st, where
    an A/A on its own buffers showed 0.93–1.03×). Mirrored, every variant's two builds sit at
    the same mean position; `pooled` averages them, and the first variant's second build
    against its first (built last and first) shows the effect.
    """
    names = list(build)
    runners = {k: build[k]() for k in names}
    runners.update({second(k): build[k]() for k in reversed(names)})
    return runners


def pooled(times: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
    """Each variant's seconds per step in each round: the mean of its two (`mirrored`) builds."""
    return {k: (np.asarray(times[k]) + np.asarray(times[second(k)])) / 2 for k in names}


def first_calls(build: Mapping[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    """Seconds of each variant's first call (trace + compile + run) after `jax.clear_caches()`.

    `build[k]()` makes a new runner (not timed); variants take turns, rotated each round.
    """
    names, out = list(build), {k: [] for k in build}
    for r in range(rounds):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            jax.clear_caches()
            runner = build[k]()
            t0 = time.perf_counter()
            jax.block_until_ready(runner())
            out[k].append(time.perf_counter() - t0)
    return out


def ratio(a: Sequence[float], b: Sequence[float], digits: int = 3) -> list[str]:
    """Cells `med` (paired: median over rounds of a / b) and `min` (min(a) / min(b))."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    return [f"{np.median(a / b):.{digits}f}×", f"{a.min() / b.min():.{digits}f}×"]


def fmt_time(seconds: float) -> str:
    unit, k = ("µs", 1e6) if seconds < 1e-3 else ("ms", 1e3) if seconds < 1 else ("s", 1)
    return f"{seconds * k:.3g} {unit}" if seconds * k < 100 else f"{seconds * k:.0f} {unit}"


def fmt_bytes(n: float) -> str:
    for unit, size in (("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def median(x: Sequence[float]) -> float:
    return float(np.median(x))


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


# -------------------------------------------------------------------------------------- reports
@dataclasses.dataclass
class Report:
    """One benchmark's result: its docstring, tables, deterministic checks and exact figures."""

    doc: str
    text: list[str] = dataclasses.field(default_factory=list)
    checks: dict[str, bool] = dataclasses.field(default_factory=dict)
    figures: dict[str, Any] = dataclasses.field(default_factory=dict)

    def markdown(self) -> str:
        title, *intro = self.doc.strip().split("\n\n")
        marks = [f"- {'PASS' if ok else '**FAIL**'}: {name}" for name, ok in self.checks.items()]
        parts = [f"## {title}", *(p.replace("\n", " ") for p in intro), *self.text]
        if marks:
            parts.append("Deterministic targets (`--strict`):\n\n" + "\n".join(marks))
        return "\n\n".join(parts) + "\n"


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.strip().split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke-test sizes (seconds)")
    p.add_argument("--strict", action="store_true", help="exit 1 on a deterministic miss")
    return p


def main(run: Callable[[bool], Report], doc: str) -> int:
    """Entry point of each script: run, print the report, exit 1 on a miss under --strict."""
    args = parser(doc).parse_args()
    report = run(args.quick)
    print(report.markdown(), flush=True)
    return 1 if args.strict and not all(report.checks.values()) else 0


def machine() -> dict[str, str]:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    names = [ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")]
    cpu, dev = (names or [platform.processor() or platform.machine()])[0], jax.devices()[0]
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "devices": f"{jax.device_count()} × {dev.platform} ({dev.device_kind})",
        "host cpu": f"{cpu}, {os.cpu_count()} cores",
        "versions": f"python {platform.python_version()}, jax {jax.__version__}, "
        f"optax {optax.__version__}",
        "load average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
