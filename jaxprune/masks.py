"""Selections: scores + sparsity -> boolean masks with the scores' tree structure.

Every selection prunes an exact number of entries: ``round(s * n)`` per leaf
(:func:`topk`) or in total (:func:`global_topk`), the lowest scores first, ties
broken by flatten order so counts stay exact even when all scores are equal.
A Python ``s`` rounds as Python's ``round(s * n)``; a traced ``s`` is float32,
and the exact product of that float32 with ``n`` is rounded (ties to even), so
where ``s * n`` is a half-integer (``0.98 * 25``) the two can differ by one.
Nothing here sorts: the k-th smallest score comes from the exact search in
:mod:`jaxprune._search` (O(N) per probe, a handful of probes, and on sharded
arrays each probe is a reduction, not a gather).

Masks stored at one bit per entry (:func:`pack`, :func:`unpack`,
:class:`PackedMask`) live in :mod:`jaxprune.bitmask`; the checks of a
sparsity argument and its exact counts, in :mod:`jaxprune._counts`;
:func:`apply_masks` and the checks of a mask tree against the params, in
:mod:`jaxprune._mask_apply`.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import ArrayLike

from jaxprune._counts import (
    _cap,
    _check_global_total,
    _check_max_sparsity,
    _check_sparsity,
    _count,
    _per_leaf_sparsity,
    warn_nothing_selected,
)
from jaxprune._keys import _half_of, _keys_as, _score_keys
from jaxprune._mask_apply import apply_masks
from jaxprune._search import (
    _explicit_axes,
    _flat_index,
    _select,
    _select_scores,
    kth_smallest_keys,
    ordered_keys,
    select_cut,
    select_keys,
)
from jaxprune._tree import (
    Where,
    check_where,
    flagged,
    leaves_with_paths,
    mirrors_variables,
    path_str,
    prunable_flags,
)
from jaxprune.bitmask import PackedMask, _has_packed, pack, unpack

__all__ = [
    "topk",
    "global_topk",
    "apply_masks",
    "sparsity",
    "kth_smallest_keys",
    "ordered_keys",
    "PackedMask",
    "pack",
    "unpack",
    "fused_select",
    "structured",
    "nm",
    "blocks",
    "patterns",
    "pattern_library",
    "per_layer",
]


def _assemble(scores: Any, flags: list[bool], keeps: dict[int, jax.Array]) -> Any:
    flat, treedef = leaves_with_paths(scores)
    leaves = []
    for i, (_, x) in enumerate(flat):
        leaves.append(keeps[i].reshape(jnp.shape(x)) if i in keeps else jnp.ones((), bool))
    return jax.tree.unflatten(treedef, leaves)


@mirrors_variables
def topk(scores: Any, sparsity: Any, *, where: Where | None = None) -> Any:
    """Returns bool masks keeping the top ``1 - sparsity`` scores of each prunable leaf.

    Exactly ``round(sparsity * leaf.size)`` entries of each leaf selected by
    ``where`` are pruned (``False``): the lowest scores, ties broken by flatten
    order. Scores are ranked by their float32 bits (:func:`ordered_keys`), so
    ``-0.0`` ranks below ``+0.0`` and is pruned first: they do not tie (this
    matters for signed criteria, e.g. the movement score of a zero weight).
    bfloat16 and float16 scores rank as their float32 values do, and are
    searched on 16-bit keys of the same order (same masks, fewer probes).
    Leaves not selected get a scalar ``True`` (keep everything). A concrete
    sparsity below 1 that rounds to a whole leaf (0.95 of 10 entries) prunes
    all of it, with a warning naming the leaf.

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
    masks, emptied = _topk(scores, sparsity, where)
    warn_nothing_selected("jp.masks.topk", scores, prunable_flags(scores, where), sparsity)
    if emptied:
        warnings.warn(
            f"topk prunes every entry of {', '.join(emptied[:5])}"
            f"{f' and {len(emptied) - 5} more leaves' if len(emptied) > 5 else ''}: a sparsity "
            "below 1 rounds to all of a small leaf (round(sparsity * size) = size), so that layer "
            "passes nothing on. Fix: leave small leaves out with where=, a lower sparsity, or "
            "global_topk(..., max_sparsity=0.99), which caps what any one leaf loses.",
            stacklevel=2,
        )
    return masks


