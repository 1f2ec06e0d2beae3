"""Ranking machinery shared by the structured selections: per-structure scores -> leaf masks.

A structured selection reduces each leaf's scores to one score per structure
(a slice, a kernel, a block); :func:`_rank_reduced` ranks those with
:func:`jaxprune.masks.topk` (or :func:`~jaxprune.masks.global_topk`) and
broadcasts the decisions back to the leaves, and :func:`_keeps_layout` makes a
selection return masks laid out like sharded scores. Used by
:mod:`jaxprune.structured` and :mod:`jaxprune.structured_patterns`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxprune import masks as _masks
from jaxprune._search import (
    _explicit_axes,
    _on_auto_axes,
    _placed_like,
    _replicated,
    _sharding_or_replicated,
)
from jaxprune._tree import leaves_with_paths


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
        run = lambda s: fn(s, *args, **kwargs)  # noqa: E731
        plain = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype), scores)
        shapes = jax.eval_shape(run, plain)
        score_types = [jax.typeof(x) for x in jax.tree.leaves(scores)]
        out = []
        for s, t in zip(jax.tree.leaves(shapes), score_types, strict=True):
            like_scores = bool(s.shape) and s.shape == t.shape
            out.append(_sharding_or_replicated(t, mesh) if like_scores else _replicated(mesh))
        shardings = jax.tree.unflatten(jax.tree.structure(shapes), out)
        return _on_auto_axes(run, axes, shardings, scores)

    return wrapper


def _rank_reduced(
    scores: Any,
    sparsity: Any,
    reduced: dict[int, jax.Array],
    expand: dict[int, Callable[[jax.Array], jax.Array]],
    scope: str,
) -> Any:
    """Ranks per-structure scores with topk/global_topk, then broadcasts back to the leaves."""
    flat, treedef = leaves_with_paths(scores)
    zero = jnp.zeros((), jnp.float32)
    red_leaves = [reduced[i] if i in reduced else zero for i in range(len(flat))]
    red_tree = jax.tree.unflatten(treedef, red_leaves)
    chosen = {flat[i][0] for i in reduced}

    def where(path, leaf):
        del leaf
        return path in chosen

    if scope == "global":
        kept = _masks.global_topk(red_tree, sparsity, where=where)
    else:
        # A tree of per-leaf sparsities is matched to the leaves by path (by topk).
        kept = _masks.topk(red_tree, sparsity, where=where)
    k_flat = jax.tree.leaves(kept)
    out = []
    for i in range(len(flat)):
        out.append(expand[i](k_flat[i]) if i in reduced else jnp.ones((), bool))
    return jax.tree.unflatten(treedef, out)
