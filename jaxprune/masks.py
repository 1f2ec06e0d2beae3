"""Selections: scores + sparsity -> boolean masks with the scores' tree structure.

Every selection prunes an exact number of entries: ``round(s * n)`` per leaf
(:func:`topk`) or in total (:func:`global_topk`), the lowest scores first, ties
broken by flatten order so counts stay exact even when all scores are equal.
Nothing here sorts: the k-th smallest score is found by a safeguarded
interpolation search over the order-preserving integer image of the float32
scores, counting ``score <= t`` with one reduction per probe. That is O(N) per
probe, converges in a handful of probes on real score distributions (never more
than 64), and on sharded arrays each probe is a reduction, not a gather.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxprune._tree import Where, check_same_structure, leaves_with_paths, path_str, prunable_flags

__all__ = ["topk", "global_topk", "apply_masks", "sparsity", "kth_smallest_keys", "ordered_keys"]

_SIGN = 0x80000000


def ordered_keys(scores: ArrayLike) -> jax.Array:
    """Returns uint32 keys whose unsigned order is the float32 order of ``scores``.

    Flattened. ``-0.0`` sorts just below ``+0.0``; NaNs sort beyond the infinities.
    """
    bits = jax.lax.bitcast_convert_type(jnp.asarray(scores, jnp.float32).reshape(-1), jnp.uint32)
    # Positive floats: set the sign bit; negative floats: flip every bit.
    sign = jnp.uint32(_SIGN)
    return jnp.where(bits >= sign, ~bits, bits | sign)


def _count_le(keys: list[jax.Array], t: jax.Array) -> jax.Array:
    return sum(jnp.sum(k <= t, dtype=jnp.int32) for k in keys)


def _bracket_search(keys, k, lo, hi, c_lo, c_hi):
    """Narrows ``c(lo) < k <= c(hi)`` until ``c(hi) == k`` or ``hi == lo + 1``."""

    def cond(state):
        lo, hi, c_lo, c_hi, _ = state
        return (c_hi != k) & (hi - lo > 1)

    def body(state):
        lo, hi, c_lo, c_hi, interpolate = state
        width = hi - lo
        frac = (k - c_lo).astype(jnp.float32) / (c_hi - c_lo).astype(jnp.float32)
        step_i = jnp.floor(frac * width.astype(jnp.float32))
        step_i = jnp.clip(step_i, 1.0, 4.0e9).astype(jnp.uint32)
        step_i = jnp.clip(step_i, jnp.uint32(1), width - 1)
        t = lo + jnp.where(interpolate, step_i, width // 2)
        c = _count_le(keys, t)
        go_left = c >= k
        new_lo, new_c_lo = jnp.where(go_left, lo, t), jnp.where(go_left, c_lo, c)
        new_hi, new_c_hi = jnp.where(go_left, t, hi), jnp.where(go_left, c, c_hi)
        # Interpolate next only if this step at least halved the bracket.
        halved = (new_hi - new_lo) <= width // 2
        return new_lo, new_hi, new_c_lo, new_c_hi, halved

    lo, hi, c_lo, c_hi, _ = jax.lax.while_loop(cond, body, (lo, hi, c_lo, c_hi, jnp.bool_(True)))
    return lo, hi, c_lo, c_hi


def _full_bracket(keys, k):
    lo = jnp.min(jnp.stack([jnp.min(x) for x in keys]))
    hi = jnp.max(jnp.stack([jnp.max(x) for x in keys]))
    c_lo = _count_le(keys, lo)
    # If the minimum already covers k entries, the answer is the minimum and
    # nothing lies below it: encode as an empty bracket with c(lo) = 0.
    at_min = c_lo >= k
    c_hi = jnp.where(at_min, c_lo, jnp.int32(sum(x.size for x in keys)))
    return jnp.where(at_min, lo, lo), jnp.where(at_min, lo, hi), jnp.where(at_min, 0, c_lo), c_hi


_SAMPLE = 16384


def _sample_bracket(keys, k, n):
    """Brackets the k-th key by searching a strided sample first (cheap, usually valid)."""
    stride = max(1, n // _SAMPLE)
    sample = [x[::stride] for x in keys]
    n_s = sum(x.size for x in sample)
    q = k.astype(jnp.float32) / n
    k_s = q * n_s
    # ~4 standard deviations of the sample quantile on each side.
    delta = 4.0 * jnp.sqrt(jnp.maximum(k_s * (1.0 - q), 1.0)) + 2.0
    k_lo = jnp.clip(jnp.floor(k_s - delta), 1, n_s).astype(jnp.int32)
    k_hi = jnp.clip(jnp.ceil(k_s + delta), 1, n_s).astype(jnp.int32)
    t_lo = _kth(sample, k_lo)[0]
    t_hi = _kth(sample, k_hi)[0]
    lo = jnp.where(t_lo > 0, t_lo - 1, t_lo)
    return lo, t_hi, _count_le(keys, lo), _count_le(keys, t_hi)


def _kth(keys, k):
    lo, hi, c_lo, c_hi = _full_bracket(keys, k)
    lo, hi, c_lo, c_hi = _bracket_search(keys, k, lo, hi, c_lo, c_hi)
    return hi, jnp.where(c_hi == k, k, c_lo), c_hi


def kth_smallest_keys(keys: list[jax.Array], k: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns ``(t, below, at_or_below)``: the k-th smallest key over all ``keys``.

    ``below <= #{key < t}``-style bookkeeping: ``below < k <= at_or_below`` with
    ``below = #{key < t}`` and ``at_or_below = #{key <= t}``, except that
    ``below == at_or_below == k`` when ``{key <= t}`` holds exactly ``k`` keys.
    Safeguarded interpolation search (regula falsi on the count function with a
    bisection step whenever an interpolation step fails to halve the bracket),
    started from a bracket found on a strided sample when the input is large:
    exact, no sort.
    """
    k = jnp.asarray(k, jnp.int32)
    n = sum(x.size for x in keys)
    if n <= 4 * _SAMPLE:
        return _kth(keys, k)
    lo, hi, c_lo, c_hi = _sample_bracket(keys, k, n)
    valid = (c_lo < k) & (k <= c_hi)
    lo, hi, c_lo, c_hi = jax.lax.cond(
        valid, lambda: (lo, hi, c_lo, c_hi), lambda: _full_bracket(keys, k)
    )
    lo, hi, c_lo, c_hi = _bracket_search(keys, k, lo, hi, c_lo, c_hi)
    return hi, jnp.where(c_hi == k, k, c_lo), c_hi


