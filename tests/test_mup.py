"""presets.mup against microsoft/mup's rules, transcribed here on the equivalent PyTorch shapes."""

import importlib.util
import math
import pathlib
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrmult
from lrmult import ParamDict, presets

# A transformer-like model in flax's layout, at width d = 32 (4 heads of 8 -> here 8 heads of 4,
# head_dim fixed), MLP width 64, and its base at d = 8 (2 heads), MLP width 32: the MLP grows by
# 2, d by 4, so fan-in and fan-out multipliers differ. Vocabulary 50 and context 16 are fixed.
# Each entry: flax shape, flax base shape, then the same parameter in PyTorch's model (what mup
# sees): nn.Embedding (vocab, d), nn.Linear (out, in) with heads x head_dim fused, shape, base.
MODEL = {
    "embed/embedding": ((50, 32), (50, 8), (50, 32), (50, 8)),
    "pos_embed": ((16, 32), (16, 8), (16, 32), (16, 8)),
    "layers_0/attn/query/kernel": ((32, 8, 4), (8, 2, 4), (32, 32), (8, 8)),
    "layers_0/attn/query/bias": ((8, 4), (2, 4), (32,), (8,)),
    "layers_0/attn/key/kernel": ((32, 8, 4), (8, 2, 4), (32, 32), (8, 8)),
    "layers_0/attn/value/kernel": ((32, 8, 4), (8, 2, 4), (32, 32), (8, 8)),
    "layers_0/attn/out/kernel": ((8, 4, 32), (2, 4, 8), (32, 32), (8, 8)),
    "layers_0/attn/out/bias": ((32,), (8,), (32,), (8,)),
    "layers_0/ln/scale": ((32,), (8,), (32,), (8,)),
    "layers_0/ln/bias": ((32,), (8,), (32,), (8,)),
    "layers_0/mlp/fc1/kernel": ((32, 64), (8, 32), (64, 32), (32, 8)),
    "layers_0/mlp/fc1/bias": ((64,), (32,), (64,), (32,)),
    "layers_0/mlp/fc2/kernel": ((64, 32), (32, 8), (32, 64), (8, 32)),
    "final_norm/scale": ((32,), (8,), (32,), (8,)),
    "head/kernel": ((32, 50), (8, 50), (50, 32), (50, 8)),  # MuReadout(d, vocab)
    "head/bias": ((50,), (50,), (50,), (50,)),
}


def flax_shapes(which):
    return {name: entry[which] for name, entry in MODEL.items()}


def model_params(seed=0):
    rng = np.random.default_rng(seed)
    tree = {n: jnp.asarray(rng.normal(size=s), jnp.float32) for n, s in flax_shapes(0).items()}
    return ParamDict.from_pytree(tree)


def mup_reference(shapes, base, delta=None, optimizer="adam", lr=1.0, wd=1.0):
    """`{name: (lr, weight_decay)}` of mup's param groups, from PyTorch-layout shapes.

    A transcription of mup/infshape.py and mup/optim.py (MuAdam, MuAdamW = MuAdam on AdamW,
    MuSGD): a dim is infinite when base and target (or base and delta) differ; its width_mult is
    dim / base_dim; InfShape.width_mult() is the last infinite dim's; fanin, fanout are dims
    [1], [0].
    """
    out = {}
    for name, shape in shapes.items():
        b = base[name]
        other = shape if delta is None else delta[name]
        mult = [s / bb if bb != o else None for s, bb, o in zip(shape, b, other, strict=True)]
        inf = [m for m in mult if m is not None]
        if len(inf) > 2:
            raise NotImplementedError("more than 2 inf dimensions")
        g_lr, g_wd = lr, wd
        if optimizer in ("adam", "adamw"):
            if len(inf) == 2:
                width_mult = inf[-1]
                g_lr, g_wd = lr / width_mult, wd * width_mult
        elif len(inf) == 1:
            g_lr, g_wd = lr * inf[0], wd / inf[0]
        elif len(inf) == 2:
            ratio = (mult[1] or 1) / (mult[0] or 1)
            g_lr, g_wd = lr / ratio, wd * ratio
        out[name] = (g_lr, g_wd)
    return out


