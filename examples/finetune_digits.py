"""Fine-tune a pretrained flax NNX network to a new task, with lrmult's presets.

An MLP learns to read handwritten digits (0-9) from half of scikit-learn's `load_digits` images
(shipped with the package: no download). The new task, on the other half, is "odd or even?",
learnt from only a few labelled images per class with a new two-way head, four ways, all with
the same optimizer (AdamW), base learning rate and number of steps:

- scratch: a fresh network, every parameter at 1x;
- fine-tune: the pretrained network, every parameter at 1x;
- linear probe: the pretrained network frozen, only the new head trains
  (`lrmult.presets.linear_probe`);
- LP-FT + LLRD: a linear probe for the first third of the steps, then everything unfrozen with
  layer-wise learning-rate decay (`lrmult.presets.layerwise_lr_decay`) and no weight decay on
  biases (`lrmult.presets.no_decay`).

Each is repeated over a few seeds (labelled subset and new head). The script prints the
parameters and `explain()` of the last run, a table of test accuracies, and writes
`finetune_digits.png` next to itself (test accuracy during training, and the effective learning
rate of each layer).

Run: pip install -e ".[demo]" && python examples/finetune_digits.py
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from sklearn.datasets import load_digits

import lrmult
from lrmult import presets

PNG = Path(__file__).with_suffix(".png")
STRATEGIES = ("scratch", "fine-tune", "linear probe", "LP-FT + LLRD")
LLRD_GROUPS = ["layers/0/", "layers/1/", "head/"]


class MLP(nnx.Module):
    """Two hidden layers (the part that transfers) and a classification head."""

    def __init__(self, classes: int, *, rngs: nnx.Rngs) -> None:
        self.layers = nnx.List([nnx.Linear(64, 128, rngs=rngs), nnx.Linear(128, 64, rngs=rngs)])
        self.head = nnx.Linear(64, classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = nnx.relu(layer(x))
        return self.head(x)


def cross_entropy(model: MLP, x: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit
def _predict(model: MLP, x: jax.Array) -> jax.Array:
    return jnp.argmax(model(x), axis=-1)


def accuracy(model: MLP, x: jax.Array, y: jax.Array) -> float:
    return float(jnp.mean(_predict(model, x) == y))


def load(shots: int, seed: int):
    """The pretraining task (digits 0-9 on half the images, and its held-out half) and the new
    task (odd or even on the other half: `shots` labelled images per class, the rest to test)."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target
    order = np.random.default_rng(0).permutation(len(y))
    source, target = order[: len(y) // 2], order[len(y) // 2 :]
    parity = y[target] % 2
    rng = np.random.default_rng(seed + 1)
    train = np.concatenate(
        [rng.choice(np.flatnonzero(parity == c), shots, replace=False) for c in (0, 1)]
    )
    test = np.setdiff1d(np.arange(len(target)), train)

    def pair(images, labels):
        return jnp.asarray(images), jnp.asarray(labels)

    return (
        pair(x[source], y[source]),
        pair(x[target], y[target]),
        pair(x[target][train], parity[train]),
        pair(x[target][test], parity[test]),
    )


def pretrain(x: jax.Array, y: jax.Array, steps: int) -> MLP:
    model = MLP(10, rngs=nnx.Rngs(0))
    trainer = lrmult.NNXTrainer(model, None, "adamw", {"learning_rate": 3e-3, "wd": 1e-4})
    for _ in range(steps):
        trainer.train_step(cross_entropy, x, y)
    return model


def finetune(strategy, pretrained, data, steps, seed, eval_every, advance):
    """Train one strategy; returns (test accuracy curve, trainer)."""
    (x, y), (x_test, y_test) = data
    if strategy == "scratch":
        model = MLP(2, rngs=nnx.Rngs(1000 + seed))
    else:
        model = nnx.clone(pretrained)
        model.head = nnx.Linear(64, 2, rngs=nnx.Rngs(1000 + seed))  # a new head for the new task
    params = lrmult.from_nnx(model)
    if strategy == "linear probe":
        presets.linear_probe(params, "head/")
    elif strategy == "LP-FT + LLRD":
        presets.linear_probe(params, "head/")
        presets.layerwise_lr_decay(params, 0.3, LLRD_GROUPS)
        presets.no_decay(params)
    trainer = lrmult.NNXTrainer(model, params, "adamw", {"learning_rate": 3e-3, "wd": 1e-2})
    curve = [(0, accuracy(model, x_test, y_test))]
    for step in range(1, steps + 1):
        if strategy == "LP-FT + LLRD" and step == steps // 3 + 1:
            params.setattr("frozen", False)  # the probe phase is over: fine-tune everything
        trainer.train_step(cross_entropy, x, y)
        if step % eval_every == 0 or step == steps:
            curve.append((step, accuracy(model, x_test, y_test)))
        advance()
    return curve, trainer


def plot(curves, trainer, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    for strategy in STRATEGIES:
        runs = np.array([[a for _, a in c] for c in curves[strategy]])
        steps = [s for s, _ in curves[strategy][0]]
        mean = runs.mean(axis=0)
        ax.plot(steps, mean, label=f"{strategy} ({mean[-1]:.1%})")
        ax.fill_between(steps, runs.min(axis=0), runs.max(axis=0), alpha=0.15)
    unfreeze = curves["LP-FT + LLRD"][0][-1][0] // 3
    ax.axvline(unfreeze, color="tab:red", linestyle=":", linewidth=1)
    ax.annotate(" LP-FT unfreezes", (unfreeze, ax.get_ylim()[0]), color="tab:red", va="bottom")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("test accuracy: odd or even?")
    ax.set_title("Few-shot transfer, mean and range over seeds")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    rows = [r for r in trainer.explain() if r.name.endswith("kernel")]
    rows.sort(key=lambda r: r.lr)  # input layer first (at the top)
    bx.barh([r.name for r in rows], [r.lr for r in rows], color="tab:red")
    for i, r in enumerate(rows):
        bx.annotate(f" lr_mult {r.lr_mult:g}", (r.lr, i), va="center")
    bx.invert_yaxis()
    bx.set_xlim(0, 1.45 * max(r.lr for r in rows))
    bx.set_xlabel("effective learning rate after the probe phase")
    bx.set_title("LP-FT + LLRD: lrmult.explain()")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(
    steps: int = 300,
    pretrain_steps: int = 300,
    seeds: int = 3,
    shots: int = 10,
    eval_every: int = 10,
    png: Path | None = PNG,
    progress: bool = True,
) -> dict[str, float]:
    """Run the comparison; returns the mean final test accuracy of each strategy."""
    console = Console()
    source, held_out, _, _ = load(shots, 0)
    with console.status("pretraining: digits 0-9", spinner="dots", refresh_per_second=4):
        pretrained = pretrain(*source, pretrain_steps)
    console.print(
        f"pretrained to read digits 0-9: {accuracy(pretrained, *held_out):.1%} on the other half "
        f"of the images,\nwhich the new task (odd or even?) uses: {2 * shots} labelled, "
        f"{len(load(shots, 0)[3][1])} to test"
    )

    curves: dict[str, list] = {s: [] for s in STRATEGIES}
    with Progress(console=console, disable=not progress, transient=True) as bar:
        task = bar.add_task("fine-tuning", total=seeds * len(STRATEGIES) * steps)
        for seed in range(seeds):
            _, _, train, test = load(shots, seed)
            for strategy in STRATEGIES:
                bar.update(task, description=f"seed {seed}: {strategy:12s}")
                curve, trainer = finetune(
                    strategy,
                    pretrained,
                    (train, test),
                    steps,
                    seed,
                    eval_every,
                    lambda: bar.advance(task),
                )
                curves[strategy].append(curve)
    # lrmult's own tables, as plain text (rich would read their brackets as markup).
    for text in (trainer.params, trainer.explain()):
        console.print(str(text), markup=False, highlight=False, soft_wrap=True, end="\n\n")

    table = Table(
        title=f"Odd or even, from {shots} labelled images per class ({seeds} seeds, {steps} steps)"
    )
    for col in ("strategy", "trained parameters", "final accuracy", "best accuracy"):
        table.add_column(col, justify="left" if col == "strategy" else "right")
    finals = {}
    for strategy in STRATEGIES:
        runs = np.array([[a for _, a in c] for c in curves[strategy]])
        finals[strategy] = float(runs[:, -1].mean())
        trained = "head only" if strategy == "linear probe" else "all"
        if strategy == "LP-FT + LLRD":
            trained = f"head, then all from step {steps // 3 + 1}"
        table.add_row(
            strategy,
            trained,
            f"{finals[strategy]:.1%} ± {runs[:, -1].std():.1%}",
            f"{runs.max(axis=1).mean():.1%}",
        )
    console.print(table)
    if png is not None:
        plot(curves, trainer, Path(png))
        console.print(f"wrote {png}")
    return finals


if __name__ == "__main__":
    main()