def _select(keys: list[jax.Array], k: jax.Array) -> list[jax.Array]:
    """Returns flat keep-masks pruning exactly ``k`` smallest keys (ties by flat order)."""
    n = sum(x.size for x in keys)

    def search(_):
        t, below, at_or_below = kth_smallest_keys(keys, jnp.maximum(k, 1))

        def no_tie(_):
            return [x > t for x in keys]

        def tie(_):
            # Prune the first (k - below) entries equal to t, in flatten order.
            need = k - below
            out, offset = [], jnp.int32(0)
            for x in keys:
                eq = x == t
                rank = jnp.cumsum(eq, dtype=jnp.int32) + offset
                offset = rank[-1] if x.size else offset
                out.append((x > t) | (eq & (rank > need)))
            return out

        return jax.lax.cond(at_or_below == k, no_tie, tie, None)

    def keep_all(_):
        return [jnp.ones(x.shape, bool) for x in keys]

    if n == 0:
        return keep_all(None)
    return jax.lax.cond(k <= 0, keep_all, search, None)


def _check_sparsity(s: Any, name: str = "sparsity") -> None:
    if isinstance(s, jax.core.Tracer):
        return
    try:
        v = float(s)
    except (TypeError, ValueError):
        raise ValueError(
            f"{name} must be a number in [0, 1] (or a tree of them), got {s!r}."
        ) from None
    if not (0.0 <= v <= 1.0) or math.isnan(v):
        raise ValueError(
            f"{name} must be in [0, 1] (the fraction of entries to prune), got {v}. "
            "Fix: pass e.g. 0.9 to prune 90% of the weights, not 90."
        )


def _count(s: Any, n: int) -> jax.Array:
    """Returns round(s * n) as int32; exact (double precision) for concrete s."""
    if not isinstance(s, jax.core.Tracer):
        return jnp.int32(round(float(s) * n))
    s = jnp.clip(jnp.asarray(s, jnp.float32), 0.0, 1.0)
    return jnp.round(s * n).astype(jnp.int32)


def _per_leaf_sparsity(scores: Any, sparsity: Any, flags: list[bool]) -> list[Any]:
    """Broadcasts a scalar sparsity, or reads a tree of them, to one value per leaf."""
    flat, _ = leaves_with_paths(scores)
    if jnp.ndim(sparsity) == 0 and not isinstance(sparsity, (dict, list, tuple)) and (
        isinstance(sparsity, (int, float, jax.Array)) or hasattr(sparsity, "dtype")
    ):
        _check_sparsity(sparsity)
        return [sparsity] * len(flat)
    s_flat, _ = leaves_with_paths(sparsity)
    if len(s_flat) != len(flat):
        check_same_structure(scores, sparsity, ref_name="scores", other_name="sparsity")
    out = []
    for (p, _), (_, s), f in zip(flat, s_flat, flags):
        if f:
            _check_sparsity(s, f"sparsity[{path_str(p)!r}]")
        out.append(s)
    return out


def _assemble(scores: Any, flags: list[bool], keeps: dict[int, jax.Array]) -> Any:
    flat, treedef = leaves_with_paths(scores)
    leaves = []
    for i, (_, x) in enumerate(flat):
        leaves.append(keeps[i].reshape(jnp.shape(x)) if i in keeps else jnp.ones((), bool))
    return jax.tree.unflatten(treedef, leaves)


