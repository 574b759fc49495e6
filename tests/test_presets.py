"""Presets: the formulas, checked against literal numbers, and their effect on a training step."""

import jax.numpy as jnp
import numpy as np
import pytest

import lrmult
from lrmult import ParamDict, presets


def tree():
    return {
        "embed": {"kernel": jnp.full((2, 2), 2.0)},
        "layers": [
            {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.full(2, 2.0)},
            {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.full(2, 2.0)},
        ],
        "head": {"kernel": jnp.full((2, 1), 2.0), "bias": jnp.full(1, 2.0)},
        "norm": {"scale": jnp.full(2, 2.0)},
    }


def ones_like(params):
    return {n: jnp.ones(p.shape) for n, p in params.items()}


def test_layerwise_lr_decay_default_layer_ids_follow_timms_formula():
    params = ParamDict.from_pytree(tree())
    changed = presets.layerwise_lr_decay(params, 0.5)
    # Blocks layers/0, layers/1 have ids 1, 2; embed 0; head and norm num_layers = 2 + 1 = 3.
    # lr_mult = 0.5 ** (3 - id): embed 0.125, layers/0 0.25, layers/1 0.5, head and norm 1.0.
    assert params["embed/kernel"].lr_mult == 0.125
    assert params["layers/0/kernel"].lr_mult == params["layers/0/bias"].lr_mult == 0.25
    assert params["layers/1/kernel"].lr_mult == params["layers/1/bias"].lr_mult == 0.5
    assert params["head/kernel"].lr_mult == params["head/bias"].lr_mult == 1.0
    assert params["norm/scale"].lr_mult == 1.0
    assert len(changed) == 8 and changed["embed/kernel"] is params["embed/kernel"]


@pytest.mark.parametrize(
    "name, expected",
    [
        ("layers/3/attn/kernel", 4),
        ("encoder/layers_3/kernel", 4),
        ("blocks/0/mlp/kernel", 1),
        ("block_11/norm/scale", 12),
        ("h/2/attn/kernel", 3),
        ("encoder/layer/5/kernel", 6),
        ("embed/embedding", 0),
        ("patch_embed/kernel", 0),
        ("pos_embedding", 0),
        ("cls_token", 0),
        ("head/kernel", 7),
        ("final_norm/scale", 7),
        ("post_norm/scale", 7),
        ("wpe/pos", 0),
    ],
)
def test_default_layer_id_reads_block_numbers_and_embeddings(name, expected):
    assert presets.default_layer_id(name, 7) == expected


def test_layerwise_lr_decay_with_num_layers_and_a_layer_id_function():
    params = ParamDict.from_pytree(tree())
    presets.layerwise_lr_decay(params, 0.5, num_layers=5)
    # ids unchanged (embed 0, layers 1, 2) but head and norm now at 5: 0.5 ** (5 - id).
    assert params["embed/kernel"].lr_mult == 0.5**5
    assert params["layers/1/bias"].lr_mult == 0.5**3
    assert params["head/kernel"].lr_mult == 1.0

    params = ParamDict.from_pytree(tree())
    ids = {"embed": 0, "layers": 1, "head": 2}
    changed = presets.layerwise_lr_decay(params, 0.1, layer_id=lambda n: ids.get(n.split("/")[0]))
    # num_layers defaults to the largest id, 2; None leaves norm/scale alone.
    assert params["embed/kernel"].lr_mult == pytest.approx(0.01)
    assert params["layers/0/kernel"].lr_mult == params["layers/1/bias"].lr_mult == 0.1
    assert params["head/bias"].lr_mult == 1.0
    assert not params["norm/scale"].is_set("lr_mult") and "norm/scale" not in changed


def test_layerwise_lr_decay_groups_ulmfit_factor():
    params = ParamDict.from_pytree(tree())
    changed = presets.layerwise_lr_decay(
        params, 1 / 2.6, groups=["layers/0/", "layers/1/", "head/"]
    )
    assert params["layers/0/kernel"].lr_mult == pytest.approx(1 / 6.76)
    assert params["layers/1/kernel"].lr_mult == pytest.approx(1 / 2.6)
    assert params["head/kernel"].lr_mult == 1.0
    assert not params["embed/kernel"].is_set("lr_mult") and len(changed) == 6


