"""lrmult/optimizers.py: the ready chains' numbers, their registry, hyperparameter checks.

Expected values come from hand arithmetic, from NumPy transcriptions of PyTorch's update rules
(float64, one param group per leaf: lr = η·m, weight_decay = λ·d), or from optax's own aliases:
with no multiplier set, a ready chain must give optax's numbers bit for bit.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lrmult
from lrmult import ParamDict
from lrmult.optimizers import OPTIMIZERS, check_hyperparameter, check_learning_rate

W0 = {"b": np.array([0.25, -0.75], np.float32), "w": np.array([1.0, -2.0, 0.5], np.float32)}
GRADS = [
    {"b": np.array([1.0, 0.5], np.float32), "w": np.array([0.5, -1.0, 0.25], np.float32)},
    {"b": np.array([-0.5, 0.25], np.float32), "w": np.array([0.25, -0.5, 1.0], np.float32)},
]


def as_jax(tree):
    return jax.tree.map(jnp.asarray, tree)


def run(tx, params=W0, grads=GRADS):
    """The parameters after one update per gradient (eager, as a user's loop would run it)."""
    params = as_jax(params)
    state = tx.init(params)
    for g in grads:
        u, state = tx.update(as_jax(g), state, params)
        params = optax.apply_updates(params, u)
    return params


def close(got, want, rtol=2e-6, atol=1e-7):
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=atol)


# -- the registry ----------------------------------------------------------------------------------


def test_optimizers_lists_every_ready_chain_under_its_gluon_name():
    names = ["sgd", "nag", "adam", "adamw", "rmsprop", "adagrad", "lamb", "lion"]
    assert list(OPTIMIZERS) == names  # README's order, which the Trainer's error message lists
    for name in names:
        assert OPTIMIZERS[name] is getattr(lrmult, name) is getattr(lrmult.optimizers, name)


# -- SGD: by hand, and PyTorch's formula -----------------------------------------------------------


@pytest.mark.parametrize(
    "build, after_two",
    [
        (lambda: lrmult.sgd(0.1), -0.2),  # -0.1 · 1, twice
        (lambda: lrmult.sgd(0.1, momentum=0.0), -0.2),  # momentum 0 is plain SGD
        (lambda: lrmult.sgd(0.1, momentum=0.9), -0.29),  # buf 1, then 0.9 + 1 = 1.9
        # Nesterov: step g + μ·buf: 1 + 0.9 = 1.9, then 1 + 0.9·1.9 = 2.71
        (lambda: lrmult.sgd(0.1, momentum=0.9, nesterov=True), -0.461),
        (lambda: lrmult.nag(0.1), -0.461),  # nag's momentum defaults to 0.9
        (lambda: lrmult.nag(0.1, momentum=0.5), -0.1 * 1.5 - 0.1 * 1.75),  # 1 + .5, 1 + .5·1.5
        # coupled decay, w0 = 0, λ = 0.5: g' = 1, w = -0.1; g' = 1 - 0.05 = 0.95, w = -0.195
        (lambda: lrmult.sgd(0.1, weight_decay=0.5), -0.195),
    ],
    ids=["plain", "momentum0", "momentum", "nesterov", "nag", "nag0.5", "decay"],
)
def test_sgd_two_steps_by_hand(build, after_two):
    got = run(build(), {"x": np.zeros(1, np.float32)}, [{"x": np.ones(1, np.float32)}] * 2)
    close(got["x"], [after_two])


def test_sgd_with_momentum_zero_keeps_no_trace():
    def traces(tx):
        state = tx.init({"x": jnp.zeros(2)})
        return [
            s
            for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, optax.TraceState))
            if isinstance(s, optax.TraceState)
        ]

    assert traces(lrmult.sgd(0.1, momentum=0)) == []
    assert traces(lrmult.sgd(0.1, momentum=None)) == []
    assert len(traces(lrmult.sgd(0.1, momentum=0.9))) == 1


def torch_sgd(lr, momentum=0.0, weight_decay=0.0, nesterov=False):
    """`torch.optim.SGD.step` (dampening 0), transcribed; `lr`, `weight_decay`: leaf -> value."""
    out = {}
    for n in W0:
        w, buf = W0[n].astype(np.float64), None
        for g in GRADS:
            d_p = g[n] + weight_decay[n] * w
            if momentum:
                buf = d_p.copy() if buf is None else momentum * buf + d_p
                d_p = d_p + momentum * buf if nesterov else buf
            w = w - lr[n] * d_p
        out[n] = w
    return out


