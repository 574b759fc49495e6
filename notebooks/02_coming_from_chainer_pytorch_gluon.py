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
# # Coming from Chainer, PyTorch or Gluon
#
# Every framework lets you give one parameter its own learning rate, switch off its weight decay
# or freeze it; each does it its own way, with its own traps. This notebook takes four things you
# may have written before and does each with lrmult, printing the numbers:
#
# 1. **Chainer**: per-parameter update rules (`update_rule.hyperparam.lr`, `enabled = False`,
#    `disable_update()`, hooks), on a small XOR network.
# 2. **PyTorch**: `param_groups` with different learning rates, on two scalars you can check by
#    hand.
# 3. **One optimizer for a shared trunk and several heads**, each head with its own loss.
# 4. **MXNet and Gluon**: the optimizer's `set_lr_mult` and `collect_params().setattr(...)`.
#
# In lrmult every parameter has a name and three attributes: `lr_mult`, `wd_mult` and `frozen`. A
# parameter's learning rate is the base rate times its `lr_mult`, its weight decay the base `wd`
# times its `wd_mult`. A `Trainer` applies them in one jitted step, and `trainer.explain()` prints
# what each parameter gets and which setting decided it.

# %%
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lrmult import ParamDict, Parameter, Trainer

# %% [markdown]
# ## 1. Chainer: per-parameter update rules
#
# An MLP `l1 = Linear(2, 2)`, `l2 = Linear(2, 1)` on XOR, SGD at learning rate 0.1, one step of
# sigmoid cross-entropy. In Chainer you gave `l1.W` a learning rate of its own and disabled `l1.b`:
#
# ```python
# optimizer = chainer.optimizers.SGD(lr=0.1)
# optimizer.setup(model)
# model.l1.W.update_rule.hyperparam.lr = 10.0
# model.l1.b.update_rule.enabled = False
# ```
#
# In lrmult both are attributes of the parameter: a learning-rate *multiplier* of 100 (10.0 / 0.1)
# and `grad_req = "null"` (Gluon's spelling of `frozen = True`). The model is any function of a
# tree of arrays; `ParamDict.from_pytree` names the leaves by their path, `l1/W`, `l1/b`, ...

# %%
X = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], np.float32)
T = np.array([[0], [1], [1], [0]], np.float32)
rng = np.random.default_rng(0)
init = {
    "l1": {"W": rng.normal(size=(2, 2)).astype(np.float32), "b": np.full(2, 0.1, np.float32)},
    "l2": {"W": rng.normal(size=(2, 1)).astype(np.float32), "b": np.full(1, -0.2, np.float32)},
}


def xor_loss(p, x, t):
    h = jax.nn.sigmoid(x @ p["l1"]["W"] + p["l1"]["b"])
    y = h @ p["l2"]["W"] + p["l2"]["b"]
    return jnp.mean(jax.nn.softplus(y) - t * y)  # sigmoid cross-entropy


params = ParamDict.from_pytree(jax.tree.map(jnp.asarray, init))
params["l1/W"].lr_mult = 100.0  # Chainer: l1.W.update_rule.hyperparam.lr = 10.0
params["l1/b"].grad_req = "null"  # Chainer: l1.b.update_rule.enabled = False
trainer = Trainer(params, "sgd", {"learning_rate": 0.1})
trainer.explain()

# %% [markdown]
# `lr` is each parameter's effective learning rate; the `*_source` columns say where each value
# came from: `param` if set on the Parameter, `default` otherwise. One training step:

# %%
trainer.train_step(xor_loss, X, T)
for name in ["l1/W", "l1/b", "l2/W", "l2/b"]:
    layer, leaf = name.split("/")
    change = np.abs(np.asarray(params[name].data()) - init[layer][leaf]).max()
    print(f"{name}: largest change {change:.6f}")

# %% [markdown]
# `l1/W` moved by far the most, and `l1/b` did not move at all: it is frozen, so its gradient was
# not even computed. Chainer could also disable a whole link and add hooks to single parameters:
#
# ```python
# model.l2.disable_update()
# model.l1.W.update_rule.add_hook(chainer.optimizer_hooks.WeightDecay(1e-4))
# ...
# model.l2.enable_update()
# ```
#
# In lrmult a link is a `select` of the names under it (a regular expression, as Gluon's
# `collect_params`), and weight decay is the Trainer's `wd` times each parameter's `wd_mult`:

