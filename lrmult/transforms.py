"""optax transformations that place per-leaf multipliers, and the structural freeze.

- `scale_by_lr_mult` / `add_decayed_weights`: multipliers resolved through the lookup chain at
  `init`, kept in the state as float32 scalars per leaf (so changing them never recompiles).
- `per_leaf`: runs a transformation leaf by leaf, so each leaf has its own step count.
- `trainable_only`: frozen leaves hold no state and take no part in the inner chain.
- `refresh`: the same state with the current multipliers (and frozen set) of a ParamDict.
"""

from __future__ import annotations

import contextvars
import sys
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.tree_util import GetAttrKey

from lrmult import lookup
from lrmult.lookup import FrozenLeaf, is_frozen_leaf


def _flatten(tree: Any) -> tuple[list[Any], Any]:
    return jax.tree.flatten(tree, is_leaf=is_frozen_leaf)


def _unbox(params: Any) -> Any:
    """`params` with flax NNX Variables replaced by their values.

    `nnx.Optimizer` calls `init` on an `nnx.State` of `Param`s: the lookup chain must name
    `l1/kernel` (not `l1/kernel/value`), and per-leaf scalars (multipliers, step counts) must not
    come back wrapped in the parameter's Variable, whose sharding metadata does not fit a scalar.
    """
    variablelib = sys.modules.get("flax.nnx.variablelib")  # no Variables if flax is not loaded
    if variablelib is None:
        return params
    var = variablelib.Variable
    return jax.tree.map(
        lambda x: x.get_value() if isinstance(x, var) else x,
        params,
        is_leaf=lambda x: isinstance(x, var) or is_frozen_leaf(x),
    )


def _register(cls: type, child: str, static: str) -> None:
    """Register `cls(child, static)` as a pytree node: one child, one static (aux) field."""
    jax.tree_util.register_pytree_with_keys(
        cls,
        lambda s: (((GetAttrKey(child), getattr(s, child)),), getattr(s, static)),
        lambda aux, children: cls(children[0], aux),
        flatten_func=lambda s: ((getattr(s, child),), getattr(s, static)),
    )


def _check_param_dict(param_dict: Any, where: str) -> None:
    if param_dict is not None and not isinstance(param_dict, Mapping):
        raise TypeError(f"{where}: param_dict must be a ParamDict, got {type(param_dict).__name__}")


class _Link:
    """How a multiplier state was resolved: static (aux) data of `MultState`, equal by identity.

    One per `init`: it knows the leaves (their path names, shapes, indices) of the tree it was
    initialised with, so `refresh` and `explain` can name every entry of the multiplier vector.
    """

    def __init__(
        self, attr: str, overrides: dict, idx2name: dict | None, param_dict: Any, leaves=()
    ) -> None:
        self.attr = attr
        self.overrides = overrides
        self.idx2name = idx2name
        self.param_dict = param_dict
        self.leaves: list[lookup.Leaf] = list(leaves)
        self.warned: set[Any] = set()
        self._key = (
            attr,
            id(param_dict),
            tuple(sorted(overrides.items(), key=repr)),
            tuple(sorted((idx2name or {}).items())),
            tuple(self.leaves),
        )
        self._hash = hash(self._key)

    # Equal links give equal treedefs: a state rebuilt for a frozen set seen before hits jit's
    # cache. The identity test first keeps the common case (the same link) cheap.
    def __eq__(self, other: object) -> bool:
        return self is other or (isinstance(other, _Link) and self._key == other._key)

    def __hash__(self) -> int:
        return self._hash

    def renamed(self, param_dict: Any) -> _Link:
        """The same link reading another ParamDict (indices follow that dict's order)."""
        if param_dict is self.param_dict:
            return self
        leaves = lookup.leaves_named(
            [leaf.path for leaf in self.leaves],
            [leaf.shape for leaf in self.leaves],
            param_dict,
            self.idx2name,
        )
        link = _Link(self.attr, self.overrides, self.idx2name, param_dict, leaves)
        link.warned = self.warned
        return link


class MultState:
    """Per-leaf multipliers: `values` is shaped like the params, one float32 scalar per leaf.

    (Not one packed vector: XLA:CPU compiles N static slices of one buffer ~5x slower.)
    """

    __slots__ = ("values", "link")

    def __init__(self, values: Any, link: _Link) -> None:
        self.values = values
        self.link = link

    def __repr__(self) -> str:
        return f"MultState({self.link.attr}, {self.values!r})"


