"""Stacked (scanned) layers: one `(L, ...)` leaf per stack, per-layer multipliers and names."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_numerics import CASES, TorchRef

import lrmult
from lrmult import ParamDict, Trainer
from lrmult.lookup import Rows

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
    return torch_frozen_then_unfrozen(case, steps, frozen_layers=set(), unfreeze_at=0)


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
    with pytest.raises(ValueError, match="frozen must hold bools"):
        pd["layers/w"].frozen = np.array([1.0, 0.0, 0.0, 0.0])
    assert pd["layers/w"].frozen is False and pd["layers/w"].lr_mult == 1.0  # nothing changed


def torch_frozen_then_unfrozen(case, steps, frozen_layers, unfreeze_at):
    """PyTorch with requires_grad=False on `frozen_layers` until step `unfreeze_at`: those layers
    keep no state, then start fresh (their own step count)."""
    ref = TorchRef(CASES[case].hp)
    hp = ref.hp
    layers = [[KERNEL[i].astype(np.float64), BIAS[i].astype(np.float64)] for i in range(L)]
    states = [[{}, {}] for _ in range(L)]
    for t in range(steps):
        params32 = [(jnp.float32(k), jnp.float32(b)) for k, b in layers]
        grads = _unstacked_grad(params32, X, Y)
        for i in range(L):
            if i in frozen_layers and t < unfreeze_at:
                continue
            lr, wd = hp["lr"] * LR_MULT[i], hp["wd"] * WD_MULT[i]
            for j in range(2):
                step = ref._sgd if hp["kind"] == "sgd" else ref._adam
                g = np.asarray(grads[i][j], np.float64)
                layers[i][j] = step(layers[i][j], g, lr, wd, states[i][j])
    return np.stack([k for k, _ in layers]), np.stack([b for _, b in layers])


@pytest.mark.parametrize("case", ["sgd_momentum", "adam_l2", "adamw"])
@pytest.mark.parametrize("driver", ["trainer", "optax"])
def test_frozen_layers_then_unfrozen_equal_torch_requires_grad(case, driver, compiles):
    tree, pd = stacked_params()
    pd.select("layers/[0-1]/").setattr("frozen", True)
    frozen_rows = np.array([True, True, False, False])
    np.testing.assert_array_equal(pd["layers/kernel"].frozen_layers, frozen_rows)
    if driver == "trainer":
        name, opts = CASES[case].trainer
        trainer = Trainer(pd, name, opts)

        def run(n):
            for _ in range(n):
                trainer.train_step(stacked_loss, X, Y)

        def unfreeze():
            pd.select("layers/[0-1]/").setattr("frozen", False)

        def state():
            return trainer.opt_state

    else:
        tx = CASES[case].chain(pd)
        box = {"params": tree, "state": tx.init(tree)}

        @jax.jit
        def step(params, state):
            g = jax.grad(stacked_loss)(params, X, Y)
            u, state = tx.update(g, state, params)
            return optax.apply_updates(params, u), state

        def run(n):
            for _ in range(n):
                box["params"], box["state"] = step(box["params"], box["state"])

        def unfreeze():
            pd.select("layers/[0-1]/").setattr("frozen", False)
            with pytest.raises(ValueError, match=r"'layers/bias' was frozen in layers \[0, 1\]"):
                step(box["params"], box["state"])
            box["state"] = lrmult.refresh(box["state"], pd)

        def state():
            return box["state"]

    run(10)
    # frozen layers hold no state: no moments, no momentum buffer for rows 0-1
    groups = [
        x
        for x in jax.tree.leaves(state(), is_leaf=lambda x: isinstance(x, Rows))
        if isinstance(x, Rows)
    ]
    assert groups and all(g.rows == (2, 3) for g in groups)
    count = compiles()
    unfreeze()
    run(10)
    assert count("jit(step)") + count("lrmult_train_step") == 1  # one for the new frozen set
    got = pd.tree()["layers"] if driver == "trainer" else box["params"]["layers"]
    kernel, bias = torch_frozen_then_unfrozen(case, 20, {0, 1}, 10)
    np.testing.assert_allclose(got["kernel"], kernel, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(got["bias"], bias, rtol=2e-4, atol=2e-5)


def test_frozen_layers_are_left_out_of_global_norm_clipping():
    tree, pd = stacked_params()
    pd.setattr("lr_mult", None).setattr("wd_mult", None)
    pd.select("layers/[0-1]/").setattr("frozen", True)
    trainer = Trainer(pd, "sgd", {"learning_rate": 1.0, "clip_global_norm": 0.01})
    g = jax.grad(stacked_loss)(tree, X, Y)["layers"]
    trainable = [np.asarray(g["kernel"])[2:], np.asarray(g["bias"])[2:]]
    norm = np.sqrt(sum(float(np.sum(x.astype(np.float64) ** 2)) for x in trainable))
    scale = min(1.0, 0.01 / norm)
    trainer.train_step(stacked_loss, X, Y)
    got = pd.tree()["layers"]
    np.testing.assert_array_equal(got["kernel"][:2], KERNEL[:2])
    np.testing.assert_allclose(got["kernel"][2:], KERNEL[2:] - scale * trainable[0], rtol=1e-5)
    np.testing.assert_allclose(got["bias"][2:], BIAS[2:] - scale * trainable[1], rtol=1e-5)
    rows = {r.name: r for r in trainer.explain()}
    assert rows["layers/0/kernel"].frozen and rows["layers/0/kernel"].lr == 0.0
    assert not rows["layers/2/kernel"].frozen


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


def test_nnx_trainer_on_an_nnx_scan_model_applies_per_layer_multipliers():
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(D, D, rngs=rngs)

        def __call__(self, x):
            return jnp.tanh(self.lin(x))

    class Model(nnx.Module):
        def __init__(self, rngs):
            @nnx.split_rngs(splits=L)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(rngs):
                return Block(rngs)

            self.layers = make(rngs)

        def __call__(self, x):
            @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
            def run(block, x):
                return block(x)

            return run(self.layers, x)

    model = Model(nnx.Rngs(0))
    model.layers.lin.kernel[...] = jnp.asarray(KERNEL)
    model.layers.lin.bias[...] = jnp.asarray(BIAS)
    pd = lrmult.from_nnx(model, stacked={"layers": 1})
    pd.setattr("lr_mult", LR_MULT).setattr("wd_mult", WD_MULT)
    trainer = lrmult.NNXTrainer(
        model, pd, "sgd", {"learning_rate": 0.05, "momentum": 0.9, "wd": 0.1}
    )

    def loss_fn(model, x, y):
        return jnp.mean((model(x) - y) ** 2)

    for _ in range(20):
        trainer.train_step(loss_fn, X, Y)
    kernel, bias = torch_per_layer_groups("sgd_momentum", 20)
    np.testing.assert_allclose(model.layers.lin.kernel[...], kernel, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(model.layers.lin.bias[...], bias, rtol=2e-4, atol=2e-5)


SHARDED = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import NamedSharding, PartitionSpec as P
import lrmult

mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("layer", "model"))
k = jnp.arange(4 * 2 * 8, dtype=jnp.float32).reshape(4, 2, 8) / 64
for spec in (P("layer", None, "model"), P(None, None, "model")):
    tree = {"layers": {"k": jax.device_put(k, NamedSharding(mesh, spec))}}
    pd = lrmult.ParamDict.from_pytree(tree, stacked={"layers": 1})
    pd["layers/k"].lr_mult = np.array([0.0, 0.5, 1.0, 2.0])
    tx = lrmult.sgd(1.0, param_dict=pd)
    state = tx.init(tree)
    step = jax.jit(lambda p, s: tx.update(jax.tree.map(jnp.ones_like, p), s, p))
    u, _ = step(tree, state)
    np.testing.assert_allclose(np.asarray(u["layers"]["k"])[:, 0, 0], [0.0, -0.5, -1.0, -2.0])
    mults = [m for _, m in lrmult.resync.find(state, lrmult.transforms.MultState)]
    np.testing.assert_array_equal(mults[-1].tree(tree)["layers"]["k"], [0.0, 0.5, 1.0, 2.0])
    (block,) = mults[-1].values  # one block, holding the stack's vector of 4
    assert block.shape == (lrmult.transforms.BLOCK,)
    assert block.sharding.is_equivalent_to(NamedSharding(mesh, P()), 1)
print("OK")
"""


