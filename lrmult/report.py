"""`explain`: what each parameter gets and which link of the lookup chain set it, as a table.

One implementation serves the Trainer (`Trainer.explain()`) and the optax level
(`lrmult.explain(opt_state, param_dict)`); at the optax level it also compares the chain's answer
with what the state actually applies, and marks (and warns about) a state left stale.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np
import optax

from lrmult import lookup, schedules
from lrmult.display import Table
from lrmult.lookup import Leaf
from lrmult.resync import bound_param_dict, clock, find
from lrmult.transforms import AnchorState, MultState


class ExplainRow(NamedTuple):
    """One row of `explain()`: what each leaf gets, and which link of the chain set it.

    `decay_to_init`: whether its weight decay pulls toward w₀ (its value when the state was
    built) instead of zero.
    """

    index: int
    name: str
    shape: tuple[int, ...]
    lr_mult: float
    wd_mult: float
    frozen: bool
    decay_to_init: bool
    lr: float
    wd: float
    lr_source: str
    wd_source: str
    frozen_source: str
    decay_to_init_source: str


def rows(
    leaves: list[Leaf],
    param_dict: Mapping[str, Any] | None,
    lr_overrides: Mapping[int | str, float] | None,
    wd_overrides: Mapping[int | str, float] | None,
    base_lr: float,
    base_wd: float = float("nan"),
    held: Mapping[int, tuple[Any, Any]] | None = None,
    step: int = 0,
    anchored: Mapping[str, bool] | None = None,
) -> list[ExplainRow]:
    """Rows in index order, with the effective rates (0 when frozen).

    A schedule shows its value at `step` (the optimizer's step count), and the source names it.

    `lr` is `base_lr * lr_mult`, `wd` is `base_wd * wd_mult` (the weight decay λ·d applied). A
    stacked Parameter (or one with array multipliers) gets one row per layer slice, named as the
    unstacked model names it. `held` maps a leaf index to the `(lr_mult, wd_mult)` a state
    applies, `anchored` a leaf name to whether the state keeps its w₀; where they differ from
    the Parameters' answer the row shows them, with source `state`.
    """
    lrs = lookup.resolve("lr_mult", leaves, param_dict, lr_overrides)
    wds = lookup.resolve("wd_mult", leaves, param_dict, wd_overrides)
    fzs = lookup.resolve("frozen", leaves, param_dict)
    out = []
    for leaf, (m, ms), (d, ds), (fz, fs) in zip(leaves, lrs, wds, fzs, strict=True):
        m, ms = _now(m, ms, step)
        d, ds = _now(d, ds, step)
        param = param_dict.get(leaf.name) if param_dict is not None else None
        shape = tuple(param.shape) if param is not None else leaf.shape
        hm, hd = (held or {}).get(leaf.index, (None, None))
        if not fz and hm is not None and _differs(hm, m):
            m, ms = hm, "state"
        if not fz and hd is not None and _differs(hd, d):
            d, ds = hd, "state"
        a = bool(getattr(param, "decay_to_init", False))
        a_source = (param.origin("decay_to_init") if param is not None else None) or "default"
        ha = (anchored or {}).get(leaf.name)
        if not fz and ha is not None and ha != a:
            a, a_source = ha, "state"
        slices = [()]
        if param is not None:
            slices = param.slices(np.shape(m) or np.shape(d)) or [()]
        layers = None if param is None else param.frozen_layers
        for index in slices:
            mi = float(np.asarray(m)[index]) if np.ndim(m) else m
            di = float(np.asarray(d)[index]) if np.ndim(d) else d
            fi = bool(layers[index]) if layers is not None and index else fz
            name = param.layer_name(index) if index else leaf.name
            lr = 0.0 if fi else base_lr * mi
            wd = 0.0 if fi else base_wd * di
            row_shape = shape[len(index) :]
            sources = (lookup.at(ms, index), lookup.at(ds, index), lookup.at(fs, index))
            out.append(
                ExplainRow(leaf.index, name, row_shape, mi, di, fi, a, lr, wd, *sources, a_source)
            )
    return sorted(out, key=lambda r: r.index)


def _now(value: Any, source: Any, step: int) -> tuple[Any, Any]:
    """A multiplier's value at `step`, its source naming the schedule that gives it."""
    if not schedules.is_schedule(value):
        return value, source
    if isinstance(source, np.ndarray):
        named = np.empty(source.shape, object)
        named[...] = [f"{s} {value!r}" for s in source.reshape(-1)]
        return schedules.value_at(value, step), named.reshape(source.shape)
    return schedules.value_at(value, step), f"{source} {value!r}"


def _differs(held: Any, resolved: Any) -> bool:
    """Whether a held multiplier differs from the chain's (nan: a layer no group holds)."""
    held = np.asarray(held, np.float64)
    resolved = np.broadcast_to(np.asarray(resolved, np.float64), held.shape)
    known = ~np.isnan(held)
    return bool(np.any(held[known].astype(np.float32) != resolved[known].astype(np.float32)))


def table(row_list: list[ExplainRow], who: str, base_lr: float, base_wd: float) -> Table:
    """The rows as a `Table` titled with `who` and the base rates."""
    return Table(
        row_list, title=f"{who} (base learning rate {base_lr:.6g}, weight decay {base_wd:.6g})"
    )


def _state_lr(opt_state: Any, node: MultState) -> float:
    """The base learning rate now.

    Injected (`inject_hyperparams`), else the chain's own (a schedule is read at the state's step
    count), else nan.
    """
    hyper = getattr(opt_state, "hyperparams", None) or {}
    if hyper.get("learning_rate") is not None:
        return float(hyper["learning_rate"])
    lr = node.spec.rate
    if lr is None:
        return float("nan")
    if not callable(lr):
        return float(lr)
    counts = find(opt_state, optax.ScaleByScheduleState)
    return float(lr(counts[0][1].count)) if counts else float("nan")


def explain(
    opt_state: Any,
    param_dict: Mapping[str, Any] | None = None,
    learning_rate: float | None = None,
) -> Table:
    """What each leaf gets from an lrmult optimizer state, and which link of the chain set it.

    Args:
      opt_state: a state holding lrmult's multipliers (from `scale_by_lr_mult` or a ready chain).
      param_dict: the ParamDict to read; defaults to the one the state is bound to. Without
        either, the rows show what the state applies and the override dicts it was built with.
      learning_rate: the base rate for the `lr` column; when not given, read from an
        `inject_hyperparams` state or from the ready chain (its rate, or its schedule at the
        state's step count), else shown as nan.

    Returns:
      A `Table` of `ExplainRow`s, printable as text and shown as HTML in notebooks.
    """
    by_attr = {node.spec.attr: node for _, node in reversed(find(opt_state, MultState))}
    if "lr_mult" not in by_attr:
        raise ValueError("explain: opt_state holds no scale_by_lr_mult state")
    lr_node = by_attr["lr_mult"]
    wd_node = by_attr.get("wd_mult")
    base = _state_lr(opt_state, lr_node) if learning_rate is None else float(learning_rate)
    if param_dict is None:
        param_dict = bound_param_dict(opt_state)
    base_wd = 0.0
    if wd_node is not None:
        rate = wd_node.spec.rate
        base_wd = float(rate) if rate is not None and not callable(rate) else float("nan")
    leaves = lr_node.spec.leaves_for(param_dict)
    step = clock(opt_state)
    n = max((leaf.index for leaf in leaves), default=-1) + 1
    held = dict(
        enumerate(
            zip(
                _applied(lr_node, param_dict, n, step),
                _applied(wd_node, param_dict, n, step),
                strict=True,
            )
        )
    )
    named = list({leaf.name: leaf for leaf in reversed(leaves)}.values())[::-1]  # groups: once
    row_list = rows(
        named,
        param_dict,
        dict(lr_node.spec.overrides),
        _overrides(wd_node),
        base,
        base_wd,
        held,
        step,
        _anchored(opt_state),
    )
    sources = ("lr_source", "wd_source", "decay_to_init_source")
    stale = [r.name for r in row_list if "state" in (getattr(r, s) for s in sources)]
    if stale and param_dict is not None:
        warnings.warn(
            f"explain: the state applies other multipliers (or decay_to_init) than param_dict now "
            f"says (first: {stale[0]!r}); call lrmult.refresh(opt_state, param_dict) before the "
            f"next update",
            stacklevel=2,
        )
    return table(row_list, "lrmult.explain", base, base_wd)


def _anchored(opt_state: Any) -> dict[str, bool]:
    """`{leaf name: whether the state keeps its w₀}` (leaves the state holds: not frozen)."""
    found = find(opt_state, AnchorState)
    if not found:
        return {}
    spec = found[0][1].spec
    out: dict[str, bool] = {}
    for leaf, present, a in zip(spec.leaves, spec.present, spec.anchored, strict=True):
        if present:
            out[leaf.name] = out.get(leaf.name, False) or a
    return out


def _overrides(node: MultState | None) -> dict | None:
    return dict(node.spec.overrides) if node is not None else None


def _applied(node: MultState | None, param_dict: Any, n: int, step: int = 0) -> list[Any]:
    """The multipliers a state holds, in the rows' index order (None where frozen or absent).

    A leaf held in groups of layers gives one array over its layers, nan where no group holds it.
    """
    if node is None:
        return [None] * n
    values: dict[int, Any] = dict.fromkeys(range(n))
    leaves = node.spec.leaves_for(param_dict)
    live = node.live()
    for leaf, slot, held in zip(leaves, live.spec.slots, live.held(step), strict=True):
        if slot is None:
            continue
        if slot.rows is not None:
            row_values = values[leaf.index]
            if row_values is None:
                row_values = values[leaf.index] = np.full(slot.total, np.nan)
            row_values[list(slot.rows)] = np.reshape(held, -1)
        else:
            values[leaf.index] = float(held) if np.ndim(held) == 0 else held
    return [values[i] for i in sorted(values)]
