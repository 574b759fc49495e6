"""Ready chains: optax's optimizers with the multipliers placed as SPEC §3 says.

Each is a composition of optax primitives, read the way `optax/_src/alias.py` reads, with two more
links: `add_decayed_weights` (per-leaf `wd_mult`) where the optimizer applies weight decay, and
`scale_by_lr_mult` last, so `lr_mult` scales the final step (`η·m·u`) and never the gradient seen
by an adaptive preconditioner. (Last rather than before the learning rate: in float16 `m·u`
can overflow where `η·m·u`, the step actually taken, does not.) Transformations that keep a step
count run under `per_leaf`; adaptive scalers keep float32 moments for float16 / bfloat16 leaves;
with a `param_dict` the whole chain runs under `trainable_only`: frozen leaves hold no state.

Every chain validates its hyperparameters when built (`check_hyperparameter`), and the Trainer
reuses the same checks for Gluon's `optimizer_params`, naming the key the user wrote.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lrmult.parameter import FLOAT32_MAX
from lrmult.transforms import (
    add_decayed_weights,
    check_weight_decay,
    per_leaf,
    scale_by_lr_mult,
    trainable_only,
)

ScalarOrSchedule = float | Callable[[Any], Any] | Any
Overrides = Mapping[int | str, float] | None


# Ready-chain arguments and the range each must lie in (decay rates stay below 1).
_UNIT = ("momentum", "b1", "b2", "decay")
_NONNEGATIVE = ("eps", "eps_root", "weight_decay", "initial_accumulator_value", "initial_scale")
_FLAGS = ("nesterov", "centered", "eps_in_sqrt", "bias_correction")


def check_learning_rate(value: Any, where: str) -> Any:
    """A learning rate: a finite float >= 0 within float32's range, or a schedule step -> rate.

    Args:
      value: the rate or schedule (a traced value, under `inject_hyperparams`, is not checked).
      where: how the message names the argument.

    Returns:
      The rate as a float, or the schedule itself.
    """
    if isinstance(value, jax.Array):
        return value
    if callable(value):
        try:
            at_zero = value(0)
        except TypeError as e:
            raise TypeError(
                f"{where}: learning_rate is callable but not a schedule step -> rate "
                f"(an optax schedule such as optax.cosine_decay_schedule(...)): {e}"
            ) from None
        if np.ndim(at_zero) != 0:
            raise TypeError(
                f"{where}: the learning_rate schedule must return a scalar, got shape "
                f"{np.shape(at_zero)} at step 0"
            )
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{where}: learning rate must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or value > FLOAT32_MAX:
        raise ValueError(
            f"{where}: learning rate must be a finite number >= 0 within float32's range, "
            f"got {value!r}"
        )
    return value


def check_hyperparameter(arg: str, value: Any, where: str) -> Any:
    """Validate one ready-chain argument now, not deep inside the first jitted step.

    Args:
      arg: the chain's argument name (`b1`, `momentum`, `nesterov`, ...).
      value: its value; an array (injected by `optax.inject_hyperparams`) is not checked.
      where: how the message names it (`adam: b1`, `Trainer: optimizer_params['beta1']`).

    Returns:
      The value, numbers as floats.
    """
    if arg == "learning_rate":
        return check_learning_rate(value, where)
    if arg in _FLAGS:
        if not isinstance(value, bool):
            raise TypeError(f"{where} must be True or False, got {value!r}")
        return value
    if (arg == "momentum" and value is None) or isinstance(value, jax.Array) or callable(value):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{where} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{where} must be finite, got {value!r}")
    if arg in _UNIT and not 0 <= value < 1:
        raise ValueError(f"{where} must be in [0, 1), got {value!r}")
    if arg in _NONNEGATIVE and value < 0:
        raise ValueError(f"{where} must be >= 0, got {value!r}")
    return value


def _uses(momentum: Any) -> bool:
    """Whether a momentum argument asks for a trace: not None, and not a literal 0.

    An array (injected by `optax.inject_hyperparams`) always does: its value may change.
    """
    if momentum is None:
        return False
    return not isinstance(momentum, (int, float)) or momentum != 0


def _checked(name: str, **hyperparameters: Any) -> None:
    for arg, value in hyperparameters.items():
        check_hyperparameter(arg, value, f"{name}: {arg}")


@dataclasses.dataclass(frozen=True)
class _Links:
    """What every ready chain shares: the per-leaf links and the frame around its own links.

    `chain(*links, learning_rate=η)` is `links`, the learning rate, then `lr_mult` last, the
    whole under `trainable_only` when there is a ParamDict.
    """

    param_dict: Any
    lr_mult: Overrides
    wd_mult: Overrides
    idx2name: Mapping[int, str] | None
    track: bool

    def decay(self, weight_decay: Any) -> optax.GradientTransformation | None:
        """The weight-decay link, left out when the rate is a literal 0 (it would read params)."""
        check_weight_decay(weight_decay, "weight_decay")
        if isinstance(weight_decay, (int, float)) and not isinstance(weight_decay, bool):
            if weight_decay == 0 and not self.wd_mult:
                return None
        return add_decayed_weights(
            weight_decay,
            self.param_dict,
            wd_mult=self.wd_mult,
            idx2name=self.idx2name,
            track=self.track,
        )

    def chain(
        self,
        *links: optax.GradientTransformation | None,
        learning_rate: ScalarOrSchedule | None,
        after_rate: tuple[optax.GradientTransformation | None, ...] = (),
    ) -> optax.GradientTransformation:
        """The ready chain; `after_rate` links go between the learning rate and `lr_mult`."""
        rate = None if learning_rate is None else optax.scale_by_learning_rate(learning_rate)
        scale = scale_by_lr_mult(
            self.param_dict,
            lr_mult=self.lr_mult,
            idx2name=self.idx2name,
            track=self.track,
            rate=learning_rate,
        )
        tx = optax.chain(*(t for t in (*links, rate, *after_rate, scale) if t is not None))
        if self.param_dict is None:
            return tx
        return trainable_only(tx, self.param_dict, idx2name=self.idx2name, track=self.track)


def _low_precision(x: Any) -> bool:
    return hasattr(x, "dtype") and x.dtype in (jnp.float16, jnp.bfloat16)


def _in_float32(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Run an adaptive scaler in float32 for float16 / bfloat16 leaves.

    As mixed-precision training does: its moments are float32 (in float16, g**2 and eps
    underflow), and its updates come back in each leaf's dtype. A no-op for float32 leaves.
    """

    def up(tree):
        return jax.tree.map(lambda x: x.astype(jnp.float32) if _low_precision(x) else x, tree)

    def init_fn(params):
        return inner.init(up(params))

    def update_fn(updates, state, params=None):
        out, state = inner.update(up(updates), state, None if params is None else up(params))
        return jax.tree.map(lambda o, u: o.astype(u.dtype), out, updates), state

    return optax.GradientTransformation(init_fn, update_fn)


