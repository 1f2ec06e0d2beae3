"""The compressed sparse format: each leaf in its smallest exact encoding.

A consumer of masks: it turns a pruned leaf into a few small arrays
and back, bitwise. The *support* of a leaf is ``mask | (bits != 0)``: entries
the mask keeps, plus any entry whose bit pattern is not all zeros (so a ``-0.0``
or a value the mask forgot is never lost). Entries outside the support are
``+0.0`` bit for bit and need not be stored. Candidate encodings:

* ``dense`` — the array itself (non-prunable leaves, shrunk params);
* ``slices`` — one packed keep-bit per index along every axis plus the dense
  sub-block of kept indices (neurons, channels, filters removed but not shrunk);
* ``nm`` — N:M structure detected from the support itself (at most ``n``
  entries in every group of ``m`` consecutive entries along one axis): the
  values plus ``ceil(log2 m)``-bit positions inside each group;
* ``bitmask`` — a packed bit per entry plus the nonzero values (unstructured).

The smallest one wins; ties go to the earlier one in that list. Every encoding
carries the CRC-32 of the leaf's bytes, checked on decode, so a damaged file is
an error and never a silently wrong array.

References:
  Han et al., "Deep Compression", 2016. https://arxiv.org/abs/1510.00149
  Mishra et al., "Accelerating Sparse Deep Neural Networks" (2:4), 2021.
  https://arxiv.org/abs/2104.08378
"""

from __future__ import annotations

import functools
import math
import zlib
from typing import Any

import jax.numpy as jnp
import numpy as np

__all__ = [
    "PackError",
    "support",
    "pack_leaf",
    "unpack_leaf",
    "packed_nbytes",
    "packed_plan",
    "crc32",
]

_NM_GROUPS = (2, 4, 8, 16)
_PREFERENCE = ("dense", "slices", "nm", "bitmask")


class PackError(ValueError):
    """A packed leaf does not decode to what was written (corrupt or truncated data)."""


def crc32(x: np.ndarray) -> int:
    """Returns the CRC-32 of ``x``'s raw bytes (C order), as an unsigned int.

    Args:
      x: a NumPy array of any shape and dtype (a non-contiguous one is copied to C
        order first).

    Examples:
      >>> import zlib, numpy as np
      >>> crc32(np.arange(4, dtype=np.uint8)) == zlib.crc32(bytes([0, 1, 2, 3]))
      True
      >>> a = np.arange(6, dtype=np.int32).reshape(2, 3)
      >>> crc32(a.T) == crc32(a.T.copy()), crc32(a.T) == crc32(a)  # C order, not memory order
      (True, False)
    """
    return zlib.crc32(np.ascontiguousarray(x).reshape(-1).view(np.uint8)) & 0xFFFFFFFF


def _nonzero_bits(x: np.ndarray) -> np.ndarray:
    if x.dtype == np.bool_:
        return x.copy()
    if x.dtype.itemsize not in (1, 2, 4, 8):  # complex128, longdouble: any nonzero byte
        raw = np.ascontiguousarray(x).view(np.uint8)
        return raw.reshape(x.shape + (x.dtype.itemsize,)).any(-1)
    return np.ascontiguousarray(x).view(f"u{x.dtype.itemsize}") != 0


def support(x: np.ndarray, mask: Any = None) -> np.ndarray:
    """Returns the bool support of ``x``: ``mask`` (broadcast) or any entry with nonzero bits.

    Args:
      x: an array (converted with ``np.asarray``).
      mask: the entries kept, a scalar or an array of ``x``'s shape (another shape
        raises ``ValueError``), bool or 0/1 (other values raise ``ValueError``);
        default ``None``: the support is the entries whose bits are nonzero.

    Examples:
      >>> import numpy as np
      >>> x = np.array([0.0, -0.0, 2.0, 0.0], np.float32)
      >>> support(x).tolist()  # -0.0 has a nonzero bit pattern: it is kept
      [False, True, True, False]
      >>> support(x, mask=np.array([True, False, False, False])).tolist()
      [True, True, True, False]
    """
    x = np.asarray(x)
    bits = _nonzero_bits(x)
    if mask is None:
        return bits
    raw = np.asarray(mask)
    if raw.dtype != bool and not np.isin(raw, (0, 1)).all():
        raise ValueError(
            f"mask must be bool (or 0/1), got {raw.dtype} values such as "
            f"{raw[~np.isin(raw, (0, 1))].ravel()[:3].tolist()}. Fix: pass a bool mask, e.g. "
            "scores > threshold, not the scores themselves."
        )
    mask = raw.astype(bool)
    if mask.ndim and mask.shape != x.shape:
        raise ValueError(
            f"mask must be a scalar or have the leaf's shape {x.shape}, got shape {mask.shape}. "
            "Fix: pass the leaf's own mask (e.g. jp.get_masks(opt_state)[...] for it)."
        )
    return np.broadcast_to(mask, x.shape) | bits


