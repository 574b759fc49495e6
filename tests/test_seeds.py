"""Four scenarios, each with independently derived numbers.

A. Chainer's per-parameter update rules on an XOR MLP. B. PyTorch's param_groups on two scalars.
C. One trainer for a shared trunk and several heads. D. MXNet's set_lr_mult and Gluon's setattr on
ParamDicts merged into one trainer.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lrmult import ParamDict, Parameter, Trainer

# -- A. Chainer's per-parameter rules on the XOR MLP ---------------------------------------------

X = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], np.float32)
T = np.array([[0], [1], [1], [0]], np.float32)


def xor_params():
    rng = np.random.default_rng(0)
    return {
        "l1": {"W": rng.normal(size=(2, 2)).astype(np.float32), "b": np.full(2, 0.1, np.float32)},
        "l2": {"W": rng.normal(size=(2, 1)).astype(np.float32), "b": np.full(1, -0.2, np.float32)},
    }


def xor_loss(p, x, t):
    h = jax.nn.sigmoid(x @ p["l1"]["W"] + p["l1"]["b"])
    y = h @ p["l2"]["W"] + p["l2"]["b"]
    return jnp.mean(jax.nn.softplus(y) - t * y)  # sigmoid cross-entropy


def xor_grads_by_hand(p):
    """Backpropagation written out in NumPy (float64)."""
    p = {k: {n: v.astype(np.float64) for n, v in d.items()} for k, d in p.items()}
    z = X @ p["l1"]["W"] + p["l1"]["b"]
    h = 1 / (1 + np.exp(-z))
    y = h @ p["l2"]["W"] + p["l2"]["b"]
    dy = (1 / (1 + np.exp(-y)) - T) / y.size
    dh = dy @ p["l2"]["W"].T
    dz = dh * h * (1 - h)
    return {
        "l1": {"W": X.T @ dz, "b": dz.sum(0)},
        "l2": {"W": h.T @ dy, "b": dy.sum(0)},
    }


def test_seed_a_lr_100x_on_l1_W_and_l1_b_disabled():
    init = xor_params()
    pd = ParamDict.from_pytree(jax.tree.map(jnp.asarray, init))
    pd["l1/W"].lr_mult = 100.0  # Chainer: l1.W.update_rule.hyperparam.lr = 10.0 with base 0.1
    pd["l1/b"].grad_req = "null"  # Chainer: l1.b.update_rule.enabled = False
    trainer = Trainer(pd, "sgd", {"learning_rate": 0.1})
    trainer.train_step(xor_loss, X, T)
    g = xor_grads_by_hand(init)
    np.testing.assert_allclose(pd["l1/W"].data(), init["l1"]["W"] - 10.0 * g["l1"]["W"], rtol=1e-5)
    np.testing.assert_allclose(pd["l2/W"].data(), init["l2"]["W"] - 0.1 * g["l2"]["W"], rtol=1e-5)
    np.testing.assert_allclose(pd["l2/b"].data(), init["l2"]["b"] - 0.1 * g["l2"]["b"], rtol=1e-5)
    np.testing.assert_array_equal(pd["l1/b"].data(), init["l1"]["b"])  # bit-identical


def test_seed_a_multiplier_scales_the_change_exactly():
    def change(mult):
        init = xor_params()
        pd = ParamDict.from_pytree(jax.tree.map(jnp.asarray, init))
        pd["l1/W"].lr_mult = mult
        Trainer(pd, "sgd", {"learning_rate": 0.1}).train_step(xor_loss, X, T)
        return np.asarray(pd["l1/W"].data(), np.float64) - init["l1"]["W"]

    np.testing.assert_allclose(change(100.0), 100.0 * change(1.0), rtol=1e-4)


def test_seed_a_whole_link_disable_and_enable_update():
    init = xor_params()
    pd = ParamDict.from_pytree(jax.tree.map(jnp.asarray, init))
    trainer = Trainer(pd, "sgd", {"learning_rate": 0.1})
    pd.select("l2/").setattr("frozen", True)  # link.disable_update()
    trainer.train_step(xor_loss, X, T)
    np.testing.assert_array_equal(pd["l2/W"].data(), init["l2"]["W"])
    assert not np.array_equal(pd["l1/W"].data(), init["l1"]["W"])
    pd.select("l2/").setattr("frozen", False)  # link.enable_update()
    trainer.train_step(xor_loss, X, T)
    assert not np.array_equal(pd["l2/W"].data(), init["l2"]["W"])


def test_seed_a_weight_decay_hook_on_one_parameter():
    init = xor_params()
    pd = ParamDict.from_pytree(jax.tree.map(jnp.asarray, init))
    pd.setattr("wd_mult", 0.0)
    pd["l1/W"].wd_mult = 1.0  # update_rule.add_hook(WeightDecay(1e-4)) on l1.W only
    Trainer(pd, "sgd", {"learning_rate": 0.1, "wd": 1e-4}).train_step(xor_loss, X, T)
    g = xor_grads_by_hand(init)
    w = init["l1"]["W"]
    np.testing.assert_allclose(pd["l1/W"].data(), w - 0.1 * (g["l1"]["W"] + 1e-4 * w), rtol=1e-6)
    np.testing.assert_allclose(pd["l2/W"].data(), init["l2"]["W"] - 0.1 * g["l2"]["W"], rtol=1e-6)


def test_seed_a_schedule_on_the_base_rate_keeps_every_ratio():
    pd = ParamDict.from_pytree({"l1": {"W": jnp.zeros(2)}, "l2": {"W": jnp.zeros(2)}})
    pd["l1/W"].lr_mult = 100.0
    schedule = optax.exponential_decay(0.1, transition_steps=1, decay_rate=0.5)
    trainer = Trainer(pd, "sgd", {"learning_rate": schedule})
    ones = {"l1/W": jnp.ones(2), "l2/W": jnp.ones(2)}
    before = pd.arrays()
    for k in range(4):
        assert trainer.learning_rate == pytest.approx(0.1 * 0.5**k)
        trainer.step(ones)
        after = pd.arrays()
        d1 = float(after["l1/W"][0] - before["l1/W"][0])
        d2 = float(after["l2/W"][0] - before["l2/W"][0])
        assert d2 == pytest.approx(-0.1 * 0.5**k, rel=1e-5)
        assert d1 == pytest.approx(100 * d2, rel=1e-5)
        before = after


# -- B. PyTorch's param_groups on two scalars ----------------------------------------------------


def two_scalars():
    x = Parameter(jnp.float32(5.0), name="x")
    c = Parameter(jnp.float32(3.0), name="c")
    return x, c, ParamDict({"x": x, "c": c})


def y_of(p, b, d):
    return 3 * p["c"] * jnp.exp(p["x"]) + b * p["x"] + d


def test_seed_b_one_sgd_step_at_lr_1():
    x, c, pd = two_scalars()
    trainer = Trainer(pd, "sgd", {"learning_rate": 1.0})
    y = trainer.train_step(y_of, 2.0, 4.0)
    assert float(y) == pytest.approx(1349.7185, rel=1e-6)
    assert float(x.data()) == pytest.approx(5 - 1337.7185, rel=1e-6)  # -1332.7185
    assert float(c.data()) == pytest.approx(3 - 445.2395, rel=1e-6)  # -442.2395


def test_seed_b_lr_01_for_c():
    x, c, pd = two_scalars()
    c.lr_mult = 0.1
    Trainer(pd, "sgd", {"learning_rate": 1.0}).train_step(y_of, 2.0, 4.0)
    assert float(c.data()) == pytest.approx(3 - 44.52395, rel=1e-6)  # -41.52395
    assert float(x.data()) == pytest.approx(-1332.7185, rel=1e-6)


def test_seed_b_frozen_x_stays_5():
    x, c, pd = two_scalars()
    x.frozen = True
    Trainer(pd, "sgd", {"learning_rate": 1.0}).train_step(y_of, 2.0, 4.0)
    assert float(x.data()) == 5.0
    assert float(c.data()) == pytest.approx(-442.2395, rel=1e-6)


def test_seed_b_changing_a_groups_rate_between_steps():
    x, c, pd = two_scalars()
    trainer = Trainer(pd, "sgd", {"learning_rate": 1e-4})
    trainer.train_step(y_of, 2.0, 4.0)
    x1, c1 = float(x.data()), float(c.data())
    c.lr_mult = 1000.0  # param_groups[1]['lr'] = 0.1
    trainer.train_step(y_of, 2.0, 4.0)
    gx = 3 * c1 * np.exp(x1) + 2.0
    gc = 3 * np.exp(x1)
    assert float(x.data()) == pytest.approx(x1 - 1e-4 * gx, rel=1e-5)
    assert float(c.data()) == pytest.approx(c1 - 0.1 * gc, rel=1e-5)


def test_seed_b_a_value_is_found_by_its_name():
    x, c, pd = two_scalars()
    trainer = Trainer(pd, "sgd", {"learning_rate": 1.0})
    x.set_data(jnp.float32(0.0))  # "replacing the tensor" goes through the Parameter
    trainer.train_step(y_of, 2.0, 4.0)
    assert float(trainer.params["x"].data()) == pytest.approx(0 - (3 * 3 + 2), rel=1e-6)


# -- C. One trainer, a shared trunk and several heads with their own losses -----------------------


def conv(x, w):
    return jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def test_seed_c_trunk_and_heads_share_one_trainer_and_one_jitted_step(compiles):
    key = jax.random.PRNGKey(0)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    trunk = ParamDict.from_pytree(
        {"conv": jax.random.normal(k1, (3, 3, 1, 4)) * 0.3}, prefix="trunk/"
    )
    heads = [
        ParamDict.from_pytree({"w": jax.random.normal(k, (4 * 16, 3)) * 0.1}, prefix=f"head{i}/")
        for i, k in enumerate((k2, k3))
    ]
    trunk.setattr("lr_mult", 0.1)
    heads[1].setattr("lr_mult", 2.0)
    x = jax.random.normal(k4, (8, 4, 4, 1))
    labels = [jnp.arange(8) % 3, (jnp.arange(8) + 1) % 3]

    def head_loss(tree, i, x, y):
        feats = jax.nn.relu(conv(x, tree["trunk"]["conv"])).reshape(x.shape[0], -1)
        logits = feats @ tree[f"head{i}"]["w"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def total(tree, x, y0, y1):
        return head_loss(tree, 0, x, y0) + head_loss(tree, 1, x, y1)

    trainer = Trainer([trunk, *heads], "sgd", {"learning_rate": 0.5})
    tree0 = trainer.params.tree()
    g0 = jax.grad(head_loss)(tree0, 0, x, labels[0])
    g1 = jax.grad(head_loss)(tree0, 1, x, labels[1])
    counter = compiles()
    trainer.train_step(total, x, *labels)
    assert counter("lrmult_train_step") == 1
    new = trainer.params.tree()
    np.testing.assert_allclose(
        new["trunk"]["conv"],
        tree0["trunk"]["conv"] - 0.5 * 0.1 * (g0["trunk"]["conv"] + g1["trunk"]["conv"]),
        rtol=1e-5,
        atol=1e-7,
    )
    np.testing.assert_allclose(
        new["head1"]["w"], tree0["head1"]["w"] - 1.0 * g1["head1"]["w"], rtol=1e-5, atol=1e-7
    )
    np.testing.assert_allclose(
        new["head0"]["w"], tree0["head0"]["w"] - 0.5 * g0["head0"]["w"], rtol=1e-5, atol=1e-7
    )


# -- D. MXNet's set_lr_mult and Gluon's ParamDict.setattr ---------------------------------------


def conv1_model():
    rng = np.random.default_rng(1)
    params = {
        "conv1_weight": jnp.asarray(rng.normal(size=(3, 3, 1, 2)), jnp.float32),
        "conv1_bias": jnp.asarray(rng.normal(size=(2,)), jnp.float32),
    }
    x = jnp.asarray(rng.normal(size=(1, 5, 5, 1)), jnp.float32)
    return ParamDict.from_pytree(params), x


def conv1_out(p, x):
    return conv(x, p["conv1_weight"]) + p["conv1_bias"]


def make_loss(p, x):  # MXNet's MakeLoss(sum of the output)
    return jnp.sum(conv1_out(p, x))


@pytest.mark.parametrize("replace", [False, True])
def test_seed_d_two_set_lr_mult_calls(replace):
    pd, x = conv1_model()
    trainer = Trainer(pd, "sgd", {"learning_rate": 0.1})
    before = conv1_out(pd.tree(), x)
    w0, b0 = np.asarray(pd["conv1_weight"].data()), np.asarray(pd["conv1_bias"].data())
    trainer.set_lr_mult({"conv1_weight": 0})
    trainer.set_lr_mult({"conv1_bias": 0}, replace=replace)
    for _ in range(4):
        trainer.train_step(make_loss, x)
    after = conv1_out(pd.tree(), x)
    if replace:  # MXNet: the second call dropped the first, the weights moved
        assert not np.allclose(after, before)
        assert not np.array_equal(pd["conv1_weight"].data(), w0)
        np.testing.assert_array_equal(pd["conv1_bias"].data(), b0)
    else:  # lrmult merges: the layer is frozen in effect
        np.testing.assert_array_equal(after, before)


def test_seed_d_one_dict_freezes_the_layer():
    pd, x = conv1_model()
    trainer = Trainer(pd, "sgd", {"learning_rate": 0.1})
    before = conv1_out(pd.tree(), x)
    trainer.set_lr_mult({"conv1_weight": 0, "conv1_bias": 0})
    for _ in range(4):
        trainer.train_step(make_loss, x)
    np.testing.assert_array_equal(conv1_out(pd.tree(), x), before)


def test_seed_d_gluon_setattr_on_two_models_merged_into_one_trainer():
    rng = np.random.default_rng(2)

    def arr(*shape):
        return jnp.asarray(rng.normal(size=shape) * 0.1, jnp.float32)

    model = ParamDict.from_pytree(
        {
            "embedding0_weight": arr(10, 4),
            "lstm0_i2h_weight": arr(4, 16),
            "dense0_weight": arr(4, 2),
        },
        prefix="model_",
    )
    cells = ParamDict.from_pytree(
        {"lstm_l0_i2h_weight": arr(2, 8), "lstm_l1_i2h_weight": arr(2, 8)}, prefix="stack_"
    )
    model.setattr("lr_mult", 0.01)
    cells.setattr("lr_mult", 10)
    merged = ParamDict()
    merged.update(model)
    merged.update(cells)
    assert merged["model_dense0_weight"].lr_mult == 0.01
    assert merged["stack_lstm_l1_i2h_weight"].lr_mult == 10.0
    trainer = Trainer(merged, "sgd", {"learning_rate": 0.5})
    grads = {n: jnp.ones(p.shape) for n, p in merged.items()}
    before = merged.arrays()
    trainer.step(grads)
    for name, p in merged.items():
        expected = before[name] - 0.5 * p.lr_mult
        np.testing.assert_allclose(p.data(), expected, rtol=1e-6, atol=1e-7)
    rows = {r.name: r for r in trainer.explain()}
    assert rows["stack_lstm_l0_i2h_weight"].lr == pytest.approx(5.0)
    assert rows["model_embedding0_weight"].lr_source == "param"
