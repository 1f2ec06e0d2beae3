"""structure.select / selection with max_sparsity (no layer collapse) and round_to (widths)."""

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxprune as jp
from jaxprune import structure
from jaxprune.structure.importance import _normalized

SIZES = (20, 12, 7)  # hidden widths: three prunable groups


def _mlp(p, x):
    h = jax.nn.relu(x @ p["w1"] + p["b1"])
    h = jax.nn.relu(h @ p["w2"] + p["b2"])
    h = jax.nn.relu(h @ p["w3"] + p["b3"])
    return h @ p["w4"]


def _params(seed: int = 0, scale2: float = 1.0) -> dict:
    ks = jax.random.split(jax.random.key(seed), 4)
    dims = (5, *SIZES, 3)
    p = {}
    for i in range(4):
        p[f"w{i + 1}"] = jax.random.normal(ks[i], (dims[i], dims[i + 1]))
        if i < 3:
            p[f"b{i + 1}"] = jnp.zeros(dims[i + 1])
    p["w2"] = p["w2"] * scale2  # a layer with small weights: what global selection empties
    return p


GROUPS = structure.groups(_mlp, _params(), jnp.ones((1, 5)), prunable_only=True)
BIASES = ("b1", "b2", "b3")


def _kept(masks) -> list[np.ndarray]:
    return [np.asarray(masks[b]) for b in BIASES]


