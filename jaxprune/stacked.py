"""Selections on stacked layers: each layer of a ``[L, ...]`` leaf pruned as its own leaf.

Large JAX models stack their repeated layers along a leading axis (flax linen
``nn.scan``, ``nnx.vmap``-built stacks applied with ``nnx.scan``, equinox
``filter_vmap``-built stacks under ``lax.scan``): one kernel leaf ``[L, in,
out]`` holds ``L`` layers and one bias leaf ``[L, out]`` their biases. Every
selection in :mod:`jaxprune.masks` works per *leaf*, so on such a model
``topk`` ranks all ``L`` layers together (a layer of small weights can be
emptied), ``global_topk``'s ``max_sparsity`` caps the stack rather than each
layer, ERK counts ``L`` as a fan dimension, and the default ``where`` (``ndim
>= 2``) takes the ``[L, out]`` biases for kernels. :func:`per_layer` wraps any
selection so that it sees each layer of a stacked leaf as a leaf of its own,
and stacks the masks back.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import _counts
from jaxprune import masks as _masks
from jaxprune._keys import _half_of, _keys_as, _score_keys
from jaxprune._search import (
    _explicit_axes,
    _on_auto_axes,
    _select,
    _sharding_or_replicated,
)
from jaxprune._tree import (
    Path,
    Where,
    is_channel_bias,
    is_prunable,
    leaves_with_paths,
    mirrors_variables,
    path_str,
    prunable_flags,
)

__all__ = ["per_layer"]

Stacked = Callable[[Path, Any], "int | bool"]


def _depth(stacked: Stacked, path: Path, leaf: Any) -> int:
    """Returns how many leading axes of ``leaf`` index its layers (0: not stacked)."""
    if not hasattr(leaf, "shape"):
        return 0  # not an array (an equinox module's Dropout rate): nothing to cut
    if not jnp.ndim(leaf):
        return 0  # a scalar (a mask standing for a whole leaf, as True): not a stack
    k = stacked(path, leaf)
    if isinstance(k, bool | np.bool_):
        k = int(k)
    nd = jnp.ndim(leaf)
    # k == ndim: one scalar per layer (a stacked ReZero alpha, shape [L]).
    if not isinstance(k, int | np.integer) or not 0 <= k <= nd:
        raise ValueError(
            f"stacked must return a bool or the number of leading layer axes (an int in [0, "
            f"ndim]), got {k!r} for {path_str(path)!r} of shape {tuple(jnp.shape(leaf))}. Fix: "
            "e.g. stacked=lambda path, leaf: path[0] == 'layers' (one leading layer axis)."
        )
    return int(k)


def _warn_no_stack(flat: list, depths: list[int], who: str, *, stacklevel: int) -> bool:
    """Warns when ``stacked`` took no leaf of ``flat``; returns whether it warned.

    A predicate copied from another model's layout (``path[0] == "layers"``
    on linen's ``params/...`` paths) matches nothing, and each stack is then
    one leaf, silently: its ``[L, out]`` biases taken for kernels, ``L``
    counted as a fan by ERK.
    """
    # As _depth: only array leaves with an axis are asked.
    asked = [p for (p, x), _ in zip(flat, depths, strict=True) if len(getattr(x, "shape", ()))]
    if any(depths) or not asked:
        return False  # a match, or no array leaf for `stacked` to be asked about
    shown = ", ".join(repr(p) for p in asked[:4]) + (", ..." if len(asked) > 4 else "")
    warnings.warn(
        f"{who}: stacked= matched none of the {len(asked)} array leaves (it returned False "
        f"or 0 for each; their paths: {shown}), so every leaf is one layer: a stack's "
        "[L, out] biases are taken for kernels and its layers are pruned together. Fix: "
        "match the stacks' paths, tuples of keys: under linen nn.scan they start with "
        "'params' (e.g. stacked=lambda path, leaf: 'blocks' in path for a scanned module "
        "named 'blocks'), under an nnx stack with its attribute (path[0] == 'layers'); or "
        "pass no stacked= for a model without stacked layers.",
        UserWarning,
        stacklevel=stacklevel,
    )
    return True


def _one_layer(leaf: Any, k: int) -> Any:
    """Returns a stand-in with the shape and dtype of one layer of ``leaf``."""
    if not k:
        return leaf
    return jax.ShapeDtypeStruct(tuple(jnp.shape(leaf))[k:], jnp.result_type(leaf))


def per_layer(select: Callable[..., Any], *, stacked: Stacked) -> Callable[..., Any]:
    """Returns ``select`` run with each layer of a stacked leaf as its own leaf.

    A leaf for which ``stacked(path, leaf)`` is ``True`` (or ``k``: its first
    ``k`` axes index layers) is cut into its ``L`` layers before ``select``
    sees the scores, and the layers' masks are stacked back into one mask of
    the leaf's shape. So ``jp.masks.topk`` prunes exactly ``round(s * n)`` of
    each layer's ``n`` entries, ``global_topk``'s ``max_sparsity`` caps each
    layer, ``jp.distributions.selection(erk)`` gives each layer its own ERK
    sparsity, ``structured`` ranks each layer's units apart, and the
    default-axis rules of ``nm`` and ``patterns`` see a Dense ``[in, out]``
    or a conv ``[kh, kw, in, out]``.

    ``where`` (given to the returned function, or to ``jp.prune``) is called
    once per leaf, with a stacked leaf's own path and a
    ``jax.ShapeDtypeStruct`` of one layer (its shape and dtype; every layer
    of a stack gets the same answer): the default (``ndim >= 2``) then takes
    a stack of kernels but not a stack of biases ``[L, out]``. A selection
    that cuts the stacks sees each layer at the stack's path with the layer's
    flat index appended. A per-leaf ``sparsity`` tree gives each layer its
    stack's value. A leaf that is not an array is never cut, and ``k`` may equal the
    leaf's ``ndim`` (one scalar per layer, as a stacked ReZero gain).

    ``per_layer(jp.masks.topk)`` and ``per_layer(jp.masks.global_topk)``
    (with or without ``max_sparsity``, as a ``functools.partial``) do not cut
    the stacks: each stack's layers are searched at once under ``jax.vmap``
    (the same masks), so the compiled program does not grow with ``L``, and
    they also work on an Explicit mesh whose axes shard the layer axis. As
    ``jp.prune``'s scope with an element-wise criterion (magnitude, saliency),
    ``per_layer(topk)`` and ``per_layer(global_topk)`` run ``jp.prune``'s
    fused searches, which recompute the scores where they read them: the
    train step stores no full-size scores (see
    :func:`jaxprune.masks.fused_select`; capped, it keeps about a quarter of
    the stack's bytes for the per-layer cuts; on an Explicit mesh the capped
    search stores the scores). Other selections cut the stacks
    that ``where`` takes (never the ones it leaves out, such as the biases);
    on an Explicit mesh sharding a layer axis that is refused, with a
    ``ValueError`` naming the leaf.

    Args:
      select: a selection ``(scores, sparsity, *, where, **kwargs) -> masks``,
        e.g. ``jp.masks.topk``, ``functools.partial(jp.masks.global_topk,
        max_sparsity=0.9)``, ``jp.masks.structured``, ``jp.masks.nm``.
      stacked: predicate ``(path, leaf) -> bool | int`` telling which leaves
        are stacked and how many leading axes index their layers.

    Returns:
      A selection with ``select``'s signature, usable as ``jp.prune``'s
      ``scope``.

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> w = jnp.stack([jnp.full((2, 2), 0.1), jnp.full((2, 2), 5.0)])  # 2 layers
      >>> scores = {"layers": {"kernel": w, "bias": jnp.ones((2, 2))}}
      >>> jp.masks.topk(scores, 0.5)["layers"]["kernel"].sum((1, 2)).tolist()
      [0, 4]
      >>> select = jp.masks.per_layer(jp.masks.topk, stacked=lambda p, x: p[0] == "layers")
      >>> m = select(scores, 0.5)
      >>> m["layers"]["kernel"].sum((1, 2)).tolist(), m["layers"]["bias"].shape
      ([2, 2], ())

      Inside the train step: ``jp.prune(optax.adam(1e-3), sparsity=0.9,
      scope=select)``.
    """
    if not callable(select):
        raise ValueError(
            f"select must be a selection (scores, sparsity, *, where) -> masks, got {select!r}. "
            "Fix: e.g. jp.masks.per_layer(jp.masks.topk, stacked=...)."
        )
    check_stacked(stacked, allow_none=False)
    warned = [False]  # once per selection, not at every (traced) refresh

    @functools.wraps(select)
    @mirrors_variables
    def select_fn(scores: Any, *args: Any, where: Where | None = None, **kwargs: Any):
        # `sparsity` (positional or keyword) passes through, so a selection
        # whose sparsity has a default (nm, patterns) keeps it.
        flat, treedef = leaves_with_paths(scores)
        depths = [_depth(stacked, p, x) for p, x in flat]
        if not warned[0]:
            warned[0] = _warn_no_stack(flat, depths, "jp.masks.per_layer", stacklevel=3)
        explicit = _explicit_axes([x for _, x in flat])
        # topk and global_topk (capped or not) never cut: one search per stack.
        fast = _fast_path(select, args, kwargs)
        if fast is not None:
            name, sparsity, cap = fast
            if name == "topk":
                return _topk_per_layer(flat, treedef, depths, sparsity, where, explicit)
            if cap is None:
                # Uncapped, the cut changes nothing but `where`: its flatten order
                # is the stack's.
                return _masks.global_topk(scores, sparsity, where=layer_where_of(where, stacked))
            return _capped_global(flat, treedef, depths, sparsity, where, cap, explicit)
        # Every other selection sees the stacks cut into their layers; a stack
        # `where` does not take (the [L, out] biases) is left whole and kept.
        flags = _layer_flags(flat, treedef, depths, where)[0]
        cut = [k if f else 0 for k, f in zip(depths, flags, strict=True)]
        skipped = {p for (p, _), k, c in zip(flat, depths, cut, strict=True) if k and not c}
        if explicit is not None:
            _check_cuttable(flat, cut, select)
        layers = [_layers(x, k) if k else x for (_, x), k in zip(flat, cut, strict=True)]
        # Paths of the layers of a stack back to the stack's path, for `where`.
        counts = [len(x) if k else None for x, k in zip(layers, cut, strict=True)]
        owner = {p + (i,): p for (p, _), n in zip(flat, counts, strict=True) for i in range(n or 0)}

        # The selection asks about each layer; the answer is its stack's.
        taken = {p: f for (p, _), f in zip(flat, flags, strict=True)}

        def where_fn(path: Path, leaf: Any) -> bool:
            del leaf
            return taken[owner.get(path, path)]

        if args:
            args = (_spread(args[0], flat, counts, treedef),) + args[1:]
        if "sparsity" in kwargs:
            kwargs["sparsity"] = _spread(kwargs["sparsity"], flat, counts, treedef)
        out = select(jax.tree.unflatten(treedef, layers), *args, where=where_fn, **kwargs)
        got = dict(leaves_with_paths(out)[0])
        masks = []
        for (p, x), k, n in zip(flat, cut, counts, strict=True):
            if p in skipped:
                masks.append(jnp.ones((), bool))
                continue
            if n is None:
                masks.append(got[p])
                continue
            parts = [jnp.asarray(got[p + (i,)]) for i in range(n)]
            if all(m.ndim == 0 for m in parts) and all(_is_true(m) for m in parts):
                masks.append(jnp.ones((), bool))
            else:
                shape = jnp.shape(x)[k:]
                masks.append(
                    jnp.stack([jnp.broadcast_to(m, shape) for m in parts]).reshape(jnp.shape(x))
                )
        return jax.tree.unflatten(treedef, masks)

    def layer_where(where: Where | None) -> Where:
        """Returns ``where`` (default: ``ndim >= 2``) asked about one layer of each leaf.

        ``jp.prune`` chooses the leaves it enforces with it, so the stack's
        ``[L, out]`` biases are not taken for kernels. The default also takes
        bool leaves (masks) as ``jp.sparsity``'s does, so
        ``jp.sparsity(masks, where=select.layer_where(None))`` counts the same
        leaves on masks as on params.
        """
        return layer_where_of(where, stacked, default=_default_where)

    select_fn.layer_where = layer_where
    # jp.prune reads these to run a per-layer topk / global_topk as its fused
    # search (scores recomputed inside the search, never stored).
    select_fn.per_layer = (select, stacked)
    return select_fn


def check_stacked(stacked: Any, *, allow_none: bool = True) -> None:
    """Raises unless ``stacked`` is a predicate (or ``None``, when ``allow_none``)."""
    if (stacked is None and allow_none) or callable(stacked):
        return
    raise ValueError(
        f"stacked must be a predicate (path, leaf) -> bool | int (True, or the number of "
        f"leading axes indexing stacked layers){' or None' if allow_none else ''}, got "
        f"{stacked!r}. Fix: e.g. stacked=lambda path, leaf: path[0] == 'layers'."
    )


def layer_where_of(where: Where | None, stacked: Stacked, *, default: Where = is_prunable) -> Where:
    """Returns ``where`` (or ``default``) asked with a leaf's path and one of its layers.

    The layer is a ``jax.ShapeDtypeStruct`` (its shape and dtype): the same
    answer for every layer of a stack, on every mesh, and without slicing.
    """
    w = default if where is None else where

    def pred(path: Path, leaf: Any) -> bool:
        return bool(w(path, _one_layer(leaf, _depth(stacked, path, leaf))))

    return pred


def _default_where(path: Path, leaf: Any) -> bool:
    """``is_prunable``, and bool leaves (masks) with ``ndim >= 2``, as ``jp.sparsity``'s.

    A mask of a ``[n, 1, ..., 1]`` bias is left out, as that bias is.
    """
    if jnp.result_type(leaf) == jnp.bool_:
        return jnp.ndim(leaf) >= 2 and not is_channel_bias(path, leaf)
    return is_prunable(path, leaf)


def _topk_per_layer(
    flat: list, treedef: Any, depths: list[int], sparsity: Any, where, explicit
) -> Any:
    """``per_layer(topk)``: each stack's layers searched at once, under ``jax.vmap``.

    The same masks as cutting the stack into ``L`` leaves (each layer's own
    exact count, ties by flatten order inside the layer), but one batched
    search per stack instead of ``L`` searches: the compiled program and its
    scratch memory do not grow with ``L``.
    """
    flags, one = _layer_flags(flat, treedef, depths, where)
    per_leaf = _counts._per_leaf_sparsity(one, sparsity, flags)
    out = []
    for (_, x), k, f, s in zip(flat, depths, flags, per_leaf, strict=True):
        if not f:
            out.append(jnp.ones((), bool))
            continue
        x = jnp.asarray(x)
        if x.size == 0:
            out.append(jnp.ones(x.shape, bool))
            continue
        out.append(_keep_layers(x, _counts._count(s, math.prod(x.shape[k:])), k, explicit))
    return jax.tree.unflatten(treedef, out)


def _capped_global(
    flat: list, treedef: Any, depths: list[int], sparsity: Any, where, cap: float, explicit
) -> Any:
    """``per_layer(partial(global_topk, max_sparsity=cap))`` without cutting the stacks.

    As ``global_topk``'s cap over the cut tree: every layer's keys but its
    ``floor(cap * n)`` lowest are raised to the largest key (one vmapped
    search per stack), then one global search prunes ``min(round(s * N),
    sum of the caps)`` of them, in the same flatten order.
    """
    _counts._check_sparsity(sparsity, tree_ok=False)
    _counts._check_max_sparsity(cap, "max_sparsity", "layer", "entries")
    flags = _layer_flags(flat, treedef, depths, where)[0]
    idx = [i for i, f in enumerate(flags) if f and math.prod(jnp.shape(flat[i][1]))]
    top = jnp.uint32(0xFFFFFFFF)
    half = _half_of(jnp.result_type(flat[i][1]) for i in idx)  # one key space for the pool
    keys, caps, n = [], 0, 0
    for i in idx:
        x, k = jnp.asarray(flat[i][1]), depths[i]
        c = _counts._cap(cap, math.prod(x.shape[k:]))
        lowest = ~_keep_layers(x, jnp.int32(c), k, explicit)  # each layer's c lowest
        keys.append(jnp.where(lowest, _keys_as(x, half), top))
        caps += c * math.prod(x.shape[:k])
        n += x.size
    kept = _select(keys, jnp.minimum(_counts._count(sparsity, n), caps)) if idx else []
    keeps = {**_masks._empty(flat, flags), **dict(zip(idx, kept, strict=True))}
    return _masks._assemble(jax.tree.unflatten(treedef, [x for _, x in flat]), flags, keeps)


def _fast_path(select: Any, args: tuple, kwargs: dict) -> tuple[str, Any, Any] | None:
    """Returns ``(name, sparsity, max_sparsity)`` for a per-layer search without a cut.

    ``topk`` and ``global_topk`` (or a ``functools.partial`` of it that sets
    ``max_sparsity`` only), called with one sparsity; None for anything else.
    """
    keywords = dict(kwargs)
    if isinstance(select, functools.partial) and not select.args:
        keywords = {**select.keywords, **kwargs}
        select = select.func
    name = {_masks.topk: "topk", _masks.global_topk: "global"}.get(select)
    allowed = {"sparsity"} | ({"max_sparsity"} if name == "global" else set())
    if name is None or set(keywords) - allowed or len(args) + ("sparsity" in keywords) != 1:
        return None  # the selection's own TypeError, through the cut
    sparsity = args[0] if args else keywords["sparsity"]
    return name, sparsity, keywords.get("max_sparsity")


def _layer_flags(flat: list, treedef: Any, depths: list[int], where) -> tuple:
    """Returns ``(flags, tree)``: ``where`` asked about one layer of each leaf, and that tree.

    A stack's layer is a ``jax.ShapeDtypeStruct``, as everywhere ``where`` is
    asked about stacks (``layer_where``, ``jp.prune``, ``rigl``/``set``). A
    per-leaf sparsity tree is matched against the same tree.
    """
    one = jax.tree.unflatten(
        treedef, [_one_layer(x, k) for (_, x), k in zip(flat, depths, strict=True)]
    )
    return prunable_flags(one, where), one


def _check_cuttable(flat: list, cut: list[int], select: Any) -> None:
    """Raises unless every leaf to cut has its layer axes unsharded (Explicit meshes)."""
    for (p, x), k in zip(flat, cut, strict=True):
        spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None) if k else None
        if spec is not None and any(a is not None for a in tuple(spec)[:k]):
            raise ValueError(
                f"per_layer({_name(select)}) cuts {path_str(p)!r} "
                f"(shape {tuple(jnp.shape(x))}, sharding {spec}) into its layers, which JAX "
                "refuses on an Explicit mesh whose axes shard the layer axis. Fix: "
                "per_layer(jp.masks.topk) and per_layer(jp.masks.global_topk) (with or "
                "without max_sparsity) search without cutting; or shard the other axes "
                "(e.g. P(None, ...)), or use a mesh with Auto axes."
            )


def _name(select: Any) -> str:
    """Returns a selection's name, a ``functools.partial``'s with its keywords."""
    if isinstance(select, functools.partial):
        kw = ", ".join(f"{k}={v!r}" for k, v in select.keywords.items())
        return f"partial({_name(select.func)}{', ' + kw if kw else ''})"
    return getattr(select, "__name__", repr(select))


def _keep_layers(x: jax.Array, count: jax.Array, k: int, explicit) -> jax.Array:
    """Returns the keep-mask of ``x`` pruning ``count`` entries of each layer."""
    if explicit is None:
        return _keep_per_layer(x, count, k)
    # The search with the mesh's axes Auto, as select_keys runs it there.
    mesh, axes = explicit
    sharding = _sharding_or_replicated(jax.typeof(x), mesh)
    return _on_auto_axes(functools.partial(_keep_per_layer, k=k), axes, sharding, x, count)


def _keep_per_layer(x: jax.Array, count: jax.Array, k: int) -> jax.Array:
    """Returns the keep-mask of ``x`` pruning ``count`` entries of each layer.

    ``count``: one for every layer, or one per layer (shape ``x.shape[:k]``).
    """
    layers, count = _layers_of(x, k), jnp.asarray(count)
    per = count.ndim > 0
    keep = jax.vmap(lambda layer, c: _select(_score_keys([layer]), c)[0], (0, 0 if per else None))
    return keep(layers, count.reshape(-1) if per else count).reshape(x.shape)


def _layers_of(x: Any, k: int) -> jax.Array:
    """Returns ``x`` with its first ``k`` (layer) axes merged into one."""
    x = jnp.asarray(x)
    return x.reshape((math.prod(x.shape[:k]),) + x.shape[k:])  # not -1: layers may be empty


def _layers(x: Any, k: int) -> tuple[jax.Array, ...]:
    """Returns the layers of a leaf whose first ``k`` axes index them."""
    flat = _layers_of(x, k)
    return tuple(flat[i] for i in range(flat.shape[0]))


def _spread(sparsity: Any, flat: list, counts: list[int | None], treedef: Any) -> Any:
    """Returns ``sparsity`` for the cut tree: a per-leaf tree repeats a stack's value.

    ``counts[i]`` is the number of layers leaf ``i`` is cut into (None: not cut).
    A number, an array or a tree that does not match passes as it is, for the
    selection to take or refuse with its own message.
    """
    if isinstance(sparsity, int | float | str | bytes) or hasattr(sparsity, "dtype"):
        return sparsity
    by_path = dict(leaves_with_paths(sparsity)[0])
    if set(by_path) != {p for p, _ in flat}:
        return sparsity
    values = [
        by_path[p] if n is None else (by_path[p],) * n
        for (p, _), n in zip(flat, counts, strict=True)
    ]
    return jax.tree.unflatten(treedef, values)


def _is_true(m: jax.Array) -> bool:
    try:
        return bool(m)
    except jax.errors.ConcretizationTypeError:
        return False
