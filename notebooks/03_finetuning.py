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
# # Fine-tuning with lrmult's presets
#
# A network pretrained on one task is adapted to another. How fast each layer should move is the
# whole question of fine-tuning, and the usual answers are recipes users hand-roll in every
# project: freeze the backbone, decay the learning rate layer by layer (BEiT, ViT fine-tuning),
# unfreeze gradually from the top (ULMFiT), and keep weight decay off biases and normalisation
# parameters. lrmult has each as a preset that sets per-parameter `lr_mult`, `wd_mult` or `frozen`,
# composes with what you set yourself, and shows up in `explain()`.
#
# The data ship with scikit-learn (`load_digits`, 8x8 images): we pretrain a small flax NNX MLP on
# the digits 0-4, then fine-tune it with a new head to read the digits 5-9 from only 10 labelled
# images per class, and test on the ~850 others.

# %%
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

import lrmult
from lrmult import presets

digits = load_digits()
x_all = (digits.data / 16.0).astype(np.float32)
y_all = digits.target
old, new = np.flatnonzero(y_all < 5), np.flatnonzero(y_all >= 5)
rng = np.random.default_rng(1)
train = np.concatenate([rng.choice(new[y_all[new] == c], 10, replace=False) for c in range(5, 10)])
test = np.setdiff1d(new, train)
x_old, y_old = jnp.asarray(x_all[old]), jnp.asarray(y_all[old])
x_train, y_train = jnp.asarray(x_all[train]), jnp.asarray(y_all[train] - 5)
x_test, y_test = jnp.asarray(x_all[test]), jnp.asarray(y_all[test] - 5)


class MLP(nnx.Module):
    def __init__(self, classes, *, rngs):
        self.embed = nnx.Linear(64, 128, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(128, 128, rngs=rngs) for _ in range(2)])
        self.head = nnx.Linear(128, classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.embed(x))
        for layer in self.layers:
            x = nnx.relu(layer(x))
        return self.head(x)


