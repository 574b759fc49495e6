"""Schedules for multipliers: `lr_mult` / `wd_mult` that change with the step.

Any callable `step -> value` (an optax schedule) may be a Parameter's `lr_mult` or `wd_mult`; it
is evaluated inside the jitted step at the optimizer's step count (0 at the first update, as a
PyTorch `LambdaLR` lambda). Its function object is static: setting another function compiles once
per distinct set of functions (cached). The helpers here keep their numbers (peak, warmup steps,
...) as optimizer state instead, so changing a helper's numbers never recompiles; their numbers
may be arrays over the layers of a stacked Parameter.

The clock is the optimizer's step count for every parameter (the default, also for one unfrozen
later); a helper with `clock="own"` counts from the step at which its parameter joins training
(its `start` is set then, by the Trainer or `lrmult.refresh`), and `start=` counts from any step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import jax.numpy as jnp
import numpy as np


class Schedule:
    """A multiplier schedule whose numbers are data (subclasses name them in `NUMBERS`).

    The first number scales the whole schedule, so `schedule * k` is the same kind of schedule.
    """

    NUMBERS: ClassVar[tuple[str, ...]] = ()
    # Numbers that are step counts (>= 0), not values to scale.
    STEPS: ClassVar[tuple[str, ...]] = ()
    # Whether `formula` is made only of ops XLA copies into each consumer (add, multiply,
    # compare, select, floor, cos; not divide, power, exp, log or sqrt): its evaluation is then
    # inlined into the kernel of each leaf that reads it, at no kernel of its own. Reciprocals
    # come from `derived`, computed on the host with the numbers.
    INLINE: ClassVar[bool] = False

    def __init__(self, clock: str = "global", **numbers: Any) -> None:
        if clock not in ("global", "own"):
            raise ValueError(
                f"{type(self).__name__}: clock must be 'global' or 'own', got {clock!r}"
            )
        self.clock = clock
        for key, value in numbers.items():
            arr = np.asarray(value, np.float64)
            if arr.dtype == np.bool_ or not np.all(np.isfinite(arr)) or np.any(arr < 0):
                raise ValueError(
                    f"{type(self).__name__}: {key} must be finite and >= 0, got {value!r}"
                )
        self._numbers = {k: numbers[k] for k in self.NUMBERS}

    @property
    def numbers(self) -> dict[str, Any]:
        """The schedule's numbers by name."""
        return dict(self._numbers)

    def stacked(self, shape: tuple[int, ...]) -> np.ndarray:
        """The numbers, then the `derived` rows, as float32 `(len(NUMBERS) + k, *shape)`."""
        numbers = self._numbers.values()
        try:
            rows = [np.broadcast_to(np.asarray(v, np.float32), shape) for v in numbers]
        except ValueError:
            raise ValueError(
                f"{self!r}: its numbers must be scalars or arrays of shape {shape} (the stacked "
                f"layers of the parameter)"
            ) from None
        return np.stack(rows + [np.asarray(r, np.float32) for r in self.derived(*rows)])

    @staticmethod
    def derived(*n: np.ndarray) -> list[np.ndarray]:
        """Rows `formula` reads after the numbers, from them (float32), e.g. reciprocals."""
        return []

    @staticmethod
    def formula(t: Any, n: Any) -> Any:
        """The value at step `t` from the rows `n`: the `NUMBERS` in order, then `derived`."""
        raise NotImplementedError

    def __call__(self, step: Any) -> Any:
        """The value at `step` (works on the host and inside jit)."""
        t = jnp.asarray(step, jnp.float32)
        shape = np.broadcast_shapes(*(np.shape(v) for v in self._numbers.values()))
        return type(self).formula(t, list(jnp.asarray(self.stacked(shape))))

    def __mul__(self, factor: Any) -> Schedule:
        if isinstance(factor, Schedule) or callable(factor):
            return NotImplemented
        out = type(self).__new__(type(self))
        out.clock = self.clock
        numbers = dict(self._numbers)
        for key in self.NUMBERS:
            if key not in self.STEPS:
                numbers[key] = np.asarray(numbers[key], np.float64) * factor
        out._numbers = numbers
        return out

    __rmul__ = __mul__

    def started(self, step: int) -> Schedule:
        """The same schedule counting from `step` (its `start`), for a parameter joining then."""
        if "start" not in self.NUMBERS:
            return self
        numbers = {**self._numbers, "start": float(step)}
        return type(self)(self.clock, **numbers)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        if self.clock != other.clock:
            return False
        return all(
            np.array_equal(np.asarray(a), np.asarray(b))
            for a, b in zip(self._numbers.values(), other._numbers.values(), strict=True)
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        def fmt(v: Any) -> str:
            arr = np.asarray(v)
            return f"{float(arr):.6g}" if arr.ndim == 0 else str(arr.tolist())

        args = ", ".join(f"{k}={fmt(v)}" for k, v in self._numbers.items())
        if self.clock != "global":
            args += f", clock={self.clock!r}"
        return f"{_NAMES.get(type(self), type(self).__name__)}({args})"


def _clip01(x: Any) -> Any:
    return jnp.clip(x, 0.0, 1.0)


def _inverse(x: np.ndarray) -> np.ndarray:
    """`1 / x` in float32, 0 where `x` is 0 (formulas treat a count of 0 apart)."""
    return np.divide(np.float32(1.0), x, out=np.zeros_like(x), where=x > 0)


class _Constant(Schedule):
    NUMBERS = ("value",)
    INLINE = True

    @staticmethod
    def formula(t, n):
        return n[0] + 0.0 * t


class _LinearWarmup(Schedule):
    NUMBERS = ("peak", "init", "steps", "start")
    STEPS = ("steps", "start")
    INLINE = True

    @staticmethod
    def derived(peak, init, steps, start):
        return [_inverse(steps)]

    @staticmethod
    def formula(t, n):
        peak, init, steps, start, inv_steps = n
        s = t - start
        frac = jnp.where(s >= steps, 1.0, s * inv_steps)  # exactly 1 from the end on
        return jnp.where(s < 0, 0.0, init + (peak - init) * frac)


class _Cosine(Schedule):
    NUMBERS = ("peak", "end", "warmup", "decay_steps", "start")
    STEPS = ("warmup", "decay_steps", "start")
    INLINE = True

    @staticmethod
    def derived(peak, end, warmup, decay, start):
        return [_inverse(warmup), _inverse(decay)]

    @staticmethod
    def formula(t, n):
        peak, end, warmup, decay, start, inv_warmup, inv_decay = n
        s = t - start
        up = s * inv_warmup  # read only where s < warmup
        d = s - warmup
        frac = jnp.where(d >= decay, 1.0, _clip01(d * inv_decay))
        down = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        return jnp.where(s < 0, 0.0, jnp.where(s < warmup, peak * up, down))


class _Step(Schedule):
    NUMBERS = ("value", "gamma", "every", "start")
    STEPS = ("every", "start")

    def __mul__(self, factor: Any) -> Schedule:
        out = super().__mul__(factor)
        if isinstance(out, Schedule):  # gamma is a ratio, not a value
            out._numbers["gamma"] = self._numbers["gamma"]
        return out

    @staticmethod
    def formula(t, n):
        value, gamma, every, start = n
        k = jnp.floor(jnp.maximum(t - start, 0.0) / jnp.maximum(every, 1.0))
        return value * gamma**k


class _SlantedTriangular(Schedule):
    NUMBERS = ("peak", "total", "cut_frac", "ratio", "start")
    STEPS = ("total", "cut_frac", "ratio", "start")
    INLINE = True

    @staticmethod
    def derived(peak, total, cut_frac, ratio, start):
        one = np.float32(1.0)
        with np.errstate(divide="ignore", over="ignore"):  # a cut_frac that is 0 in float32
            cut = np.maximum(np.floor(total * cut_frac), one)
            down = np.maximum(cut * (one / cut_frac - one), one)
            return [cut, down, one / cut, one / down, one / ratio, peak / ratio]

    @staticmethod
    def formula(t, n):
        peak, total, cut_frac, ratio, start, cut, down, inv_cut, inv_down, inv_ratio, low = n
        s = jnp.maximum(t - start, 0.0)
        d = s - cut
        p = jnp.where(s < cut, s * inv_cut, jnp.where(d >= down, 0.0, 1.0 - d * inv_down))
        value = peak * (1.0 + p * (ratio - 1.0)) * inv_ratio
        # exactly peak / ratio at the bottom and peak at the top
        return jnp.where(p <= 0.0, low, jnp.where(p >= 1.0, peak, value))


_NAMES = {
    _Constant: "constant",
    _LinearWarmup: "linear_warmup",
    _Cosine: "cosine",
    _Step: "step",
    _SlantedTriangular: "slanted_triangular",
}


def _steps(name: str, value: Any, where: str, positive: bool = False) -> Any:
    arr = np.asarray(value)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.number) or np.any(arr < 0):
        raise ValueError(f"{where}: {name} must be a step count >= 0, got {value!r}")
    if positive and np.any(arr <= 0):
        raise ValueError(f"{where}: {name} must be > 0, got {value!r}")
    return value


