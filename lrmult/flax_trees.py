"""How flax's trees look to lrmult: Linen metadata boxes and NNX Variables, seen through.

flax is only imported when a tree may hold its objects (it is already in `sys.modules`), so
`import lrmult` stays light and plain-JAX users never load flax.
"""

from __future__ import annotations

import sys
from typing import Any

import jax

from lrmult._names import path_name, suggest


def has_boxes(tree: Any) -> bool:
    """Whether `tree` holds Linen metadata boxes (`flax.core.meta.AxisMetadata`)."""
    meta = sys.modules.get("flax.core.meta")
    if meta is None:
        return False

    def is_box(x: Any) -> bool:
        return isinstance(x, meta.AxisMetadata)

    return any(is_box(x) for x in jax.tree.leaves(tree, is_leaf=is_box))


def boxed_leaves(tree: Any) -> tuple[list[str], Any, Any]:
    """`(names stopping at each box, the boxed treedef, the unboxed tree)` of Linen params.

    Raises:
      ValueError: a box holds more than one array.
    """
    from flax.core import meta

    def is_box(x: Any) -> bool:
        return isinstance(x, meta.AxisMetadata)

    boxed = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_box)[0]
    treedef = jax.tree.structure(tree)
    if treedef.num_leaves != len(boxed):
        raise ValueError(
            "from_linen: a metadata box holds more than one array; unbox the tree first "
            "(flax.core.meta.unbox) and use ParamDict.from_pytree"
        )
    return [path_name(path) for path, _ in boxed], treedef, meta.unbox(tree)


def nnx_variables(model: Any, wrt: Any) -> dict[str, Any]:
    """`{name: Variable}` of the `wrt` Variables of an NNX module (the model's own objects)."""
    from flax import nnx

    state = nnx.state(model, wrt)
    flat = jax.tree_util.tree_flatten_with_path(
        state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )[0]
    return {path_name(path): var for path, var in flat}


def is_nnx_module(model: Any) -> bool:
    """Whether `model` is an NNX graph node (`nnx.Pytree`, the base of `nnx.Module`)."""
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(model, nnx.Pytree)


def nnx_pure_state(model: Any, wrt: Any) -> Any:
    """`nnx.as_pure(nnx.state(model, wrt))`: the arrays of the Variables, in an `nnx.State`."""
    from flax import nnx

    return nnx.as_pure(nnx.state(model, wrt))


def nnx_param_filter() -> Any:
    """`nnx.Param`, the default filter of the Variables to train."""
    from flax import nnx

    return nnx.Param


def unbox_variables(tree: Any, is_leaf: Any = None) -> Any:
    """`tree` with NNX Variables replaced by their values (a no-op when flax is not loaded).

    `nnx.Optimizer` calls `init` on an `nnx.State` of `Param`s: the lookup chain must name
    `l1/kernel` (not `l1/kernel/value`), and per-leaf scalars (multipliers, step counts) must not
    come back wrapped in the parameter's Variable, whose sharding metadata does not fit a scalar.
    """
    variablelib = sys.modules.get("flax.nnx.variablelib")
    if variablelib is None:
        return tree
    var = variablelib.Variable
    return jax.tree.map(
        lambda x: x.get_value() if isinstance(x, var) else x,
        tree,
        is_leaf=lambda x: isinstance(x, var) or (is_leaf is not None and is_leaf(x)),
    )


# -- stacked axes named in flax's partitioning metadata -------------------------------------------
# `nnx.vmap` / `nnx.scan(transform_metadata={nnx.PARTITION_NAME: name})` and Linen's
# `nn.scan(metadata_params={nn.PARTITION_NAME: name})` insert `name` into the partition names of
# the Variables / boxes that have partition names (`out_sharding`, `nn.Partitioned.names`), at the
# position of the new axis. Variables created without partitioning get nothing: the name marks
# some of a stack's parameters, never the stack's path. `stacks_by_axis` infers the path from the
# marked parameters and the shapes around them, and refuses where they do not decide it.

_NNX_NAME_KEYS = ("out_sharding", "sharding_names", "sharding")


def linen_partition_names(tree: Any) -> dict[str, tuple | None]:
    """`{name: partition names or None}` of Linen params (names stop at the boxes)."""
    meta = sys.modules.get("flax.core.meta")

    def is_box(x: Any) -> bool:
        return meta is not None and isinstance(x, meta.AxisMetadata)

    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_box)[0]
    return {path_name(path): _names(getattr(x, "names", None)) for path, x in flat}


def nnx_partition_names(variables: dict[str, Any]) -> dict[str, tuple | None]:
    """`{name: partition names or None}` of NNX Variables (their `out_sharding` metadata)."""
    out = {}
    for name, var in variables.items():
        meta = var.get_metadata()
        out[name] = next((_names(meta[k]) for k in _NNX_NAME_KEYS if meta.get(k)), None)
    return out


def _names(names: Any) -> tuple | None:
    if names is None or isinstance(names, str):
        return None
    try:
        return tuple(names)
    except TypeError:
        return None


