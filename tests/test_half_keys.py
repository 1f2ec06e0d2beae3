"""16-bit scores are searched on 16-bit keys: the same masks as their float32 values give.

Every bfloat16 and float16 value is exactly a float32, so a selection of
16-bit scores must prune exactly what the selection of the same scores cast
to float32 prunes (that path is the reference here), ties by flatten order
included, while its search runs on 16-bit keys (``jaxprune._keys._keys_as``).
"""

import functools
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune as jp
from jaxprune import _keys
from tests.test_sharding import _run

HALF = [jnp.bfloat16, jnp.float16]


def _all_patterns(dtype):
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    return jax.lax.bitcast_convert_type(jnp.asarray(bits), dtype)


@pytest.mark.parametrize("dtype", HALF)
def test_16_bit_keys_rank_every_pattern_as_float32_keys_do(dtype):
    x = _all_patterns(dtype)
    half = _keys._half_of([x.dtype])
    assert half == jnp.dtype(dtype)
    k16 = np.asarray(_keys._keys_as(x, half))
    k32 = np.asarray(jp.masks.ordered_keys(x.astype(jnp.float32)))
    assert k16.dtype == np.uint32 and k16.max() < (1 << 16)
    nan = np.isnan(np.asarray(x.astype(jnp.float32)))
    # Finite values and infinities: the same order and the same ties (only
    # +0.0 and -0.0 are distinct 16-bit patterns of equal value, and both key
    # spaces rank -0.0 just below +0.0).
    _, rank16 = np.unique(k16[~nan], return_inverse=True)
    _, rank32 = np.unique(k32[~nan], return_inverse=True)
    np.testing.assert_array_equal(rank16, rank32)
    assert len(np.unique(k16[~nan])) == int((~nan).sum())  # injective: no new ties
    # Every NaN, whatever its sign, ranks above +inf, as in ordered_keys.
    top = k16[~nan].max()
    assert int(top) == int(_keys._keys_as(jnp.asarray([jnp.inf], dtype), half)[0])
    assert (k16[nan] > top).all()


def test_a_pool_takes_16_bit_keys_only_when_every_score_shares_one_16_bit_dtype():
    assert _keys._half_of([jnp.bfloat16, jnp.bfloat16]) == jnp.dtype(jnp.bfloat16)
    assert _keys._half_of([jnp.float16]) == jnp.dtype(jnp.float16)
    assert _keys._half_of([jnp.bfloat16, jnp.float16]) is None
    assert _keys._half_of([jnp.bfloat16, jnp.float32]) is None
    assert _keys._half_of([jnp.float32]) is None
    assert _keys._half_of([]) is None
    with pytest.raises(TypeError, match="16-bit keys of bfloat16 scores got a float16 array"):
        _keys._keys_as(jnp.ones(3, jnp.float16), jnp.dtype(jnp.bfloat16))


def _scores(key, shape, dtype, levels):
    """Scores with many exact ties (``levels`` distinct magnitudes), signed zeros and infs."""
    k1, k2, k3 = jax.random.split(key, 3)
    x = jax.random.randint(k1, shape, 0, levels).astype(jnp.float32) / 4
    x = x * jnp.where(jax.random.bernoulli(k2, 0.5, shape), -1.0, 1.0)  # -0.0 among them
    special = jax.random.randint(k3, shape, 0, 200)
    x = jnp.where(special == 0, jnp.inf, jnp.where(special == 1, -jnp.inf, x))
    return x.astype(dtype)


def _tree(dtype, *, seed=0, big=False, mixed=None):
    """Three leaves, one past the exact search's sampling size when ``big``."""
    keys = jax.random.split(jax.random.key(seed), 3)
    shapes = [(300, 300) if big else (24, 20), (17, 31), (5, 3, 8)]
    dtypes = [dtype, mixed or dtype, dtype]
    levels = [9, 700, 3]
    return {
        f"w{i}": _scores(k, s, d, lv)
        for i, (k, s, d, lv) in enumerate(zip(keys, shapes, dtypes, levels, strict=True))
    }


def _f32(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


def _assert_same(got, want):
    for path, g in jax.tree_util.tree_leaves_with_path(got):
        w = functools.reduce(lambda t, k: t[k.key], path, want)
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=str(path))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("big", [False, True])
@pytest.mark.parametrize("mixed", [None, jnp.float32, "other"])
def test_topk_and_global_topk_of_16_bit_scores_match_their_float32_values(dtype, big, mixed):
    if mixed == "other":
        mixed = jnp.float16 if dtype == jnp.bfloat16 else jnp.bfloat16
    s = _tree(dtype, big=big, mixed=mixed)
    for sparsity in (0.0, 1e-5, 0.37, 0.5, 0.91, 0.99999, 1.0):
        # The extremes prune 1 and all but 1 of a large pool (the exact search's
        # fallback from its sample's bracket); per leaf they round to 0 and all.
        if 0.01 < sparsity < 0.99:
            _assert_same(jp.masks.topk(s, sparsity), jp.masks.topk(_f32(s), sparsity))
        got = jp.masks.global_topk(s, sparsity)
        _assert_same(got, jp.masks.global_topk(_f32(s), sparsity))
        n = sum(x.size for x in jax.tree.leaves(s))
        assert sum(int((~m).sum()) for m in jax.tree.leaves(got)) == round(sparsity * n)
        capped = functools.partial(jp.masks.global_topk, max_sparsity=0.8)
        _assert_same(capped(s, sparsity), capped(_f32(s), sparsity))


