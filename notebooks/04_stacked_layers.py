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
# # Fine-tuning a scanned (stacked-layer) model
#
# In PyTorch a deep network's blocks are separate modules (`nn.ModuleList`), so per-layer training
# controls are per-module: layer-wise learning-rate decay is one param group per block (timm's
# `param_groups_layer_decay` builds two per block, one with weight decay and one without), and
# freezing the bottom blocks is `block.requires_grad_(False)` on each:
#
# ```python
# groups = []
# for i, block in enumerate(model.blocks):                 # the model is unrolled: L modules
#     scale = 0.75 ** (len(model.blocks) - i)
#     decay = [p for p in block.parameters() if p.ndim > 1]
#     no_decay = [p for p in block.parameters() if p.ndim <= 1]
#     groups += [{"params": decay, "lr": lr * scale, "weight_decay": wd},
#                {"params": no_decay, "lr": lr * scale, "weight_decay": 0.0}]
# for block in model.blocks[:3]:
#     block.requires_grad_(False)
# ```
#
# Deep JAX models are usually **scanned** instead: `nnx.vmap` creates the L blocks at once, so every
# parameter of a block becomes one array with a leading axis of length L, and `nnx.scan` runs the
# same compiled block L times (compile time does not grow with depth). The price: the 8 layers'
# kernels are *one* `(8, 64, 64)` leaf, and optax's per-leaf tools (`optax.multi_transform`,
# `optax.masked`) cannot give layer 3 another learning rate than layer 4, nor freeze layer 0 alone.
#
# lrmult can: declare the stack once, `stacked={"layers": 1}`, and every layer gets the name it
# would have in the unrolled model (`layers/3/mlp/kernel`). `select`, `setattr`, the presets and
# `explain()` then work layer by layer, and the optimizer state holds one multiplier *vector* per
# stacked leaf. This notebook pretrains a scanned 8-block network on scikit-learn's digits 0-4
# (the data of `03_finetuning`), then fine-tunes it to the digits 5-9 from 20 labelled images per
# class, with the three usual recipes at once: layer-wise learning-rate decay, no weight decay on
# norms and biases, and the bottom three blocks frozen.

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

import lrmult
from lrmult import presets

L, D = 8, 64  # 8 blocks of width 64

digits = load_digits()
x_all = (digits.data / 16.0).astype(np.float32)
y_all = digits.target
old, new = np.flatnonzero(y_all < 5), np.flatnonzero(y_all >= 5)
rng = np.random.default_rng(1)
train = np.concatenate([rng.choice(new[y_all[new] == c], 20, replace=False) for c in range(5, 10)])
test = np.setdiff1d(new, train)
x_old, y_old = jnp.asarray(x_all[old]), jnp.asarray(y_all[old])
x_train, y_train = jnp.asarray(x_all[train]), jnp.asarray(y_all[train] - 5)
x_test, y_test = jnp.asarray(x_all[test]), jnp.asarray(y_all[test] - 5)


class Block(nnx.Module):
    """A pre-norm residual MLP block."""

    def __init__(self, rngs):
        self.norm = nnx.LayerNorm(D, rngs=rngs)
        self.mlp = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, x):
        return x + nnx.gelu(self.mlp(self.norm(x)))


class Model(nnx.Module):
    def __init__(self, classes, rngs):
        self.embed = nnx.Linear(64, D, rngs=rngs)

        @nnx.split_rngs(splits=L)  # a different initialisation for each block ...
        @nnx.vmap(in_axes=(0,), out_axes=0)  # ... created at once: one (L, ...) array per leaf
        def make(rngs):
            return Block(rngs)

        self.layers = make(rngs)
        self.norm = nnx.LayerNorm(D, rngs=rngs)
        self.head = nnx.Linear(D, classes, rngs=rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)  # block l reads row l of each leaf
        def run(block, x):
            return block(x)

        return self.head(self.norm(run(self.layers, self.embed(x))))


