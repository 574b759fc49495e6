"""Gradual-unfreezing plans (`presets.gradual_unfreezing`), carried out by the Trainers.

The numbers come from `TorchRef` (test_numerics.py: torch.optim's formulas in NumPy) with
`requires_grad` switched on at each group's step and a `LambdaLR` ramp on its param groups:
`lambda_k(t) = 0 for t < at[k], min(1, (t - at[k] + 1) / K)` after, `t` counting from 0.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import step_counts
from test_numerics import (
    CASES,
    INIT,
    LR_MULT,
    NAMES,
    SEPARATION,
    WD_MULT,
    TorchRef,
    _flat,
    _nest,
    _np_grads,
    adam_first_step,
    assert_trajectories_close,
    jax_loss,
    np_grad,
)
from test_stacked import BIAS, KERNEL, L, X, Y, _unstacked_grad, stacked_loss

import lrmult
from lrmult import ParamDict, Trainer, plans, presets

STEPS = 40
GROUPS = ["head/", "enc/", "scale"]
MEMBERS = [["head/bias", "head/kernel"], ["enc/bias", "enc/kernel"], ["scale"]]
AT = [0, 7, 19]
WARMUP = 6
GROUP_OF = {n: k for k, names in enumerate(MEMBERS) for n in names}


def lam(t: int, a: int, warmup: int) -> float:
    """LambdaLR's factor for a group unfrozen at step `a` (0 while frozen)."""
    if t < a:
        return 0.0
    return 1.0 if warmup <= 1 else min(1.0, (t - a + 1) / warmup)


def reference(case, at=AT, warmup=WARMUP, shared_count=False):
    """torch.optim with requires_grad switched on at `at[k]` and LambdaLR on group k.

    `shared_count=True` is what lrmult must not do: a group unfrozen at step t starts its Adam
    step count at t (one count for all), so its bias correction does not restart.
    """
    ref = TorchRef(case.hp)
    trajectory = []
    for t in range(STEPS):
        frozen = {n for n in NAMES if t < at[GROUP_OF[n]]}
        if shared_count:
            for n in NAMES:
                if n not in frozen and n not in ref.state:
                    ref.state[n] = {"step": t}
        lr_mult = {n: LR_MULT[n] * lam(t, at[GROUP_OF[n]], warmup) for n in NAMES}
        grads = {n: np_grad(n, p) for n, p in ref.params.items()}
        ref.step(grads, lr_mult, WD_MULT, frozen)
        trajectory.append({n: p.copy() for n, p in ref.params.items()})
    return trajectory


def make_params(plan=True, **kw):
    pd = ParamDict.from_pytree(_nest({n: jnp.asarray(v, jnp.float32) for n, v in INIT.items()}))
    for n in NAMES:
        pd[n].lr_mult = LR_MULT[n]
        pd[n].wd_mult = WD_MULT[n]
    if plan:
        presets.gradual_unfreezing(pd, GROUPS, **{"at": AT, "warmup": WARMUP, **kw})
    return pd


def run(trainer, pd, steps, driver="train_step"):
    out = []
    for _ in range(steps):
        if driver == "train_step":
            trainer.train_step(jax_loss)
        else:
            trainer.step(_np_grads(_flat(pd.tree())))
        out.append(_flat(pd.tree()))
    return out


plan_cases = pytest.mark.parametrize("case", ["sgd_momentum", "adam_l2"])


