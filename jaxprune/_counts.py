"""Sparsity arguments -> exact prune counts, for every selection in :mod:`jaxprune.masks`.

A sparsity is checked where it is given (one number in [0, 1], or a tree of
them, one per leaf), spread to one value per leaf, and turned into the number
of entries to prune, ``round(s * n)``: Python's rounding for a concrete ``s``,
the exact product for a traced float32 ``s`` (see :mod:`jaxprune.masks`).
A per-leaf cap (``max_sparsity``) is checked and floored the same way.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp

from jaxprune._tree import check_same_structure, leaves_with_paths, path_str


def _check_sparsity(s: Any, name: str = "sparsity", *, tree_ok: bool = True) -> None:
    """Raises unless ``s`` is one number in [0, 1] (a traced scalar passes unchecked).

    ``tree_ok``: the caller also takes a tree of them (one per leaf), which
    the messages then mention; a global selection does not.
    """
    if isinstance(s, jax.core.Tracer):
        if jnp.ndim(s):  # its value is unknown here, its shape is not
            hint = (
                "a tree of scalars gives one per leaf; a stack's layers share their leaf's value"
                if tree_ok
                else "a global selection takes one number; per-layer values: per_layer(topk) "
                "or jp.distributions.selection(...)"
            )
            raise ValueError(
                f"{name} must be one number in [0, 1], got a traced array of shape "
                f"{tuple(jnp.shape(s))}. Fix: pass a scalar ({hint})."
            )
        return
    if isinstance(s, (bool, str, bytes)) or getattr(s, "dtype", None) in (bool, jnp.bool_):
        # float(True) == 1.0 and float("0.5") == 0.5 would pass silently.
        raise ValueError(
            f"{name} must be a number in [0, 1], got {s!r}. Fix: pass e.g. 0.9 to prune 90% "
            "of the weights."
        )
    try:
        v = float(s)
    except (TypeError, ValueError):
        raise ValueError(
            f"{name} must be a number in [0, 1]{' (or a tree of them)' if tree_ok else ''}, got "
            f"{s!r}."
            + (
                ""
                if tree_ok
                else " Fix: per-layer values: per_layer(topk) or jp.distributions.selection(...)."
            )
        ) from None
    if not (0.0 <= v <= 1.0) or math.isnan(v):
        raise ValueError(
            f"{name} must be in [0, 1] (the fraction of entries to prune), got {v}. "
            "Fix: pass e.g. 0.9 to prune 90% of the weights, not 90."
        )


# The searches count entries, and index them in flatten order, in int32.
MAX_ENTRIES = 2**31 - 1


def _check_global_total(n: int) -> None:
    """Raises unless a global selection's ``n`` prunable entries (in total) fit its int32 counts.

    Each leaf may be smaller than the limit while the total is not (a 3B
    model of 1B-entry kernels): the message names the total, not a leaf.
    """
    if n > MAX_ENTRIES:
        raise ValueError(
            f"a global selection counts in int32: at most 2**31 - 1 = {MAX_ENTRIES:,} prunable "
            f"entries in total, got {n:,}. Fix: per-layer selection (jp.prune(scope='layer'), "
            "jp.masks.topk or per_layer), or global_topk over groups of leaves each under the "
            "limit (e.g. one call per block, each with where= choosing that block's leaves)."
        )


def _count(s: Any, n: int) -> jax.Array:
    """Returns round(s * n) as int32: Python's, for concrete s; exact, for traced float32 s.

    A traced ``s`` outside ``[0, 1]`` is clipped to it, and a traced NaN
    prunes nothing (a concrete one is refused by :func:`_check_sparsity`).
    ``n`` (one leaf's entries, or a global total checked first by
    :func:`_check_global_total`) must be at most ``2**31 - 1``.
    """
    if n > MAX_ENTRIES:
        raise ValueError(
            f"a selection counts in int32: at most 2**31 - 1 = {MAX_ENTRIES:,} entries in "
            f"one count, got {n:,}. Fix: select over fewer entries at once, e.g. split a leaf "
            "this big along its leading axis into stacked layers (jp.masks.per_layer)."
        )
    if not isinstance(s, jax.core.Tracer):
        return jnp.int32(round(float(s) * n))
    s = jnp.asarray(s, jnp.float32)
    return _round_product(jnp.clip(jnp.where(jnp.isnan(s), 0.0, s), 0.0, 1.0), n)


def _round_product(s: jax.Array, n: int | jax.Array) -> jax.Array:
    """Returns ``round(s * n)`` (ties to even) for float32 ``s`` in [0, 1] and ``n < 2**31``.

    Exact: ``s * n`` in float32 has only 24 significant bits, so from about a
    million entries it would miss the count by one. ``s = m / 2**shift`` with
    an integer mantissa ``m < 2**24``, so ``m * n`` is formed exactly in 16-bit
    limbs of uint32 and shifted right with round-half-even. ``n`` is a Python
    int (a leaf's size), or a uint32 array of them (the tests check many
    pairs in one program), elementwise with ``s``.
    """
    if isinstance(n, int) and not 0 <= n < 2**31:
        raise ValueError(f"n must be in [0, 2**31) (entries of int32-indexed leaves), got {n}.")
    u32 = jnp.uint32
    bits = jax.lax.bitcast_convert_type(s, u32)
    e = (bits >> 23) & u32(0xFF)
    m = (bits & u32(0x7FFFFF)) | jnp.where(e > 0, u32(1 << 23), u32(0))
    shift = (u32(150) - jnp.maximum(e, u32(1))).astype(jnp.int32)  # s = m / 2**shift, >= 23
    m0, m1 = m & u32(0xFFFF), m >> 16
    n = jnp.asarray(n, u32)
    n0, n1 = n & u32(0xFFFF), n >> u32(16)
    low = m0 * n0
    mid = m1 * n0 + m0 * n1 + (low >> 16)  # < 2**32
    hi = m1 * n1 + (mid >> 16)  # m * n = hi * 2**32 + lo
    lo = ((mid & u32(0xFFFF)) << 16) | (low & u32(0xFFFF))

    def shr(x, k):  # x >> k for any k >= 0 (0 from 32 on)
        return jnp.where(k >= 32, u32(0), x >> jnp.clip(k, 0, 31).astype(u32))

    def low_bits(x, k):  # x mod 2**k for any k >= 0
        keep = jnp.where(k >= 32, u32(0xFFFFFFFF), (u32(1) << jnp.clip(k, 0, 31).astype(u32)) - 1)
        return x & keep

    # floor(m * n / 2**shift): shift >= 23 and the result is <= n < 2**31.
    q = jnp.where(
        shift >= 32,
        shr(hi, shift - 32),
        shr(lo, shift) | (hi << (u32(32) - jnp.clip(shift, 1, 32).astype(u32))),
    )
    h = shift - 1  # the bit worth one half
    half = jnp.where(h >= 32, shr(hi, h - 32), shr(lo, h)) & u32(1)
    below = jnp.where(h >= 32, (lo != 0) | (low_bits(hi, h - 32) != 0), low_bits(lo, h) != 0)
    up = (half == 1) & (below | ((q & u32(1)) == 1))
    return (q + up.astype(u32)).astype(jnp.int32)


def _per_leaf_sparsity(scores: Any, sparsity: Any, flags: list[bool]) -> list[Any]:
    """Broadcasts a scalar sparsity, or reads a tree of them, to one value per leaf."""
    flat, _ = leaves_with_paths(scores)
    if isinstance(sparsity, (int, float, str, bytes)) or (
        hasattr(sparsity, "dtype") and jnp.ndim(sparsity) == 0
    ):
        _check_sparsity(sparsity)
        return [sparsity] * len(flat)
    if hasattr(sparsity, "dtype"):
        raise ValueError(
            f"sparsity must be one number in [0, 1] or a tree of them (one per leaf of the "
            f"scores), got an array of shape {tuple(jnp.shape(sparsity))}. Fix: pass a float, "
            "or a tree with the scores' structure, e.g. jax.tree.map(lambda _: 0.5, scores)."
        )
    # Matched by path, not by position: a tree with other names (a typo) or
    # another order is an error, and containers may differ (dict vs nnx.State).
    by_path = dict(leaves_with_paths(sparsity)[0])
    if set(by_path) != {p for p, _ in flat} or len(by_path) != len(flat):
        check_same_structure(
            scores,
            sparsity,
            ref_name="scores",
            other_name="sparsity",
            fix="pass one float, or a tree with one float per leaf of the scores under the "
            "same names, e.g. jax.tree.map(lambda _: 0.5, scores)",
        )
    out = []
    for (p, _), f in zip(flat, flags, strict=True):
        s = by_path[p]
        if f:
            _check_sparsity(s, f"sparsity[{path_str(p)!r}]")
        out.append(s)
    return out


def _check_max_sparsity(value: Any, name: str, unit: str, things: str) -> None:
    """Raises unless ``value`` is ``None`` or a Python number in [0, 1]."""
    if value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not 0.0 <= value <= 1.0:
        raise ValueError(
            f"{name} must be a Python number in [0, 1] (the largest fraction of one {unit}'s "
            f"{things} to prune) or None, got {value!r}. Fix: e.g. {name}=0.9 so that every "
            f"{unit} keeps at least 10% of its {things}."
        )


def _cap(max_sparsity: float, n: int) -> int:
    """Returns ``floor(max_sparsity * n)``, robust to ``0.29 * 100 = 28.999...``."""
    return min(n, math.floor(round(max_sparsity * n, 9)))


def _concretely_positive(sparsity: Any) -> bool:
    """Whether some concrete value of ``sparsity`` (a number or a tree) is above 0."""
    for v in jax.tree.leaves(sparsity):
        if isinstance(v, jax.core.Tracer):
            continue
        try:
            if float(v) > 0:
                return True
        except (TypeError, ValueError):
            continue
    return False


def warn_nothing_selected(
    fn: str, scores: Any, flags: list[bool], sparsity: Any = 1.0, stacklevel: int = 4
) -> None:
    """Warns when ``where`` selects no leaf of a non-empty ``scores`` though a concrete
    ``sparsity`` asks to prune: the selection would return all-``True`` masks."""
    if any(flags) or not _concretely_positive(sparsity):
        return
    flat = leaves_with_paths(scores)[0]
    if not flat:
        return
    leaves = [f"{path_str(p)!r} {jnp.result_type(x)}{list(jnp.shape(x))}" for p, x in flat[:5]] + (
        ["..."] if len(flat) > 5 else []
    )
    warnings.warn(
        f"{fn}: `where` selects none of the scores' leaves ({', '.join(leaves)}), so nothing "
        "is pruned. By default only floating leaves with ndim >= 2 are selected. Fix: cast "
        "integer or bool scores to float (x.astype(jnp.float32)), or pass where= choosing the "
        "leaves to prune (a misspelt name matches nothing).",
        stacklevel=stacklevel,
    )
