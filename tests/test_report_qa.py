"""jp.report against hand counts: found in review."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxprune as jp
from jaxprune import structure
from jaxprune.report import report


def test_compressed_bytes_count_a_mask_keeping_a_zero_once():
    w = np.asarray(jax.random.normal(jax.random.key(0), (64, 64)))
    mask = np.abs(w) > 0.5
    w = np.where(mask, w, 0.0)
    exact = report({"w": w}, {"w": mask}).rows[0]
    w2 = w.copy()
    w2[np.argwhere(mask)[0][0], np.argwhere(mask)[0][1]] = 0.0  # a kept weight at exactly 0
    kept_zero = report({"w": w2}, {"w": mask}).rows[0]
    # The bitmask encoding's bits are the mask itself, and the kept 0 stays a stored
    # value: the checkpoint stores the mask once, so the bytes are the same.
    assert exact.encoding == kept_zero.encoding == "bitmask"
    assert kept_zero.compressed_bytes == exact.compressed_bytes
    # Stored dense (every entry kept, one of them at 0), the mask needs its own bits.
    ones = np.ones((64, 64), np.float32)
    ones[0, 0] = 0.0
    dense = report({"w": ones}, {"w": np.ones((64, 64), bool)}).rows[0]
    assert dense.encoding == "dense"
    assert dense.compressed_bytes == 64 * 64 * 4 + 64 * 64 // 8


def test_an_embedding_lookup_passes_no_density_to_the_next_layer():
    class M(nn.Module):
        @nn.compact
        def __call__(self, tok):
            return nn.Dense(8, use_bias=False)(nn.Embed(100, 16)(tok))

    m = M()
    tok = jnp.arange(10).reshape(2, 5)
    p = m.init(jax.random.key(0), tok)["params"]
    emask = np.random.default_rng(0).random((100, 16)) < 0.1
    masks = {"Embed_0": {"embedding": emask}, "Dense_0": {"kernel": np.ones((16, 8), bool)}}
    r = report(p, masks, lambda p, t: m.apply({"params": p}, t), tok)
    assert r.flops["dense_macs"] == r.flops["nonzero_macs"] == 2 * 5 * 16 * 8


def test_a_norm_scale_feeding_a_layer_is_not_counted_twice():
    d, h, b = 8, 6, 2

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.norm = nnx.RMSNorm(d, rngs=rngs)
            self.proj = nnx.Linear(d, h, use_bias=False, rngs=rngs)

        def __call__(self, x):
            return self.proj(self.norm(x))

    keep = np.arange(d) < d // 2
    masks = {"norm": {"scale": keep}, "proj": {"kernel": np.repeat(keep[:, None], h, 1)}}
    x = jax.random.normal(jax.random.key(1), (b, d))
    r = report(Block(nnx.Rngs(0)), masks, example_inputs=x)
    assert r.flops["nonzero_macs"] == b * (d // 2) * h  # the shrunk layer's MACs


def test_report_takes_masks_over_a_models_whole_state():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.c1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
            self.bn = nnx.BatchNorm(8, rngs=rngs)
            self.c2 = nnx.Conv(8, 4, (3, 3), rngs=rngs)

        def __call__(self, x):
            return self.c2(jax.nn.relu(self.bn(self.c1(x))))

    m = Net(nnx.Rngs(0))
    m.eval()
    x = jnp.ones((2, 6, 6, 3))
    apply_fn, state = structure.module_apply(m)
    groups = structure.groups(apply_fn, state, x, prunable_only=True)
    masks = structure.select(groups, jp.criteria.magnitude(state), 0.5)
    r = report(m, masks, example_inputs=x)
    assert r.flops["mac_reduction"] == 2.0
    assert {row.path for row in r.rows} == {"c1/kernel", "c1/bias", "bn/scale", "bn/bias",
                                            "c2/kernel", "c2/bias"}  # fmt: skip