def test_presets_compose_multiplicatively_and_name_themselves_in_explain():
    params = ParamDict.from_pytree(tree())
    params.select("head/").setattr("lr_mult", 10.0)
    params["layers/0/kernel"].lr_mult = 2.0
    params["layers/0/kernel"].wd_mult = 3.0
    presets.layerwise_lr_decay(params, 0.5)
    presets.no_decay(params)
    assert params["head/kernel"].lr_mult == 10.0  # 10 x 0.5 ** 0
    assert params["layers/0/kernel"].lr_mult == 0.5  # 2 x 0.25
    assert params["layers/0/kernel"].wd_mult == 3.0  # a kernel: no_decay leaves it
    assert params["layers/0/bias"].wd_mult == 0.0
    presets.layerwise_lr_decay(params, 0.5)  # again: multiplies again
    assert params["embed/kernel"].lr_mult == 0.125**2
    trainer = lrmult.Trainer(params, "sgd", {"learning_rate": 0.1, "wd": 0.5})
    rows = {r.name: r for r in trainer.explain()}
    assert rows["layers/0/kernel"].lr_source == "preset:layerwise_lr_decay"
    assert rows["layers/0/kernel"].wd_source == "param"
    assert rows["layers/0/bias"].wd_source == "preset:no_decay"
    assert rows["layers/0/kernel"].lr == pytest.approx(0.1 * 2 * 0.25 * 0.25)
    assert "preset:layerwise_lr_decay" in str(trainer.explain())
    params["head/kernel"].lr_mult = 1.0  # the user again
    assert trainer.explain()[params.index("head/kernel")].lr_source == "param"


def test_layerwise_lr_decay_scales_each_layers_step():
    params = ParamDict.from_pytree(tree())
    presets.layerwise_lr_decay(params, 0.5)
    trainer = lrmult.Trainer(params, "sgd", {"learning_rate": 1.0})
    trainer.step(ones_like(params))
    # w = 2 - 1.0 * lr_mult * 1
    np.testing.assert_allclose(params["embed/kernel"].data(), 2 - 0.125)
    np.testing.assert_allclose(params["layers/0/bias"].data(), 2 - 0.25)
    np.testing.assert_allclose(params["layers/1/kernel"].data(), 2 - 0.5)
    np.testing.assert_allclose(params["head/bias"].data(), 2 - 1.0)
    np.testing.assert_allclose(params["norm/scale"].data(), 2 - 1.0)


def test_layerwise_lr_decay_refuses_overlapping_groups_and_changes_nothing():
    params = ParamDict.from_pytree(tree())
    with pytest.raises(ValueError, match="'layers/0/bias' is matched by group 0 .* and group 1"):
        presets.layerwise_lr_decay(params, 0.5, groups=["layers/", "layers/0/"])
    assert not any(p.is_set("lr_mult") for p in params.values())


@pytest.mark.parametrize("decay", [0, -0.5, float("nan"), float("inf"), True, "0.5"])
def test_layerwise_lr_decay_refuses_bad_decay(decay):
    params = ParamDict.from_pytree(tree())
    with pytest.raises(ValueError, match="decay must be a finite number > 0"):
        presets.layerwise_lr_decay(params, decay)


def test_layerwise_lr_decay_refuses_bad_layers_and_changes_nothing():
    params = ParamDict.from_pytree(tree())
    with pytest.raises(TypeError, match="list of patterns"):
        presets.layerwise_lr_decay(params, 0.5, groups="layers/")
    with pytest.raises(TypeError, match="list of patterns"):
        presets.layerwise_lr_decay(params, 0.5, groups=[])
    with pytest.raises(ValueError, match="'blocks/' matches no parameter"):
        presets.layerwise_lr_decay(params, 0.5, groups=["embed/", "blocks/"])
    with pytest.raises(ValueError, match="'layers/1/bias' has layer id 2, outside"):
        presets.layerwise_lr_decay(params, 0.5, num_layers=1)
    with pytest.raises(TypeError, match="returned 'x', not an int"):
        presets.layerwise_lr_decay(params, 0.5, layer_id=lambda n: 1 if "head" in n else "x")
    with pytest.raises(TypeError, match="not both"):
        presets.layerwise_lr_decay(params, 0.5, layer_id=len, groups=["head/"])
    with pytest.raises(ValueError, match="underflows to 0 for 'embed/kernel'"):
        presets.layerwise_lr_decay(params, 1e-200, num_layers=3)
    flat = ParamDict.from_pytree({"w": jnp.ones(2)})
    with pytest.raises(ValueError, match="no parameter name has a block number"):
        presets.layerwise_lr_decay(flat, 0.5)
    assert not any(p.is_set("lr_mult") for p in params.values())


def test_layerwise_lr_decay_refuses_an_overflowing_product_and_changes_nothing():
    params = ParamDict.from_pytree(tree())
    params["embed/kernel"].lr_mult = 1e38
    with pytest.raises(ValueError, match="'embed/kernel.*exceeds float32"):
        presets.layerwise_lr_decay(params, 100.0)
    assert params["embed/kernel"].lr_mult == 1e38
    assert not params["head/kernel"].is_set("lr_mult")


