"""Trainer behaviour: no recompilation, donation, frozen is structural, errors leave no trace."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import step_counts

import lrmult
from lrmult import ParamDict, Trainer


def mlp_tree(key=0):
    k = jax.random.split(jax.random.PRNGKey(key), 3)
    return {
        "l1": {"W": jax.random.normal(k[0], (3, 8)), "b": jnp.zeros(8)},
        "l2": {"W": jax.random.normal(k[1], (8, 8)), "b": jnp.zeros(8)},
        "out": {"W": jax.random.normal(k[2], (8, 1)), "b": jnp.zeros(1)},
    }


def mlp_loss(p, x, y):
    h = jnp.tanh(x @ p["l1"]["W"] + p["l1"]["b"])
    h = jnp.tanh(h @ p["l2"]["W"] + p["l2"]["b"])
    return jnp.mean((h @ p["out"]["W"] + p["out"]["b"] - y) ** 2)


X = jnp.linspace(-1, 1, 30).reshape(10, 3)
Y = jnp.sin(X.sum(1, keepdims=True))


def state_paths(state):
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw", "lamb"])
def test_changing_multipliers_overrides_and_lr_never_recompiles(optimizer, compiles):
    pd = ParamDict.from_pytree(mlp_tree())
    trainer = Trainer(
        pd,
        optimizer,
        {"learning_rate": 0.01, "wd": 1e-3, "momentum": 0.9}
        if optimizer == "sgd"
        else {"learning_rate": 0.01, "wd": 1e-3},
    )
    trainer.train_step(mlp_loss, X, Y)
    grads = jax.tree.map(jnp.ones_like, pd.tree())
    trainer.step(grads)
    counter = compiles()
    before = pd.arrays()
    for k in range(3):
        pd["l1/W"].lr_mult = 0.5 + k
        pd.select(".*b$").setattr("wd_mult", 0.1 * k)
        trainer.set_lr_mult({"l2/W": 2.0 + k})
        trainer.set_wd_mult({4: 3.0})
        trainer.set_learning_rate(0.001 * (k + 1))
        trainer.train_step(mlp_loss, X, Y)
        trainer.step(grads, batch_size=4)
    assert counter() == 0
    assert all(not np.array_equal(before[n], v) for n, v in pd.arrays().items())


def test_frozen_toggle_compiles_once_per_distinct_set(compiles):
    """A frozen set seen before reuses its executable. Unfreezing puts the leaves in a new
    cohort with their own step count (a state of its own shape), so a set is "seen" with the
    cohorts it has: toggling the same leaves back and forth compiles twice, then never."""
    pd = ParamDict.from_pytree(mlp_tree())
    trainer = Trainer(pd, "adam", {"learning_rate": 0.01})
    trainer.train_step(mlp_loss, X, Y)
    counter = compiles()
    pd.select("l1").setattr("frozen", True)
    trainer.train_step(mlp_loss, X, Y)
    assert counter("lrmult_train_step") == 1
    pd.select("l1").setattr("frozen", False)  # l1 back, in a cohort of its own
    trainer.train_step(mlp_loss, X, Y)
    assert counter("lrmult_train_step") == 2
    for _ in range(3):
        pd.select("l1").setattr("frozen", True)
        trainer.train_step(mlp_loss, X, Y)
        pd.select("l1").setattr("frozen", False)
        trainer.train_step(mlp_loss, X, Y)
    assert counter("lrmult_train_step") == 2


def test_sgd_frozen_toggle_back_to_the_first_set_is_cached(compiles):
    pd = ParamDict.from_pytree(mlp_tree())
    trainer = Trainer(pd, "sgd", {"learning_rate": 0.01, "momentum": 0.9})
    trainer.train_step(mlp_loss, X, Y)
    counter = compiles()
    pd.select("l1").setattr("frozen", True)
    trainer.train_step(mlp_loss, X, Y)
    pd.select("l1").setattr("frozen", False)
    trainer.train_step(mlp_loss, X, Y)
    assert counter("lrmult_train_step") == 1  # no step counts: the first set's state again


def test_frozen_leaf_has_no_state_and_unfrozen_leaf_gets_fresh_state():
    pd = ParamDict.from_pytree(mlp_tree())
    pd["l2/W"].frozen = True
    trainer = Trainer(pd, "adam", {"learning_rate": 0.01})
    assert not any("l2/W" in p for p in state_paths(trainer.opt_state))
    for _ in range(3):
        trainer.train_step(mlp_loss, X, Y)
    pd["l2/W"].frozen = False
    trainer.train_step(mlp_loss, X, Y)
    counts = step_counts(trainer.opt_state, sorted(pd))
    assert counts["l2/W"] == 1 and counts["l1/W"] == 4
    assert any("'l2/W'" in p for p in state_paths(trainer.opt_state))  # it has state now


def test_frozen_leaf_gradient_is_never_computed():
    traced = []

    @jax.custom_vjp
    def spy(w):
        return w

    def fwd(w):
        return w, None

    def bwd(_, g):
        traced.append(True)
        return (g,)

    spy.defvjp(fwd, bwd)
    pd = ParamDict.from_pytree({"frozen": jnp.ones(3), "live": jnp.ones(3)})
    pd["frozen"].frozen = True

    def loss(p):
        return jnp.sum(spy(p["frozen"]) * p["live"])

    trainer = Trainer(pd, "sgd", {"learning_rate": 0.1})
    trainer.train_step(loss)
    assert traced == []
    np.testing.assert_allclose(pd["live"].data(), 1 - 0.1 * np.ones(3))
    pd["frozen"].frozen = False
    trainer.train_step(loss)
    assert traced == [True]


def test_frozen_leaf_takes_no_part_in_global_norm_clipping():
    pd = ParamDict.from_pytree({"big": jnp.zeros(4), "small": jnp.zeros(3)})
    pd["big"].frozen = True
    trainer = Trainer(pd, "sgd", {"learning_rate": 1.0, "clip_global_norm": 1.0})
    trainer.step({"big": jnp.full(4, 100.0), "small": jnp.array([0.3, 0.4, 0.0])})
    # ||small|| = 0.5 < 1: unclipped. Had 'big' counted, the norm would be 200 and small ×1/200.
    np.testing.assert_allclose(pd["small"].data(), [-0.3, -0.4, 0.0], rtol=1e-6)
    trainer.step({"big": jnp.full(4, 100.0), "small": jnp.array([3.0, 4.0, 0.0])})
    np.testing.assert_allclose(pd["small"].data(), [-0.9, -1.2, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(pd["big"].data(), np.zeros(4))


def test_element_wise_clip_gradient_before_weight_decay():
    pd = ParamDict.from_pytree({"w": jnp.array([1.0, 1.0])})
    trainer = Trainer(pd, "sgd", {"learning_rate": 1.0, "clip_gradient": 0.5, "wd": 0.1})
    trainer.step({"w": jnp.array([2.0, -0.2])})
    # MXNet: g = clip(g, -0.5, 0.5) + wd*w
    np.testing.assert_allclose(pd["w"].data(), [1 - (0.5 + 0.1), 1 - (-0.2 + 0.1)], rtol=1e-6)


def test_lr_mult_zero_is_not_frozen_state_advances():
    pd = ParamDict.from_pytree({"a": jnp.ones(2), "b": jnp.ones(2)})
    pd["a"].lr_mult = 0.0
    trainer = Trainer(pd, "sgd", {"learning_rate": 0.1, "momentum": 0.9})
    for _ in range(2):
        trainer.step({"a": jnp.ones(2), "b": jnp.ones(2)})
    np.testing.assert_array_equal(pd["a"].data(), np.ones(2))
    traces = [
        leaf
        for p, leaf in jax.tree_util.tree_flatten_with_path(trainer.opt_state)[0]
        if "trace" in jax.tree_util.keystr(p) and "'a'" in jax.tree_util.keystr(p)
    ]
    np.testing.assert_allclose(traces[0], [1.9, 1.9], rtol=1e-6)  # buf = 0.9*1 + 1
    pd["a"].lr_mult = 1.0
    trainer.step({"a": jnp.ones(2), "b": jnp.ones(2)})
    np.testing.assert_allclose(pd["a"].data(), 1 - 0.1 * (0.9 * 1.9 + 1), rtol=1e-6)


def test_user_arrays_stay_valid_and_can_seed_two_param_dicts():
    tree = mlp_tree()
    a = ParamDict.from_pytree(tree)
    b = ParamDict.from_pytree(tree)
    ta = Trainer(a, "adam", {"learning_rate": 0.01})
    tb = Trainer(b, "sgd", {"learning_rate": 0.01})
    for _ in range(3):
        ta.train_step(mlp_loss, X, Y)
        tb.train_step(mlp_loss, X, Y)
    snapshot = a["l1/W"].data()
    ta.train_step(mlp_loss, X, Y)
    for leaf in jax.tree.leaves(tree):
        assert not leaf.is_deleted()
        np.asarray(leaf)
    np.asarray(snapshot)  # read by the user through data(): still valid after a step
    assert not np.array_equal(snapshot, a["l1/W"].data())


def test_trainer_donates_its_own_buffers():
    pd = ParamDict.from_pytree({"w": jnp.ones(1000)})
    trainer = Trainer(pd, "sgd", {"learning_rate": 0.1})
    trainer.step({"w": jnp.ones(1000)})
    produced = pd["w"].peek()  # produced by the Trainer, never handed to the user
    trainer.step({"w": jnp.ones(1000)})
    if jax.default_backend() in ("cpu", "gpu", "tpu"):
        assert produced.is_deleted()


def test_step_accepts_a_tree_or_a_name_dict_and_rescales_by_batch_size():
    pd = ParamDict.from_pytree({"a": {"w": jnp.zeros(2)}, "b": jnp.zeros(1)})
    trainer = Trainer(pd, "sgd", {"learning_rate": 1.0})
    trainer.step({"a": {"w": jnp.ones(2)}, "b": jnp.ones(1)}, batch_size=4)
    np.testing.assert_allclose(pd["a/w"].data(), [-0.25, -0.25])
    trainer.step({"a/w": jnp.ones(2), "b": jnp.ones(1)}, batch_size=2)
    np.testing.assert_allclose(pd["b"].data(), [-0.75])


def test_every_named_optimizer_trains():
    for name in lrmult.optimizers.OPTIMIZERS:
        pd = ParamDict.from_pytree(mlp_tree())
        pd["l1/b"].frozen = True
        trainer = Trainer(pd, name, {"learning_rate": 0.01})
        first = float(trainer.train_step(mlp_loss, X, Y))
        for _ in range(30):
            last = float(trainer.train_step(mlp_loss, X, Y))
        assert last < first, name
        np.testing.assert_array_equal(pd["l1/b"].data(), np.zeros(8))


def test_custom_optax_transformation_with_trainer_learning_rate():
    pd = ParamDict.from_pytree({"w": jnp.zeros(2), "v": jnp.zeros(2)})
    pd["v"].lr_mult = 3.0
    trainer = Trainer(pd, optax.scale_by_sign(), {"learning_rate": 0.5})
    trainer.step({"w": jnp.array([2.0, -3.0]), "v": jnp.array([1.0, 1.0])})
    np.testing.assert_allclose(pd["w"].data(), [-0.5, 0.5])
    np.testing.assert_allclose(pd["v"].data(), [-1.5, -1.5])
    trainer.set_learning_rate(0.1)
    assert trainer.learning_rate == pytest.approx(0.1)


def test_custom_transformation_owning_its_rate_refuses_set_learning_rate():
    pd = ParamDict.from_pytree({"w": jnp.zeros(2)})
    trainer = Trainer(pd, optax.sgd(0.1))
    trainer.step({"w": jnp.ones(2)})
    np.testing.assert_allclose(pd["w"].data(), [-0.1, -0.1])
    assert trainer.learning_rate is None
    with pytest.raises(ValueError, match="owns its learning rate"):
        trainer.set_learning_rate(0.2)


def test_train_step_returns_loss_and_aux():
    pd = ParamDict.from_pytree({"w": jnp.array([2.0])})
    trainer = Trainer(pd, "sgd", {"learning_rate": 0.25})

    def loss(p):
        return jnp.sum(p["w"] ** 2), {"w_before": p["w"]}

    value, aux = trainer.train_step(loss, has_aux=True)
    assert float(value) == 4.0 and float(aux["w_before"][0]) == 2.0
    np.testing.assert_allclose(pd["w"].data(), [2 - 0.25 * 4])


# -- errors leave everything as it was ---------------------------------------------------------


def snapshot(trainer):
    return (
        {n: np.asarray(v) for n, v in trainer.params.arrays().items()},
        [np.asarray(x) for x in jax.tree.leaves(trainer.opt_state)],
    )


def assert_same(a, b):
    for x, y in zip(a[0].values(), b[0].values(), strict=True):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(a[1], b[1], strict=True):
        np.testing.assert_array_equal(x, y)


BAD_CALLS = {
    "batch_size zero": (lambda t, g: t.step(g, batch_size=0), ValueError, "batch_size"),
    "batch_size str": (lambda t, g: t.step(g, batch_size="4"), TypeError, "batch_size"),
    "missing leaf": (
        lambda t, g: t.step({k: v for k, v in g.items() if k != "l2/W"}),
        KeyError,
        "l2/W",
    ),
    "wrong shape": (lambda t, g: t.step({**g, "l1/b": jnp.ones(3)}), ValueError, "l1/b"),
    "wrong dtype": (
        lambda t, g: t.step({**g, "out/b": jnp.ones(1, jnp.bfloat16)}),
        ValueError,
        "out/b",
    ),
    "non-scalar loss": (
        lambda t, g: t.train_step(lambda p, x, y: x @ p["l1"]["W"], X, Y),
        TypeError,
        "scalar",
    ),
    "lr negative": (lambda t, g: t.set_learning_rate(-1.0), ValueError, "learning rate"),
    "lr nan": (lambda t, g: t.set_learning_rate(float("nan")), ValueError, "learning rate"),
    "override typo": (lambda t, g: t.set_lr_mult({"l1/w": 0.1}), KeyError, "l1/W"),
    "override negative": (lambda t, g: t.set_wd_mult({"l1/W": -0.1}), ValueError, "wd_mult"),
}


@pytest.mark.parametrize("case", BAD_CALLS)
def test_a_failed_call_changes_nothing(case):
    call, exc, match = BAD_CALLS[case]
    pd = ParamDict.from_pytree(mlp_tree())
    trainer = Trainer(pd, "adam", {"learning_rate": 0.01})
    grads = {n: jnp.ones(p.shape) for n, p in pd.items()}
    trainer.step(grads)
    before = snapshot(trainer)
    with pytest.raises(exc, match=match):
        call(trainer, grads)
    assert_same(snapshot(trainer), before)
    # the next valid step gives what it would have given without the bad call
    pd2 = ParamDict.from_pytree(mlp_tree())
    twin = Trainer(pd2, "adam", {"learning_rate": 0.01})
    twin.step(grads)
    trainer.step(grads)
    twin.step(grads)
    assert_same(snapshot(trainer), snapshot(twin))


@pytest.mark.parametrize(
    "optimizer, params, exc, match",
    [
        ("adm", {}, ValueError, "did you mean 'adam'"),
        ("sgd", {"momentun": 0.9}, ValueError, "did you mean 'momentum'"),
        ("sgd", {"learning_rate": -0.1}, ValueError, "learning rate"),
        ("sgd", {"clip_gradient": 0}, ValueError, "clip_gradient"),
        ("adam", {"beta3": 0.1}, ValueError, "beta3"),
        (3, {}, TypeError, "optimizer"),
    ],
)
def test_bad_trainer_construction(optimizer, params, exc, match):
    pd = ParamDict.from_pytree(mlp_tree())
    with pytest.raises(exc, match=match):
        Trainer(pd, optimizer, params)


def test_set_learning_rate_under_a_schedule_is_refused():
    pd = ParamDict.from_pytree(mlp_tree())
    trainer = Trainer(pd, "sgd", {"learning_rate": optax.constant_schedule(0.1)})
    with pytest.raises(ValueError, match="schedule"):
        trainer.set_learning_rate(0.2)


def test_integer_parameter_must_be_frozen_to_train():
    pd = ParamDict.from_pytree({"w": jnp.ones(2), "step": jnp.zeros((), jnp.int32)})
    with pytest.raises(TypeError, match="'step'.*freeze"):
        Trainer(pd, "sgd")
    pd["step"].frozen = True
    Trainer(pd, "sgd").step({"w": jnp.ones(2)})


def test_one_parameter_cannot_be_stored_under_two_names():
    p = lrmult.Parameter(jnp.ones(2))
    a = ParamDict({"a": p})
    assert p.name == "a"
    with pytest.raises(ValueError, match="named 'a' is stored under key 'c'"):
        ParamDict({"c": p})
    assert list(a) == ["a"]


def test_weakly_typed_user_arrays_do_not_cause_a_second_compile(compiles):
    pd = ParamDict.from_pytree({"w": jnp.full((3,), 2.0), "b": jnp.zeros(3) + 1.0})
    trainer = Trainer(pd, "sgd", {"learning_rate": 0.1})
    trainer.step({"w": jnp.ones(3), "b": jnp.ones(3)})
    counter = compiles()
    trainer.step({"w": jnp.ones(3), "b": jnp.ones(3)})
    pd["w"].set_data(jnp.full((3,), 5.0))
    trainer.step({"w": jnp.ones(3), "b": jnp.ones(3)})
    assert counter("lrmult_apply_step") == 0


def test_set_wd_mult_without_weight_decay_keeps_the_chain_intact():
    pd = ParamDict.from_pytree({"a": jnp.ones(2), "b": jnp.ones(2)})
    trainer = Trainer(pd, "adam", {"learning_rate": 0.1})
    trainer.set_wd_mult({"a": 3.0})  # λ = 0: no effect, but no broken state either
    trainer.step({"a": jnp.ones(2), "b": jnp.ones(2)})
    np.testing.assert_allclose(pd["a"].data(), pd["b"].data())


def test_numpy_scalar_gradient_for_a_scalar_parameter():
    pd = ParamDict.from_pytree({"s": jnp.float32(1.0), "v": jnp.ones(2)})
    trainer = Trainer(pd, "sgd", {"learning_rate": 0.1})
    trainer.step({"s": np.float32(2.0), "v": np.ones(2, np.float32)})
    assert float(pd["s"].data()) == pytest.approx(1 - 0.2)


@pytest.mark.parametrize("via", ["step", "train_step"])
def test_check_finite_names_the_first_bad_leaf_and_changes_nothing(via):
    pd = ParamDict.from_pytree({"a": jnp.ones(2), "b": jnp.ones(2), "c": jnp.ones(2)})
    trainer = Trainer(pd, "adam", {"learning_rate": 0.1}, check_finite=True)
    good = {"a": jnp.ones(2), "b": jnp.ones(2), "c": jnp.ones(2)}
    trainer.step(good)
    before = snapshot(trainer)
    bad = {"a": jnp.ones(2), "b": jnp.array([1.0, jnp.nan]), "c": jnp.array([jnp.inf, 0.0])}
    with pytest.raises(FloatingPointError, match=r"'b' \(and 1 more\)"):
        if via == "step":
            trainer.step(bad)
        else:
            trainer.train_step(lambda p: sum(jnp.vdot(p[k], bad[k]) for k in p))
    assert_same(snapshot(trainer), before)
    trainer.step(good)
    twin = Trainer(
        ParamDict.from_pytree({k: jnp.ones(2) for k in "abc"}), "adam", {"learning_rate": 0.1}
    )
    twin.step(good)
    twin.step(good)
    assert_same(snapshot(trainer), snapshot(twin))


def test_two_trainers_sharing_parameters_see_each_others_updates():
    pd = ParamDict.from_pytree({"w": jnp.zeros(2)})
    a = Trainer(pd, "sgd", {"learning_rate": 1.0})
    b = Trainer(pd, "sgd", {"learning_rate": 10.0})
    ones = {"w": jnp.ones(2)}
    a.step(ones)  # 0 - 1
    b.step(ones)  # -1 - 10
    a.step(ones)  # -11 - 1
    pd["w"].set_data(jnp.full(2, 100.0))
    a.step(ones)  # 100 - 1
    b.step(ones)  # 99 - 10
    np.testing.assert_array_equal(pd["w"].data(), [89.0, 89.0])
    a.step(ones)  # data() handed the value out: it stays valid, and the step still sees it
    np.testing.assert_array_equal(pd["w"].data(), [88.0, 88.0])


def test_write_back_follows_shared_outputs_and_tells_new_owners():
    # After the first step a Trainer only swaps its outputs; a Trainer made later over the same
    # Parameter, a frozen toggle and a handed-out value must all still see every update.
    pd = ParamDict.from_pytree({"w": jnp.zeros(2), "v": jnp.zeros(1)})
    a = Trainer(pd, "sgd", {"learning_rate": 1.0})
    g = {"w": jnp.ones(2), "v": jnp.ones(1)}
    for _ in range(3):
        a.step(g)  # w, v: -3
    b = Trainer(pd.select("w"), "sgd", {"learning_rate": 10.0})  # a new owner of w
    a.step(g)  # -4
    b.step({"w": jnp.ones(2)})  # w: -14
    a.step(g)  # w: -15, v: -5
    a.step(g)  # w: -16, v: -6
    b.step({"w": jnp.ones(2)})  # w: -26
    np.testing.assert_array_equal(pd["w"].data(), [-26.0, -26.0])
    np.testing.assert_array_equal(pd["v"].data(), [-6.0])
    pd["v"].frozen = True
    a.step({"w": jnp.ones(2)})  # w: -27, v stays
    a.step({"w": jnp.ones(2)})  # w: -28
    frozen_v = pd["v"].data()
    pd["v"].frozen = False
    a.step(g)  # w: -29, v: -7
    np.testing.assert_array_equal(frozen_v, [-6.0])
    np.testing.assert_array_equal(pd["w"].data(), [-29.0, -29.0])
    np.testing.assert_array_equal(pd["v"].data(), [-7.0])


def test_opt_state_read_between_steps_is_the_stepped_state():
    # SGD, lr 0.1, momentum 0.9 on loss w**2 / 2 (gradient w), w0 = 1, by hand:
    # step 1: trace 1, w 0.9; step 2: trace 0.9 + 0.9 = 1.8, w 0.72;
    # step 3: trace 0.9 * 1.8 + 0.72 = 2.34, w 0.72 - 0.234 = 0.486.
    pd = lrmult.ParamDict.from_pytree({"w": jnp.array(1.0)})
    trainer = lrmult.Trainer(pd, "sgd", {"learning_rate": 0.1, "momentum": 0.9})

    def loss(tree):
        return tree["w"] ** 2 / 2

    trainer.train_step(loss)
    trainer.train_step(loss)
    state = trainer.opt_state
    assert trainer.opt_state is state  # read twice, joined once
    traces = [x for x in jax.tree.leaves(state) if x.dtype == jnp.float32 and x.shape == ()]
    assert any(abs(float(x) - 1.8) < 1e-6 for x in traces), traces
    assert float(pd["w"].data()) == pytest.approx(0.72)
    trainer.train_step(loss)
    assert float(pd["w"].data()) == pytest.approx(0.486)
