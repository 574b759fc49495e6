"""Checkpoints: bit-identical resume in a fresh process, refusals, interrupted saves."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import step_counts

import lrmult
from lrmult import ParamDict, Trainer

SETUP = textwrap.dedent(
    """
    import sys
    import jax, jax.numpy as jnp, numpy as np, optax
    from lrmult import ParamDict, Trainer

    def build():
        k = jax.random.split(jax.random.PRNGKey(0), 3)
        pd = ParamDict.from_pytree({
            "l1": {"W": jax.random.normal(k[0], (3, 8)), "b": jnp.zeros(8)},
            "l2": {"W": jax.random.normal(k[1], (8, 1)), "b": jnp.zeros(1)},
            "emb": jax.random.normal(k[2], (4, 3)),
        })
        pd["l1/W"].lr_mult = 0.3
        pd.select(".*b$").setattr("wd_mult", 0.0)
        pd["emb"].frozen = True
        schedule = optax.cosine_decay_schedule(0.05, 20)
        trainer = Trainer(pd, "adamw", {"learning_rate": schedule, "wd": 0.01,
                                        "clip_global_norm": 1.0})
        trainer.set_lr_mult({"l2/W": 2.0})
        return pd, trainer

    def loss_fn(p, x, y):
        h = jnp.tanh((x @ p["emb"]) @ p["l1"]["W"] + p["l1"]["b"])
        return jnp.mean((h @ p["l2"]["W"] + p["l2"]["b"] - y) ** 2)

    x = jnp.linspace(-1, 1, 20).reshape(5, 4)
    y = jnp.sin(x[:, :1])
    """
)


def run(script, *args, check=True):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    return subprocess.run(
        [sys.executable, "-c", SETUP + textwrap.dedent(script), *map(str, args)],
        check=check,
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )


def test_save_five_steps_then_load_in_a_fresh_process_equals_ten_straight_steps(tmp_path):
    run(
        """
        pd, trainer = build()
        for _ in range(10):
            trainer.train_step(loss_fn, x, y)
        np.savez(sys.argv[1], **{k: np.asarray(v) for k, v in pd.arrays().items()})
        """,
        tmp_path / "straight.npz",
    )
    run(
        """
        pd, trainer = build()
        for _ in range(5):
            trainer.train_step(loss_fn, x, y)
        pd.save(sys.argv[1] + "/params")
        trainer.save_states(sys.argv[1] + "/trainer")
        """,
        tmp_path,
    )
    run(
        """
        pd, trainer = build()
        pd["l1/W"].lr_mult = 5.0          # overwritten by the checkpoint
        trainer.set_lr_mult({}, replace=True)
        pd.load(sys.argv[1] + "/params")
        trainer.load_states(sys.argv[1] + "/trainer")
        assert pd["l1/W"].lr_mult == 0.3
        assert {r.name: r.lr_source for r in trainer.explain()}["l2/W"] == "name"
        for _ in range(5):
            trainer.train_step(loss_fn, x, y)
        np.savez(sys.argv[2], **{k: np.asarray(v) for k, v in pd.arrays().items()})
        """,
        tmp_path,
        tmp_path / "resumed.npz",
    )
    straight = np.load(tmp_path / "straight.npz")
    resumed = np.load(tmp_path / "resumed.npz")
    assert sorted(straight) == sorted(resumed)
    for name in straight:
        np.testing.assert_array_equal(resumed[name], straight[name], err_msg=name)
    assert not np.array_equal(straight["l1/W"], resumed["emb"][:3, :3])  # a real comparison


def small(**meta):
    pd = ParamDict.from_pytree({"a": jnp.ones(3), "b": jnp.zeros((2, 2))})
    for k, v in meta.items():
        setattr(pd["a"], k, v)
    return pd, Trainer(pd, "adam", {"learning_rate": 0.1})


def test_load_writes_back_set_and_unset_metadata(tmp_path):
    pd, trainer = small(lr_mult=0.5)
    pd["b"].frozen = True
    trainer.set_wd_mult({"b": 0.0})
    trainer.step({"a": jnp.ones(3)})
    trainer.save_states(tmp_path / "ck")
    pd2, trainer2 = small(wd_mult=3.0)
    trainer2.load_states(tmp_path / "ck")
    assert pd2["a"].is_set("lr_mult") and pd2["a"].lr_mult == 0.5
    assert not pd2["a"].is_set("wd_mult")
    assert pd2["b"].frozen and pd2["b"].is_set("frozen")
    assert {r.name: r.wd_source for r in trainer2.explain()}["b"] == "name"


def test_a_multiplier_set_after_the_last_step_applies_after_load(tmp_path):
    """The saved state's multipliers predate the change; the restored Parameters win."""
    pd, trainer = small()
    grads = {"a": jnp.ones(3), "b": jnp.ones((2, 2))}
    trainer.step(grads)
    pd["a"].lr_mult = 0.5  # not yet in the state when saved
    trainer.save_states(tmp_path / "ck")
    pd.save(tmp_path / "values")
    pd2, trainer2 = small()
    pd2.load(tmp_path / "values")
    trainer2.load_states(tmp_path / "ck")
    trainer.step(grads)
    trainer2.step(grads)
    np.testing.assert_array_equal(pd2["a"].data(), pd["a"].data())


