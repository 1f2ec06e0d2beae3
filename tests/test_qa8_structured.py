"""QA round 8, structured sparsity kinds: depthwise single slices, signed scores under
norms, nm's default axis, a cap for global structured / block selection, patterns on
1-D and 3-D convs, layouts in the docs, and argument validation."""

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune as jp

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs" / "structured.md"


def _abs_normal(key, shape):
    return jnp.abs(jax.random.normal(key, shape)) + 0.01


# -- #2: a leaf with a single slice along `axes` ------------------------------------


def test_structured_leaves_a_depthwise_kernel_dense_under_input_channel_pruning(key):
    k1, k2 = jax.random.split(key)
    scores = {"dw": _abs_normal(k1, (3, 3, 1, 8)), "conv": _abs_normal(k2, (3, 3, 4, 8))}
    # Before: round(0.6 * 1) = 1 slice dropped, so the depthwise kernel was all False.
    with pytest.warns(UserWarning, match=r"left 1 leaf/leaves dense.*dw \(3, 3, 1, 8\).*axes=-1"):
        m = jp.masks.structured(scores, 0.6, axes=-2)
    assert m["dw"].shape == (3, 3, 1, 8) and bool(m["dw"].all())
    assert int((~m["conv"].any((0, 1, 3))).sum()) == round(0.6 * 4)  # the others as before
    # Under jit (traced sparsity) too: the shape decides, not the value.
    with pytest.warns(UserWarning, match=r"dw \(3, 3, 1, 8\)"):
        mj = jax.jit(lambda s: jp.masks.structured(scores, s, axes=-2))(0.6)
    assert bool(mj["dw"].all())
    # A Dense head with one output unit under axes=-1, in a global ranking as well.
    head = {"fc": _abs_normal(k1, (16, 8)), "head": jnp.full((8, 1), 1e-3)}
    with pytest.warns(UserWarning, match=r"head \(8, 1\)"):
        mg = jp.masks.structured(head, 0.5, axes=-1, scope="global")
    assert bool(mg["head"].all()) and int((~mg["fc"].any(0)).sum()) == round(0.5 * 8)


def test_structured_global_whole_leaf_ranking_and_where_stay_silent(key):
    # axes=() with scope="global" ranks whole leaves (every leaf is one slice): no warning.
    scores = {"a": jnp.ones((4, 4)), "b": 2 * jnp.ones((4, 4)), "c": 3 * jnp.ones((2, 2))}
    m = jp.masks.structured(scores, 1 / 3, axes=(), scope="global")
    assert [bool(m[k].any()) for k in "abc"] == [False, True, True]
    # where= leaving the depthwise kernel out silences the warning.
    dw = {"dw": jnp.ones((3, 3, 1, 8)), "conv": jnp.ones((3, 3, 4, 8))}
    m = jp.masks.structured(dw, 0.5, axes=-2, where=lambda p, x: x.shape[-2] > 1)
    assert jnp.shape(m["dw"]) == () and int((~m["conv"].any((0, 1, 3))).sum()) == 2


def test_structured_and_blocks_warn_when_a_per_leaf_count_rounds_to_the_whole_leaf(key):
    w = {"w": _abs_normal(key, (4, 2))}
    with pytest.warns(UserWarning, match=r"drops all slices of 1 leaf.*w \(2 slices\)"):
        m = jp.masks.structured(w, 0.75, axes=-1)  # round(1.5) == 2
    assert not bool(m["w"].any())
    with pytest.warns(UserWarning, match=r"blocks at sparsity 0.8 drops all blocks"):
        jp.masks.blocks({"w": _abs_normal(key, (4, 8))}, 0.8, block=(4, 4))  # round(1.6) == 2
    jp.masks.structured(w, 1.0, axes=-1)  # asked for: no warning
    jp.masks.structured(w, 0.5, axes=-1)


# -- #3: signed scores under the norm reductions -----------------------------------


