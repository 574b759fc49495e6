"""The optax level outside the Trainer: state built under jit, the whole lookup chain in every
ready chain, hyperparameters validated by the chains."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lrmult
from lrmult import ParamDict

CHAINS = ["sgd", "nag", "adam", "adamw", "rmsprop", "adagrad", "lamb", "lion"]


def _pd():
    pd = ParamDict.from_pytree({"a": jnp.ones(2), "b": jnp.full(3, 2.0), "c": jnp.zeros(1)})
    pd["a"].lr_mult = 0.5
    pd["b"].wd_mult = 0.0
    pd["c"].frozen = True
    return pd


@pytest.mark.parametrize("name", CHAINS)
def test_init_under_jit_and_eval_shape_equals_eager_init(name):
    pd = _pd()
    tx = getattr(lrmult, name)(0.1, param_dict=pd)
    eager = tx.init(pd.tree())
    jitted = jax.jit(tx.init)(pd.tree())
    shapes = jax.eval_shape(tx.init, pd.tree())
    assert jax.tree.structure(jitted) == jax.tree.structure(eager)
    assert jax.tree.structure(shapes) == jax.tree.structure(eager)
    for x, y, z in zip(
        jax.tree.leaves(eager), jax.tree.leaves(jitted), jax.tree.leaves(shapes), strict=True
    ):
        np.testing.assert_array_equal(x, y)
        assert (z.shape, z.dtype) == (x.shape, x.dtype)
    # and the jit-built state drives the same update: a: -0.1 * 0.5 * sign-ish, c frozen
    g = {"a": jnp.ones(2), "b": jnp.ones(3), "c": jnp.ones(1)}
    u1, _ = tx.update(g, eager, pd.tree())
    u2, _ = tx.update(g, jitted, pd.tree())
    for x, y in zip(jax.tree.leaves(u1), jax.tree.leaves(u2), strict=True):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(u2["c"], [0.0])


def test_sgd_init_under_jit_numbers():
    pd = _pd()
    tx = lrmult.sgd(0.1, weight_decay=0.5, param_dict=pd)
    state = jax.jit(tx.init)(pd.tree())
    u, _ = tx.update({"a": jnp.ones(2), "b": jnp.ones(3), "c": jnp.ones(1)}, state, pd.tree())
    # a: -0.1 * 0.5 * (1 + 0.5 * 1 * 1) = -0.075; b: wd_mult 0: -0.1 * 1; c frozen
    np.testing.assert_allclose(u["a"], -0.075, rtol=1e-6)
    np.testing.assert_allclose(u["b"], -0.1, rtol=1e-6)
    np.testing.assert_array_equal(u["c"], 0.0)


SHARDED = textwrap.dedent(
    """
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    import lrmult

    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    specs = {"w": P("data", "model"), "b": P()}
    params = {
        "w": jax.device_put(jnp.arange(64.0).reshape(8, 8), NamedSharding(mesh, specs["w"])),
        "b": jax.device_put(jnp.ones(8), NamedSharding(mesh, specs["b"])),
    }
    pd = lrmult.ParamDict.from_pytree(params)
    pd["w"].lr_mult = 0.25
    tx = lrmult.adamw(0.1, param_dict=pd)
    abstract = jax.eval_shape(tx.init, params)

    def sharding_of(path, leaf):
        name = jax.tree_util.keystr(path)
        for key, spec in specs.items():
            if name.endswith(f"['{key}']") and leaf.ndim == len(spec):
                return NamedSharding(mesh, spec)
        return NamedSharding(mesh, P())  # scalars: counts, multipliers

    out = jax.tree_util.tree_map_with_path(sharding_of, abstract)
    state = jax.jit(tx.init, out_shardings=out)(params)
    eager = tx.init(params)
    for (path, x), y in zip(
        jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(eager), strict=True
    ):
        np.testing.assert_array_equal(x, y)
        want = sharding_of(path, x)
        assert x.sharding.is_equivalent_to(want, x.ndim), (jax.tree_util.keystr(path), x.sharding)
    mu = state.inner[0].states[0].mu
    assert mu["w"].sharding.spec == P("data", "model")
    mults = [m for _, m in lrmult.resync.find(state, lrmult.transforms.MultState)]
    assert float(mults[-1].tree(params)["w"]) == 0.25
    print("OK")
    """
)


def test_sharded_state_built_under_jit_with_out_shardings():
    done = subprocess.run(
        [sys.executable, "-c", SHARDED], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr[-3000:]


@pytest.mark.parametrize("name", CHAINS)
def test_ready_chains_honour_idx2name(name):
    """MXNet's chain: param_dict -> index -> idx2name -> default, with a list tree."""
    params = [jnp.ones(2), jnp.ones(3)]
    pd = ParamDict(
        {"fc_weight": lrmult.Parameter(params[0]), "fc_bias": lrmult.Parameter(params[1])}
    )
    pd["fc_bias"].frozen = True
    tx = getattr(lrmult, name)(0.1, param_dict=pd, idx2name={0: "fc_weight", 1: "fc_bias"})
    state = tx.init(params)
    u, _ = tx.update([jnp.ones(2), jnp.ones(3)], state, params)
    np.testing.assert_array_equal(u[1], 0.0)  # frozen through idx2name
    assert np.all(np.asarray(u[0]) != 0.0)
    rows = {r.name: r for r in lrmult.explain(state, pd, learning_rate=0.1)}
    assert rows["fc_bias"].frozen and rows["fc_weight"].lr == pytest.approx(0.1)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: lrmult.adam(-1.0), "learning rate must be a finite number >= 0"),
        (lambda: lrmult.adam(1e-3, b1=2.0), r"adam: b1 must be in \[0, 1\)"),
        (lambda: lrmult.sgd(0.1, momentum=1.5), r"sgd: momentum must be in \[0, 1\)"),
        (lambda: lrmult.adamw(1e-3, eps=-1.0), "adamw: eps must be >= 0"),
        (lambda: lrmult.rmsprop(1e-3, decay=1.0), r"rmsprop: decay must be in \[0, 1\)"),
        (lambda: lrmult.lion(1e-3, b2=float("nan")), "lion: b2 must be finite"),
        (lambda: lrmult.adagrad(1e-3, eps=-1e-7), "adagrad: eps must be >= 0"),
        (lambda: lrmult.lamb(1e-3, weight_decay=-0.1), "weight_decay must be >= 0"),
    ],
)
def test_ready_chains_validate_their_hyperparameters(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_chains_accept_hyperparameters_injected_as_arrays():
    tx = optax.inject_hyperparams(lrmult.adam)(learning_rate=0.1, b1=0.9)
    params = {"a": jnp.ones(2)}
    state = tx.init(params)
    u, _ = jax.jit(tx.update)({"a": jnp.ones(2)}, state, params)
    # first Adam step: m_hat / sqrt(v_hat) = 1
    np.testing.assert_allclose(u["a"], -0.1, rtol=1e-5)


# -- never silently stale: TrainState and nnx.Optimizer, no refresh for multipliers --------------


def _train_state(pd, params, tx):
    from flax.training import train_state

    return train_state.TrainState.create(apply_fn=None, params=params, tx=tx)


@jax.jit
def _ts_step(state):
    return state.apply_gradients(grads=jax.tree.map(jnp.ones_like, state.params))


def test_train_state_applies_a_changed_lr_mult_without_refresh_or_recompile(compiles):
    params = {"a": {"kernel": jnp.ones(2)}, "l1": {"kernel": jnp.ones(3)}}
    pd = ParamDict.from_pytree(params)
    state = _train_state(pd, params, lrmult.sgd(0.1, momentum=0.9, param_dict=pd))
    state = _ts_step(state)  # both: 1 - 0.1 * 1 = 0.9; momentum trace now 1
    count = compiles()
    pd["a/kernel"].lr_mult = 0.0
    pd["l1/kernel"].lr_mult = 2.0
    state = _ts_step(state)  # trace 1.9: a stays, l1 -= 0.1 * 2 * 1.9
    assert count() == 0
    np.testing.assert_allclose(state.params["a"]["kernel"], 0.9, rtol=1e-6)
    np.testing.assert_allclose(state.params["l1"]["kernel"], 0.9 - 0.38, rtol=1e-6)
    # lr_mult 0 is not frozen: a's momentum still advanced (trace 1.9 -> 2.71)
    del pd["a/kernel"].lr_mult
    state = _ts_step(state)
    np.testing.assert_allclose(state.params["a"]["kernel"], 0.9 - 0.271, rtol=1e-5)
    assert count() == 0


def test_train_state_refuses_a_changed_frozen_set_until_refreshed():
    params = {"a": {"kernel": jnp.ones(2)}, "l1": {"kernel": jnp.ones(3)}}
    pd = ParamDict.from_pytree(params)
    state = _ts_step(_train_state(pd, params, lrmult.adam(0.1, param_dict=pd)))
    before = jax.tree.map(np.asarray, state.params)
    pd.select("l1/").setattr("frozen", True)
    with pytest.raises(ValueError, match=r"'l1/kernel'.*lrmult\.refresh\(opt_state, param_dict\)"):
        _ts_step(state)
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(x, y)
    state = _ts_step(state.replace(opt_state=lrmult.refresh(state.opt_state, pd)))
    np.testing.assert_array_equal(state.params["l1"]["kernel"], before["l1"]["kernel"])
    # a: second Adam step of constant gradients, m_hat / sqrt(v_hat) = 1
    np.testing.assert_allclose(state.params["a"]["kernel"], 0.8, rtol=1e-5)


def test_eager_update_sees_changes_too():
    pd = ParamDict.from_pytree({"w": jnp.ones(2)})
    tx = lrmult.sgd(1.0, param_dict=pd)
    state = tx.init(pd.tree())
    pd["w"].lr_mult = 0.25
    u, state = tx.update({"w": jnp.ones(2)}, state, pd.tree())
    np.testing.assert_allclose(u["w"], -0.25)
    pd["w"].frozen = True
    with pytest.raises(ValueError, match="'w' was trainable"):
        tx.update({"w": jnp.ones(2)}, state, pd.tree())


def test_nnx_optimizer_applies_changes_and_refuses_a_new_frozen_set(compiles):
    from flax import nnx

    class Two(nnx.Module):
        def __init__(self):
            self.a = nnx.Linear(2, 1, use_bias=False, rngs=nnx.Rngs(0))
            self.l1 = nnx.Linear(1, 1, use_bias=False, rngs=nnx.Rngs(1))

        def __call__(self, x):
            return self.l1(self.a(x))

    @nnx.jit
    def step(model, optimizer, x):
        optimizer.update(model, nnx.grad(lambda m: m(x).sum())(model))

    model = Two()
    model.a.kernel[...] = jnp.ones((2, 1))
    model.l1.kernel[...] = jnp.full((1, 1), 2.0, jnp.float32)  # not weakly typed
    pd = lrmult.from_nnx(model)
    optimizer = nnx.Optimizer(model, lrmult.sgd(0.1, param_dict=pd), wrt=nnx.Param)
    x = jnp.ones((1, 2))
    step(model, optimizer, x)  # d/da = l1 = 2: a -> 0.8; d/dl1 = sum(x a) = 2: l1 -> 1.8
    np.testing.assert_allclose(model.a.kernel[...], 0.8, rtol=1e-6)
    count = compiles()
    pd["a/kernel"].lr_mult = 0.5
    step(model, optimizer, x)  # d/da = 1.8: a -= 0.1 * 0.5 * 1.8; d/dl1 = 1.6: l1 -> 1.64
    assert count("step") == 0
    np.testing.assert_allclose(model.a.kernel[...], 0.8 - 0.09, rtol=1e-5)
    np.testing.assert_allclose(model.l1.kernel[...], 1.64, rtol=1e-5)
    pd["l1/kernel"].frozen = True
    with pytest.raises(ValueError, match=r"'l1/kernel'.*refresh_optimizer"):
        step(model, optimizer, x)
    np.testing.assert_allclose(model.l1.kernel[...], 1.64, rtol=1e-5)
    lrmult.refresh_optimizer(optimizer, pd)
    step(model, optimizer, x)  # d/da = 1.64: a -= 0.082; l1 frozen
    np.testing.assert_allclose(model.a.kernel[...], 0.71 - 0.082, rtol=1e-5)
    np.testing.assert_allclose(model.l1.kernel[...], 1.64, rtol=1e-5)


# -- optax.inject_hyperparams: every hyperparameter, numbers as without injection ----------------

INJECTED = {
    "sgd": {"learning_rate": 0.1, "momentum": 0.9, "weight_decay": 0.01},
    "nag": {"learning_rate": 0.1, "momentum": 0.8, "weight_decay": 0.01},
    "adam": {"learning_rate": 0.1, "b1": 0.8, "b2": 0.99, "eps": 1e-6, "weight_decay": 0.01},
    "adamw": {"learning_rate": 0.1, "b1": 0.8, "b2": 0.99, "eps": 1e-6, "weight_decay": 0.01},
    "rmsprop": {"learning_rate": 0.1, "decay": 0.8, "eps": 1e-6, "momentum": 0.5},
    "adagrad": {"learning_rate": 0.1, "initial_accumulator_value": 0.2, "eps": 1e-6},
    "lamb": {"learning_rate": 0.1, "b1": 0.8, "b2": 0.99, "eps": 1e-5, "weight_decay": 0.01},
    "lion": {"learning_rate": 0.1, "b1": 0.8, "b2": 0.95, "weight_decay": 0.01},
}


@pytest.mark.parametrize("name", sorted(INJECTED))
def test_inject_hyperparams_accepts_every_hyperparameter(name):
    pd = _pd()
    kwargs = INJECTED[name]
    plain = getattr(lrmult, name)(**kwargs, param_dict=pd)
    injected = optax.inject_hyperparams(getattr(lrmult, name))(**kwargs, param_dict=pd)
    s1, s2 = plain.init(pd.tree()), injected.init(pd.tree())
    assert set(kwargs) <= set(s2.hyperparams)
    update = jax.jit(injected.update)
    params1 = params2 = pd.tree()
    for k in range(3):
        g = jax.tree.map(lambda p, k=k: jnp.full_like(p, 1.0 + k), params1)
        u1, s1 = plain.update(g, s1, params1)
        u2, s2 = update(g, s2, params2)
        params1, params2 = optax.apply_updates(params1, u1), optax.apply_updates(params2, u2)
    for x, y in zip(jax.tree.leaves(params1), jax.tree.leaves(params2), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_weight_decay_as_a_schedule_matches_optax():
    schedule = optax.linear_schedule(0.1, 0.0, 4)
    params = {"w": jnp.array([1.0, -2.0])}
    ours = lrmult.adamw(0.1, weight_decay=schedule)
    theirs = optax.adamw(0.1, weight_decay=0.0)  # decay added by hand below
    s1, s2 = ours.init(params), theirs.init(params)
    p1 = p2 = params
    for k in range(4):
        g = {"w": jnp.array([0.5, 0.25]) * (k + 1)}
        u1, s1 = ours.update(g, s1, p1)
        u2, s2 = theirs.update(g, s2, p2)
        # optax.adamw's update with decay λ_k: -lr * (adam + λ_k * w), λ_k = 0.1 * (1 - k / 4)
        u2 = jax.tree.map(lambda u, w, k=k: u - 0.1 * (0.1 * (1 - k / 4)) * w, u2, p2)
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
        np.testing.assert_allclose(p1["w"], p2["w"], rtol=1e-6)
    injected = optax.inject_hyperparams(lrmult.adamw)(learning_rate=0.1, weight_decay=schedule)
    s3, p3 = injected.init(params), params
    for k in range(4):
        u3, s3 = injected.update({"w": jnp.array([0.5, 0.25]) * (k + 1)}, s3, p3)
        p3 = optax.apply_updates(p3, u3)
    np.testing.assert_allclose(p3["w"], p1["w"], rtol=1e-5)  # injected rates are float32 arrays


def test_explain_shows_the_chains_own_rate_and_schedule():
    pd = _pd()
    state = lrmult.sgd(0.1, param_dict=pd).init(pd.tree())
    rows = {r.name: r for r in lrmult.explain(state)}
    assert rows["a"].lr == pytest.approx(0.05) and rows["b"].lr == pytest.approx(0.1)
    schedule = optax.linear_schedule(1.0, 0.0, 10)
    tx = lrmult.adam(schedule, param_dict=pd)
    state = tx.init(pd.tree())
    g = {"a": jnp.ones(2), "b": jnp.ones(3), "c": jnp.ones(1)}
    for _ in range(3):
        _, state = tx.update(g, state, pd.tree())
    rows = {r.name: r for r in lrmult.explain(state)}
    assert rows["b"].lr == pytest.approx(0.7) and rows["a"].lr == pytest.approx(0.35)


def test_ready_chains_take_extra_update_arguments():
    pd = _pd()
    for name in CHAINS:
        tx = getattr(lrmult, name)(0.1, param_dict=pd)
        assert isinstance(tx, optax.GradientTransformationExtraArgs), name
        state = tx.init(pd.tree())
        g = {"a": jnp.ones(2), "b": jnp.ones(3), "c": jnp.ones(1)}
        u, _ = tx.update(g, state, pd.tree(), value=jnp.float32(1.0), grad=g)
        np.testing.assert_array_equal(u["c"], 0.0)


def test_rmsprop_with_momentum_and_a_schedule_equals_optax():
    schedule = optax.exponential_decay(0.1, 1, 0.5)
    params = {"w": jnp.array([1.0, -2.0, 0.5])}
    ours = lrmult.rmsprop(schedule, momentum=0.9)
    theirs = optax.rmsprop(schedule, momentum=0.9)
    s1, s2, p1, p2 = ours.init(params), theirs.init(params), params, params
    for k in range(5):
        g = {"w": jnp.array([0.3, -0.1, 0.2]) * (k + 1)}
        u1, s1 = ours.update(g, s1, p1)
        u2, s2 = theirs.update(g, s2, p2)
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    np.testing.assert_allclose(p1["w"], p2["w"], rtol=1e-6)
