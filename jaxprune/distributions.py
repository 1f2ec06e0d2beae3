"""Sparsity distributions: how a total sparsity is spread over the prunable leaves.

A distribution is a function ``(params, sparsity, *, where) -> tree of per-leaf
sparsities`` (the params' structure; ``0.0`` for leaves that are not pruned),
whose total pruned fraction over the prunable leaves equals ``sparsity``. Any
distribution becomes a selection for ``jp.prune(..., scope=...)`` with
:func:`selection`; the total may be traced (a schedule's value), so ERK's
re-solve runs with a fixed number of ``jnp`` iterations, never in Python.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxprune import _counts
from jaxprune import masks as _masks
from jaxprune._tree import (
    Where,
    as_float,
    as_int,
    leaves_with_paths,
    mirror_variables,
    mirrors_variables,
    path_str,
    prunable_flags,
)

__all__ = ["uniform", "erk", "explicit", "selection", "per_output"]

Distribution = Callable[..., Any]


def _tree_like(params: Any, values: list[Any]) -> Any:
    """Returns ``values`` in ``params``' tree structure, nnx ``Variable`` s included."""
    _, treedef = leaves_with_paths(params)
    return mirror_variables(params, jax.tree.unflatten(treedef, values))


def uniform(
    params: optax.Params,
    sparsity: Any,
    *,
    where: Where | None = None,
    fixed: Mapping[str, float] | None = None,
) -> optax.Params:
    """Returns ``sparsity`` for every prunable leaf (and ``0.0`` for the others).

    With ``fixed`` (``{path: sparsity}``), those leaves keep their own
    sparsities and the others share the rest of the total evenly, so the total
    still equals ``sparsity``: see :func:`erk`, of which this is the
    ``power_scale=0.0`` case.

    Args:
      params: the params (their values are not read: only the leaves ``where``
        selects, and with ``fixed`` their shapes).
      sparsity: the total fraction to prune, one number in ``[0, 1]`` (may be traced;
        a concrete bool or string is refused).
      where: predicate ``(path, leaf) -> bool`` choosing the prunable leaves;
        default: floating leaves with ``ndim >= 2``.
      fixed: ``{path: sparsity}`` for prunable leaves whose sparsity is set by hand
        (values in ``[0, 1]``, paths as ``jp.path_str`` writes them); default
        ``None``: every prunable leaf gets ``sparsity``.

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> jp.distributions.uniform({"w": jnp.ones((2, 2)), "b": jnp.ones(2)}, 0.5)
      {'b': 0.0, 'w': 0.5}
      >>> p = {"a": jnp.ones((10, 10)), "b": jnp.ones((10, 10))}
      >>> s = jp.distributions.uniform(p, 0.5, fixed={"a": 0.2})
      >>> round(float(s["a"]), 4), round(float(s["b"]), 4)
      (0.2, 0.8)

    References:
      Zhu & Gupta, "To prune, or not to prune", 2017. https://arxiv.org/abs/1710.01878
    """
    _counts._check_sparsity(sparsity, tree_ok=False)
    if fixed is not None:
        return erk(params, sparsity, where=where, power_scale=0.0, fixed=fixed)
    flags = prunable_flags(params, where)
    return _tree_like(params, [sparsity if f else 0.0 for f in flags])