def test_sharded_stacked_leaves_layer_axis_sharded_or_replicated():
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", SHARDED], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr[-3000:]


def test_a_partly_frozen_stack_shows_its_frozen_layers():
    pd = ParamDict.from_pytree({"layers": {"k": jnp.ones((4, 2, 2))}}, stacked={"layers": 1})
    pd.select("layers/[0-1]/").setattr("frozen", True)
    assert "[True, True, -, -]" in str(pd)  # layers 2-3 were never set: '-'
    assert "frozen=[True, True, -, -]" in repr(pd["layers/k"])
    np.testing.assert_array_equal(pd["layers/k"].frozen_layers, [True, True, False, False])
    assert pd["layers/k"].frozen is False  # the leaf still trains: its gradient is computed


# -- per-layer settings are per-layer "set": untouched layers fall through the chain -----------

ETA = 0.1
GRAD = jax.grad(stacked_loss)({"layers": {"kernel": KERNEL, "bias": BIAS}}, X, Y)["layers"]


def bare_stack():
    tree = {"layers": {"kernel": jnp.asarray(KERNEL), "bias": jnp.asarray(BIAS)}}
    return ParamDict.from_pytree(tree, stacked={"layers": 1})


def sgd_step_kernel(pd, lr_overrides=None):
    """One plain SGD step (lr ETA) through the Trainer; the new kernel."""
    trainer = Trainer(pd, "sgd", {"learning_rate": ETA})
    if lr_overrides:
        trainer.set_lr_mult(lr_overrides)
    rows = {r.name: r for r in trainer.explain()}
    trainer.train_step(stacked_loss, X, Y)
    return np.asarray(pd["layers/kernel"].data()), rows


