"""Presets: fine-tuning recipes that take more than one `select(...).setattr(...)` line.

Each sets Parameter attributes (link 1 of the lookup chain, shown as `param` in `explain()`),
validates everything before changing anything, and returns the ParamDict it changed, sharing the
Parameters, so the result can be printed or adjusted further.

- `no_decay`: no weight decay on biases and normalisation parameters.
- `layerwise_lr_decay`: `lr_mult = decay ** (n - 1 - i)` for layer group `i` of `n`.
- `linear_probe`: freeze everything but the head.

The one-line recipes need no preset: Gluon's fine-tuning tutorial is
`params.select("head/").setattr("lr_mult", 10.0)`, freezing a backbone is
`params.select("backbone/").setattr("frozen", True)`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

from lrmult.paramdict import ParamDict

Pattern = str | re.Pattern[str]


def _check_params(params: object, where: str) -> None:
    if not isinstance(params, ParamDict):
        raise TypeError(f"{where}: params must be a ParamDict, got {type(params).__name__}")


def no_decay(params: ParamDict, pattern: Pattern | None = None) -> ParamDict:
    """Set `wd_mult = 0` on biases and normalisation parameters.

    By default these are the parameters with at most one dimension (biases, LayerNorm and
    BatchNorm scales and offsets), the rule of timm and of the BERT/ViT recipes, which needs no
    naming convention. Give `pattern` (a regex, `re.match` as in `select`) to choose by name.

    Args:
      params: the ParamDict to change.
      pattern: a regex choosing the parameters instead of the one-dimension rule.

    Returns:
      The parameters now without weight decay.

    Raises:
      ValueError: no parameter is chosen.
    """
    _check_params(params, "no_decay")
    if pattern is not None:
        chosen = params.select(pattern)
    else:
        names = [n for n, p in params.items() if len(p.shape) <= 1]
        if not names:
            raise ValueError(
                "no_decay: no parameter has at most one dimension; "
                "choose them by name with pattern="
            )
        chosen = _subset(params, names)
    return chosen.setattr("wd_mult", 0.0)


def layerwise_lr_decay(params: ParamDict, decay: float, layers: Sequence[Pattern]) -> ParamDict:
    """Layer-wise learning-rate decay: group `i` of `n`, input first, gets `decay ** (n - 1 - i)`.

    The last group keeps the full rate (1.0), each group below it `decay` times its upper
    neighbour's. This is BEiT's and ELECTRA's layer-wise decay when `layers` lists the
    embedding, each block and the head; ULMFiT's discriminative fine-tuning is `decay = 1/2.6`.
    Parameters matched by no group are left as they are.

    Args:
      params: the ParamDict to change.
      decay: the factor between neighbouring groups, a finite number > 0 (usually < 1).
      layers: one regex per group (`re.match`, as in `select`), ordered from input to output.

    Returns:
      The parameters of all groups, with their new `lr_mult`.

    Raises:
      ValueError: `decay` is not a finite number > 0, a pattern matches nothing, or a parameter
        is matched by two groups.

    Example:
      >>> layerwise_lr_decay(params, 0.5, ["embed/", "layers/0/", "layers/1/", "head/"])
      >>> # embed 0.125, layers/0 0.25, layers/1 0.5, head 1.0
    """
    _check_params(params, "layerwise_lr_decay")
    if (
        isinstance(decay, bool)
        or not isinstance(decay, int | float | np.integer | np.floating)
        or not math.isfinite(decay)
        or not decay > 0
    ):
        raise ValueError(f"layerwise_lr_decay: decay must be a finite number > 0, got {decay!r}")
    if isinstance(layers, str | re.Pattern) or not isinstance(layers, Sequence) or not layers:
        raise TypeError(
            "layerwise_lr_decay: layers must be a non-empty list of patterns, one per group, "
            f"input first; got {layers!r}"
        )
    groups = [params.select(pattern) for pattern in layers]
    owner: dict[str, int] = {}
    for i, group in enumerate(groups):
        for name in group:
            if name in owner:
                raise ValueError(
                    f"layerwise_lr_decay: parameter {name!r} is matched by group "
                    f"{owner[name]} ({_show(layers[owner[name]])}) and group {i} "
                    f"({_show(layers[i])}); make the patterns disjoint (end them with '/')"
                )
            owner[name] = i
    n = len(groups)
    mults = [float(decay) ** (n - 1 - i) for i in range(n)]
    for i, m in enumerate(mults):
        if not (math.isfinite(m) and m > 0):
            raise ValueError(
                f"layerwise_lr_decay: decay {decay!r} over {n} groups gives group {i} "
                f"lr_mult {m!r}; use fewer groups or a decay closer to 1"
            )
    for group, m in zip(groups, mults, strict=True):
        group.setattr("lr_mult", m)
    return _subset(params, [n for n in params if n in owner])


def linear_probe(params: ParamDict, head: Pattern) -> ParamDict:
    """Freeze every parameter but the head's: only the head trains (a linear probe).

    Frozen parameters get no gradient and hold no optimizer state. Unfreeze later with
    `params.setattr("frozen", False)` (LP-FT: probe first, then fine-tune everything); the head
    keeps its optimizer state across the change.

    Args:
      params: the ParamDict to change.
      head: a regex (`re.match`) choosing the head's parameters.

    Returns:
      The head's parameters (set trainable).

    Raises:
      ValueError: the pattern matches nothing, or matches every parameter (nothing to freeze).
    """
    _check_params(params, "linear_probe")
    chosen = params.select(head)
    if len(chosen) == len(params):
        raise ValueError(
            f"linear_probe: head pattern {_show(head)} matches every parameter, so nothing "
            f"would be frozen; match the head only (e.g. 'head/')"
        )
    for name, p in params.items():
        p.frozen = name not in chosen
    return chosen


def _subset(params: ParamDict, names: list[str]) -> ParamDict:
    """A ParamDict sharing `params`' Parameters for `names`, as `select` returns."""
    return ParamDict({n: params[n] for n in names})


def _show(pattern: Pattern) -> str:
    return repr(pattern.pattern if isinstance(pattern, re.Pattern) else pattern)
