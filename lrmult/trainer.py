"""`Trainer`: Gluon's `gluon.Trainer` over a ParamDict, with one jitted, donating step."""

from __future__ import annotations

import inspect
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding

from lrmult import checkpoint, lookup, report
from lrmult._names import suggest
from lrmult._where import user_site, user_stacklevel
from lrmult.display import Table
from lrmult.lookup import is_masked
from lrmult.optimizers import OPTIMIZERS, check_hyperparameter, check_learning_rate, custom
from lrmult.paramdict import ParamDict
from lrmult.parameter import ChangeLog, Outputs, Parameter
from lrmult.plans import Agenda, Plan
from lrmult.resync import by_path, carry_over, clock, host_value, refresh_state, structure
from lrmult.transforms import AnchorState, MultState, place_like, zero_frozen_layers

_FROZEN = optax.MaskedNode()
_TRAINER_FORMAT = "lrmult-trainer-1"


def _is_mult(x: Any) -> bool:
    return isinstance(x, (MultState, AnchorState))


def _split_state(state: Any) -> tuple[Any, list[Any], tuple[MultState | AnchorState, ...]]:
    """`(outer treedef, items with None where a read-only node stands, those nodes)`.

    The multipliers and the anchors (w₀ of `decay_to_init`) are read-only inside the step:
    passing them apart (not donated, not returned) spares the step one output array per leaf
    and multiplier kind (and per anchored leaf), whose creation and release cost ~1 us each.
    """
    items, outer = jax.tree.flatten(state, is_leaf=_is_mult)
    return outer, [None if _is_mult(x) else x for x in items], tuple(filter(_is_mult, items))


def _join_state(outer: Any, rest: list[Any], mults: tuple[MultState, ...]) -> Any:
    it = iter(mults)
    return outer.unflatten([next(it) if x is None else x for x in rest])


# Gluon's optimizer_params keys -> the ready chains' argument names.
_GLUON_KEYS = {"wd": "weight_decay", "beta1": "b1", "beta2": "b2", "epsilon": "eps"}
_TRAINER_KEYS = (
    "learning_rate",
    "lr_scheduler",
    "clip_gradient",
    "clip_global_norm",
    "rescale_grad",
)
_DEFAULT_LR = {
    "sgd": 0.01,
    "nag": 0.01,
    "adagrad": 0.01,
    "adam": 0.001,
    "adamw": 0.001,
    "rmsprop": 0.001,
    "lamb": 0.001,
    "lion": 1e-4,
}
_MULT_ARGS = ("param_dict", "lr_mult", "wd_mult", "idx2name", "track")


class _Summary(NamedTuple):
    optimizer: str
    learning_rate: float
    weight_decay: float
    parameters: int
    trainable: int
    frozen: int
    overrides: int
    num_update: int


def _known(pairs: list, kept: set[str], strict: bool, layers: dict) -> dict[int | str, float]:
    """Saved override pairs; without `strict`, only name keys of parameters restored.

    Indices of a model that changed do not name the same parameters. `layers` maps the per-layer
    names of the restored stacks to their parameter (`lookup.layer_names`).
    """
    if strict:
        return {k: float(v) for k, v in pairs}
    return {k: float(v) for k, v in pairs if isinstance(k, str) and (k in kept or k in layers)}


# A call site handing in this many distinct loss functions is warned about (once).
_NEW_LOSSES_WARNED = 3


def _refuse_tracers(where: str, tree: Any) -> None:
    """Raise if called while JAX traces (a jit around the Trainer).

    The Trainer's step is jitted already, and tracers written into the Parameters would break the
    next step.
    """
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree)):
        raise RuntimeError(
            f"Trainer.{where} was called inside a JAX transformation (jax.jit, vmap, grad): it is "
            f"jitted already and updates the Parameters in place; call it outside jax.jit, with "
            f"concrete arrays (nothing was changed)"
        )


def _one_output(new: Mapping[str, Any]) -> Any:
    """One array of a step's outputs: under a jit around the Trainer, all of them are tracers."""
    return next((v for v in new.values() if not is_masked(v)), None)


def _as_param_dict(params: Any) -> ParamDict:
    if isinstance(params, ParamDict):
        out = params.copy()
    elif isinstance(params, (list, tuple)):
        if not params:
            raise ValueError("Trainer: params is an empty list")
        out = ParamDict()
        for i, pd in enumerate(params):
            if not isinstance(pd, Mapping):
                raise TypeError(
                    f"Trainer: params[{i}] is a {type(pd).__name__}; expected a ParamDict"
                )
            out.update(pd)
    elif isinstance(params, Mapping):
        for name, value in params.items():
            if not isinstance(value, Parameter):
                raise TypeError(
                    f"Trainer: params maps {name!r} to a {type(value).__name__}, not a "
                    f"lrmult.Parameter; for a pytree of arrays (flax variables['params'], a dict "
                    f"of arrays) wrap it first: Trainer(lrmult.ParamDict.from_pytree(tree), ...)"
                )
        out = ParamDict(params)
    else:
        raise TypeError(
            "Trainer: params must be a ParamDict, a list of ParamDicts or a dict name -> "
            f"Parameter, got {type(params).__name__}"
        )
    if not out:
        raise ValueError("Trainer: params holds no parameter")
    return out


