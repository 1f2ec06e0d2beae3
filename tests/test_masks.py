"""Selections: exact counts, ties, global scope, `where`, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxprune as jp


def _pruned(m):
    return int(np.sum(~np.broadcast_to(np.asarray(m), np.shape(m))))


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("s", [0.0, 0.1, 0.5, 0.77, 1.0])
def test_topk_exact_count_per_leaf(jit, s, key):
    scores = {"a": jax.random.normal(key, (37, 11)), "b": jax.random.normal(key, (5, 5, 3))}
    f = jax.jit(jp.masks.topk) if jit else jp.masks.topk
    m = f(scores, s)
    for name in scores:
        assert _pruned(m[name]) == round(s * scores[name].size)


def test_topk_keeps_the_highest_scores(key):
    x = jax.random.normal(key, (64, 64))
    m = np.asarray(jp.masks.topk({"x": x}, 0.6)["x"])
    xs = np.asarray(x)
    assert xs[m].min() >= xs[~m].max()


@pytest.mark.parametrize("s", [0.25, 0.5, 0.9])
def test_all_equal_scores_still_exact_and_deterministic(s):
    scores = {"w": jnp.ones((10, 10)), "v": jnp.ones((4, 25))}
    m1 = jp.masks.topk(scores, s)
    m2 = jp.masks.topk(scores, s)
    assert _pruned(m1["w"]) == round(s * 100)
    np.testing.assert_array_equal(m1["w"], m2["w"])
    # Ties go in flatten order: the first entries are pruned.
    flat = np.asarray(m1["w"]).reshape(-1)
    assert not flat[: round(s * 100)].any() and flat[round(s * 100) :].all()
    g = jp.masks.global_topk(scores, s)
    assert _pruned(g["w"]) + _pruned(g["v"]) == round(s * 200)


def test_partial_ties_at_threshold():
    x = jnp.array([[0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 2.0, 3.0]])
    m = np.asarray(jp.masks.topk({"x": x}, 0.5)["x"])
    assert _pruned(m) == 4
    # Both zeros, then the first two ones in flatten order.
    np.testing.assert_array_equal(m, [[False, False, False, False], [True, True, True, True]])


def test_negative_scores_and_infinities():
    x = jnp.array([[-jnp.inf, -3.0, -0.0, 0.0], [2.0, jnp.inf, -1.0, 5.0]])
    m = np.asarray(jp.masks.topk({"x": x}, 0.375)["x"])
    np.testing.assert_array_equal(m, [[False, False, True, True], [True, True, False, True]])


def test_global_topk_crosses_leaves(key):
    k1, k2 = jax.random.split(key)
    scores = {
        "small": jax.random.uniform(k1, (100, 10)),
        "big": 10 + jax.random.uniform(k2, (50, 10)),
    }
    m = jp.masks.global_topk(scores, 0.5)
    assert _pruned(m["small"]) + _pruned(m["big"]) == 750
    assert _pruned(m["big"]) == 0


@pytest.mark.parametrize("n", [1000, 200_001])
def test_global_topk_large_matches_sort(n, key):
    x = jax.random.normal(key, (n,)).reshape(1, -1) ** 3
    for s in (0.01, 0.5, 0.93):
        m = np.asarray(jp.masks.global_topk({"x": x}, s)["x"]).reshape(-1)
        k = round(s * n)
        assert (~m).sum() == k
        order = np.argsort(np.asarray(x).reshape(-1), kind="stable")
        assert set(np.flatnonzero(~m)) == set(order[:k])


def test_global_topk_many_zeros(key):
    # After pruning, many scores are exactly 0 (a big atom): counts stay exact.
    x = jax.random.uniform(key, (300, 300))
    x = jnp.where(x < 0.7, 0.0, x)
    for s in (0.5, 0.69, 0.75, 0.99):
        m = jp.masks.global_topk({"x": x}, s)
        assert _pruned(m["x"]) == round(s * x.size)


_SHAPES = [(7, 3), (40, 3), (1, 3)]
_global = jax.jit(jp.masks.global_topk)
_layer = jax.jit(jp.masks.topk)


@settings(max_examples=30, deadline=None)
@given(st.floats(0.0, 1.0), st.integers(0, 5), st.integers(0, 2**31 - 1))
def test_exact_counts_property(s, n_distinct, seed):
    rng = np.random.default_rng(seed)
    # Few distinct values force many ties; fixed shapes keep it to one compile.
    scores = [
        jnp.asarray(rng.integers(0, n_distinct + 1, size=z).astype(np.float32)) for z in _SHAPES
    ]
    total = sum(x.size for x in scores)
    g = _global(scores, s)
    assert sum(_pruned(m) for m in g) == round(np.float32(s) * total)
    kept = np.concatenate([np.asarray(x)[np.asarray(m)] for x, m in zip(scores, g, strict=True)])
    dropped = np.concatenate(
        [np.asarray(x)[~np.asarray(m)] for x, m in zip(scores, g, strict=True)]
    )
    if kept.size and dropped.size:
        assert kept.min() >= dropped.max()
    layer = _layer(scores, s)
    for x, m in zip(scores, layer, strict=True):
        assert _pruned(m) == round(np.float32(s) * x.size)
    # Idempotent: re-selecting from the masked scores gives the same mask.
    again = _layer([jnp.where(m, x + 1.0, 0.0) for x, m in zip(scores, layer, strict=True)], s)
    for a, b in zip(layer, again, strict=True):
        np.testing.assert_array_equal(a, b)


def test_masks_mirror_params_structure(key):
    params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)}, "step": jnp.int32(0)}
    m = jp.masks.topk(jp.criteria.magnitude(params), 0.5)
    assert jax.tree.structure(m) == jax.tree.structure(params)
    assert m["dense"]["bias"].shape == () and bool(m["dense"]["bias"])
    assert m["dense"]["kernel"].dtype == jnp.bool_


def test_where_selects_leaves(key):
    params = {"a": jnp.ones((4, 4)), "b": jnp.ones((4, 4)), "bias": jnp.ones(4)}
    m = jp.masks.topk(params, 0.5, where=lambda path, x: path[-1] in ("b", "bias"))
    assert m["a"].shape == () and _pruned(m["b"]) == 8 and _pruned(m["bias"]) == 2


def test_per_leaf_sparsity_tree():
    scores = {"a": jnp.arange(10.0).reshape(2, 5), "b": jnp.arange(10.0).reshape(5, 2)}
    m = jp.masks.topk(scores, {"a": 0.2, "b": 0.8})
    assert _pruned(m["a"]) == 2 and _pruned(m["b"]) == 8


def test_traced_sparsity_under_jit():
    scores = {"w": jnp.arange(100.0).reshape(10, 10)}
    f = jax.jit(lambda s: jp.masks.global_topk(scores, s)["w"])
    assert _pruned(f(0.3)) == 30 and _pruned(f(0.55)) == 55


def test_strict_dtype_promotion(strict_promotion):
    scores = {"w": jnp.arange(12.0, dtype=jnp.bfloat16).reshape(3, 4)}
    assert _pruned(jp.masks.topk(scores, 0.5)["w"]) == 6
    assert _pruned(jp.masks.global_topk(scores, 0.5)["w"]) == 6
    p = jp.apply_masks(scores, jp.masks.topk(scores, 0.5))
    assert p["w"].dtype == jnp.bfloat16
    assert float(jp.sparsity(p)) == 0.5


def test_apply_masks_exact_zero_keeps_dtype():
    p = {"w": jnp.array([[1.5, -2.0]], jnp.bfloat16), "b": jnp.ones(2)}
    out = jp.apply_masks(p, {"w": jnp.array([[True, False]]), "b": jnp.bool_(True)})
    assert out["w"].dtype == jnp.bfloat16 and out["w"].tolist() == [[1.5, 0.0]]
    np.testing.assert_array_equal(out["b"], p["b"])


def test_sparsity_of_params_and_masks():
    p = {"w": jnp.array([[0.0, 1.0], [0.0, 2.0]]), "b": jnp.zeros(2)}
    assert float(jp.sparsity(p)) == 0.5
    assert float(jp.sparsity({"w": jnp.array([[True, False], [False, False]])})) == 0.75
    assert float(jp.sparsity(p, where=lambda path, x: True)) == pytest.approx(4 / 6)


# Errors name the argument, the value and the fix.


@pytest.mark.parametrize("bad", [-0.1, 1.5, 90])
def test_sparsity_out_of_range(bad):
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\].*got"):
        jp.masks.topk({"w": jnp.ones((2, 2))}, bad)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\]"):
        jp.masks.global_topk({"w": jnp.ones((2, 2))}, bad)


def test_per_leaf_sparsity_out_of_range_names_leaf():
    with pytest.raises(ValueError, match=r"sparsity\['b'\] must be in \[0, 1\]"):
        jp.masks.topk({"a": jnp.ones((2, 2)), "b": jnp.ones((2, 2))}, {"a": 0.5, "b": 2.0})


def test_masks_tree_mismatch_lists_paths():
    with pytest.raises(ValueError, match=r"only in params: dense/bias.*only in masks: dense/b"):
        jp.apply_masks(
            {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}},
            {"dense": {"kernel": jnp.ones((2, 2), bool), "b": jnp.bool_(True)}},
        )


def test_mask_shape_mismatch():
    with pytest.raises(ValueError, match=r"mask for 'w' has shape \(3,\)"):
        jp.apply_masks({"w": jnp.ones((2, 2))}, {"w": jnp.ones(3, bool)})


def test_where_selecting_non_float_leaf():
    with pytest.raises(ValueError, match=r"where selected leaf 'step' of dtype int32"):
        jp.masks.topk(
            {"w": jnp.ones((2, 2)), "step": jnp.zeros((2, 2), jnp.int32)},
            0.5,
            where=lambda path, x: True,
        )


@pytest.mark.parametrize("shape", [(5, 37), (41, 11), (3, 4, 61), (97,)], ids=str)
def test_prime_length_axes_exact_ties_in_flatten_order(shape):
    # Last axes with no divisor in [8, 32] take the padded / other-axis count paths.
    rng = np.random.default_rng(sum(shape))
    x = rng.integers(0, 3, size=shape).astype(np.float32)
    for s in (0.3, 0.5, 0.9):
        for select in (jp.masks.topk, jp.masks.global_topk):
            m = np.asarray(select({"x": jnp.asarray(x)}, s, where=lambda p, v: True)["x"])
            k = round(s * x.size)
            assert (~m).sum() == k
            # The k pruned are the k first of a stable sort (ties in flatten order).
            order = np.argsort(x.reshape(-1), kind="stable")
            expected = np.ones(x.size, bool)
            expected[order[:k]] = False
            np.testing.assert_array_equal(m.reshape(-1), expected)


def test_a_sparsity_tree_is_matched_by_name_not_position():
    scores = {"a": jnp.arange(10.0).reshape(2, 5), "b": jnp.arange(10.0).reshape(2, 5)}
    with pytest.raises(ValueError, match=r"only in scores: a, b; only in sparsity: 0, 1"):
        jp.masks.topk(scores, [0.9, 0.1])
    with pytest.raises(ValueError, match=r"only in scores: a; only in sparsity: c"):
        jp.masks.topk(scores, {"b": 0.9, "c": 0.1})
    # Same names in another order, or another container, match by name.
    m = jp.masks.topk(scores, {"b": 0.9, "a": 0.1})
    assert (_pruned(m["a"]), _pruned(m["b"])) == (1, 9)


@pytest.mark.parametrize("select", [jp.masks.topk, jp.masks.global_topk])
def test_prunable_leaves_with_no_entries(select):
    scores = {"a": jnp.zeros((0, 4)), "b": jnp.arange(8.0).reshape(2, 4)}
    m = select(scores, 0.5)
    assert m["a"].shape == (0, 4) and _pruned(m["b"]) == 4


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_prune_with_an_empty_leaf(scope):
    import optax

    params = {"a": jnp.zeros((0, 4)), "b": jnp.arange(1.0, 9.0).reshape(2, 4)}
    tx = jp.prune(optax.sgd(0.1), sparsity=0.5, scope=scope)
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), state, params)
    assert _pruned(jp.get_masks(state)["b"]) == 4


_PAIRS = 64  # (s, n) pairs checked in one compiled program per example


@functools.cache
def _counts_program():
    from jaxprune._counts import _round_product

    return jax.jit(jax.vmap(_round_product))


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(0.0, 1.0, width=32),
            st.one_of(st.integers(0, 2**20), st.integers(2**20, 2**31 - 1)),
        ),
        min_size=1,
        max_size=_PAIRS,
    )
)
def test_traced_counts_are_exact(pairs):
    # float32 s * n has 24 significant bits: from ~1M entries it misses by one.
    # 40 examples of up to 64 pairs, padded to 64: one compile for all of them.
    import fractions

    from jaxprune._counts import _count

    ss, ns = zip(*(pairs + [(0.0, 0)] * (_PAIRS - len(pairs))), strict=True)
    got = _counts_program()(jnp.asarray(ss, jnp.float32), jnp.asarray(ns, jnp.uint32))
    for s, n, g in zip(ss, ns, np.asarray(got), strict=True):
        assert int(g) == round(fractions.Fraction(float(np.float32(s))) * n), (s, n)
    # The traced path of _count (a static n, as the selections call it) is the same program.
    s, n = pairs[0]
    assert int(jax.jit(_count, static_argnums=1)(jnp.float32(s), n)) == int(np.asarray(got)[0])


def test_traced_sparsity_prunes_the_exact_count_of_a_large_leaf():
    # round(0.9f * 1572894) = round(1415604.5625) = 1415605; float32 gives 1415604.
    scores = {"w": jnp.asarray(np.random.default_rng(0).random((1572894, 1), np.float32))}
    m = jax.jit(jp.masks.topk)(scores, jnp.float32(0.9))
    assert _pruned(m["w"]) == 1415605


def _greedy_capped(scores: dict, s: float, cap: float) -> dict:
    """Plain numpy: flatten order, stable sort, skip leaves at their cap."""
    names = list(scores)
    flat = np.concatenate([np.asarray(scores[k], np.float32).ravel() for k in names])
    owner = np.repeat(np.arange(len(names)), [scores[k].size for k in names])
    caps = [int(np.floor(round(cap * scores[k].size, 9))) for k in names]
    drop, used = np.zeros(flat.size, bool), [0] * len(names)
    total = min(round(s * flat.size), sum(caps))
    bits = flat.view(np.uint32)  # the library's float order: -0.0 below +0.0
    keys = np.where(bits >= 2**31, ~bits, bits | np.uint32(2**31))
    for i in np.argsort(keys, kind="stable"):
        if drop.sum() == total:
            break
        if used[owner[i]] < caps[owner[i]]:
            used[owner[i]] += 1
            drop[i] = True
    out, start = {}, 0
    for k in names:
        n = scores[k].size
        out[k] = ~drop[start : start + n].reshape(scores[k].shape)
        start += n
    return out


@settings(max_examples=25, deadline=None)
@given(
    s=st.floats(0.0, 1.0, width=32),
    cap=st.sampled_from([0.0, 0.3, 0.5, 0.9, 1.0]),
    ties=st.booleans(),
)
def test_global_topk_with_a_cap_matches_a_greedy_reference(s, cap, ties):
    rng = np.random.default_rng(round(s * 1000))
    scores = {"big": rng.normal(size=(9, 7)), "small": 0.01 * rng.normal(size=(4, 5))}
    if ties:
        scores = {k: np.round(v, 1) for k, v in scores.items()}
    scores = {k: jnp.asarray(v, jnp.float32) for k, v in scores.items()}
    got = _capped_global(scores, s, cap)  # traced sparsity
    want = _greedy_capped(scores, s, cap)
    for k in scores:
        np.testing.assert_array_equal(np.asarray(got[k]), want[k])


_capped_global = jax.jit(
    lambda sc, s, cap: jp.masks.global_topk(sc, s, max_sparsity=cap), static_argnums=2
)


def test_cap_holds_against_a_nan_whose_key_is_the_largest():
    # 0x7FFFFFFF: the one NaN whose ordered key is the key entries past a cap are raised to.
    nan = jax.lax.bitcast_convert_type(jnp.uint32(0x7FFFFFFF), jnp.float32)
    scores = {"a": jnp.array([[1.0, 2.0, 3.0, 4.0]]), "b": jnp.full((1, 2), nan)}
    want = {"a": 2, "b": 1}  # 3 pruned at most: half of each leaf
    got = jp.masks.global_topk(scores, 1.0, max_sparsity=0.5)
    assert {k: _pruned(m) for k, m in got.items()} == want
    got = jax.jit(lambda s: jp.masks.global_topk(s, 1.0, max_sparsity=0.5))(scores)
    assert {k: _pruned(m) for k, m in got.items()} == want
    fused = jax.jit(
        lambda p: jp.masks.fused_select(
            "global", lambda x: x, p, 1.0, [True, True], max_sparsity=0.5
        )
    )(scores)
    assert {k: _pruned(m) for k, m in fused.items()} == want


def test_global_topk_cap_keeps_a_layer_of_small_weights_alive(key):
    params = {"w1": jax.random.normal(key, (20, 30)), "w2": 1e-3 * jnp.ones((30, 10))}
    scores = jp.criteria.magnitude(params)
    assert _pruned(jp.masks.global_topk(scores, 0.5)["w2"]) == 300  # emptied
    m = jp.masks.global_topk(scores, 0.5, max_sparsity=0.9)
    assert _pruned(m["w2"]) == 270 and _pruned(m["w1"]) + 270 == 450  # 50% in total
    # As a jp.prune scope, ramped by a schedule inside the jitted step.
    tx = jp.prune(
        optax.sgd(0.0),
        sparsity=jp.schedules.polynomial(0.0, 0.5, 0, 2),
        scope=functools.partial(jp.masks.global_topk, max_sparsity=0.9),
    )
    state, step = tx.init(params), jax.jit(tx.update)
    for _ in range(3):
        _, state = step(jax.tree.map(jnp.zeros_like, params), state, params)
    assert _pruned(jp.get_masks(state)["w2"]) == 270


@pytest.mark.parametrize("bad", [1.5, -0.1, True, "0.9"])
def test_global_topk_rejects_a_bad_cap(bad):
    with pytest.raises(ValueError, match=r"max_sparsity must be a Python number in \[0, 1\]"):
        jp.masks.global_topk({"w": jnp.ones((4, 4))}, 0.5, max_sparsity=bad)


def test_topk_warns_when_a_sparsity_below_one_empties_a_small_leaf():
    scores = {"small": jnp.arange(10.0).reshape(2, 5), "big": jnp.ones((40, 40))}
    with pytest.warns(UserWarning, match=r"every entry of 'small' \(10 entries at sparsity 0.95"):
        m = jp.masks.topk(scores, 0.95)
    assert not np.asarray(m["small"]).any()  # the count stays exact: round(9.5) = 10
    assert int(np.asarray(m["big"]).sum()) == 1600 - round(0.95 * 1600)
    jp.masks.topk(scores, 1.0)  # asked for: no warning (warnings are errors here)
    jp.masks.topk(scores, 0.9)
    jax.jit(lambda s: jp.masks.topk(scores, s))(0.95)  # a traced sparsity is unknown


@pytest.mark.parametrize("s,n", [(0.1, 5), (0.7, 5), (0.98, 25), (0.35, 10), (0.9, 15)])
def test_prune_with_a_fixed_sparsity_counts_as_python_rounds(s, n):
    # float32(s) * n is just off the half-integer s * n, which Python rounds to
    # even: jp.prune hands the refresh the number itself, not its float32.
    params = {"w": jnp.arange(1.0, n + 1.0).reshape(1, n)}
    zeros = jax.tree.map(jnp.zeros_like, params)
    fixed = (s, jp.schedules.constant(s), jp.schedules.one_shot(s, 0))
    for scope in ("layer", "global"):
        for sparsity in fixed:
            tx = jp.prune(optax.sgd(0.0), sparsity=sparsity, scope=scope)
            _, state = jax.jit(tx.update)(zeros, tx.init(params), params)
            assert int((~jp.get_masks(state)["w"]).sum()) == round(s * n), (scope, sparsity)
    tx = jp.dynamic.ste(optax.sgd(0.0), sparsity=s)
    _, state = jax.jit(tx.update)(zeros, tx.init(params), params)
    assert int((~jp.get_masks(state)["w"]).sum()) == round(s * n)
    # A traced float32 s rounds its own exact product (the documented difference).
    traced = jax.jit(jp.masks.topk)(params, jnp.float32(s))["w"]
    assert int((~traced).sum()) == round(float(jnp.float32(s)) * n)


def test_constant_schedules_compare_by_value():
    assert jp.schedules.constant(0.5) == jp.schedules.constant(0.5)
    assert jp.schedules.constant(0.5) != jp.schedules.constant(0.6)
    assert float(jp.schedules.one_shot(0.7, 3)(3)) == float(jnp.float32(0.7))