def _topk(scores: Any, sparsity: Any, where: Where | None) -> tuple[Any, list[str]]:
    """Returns :func:`topk`'s masks, and the leaves a concrete sparsity below 1 empties
    (for the warning, which callers selecting something else than leaves skip)."""
    flags = prunable_flags(scores, where)
    per_leaf = _per_leaf_sparsity(scores, sparsity, flags)
    flat, _ = leaves_with_paths(scores)
    keeps, emptied = {}, []
    for i, ((path, x), f, s) in enumerate(zip(flat, flags, per_leaf, strict=True)):
        if f:
            keeps[i] = _select_scores([x], _count(s, x.size))[0]
            if _rounds_to_all(s, x.size):
                emptied.append(f"{path_str(path)!r} ({x.size} entries at sparsity {float(s)})")
    return _assemble(scores, flags, keeps), emptied


def _rounds_to_all(s: Any, n: int) -> bool:
    """Whether a concrete sparsity below 1 prunes all ``n`` entries (``round(s * n) == n``)."""
    if isinstance(s, jax.core.Tracer) or n == 0:
        return False
    return float(s) < 1.0 and round(float(s) * n) == n


@mirrors_variables
def global_topk(
    scores: Any,
    sparsity: ArrayLike,
    *,
    where: Where | None = None,
    max_sparsity: float | None = None,
) -> Any:
    """Returns bool masks keeping the top ``1 - sparsity`` scores across all prunable leaves.

    Exactly ``round(sparsity * N)`` entries are pruned in total, ``N`` the
    number of entries in the leaves selected by ``where``; the lowest scores go
    first whatever leaf holds them, ties broken by flatten order (``-0.0``
    ranks below ``+0.0``, as in :func:`topk`). Found without sorting (see the
    module docstring), so it scales to tens of millions of entries and to
    sharded arrays.

    The counts are int32: ``N`` may be at most ``2**31 - 1`` in total, even
    when every leaf is smaller (three 1B-entry kernels are refused with a
    ``ValueError``). Beyond that, select per layer (:func:`topk`,
    :func:`per_layer`, ``jp.prune(scope="layer")``) or call ``global_topk``
    on groups of leaves (``where=``), each under the limit.

    With ``max_sparsity``, no leaf loses more than ``floor(max_sparsity *
    leaf.size)`` entries: the lowest scores still go first, skipping leaves
    already at their cap, so a layer of small weights is never emptied; the
    total is then ``min(round(sparsity * N), sum of the caps)``. As a
    ``jp.prune`` scope: ``functools.partial(jp.masks.global_topk,
    max_sparsity=0.99)``.

    Args:
      scores: a pytree of scores.
      sparsity: fraction in ``[0, 1]`` to prune (may be traced).
      where: predicate ``(path, leaf) -> bool``; default floating ``ndim >= 2``.
      max_sparsity: the largest fraction of any one leaf to prune, a Python
        number in ``[0, 1]``; ``None`` (default) for no cap.

    Returns:
      A tree of bool arrays with exactly the structure of ``scores``.

    Raises:
      ValueError: the selected leaves hold more than ``2**31 - 1`` entries in
        total, or an argument is out of range.

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> m = jp.masks.global_topk({"a": jnp.ones((2, 2)), "b": 2 * jnp.ones((2, 2))}, 0.5)
      >>> int(m["a"].sum()), int(m["b"].sum())
      (0, 4)

    References:
      Frankle & Carbin, "The Lottery Ticket Hypothesis", 2019 (global pruning).
      https://arxiv.org/abs/1803.03635
    """
    _check_sparsity(sparsity, tree_ok=False)
    _check_max_sparsity(max_sparsity, "max_sparsity", "leaf", "entries")
    flags = prunable_flags(scores, where)
    warn_nothing_selected("jp.masks.global_topk", scores, flags, sparsity)
    flat, _ = leaves_with_paths(scores)
    idx = [i for i, f in enumerate(flags) if f and jnp.size(flat[i][1])]
    leaves = [jnp.asarray(flat[i][1]) for i in idx]
    n = sum(x.size for x in leaves)
    _check_global_total(n)
    # The scores are stored already, so their keys are stored once too: reading
    # stored keys at each probe beats recomputing them (~25% at 100M scores).
    count = _count(sparsity, n)
    if not leaves:
        kept = []
    elif max_sparsity is None:
        kept = _select_scores(leaves, count)
    else:
        caps = tuple(_cap(max_sparsity, x.size) for x in leaves)
        kept = _capped_select(leaves, caps, count)
    return _assemble(scores, flags, {**_empty(flat, flags), **dict(zip(idx, kept, strict=True))})


