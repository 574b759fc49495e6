"""Fine-tune a pretrained flax NNX network to new classes, three ways, with lrmult.

A small MLP (an input "embedding" layer, two hidden blocks and a head) learns to read the
handwritten digits 0-4 of scikit-learn's `load_digits` (shipped with the package: no download).
It is then fine-tuned, with a new head, to read the digits 5-9 from a few labelled images per
class, three ways, all with AdamW at the same base learning rate for the same number of steps,
and no weight decay on biases (`lrmult.presets.no_decay`):

- all at 1x: every parameter at the base rate;
- frozen backbone: only the new head trains (`lrmult.presets.linear_probe`);
- LLRD + gradual unfreezing: layer-wise learning-rate decay (`lrmult.presets.layerwise_lr_decay`,
  `lr_mult = decay ** (num_layers - layer_id)`), with the head trained alone first and one more
  layer unfrozen, top down, every quarter of the steps, its `lr_mult` ramping up over a fifth of
  a stage (ULMFiT's gradual unfreezing: `lrmult.presets.gradual_unfreezing`, a plan the trainer
  carries out by itself: the training loop is the same for all three).

`lrmult.NNXTrainer` drives the NNX module (split, merge and the jitted step are lrmult's). The
script prints `explain()` before each fine-tuning, a table of held-out accuracy, step time and
optimizer-state size, and writes the loss curves to `finetune_digits.png` next to itself.

Run: pip install -e ".[demo]" && python examples/finetune_digits.py
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sklearn.datasets import load_digits

import lrmult
from lrmult import presets

PNG = Path(__file__).with_suffix(".png")
STRATEGIES = ("all at 1x", "frozen backbone", "LLRD + gradual unfreezing")
DECAY = 0.5
# Gradual unfreezing, top down: the head first, then these one at a time.
UNFREEZE = ("layers/1/", "layers/0/", "embed/")
OPTIMIZER = ("adamw", {"learning_rate": 3e-3, "wd": 1e-2})


class MLP(nnx.Module):
    """An input layer, two hidden blocks (`layers/0`, `layers/1`) and a classification head."""

    def __init__(self, classes: int, *, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Linear(64, 128, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(128, 128, rngs=rngs) for _ in range(2)])
        self.head = nnx.Linear(128, classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.embed(x))
        for layer in self.layers:
            x = nnx.relu(layer(x))
        return self.head(x)


def cross_entropy(model: MLP, x: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit
def _evaluate(model: MLP, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits = model(x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, jnp.mean(jnp.argmax(logits, axis=-1) == y)


def load(shots: int, seed: int):
    """Digits 0-4 (train, held out) for pretraining; digits 5-9 relabelled 0-4 for fine-tuning:
    `shots` labelled images per class to train on, all the others held out."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target
    old, new = np.flatnonzero(y < 5), np.flatnonzero(y >= 5)
    old = np.random.default_rng(0).permutation(old)
    cut = int(0.8 * len(old))
    rng = np.random.default_rng(seed + 1)
    train = np.concatenate(
        [rng.choice(new[y[new] == c], shots, replace=False) for c in range(5, 10)]
    )
    test = np.setdiff1d(new, train)

    def pair(index, offset=0):
        return jnp.asarray(x[index]), jnp.asarray(y[index] - offset)

    return pair(old[:cut]), pair(old[cut:]), pair(train, 5), pair(test, 5)


def pretrain(x: jax.Array, y: jax.Array, steps: int, advance) -> MLP:
    model = MLP(5, rngs=nnx.Rngs(0))
    trainer = lrmult.NNXTrainer(model, None, *OPTIMIZER)
    for _ in range(steps):
        trainer.train_step(cross_entropy, x, y)
        advance()
    return model


def opt_state_bytes(trainer: lrmult.Trainer) -> int:
    """Bytes of the arrays in the optimizer state (frozen parameters hold none)."""
    return sum(x.nbytes for x in jax.tree.leaves(trainer.opt_state) if hasattr(x, "nbytes"))


