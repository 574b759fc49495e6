"""Sharded parameters on a simulated 8-device CPU mesh (run in a subprocess: the device count
is fixed when JAX starts)."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import re
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import NamedSharding, PartitionSpec as P
    import lrmult

    assert jax.device_count() == 8
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    init = {
        "col": jax.random.normal(k[0], (16, 32)) / 4,   # tensor-parallel columns
        "fsdp": jax.random.normal(k[1], (32, 8)) / 6,   # FSDP-style sharded rows
        "bias": jnp.zeros(8),                           # replicated
    }
    specs = {"col": P(None, "model"), "fsdp": P("data", None), "bias": P()}
    x = jax.random.normal(k[2], (32, 16))
    y = jnp.sin(x[:, :8])

    def loss_fn(p, x, y):
        h = jnp.tanh(x @ p["col"])
        return jnp.mean((h @ p["fsdp"] + p["bias"] - y) ** 2)

    compiles = []
    seen = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda ev, secs, **kw: seen.append(ev) if ev.endswith("backend_compile_duration") else None
    )

    def train(tree, x, y, steps=5):
        pd = lrmult.ParamDict.from_pytree(tree)
        pd["col"].lr_mult = 0.5
        pd["bias"].wd_mult = 0.0
        trainer = lrmult.Trainer(pd, "adamw", {"learning_rate": 0.01, "wd": 0.1})
        trainer.set_lr_mult({"fsdp": 2.0})
        compiles.clear()
        for i in range(steps):
            before = len(seen)
            trainer.train_step(loss_fn, x, y)
            compiles.append(len(seen) - before)
            if i == 2:
                pd["bias"].lr_mult = 3.0
        return pd, trainer

    single, _ = train(init, x, y)
    shardings = {n: NamedSharding(mesh, s) for n, s in specs.items()}
    sharded_init = {n: jax.device_put(v, shardings[n]) for n, v in init.items()}
    xs = jax.device_put(x, NamedSharding(mesh, P("data", None)))
    ys = jax.device_put(y, NamedSharding(mesh, P("data", None)))
    pd, trainer = train(sharded_init, xs, ys)
    # Compiles only in the first step: init's step counts are placed on the mesh as the step
    # returns them (uncommitted, the second step's inputs differed in placement: a new compile).
    assert compiles[1:] == [0, 0, 0, 0], compiles

    for name in init:
        np.testing.assert_allclose(pd[name].data(), single[name].data(), rtol=2e-5, atol=1e-6)
        assert pd[name].data().sharding.is_equivalent_to(shardings[name], 2), name
    for path, leaf in jax.tree_util.tree_flatten_with_path(trainer.opt_state)[0]:
        key = jax.tree_util.keystr(path)
        for name in init:
            if f"['{name}']" in key and leaf.shape == init[name].shape:
                assert leaf.sharding.is_equivalent_to(shardings[name], leaf.ndim), key

    def collectives(hlo):
        names = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
        return {n: len(re.findall(n + r"(-start)?\\(", hlo)) for n in names}

    from lrmult.trainer import _split_state

    step = trainer._train_fn(loss_fn, False)
    trainable, frozen = trainer._gather()
    outer, rest, mults = _split_state(trainer.opt_state)
    lowered = step.lower(trainable, frozen, rest, mults, (xs, ys), outer=outer)
    ours = lowered.compile().as_text()

    tx = optax.adamw(0.01, weight_decay=0.1)
    def plain(p, s, x, y):
        loss, g = jax.value_and_grad(loss_fn)(p, x, y)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss
    params = {n: jnp.copy(v) for n, v in sharded_init.items()}
    theirs = jax.jit(plain).lower(params, tx.init(params), xs, ys).compile().as_text()
    print("collectives", collectives(ours), collectives(theirs))
    assert collectives(ours) == collectives(theirs)
    assert sum(collectives(ours).values()) > 0   # the comparison is not vacuous
    # The same when a frozen parameter joins training with fresh state: one compile, not two.
    pd["bias"].frozen = True
    trainer.train_step(loss_fn, xs, ys)
    pd["bias"].frozen = False
    counts = []
    for _ in range(3):
        before = len(seen)
        trainer.train_step(loss_fn, xs, ys)
        counts.append(len(seen) - before)
    assert counts[1:] == [0, 0], counts
    print("OK")
    """
)


def test_sharded_training_matches_one_device_and_adds_no_collective():
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    env.pop("XLA_FLAGS", None)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert "OK" in out.stdout
