"""Selections and jp.prune under jax_numpy_dtype_promotion="strict", with half-precision leaves."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune as jp

SELECTIONS = {
    "structured": lambda s: jp.masks.structured(s, 0.5, reduce="l1"),
    "patterns": lambda s: jp.masks.patterns(s),
    "nm": lambda s: jp.masks.nm(s, n=2, m=4),
    "blocks": lambda s: jp.masks.blocks(s, 0.5, block=(2, 2)),
}


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("name", sorted(SELECTIONS))
def test_structured_selections_of_half_precision_scores_under_strict_promotion(dtype, name):
    w = jax.random.normal(jax.random.key(0), (3, 3, 4, 8))
    scores = {"k": jnp.abs(w).astype(dtype)}
    with jax.numpy_dtype_promotion("strict"):
        got = SELECTIONS[name](scores)
    # The same masks as float32 scores of the same values give.
    want = SELECTIONS[name]({"k": scores["k"].astype(jnp.float32)})
    np.testing.assert_array_equal(np.asarray(got["k"]), np.asarray(want["k"]))


@pytest.mark.parametrize(
    "scope",
    ["layer", "global", jp.masks.structured, functools.partial(jp.masks.nm, n=2, m=4)],
    ids=["layer", "global", "structured", "nm"],
)
def test_prune_steps_bfloat16_params_under_strict_promotion(scope):
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {
        "a": jax.random.normal(k1, (16, 8)).astype(jnp.bfloat16),
        "b": jnp.zeros(8, jnp.bfloat16),
        "c": jax.random.normal(k2, (3, 3, 4, 8)).astype(jnp.bfloat16),
    }
    grads = jax.tree.map(jnp.ones_like, params)
    with jax.numpy_dtype_promotion("strict"):
        tx = jp.prune(optax.sgd(1e-3), sparsity=0.5, criterion=jp.criteria.saliency, scope=scope)
        state = tx.init(params)
        updates, state = jax.jit(tx.update)(grads, state, params)
        stepped = optax.apply_updates(params, updates)
    assert stepped["a"].dtype == jnp.bfloat16 and stepped["c"].dtype == jnp.bfloat16
    assert float(jp.sparsity(stepped)) == pytest.approx(0.5, abs=0.02)