def _reference(imps, sparsity, scope, max_sparsity, round_to) -> list[np.ndarray]:
    """Plain numpy: stable argsort, greedy skipping of groups at their cap, then rounding."""
    sizes = [len(v) for v in imps]
    caps = [c if max_sparsity is None else math.floor(round(max_sparsity * c, 9)) for c in sizes]
    if scope == "layer":
        drops = [min(round(sparsity * c), cap) for c, cap in zip(sizes, caps, strict=True)]
    else:
        order = np.argsort(np.concatenate(imps), kind="stable")
        owner = np.repeat(np.arange(len(sizes)), sizes)
        total = round(sparsity * sum(sizes))
        drops = [0] * len(sizes)
        for i in order:
            if sum(drops) == total:
                break
            if drops[owner[i]] < caps[owner[i]]:
                drops[owner[i]] += 1
    if round_to is not None:
        drops = [
            c - min(c, -(-(c - d) // round_to) * round_to)
            for c, d in zip(sizes, drops, strict=True)
        ]
    keeps = []
    for v, d in zip(imps, drops, strict=True):
        keep = np.ones(len(v), bool)
        keep[np.argsort(v, kind="stable")[:d]] = False
        keeps.append(keep)
    return keeps


@functools.cache
def _jitted_select(scope, max_sparsity, round_to, normalize):
    def select(scores, sparsity):
        limits = {"scope": scope, "max_sparsity": max_sparsity, "round_to": round_to}
        return structure.select(GROUPS, scores, sparsity, normalize=normalize, **limits)

    return jax.jit(select)  # compiled once per limits, for every example


_group_scores = jax.jit(lambda scores: structure.group_scores(GROUPS, scores))


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize(
    "max_sparsity, round_to, normalize",
    [
        (0.5, None, None),
        (None, 8, None),
        (0.8, 4, "mean"),
        (0.0, 3, None),
        (None, None, "gaussian"),
    ],
)
@settings(max_examples=15, deadline=None)
@given(
    sparsity=st.floats(0.0, 1.0, width=32),  # what a traced sparsity holds
    seed=st.integers(0, 2**16),
    ties=st.booleans(),
)
def test_masks_match_a_numpy_reference(
    scope, max_sparsity, round_to, normalize, sparsity, seed, ties
):
    p = _params(seed % 7, scale2=0.05)
    scores = jp.criteria.magnitude(p)
    if ties:  # equal scores everywhere: counts must stay exact, ties go by index
        scores = jax.tree.map(jnp.ones_like, scores)
    imps = [np.asarray(v) for v in _group_scores(scores)]
    if scope == "global":  # the scaling is tested on its own below
        imps = [np.asarray(_normalized(jnp.asarray(v), normalize)) for v in imps]
    want = _reference(imps, sparsity, scope, max_sparsity, round_to)
    select = _jitted_select(scope, max_sparsity, round_to, normalize)
    got = _kept(select(scores, sparsity))  # traced sparsity, as inside jp.prune
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
    # The members of a group share its decision: w2's rows follow b1, its columns b2.
    masks = select(scores, sparsity)
    np.testing.assert_array_equal(np.asarray(masks["w2"]), np.outer(got[0], got[1]))


def test_global_scope_collapses_a_small_layer_unless_capped():
    scores = jp.criteria.magnitude(_params(0, scale2=0.01))
    with pytest.warns(UserWarning, match=r"removed every channel of 1 group\(s\) .* max_sparsity"):
        free = _kept(structure.select(GROUPS, scores, 0.7, scope="global"))
    assert free[1].sum() == 0  # the layer of small weights: every channel gone
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # capped: nothing to warn about
        capped = _kept(structure.select(GROUPS, scores, 0.7, scope="global", max_sparsity=0.9))
    assert capped[1].sum() == SIZES[1] - math.floor(0.9 * SIZES[1])  # 2 of 12 left
    # The cap moves the remaining pruning to the other groups: still 70% in total.
    assert sum(int((~k).sum()) for k in capped) == round(0.7 * sum(SIZES))


def test_the_total_is_clipped_to_what_the_caps_allow():
    scores = jp.criteria.magnitude(_params(1))
    kept = _kept(structure.select(GROUPS, scores, 1.0, scope="global", max_sparsity=0.5))
    assert [int(k.sum()) for k in kept] == [10, 6, 4]  # ceil(c / 2) kept in each


def test_round_to_keeps_multiples_and_never_prunes_more_than_asked():
    scores = jp.criteria.magnitude(_params(2))
    for s in np.linspace(0.0, 1.0, 21):
        with warnings.catch_warnings():  # high sparsities: a group is emptied (warned)
            warnings.filterwarnings("ignore", "layer selection at sparsity .* every channel")
            plain = _kept(structure.select(GROUPS, scores, float(s)))
            # small sparsities: the rounding undoes a cut (warned)
            warnings.filterwarnings("ignore", "round_to=4 keeps every channel")
            rounded = _kept(structure.select(GROUPS, scores, float(s), round_to=4))
        for c, p, r in zip(SIZES, plain, rounded, strict=True):
            assert r.sum() % 4 == 0 or r.sum() == c
            assert r.sum() >= p.sum() and (r | ~p).all()  # a superset of what was kept


def test_prune_ramps_a_capped_rounded_selection_then_shrinks_to_those_widths():
    p = _params(3, scale2=0.05)
    limits = {"scope": "global", "max_sparsity": 0.75, "round_to": 4}
    sel = structure.selection(GROUPS, **limits)
    sched = jp.schedules.polynomial(0.0, 0.8, begin_step=0, end_step=4, frequency=2)
    tx = jp.prune(optax.sgd(1e-2), sparsity=sched, scope=sel)
    x = jax.random.normal(jax.random.key(9), (16, 5))

    @jax.jit
    def step(p, s):
        g = jax.grad(lambda q: jnp.mean(_mlp(q, x) ** 2))(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    s = tx.init(p)
    for _ in range(4):
        p, s = step(p, s)
    before = p
    p, s = step(p, s)  # step 4: the last refresh, at 80%
    assert step._cache_size() == 1
    masks = jp.get_masks(s)
    want = structure.select(GROUPS, jp.criteria.magnitude(before), 0.8, **limits)
    for k in ("w1", "w2", "w3", "w4"):  # the kernels: jp.prune's default where
        np.testing.assert_array_equal(np.asarray(masks[k]), np.asarray(want[k]))
    kept = [int(np.asarray(masks[k])[0].sum()) for k in ("w1", "w2", "w3")]
    caps = [c - math.floor(0.75 * c) for c in SIZES]
    assert all(k % 4 == 0 or k == c for k, c in zip(kept, SIZES, strict=True)), kept
    assert all(k >= c for k, c in zip(kept, caps, strict=True)), (kept, caps)
    small = jp.shrink(_mlp, p, masks, x)
    assert [small[k].shape[1] for k in ("w1", "w2", "w3")] == kept
    np.testing.assert_allclose(_mlp(small, x), _mlp(jp.apply_masks(p, masks), x), atol=1e-5)


def test_normalizers_scale_each_group_as_documented():
    v = jnp.array([1.0, 2.0, 3.0, 6.0])
    np.testing.assert_allclose(_normalized(v, "mean"), [1 / 3, 2 / 3, 1, 2], rtol=1e-6)
    np.testing.assert_allclose(_normalized(v, "max"), [1 / 6, 1 / 3, 1 / 2, 1], rtol=1e-6)
    np.testing.assert_allclose(_normalized(v, "sum"), [1 / 12, 1 / 6, 1 / 4, 1 / 2], rtol=1e-6)
    z = (np.array([1.0, 2, 3, 6]) - 3) / np.std([1.0, 2, 3, 6])
    np.testing.assert_allclose(_normalized(v, "gaussian"), z, rtol=1e-6)
    # No 0 / 0: a group with no live channel ranks them lowest (-inf), never NaN.
    assert not np.isnan(_normalized(jnp.zeros(3), "gaussian")).any()
    assert np.isfinite(_normalized(jnp.zeros(3), "mean")).all()


def test_normalizing_evens_out_groups_of_different_scales_and_leaves_layer_scope_alone():
    scores = jp.criteria.magnitude(_params(0, scale2=0.01))
    with pytest.warns(UserWarning, match="layer collapse"):
        raw = _kept(structure.select(GROUPS, scores, 0.7, scope="global"))
    mean = _kept(structure.select(GROUPS, scores, 0.7, scope="global", normalize="mean"))
    assert [int(k.sum()) for k in raw] == [5, 0, 7]  # the middle group emptied
    assert [int(k.sum()) for k in mean] == [7, 3, 2]  # each group on its own scale
    for how in ("mean", "gaussian"):
        layer = _kept(structure.select(GROUPS, scores, 0.5, normalize=how))
        for a, b in zip(layer, _kept(structure.select(GROUPS, scores, 0.5)), strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"round_to": 0}, r"round_to must be an int >= 1 .* got 0\. Fix: e\.g\. round_to=8"),
        ({"round_to": 2.5}, r"round_to must be an int >= 1 .* got 2\.5"),
        ({"round_to": True}, r"round_to must be an int >= 1 .* got True"),
        ({"max_sparsity": 1.5}, r"max_sparsity must be a Python number in \[0, 1\] .* got 1\.5"),
        ({"max_sparsity": -0.1}, r"max_sparsity must be .* got -0\.1\. Fix: e\.g\."),
        ({"max_sparsity": jnp.float32(0.5)}, r"max_sparsity must be a Python number"),
        ({"scope": "per-layer"}, r"scope must be 'layer' .*'isomorphic' .*got 'per-layer'\. Fix"),
        ({"normalize": "l2"}, r"normalize must be None or one of 'mean', .* got 'l2'\. Fix"),
    ],
)
def test_bad_limits_are_rejected_by_select_and_selection(kw, match):
    scores = jp.criteria.magnitude(_params())
    with pytest.raises(ValueError, match=match):
        structure.select(GROUPS, scores, 0.5, **kw)
    with pytest.raises(ValueError, match=match):
        structure.selection(GROUPS, **kw)  # at construction, before any training


def test_an_eager_select_compiles_once_for_every_sparsity():
    from jaxprune.structure.evaluate import _jitted
    from jaxprune.structure.importance import _select_impl

    scores = jp.criteria.magnitude(_params(4))
    first = structure.select(GROUPS, scores, 0.25)
    cpu = jax.default_backend() == "cpu"
    program = _jitted(_select_impl, (0, 3, 4, 5, 6, 7, 8, 9), cpu)
    compiled = program._cache_size()
    assert compiled >= 1
    for s in (0.3, 0.5, 0.55):
        kept = [int(k.sum()) for k in _kept(structure.select(GROUPS, scores, s))]
        assert kept == [c - round(s * c) for c in SIZES]  # Python's rounding, as before
    assert program._cache_size() == compiled  # counts are values of one program
    assert [int(k.sum()) for k in _kept(first)] == [15, 9, 5]  # round(0.25 * c) dropped
