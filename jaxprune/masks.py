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
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from jax.typing import ArrayLike

from jaxprune._search import (
    _explicit_axes,
    _flat_index,
    _on_auto_axes,
    _select,
    kth_smallest_keys,
    ordered_keys,
    select_cut,
    select_keys,
)
from jaxprune._tree import (
    Where,
    check_same_structure,
    flagged,
    leaves_with_paths,
    path_str,
    prunable_flags,
)

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


def _count(s: Any, n: int) -> jax.Array:
    """Returns round(s * n) as int32: Python's, for concrete s; exact, for traced float32 s.

    A traced ``s`` outside ``[0, 1]`` is clipped to it, and a traced NaN
    prunes nothing (a concrete one is refused by :func:`_check_sparsity`).
    """
    if not isinstance(s, jax.core.Tracer):
        return jnp.int32(round(float(s) * n))
    s = jnp.asarray(s, jnp.float32)
    return _round_product(jnp.clip(jnp.where(jnp.isnan(s), 0.0, s), 0.0, 1.0), n)


def _round_product(s: jax.Array, n: int) -> jax.Array:
    """Returns ``round(s * n)`` (ties to even) for float32 ``s`` in [0, 1] and ``n < 2**31``.

    Exact: ``s * n`` in float32 has only 24 significant bits, so from about a
    million entries it would miss the count by one. ``s = m / 2**shift`` with
    an integer mantissa ``m < 2**24``, so ``m * n`` is formed exactly in 16-bit
    limbs of uint32 and shifted right with round-half-even.
    """
    if not 0 <= n < 2**31:
        raise ValueError(f"n must be in [0, 2**31) (entries of int32-indexed leaves), got {n}.")
    u32 = jnp.uint32
    bits = jax.lax.bitcast_convert_type(s, u32)
    e = (bits >> 23) & u32(0xFF)
    m = (bits & u32(0x7FFFFF)) | jnp.where(e > 0, u32(1 << 23), u32(0))
    shift = (u32(150) - jnp.maximum(e, u32(1))).astype(jnp.int32)  # s = m / 2**shift, >= 23
    m0, m1 = m & u32(0xFFFF), m >> 16
    n0, n1 = u32(n & 0xFFFF), u32(n >> 16)
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
    for i, ((_, x), f, s) in enumerate(zip(flat, flags, per_leaf, strict=True)):
        if f:
            keeps[i] = _select([ordered_keys(x)], _count(s, x.size))[0]
    return _assemble(scores, flags, keeps)


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
    first whatever leaf holds them, ties broken by flatten order. Found without
    sorting (see the module docstring), so it scales to tens of millions of
    entries and to sharded arrays.

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
    flat, _ = leaves_with_paths(scores)
    idx = [i for i, f in enumerate(flags) if f and jnp.size(flat[i][1])]
    leaves = [jnp.asarray(flat[i][1]) for i in idx]
    n = sum(x.size for x in leaves)
    # The scores are stored already, so their keys are stored once too: reading
    # stored keys at each probe beats recomputing them (~25% at 100M scores).
    keys = [ordered_keys(x) for x in leaves]
    count = _count(sparsity, n)
    if max_sparsity is not None and leaves:
        caps = [_cap(max_sparsity, x.size) for x in leaves]
        keys = _capped_keys(keys, caps)
        count = jnp.minimum(count, sum(caps))
    kept = _select(keys, count) if leaves else []
    return _assemble(scores, flags, {**_empty(flat, flags), **dict(zip(idx, kept, strict=True))})


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


def _capped_keys(keys: list[jax.Array], caps: list[int]) -> list[jax.Array]:
    """Returns ``keys`` with all but the ``cap`` smallest of each raised to the largest key.

    A global search for at most ``sum(caps)`` entries then takes, in order, the
    lowest keys of leaves below their cap: the greedy order that skips full
    leaves (ties by flatten order, as everywhere). Only a NaN whose bits are all
    ones shares the largest key.
    """
    top = jnp.uint32(0xFFFFFFFF)
    out = []
    for k, cap in zip(keys, caps, strict=True):
        allowed = ~_select([k], jnp.int32(cap))[0].reshape(k.shape)
        out.append(jnp.where(allowed, k, top))
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

    def keys_of(chosen):
        def fn(s):
            leaves = [x for _, x in leaves_with_paths(score_fn(s))[0]]
            return [ordered_keys(leaves[i]) for i in chosen]

        return fn

    size = {i: math.prod(flat[i][1].shape) for i in idx}
    if scope == "layer":
        per_leaf = _per_leaf_sparsity(shapes, sparsity, flags)
        if leaf_srcs is not None:

            def leaf_keys(s):
                return [ordered_keys(score_fn(s))]

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
                i: select_keys(keys_of([i]), src, _count(per_leaf[i], size[i]))[0] for i in idx
            }
    elif scope == "global":
        _check_sparsity(sparsity, tree_ok=False)
        n = sum(size.values())
        idx = [i for i in idx if size[i]]
        count = _count(sparsity, n)
        keys_fn = keys_of(idx)
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
                keys_of, score_fn, src, leaf_srcs, idx, caps, deep, shapes=flat, base=count
            )
            count = jnp.minimum(count, sum(c * layers[i] for i, c in zip(idx, caps, strict=True)))
        kept = select_keys(keys_fn, src, count) if idx else []
        keeps = {**_empty(flat, flags), **dict(zip(idx, kept, strict=True))}
    else:
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}.")
    return _assemble(shapes, flags, keeps)