def constant(value: Any) -> Schedule:
    """`value` at every step (its number is state: changing it never recompiles)."""
    return _Constant(value=value)


def linear_warmup(
    peak: Any, steps: Any, *, start: Any = 0, init: Any = 0.0, clock: str = "global"
) -> Schedule:
    """From `init` at step `start` linearly to `peak` at `start + steps`, then `peak`.

    Before `start` the value is 0. `clock="own"`: `start` becomes the step at which the
    parameter joins training (unfrozen), so it counts from its own first step.

    Example:
      >>> params.select("head/").setattr("lr_mult", lrmult.schedules.linear_warmup(1.0, 100))
    """
    _steps("steps", steps, "linear_warmup")
    _steps("start", start, "linear_warmup")
    return _LinearWarmup(clock, peak=peak, init=init, steps=steps, start=start)


def cosine(
    peak: Any,
    decay_steps: Any,
    *,
    warmup: Any = 0,
    end: Any = 0.0,
    start: Any = 0,
    clock: str = "global",
) -> Schedule:
    """Linear warmup to `peak` over `warmup` steps, then a cosine to `end` over `decay_steps`.

    Counted from `start` (0 before it); `clock="own"` as in `linear_warmup`.
    """
    _steps("decay_steps", decay_steps, "cosine", positive=True)
    _steps("warmup", warmup, "cosine")
    _steps("start", start, "cosine")
    return _Cosine(clock, peak=peak, end=end, warmup=warmup, decay_steps=decay_steps, start=start)


