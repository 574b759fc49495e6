import jax.numpy as jnp
import numpy as np
import pytest

import lrmult
from lrmult import Parameter


def test_unset_metadata_reads_defaults():
    p = Parameter(jnp.zeros(3), name="w")
    assert (p.lr_mult, p.wd_mult, p.frozen, p.grad_req) == (1.0, 1.0, False, "write")
    assert not any(p.is_set(a) for a in ("lr_mult", "wd_mult", "frozen"))


def test_constructor_arguments_count_as_set():
    p = Parameter(jnp.zeros(3), name="w", lr_mult=0.5, wd_mult=0, frozen=True)
    assert (p.lr_mult, p.wd_mult, p.frozen) == (0.5, 0.0, True)
    assert all(p.is_set(a) for a in ("lr_mult", "wd_mult", "frozen"))


def test_del_and_none_unset_a_multiplier():
    p = Parameter(jnp.zeros(3), name="w", lr_mult=2.0)
    del p.lr_mult
    assert not p.is_set("lr_mult") and p.lr_mult == 1.0
    p.wd_mult = 3.0
    p.wd_mult = None
    assert not p.is_set("wd_mult") and p.wd_mult == 1.0


def test_grad_req_is_an_alias_of_frozen():
    p = Parameter(jnp.zeros(3), name="w")
    p.grad_req = "null"
    assert p.frozen is True and p.is_set("frozen")
    p.grad_req = "write"
    assert p.frozen is False and p.grad_req == "write"


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "0.1", True, [1.0]])
def test_bad_multiplier_is_a_value_error_naming_the_parameter(bad):
    p = Parameter(jnp.zeros(3), name="enc/w", lr_mult=0.3)
    with pytest.raises(ValueError, match="enc/w"):
        p.lr_mult = bad
    assert p.lr_mult == 0.3  # unchanged
    with pytest.raises(ValueError, match="enc/w"):
        Parameter(jnp.zeros(3), name="enc/w", wd_mult=bad)


def test_grad_req_add_is_refused_with_a_reason():
    p = Parameter(jnp.zeros(3), name="w")
    with pytest.raises(ValueError, match="accumulation"):
        p.grad_req = "add"
    assert p.grad_req == "write"


def test_set_data_keeps_shape_and_dtype():
    p = Parameter(jnp.zeros((2, 3)), name="w")
    p.set_data(jnp.ones((2, 3)))
    np.testing.assert_array_equal(p.data(), np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"'w'.*shape \(2, 3\)"):
        p.set_data(jnp.ones((3, 2)))
    with pytest.raises(ValueError, match=r"'w'.*dtype float32.*astype"):
        p.set_data(jnp.ones((2, 3), jnp.int32))
    np.testing.assert_array_equal(p.data(), np.ones((2, 3)))


def test_value_must_be_an_array():
    with pytest.raises(TypeError, match="'w'.*str"):
        Parameter("abc", name="w")
    assert Parameter(np.ones(2, np.float32)).dtype == jnp.float32


def test_repr_shows_set_metadata_only():
    r = repr(lrmult.Parameter(jnp.zeros(2), name="b", wd_mult=0.0))
    assert "wd_mult=0" in r and "lr_mult" not in r