@pytest.mark.parametrize("nesterov", [False, True], ids=["momentum", "nesterov"])
def test_sgd_per_leaf_multipliers_match_torch_param_groups(nesterov):
    pd = ParamDict.from_pytree(as_jax(W0))
    pd["w"].lr_mult, pd["w"].wd_mult = 0.5, 2.0
    pd["b"].wd_mult = 0.0
    tx = lrmult.sgd(0.1, 0.9, nesterov, 0.05, param_dict=pd, lr_mult={"b": 3.0})
    got = run(tx)
    want = torch_sgd(
        lr={"w": 0.1 * 0.5, "b": 0.1 * 3.0},
        momentum=0.9,
        weight_decay={"w": 0.05 * 2.0, "b": 0.0},
        nesterov=nesterov,
    )
    for n in W0:
        close(got[n], want[n])


# -- Adam and AdamW: by hand, and the Adam formula with bias correction ----------------------------


def test_adam_constant_gradient_steps_eta_times_lr_mult_times_sign_by_hand():
    """With g constant, m̂ = g and v̂ = g² at every step: each step is η·m·g/(|g| + ε) ≈ η·m·sign(g).

    Had lr_mult scaled the gradient, Adam would cancel it and 'w' would move as far as 'b'.
    """
    params = {"b": np.zeros(2, np.float32), "w": np.zeros(2, np.float32)}
    grads = [{"b": np.array([0.5, -2.0], np.float32), "w": np.array([0.5, -2.0], np.float32)}] * 2
    pd = ParamDict.from_pytree(as_jax(params))
    pd["w"].lr_mult = 0.25
    got = run(lrmult.adam(0.1, param_dict=pd), params, grads)
    # optax computes 1 - b2**t in float32: 1 - float32(0.999) is off by 1.3e-5 relative
    close(got["b"], [-0.2, 0.2], rtol=2e-5)
    close(got["w"], [-0.05, 0.05], rtol=2e-5)


def torch_adam(lr, weight_decay, decoupled, b1=0.9, b2=0.999, eps=1e-8):
    """`torch.optim.Adam` / `AdamW` (amsgrad off) for one leaf, transcribed."""
    out = {}
    for n in W0:
        w = W0[n].astype(np.float64)
        m = v = np.zeros_like(w)
        for t, g in enumerate(GRADS, start=1):
            g = g[n].astype(np.float64)
            if decoupled:
                w = w * (1 - lr[n] * weight_decay[n])
            else:
                g = g + weight_decay[n] * w
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            denom = np.sqrt(v) / math.sqrt(1 - b2**t) + eps
            w = w - lr[n] / (1 - b1**t) * m / denom
        out[n] = w
    return out


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_and_adamw_per_leaf_match_the_adam_formula_with_bias_correction(name):
    pd = ParamDict.from_pytree(as_jax(W0))
    pd["w"].lr_mult, pd["w"].wd_mult = 0.5, 3.0
    pd["b"].lr_mult = 2.0
    tx = getattr(lrmult, name)(0.01, 0.8, 0.99, 1e-6, 0.0, 0.1, param_dict=pd)
    got = run(tx)
    want = torch_adam(
        lr={"w": 0.01 * 0.5, "b": 0.01 * 2.0},
        weight_decay={"w": 0.1 * 3.0, "b": 0.1},
        decoupled=name == "adamw",
        b1=0.8,
        b2=0.99,
        eps=1e-6,
    )
    for n in W0:
        close(got[n], want[n])
    # the two formulas differ here by far more than the tolerance
    other = torch_adam(
        lr={"w": 0.005, "b": 0.02}, weight_decay={"w": 0.3, "b": 0.1},
        decoupled=name != "adamw", b1=0.8, b2=0.99, eps=1e-6,
    )  # fmt: skip
    assert np.min(np.abs(other["w"] - want["w"])) > 1e-3


# -- every multiplier 1: optax's own numbers, bit for bit ------------------------------------------

