"""lrmult's optimizer math pinned against torch.optim's update rules (SPEC §3 and §4).

Every expectation comes from `TorchRef`, a float64 NumPy transcription of PyTorch's `SGD`, `Adam`
and `AdamW` with one param group per leaf (`lr = base_lr * lr_mult`, `weight_decay = base_wd *
wd_mult`), never from lrmult's code. The loss is `sum_leaf 0.5 * sum(a * (w - t)**2)`, so the
gradient `a * (w - t)` is computed here in NumPy too. lrmult runs in float32: rtol 1e-5.

lrmult is driven three ways: `Trainer.step(grads)`, `Trainer.train_step(loss_fn)` and the ready
optax chains (`lrmult.sgd/adam/adamw(..., param_dict=pd)`) in a plain init/update/apply loop.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.tree_util import DictKey

import lrmult

STEPS = 20
SWITCH = 10  # the step at which a toggled leaf changes (frozen -> trainable, lr_mult 0 -> 1)
RTOL, ATOL = 1e-5, 1e-6
SEPARATION = 1e-4  # alternatives the tests must tell apart differ by more (10x the tolerance)

SHAPES = {
    "enc/bias": (4,),
    "enc/kernel": (3, 4),
    "head/bias": (2,),
    "head/kernel": (4, 2),
    "scale": (),
}
NAMES = list(SHAPES)
LR_MULT = {"enc/bias": 2.0, "enc/kernel": 0.1, "head/bias": 0.25, "head/kernel": 0.5, "scale": 1.5}
WD_MULT = {"enc/bias": 0.0, "enc/kernel": 1.0, "head/bias": 3.0, "head/kernel": 2.0, "scale": 0.5}
# In the "toggles" scenario: frozen for all steps (its shape is unique, to look for its state),
# frozen until step SWITCH then trained, and lr_mult 0 until step SWITCH then 1.
FROZEN, UNFROZEN, PAUSED = "enc/kernel", "head/kernel", "head/bias"
STEADY = [n for n in NAMES if n not in (FROZEN, UNFROZEN, PAUSED)]  # trainable throughout


def _fixed(rng: np.random.Generator, draw: Callable[..., Any], **kw) -> dict[str, np.ndarray]:
    """One float32-representable float64 array per leaf, so both sides start from equal numbers."""
    return {
        n: np.asarray(draw(size=s, **kw), np.float32).astype(np.float64) for n, s in SHAPES.items()
    }


_rng = np.random.default_rng(20240611)
INIT = _fixed(_rng, _rng.normal)
A = _fixed(_rng, _rng.uniform, low=0.5, high=1.5)
T = _fixed(_rng, _rng.normal)


def np_grad(name: str, w: np.ndarray) -> np.ndarray:
    """d/dw of 0.5 * sum(a * (w - t)**2), in float64."""
    return A[name] * (np.asarray(w, np.float64) - T[name])


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        *outer, last = name.split("/")
        node = tree
        for key in outer:
            node = node.setdefault(key, {})
        node[last] = value
    return tree


def _get(tree: Any, name: str) -> Any:
    for key in name.split("/"):
        tree = tree[key]
    return tree


def _flat(tree: Any) -> dict[str, np.ndarray]:
    return {n: np.array(_get(tree, n), np.float64) for n in NAMES}


def jax_loss(tree: Any) -> jax.Array:
    """The same loss in JAX, for `Trainer.train_step` (one function object: one compilation)."""
    return sum(
        0.5 * jnp.sum(jnp.asarray(A[n], jnp.float32) * (_get(tree, n) - jnp.float32(T[n])) ** 2)
        for n in NAMES
    )


# -- the reference: torch.optim's formulas in NumPy -----------------------------------------------


class TorchRef:
    """torch.optim's SGD / Adam / AdamW, one param group per leaf, in float64 NumPy.

    As in PyTorch, a leaf whose gradient is None (`requires_grad=False`) is skipped and its state
    is created lazily at its first real step; a group with lr 0 still advances its state.
    `lr_mult_on_gradient=True` is the misplacement lrmult must not make: the multiplier scales the
    gradient fed to Adam instead of the final step.
    """

    def __init__(self, hp: dict[str, Any], lr_mult_on_gradient: bool = False) -> None:
        self.hp = hp
        self.lr_mult_on_gradient = lr_mult_on_gradient
        self.params = {n: v.copy() for n, v in INIT.items()}
        self.state: dict[str, dict[str, Any]] = {}

    def step(self, grads, lr_mult, wd_mult, frozen) -> None:
        for n, p in self.params.items():
            if n in frozen:
                continue
            lr, wd, g = self.hp["lr"] * lr_mult[n], self.hp["wd"] * wd_mult[n], grads[n]
            if self.lr_mult_on_gradient:
                lr, g = self.hp["lr"], g * lr_mult[n]
            state = self.state.setdefault(n, {})
            if self.hp["kind"] == "sgd":
                self.params[n] = self._sgd(p, g, lr, wd, state)
            else:
                self.params[n] = self._adam(p, g, lr, wd, state)

    def _sgd(self, p, g, lr, wd, state):
        momentum = self.hp["momentum"]
        d_p = g + wd * p
        buf = state.get("momentum_buffer")
        buf = d_p.copy() if buf is None else momentum * buf + d_p  # dampening 0
        state["momentum_buffer"] = buf
        d_p = d_p + momentum * buf if self.hp["nesterov"] else buf
        return p - lr * d_p

    def _adam(self, p, g, lr, wd, state):
        b1, b2, eps = self.hp["b1"], self.hp["b2"], self.hp["eps"]
        if self.hp["kind"] == "adamw":
            p = p * (1 - lr * wd)
        else:
            g = g + wd * p
        step = state["step"] = state.get("step", 0) + 1
        m = state["exp_avg"] = b1 * state.get("exp_avg", 0.0) + (1 - b1) * g
        v = state["exp_avg_sq"] = b2 * state.get("exp_avg_sq", 0.0) + (1 - b2) * g * g
        bias_correction1 = 1 - b1**step
        bias_correction2 = 1 - b2**step
        denom = np.sqrt(v) / np.sqrt(bias_correction2) + eps
        return p - (lr / bias_correction1) * m / denom


# -- optimizers, scenarios, drivers --------------------------------------------------------------


class Case(NamedTuple):
    hp: dict[str, Any]  # TorchRef's hyperparameters
    trainer: tuple[str, dict[str, Any]]  # Trainer(pd, name, optimizer_params)
    chain: Callable[[lrmult.ParamDict], optax.GradientTransformation]


_SGD = dict(kind="sgd", lr=0.05, momentum=0.9, wd=0.1)
_ADAM = dict(lr=0.01, b1=0.8, b2=0.99, eps=1e-6)
CASES = {
    "sgd_momentum": Case(
        {**_SGD, "nesterov": False},
        ("sgd", {"learning_rate": 0.05, "momentum": 0.9, "wd": 0.1}),
        lambda pd: lrmult.sgd(0.05, 0.9, False, 0.1, param_dict=pd),
    ),
    "sgd_nesterov": Case(
        {**_SGD, "nesterov": True},
        ("sgd", {"learning_rate": 0.05, "momentum": 0.9, "wd": 0.1, "nesterov": True}),
        lambda pd: lrmult.sgd(0.05, 0.9, True, 0.1, param_dict=pd),
    ),
    "adam_l2": Case(
        {**_ADAM, "kind": "adam", "wd": 0.1},
        (
            "adam",
            {"learning_rate": 0.01, "beta1": 0.8, "beta2": 0.99, "epsilon": 1e-6, "wd": 0.1},
        ),
        lambda pd: lrmult.adam(0.01, 0.8, 0.99, 1e-6, 0.0, 0.1, param_dict=pd),
    ),
    "adamw": Case(
        {**_ADAM, "kind": "adamw", "wd": 0.5},
        (
            "adamw",
            {"learning_rate": 0.01, "beta1": 0.8, "beta2": 0.99, "epsilon": 1e-6, "wd": 0.5},
        ),
        lambda pd: lrmult.adamw(0.01, 0.8, 0.99, 1e-6, 0.0, 0.5, param_dict=pd),
    ),
}

# step -> {leaf: {attribute: value}}, applied before that step, to lrmult and the reference alike.
Events = dict[int, dict[str, dict[str, Any]]]
SCENARIOS: dict[str, Events] = {
    "plain": {},
    "toggles": {
        0: {FROZEN: {"frozen": True}, UNFROZEN: {"frozen": True}, PAUSED: {"lr_mult": 0.0}},
        SWITCH: {UNFROZEN: {"frozen": False}, PAUSED: {"lr_mult": 1.0}},
    },
}


def reference(case: Case, events: Events, lr_mult_on_gradient: bool = False) -> list[dict]:
    """The parameters after each step, as torch.optim computes them."""
    ref = TorchRef(case.hp, lr_mult_on_gradient)
    lr_mult, wd_mult, frozen = dict(LR_MULT), dict(WD_MULT), set()
    trajectory = []
    for k in range(STEPS):
        for name, attrs in events.get(k, {}).items():
            for attr, value in attrs.items():
                if attr == "frozen":
                    (frozen.add if value else frozen.discard)(name)
                else:
                    {"lr_mult": lr_mult, "wd_mult": wd_mult}[attr][name] = value
        ref.step({n: np_grad(n, p) for n, p in ref.params.items()}, lr_mult, wd_mult, frozen)
        trajectory.append({n: p.copy() for n, p in ref.params.items()})
    return trajectory


def _apply(pd: lrmult.ParamDict, events: Events, k: int) -> bool:
    """Set the attributes due before step `k` on the Parameters; True if any was due."""
    for name, attrs in events.get(k, {}).items():
        for attr, value in attrs.items():
            setattr(pd[name], attr, value)
    return k in events


def _np_grads(values: dict[str, Any]) -> dict[str, np.ndarray]:
    return {n: np.asarray(np_grad(n, v), np.float32) for n, v in values.items()}


class Run(NamedTuple):
    trajectory: list[dict[str, np.ndarray]]  # the parameters after each step
    opt_state: Any  # the final optimizer state
    updates: list[dict[str, np.ndarray]] | None  # each step's updates (optax level only)


def drive_trainer_step(case: Case, pd: lrmult.ParamDict, events: Events) -> Run:
    trainer = lrmult.Trainer(pd, *case.trainer)
    trajectory = []
    for k in range(STEPS):
        if k:
            _apply(pd, events, k)
        trainer.step(_np_grads(_flat(pd.tree())))
        trajectory.append(_flat(pd.tree()))
    return Run(trajectory, trainer.opt_state, None)


def drive_trainer_train_step(case: Case, pd: lrmult.ParamDict, events: Events) -> Run:
    trainer = lrmult.Trainer(pd, *case.trainer)
    trajectory = []
    for k in range(STEPS):
        if k:
            _apply(pd, events, k)
        trainer.train_step(jax_loss)
        trajectory.append(_flat(pd.tree()))
    return Run(trajectory, trainer.opt_state, None)


def drive_optax_chain(case: Case, pd: lrmult.ParamDict, events: Events) -> Run:
    tx = case.chain(pd)
    update = jax.jit(tx.update)
    params = pd.tree()
    state = tx.init(params)
    trajectory, all_updates = [], []
    for k in range(STEPS):
        if k and _apply(pd, events, k):
            state = lrmult.refresh(state, pd)
        # Frozen leaves get their (nonzero) gradient too: the chain must give them a zero update.
        grads = _nest({n: jnp.asarray(g) for n, g in _np_grads(_flat(params)).items()})
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        all_updates.append(_flat(updates))
        trajectory.append(_flat(params))
    return Run(trajectory, state, all_updates)


DRIVERS = {
    "trainer_step": drive_trainer_step,
    "trainer_train_step": drive_trainer_train_step,
    "optax_chain": drive_optax_chain,
}


def run_lrmult(case: Case, driver: str, events: Events) -> Run:
    """lrmult's parameters after each step, its final optimizer state (and updates)."""
    tree = _nest({n: jnp.asarray(v, jnp.float32) for n, v in INIT.items()})
    pd = lrmult.ParamDict.from_pytree(tree)
    assert list(pd) == sorted(NAMES)
    for n in NAMES:
        pd[n].lr_mult = LR_MULT[n]
        pd[n].wd_mult = WD_MULT[n]
    _apply(pd, events, 0)
    return DRIVERS[driver](case, pd, events)


