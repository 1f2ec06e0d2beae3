"""SNIP, GraSP and SynFlow against hand-computed values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune as jp
import jaxprune.at_init  # noqa: F401  (until jaxprune/__init__ exports it)


def test_snip_is_normalized_saliency():
    x = jax.random.normal(jax.random.key(0), (8, 3))
    p = {"w": jax.random.normal(jax.random.key(1), (3, 2))}
    loss = lambda p, x: jnp.mean((x @ p["w"]) ** 2)
    g = jax.grad(loss)(p, x)["w"]
    s = jp.at_init.snip(loss, p, x)["w"]
    want = np.abs(np.asarray(p["w"] * g))
    np.testing.assert_allclose(np.asarray(s), want / want.sum(), rtol=1e-5)


def test_grasp_uses_the_hessian_gradient_product():
    a = jnp.array([[2.0, 1.0], [1.0, 3.0]])
    loss = lambda p: 0.5 * p["w"] @ a @ p["w"] + p["w"].sum()
    w = jnp.array([1.0, -1.0])
    g = a @ w + 1.0
    s = jp.at_init.grasp(lambda p: loss(p), {"w": w})["w"]
    np.testing.assert_allclose(np.asarray(s), np.asarray(w * (a @ g)), rtol=1e-6)


def test_synflow_scores_count_paths_and_masks_are_exact():
    f = lambda p, x: x @ p["a"] @ p["b"]
    p = {"a": jnp.array([[1.0, -2.0], [3.0, 0.5]]), "b": jnp.array([[1.0], [4.0]])}
    s = jp.at_init.synflow_scores(f, p, (1, 2))["a"]
    # R = sum_ij |a_ij| |b_j|: dR/da_ij = |b_j|, score = |a_ij| |b_j|.
    assert np.asarray(s).tolist() == [[1.0, 8.0], [3.0, 2.0]]
    g = lambda p, x: jax.nn.relu(x @ p["a"]) @ p["b"]
    q = {
        "a": jax.random.normal(jax.random.key(0), (6, 10)),
        "b": jax.random.normal(jax.random.key(1), (10, 3)),
    }
    m = jp.at_init.synflow(g, q, (1, 6), 0.8, iterations=5)
    assert int(sum((~np.asarray(x)).sum() for x in jax.tree.leaves(m))) == 72
    with pytest.raises(ValueError, match="iterations must be a positive int"):
        jp.at_init.synflow(g, q, (1, 6), 0.5, iterations=0)
    with pytest.raises(ValueError, match="sparsity must be in"):
        jp.at_init.synflow(g, q, (1, 6), 75.0)


def test_synflow_wrong_input_shape_names_input_shape_and_the_model_error():
    g = lambda p, x: jax.nn.relu(x @ p["a"]) @ p["b"]
    q = {"a": jnp.ones((6, 10)), "b": jnp.ones((10, 3))}
    with pytest.raises(
        ValueError, match=r"input_shape=\(1, 5\): TypeError: dot_general.*\(5,\) and \(6,\).*Fix"
    ):
        jp.at_init.synflow(g, q, (1, 5), 0.5, iterations=2)
    with pytest.raises(ValueError, match=r"input_shape=\(1, 5\).*Fix"):
        jp.at_init.synflow_scores(g, q, (1, 5))
    for bad in (6, (1, 0), "ab", ()):
        with pytest.raises(ValueError, match=r"input_shape must be the shape.*Fix"):
            jp.at_init.synflow(g, q, bad, 0.5, iterations=2)


def test_synflow_wrong_input_shape_on_an_nnx_conv():
    from flax import nnx

    conv = nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(conv, nnx.Param)
    apply_fn = lambda s, x: nnx.merge(graphdef, s)(x)
    m = jp.at_init.synflow(apply_fn, state, (1, 5, 5, 3), 0.5, iterations=2)
    assert float(jp.sparsity(m)) == 0.5
    with pytest.raises(ValueError, match=r"input_shape=\(1, 5, 5, 1\).*Fix: input_shape must"):
        jp.at_init.synflow(apply_fn, state, (1, 5, 5, 1), 0.5, iterations=2)
