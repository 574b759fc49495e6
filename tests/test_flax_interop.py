"""flax interop: from_nnx, from_linen (boxes kept), NNXTrainer, and nnx.Optimizer + nnx.jit.

The hand-computed case used throughout: a Linear(2 -> 1) with kernel [[1], [2]], bias [0.5],
input x = [[1, 1]], target 0. Prediction 3.5, squared-error loss 12.25, d loss / d prediction 7,
so the kernel's gradient is [[7], [7]] and the bias's [7].
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from jax.sharding import PartitionSpec as P

import lrmult
from lrmult import FrozenLeaf, ParamDict

X = jnp.ones((1, 2))
Y = jnp.zeros((1, 1))
W0 = [[1.0], [2.0]]
B0 = [0.5]

# nnx.Optimizer gives lrmult's transformations an nnx.State of Param Variables at init (and
# plain arrays at update): transforms.py unwraps them, or leaves would be named
# 'lin/kernel/value' and the ParamDict's settings would silently miss.


class Lin(nnx.Module):
    def __init__(self, kernel_init=nnx.initializers.ones, bn=False):
        rngs = nnx.Rngs(0)
        self.bn = nnx.BatchNorm(2, rngs=rngs) if bn else None
        self.lin = nnx.Linear(2, 1, kernel_init=kernel_init, rngs=rngs)
        self.lin.kernel[...] = jnp.array(W0)
        self.lin.bias[...] = jnp.array(B0)

    def __call__(self, x):
        return self.lin(self.bn(x) if self.bn is not None else x)


def frozen(x):
    return isinstance(x, FrozenLeaf)


def mse(model, x, y):
    return jnp.mean((model(x) - y) ** 2)


class Net(nnx.Module):
    def __init__(self):
        rngs = nnx.Rngs(0)
        self.layers = nnx.List([nnx.Linear(3, 4, rngs=rngs), nnx.Linear(4, 2, rngs=rngs)])
        self.head = nnx.Linear(2, 1, rngs=rngs)


# -- from_nnx -------------------------------------------------------------------------------------


def test_from_nnx_names_parameters_by_attribute_path():
    model = Net()
    params = lrmult.from_nnx(model)
    assert list(params) == [
        "head/bias",
        "head/kernel",
        "layers/0/bias",
        "layers/0/kernel",
        "layers/1/bias",
        "layers/1/kernel",
    ]
    assert params["layers/0/kernel"].shape == (3, 4)
    np.testing.assert_array_equal(params["head/kernel"].data(), model.head.kernel[...])
    assert list(ParamDict.from_nnx(model, prefix="net/")) == ["net/" + n for n in params]


def test_from_nnx_tree_is_a_pure_state_that_nnx_update_writes_back():
    model = Net()
    params = lrmult.from_nnx(model)
    params["head/bias"].set_data(jnp.array([4.0]))
    nnx.update(model, params.tree())
    np.testing.assert_array_equal(model.head.bias[...], [4.0])


def test_from_nnx_seeds_parameters_from_variable_metadata():
    class M(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones(3), lr_mult=0.1, wd_mult=0.0)
            self.v = nnx.Param(jnp.ones(2), grad_req="null")
            self.u = nnx.Param(jnp.ones(2))

    params = lrmult.from_nnx(M())
    assert params["w"].lr_mult == 0.1 and params["w"].wd_mult == 0.0
    assert params["v"].frozen
    assert not any(params["u"].is_set(a) for a in ("lr_mult", "wd_mult", "frozen"))


class Backbone(nnx.Module):
    """Metadata set where the issue says users set it: Linear's kernel_metadata, nnx.Param."""

    def __init__(self):
        rngs = nnx.Rngs(0)
        self.backbone = nnx.Linear(2, 1, kernel_metadata={"lr_mult": 0.1}, rngs=rngs)
        self.backbone.kernel[...] = jnp.array(W0)
        self.backbone.bias[...] = jnp.array(B0)
        self.offset = nnx.Param(jnp.array([3.0]), frozen=True)

    def __call__(self, x):
        return self.backbone(x) + self.offset[...]


