"""Checkpoints with orbax: a Trainer's state (`save_states`) and a ParamDict's values (`save`).

A checkpoint is an orbax `CheckpointManager` directory: each save is a new numbered step written
to a temporary directory and renamed into place when complete, so a save killed part-way leaves
the previous checkpoint loadable. Each step holds two items:

- `state`: the arrays, keyed by their pytree key path (`keystr`), so a state whose frozen set
  differs from the saved one can take what matches and start fresh where nothing does;
- `meta`: JSON — parameter names, shapes, dtypes, the raw (possibly unset) metadata of every
  Parameter, the override dicts and the optimizer's description.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

_TRAINER_FORMAT = "lrmult-trainer-1"
_PARAMS_FORMAT = "lrmult-params-1"
_KEEP = 2


def _manager(path: str | os.PathLike, *, create: bool) -> ocp.CheckpointManager:
    path = os.path.abspath(os.fspath(path))
    if not create and not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=_KEEP, create=create, enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(path, options=options)


def _save(path: str | os.PathLike, arrays: Mapping[str, Any], meta: dict) -> None:
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


def _load_meta(path: str | os.PathLike, fmt: str) -> tuple[ocp.CheckpointManager, int, dict]:
    mgr = _manager(path, create=False)
    step = mgr.latest_step()
    if step is None:
        raise FileNotFoundError(f"no complete checkpoint in {os.fspath(path)!r}")
    meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{os.fspath(path)!r} is not a {fmt} checkpoint (format {found!r})")
    return mgr, step, meta


def _load_arrays(mgr: ocp.CheckpointManager, step: int, meta: dict) -> dict[str, jax.Array]:
    target = {
        k: jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype))
        for k, (shape, dtype) in meta["arrays"].items()
    }
    restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    return dict(restored.state)


def _array_meta(arrays: Mapping[str, Any]) -> dict[str, tuple[list[int], str]]:
    return {k: (list(np.shape(v)), str(np.dtype(v.dtype))) for k, v in arrays.items()}


def _param_meta(params) -> list[dict]:
    return [
        {"name": n, "shape": list(p.shape), "dtype": str(p.dtype), **p._metadata()}
        for n, p in params.items()
    ]


def _check_params(params, saved: list[dict], path: Any) -> None:
    """Names, shapes and dtypes must match exactly; the first mismatch is named."""
    names = list(params)
    saved_names = [d["name"] for d in saved]
    for i, (mine, theirs) in enumerate(zip(names, saved_names, strict=False)):
        if mine != theirs:
            raise ValueError(
                f"checkpoint {os.fspath(path)!r} does not match: parameter {i} is {mine!r} here "
                f"and {theirs!r} in the checkpoint"
            )
    if len(names) != len(saved_names):
        extra = (names[len(saved_names) :] or saved_names[len(names) :])[0]
        where = "here only" if len(names) > len(saved_names) else "in the checkpoint only"
        raise ValueError(
            f"checkpoint {os.fspath(path)!r} does not match: parameter {extra!r} is {where}"
        )
    for d in saved:
        p = params[d["name"]]
        if list(p.shape) != list(d["shape"]):
            raise ValueError(
                f"checkpoint {os.fspath(path)!r} does not match: {d['name']!r} has shape "
                f"{p.shape} here and {tuple(d['shape'])} in the checkpoint"
            )
        if str(p.dtype) != d["dtype"]:
            raise ValueError(
                f"checkpoint {os.fspath(path)!r} does not match: {d['name']!r} has dtype "
                f"{p.dtype} here and {d['dtype']} in the checkpoint"
            )


def _flat_state(opt_state: Any) -> dict[str, Any]:
    return {
        jax.tree_util.keystr(path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]
    }


def _encode_overrides(overrides: Mapping) -> list[list]:
    return [[k, v] for k, v in overrides.items()]


def _decode_overrides(pairs: list[list]) -> dict:
    return {k: float(v) for k, v in pairs}


# -- ParamDict -------------------------------------------------------------------------------------


def save_params(params, path: str | os.PathLike) -> None:
    """Save a ParamDict's values (and, for reference, its metadata) as a new checkpoint step."""
    arrays = {n: p._value for n, p in params.items()}
    meta = {"format": _PARAMS_FORMAT, "params": _param_meta(params), "arrays": _array_meta(arrays)}
    _save(path, arrays, meta)


def load_params(params, path: str | os.PathLike) -> None:
    """Load the latest values saved by `save_params`; names, shapes, dtypes must match."""
    mgr, step, meta = _load_meta(path, _PARAMS_FORMAT)
    _check_params(params, meta["params"], path)
    arrays = _load_arrays(mgr, step, meta)
    for name, p in params.items():
        p.set_data(arrays[name])


# -- Trainer ---------------------------------------------------------------------------------------


def save_trainer(trainer, path: str | os.PathLike) -> None:
    arrays = _flat_state(trainer.opt_state)
    meta = {
        "format": _TRAINER_FORMAT,
        "optimizer": trainer._description,
        "params": _param_meta(trainer.params),
        "lr_overrides": _encode_overrides(trainer._lr_overrides),
        "wd_overrides": _encode_overrides(trainer._wd_overrides),
        "arrays": _array_meta(arrays),
    }
    _save(path, arrays, meta)


def load_trainer(trainer, path: str | os.PathLike) -> None:
    """Restore a Trainer saved by `save_trainer`; on any error nothing has changed."""
    mgr, step, meta = _load_meta(path, _TRAINER_FORMAT)
    _check_params(trainer.params, meta["params"], path)
    if meta["optimizer"] != trainer._description:
        raise ValueError(
            f"checkpoint {os.fspath(path)!r} was saved by a Trainer with optimizer "
            f"{meta['optimizer']}; this one has {trainer._description}"
        )
    arrays = _load_arrays(mgr, step, meta)
    before = {n: p._metadata() for n, p in trainer.params.items()}
    overrides_before = (dict(trainer._lr_overrides), dict(trainer._wd_overrides))
    try:
        for d in meta["params"]:
            trainer.params[d["name"]]._restore_metadata(d)
        trainer._lr_overrides.clear()
        trainer._lr_overrides.update(_decode_overrides(meta["lr_overrides"]))
        trainer._wd_overrides.clear()
        trainer._wd_overrides.update(_decode_overrides(meta["wd_overrides"]))
        trainer._restore_state(arrays)
    except BaseException:
        for n, raw in before.items():
            trainer.params[n]._restore_metadata(raw)
        trainer._lr_overrides.clear()
        trainer._lr_overrides.update(overrides_before[0])
        trainer._wd_overrides.clear()
        trainer._wd_overrides.update(overrides_before[1])
        raise
