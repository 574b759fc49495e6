"""`ParamDict`: an ordered mapping name -> Parameter, Gluon's `ParameterDict` for pytrees."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

from lrmult import checkpoint, flax_trees
from lrmult._names import nest, path_name, suggest
from lrmult.display import Table
from lrmult.parameter import (
    ATTRIBUTES,
    Parameter,
    check_decay_to_init,
    check_frozen,
    check_grad_req,
    check_multiplier,
)

_PARAMS_FORMAT = "lrmult-params-1"

# Variable metadata keys that seed a Parameter's attributes (from_nnx), in the order applied.
_NNX_METADATA = ("lr_mult", "wd_mult", "frozen", "grad_req", "decay_to_init")


class LoadRow(NamedTuple):
    """One row of a `strict=False` load's report."""

    name: str
    status: str
    reason: str


class ParamRow(NamedTuple):
    """One row of a ParamDict's table; `-` marks an attribute not set on the Parameter."""

    index: int
    name: str
    shape: tuple[int, ...]
    dtype: str
    lr_mult: Any
    wd_mult: Any
    frozen: Any
    decay_to_init: Any


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def compile_pattern(pattern: str | re.Pattern[str], where: str) -> re.Pattern[str]:
    """A parameter-name pattern compiled, or a clear error naming `where`.

    Raises:
      ValueError: the pattern is empty or not a valid regular expression.
      TypeError: it is neither a str nor a compiled pattern.
    """
    if isinstance(pattern, re.Pattern):
        return pattern
    if not isinstance(pattern, str):
        raise TypeError(f"{where}: pattern must be a str, got {type(pattern).__name__}")
    if not pattern:
        raise ValueError(f"{where}: the pattern is empty; use '.*' to select every parameter")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{where}: {pattern!r} is not a valid regular expression: {e}") from None


def _select_hint(regex: re.Pattern[str], names: list[str]) -> str:
    """What the user may have meant by a pattern that `re.match`es nothing."""

    def shown(found: list[str]) -> str:
        return ", ".join(repr(n) for n in found[:3]) + (", ..." if len(found) > 3 else "")

    flags = regex.flags | re.IGNORECASE
    anywhere = [n for n in names if regex.search(n)]
    folded = [n for n in names if re.match(regex.pattern, n, flags)]
    folded_anywhere = [n for n in names if re.search(regex.pattern, n, flags)]
    if anywhere:
        return (
            f" (re.match anchors at the start; it appears inside {shown(anywhere)}: "
            f"try {'.*' + regex.pattern!r})"
        )
    if folded:
        return f" (case differs from {shown(folded)}: try {'(?i)' + regex.pattern!r})"
    if folded_anywhere:
        return (
            f" (case differs, and re.match anchors at the start; it appears inside "
            f"{shown(folded_anywhere)}: try {'(?i).*' + regex.pattern!r})"
        )
    return ""