@plan_cases
@pytest.mark.parametrize("driver", ["train_step", "step"])
def test_plan_equals_torch_requires_grad_and_lambdalr_over_40_steps(case, driver, compiles):
    """Every leaf, every step: a group frozen until at[k] (no state, no decay), then trained with
    fresh state and LambdaLR's linear ramp; one compilation per frozen set, none for the ramp."""
    pd = make_params()
    trainer = Trainer(pd, *CASES[case].trainer)
    counter = compiles()
    got = run(trainer, pd, STEPS, driver)
    want = reference(CASES[case])
    assert_trajectories_close(got, want)
    for n in NAMES:  # frozen until its step: not moved at all
        a = AT[GROUP_OF[n]]
        for t in range(a):
            np.testing.assert_array_equal(got[t][n], INIT[n], err_msg=f"{n} at step {t}")
    fn = "lrmult_train_step" if driver == "train_step" else "_lrmult_apply_step"
    assert counter(fn) == len(AT)  # the three frozen sets, not one per ramp step
    assert trainer.num_update == STEPS


@plan_cases
def test_the_reference_tells_ramp_and_step_count_apart(case):
    """The ramp, the unfreezing steps and (for Adam) each group's own step count all change the
    trajectory by far more than the tolerance."""
    want = reference(CASES[case])[-1]
    others = [reference(CASES[case], warmup=0)[-1], reference(CASES[case], at=[0, 8, 19])[-1]]
    if CASES[case].hp["kind"] != "sgd":
        others.append(reference(CASES[case], shared_count=True)[-1])
    for other in others:
        assert max(np.max(np.abs(want[n] - other[n])) for n in NAMES) > SEPARATION


def test_adam_newly_unfrozen_group_restarts_bias_correction_at_a_ramped_rate():
    """The first step of a group unfrozen at step 7 is Adam's first step (m / sqrt(v) = g / |g|),
    at 1/K of its rate: not the smaller step a shared count of 8 would give."""
    pd = make_params()
    trainer = Trainer(pd, *CASES["adam_l2"].trainer)
    got = run(trainer, pd, AT[1] + 1)
    for n in MEMBERS[1]:
        want = adam_first_step("adam_l2", n, INIT[n], LR_MULT[n] / WARMUP)
        np.testing.assert_allclose(got[AT[1]][n] - INIT[n], want, rtol=1e-4, atol=1e-7)
    shared = reference(CASES["adam_l2"], shared_count=True)[AT[1]]
    for n in MEMBERS[1]:  # a shared count (8) would take about 0.67x the step
        ours, theirs = np.abs(got[AT[1]][n] - INIT[n]), np.abs(shared[n] - INIT[n])
        assert np.all(theirs < 0.75 * ours), n


def test_every_is_at_k_times_every():
    a, b = make_params(at=None, every=10), make_params(at=[0, 10, 20])
    ta, tb = (
        Trainer(a, "adam", {"learning_rate": 0.01}),
        Trainer(b, "adam", {"learning_rate": 0.01}),
    )
    for x, y in zip(run(ta, a, 25), run(tb, b, 25), strict=True):
        for n in NAMES:
            np.testing.assert_array_equal(x[n], y[n])


def test_host_work_only_at_unfreezing_and_ramp_steps(monkeypatch):
    """Between events a step costs the plan one comparison: `carry_out` runs at the steps where
    a group unfreezes or ramps, never else."""
    seen = []
    original = plans._Run.carry_out

    def spy(self, params, step, leaves, overrides):
        seen.append(step)
        return original(self, params, step, leaves, overrides)

    monkeypatch.setattr(plans._Run, "carry_out", spy)
    pd = make_params()
    trainer = Trainer(pd, "sgd", {"learning_rate": 0.01})
    run(trainer, pd, STEPS)
    ramps = [range(a, a + WARMUP) for a in AT]
    assert seen == sorted(t for r in ramps for t in r)


