"""Names of pytree leaves: key paths joined with `/`, close-match suggestions, nesting by name."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from typing import Any

import jax


def path_name(path: Sequence[Any]) -> str:
    """`(DictKey('encoder'), SequenceKey(0), DictKey('kernel'))` -> `'encoder/0/kernel'`."""
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def suggest(key: Any, candidates: Iterable[str]) -> str:
    """A ' (did you mean ...?)' hint for a key that names nothing, or ''."""
    close = difflib.get_close_matches(str(key), list(candidates), n=3, cutoff=0.5)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"


def nest(names: Sequence[str]) -> tuple[Any, list[str]]:
    """The tree structure that nests `names` by splitting on `/`, and its leaf order.

    A level whose keys are exactly `0..n-1` becomes a list, so `layers/0/kernel` nests as
    `{'layers': [{'kernel': ...}]}`.

    Returns:
      `(treedef, order)`: `jax.tree.unflatten(treedef, [values[n] for n in order])` builds the tree.
    """
    root: dict[str, Any] = {}
    for name in names:
        parts = name.split("/")
        node = root
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(
                    f"parameter names {'/'.join(parts[: i + 1])!r} and {name!r} clash: one is a "
                    f"prefix of the other, so the dict cannot be nested by '/'; rename one"
                )
            node = child
        if parts[-1] in node:
            raise ValueError(
                f"parameter name {name!r} is also a prefix of other names, so the dict cannot be "
                f"nested by '/'; rename one"
            )
        node[parts[-1]] = name

    def listify(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        node = {k: listify(v) for k, v in node.items()}
        if node and sorted(node) == sorted(str(i) for i in range(len(node))):
            return [node[str(i)] for i in range(len(node))]
        return node

    structure = listify(root)
    order, treedef = jax.tree.flatten(structure)
    return treedef, order