def expected_kernel(mults):
    """w_l - η·m_l·g_l, layer by layer."""
    return np.stack([KERNEL[i] - ETA * mults[i] * np.asarray(GRAD["kernel"][i]) for i in range(L)])


def test_untouched_layers_stay_unset_and_fall_through_to_the_overrides():
    pd = bare_stack()
    pd.select("layers/[0-1]/").setattr("lr_mult", 0.5)
    p = pd["layers/kernel"]
    assert p.is_set("lr_mult")
    np.testing.assert_array_equal(p.set_mask("lr_mult"), [True, True, False, False])
    # the leaf's own name acts on layers 2-3, which the Parameter leaves unset
    kernel, rows = sgd_step_kernel(pd, {"layers/kernel": 3.0})
    np.testing.assert_allclose(kernel, expected_kernel([0.5, 0.5, 3.0, 3.0]), rtol=1e-6)
    assert [rows[f"layers/{i}/kernel"].lr_source for i in range(L)] == ["param"] * 2 + ["name"] * 2
    assert [rows[f"layers/{i}/kernel"].lr_mult for i in range(L)] == [0.5, 0.5, 3.0, 3.0]
    assert rows["layers/3/kernel"].lr == pytest.approx(ETA * 3.0)
    assert rows["layers/3/bias"].lr_source == "default"  # the bias's layers 2-3: no override


def test_unsetting_some_layers_unsets_those_only():
    pd = bare_stack()
    pd.setattr("lr_mult", 0.5)
    pd.select("layers/[2-3]/").setattr("lr_mult", None)
    p = pd["layers/kernel"]
    np.testing.assert_array_equal(p.set_mask("lr_mult"), [True, True, False, False])
    np.testing.assert_array_equal(p.lr_mult, [0.5, 0.5, 1.0, 1.0])
    pd.select("layers/[0-1]/").setattr("lr_mult", None)
    assert not p.is_set("lr_mult") and p.lr_mult == 1.0  # nothing left set: plainly unset
    pd.setattr("lr_mult", 2.0)
    del pd["layers/kernel"].lr_mult  # del on the Parameter unsets every layer
    assert not p.is_set("lr_mult")


def test_unset_layers_read_the_default_and_explain_says_so():
    pd = bare_stack()
    pd.select("layers/1/").setattr("wd_mult", 0.0)
    trainer = Trainer(pd, "sgd", {"learning_rate": ETA, "wd": 0.5})
    rows = {r.name: r for r in trainer.explain()}
    assert [rows[f"layers/{i}/bias"].wd_source for i in range(L)] == [
        "default",
        "param",
        "default",
        "default",
    ]
    assert rows["layers/1/bias"].wd == 0.0 and rows["layers/0/bias"].wd == pytest.approx(0.5)