@pytest.mark.parametrize(("dtype", "mixed"), [(jnp.bfloat16, None), (jnp.float16, jnp.float32)])
def test_fused_select_of_16_bit_scores_matches_their_float32_values(dtype, mixed):
    """The train step's fused searches, whole-tree and per-leaf, capped or not.

    With a mixed pool the capped global search's per-leaf cuts must be made
    in the pool's (float32) key space, not in their own leaf's 16-bit one.
    """
    s = _tree(dtype, seed=1, big=True, mixed=mixed)
    flags = [True] * 3
    leaf_srcs = list(s.values())

    @functools.partial(jax.jit, static_argnums=(0, 2, 3))
    def select(scope, tree, per_leaf, cap, sparsity):
        srcs = list(tree.values()) if per_leaf else None
        return jp.masks.fused_select(
            scope, jp.criteria.magnitude, tree, sparsity, flags, leaf_srcs=srcs, max_sparsity=cap
        )

    assert len(leaf_srcs) == 3
    for scope, cap in (("layer", None), ("global", None), ("global", 0.6)):
        for per_leaf in (False, True):
            for sparsity in (0.3, 0.75):
                got = select(scope, s, per_leaf, cap, sparsity)
                want = select(scope, _f32(s), per_leaf, cap, sparsity)
                _assert_same(got, want)


@pytest.mark.parametrize("dtype", HALF)
def test_stacked_selections_of_16_bit_scores_match_their_float32_values(dtype):
    s = {"stack": _scores(jax.random.key(3), (4, 30, 20), dtype, 5), "w": _tree(dtype)["w1"]}

    def stacked(path, x):
        return jnp.ndim(x) == 3

    for select in (
        jp.masks.per_layer(jp.masks.topk, stacked=stacked),
        jp.masks.per_layer(
            functools.partial(jp.masks.global_topk, max_sparsity=0.7), stacked=stacked
        ),
    ):
        for sparsity in (0.4, 0.9):
            _assert_same(select(s, sparsity), select(_f32(s), sparsity))


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_prune_of_bfloat16_params_keeps_exact_counts(scope):
    """A bfloat16 model's refresh (stored 16-bit scores) prunes the scheduled count exactly."""
    params = _tree(jnp.bfloat16, seed=4)
    params = jax.tree.map(lambda x: jnp.where(jnp.isfinite(x), x, 0), params)
    tx = jp.prune(optax.sgd(0.1), sparsity=0.6, scope=scope)
    state = tx.init(params)
    _, state = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), state, params)
    select = jp.masks.topk if scope == "layer" else jp.masks.global_topk
    want = select(jp.criteria.magnitude(_f32(params)), 0.6)
    _assert_same(
        jax.tree.map(lambda m, p: jnp.broadcast_to(m, p.shape), jp.get_masks(state), params), want
    )
    n = sum(x.size for x in jax.tree.leaves(params))
    pruned = sum(int((~m).sum()) for m in jax.tree.leaves(want))
    assert pruned == (
        round(0.6 * n)
        if scope == "global"
        else sum(round(0.6 * x.size) for x in jax.tree.leaves(params))
    )


_SHARDED = textwrap.dedent(
    r"""
    import functools, json, jax, jax.numpy as jnp, numpy as np
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
    import jaxprune as jp

    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    k1, k2 = jax.random.split(jax.random.key(0))
    tied = jnp.round(jax.random.normal(k1, (512, 256)) * 4) / 4
    host = {"a": np.asarray(tied.astype(jnp.bfloat16)),
            "b": np.asarray(jax.random.normal(k2, (256, 128)).astype(jnp.bfloat16))}
    specs = {"a": P("data", "model"), "b": P("model", None)}
    sharded = {n: jax.device_put(host[n], NamedSharding(mesh, specs[n])) for n in host}
    f32 = {n: jnp.asarray(host[n]).astype(jnp.float32) for n in host}
    selections = {"layer": jp.masks.topk, "global": jp.masks.global_topk,
                  "cap": functools.partial(jp.masks.global_topk, max_sparsity=0.7)}
    out = {}
    with jax.sharding.set_mesh(mesh):
        for name, select in selections.items():
            want = select(f32, 0.8)
            for mode, got in (("eager", select(sharded, 0.8)),
                              ("jit", jax.jit(lambda s: select(s, 0.8))(sharded))):
                out[f"{name}_{mode}"] = all(
                    np.array_equal(np.asarray(got[n]), np.asarray(want[n])) for n in host)
                out[f"{name}_{mode}_spec"] = [str(got[n].sharding.spec) for n in host]
    print("RESULT " + json.dumps(out))
    """
)


def test_16_bit_selections_on_an_explicit_mesh_match_their_float32_values_and_stay_sharded():
    out = _run(_SHARDED)  # 8 CPU devices (XLA_FLAGS set for the child process)
    for name in ("layer", "global", "cap"):
        for mode in ("eager", "jit"):
            assert out[f"{name}_{mode}"], (name, mode)
            assert out[f"{name}_{mode}_spec"] == ["P('data', 'model')", "P('model', None)"]
