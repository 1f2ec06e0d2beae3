"""jp.sparsity on masks with a ``where`` written for params, and [n, 1, 1] bias masks."""

import jax
import jax.numpy as jnp
import pytest

import jaxprune as jp


def _params():
    return {
        "l1": {"kernel": jax.random.normal(jax.random.key(0), (64, 32)), "bias": jnp.ones(32)},
        "l2": {"kernel": jax.random.normal(jax.random.key(1), (32, 10)), "bias": jnp.ones(10)},
    }


def test_sparsity_of_masks_with_the_readme_bias_predicate_counts_the_masks():
    # The README's "keep every bias dense" predicate refuses bool leaves
    # (jp.is_prunable is for floating params): on masks it counted nothing (0.0).
    params = _params()
    where = lambda path, leaf: path[-1] != "bias" and jp.is_prunable(path, leaf)  # noqa: E731
    masks = jp.masks.global_topk(jp.criteria.magnitude(params), 0.9, where=where)
    on_params = float(jp.sparsity(jp.apply_masks(params, masks), where=where))
    assert on_params == pytest.approx(0.9, abs=1e-3)
    assert float(jp.sparsity(masks, where=where)) == on_params
    # A where that picks one leaf by path still counts that leaf only.
    only_l2 = lambda path, leaf: path[0] == "l2" and path[-1] == "kernel"  # noqa: E731
    m2 = masks["l2"]["kernel"]
    assert float(jp.sparsity(masks, where=only_l2)) == pytest.approx(1 - float(m2.mean()))
    with pytest.raises(ValueError, match="where must be a predicate"):
        jp.sparsity(masks, where=3)


def test_per_layer_default_where_leaves_out_the_masks_of_channel_biases():
    # An equinox-style conv bias [out, 1, 1] is not pruned by default; its
    # all-True mask must not be counted by per_layer's default where either.
    sel = jp.masks.per_layer(jp.masks.topk, stacked=lambda p, _: p[0] == "layers")
    masks = {
        "layers": {
            "weight": jnp.zeros((3, 8, 4, 3, 3), bool),
            "bias": jnp.ones((3, 8, 1, 1), bool),
        }
    }
    assert float(jp.sparsity(masks, where=sel.layer_where(None))) == 1.0
    flat = {"conv": {"weight": jnp.zeros((8, 4, 3, 3), bool), "bias": jnp.ones((8, 1, 1), bool)}}
    assert float(jp.sparsity(flat)) == 1.0