def _check_clip(key: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"Trainer: optimizer_params[{key!r}] must be a number > 0, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"Trainer: optimizer_params[{key!r}] must be finite, got {value!r}")
    return float(value)


class Trainer:
    """Applies an optimizer to a set of Parameters, as Gluon's `Trainer` does.

    Multipliers (`lr_mult`, `wd_mult`) and `frozen` are read from the Parameters at every step
    through the lookup chain (Parameter -> `set_lr_mult` by index -> by name -> 1.0). Changing a
    multiplier, an override or the learning rate never recompiles; changing the frozen set
    compiles once per distinct set. Frozen parameters get no gradient, no state, no decay.

    Args:
      params: a ParamDict, a list/tuple of ParamDicts (merged), or a dict name -> Parameter.
      optimizer: a name (`sgd`, `nag`, `adam`, `adamw`, `rmsprop`, `adagrad`, `lamb`, `lion`)
        or an `optax.GradientTransformation` (the update direction; `lr_mult` scales its output
        and `learning_rate`, when given, is applied after it).
      optimizer_params: Gluon's keys `learning_rate` (float or optax schedule), `wd`,
        `momentum`, `beta1`, `beta2`, `epsilon`, `clip_gradient` (element-wise) and
        `clip_global_norm`, or any argument of the ready chain (`nesterov`, `centered`, ...).
      check_finite: check every step's gradients; a non-finite one raises `FloatingPointError`
        naming the first such parameter, and nothing is updated (costs one host sync a step).

    Example:
      >>> params = ParamDict.from_pytree(model_params)
      >>> params.select(".*bias").setattr("wd_mult", 0.0)
      >>> trainer = Trainer(params, "sgd", {"learning_rate": 0.1, "momentum": 0.9, "wd": 1e-4})
      >>> loss = trainer.train_step(loss_fn, x, y)
    """

    def __init__(
        self,
        params: ParamDict | Sequence[ParamDict] | Mapping[str, Parameter],
        optimizer: str | optax.GradientTransformation = "sgd",
        optimizer_params: Mapping[str, Any] | None = None,
        *,
        check_finite: bool = False,
    ) -> None:
        if not isinstance(check_finite, bool):
            raise TypeError(f"Trainer: check_finite must be True or False, got {check_finite!r}")
        self._check_finite = check_finite
        self._params = _as_param_dict(params)
        if optimizer_params is None:
            optimizer_params = {}
        if not isinstance(optimizer_params, Mapping):
            raise TypeError(
                f"Trainer: optimizer_params must be a dict, got {type(optimizer_params).__name__}"
            )
        opts = dict(optimizer_params)
        self._names = list(self._params)
        # (name, Parameter) pairs, read at every step without going through the Mapping API.
        self._plist = list(self._params.items())
        # What changed on these Parameters since this Trainer last looked (only these).
        self._log = ChangeLog()
        for _, p in self._plist:
            p.watch(self._log)
        self._treedef, self._order = self._params.structure()
        template = {n: optax.MaskedNode() for n in self._names}
        self._leaves = lookup.leaves_of(template, self._params, None)
        self._lr_overrides: dict[int | str, float] = {}
        self._wd_overrides: dict[int | str, float] = {}

        clip = _check_clip("clip_gradient", opts.pop("clip_gradient", None))
        clip_norm = _check_clip("clip_global_norm", opts.pop("clip_global_norm", None))
        rescale = _check_clip("rescale_grad", opts.pop("rescale_grad", None))
        if "lr_scheduler" in opts:  # MXNet's name for a schedule of the base rate
            if "learning_rate" in opts:
                raise ValueError(
                    "Trainer: give optimizer_params 'learning_rate' or 'lr_scheduler', not both"
                )
            opts["learning_rate"] = opts.pop("lr_scheduler")
            if not callable(opts["learning_rate"]):
                raise TypeError(
                    "Trainer: optimizer_params['lr_scheduler'] must be a schedule step -> rate "
                    "(an optax schedule such as optax.cosine_decay_schedule(...))"
                )
        if hasattr(optimizer, "gradient_transformation"):  # optax.MultiSteps and the like
            optimizer = optimizer.gradient_transformation()
        direction = self._direction(optimizer, opts)
        self._description += f" clip_gradient={clip} clip_global_norm={clip_norm}"
        if rescale is not None:
            self._description += f" rescale_grad={rescale}"
        lr = self._lr
        self._schedule = callable(lr)
        prefix = [
            optax.scale(rescale) if rescale is not None else None,  # MXNet: before clipping
            optax.clip(clip) if clip is not None else None,
            optax.clip_by_global_norm(clip_norm) if clip_norm is not None else None,
        ]
        prefix = [t for t in prefix if t is not None]

        def make(learning_rate):
            return optax.chain(*prefix, direction(learning_rate))

        if lr is None:
            self._tx = make(None)
        else:
            self._tx = optax.inject_hyperparams(make, hyperparam_dtype=jnp.float32)(
                learning_rate=lr
            )
        # Gradual-unfreezing plans attached to the Parameters: carried out at step 0 already.
        self._agenda = Agenda()
        self._agenda.adopt(self._plist, 0)
        self._follow_plans()
        self._check_trainable_dtypes()
        self._opt_state = self._init_state()  # sets _state, and _parts to None
        self._log.clear()
        self._dirty = False
        self._train_fns: dict[Any, Callable] = {}
        self._losses_by_site: dict[tuple[str, int], int] = {}
        self._inputs: tuple[dict[str, Any], dict[str, Any]] | None = None
        self._reused = False  # whether the last gather reused the previous step's outputs
        self._out = Outputs()  # the last step's values, which the Parameters follow
        self._apply_fn = jax.jit(
            self._lrmult_apply_step, donate_argnums=(0, 1), static_argnames="outer"
        )

    def _direction(self, optimizer: Any, opts: dict[str, Any]) -> Callable[[Any], Any]:
        """Validate `optimizer` / `optimizer_params`; return learning_rate -> transformation."""
        pd = self._params
        # The override dicts are not handed to the chain: inject_hyperparams rebuilds the chain at
        # every update, and its structure must not depend on them. `_sync` writes their effect
        # into the state instead.
        if isinstance(optimizer, str):
            key = optimizer.lower()
            if key not in OPTIMIZERS:
                raise ValueError(
                    f"Trainer: unknown optimizer {optimizer!r}{suggest(key, OPTIMIZERS)}; "
                    f"known: {', '.join(OPTIMIZERS)} (or pass an optax.GradientTransformation)"
                )
            factory = OPTIMIZERS[key]
            accepted = [p for p in inspect.signature(factory).parameters if p not in _MULT_ARGS]
            kwargs = {}
            for k, v in opts.items():
                arg = _GLUON_KEYS.get(k, k)
                if arg not in accepted:
                    known = sorted(set(accepted) | set(_GLUON_KEYS) | set(_TRAINER_KEYS))
                    raise ValueError(
                        f"Trainer: optimizer_params key {k!r} is not an argument of "
                        f"{key!r}{suggest(k, known)}; accepted: {', '.join(known)}"
                    )
                kwargs[arg] = check_hyperparameter(arg, v, f"Trainer: optimizer_params[{k!r}]")
            self._lr = kwargs.pop("learning_rate", _DEFAULT_LR[key])
            check_learning_rate(self._lr, "Trainer")
            default_wd = inspect.signature(factory).parameters["weight_decay"].default
            self._wd = float(kwargs.get("weight_decay", default_wd))
            self._description = (
                f"{key}({', '.join(f'{k}={v!r}' for k, v in sorted(kwargs.items()))})"
            )

            def direction(learning_rate):
                return factory(learning_rate, **kwargs, param_dict=pd, track=False)

            return direction
        if isinstance(optimizer, optax.GradientTransformation):
            unknown = set(opts) - {"learning_rate", "wd"}
            if unknown:
                k = sorted(unknown)[0]
                raise ValueError(
                    f"Trainer: optimizer_params key {k!r} does not apply to a custom optax "
                    f"transformation (configure it there); accepted here: learning_rate, wd, "
                    f"lr_scheduler, clip_gradient, clip_global_norm, rescale_grad"
                )
            self._lr = opts.get("learning_rate")
            self._description = "a custom optax transformation"
            if self._lr is not None:
                check_learning_rate(self._lr, "Trainer")
            wd = check_hyperparameter("weight_decay", opts.get("wd", 0.0), "Trainer: wd")
            self._wd = float(wd)

            def direction(learning_rate):
                return custom(optimizer, learning_rate, wd, param_dict=pd, track=False)

            return direction
        raise TypeError(
            f"Trainer: optimizer must be a name or an optax.GradientTransformation, "
            f"got {type(optimizer).__name__}"
        )

    # -- properties ---------------------------------------------------------------------------
    @property
    def params(self) -> ParamDict:
        """The ParamDict this Trainer updates (sharing the Parameter objects)."""
        return self._params

    @property
    def opt_state(self) -> Any:
        """The optimizer state pytree (frozen parameters hold no state in it)."""
        return self._opt_state

    @property
    def _opt_state(self) -> Any:
        # Kept as the step hands it over, `(outer, rest, mults)`, and joined into a tree only
        # when read: a step then spends no Python per node of the state (a flatten with an
        # is_leaf test, an unflatten: ~40 us a step at 20 leaves).
        if self._state is None:
            self._state = _join_state(*self._parts)
        return self._state

    @_opt_state.setter
    def _opt_state(self, state: Any) -> None:
        self._state, self._parts = state, None

    def _split(self) -> tuple[Any, list[Any], tuple]:
        """The state as `(outer, rest, mults)` (see `_split_state`), split once per new state."""
        if self._parts is None:
            self._parts = _split_state(self._state)
        return self._parts

    def _stepped(self, outer: Any, rest: list[Any], mults: tuple) -> None:
        """Take the state a step handed back (its tree is joined when next read)."""
        self._state, self._parts = None, (outer, rest, mults)

    @property
    def num_update(self) -> int:
        """How many steps this Trainer has taken (MXNet's `Optimizer.num_update`).

        Gradual-unfreezing plans (`presets.gradual_unfreezing`) count in it: the next step is
        step `num_update` of the plan.
        """
        return self._log.steps

    @property
    def learning_rate(self) -> float | None:
        """The current base learning rate (a schedule's value at the current step)."""
        if self._lr is None:
            return None
        if self._schedule:
            return float(self._lr(int(host_value(self._opt_state.count))))
        return host_value(self._opt_state.hyperparams["learning_rate"])

    def set_learning_rate(self, lr: float) -> None:
        """Set the base learning rate; takes effect at the next step, without recompiling."""
        if self._lr is None:
            raise ValueError(
                "set_learning_rate: the custom optax transformation owns its learning rate; "
                "pass optimizer_params={'learning_rate': ...} to let the Trainer drive it"
            )
        if self._schedule:
            raise ValueError(
                "set_learning_rate: the learning rate is driven by a schedule; "
                "build a Trainer with a float learning_rate to set it by hand"
            )
        if callable(lr):
            raise TypeError("set_learning_rate: lr must be a number; a schedule is set at build")
        lr = check_learning_rate(lr, "set_learning_rate")
        state = self._opt_state
        hyper = dict(state.hyperparams)
        old = hyper["learning_rate"]
        # Same dtype and placement as before: the jitted step sees the same input signature.
        hyper["learning_rate"] = place_like(lr, old, old.dtype)
        self._opt_state = state._replace(hyperparams=hyper)

    # -- the lookup chain's override dicts --------------------------------------------------------
    def set_lr_mult(
        self, args_lr_mult: Mapping[int | str, float], replace: bool = False
    ) -> dict[int | str, float]:
        """Merge `{index or name: multiplier}` into the lr_mult overrides (MXNet's `set_lr_mult`).

        MXNet replaces the whole dict at each call, so `set_lr_mult({'a': 0})` then
        `set_lr_mult({'b': 0})` silently drops `a`; lrmult merges. `replace=True` is MXNet's
        behaviour. A key naming no parameter is a `KeyError`; a key whose Parameter has `lr_mult`
        set (so the override could never act) is a `ValueError`.

        Returns:
          The override dict now in force.
        """
        return self._set_overrides("lr_mult", self._lr_overrides, args_lr_mult, replace)

    def set_wd_mult(
        self, args_wd_mult: Mapping[int | str, float], replace: bool = False
    ) -> dict[int | str, float]:
        """Merge `{index or name: multiplier}` into the wd_mult overrides (see `set_lr_mult`)."""
        return self._set_overrides("wd_mult", self._wd_overrides, args_wd_mult, replace)

    def _set_overrides(self, attr, current, new, replace):
        if not isinstance(replace, bool):
            raise TypeError(f"set_{attr}: replace must be True or False, got {replace!r}")
        new = lookup.normalize_overrides(attr, new)
        lookup.check_override_keys(attr, new, self._leaves, self._params)
        if replace:
            current.clear()
        current.update(new)
        self._dirty = True
        return dict(current)

    # -- Gluon's other names ------------------------------------------------------------------
    @property
    def optimizer(self) -> optax.GradientTransformation:
        """The optax transformation this Trainer applies (Gluon's `Trainer.optimizer`)."""
        return self._tx

    def update(self, batch_size: int | float = 1) -> None:
        """Refused: Gluon's `update` applies gradients stored on the Parameters; lrmult stores none.

        Raises:
          TypeError: always, naming `step(grads, batch_size)` and `train_step(loss_fn, ...)`.
        """
        raise TypeError(
            "Trainer.update: lrmult keeps no gradients on the Parameters (JAX returns them); "
            "call trainer.step(grads, batch_size) with the gradients, or "
            "trainer.train_step(loss_fn, *args) to compute and apply them in one jitted step"
        )

    def allreduce_grads(self) -> None:
        """Refused: under `jax.jit`, gradients of sharded parameters are reduced by XLA.

        Raises:
          TypeError: always, naming the lrmult way.
        """
        raise TypeError(
            "Trainer.allreduce_grads: there is nothing to reduce by hand: with parameters on a "
            "mesh (NamedSharding) the jitted step reduces gradients itself; call "
            "trainer.step(grads, batch_size) or trainer.train_step(loss_fn, *args)"
        )

    def summary(self) -> Table:
        """A one-row table: optimizer, base rates, parameter counts, overrides, steps taken.

        A gradual-unfreezing plan follows it: each group's step and its state now.
        """
        self._follow_plans()
        frozen = sum(1 for _, p in self._plist if p.frozen)
        lr = self.learning_rate
        row = _Summary(
            self._description,
            float("nan") if lr is None else lr,
            self._wd,
            len(self._plist),
            len(self._plist) - frozen,
            frozen,
            len(self._lr_overrides) + len(self._wd_overrides),
            self._log.steps,
        )
        return Table(
            [row], title=type(self).__name__, appendix=self._agenda.tables(self._log.steps)
        )

    def __repr__(self) -> str:
        return str(self.summary())

    def _repr_html_(self) -> str:
        return self.summary()._repr_html_()

    def explain(self) -> Table:
        """Each parameter's multipliers, effective learning rate, and which link set each value.

        As the next step will use them; a gradual-unfreezing plan follows the table: each
        group's step, its state now (frozen, ramping, trainable) and its `lr_mult` factor.
        """
        self._follow_plans()
        lr = self.learning_rate
        base = float("nan") if lr is None else lr
        rows = report.rows(
            self._leaves,
            self._params,
            self._lr_overrides,
            self._wd_overrides,
            base,
            self._wd,
            step=clock(self._opt_state),
        )
        out = report.table(rows, "Trainer.explain", base, self._wd)
        out.appendix = self._agenda.tables(self._log.steps)
        return out

    # -- checkpoints ------------------------------------------------------------------------------
    def save_states(self, path: str | os.PathLike) -> None:
        """Save the optimizer state, step count, learning rate, multipliers and overrides (orbax).

        Every Parameter's multipliers and frozen flag are saved with whether each was set, and
        the state's cohorts (which leaves joined training together, so share a step count).
        Parameter values are saved separately, by `params.save(path)`. Each call adds a new step
        to the checkpoint directory; the two latest are kept. With several processes
        (`jax.distributed`), every process calls `save_states`; orbax writes each one's shards.
        The step count (`num_update`) and the position in a gradual-unfreezing plan are saved too.
        """
        self._follow_plans()
        arrays = by_path(self._opt_state)
        meta = {
            "optimizer": self._description,
            "params": self._params.describe(),
            "lr_overrides": [[k, v] for k, v in self._lr_overrides.items()],
            "wd_overrides": [[k, v] for k, v in self._wd_overrides.items()],
            "structure": structure(self._opt_state),
            "num_update": self._log.steps,
            "plans": self._agenda.describe(),
        }
        checkpoint.write(path, _TRAINER_FORMAT, arrays, meta)

    def load_states(self, path: str | os.PathLike, strict: bool = True) -> Table | None:
        """Restore what `save_states` saved; training then continues bit for bit.

        The saved `lr_mult` / `wd_mult` / `frozen` (set or unset) are written back onto the
        Parameters. With `strict=True` a checkpoint whose parameter names, shapes or dtypes (or
        optimizer) differ is refused, naming the first mismatch, before anything changes; a
        missing path is a `FileNotFoundError`. The state's arrays take the shardings of this
        Trainer's parameters, whatever the processes and devices that saved them.

        Args:
          path: the checkpoint directory.
          strict: False restores by parameter name, for a model that changed since (a new head):
            parameters in both with the same shape and dtype get their saved state, multipliers
            and step count; new ones start fresh with a step count of their own; saved ones the
            model no longer has are dropped; a shape or dtype change starts that one fresh. A
            different optimizer is still refused.

        Returns:
          With `strict=False`, a report: one row per parameter, restored / fresh / reset /
          dropped, with the reason (it prints, and shows as HTML in notebooks).
        """
        if not isinstance(strict, bool):
            raise TypeError(f"load_states: strict must be True or False, got {strict!r}")
        where = f"checkpoint {os.fspath(path)!r}"
        meta, read_arrays = checkpoint.read(path, _TRAINER_FORMAT)
        if strict:
            self._params.check_matches(meta["params"], where)
        if meta["optimizer"] != self._description:
            raise ValueError(
                f"{where} was saved by a Trainer with optimizer {meta['optimizer']}; this one "
                f"has {self._description}"
            )
        params = dict(self._plist)
        # A plan: the one these Parameters follow must be the saved one; none: it is rebuilt.
        # Its groups unfroze at different steps, each a cohort with a step count of its own:
        # the saved structure rebuilds them before the arrays go in.
        saved_plans = meta.get("plans", [])
        self._agenda.adopt(self._plist, self._log.steps)
        self._agenda.check_saved(saved_plans, where)
        plans = [run.plan for run in self._agenda.runs]
        rebuilt = [] if plans else [Plan.from_description(d["plan"], params) for d in saved_plans]
        rows, kept = self._params.match_report(meta["params"])
        before = {n: p.metadata() for n, p in self._plist}
        overrides = (dict(self._lr_overrides), dict(self._wd_overrides))
        fresh = [n for n in params if n not in kept]
        try:
            for d in meta["params"]:
                if d["name"] in kept:
                    params[d["name"]].restore_metadata(d)
            for n in fresh:  # kept out of the carried state, then back in as a new cohort
                params[n].assign("frozen", True)
            layers = lookup.layer_names(self._params, kept)
            self._lr_overrides = _known(meta["lr_overrides"], kept, strict, layers)
            self._wd_overrides = _known(meta["wd_overrides"], kept, strict, layers)
            self._check_trainable_dtypes()
            state = self._refreshed(saved=meta.get("structure"))
            saved = meta["arrays"]
            like = {
                k: x
                for k, x in by_path(state).items()
                if k in saved and saved[k] == [list(x.shape), str(x.dtype)]
            }
            self._opt_state = carry_over(read_arrays(like), state)
            # The multipliers saved in the state may predate a change made before the save: the
            # restored Parameters are the truth (same structure: nothing recompiles).
            self._opt_state = self._refreshed()
            for plan in rebuilt:
                for name in dict.fromkeys(n for group in plan.members for n, _ in group):
                    params[name].follow(plan)
            self._log.steps = int(meta.get("num_update", 0))
            self._agenda.restore(saved_plans, plans or rebuilt)
        except BaseException:
            for n, raw in before.items():
                params[n].restore_metadata(raw)
            for plan in rebuilt:
                for name in dict.fromkeys(n for group in plan.members for n, _ in group):
                    params[name].follow(None)
            self._lr_overrides, self._wd_overrides = overrides
            raise
        self._log.clear()
        self._inputs = None
        self._dirty = False
        for n in fresh:  # their own frozen flags again: the next step gives them fresh state
            params[n].restore_metadata(before[n])
        return None if strict else Table(rows, title=f"load_states({os.fspath(path)!r})")

    def _refreshed(self, state: Any = None, saved: Mapping[str, Any] | None = None) -> Any:
        """The optimizer state (or `state`) brought up to date with the Parameters and overrides.

        Args:
          state: the state to bring up to date (the Trainer's by default).
          saved: a checkpoint's `structure`: the state is rebuilt with its cohorts, unfilled.
        """
        state = refresh_state(
            self._opt_state if state is None else state,
            self._params,
            overrides={"lr_mult": self._lr_overrides, "wd_mult": self._wd_overrides},
            saved=saved,
        )
        return self._on_mesh(state)

    def _init_state(self) -> Any:
        """A fresh optimizer state for the Parameters' current frozen set."""
        values = {n: self._params[n].peek() for n in self._names}
        return self._on_mesh(self._tx.init(values), values.values())

    def _on_mesh(self, state: Any, values: Any = None) -> Any:
        """`state` with the arrays init left uncommitted replicated on the parameters' mesh.

        optax's step counts come out of `init` uncommitted, and out of the jitted step replicated
        on the mesh: otherwise the next step's inputs differ in placement from this one's, and
        the step compiles twice for one frozen set. Nothing changes off a mesh.
        """
        values = (p.peek() for p in self._params.values()) if values is None else values
        like = next(
            (v for v in values if isinstance(getattr(v, "sharding", None), NamedSharding)), None
        )
        if like is None:
            return state
        return jax.tree.map(
            lambda x: x if getattr(x, "committed", True) else place_like(x, like, x.dtype), state
        )

    # -- stepping ---------------------------------------------------------------------------------
    def _check_trainable_dtypes(self) -> None:
        for name, p in self._params.items():
            if not p.frozen and not jnp.issubdtype(p.dtype, jnp.inexact):
                raise TypeError(
                    f"Trainer: parameter {name!r} has dtype {p.dtype} and cannot be trained; "
                    f"freeze it (params[{name!r}].frozen = True) or make it floating point"
                )

    def _follow_plans(self) -> None:
        """Carry out what gradual-unfreezing plans say for the next step: O(1) when nothing is due.

        Plans are looked for on the Parameters after a metadata change only (attaching one is
        one); the frozen flags and `lr_mult` they set are taken in by `_sync`, as a user's.
        """
        if self._log.metadata:
            self._agenda.adopt(self._plist, self._log.steps)
        if self._log.steps >= self._agenda.due:
            self._agenda.carry_out(self._params, self._log.steps, self._leaves, self._lr_overrides)

    def _sync(self) -> None:
        """Bring the optimizer state up to date with the Parameters' metadata and the overrides."""
        if not self._log.metadata and not self._dirty:
            return
        self._check_trainable_dtypes()
        self._opt_state = self._refreshed()
        self._log.metadata.clear()
        self._inputs = None  # the frozen set may have changed
        self._dirty = False

    def _gather(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The step's inputs: trainable values (FrozenLeaf where frozen), and frozen values."""
        self._reused = self._inputs is not None and not self._log.values
        if self._reused:
            return self._inputs  # nothing touched the Parameters since our last write-back
        self._inputs = None  # until a step writes back (a failed step must not leave it valid)
        trainable: dict[str, Any] = {}
        frozen: dict[str, Any] = {}
        for name, p in self._plist:
            value = p.peek()
            if p.frozen:
                trainable[name] = _FROZEN
                frozen[name] = value
            elif p.donatable:
                trainable[name] = value
            else:
                # The user still holds this array: give the donating step a copy of its own.
                trainable[name] = jnp.array(value, dtype=value.dtype, copy=True)
        self._log.values.clear()
        return trainable, frozen

    def _write_back(self, new: Mapping[str, Any], frozen: Mapping[str, Any]) -> None:
        """Make the step's results the Parameters' values: O(1) while nothing else touched them.

        The Parameters follow `self._out`, so a step only replaces its values; after a change (a
        value handed out or set, a new frozen set, another owner's step) every trainable
        Parameter is attached again, which tells the other owners.
        """
        out = self._out
        if not self._reused:
            for name, p in self._plist:
                if is_masked(new[name]):
                    p.release(out)  # frozen now: keeps the value it has, before it is replaced
        out.values = new
        if not self._reused:
            for name, p in self._plist:
                if not is_masked(new[name]):
                    p.hold(out, name, self._log)
        self._inputs = (new, frozen)

    def _update(self, grads, parts, trainable):
        """The update inside both jitted steps; with `check_finite`, a no-op on bad gradients.

        `parts` is `(outer, rest, mults)` of `_split_state`; the new state comes back as `rest`.
        """
        new, new_state, finite = self._update_state(grads, _join_state(*parts), trainable)
        return new, _split_state(new_state)[1], finite

    def _update_state(self, grads, opt_state, trainable):
        grads = zero_frozen_layers(grads, opt_state)  # before any clipping
        updates, new_state = self._tx.update(grads, opt_state, trainable)
        new = optax.apply_updates(trainable, updates)
        if not self._check_finite:
            return new, new_state, None
        finite = jax.tree.map(lambda g: jnp.all(jnp.isfinite(g)), grads)
        ok = jnp.all(jnp.stack(jax.tree.leaves(finite)))

        def keep(n, o):
            return jnp.where(ok, n, o)

        return jax.tree.map(keep, new, trainable), jax.tree.map(keep, new_state, opt_state), finite

    def _raise_if_not_finite(self, finite) -> None:
        if finite is None:
            return
        flags = jax.device_get({n: f for n, f in finite.items() if not is_masked(f)})
        bad = [n for n in self._names if n in flags and not bool(flags[n])]
        if bad:
            raise FloatingPointError(
                f"non-finite gradient for parameter {bad[0]!r}"
                + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
                + "; nothing was updated"
            )

    def _lrmult_apply_step(self, trainable, rest, mults, grads, scale, outer):
        grads = jax.tree.map(lambda g: (g * scale).astype(g.dtype), grads)
        return self._update(grads, (outer, rest, mults), trainable)

    def _grads_by_name(self, grads: Any) -> dict[str, Any]:
        names = self._names
        if isinstance(grads, Mapping) and all(k in self._params for k in grads):
            flat = dict(grads)  # {} is fine when every parameter is frozen
        else:
            leaves, treedef = jax.tree.flatten(grads)
            if treedef != self._treedef:
                raise ValueError(f"step: {self._grads_mismatch(grads)}")
            flat = dict(zip(self._order, leaves, strict=True))
        out = {}
        for name in names:
            p = self._params[name]
            if p.frozen:
                continue
            if name not in flat:
                raise KeyError(f"step: no gradient for parameter {name!r}")
            g = flat[name]
            if isinstance(g, np.generic):
                g = np.asarray(g)
            if not isinstance(g, (jax.Array, np.ndarray)):
                raise TypeError(f"step: gradient of {name!r} is a {type(g).__name__}, not an array")
            p.check_like(g, f"step: the gradient of {name!r}")
            out[name] = jnp.asarray(g, dtype=g.dtype) if getattr(g, "weak_type", False) else g
        return out

    def _grads_mismatch(self, grads: Any) -> str:
        """Which leaf a gradient tree lacks (or has in excess), with the closest names."""
        flat_names = isinstance(grads, Mapping) and all(
            isinstance(k, str) and "/" in k for k in grads
        )
        if flat_names:
            got = [k for k in grads if isinstance(k, str)]
        else:
            got = [leaf.path for leaf in lookup.leaves_of(grads, None, None)]
        missing = [n for n in self._order if n not in got]
        extra = [n for n in got if n not in self._params]
        shape = "a {name: grad} dict" if flat_names else "a tree shaped like params.tree()"
        if extra:
            return (
                f"grads ({shape}) has {extra[0]!r}, which names no parameter"
                f"{suggest(extra[0], self._names)}"
            )
        if missing:
            return f"grads ({shape}) has no gradient for parameter {missing[0]!r}"
        return "grads must be shaped like params.tree() or be a {name: grad} dict"

    def step(self, grads: Any, batch_size: int | float = 1) -> None:
        """Apply one update from `grads` (rescaled by `1 / batch_size`), as Gluon's `step`.

        Args:
          grads: gradients shaped like `params.tree()`, or a `{name: grad}` dict (frozen
            parameters' gradients may be left out; they are ignored).
          batch_size: the gradients are multiplied by `1 / batch_size`.
        """
        if isinstance(batch_size, bool) or not isinstance(
            batch_size, (int, float, np.integer, np.floating)
        ):
            raise TypeError(f"step: batch_size must be a number, got {type(batch_size).__name__}")
        if not batch_size > 0 or not math.isfinite(batch_size):
            raise ValueError(f"step: batch_size must be a finite number > 0, got {batch_size!r}")
        _refuse_tracers("step", grads)
        self._follow_plans()
        flat = self._grads_by_name(grads)
        if not flat:
            self._log.steps += 1  # every parameter is frozen: nothing to update, still a step
            return
        self._sync()
        trainable, frozen = self._gather()
        g = {n: (flat[n] if n in flat else optax.MaskedNode()) for n in self._names}
        g = {n: (optax.MaskedNode() if is_masked(trainable[n]) else v) for n, v in g.items()}
        outer, rest, mults = self._split()
        new, rest, finite = self._apply_fn(
            trainable, rest, mults, g, jnp.float32(1.0 / batch_size), outer=outer
        )
        _refuse_tracers("step", _one_output(new))
        self._stepped(outer, rest, mults)
        self._write_back(new, frozen)
        self._raise_if_not_finite(finite)
        self._log.steps += 1

    def _train_fn(self, loss_fn: Callable, has_aux: bool) -> Callable:
        key = (loss_fn, has_aux)
        fn = self._train_fns.get(key)
        if fn is not None:
            return fn
        self._note_new_loss(loss_fn)
        update, treedef, order = self._update, self._treedef, self._order
        fname = getattr(loss_fn, "__name__", repr(loss_fn))

        def lrmult_train_step(trainable, frozen, rest, mults, args, outer):
            def objective(tr):
                values = {**frozen, **{n: v for n, v in tr.items() if not is_masked(v)}}
                out = loss_fn(jax.tree.unflatten(treedef, [values[n] for n in order]), *args)
                if has_aux and not (isinstance(out, tuple) and len(out) == 2):
                    raise TypeError(
                        f"train_step: with has_aux=True, {fname} must return (loss, aux)"
                    )
                loss = out[0] if has_aux else out
                if not hasattr(loss, "shape") or loss.shape != ():
                    raise TypeError(
                        f"train_step: {fname} must return a scalar loss, got "
                        f"{type(loss).__name__} of shape {getattr(loss, 'shape', None)}"
                    )
                if not jnp.issubdtype(loss.dtype, jnp.floating):
                    raise TypeError(
                        f"train_step: {fname} must return a floating-point loss, got dtype "
                        f"{loss.dtype}; cast it, e.g. loss.astype(jnp.float32)"
                    )
                return out

            out, grads = jax.value_and_grad(objective, has_aux=has_aux)(trainable)
            return (*update(grads, (outer, rest, mults), trainable), out)

        fn = jax.jit(lrmult_train_step, donate_argnums=(0, 2), static_argnames="outer")
        self._train_fns[key] = fn
        return fn

    def _note_new_loss(self, loss_fn: Callable) -> None:
        """Warn once per call site that keeps handing in new loss function objects."""
        site = user_site()
        seen = self._losses_by_site.setdefault(site, 0) + 1
        self._losses_by_site[site] = seen
        if seen == _NEW_LOSSES_WARNED:
            name = getattr(loss_fn, "__name__", repr(loss_fn))
            warnings.warn(
                f"train_step: {seen} different loss function objects ({name!r}) came from "
                f"{site[0]}:{site[1]}, and each compiles a new step; define the loss function "
                f"once, outside the loop, and pass the same object",
                stacklevel=user_stacklevel(),
            )

    def train_step(self, loss_fn: Callable, *args: Any, has_aux: bool = False) -> Any:
        """One jitted step: the gradient of `loss_fn(params.tree(), *args)` and its update.

        Only trainable parameters are differentiated. The step is compiled once per `loss_fn`
        and frozen set; keep passing the same function object.

        Returns:
          The loss (and the aux output when `has_aux`), as computed before the update.
        """
        if not callable(loss_fn):
            raise TypeError(f"train_step: loss_fn must be callable, got {type(loss_fn).__name__}")
        _refuse_tracers("train_step", args)
        fn = self._train_fn(loss_fn, has_aux)
        self._follow_plans()
        self._sync()
        trainable, frozen = self._gather()
        outer, rest, mults = self._split()
        new, rest, finite, out = fn(trainable, frozen, rest, mults, args, outer=outer)
        _refuse_tracers("train_step", out)  # a jit around us with no traced argument
        self._stepped(outer, rest, mults)
        self._write_back(new, frozen)
        self._raise_if_not_finite(finite)
        self._log.steps += 1
        return out
