"""QA8 findings on ``jp.report``, each counted by hand or checked against the checkpoint.

* nonzero MACs follow a kernel through ``div`` (flax ``WeightNorm``), ``neg``,
  ``stop_gradient``, ``optimization_barrier`` and a product with a broadcast
  param (a folded BatchNorm ``w * gamma``);
* kernels built by ``concatenate`` (flax ``OptimizedLSTMCell``, a fused QKV) or
  a zero ``pad`` get the size-weighted density of their parts;
* compressed bytes are what ``jp.save`` stores, ``-0.0`` entries included, and
  the table says how many pruned entries are ``-0.0``;
* conv MACs: padded taps counted (``padded_macs``), transposed convs real taps;
* ``xla_flops`` counts a loop body once: ``flops["loops"]`` and the table say so;
* masks over linen ``variables["params"]`` are matched under ``params/``.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune as jp
from jaxprune import checkpoint_trees
from jaxprune.report import report

X = jnp.ones((4, 16))


def _pruned(params, frac=0.75):
    masks = jp.masks.topk(jp.criteria.magnitude(params), frac)
    return jp.apply_masks(params, masks), masks


# ------------------------------------------------- nonzero MACs through div, neg, ...


def test_weight_norm_dense_keeps_the_pruned_kernels_density():
    mod = nn.WeightNorm(nn.Dense(16, use_bias=False))
    params, masks = _pruned(mod.init(jax.random.key(0), X)["params"])
    f = report(params, masks, lambda p, x: mod.apply({"params": p}, x), X).flops
    assert f["dense_macs"] == 4 * 16 * 16
    assert f["nonzero_macs"] == 0.25 * f["dense_macs"]  # was dense: the v * (g / |v|) product


@pytest.mark.parametrize(
    "fn",
    [
        lambda p, x: x @ (p["w"] / 2.0),
        lambda p, x: x @ (p["w"] / jnp.linalg.norm(p["w"])),  # spectral/weight norm style
        lambda p, x: x @ -p["w"],
        lambda p, x: x @ jax.lax.stop_gradient(p["w"]),
        lambda p, x: x @ jax.lax.optimization_barrier((p["w"], p["gamma"]))[0],
        lambda p, x: x @ (p["w"] * p["gamma"]),  # a folded BatchNorm scale
        lambda p, x: x @ (p["w"] / jnp.sqrt(p["var"]) * p["gamma"]),
    ],
    ids=["div", "div_norm", "neg", "stop_gradient", "barrier", "w_gamma", "w_var_gamma"],
)
def test_nonzero_macs_follow_the_kernel_through_scaling_ops(fn):
    w = jax.random.normal(jax.random.key(0), (16, 16))
    p = {"w": w, "gamma": jnp.full((16,), 2.0), "var": jnp.full((16,), 4.0)}
    masks = {"w": jnp.abs(w) >= jnp.quantile(jnp.abs(w), 0.75), "gamma": True, "var": True}
    p = jp.apply_masks(p, masks)
    f = report(p, masks, fn, X).flops
    assert f["dense_macs"] == 4 * 16 * 16
    assert f["nonzero_macs"] == 0.25 * f["dense_macs"], f


def test_a_pruned_scale_lowers_the_product_density_but_two_weights_stay_dense():
    w = jnp.ones((16, 16))
    gamma = jnp.ones(16).at[:8].set(0.0)  # half the output channels pruned by their scale
    f = report({"w": w, "gamma": gamma}, None, lambda p, x: x @ (p["w"] * p["gamma"]), X).flops
    assert f["nonzero_macs"] == 0.5 * f["dense_macs"]  # at most the sparser param's density
    # Two weight tensors of the result's shape: no single param's density applies.
    q = {"a": w.at[:8].set(0.0), "b": w}
    f = report(q, None, lambda q, x: x @ (q["a"] * q["b"]), X).flops
    assert f["nonzero_macs"] == f["dense_macs"]


# ------------------------------------------------------ kernels built of parts


def _lstm_macs(cell):
    x = jnp.ones((2, 8))
    carry = cell.initialize_carry(jax.random.key(1), x.shape)
    params, masks = _pruned(cell.init(jax.random.key(0), carry, x)["params"], 0.5)
    r = report(params, masks, lambda p, x: cell.apply({"params": p}, carry, x)[1], x)
    assert all(row.sparsity == 0.5 for row in r.rows if row.masked)
    return r.flops


def test_optimized_lstm_cell_concatenated_kernels_keep_their_density():
    plain = _lstm_macs(nn.LSTMCell(16))
    fused = _lstm_macs(nn.OptimizedLSTMCell(16))
    assert fused["dense_macs"] == plain["dense_macs"] == 2 * 4 * 16 * (8 + 16)
    assert fused["nonzero_macs"] == plain["nonzero_macs"] == 0.5 * plain["dense_macs"]


def test_concatenate_and_zero_pad_give_size_weighted_densities():
    q = jnp.ones((16, 8)).at[:, :4].set(0.0)  # density 0.5
    k = jnp.ones((16, 8)).at[:, :2].set(0.0)  # density 0.75
    v = jnp.ones((16, 16))  # density 1
    p = {"q": q, "k": k, "v": v}
    qkv = report(p, None, lambda p, x: x @ jnp.concatenate([p["q"], p["k"], p["v"]], 1), X)
    dense = 4 * 16 * 32
    assert qkv.flops["dense_macs"] == dense
    assert qkv.flops["nonzero_macs"] == dense * (8 * 0.5 + 8 * 0.75 + 16) / 32
    # With a zero block (jnp.zeros): its part counts as zeros.
    z = report(p, None, lambda p, x: x @ jnp.concatenate([p["v"], jnp.zeros((16, 16))], 1), X)
    assert z.flops["nonzero_macs"] == 0.5 * z.flops["dense_macs"]
    # A zero pad of the kernel: its nonzeros over the padded size.
    x = jnp.ones((4, 20))
    padded = report(p, None, lambda p, x: x @ jnp.pad(p["q"], ((0, 4), (0, 0))), x).flops
    assert padded["nonzero_macs"] == 4 * 20 * 8 * (16 * 8 * 0.5) / (20 * 8)
    # An activation concatenated with a kernel is no kernel: counted dense, as before.
    act = report(p, None, lambda p, x: x @ jnp.concatenate([p["q"], x.T @ x[:, :8]], 1), X)
    assert act.flops["nonzero_macs"] == act.flops["dense_macs"] == 16 * 8 * 4 + 4 * 16 * 16


# ------------------------------------------------------ bytes vs the checkpoint


def _saved_bytes(params, masks):
    """The bytes jp.save(format="compressed") writes for params and masks (its own path)."""
    by_path = checkpoint_trees.mask_lookup(masks, params) if masks is not None else None
    arrays, _, hosts = checkpoint_trees.encode_tree(params, by_path, True, "params")
    total = sum(a.nbytes for leaf in arrays.values() for a in leaf.values())
    if masks is not None:
        m_arrays, _ = checkpoint_trees.encode_masks(masks, hosts)
        total += sum(a.nbytes for leaf in m_arrays.values() for a in leaf.values())
    return total


def test_negative_zeros_are_counted_as_stored_bytes_as_the_checkpoint_stores_them():
    w = jax.random.normal(jax.random.key(0), (64, 64))
    masks = {"w": jnp.abs(w) >= jnp.quantile(jnp.abs(w), 0.9)}
    by_mul = {"w": w * masks["w"].astype(w.dtype)}  # torch-style: -0.0 where w < 0
    negzeros = int(np.sum(np.signbit(np.asarray(by_mul["w"])) & (np.asarray(by_mul["w"]) == 0)))
    assert negzeros > 1000
    clean = jp.apply_masks(by_mul, masks)
    for params in (clean, by_mul):
        r = report(params, masks)
        assert r.totals["compressed_bytes"] == _saved_bytes(params, masks)  # was 4.4x less
        assert r.rows[0].sparsity == pytest.approx(0.9, abs=1e-3)
    assert report(clean, masks).rows[0].stored_zeros == 0
    r = report(by_mul, masks)
    assert r.rows[0].stored_zeros == r.totals["stored_zeros"] == negzeros
    assert f"{negzeros:,} pruned entries are -0.0" in str(r)
    # Without masks: the sparsity counts -0.0 as zero, the bytes store it, the row says so.
    r = report(by_mul)
    assert r.totals["compressed_bytes"] == _saved_bytes(by_mul, None)
    assert r.rows[0].sparsity == pytest.approx(0.9, abs=1e-3) and r.totals["bytes_ratio"] > 0.5
    assert r.rows[0].stored_zeros == negzeros and "are -0.0" in str(r)
    assert "-0.0" not in str(report(clean))


def test_values_outside_masks_not_zeroed_yet_are_named():
    w = jnp.ones((8, 8))
    masks = {"w": jnp.zeros((8, 8), bool).at[:2].set(True)}
    r = report({"w": w}, masks)
    row = r.rows[0]
    assert row.unzeroed == 48 and row.nonzeros == 16 and row.stored_zeros == 0
    assert row.compressed_bytes == _saved_bytes(jp.apply_masks({"w": w}, masks), masks)
    assert "48 entries outside their masks are not zero yet" in str(r)


# ------------------------------------------------------ conv MAC convention


def test_conv_macs_count_padded_taps_and_name_them():
    conv = nn.Conv(8, (3, 3), padding="SAME", use_bias=False)
    x = jnp.ones((1, 7, 7, 4))
    params = conv.init(jax.random.key(0), x)["params"]
    f = report(params, None, lambda p, x: conv.apply({"params": p}, x), x).flops
    assert f["dense_macs"] == 7 * 7 * 8 * 3 * 3 * 4  # every tap of every output
    real = (7 * 3 - 2) ** 2 * 8 * 4  # per axis, 2 of the 21 (output, tap) pairs read padding
    assert f["padded_macs"] == f["dense_macs"] - real
    assert f["xla_flops"] == pytest.approx(2 * real, rel=0.05)
    assert "read conv padding, which XLA does not count" in str(
        report(params, None, lambda p, x: conv.apply({"params": p}, x), x)
    )
    valid = nn.Conv(8, (3, 3), padding="VALID", use_bias=False)
    f = report(params, None, lambda p, x: valid.apply({"params": p}, x), x).flops
    assert f["padded_macs"] == 0
    convt = nn.ConvTranspose(8, (3, 3), strides=(2, 2), padding="SAME", use_bias=False)
    pt = convt.init(jax.random.key(0), x)["params"]
    f = report(pt, None, lambda p, x: convt.apply({"params": p}, x), x).flops
    assert f["padded_macs"] == 0 and f["dense_macs"] == pytest.approx(f["xla_flops"] / 2, rel=0.05)


# ------------------------------------------------------ xla_flops and loops


def test_xla_flops_of_a_scanned_stack_is_flagged():
    p = {"w": jnp.ones((8, 32, 32)) * 0.1}

    def scanned(p, x):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"])[0]

    def unrolled(p, x):
        for i in range(8):
            x = jnp.tanh(x @ p["w"][i])
        return x

    x = jnp.ones((4, 32))
    s, u = report(p, None, scanned, x), report(p, None, unrolled, x)
    assert s.flops["dense_macs"] == u.flops["dense_macs"] == 8 * 4 * 32 * 32
    assert s.flops["xla_flops"] < s.flops["dense_macs"]  # XLA: the body once
    assert s.flops["loops"] == 1 and u.flops["loops"] == 0
    assert "1 loop whose body XLA counts once" in str(s)
    assert "counts once" not in str(u)
    assert s.flops["while_loops"] == 0 and "while_loop" not in str(s)

    def looped(p, x):  # a while_loop: its trip count is not in the program
        def body(c):
            i, h = c
            return i + 1, jnp.tanh(h @ p["w"][i])

        return jax.lax.while_loop(lambda c: c[0] < 8, body, (0, x))[1]

    w = report(p, None, looped, x)
    assert w.flops["dense_macs"] == 4 * 32 * 32  # one iteration
    assert w.flops["loops"] == 1 and w.flops["while_loops"] == 1
    assert "count the body of 1 while_loop once too" in " ".join(str(w).split())


# ------------------------------------------------------ linen variables, masks over params


class _BNNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(16)(x)
        x = nn.BatchNorm(use_running_average=True)(x)
        return nn.Dense(4)(x)


def test_masks_over_params_match_linen_variables_with_batch_stats():
    model = _BNNet()
    variables = model.init(jax.random.key(0), X)
    params, masks = _pruned(variables["params"])
    variables = {**variables, "params": params}
    r = report(variables, masks, model.apply, X)  # was: "masks has leaves that params lacks"
    rows = {row.path: row for row in r.rows}
    assert rows["params/Dense_0/kernel"].masked and rows["params/Dense_0/kernel"].sparsity == 0.75
    # Running statistics are state, not parameters (as an nnx model's BatchStats).
    assert not any(p.startswith("batch_stats/") for p in rows)
    assert r.totals["size"] == sum(x.size for x in jax.tree.leaves(params))
    assert r.flops["nonzero_macs"] == 0.25 * r.flops["dense_macs"]
    with pytest.raises(ValueError, match=r"masks=\{'params': jp.get_masks\(opt_state\)"):
        report(variables, {"nope": jnp.ones(3, bool)})
