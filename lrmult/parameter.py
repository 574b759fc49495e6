"""`Parameter`: one named array with Gluon's per-parameter training metadata."""

from __future__ import annotations

import math
import weakref
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lrmult._names import suggest

MULTIPLIERS = ("lr_mult", "wd_mult")
ATTRIBUTES = ("lr_mult", "wd_mult", "frozen", "grad_req")
_GRAD_REQS = {"null": True, "write": False}
FLOAT32_MAX = float(np.finfo(np.float32).max)


class ChangeLog:
    """What changed on the Parameters one owner watches (a Trainer keeps one).

    Gluon keeps a reference from each Parameter to its Trainer; here each Parameter keeps weak
    references to the logs watching it, so a change reaches only the owners of that Parameter and
    two unrelated Trainers never see each other's changes.

    Attributes:
      metadata: names of the watched Parameters whose lr_mult / wd_mult / frozen changed.
      values: names of the watched Parameters whose value was replaced or handed out.
    """

    __slots__ = ("metadata", "values", "__weakref__")

    def __init__(self) -> None:
        self.metadata: set[str] = set()
        self.values: set[str] = set()

    def clear(self) -> None:
        """Forget what changed (the owner has taken it in)."""
        self.metadata.clear()
        self.values.clear()


def _describe(name: str | None) -> str:
    return f"parameter {name!r}" if name is not None else "parameter (unnamed)"


def check_multiplier(attr: str, value: Any, name: str | None) -> float:
    """Validate a multiplier value: a finite real number >= 0 (bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        if isinstance(value, (jax.Array, np.ndarray)) and np.ndim(value) == 0:
            value = float(value)
        else:
            raise ValueError(
                f"{_describe(name)}: {attr} must be a finite number >= 0, "
                f"got {value!r} of type {type(value).__name__}"
            )
    try:
        value = float(value)
    except OverflowError:
        raise ValueError(
            f"{_describe(name)}: {attr} must be a finite number >= 0, got an int too large "
            f"for a float"
        ) from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{_describe(name)}: {attr} must be a finite number >= 0, got {value!r}")
    if value > FLOAT32_MAX:
        raise ValueError(
            f"{_describe(name)}: {attr}={value!r} exceeds float32's range ({FLOAT32_MAX:.4g}), "
            f"in which the optimizer state holds it"
        )
    return value


def check_frozen(value: Any, name: str | None) -> bool:
    """Validate a frozen flag: True or False (NumPy bools too)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(
            f"{_describe(name)}: frozen must be True or False, got {value!r} "
            f"(use grad_req='null'/'write' for Gluon's spelling)"
        )
    return bool(value)


def check_grad_req(value: Any, name: str | None) -> bool:
    """Translate Gluon's grad_req into a frozen flag."""
    if value not in _GRAD_REQS:
        hint = (
            " (gradient accumulation: wrap the optimizer in optax.MultiSteps, e.g. "
            "Trainer(params, optax.MultiSteps(optax.adam(1e-3), every_k_schedule=4)))"
            if value == "add"
            else ""
        )
        raise ValueError(
            f"{_describe(name)}: grad_req must be 'write' or 'null', got {value!r}{hint}"
        )
    return _GRAD_REQS[value]


def _as_array(value: Any, name: str | None) -> jax.Array:
    if isinstance(value, jax.Array):
        # A weakly typed value (jnp.full(n, 2.0)) would come back from the jitted step strongly
        # typed, and the second step would recompile: make it strong now.
        return jnp.asarray(value, dtype=value.dtype) if value.weak_type else value
    if isinstance(value, (np.ndarray, np.generic, float, int)) and not isinstance(value, bool):
        return jnp.asarray(value)
    raise TypeError(
        f"{_describe(name)}: value must be a jax.Array (or a NumPy array / Python number), "
        f"got {type(value).__name__}"
    )


