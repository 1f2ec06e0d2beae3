"""Pruning state at one bit per prunable parameter; packed masks round-trip exactly."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxprune as jp
from jaxprune.masks import PackedMask


@pytest.mark.parametrize("shape", [(5,), (3, 8), (16, 3), (4, 13), (2, 8, 17), (2, 3, 17), (1, 1)])
@pytest.mark.parametrize("jit", [False, True])
def test_pack_roundtrip_exact(shape, jit):
    mask = jax.random.bernoulli(jax.random.key(sum(shape)), 0.3, shape)
    tree = {"m": mask, "scalar": jnp.bool_(True)}
    pack = jax.jit(jp.masks.pack) if jit else jp.masks.pack
    unpack = jax.jit(jp.masks.unpack) if jit else jp.masks.unpack
    packed = pack(tree)
    assert isinstance(packed["m"], PackedMask)
    assert packed["m"].bits.dtype == jnp.uint8
    assert packed["m"].bits.size == math.ceil(mask.size / 8)  # at most 1 bit per entry
    assert packed["scalar"].shape == ()
    out = unpack(packed)
    assert out["m"].dtype == jnp.bool_ and out["m"].shape == shape
    np.testing.assert_array_equal(out["m"], mask)


def test_pack_casts_zero_one_numbers_and_refuses_other_values():
    ones_zeros = jnp.array([[1.0, 0.0, 1.0]] * 8)
    packed = jp.masks.pack({"w": ones_zeros, "n": jnp.array([0, 1] * 4)})
    np.testing.assert_array_equal(jp.masks.unpack(packed)["w"], ones_zeros.astype(bool))
    np.testing.assert_array_equal(jp.masks.unpack(packed)["n"], [False, True] * 4)
    # Scores or probabilities are not masks: 0.5 would have been packed as True.
    with pytest.raises(ValueError, match=r"masks leaf \"\['w'\]\" has dtype float32 and holds"):
        jp.masks.pack({"w": jnp.full((8, 3), 0.5)})
    with pytest.raises(ValueError, match=r"\[0\]\['k'\]\" has dtype int32 and holds .* m > 0.5"):
        jp.masks.pack([{"k": jnp.full((8,), 2)}])
    # Under jit the values are unknown, so only bool passes.
    with pytest.raises(ValueError, match=r"has dtype float32; pack stores bool masks"):
        jax.jit(jp.masks.pack)({"w": ones_zeros})
    jitted = jax.jit(jp.masks.pack)({"w": ones_zeros > 0, "b": True})
    np.testing.assert_array_equal(jp.masks.unpack(jitted)["w"], ones_zeros.astype(bool))


def _params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {
        "l1": {"kernel": jax.random.normal(k1, (784, 300)), "bias": jnp.zeros(300)},
        "l2": {"kernel": jax.random.normal(k2, (300, 100)), "bias": jnp.zeros(100)},
    }


def test_state_is_at_most_one_bit_per_prunable_param():
    params = _params()
    tx = jp.prune(optax.adam(1e-3), sparsity=0.9)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, state = jax.jit(tx.update)(grads, state, params)
    n_prunable = 784 * 300 + 300 * 100
    sizes = jp.transform.state_bytes(state)
    # Fixed part: the int32 step count and one byte per non-prunable leaf's scalar True.
    fixed = 4 + 2
    # 300 is not a multiple of 8 but 784 is: packed along the rows, no padding.
    assert sizes["pruning"] - fixed == n_prunable / 8
    adam_alone = optax.adam(1e-3).init(params)
    assert sizes["inner"] == sum(x.nbytes for x in jax.tree.leaves(adam_alone))
    assert sizes["total"] == sizes["pruning"] + sizes["inner"]
    # The bool view is still there, exact and of the params' shapes.
    masks = jp.get_masks(state)
    assert masks["l1"]["kernel"].dtype == jnp.bool_
    assert int((~masks["l1"]["kernel"]).sum()) == round(0.9 * 784 * 300)
    np.testing.assert_array_equal(state.masks["l2"]["kernel"], masks["l2"]["kernel"])


def test_state_bytes_inside_chain_and_nnx_optimizer():
    model = nnx.Sequential(
        nnx.Linear(64, 32, rngs=nnx.Rngs(0)), jax.nn.relu, nnx.Linear(32, 8, rngs=nnx.Rngs(1))
    )
    tx = optax.chain(optax.clip_by_global_norm(1.0), jp.prune(optax.sgd(0.1, 0.9), sparsity=0.5))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    sizes = jp.transform.state_bytes(opt.opt_state)
    assert sizes["pruning"] == 4 + 2 + (64 * 32 + 32 * 8) / 8
    assert sizes["inner"] == 4 * (64 * 32 + 32 + 32 * 8 + 8)  # the momentum buffer


def test_state_bytes_without_prune_state_raises():
    with pytest.raises(ValueError, match="holds no jp.prune state"):
        jp.transform.state_bytes(optax.adam(1e-3).init({"w": jnp.ones((2, 2))}))


def test_state_bytes_of_abstract_state():
    # Sizing a large model needs no memory: shapes are enough.
    shapes = {"w": jax.ShapeDtypeStruct((4096, 4096), jnp.float32)}
    tx = jp.prune(optax.adam(1e-3), sparsity=0.5)
    sizes = jp.transform.state_bytes(jax.eval_shape(tx.init, shapes))
    assert sizes["pruning"] == 4 + 4096 * 4096 // 8
    assert sizes["inner"] == 4 + 2 * 4 * 4096 * 4096