_register(MultState, "values", "link")


def _place(value: Any, like: Any, dtype: Any = np.float32) -> jax.Array:
    """`value` on the device(s) of `like`: replicated over its mesh, or where jit would put it.

    Multipliers are inputs of the jitted step; giving them the placement of the parameters keeps
    the step's input signature stable (no recompilation when one changes) and adds no collective.
    """
    sharding = getattr(like, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    elif not getattr(like, "committed", False) or len(sharding.device_set) > 1:
        sharding = None  # uncommitted, as jit's outputs are when its inputs were
    return jax.device_put(np.asarray(value, dtype), sharding)


def _host_value(x: jax.Array) -> Any:
    """An array's value on the host, also when it spans processes (read the local copy)."""
    value = np.asarray(x.addressable_data(0))
    return float(value) if value.ndim == 0 else value


def _multiplier_values(link: _Link, overrides: Mapping) -> list[float]:
    """`link.attr` of every leaf through the lookup chain (0 for frozen leaves)."""
    values = lookup.resolve(link.attr, link.leaves, link.param_dict, overrides)
    frozen = lookup.resolve("frozen", link.leaves, link.param_dict)
    return [0.0 if fz else v for (v, _), (fz, _) in zip(values, frozen, strict=True)]


def _multiplier(attr: str, param_dict: Any, overrides: Any, idx2name: Any, where: str):
    """Shared body of `scale_by_lr_mult` and `add_decayed_weights`: validated link + init."""
    _check_param_dict(param_dict, where)
    overrides = lookup.normalize_overrides(attr, overrides)
    idx2name = lookup.check_idx2name(idx2name)

    def init(params: Any) -> MultState:
        params = _unbox(params)
        leaves = lookup.leaves_of(params, param_dict, idx2name)
        lookup.check_idx2name_range(idx2name, leaves)
        lookup.check_leaves_named(leaves, param_dict, where)
        if not _RESTRUCTURING.get():  # a refresh warns about overrides shadowed since instead
            lookup.check_override_keys(attr, overrides, leaves, param_dict)
        link = _Link(attr, overrides, idx2name, param_dict, leaves)
        flat, treedef = _flatten(params)
        values = [
            x if is_frozen_leaf(x) else _place(v, x)
            for x, v in zip(flat, _multiplier_values(link, overrides), strict=True)
        ]
        return MultState(treedef.unflatten(values), link)

    return init


def scale_by_lr_mult(
    param_dict: Mapping[str, Any] | None = None,
    *,
    lr_mult: Mapping[int | str, float] | None = None,
    idx2name: Mapping[int, str] | None = None,
) -> optax.GradientTransformation:
    """Multiply each leaf's update by its `lr_mult`.

    Place it after any adaptive preconditioner (the ready chains put it last, after the learning
    rate), so `lr_mult` scales the step, never the gradient. A frozen leaf's update is zeroed;
    the ready chains (`lrmult.adam`, ...) go further and drop its state.

    Args:
      param_dict: a ParamDict whose Parameters' `lr_mult` come first in the lookup chain.
      lr_mult: override dict, parameter index or name -> multiplier (links 2 and 3 of the chain).
      idx2name: index -> name, for trees whose path names are not the parameter names.

    Returns:
      An `optax.GradientTransformation` whose state holds one float32 scalar per leaf.
    """
    init = _multiplier("lr_mult", param_dict, lr_mult, idx2name, "scale_by_lr_mult")

    def update_fn(updates, state, params=None):
        del params
        return jax.tree.map(lambda m, u: (u * m).astype(u.dtype), state.values, updates), state

    return optax.GradientTransformation(init, update_fn)


def add_decayed_weights(
    weight_decay: float | jax.Array = 0.0,
    param_dict: Mapping[str, Any] | None = None,
    *,
    wd_mult: Mapping[int | str, float] | None = None,
    idx2name: Mapping[int, str] | None = None,
) -> optax.GradientTransformation:
    """Add `weight_decay * wd_mult * param` to each leaf's update (optax's, per leaf).

    Args:
      weight_decay: the base rate λ.
      param_dict: a ParamDict whose Parameters' `wd_mult` come first in the lookup chain.
      wd_mult: override dict, parameter index or name -> multiplier.
      idx2name: index -> name, for trees whose path names are not the parameter names.

    Returns:
      An `optax.GradientTransformation`; frozen leaves get no decay.
    """
    if not isinstance(weight_decay, (int, float, jax.Array, np.ndarray)) or isinstance(
        weight_decay, bool
    ):
        raise TypeError(
            f"add_decayed_weights: weight_decay must be a number, got {type(weight_decay).__name__}"
        )
    if isinstance(weight_decay, (int, float)) and not (
        weight_decay >= 0 and np.isfinite(weight_decay)
    ):
        raise ValueError(f"add_decayed_weights: weight_decay must be >= 0, got {weight_decay!r}")
    init = _multiplier("wd_mult", param_dict, wd_mult, idx2name, "add_decayed_weights")

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("add_decayed_weights needs params: call update(grads, state, params)")
        out = jax.tree.map(
            lambda d, u, p: (u + (weight_decay * d) * p).astype(u.dtype),
            state.values,
            updates,
            params,
        )
        return out, state

    return optax.GradientTransformation(init, update_fn)


# Set while a refresh rebuilds a state for a new frozen set: overrides shadowed since `init` then
# draw the warning of `refresh`, not the error of `init`.
_RESTRUCTURING: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "lrmult_restructuring", default=False
)

