"""QA round 7 fixes: -inf in structured reductions, driver criterion checks, integer counts."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune as jp
import jaxprune.at_init  # noqa: F401
import jaxprune.drivers  # noqa: F401
import jaxprune.merge  # noqa: F401
from jaxprune.structured import REDUCTIONS

_RAW = {  # the reductions' formulas, before -inf was made to mean "prune first"
    "l2": lambda x, axis: jnp.sqrt(jnp.sum(jnp.square(x), axis=axis)),
    "l1": lambda x, axis: jnp.sum(jnp.abs(x), axis=axis),
    "mean": lambda x, axis: jnp.mean(x, axis=axis),
    "max": lambda x, axis: jnp.max(x, axis=axis),
}


@pytest.mark.parametrize("name", sorted(_RAW))
def test_builtin_reductions_send_minus_inf_slices_to_minus_inf_only(name):
    x = jax.random.normal(jax.random.key(0), (6, 5, 8))
    x = x.at[0, 0, 1].set(jnp.nan).at[1, 2, 2].set(jnp.inf).at[2, 3, 3].set(1e30)
    axis = (0, 1)
    # Without -inf: bitwise the formula (finite, +inf and NaN slices); l2 scales the
    # 1e30 slice, whose squares the raw formula overflows to inf, and gives its norm.
    got, want = np.asarray(REDUCTIONS[name](x, axis)), np.asarray(_RAW[name](x, axis)).copy()
    if name == "l2":
        assert np.isclose(got[3], 1e30, rtol=1e-6) and want[3] == np.inf
        want[3] = got[3]
    np.testing.assert_array_equal(got, want)
    # One -inf (even next to a NaN, column 1) sends the whole slice to -inf.
    y = x.at[4, 1, 1].set(-jnp.inf).at[5, 4, 6].set(-jnp.inf)
    got = np.asarray(REDUCTIONS[name](y, axis))
    want[[1, 6]] = -np.inf
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("reduce", ["l2", "l1"])
def test_structured_prunes_minus_inf_slices_first(reduce):
    s = jnp.arange(1.0, 17.0).reshape(4, 4).at[:, 3].set(-jnp.inf)  # the best column, marked
    m = jp.masks.structured({"w": s}, 0.25, reduce=reduce)["w"]
    assert np.asarray(m).all(0).tolist() == [True, True, True, False]


def test_driver_with_patterns_scope_keeps_masks_nested():
    # Each kept kernel's pruned entries are -inf: 0 * -inf used to make every
    # pattern NaN (the best score), so the next round chose other kernels/patterns.
    p = {"k": jax.random.normal(jax.random.key(0), (3, 3, 4, 4))}
    t = lambda q, m: jp.apply_masks(q, m)
    rs = jp.drivers.iterative_pruning(t, p, rounds=3, rate=0.5, scope=jp.masks.patterns)
    # Patterns keep 4 of 9 entries per kernel; rounds drop 8, 12, then 14 of the 16 kernels.
    assert [round(r.sparsity, 4) for r in rs] == [0.0, 0.7778, 0.8889, 0.9444]
    for a, b in zip(rs[1:], rs[2:], strict=False):
        assert np.all(np.asarray(a.masks["k"]) >= np.asarray(b.masks["k"]))


def test_driver_refuses_a_selection_that_revives_pruned_entries():
    # A custom reduce that turns -inf into +inf: the driver says so instead of
    # recording non-nested masks under a sparsity that reads right.
    norm = lambda x, axis: jnp.sqrt(jnp.sum(jnp.square(x), axis=axis))
    scope = functools.partial(jp.masks.structured, reduce=norm)
    p = {"w": jnp.arange(1.0, 33.0).reshape(4, 8)}
    with pytest.raises(ValueError, match=r"(?s)round 2 keeps 8 entries at 'w'.*not.*nested.*Fix"):
        jp.drivers.lottery_ticket(
            lambda q, m: jp.apply_masks(q, m), p, rounds=2, rate=0.5, scope=scope
        )


def _never_trains(params, masks):
    raise AssertionError("train ran before the criterion was checked")


@pytest.mark.parametrize(
    "criterion, match",
    [
        (jp.criteria.movement(), r"StatefulCriterion.*is stateful"),
        (jp.criteria.obd_fisher(), r"StatefulCriterion.*is stateful"),
        (jp.criteria.movement, r"criterion=jp.criteria.movement is a factory"),
        (jp.criteria.taylor_ema, r"criterion=jp.criteria.taylor_ema is a factory"),
        (
            jp.criteria.saliency,
            r"jp.criteria.saliency needs \['grads'\].*lambda p: jp.criteria.saliency\(p, "
            r"grads=jax.grad\(loss\)",
        ),
        (jp.criteria.taylor, r"jp.criteria.taylor needs \['grads'\]"),
        (jp.criteria.obd, r"obd needs \['hessian_diag'\].*fisher_diag"),
        (jp.criteria.wanda, r"wanda needs \['input_norms'\]"),
        (jp.criteria.random, r"random needs \['key'\].*key=jax.random.key\(0\)"),
        (lambda: None, r"takes no positional argument"),
        (3.0, r"criterion must be a function params -> scores, got 3.0"),
    ],
)
def test_driver_checks_the_criterion_before_any_training(criterion, match):
    p = {"w": jnp.ones((4, 4))}
    with pytest.raises(ValueError, match=f"(?s){match}") as err:
        jp.drivers.iterative_pruning(_never_trains, p, rounds=1, rate=0.5, criterion=criterion)
    assert "Fix: " in str(err.value)


def test_driver_takes_criteria_bound_to_params_only():
    p = {"w": jnp.arange(1.0, 17.0).reshape(4, 4)}
    t = lambda q, m: jp.apply_masks(q, m)
    bound = functools.partial(jp.criteria.random, key=jax.random.key(0))
    rs = jp.drivers.iterative_pruning(t, p, rounds=1, rate=0.5, criterion=bound)
    assert rs[1].sparsity == 0.5
    sal = lambda q: jp.criteria.saliency(q, jax.tree.map(jnp.ones_like, q))
    rs = jp.drivers.iterative_pruning(t, p, rounds=1, rate=0.5, criterion=sal)
    assert np.asarray(rs[1].masks["w"]).ravel().tolist() == [False] * 8 + [True] * 8


@pytest.mark.parametrize("n", [np.int64(2), jnp.int32(2), np.uint8(2)])
def test_driver_rounds_take_numpy_and_jax_integers(n):
    p = {"w": jnp.arange(1.0, 17.0).reshape(4, 4)}
    rs = jp.drivers.iterative_pruning(lambda q, m: jp.apply_masks(q, m), p, rounds=n, rate=0.5)
    assert [r.sparsity for r in rs] == [0.0, 0.5, 0.75]


def test_noiseout_and_synflow_take_numpy_and_jax_integers():
    h = jax.random.normal(jax.random.key(0), (32, 5))
    w, b = jax.random.normal(jax.random.key(1), (5, 3)), jnp.zeros(3)
    want = jp.merge.noiseout(h, w, b, 2)
    for n in (np.int64(2), jnp.int32(2)):
        got = jp.merge.noiseout(h, w, b, n)
        np.testing.assert_array_equal(got.pairs, want.pairs)
        np.testing.assert_array_equal(got.w_out, want.w_out)
    f = lambda q, x: x @ q["a"] @ q["b"]
    q = {"a": jax.random.normal(jax.random.key(2), (4, 8)), "b": jnp.ones((8, 2))}
    assert float(jp.sparsity(jp.at_init.synflow(f, q, (1, 4), 0.5, iterations=np.int64(2)))) == 0.5


def test_integer_counts_still_refuse_bools_and_floats():
    p = {"w": jnp.ones((4, 4))}
    with pytest.raises(ValueError, match="rounds must be a non-negative int, got True"):
        jp.drivers.iterative_pruning(lambda q, m: q, p, rounds=True, rate=0.5)
    with pytest.raises(ValueError, match="rounds must be a non-negative int, got 2.0"):
        jp.drivers.iterative_pruning(lambda q, m: q, p, rounds=2.0, rate=0.5)
    h = jax.random.normal(jax.random.key(0), (16, 4))
    with pytest.raises(ValueError, match=r"num_merges must be an int in \[0, 3\].*got 1.0"):
        jp.merge.noiseout(h, jnp.ones((4, 2)), jnp.zeros(2), 1.0)
    with pytest.raises(ValueError, match="iterations must be a positive int.*got np.False_"):
        jp.at_init.synflow(
            lambda q, x: x @ q["a"], {"a": jnp.ones((4, 2))}, (1, 4), 0.5, iterations=np.False_
        )


def test_structured_on_a_scalar_leaf_says_it_has_no_axes():
    with pytest.raises(ValueError, match=r"leaf 't': it is a scalar \(shape \(\), no axes.*Fix"):
        jp.masks.structured({"t": jnp.float32(2.0)}, 0.5, where=lambda p, x: True)


def test_blocks_checks_block():
    w = {"w": jnp.arange(32.0).reshape(4, 8)}
    with pytest.raises(ValueError, match=r"block must be a tuple.*got the int 4.*block=\(4, 4\)"):
        jp.masks.blocks(w, 0.5, block=4)
    for bad in [(1.5, 2), (2, True), "ab", ()]:
        with pytest.raises(ValueError, match=r"block must be a non-empty tuple.*Fix"):
            jp.masks.blocks(w, 0.5, block=bad)
    got = jp.masks.blocks(w, 0.5, block=(np.int64(2), 4))["w"]
    np.testing.assert_array_equal(got, jp.masks.blocks(w, 0.5, block=(2, 4))["w"])