def test_structured_warns_once_on_signed_scores_under_a_norm(key):
    scores = {"w": jnp.array([[-5.0, -0.1, 0.1, 5.0]] * 8), "v": -jnp.ones((4, 4))}
    with pytest.warns(UserWarning, match=r"negative values.*reduce='mean'") as rec:
        m = jp.masks.structured(scores, 0.5, axes=-1)
    assert len([r for r in rec if "negative values" in str(r.message)]) == 1  # once per call
    assert "['v', 'w']" in str(rec[0].message)
    with pytest.warns(UserWarning, match=r"structured\(reduce='l1'\)"):
        jp.masks.structured(scores, 0.5, axes=-1, reduce="l1")
    # Scores closed over by a jit trace are concrete: still checked.
    with pytest.warns(UserWarning, match=r"negative values"):
        jax.jit(lambda s: jp.masks.structured(scores, s, axes=-1))(0.5)
    # reduce="mean" ranks movement scores as the criterion means: the growing ones stay.
    m = jp.masks.structured(scores, 0.5, axes=-1, reduce="mean")
    assert m["w"][0].tolist() == [False, False, True, True]


def test_structured_does_not_warn_on_minus_inf_marks_which_still_prune_first(key):
    s = _abs_normal(key, (3, 4)).at[0, 2].set(-jnp.inf)
    s = s.at[:, 2].set(jnp.where(jnp.arange(3) == 0, -jnp.inf, 100.0))  # best, but marked
    for reduce in ("l2", "l1"):
        m = jp.masks.structured({"w": s}, 0.25, axes=-1, reduce=reduce)["w"]
        assert m[0].tolist() == [True, True, False, True]
    # Traced scores (as in jp.prune) cannot be checked, and do not warn.
    signed = {"w": jnp.array([[-5.0, -0.1, 0.1, 5.0]] * 2)}
    jax.jit(lambda sc: jp.masks.structured(sc, 0.5, axes=-1))(signed)


# -- #4: nm's default axis on 4-D leaves that are not flax conv kernels ------------


