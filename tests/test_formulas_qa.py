"""Formula audit findings: Taylor on stacked layers and input units, SNIP/GraSP in float16."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune as jp

L, D = 3, 6


def _net(x, y, kernels, biases):
    h = x
    for k, b in zip(kernels, biases, strict=True):
        h = jax.nn.relu(h @ k + b)
    return jnp.mean(-jax.nn.log_softmax(h[:, :3])[jnp.arange(x.shape[0]), y])


@pytest.fixture
def stacked_and_unrolled():
    rng = np.random.default_rng(9)
    x = jnp.asarray(rng.normal(size=(16, D)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 16))
    k = jnp.asarray(rng.normal(size=(L, D, D)), jnp.float32) * 0.6
    b = jnp.asarray(rng.normal(size=(L, D)), jnp.float32) * 0.5
    stacked = {"layers": {"kernel": k, "bias": b}}
    g_st = jax.grad(lambda p: _net(x, y, p["layers"]["kernel"], p["layers"]["bias"]))(stacked)
    unrolled = {f"l{i}": {"kernel": k[i], "bias": b[i]} for i in range(L)}

    def loss_un(p):
        return _net(
            x, y, [p[f"l{i}"]["kernel"] for i in range(L)], [p[f"l{i}"]["bias"] for i in range(L)]
        )

    return stacked, g_st, unrolled, jax.grad(loss_un)(unrolled)


def _is_stack(path, leaf):
    del leaf
    return path[0] == "layers"


def test_taylor_scores_each_stacked_layer_as_the_unrolled_model(stacked_and_unrolled):
    stacked, g_st, unrolled, g_un = stacked_and_unrolled
    got = jp.criteria.taylor(stacked, g_st, stacked=_is_stack)["layers"]["kernel"]
    un = jp.criteria.taylor(unrolled, g_un)
    want = jnp.stack([un[f"l{i}"]["kernel"] for i in range(L)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    # Structured selection per layer: the unrolled model's units, layer by layer.
    sel = jp.masks.per_layer(functools.partial(jp.masks.structured, axes=-1), stacked=_is_stack)
    m = sel(jp.criteria.taylor(stacked, g_st, stacked=_is_stack), 0.5)["layers"]["kernel"]
    m_un = jp.masks.structured(un, 0.5)
    for i in range(L):
        np.testing.assert_array_equal(m[i], m_un[f"l{i}"]["kernel"])
    # Molchanov 2019's unit group, through taylor_ema: squares of the same unit sums.
    c = jp.criteria.taylor_ema(0.0, stacked=_is_stack)
    got2 = c.score(c.update(c.init(stacked), stacked, g_st), stacked)["layers"]["kernel"]
    c_un = jp.criteria.taylor_ema(0.0)
    un2 = c_un.score(c_un.update(c_un.init(unrolled), unrolled, g_un), unrolled)
    np.testing.assert_allclose(
        got2, jnp.stack([un2[f"l{i}"]["kernel"] for i in range(L)]), rtol=1e-5, atol=1e-9
    )


def test_taylor_without_stacked_warns_when_the_bias_shows_a_stack(stacked_and_unrolled):
    stacked, g_st, _, _ = stacked_and_unrolled
    with pytest.warns(UserWarning, match=r"stacked layers.*Fix: pass stacked="):
        jp.criteria.taylor(stacked, g_st)
    with pytest.raises(ValueError, match=r"stacked must be a predicate.*or None, got"):
        jp.criteria.taylor(stacked, g_st, stacked="layers")
    with pytest.raises(ValueError, match=r"stacked must be a predicate.*or None, got"):
        jp.criteria.taylor_ema(stacked=1)


def test_taylor_of_input_units_has_no_bias_term_even_for_a_square_kernel():
    # unit_axis=-2 scores a kernel's inputs: sum_j w_ij g_ij, whose bias (one per
    # output) does not belong to them, even when in == out makes its shape fit.
    rng = np.random.default_rng(4)
    w, g = (jnp.asarray(rng.normal(size=(4, 4)), jnp.float32) for _ in range(2))
    b, gb = (jnp.asarray(rng.normal(size=4), jnp.float32) * 3 for _ in range(2))
    got = jp.criteria.taylor({"kernel": w, "bias": b}, {"kernel": g, "bias": gb}, unit_axis=-2)
    s = np.abs(np.sum(np.asarray(w * g), axis=1))
    np.testing.assert_allclose(got["kernel"][:, 0], s / np.linalg.norm(s), rtol=1e-5)
    # As outputs (the default) the bias term is in: sum_i w_ij g_ij + b_j g_bj.
    out = jp.criteria.taylor({"kernel": w, "bias": b}, {"kernel": g, "bias": gb})
    s = np.abs(np.sum(np.asarray(w * g), axis=0) + np.asarray(b * gb))
    np.testing.assert_allclose(out["kernel"][0], s / np.linalg.norm(s), rtol=1e-5)


def test_snip_and_grasp_score_float16_params_in_float32():
    rng = np.random.default_rng(10)
    w = jnp.asarray(rng.normal(size=(64, 32)) * 0.05, jnp.float16)
    x = jnp.asarray(rng.normal(size=(8, 64)), jnp.float16)

    def loss(p, x):
        return jnp.mean((x @ p["w"]).astype(jnp.float32) ** 2) * 1e-4

    wide = {"w": w.astype(jnp.float32)}
    snip = jp.at_init.snip(loss, {"w": w}, x)["w"]
    np.testing.assert_allclose(snip, jp.at_init.snip(loss, wide, x)["w"], rtol=1e-6, atol=1e-12)
    assert int(jnp.sum(snip == 0)) < 100  # float16 products: 1387 of 2048 were 0
    grasp = jp.at_init.grasp(loss, {"w": w}, x)["w"]
    np.testing.assert_allclose(grasp, jp.at_init.grasp(loss, wide, x)["w"], rtol=1e-5, atol=1e-15)
    assert int(jnp.sum(grasp == 0)) == 0  # float16's H g: all 2048 were 0
