"""Checkpoints written by two processes (jax.distributed, CPU collectives on localhost).

Two processes with 4 CPU devices each train on global arrays (one kernel split across both
processes), save (`trainer.save_states`, `params.save`) before training and at step 5, restore
the latest into a fresh ParamDict and Trainer, continue to step 10 and save again. One process
with 8 devices trains 10 steps straight meanwhile, then loads the two-process step-10 checkpoint
and restores the step-5 one to continue to step 10 itself: all three agree to float32 rounding.
"""

import os
import socket
import subprocess
import sys
import textwrap
import time

SCRIPT = textwrap.dedent(
    """
    import os, sys
    role, out = sys.argv[1], sys.argv[2]
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=" + (
        "8" if role == "single" else "4")
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    if role != "single":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(sys.argv[3], 2, int(role))
    import lrmult

    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    SPECS = {"hidden/kernel": P("data", "model"), "hidden/bias": P("model"),
             "out/kernel": P("model", None), "out/bias": P(), "emb": P()}

    def put(a, spec):
        # every process holds the whole host value; each takes its own shards
        a = np.asarray(a)
        return jax.make_array_from_callback(a.shape, NamedSharding(mesh, spec), lambda i: a[i])

    def build(lr_mult=0.5):
        rng = np.random.default_rng(0)
        init = {"hidden": {"kernel": rng.normal(size=(8, 16)) / 3, "bias": np.zeros(16)},
                "out": {"kernel": rng.normal(size=(16, 1)) / 4, "bias": np.zeros(1)},
                "emb": rng.normal(size=(4, 8))}
        tree = jax.tree_util.tree_map_with_path(
            lambda p, a: put(a.astype(np.float32),
                             SPECS["/".join(k.key for k in p)]), init)
        pd = lrmult.ParamDict.from_pytree(tree)
        pd.select("hidden/").setattr("lr_mult", lr_mult)
        pd.select(".*bias").setattr("wd_mult", 0.0)
        pd["emb"].frozen = True
        trainer = lrmult.Trainer(pd, "adamw", {"learning_rate": 0.02, "wd": 0.01})
        trainer.set_lr_mult({"out/bias": 3.0})
        return pd, trainer

    def loss_fn(p, x, y):
        h = jnp.tanh((x @ p["emb"]) @ p["hidden"]["kernel"] + p["hidden"]["bias"])
        return jnp.mean((h @ p["out"]["kernel"] + p["out"]["bias"] - y) ** 2)

    rng = np.random.default_rng(1)
    x = rng.normal(size=(16, 4)).astype(np.float32)
    x, y = put(x, P("data")), put(np.sin(x[:, :1]), P("data"))

    def train(pd, trainer, steps):
        for _ in range(steps):
            if int(trainer.opt_state.count.addressable_data(0)) == 7:
                pd["out/kernel"].lr_mult = 2.0   # a change after the restore, in every process
            trainer.train_step(loss_fn, x, y)

    def values(pd):
        return {n: np.asarray(p.data()) for n, p in pd.items()}

    def resume(ck):
        pd, trainer = build(lr_mult=5.0)   # the checkpoint's multipliers win
        pd.load(ck + "/params")
        trainer.load_states(ck + "/trainer")
        assert pd["hidden/kernel"].lr_mult == 0.5 and pd["emb"].frozen
        for n, p in pd.items():   # placed as this process's arrays, not as they were saved
            sharding = NamedSharding(mesh, SPECS[n])
            assert p.data().sharding.is_equivalent_to(sharding, len(p.shape)), n
        return pd, trainer

    def save(pd, trainer, ck):
        pd.save(ck + "/params")
        trainer.save_states(ck + "/trainer")

    if role != "single":
        pd, trainer = build()
        save(pd, trainer, out + "/ck5")   # holds step counts local to each process (optax's init)
        train(pd, trainer, 5)
        save(pd, trainer, out + "/ck5")   # the directory's second step, the one loaded
        pd, trainer = resume(out + "/ck5")
        train(pd, trainer, 5)
        save(pd, trainer, out + "/ck10")
        jax.distributed.shutdown()
    else:
        pd, trainer = build()
        train(pd, trainer, 10)
        ref = values(pd)
        sys.stdin.readline()   # the two processes have finished
        pd10, trainer10 = resume(out + "/ck10")   # written by two processes
        pd5, trainer5 = resume(out + "/ck5")
        train(pd5, trainer5, 5)
        for name in ref:
            for got in (values(pd10), values(pd5)):
                np.testing.assert_allclose(got[name], ref[name], rtol=1e-5, atol=1e-6,
                                           err_msg=name)
        assert int(trainer10.opt_state.count) == 10
        start = np.asarray(build()[0]["hidden/kernel"].data())
        assert not np.allclose(ref["hidden/kernel"], start)   # a real comparison
        print("OK")
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _output(proc: subprocess.Popen, deadline: float, stdin: str | None = None) -> str:
    """`proc`'s output once it exits; killed at `deadline` (a hung barrier never hangs CI)."""
    try:
        return proc.communicate(stdin, timeout=max(1.0, deadline - time.monotonic()))[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()[0] + "\n[killed: timed out]"


def test_two_process_checkpoint_resumes_in_two_processes_and_in_one(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    env.pop("XLA_FLAGS", None)
    # A resumed Trainer compiles its step again: let it find the first one's.
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "jax_cache")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    coordinator = f"127.0.0.1:{_free_port()}"

    def launch(*args):
        return subprocess.Popen(
            [sys.executable, "-c", SCRIPT, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )

    deadline = time.monotonic() + 240
    # The single process trains its reference meanwhile, then waits for a line on stdin.
    procs = [launch(str(i), str(tmp_path), coordinator) for i in range(2)]
    procs.append(launch("single", str(tmp_path)))
    try:
        logs = [_output(p, deadline) for p in procs[:2]]
        assert [p.returncode for p in procs[:2]] == [0, 0], "\n".join(s[-3000:] for s in logs)
        log = _output(procs[2], deadline, "go\n")
        assert procs[2].returncode == 0 and "OK" in log, log[-4000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