def configure(strategy: str, params: lrmult.ParamDict, steps: int) -> None:
    presets.no_decay(params)
    if strategy == "frozen backbone":
        presets.linear_probe(params, "head/")
    elif strategy == "LLRD + gradual unfreezing":
        presets.layerwise_lr_decay(params, DECAY)  # embed 0, layers/i i + 1, head 3
        stage = max(1, steps // (len(UNFREEZE) + 1))
        # The head now, then one more layer every `stage` steps, each ramping up its lr_mult.
        presets.gradual_unfreezing(params, ["head/", *UNFREEZE], every=stage, warmup=stage // 5)


def finetune(strategy, pretrained, data, steps, seed, eval_every, advance, console):
    """Train one strategy; returns its losses, held-out curve, final accuracy, time and state."""
    (x, y), (x_test, y_test) = data
    model = nnx.clone(pretrained)
    model.head = nnx.Linear(128, 5, rngs=nnx.Rngs(1000 + seed))  # a new head for the new task
    params = lrmult.ParamDict.from_nnx(model, filter=nnx.Param)
    configure(strategy, params, steps)
    trainer = lrmult.NNXTrainer(model, params, *OPTIMIZER)
    if console is not None:
        console.rule(f"{strategy}: trainer.explain()")
        console.print(str(trainer.explain()), markup=False, highlight=False, soft_wrap=True)
    losses, times, held_out = [], [], []
    for step in range(steps):  # the same loop for every strategy: a plan needs no code here
        start = time.perf_counter()
        loss = float(trainer.train_step(cross_entropy, x, y))  # float(): waits for the step
        times.append(time.perf_counter() - start)
        losses.append(loss)
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            held_out.append((step + 1, float(_evaluate(model, x_test, y_test)[0])))
        advance()
    accuracy = float(_evaluate(model, x_test, y_test)[1])
    warm = times[min(5, len(times) - 1) :]  # after warm-up: the first steps compile
    return {
        "losses": losses,
        "held_out": held_out,
        "accuracy": accuracy,
        "step_ms": 1e3 * float(np.median(warm)),
        "state_bytes": opt_state_bytes(trainer),
        "unfreeze_at": unfreeze_steps(params, steps),
    }


def unfreeze_steps(params: lrmult.ParamDict, steps: int) -> list[int]:
    """The steps at which a gradual-unfreezing plan unfroze a layer after the head's."""
    plan = params["head/kernel"].plan
    return [] if plan is None else [a for a in plan.at[1:] if a < steps]


def plot(runs: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for strategy, color in zip(STRATEGIES, ("tab:blue", "tab:orange", "tab:green"), strict=True):
        train = np.mean([r["losses"] for r in runs[strategy]], axis=0)
        ax.plot(np.arange(1, len(train) + 1), train, color=color, label=f"{strategy}: train")
        steps = [s for s, _ in runs[strategy][0]["held_out"]]
        test = np.mean([[v for _, v in r["held_out"]] for r in runs[strategy]], axis=0)
        ax.plot(steps, test, color=color, linestyle="--", label=f"{strategy}: held out")
    for step in runs["LLRD + gradual unfreezing"][0]["unfreeze_at"]:
        ax.axvline(step, color="tab:green", linestyle=":", linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("fine-tuning step (dotted: gradual unfreezing adds a layer)")
    ax.set_ylabel("cross-entropy")
    ax.set_title("Fine-tuning to digits 5-9 from a network pretrained on 0-4")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(
    steps: int = 200,
    pretrain_steps: int = 300,
    seeds: int = 3,
    shots: int = 10,
    eval_every: int = 10,
    png: Path | None = PNG,
    progress: bool = True,
) -> dict[str, float]:
    """Run the comparison; returns the mean held-out accuracy of each strategy."""
    console = Console()
    if not console.is_terminal:
        console.width = 120  # piped or captured: rich would assume 80 columns and wrap the table
    source, source_test, _, _ = load(shots, 0)
    columns = (
        TextColumn("{task.description:34s}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    runs: dict[str, list[dict]] = {s: [] for s in STRATEGIES}
    with Progress(*columns, console=console, disable=not progress) as bar:
        task = bar.add_task("pretraining on digits 0-4", total=pretrain_steps)
        pretrained = pretrain(*source, pretrain_steps, lambda: bar.advance(task))
        console.print(
            f"pretrained on digits 0-4: {float(_evaluate(pretrained, *source_test)[1]):.1%} "
            f"held-out accuracy"
        )
        task = bar.add_task("fine-tuning", total=seeds * len(STRATEGIES) * steps)
        for seed in range(seeds):
            _, _, train, test = load(shots, seed)
            for strategy in STRATEGIES:
                bar.update(task, description=f"seed {seed}: {strategy}")
                run = finetune(
                    strategy,
                    pretrained,
                    (train, test),
                    steps,
                    seed,
                    eval_every,
                    lambda: bar.advance(task),
                    console if seed == 0 else None,
                )
                runs[strategy].append(run)

    n_test = len(load(shots, 0)[3][1])
    table = Table(
        title=f"Digits 5-9 from {shots} labelled images per class, {n_test} held out "
        f"({seeds} seeds, {steps} steps)"
    )
    for col in ("strategy", "held-out accuracy", "step time (ms)", "optimizer state"):
        table.add_column(col, justify="left" if col == "strategy" else "right", no_wrap=True)
    finals = {}
    for strategy in STRATEGIES:
        acc = np.array([r["accuracy"] for r in runs[strategy]])
        finals[strategy] = float(acc.mean())
        table.add_row(
            strategy,
            f"{acc.mean():.1%} ± {acc.std():.1%}",
            f"{np.median([r['step_ms'] for r in runs[strategy]]):.2f}",
            f"{runs[strategy][0]['state_bytes'] / 1024:.1f} KiB",
        )
    console.print(table)
    console.print(
        "step time: median over steps after warm-up; optimizer state: bytes of "
        "trainer.opt_state arrays at the end (frozen parameters hold none)"
    )
    if png is not None:
        plot(runs, Path(png))
        console.print(f"wrote {png}")
    return finals


if __name__ == "__main__":
    main()