def topk(scores: Any, sparsity: Any, *, where: Where | None = None) -> Any:
    """Returns bool masks keeping the top ``1 - sparsity`` scores of each prunable leaf.

    Exactly ``round(sparsity * leaf.size)`` entries of each leaf selected by
    ``where`` are pruned (``False``): the lowest scores, ties broken by flatten
    order. Leaves not selected get a scalar ``True`` (keep everything).

    Args:
      scores: a pytree of scores (e.g. ``jp.criteria.magnitude(params)``).
      sparsity: fraction in ``[0, 1]`` to prune, a scalar or a tree of scalars
        with the structure of ``scores`` (one per leaf; may be traced).
      where: predicate ``(path, leaf) -> bool`` choosing the prunable leaves;
        default: floating leaves with ``ndim >= 2``.

    Returns:
      A tree of bool arrays with exactly the structure of ``scores``.

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> m = jp.masks.topk({"w": jnp.array([[3., 1.], [2., 4.]])}, 0.5)
      >>> m["w"].tolist()
      [[True, False], [False, True]]

    References:
      Han et al., "Learning both Weights and Connections for Efficient Neural
      Networks", 2015. https://arxiv.org/abs/1506.02626
    """
    flags = prunable_flags(scores, where)
    per_leaf = _per_leaf_sparsity(scores, sparsity, flags)
    flat, _ = leaves_with_paths(scores)
    keeps = {}
    for i, ((_, x), f, s) in enumerate(zip(flat, flags, per_leaf)):
        if f:
            keeps[i] = _select([ordered_keys(x)], _count(s, x.size))[0]
    return _assemble(scores, flags, keeps)


def global_topk(scores: Any, sparsity: ArrayLike, *, where: Where | None = None) -> Any:
    """Returns bool masks keeping the top ``1 - sparsity`` scores across all prunable leaves.

    Exactly ``round(sparsity * N)`` entries are pruned in total, ``N`` the
    number of entries in the leaves selected by ``where``; the lowest scores go
    first whatever leaf holds them, ties broken by flatten order. Found without
    sorting (see the module docstring), so it scales to tens of millions of
    entries and to sharded arrays.

    Args:
      scores: a pytree of scores.
      sparsity: fraction in ``[0, 1]`` to prune (may be traced).
      where: predicate ``(path, leaf) -> bool``; default floating ``ndim >= 2``.

    Returns:
      A tree of bool arrays with exactly the structure of ``scores``.

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> m = jp.masks.global_topk({"a": jnp.ones((2, 2)), "b": 2 * jnp.ones((2, 2))}, 0.5)
      >>> int(m["a"].sum()), int(m["b"].sum())
      (0, 4)

    References:
      Frankle & Carbin, "The Lottery Ticket Hypothesis", 2019 (global pruning).
      https://arxiv.org/abs/1803.03635
    """
    _check_sparsity(sparsity)
    flags = prunable_flags(scores, where)
    flat, _ = leaves_with_paths(scores)
    idx = [i for i, f in enumerate(flags) if f]
    keys = [ordered_keys(flat[i][1]) for i in idx]
    n = sum(x.size for x in keys)
    kept = _select(keys, _count(sparsity, n)) if keys else []
    return _assemble(scores, flags, dict(zip(idx, kept)))


def apply_masks(params: Any, masks: Any) -> Any:
    """Returns ``params`` with masked-out entries set to exactly zero (dtype kept).

    Raises:
      ValueError: the trees differ; the message lists the differing paths.

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> jp.apply_masks({"w": jnp.array([1., 2.])}, {"w": jnp.array([True, False])})["w"].tolist()
      [1.0, 0.0]
    """
    check_same_structure(params, masks, ref_name="params", other_name="masks")
    flat_p, treedef = leaves_with_paths(params)
    flat_m, _ = leaves_with_paths(masks)
    out = []
    for (path, p), (_, m) in zip(flat_p, flat_m):
        m = jnp.asarray(m)
        if m.ndim and m.shape != jnp.shape(p):
            raise ValueError(
                f"mask for {path_str(path)!r} has shape {m.shape} but the parameter has "
                f"shape {jnp.shape(p)}. Fix: masks must mirror params leaf by leaf (a scalar "
                "True keeps a whole leaf)."
            )
        out.append(jnp.where(m, p, jnp.zeros((), jnp.result_type(p))))
    return jax.tree.unflatten(treedef, out)


def sparsity(tree: Any, *, where: Where | None = None) -> jax.Array:
    """Returns the fraction of zeros (or ``False``) over the prunable leaves of ``tree``.

    Works on params (counts exact zeros) and on masks (counts ``False``). The
    default ``where`` selects leaves with ``ndim >= 2`` (floating or bool).

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> float(jp.sparsity({"w": jnp.array([[0., 1.], [0., 0.]]), "b": jnp.zeros(2)}))
      0.75
    """
    flags = prunable_flags(tree, where, allow_bool=True)
    flat, _ = leaves_with_paths(tree)
    zeros, total = jnp.int32(0), 0
    for (_, x), f in zip(flat, flags):
        if f:
            zeros = zeros + jnp.sum(jnp.asarray(x) == 0, dtype=jnp.int32)
            total += jnp.size(x)
    if total == 0:
        return jnp.float32(0.0)
    return zeros.astype(jnp.float32) / total
