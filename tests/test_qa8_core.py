"""QA round 8 (core): equinox conv biases, apply_masks on non-array leaves, drivers' checks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune as jp

eqx = pytest.importorskip("equinox")


def test_is_prunable_leaves_eqx_conv_biases_dense():
    # equinox stores conv biases as [out, 1, 1] (Conv1d: [out, 1]); by shape
    # alone they pass for kernels, and the default where used to prune them.
    conv = eqx.nn.Conv2d(1, 16, 3, key=jax.random.key(0))
    conv1 = eqx.nn.Conv1d(2, 8, 3, key=jax.random.key(1))
    assert conv.bias.shape == (16, 1, 1) and conv1.bias.shape == (8, 1)
    assert not jp.is_prunable(("conv", "bias"), conv.bias)
    assert not jp.is_prunable(("conv1", "bias"), conv1.bias)
    assert jp.is_prunable(("conv", "weight"), conv.weight)
    # A 2-D attention bias [heads, head_dim] stays selected (documented), and
    # a [n, 1] leaf of another name is still a kernel.
    assert jp.is_prunable(("attn", "bias"), jnp.ones((4, 8)))
    assert jp.is_prunable(("proj", "kernel"), jnp.ones((8, 1)))


def test_prune_keeps_eqx_conv_bias_and_sparsity_skips_it():
    model = eqx.nn.Conv2d(1, 16, 3, key=jax.random.key(0))
    params = eqx.filter(model, eqx.is_inexact_array)
    params = eqx.tree_at(lambda m: m.bias, params, jnp.linspace(0.1, 1.6, 16).reshape(16, 1, 1))
    tx = jp.prune(optax.sgd(0.0), sparsity=0.9)
    state = tx.init(params)
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, state = tx.update(grads, state, params)
    pruned = eqx.apply_updates(params, updates)
    assert int(jnp.sum(pruned.bias == 0)) == 0  # was 14 of 16
    assert int(jnp.sum(pruned.weight == 0)) == round(0.9 * 144)
    # jp.sparsity counts the kernel only, on params and on full-shape masks.
    assert float(jp.sparsity(pruned)) == pytest.approx(130 / 144)
    masks = {"weight": pruned.weight != 0, "bias": jnp.ones((16, 1, 1), bool)}
    assert float(jp.sparsity(masks)) == pytest.approx(130 / 144)


def test_apply_masks_passes_unpruned_leaves_through():
    params = {"w": jnp.ones((2, 2)), "scale": 0.5, "use_bias": True, "n": 3, "act": "relu"}
    masks = {"w": jnp.eye(2, dtype=bool), "scale": True, "use_bias": True, "n": True, "act": True}
    out = jp.apply_masks(params, masks)
    assert out["scale"] == 0.5 and type(out["scale"]) is float
    assert out["use_bias"] is True and out["n"] == 3 and type(out["n"]) is int
    assert out["act"] == "relu"
    np.testing.assert_array_equal(out["w"], np.eye(2))
    # A kept array is returned as it is (no copy); a concrete jax True too.
    b = jnp.arange(3.0)
    assert jp.apply_masks({"b": b}, {"b": jnp.array(True)})["b"] is b


def test_apply_masks_refuses_a_real_mask_on_a_non_array_leaf():
    params = {"w": jnp.ones((2, 2)), "act": "relu"}
    with pytest.raises(ValueError, match=r"'act' is a str, not an array.*Fix: give it the mask"):
        jp.apply_masks(params, {"w": jnp.ones((2, 2), bool), "act": False})


def test_apply_masks_traced_scalar_mask_still_applies():
    f = jax.jit(jp.apply_masks)
    out = f({"w": jnp.ones((2, 2)), "b": jnp.ones(2)}, {"w": jnp.array(False), "b": True})
    np.testing.assert_array_equal(out["w"], np.zeros((2, 2)))
    np.testing.assert_array_equal(out["b"], np.ones(2))


class _Heads(eqx.Module):
    w: jax.Array
    n_heads: int  # a plain (non-static) field, as many user modules have

    def __call__(self, x):
        return (x @ self.w).reshape(x.shape[0], self.n_heads, -1).sum(-1)


def test_apply_masks_keeps_eqx_int_field_for_filter_jit():
    m = _Heads(jnp.arange(1.0, 17.0).reshape(4, 4), 2)
    pm = jp.apply_masks(m, jp.masks.topk(jp.criteria.magnitude(m), 0.5))
    assert type(pm.n_heads) is int
    assert int(jnp.sum(pm.w == 0)) == 8
    out = eqx.filter_jit(lambda m, x: m(x))(pm, jnp.ones((3, 4)))  # traced int: TypeError
    assert out.shape == (3, 2)


@pytest.mark.parametrize("driver", ["lottery_ticket", "iterative_pruning"])
def test_drivers_check_leaves_before_round_0(driver):
    model = eqx.nn.MLP(4, 2, 8, 1, key=jax.random.key(0))
    calls = []

    def train(params, masks):
        calls.append(1)
        return params

    with pytest.raises(ValueError, match=r"params leaf 'activation' is a custom_jvp"):
        getattr(jp.drivers, driver)(train, model, rounds=2, rate=0.5)
    assert calls == []  # round 0's (dense, expensive) training never ran


@pytest.mark.parametrize(
    "scope",
    [jp.masks.patterns, functools.partial(jp.masks.nm, n=2, m=4, skip_indivisible=True)],
    ids=["patterns", "nm_skip"],
)
def test_round_sparsity_counts_scalar_masks_as_whole_leaves(scope):
    rng = np.random.default_rng(0)
    params = {
        "conv": jnp.asarray(rng.standard_normal((3, 3, 3, 16)), jnp.float32),  # nm skips it
        "dense": jnp.asarray(rng.standard_normal((64, 10)), jnp.float32),  # patterns skip it
    }
    rs = jp.drivers.iterative_pruning(jp.apply_masks, params, rounds=1, rate=0.5, scope=scope)
    r = rs[1]
    true = float(jp.sparsity(r.params))
    assert 0 < true < 0.5
    assert r.sparsity == pytest.approx(true)  # patterns: 0.56 against 0.23 before
    assert {k: jnp.shape(v) for k, v in r.masks.items()} == {k: v.shape for k, v in params.items()}
