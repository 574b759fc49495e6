"""The optax level: transformations, ready chains in optax.chain / inject_hyperparams, refresh."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import step_counts

import lrmult
from lrmult import ParamDict
from lrmult.resync import find
from lrmult.transforms import MultState


def tree():
    return {"a": jnp.ones(2), "b": {"w": jnp.full((2, 2), 2.0, jnp.float32)}, "c": jnp.ones(3)}


def grads():
    return {
        "a": jnp.full(2, 0.5, jnp.float32),
        "b": {"w": jnp.ones((2, 2))},
        "c": jnp.full(3, -1.0, jnp.float32),
    }


def run(tx, params, g, steps=1):
    state = tx.init(params)
    for _ in range(steps):
        u, state = tx.update(g, state, params)
        params = optax.apply_updates(params, u)
    return params, state


def test_scale_by_lr_mult_composes_in_a_plain_optax_chain():
    pd = ParamDict.from_pytree(tree())
    pd["a"].lr_mult = 10.0
    tx = optax.chain(lrmult.scale_by_lr_mult(pd, lr_mult={"c": 0.5}), optax.sgd(0.1))
    new, _ = run(tx, tree(), grads())
    np.testing.assert_allclose(new["a"], 1 - 0.1 * 10 * 0.5)
    np.testing.assert_allclose(new["b"]["w"], 2 - 0.1 * 1.0)
    np.testing.assert_allclose(new["c"], 1 + 0.1 * 0.5)


def test_index_and_idx2name_overrides_without_a_param_dict():
    # MXNet Module style: the optimizer sees indices, idx2name gives their names
    params = [jnp.ones(2), jnp.ones(2), jnp.ones(2)]
    idx2name = {0: "fc1_weight", 1: "fc1_bias", 2: "fc2_weight"}
    tx = optax.chain(
        lrmult.scale_by_lr_mult(lr_mult={0: 2.0, "fc2_weight": 3.0}, idx2name=idx2name),
        optax.sgd(1.0),
    )
    new, _ = run(tx, params, [jnp.ones(2)] * 3)
    assert [float(p[0]) for p in new] == [1 - 2.0, 1 - 1.0, 1 - 3.0]


def test_add_decayed_weights_per_leaf_and_not_on_frozen():
    pd = ParamDict.from_pytree(tree())
    pd["a"].wd_mult = 0.0
    pd["c"].frozen = True
    tx = lrmult.add_decayed_weights(0.1, pd, wd_mult={"b/w": 3.0})
    state = tx.init(tree())
    zeros = jax.tree.map(jnp.zeros_like, tree())
    u, _ = tx.update(zeros, state, tree())
    np.testing.assert_allclose(u["a"], 0.0)
    np.testing.assert_allclose(u["b"]["w"], 0.1 * 3.0 * 2.0)
    np.testing.assert_allclose(u["c"], 0.0)


def test_standalone_scale_by_lr_mult_zeroes_a_frozen_leaf():
    pd = ParamDict.from_pytree(tree())
    pd["a"].frozen = True
    u, _ = lrmult.scale_by_lr_mult(pd).update(grads(), lrmult.scale_by_lr_mult(pd).init(tree()))
    np.testing.assert_array_equal(u["a"], np.zeros(2))


def test_init_refuses_unknown_and_shadowed_overrides():
    pd = ParamDict.from_pytree(tree())
    with pytest.raises(KeyError, match="did you mean 'b/w'"):
        lrmult.scale_by_lr_mult(pd, lr_mult={"b/W": 1.0}).init(tree())
    pd["a"].lr_mult = 0.3
    with pytest.raises(ValueError, match="'a'.*never act"):
        lrmult.sgd(0.1, param_dict=pd, lr_mult={"a": 2.0}).init(tree())
    with pytest.raises(ValueError, match="lr_mult"):
        lrmult.scale_by_lr_mult(pd, lr_mult={"a": -1})


def test_ready_chain_drops_frozen_state_and_zeroes_its_update():
    pd = ParamDict.from_pytree(tree())
    pd["b/w"].frozen = True
    tx = lrmult.adam(0.1, param_dict=pd)
    new, state = run(tx, tree(), grads(), steps=2)
    np.testing.assert_array_equal(new["b"]["w"], tree()["b"]["w"])
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    assert not any("'w'" in p for p in paths)


def test_refresh_after_setattr_changes_the_step_without_recompiling(compiles):
    pd = ParamDict.from_pytree(tree())
    tx = lrmult.sgd(0.1, param_dict=pd)
    params = tree()
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        u, state = tx.update(grads(), state, params)
        return optax.apply_updates(params, u), state

    params, state = step(params, state)
    counter = compiles()
    pd["c"].lr_mult = 4.0
    state = lrmult.refresh(state, pd)
    params2, state = step(params, state)
    assert counter() == 0
    np.testing.assert_allclose(params2["c"], params["c"] + 0.1 * 4.0)
    np.testing.assert_allclose(params2["a"], params["a"] - 0.1 * 0.5)


def test_refresh_is_idempotent_and_a_no_op_when_nothing_changed():
    pd = ParamDict.from_pytree(tree())
    pd["a"].lr_mult = 2.0
    tx = lrmult.adamw(0.1, param_dict=pd)
    _, state = run(tx, tree(), grads())
    again = lrmult.refresh(state, pd)
    assert jax.tree.structure(again) == jax.tree.structure(state)
    for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(again), strict=True):
        assert x is y
    twice = lrmult.refresh(again, pd)
    for x, y in zip(jax.tree.leaves(again), jax.tree.leaves(twice), strict=True):
        assert x is y


def test_refresh_restructures_when_the_frozen_set_changes():
    pd = ParamDict.from_pytree(tree())
    pd["c"].frozen = True
    tx = lrmult.adam(0.1, param_dict=pd)
    params, state = run(tx, tree(), grads(), steps=3)
    pd["c"].frozen = False
    pd["a"].frozen = True
    state = lrmult.refresh(state, pd)
    adam = state.inner[0]
    assert all(st.mu["a"] == lrmult.FrozenLeaf() for st in adam.states.values())  # no state
    assert step_counts(state, ["a", "b/w", "c"]) == {"b/w": 3, "c": 0}
    u, state = tx.update(grads(), state, params)
    # first Adam step of a fresh leaf: m_hat/sqrt(v_hat) = sign(g)
    np.testing.assert_allclose(u["c"], 0.1 * np.ones(3), rtol=1e-5)
    np.testing.assert_array_equal(u["a"], np.zeros(2))


def test_ready_chains_work_inside_inject_hyperparams(compiles):
    pd = ParamDict.from_pytree(tree())
    pd["a"].lr_mult = 3.0
    tx = optax.inject_hyperparams(lrmult.sgd)(learning_rate=0.1, param_dict=pd)
    state = tx.init(tree())
    update = jax.jit(tx.update)
    u, state = update(grads(), state, tree())
    np.testing.assert_allclose(u["a"], -0.1 * 3.0 * 0.5, rtol=1e-6)
    counter = compiles()
    state.hyperparams["learning_rate"] = jnp.asarray(0.2, jnp.float32)
    pd["a"].lr_mult = 1.0
    state = lrmult.refresh(state, pd)
    u, state = update(grads(), state, tree())
    assert counter() == 0
    np.testing.assert_allclose(u["a"], -0.2 * 0.5, rtol=1e-6)
    table = lrmult.explain(state)
    assert {r.name: r.lr for r in table}["a"] == pytest.approx(0.2)


def test_refresh_warns_once_for_an_override_shadowed_later():
    pd = ParamDict.from_pytree(tree())
    tx = lrmult.sgd(0.1, param_dict=pd, lr_mult={"a": 5.0})
    state = tx.init(tree())
    pd["a"].lr_mult = 2.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = lrmult.refresh(state, pd)
        state = lrmult.refresh(state, pd)
    assert len(caught) == 1 and "'a'" in str(caught[0].message)
    assert {r.name: (r.lr_mult, r.lr_source) for r in lrmult.explain(state, pd)}["a"] == (
        2.0,
        "param",
    )


def test_per_leaf_gives_each_leaf_its_own_count():
    tx = lrmult.per_leaf(optax.scale_by_adam())
    state = tx.init(tree())
    _, state = tx.update(grads(), state)
    assert step_counts(state, ["a", "b/w", "c"]) == {"a": 1, "b/w": 1, "c": 1}
    assert len(state.states) == 1  # leaves that started together share one count
    u, _ = tx.update(grads(), state)
    plain_u, _ = run_plain(optax.scale_by_adam(), grads(), 2)
    for x, y in zip(jax.tree.leaves(u), jax.tree.leaves(plain_u), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6)


def run_plain(tx, g, steps):
    state = tx.init(tree())
    for _ in range(steps):
        u, state = tx.update(g, state)
    return u, state


def test_explain_needs_a_multiplier_state():
    with pytest.raises(ValueError, match="scale_by_lr_mult"):
        lrmult.explain(optax.sgd(0.1).init(tree()))


def test_multipliers_are_float32_blocks_and_updates_keep_dtype():
    params = {"h": jnp.ones(4, jnp.bfloat16), "f": jnp.ones(4, jnp.float16)}
    pd = ParamDict.from_pytree(params)
    pd["h"].lr_mult = 0.5
    tx = lrmult.adamw(0.1, param_dict=pd)
    state = tx.init(params)
    mults = [m for _, m in find(state, MultState) if m.spec.attr == "lr_mult"]
    blocks = mults[0].values
    assert [(b.dtype, b.shape) for b in blocks] == [(jnp.float32, (lrmult.transforms.BLOCK,))]
    values = mults[0].tree(params)
    assert (float(values["f"]), float(values["h"])) == (1.0, 0.5)
    u, _ = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    assert u["h"].dtype == jnp.bfloat16 and u["f"].dtype == jnp.float16


def test_schedule_numbers_share_their_block_and_cost_no_buffer(compiles):
    # Three leaves in one block: a constant, a linear warmup and a cosine. The warmup's four
    # numbers and one reciprocal, the cosine's five and two, sit in rows below the constants,
    # in the leaves' own columns.
    params = {"a": jnp.ones(2), "b": jnp.ones(2), "c": jnp.ones(2)}
    pd = ParamDict.from_pytree(params)
    pd["a"].lr_mult = 0.5
    pd["b"].lr_mult = lrmult.schedules.linear_warmup(2.0, 4)
    pd["c"].lr_mult = lrmult.schedules.cosine(1.0, decay_steps=10, end=0.0)
    tx = lrmult.sgd(1.0, param_dict=pd)
    state = tx.init(params)
    (mults,) = [m for _, m in find(state, MultState) if m.spec.attr == "lr_mult"]
    (block,) = mults.values
    assert block.shape == (1 + (4 + 1) + (5 + 2), lrmult.transforms.BLOCK)
    assert np.asarray(block)[0, :3].tolist() == [0.5, 1.0, 1.0]  # constants; helpers scale 1.0
    # SGD, lr 1, gradient 1: each step moves a leaf by its multiplier at that step.
    # b: 2 * min(1, t / 4); c: cos decay 0.5 * (1 + cos(pi * t / 10)).
    step = jax.jit(tx.update)
    ones = jax.tree.map(jnp.ones_like, params)
    for t in range(3):
        u, state = step(ones, state, params)
        expected_c = 0.5 * (1 + np.cos(np.pi * t / 10))
        np.testing.assert_allclose(
            [float(u["a"][0]), float(u["b"][0]), float(u["c"][0])],
            [-0.5, -2.0 * t / 4, -expected_c],
            rtol=1e-6,
        )
    # Same shapes after a change of the helpers' numbers: the same compiled step.
    count = compiles()
    pd["b"].lr_mult = lrmult.schedules.linear_warmup(3.0, 8)
    u, state = step(ones, state, params)
    assert float(u["b"][0]) == pytest.approx(-3.0 * 3 / 8)
    assert count("update_fn") == 0
