# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # lrmult quickstart
#
# lrmult gives every parameter of a JAX model a name and three training controls, as MXNet Gluon
# does: `lr_mult` (a learning-rate multiplier), `wd_mult` (a weight-decay multiplier) and `frozen`.
# You set them the Gluon way, `params.select('.*bias').setattr('wd_mult', 0)`, and a `Trainer` (or
# a plain optax chain) applies them in one jitted step. Changing a multiplier never recompiles.

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import optax
from flax import linen as nn

import lrmult


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(64, name="hidden_0")(x))
        x = nn.relu(nn.Dense(64, name="hidden_1")(x))
        return nn.Dense(1, name="head")(x)


model = MLP()
x = jnp.linspace(-3, 3, 512).reshape(-1, 1)
y = jnp.sin(2 * x) + 0.3 * x
variables = model.init(jax.random.PRNGKey(0), x)
params = lrmult.ParamDict.from_pytree(variables["params"])
params

# %% [markdown]
# A `ParamDict` names each parameter by its path. `select` takes a regular expression (matched with
# `re.match`, as Gluon's `collect_params`) and returns a dict **sharing** the same Parameters, so
# `setattr` on it changes the model's parameters. A `-` in the table means "not set here": the
# optimizer's override dicts, then the default 1.0, apply.

# %%
params.select(".*bias").setattr("wd_mult", 0.0)  # no weight decay on biases
params.select("hidden_0/").setattr("lr_mult", 0.2)  # a slower first layer
params

# %%
trainer = lrmult.Trainer(params, "adamw", {"learning_rate": 1e-2, "wd": 1e-2})
trainer.explain()

# %% [markdown]
# `explain()` says what each parameter gets and which link of the lookup chain set it: `param` (set
# on the Parameter), `index` or `name` (an override from `trainer.set_lr_mult`), or `default`.
#
# Now train, and halfway through give `hidden_1` a tenth of the learning rate. We record each
# layer's update size and count how often the step compiles.

# %%
compiles = []


def count_compiles(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
        compiles.append(kwargs.get("fun_name"))


jax.monitoring.register_event_duration_secs_listener(count_compiles)


def loss_fn(tree, x, y):
    return jnp.mean((model.apply({"params": tree}, x) - y) ** 2)


layers = ["hidden_0/kernel", "hidden_1/kernel", "head/kernel"]
losses, update_norms = [], {name: [] for name in layers}
for step in range(300):
    if step == 150:
        n_before = len(compiles)
        params.select("hidden_1/").setattr("lr_mult", 0.1)
    before = {name: params[name].data() for name in layers}
    losses.append(float(trainer.train_step(loss_fn, x, y)))
    for name in layers:
        update_norms[name].append(float(jnp.linalg.norm(params[name].data() - before[name])))
    if step == 150:
        print("compilations caused by the change:", len(compiles) - n_before)
print(f"loss: {losses[0]:.4f} -> {losses[-1]:.4f}")

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.5))
ax1.plot(losses)
ax1.set(yscale="log", xlabel="step", ylabel="loss", title="training loss")
for name in layers:
    ax2.plot(update_norms[name], label=name)
ax2.axvline(150, color="gray", ls="--")
ax2.set(yscale="log", xlabel="step", ylabel="||Δw||", title="update size per layer")
ax2.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# At step 150 (dashed line) the update of `hidden_1/kernel` drops by about 10x, the other layers
# carry on, and the step did not recompile: multipliers are values in the optimizer state, not
# constants baked into the compiled step.
#
# Freezing is structural: a frozen parameter gets no gradient, no optimizer state and no weight
# decay. Toggling it compiles the step once per distinct frozen set.

# %%
params.select("hidden_0/").setattr("grad_req", "null")  # Gluon's spelling of frozen = True
frozen_before = params["hidden_0/kernel"].data()
for _ in range(20):
    trainer.train_step(loss_fn, x, y)
print("hidden_0 unchanged:", bool(jnp.array_equal(frozen_before, params["hidden_0/kernel"].data())))
paths = jax.tree_util.tree_flatten_with_path(trainer.opt_state)[0]
state_names = {jax.tree_util.keystr(p) for p, _ in paths}
print("optimizer state mentions hidden_0:", any("hidden_0" in s for s in state_names))
trainer.explain()

# %% [markdown]
# The same multipliers work at the optax level, inside your own training loop. There, after
# changing a multiplier, `state = lrmult.refresh(state, params)` hands it to the optimizer state
# (no recompilation), and `lrmult.explain(state, params)` prints the Trainer's table:

# %%
tx = lrmult.adamw(1e-2, weight_decay=1e-2, param_dict=params)
tree = params.tree()
state = tx.init(tree)
grads = jax.grad(loss_fn)(tree, x, y)
updates, state = tx.update(grads, state, tree)
tree = optax.apply_updates(tree, updates)
lrmult.explain(state, params, learning_rate=1e-2)