def erk(
    params: optax.Params,
    sparsity: Any,
    *,
    where: Where | None = None,
    power_scale: float = 1.0,
    fixed: Mapping[str, float] | None = None,
) -> optax.Params:
    """Returns Erdos-Renyi-Kernel per-leaf sparsities whose total equals ``sparsity``.

    Leaf ``l`` (shape ``d_1 x ... x d_k``) gets density ``eps * (sum d_i /
    prod d_i) ** power_scale``; ``eps`` is solved so the kept count matches
    the total. A leaf that would exceed density 1 is made dense and ``eps``
    re-solved over the rest, until no leaf overflows (at most one pass per
    leaf, unrolled, so a traced ``sparsity`` works under jit).

    ``fixed`` gives some leaves a sparsity of their own (a first layer kept at
    50%, a classifier at 0%). Those leaves are left out of the solve, and the
    others share what remains of the total, so the total over all prunable
    leaves still equals ``sparsity``. jaxpruner's ``custom_sparsity_map``
    differs: there the other leaves reach ``sparsity`` among themselves, and
    the total moves with the fixed values. When the fixed leaves make the total
    unreachable (they alone prune more than it, or the others cannot make up
    the rest even fully pruned), a concrete ``sparsity`` raises; a traced one
    (a schedule's value inside ``jp.prune``) keeps the others dense, or prunes
    them all, and the total misses ``sparsity`` on those refreshes.

    Args:
      params: the params (only shapes are read).
      sparsity: the total fraction to prune over the prunable leaves (may be traced).
      where: predicate choosing the prunable leaves.
      power_scale: ``1.0`` is ERK; ``0.0`` gives the uniform distribution.
      fixed: ``{path: sparsity}`` for leaves whose sparsity is set by hand,
        with paths as ``jp.path_str`` writes them (``"layers/0/kernel"``).
        Bind it with ``functools.partial`` to use the distribution as a
        ``jp.prune`` scope (through :func:`selection`) or in ``jp.dynamic``.

    Returns:
      A tree with the params' structure of per-leaf sparsities (``0.0`` for
      leaves that are not pruned).

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> p = {"a": jnp.ones((100, 100)), "b": jnp.ones((100, 2))}
      >>> s = jp.distributions.erk(p, 0.5)
      >>> float(s["b"]), round(float(s["a"]), 4)  # the thin layer is kept dense
      (0.0, 0.51)
      >>> p = {"first": jnp.ones((50, 50)), "rest": jnp.ones((100, 100))}
      >>> s = jp.distributions.erk(p, 0.5, fixed={"first": 0.0})  # keep "first" dense
      >>> float(s["first"]), round(float(s["rest"]), 4)  # "rest" makes up the total
      (0.0, 0.625)

    References:
      Evci et al., "Rigging the Lottery: Making All Tickets Winners", 2020.
      https://arxiv.org/abs/1911.11134; Mocanu et al. 2018 (Erdos-Renyi).
      https://arxiv.org/abs/1707.04780
    """
    _counts._check_sparsity(sparsity, tree_ok=False)
    ps = as_float(power_scale)
    if not (math.isfinite(ps) and ps >= 0):
        raise ValueError(
            f"power_scale must be a finite number >= 0, got {power_scale!r}: 1.0 is ERK, 0.0 "
            "the uniform distribution (a negative value would prune the small layers hardest). "
            "Fix: pass a value in [0, 1]."
        )
    flags = prunable_flags(params, where)
    flat, _ = leaves_with_paths(params)
    pinned = _fixed_sparsities(fixed, flat, flags)
    values: list[Any] = [0.0] * len(flat)
    for i, v in pinned.items():
        values[i] = v
    # Zero-size leaves hold nothing to prune (sparsity 0.0).
    sizes = [math.prod(jnp.shape(x)) for _, x in flat]
    idx = [i for i, f in enumerate(flags) if f and sizes[i] > 0 and i not in pinned]
    kept_fixed = sum(sizes[i] * (1.0 - v) for i, v in pinned.items())
    total = sum(sizes[i] for i, f in enumerate(flags) if f)
    if not isinstance(sparsity, jax.core.Tracer) and pinned:
        _check_reachable(as_float(sparsity), kept_fixed, total, sum(sizes[i] for i in idx), fixed)
    if not idx:
        return _tree_like(params, values)
    shapes = [jnp.shape(flat[i][1]) for i in idx]
    n = jnp.array([math.prod(s) for s in shapes], jnp.float32)
    raw = jnp.array([(sum(s) / math.prod(s)) ** ps for s in shapes], jnp.float32)
    # What the free leaves keep: the total's kept count less the fixed leaves'.
    keep_total = (1.0 - jnp.asarray(sparsity, jnp.float32)) * total - kept_fixed
    dense = jnp.zeros(len(idx), bool)
    eps = jnp.float32(0.0)
    for _ in range(len(idx)):
        free = jnp.sum(jnp.where(dense, 0.0, raw * n))
        eps = (keep_total - jnp.sum(jnp.where(dense, n, 0.0))) / jnp.maximum(free, 1e-30)
        dense = dense | (eps * raw > 1.0)
    density = jnp.clip(jnp.where(dense, 1.0, eps * raw), 0.0, 1.0)
    for j, i in enumerate(idx):
        values[i] = 1.0 - density[j]
    return _tree_like(params, values)


