"""The initial masks of ``jp.dynamic.rigl`` / ``set``: random, at the distribution's sparsities.

The network is sparse from the first step once these masks are applied to the
params (``jp.apply_masks(params, jp.get_masks(state))`` right after
``tx.init``, which cannot change the params): ``distribution`` spreads the total
sparsity over the prunable leaves (or over each layer of a stack, as on the
unrolled model), and each leaf, or layer, keeps exactly ``round((1 - s) * n)``
entries of random scores. The total is checked against ``sparsity``, since an
``explicit`` mapping would silently override it.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import _counts
from jaxprune import criteria as _criteria
from jaxprune import distributions as _dist
from jaxprune._compile import jit_once
from jaxprune._tree import Path, Where, is_prunable, leaves_with_paths, path_str, prunable_flags

# Read-only: one layer's stand-in, and the top-k of each layer at its own count.
from jaxprune.stacked import _keep_per_layer, _one_layer


def _warn_nothing_prunable(pure: Any, name: str, depths: list[int] | None = None) -> None:
    """Warns that ``where`` took no leaf; ``depths``: each leaf's layer axes, with ``stacked``.

    With ``stacked``, ``where`` saw one layer of each stack, so the warning
    lists those shapes: a ``where`` written for the stacked shapes
    (``ndim >= 3``) refuses every layer.
    """
    flat = leaves_with_paths(pure)[0]
    depths = depths or [0] * len(flat)
    paths = []
    for (p, x), k in zip(flat, depths, strict=True):
        shape = tuple(jnp.shape(x))
        seen = f"one layer {shape[k:]} of {shape}" if k else str(shape)
        paths.append(f"{path_str(p)} {seen}")
    shown = ", ".join(paths[:8]) + (f", ... ({len(paths)} leaves)" if len(paths) > 8 else "")
    if any(depths):
        rule = (
            "With stacked=, `where` is asked about one layer of each stacked leaf (a "
            "jax.ShapeDtypeStruct of one layer's shape, as listed), not the whole stack, and "
            "by default only floating layers with ndim >= 2 (kernels) are prunable. Fix: "
            "write `where` for one layer (e.g. lambda path, leaf: leaf.ndim >= 2 takes the "
            "kernels, not the [L, out] biases), or leave where=None."
        )
    else:
        rule = (
            "By default only floating leaves with ndim >= 2 (kernels) are prunable. Fix: pass "
            "the model's params with its kernels, or a `where` predicate (path, leaf) -> bool "
            "that selects the leaves to train sparse."
        )
    warnings.warn(
        f"jp.dynamic.{name} found no prunable leaf in params ({shown or 'no leaves'}): nothing "
        f"is masked and training is dense. {rule}",
        UserWarning,
        stacklevel=3,
    )


def _check_per_leaf(pure: Any, flags: list[bool], per_leaf: Any, name: str) -> None:
    """Raises ``ValueError`` unless ``per_leaf`` holds one number per prunable leaf.

    A selection (``jp.distributions.selection(erk)``, which ``jp.prune``'s
    ``scope`` takes, or ``jp.masks.topk``) has the distribution's signature
    but returns masks: it would fail later in a conversion to a Python float
    (or, traced, in a ``lax.while_loop``), naming neither.
    """
    flat = leaves_with_paths(pure)[0]
    values = jax.tree.leaves(per_leaf)
    if len(values) != len(flat):
        return  # another tree: the distribution's own trouble, left to _check_total
    for (p, x), v, f in zip(flat, values, flags, strict=True):
        if f and np.ndim(v) != 0:
            raise ValueError(
                f"jp.dynamic.{name}: distribution must return one sparsity (a number) per "
                f"leaf, got a {tuple(np.shape(v))} {jnp.result_type(v)} array for "
                f"{path_str(p)!r} (shape {tuple(jnp.shape(x))}): it looks like a selection, "
                "which returns masks. Fix: pass the distribution itself, e.g. "
                "distribution=jp.distributions.erk, not jp.distributions.selection(erk) or a "
                "mask selection such as jp.masks.topk (those are jp.prune's scope)."
            )


_ARRAYS = (jax.Array, np.ndarray)


@functools.partial(jit_once, static_argnums=(3,))
def _random_keeps(pure: Any, key: jax.Array, counts: list[jax.Array], flags: tuple) -> Any:
    """Random scores and their per-leaf top-k masks in one program (see :func:`_random_masks`).

    It runs once per ``init``: on the CPU it compiles with XLA's quickest options
    (``jp.dynamic.rigl``'s init of 784-1024-256-10 params: about 5 s -> 2.5 s).
    """
    return _dist._keep_counts(_criteria.random(pure, key=key), counts, list(flags))


def _random_masks(pure: Any, key: jax.Array, per_leaf: Any, flags: list[bool], where) -> Any:
    """Returns the initial random masks of ``per_leaf`` sparsities (one per leaf).

    On concrete arrays the counts are rounded here, as the eager search rounds
    them, and the scores and searches run as one jitted program: eagerly, each
    leaf's search compiled apart (4.8 s for LeNet-300-100 with ERK, 1.7 s in
    one program). Traced, or with leaves that are not arrays, leaf by leaf.
    """
    leaves = jax.tree.leaves(pure)
    values = jax.tree.leaves(per_leaf)
    eager = (
        leaves
        and len(values) == len(leaves)
        and all(isinstance(x, _ARRAYS) and not isinstance(x, jax.core.Tracer) for x in leaves)
        and not any(isinstance(v, jax.core.Tracer) for v in values)
    )
    if not eager:
        return _dist._topk_per_leaf(_criteria.random(pure, key=key), per_leaf, where)
    counts = [
        _counts._count(v, math.prod(jnp.shape(x)))
        for x, v, f in zip(leaves, values, flags, strict=True)
        if f
    ]
    return _random_keeps(pure, key, counts, tuple(flags))


def _check_total(
    pure: Any, flags: list[bool], per_leaf: Any, sparsity: float, distribution: Any, name: str
) -> None:
    """Raises ``ValueError`` when the distribution's total disagrees with ``sparsity``.

    An ``explicit`` mapping ignores the total it is given, so ``sparsity``
    would otherwise be silently overridden. Skipped for traced per-leaf values
    (``jax.jit(tx.init)`` with ERK).
    """
    values = jax.tree.leaves(per_leaf)
    # From the shape: the stand-ins of a stack's layers are ShapeDtypeStructs.
    sizes = [math.prod(jnp.shape(x)) for x in jax.tree.leaves(pure)]
    if len(values) != len(sizes) or not any(flags):
        return
    if any(isinstance(v, jax.core.Tracer) for v, f in zip(values, flags, strict=True) if f):
        return
    n = sum(size for size, f in zip(sizes, flags, strict=True) if f)
    if n == 0:
        return
    total = sum(float(v) * size for v, size, f in zip(values, sizes, flags, strict=True) if f) / n
    if abs(total - sparsity) > 1e-3:
        label = getattr(distribution, "__qualname__", None) or repr(distribution)
        if "<locals>" in label:  # explicit({...}) returns a closure
            label = label.split(".<locals>")[0] + "(...)"
        raise ValueError(
            f"jp.dynamic.{name}: sparsity={sparsity} disagrees with distribution={label}, whose "
            f"per-leaf sparsities prune {total:.4f} of the prunable weights. The masks follow "
            "the distribution (an explicit mapping ignores the total), so sparsity would be "
            f"silently overridden. Fix: pass sparsity={total:.4g} to match the mapping, or "
            "change the mapping."
        )


def _per_layer_sparsities(
    pure: Any,
    depths: list[int],
    distribution: Any,
    sparsity: float,
    where: Where | None,
    name: str,
) -> list[Any]:
    """Returns one sparsity per leaf, or per layer (a tuple, flat order) for a stacked leaf.

    The distribution sees the model unrolled: each layer of a stack is a leaf
    of its own (a ``jax.ShapeDtypeStruct``) at the stack's path with its index
    appended, so ERK sizes each layer by its own fans and the total is that of
    the unrolled model. ``where`` is asked with the stack's own path.
    """
    flat, treedef = leaves_with_paths(pure)
    parts, owner = [], {}
    for (p, x), k in zip(flat, depths, strict=True):
        if not k:
            parts.append(x)
            continue
        n = math.prod(jnp.shape(x)[:k])
        parts.append((_one_layer(x, k),) * n)
        owner.update({p + (i,): p for i in range(n)})
    unrolled = jax.tree.unflatten(treedef, parts)
    w = is_prunable if where is None else where

    def where_fn(path: Path, leaf: Any) -> bool:
        return bool(w(owner.get(path, path), leaf))

    try:
        per = distribution(unrolled, sparsity, where=where_fn)
    except (TypeError, AttributeError) as e:
        # A selection reads the values the stand-ins lack, and fails on them.
        raise ValueError(
            f"jp.dynamic.{name}: distribution raised {type(e).__name__} ({e}) on the unrolled "
            "model, whose stacked layers are jax.ShapeDtypeStructs (shape and dtype, no "
            "values): a distribution returns one sparsity per leaf from the shapes. Fix: pass "
            "the distribution itself, e.g. distribution=jp.distributions.erk, not "
            "jp.distributions.selection(erk) or a mask selection such as jp.masks.topk "
            "(those are jp.prune's scope)."
        ) from e
    flags = prunable_flags(unrolled, where_fn)
    _check_per_leaf(unrolled, flags, per, name)
    _check_total(unrolled, flags, per, sparsity, distribution, name)
    values = iter(jax.tree.leaves(per))
    out = []
    for (_, x), k in zip(flat, depths, strict=True):
        if not k:
            out.append(next(values))
            continue
        out.append(tuple(next(values) for _ in range(math.prod(jnp.shape(x)[:k]))))
    return out


def _layer_counts(values: tuple[Any, ...], n: int, lead: tuple[int, ...]) -> jax.Array:
    """Returns ``round(s * n)`` of each layer's ``s`` (int32, shape ``lead``), as ``_count``.

    Concrete values round in Python as ``_count`` does for a leaf (``0.3 * 35``
    is 10, where float32's 0.3 would give 11); traced ones exactly in float32.
    """
    if any(isinstance(s, jax.core.Tracer) for s in values):
        s = jnp.stack([jnp.asarray(s, jnp.float32) for s in values])
        return _counts._count(s, n).reshape(lead)  # element-wise on a traced array
    return jnp.asarray([round(float(s) * n) for s in values], jnp.int32).reshape(lead)


def _initial_masks(scores: Any, per_leaf: list[Any], flags: list[bool], depths: list[int]) -> Any:
    """Returns the top-``(1 - s)`` masks of ``scores``, each layer of a stack at its own count."""
    flat, treedef = leaves_with_paths(scores)
    out = []
    for (_, x), s, f, k in zip(flat, per_leaf, flags, depths, strict=True):
        if not f:
            out.append(jnp.ones((), bool))
        elif not k:
            out.append(_keep_per_layer(x, _counts._count(s, jnp.size(x)), 0))
        else:
            counts = _layer_counts(s, math.prod(jnp.shape(x)[k:]), jnp.shape(x)[:k])
            out.append(_keep_per_layer(x, counts, k))
    return jax.tree.unflatten(treedef, out)