class ParamDict(Mapping[str, Parameter]):
    """An ordered mapping name -> `Parameter`; the index of a parameter is its position.

    Build one from a pytree with `ParamDict.from_pytree`, or from a mapping name -> Parameter.
    `select` returns dicts that *share* the Parameter objects, so
    `params.select('.*bias').setattr('wd_mult', 0.0)` changes the parameters of `params`.

    Args:
      params: a mapping name -> Parameter (or another ParamDict), or None for an empty dict.
    """

    def __init__(self, params: Mapping[str, Parameter] | None = None) -> None:
        self._params: dict[str, Parameter] = {}
        self._index: dict[str, int] = {}
        # (treedef, names in leaf order) of the tree this dict was built from, if any.
        self._structure: tuple[Any, list[str]] | None = None
        # name -> bool mask over the stacked axes, for Parameters selected by some layers only.
        self._layers: dict[str, np.ndarray] = {}
        if params is not None:
            self.update(params)

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_pytree(
        cls, tree: Any, *, prefix: str = "", stacked: Mapping[str, int] | str | None = None
    ) -> ParamDict:
        """One Parameter per array leaf, named by its key path joined with `/`.

        Linen metadata boxes (`flax.core.meta.AxisMetadata`: `nn.Partitioned`,
        `nn.LogicallyPartitioned`) are seen through, as by `lrmult.from_linen`: names stop at the
        box (`Dense_0/kernel`), and `tree()` rebuilds the boxes, so `model.apply` and
        `nn.get_partition_spec` keep working on it.

        Args:
          tree: a pytree of arrays (nested dicts, lists, Linen `variables["params"]`, ...).
          prefix: prepended to every name as is (`prefix="trunk/"` gives `trunk/conv/kernel`).
          stacked: `{path prefix: number of leading stacked axes}` for scanned / stacked layers
            (`{"layers": 1}`: every leaf under `layers/` is `(L, ...)`). Layer `i` of the leaf
            `layers/attn/kernel` is then named `layers/i/attn/kernel`, as the unstacked model
            would name it: `select` matches these names, and `setattr` through such a selection
            sets that layer's entry of the multiplier array. For Linen params with partitioning
            boxes, a str names the stacked axis by its partition name instead (`"layers"`, as
            given to `nn.scan(metadata_params={nn.PARTITION_NAME: "layers"})`): see `from_linen`.

        Returns:
          A ParamDict in JAX's flatten order, whose `tree()` has the structure of `tree`.

        Example:
          >>> params = ParamDict.from_pytree({"dense": {"kernel": w, "bias": b}})
          >>> list(params)
          ['dense/bias', 'dense/kernel']
        """
        if not isinstance(prefix, str):
            raise TypeError(f"from_pytree: prefix must be a str, got {type(prefix).__name__}")
        if flax_trees.has_boxes(tree):
            return cls.from_linen(tree, prefix=prefix, stacked=stacked)
        if isinstance(stacked, str):
            raise ValueError(
                f"from_pytree: stacked={stacked!r} names a partition axis, but the tree holds no "
                f"flax partitioning metadata (Linen nn.Partitioned boxes) to find it in; declare "
                f"the stack by its path instead: stacked={{'layers': 1}}"
            )
        leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
        if not leaves:
            raise ValueError("from_pytree: the tree has no array leaves")
        names = []
        for path, leaf in leaves:
            name = prefix + path_name(path)
            if not _is_array(leaf):
                raise TypeError(
                    f"from_pytree: leaf {name!r} is a {type(leaf).__name__}, not an array"
                )
            if not name:
                raise ValueError(
                    "from_pytree: a bare array has no path; give it a name with prefix="
                )
            names.append(name)
        seen: set[str] = set()
        for name in names:
            if name in seen:
                raise ValueError(f"from_pytree: two leaves are both named {name!r}")
            seen.add(name)
        out = cls()
        for name, (_, leaf) in zip(names, leaves, strict=True):
            out._add(name, Parameter(leaf, name=name))
        out._structure = (treedef, names)
        return out.declare_stacks(stacked)

    def declare_stacks(self, stacked: Mapping[str, int] | None) -> ParamDict:
        """Declare stacked layers: `{path prefix: leading stacked axes}` (see `from_pytree`).

        Everything is checked before any Parameter changes. Returns this dict.
        """
        if stacked is None:
            return self
        if not isinstance(stacked, Mapping):
            raise TypeError(
                f"stacked must be a dict prefix -> axes (or, for flax models built by "
                f"from_linen / from_nnx, a partition name), got {type(stacked).__name__}"
            )
        plan = []
        for key, axes in stacked.items():
            if isinstance(axes, bool) or not isinstance(axes, int) or axes < 1:
                raise ValueError(f"stacked[{key!r}]: the number of stacked axes must be >= 1")
            prefix = key.rstrip("/")
            found = [n for n in self._params if n == prefix or n.startswith(prefix + "/")]
            if not found:
                raise ValueError(
                    f"stacked: {key!r} is the prefix of no parameter name"
                    f"{suggest(prefix, {n.split('/')[0] for n in self._params})}"
                )
            for name in found:
                p = self._params[name]
                if axes > len(p.shape):
                    raise ValueError(
                        f"stacked[{key!r}]: parameter {name!r} of shape {p.shape} has fewer than "
                        f"{axes} axes"
                    )
                p.check_stack(axes)
                plan.append((p, axes, len(prefix.split("/"))))
        for p, axes, depth in plan:
            p.declare_stack(axes, depth)
        return self

    @classmethod
    def from_linen(
        cls, params: Any, *, prefix: str = "", stacked: Mapping[str, int] | str | None = None
    ) -> ParamDict:
        """One Parameter per leaf of Linen params, seen through their metadata boxes.

        `nn.with_partitioning` (and `nn.with_logical_partitioning`) wrap leaves in boxes whose
        array sits at `.value`; names stop at the box (`Dense_0/kernel`), values are the unboxed
        arrays, and `tree()` rebuilds the boxes around the current values, so the sharding
        annotations survive training: `nn.get_partition_spec(params.tree())`,
        `nn.logical_to_mesh_sharding(...)` and `model.apply({"params": params.tree()}, x)` work.

        Args:
          params: `variables["params"]` of a Linen model, boxed or not.
          prefix: prepended to every name as is.
          stacked: the stacks of an `nn.scan` model: `{path prefix: leading stacked axes}` (as
            for `from_pytree`), or the partition name of the stacked axis, as given to
            `nn.scan(..., metadata_params={nn.PARTITION_NAME: "layers"})`. flax writes that name
            into the boxes of partitioned parameters only; lrmult finds each stack's path from
            them (every parameter under it is stacked, boxed or not) and refuses, saying what to
            declare, where they do not decide it.

        Returns:
          A ParamDict whose `tree()` has the structure of `params`, boxes included.

        Example:
          >>> params = lrmult.from_linen(variables["params"], stacked="layers")
          >>> params.select("layers/[0-3]/").setattr("frozen", True)
        """
        if isinstance(params, Mapping) and "params" in params:
            raise ValueError(
                "from_linen: got a variables dict (it has a 'params' collection); "
                "pass variables['params']"
            )
        if not jax.tree.leaves(params):
            raise ValueError("from_linen: the tree has no array leaves")
        names, treedef, unboxed = flax_trees.boxed_leaves(params)
        out = cls(cls.from_pytree(unboxed, prefix=prefix))
        names = [prefix + n for n in names]
        if names != list(out):
            raise ValueError(
                "from_linen: a metadata box holds more than one array; unbox the tree first "
                "(flax.core.meta.unbox) and use ParamDict.from_pytree"
            )
        # The boxes' metadata (names, mesh, rules) is static data of the treedef: keep it as the
        # dict's structure, so tree() re-boxes the current values.
        out._structure = (treedef, names)
        if isinstance(stacked, str):
            axes = flax_trees.linen_partition_names(params)
            leaves = [(prefix + n, out[prefix + n].shape, axes[n]) for n in axes]
            stacked = flax_trees.stacks_by_axis(stacked, leaves, "from_linen")
        return out.declare_stacks(stacked)

    @classmethod
    def from_nnx(
        cls,
        model: Any,
        filter: Any = None,
        *,
        wrt: Any = None,
        prefix: str = "",
        stacked: Mapping[str, int] | str | None = None,
    ) -> ParamDict:
        """One Parameter per `filter` Variable (default `nnx.Param`) of an NNX module.

        Names are attribute paths joined with `/` (`backbone/kernel`, `layers/0/kernel`), as in
        `nnx.state(model, filter)`; a Variable shared by two attributes is one Parameter. Variable
        metadata `lr_mult`, `wd_mult`, `frozen`, `grad_req` or `decay_to_init` is copied onto the
        Parameter once, here, as explicitly set values
        (`nnx.Linear(..., kernel_metadata={"lr_mult": 0.1})`, `nnx.Param(x, frozen=True)`,
        `nnx.with_metadata(init, wd_mult=0.0)`).

        Args:
          model: an `nnx.Module` (or any NNX graph node).
          filter: an nnx filter choosing the Variables to train; `None` means `nnx.Param`.
          wrt: an alias of `filter` (the name `nnx.Optimizer` uses); give one of the two.
          prefix: prepended to every name as is.
          stacked: the stacks of an `nnx.scan` / `nnx.vmap` model: `{path prefix: leading
            stacked axes}` as for `from_pytree`, or the partition name of the stacked axis, as
            given to `nnx.vmap(..., transform_metadata={nnx.PARTITION_NAME: "layers"})`. flax
            writes that name into the `out_sharding` of partitioned Variables only
            (`nnx.with_partitioning`); lrmult finds each stack's path from them (every Variable
            under it is stacked, partitioned or not) and refuses, saying what to declare, where
            they do not decide it.

        Returns:
          A ParamDict whose `tree()` is a pure `nnx.State` (arrays, no Variables):
          `nnx.update(model, params.tree())` writes the values back.

        Example:
          >>> params = lrmult.ParamDict.from_nnx(model, filter=nnx.Param)
          >>> params.select("backbone/").setattr("lr_mult", 0.1)
        """
        if not flax_trees.is_nnx_module(model):
            raise TypeError(f"from_nnx: expected an nnx.Module, got {type(model).__name__}")
        if filter is not None and wrt is not None:
            raise TypeError("from_nnx: give filter= or its alias wrt=, not both")
        wrt = filter if filter is not None else wrt
        wrt = flax_trees.nnx_param_filter() if wrt is None else wrt
        variables = flax_trees.nnx_variables(model, wrt)
        if not variables:
            raise ValueError(f"from_nnx: the model holds no Variable matching filter={wrt!r}")
        for name, var in variables.items():
            value = var.get_value()
            if not isinstance(value, jax.Array | np.ndarray):
                raise TypeError(
                    f"from_nnx: Variable {prefix + name!r} holds a {type(value).__name__}, "
                    f"not an array; narrow filter= to the Variables you train"
                )
        params = cls.from_pytree(flax_trees.nnx_pure_state(model, wrt), prefix=prefix)
        for name, var in variables.items():
            meta = var.get_metadata()
            for attr in _NNX_METADATA:
                if attr in meta:
                    params[prefix + name].assign(attr, meta[attr])  # validated, naming the param
        if isinstance(stacked, str):
            axes = flax_trees.nnx_partition_names(variables)
            leaves = [(prefix + n, params[prefix + n].shape, axes[n]) for n in variables]
            stacked = flax_trees.stacks_by_axis(stacked, leaves, "from_nnx")
        return params.declare_stacks(stacked)

    def _add(self, name: str, param: Parameter) -> None:
        self._index[name] = len(self._params)
        self._params[name] = param

    # -- mapping -------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Parameter:
        try:
            return self._params[name]
        except KeyError:
            raise KeyError(f"no parameter named {name!r}{suggest(name, self._params)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._params)

    def __len__(self) -> int:
        return len(self._params)

    def __contains__(self, name: object) -> bool:
        return name in self._params

    def index(self, name: str) -> int:
        """The position of `name` in this dict (its index for the lookup chain)."""
        if name not in self._index:
            raise KeyError(f"no parameter named {name!r}{suggest(name, self._params)}")
        return self._index[name]

    def copy(self) -> ParamDict:
        """A new ParamDict sharing the same Parameters (and `tree()` structure)."""
        out = ParamDict()
        for name, param in self._params.items():
            out._add(name, param)
        out._structure = self._structure
        out._layers = dict(self._layers)
        return out

    def units(self) -> dict[str, tuple[str, tuple[int, ...] | None]]:
        """`{unit name: (parameter name, layer index or None)}`, in this dict's order.

        A stacked Parameter is one unit per (selected) layer, named as the unstacked model names
        it (`layers/3/attn/kernel`); any other Parameter is one unit under its own name.
        """
        out: dict[str, tuple[str, tuple[int, ...] | None]] = {}
        for name, p in self._params.items():
            if not p.stacked:
                out[name] = (name, None)
                continue
            mask = self._layers.get(name)
            for index in p.slices():
                if mask is None or mask[index]:
                    out[p.layer_name(index)] = (name, index)
        return out

    def gather(
        self, values: Mapping[str, Any], fill: Any
    ) -> dict[str, tuple[Any, np.ndarray | None]]:
        """Values given per unit (see `units`), gathered per Parameter.

        Args:
          values: `{unit name: value}`.
          fill: what a stacked Parameter's array holds at the layers `values` does not name (a
            valid value: those entries are not taken, see `Parameter.assign(layers=...)`).

        Returns:
          `{parameter name: (value, layers)}`: the unit's value and None, or for a stack an array
          over its layers and the mask of the layers `values` names (None when it names all).
        """
        units = self.units()
        out: dict[str, tuple[Any, np.ndarray | None]] = {}
        for unit, value in values.items():
            name, index = units[unit]
            if index is None:
                out[name] = (value, None)
                continue
            if name not in out:
                shape = self._params[name].stack_shape
                out[name] = (np.full(shape, fill, np.asarray(fill).dtype), np.zeros(shape, bool))
            out[name][0][index] = value
            out[name][1][index] = True
        return {
            name: (value, None if layers is None or layers.all() else layers)
            for name, (value, layers) in out.items()
        }

    def layers_of(self, name: str) -> np.ndarray | None:
        """The mask of the layers of stacked Parameter `name` this dict selects (None: all)."""
        return self._layers.get(name)

    # -- Gluon's operations --------------------------------------------------------------------
    def select(self, pattern: str | re.Pattern[str]) -> ParamDict:
        """A new ParamDict sharing the Parameters whose names `re.match` `pattern`.

        A stacked Parameter is also matched by its per-layer names (`layers/3/attn/kernel`): a
        pattern that matches some layers only selects those layers, which `setattr` then sets.

        Raises:
          ValueError: if the pattern is empty, not a valid regex, or matches no name.
        """
        regex = compile_pattern(pattern, "select")
        out = ParamDict()
        for name, param in self._params.items():
            mine = self._layers.get(name)
            if regex.match(name) and mine is None:
                out._add(name, param)
                continue
            if not param.stacked:
                continue
            mask = np.zeros(param.stack_shape, bool)
            for index in param.slices():
                mask[index] = bool(regex.match(param.layer_name(index)))
            if mine is not None:
                mask &= mine
            if mask.any():
                out._add(name, param)
                if not mask.all():
                    out._layers[name] = mask
        if not out:
            names = list(self._params)
            shown = ", ".join(repr(n) for n in names[:8]) + (", ..." if len(names) > 8 else "")
            raise ValueError(
                f"select: pattern {regex.pattern!r} matches no parameter name"
                f"{_select_hint(regex, names)}; names are {shown}"
            )
        return out

    def setattr(self, attr: str, value: Any) -> ParamDict:
        """Set `attr` on every Parameter (Gluon's `ParamDict.setattr`).

        `attr` is `lr_mult`, `wd_mult`, `frozen`, `grad_req` or `decay_to_init`. `None` unsets
        the attribute, so the optimizer's override dicts apply again. On a dict that selects
        some layers of a stack (`params.select("layers/[0-2]/")`), only those layers are set (or
        unset): the others keep what they have, set or not, and an array value is shaped like
        the stacked axes, of which the selected entries are taken (`decay_to_init` is set for
        whole Parameters only). The value is checked before any Parameter changes. Returns this
        dict, for chaining.
        """
        if attr not in ATTRIBUTES:
            raise AttributeError(
                f"setattr: unknown attribute {attr!r}{suggest(attr, ATTRIBUTES)}; "
                f"settable attributes are {', '.join(ATTRIBUTES)}"
            )
        where = f"ParamDict.setattr({attr!r})"
        if value is not None:
            if attr == "grad_req":
                check_grad_req(value, where)
            elif attr == "frozen":
                check_frozen(value, where)
            elif attr == "decay_to_init":
                check_decay_to_init(value, where)
            else:
                check_multiplier(attr, value, where)
        elif attr == "grad_req":
            raise ValueError("setattr: grad_req must be 'write' or 'null', got None")
        plans = [
            (param, *param.planned(attr, value, layers=self._layers.get(name)))
            for name, param in self._params.items()
        ]
        for param, planned_attr, setting in plans:  # grad_req comes back as frozen
            param.put(planned_attr, setting)
        return self

    def update(self, other: Mapping[str, Parameter]) -> None:
        """Merge `other` into this dict by reference (Gluon's `ParameterDict.update`).

        Raises:
          ValueError: a name present in both dicts with different Parameter objects; nothing is
            merged then.
        """
        if not isinstance(other, Mapping):
            raise TypeError(
                f"update: expected a ParamDict or a mapping, got {type(other).__name__}"
            )
        for name, param in other.items():
            if not isinstance(name, str):
                raise TypeError(f"update: parameter names must be str, got {name!r}")
            if not isinstance(param, Parameter):
                raise TypeError(
                    f"update: {name!r} maps to a {type(param).__name__}, not a lrmult.Parameter"
                )
            if param.name is not None and param.name != name:
                raise ValueError(
                    f"update: the Parameter named {param.name!r} is stored under key {name!r}"
                )
            mine = self._params.get(name)
            if mine is not None and mine is not param:
                raise ValueError(
                    f"update: {name!r} names a different Parameter in each dict; rename one "
                    f"(from_pytree(..., prefix=...)) or share the same Parameter object"
                )
        new_names = [n for n in other if n not in self._params]
        if new_names:
            nest(list(self._params) + new_names)  # a name that is also a prefix: refuse now
        added = False
        for name, param in other.items():
            if name not in self._params:
                if param.name is None:
                    param.name = name
                self._add(name, param)
                added = True
        if added:
            self._structure = None

    # -- values ----------------------------------------------------------------------------------
    def structure(self) -> tuple[Any, list[str]]:
        """`(treedef, names in leaf order)` of `tree()`."""
        if self._structure is None:
            self._structure = nest(list(self._params))
        return self._structure

    def tree(self) -> Any:
        """The current values, in the structure the dict was built from.

        A dict built by `from_pytree` gives back that tree's structure; a merged or selected dict
        nests by splitting names on `/`.
        """
        treedef, order = self.structure()
        return jax.tree.unflatten(treedef, [self._params[n].data() for n in order])

    def arrays(self) -> dict[str, jax.Array]:
        """`{name: value}` in this dict's order."""
        return {name: p.data() for name, p in self._params.items()}

    # -- checkpoints ------------------------------------------------------------------------------
    def describe(self) -> list[dict[str, Any]]:
        """Each parameter's name, shape, dtype and raw metadata (set or unset), as JSON data."""

        def plain(v: Any) -> Any:
            return v.tolist() if isinstance(v, np.ndarray) else v

        return [
            {
                "name": n,
                "shape": list(p.shape),
                "dtype": str(p.dtype),
                **{k: plain(v) for k, v in p.metadata().items()},
            }
            for n, p in self._params.items()
        ]

    def check_matches(self, saved: list[dict[str, Any]], where: str) -> None:
        """Raise unless `saved` (from `describe`) has exactly these names, shapes and dtypes.

        Args:
          saved: what `describe()` returned for the saved dict.
          where: how the message names the checkpoint.

        Raises:
          ValueError: naming the first mismatch.
        """
        names = list(self._params)
        saved_names = [d["name"] for d in saved]
        for i, (mine, theirs) in enumerate(zip(names, saved_names, strict=False)):
            if mine != theirs:
                raise ValueError(
                    f"{where} does not match: parameter {i} is {mine!r} here and {theirs!r} in "
                    f"the checkpoint"
                )
        if len(names) != len(saved_names):
            extra = (names[len(saved_names) :] or saved_names[len(names) :])[0]
            side = "here only" if len(names) > len(saved_names) else "in the checkpoint only"
            raise ValueError(f"{where} does not match: parameter {extra!r} is {side}")
        for d in saved:
            p = self._params[d["name"]]
            if list(p.shape) != list(d["shape"]):
                raise ValueError(
                    f"{where} does not match: {d['name']!r} has shape {p.shape} here and "
                    f"{tuple(d['shape'])} in the checkpoint"
                )
            if str(p.dtype) != d["dtype"]:
                raise ValueError(
                    f"{where} does not match: {d['name']!r} has dtype {p.dtype} here and "
                    f"{d['dtype']} in the checkpoint"
                )

    def match_report(self, saved: list[dict[str, Any]]) -> tuple[list[LoadRow], set[str]]:
        """How `saved` (from `describe`) maps onto this dict, parameter by parameter, by name.

        Returns:
          `(rows, restored names)`: a row per parameter here or in `saved`, with its status
          (`restored`, `fresh`, `reset`, `dropped`) and the reason.
        """
        by_name = {d["name"]: d for d in saved}
        rows, kept = [], set()
        for name, p in self._params.items():
            d = by_name.get(name)
            if d is None:
                rows.append(LoadRow(name, "fresh", "not in the checkpoint"))
            elif tuple(d["shape"]) != p.shape or d["dtype"] != str(p.dtype):
                rows.append(
                    LoadRow(
                        name,
                        "reset",
                        f"saved as {tuple(d['shape'])} {d['dtype']}, now {p.shape} {p.dtype}",
                    )
                )
            else:
                rows.append(LoadRow(name, "restored", "same name, shape and dtype"))
                kept.add(name)
        for name in by_name:
            if name not in self._params:
                rows.append(LoadRow(name, "dropped", "not in this model"))
        return rows, kept

    def save(self, path: str | os.PathLike) -> None:
        """Save the values with orbax (a new step in the checkpoint directory at `path`).

        With several processes (`jax.distributed`), every process calls `save` with the same
        global arrays; orbax writes each process's shards.
        """
        arrays = {n: p.peek() for n, p in self._params.items()}
        checkpoint.write(path, _PARAMS_FORMAT, arrays, {"params": self.describe()})

    def load(self, path: str | os.PathLike, strict: bool = True) -> Table | None:
        """Load the latest values saved at `path`, placed as the current values are.

        Each value comes back with its current sharding, also from a checkpoint that other
        processes or devices wrote; with several processes, every process calls `load`.

        Args:
          path: the checkpoint directory.
          strict: names, shapes and dtypes must match exactly; False loads by name what
            matches and leaves the rest as it is.

        Returns:
          With `strict=False`, a report: one row per parameter (restored / fresh / reset /
          dropped) with the reason.
        """
        if not isinstance(strict, bool):
            raise TypeError(f"load: strict must be True or False, got {strict!r}")
        meta, arrays = checkpoint.read(path, _PARAMS_FORMAT)
        if strict:
            self.check_matches(meta["params"], f"checkpoint {os.fspath(path)!r}")
        rows, kept = self.match_report(meta["params"])
        values = arrays({n: p.peek() for n, p in self._params.items() if n in kept})
        for name, p in self._params.items():
            if name in kept:
                p.set_data(values[name])
        return None if strict else Table(rows, title=f"ParamDict.load({os.fspath(path)!r})")

    # -- display -----------------------------------------------------------------------------------
    def table(self) -> Table:
        """The parameters as a table; `-` marks an attribute (or a stack's layer) left unset."""
        rows = [
            ParamRow(
                i,
                name,
                p.shape,
                str(p.dtype),
                p.shown("lr_mult"),
                p.shown("wd_mult"),
                p.shown("frozen"),
                p.shown("decay_to_init"),
            )
            for i, (name, p) in enumerate(self._params.items())
        ]
        return Table(rows, columns=ParamRow._fields, title=f"ParamDict ({len(rows)} parameters)")

    def __repr__(self) -> str:
        return str(self.table())

    def _repr_html_(self) -> str:
        return self.table()._repr_html_()
