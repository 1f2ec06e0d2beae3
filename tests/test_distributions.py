"""Sparsity distributions: uniform, ERK with the dense re-solve, explicit; as prune scopes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune as jp
import jaxprune.distributions  # noqa: F401  (until jaxprune/__init__ exports it)

PARAMS = {
    "conv": {"kernel": jnp.ones((3, 3, 1, 8)), "bias": jnp.ones(8)},
    "fc": {"kernel": jnp.ones((200, 100)), "bias": jnp.ones(100)},
    "out": {"kernel": jnp.ones((100, 10)), "bias": jnp.ones(10)},
}


def _erk_by_hand(shapes, s):
    n = np.array([np.prod(x) for x in shapes], float)
    raw = np.array([sum(x) / np.prod(x) for x in shapes])
    dense = np.zeros(len(shapes), bool)
    while True:
        eps = ((1 - s) * n.sum() - n[dense].sum()) / (raw * n)[~dense].sum()
        new = dense | (eps * raw > 1)
        if (new == dense).all():
            return np.where(dense, 1.0, eps * raw)
        dense = new


@pytest.mark.parametrize("s", [0.5, 0.9, 0.98])
def test_erk_matches_a_direct_solve_and_the_total(s):
    d = jp.distributions.erk(PARAMS, s)
    shapes = [(3, 3, 1, 8), (200, 100), (100, 10)]
    want = _erk_by_hand(shapes, s)
    got = [1 - float(d[k]["kernel"]) for k in ("conv", "fc", "out")]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    n = np.array([np.prod(x) for x in shapes])
    assert (np.array(got) * n).sum() == pytest.approx((1 - s) * n.sum(), rel=1e-5)
    assert d["fc"]["bias"] == 0.0


def test_erk_works_with_a_traced_total_and_as_a_prune_scope():
    d = jax.jit(lambda s: jp.distributions.erk(PARAMS, s))(jnp.float32(0.9))
    assert float(d["conv"]["kernel"]) == pytest.approx(
        1 - _erk_by_hand([(3, 3, 1, 8), (200, 100), (100, 10)], 0.9)[0], rel=1e-5
    )
    tx = jp.prune(
        optax.sgd(0.1),
        sparsity=jp.schedules.polynomial(0.0, 0.9, 0, 2),
        scope=jp.distributions.selection(jp.distributions.erk),
    )
    params = jax.tree.map(lambda x: x * jnp.arange(x.size).reshape(x.shape), PARAMS)
    st = tx.init(params)
    step = jax.jit(tx.update)
    for _ in range(3):
        _, st = step(params, st, params)
    masks = jp.get_masks(st)
    for k in ("conv", "fc", "out"):
        m = np.asarray(masks[k]["kernel"])
        assert (~m).sum() == round(float(jp.distributions.erk(PARAMS, 0.9)[k]["kernel"]) * m.size)


def test_uniform_and_explicit():
    u = jp.distributions.uniform(PARAMS, 0.7)
    assert u["fc"]["kernel"] == 0.7 and u["fc"]["bias"] == 0.0
    e = jp.distributions.explicit({"fc/kernel": 0.9, "out/kernel": 0.1}, default=0.5)(PARAMS)
    assert (e["fc"]["kernel"], e["out"]["kernel"], e["conv"]["kernel"]) == (0.9, 0.1, 0.5)
    masks = jp.distributions.selection(
        jp.distributions.explicit({"fc/kernel": 0.9, "out/kernel": 0.1}, default=0.5)
    )(jax.tree.map(jnp.abs, PARAMS), None)
    assert int((~masks["fc"]["kernel"]).sum()) == 18000


def test_explicit_errors():
    with pytest.raises(ValueError, match="explicit sparsity for 'fc/kernel' must be in"):
        jp.distributions.explicit({"fc/kernel": 90})
    with pytest.raises(ValueError, match="explicit sparsities name no leaf"):
        jp.distributions.explicit({"nope": 0.5})(PARAMS)
    with pytest.raises(ValueError, match="has no explicit sparsity"):
        jp.distributions.explicit({"fc/kernel": 0.5})(PARAMS)


def test_per_output_prunes_the_same_count_in_every_unit():
    s = jax.random.uniform(jax.random.key(0), (10, 4))
    m = np.asarray(jp.distributions.per_output({"k": s}, 0.3)["k"])
    assert m.sum(axis=0).tolist() == [7, 7, 7, 7]


@pytest.mark.parametrize("fn", [jp.distributions.erk, jp.distributions.uniform])
@pytest.mark.parametrize("bad", [1.5, -0.5, float("nan")])
def test_distributions_reject_sparsity_outside_0_1(fn, bad):
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\]"):
        fn(PARAMS, bad)


def test_explicit_refuses_sparsity_for_a_leaf_that_is_not_prunable():
    e = jp.distributions.explicit({"fc/kernel": 0.9, "conv/bias": 0.5}, default=0.1)
    with pytest.raises(ValueError, match=r"not prunable: \['conv/bias'\].*Fix"):
        e(PARAMS)  # was 0.5 in the distribution, yet the selection pruned none of it
    with pytest.raises(ValueError, match=r"not prunable: \['conv/bias'\]"):
        jp.distributions.selection(e)(jax.tree.map(jnp.abs, PARAMS), None)
    # 0.0 for such a leaf says the same as leaving it out.
    d = jp.distributions.explicit({"conv/bias": 0.0}, default=0.1)(PARAMS)
    assert d["conv"]["bias"] == 0.0 and d["fc"]["kernel"] == 0.1
    # A `where` that selects the leaf makes it prunable, and it is pruned.
    where = lambda p, x: True  # noqa: E731
    m = jp.distributions.selection(e)(jax.tree.map(jnp.abs, PARAMS), None, where=where)
    assert int((~m["conv"]["bias"]).sum()) == 4


@pytest.mark.parametrize("bad", [None, "0.5", "x", True, [0.5]])
def test_explicit_refuses_values_that_are_not_numbers(bad):
    with pytest.raises(ValueError, match=r"explicit sparsity for 'k' must be in \[0, 1\].*Fix"):
        jp.distributions.explicit({"k": bad})
    with pytest.raises(ValueError, match=r"explicit sparsity for 'default' must be in"):
        jp.distributions.explicit({"k": 0.5}, default=bad if bad is not None else "none")
