"""The lookup chain: MXNet's `Optimizer._get_lr` (param_dict, index, idx2name, default), made safe.

For each leaf of a tree and each attribute (`lr_mult`, `wd_mult`, `frozen`), exactly one link
applies, in this order:

1. `param`: the ParamDict holds a Parameter of that name on which the attribute was set;
2. `index`: the leaf's index is a key of the override dict;
3. `name`: the leaf's name is a key of the override dict;
4. `default`: 1.0 (`frozen`: False).

A stacked leaf (`stacked=` on the ParamDict) goes through the chain layer by layer: a Parameter
may have some layers set only (the others fall through), and an override may name one layer by
its per-layer name (`layers/3/attn/kernel`, link 3; it refines the leaf's own name, while an
index names the whole leaf and comes first). Its values are then arrays over the stacked axes.

Overrides that name nothing are `KeyError`s; overrides a set Parameter shadows are `ValueError`s.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from lrmult._names import path_name, suggest
from lrmult._where import user_stacklevel
from lrmult.parameter import check_multiplier
from lrmult.schedules import Scaled, Schedule, is_schedule


def is_masked(x: Any) -> bool:
    """Whether `x` stands where a frozen leaf was (`optax.MaskedNode`: no children, no state)."""
    return isinstance(x, optax.MaskedNode)


class Rows:
    """Some layers of a stacked leaf, gathered: one group of rows of its flattened stacked axes.

    A stacked leaf with some layers frozen (or layers that joined training at different steps)
    stands in an optimizer state as `{label: Rows(...)}`, one group per label, frozen rows in
    none: they hold no state and take no step. `rows` and `total` are static.
    """

    __slots__ = ("value", "rows", "total")

    def __init__(self, value: Any, rows: tuple[int, ...], total: int) -> None:
        self.value = value
        self.rows = rows
        self.total = total

    def __repr__(self) -> str:
        return f"Rows({list(self.rows)} of {self.total}, {self.value!r})"


jax.tree_util.register_pytree_with_keys(
    Rows,
    lambda r: (((jax.tree_util.GetAttrKey("value"), r.value),), (r.rows, r.total)),
    lambda aux, children: Rows(children[0], *aux),
    flatten_func=lambda r: ((r.value,), (r.rows, r.total)),
)


def is_position(x: Any) -> bool:
    """Whether `x` is one position of a state's per-leaf trees: a MaskedNode or a `Rows`."""
    return isinstance(x, (optax.MaskedNode, Rows))


class Leaf(NamedTuple):
    """Where a leaf stands for the lookup chain."""

    index: int
    name: str
    shape: tuple[int, ...]
    path: str  # the leaf's key path joined with '/'


def leaves_of(tree: Any, param_dict: Mapping[str, Any] | None, idx2name: Mapping[int, str] | None):
    """The `Leaf` of every array leaf (and every `optax.MaskedNode`) of `tree`, in flatten order.

    The index of a leaf is its position in `param_dict` when its path name is found there (a
    ParamDict's order is the one users count in), else its position in `tree`; its name is
    `idx2name[index]` if given, else its path name.
    """
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_position)[0]
    # A group of rows is named by its leaf: its path ends with the group's label.
    paths = [path_name(path[:-1] if isinstance(x, Rows) else path) for path, x in flat]
    shapes = [
        () if is_masked(x) else tuple(np.shape(x.value if isinstance(x, Rows) else x))
        for _, x in flat
    ]
    return leaves_named(paths, shapes, param_dict, idx2name)


def leaves_named(
    paths: list[str],
    shapes: list[tuple[int, ...]],
    param_dict: Mapping[str, Any] | None,
    idx2name: Mapping[int, str] | None,
) -> list[Leaf]:
    """`leaves_of` for leaves known by their path names and shapes."""
    paths, shapes = list(paths), list(shapes)
    out = []
    for position, (pname, shape) in enumerate(zip(paths, shapes, strict=True)):
        if idx2name:
            index = position
            name = idx2name.get(index, pname)
        elif param_dict is not None and pname in param_dict:
            index = _index_in(param_dict, pname)
            name = pname
        else:
            index, name = position, pname
        out.append(Leaf(index, name, shape, pname))
    return out


