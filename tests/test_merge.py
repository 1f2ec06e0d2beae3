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


def test_mismatched_shapes_are_rejected_naming_both_sizes():
    h = jax.random.normal(jax.random.key(0), (16, 3))
    b = jnp.zeros(2)
    with pytest.raises(ValueError, match=r"h.shape\[1\]=3 .*w_out.shape\[0\]=5.*Fix"):
        jp.merge.noiseout(h, jnp.ones((5, 2)), b, 1)
    with pytest.raises(ValueError, match=r"h.shape\[1\]=8 .*w_out.shape\[0\]=3.*Fix"):
        jp.merge.noiseout(jax.random.normal(jax.random.key(0), (16, 8)), jnp.ones((3, 2)), b, 2)
    with pytest.raises(ValueError, match=r"b_out must have shape \(w_out.shape\[1\],\) = \(2,\)"):
        jp.merge.noiseout(h, jnp.ones((3, 2)), jnp.zeros(3), 1)
    with pytest.raises(ValueError, match=r"h must be \[N, units\].*got shape \(16,\)"):
        jp.merge.noiseout(h[:, 0], jnp.ones((3, 2)), b, 1)
    with pytest.raises(ValueError, match=r"w_out.shape=\(3,\)"):
        jp.merge.merge_pair(h, jnp.ones(3), b, 0, 1)