@functools.cache
def run_scenario(case: str, driver: str, scenario: str) -> Run:
    """`run_lrmult` for a named scenario, once per session (the torch test reuses the runs)."""
    return run_lrmult(CASES[case], driver, SCENARIOS[scenario])


def assert_trajectories_close(got: list[dict], want: list[dict], names=NAMES) -> None:
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        for n in names:
            np.testing.assert_allclose(
                g[n], w[n], rtol=RTOL, atol=ATOL, err_msg=f"leaf {n!r} after step {k + 1}"
            )


def _state_arrays(opt_state: Any) -> list[tuple[str, tuple[int, ...]]]:
    """(`/`-joined dict keys of the path, shape) of every array in an optimizer state."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        keys = "/".join(str(k.key) for k in path if isinstance(k, DictKey))
        out.append((f"/{keys}/", np.shape(leaf)))
    return out


case_ids = pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
driver_ids = pytest.mark.parametrize("driver", list(DRIVERS), ids=list(DRIVERS))


# -- tests ---------------------------------------------------------------------------------------


def _final(case: str, events: Events, name: str, **kw) -> np.ndarray:
    return reference(CASES[case], events, **kw)[-1][name]


@case_ids
def test_reference_tells_the_behaviours_apart(case):
    """The alternatives differ by far more than the tolerance, so the tests below can tell them
    apart: a paused leaf (lr_mult 0, state advancing) is not a frozen one (no state), and for Adam
    lr_mult on the final step is not lr_mult on the gradient."""
    toggles = SCENARIOS["toggles"]
    swapped = {
        0: {UNFROZEN: {"lr_mult": 0.0}, PAUSED: {"frozen": True}},
        SWITCH: {UNFROZEN: {"lr_mult": LR_MULT[UNFROZEN]}, PAUSED: {"frozen": False}},
    }
    for name in (UNFROZEN, PAUSED):
        gap = _final(case, toggles, name) - _final(case, swapped, name)
        assert np.max(np.abs(gap)) > SEPARATION, name
        gap = _final(case, toggles, name) - _final(case, {}, name)
        assert np.max(np.abs(gap)) > SEPARATION, name
    if CASES[case].hp["kind"] != "sgd":
        for name in NAMES:
            gap = _final(case, {}, name) - _final(case, {}, name, lr_mult_on_gradient=True)
            assert (np.max(np.abs(gap)) > SEPARATION) == (LR_MULT[name] != 1.0), name


@case_ids
@driver_ids
def test_per_leaf_lr_mult_and_wd_mult_match_torch_param_groups(case, driver):
    """SGD (momentum, Nesterov) / Adam (coupled L2) / AdamW (decoupled): every leaf, every step,
    equals a torch param group with `lr = lr * lr_mult` and `weight_decay = wd * wd_mult`."""
    got = run_scenario(case, driver, "plain").trajectory
    assert_trajectories_close(got, reference(CASES[case], SCENARIOS["plain"]))


@case_ids
@driver_ids
def test_frozen_leaf_never_moves_and_holds_no_optimizer_state(case, driver):
    """A frozen leaf is torch's `requires_grad=False`: bit-identical value (no decay either) and
    no optimizer state keyed by its name or shaped like it; the trainable leaves train as in torch
    (checked up to step 10, where the other toggles start)."""
    got, opt_state, updates = run_scenario(case, driver, "toggles")
    for k, values in enumerate(got):
        np.testing.assert_array_equal(values[FROZEN], INIT[FROZEN], err_msg=f"step {k + 1}")
    for k, update in enumerate(updates or []):  # the optax level: an update of exactly zero
        np.testing.assert_array_equal(update[FROZEN], 0.0, err_msg=f"step {k + 1}")
    want = reference(CASES[case], SCENARIOS["toggles"])
    assert_trajectories_close(got[:SWITCH], want[:SWITCH], names=STEADY)

    arrays = _state_arrays(opt_state)
    assert any(f"/{UNFROZEN}/" in path for path, _ in arrays)  # the check can see names
    assert not [path for path, _ in arrays if f"/{FROZEN}/" in path]
    assert SHAPES[FROZEN] not in [shape for _, shape in arrays]


@case_ids
@driver_ids
def test_leaf_unfrozen_at_step_10_starts_fresh_state_like_torch(case, driver):
    """Unfreezing is torch switching `requires_grad` on: the leaf's state is created then, so its
    momentum buffer starts from its first gradient and its Adam step count from 1; the leaves
    that stayed trainable keep their state."""
    got = run_scenario(case, driver, "toggles").trajectory
    for k in range(SWITCH):
        np.testing.assert_array_equal(got[k][UNFROZEN], INIT[UNFROZEN], err_msg=f"step {k + 1}")
    want = reference(CASES[case], SCENARIOS["toggles"])
    assert_trajectories_close(got, want, names=[UNFROZEN, *STEADY])


def adam_first_step(case: str, name: str, w: np.ndarray, lr_mult: float) -> np.ndarray:
    """A leaf's first Adam step from `w`: bias correction makes m / sqrt(v) = g / |g|."""
    hp = CASES[case].hp
    g, wd = np_grad(name, w), hp["wd"] * WD_MULT[name]
    if hp["kind"] == "adam":
        g = g + wd * w
        return -hp["lr"] * lr_mult * g / (np.abs(g) + hp["eps"])
    return -hp["lr"] * lr_mult * (g / (np.abs(g) + hp["eps"]) + wd * w)


