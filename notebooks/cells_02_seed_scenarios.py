"""Cells of 02_seed_scenarios.ipynb: the four scenarios lrmult was asked to serve."""

CELLS = [
    (
        "md",
        """
# The four scenarios, each in a few lines

lrmult was asked to serve four situations from practitioners' notes on Chainer, PyTorch and
MXNet. Each section below reproduces one with its numbers printed:

- **A.** Per-parameter update rules on a small MLP (Chainer v2 `UpdateRule`).
- **B.** SGD on two scalars with different learning rates (PyTorch `param_groups`).
- **C.** One trainer for a shared trunk and several heads with their own losses (Chainer's custom
  `Updater`).
- **D.** Layer-wise multipliers with MXNet's `set_lr_mult` and Gluon's `ParamDict.setattr`.
""",
    ),
    (
        "code",
        """
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lrmult import ParamDict, Parameter, Trainer

np.set_printoptions(precision=5, suppress=True)
""",
    ),
    (
        "md",
        """
## A. Per-parameter rules on the XOR MLP

An MLP `l1 = Linear(2, 2)`, `l2 = Linear(2, 1)`, SGD with learning rate 0.1, one step of sigmoid
cross-entropy on XOR. In Chainer, `l1.W` gets its own learning rate of 10.0 and `l1.b` is disabled.
With lrmult these are two attributes: `lr_mult = 100` (10.0 / 0.1) and `grad_req = 'null'`.
""",
    ),
    (
        "code",
        """
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
    return jnp.mean(jax.nn.softplus(y) - t * y)   # sigmoid cross-entropy

params = ParamDict.from_pytree(jax.tree.map(jnp.asarray, init))
params["l1/W"].lr_mult = 100.0      # Chainer: l1.W.update_rule.hyperparam.lr = 10.0
params["l1/b"].grad_req = "null"    # Chainer: l1.b.update_rule.enabled = False
trainer = Trainer(params, "sgd", {"learning_rate": 0.1})
trainer.explain()
""",
    ),
    (
        "code",
        """
trainer.train_step(xor_loss, X, T)
for name in ["l1/W", "l1/b", "l2/W", "l2/b"]:
    a, b = name.split("/")
    change = np.abs(np.asarray(params[name].data()) - init[a][b]).max()
    print(f"{name}: largest change {change:.6f}")
""",
    ),
    (
        "md",
        """
`l1/W` moved by far the most; `l1/b` did not move at all: it is frozen, so its gradient was not
even computed. Chainer also disables a whole link and adds per-parameter hooks such as weight
decay. Here a link is a `select`, and a hook is a `wd_mult`:
""",
    ),
    (
        "code",
        """
params.select("l2/").setattr("frozen", True)     # link.disable_update()
params.setattr("wd_mult", 0.0)
params["l1/W"].wd_mult = 1.0                      # update_rule.add_hook(WeightDecay(1e-4))
before = params.arrays()
trainer.train_step(xor_loss, X, T)
print("l2/W unchanged:", np.array_equal(before["l2/W"], params["l2/W"].data()))
_ = params.select("l2/").setattr("frozen", False)    # link.enable_update()
""",
    ),
    (
        "md",
        """
Chainer's pitfall: overriding one parameter's learning rate detaches it from the optimizer's
schedule. A multiplier cannot detach: with a schedule on the base rate, every ratio holds.
""",
    ),
    (
        "code",
        """
pd = ParamDict.from_pytree({"l1": {"W": jnp.zeros(2)}, "l2": {"W": jnp.zeros(2)}})
pd["l1/W"].lr_mult = 100.0
schedule = optax.exponential_decay(0.1, transition_steps=1, decay_rate=0.5)
scheduled = Trainer(pd, "sgd", {"learning_rate": schedule})
ones = {"l1/W": jnp.ones(2), "l2/W": jnp.ones(2)}
for step in range(4):
    before = pd.arrays()
    rate = scheduled.learning_rate
    scheduled.step(ones)
    d1 = float(before["l1/W"][0] - pd["l1/W"].data()[0])
    d2 = float(before["l2/W"][0] - pd["l2/W"].data()[0])
    print(f"step {step}: base rate {rate:.4f}  l1/W moved {d1:.4f}  "
          f"l2/W moved {d2:.5f}  ratio {d1 / d2:.1f}")
""",
    ),
    (
        "md",
        """
## B. SGD on two scalars (PyTorch `param_groups`)

`x = 5`, `c = 3` trainable, `b = 2`, `d = 4` constants, `y = 3·c·exp(x) + b·x + d`. By hand:
`y = 1349.7185`, `dy/dx = 3·c·exp(x) + b = 1337.7185`, `dy/dc = 3·exp(x) = 445.2395`. One SGD step
at learning rate 1.0 gives `x = -1332.7185`, `c = -442.2395`.
""",
    ),
    (
        "code",
        """
def y_of(p, b, d):
    return 3 * p["c"] * jnp.exp(p["x"]) + b * p["x"] + d

def two_scalars():
    x, c = Parameter(jnp.float32(5.0), name="x"), Parameter(jnp.float32(3.0), name="c")
    return x, c, ParamDict({"x": x, "c": c})

x, c, pd = two_scalars()
y = Trainer(pd, "sgd", {"learning_rate": 1.0}).train_step(y_of, 2.0, 4.0)
print(f"y = {float(y):.4f}   x = {float(x.data()):.4f}   c = {float(c.data()):.4f}")

x, c, pd = two_scalars()
c.lr_mult = 0.1                                    # a group with lr 0.1 for c
Trainer(pd, "sgd", {"learning_rate": 1.0}).train_step(y_of, 2.0, 4.0)
print(f"with lr 0.1 for c: c = {float(c.data()):.5f}   (3 - 44.52395 = -41.52395)")
""",
    ),
    (
        "md",
        """
PyTorch's pitfall: replacing a tensor inside the optimizer, or rebinding the Python variable,
silently splits "the parameter" from "what the optimizer updates". lrmult finds every value by its
name, so `set_data` replaces the value the Trainer trains, and changing a group's rate between
steps is an attribute:
""",
    ),
    (
        "code",
        """
x, c, pd = two_scalars()
trainer = Trainer(pd, "sgd", {"learning_rate": 1e-4})
x.set_data(jnp.float32(1.0))              # the Trainer sees the new value
trainer.train_step(y_of, 2.0, 4.0)
c.lr_mult = 1000.0                         # param_groups[1]['lr'] = 0.1
trainer.train_step(y_of, 2.0, 4.0)
print(trainer.explain())
print(f"x = {float(x.data()):.5f}, c = {float(c.data()):.5f}")
""",
    ),
    (
        "md",
        """
## C. One trainer, a shared trunk and several heads

A convolutional trunk feeds two linear heads, each with its own loss; the trunk accumulates the
gradient of both. Chainer's note needs one optimizer per model and a hand-written updater. Here
the ParamDicts merge, each keeps its own multipliers, and one jitted step trains everything.
""",
    ),
    (
        "code",
        """
def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

k = jax.random.split(jax.random.PRNGKey(0), 4)
trunk = ParamDict.from_pytree({"conv": jax.random.normal(k[0], (3, 3, 1, 4)) * 0.3},
                              prefix="trunk/")
heads = [ParamDict.from_pytree({"w": jax.random.normal(kk, (64, 3)) * 0.1}, prefix=f"head{i}/")
         for i, kk in enumerate(k[1:3])]
trunk.setattr("lr_mult", 0.1)       # a slow shared trunk
heads[1].setattr("lr_mult", 2.0)    # a fast second head

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
""",
    ),
    (
        "md",
        """
## D. MXNet's `set_lr_mult` and Gluon's `ParamDict.setattr`

MXNet's Module API: a 3x3 convolution `conv1` with a `MakeLoss` output. Calling
`set_lr_mult({'conv1_weight': 0})` and then `set_lr_mult({'conv1_bias': 0})` does **not** freeze
the layer in MXNet: the second call *replaced* the first, so the weights train and the output
changes after four updates. lrmult merges the calls (and `replace=True` gives MXNet's behaviour):
""",
    ),
    (
        "code",
        """
def conv1_setup():
    rng = np.random.default_rng(1)
    pd = ParamDict.from_pytree({
        "conv1_weight": jnp.asarray(rng.normal(size=(3, 3, 1, 2)), jnp.float32),
        "conv1_bias": jnp.asarray(rng.normal(size=(2,)), jnp.float32),
    })
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
""",
    ),
    (
        "md",
        """
Silent cases in MXNet are loud here. A typo is a `KeyError` with a suggestion; an override that
could never act, because the Parameter has its own `lr_mult`, is a `ValueError`:
""",
    ),
    (
        "code",
        """
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
""",
    ),
    (
        "md",
        """
Gluon: an Embedding + LSTM + Dense model gets `setattr('lr_mult', 0.01)`, a stack of two LSTM cells
gets `setattr('lr_mult', 10)`; merging the ParamDicts keeps each parameter's own multiplier and
the merged dict drives one Trainer. (The arrays are stand-ins with Gluon's names and shapes.)
""",
    ),
    (
        "code",
        """
rng = np.random.default_rng(2)
def arr(*shape):
    return jnp.asarray(rng.normal(size=shape) * 0.1, jnp.float32)

model = ParamDict.from_pytree(
    {"embedding0_weight": arr(10, 4), "lstm0_i2h_weight": arr(16, 4), "dense0_weight": arr(2, 4)},
    prefix="model_")
cells = ParamDict.from_pytree({"lstm_l0_i2h_weight": arr(8, 2), "lstm_l1_i2h_weight": arr(8, 2)},
                              prefix="stack_")
model.setattr("lr_mult", 0.01)
cells.setattr("lr_mult", 10)
merged = ParamDict()
merged.update(model)
merged.update(cells)
merged
""",
    ),
    (
        "code",
        """
trainer = Trainer(merged, "sgd", {"learning_rate": 0.5})
trainer.explain()
""",
    ),
]
