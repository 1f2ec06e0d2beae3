"""NoiseOut merging preserves the outputs of a layer with duplicated neurons exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune as jp
import jaxprune.merge  # noqa: F401  (until jaxprune/__init__ exports it)


def test_merging_duplicated_neurons_preserves_outputs():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k1, (64, 5))
    w_in = jax.random.normal(k2, (5, 4))
    # Units 4 and 5 duplicate units 1 and 2 (an exact copy and a scaled copy).
    w_in = jnp.concatenate([w_in, w_in[:, 1:2], 3.0 * w_in[:, 2:3]], axis=1)
    h = jax.nn.relu(x @ w_in)
    w_out, b_out = jax.random.normal(k3, (6, 3)), jnp.array([0.1, -0.2, 0.3])
    r = jp.merge.noiseout(h, w_out, b_out, 2)
    assert np.asarray(r.alive).tolist() == [True, True, True, True, False, False]
    assert sorted(np.asarray(r.pairs).tolist()) == [[1, 4], [2, 5]]
    h_pruned = h * r.alive  # the removed units' incoming columns zeroed
    np.testing.assert_allclose(
        np.asarray(h_pruned @ r.w_out + r.b_out), np.asarray(h @ w_out + b_out), atol=1e-5
    )


def test_affine_redundancy_folds_into_the_bias():
    h0 = jax.random.normal(jax.random.key(1), (32, 2))
    h = jnp.concatenate([h0, 0.5 * h0[:, :1] + 2.0], axis=1)
    w, b = jnp.ones((3, 2)), jnp.zeros(2)
    w2, b2 = jp.merge.merge_pair(h, w, b, 0, 2)
    np.testing.assert_allclose(np.asarray(b2), [2.0, 2.0], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(w2[0]), [1.5, 1.5], rtol=1e-5)
    with pytest.raises(ValueError, match="num_merges must be an int in"):
        jp.merge.noiseout(h, w, b, 3)
