"""Redundancy merging (NoiseOut): remove a unit whose activation another unit predicts.

For hidden activations ``h`` (post-nonlinearity) feeding ``y = h @ W + b``: if
``h_j ~ a * h_i + c`` then removing unit ``j`` and setting
``W_i <- W_i + a * W_j``, ``b <- b + c * W_j`` leaves ``y`` unchanged up to the
fit's residual (exactly, when ``h_j`` is an affine function of ``h_i``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxprune._tree import as_int

__all__ = ["MergeResult", "most_correlated_pair", "merge_pair", "noiseout"]


class MergeResult(NamedTuple):
    """Outgoing weights after merging, and which units survive.

    Args:
      w_out: the next layer's kernel ``[units, out]`` after the merges, the
        removed units' rows zeroed.
      b_out: the next layer's bias ``[out]`` after the merges.
      alive: bool ``[units]``, ``False`` for the removed units; zero the
        incoming kernel's columns (and bias entries) where it is ``False``.
      pairs: int32 ``[num_merges, 2]``: ``(kept i, removed j)`` per merge, in
        merge order (``(-1, -1)`` for a merge skipped under ``jax.jit``).
    """

    w_out: jax.Array  # [units, out], removed rows zeroed
    b_out: jax.Array  # [out]
    alive: jax.Array  # bool [units]; zero the incoming kernel's columns where False
    pairs: jax.Array  # int32 [num_merges, 2]: (kept i, removed j) in merge order


def _check_shapes(h: ArrayLike, w_out: ArrayLike, b_out: ArrayLike) -> None:
    """Raises ``ValueError`` unless ``h [N, units]``, ``w_out [units, out]``, ``b_out [out]`` agree.

    Without it a mismatch is silent: ``w_out[j]`` indexing clamps out-of-range
    rows and extra rows of ``w_out`` are never merged.
    """
    if b_out is None or w_out is None:
        name = "b_out" if b_out is None else "w_out"
        raise ValueError(
            f"{name} must be an array, got None. Fix: pass the next layer's "
            + (
                "bias (jnp.zeros(out) when it has none)."
                if name == "b_out"
                else "[units, out] kernel."
            )
        )
    h_shape, w_shape, b_shape = jnp.shape(h), jnp.shape(w_out), jnp.shape(b_out)
    _check_activations(h_shape)
    if len(w_shape) != 2 or w_shape[0] != h_shape[1]:
        got = f"w_out.shape[0]={w_shape[0]}" if len(w_shape) == 2 else f"w_out.shape={w_shape}"
        raise ValueError(
            f"h.shape[1]={h_shape[1]} (units) must equal w_out.shape[0] (the next layer's "
            f"inputs), but {got} (h {h_shape}, w_out {w_shape}). Fix: pass the activations "
            "of the layer that feeds w_out, and w_out as the next layer's [units, out] kernel "
            "(transpose a PyTorch-style [out, units] weight)."
        )
    if b_shape != (w_shape[1],):
        raise ValueError(
            f"b_out must have shape (w_out.shape[1],) = ({w_shape[1]},), got {b_shape}. Fix: "
            f"pass the next layer's bias (jnp.zeros({w_shape[1]}) when it has none)."
        )


def _check_activations(h_shape: tuple[int, ...]) -> None:
    """Raises ``ValueError`` unless ``h_shape`` is ``[N, units]``."""
    if len(h_shape) != 2:
        raise ValueError(
            f"h must be [N, units] activations (one row per calibration example), got shape "
            f"{h_shape}. Fix: reshape to (-1, units), e.g. h.reshape(-1, h.shape[-1]) for "
            "per-token or per-pixel activations."
        )
    if h_shape[0] < 1 or h_shape[1] < 2:
        raise ValueError(
            f"h must hold at least one example of at least 2 units to pair, got shape {h_shape}. "
            "Fix: pass the [N, units] activations of a layer with two or more units."
        )


def _varies(h: jax.Array) -> jax.Array:
    """Returns which units (columns of ``h``) are not exactly constant.

    Exact, not a threshold on the centered norm: a constant that float32 cannot
    represent (0.1) leaves a centered norm of rounding errors, ~1e-7, and two
    such units would look perfectly correlated.
    """
    return jnp.max(h, axis=0) > jnp.min(h, axis=0)


def most_correlated_pair(
    h: ArrayLike, alive: ArrayLike | None = None
) -> tuple[jax.Array, jax.Array]:
    """Returns ``(i, j)``, ``i < j``: the two alive units of largest activation |correlation|.

    Constant (e.g. dead ReLU) units have no defined correlation and are never
    chosen. When fewer than two alive, non-constant units remain there is no
    pair and ``(-1, -1)`` is returned (a sentinel rather than an error, so the
    function stays usable under ``jax.jit``); a unit is never paired with itself.

    Args:
      h: activations ``[N, units]``, one row per calibration example (at least
        one example and two units); compared in float32.
      alive: bool ``[units]``, the units that may be paired; default ``None``,
        all of them.

    Raises:
      ValueError: ``h`` is not ``[N, units]``, or ``alive`` not ``[units]``.

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> h = jnp.array([[1., 0., 2.], [2., 1., 4.], [3., 0., 6.]])
      >>> [int(v) for v in jp.merge.most_correlated_pair(h)]
      [0, 2]
      >>> [int(v) for v in jp.merge.most_correlated_pair(h, jnp.array([True, True, False]))]
      [0, 1]
      >>> [int(v) for v in jp.merge.most_correlated_pair(h[:, :2], jnp.array([True, False]))]
      [-1, -1]
    """
    h = jnp.asarray(h, jnp.float32)
    _check_activations(h.shape)
    units = h.shape[1]
    alive = jnp.ones(units, bool) if alive is None else jnp.asarray(alive, bool)
    if alive.shape != (units,):
        raise ValueError(
            f"alive must have one entry per unit, shape ({units},) for h of shape {h.shape}, "
            f"got {alive.shape}. Fix: pass a bool vector over h's columns."
        )
    hc = h - h.mean(axis=0)
    std = jnp.sqrt(jnp.sum(hc**2, axis=0))
    ok = alive & _varies(h)
    # Full float32 on every backend (GPUs default to TF32): pairs are ranked by
    # correlations near 1, which 3 digits would not tell apart.
    gram = jnp.matmul(hc.T, hc, precision=jax.lax.Precision.HIGHEST)
    corr = gram / jnp.maximum(std[:, None] * std[None, :], 1e-30)
    valid = ok[:, None] & ok[None, :] & ~jnp.eye(units, dtype=bool)
    flat = jnp.argmax(jnp.where(valid, jnp.abs(corr), -1.0))
    i, j = flat // units, flat % units
    # argmax over all -1 would return (0, 0): merging a unit into itself kills it.
    found = jnp.any(valid)
    none = jnp.int32(-1)
    i_out = jnp.where(found, jnp.minimum(i, j).astype(jnp.int32), none)
    j_out = jnp.where(found, jnp.maximum(i, j).astype(jnp.int32), none)
    return i_out, j_out


def merge_pair(
    h: ArrayLike, w_out: ArrayLike, b_out: ArrayLike, i: ArrayLike, j: ArrayLike
) -> tuple[jax.Array, jax.Array]:
    """Returns ``(w_out, b_out)`` with unit ``j`` folded into unit ``i`` by least squares.

    ``(a, c) = argmin ||h_j - (a h_i + c)||^2``; then ``W_i += a W_j``,
    ``b += c W_j`` and row ``j`` of ``w_out`` is zeroed.

    Traced ``i`` and ``j`` that are equal or out of ``[0, units)`` leave
    ``w_out`` and ``b_out`` unchanged (concrete ones are refused).

    Args:
      h: activations of the hidden layer on a calibration batch, ``[N, units]``
        (after the nonlinearity: the values the next layer multiplies).
      w_out: the next layer's kernel ``[units, out]``.
      b_out: the next layer's bias ``[out]`` (``jnp.zeros(out)`` when it has
        none).
      i: the unit kept, which absorbs ``j``: an integer in ``[0, units)``.
      j: the unit removed (its row of ``w_out`` zeroed): an integer in
        ``[0, units)``, other than ``i``.

    Raises:
      ValueError: ``h [N, units]``, ``w_out [units, out]`` and ``b_out [out]``
        disagree in shape; concrete ``i`` or ``j`` not an integer in
        ``[0, units)``, or ``i == j`` (the ``(-1, -1)`` of
        :func:`most_correlated_pair` included: it found no pair).

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> h = jnp.array([[1., 3.], [2., 5.]])       # h_1 = 2 h_0 + 1
      >>> w, b = jnp.array([[1.], [1.]]), jnp.zeros(1)
      >>> w2, b2 = jp.merge.merge_pair(h, w, b, 0, 1)
      >>> w2.tolist(), b2.tolist()
      ([[3.0], [0.0]], [1.0])

    References:
      Babaeizadeh, Smaragdis & Campbell, "NoiseOut: A Simple Way to Prune
      Neural Networks", 2016. https://arxiv.org/abs/1611.06211
    """
    _check_shapes(h, w_out, b_out)
    units = jnp.shape(w_out)[0]
    _check_pair(i, j, units)
    h = jnp.asarray(h, jnp.float32)
    w_out, b_out = jnp.asarray(w_out), jnp.asarray(b_out)
    valid = (i >= 0) & (i < units) & (j >= 0) & (j < units) & (i != j)
    i, j = jnp.clip(i, 0, units - 1), jnp.clip(j, 0, units - 1)
    hi, hj = h[:, i], h[:, j]
    hi_c = hi - hi.mean()
    a = jnp.sum(hi_c * (hj - hj.mean())) / jnp.maximum(jnp.sum(hi_c**2), 1e-30)
    c = hj.mean() - a * hi.mean()
    # In float32, as a and c are (strict dtype promotion refuses float32 * bfloat16).
    wj = w_out[j].astype(jnp.float32)
    w_new = w_out.at[i].add((a * wj).astype(w_out.dtype)).at[j].set(0)
    b_new = b_out + (c * wj).astype(b_out.dtype)
    return jnp.where(valid, w_new, w_out), jnp.where(valid, b_new, b_out)


def _check_pair(i, j, units: int) -> None:
    """Refuses concrete unit indices that are not two different units of ``[0, units)``."""
    concrete = {}
    for name, v in (("i", i), ("j", j)):
        if isinstance(v, jax.core.Tracer):
            continue
        concrete[name] = as_int(v)
        if concrete[name] is None:
            raise ValueError(
                f"{name} must be one integer unit index, got {v!r}. Fix: pass e.g. the "
                "indices from jp.merge.most_correlated_pair."
            )
    if concrete.get("i") == concrete.get("j") == -1:
        raise ValueError(
            "i=-1, j=-1: most_correlated_pair found no pair of alive units with "
            "non-constant activations. Fix: stop merging (check i >= 0 first)."
        )
    for name, v in concrete.items():
        if not 0 <= v < units:
            raise ValueError(
                f"{name}={v} is not a unit index in [0, {units}) (w_out has {units} rows). "
                "Fix: pass indices of units of this layer."
            )
    if len(concrete) == 2 and concrete["i"] == concrete["j"]:
        raise ValueError(
            f"i and j must be two different units, got i=j={concrete['i']}: merging a unit "
            "into itself would delete it. Fix: pass the pair from most_correlated_pair."
        )


def noiseout(h: ArrayLike, w_out: ArrayLike, b_out: ArrayLike, num_merges: int) -> MergeResult:
    """Returns the outgoing layer after ``num_merges`` greedy merges of the most correlated units.

    Args:
      h: activations of the hidden layer on a calibration batch, ``[N, units]``
        (after the nonlinearity: the values the next layer multiplies).
      w_out: the next layer's kernel ``[units, out]``.
      b_out: the next layer's bias ``[out]``.
      num_merges: how many units to remove (one per merge).

    Returns:
      A :class:`MergeResult`; apply ``alive`` to the previous layer's kernel
      columns and bias to remove the units there too.

    Raises:
      ValueError: the shapes disagree (``h.shape[1]`` vs ``w_out.shape[0]``, or
        ``b_out`` vs ``w_out.shape[1]``); ``num_merges`` is not in
        ``[0, units - 1]``; or fewer than ``num_merges`` merges are possible
        because no two alive units with non-constant activations remain (the
        message says how many were made).
        Under ``jax.jit`` the values cannot be inspected: the impossible merges
        are skipped instead (no unit removed, pair ``(-1, -1)``).

    Examples:
      >>> import jax, jax.numpy as jnp, jaxprune as jp
      >>> h0 = jax.random.normal(jax.random.key(0), (16, 3))
      >>> h = jnp.concatenate([h0, 2 * h0[:, :1] - 1], axis=1)   # unit 3 duplicates unit 0
      >>> w, b = jax.random.normal(jax.random.key(1), (4, 2)), jnp.zeros(2)
      >>> r = jp.merge.noiseout(h, w, b, 1)
      >>> r.alive.tolist(), bool(jnp.allclose(h @ r.w_out + r.b_out, h @ w + b, atol=1e-5))
      ([True, True, True, False], True)

    References:
      Babaeizadeh, Smaragdis & Campbell, "NoiseOut: A Simple Way to Prune
      Neural Networks", 2016. https://arxiv.org/abs/1611.06211
    """
    _check_shapes(h, w_out, b_out)
    units = jnp.shape(h)[1]
    n_merges = as_int(num_merges)  # NumPy and concrete JAX integers too; None for bools
    if n_merges is None or not 0 <= n_merges < units:
        raise ValueError(
            f"num_merges must be an int in [0, {units - 1}] (one unit removed per merge, at "
            f"least one kept), got {num_merges!r}. Fix: e.g. num_merges={units // 2}."
        )
    h = jnp.asarray(h, jnp.float32)
    w, b = jnp.asarray(w_out), jnp.asarray(b_out)
    alive = jnp.ones(units, bool)
    pairs = []
    for done in range(n_merges):
        i, j = most_correlated_pair(h, alive)
        found = i >= 0
        if not isinstance(found, jax.core.Tracer) and not bool(found):
            constant = int(jnp.sum(alive & ~_varies(h)))
            raise ValueError(
                f"noiseout could make only {done} of num_merges={num_merges} merges: fewer than "
                f"two alive units with non-constant activations remain ({int(alive.sum())} "
                f"alive, {constant} of them constant). Fix: num_merges={done}; a constant "
                "(dead) unit j needs no partner: add its value times w_out[j] to b_out and "
                "drop it."
            )
        w2, b2 = merge_pair(h, w, b, jnp.maximum(i, 0), jnp.maximum(j, 0))
        w, b = jnp.where(found, w2, w), jnp.where(found, b2, b)
        alive = jnp.where(found, alive.at[jnp.maximum(j, 0)].set(False), alive)
        pairs.append(jnp.stack([i, j]))
    pairs_arr = jnp.stack(pairs) if pairs else jnp.zeros((0, 2), jnp.int32)
    return MergeResult(w, b, alive, pairs_arr)