# case: (ready chain, its arguments, optax's alias with the same arguments)
SAME_AS_OPTAX = {
    "sgd": ("sgd", {"learning_rate": 0.1}, lambda: optax.sgd(0.1)),
    "sgd-momentum": ("sgd", {"learning_rate": 0.1, "momentum": 0.9}, lambda: optax.sgd(0.1, 0.9)),
    "sgd-nesterov": (
        "sgd",
        {"learning_rate": 0.1, "momentum": 0.9, "nesterov": True},
        lambda: optax.sgd(0.1, 0.9, nesterov=True),
    ),
    "nag": ("nag", {"learning_rate": 0.1}, lambda: optax.sgd(0.1, 0.9, nesterov=True)),
    "adam": ("adam", {"learning_rate": 0.1}, lambda: optax.adam(0.1)),
    "adam-args": (
        "adam",
        {"learning_rate": 0.1, "b1": 0.8, "b2": 0.99, "eps": 1e-6, "eps_root": 1e-9},
        lambda: optax.adam(0.1, b1=0.8, b2=0.99, eps=1e-6, eps_root=1e-9),
    ),
    "adamw": ("adamw", {"learning_rate": 0.1}, lambda: optax.adamw(0.1)),
    "adamw-decay": (
        "adamw",
        {"learning_rate": 0.1, "weight_decay": 0.05},
        lambda: optax.adamw(0.1, weight_decay=0.05),
    ),
    "rmsprop": ("rmsprop", {"learning_rate": 0.1}, lambda: optax.rmsprop(0.1)),
    "rmsprop-momentum": (
        "rmsprop",
        {"learning_rate": 0.1, "momentum": 0.9, "nesterov": True},
        lambda: optax.rmsprop(0.1, momentum=0.9, nesterov=True),
    ),
    "rmsprop-centered": (
        "rmsprop",
        {
            "learning_rate": 0.1,
            "decay": 0.8,
            "eps": 1e-6,
            "initial_scale": 0.1,
            "eps_in_sqrt": False,
            "centered": True,
            "bias_correction": True,
        },
        lambda: optax.rmsprop(
            0.1, 0.8, 1e-6, 0.1, eps_in_sqrt=False, centered=True, bias_correction=True
        ),
    ),
    "adagrad": ("adagrad", {"learning_rate": 0.1}, lambda: optax.adagrad(0.1)),
    "adagrad-args": (
        "adagrad",
        {"learning_rate": 0.1, "initial_accumulator_value": 0.3, "eps": 1e-5},
        lambda: optax.adagrad(0.1, initial_accumulator_value=0.3, eps=1e-5),
    ),
    "lamb": ("lamb", {"learning_rate": 0.1}, lambda: optax.lamb(0.1)),
    "lamb-decay": (
        "lamb",
        {"learning_rate": 0.1, "b1": 0.8, "weight_decay": 0.01},
        lambda: optax.lamb(0.1, b1=0.8, weight_decay=0.01),
    ),
    "lion": ("lion", {"learning_rate": 0.01}, lambda: optax.lion(0.01)),
    "lion-args": (
        "lion",
        {"learning_rate": 0.01, "b1": 0.8, "b2": 0.95, "weight_decay": 0.1},
        lambda: optax.lion(0.01, b1=0.8, b2=0.95, weight_decay=0.1),
    ),
}


@pytest.mark.parametrize("with_param_dict", [False, True], ids=["plain", "param_dict"])
@pytest.mark.parametrize("case", SAME_AS_OPTAX)
def test_with_every_multiplier_1_a_ready_chain_is_optax(case, with_param_dict):
    name, kwargs, theirs = SAME_AS_OPTAX[case]
    if with_param_dict:  # nothing set on the Parameters: the lookup chain ends at 1.0
        kwargs = {**kwargs, "param_dict": ParamDict.from_pytree(as_jax(W0))}
    got, want = run(OPTIMIZERS[name](**kwargs)), run(theirs())
    for n in W0:
        np.testing.assert_array_equal(got[n], want[n], err_msg=f"{case}: {n}")
    assert not np.array_equal(want["w"], W0["w"])  # it moved


def test_every_named_optimizer_is_compared_with_optax():
    assert {name for name, _, _ in SAME_AS_OPTAX.values()} == set(OPTIMIZERS)


# -- lr_mult scales optax's final step; wd_mult scales the decay rate ------------------------------

