"""Regression tests for reproduced review findings (gates, SparseGPT, drivers, RigL, PGD, merge).

Each test is the smallest case that showed the bug: a saturating ranking
score, a per-layer penalty that should be global, a shrunken SparseGPT block,
a predicate evaluated on the wrong tree, a schedule without a horizon, a
bfloat16 projection rounding out of the eps-ball, a unit merged into itself
and a shared module captured once.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxprune as jp
import jaxprune.activations  # noqa: F401
import jaxprune.merge  # noqa: F401
from jaxprune import adversarial, gates, llm
from jaxprune.models import MLP

# 1. Global selection ranks by non-saturating scores.


def test_hard_concrete_sparsity_ranks_by_log_alpha_not_the_clipped_gate():
    g = gates.HardConcrete()
    params = {"a": {"kernel": jnp.ones((3, 4))}, "b": {"kernel": jnp.ones((4, 4))}}
    gp = {
        "a/kernel": {"gate_log_alpha": jnp.full((4,), 9.0)},  # confidently open
        "b/kernel": {"gate_log_alpha": jnp.array([2.5, 2.6, 2.7, 2.8])},  # barely open
    }
    # Both layers' test gates are exactly 1: the clipped gate cannot rank them.
    assert np.all(np.asarray(g.unit_gate(gp["b/kernel"], None)) == 1.0)
    with pytest.warns(UserWarning, match=r"pruned every unit of \['b/kernel'\]"):
        m = gates.unit_masks(g, gp, params, sparsity=0.5)
    assert np.asarray(m["a/kernel"]).all() and not np.asarray(m["b/kernel"]).any()
    # Within a layer, the order is log_alpha's too.
    gp["a/kernel"] = {"gate_log_alpha": jnp.array([9.0, 3.0, 5.0, 7.0])}
    with pytest.warns(UserWarning, match="pruned every unit"):
        m = gates.unit_masks(g, gp, params, sparsity=0.75)
    assert np.asarray(m["a/kernel"]).tolist() == [True, False, False, True]
    # keep() still thresholds the test gate (open where log_alpha > log(1/11)).
    keep = g.keep({"gate_log_alpha": jnp.array([-2.5, -2.3, 0.0])})
    assert np.asarray(keep).tolist() == [False, True, True]


def test_hard_concrete_hard_masks_on_an_nnx_model_rank_by_log_alpha():
    model = MLP((3, 4, 4, 2), rngs=nnx.Rngs(0))
    gates.attach(model, gates.HardConcrete(), key=jax.random.key(0), skip=("layers/2",))
    (_, first), (_, second) = gates.gated_layers(model)
    first.gate_log_alpha.set_value(jnp.full((4,), 9.0))
    second.gate_log_alpha.set_value(jnp.array([2.5, 2.6, 2.7, 2.8]))
    with pytest.warns(UserWarning, match=r"pruned every unit of \['layers/1/kernel'\].*lower"):
        m = gates.hard_masks(model, sparsity=0.5)
    assert np.asarray(m["layers"][0]["kernel"]).all()
    assert not np.asarray(m["layers"][1]["kernel"]).any()


def test_variational_dropout_sparsity_ranks_by_unclipped_log_alpha():
    g = gates.VariationalDropout()
    params = {"a": {"kernel": jnp.ones((2, 2))}, "b": {"kernel": jnp.ones((2, 2))}}
    # log_alpha = log sigma^2 here (w = 1); both are below -8, where the clip ties them.
    for reliable, other in (("a", "b"), ("b", "a")):
        gp = {
            f"{reliable}/kernel": {"gate_log_sigma2": jnp.full((2, 2), -30.0)},
            f"{other}/kernel": {"gate_log_sigma2": jnp.full((2, 2), -9.0)},
        }
        with pytest.warns(UserWarning, match="pruned every unit"):
            m = gates.unit_masks(g, gp, params, sparsity=0.5)
        assert np.asarray(m[f"{reliable}/kernel"]).all(), reliable
        assert not np.asarray(m[f"{other}/kernel"]).any(), reliable
        # keep() is unchanged: log_alpha <= threshold.
        assert np.asarray(gates.unit_masks(g, gp, params)[f"{other}/kernel"]).all()


def test_beta_bernoulli_sparsity_ranks_units_below_the_threshold():
    g = gates.BetaBernoulli()

    def gp(a):  # softplus^-1, so that the Kumaraswamy (a, b) = (a, 1): E[pi] = a / (a + 1)
        return {
            "gate_a": jnp.full((2,), np.log(np.expm1(a)), jnp.float32),
            "gate_b": jnp.full((2,), np.log(np.expm1(1.0)), jnp.float32),
        }

    params = {k: {"kernel": jnp.ones((2, 2))} for k in ("a", "b", "c")}
    # Two layers below the 1e-3 threshold (test gate exactly 0), one clearly open.
    for low, lower in (("a", "b"), ("b", "a")):
        gps = {f"{low}/kernel": gp(5e-4), f"{lower}/kernel": gp(1e-5), "c/kernel": gp(10.0)}
        assert not np.asarray(g.unit_gate(gps[f"{low}/kernel"], None)).any()
        with pytest.warns(UserWarning, match="pruned every unit"):
            m = gates.unit_masks(g, gps, params, sparsity=1 / 3)
        assert np.asarray(m[f"{low}/kernel"]).all(), low
        assert not np.asarray(m[f"{lower}/kernel"]).any(), low
        assert np.asarray(m["c/kernel"]).all()
        with pytest.warns(UserWarning, match="pruned every unit"):  # by the gates alone
            assert not np.asarray(gates.unit_masks(g, gps, params)[f"{low}/kernel"]).any()


# 2. The nnx penalty is the functional one (one call per gate kind).


def _attached(gate):
    model = MLP((3, 5, 4, 2), rngs=nnx.Rngs(0))
    return gates.attach(model, gate, key=jax.random.key(1), skip=("layers/2",))


def test_nnx_scalar_gate_penalty_is_over_all_gates():
    g = gates.ScalarGate()
    model = _attached(g)
    (_, first), (_, second) = gates.gated_layers(model)
    first.gate_scale.set_value(jnp.full((5,), 0.4))
    second.gate_scale.set_value(jnp.zeros(4))
    gp = {f"{'/'.join(map(str, p))}/kernel": m.gate_params() for p, m in gates.gated_layers(model)}
    want = 0.5 * ((5 * 0.4) / 9 - 0.2) ** 2
    np.testing.assert_allclose(float(gates.model_penalty(model)), want, rtol=1e-5)
    assert float(gates.model_penalty(model)) == float(gates.penalty(g, gp))


@pytest.mark.parametrize(
    "gate",
    [gates.HardConcrete(), gates.VariationalDropout(), gates.BetaBernoulli()],
    ids=["l0", "vd", "bb"],
)
def test_nnx_summed_penalties_are_unchanged(gate):
    model = _attached(gate)
    layers = gates.gated_layers(model)
    old = jnp.float32(0)  # the former per-layer sum
    for _, m in layers:
        old = old + m.gate.penalty([m.gate_params()], [m.module.kernel.get_value()])
    assert float(gates.model_penalty(model)) == float(old)


# 3. SparseGPT keeps the requested block size; the last block is ragged.


def _sparsegpt_reference(w, h, sparsity, nm, blocksize, damp=0.01):
    """NumPy port of the reference ``fasterprune`` (float64), pruning exactly round(s * n)."""
    w = np.asarray(w, np.float64).T.copy()  # [rows=out, cols=in]
    h = np.asarray(h, np.float64).copy()
    rows, cols = w.shape
    h[np.diag_indices(cols)] += damp * np.mean(np.diag(h))
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1, hinv1 = w[:, i1:i2].copy(), hinv[i1:i2, i1:i2]
        err1, q1 = np.zeros_like(w1), np.zeros_like(w1)
        mask = np.zeros_like(w1, bool)
        if nm is None:
            tmp = (w1**2 / np.diag(hinv1)[None, :] ** 2).ravel()
            mask.ravel()[np.argsort(tmp, kind="stable")[: round(sparsity * tmp.size)]] = True
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                tmp = w1[:, i : i + nm[1]] ** 2 / np.diag(hinv1)[i : i + nm[1]][None, :] ** 2
                low = np.argsort(tmp, axis=1, kind="stable")[:, : nm[1] - nm[0]]
                np.put_along_axis(mask[:, i : i + nm[1]], low, True, axis=1)
            q = np.where(mask[:, i], 0.0, w1[:, i])
            err = (w1[:, i] - q) / hinv1[i, i]
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            q1[:, i], err1[:, i] = q, err
        w[:, i1:i2] = q1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w.T


@pytest.mark.parametrize(
    ("cols", "blocksize", "nm", "sparsity"),
    [(13, 4, None, 0.4), (12, 8, (2, 4), 0.5)],
    ids=["ragged-unstructured", "ragged-2:4"],
)
def test_sparsegpt_ragged_last_block_matches_the_reference(cols, blocksize, nm, sparsity):
    x = jax.random.normal(jax.random.key(0), (64, cols))
    w = jax.random.normal(jax.random.key(1), (cols, 5))
    h = x.T @ x
    got = llm.sparsegpt(w, h, sparsity=sparsity, nm=nm, blocksize=blocksize)
    # blocksize is a multiple of m here, so the reference uses it as given.
    want = _sparsegpt_reference(w, h, sparsity, nm, blocksize)
    np.testing.assert_array_equal(np.asarray(got) == 0, want == 0)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-4, rtol=2e-4)


def test_sparsegpt_prime_input_size_keeps_the_block_and_the_sparsity():
    from jaxprune import llm_solvers

    assert llm_solvers._block_size(131, 128, None) == 128  # was 1: a per-column mask
    assert llm_solvers._block_size(12, 6, (2, 4)) == 4  # N:M groups never straddle blocks
    x = jax.random.normal(jax.random.key(0), (128, 37))
    w = jax.random.normal(jax.random.key(1), (37, 4))
    p = llm.sparsegpt(w, x.T @ x, sparsity=0.5, blocksize=16)
    # Two full blocks prune round(0.5 * 16 * 4) each, the ragged one round(0.5 * 5 * 4).
    assert int((p == 0).sum()) == 32 + 32 + 10
    with pytest.raises(ValueError, match="blocksize must be a positive int"):
        llm.sparsegpt(w, x.T @ x, blocksize=0)


# 4. Round.sparsity counts over the leaves `where` selects on the params.


def test_iterative_pruning_sparsity_with_a_dtype_based_where():
    params = {
        "a": jax.random.normal(jax.random.key(0), (10, 10)),
        "b": jax.random.normal(jax.random.key(1), (10, 5)),
    }

    def where(path, x):
        return jnp.issubdtype(x.dtype, jnp.floating) and x.ndim == 2 and path[0] == "a"

    rounds = jp.drivers.iterative_pruning(
        lambda p, m: jp.apply_masks(p, m), params, rounds=2, rate=0.5, where=where
    )
    assert [r.sparsity for r in rounds] == [0.0, 0.5, 0.75]
    assert [float(1 - jnp.mean(r.masks["a"])) for r in rounds] == [0.0, 0.5, 0.75]


# 5. Gate masks name the missing layer instead of failing on None.


@pytest.mark.parametrize("fn", ["to_masks", "unit_masks"])
def test_vd_masks_with_mismatched_params_raise_the_clear_error(fn):
    g = gates.VariationalDropout()
    params = {"fc": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)}}
    gp = gates.init_gates(g, params)
    with pytest.raises(ValueError, match="gate_params name layers that params does not have"):
        getattr(gates, fn)(g, gp, {"params": params}, sparsity=0.5)
    with pytest.raises(ValueError, match="gate_params name layers that params does not have"):
        getattr(gates, fn)(g, gp, {"params": params})


# 6. RigL needs its horizon; any real sparsity is accepted.


def test_rigl_requires_end_step_and_set_does_not():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="end_step must be a positive int for RigL"):
        jp.dynamic.rigl(optax.sgd(0.1), sparsity=0.5, key=key, end_step=None)
    with pytest.raises(ValueError, match="end_step must be a positive int"):
        jp.dynamic.rigl(optax.sgd(0.1), sparsity=0.5, key=key, end_step=0)
    params = {"w": jnp.ones((8, 8))}
    tx = jp.dynamic.set(optax.sgd(0.1), sparsity=np.float32(0.5), key=key, update_every=1)
    assert float(jp.sparsity(jp.dynamic.get_masks(tx.init(params)))) == 0.5
    tx = jp.dynamic.rigl(
        optax.sgd(0.1), sparsity=np.float32(0.5), key=key, end_step=np.int64(4), update_every=1
    )
    state = tx.init(params)
    _, state = jax.jit(tx.update)(params, state, params)
    _, state = jax.jit(tx.update)(params, state, params)  # step 1: a drop/grow update
    assert float(jp.sparsity(jp.dynamic.get_masks(state))) == 0.5
    with pytest.raises(ValueError, match="sparsity must be a float in"):
        jp.dynamic.set(optax.sgd(0.1), sparsity="0.5", key=key, update_every=1)


# 7. PGD and FGSM stay inside the eps-ball in bfloat16; float32 is unchanged.


def _attack_setup(dtype):
    x = jax.random.uniform(jax.random.key(1), (64, 12)).astype(dtype)
    w = jax.random.normal(jax.random.key(0), (12, 3))
    y = jnp.zeros(64, jnp.int32)
    return x, lambda z: adversarial.cross_entropy(z.astype(jnp.float32) @ w, y)


def test_pgd_and_fgsm_stay_in_the_eps_ball_in_bfloat16():
    x, loss = _attack_setup(jnp.bfloat16)
    eps = 0.1
    pgd = jax.jit(
        lambda x: adversarial.pgd(loss, x, eps=eps, step_size=0.03, steps=5, key=jax.random.key(2))
    )
    for adv in (pgd(x), jax.jit(lambda x: adversarial.fgsm(loss, x, eps=eps))(x)):
        assert adv.dtype == jnp.bfloat16
        dev = np.abs(np.asarray(adv, np.float32) - np.asarray(x, np.float32))
        assert dev.max() <= eps and dev.max() > 0.09  # in the ball and still attacking
        assert np.asarray(adv, np.float32).min() >= 0 and np.asarray(adv, np.float32).max() <= 1


def test_pgd_and_fgsm_float32_are_the_plain_clip_to_an_ulp_inside_the_exact_ball():
    # float32 attacks clip to the eps-ball as plain jnp.clip does, except that eps
    # is rounded down to a float32 (an ulp of eps at most) and an entry that
    # rounding put outside the exact ball (in float64) moves one ulp toward x.
    x, loss = _attack_setup(jnp.float32)
    eps, step, key = 0.1, 0.03, jax.random.key(2)
    g = jax.grad(lambda v: jnp.sum(loss(v)))(x)
    got = np.asarray(adversarial.fgsm(loss, x, eps=eps))
    plain = np.asarray(jnp.clip(x + eps * jnp.sign(g), 0.0, 1.0))
    tol = np.spacing(np.float32(eps)) + 2 * np.spacing(np.abs(plain).astype(np.float32))
    assert np.all(np.abs(got.astype(np.float64) - plain) <= tol)
    x64 = np.asarray(x, np.float64)
    assert np.abs(got - x64).max() <= eps
    pgd = adversarial.pgd(loss, x, eps=eps, step_size=step, steps=5, key=key, keep_best=False)
    assert np.abs(np.asarray(pgd, np.float64) - x64).max() <= eps


# 8. NoiseOut never merges a unit with itself.


def test_noiseout_raises_when_no_pair_is_left_and_never_self_merges():
    z = jax.random.normal(jax.random.key(0), (32, 1))
    h = jnp.concatenate([jax.nn.relu(z) + 0.1, jnp.zeros((32, 2))], axis=1)  # 2 dead units
    w, b = jnp.array([[2.0], [1.0], [-1.0]]), jnp.zeros(1)
    assert [int(v) for v in jp.merge.most_correlated_pair(h)] == [-1, -1]
    with pytest.raises(ValueError, match=r"could make only 0 of num_merges=1.*num_merges=0"):
        jp.merge.noiseout(h, w, b, 1)
    # One merge possible of two asked (unit 2 is constant): eager raises, jit skips.
    h2 = jnp.concatenate([z, 2 * z + 1, jnp.full((32, 1), 0.5)], axis=1)
    w2 = jnp.ones((3, 1))
    with pytest.raises(ValueError, match="could make only 1 of num_merges=2"):
        jp.merge.noiseout(h2, w2, jnp.zeros(1), 2)
    r = jax.jit(lambda h, w, b: jp.merge.noiseout(h, w, b, 2))(h2, w2, jnp.zeros(1))
    assert np.asarray(r.pairs).tolist() == [[0, 1], [-1, -1]]
    assert np.asarray(r.alive).tolist() == [True, False, True]
    # The skipped merge removed nothing: the constant unit's row is untouched.
    assert np.asarray(r.w_out).ravel().tolist()[1:] == [0.0, 1.0]


# 9. A shared module records all its calls.


def test_capture_pools_every_call_of_a_shared_module():
    class Shared(nnx.Module):
        def __init__(self, rngs):
            self.s = nnx.Linear(4, 4, rngs=rngs)

        def __call__(self, x):
            return self.s(self.s(x) * 0 + 100.0)

    m = Shared(nnx.Rngs(0))
    x = jnp.ones((3, 4))
    _, caps = jp.activations.capture_nnx(m, x)
    assert caps["s"].inputs.shape == (6, 4) and caps["s"].outputs.shape == (6, 4)
    params = nnx.to_pure_dict(nnx.state(m, nnx.Param))
    norms = jp.activations.input_norms(params, caps)["s"]["kernel"]
    np.testing.assert_allclose(np.asarray(norms), np.sqrt(3 + 3 * 100.0**2), rtol=1e-6)

    class SharedLinen(nn.Module):
        @nn.compact
        def __call__(self, x):
            d = nn.Dense(4)
            return d(d(x)[:, None, :])  # second call: a different rank

    v = SharedLinen().init(jax.random.key(0), x)
    _, lcaps = jp.activations.capture_linen(SharedLinen(), v, x)
    assert lcaps["Dense_0"].inputs.shape == (6, 4)  # [3, 4] + [3, 1, 4] flattened
