"""QA round 10, equinox / dynamic sparse persona: synflow's warning when `where`
matches nothing, at_init's messages for equinox, and RigL's documented swap semantics."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune as jp


def _eqx_linear():
    lin = eqx.nn.Linear(4, 3, key=jax.random.key(0))
    params, static = eqx.partition(lin, eqx.is_array)
    return lin, params, (lambda p, x: jax.vmap(eqx.combine(p, static))(x))


def test_synflow_warns_when_where_selects_no_leaf():
    _, params, apply_fn = _eqx_linear()
    flax_style = lambda path, leaf: path[-1] == "kernel"  # equinox names it "weight"
    with pytest.warns(UserWarning, match=r"synflow found no prunable leaf.*'weight'"):
        m = jp.at_init.synflow(apply_fn, params, (1, 4), 0.9, iterations=2, where=flax_style)
    assert bool(jnp.all(m.weight))


def test_snip_names_an_unfiltered_equinox_function_leaf():
    model = eqx.nn.MLP(4, 2, 8, 1, key=jax.random.key(0))  # holds its activation functions

    def loss(m, x):
        return jnp.sum(jax.vmap(m)(x) ** 2)

    with pytest.raises(ValueError, match=r"is a \w+, not an array.*eqx.partition"):
        jp.at_init.snip(loss, model, jnp.ones((2, 4)))


def test_synflow_input_shape_message_covers_channels_first():
    conv = eqx.nn.Conv2d(1, 2, 3, key=jax.random.key(0))
    params, static = eqx.partition(conv, eqx.is_array)
    apply_fn = lambda p, x: jax.vmap(eqx.combine(p, static))(x)
    with pytest.raises(ValueError, match=r"channels-first \(equinox, PyTorch NCHW\)"):
        jp.at_init.synflow(apply_fn, params, (1, 8, 8, 1), 0.5, iterations=1)
    m = jp.at_init.synflow(apply_fn, params, (1, 1, 8, 8), 0.5, iterations=1)
    assert int(jnp.sum(~m.weight)) == 9  # round(0.5 * 18)


def test_rigl_entry_dropped_and_regrown_at_once_keeps_its_value():
    """As RigL's reference code (reinit_when_same off): documented in jp.dynamic."""
    w = jnp.arange(1.0, 17.0).reshape(4, 4) / 16.0
    tx = jp.dynamic.rigl(
        optax.adam(0.1), sparsity=0.5, key=jax.random.key(0), end_step=100, update_every=1,
        drop_fraction=0.5, distribution=jp.distributions.uniform,
    )  # fmt: skip
    st = tx.init({"w": w})
    m0 = np.asarray(jp.get_masks(st)["w"])
    p = {"w": jnp.where(m0, w, 0.0)}
    u, st = tx.update({"w": jnp.ones((4, 4))}, st, p)
    p = optax.apply_updates(p, u)
    wa = np.asarray(p["w"])
    weakest = np.unravel_index(np.argmin(np.where(m0, np.abs(wa), np.inf)), wa.shape)
    g = np.zeros((4, 4), np.float32)
    g[weakest] = 100.0  # dropped first by |w|, regrown first by |g|
    u, st = tx.update({"w": jnp.asarray(g)}, st, p)
    new = optax.apply_updates(p, u)
    m1 = np.asarray(jp.get_masks(st)["w"])
    assert m1[weakest] and m1.sum() == m0.sum()  # still active, same count
    assert float(new["w"][weakest]) != 0.0  # not restarted at 0: it never changed