FINAL_STEP = {
    "adam": (lambda **k: lrmult.adam(0.1, **k), lambda: optax.adam(0.1)),
    "rmsprop": (
        lambda **k: lrmult.rmsprop(0.1, momentum=0.9, **k),
        lambda: optax.rmsprop(0.1, momentum=0.9),
    ),
    "adagrad": (lambda **k: lrmult.adagrad(0.1, **k), lambda: optax.adagrad(0.1)),
    "lamb": (
        lambda **k: lrmult.lamb(0.1, weight_decay=0.01, **k),
        lambda: optax.lamb(0.1, weight_decay=0.01),
    ),
    "lion": (lambda **k: lrmult.lion(0.01, **k), lambda: optax.lion(0.01)),
}


@pytest.mark.parametrize("case", FINAL_STEP)
def test_lr_mult_scales_optaxs_final_step(case):
    """Fed the same gradients and parameters, 'w' steps 0.5 × optax's step, 'b' exactly optax's.

    (0.5 is a power of two: the product is exact in float32.)
    """
    ours, theirs = FINAL_STEP[case]
    pd = ParamDict.from_pytree(as_jax(W0))
    pd["w"].lr_mult = 0.5
    ours, theirs = ours(param_dict=pd), theirs()
    params = as_jax(W0)
    s1, s2 = ours.init(params), theirs.init(params)
    for g in GRADS:
        u1, s1 = ours.update(as_jax(g), s1, params)
        u2, s2 = theirs.update(as_jax(g), s2, params)
        np.testing.assert_array_equal(u1["w"], 0.5 * np.asarray(u2["w"]))
        np.testing.assert_array_equal(u1["b"], u2["b"])
        assert np.all(np.asarray(u2["w"]) != 0)
        params = optax.apply_updates(params, u1)


DECAY = {  # λ = 0.1: (ready chain, optax with decay rate r)
    "lamb": (
        lambda **k: lrmult.lamb(0.1, weight_decay=0.1, **k),
        lambda r: optax.lamb(0.1, weight_decay=r),
    ),
    "lion": (
        lambda **k: lrmult.lion(0.01, weight_decay=0.1, **k),
        lambda r: optax.lion(0.01, weight_decay=r),
    ),
    "adamw": (
        lambda **k: lrmult.adamw(0.1, weight_decay=0.1, **k),
        lambda r: optax.adamw(0.1, weight_decay=r),
    ),
    # coupled: the decay joins the gradient before the optimizer sees it
    "adagrad": (
        lambda **k: lrmult.adagrad(0.1, weight_decay=0.1, **k),
        lambda r: optax.chain(optax.add_decayed_weights(r), optax.adagrad(0.1)),
    ),
    "rmsprop": (
        lambda **k: lrmult.rmsprop(0.1, weight_decay=0.1, **k),
        lambda r: optax.chain(optax.add_decayed_weights(r), optax.rmsprop(0.1)),
    ),
}


@pytest.mark.parametrize("case", DECAY)
def test_wd_mult_scales_the_decay_rate(case):
    """'w' (wd_mult 0.5) follows optax with λ·0.5 = 0.05, 'b' (wd_mult 0) optax without decay."""
    ours, theirs = DECAY[case]
    pd = ParamDict.from_pytree(as_jax(W0))
    pd["w"].wd_mult = 0.5
    pd["b"].wd_mult = 0.0
    got = run(ours(param_dict=pd))
    close(got["w"], run(theirs(0.05))["w"], rtol=1e-6, atol=0)
    close(got["b"], run(theirs(0.0))["b"], rtol=1e-6, atol=0)
    assert np.max(np.abs(np.asarray(run(theirs(0.1))["w"]) - np.asarray(got["w"]))) > 1e-5


# -- custom ----------------------------------------------------------------------------------------


def test_custom_adds_decay_then_direction_then_rate_then_lr_mult_by_hand():
    pd = ParamDict.from_pytree({"v": jnp.zeros(2), "w": jnp.array([1.0, -1.0])})
    pd["v"].lr_mult = 3.0
    tx = lrmult.optimizers.custom(optax.scale_by_sign(), 0.5, weight_decay=0.1, param_dict=pd)
    g = {"v": jnp.array([1.0, -2.0]), "w": jnp.array([0.05, 0.05])}
    u, _ = tx.update(g, tx.init(pd.tree()), pd.tree())
    # w: sign(g + 0.1·w) = sign([0.15, -0.05]) = [1, -1]; step -0.5·[1, -1]
    np.testing.assert_array_equal(u["w"], [-0.5, 0.5])
    # v: w = 0, sign(g) = [1, -1]; step -0.5·3·[1, -1]
    np.testing.assert_array_equal(u["v"], [-1.5, 1.5])