def reference_for_model(optimizer, lr=1.0, wd=1.0):
    return mup_reference(flax_shapes(2), flax_shapes(3), None, optimizer, lr, wd)


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_mup_matches_mups_param_groups_on_a_transformer(optimizer):
    params = model_params()
    changed = presets.mup(params, flax_shapes(1), optimizer=optimizer)
    ref = reference_for_model(optimizer)
    for name, (lr, wd) in ref.items():
        p = params[name]
        assert p.lr_mult == pytest.approx(lr, rel=1e-12), name
        assert p.wd_mult == pytest.approx(wd, rel=1e-12), name
        assert (name in changed) == (lr != 1 or wd != 1), name
        assert p.is_set("lr_mult") == (lr != 1), name  # factor 1: the Parameter is left alone


def test_mup_numbers_by_hand():
    # Literal values for the table in the docstring (d grows 4x, the MLP 2x).
    params = model_params()
    presets.mup(params, flax_shapes(1), optimizer="adam")
    assert params["layers_0/attn/query/kernel"].lr_mult == 0.25  # fan-in d: 1/4
    assert params["layers_0/attn/out/kernel"].lr_mult == 0.25  # fan-in heads x head_dim: 1/4
    assert params["layers_0/mlp/fc2/kernel"].lr_mult == 0.5  # fan-in MLP: 1/2
    assert params["layers_0/mlp/fc2/kernel"].wd_mult == 2.0
    assert params["head/kernel"].lr_mult == 1.0  # readout: vector-like for Adam
    params = model_params()
    presets.mup(params, flax_shapes(1), optimizer="sgd")
    assert params["layers_0/mlp/fc1/kernel"].lr_mult == 0.5  # r_out / r_in = 2 / 4
    assert params["layers_0/mlp/fc2/kernel"].lr_mult == 2.0  # 4 / 2
    assert params["layers_0/attn/query/kernel"].lr_mult == 1.0  # 4 / 4
    assert params["head/kernel"].lr_mult == 4.0 and params["head/kernel"].wd_mult == 0.25
    assert params["embed/embedding"].lr_mult == 4.0
    assert not params["head/bias"].is_set("lr_mult")  # no infinite dim


