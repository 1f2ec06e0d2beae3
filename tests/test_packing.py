"""The compressed sparse format: exact (bitwise) round trips, sizes, and corruption errors."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxprune import packing


def _same_bits(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def _nbytes(arrays):
    return sum(a.nbytes for a in arrays.values())


def _two_four(w, axis=0):
    """Keeps the 2 largest of every 4 consecutive entries along ``axis``."""
    moved = np.moveaxis(np.abs(w.astype(np.float32)), axis, -1)
    g = moved.reshape(-1, 4)
    m = np.zeros(g.shape, bool)
    np.put_along_axis(m, np.argsort(-g, axis=1, kind="stable")[:, :2], True, axis=1)
    m = np.moveaxis(m.reshape(moved.shape), -1, axis)
    return np.where(m, w, np.zeros((), w.dtype)), m


def test_unstructured_90_float32_under_target():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((256, 512)).astype(np.float32)
    mask = np.zeros(w.size, bool)
    mask[rng.permutation(w.size)[: w.size // 10]] = True
    mask = mask.reshape(w.shape)
    x = np.where(mask, w, np.float32(0))
    arrays, spec = packing.pack_leaf(x, mask)
    assert spec["kind"] == "bitmask"
    assert _nbytes(arrays) / x.nbytes <= 1 / 32 + 0.10 + 1e-6
    assert _same_bits(packing.unpack_leaf(arrays, spec), x)
    assert packing.packed_nbytes(x, mask) == _nbytes(arrays)


@pytest.mark.parametrize("axis", [0, 1])
def test_two_four_float16_detected_from_the_mask(axis):
    rng = np.random.default_rng(1)
    x, mask = _two_four(rng.standard_normal((64, 128)).astype(np.float16), axis)
    arrays, spec = packing.pack_leaf(x, mask)
    assert (spec["kind"], spec["axis"], spec["n"], spec["m"]) == ("nm", axis, 2, 4)
    assert _nbytes(arrays) / x.nbytes <= 0.5625
    assert _same_bits(packing.unpack_leaf(arrays, spec), x)


def test_nm_groups_with_fewer_kept_entries_pad_exactly():
    rng = np.random.default_rng(2)
    x, _ = _two_four(rng.standard_normal((32, 16)).astype(np.float32))
    x[:8] = 0.0  # whole groups empty, others with one entry
    x[9, ::2] = 0.0
    arrays, spec = packing.pack_leaf(x)  # no mask: detected from the nonzeros
    assert spec["kind"] in ("nm", "slices", "bitmask")
    assert _same_bits(packing.unpack_leaf(arrays, spec), x)


def test_removed_rows_and_columns_store_the_small_block():
    x = np.zeros((100, 60), np.float32)
    x[10:20, :30] = np.arange(300, dtype=np.float32).reshape(10, 30) + 1
    arrays, spec = packing.pack_leaf(x)
    assert spec["kind"] == "slices"
    assert arrays["values"].shape == (10, 30)
    assert _same_bits(packing.unpack_leaf(arrays, spec), x)


def test_dense_leaf_stays_dense_and_bf16_roundtrips():
    x = np.asarray(jnp.linspace(-1, 1, 24, dtype=jnp.bfloat16).reshape(4, 6))
    arrays, spec = packing.pack_leaf(x, np.ones((), bool))
    assert spec["kind"] == "dense" and spec["dtype"] == "bfloat16"
    assert _same_bits(packing.unpack_leaf(arrays, spec), x)


def test_negative_zero_nan_payload_and_masked_out_nonzeros_are_kept():
    x = np.zeros((8, 8), np.float32)
    x[0, 0] = -0.0
    x[1, 1] = np.frombuffer(np.uint32(0x7FC00123).tobytes(), np.float32)[0]  # NaN payload
    x[2, 2] = 3.0  # nonzero although the mask drops it: kept, never lost
    arrays, spec = packing.pack_leaf(x, np.zeros((8, 8), bool))
    assert _same_bits(packing.unpack_leaf(arrays, spec), x)


@pytest.mark.parametrize("x", [np.float32(2.5), np.zeros((0, 3), np.float32), np.arange(5)])
def test_scalars_empty_and_integer_leaves(x):
    arrays, spec = packing.pack_leaf(x)
    assert _same_bits(packing.unpack_leaf(arrays, spec), np.asarray(x))


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([np.float32, np.float16]),
)
def test_roundtrip_is_bitwise_and_never_larger_than_dense(shape, density, seed, dtype):
    rng = np.random.default_rng(seed)
    mask = rng.random(shape) < density
    x = np.where(mask, rng.standard_normal(shape).astype(dtype), np.zeros((), dtype))
    arrays, spec = packing.pack_leaf(x, mask)
    assert _same_bits(packing.unpack_leaf(arrays, spec), x)
    assert _nbytes(arrays) <= x.nbytes


def test_changed_value_fails_the_crc():
    x = np.where(np.eye(16, dtype=bool), 1.0, 0.0).astype(np.float32)
    arrays, spec = packing.pack_leaf(x)
    arrays = {k: v.copy() for k, v in arrays.items()}
    arrays["values"].reshape(-1)[0] += 1
    with pytest.raises(packing.PackError, match="CRC-32 mismatch"):
        packing.unpack_leaf(arrays, spec)


def test_truncated_array_is_an_error():
    rng = np.random.default_rng(3)
    x = np.where(rng.random((32, 32)) < 0.1, 1.0, 0.0).astype(np.float32)
    arrays, spec = packing.pack_leaf(x)
    arrays = dict(arrays, values=arrays["values"][:-1])
    with pytest.raises(packing.PackError, match="truncated or corrupt"):
        packing.unpack_leaf(arrays, spec)


def test_unknown_encoding_is_an_error():
    arrays, spec = packing.pack_leaf(np.ones(3, np.float32))
    with pytest.raises(packing.PackError, match="unknown leaf encoding"):
        packing.unpack_leaf(arrays, dict(spec, kind="zip"))


def test_complex128_negative_zero_roundtrips_bitwise():
    # 16-byte entries: a zero with a sign bit set is not a zero entry.
    x = np.zeros((8, 16), np.complex128)
    x[0, :4] = [1 + 1j, 2, 3, 4]
    x[1, 0] = complex(-0.0, 0.0)
    arrays, spec = packing.pack_leaf(x)
    assert _same_bits(packing.unpack_leaf(arrays, spec), x)


@pytest.mark.parametrize(("n", "m", "bits"), [(1, 8, 3), (2, 8, 3), (1, 16, 4), (3, 16, 4)])
def test_nm_positions_of_groups_of_eight_and_sixteen_roundtrip(n, m, bits):
    # m = 8 stores each kept position in 3 bits, which do not divide a byte:
    # the positions straddle byte boundaries. (Denser patterns, such as 3:8,
    # take fewer bytes as a bitmask, which the encoder then picks.)
    rng = np.random.default_rng(n * m)
    x = rng.standard_normal((24, 64)).astype(np.float32)
    groups = x.reshape(24, 64 // m, m)
    keep = np.argsort(-np.abs(groups), axis=-1)[..., :n]
    mask = np.zeros(groups.shape, bool)
    np.put_along_axis(mask, keep, True, axis=-1)
    mask = mask.reshape(x.shape)
    x = np.where(mask, x, 0.0).astype(np.float32)
    arrays, spec = packing.pack_leaf(x, mask)
    assert (spec["kind"], spec["axis"], spec["n"], spec["m"], spec["bits"]) == ("nm", 1, n, m, bits)
    count = x.size // m * n
    assert arrays["index"].size == -(-count * bits // 8)
    assert _same_bits(packing.unpack_leaf(arrays, spec), x)
    assert packing.packed_nbytes(x, mask) == _nbytes(arrays)


@pytest.mark.parametrize(("n", "m"), [(3, 8), (5, 16)])
def test_dense_nm_patterns_are_stored_as_the_smaller_bitmask(n, m):
    rng = np.random.default_rng(m)
    order = np.argsort(rng.random((24, 64 // m, m)), axis=-1)  # random positions per group
    x = np.zeros((24, 64 // m, m), np.float32)
    np.put_along_axis(x, order[..., :n], 1.5, axis=-1)
    x = x.reshape(24, 64)
    arrays, spec = packing.pack_leaf(x)
    assert spec["kind"] == "bitmask"  # 1 bit per entry < n * ceil(log2(m)) / m bits
    assert _nbytes(arrays) == x.size // 8 + int((x != 0).sum()) * 4
    assert _same_bits(packing.unpack_leaf(arrays, spec), x)