def _pack_uint(v: np.ndarray, bits: int) -> np.ndarray:
    """Packs small unsigned ints (each ``< 2**bits``) into ``bits`` bits apiece, LSB first."""
    v = v.astype(np.uint8).reshape(-1)
    if 8 % bits == 0:  # the common case (m = 2, 4, 16): whole values per byte, no bit arrays
        per = 8 // bits
        v = np.concatenate([v, np.zeros(-len(v) % per, np.uint8)]).reshape(-1, per)
        out = np.zeros(len(v), np.uint8)
        for j in range(per):
            out |= v[:, j] << np.uint8(j * bits)
        return out
    b = np.unpackbits(v.reshape(-1, 1), axis=1, count=bits, bitorder="little")
    return np.packbits(b.reshape(-1), bitorder="little")


def _unpack_uint(buf: np.ndarray, bits: int, count: int) -> np.ndarray:
    if 8 % bits == 0:
        per = 8 // bits
        shifts = (np.arange(per, dtype=np.uint8) * bits)[None, :]
        out = (buf.reshape(-1, 1) >> shifts) & np.uint8((1 << bits) - 1)
        return out.reshape(-1)[:count]
    b = np.unpackbits(buf, count=count * bits, bitorder="little").reshape(count, bits)
    return np.packbits(b, axis=1, bitorder="little").reshape(count)


@functools.lru_cache(maxsize=16)
def _positions(m: int, n: int) -> np.ndarray:
    """Returns, for every pattern of ``m`` bits, the first ``n`` kept positions (ascending)
    followed by unkept ones as padding: padding picks up +0.0 entries, so scattering
    them back is exact."""
    table = np.arange(1 << m)[:, None] >> np.arange(m)[None, :] & 1
    return np.argsort(1 - table, axis=1, kind="stable")[:, :n].astype(np.uint8)


