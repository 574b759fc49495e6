"""lrmult/_names.py: key-path names, close-match hints, nesting names back into a tree."""

from typing import NamedTuple

import jax
import pytest
from jax.tree_util import DictKey, GetAttrKey, SequenceKey

from lrmult._names import nest, path_name, suggest

# -- path_name -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, name",
    [
        ((DictKey("encoder"), SequenceKey(0), DictKey("kernel")), "encoder/0/kernel"),
        ((GetAttrKey("backbone"), GetAttrKey("kernel")), "backbone/kernel"),
        ((DictKey("layers"), SequenceKey(12), GetAttrKey("bias")), "layers/12/bias"),
        ((DictKey(3),), "3"),  # a non-string dict key
        ((DictKey("w"),), "w"),
        ((), ""),
    ],
)
def test_path_name_joins_keys_with_a_slash(path, name):
    assert path_name(path) == name
    assert path_name(list(path)) == name  # any sequence of keys


class Dense(NamedTuple):
    kernel: object
    bias: object


def test_path_name_of_real_key_paths_from_a_flattened_tree():
    tree = {"head": Dense(1, 2), "layers": [{"w": 3}, {"w": 4}]}
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    assert [(path_name(p), v) for p, v in flat] == [
        ("head/kernel", 1),
        ("head/bias", 2),
        ("layers/0/w", 3),
        ("layers/1/w", 4),
    ]


# -- suggest ---------------------------------------------------------------------------------------


def test_suggest_names_the_close_candidate():
    # difflib ratio 2·7/16 = 0.875 for momentun/momentum; the others share almost nothing
    assert suggest("momentun", ["nesterov", "momentum", "learning_rate"]) == (
        " (did you mean 'momentum'?)"
    )


def test_suggest_gives_nothing_when_no_candidate_is_close():
    assert suggest("zzz", ["momentum", "nesterov"]) == ""
    assert suggest("momentum", []) == ""


def test_suggest_lists_the_best_matches_first_and_at_most_three():
    # ratios to "l1/w": l1/ww 2·4/9 ≈ 0.89, l1/W 2·3/8 = 0.75, l2/W 2·2/8 = 0.5, out/bias ≈ 0.17
    hint = suggest("l1/w", ["l2/W", "l1/W", "l1/ww", "out/bias"])
    assert hint == " (did you mean 'l1/ww' or 'l1/W' or 'l2/W'?)"
    many = suggest("abcd", ["abcx", "abxd", "axcd", "xbcd"])  # all 0.75: three, not four
    assert many.count("'") == 6 and many.startswith(" (did you mean ") and many.endswith("?)")


def test_suggest_accepts_a_non_string_key_and_any_iterable():
    # an index typed as an int: "33" vs "3" is 2·1/3, vs "34" 2·1/4 = 0.5 (the cutoff)
    assert suggest(33, iter(["3", "34", "9"])) == " (did you mean '3' or '34'?)"
    assert suggest(3, {"3": 0, "4": 1}) == " (did you mean '3'?)"  # a dict: its keys


# -- nest ------------------------------------------------------------------------------------------


def build(names):
    treedef, order = nest(names)
    return jax.tree.unflatten(treedef, [f"<{n}>" for n in order]), order


def test_nest_splits_on_slashes_and_orders_like_jax():
    tree, order = build(["layers/0/kernel", "head/bias", "layers/1/kernel", "head/kernel"])
    assert tree == {
        "head": {"bias": "<head/bias>", "kernel": "<head/kernel>"},
        "layers": [{"kernel": "<layers/0/kernel>"}, {"kernel": "<layers/1/kernel>"}],
    }
    # dict keys sorted, list items by index
    assert order == ["head/bias", "head/kernel", "layers/0/kernel", "layers/1/kernel"]


def test_nest_makes_a_list_only_of_keys_exactly_0_to_n_minus_1():
    tree, _ = build(["a/0", "b/0", "b/2", "c/1", "c/2", "d/00", "e/0/x", "e/1/y"])
    assert tree["a"] == ["<a/0>"]  # one item
    assert tree["b"] == {"0": "<b/0>", "2": "<b/2>"}  # a gap
    assert tree["c"] == {"1": "<c/1>", "2": "<c/2>"}  # does not start at 0
    assert tree["d"] == {"00": "<d/00>"}  # not the string of an index
    assert tree["e"] == [{"x": "<e/0/x>"}, {"y": "<e/1/y>"}]


def test_nest_orders_list_items_numerically_not_as_strings():
    names = [f"blocks/{i}" for i in range(11)]
    tree, order = build(sorted(names))  # given in string order: 0, 1, 10, 2, ...
    assert tree == {"blocks": [f"<blocks/{i}>" for i in range(11)]}
    assert order == [f"blocks/{i}" for i in range(11)]


def test_nest_lists_at_several_levels_and_at_the_root():
    tree, _ = build(["0/0", "0/1", "1/0"])
    assert tree == [["<0/0>", "<0/1>"], ["<1/0>"]]


def test_nest_of_no_names_is_an_empty_dict():
    treedef, order = nest([])
    assert order == [] and jax.tree.unflatten(treedef, []) == {}


@pytest.mark.parametrize(
    "names, match",
    [
        (["a", "a/b"], r"parameter names 'a' and 'a/b' clash: one is a prefix of the other"),
        (["x/y", "x/y/z"], r"parameter names 'x/y' and 'x/y/z' clash"),
        (["x/y/z", "x/y/w", "x"], r"parameter name 'x' is also a prefix of other names"),
        (["a/b", "a"], r"parameter name 'a' is also a prefix of other names"),
    ],
)
def test_nest_refuses_a_name_that_is_a_prefix_of_another(names, match):
    with pytest.raises(ValueError, match=match) as info:
        nest(names)
    assert "rename one" in str(info.value)
