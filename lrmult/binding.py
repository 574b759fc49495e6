"""`Binding`: keeps an optimizer state in step with the ParamDict it was built from.

Most JAX code steps an optax state inside its own jitted function (flax `TrainState`,
`nnx.Optimizer`, a hand-written step): lrmult's Python never runs there, but JAX flattens the
state at every call. A state built from a ParamDict carries one `Binding` per node, the one live
link a state holds: it watches the ParamDict's Parameters (a `ChangeLog`, weakly held by them)
and holds the ParamDict weakly, so it keeps nothing alive. When JAX flattens the state:

- multipliers: the Binding hands JAX the current multipliers (recomputed once per change, as
  arrays of the same shape, dtype and placement): a changed `lr_mult` applies at the next step,
  without a recompile and without a call to `refresh`;
- the frozen set: a change gives the node a different static fingerprint, so the user's jitted
  step retraces, and the update raises, before updating, naming the changed parameter and the call
  that rebuilds the state's structure (`lrmult.refresh`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from typing import Any

from lrmult import lookup
from lrmult.parameter import ChangeLog


def binder(param_dict: Mapping[str, Any] | None, track: bool) -> Callable[..., Binding | None]:
    """`bind(leaves)` for one transformation: one Binding per tree of leaves it is inited on.

    Every `init` on the same leaves gets the same Binding, so eager, jitted and `eval_shape`
    inits give equal tree structures; `bind` gives None when the transformation does not track.
    """
    made: dict[tuple[lookup.Leaf, ...], Binding] = {}

    def bind(leaves: tuple[lookup.Leaf, ...]) -> Binding | None:
        if not track or param_dict is None:
            return None
        if leaves not in made:
            made[leaves] = Binding(param_dict, leaves)
        return made[leaves]

    return bind


class Binding:
    """The live link from one state node to its ParamDict (compared by identity).

    Args:
      param_dict: the ParamDict the state was built from (held weakly).
      leaves: the leaves of the tree the state was built on.
    """

    __slots__ = ("_param_dict", "_log", "leaves", "version", "_cache", "__weakref__")

    def __init__(self, param_dict: Mapping[str, Any], leaves: tuple[lookup.Leaf, ...]) -> None:
        self._param_dict = weakref.ref(param_dict)
        self._log = ChangeLog()
        for leaf in leaves:
            param = param_dict.get(leaf.name)
            if param is not None:
                param.watch(self._log)
        self.leaves = leaves
        # Bumped whenever the watched Parameters' metadata changed since it was last read.
        self.version = 0
        self._cache: dict[Any, Any] = {}

    @property
    def param_dict(self) -> Mapping[str, Any] | None:
        """The ParamDict, or None once it is gone (the state then keeps what it holds)."""
        return self._param_dict()

    def current(
        self, compute: Callable[[Mapping[str, Any]], Any], held: Any, key: Any = None
    ) -> Any:
        """`compute(param_dict)` as of the latest metadata change, computed once per change.

        Args:
          compute: what the node derives from the ParamDict (its multipliers, its frozen mask).
          held: returned when the ParamDict is gone.
          key: what else the result depends on (the node's structure), for the cache.
        """
        if self._log.metadata:
            self._log.clear()
            self.version += 1
            self._cache = {}
        pd = self._param_dict()
        if pd is None:
            return held
        if key not in self._cache:
            self._cache[key] = compute(pd)
        return self._cache[key]

    def changed(self) -> bool:
        """Whether the watched Parameters' metadata changed since the last `current`."""
        return bool(self._log.metadata)

    def __repr__(self) -> str:
        return f"Binding({len(self.leaves)} leaves, version {self.version})"
