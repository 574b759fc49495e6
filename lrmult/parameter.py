"""`Parameter`: one named array with Gluon's per-parameter training metadata."""

from __future__ import annotations

import math
import weakref
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lrmult import schedules
from lrmult._names import suggest
from lrmult.schedules import Scaled, check_schedule, is_schedule

MULTIPLIERS = ("lr_mult", "wd_mult")
ATTRIBUTES = ("lr_mult", "wd_mult", "frozen", "grad_req", "decay_to_init")
# The attributes a Parameter keeps (grad_req is frozen's alias).
KEPT = ("lr_mult", "wd_mult", "frozen", "decay_to_init")
_GRAD_REQS = {"null": True, "write": False}
FLOAT32_MAX = float(np.finfo(np.float32).max)


class Setting(NamedTuple):
    """One attribute of a Parameter: what it reads as, and who set it.

    Attributes:
      value: the value, or None when the attribute is set nowhere. Where only some layers of a
        stack are set, an array over the stacked axes holding the default (1.0, False) at the
        layers left unset.
      source: None (unset); who set it (`'param'` for the user, a preset's or rule's name); or,
        when the layers of a stack differ, an object array over the stacked axes of those, None
        at the layers left unset (they fall through the lookup chain).
    """

    value: Any
    source: Any


def _show_number(v: Any) -> str:
    return str(v) if isinstance(v, (bool, np.bool_)) else f"{v:.6g}"


class ChangeLog:
    """What changed on the Parameters one owner watches (a Trainer keeps one).

    Gluon keeps a reference from each Parameter to its Trainer; here each Parameter keeps weak
    references to the logs watching it, so a change reaches only the owners of that Parameter and
    two unrelated Trainers never see each other's changes.

    Attributes:
      metadata: names of the watched Parameters whose lr_mult / wd_mult / frozen changed.
      values: names of the watched Parameters whose value was replaced or handed out.
      steps: how many steps the owner has taken (a plan attached to the Parameters must not
        schedule anything before it: `presets.gradual_unfreezing` reads it).
    """

    __slots__ = ("metadata", "values", "steps", "__weakref__")

    def __init__(self) -> None:
        self.metadata: set[str] = set()
        self.values: set[str] = set()
        self.steps = 0

    def clear(self) -> None:
        """Forget what changed (the owner has taken it in)."""
        self.metadata.clear()
        self.values.clear()


class Outputs:
    """The values one training step produced, held once for every Parameter it trained.

    A Trainer attaches its Parameters to one `Outputs` (`Parameter.hold`) and then replaces
    `values` after each step: writing a step's results back costs O(1), not O(parameters).
    Other owners need no word of these steps: the first step after another owner's own step
    (which told this Trainer) attaches again, and that tells them.
    """

    __slots__ = ("values",)

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}


def _describe(name: str | None) -> str:
    return f"parameter {name!r}" if name is not None else "parameter (unnamed)"


def _is_array_like(value: Any) -> bool:
    return isinstance(value, (list, tuple)) or (
        isinstance(value, (jax.Array, np.ndarray)) and np.ndim(value) > 0
    )


def _check_prefix(
    attr: str, shape: tuple[int, ...], value_shape: Any, name: str | None, stacked: int = 0
) -> None:
    """Raise unless an array attribute's shape fits the value.

    It is shaped like the declared stacked axes, or else like leading axes of the value short of
    all of them (per-element multipliers are not a layer's).
    """
    if value_shape is None:
        return
    value_shape = tuple(value_shape)
    ok = (
        shape == value_shape[:stacked]
        if stacked
        else (len(shape) < len(value_shape) and value_shape[: len(shape)] == shape)
    )
    if not ok:
        raise ValueError(
            f"{_describe(name)}: an array {attr} must be shaped like the leading (stacked-layer) "
            f"axes of the value: got shape {shape} for a value of shape {value_shape}"
        )