@pytest.mark.parametrize(
    "tree, match",
    [
        ({"a": jnp.ones(3), "c": jnp.zeros((2, 2))}, "parameter 1 is 'c' here and 'b'"),
        ({"a": jnp.ones(4), "b": jnp.zeros((2, 2))}, r"'a' has shape \(4,\) here and \(3,\)"),
        ({"a": jnp.ones(3), "b": jnp.zeros((2, 2), jnp.bfloat16)}, "'b' has dtype bfloat16"),
        ({"a": jnp.ones(3)}, "'b' is in the checkpoint only"),
    ],
)
def test_mismatched_checkpoint_is_refused_before_anything_changes(tmp_path, tree, match):
    pd, trainer = small()
    trainer.step({"a": jnp.ones(3), "b": jnp.ones((2, 2))})
    trainer.save_states(tmp_path / "ck")
    pd.save(tmp_path / "values")
    other = ParamDict.from_pytree(tree)
    other["a"].lr_mult = 7.0
    twin = Trainer(other, "adam", {"learning_rate": 0.1})
    state_before = [np.asarray(v) for v in jax_leaves(twin.opt_state)]
    with pytest.raises(ValueError, match=match):
        twin.load_states(tmp_path / "ck")
    with pytest.raises(ValueError, match=match):
        other.load(tmp_path / "values")
    assert other["a"].lr_mult == 7.0
    for a, b in zip(state_before, jax_leaves(twin.opt_state), strict=True):
        np.testing.assert_array_equal(a, b)


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def test_other_optimizer_is_refused(tmp_path):
    pd, trainer = small()
    trainer.save_states(tmp_path / "ck")
    with pytest.raises(ValueError, match="optimizer adam"):
        Trainer(pd, "sgd", {"learning_rate": 0.1}).load_states(tmp_path / "ck")


def test_missing_path_is_file_not_found(tmp_path):
    pd, trainer = small()
    with pytest.raises(FileNotFoundError):
        trainer.load_states(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError):
        pd.load(tmp_path / "nowhere")


def test_frozen_set_changed_after_load_keeps_state_and_starts_fresh_leaves(tmp_path):
    pd, trainer = small()
    pd["b"].frozen = True
    for _ in range(3):
        trainer.step({"a": jnp.ones(3)})
    trainer.save_states(tmp_path / "ck")
    pd2, trainer2 = small()  # b trainable here: the checkpoint's frozen flag wins on load
    trainer2.load_states(tmp_path / "ck")
    assert pd2["b"].frozen
    pd2["b"].frozen = False
    trainer2.step({"a": jnp.ones(3), "b": jnp.ones((2, 2))})
    assert step_counts(trainer2.opt_state, ["a", "b"]) == {"a": 4, "b": 1}


