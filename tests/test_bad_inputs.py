"""SPEC §8 as a matrix: every bad input raises a specific, helpful error and changes nothing.

Each case of `CASES` is one bad call against a fresh *world* (a ParamDict with metadata set at
every link of the lookup chain, a Trainer on it that has taken a step, and an optax-level ready
chain with its own state), together with the exception type it must raise, a regex the message
must match naming the culprit (parameter, key or argument) and, where a fix exists, a regex for
the suggested fix. The test then checks that

1. the world is exactly as it was before the call (values, metadata and whether each attribute
   is set, names, override dicts via `explain()`, learning rate, both optimizer states), and
2. the next valid step (`Trainer.step`, plus `train_step` for the cases that exercise it, plus
   an optax-level update) gives, bit for bit, what a twin world that never saw the bad call gives.
   The twin is stepped in lockstep with the world from case to case (building a world compiles
   its Trainer's step); the pair is rebuilt after any case that left the world changed.

Cases lrmult does not handle properly yet are kept, marked `xfail(strict=True, raises=...)` with
the reason: `raises=Failed` when the input is silently accepted, `raises=AssertionError` when the
message does not name the culprit, `raises=<type>` when the wrong exception type escapes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lrmult
from lrmult import ParamDict, Parameter, Trainer

NAN, INF = float("nan"), float("inf")
SILENT = pytest.fail.Exception  # what pytest.raises raises when nothing was raised

SHAPES = {
    "emb": (2, 2),
    "enc/W": (3, 4),
    "enc/b": (4,),
    "head/W": (4, 2),
    "head/b": (2,),
    "scale": (),
}
NAMES = list(SHAPES)  # JAX's flatten order: the indices 0..5 of the lookup chain
_rng = np.random.default_rng(7)
INIT = {n: _rng.normal(size=s).astype(np.float32) for n, s in SHAPES.items()}
GRADS = {n: _rng.normal(size=s).astype(np.float32) for n, s in SHAPES.items()}
GRADS2 = {n: _rng.normal(size=s).astype(np.float32) for n, s in SHAPES.items()}
X = _rng.normal(size=(5, 3)).astype(np.float32)


def nested(flat: dict[str, Any]) -> dict[str, Any]:
    return {
        "emb": flat["emb"],
        "enc": {"W": flat["enc/W"], "b": flat["enc/b"]},
        "head": {"W": flat["head/W"], "b": flat["head/b"]},
        "scale": flat["scale"],
    }


def init_tree() -> dict[str, Any]:
    return nested({n: jnp.asarray(v) for n, v in INIT.items()})


def grads(source=GRADS, **changes) -> dict[str, Any]:
    """A `{name: grad}` dict for the trainable leaves, with some entries replaced or removed."""
    out = {n: jnp.asarray(v) for n, v in source.items() if n != "emb"}
    for name, value in changes.items():
        name = name.replace("__", "/")
        if value is None:
            del out[name]
        else:
            out[name] = value
    return out


def loss_fn(p, x):
    h = jnp.tanh(x @ p["enc"]["W"] + p["enc"]["b"])
    out = (h @ p["head"]["W"] + p["head"]["b"]) * p["scale"]
    return jnp.mean((out - x[:, :2] @ p["emb"]) ** 2)


class World:
    """Everything a bad call may touch."""

    def __init__(self, tmp) -> None:
        self.tmp = tmp
        pd = ParamDict.from_pytree(init_tree())
        assert list(pd) == NAMES
        pd["emb"].frozen = True  # link 1, frozen
        pd["enc/W"].lr_mult = 0.5  # link 1
        pd.select(".*/b$").setattr("wd_mult", 0.0)  # link 1 on enc/b and head/b
        pd["enc/W"].decay_to_init = True  # w0 kept in both optimizer states
        self.pd = pd
        self.trainer = Trainer(
            pd,
            "adamw",
            {"learning_rate": 0.01, "wd": 0.1, "clip_global_norm": 1.0},
            check_finite=True,
        )
        self.trainer.set_lr_mult({"head/W": 2.0})  # link 3
        self.trainer.set_wd_mult({5: 0.5})  # link 2: 'scale'
        self.trainer.step(grads())
        # the optax level: a ready chain reading the same Parameters, with its own params
        self.tx = lrmult.adam(0.01, weight_decay=0.1, param_dict=pd, lr_mult={"scale": 3.0})
        self.oparams = init_tree()
        self.ostate = self.tx.init(self.oparams)
        self.optax_step(GRADS)

    def optax_step(self, source) -> None:
        g = nested({n: jnp.asarray(v) for n, v in source.items()})
        updates, self.ostate = self.tx.update(g, self.ostate, self.oparams)
        self.oparams = optax.apply_updates(self.oparams, updates)

    def next_valid_step(self, train: bool) -> None:
        self.trainer.step(grads(GRADS2), batch_size=2)
        if train:
            self.trainer.train_step(loss_fn, X)
        self.optax_step(GRADS2)


def _bits(x) -> tuple:
    a = np.asarray(x)
    return (a.dtype.str, a.shape, a.tobytes())


def _flat(tree) -> list[tuple[str, tuple]]:
    return [
        (jax.tree_util.keystr(path), _bits(leaf))
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


def snapshot(w: World) -> dict[str, Any]:
    return {
        "names": (tuple(w.pd), tuple(w.trainer.params)),
        "values": {n: _bits(p.data()) for n, p in w.pd.items()},
        "metadata": {
            n: tuple(
                (a, p.is_set(a), getattr(p, a))
                for a in ("lr_mult", "wd_mult", "frozen", "decay_to_init")
            )
            for n, p in w.pd.items()
        },
        "explain": tuple(w.trainer.explain()),
        "learning_rate": w.trainer.learning_rate,
        "opt_state": _flat(w.trainer.opt_state),
        "optax_state": _flat(w.ostate),
        "optax_params": _flat(w.oparams),
    }


def assert_same(got: dict[str, Any], want: dict[str, Any]) -> None:
    for key in want:
        assert got[key] == want[key], f"{key} differs"


# -- the bad calls --------------------------------------------------------------------------------


class Bad(NamedTuple):
    call: Callable[[World], Any]
    exc: type[BaseException] | tuple[type[BaseException], ...]
    culprit: str  # regex the message must match: names the parameter / key / argument
    fix: str | None = None  # regex for the suggested fix, where one exists
    train: bool = False  # the next valid step includes a train_step


def case(id_, call, exc, culprit, fix=None, *, train=False, defect=None, raises=None):
    marks = ()
    if defect is not None:
        marks = pytest.mark.xfail(strict=True, raises=raises, reason=defect)
    return pytest.param(Bad(call, exc, culprit, fix, train), id=id_, marks=marks)


def assign(obj, attr, value):
    setattr(obj, attr, value)


def foreign(tree=None, optimizer="adamw", opts=None):
    """A Trainer over other Parameters (for checkpoints that do not match the world)."""
    pd = ParamDict.from_pytree(tree if tree is not None else init_tree())
    pd["emb"].frozen = True
    opts = opts or {"learning_rate": 0.01, "wd": 0.1, "clip_global_norm": 1.0}
    return pd, Trainer(pd, optimizer, opts)


def save_foreign(w, tree=None, optimizer="adamw", opts=None, *, values=False):
    pd, trainer = foreign(tree, optimizer, opts)
    path = w.tmp / "foreign"
    if values:
        pd.save(path)
    else:
        trainer.save_states(path)
    return path


def tree_without_scale():
    t = init_tree()
    del t["scale"]
    return t


def tree_with(name, value):
    flat = {n: jnp.asarray(v) for n, v in INIT.items()}
    flat[name] = value
    return nested(flat)


def tree_renamed():
    t = init_tree()
    t["enc"]["V"] = t["enc"].pop("W")
    return t


def grads_tree(source=GRADS, **changes):
    """Gradients shaped like `params.tree()` (the frozen 'emb' included), `top__leaf=` replaced,
    or removed when None."""
    t = nested({n: jnp.asarray(v) for n, v in source.items()})
    for name, value in changes.items():
        top, leaf = name.split("__")
        if value is None:
            del t[top][leaf]
        else:
            t[top][leaf] = value
    return t


def save_onto_a_file(w):
    (w.tmp / "file").write_text("not a directory")
    w.trainer.save_states(w.tmp / "file")


def vector_loss(p, x):
    return jnp.mean(x @ p["enc"]["W"], axis=0)


def scalar_only_loss(p, x):
    return loss_fn(p, x)


def int_loss(p, x):
    return jnp.sum(p["enc"]["W"] > 0).astype(jnp.int32)


def nan_grad_loss(p, x):
    return loss_fn(p, x) + jnp.sum(jnp.sqrt(p["enc"]["b"] - 100.0))


def scheduled(w):
    return Trainer(w.pd, "sgd", {"learning_rate": optax.constant_schedule(0.1)})


CASES = [
    # -- Parameter ------------------------------------------------------------------------------
    case("P01-value-str", lambda w: Parameter("abc", name="w"), TypeError, r"'w'", r"jax\.Array"),
    case("P02-name-int", lambda w: Parameter(jnp.ones(2), name=3), TypeError, r"name", r"str"),
    case(
        "P03-lr_mult-nan",
        lambda w: assign(w.pd["enc/b"], "lr_mult", NAN),
        ValueError,
        r"'enc/b'.*lr_mult",
        r"finite number >= 0",
    ),
    case(
        "P04-lr_mult-inf",
        lambda w: assign(w.pd["head/W"], "lr_mult", INF),
        ValueError,
        r"'head/W'.*lr_mult",
        r"finite number >= 0",
    ),
    case(
        "P05-wd_mult-negative",
        lambda w: assign(w.pd["enc/W"], "wd_mult", -0.1),
        ValueError,
        r"'enc/W'.*wd_mult",
        r">= 0",
    ),
    case(
        "P06-lr_mult-str",
        lambda w: assign(w.pd["enc/W"], "lr_mult", "0.1"),
        ValueError,
        r"'enc/W'.*lr_mult.*str",
        r"finite number",
    ),
    case(
        "P07-lr_mult-bool",
        lambda w: assign(w.pd["enc/W"], "lr_mult", True),
        ValueError,
        r"'enc/W'.*lr_mult.*bool",
    ),
    case(
        "P08-lr_mult-vector",
        lambda w: assign(w.pd["head/b"], "lr_mult", np.array([1.0, 2.0])),
        ValueError,
        r"'head/b'.*lr_mult",
    ),
    case(
        "P09-lr_mult-0d-nan-array",
        lambda w: assign(w.pd["head/b"], "lr_mult", jnp.array(NAN)),
        ValueError,
        r"'head/b'.*lr_mult",
    ),
    case(
        "P10-lr_mult-huge-int",
        lambda w: assign(w.pd["enc/b"], "lr_mult", 10**400),
        ValueError,
        r"'enc/b'.*lr_mult",
    ),
    case(
        "P11-lr_mult-overflows-float32",
        lambda w: assign(w.pd["enc/b"], "lr_mult", 1e39),
        ValueError,
        r"'enc/b'.*lr_mult",
    ),
    case(
        "P12-wd_mult-overflows-float32",
        lambda w: assign(w.pd["head/W"], "wd_mult", 3.5e38),
        ValueError,
        r"'head/W'.*wd_mult",
    ),
    case(
        "P13-ctor-lr_mult-negative",
        lambda w: Parameter(jnp.ones(2), name="w", lr_mult=-1.0),
        ValueError,
        r"'w'.*lr_mult",
    ),
    case(
        "P14-frozen-str",
        lambda w: assign(w.pd["enc/W"], "frozen", "yes"),
        ValueError,
        r"'enc/W'.*frozen",
        r"grad_req='null'",
    ),
    case(
        "P15-grad_req-add",
        lambda w: assign(w.pd["enc/W"], "grad_req", "add"),
        ValueError,
        r"'enc/W'.*grad_req.*'add'",
        r"'write' or 'null'",
    ),
    case(
        "P16-grad_req-typo",
        lambda w: assign(w.pd["enc/W"], "grad_req", "nul"),
        ValueError,
        r"'enc/W'.*'nul'",
        r"'write' or 'null'",
    ),
    case(
        "P17-unknown-attribute-assigned",
        lambda w: assign(w.pd["enc/W"], "lr_mul", 0.1),
        AttributeError,
        r"'lr_mul'",
    ),
    case(
        "P18-is_set-unknown-attribute",
        lambda w: w.pd["enc/W"].is_set("lr_mul"),
        AttributeError,
        r"'enc/W'.*'lr_mul'",
        r"did you mean 'lr_mult'",
    ),
    case(
        "P19-set_data-shape",
        lambda w: w.pd["enc/W"].set_data(jnp.ones((4, 3))),
        ValueError,
        r"'enc/W'.*\(3, 4\).*\(4, 3\)",
    ),
    case(
        "P20-set_data-dtype",
        lambda w: w.pd["enc/W"].set_data(jnp.ones((3, 4), jnp.bfloat16)),
        ValueError,
        r"'enc/W'.*bfloat16",
        r"astype\('float32'\)",
    ),
    case(
        "P21-set_data-list",
        lambda w: w.pd["enc/b"].set_data([1.0, 2.0, 3.0, 4.0]),
        TypeError,
        r"'enc/b'.*list",
        r"jax\.Array",
    ),
    case(
        "P22-set_data-scalar-for-vector",
        lambda w: w.pd["enc/b"].set_data(0.0),
        ValueError,
        r"'enc/b'.*\(4,\)",
    ),
    case(
        "P23-decay_to_init-int",
        lambda w: assign(w.pd["head/W"], "decay_to_init", 1),
        ValueError,
        r"'head/W'.*decay_to_init",
        r"True or False",
    ),
    case(
        "P24-decay_to_init-per-layer-array",
        lambda w: assign(w.pd["head/W"], "decay_to_init", np.array([True, False, True, False])),
        ValueError,
        r"'head/W'.*decay_to_init",
        r"whole parameter",
    ),
    # -- ParamDict ------------------------------------------------------------------------------
    case("D01-select-empty", lambda w: w.pd.select(""), ValueError, r"empty", r"'\.\*'"),
    case(
        "D02-select-invalid-regex",
        lambda w: w.pd.select("enc/(W"),
        ValueError,
        r"'enc/\(W'.*not a valid regular expression",
    ),
    case(
        "D03-select-matches-nothing",
        lambda w: w.pd.select("W$"),
        ValueError,
        r"'W\$' matches no parameter",
        r"try '\.\*W\$'",
    ),
    case("D04-select-not-a-str", lambda w: w.pd.select(3), TypeError, r"pattern.*int", r"str"),
    case(
        "D05-setattr-unknown-attribute",
        lambda w: w.pd.setattr("lr_mul", 0.1),
        AttributeError,
        r"'lr_mul'",
        r"did you mean 'lr_mult'",
    ),
    case(
        "D06-setattr-nan",
        lambda w: w.pd.select("head").setattr("wd_mult", NAN),
        ValueError,
        r"wd_mult.*nan",
        r"finite number >= 0",
    ),
    case(
        "D07-setattr-frozen-int",
        lambda w: w.pd.setattr("frozen", 1),
        ValueError,
        r"frozen",
        r"True or False",
    ),
    case(
        "D08-setattr-grad_req-none",
        lambda w: w.pd.setattr("grad_req", None),
        ValueError,
        r"grad_req.*None",
        r"'write' or 'null'",
    ),
    case(
        "D09-update-conflict-is-atomic",
        lambda w: w.pd.update(
            {
                "new": Parameter(jnp.ones(2), name="new"),
                "enc/W": Parameter(jnp.ones((3, 4)), name="enc/W"),
            }
        ),
        ValueError,
        r"'enc/W'",
        r"prefix=",
    ),
    case(
        "D10-update-not-a-mapping",
        lambda w: w.pd.update("enc/W"),
        TypeError,
        r"str",
        r"ParamDict or a mapping",
    ),
    case(
        "D11-update-array-not-parameter",
        lambda w: w.pd.update({"x": jnp.ones(2)}),
        TypeError,
        r"'x'",
        r"lrmult\.Parameter",
    ),
    case(
        "D12-update-name-key-mismatch",
        lambda w: w.pd.update({"y": Parameter(jnp.ones(2), name="z")}),
        ValueError,
        r"'z'.*'y'",
    ),
    case(
        "D13-update-name-under-a-parameter",
        lambda w: w.pd.update({"enc/W/extra": Parameter(jnp.ones(2))}),
        ValueError,
        r"'enc/W'",
    ),
    case(
        "D14-from_pytree-str-leaf",
        lambda w: ParamDict.from_pytree({"a": {"b": "text"}}),
        TypeError,
        r"'a/b'.*str",
    ),
    case(
        "D15-from_pytree-empty",
        lambda w: ParamDict.from_pytree({}),
        ValueError,
        r"no array leaves",
    ),
    case(
        "D16-from_pytree-bare-array",
        lambda w: ParamDict.from_pytree(jnp.ones(2)),
        ValueError,
        r"bare array",
        r"prefix=",
    ),
    case(
        "D17-from_pytree-prefix-int",
        lambda w: ParamDict.from_pytree(init_tree(), prefix=3),
        TypeError,
        r"prefix.*int",
    ),
    case(
        "D18-getitem-typo",
        lambda w: w.pd["enc/w"],
        KeyError,
        r"'enc/w'",
        r"did you mean.*'enc/W'",
    ),
    case(
        "D19-index-typo",
        lambda w: w.pd.index("head/bias"),
        KeyError,
        r"'head/bias'",
        r"did you mean 'head/b'",
    ),
    case(
        "D20-setattr-decay_to_init-str",
        lambda w: w.pd.setattr("decay_to_init", "yes"),
        ValueError,
        r"decay_to_init",
        r"True or False",
    ),
    case(
        "D21-preset-decay_to_init-excludes-everything",
        lambda w: lrmult.presets.decay_to_init(w.pd, exclude=".*"),
        ValueError,
        r"exclude '\.\*'",
        r"'head/'",
    ),
    # -- the lookup chain: Trainer override dicts ------------------------------------------------
    case(
        "L01-lr-override-unknown-name",
        lambda w: w.trainer.set_lr_mult({"enc/w": 0.1}),
        KeyError,
        r"'enc/w' names no parameter",
        r"did you mean.*'enc/W'",
    ),
    case(
        "L02-wd-override-unknown-name",
        lambda w: w.trainer.set_wd_mult({"heads/W": 0.1}),
        KeyError,
        r"'heads/W'",
        r"did you mean 'head/W'",
    ),
    case(
        "L03-override-index-out-of-range",
        lambda w: w.trainer.set_lr_mult({6: 0.1}),
        KeyError,
        r"index 6",
        r"0\.\.5",
    ),
    case(
        "L04-override-negative-index",
        lambda w: w.trainer.set_lr_mult({-1: 0.1}),
        KeyError,
        r"index -1",
        r"0\.\.5",
    ),
    case(
        "L05-override-shadowed-by-name",
        lambda w: w.trainer.set_lr_mult({"enc/W": 2.0}),
        ValueError,
        r"'enc/W'.*never act",
        r"del param\.lr_mult",
    ),
    case(
        "L06-override-shadowed-by-index",
        lambda w: w.trainer.set_lr_mult({1: 2.0}),
        ValueError,
        r"'enc/W'.*never act",
        r"del param\.lr_mult",
    ),
    case(
        "L07-wd-override-shadowed",
        lambda w: w.trainer.set_wd_mult({"head/b": 0.3}),
        ValueError,
        r"'head/b'.*never act",
        r"del param\.wd_mult",
    ),
    case(
        "L08-override-inf",
        lambda w: w.trainer.set_lr_mult({"enc/b": INF}),
        ValueError,
        r"'enc/b'.*inf",
        r"finite number >= 0",
    ),
    case(
        "L09-override-negative",
        lambda w: w.trainer.set_wd_mult({"head/W": -1}),
        ValueError,
        r"'head/W'",
        r">= 0",
    ),
    case(
        "L10-override-key-none",
        lambda w: w.trainer.set_lr_mult({None: 1.0}),
        KeyError,
        r"None",
        r"indices or names",
    ),
    case(
        "L11-overrides-not-a-mapping",
        lambda w: w.trainer.set_lr_mult([("enc/b", 1.0)]),
        TypeError,
        r"lr_mult.*list",
        r"mapping",
    ),
    case(
        "L12-replace-not-bool",
        lambda w: w.trainer.set_lr_mult({"enc/b": 0.3}, replace="yes"),
        TypeError,
        r"replace",
        r"True or False",
    ),
    case(
        "L13-override-merge-is-atomic",
        lambda w: w.trainer.set_lr_mult({"enc/b": 0.3, "nope": 0.1}),
        KeyError,
        r"'nope'",
    ),
    case(
        "L14-replace-with-bad-key-keeps-old-dict",
        lambda w: w.trainer.set_wd_mult({"nope": 0.0}, replace=True),
        KeyError,
        r"'nope'",
    ),
    # -- the optax level ------------------------------------------------------------------------
    case(
        "O01-scale_by_lr_mult-unknown-name",
        lambda w: lrmult.scale_by_lr_mult(w.pd, lr_mult={"enc/w": 1.0}).init(w.oparams),
        KeyError,
        r"'enc/w'",
        r"did you mean.*'enc/W'",
    ),
    case(
        "O02-ready-chain-index-out-of-range",
        lambda w: lrmult.sgd(0.1, param_dict=w.pd, lr_mult={9: 1.0}).init(w.oparams),
        KeyError,
        r"index 9",
        r"0\.\.5",
    ),
    case(
        "O03-ready-chain-shadowed-override",
        lambda w: lrmult.adam(0.1, param_dict=w.pd, lr_mult={"enc/W": 3.0}).init(w.oparams),
        ValueError,
        r"'enc/W'.*never act",
        r"del param\.lr_mult",
    ),
    case(
        "O04-weight_decay-negative",
        lambda w: lrmult.add_decayed_weights(-0.1, w.pd),
        ValueError,
        r"weight_decay.*-0\.1",
        r">= 0",
    ),
    case(
        "O05-weight_decay-nan",
        lambda w: lrmult.add_decayed_weights(NAN, w.pd),
        ValueError,
        r"weight_decay.*nan",
    ),
    case(
        "O06-weight_decay-str",
        lambda w: lrmult.add_decayed_weights("0.1", w.pd),
        TypeError,
        r"weight_decay.*str",
    ),
    case(
        "O07-param_dict-not-a-mapping",
        lambda w: lrmult.scale_by_lr_mult("enc"),
        TypeError,
        r"param_dict.*str",
    ),
    case(
        "O08-idx2name-not-a-mapping",
        lambda w: lrmult.scale_by_lr_mult(idx2name=["a", "b"]),
        TypeError,
        r"idx2name.*list",
    ),
    case(
        "O09-idx2name-str-keys",
        lambda w: lrmult.scale_by_lr_mult(idx2name={"0": "a"}),
        TypeError,
        r"idx2name.*'0'",
        r"int -> str",
    ),
    case(
        "O10-wd-ready-chain-override-negative",
        lambda w: lrmult.sgd(0.1, param_dict=w.pd, wd_mult={"enc/b": -1.0}),
        ValueError,
        r"wd_mult.*'enc/b'",
    ),
    case(
        "O11-add_decayed_weights-without-params",
        lambda w: lrmult.add_decayed_weights(0.1, w.pd).update(
            w.oparams, lrmult.add_decayed_weights(0.1, w.pd).init(w.oparams)
        ),
        ValueError,
        r"add_decayed_weights needs params",
        r"update\(grads, state, params\)",
    ),
    case(
        "O12-refresh-not-a-param-dict",
        lambda w: lrmult.refresh(w.ostate, "enc"),
        TypeError,
        r"param_dict.*str",
    ),
    case(
        "O13-explain-without-multipliers",
        lambda w: lrmult.explain(optax.sgd(0.1).init(w.oparams)),
        ValueError,
        r"scale_by_lr_mult",
    ),
    case(
        "O14-ready-chain-tree-names-not-in-param_dict",
        lambda w: lrmult.sgd(0.1, param_dict=w.pd).init({"params": w.oparams}),
        (KeyError, ValueError),
        r"'params/emb'",
    ),
    case(
        "O15-idx2name-off-by-one",
        lambda w: lrmult.sgd(0.1, lr_mult={"a": 2.0}, idx2name={1: "a", 2: "b", 3: "c"}).init(
            [jnp.ones(2)] * 3
        ),
        KeyError,
        r"index 3",
    ),
    case(
        "O16-refresh-with-a-partial-param-dict",
        lambda w: lrmult.refresh(w.ostate, w.pd.select("enc")),
        (KeyError, ValueError),
        r"'emb'|'head/W'|'head/b'|'scale'",
    ),
    case(
        "O17-optax-update-grads-missing-a-leaf",
        lambda w: w.tx.update(grads_tree(GRADS2, head__b=None), w.ostate, w.oparams),
        ValueError,
        r"head/b|'b'",
    ),
    case(
        "O18-optax-update-grad-wrong-shape",
        lambda w: w.tx.update(grads_tree(GRADS2, enc__b=jnp.ones(1)), w.ostate, w.oparams),
        ValueError,
        r"enc/b",
        defect="a (1,) gradient for a (4,) leaf broadcasts silently (as in plain optax)",
        raises=SILENT,
    ),
    case(
        "O19-refresh-params-wrong-shape",
        lambda w: lrmult.refresh(w.ostate, w.pd, params=tree_with("enc/W", jnp.ones((2, 2)))),
        ValueError,
        r"'enc/W'",
        r"shape \(3, 4\)",
    ),
    # -- Trainer construction -------------------------------------------------------------------
    case(
        "T01-unknown-optimizer",
        lambda w: Trainer(w.pd, "adamx"),
        ValueError,
        r"'adamx'",
        r"did you mean 'adam",
    ),
    case(
        "T02-misspelt-learning_rate",
        lambda w: Trainer(w.pd, "sgd", {"learing_rate": 0.1}),
        ValueError,
        r"'learing_rate'",
        r"did you mean 'learning_rate'",
    ),
    case(
        "T03-misspelt-beta1",
        lambda w: Trainer(w.pd, "adam", {"beta_1": 0.9}),
        ValueError,
        r"'beta_1'",
        r"did you mean 'beta1'",
    ),
    case(
        "T04-torch-key-lr",
        lambda w: Trainer(w.pd, "sgd", {"lr": 0.1}),
        ValueError,
        r"'lr'",
        r"accepted:.*learning_rate",
    ),
    case(
        "T05-key-of-another-optimizer",
        lambda w: Trainer(w.pd, "adam", {"momentum": 0.9}),
        ValueError,
        r"'momentum'.*'adam'",
        r"accepted:",
    ),
    case(
        "T06-key-for-custom-transformation",
        lambda w: Trainer(w.pd, optax.sgd(0.1), {"momentum": 0.9}),
        ValueError,
        r"'momentum'",
        r"configure it there",
    ),
    case(
        "T07-learning_rate-nan",
        lambda w: Trainer(w.pd, "sgd", {"learning_rate": NAN}),
        ValueError,
        r"learning rate.*nan",
    ),
    case(
        "T08-learning_rate-str",
        lambda w: Trainer(w.pd, "sgd", {"learning_rate": "0.1"}),
        TypeError,
        r"learning rate.*str",
    ),
    case(
        "T09-learning_rate-callable-wrong-signature",
        lambda w: Trainer(w.pd, "sgd", {"learning_rate": lambda: 0.1}),
        TypeError,
        r"learning_rate|schedule",
    ),
    case(
        "T10-learning_rate-overflows-float32",
        lambda w: Trainer(w.pd, "sgd", {"learning_rate": 1e39}),
        ValueError,
        r"learning rate",
    ),
    case(
        "T11-wd-negative",
        lambda w: Trainer(w.pd, "sgd", {"wd": -0.1}),
        ValueError,
        r"weight_decay|'wd'",
        r">= 0",
    ),
    case(
        "T12-clip_global_norm-negative",
        lambda w: Trainer(w.pd, "sgd", {"clip_global_norm": -1.0}),
        ValueError,
        r"clip_global_norm",
        r"> 0",
    ),
    case(
        "T13-clip_gradient-inf",
        lambda w: Trainer(w.pd, "sgd", {"clip_gradient": INF}),
        ValueError,
        r"clip_gradient",
        r"finite",
    ),
    case(
        "T14-momentum-str",
        lambda w: Trainer(w.pd, "sgd", {"momentum": "0.9"}),
        (TypeError, ValueError),
        r"momentum",
    ),
    case(
        "T15-momentum-negative",
        lambda w: Trainer(w.pd, "sgd", {"momentum": -0.5}),
        ValueError,
        r"momentum",
    ),
    case(
        "T16-beta1-above-one",
        lambda w: Trainer(w.pd, "adam", {"beta1": 1.5}),
        ValueError,
        r"beta1",
    ),
    case(
        "T17-params-not-a-param-dict",
        lambda w: Trainer("enc"),
        TypeError,
        r"params.*str",
    ),
    case("T18-params-empty-list", lambda w: Trainer([]), ValueError, r"params.*empty"),
    case(
        "T19-merge-conflict",
        lambda w: Trainer([w.pd, ParamDict.from_pytree({"W": jnp.ones((3, 4))}, prefix="enc/")]),
        ValueError,
        r"'enc/W'",
        r"prefix=",
    ),
    case(
        "T20-optimizer_params-not-a-dict",
        lambda w: Trainer(w.pd, "sgd", [("learning_rate", 0.1)]),
        TypeError,
        r"optimizer_params.*list",
    ),
    case(
        "T21-optimizer-factory-not-transformation",
        lambda w: Trainer(w.pd, optax.sgd),
        TypeError,
        r"optimizer.*function",
        r"optax\.GradientTransformation",
    ),
    case(
        "T22-check_finite-not-bool",
        lambda w: Trainer(w.pd, check_finite="yes"),
        TypeError,
        r"check_finite",
        r"True or False",
    ),
    case(
        "T23-dict-of-arrays-not-parameters",
        lambda w: Trainer({"x": jnp.ones(2)}),
        TypeError,
        r"'x'",
        r"lrmult\.Parameter",
    ),
    case(
        "T24-integer-parameter-not-frozen",
        lambda w: Trainer(ParamDict.from_pytree({"w": jnp.ones(2), "n": jnp.zeros(2, jnp.int32)})),
        TypeError,
        r"'n'.*int32",
        r"frozen = True",
    ),
    # -- Trainer steps ---------------------------------------------------------------------------
    case(
        "R01-batch_size-negative",
        lambda w: w.trainer.step(grads(), batch_size=-2),
        ValueError,
        r"batch_size.*-2",
        r"> 0",
    ),
    case(
        "R02-batch_size-nan",
        lambda w: w.trainer.step(grads(), batch_size=NAN),
        ValueError,
        r"batch_size.*nan",
    ),
    case(
        "R03-batch_size-none",
        lambda w: w.trainer.step(grads(), batch_size=None),
        TypeError,
        r"batch_size.*NoneType",
    ),
    case(
        "R04-grads-dict-missing-a-leaf",
        lambda w: w.trainer.step(grads(head__b=None)),
        KeyError,
        r"'head/b'",
    ),
    case(
        "R05-grads-tree-missing-a-leaf",
        lambda w: w.trainer.step(grads_tree(head__b=None)),
        (KeyError, ValueError),
        r"head/b",
    ),
    case(
        "R06-grads-dict-misspelt-name",
        lambda w: w.trainer.step(
            {("head/B" if n == "head/b" else n): g for n, g in grads().items()}
        ),
        (KeyError, ValueError),
        r"'head/B'",
        r"did you mean 'head/b'",
    ),
    case(
        "R07-grad-wrong-shape",
        lambda w: w.trainer.step(grads(enc__b=jnp.ones((4, 1)))),
        ValueError,
        r"'enc/b'.*\(4, 1\)",
    ),
    case(
        "R08-grad-wrong-dtype",
        lambda w: w.trainer.step(grads(head__W=jnp.ones((4, 2), jnp.float16))),
        ValueError,
        r"'head/W'.*float16",
        r"astype\('float32'\)",
    ),
    case(
        "R09-grad-python-list",
        lambda w: w.trainer.step(grads(enc__b=[0.0] * 4)),
        TypeError,
        r"'enc/b'.*list",
    ),
    case(
        "R10-grads-a-list",
        lambda w: w.trainer.step(list(grads().values())),
        ValueError,
        r"grads",
        r"params\.tree\(\)",
    ),
    case(
        "R11-nan-gradient",
        lambda w: w.trainer.step(grads(head__W=jnp.full((4, 2), NAN))),
        FloatingPointError,
        r"'head/W'",
    ),
    case(
        "R12-inf-gradients-first-named",
        lambda w: w.trainer.step(grads(scale=jnp.float32(INF), enc__b=jnp.full(4, -INF))),
        FloatingPointError,
        r"'enc/b' \(and 1 more\)",
    ),
    case(
        "R13-loss-not-scalar",
        lambda w: w.trainer.train_step(vector_loss, X),
        TypeError,
        r"vector_loss.*shape \(4,\)",
        r"scalar",
        train=True,
    ),
    case(
        "R14-has_aux-without-aux",
        lambda w: w.trainer.train_step(scalar_only_loss, X, has_aux=True),
        TypeError,
        r"scalar_only_loss",
        r"\(loss, aux\)",
        train=True,
    ),
    case(
        "R15-loss_fn-not-callable",
        lambda w: w.trainer.train_step("loss", X),
        TypeError,
        r"loss_fn.*str",
        train=True,
    ),
    case(
        "R16-loss-integer",
        lambda w: w.trainer.train_step(int_loss, X),
        TypeError,
        r"int_loss",
        train=True,
    ),
    case(
        "R17-train_step-nan-gradient",
        lambda w: w.trainer.train_step(nan_grad_loss, X),
        FloatingPointError,
        r"'enc/b'",
        train=True,
    ),
    case(
        "R18-set_learning_rate-str",
        lambda w: w.trainer.set_learning_rate("0.1"),
        TypeError,
        r"set_learning_rate.*str",
    ),
    case(
        "R19-set_learning_rate-inf",
        lambda w: w.trainer.set_learning_rate(INF),
        ValueError,
        r"set_learning_rate.*inf",
        r"finite",
    ),
    case(
        "R20-set_learning_rate-overflows-float32",
        lambda w: w.trainer.set_learning_rate(1e39),
        ValueError,
        r"set_learning_rate",
    ),
    case(
        "R21-set_learning_rate-under-a-schedule",
        lambda w: scheduled(w).set_learning_rate(0.2),
        ValueError,
        r"schedule",
        r"float learning_rate",
    ),
    case(
        "R22-set_learning_rate-custom-owns-rate",
        lambda w: Trainer(w.pd, optax.sgd(0.1)).set_learning_rate(0.2),
        ValueError,
        r"owns its learning rate",
        r"optimizer_params=\{'learning_rate'",
    ),
    # -- checkpoints ------------------------------------------------------------------------------
    case(
        "C01-load_states-missing",
        lambda w: w.trainer.load_states(w.tmp / "nowhere"),
        FileNotFoundError,
        r"nowhere",
    ),
    case(
        "C02-load-values-missing",
        lambda w: w.pd.load(w.tmp / "nowhere"),
        FileNotFoundError,
        r"nowhere",
    ),
    case(
        "C03-load_states-shape-mismatch",
        lambda w: w.trainer.load_states(save_foreign(w, tree_with("enc/W", jnp.ones((3, 5))))),
        ValueError,
        r"'enc/W' has shape \(3, 4\) here and \(3, 5\)",
    ),
    case(
        "C04-load_states-missing-parameter",
        lambda w: w.trainer.load_states(save_foreign(w, tree_without_scale())),
        ValueError,
        r"'scale' is here only",
    ),
    case(
        "C05-load_states-other-optimizer",
        lambda w: w.trainer.load_states(save_foreign(w, optimizer="adam")),
        ValueError,
        r"optimizer adam\(",
    ),
    case(
        "C06-load_states-other-hyperparameters",
        lambda w: w.trainer.load_states(
            save_foreign(w, opts={"learning_rate": 0.01, "wd": 0.2, "clip_global_norm": 1.0})
        ),
        ValueError,
        r"weight_decay=0\.2",
    ),
    case(
        "C07-load_states-from-values-checkpoint",
        lambda w: w.trainer.load_states(save_foreign(w, values=True)),
        ValueError,
        r"not a lrmult-trainer-1 checkpoint",
    ),
    case(
        "C08-load-values-from-trainer-checkpoint",
        lambda w: w.pd.load(save_foreign(w)),
        ValueError,
        r"not a lrmult-params-1 checkpoint",
    ),
    case(
        "C09-load-values-renamed-parameter",
        lambda w: w.pd.load(save_foreign(w, tree_renamed(), values=True)),
        ValueError,
        r"parameter 1 is 'enc/W' here and 'enc/V'",
    ),
    case(
        "C10-save_states-onto-a-file",
        save_onto_a_file,
        OSError,
        r"file",
    ),
]


class Worlds:
    """A world and its twin, stepped in lockstep; the twin never sees a bad call.

    Building a world compiles its Trainer's step, so the pair is kept from case to case and
    rebuilt only after a case that left the world changed (or failed part-way).
    """

    def __init__(self, tmp_path_factory) -> None:
        self._factory = tmp_path_factory
        self.pair: tuple[World, World] | None = None

    def get(self, tmp) -> tuple[World, World]:
        if self.pair is None:
            self.pair = (World(tmp), World(self._factory.mktemp("twin")))
        self.pair[0].tmp = tmp
        return self.pair


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    return Worlds(tmp_path_factory)


def _message(e: BaseException) -> str:
    # KeyError's str() is the repr of its argument; match what was written.
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


@pytest.mark.parametrize("bad", CASES)
def test_bad_input_is_loud_and_leaves_no_trace(bad: Bad, tmp_path, worlds):
    world, twin = worlds.get(tmp_path)
    worlds.pair = None  # rebuilt for the next case unless this one leaves the pair intact
    before = snapshot(world)
    raised = None
    try:
        bad.call(world)
    except Exception as e:  # its type is checked below, after the state
        raised = e
    after = snapshot(world)
    intact = after == before
    if intact:
        worlds.pair = (world, twin)
    if raised is None:
        pytest.fail(f"DID NOT RAISE {bad.exc}")
    if not isinstance(raised, bad.exc):
        raise raised
    message = _message(raised)
    assert re.search(bad.culprit, message), f"culprit not named: {message!r}"
    if bad.fix is not None:
        assert re.search(bad.fix, message), f"no fix suggested: {message!r}"
    assert_same(after, before)
    worlds.pair = None
    world.next_valid_step(bad.train)
    twin.next_valid_step(bad.train)
    assert_same(snapshot(world), snapshot(twin))
    worlds.pair = (world, twin)


def test_the_matrix_covers_at_least_forty_bad_inputs():
    assert len(CASES) >= 40
    assert len({p.id for p in CASES}) == len(CASES)
