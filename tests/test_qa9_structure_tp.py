"""structure.select: normalize= over live channels, and the per-group sparsity message."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune as jp
from jaxprune import structure


def _mlp(p, x):
    return jax.nn.relu(jax.nn.relu(x @ p["w1"]) @ p["w2"]) @ p["w3"]


def _params():
    rng = np.random.default_rng(0)
    shapes = {"w1": (6, 8), "w2": (8, 8), "w3": (8, 3)}
    return {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}


@pytest.mark.parametrize("how", ["mean", "gaussian", "sum"])
def test_normalize_ignores_pruned_channels(how):
    # h1 already lost channels 0-3 (an earlier step); the next global step must rate its
    # survivors as if those channels were gone, not 2x higher (mean over 8 with 4 zeros).
    p = _params()
    gs = structure.groups(_mlp, p, jnp.ones((1, 6)), prunable_only=True)
    masked = dict(p, w1=p["w1"].at[:, :4].set(0), w2=p["w2"].at[:4].set(0))
    scores = jp.criteria.magnitude(masked)
    m = structure.select(gs, scores, 9 / 16, scope="global", normalize=how)
    # Reference: normalize each group over its live channels only, pruned ones lowest.
    ref = []
    for v in structure.group_scores(gs, scores):
        v = np.asarray(v, np.float64)
        a = v > 0
        z = {
            "mean": v[a] / v[a].mean(),
            "sum": v[a] / v[a].sum(),
            "gaussian": (v[a] - v[a].mean()) / v[a].std(),
        }[how]
        t = np.full(v.shape, -np.inf)
        t[a] = z
        ref.append(t)
    cat = np.concatenate(ref)
    keep = np.ones(16, bool)
    keep[np.argsort(cat, kind="stable")[:9]] = False
    got = np.concatenate([np.asarray(m["w1"][0]), np.asarray(m["w3"][:, 0])])
    np.testing.assert_array_equal(got, keep)
    assert not got[:4].any()  # the pruned channels stay pruned
    if how == "mean":
        assert got[:8].sum() == 2 and got[8:].sum() == 5  # was 4 + 3


def test_normalize_unchanged_without_pruned_channels():
    # One-shot (no zero channel): the live statistic is the plain one.
    p = _params()
    gs = structure.groups(_mlp, p, jnp.ones((1, 6)), prunable_only=True)
    scores = jp.criteria.magnitude(p)
    imps = [np.asarray(v) for v in structure.group_scores(gs, scores)]
    cat = np.concatenate([v / v.mean() for v in imps])
    keep = np.ones(16, bool)
    keep[np.argsort(cat, kind="stable")[:7]] = False
    m = structure.select(gs, scores, 7 / 16, scope="global", normalize="mean")
    got = np.concatenate([np.asarray(m["w1"][0]), np.asarray(m["w3"][:, 0])])
    np.testing.assert_array_equal(got, keep)


def test_normalize_group_with_no_live_channel():
    # A group already fully pruned: no division by zero, and its channels stay the lowest.
    p = _params()
    gs = structure.groups(_mlp, p, jnp.ones((1, 6)), prunable_only=True)
    masked = dict(p, w1=p["w1"] * 0, w2=p["w2"] * 0)
    for how in ("mean", "gaussian", "sum", "max"):
        with pytest.warns(UserWarning, match="layer collapse"):  # h1 has no channel left
            m = structure.select(
                gs, jp.criteria.magnitude(masked), 0.5, scope="global", normalize=how
            )
        assert not np.asarray(m["w1"]).any() and np.asarray(m["w3"][:, 0]).all()


@pytest.mark.parametrize(
    "sparsity", [{"w1": 0.5, "w2": 0.25, "w3": 0.0}, [0.5, 0.25], np.array([0.5, 0.25])]
)
def test_select_tree_sparsity_message(sparsity):
    p = _params()
    gs = structure.groups(_mlp, p, jnp.ones((1, 6)), prunable_only=True)
    with pytest.raises(ValueError, match="one number") as e:
        structure.select(gs, jp.criteria.magnitude(p), sparsity)
    msg = str(e.value)
    assert "tree of them" not in msg and "Fix:" in msg and "logical_and" in msg


def test_select_per_group_via_subsets():
    # The documented way to get per-group ratios.
    p = _params()
    gs = structure.groups(_mlp, p, jnp.ones((1, 6)), prunable_only=True)
    sc = jp.criteria.magnitude(p)
    m = jax.tree.map(
        jnp.logical_and, structure.select(gs[:1], sc, 0.5), structure.select(gs[1:], sc, 0.25)
    )
    assert int(m["w1"][0].sum()) == 4 and int(m["w3"][:, 0].sum()) == 6
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        structure.select(gs, sc, 1.5)