def check_leaves_named(
    leaves: list[Leaf], param_dict: Mapping[str, Any] | None, where: str
) -> None:
    """With a ParamDict, every leaf must name one of its Parameters.

    A tree that does not match would silently get no multiplier at all.
    """
    if param_dict is None:
        return
    missing = [leaf.name for leaf in leaves if leaf.name not in param_dict]
    if not missing:
        return
    hint = ""
    if len(missing) == len(leaves):
        hint = (
            "; none of the tree's leaves is in param_dict: pass the tree the ParamDict was built "
            "from (flax: variables['params'], not variables)"
        )
    raise KeyError(
        f"{where}: leaf {missing[0]!r} names no parameter of param_dict"
        f"{suggest(missing[0], param_dict)}{hint}"
    )


def check_idx2name_range(idx2name: Mapping[int, str] | None, leaves: list[Leaf]) -> None:
    """Every index of `idx2name` must name a leaf of the tree."""
    for index in idx2name or {}:
        if not 0 <= index < len(leaves):
            raise KeyError(
                f"idx2name: index {index} names no leaf (the tree has {len(leaves)} leaves, "
                f"indices 0..{len(leaves) - 1})"
            )


def _index_in(param_dict: Mapping[str, Any], name: str) -> int:
    index = getattr(param_dict, "index", None)
    if index is not None:
        return index(name)
    return list(param_dict).index(name)


def check_idx2name(idx2name: Any) -> dict[int, str] | None:
    """Validate an `idx2name` argument (a mapping int -> str, or None)."""
    if idx2name is None:
        return None
    if not isinstance(idx2name, Mapping):
        raise TypeError(f"idx2name must be a mapping index -> name, got {type(idx2name).__name__}")
    for k, v in idx2name.items():
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not isinstance(v, str):
            raise TypeError(f"idx2name must map int -> str, got {k!r}: {v!r}")
    return {int(k): v for k, v in idx2name.items()}


def normalize_overrides(attr: str, overrides: Any) -> dict[int | str, float]:
    """Validate an override dict's shape and values (not yet its keys): int/str -> float >= 0."""
    if overrides is None:
        return {}
    if not isinstance(overrides, Mapping):
        raise TypeError(
            f"{attr} overrides must be a mapping from parameter index or name to a multiplier, "
            f"got {type(overrides).__name__}"
        )
    out: dict[int | str, float] = {}
    for key, value in overrides.items():
        if isinstance(key, bool) or not isinstance(key, (int, np.integer, str)):
            raise KeyError(f"{attr} override key {key!r}: keys are parameter indices or names")
        key = key if isinstance(key, str) else int(key)
        out[key] = check_multiplier(attr, value, f"{attr} override {key!r}")
    return out


def _param(param_dict: Mapping[str, Any] | None, name: str) -> Any:
    if param_dict is None:
        return None
    return param_dict.get(name) if hasattr(param_dict, "get") else None


