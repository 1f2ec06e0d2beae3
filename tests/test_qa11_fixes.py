"""Fixes from the 2026-11-24 review: float16 SynFlow under strict promotion, robustness
reusing its compiled attack, and checked arguments of vulnerability_loss and markov_corpus."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune as jp
from jaxprune import adversarial
from jaxprune.at_init_checks import _working_dtype
from jaxprune.models_llm import markov_corpus
from tests import _compiles


def _mlp(p, x):
    return jnp.maximum(x @ p["w1"], 0) @ p["w2"]


def test_synflow_on_float16_params_runs_under_strict_promotion():
    keys = jax.random.split(jax.random.key(0), 2)
    p = {
        "w1": jax.random.normal(keys[0], (6, 8)).astype(jnp.float16),
        "w2": jax.random.normal(keys[1], (8, 3)).astype(jnp.float16),
    }
    with jax.numpy_dtype_promotion("strict"):
        scores = jp.at_init.synflow_scores(_mlp, p, (1, 6))
        masks = jp.at_init.synflow(_mlp, p, (1, 6), 0.5)
    assert {s.dtype for s in jax.tree.leaves(scores)} == {jnp.dtype(jnp.float32)}
    # The same scores as in standard promotion (where float16 widened to float32 before).
    want = jp.at_init.synflow_scores(_mlp, p, (1, 6))
    for a, b in zip(jax.tree.leaves(scores), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    kept = sum(int(m.sum()) for m in jax.tree.leaves(masks))
    assert kept == 36  # half of the 72 weights


@pytest.mark.parametrize(
    "dtype, want",
    [
        (jnp.float16, jnp.float32),
        (jnp.bfloat16, jnp.float32),
        (jnp.float32, jnp.float32),
        (jnp.int32, jnp.float32),
    ],
)
def test_working_dtype_widens_to_float32_at_least(dtype, want):
    assert _working_dtype(dtype) == jnp.dtype(want)


def test_robustness_called_again_compiles_nothing(caplog, monkeypatch):
    _compiles.empty_programs(monkeypatch)

    def apply_fn(w, x, key):
        h = jnp.tanh(x @ w["a"])
        return h @ w["b"], [h]

    keys = jax.random.split(jax.random.key(0), 3)
    w = {"a": jax.random.normal(keys[0], (13, 17)), "b": jax.random.normal(keys[1], (17, 5))}
    x = np.asarray(jax.random.uniform(keys[2], (40, 13)))
    y = np.arange(40) % 5

    def run():
        return adversarial.robustness(
            apply_fn,
            w,
            x,
            y,
            eps=0.1,
            step_size=0.02,
            steps=3,
            key=jax.random.key(1),
            batch_size=20,
        )

    first, r1 = _compiles.compiled(caplog, run)
    again, r2 = _compiles.compiled(caplog, run)
    assert len(first) >= 2  # the attack and the scores
    assert again == []  # new closures, the same programs: found by content
    assert r1 == r2


@pytest.mark.parametrize("lam", [-1.0, float("nan"), float("inf"), "0.1", None, True])
def test_vulnerability_loss_refuses_a_bad_lam(lam):
    with pytest.raises(ValueError, match=r"lam must be a finite number >= 0.*Fix: e\.g\. lam=1e-3"):
        adversarial.vulnerability_loss([jnp.zeros(4)], [jnp.ones(4)], lam)


def test_vulnerability_loss_takes_zero_and_a_traced_lam():
    f, fa = [jnp.zeros(4)], [jnp.full(4, 0.5)]
    assert float(adversarial.vulnerability_loss(f, fa, 0)) == 0.0
    traced = jax.jit(lambda lam: adversarial.vulnerability_loss(f, fa, lam))
    assert float(traced(jnp.float32(0.5))) == 0.25


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(vocab=1), "vocab must be an int >= 2, got 1"),
        (dict(vocab=True), "vocab must be an int >= 2, got True"),
        (dict(time=1), "time must be an int >= 2, got 1"),
        (dict(sizes=(4, 0)), r"sizes must be a tuple of ints >= 1.*got \(4, 0\)"),
        (dict(sizes=4), "sizes must be a tuple of ints >= 1"),
        (dict(concentration=0.0), "concentration must be a finite number > 0"),
        (dict(concentration=float("nan")), "concentration must be a finite number > 0"),
        (dict(seed=-1), "seed must be an int >= 0, got -1"),
    ],
)
def test_markov_corpus_names_a_bad_argument(kwargs, message):
    args = dict(vocab=8, time=5, sizes=(3,))
    with pytest.raises(ValueError, match=message):
        markov_corpus(**{**args, **kwargs})


def test_markov_corpus_keeps_its_sets():
    a, b = markov_corpus(vocab=8, time=5, sizes=(3, 2), seed=1)
    assert a.shape == (3, 5) and b.shape == (2, 5)
    assert int(a.min()) >= 0 and int(a.max()) < 8
    again = markov_corpus(vocab=8, time=5, sizes=(3, 2), seed=1)
    np.testing.assert_array_equal(a, again[0])