def cross_entropy(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit
def accuracy(model, x, y):
    return jnp.mean(jnp.argmax(model(x), axis=-1) == y)


pretrained = MLP(5, rngs=nnx.Rngs(0))
trainer = lrmult.NNXTrainer(pretrained, None, "adamw", {"learning_rate": 3e-3, "wd": 1e-2})
for _ in range(300):
    trainer.train_step(cross_entropy, x_old, y_old)
print(f"pretrained on 0-4: {float(accuracy(pretrained, x_old, y_old)):.1%} training accuracy")


# %% [markdown]
# `ParamDict.from_nnx` gives one Parameter per `nnx.Param`, named by its path. The presets work on
# those names: `layerwise_lr_decay` reads the block number in `layers/0/...`, puts the embedding at
# depth 0 and the head on top, and sets `lr_mult = decay ** (num_layers - layer_id)`. Presets
# compose with what you set: the factor multiplies the current `lr_mult`. Below, the embedding was
# given 2.0 by hand first, and ends at 2 x 0.5 ** 3 = 0.25.


# %%
def fresh_model(seed=0):
    model = nnx.clone(pretrained)
    model.head = nnx.Linear(128, 5, rngs=nnx.Rngs(1000 + seed))  # a new head for 5-9
    return model, lrmult.ParamDict.from_nnx(model, filter=nnx.Param)


model, params = fresh_model()
params.select("embed/").setattr("lr_mult", 2.0)  # our own choice, before the preset
presets.layerwise_lr_decay(params, 0.5)
params

# %% [markdown]
# ## No-decay groups
#
# `no_decay` sets `wd_mult = 0` on parameters with at most one dimension and on names that look like
# biases or normalisation parameters (HuggingFace's and big_vision's practice);
# `no_decay(params, mxnet=True)` is MXNet 1.x's rule instead (decay only names ending in `weight`,
# `gamma` or `kernel`). `explain()` names the preset that set each value as its source.

# %%
presets.no_decay(params)
trainer = lrmult.NNXTrainer(model, params, "adamw", {"learning_rate": 3e-3, "wd": 1e-2})
trainer.explain()

# %% [markdown]
# ## Four ways to fine-tune
#
# Each run starts from the same pretrained network with the same new head, uses AdamW at the same
# base learning rate for 200 full-batch steps, and keeps weight decay off biases (`no_decay`).
#
# - **all at 1x**: every parameter at the base rate;
# - **frozen backbone**: `linear_probe(params, "head/")`, only the head trains;
# - **layer-wise decay**: `layerwise_lr_decay(params, 0.5)`;
# - **decay + gradual unfreezing**: layer-wise decay, the head alone first, then one more layer
#   unfrozen from the top every 50 steps, each ramping its `lr_mult` up from 0 over 10 steps
#   (ULMFiT): `presets.gradual_unfreezing(params, ["head/", "layers/1/", "layers/0/", "embed/"],
#   every=50, warmup=10)`.
#
# The plan is data on the parameters, not code in the loop: the trainer carries it out by itself,
# so the training loop below is the same for all four. Each new frozen set compiles the step once
# (the ramps change multipliers only: no recompilation); the layers already training keep their
# Adam state, and each newly unfrozen layer starts with a step count of its own.

# %%
STEPS, STAGE, WARMUP = 200, 50, 10
KERNELS = ["embed/kernel", "layers/0/kernel", "layers/1/kernel", "head/kernel"]


def run(strategy):
    model, params = fresh_model()
    presets.no_decay(params)
    if strategy == "frozen backbone":
        presets.linear_probe(params, "head/")
    if strategy in ("layer-wise decay", "decay + gradual unfreezing"):
        presets.layerwise_lr_decay(params, 0.5)
    if strategy == "decay + gradual unfreezing":
        groups = ["head/", "layers/1/", "layers/0/", "embed/"]
        presets.gradual_unfreezing(params, groups, every=STAGE, warmup=WARMUP)
    trainer = lrmult.NNXTrainer(model, params, "adamw", {"learning_rate": 3e-3, "wd": 1e-2})
    losses, lr_mults = [], []
    for _ in range(STEPS):
        losses.append(float(trainer.train_step(cross_entropy, x_train, y_train)))
        # What each kernel's step used (0 while frozen), to plot below: not needed to train.
        lr_mults.append([0.0 if params[n].frozen else params[n].lr_mult for n in KERNELS])
    return {
        "losses": losses,
        "lr_mults": np.array(lr_mults),
        "accuracy": float(accuracy(model, x_test, y_test)),
        "trainer": trainer,
    }


STRATEGIES = ["all at 1x", "frozen backbone", "layer-wise decay", "decay + gradual unfreezing"]
results = {s: run(s) for s in STRATEGIES}
for s, r in results.items():
    acc, loss = r["accuracy"], r["losses"][-1]
    print(f"{s:28s} held-out accuracy {acc:.1%}   final training loss {loss:.2g}")

# %%
fig, ax = plt.subplots(figsize=(8, 4))
for s, r in results.items():
    ax.plot(r["losses"], label=f"{s} ({r['accuracy']:.1%} held out)")
for step in range(STAGE, STEPS, STAGE):
    ax.axvline(step, color="gray", linestyle=":", linewidth=1)
ax.set_yscale("log")
ax.set_xlabel("fine-tuning step (dotted: gradual unfreezing adds a layer)")
ax.set_ylabel("training cross-entropy")
ax.legend()
ax.grid(alpha=0.3)
plt.show()

# %% [markdown]
# ## The effective learning rate of each layer
#
# `trainer.explain()` returns rows with each parameter's effective learning rate `lr` (base rate
# times `lr_mult`, 0 when frozen). For the kernels of the layer-wise decay run, input first:

# %%
rows = [r for r in results["layer-wise decay"]["trainer"].explain() if r.name.endswith("kernel")]
rows.sort(key=lambda r: KERNELS.index(r.name))
fig, ax = plt.subplots(figsize=(6, 3))
ax.bar([r.name for r in rows], [r.lr for r in rows], color="tab:green")
for i, r in enumerate(rows):
    ax.annotate(f"x{r.lr_mult:g}", (i, r.lr), ha="center", va="bottom")
ax.set_ylabel("effective learning rate")
ax.set_title("layerwise_lr_decay(params, 0.5)")
plt.show()

# %% [markdown]
# ## The plan, step by step
#
# The gradual-unfreezing run's `lr_mult` per kernel at every step (0 while frozen): each layer
# joins at its step and ramps linearly to what layer-wise decay gave it. The trainer's summary
# (and `explain()`) ends with the plan: when each group unfroze, and where the trainer is in it.

# %%
plan_run = results["decay + gradual unfreezing"]
fig, ax = plt.subplots(figsize=(8, 3))
for name, column in zip(KERNELS, plan_run["lr_mults"].T, strict=True):
    ax.plot(column, label=name)
ax.set_xlabel("fine-tuning step")
ax.set_ylabel("lr_mult used")
ax.legend(fontsize=8)
ax.grid(alpha=0.3)
plt.show()
plan_run["trainer"].summary()

# %% [markdown]
# ## What the numbers say
#
# The run above (one seed; `examples/finetune_digits.py` repeats the comparison over three seeds)
# shows the pattern of few-shot transfer:
#
# - A **frozen backbone** is the cheapest run (no gradients and no Adam state for the backbone),
#   but features learnt on 0-4 alone are not enough to separate 5-9 well: its held-out accuracy is
#   the lowest, and its training loss stays high.
# - Training **all layers at 1x** fits the 50 training images fastest. With this little data and
#   this small a network, that is also hard to beat on held-out accuracy.
# - **Layer-wise decay** moves the lower layers less (the bar chart), so the network stays closer
#   to its pretrained features while the head and top block adapt; **gradual unfreezing** adds a
#   layer at a time, visible as the kinks in its loss curve (softened by the ramps), and ends
#   near the full fine-tune.
#
# Which recipe wins depends on how far apart the tasks are and how much labelled data there is:
# the point of the presets is that trying each is one line, and `explain()` shows exactly what
# every layer got.