def test_from_nnx_filter_reads_kernel_metadata_and_param_metadata_as_set_values():
    model = Backbone()
    params = ParamDict.from_nnx(model, filter=nnx.Param)
    assert list(params) == ["backbone/bias", "backbone/kernel", "offset"]
    kernel = params["backbone/kernel"]
    assert kernel.lr_mult == 0.1 and kernel.is_set("lr_mult") and not kernel.is_set("wd_mult")
    assert params["offset"].frozen and params["offset"].is_set("frozen")
    assert not any(params["backbone/bias"].is_set(a) for a in ("lr_mult", "wd_mult", "frozen"))
    assert list(lrmult.from_nnx(model, wrt=nnx.Param)) == list(params)  # the alias
    with pytest.raises(TypeError, match="not both"):
        lrmult.from_nnx(model, nnx.Param, wrt=nnx.Param)


def test_nnx_optimizer_and_nnx_jit_follow_variable_metadata(compiles):
    model = Backbone()
    params = ParamDict.from_nnx(model, filter=nnx.Param)
    optimizer = nnx.Optimizer(model, lrmult.sgd(0.1, param_dict=params), wrt=nnx.Param)
    nnx_opt_step(model, optimizer, X, Y)
    # Prediction 1 + 2 + 0.5 + 3 = 6.5, gradient 13: kernel -= 0.1 * 0.1 * 13, bias -= 0.1 * 13,
    # the frozen offset stays 3.
    np.testing.assert_allclose(model.backbone.kernel[...], [[1 - 0.13], [2 - 0.13]], rtol=1e-5)
    np.testing.assert_allclose(model.backbone.bias[...], [0.5 - 1.3], rtol=1e-5)
    np.testing.assert_array_equal(model.offset[...], [3.0])
    # Prediction 0.87 + 1.87 - 0.8 + 3 = 4.94, gradient 9.88; the kernel's lr_mult is now 1.
    count = compiles()
    params["backbone/kernel"].lr_mult = 1.0
    lrmult.refresh_optimizer(optimizer, params)
    nnx_opt_step(model, optimizer, X, Y)
    assert count("nnx_opt_step") == 0
    np.testing.assert_allclose(
        model.backbone.kernel[...], [[0.87 - 0.988], [1.87 - 0.988]], rtol=1e-5
    )
    np.testing.assert_array_equal(model.offset[...], [3.0])


def test_from_nnx_refuses_bad_metadata_naming_the_parameter():
    class M(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones(3), lr_mult=-1.0)

    with pytest.raises(ValueError, match="'w'.*lr_mult"):
        lrmult.from_nnx(M())


def test_from_nnx_errors():
    with pytest.raises(TypeError, match="expected an nnx.Module"):
        lrmult.from_nnx({"w": jnp.ones(2)})
    with pytest.raises(ValueError, match="no Variable matching filter="):
        lrmult.from_nnx(Net(), nnx.BatchStat)


# -- NNXTrainer -----------------------------------------------------------------------------------


def test_nnx_trainer_updates_the_model_in_place_with_multipliers(compiles):
    model = Lin()
    trainer = lrmult.NNXTrainer(model, None, "sgd", {"learning_rate": 0.1})
    trainer.params["lin/kernel"].lr_mult = 0.5
    trainer.params["lin/bias"].frozen = True
    loss = trainer.train_step(mse, X, Y)
    assert float(loss) == pytest.approx(12.25)
    np.testing.assert_allclose(model.lin.kernel[...], [[1 - 0.1 * 0.5 * 7], [2 - 0.35]], rtol=1e-6)
    np.testing.assert_array_equal(model.lin.bias[...], B0)  # frozen
    # lr_mult 0.5 -> 1: no recompilation. Prediction 0.65 + 1.65 + 0.5 = 2.8, gradient 5.6.
    count = compiles()
    trainer.params["lin/kernel"].lr_mult = 1.0
    trainer.train_step(mse, X, Y)
    assert count("lrmult_train_step") == 0
    np.testing.assert_allclose(model.lin.kernel[...], [[0.65 - 0.56], [1.65 - 0.56]], rtol=1e-5)