def test_mup_with_delta_shapes_finds_width_dims_at_base_width():
    # The target's MLP is at base width (32); only the delta model (d 16, 4 heads, MLP 64) says
    # the MLP is a width dim. Flax shape, base, delta; then PyTorch's shape, base, delta.
    mlp = {
        "layers_0/mlp/fc1/kernel": ((32, 32), (8, 32), (16, 64), (32, 32), (32, 8), (64, 16)),
        "layers_0/mlp/fc1/bias": ((32,), (32,), (64,), (32,), (32,), (64,)),
        "layers_0/mlp/fc2/kernel": ((32, 32), (32, 8), (64, 16), (32, 32), (8, 32), (16, 64)),
    }
    delta = {  # the rest of MODEL at d 16, 4 heads of 4: flax shape, PyTorch shape
        "embed/embedding": ((50, 16), (50, 16)),
        "pos_embed": ((16, 16), (16, 16)),
        "layers_0/attn/query/kernel": ((16, 4, 4), (16, 16)),
        "layers_0/attn/query/bias": ((4, 4), (16,)),
        "layers_0/attn/key/kernel": ((16, 4, 4), (16, 16)),
        "layers_0/attn/value/kernel": ((16, 4, 4), (16, 16)),
        "layers_0/attn/out/kernel": ((4, 4, 16), (16, 16)),
        "layers_0/attn/out/bias": ((16,), (16,)),
        "layers_0/ln/scale": ((16,), (16,)),
        "layers_0/ln/bias": ((16,), (16,)),
        "final_norm/scale": ((16,), (16,)),
        "head/kernel": ((16, 50), (50, 16)),
        "head/bias": ((50,), (50,)),
    }
    table = {n: (*e[:2], delta[n][0], *e[2:], delta[n][1]) for n, e in MODEL.items() if n in delta}
    table.update(mlp)
    rng = np.random.default_rng(0)
    tree = {n: jnp.asarray(rng.normal(size=e[0]), jnp.float32) for n, e in table.items()}
    base, delta_flax = ({n: e[i] for n, e in table.items()} for i in (1, 2))
    shapes_t, base_t, delta_t = ({n: e[i] for n, e in table.items()} for i in (3, 4, 5))
    for optimizer in ("adam", "sgd"):
        with_delta = ParamDict.from_pytree(tree)
        presets.mup(with_delta, base, delta_shapes=delta_flax, optimizer=optimizer)
        without = ParamDict.from_pytree(tree)
        presets.mup(without, base, optimizer=optimizer)
        ref = mup_reference(shapes_t, base_t, delta_t, optimizer)
        ref_without = mup_reference(shapes_t, base_t, None, optimizer)
        for name in tree:
            assert with_delta[name].lr_mult == pytest.approx(ref[name][0], rel=1e-12), name
            assert with_delta[name].wd_mult == pytest.approx(ref[name][1], rel=1e-12), name
            assert without[name].lr_mult == pytest.approx(ref_without[name][0], rel=1e-12)
            assert without[name].wd_mult == pytest.approx(ref_without[name][1], rel=1e-12)
        fc1 = "layers_0/mlp/fc1/kernel"  # d infinite, the MLP at base width
        if optimizer == "sgd":
            assert with_delta[fc1].lr_mult == 0.25  # matrix-like: r_out / r_in = 1 / 4
            assert without[fc1].lr_mult == 4.0  # vector-like: r = 4
        else:
            assert with_delta[fc1].lr_mult == 0.25  # matrix-like: 1 / r_in
            assert not without[fc1].is_set("lr_mult")  # vector-like


