"""structured(reduce="l2") ranks slices by their norms at any float32 magnitude (QA9 #1)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune as jp
from jaxprune.structured import REDUCTIONS

# 8x4 scores whose column norms are ordered 4 > 3 > 2 > 1.
COLS = np.array([[4.0, 3.0, 2.0, 1.0]] * 8, np.float32)
KEEP = [True, True, False, False]


@pytest.mark.parametrize("scale", [1e-20, 1e-23, 1e20, 1e30])
def test_l2_keeps_largest_slices_at_extreme_scale(scale):
    # Plain squares underflow to 0 / overflow to inf here, tying every column and
    # dropping the largest ones by the flatten-order tie-break.
    s = {"w": jnp.asarray(COLS * np.float32(scale))}
    assert jp.masks.structured(s, 0.5, axes=-1)["w"][0].tolist() == KEEP
    jitted = jax.jit(lambda t: jp.masks.structured(t, 0.5, axes=-1))(s)
    assert jitted["w"][0].tolist() == KEEP


def test_l2_global_ranks_leaves_of_different_scales():
    # scope="global" compares norms across leaves, so the scale must be multiplied back.
    s = {"a": jnp.asarray(COLS * np.float32(1e-20)), "b": jnp.asarray(COLS * np.float32(1e20))}
    m = jp.masks.structured(s, 0.25, axes=-1, scope="global")
    assert m["a"][0].tolist() == KEEP and np.asarray(m["b"]).all()


def test_l2_norm_values_match_plain_formula():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(16, 7)).astype(np.float32) * 3)
    plain = jnp.sqrt(jnp.sum(jnp.square(x), axis=0))
    np.testing.assert_array_equal(REDUCTIONS["l2"](x, (0,)), plain)  # bit for bit
    tiny = REDUCTIONS["l2"](x * np.float32(1e-25), (0,))
    np.testing.assert_allclose(tiny, plain * 1e-25, rtol=1e-6)
    big = REDUCTIONS["l2"](x * np.float32(1e25), (0,))
    np.testing.assert_allclose(big, plain * 1e25, rtol=1e-6)
    # zero, inf, NaN and -inf (prune first) slices reduce as before
    z = jnp.asarray([[0.0, jnp.inf, jnp.nan, -jnp.inf], [0.0, 1.0, 1.0, 1.0]], jnp.float32)
    out = np.asarray(REDUCTIONS["l2"](z, (0,)))
    assert out[0] == 0 and out[1] == np.inf and np.isnan(out[2]) and out[3] == -np.inf