def test_rules_and_presets_name_their_own_layers_only():
    pd = bare_stack()
    lrmult.apply_rules(pd, [("layers/[0-1]/", {"lr_mult": 0.1}), ("layers/3/", {"lr_mult": 0.2})])
    trainer = Trainer(pd, "sgd", {"learning_rate": ETA})
    rows = {r.name: r for r in trainer.explain()}
    assert [rows[f"layers/{i}/kernel"].lr_source for i in range(L)] == [
        "rule 0 'layers/[0-1]/'",
        "rule 0 'layers/[0-1]/'",
        "default",
        "rule 1 'layers/3/'",
    ]
    # a preset on a selection of layers composes on those layers only
    lrmult.presets.layerwise_lr_decay(pd.select("layers/[2-3]/"), 0.5, num_layers=4)
    p = pd["layers/kernel"]
    np.testing.assert_allclose(p.lr_mult, [0.1, 0.1, 0.5, 0.2])  # ids 3, 4 of top 4: 0.5, 1
    assert list(p.origin("lr_mult")) == [
        "rule 0 'layers/[0-1]/'",
        "rule 0 'layers/[0-1]/'",
        "preset:layerwise_lr_decay",
        "preset:layerwise_lr_decay",
    ]


def test_linear_probe_on_the_top_layer_of_a_stack_freezes_the_others():
    pd = bare_stack()
    lrmult.presets.linear_probe(pd, "layers/3/")
    np.testing.assert_array_equal(pd["layers/kernel"].frozen_layers, [True, True, True, False])


def test_per_layer_set_ness_survives_describe_and_a_trainer_checkpoint(tmp_path):
    pd = bare_stack()
    pd.select("layers/[0-1]/").setattr("lr_mult", 0.5)
    pd.select("layers/3/").setattr("frozen", True)
    trainer = Trainer(pd, "sgd", {"learning_rate": ETA})
    trainer.set_lr_mult({"layers/kernel": 3.0})
    trainer.train_step(stacked_loss, X, Y)
    described = {d["name"]: d for d in pd.describe()}["layers/kernel"]
    assert described["origin"]["lr_mult"] == ["param", "param", None, None]
    trainer.save_states(tmp_path / "t")

    def seen():
        return [
            (r.name, r.lr_mult, r.lr_source, r.frozen, r.frozen_source) for r in trainer.explain()
        ]

    before = seen()
    pd.setattr("lr_mult", 2.0).setattr("frozen", None)  # everything set, then restored
    trainer.load_states(tmp_path / "t")
    p = pd["layers/kernel"]
    np.testing.assert_array_equal(p.set_mask("lr_mult"), [True, True, False, False])
    np.testing.assert_array_equal(p.set_mask("frozen"), [False, False, False, True])
    after = seen()
    assert after == before
    assert ("layers/2/kernel", 3.0, "name", False, "default") in after


def test_a_checkpoint_from_before_per_layer_set_ness_reads_as_set_on_every_layer():
    pd = bare_stack()
    p = pd["layers/kernel"]
    p.restore_metadata({"lr_mult": [0.5, 0.5, 1.0, 1.0], "wd_mult": None, "frozen": None})
    assert p.origin("lr_mult") == "param" and np.all(p.set_mask("lr_mult"))


def test_a_per_layer_array_value_takes_the_selected_entries():
    pd = bare_stack()
    pd.select("layers/[1-2]/").setattr("lr_mult", np.array([9.0, 0.2, 0.3, 9.0]))
    np.testing.assert_array_equal(pd["layers/kernel"].lr_mult, [1.0, 0.2, 0.3, 1.0])
    with pytest.raises(ValueError, match=r"'layers/bias'.*shape \(3,\).*shape \(4, 3\)"):
        pd.select("layers/[1-2]/").setattr("lr_mult", np.ones(3))
    np.testing.assert_array_equal(pd["layers/kernel"].lr_mult, [1.0, 0.2, 0.3, 1.0])


# -- override dicts name single layers of a stack ------------------------------------------------


