"""Ranking machinery shared by the structured selections: per-structure scores -> leaf masks.

A structured selection reduces each leaf's scores to one score per structure
(a slice, a kernel, a block); :func:`_rank_reduced` ranks those with
:func:`jaxprune.masks.topk` (or :func:`~jaxprune.masks.global_topk`) and
broadcasts the decisions back to the leaves, and :func:`_keeps_layout` makes a
selection return masks laid out like sharded scores. Used by
:mod:`jaxprune.structured`, :mod:`jaxprune.structured_nm` and
:mod:`jaxprune.structured_patterns`.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import _counts
from jaxprune import masks as _masks
from jaxprune._search import (
    _explicit_axes,
    _on_auto_axes,
    _placed_like,
    _replicated,
    _sharding_or_replicated,
)
from jaxprune._tree import leaves_with_paths, path_str


def _keeps_layout(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Makes the selection ``fn`` return masks laid out like sharded scores.

    On arrays typed with Explicit mesh axes (sharding in types, the default of
    ``jax.make_mesh``) the selection's reshapes and repeats, which split or
    merge sharded axes, would be refused; it runs with those axes made Auto,
    as the searches of :mod:`jaxprune._search` do, and each mask comes back
    typed with its score leaf's sharding. Concrete scores sharded over several
    devices get masks placed like them (the broadcasts would replicate them).
    """

    @functools.wraps(fn)
    def wrapper(scores: Any, *args: Any, **kwargs: Any) -> Any:
        found = _explicit_axes(scores)
        if found is None:
            return _placed_like(fn(scores, *args, **kwargs), scores)
        mesh, axes = found
        # Array arguments (a traced sparsity typed on the Explicit mesh) enter
        # the Auto region as inputs; the rest (Python numbers, where=, axes=)
        # stay as they are, so a Python sparsity still counts exactly.
        leaves, treedef = jax.tree.flatten((args, kwargs))
        is_array = [isinstance(x, jax.Array) for x in leaves]

        def run(s, arrays):
            it = iter(arrays)
            full = [next(it) if a else x for x, a in zip(leaves, is_array, strict=True)]
            a, k = jax.tree.unflatten(treedef, full)
            return fn(s, *a, **k)

        arrays = [x for x, a in zip(leaves, is_array, strict=True) if a]
        plain = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype), scores)
        shapes = jax.eval_shape(lambda s: run(s, arrays), plain)
        score_types = [jax.typeof(x) for x in jax.tree.leaves(scores)]
        out = []
        # The masks come first and mirror the scores; anything after them (a
        # selection's keep-vectors) is replicated.
        for i, s in enumerate(jax.tree.leaves(shapes)):
            t = score_types[i] if i < len(score_types) else None
            like_scores = t is not None and bool(s.shape) and s.shape == t.shape
            out.append(_sharding_or_replicated(t, mesh) if like_scores else _replicated(mesh))
        shardings = jax.tree.unflatten(jax.tree.structure(shapes), out)
        return _on_auto_axes(run, axes, shardings, scores, arrays)

    return wrapper


def _check_cap(max_sparsity: Any, scope: str, name: str, things: str) -> None:
    """Raises unless ``max_sparsity`` is ``None``, or a number in [0, 1] with ``scope="global"``."""
    _counts._check_max_sparsity(max_sparsity, "max_sparsity", "leaf", things)
    if max_sparsity is not None and scope != "global":
        raise ValueError(
            f"{name}: max_sparsity={max_sparsity!r} caps each leaf's share of a global "
            f"ranking, but scope={scope!r} already drops exactly round(sparsity * n) "
            f"{things} of every leaf. Fix: pass scope='global' with it, or drop max_sparsity."
        )


def at_least_f32(x: Any) -> jax.Array:
    """``x`` as float32, or in its own wider float type (float64 under ``jax_enable_x64``).

    Group scores are computed at the scores' precision, so float64 scores are
    compared as :func:`~jaxprune.masks.ordered_keys` compares them: as float32,
    with its warning, not cast down beforehand without one.
    """
    # Not jnp.promote_types(dtype, float32): strict dtype promotion refuses it for
    # bfloat16, float16 and integer scores.
    wide = jnp.result_type(x) == jnp.float64
    return jnp.asarray(x, jnp.float64 if wide else jnp.float32)


