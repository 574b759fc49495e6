"""Presets: fine-tuning recipes that users otherwise hand-roll.

Each preset sets Parameter attributes (link 1 of the lookup chain) on behalf of the preset, so
`explain()` names it as the source (`preset:layerwise_lr_decay`). Multiplier presets *compose
multiplicatively* with what is already set: the new `lr_mult` is the current value (1.0 when
unset) times the preset's factor, so `params.select("head/").setattr("lr_mult", 10.0)` followed by
`layerwise_lr_decay(params, 0.75)` gives the head 10 x 1. Every preset validates everything before
changing anything, and returns the ParamDict of the Parameters it changed (sharing them).

- `layerwise_lr_decay`: `lr_mult *= decay ** (num_layers - layer_id(name))` (timm's
  `param_groups_layer_decay`, BEiT / ViT fine-tuning).
- `no_decay`: `wd_mult = 0` on biases and normalisation parameters (HuggingFace / big_vision
  practice), or MXNet 1.x's rule (decay only names ending in `weight` / `gamma` / `kernel`).
- `linear_probe`: freeze everything but the head.

The one-line recipes need no preset: Gluon's fine-tuning tutorial is
`params.select("head/").setattr("lr_mult", 10.0)`, freezing a backbone is
`params.select("backbone/").setattr("frozen", True)`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from lrmult.paramdict import ParamDict
from lrmult.parameter import check_multiplier

Pattern = str | re.Pattern[str]

# A numbered block: `layers/3/`, `layers_3/`, `layer_3`, `blocks/3/`, `block_3`, `h/3/` (GPT-2),
# `stages/1/`, `resblocks/3/`, `encoder/layer/3/` (HF BERT). The first such number counts.
BLOCK = re.compile(
    r"(?:^|/)(?:layers?|blocks?|h|stages?|resblocks?|encoderblock|encoder_?block)[/_.]?(\d+)(?:/|$)",
    re.IGNORECASE,
)
# Embeddings and stem: below the first block (layer id 0).
# `pos` only as a word (`pos_embedding`, `pos/`), not `post_norm`.
EMBED = re.compile(
    r"(?:^|/)[^/]*(?:embed|patch|position|cls|token|stem|pos(?=_|/|$))[^/]*(?:/|$)",
    re.IGNORECASE,
)
# Biases and normalisation parameters, searched (`re.search`) in the full name.
NO_DECAY_NAMES: tuple[str, ...] = (
    r"(?:^|/)(?:bias|beta|offset|scale)$",  # biases and norm offsets / scales (flax, Haiku, MXNet)
    r"(?i)(?:^|/)[^/]*norm[^/]*/",  # LayerNorm_0/, norm1/, final_norm/, BatchNorm_0/
    r"(?i)(?:^|/)(?:ln|bn|gn)[^/]*/",  # ln_f/, ln_1/, bn1/ (GPT-2, ResNet)
)
_MXNET_DECAYED = re.compile(r"(?:weight|gamma|kernel)$")


def _check_params(params: object, where: str) -> None:
    if not isinstance(params, ParamDict):
        raise TypeError(f"{where}: params must be a ParamDict, got {type(params).__name__}")


def _compose(
    params: ParamDict, attr: str, factors: dict[str, tuple[Any, Any]], origin: str
) -> ParamDict:
    """Multiply `attr` of each named Parameter by its factor, all checked before any change.

    `factors` is what `ParamDict.gather` gives: a factor may be an array over a stack's layers,
    of which only the named layers are set (the others keep what they have, set or not).
    """
    new = {}
    for name, (factor, layers) in factors.items():
        p = params[name]
        value = getattr(p, attr) * factor  # an unset multiplier reads as 1.0
        check_multiplier(attr, value, f"{name} ({origin})", p.shape, p.stacked)
        new[name] = p.planned(attr, value, origin, layers)
    for name, plan in new.items():
        params[name].put(*plan)
    return _subset(params, list(new))


def default_layer_id(name: str, num_layers: int) -> int:
    """Timm's layer id of a parameter name: embeddings 0, block `i` is `i + 1`, the rest on top.

    Args:
      name: a parameter name (`layers/3/kernel`, `blocks_3/attn/kernel`, `embed/embedding`).
      num_layers: the id of parameters in no block and not an embedding (head, final norm).

    Returns:
      `i + 1` for the first numbered block `i` in the name (`layers/i/`, `layer_i`, `blocks/i/`,
      `block_i`, `h/i/`, `stages/i/`), else 0 for embeddings and stem (`embed`, `patch`, `pos`,
      `cls`, `token`, `stem` in a path component), else `num_layers`.
    """
    match = BLOCK.search(name)
    if match:
        return int(match.group(1)) + 1
    if EMBED.search(name):
        return 0
    return num_layers


def layerwise_lr_decay(
    params: ParamDict,
    decay: float,
    *,
    num_layers: int | None = None,
    layer_id: Callable[[str], int | None] | None = None,
    groups: Sequence[Pattern] | None = None,
) -> ParamDict:
    """Layer-wise learning-rate decay: `lr_mult *= decay ** (num_layers - layer_id(name))`.

    timm's `param_groups_layer_decay` (BEiT, ViT / DeiT fine-tuning): the head keeps the full
    rate, each layer below gets `decay` times its upper neighbour's. By default the layer id is
    0 for embeddings and stem, `i + 1` for the numbered block `i` (`layers/i/`, `block_i`, ...),
    and `num_layers` for everything else (head, final norm); `num_layers` then defaults to the
    number of blocks + 1 (the largest block id + 1), as in timm. The factor multiplies what is
    already set (1.0 when unset); `explain()` shows `preset:layerwise_lr_decay` as the source.

    Args:
      params: the ParamDict to change.
      decay: the factor between neighbouring layers, a finite number > 0 (usually 0.65-0.9).
      num_layers: the id of the top layer, whose factor is 1. Defaults to the number of blocks
        + 1 with the default `layer_id`, else to the largest id `layer_id` returns.
      layer_id: `layer_id(name) -> int` (0 = input side, `num_layers` = top), or None to leave
        that parameter alone. Defaults to `default_layer_id`.
      groups: instead of `layer_id`, one regex per layer (`re.match`, as in `select`), input
        first: group `i` of `n` has id `i` and `num_layers` defaults to `n - 1`; parameters in no
        group are left alone.

    Returns:
      The parameters whose `lr_mult` changed.

    Raises:
      ValueError: `decay` is not a finite number > 0, a layer id is negative or above
        `num_layers`, no parameter has a block number (default `layer_id` without
        `num_layers`), a group pattern matches nothing, or two groups match one parameter.

    Example:
      >>> layerwise_lr_decay(params, 0.5)  # embed/, layers/0/, layers/1/, head/
      >>> # embed 0.125, layers/0 0.25, layers/1 0.5, head 1.0
    """
    where = "layerwise_lr_decay"
    _check_params(params, where)
    if (
        isinstance(decay, bool)
        or not isinstance(decay, int | float | np.integer | np.floating)
        or not math.isfinite(decay)
        or not decay > 0
    ):
        raise ValueError(f"{where}: decay must be a finite number > 0, got {decay!r}")
    if num_layers is not None and (
        isinstance(num_layers, bool) or not isinstance(num_layers, int | np.integer)
    ):
        raise TypeError(f"{where}: num_layers must be an int, got {num_layers!r}")
    if groups is not None and layer_id is not None:
        raise TypeError(f"{where}: give layer_id or groups, not both")
    if layer_id is not None and not callable(layer_id):
        raise TypeError(f"{where}: layer_id must be a function name -> int, got {layer_id!r}")

    units = params.units()
    if groups is not None:
        ids = _group_ids(params, groups)
        top = len(groups) - 1
    elif layer_id is None:
        blocks = [m for m in map(BLOCK.search, units) if m]
        if num_layers is None and not blocks:
            raise ValueError(
                f"{where}: no parameter name has a block number (layers/0/, block_0, ...); "
                f"give layer_id= (name -> int) and num_layers=, or groups="
            )
        top = max(int(m.group(1)) + 2 for m in blocks) if blocks else 0
        top = top if num_layers is None else int(num_layers)
        ids = {name: default_layer_id(name, top) for name in units}
    else:
        ids = {}
        for name in units:
            i = layer_id(name)
            if i is None:
                continue
            if isinstance(i, bool) or not isinstance(i, int | np.integer):
                raise TypeError(f"{where}: layer_id({name!r}) returned {i!r}, not an int")
            ids[name] = int(i)
        if not ids:
            raise ValueError(f"{where}: layer_id returned None for every parameter")
        top = max(ids.values())
    if num_layers is not None:
        top = int(num_layers)
    for name, i in ids.items():
        if not 0 <= i <= top:
            raise ValueError(
                f"{where}: parameter {name!r} has layer id {i}, outside [0, num_layers={top}]"
            )
    factors = {name: float(decay) ** (top - i) for name, i in ids.items()}
    for name, f in factors.items():
        if not f > 0:  # underflow would freeze by accident; lr_mult 0 is not frozen
            raise ValueError(
                f"{where}: decay {decay!r} ** {top - ids[name]} underflows to 0 for {name!r}; "
                f"use fewer layers or a decay closer to 1"
            )
    factors = params.gather(factors, 1.0)
    return _compose(params, "lr_mult", factors, "preset:layerwise_lr_decay")


def _group_ids(params: ParamDict, groups: Sequence[Pattern]) -> dict[str, int]:
    if isinstance(groups, str | re.Pattern) or not isinstance(groups, Sequence) or not groups:
        raise TypeError(
            "layerwise_lr_decay: groups must be a non-empty list of patterns, one per layer, "
            f"input first; got {groups!r}"
        )
    owner: dict[str, int] = {}
    for i, pattern in enumerate(groups):
        for name in params.select(pattern).units():
            if name in owner:
                raise ValueError(
                    f"layerwise_lr_decay: parameter {name!r} is matched by group "
                    f"{owner[name]} ({_show(groups[owner[name]])}) and group {i} "
                    f"({_show(pattern)}); make the patterns disjoint (end them with '/')"
                )
            owner[name] = i
    return {name: owner[name] for name in params.units() if name in owner}


def no_decay(
    params: ParamDict,
    *,
    by_rank: bool = True,
    names: Pattern | Sequence[Pattern] | None = NO_DECAY_NAMES,
    mxnet: bool = False,
) -> ParamDict:
    """Set `wd_mult = 0` on biases and normalisation parameters.

    A parameter is chosen when it has at most one dimension (`by_rank`: biases, LayerNorm and
    BatchNorm scales and offsets, timm's rule) or when one of the `names` regexes is found in its
    name (`re.search`; the default matches `.../bias`, `.../scale`, `.../beta` and anything inside
    a `*norm*`, `ln*` or `bn*` module, HuggingFace's `no_decay` list). `mxnet=True` uses MXNet
    1.x's default instead: decay only names ending in `weight`, `gamma` or `kernel`. The weight
    decay multiplier becomes the current one times 0; `explain()` shows `preset:no_decay`.

    Args:
      params: the ParamDict to change.
      by_rank: choose parameters with at most one dimension.
      names: a regex or regexes (`re.search` in the full name); None or `()` for none.
      mxnet: choose every name not ending in `weight` / `gamma` / `kernel` (then `by_rank` and
        `names` are not used).

    Returns:
      The parameters now without weight decay.

    Raises:
      ValueError: no parameter is chosen, or a pattern is not a valid regex.
    """
    _check_params(params, "no_decay")
    for arg, value in (("by_rank", by_rank), ("mxnet", mxnet)):
        if not isinstance(value, bool):
            raise TypeError(f"no_decay: {arg} must be True or False, got {value!r}")
    units = params.units()
    if mxnet:
        chosen = [n for n in units if not _MXNET_DECAYED.search(n)]
    else:
        regexes = _compile(names)

        def rank(unit: str) -> int:  # a stacked leaf is judged by its per-layer rank
            p = params[units[unit][0]]
            return len(p.shape) - p.stacked

        chosen = [
            n for n in units if (by_rank and rank(n) <= 1) or any(r.search(n) for r in regexes)
        ]
    if not chosen:
        rule = "ends in weight/gamma/kernel" if mxnet else "is chosen by rank or names"
        raise ValueError(f"no_decay: every parameter {rule}; nothing would change")
    factors = params.gather(dict.fromkeys(chosen, 0.0), 1.0)
    return _compose(params, "wd_mult", factors, "preset:no_decay")


def _compile(names: Pattern | Sequence[Pattern] | None) -> list[re.Pattern[str]]:
    if names is None:
        return []
    if isinstance(names, str | re.Pattern):
        names = [names]
    out = []
    for pattern in names:
        if isinstance(pattern, re.Pattern):
            out.append(pattern)
            continue
        if not isinstance(pattern, str):
            raise TypeError(f"no_decay: names must be regex strings, got {pattern!r}")
        try:
            out.append(re.compile(pattern))
        except re.error as e:
            raise ValueError(
                f"no_decay: {pattern!r} is not a valid regular expression: {e}"
            ) from None
    return out


def linear_probe(params: ParamDict, head: Pattern) -> ParamDict:
    """Freeze every parameter but the head's: only the head trains (a linear probe).

    Frozen parameters get no gradient and hold no optimizer state. Unfreeze later with
    `params.setattr("frozen", False)` (LP-FT: probe first, then fine-tune everything); the head
    keeps its optimizer state across the change. `explain()` shows `preset:linear_probe`.

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
    if len(chosen.units()) == len(params.units()):  # every layer of every stack too
        raise ValueError(
            f"linear_probe: head pattern {_show(head)} matches every parameter, so nothing "
            f"would be frozen; match the head only (e.g. 'head/')"
        )
    for name, p in params.items():
        layers = chosen.layers_of(name) if name in chosen else None
        frozen = name not in chosen if layers is None else ~layers  # a stack's head layers only
        p.assign("frozen", frozen, "preset:linear_probe")
    return chosen


def _subset(params: ParamDict, names: list[str]) -> ParamDict:
    """A ParamDict sharing `params`' Parameters for `names`, as `select` returns."""
    return ParamDict({n: params[n] for n in names})


def _show(pattern: Pattern) -> str:
    return repr(pattern.pattern if isinstance(pattern, re.Pattern) else pattern)