def test_plan_on_the_per_layer_names_of_a_stack_equals_torch_per_layer_groups():
    """A stack's layers unfreeze top down (`layers/3/` first), each with its own Adam count and
    ramp, as PyTorch param groups per layer of the unstacked model."""
    tree = {"layers": {"kernel": jnp.asarray(KERNEL), "bias": jnp.asarray(BIAS)}}
    pd = ParamDict.from_pytree(tree, stacked={"layers": 1})
    mults = np.array([0.25, 0.5, 1.0, 2.0])
    pd.setattr("lr_mult", mults)
    at, warmup, steps = [0, 4, 9], 3, 20
    presets.gradual_unfreezing(pd, ["layers/3/", "layers/2/", "layers/[01]/"], at=at, warmup=warmup)
    np.testing.assert_array_equal(pd["layers/kernel"].frozen_layers, [True, True, True, False])
    trainer = Trainer(pd, *CASES["adam_l2"].trainer)
    for _ in range(steps):
        trainer.train_step(stacked_loss, X, Y)
    np.testing.assert_array_equal(pd["layers/kernel"].lr_mult, mults)  # the ramps are over
    assert pd["layers/kernel"].origin("lr_mult") == "param"

    ref = TorchRef(CASES["adam_l2"].hp)
    unfreeze = {3: at[0], 2: at[1], 1: at[2], 0: at[2]}
    layers = [[KERNEL[i].astype(np.float64), BIAS[i].astype(np.float64)] for i in range(L)]
    states = [[{}, {}] for _ in range(L)]
    for t in range(steps):
        grads = _unstacked_grad([(jnp.float32(k), jnp.float32(b)) for k, b in layers], X, Y)
        for i in range(L):
            if t < unfreeze[i]:
                continue
            lr = ref.hp["lr"] * mults[i] * lam(t, unfreeze[i], warmup)
            for j in range(2):
                g = np.asarray(grads[i][j], np.float64)
                layers[i][j] = ref._adam(layers[i][j], g, lr, ref.hp["wd"], states[i][j])
    got = pd.tree()["layers"]
    np.testing.assert_allclose(
        got["kernel"], np.stack([k for k, _ in layers]), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(got["bias"], np.stack([b for _, b in layers]), rtol=1e-5, atol=1e-6)


def test_nnx_trainer_carries_out_the_plan_by_itself():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.body = nnx.Linear(3, 4, rngs=rngs)
            self.head = nnx.Linear(4, 2, rngs=rngs)

        def __call__(self, x):
            return self.head(nnx.relu(self.body(x)))

    def loss_fn(model, x):
        return jnp.mean(model(x) ** 2)

    model = Net(nnx.Rngs(0))
    params = lrmult.from_nnx(model)
    presets.gradual_unfreezing(params, ["head/", "body/"], at=[0, 3], warmup=2)
    trainer = lrmult.NNXTrainer(model, params, "adam", {"learning_rate": 0.1})
    x = jnp.ones((5, 3))
    body = np.asarray(model.body.kernel.get_value())
    for t in range(6):
        head = np.asarray(model.head.kernel.get_value())
        trainer.train_step(loss_fn, x)
        assert not np.array_equal(model.head.kernel.get_value(), head)
        moved = not np.array_equal(model.body.kernel.get_value(), body)
        assert moved == (t >= 3), t
        assert params["body/kernel"].lr_mult == (0.5 if t == 3 else 1.0), t
    assert [r.state for r in trainer.explain().appendix[0]] == ["trainable", "trainable"]


def snapshot(pd):
    return [(n, repr(p.metadata()), p.plan) for n, p in pd.items()]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"groups": ["head/", "nothing/", "scale"]},
            ValueError,
            r"groups\[1\]: .*matches no parameter",
        ),
        (
            {"groups": ["head/", "head/k", "scale"]},
            ValueError,
            r"'head/kernel' is matched by groups\[0\]",
        ),
        ({"groups": "head/"}, TypeError, "non-empty list of selections"),
        ({"groups": []}, TypeError, "non-empty list of selections"),
        ({"at": [0, 5, 5]}, ValueError, r"at must be strictly increasing.*at\[2\] = 5"),
        ({"at": [0, 10, 5]}, ValueError, r"strictly increasing.*at\[2\] = 5 follows at\[1\]"),
        ({"at": [0, 10]}, ValueError, "at has 2 steps for 3 groups"),
        ({"at": [0, -1, 5]}, ValueError, r"at\[1\] must be an int >= 0"),
        ({"at": [0, 1.5, 5]}, ValueError, r"at\[1\] must be an int >= 0"),
        ({"every": 5}, ValueError, "not both"),
        ({"at": None}, ValueError, "one of them"),
        ({"at": None, "every": 0}, ValueError, "every must be an int >= 1"),
        ({"warmup": -1}, ValueError, "warmup must be an int >= 0"),
        ({"warmup": 2.5}, ValueError, "warmup must be an int >= 0"),
    ],
)
def test_bad_plans_are_refused_naming_the_argument_before_anything_changes(kwargs, error, match):
    pd = make_params(plan=False)
    before = snapshot(pd)
    args = {"groups": GROUPS, "at": AT, "warmup": 3, **kwargs}
    groups = args.pop("groups")
    with pytest.raises(error, match=match):
        presets.gradual_unfreezing(pd, groups, **args)
    assert snapshot(pd) == before


