"""Checkpoint I/O with orbax: named arrays plus a JSON description, one directory per save.

A checkpoint is an orbax `CheckpointManager` directory: each save is a new numbered step written
to a temporary directory and renamed into place when complete, so a save killed part-way leaves
the previous checkpoint loadable (the two latest are kept). Each step holds two items:

- `state`: the arrays, keyed by the caller's names (pytree key paths for optimizer states);
- `meta`: JSON — a `format` tag, the arrays' shapes and dtypes, and whatever the caller adds.

Several processes (`jax.distributed`) save and load together: every process calls `write` (or
`read`) with the same global arrays, orbax writes each process's shards and lets process 0 alone
write the JSON and commit the step. An array local to each process (a step count optax's `init`
made outside jit, equal in every process) is saved as a host value, by process 0. Arrays are read
back placed as the caller's arrays are (`read`'s `like`), not as they were when saved, so a
checkpoint written by two processes loads in one process with another device count.

What to save and how to check it belongs to the caller (`ParamDict.save`, `Trainer.save_states`);
this module only reads and writes. orbax is imported on first use, keeping `import lrmult` light.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_KEEP = 2


def _manager(path: str | os.PathLike, *, create: bool) -> Any:
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    if not create and not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=_KEEP, create=create, enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(path, options=options)


def _host_local(x: Any) -> bool:
    """Whether `x` is one process's own array in a run of several processes (not a global one)."""
    return jax.process_count() > 1 and isinstance(x, jax.Array) and x.is_fully_addressable


def _placement(x: Any) -> jax.sharding.Sharding | None:
    """Where an array like `x` is read to: its sharding, or None where jit places it."""
    if not isinstance(x, jax.Array) or _host_local(x):
        return None
    if x.committed or len(x.sharding.device_set) > 1:
        return x.sharding
    return None


def write(path: str | os.PathLike, fmt: str, arrays: Mapping[str, Any], meta: dict) -> None:
    """Save `arrays` and `meta` (JSON) as a new step of the checkpoint directory at `path`.

    Args:
      path: the checkpoint directory (created if needed).
      fmt: a format tag that `read` checks.
      arrays: name -> array.
      meta: JSON-serialisable description; `format` and `arrays` keys are added.
    """
    import orbax.checkpoint as ocp

    shapes = {k: (list(np.shape(v)), str(np.dtype(v.dtype))) for k, v in arrays.items()}
    arrays = {k: np.asarray(v) if _host_local(v) else v for k, v in arrays.items()}
    meta = {**meta, "format": fmt, "arrays": shapes}
    mgr = _manager(path, create=True)
    # Every process lists the same committed steps: each save ends with a barrier (orbax's).
    step = (mgr.latest_step() or 0) + 1
    mgr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(dict(arrays)), meta=ocp.args.JsonSave(meta)
        ),
    )
    mgr.wait_until_finished()
    mgr.close()


def read(
    path: str | os.PathLike, fmt: str
) -> tuple[dict, Callable[[Mapping[str, Any]], dict[str, jax.Array]]]:
    """The latest step's `meta`, and a function loading its arrays (call it once checks pass).

    The function takes `like`, `{name: array}` naming the saved arrays to load: each comes back
    with its `like` array's shape, dtype and sharding (an uncommitted `like` gives an uncommitted
    array), whatever the devices and processes that saved it.

    Raises:
      FileNotFoundError: no checkpoint (or no complete step) at `path`.
      ValueError: the checkpoint is not of format `fmt`.
    """
    import orbax.checkpoint as ocp

    mgr = _manager(path, create=False)
    step = mgr.latest_step()
    if step is None:
        raise FileNotFoundError(f"no complete checkpoint in {os.fspath(path)!r}")
    meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{os.fspath(path)!r} is not a {fmt} checkpoint (format {found!r})")

    def arrays(like: Mapping[str, Any]) -> dict[str, jax.Array]:
        if not like:
            return {}
        item, how = {}, {}
        for k, x in like.items():
            sharding = _placement(x)
            if sharding is None:  # read on the host, then placed by jit like the original
                item[k] = np.empty(x.shape, x.dtype)
                how[k] = ocp.RestoreArgs(restore_type=np.ndarray, dtype=x.dtype)
            else:
                item[k] = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
                how[k] = ocp.ArrayRestoreArgs(
                    sharding=sharding, global_shape=x.shape, dtype=x.dtype
                )
        restored = mgr.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.PyTreeRestore(item, how, partial_restore=True)),
        )
        return {
            k: v if isinstance(v, jax.Array) else jnp.asarray(v, like[k].dtype)
            for k, v in restored.state.items()
        }

    return meta, arrays