@functools.partial(jax.jit, static_argnums=(1,))
def _capped_select(leaves: list[jax.Array], caps: tuple[int, ...], count: Any) -> list[jax.Array]:
    """:func:`global_topk`'s keep-masks with at most ``caps[i]`` pruned in leaf ``i``.

    One program: called eagerly, the keys' element-wise operations and the
    per-leaf cap searches would otherwise compile one small program each per
    leaf shape (235 for a ResNet-50's 54 kernels).
    """
    keys = _capped_keys(_score_keys(leaves), list(caps))
    return _select(keys, jnp.minimum(count, sum(caps)))


def _capped_keys(keys: list[jax.Array], caps: list[int]) -> list[jax.Array]:
    """Returns ``keys`` with all but the ``cap`` smallest of each raised to the largest key.

    A global search for at most ``sum(caps)`` entries then takes, in order, the
    lowest keys of leaves below their cap: the greedy order that skips full
    leaves (ties by flatten order, as everywhere). The allowed keys stop one
    below the largest, so a NaN whose bits are all ones (the one score whose
    key is the largest) still ranks below every raised entry.
    """
    top = jnp.uint32(0xFFFFFFFF)
    out = []
    for k, cap in zip(keys, caps, strict=True):
        allowed = ~_select([k], jnp.int32(cap))[0].reshape(k.shape)
        out.append(jnp.where(allowed, jnp.minimum(k, top - 1), top))
    return out


def _empty(flat: list, flags: list[bool]) -> dict[int, jax.Array]:
    """All-True masks for the prunable leaves with no entries (left out of a global search)."""
    return {
        i: jnp.ones(jnp.shape(x), bool)
        for i, ((_, x), f) in enumerate(zip(flat, flags, strict=True))
        if f and math.prod(jnp.shape(x)) == 0
    }