def _grouped_shape(shape: tuple[int, ...], axis: int, m: int) -> tuple[int, int, int, int]:
    """Returns ``(pre, groups, m, post)``: ``shape`` with ``axis`` split into groups of ``m``.

    Grouping in place, without moving ``axis`` last, avoids a transposing copy."""
    return (math.prod(shape[:axis]), shape[axis] // m, m, math.prod(shape[axis + 1 :]))


def _nm_candidates(sup: np.ndarray) -> list[tuple[int, int, int]]:
    """Returns every ``(axis, n, m)`` with at most ``n < m`` of ``sup`` in each group of ``m``."""
    found = []
    for axis in range(sup.ndim):
        length = sup.shape[axis]
        pre, _, _, post = _grouped_shape(sup.shape, axis, 1)
        counts = sup.reshape(pre, length, post).view(np.uint8)
        for m in _NM_GROUPS:
            if length % m:
                break
            # Counts per group of m are sums of adjacent counts per group of m/2.
            counts = counts[:, 0::2] + counts[:, 1::2]
            n = int(counts.max(initial=0))
            if n < m:
                found.append((axis, max(n, 1), m))
    return found


def _nm_nbytes(size: int, itemsize: int, n: int, m: int) -> int:
    count = size // m * n
    return count * itemsize + math.ceil(count * math.ceil(math.log2(m)) / 8)


def _keeps(sup: np.ndarray) -> list[np.ndarray]:
    """Returns, per axis, which indices hold any supported entry."""
    axes = range(sup.ndim)
    return [np.any(sup, axis=tuple(a for a in axes if a != ax)) for ax in axes]


def _plan(x: np.ndarray, sup: np.ndarray) -> tuple[str, dict[str, Any], int]:
    """Returns ``(kind, params, nbytes)`` of the smallest encoding of ``x``."""
    size, item = x.size, x.dtype.itemsize
    costs: dict[str, tuple[dict[str, Any], int]] = {"dense": ({}, size * item)}
    if x.ndim >= 1 and size:
        keeps = _keeps(sup)
        kept = math.prod(int(k.sum()) for k in keeps)
        costs["slices"] = ({}, kept * item + sum(math.ceil(d / 8) for d in x.shape))
        nm = [(_nm_nbytes(size, item, n, m), a, n, m) for a, n, m in _nm_candidates(sup)]
        if nm:
            nbytes, axis, n, m = min(nm)
            costs["nm"] = ({"axis": axis, "n": n, "m": m}, nbytes)
        costs["bitmask"] = ({}, math.ceil(size / 8) + int(sup.sum()) * item)
    best = min(costs, key=lambda k: (costs[k][1], _PREFERENCE.index(k)))
    return best, costs[best][0], costs[best][1]


def pack_leaf(x: Any, mask: Any = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Returns ``(arrays, spec)``: the packed arrays of ``x`` and a JSON-able description.

    ``unpack_leaf(arrays, spec)`` gives ``x`` back bit for bit. ``mask`` (bool,
    a scalar or of ``x``'s shape) says which entries are kept; entries outside it must
    be zero to be dropped, any other entry is kept whatever the mask says.

    Args:
      x: the leaf, an array (converted with ``np.asarray``) of any shape and dtype.
      mask: the kept entries, a scalar or an array of ``x``'s shape (another shape
        raises ``ValueError``), bool or 0/1; default ``None``: the entries whose bits
        are nonzero (a ``-0.0`` is kept).

    Examples:
      >>> import numpy as np
      >>> x = np.zeros((8, 16), np.float32); x[::4] = 1.0
      >>> arrays, spec = pack_leaf(x)
      >>> spec["kind"], sorted(arrays)
      ('slices', ['keep_0', 'keep_1', 'values'])
      >>> bool((unpack_leaf(arrays, spec) == x).all())
      True
    """
    x = np.asarray(x)
    if x.dtype.byteorder not in "=|":  # big-endian: the spec's dtype name restores native
        x = x.astype(x.dtype.newbyteorder("="))
    sup = support(x, mask)
    kind, params, _ = _plan(x, sup)
    spec: dict[str, Any] = {
        "kind": kind,
        "shape": list(x.shape),
        "dtype": x.dtype.name,
        "crc32": crc32(x),
        **params,
    }
    if kind == "dense":
        arrays = {"values": x}
    elif kind == "bitmask":
        arrays = {"bits": np.packbits(sup.reshape(-1)), "values": x[sup]}
    elif kind == "slices":
        keeps = _keeps(sup)
        arrays = {f"keep_{ax}": np.packbits(k) for ax, k in enumerate(keeps)}
        index = [np.flatnonzero(k) for k in keeps]
        arrays["values"] = x[np.ix_(*index)]
    else:
        axis, n, m = params["axis"], params["n"], params["m"]
        grouped = _grouped_shape(x.shape, axis, m)
        codes = np.packbits(sup.reshape(grouped), axis=2, bitorder="little").astype(np.uint16)
        code = codes[:, :, 0] if m <= 8 else codes[:, :, 0] | (codes[:, :, 1] << 8)
        pos = np.moveaxis(_positions(m, n)[code], -1, 2)  # (pre, groups, n, post)
        vals = np.take_along_axis(x.reshape(grouped), pos, axis=2)
        spec["bits"] = max(1, math.ceil(math.log2(m)))
        arrays = {"values": vals.reshape(-1, n), "index": _pack_uint(pos, spec["bits"])}
    return arrays, spec


def _expect(arrays: dict, name: str, shape: tuple[int, ...], spec: dict) -> np.ndarray:
    a = arrays.get(name)
    if a is None or tuple(np.shape(a)) != tuple(shape):
        got = None if a is None else tuple(np.shape(a))
        raise PackError(
            f"packed array {name!r} of a {spec['kind']} leaf has shape {got}, expected "
            f"{tuple(shape)}: the file is truncated or corrupt."
        )
    return np.asarray(a)


def unpack_leaf(arrays: dict[str, np.ndarray], spec: dict[str, Any]) -> np.ndarray:
    """Returns the dense array that :func:`pack_leaf` packed, after checking its CRC-32.

    Args:
      arrays: the ``arrays`` dict :func:`pack_leaf` returned (e.g. as read back from a
        file), by name (``"values"``, ``"bits"``, ``"keep_<axis>"``, ``"index"``).
      spec: the ``spec`` dict :func:`pack_leaf` returned: ``kind``, ``shape``,
        ``dtype``, ``crc32`` and the encoding's own fields.

    Raises:
      PackError: the arrays do not match ``spec``, ``spec`` itself is malformed
        (a missing field, an unknown dtype), or the CRC-32 differs.

    Examples:
      >>> import numpy as np
      >>> x = np.array([[1.0, 0.0, 0.0, 2.0, 0.0, 3.0, 4.0, 0.0]], np.float32)
      >>> arrays, spec = pack_leaf(x)
      >>> spec["kind"], bool((unpack_leaf(arrays, spec) == x).all())
      ('nm', True)
      >>> arrays["values"][0] += 1.0  # a damaged file
      >>> unpack_leaf(arrays, spec)
      Traceback (most recent call last):
        ...
      jaxprune.packing.PackError: CRC-32 mismatch in a nm leaf of shape (1, 8): ...
    """
    try:
        shape = tuple(int(d) for d in spec["shape"])
        dtype = jnp.dtype(spec["dtype"])
        kind = spec["kind"]
        size = math.prod(shape)
        expected_crc = int(spec["crc32"])
    except (KeyError, TypeError, ValueError) as e:
        raise PackError(
            f"malformed leaf spec ({type(e).__name__}: {e}): the file is corrupt."
        ) from e
    try:
        if kind == "dense":
            out = _expect(arrays, "values", shape, spec).astype(dtype, copy=False)
        elif kind == "bitmask":
            bits = _expect(arrays, "bits", (math.ceil(size / 8),), spec)
            sup = np.unpackbits(bits, count=size).astype(bool)
            vals = _expect(arrays, "values", (int(sup.sum()),), spec)
            out = np.zeros(size, dtype)
            out[sup] = vals
            out = out.reshape(shape)
        elif kind == "slices":
            index = []
            for ax, d in enumerate(shape):
                keep = _expect(arrays, f"keep_{ax}", (math.ceil(d / 8),), spec)
                index.append(np.flatnonzero(np.unpackbits(keep, count=d)))
            vals = _expect(arrays, "values", tuple(len(i) for i in index), spec)
            out = np.zeros(shape, dtype)
            out[np.ix_(*index)] = vals
        elif kind == "nm":
            axis, n, m, bits = spec["axis"], spec["n"], spec["m"], spec["bits"]
            pre, groups, _, post = grouped = _grouped_shape(shape, axis, m)
            g = size // m
            vals = _expect(arrays, "values", (g, n), spec)
            index = _expect(arrays, "index", (math.ceil(g * n * bits / 8),), spec)
            pos = _unpack_uint(index, bits, g * n).reshape(pre, groups, n, post)
            out = np.zeros(grouped, dtype)
            np.put_along_axis(out, pos, vals.reshape(pre, groups, n, post), axis=2)
            out = out.reshape(shape)
        else:
            raise PackError(f"unknown leaf encoding {kind!r}: the file is corrupt or newer.")
    except (IndexError, ValueError, TypeError, KeyError) as e:
        if isinstance(e, PackError):
            raise
        raise PackError(f"cannot decode a {kind} leaf ({e}): the file is corrupt.") from e
    out = np.require(out, requirements="C")  # ascontiguousarray would make 0-d arrays 1-d
    if crc32(out) != expected_crc:
        raise PackError(
            f"CRC-32 mismatch in a {kind} leaf of shape {shape}: the file is corrupt or was "
            "modified after it was written."
        )
    return out


def packed_nbytes(x: Any, mask: Any = None) -> int:
    """Returns the bytes of ``x``'s smallest encoding (arrays only, without the spec).

    Args:
      x, mask: the leaf and its mask, as for :func:`pack_leaf` (``mask`` defaults to
        ``None``: the entries whose bits are nonzero are kept).

    Examples:
      >>> import numpy as np
      >>> x = np.zeros((8, 16), np.float32); x[::4] = 1.0  # 2 of 8 rows kept
      >>> packed_nbytes(x), x.nbytes  # 2 * 16 float32 values, a keep-bit per row and column
      (131, 512)
      >>> packed_nbytes(x, mask=np.ones((8, 16), bool))  # every entry kept: dense
      512
    """
    return packed_plan(x, mask)[1]


def packed_plan(x: Any, mask: Any = None) -> tuple[str, int]:
    """Returns ``(encoding, bytes)`` of what :func:`pack_leaf` writes for ``x`` with ``mask``.

    Args:
      x: the leaf, an array of any shape and dtype.
      mask: the kept entries, a scalar or an array of ``x``'s shape, as for
        :func:`pack_leaf`; default ``None``: the entries whose bits are nonzero.

    Examples:
      >>> import numpy as np
      >>> x = np.zeros((8, 16), np.float32); x[::4] = 1.0
      >>> packed_plan(x), packed_plan(x, mask=np.ones((8, 16), bool))
      (('slices', 131), ('dense', 512))
    """
    x = np.asarray(x)
    kind, _, nbytes = _plan(x, support(x, mask))
    return kind, nbytes