def _fixed_sparsities(fixed: Any, flat: list[Any], flags: list[bool]) -> dict[int, float]:
    """Checks ``erk``'s ``fixed`` against the leaves; returns ``{leaf index: sparsity}``."""
    if fixed is None:
        return {}
    if not isinstance(fixed, Mapping):
        raise ValueError(
            f"fixed takes a mapping {{path: sparsity}}, got {type(fixed).__name__}. Fix: e.g. "
            'fixed={"layers/0/kernel": 0.5}.'
        )
    names = [path_str(p) for p, _ in flat]
    unknown = sorted(str(k) for k in fixed if k not in names)
    if unknown:
        raise ValueError(
            f"fixed names no leaf: {unknown}; the leaves are {names}. Fix: use the paths "
            "jp.path_str prints."
        )
    out = {}
    for k, v in fixed.items():
        i = names.index(k)
        value = None if isinstance(v, (bool, str, bytes)) else as_float(v)
        if value is None or not 0.0 <= value <= 1.0:
            raise ValueError(
                f"fixed sparsity for {k!r} must be a number in [0, 1], got {v!r}. Fix: e.g. "
                "0.5 to prune half of that leaf."
            )
        if not flags[i]:
            raise ValueError(
                f"fixed names a leaf that is not prunable: {k!r} (the `where` predicate, by "
                "default floating leaves with ndim >= 2, leaves it out, so no selection would "
                "prune it). Fix: drop it from fixed, or pass a `where` that selects it."
            )
        out[i] = value
    return out


def _check_reachable(s: float, kept_fixed: float, total: int, free: int, fixed: Any) -> None:
    """Raises when the leaves outside ``fixed`` cannot bring the total to ``s``."""
    lo = 1.0 - (kept_fixed + free) / max(total, 1)  # the others all kept
    hi = 1.0 - kept_fixed / max(total, 1)  # the others all pruned
    if not lo - 1e-6 <= s <= hi + 1e-6:
        raise ValueError(
            f"sparsity {s!r} cannot be reached with fixed={dict(fixed)!r}: with those leaves "
            f"fixed, the total over the prunable leaves can only range over [{lo:.4f}, "
            f"{hi:.4f}]. Fix: pass a sparsity in that range, or lower the fixed sparsities."
        )


