"""How flax's trees look to lrmult: Linen metadata boxes and NNX Variables, seen through.

flax is only imported when a tree may hold its objects (it is already in `sys.modules`), so
`import lrmult` stays light and plain-JAX users never load flax.
"""

from __future__ import annotations

import sys
from typing import Any

import jax

from lrmult._names import path_name


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