# %%
params.select("l2/").setattr("frozen", True)  # model.l2.disable_update()
params.setattr("wd_mult", 0.0)  # no weight decay ...
params["l1/W"].wd_mult = 1.0  # ... but on l1/W: add_hook(WeightDecay(1e-4))
trainer = Trainer(params, "sgd", {"learning_rate": 0.1, "wd": 1e-4})
print(trainer.explain())
before = params.arrays()
trainer.train_step(xor_loss, X, T)
print("l2/W unchanged:", np.array_equal(before["l2/W"], params["l2/W"].data()))
params.select("l2/").setattr("frozen", False)  # model.l2.enable_update()
print("l2 trains again:", not params["l2/W"].frozen)

# %% [markdown]
# A Chainer trap: a learning rate set on one parameter's update rule no longer follows the
# optimizer's, so a schedule such as `ExponentialShift("lr", 0.5)` halves every learning rate but
# that one. A multiplier cannot come loose: a schedule moves the base rate (here an optax
# schedule, halving it every step) and every parameter keeps its ratio to it.

# %%
pd = ParamDict.from_pytree({"l1": {"W": jnp.zeros(2)}, "l2": {"W": jnp.zeros(2)}})
pd["l1/W"].lr_mult = 100.0
schedule = optax.exponential_decay(0.1, transition_steps=1, decay_rate=0.5)
scheduled = Trainer(pd, "sgd", {"learning_rate": schedule})
ones = {"l1/W": jnp.ones(2), "l2/W": jnp.ones(2)}  # a constant gradient, by parameter name
for step in range(4):
    before = pd.arrays()
    rate = scheduled.learning_rate
    scheduled.step(ones)
    d1 = float(before["l1/W"][0] - pd["l1/W"].data()[0])
    d2 = float(before["l2/W"][0] - pd["l2/W"].data()[0])
    print(
        f"step {step}: base rate {rate:.4f}  l1/W moved {d1:.4f}  "
        f"l2/W moved {d2:.5f}  ratio {d1 / d2:.1f}"
    )

# %% [markdown]
# ## 2. PyTorch: `param_groups`
#
# Two trainable scalars `x = 5` and `c = 3`, two constants `b = 2` and `d = 4`, and
# `y = 3·c·exp(x) + b·x + d`. In PyTorch:
#
# ```python
# x = torch.tensor(5.0, requires_grad=True)
# c = torch.tensor(3.0, requires_grad=True)
# opt = torch.optim.SGD([x, c], lr=1.0)
# y = 3 * c * torch.exp(x) + b * x + d
# y.backward()
# opt.step()
# ```
#
# By hand: `y = 1349.7185`, `dy/dx = 3·c·exp(x) + b = 1337.7185` and `dy/dc = 3·exp(x) = 445.2395`,
# so one step at learning rate 1.0 gives `x = 5 - 1337.7185 = -1332.7185` and
# `c = 3 - 445.2395 = -442.2395`. With `c` in a group of its own at learning rate 0.1,
# `SGD([{"params": [x]}, {"params": [c], "lr": 0.1}], lr=1.0)`, it ends at `3 - 44.52395`.
#
# In lrmult the loss is a function of the parameter tree, with the constants as further arguments,
# and a group's learning rate is its parameters' `lr_mult` (0.1 / 1.0):


# %%
def y_of(p, b, d):
    return 3 * p["c"] * jnp.exp(p["x"]) + b * p["x"] + d


def two_scalars():
    x, c = Parameter(jnp.float32(5.0), name="x"), Parameter(jnp.float32(3.0), name="c")
    return x, c, ParamDict({"x": x, "c": c})


x, c, pd = two_scalars()
y = Trainer(pd, "sgd", {"learning_rate": 1.0}).train_step(y_of, 2.0, 4.0)
print(f"y = {float(y):.4f}   x = {float(x.data()):.4f}   c = {float(c.data()):.4f}")

x, c, pd = two_scalars()
c.lr_mult = 0.1  # {"params": [c], "lr": 0.1}
Trainer(pd, "sgd", {"learning_rate": 1.0}).train_step(y_of, 2.0, 4.0)
print(f"with lr 0.1 for c: c = {float(c.data()):.5f}   (3 - 44.52395 = -41.52395)")

