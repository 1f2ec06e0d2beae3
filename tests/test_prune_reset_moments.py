"""jp.prune(reset_moments=True): entries a refresh prunes or brings back leave with zero moments."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune as jp
from tests._invariants import check_transform, small_params


def test_invariant_suite_with_reset_moments():
    check_transform(
        lambda inner: jp.prune(
            inner,
            sparsity=0.5,
            criterion=jp.criteria.random,
            key=jax.random.key(0),
            reset_moments=True,
        )
    )


def _run(reset: bool):
    # Random scores drawn anew at every refresh: masks change at every step.
    tx = jp.prune(
        optax.adam(1e-2),
        sparsity=lambda step: 0.5,
        criterion=jp.criteria.random,
        key=jax.random.key(1),
        reset_moments=reset,
    )
    params = small_params()
    state = tx.init(params)
    step = jax.jit(tx.update)
    grads = jax.tree.map(lambda x: jnp.cos(x) + 2.0, params)  # nonzero everywhere
    for _ in range(3):
        before = jp.get_masks(state)
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
    after = jp.get_masks(state)
    adam = state.inner_state[0]
    return before, after, adam


def test_changed_entries_leave_the_refresh_with_zero_moments():
    before, after, adam = _run(reset=True)
    for name in ("dense", "out"):
        changed = np.asarray(before[name]["kernel"] != after[name]["kernel"])
        assert changed.any()
        for moment in (adam.mu, adam.nu):
            m = np.asarray(moment[name]["kernel"])
            assert np.all(m[changed] == 0)
            # Entries kept through the refresh keep their moments.
            kept = np.asarray(after[name]["kernel"]) & ~changed
            assert np.all(m[kept] != 0)


def test_without_reset_a_returning_weight_keeps_its_old_moments():
    before, after, adam = _run(reset=False)
    revived = np.asarray(after["dense"]["kernel"] & ~before["dense"]["kernel"])
    assert revived.any()
    # nu decays but is not reset: the returning weights carry their old second moments.
    assert np.all(np.asarray(adam.nu["dense"]["kernel"])[revived] > 0)


def test_reset_moments_must_be_a_bool():
    with pytest.raises(ValueError, match=r"reset_moments must be True or False.*got 'yes'"):
        jp.prune(optax.adam(1e-2), sparsity=0.5, reset_moments="yes")
