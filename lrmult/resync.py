"""Between steps: bring an lrmult optimizer state up to date with a ParamDict.

`refresh` rewrites the per-leaf multipliers a state holds (same structure, so a jitted update does
not recompile) and, when the frozen set changed, gives the state its new structure: the state of
every leaf that stays trainable is carried over, newly trainable leaves get fresh state in a
cohort of their own (their own step count), newly frozen leaves drop theirs. Likewise when the
set of parameters decayed toward w₀ (`decay_to_init`) changed: anchors that stay are kept, newly
anchored parameters take their value now as w₀, others drop theirs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lrmult import flax_trees, lookup
from lrmult._names import path_name
from lrmult.lookup import Rows, is_masked, is_position
from lrmult.transforms import (
    AnchorState,
    ClockState,
    CohortState,
    MultState,
    TrainableState,
    check_param_dict,
    layer_labels,
    members,
    value_now,
)


def _is_node(x: Any) -> bool:
    return isinstance(x, (TrainableState, MultState, CohortState, AnchorState))


def find(opt_state: Any, kind: type) -> list[tuple[Any, Any]]:
    """`(key path, node)` of every `kind` node (`MultState`, ...) in a state, outermost first."""
    flat = jax.tree_util.tree_flatten_with_path(opt_state, is_leaf=lambda x: isinstance(x, kind))
    return [(path, x) for path, x in flat[0] if isinstance(x, kind)]


def clock(opt_state: Any) -> int:
    """The step count at which an lrmult state evaluates schedules (0 without one)."""
    found = find(opt_state, ClockState)
    return int(np.asarray(found[0][1].count.addressable_data(0))) if found else 0


def host_value(x: jax.Array) -> Any:
    """An array's value on the host, also when it spans processes (read the local copy)."""
    value = np.asarray(x.addressable_data(0))
    return float(value) if value.ndim == 0 else value


def _alike(y: Any, x: Any) -> bool:
    return y is not None and np.shape(y) == np.shape(x) and jnp.result_type(y) == jnp.result_type(x)


def carry_over(
    source: Mapping[str, Any], new: Any, groups: Mapping[str, Rows] | None = None
) -> Any:
    """`new`, with each array taken from `source` (keyed by `keystr` path) where one is alike.

    Args:
      source: `{keystr(path): array}` of the old state (`by_path`).
      new: the state to fill.
      groups: `{keystr(path): Rows}` of the old state's groups of layers: a group of `new` that
        keeps some of an old group's rows takes those rows of it.
    """

    def pick(path, x):
        key = jax.tree_util.keystr(path)
        if isinstance(x, Rows):
            old = (groups or {}).get(key)
            if old is not None and set(x.rows) <= set(old.rows):
                kept = old.value[np.array([old.rows.index(r) for r in x.rows])]
                if _alike(kept, x.value):
                    return Rows(kept, x.rows, x.total)
            y = source.get(key + ".value")
            return Rows(y, x.rows, x.total) if _alike(y, x.value) else x
        y = source.get(key)
        return y if not is_masked(x) and _alike(y, x) else x

    return jax.tree_util.tree_map_with_path(pick, new, is_leaf=is_position)