def step(
    value: Any, every: Any, *, gamma: Any = 0.1, start: Any = 0, clock: str = "global"
) -> Schedule:
    """`value · gamma^k` after `k` periods of `every` steps from `start` (PyTorch's `StepLR`)."""
    _steps("every", every, "step", positive=True)
    _steps("start", start, "step")
    return _Step(clock, value=value, gamma=gamma, every=every, start=start)


def slanted_triangular(
    peak: Any,
    total: Any,
    *,
    cut_frac: float = 0.1,
    ratio: float = 32.0,
    start: Any = 0,
    clock: str = "global",
) -> Schedule:
    """ULMFiT's slanted triangular rate: up over `cut_frac` of `total` steps, then down.

    `peak · (1 + p·(ratio − 1)) / ratio`, `p` rising from 0 to 1 over the first
    `floor(total·cut_frac)` steps and falling back to 0 over the rest (Howard & Ruder, 2018).
    """
    _steps("total", total, "slanted_triangular", positive=True)
    if not 0 < float(cut_frac) < 1:
        raise ValueError(f"slanted_triangular: cut_frac must be in (0, 1), got {cut_frac!r}")
    if not float(ratio) >= 1:
        raise ValueError(f"slanted_triangular: ratio must be >= 1, got {ratio!r}")
    return _SlantedTriangular(
        clock, peak=peak, total=total, cut_frac=cut_frac, ratio=ratio, start=start
    )