# The cohort of each params position (-1: frozen) that `per_leaf` inits should build, when a
# refresh rebuilds a state for a new frozen set; None: every trainable leaf in cohort 0.
_COHORTS: contextvars.ContextVar[tuple[int, ...] | None] = contextvars.ContextVar(
    "lrmult_cohorts", default=None
)


class CohortState:
    """`inner`'s state once per cohort: the leaves that became trainable at the same time.

    Leaves of one cohort always have equal step counts, so they share one optax state (one
    count, one traced update: as fast as plain optax). A leaf unfrozen later joins a new cohort
    whose count starts at zero: its bias correction restarts, as in PyTorch and MXNet.
    `states` maps a cohort's label to its state, built on the params tree with every leaf
    outside the cohort replaced by `FrozenLeaf`; `cohorts` (static) gives each position's label.
    """

    __slots__ = ("states", "cohorts")

    def __init__(self, states: dict[int, Any], cohorts: tuple[int, ...]) -> None:
        self.states = states
        self.cohorts = cohorts

    def __repr__(self) -> str:
        return f"CohortState(cohorts={self.cohorts}, states={self.states!r})"


_register(CohortState, "states", "cohorts")


def _members(tree: Any, cohorts: tuple[int, ...], label: int) -> Any:
    flat, treedef = _flatten(tree)
    return treedef.unflatten(
        [x if c == label else FrozenLeaf() for x, c in zip(flat, cohorts, strict=True)]
    )