def layer_names(
    param_dict: Mapping[str, Any] | None, names: Any
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """`{per-layer name: (parameter name, layer index)}` of the stacked Parameters in `names`."""
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name in dict.fromkeys(names):
        param = _param(param_dict, name)
        if param is not None and getattr(param, "stacked", 0):
            for index in param.slices():
                out[param.layer_name(index)] = (name, index)
    return out


def check_override_keys(
    attr: str,
    overrides: Mapping[int | str, float],
    leaves: list[Leaf],
    param_dict: Mapping[str, Any] | None,
) -> None:
    """Every key must name a leaf (or a layer of a stack), and be able to act on it.

    Raises:
      KeyError: a key names no parameter (with the closest names suggested).
      ValueError: a key's leaf (or layer) has `attr` set on its Parameter, so the override
        could never act.
    """
    for key, (leaf, index) in override_targets(attr, overrides, leaves, param_dict).items():
        check_can_act(attr, key, _param(param_dict, leaf.name), leaf.name, index)


def override_leaves(
    attr: str,
    overrides: Mapping[int | str, float],
    leaves: list[Leaf],
    param_dict: Mapping[str, Any] | None = None,
) -> dict[int | str, Leaf]:
    """The leaf each override key names (a per-layer name names its stacked leaf).

    Raises:
      KeyError: a key names no parameter (with the closest names suggested).
    """
    return {
        k: leaf for k, (leaf, _) in override_targets(attr, overrides, leaves, param_dict).items()
    }


def override_targets(
    attr: str,
    overrides: Mapping[int | str, float],
    leaves: list[Leaf],
    param_dict: Mapping[str, Any] | None = None,
) -> dict[int | str, tuple[Leaf, tuple[int, ...] | None]]:
    """`{key: (leaf, layer index or None)}`: what each override key names.

    An index or a leaf's name names the whole leaf; a per-layer name of a stack in `param_dict`
    (`layers/3/attn/kernel`) names one layer of its leaf.

    Raises:
      KeyError: a key names no parameter (with the closest names suggested).
    """
    by_index = {leaf.index: leaf for leaf in leaves}
    by_name = {leaf.name: leaf for leaf in leaves}
    layers: dict[str, tuple[str, tuple[int, ...]]] | None = None
    out: dict[int | str, tuple[Leaf, tuple[int, ...] | None]] = {}
    for key in overrides:
        if isinstance(key, int):
            leaf = by_index.get(key)
            if leaf is None:
                top = max(by_index) if by_index else -1
                raise KeyError(
                    f"{attr} override: index {key} names no parameter (indices run 0..{top})"
                )
            out[key] = (leaf, None)
        elif key in by_name:
            out[key] = (by_name[key], None)
        else:
            if layers is None:
                layers = layer_names(param_dict, by_name)
            if key not in layers:
                raise KeyError(
                    f"{attr} override: {key!r} names no parameter"
                    f"{suggest(key, [*by_name, *layers])}{_layer_hint(key, param_dict, layers)}"
                )
            name, index = layers[key]
            out[key] = (by_name[name], index)
    return out


def _layer_hint(key: str, param_dict: Any, layers: Mapping[str, Any]) -> str:
    """Why a name that looks like a layer's (`layers/3/...`) names nothing."""
    if layers or not re.search(r"(?:^|/)\d+(?:/|$)", key):
        return ""
    where = "" if param_dict is not None else ", passed as param_dict="
    return (
        f"; per-layer names exist for stacks declared with "
        f"ParamDict.from_pytree(..., stacked={{prefix: 1}}){where}"
    )


def check_can_act(
    attr: str, key: int | str, param: Any, name: str, index: tuple[int, ...] | None = None
) -> None:
    """Raise if `param` has `attr` set where the override `key` acts, so it never could.

    An override for a whole stacked leaf can act while some of its layers are unset; one for a
    layer (`index`) cannot once that layer is set.
    """
    if param is None or not param.is_set(attr):
        return
    mask = np.broadcast_to(param.set_mask(attr), param.stack_shape)
    if index is None and np.all(mask):
        raise ValueError(
            f"{attr} override {key!r} for parameter {name!r} could never act: that "
            f"Parameter has {attr}={param.shown(attr)} set, which comes first in the "
            f"lookup chain; unset it (del param.{attr}) or set the value on the Parameter"
        )
    if index is not None and mask[index]:
        value = np.asarray(getattr(param, attr))[index]
        raise ValueError(
            f"{attr} override {key!r} for layer {list(index)} of parameter {name!r} could never "
            f"act: that layer has {attr}={value:.6g} set on the Parameter, which comes first in "
            f"the lookup chain; unset it (params.select({key!r}).setattr({attr!r}, None)) or set "
            f"the value on the Parameter"
        )


def check_overrides_against(
    attr: str,
    overrides: Mapping[int | str, float],
    param_dict: Mapping[str, Any] | None,
    idx2name: Mapping[int, str] | None,
) -> None:
    """`check_can_act` for each key whose Parameter the ParamDict alone names.

    A key names a Parameter by name (or a layer of one by its per-layer name), by an `idx2name`
    entry, or by its position in the dict; this runs when a transformation is built, before any
    tree is seen.
    """
    if param_dict is None:
        return
    names = list(param_dict)
    layers = None
    for key in overrides:
        index = None
        if isinstance(key, str):
            name = key
            if key not in param_dict:
                layers = layer_names(param_dict, names) if layers is None else layers
                if key not in layers:
                    continue
                name, index = layers[key]
        elif idx2name and key in idx2name:
            name = idx2name[key]
        elif not idx2name and 0 <= key < len(names):
            name = names[key]
        else:
            continue
        check_can_act(attr, key, _param(param_dict, name), name, index)


def frozen_mask(
    leaves: list[Leaf], param_dict: Mapping[str, Any] | None
) -> tuple[bool | tuple[bool, ...], ...]:
    """Whether each leaf is frozen, through the chain (only a Parameter can freeze a leaf).

    A stacked leaf with some layers frozen gives a tuple of flags over its layers (flattened).
    """
    out: list[bool | tuple[bool, ...]] = []
    for leaf, (v, _) in zip(leaves, resolve("frozen", leaves, param_dict), strict=True):
        param = _param(param_dict, leaf.name)
        layers = None if param is None else param.frozen_layers
        out.append(bool(v) if layers is None else tuple(bool(x) for x in layers.ravel()))
    return tuple(out)


def anchored_mask(leaves: list[Leaf], param_dict: Mapping[str, Any] | None) -> tuple[bool, ...]:
    """Whether each leaf's Parameter has `decay_to_init` (only a Parameter can anchor a leaf).

    Weight decay then pulls the leaf toward its value when the state was built (w₀); the flag is
    one per Parameter: every layer of a stack, and every group of its layers, reads the same.
    """
    return tuple(
        bool(getattr(_param(param_dict, leaf.name), "decay_to_init", False)) for leaf in leaves
    )


def shadowed(
    attr: str,
    overrides: Mapping[int | str, float],
    leaves: list[Leaf],
    param_dict: Mapping[str, Any] | None,
) -> list[tuple[int | str, str]]:
    """`(key, leaf name)` of overrides that no longer act: their Parameter has `attr` set since.

    An override for a whole leaf is shadowed once every layer is set; one for a layer, once
    that layer is.
    """
    if not overrides or param_dict is None:
        return []
    by_layer = _layer_keys(overrides, leaves, param_dict)
    out = []
    for leaf in leaves:
        param = _param(param_dict, leaf.name)
        if param is None or not param.is_set(attr):
            continue
        mask = np.broadcast_to(param.set_mask(attr), param.stack_shape)
        if np.all(mask):
            out += [(key, leaf.name) for key in (leaf.index, leaf.name) if key in overrides]
        out += [
            (key, leaf.name) for index, key in by_layer.get(leaf.name, {}).items() if mask[index]
        ]
    return list(dict.fromkeys(out))


def _layer_keys(
    overrides: Mapping[int | str, Any], leaves: list[Leaf], param_dict: Mapping[str, Any] | None
) -> dict[str, dict[tuple[int, ...], str]]:
    """`{leaf name: {layer index: key}}` of the override keys that name one layer of a stack."""
    names = {leaf.name for leaf in leaves}
    keys = [k for k in overrides if isinstance(k, str) and k not in names]
    if not keys or param_dict is None:
        return {}
    layers = layer_names(param_dict, [leaf.name for leaf in leaves])
    out: dict[str, dict[tuple[int, ...], str]] = {}
    for key in keys:
        if key in layers:
            name, index = layers[key]
            out.setdefault(name, {})[index] = key
    return out


def resolve(
    attr: str,
    leaves: list[Leaf],
    param_dict: Mapping[str, Any] | None,
    overrides: Mapping[int | str, float] | None = None,
) -> list[tuple[Any, Any]]:
    """`(value, source)` of `attr` for every leaf, through the chain.

    Where the layers of a stacked leaf take different links, the value of a multiplier is an
    array over the stacked axes and the source an object array of link names (use `at` to read
    one layer's); `frozen`'s value stays the Parameter's flag (`frozen_layers` has the layers).
    """
    overrides = overrides or {}
    default = False if attr == "frozen" else 1.0
    by_layer = {} if attr == "frozen" else _layer_keys(overrides, leaves, param_dict)
    out: list[tuple[Any, Any]] = []
    for leaf in leaves:
        param = _param(param_dict, leaf.name)
        source = None if param is None else param.origin(attr)
        if isinstance(source, str):
            out.append((getattr(param, attr), source))
            continue
        if attr != "frozen" and leaf.index in overrides:
            link = (overrides[leaf.index], "index")
        elif attr != "frozen" and leaf.name in overrides:
            link = (overrides[leaf.name], "name")
        else:
            link = (default, "default")
        keys = by_layer.get(leaf.name, {}) if link[1] != "index" else {}
        if source is None and not keys:
            out.append(link)
            continue
        shape = param.stack_shape
        values = np.full(shape, link[0], np.float64)
        sources = np.full(shape, link[1], object)
        for index, key in keys.items():
            values[index], sources[index] = overrides[key], "name"
        if source is not None:
            mask = param.set_mask(attr)
            if attr != "frozen":
                values[mask] = np.broadcast_to(getattr(param, attr), shape)[mask]
            sources[mask] = source[mask]
        first = sources.flat[0]
        uniform = all(s == first for s in sources.flat)
        out.append((param.frozen if attr == "frozen" else values, first if uniform else sources))
    return out


def at(x: Any, index: tuple[int, ...]) -> Any:
    """One layer's entry of what `resolve` gives (a value or a source); `x` if not per layer."""
    return x[index] if isinstance(x, np.ndarray) and index else x


def multiplier_values(
    attr: str,
    leaves: list[Leaf],
    param_dict: Mapping[str, Any] | None,
    overrides: Mapping[int | str, float] | None,
) -> list[float]:
    """`attr` of every leaf through the chain, 0 for frozen leaves (they take no step).

    A stacked Parameter's value is an array shaped like its stacked axes (a scalar broadcast),
    so changing one layer's value keeps the shape: no recompilation.
    """
    values = resolve(attr, leaves, param_dict, overrides)
    frozen = frozen_mask(leaves, param_dict)
    out = []
    for leaf, (v, _), fz in zip(leaves, values, frozen, strict=True):
        param = _param(param_dict, leaf.name)
        shape = param.stack_shape if param is not None else ()
        if is_schedule(v):
            if fz is True:
                v = 0.0
            elif shape:  # per layer: frozen layers take no step
                keep = np.ones(shape) if not isinstance(fz, tuple) else ~np.reshape(fz, shape)
                v = v * keep if isinstance(v, Schedule) else Scaled(v, keep.astype(np.float64))
            out.append(v)
            continue
        if isinstance(fz, tuple):  # frozen layers take no step
            v = np.where(np.reshape(fz, shape), 0.0, np.broadcast_to(v, shape))
        elif fz:
            v = 0.0
        out.append(np.broadcast_to(np.asarray(v, np.float64), shape or np.shape(v)) if shape else v)
    return out


def warn_shadowed(
    attr: str,
    overrides: Mapping[int | str, float],
    leaves: list[Leaf],
    param_dict: Mapping[str, Any] | None,
) -> None:
    """Warn, once per setting, about each override a Parameter's setting shadows since."""
    for key, name in shadowed(attr, overrides, leaves, param_dict):
        if param_dict[name].first_report(attr, key):
            warnings.warn(
                f"{attr} override {key!r} no longer acts on parameter {name!r}: its "
                f"Parameter's {attr} was set since, and comes first in the lookup chain",
                stacklevel=user_stacklevel(),
            )