# %% [markdown]
# A PyTorch trap: the optimizer holds tensors, not names. Rebinding `x = torch.tensor(1.0)` after
# building it leaves the optimizer training the old tensor, silently, and changing a group's rate
# means indexing `opt.param_groups[1]["lr"]`. lrmult's Trainer finds each value by its
# parameter's name: `x.set_data(...)` replaces the value it trains, and a group's rate is an
# attribute you change between steps.

# %%
x, c, pd = two_scalars()
trainer = Trainer(pd, "sgd", {"learning_rate": 1e-4})
x.set_data(jnp.float32(1.0))  # the Trainer trains the new value
trainer.train_step(y_of, 2.0, 4.0)
c.lr_mult = 1000.0  # opt.param_groups[1]["lr"] = 0.1
trainer.train_step(y_of, 2.0, 4.0)
print(trainer.explain())
print(f"x = {float(x.data()):.5f}, c = {float(c.data()):.5f}")

# %% [markdown]
# ## 3. One trainer for a shared trunk and several heads
#
# A convolutional trunk feeds two linear heads, each with its own loss, so the trunk gets the
# gradient of both. Chainer needed one optimizer per link and a hand-written `Updater`; PyTorch
# takes one optimizer over a list of groups:
#
# ```python
# opt = torch.optim.Adam([
#     {"params": trunk.parameters(), "lr": 1e-3},   # a slow shared trunk
#     {"params": head0.parameters()},
#     {"params": head1.parameters(), "lr": 2e-2},   # a fast second head
# ], lr=1e-2)
# loss0 = F.cross_entropy(head0(trunk(x)), y0)
# loss1 = F.cross_entropy(head1(trunk(x)), y1)
# (loss0 + loss1).backward()
# opt.step()
# ```
#
# In lrmult each model is a `ParamDict` with its own multipliers (`prefix=` keeps the names apart),
# a `Trainer` takes a list of them, and one jitted step trains everything. With `has_aux=True`
# the loss function returns the two losses beside their sum.


# %%
def conv(x, w):
    return jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


k = jax.random.split(jax.random.PRNGKey(0), 4)
trunk = ParamDict.from_pytree(
    {"conv": jax.random.normal(k[0], (3, 3, 1, 4)) * 0.3}, prefix="trunk/"
)
heads = [
    ParamDict.from_pytree({"w": jax.random.normal(kk, (64, 3)) * 0.1}, prefix=f"head{i}/")
    for i, kk in enumerate(k[1:3])
]
trunk.setattr("lr_mult", 0.1)  # a slow shared trunk
heads[1].setattr("lr_mult", 2.0)  # a fast second head

x = jax.random.normal(k[3], (32, 4, 4, 1))
y0, y1 = (x.sum((1, 2, 3)) > 0).astype(int), (x[:, 0, 0, 0] > 0).astype(int)


def head_loss(tree, i, x, y):
    feats = jax.nn.relu(conv(x, tree["trunk"]["conv"])).reshape(x.shape[0], -1)
    return optax.softmax_cross_entropy_with_integer_labels(feats @ tree[f"head{i}"]["w"], y).mean()


def both_losses(tree, x, y0, y1):
    l0, l1 = head_loss(tree, 0, x, y0), head_loss(tree, 1, x, y1)
    return l0 + l1, (l0, l1)


trainer = Trainer([trunk, *heads], "adam", {"learning_rate": 0.01})
for step in range(201):
    total, (l0, l1) = trainer.train_step(both_losses, x, y0, y1, has_aux=True)
    if step % 50 == 0:
        print(f"step {step:3d}  head0 loss {float(l0):.4f}  head1 loss {float(l1):.4f}")
trainer.explain()

# %% [markdown]
# ## 4. MXNet and Gluon: `set_lr_mult` and `collect_params().setattr`
#
# With MXNet's Module API you froze a layer through the optimizer's multiplier dict, here a 3x3
# convolution `conv1` under a `MakeLoss`:
#
# ```python
# opt = mx.optimizer.SGD(learning_rate=0.1)
# opt.set_lr_mult({"conv1_weight": 0})
# opt.set_lr_mult({"conv1_bias": 0})
# mod = mx.mod.Module(mx.sym.MakeLoss(conv1), ...)
# mod.init_optimizer(optimizer=opt)
# ```
#
# That does **not** freeze `conv1`: each `set_lr_mult` call replaces the dict, so the second call
# dropped the first and the weights train on. lrmult's `Trainer.set_lr_mult` merges the calls and
# returns the overrides in force; `replace=True` is MXNet's behaviour. Four updates with each:


