"""structure.select(scope="isomorphic"): one global ranking per class of isomorphic groups."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxprune as jp
from jaxprune import structure
from jaxprune.structure.isomorphic import isomorphic_classes


def _model(p, x):
    # Two branches of one structure (4 -> 32 -> 2) and a wider one (4 -> 64 -> 2).
    h1, h2 = jax.nn.relu(x @ p["a1"]), jax.nn.relu(x @ p["a2"])
    h3 = jax.nn.relu(x @ p["c"])
    return h1 @ p["b1"] + h2 @ p["b2"] + h3 @ p["d"]


def _params():
    ks = jax.random.split(jax.random.key(0), 6)
    p = {
        "a1": jax.random.normal(ks[0], (4, 32)),
        "b1": jax.random.normal(ks[1], (32, 2)),
        "a2": jax.random.normal(ks[2], (4, 32)),
        "b2": jax.random.normal(ks[3], (32, 2)),
        # The wide branch's weights are 100x larger: a global ranking never cuts it.
        "c": 100 * jax.random.normal(ks[4], (4, 64)),
        "d": 100 * jax.random.normal(ks[5], (64, 2)),
    }
    return p, structure.groups(_model, p, jnp.ones((1, 4)))


def _dropped(masks):
    return {name: int((~np.asarray(masks[name]).all(axis=0)).sum()) for name in ("a1", "a2", "c")}


def test_classes_are_the_groups_of_one_structure():
    p, groups = _params()
    flat = jax.tree_util.tree_flatten_with_path(p)[0]
    classes = isomorphic_classes(groups, flat)
    widths = sorted([groups[i].channels for i in c] for c in classes)
    assert widths == [[32, 32], [64]]


def test_each_class_loses_its_share_where_global_cuts_only_the_small_scale():
    p, groups = _params()
    scores = jp.criteria.magnitude(p)
    iso = _dropped(structure.select(groups, scores, 0.25, scope="isomorphic"))
    # round(0.25 * 64) channels of the two 32-channel branches together, and
    # round(0.25 * 64) of the wide branch, each class ranked on its own.
    assert iso["a1"] + iso["a2"] == 16 and iso["c"] == 16
    glob = _dropped(structure.select(groups, scores, 0.25, scope="global"))
    assert glob["c"] == 0 and glob["a1"] + glob["a2"] == 32  # round(0.25 * 128), all small
    # Within a class the ranking is global: the same cut as a global select of its groups.
    small = [g for g in groups if g.prunable and g.channels == 32]
    alone = _dropped(structure.select(small, scores, 0.25, scope="global"))
    assert (alone["a1"], alone["a2"]) == (iso["a1"], iso["a2"])


def test_isomorphic_selection_in_prune_matches_select_under_jit():
    p, groups = _params()
    sel = structure.selection(groups, scope="isomorphic")
    tx = jp.prune(optax.sgd(0.0), sparsity=0.25, scope=sel)
    zeros = jax.tree.map(jnp.zeros_like, p)
    _, state = jax.jit(tx.update)(zeros, tx.init(p), p)
    want = structure.select(groups, jp.criteria.magnitude(p), 0.25, scope="isomorphic")
    for name in ("a1", "b1", "a2", "b2", "c", "d"):
        np.testing.assert_array_equal(
            np.broadcast_to(jp.get_masks(state)[name], p[name].shape), want[name]
        )