def test_a_plan_starting_before_the_trainers_step_count_is_refused():
    pd = make_params(plan=False)
    trainer = Trainer(pd, "sgd", {"learning_rate": 0.01})
    run(trainer, pd, 5)
    before = snapshot(pd)
    with pytest.raises(ValueError, match=r"at puts groups\[0\] \('head/'\) at step 0, .*5 steps"):
        presets.gradual_unfreezing(pd, GROUPS, at=AT)
    with pytest.raises(ValueError, match=r"groups\[0\] \('head/'\) at step 4, .*5 steps"):
        presets.gradual_unfreezing(pd, GROUPS, at=[4, 10, 20])
    assert snapshot(pd) == before
    presets.gradual_unfreezing(pd, GROUPS, at=[5, 12, 24])  # from its step count on: fine
    assert [pd[n].frozen for n in NAMES] == [True, True, False, False, True]
    run(trainer, pd, 8)
    assert not pd["enc/kernel"].frozen and pd["scale"].frozen


def test_every_counts_from_the_trainers_step_count():
    pd = make_params(plan=False)
    trainer = Trainer(pd, "sgd", {"learning_rate": 0.01})
    run(trainer, pd, 5)
    presets.gradual_unfreezing(pd, GROUPS, every=4)
    assert pd["head/kernel"].plan.at == (5, 9, 13)


def test_a_parameter_follows_one_plan():
    pd = make_params()
    before = snapshot(pd)
    with pytest.raises(ValueError, match="'head/bias' already follows a gradual-unfreezing plan"):
        presets.gradual_unfreezing(pd, ["head/"], at=[3])
    assert snapshot(pd) == before


def test_explain_and_summary_show_the_plan_and_where_the_trainer_is():
    pd = make_params()
    trainer = Trainer(pd, "adam", {"learning_rate": 0.01})
    run(trainer, pd, 9)  # step 9 next: group 1 (at 7) on ramp step 3 of 6
    table = trainer.explain()
    (plan,) = table.appendix
    assert [(r.group, r.selection, r.unfreezes_at, r.full_rate_at) for r in plan] == [
        (0, "head/", 0, 5),
        (1, "enc/", 7, 12),
        (2, "scale", 19, 24),
    ]
    assert [r.state for r in plan] == ["trainable", "ramp 3/6", "frozen until step 19"]
    assert [r.lr_factor for r in plan] == [1.0, 0.5, 0.0]
    rows = {r.name: r for r in table}
    assert rows["enc/kernel"].lr_mult == pytest.approx(LR_MULT["enc/kernel"] * 0.5)
    assert rows["enc/kernel"].lr_source == "preset:gradual_unfreezing"
    assert rows["head/kernel"].lr_source == "param"  # its own setting back after the ramp
    assert rows["scale"].frozen and rows["scale"].frozen_source == "preset:gradual_unfreezing"
    text = str(table)
    assert "gradual unfreezing (warmup 6) at step 9" in text and "ramp 3/6" in text
    assert table._repr_html_().count("<table") == 2
    summary = trainer.summary()
    assert summary[0].num_update == 9
    assert "frozen until step 19" in str(summary) and "ramp 3/6" in repr(trainer)
    assert "gradual unfreezing" in repr(pd["scale"].plan)  # the plan itself prints


