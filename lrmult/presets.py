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
- `decay_to_init`: weight decay toward the pretrained weights instead of zero (L2-SP).
- `gradual_unfreezing`: a plan of groups unfreezing at set steps, each with an `lr_mult` ramp
  (ULMFiT, Lightning's `BackboneFinetuning`), which the Trainers carry out by themselves.
- `mup`: μP's `lr_mult` / `wd_mult` from a narrow base model's shapes (microsoft/mup's `MuAdam`,
  `MuSGD`).

The one-line recipes need no preset: Gluon's fine-tuning tutorial is
`params.select("head/").setattr("lr_mult", 10.0)`, freezing a backbone is
`params.select("backbone/").setattr("frozen", True)`.
"""

from __future__ import annotations

import gc
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from lrmult import flax_trees
from lrmult._names import path_name, suggest
from lrmult.paramdict import ParamDict
from lrmult.parameter import check_multiplier
from lrmult.plans import Plan

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
    params: ParamDict, factors: dict[str, dict[str, tuple[Any, Any]]], origin: str
) -> ParamDict:
    """Multiply each attribute of each named Parameter by its factor, all checked before any change.

    Args:
      params: the ParamDict the names are in.
      factors: `{attr: {name: (factor, layers)}}`, per attribute what `ParamDict.gather` gives: a
        factor may be an array over a stack's layers, of which only the named layers are set
        (`layers`, None for all; the others keep what they have, set or not).
      origin: the preset, shown by `explain()` as the source.

    Returns:
      The Parameters changed, in `params`' order.
    """
    plans = []
    for attr, by_name in factors.items():
        for name, (factor, layers) in by_name.items():
            p = params[name]
            value = getattr(p, attr) * factor  # an unset multiplier reads as 1.0
            check_multiplier(attr, value, f"{name} ({origin})", p.shape, p.stacked)
            plans.append((name, p.planned(attr, value, origin, layers)))
    for name, plan in plans:
        params[name].put(*plan)
    changed = {name for name, _ in plans}
    return _subset(params, [n for n in params if n in changed])


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
    return _compose(params, {"lr_mult": factors}, "preset:layerwise_lr_decay")


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
    return _compose(params, {"wd_mult": factors}, "preset:no_decay")


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


def decay_to_init(params: ParamDict, *, exclude: Pattern | None = None) -> ParamDict:
    """Decay toward the pretrained weights (L2-SP): set `decay_to_init = True`.

    Weight decay then pulls each chosen parameter toward w₀, its value when the optimizer state
    is built (or, for a Trainer already built, at its next step), instead of toward zero: the
    decay term `λ·d·w` becomes `λ·d·(w − w₀)`, wherever the optimizer puts its decay (coupled
    for SGD and Adam, decoupled for AdamW). That is L2-SP (Li, Grandvalet & Davoine, 2018): a
    fine-tuned backbone stays near what it learned; the new head, which has no pretrained
    value, is usually left out (`exclude`) and decays toward zero as before. `wd_mult` still
    scales the pull (0: none); the optimizer state keeps one copy of each chosen parameter
    (none of the others, none while frozen). The layers of a stack are chosen together.
    `explain()` shows `preset:decay_to_init` as the source.

    Args:
      params: the ParamDict to change (`params.select(...)` to choose some).
      exclude: a regex (`re.match`, as in `select`) of parameters left decaying toward zero,
        such as the new head (`"head/"`).

    Returns:
      The parameters now decayed toward w₀.

    Raises:
      ValueError: `exclude` matches nothing, or every parameter, or only some layers of a stack
        (a stack is anchored whole); `params` selects only some layers of a stack.

    Example:
      >>> lrmult.presets.decay_to_init(params, exclude="head/")
      >>> trainer = lrmult.Trainer(params, "adamw", {"learning_rate": 1e-4, "wd": 1e-2})
    """
    where = "decay_to_init"
    _check_params(params, where)
    left = {}
    if exclude is not None:
        left = params.select(exclude)
        for name in left:
            if left.layers_of(name) is not None:
                raise ValueError(
                    f"{where}: exclude {_show(exclude)} matches only some layers of the stack "
                    f"{name!r}; the layers of a stack are anchored together: match all or none"
                )
        if len(left) == len(params):
            raise ValueError(
                f"{where}: exclude {_show(exclude)} matches every parameter, so nothing would be "
                f"anchored; match the new layers only (e.g. 'head/')"
            )
    chosen = [name for name in params if name not in left]
    plans = [
        (name, params[name].planned(where, True, f"preset:{where}", params.layers_of(name)))
        for name in chosen
    ]
    for name, plan in plans:
        params[name].put(*plan)
    return _subset(params, chosen)


def gradual_unfreezing(
    params: ParamDict,
    groups: Sequence[Pattern],
    *,
    at: Sequence[int] | None = None,
    every: int | None = None,
    warmup: int = 0,
) -> ParamDict:
    """Unfreeze groups of parameters one after another, each with an `lr_mult` ramp (a plan).

    ULMFiT's gradual unfreezing and Lightning's `BackboneFinetuning`: group `k` (head first) is
    frozen until step `at[k]` (or `k * every` steps from now), then trains with fresh optimizer
    state and a step count of its own (Adam's bias correction restarts for it). With
    `warmup=K`, its `lr_mult` then ramps from 0 to its own value over `K` steps: at step
    `t >= at[k]` it is that value times `min(1, (t - at[k] + 1) / K)`, so the first step takes
    `1/K` of it (PyTorch's `LambdaLR` with that lambda, and `requires_grad` switched on at
    `at[k]`). Steps count from 0: step `t` is the one a Trainer takes when its `num_update` is
    `t`. The value ramped to is the `lr_mult` the group has through the Trainer's lookup chain
    when it unfreezes, so presets such as `layerwise_lr_decay` compose, before or after this
    call.

    The plan is data attached to the Parameters (`params[name].plan`): every `Trainer` and
    `NNXTrainer` stepping them carries it out by itself, counting its own steps
    (`trainer.num_update`), with no code in the training loop. Each new frozen set compiles the
    step once; the ramp changes multipliers only (no recompilation) and costs host work only at
    the steps where a group unfreezes or ramps. `explain()` and `summary()` show the plan and
    where the Trainer is in it; `save_states` / `load_states` keep that position. Parameters in
    no group are left as they are. Right away, groups not due yet are frozen and those due at
    the next step unfrozen (source `preset:gradual_unfreezing` in `explain()`).

    Args:
      params: the ParamDict the groups select from.
      groups: one selection per group, head first: a regex (`re.match`, as in `select`), which
        may name layers of a stack by their per-layer names (`"layers/11/"`).
      at: the step at which each group unfreezes, strictly increasing, one per group (usually
        `at[0] == 0`: the head trains from the start).
      every: instead of `at`, group `k` unfreezes `k * every` steps after the plan starts: at
        step `k * every`, or `num_update + k * every` for a Trainer that has taken steps.
      warmup: the number of steps over which a newly unfrozen group's `lr_mult` ramps up (0 or
        1: none).

    Returns:
      The parameters of the plan (sharing them).

    Raises:
      ValueError: a group matches nothing, two groups match one parameter (or layer), `at` is
        not strictly increasing or has not one step per group, both or neither of `at` and
        `every` are given, `every` or `warmup` is not an int in range, a parameter already
        follows a plan, or a Trainer of these parameters has taken more steps than a group's
        `at`. Nothing changes then.

    Example:
      >>> presets.layerwise_lr_decay(params, 0.5)
      >>> presets.gradual_unfreezing(
      ...     params, ["head/", "layers/1/", "layers/0/", "embed/"], every=50, warmup=10
      ... )
      >>> trainer = lrmult.NNXTrainer(model, params, "adamw", {"learning_rate": 3e-3})
      >>> for _ in range(200):  # nothing else: the trainer unfreezes and ramps by itself
      ...     trainer.train_step(loss_fn, x, y)
    """
    where = "gradual_unfreezing"
    _check_params(params, where)
    if isinstance(groups, str | re.Pattern) or not isinstance(groups, Sequence) or not groups:
        raise TypeError(
            f"{where}: groups must be a non-empty list of selections (regexes), head first; "
            f"got {groups!r}"
        )
    steps = _plan_steps(len(groups), at, every)
    if isinstance(warmup, bool) or not isinstance(warmup, int | np.integer) or warmup < 0:
        raise ValueError(f"{where}: warmup must be an int >= 0 (steps), got {warmup!r}")

    members: list[tuple[tuple[str, np.ndarray | None], ...]] = []
    owner: dict[str, int] = {}
    for k, pattern in enumerate(groups):
        try:
            chosen = params.select(pattern)
        except (ValueError, TypeError) as e:
            raise type(e)(f"{where}: groups[{k}]: {e}") from None
        for unit in chosen.units():
            if unit in owner:
                raise ValueError(
                    f"{where}: parameter {unit!r} is matched by groups[{owner[unit]}] "
                    f"({_show(groups[owner[unit]])}) and groups[{k}] ({_show(pattern)}); a "
                    f"parameter unfreezes once: make the patterns disjoint (end them with '/')"
                )
            owner[unit] = k
        members.append(tuple((name, chosen.layers_of(name)) for name in chosen))
    for group in members:
        for name, _ in group:
            if params[name].plan is not None:
                raise ValueError(
                    f"{where}: parameter {name!r} already follows a gradual-unfreezing plan "
                    f"({list(params[name].plan.groups)}); one plan per parameter"
                )

    def steps_taken() -> int:
        logs = [log for group in members for n, _ in group for log in params[n].watchers()]
        return max((log.steps for log in logs), default=0)

    taken = steps_taken()
    if taken:  # a Trainer dropped but not yet collected (jit keeps a cycle) is no owner
        gc.collect()
        taken = steps_taken()
    if every is not None:
        steps = [taken + a for a in steps]
    late = [k for k, a in enumerate(steps) if a < taken]
    if late:
        k = late[0]
        raise ValueError(
            f"{where}: at puts groups[{k}] ({_show(groups[k])}) at step {steps[k]}, but a "
            f"Trainer of these parameters has taken {taken} steps already (trainer.num_update); "
            f"plan from step {taken} on (at=[{taken} + a for a in at]), or give every="
        )

    plan = Plan(tuple(_text(g) for g in groups), tuple(members), tuple(steps), int(warmup))
    settings = plan.frozen_at(params, taken)  # groups due at the owners' next step: unfrozen
    for name, setting in settings.items():
        params[name].put("frozen", setting)
        params[name].follow(plan)
    return _subset(params, [n for n in params if n in settings])


def _plan_steps(n: int, at: Sequence[int] | None, every: int | None) -> list[int]:
    """The step of each of `n` groups, from `at` or `every`, validated."""
    where = "gradual_unfreezing"
    if (at is None) == (every is None):
        raise ValueError(
            f"{where}: give at= (one step per group) or every= (group k at k * every), "
            f"{'not both' if at is not None else 'one of them'}"
        )
    if every is not None:
        if isinstance(every, bool) or not isinstance(every, int | np.integer) or every < 1:
            raise ValueError(f"{where}: every must be an int >= 1 (steps), got {every!r}")
        return [k * int(every) for k in range(n)]
    if isinstance(at, str) or not isinstance(at, Sequence):
        raise TypeError(f"{where}: at must be a list of steps, one per group, got {at!r}")
    if len(at) != n:
        raise ValueError(f"{where}: at has {len(at)} steps for {n} groups; give one per group")
    for k, a in enumerate(at):
        if isinstance(a, bool) or not isinstance(a, int | np.integer) or a < 0:
            raise ValueError(f"{where}: at[{k}] must be an int >= 0 (a step), got {a!r}")
    for k in range(1, n):
        if not at[k] > at[k - 1]:
            raise ValueError(
                f"{where}: at must be strictly increasing (groups unfreeze one after another), "
                f"but at[{k}] = {at[k]} follows at[{k - 1}] = {at[k - 1]}; to unfreeze two "
                f"selections together, join them in one group ('a/|b/')"
            )
    return [int(a) for a in at]


# μP: which of mup's rules each optimizer follows. mup's own advice (mup/optim.py): an optimizer
# that normalises the gradient entrywise (RMSProp, Adagrad) takes MuAdam's, an SGD-like one MuSGD's.
MUP_RULES: dict[str, str] = {
    "adam": "adam",
    "adamw": "adam",
    "rmsprop": "adam",
    "adagrad": "adam",
    "sgd": "sgd",
    "nag": "sgd",
}
MUP_LAYOUTS = ("flax", "torch")
FanIn = Mapping[str, int | Sequence[int]] | Callable[[str], int | Sequence[int] | None]


def mup(
    params: ParamDict,
    base_shapes: Any,
    *,
    optimizer: str = "adam",
    delta_shapes: Any = None,
    layout: str = "flax",
    fan_in_axes: FanIn | None = None,
    decoupled_wd: bool = False,
) -> ParamDict:
    """μP's learning-rate and weight-decay multipliers, as microsoft/mup's `MuAdam` / `MuSGD`.

    A dimension of a parameter is *infinite* (a width) when the base model's differs from this
    model's (or, with `delta_shapes`, from the delta model's: mup's `make_base_shapes(base,
    delta)`); its width multiplier is `r = dim / base_dim`. With `r_in`, `r_out` the multipliers
    of a parameter's fan-in and fan-out infinite dims, `lr_mult` and `wd_mult` are multiplied by:

    | infinite dims | `optimizer="adam"`, `"adamw"` (MuAdam) | `"sgd"` (MuSGD) |
    |---|---|---|
    | 0 (fixed) | 1, 1 | 1, 1 |
    | 1 (vector-like: bias, norm, embedding, readout) | 1, 1 | `r`, `1 / r` |
    | 2 (matrix-like: hidden weights) | `1 / r_in`, `r_in` | `r_out / r_in`, `r_in / r_out` |
    | more | an error, as in mup | an error, as in mup |

    The weight-decay factor keeps `lr · wd` what it is at the base width: lrmult's decay, coupled
    (adam, sgd) or decoupled (adamw, `w -= η·m·λ·d·w` as PyTorch's AdamW), is always scaled by
    `lr_mult`, so mup's default `decoupled_wd=False` applies to all three. Stacked axes are
    skipped: a stack is judged per layer. μP's initialization and output multiplier (mup's
    `MuReadout`) and its `1/d` attention scaling are model code, not optimizer settings.

    Fan-in: of the two infinite dims, `layout="flax"` takes the first as the fan-in (flax's
    kernels put inputs before outputs: Dense `(in, out)`, conv `(..., in, out)`, DenseGeneral
    `(in..., out...)`), `layout="torch"` the second (PyTorch's `(out, in, ...)`, as mup reads
    it). `fan_in_axes` overrides it per parameter and may group axes, e.g. a DenseGeneral query
    kernel `(d, heads, head_dim)` whose three dims all grow is `{name: 0}`: fan-in `d`, fan-out
    `heads x head_dim` (one fused dim in PyTorch).

    The factors multiply what is already set (1.0 when unset); only parameters whose factor is
    not 1 are changed; `explain()` shows `preset:mup`.

    Args:
      params: the ParamDict to change.
      base_shapes: the shapes of the narrow base model of the same architecture, named as
        `params` names them: a pytree of arrays or `jax.ShapeDtypeStruct`s (`jax.eval_shape` of
        the init), Linen `variables["params"]`, an abstract NNX module (`nnx.eval_shape`), a
        ParamDict, or a `{name: shape}` dict. Names `params` lacks are ignored.
      optimizer: the optimizer the rule is for: `"adam"`, `"adamw"`, `"rmsprop"`, `"adagrad"`
        (MuAdam's rule) or `"sgd"`, `"nag"` (MuSGD's).
      delta_shapes: optional shapes of a model differing from the base in the width dims only;
        a dim is then infinite where base and delta differ (even if this model is at base
        width), as with mup's `set_base_shapes(model, base, delta=delta)`.
      layout: `"flax"` or `"torch"`, which infinite dim is the fan-in (see above).
      fan_in_axes: `{name: axis or axes}` or `name -> axis, axes or None`: the fan-in axes of a
        parameter, counted per layer (without its stacked axes); the other infinite dims are its
        fan-out.
      decoupled_wd: leave `wd_mult` alone (mup's `decoupled_wd=True`), for a decay not scaled
        by the learning rate.

    Returns:
      The parameters whose `lr_mult` or `wd_mult` changed.

    Raises:
      ValueError: a parameter has no base (or delta) shape, one of another rank, a zero width,
        or more than two infinite dims without `fan_in_axes`; `fan_in_axes` leaves one side
        without an infinite dim; `delta_shapes` equals `base_shapes`; `optimizer` or `layout`
        is unknown.
      KeyError: a `fan_in_axes` key names no parameter.

    Example:
      >>> base = jax.eval_shape(Model(width=64).init, key, x)["params"]
      >>> params = lrmult.ParamDict.from_pytree(Model(width=1024).init(key, x)["params"])
      >>> lrmult.presets.mup(params, base, optimizer="adamw")  # hidden kernels: lr / 16
    """
    where = "mup"
    _check_params(params, where)
    if not isinstance(optimizer, str) or optimizer not in MUP_RULES:
        raise ValueError(
            f"{where}: optimizer must be one of {', '.join(map(repr, MUP_RULES))}, got "
            f"{optimizer!r}{suggest(optimizer, MUP_RULES) if isinstance(optimizer, str) else ''}"
            f"; for another optimizer pass 'adam' if it normalises the gradient entrywise, "
            f"else 'sgd' (mup's advice)"
        )
    if not isinstance(layout, str) or layout not in MUP_LAYOUTS:
        raise ValueError(
            f"{where}: layout must be 'flax' (fan-in before fan-out) or 'torch' (fan-out "
            f"first), got {layout!r}"
        )
    if not isinstance(decoupled_wd, bool):
        raise TypeError(f"{where}: decoupled_wd must be True or False, got {decoupled_wd!r}")
    if fan_in_axes is not None and not (isinstance(fan_in_axes, Mapping) or callable(fan_in_axes)):
        raise TypeError(
            f"{where}: fan_in_axes must be a dict name -> axes or a function name -> axes, got "
            f"{type(fan_in_axes).__name__}"
        )
    if isinstance(fan_in_axes, Mapping):
        for key in fan_in_axes:
            if key not in params:
                raise KeyError(
                    f"{where}: fan_in_axes key {key!r} names no parameter{suggest(key, params)}"
                )
    base = _shape_table(base_shapes, "base_shapes")
    delta = None if delta_shapes is None else _shape_table(delta_shapes, "delta_shapes")

    if delta is not None and all(
        _shape_of(base, n, p, "base_shapes") == _shape_of(delta, n, p, "delta_shapes")
        for n, p in params.items()
    ):
        raise ValueError(
            f"{where}: delta_shapes equals base_shapes for every parameter, so no dim is a "
            f"width; the delta model must differ from the base in its width dims"
        )
    rule = MUP_RULES[optimizer]
    lr: dict[str, float] = {}
    wd: dict[str, float] = {}
    for name, p in params.items():
        b = _shape_of(base, name, p, "base_shapes")
        dl = None if delta is None else _shape_of(delta, name, p, "delta_shapes")
        inf = _infinite_dims(name, p.shape, p.stacked, b, dl)
        if isinstance(fan_in_axes, Mapping):
            given = fan_in_axes.get(name)
        else:
            given = None if fan_in_axes is None else fan_in_axes(name)
        given = None if given is None else _axes(name, given, len(p.shape) - p.stacked)
        if len(inf) == 1 and rule == "sgd":  # MuSGD's vector-like
            (r,) = inf.values()
            lr[name], wd[name] = r, 1 / r
        elif len(inf) >= 2:  # matrix-like
            r_in, r_out = _fan_in_out(name, p.shape[p.stacked :], inf, given, layout)
            ratio = r_in if rule == "adam" else r_in / r_out
            lr[name], wd[name] = 1 / ratio, ratio

    def only_changes(by_name: dict[str, float]) -> dict[str, Any]:
        # A stack selected by some layers only (`select("layers/[0-3]/")`) changes those layers.
        return {n: (f, params.layers_of(n)) for n, f in by_name.items() if f != 1}

    factors = {"lr_mult": only_changes(lr)}
    if not decoupled_wd:
        factors["wd_mult"] = only_changes(wd)
    return _compose(params, factors, "preset:mup")


def _shape_table(tree: Any, arg: str) -> dict[str, tuple[int, ...]]:
    """`{name: shape}` of a model's shapes: a pytree, a ParamDict or a name -> shape dict."""
    if isinstance(tree, ParamDict):
        return {name: p.shape for name, p in tree.items()}
    if flax_trees.is_nnx_module(tree):
        tree = flax_trees.nnx_pure_state(tree, flax_trees.nnx_param_filter())
    if flax_trees.has_boxes(tree):  # Linen boxes: names stop at the box, as from_linen's
        names, _, unboxed = flax_trees.boxed_leaves(tree)
        pairs = list(zip(names, jax.tree.leaves(unboxed), strict=True))
    else:
        tree = flax_trees.unbox_variables(tree, is_leaf=_is_shape)
        flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_shape)[0]
        pairs = [(path_name(path), leaf) for path, leaf in flat]
    out: dict[str, tuple[int, ...]] = {}
    for name, leaf in pairs:
        if not name:
            raise TypeError(
                f"mup: {arg} is a single {type(leaf).__name__}; give the model's shapes as a "
                f"pytree or a {{name: shape}} dict"
            )
        if _is_shape(leaf):
            shape = tuple(int(d) for d in leaf)
        elif isinstance(getattr(leaf, "shape", None), tuple):
            shape = tuple(int(d) for d in leaf.shape)
        else:
            raise TypeError(
                f"mup: {arg} leaf {name!r} is a {type(leaf).__name__}, not an array, "
                f"ShapeDtypeStruct or shape tuple"
            )
        if any(d < 0 for d in shape):
            raise ValueError(f"mup: {arg} shape of {name!r} has a negative dim: {shape}")
        if name in out:
            raise ValueError(f"mup: {arg} has two leaves named {name!r}")
        out[name] = shape
    if not out:
        raise ValueError(f"mup: {arg} holds no shapes")
    return out


def _is_shape(x: Any) -> bool:
    return isinstance(x, tuple | list) and all(
        isinstance(d, int | np.integer) and not isinstance(d, bool) for d in x
    )


def _shape_of(table: dict[str, tuple[int, ...]], name: str, p: Any, arg: str) -> tuple[int, ...]:
    """The shape `table` gives parameter `name`, of the parameter's rank."""
    if name not in table:
        if f"params/{name}" in table:
            hint = " (it holds flax variables: pass variables['params'])"
        else:
            hint = suggest(name, table)
        raise ValueError(
            f"mup: parameter {name!r} is not in {arg}{hint}; {arg} must give the shape of every "
            f"parameter, named as params names it"
        )
    shape = table[name]
    if len(shape) != len(p.shape):
        raise ValueError(
            f"mup: parameter {name!r} has shape {p.shape} (rank {len(p.shape)}) but {arg} gives "
            f"it shape {shape} (rank {len(shape)}); the models must have the same architecture"
        )
    return shape


def _infinite_dims(
    name: str,
    shape: tuple[int, ...],
    stacked: int,
    base: tuple[int, ...],
    delta: tuple[int, ...] | None,
) -> dict[int, float]:
    """`{axis: width multiplier}` of a parameter's infinite dims, axes counted per layer."""
    out = {}
    for i in range(stacked, len(shape)):  # stacked axes count layers, not width
        if base[i] == (shape[i] if delta is None else delta[i]):
            continue
        if base[i] < 1 or shape[i] < 1:
            raise ValueError(
                f"mup: parameter {name!r} has width {shape[i]} on axis {i - stacked} where the "
                f"base has {base[i]}; an infinite (width) dim must be >= 1 in both"
            )
        out[i - stacked] = shape[i] / base[i]
    return out


def _axes(name: str, given: Any, rank: int) -> tuple[int, ...]:
    """`fan_in_axes`' answer for one parameter, as non-negative per-layer axes."""
    axes = [given] if isinstance(given, int | np.integer) else given
    ok = isinstance(axes, Sequence) and not isinstance(axes, str) and len(axes) > 0
    if not ok or any(isinstance(a, bool) or not isinstance(a, int | np.integer) for a in axes):
        raise TypeError(f"mup: fan_in_axes for {name!r} must be an axis or axes, got {given!r}")
    out = []
    for a in axes:
        if not -rank <= a < rank:
            raise ValueError(
                f"mup: fan_in_axes for {name!r} gives axis {a}, outside its {rank} per-layer "
                f"axes (stacked axes are not counted)"
            )
        out.append(int(a) % rank)
    if len(set(out)) != len(out):
        raise ValueError(f"mup: fan_in_axes for {name!r} repeats an axis: {given!r}")
    return tuple(out)


def _fan_in_out(
    name: str,
    shape: tuple[int, ...],
    inf: dict[int, float],
    given: tuple[int, ...] | None,
    layout: str,
) -> tuple[float, float]:
    """`(r_in, r_out)`: the width multipliers of a matrix-like parameter's fan-in and fan-out."""
    axes = sorted(inf)
    if given is None:
        if len(axes) > 2:
            raise ValueError(
                f"mup: parameter {name!r} of per-layer shape {shape} has {len(axes)} infinite "
                f"dims (axes {axes}); mup's MuAdam / MuSGD handle at most 2. If some are one "
                f"dim split in two (a DenseGeneral kernel's heads x head_dim), group them with "
                f"fan_in_axes={{{name!r}: fan-in axes}}; else pass delta_shapes keeping the "
                f"non-width dims fixed"
            )
        a_in, a_out = axes if layout == "flax" else axes[::-1]
        return inf[a_in], inf[a_out]
    fan_in = [a for a in axes if a in given]
    fan_out = [a for a in axes if a not in given]
    if not fan_in or not fan_out:
        raise ValueError(
            f"mup: fan_in_axes for {name!r} gives axes {list(given)}; of its infinite dims "
            f"(axes {axes}) at least one must be fan-in and one fan-out"
        )
    return math.prod(inf[a] for a in fan_in), math.prod(inf[a] for a in fan_out)


def _subset(params: ParamDict, names: list[str]) -> ParamDict:
    """A ParamDict sharing `params`' Parameters for `names`, as `select` returns."""
    return ParamDict({n: params[n] for n in names})


def _text(pattern: Pattern) -> str:
    return pattern.pattern if isinstance(pattern, re.Pattern) else pattern


def _show(pattern: Pattern) -> str:
    return repr(_text(pattern))