def test_set_lr_mult_by_per_layer_name():
    pd = bare_stack()
    kernel, rows = sgd_step_kernel(pd, {"layers/3/kernel": 0.1, "layers/1/kernel": 0.0})
    np.testing.assert_allclose(kernel, expected_kernel([1.0, 0.0, 1.0, 0.1]), rtol=1e-6)
    assert (rows["layers/3/kernel"].lr_mult, rows["layers/3/kernel"].lr_source) == (0.1, "name")
    assert rows["layers/0/kernel"].lr_source == "default"
    np.testing.assert_array_equal(pd["layers/bias"].data(), BIAS - ETA * GRAD["bias"])


def test_a_layer_name_refines_the_leaf_name_and_an_index_beats_both():
    pd = bare_stack()
    _, rows = sgd_step_kernel(pd, {"layers/kernel": 2.0, "layers/0/kernel": 0.5})
    assert [rows[f"layers/{i}/kernel"].lr_mult for i in range(L)] == [0.5, 2.0, 2.0, 2.0]
    index = pd.index("layers/kernel")
    _, rows = sgd_step_kernel(bare_stack(), {index: 4.0, "layers/0/kernel": 0.5})
    assert [rows[f"layers/{i}/kernel"].lr_source for i in range(L)] == ["index"] * L


def test_per_layer_override_errors_are_loud_and_change_nothing():
    pd = bare_stack()
    pd.select("layers/3/").setattr("lr_mult", 2.0)
    trainer = Trainer(pd, "sgd", {"learning_rate": ETA})
    trainer.set_lr_mult({"layers/2/kernel": 0.1})
    with pytest.raises(KeyError, match=r"'layers/9/kernel' names no parameter.*did you mean"):
        trainer.set_lr_mult({"layers/0/kernel": 0.3, "layers/9/kernel": 0.1})
    with pytest.raises(ValueError, match=r"'layers/3/kernel' for layer \[3\].*never act.*=2"):
        trainer.set_lr_mult({"layers/3/kernel": 0.1})
    assert trainer.set_lr_mult({}) == {"layers/2/kernel": 0.1}  # the failed calls merged nothing
    trainer.set_lr_mult({"layers/kernel": 0.7})  # acts on layers 0-2: allowed
    pd.setattr("wd_mult", 0.0)
    with pytest.raises(ValueError, match=r"'layers/kernel'.*never act"):
        trainer.set_wd_mult({"layers/kernel": 0.5})


def test_a_layer_override_shadowed_later_warns_once():
    pd = bare_stack()
    trainer = Trainer(pd, "sgd", {"learning_rate": ETA})
    trainer.set_lr_mult({"layers/3/kernel": 0.1, "layers/kernel": 0.2})
    trainer.train_step(stacked_loss, X, Y)
    pd.select("layers/3/").setattr("lr_mult", 5.0)
    with pytest.warns(UserWarning, match="'layers/3/kernel' no longer acts") as caught:
        trainer.train_step(stacked_loss, X, Y)
    assert len(caught) == 1  # the leaf's own name still acts on layers 0-2


def test_optax_level_overrides_by_per_layer_name():
    pd = bare_stack()
    lam = 0.5
    tx = optax.chain(
        lrmult.add_decayed_weights(lam, pd, wd_mult={"layers/1/kernel": 0.0}),
        optax.sgd(ETA),
        lrmult.scale_by_lr_mult(pd, lr_mult={"layers/3/kernel": 0.1}),
    )
    tree = pd.tree()
    state = tx.init(tree)
    g = jax.grad(stacked_loss)(tree, X, Y)
    u, _ = jax.jit(tx.update)(g, state, tree)
    m, d = [1.0, 1.0, 1.0, 0.1], [1.0, 0.0, 1.0, 1.0]
    want = np.stack(
        [-ETA * m[i] * (np.asarray(GRAD["kernel"][i]) + lam * d[i] * KERNEL[i]) for i in range(L)]
    )
    np.testing.assert_allclose(u["layers"]["kernel"], want, rtol=1e-5)
    rows = {r.name: r for r in lrmult.explain(state, learning_rate=ETA)}
    assert (rows["layers/1/kernel"].wd_mult, rows["layers/1/kernel"].wd_source) == (0.0, "name")
    assert rows["layers/3/kernel"].lr == pytest.approx(ETA * 0.1)