def _capped_keys_fn(keys_of, score_fn, src, leaf_srcs, idx, caps, deep, *, shapes, base):
    """Returns the global search's keys with entries past their leaf's cap raised to the top.

    As :func:`_capped_keys`, but each leaf's ``cap`` lowest entries are marked
    by two scalars from a per-leaf search (:func:`~jaxprune._search.select_cut`)
    and tested where the keys are recomputed, so no mask is stored. A leaf
    with ``deep[j] > 0`` leading layer axes is capped per layer: one vmapped
    search over its layers (``leaf_srcs`` needed), two scalars per layer.
    ``base``: the global count to prune, which salts the per-leaf reads.
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
            return select_cut(lambda s: [ordered_keys(score_fn(s))], s, cap, base)

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
                out.append(k if cut else jnp.full_like(k, top))
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
            out.append(jnp.where(lowest, k, top))
        return out

    return keys_fn


@dataclasses.dataclass(frozen=True)
class PackedMask:
    """A bool mask stored at one bit per entry: 8 consecutive entries of one axis per byte.

    The packed axis is the first one whose length is a multiple of 8,
    preferring any axis but the last (every common kernel has one), split in
    place into bytes: the other axes, and their sharding, stay as they are,
    and no padding is needed. A mask with no such axis is flattened and
    padded to a whole byte instead.

    Attributes:
      bits: uint8; ``shape`` with the packed axis divided by 8 (or 1-D,
        ``ceil(size / 8)``, when ``axis`` is None). Bit ``j`` of byte ``b`` is
        entry ``8 * b + j`` along the packed axis.
      shape: the mask's shape (static).
      axis: the packed axis, or None for flattened (static).
    """

    bits: jax.Array
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    axis: int | None = dataclasses.field(default=None, metadata=dict(static=True))


jax.tree_util.register_dataclass(PackedMask, data_fields=["bits"], meta_fields=["shape", "axis"])

_BIT = tuple(1 << j for j in range(8))


def _pack_axis(shape: tuple[int, ...]) -> int | None:
    # A major axis first: unpacking then runs along the full, contiguous last
    # axis (vectorizes; ~3x faster on CPU than bytes along the last axis).
    for axis in list(range(len(shape) - 1)) + [len(shape) - 1]:
        if shape[axis] % 8 == 0:
            return axis
    return None


def _pack_leaf(m: Any) -> Any:
    m = jnp.asarray(m, bool)
    if m.ndim == 0:
        return m
    shape, axis = tuple(m.shape), _pack_axis(m.shape)
    found = _explicit_axes(m)
    if found is not None:
        # Sharding in types: splitting a sharded axis into bytes is a reshape
        # that needs its output sharding spelled out (see _packed_sharding).
        out = _packed_sharding(jax.typeof(m).sharding, shape, axis, found[0])
        bits = _on_auto_axes(lambda x: _pack_bits(x, axis), found[1], out, m)
        return PackedMask(bits, shape, axis)
    return PackedMask(_pack_bits(m, axis), shape, axis)


def _pack_bits(m: jax.Array, axis: int | None) -> jax.Array:
    """Returns the :class:`PackedMask` bits of the bool ``m`` packed along ``axis``."""
    shape = tuple(m.shape)
    if axis is None:
        flat = m.reshape(-1)
        m = jnp.pad(flat, (0, -flat.size % 8), constant_values=True)
        split = m.reshape(-1, 8)
        weights = jnp.asarray(_BIT, jnp.uint8)
        return jnp.sum(split.astype(jnp.uint8) * weights, axis=1, dtype=jnp.uint8)
    split = m.reshape(shape[:axis] + (shape[axis] // 8, 8) + shape[axis + 1 :])
    weights = jnp.asarray(_BIT, jnp.uint8).reshape((8,) + (1,) * (m.ndim - axis - 1))
    return jnp.sum(split.astype(jnp.uint8) * weights, axis=axis + 1, dtype=jnp.uint8)


def _packed_sharding(sharding: Any, shape: tuple[int, ...], axis: int | None, mesh: Any) -> Any:
    """Returns the sharding of the bits packing a mask of ``shape`` typed with ``sharding``.

    For explicitly sharded masks (arrays typed with Explicit mesh axes, see
    https://docs.jax.dev/en/latest/notebooks/explicit-sharding.html). The
    bits keep the mask's partition spec: every other axis as it is, and the
    packed axis too when its ``shape[axis] / 8`` bytes still divide evenly
    over its devices (else that axis is replicated). Flattened bits
    (``axis is None``) are replicated.
    """
    if axis is None:
        return NamedSharding(mesh, PartitionSpec())
    spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    entry = spec[axis]
    names = () if entry is None else entry if isinstance(entry, tuple) else (entry,)
    if (shape[axis] // 8) % math.prod(mesh.shape[n] for n in names):
        spec[axis] = None
    return NamedSharding(mesh, PartitionSpec(*spec))


def _unpack_leaf(p: Any) -> Any:
    if not isinstance(p, PackedMask):
        return p
    found = _explicit_axes(p.bits)
    if found is not None:
        # The mask keeps the bits' spec (a packed axis sharded over k devices
        # unpacks to 8x as many entries, still even); flattened bits unpack
        # replicated.
        mesh, axes = found
        spec = jax.typeof(p.bits).sharding.spec if p.axis is not None else PartitionSpec()
        out = NamedSharding(mesh, spec)
        return _on_auto_axes(lambda b: _unpack_bits(b, p.shape, p.axis), axes, out, p.bits)
    return _unpack_bits(p.bits, p.shape, p.axis)


def _unpack_bits(bits: jax.Array, shape: tuple[int, ...], axis: int | None) -> jax.Array:
    """Returns the bool mask of ``shape`` stored in ``bits`` packed along ``axis``.

    ``bits`` may carry leading axes (a state built with ``jax.vmap(tx.init)``,
    an ensemble): the masks then have them too.
    """
    want = _bits_shape(shape, axis)
    lead = jnp.ndim(bits) - len(want)
    if lead < 0 or tuple(jnp.shape(bits)[lead:]) != want:
        raise ValueError(
            f"packed mask bits of shape {tuple(jnp.shape(bits))} do not hold a mask of shape "
            f"{shape} (expected bits of shape {want}, after any leading batch axes). Fix: pass "
            "the PackedMask as jp.prune stored it, unchanged."
        )
    if lead:
        one = functools.partial(_unpack_bits, shape=shape, axis=axis)
        for _ in range(lead):
            one = jax.vmap(one)
        return one(bits)
    if axis is None:
        flat = (bits[:, None] & jnp.asarray(_BIT, jnp.uint8)) != 0
        return flat.reshape(-1)[: math.prod(shape)].reshape(shape)
    trailing = len(shape) - axis - 1
    weights = jnp.asarray(_BIT, jnp.uint8).reshape((8,) + (1,) * trailing)
    return ((jnp.expand_dims(bits, axis + 1) & weights) != 0).reshape(shape)


def _is_packed(x: Any) -> bool:
    return isinstance(x, PackedMask)


def _has_packed(tree: Any) -> bool:
    return any(_is_packed(x) for x in jax.tree.leaves(tree, is_leaf=_is_packed))


def pack(masks: Any) -> Any:
    """Returns ``masks`` with every bool leaf of ``ndim >= 1`` stored as a :class:`PackedMask`.

    One bit per entry instead of one byte; scalar leaves (the ``True`` of a
    non-prunable leaf) stay as they are. :func:`unpack` inverts it exactly.

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> p = jp.masks.pack({"w": jnp.array([[True, False, True]] * 2), "b": jnp.bool_(True)})
      >>> p["w"].bits.shape, p["w"].bits.dtype.name
      ((1,), 'uint8')
      >>> jp.masks.unpack(p)["w"][0].tolist()
      [True, False, True]
    """
    return jax.tree.map(_pack_leaf, masks)


def unpack(packed: Any) -> Any:
    """Returns the bool masks stored in ``packed`` (see :func:`pack`).

    In a state built with ``jax.vmap(tx.init)`` (an ensemble) the packed bits
    and the scalar ``True`` of unpruned leaves carry the members' axis; an
    all-``True`` one comes back as the scalar ``True`` it stands for.

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> masks = {"w": jnp.array([[True, False, True]]), "b": jnp.bool_(True)}
      >>> back = jp.masks.unpack(jp.masks.pack(masks))
      >>> back["w"].tolist(), back["b"].tolist()
      ([[True, False, True]], True)
    """
    leads = {
        tuple(jnp.shape(x.bits)[: jnp.ndim(x.bits) - len(_bits_shape(x.shape, x.axis))])
        for x in jax.tree.leaves(packed, is_leaf=_is_packed)
        if _is_packed(x)
    }
    lead = leads.pop() if len(leads) == 1 else ()

    def one(x):
        if _is_packed(x):
            return _unpack_leaf(x)
        if lead and jnp.shape(x) == lead and not isinstance(x, jax.core.Tracer):
            if jnp.asarray(x).dtype == jnp.bool_ and bool(jnp.all(x)):
                return jnp.ones((), bool)
        return x

    return jax.tree.map(one, packed, is_leaf=_is_packed)


def _bits_shape(shape: tuple[int, ...], axis: int | None) -> tuple[int, ...]:
    """Returns the shape of the bits of a mask of ``shape`` packed along ``axis``."""
    if axis is None:
        return (-(-math.prod(shape) // 8),)
    return tuple(d // 8 if i == axis else d for i, d in enumerate(shape))


def apply_masks(params: Any, masks: Any) -> Any:
    """Returns ``params`` with masked-out entries set to exactly zero (dtype kept).

    Raises:
      ValueError: the trees differ; the message lists the differing paths.

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> jp.apply_masks({"w": jnp.array([1., 2.])}, {"w": jnp.array([True, False])})["w"].tolist()
      [1.0, 0.0]
    """
    if _has_packed(masks):
        raise ValueError(
            "masks are packed (PackedMask leaves, e.g. a PruneState's packed_masks). Fix: pass "
            "jp.masks.unpack(masks), state.masks or jp.get_masks(opt_state)."
        )
    masks = _broadcast_prefix(params, masks)
    check_same_structure(params, masks, ref_name="params", other_name="masks")
    flat_p, treedef = leaves_with_paths(params)
    flat_m, _ = leaves_with_paths(masks)
    out = []
    for (path, p), (_, m) in zip(flat_p, flat_m, strict=True):
        m = jnp.asarray(m)
        if m.dtype != jnp.bool_:
            raise ValueError(
                f"mask for {path_str(path)!r} has dtype {m.dtype}, not bool: True keeps an "
                "entry and False prunes it, and other values would be read as truthiness. "
                "Fix: pass bool masks, e.g. m > 0 for a 0/1 float mask."
            )
        if m.ndim and m.shape != jnp.shape(p):
            raise ValueError(
                f"mask for {path_str(path)!r} has shape {m.shape} but the parameter has "
                f"shape {jnp.shape(p)}. Fix: masks must mirror params leaf by leaf (a scalar "
                "True keeps a whole leaf)."
            )
        out.append(jnp.where(m, p, jnp.zeros((), jnp.result_type(p))))
    return jax.tree.unflatten(treedef, out)


def _broadcast_prefix(params: Any, masks: Any) -> Any:
    """Spreads scalar masks that stand for whole subtrees of ``params`` over their leaves.

    ``jp.get_masks`` of a ``jp.prune`` under ``optax.masked`` has one scalar
    ``True`` where ``optax.masked`` left a whole subtree out. Masks that are not
    such a prefix of ``params`` are returned as they are (and then rejected).
    """
    if jax.tree.structure(masks) == jax.tree.structure(params):
        return masks

    def spread(m, sub):
        if jnp.ndim(m) and not hasattr(sub, "shape"):
            raise ValueError("only a scalar mask may stand for a subtree")
        return jax.tree.map(lambda _: m, sub)

    try:
        return jax.tree.map(spread, masks, params)
    except (ValueError, TypeError):
        return masks


def sparsity(tree: Any, *, where: Where | None = None) -> jax.Array:
    """Returns the fraction of zeros (or ``False``) over the prunable leaves of ``tree``.

    Works on params (counts exact zeros) and on masks (counts ``False``). The
    default ``where`` selects leaves with ``ndim >= 2`` (floating or bool). An
    nnx ``Module`` counts its ``nnx.Param`` state, a shared weight once.

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> float(jp.sparsity({"w": jnp.array([[0., 1.], [0., 0.]]), "b": jnp.zeros(2)}))
      0.75
    """
    if isinstance(tree, nnx.Module):
        # The Variables, a tied (shared) one once, as jp.report counts them.
        tree = nnx.state(tree, nnx.Param)
    if _has_packed(tree):
        tree = unpack(tree)  # e.g. a PruneState's packed_masks: count the masks' False
    flags = prunable_flags(tree, where, allow_bool=True)
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
        return jnp.float32(0.0)
    return zeros / jnp.float32(total)


from jaxprune.stacked import per_layer  # noqa: E402
from jaxprune.structured import blocks, nm, pattern_library, patterns, structured  # noqa: E402
