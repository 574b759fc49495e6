"""lrmult quickstart: train a flax MLP with per-layer multipliers and watch them act.

A three-layer MLP learns y = sin(3x) + x^2. We give the first layer a tenth of the learning
rate, exempt biases from weight decay, freeze the middle layer, print `explain()`, train, and then
print how far each layer actually moved. Halfway through, we unfreeze the middle layer and raise
the first layer's multiplier: no recompilation for the multiplier, one for the new frozen set.

Run: python examples/quickstart.py
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

import lrmult


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Dense(64)(x))
        x = nn.tanh(nn.Dense(64)(x))
        return nn.Dense(1)(x)


def main(steps: int = 400) -> None:
    model = MLP()
    x = jnp.linspace(-2, 2, 256).reshape(-1, 1)
    y = jnp.sin(3 * x) + x**2
    variables = model.init(jax.random.PRNGKey(0), x)

    params = lrmult.ParamDict.from_pytree(variables["params"])
    params.select("Dense_0/").setattr("lr_mult", 0.1)  # a slow first layer
    params.select(".*bias").setattr("wd_mult", 0.0)  # no decay on biases
    params.select("Dense_1/").setattr("frozen", True)  # a frozen middle layer
    print(params, end="\n\n")

    trainer = lrmult.Trainer(params, "adamw", {"learning_rate": 3e-3, "wd": 1e-2})
    print(trainer.explain(), end="\n\n")

    def loss_fn(tree, x, y):
        return jnp.mean((model.apply({"params": tree}, x) - y) ** 2)

    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, _, **kw: (
            compiles.append(kw.get("fun_name"))
            if event == "/jax/core/compile/backend_compile_duration"
            else None
        )
    )

    start = params.arrays()
    half = steps // 2
    for step in range(steps):
        if step == half:
            before = sum("lrmult_train_step" in str(c) for c in compiles)
            params["Dense_1/kernel"].frozen = False
            params["Dense_1/bias"].frozen = False
            params.select("Dense_0/").setattr("lr_mult", 1.0)
            print(f"step {step}: unfroze Dense_1, Dense_0 lr_mult 0.1 -> 1.0")
        loss = trainer.train_step(loss_fn, x, y)
        if step == half:
            new = sum("lrmult_train_step" in str(c) for c in compiles) - before
            print(f"          the step compiled {new} time(s): once for the new frozen set")
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {float(loss):.5f}")
        if step == half - 1:
            mid = params.arrays()

    print("\nHow far each parameter moved, RMS of Δw (first half: Dense_0 at 0.1x, Dense_1 frozen)")
    print(f"{'parameter':18s} {'first half':>12s} {'second half':>12s}")
    end = params.arrays()
    for name in params:

        def rms(a, b):
            return float(jnp.sqrt(jnp.mean((b - a) ** 2)))

        print(f"{name:18s} {rms(start[name], mid[name]):12.5f} {rms(mid[name], end[name]):12.5f}")
    assert np.array_equal(start["Dense_1/kernel"], mid["Dense_1/kernel"]), "frozen layer moved"
    print("\nDense_1 did not move at all while frozen; Dense_0 moved far less at lr_mult 0.1.")


if __name__ == "__main__":
    main()
