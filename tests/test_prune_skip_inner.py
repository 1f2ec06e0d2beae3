"""jp.prune(skip_inner_on_refresh=True): a refresh step only prunes (jaxpruner's skip_gradients)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune as jp
from tests._invariants import check_transform, small_params
from tests._jaxprs import count

STEPS = 7


def _schedule():
    # Refreshes at steps 0, 3 and 6; nothing is pruned at step 0 (sparsity 0).
    return jp.schedules.polynomial(0.0, 0.5, begin_step=0, end_step=30, frequency=3)


def _tx(**kwargs):
    return jp.prune(optax.adam(1e-2), sparsity=_schedule(), **kwargs)


def _grads(params, step):
    # Nonzero everywhere and different at every step.
    return jax.tree.map(lambda x: jnp.cos(x + step) + 2.0, params)


def _run(tx, update, steps=STEPS):
    """Returns ``[(params, state)]`` before each step and after the last one."""
    params = small_params()
    state = tx.init(params)
    out = [(params, state)]
    for t in range(steps):
        updates, state = update(_grads(params, t), state, params)
        params = optax.apply_updates(params, updates)
        out.append((params, state))
    return out


def _equal(a, b):
    return all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def _assert_close(a, b, **tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, **tol)


def test_invariant_suite_with_skip_inner_on_refresh():
    check_transform(
        lambda inner: jp.prune(
            inner,
            sparsity=lambda step: 0.5,
            criterion=jp.criteria.random,
            key=jax.random.key(0),
            skip_inner_on_refresh=True,
        )
    )


def test_refresh_steps_only_prune_and_other_steps_step_as_without_the_flag():
    tx, off = _tx(skip_inner_on_refresh=True), _tx()
    run = _run(tx, jax.jit(tx.update))
    schedule = _schedule()
    pruned_some = False
    for t in range(STEPS):
        (p0, s0), (p1, s1) = run[t], run[t + 1]
        if bool(schedule.is_update_step(t)):
            # The inner optimizer took no step: adam's count, mu and nu are the old ones.
            assert _equal(s1.inner_state, s0.inner_state)
            assert int(s1.inner_state[0].count) == int(s0.inner_state[0].count)
            masks = jp.get_masks(s1)
            for name in ("dense", "out"):
                m = np.asarray(masks[name]["kernel"])
                w0, w1 = np.asarray(p0[name]["kernel"]), np.asarray(p1[name]["kernel"])
                n_pruned = int(round(float(schedule(t)) * m.size))
                assert int((~m).sum()) == n_pruned
                pruned_some |= n_pruned > 0
                assert np.array_equal(w1[m], w0[m])  # kept entries did not move
                assert np.all(w1[~m] == 0)  # pruned entries are exactly 0
                assert np.array_equal(p1[name]["bias"], p0[name]["bias"])
        else:
            # From the same state, the step is the one the flag-off transform takes.
            grads = _grads(p0, t)
            u_skip, s_skip = tx.update(grads, s0, p0)
            u_off, s_off = off.update(grads, s0, p0)
            _assert_close((u_skip, s_skip), (u_off, s_off), rtol=1e-6, atol=1e-8)
            assert int(s_skip.inner_state[0].count) == int(s0.inner_state[0].count) + 1
            assert not _equal(p1, p0)
        assert int(s1.count) == t + 1
    assert pruned_some
    # Steps 0, 3 and 6 skipped the inner update: adam took 4 of 7 steps.
    assert int(run[-1][1].inner_state[0].count) == STEPS - 3


def test_reset_moments_still_applies_on_a_skipped_refresh():
    tx = jp.prune(
        optax.adam(1e-2),
        sparsity=lambda step: 0.5,
        criterion=jp.criteria.random,
        key=jax.random.key(1),
        reset_moments=True,
        skip_inner_on_refresh=True,
    )
    # A refresh every step: the first step only prunes, so two steps give adam moments.
    run = _run(tx, jax.jit(tx.update), steps=3)
    (_, s0), (_, s1) = run[1], run[2]
    before, after = jp.get_masks(s0), jp.get_masks(s1)
    for name in ("dense", "out"):
        changed = np.asarray(before[name]["kernel"] != after[name]["kernel"])
        assert changed.any()
        for m0, m1 in (
            (s0.inner_state[0].mu, s1.inner_state[0].mu),
            (s0.inner_state[0].nu, s1.inner_state[0].nu),
        ):
            old, new = np.asarray(m0[name]["kernel"]), np.asarray(m1[name]["kernel"])
            assert np.all(new[changed] == 0)
            assert np.array_equal(new[~changed], old[~changed])


def test_jit_matches_eager():
    tx = _tx(skip_inner_on_refresh=True)
    # Five steps: refreshes at steps 0 and 3 (op by op, eager is the slow part).
    jitted = _run(tx, jax.jit(tx.update), steps=5)
    with jax.disable_jit():
        eager = _run(tx, tx.update, steps=5)
    _assert_close(jitted, eager, rtol=1e-5, atol=1e-6)
    # The eager run's refresh steps keep the old inner state exactly too.
    assert _equal(eager[4][1].inner_state, eager[3][1].inner_state)


def test_the_flag_adds_one_cond_only_when_true():
    params = small_params()
    grads = _grads(params, 0)

    def jaxpr(tx):
        return jax.make_jaxpr(tx.update)(grads, tx.init(params), params)

    plain, off, on = (
        jaxpr(_tx()),
        jaxpr(_tx(skip_inner_on_refresh=False)),
        jaxpr(_tx(skip_inner_on_refresh=True)),
    )
    assert count(off, "cond") == count(plain, "cond")
    assert str(off) == str(plain)
    assert count(on, "cond") == count(plain, "cond") + 1


def test_default_is_bitwise_the_unflagged_transform():
    plain, off = _tx(), _tx(skip_inner_on_refresh=False)
    a, b = _run(plain, jax.jit(plain.update)), _run(off, jax.jit(off.update))
    assert _equal(a, b)


@pytest.mark.parametrize("bad", [1, 0, "yes", None, np.bool_(True)])
def test_skip_inner_on_refresh_must_be_a_bool(bad):
    with pytest.raises(
        ValueError,
        match=rf"skip_inner_on_refresh must be True or False.*got {re.escape(repr(bad))}\. "
        r"Fix: skip_inner_on_refresh=True",
    ):
        jp.prune(optax.adam(1e-2), sparsity=0.5, skip_inner_on_refresh=bad)
