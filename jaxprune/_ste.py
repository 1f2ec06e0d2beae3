"""Straight-through sparse training (STE, SR-STE): ``jp.dynamic.ste``.

The params the training loop holds are sparse; the optimizer state keeps a
dense copy of the prunable weights. At every step the gradient taken at the
sparse params updates the dense weights (straight through the mask: pruned
entries get their gradient too), and the masks are selected again from the
updated dense weights, so a pruned weight whose dense value grows back comes
back. The emitted updates land the params on ``where(masks, dense, 0)``,
exactly: nothing changes in the training loop.

Re-exported as :func:`jaxprune.dynamic.ste`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxprune import criteria as _criteria
from jaxprune import masks as _masks
from jaxprune._refresh import Selection, _reshard_like, _selector
from jaxprune._search import _explicit_axes
from jaxprune._tree import (
    Where,
    check_array_leaves,
    check_where,
    key_parts,
    leaves_with_paths,
    path_str,
    prunable_flags,
    unwrap_variables,
)
from jaxprune.schedules import Schedule, as_schedule, static_value
from jaxprune.state import register_mask_state
from jaxprune.transform import (
    _check_state_type,
    _check_tx,
    _in_container_of,
    _initial_masks,
    _jit_when_eager,
    _step_inputs,
)

__all__ = ["SteState", "ste"]


class SteState(NamedTuple):
    """State of :func:`ste`.

    ``dense`` has the params' tree structure: the dense weights of each
    prunable leaf, in the param's dtype, and a scalar 0 placeholder on the
    other leaves (whose params are their own dense values). It makes the
    pruning state as large as the prunable weights themselves, on top of the
    inner optimizer's state and the packed masks (one bit per entry).

    Args:
      count: int32 scalar, the number of update steps taken.
      packed_masks: the masks the params hold now, a tree with the params' structure:
        a :class:`~jaxprune.masks.PackedMask` per prunable leaf, a scalar ``True``
        elsewhere.
      dense: the dense weights of each prunable leaf (the param's dtype), a scalar 0
        placeholder on the other leaves.
      inner_state: the wrapped optimizer's state.
      criterion_state: a :class:`~jaxprune.criteria.StatefulCriterion`'s statistics;
        ``()`` for plain criteria.
      key_data: the uint32 raw PRNG key data (``jax.random.key_data``) of the transform's
        ``key``, or ``()`` if none was given.
    """

    count: jax.Array  # int32 [], number of update steps taken
    packed_masks: optax.Params  # masks the params hold now (PackedMask per prunable leaf)
    dense: optax.Params  # dense weights per prunable leaf; scalar 0 elsewhere
    inner_state: optax.OptState  # the wrapped optimizer's state
    criterion_state: Any  # a StatefulCriterion's statistics; () for plain criteria
    key_data: Any  # uint32 raw PRNG key data, or () if unused

    @property
    def masks(self) -> optax.Params:
        """The bool masks (params' structure; non-prunable leaves a scalar ``True``)."""
        return _masks.unpack(unwrap_variables(self.packed_masks))


register_mask_state(SteState)


def _check_decay(decay: Any) -> float:
    try:
        v = float(decay)
    except (TypeError, ValueError):
        v = math.nan
    if isinstance(decay, bool) or not math.isfinite(v) or v < 0:
        raise ValueError(
            f"decay must be a finite number >= 0 (SR-STE's lambda_W, the weight decay of the "
            f"pruned entries' dense weights), got {decay!r}. Fix: decay=0.0 for plain STE, or "
            "e.g. decay=2e-4 as in Zhou et al. (2021)."
        )
    return v


def _level(schedule: Schedule, step: jax.Array) -> jax.Array:
    """The sparsity selected at ``step``: the schedule at its latest refresh step ``<= step``.

    Masks are selected again at every step from ``begin_step`` on; the level
    moves only on the schedule's refresh steps, so ``frequency`` keeps its
    meaning (``polynomial(..., frequency=100)`` raises the sparsity every 100
    steps).
    """
    begin, freq, end = schedule.begin_step, schedule.frequency, schedule.end_step
    last = begin + ((jnp.maximum(step, begin) - begin) // freq) * freq
    if end is not None:
        last = jnp.where(step >= end, end, jnp.minimum(last, end))
    return static_value(schedule, last)


def ste(
    tx: optax.GradientTransformation,
    *,
    sparsity: float | Schedule | Callable[[jax.Array], jax.Array],
    criterion: Callable[..., Any] | _criteria.StatefulCriterion = _criteria.magnitude,
    scope: str | Selection = "layer",
    where: Where | None = None,
    key: jax.Array | None = None,
    decay: float = 0.0,
) -> optax.GradientTransformationExtraArgs:
    """Returns ``tx`` wrapped for straight-through sparse training (STE; SR-STE with ``decay``).

    The optimizer state keeps a dense copy ``w`` of every prunable weight;
    the params are ``where(m, w, 0)``. At each step ``t``, with the gradient
    ``g`` taken at the sparse params:

    1. ``w <- w + tx(g + decay * where(m, 0, w))``: the dense weights learn
       from the sparse model's gradient, pruned entries included (the
       straight-through estimator); ``decay`` is SR-STE's extra decay of the
       pruned entries' dense weights, added to their gradient.
    2. ``m <- scope(criterion(w), s_t)``: the masks are selected again, from
       the updated dense weights, at every step from the schedule's
       ``begin_step`` on. ``s_t`` is the schedule's value at its latest
       refresh step (a float sparsity holds from step 0; a
       ``polynomial(..., frequency=f)`` rises every ``f`` steps).
    3. The emitted updates set the params to ``where(m, w, 0)`` after
       ``optax.apply_updates``: pruned entries exactly 0, kept ones the
       dense weights (to the last bit in eager calls; under ``jax.jit`` XLA
       may fuse the inner optimizer's multiply-add, rounding once where the
       params' ``p + update`` rounds twice, so a few kept entries can differ
       from ``state.dense`` by one unit in the last place; the next step's
       update corrects it, and nothing accumulates).

    Unlike :func:`~jaxprune.prune`, a pruned weight keeps learning and comes
    back when its dense magnitude overtakes a kept one's; the mask and
    ``w`` settle together. With ``scope=jp.masks.nm`` (e.g.
    ``functools.partial(jp.masks.nm, n=2, m=4)``) this trains N:M sparse
    networks from scratch, SR-STE's setting. Before the first step the
    params are dense: step 0's gradient is the dense model's, and its update
    applies the first masks (as ``jp.prune``'s first refresh does).

    The cost is one selection per step (``jp.prune`` runs one per refresh)
    and one dense copy of the prunable weights in the optimizer state. The
    inner optimizer steps the dense weights, so its moments and weight decay
    are the dense weights'. The dense weights are the state's, copied by
    ``tx.init``: params changed outside the optimizer afterwards (loaded
    weights, a manual edit) are overwritten by the next step's ``where(m, w,
    0)``, so call ``tx.init`` on the params to train. As for ``jp.prune``,
    wrap the whole optimizer (``ste`` must be the last transform the updates
    pass through), and put ``optax.clip_by_global_norm`` inside.

    Args:
      tx: the inner optimizer (any optax transformation).
      sparsity: a float in ``[0, 1]``, a :class:`~jaxprune.schedules.Schedule`,
        or a callable ``step -> sparsity`` (as for :func:`~jaxprune.prune`).
      criterion: ``(params, [grads], *, [key]) -> scores``, computed on the
        dense weights; ``jp.criteria.magnitude`` (the default) is STE's.
        ``grads`` are the step's gradients (taken at the sparse params).
      scope: ``"layer"``, ``"global"`` or a selection ``(scores, sparsity, *,
        where) -> masks`` (e.g. N:M or blocks).
      where: predicate ``(path, leaf) -> bool`` choosing the prunable leaves;
        default: floating leaves with ``ndim >= 2``.
      key: PRNG key for criteria that draw randomness (folded with the step).
      decay: SR-STE's ``lambda_W`` (>= 0): weight decay of the pruned
        entries' dense weights, added to their gradients before ``tx``.
        0 is plain STE.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      :class:`SteState`; :func:`~jaxprune.get_masks` reads its masks and
      ``state.dense`` the dense weights.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, jaxprune as jp
      >>> params = {"w": jnp.array([[1.0, -2.0, 3.0, -4.0]])}
      >>> tx = jp.dynamic.ste(optax.sgd(1.0), sparsity=0.5)
      >>> state = tx.init(params)
      >>> grads = {"w": jnp.array([[-5.0, 0.0, 0.0, 0.0]])}  # pushes w[0, 0] to 6
      >>> updates, state = tx.update(grads, state, params)
      >>> optax.apply_updates(params, updates)["w"].tolist()
      [[6.0, 0.0, 0.0, -4.0]]
      >>> grads = {"w": jnp.array([[0.0, 3.0, 0.0, 0.0]])}  # a pruned weight keeps learning
      >>> updates, state = tx.update(grads, state, optax.apply_updates(params, updates))
      >>> state.dense["w"].tolist()
      [[6.0, -5.0, 3.0, -4.0]]
      >>> jp.get_masks(state)["w"].tolist()  # and comes back: |-5| > |-4|
      [[True, True, False, False]]

    References:
      Bengio, Leonard & Courville, "Estimating or propagating gradients
      through stochastic neurons for conditional computation", 2013.
      https://arxiv.org/abs/1308.3432
      Zhou et al., "Learning N:M fine-grained structured sparse neural
      networks from scratch" (SR-STE), ICLR 2021. https://arxiv.org/abs/2102.04010
    """
    _check_tx(tx, "jp.dynamic.ste")
    check_where(where)
    sel, where = _selector(criterion, scope, where)
    schedule = as_schedule(sparsity)
    decay = _check_decay(decay)
    inner = optax.with_extra_args_support(tx)
    key_data, key_impl = key_parts(key, "key") if key is not None else ((), None)

    def init_fn(params):
        check_array_leaves(params, "params")  # an unfiltered equinox module: say so
        pure = unwrap_variables(params)
        flags = prunable_flags(pure, where)
        if not any(flags):
            paths = [path_str(p) for p, _ in leaves_with_paths(pure)[0]]
            raise ValueError(
                f"jp.dynamic.ste: `where` selects none of the params' leaves {paths[:10]}, so "
                "there is nothing to train sparse. Fix: check the predicate, or leave "
                "where=None for every float leaf with ndim >= 2."
            )
        flat, treedef = jax.tree.flatten(pure)
        dense = [
            jnp.copy(x) if f else jnp.zeros((), jnp.result_type(x))
            for x, f in zip(flat, flags, strict=True)
        ]
        return SteState(
            count=jnp.zeros((), jnp.int32),
            packed_masks=_initial_masks(pure, flags),
            dense=jax.tree.unflatten(treedef, dense),
            inner_state=inner.init(params),
            criterion_state=sel.crit.init(pure),
            # A copy: key_data shares the caller's key buffer, which donating this
            # state would otherwise free (for the caller and every later init).
            key_data=jax.tree.map(jnp.copy, key_data),
        )

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError(
                "jp.dynamic.ste needs the current params: call tx.update(grads, state, params). "
                "(nnx.Optimizer does this for you.)"
            )
        _check_state_type(state, "dense", "jp.dynamic.ste", "SteState")
        check_array_leaves(params, "params")
        params, kept, flags = _step_inputs(updates, state, params, where)
        held = _in_container_of(state.dense, params)
        p_flat, treedef = jax.tree.flatten(params)
        h_flat = jax.tree.leaves(held)
        d_flat = [d if f else p for d, p, f in zip(h_flat, p_flat, flags, strict=True)]
        step = state.count
        grads, extra = sel.criterion_args(
            updates, params, state, extra_args, key_impl, "jp.dynamic.ste"
        )
        # Params typed with Explicit mesh axes: masks are retyped like them.
        explicit = _explicit_axes(params) is not None
        masks = _masks.unpack(kept)
        if explicit:
            masks = _reshard_like(masks, params)
        m_flat = jax.tree.leaves(masks)

        u_flat, u_treedef = jax.tree.flatten(updates)
        if decay:
            # SR-STE: the pruned entries' dense weights decay, through their gradient.
            u_flat = [
                u + (decay * jnp.where(m, 0, d)).astype(u.dtype) if f else u
                for u, m, d, f in zip(u_flat, m_flat, d_flat, flags, strict=True)
            ]
        dense = jax.tree.unflatten(treedef, d_flat)
        cstate = _criteria.call_with(sel.crit.update, state.criterion_state, dense, grads, **extra)
        inner_params = _in_container_of(dense, updates)
        steps, inner_state = inner.update(
            jax.tree.unflatten(u_treedef, u_flat), state.inner_state, inner_params, **extra_args
        )
        s_flat = jax.tree.leaves(steps)
        # optax.apply_updates' arithmetic, so kept params equal the dense weights (up to
        # one rounding where XLA fuses the inner step's multiply-add into this add).
        new_flat = [
            jnp.asarray(d + s).astype(jnp.result_type(d)) if f else d
            for d, s, f in zip(d_flat, s_flat, flags, strict=True)
        ]
        new_dense = jax.tree.unflatten(treedef, new_flat)

        def select():
            return sel.packed(
                new_dense, grads, cstate, extra, lambda: _level(schedule, step), flags, kept
            )

        packed = jax.lax.cond(step >= schedule.begin_step, select, lambda: kept)
        new_masks = _masks.unpack(packed)
        if explicit:
            new_masks = _reshard_like(new_masks, params)
        out = []
        for p, d, s, m, f in zip(
            p_flat, d_flat, s_flat, jax.tree.leaves(new_masks), flags, strict=True
        ):
            if not f:
                out.append(s)
                continue
            dt = jnp.promote_types(jnp.result_type(s), jnp.result_type(p))
            p_, d_, s_ = p.astype(dt), d.astype(dt), s.astype(dt)
            # Kept: p + (s + (d - p)) is d + s, bit for bit, when p == d (kept
            # before) or p == 0 (pruned before), as computed here; an FMA-fused
            # d + s may round differently by one ulp. Pruned: p - p is exactly 0.
            out.append(jnp.where(m, s_ + (d_ - p_), -p_))
        dense_state = [n if f else h for n, h, f in zip(new_flat, h_flat, flags, strict=True)]
        new_state = SteState(
            count=optax.safe_increment(step),
            packed_masks=packed,
            dense=jax.tree.unflatten(jax.tree.structure(held), dense_state),
            inner_state=inner_state,
            criterion_state=cstate,
            key_data=state.key_data,
        )
        return jax.tree.unflatten(jax.tree.structure(steps), out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, _jit_when_eager(update_fn))