def _rank_reduced(
    scores: Any,
    sparsity: Any,
    reduced: dict[int, jax.Array],
    expand: dict[int, Callable[[jax.Array], jax.Array]],
    scope: str,
    *,
    max_sparsity: float | None = None,
    name: str = "structured",
    things: str = "slices",
) -> Any:
    """Ranks per-structure scores with topk/global_topk, then broadcasts back to the leaves.

    ``max_sparsity`` (``scope="global"`` only) caps each leaf's dropped
    structures at ``floor(max_sparsity * n_structures)``, as
    :func:`~jaxprune.masks.global_topk` caps entries. With a concrete sparsity
    below 1, a leaf left with no structure warns (``name`` and ``things`` word
    the message): layer collapse in a global ranking, rounding in a per-leaf one.
    """
    flat, treedef = leaves_with_paths(scores)
    zero = jnp.zeros((), jnp.float32)
    red_leaves = [reduced[i] if i in reduced else zero for i in range(len(flat))]
    red_tree = jax.tree.unflatten(treedef, red_leaves)
    chosen = {flat[i][0] for i in reduced}

    def where(path, leaf):
        del leaf
        return path in chosen

    if scope == "global":
        # The cap is per leaf of reduced scores, so per leaf in structures.
        kept = _masks.global_topk(red_tree, sparsity, where=where, max_sparsity=max_sparsity)
    else:
        # A tree of per-leaf sparsities is matched to the leaves by path (by topk).
        kept = _masks._topk(red_tree, sparsity, where)[0]
    k_flat = jax.tree.leaves(kept)
    _warn_emptied(flat, reduced, k_flat, sparsity, scope, max_sparsity, name, things)
    out = []
    for i in range(len(flat)):
        if i in reduced:
            out.append(expand[i](k_flat[i]))
        elif i in expand:  # a selected leaf left dense: its expand ignores the ranking
            out.append(expand[i](None))
        else:
            out.append(jnp.ones((), bool))
    return jax.tree.unflatten(treedef, out)


def _warn_emptied(flat, reduced, k_flat, sparsity, scope, max_sparsity, name, things) -> None:
    """Warns when a concrete sparsity below 1 left a selected leaf with no structure.

    A leaf of a single structure is meant to go whole in a global ranking
    (``structured(axes=(), scope="global")`` ranks whole layers), so only
    leaves of several count there. Traced sparsities or masks (``jp.prune``'s
    schedules) are not checked: their values are unknown at trace time.
    """
    if jax.tree.structure(sparsity).num_nodes != 1 or isinstance(sparsity, jax.core.Tracer):
        return  # a tree of per-leaf values (matched by topk), or traced
    if jnp.ndim(sparsity) != 0:
        return
    try:
        s = float(sparsity)
    except (TypeError, ValueError):
        return
    if not s < 1.0:
        return
    emptied = []
    for i, r in reduced.items():
        k = k_flat[i]
        n = int(np.prod(jnp.shape(r)))
        if isinstance(k, jax.core.Tracer) or n == 0 or (scope == "global" and n == 1):
            continue
        if not bool(jnp.any(k)):
            emptied.append(f"{path_str(flat[i][0])} ({n} {things})")
    if not emptied:
        return
    if scope == "global":
        capped = f" with max_sparsity={max_sparsity}" if max_sparsity is not None else ""
        fix = (
            "pass max_sparsity=0.9 (or another cap) so that every leaf keeps some, or use "
            "scope='layer'"
            if max_sparsity is None
            else "a lower max_sparsity"
        )
        msg = (
            f"{name}(scope='global') at sparsity {s:g}{capped} dropped all {things} of "
            f"{len(emptied)} leaf/leaves: {emptied[:5]}; the network's output no longer "
            f"depends on its input through them (layer collapse). Fix: {fix}."
        )
    else:
        msg = (
            f"{name} at sparsity {s:g} drops all {things} of {len(emptied)} leaf/leaves, "
            f"since round({s:g} * n) == n for them: {emptied[:5]}. Fix: a lower sparsity "
            "for them (a tree of per-leaf sparsities), or leave them out with where=."
        )
    # _warn_emptied < _rank_reduced < the selection < _keeps_layout < the caller.
    warnings.warn(msg, stacklevel=5)


def _check_scope(scope: str) -> None:
    if scope not in ("layer", "global"):
        raise ValueError(
            f"scope must be 'layer' (exact count per leaf) or 'global' (one ranking across "
            f"leaves), got {scope!r}."
        )
