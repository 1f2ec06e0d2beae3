"""Third QA pass: results checked against independent references, and silent caps warned."""

import warnings
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxprune as jp
from jaxprune import checkpoint, packing


def test_nm_warns_when_the_floor_caps_a_concrete_sparsity():
    s = {"k": jnp.arange(32.0).reshape(8, 4)}
    with pytest.warns(
        UserWarning,
        match=r"nm\(sparsity=0.75, n=2, m=4\) would drop .* = 3 .* "
        r"caps it at 2 .*n=1 reaches it",
    ):
        masks = jp.masks.nm(s, 0.75)
    assert float(jp.sparsity(masks)) == 0.5  # the documented cap, still applied
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jp.masks.nm(s, 0.5)  # at the cap: no warning
        jp.masks.nm(s, 0.75, n=1)
        jax.jit(lambda x: jp.masks.nm(s, x))(0.75)  # traced: a schedule, no warning


def test_cosine_drop_fraction_refuses_negative_steps():
    f = lambda t: float(jp.dynamic.cosine_drop_fraction(t, alpha=0.3, end_step=100))
    with pytest.raises(ValueError, match=r"step must be >= 0 .* got -50"):
        f(-50)  # the cosine is even: it would give step 50's fraction
    with pytest.raises(ValueError, match=r"step must be >= 0"):
        jp.dynamic.cosine_drop_fraction(np.array([1, -1]), alpha=0.3, end_step=100)
    assert f(50) == pytest.approx(0.15)
    # Steps >= 0 are RigL's formula bit for bit.
    t = np.arange(0, 120, dtype=np.float32)
    ref = np.float32(0.15) * (1 + np.cos(np.float32(np.pi) * np.minimum(t, 100) / 100))
    got = np.asarray(
        jax.vmap(lambda s: jp.dynamic.cosine_drop_fraction(s, alpha=0.3, end_step=100))(t)
    )
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)


class _Scaled(NamedTuple):
    value: jax.Array
    scale: jax.Array


def test_a_namedtuple_field_named_value_keeps_its_path(tmp_path):
    # Only an nnx Variable's `value` is dropped from a path; optax.lbfgs's state
    # has a NamedTuple field of that name.
    tree = _Scaled(jnp.ones((2, 2)), jnp.full((2,), 3.0))
    assert [p for p, _ in jp._tree.leaves_with_paths(tree)[0]] == [("value",), ("scale",)]
    ck = checkpoint.save(str(tmp_path / "b"), 0, tree)
    got = checkpoint.restore(ck).params
    assert sorted(got) == ["scale", "value"]
    np.testing.assert_array_equal(got["scale"], [3.0, 3.0])
    params = {"w": jnp.ones((2, 2))}
    state = optax.lbfgs().init(params)
    checkpoint.save(str(tmp_path / "a"), 1, params, state)
    back = checkpoint.restore(str(tmp_path / "a"))  # no template: nested dicts
    want = jax.tree.leaves(state)
    assert len(jax.tree.leaves(back.opt_state)) == len(want)
    out = checkpoint.export(str(tmp_path / "b"), str(tmp_path / "c"), format="dense")
    assert sorted(checkpoint.restore(out).params) == ["scale", "value"]
    # A `where` sees the field's name.
    seen = []
    jp.sparsity(tree, where=lambda p, x: seen.append(p) or True)
    assert ("value",) in seen


def test_nnx_state_paths_still_drop_the_variable_value():
    m = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    assert sorted(p for p, _ in jp._tree.leaves_with_paths(nnx.state(m))[0]) == [
        ("bias",),
        ("kernel",),
    ]


def test_restore_refuses_packed_masks_of_another_shape(tmp_path):
    w = jnp.arange(1.0, 13.0).reshape(3, 4)
    tx = jp.prune(optax.sgd(0.1), sparsity=0.5)
    st = tx.init({"w": w})
    u, st = tx.update({"w": jnp.zeros_like(w)}, st, {"w": w})
    w = w + u["w"]
    checkpoint.save(str(tmp_path), 1, {"w": w}, st)
    wrong = tx.init({"w": jnp.ones((4, 3))})  # bits of the same shape: 2 bytes
    with pytest.raises(
        ValueError,
        match=r"packed_masks/w/bits: checkpoint bits of a packed bool\[3, 4\] mask vs template "
        r"bits of a packed bool\[4, 3\] mask",
    ):
        checkpoint.restore(str(tmp_path), params={"w": w}, opt_state=wrong)
    ck = checkpoint.restore(str(tmp_path), params={"w": w}, opt_state=tx.init({"w": w}))
    np.testing.assert_array_equal(ck.masks["w"], jp.get_masks(st)["w"])


