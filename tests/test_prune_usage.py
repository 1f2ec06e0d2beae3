"""jp.prune as users call it: extra ``grads``, any key implementation, selections that leave
leaves out, and clear errors for what cannot work."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune as jp
from jaxprune import structure
from tests._jaxprs import count


def _params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {"w": jax.random.normal(k1, (8, 6)), "v": jax.random.normal(k2, (6, 4))}


def test_grads_keyword_replaces_the_step_gradients_for_the_criterion():
    p = _params()
    g = jax.tree.map(jnp.ones_like, p)
    # Accumulated gradients that make the other half win under |w * g|.
    acc = {k: jnp.where(jnp.abs(x) < jnp.median(jnp.abs(x)), 1e3, 1e-3) for k, x in p.items()}
    for scope, select in (("layer", jp.masks.topk), ("global", jp.masks.global_topk)):
        tx = jp.prune(optax.sgd(0.1), sparsity=0.5, criterion=jp.criteria.saliency, scope=scope)
        _, st = jax.jit(tx.update)(g, tx.init(p), p, grads=acc)
        want = select(jp.criteria.saliency(p, acc), 0.5)
        for k in p:
            np.testing.assert_array_equal(jp.get_masks(st)[k], want[k])
        # Without the keyword, the step's gradients are the criterion's.
        _, st = tx.update(g, tx.init(p), p)
        want = select(jp.criteria.saliency(p, g), 0.5)
        assert not np.array_equal(want["w"], select(jp.criteria.saliency(p, acc), 0.5)["w"])
        for k in p:
            np.testing.assert_array_equal(jp.get_masks(st)[k], want[k])


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg", "unsafe_rbg"])
def test_random_criterion_takes_any_key_implementation(impl):
    p = _params()
    key = jax.random.key(3, impl=impl)
    tx = jp.prune(optax.sgd(0.1), sparsity=0.5, criterion=jp.criteria.random, key=key)
    _, st = jax.jit(tx.update)(p, tx.init(p), p)
    # The step-0 key, rebuilt in its own implementation.
    want = jp.masks.topk(jp.criteria.random(p, key=jax.random.fold_in(key, 0)), 0.5)
    for k in p:
        np.testing.assert_array_equal(jp.get_masks(st)[k], want[k])
    # A raw uint32 key still works.
    tx = jp.prune(
        optax.sgd(0.1),
        sparsity=0.5,
        criterion=jp.criteria.random,
        key=jnp.array([0, 3], jnp.uint32),
    )
    assert float(jp.sparsity(jp.get_masks(tx.update(p, tx.init(p), p)[1]))) == 0.5


def test_selection_scalar_and_unflagged_masks_are_conformed():
    # w1 feeds a mean-centering (LayerNorm-like), so it is in no prunable group:
    # the selection gives it a scalar True, and a full mask to the bias, which
    # the default `where` does not enforce.
    def f(p, x):
        h = x @ p["w1"]
        h = h - h.mean(-1, keepdims=True)
        return jax.nn.relu(h @ p["w2"] + p["b2"]) @ p["w3"]

    p = {
        "w1": jnp.ones((3, 4)),
        "w2": jax.random.normal(jax.random.key(0), (4, 6)),
        "b2": jnp.zeros(6),
        "w3": jnp.ones((6, 2)),
    }
    gs = structure.groups(f, p, jnp.ones((2, 3)), prunable_only=True)
    tx = jp.prune(optax.sgd(0.1), sparsity=0.5, scope=structure.selection(gs))
    updates, st = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)
    m = jp.get_masks(st)
    assert bool(jnp.all(m["w1"])) and m["w1"].shape == (3, 4)
    assert m["b2"].shape == () and bool(m["b2"])
    want = structure.select(gs, jp.criteria.magnitude(p), 0.5)
    np.testing.assert_array_equal(m["w2"], want["w2"])
    np.testing.assert_array_equal(m["w3"], want["w3"])
    new = optax.apply_updates(p, updates)
    assert int(jnp.sum(jnp.all(new["w2"] == 0, axis=0))) == 3
    # nm(skip_indivisible=True) leaves a 3-input-channel conv dense with a scalar.
    q = {
        "c": jax.random.normal(jax.random.key(1), (3, 3, 3, 8)),
        "d": jax.random.normal(jax.random.key(2), (3, 3, 8, 8)),
    }
    nm = functools.partial(jp.masks.nm, n=2, m=4, skip_indivisible=True)
    st = jax.jit(jp.prune(optax.sgd(0.1), sparsity=0.5, scope=nm).update)(
        q, jp.prune(optax.sgd(0.1), sparsity=0.5, scope=nm).init(q), q
    )[1]
    assert bool(jnp.all(jp.get_masks(st)["c"]))
    assert float(jp.sparsity(jp.get_masks(st)["d"])) == 0.5


def test_selection_returning_a_wrong_shape_is_named():
    p = _params()

    def bad(scores, sparsity, *, where=None):
        return jax.tree.map(lambda x: jnp.ones(x.shape[:1], bool), scores)

    tx = jp.prune(optax.sgd(0.1), sparsity=0.5, scope=bad)
    with pytest.raises(
        ValueError, match=r"selection returned a mask of shape \(6,\) for a leaf of shape \(6, 4\)"
    ):
        tx.update(p, tx.init(p), p)


def test_usage_errors_name_argument_value_and_fix():
    p = _params()
    with pytest.raises(
        ValueError, match=r"tx must be an optax transformation.*not jp.prune\(optax"
    ):
        jp.prune(optax.adam, sparsity=0.5)
    with pytest.raises(ValueError, match="where must be a predicate .* got True"):
        jp.prune(optax.sgd(0.1), sparsity=0.5, where=True)
    for bad in (True, "0.5"):
        with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\], got"):
            jp.prune(optax.sgd(0.1), sparsity=bad)
    with pytest.raises(ValueError, match=r"key must be a PRNG key, got 3\. Fix"):
        jp.prune(optax.sgd(0.1), sparsity=0.5, criterion=jp.criteria.random, key=3)
    tx = jp.prune(optax.sgd(0.1), sparsity=0.5)
    st = tx.init(p)
    with pytest.raises(ValueError, match=r"updates must have the leaves .* missing in updates: v"):
        tx.update({"w": p["w"]}, st, p)
    with pytest.raises(ValueError, match=r"w: \(6, 8\) vs \(8, 6\)"):
        tx.update({"w": p["w"].T, "v": p["v"]}, st, p)
    tx = jp.prune(optax.sgd(0.1), sparsity=0.5, criterion=lambda params: params["w"])
    with pytest.raises(ValueError, match="the criterion's scores must have the leaves"):
        tx.update(p, tx.init(p), p)
    with pytest.raises(ValueError, match="optax.inject_hyperparams wraps jp.prune"):
        optax.inject_hyperparams(jp.prune)(tx=optax.sgd(0.1), sparsity=0.5).init(p)


def test_layer_scope_refresh_traces_each_leaf_alone():
    # Each leaf's search reads only its own scores: the traced refresh grows
    # linearly with the number of leaves (it was quadratic: 42 s to lower the
    # step of an 80-layer MLP, now 3 s).
    def abs_ops(n_leaves):
        p = {f"l{i}": jnp.ones((8, 8)) for i in range(n_leaves)}
        sched = jp.schedules.polynomial(0.0, 0.5, 0, 10, frequency=2)
        tx = jp.prune(optax.sgd(0.1), sparsity=sched)
        return count(jax.make_jaxpr(tx.update)(p, tx.init(p), p), "abs")

    a4, a8 = abs_ops(4), abs_ops(8)
    assert a8 <= 2 * a4 + 2, (a4, a8)
    # Same masks as the stored-score selection, leaf by leaf.
    p = _params()
    tx = jp.prune(optax.sgd(0.1), sparsity=0.6)
    _, st = jax.jit(tx.update)(p, tx.init(p), p)
    want = jp.masks.topk(jp.criteria.magnitude(p), 0.6)
    for k in p:
        np.testing.assert_array_equal(jp.get_masks(st)[k], want[k])


def test_grads_keyword_of_another_tree_is_named():
    p = _params()
    tx = jp.prune(optax.sgd(0.1), sparsity=0.5, criterion=jp.criteria.saliency)
    with pytest.raises(ValueError, match=r"grads must have the leaves .* missing in grads: v"):
        tx.update(p, tx.init(p), p, grads={"w": p["w"]})


def test_a_scope_returning_masks_of_another_tree_is_named():
    params = {"a": jnp.ones((4, 4)), "b": jnp.ones((4, 4))}

    def scope(scores, sparsity, *, where=None):
        return {"a": jnp.ones((4, 4), bool)}

    tx = jp.prune(optax.sgd(0.1), sparsity=0.5, scope=scope)
    with pytest.raises(
        ValueError, match=r"selection's masks must have exactly the tree .*only in params: b"
    ):
        tx.update(params, tx.init(params), params)


@pytest.mark.parametrize("nested", [True, False], ids=["prune_in_prune", "chained"])
def test_two_prunings_in_one_state_keep_only_what_both_keep(nested):
    params = {
        "w": jax.random.normal(jax.random.key(0), (8, 8)),
        "v": jax.random.normal(jax.random.key(1), (8, 8)),
    }
    first = jp.prune(
        optax.sgd(0.1), sparsity=0.5, criterion=jp.criteria.random, key=jax.random.key(3)
    )
    if nested:
        tx = jp.prune(first, sparsity=0.25)
    else:
        tx = optax.chain(first, jp.prune(optax.identity(), sparsity=0.25))
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, state = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    masks = jp.get_masks(state)
    random_kept = jp.masks.topk(
        jp.criteria.random(params, key=jax.random.fold_in(jax.random.key(3), 0)), 0.5
    )
    magnitude_kept = jp.masks.topk(jp.criteria.magnitude(params), 0.25)
    for k in params:
        # The random criterion's key is the one given, folded with the step (0).
        both = np.asarray(random_kept[k]) & np.asarray(magnitude_kept[k])
        np.testing.assert_array_equal(np.asarray(masks[k]), both)
        assert int((~both).sum()) > 32  # more than either alone prunes
        np.testing.assert_array_equal(np.asarray(new[k]) == 0, ~np.asarray(masks[k]))


def test_a_scope_returning_float_masks_is_refused_when_traced():
    # Under jit a float 0.5 would silently be read as True: the dtype is checked.
    params = {"w": jnp.arange(16.0).reshape(4, 4)}

    def scope(scores, sparsity, *, where=None):
        return jax.tree.map(lambda x: (x > 5).astype(jnp.float32), scores)

    tx = jp.prune(optax.sgd(0.1), sparsity=0.5, scope=scope)
    with pytest.raises(ValueError, match=r"selection returned a mask of dtype float32 .* bool"):
        jax.jit(tx.update)(params, tx.init(params), params)
