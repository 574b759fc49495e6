"""Checkpoint I/O with orbax: named arrays plus a JSON description, one directory per save.

A checkpoint is an orbax `CheckpointManager` directory: each save is a new numbered step written
to a temporary directory and renamed into place when complete, so a save killed part-way leaves
the previous checkpoint loadable (the two latest are kept). Each step holds two items:

- `state`: the arrays, keyed by the caller's names (pytree key paths for optimizer states);
- `meta`: JSON — a `format` tag, the arrays' shapes and dtypes, and whatever the caller adds.

What to save and how to check it belongs to the caller (`ParamDict.save`, `Trainer.save_states`);
this module only reads and writes. orbax is imported on first use, keeping `import lrmult` light.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
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
    meta = {**meta, "format": fmt, "arrays": shapes}
    mgr = _manager(path, create=True)
    step = (mgr.latest_step() or 0) + 1
    mgr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(dict(arrays)), meta=ocp.args.JsonSave(meta)
        ),
    )
    mgr.wait_until_finished()
    mgr.close()


def read(path: str | os.PathLike, fmt: str) -> tuple[dict, Callable[[], dict[str, jax.Array]]]:
    """The latest step's `meta`, and a function loading its arrays (call it once checks pass).

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

    def arrays() -> dict[str, jax.Array]:
        target = {
            k: jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype))
            for k, (shape, dtype) in meta["arrays"].items()
        }
        restored = mgr.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )
        return dict(restored.state)

    return meta, arrays