def cross_entropy(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit
def accuracy(model, x, y):
    return jnp.mean(jnp.argmax(model(x), axis=-1) == y)


pretrained = Model(5, nnx.Rngs(0))
trainer = lrmult.NNXTrainer(pretrained, None, "adamw", {"learning_rate": 3e-3, "wd": 1e-2})
for _ in range(30):
    loss = trainer.train_step(cross_entropy, x_old, y_old)
print(f"pretrained on 0-4: training cross-entropy {float(loss):.2g}")
print("the 8 blocks' kernels:", pretrained.layers.mlp.kernel.shape)

# %% [markdown]
# ## One name per layer
#
# For fine-tuning we copy the pretrained network and give it a new head for the digits 5-9.
# `lrmult.from_nnx(model, stacked={"layers": 1})` builds the ParamDict and says that everything
# under `layers/` has **one** leading stacked axis. Each stacked leaf is still one Parameter (one
# array, one leaf of the optimizer state), but a regular expression sees the per-layer names:
# `select("layers/3/")` returns the stacked Parameters that have a layer 3, and a `setattr` on it
# changes row 3 of each, and only row 3.

# %%
model = nnx.clone(pretrained)
model.head = nnx.Linear(D, 5, rngs=nnx.Rngs(1000))  # a new head for 5-9
params = lrmult.from_nnx(model, stacked={"layers": 1})
kernel = params["layers/mlp/kernel"]
print(f"{kernel.name}: shape {kernel.shape}, {kernel.stacked} stacked axis of {kernel.stack_shape}")
print("its per-layer names:", kernel.layer_name((0,)), "...", kernel.layer_name((L - 1,)))
print("select('layers/3/') ->", list(params.select("layers/3/")))

# %% [markdown]
# ## The three recipes
#
# - **Layer-wise learning-rate decay** (BEiT, ViT fine-tuning): `presets.layerwise_lr_decay(params,
#   0.75)` reads the block number in each per-layer name and sets `lr_mult = 0.75 ** (9 - id)`,
#   timm's rule: the embedding has id 0, block `i` has id `i + 1`, and everything else (the new
#   head, the final `norm/`) id 9, so the head trains at the full rate and the embedding at
#   0.75 ** 9. A stacked Parameter's `lr_mult` becomes a vector with one entry per layer.
# - **No weight decay on norms and biases**: `presets.no_decay(params)` sets `wd_mult = 0` on
#   parameters with at most one dimension, and judges a stacked leaf **by its per-layer rank**: the
#   stacked LayerNorm scale is an `(8, 64)` array, but each layer's scale is a `(64,)` vector, so it
#   gets no decay, while the `(8, 64, 64)` kernel (a matrix per layer) keeps it.
# - **Freeze the bottom three blocks**: `params.select("layers/[0-2]/").setattr("frozen", True)`.
#   In PyTorch that is `requires_grad_(False)` on three modules; here it freezes rows 0-2 of every
#   leaf of the stack.
#
# The presets compose with what is already set and each returns what it changed. The table shows
# the multiplier vectors of the stacked leaves:

# %%
presets.layerwise_lr_decay(params, 0.75)
presets.no_decay(params)
params

# %%
params.select("layers/[0-2]/").setattr("frozen", True)
print("frozen layers of layers/mlp/kernel:", params["layers/mlp/kernel"].frozen_layers)

# %% [markdown]
# `explain()` shows the result with **one row per layer**, as the unrolled model would list it:
# each layer's multipliers, its effective learning rate `lr` and weight decay `wd` (both 0 for a
# frozen layer), and the link that set each value (`preset:...` for the presets, `param` for what
# was set by hand).

# %%
trainer = lrmult.NNXTrainer(model, params, "adamw", {"learning_rate": 1e-3, "wd": 5e-2})
trainer.explain()

# %% [markdown]
# ## Fine-tuning, layer by layer
#
# We fine-tune for 40 full-batch AdamW steps and record, after each step, how far each layer's
# kernel moved: the norm of `kernel[l]` after the step minus before, for l = 0..7. The module stays
# the source of truth: `NNXTrainer.train_step` writes the new values back into `model`, and we read
# them from there.


# %%
STEPS = 40  # per phase: 40 steps with layers 0-2 frozen, then 40 with all layers training


def train(steps, record):
    for _ in range(steps):
        before = np.asarray(model.layers.mlp.kernel[...])
        trainer.train_step(cross_entropy, x_train, y_train)
        after = np.asarray(model.layers.mlp.kernel[...])
        record.append(np.linalg.norm((after - before).reshape(L, -1), axis=1))


print(f"before fine-tuning: {float(accuracy(model, x_test, y_test)):.1%} held-out accuracy")
start = np.asarray(model.layers.mlp.kernel[...])
stack_start = [np.asarray(x) for x in jax.tree.leaves(nnx.state(model.layers, nnx.Param))]
norms = []
train(STEPS, norms)
print(f"after {STEPS} steps: {float(accuracy(model, x_test, y_test)):.1%} held-out accuracy")
phase1 = np.array(norms)  # (steps, L)

fig, ax = plt.subplots(figsize=(8, 4))
colors = plt.cm.viridis(np.linspace(0, 0.9, L))
for layer in range(L):
    style = "--" if layer < 3 else "-"
    ax.plot(phase1[:, layer], style, color=colors[layer], label=f"layers/{layer}")
ax.set_xlabel("fine-tuning step")
ax.set_ylabel("|update| of layers/l/mlp/kernel")
ax.set_title("layer-wise decay 0.75, layers 0-2 frozen (dashed, at 0)")
ax.legend(ncol=2, fontsize=8)
ax.grid(alpha=0.3)
plt.show()

# %% [markdown]
# Each block above the frozen ones moves about 1 / 0.75 = 1.33 times as far as the one below it
# (Adam normalises the gradient, so its step is proportional to the learning rate), and the frozen
# blocks do not move at all: no gradient step, no weight decay. The same, as checks:

# %%
mean = phase1.mean(axis=0)
print("mean |update| per layer:", np.array2string(mean, precision=4))
print("ratio to the layer below:", np.array2string(mean[4:] / mean[3:-1], precision=2))
kernel_now = np.asarray(model.layers.mlp.kernel[...])
assert np.array_equal(kernel_now[:3], start[:3])  # frozen kernels: bit for bit
assert np.all(phase1[:, :3] == 0.0)  # exactly zero at every step
stack_now = jax.tree.leaves(nnx.state(model.layers, nnx.Param))  # the norms and biases too
assert all(np.array_equal(a[:3], b[:3]) for a, b in zip(stack_now, stack_start, strict=True))
assert np.all(np.diff(mean[3:]) > 0)  # deeper trainable layers move further
assert np.all(kernel_now[3:] != start[3:])

# %% [markdown]
# ## Unfreezing mid-way
#
# Gradual unfreezing (ULMFiT) gives the lower blocks a start from features the upper blocks have
# already adapted to. Unfreezing is the same `setattr` with `False`, again per layer:
# `params.select("layers/[0-2]/").setattr("frozen", False)`. The next `train_step` compiles the
# step once for the new frozen set; the layers that were training keep their Adam moments.
#
# The unfrozen layers start **fresh** optimizer state with a step count of their own, as in PyTorch
# (Adam creates a parameter's state the first time it has a gradient): Adam's bias correction
# restarts for them. The visible effect: Adam's first step is `m̂ / √v̂ = g / |g|`, so every entry
# of a fresh layer moves by its full learning rate, while a layer with 40 steps of history moves by
# less (its `v` still remembers the larger gradients of the earlier steps). To see it, the second
# panel divides each update norm by `lr_l · √n` (`n` = 64 · 64 entries), the learning rate of each
# layer read from `explain()`: Adam's step in units of its learning rate.

# %%
params.select("layers/[0-2]/").setattr("frozen", False)
lr = {r.name: r.lr for r in trainer.explain()}
lr_per_layer = np.array([lr[f"layers/{layer}/mlp/kernel"] for layer in range(L)])
print("learning rate of each layer's kernel:", np.array2string(lr_per_layer, precision=6))
train(STEPS, norms)
print(f"after {2 * STEPS} steps: {float(accuracy(model, x_test, y_test)):.1%} held-out accuracy")
allsteps = np.array(norms)
unit = allsteps / (lr_per_layer * np.sqrt(D * D))

fig, axes = plt.subplots(1, 2, figsize=(12, 4))
for ax, values, label in [
    (axes[0], allsteps, "|update| of layers/l/mlp/kernel"),
    (axes[1], unit, "|update| / (lr_l * sqrt(n))"),
]:
    for layer in range(L):
        style = "--" if layer < 3 else "-"
        ax.plot(values[:, layer], style, color=colors[layer], label=f"layers/{layer}")
    ax.axvline(STEPS, color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("fine-tuning step (dotted line: layers 0-2 unfrozen)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
axes[0].legend(ncol=2, fontsize=8)
axes[1].set_title("Adam's step in units of each layer's learning rate")
plt.show()

# %% [markdown]
# At step 40 the dashed lines jump from zero: layers 0-2 move. In units of their learning rate
# (right), their first step is 1.0, exactly where layers 3-7 started at step 0, and well above
# where layers 3-7 are by step 40: the unfrozen layers' Adam state is new, not carried over.
# Among themselves the unfrozen layers again follow the decay (layer 2 moves furthest). Checks:

# %%
first = unit[STEPS]
print(f"step {STEPS}, in units of lr:", np.array2string(first, precision=2))
assert np.all(allsteps[STEPS:, :3] > 0)  # the unfrozen layers move at every step
assert np.allclose(first[:3], unit[0, 3:].mean(), rtol=0.05)  # a fresh start, as step 0
assert first[:3].min() > 1.5 * first[3:].max()  # the others keep their (older) state
assert np.all(np.diff(allsteps[STEPS:, :3].mean(axis=0)) > 0)

# %% [markdown]
# ## What to take away
#
# - A scanned model keeps each parameter of its L blocks in one `(L, ...)` array; declare the stack
#   with `stacked={"layers": 1}` and every layer has a name, `layers/l/...`, as in the unrolled
#   model you would write in PyTorch.
# - Everything that takes names works per layer: `select` + `setattr`, `apply_rules`, the presets
#   (`no_decay` judges each layer's rank), `explain()`. What would be 2 L param groups in PyTorch is
#   one multiplier vector per stacked leaf in the optimizer state; changing a layer's value
#   (`params.select("layers/5/").setattr("lr_mult", 0.5)`) never recompiles.
# - Frozen layers get no update and no weight decay, and hold no optimizer state; unfrozen, they
#   start fresh, as PyTorch's `requires_grad_(True)` does. A partly frozen stack still computes the
#   gradient of all its layers (it is one array), which a wholly frozen stack does not.