def check_multiplier(
    attr: str, value: Any, name: str | None, value_shape: Any = None, stacked: int = 0
) -> float | np.ndarray:
    """Validate a multiplier: a number >= 0, an array of them, or a schedule step -> multiplier.

    Numbers are finite and real (bools are refused); a schedule (`lrmult.schedules`, any
    callable) is evaluated at steps 0 and 1 to check it.

    Args:
      attr: `lr_mult` or `wd_mult`, for the message.
      value: the multiplier; an array applies per slice of the leading axes of the value.
      name: the parameter's name, for the message.
      value_shape: the parameter's shape, which an array's shape must be a prefix of.
      stacked: the parameter's declared stacked axes; an array is then shaped like them.

    Returns:
      A float, or a read-only float64 array.
    """
    if is_schedule(value):
        shape = () if value_shape is None else tuple(value_shape)[:stacked]
        return check_schedule(attr, value, _describe(name), shape)
    if _is_array_like(value):
        arr = np.asarray(value)
        if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.number):
            raise ValueError(
                f"{_describe(name)}: {attr} must hold finite numbers >= 0, got dtype {arr.dtype}"
            )
        _check_prefix(attr, tuple(arr.shape), value_shape, name, stacked)
        arr = arr.astype(np.float64)
        if not np.all(np.isfinite(arr)) or np.any(arr < 0):
            raise ValueError(
                f"{_describe(name)}: {attr} must hold finite numbers >= 0, got {arr.tolist()!r}"
            )
        if np.any(arr > FLOAT32_MAX):
            raise ValueError(
                f"{_describe(name)}: {attr} exceeds float32's range ({FLOAT32_MAX:.4g}), in which "
                f"the optimizer state holds it"
            )
        arr.flags.writeable = False
        return arr
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


def check_frozen(
    value: Any, name: str | None, value_shape: Any = None, stacked: int = 0
) -> bool | np.ndarray:
    """Validate a frozen flag: True or False (NumPy bools too), or a bool array over layers.

    A bool array shaped like the leading (stacked-layer) axes freezes those layers; one whose
    entries are all equal is the plain flag.
    """
    if _is_array_like(value):
        arr = np.asarray(value)
        if arr.dtype != np.bool_:
            raise ValueError(f"{_describe(name)}: frozen must hold bools, got dtype {arr.dtype}")
        _check_prefix("frozen", tuple(arr.shape), value_shape, name, stacked)
        if not arr.size or arr.all() == arr.any():
            return bool(arr.all()) if arr.size else False
        arr = arr.copy()
        arr.flags.writeable = False
        return arr
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(
            f"{_describe(name)}: frozen must be True or False, got {value!r} "
            f"(use grad_req='null'/'write' for Gluon's spelling)"
        )
    return bool(value)