def test_a_save_killed_part_way_leaves_the_previous_checkpoint_loadable(tmp_path):
    pd, trainer = small(lr_mult=0.25)
    trainer.step({"a": jnp.ones(3), "b": jnp.ones((2, 2))})
    trainer.save_states(tmp_path / "ck")
    script = """
        import orbax.checkpoint._src.path.async_path as async_path
        async def stuck_rename(*args, **kwargs):
            print("renaming", flush=True)
            time.sleep(60)
        async_path.rename = stuck_rename
        import time
        pd = ParamDict.from_pytree({"a": jnp.ones(3), "b": jnp.zeros((2, 2))})
        trainer = Trainer(pd, "adam", {"learning_rate": 0.1})
        print("saving", flush=True)
        trainer.save_states(sys.argv[1])
        """
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    child = subprocess.Popen(
        [sys.executable, "-c", SETUP + "import time\n" + textwrap.dedent(script), tmp_path / "ck"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.time() + 120
    seen = []
    while time.time() < deadline:
        line = child.stdout.readline()
        seen.append(line)
        if "renaming" in line or not line:
            break
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert any("renaming" in s for s in seen)  # killed after writing, before the commit
    pd2, trainer2 = small()
    trainer2.load_states(tmp_path / "ck")
    assert pd2["a"].lr_mult == 0.25


def test_load_restores_what_a_preset_set_and_names_it(tmp_path):
    import lrmult

    pd = ParamDict.from_pytree({"layers": [{"w": jnp.ones(2)}, {"w": jnp.ones(2)}]})
    lrmult.presets.layerwise_lr_decay(pd, 0.5)
    trainer = Trainer(pd, "sgd", {"learning_rate": 0.1})
    trainer.save_states(tmp_path / "ck")
    pd2 = ParamDict.from_pytree({"layers": [{"w": jnp.ones(2)}, {"w": jnp.ones(2)}]})
    trainer2 = Trainer(pd2, "sgd", {"learning_rate": 0.1})
    trainer2.load_states(tmp_path / "ck")
    rows = {r.name: r for r in trainer2.explain()}
    assert rows["layers/0/w"].lr_source == "preset:layerwise_lr_decay"
    assert (rows["layers/0/w"].lr_mult, rows["layers/1/w"].lr_mult) == (0.25, 0.5)  # 0.5**(3-id)


# -- strict=False: checkpoints across model changes ----------------------------------------------


def _adam_ref(p, g, state, lr=0.01, b1=0.9, b2=0.999, eps=1e-8):
    """PyTorch's Adam for one parameter, float64 NumPy (state created at its first step)."""
    t = state["t"] = state.get("t", 0) + 1
    m = state["m"] = b1 * state.get("m", 0.0) + (1 - b1) * g
    v = state["v"] = b2 * state.get("v", 0.0) + (1 - b2) * g * g
    return p - lr / (1 - b1**t) * m / (np.sqrt(v) / np.sqrt(1 - b2**t) + eps)


def _model(head_shape):
    rng = np.random.default_rng(1)
    return {
        "backbone": {"w": jnp.asarray(rng.normal(size=(3, 3)), jnp.float32)},
        "head": {"w": jnp.asarray(rng.normal(size=head_shape), jnp.float32)},
    }


def _quad(tree):
    """sum of squares / 2 plus a cross term: gradients w + 0.1 and head: w."""
    return (
        0.5 * jnp.sum(tree["backbone"]["w"] ** 2)
        + 0.1 * jnp.sum(tree["backbone"]["w"])
        + (0.5 * jnp.sum(tree["head"]["w"] ** 2))
    )


def test_strict_false_restores_by_name_and_starts_a_new_head_fresh(tmp_path):
    pd_a = lrmult.ParamDict.from_pytree(_model((3, 2)))
    trainer_a = lrmult.Trainer(pd_a, "adam", {"learning_rate": 0.01})
    ref_state = {}
    w_ref = np.asarray(pd_a["backbone/w"].data(), np.float64)
    for _ in range(5):
        trainer_a.train_step(_quad)
        w_ref = _adam_ref(w_ref, w_ref + 0.1, ref_state)
    trainer_a.save_states(tmp_path / "t")
    backbone = pd_a["backbone/w"].data()

    tree_b = _model((3, 4))  # a differently shaped head B
    tree_b["backbone"]["w"] = backbone
    pd_b = lrmult.ParamDict.from_pytree(tree_b)
    trainer_b = lrmult.Trainer(pd_b, "adam", {"learning_rate": 0.01})
    with pytest.raises(ValueError, match="does not match"):
        trainer_b.load_states(tmp_path / "t")
    report = trainer_b.load_states(tmp_path / "t", strict=False)
    assert {r.name: r.status for r in report} == {"backbone/w": "restored", "head/w": "reset"}
    assert "saved as (3, 2)" in {r.name: r.reason for r in report}["head/w"]
    head_ref, head_state = np.asarray(tree_b["head"]["w"], np.float64), {}
    for _ in range(5):
        trainer_b.train_step(_quad)
        w_ref = _adam_ref(w_ref, w_ref + 0.1, ref_state)  # moments and count carried over
        head_ref = _adam_ref(head_ref, head_ref, head_state)  # fresh: its own count from 1
    np.testing.assert_allclose(pd_b["backbone/w"].data(), w_ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(pd_b["head/w"].data(), head_ref, rtol=1e-5, atol=1e-6)


def test_strict_false_reports_dropped_and_fresh_and_loads_values_by_name(tmp_path):
    pd_a = lrmult.ParamDict.from_pytree(_model((3, 2)))
    pd_a["head/w"].lr_mult = 0.5
    pd_a.save(tmp_path / "p")
    pd_b = lrmult.ParamDict.from_pytree({"backbone": {"w": jnp.zeros((3, 3))}, "new": jnp.ones(2)})
    report = pd_b.load(tmp_path / "p", strict=False)
    statuses = {r.name: r.status for r in report}
    assert statuses == {"backbone/w": "restored", "new": "fresh", "head/w": "dropped"}
    np.testing.assert_array_equal(pd_b["backbone/w"].data(), pd_a["backbone/w"].data())
    np.testing.assert_array_equal(pd_b["new"].data(), np.ones(2))
    assert "<table" in report._repr_html_() and "dropped" in str(report)


def _model_with_neck(head_shape):
    tree = _model(head_shape)
    tree["neck"] = {"w": jnp.asarray(np.random.default_rng(2).normal(size=(2, 2)), jnp.float32)}
    return tree


def _quad_with_neck(tree):
    """`_quad` plus the neck's: its gradient is w - 0.2."""
    return _quad(tree) + 0.5 * jnp.sum(tree["neck"]["w"] ** 2) - 0.2 * jnp.sum(tree["neck"]["w"])


def test_strict_false_a_layer_frozen_at_save_and_unfrozen_at_load_starts_fresh(tmp_path):
    """The neck, frozen when saved, has no optimizer state in the checkpoint; unfrozen after the
    load, it starts with its own step count (Adam's bias correction from 1), while the backbone
    carries its moments and count and the reshaped head starts fresh too."""
    pd_a = lrmult.ParamDict.from_pytree(_model_with_neck((3, 2)))
    pd_a["neck/w"].frozen = True
    trainer_a = lrmult.Trainer(pd_a, "adam", {"learning_rate": 0.01})
    ref_state = {}
    w_ref = np.asarray(pd_a["backbone/w"].data(), np.float64)
    for _ in range(5):
        trainer_a.train_step(_quad_with_neck)
        w_ref = _adam_ref(w_ref, w_ref + 0.1, ref_state)
    trainer_a.save_states(tmp_path / "t")

    tree_b = _model_with_neck((3, 4))
    tree_b["backbone"]["w"] = pd_a["backbone/w"].data()
    pd_b = lrmult.ParamDict.from_pytree(tree_b)
    trainer_b = lrmult.Trainer(pd_b, "adam", {"learning_rate": 0.01})
    report = trainer_b.load_states(tmp_path / "t", strict=False)
    assert {r.name: r.status for r in report} == {
        "backbone/w": "restored",
        "head/w": "reset",
        "neck/w": "restored",
    }
    assert pd_b["neck/w"].frozen  # the checkpoint's flag, as for every restored parameter
    pd_b["neck/w"].frozen = False
    head_ref, head_state = np.asarray(tree_b["head"]["w"], np.float64), {}
    neck_ref, neck_state = np.asarray(tree_b["neck"]["w"], np.float64), {}
    shared, shared_state = neck_ref, {"t": 5}  # what the backbone's count would give it
    for _ in range(5):
        trainer_b.train_step(_quad_with_neck)
        w_ref = _adam_ref(w_ref, w_ref + 0.1, ref_state)  # moments and count carried over
        head_ref = _adam_ref(head_ref, head_ref, head_state)  # fresh: its own count from 1
        neck_ref = _adam_ref(neck_ref, neck_ref - 0.2, neck_state)  # fresh too
        shared = _adam_ref(shared, shared - 0.2, shared_state)
    assert np.max(np.abs(shared - neck_ref)) > 1e-3  # the check below tells them apart
    names = ["backbone/w", "head/w", "neck/w"]
    assert step_counts(trainer_b.opt_state, names) == {"backbone/w": 10, "head/w": 5, "neck/w": 5}
    np.testing.assert_allclose(pd_b["backbone/w"].data(), w_ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(pd_b["head/w"].data(), head_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pd_b["neck/w"].data(), neck_ref, rtol=1e-5, atol=1e-6)


def test_resume_keeps_the_step_count_of_a_layer_unfrozen_before_the_save(tmp_path):
    """A layer unfrozen at step 3 has a step count of its own (3 at the save, the others 5): a
    fresh Trainer loading the checkpoint continues it, moments and count, instead of handing it
    the others' count and zero moments."""
    tree = _model_with_neck((3, 2))
    pd = lrmult.ParamDict.from_pytree(tree)
    pd["neck/w"].frozen = True
    trainer = lrmult.Trainer(pd, "adam", {"learning_rate": 0.01})
    for step in range(5):
        if step == 2:
            pd["neck/w"].frozen = False
        trainer.train_step(_quad_with_neck)
    trainer.save_states(tmp_path / "t")

    pd2 = lrmult.ParamDict.from_pytree(pd.tree())
    trainer2 = lrmult.Trainer(pd2, "adam", {"learning_rate": 0.01})
    trainer2.load_states(tmp_path / "t")
    for _ in range(3):
        trainer2.train_step(_quad_with_neck)
    names = ["backbone/w", "head/w", "neck/w"]
    assert step_counts(trainer2.opt_state, names) == {"backbone/w": 8, "head/w": 8, "neck/w": 6}
    neck, state = np.asarray(tree["neck"]["w"], np.float64), {}
    w, w_state = np.asarray(tree["backbone"]["w"], np.float64), {}
    for step in range(8):
        w = _adam_ref(w, w + 0.1, w_state)
        if step >= 2:
            neck = _adam_ref(neck, neck - 0.2, state)
    np.testing.assert_allclose(pd2["backbone/w"].data(), w, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(pd2["neck/w"].data(), neck, rtol=1e-5, atol=1e-6)


def test_resume_keeps_the_groups_of_a_stack_whose_bottom_layers_were_unfrozen(tmp_path):
    """Layers 0-1 of a stack unfrozen at step 3 train as a group with its own step count; a fresh
    Trainer loading the checkpoint regroups them as saved and continues bit for bit."""

    def loss(t):
        return jnp.sum((t["layers"]["w"] - 0.3) ** 2) + jnp.sum(t["b"] ** 2)

    def build(tree):
        pd = ParamDict.from_pytree(tree, stacked={"layers": 1})
        return pd, Trainer(pd, "adam", {"learning_rate": 0.05})

    pd, trainer = build({"layers": {"w": jnp.arange(8.0).reshape(4, 2) / 8}, "b": jnp.ones(2)})
    pd.select("layers/[0-1]/").setattr("frozen", True)
    for step in range(5):
        if step == 2:
            pd.select("layers/[0-1]/").setattr("frozen", False)
        trainer.train_step(loss)
    trainer.save_states(tmp_path / "t")
    pd2, trainer2 = build(pd.tree())
    trainer2.load_states(tmp_path / "t")
    for _ in range(3):
        trainer.train_step(loss)
        trainer2.train_step(loss)
    np.testing.assert_array_equal(pd2["layers/w"].data(), pd["layers/w"].data())
    np.testing.assert_array_equal(pd2["b"].data(), pd["b"].data())