def test_nnx_trainer_takes_values_assigned_to_the_model_and_keeps_read_arrays_valid():
    model = Lin()
    params = lrmult.from_nnx(model)
    params["lin/kernel"].lr_mult = 0.5
    trainer = lrmult.NNXTrainer(model, params, "sgd", {"learning_rate": 0.1})
    trainer.train_step(mse, X, Y)
    held = model.lin.kernel[...]
    model.lin.kernel[...] = jnp.array(W0)  # back to the start: the next step must see it
    model.lin.bias[...] = jnp.array(B0)
    trainer.train_step(mse, X, Y)
    np.testing.assert_allclose(model.lin.kernel[...], [[0.65], [1.65]], rtol=1e-6)
    np.testing.assert_allclose(model.lin.bias[...], [0.5 - 0.7], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(held), [[0.65], [1.65]], rtol=1e-6)  # not donated
    np.testing.assert_allclose(params["lin/kernel"].data(), [[0.65], [1.65]], rtol=1e-6)


def test_nnx_trainer_writes_back_batch_statistics():
    model = Lin(bn=True)
    trainer = lrmult.NNXTrainer(model, None, "sgd", {"learning_rate": 0.0})
    trainer.train_step(mse, jnp.array([[1.0, 2.0], [3.0, 4.0]]), jnp.zeros((2, 1)))
    # BatchNorm's running mean: 0.99 * 0 + 0.01 * batch mean [2, 3]; variance 0.99 * 1 + 0.01 * 1.
    np.testing.assert_allclose(model.bn.mean[...], [0.02, 0.03], rtol=1e-5)
    np.testing.assert_allclose(model.bn.var[...], [1.0, 1.0], rtol=1e-5)


def test_nnx_trainer_has_aux_returns_loss_and_aux():
    model = Lin()
    trainer = lrmult.NNXTrainer(model, None, "sgd", {"learning_rate": 0.1})

    def loss_and_pred(m, x, y):
        pred = m(x)
        return jnp.mean((pred - y) ** 2), pred

    loss, pred = trainer.train_step(loss_and_pred, X, Y, has_aux=True)
    assert float(loss) == pytest.approx(12.25)
    np.testing.assert_allclose(pred, [[3.5]])


def test_nnx_trainer_step_takes_nnx_grad_state():
    model = Lin()
    trainer = lrmult.NNXTrainer(model, None, "sgd", {"learning_rate": 0.1})
    trainer.step(nnx.grad(mse)(model, X, Y), batch_size=2)  # gradients halved: 3.5
    np.testing.assert_allclose(model.lin.kernel[...], [[1 - 0.35], [2 - 0.35]], rtol=1e-6)
    np.testing.assert_allclose(model.lin.bias[...], [0.5 - 0.35], rtol=1e-6)


def test_nnx_trainer_refuses_params_that_are_not_the_models():
    model = Lin()
    with pytest.raises(ValueError, match="'lin/bias' has no Parameter"):
        lrmult.NNXTrainer(model, lrmult.from_nnx(model, prefix="m/"))
    with pytest.raises(TypeError, match="expected an nnx.Module"):
        lrmult.NNXTrainer({"w": jnp.ones(2)})


def test_nnx_trainer_takes_the_models_values_over_another_models_params():
    other = Lin()
    other.lin.kernel[...] = jnp.zeros((2, 1))
    model = Lin()
    trainer = lrmult.NNXTrainer(model, lrmult.from_nnx(other), "sgd", {"learning_rate": 0.1})
    trainer.train_step(mse, X, Y)
    np.testing.assert_allclose(model.lin.kernel[...], [[1 - 0.7], [2 - 0.7]], rtol=1e-6)


# -- nnx.Optimizer + nnx.jit ----------------------------------------------------------------------


@nnx.jit
def nnx_opt_step(model, optimizer, x, y):
    optimizer.update(model, nnx.grad(mse)(model, x, y))