@pytest.mark.parametrize(
    "shape", [(4, 16, 8, 8), (4, 16, 4, 4), (16, 8, 3, 3)], ids=["lineargeneral", "attn", "eqx"]
)
def test_nm_default_axis_refuses_4d_leaves_that_are_not_flax_conv_kernels(shape):
    with pytest.raises(ValueError, match=r"pass axis=.*equinox/PyTorch conv \[out, in, kh, kw\]"):
        jp.masks.nm({"k": jnp.ones(shape)}, n=2, m=4)
    # With axis= they are accepted: LinearGeneral's contracted axis 1 gets exact 2:4.
    m = jp.masks.nm({"k": jnp.ones(shape)}, n=2, m=4, axis=1)["k"]
    g = np.moveaxis(np.asarray(m), 1, -1).reshape(-1, shape[1] // 4, 4).sum(-1)
    assert (g == 2).all()


@pytest.mark.parametrize("shape", [(3, 3, 8, 16), (7, 7, 4, 8), (1, 7, 8, 8), (5, 1, 4, 4)])
def test_nm_default_axis_still_takes_flax_conv_kernels(shape):
    m = np.asarray(jp.masks.nm({"k": jnp.ones(shape)}, n=2, m=4)["k"])
    assert (m.reshape(shape[0], shape[1], shape[2] // 4, 4, shape[3]).sum(3) == 2).all()


# -- #5: max_sparsity for global structured / block selection ----------------------


def _three_layers():
    rng = np.random.default_rng(0)
    p = {
        "l1": rng.standard_normal((64, 32)),
        "l2": rng.standard_normal((32, 32)) * 0.05,  # small weights
        "l3": rng.standard_normal((32, 10)),
    }
    return jp.criteria.magnitude({k: jnp.asarray(v, jnp.float32) for k, v in p.items()})


def test_global_structured_and_blocks_take_a_per_leaf_cap():
    sc = _three_layers()
    with pytest.warns(UserWarning, match=r"structured\(scope='global'\).*\['l2 \(32 slices\)'\]"):
        m = jp.masks.structured(sc, 0.45, axes=-1, scope="global")
    assert not bool(m["l2"].any())  # layer collapse, now warned
    m = jp.masks.structured(sc, 0.45, axes=-1, scope="global", max_sparsity=0.9)
    dropped = {k: int((~v.any(0)).sum()) for k, v in m.items()}
    assert dropped["l2"] == 28  # floor(0.9 * 32): 4 columns kept
    assert sum(dropped.values()) == round(0.45 * 74)  # the total is unchanged
    # A traced sparsity (jp.prune's schedules) gets the same capped masks.
    f = jax.jit(lambda s: jp.masks.structured(sc, s, axes=-1, scope="global", max_sparsity=0.9))
    for a, b in zip(jax.tree.leaves(f(0.45)), jax.tree.leaves(m), strict=True):
        np.testing.assert_array_equal(a, b)

    with pytest.warns(UserWarning, match=r"blocks\(scope='global'\).*l2 \(64 blocks\)"):
        mb = jp.masks.blocks(sc, 0.4, block=(4, 4), scope="global")
    assert not bool(mb["l2"].any())
    mb = jp.masks.blocks(sc, 0.4, block=(4, 4), scope="global", max_sparsity=0.5)
    dropped = {k: _dropped_blocks(np.asarray(v), 4) for k, v in mb.items()}
    assert dropped["l2"] == 32  # floor(0.5 * 64): half of its blocks kept
    assert sum(dropped.values()) == round(0.4 * (16 * 8 + 8 * 8 + 8 * 3))  # 86, as uncapped


def _dropped_blocks(m, b):
    rows, cols = range(0, m.shape[0], b), range(0, m.shape[1], b)
    return sum(not m[r : r + b, c : c + b].any() for r in rows for c in cols)


def test_structured_max_sparsity_as_a_prune_scope():
    sc = _three_layers()
    scope = functools.partial(jp.masks.structured, axes=-1, scope="global", max_sparsity=0.9)
    params = dict(sc)  # magnitudes: nonnegative weights, so the same scores
    tx = jp.prune(optax.sgd(0.0), sparsity=0.45, scope=scope)
    grads = jax.tree.map(jnp.zeros_like, params)
    _, state = jax.jit(tx.update)(grads, tx.init(params), params)
    assert int(jp.get_masks(state)["l2"].any(0).sum()) == 4


def test_max_sparsity_is_validated():
    sc = {"w": jnp.ones((4, 4))}
    for f in (jp.masks.structured, jp.masks.blocks):
        with pytest.raises(ValueError, match=r"max_sparsity=0.9 .* Fix: pass scope='global'"):
            f(sc, 0.5, max_sparsity=0.9)
        with pytest.raises(ValueError, match=r"max_sparsity must be a Python number .* got 1.5"):
            f(sc, 0.5, scope="global", max_sparsity=1.5)


# -- #6: patterns on 1-D and 3-D conv kernels --------------------------------------


def test_patterns_warn_on_1d_and_3d_conv_kernels(key):
    p = {"c1d": jnp.ones((3, 8, 16)), "c3d": jnp.ones((3, 3, 3, 8, 16))}
    with pytest.warns(UserWarning) as rec:
        m = jp.masks.patterns(p, 0.0)
    msgs = [str(r.message) for r in rec]
    assert any("3-D leaves dense: ['c1d (3, 8, 16)']" in s and "1-D conv" in s for s in msgs)
    assert any("3-D conv kernels [kd, kh, kw, in, out] are not supported" in s for s in msgs)
    assert jnp.shape(m["c1d"]) == () and jnp.shape(m["c3d"]) == ()
    jp.masks.patterns(p, 0.0, where=lambda path, x: False)  # left out: silent


# -- #7: layouts in the docs -------------------------------------------------------


def test_docs_state_the_transposed_conv_and_depthwise_layouts():
    import jaxprune.structured as mod

    text = DOCS.read_text()
    for doc in (text, mod.__doc__, jp.masks.nm.__doc__):
        assert "transpose_kernel=True" in doc and "[kh, kw, out, in]" in doc
    assert "depthwise conv `[kh, kw, 1, C]`" in text
    assert "equinox" in jp.masks.nm.__doc__.lower() and "axis=-1" in jp.masks.nm.__doc__


def test_the_transposed_conv_layout_the_docs_state(key):
    from flax import nnx

    ct = nnx.ConvTranspose(8, 16, (3, 3), transpose_kernel=True, use_bias=False, rngs=nnx.Rngs(0))
    assert ct.kernel.shape == (3, 3, 16, 8)  # [kh, kw, out, in]
    m = jp.masks.structured({"k": jnp.abs(ct.kernel[...]) + 0.01}, 0.5, axes=-2)["k"]
    ct.kernel[...] = jnp.where(m, ct.kernel[...], 0)
    y = ct(jax.random.normal(key, (1, 5, 5, 8)))
    assert int((jnp.abs(y).sum((0, 1, 2)) == 0).sum()) == 8  # axes=-2: its filters


# -- #8: validation and messages ---------------------------------------------------


def test_patterns_kernel_axes_are_validated_and_accept_other_layouts(key):
    k = {"k": jnp.ones((3, 3, 4, 4))}
    for bad in ((0, 5), (0, 0), (1, -3), 0, (0, 1.0), (0, 1, 2)):
        with pytest.raises(ValueError, match=r"kernel_axes must be two distinct ints in -4\.\.3"):
            jp.masks.patterns(k, 0.5, kernel_axes=bad)
    eqx = _abs_normal(key, (8, 4, 3, 3))  # [out, in, kh, kw]
    flax = jnp.transpose(eqx, (2, 3, 1, 0))
    want = jp.masks.patterns({"k": flax}, 0.5)["k"]
    for axes in ((2, 3), (-2, -1)):
        got = jp.masks.patterns({"k": eqx}, 0.5, kernel_axes=axes, where=lambda p, x: True)["k"]
        np.testing.assert_array_equal(jnp.transpose(got, (2, 3, 1, 0)), want)


@pytest.mark.parametrize("bad", ["out", -1.0, None, (-1, "x"), True])
def test_structured_axes_are_validated(bad):
    sc = {"w": jnp.ones((3, 3, 4, 4))}
    with pytest.raises(ValueError, match=r"axes must be an int, a tuple of ints or a function"):
        jp.masks.structured(sc, 0.5, axes=bad)
    with pytest.raises(ValueError, match=r"from the axes function for leaf 'w'"):
        jp.masks.structured(sc, 0.5, axes=lambda p, x: bad)


def test_nm_without_a_floor_warns_when_every_group_is_emptied(key):
    w = {"w": jax.random.normal(key, (64, 32))}
    for s in (0.875, 0.9):
        with pytest.warns(UserWarning, match=rf"round\({s:g} \* 4\) = 4 .* every selected leaf"):
            m = jp.masks.nm(w, s, n=None, m=4)["w"]
        assert not bool(m.any())
    assert float(jp.masks.nm(w, 0.85, n=None, m=4)["w"].mean()) == 0.25  # silent
    assert not bool(jp.masks.nm(w, 1.0, n=None, m=4)["w"].any())  # asked for: silent
    assert float(jp.masks.nm(w, 0.9, n=1, m=4)["w"].mean()) == 0.25  # a floor: silent


def test_nm_messages_name_1d_convs_and_equinox_layouts():
    with pytest.raises(ValueError, match=r"-2 for a 1-D conv \[k, in, out\], a 3-D conv"):
        jp.masks.nm({"conv1d": jnp.ones((5, 8, 16))}, n=2, m=4)
    # An equinox conv small enough to look like a flax one: the axis 3 is a kernel size.
    with pytest.raises(ValueError, match=r"not divisible by m=4.*axis= \(1 for an equinox"):
        jp.masks.nm({"w": jnp.ones((4, 4, 3, 3))}, n=2, m=4)