@pytest.mark.parametrize("saved_at", [10, 22])  # group 1's ramp; groups 1 and 2 unfrozen
def test_save_and_load_in_the_middle_of_a_ramp_resume_bit_for_bit(tmp_path, saved_at):
    """The position in the plan and each group's own step count survive: resuming in a fresh
    Trainer (the plan attached again, or rebuilt from the checkpoint) equals a straight run."""
    case = CASES["adam_l2"].trainer
    straight_pd = make_params()
    straight = run(Trainer(straight_pd, *case), straight_pd, 30)

    pd = make_params()
    trainer = Trainer(pd, *case)
    run(trainer, pd, saved_at)
    pd.save(tmp_path / "params")
    trainer.save_states(tmp_path / "trainer")

    for with_plan in (True, False):  # without: the plan is rebuilt from the checkpoint
        fresh = make_params(plan=with_plan)
        resumed = Trainer(fresh, *case)
        fresh.load(tmp_path / "params")
        resumed.load_states(tmp_path / "trainer")
        assert resumed.num_update == saved_at
        assert fresh["scale"].plan is not None
        assert step_counts(resumed.opt_state, sorted(NAMES)) == step_counts(
            trainer.opt_state, sorted(NAMES)
        )
        got = run(resumed, fresh, 30 - saved_at)
        for n in NAMES:
            np.testing.assert_array_equal(got[-1][n], straight[-1][n], err_msg=f"{with_plan} {n}")

    other = make_params(plan=False)
    presets.gradual_unfreezing(other, GROUPS, at=[0, 8, 19], warmup=WARMUP)
    refused = Trainer(other, *case)
    before = snapshot(other)
    with pytest.raises(ValueError, match="saved following another gradual-unfreezing plan"):
        refused.load_states(tmp_path / "trainer")
    assert snapshot(other) == before and refused.num_update == 0


def test_a_lr_mult_set_during_a_ramp_becomes_its_target():
    pd = make_params()
    trainer = Trainer(pd, "sgd", {"learning_rate": 0.01})
    run(trainer, pd, 9)  # enc on ramp step 3 of 6 next
    pd["enc/kernel"].lr_mult = 2.0
    run(trainer, pd, 1)  # step 9 took 3/6 of the new value
    assert pd["enc/kernel"].lr_mult == pytest.approx(2.0 * 3 / 6)
    run(trainer, pd, 3)
    assert pd["enc/kernel"].lr_mult == 2.0 and pd["enc/kernel"].origin("lr_mult") == "param"


def test_a_group_ramps_to_the_override_that_applies_to_it_then_gives_it_back(recwarn):
    """An unset lr_mult ramps to the Trainer's override (link 2/3 of the chain), without a
    warning about the override being shadowed meanwhile, and is unset again after the ramp."""
    pd = make_params()
    del pd["scale"].lr_mult
    trainer = Trainer(pd, "sgd", {"learning_rate": 0.01})
    trainer.set_lr_mult({"scale": 4.0})
    run(trainer, pd, 20)  # scale unfroze at 19: ramp step 2 of 6 next
    row = {r.name: r for r in trainer.explain()}["scale"]
    assert row.lr_mult == pytest.approx(4.0 * 2 / 6)
    run(trainer, pd, 5)
    row = {r.name: r for r in trainer.explain()}["scale"]
    assert (row.lr_mult, row.lr_source) == (4.0, "name")
    assert not pd["scale"].is_set("lr_mult")
    assert not [w for w in recwarn if "no longer acts" in str(w.message)]
