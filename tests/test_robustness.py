"""Numerical robustness: bf16 / f16 parameters, `check_finite`, extreme multipliers.

Expected values are computed here in float64 NumPy from the formulas of SPEC §3 (η base learning
rate, λ base weight decay, m = lr_mult, d = wd_mult), never taken from lrmult.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lrmult import ParamDict, Trainer
from lrmult.optimizers import OPTIMIZERS
from lrmult.resync import find
from lrmult.transforms import MultState

B1, B2, EPS = 0.9, 0.999, 1e-8


def bits(trainer: Trainer) -> list:
    values = [np.asarray(p.data()) for p in trainer.params.values()]
    state = [np.asarray(x) for x in jax.tree.leaves(trainer.opt_state)]
    return [(a.dtype.str, a.shape, a.tobytes()) for a in values + state]


def within(actual, expected, scale, dtype, ulps=2.0) -> None:
    """|actual - expected| within `ulps` roundings in `dtype` of the magnitudes involved."""
    info = jnp.finfo(dtype)
    actual = np.asarray(actual, np.float64)
    bound = ulps * float(info.eps) * np.asarray(scale, np.float64) + float(info.smallest_subnormal)
    err = np.abs(actual - np.asarray(expected, np.float64))
    assert np.all(err <= bound), f"error {err} > bound {bound}"


def multiplier_dtypes(opt_state) -> set:
    mults = [m for _, m in find(opt_state, MultState)]
    assert mults, "no multiplier state found"
    return {x.dtype for m in mults for x in jax.tree.leaves(m.values)}


# -- bf16 and f16 parameters -----------------------------------------------------------------------

X = np.linspace(-1.0, 1.0, 24, dtype=np.float32).reshape(8, 3)
Y = np.stack([np.sin(X.sum(1)), np.cos(X[:, 0]), X[:, 1] * X[:, 2]], axis=1).astype(np.float32)


def group(dtype, seed):
    k = jax.random.PRNGKey(seed)
    return {"w": (0.3 * jax.random.normal(k, (3, 3))).astype(dtype), "b": jnp.zeros(3, dtype)}


def group_loss(g, x, y):
    pred = x @ g["w"].astype(jnp.float32) + g["b"].astype(jnp.float32)
    return jnp.mean((pred - y) ** 2)


def mixed_loss(tree, x, y):
    return sum(group_loss(tree[k], x, y) for k in ("bf16", "f16", "f32"))


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_low_precision_parameters_keep_their_dtype_and_train(optimizer):
    tree = {
        "bf16": group(jnp.bfloat16, 0),
        "f16": group(jnp.float16, 1),
        "f32": group(jnp.float32, 2),
    }
    pd = ParamDict.from_pytree(tree)
    pd["bf16/w"].lr_mult = 0.5
    pd["f16/w"].lr_mult = 2.0
    pd["f16/b"].wd_mult = 0.0
    dtypes = {n: p.dtype for n, p in pd.items()}
    lr = {"lion": 3e-3, "sgd": 0.1, "nag": 0.1, "adagrad": 0.1}.get(optimizer, 0.02)
    trainer = Trainer(pd, optimizer, {"learning_rate": lr, "wd": 1e-3})
    assert multiplier_dtypes(trainer.opt_state) == {np.dtype(np.float32)}
    before = {k: float(group_loss(tree[k], X, Y)) for k in tree}
    for _ in range(40):
        trainer.train_step(mixed_loss, X, Y)
        assert {n: p.dtype for n, p in pd.items()} == dtypes
    after = pd.tree()
    for k in tree:
        assert all(np.all(np.isfinite(np.asarray(v, np.float32))) for v in after[k].values()), k
        assert float(group_loss(after[k], X, Y)) < 0.9 * before[k], (optimizer, k)
    assert multiplier_dtypes(trainer.opt_state) == {np.dtype(np.float32)}


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("m", [0.0, 1e-8, 0.5, 1e4])
def test_low_precision_sgd_step_is_the_formula(dtype, m):
    w = np.array([1.0, -0.5, 0.0, 3.0], np.float32)
    g = np.array([0.25, -1.0, 0.75, 0.5], np.float32)
    lr = 1e-3
    pd = ParamDict.from_pytree({"w": jnp.asarray(w, dtype), "ref": jnp.asarray(w, dtype)})
    pd["w"].lr_mult = m
    trainer = Trainer(pd, "sgd", {"learning_rate": lr})
    trainer.step({"w": jnp.asarray(g, dtype), "ref": jnp.asarray(g, dtype)})
    w0 = np.asarray(jnp.asarray(w, dtype), np.float64)  # the stored starting values
    g0 = np.asarray(jnp.asarray(g, dtype), np.float64)
    for name, mult in (("w", m), ("ref", 1.0)):
        assert pd[name].dtype == dtype
        step = lr * mult * g0
        # lrmult rounds twice in `dtype` (the scaled update, the new value)
        within(pd[name].data(), w0 - step, np.abs(w0) + np.abs(step), dtype, ulps=2.5)
    if m == 0.0:
        np.testing.assert_array_equal(np.asarray(pd["w"].data()), np.asarray(jnp.asarray(w, dtype)))


# -- check_finite ---------------------------------------------------------------------------------


def finite_pair(names=("a", "m", "z"), dtype=jnp.float32, optimizer="adam", opts=None, **kw):
    def make():
        pd = ParamDict.from_pytree({n: jnp.linspace(-1.0, 1.0, 3).astype(dtype) for n in names})
        return Trainer(pd, optimizer, opts or {"learning_rate": 0.1}, check_finite=True, **kw)

    return make(), make()


def good(names, dtype=jnp.float32, scale=1.0):
    return {n: jnp.full(3, scale * (i + 1), dtype) for i, n in enumerate(names)}


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
def test_check_finite_low_precision_names_the_leaf_and_changes_nothing(dtype):
    trainer, twin = finite_pair(("h", "k"), dtype)
    for t in (trainer, twin):
        t.step(good(("h", "k"), dtype))
    before = bits(trainer)
    bad = {"h": jnp.ones(3, dtype), "k": jnp.array([1.0, np.inf, 0.0], dtype)}
    with pytest.raises(FloatingPointError, match=r"'k'"):
        trainer.step(bad)
    assert bits(trainer) == before
    for t in (trainer, twin):
        t.step(good(("h", "k"), dtype, 0.5))
    assert bits(trainer) == bits(twin)


def test_check_finite_names_the_first_leaf_in_parameter_order():
    trainer, _ = finite_pair()
    # the dict lists 'z' first; 'a' comes first in the ParamDict
    bad = {"z": jnp.full(3, np.nan), "m": jnp.ones(3), "a": jnp.array([0.0, -np.inf, 0.0])}
    with pytest.raises(FloatingPointError, match=r"parameter 'a' \(and 1 more\)"):
        trainer.step(bad)


def test_check_finite_keeps_the_schedule_step_count():
    schedule = optax.linear_schedule(0.1, 0.0, 10)
    trainer, twin = finite_pair(opts={"learning_rate": schedule})
    names = ("a", "m", "z")
    for t in (trainer, twin):
        t.step(good(names))
        t.step(good(names))
    lr_before, before = trainer.learning_rate, bits(trainer)
    assert lr_before == pytest.approx(0.1 * (1 - 2 / 10))
    with pytest.raises(FloatingPointError, match="'m'"):
        trainer.step({**good(names), "m": jnp.array([np.nan, 0.0, 0.0])})
    assert trainer.learning_rate == lr_before and bits(trainer) == before
    for t in (trainer, twin):
        t.step(good(names, scale=-1.0))
    assert bits(trainer) == bits(twin)


def test_check_finite_train_step_names_the_leaf_and_changes_nothing():
    trainer, twin = finite_pair()

    def loss(p, shift):
        return sum(jnp.sum(v**2) for v in p.values()) + jnp.sum(jnp.sqrt(p["m"] - shift))

    trainer.train_step(loss, -10.0)
    twin.train_step(loss, -10.0)
    before = bits(trainer)
    with pytest.raises(FloatingPointError, match=r"'m'"):
        trainer.train_step(loss, 10.0)  # sqrt of negatives: nan gradient for 'm' only
    assert bits(trainer) == before
    trainer.train_step(loss, -10.0)
    twin.train_step(loss, -10.0)
    assert bits(trainer) == bits(twin)


def test_check_finite_ignores_a_frozen_leafs_gradient():
    trainer, _ = finite_pair()
    trainer.params["z"].frozen = True
    frozen_before = np.asarray(trainer.params["z"].data())
    trainer.step({**good(("a", "m")), "z": jnp.full(3, np.nan)})  # no gradient is taken for z
    np.testing.assert_array_equal(trainer.params["z"].data(), frozen_before)
    assert np.all(np.isfinite(np.asarray(trainer.params["a"].data())))


def test_check_finite_still_checks_a_leaf_with_lr_mult_zero():
    trainer, _ = finite_pair()
    trainer.params["m"].lr_mult = 0.0  # not frozen: its optimizer state would take the nan
    trainer.step(good(("a", "m", "z")))
    before = bits(trainer)
    with pytest.raises(FloatingPointError, match="'m'"):
        trainer.step({**good(("a", "z")), "m": jnp.full(3, np.nan)})
    assert bits(trainer) == before


# -- extreme multipliers ---------------------------------------------------------------------------

W0 = np.array([1.0, -2.0, 0.0, 0.5], np.float32)
GRADS = [
    np.array([0.5, -1.0, 0.25, 2.0], np.float32),
    np.array([-0.25, 0.5, 1.0, -1.0], np.float32),
    np.array([1.0, 1.0, -0.5, 0.125], np.float32),
]
EXTREMES = [0.0, 1e-8, 1e4]


def run(optimizer, opts, lr_mult=None, wd_mult=None):
    """Three steps on 'x' (with the multipliers) and 'ref' (without); values after each step."""
    pd = ParamDict.from_pytree({"x": jnp.asarray(W0), "ref": jnp.asarray(W0)})
    if lr_mult is not None:
        pd["x"].lr_mult = lr_mult
    if wd_mult is not None:
        pd["x"].wd_mult = wd_mult
    trainer = Trainer(pd, optimizer, opts)
    out = []
    for g in GRADS:
        trainer.step({"x": jnp.asarray(g), "ref": jnp.asarray(g)})
        out.append({n: np.asarray(p.data(), np.float64) for n, p in pd.items()})
    return out


def sgd_reference(lr, m=1.0, wd=0.0, d=1.0, momentum=None):
    w, buf, out = W0.astype(np.float64), None, []
    for g in GRADS:
        u = g + wd * d * w
        buf = u if (momentum is None or buf is None) else momentum * buf + u
        step = lr * m * buf
        out.append((w - step, np.abs(w) + np.abs(step)))
        w = w - step
    return out


def adam_reference(lr, m=1.0, wd=0.0, d=1.0, decoupled=False):
    w, mu, nu, out = W0.astype(np.float64), 0.0, 0.0, []
    for t, g in enumerate(GRADS, start=1):
        g = g + (0.0 if decoupled else wd * d * w)
        mu = B1 * mu + (1 - B1) * g
        nu = B2 * nu + (1 - B2) * g * g
        u = (mu / (1 - B1**t)) / (np.sqrt(nu / (1 - B2**t)) + EPS)
        if decoupled:
            u = u + wd * d * w
        step = lr * m * u
        out.append((w - step, np.abs(w) + np.abs(step)))
        w = w - step
    return out


def check(got, expected, leaf, optimizer):
    # SGD: a few roundings. Adam: m̂/√v̂ after sign changes of g amplifies float32 rounding
    # (about 70 ulps of the step here), far below the 1e-4 gaps between the alternatives.
    ulps = 128.0 if optimizer.startswith("adam") else 2.0
    for after, (want, scale) in zip(got, expected, strict=True):
        within(after[leaf], want, scale, jnp.float32, ulps=ulps)


@pytest.mark.parametrize("m", EXTREMES)
@pytest.mark.parametrize(
    "optimizer, opts, reference",
    [
        ("sgd", {"learning_rate": 0.1}, lambda m: sgd_reference(0.1, m)),
        (
            "sgd",
            {"learning_rate": 0.1, "momentum": 0.9},
            lambda m: sgd_reference(0.1, m, momentum=0.9),
        ),
        ("adam", {"learning_rate": 1e-3}, lambda m: adam_reference(1e-3, m)),
    ],
    ids=["sgd", "momentum", "adam"],
)
def test_extreme_lr_mult_is_the_formula(optimizer, opts, reference, m):
    got = run(optimizer, opts, lr_mult=m)
    check(got, reference(m), "x", optimizer)
    check(got, reference(1.0), "ref", optimizer)
    if m == 0.0:  # does not move at all
        for after in got:
            np.testing.assert_array_equal(after["x"], W0)
    if m == 1e-8:  # moves, but below float32 resolution wherever |w| >= 1e-3
        big = np.abs(W0) >= 1e-3
        np.testing.assert_array_equal(got[-1]["x"][big], W0[big])
        assert got[-1]["x"][2] != 0.0  # w = 0: the tiny step is visible


@pytest.mark.parametrize("d", EXTREMES)
@pytest.mark.parametrize(
    "optimizer, opts, reference",
    [
        (
            "sgd",
            {"learning_rate": 0.1, "wd": 1e-3},
            lambda d: sgd_reference(0.1, wd=1e-3, d=d),
        ),
        (
            "adamw",
            {"learning_rate": 1e-2, "wd": 1e-3},
            lambda d: adam_reference(1e-2, wd=1e-3, d=d, decoupled=True),
        ),
        (
            "adam",
            {"learning_rate": 1e-2, "wd": 1e-3},
            lambda d: adam_reference(1e-2, wd=1e-3, d=d),
        ),
    ],
    ids=["sgd", "adamw", "adam"],
)
def test_extreme_wd_mult_is_the_formula(optimizer, opts, reference, d):
    got = run(optimizer, opts, wd_mult=d)
    check(got, reference(d), "x", optimizer)
    check(got, reference(1.0), "ref", optimizer)


def test_lr_mult_zero_then_one_continues_adam_from_the_advanced_state():
    """lr_mult = 0 is not frozen: the moments and the step count advance while w stays put."""
    pd = ParamDict.from_pytree({"x": jnp.asarray(W0)})
    pd["x"].lr_mult = 0.0
    trainer = Trainer(pd, "adam", {"learning_rate": 1e-2})
    for g in GRADS[:2]:
        trainer.step({"x": jnp.asarray(g)})
    np.testing.assert_array_equal(pd["x"].data(), W0)
    pd["x"].lr_mult = 1e4
    trainer.step({"x": jnp.asarray(GRADS[2])})
    mu = nu = 0.0
    for g in GRADS:
        g = g.astype(np.float64)
        mu, nu = B1 * mu + (1 - B1) * g, B2 * nu + (1 - B2) * g * g
    u = (mu / (1 - B1**3)) / (np.sqrt(nu / (1 - B2**3)) + EPS)  # t = 3, not t = 1
    step = 1e-2 * 1e4 * u
    within(pd["x"].data(), W0 - step, np.abs(W0) + np.abs(step), jnp.float32, ulps=128)
