"""Bad input across the public API: silent wrong results and deep crashes found in review."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune as jp
from jaxprune import adversarial, distributions, gates, llm, merge, structure
from jaxprune import checkpoint as ckpt


def _pruned(mask):
    return sorted(int(i) for i in np.flatnonzero(~np.asarray(mask).ravel()))


def test_every_nan_score_counts_as_highest_whatever_its_sign_bit():
    base = jnp.arange(1.0, 11.0).reshape(2, 5)
    pos_nan = base.at[0, 0].set(jnp.nan)  # sign bit clear
    neg_nan = base.at[0, 0].set(jnp.inf - jnp.inf)  # arithmetic NaN: sign bit set
    assert int(jax.lax.bitcast_convert_type(neg_nan[0, 0], jnp.uint32)) >> 31 == 1
    for s in (pos_nan, neg_nan):
        assert _pruned(jp.masks.topk({"w": s}, 0.3)["w"]) == [1, 2, 3]
        assert _pruned(jp.masks.global_topk({"w": s}, 0.3)["w"]) == [1, 2, 3]
    # saliency (|w g|) and OBD (h w^2 / 2) now agree on a NaN entry.
    w = {"w": base}
    g = {"w": jnp.ones((2, 5)).at[1, 4].set(jnp.nan)}
    h = {"w": jnp.ones((2, 5)).at[1, 4].set(jnp.inf - jnp.inf)}
    sal = jp.masks.topk(jp.criteria.saliency(w, g), 0.3)["w"]
    obd = jp.masks.topk(jp.criteria.obd(w, h), 0.3)["w"]
    assert _pruned(sal) == _pruned(obd) == [0, 1, 2]


def test_wanda_prune_refuses_non_finite_norms():
    k = jnp.ones((4, 2))
    with pytest.raises(ValueError, match="input_norms must be finite L2 norms"):
        llm.wanda_prune(k, jnp.array([1.0, jnp.nan, 1.0, 1.0]), sparsity=0.5)
    with pytest.raises(ValueError, match="input_norms must be an array of L2 norms.*got None"):
        llm.wanda_prune(k, None, sparsity=0.5)


def test_a_traced_nan_sparsity_prunes_nothing():
    x = {"w": jnp.arange(10.0).reshape(2, 5)}
    for select in (jp.masks.topk, jp.masks.global_topk):
        m = jax.jit(lambda s, select=select: select(x, s))(jnp.float32(jnp.nan))
        assert bool(jnp.all(m["w"]))
    # Out-of-range traced values are still clipped.
    m = jax.jit(lambda s: jp.masks.topk(x, s))(jnp.float32(2.0))
    assert not bool(jnp.any(m["w"]))


def test_bool_and_str_sparsities_are_refused_everywhere():
    p = {"w": jnp.ones((4, 8))}
    calls = [
        lambda s: jp.masks.topk(p, s),
        lambda s: jp.masks.global_topk(p, s),
        lambda s: jp.masks.topk(p, {"w": s}),
        lambda s: distributions.per_output(p, s),
        lambda s: distributions.uniform(p, s),
        lambda s: distributions.erk(p, s),
    ]
    for call in calls:
        for bad in (True, np.True_, "0.5"):
            with pytest.raises(ValueError, match=r"sparsity.* must be a number in \[0, 1\]"):
                call(bad)
    with pytest.raises(ValueError, match=r"got an array of shape \(2,\)"):
        jp.masks.topk(p["w"], np.array([0.5, 0.5]))


def test_erk_checks_power_scale_and_skips_zero_size_leaves():
    p = {"a": jnp.ones((8, 8)), "e": jnp.ones((0, 4)), "b": jnp.ones((8, 2))}
    for bad in (float("nan"), -1.0, "1"):
        with pytest.raises(ValueError, match="power_scale must be a finite number >= 0"):
            distributions.erk(p, 0.5, power_scale=bad)
    s = distributions.erk(p, 0.5)
    assert s["e"] == 0.0
    n = {"a": 64, "b": 16}
    kept = sum((1 - float(s[k])) * v for k, v in n.items())
    assert abs(kept - 40) < 1e-3
    # rigl's default distribution is erk: a zero-size leaf no longer breaks init.
    tx = jp.dynamic.rigl(optax.sgd(0.1), sparsity=0.5, key=jax.random.key(0), end_step=10)
    state = tx.init(p)
    assert jp.get_masks(state)["e"].shape in ((), (0, 4))


def test_merge_pair_refuses_the_no_pair_sentinel_and_bad_indices():
    h = jnp.array([[1.0, 3.0, 0.0], [2.0, 5.0, 1.0]])
    w, b = jnp.eye(3), jnp.zeros(3)
    with pytest.raises(ValueError, match="most_correlated_pair found no pair"):
        merge.merge_pair(h, w, b, -1, -1)
    with pytest.raises(ValueError, match="two different units, got i=j=1"):
        merge.merge_pair(h, w, b, 1, 1)
    with pytest.raises(ValueError, match=r"j=7 is not a unit index in \[0, 3\)"):
        merge.merge_pair(h, w, b, 0, 7)
    with pytest.raises(ValueError, match="i must be one integer unit index"):
        merge.merge_pair(h, w, b, 0.0, 1)
    # Traced: an invalid pair leaves the layer unchanged.
    w2, b2 = jax.jit(lambda i, j: merge.merge_pair(h, w, b, i, j))(1, 1)
    assert bool(jnp.all(w2 == w)) and bool(jnp.all(b2 == b))
    w2, _ = jax.jit(lambda i, j: merge.merge_pair(h, w, b, i, j))(0, 1)
    assert w2[1].tolist() == [0.0, 0.0, 0.0] and w2[0].tolist() == [1.0, 2.0, 0.0]


def test_a_batch_of_keys_is_refused_where_it_is_given():
    keys = jax.random.split(jax.random.key(0), 3)
    p = {"w": jnp.ones((4, 4))}
    with pytest.raises(ValueError, match=r"key must be one PRNG key, got a batch .* \(3,\)"):
        jp.prune(optax.sgd(0.1), sparsity=0.5, criterion=jp.criteria.random, key=keys)
    with pytest.raises(ValueError, match="key must be one PRNG key"):
        jp.criteria.random(p, key=keys)
    with pytest.raises(ValueError, match="key must be one PRNG key"):
        jp.dynamic.rigl(optax.sgd(0.1), sparsity=0.5, key=keys, end_step=10)
    # rigl takes raw keys as jp.prune does.
    tx = jp.dynamic.rigl(optax.sgd(0.1), sparsity=0.5, key=jax.random.PRNGKey(0), end_step=10)
    assert jp.sparsity(jp.get_masks(tx.init(p))) == 0.5


def test_gate_kind_mistakes_are_named():
    p = {"fc": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)}}
    with pytest.raises(ValueError, match="gate must be a gate kind instance, got the class"):
        gates.init_gates(gates.HardConcrete, p)
    with pytest.raises(ValueError, match="gate must be a gate kind instance, got None"):
        gates.init_gates(None, p)
    gp = gates.init_gates(gates.HardConcrete(), p)
    with pytest.raises(ValueError, match="made by another gate kind"):
        gates.penalty(gates.BetaBernoulli(), gp)


def test_attack_argument_types_are_checked():
    x = jnp.full((2, 3), 0.5)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        adversarial.fgsm(lambda z: z.sum(1), x, eps="0.1")
    with pytest.raises(ValueError, match=r"bounds must be a pair \(low, high\), got None"):
        adversarial.fgsm(lambda z: z.sum(1), x, eps=0.1, bounds=None)

    def apply_fn(params, xb, key):
        return xb @ params, []

    with pytest.raises(ValueError, match="same number .* got 0 inputs and 0 labels"):
        adversarial.robustness(
            apply_fn, jnp.ones((3, 2)), x[:0], jnp.zeros((0,), jnp.int32),
            eps=0.1, step_size=0.05, steps=1, key=jax.random.key(0), progress=False,
        )  # fmt: skip


def test_shape_and_type_mistakes_get_clear_messages():
    k = jnp.ones((8, 4))
    with pytest.raises(ValueError, match=r"kernel \(8, 4\), pruned \(4, 4\)"):
        llm.reconstruction_error(k, k[:4], jnp.eye(8))
    with pytest.raises(ValueError, match=r"hessian \(3, 3\)"):
        llm.reconstruction_error(k, k, jnp.eye(3))

    def mlp(p, x):
        return x @ p["w1"] @ p["w2"]

    p = {"w1": jnp.ones((4, 3)), "w2": jnp.ones((3, 2))}
    with pytest.raises(ValueError, match=r"example inputs of shapes \[\(1, 5\)\]"):
        structure.groups(mlp, p, jnp.ones((1, 5)))
    with pytest.raises(ValueError, match="groups must be the sequence of groups"):
        structure.select(None, p, 0.5)
    with pytest.raises(ValueError, match="example_inputs must be a tuple"):
        structure.prune_layerwise(mlp, p, jnp.ones((1, 4)), sparsity=0.5, progress=False)
    with pytest.raises(ValueError, match="where must be a predicate"):
        jp.masks.topk(p, 0.5, where={"w1": True})
    with pytest.raises(ValueError, match="scope must be 'layer'"):
        jp.prune(optax.sgd(0.1), sparsity=0.5, scope={"w1": "layer"})
    with pytest.raises(ValueError, match=r"axis must be an int axis .* got 5"):
        distributions.per_output(p, 0.5, axis=5)
    with pytest.raises(ValueError, match="loss_fn must be a function"):
        jp.criteria.fisher_diag(None, p, jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="decay must be in"):
        jp.criteria.ema_saliency("0.9")
    with pytest.raises(ValueError, match="decay must be in"):
        jp.criteria.ema_saliency(False)
    with pytest.raises(ValueError, match="has dtype float32, not bool"):
        jp.apply_masks(p, {"w1": jnp.full((4, 3), 0.5), "w2": jnp.ones((3, 2), bool)})


def test_checkpoint_path_and_params_mistakes(tmp_path):
    p = {"w": jnp.ones((2, 2))}
    with pytest.raises(ValueError, match="directory must be a path"):
        ckpt.save(None, 1, p)
    with pytest.raises(ValueError, match="params is None: there is nothing to save"):
        ckpt.save(str(tmp_path / "c"), 1, None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.disk_bytes(str(tmp_path / "missing"))
    assert not (tmp_path / "c").exists()


def test_bound_partial_of_a_checked_criterion_still_works():
    # The refusals above must not catch what was accepted before.
    crit = functools.partial(jp.criteria.random, key=jax.random.key(1))
    tx = jp.prune(optax.sgd(0.1), sparsity=0.5, criterion=crit)
    p = {"w": jnp.arange(16.0).reshape(4, 4)}
    u, s = tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)
    assert jp.sparsity(jp.get_masks(s)) == 0.5