def test_big_endian_leaves_round_trip(tmp_path):
    x = np.arange(6, dtype=">f4").reshape(2, 3)
    x[0, 1] = 0.0
    for fmt in ("dense", "compressed"):
        checkpoint.save(
            str(tmp_path / fmt), 0, {"w": x, "i": np.arange(3, dtype=">i8")}, format=fmt
        )
        got = checkpoint.restore(str(tmp_path / fmt)).params
        np.testing.assert_array_equal(got["w"], x)
        np.testing.assert_array_equal(got["i"], [0, 1, 2])
        assert got["w"].dtype == np.float32
    arrays, spec = packing.pack_leaf(x)
    np.testing.assert_array_equal(packing.unpack_leaf(arrays, spec), x)


@pytest.mark.parametrize("axis", [(-1, -2), (-2, -1)])
def test_input_norms_follow_flax_sorted_general_axes(axis):
    # Flax contracts a general linear kernel's input axes in ascending order,
    # whatever order `axis` names them in.
    scale = (10.0 ** jnp.arange(6.0)).reshape(2, 3)
    x = jax.random.normal(jax.random.key(0), (16, 2, 3)) * scale
    want = jnp.sqrt(jnp.sum(x**2, axis=0))  # [2, 3], the kernel's input axes

    class M(nnx.Module):
        def __init__(self, rngs):
            self.g = nnx.LinearGeneral((2, 3), 2, axis=axis, rngs=rngs)

        def __call__(self, x):
            return self.g(x)

    m = M(nnx.Rngs(0))
    assert m.g.kernel.shape == (2, 3, 2)
    _, caps = jp.activations.capture_nnx(m, x, types=(nnx.LinearGeneral,))
    params = nnx.to_pure_dict(nnx.state(m, nnx.Param))
    got = jp.activations.input_norms(params, caps)["g"]["kernel"]
    np.testing.assert_allclose(got[..., 0], want, rtol=1e-5)
    scores = jp.criteria.wanda(params, jp.activations.input_norms(params, caps))
    np.testing.assert_allclose(
        scores["g"]["kernel"], jnp.abs(params["g"]["kernel"]) * want[..., None], rtol=1e-5
    )

    class L(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.DenseGeneral(2, axis=axis, name="dg")(x)

    v = L().init(jax.random.key(0), x)
    _, caps = jp.activations.capture_linen(L(), v, x, types=(nn.DenseGeneral,))
    got = jp.activations.input_norms(v["params"], caps)["dg"]["kernel"]
    np.testing.assert_allclose(got[..., 0], want, rtol=1e-5)


class _Heads(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.DenseGeneral((4, 3), name="dg")(x).reshape(x.shape[0], -1)


def test_input_gates_refuse_a_kernel_with_several_output_axes():
    x = jnp.ones((2, 6))
    v = _Heads().init(jax.random.key(0), x)
    with pytest.raises(
        ValueError, match=r"'dg/kernel' of shape \(6, 4, 3\) has a bias of shape \(4, 3\).*Fix"
    ):
        jp.gates.init_gates(
            jp.gates.HardConcrete(), v["params"], where=lambda p, a: p[-1] == "kernel", inputs=True
        )
    # Its outputs can still be gated.
    gp = jp.gates.init_gates(
        jp.gates.HardConcrete(), v["params"], where=lambda p, a: p[-1] == "kernel"
    )
    assert gp["dg/kernel"]["gate_log_alpha"].shape == (3,)


def test_gates_on_an_attention_projection_with_as_many_inputs_as_heads():
    mha = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=8)
    x = jnp.ones((1, 3, 4))  # embed 4 == num_heads: query kernel [4, 4, 2], bias [4, 2]
    v = mha.init(jax.random.key(0), x, x)
    gp = jp.gates.init_gates(
        jp.gates.HardConcrete(),
        v["params"],
        where=lambda p, a: p[-1] == "kernel" and p[0] == "query",
    )
    assert gp["query/kernel"]["gate_log_alpha"].shape == (2,)
    # A real stack ([L, in, out] with [L, out], L != in) is still refused.
    stack = {"layers": {"kernel": jnp.ones((3, 5, 2)), "bias": jnp.ones((3, 2))}}
    with pytest.raises(ValueError, match=r"holds 3 stacked layers"):
        jp.gates.init_gates(jp.gates.HardConcrete(), stack, where=lambda p, a: p[-1] == "kernel")


def test_gate_functions_mirror_a_variable_wrapped_state():
    model = jp.models.MLP((5, 6, 3), rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    gate = jp.gates.HardConcrete()
    gp = jp.gates.init_gates(gate, params, where=lambda p, v: v.ndim >= 2 and p[1] == 0)
    want = jax.tree.structure(params)
    assert jax.tree.structure(jp.gates.apply_gates(gate, params, gp)) == want
    masks = jp.gates.to_masks(gate, gp, params)
    assert jax.tree.structure(masks) == want
    jax.tree.map(lambda p, m: jnp.where(m, p, 0), params, masks)  # used to fail
    bn = nnx.BatchNorm(4, rngs=nnx.Rngs(0))
    state = nnx.state(bn, nnx.Param)
    assert jax.tree.structure(jp.gates.slimming_masks(state, 0.5)) == jax.tree.structure(state)


def test_to_masks_takes_an_unfiltered_equinox_module():
    import equinox as eqx

    model = eqx.nn.MLP(5, 3, 6, 2, key=jax.random.key(0))
    gate = jp.gates.VariationalDropout()
    gp = jp.gates.init_gates(gate, model)
    masks = jp.gates.to_masks(gate, gp, model)
    assert isinstance(masks, eqx.nn.MLP)
    assert masks.layers[0].weight.shape == (6, 5) and masks.layers[0].weight.dtype == bool


def test_polynomial_past_float32_integers_follows_zhu_gupta():
    b = 20_000_001  # past 2**24, where float32 no longer holds every step
    s = jp.schedules.polynomial(0.0, 0.8, begin_step=b, end_step=b + 10)
    want = [0.8 - 0.8 * (1 - k / 10) ** 3 for k in range(11)]
    got = [float(s(jnp.int32(b + k))) for k in range(11)]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    got = jax.jit(jax.vmap(s))(jnp.arange(b - 2, b + 13, dtype=jnp.int32))
    np.testing.assert_allclose(got, [0.0] * 2 + want + [0.8] * 2, rtol=1e-6, atol=1e-7)


def test_report_counts_linen_params_as_nnx_does():
    class L(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(nn.BatchNorm(use_running_average=True)(nn.Dense(4)(x)))

    class N(nnx.Module):
        def __init__(self, r):
            self.a = nnx.Linear(5, 4, rngs=r)
            self.bn = nnx.BatchNorm(4, rngs=r)
            self.b = nnx.Linear(4, 3, rngs=r)

    v = L().init(jax.random.key(0), jnp.ones((1, 5)))
    lin, nx = jp.report(v).totals, jp.report(N(nnx.Rngs(0))).totals
    assert lin["size"] == nx["size"] == 47
    assert lin["sparsity"] == pytest.approx(nx["sparsity"])


def test_report_takes_a_scalar_false_mask_as_pruning_the_leaf():
    w = {"w": jnp.ones((4, 6)), "v": jnp.ones((4, 6))}
    masks = {"w": jnp.bool_(False), "v": jnp.bool_(True)}
    r = {row.path: row for row in jp.report(w, masks).rows}
    assert r["w"].nonzeros == 0 and r["w"].sparsity == 1.0 and r["w"].masked
    assert r["v"].nonzeros == 24 and not r["v"].masked
    full = jp.report(w, {"w": jnp.zeros((4, 6), bool), "v": True}).rows[1]
    assert r["w"].nonzeros == full.nonzeros and r["w"].encoding == full.encoding
    assert float(jp.sparsity(jp.apply_masks(w, masks))) == 0.5


class _BagOfTokens(nnx.Module):  # sum pooling over a variable number of tokens
    def __init__(self, rngs, pool):
        self.fc1, self.fc2 = nnx.Linear(3, 8, rngs=rngs), nnx.Linear(8, 2, rngs=rngs)
        self.pool = pool

    def __call__(self, x):  # [batch, tokens, 3]
        return self.fc2(self.pool(nnx.relu(self.fc1(x))))


@pytest.mark.parametrize(
    "pool, folds",
    [
        (lambda h: h.sum(1), False),
        (lambda h: jnp.cumsum(h, 1)[:, -1], False),
        (lambda h: h.mean(1), True),  # a mean of a constant is that constant at any length
    ],
    ids=["sum", "cumsum", "mean"],
)
def test_shrink_folds_no_constant_through_a_sum_over_a_length(pool, folds):
    from jaxprune import structure

    model = _BagOfTokens(nnx.Rngs(0), pool)
    model.eval()
    params = nnx.state(model, nnx.Param)
    params["fc1"]["bias"][...] = jnp.ones(8)  # masked units output relu(1) = 1
    nnx.update(model, params)
    masks = jp.masks.structured(
        jp.criteria.magnitude(params),
        0.5,
        axes=-1,
        where=lambda p, x: p[0] == "fc1" and x.ndim == 2,
    )
    masked = nnx.clone(model)
    nnx.update(masked, jp.apply_masks(nnx.state(masked, nnx.Param), masks))
    structure.shrink_module(model, masks, jnp.ones((2, 4, 3)))  # traced at 4 tokens
    assert model.fc1.out_features == (4 if folds else 8)
    x = jax.random.normal(jax.random.key(1), (2, 9, 3))  # 9 tokens
    np.testing.assert_allclose(model(x), masked(x), rtol=1e-5, atol=1e-5)


def test_shrink_error_names_only_the_groups_that_break_alone():
    from jaxprune import structure

    k = jax.random.split(jax.random.key(0), 4)
    p = {
        "k1": jax.random.normal(k[0], (3, 3, 3, 4)),
        "k2": jax.random.normal(k[1], (1, 1, 3, 2)),
        "dw": jax.random.normal(k[2], (3, 3, 1, 4)),
        "w": jax.random.normal(k[3], (6, 2)),
    }

    def conv(x, w, g=1):
        return jax.lax.conv_general_dilated(
            x,
            w,
            (1, 1),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=g,
        )

    def f(p, x):
        a = jax.nn.relu(conv(jax.nn.relu(conv(x, p["k1"])), p["dw"], g=4))  # depthwise: g fixed
        b = jax.nn.relu(conv(x, p["k2"]))
        return jnp.concatenate([a, b], -1).mean((1, 2)) @ p["w"]

    x = jnp.ones((2, 5, 5, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gs = structure.groups(f, p, x, prunable_only=True)
        masks = structure.select(gs, jp.criteria.magnitude(p), 0.5)
        with pytest.raises(
            ValueError, match=r"one group .* already breaks it: dw\[3\], k1\[3\], w\[0\]\. It holds"
        ):
            jp.shrink(f, p, masks, x)


def _mlp(p, x):
    h = jax.nn.relu(x @ p["a"]["kernel"] + p["a"]["bias"])
    h = jax.nn.relu(h @ p["b"]["kernel"] + p["b"]["bias"])
    return h @ p["c"]["kernel"]


def _mlp_params():
    k = jax.random.split(jax.random.key(0), 3)
    return {
        "a": {"kernel": jax.random.normal(k[0], (8, 8)), "bias": jnp.zeros(8)},
        "b": {"kernel": jax.random.normal(k[1], (8, 8)), "bias": jnp.zeros(8)},
        "c": {"kernel": jax.random.normal(k[2], (8, 4))},
    }


def test_select_reads_a_where_closure_afresh_and_does_not_keep_it():
    warnings.filterwarnings("ignore", message="no member of")  # restored after the test
    import gc
    import weakref

    from jaxprune import structure

    p = _mlp_params()
    gs = structure.groups(_mlp, p, jnp.ones((1, 8)))
    scores = jp.criteria.magnitude(p)
    allowed = {"a"}

    def where(path, leaf):
        return path[0] in allowed and jnp.ndim(leaf) >= 2

    first = structure.select(gs, scores, 0.5, where=where)
    allowed.clear()
    allowed.add("b")
    second = structure.select(gs, scores, 0.5, where=where)
    fresh = structure.select(
        gs, scores, 0.5, where=lambda path, leaf: path[0] == "b" and leaf.ndim >= 2
    )
    np.testing.assert_array_equal(second["a"]["bias"], fresh["a"]["bias"])
    assert not np.array_equal(first["a"]["bias"], second["a"]["bias"])

    # A closure's arrays are not kept by a cache.
    def make_where():
        blob = jnp.ones((256, 256))
        return (lambda path, leaf: leaf.ndim >= 2 and blob.shape[0] > 0), weakref.ref(blob)

    where, ref = make_where()
    structure.select(gs, scores, 0.5, where=where)
    del where
    gc.collect()
    assert ref() is None


def test_report_flops_read_the_apply_fn_afresh():
    p = _mlp_params()
    cfg = {"deep": False}

    def apply_fn(p, x):
        h = x @ p["a"]["kernel"]
        return h @ p["b"]["kernel"] if cfg["deep"] else h

    x = jnp.ones((4, 8))
    shallow = jp.report(p, apply_fn=apply_fn, example_inputs=(x,)).flops["dense_macs"]
    cfg["deep"] = True
    deep = jp.report(p, apply_fn=apply_fn, example_inputs=(x,)).flops["dense_macs"]
    assert (shallow, deep) == (4 * 8 * 8, 2 * 4 * 8 * 8)


def test_programs_embedding_large_closed_over_arrays_are_not_kept():
    from jaxprune import _compile

    big = jax.random.normal(jax.random.key(0), (1024, 3000))  # 12 MB: ~24 MB of program text
    small = jnp.ones((8, 8))
    before = len(_compile._PROGRAMS)
    f = _compile.jit_by_content(lambda x: x @ big)
    np.testing.assert_allclose(f(jnp.ones((2, 1024))), jnp.ones((2, 1024)) @ big, rtol=1e-5)
    assert len(_compile._PROGRAMS) == before
    g = _compile.jit_by_content(lambda x: x @ small)
    g(jnp.ones((2, 8)))
    assert len(_compile._PROGRAMS) == min(before + 1, _compile.MAX_PROGRAMS)
