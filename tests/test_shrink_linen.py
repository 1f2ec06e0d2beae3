"""Shrinking flax linen modules: the unchanged module runs on the smaller params."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxprune as jp
from jaxprune import structure

X = jax.random.normal(jax.random.key(0), (4, 6, 6, 2))


def _randomized(variables, seed=0):
    """Random biases and BatchNorm statistics too, so that folding them really matters."""
    rng = np.random.default_rng(seed)

    def one(path, x):
        v = rng.normal(size=x.shape) * 0.5
        v = np.abs(v) + 0.5 if path[-1].key == "var" else v
        return jnp.asarray(v, x.dtype)

    return jax.tree_util.tree_map_with_path(one, variables)


class _CNN(nn.Module):
    """Conv + BatchNorm, a depthwise conv with multiplier 2, a grouped conv,
    a transposed conv, DenseGeneral with two output axes and a Dense head."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(8, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = jax.nn.relu(x)
        x = jax.nn.relu(nn.Conv(16, (3, 3), feature_group_count=8)(x))
        x = jax.nn.relu(nn.Conv(8, (1, 1))(x))
        x = jax.nn.relu(nn.Conv(8, (3, 3), feature_group_count=4)(x))
        x = jax.nn.relu(nn.ConvTranspose(6, (2, 2))(x)).mean((1, 2))
        x = nn.DenseGeneral((2, 5))(x)
        return nn.Dense(3)(jax.nn.relu(x.reshape(x.shape[0], -1)))


def test_shrink_linen_runs_the_same_module_on_smaller_variables():
    module = _CNN()
    variables = _randomized(module.init(jax.random.key(1), X))
    apply_fn = structure.linen_apply(module, train=False)
    gs = structure.groups(apply_fn, variables, X[:1], prunable_only=True)
    masks = structure.select(gs, jp.criteria.magnitude(variables), 0.5)
    small, small_apply = structure.shrink_linen(module, variables, masks, X, train=False)
    p = small["params"]
    assert p["Conv_0"]["kernel"].shape == (3, 3, 2, 4)
    assert small["batch_stats"]["BatchNorm_0"]["mean"].shape == (4,)
    # Depthwise x2: whole input channels go, each keeps its 2 outputs.
    assert p["Conv_1"]["kernel"].shape == (3, 3, 1, 8)
    # Grouped (4 groups of 2): every group keeps the same width, 1.
    assert p["Conv_2"]["kernel"].shape == (1, 1, 8, 4)
    assert p["Conv_3"]["kernel"].shape == (3, 3, 1, 4)
    assert p["ConvTranspose_0"]["kernel"].shape == (2, 2, 4, 3)
    assert p["DenseGeneral_0"]["kernel"].shape == (3, 1, 3)
    assert p["Dense_0"]["kernel"].shape == (3, 3)
    want = apply_fn(jp.apply_masks(variables, masks), X)
    np.testing.assert_allclose(
        np.asarray(small_apply(small, X)), np.asarray(want), rtol=1e-4, atol=1e-4
    )
    # Masks over the params alone (as a pruning optimizer holds them) cut the same.
    small_p, _ = structure.shrink_linen(module, variables, masks["params"], X, train=False)
    assert jax.tree.map(jnp.shape, small_p) == jax.tree.map(jnp.shape, small)
    # The same apply_fn still runs the full-size variables, unchanged.
    np.testing.assert_array_equal(
        np.asarray(apply_fn(variables, X)), np.asarray(module.apply(variables, X))
    )


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jax.nn.relu(nn.Dense(16)(x))
        x = jax.nn.relu(nn.Einsum((16, 2, 4), "bi,ijk->bjk")(x)).reshape(x.shape[0], -1)
        return nn.Dense(3)(x)


def test_masks_from_a_jitted_pruning_optimizer_shrink_the_linen_params():
    module = _MLP()
    x = jax.random.normal(jax.random.key(2), (5, 7))
    y = jax.random.normal(jax.random.key(6), (5, 3))
    params = _randomized(module.init(jax.random.key(3), x)["params"])
    apply_fn = structure.linen_apply(module)
    sel = structure.selection(structure.groups(apply_fn, params, x, prunable_only=True))
    tx = jp.prune(optax.adam(1e-2), sparsity=0.5, scope=sel)

    @jax.jit
    def step(params, opt_state):
        grads = jax.grad(lambda p: jnp.mean((apply_fn(p, x) - y) ** 2))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = tx.init(params)
    for _ in range(3):
        params, opt_state = step(params, opt_state)
    masks = jp.get_masks(opt_state)
    small = structure.shrink(apply_fn, params, masks, x)  # check=True: same outputs
    assert small["Dense_0"]["kernel"].shape == (7, 8)
    assert small["Einsum_0"]["kernel"].shape == (8, 1, 2)
    assert small["Dense_1"]["kernel"].shape == (2, 3)
    got = jax.jit(apply_fn)(small, x)
    np.testing.assert_allclose(
        np.asarray(got), np.asarray(apply_fn(params, x)), rtol=1e-5, atol=1e-5
    )


