"""jaxprune's one-off programs compile with XLA's quickest CPU options that jaxlib has."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune.structure import evaluate


@pytest.fixture
def fresh_options(monkeypatch):
    evaluate._quick.cache_clear()
    yield monkeypatch
    evaluate._quick.cache_clear()


def test_quick_options_keep_the_classic_fusion_emitter_only_where_jaxlib_accepts_it(fresh_options):
    options = evaluate._quick()
    assert options.items() >= evaluate._QUICK.items()
    if "xla_cpu_use_fusion_emitters" in options:  # this jaxlib knows it: a compile takes it
        f = jax.jit(lambda x: x * 2, compiler_options=options)
        np.testing.assert_array_equal(f(jnp.arange(3.0)), [0.0, 2.0, 4.0])
    # A jaxlib without the option: the others are kept, nothing raises.
    evaluate._quick.cache_clear()
    fresh_options.setattr(evaluate, "_CLASSIC_FUSION", {"xla_cpu_no_such_option_here": False})
    assert evaluate._quick() == evaluate._QUICK


def test_run_once_and_run_cached_give_the_plain_jit_results(fresh_options):
    x = jnp.linspace(-3.0, 3.0, 1000, dtype=jnp.float32).reshape(10, 100)
    want = jax.jit(lambda a: jnp.tanh(a) @ a.T + jnp.exp(a).sum(0).mean())(x)
    for run in (evaluate.run_once, evaluate.run_cached):
        got = run(_fn, x)
        np.testing.assert_allclose(got, want, rtol=1e-6)


def _fn(a):
    return jnp.tanh(a) @ a.T + jnp.exp(a).sum(0).mean()