def test_no_decay_picks_low_rank_and_norm_parameters():
    params = ParamDict.from_pytree(tree())
    changed = presets.no_decay(params)
    assert list(changed) == ["head/bias", "layers/0/bias", "layers/1/bias", "norm/scale"]
    trainer = lrmult.Trainer(params, "sgd", {"learning_rate": 0.1, "wd": 0.5})
    trainer.step(ones_like(params))
    # kernels: 2 - 0.1 * (1 + 0.5 * 2) = 1.8; biases and scales: 2 - 0.1 * 1 = 1.9
    np.testing.assert_allclose(params["layers/0/kernel"].data(), 1.8, rtol=1e-6)
    np.testing.assert_allclose(params["layers/0/bias"].data(), 1.9, rtol=1e-6)
    np.testing.assert_allclose(params["norm/scale"].data(), 1.9, rtol=1e-6)


def test_no_decay_by_name_alone_matches_biases_and_norm_modules():
    two_d = {
        "LayerNorm_0": {"scale": jnp.ones((1, 2))},
        "ln_f": {"weight": jnp.ones((1, 2))},
        "bn1": {"gamma": jnp.ones((1, 2))},
        "Dense_0": {"bias": jnp.ones((1, 2)), "kernel": jnp.ones((2, 2))},
        "embed": {"embedding": jnp.ones((3, 2))},
    }
    params = ParamDict.from_pytree(two_d)
    changed = presets.no_decay(params, by_rank=False)
    assert sorted(changed) == ["Dense_0/bias", "LayerNorm_0/scale", "bn1/gamma", "ln_f/weight"]
    params = ParamDict.from_pytree(tree())
    assert list(presets.no_decay(params, by_rank=False, names="norm/")) == ["norm/scale"]
    assert params["norm/scale"].wd_mult == 0.0 and not params["head/bias"].is_set("wd_mult")


def test_no_decay_mxnet_decays_only_weight_gamma_kernel():
    params = ParamDict.from_pytree(
        {
            "dense0_weight": jnp.ones((2, 2)),
            "dense0_bias": jnp.ones(2),
            "bn_gamma": jnp.ones(2),
            "bn_beta": jnp.ones(2),
            "bn_running_mean": jnp.ones(2),
            "conv": {"kernel": jnp.ones((2, 2))},
        }
    )
    changed = presets.no_decay(params, mxnet=True)
    assert sorted(changed) == ["bn_beta", "bn_running_mean", "dense0_bias"]
    assert not params["bn_gamma"].is_set("wd_mult")  # MXNet decays gamma


def test_no_decay_errors_change_nothing():
    params = ParamDict.from_pytree(tree())
    kernels = ParamDict.from_pytree({"a": jnp.ones((2, 2))})
    with pytest.raises(ValueError, match="nothing would change"):
        presets.no_decay(kernels)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        presets.no_decay(params, names=["bias", "("])
    with pytest.raises(TypeError, match="by_rank must be True or False"):
        presets.no_decay(params, by_rank="yes")
    with pytest.raises(TypeError, match="must be a ParamDict"):
        presets.no_decay(tree())
    assert not any(p.is_set("wd_mult") for p in params.values())


def test_linear_probe_trains_the_head_only_then_unfreezes():
    params = ParamDict.from_pytree(tree())
    head = presets.linear_probe(params, "head/")
    assert list(head) == ["head/bias", "head/kernel"]
    assert [n for n, p in params.items() if not p.frozen] == ["head/bias", "head/kernel"]
    assert params["embed/kernel"].origin("frozen") == "preset:linear_probe"
    trainer = lrmult.Trainer(params, "sgd", {"learning_rate": 0.1})
    trainer.step(ones_like(params))
    np.testing.assert_array_equal(params["layers/0/kernel"].data(), 2.0)
    np.testing.assert_allclose(params["head/kernel"].data(), 1.9, rtol=1e-6)
    params.setattr("frozen", False)  # LP-FT: now everything trains
    trainer.step(ones_like(params))
    np.testing.assert_allclose(params["layers/0/kernel"].data(), 1.9, rtol=1e-6)
    np.testing.assert_allclose(params["head/kernel"].data(), 1.8, rtol=1e-6)


def test_linear_probe_refuses_a_head_matching_everything_and_changes_nothing():
    params = ParamDict.from_pytree(tree())
    with pytest.raises(ValueError, match="matches every parameter"):
        presets.linear_probe(params, ".*")
    with pytest.raises(ValueError, match="matches no parameter"):
        presets.linear_probe(params, "classifier/")
    assert not any(p.is_set("frozen") for p in params.values())
