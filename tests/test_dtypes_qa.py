"""Narrow and wide dtypes, strict promotion: found in review."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune as jp


def test_saliency_of_float16_params_does_not_underflow():
    w = {"w": jnp.full((4, 2), 1e-4, jnp.float16)}
    g = {"w": (jnp.arange(4.0, 0.0, -1.0)[:, None] * jnp.ones((4, 2)) * 1e-5).astype(jnp.float16)}
    s = jp.criteria.saliency(w, g)["w"]
    assert s.dtype == jnp.float32 and bool(jnp.all(s > 0))
    keep = jp.masks.topk({"w": s}, 0.5)["w"]
    assert keep[:, 0].tolist() == [True, True, False, False]


@pytest.mark.parametrize("make", [jp.dynamic.rigl, jp.dynamic.set])
def test_rigl_lands_dropped_weights_on_zero_with_narrower_updates(make):
    params = {"w": jax.random.normal(jax.random.key(0), (32, 16)) * 0.1}
    grads = {"w": jax.random.normal(jax.random.key(1), (32, 16)).astype(jnp.bfloat16)}
    tx = make(optax.sgd(0.1), sparsity=0.5, key=jax.random.key(2), end_step=10, update_every=1)
    st = tx.init(params)
    for _ in range(2):  # step 1 rewires
        u, st = tx.update(grads, st, params)
        params = optax.apply_updates(params, u)
    m = jp.get_masks(st)["w"]
    assert params["w"].dtype == jnp.float32
    assert not bool(jnp.any(params["w"][~m]))


def test_float64_scores_warn_that_they_are_compared_as_float32():
    with jax.enable_x64(True):
        x = {"w": jnp.linspace(1.0, 1.0 + 1e-9, 10, dtype=jnp.float64).reshape(2, 5)}
        with pytest.warns(UserWarning, match="float64 scores are compared as float32"):
            jp.masks.topk(x, 0.5)
        # The suggested fix restores the float64 order.
        shifted = jax.tree.map(lambda v: (v - v.min()).astype(jnp.float32), x)
        keep = jp.masks.topk(shifted, 0.5)["w"]
    assert np.asarray(keep).ravel().tolist() == [False] * 5 + [True] * 5


def test_packing_and_rigl_under_strict_promotion(strict_promotion):
    params = {"w": jax.random.normal(jax.random.key(0), (16, 8))}
    grads = jax.tree.map(jnp.sin, params)
    packed = jp.masks.pack({"w": params["w"] > 0})
    assert jp.masks.unpack(packed)["w"].tolist() == (params["w"] > 0).tolist()
    tx = jp.dynamic.rigl(
        optax.sgd(0.1), sparsity=0.5, key=jax.random.key(1), end_step=10, update_every=1
    )
    st = tx.init(params)
    for _ in range(2):
        u, st = jax.jit(tx.update)(grads, st, params)
    assert float(jp.sparsity(jp.get_masks(st))) == 0.5


def test_bfloat16_params_refresh_from_stored_scores_not_recomputed_ones():
    # Recomputing float32 keys from bfloat16 params at every pass of the search
    # costs more scratch on XLA:CPU than storing the scores once.
    params = {
        "w1": jnp.ones((256, 512), jnp.bfloat16),
        "w2": jnp.ones((512, 128), jnp.bfloat16),
    }

    def temp_bytes(criterion):
        tx = jp.prune(optax.sgd(0.1), sparsity=0.5, criterion=criterion)
        state = tx.init(params)
        step = jax.jit(lambda g, s, p: tx.update(g, s, p))
        compiled = step.lower(params, state, params).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    stored = temp_bytes(lambda p: jp.criteria.magnitude(p))  # never fused
    assert temp_bytes(jp.criteria.magnitude) == stored


def test_float64_scores_keep_their_precision_through_group_scores():
    # Scores 1 + i * 1e-10 are one float32 value: cast down first, every group
    # and every n:m slot would tie silently, and ties go by position.
    with jax.enable_x64(True):
        fine = 1.0 + jnp.arange(72, 0, -1, dtype=jnp.float64) * 1e-10  # decreasing
        w = {"w": fine[:64].reshape(8, 8)}
        # n:m ranks inside each group of m at the scores' own precision: the
        # first two of each group are the largest (a tie by position keeps the last two).
        keep = np.asarray(jp.structured.nm(w, n=2, m=4, axis=1)["w"])
        assert keep.tolist() == [[True, True, False, False] * 2] * 8
        # The group scores stay float64, so the final comparison warns as topk's does.
        for select in (
            lambda: jp.structured.structured(w, 0.5, axes=0),
            lambda: jp.structured.blocks(w, 0.5, block=(1, 4)),
            lambda: jp.structured.patterns({"k": fine.reshape(3, 3, 2, 4)}, 0.5),
        ):
            with pytest.warns(UserWarning, match="float64 scores are compared as float32"):
                select()
