"""Layer-wise structured pruning: one layer's neurons at a time, fine-tuning in between.

A small driver over the pieces of this package: the prunable groups are
visited in program order (input side first); at each one the lowest-importance
channels are masked out of every member, then a user fine-tuning callback
trains a sliding window of layers (the leaves of the last ``window`` pruned
groups and of the next group: the layer reading the pruned channels, whole,
and the kernel that reads it in turn) with the masks held fixed.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxprune import _counts
from jaxprune import criteria as _criteria
from jaxprune import masks as _masks
from jaxprune._tree import _normalize, _normalize_into_variable, leaves_with_paths
from jaxprune.gates_checks import _bias_path
from jaxprune.structure.graph import find_groups
from jaxprune.structure.importance import _masks_from_keep, group_scores
from jaxprune.structure.program import trace

__all__ = ["prune_layerwise"]

Finetune = Callable[[Any, Any, Callable[[Any, Any], bool]], Any]


def _and(a: Any, b: Any) -> Any:
    return jax.tree.map(lambda x, y: jnp.logical_and(x, y), a, b)


_KEY_TYPES = (
    jax.tree_util.DictKey,
    jax.tree_util.GetAttrKey,
    jax.tree_util.SequenceKey,
    jax.tree_util.FlattenedIndexKey,
)


def _in_window(paths: set, path: Any, leaf: Any) -> bool:
    """``finetune``'s ``where``: whether ``path`` is a leaf of the fine-tuning window.

    ``path`` is jaxprune's normalized tuple (``("Dense_0", "kernel")``) or the
    jax KeyPath that ``jax.tree_util.tree_map_with_path`` and
    ``tree_flatten_with_path`` give (``(DictKey('Dense_0'), DictKey('kernel'))``).
    """
    del leaf
    path = tuple(path)
    if any(isinstance(k, _KEY_TYPES) for k in path):
        # A KeyPath into an nnx State ends in the Variable's `value`; one into a
        # NamedTuple may end in a field of that name: try it as it is first.
        path = _normalize(path) if _normalize(path) in paths else _normalize_into_variable(path)
    return path in paths


def prune_layerwise(
    apply_fn: Callable[..., Any],
    params: Any,
    example_inputs: Sequence[Any],
    *,
    sparsity: float | Sequence[float],
    finetune: Finetune | None = None,
    window: int = 1,
    criterion: Callable[[Any], Any] = _criteria.magnitude,
    reduce: str | Callable[..., jax.Array] = "l2",
    progress: bool = True,
) -> tuple[Any, Any]:
    """Returns ``(params, masks)`` after pruning each prunable group in turn.

    Group ``i`` (in program order) loses ``round(sparsity[i] * channels)`` of
    its channels, ranked by :func:`~jaxprune.structure.group_scores` of
    ``criterion(params)``; then ``finetune(params, masks, where)`` is called,
    where ``where`` selects the leaves of the sliding window: those of the last
    ``window`` pruned groups and of the next group (the layer reading the
    pruned channels, bias included, and the kernel reading that layer); its
    result is re-masked. The groups go in program order (input side first),
    which may differ from the order of :func:`~jaxprune.structure.groups`: a
    list of sparsities follows program order. ``jp.shrink(apply_fn, params,
    masks, *example_inputs)`` then makes the network physically smaller.

    Args:
      apply_fn: ``(params, *inputs) -> outputs``.
      params: the params pytree.
      example_inputs: a tuple of example inputs for tracing.
      sparsity: fraction of channels per group, one float or one per group.
      finetune: ``(params, masks, where) -> params``, e.g. a few epochs that
        update only leaves with ``where(path, leaf)`` (``jp.prune`` with
        ``scope=lambda s, sp, where: masks`` keeps the masks enforced).
        ``path`` may be the jax KeyPath of ``jax.tree_util.tree_map_with_path``
        or ``tree_flatten_with_path`` (an nnx State's included), or jaxprune's
        normalized tuple of names and indices (``("layers", 0, "kernel")``, as
        ``jp.prune`` passes its own ``where``); both name the same leaf.
      window: how many recently pruned groups fine-tuning may update.
      criterion: ``params -> scores``.
      reduce: per-member reduction for group importance.
      progress: show a tqdm bar.

    Returns:
      ``(params, masks)``, masks with the params' structure.

    Raises:
      ValueError: ``sparsity`` has the wrong length or range, or ``window < 1``.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxprune as jp
      >>> from jaxprune import structure
      >>> def mlp(p, x):
      ...     h = jax.nn.relu(x @ p["w1"])
      ...     return jax.nn.relu(h @ p["w2"]) @ p["w3"]
      >>> p = {"w1": jnp.ones((3, 4)), "w2": jnp.ones((4, 4)), "w3": jnp.ones((4, 2))}
      >>> p, m = structure.prune_layerwise(mlp, p, (jnp.ones((1, 3)),), sparsity=0.5,
      ...                                  progress=False)
      >>> structure.shrink(mlp, p, m, jnp.ones((1, 3)))["w2"].shape
      (2, 2)

    References:
      Li et al., "Pruning Filters for Efficient ConvNets", 2017 (layer by
      layer with retraining). https://arxiv.org/abs/1608.08710
    """
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(
            f"window must be an int >= 1 (how many pruned groups fine-tuning updates "
            f"together), got {window!r}. Fix: e.g. window=1."
        )
    if not isinstance(example_inputs, (tuple, list)):
        raise ValueError(
            f"example_inputs must be a tuple of the model's inputs (apply_fn(params, "
            f"*example_inputs)), got {type(example_inputs).__name__}. Fix: wrap a single "
            "input in a tuple, e.g. (x[:2],)."
        )
    an = find_groups(trace(apply_fn, params, *example_inputs))
    first = {}
    for e, le, _ in an.contractions:
        r = an.uf.find(le)
        first[r] = min(first.get(r, e), e)
    order = sorted(
        (first[r], i)
        for i, (g, r) in enumerate(zip(an.groups, an.roots, strict=True))
        if g.prunable and r in first
    )
    groups = [an.groups[i] for _, i in order]
    scalar = isinstance(sparsity, (int, float, str, bytes)) or np.ndim(sparsity) == 0
    per = [sparsity] * len(groups) if scalar else list(sparsity)
    if len(per) != len(groups):
        raise ValueError(
            f"sparsity has {len(per)} entries but the model has {len(groups)} prunable groups "
            f"({[g.channels for g in groups]} channels). Fix: one float, or one per group."
        )
    for s in per:
        _counts._check_sparsity(s)  # before float(): True or "0.5" would pass it
    per = [float(s) for s in per]
    flat, treedef = leaves_with_paths(params)
    leaf_paths = {q for q, _ in flat}
    masks = jax.tree.unflatten(treedef, [jnp.ones((), bool)] * len(flat))
    bar = tqdm(list(enumerate(groups)), desc="layer-wise pruning", disable=not progress)
    emptied = []
    for i, g in bar:
        imp = group_scores([g], criterion(params), reduce=reduce)[0]
        keep = _masks._topk({"g": imp}, per[i], lambda p, x: True)[0]["g"]
        if per[i] < 1.0 and not bool(jnp.any(keep)):
            emptied.append(f"{g!r} at sparsity {per[i]:g}")
        masks = _and(masks, _masks_from_keep([g], params, {0: keep}))
        params = _masks.apply_masks(params, masks)
        if finetune is not None:
            # The last `window` groups and the next one: the layer reading the
            # pruned channels is trained whole (its kernel, bias and the kernel
            # reading it in turn).
            active = groups[max(0, i - window + 1) : i + 2]
            paths = {m.path for a in active for m in a.members}
            # The reading layer's bias belongs to no group when its outputs are not
            # prunable (the classifier): trained with its kernel all the same.
            paths |= {
                b
                for q in list(paths)
                if q and q[-1] in ("kernel", "weight", "w") and (b := _bias_path(q)) in leaf_paths
            }
            params = finetune(params, masks, functools.partial(_in_window, paths))
            params = _masks.apply_masks(params, masks)
    if emptied:
        warnings.warn(
            f"prune_layerwise removed every channel of {len(emptied)} group(s), since "
            f"round(sparsity * channels) == channels for them ({'; '.join(emptied[:3])}): the "
            "network's output no longer depends on its input through them (layer collapse). "
            "Fix: a lower sparsity for those groups (sparsity takes one value per group).",
            stacklevel=2,
        )
    return params, masks
