"""Third QA pass: results checked against independent references, and silent caps warned."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune as jp


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
