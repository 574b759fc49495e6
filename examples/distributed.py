"""Two processes, one model: lrmult on JAX's multi-process runtime (CPU collectives on localhost).

`python examples/distributed.py` launches two worker processes joined by
`jax.distributed.initialize`, each holding 4 of the 8 (simulated CPU) devices. They train one MLP
data-parallel with per-layer multipliers, change a multiplier (`setattr`) and an override
(`set_lr_mult`) at the same step in every process, and write the final parameters. The launcher
then trains the same model in a single process and checks that both end with the same parameters.

Options: `--steps N`, `--timeout SECONDS` (the launcher kills the workers after it).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile

import numpy as np

DEVICES_PER_PROCESS = 4
NUM_PROCESSES = 2


def build_and_train(steps: int, global_batch, shard=None):
    """The training run, the same in every process (and in the single-process reference)."""
    import jax
    import jax.numpy as jnp

    import lrmult

    k = jax.random.split(jax.random.PRNGKey(0), 3)
    init = {
        "hidden": {"kernel": jax.random.normal(k[0], (8, 32)) / 3, "bias": jnp.zeros(32)},
        "out": {"kernel": jax.random.normal(k[1], (32, 1)) / 6, "bias": jnp.zeros(1)},
    }
    x, y = global_batch
    if shard is not None:
        init = jax.tree.map(lambda a: shard(np.asarray(a), replicated=True), init)
        x, y = shard(x), shard(y)
    params = lrmult.ParamDict.from_pytree(init)
    params.select("hidden/").setattr("lr_mult", 0.5)
    params.select(".*bias").setattr("wd_mult", 0.0)
    trainer = lrmult.Trainer(params, "adamw", {"learning_rate": 0.02, "wd": 0.01})

    def loss_fn(p, x, y):
        h = jnp.tanh(x @ p["hidden"]["kernel"] + p["hidden"]["bias"])
        return jnp.mean((h @ p["out"]["kernel"] + p["out"]["bias"] - y) ** 2)

    losses = []
    for step in range(steps):
        if step == steps // 2:  # applied in every process: takes effect at the same step
            params["out/kernel"].lr_mult = 2.0
            trainer.set_lr_mult({"out/bias": 3.0})
        losses.append(trainer.train_step(loss_fn, x, y))
    return params, [float(np.asarray(loss.addressable_data(0))) for loss in losses]


def make_batch():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype(np.float32)
    y = np.sin(x[:, :1] * 2).astype(np.float32)
    return x, y


def worker(process_id: int, coordinator: str, steps: int, out: str) -> None:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, NUM_PROCESSES, process_id)
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()), ("data",))
    assert jax.device_count() == NUM_PROCESSES * DEVICES_PER_PROCESS

    def shard(a, replicated=False):
        if replicated:
            return jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec()), a)
        # each process holds its half of the global batch
        half = a.shape[0] // NUM_PROCESSES
        local = a[process_id * half : (process_id + 1) * half]
        return jax.make_array_from_process_local_data(
            NamedSharding(mesh, PartitionSpec("data")), local, a.shape
        )

    params, losses = build_and_train(steps, make_batch(), shard)
    if process_id == 0:
        arrays = {n: np.asarray(p.data().addressable_data(0)) for n, p in params.items()}
        np.savez(out, losses=np.array(losses), **arrays)
    jax.distributed.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(steps: int, timeout: float) -> bool:
    coordinator = f"127.0.0.1:{free_port()}"
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.npz")
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--worker",
                    str(i),
                    "--coordinator",
                    coordinator,
                    "--steps",
                    str(steps),
                    "--out",
                    out,
                ],
            )
            for i in range(NUM_PROCESSES)
        ]
        try:
            codes = [p.wait(timeout=timeout) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        if any(codes):
            print(f"workers failed with exit codes {codes}")
            return False
        result = dict(np.load(out))

    params, losses = build_and_train(steps, make_batch())
    print(f"{'step':>4s} {'2 processes':>12s} {'1 process':>12s}")
    for i in range(0, steps, max(1, steps // 5)):
        print(f"{i:4d} {result['losses'][i]:12.6f} {losses[i]:12.6f}")
    worst = max(float(np.max(np.abs(result[n] - np.asarray(p.data())))) for n, p in params.items())
    same = worst <= 1e-5
    print(f"largest parameter difference: {worst:.2e} -> {'MATCH' if same else 'MISMATCH'}")
    return same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=180)
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--coordinator", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, args.coordinator, args.steps, args.out)
    else:
        sys.exit(0 if launch(args.steps, args.timeout) else 1)


if __name__ == "__main__":
    main()
