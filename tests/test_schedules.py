"""Multipliers that are schedules (`lrmult.schedules`, any callable step -> value).

Expectations: PyTorch's `LambdaLR(optimizer, lr_lambda=[f_0, ..., f_k])` with one param group per
leaf (group lr `η·m_i`, lambda `f_i`), transcribed in NumPy (`TorchRef` of test_numerics: a group
whose lr at step t is `η·m_i·f_i(t)`), and the helpers' formulas written out by hand.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_numerics import CASES, INIT, NAMES, TorchRef, _flat, _nest, jax_loss, np_grad

import lrmult
from lrmult import schedules

STEPS = 30
LR_MULT = {"enc/bias": 2.0, "enc/kernel": 0.1, "head/bias": 0.25, "head/kernel": 0.5, "scale": 1.5}


def _warm(t):
    return jnp.minimum(1.0, (t + 1) / 10.0)


def _decay(t):
    return 0.9**t


def _np_lambdas():
    """One lambda per group, in NumPy (the reference side)."""
    return {
        "enc/bias": lambda t: min(1.0, (t + 1) / 10.0),
        "enc/kernel": lambda t: 0.9**t,
        "head/bias": lambda t: 1.0,  # a plain number
        "head/kernel": lambda t: min(1.0, t / 5.0),  # schedules.linear_warmup(1.0, 5)
        "scale": lambda t: 0.5 * (1 + np.cos(np.pi * min(t, 20) / 20)),  # schedules.cosine
    }


def _set_schedules(pd: lrmult.ParamDict) -> None:
    pd["enc/bias"].lr_mult = lambda t: LR_MULT["enc/bias"] * _warm(t)
    pd["enc/kernel"].lr_mult = schedules.Scaled(_decay, LR_MULT["enc/kernel"])
    pd["head/bias"].lr_mult = LR_MULT["head/bias"]
    pd["head/kernel"].lr_mult = schedules.linear_warmup(LR_MULT["head/kernel"], 5)
    pd["scale"].lr_mult = schedules.cosine(LR_MULT["scale"], 20)


def lambda_lr_reference(case: str) -> dict[str, np.ndarray]:
    hp = CASES[case].hp
    ref = TorchRef(hp)
    lambdas = _np_lambdas()
    for t in range(STEPS):
        grads = {n: np_grad(n, ref.params[n]) for n in NAMES}
        mult = {n: LR_MULT[n] * lambdas[n](t) for n in NAMES}
        ref.step(grads, mult, dict.fromkeys(NAMES, 1.0), set())
    return ref.params


@pytest.mark.parametrize("case", ["sgd_momentum", "adamw"])
@pytest.mark.parametrize("driver", ["trainer", "chain"])
def test_per_leaf_schedules_equal_torch_lambda_lr(case, driver):
    pd = lrmult.ParamDict.from_pytree(
        _nest({n: jnp.asarray(v, jnp.float32) for n, v in INIT.items()})
    )
    _set_schedules(pd)
    if driver == "trainer":
        name, opts = CASES[case].trainer
        trainer = lrmult.Trainer(pd, name, opts)
        for _ in range(STEPS):
            trainer.train_step(jax_loss)
        got = _flat(pd.tree())
    else:
        tx = CASES[case].chain(pd)
        params = pd.tree()
        state = tx.init(params)
        step = jax.jit(lambda p, s: _apply(tx, p, s))
        for _ in range(STEPS):
            params, state = step(params, state)
        got = _flat(params)
    want = lambda_lr_reference(case)
    for n in NAMES:
        np.testing.assert_allclose(got[n], want[n], rtol=2e-5, atol=2e-6, err_msg=n)


def _apply(tx, params, state):
    grads = jax.grad(jax_loss)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state


def test_helpers_by_hand():
    warm = schedules.linear_warmup(2.0, 4, start=3, init=0.5)
    assert [float(warm(t)) for t in (0, 3, 4, 7, 9)] == [0.0, 0.5, 0.875, 2.0, 2.0]
    cos = schedules.cosine(1.0, 10, warmup=2, end=0.1)
    np.testing.assert_allclose(
        [float(cos(t)) for t in (0, 1, 2, 7, 12, 20)],
        [0.0, 0.5, 1.0, 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 0.5)), 0.1, 0.1],
        rtol=1e-6,
    )
    st = schedules.step(1.0, 10, gamma=0.5)
    assert [float(st(t)) for t in (0, 9, 10, 25)] == [1.0, 1.0, 0.5, 0.25]
    # ULMFiT: T = 100, cut_frac 0.1 -> cut 10, ratio 32
    stlr = schedules.slanted_triangular(0.01, 100)
    np.testing.assert_allclose(
        [float(stlr(t)) for t in (0, 5, 10, 55, 100)],
        [0.01 / 32, 0.01 * (1 + 0.5 * 31) / 32, 0.01, 0.01 * (1 + 0.5 * 31) / 32, 0.01 / 32],
        rtol=1e-6,
    )
    assert float((schedules.linear_warmup(1.0, 4) * 3)(2)) == 1.5  # presets multiply schedules


def test_helpers_reach_their_ends_exactly_though_they_multiply_by_reciprocals():
    # The formulas multiply by 1/n (rows of the state) instead of dividing by n; in float32,
    # n * fl(1/n) is 1 - 2^-24 for n = 41, 47, 55, 61 and 83. The ends must still be exact, on
    # the host and compiled: peak from the end of a warmup on, end after a cosine's decay, and
    # a slanted triangle's fl(peak / ratio) at its bottom and peak at its top (the values a
    # user compares with constants).
    for n in (41, 47, 55, 61, 83):
        warm = schedules.linear_warmup(0.7, n, start=2)
        cos = schedules.cosine(0.9, n, warmup=n, end=0.3)
        # cut = floor(2n * 0.5) = n, the way down max(n * (1 / 0.5 - 1), 1) = n
        stlr = schedules.slanted_triangular(0.3, 2 * n, cut_frac=0.5, ratio=3.0)
        low = np.float32(0.3) / np.float32(3.0)
        for f in (
            lambda sched, t: float(sched(t)),
            lambda sched, t: float(jax.jit(lambda u: sched(u))(t)),
        ):
            assert [f(warm, 2 + n + k) for k in (0, 1, 5)] == [np.float32(0.7)] * 3
            assert f(cos, 2 * n) == f(cos, 3 * n) == np.float32(0.3)
            assert f(cos, n) == np.float32(0.9)
            assert f(stlr, 0) == f(stlr, 2 * n) == f(stlr, 3 * n) == low
            assert f(stlr, n) == np.float32(0.3)
        np.testing.assert_allclose(
            [float(warm(2 + t)) for t in range(n)], 0.7 * np.arange(n) / n, rtol=1e-6
        )
        t = np.arange(2 * n)
        p = np.where(t < n, t / n, 1 - (t - n) / n)
        np.testing.assert_allclose([float(stlr(k)) for k in t], 0.3 * (1 + p * 2) / 3, rtol=1e-6)


def test_fractional_step_counts_are_linear_too():
    # A count below 1 is its own length, not 1: a warmup of 0.5 steps from start 0.5 reaches
    # its peak at 1.0; a cosine's warmup of 0.5 steps is over at 0.5.
    assert float(schedules.linear_warmup(1.0, 0.5, start=0.5)(1)) == 1.0
    assert float(schedules.linear_warmup(1.0, 4.0, start=0.5)(1)) == 0.125
    # half way down a decay of 1 step at 1.0: 3 * 0.5 * (1 + cos(pi / 2))
    np.testing.assert_allclose(float(schedules.cosine(3.0, 1, warmup=0.5)(1)), 1.5, rtol=1e-6)


def test_changing_a_helpers_numbers_never_recompiles(compiles):
    pd = lrmult.ParamDict.from_pytree({"a": jnp.ones(2), "b": jnp.ones(2)})
    pd["a"].lr_mult = schedules.linear_warmup(1.0, 4)
    trainer = lrmult.Trainer(pd, "sgd", {"learning_rate": 1.0})
    g = {"a": jnp.ones(2), "b": jnp.ones(2)}
    trainer.step(g)  # t = 0: a gets 0
    trainer.step(g)  # t = 1: a gets 0.25 (the second call may compile for the step's outputs)
    count = compiles()
    pd["a"].lr_mult = schedules.linear_warmup(2.0, 2)  # new numbers, same helper: data
    trainer.step(g)  # t = 2: 2.0
    pd["b"].lr_mult = 0.5
    trainer.step(g)  # t = 3: a 2.0, b 0.5
    assert count("step") == 0
    np.testing.assert_allclose(pd["a"].data(), 1 - 0.0 - 0.25 - 2.0 - 2.0)
    np.testing.assert_allclose(pd["b"].data(), 1 - 1 - 1 - 1 - 0.5)


def _kernels(make) -> tuple[int, list[list[float]]]:
    """The compiled SGD update's kernels with `lr_mult = make(i)` on 16 leaves (2 blocks),
    and the first two updates (lr 1, gradient 1: each leaf's multiplier at t = 0 and 1)."""
    params = {f"p{i:02d}": jnp.ones((4, 4)) for i in range(16)}
    pd = lrmult.ParamDict.from_pytree(params)
    for i, p in enumerate(pd.values()):
        p.lr_mult = make(i)
    tx = lrmult.sgd(1.0, param_dict=pd)
    grads = {k: jnp.ones((4, 4)) for k in params}
    update, state = jax.jit(tx.update), tx.init(params)
    hlo = update.lower(grads, state, params).compile().as_text()
    kernels = len(re.findall(r"\bfusion\(", hlo[hlo.index("ENTRY") :]))
    moves = []
    for _ in range(2):
        u, state = update(grads, state, params)
        moves.append([-float(u[f"p{k:02d}"][0, 0]) for k in range(16)])
    return kernels, moves


def test_a_helpers_formula_adds_no_kernel_to_the_step():
    # The warmup, cosine and slanted triangular formulas have no divide (reciprocals are
    # rows of the state): XLA inlines them into the kernels of the leaves that read them, so
    # the step has exactly the kernels constants give. `step`'s power is not inlined: one
    # kernel per block of 8 leaves evaluates it.
    i = np.arange(16)
    constants, moves = _kernels(lambda k: 1.0 + k)
    np.testing.assert_array_equal(moves, [1.0 + i, 1.0 + i])
    warm, moves = _kernels(lambda k: schedules.linear_warmup(1.0 + k, 2 + k))
    # by hand: m * t / w at t = 0 and 1
    np.testing.assert_allclose(moves, [0 * i, (1.0 + i) / (2 + i)], rtol=1e-6)
    cos, moves = _kernels(lambda k: schedules.cosine(1.0 + k, 10, warmup=1))
    np.testing.assert_allclose(moves, [0 * i, 1.0 + i], rtol=1e-6)
    stlr, moves = _kernels(lambda k: schedules.slanted_triangular(1.0 + k, 100 + k))
    cut = np.floor((100 + i) * np.float32(0.1))  # 10, or 11 from 110 steps on
    np.testing.assert_allclose(moves, [(1.0 + i) / 32, (1.0 + i) * (1 + 31 / cut) / 32], rtol=1e-6)
    step, moves = _kernels(lambda k: schedules.step(1.0 + k, 1, gamma=0.5))
    np.testing.assert_allclose(moves, [1.0 + i, 0.5 * (1.0 + i)], rtol=1e-6)
    assert warm == cos == stlr == constants
    assert step == constants + 2


def test_a_new_schedule_function_compiles_once_per_distinct_set(compiles):
    pd = lrmult.ParamDict.from_pytree({"a": jnp.ones(2)})
    trainer = lrmult.Trainer(pd, "sgd", {"learning_rate": 1.0})
    g = {"a": jnp.ones(2)}
    trainer.step(g)
    trainer.step(g)  # a = -1
    count = compiles()
    pd["a"].lr_mult = _decay  # a number -> a schedule: one compile
    trainer.step(g)  # t = 2: 0.81
    pd["a"].lr_mult = 2.0  # back to the number: the cached step
    trainer.step(g)  # 2
    pd["a"].lr_mult = _decay  # the same function again: cached
    trainer.step(g)  # t = 4: 0.6561
    assert count("step") == 1
    np.testing.assert_allclose(pd["a"].data(), 1 - 2 - 0.81 - 2 - 0.6561, rtol=1e-6)


def test_schedule_on_a_stack_per_layer_and_frozen_layers():
    k = jnp.ones((4, 2))
    pd = lrmult.ParamDict.from_pytree({"layers": {"k": k}}, stacked={"layers": 1})
    # per-layer peaks: a helper's numbers may be arrays over the layers
    pd["layers/k"].lr_mult = schedules.linear_warmup(np.array([1.0, 2.0, 3.0, 4.0]), 2)
    pd.select("layers/0/").setattr("frozen", True)
    trainer = lrmult.Trainer(pd, "sgd", {"learning_rate": 1.0})
    for _ in range(3):  # t = 0, 1, 2: fractions 0, 0.5, 1
        trainer.step({"layers/k": jnp.ones((4, 2))})
    np.testing.assert_allclose(pd["layers/k"].data()[:, 0], [1.0, 1 - 3.0, 1 - 4.5, 1 - 6.0])


def test_override_dict_and_preset_take_schedules():
    pd = lrmult.ParamDict.from_pytree({"a": jnp.ones(2), "b": jnp.ones(2)})
    pd["b"].lr_mult = schedules.linear_warmup(1.0, 2)
    lrmult.presets.layerwise_lr_decay(pd, 0.5, groups=["a", "b"])  # b x 1, a x 0.5
    trainer = lrmult.Trainer(pd, "sgd", {"learning_rate": 1.0})
    g = {"a": jnp.ones(2), "b": jnp.ones(2)}
    for _ in range(3):
        trainer.step(g)
    np.testing.assert_allclose(pd["b"].data(), 1 - 0 - 0.5 - 1.0)
    np.testing.assert_allclose(pd["a"].data(), 1 - 3 * 0.5)
    pd2 = lrmult.ParamDict.from_pytree({"a": jnp.ones(2)})
    tr2 = lrmult.Trainer(pd2, "sgd", {"learning_rate": 1.0})
    tr2.set_lr_mult({"a": schedules.step(1.0, 1, gamma=0.5)})
    for _ in range(3):
        tr2.step({"a": jnp.ones(2)})
    np.testing.assert_allclose(pd2["a"].data(), 1 - 1 - 0.5 - 0.25)


def test_explain_shows_the_schedule_and_its_value_now():
    pd = lrmult.ParamDict.from_pytree({"a": jnp.ones(2)})
    pd["a"].lr_mult = schedules.linear_warmup(1.0, 4)
    trainer = lrmult.Trainer(pd, "sgd", {"learning_rate": 0.1})
    trainer.step({"a": jnp.ones(2)})
    (row,) = list(trainer.explain())
    assert row.lr_mult == 0.25 and row.lr == pytest.approx(0.025)
    assert "linear_warmup(peak=1" in row.lr_source


def test_bad_schedules_are_refused_naming_the_parameter():
    pd = lrmult.ParamDict.from_pytree({"a": jnp.ones(2)})
    with pytest.raises(ValueError, match="'a'.*-1"):
        pd["a"].lr_mult = lambda t: -1.0
    with pytest.raises(ValueError, match="'a'.*failed at step 0"):
        pd["a"].lr_mult = lambda t: 1 / 0
    with pytest.raises(ValueError, match="steps must be a step count"):
        schedules.linear_warmup(1.0, -2)
    assert not pd["a"].is_set("lr_mult")


def test_checkpoint_keeps_helper_schedules_and_their_position(tmp_path):
    def run(pd, trainer, n):
        for _ in range(n):
            trainer.step({"a": jnp.ones(2), "b": jnp.ones(2)})

    def make():
        pd = lrmult.ParamDict.from_pytree({"a": jnp.ones(2), "b": jnp.ones(2)})
        return pd, lrmult.Trainer(pd, "adam", {"learning_rate": 0.1})

    pd, trainer = make()
    pd["a"].lr_mult = schedules.cosine(1.0, 6, warmup=2)
    run(pd, trainer, 3)
    pd.save(tmp_path / "p")
    trainer.save_states(tmp_path / "t")
    run(pd, trainer, 4)
    pd2, trainer2 = make()
    pd2.load(tmp_path / "p")
    trainer2.load_states(tmp_path / "t")
    assert pd2["a"].lr_mult == schedules.cosine(1.0, 6, warmup=2)
    run(pd2, trainer2, 4)
    for n in "ab":
        np.testing.assert_array_equal(pd2[n].data(), pd[n].data())


def test_a_schedule_on_some_layers_of_a_stack_is_refused():
    pd = lrmult.ParamDict.from_pytree({"layers": {"k": jnp.ones((4, 2))}}, stacked={"layers": 1})
    with pytest.raises(ValueError, match="'layers/k'.*whole parameter"):
        pd.select("layers/[01]/").setattr("lr_mult", schedules.linear_warmup(1.0, 4))
    assert not pd["layers/k"].is_set("lr_mult")
    pd.select("layers/").setattr("lr_mult", schedules.linear_warmup(1.0, 4))  # every layer: fine
    with pytest.raises(ValueError, match="whole parameter"):
        pd.select("layers/0/").setattr("lr_mult", 0.5)


@pytest.mark.parametrize("driver", ["trainer", "refresh"])
def test_own_clock_counts_from_the_step_a_parameter_joins(driver):
    # b frozen for 3 steps, then unfrozen: its warmup counts from step 3, a's from step 0.
    pd = lrmult.ParamDict.from_pytree({"a": jnp.ones(2), "b": jnp.ones(2)})
    for n in "ab":
        pd[n].lr_mult = schedules.linear_warmup(1.0, 2, clock="own")
    pd["b"].frozen = True
    g = {"a": jnp.ones(2), "b": jnp.ones(2)}
    if driver == "trainer":
        trainer = lrmult.Trainer(pd, "sgd", {"learning_rate": 1.0})
        for k in range(6):
            if k == 3:
                pd["b"].frozen = False
            trainer.step(g)
    else:
        tx = lrmult.sgd(1.0, param_dict=pd)
        params, state = pd.tree(), tx.init(pd.tree())
        for k in range(6):
            if k == 3:
                pd["b"].frozen = False
                state = lrmult.refresh(state, pd)
            u, state = tx.update(g, state, params)
            params = optax.apply_updates(params, u)
        pd.select("a|b").setattr("frozen", False)
        for n in "ab":
            pd[n].set_data(params[n])
    # a: fractions 0, .5, 1, 1, 1, 1; b: steps 3, 4, 5 are its own 0, 1, 2
    np.testing.assert_allclose(pd["a"].data(), 1 - 4.5)
    np.testing.assert_allclose(pd["b"].data(), 1 - 1.5)
    assert pd["b"].lr_mult == schedules.linear_warmup(1.0, 2, start=3, clock="own")