def fused_select(
    scope: str,
    score_fn: Any,
    src: Any,
    sparsity: Any,
    flags: list[bool],
    *,
    leaf_srcs: list[Any] | None = None,
    depths: list[int] | None = None,
    max_sparsity: float | None = None,
) -> Any:
    """Returns ``topk`` (``scope="layer"``) or ``global_topk`` masks of ``score_fn(src)``.

    The same masks, exactly, but the scores are never stored: ``score_fn`` is
    traced at each place that reads them and XLA fuses it into the counts, so
    a refresh adds no full-size scratch buffer to the train step that holds it
    (:func:`jaxprune.prune` uses this for element-wise criteria such as
    magnitude and saliency). ``score_fn`` must be element-wise and cheap, and
    is evaluated once per search probe. ``flags`` marks the prunable leaves of
    the scores (flatten order). Call it under ``jax.jit``.

    ``leaf_srcs`` (``scope="layer"``, or a capped global search's per-leaf
    cuts): one source per leaf of the scores, such that
    ``score_fn(leaf_srcs[i])`` is leaf ``i``'s scores (for an
    element-wise criterion, the ``(param, grad)`` arrays of that leaf). Each
    leaf's search then traces its own leaf only, not the whole tree at every
    probe, which keeps tracing linear in the number of leaves (the whole-tree
    form costs ``O(leaves**2)``: 42 s to lower an 80-layer MLP's step).

    ``depths`` (with ``leaf_srcs``): the number of leading layer axes of each
    leaf (0: not stacked), as :func:`per_layer` counts them. A stacked leaf's
    layers are searched at once under ``jax.vmap``, each with its own exact
    count: the masks of ``per_layer(topk)``; with ``max_sparsity``, each
    layer is capped apart: the masks of ``per_layer(partial(global_topk,
    max_sparsity=c))``.

    ``max_sparsity`` (``scope="global"`` only): ``global_topk``'s per-leaf cap.
    Each leaf's (or layer's) ``cap`` lowest entries are found first, by one
    fused search per leaf (through ``leaf_srcs`` when given), as two numbers
    (a threshold key and the last tied position) rather than a mask; the
    global search then reads the recomputed keys, those past their cap
    raised to the largest key. On arrays with Explicit mesh axes the scores
    are stored and :func:`global_topk` runs (refused with ``depths``).

    Args:
      scope: ``"layer"`` (exact count per leaf, as :func:`topk`) or ``"global"``
        (exact total count, as :func:`global_topk`); anything else raises.
      score_fn: an element-wise, cheap function ``src -> scores`` (a pytree of
        score arrays), e.g. ``jp.criteria.magnitude``.
      src: the pytree ``score_fn`` is applied to (e.g. the params, or ``(params,
        grads)``).
      sparsity: fraction in ``[0, 1]`` to prune (may be traced; a traced value is
        clipped to ``[0, 1]``): with ``scope="layer"`` a scalar or a tree of scalars
        with the scores' structure, with ``scope="global"`` one number.
      flags: one bool per leaf of the scores (flatten order), ``True`` for the
        prunable leaves; the others get a scalar ``True`` mask.
      leaf_srcs: one source per leaf of the scores (see above); default ``None``:
        every search traces ``score_fn(src)`` whole.
      depths: one int per leaf of the scores, its number of leading layer axes (0:
        not stacked); needs ``leaf_srcs`` and ``scope="layer"`` or
        ``max_sparsity``. Default ``None``: no leaf is stacked.
      max_sparsity: a Python number in ``[0, 1]``, the largest fraction of one leaf
        (or layer) pruned, ``scope="global"`` only; default ``None``: no cap.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxprune as jp
      >>> p = {"a": jnp.array([[1.0, -2.0]]), "b": jnp.array([[3.0, -4.0]])}
      >>> sel = jax.jit(lambda p, scope: jp.masks.fused_select(
      ...     scope, jp.criteria.magnitude, p, 0.5, [True, True]), static_argnums=1)
      >>> [m.tolist() for m in sel(p, "layer").values()]  # = jp.masks.topk(|p|, 0.5)
      [[[False, True]], [[False, True]]]
      >>> [m.tolist() for m in sel(p, "global").values()]  # = jp.masks.global_topk(|p|, 0.5)
      [[[False, False]], [[True, True]]]
      >>> capped = jax.jit(lambda p: jp.masks.fused_select(  # at most half of each leaf
      ...     "global", jp.criteria.magnitude, p, 0.75, [True, True], max_sparsity=0.5))
      >>> [m.tolist() for m in capped(p).values()]
      [[[False, True]], [[False, True]]]
    """
    if max_sparsity is not None and scope != "global":
        raise ValueError(
            f"fused_select: max_sparsity caps a global search, got scope={scope!r}. Fix: "
            "scope='global', or no max_sparsity (a per-layer search prunes its own count)."
        )
    _check_max_sparsity(max_sparsity, "max_sparsity", "leaf", "entries")
    capped_global = scope == "global" and max_sparsity is not None
    if depths is not None and ((scope != "layer" and not capped_global) or leaf_srcs is None):
        raise ValueError(
            f"fused_select: depths (stacked layers searched apart) needs scope='layer' (or a "
            f"capped global search) and leaf_srcs, got scope={scope!r} and leaf_srcs="
            f"{'None' if leaf_srcs is None else '...'}. Fix: pass leaf_srcs (one source per "
            "leaf), or no depths."
        )
    shapes = jax.eval_shape(score_fn, src)
    flat, _ = leaves_with_paths(shapes)
    idx = [i for i, f in enumerate(flags) if f]
    if depths is not None and len(depths) != len(flat):
        raise ValueError(
            f"fused_select: depths has {len(depths)} entries for {len(flat)} leaves of the "
            "scores. Fix: one number of leading layer axes per leaf (0: not stacked)."
        )

    def keys_of(chosen, half):
        # half: the 16-bit dtype of the pool the keys are searched in, if any (_half_of).
        def fn(s):
            leaves = [x for _, x in leaves_with_paths(score_fn(s))[0]]
            return [_keys_as(leaves[i], half) for i in chosen]

        return fn

    size = {i: math.prod(flat[i][1].shape) for i in idx}

    def half_of(chosen):
        return _half_of(flat[i][1].dtype for i in chosen)

    if scope == "layer":
        per_leaf = _per_leaf_sparsity(shapes, sparsity, flags)
        if leaf_srcs is not None:

            def leaf_keys(s):
                return _score_keys([score_fn(s)])

            def layers_keep(src, k, count):
                # Sources cut into their layers, one batched search over them.
                src = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[k:]), src)
                return jax.vmap(lambda s, c: select_keys(leaf_keys, s, c)[0], (0, None))(src, count)

            keeps = {}
            for i in idx:
                k = depths[i] if depths else 0
                if k and size[i]:
                    count = _count(per_leaf[i], math.prod(flat[i][1].shape[k:]))
                    keeps[i] = layers_keep(leaf_srcs[i], k, count)
                else:
                    keeps[i] = select_keys(leaf_keys, leaf_srcs[i], _count(per_leaf[i], size[i]))[0]
        else:
            keeps = {
                i: select_keys(keys_of([i], half_of([i])), src, _count(per_leaf[i], size[i]))[0]
                for i in idx
            }
    elif scope == "global":
        _check_sparsity(sparsity, tree_ok=False)
        n = sum(size.values())
        _check_global_total(n)
        idx = [i for i in idx if size[i]]
        count = _count(sparsity, n)
        half = half_of(idx)
        keys_fn = keys_of(idx, half)
        if max_sparsity is not None and _explicit_axes(src) is not None:
            # Explicit mesh axes: the stored scores' capped search, which runs
            # its searches with those axes made Auto.
            if depths is not None and any(depths):
                raise ValueError(
                    "fused_select: a capped global search with depths (per-layer caps of "
                    "stacks) on arrays with Explicit mesh axes is not fused. Fix: call "
                    "jp.masks.per_layer(functools.partial(jp.masks.global_topk, "
                    "max_sparsity=c), stacked=...) on the stored scores."
                )
            scores = score_fn(src)
            where = flagged(scores, flags)
            return global_topk(scores, sparsity, where=where, max_sparsity=max_sparsity)
        if max_sparsity is not None and idx:
            # Each layer of a stack (depths) is capped apart, as per_layer's cut would.
            layers = {i: math.prod(flat[i][1].shape[: depths[i]]) if depths else 1 for i in idx}
            caps = [_cap(max_sparsity, size[i] // layers[i]) for i in idx]
            deep = [depths[i] if depths else 0 for i in idx]
            keys_fn = _capped_keys_fn(
                functools.partial(keys_of, half=half),
                lambda s: _keys_as(score_fn(s), half),
                src,
                leaf_srcs,
                idx,
                caps,
                deep,
                shapes=flat,
                base=count,
            )
            count = jnp.minimum(count, sum(c * layers[i] for i, c in zip(idx, caps, strict=True)))
        kept = select_keys(keys_fn, src, count) if idx else []
        keeps = {**_empty(flat, flags), **dict(zip(idx, kept, strict=True))}
    else:
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}.")
    return _assemble(shapes, flags, keeps)


def _capped_keys_fn(keys_of, leaf_keys, src, leaf_srcs, idx, caps, deep, *, shapes, base):
    """Returns the global search's keys with entries past their leaf's cap raised to the top.

    As :func:`_capped_keys`, but each leaf's ``cap`` lowest entries are marked
    by two scalars from a per-leaf search (:func:`~jaxprune._search.select_cut`)
    and tested where the keys are recomputed, so no mask is stored. A leaf
    with ``deep[j] > 0`` leading layer axes is capped per layer: one vmapped
    search over its layers (``leaf_srcs`` needed), two scalars per layer.
    ``base``: the global count to prune, which salts the per-leaf reads.
    ``keys_of(chosen)`` and ``leaf_keys(leaf_src)`` give keys in the global
    search's key space (:func:`~jaxprune._keys._keys_as`), so that each
    leaf's cut compares with the keys the global search reads.
    """
    top = jnp.uint32(0xFFFFFFFF)
    cuts = []
    for i, cap, d in zip(idx, caps, deep, strict=True):
        shape = shapes[i][1].shape
        if cap >= math.prod(shape[d:]) or cap == 0:
            cuts.append(cap)  # the whole leaf (every layer) may go, or none of it
            continue
        if leaf_srcs is None:
            cuts.append((*select_cut(keys_of([i]), src, cap, base), 0))
            continue

        def cut(s, cap=cap):
            return select_cut(lambda s: [leaf_keys(s)], s, cap, base)

        if not d:
            cuts.append((*cut(leaf_srcs[i]), 0))
            continue
        # The layers of a stack, cut apart and searched at once.
        layers = jax.tree.map(lambda a, d=d: a.reshape((-1,) + a.shape[d:]), leaf_srcs[i])
        t, last = jax.vmap(cut)(layers)
        rest = (1,) * (len(shape) - d)
        cuts.append((t.reshape(shape[:d] + rest), last.reshape(shape[:d] + rest), d))

    def keys_fn(s):
        out = []
        for k, cut in zip(keys_of(idx)(s), cuts, strict=True):
            if isinstance(cut, int):
                out.append(jnp.minimum(k, top - 1) if cut else jnp.full_like(k, top))
                continue
            t, last, d = cut
            if d:
                # Position within each layer, read only where k == t: the test then
                # depends on the keys, so XLA does not hoist an [L, ...] mask out of
                # the search (0.25x the stack's bytes against 0.33x at L=6).
                pos = jnp.where(k == t, _flat_index(k.shape[d:], 0), jnp.iinfo(jnp.int32).max)
                lowest = (k < t) | (pos <= last)
            else:
                lowest = (k < t) | ((k == t) & (_flat_index(k.shape, 0) <= last))
            out.append(jnp.where(lowest, jnp.minimum(k, top - 1), top))  # as _capped_keys
        return out

    return keys_fn


def sparsity(tree: Any, *, where: Where | None = None) -> jax.Array:
    """Returns the fraction of zeros (or ``False``) over the prunable leaves of ``tree``.

    Works on params (counts exact zeros) and on masks (counts ``False``) of the
    params' shapes: a scalar mask counts as one entry, so broadcast masks first
    (``jp.get_masks`` and the drivers' ``Round.masks`` have the params' shapes on
    the prunable leaves). The
    default ``where`` selects leaves with ``ndim >= 2`` (floating or bool),
    except ``[n, 1, ..., 1]`` biases as :func:`jaxprune.is_prunable` does. An
    explicit ``where`` may also select integer and complex leaves (quantized
    weights): this only counts zeros, it prunes nothing. On masks, an explicit
    ``where`` that refuses a bool leaf is asked again about a float32 leaf of its
    shape (the weight it masks), so a ``where`` written for params, such as
    ``lambda path, x: path[-1] != "bias" and jp.is_prunable(path, x)``, counts
    the masks it would prune. An nnx ``Module``
    counts its ``nnx.Param`` state, a shared weight once.

    A tree with no leaf counted (no kernels: only biases, scalar masks, or
    ``{}``) gives ``0.0``. If the default ``where`` counted nothing but passed
    over integer or complex leaves with ``ndim >= 2``, that ``0.0`` would read
    as "dense" for a quantized model, so a warning names those leaves.

    Args:
      tree: params or masks (a pytree of arrays), packed masks (e.g. a
        ``PruneState``'s ``packed_masks``, unpacked first), or an nnx ``Module``.
      where: predicate ``(path, leaf) -> bool`` choosing the leaves counted; default
        ``None``: leaves with ``ndim >= 2``, floating or bool, except
        ``[n, 1, ..., 1]`` biases.

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> float(jp.sparsity({"w": jnp.array([[0., 1.], [0., 0.]]), "b": jnp.zeros(2)}))
      0.75
      >>> q = {"kernel_q": jnp.array([[0, 3], [0, -2]], jnp.int8)}  # int8 weights
      >>> float(jp.sparsity(q, where=lambda path, x: path[-1] == "kernel_q"))
      0.5
    """
    if isinstance(tree, nnx.Module):
        # The Variables, a tied (shared) one once, as jp.report counts them.
        tree = nnx.state(tree, nnx.Param)
    if _has_packed(tree):
        tree = unpack(tree)  # e.g. a PruneState's packed_masks: count the masks' False
    if where is not None:
        check_where(where)
        where = _as_on_params(where)
    flags = prunable_flags(tree, where, allow_numeric=True)
    flat, _ = leaves_with_paths(tree)
    # Counted per leaf (int32, exact) and summed in float32: a tree over 2**31
    # entries (a multi-billion-parameter model) would overflow one int32 count.
    zeros, total = jnp.float32(0), 0
    for (_, x), f in zip(flat, flags, strict=True):
        if f:
            x = jnp.asarray(x)
            is_zero = x == jnp.zeros((), x.dtype)  # a bool mask's False, a param's 0
            zeros = zeros + jnp.sum(is_zero, dtype=jnp.int32).astype(jnp.float32)
            total += int(jnp.size(x))
    if total == 0:
        if where is None and not any(flags):
            _warn_uncounted(flat)
        return jnp.float32(0.0)
    return zeros / jnp.float32(total)


def _as_on_params(where: Where) -> Where:
    """Returns ``where`` that also asks about a bool leaf as the float weight it masks.

    A mask stands for a float weight, and a ``where`` written for params
    (``jp.is_prunable``, the README's "biases stay dense" predicate) refuses
    bool leaves: on masks it would count nothing and return 0.0.
    """

    def on_params(path, x):
        if where(path, x):
            return True
        if hasattr(x, "dtype") and jnp.result_type(x) == jnp.bool_:
            return bool(where(path, jax.ShapeDtypeStruct(np.shape(x), jnp.float32)))
        return False

    return on_params


def _warn_uncounted(flat: list) -> None:
    """Warns when the default ``where`` passed over integer or complex leaves of ``ndim >= 2``.

    Only when nothing else was counted: the bare ``0.0`` of a quantized model
    would read as "no zeros". Trees with no such leaf (biases only, ``{}``)
    stay silent: ``0.0`` is their answer.
    """
    skipped = [
        f"{path_str(p)!r} ({jnp.result_type(x)})"
        for p, x in flat
        if hasattr(x, "dtype")
        and np.ndim(x) >= 2
        and jnp.issubdtype(jnp.result_type(x), jnp.number)
        and not jnp.issubdtype(jnp.result_type(x), jnp.floating)
    ]
    if skipped:
        warnings.warn(
            f"jp.sparsity counted no leaf and returns 0.0: by default it counts floating and "
            f"bool leaves with ndim >= 2, and passed over {', '.join(skipped[:5])}"
            f"{' ...' if len(skipped) > 5 else ''}. Fix: to count the zeros of integer "
            "(quantized) weights, pass where=, e.g. jp.sparsity(tree, where=lambda path, x: "
            "x.ndim >= 2).",
            stacklevel=3,
        )


from jaxprune.stacked import per_layer  # noqa: E402
from jaxprune.structured import blocks, nm, pattern_library, patterns, structured  # noqa: E402