def groups_by_path(tree: Any) -> dict[str, Rows]:
    """`{keystr(path): Rows}` of a state's groups of layers."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, Rows))[0]
    return {jax.tree_util.keystr(p): x for p, x in flat if isinstance(x, Rows)}


def by_path(tree: Any) -> dict[str, Any]:
    """`{keystr(path): array}` of a state's arrays."""
    return {
        jax.tree_util.keystr(path): x for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _next_cohorts(before: Mapping[str, int], new: CohortState) -> tuple[int, ...]:
    """Cohort labels for a new frozen set, by each position's key path.

    Positions (leaves, groups of layers) that stay trainable keep their cohort (`before`: key
    path -> label); positions that become trainable form one new cohort.
    """
    new_label = max(before.values(), default=-1) + 1
    out = []
    for path, c in zip(new.spec.paths, new.spec.cohorts, strict=True):
        kept = before.get(path, -1)
        out.append(-1 if c < 0 else (kept if kept >= 0 else new_label))
    return tuple(out)


def _cohorts(tree: Any) -> dict[str, dict[str, int]]:
    """`{keystr(node path): {position path: cohort label}}` of a state's per-leaf nodes."""
    return {
        jax.tree_util.keystr(path): dict(zip(node.spec.paths, node.spec.cohorts, strict=True))
        for path, node in find(tree, CohortState)
    }


def _regroup(fresh: Any, old: Mapping[str, Mapping[str, int]], params: Any) -> Any:
    """`fresh` (every trainable leaf in cohort 0) with the cohorts `old` (`_cohorts`) implies."""

    def visit(path, node):
        if not isinstance(node, CohortState):
            return node
        before = old.get(jax.tree_util.keystr(path))
        if before is None:
            return node
        cohorts = _next_cohorts(before, node)
        spec = replace(node.spec, cohorts=cohorts)
        labels = sorted({c for c in cohorts if c >= 0})
        return CohortState({c: spec.init(members(params, cohorts, c)) for c in labels}, spec)

    return jax.tree_util.tree_map_with_path(
        visit, fresh, is_leaf=lambda x: isinstance(x, CohortState)
    )


def _history(node: TrainableState) -> dict[str, Any]:
    """What a `TrainableState`'s structure owes to past frozen sets, as JSON data.

    Each leaf's layer groups (by leaf name) and each per-leaf node's cohorts: the labels that
    key the state's arrays, and that no frozen set alone determines.
    """
    labels = node.spec.labels or (None,) * len(node.spec.leaves)
    return {
        "labels": {
            leaf.name: None if lab is None else list(lab)
            for leaf, lab in zip(node.spec.leaves, labels, strict=True)
        },
        "cohorts": _cohorts(node.inner),
    }


def structure(opt_state: Any) -> dict[str, Any]:
    """`{keystr(path): _history}` of every `TrainableState` in a state, for a checkpoint.

    A state rebuilt with it (`refresh_state(..., saved=...)`) has the saved state's structure,
    so every saved array finds its place: a leaf unfrozen during training keeps its own step
    count across a save and load.
    """
    out = {}

    def walk(tree: Any, prefix: tuple) -> None:
        for path, node in find(tree, TrainableState):
            path = (*prefix, *path)
            out[jax.tree_util.keystr(path)] = _history(node)
            walk(node.inner, (*path, jax.tree_util.GetAttrKey("inner")))

    walk(opt_state, ())
    return out


def _joining(was: Any, now: Any) -> bool:
    """Whether a leaf (or some of its layers) goes from frozen to trainable."""
    was = np.broadcast_to(np.asarray(was), np.shape(now)) if isinstance(now, tuple) else was
    now_arr, was_arr = np.asarray(now), np.asarray(was)
    if now_arr.ndim == 0 and was_arr.ndim:
        now_arr = np.broadcast_to(now_arr, was_arr.shape)
    return bool(np.any(was_arr & ~now_arr))


def _start_own_clocks(state: Any, leaves: Any, was: Any, now: Any, param_dict: Any) -> None:
    """Start the own-clock schedules (`clock="own"`) of the parameters joining training now.

    Their `start` becomes the state's step count, so they count from their own first step.
    """
    joining = [
        leaf.name
        for leaf, w, n in zip(leaves, was, now, strict=True)
        if param_dict is not None and leaf.name in param_dict and _joining(w, n)
    ]
    owned = [
        (param_dict[name], attr)
        for name in joining
        for attr in ("lr_mult", "wd_mult")
        if getattr(getattr(param_dict[name], attr), "clock", None) == "own"
    ]
    if not owned:
        return
    step = clock(state.inner)
    for param, attr in owned:
        setting = param.setting(attr)
        param.put(attr, setting._replace(value=setting.value.started(step)))


def _restructure(
    state: TrainableState,
    param_dict: Any,
    saved: Mapping[str, Any] | None = None,
    given: Mapping[str, Any] | None = None,
) -> TrainableState:
    """`state` for `param_dict`'s frozen set; with `saved` (`_history`), rebuilt as recorded.

    A rebuilt state holds fresh values: the caller fills it from the checkpoint. `given`:
    `{leaf path: array}`, the values being trained (newly anchored leaves take them as w₀).
    """
    spec = state.spec
    lookup.check_leaves_named(list(spec.leaves), param_dict, "refresh")
    frozen = lookup.frozen_mask(list(spec.leaves), param_dict)
    if saved is None:
        if frozen == spec.frozen:
            return state
        _start_own_clocks(state, spec.leaves, spec.frozen, frozen, param_dict)
        before = list(spec.labels or [None] * len(frozen))
        cohorts = _cohorts(state.inner)
    else:
        recorded = saved["labels"]
        before = [
            None if recorded.get(leaf.name) is None else tuple(recorded[leaf.name])
            for leaf in spec.leaves
        ]
        cohorts = saved["cohorts"]
    new_label = 1 + max((max(lab) for lab in before if lab), default=0)
    labels = tuple(layer_labels(fz, lab, new_label) for fz, lab in zip(frozen, before, strict=True))
    values = []
    for leaf, dtype, fz in zip(spec.leaves, spec.dtypes, frozen, strict=True):
        if fz is True:
            values.append(optax.MaskedNode())
        elif given is not None or (param_dict is not None and leaf.name in param_dict):
            # Fresh state is built on these: newly trainable, anchored leaves take them as w₀.
            values.append(value_now(leaf, param_dict, given))
        else:
            values.append(jnp.zeros(leaf.shape, dtype))
    new_spec = replace(spec, frozen=frozen, labels=labels)
    params = new_spec.grouped(spec.treedef.unflatten(values))  # MaskedNode where frozen
    fresh = _regroup(spec.init(params), cohorts, params)
    if saved is not None:
        return TrainableState(fresh, new_spec)
    carried = carry_over(by_path(state.inner), fresh, groups_by_path(state.inner))
    return TrainableState(carried, new_spec)


def refresh_state(
    opt_state: Any,
    param_dict: Any,
    overrides: Mapping[str, Mapping] | None = None,
    saved: Mapping[str, Any] | None = None,
    values: Mapping[str, Any] | None = None,
) -> Any:
    """The engine of `refresh`, with the Trainer's own override dicts and warning record.

    Args:
      opt_state: an optimizer state holding lrmult's nodes.
      param_dict: the ParamDict to read.
      overrides: `{"lr_mult": {...}, "wd_mult": {...}}` replacing the transformations' own.
      saved: a checkpoint's `structure`: the state is rebuilt with the saved state's layer
        groups and cohorts, with fresh values for the caller to fill from the checkpoint.
      values: `{leaf path: array}`: the values being trained, for newly anchored (and newly
        trainable) leaves; None: the Parameters' values.

    An override that a Parameter's setting shadows since is warned about once per setting.
    """

    def visit(path, node):
        if isinstance(node, TrainableState):
            record = None if saved is None else saved.get(jax.tree_util.keystr(path))
            node = _restructure(node, param_dict, record, values)
            inner = (*path, jax.tree_util.GetAttrKey("inner"))
            return TrainableState(
                jax.tree_util.tree_map_with_path(
                    lambda p, x: visit((*inner, *p), x), node.inner, is_leaf=_is_node
                ),
                node.spec,
            )
        if isinstance(node, MultState):
            ovr = None if overrides is None else overrides.get(node.spec.attr, {})
            return node.refreshed(param_dict, ovr)
        if isinstance(node, AnchorState):
            return node.refreshed(param_dict, values)
        return node

    return jax.tree_util.tree_map_with_path(visit, opt_state, is_leaf=_is_node)


def bound_param_dict(opt_state: Any) -> Mapping[str, Any] | None:
    """The ParamDict the state's nodes are bound to (the first one found), or None."""
    for kind in (TrainableState, MultState, AnchorState):
        for _, node in find(opt_state, kind):
            if node.spec.binding is not None and node.spec.binding.param_dict is not None:
                return node.spec.binding.param_dict
    return None


def refresh(
    opt_state: Any, param_dict: Mapping[str, Any] | None = None, *, params: Any = None
) -> Any:
    """The same optimizer state with `param_dict`'s current multipliers, frozen and anchored sets.

    Call it between steps after `setattr`: the new state has the same structure (so a jitted
    update does not recompile) unless the frozen set changed, in which case it has the new
    structure, the state of every leaf that stays trainable is carried over, and newly trainable
    leaves get fresh state (with their own step count, under the ready chains). Likewise for the
    parameters decayed toward w₀ (`decay_to_init`): w₀ of those that stay anchored is kept, a
    newly anchored one takes its value now.

    Args:
      opt_state: a state made by lrmult's transformations (anywhere inside an optax chain,
        `inject_hyperparams`, ...).
      param_dict: the ParamDict to read; defaults to the one the transformations were built
        with (a state built from a ParamDict stays bound to it).
      params: the tree being trained (the one passed to `update`), whose values newly anchored
        parameters take as w₀. Without it they take their Parameters' values, which at the
        optax level are those the ParamDict was built with unless you `set_data`.

    Returns:
      The new state; `opt_state` itself is not modified. Unchanged multipliers keep their arrays.

    Example:
      >>> params_dict["backbone/kernel"].decay_to_init = True
      >>> opt_state = lrmult.refresh(opt_state, params_dict, params=params)
    """
    if param_dict is None:
        param_dict = bound_param_dict(opt_state)
    if param_dict is None:
        raise TypeError(
            "refresh: the state is bound to no ParamDict (built without param_dict, or with "
            "track=False); pass the one to read: refresh(opt_state, param_dict)"
        )
    check_param_dict(param_dict, "refresh")
    return refresh_state(opt_state, param_dict, values=_values(params, param_dict))


def _values(params: Any, param_dict: Mapping[str, Any]) -> dict[str, Any] | None:
    """`{path name: array}` of a params tree, each checked against its Parameter if it has one."""
    if params is None:
        return None
    params = flax_trees.unbox_variables(params, is_masked)
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_masked)[0]
    out = {path_name(path): x for path, x in flat if not is_masked(x)}
    for name, x in out.items():
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"refresh: params leaf {name!r} is a {type(x).__name__}, not an array")
        param = param_dict.get(name) if hasattr(param_dict, "get") else None
        if param is not None:
            param.check_like(x, f"refresh: params leaf {name!r}")
    return out
