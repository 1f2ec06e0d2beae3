"""QA round 10b (deployment): the bytes export writes, inspect's stored payload, -0.0 mask bits."""

import json
import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune as jp
from jaxprune import checkpoint, cli
from jaxprune.checkpoint_trees import masked_negative_zeros, stored_nbytes, values_outside_masks


def _payload(step_dir) -> int:
    """The params arrays and mask bits a step's metadata records, counted by hand."""
    meta = json.loads((pathlib.Path(step_dir) / "meta" / "metadata").read_text())
    values = sum(
        math.prod(shape) * jnp.dtype(dtype).itemsize
        for spec in meta["params"]
        for shape, dtype in spec["arrays"].values()
    )
    bits = sum(-(-math.prod(m["shape"]) // 8) for m in meta.get("masks", []) if m["kind"] == "bits")
    return values + bits


@pytest.fixture
def kernel():
    w = {"w": jax.random.normal(jax.random.key(0), (64, 32))}
    return w, jp.masks.topk(jp.criteria.magnitude(w), 0.9)


def test_stored_nbytes_adds_the_mask_bits_only_where_the_checkpoint_needs_them():
    m = np.array([[False, True, False, True]])
    assert stored_nbytes(np.array([[0.0, 2.0, 0.0, 4.0]], np.float32), m) == 9  # support
    x = np.array([[-0.0, 2.0, 0.0, 4.0]], np.float32)
    assert stored_nbytes(x, m) == 1 + 3 * 4 + 1  # bitmask bits, 3 values, the mask's bits
    assert stored_nbytes(np.array([[-0.0, 2.0]], np.float32), np.array(False)) == 8  # scalar


def test_negative_zero_warning_counts_the_mask_bits_as_the_report_does(tmp_path, kernel):
    w, masks = kernel
    mul = {"w": w["w"] * masks["w"].astype(jnp.float32)}
    fixed = jp.apply_masks(mul, masks)
    size = jp.report(mul, masks).rows[0].compressed_bytes
    clean = jp.report(fixed, masks).rows[0].compressed_bytes
    m = np.asarray(masks["w"])
    (found,) = masked_negative_zeros({"w": np.asarray(mul["w"])}, {"w": m})
    assert found[3:] == (size, clean) and size - clean > m.size // 8
    with pytest.warns(UserWarning, match=rf"take {size:,} packed bytes, not {clean:,} .*mask bits"):
        out = checkpoint.save(tmp_path / "neg", 0, mul, masks=masks, format="compressed")
    assert _payload(out) == size  # the disk agrees with the warning and the report
    ok = checkpoint.save(tmp_path / "ok", 0, fixed, masks=masks, format="compressed")
    assert _payload(ok) == clean


def test_values_outside_masks_splits_unzeroed_values_and_negative_zeros():
    w = np.array([[-1.0, 2.0, -0.0, 4.0, np.nan, 0.0]], np.float32)
    m = np.array([[False, True, False, True, False, False]])
    (row,) = values_outside_masks({"w": w}, {"w": m})
    masked = np.where(m, w, np.float32(0))
    assert row == ("w", 2, 1, 4, stored_nbytes(w, m), stored_nbytes(masked, m))
    assert values_outside_masks({"w": masked}, {"w": m}) == []


def test_cli_export_warns_about_unzeroed_values_and_apply_masks_writes_what_inspect_says(
    tmp_path, kernel, capsys
):
    w, masks = kernel
    checkpoint.save(tmp_path / "ck", 1, w, masks=masks)  # masks recorded, params not masked
    rep = jp.report(w, masks)
    n = rep.totals["unzeroed"]
    assert n == 64 * 32 - int(np.asarray(masks["w"]).sum())

    assert cli.main(["inspect", str(tmp_path / "ck"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["totals"]["compressed_bytes"] == rep.totals["compressed_bytes"]
    dense = 64 * 32 * 4 + 64 * 32 // 8  # a dense checkpoint: values and the mask's bits
    assert data["stored"] == {"payload_bytes": dense, "leaves": {"w": dense}}

    assert cli.main(["export", str(tmp_path / "ck"), str(tmp_path / "as_is")]) == 0
    err = capsys.readouterr().err
    written = _payload(tmp_path / "as_is" / "1")
    assert written == 64 * 32 * 4 + 256  # dense values and the mask bits
    assert err.count("\n") == 1 and err.startswith("jaxprune: warning: ")
    assert re.search(
        rf"params hold {n:,} entries outside their masks.*\({n:,} not zero yet\): 'w': "
        rf"{n:,} of its {n:,} masked-out entries.*take {written:,} payload bytes.*not the "
        rf"{rep.totals['compressed_bytes']:,}.*Fix: jaxprune export .*ck OUT --apply-masks",
        err,
    )
    # inspect of the shipped artefact gives the bytes it stores, next to the report's.
    assert cli.main(["inspect", str(tmp_path / "as_is")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"Stored in this compressed checkpoint: {written:,} payload bytes" in out
    assert f"{n:,} entries outside their masks are not zero yet" in out and "--apply-masks" in out

    argv = ["export", str(tmp_path / "ck"), str(tmp_path / "masked"), "--apply-masks"]
    assert cli.main(argv) == 0
    assert capsys.readouterr().err == ""
    ck = checkpoint.restore(tmp_path / "masked")
    m = np.asarray(masks["w"])
    assert not np.asarray(ck.params["w"])[~m].any()
    np.testing.assert_array_equal(np.asarray(ck.params["w"])[m], np.asarray(w["w"])[m])
    np.testing.assert_array_equal(ck.masks["w"], m)
    assert _payload(tmp_path / "masked" / "1") == rep.totals["compressed_bytes"]
    assert cli.main(["inspect", str(tmp_path / "masked"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["stored"]["payload_bytes"] == data["totals"]["compressed_bytes"]


def test_cli_export_names_the_cli_fix_for_negative_zeros(tmp_path, kernel, capsys):
    w, masks = kernel
    mul = {"w": w["w"] * masks["w"].astype(jnp.float32)}
    checkpoint.save(tmp_path / "ck", 1, mul, masks=masks)
    neg = int(np.count_nonzero(np.signbit(np.asarray(mul["w"])) & ~np.asarray(masks["w"])))
    # No Python UserWarning (an error under this suite's filters): one CLI line instead.
    assert cli.main(["export", str(tmp_path / "ck"), str(tmp_path / "exp")]) == 0
    err = capsys.readouterr().err
    size = jp.report(mul, masks).rows[0].compressed_bytes
    clean = jp.report(jp.apply_masks(mul, masks), masks).rows[0].compressed_bytes
    assert re.search(
        rf"^jaxprune: warning: params hold {neg:,} entries .*\({neg:,} -0\.0, left by masking "
        rf"with w \* mask.*take {size:,} payload bytes .*not the {clean:,} .*--apply-masks",
        err,
    )
    assert _payload(tmp_path / "exp" / "1") == size
    ck = checkpoint.restore(tmp_path / "exp")
    assert np.asarray(ck.params["w"]).tobytes() == np.asarray(mul["w"]).tobytes()  # bitwise
    # -0.0 == 0 costs nothing in a dense export: no warning there.
    assert cli.main(["export", str(tmp_path / "ck"), str(tmp_path / "d"), "--format", "dense"]) == 0
    assert capsys.readouterr().err == ""


def test_cli_dense_export_warns_about_unzeroed_values_only(tmp_path, kernel, capsys):
    w, masks = kernel
    checkpoint.save(tmp_path / "ck", 3, w, masks=masks)
    argv = ["export", str(tmp_path / "ck"), str(tmp_path / "d"), "--format", "dense", "--step", "3"]
    assert cli.main(argv) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "The dense format writes every entry" in err
    assert "OUT --step 3 --format dense --apply-masks" in err


def test_cli_export_apply_masks_needs_recorded_masks(tmp_path, kernel, capsys):
    w, _ = kernel
    checkpoint.save(tmp_path / "ck", 1, w)
    assert cli.main(["export", str(tmp_path / "ck"), str(tmp_path / "o"), "--apply-masks"]) == 1
    err = capsys.readouterr().err
    assert "records no masks to apply. Fix: leave --apply-masks out" in err
    assert err.count("\n") == 1 and not (tmp_path / "o").exists()


def test_docs_give_the_measured_figures():
    doc = pathlib.Path(__file__).parent.parent / "docs" / "checkpoint.md"
    text = " ".join(doc.read_text().split())
    w = jax.random.normal(jax.random.key(0), (512, 256))
    masks = jp.masks.topk(jp.criteria.magnitude({"w": w}), 0.9)
    mul = {"w": w * masks["w"].astype(jnp.float32)}
    size = jp.report(mul, masks).rows[0].compressed_bytes
    clean = jp.report(jp.apply_masks(mul, masks), masks).rows[0].compressed_bytes
    assert f"{size:,} bytes" in text and f"the {clean:,} of the same values" in text
    assert f"({size / clean:.1f}x)" in text
    assert "`xla_flops` is below `2 * dense_macs`: by 18%" in text
    assert "`2 * dense_macs` is 22% above `xla_flops`" in text
