"""README's code blocks run as written on a Linen model with a LayerNorm."""

import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

README = (pathlib.Path(__file__).parent.parent / "README.md").read_text()


def block_after(heading: str) -> str:
    section = README[README.index(heading) :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.LayerNorm()(nn.Dense(8)(x))
        return nn.Dense(1)(nn.relu(x))


def _world():
    x = jnp.ones((4, 3))
    y = jnp.zeros((4, 1))
    model = MLP()
    variables = model.init(jax.random.PRNGKey(0), x)

    def loss_fn(tree, x, y):
        return jnp.mean((model.apply({"params": tree}, x) - y) ** 2)

    return {"variables": variables, "loss_fn": loss_fn, "x": x, "y": y}


def test_the_opening_snippet_runs():
    env = _world()
    exec("import lrmult\n" + block_after("# lrmult"), env)
    rows = {r.name: r for r in env["trainer"].explain()}
    assert rows["Dense_1/kernel"].frozen and rows["Dense_0/kernel"].lr == np.float32(3e-3) * 0.1
    assert rows["LayerNorm_0/bias"].wd_mult == 0.0


def test_the_optax_level_snippet_runs():
    env = _world()
    import lrmult

    env["lrmult"] = lrmult
    env["params"] = params = lrmult.ParamDict.from_pytree(env["variables"]["params"])
    env["grads"] = jax.grad(env["loss_fn"])(params.tree(), env["x"], env["y"])
    exec(block_after("## optax level"), env)
    state = env["state"]
    g = env["grads"]
    ours, _ = env["tx"].update(g, state, params.tree())
    np.testing.assert_array_equal(ours["Dense_0"]["kernel"], 0.0)  # frozen last
    assert {r.name: r.lr_mult for r in lrmult.explain(state)}["LayerNorm_0/bias"] == 0.5


class Model(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(self.width)(x))
        h = nn.relu(nn.Dense(self.width)(h))
        return nn.Dense(1)(h * 64 / self.width)  # MuReadout's multiplier, in the model


def test_the_mup_snippet_runs():
    import lrmult

    env = {"jax": jax, "lrmult": lrmult, "Model": Model, "key": jax.random.PRNGKey(0)}
    env["x"] = jnp.ones((2, 3))
    exec(block_after("### μP"), env)
    rows = {r.name: r for r in env["trainer"].explain()}
    assert rows["Dense_1/kernel"].lr_mult == 1 / 16 and rows["Dense_1/kernel"].wd_mult == 16
    assert rows["Dense_0/kernel"].lr_source == rows["Dense_2/kernel"].lr_source == "default"


def test_the_l2sp_snippet_runs():
    import lrmult

    env = {**_world(), "lrmult": lrmult}
    exec(block_after("### Decay toward the pretrained weights"), env)
    rows = {r.name: r for r in env["trainer"].explain()}
    assert rows["Dense_0/kernel"].decay_to_init and not rows["Dense_1/bias"].decay_to_init
    assert rows["Dense_0/kernel"].decay_to_init_source == "preset:decay_to_init"
    anchors = lrmult.resync.find(env["state"], lrmult.transforms.AnchorState)[0][1]
    assert sum(anchors.spec.anchored) == 5  # all but the head's bias: its kernel since refresh


def test_the_gradual_unfreezing_snippet_runs(capsys):
    import lrmult

    env = {**_world(), "lrmult": lrmult}
    exec(block_after("### Gradual unfreezing"), env)
    params, trainer = env["params"], env["trainer"]
    assert trainer.num_update == 150 and not any(p.frozen for p in params.values())
    assert params["Dense_0/kernel"].lr_mult == 0.5  # the ramps are over: decay's value back
    assert "ramp" not in capsys.readouterr().out.split("gradual unfreezing")[1]
