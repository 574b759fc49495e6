"""The lookup chain of SPEC §2: which link sets each value, and the loud failures."""

import warnings

import jax.numpy as jnp
import pytest

from lrmult import ParamDict, Trainer


def make():
    pd = ParamDict.from_pytree({"a": jnp.ones(2), "b": jnp.ones(3), "c": jnp.ones(4)})
    return pd, Trainer(pd, "sgd", {"learning_rate": 0.5})


def by_name(table):
    return {row.name: row for row in table}


def test_each_link_of_the_chain_in_order():
    pd, tr = make()
    pd["a"].lr_mult = 0.1  # link 1
    tr.set_lr_mult({1: 2.0, "c": 3.0})  # link 2 (index of b), link 3 (name of c)
    rows = by_name(tr.explain())
    assert (rows["a"].lr_mult, rows["a"].lr_source) == (0.1, "param")
    assert (rows["b"].lr_mult, rows["b"].lr_source) == (2.0, "index")
    assert (rows["c"].lr_mult, rows["c"].lr_source) == (3.0, "name")
    assert (rows["a"].wd_mult, rows["a"].wd_source) == (1.0, "default")
    assert rows["b"].lr == pytest.approx(0.5 * 2.0)


def test_index_beats_name_for_the_same_leaf():
    pd, tr = make()
    tr.set_lr_mult({"b": 5.0, 1: 7.0})
    row = by_name(tr.explain())["b"]
    assert (row.lr_mult, row.lr_source) == (7.0, "index")


def test_set_lr_mult_merges():
    pd, tr = make()
    tr.set_lr_mult({"a": 0.0})
    in_force = tr.set_lr_mult({"b": 0.0})
    assert in_force == {"a": 0.0, "b": 0.0}
    rows = by_name(tr.explain())
    assert rows["a"].lr_mult == 0.0 and rows["b"].lr_mult == 0.0


def test_set_lr_mult_replace_is_mxnets_behaviour():
    pd, tr = make()
    tr.set_lr_mult({"a": 0.0})
    tr.set_lr_mult({"b": 0.0}, replace=True)
    rows = by_name(tr.explain())
    assert (rows["a"].lr_mult, rows["a"].lr_source) == (1.0, "default")


def test_unknown_name_is_a_key_error_with_suggestions():
    pd, tr = make()
    tr.set_wd_mult({"a": 0.5})
    with pytest.raises(KeyError, match=r"'bb'.*did you mean 'b'"):
        tr.set_wd_mult({"c": 2.0, "bb": 0.0})
    # nothing of the failed call was merged
    assert by_name(tr.explain())["c"].wd_source == "default"


def test_out_of_range_index_is_a_key_error():
    _, tr = make()
    with pytest.raises(KeyError, match=r"index 3.*0\.\.2"):
        tr.set_lr_mult({3: 1.0})


def test_override_shadowed_by_a_set_parameter_is_a_value_error():
    pd, tr = make()
    pd["a"].lr_mult = 0.1
    with pytest.raises(ValueError, match=r"'a'.*never act.*del param.lr_mult"):
        tr.set_lr_mult({"a": 0.0})
    with pytest.raises(ValueError, match="never act"):
        tr.set_lr_mult({0: 0.0})


def test_override_shadowed_later_warns_once_at_the_next_step():
    pd, tr = make()
    tr.set_lr_mult({"a": 0.0})
    pd["a"].lr_mult = 2.0
    grads = {n: jnp.ones(p.shape) for n, p in pd.items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.step(grads)
        pd["b"].lr_mult = 2.0  # another metadata change triggers a new resolution
        tr.step(grads)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "'a'" in messages[0]
    assert by_name(tr.explain())["a"].lr_source == "param"


def test_unsetting_a_parameter_falls_through_to_the_override_again():
    pd, tr = make()
    tr.set_lr_mult({"a": 4.0})
    pd["a"].lr_mult = 2.0
    del pd["a"].lr_mult
    row = by_name(tr.explain())["a"]
    assert (row.lr_mult, row.lr_source) == (4.0, "name")


@pytest.mark.parametrize("bad", [{"a": -1.0}, {"a": float("nan")}, {"a": "x"}, {2.5: 1.0}, [1]])
def test_bad_override_values_and_keys(bad):
    _, tr = make()
    with pytest.raises((ValueError, KeyError, TypeError)):
        tr.set_lr_mult(bad)


def test_frozen_row_has_zero_effective_rate():
    pd, tr = make()
    pd["c"].grad_req = "null"
    row = by_name(tr.explain())["c"]
    assert (row.frozen, row.frozen_source, row.lr) == (True, "param", 0.0)


def test_explain_renders_text_and_html():
    pd, tr = make()
    text = str(tr.explain())
    assert "lr_source" in text and "default" in text
    assert tr.explain()._repr_html_().startswith("<table")
