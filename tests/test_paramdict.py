import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrmult import ParamDict, Parameter


def make_tree():
    return {
        "encoder": {"layers": [{"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}] * 2},
        "head": {"kernel": jnp.ones((3, 1)), "bias": jnp.zeros(1)},
    }


def test_from_pytree_names_leaves_by_key_path_in_flatten_order():
    pd = ParamDict.from_pytree(make_tree())
    assert list(pd) == [
        "encoder/layers/0/bias",
        "encoder/layers/0/kernel",
        "encoder/layers/1/bias",
        "encoder/layers/1/kernel",
        "head/bias",
        "head/kernel",
    ]
    assert pd.index("head/bias") == 4
    assert pd["encoder/layers/1/kernel"].shape == (2, 3)


def test_tree_rebuilds_the_original_structure():
    tree = make_tree()
    pd = ParamDict.from_pytree(tree)
    pd["head/bias"].set_data(jnp.full(1, 7.0))
    out = pd.tree()
    assert jax.tree.structure(out) == jax.tree.structure(tree)
    assert float(out["head"]["bias"][0]) == 7.0
    assert isinstance(out["encoder"]["layers"], list)


def test_prefix_is_prepended():
    pd = ParamDict.from_pytree({"w": jnp.ones(2)}, prefix="trunk/")
    assert list(pd) == ["trunk/w"] and pd["trunk/w"].name == "trunk/w"


def test_select_shares_parameter_objects_and_setattr_reaches_the_original():
    pd = ParamDict.from_pytree(make_tree())
    biases = pd.select(".*bias")
    assert list(biases) == [n for n in pd if n.endswith("bias")]
    assert biases["head/bias"] is pd["head/bias"]
    biases.setattr("wd_mult", 0.0)
    assert [pd[n].wd_mult for n in pd] == [0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    assert pd["head/bias"].is_set("wd_mult") and not pd["head/kernel"].is_set("wd_mult")


def test_select_uses_re_match_anchored_at_the_start():
    pd = ParamDict.from_pytree(make_tree())
    assert list(pd.select("head")) == ["head/bias", "head/kernel"]
    with pytest.raises(ValueError, match=r"matches no parameter.*'\.\*bias\$'"):
        pd.select("bias$")


@pytest.mark.parametrize("pattern", ["", "(unclosed", 3])
def test_select_refuses_empty_invalid_and_non_string_patterns(pattern):
    pd = ParamDict.from_pytree(make_tree())
    with pytest.raises((ValueError, TypeError)):
        pd.select(pattern)


def test_setattr_grad_req_and_unknown_attribute():
    pd = ParamDict.from_pytree(make_tree())
    pd.select("encoder").setattr("grad_req", "null")
    assert [pd[n].frozen for n in pd] == [True] * 4 + [False] * 2
    with pytest.raises(AttributeError, match="lr_mul.*did you mean 'lr_mult'"):
        pd.setattr("lr_mul", 0.1)


def test_setattr_checks_the_value_before_changing_anything():
    pd = ParamDict.from_pytree(make_tree())
    pd["head/bias"].lr_mult = 0.5
    with pytest.raises(ValueError, match="lr_mult"):
        pd.setattr("lr_mult", -1)
    assert pd["head/bias"].lr_mult == 0.5 and not pd["head/kernel"].is_set("lr_mult")


def test_setattr_none_unsets_everywhere():
    pd = ParamDict.from_pytree(make_tree())
    pd.setattr("lr_mult", 3.0)
    pd.setattr("lr_mult", None)
    assert not any(p.is_set("lr_mult") for p in pd.values())


def test_update_merges_by_reference_and_keeps_each_multiplier():
    a = ParamDict.from_pytree({"w": jnp.ones(2)}, prefix="a/")
    b = ParamDict.from_pytree({"w": jnp.ones(3)}, prefix="b/")
    a.setattr("lr_mult", 0.01)
    b.setattr("lr_mult", 10.0)
    merged = ParamDict()
    merged.update(a)
    merged.update(b)
    assert list(merged) == ["a/w", "b/w"]
    assert merged["a/w"] is a["a/w"] and merged["b/w"].lr_mult == 10.0
    assert merged.tree().keys() == {"a", "b"}
    merged.update(a)  # the same objects again: a no-op, not a conflict
    assert len(merged) == 2


def test_update_conflict_names_the_parameter_and_merges_nothing():
    a = ParamDict.from_pytree({"w": jnp.ones(2), "v": jnp.ones(2)})
    b = ParamDict({"u": Parameter(jnp.ones(1), name="u"), "w": Parameter(jnp.ones(2), name="w")})
    with pytest.raises(ValueError, match="'w'"):
        a.update(b)
    assert list(a) == ["v", "w"]  # 'u' was not merged either


def test_arrays_and_index():
    pd = ParamDict.from_pytree({"b": jnp.zeros(1), "a": jnp.ones(2)})
    arrays = pd.arrays()
    assert list(arrays) == ["a", "b"]
    np.testing.assert_array_equal(arrays["a"], np.ones(2))
    with pytest.raises(KeyError, match="did you mean 'a'"):
        pd.index("aa")


def test_merged_dict_nests_numeric_levels_as_lists():
    pd = ParamDict(
        {
            "blocks/0/w": Parameter(jnp.ones(1), name="blocks/0/w"),
            "blocks/1/w": Parameter(jnp.ones(2), name="blocks/1/w"),
        }
    )
    tree = pd.tree()
    assert isinstance(tree["blocks"], list) and tree["blocks"][1]["w"].shape == (2,)


def test_repr_and_html_show_every_column():
    pd = ParamDict.from_pytree({"w": jnp.ones((2, 2)), "b": jnp.zeros(2)})
    pd["b"].wd_mult = 0.0
    pd["w"].lr_mult = 0.1 * 3  # 0.30000000000000004: shown to 6 significant digits, as explain()
    text = repr(pd)
    for col in ("name", "shape", "dtype", "lr_mult", "wd_mult", "frozen"):
        assert col in text
    assert "(2, 2)" in text and "float32" in text
    html = pd._repr_html_()
    assert html.count("<tr>") == 3 and "<td>0</td>" in html and "<td>0.3</td>" in html
    assert "0.30000000000000004" not in text


def test_from_pytree_refuses_non_array_leaves():
    with pytest.raises(TypeError, match="'a'"):
        ParamDict.from_pytree({"a": "text"})