def test_optax_level_per_layer_override_errors():
    pd = bare_stack()
    with pytest.raises(KeyError, match=r"'layers/7/kernel' names no parameter"):
        lrmult.scale_by_lr_mult(pd, lr_mult={"layers/7/kernel": 0.1}).init(pd.tree())
    with pytest.raises(KeyError, match="stacks declared with .*param_dict="):
        lrmult.scale_by_lr_mult(lr_mult={"layers/3/kernel": 0.1}).init(pd.tree())
    pd.select("layers/3/").setattr("lr_mult", 2.0)
    with pytest.raises(ValueError, match=r"'layers/3/kernel' for layer \[3\].*never act"):
        lrmult.sgd(ETA, param_dict=pd, lr_mult={"layers/3/kernel": 0.1})


def test_per_layer_override_keys_survive_a_non_strict_load(tmp_path):
    pd = bare_stack()
    trainer = Trainer(pd, "sgd", {"learning_rate": ETA})
    trainer.set_lr_mult({"layers/3/kernel": 0.1})
    trainer.save_states(tmp_path / "t")
    fresh = bare_stack()
    other = Trainer(fresh, "sgd", {"learning_rate": ETA})
    other.load_states(tmp_path / "t", strict=False)
    assert other.set_lr_mult({}) == {"layers/3/kernel": 0.1}
    rows = {r.name: r for r in other.explain()}
    assert (rows["layers/3/kernel"].lr_mult, rows["layers/3/kernel"].lr_source) == (0.1, "name")


# -- stacks found by the partition name flax records (nnx.vmap / nnx.scan, Linen nn.scan) --------


def nnx_stacked_model(out_axes=0, mark=("attn", "mlp"), sizes=(L,)):
    """An nnx.vmap-built stack per size: attn and mlp partitioned, their LayerNorm not; a head."""
    from flax import nnx

    init = nnx.initializers.lecun_normal()

    def linear(part, rngs):
        if part in mark:
            return nnx.Linear(D, D, kernel_init=nnx.with_partitioning(init, (None, "m")), rngs=rngs)
        return nnx.Linear(D, D, rngs=rngs)

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.attn = linear("attn", rngs)
            self.mlp = linear("mlp", rngs)
            self.ln = nnx.LayerNorm(D, rngs=rngs)

        def __call__(self, x):
            return self.ln(jnp.tanh(self.mlp(jnp.tanh(self.attn(x)))))

    def stack(n, rngs):
        @nnx.split_rngs(splits=n)
        @nnx.vmap(
            in_axes=(0,), out_axes=out_axes, transform_metadata={nnx.PARTITION_NAME: "layers"}
        )
        def make(rngs):
            return Block(rngs)

        return make(rngs)

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.layers = stack(sizes[0], rngs)
            if len(sizes) > 1:
                self.decoder = stack(sizes[1], rngs)
            self.head = nnx.Linear(
                D, 1, kernel_init=nnx.with_partitioning(init, ("m", None)), rngs=rngs
            )

        def __call__(self, x):
            @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
            def run(block, x):
                return block(x)

            return self.head(run(self.layers, x))

    with nnx.use_eager_sharding(False):  # partition names without a mesh
        return Model(nnx.Rngs(0))


def test_from_nnx_finds_the_stack_by_its_partition_name_and_trains_per_layer():
    from flax import nnx

    model = nnx_stacked_model()
    pd = lrmult.from_nnx(model, stacked="layers")
    declared = lrmult.from_nnx(nnx_stacked_model(), stacked={"layers": 1})
    assert {n: p.stacked for n, p in pd.items()} == {n: p.stacked for n, p in declared.items()}
    assert pd["layers/ln/scale"].stacked == 1  # not partitioned, but inside the stack
    assert pd["head/kernel"].stacked == 0
    assert "layers/2/mlp/kernel" in pd.units()
    lrmult.presets.no_decay(pd)  # a stacked LayerNorm scale (L, d) is 1-D per layer
    np.testing.assert_array_equal(pd["layers/ln/scale"].wd_mult, np.zeros(L))
    assert not pd["layers/mlp/kernel"].is_set("wd_mult")
    mults = np.array([0.0, 0.5, 1.0, 2.0])
    pd.select("layers/").setattr("lr_mult", mults)

    def loss_fn(model, x, y):
        return jnp.mean((model(x) - y[:, :1]) ** 2)

    grads = nnx.grad(loss_fn)(model, X, Y)
    before = np.asarray(model.layers.mlp.kernel[...])
    trainer = lrmult.NNXTrainer(model, pd, "sgd", {"learning_rate": ETA})
    trainer.train_step(loss_fn, X, Y)
    g = np.asarray(grads["layers"]["mlp"]["kernel"][...])
    want = before - ETA * mults[:, None, None] * g  # w_l - η·m_l·g_l
    np.testing.assert_allclose(model.layers.mlp.kernel[...], want, rtol=1e-5, atol=1e-7)


