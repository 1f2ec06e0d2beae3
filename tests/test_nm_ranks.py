"""jp.masks.nm counts each entry's rank in its group instead of sorting: same masks as sorts."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune as jp
from jaxprune import structured_nm

SPECIAL = np.array([0.0, -0.0, 1.0, -1.0, np.nan, -np.nan, np.inf, -np.inf, 2.0, 1.0], np.float32)


def _sorted_ranks(g, axis):
    """The reference: positions in a stable ascending sort along ``axis``."""
    order = jnp.argsort(g, axis=axis, stable=True)
    return jnp.argsort(order, axis=axis, stable=True)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("m", [1, 2, 4, 8, 16, 32, 40])
def test_counted_ranks_equal_sorted_ranks(dtype, m):
    rng = np.random.default_rng(m)
    for values in (rng.choice(SPECIAL, size=(64, m)), rng.normal(size=(64, m))):
        g = jnp.asarray(values, dtype)
        np.testing.assert_array_equal(
            structured_nm._group_ranks(g, 1), _sorted_ranks(g, 1), err_msg=f"{dtype} m={m}"
        )


def test_every_group_of_four_from_signed_zeros_nans_and_ties():
    groups = np.array(list(itertools.product([0.0, -0.0, 1.0, np.nan, -1.0], repeat=4)))
    g = jnp.asarray(groups, jnp.float32)
    np.testing.assert_array_equal(structured_nm._group_ranks(g, -1), _sorted_ranks(g, -1))


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
def test_groups_along_any_axis_in_place(axis):
    g = jnp.asarray(np.random.default_rng(1).choice(SPECIAL, size=(4, 4, 4)))
    np.testing.assert_array_equal(structured_nm._group_ranks(g, axis), _sorted_ranks(g, axis))


@pytest.mark.parametrize("axis", [-2, -1, 0])
def test_nm_masks_match_a_sorting_reference(axis):
    x = jax.random.normal(jax.random.key(0), (4, 3, 16, 24))
    x = jnp.round(x * 2) / 2  # ties
    masks = jp.masks.nm({"k": x}, n=2, m=4, axis=axis)["k"]
    moved = jnp.moveaxis(x, axis, -1)
    g = moved.reshape(moved.shape[:-1] + (moved.shape[-1] // 4, 4))
    want = (_sorted_ranks(g, -1) >= 2).reshape(moved.shape)
    np.testing.assert_array_equal(masks, jnp.moveaxis(want, -1, axis))
    assert int(masks.sum()) == x.size // 2
