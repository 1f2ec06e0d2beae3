"""Regression tests for the sparse-training QA findings (at_init, dynamic, drivers, schedules).

1. ``synflow`` traced ``apply_fn`` once per function object (a module-level jit).
2. SynFlow overflowed float32 on deep nets, and cast float64 scores to float32.
3. ``synflow`` did not warn when a layer ends fully pruned (a train-mode model).
4. The drivers' recipe for ``train`` did not enforce the round's masks, unnoticed.
5. ``rigl``/``set`` did not say they must be the last transform.
6. Argument validation gaps (drop_fraction, distribution, keys, schedules...).
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune as jp
import jaxprune.at_init  # noqa: F401
import jaxprune.drivers  # noqa: F401
import jaxprune.dynamic  # noqa: F401


def _same(a, b):
    return all(
        bool(jnp.array_equal(x, y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


# 1. Each synflow call traces apply_fn afresh.


def test_synflow_second_call_sees_what_apply_fn_reads_now():
    params = {
        "a": jax.random.normal(jax.random.key(0), (6, 6)),
        "b": jax.random.normal(jax.random.key(1), (6, 3)),
    }
    scale = {"a": 1.0, "b": 1.0}  # state apply_fn reads (BatchNorm statistics, a mode flag)

    def apply_fn(p, x):
        return jax.nn.relu(x @ (p["a"] * scale["a"])) @ (p["b"] * scale["b"])

    first = jp.at_init.synflow(apply_fn, params, (1, 6), 0.5, iterations=5)
    scale["a"] = jax.random.uniform(jax.random.key(7), (6, 6)) ** 4
    scale["b"] = jax.random.uniform(jax.random.key(8), (6, 3)) ** 4
    second = jp.at_init.synflow(apply_fn, params, (1, 6), 0.5, iterations=5)

    def fresh(p, x):
        return jax.nn.relu(x @ (p["a"] * scale["a"])) @ (p["b"] * scale["b"])

    expected = jp.at_init.synflow(fresh, params, (1, 6), 0.5, iterations=5)
    assert _same(second, expected)
    assert not _same(first, second)


# 2. Overflow: a clear error in float32, correct masks in float64.


def _deep_linear(scale):
    """A bias-free 3-layer ReLU net whose R is ~scale**3 * 8**3 (past float32 at 2**47)."""
    keys = jax.random.split(jax.random.key(0), 3)
    params = {f"l{i}": jax.random.normal(keys[i], (8, 8)) * scale for i in range(3)}

    def apply_fn(p, x):
        for i in range(3):
            x = jax.nn.relu(x @ p[f"l{i}"])
        return x

    return params, apply_fn


def test_synflow_overflow_in_float32_raises_naming_the_cause_and_the_fix():
    params, apply_fn = _deep_linear(2.0**47)
    match = r"not finite.*R = .*inf.*overflows float32 on deep networks.*Fix:.*jax_enable_x64"
    with pytest.raises(ValueError, match=match):
        jp.at_init.synflow_scores(apply_fn, params, (1, 8))
    with pytest.raises(ValueError, match=r"round 1 of 3.*Fix: run SynFlow in float64"):
        jp.at_init.synflow(apply_fn, params, (1, 8), 0.5, iterations=3)


def test_synflow_in_float64_keeps_the_dtype_and_the_ranking_past_float32_range():
    params, apply_fn = _deep_linear(1.0)
    with jax.enable_x64(True):
        small = jax.tree.map(lambda x: x.astype(jnp.float64), params)
        # Scaling every layer by 2**47 scales R (1e42, past float32) and every score by
        # 2**141, exactly in float64: the same ranking, so the same masks.
        big = jax.tree.map(lambda x: x * 2.0**47, small)
        scores = jp.at_init.synflow_scores(apply_fn, big, (1, 8))
        assert all(x.dtype == jnp.float64 for x in jax.tree.leaves(scores))
        assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(scores))
        assert float(max(x.max() for x in jax.tree.leaves(scores))) > 1e39
        want = jp.at_init.synflow(apply_fn, small, (1, 8), 0.6, iterations=4)
        got = jp.at_init.synflow(apply_fn, big, (1, 8), 0.6, iterations=4)
    assert _same(got, want)
    kept = [int(got[k].sum()) for k in sorted(got)]
    assert sum(kept) == 192 - round(0.6 * 192) and min(kept) > 0


# 3. Layer collapse warns, naming the leaves.


def _bn_net(train_mode):
    """``a`` feeds a batch-statistics normalisation: in train mode its scores are all 0."""

    def apply_fn(p, x):
        h = x @ p["a"]
        if train_mode:  # normalised by the batch of 1's own statistics: h - mean(h) = 0
            h = (h - h.mean(0)) / jnp.sqrt(h.var(0) + 1e-5)
        return jax.nn.relu(h + p["c"]) @ p["b"]

    params = {
        "a": jax.random.normal(jax.random.key(0), (4, 4)),
        "b": jax.random.normal(jax.random.key(1), (4, 8)),
        "c": jnp.ones(4),
    }
    return apply_fn, params


def test_synflow_warns_when_a_layer_is_pruned_entirely():
    apply_fn, params = _bn_net(train_mode=True)
    with pytest.warns(UserWarning, match=r"pruned every entry of \['a'\].*layer collapse.*eval"):
        m = jp.at_init.synflow(apply_fn, params, (1, 4), 0.5, iterations=2)
    assert int(m["a"].sum()) == 0
    apply_fn, params = _bn_net(train_mode=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = jp.at_init.synflow(apply_fn, params, (1, 4), 0.5, iterations=2)
        jp.at_init.synflow(apply_fn, params, (1, 4), 1.0, iterations=1)  # asked for: no warning
    assert int(m["a"].sum()) > 0


def test_synflow_docstrings_say_inference_mode():
    for fn in (jp.at_init.synflow, jp.at_init.synflow_scores):
        assert "model.eval()" in fn.__doc__ and "inference mode" in fn.__doc__
        assert "BatchNorm" in fn.__doc__


def test_synflow_rejects_a_bool_iterations():
    apply_fn, params = _bn_net(train_mode=False)
    with pytest.raises(ValueError, match=r"iterations must be a positive int.*True.*Fix"):
        jp.at_init.synflow(apply_fn, params, (1, 4), 0.5, iterations=True)


# 4. Drivers: the documented recipe is exact, and a train that does not enforce raises.


_THETA0 = {
    "a": jax.random.normal(jax.random.key(0), (10, 10)) * 0.1,
    "b": jax.random.normal(jax.random.key(1), (10, 10)),
    "c": jnp.ones(10),
}
_X = jax.random.normal(jax.random.key(2), (32, 10))
_Y = jax.random.normal(jax.random.key(3), (32, 10))


def _loss(p):
    return jnp.mean((jnp.tanh(_X @ p["a"] + p["c"]) @ p["b"] - _Y) ** 2)


def _train_with(make_tx):
    def train(params, masks):
        tx = make_tx(masks)
        state = tx.init(params)
        for _ in range(5):
            updates, state = tx.update(jax.grad(_loss)(params), state, params)
            params = optax.apply_updates(params, updates)
        return params

    return train


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_the_documented_recipe_enforces_exactly_the_rounds_masks(scope):
    assert "scope=lambda scores, sparsity, where=None: masks" in jp.drivers.__doc__
    train = _train_with(
        lambda masks: jp.prune(
            optax.adam(1e-2), sparsity=0.0, scope=lambda scores, sparsity, where=None: masks
        )
    )
    rounds = jp.drivers.lottery_ticket(train, _THETA0, rounds=2, rate=0.5, scope=scope)
    for r in rounds[1:]:
        for k in ("a", "b"):
            w, m = np.asarray(r.params[k]), np.asarray(r.masks[k])
            assert not np.any(w[~m]) and np.count_nonzero(w) == m.sum()


def test_a_train_that_does_not_enforce_the_masks_raises_naming_round_leaf_and_count():
    # The old recipe: masks as scores with jp.prune's default scope="layer" re-selects.
    def make_tx(masks):
        scores = jax.tree.map(
            lambda m, p: jnp.broadcast_to(m, p.shape).astype(jnp.float32), masks, _THETA0
        )
        return jp.prune(
            optax.adam(1e-2),
            sparsity=float(jp.sparsity(masks)),
            criterion=lambda params: scores,
        )

    match = (
        r"train did not enforce the masks of round 1: .* \d+ nonzero entries at 'a' where the "
        r"masks are False.*Fix: enforce the masks in train.*jp.apply_masks"
    )
    with pytest.raises(ValueError, match=match):
        jp.drivers.lottery_ticket(_train_with(make_tx), _THETA0, rounds=1, rate=0.5)
    with pytest.raises(ValueError, match=r"round 1: .*nonzero entries at 'a'"):
        jp.drivers.iterative_pruning(
            lambda p, m: jax.tree.map(lambda x: x + 1.0, p), _THETA0, rounds=1, rate=0.5
        )


def test_rate_sequence_is_non_decreasing_as_documented():
    p = {"w": jnp.arange(1.0, 17.0).reshape(4, 4)}
    rs = jp.drivers.iterative_pruning(jp.apply_masks, p, rounds=2, rate=[0.5, 0.5])
    assert [r.sparsity for r in rs] == [0.0, 0.5, 0.5]
    assert "non-decreasing" in jp.drivers.iterative_pruning.__doc__
    with pytest.raises(ValueError, match=r"2 non-decreasing per-round target sparsities.*Fix"):
        jp.drivers.iterative_pruning(jp.apply_masks, p, rounds=2, rate=[0.5, 0.4])


# 5. rigl/set say they must be the last transform.


def test_rigl_and_set_docstrings_say_they_must_be_the_last_transform():
    spelling = "rigl(optax.chain(optax.scale_by_adam(), optax.scale(-lr)), ...)"
    for doc in (jp.dynamic.__doc__, jp.dynamic.rigl.__doc__):
        flat = " ".join(doc.split())
        assert "last transform" in flat and spelling in flat
    flat = " ".join(jp.dynamic.set.__doc__.split())
    assert "last transform" in flat
    assert "set(optax.chain(optax.scale_by_adam(), optax.scale(-lr)), ...)" in flat


# 6. Validation.


_K = jax.random.key(0)


@pytest.mark.parametrize("bad", ["0.3", True, None])
@pytest.mark.parametrize("algo", ["rigl", "set"])
def test_drop_fraction_of_the_wrong_kind_is_rejected(algo, bad):
    kwargs = {"end_step": 10} if algo == "rigl" else {"update_every": 2}
    with pytest.raises(
        ValueError, match=rf"drop_fraction must be a real number in \[0, 1\].*got {bad!r}.*Fix"
    ):
        getattr(jp.dynamic, algo)(optax.sgd(0.1), sparsity=0.5, key=_K, drop_fraction=bad, **kwargs)


def test_distribution_must_be_callable_at_construction():
    with pytest.raises(ValueError, match=r"distribution must be a callable.*got 'erk'.*Fix"):
        jp.dynamic.rigl(optax.sgd(0.1), sparsity=0.5, key=_K, end_step=10, distribution="erk")


def test_rigl_sparsity_must_agree_with_an_explicit_distribution():
    params = {"w": jnp.ones((8, 8))}
    dist = jp.distributions.explicit({"w": 0.5})
    tx = jp.dynamic.rigl(optax.sgd(0.1), sparsity=0.9, key=_K, end_step=10, distribution=dist)
    with pytest.raises(
        ValueError, match=r"sparsity=0.9 disagrees with distribution=explicit.*0.5000.*Fix"
    ):
        tx.init(params)
    tx = jp.dynamic.rigl(optax.sgd(0.1), sparsity=0.5, key=_K, end_step=10, distribution=dist)
    assert float(jp.sparsity(jp.get_masks(tx.init(params)))) == 0.5


def test_rigl_and_set_warn_when_nothing_is_prunable():
    with pytest.warns(UserWarning, match=r"jp.dynamic.rigl found no prunable leaf.*b \(4,\).*Fix"):
        jp.dynamic.rigl(optax.sgd(0.1), sparsity=0.5, key=_K, end_step=10).init({"b": jnp.zeros(4)})
    with pytest.warns(UserWarning, match=r"jp.dynamic.set found no prunable leaf"):
        jp.dynamic.set(optax.sgd(0.1), sparsity=0.5, key=_K, update_every=2).init(
            {"b": jnp.zeros(4)}
        )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"alpha": 0.3, "end_step": 0}, r"end_step must be a positive int.*got 0.*Fix"),
        ({"alpha": 0.3, "end_step": True}, r"end_step must be a positive int.*got True.*Fix"),
        ({"alpha": 5, "end_step": 10}, r"alpha must be a number in \[0, 1\].*got 5.*Fix"),
        ({"alpha": -0.1, "end_step": 10}, r"alpha must be a number in \[0, 1\].*Fix"),
        ({"alpha": "0.3", "end_step": 10}, r"alpha must be a number in \[0, 1\].*'0.3'.*Fix"),
    ],
)
def test_cosine_drop_fraction_validates_concrete_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        jp.dynamic.cosine_drop_fraction(5, **kwargs)


def test_cosine_drop_fraction_still_traces_the_step():
    f = jax.jit(lambda t: jp.dynamic.cosine_drop_fraction(t, alpha=0.3, end_step=10))
    assert float(f(5)) == pytest.approx(0.15)


@pytest.mark.parametrize("fn", ["random_masks", "average_over_masks"])
def test_random_masks_check_key_and_num_masks(fn):
    p = {"w": jnp.ones((4, 4))}

    def call(**kw):
        if fn == "random_masks":
            return jp.drivers.random_masks(p, 0.5, **kw)
        return jp.drivers.average_over_masks(lambda m: 0.0, p, 0.5, **kw)

    for bad in (None, 0):
        with pytest.raises(ValueError, match=rf"key must be a PRNG key, got {bad}.*Fix"):
            call(key=bad)
    for bad in (True, 0, 2.0):
        with pytest.raises(ValueError, match=rf"num_masks must be a positive int.*{bad}.*Fix"):
            call(key=_K, num_masks=bad)
    assert len(jp.drivers.random_masks(p, 0.5, key=jax.random.PRNGKey(0), num_masks=2)) == 2


def test_polynomial_rejects_a_decreasing_schedule_and_a_non_number_power():
    with pytest.raises(
        ValueError,
        match=r"initial_sparsity must be <= final_sparsity.*initial_sparsity=0.9 > "
        r"final_sparsity=0.1.*Fix",
    ):
        jp.schedules.polynomial(0.9, 0.1, begin_step=0, end_step=10)
    for bad in ("3", True, None, 0, float("nan")):
        with pytest.raises(ValueError, match=r"power must be a positive number.*Fix"):
            jp.schedules.polynomial(0.0, 0.5, 0, 10, power=bad)
    s = jp.schedules.polynomial(0.5, 0.5, 0, 10, power=np.float32(2.0))  # constant, accepted
    assert float(s(5)) == pytest.approx(0.5)