def sgd(
    learning_rate: ScalarOrSchedule,
    momentum: float | None = None,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    *,
    param_dict: Any = None,
    lr_mult: Overrides = None,
    wd_mult: Overrides = None,
    idx2name: Mapping[int, str] | None = None,
    track: bool = True,
) -> optax.GradientTransformation:
    """SGD with momentum and coupled weight decay, per leaf: `u = trace(g + λ·d·w)`, `w -= η·m·u`.

    Equals PyTorch's `SGD` with one param group per leaf (`lr = η·m`, `weight_decay = λ·d`,
    dampening 0).

    Args:
      learning_rate: η, a float or an optax schedule.
      momentum: the trace decay, or None for plain SGD.
      nesterov: Nesterov momentum.
      weight_decay: λ, coupled L2 added to the gradient.
      param_dict: a ParamDict: its Parameters' `lr_mult` / `wd_mult` / `frozen` come first.
      lr_mult: override dict (parameter index or name -> multiplier), links 2-3 of the chain.
      wd_mult: override dict for weight decay.
      idx2name: index -> name, when the tree's path names are not the parameter names.
      track: keep the state in step with `param_dict` by itself: a changed multiplier applies
        at the next update, a changed frozen set makes it raise naming `lrmult.refresh`.
    """
    _checked("sgd", learning_rate=learning_rate, momentum=momentum, nesterov=nesterov)
    if nesterov and not _uses(momentum):  # PyTorch refuses it too: it would be plain SGD
        raise ValueError(f"sgd: nesterov=True needs momentum > 0, got momentum={momentum!r}")
    links = _Links(param_dict, lr_mult, wd_mult, idx2name, track)
    return links.chain(
        links.decay(weight_decay),
        optax.trace(decay=momentum, nesterov=nesterov) if _uses(momentum) else None,
        learning_rate=learning_rate,
    )