class Scaled:
    """`factor · fn(step)`: a user's schedule function times a number (presets multiply).

    The function object is what a step compiles for; the factor is state.
    """

    __slots__ = ("fn", "factor")

    def __init__(self, fn: Callable[[Any], Any], factor: Any = 1.0) -> None:
        if isinstance(fn, Scaled):
            fn, factor = fn.fn, np.asarray(fn.factor) * factor
        self.fn = fn
        self.factor = factor

    def __call__(self, step: Any) -> Any:
        """The value at `step`."""
        return jnp.asarray(self.factor, jnp.float32) * jnp.asarray(self.fn(step), jnp.float32)

    def __mul__(self, factor: Any) -> Scaled:
        if callable(factor):
            return NotImplemented
        return Scaled(self.fn, np.asarray(self.factor, np.float64) * factor)

    __rmul__ = __mul__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Scaled):
            return NotImplemented
        return self.fn is other.fn and np.array_equal(self.factor, other.factor)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        name = getattr(self.fn, "__name__", repr(self.fn))
        factor = np.asarray(self.factor)
        if factor.ndim == 0 and float(factor) == 1.0:
            return f"schedule {name}"
        return f"{factor.tolist()!r} × schedule {name}"


def is_schedule(value: Any) -> bool:
    """Whether a multiplier value is a schedule (a callable), not a number or array."""
    return callable(value) and not isinstance(value, type)


def parts(value: Any, shape: tuple[int, ...]) -> tuple[np.ndarray, Any, np.ndarray | None]:
    """A multiplier as `(constant, kind, numbers)`, its value being `constant · kind(numbers)(t)`.

    Args:
      value: a number, an array over `shape`, a `Schedule`, a `Scaled` or any callable.
      shape: the multiplier's shape (`()`, or a stack's layers).

    Returns:
      `constant`: float32 array of `shape`; `kind`: None (a constant), a `Schedule` subclass, or
      the user's function (static); `numbers`: a `Schedule`'s rows (`stacked`).
    """
    if isinstance(value, Schedule):
        return np.ones(shape, np.float32), type(value), value.stacked(shape)
    if isinstance(value, Scaled):
        factor = np.broadcast_to(np.asarray(value.factor, np.float32), shape)
        return np.array(factor), value.fn, None
    if is_schedule(value):
        return np.ones(shape, np.float32), value, None
    return np.array(np.broadcast_to(np.asarray(value, np.float32), shape)), None, None


def check_schedule(attr: str, value: Any, where: str, shape: tuple[int, ...]) -> Any:
    """Validate a schedule-valued multiplier by evaluating it at steps 0 and 1 on the host.

    Returns:
      The schedule (a user function is kept as given).
    """
    if isinstance(value, Schedule):
        value.stacked(shape)
        return value
    for t in (0, 1):
        try:
            out = np.asarray(value(t), np.float64)
        except Exception as e:  # noqa: BLE001 - the user's function, any error
            raise ValueError(
                f"{where}: {attr} schedule {value!r} failed at step {t}: {type(e).__name__}: {e}"
            ) from e
        if out.shape not in ((), shape):
            raise ValueError(
                f"{where}: {attr} schedule returns shape {out.shape}; expected a scalar"
                + (f" or {shape} (the stacked layers)" if shape else "")
            )
        if not np.all(np.isfinite(out)) or np.any(out < 0):
            raise ValueError(
                f"{where}: {attr} schedule gives {out.tolist()!r} at step {t}; a multiplier is a "
                f"finite number >= 0"
            )
    return value if isinstance(value, Scaled) else Scaled(value)


def describe(value: Any) -> dict[str, Any] | None:
    """A helper schedule as JSON-able data (`{"schedule": name, numbers...}`), else None."""
    if not isinstance(value, Schedule):
        return None
    return {
        "schedule": _NAMES[type(value)],
        "clock": value.clock,
        **{k: np.asarray(v).tolist() for k, v in value.numbers.items()},
    }


def from_description(data: dict[str, Any]) -> Schedule:
    """`describe`'s inverse."""
    kind = {v: k for k, v in _NAMES.items()}[data["schedule"]]
    numbers = {k: np.asarray(data[k], np.float64) for k in kind.NUMBERS}
    return kind(data.get("clock", "global"), **numbers)


def value_at(value: Any, step: int) -> Any:
    """A multiplier's value at `step` on the host (a number or array)."""
    if is_schedule(value):
        out = np.asarray(value(step), np.float64)
        return float(out) if out.ndim == 0 else out
    return value


__all__ = [
    "Schedule",
    "Scaled",
    "constant",
    "cosine",
    "linear_warmup",
    "slanted_triangular",
    "step",
]
