"""QA round 10, resume persona: msgpack (flax.serialization) of jp.prune's state, a
state restored without a template, and a TrainState's array step in save/restore."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import serialization

import jaxprune as jp


def _setup():
    params = {
        "w": jax.random.normal(jax.random.key(0), (16, 8)),
        "b": jnp.zeros(8),
    }
    tx = jp.prune(optax.adam(1e-2), sparsity=jp.schedules.polynomial(0.0, 0.5, 0, 4, frequency=2))
    state = tx.init(params)
    step = jax.jit(tx.update)
    for i in range(3):
        grads = jax.tree.map(lambda x, i=i: jnp.full_like(x, 0.1 * (i + 1)), params)
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, tx, state


def test_flax_serialization_round_trips_the_prune_state():
    params, tx, state = _setup()
    blob = serialization.to_bytes(state)
    back = serialization.from_bytes(tx.init(params), blob)
    np.testing.assert_array_equal(jp.get_masks(back)["w"], jp.get_masks(state)["w"])
    # Refreshed at steps 0 and 2: 0.5 * (1 - (1 - 2/4) ** 3) = 0.4375 of w (56 of 128).
    assert float(jp.sparsity(jp.get_masks(back))) == 0.4375
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_state_restored_without_a_template_is_named(tmp_path):
    params, tx, state = _setup()
    jp.save(tmp_path.resolve(), 3, params, state)
    ck = jp.restore(tmp_path.resolve())
    assert isinstance(ck.opt_state, dict)
    with pytest.raises(ValueError, match=r"plain dicts \(a checkpoint restored without a template"):
        jp.get_masks(ck.opt_state)
    grads = jax.tree.map(jnp.zeros_like, params)
    with pytest.raises(ValueError, match=r"state of type dict.*opt_state=tx.init\(params\)"):
        tx.update(grads, ck.opt_state, params)
    good = jp.restore(tmp_path.resolve(), params=params, opt_state=tx.init(params))
    np.testing.assert_array_equal(jp.get_masks(good.opt_state)["w"], jp.get_masks(state)["w"])


def test_save_and_restore_take_a_train_states_array_step(tmp_path):
    params, tx, state = _setup()
    step = jnp.asarray(3, jnp.int32)  # what TrainState.step is
    path = jp.save(tmp_path.resolve(), step, params, state)
    assert path.name.endswith("3")
    ck = jp.restore(tmp_path.resolve(), step, params=params, opt_state=tx.init(params))
    assert ck.step == 3
    with pytest.raises(ValueError, match=r"step must be a non-negative int.*int\(state.step\)"):
        jp.save(tmp_path.resolve(), jnp.asarray(1.5), params, state)
