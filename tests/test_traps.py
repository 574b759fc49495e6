"""A new user's traps (issue: Gluon and optax parity): each is loud, and leaves no trace."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrmult
from lrmult import ParamDict, Trainer


def _trainer():
    pd = ParamDict.from_pytree({"w": jnp.array([1.0, 2.0])})
    return pd, Trainer(pd, "sgd", {"learning_rate": 0.5})


def loss(tree, x):
    return jnp.sum(tree["w"] * x)


def test_a_new_loss_object_every_step_warns_once_at_the_call_site():
    _, trainer = _trainer()
    x = jnp.ones(2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(5):
            trainer.train_step(lambda t, x: jnp.sum(t["w"] * x), x)
    msgs = [w for w in caught if "define the loss function once" in str(w.message)]
    assert len(msgs) == 1
    assert msgs[0].filename == __file__  # points at the user's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(5):
            trainer.train_step(loss, x)  # the same object: no warning


def test_train_step_inside_jax_jit_is_refused_and_the_trainer_keeps_working():
    pd, trainer = _trainer()
    x = jnp.ones(2)
    with pytest.raises(RuntimeError, match="jitted already"):
        jax.jit(lambda x: trainer.train_step(loss, x))(x)
    with pytest.raises(RuntimeError, match="jitted already"):
        jax.jit(lambda: trainer.train_step(loss, jnp.ones(2)))()
    np.testing.assert_array_equal(pd["w"].data(), [1.0, 2.0])
    trainer.train_step(loss, x)  # gradient 1: w -= 0.5
    np.testing.assert_allclose(pd["w"].data(), [0.5, 1.5])


def test_a_raw_pytree_is_refused_with_the_wrapping_to_do():
    with pytest.raises(TypeError, match=r"ParamDict\.from_pytree"):
        Trainer({"dense0": {"kernel": jnp.ones(2)}})


def test_step_with_no_gradients_when_everything_is_frozen_is_a_no_op():
    pd, trainer = _trainer()
    pd["w"].frozen = True
    trainer.step({})
    np.testing.assert_array_equal(pd["w"].data(), [1.0, 2.0])


def test_a_rejected_assignment_keeps_the_preset_attribution():
    pd = ParamDict.from_pytree(
        {"layers_0": {"kernel": jnp.ones(2)}, "head": {"kernel": jnp.ones(2)}}
    )
    lrmult.presets.layerwise_lr_decay(pd, 0.5)
    before = pd["layers_0/kernel"].origin("lr_mult")
    assert before == "preset:layerwise_lr_decay"
    with pytest.raises(ValueError, match="layers_0/kernel"):
        pd["layers_0/kernel"].lr_mult = -1.0
    assert pd["layers_0/kernel"].origin("lr_mult") == before
    assert pd["layers_0/kernel"].lr_mult == 0.5


def test_the_shadowed_override_warning_points_at_the_users_line():
    pd, trainer = _trainer()
    trainer.set_lr_mult({"w": 2.0})
    pd["w"].lr_mult = 3.0
    with pytest.warns(UserWarning, match="no longer acts") as caught:
        trainer.step({"w": jnp.ones(2)})
    assert caught[0].filename == __file__


@pytest.mark.parametrize(
    "pattern, hint",
    [
        (".*norm", r"case differs from 'LayerNorm_0/scale': try '\(\?i\)\.\*norm'"),
        ("kernel", r"appears inside 'Dense_0/kernel': try '\.\*kernel'"),
        ("norm", r"case differs, and re.match anchors.*try '\(\?i\)\.\*norm'"),
    ],
)
def test_select_hints_say_what_would_match(pattern, hint):
    pd = ParamDict.from_pytree(
        {"LayerNorm_0": {"scale": jnp.ones(2)}, "Dense_0": {"kernel": jnp.ones(2)}}
    )
    with pytest.raises(ValueError, match=hint):
        pd.select(pattern)


def test_explain_shows_the_effective_weight_decay():
    pd = ParamDict.from_pytree({"b": jnp.ones(2), "w": jnp.ones(2)})
    pd["b"].wd_mult = 0.0
    pd["w"].wd_mult = 0.5
    trainer = Trainer(pd, "adamw", {"learning_rate": 0.1, "wd": 0.02})
    rows = {r.name: r for r in trainer.explain()}
    assert (rows["b"].wd, rows["w"].wd) == (0.0, pytest.approx(0.01))
    assert "weight decay 0.02" in trainer.explain().title
    default = {r.name: r for r in Trainer(pd, "adamw").explain()}  # adamw's own default, 1e-4
    assert default["w"].wd == pytest.approx(0.5e-4)
    state = lrmult.adamw(0.1, weight_decay=0.02, param_dict=pd).init(pd.tree())
    rows = {r.name: r for r in lrmult.explain(state)}
    assert (rows["b"].wd, rows["w"].wd, rows["w"].lr) == (
        0.0,
        pytest.approx(0.01),
        pytest.approx(0.1),
    )


# -- Gluon and optax habits ------------------------------------------------------------------------


def test_multisteps_accumulates_gradients_through_the_trainer():
    import optax

    pd = ParamDict.from_pytree({"w": jnp.array([1.0, 2.0])})
    pd["w"].lr_mult = 0.5
    trainer = Trainer(
        pd, optax.MultiSteps(optax.identity(), every_k_schedule=2), {"learning_rate": 0.2}
    )
    trainer.step({"w": jnp.array([1.0, 3.0])})
    np.testing.assert_array_equal(pd["w"].data(), [1.0, 2.0])  # first micro-step: no update
    trainer.step({"w": jnp.array([3.0, 1.0])})
    # mean gradient (2, 2); the direction is the gradient, scaled by -0.2 and lr_mult 0.5
    np.testing.assert_allclose(pd["w"].data(), [1.0 - 0.2, 2.0 - 0.2], rtol=1e-6)
    assert {r.name: r.lr for r in trainer.explain()}["w"] == pytest.approx(0.1)


def test_grad_req_add_names_multisteps():
    pd, _ = _trainer()
    with pytest.raises(ValueError, match="optax.MultiSteps"):
        pd["w"].grad_req = "add"


def test_gluon_names_optimizer_update_allreduce_lr_scheduler_rescale_grad():
    import optax

    pd, trainer = _trainer()
    assert isinstance(trainer.optimizer, optax.GradientTransformation)
    with pytest.raises(TypeError, match=r"trainer\.step\(grads, batch_size\)"):
        trainer.update(4)
    with pytest.raises(TypeError, match="reduces gradients itself"):
        trainer.allreduce_grads()
    sched = optax.linear_schedule(1.0, 0.0, 4)
    t2 = Trainer(pd, "sgd", {"lr_scheduler": sched, "rescale_grad": 0.5})
    t2.step({"w": jnp.ones(2)})  # rate 1.0 at step 0, gradient 1 * 0.5
    np.testing.assert_allclose(pd["w"].data(), [0.5, 1.5], rtol=1e-6)
    assert t2.learning_rate == pytest.approx(0.75)
    with pytest.raises(ValueError, match="not both"):
        Trainer(pd, "sgd", {"lr_scheduler": sched, "learning_rate": 0.1})


def test_a_trainer_prints_a_summary():
    pd = ParamDict.from_pytree({"b": jnp.ones(2), "w": jnp.ones(2)})
    pd["b"].frozen = True
    trainer = Trainer(pd, "adam", {"learning_rate": 0.1, "wd": 0.01})
    row = trainer.summary()[0]
    assert (row.learning_rate, row.weight_decay, row.parameters, row.trainable, row.frozen) == (
        pytest.approx(0.1),
        0.01,
        2,
        1,
        1,
    )
    assert "adam(weight_decay=0.01)" in repr(trainer)
    assert trainer._repr_html_().startswith("<table")


def test_nesterov_without_momentum_is_refused_as_pytorch_does():
    with pytest.raises(ValueError, match="nesterov=True needs momentum > 0"):
        lrmult.sgd(0.1, nesterov=True)
    with pytest.raises(ValueError, match="nag: Nesterov momentum needs momentum > 0"):
        lrmult.nag(0.1, momentum=0)
    with pytest.raises(ValueError, match=r"nag: momentum must be in \[0, 1\)"):
        lrmult.nag(0.1, momentum=1.0)


def test_an_empty_param_dict_prints_its_columns():
    text = str(ParamDict({}))
    assert "name" in text and "lr_mult" in text
