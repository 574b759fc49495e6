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


GROUPS = ["embed/", "layers/0/", "layers/1/", "head/"]


def ones_like(params):
    return {n: jnp.ones(p.shape) for n, p in params.items()}


def test_layerwise_lr_decay_formula():
    params = ParamDict.from_pytree(tree())
    changed = presets.layerwise_lr_decay(params, 0.5, GROUPS)
    # decay ** (n - 1 - i) with n = 4 groups: 0.125, 0.25, 0.5, 1.0
    assert params["embed/kernel"].lr_mult == 0.125
    assert params["layers/0/kernel"].lr_mult == params["layers/0/bias"].lr_mult == 0.25
    assert params["layers/1/kernel"].lr_mult == params["layers/1/bias"].lr_mult == 0.5
    assert params["head/kernel"].lr_mult == params["head/bias"].lr_mult == 1.0
    assert not params["norm/scale"].is_set("lr_mult")  # in no group: left alone
    assert "norm/scale" not in changed and len(changed) == 7
    assert changed["embed/kernel"] is params["embed/kernel"]


def test_layerwise_lr_decay_ulmfit_factor():
    params = ParamDict.from_pytree(tree())
    presets.layerwise_lr_decay(params, 1 / 2.6, ["layers/0/", "layers/1/", "head/"])
    assert params["layers/0/kernel"].lr_mult == pytest.approx(1 / 6.76)
    assert params["layers/1/kernel"].lr_mult == pytest.approx(1 / 2.6)
    assert params["head/kernel"].lr_mult == 1.0


def test_layerwise_lr_decay_scales_each_groups_step():
    params = ParamDict.from_pytree(tree())
    presets.layerwise_lr_decay(params, 0.5, GROUPS)
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
        presets.layerwise_lr_decay(params, 0.5, ["layers/", "layers/0/"])
    assert not any(p.is_set("lr_mult") for p in params.values())


@pytest.mark.parametrize("decay", [0, -0.5, float("nan"), float("inf"), True, "0.5"])
def test_layerwise_lr_decay_refuses_bad_decay(decay):
    params = ParamDict.from_pytree(tree())
    with pytest.raises(ValueError, match="decay must be a finite number > 0"):
        presets.layerwise_lr_decay(params, decay, GROUPS)


def test_layerwise_lr_decay_refuses_bad_groups_and_changes_nothing():
    params = ParamDict.from_pytree(tree())
    with pytest.raises(TypeError, match="list of patterns"):
        presets.layerwise_lr_decay(params, 0.5, "layers/")
    with pytest.raises(TypeError, match="list of patterns"):
        presets.layerwise_lr_decay(params, 0.5, [])
    with pytest.raises(ValueError, match="'blocks/' matches no parameter"):
        presets.layerwise_lr_decay(params, 0.5, ["embed/", "blocks/"])
    assert not any(p.is_set("lr_mult") for p in params.values())


def test_no_decay_picks_parameters_with_at_most_one_dimension():
    params = ParamDict.from_pytree(tree())
    changed = presets.no_decay(params)
    assert list(changed) == ["head/bias", "layers/0/bias", "layers/1/bias", "norm/scale"]
    trainer = lrmult.Trainer(params, "sgd", {"learning_rate": 0.1, "wd": 0.5})
    trainer.step(ones_like(params))
    # kernels: 2 - 0.1 * (1 + 0.5 * 2) = 1.8; biases and scales: 2 - 0.1 * 1 = 1.9
    np.testing.assert_allclose(params["layers/0/kernel"].data(), 1.8, rtol=1e-6)
    np.testing.assert_allclose(params["layers/0/bias"].data(), 1.9, rtol=1e-6)
    np.testing.assert_allclose(params["norm/scale"].data(), 1.9, rtol=1e-6)


def test_no_decay_by_pattern_and_errors():
    params = ParamDict.from_pytree(tree())
    assert list(presets.no_decay(params, "norm/")) == ["norm/scale"]
    assert params["norm/scale"].wd_mult == 0.0 and not params["head/bias"].is_set("wd_mult")
    with pytest.raises(ValueError, match="matches no parameter"):
        presets.no_decay(params, "bn/")
    kernels = ParamDict.from_pytree({"a": jnp.ones((2, 2))})
    with pytest.raises(ValueError, match="no parameter has at most one dimension"):
        presets.no_decay(kernels)
    with pytest.raises(TypeError, match="must be a ParamDict"):
        presets.no_decay(tree())


def test_linear_probe_trains_the_head_only_then_unfreezes():
    params = ParamDict.from_pytree(tree())
    head = presets.linear_probe(params, "head/")
    assert list(head) == ["head/bias", "head/kernel"]
    assert [n for n, p in params.items() if not p.frozen] == ["head/bias", "head/kernel"]
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
