"""Masks whose kept weights include exact zeros: stored once, in the params' own bits."""

import math

import numpy as np
import pytest

import jaxprune as jp
from jaxprune import checkpoint
from jaxprune import checkpoint_meta as meta_checks
from jaxprune.cli import _stored_bytes


def _kept_zeros(dtype=np.float32, shape=(128, 96), seed=0):
    """A pruned leaf whose mask keeps some exact zeros (regrown weights, int8 rounding)."""
    rng = np.random.default_rng(seed)
    mask = rng.random(shape) < 0.3
    w = rng.standard_normal(shape) * 4
    w = np.where(mask & (rng.random(shape) > 0.2), w, 0).astype(dtype)
    params = {"w": w, "b": np.ones(shape[-1], dtype)}
    return params, {"w": mask, "b": np.True_}


def _mask_specs(path):
    ckpt_meta = checkpoint._read(path, checkpoint.latest_step(path))[0]
    return {s["path"][0]: s for s in ckpt_meta["masks"]}, ckpt_meta


@pytest.mark.parametrize("dtype", [np.float32, np.int8])
def test_a_mask_keeping_zeros_is_read_from_the_bitmask_leaf_not_stored_again(tmp_path, dtype):
    params, masks = _kept_zeros(dtype)
    assert (masks["w"] & (params["w"] == 0)).any()  # kept zeros: the mask is not the support
    checkpoint.save(tmp_path, 3, params, masks=masks, format="compressed")
    specs, meta = _mask_specs(tmp_path)
    assert specs["w"]["kind"] == "packed"
    assert next(s for s in meta["params"] if s["path"] == ["w"])["kind"] == "bitmask"
    ckpt = checkpoint.restore(tmp_path, params=params)
    np.testing.assert_array_equal(np.asarray(ckpt.masks["w"]), masks["w"])
    assert np.asarray(ckpt.params["w"]).tobytes() == params["w"].tobytes()
    # What the metadata says is stored is what jp.report counts: no second copy of the mask.
    stored = _stored_bytes(meta, ["w", "b"])
    rep = {r.path: r.compressed_bytes for r in jp.report(params, masks).rows}
    assert stored == rep
    w = params["w"]
    assert stored["w"] == math.ceil(w.size / 8) + int(masks["w"].sum()) * w.itemsize


def test_a_mask_the_leaf_encoding_cannot_hold_is_stored_as_bits(tmp_path):
    # Whole rows pruned and one kept weight at 0: the slices encoding wins, and
    # its keep-bits cannot say which entries inside the kept rows are kept.
    w = np.ones((64, 64), np.float32)
    w[32:] = 0
    w[0, 0] = 0
    mask = np.zeros((64, 64), bool)
    mask[:32] = True
    params, masks = {"w": w}, {"w": mask}
    checkpoint.save(tmp_path, 0, params, masks=masks, format="compressed")
    specs, meta = _mask_specs(tmp_path)
    assert meta["params"][0]["kind"] == "slices"
    assert specs["w"]["kind"] == "bits"
    np.testing.assert_array_equal(np.asarray(checkpoint.restore(tmp_path).masks["w"]), mask)
    assert _stored_bytes(meta, ["w"])["w"] == jp.report(params, masks).rows[0].compressed_bytes


def test_the_dense_format_stores_such_a_mask_as_bits(tmp_path):
    params, masks = _kept_zeros()
    checkpoint.save(tmp_path, 0, params, masks=masks)
    specs, _ = _mask_specs(tmp_path)
    assert specs["w"]["kind"] == "bits"
    np.testing.assert_array_equal(np.asarray(checkpoint.restore(tmp_path).masks["w"]), masks["w"])


def test_shared_bits_that_no_longer_match_the_mask_are_an_error(tmp_path, monkeypatch):
    params, masks = _kept_zeros()
    checkpoint.save(tmp_path, 0, params, masks=masks, format="compressed")
    read = checkpoint._read
    w, m = params["w"].reshape(-1), masks["w"].reshape(-1)
    # A kept zero and a pruned zero next to each other: swapping their bits moves
    # no value, so the params leaf still decodes to the same array, CRC and all.
    i = next(i for i in range(w.size - 1) if m[i] and not m[i + 1] and w[i] == 0 == w[i + 1])

    def damaged(root, step):
        meta, items = read(root, step)
        j = next(k for k, s in enumerate(meta["params"]) if s["path"] == ["w"])
        leaf = items["params"][f"a{j:05d}"]
        bits = np.unpackbits(np.asarray(leaf["bits"]), count=w.size)
        bits[i], bits[i + 1] = bits[i + 1], bits[i]
        leaf["bits"] = np.packbits(bits)
        return meta, items

    monkeypatch.setattr(checkpoint, "_read", damaged)
    with pytest.raises(checkpoint.CheckpointError, match="mask of 'w' .* CRC-32 mismatch"):
        checkpoint.restore(tmp_path)


def test_metadata_naming_shared_bits_of_a_leaf_without_them_is_refused(tmp_path):
    params, masks = _kept_zeros()
    checkpoint.save(tmp_path, 0, params, masks=masks, format="compressed")
    _, meta = _mask_specs(tmp_path)
    meta_checks.check_fields(meta)  # as written: consistent
    leaf = next(s for s in meta["params"] if s["path"] == ["w"])
    leaf["kind"] = "dense"
    with pytest.raises(ValueError, match="masks leaf 'w': its params leaf is not a bitmask"):
        meta_checks.check_fields(meta)