def _load_real_mup(monkeypatch):
    """mup's own infshape.py and optim.py (the pip package, no torch): torch.optim stubbed."""
    spec = importlib.util.find_spec("mup")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the mup package is not installed (pip install --no-deps mup)")
    root = pathlib.Path(spec.submodule_search_locations[0])

    class Recorder:  # stands for torch.optim.Adam / AdamW / SGD: keeps the param groups
        def __init__(self, param_groups, **kwargs):
            self.param_groups = param_groups

    optim_stub = types.ModuleType("torch.optim")
    optim_stub.SGD = optim_stub.Adam = optim_stub.AdamW = Recorder
    torch_stub = types.ModuleType("torch")
    torch_stub.optim = optim_stub
    monkeypatch.setitem(sys.modules, "torch", torch_stub)
    monkeypatch.setitem(sys.modules, "torch.optim", optim_stub)
    mods = {}
    for name in ("infshape", "optim"):  # loaded by path: mup/__init__.py imports torch.nn
        s = importlib.util.spec_from_file_location(f"_real_mup_{name}", root / f"{name}.py")
        mods[name] = importlib.util.module_from_spec(s)
        s.loader.exec_module(mods[name])
    return mods["infshape"], mods["optim"]


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_mup_matches_the_real_mup_package(monkeypatch, optimizer):
    infshape, optim = _load_real_mup(monkeypatch)

    class P:  # a tensor as mup's optimizers see it: its infshape
        def __init__(self, name, infshape):
            self.name, self.infshape = name, infshape

    ps = [P(n, infshape.zip_infshape(e[3], e[2])) for n, e in MODEL.items()]
    make = {"adam": optim.MuAdam, "adamw": optim.MuAdamW, "sgd": optim.MuSGD}[optimizer]
    groups = make(ps, lr=0.3, weight_decay=0.7).param_groups
    got = {p.name: (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    params = model_params()
    presets.mup(params, flax_shapes(1), optimizer=optimizer)
    for name, (lr, wd) in got.items():
        assert 0.3 * params[name].lr_mult == pytest.approx(lr, rel=1e-12), name
        assert 0.7 * params[name].wd_mult == pytest.approx(wd, rel=1e-12), name


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_a_trainer_step_with_mup_gives_pytorchs_mu_optimizer_step(optimizer):
    # One step by hand, with mup's groups: PyTorch's first Adam step has m = (1-b1) g,
    # v = (1-b2) g^2, bias corrections 1-b1 and 1-b2, so the step is lr * g / (|g| + eps).
    # Adam (coupled): g <- g + wd * w first. AdamW: w <- w (1 - lr wd) first. SGD: lr (g + wd w).
    eta, lam = {"adam": (0.01, 1.0), "adamw": (0.01, 0.1), "sgd": (0.1, 0.1)}[optimizer]
    eps = 1e-8  # PyTorch's and lrmult's default
    params = model_params(seed=1)
    w0 = {n: np.asarray(p.data(), np.float64) for n, p in params.items()}
    rng = np.random.default_rng(2)
    grads = {n: rng.normal(size=p.shape).astype(np.float32) for n, p in params.items()}
    presets.mup(params, flax_shapes(1), optimizer=optimizer)
    trainer = lrmult.Trainer(params, optimizer, {"learning_rate": eta, "wd": lam})
    trainer.step({n: jnp.asarray(g) for n, g in grads.items()})
    groups = reference_for_model(optimizer, lr=eta, wd=lam)
    for name, (lr, wd) in groups.items():
        w, g = w0[name], grads[name].astype(np.float64)
        if optimizer == "adam":
            g = g + wd * w
            expected = w - lr * g / (np.abs(g) + eps)
        elif optimizer == "adamw":
            expected = w * (1 - lr * wd) - lr * g / (np.abs(g) + eps)
        else:
            expected = w - lr * (g + wd * w)
        np.testing.assert_allclose(params[name].data(), expected, rtol=2e-6, atol=1e-7)


def test_mup_on_stacked_layers_is_judged_per_layer():
    # Three layers stacked on a leading axis; the base has one layer: stacked axes are skipped.
    tree = {
        "layers": {"fc": {"kernel": jnp.ones((3, 32, 64)), "bias": jnp.ones((3, 64))}},
        "head": {"kernel": jnp.ones((64, 10))},
    }
    base = {"layers/fc/kernel": (1, 8, 32), "layers/fc/bias": (1, 32), "head/kernel": (32, 10)}
    params = ParamDict.from_pytree(tree, stacked={"layers": 1})
    presets.mup(params, base, optimizer="sgd")
    assert params["layers/fc/kernel"].lr_mult == 0.5  # r_out / r_in = 2 / 4, every layer
    assert params["layers/fc/bias"].lr_mult == 2.0 and params["layers/fc/bias"].wd_mult == 0.5
    assert params["head/kernel"].lr_mult == 2.0
    rows = {r.name: r for r in lrmult.Trainer(params, "sgd").explain()}
    assert rows["layers/2/fc/kernel"].lr_source == "preset:mup"
    # Some layers selected: only they change.
    params = ParamDict.from_pytree(tree, stacked={"layers": 1})
    presets.mup(params.select("layers/[01]/"), base, optimizer="adam")
    np.testing.assert_array_equal(params["layers/fc/kernel"].lr_mult, [0.25, 0.25, 1.0])
    np.testing.assert_array_equal(params["layers/fc/kernel"].wd_mult, [4.0, 4.0, 1.0])
    assert not params["head/kernel"].is_set("lr_mult")


def test_mup_layout_torch_reads_out_in_weights():
    torch_tree = {"fc": {"weight": jnp.ones((64, 32))}}  # (out, in): in grows 4x, out 2x
    flax_tree = {"fc": {"weight": jnp.ones((32, 64))}}
    for optimizer, lr in (("adam", 0.25), ("sgd", 0.5)):
        t = ParamDict.from_pytree(torch_tree)
        presets.mup(t, {"fc/weight": (32, 8)}, optimizer=optimizer, layout="torch")
        f = ParamDict.from_pytree(flax_tree)
        presets.mup(f, {"fc/weight": (8, 32)}, optimizer=optimizer)
        assert t["fc/weight"].lr_mult == f["fc/weight"].lr_mult == lr


def test_mup_fan_in_axes_groups_a_densegeneral_kernel():
    # heads and head_dim both grow (2 -> 4, 4 -> 8): three infinite dims, one fused in PyTorch.
    tree = {"q": jnp.ones((32, 4, 8)), "o": jnp.ones((4, 8, 32))}
    base = {"q": (8, 2, 4), "o": (2, 4, 8)}
    with pytest.raises(ValueError, match=r"'o' of per-layer shape \(4, 8, 32\) has 3 infinite"):
        presets.mup(ParamDict.from_pytree(tree), base)
    ref = mup_reference({"q": (32, 32), "o": (32, 32)}, {"q": (8, 8), "o": (8, 8)}, None, "sgd")
    for fan_in in ({"q": 0, "o": (0, 1)}, lambda n: 0 if n == "q" else [-3, -2]):
        params = ParamDict.from_pytree(tree)
        presets.mup(params, base, optimizer="sgd", fan_in_axes=fan_in)
        # q: fan-in d (4x), fan-out heads x head_dim (2 x 2 = 4x); o the other way round.
        assert params["q"].lr_mult == ref["q"][0] == 1.0
    params = ParamDict.from_pytree(tree)
    presets.mup(params, base, optimizer="adam", fan_in_axes={"q": 0, "o": (0, 1)})
    assert params["q"].lr_mult == 0.25 and params["o"].lr_mult == 0.25  # 1 / (2 x 2)


def test_mup_accepts_eval_shape_trees_paramdicts_and_nnx_modules():
    import flax.linen as nn
    from flax import nnx

    class MLP(nn.Module):
        width: int

        @nn.compact
        def __call__(self, x):
            x = nn.LayerNorm()(nn.Dense(self.width)(x))
            return nn.Dense(self.width)(x)

    x = jnp.ones((1, 3))
    base = jax.eval_shape(MLP(4).init, jax.random.PRNGKey(0), x)
    params = ParamDict.from_pytree(MLP(16).init(jax.random.PRNGKey(0), x)["params"])
    with pytest.raises(ValueError, match=r"pass variables\['params'\]"):
        presets.mup(params, base)
    presets.mup(params, base["params"])
    assert params["Dense_1/kernel"].lr_mult == 0.25 and params["Dense_0/kernel"].lr_mult == 1.0
    again = ParamDict.from_pytree(MLP(16).init(jax.random.PRNGKey(0), x)["params"])
    presets.mup(again, ParamDict.from_pytree(MLP(4).init(jax.random.PRNGKey(0), x)["params"]))
    assert again["Dense_1/kernel"].lr_mult == 0.25

    class Net(nnx.Module):
        def __init__(self, width, rngs):
            self.fc1 = nnx.Linear(3, width, rngs=rngs)
            self.fc2 = nnx.Linear(width, width, rngs=rngs)

    abstract = nnx.eval_shape(lambda: Net(4, nnx.Rngs(0)))
    nparams = ParamDict.from_nnx(Net(16, nnx.Rngs(0)))
    presets.mup(nparams, abstract)
    assert nparams["fc2/kernel"].lr_mult == 0.25 and not nparams["fc1/kernel"].is_set("lr_mult")


def test_mup_composes_and_names_itself_in_explain():
    params = model_params()
    params["layers_0/mlp/fc1/kernel"].lr_mult = 3.0
    presets.no_decay(params)
    presets.mup(params, flax_shapes(1), optimizer="adamw")
    assert params["layers_0/mlp/fc1/kernel"].lr_mult == 0.75  # 3 x 1/4
    assert params["layers_0/ln/scale"].wd_mult == 0.0  # no_decay's 0 stays 0
    trainer = lrmult.Trainer(params, "adamw", {"learning_rate": 0.1, "wd": 0.5})
    rows = {r.name: r for r in trainer.explain()}
    assert rows["layers_0/mlp/fc2/kernel"].lr_source == "preset:mup"
    assert rows["layers_0/mlp/fc2/kernel"].lr == pytest.approx(0.05)
    assert rows["layers_0/mlp/fc2/kernel"].wd_source == "preset:mup"
    assert rows["head/kernel"].lr_source == "default"  # Adam: the readout keeps its rate


def test_mup_decoupled_wd_leaves_weight_decay_alone():
    params = model_params()
    presets.mup(params, flax_shapes(1), optimizer="sgd", decoupled_wd=True)
    assert params["head/kernel"].lr_mult == 4.0
    assert not any(p.is_set("wd_mult") for p in params.values())


def test_mup_refuses_bad_inputs_and_changes_nothing():
    params = model_params()
    base = flax_shapes(1)
    bad_rank = {**base, "layers_0/mlp/fc2/kernel": (32, 8, 1)}
    with pytest.raises(ValueError, match=r"'layers_0/mlp/fc2/kernel' has shape \(64, 32\) \(rank"):
        presets.mup(params, bad_rank)
    missing = {n: s for n, s in base.items() if n != "layers_0/ln/bias"}
    with pytest.raises(ValueError, match=r"'layers_0/ln/bias' is not in base_shapes \(did you"):
        presets.mup(params, missing)
    with pytest.raises(ValueError, match="'layers_0/ln/bias' is not in delta_shapes"):
        presets.mup(params, base, delta_shapes=missing)
    with pytest.raises(ValueError, match="delta_shapes equals base_shapes for every parameter"):
        presets.mup(params, base, delta_shapes=dict(base))
    three = {**base, "layers_0/attn/query/kernel": (8, 2, 2)}
    with pytest.raises(ValueError, match="'layers_0/attn/query/kernel' .* has 3 infinite dims"):
        presets.mup(params, three)
    with pytest.raises(ValueError, match="width 32 on axis 0 where the base has 0"):
        presets.mup(params, {**base, "final_norm/scale": (0,)})
    with pytest.raises(ValueError, match="optimizer must be one of .*did you mean .*'adamw'"):
        presets.mup(params, base, optimizer="adamW")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        presets.mup(params, base, optimizer="lion")
    with pytest.raises(ValueError, match="layout must be 'flax'"):
        presets.mup(params, base, layout="jax")
    with pytest.raises(KeyError, match="fan_in_axes key 'head/kernal' names no parameter"):
        presets.mup(params, base, fan_in_axes={"head/kernal": 0})
    with pytest.raises(ValueError, match="gives axis 2, outside its 2 per-layer axes"):
        presets.mup(params, base, fan_in_axes={"layers_0/mlp/fc2/kernel": 2})
    with pytest.raises(ValueError, match="at least one must be fan-in and one fan-out"):
        presets.mup(params, base, fan_in_axes={"layers_0/mlp/fc2/kernel": (0, 1)})
    with pytest.raises(TypeError, match="leaf 'a' is a str"):
        presets.mup(params, {"a": "(2, 3)"})
    with pytest.raises(TypeError, match="must be a ParamDict"):
        presets.mup(flax_shapes(0), base)
    assert not any(p.is_set("lr_mult") or p.is_set("wd_mult") for p in params.values())


def test_mup_reference_transcription_refuses_what_mup_refuses():
    # The transcription itself, on mup's own example shapes (infshape.py's __main__).
    ref = mup_reference({"w": (100, 1024, 128)}, {"w": (100, 128, 128)}, None, "adam")
    assert ref["w"] == (1.0, 1.0)  # one infinite dim: vector-like
    with pytest.raises(NotImplementedError):
        mup_reference({"w": (64, 64, 64)}, {"w": (8, 8, 8)}, None, "adam")
    assert math.isclose(mup_reference({"w": (64, 16)}, {"w": (8, 8)}, None, "sgd")["w"][0], 4)
