"""Reports: per-leaf rows and totals, XLA and ShrinkBench FLOPs, text/JSON, plots."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxprune as jp
from jaxprune.report import plot_accuracy_vs_compression, plot_sparsity, report


def _mlp():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {
        "l1": {"kernel": jax.random.normal(k1, (20, 30)), "bias": jnp.ones(30)},
        "l2": {"kernel": jax.random.normal(k2, (30, 5)), "bias": jnp.zeros(5)},
    }


def _topk(params, sparsity):
    """Masks keeping the largest ``1 - sparsity`` of each kernel (numpy: no compiles)."""

    def leaf(path, w):
        w = np.asarray(w)
        if w.ndim < 2:
            return np.ones((), bool)
        s = sparsity[jax.tree_util.keystr(path)] if isinstance(sparsity, dict) else sparsity
        order = np.argsort(-np.abs(w).reshape(-1), kind="stable")
        keep = np.zeros(w.size, bool)
        keep[order[: w.size - round(s * w.size)]] = True
        return keep.reshape(w.shape)

    return jax.tree_util.tree_map_with_path(leaf, params)


def _apply(p, x):
    h = jax.nn.relu(x @ p["l1"]["kernel"] + p["l1"]["bias"])
    return h @ p["l2"]["kernel"] + p["l2"]["bias"]


def test_rows_totals_and_shrinkbench_macs():
    params = _mlp()
    masks = _topk(params, {"['l1']['kernel']": 0.9, "['l2']['kernel']": 0.6})
    r = report(params, masks, _apply, jnp.ones((4, 20)))
    rows = {row.path: row for row in r.rows}
    assert set(rows) == {"l1/kernel", "l1/bias", "l2/kernel", "l2/bias"}
    k1 = rows["l1/kernel"]
    assert (k1.shape, k1.size, k1.nonzeros, k1.dense_bytes) == ((20, 30), 600, 60, 2400)
    assert k1.sparsity == pytest.approx(0.9) and k1.masked and k1.encoding == "bitmask"
    assert k1.compressed_bytes == 600 // 8 + 60 * 4
    assert rows["l2/bias"].nonzeros == 0 and not rows["l2/bias"].masked
    t = r.totals
    assert t["size"] == 600 + 30 + 150 + 5
    assert t["nonzeros"] == 60 + 30 + 60 + 0
    assert t["dense_bytes"] == 4 * t["size"]
    assert t["compressed_bytes"] == sum(row.compressed_bytes for row in r.rows)
    assert t["masked_sparsity"] == pytest.approx(1 - 120 / 750)
    # ShrinkBench: batch x in x out multiply-adds per dense layer, scaled by density.
    dense = 4 * 20 * 30 + 4 * 30 * 5
    assert r.flops["dense_macs"] == dense
    assert r.flops["nonzero_macs"] == pytest.approx(4 * 20 * 30 * 0.1 + 4 * 30 * 5 * 0.4)
    # XLA counts a multiply-add as 2 FLOPs, plus the biases and the relu.
    assert 2 * dense <= r.flops["xla_flops"] <= 2 * dense + 4 * 200


class _ConvNet(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 8, (3, 3), padding="VALID", rngs=rngs)
        self.grouped = nnx.Conv(8, 8, (3, 3), strides=2, feature_group_count=4, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.fc = nnx.Linear(4 * 4 * 8, 10, rngs=rngs)

    def __call__(self, x):
        x = self.bn(self.grouped(jax.nn.relu(self.conv(x))))
        return self.fc(x.reshape(x.shape[0], -1))


def test_nnx_convnet_macs_match_hand_count():
    model = _ConvNet(nnx.Rngs(0))
    masks = _topk(nnx.state(model, nnx.Param).to_pure_dict(), 0.75)
    r = report(model, masks, example_inputs=jnp.ones((2, 10, 10, 3)))
    conv = 8 * 8 * 8 * (3 * 3 * 3)  # 8x8 outputs x 8 channels x (3x3x3) taps
    grouped = 4 * 4 * 8 * (3 * 3 * 2)  # stride 2, SAME; 8/4 = 2 inputs per group
    dense = 2 * (conv + grouped + 128 * 10)
    assert r.flops["dense_macs"] == dense
    assert r.flops["nonzero_macs"] == pytest.approx(dense * 0.25, rel=1e-3)
    assert r.flops["mac_reduction"] == pytest.approx(4.0, rel=1e-3)
    assert r.flops["xla_flops"] > 2 * dense * 0.99


def test_without_masks_counts_exact_zeros_and_finds_structure():
    w = jnp.zeros((16, 8)).at[:4].set(2.0)
    r = report({"w": w})
    (row,) = r.rows
    assert row.sparsity == 0.75 and row.encoding == "slices" and r.flops is None
    assert row.compressed_bytes == 4 * 8 * 4 + 2 + 1


def test_text_and_json_renderings():
    params = _mlp()
    r = report(params, _topk(params, 0.5), _apply, jnp.ones((1, 20)))
    text = str(r)
    assert "l1/kernel" in text and "bitmask" in text and "XLA FLOPs" in text and "total" in text
    data = json.loads(r.to_json())
    assert [row["path"] for row in data["rows"]] == [row.path for row in r.rows]
    assert data["totals"]["nonzeros"] == r.totals["nonzeros"]
    assert data["flops"]["dense_macs"] == r.flops["dense_macs"]


def test_plots_are_written(tmp_path):
    params = _mlp()
    r = report(params, _topk(params, 0.8))
    fig = plot_sparsity(r, tmp_path / "sparsity.png")
    assert (tmp_path / "sparsity.png").stat().st_size > 1000
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == ["l1/kernel 20x30", "l2/kernel 30x5"]
    results = [
        {"method": "magnitude", "sparsity": s, "accuracy": 0.98 - s / 10} for s in (0.5, 0.9, 0.95)
    ] + [{"method": "random", "compression": c, "accuracy": 0.9 - c / 100} for c in (2, 10, 20)]
    (tmp_path / "r.json").write_text(json.dumps({"results": results}))
    (tmp_path / "r.csv").write_text("method,sparsity,accuracy\na,0.5,0.9\na,0.9,0.8\n")
    fig = plot_accuracy_vs_compression(tmp_path / "r.json", tmp_path / "acc.png")
    assert (tmp_path / "acc.png").stat().st_size > 1000
    lines = fig.axes[0].get_lines()
    assert [ln.get_label() for ln in lines] == ["magnitude", "random"]
    np.testing.assert_allclose(lines[0].get_xdata(), [2, 10, 20])
    fig = plot_accuracy_vs_compression(tmp_path / "r.csv")
    np.testing.assert_allclose(fig.axes[0].get_lines()[0].get_xdata(), [2, 10])


def test_errors_name_the_problem(tmp_path):
    params = _mlp()
    with pytest.raises(ValueError, match="masks has leaves that params lacks: l3/kernel"):
        report(params, {"l3": {"kernel": jnp.ones((2, 2), bool)}})
    with pytest.raises(ValueError, match=r"mask vs param: l1/kernel: \(30, 20\) vs \(20, 30\)"):
        report(params, {"l1": {"kernel": jnp.ones((30, 20), bool)}})
    with pytest.raises(ValueError, match="apply_fn was given without example_inputs"):
        report(params, apply_fn=_apply)
    with pytest.raises(ValueError, match="results record 0 .* needs 'accuracy'"):
        plot_accuracy_vs_compression([{"sparsity": 0.5}])
    with pytest.raises(ValueError, match="results file .* does not exist"):
        plot_accuracy_vs_compression(tmp_path / "missing.json")


def test_json_of_an_all_zero_tree_is_strict_json():
    r = report({"w": jnp.zeros((4, 4))}, None, lambda p, x: x @ p["w"], jnp.ones((1, 4)))
    data = json.loads(r.to_json(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert data["totals"]["compression"] is None and data["flops"]["mac_reduction"] is None
    text = str(r)
    assert "(all pruned)" in text and "infx" not in text


def test_report_of_a_model_without_conv_or_dense_layers_prints_no_infinite_ratio():
    r = report({"w": jnp.ones((4, 4))}, None, lambda p, x: x * p["w"], jnp.ones((4, 4)))
    assert r.flops["dense_macs"] == 0 and r.flops["mac_reduction"] == 1.0
    text = str(r)
    assert "no conv or dense layers" in text and "inf" not in text


def test_results_files_with_one_record_empty_cells_and_full_sparsity(tmp_path):
    (tmp_path / "one.jsonl").write_text('{"method": "m", "sparsity": 0.75, "accuracy": 0.9}\n')
    fig = plot_accuracy_vs_compression(tmp_path / "one.jsonl", tmp_path / "new" / "p.png")
    np.testing.assert_allclose(fig.axes[0].get_lines()[0].get_xdata(), [4.0])
    assert (tmp_path / "new" / "p.png").exists()  # the folder is created
    (tmp_path / "r.csv").write_text("method,sparsity,compression,accuracy\nm,0.5,,0.9\nm,,8,0.8\n")
    fig = plot_accuracy_vs_compression(tmp_path / "r.csv")
    np.testing.assert_allclose(fig.axes[0].get_lines()[0].get_xdata(), [2.0, 8.0])
    with pytest.raises(ValueError, match="record 0 has sparsity 1.0: .* no finite compression"):
        plot_accuracy_vs_compression([{"sparsity": 1.0, "accuracy": 0.1}])


def test_summary_names_masked_sparsity_only_when_masks_are_given():
    params = _mlp()
    assert "masked leaves' sparsity" not in str(report(params))
    assert "masked leaves' sparsity 50.00%" in str(report(params, _topk(params, 0.5)))


def test_macs_of_a_conv_shrunk_to_no_filters_are_zero():
    # Global channel pruning can empty a layer; its report must still be written.
    def net(p, x):
        dn = ("NHWC", "HWIO", "NHWC")
        h = jax.lax.conv_general_dilated(x, p["c"], (1, 1), "SAME", dimension_numbers=dn)
        return h.sum((1, 2)) @ p["w"]

    params = {"c": jnp.ones((3, 3, 2, 0)), "w": jnp.ones((0, 4))}
    r = report(params, apply_fn=net, example_inputs=jnp.ones((1, 5, 5, 2)))
    assert r.flops["dense_macs"] == 0.0 and r.totals["size"] == 0


def test_nonzero_macs_follow_masked_and_scaled_params_through_jit():
    p = {"w": jnp.ones((4, 4)).at[:2].set(0.0)}
    m = {"w": p["w"] != 0}
    x = jnp.ones((3, 4))
    # jp.apply_masks inside the model (a nested jit of select_n), and a scaled kernel.
    for fn in (
        lambda p, x: x @ jp.apply_masks(p, m)["w"],
        lambda p, x: x @ (p["w"] * 2.0),
        lambda p, x: x @ jax.jit(lambda w: w.T.T)(p["w"]),
    ):
        flops = report(p, m, fn, x).flops
        assert flops["dense_macs"] == 48.0 and flops["nonzero_macs"] == 24.0, flops
    # Two different params multiplied: no single parameter's density applies.
    q = {"a": p["w"], "b": jnp.ones((4, 4))}
    flops = report(q, None, lambda q, x: x @ (q["a"] * q["b"]), x).flops
    assert flops["nonzero_macs"] == 48.0


def test_nonzero_macs_follow_slices_splits_and_indexing_of_a_parameter():
    # A fused QKV kernel split in three, a column slice, a stacked layer indexed in a
    # loop: each lost the parameter's identity, and its MACs counted as dense.
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(8, 48)) * (rng.random((8, 48)) < 0.25), jnp.float32)
    d = float(np.mean(np.asarray(w) != 0))
    x = jnp.ones((2, 8))

    def qkv(p, x):
        q, k, v = jnp.split(p["w"], 3, axis=1)
        return x @ q + x @ k + x @ v

    for fn, dense in ((qkv, 2 * 8 * 48), (lambda p, x: x @ p["w"][:, :16], 2 * 8 * 16)):
        f = report({"w": w}, apply_fn=fn, example_inputs=x).flops
        assert f["dense_macs"] == dense
        assert f["nonzero_macs"] == pytest.approx(dense * d)
    ws = jnp.stack([w[:, :8]] * 3)

    def stacked(p, x):
        for i in range(3):
            x = x @ p["ws"][i]
        return x

    f = report({"ws": ws}, apply_fn=stacked, example_inputs=x).flops
    density = float(np.mean(np.asarray(ws) != 0))
    assert f["nonzero_macs"] == pytest.approx(f["dense_macs"] * density)


def test_transposed_conv_macs_count_real_input_pixels_only():
    # Input dilation inserts zeros; counting every (output, tap) pair gave ~stride^2 x.
    conv = nnx.ConvTranspose(8, 16, (3, 3), strides=(2, 2), rngs=nnx.Rngs(0))
    x = jnp.ones((2, 10, 10, 8))
    f = report(conv, example_inputs=x).flops
    assert f["dense_macs"] == pytest.approx(f["xla_flops"] / 2, rel=0.1)
    assert f["dense_macs"] <= 2 * 10 * 10 * 8 * 3 * 3 * 16  # at most every input pixel x kernel


def test_report_takes_prefix_masks_and_matches_the_checkpoint_bytes():
    import optax

    params = {"enc": _mlp()["l1"], "head": {"kernel": jnp.ones((30, 5))}}
    tx = optax.masked(jp.prune(optax.sgd(0.1), sparsity=0.5), {"enc": True, "head": False})
    state = tx.init(params)
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    masks = jp.get_masks(state)
    r = report(params, masks)  # was: "masks has leaves that params lacks: head"
    rows = {row.path: row for row in r.rows}
    assert rows["enc/kernel"].masked and rows["enc/kernel"].sparsity == pytest.approx(0.5)
    assert rows["enc/bias"].encoding == "dense"  # a scalar mask keeps a leaf dense, as stored
    from jaxprune import packing  # what jp.save(..., format="compressed") stores per leaf
    from jaxprune._mask_apply import _broadcast_prefix

    stored = sum(
        packing.packed_nbytes(np.asarray(x), np.asarray(m))
        for x, m in zip(
            jax.tree.leaves(params),
            jax.tree.leaves(_broadcast_prefix(params, masks)),
            strict=True,
        )
    )
    assert r.totals["compressed_bytes"] == stored


def test_plot_accuracy_vs_compression_checks_ranges():
    with pytest.raises(ValueError, match=r"sparsity 90; it must be a fraction in \[0, 1\)"):
        plot_accuracy_vs_compression([{"sparsity": 90, "accuracy": 0.9}])
    with pytest.raises(ValueError, match="compression 0; it must be >= 1"):
        plot_accuracy_vs_compression([{"compression": 0, "accuracy": 0.9}])


def test_json_lines_of_several_records_and_typed_keys_in_the_tree(tmp_path):
    lines = [
        {"method": "a", "sparsity": 0.5, "accuracy": 0.9},
        {"method": "a", "compression": 10, "accuracy": 0.8},
    ]
    text = json.dumps(lines[0]) + "\n\n" + json.dumps(lines[1]) + "\n"  # a blank line too
    (tmp_path / "r.jsonl").write_text(text)
    fig = plot_accuracy_vs_compression(tmp_path / "r.jsonl")
    np.testing.assert_allclose(fig.axes[0].get_lines()[0].get_xdata(), [2.0, 10.0])
    # A typed PRNG key (an nnx Rngs stream in a state) holds no weights: not a row.
    r = report({"w": jnp.ones((4, 4)).at[0].set(0.0), "key": jax.random.key(0)})
    assert [row.path for row in r.rows] == ["w"] and r.totals["size"] == 16
    assert r.totals["nonzeros"] == 12


def test_masks_that_are_not_bool_or_zero_one_are_refused():
    params = {"w": jnp.ones((2, 2))}
    with pytest.raises(ValueError, match=r"masks leaf 'w' has dtype float32 and holds 0\.5"):
        report(params, {"w": jnp.full((2, 2), 0.5)})  # scores, not a mask
    with pytest.raises(ValueError, match=r"masks leaf 'w' is not a bool array \(a str"):
        report(params, {"w": "keep"})
    assert report(params, {"w": jnp.eye(2)}).totals["masked_sparsity"] == 0.5  # 0/1 floats