def test_from_linen_finds_an_nn_scan_stack_by_its_partition_name():
    import flax.linen as nn

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            init = nn.with_partitioning(nn.initializers.lecun_normal(), (None, "m"))
            x = jnp.tanh(nn.Dense(D, kernel_init=init)(x))
            x = jnp.tanh(nn.Dense(D, kernel_init=init)(x))
            return nn.LayerNorm()(x), None

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            scan = nn.scan(
                Block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                length=L,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = scan(name="layers")(x, None)
            return nn.Dense(1)(x)

    model = Model()
    variables = model.init(jax.random.PRNGKey(0), X)
    pd = ParamDict.from_pytree(variables["params"], stacked="layers")
    assert {n for n, p in pd.items() if p.stacked} == {
        "layers/Dense_0/bias",
        "layers/Dense_0/kernel",
        "layers/Dense_1/bias",
        "layers/Dense_1/kernel",
        "layers/LayerNorm_0/bias",  # no box, no partition name: inside the stack all the same
        "layers/LayerNorm_0/scale",
    }
    # the boxes survive: the partition spec still names the stacked axis
    spec = nn.get_partition_spec(pd.tree())["layers"]["Dense_0"]["kernel"]
    assert tuple(spec) == ("layers", None, "m")
    pd.select("layers/[0-1]/").setattr("frozen", True)

    def loss_fn(params, x, y):
        return jnp.mean((model.apply({"params": params}, x) - y[:, :1]) ** 2)

    start = nn.meta.unbox(variables["params"])
    g = jax.grad(loss_fn)(start, X, Y)["layers"]["Dense_0"]["kernel"]
    trainer = Trainer(pd, "sgd", {"learning_rate": ETA})
    trainer.train_step(lambda tree, x, y: loss_fn(nn.meta.unbox(tree), x, y), X, Y)
    got = np.asarray(pd["layers/Dense_0/kernel"].data())
    w = np.asarray(start["layers"]["Dense_0"]["kernel"])
    np.testing.assert_array_equal(got[:2], w[:2])  # frozen layers: exactly unchanged
    np.testing.assert_allclose(got[2:], w[2:] - ETA * np.asarray(g)[2:], rtol=1e-5, atol=1e-7)


def test_two_stacks_with_one_partition_name_are_told_apart_by_their_sizes():
    model = nnx_stacked_model(sizes=(L, 2))
    pd = lrmult.from_nnx(model, stacked="layers")
    assert "layers/3/attn/kernel" in pd.units() and "decoder/1/ln/scale" in pd.units()
    assert "decoder/2/attn/kernel" not in pd.units()


def test_partition_name_errors_say_what_to_declare():
    with pytest.raises(ValueError, match=r"no parameter's partition names hold 'layer' \(did you"):
        lrmult.from_nnx(nnx_stacked_model(), stacked="layer")
    with pytest.raises(ValueError, match=r"only on parameters created with partitioning"):
        lrmult.from_nnx(nnx_stacked_model(mark=()), stacked="layers")
    with pytest.raises(ValueError, match=r"'layers/attn/kernel' of shape \(3, 4, 3\).*position 1"):
        lrmult.from_nnx(nnx_stacked_model(out_axes=1), stacked="layers")
    # only mlp partitioned: its LayerNorm beside it has L layers too, so where the stack starts
    # ('layers' or 'layers/mlp') is not decided by the metadata
    with pytest.raises(ValueError, match=r"'layers/attn/bias'.*may belong to the same stack"):
        lrmult.from_nnx(nnx_stacked_model(mark=("mlp",)), stacked="layers")
    with pytest.raises(ValueError, match=r"no flax partitioning metadata.*stacked=\{'layers': 1\}"):
        ParamDict.from_pytree({"layers": {"w": jnp.ones((L, 2))}}, stacked="layers")
