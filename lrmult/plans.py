"""Gradual-unfreezing plans: groups of parameters that join training at set steps, with a ramp.

`presets.gradual_unfreezing` builds a `Plan` and attaches it to the Parameters it names
(`Parameter.plan`): it is data, not a callback. Every Trainer stepping those Parameters carries it
out by itself (`Agenda`), counting its own steps (`Trainer.num_update`). The convention:

- step `t` is the step a Trainer takes when `num_update == t` (its `t + 1`-th);
- group `k` is frozen while `t < at[k]` and trainable from `t = at[k]` on, when it joins training
  with fresh optimizer state and a step count of its own, as any unfrozen parameter does;
- with `warmup = K > 1`, its `lr_mult` at step `t >= at[k]` is its target times
  `min(1, (t - at[k] + 1) / K)`: the first step takes `1 / K` of the rate, the `K`-th and later
  ones all of it (`warmup` 0 and 1 both mean no ramp). In PyTorch this is `requires_grad`
  switched on at `at[k]` and `LambdaLR` with `lambda_k(t) = 0 if t < at[k] else
  min(1, (t - at[k] + 1) / K)` on that group's param groups, stepped after every
  `optimizer.step()`;
- the target is the `lr_mult` the group's parameters have through the Trainer's lookup chain
  (Parameter, override dicts, 1.0) when the group unfreezes. During the ramp the Trainer sets
  `lr_mult` on those Parameters (source `preset:gradual_unfreezing`, zero recompilations) and at
  its last step puts their own setting back. An `lr_mult` set by hand during a ramp becomes the
  target the ramp goes on toward.

Between events a Trainer does no host work for its plans: one integer comparison per step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import numpy as np

from lrmult import lookup
from lrmult.display import Table
from lrmult.lookup import Leaf
from lrmult.parameter import Parameter, Setting

ORIGIN = "preset:gradual_unfreezing"

# One member of a group: a parameter's name and the mask of its stacked layers in the group
# (None: the whole parameter).
Member = tuple[str, "np.ndarray | None"]


class PlanRow(NamedTuple):
    """One group of a plan, as `explain()` and `summary()` show it."""

    group: int
    selection: str
    parameters: int
    unfreezes_at: int
    full_rate_at: int
    state: str
    lr_factor: float


class Plan:
    """Which groups of parameters unfreeze at which step, and how their `lr_mult` ramps up.

    Immutable data; build it with `presets.gradual_unfreezing`.

    Args:
      groups: each group's selection as given (a regex's text), head first.
      members: per group, its `(parameter name, layer mask or None)` pairs.
      at: the step at which each group unfreezes, increasing.
      warmup: the number of steps over which a newly unfrozen group's `lr_mult` ramps up.
    """

    __slots__ = ("groups", "members", "at", "warmup")

    def __init__(
        self,
        groups: tuple[str, ...],
        members: tuple[tuple[Member, ...], ...],
        at: tuple[int, ...],
        warmup: int,
    ) -> None:
        self.groups = tuple(groups)
        self.members = tuple(tuple(m) for m in members)
        self.at = tuple(int(a) for a in at)
        self.warmup = int(warmup)

    def factor(self, k: int, step: int) -> float:
        """The share of its target `lr_mult` group `k` takes at `step` (0 while frozen)."""
        a = self.at[k]
        if step < a:
            return 0.0
        if self.warmup <= 1:
            return 1.0
        return min(1.0, (step - a + 1) / self.warmup)

    def full_rate_at(self, k: int) -> int:
        """The first step at which group `k` takes its whole target rate."""
        return self.at[k] + max(self.warmup, 1) - 1

    def active(self, step: int) -> list[int]:
        """The groups with something to do at `step`: unfreezing, or a step of their ramp."""
        return [k for k in range(len(self.at)) if self.at[k] <= step <= self.full_rate_at(k)]

    def next_event(self, step: int) -> float:
        """The first step from `step` on at which a group unfreezes or ramps (inf: none)."""
        later = [max(a, step) for k, a in enumerate(self.at) if step <= self.full_rate_at(k)]
        return min(later, default=math.inf)

    def state(self, k: int, step: int) -> str:
        """What group `k` does at `step`, in words."""
        if step < self.at[k]:
            return f"frozen until step {self.at[k]}"
        if step < self.full_rate_at(k):
            return f"ramp {step - self.at[k] + 1}/{self.warmup}"
        return "trainable"

    def rows(self, step: int | None = None) -> list[PlanRow]:
        """One row per group; with `step`, its state and `lr_mult` factor at that step."""
        return [
            PlanRow(
                k,
                self.groups[k],
                sum(1 if m is None else int(np.sum(m)) for _, m in self.members[k]),
                self.at[k],
                self.full_rate_at(k),
                "-" if step is None else self.state(k, step),
                float("nan") if step is None else self.factor(k, step),
            )
            for k in range(len(self.groups))
        ]

    def table(self, step: int | None = None) -> Table:
        """The plan as a table (with `step`: each group's state at that step)."""
        title = f"gradual unfreezing (warmup {self.warmup})"
        if step is not None:
            title += f" at step {step}"
        return Table(self.rows(step), title=title)

    def __repr__(self) -> str:
        return str(self.table())

    def _repr_html_(self) -> str:
        return self.table()._repr_html_()

    def frozen_at(
        self, params: Mapping[str, Parameter], step: int, plans: dict[str, Setting] | None = None
    ) -> dict[str, Setting]:
        """The `frozen` settings of the members' Parameters at `step`, validated, not applied.

        Args:
          params: the parameters the members name (members not in it are left out).
          step: a step of the plan.
          plans: settings planned already (by another group of the same stack), added to.

        Returns:
          `{name: Setting}` for `Parameter.put("frozen", ...)`.
        """
        out = {} if plans is None else plans
        for group, a in zip(self.members, self.at, strict=True):
            for name, layers in group:
                if name in params:
                    _, out[name] = params[name].planned(
                        "frozen", step < a, ORIGIN, layers, out.get(name)
                    )
        return out

    def describe(self) -> dict[str, Any]:
        """The plan as JSON data (for checkpoints; `from_description` reads it back)."""
        return {
            "groups": list(self.groups),
            "at": list(self.at),
            "warmup": self.warmup,
            "members": [
                [[name, None if m is None else m.tolist()] for name, m in group]
                for group in self.members
            ],
        }

    @classmethod
    def from_description(cls, d: Mapping[str, Any], params: Mapping[str, Parameter]) -> Plan:
        """The plan `describe()` gave, for `params`.

        Raises:
          ValueError: a member names no parameter of `params`, or its layers do not fit it.
        """
        members = []
        for group in d["members"]:
            out = []
            for name, mask in group:
                if name not in params:
                    raise ValueError(
                        f"the saved gradual-unfreezing plan names parameter {name!r}, which this "
                        f"model does not have"
                    )
                if mask is not None:
                    mask = np.asarray(mask, bool)
                    if mask.shape != params[name].stack_shape:
                        raise ValueError(
                            f"the saved gradual-unfreezing plan selects layers {mask.shape} of "
                            f"parameter {name!r}, whose stacked axes are "
                            f"{params[name].stack_shape}"
                        )
                    mask.flags.writeable = False
                out.append((name, mask))
            members.append(tuple(out))
        return cls(tuple(d["groups"]), tuple(members), tuple(d["at"]), int(d["warmup"]))


def _layers_of(x: Any, layers: np.ndarray | None, p: Parameter, dtype: Any) -> np.ndarray:
    """`x` (a value or source, per layer or not) at the member's layers, flattened."""
    arr = np.asarray(x, dtype=dtype)
    if layers is None:
        return arr.ravel()
    return np.broadcast_to(arr, p.stack_shape)[layers]


def _frozen_at(p: Parameter, layers: np.ndarray | None) -> bool:
    """Whether any of the member's layers is frozen."""
    value = p.setting("frozen").value
    return bool(np.any(_layers_of(False if value is None else value, layers, p, bool)))


def _brief(d: Mapping[str, Any]) -> str:
    """A described plan in one line."""
    return f"groups {d['groups']} at {d['at']}, warmup {d['warmup']}"


class _Run:
    """One Trainer's progress through one plan: its next step, and the targets of its ramps."""

    def __init__(self, plan: Plan, next_step: int) -> None:
        self.plan = plan
        self.next = next_step
        # (group, name) -> (target lr_mult through the chain, the Parameter's own setting)
        self.targets: dict[tuple[int, str], tuple[Any, Setting]] = {}
        # (group, name) -> the lr_mult the plan last wrote at the member's layers
        self.written: dict[tuple[int, str], np.ndarray] = {}

    def due(self) -> float:
        return self.plan.next_event(self.next)

    def carry_out(
        self,
        params: Mapping[str, Parameter],
        step: int,
        leaves: Mapping[str, Leaf],
        overrides: Mapping[int | str, float],
    ) -> None:
        """Make the Parameters what the plan says for `step`."""
        plan = self.plan
        for k in plan.active(step):
            members = [(n, m) for n, m in plan.members[k] if n in params]
            if step == plan.at[k]:
                for name, layers in members:
                    p = params[name]
                    if _frozen_at(p, layers):
                        p.put(*p.planned("frozen", False, ORIGIN, layers))
            if plan.warmup > 1:
                self._ramp(k, members, plan.factor(k, step), params, leaves, overrides)
        self.next = step + 1

    def _ramp(self, k, members, factor, params, leaves, overrides) -> None:
        """Set group `k`'s `lr_mult` to `factor` times its target (the ramp, on the host).

        The one place a ramp is applied: a schedule-valued `lr_mult` can take its place.
        """
        ramped = []
        for name, layers in members:
            p, key = params[name], (k, name)
            now = p.setting("lr_mult")
            if key not in self.targets or not self._ours(now, key, layers, p):
                ((target, _),) = lookup.resolve("lr_mult", [leaves[name]], params, overrides)
                self.targets[key] = (target, now)
            target, own = self.targets[key]
            if factor >= 1.0:
                _put_back(p, own, layers)
                del self.targets[key]
                self.written.pop(key, None)
                continue
            value = np.asarray(target, np.float64) * factor
            if layers is not None:
                value = np.broadcast_to(value, p.stack_shape)
            value = float(value) if value.ndim == 0 else value
            attr, setting = p.planned("lr_mult", value, ORIGIN, layers)
            p.put(attr, setting)
            self.written[key] = _layers_of(setting.value, layers, p, np.float64)
            ramped.append(name)
        if ramped and overrides:
            # The ramp shadows the override it ramps toward for a while: not the user's doing.
            ramp_leaves = [leaves[n] for n in ramped]
            for key, name in lookup.shadowed("lr_mult", overrides, ramp_leaves, params):
                params[name].first_report("lr_mult", key)

    def _ours(self, now: Setting, key: tuple[int, str], layers: Any, p: Parameter) -> bool:
        """Whether the member's `lr_mult` is still what the plan last wrote (not set by hand)."""
        written = self.written.get(key)
        if written is None or now.value is None:
            return False
        sources = _layers_of(now.source, layers, p, object)
        values = _layers_of(now.value, layers, p, np.float64)
        return bool(np.all(sources == ORIGIN)) and np.array_equal(values, written)

    def describe(self) -> dict[str, Any]:
        def plain(x: Any) -> Any:
            return x.tolist() if isinstance(x, np.ndarray) else x

        return {
            "plan": self.plan.describe(),
            "next": self.next,
            "targets": [
                [k, name, plain(target), plain(own.value), plain(own.source)]
                for (k, name), (target, own) in self.targets.items()
            ],
            "written": [[k, name, w.tolist()] for (k, name), w in self.written.items()],
        }

    def restore(self, d: Mapping[str, Any]) -> None:
        def back(x: Any, dtype: Any) -> Any:
            if not isinstance(x, list):
                return x
            arr = np.asarray(x, dtype)
            arr.flags.writeable = False
            return arr

        self.next = int(d["next"])
        self.targets = {
            (k, name): (back(target, np.float64), Setting(back(v, np.float64), back(s, object)))
            for k, name, target, v, s in d["targets"]
        }
        self.written = {(k, name): np.asarray(w, np.float64) for k, name, w in d["written"]}


def _put_back(p: Parameter, own: Setting, layers: np.ndarray | None) -> None:
    """Give the member's layers their own `lr_mult` setting back (value and source)."""
    if layers is None:
        p.put("lr_mult", own)
        return
    shape = p.stack_shape
    values = np.broadcast_to(np.asarray(1.0 if own.value is None else own.value), shape)
    sources = np.empty(shape, object)
    sources[...] = own.source
    setting = p.setting("lr_mult")
    for source in dict.fromkeys(sources[layers]):
        mask = layers & np.vectorize(lambda s, source=source: s == source, otypes=[bool])(sources)
        _, setting = p.planned("lr_mult", None if source is None else values, source, mask, setting)
    p.put("lr_mult", setting)


class Agenda:
    """The plans a Trainer carries out: found on its Parameters, done at their steps.

    `due` is the first step with something to do; a Trainer compares its step count with it
    and calls `carry_out` only then.
    """

    def __init__(self) -> None:
        self.runs: list[_Run] = []
        self.due: float = math.inf

    def adopt(self, params: Iterable[tuple[str, Parameter]], step: int) -> None:
        """Follow the plans the Parameters carry now, new ones from `step` on.

        Raises:
          ValueError: a new plan has a group unfreezing before `step` (nothing changes then).
        """
        found: dict[int, Plan] = {}
        for _, p in params:
            if p.plan is not None:
                found.setdefault(id(p.plan), p.plan)
        known = {id(run.plan): run for run in self.runs}
        for plan in found.values():
            if id(plan) not in known and plan.at[0] < step:
                raise ValueError(
                    f"gradual_unfreezing: the plan's group 0 ({plan.groups[0]!r}) unfreezes at "
                    f"step {plan.at[0]}, but this Trainer has taken {step} steps; give at= "
                    f"steps from {step} on"
                )
        self.runs = [known.get(i) or _Run(plan, step) for i, plan in found.items()]
        self.due = min((run.due() for run in self.runs), default=math.inf)

    def carry_out(
        self,
        params: Mapping[str, Parameter],
        step: int,
        leaves: Iterable[Leaf],
        overrides: Mapping[int | str, float],
    ) -> None:
        """Make the Parameters what every plan says for `step` (call it when `step >= due`)."""
        by_name = {leaf.name: leaf for leaf in leaves}
        for run in self.runs:
            if run.due() <= step:
                run.carry_out(params, step, by_name, overrides)
        self.due = min((run.due() for run in self.runs), default=math.inf)

    def tables(self, step: int) -> list[Table]:
        """One table per plan: each group's state at `step`."""
        return [run.plan.table(step) for run in self.runs]

    def describe(self) -> list[dict[str, Any]]:
        """Every plan and where this Trainer is in it, as JSON data."""
        return [run.describe() for run in self.runs]

    def check_saved(self, saved: list[dict[str, Any]], where: str) -> None:
        """Raise unless the plans followed now (if any) are the ones `saved` has.

        Args:
          saved: what `describe()` gave when the checkpoint was written.
          where: how the message names the checkpoint.

        Raises:
          ValueError: these Parameters follow a plan the checkpoint does not have: its frozen
            flags and ramps would undo part of it.
        """
        mine = [run.plan.describe() for run in self.runs]
        theirs = [d["plan"] for d in saved]
        if not mine or mine == theirs:
            return
        now = _brief(mine[0])
        if not theirs:
            raise ValueError(
                f"{where} was saved without a gradual-unfreezing plan, but these parameters "
                f"follow one ({now}); load the checkpoint first, then attach the plan with at= "
                f"steps from the checkpoint's num_update on"
            )
        raise ValueError(
            f"{where} was saved following another gradual-unfreezing plan "
            f"({_brief(theirs[0])}) than these parameters follow ({now})"
        )

    def restore(self, saved: list[dict[str, Any]], plans: list[Plan]) -> None:
        """Follow `plans` from where `saved` (from `describe`) says this Trainer was in each."""
        self.runs = []
        for plan, d in zip(plans, saved, strict=True):
            run = _Run(plan, 0)
            run.restore(d)
            self.runs.append(run)
        self.due = min((run.due() for run in self.runs), default=math.inf)