# %%
def conv1_setup():
    rng = np.random.default_rng(1)
    pd = ParamDict.from_pytree(
        {
            "conv1_weight": jnp.asarray(rng.normal(size=(3, 3, 1, 2)), jnp.float32),
            "conv1_bias": jnp.asarray(rng.normal(size=(2,)), jnp.float32),
        }
    )
    return pd, jnp.asarray(rng.normal(size=(1, 5, 5, 1)), jnp.float32)


def conv1_out(p, x):
    return conv(x, p["conv1_weight"]) + p["conv1_bias"]


def make_loss(p, x):
    return jnp.sum(conv1_out(p, x))


for replace in (False, True):
    pd, data = conv1_setup()
    trainer = Trainer(pd, "sgd", {"learning_rate": 0.1})
    before = conv1_out(pd.tree(), data)
    trainer.set_lr_mult({"conv1_weight": 0})
    in_force = trainer.set_lr_mult({"conv1_bias": 0}, replace=replace)
    for _ in range(4):
        trainer.train_step(make_loss, data)
    change = float(jnp.abs(conv1_out(pd.tree(), data) - before).max())
    label = "MXNet (replace=True)" if replace else "lrmult (merge)     "
    print(f"{label}: overrides in force {in_force}, output change after 4 updates: {change:.4f}")

# %% [markdown]
# MXNet ignored an override naming no parameter, and in Gluon, where every Parameter has an
# `lr_mult` (1.0 unless you set one) that comes first in the lookup, every `set_lr_mult` override
# was ignored. In lrmult an attribute you never set reads as 1.0 but lets the overrides act. A
# typo is a `KeyError` with a suggestion, and an override that could never act, because the
# Parameter has an `lr_mult` of its own, is a `ValueError`:

# %%
pd, data = conv1_setup()
trainer = Trainer(pd, "sgd", {"learning_rate": 0.1})
try:
    trainer.set_lr_mult({"conv1_weigth": 0})
except KeyError as e:
    print("KeyError:", e)
pd["conv1_bias"].lr_mult = 2.0
try:
    trainer.set_lr_mult({"conv1_bias": 0})
except ValueError as e:
    print("ValueError:", e)

# %% [markdown]
# Gluon's own idiom sets an attribute on every parameter of a block, and merges the blocks'
# parameter dicts to train them with one `Trainer`, e.g. an Embedding + LSTM + Dense model that
# should barely move and a stack of two LSTM cells that should move fast:
#
# ```python
# model.collect_params().setattr("lr_mult", 0.01)
# cells.collect_params().setattr("lr_mult", 10)
# params = gluon.ParameterDict()
# params.update(model.collect_params())
# params.update(cells.collect_params())
# trainer = gluon.Trainer(params, "sgd", {"learning_rate": 0.5})
# ```
#
# lrmult's `ParamDict` has the same methods, and the merged dict shares the Parameters, so each
# keeps its own multiplier. (The arrays below stand in for the two models, with Gluon's names and
# shapes; for a flax model, `ParamDict.from_pytree(variables["params"])` names them for you.)

# %%
rng = np.random.default_rng(2)


def arr(*shape):
    return jnp.asarray(rng.normal(size=shape) * 0.1, jnp.float32)


model = ParamDict.from_pytree(
    {"embedding0_weight": arr(10, 4), "lstm0_i2h_weight": arr(16, 4), "dense0_weight": arr(2, 4)},
    prefix="model_",
)
cells = ParamDict.from_pytree(
    {"lstm_l0_i2h_weight": arr(8, 2), "lstm_l1_i2h_weight": arr(8, 2)}, prefix="stack_"
)
model.setattr("lr_mult", 0.01)
cells.setattr("lr_mult", 10)
merged = ParamDict()
merged.update(model)
merged.update(cells)
merged

# %%
trainer = Trainer(merged, "sgd", {"learning_rate": 0.5})
trainer.explain()

# %% [markdown]
# ## Next
#
# - `01_quickstart.ipynb`: a flax model's parameters, the Trainer, a multiplier changed in the
#   middle of training without recompiling, and the same multipliers in a plain optax chain.
# - `03_finetuning.ipynb`: fine-tuning recipes as one-line presets (layer-wise learning-rate
#   decay, a frozen backbone, gradual unfreezing, no weight decay on biases).