def per_leaf(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Give each leaf its own run of `inner`, step count included.

    optax's `scale_by_adam` keeps one step count for the whole tree; under `per_leaf` a leaf that
    joins training later (unfrozen, through `refresh` or a Trainer) starts its bias correction
    afresh, as in PyTorch and MXNet. Leaves whose counts are equal by construction (those that
    joined together) share one state, so the common case costs exactly what `inner` costs.
    """

    def init_fn(params):
        params = _unbox(params)
        flat, _ = _flatten(params)
        cohorts = _COHORTS.get()
        if cohorts is None or len(cohorts) != len(flat):
            cohorts = tuple(-1 if is_frozen_leaf(x) else 0 for x in flat)
        labels = sorted({c for c in cohorts if c >= 0})
        states = {c: inner.init(_members(params, cohorts, c)) for c in labels}
        return CohortState(states, cohorts)

    def update_fn(updates, state, params=None):
        flat, treedef = _flatten(updates)
        out = list(flat)
        new_states = {}
        for label, st in state.states.items():
            u, new_states[label] = inner.update(
                _members(updates, state.cohorts, label),
                st,
                None if params is None else _members(params, state.cohorts, label),
            )
            for i, (x, c) in enumerate(zip(_flatten(u)[0], state.cohorts, strict=True)):
                if c == label:
                    out[i] = x
        return treedef.unflatten(out), CohortState(new_states, state.cohorts)

    return optax.GradientTransformation(init_fn, update_fn)


class _Owner:
    """Static data of a `TrainableState`: the frozen mask and how to build state for a new one."""

    def __init__(self, init, param_dict, treedef, leaves, dtypes, frozen) -> None:
        self.init = init
        self.param_dict = param_dict
        self.treedef = treedef
        self.leaves = leaves
        self.dtypes = dtypes
        self.frozen = tuple(frozen)

    def _key(self) -> tuple:
        return (id(self.init), id(self.param_dict), self.treedef, self.frozen)

    # Equal owners give equal treedefs, so jit's cache holds one executable per frozen set.
    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Owner) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())


class TrainableState:
    """The state of the inner chain, over the trainable leaves only (frozen: `FrozenLeaf`)."""

    __slots__ = ("inner", "owner")

    def __init__(self, inner: Any, owner: _Owner) -> None:
        self.inner = inner
        self.owner = owner

    def __repr__(self) -> str:
        return f"TrainableState(frozen={sum(self.owner.frozen)}, inner={self.inner!r})"


_register(TrainableState, "inner", "owner")


def _masked(tree: Any, frozen: tuple[bool, ...], leaves: list[lookup.Leaf]) -> Any:
    flat, treedef = _flatten(tree)
    if len(flat) != len(frozen):
        got = {leaf.path for leaf in lookup.leaves_of(tree, None, None)}
        want = [leaf.path for leaf in leaves]
        missing = [n for n in want if n not in got]
        extra = sorted(got - set(want))
        detail = (
            f"leaf {missing[0]!r} is missing" if missing else f"leaf {extra[0]!r} is unexpected"
        )
        raise ValueError(
            f"trainable_only: the tree does not match the state: {detail} ({len(flat)} leaves, "
            f"the state was built for {len(frozen)})"
        )
    return jax.tree.unflatten(
        treedef, [FrozenLeaf() if fz else x for x, fz in zip(flat, frozen, strict=True)]
    )


def trainable_only(
    inner: optax.GradientTransformation, param_dict: Mapping[str, Any] | None
) -> optax.GradientTransformation:
    """Apply `inner` to the trainable leaves only; frozen leaves hold no state.

    Frozen is read from `param_dict` at `init` (and at `refresh`). Frozen leaves stand in the
    inner state as `FrozenLeaf` (an empty pytree node): no moments, no step count, no part in
    global-norm clipping. Their update is `FrozenLeaf` where the gradient was (a Trainer never
    computes it) and exact zeros where an array was given.
    """
    _check_param_dict(param_dict, "trainable_only")

    def init_fn(params):
        params = _unbox(params)
        leaves = lookup.leaves_of(params, param_dict, None)
        lookup.check_leaves_named(leaves, param_dict, "trainable_only")
        frozen = tuple(v for v, _ in lookup.resolve("frozen", leaves, param_dict))
        flat, treedef = _flatten(params)
        dtypes = [None if is_frozen_leaf(x) else jnp.result_type(x) for x in flat]
        owner = _Owner(inner.init, param_dict, treedef, leaves, dtypes, frozen)
        return TrainableState(inner.init(_masked(params, frozen, leaves)), owner)

    def update_fn(updates, state, params=None):
        frozen, leaves = state.owner.frozen, state.owner.leaves
        masked_params = None if params is None else _masked(params, frozen, leaves)
        new_updates, new_inner = inner.update(
            _masked(updates, frozen, leaves), state.inner, masked_params
        )
        flat_in, treedef = _flatten(updates)
        flat_out = _flatten(new_updates)[0]
        out = [
            (jnp.zeros_like(x) if fz and not is_frozen_leaf(x) else y)
            for x, y, fz in zip(flat_in, flat_out, frozen, strict=True)
        ]
        return jax.tree.unflatten(treedef, out), TrainableState(new_inner, state.owner)

    return optax.GradientTransformation(init_fn, update_fn)


# -- refresh -------------------------------------------------------------------------------------


def _is_node(x: Any) -> bool:
    return isinstance(x, (TrainableState, MultState))


def _carry_over(old: Any, new: Any) -> Any:
    """`new`, with each array taken from `old` where the same key path holds one alike."""
    old_flat = dict(jax.tree_util.tree_flatten_with_path(old, is_leaf=is_frozen_leaf)[0])

    def pick(path, x):
        y = old_flat.get(path)
        if (
            y is not None
            and not is_frozen_leaf(y)
            and not is_frozen_leaf(x)
            and np.shape(y) == np.shape(x)
            and jnp.result_type(y) == jnp.result_type(x)
        ):
            return y
        return x

    return jax.tree_util.tree_map_with_path(pick, new, is_leaf=is_frozen_leaf)


def _restructure(state: TrainableState, param_dict: Any) -> TrainableState:
    owner = state.owner
    pd = param_dict if param_dict is not None else owner.param_dict
    lookup.check_leaves_named(owner.leaves, pd, "refresh")
    frozen = tuple(v for v, _ in lookup.resolve("frozen", owner.leaves, pd))
    if frozen == owner.frozen:
        return state
    values = []
    for leaf, dtype, fz in zip(owner.leaves, owner.dtypes, frozen, strict=True):
        if fz:
            values.append(FrozenLeaf())
        elif pd is not None and leaf.name in pd:
            values.append(pd[leaf.name]._value)
        else:
            values.append(jnp.zeros(leaf.shape, dtype))
    params = jax.tree.unflatten(owner.treedef, values)
    new_owner = _Owner(owner.init, pd, owner.treedef, owner.leaves, owner.dtypes, frozen)
    token = _COHORTS.set(_next_cohorts(state.inner, frozen))
    restructuring = _RESTRUCTURING.set(True)
    try:
        fresh = owner.init(params)
    finally:
        _COHORTS.reset(token)
        _RESTRUCTURING.reset(restructuring)
    return TrainableState(_carry_over(state.inner, fresh), new_owner)


def _next_cohorts(inner_state: Any, frozen: tuple[bool, ...]) -> tuple[int, ...] | None:
    """Cohort labels for a new frozen set: leaves that stay trainable keep theirs, leaves that
    become trainable form one new cohort."""
    found: list[CohortState] = []
    jax.tree.map(
        lambda x: found.append(x) if isinstance(x, CohortState) else None,
        inner_state,
        is_leaf=lambda x: isinstance(x, CohortState),
    )
    if not found or len(found[0].cohorts) != len(frozen):
        return None
    old = found[0].cohorts
    new_label = max(old, default=-1) + 1
    return tuple(
        -1 if fz else (c if c >= 0 else new_label) for c, fz in zip(old, frozen, strict=True)
    )


def _refresh_mult(
    state: MultState, param_dict: Any, overrides: Mapping | None, warned: set | None
) -> MultState:
    link = state.link.renamed(param_dict if param_dict is not None else state.link.param_dict)
    lookup.check_leaves_named(link.leaves, link.param_dict, "refresh")
    overrides = link.overrides if overrides is None else overrides
    warned = link.warned if warned is None else warned
    for key, name in lookup.shadowed(link.attr, overrides, link.leaves, link.param_dict):
        if (link.attr, key) not in warned:
            warned.add((link.attr, key))
            warnings.warn(
                f"{link.attr} override {key!r} no longer acts on parameter {name!r}: its "
                f"Parameter's {link.attr} was set since, and comes first in the lookup chain",
                stacklevel=4,
            )
    flat, treedef = _flatten(state.values)
    arrays = [x for x in flat if not is_frozen_leaf(x)]
    old = iter(jax.device_get([x.addressable_data(0) for x in arrays]))  # one transfer
    changed = False
    out = []
    for x, v in zip(flat, _multiplier_values(link, overrides), strict=True):
        if is_frozen_leaf(x):
            out.append(x)
        elif np.float32(next(old)) == np.float32(v):
            out.append(x)
        else:
            out.append(_place(v, x))
            changed = True
    if not changed:
        return state if link is state.link else MultState(state.values, link)
    return MultState(treedef.unflatten(out), link)


def _refresh(
    opt_state: Any,
    param_dict: Any = None,
    overrides: Mapping[str, Mapping] | None = None,
    warned: set | None = None,
) -> Any:
    """The engine of `refresh` (and of the Trainer, which keeps its override dicts itself)."""

    def visit(node):
        if isinstance(node, TrainableState):
            node = _restructure(node, param_dict)
            return TrainableState(jax.tree.map(visit, node.inner, is_leaf=_is_node), node.owner)
        if isinstance(node, MultState):
            ovr = None if overrides is None else overrides.get(node.link.attr, {})
            return _refresh_mult(node, param_dict, ovr, warned)
        return node

    return jax.tree.map(visit, opt_state, is_leaf=_is_node)


def refresh(opt_state: Any, param_dict: Mapping[str, Any] | None = None) -> Any:
    """The same optimizer state with `param_dict`'s current multipliers and frozen set.

    Call it between steps after `setattr`: the new state has the same structure (so a jitted
    update does not recompile) unless the frozen set changed, in which case it has the new
    structure, the state of every leaf that stays trainable is carried over, and newly trainable
    leaves get fresh state (with their own step count, under the ready chains).

    Args:
      opt_state: a state made by lrmult's transformations (anywhere inside an optax chain,
        `inject_hyperparams`, ...).
      param_dict: the ParamDict to read; defaults to the one each transformation was built with.

    Returns:
      The new state; `opt_state` itself is not modified. Unchanged multipliers keep their arrays.
    """
    _check_param_dict(param_dict, "refresh")
    return _refresh(opt_state, param_dict)


def find_nodes(opt_state: Any) -> tuple[list[TrainableState], list[MultState]]:
    """Every `TrainableState` and `MultState` inside an optimizer state, outermost first."""
    trainable: list[TrainableState] = []
    mults: list[MultState] = []

    def visit(node):
        if isinstance(node, TrainableState):
            trainable.append(node)
            jax.tree.map(visit, node.inner, is_leaf=_is_node)
        elif isinstance(node, MultState):
            mults.append(node)
        return node

    jax.tree.map(visit, opt_state, is_leaf=_is_node)
    return trainable, mults


def explain(
    opt_state: Any, param_dict: Mapping[str, Any] | None = None, learning_rate: float | None = None
):
    """What each leaf gets from an lrmult optimizer state, and which link of the chain set it.

    Args:
      opt_state: a state holding lrmult's multipliers (from `scale_by_lr_mult` or a ready chain).
      param_dict: the ParamDict to read; defaults to the one the transformations were built with.
      learning_rate: the base rate for the `lr` column; read from an `inject_hyperparams` state
        when not given, else shown as nan.

    Returns:
      A `Table` of `ExplainRow`s, printable as text and shown as HTML in notebooks.
    """
    from lrmult.display import Table

    _, mults = find_nodes(opt_state)
    by_attr = {m.link.attr: m for m in reversed(mults)}
    if "lr_mult" not in by_attr:
        raise ValueError("explain: opt_state holds no scale_by_lr_mult state")
    lr_node = by_attr["lr_mult"]
    wd_node = by_attr.get("wd_mult")
    pd = param_dict if param_dict is not None else lr_node.link.param_dict
    if learning_rate is None:
        hyper = getattr(opt_state, "hyperparams", None) or {}
        lr = hyper.get("learning_rate")
        learning_rate = float(lr) if lr is not None else float("nan")
    rows = lookup.explain_rows(
        lr_node.link.renamed(pd).leaves,
        pd,
        lr_node.link.overrides,
        wd_node.link.overrides if wd_node is not None else None,
        float(learning_rate),
    )

    def differs(held, resolved):
        return held is not None and np.float32(held) != np.float32(resolved)

    stale = []
    for k, (row, (m, d)) in enumerate(
        zip(rows, _applied(lr_node, wd_node, len(rows)), strict=True)
    ):
        if row.frozen or not (differs(m, row.lr_mult) or differs(d, row.wd_mult)):
            continue
        stale.append(row.name)
        # Show what the state applies; "state" marks a value param_dict has changed since.
        if differs(m, row.lr_mult):
            row = row._replace(lr_mult=m, lr=float(learning_rate) * m, lr_source="state")
        if differs(d, row.wd_mult):
            row = row._replace(wd_mult=d, wd_source="state")
        rows[k] = row
    if stale:
        warnings.warn(
            f"explain: the state applies other multipliers than param_dict now says (first: "
            f"{stale[0]!r}); call lrmult.refresh(opt_state, param_dict) before the next update",
            stacklevel=2,
        )
    return Table(rows, title=f"lrmult.explain (base learning rate {learning_rate:.6g})")


def _applied(lr_node: MultState, wd_node: MultState | None, n: int):
    """The multipliers the state holds, by index order of the rows (None where frozen)."""

    def by_index(node):
        if node is None:
            return [None] * n
        flat = _flatten(node.values)[0]
        values = dict.fromkeys(range(n))
        for leaf, x in zip(node.link.leaves, flat, strict=True):
            values[leaf.index] = None if is_frozen_leaf(x) else _host_value(x)
        return [values[i] for i in sorted(values)]

    return list(zip(by_index(lr_node), by_index(wd_node), strict=True))
