"""Sortable integer keys of float scores: the order the exact search counts in.

:func:`ordered_keys` maps float32 scores to uint32 keys whose unsigned order
is the scores' order (NaNs above +inf, ``-0.0`` just below ``+0.0``). Scores
that are all bfloat16, or all float16, get the same transform on their 16
bits instead (:func:`_keys_as`): the same order and ties in a range 65,536
times narrower. :mod:`jaxprune._search` searches these keys.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

__all__ = ["ordered_keys"]


def ordered_keys(scores: ArrayLike) -> jax.Array:
    """Returns uint32 keys whose unsigned order is the float32 order of ``scores``.

    Same shape as ``scores`` (never flattened, so a sharded leaf stays sharded
    and every count below is a plain reduction). ``-0.0`` sorts just below
    ``+0.0`` (the keys are the float bits, so the two do not tie: a selection
    prunes every ``-0.0`` before any ``+0.0``, whatever their flatten order;
    canonicalising would add an operation to every read of the keys in the
    train step); every NaN, whatever its sign bit (arithmetic NaNs such as
    ``inf - inf`` have it set), sorts above ``+inf``, as in ``jnp.sort``: a
    NaN score is the highest, so it is kept. Scores are compared as float32:
    float64 scores (with ``jax_enable_x64``) that round to the same float32
    tie, and their ties go by flatten order.

    Args:
      scores: an array (or array-like) of any shape and real dtype, converted to
        float32 (float64 scores warn once that they are compared as float32).

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> k = jp.masks.ordered_keys(jnp.array([-1.0, 0.0, 2.0, -0.5, jnp.nan]))
      >>> k.dtype.name, jnp.argsort(k).tolist()  # NaN last, as in jnp.sort
      ('uint32', [0, 3, 1, 2, 4])
      >>> z = jp.masks.ordered_keys(jnp.array([0.0, -0.0]))
      >>> bool(z[1] < z[0])  # -0.0 ranks below +0.0: no tie
      True
    """
    _warn_float64(scores)
    return _ordered_keys(scores)


def _warn_float64(scores: ArrayLike) -> None:
    """Warns that float64 scores are compared as float32 (:func:`ordered_keys`)."""
    if jnp.result_type(scores) == jnp.float64:
        # One location (stacklevel 1): Python's default filter shows it once per process.
        warnings.warn(
            "float64 scores are compared as float32: scores closer than float32's precision "
            "(or past its range) tie, and ties are broken by flatten order, not by the float64 "
            "value. Fix: bring them into float32's precision first: x - x.min() for values "
            "that differ in late digits, x / x.max() for values past float32's range.",
            stacklevel=1,
        )


def _ordered_keys(scores: ArrayLike) -> jax.Array:
    """:func:`ordered_keys` without its float64 warning (callers warn outside a trace)."""
    bits = jax.lax.bitcast_convert_type(jnp.asarray(scores, jnp.float32), jnp.uint32)
    return _sortable(bits, 0x7F800000)


def _sortable(bits: jax.Array, inf: int) -> jax.Array:
    """Returns the unsigned keys of the float bit patterns ``bits`` (uint32 or uint16).

    ``inf``: the bits of +inf in that width; a larger magnitude is a NaN.
    """
    width = 8 * bits.dtype.itemsize
    sign = jnp.asarray(1 << (width - 1), bits.dtype)
    # NaNs lose their sign bit, so that all of them sort above +inf.
    magnitude = bits & jnp.asarray((1 << (width - 1)) - 1, bits.dtype)
    bits = jnp.where(magnitude > jnp.asarray(inf, bits.dtype), magnitude, bits)
    # Positive floats: set the sign bit; negative floats: flip every bit.
    return jnp.where(bits >= sign, ~bits, bits | sign)


# The bits of +inf of each 16-bit float dtype: a larger magnitude is a NaN.
_HALF_INF = {jnp.dtype(jnp.bfloat16): 0x7F80, jnp.dtype(jnp.float16): 0x7C00}


def _half_of(dtypes: Any) -> Any:
    """Returns the 16-bit float dtype (bfloat16 or float16) all of ``dtypes`` share, else None.

    Scores searched together (one pool) take 16-bit keys only when every one of
    them has the same 16-bit dtype: a pool mixing dtypes needs one key space,
    float32's.
    """
    found = {jnp.dtype(d) for d in dtypes}
    if len(found) == 1:
        (dtype,) = found
        if dtype in _HALF_INF:
            return dtype
    return None


def _keys_as(x: jax.Array, half: Any, *, warn: bool = True) -> jax.Array:
    """Returns uint32 keys of ``x`` in :func:`ordered_keys`' order, 16-bit ones when ``half``.

    ``half`` (``x``'s dtype, bfloat16 or float16, as :func:`_half_of` gives
    it): the order-preserving image of the 16-bit patterns, the same
    transform as :func:`ordered_keys` on 16 bits, widened to uint32. Every
    16-bit float is exactly a float32, so both keys rank the scores in the
    same order with the same ties, and a selection gives the same masks; but
    the 16-bit keys are 65,536 consecutive values at most instead of 2**32
    mostly unused ones, so a search narrows a bracket around a tied k-th key
    (which 16-bit scores nearly always have) in far fewer probes.
    ``half=None``: :func:`ordered_keys` (float32 keys; float64 scores warn
    unless ``warn=False``).
    """
    if half is None:
        return ordered_keys(x) if warn else _ordered_keys(x)
    if jnp.dtype(x.dtype) != half:
        raise TypeError(f"16-bit keys of {half} scores got a {x.dtype} array")
    bits = jax.lax.bitcast_convert_type(x, jnp.uint16)
    return _sortable(bits, _HALF_INF[half]).astype(jnp.uint32)


def _score_keys(scores: list[jax.Array], *, warn: bool = True) -> list[jax.Array]:
    """Returns the keys of ``scores`` searched as one pool: 16-bit when they share a 16-bit
    float dtype (:func:`_keys_as`), float32's otherwise; the same masks either way."""
    half = _half_of(x.dtype for x in scores)
    return [_keys_as(x, half, warn=warn) for x in scores]
