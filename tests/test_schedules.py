"""Schedules against their formulas (Zhu & Gupta 2017) and their errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune as jp


def zhu_gupta(t, s_i, s_f, t0, n, dt, power=3):
    p = min(max((t - t0) / (n * dt), 0.0), 1.0)
    return s_f + (s_i - s_f) * (1 - p) ** power


@pytest.mark.parametrize("s_i,s_f,t0,n,dt", [(0.0, 0.9, 0, 10, 100), (0.1, 0.95, 200, 7, 13)])
def test_polynomial_matches_zhu_gupta(s_i, s_f, t0, n, dt):
    sched = jp.schedules.polynomial(s_i, s_f, begin_step=t0, end_step=t0 + n * dt, frequency=dt)
    for t in range(0, t0 + (n + 3) * dt, max(1, dt // 3)):
        assert float(sched(t)) == pytest.approx(zhu_gupta(t, s_i, s_f, t0, n, dt), abs=1e-6)
    steps = np.arange(0, t0 + (n + 2) * dt)
    refresh = np.asarray(jax.vmap(sched.is_update_step)(steps))
    assert list(np.flatnonzero(refresh)) == [t0 + i * dt for i in range(n + 1)]


def test_polynomial_power_and_tfmot_form():
    sched = jp.schedules.polynomial(0.2, 0.8, begin_step=10, end_step=30, power=2)
    p = 0.25
    assert float(sched(15)) == pytest.approx(0.8 + (0.2 - 0.8) * (1 - p) ** 2)


def test_polynomial_end_step_always_refreshes():
    sched = jp.schedules.polynomial(0.0, 0.5, begin_step=0, end_step=25, frequency=10)
    refresh = [t for t in range(40) if bool(sched.is_update_step(t))]
    assert refresh == [0, 10, 20, 25]


def test_polynomial_under_jit_no_retrace():
    sched = jp.schedules.polynomial(0.0, 0.9, 0, 100, frequency=10)
    f = jax.jit(lambda t: (sched(t), sched.is_update_step(t)))
    assert float(f(100)[0]) == pytest.approx(0.9) and bool(f(50)[1])


@pytest.mark.parametrize(
    "sched",
    [
        jp.schedules.polynomial(0.0, 0.9, 0, 100, frequency=10),
        jp.schedules.constant(0.7),
        jp.schedules.one_shot(0.3, step=7),
    ],
)
def test_schedule_is_jittable_and_hashable_as_is(sched):
    # jax.jit(schedule) needs a weak reference to the callable.
    steps = jnp.arange(0, 120, 7)
    want = [float(sched(t)) for t in steps]
    # Jitted, XLA may fuse the float32 arithmetic differently (last bits; jax 0.12).
    np.testing.assert_allclose([float(jax.jit(sched)(t)) for t in steps], want, rtol=1e-6)
    assert [bool(jax.jit(sched.is_update_step)(t)) for t in steps] == [
        bool(sched.is_update_step(t)) for t in steps
    ]
    assert hash(sched) == hash(sched) and {sched: 1}[sched] == 1


def test_constant_and_one_shot():
    c = jp.schedules.constant(0.7, begin_step=5, frequency=10)
    assert [t for t in range(40) if bool(c.is_update_step(t))] == [5, 15, 25, 35]
    assert float(c(0)) == pytest.approx(0.7)
    once = jp.schedules.constant(0.7)
    assert [t for t in range(20) if bool(once.is_update_step(t))] == [0]
    o = jp.schedules.one_shot(0.3, step=7)
    assert [t for t in range(20) if bool(o.is_update_step(t))] == [7]


@pytest.mark.parametrize("bad", [-0.5, 1.01])
def test_out_of_range(bad):
    with pytest.raises(ValueError, match=r"final_sparsity must be in \[0, 1\].*got"):
        jp.schedules.polynomial(0.0, bad, 0, 10)
    with pytest.raises(ValueError, match=r"initial_sparsity must be in \[0, 1\]"):
        jp.schedules.polynomial(bad, 0.5, 0, 10)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\]"):
        jp.schedules.constant(bad)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\]"):
        jp.schedules.one_shot(bad, 3)


def test_end_before_begin():
    with pytest.raises(
        ValueError, match=r"end_step must be >= begin_step, got end_step=5 < begin_step=10"
    ):
        jp.schedules.polynomial(0.0, 0.5, begin_step=10, end_step=5)


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_frequency(bad):
    with pytest.raises(ValueError, match=r"frequency must be an int >= 1.*got"):
        jp.schedules.polynomial(0.0, 0.5, 0, 10, frequency=bad)


def test_negative_step():
    with pytest.raises(ValueError, match=r"begin_step must be an int in \[0, 2\*\*31\) .*got -1"):
        jp.schedules.polynomial(0.0, 0.5, begin_step=-1, end_step=10)


def test_numpy_and_jax_integer_steps_are_accepted():
    s = jp.schedules.polynomial(0.0, 0.5, begin_step=np.int64(5), end_step=jax.numpy.int32(10))
    assert (s.begin_step, s.end_step) == (5, 10) and type(s.begin_step) is int
    assert jp.schedules.constant(0.5, frequency=np.int32(3)).frequency == 3


def test_steps_past_the_int32_counter_are_rejected():
    with pytest.raises(ValueError, match=r"begin_step must be an int in \[0, 2\*\*31\)"):
        jp.schedules.constant(0.5, begin_step=2**31)
    with pytest.raises(ValueError, match=r"frequency must be an int >= 1 .*got True"):
        jp.schedules.constant(0.5, frequency=True)


@pytest.mark.parametrize("value", [90.0, -0.5, float("nan")])
def test_callable_sparsity_outside_0_1_is_rejected_when_built(value):
    with pytest.raises(ValueError, match=r"sparsity\(step\) must return a fraction in \[0, 1\]"):
        jp.prune(optax.sgd(0.1), sparsity=lambda step: value + 0.0 * step)


def test_callable_sparsity_checked_beyond_step_0():
    # A schedule in percent starts in range at step 0 and leaves it later.
    with pytest.raises(ValueError, match=r"got 9.0 at step 1\. Fix"):
        jp.prune(optax.sgd(0.1), sparsity=optax.linear_schedule(0.0, 90.0, 10))
    with pytest.raises(ValueError, match=r"got 1.5 at step 100000\."):
        jp.prune(optax.sgd(0.1), sparsity=lambda step: jnp.where(step > 50_000, 1.5, 0.5))
    jp.prune(optax.sgd(0.1), sparsity=optax.linear_schedule(0.0, 0.9, 10))  # in range


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0, None, 0), r"frequency must be an int >= 1.*got 0"),
        ((0, None, 2.5), r"frequency must be an int >= 1.*got 2\.5"),
        ((-1, None, 10), r"begin_step must be an int in \[0, 2\*\*31\).*got -1"),
        ((10, 5, 1), r"end_step must be >= begin_step.*end_step=5 < begin_step=10"),
        (("10", None, 1), r"begin_step must be an int.*got '10'"),
    ],
)
def test_schedule_built_by_hand_is_checked(args, match):
    with pytest.raises(ValueError, match=match):
        jp.schedules.Schedule(lambda t: 0.5, *args)


def test_schedule_fn_must_be_callable_and_steps_become_python_ints():
    with pytest.raises(ValueError, match=r"fn must be a callable step -> sparsity, got 0\.5"):
        jp.schedules.Schedule(0.5, 0, None, 1)
    s = jp.schedules.Schedule(lambda t: 0.5, np.int64(3), jnp.int32(9), np.int32(2))
    assert (s.begin_step, s.end_step, s.frequency) == (3, 9, 2)
    assert all(type(v) is int for v in (s.begin_step, s.end_step, s.frequency))
    assert [t for t in range(12) if bool(s.is_update_step(t))] == [3, 5, 7, 9]


def test_schedules_built_alike_are_equal_and_say_what_they_are():
    a = jp.schedules.polynomial(0.0, 0.9, 0, 1000, frequency=100)
    assert a == jp.schedules.polynomial(0.0, 0.9, 0, 1000, 100, 3) and hash(a) == hash(
        jp.schedules.polynomial(0.0, 0.9, 0, 1000, 100, 3)
    )
    assert a != jp.schedules.polynomial(0.0, 0.9, 0, 1000, frequency=100, power=2)
    assert a != jp.schedules.polynomial(0.0, 0.9, 0, 1000, frequency=50)
    assert repr(a) == (
        "Schedule(fn=polynomial(0.0, 0.9, 0, 1000, power=3), begin_step=0, end_step=1000, "
        "frequency=100)"
    )
    assert jp.schedules.constant(0.5) == jp.schedules.as_schedule(0.5)
    assert "fn=constant(0.5)" in repr(jp.schedules.one_shot(0.5, step=3))