def nag(
    learning_rate: ScalarOrSchedule,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    *,
    param_dict: Any = None,
    lr_mult: Overrides = None,
    wd_mult: Overrides = None,
    idx2name: Mapping[int, str] | None = None,
    track: bool = True,
) -> optax.GradientTransformation:
    """Nesterov accelerated SGD (MXNet's `nag`): `sgd(..., nesterov=True)`."""
    _checked("nag", learning_rate=learning_rate, momentum=momentum)
    if not _uses(momentum):
        raise ValueError(f"nag: Nesterov momentum needs momentum > 0, got {momentum!r}")
    return sgd(
        learning_rate,
        momentum,
        True,
        weight_decay,
        param_dict=param_dict,
        lr_mult=lr_mult,
        wd_mult=wd_mult,
        idx2name=idx2name,
        track=track,
    )


def adam(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: float = 0.0,
    *,
    param_dict: Any = None,
    lr_mult: Overrides = None,
    wd_mult: Overrides = None,
    idx2name: Mapping[int, str] | None = None,
    track: bool = True,
) -> optax.GradientTransformation:
    """Adam with coupled L2 (PyTorch's `Adam`): `g' = g + λ·d·w`, `w -= η·m·adam(g')`.

    Each leaf keeps its own step count, so bias correction restarts for a leaf that is unfrozen.
    """
    _checked("adam", learning_rate=learning_rate, b1=b1, b2=b2, eps=eps, eps_root=eps_root)
    links = _Links(param_dict, lr_mult, wd_mult, idx2name, track)
    return links.chain(
        links.decay(weight_decay),
        per_leaf(_in_float32(optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root))),
        learning_rate=learning_rate,
    )


def adamw(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: float = 1e-4,
    *,
    param_dict: Any = None,
    lr_mult: Overrides = None,
    wd_mult: Overrides = None,
    idx2name: Mapping[int, str] | None = None,
    track: bool = True,
) -> optax.GradientTransformation:
    """AdamW, decoupled (PyTorch's `AdamW`, `optax.adamw`): `w -= η·m·(adam(g) + λ·d·w)`."""
    _checked("adamw", learning_rate=learning_rate, b1=b1, b2=b2, eps=eps, eps_root=eps_root)
    links = _Links(param_dict, lr_mult, wd_mult, idx2name, track)
    return links.chain(
        per_leaf(_in_float32(optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root))),
        links.decay(weight_decay),
        learning_rate=learning_rate,
    )


def rmsprop(
    learning_rate: ScalarOrSchedule,
    decay: float = 0.9,
    eps: float = 1e-8,
    initial_scale: float = 0.0,
    eps_in_sqrt: bool = True,
    centered: bool = False,
    momentum: float | None = None,
    nesterov: bool = False,
    bias_correction: bool = False,
    weight_decay: float = 0.0,
    *,
    param_dict: Any = None,
    lr_mult: Overrides = None,
    wd_mult: Overrides = None,
    idx2name: Mapping[int, str] | None = None,
    track: bool = True,
) -> optax.GradientTransformation:
    """RMSProp (optax's `rmsprop`) with coupled weight decay: `w -= m·trace(η·rms(g + λ·d·w))`.

    As in optax, the momentum trace holds steps already scaled by the learning rate (PyTorch's
    holds unscaled ones: the two differ while a schedule changes η).
    """
    _checked(
        "rmsprop",
        learning_rate=learning_rate,
        decay=decay,
        eps=eps,
        initial_scale=initial_scale,
        eps_in_sqrt=eps_in_sqrt,
        centered=centered,
        momentum=momentum,
        nesterov=nesterov,
        bias_correction=bias_correction,
    )
    kw = dict(decay=decay, eps=eps, initial_scale=initial_scale, eps_in_sqrt=eps_in_sqrt)
    scaler = (
        optax.scale_by_stddev(**kw, bias_correction=bias_correction)
        if centered
        else optax.scale_by_rms(**kw, bias_correction=bias_correction)
    )
    links = _Links(param_dict, lr_mult, wd_mult, idx2name, track)
    return links.chain(
        links.decay(weight_decay),
        per_leaf(_in_float32(scaler)) if bias_correction else _in_float32(scaler),
        learning_rate=learning_rate,
        after_rate=(optax.trace(decay=momentum, nesterov=nesterov) if _uses(momentum) else None,),
    )


