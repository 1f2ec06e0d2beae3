"""Group discovery for users, group importance, and group-wise selections (masks).

:func:`groups` lists the coupled slices of a model; :func:`group_scores` sums
per-channel scores over a group's members (Torch-Pruning style group
importance); :func:`select` turns them into masks that drop whole channels
from every member at once, which :func:`~jaxprune.structure.shrink` then cuts
exactly; :func:`selection` packages that as a ``scope=`` for ``jp.prune``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import _counts
from jaxprune import masks as _masks
from jaxprune._search import _select, ordered_keys
from jaxprune._search_sharding import _explicit_axes, _placed_like
from jaxprune._structured_rank import _keeps_layout, at_least_f32
from jaxprune._tree import (
    Where,
    leaves_with_paths,
    mirror_variables,
    mirrors_variables,
    path_str,
    prunable_flags,
)
from jaxprune.structure.evaluate import run_cached, run_once
from jaxprune.structure.graph import Group, channel_indices, find_groups
from jaxprune.structure.isomorphic import isomorphic_classes
from jaxprune.structure.program import trace
from jaxprune.structure.select_checks import (
    _check_select_args,
    _check_select_sparsity,
    _warn_emptied,
    _warn_round_to_cancels,
    _warn_unvoted,
)
from jaxprune.structured import _reducer

__all__ = ["groups", "group_scores", "select", "selection"]


def groups(
    apply_fn: Callable[..., Any], params: Any, *example_inputs: Any, prunable_only: bool = False
) -> tuple[Group, ...]:
    """Returns the dependency groups of ``apply_fn(params, *example_inputs)``.

    A group lists the (leaf, axis) slices that must shrink together — a Dense
    layer's output columns and bias with the next layer's input rows; a conv's
    filters with its BatchNorm scale, shift and statistics and the next conv's
    input channels (or the rows of the Dense layer after a flatten); all the
    channels tied by residual additions — read from the jaxpr, so no layer is
    ever listed by hand. Groups pinned by a model input or output, a spatial
    axis, a reduction over channels or an opaque primitive are reported with
    ``prunable=False`` and the reasons (an opaque primitive also warns). So
    are the groups of params the traced call never reads (a layer used only in
    a branch not taken), with a warning naming them: trace the call that uses
    them, or they stay whole.

    Args:
      apply_fn: ``(params, *inputs) -> outputs``.
      params: the params pytree (for nnx: ``nnx.split(model)[1]``).
      *example_inputs: example inputs (a batch of 1-2 is enough).
      prunable_only: return only the prunable groups.

    Returns:
      A tuple of :class:`~jaxprune.structure.Group`.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxprune as jp
      >>> from jaxprune import structure
      >>> def mlp(p, x):
      ...     return jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"]
      >>> p = {"w1": jnp.ones((3, 4)), "b1": jnp.ones(4), "w2": jnp.ones((4, 2))}
      >>> [g for g in structure.groups(mlp, p, jnp.ones((1, 3))) if g.prunable]
      [Group(4 channels: b1[0], w1[1], w2[0])]

    References:
      Fang et al., "DepGraph: Towards Any Structural Pruning", 2023.
      https://arxiv.org/abs/2301.12900
    """
    found = tuple(find_groups(trace(apply_fn, params, *example_inputs)).groups)
    return tuple(g for g in found if g.prunable) if prunable_only else found


def _align(groups: Sequence[Group], scores: Any) -> tuple[list, tuple[Group, ...]]:
    """Returns ``scores``' flat ``(path, leaf)`` list and ``groups`` re-indexed onto it by path.

    Groups name their members by path, and ``scores`` may be the tree the
    groups were found on or a part of it: ``nnx.state(model, nnx.Param)``
    (what ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` hands ``jp.prune``)
    when the groups came from :func:`~jaxprune.structure.module_apply`'s state,
    which also holds the BatchNorm statistics; or a linen module's ``"params"``
    collection (what ``jp.prune`` sees inside a ``TrainState``) when the groups
    came from its full variables: a member ``params/Conv_0/kernel`` is then
    matched with the leaf ``Conv_0/kernel``. Members absent from ``scores``
    are left out of the returned groups (they get no mask; a channel whose
    kernel column and next-layer rows are masked computes the same function
    whatever its statistics, and :func:`~jaxprune.structure.shrink` still cuts
    it). A prunable group with no member in ``scores``, or a member whose leaf
    cannot hold the group's channels, is an error: it would silently score the
    wrong leaves or prune nothing.
    """
    if not isinstance(groups, (tuple, list)) or not all(isinstance(g, Group) for g in groups):
        raise ValueError(
            f"groups must be the sequence of groups structure.groups returns, got "
            f"{type(groups).__name__}. Fix: groups = structure.groups(apply_fn, params, x[:2])."
        )
    flat, _ = leaves_with_paths(scores)
    index = {path_str(p): i for i, (p, _) in enumerate(flat)}
    # Linen: groups found on the variables ({"params": ..., "batch_stats": ...}, as
    # BatchNorm needs) name "params/Conv_0/kernel", while jp.prune inside a TrainState
    # scores the params collection alone ("Conv_0/kernel").
    bare = not any(p[:1] == ("params",) for p, _ in flat)
    fix = (
        "Fix: compute the scores over the tree the groups were found on, or a part of it "
        "(for nnx, the state returned by structure.module_apply or its nnx.Param part, e.g. "
        "jp.criteria.magnitude(state); for linen, the variables the groups were found on "
        "or their 'params' collection, which is what jp.prune sees inside a TrainState)."
    )
    out = []
    for g in groups:
        members = []
        for m in g.members:
            i = index.get(path_str(m.path))
            if i is None and bare and len(m.path) > 1 and m.path[0] == "params":
                i = index.get(path_str(m.path[1:]))
            if i is None:
                continue
            shape = jnp.shape(flat[i][1])
            size = shape[m.axis] if m.axis < len(shape) else 0
            outer, inner, offset, count = m.layout
            if not size or size % outer or offset + count * inner > size // outer:
                raise ValueError(
                    f"scores leaf {path_str(m.path)!r} has shape {tuple(shape)}, which does not "
                    f"hold the {g.channels} channels its group expects along axis {m.axis}. {fix}"
                )
            members.append(m._replace(leaf=i))
        if g.prunable and not members:
            names = ", ".join(path_str(m.path) for m in g.members[:4])
            have = ", ".join(path_str(p) for p, _ in flat[:4]) + (", ..." if len(flat) > 4 else "")
            raise ValueError(
                f"scores does not match the groups' tree: no member of the group over {names} "
                f"is a leaf of scores ({len(flat)} leaves: {have or 'none'}). {fix}"
            )
        out.append(g._replace(members=tuple(members)))
    return flat, tuple(out)


def _member_channel_scores(x: jax.Array, axis: int, layout, reduce) -> jax.Array:
    size = x.shape[axis]
    idx = np.array([channel_indices(layout, size, c) for c in range(layout[3])])  # [C, k]
    moved = jnp.moveaxis(at_least_f32(x), axis, 0)[idx]  # [C, k, ...]; float64 stays
    flat = moved.reshape(layout[3], -1)
    # -inf marks entries pruned already (jp.drivers): a member slice wholly -inf is a
    # pruned channel, to go first; in a live one (the next layer's rows, partly cut by
    # that layer's own group) they count as 0, not -inf, which would tie every channel.
    gone = flat == -jnp.inf
    pruned = jnp.all(gone, axis=1) & (flat.shape[1] > 0)
    return jnp.where(pruned, -jnp.inf, reduce(jnp.where(gone, 0, flat), 1))


def group_scores(
    groups: Sequence[Group],
    scores: Any,
    *,
    reduce: str | Callable[..., jax.Array] = "l2",
    where: Where | None = None,
) -> list[jax.Array]:
    """Returns one ``[channels]`` importance vector per group: member scores summed.

    Each member's slice for channel ``c`` is reduced (``"l2"``, ``"l1"``,
    ``"mean"``, ``"max"``) and the members selected by ``where`` are summed
    (default: kernels, i.e. floating leaves with ``ndim >= 2``, so BatchNorm
    statistics do not vote).

    Args:
      groups: from :func:`groups`.
      scores: a tree of scores with the structure of the params the groups
        were found on, or of a part of them (members are matched by path, a
        linen ``"params"`` collection against groups found on the full
        variables included; those not in ``scores``, e.g. BatchNorm statistics
        when ``scores`` covers ``nnx.state(model, nnx.Param)``, do not vote).
      reduce: per-member reduction over a channel's slice.
      where: which members vote; default floating ``ndim >= 2``.

    Returns:
      A list of float32 vectors (float64 for float64 scores), one per group (zeros
      when no member votes).

    Raises:
      ValueError: a group has no member in ``scores``, or a member's leaf
        there cannot hold the group's channels.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxprune as jp
      >>> from jaxprune import structure
      >>> def mlp(p, x):
      ...     return jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"]
      >>> p = {"w1": jnp.arange(12.).reshape(3, 4), "b1": jnp.ones(4), "w2": jnp.ones((4, 2))}
      >>> gs = structure.groups(mlp, p, jnp.ones((1, 3)), prunable_only=True)
      >>> [s.tolist() for s in structure.group_scores(gs, jp.criteria.magnitude(p), reduce="l1")]
      [[14.0, 17.0, 20.0, 23.0]]

    References:
      Fang et al., "DepGraph", 2023. https://arxiv.org/abs/2301.12900
      Molchanov et al., "Importance Estimation for Neural Network Pruning",
      2019 (group importance as a sum). https://arxiv.org/abs/1906.10771
    """
    flat, groups = _align(groups, scores)
    return _summed(groups, flat, prunable_flags(scores, where), _reducer(reduce))


def _summed(groups: Sequence[Group], flat: list, flags: list[bool], red) -> list[jax.Array]:
    """:func:`group_scores` of groups already aligned on ``flat`` (see :func:`_align`)."""
    out = []
    for g in groups:
        parts = [
            _member_channel_scores(flat[m.leaf][1], m.axis, m.layout, red)
            for m in g.members
            if flags[m.leaf]
        ]
        # float64 scores (jax_enable_x64) are summed in float64, as jp.masks.structured does.
        dtype = jnp.result_type(jnp.float32, *(p.dtype for p in parts))
        total = jnp.zeros((g.channels,), dtype)
        for part in parts:
            total = total + part.astype(dtype)
        out.append(total)
    return out


def _channel_of(layout, size: int) -> np.ndarray:
    """Returns, per index along an axis, the channel it carries (-1 for none)."""
    inv = np.full((size,), -1, np.int32)
    for c in range(layout[3]):
        inv[channel_indices(layout, size, c)] = c
    return inv


def _masks_from_keep(groups: Sequence[Group], scores: Any, keeps: dict[int, jax.Array]) -> Any:
    flat, treedef = leaves_with_paths(scores)
    leaf_masks: dict[int, jax.Array] = {}
    for gi, keep in keeps.items():
        for m in groups[gi].members:
            shape = jnp.shape(flat[m.leaf][1])
            inv = _channel_of(m.layout, shape[m.axis])
            # A gather, not a scatter: cheap to compile for every member of every group.
            along = jnp.where(inv >= 0, jnp.asarray(keep)[np.maximum(inv, 0)], True)
            bshape = [1] * len(shape)
            bshape[m.axis] = -1
            full = jnp.broadcast_to(along.reshape(bshape), shape)
            leaf_masks[m.leaf] = leaf_masks[m.leaf] & full if m.leaf in leaf_masks else full
    leaves = [leaf_masks.get(i, jnp.ones((), bool)) for i in range(len(flat))]
    return jax.tree.unflatten(treedef, leaves)


def select(
    groups: Sequence[Group],
    scores: Any,
    sparsity: Any,
    *,
    reduce: str | Callable[..., jax.Array] = "l2",
    where: Where | None = None,
    scope: str = "layer",
    max_sparsity: float | None = None,
    round_to: int | None = None,
    normalize: str | None = None,
) -> Any:
    """Returns masks dropping the lowest-importance channels of every prunable group.

    Exactly ``round(sparsity * channels)`` channels of each prunable group
    (``scope="layer"``) or in total (``"global"``) are dropped, from every
    member at once (kernel columns, biases, BatchNorm parameters and
    statistics, next-layer rows), so the masked network is exactly what
    :func:`~jaxprune.structure.shrink` will cut to.

    Two limits, both off by default, make fewer channels go:

    * ``max_sparsity`` caps every group at ``floor(max_sparsity * channels)``
      dropped channels. Under ``scope="global"`` the lowest channels overall
      go, skipping those of groups already at their cap, so no layer can
      collapse (lose all or nearly all of its channels); the total is then
      ``min(round(sparsity * N), sum of the caps)``.
    * ``round_to`` rounds each group's kept channels up to a multiple of
      ``round_to`` (or to all of them, when fewer), after the selection and
      the cap: widths such as 8, 16, 32 suit vector units and tensor cores.
      A group with fewer channels than ``round_to`` is kept whole unless all
      of its channels were dropped. Torch-Pruning rounds the kept count down;
      with a Python ``sparsity`` and ``scope="layer"``, a group whose whole cut
      the rounding undoes gets a warning.

    Both keep the lowest-scoring channels of a group as the ones dropped, and
    both work with a traced ``sparsity`` (a schedule in ``jp.prune``).

    With a concrete ``sparsity`` below 1, two silent cuts warn: a group left
    with no channel (``round(sparsity * channels) == channels`` for a narrow
    group under ``scope="layer"``, or a global ranking without a cap), and a
    group that loses channels although ``where`` selects none of its members
    (its importances are all 0, so the cut falls by index order).

    Under ``scope="global"``, groups whose members are larger (a conv with
    many input channels, a Dense layer after a flatten) have larger summed
    norms, so raw importances favour pruning the others. ``normalize`` puts
    each group on one scale before the global ranking (Torch-Pruning's
    normalizers): ``"mean"`` divides by the group's mean importance, ``"max"``
    by its largest, ``"sum"`` by its total, and ``"gaussian"`` subtracts the
    mean and divides by the standard deviation. It does not change which
    channels a ``"layer"`` scope drops.

    Args:
      groups: from :func:`groups`.
      scores: a tree of scores with the structure of the params the groups
        were found on, or of a part of them, such as the ``nnx.Param`` part
        of :func:`~jaxprune.structure.module_apply`'s state (what
        ``jp.prune`` sees under ``nnx.Optimizer(model, tx, wrt=nnx.Param)``),
        or a linen module's ``"params"`` collection when the groups were found
        on its full variables (what ``jp.prune`` sees inside a ``TrainState``;
        ``params/Dense_0/kernel`` matches ``Dense_0/kernel``). Members are
        matched by path; those not in ``scores`` get no mask.
      sparsity: fraction of channels to drop (may be traced): one number for
        all groups. Per-group ratios: one ``select`` per subset of groups,
        AND-ed together, e.g. ``jax.tree.map(jnp.logical_and, select(gs[:1],
        scores, 0.5), select(gs[1:], scores, 0.25))``.
      reduce: per-member reduction (see :func:`group_scores`).
      where: which members vote on importance; default kernels.
      scope: ``"layer"`` (per group), ``"global"``, or ``"isomorphic"``: a
        global ranking within each class of isomorphic groups (members of the
        same shapes, axes and layouts, see
        :mod:`jaxprune.structure.isomorphic`), each class losing
        ``round(sparsity * its channels)``: Torch-Pruning's
        ``isomorphic=True``.
      max_sparsity: the largest fraction of any one group's channels to drop,
        in ``[0, 1]`` (a Python number); ``None`` for no cap.
      round_to: keep a multiple of this many channels in each group (an
        ``int >= 1``); ``None`` to keep exactly what the selection keeps.
      normalize: ``None``, ``"mean"``, ``"max"``, ``"sum"`` or ``"gaussian"``:
        how each group's importances are scaled before a global ranking. The
        statistic (mean, max, sum, standard deviation) is over the group's
        live channels only: channels already pruned (importance exactly 0, as
        in masked params under a schedule or repeated ``select`` calls) are
        left out of it, and still rank lowest.

    Returns:
      Bool masks with the structure of ``scores``.

    Raises:
      ValueError: a prunable group has no member in ``scores`` (scores over
        another model), a member's leaf there cannot hold the group's
        channels, or ``scope``, ``max_sparsity``, ``round_to`` or
        ``normalize`` is invalid.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxprune as jp
      >>> from jaxprune import structure
      >>> def mlp(p, x):
      ...     return jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"]
      >>> p = {"w1": jnp.arange(12.).reshape(3, 4), "b1": jnp.ones(4), "w2": jnp.ones((4, 2))}
      >>> gs = structure.groups(mlp, p, jnp.ones((1, 3)))
      >>> m = structure.select(gs, jp.criteria.magnitude(p), 0.5)
      >>> m["b1"].tolist(), m["w2"][:, 0].tolist()
      ([False, False, True, True], [False, False, True, True])
      >>> m = structure.select(gs, jp.criteria.magnitude(p), 0.75, round_to=2)
      >>> m["b1"].tolist()  # 1 channel kept, rounded up to 2
      [False, False, True, True]

    References:
      Fang et al., "DepGraph", 2023. https://arxiv.org/abs/2301.12900
      Torch-Pruning's ``max_pruning_ratio`` and ``round_to``.
      https://github.com/VainF/Torch-Pruning
    """
    masks = _select_warned(
        groups, scores, sparsity, reduce, where, scope, max_sparsity, round_to, normalize
    )
    return mirror_variables(scores, masks)


def _select_warned(
    groups,
    scores,
    sparsity,
    reduce,
    where,
    scope,
    max_sparsity,
    round_to,
    normalize,
    warn_unvoted: bool = True,
) -> Any:
    """:func:`select`, with its warnings (two frames below the user's call)."""
    _check_select_args(scope, max_sparsity, round_to, normalize)
    if scope == "isomorphic":
        # One global ranking per class of isomorphic groups, at the same
        # sparsity; the classes' masks never overlap, so AND joins them.
        _check_select_sparsity(sparsity)
        flat, aligned = _align(groups, scores)
        args = (reduce, where, "global", max_sparsity, round_to, normalize, warn_unvoted)
        masks = None
        for members in isomorphic_classes(aligned, flat):
            part = _select_warned([groups[i] for i in members], scores, sparsity, *args)
            masks = part if masks is None else jax.tree.map(jnp.logical_and, masks, part)
        if masks is None:  # no prunable group: nothing is cut
            masks = _select_warned(list(groups), scores, sparsity, *args)
        return masks
    _check_select_sparsity(sparsity)
    _, groups = _align(groups, scores)
    # Python's rounding for a concrete sparsity (as jp.masks.topk), exact float32
    # for a traced one; concrete counts enter the compiled program as values, so
    # another sparsity reuses it.
    counts = _drop_counts(sparsity, [g.channels for g in groups if g.prunable], scope)
    traced = isinstance(sparsity, jax.core.Tracer) or any(
        isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(scores)
    )
    # The prunable leaves, which the selection takes in place of `where`: the cached
    # eager program is keyed on them (a closure's later changes, and what it holds,
    # are not kept), and the warnings below read them.
    flags = tuple(prunable_flags(scores, where))
    if _explicit_axes(scores) is not None:
        # Explicit mesh axes (jax.make_mesh's default) refuse the gathers of the group
        # scores: run with them Auto, the masks typed like the scores.
        def impl(s, c):
            args = (reduce, flags, scope, max_sparsity, round_to, normalize, not traced)
            return _select_impl(tuple(groups), s, c, *args)

        out = _keeps_layout(impl)(scores, counts)
        if traced:
            return out
        masks, keeps = out
    elif traced:
        return _select_impl(
            tuple(groups), scores, counts, reduce, flags, scope, max_sparsity, round_to, normalize
        )
    else:
        # The program is cached by its static arguments; a user's `reduce` function
        # is traced afresh every call.
        run = run_once if callable(reduce) else run_cached
        masks, keeps = run(
            _select_impl,
            tuple(groups),
            scores,
            counts,
            reduce,
            flags,
            scope,
            max_sparsity,
            round_to,
            normalize,
            True,
            static_argnums=(0, 3, 4, 5, 6, 7, 8, 9),
        )
        masks = _placed_like(masks, scores)  # eager masks of sharded scores: sharded like them
    if round_to is not None and scope == "layer" and isinstance(sparsity, int | float):
        _warn_round_to_cancels(groups, keeps, sparsity, int(round_to), max_sparsity)
    voted = {i for i in keeps if any(flags[m.leaf] for m in groups[i].members)}
    unvoted = {i: k for i, k in keeps.items() if i not in voted}
    if not warn_unvoted:
        # A selection's select_fn: a group no `where` member votes for keeps its
        # masks there (nothing of it is cut), so only voted groups can collapse.
        keeps = {i: keeps[i] for i in voted}
    _warn_emptied(groups, keeps, float(sparsity), scope, max_sparsity)
    if warn_unvoted:
        _warn_unvoted(groups, unvoted)
    return masks


def _normalized(v: jax.Array, how: str | None) -> jax.Array:
    """Returns one group's importances ``v`` on a common scale (see :func:`select`).

    The statistic is over the live channels (importance > 0) only: a channel
    already pruned (importance exactly 0, as when a schedule's refresh or a
    repeated :func:`select` scores masked params) would otherwise pull a
    group's mean down and rate its survivors ``channels / live`` times higher,
    protecting the groups pruned most (Torch-Pruning removes such channels
    physically, so its statistics never see them). Non-live channels still
    rank lowest: ``v / scale`` keeps them <= 0, and ``"gaussian"`` sends them
    to ``-inf``. A group with no live channel is left at 0 (or ``-inf``).
    """
    if how is None:
        return v
    tiny = jnp.finfo(jnp.float32).tiny
    live = v > 0
    n = jnp.maximum(jnp.sum(live, dtype=v.dtype), 1)
    total = jnp.sum(jnp.where(live, v, 0))
    if how == "gaussian":
        mean = total / n
        std = jnp.sqrt(jnp.sum(jnp.where(live, (v - mean) ** 2, 0)) / n)
        return jnp.where(live, (v - mean) / jnp.maximum(std, tiny), -jnp.inf)
    scale = {"mean": total / n, "max": jnp.max(v), "sum": total}[how]
    return v / jnp.maximum(scale, tiny)


def _select_impl(
    groups,
    scores,
    counts,
    reduce,
    flags,
    scope,
    max_sparsity=None,
    round_to=None,
    normalize=None,
    keeps=False,
):
    """Masks of :func:`select`; with ``keeps``, also ``{group index: keep-vector}``.

    ``counts``: :func:`_drop_counts` of the prunable groups; ``flags``: a tuple
    with one bool per leaf of ``scores``, ``where``'s (:func:`prunable_flags`).
    """
    # One compiled program instead of thousands of eager ops (topk, scatters per member).
    # ``groups`` are aligned on ``scores`` already (select did it).
    live = [i for i, g in enumerate(groups) if g.prunable]
    flat, _ = leaves_with_paths(scores)
    imps = _summed([groups[i] for i in live], flat, flags, _reducer(reduce))
    if scope == "global":
        imps = [_normalized(v, normalize) for v in imps]
    by_group = dict(zip(live, _keeps(imps, counts, scope, max_sparsity, round_to), strict=True))
    masks = _masks_from_keep(groups, scores, by_group)
    return (masks, by_group) if keeps else masks


def _drop_counts(sparsity, sizes: list[int], scope: str):
    """Returns ``round(sparsity * n)`` as int32: one per group of ``sizes`` (``"layer"``), or
    one for all their channels (``"global"``); Python's rounding for a concrete sparsity."""
    if scope == "layer":
        return [_counts._count(sparsity, c) for c in sizes]
    return _counts._count(sparsity, sum(sizes))


def _keeps(imps, counts, scope, max_sparsity, round_to) -> list[jax.Array]:
    """Keep-vectors of :func:`select`, one per group's importances in ``imps``.

    ``counts``: :func:`_drop_counts` of the groups (the channels to drop).

    Without limits these are :func:`~jaxprune.masks.topk`'s (``"layer"``) or
    :func:`~jaxprune.masks.global_topk`'s (``"global"``) selections over the
    groups' importances, bit for bit; ``max_sparsity`` and ``round_to`` only
    lower the per-group counts (see :func:`select`).
    """
    sizes = [int(v.shape[0]) for v in imps]
    keys = [ordered_keys(v) for v in imps]
    if scope == "layer":
        drops = list(counts)
        if max_sparsity is not None:
            drops = [
                jnp.minimum(d, _counts._cap(max_sparsity, c))
                for d, c in zip(drops, sizes, strict=True)
            ]
    else:
        total = counts
        ranked = keys
        if max_sparsity is not None:
            # Only each group's ``cap`` lowest channels may go (the total is clipped
            # to what the caps allow).
            caps = [_counts._cap(max_sparsity, c) for c in sizes]
            ranked, total = _masks._capped_keys(keys, caps), jnp.minimum(total, sum(caps))
        kept = _select(ranked, total) if keys else []
        if round_to is None:
            return kept
        drops = [c - jnp.sum(m, dtype=jnp.int32) for c, m in zip(sizes, kept, strict=True)]
    if round_to is not None:
        r = int(round_to)
        drops = [
            c - jnp.minimum(c, -(-(c - d) // r) * r) for c, d in zip(sizes, drops, strict=True)
        ]
    # Within a group the dropped channels are always its lowest (ties by index), so
    # one count per group gives the keep-vector.
    return [_select([k], d.astype(jnp.int32))[0] for k, d in zip(keys, drops, strict=True)]


def selection(
    groups: Sequence[Group],
    *,
    reduce: str | Callable[..., jax.Array] = "l2",
    scope: str = "layer",
    max_sparsity: float | None = None,
    round_to: int | None = None,
    normalize: str | None = None,
) -> Callable[..., Any]:
    """Returns a ``(scores, sparsity, *, where) -> masks`` selection for ``jp.prune(scope=...)``.

    Group-wise channel pruning ramped by any schedule inside the train step;
    the result shrinks exactly with :func:`~jaxprune.structure.shrink`.
    ``reduce``, ``scope``, ``max_sparsity``, ``round_to`` and ``normalize`` are
    those of :func:`select` (checked here, before any training starts). The
    groups may come from the full tree (an nnx model's state, a linen module's
    variables with ``batch_stats``) while ``jp.prune`` sees only the params
    (``nnx.Optimizer(..., wrt=nnx.Param)``, a linen ``TrainState``'s
    ``params``): members are matched by path (see :func:`select`).

    Args:
      groups: from :func:`groups`; the returned function selects their channels.
      reduce: per-member reduction (see :func:`group_scores`), default ``"l2"``.
      scope: ``"layer"`` (the default, per group), ``"global"`` or ``"isomorphic"``.
      max_sparsity: the largest fraction of any one group's channels to drop, in
        ``[0, 1]`` (a Python number); default None for no cap.
      round_to: keep a multiple of this many channels in each group (an ``int >= 1``);
        default None to keep exactly what the selection keeps.
      normalize: None (the default), ``"mean"``, ``"max"``, ``"sum"`` or
        ``"gaussian"``: how each group's importances are scaled before a global ranking.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, jaxprune as jp
      >>> from jaxprune import structure
      >>> def mlp(p, x):
      ...     return jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"]
      >>> p = {"w1": jnp.arange(12.).reshape(3, 4), "b1": jnp.ones(4), "w2": jnp.ones((4, 2))}
      >>> sel = structure.selection(structure.groups(mlp, p, jnp.ones((1, 3))))
      >>> tx = jp.prune(optax.sgd(0.0), sparsity=0.5, scope=sel)
      >>> u, s = tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)
      >>> jp.get_masks(s)["w2"][:, 0].tolist()
      [False, False, True, True]
    """

    _check_select_args(scope, max_sparsity, round_to, normalize)
    _reducer(reduce)  # an unknown reduce fails here, not at the first refresh under jit
    options = {"reduce": reduce, "scope": scope, "max_sparsity": max_sparsity}
    options.update(round_to=round_to, normalize=normalize)

    @mirrors_variables
    def select_fn(scores: Any, sparsity: Any, *, where: Where | None = None) -> Any:
        # Groups where selects no member of keep all their masks (replaced by True
        # below), so their zero importances cut nothing: no warning about them.
        full = _select_warned(groups, scores, sparsity, where=where, warn_unvoted=False, **options)
        # jp.prune keeps a scalar True for leaves it does not prune (stable state shapes).
        flags = prunable_flags(scores, where)
        flat, treedef = leaves_with_paths(full)
        leaves = [m if f else jnp.ones((), bool) for (_, m), f in zip(flat, flags, strict=True)]
        return jax.tree.unflatten(treedef, leaves)

    return select_fn