adam_ids = pytest.mark.parametrize("case", ["adam_l2", "adamw"])


@adam_ids
@driver_ids
def test_adam_unfrozen_leaf_restarts_bias_correction(case, driver):
    """A leaf unfrozen at step 10 takes Adam's bias-corrected *first* step (about lr * lr_mult per
    element), not the ~0.5x smaller step a shared step count (11 by then) would give."""
    got = run_scenario(case, driver, "toggles").trajectory
    want = adam_first_step(case, UNFROZEN, INIT[UNFROZEN], LR_MULT[UNFROZEN])
    np.testing.assert_allclose(got[SWITCH][UNFROZEN] - INIT[UNFROZEN], want, rtol=1e-4, atol=1e-6)


@case_ids
@driver_ids
def test_lr_mult_zero_holds_the_leaf_but_its_state_keeps_advancing(case, driver):
    """`lr_mult = 0` for 10 steps then 1 is a torch group with lr 0 then restored: the leaf does not
    move, but its momentum buffer / Adam moments and step count advance (it is not frozen)."""
    got = run_scenario(case, driver, "toggles").trajectory
    for k in range(SWITCH):
        np.testing.assert_array_equal(got[k][PAUSED], INIT[PAUSED], err_msg=f"step {k + 1}")
    want = reference(CASES[case], SCENARIOS["toggles"])
    assert_trajectories_close(got, want, names=[PAUSED])


