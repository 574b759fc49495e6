"""apply_rules: settings from a config, first-match or all, strict, big_vision's format."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

import lrmult
from lrmult import ParamDict


def params():
    tree = {
        "embed": {"embedding": jnp.ones((5, 2))},
        "layers": {"mlp": {"kernel": jnp.ones((4, 2, 2))}, "ln": {"scale": jnp.ones((4, 2))}},
        "head": {"kernel": jnp.ones((2, 1)), "bias": jnp.ones(1)},
    }
    return ParamDict.from_pytree(tree, stacked={"layers": 1})


RULES = [
    ("layers/[0-1]/", {"lr_mult": 0.1}),
    ("layers/", {"lr_mult": 0.5, "wd_mult": 2.0}),
    (".*bias", {"wd_mult": 0.0}),
    ("embed/", {"frozen": True}),
]


def test_first_match_wins_per_parameter_and_layer():
    pd = params()
    changed = lrmult.apply_rules(pd, RULES)
    np.testing.assert_array_equal(pd["layers/mlp/kernel"].lr_mult, [0.1, 0.1, 0.5, 0.5])
    np.testing.assert_array_equal(pd["layers/ln/scale"].wd_mult, [2.0, 2.0, 2.0, 2.0])
    assert pd["head/bias"].wd_mult == 0.0 and not pd["head/kernel"].is_set("wd_mult")
    assert pd["embed/embedding"].frozen
    assert set(changed) == {"layers/mlp/kernel", "layers/ln/scale", "head/bias", "embed/embedding"}
    rows = {r.name: r for r in lrmult.Trainer(pd, "sgd").explain()}
    assert rows["head/bias"].wd_source == "rule 2 '.*bias'"
    assert rows["embed/embedding"].frozen_source == "rule 3 'embed/'"


def test_mode_all_lets_later_rules_override():
    pd = params()
    lrmult.apply_rules(pd, RULES, mode="all")
    np.testing.assert_array_equal(pd["layers/mlp/kernel"].lr_mult, [0.5, 0.5, 0.5, 0.5])


def test_strict_names_the_rule_that_matches_nothing_and_changes_nothing():
    pd = params()
    with pytest.raises(ValueError, match=r"rule 1 'blocks/'.*matches no parameter"):
        lrmult.apply_rules(pd, [(".*bias", {"wd_mult": 0.0}), ("blocks/", {"lr_mult": 0.1})])
    assert not pd["head/bias"].is_set("wd_mult")
    lrmult.apply_rules(pd, [("blocks/", {"lr_mult": 0.1})], strict=False)
    with pytest.raises(ValueError, match="unknown attribute 'lr_mul'"):
        lrmult.apply_rules(pd, [("head/", {"lr_mul": 0.1})])
    with pytest.raises(ValueError, match="'head/bias'.*lr_mult"):
        lrmult.apply_rules(pd, [("head/", {"wd_mult": 0.0}), ("head/", {"lr_mult": -1.0})])
    assert not pd["head/kernel"].is_set("wd_mult")  # validated before any change


def test_json_dict_and_text_forms_are_the_same_rules(tmp_path):
    as_dict = dict(RULES)
    text = json.dumps(as_dict)
    path = tmp_path / "rules.json"
    path.write_text(text)
    results = []
    for form in (RULES, as_dict, text, path):
        pd = params()
        lrmult.apply_rules(pd, form)
        results.append((pd["layers/mlp/kernel"].lr_mult.tolist(), pd["head/bias"].wd_mult))
    assert results == [([0.1, 0.1, 0.5, 0.5], 0.0)] * 4


def test_big_vision_config_keys_are_read_directly():
    pd = params()
    config = {
        "lr_mults": [("layers/.*", 0.1), ("head/.*", 10.0)],
        "wd_mults": [(".*/bias", 0.0)],
        "schedule": [("embed/.*", None), (".*", "cosine")],
    }
    with pytest.warns(UserWarning, match="not supported yet"):
        lrmult.apply_rules(pd, config)
    np.testing.assert_array_equal(pd["layers/ln/scale"].lr_mult, np.full(4, 0.1))
    assert pd["head/kernel"].lr_mult == 10.0 and pd["head/bias"].wd_mult == 0.0
    assert pd["embed/embedding"].frozen
    # big_vision's patterns fullmatch: 'layers/' alone would match nothing
    with pytest.raises(ValueError, match="matches no parameter"):
        lrmult.apply_rules(params(), {"lr_mults": [("layers/", 0.1)]})


def test_rules_survive_a_checkpoint(tmp_path):
    pd = params()
    lrmult.apply_rules(pd, RULES)
    trainer = lrmult.Trainer(pd, "adam")
    trainer.save_states(tmp_path / "t")
    pd2 = params()
    trainer2 = lrmult.Trainer(pd2, "adam")
    trainer2.load_states(tmp_path / "t")
    rows = {r.name: r for r in trainer2.explain()}
    assert rows["layers/0/mlp/kernel"].lr_mult == pytest.approx(0.1)
    assert rows["head/bias"].wd_source == "rule 2 '.*bias'"
