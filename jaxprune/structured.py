"""Structured selections: scores + sparsity -> masks that drop whole slices, patterns, N:M groups.

Each selection here reduces a leaf's scores to one score per structure (a
neuron, a filter, an input channel, a k x k kernel, a block, an N:M group
position), ranks those with the exact, sort-free :func:`jaxprune.masks.topk`
(or :func:`~jaxprune.masks.global_topk`), and broadcasts the decision back to
the leaf's shape. So every one of them has the shape of ``topk`` — a scores
tree in, bool masks with the params' structure out, exact counts, traced
sparsity allowed — and works as ``scope=`` of :func:`jaxprune.prune`, where a
schedule ramps it::

    jp.prune(tx, sparsity=schedule,
             scope=functools.partial(jp.masks.structured, axes=-1))

Axes are given per leaf with negative indices so one spec fits Dense kernels
``[in, out]`` and NHWC conv kernels ``[kh, kw, in, out]``: ``axes=-1`` drops
neurons / filters (output channels), ``axes=-2`` input channels, and
``axes=(-2, -1)`` whole k x k kernels of a conv. Two flax layouts differ: a
depthwise conv's kernel is ``[kh, kw, 1, C]`` (its channels are its filters,
``axes=-1``), and ``ConvTranspose(transpose_kernel=True)`` stores
``[kh, kw, out, in]`` (its filters are ``axes=-2``; N:M groups need
``axis=-1``). Equinox and PyTorch layouts (``[out, in]``,
``[out, in, kh, kw]``) need their own axes too (see :func:`nm`).

The pattern selections (:func:`patterns`, :func:`pattern_library`) live in
:mod:`jaxprune.structured_patterns`, N:M and block sparsity (:func:`nm`,
:func:`blocks`) in :mod:`jaxprune.structured_nm`, all re-exported here; the
ranking and layout machinery every selection shares lives in
:mod:`jaxprune._structured_rank`.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune._counts import warn_nothing_selected
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
from jaxprune.structured_nm import blocks, nm
from jaxprune.structured_patterns import pattern_library, patterns

__all__ = ["structured", "patterns", "pattern_library", "nm", "blocks", "REDUCTIONS"]

Axes = int | Sequence[int] | Callable[[Any, Any], int | Sequence[int]]


def _prune_first(red: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """Returns ``red`` with every slice that holds a ``-inf`` score reduced to ``-inf``.

    ``-inf`` means "prune first" (the drivers mark already-pruned entries so,
    to keep their masks nested), but the norms would square or ``abs`` it into
    ``+inf``, the best score. Slices of finite, ``+inf`` or NaN scores reduce
    exactly as ``red`` does (a slice with a NaN and no ``-inf`` stays NaN).
    """

    def reduce(x: jax.Array, axis: Any) -> jax.Array:
        return jnp.where(jnp.any(x == -jnp.inf, axis=axis), -jnp.inf, red(x, axis))

    return reduce


def _l2(x: jax.Array, axis: Any) -> jax.Array:
    """Returns the l2 norm of ``x`` over ``axis``, exact in ranking at any normal magnitude.

    A plain ``sqrt(sum(x**2))`` squares float32 scores below ~1e-19 to 0 and above
    ~1.8e19 to inf, so every slice ties and the flatten-order tie-break drops the
    largest ones. Each slice is divided by a power of two near its own max ``|x|``
    (2**e with ``m = f * 2**e``, ``f`` in [0.5, 1)) before squaring and multiplied
    back after: powers of two scale exactly, so for ordinary scores the norms are
    bit for bit those of the plain formula. ``e`` is 0 where the max is 0, inf or
    NaN (the plain formula's result), and clipped so that 2**-e stays a normal
    float32 (a denormal factor would be flushed to 0 on XLA:CPU). A norm below
    float32's smallest normal (~1.2e-38) is denormal and XLA:CPU flushes it to
    0, so such slices tie with all-zero ones.
    """
    # At least float32: a float16 factor 2**-e would overflow for scores below ~1e-5.
    x = at_least_f32(x)
    m = jnp.max(jnp.abs(x), axis=axis, keepdims=True, initial=0.0)  # size-0 slices too
    e = jnp.frexp(m)[1]
    e = jnp.clip(jnp.where(jnp.isfinite(m) & (m > 0), e, 0), -125, 125)
    one = jnp.ones((), x.dtype)
    norm = jnp.sqrt(jnp.sum(jnp.square(x * jnp.ldexp(one, -e)), axis=axis))
    return norm * jnp.ldexp(one, jnp.squeeze(e, axis=axis))


# The built-in reductions of `structured`: a slice holding a -inf score reduces
# to -inf (prune first) with every one of them; a custom `reduce` must do so
# itself for callers that mark entries with -inf (e.g. jp.drivers).
REDUCTIONS: dict[str, Callable[..., jax.Array]] = {
    "l2": _prune_first(_l2),
    "l1": _prune_first(lambda x, axis: jnp.sum(jnp.abs(x), axis=axis)),
    "mean": _prune_first(lambda x, axis: jnp.mean(x, axis=axis)),
    "max": _prune_first(lambda x, axis: jnp.max(x, axis=axis)),
}


def _reducer(reduce: str | Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    if callable(reduce):
        return reduce
    if reduce not in REDUCTIONS:
        raise ValueError(
            f"reduce must be one of {sorted(REDUCTIONS)} or a function (x, axis) -> array, "
            f"got {reduce!r}. Fix: reduce='l2' (the usual neuron/filter norm)."
        )
    return REDUCTIONS[reduce]


def _axes_ints(axes: Any, where: str = "") -> tuple[int, ...]:
    """Returns ``axes`` (an int or a sequence of ints) as a tuple, else raises naming it."""
    if as_int(axes) is not None:
        return (as_int(axes),)
    ints = None
    if not isinstance(axes, (str, bytes)):
        try:
            ints = tuple(as_int(a) for a in axes)
        except TypeError:  # not iterable: a float, None
            ints = None
    if ints is None or any(a is None for a in ints):
        raise ValueError(
            f"axes must be an int, a tuple of ints or a function (path, leaf) -> axes, got "
            f"{axes!r}{where}. Fix: axes=-1 (neurons / conv filters), axes=-2 (input "
            "channels) or axes=(-2, -1) (whole k x k kernels of a conv)."
        )
    return ints


def _norm_axes(axes: Axes, path: Any, x: Any) -> tuple[int, ...]:
    if callable(axes):
        a = _axes_ints(axes(path, x), f" from the axes function for leaf {path_str(path)!r}")
    else:
        a = _axes_ints(axes)
    nd = jnp.ndim(x)
    if nd == 0:
        raise ValueError(
            f"axes={a!r} cannot index leaf {path_str(path)!r}: it is a scalar (shape (), no "
            "axes to slice). Fix: restrict `where` to leaves with at least one axis (the "
            "default `where` selects floating leaves with ndim >= 2)."
        )
    out = []
    for ax in a:
        if not -nd <= ax < nd:
            raise ValueError(
                f"axes={a!r} is out of range for leaf {path_str(path)!r} of shape "
                f"{jnp.shape(x)}: valid axes are -{nd}..{nd - 1}. Fix: use negative axes "
                "(-1 output channels, -2 input channels) or restrict `where` to leaves "
                "with enough dimensions."
            )
        out.append(ax % nd)
    if len(set(out)) != len(out):
        raise ValueError(f"axes={a!r} names the same axis twice for leaf {path_str(path)!r}.")
    return tuple(sorted(out))


@_keeps_layout
@mirrors_variables
def structured(
    scores: Any,
    sparsity: Any,
    *,
    axes: Axes = -1,
    reduce: str | Callable[..., jax.Array] = "l2",
    where: Where | None = None,
    scope: str = "layer",
    max_sparsity: float | None = None,
) -> Any:
    """Returns bool masks that keep or drop whole slices of each leaf along ``axes``.

    Each slice (one index along ``axes``, everything along the other axes) is
    scored by ``reduce`` of its scores over the other axes, and exactly
    ``round(sparsity * n_slices)`` slices of each prunable leaf (or in total,
    with ``scope="global"``) are dropped, the lowest first.

    A leaf with a single slice along ``axes`` is left dense, with a warning
    naming it: dropping that slice would empty the layer. The usual case is a
    flax depthwise conv ``[kh, kw, 1, C]`` under ``axes=-2``: its input
    channels are its filters, ``axes=-1``. (With ``scope="global"`` and every
    leaf a single slice, e.g. ``axes=()``, whole leaves are ranked, as asked.)
    With a concrete sparsity below 1, a leaf that loses every slice anyway
    (``round(sparsity * n) == n``, or a global ranking without a cap) warns.

    Args:
      scores: a pytree of scores (e.g. ``jp.criteria.magnitude(params)``).
      sparsity: fraction of slices to drop, in ``[0, 1]``; scalar (may be
        traced) or, with ``scope="layer"``, a tree of per-leaf values.
      axes: the axes a slice is indexed by; ``-1`` neurons / conv filters,
        ``-2`` input channels, ``(-2, -1)`` whole k x k kernels of a conv. An
        int, a tuple, or a function ``(path, leaf) -> axes``.
      reduce: ``"l2"``, ``"l1"``, ``"mean"``, ``"max"`` or ``(x, axis) -> array``.
        ``"l2"`` and ``"l1"`` are norms: they assume nonnegative scores (a
        norm ranks -5 above +1), so for signed criteria such as
        ``jp.criteria.movement`` (negative: moving toward 0) use ``"mean"``;
        concrete scores with a negative finite entry warn (traced ones, as in
        ``jp.prune``, cannot be checked). ``-inf`` means prune first: with the
        built-in reductions a slice holding a ``-inf`` score reduces to
        ``-inf`` (even next to NaN), so it goes before every other slice
        (``jp.drivers`` marks already-pruned entries so); finite, ``+inf`` and
        NaN scores reduce as the formula says (a NaN slice ranks highest, as in
        ``topk``). A custom ``reduce`` gets the raw scores.
      where: predicate ``(path, leaf) -> bool``; default floating ``ndim >= 2``.
      scope: ``"layer"`` (exact count per leaf) or ``"global"`` (one ranking).
      max_sparsity: with ``scope="global"``, the largest fraction of any one
        leaf's slices to drop (a Python number in ``[0, 1]``; each leaf loses
        at most ``floor(max_sparsity * n_slices)``, lowest first, as
        :func:`jaxprune.masks.global_topk` caps entries); ``None`` for no cap.

    Returns:
      A tree of bool masks with exactly the structure of ``scores``.

    Raises:
      ValueError: a bad ``axes`` (not ints, out of range, repeated), ``reduce``,
        ``scope`` or ``max_sparsity`` (or ``max_sparsity`` with
        ``scope="layer"``).

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> w = jnp.array([[1., 5., 0.], [1., 5., 3.]])
      >>> jp.masks.structured({"w": w}, 1 / 3, axes=-1)["w"].tolist()
      [[False, True, True], [False, True, True]]
      >>> s = w.at[0, 1].set(-jnp.inf)  # -inf means prune first: column 1 goes
      >>> jp.masks.structured({"w": s}, 1 / 3, axes=-1)["w"][0].tolist()
      [True, False, True]
      >>> p = {"a": jnp.ones((2, 4)), "b": jnp.full((2, 4), 0.01)}  # b: small weights
      >>> m = jp.masks.structured(p, 0.5, scope="global", max_sparsity=0.75)
      >>> m["a"][0].tolist(), m["b"][0].tolist()  # b keeps floor(0.25 * 4) = 1 column
      ([False, True, True, True], [False, False, False, True])

    References:
      Li et al., "Pruning Filters for Efficient ConvNets", 2017 (L1 filter
      norms). https://arxiv.org/abs/1608.08710
      He et al., "Channel Pruning for Accelerating Very Deep Neural Networks",
      2017. https://arxiv.org/abs/1707.06168
    """
    _check_scope(scope)
    _check_cap(max_sparsity, scope, "structured", "slices")
    if not callable(axes):
        _axes_ints(axes)  # refused before any leaf is looked at
    red = _reducer(reduce)
    flags = prunable_flags(scores, where)
    warn_nothing_selected("jp.masks.structured", scores, flags, sparsity)
    flat, _ = leaves_with_paths(scores)
    # The leaves to select, by flatten index, with their slice axes.
    picked = {i: _norm_axes(axes, *flat[i]) for i, f in enumerate(flags) if f}
    single = {i for i, ax in picked.items() if _n_slices(flat[i][1], ax) == 1}
    if scope == "global" and single == set(picked):
        single = set()  # whole leaves ranked against each other (axes=()), as asked
    if single:
        names = [f"{path_str(flat[i][0])} {tuple(jnp.shape(flat[i][1]))}" for i in sorted(single)]
        warnings.warn(
            f"structured(axes={axes!r}) left {len(names)} leaf/leaves dense: each has a single "
            f"slice along axes, and dropping it would empty the layer: {names[:5]}. A flax "
            "depthwise conv kernel [kh, kw, 1, C] has one input channel per filter, so its "
            "channels are its filters. Fix: axes=-1 for depthwise kernels (e.g. axes=lambda "
            "path, x: -1 if x.shape[-2] == 1 else -2), or leave them out with where= "
            "(which also silences this).",
            stacklevel=3,
        )
    if reduce in ("l1", "l2"):
        _warn_signed(flat, [i for i in picked if i not in single], reduce)
    reduced, expand = {}, {}
    for i, ax in picked.items():
        if i in single:
            continue
        x = at_least_f32(flat[i][1])
        other = tuple(d for d in range(x.ndim) if d not in ax)
        if other and isinstance(reduce, str):  # one compiled program, not one per operation
            reduced[i] = _compiled_reduction(red, other)(x)
        else:
            reduced[i] = red(x, other) if other else x
        expand[i] = lambda k, x=x, other=other: jnp.broadcast_to(jnp.expand_dims(k, other), x.shape)
    for i in single:  # full-shape masks: a scalar True would count as one entry
        shape = jnp.shape(flat[i][1])
        expand[i] = lambda k, shape=shape: jnp.ones(shape, bool)
    return _rank_reduced(
        scores, sparsity, reduced, expand, scope, max_sparsity=max_sparsity, name="structured"
    )


@functools.lru_cache(maxsize=64)
def _compiled_reduction(red: Callable[..., jax.Array], axis: tuple[int, ...]) -> Callable:
    """``jax.jit`` of a built-in reduction over ``axis``: called eagerly, its dozen
    element-wise operations (``l2`` rescales by powers of two) compile as one program."""
    return jax.jit(lambda x: red(x, axis))


@jax.jit
def _negative_finite(x: jax.Array) -> jax.Array:
    return jnp.any((x < 0) & jnp.isfinite(x))


def _n_slices(x: Any, ax: tuple[int, ...]) -> int:
    return math.prod(jnp.shape(x)[d] for d in ax)


def _warn_signed(flat: list, idx: list[int], reduce: str) -> None:
    """Warns once when concrete scores of a norm reduction hold a negative finite entry.

    ``-inf`` is not checked: it marks entries to prune first (``jp.drivers``).
    """
    idx = [i for i in idx if not isinstance(flat[i][1], jax.core.Tracer) and jnp.size(flat[i][1])]
    if not idx:
        return
    # Concrete scores closed over by a jit trace would be staged: read them now.
    with jax.ensure_compile_time_eval():
        neg = np.asarray(jnp.stack([_negative_finite(flat[i][1]) for i in idx]))
    if not neg.any():
        return
    names = [path_str(flat[i][0]) for i, n in zip(idx, neg, strict=True) if n]
    warnings.warn(
        f"structured(reduce={reduce!r}) ranks each slice by a norm of its scores, but the "
        f"scores of {names[:5]} hold negative values: a norm ranks -5 above +1, which "
        "inverts signed criteria such as jp.criteria.movement (negative: moving toward 0), "
        "keeping the slices that shrink fastest. Fix: reduce='mean' for signed scores ('l1' "
        "and 'l2' are for nonnegative ones); for raw weights, pass "
        "jp.criteria.magnitude(params) (the same norms, so the same masks).",
        stacklevel=4,
    )