@adam_ids
@driver_ids
def test_adam_lr_mult_scales_the_final_step_not_the_gradient(case, driver):
    """With Adam, lr_mult on the gradient would cancel in m / sqrt(v); on the final step it scales
    the step by lr_mult. Each leaf's first step is -lr * lr_mult * adam(g), and the trajectory is
    far from the misplaced one."""
    got = run_scenario(case, driver, "plain").trajectory
    for n in NAMES:
        want = adam_first_step(case, n, INIT[n], LR_MULT[n])
        np.testing.assert_allclose(got[0][n] - INIT[n], want, rtol=1e-4, atol=1e-6, err_msg=n)
    wrong = reference(CASES[case], {}, lr_mult_on_gradient=True)
    for n in NAMES:
        if LR_MULT[n] != 1.0:
            assert not np.allclose(got[-1][n], wrong[-1][n], rtol=RTOL, atol=ATOL), n


# -- the real torch.optim (optional) -------------------------------------------------------------


def torch_trajectory(case: Case, events: Events) -> list[dict]:
    """The parameters after each step of the real torch.optim, one param group per leaf."""
    torch = pytest.importorskip("torch")
    params = {n: torch.tensor(v, dtype=torch.float64, requires_grad=True) for n, v in INIT.items()}
    hp = case.hp
    groups = [
        {"params": [params[n]], "lr": hp["lr"] * LR_MULT[n], "weight_decay": hp["wd"] * WD_MULT[n]}
        for n in NAMES
    ]
    if hp["kind"] == "sgd":
        opt = torch.optim.SGD(groups, lr=hp["lr"], momentum=hp["momentum"], nesterov=hp["nesterov"])
    else:
        cls = torch.optim.Adam if hp["kind"] == "adam" else torch.optim.AdamW
        opt = cls(groups, lr=hp["lr"], betas=(hp["b1"], hp["b2"]), eps=hp["eps"])
    a = {n: torch.tensor(v) for n, v in A.items()}
    t = {n: torch.tensor(v) for n, v in T.items()}
    trajectory = []
    for k in range(STEPS):
        for name, attrs in events.get(k, {}).items():
            group = opt.param_groups[NAMES.index(name)]
            for attr, value in attrs.items():
                if attr == "frozen":
                    params[name].requires_grad_(not value)
                elif attr == "lr_mult":
                    group["lr"] = hp["lr"] * value
                else:
                    group["weight_decay"] = hp["wd"] * value
        opt.zero_grad(set_to_none=True)
        loss = sum(0.5 * (a[n] * (params[n] - t[n]) ** 2).sum() for n in NAMES)
        loss.backward()
        opt.step()
        trajectory.append({n: params[n].detach().numpy().copy() for n in NAMES})
    return trajectory


@case_ids
@pytest.mark.parametrize("scenario", list(SCENARIOS), ids=list(SCENARIOS))
def test_numpy_transcription_and_lrmult_match_real_torch_optim(case, scenario):
    """The NumPy transcription equals torch.optim to float64 precision, and lrmult equals both."""
    want = torch_trajectory(CASES[case], SCENARIOS[scenario])
    mine = reference(CASES[case], SCENARIOS[scenario])
    for k, (ours, theirs) in enumerate(zip(mine, want, strict=True)):
        for n in NAMES:
            np.testing.assert_allclose(ours[n], theirs[n], rtol=1e-12, atol=1e-14, err_msg=f"{k}")
    got = run_scenario(case, "trainer_train_step", scenario).trajectory
    assert_trajectories_close(got, want)