def adagrad(
    learning_rate: ScalarOrSchedule,
    initial_accumulator_value: float = 0.1,
    eps: float = 1e-7,
    weight_decay: float = 0.0,
    *,
    param_dict: Any = None,
    lr_mult: Overrides = None,
    wd_mult: Overrides = None,
    idx2name: Mapping[int, str] | None = None,
    track: bool = True,
) -> optax.GradientTransformation:
    """Adagrad (optax's) with coupled weight decay: `w -= η·m·rss(g + λ·d·w)`."""
    _checked(
        "adagrad",
        learning_rate=learning_rate,
        initial_accumulator_value=initial_accumulator_value,
        eps=eps,
    )
    links = _Links(param_dict, lr_mult, wd_mult, idx2name, track)
    return links.chain(
        links.decay(weight_decay),
        _in_float32(
            optax.scale_by_rss(initial_accumulator_value=initial_accumulator_value, eps=eps)
        ),
        learning_rate=learning_rate,
    )


def lamb(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    eps_root: float = 0.0,
    weight_decay: float = 0.0,
    *,
    param_dict: Any = None,
    lr_mult: Overrides = None,
    wd_mult: Overrides = None,
    idx2name: Mapping[int, str] | None = None,
    track: bool = True,
) -> optax.GradientTransformation:
    """LAMB (optax's): `w -= η·m·trust_ratio(adam(g) + λ·d·w)`."""
    _checked("lamb", learning_rate=learning_rate, b1=b1, b2=b2, eps=eps, eps_root=eps_root)
    links = _Links(param_dict, lr_mult, wd_mult, idx2name, track)
    return links.chain(
        per_leaf(_in_float32(optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root))),
        links.decay(weight_decay),
        optax.scale_by_trust_ratio(),
        learning_rate=learning_rate,
    )


def lion(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.99,
    weight_decay: float = 1e-3,
    *,
    param_dict: Any = None,
    lr_mult: Overrides = None,
    wd_mult: Overrides = None,
    idx2name: Mapping[int, str] | None = None,
    track: bool = True,
) -> optax.GradientTransformation:
    """Lion (optax's), decoupled decay: `w -= η·m·(sign(...) + λ·d·w)`."""
    _checked("lion", learning_rate=learning_rate, b1=b1, b2=b2)
    links = _Links(param_dict, lr_mult, wd_mult, idx2name, track)
    return links.chain(
        _in_float32(optax.scale_by_lion(b1=b1, b2=b2)),
        links.decay(weight_decay),
        learning_rate=learning_rate,
    )


OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "sgd": sgd,
    "nag": nag,
    "adam": adam,
    "adamw": adamw,
    "rmsprop": rmsprop,
    "adagrad": adagrad,
    "lamb": lamb,
    "lion": lion,
}


def custom(
    direction: optax.GradientTransformation,
    learning_rate: ScalarOrSchedule | None = None,
    weight_decay: float = 0.0,
    *,
    param_dict: Any = None,
    track: bool = True,
) -> optax.GradientTransformation:
    """Any optax transformation as a ready chain: coupled decay, `direction`, the rate, lr_mult.

    Args:
      direction: the update direction (an optax transformation, e.g. `optax.scale_by_adam()`);
        `lr_mult` scales its output.
      learning_rate: applied after `direction` when given (else `direction` owns the rate).
      weight_decay: coupled L2 added to the gradient before `direction`.
      param_dict: a ParamDict: its Parameters' multipliers and frozen flags act.
      track: keep the state in step with `param_dict` by itself (see `sgd`).
    """
    if learning_rate is not None:
        check_learning_rate(learning_rate, "custom: learning_rate")
    links = _Links(param_dict, None, None, None, track)
    return links.chain(links.decay(weight_decay), direction, learning_rate=learning_rate)
