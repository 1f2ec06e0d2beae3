"""A mask refresh of many small layers keeps no full-size keys in the train step.

The exact search brackets a small leaf's k-th key by its minimum and maximum.
A plain ``jnp.max`` over a 2-D array is a windowed reduction on XLA:CPU that
does not fuse with the key computation, so every layer's keys were written out
at once in the refresh branch (2x the kernels' bytes with a schedule). With a
constant sparsity the count to prune is a constant, and XLA folded the reads'
salts into one and merged the reads into one stored array (1x).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune as jp

_LAYERS, _WIDTH = 8, 128  # 16,384 entries per kernel: the small-leaf path of the search


def _temp(tx, params, loss):
    state = tx.init(params)

    def step(p, s):
        g = jax.grad(loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def _flat():
    keys = jax.random.split(jax.random.key(0), _LAYERS)
    params = {
        f"l{i}": {"kernel": jax.random.normal(k, (_WIDTH, _WIDTH)), "bias": jnp.zeros(_WIDTH)}
        for i, k in enumerate(keys)
    }
    x = jnp.ones((4, _WIDTH))

    def loss(p):
        h = x
        for i in range(_LAYERS):
            h = jnp.tanh(h @ p[f"l{i}"]["kernel"] + p[f"l{i}"]["bias"])
        return jnp.sum(h)

    return params, loss


def _stacked():
    w = jax.random.normal(jax.random.key(0), (_LAYERS, _WIDTH, _WIDTH))
    params = {"layers": {"kernel": w, "bias": jnp.zeros((_LAYERS, _WIDTH))}}
    x = jnp.ones((4, _WIDTH))

    def loss(p):
        h, _ = jax.lax.scan(
            lambda h, layer: (jnp.tanh(h @ layer["kernel"] + layer["bias"]), None), x, p["layers"]
        )
        return jnp.sum(h)

    return params, loss


_SCHEDULE = jp.schedules.polynomial(0.0, 0.9, 0, 100, frequency=10)


@pytest.mark.parametrize("sparsity", [0.6, _SCHEDULE], ids=["constant", "schedule"])
@pytest.mark.parametrize("model", ["flat", "stacked"])
def test_refresh_of_small_layers_keeps_no_full_size_keys(model, sparsity):
    params, loss = _flat() if model == "flat" else _stacked()
    scope = "layer"
    if model == "stacked":
        scope = jp.masks.per_layer(jp.masks.topk, stacked=lambda p, _: p[0] == "layers")
    kernel_bytes = _LAYERS * _WIDTH * _WIDTH * 4
    dense = _temp(optax.adam(1e-3), params, loss)
    pruned = _temp(jp.prune(optax.adam(1e-3), sparsity=sparsity, scope=scope), params, loss)
    # Before: +1x (constant) and +2x (schedule) the kernels' bytes over the dense step.
    assert pruned - dense < 0.25 * kernel_bytes, (pruned, dense, kernel_bytes)


def test_small_leaf_masks_still_exact_with_ties_and_constant_counts():
    # The fused min/max bracket: same masks as the stored scores' selection,
    # ties and a constant count included.
    w = jnp.round(jax.random.normal(jax.random.key(1), (3, 64, 48)) * 2) / 2  # many ties
    params = {"a": w[0], "b": w[1], "c": w[2] - 100.0}
    for scope, select in (("layer", jp.masks.topk), ("global", jp.masks.global_topk)):
        tx = jp.prune(optax.sgd(0.0), sparsity=0.7, scope=scope)
        _, state = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
        want = select(jp.criteria.magnitude(params), 0.7)
        for got, ref in zip(
            jax.tree.leaves(jp.get_masks(state)), jax.tree.leaves(want), strict=True
        ):
            np.testing.assert_array_equal(got, ref)
        total = sum(int(np.sum(~np.asarray(m))) for m in jax.tree.leaves(jp.get_masks(state)))
        assert total == (3 * round(0.7 * 64 * 48) if scope == "layer" else round(0.7 * 3 * 64 * 48))
