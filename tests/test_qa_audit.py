"""Regression tests of a correctness audit: criteria, merge, LLM solvers, patterns, attacks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune as jp
from jaxprune import attacks, llm, merge, robustness


def _linear(w, x, key):
    del key
    logits = x @ w
    return logits, [logits]


# --- patterns: non-finite scores ---------------------------------------------------------------


@pytest.mark.parametrize("value", [jnp.inf, jnp.nan])
def test_patterns_keep_an_entry_scored_inf_or_nan(value):
    # +inf and NaN rank highest (as in topk): the kernel keeps a pattern covering the entry,
    # the best of those by its other scores. Before, 0 * inf = NaN gave every pattern the
    # same NaN score and the kernel got library pattern 0, which drops the corner (0, 2).
    lib = jp.masks.pattern_library()
    s = jnp.ones((3, 3, 1, 1)).at[2, 1, 0, 0].set(5.0).at[0, 2, 0, 0].set(value)
    m = np.asarray(jp.masks.patterns({"k": s})["k"][:, :, 0, 0])
    assert m[0, 2] and m.sum() == 4
    finite = np.where(np.isfinite(np.asarray(s[:, :, 0, 0])), np.asarray(s[:, :, 0, 0]), 0)
    covering = [p for p in lib if p[0, 2]]
    best = max(covering, key=lambda p: (finite * p).sum())
    np.testing.assert_array_equal(m, best)
    jitted = jax.jit(lambda s: jp.masks.patterns({"k": s})["k"])(s)
    np.testing.assert_array_equal(np.asarray(jitted[:, :, 0, 0]), m)


def test_patterns_inf_kernel_is_kept_first_and_neg_inf_pruned_first():
    s = jax.random.uniform(jax.random.key(0), (3, 3, 2, 2))
    s = s.at[0, 2, 0, 0].set(jnp.inf).at[1, 1, 1, 1].set(-jnp.inf)
    m = jp.masks.patterns({"k": s}, 0.75)["k"]  # 3 of 4 kernels dropped
    kept = np.asarray(m.any(axis=(0, 1)))
    assert kept.tolist() == [[True, False], [False, False]]
    assert bool(m[0, 2, 0, 0])


# --- attacks and robustness: key=None ----------------------------------------------------------


def test_attack_with_random_start_refuses_key_none():
    # Before, key=None silently skipped the random start that random_start=True asked for.
    w = jnp.array([[1.0, -1.0], [-1.0, 1.0]])
    x, y = jnp.array([[0.6, 0.4]]), jnp.array([0])
    run = attacks.attack(_linear, eps=0.1, step_size=0.05, steps=2)
    with pytest.raises(ValueError, match="key=None, but random_start=True"):
        run(w, x, y, None)
    plain = attacks.attack(_linear, eps=0.1, step_size=0.05, steps=2, random_start=False)
    assert plain(w, x, y, None).shape == x.shape


def test_robustness_refuses_key_none():
    w = jnp.array([[1.0, -1.0], [-1.0, 1.0]])
    x, y = np.array([[0.6, 0.4], [0.1, 0.9]]), np.array([0, 1])
    with pytest.raises(ValueError, match="robustness needs key"):
        robustness.robustness(_linear, w, x, y, eps=0.1, step_size=0.05, steps=2, key=None)


@pytest.mark.parametrize("n", [2, 3])
def test_robustness_takes_logits_alone_as_attack_does(n):
    w = jnp.array([[1.0, -1.0], [-1.0, 1.0]])
    x = np.array([[0.6, 0.4], [0.1, 0.9], [0.45, 0.55]])[:n]
    y = np.array([0, 1, 0])[:n]
    kw = dict(eps=0.2, step_size=0.05, steps=5, key=jax.random.key(0))
    ref = robustness.robustness(_linear, w, x, y, **kw)
    out = robustness.robustness(lambda w, x, key: x @ w, w, x, y, **kw)
    assert (out["clean_acc"], out["adv_acc"]) == (ref["clean_acc"], ref["adv_acc"])
    assert np.isnan(out["vulnerability"])


def test_pgd_keep_best_must_be_a_bool():
    # Before, pgd took keep_best="no" as True (attack already refused it).
    with pytest.raises(ValueError, match="keep_best must be a bool, got 'no'"):
        attacks.pgd(
            lambda z: z.sum(1),
            jnp.full((2, 2), 0.5),
            eps=0.1,
            step_size=0.05,
            steps=1,
            keep_best="no",
        )


# --- merge -------------------------------------------------------------------------------------


def test_noiseout_bfloat16_kernel_under_strict_promotion(strict_promotion):
    h0 = jax.random.normal(jax.random.key(0), (32, 3))
    h = jnp.concatenate([h0, 2 * h0[:, :1] - 1], axis=1)
    w = jax.random.normal(jax.random.key(1), (4, 2))
    b = jnp.zeros(2)
    ref = merge.noiseout(h, w, b, 1)
    out = merge.noiseout(h, w.astype(jnp.bfloat16), b.astype(jnp.bfloat16), 1)
    assert out.w_out.dtype == out.b_out.dtype == jnp.bfloat16
    assert out.alive.tolist() == ref.alive.tolist() == [True, True, True, False]
    np.testing.assert_allclose(out.w_out.astype(jnp.float32), ref.w_out, atol=0.05)
    np.testing.assert_allclose(out.b_out.astype(jnp.float32), ref.b_out, atol=0.05)


def test_most_correlated_pair_refuses_1d_activations():
    # Before: IndexError (tuple index out of range).
    with pytest.raises(ValueError, match=r"h must be \[N, units\] activations"):
        merge.most_correlated_pair(jnp.ones(3))


# --- criteria ----------------------------------------------------------------------------------


@pytest.mark.parametrize("decay", [None, [0.9], "0.9", True, float("nan")])
@pytest.mark.parametrize(
    "factory", [jp.criteria.ema_saliency, jp.criteria.taylor_ema, jp.criteria.obd_fisher]
)
def test_decay_that_is_not_a_number_is_a_value_error(factory, decay):
    # Before, None and a list raised a TypeError from float().
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\)"):
        factory(decay)


def test_obd_takes_python_number_leaves_as_other_criteria_do():
    # Before: AttributeError ('float' object has no attribute 'astype').
    s = jp.criteria.obd({"a": 2.0, "k": jnp.ones((2, 2))}, {"a": 3.0, "k": jnp.ones((2, 2))})
    assert float(s["a"]) == 6.0 and s["a"].dtype == jnp.float32
    c = jp.criteria.obd_fisher(0.0)
    p = {"a": 2.0}
    assert float(c.score(c.update(c.init(p), p, {"a": 1.0}), p)["a"]) == 2.0


def test_obd_names_a_leaf_that_is_not_an_array():
    with pytest.raises(ValueError, match="hessian_diag leaf 'w' is a function"):
        jp.criteria.obd({"w": jnp.ones(2)}, {"w": _linear})


# --- pattern_library ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kernel_size", "n", "match"),
    [
        (3, 2, "kernel_size must be a pair of ints >= 1"),
        ((0, 3), 1, "kernel_size must be a pair of ints >= 1"),
        ((3, 3, 3), 2, "kernel_size must be a pair of ints >= 1"),
        ((3, 3), 2.5, r"n must be in \[1, 9\], an int"),
        ((3, 3), True, r"n must be in \[1, 9\], an int"),
        ((3, 3), 10, r"n must be in \[1, 9\], an int"),
    ],
)
def test_pattern_library_validates_its_arguments(kernel_size, n, match):
    with pytest.raises(ValueError, match=match):
        jp.masks.pattern_library(kernel_size, n)


def test_pattern_library_takes_numpy_ints():
    lib = jp.masks.pattern_library((np.int64(3), np.int64(3)), np.int64(4))
    np.testing.assert_array_equal(lib, jp.masks.pattern_library())


# --- LLM solvers -------------------------------------------------------------------------------


def test_reconstruction_error_bfloat16_hessian_under_strict_promotion(strict_promotion):
    w = jnp.array([[3.0, 0.0], [0.0, 4.0]])
    pruned = w.at[0, 0].set(0.0)
    err = llm.reconstruction_error(w, pruned, jnp.eye(2, dtype=jnp.bfloat16))
    assert float(err) == pytest.approx(9 / 25)
