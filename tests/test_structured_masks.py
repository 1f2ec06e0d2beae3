"""Structured selections: slices, patterns, N:M, blocks — exact counts, invariants, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxprune as jp
from tests._invariants import check_transform


def _params(key=0):
    k1, k2, k3 = jax.random.split(jax.random.key(key), 3)
    return {
        "conv": {"kernel": jax.random.normal(k1, (3, 3, 4, 8)), "bias": jnp.ones(8)},
        "dense": {"kernel": jax.random.normal(k2, (16, 6)), "bias": jnp.ones(6)},
        "out": {"kernel": jax.random.normal(k3, (6, 4))},
    }


@pytest.mark.parametrize("reduce", ["l2", "l1", "mean", "max"])
def test_structured_drops_whole_output_slices_with_exact_counts(reduce):
    scores = jp.criteria.magnitude(_params())
    m = jax.jit(lambda sc: jp.masks.structured(sc, 0.5, axes=-1, reduce=reduce))(scores)
    for path, n_out in (("conv", 8), ("dense", 6), ("out", 4)):
        k = np.asarray(m[path]["kernel"])
        cols = k.reshape(-1, n_out)
        assert (cols.all(0) | ~cols.any(0)).all(), "a slice is only partly kept"
        assert (~cols.any(0)).sum() == round(0.5 * n_out)
    assert m["conv"]["bias"].shape == () and bool(m["conv"]["bias"])


def test_structured_ranks_by_the_chosen_reduction():
    w = jnp.array([[3.0, 1.0, 1.0], [0.0, 1.0, 1.5]])  # l1: 3, 2, 2.5; max: 3, 1, 1.5
    assert jp.masks.structured({"w": w}, 1 / 3, axes=-1, reduce="l1")["w"][0].tolist() == [
        True,
        False,
        True,
    ]
    assert jp.masks.structured({"w": w}, 2 / 3, axes=-1, reduce="max")["w"][0].tolist() == [
        True,
        False,
        False,
    ]


def test_structured_input_channels_and_whole_kernels():
    scores = jp.criteria.magnitude(_params())["conv"]
    sel = jax.jit(
        lambda sc, axes: jp.masks.structured(sc, 0.25, axes=axes)["kernel"], static_argnums=1
    )
    m = sel(scores, -2)
    dropped_in = (~np.asarray(m).any(axis=(0, 1, 3))).sum()
    assert dropped_in == 1
    k = np.asarray(sel(scores, (-2, -1)))
    per_kernel = k.reshape(9, -1)
    assert (per_kernel.all(0) | ~per_kernel.any(0)).all()
    assert (~per_kernel.any(0)).sum() == round(0.25 * 32)


def test_structured_global_scope_and_per_leaf_tree_and_callable_axes():
    scores = {"a": jnp.ones((4, 4)), "b": 2 * jnp.ones((4, 4))}
    with pytest.warns(UserWarning, match=r"dropped all slices of 1 leaf.*layer collapse"):
        m = jp.masks.structured(scores, 0.5, axes=-1, scope="global")
    assert int(m["a"].any(0).sum()) == 0 and int(m["b"].any(0).sum()) == 4
    m = jp.masks.structured(scores, {"a": 0.25, "b": 0.75}, axes=-1)
    assert int(m["a"].any(0).sum()) == 3 and int(m["b"].any(0).sum()) == 1
    m = jp.masks.structured(scores, 0.5, axes=lambda path, x: 0 if path == ("a",) else 1)
    assert int(m["a"].any(1).sum()) == 2 and int(m["b"].any(0).sum()) == 2


def test_structured_traced_sparsity_under_jit():
    scores = jp.criteria.magnitude(_params())
    f = jax.jit(lambda s: jp.masks.structured(scores, s, axes=-1))
    for s in (0.0, 0.5, 1.0):
        cols = np.asarray(f(s)["dense"]["kernel"]).any(0)
        assert (~cols).sum() == round(s * 6)


_structured_cols = jax.jit(lambda w, s: jp.masks.structured({"w": w}, s, axes=-1)["w"])


@settings(max_examples=20, deadline=None)
@given(
    shape=st.sampled_from([(3, 5), (2, 9)]),
    s=st.floats(0.0, 1.0, width=32),  # what a traced sparsity holds
    seed=st.integers(0, 2**16),
)
def test_structured_exact_count_property(shape, s, seed):
    w = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    m = np.asarray(_structured_cols(w, s))
    assert (m.all(0) | ~m.any(0)).all()
    assert (~m.any(0)).sum() == round(s * shape[1])


def test_structured_as_scope_of_prune_goes_through_invariants():
    sched = jp.schedules.polynomial(0.0, 0.5, begin_step=0, end_step=4, frequency=2)
    check_transform(
        lambda inner: jp.prune(
            inner, sparsity=sched, scope=functools.partial(jp.masks.structured, axes=-1)
        )
    )


def test_structured_errors():
    scores = {"w": jnp.ones((2, 3))}
    with pytest.raises(ValueError, match="reduce must be one of"):
        jp.masks.structured(scores, 0.5, reduce="l7")
    with pytest.raises(ValueError, match=r"axes=\(5,\) is out of range for leaf 'w'"):
        jp.masks.structured(scores, 0.5, axes=5)
    with pytest.raises(ValueError, match="names the same axis twice"):
        jp.masks.structured(scores, 0.5, axes=(0, -2))
    with pytest.raises(ValueError, match="scope must be 'layer'"):
        jp.masks.structured(scores, 0.5, scope="everything")
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\]"):
        jp.masks.structured(scores, 50)


# ---- N:M --------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(1, 2))
def _nm(w, n, m):
    return jp.masks.nm({"w": w}, n=n, m=m)["w"]


@settings(max_examples=20, deadline=None)
@given(nm=st.sampled_from([(1, 2), (2, 4), (4, 8)]), seed=st.integers(0, 2**16))
def test_nm_keeps_exactly_n_of_every_m_and_the_largest(nm, seed):
    n, m = nm
    groups, cols = 3, 2
    scores = np.abs(np.random.default_rng(seed).normal(size=(groups * m, cols))).astype(np.float32)
    keep = np.asarray(_nm(scores, n, m))
    g = keep.reshape(groups, m, cols)
    assert (g.sum(1) == n).all()
    sc = scores.reshape(groups, m, cols)
    kept_min = np.where(g, sc, np.inf).min(1)
    dropped_max = np.where(~g, sc, -np.inf).max(1)
    assert (kept_min >= dropped_max).all()
    again = np.asarray(_nm(scores * keep, n, m))
    assert (again == keep).all(), "re-masking is not idempotent"


def test_nm_on_conv_reduction_axis_and_schedule_ramp():
    k = jnp.abs(jax.random.normal(jax.random.key(1), (3, 3, 8, 4)))
    m = np.asarray(jp.masks.nm({"k": k}, n=2, m=4)["k"])
    assert (m.reshape(3, 3, 2, 4, 4).sum(3) == 2).all()
    f = jax.jit(lambda s: jp.masks.nm({"k": k}, s, n=2, m=4)["k"])
    kept = [int(np.asarray(f(s)).reshape(3, 3, 2, 4, 4).sum(3).max()) for s in (0.0, 0.25, 0.9)]
    assert kept == [4, 3, 2]  # 0.9 * 4 rounds to 4 dropped, capped at m - n = 2
    assert int(np.asarray(jp.masks.nm({"k": k}, 0.5, n=None, m=4)["k"]).sum()) == k.size // 2


def test_nm_errors_and_skip():
    scores = {"layer": {"w": jnp.ones((6, 3))}}
    msg = r"leaf 'layer/w' has shape \(6, 3\).*not divisible by m=4"
    with pytest.raises(ValueError, match=msg):
        jp.masks.nm(scores, n=2, m=4)
    m = jp.masks.nm(scores, n=2, m=4, skip_indivisible=True)
    assert m["layer"]["w"].shape == () and bool(m["layer"]["w"])
    with pytest.raises(ValueError, match="n must be an int in"):
        jp.masks.nm(scores, n=5, m=4)
    with pytest.raises(ValueError, match="m must be a positive int"):
        jp.masks.nm(scores, n=1, m=0)
    with pytest.raises(ValueError, match="nm needs n"):
        jp.masks.nm(scores, n=None)
    with pytest.raises(ValueError, match="axis=3 is out of range"):
        jp.masks.nm(scores, n=1, m=2, axis=3)
    with pytest.raises(ValueError, match="nm takes one sparsity for every leaf"):
        jp.masks.nm(scores, {"layer": {"w": 0.5}}, n=None)  # said "or a tree of them"


def test_nm_refuses_a_default_axis_on_attention_kernels_and_takes_one_per_leaf():
    # An attention kernel [in, heads, head_dim]: axis -2 is the heads, not the inputs.
    # It was silently grouped across heads (a unit kept 0 to 3 of every 4 inputs).
    rng = np.random.default_rng(0)
    s = {"q": jnp.asarray(rng.random((8, 4, 4)), jnp.float32), "d": jnp.ones((8, 6))}
    with pytest.raises(ValueError, match=r"leaf 'q' has shape \(8, 4, 4\) \(3 axes\).*axis="):
        jp.masks.nm(s, n=2, m=4)
    m = jp.masks.nm(s, n=2, m=4, axis=lambda p, x: 0 if x.ndim == 3 else -2)
    q = np.asarray(m["q"]).reshape(2, 4, 16)  # groups of 4 consecutive inputs, per unit
    assert (q.sum(1) == 2).all()
    assert (np.asarray(m["d"]).reshape(2, 4, 6).sum(1) == 2).all()
    np.testing.assert_array_equal(  # the same as the Dense view of the same weights
        np.asarray(m["q"]).reshape(8, 16),
        np.asarray(jp.masks.nm({"k": s["q"].reshape(8, 16)}, n=2, m=4)["k"]),
    )
    with pytest.raises(ValueError, match="axis must be an int or a function"):
        jp.masks.nm(s, n=2, m=4, axis="in")


# ---- patterns ----------------------------------------------------------------------------


_patterns = jax.jit(lambda k, s: jp.masks.patterns({"k": k}, s)["k"])


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), s=st.sampled_from([0.0, 0.25, 0.5]))
def test_patterns_every_kernel_is_its_best_library_pattern(seed, s):
    k = np.abs(np.random.default_rng(seed).normal(size=(3, 3, 4, 2))).astype(np.float32)
    lib = jp.masks.pattern_library()
    m = np.asarray(_patterns(k, s))
    per = m.reshape(9, 8).T  # one row per kernel
    flat_lib = lib.reshape(len(lib), 9)
    sc = np.asarray(k).reshape(9, 8).T
    dropped = 0
    for row, score in zip(per, sc, strict=True):
        if not row.any():
            dropped += 1
            continue
        assert any((row == p).all() for p in flat_lib), "kept entries are not a library pattern"
        assert np.isclose((score * row).sum(), (flat_lib @ score).max(), rtol=1e-6)
    assert dropped == round(s * 8)


def test_patterns_custom_library_default_where_and_errors():
    lib = np.zeros((2, 3, 3), bool)
    lib[0, 0, :] = True
    lib[1, :, 0] = True
    params = {
        "conv": jnp.ones((3, 3, 2, 2)),
        "dense": jnp.ones((4, 4)),
        "pw": jnp.ones((1, 1, 2, 2)),
    }
    m = jp.masks.patterns(params, library=lib)
    assert np.asarray(m["conv"]).sum(axis=(0, 1)).tolist() == [[3, 3], [3, 3]]
    assert m["dense"].shape == () and m["pw"].shape == ()
    assert jp.masks.pattern_library((5, 5), 2).shape == (24, 5, 5)
    # `where` narrows; a 1 x 1 conv or a Dense kernel it selects is left alone, as
    # jp.prune's own default `where` selects them (this was an error inside jp.prune).
    m = jp.masks.patterns(params, where=lambda p, x: p in (("pw",), ("dense",)))
    assert m["pw"].shape == () and m["dense"].shape == () and m["conv"].shape == ()
    tx = jp.prune(optax.sgd(0.1), sparsity=0.5, scope=jp.masks.patterns)
    state = tx.init(params)
    jax.jit(tx.update)(params, state, params)  # the first update refreshes the masks
    got = jp.get_masks(jax.jit(tx.update)(params, state, params)[1])
    assert np.asarray(got["conv"]).sum() == 4 * 2  # half the 4 kernels dropped, 4 entries each
    assert bool(np.all(got["dense"])) and bool(np.all(got["pw"]))
    with pytest.raises(ValueError, match="library must be a bool array"):
        jp.masks.patterns(params, library=np.ones((3, 3)))
    with pytest.raises(ValueError, match="n must be in"):
        jp.masks.pattern_library((3, 3), 10)
    # A 5 x 5 conv is left dense by the 3 x 3 default, loudly; 1 x 1 convs quietly.
    with pytest.warns(UserWarning, match=r"left these conv kernels dense.*\['k5 \(5, 5\)'\]"):
        m = jp.masks.patterns({**params, "k5": jnp.ones((5, 5, 2, 2))})
    assert m["k5"].shape == () and m["conv"].shape == (3, 3, 2, 2)
    m = jp.masks.patterns(
        {"k5": jnp.ones((5, 5, 2, 2))}, library=jp.masks.pattern_library((5, 5), 4)
    )
    assert np.asarray(m["k5"]).sum(axis=(0, 1)).tolist() == [[4, 4], [4, 4]]


# ---- blocks ------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(2, 3))
def _blocks(w, s, block, pool):
    return jp.masks.blocks({"w": w}, s, block=block, pool=pool)["w"]


@settings(max_examples=15, deadline=None)
@given(
    block=st.sampled_from([(1, 4), (4, 1), (8, 8)]),
    pool=st.sampled_from(["avg", "max"]),
    s=st.floats(0.0, 1.0, width=32),
    seed=st.integers(0, 2**16),
)
def test_blocks_drop_whole_blocks_with_exact_counts(block, pool, s, seed):
    shape = (5, 7)  # overhanging edge blocks for every block shape
    w = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    m = np.asarray(_blocks(w, s, block, pool))
    nb = [-(-d // b) for d, b in zip(shape, block, strict=True)]
    dropped = 0
    for i in range(nb[0]):
        for j in range(nb[1]):
            tile = m[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]]
            assert tile.all() or not tile.any()
            dropped += not tile.any()
    assert dropped == round(s * nb[0] * nb[1])


def test_blocks_errors():
    with pytest.raises(ValueError, match="block must be a non-empty tuple"):
        jp.masks.blocks({"w": jnp.ones((4, 4))}, 0.5, block=(0, 4))
    with pytest.raises(ValueError, match="pool must be 'avg' or 'max'"):
        jp.masks.blocks({"w": jnp.ones((4, 4))}, 0.5, pool="median")
    with pytest.raises(ValueError, match=r"leaf 'w' of shape \(4, 4\) has fewer axes than"):
        jp.masks.blocks({"w": jnp.ones((4, 4))}, 0.5, block=(2, 2, 2))