class _FixedWidth(nn.Module):
    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.normal(), (x.shape[-1], 6))
        return nn.Dense(2)(jax.nn.relu(x @ w))


def test_a_layer_whose_width_jaxprune_cannot_adapt_is_named():
    module = _FixedWidth()
    x = jax.random.normal(jax.random.key(4), (3, 5))
    params = _randomized(module.init(jax.random.key(5), x)["params"])
    apply_fn = structure.linen_apply(module)
    gs = structure.groups(apply_fn, params, x, prunable_only=True)
    masks = structure.select(gs, jp.criteria.magnitude(params), 0.5)
    with pytest.raises(ValueError, match=r'parameter "w".*structure.widths'):
        structure.shrink_linen(module, params, masks, x)
    with pytest.raises(ValueError, match="module must be a flax.linen Module, got Linear"):
        structure.linen_apply(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))


class _NNXDepthwise(nnx.Module):
    def __init__(self, rngs):
        self.c1 = nnx.Conv(2, 8, (3, 3), rngs=rngs)
        self.dw = nnx.Conv(8, 16, (3, 3), feature_group_count=8, rngs=rngs)
        self.c3 = nnx.Conv(16, 6, (3, 3), rngs=rngs)

    def __call__(self, x):
        h = jax.nn.relu(self.dw(jax.nn.relu(self.c1(x))))
        return self.c3(h).mean((1, 2))


def test_depthwise_multiplier_outputs_never_go_alone():
    """A depthwise conv with multiplier 2 keeps 2 outputs per kept input channel.

    Pruning single outputs would leave input channels with 1 or 0 outputs, which
    no depthwise conv computes; only whole input channels form a group.
    """
    model = _NNXDepthwise(nnx.Rngs(0))
    apply_fn, state = structure.module_apply(model)
    everything = structure.groups(apply_fn, state, X[:1])
    dw_out = [g for g in everything if any(m.path == ("dw", "bias") for m in g.members)]
    assert [g.prunable for g in dw_out] == [True, False]
    assert "does not map axis" in dw_out[1].reasons[0]
    gs = structure.groups(apply_fn, state, X[:1], prunable_only=True)
    masks = structure.select(gs, jp.criteria.magnitude(state), 0.5)
    want = apply_fn(jp.apply_masks(state, masks), X)
    structure.shrink_module(model, masks, X)
    assert model.dw.kernel.shape == (3, 3, 1, 8) and model.dw.feature_group_count == 4
    np.testing.assert_allclose(np.asarray(model(X)), np.asarray(want), rtol=1e-4, atol=1e-4)


class _Attention(nn.Module):
    @nn.compact
    def __call__(self, x):
        t = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=16)(nn.Dense(16)(x))
        return nn.Dense(3)(t.mean(1))


def test_linen_attention_loses_whole_heads():
    module = _Attention()
    x = jax.random.normal(jax.random.key(7), (2, 5, 4))
    params = _randomized(module.init(jax.random.key(8), x)["params"])
    apply_fn = structure.linen_apply(module)
    gs = structure.groups(apply_fn, params, x, prunable_only=True)
    masks = structure.select(gs, jp.criteria.magnitude(params), 0.5)
    small, apply_fn = structure.shrink_linen(module, params, masks, x)  # outputs checked
    att = small["MultiHeadDotProductAttention_0"]
    assert att["query"]["kernel"].shape == (8, 2, 4)  # 2 of 4 heads, head_dim kept
    assert att["out"]["kernel"].shape == (2, 4, 8)
    assert apply_fn(small, x).shape == (2, 3)


class _LocalTranspose(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jax.nn.relu(nn.ConvLocal(6, (3, 3), padding="VALID")(x))
        # transpose_kernel flips the kernel (lax.rev): its channel axes still shrink.
        h = jax.nn.relu(nn.ConvTranspose(5, (2, 2), transpose_kernel=True)(h))
        return nn.Dense(3)(h.mean((1, 2)))


def test_conv_local_and_a_flipped_transposed_kernel_shrink():
    module = _LocalTranspose()
    variables = _randomized(module.init(jax.random.key(9), X))
    apply_fn = structure.linen_apply(module)
    gs = structure.groups(apply_fn, variables, X[:1], prunable_only=True)
    assert sorted(g.channels for g in gs) == [5, 6]
    masks = structure.select(gs, jp.criteria.magnitude(variables), 0.5)
    small, _ = structure.shrink_linen(module, variables, masks, X)  # outputs checked
    assert small["params"]["ConvLocal_0"]["kernel"].shape == (4, 4, 18, 3)
    assert small["params"]["ConvTranspose_0"]["kernel"].shape == (2, 2, 3, 3)