def test_custom_without_a_learning_rate_lets_the_direction_own_it():
    tx = lrmult.optimizers.custom(optax.sgd(0.25))
    params = {"w": jnp.ones(2)}
    u, _ = tx.update({"w": jnp.array([2.0, -4.0])}, tx.init(params), params)
    np.testing.assert_array_equal(u["w"], [-0.5, 1.0])


# -- float16: lr_mult after the rate, float32 moments ----------------------------------------------


def test_f16_large_lr_mult_does_not_overflow_before_the_learning_rate():
    # 1e-3 · 10 = 0.01, × 1e4 = 100. The other order, 10 × 1e4 = 1e5, exceeds float16's 65504.
    pd = ParamDict.from_pytree({"h": jnp.zeros(3, jnp.float16)})
    pd["h"].lr_mult = 1e4
    tx = lrmult.sgd(1e-3, param_dict=pd)
    u, _ = tx.update({"h": jnp.full(3, 10.0, jnp.float16)}, tx.init(pd.tree()), pd.tree())
    assert u["h"].dtype == jnp.float16
    np.testing.assert_allclose(np.asarray(u["h"], np.float64), -100.0, rtol=1e-3)


def test_f16_adam_keeps_float32_moments_and_survives_small_gradients():
    # In float16, (1e-4)² = 1e-8 underflows to 0 and the step would be 1e-4 / ε = 1e4.
    # First Adam step: η·g / (|g| + ε) ≈ η·sign(g), and exactly 0 where g = 0.
    params = {"h": jnp.ones(3, jnp.float16)}
    tx = lrmult.adam(1e-3)
    state = tx.init(params)
    u, state = tx.update({"h": jnp.array([1e-4, 0.0, 1.0], jnp.float16)}, state, params)
    assert u["h"].dtype == jnp.float16
    moments = [x for x in jax.tree.leaves(state) if getattr(x, "shape", ()) == (3,)]
    assert moments and all(x.dtype == jnp.float32 for x in moments)
    np.testing.assert_allclose(
        np.asarray(u["h"], np.float64), [-1e-3, 0.0, -1e-3], rtol=2e-3, atol=0
    )


# -- hyperparameter checks -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arg, value, exc, message",
    [
        ("b1", 1.0, ValueError, r"adam: b1 must be in [0, 1), got 1.0"),
        ("momentum", -0.1, ValueError, r"adam: momentum must be in [0, 1), got -0.1"),
        ("decay", 1, ValueError, r"adam: decay must be in [0, 1), got 1.0"),
        ("b2", math.nan, ValueError, "adam: b2 must be finite, got nan"),
        ("eps", -math.inf, ValueError, "adam: eps must be finite, got -inf"),
        ("eps", -1e-9, ValueError, "adam: eps must be >= 0, got -1e-09"),
        ("eps_root", -1.0, ValueError, "adam: eps_root must be >= 0, got -1.0"),
        ("initial_scale", -2, ValueError, "adam: initial_scale must be >= 0, got -2.0"),
        ("initial_accumulator_value", -0.5, ValueError, "adam: initial_accumulator_value must"),
        ("weight_decay", -0.1, ValueError, "adam: weight_decay must be >= 0, got -0.1"),
        ("nesterov", 1, TypeError, "adam: nesterov must be True or False, got 1"),
        ("centered", "yes", TypeError, "adam: centered must be True or False, got 'yes'"),
        ("b1", "0.9", TypeError, "adam: b1 must be a number, got '0.9' (str)"),
        ("b1", True, TypeError, "adam: b1 must be a number, got True (bool)"),
        ("momentum", [0.9], TypeError, "adam: momentum must be a number, got [0.9] (list)"),
        ("learning_rate", -1.0, ValueError, "adam: learning_rate: learning rate must be a fin"),
        ("learning_rate", 1e39, ValueError, "within float32's range, got 1e+39"),
        ("learning_rate", math.inf, ValueError, "adam: learning_rate: learning rate must be a"),
        ("learning_rate", "0.1", TypeError, "learning rate must be a number, got str"),
        ("learning_rate", True, TypeError, "learning rate must be a number, got bool"),
        ("learning_rate", lambda: 0.1, TypeError, "learning_rate is callable but not a schedule"),
        (
            "learning_rate",
            lambda step: jnp.ones(2),
            TypeError,
            "adam: learning_rate: the learning_rate schedule must return a scalar, got shape (2,)",
        ),
    ],
)
def test_check_hyperparameter_names_the_argument(arg, value, exc, message):
    with pytest.raises(exc) as info:
        check_hyperparameter(arg, value, f"adam: {arg}")
    assert message in str(info.value)