def test_nnx_optimizer_runs_a_ready_chain_with_index_overrides_under_nnx_jit():
    model = Lin()
    # Index 1 is lin/kernel (flatten order: lin/bias, lin/kernel).
    optimizer = nnx.Optimizer(model, lrmult.sgd(0.1, lr_mult={1: 0.5}), wrt=nnx.Param)
    nnx_opt_step(model, optimizer, X, Y)
    nnx_opt_step(model, optimizer, X, Y)
    # Step 1: kernel [[0.65], [1.65]], bias 0.5 - 0.7 = -0.2; prediction 2.1, gradient 4.2.
    np.testing.assert_allclose(model.lin.kernel[...], [[0.65 - 0.21], [1.65 - 0.21]], rtol=1e-5)
    np.testing.assert_allclose(model.lin.bias[...], [-0.2 - 0.42], rtol=1e-5)


def test_nnx_optimizer_reads_the_param_dict_and_frozen_leaves_hold_no_state():
    model = Lin()
    params = lrmult.from_nnx(model)
    params["lin/kernel"].lr_mult = 0.5
    params["lin/bias"].frozen = True
    tx = lrmult.adam(0.1, param_dict=params)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    # The kernel holds Adam's two moments; wherever the state follows the params' structure,
    # the frozen bias is a FrozenLeaf: no moments, no step count.
    state = nnx.as_pure(optimizer.opt_state)
    flat = jax.tree_util.tree_flatten_with_path(state, is_leaf=frozen)[0]
    at_bias = [x for path, x in flat if "['lin']['bias']" in jax.tree_util.keystr(path)]
    assert at_bias and all(map(frozen, at_bias))
    assert [np.shape(x) for _, x in flat].count((2, 1)) == 2
    nnx_opt_step(model, optimizer, X, Y)
    # Adam's first step is sign(g) * lr: kernel moves by 0.1 * 0.5, the frozen bias not at all.
    np.testing.assert_allclose(model.lin.kernel[...], [[0.95], [1.95]], rtol=1e-5)
    np.testing.assert_array_equal(model.lin.bias[...], B0)


def test_refresh_optimizer_changes_multipliers_without_retracing(compiles):
    model = Lin()
    params = lrmult.from_nnx(model)
    params["lin/kernel"].lr_mult = 0.5
    params["lin/bias"].frozen = True
    optimizer = nnx.Optimizer(model, lrmult.sgd(0.1, param_dict=params), wrt=nnx.Param)
    nnx_opt_step(model, optimizer, X, Y)
    np.testing.assert_allclose(model.lin.kernel[...], [[0.65], [1.65]], rtol=1e-6)
    count = compiles()
    params["lin/kernel"].lr_mult = 1.0
    lrmult.refresh_optimizer(optimizer, params)
    nnx_opt_step(model, optimizer, X, Y)  # prediction 2.8, gradient 5.6
    assert count("nnx_opt_step") == 0
    np.testing.assert_allclose(model.lin.kernel[...], [[0.09], [1.09]], rtol=1e-4)
    np.testing.assert_array_equal(model.lin.bias[...], B0)
    params["lin/bias"].frozen = False  # a new frozen set: one trace, the bias moves from now on
    lrmult.refresh_optimizer(optimizer, params)
    nnx_opt_step(model, optimizer, X, Y)  # prediction 1.68, gradient 3.36
    assert count("nnx_opt_step") == 1
    np.testing.assert_allclose(model.lin.kernel[...], [[0.09 - 0.336], [1.09 - 0.336]], rtol=1e-4)
    np.testing.assert_allclose(model.lin.bias[...], [0.5 - 0.336], rtol=1e-5)


def test_nnx_optimizer_with_sharded_parameters():
    mesh = jax.make_mesh((1,), ("model",), axis_types=(jax.sharding.AxisType.Explicit,))
    with jax.set_mesh(mesh):
        model = Lin(nnx.with_partitioning(nnx.initializers.ones, (None, "model")))
        params = lrmult.from_nnx(model)
        params["lin/kernel"].lr_mult = 0.5
        tx = lrmult.sgd(0.1, momentum=0.9, param_dict=params)
        try:
            optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        except AssertionError as e:  # jax.sharding.reshard of a scalar to P(None, 'model')
            raise AssertionError(f"nnx.Optimizer init failed: {e}") from e
        nnx_opt_step(model, optimizer, X, Y)
        np.testing.assert_allclose(model.lin.kernel[...], [[0.65], [1.65]], rtol=1e-6)
        assert model.lin.kernel[...].sharding.spec == P(None, "model")


