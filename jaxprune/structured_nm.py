"""N:M and block sparsity: :func:`nm` and :func:`blocks` (re-exported by ``jp.masks``).

N:M keeps exactly ``n`` of every ``m`` consecutive entries along one axis
(the 2:4 pattern of sparse tensor cores); blocks prunes whole tiles of a
leaf, ranked by a pooled score (TF-MOT's ``block_size``). Both rank with the
machinery of :mod:`jaxprune._structured_rank`, like every structured
selection of :mod:`jaxprune.structured`.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import _counts
from jaxprune._search import _ordered_keys
from jaxprune._structured_rank import (
    _check_cap,
    _check_scope,
    _keeps_layout,
    _rank_reduced,
    at_least_f32,
)
from jaxprune._tree import (
    Where,
    as_int,
    leaves_with_paths,
    mirrors_variables,
    path_str,
    prunable_flags,
)

__all__ = ["nm", "blocks"]


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _pooled(x: jax.Array, pool: str, pad: tuple, split: tuple, inner: tuple) -> jax.Array:
    """:func:`blocks`' block scores: ``x`` padded, split into blocks and pooled (one
    compiled program per shape, not one per operation, when called eagerly)."""
    fill = -jnp.inf if pool == "max" else 0.0
    xp = jnp.pad(x, pad, constant_values=fill).reshape(split)
    if pool == "max":
        return jnp.max(xp, axis=inner)
    cnt = jnp.pad(jnp.ones(x.shape, x.dtype), pad).reshape(split).sum(axis=inner)
    return xp.sum(axis=inner) / cnt


@_keeps_layout
@mirrors_variables
def nm(
    scores: Any,
    sparsity: Any = None,
    *,
    n: int | None = 2,
    m: int = 4,
    axis: int | Callable[[Any, Any], int] | None = None,
    where: Where | None = None,
    skip_indivisible: bool = False,
) -> Any:
    """Returns bool masks keeping exactly ``n`` of every ``m`` consecutive entries along ``axis``.

    Groups are ``m`` consecutive entries along ``axis``; each keeps its ``n``
    highest scores (ties by position). The default ``axis=-2`` is the
    reduction axis of flax's Dense ``[in, out]`` and NHWC conv
    ``[kh, kw, in, out]`` kernels, and is taken for 2-D leaves and for 4-D
    leaves whose first two axes (the kernel size) are at most 7. Every other
    leaf needs an explicit ``axis``, and so does any 4-D leaf that is not a
    flax conv kernel, since a shape cannot tell them apart: a ``LinearGeneral``
    kernel ``[in1, in2, out1, out2]`` (``axis=1``), a stacked attention kernel
    ``[L, in, heads, head_dim]`` (``axis=1``), an attention output projection
    ``[heads, head_dim, out]`` (``axis=1``: its reduction runs over heads and
    head_dim, and groups run within each head), an equinox / PyTorch conv
    ``[out, in, kh, kw]`` (``axis=1``). Equinox's and PyTorch's Linear
    ``[out, in]`` is 2-D, so the default is taken there and groups its
    outputs: pass ``axis=-1``. A flax ``ConvTranspose(transpose_kernel=True)``
    kernel is ``[kh, kw, out, in]``: ``axis=-1``.

    With a ``sparsity`` (e.g. from a schedule in ``jp.prune``) each group
    drops ``round(sparsity * m)`` entries, capped at ``m - n`` when ``n`` is
    given, so a schedule from 0 to ``1 - n/m`` ramps up to exactly ``n:m``.
    Only multiples of ``1/m`` are reached; with ``n=None`` a sparsity of
    ``(m - 0.5) / m`` or more may round to all ``m`` (every selected leaf
    emptied), which warns for a concrete sparsity below 1.

    Args:
      scores: a pytree of scores.
      sparsity: ``None`` for exactly ``n:m``; else the fraction of every group
        to drop (may be traced).
      n: entries kept per group (the floor when ``sparsity`` is given; ``None``
        for no floor).
      m: group size along ``axis``.
      axis: the axis groups run along (the reduction axis: -2 for a 1-D or
        3-D flax conv, 0 for an attention kernel ``[in, heads, head_dim]``,
        1 for the output projection ``[heads, head_dim, out]``): an int for
        every leaf, or a function ``(path, leaf) -> int`` (e.g. ``lambda p, x:
        (1 if "out" in p else 0) if x.ndim == 3 else -2`` for
        ``nnx.MultiHeadAttention`` kernels next to Dense ones). Under
        :func:`jaxprune.masks.per_layer` the function sees each layer's path
        with its flat layer index appended (``p[-2]`` is then ``"kernel"``,
        not the module's name), so test names with ``in p`` rather than by
        position. ``None``: ``-2``,
        for 2-D leaves and flax conv kernels (see above); any other selected
        leaf is an error.
      where: predicate; default floating ``ndim >= 2``.
      skip_indivisible: leave leaves whose ``axis`` is not divisible by ``m``
        dense instead of raising.

    Returns:
      A tree of bool masks with exactly the structure of ``scores``.

    Raises:
      ValueError: bad ``n``/``m``; ``sparsity`` not one number; with the default
        ``axis``, a selected leaf neither 2-D nor a flax conv kernel (4-D with
        a kernel size up to 7); or a leaf's ``axis`` is not divisible by ``m``
        (naming the leaf and its shape) and ``skip_indivisible`` is False.

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> k = jnp.array([[4.], [1.], [3.], [2.]])
      >>> jp.masks.nm({"k": k}, n=2, m=4)["k"][:, 0].tolist()
      [True, False, True, False]

    References:
      Mishra et al., "Accelerating Sparse Deep Neural Networks", 2021 (2:4).
      https://arxiv.org/abs/2104.08378
      Zhou et al., "Learning N:M Fine-grained Structured Sparse Neural Networks
      From Scratch", 2021. https://arxiv.org/abs/2102.04010
    """
    static = (
        " (a concrete Python int: the group shape is static, so n and m cannot be traced; "
        "pass them outside jax.jit, or mark them static)"
    )
    if not isinstance(m, (int, np.integer)) or m < 1:
        raise ValueError(
            f"m must be a positive int (the group size, e.g. 4 for 2:4), got {m!r}"
            + (static if isinstance(m, jax.core.Tracer) else "")
            + "."
        )
    if n is not None and (not isinstance(n, (int, np.integer)) or not 0 <= n <= m):
        raise ValueError(
            f"n must be an int in [0, m={m}] (entries kept per group), got {n!r}"
            + (static if isinstance(n, jax.core.Tracer) else "")
            + "."
        )
    if n is None and sparsity is None:
        raise ValueError("nm needs n (entries kept per group) or a sparsity. Fix: n=2, m=4.")
    if sparsity is not None:
        if not (isinstance(sparsity, (int, float)) or getattr(sparsity, "ndim", None) == 0):
            raise ValueError(
                f"nm takes one sparsity for every leaf (a number in [0, 1], may be traced), "
                f"got {sparsity!r}. Fix: pass a number, or call nm once per group of leaves "
                "(with where=)."
            )
        _counts._check_sparsity(sparsity)
        if not isinstance(sparsity, jax.core.Tracer):
            s = float(sparsity)
            drop = round(s * m)
            if n is None and s < 1.0 and drop >= m:
                warnings.warn(
                    f"nm(sparsity={s:g}, n=None, m={m}) drops round({s:g} * {m}) = {m} of every "
                    f"group of {m}: every selected leaf is emptied. nm rounds per group, so "
                    f"only multiples of 1/{m} are reached. Fix: a floor n (e.g. n=1 keeps one "
                    f"per group), a larger m, or a sparsity below {(m - 0.5) / m:g}.",
                    stacklevel=3,
                )
            # The floor silently lowering a sparsity that would leave every group
            # something; one that would empty them (drop == m) is what a floor is for
            # (the warning above suggests one).
            if n is not None and m - n < drop < m:
                warnings.warn(
                    f"nm(sparsity={s:g}, n={n}, m={m}) would drop round({s:g} * {m}) = "
                    f"{drop} of every group of {m}, but the floor n={n} caps it at "
                    f"{m - n} (sparsity {(m - n) / m:g}). Fix: n=None for no floor, or a "
                    f"smaller n (n={m - drop} reaches it).",
                    stacklevel=3,
                )
    if axis is not None and not callable(axis) and as_int(axis) is None:
        raise ValueError(
            f"axis must be an int or a function (path, leaf) -> int, got {axis!r}. Fix: e.g. "
            "axis=-2 (the inputs of a Dense [in, out] kernel)."
        )
    flags = prunable_flags(scores, where)
    _counts.warn_nothing_selected("jp.masks.nm", scores, flags)
    flat, treedef = leaves_with_paths(scores)
    out = []
    for (path, x), f in zip(flat, flags, strict=True):
        if not f:
            out.append(jnp.ones((), bool))
            continue
        nd = jnp.ndim(x)
        # A 4-D leaf is taken for a flax conv [kh, kw, in, out] only with conv-sized
        # leading axes (up to 7): a stacked attention kernel [L, in, heads, head_dim],
        # a LinearGeneral [in1, in2, out1, out2] or an equinox conv [out, in, kh, kw]
        # are 4-D too, and their axis -2 is an output or spatial one.
        if axis is None and (nd not in (2, 4) or (nd == 4 and max(jnp.shape(x)[:2]) > 7)):
            raise ValueError(
                f"nm: leaf {path_str(path)!r} has shape {jnp.shape(x)} ({nd} axes), so the "
                "default axis=-2 (the inputs of flax Dense [in, out] and conv [kh, kw, in, out] "
                "kernels, taken for 4-D leaves with a kernel size up to 7) may not be its "
                "reduction axis. Fix: pass axis= (an int, or a function (path, leaf) -> int): "
                "-2 for a 1-D conv [k, in, out], a 3-D conv [kd, kh, kw, in, out] or a stacked "
                "Dense [L, in, out]; 1 for an equinox/PyTorch conv [out, in, kh, kw] (and -1 "
                "for their Linear [out, in]) or a LinearGeneral [in1, in2, out1, out2]; 0 for "
                "an attention kernel [in, heads, head_dim], 1 for a stacked one), wrap nm in "
                "jp.masks.per_layer for stacked layers, or leave the leaf out with where=."
            )
        ax_i = -2 if axis is None else (axis(path, x) if callable(axis) else axis)
        if as_int(ax_i) is None or not -nd <= ax_i < nd:
            raise ValueError(
                f"axis={ax_i!r} is out of range for leaf {path_str(path)!r} of shape "
                f"{jnp.shape(x)}. Fix: an int in [-{nd}, {nd}) for this leaf."
            )
        ax = ax_i % nd
        size = jnp.shape(x)[ax]
        if size % m:
            if skip_indivisible:
                out.append(jnp.ones((), bool))
                continue
            raise ValueError(
                f"nm: leaf {path_str(path)!r} has shape {jnp.shape(x)}; its axis {ax_i} has "
                f"{size} entries, not divisible by m={m}. Fix: pass skip_indivisible=True to "
                "leave such leaves dense, or exclude it with `where`; if that axis is not the "
                "leaf's reduction axis, pass axis= (1 for an equinox/PyTorch conv "
                "[out, in, kh, kw], -1 for their Linear [out, in], 1 for an attention "
                "output projection [heads, head_dim, out])."
            )
        if sparsity is None:
            drop = jnp.int32(m - n)
        else:
            drop = _counts._count(sparsity, m)
            if n is not None:
                drop = jnp.minimum(drop, m - n)
        out.append(_nm_keep(at_least_f32(x), drop, ax, m))
    return jax.tree.unflatten(treedef, out)


# Up to this group size, ranks are counted with m element-wise passes that
# XLA fuses into one loop; above it, they come from two stable sorts.
_COMPARE_MAX_M = 32


def _group_ranks(g: jax.Array, axis: int) -> jax.Array:
    """Each entry's rank in its group along ``axis``: a stable ascending sort's positions.

    The order is ``jnp.argsort(g, axis=axis, stable=True)``'s: ``-0.0`` ties
    ``+0.0``, every NaN ranks above ``+inf`` and NaNs tie, ties go by
    position. For groups of up to 32 the rank of entry ``i`` is counted,
    ``#{j: g[j] < g[i]} + #{j < i: g[j] == g[i]}``, one comparison with each
    ``g[j]`` at a time, in place along ``axis``: element-wise operations that
    XLA fuses into one pass, with no transpose. Two sorts of many small
    groups cost far more (on XLA:CPU, 2:4 masks of a 1M-weight MLP took 97 ms
    with sorts, 20x its dense train step).
    """
    m = g.shape[axis]
    if m > _COMPARE_MAX_M:
        order = jnp.argsort(g, axis=axis, stable=True)
        return jnp.argsort(order, axis=axis, stable=True)
    nan = jnp.isnan(g)
    position = np.arange(m).reshape((m,) + (1,) * (g.ndim - 1 - axis % g.ndim))
    rank = jnp.zeros(g.shape, jnp.int32)
    for j in range(m):
        gj = jax.lax.slice_in_dim(g, j, j + 1, axis=axis)
        nj = jax.lax.slice_in_dim(nan, j, j + 1, axis=axis)
        below = (gj < g) | (nan & ~nj)
        tie = (gj == g) | (nan & nj)
        rank = rank + (below | (tie & (j < position))).astype(jnp.int32)
    return rank


@functools.partial(jax.jit, static_argnums=(2, 3))
def _nm_keep(x: jax.Array, drop: jax.Array, ax: int, m: int) -> jax.Array:
    """One leaf's N:M mask: ``True`` where an entry's rank in its group is ``>= drop``.

    Groups are split in place (``[..., size, ...] -> [..., size // m, m,
    ...]``), never transposed. Jitted: called eagerly, its operations compile
    as one program.
    """
    shape, ranked = x.shape, x
    if x.dtype == jnp.float32:
        # Ranked by the float bits: XLA:CPU compares a denormal score as 0, which would
        # tie it with a zero. -0.0 keeps tying +0.0, and NaNs tie above +inf.
        k = _ordered_keys(x)
        k = jnp.where(k == jnp.uint32(0x7FFFFFFF), jnp.uint32(0x80000000), k)
        ranked = jnp.where(jnp.isnan(x), jnp.uint32(0xFFFFFFFF), k)
    g = ranked.reshape(shape[:ax] + (shape[ax] // m, m) + shape[ax + 1 :])
    keep = _group_ranks(g, ax + 1) >= drop
    return keep.reshape(shape)


def _check_block(block: Any) -> tuple[int, ...]:
    """Returns ``block`` as a tuple of positive ints, else raises a ``ValueError`` naming it."""
    if as_int(block) is not None:
        # Not read as (b,): block=4 means 4 x 4 to a reader of conv kernel sizes, and
        # (4,) (the last axis only) to one of NumPy shapes.
        raise ValueError(
            f"block must be a tuple of positive ints (the block shape over the trailing "
            f"axes), got the int {block!r}, which reads as either shape. Fix: "
            f"block=({block}, {block}) for square blocks of the last two axes, or "
            f"block=({block},) for runs of {block} along the last axis."
        )
    try:
        sizes = tuple(as_int(b) for b in block)
    except TypeError:  # not iterable
        sizes = (None,)
    if not sizes or any(b is None or b < 1 for b in sizes):
        raise ValueError(
            f"block must be a non-empty tuple of positive ints (the block shape over the "
            f"trailing axes), got {block!r}. Fix: e.g. block=(1, 4) or block=(4, 4)."
        )
    return sizes


@_keeps_layout
@mirrors_variables
def blocks(
    scores: Any,
    sparsity: Any,
    *,
    block: Sequence[int] = (1, 4),
    pool: str = "avg",
    where: Where | None = None,
    scope: str = "layer",
    max_sparsity: float | None = None,
) -> Any:
    """Returns bool masks that keep or drop whole blocks tiling the last ``len(block)`` axes.

    Each block (e.g. ``1 x 4``, ``4 x 1``, ``8 x 8``) is scored by the average
    (``pool="avg"``) or maximum (``"max"``) of its scores; edge blocks that
    overhang the leaf are pooled over their valid entries. Exactly
    ``round(sparsity * n_blocks)`` blocks of each leaf (or in total, with
    ``scope="global"``) are dropped. With a concrete sparsity below 1, a leaf
    that loses every block (``round(sparsity * n_blocks) == n_blocks``, or a
    global ranking without a cap) warns.

    Args:
      scores: a pytree of scores.
      sparsity: fraction of blocks to drop, in ``[0, 1]`` (may be traced).
      block: block shape over the trailing axes of each leaf, a tuple of
        positive ints (an int is refused: ``4`` could mean ``(4,)`` or ``(4, 4)``).
      pool: ``"avg"`` or ``"max"``.
      where: predicate; default floating ``ndim >= 2``.
      scope: ``"layer"`` or ``"global"``.
      max_sparsity: with ``scope="global"``, the largest fraction of any one
        leaf's blocks to drop (a Python number in ``[0, 1]``; at most
        ``floor(max_sparsity * n_blocks)`` per leaf, as
        :func:`jaxprune.masks.global_topk` caps entries); ``None`` for no cap.

    Returns:
      A tree of bool masks with exactly the structure of ``scores``.

    Raises:
      ValueError: a bad ``block``, ``pool``, ``scope`` or ``max_sparsity`` (or
        ``max_sparsity`` with ``scope="layer"``), or a leaf with fewer axes
        than ``block``.

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> w = jnp.array([[1., 1., 9., 9.], [1., 1., 9., 9.]])
      >>> jp.masks.blocks({"w": w}, 0.5, block=(2, 2))["w"].tolist()
      [[False, False, True, True], [False, False, True, True]]

    References:
      Narang et al., "Block-Sparse Recurrent Neural Networks", 2017.
      https://arxiv.org/abs/1711.02782
    """
    _check_scope(scope)
    _check_cap(max_sparsity, scope, "blocks", "blocks")
    block = _check_block(block)
    if pool not in ("avg", "max"):
        raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}.")
    flags = prunable_flags(scores, where)
    _counts.warn_nothing_selected("jp.masks.blocks", scores, flags, sparsity)
    flat, _ = leaves_with_paths(scores)
    reduced, expand = {}, {}
    for i, ((path, x), f) in enumerate(zip(flat, flags, strict=True)):
        if not f:
            continue
        shape = jnp.shape(x)
        if len(shape) < len(block):
            raise ValueError(
                f"blocks: leaf {path_str(path)!r} of shape {shape} has fewer axes than "
                f"block={block}. Fix: a shorter block, or make `where` skip it."
            )
        lead, tail = shape[: len(shape) - len(block)], shape[len(shape) - len(block) :]
        nb = tuple(-(-t // b) for t, b in zip(tail, block, strict=True))
        overhang = [(0, n * b - t) for n, b, t in zip(nb, block, tail, strict=True)]
        pad = [(0, 0)] * len(lead) + overhang
        split = lead + tuple(v for n, b in zip(nb, block, strict=True) for v in (n, b))
        inner = tuple(len(lead) + 2 * j + 1 for j in range(len(block)))
        reduced[i] = _pooled(at_least_f32(x), pool, tuple(map(tuple, pad)), split, inner)

        def exp(keep, lead=lead, block=block, tail=tail):
            k = keep
            for j, b in enumerate(block):
                k = jnp.repeat(k, b, axis=len(lead) + j)
            return k[(...,) + tuple(slice(0, t) for t in tail)]

        expand[i] = exp
    return _rank_reduced(
        scores,
        sparsity,
        reduced,
        expand,
        scope,
        max_sparsity=max_sparsity,
        name="blocks",
        things="blocks",
    )
