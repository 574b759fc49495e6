"""Stacked (scanned) layers: one `(L, ...)` leaf per stack, per-layer multipliers and names."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_numerics import CASES, TorchRef

import lrmult
from lrmult import ParamDict, Trainer

L, D = 4, 3
RNG = np.random.default_rng(0)
KERNEL = (RNG.normal(size=(L, D, D)) / 2).astype(np.float32)
BIAS = (RNG.normal(size=(L, D)) / 4).astype(np.float32)
X = RNG.normal(size=(8, D)).astype(np.float32)
Y = np.sin(X).astype(np.float32)
LR_MULT = np.array([0.25, 0.5, 1.0, 2.0])
WD_MULT = np.array([1.0, 0.0, 0.5, 2.0])


def stacked_loss(tree, x, y):
    def layer(h, kb):
        k, b = kb
        return jnp.tanh(h @ k + b), None

    h, _ = jax.lax.scan(layer, x, (tree["layers"]["kernel"], tree["layers"]["bias"]))
    return jnp.mean((h - y) ** 2)


def unstacked_loss(layers, x, y):
    h = x
    for k, b in layers:
        h = jnp.tanh(h @ k + b)
    return jnp.mean((h - y) ** 2)


_unstacked_grad = jax.jit(jax.grad(unstacked_loss))


def torch_per_layer_groups(case, steps):
    """PyTorch's optimizer on the unstacked model, one param group per layer (lr η·m_l,
    weight_decay λ·d_l), gradients of the unstacked model."""
    ref = TorchRef(CASES[case].hp)
    hp = ref.hp
    layers = [[KERNEL[i].astype(np.float64), BIAS[i].astype(np.float64)] for i in range(L)]
    states = [[{}, {}] for _ in range(L)]
    for _ in range(steps):
        params32 = [(jnp.float32(k), jnp.float32(b)) for k, b in layers]
        grads = _unstacked_grad(params32, X, Y)
        for i in range(L):
            lr, wd = hp["lr"] * LR_MULT[i], hp["wd"] * WD_MULT[i]
            for j in range(2):
                g = np.asarray(grads[i][j], np.float64)
                p, state = layers[i][j], states[i][j]
                step = ref._sgd if hp["kind"] == "sgd" else ref._adam
                layers[i][j] = step(p, g, lr, wd, state)
    return np.stack([k for k, _ in layers]), np.stack([b for _, b in layers])


def stacked_params():
    tree = {"layers": {"kernel": jnp.asarray(KERNEL), "bias": jnp.asarray(BIAS)}}
    pd = ParamDict.from_pytree(tree, stacked={"layers": 1})
    pd.setattr("lr_mult", LR_MULT).setattr("wd_mult", WD_MULT)
    return tree, pd


@pytest.mark.parametrize("case", ["sgd_momentum", "sgd_nesterov", "adam_l2", "adamw"])
@pytest.mark.parametrize("driver", ["trainer", "optax"])
def test_per_layer_multipliers_equal_torch_param_groups_per_layer(case, driver):
    tree, pd = stacked_params()
    steps = 20
    if driver == "trainer":
        name, opts = CASES[case].trainer
        trainer = Trainer(pd, name, opts)
        for _ in range(steps):
            trainer.train_step(stacked_loss, X, Y)
        got = pd.tree()["layers"]
    else:
        tx = CASES[case].chain(pd)
        state = tx.init(tree)

        @jax.jit
        def step(params, state):
            g = jax.grad(stacked_loss)(params, X, Y)
            u, state = tx.update(g, state, params)
            return optax.apply_updates(params, u), state

        params = tree
        for _ in range(steps):
            params, state = step(params, state)
        got = params["layers"]
    kernel, bias = torch_per_layer_groups(case, steps)
    np.testing.assert_allclose(got["kernel"], kernel, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(got["bias"], bias, rtol=2e-4, atol=2e-5)


def test_per_layer_names_select_and_setattr_one_entry(compiles):
    tree = {
        "layers": {"attn": {"kernel": jnp.ones((L, 2, 2))}, "ln": {"scale": jnp.ones((L, 2))}},
        "head": {"kernel": jnp.ones((2, 1))},
    }
    pd = ParamDict.from_pytree(tree, stacked={"layers": 1})
    assert list(pd.select("layers/3/attn/")) == ["layers/attn/kernel"]
    pd.select("layers/[0-1]/").setattr("lr_mult", 0.1)
    np.testing.assert_array_equal(pd["layers/attn/kernel"].lr_mult, [0.1, 0.1, 1.0, 1.0])
    np.testing.assert_array_equal(pd["layers/ln/scale"].lr_mult, [0.1, 0.1, 1.0, 1.0])
    assert pd["head/kernel"].lr_mult == 1.0
    # changing one layer's value never recompiles a tracked optax step
    tx = lrmult.sgd(1.0, param_dict=pd)
    state = tx.init(pd.tree())
    update = jax.jit(tx.update)
    g = jax.tree.map(jnp.ones_like, pd.tree())
    u, _ = update(g, state, pd.tree())
    np.testing.assert_allclose(u["layers"]["attn"]["kernel"][:, 0, 0], [-0.1, -0.1, -1, -1])
    count = compiles()
    pd.select("layers/2/").setattr("lr_mult", 3.0)
    u, _ = update(g, state, pd.tree())
    assert count() == 0
    np.testing.assert_allclose(u["layers"]["ln"]["scale"][:, 0], [-0.1, -0.1, -3.0, -1.0])
    rows = {r.name: r for r in lrmult.explain(state)}
    assert rows["layers/2/attn/kernel"].lr == pytest.approx(3.0)
    assert rows["layers/0/ln/scale"].shape == (2,)
    assert "layers/attn/kernel" not in rows


def test_stack_errors_name_the_parameter_and_both_shapes():
    pd = ParamDict.from_pytree({"layers": {"w": jnp.ones((L, 2))}}, stacked={"layers": 1})
    with pytest.raises(ValueError, match=r"'layers/w'.*shape \(3,\).*shape \(4, 2\)"):
        pd["layers/w"].lr_mult = np.ones(3)
    with pytest.raises(ValueError, match="finite numbers >= 0"):
        pd["layers/w"].wd_mult = np.array([1.0, -1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="prefix of no parameter name"):
        ParamDict.from_pytree({"layers": {"w": jnp.ones((L, 2))}}, stacked={"blocks": 1})
    with pytest.raises(ValueError, match="not supported yet"):
        pd.select("layers/0/").setattr("frozen", True)
    assert pd["layers/w"].frozen is False and pd["layers/w"].lr_mult == 1.0  # nothing changed


def test_presets_judge_stacks_by_layer():
    tree = {
        "embed": {"embedding": jnp.ones((5, 2))},
        "layers": {"ln": {"scale": jnp.ones((L, 2))}, "mlp": {"kernel": jnp.ones((L, 2, 2))}},
        "head": {"kernel": jnp.ones((2, 1))},
    }
    pd = ParamDict.from_pytree(tree, stacked={"layers": 1})
    lrmult.presets.layerwise_lr_decay(pd, 0.5)
    # timm's ids: embed 0, layers/i -> i + 1, head num_layers = L + 1 = 5
    np.testing.assert_allclose(pd["layers/mlp/kernel"].lr_mult, [0.5**4, 0.5**3, 0.5**2, 0.5])
    assert pd["embed/embedding"].lr_mult == 0.5**5 and pd["head/kernel"].lr_mult == 1.0
    lrmult.presets.no_decay(pd)  # a stacked (L, d) LayerNorm scale is 1-D per layer
    np.testing.assert_array_equal(pd["layers/ln/scale"].wd_mult, np.zeros(L))
    assert not pd["layers/mlp/kernel"].is_set("wd_mult")


def test_array_multipliers_survive_a_checkpoint(tmp_path):
    tree, pd = stacked_params()
    trainer = Trainer(pd, "adam", {"learning_rate": 0.01})
    trainer.train_step(stacked_loss, X, Y)
    trainer.save_states(tmp_path / "t")
    pd["layers/kernel"].lr_mult = np.ones(L)
    trainer.load_states(tmp_path / "t")
    np.testing.assert_array_equal(pd["layers/kernel"].lr_mult, LR_MULT)
    np.testing.assert_array_equal(pd["layers/bias"].wd_mult, WD_MULT)
