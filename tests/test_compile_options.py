"""jaxprune's one-off programs compile with XLA's quickest CPU options that jaxlib has."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune as jp
from jaxprune import _compile
from jaxprune.structure import evaluate


@pytest.fixture
def fresh_options(monkeypatch):
    _compile.quick_options.cache_clear()
    yield monkeypatch
    _compile.quick_options.cache_clear()


def test_quick_options_keep_the_classic_fusion_emitter_only_where_jaxlib_accepts_it(fresh_options):
    options = _compile.quick_options()
    assert options.items() >= _compile.QUICK.items()
    if "xla_cpu_use_fusion_emitters" in options:  # this jaxlib knows it: a compile takes it
        f = jax.jit(lambda x: x * 2, compiler_options=options)
        np.testing.assert_array_equal(f(jnp.arange(3.0)), [0.0, 2.0, 4.0])
    # A jaxlib without the option: the others are kept, nothing raises.
    _compile.quick_options.cache_clear()
    fresh_options.setattr(_compile, "_CLASSIC_FUSION", {"xla_cpu_no_such_option_here": False})
    assert _compile.quick_options() == _compile.QUICK
    f = _compile.jit_once(_fn)
    np.testing.assert_allclose(f(jnp.ones((2, 2))), jax.jit(_fn)(jnp.ones((2, 2))), rtol=1e-6)


def test_one_off_programs_give_the_plain_jit_results(fresh_options):
    x = jnp.linspace(-3.0, 3.0, 1000, dtype=jnp.float32).reshape(10, 100)
    want = jax.jit(_fn)(x)
    for run in (evaluate.run_once, evaluate.run_cached):
        np.testing.assert_allclose(run(_fn, x), want)
    np.testing.assert_allclose(_compile.jit_once(_fn)(x), want)


def test_dynamic_init_masks_match_the_same_program_under_default_options():
    # jp.dynamic's first masks come from a quick-compiled program; the same
    # computation traced inside jax.jit (XLA's defaults) gives the same masks.
    params = {"w": jax.random.normal(jax.random.key(0), (64, 32)), "v": jnp.ones((32, 16))}
    tx = jp.dynamic.set(optax.sgd(0.1), sparsity=0.7, key=jax.random.key(3), update_every=5)
    eager = jp.get_masks(tx.init(params))
    traced = jp.get_masks(jax.jit(tx.init)(params))
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(traced), strict=True):
        np.testing.assert_array_equal(a, b)
    assert float(jp.sparsity(eager)) == pytest.approx(0.7, abs=1e-3)


def _fn(a):
    return jnp.tanh(a) @ a.T + jnp.exp(a).sum(0).mean()