def test_refresh_optimizer_refuses_other_objects():
    with pytest.raises(TypeError, match="expected an nnx.Optimizer"):
        lrmult.refresh_optimizer(optax.sgd(0.1), ParamDict.from_pytree({"w": jnp.ones(2)}))


# -- Linen ----------------------------------------------------------------------------------------


class Dense(nn.Module):
    box: str = "partitioned"

    @nn.compact
    def __call__(self, x):
        if self.box == "partitioned":
            init = nn.with_partitioning(nn.initializers.ones, (None, "model"))
        else:
            init = nn.with_logical_partitioning(nn.initializers.ones, ("embed", "mlp"))
        return nn.Dense(1, kernel_init=init)(x)


@pytest.mark.parametrize("box", ["partitioned", "logical"])
def test_from_linen_names_through_boxes_and_keeps_them(box):
    variables = Dense(box).init(jax.random.PRNGKey(0), X)
    params = lrmult.from_linen(variables["params"])
    assert list(params) == ["Dense_0/bias", "Dense_0/kernel"]
    assert params["Dense_0/kernel"].shape == (2, 1)
    assert nn.get_partition_spec(params.tree()) == nn.get_partition_spec(variables["params"])
    expected = P(None, "model") if box == "partitioned" else P("embed", "mlp")
    assert nn.get_partition_spec(params.tree())["Dense_0"]["kernel"] == expected


def test_from_linen_trainer_step_updates_values_inside_the_boxes():
    model = Dense()
    params = lrmult.from_linen(model.init(jax.random.PRNGKey(0), X)["params"])
    params["Dense_0/kernel"].set_data(jnp.array(W0))
    params["Dense_0/bias"].set_data(jnp.array(B0))
    params["Dense_0/kernel"].lr_mult = 0.5
    kernel = _one_sgd_step_through_the_boxes(model, params)
    np.testing.assert_allclose(kernel.value, [[0.65], [1.65]], rtol=1e-6)
    np.testing.assert_allclose(params["Dense_0/bias"].data(), [0.5 - 0.7], rtol=1e-6)


def _one_sgd_step_through_the_boxes(model, params):
    """One Trainer SGD step (lr 0.1) of `model.apply` on boxed params; the boxed kernel after.
    The loss before the step is (1*1 + 1*2 + 0.5)**2 = 12.25 whatever the multipliers."""
    trainer = lrmult.Trainer(params, "sgd", {"learning_rate": 0.1})

    def loss_fn(tree, x, y):
        return jnp.mean((model.apply({"params": tree}, x) - y) ** 2)

    assert float(trainer.train_step(loss_fn, X, Y)) == pytest.approx(12.25)
    kernel = params.tree()["Dense_0"]["kernel"]
    assert isinstance(kernel, nn.Partitioned) and kernel.names == (None, "model")
    return kernel


def test_from_linen_plain_params_and_errors():
    plain = {"Dense_0": {"kernel": jnp.ones((2, 1)), "bias": jnp.zeros(1)}}
    assert list(lrmult.from_linen(plain)) == list(ParamDict.from_pytree(plain))
    with pytest.raises(ValueError, match=r"pass variables\['params'\]"):
        lrmult.from_linen({"params": plain})


def test_from_pytree_unboxes_linen_metadata_and_apply_works_with_a_trainer():
    model = Dense()
    variables = model.init(jax.random.PRNGKey(0), X)
    params = ParamDict.from_pytree(variables["params"])
    assert list(params) == ["Dense_0/bias", "Dense_0/kernel"]  # not Dense_0/kernel/value
    assert nn.get_partition_spec(params.tree())["Dense_0"]["kernel"] == P(None, "model")
    params["Dense_0/kernel"].set_data(jnp.array(W0))
    params["Dense_0/bias"].set_data(jnp.array(B0))
    params["Dense_0/bias"].frozen = True
    kernel = _one_sgd_step_through_the_boxes(model, params)
    np.testing.assert_allclose(kernel.value, [[0.3], [1.3]], rtol=1e-6)
    np.testing.assert_array_equal(params["Dense_0/bias"].data(), B0)
    with pytest.raises(ValueError, match=r"pass variables\['params'\]"):
        ParamDict.from_pytree(variables)