class Parameter:
    """A named array with `lr_mult`, `wd_mult` and `frozen`, as in Gluon's `Parameter`.

    Metadata is plain host-side state, read by the optimizer at every step. An attribute left as
    `None` is *unset*: it reads as 1.0 / 1.0 / False, and lets the optimizer's override dicts
    (`set_lr_mult`, `set_wd_mult`) act on this parameter.

    Args:
      value: the array (a `jax.Array`; NumPy arrays and Python numbers are converted).
      name: the parameter's name; a `ParamDict` gives it its key when left `None`.
      lr_mult: learning-rate multiplier, a finite float >= 0, or `None` (unset).
      wd_mult: weight-decay multiplier, a finite float >= 0, or `None` (unset).
      frozen: `True` excludes the parameter from training entirely (no gradient, no optimizer
        state, no weight decay); `None` is unset.

    Example:
      >>> p = Parameter(jnp.zeros(3), name="bias", wd_mult=0.0)
      >>> p.grad_req = "null"      # Gluon's spelling of p.frozen = True
    """

    __slots__ = (
        "_value",
        "_name",
        "_lr_mult",
        "_wd_mult",
        "_frozen",
        "_donatable",
        "_origin",
        "_logs",
        "_reported",
    )

    def __init__(
        self,
        value: Any,
        *,
        name: str | None = None,
        lr_mult: float | None = None,
        wd_mult: float | None = None,
        frozen: bool | None = None,
    ) -> None:
        if name is not None and not isinstance(name, str):
            raise TypeError(f"Parameter name must be a str, got {type(name).__name__}")
        # Validate everything before assigning anything.
        value = _as_array(value, name)
        lr = None if lr_mult is None else check_multiplier("lr_mult", lr_mult, name)
        wd = None if wd_mult is None else check_multiplier("wd_mult", wd_mult, name)
        fz = None if frozen is None else check_frozen(frozen, name)
        self._name = name
        self._value = value
        self._lr_mult = lr
        self._wd_mult = wd
        self._frozen = fz
        # Only arrays a Trainer produced may be donated to its jitted step; user arrays stay valid.
        self._donatable = False
        # attr -> what set it, when not the user directly (a preset): explain() shows it.
        self._origin: dict[str, str] = {}
        self._logs: weakref.WeakSet[ChangeLog] = weakref.WeakSet()
        # (attr, override key) whose shadowing by this Parameter's setting was reported.
        self._reported: set[tuple[str, Any]] = set()

    # -- value -------------------------------------------------------------------------------
    @property
    def name(self) -> str | None:
        """The parameter's name (a ParamDict names an unnamed Parameter once, when adding it)."""
        return self._name

    @name.setter
    def name(self, value: str) -> None:
        if self._name is not None:
            raise AttributeError(f"{_describe(self._name)}: a Parameter's name cannot change")
        if not isinstance(value, str):
            raise TypeError(f"Parameter name must be a str, got {type(value).__name__}")
        self._name = value

    @property
    def shape(self) -> tuple[int, ...]:
        """The value's shape."""
        return tuple(self._value.shape)

    @property
    def dtype(self) -> np.dtype:
        """The value's dtype."""
        return self._value.dtype

    def data(self) -> jax.Array:
        """The current value. It stays valid after later training steps."""
        if self._donatable:
            self._donatable = False
            self._noted("values")
        return self._value

    def set_data(self, value: Any) -> None:
        """Replace the value; the shape and dtype must stay the same."""
        value = _as_array(value, self._name)
        self.check_like(value, f"{_describe(self._name)}: set_data")
        self._value = value
        self._donatable = False
        self._noted("values")

    def peek(self) -> jax.Array:
        """The current value, for lrmult's own readers.

        Unlike `data()` it is not handed out, so a Trainer may still donate it when `donatable`.
        Never give it to user code.
        """
        return self._value

    @property
    def donatable(self) -> bool:
        """Whether the value was produced by a training step and never handed out since."""
        return self._donatable

    def set_trained(self, value: jax.Array, log: ChangeLog | None = None) -> None:
        """Take a value produced by a training step (no checks: the step kept shape and dtype).

        Args:
          value: the new value, owned by lrmult until handed out by `data()`.
          log: the writer's own log, which is not told (it knows); every other owner is.
        """
        self._value = value
        self._donatable = True
        for other in self._logs:
            if other is not log:
                other.values.add(self._name)

    def first_report(self, attr: str, key: Any) -> bool:
        """True the first time it is asked about `(attr, key)` since `attr` was last set.

        An override `key` that this Parameter's `attr` shadows is reported once per setting.
        """
        if (attr, key) in self._reported:
            return False
        self._reported.add((attr, key))
        return True

    def watch(self, log: ChangeLog) -> None:
        """Report this Parameter's changes to `log` (held weakly)."""
        self._logs.add(log)

    def _noted(self, kind: str) -> None:
        for log in self._logs:
            getattr(log, kind).add(self._name)

    def check_like(self, value: Any, what: str) -> None:
        """Raise unless `value` has this parameter's shape and dtype; `what` starts the message."""
        if tuple(value.shape) != self.shape:
            raise ValueError(f"{what} expects shape {self.shape}, got {tuple(value.shape)}")
        if value.dtype != self.dtype:
            raise ValueError(
                f"{what} expects dtype {self.dtype}, got {value.dtype} (cast it first, e.g. "
                f"value.astype({str(self.dtype)!r}))"
            )

    # -- metadata ----------------------------------------------------------------------------
    @property
    def lr_mult(self) -> float:
        """Learning-rate multiplier (1.0 when unset); assign None or `del` to unset it."""
        return 1.0 if self._lr_mult is None else self._lr_mult

    @lr_mult.setter
    def lr_mult(self, value: float | None) -> None:
        self.assign("lr_mult", value)

    @lr_mult.deleter
    def lr_mult(self) -> None:
        self.assign("lr_mult", None)

    @property
    def wd_mult(self) -> float:
        """Weight-decay multiplier (1.0 when unset); assign None or `del` to unset it."""
        return 1.0 if self._wd_mult is None else self._wd_mult

    @wd_mult.setter
    def wd_mult(self, value: float | None) -> None:
        self.assign("wd_mult", value)

    @wd_mult.deleter
    def wd_mult(self) -> None:
        self.assign("wd_mult", None)

    @property
    def frozen(self) -> bool:
        """Whether the parameter is excluded from training (False when unset)."""
        return bool(self._frozen)

    @frozen.setter
    def frozen(self, value: bool | None) -> None:
        self.assign("frozen", value)

    @frozen.deleter
    def frozen(self) -> None:
        self.assign("frozen", None)

    @property
    def grad_req(self) -> str:
        """Gluon's alias of `frozen`: `'null'` is frozen, `'write'` is trainable."""
        return "null" if self.frozen else "write"

    @grad_req.setter
    def grad_req(self, value: str) -> None:
        self.assign("grad_req", value)

    def assign(self, attr: str, value: Any, origin: str | None = None) -> None:
        """Set (or, with `None`, unset) `attr`, validated before anything changes.

        Args:
          attr: `lr_mult`, `wd_mult`, `frozen` or `grad_req`.
          value: the new value, or `None` to unset it.
          origin: what set it when not the user directly (a preset's name), shown by `explain()`.
        """
        if attr == "grad_req":
            if value is None:
                raise ValueError(f"{_describe(self._name)}: grad_req must be 'write' or 'null'")
            attr, value = "frozen", check_grad_req(value, self._name)
        elif value is None:
            pass
        elif attr == "frozen":
            value = check_frozen(value, self._name)
        elif attr in MULTIPLIERS:
            value = check_multiplier(attr, value, self._name)
        else:
            raise AttributeError(
                f"{_describe(self._name)}: unknown attribute {attr!r}{suggest(attr, ATTRIBUTES)}"
            )
        setattr(self, "_" + attr, value)
        self._reported = {r for r in self._reported if r[0] != attr}
        if origin is None or value is None:
            self._origin.pop(attr, None)
        else:
            self._origin[attr] = origin
        self._noted("metadata")

    def origin(self, attr: str) -> str | None:
        """What set `attr` (`'param'` for the user, a preset's name), or None if unset."""
        if not self.is_set(attr):
            return None
        return self._origin.get(attr, "param")

    def is_set(self, attr: str) -> bool:
        """Whether `attr` (`lr_mult`, `wd_mult` or `frozen`) was set on this parameter."""
        if attr == "grad_req":
            attr = "frozen"
        if attr not in ("lr_mult", "wd_mult", "frozen"):
            raise AttributeError(
                f"{_describe(self._name)}: unknown attribute {attr!r}{suggest(attr, ATTRIBUTES)}"
            )
        return getattr(self, "_" + attr) is not None

    def metadata(self) -> dict[str, Any]:
        """The raw (possibly unset) metadata and what set it, for checkpoints."""
        return {
            "lr_mult": self._lr_mult,
            "wd_mult": self._wd_mult,
            "frozen": self._frozen,
            "origin": dict(self._origin),
        }

    def restore_metadata(self, raw: dict[str, Any]) -> None:
        """Put back what `metadata()` returned (no validation: it came from this class)."""
        self._lr_mult, self._wd_mult, self._frozen = raw["lr_mult"], raw["wd_mult"], raw["frozen"]
        self._origin = dict(raw.get("origin", {}))
        self._noted("metadata")

    def __repr__(self) -> str:
        parts = [f"name={self._name!r}", f"shape={self.shape}", f"dtype={self.dtype}"]
        for attr in ("lr_mult", "wd_mult", "frozen"):
            if self.is_set(attr):
                parts.append(f"{attr}={getattr(self, attr)!r}")
        return f"Parameter({', '.join(parts)})"
