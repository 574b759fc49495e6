"""flax interop: ParamDicts from NNX modules and Linen params, and a Trainer that drives NNX.

- `from_nnx` / `from_linen`: `ParamDict.from_nnx` and `ParamDict.from_linen` under their flax
  names (the ParamDict builds itself; `flax_trees.py` sees through flax's objects).
- `NNXTrainer(model, ...)`: Gluon's `Trainer` on an NNX module, updated in place.
- `refresh_optimizer(optimizer)`: `lrmult.refresh` for an `nnx.Optimizer` built on a ready chain.

flax is imported on first use, so `import lrmult` stays light.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from lrmult._names import path_name
from lrmult.flax_trees import nnx_variables
from lrmult.lookup import is_masked
from lrmult.paramdict import ParamDict
from lrmult.resync import refresh
from lrmult.trainer import Trainer


def _nnx():
    from flax import nnx

    return nnx


from_nnx = ParamDict.from_nnx
from_linen = ParamDict.from_linen


class NNXTrainer(Trainer):
    """Gluon's `Trainer` driving a flax NNX module, whose Variables it updates in place.

    The module stays the source of truth: values you assign to it between steps are picked up,
    and after every step its `wrt` Variables hold the new values (arrays that stay valid after
    later steps). Other Variables (batch statistics, RNG counters) changed by the loss function
    are written back too. Frozen parameters are not differentiated.

    Args:
      model: the `nnx.Module` to train.
      params: the ParamDict from `from_nnx(model, wrt)` carrying your multipliers, or `None` to
        build it (then set multipliers on `trainer.params`).
      optimizer: as for `Trainer` (a name or an `optax.GradientTransformation`).
      optimizer_params: as for `Trainer` (Gluon's keys).
      wrt: the nnx filter of the Variables to train; `None` means `nnx.Param`.
      **trainer_options: `Trainer`'s keyword options (`check_finite=True`).

    Example:
      >>> trainer = lrmult.NNXTrainer(model, None, "adamw", {"learning_rate": 1e-3})
      >>> trainer.params.select(".*bias").setattr("wd_mult", 0.0)
      >>> def loss_fn(model, x, y):  # one function object: compiled once
      ...     return jnp.mean((model(x) - y) ** 2)
      >>> loss = trainer.train_step(loss_fn, x, y)
    """

    def __init__(
        self,
        model: Any,
        params: ParamDict | None = None,
        optimizer: Any = "sgd",
        optimizer_params: Mapping[str, Any] | None = None,
        *,
        wrt: Any = None,
        **trainer_options: Any,
    ) -> None:
        nnx = _nnx()
        if not isinstance(model, nnx.Pytree):
            raise TypeError(f"NNXTrainer: expected an nnx.Module, got {type(model).__name__}")
        wrt = nnx.Param if wrt is None else wrt
        if params is None:
            params = from_nnx(model, wrt)
        elif not isinstance(params, ParamDict):
            raise TypeError(
                f"NNXTrainer: params must be a ParamDict from lrmult.from_nnx(model), "
                f"got {type(params).__name__}"
            )
        self._model = model
        self._wrt = wrt
        self._check_names(list(nnx_variables(model, wrt)), list(params))
        super().__init__(params, optimizer, optimizer_params, **trainer_options)
        # The array each model Variable held when last seen: any other one was assigned by the
        # user and is taken at the next step (so is, at the first, a model array `params` lacks).
        self._pushed = {n: p.peek() for n, p in self.params.items()}
        self._nnx_losses: dict[Any, Callable] = {}

    @property
    def model(self) -> Any:
        """The NNX module this Trainer updates."""
        return self._model

    @staticmethod
    def _check_names(model_names: list[str], names: list[str]) -> None:
        missing = [n for n in model_names if n not in set(names)]
        extra = [n for n in names if n not in set(model_names)]
        if missing or extra:
            what = (
                f"the model's Variable {missing[0]!r} has no Parameter"
                if missing
                else f"Parameter {extra[0]!r} names no Variable of the model"
            )
            raise ValueError(
                f"NNXTrainer: {what}; build params with lrmult.from_nnx(model, wrt) (no prefix) "
                f"and freeze what should not train"
            )

    def _pull(self, state: Any) -> None:
        """Take into the Parameters the arrays assigned to the model since the last step.

        Args:
          state: `nnx.state(model, wrt)` (or the params part of `nnx.split`), taken now.
        """
        nnx = _nnx()
        flat = jax.tree_util.tree_flatten_with_path(
            state, is_leaf=lambda x: isinstance(x, nnx.Variable)
        )[0]
        names = [path_name(path) for path, _ in flat]
        if names != list(self._pushed):
            self._check_names(names, list(self.params))
        for name, (_, var) in zip(names, flat, strict=True):
            value = var.get_value()
            if value is not self._pushed[name]:
                self.params[name].set_data(value)
                self._pushed[name] = value

    def _push(self, *other: Any) -> None:
        """Write the Parameters' values (and `other` states) into the model."""
        tree = self.params.tree()  # data(): the model's arrays stay valid after later steps
        _nnx().update(self._model, tree, *other)
        for name, p in self.params.items():
            self._pushed[name] = p.peek()

    def _nnx_loss(self, loss_fn: Callable, has_aux: bool, graphdef: Any) -> Callable:
        key = (loss_fn, has_aux, graphdef)
        fn = self._nnx_losses.get(key)
        if fn is not None:
            return fn
        nnx, wrt = _nnx(), self._wrt

        def lrmult_nnx_loss(tree, rest, *args):
            model = nnx.merge(graphdef, tree, rest)
            out = loss_fn(model, *args)
            new_rest = nnx.as_pure(nnx.split(model, wrt, ...)[2])
            if has_aux:
                if not (isinstance(out, tuple) and len(out) == 2):
                    name = getattr(loss_fn, "__name__", repr(loss_fn))
                    raise TypeError(
                        f"train_step: with has_aux=True, {name} must return (loss, aux)"
                    )
                return out[0], (out[1], new_rest)
            return out, (None, new_rest)

        self._nnx_losses[key] = lrmult_nnx_loss
        return lrmult_nnx_loss

    def train_step(self, loss_fn: Callable, *args: Any, has_aux: bool = False) -> Any:
        """One jitted step on `loss_fn(model, *args)`; the model is updated in place.

        Only trainable parameters are differentiated. Other Variables the loss function changes
        (batch statistics, RNG counters) are written back to the model. Compiled once per
        `loss_fn`, frozen set and model graph (e.g. `model.train()` / `model.eval()`).

        Returns:
          The loss (and the aux output when `has_aux`), as computed before the update.
        """
        if not callable(loss_fn):
            raise TypeError(f"train_step: loss_fn must be callable, got {type(loss_fn).__name__}")
        nnx = _nnx()
        graphdef, state, rest = nnx.split(self._model, self._wrt, ...)
        self._pull(state)
        fn = self._nnx_loss(loss_fn, has_aux, graphdef)
        loss, (aux, new_rest) = super().train_step(fn, nnx.as_pure(rest), *args, has_aux=True)
        self._push(new_rest)
        return (loss, aux) if has_aux else loss

    def step(self, grads: Any, batch_size: int | float = 1) -> None:
        """Apply one update from `grads` (e.g. `nnx.grad(loss_fn)(model)`) to the model.

        Args:
          grads: an `nnx.State` of gradients (Variables or arrays) named like the model's
            parameters, or a `{name: grad}` dict; frozen parameters' gradients are ignored.
          batch_size: the gradients are multiplied by `1 / batch_size`.
        """
        nnx = _nnx()
        if isinstance(grads, nnx.State) or not isinstance(grads, Mapping):
            flat = jax.tree_util.tree_flatten_with_path(nnx.as_pure(grads))[0]
            grads = {path_name(path): g for path, g in flat}
            unknown = [n for n in grads if n not in self.params]
            if unknown:
                raise ValueError(
                    f"step: gradient {unknown[0]!r} names no parameter of this trainer; take "
                    f"gradients with respect to the same Variables (wrt={self._wrt!r})"
                )
        self._pull(nnx.state(self._model, self._wrt))
        super().step(grads, batch_size)
        self._push()


def refresh_optimizer(
    optimizer: Any, param_dict: ParamDict | None = None, *, params: Any = None
) -> None:
    """`lrmult.refresh` for an `nnx.Optimizer` built on lrmult's transformations, in place.

    Call it after changing multipliers, the frozen set or `decay_to_init` between steps. Changed
    multipliers cause no retrace of an `nnx.jit` step; a changed frozen (or anchored) set gives
    the state its new structure (one trace), carrying over the state of every leaf that stays.

    Args:
      optimizer: an `nnx.Optimizer` whose `tx` holds lrmult's transformations.
      param_dict: the ParamDict to read; defaults to the one the transformations were built with.
      params: the model's trained state (`nnx.state(model, nnx.Param)`), whose values newly
        anchored parameters (`decay_to_init`) take as w₀; else their Parameters' values.
    """
    nnx = _nnx()
    if not isinstance(optimizer, nnx.Optimizer):
        raise TypeError(
            f"refresh_optimizer: expected an nnx.Optimizer, got {type(optimizer).__name__}"
        )
    old = optimizer.opt_state
    pure = None if params is None else nnx.as_pure(params)
    new = refresh(nnx.as_pure(old), param_dict, params=pure)
    optimizer.opt_state = nnx.data(_rewrap(old, new))


def _rewrap(old: Any, new: Any) -> Any:
    """`new` (pure) wrapped like `old`: the same Variable type and metadata at the same path."""
    nnx = _nnx()
    from flax.nnx.training.optimizer import OptArray

    def is_var(x):
        return isinstance(x, nnx.Variable)

    old_vars = {
        path: var
        for path, var in jax.tree_util.tree_flatten_with_path(old, is_leaf=is_var)[0]
        if is_var(var)
    }

    def wrap(path, x):
        if is_masked(x):
            return x
        var = old_vars.get(path)
        if var is not None and np.shape(var.get_value()) == np.shape(x):
            return var.replace(x)
        return OptArray(x)

    return jax.tree_util.tree_map_with_path(wrap, new, is_leaf=is_masked)
