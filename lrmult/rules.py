"""`apply_rules`: per-parameter settings from a config, as `(regex, {attribute: value})` rules.

Large runs are configured from files: a rule list (or its dict / JSON / YAML / `ml_collections`
form) sets `lr_mult`, `wd_mult` and `frozen` by name, and big_vision's own config keys
(`lr_mults`, `wd_mults`, `schedule` with `None` meaning frozen) are read directly. Every value is
set on the Parameter on behalf of its rule, so `explain()` names it (`rule 2 'layers/[0-3]/'`)
and checkpoints keep it. Stacked Parameters are matched by their per-layer names.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from lrmult._names import suggest
from lrmult._where import user_stacklevel
from lrmult.paramdict import ParamDict, compile_pattern
from lrmult.parameter import Setting, check_frozen, check_multiplier

_ATTRS = ("lr_mult", "wd_mult", "frozen")
_BIG_VISION = ("lr_mults", "wd_mults", "schedule")


def _load(rules: Any) -> Any:
    """A rule config as Python data: text or a file path is JSON (or YAML, with PyYAML)."""
    if hasattr(rules, "to_dict"):  # ml_collections.ConfigDict
        return rules.to_dict()
    if isinstance(rules, os.PathLike) or (isinstance(rules, str) and os.path.isfile(rules)):
        with open(rules) as f:
            rules = f.read()
    if not isinstance(rules, str):
        return rules
    try:
        return json.loads(rules)
    except json.JSONDecodeError as error:
        try:
            import yaml
        except ImportError:
            raise ValueError(
                f"apply_rules: the rules text is not JSON ({error}); for YAML install PyYAML"
            ) from None
        return yaml.safe_load(rules)


def _from_big_vision(config: Mapping[str, Any]) -> tuple[list[tuple[str, dict]], str]:
    """big_vision's `lr_mults` / `wd_mults` / `schedule` lists as rules (re.fullmatch)."""
    out: list[tuple[str, dict]] = []
    for key, attr in (("lr_mults", "lr_mult"), ("wd_mults", "wd_mult")):
        for pattern, value in config.get(key, ()) or ():
            out.append((pattern, {attr: value}))
    for pattern, schedule in config.get("schedule", ()) or ():
        if schedule is None:
            out.append((pattern, {"frozen": True}))
        else:
            warnings.warn(
                f"apply_rules: schedule {pattern!r} is not None; per-parameter schedules are not "
                f"supported yet, so its parameters train with the optimizer's own learning-rate "
                f"schedule",
                stacklevel=user_stacklevel(),
            )
    return out, "fullmatch"


def _normalize(rules: Any) -> tuple[list[tuple[str, dict]], str]:
    """`(rules as (pattern, settings) pairs, the re function that matches them)`."""
    rules = _load(rules)
    if isinstance(rules, Mapping) and rules and set(rules) <= set(_BIG_VISION):
        return _from_big_vision(rules)
    if isinstance(rules, Mapping):
        rules = list(rules.items())
    if isinstance(rules, str) or not isinstance(rules, Sequence):
        raise TypeError(
            f"apply_rules: rules must be a list of (regex, {{attribute: value}}) pairs, a dict, "
            f"JSON / YAML text or a file, got {type(rules).__name__}"
        )
    out = []
    for k, rule in enumerate(rules):
        if not (isinstance(rule, Sequence) and not isinstance(rule, str) and len(rule) == 2):
            raise TypeError(f"apply_rules: rule {k} is not a (regex, {{attribute: value}}) pair")
        pattern, settings = rule
        if not isinstance(pattern, str) or not isinstance(settings, Mapping):
            raise TypeError(f"apply_rules: rule {k} must pair a regex str with a dict")
        for attr in settings:
            if attr not in _ATTRS:
                raise ValueError(
                    f"apply_rules: rule {k} {pattern!r} sets unknown attribute {attr!r}"
                    f"{suggest(attr, _ATTRS)}; rules set {', '.join(_ATTRS)}"
                )
        out.append((pattern, dict(settings)))
    return out, "match"


def apply_rules(
    params: ParamDict, rules: Any, *, mode: str = "first", strict: bool = True
) -> ParamDict:
    """Set `lr_mult` / `wd_mult` / `frozen` on the parameters each rule's regex matches.

    Args:
      params: the ParamDict (a stack's layers are matched by their per-layer names).
      rules: `[(regex, {attribute: value}), ...]`, the same as a dict (in order), JSON or YAML
        text or a file holding it, an `ml_collections.ConfigDict`, or big_vision's config keys
        `{"lr_mults": [(regex, m)], "wd_mults": [(regex, d)], "schedule": [(regex, None)]}`
        (None: frozen). Regexes `re.match` the names, as `select` does; big_vision's
        `re.fullmatch`, as big_vision does.
      mode: `"first"`: for each parameter and attribute the first matching rule wins
        (big_vision's semantics); `"all"`: every matching rule applies, later ones override.
      strict: a rule that matches no parameter is an error naming it.

    Returns:
      The ParamDict of the parameters that changed.

    Raises:
      ValueError: a bad rule, value or mode, or (strict) a rule matching nothing; nothing has
        changed then.

    Example:
      >>> lrmult.apply_rules(params, [("layers/[0-3]/", {"lr_mult": 0.1}), (".*", {"wd_mult": 1})])
    """
    if mode not in ("first", "all"):
        raise ValueError(f"apply_rules: mode must be 'first' or 'all', got {mode!r}")
    if not isinstance(strict, bool):
        raise TypeError(f"apply_rules: strict must be True or False, got {strict!r}")
    if not isinstance(params, ParamDict):
        raise TypeError(f"apply_rules: params must be a ParamDict, got {type(params).__name__}")
    rules, how = _normalize(rules)
    units = params.units()
    chosen: dict[tuple[str, str], tuple[int, Any]] = {}  # (unit, attr) -> (rule, value)
    for k, (pattern, settings) in enumerate(rules):
        regex = compile_pattern(pattern, f"apply_rules: rule {k}")
        hits = [u for u in units if getattr(regex, how)(u)]
        if strict and not hits:
            raise ValueError(
                f"apply_rules: rule {k} {pattern!r} matches no parameter "
                f"(names are like {', '.join(repr(u) for u in list(units)[:4])}); fix it or "
                f"pass strict=False"
            )
        for unit in hits:
            for attr, value in settings.items():
                if mode == "all" or (unit, attr) not in chosen:
                    chosen[(unit, attr)] = (k, value)
    for (unit, attr), (_, value) in chosen.items():  # each value checked, naming its unit
        if attr == "frozen":
            check_frozen(value, unit)
        else:
            check_multiplier(attr, value, unit)
    new: dict[tuple[str, str], Setting] = {}
    for attr in _ATTRS:
        for k in sorted({k for (u, a), (k, _) in chosen.items() if a == attr}):
            values = {u: v for (u, a), (kk, v) in chosen.items() if a == attr and kk == k}
            origin = f"rule {k} {rules[k][0]!r}"
            fill = False if attr == "frozen" else 1.0
            for name, (value, layers) in params.gather(values, fill).items():
                base = new.get((name, attr))
                _, new[(name, attr)] = params[name].planned(attr, value, origin, layers, base)
    for (name, attr), setting in new.items():
        params[name].put(attr, setting)
    changed = list(dict.fromkeys(name for name, _ in new))
    return ParamDict({n: params[n] for n in changed})