def explicit(mapping: Mapping[str, float], default: float | None = None) -> Distribution:
    """Returns a distribution giving each leaf the sparsity named for its path.

    Args:
      mapping: ``{path: sparsity}`` with paths as ``jp.path_str`` writes them
        (``"layers/0/kernel"``).
      default: sparsity for prunable leaves not in ``mapping``; ``None`` makes
        a missing leaf an error.

    Returns:
      ``(params, sparsity, *, where) -> per-leaf sparsities``; the total
      ``sparsity`` argument is ignored (the mapping is the distribution).

    Raises:
      ValueError: a value is not a number in ``[0, 1]``, or (when called) a key
        names no leaf, names a leaf that ``where`` does not make prunable with
        a non-zero sparsity (no selection would prune it: the distribution
        gives such leaves ``0.0``), or a prunable leaf has no entry and no
        ``default``.

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> d = jp.distributions.explicit({"a": 0.9}, default=0.5)
      >>> d({"a": jnp.ones((2, 2)), "b": jnp.ones((2, 2))}, None)
      {'a': 0.9, 'b': 0.5}
    """
    if not isinstance(mapping, Mapping):
        raise ValueError(
            f"explicit takes a mapping {{path: sparsity}}, got {type(mapping).__name__}. Fix: "
            'e.g. explicit({"layers/0/kernel": 0.9}).'
        )
    for k, v in list(mapping.items()) + ([("default", default)] if default is not None else []):
        if not 0.0 <= as_float(v) <= 1.0:
            raise ValueError(
                f"explicit sparsity for {k!r} must be in [0, 1], got {v!r}. Fix: e.g. 0.9 "
                "to prune 90% of that leaf."
                + (" (leave the path out of the mapping to use the default)" if v is None else "")
            )
    table = dict(mapping)

    def distribution(params, sparsity=None, *, where=None):
        del sparsity
        flags = prunable_flags(params, where)
        flat, _ = leaves_with_paths(params)
        names = [path_str(p) for p, _ in flat]
        unknown = sorted(k for k in table if k not in names)
        if unknown:
            raise ValueError(
                f"explicit sparsities name no leaf: {unknown}; the leaves are {names}. Fix: use "
                "the paths jp.path_str prints."
            )
        not_prunable = sorted(
            name for name, f in zip(names, flags, strict=True) if not f and table.get(name, 0.0)
        )
        if not_prunable:
            raise ValueError(
                f"explicit sparsities name leaves that are not prunable: {not_prunable} (the "
                "`where` predicate, by default floating leaves with ndim >= 2, leaves them out, "
                "so no selection would prune them). Fix: drop them from the mapping, or pass a "
                "`where` that selects them."
            )
        values = []
        for name, f in zip(names, flags, strict=True):
            if name in table:
                values.append(table[name])
            elif not f:
                values.append(0.0)
            elif default is None:
                raise ValueError(
                    f"prunable leaf {name!r} has no explicit sparsity. Fix: add it to the "
                    "mapping or pass default=..."
                )
            else:
                values.append(default)
        return _tree_like(params, values)

    return distribution


def selection(
    distribution: Distribution, select: Callable[..., Any] = _masks.topk
) -> Callable[..., Any]:
    """Returns a selection ``(scores, sparsity, *, where) -> masks`` spreading ``sparsity``.

    Use it as ``jp.prune(..., scope=jp.distributions.selection(jp.distributions.erk))``:
    on each refresh the schedule's total sparsity is spread with
    ``distribution`` and each leaf pruned with ``select`` (default
    ``jp.masks.topk``, exact count per leaf). Each leaf's count is
    ``round(s_leaf * n_leaf)``, rounded on its own, so the total can differ
    from ``round(sparsity * N)`` by up to half an entry per leaf (1590
    instead of 1591 of 1768 entries over three leaves at 90%); use
    ``jp.masks.global_topk`` for an exact total.

    Args:
      distribution: a callable ``(params, sparsity, *, where) -> per-leaf sparsities``
        (e.g. :func:`erk`, :func:`uniform`, ``explicit({...})``), called with the scores
        in place of the params.
      select: a selection ``(scores, sparsity, *, where) -> masks`` that takes a tree of
        per-leaf sparsities; default ``jp.masks.topk`` (run leaf by leaf here, so the
        per-leaf sparsities may be traced).

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> scores = {"a": jnp.ones((100, 100)), "b": jnp.ones((100, 2))}
      >>> m = jp.distributions.selection(jp.distributions.erk)(scores, 0.5)
      >>> int(m["b"].sum()), int(m["a"].sum())
      (200, 4900)
    """
    if not callable(distribution):
        raise ValueError(
            f"distribution must be a function (params, sparsity, *, where) -> per-leaf "
            f"sparsities, got {distribution!r}. Fix: e.g. jp.distributions.erk, "
            "jp.distributions.uniform or jp.distributions.explicit({...})."
        )
    if not callable(select):
        raise ValueError(
            f"select must be a selection (scores, sparsity, *, where) -> masks, got {select!r}. "
            "Fix: e.g. select=jp.masks.topk (the default)."
        )

    @mirrors_variables
    def select_fn(scores, sparsity, *, where=None):
        per_leaf = distribution(scores, sparsity, where=where)
        if select is _masks.topk:
            return _topk_per_leaf(scores, per_leaf, where)
        return select(scores, per_leaf, where=where)

    return select_fn