def check_decay_to_init(value: Any, name: str | None) -> bool:
    """Validate `decay_to_init`: True or False (NumPy bools too), for the whole Parameter.

    It is not per layer: weight decay toward w₀ keeps one copy of the whole value, so the layers
    of a stack are anchored together.
    """
    if _is_array_like(value):
        raise ValueError(
            f"{_describe(name)}: decay_to_init must be True or False for the whole parameter, "
            f"got an array; the layers of a stack are anchored together (anchoring keeps one "
            f"copy of the whole value)"
        )
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(
            f"{_describe(name)}: decay_to_init must be True or False, got {value!r} of type "
            f"{type(value).__name__}"
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
      decay_to_init: `True` makes weight decay pull the parameter toward its value when the
        optimizer state is built (w₀, L2-SP) instead of toward zero; `None` is unset (False).

    Example:
      >>> p = Parameter(jnp.zeros(3), name="bias", wd_mult=0.0)
      >>> p.grad_req = "null"      # Gluon's spelling of p.frozen = True
    """

    __slots__ = (
        "_value",
        "_held",
        "_name",
        "_lr_mult",
        "_wd_mult",
        "_frozen",
        "_decay_to_init",
        "_donatable",
        "_source",
        "_logs",
        "_reported",
        "_stacked",
        "_stack_at",
        "_plan",
    )

    def __init__(
        self,
        value: Any,
        *,
        name: str | None = None,
        lr_mult: float | None = None,
        wd_mult: float | None = None,
        frozen: bool | None = None,
        decay_to_init: bool | None = None,
    ) -> None:
        if name is not None and not isinstance(name, str):
            raise TypeError(f"Parameter name must be a str, got {type(name).__name__}")
        # Validate everything before assigning anything.
        value = _as_array(value, name)
        shape = tuple(value.shape)
        lr = None if lr_mult is None else check_multiplier("lr_mult", lr_mult, name, shape)
        wd = None if wd_mult is None else check_multiplier("wd_mult", wd_mult, name, shape)
        fz = None if frozen is None else check_frozen(frozen, name, shape)
        anchor = None if decay_to_init is None else check_decay_to_init(decay_to_init, name)
        self._name = name
        self._value = value
        # (Outputs, key) while the value is the one a Trainer's last step left there.
        self._held: tuple[Outputs, str] | None = None
        self._lr_mult = lr
        self._wd_mult = wd
        self._frozen = fz
        self._decay_to_init = anchor
        # Only arrays a Trainer produced may be donated to its jitted step; user arrays stay valid.
        self._donatable = False
        # attr -> who set it ('param', a preset, a rule), or an object array of those over a
        # stack's layers (None at layers left unset); absent: unset. explain() shows it.
        given = {"lr_mult": lr, "wd_mult": wd, "frozen": fz, "decay_to_init": anchor}
        self._source: dict[str, Any] = {a: "param" for a, v in given.items() if v is not None}
        self._logs: weakref.WeakSet[ChangeLog] = weakref.WeakSet()
        # (attr, override key) whose shadowing by this Parameter's setting was reported.
        self._reported: set[tuple[str, Any]] = set()
        self._stacked = 0  # leading axes that are stacked layers: declare_stack
        self._stack_at = 0
        self._plan: Any = None  # the gradual-unfreezing plan this Parameter follows, if any

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
        return tuple(self.peek().shape)

    @property
    def stacked(self) -> int:
        """How many leading axes of the value are stacked layers (0: not a stack)."""
        return self._stacked

    @property
    def stack_shape(self) -> tuple[int, ...]:
        """The shape of the stacked-layer axes (`()` when not a stack)."""
        return self.shape[: self._stacked]

    def declare_stack(self, axes: int, prefix_depth: int) -> None:
        """Mark the first `axes` axes of the value as stacked layers.

        Args:
          axes: the number of leading stacked axes (1 for `(L, d, d)`).
          prefix_depth: how many `/`-components of the name the stack's prefix has: layer `i`
            of `layers/attn/kernel` (prefix `layers`, depth 1) is `layers/i/attn/kernel`.
        """
        if isinstance(axes, bool) or not isinstance(axes, int) or axes < 1:
            raise ValueError(
                f"{_describe(self._name)}: stacked axes must be an int >= 1, got {axes!r}"
            )
        if axes > len(self.shape):
            raise ValueError(
                f"{_describe(self._name)}: stacked={axes} leading axes, but the value has shape "
                f"{self.shape}"
            )
        self.check_stack(axes)
        self._stacked, self._stack_at = axes, prefix_depth

    def check_stack(self, axes: int) -> None:
        """Raise unless the array attributes already set fit `axes` leading stacked axes."""
        for attr in ("lr_mult", "wd_mult", "frozen"):
            value = getattr(self, "_" + attr)
            if isinstance(value, np.ndarray) and value.shape != self.shape[:axes]:
                raise ValueError(
                    f"{_describe(self._name)}: its {attr} is an array of shape {value.shape}, "
                    f"but {axes} stacked axes of the value {self.shape} have shape "
                    f"{self.shape[:axes]}; unset it or give one entry per layer"
                )

    def layer_name(self, index: tuple[int, ...]) -> str:
        """The name the unstacked model gives layer `index` (`layers/3/attn/kernel`)."""
        if not self._stacked:
            return f"{self._name}[{', '.join(map(str, index))}]"
        parts = (self._name or "").split("/")
        at = self._stack_at
        return "/".join([*parts[:at], *map(str, index), *parts[at:]])

    def slices(self, attr_shape: tuple[int, ...] | None = None) -> list[tuple[int, ...]]:
        """The index of every layer slice (of the stack, or of an array multiplier's shape)."""
        shape = self.stack_shape or tuple(attr_shape or ())
        return list(np.ndindex(*shape)) if shape else []

    @property
    def dtype(self) -> np.dtype:
        """The value's dtype."""
        return self.peek().dtype

    def data(self) -> jax.Array:
        """The current value. It stays valid after later training steps."""
        value = self.peek()
        if self._donatable:
            self._value, self._held = value, None
            self._donatable = False
            self._noted("values")
        return value

    def set_data(self, value: Any) -> None:
        """Replace the value; the shape and dtype must stay the same."""
        value = _as_array(value, self._name)
        self.check_like(value, f"{_describe(self._name)}: set_data")
        self._value, self._held = value, None
        self._donatable = False
        self._noted("values")

    def peek(self) -> jax.Array:
        """The current value, for lrmult's own readers.

        Unlike `data()` it is not handed out, so a Trainer may still donate it when `donatable`.
        Never give it to user code.
        """
        if self._held is not None:
            outputs, key = self._held
            return outputs.values[key]
        return self._value

    @property
    def donatable(self) -> bool:
        """Whether the value was produced by a training step and never handed out since."""
        return self._donatable

    def hold(self, outputs: Outputs, key: str, log: ChangeLog | None = None) -> None:
        """Take the value a training step left in `outputs.values[key]`, and the later ones.

        The value is owned by lrmult (donatable) until handed out by `data()`. Every owner but
        `log`'s is told of the new value.
        """
        self._value, self._held = None, (outputs, key)
        self._donatable = True
        for other in self._logs:
            if other is not log:
                other.values.add(self._name)

    def release(self, outputs: Outputs) -> None:
        """Keep the current value as this Parameter's own if `outputs` holds it (no more steps)."""
        if self._held is not None and self._held[0] is outputs:
            self._value, self._held = self.peek(), None

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

    def watchers(self) -> list[ChangeLog]:
        """The logs of the owners (Trainers) watching this Parameter."""
        return list(self._logs)

    # -- plan ---------------------------------------------------------------------------------
    @property
    def plan(self) -> Any:
        """The gradual-unfreezing plan this Parameter follows (`presets.gradual_unfreezing`).

        None when it follows none. The Trainers stepping this Parameter carry the plan out.
        """
        return self._plan

    def follow(self, plan: Any) -> None:
        """Make this Parameter follow `plan` (None: none); its owners see it at their next step."""
        self._plan = plan
        self._noted("metadata")

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
        """Whether the whole parameter is excluded from training (False when unset).

        A stacked Parameter with some layers frozen reads False here: it is still trained (its
        gradient is computed); `frozen_layers` says which layers are frozen.
        """
        if isinstance(self._frozen, np.ndarray):
            return False
        return bool(self._frozen)

    @property
    def frozen_layers(self) -> np.ndarray | None:
        """The frozen mask over the stacked layers when only some are frozen, else None."""
        return self._frozen if isinstance(self._frozen, np.ndarray) else None

    @frozen.setter
    def frozen(self, value: bool | None) -> None:
        self.assign("frozen", value)

    @frozen.deleter
    def frozen(self) -> None:
        self.assign("frozen", None)

    @property
    def decay_to_init(self) -> bool:
        """Whether weight decay pulls this parameter toward w₀ instead of zero (False when unset).

        w₀ is the value when the optimizer state is built (or, set later, when the state is
        refreshed for it): the decay term becomes `λ·d·(w − w₀)` (L2-SP). It applies to the whole
        parameter, every layer of a stack; frozen layers get no decay, as always.
        """
        return bool(self._decay_to_init)

    @decay_to_init.setter
    def decay_to_init(self, value: bool | None) -> None:
        self.assign("decay_to_init", value)

    @decay_to_init.deleter
    def decay_to_init(self) -> None:
        self.assign("decay_to_init", None)

    @property
    def grad_req(self) -> str:
        """Gluon's alias of `frozen`: `'null'` is frozen, `'write'` is trainable."""
        return "null" if self.frozen else "write"

    @grad_req.setter
    def grad_req(self, value: str) -> None:
        self.assign("grad_req", value)

    def assign(
        self,
        attr: str,
        value: Any,
        origin: str | None = None,
        layers: np.ndarray | None = None,
    ) -> None:
        """Set (or, with `None`, unset) `attr`, validated before anything changes.

        Args:
          attr: `lr_mult`, `wd_mult`, `frozen`, `grad_req` or `decay_to_init`.
          value: the new value, or `None` to unset it.
          origin: what set it when not the user directly (a preset's name), shown by `explain()`.
          layers: a bool mask over a stack's layers: set (or unset) those layers only, the others
            keep what they have, set or not. An array `value` is then shaped like the stacked
            axes, and only its entries at `layers` are taken.
        """
        self.put(*self.planned(attr, value, origin, layers))

    def planned(
        self,
        attr: str,
        value: Any,
        origin: str | None = None,
        layers: np.ndarray | None = None,
        base: Setting | None = None,
    ) -> tuple[str, Setting]:
        """What `assign` would make of `attr`, validated, without changing anything.

        Args:
          attr: as for `assign`.
          value: as for `assign`.
          origin: as for `assign`.
          layers: as for `assign`.
          base: the setting to start from (another plan for the same attribute); the current
            one by default.

        Returns:
          `(attribute, Setting)`, for `put` (`grad_req` comes back as `frozen`).
        """
        if attr == "grad_req":
            if value is None:
                raise ValueError(f"{_describe(self._name)}: grad_req must be 'write' or 'null'")
            attr, value = "frozen", check_grad_req(value, self._name)
        elif value is None:
            pass
        elif attr == "frozen":
            value = check_frozen(value, self._name, self.shape, self._stacked)
        elif attr == "decay_to_init":
            value = check_decay_to_init(value, self._name)
        elif attr in MULTIPLIERS:
            value = check_multiplier(attr, value, self._name, self.shape, self._stacked)
        else:
            raise AttributeError(
                f"{_describe(self._name)}: unknown attribute {attr!r}{suggest(attr, ATTRIBUTES)}"
            )
        if layers is None:
            return attr, Setting(value, None if value is None else origin or "param")
        if attr == "decay_to_init":
            picked = np.argwhere(np.asarray(layers)).tolist()
            chosen = [i[0] if len(i) == 1 else i for i in picked]
            raise ValueError(
                f"{_describe(self._name)}: decay_to_init is set for the whole parameter, but only "
                f"layers {chosen} of its stack are selected; the layers of a stack are anchored "
                f"together: select the whole stack"
            )
        if not self._stacked:
            raise ValueError(
                f"{_describe(self._name)}: not a declared stack, so its layers cannot be set one "
                f"by one (declare it: ParamDict.from_pytree(..., stacked={{prefix: 1}}))"
            )
        shape = self.stack_shape
        layers = np.asarray(layers)
        if layers.dtype != np.bool_ or layers.shape != shape:
            raise ValueError(
                f"{_describe(self._name)}: layers must be a bool mask shaped like the stacked "
                f"axes {shape}, got {layers.dtype} of shape {layers.shape}"
            )
        base = self.setting(attr) if base is None else base
        if is_schedule(value) or is_schedule(base.value):
            if is_schedule(value) and layers.all():
                return attr, Setting(value, origin or "param")
            raise ValueError(
                f"{_describe(self._name)}: a schedule applies to the whole parameter, not to some "
                f"of its layers; set {attr} on the whole parameter (a lrmult.schedules helper "
                f"takes per-layer numbers: linear_warmup(np.array([...]), steps))"
            )
        dtype = bool if attr == "frozen" else np.float64
        default = False if attr == "frozen" else 1.0
        values = np.array(np.broadcast_to(default if base.value is None else base.value, shape))
        values = values.astype(dtype)
        sources = np.empty(shape, object)
        sources[...] = base.source
        new = np.broadcast_to(np.asarray(default if value is None else value, dtype), shape)
        values[layers] = new[layers]
        sources[layers] = None if value is None else origin or "param"
        return attr, _normalized(attr, values, sources)

    def put(self, attr: str, setting: Setting) -> None:
        """Make `setting` (from `planned`) the value of `attr` (no checks: it was validated)."""
        setattr(self, "_" + attr, setting.value)
        if setting.source is None:
            self._source.pop(attr, None)
        else:
            self._source[attr] = setting.source
        self._reported = {r for r in self._reported if r[0] != attr}
        self._noted("metadata")

    def setting(self, attr: str) -> Setting:
        """The current value of `attr` and who set it (see `Setting`)."""
        return Setting(getattr(self, "_" + self._attr(attr)), self._source.get(self._attr(attr)))

    def _attr(self, attr: str) -> str:
        if attr == "grad_req":
            return "frozen"
        if attr not in KEPT:
            raise AttributeError(
                f"{_describe(self._name)}: unknown attribute {attr!r}{suggest(attr, ATTRIBUTES)}"
            )
        return attr

    def origin(self, attr: str) -> Any:
        """Who set `attr`: `'param'` for the user, a preset's or rule's name, None if unset.

        When the layers of a stack were set by different hands, or only some of them were set,
        an object array over the stacked axes of those (None at the layers left unset).
        """
        return self._source.get(self._attr(attr))

    def is_set(self, attr: str) -> bool:
        """Whether `attr` (`lr_mult`, `wd_mult`, `frozen`, `decay_to_init`) is set here.

        For a stack: on at least one layer (`set_mask` says which).
        """
        return self._attr(attr) in self._source

    def set_mask(self, attr: str) -> bool | np.ndarray:
        """Where `attr` is set: a bool, or a bool array over a stack's layers when only some are."""
        source = self.origin(attr)
        if not isinstance(source, np.ndarray):
            return source is not None
        return np.vectorize(lambda s: s is not None, otypes=[bool])(source)

    def shown(self, attr: str) -> str:
        """`attr` as text for tables: `-` where unset, one entry per layer for arrays."""
        if not self.is_set(attr):
            return "-"
        value = getattr(self, "_" + self._attr(attr))
        if not isinstance(value, np.ndarray):
            # Numbers as explain() shows them (6 significant digits); schedules by their repr.
            return _show_number(value) if isinstance(value, (int, float)) else str(value)
        mask = np.broadcast_to(self.set_mask(attr), value.shape)
        entries = [
            _show_number(v) if m else "-" for v, m in zip(value.flat, mask.flat, strict=True)
        ]
        return "[" + ", ".join(entries) + "]"

    def metadata(self) -> dict[str, Any]:
        """The raw (possibly unset) metadata and who set it, for checkpoints (JSON data)."""

        def plain(v: Any) -> Any:
            return v.tolist() if isinstance(v, np.ndarray) else v

        def mult(v: Any) -> Any:
            if isinstance(v, Scaled):  # a function: its name, to check it is there at load
                name = getattr(v.fn, "__qualname__", repr(v.fn))
                return {"schedule": "function", "function": name, "factor": plain(v.factor)}
            return schedules.describe(v) or v

        return {
            "lr_mult": mult(self._lr_mult),
            "wd_mult": mult(self._wd_mult),
            "frozen": self._frozen,
            "decay_to_init": self._decay_to_init,
            "origin": {attr: plain(source) for attr, source in self._source.items()},
        }

    def restore_metadata(self, raw: dict[str, Any]) -> None:
        """Put back what `metadata()` returned (no validation: it came from this class).

        Checkpoints from before per-layer settings (no origin for a user's setting) read as set
        by the user on every layer; from before `decay_to_init`, as unset.
        """

        def back(v: Any, dtype: Any, attr: str = "") -> Any:  # JSON gives arrays back as lists
            if isinstance(v, dict):
                return self._saved_schedule(attr, v)
            if not isinstance(v, list):
                return v
            arr = np.asarray(v, dtype)
            arr.flags.writeable = False
            return arr

        origins = raw.get("origin", {})
        source = {}
        attrs = (
            ("lr_mult", np.float64),
            ("wd_mult", np.float64),
            ("frozen", bool),
            ("decay_to_init", bool),
        )
        values = {attr: back(raw.get(attr), dtype, attr) for attr, dtype in attrs}  # may raise
        for attr, _ in attrs:
            value = values[attr]
            setattr(self, "_" + attr, value)
            if value is not None:
                source[attr] = back(origins.get(attr, "param"), object)
        self._source = source
        self._noted("metadata")

    def _saved_schedule(self, attr: str, saved: dict[str, Any]) -> Any:
        """A schedule from a checkpoint: a helper with its numbers, or the function set now."""
        if saved["schedule"] != "function":
            return schedules.from_description(saved)
        now = getattr(self, "_" + attr)
        name = getattr(getattr(now, "fn", None), "__qualname__", None)
        if name != saved["function"]:
            raise ValueError(
                f"{_describe(self._name)}: the checkpoint's {attr} is the schedule function "
                f"{saved['function']!r}, which a checkpoint cannot hold; set "
                f"{attr} to that function on the Parameter before loading (or use a "
                f"lrmult.schedules helper, whose numbers are saved)"
            )
        return Scaled(now.fn, np.asarray(saved["factor"], np.float64))

    def __repr__(self) -> str:
        parts = [f"name={self._name!r}", f"shape={self.shape}", f"dtype={self.dtype}"]
        parts += [f"{a}={self.shown(a)}" for a in KEPT if self.is_set(a)]
        return f"Parameter({', '.join(parts)})"


def _normalized(attr: str, values: np.ndarray, sources: np.ndarray) -> Setting:
    """A per-layer setting in its plainest form: unset, one source, or one per layer."""
    known = [s for s in sources.flat if s is not None]
    if not known:
        return Setting(None, None)
    source: Any = sources
    if len(known) == sources.size and all(s == known[0] for s in known):
        source = known[0]
    else:
        source.flags.writeable = False
    if attr == "frozen" and values.all() == values.any():
        return Setting(bool(values.all()), source)
    values.flags.writeable = False
    return Setting(values, source)