def stacks_by_axis(
    axis: str, leaves: list[tuple[str, tuple[int, ...], tuple | None]], where: str
) -> dict[str, int]:
    """The stacks whose stacked axis has the partition name `axis`, as `{path prefix: 1}`.

    The parameters whose partition names hold `axis` (it must be their first axis) are marked.
    A stack's path is the common path of its marked parameters; every parameter under it is
    stacked (a vmapped module stacks all its parameters, partitioned or not), so each must have
    the same number of layers. Marked parameters that do not fit one stack are split by path.
    The path is refused when what lies beside it could belong to the stack too (unmarked
    parameters of the same leading size): the per-layer names would then be ambiguous.

    Args:
      axis: the partition name (`nnx.PARTITION_NAME` / `nn.PARTITION_NAME`) of the stacked axis.
      leaves: `(name, shape, partition names or None)` of every parameter, in order.
      where: the caller, for messages.

    Returns:
      `{path prefix: 1}` for `ParamDict.declare_stacks`.

    Raises:
      ValueError: no parameter is marked, a marked one has the axis elsewhere than first, or
        the marked parameters do not decide the stacks' paths; the message says what to declare.
    """
    if not isinstance(axis, str) or not axis:
        raise TypeError(f"{where}: stacked must be a dict prefix -> axes or a partition name")
    info = {name: (tuple(shape), names) for name, shape, names in leaves}
    marked = []
    for name, (shape, names) in info.items():
        if names is None or axis not in names:
            continue
        if names.index(axis) != 0 or not shape:
            raise ValueError(
                f"{where}: stacked={axis!r}: parameter {name!r} of shape {shape} has {axis!r} "
                f"at position {names.index(axis)} of its partition names {names}; stacked axes "
                f"must come first (nnx.vmap / nnx.scan out_axes=0, nn.scan variable_axes="
                f"{{'params': 0}}); if {axis!r} is a sharding axis, give the partition name the "
                f"scan was given"
            )
        marked.append(name)
    if not marked:
        seen = {n for _, names in info.values() for n in names or () if isinstance(n, str)}
        raise ValueError(
            f"{where}: stacked={axis!r}: no parameter's partition names hold {axis!r}"
            f"{suggest(axis, seen)}. flax records a stacked axis's name (NNX transform_metadata="
            f"{{nnx.PARTITION_NAME: {axis!r}}}, Linen nn.scan metadata_params="
            f"{{nn.PARTITION_NAME: {axis!r}}}) only on parameters created with partitioning "
            f"(nnx.with_partitioning, nn.with_partitioning, sharding metadata); declare the stack "
            f"by its path instead: stacked={{'layers': 1}}"
        )

    def parts(name: str) -> list[str]:
        return name.split("/")

    def under(prefix: list[str], name: str) -> bool:
        p = parts(name)
        return len(p) > len(prefix) and p[: len(prefix)] == prefix

    def fits(name: str, size: int) -> bool:
        shape, names = info[name]
        return bool(shape) and shape[0] == size and (names is None or axis in names)

    def shown(name: str) -> str:
        shape, names = info[name]
        return f"{name!r} (shape {shape}, partition names {names})"

    stacks: dict[str, int] = {}

    def place(group: list[str]) -> None:
        modules = [parts(n)[:-1] for n in group]
        prefix = []
        for level in zip(*modules, strict=False):
            if len(set(level)) > 1:
                break
            prefix.append(level[0])
        sizes = {info[n][0][0] for n in group}
        size = min(sizes)
        inside = [n for n in info if under(prefix, n)]
        misfit = next((n for n in inside if len(sizes) > 1 or not fits(n, size)), None)
        if misfit is None and prefix:
            stacks["/".join(prefix)] = 1
            check_boundary(prefix, size)
            return
        direct = [n for n, m in zip(group, modules, strict=True) if len(m) == len(prefix)]
        if direct:
            culprit = misfit if misfit is not None else direct[0]
            raise ValueError(
                f"{where}: stacked={axis!r}: the parameters marked {axis!r} do not make stacks "
                f"that lrmult can tell apart: {shown(culprit)} lies among them under "
                f"{'/'.join(prefix) or 'the root'!r}; declare the stacks by path: "
                f"stacked={{'layers': 1}}"
            )
        children: dict[str, list[str]] = {}
        for n in group:
            children.setdefault(parts(n)[len(prefix)], []).append(n)
        for child in children.values():
            place(child)

    def check_boundary(prefix: list[str], size: int) -> None:
        parent = prefix[:-1]
        beside = [n for n in info if under(parent, n) and not under(prefix, n)]
        if beside and all(fits(n, size) for n in beside):
            path, up = "/".join(prefix), "/".join(parent)
            raise ValueError(
                f"{where}: stacked={axis!r}: the parameters marked {axis!r} lie under {path!r}, "
                f"but {shown(beside[0])} beside it has {size} layers too and may belong to the "
                f"same stack{f' (starting at {up!r})' if up else ''}: the per-layer names would "
                f"be ambiguous. Declare the stack by path: stacked={{{path!r}: 1}}"
                + (f" or stacked={{{up!r}: 1}}" if up else "")
            )

    place(marked)
    return stacks