def _topk_per_leaf(scores: Any, per_leaf: Any, where: Where | None) -> Any:
    """``jp.masks.topk`` with one (possibly traced) sparsity per leaf, read leaf by leaf."""
    flags = prunable_flags(scores, where)
    flat = [x for _, x in leaves_with_paths(scores)[0]]
    s_flat = jax.tree.leaves(per_leaf)
    counts = [
        _counts._count(s, jnp.size(x)) for x, f, s in zip(flat, flags, s_flat, strict=False) if f
    ]
    return _keep_counts(scores, counts, flags)


def _keep_counts(scores: Any, counts: list[Any], flags: list[bool]) -> Any:
    """Returns masks pruning ``counts[j]`` lowest scores of the ``j``-th flagged leaf.

    Unflagged leaves get a scalar ``True``.
    """
    flat, treedef = leaves_with_paths(scores)
    out, it = [], iter(counts)
    for (_, x), f in zip(flat, flags, strict=True):
        if f:
            keep = _masks._select([_masks.ordered_keys(x)], next(it))[0]
            out.append(keep.reshape(jnp.shape(x)))
        else:
            out.append(jnp.ones((), bool))
    return jax.tree.unflatten(treedef, out)


@mirrors_variables
def per_output(scores: Any, sparsity: Any, *, where: Where | None = None, axis: int = -1) -> Any:
    """Returns masks pruning the same exact fraction within every output unit of each leaf.

    Each slice along ``axis`` (an output unit: a column of a flax kernel
    ``[..., in, out]``) prunes ``round(s * slice size)`` of its lowest scores,
    as Wanda compares weights per output row.

    Args:
      scores: a pytree of scores (e.g. ``jp.criteria.magnitude(params)``).
      sparsity: fraction in ``[0, 1]`` to prune within each slice, a scalar or a tree
        of scalars with the structure of ``scores`` (one per leaf; a traced value is
        clipped to ``[0, 1]``).
      where: predicate ``(path, leaf) -> bool`` choosing the prunable leaves;
        default: floating leaves with ``ndim >= 2``. Other leaves get a scalar ``True``.
      axis: the output-unit axis, an int in ``[-ndim, ndim)`` of every selected leaf;
        default ``-1`` (a flax kernel's output units).

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> m = jp.distributions.per_output({"w": jnp.array([[1., 5.], [2., 4.]])}, 0.5)
      >>> m["w"].tolist()
      [[False, True], [True, False]]

    References:
      Sun et al., "A Simple and Effective Pruning Approach for Large Language
      Models" (Wanda), 2023. https://arxiv.org/abs/2306.11695
    """
    flags = prunable_flags(scores, where)
    _counts.warn_nothing_selected("jp.distributions.per_output", scores, flags, sparsity)
    per_leaf = _counts._per_leaf_sparsity(scores, sparsity, flags)
    flat, treedef = leaves_with_paths(scores)
    out = []
    for (p, x), f, s in zip(flat, flags, per_leaf, strict=False):
        if not f:
            out.append(jnp.ones((), bool))
            continue
        nd, ax = jnp.ndim(x), as_int(axis)
        if ax is None or not -nd <= ax < nd:
            raise ValueError(
                f"axis must be an int axis of every selected leaf, got {axis!r} for "
                f"{path_str(p)!r} of shape {tuple(jnp.shape(x))}. Fix: axis=-1 (a flax "
                "kernel's output units), or where= selecting only leaves that have it."
            )
        moved = jnp.moveaxis(jnp.asarray(x), axis, 0)
        rows = moved.reshape(moved.shape[0], -1)
        k = _counts._count(s, rows.shape[1])
        keep = jax.vmap(lambda r, k=k: _masks._select([_masks.ordered_keys(r)], k)[0])(rows)
        out.append(jnp.moveaxis(keep.reshape(moved.shape), 0, axis))
    return jax.tree.unflatten(treedef, out)
