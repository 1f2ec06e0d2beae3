"""QA round 9 (porting from TF-MOT / jaxpruner): argument order, scope, custom schedules."""

import functools

import jax.numpy as jnp
import optax
import pytest

import jaxprune as jp


def test_polynomial_takes_frequency_then_power_positionally():
    # The contract's order: polynomial(s_i, s_f, begin, end, frequency=1, power=3).
    s = jp.schedules.polynomial(0.0, 0.9, 0, 1000, 100, 3)
    assert s == jp.schedules.polynomial(0.0, 0.9, 0, 1000, frequency=100, power=3)
    assert [round(float(s(t)), 4) for t in (100, 300, 500)] == [0.2439, 0.5913, 0.7875]
    assert [t for t in range(301) if bool(s.is_update_step(t))] == [0, 100, 200, 300]
    # TF-MOT's PolynomialDecay(s_i, s_f, begin, end, power, frequency), ported
    # positionally, swaps them (frequency=3, power=100): a warning says so.
    with pytest.warns(UserWarning, match=r"power=100.*swap them.*frequency=100, power=3"):
        jp.schedules.polynomial(0.0, 0.9, 0, 1000, 3, 100)


@pytest.mark.parametrize(
    "dist",
    [
        jp.distributions.erk,
        jp.distributions.uniform,
        jp.distributions.explicit({"w": 0.5}),
        functools.partial(jp.distributions.erk, power_scale=0.5),
    ],
    ids=["erk", "uniform", "explicit", "partial_erk"],
)
def test_distribution_as_scope_is_refused(dist):
    # It used to be accepted and prune nothing (float sparsities cast to True masks).
    with pytest.raises(ValueError, match=r"scope.*selection\(jp\.distributions\.erk\)"):
        jp.prune(optax.sgd(0.1), sparsity=0.5, scope=dist)


def test_wrapped_distribution_and_per_output_still_accepted_as_scope():
    params = {"w": jnp.arange(1.0, 65.0).reshape(8, 8)}
    for scope in (jp.distributions.selection(jp.distributions.erk), jp.distributions.per_output):
        tx = jp.prune(optax.sgd(0.0), sparsity=0.5, scope=scope)
        _, st = tx.update(params, tx.init(params), params)
        assert int(jp.get_masks(st)["w"].sum()) == 32


def test_tfmot_style_schedule_error_points_to_schedule_class():
    def tfmot_style(step):  # like ConstantSparsity(0.5, 0, frequency=100).__call__
        return (step % 100 == 0), jnp.float32(0.5)

    params = {"w": jnp.ones((8, 8))}
    tx = jp.prune(optax.sgd(0.1), sparsity=tfmot_style)
    with pytest.raises(ValueError, match=r"TF-MOT.*only the sparsity.*jp\.schedules\.Schedule"):
        tx.update(params, tx.init(params), params)
