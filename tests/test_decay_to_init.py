"""Decay toward the pretrained weights (L2-SP): `decay_to_init`, its w₀ in the state, its preset.

Expected numbers are hand arithmetic (written out in the comments, or transcribed as a few lines
of float64 NumPy) for an anchored and a non-anchored parameter side by side: the decay term is
`λ·d·(w − w₀)` for the first and `λ·d·w` for the second.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lrmult
from lrmult import ParamDict, Parameter, Trainer
from lrmult.lookup import Rows
from lrmult.resync import find
from lrmult.transforms import AnchorState

ONE = {"a": np.ones(1, np.float32), "b": np.ones(1, np.float32), "c": np.ones(1, np.float32)}
G1 = {n: np.ones(1, np.float32) for n in ONE}


def as_jax(tree):
    return jax.tree.map(jnp.asarray, tree)


def optax_run(tx, params, grads, steps):
    """The parameters after `steps` eager updates with the same gradients, and the state."""
    params, grads = as_jax(params), as_jax(grads)
    state = tx.init(params)
    for _ in range(steps):
        u, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, u)
    return params, state


def trainer_run(pd, optimizer, opts, grads, steps):
    trainer = Trainer(pd, optimizer, opts)
    for _ in range(steps):
        trainer.step(as_jax(grads))
    return {n: p.data() for n, p in pd.items()}, trainer


def anchors_of(state):
    """`{keystr path: array}` of the w₀ arrays a state keeps (a group of layers: its rows)."""
    return {
        k: x.value if isinstance(x, Rows) else x
        for _, node in find(state, AnchorState)
        for k, x in node.anchors.items()
    }


def close(got, want, rtol=2e-6):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=1e-7)


def side_by_side():
    """`a` anchored, `b` decayed toward zero, `c` anchored with wd_mult 0; all start at 1."""
    pd = ParamDict.from_pytree(as_jax(ONE))
    pd["a"].decay_to_init = True
    pd["c"].decay_to_init = True
    pd["c"].wd_mult = 0.0
    return pd


# -- numbers by hand: SGD, Adam, AdamW, both paths -------------------------------------------------


@pytest.mark.parametrize("path", ["optax", "trainer"])
def test_sgd_momentum_three_steps_toward_w0_and_toward_zero(path):
    # η 0.1, μ 0.9, λ 0.5, g 1, w₀ 1; d = g + λ·(w − w₀) (anchored) or g + λ·w; buf = μ·buf + d.
    # a: d 1, buf 1, w 0.9 | d 0.95, buf 1.85, w 0.715 | d 0.8575, buf 2.5225, w 0.46275
    # b: d 1.5, buf 1.5, w 0.85 | d 1.425, buf 2.775, w 0.5725 | d 1.28625, buf 3.78375,
    #    w 0.194125
    # c (wd_mult 0: no pull): buf 1, 1.9, 2.71: w 0.9, 0.71, 0.439
    pd = side_by_side()
    if path == "optax":
        tx = lrmult.sgd(0.1, momentum=0.9, weight_decay=0.5, param_dict=pd)
        got, _ = optax_run(tx, ONE, G1, 3)
    else:
        opts = {"learning_rate": 0.1, "momentum": 0.9, "wd": 0.5}
        got, _ = trainer_run(pd, "sgd", opts, G1, 3)
    close(got["a"], [0.46275])
    close(got["b"], [0.194125])
    close(got["c"], [0.439])


def adam_by_hand(anchored, decoupled, steps=2, eta=0.1, lam=1.0, b1=0.9, b2=0.999, eps=1e-8):
    """Two Adam(W) steps of one scalar with w = w₀ = 1 and g = 1, in float64."""
    w, w0, m, v = 1.0, 1.0, 0.0, 0.0
    target = w0 if anchored else 0.0
    for t in range(1, steps + 1):
        g = 1.0 if decoupled else 1.0 + lam * (w - target)
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        step = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        if decoupled:
            step += lam * (w - target)
        w -= eta * step
    return w


def test_adam_by_hand_transcription_gives_the_hand_numbers():
    # Coupled, anchored: g' 1, then 1 + (0.9 - 1) = 0.9; m 0.18, v 0.001809:
    # w = 0.9 - 0.1 · (0.18 / 0.19) / sqrt(0.001809 / 0.001999) = 0.800412...
    assert abs(adam_by_hand(True, False) - 0.8004122) < 1e-6
    # Decoupled: adam(g) is 1 at both steps (g constant); anchored: decay 0 then -0.1:
    # w = 0.9, then 0.9 - 0.1 · 0.9 = 0.81; plain: 1 - 0.2 = 0.8, then 0.8 - 0.1 · 1.8 = 0.62.
    assert abs(adam_by_hand(True, True) - 0.81) < 1e-6
    assert abs(adam_by_hand(False, True) - 0.62) < 1e-6


@pytest.mark.parametrize("path", ["optax", "trainer"])
@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_and_adamw_two_steps_toward_w0_and_toward_zero(name, path):
    pd = side_by_side()
    decoupled = name == "adamw"
    if path == "optax":
        tx = getattr(lrmult, name)(0.1, weight_decay=1.0, param_dict=pd)
        got, _ = optax_run(tx, ONE, G1, 2)
    else:
        got, _ = trainer_run(pd, name, {"learning_rate": 0.1, "wd": 1.0}, G1, 2)
    close(got["a"], [adam_by_hand(True, decoupled)], rtol=1e-5)
    close(got["b"], [adam_by_hand(False, decoupled)], rtol=1e-5)
    close(got["c"], [adam_by_hand(True, decoupled, lam=0.0)], rtol=1e-5)  # wd_mult 0


def test_without_weight_decay_nothing_pulls_and_no_w0_is_kept():
    pd = side_by_side()
    tx = lrmult.sgd(0.1, momentum=0.9, param_dict=pd)  # λ = 0: no decay link at all
    got, state = optax_run(tx, ONE, G1, 3)
    assert find(state, AnchorState) == []
    for n in ONE:
        close(got[n], [0.439])  # plain momentum SGD, as c above


# -- memory: w₀ only where it is used ------------------------------------------------------------


def test_w0_is_kept_only_for_anchored_trainable_parameters():
    pd = side_by_side()
    pd["c"].frozen = True  # anchored but frozen: no state, no decay
    tx = lrmult.adam(0.1, weight_decay=1.0, param_dict=pd)
    state = tx.init(as_jax(ONE))
    kept = anchors_of(state)
    assert list(kept) == ["['a']"]
    np.testing.assert_array_equal(kept["['a']"], ONE["a"])
    _, trainer = trainer_run(pd, "adam", {"wd": 1.0}, G1, 1)
    assert list(anchors_of(trainer.opt_state)) == ["['a']"]
    # Positions not anchored are not in the node at all (no MaskedNode placeholders): a step's
    # flatten and unflatten of the anchors cost one entry per anchored parameter.
    ((_, node),) = find(state, AnchorState)
    assert jax.tree_util.tree_structure(node).num_nodes == 3  # node, its dict, w₀ of 'a'
    np.testing.assert_array_equal(pd["c"].data(), ONE["c"])


def test_stacked_leaf_is_anchored_whole_and_frozen_layers_get_no_decay():
    w0 = np.arange(8, dtype=np.float32).reshape(4, 2)
    pd = ParamDict.from_pytree({"layers": {"w": jnp.asarray(w0)}}, stacked={"layers": 1})
    pd["layers/w"].decay_to_init = True
    pd.select("layers/[01]/").setattr("frozen", True)
    g = {"layers": {"w": jnp.ones((4, 2))}}
    tx = lrmult.sgd(0.1, weight_decay=0.5, param_dict=pd)
    params = {"layers": {"w": jnp.asarray(w0)}}
    state = tx.init(params)
    # One copy of the trainable layers 2 and 3 only.
    (kept,) = anchors_of(state).values()
    np.testing.assert_array_equal(kept, w0[2:])
    for _ in range(2):
        u, state = tx.update(g, state, params)
        params = optax.apply_updates(params, u)
    # Layers 2, 3: w₀ - 0.1, then - 0.1 · (1 + 0.5 · (-0.1)) = - 0.095: w₀ - 0.195.
    np.testing.assert_allclose(params["layers"]["w"][2:], w0[2:] - 0.195, rtol=1e-6)
    np.testing.assert_array_equal(params["layers"]["w"][:2], w0[:2])  # frozen layers


def test_decay_to_init_is_for_whole_parameters_not_layers():
    pd = ParamDict.from_pytree(
        {"layers": {"w": jnp.ones((4, 2))}, "head": jnp.ones(2)}, stacked={"layers": 1}
    )
    with pytest.raises(ValueError, match=r"'layers/w'.*layers \[0, 1\].*whole stack"):
        pd.select("layers/[01]/|head").setattr("decay_to_init", True)
    assert not pd["head"].is_set("decay_to_init")  # nothing changed
    with pytest.raises(ValueError, match=r"'layers/w'.*whole parameter"):
        pd["layers/w"].decay_to_init = np.array([True, False, True, False])
    assert not pd["layers/w"].is_set("decay_to_init")


# -- build from shapes ----------------------------------------------------------------------------


def test_eval_shape_and_jit_init_build_the_same_state():
    pd = side_by_side()
    tx = lrmult.adamw(0.1, weight_decay=1.0, param_dict=pd)
    params = as_jax(ONE)
    eager = tx.init(params)
    shapes = jax.eval_shape(tx.init, params)
    jitted = jax.jit(tx.init)(params)
    assert jax.tree.structure(shapes) == jax.tree.structure(eager) == jax.tree.structure(jitted)
    assert [x.shape for x in anchors_of(shapes).values()] == [(1,), (1,)]
    for x, y in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager), strict=True):
        np.testing.assert_array_equal(x, y)
    # Under jit, w₀ is the value passed in.
    moved = jax.jit(tx.init)(as_jax({n: 2 * v for n, v in ONE.items()}))
    np.testing.assert_array_equal(anchors_of(moved)["['a']"], [2.0])
    u1, _ = tx.update(as_jax(G1), eager, params)
    u2, _ = jax.jit(tx.update)(as_jax(G1), jitted, params)
    for n in ONE:
        np.testing.assert_allclose(u1[n], u2[n], rtol=1e-6)  # XLA may fuse differently


def test_w0_is_a_copy_the_trainer_may_donate_the_parameter_buffer():
    pd = side_by_side()
    _, trainer = trainer_run(pd, "sgd", {"learning_rate": 0.1, "wd": 0.5}, G1, 3)
    np.testing.assert_array_equal(anchors_of(trainer.opt_state)["['a']"], [1.0])


# -- a changed anchored set ------------------------------------------------------------------------


def test_a_changed_anchored_set_raises_at_the_optax_level_until_refresh():
    pd = side_by_side()
    tx = lrmult.sgd(0.1, momentum=0.9, weight_decay=0.5, param_dict=pd)
    params, state = optax_run(tx, ONE, G1, 1)  # b: 0.85
    pd["b"].decay_to_init = True
    g = as_jax(G1)
    for update in (tx.update, jax.jit(tx.update)):
        with pytest.raises(
            ValueError, match=r"parameter 'b'.*decay_to_init=False.*lrmult\.refresh"
        ):
            update(g, state, params)
    state = lrmult.refresh(state, pd, params=params)
    kept = anchors_of(state)
    np.testing.assert_array_equal(kept["['b']"], params["b"])  # its value now
    np.testing.assert_array_equal(kept["['a']"], [1.0])  # kept
    u, state = tx.update(g, state, params)
    # b: d = 1 + 0.5 · 0 = 1, buf 0.9 · 1.5 + 1 = 2.35 (carried over), w = 0.85 - 0.235
    close(params["b"] + u["b"], [0.615])
    pd["b"].decay_to_init = False
    state = lrmult.refresh(state, pd)
    assert list(anchors_of(state)) == ["['a']", "['c']"]  # b's w₀ dropped
    # Without params=, a newly anchored parameter takes its Parameter's value: at the optax
    # level, the one the ParamDict was built with (1), not the trained one.
    pd["b"].decay_to_init = True
    np.testing.assert_array_equal(anchors_of(lrmult.refresh(state, pd))["['b']"], [1.0])


def test_refresh_refuses_params_that_do_not_fit_naming_the_leaf():
    pd = side_by_side()
    tx = lrmult.sgd(0.1, weight_decay=0.5, param_dict=pd)
    params, state = optax_run(tx, ONE, G1, 1)
    pd["b"].decay_to_init = True
    with pytest.raises(ValueError, match=r"'b'.*shape"):
        lrmult.refresh(state, pd, params={**params, "b": jnp.ones(3)})
    with pytest.raises(KeyError, match=r"no leaf 'b'"):
        lrmult.refresh(state, pd, params={"a": params["a"], "c": params["c"]})


def test_explain_at_the_optax_level_marks_a_stale_anchored_set():
    pd = side_by_side()
    state = lrmult.sgd(0.1, weight_decay=0.5, param_dict=pd).init(as_jax(ONE))
    rows = {r.name: r for r in lrmult.explain(state)}
    assert (rows["a"].decay_to_init, rows["a"].decay_to_init_source) == (True, "param")
    assert (rows["b"].decay_to_init, rows["b"].decay_to_init_source) == (False, "default")
    pd["a"].decay_to_init = False
    with pytest.warns(UserWarning, match=r"first: 'a'.*lrmult\.refresh"):
        rows = {r.name: r for r in lrmult.explain(state, pd)}
    assert (rows["a"].decay_to_init, rows["a"].decay_to_init_source) == (True, "state")


def test_trainer_restructures_for_a_new_anchored_set_and_carries_state_over():
    pd = ParamDict.from_pytree(as_jax({"a": ONE["a"], "b": ONE["b"]}))
    trainer = Trainer(pd, "sgd", {"learning_rate": 0.1, "momentum": 0.9, "wd": 0.5})
    g = as_jax({"a": G1["a"], "b": G1["b"]})
    trainer.step(g)  # both toward zero: 0.85
    pd["b"].decay_to_init = True  # w₀ = 0.85, taken at the next step
    trainer.step(g)
    trainer.step(g)
    np.testing.assert_array_equal(anchors_of(trainer.opt_state)["['b']"], [np.float32(0.85)])
    pd["b"].decay_to_init = False
    trainer.step(g)
    assert anchors_of(trainer.opt_state) == {}
    # b (momentum carried over each time): d 1.5, buf 1.5, w 0.85 | d 1, buf 2.35, w 0.615 |
    # d 1 - 0.1175 = 0.8825, buf 2.115 + 0.8825 = 2.9975, w 0.31525 | toward zero again:
    # d 1.157625, buf 2.69775 + 1.157625 = 3.855375, w -0.0702875
    close(pd["b"].data(), [-0.0702875], rtol=1e-5)
    # a, toward zero throughout: 0.85, 0.5725, 0.194125, then d 1.0970625,
    # buf 3.405375 + 1.0970625 = 4.5024375, w -0.25611875
    close(pd["a"].data(), [-0.25611875], rtol=1e-5)


def test_trainer_change_of_anchored_set_compiles_once_per_distinct_set(compiles):
    pd = side_by_side()
    trainer = Trainer(pd, "sgd", {"learning_rate": 0.1, "momentum": 0.9, "wd": 0.5})
    g = as_jax(G1)
    trainer.step(g)
    pd["b"].decay_to_init = True
    trainer.step(g)
    pd["b"].decay_to_init = False
    count = compiles()
    trainer.step(g)  # back to the first set: its compiled step is reused
    pd["b"].wd_mult = 2.0  # a multiplier: no recompile either
    trainer.step(g)
    assert count("lrmult_apply_step") == 0


# -- checkpoints -----------------------------------------------------------------------------------


def test_save_and_load_mid_run_resume_bit_for_bit_with_w0_restored(tmp_path):
    k = jax.random.split(jax.random.PRNGKey(0), 2)
    init = {"body": jax.random.normal(k[0], (3, 4)), "head": jax.random.normal(k[1], (4,))}
    grads = [
        jax.tree.map(lambda x, i=i: jnp.sin(x * (i + 1)), init) for i in range(6)
    ]  # any fixed gradients

    def build(tree):
        pd = ParamDict.from_pytree(tree)
        trainer = Trainer(pd, "adamw", {"learning_rate": 0.05, "wd": 0.3})
        return pd, trainer

    pd, trainer = build(init)
    lrmult.presets.decay_to_init(pd, exclude="head")
    for g in grads[:3]:
        trainer.step(g)
    pd.save(tmp_path / "params")
    trainer.save_states(tmp_path / "trainer")
    for g in grads[3:]:
        trainer.step(g)
    want = {n: np.asarray(p.data()) for n, p in pd.items()}

    # A fresh Trainer over other values and no decay_to_init: everything comes from the files.
    pd2, trainer2 = build(jax.tree.map(jnp.zeros_like, init))
    pd2.load(tmp_path / "params")
    trainer2.load_states(tmp_path / "trainer")
    assert pd2["body"].decay_to_init and pd2["body"].origin("decay_to_init") == (
        "preset:decay_to_init"
    )
    assert not pd2["head"].is_set("decay_to_init")
    np.testing.assert_array_equal(anchors_of(trainer2.opt_state)["['body']"], init["body"])
    for g in grads[3:]:
        trainer2.step(g)
    for n in want:
        np.testing.assert_array_equal(pd2[n].data(), want[n])


def test_describe_and_metadata_keep_decay_to_init():
    pd = side_by_side()
    saved = {d["name"]: d for d in pd.describe()}
    assert saved["a"]["decay_to_init"] is True and saved["b"]["decay_to_init"] is None
    p = Parameter(jnp.ones(1), name="p")
    p.restore_metadata(saved["a"])
    assert p.decay_to_init and p.origin("decay_to_init") == "param"
    old = {k: v for k, v in saved["a"].items() if k != "decay_to_init"}  # an older checkpoint
    p.restore_metadata(old)
    assert not p.is_set("decay_to_init")


# -- the Parameter attribute and the preset --------------------------------------------------------


@pytest.mark.parametrize("bad", [1, "yes", 0.0, [True]])
def test_decay_to_init_refuses_non_bools_naming_the_parameter_and_changes_nothing(bad):
    p = Parameter(jnp.ones(2), name="enc/W", decay_to_init=True)
    with pytest.raises(ValueError, match=r"'enc/W'.*decay_to_init must be True or False"):
        p.decay_to_init = bad
    assert p.decay_to_init and p.origin("decay_to_init") == "param"
    with pytest.raises(ValueError, match=r"'x'.*decay_to_init"):
        Parameter(jnp.ones(2), name="x", decay_to_init="yes")
    with pytest.raises(ValueError, match=r"decay_to_init must be True or False"):
        ParamDict({"enc/W": p}).setattr("decay_to_init", bad)


def test_decay_to_init_is_shown_and_unset_like_the_others():
    p = Parameter(jnp.ones(2), name="w")
    assert p.decay_to_init is False and not p.is_set("decay_to_init")
    p.decay_to_init = np.bool_(True)
    assert p.decay_to_init is True and "decay_to_init=True" in repr(p)
    pd = ParamDict({"w": p})
    assert [r.decay_to_init for r in pd.table()] == ["True"]
    del p.decay_to_init
    assert [r.decay_to_init for r in pd.table()] == ["-"]


def test_preset_anchors_all_but_the_excluded_and_names_itself_in_explain():
    tree = {"body": {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}, "head": {"w": jnp.ones((2, 1))}}
    pd = ParamDict.from_pytree(tree)
    changed = lrmult.presets.decay_to_init(pd, exclude="head/")
    assert list(changed) == ["body/b", "body/w"]
    assert all(changed[n] is pd[n] for n in changed)  # shares the Parameters
    rows = {r.name: r for r in Trainer(pd, "adamw").explain()}
    assert rows["body/w"].decay_to_init and rows["body/w"].decay_to_init_source == (
        "preset:decay_to_init"
    )
    assert not rows["head/w"].decay_to_init and rows["head/w"].decay_to_init_source == "default"
    assert "preset:decay_to_init" in str(Trainer(pd, "sgd").explain())
    assert list(lrmult.presets.decay_to_init(pd.select("head/"))) == ["head/w"]


def test_preset_refusals_change_nothing():
    tree = {"layers": {"w": jnp.ones((3, 2))}, "head": jnp.ones(2)}
    pd = ParamDict.from_pytree(tree, stacked={"layers": 1})
    with pytest.raises(ValueError, match="matches every parameter"):
        lrmult.presets.decay_to_init(pd, exclude=".*")
    with pytest.raises(ValueError, match=r"some layers of the stack 'layers/w'"):
        lrmult.presets.decay_to_init(pd, exclude="layers/0/")
    with pytest.raises(ValueError, match="matches no parameter"):
        lrmult.presets.decay_to_init(pd, exclude="nothing")
    with pytest.raises(ValueError, match=r"'layers/w'.*whole stack"):
        lrmult.presets.decay_to_init(pd.select("head|layers/[01]/"))
    with pytest.raises(TypeError, match="ParamDict"):
        lrmult.presets.decay_to_init({"head": pd["head"]})
    assert not any(p.is_set("decay_to_init") for p in pd.values())


# -- flax nnx.Optimizer ----------------------------------------------------------------------------


class Lin(nnx.Module):
    def __init__(self):
        self.lin = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
        self.lin.kernel[...] = jnp.array([[1.0], [2.0]])
        self.lin.bias[...] = jnp.array([0.5])


@nnx.jit
def nnx_step(model, optimizer):
    def mse(m):
        return jnp.mean(m.lin(jnp.ones((1, 2))) ** 2)

    optimizer.update(model, nnx.grad(mse)(model))


def test_nnx_optimizer_decays_toward_w0_and_refresh_optimizer_takes_the_models_values():
    model = Lin()
    params = lrmult.from_nnx(model)
    params["lin/kernel"].decay_to_init = True
    tx = lrmult.sgd(0.1, weight_decay=0.5, param_dict=params)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    nnx_step(model, optimizer)
    # Prediction 3.5, gradient 7: kernel - 0.1 · 7 (no pull at w₀); bias - 0.1 · (7 + 0.25).
    np.testing.assert_allclose(model.lin.kernel[...], [[0.3], [1.3]], rtol=1e-6)
    np.testing.assert_allclose(model.lin.bias[...], [-0.225], rtol=1e-6)
    nnx_step(model, optimizer)
    # Prediction 1.375, gradient 2.75: kernel - 0.1 · (2.75 - 0.35) = - 0.24;
    # bias - 0.1 · (2.75 - 0.1125).
    np.testing.assert_allclose(model.lin.kernel[...], [[0.06], [1.06]], rtol=1e-5)
    np.testing.assert_allclose(model.lin.bias[...], [-0.48875], rtol=1e-5)
    params["lin/bias"].decay_to_init = True
    with pytest.raises(ValueError, match=r"'lin/bias'.*refresh_optimizer"):
        nnx_step(model, optimizer)
    lrmult.refresh_optimizer(optimizer, params, params=nnx.state(model, nnx.Param))
    kept = anchors_of(nnx.as_pure(optimizer.opt_state))
    np.testing.assert_allclose(kept["['lin']['bias']"], [-0.48875], rtol=1e-6)
    nnx_step(model, optimizer)
    # Prediction 0.06 + 1.06 - 0.48875 = 0.63125, gradient 1.2625; the bias is at its w₀.
    np.testing.assert_allclose(model.lin.bias[...], [-0.48875 - 0.12625], rtol=1e-5)