@pytest.mark.parametrize(
    "arg, value, checked",
    [
        ("b1", 0, 0.0),  # the unit interval's closed end
        ("b2", 0.999999, 0.999999),
        ("b1", np.float32(0.5), 0.5),
        ("momentum", np.int64(0), 0.0),
        ("eps", 0.0, 0.0),
        ("weight_decay", 1e3, 1000.0),  # no upper bound
        ("learning_rate", 0, 0.0),
        ("learning_rate", np.float64(3e-4), 3e-4),
    ],
)
def test_check_hyperparameter_accepts_a_valid_number_as_a_float(arg, value, checked):
    out = check_hyperparameter(arg, value, "adam")
    assert out == checked and type(out) is float


def test_check_hyperparameter_passes_flags_none_schedules_and_arrays_through():
    schedule = optax.linear_schedule(0.1, 0.0, 10)
    injected = jnp.asarray(2.0)  # as optax.inject_hyperparams hands it (not checked)
    assert check_hyperparameter("nesterov", False, "sgd") is False
    assert check_hyperparameter("momentum", None, "sgd") is None
    assert check_hyperparameter("learning_rate", schedule, "sgd") is schedule
    assert check_learning_rate(schedule, "sgd") is schedule
    assert check_hyperparameter("b1", injected, "adam") is injected
    assert check_hyperparameter("learning_rate", injected, "adam") is injected
    with pytest.raises(TypeError, match="b2 must be a number, got None"):
        check_hyperparameter("b2", None, "adam: b2")  # None means "no momentum" only


@pytest.mark.parametrize(
    "build, exc, message",
    [
        (lambda: lrmult.sgd(0.1, 0.9, nesterov="yes"), TypeError, "sgd: nesterov must be True"),
        (lambda: lrmult.sgd("0.1"), TypeError, "sgd: learning_rate: learning rate must be"),
        (lambda: lrmult.sgd(0.1, weight_decay=-1.0), ValueError, "weight_decay"),
        (lambda: lrmult.nag(0.1, momentum=1.0), ValueError, r"momentum must be in [0, 1)"),
        (lambda: lrmult.adam(0.1, eps_root=-1e-3), ValueError, "adam: eps_root must be >= 0"),
        (lambda: lrmult.adamw(0.1, b2=1.0), ValueError, "adamw: b2 must be in [0, 1)"),
        (lambda: lrmult.rmsprop(0.1, centered=1), TypeError, "rmsprop: centered must be True"),
        (lambda: lrmult.rmsprop(0.1, eps_in_sqrt=None), TypeError, "rmsprop: eps_in_sqrt must"),
        (lambda: lrmult.rmsprop(0.1, bias_correction=0), TypeError, "rmsprop: bias_correction"),
        (lambda: lrmult.rmsprop(0.1, initial_scale=-1.0), ValueError, "rmsprop: initial_scale"),
        (lambda: lrmult.rmsprop(0.1, momentum=1.0), ValueError, "rmsprop: momentum must be in"),
        (
            lambda: lrmult.adagrad(0.1, initial_accumulator_value=-0.1),
            ValueError,
            "adagrad: initial_accumulator_value must be >= 0",
        ),
        (lambda: lrmult.lamb(0.1, b1=-0.5), ValueError, "lamb: b1 must be in [0, 1)"),
        (lambda: lrmult.lion(0.1, b1=True), TypeError, "lion: b1 must be a number, got True"),
        (lambda: lrmult.lion(math.nan), ValueError, "lion: learning_rate: learning rate must"),
        (
            lambda: lrmult.optimizers.custom(optax.scale_by_sign(), -0.5),
            ValueError,
            "custom: learning_rate: learning rate must be a finite number >= 0",
        ),
    ],
)
def test_ready_chains_refuse_a_bad_hyperparameter_when_built_naming_it(build, exc, message):
    with pytest.raises(exc) as info:
        build()
    assert message in str(info.value)
