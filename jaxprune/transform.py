"""``prune(tx, ...)``: the optax wrapper that is the clock of the pipeline.

Inside the jitted train step it asks the schedule for today's sparsity, runs
criterion and selection under ``lax.cond`` on refresh steps, and enforces the
masks on every step: gradients of pruned entries are zeroed before the inner
optimizer sees them, and the emitted updates are ``where(mask, u, -params)`` so
that after ``optax.apply_updates`` pruned entries are exactly zero.

The refresh itself (criterion and selection to packed masks, shared with
``jp.dynamic.ste``) lives in :mod:`jaxprune._refresh`. Reading the pruning
state back out of an optimizer state (:func:`get_masks`,
:func:`find_prune_states`, :func:`state_bytes`, :func:`register_mask_state`)
lives in :mod:`jaxprune.state`; they are re-exported here.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune import bitmask as _bitmask
from jaxprune import criteria as _criteria
from jaxprune import masks as _masks
from jaxprune._compile import jit_by_content
from jaxprune._dynamic_moments import _reset_moments
from jaxprune._refresh import Selection, _reshard_like, _selector
from jaxprune._search import _explicit_axes, _vary_like
from jaxprune._tree import (
    Where,
    check_array_leaves,
    check_same_leaves,
    check_where,
    key_parts,
    leaves_with_paths,
    path_str,
    prunable_flags,
    unwrap_variables,
)
from jaxprune.schedules import Schedule, as_schedule, static_value
from jaxprune.stacked import _depth, _warn_no_stack
from jaxprune.state import find_prune_states, get_masks, register_mask_state, state_bytes

__all__ = [
    "PruneState",
    "prune",
    "get_masks",
    "find_prune_states",
    "register_mask_state",
    "state_bytes",
]


class PruneState(NamedTuple):
    """State of :func:`prune`.

    The masks are stored packed, one bit per prunable entry
    (:class:`~jaxprune.masks.PackedMask`: uint8 bytes of 8 entries along one
    axis whose length is a multiple of 8, preferably not the last), so the
    pruning state adds 1/32 of an f32 model to the inner optimizer's state
    (Adam's is 2x the model). ``state.masks`` unpacks them to bools.

    Storing no masks at all, with pruned entries implied by ``params == 0``,
    would cost zero bytes but is not safe in general: a kept weight that is
    exactly zero (a zero-initialised kernel, a bf16 update landing on 0) would
    be frozen as pruned, counts would drift from ``round(s * n)``, and
    :func:`get_masks` could not answer without the params. One bit keeps the
    masks exact for the price of one byte per eight parameters.

    Args:
      count: int32 scalar, the number of update steps taken (0 after ``init``); the
        schedule's step.
      packed_masks: a tree with the params' structure: a :class:`~jaxprune.masks.PackedMask`
        (uint8 bits) per prunable leaf, a scalar ``True`` for every other leaf.
      inner_state: the wrapped optimizer's state.
      criterion_state: a :class:`~jaxprune.criteria.StatefulCriterion`'s statistics;
        ``()`` for plain criteria.
      key_data: the uint32 raw PRNG key data (``jax.random.key_data``) of the ``key``
        given to :func:`prune`, or ``()`` if none was given.
    """

    count: jax.Array  # int32 [], number of update steps taken
    packed_masks: optax.Params  # PackedMask per prunable leaf (uint8 bits); else scalar True
    inner_state: optax.OptState  # the wrapped optimizer's state
    criterion_state: Any  # a StatefulCriterion's statistics; () for plain criteria
    key_data: Any  # uint32 raw PRNG key data (jax.random.key_data), or () if unused

    @property
    def masks(self) -> optax.Params:
        """The bool masks (params' structure; non-prunable leaves a scalar ``True``)."""
        return _masks.unpack(unwrap_variables(self.packed_masks))


# get_masks, find_prune_states and state_bytes find this state.
register_mask_state(PruneState)


def _initial_masks(params: Any, flags: list[bool]) -> Any:
    """Returns all-True packed masks; on concrete sharded params, sharded like them.

    Warns when a sharded leaf's packed mask cannot keep its layout (see
    :func:`jaxprune.bitmask.replicated_axis`): each refresh then gathers it.
    """
    flat, treedef = leaves_with_paths(params)
    leaves = []
    gathered = [
        (path_str(p), tuple(jnp.shape(x)), axis)
        for (p, x), f in zip(flat, flags, strict=True)
        if f and (axis := _bitmask.replicated_axis(x)) is not None
    ]
    if gathered:
        listed = "; ".join(f"{p} {shape}: axis {axis}" for p, shape, axis in gathered[:5])
        warnings.warn(
            f"jp.prune: the packed masks of {len(gathered)} sharded leaves cannot keep the "
            f"params' layout and are replicated ({listed}{'; ...' if len(gathered) > 5 else ''}): "
            "masks pack 8 entries of one axis per byte (the first axis whose length is a "
            "multiple of 8), and these leaves' shards along it are not a multiple of 8 long, "
            "so every mask refresh gathers each such leaf's whole mask. Fix: shard that axis "
            "into pieces whose length is a multiple of 8 (e.g. pad the layer), or shard "
            "another axis.",
            UserWarning,
            stacklevel=3,
        )
    for (_, x), f in zip(flat, flags, strict=True):
        if not f:
            leaves.append(jnp.ones((), bool))
        elif isinstance(x, jax.Array) and (
            not isinstance(x, jax.core.Tracer) or _explicit_axes(x) is not None
        ):
            # ones_like on a concrete array keeps its sharding; packing is then
            # an eager op whose output follows the input's layout. A traced
            # array with Explicit mesh axes carries its sharding in its type,
            # which ones_like keeps too (tx.init under jax.jit).
            leaves.append(_masks.pack(jnp.ones_like(x, dtype=bool)))
        else:
            leaves.append(_masks.pack(jnp.ones(jnp.shape(x), bool)))
    return jax.tree.unflatten(treedef, leaves)


def _enforce(tree: Any, masks: Any, flags: list[bool], fills: list[Any] | None = None) -> Any:
    """Returns ``tree`` with entries outside ``masks`` replaced by ``fills`` (default 0)."""
    flat, treedef = jax.tree.flatten(tree)
    mflat = jax.tree.leaves(masks)
    fills = fills if fills is not None else [None] * len(flat)
    out = [_fill(x, m, v) if f else x for x, m, f, v in zip(flat, mflat, flags, fills, strict=True)]
    return jax.tree.unflatten(treedef, out)


def _fill(x: Any, m: Any, v: Any) -> Any:
    if v is None:
        return jnp.where(m, x, jnp.zeros((), x.dtype))
    # In the wider of the two dtypes: bf16 updates of f32 params would round
    # -params, and pruned params would not come out exactly 0.
    dt = jnp.promote_types(x.dtype, v.dtype)
    return jnp.where(m, x.astype(dt), v.astype(dt))


def _check_state_fits(state: PruneState, params: Any) -> None:
    """Raises ``ValueError`` when the state's masks were built for other params (trace time)."""
    shapes = jax.eval_shape(_masks.unpack, state.packed_masks)
    got = [(path_str(p), tuple(m.shape)) for p, m in leaves_with_paths(shapes)[0]]
    want = [(path_str(p), tuple(jnp.shape(x))) for p, x in leaves_with_paths(params)[0]]
    if len(got) == len(want) and all(
        gp == wp and gs in ((), ws) for (gp, gs), (wp, ws) in zip(got, want, strict=True)
    ):
        return
    bad = [f"{wp} {ws}" for (wp, ws) in want if (wp, ws) not in got and (wp, ()) not in got]
    extra = sorted({gp for gp, _ in got} - {wp for wp, _ in want})
    raise ValueError(
        "the opt_state's masks were built for other params: params leaves without a fitting "
        f"mask: {bad[:8]}; masks for leaves params lacks: {extra[:8]}. Fix: build the opt_state "
        "with tx.init(params) for these params (a state restored from another model's "
        "checkpoint does not fit)."
    )


def _in_container_of(tree: Any, like: Any, is_leaf: Callable[[Any], bool] | None = None) -> Any:
    """Returns ``tree``'s leaves in the containers of ``like`` (trace time, no array op).

    Params whose containers changed since ``tx.init`` (a ``FrozenDict``
    stepped as a dict, an ``nnx.State`` as its pure dict) have the same leaf
    paths in the same order (checked by :func:`_check_state_fits`), but the
    two branches of the refresh's ``lax.cond`` must return one tree
    structure: the kept masks follow the params, as a refresh's new ones do.
    Likewise the params handed to the inner optimizer take the updates'
    containers (nnx Params, while the params were unwrapped).
    """
    leaves, treedef = jax.tree.flatten(tree, is_leaf=is_leaf)
    want = jax.tree.structure(like)
    if treedef == want:
        return tree
    return jax.tree.unflatten(want, leaves)


def _step_inputs(updates: Any, state: Any, params: Any, where: Where | None) -> tuple:
    """Returns ``(params, kept, flags)`` for a masking transform's update (trace-time checks).

    ``params`` unwrapped from nnx Variables; ``kept``, the state's packed masks
    in the params' containers; ``flags``, which leaves ``where`` prunes. Raises
    when the updates or the state's masks do not fit the params.
    """
    params = unwrap_variables(params)
    check_same_leaves(updates, params, "updates", "params")
    _check_state_fits(state, params)
    kept = _in_container_of(
        state.packed_masks, params, is_leaf=lambda x: isinstance(x, _masks.PackedMask)
    )
    return params, kept, prunable_flags(params, where)


def _check_tx(tx: Any, name: str) -> None:
    """Raises unless ``tx`` is a built optax transformation (``name`` wraps it)."""
    if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
        raise ValueError(
            f"tx must be an optax transformation (with init and update), got {tx!r}. Fix: "
            f"build it, e.g. {name}(optax.adam(1e-3), ...), not {name}(optax.adam, ...)."
        )


def _check_state_type(state: Any, field: str, name: str, kind: str) -> None:
    """Raises unless ``state`` is the ``kind`` (with a ``field``) that ``name``'s init builds."""
    if hasattr(state, field):
        return
    plain = isinstance(state, (dict, list, tuple))
    why = " (a checkpoint restored without a template gives plain dicts and lists)"
    raise ValueError(
        f"{name}'s update got a state of type {type(state).__name__}, not the {kind} its "
        "init builds"
        + (why if plain else "")
        + ". Fix: restore into a template, jp.restore(d, params=params, "
        "opt_state=tx.init(params)) (or orbax's restore with the target tree), then "
        "resume with that opt_state."
    )


def prune(
    tx: optax.GradientTransformation,
    *,
    sparsity: float | Schedule | Callable[[jax.Array], jax.Array],
    criterion: Callable[..., Any] | _criteria.StatefulCriterion = _criteria.magnitude,
    scope: str | Selection = "layer",
    where: Where | None = None,
    key: jax.Array | None = None,
    reset_moments: bool = False,
    skip_inner_on_refresh: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Returns ``tx`` wrapped so that it prunes and keeps pruned entries at exactly zero.

    Masks refresh inside ``update`` on the schedule's steps; on every step the
    gradients of pruned entries are zeroed before ``tx`` sees them and the
    emitted updates set pruned params to exactly 0 after ``optax.apply_updates``
    (``p + (-p)``; a param that is already ``inf`` or NaN, after training has
    diverged, becomes NaN instead, as no update added to it can give 0: use
    :func:`jaxprune.apply_masks` on such params, or ``optax.apply_if_finite``
    to skip non-finite steps).
    Nothing else changes in the training loop, which may be jitted as usual
    (called outside ``jax.jit``, ``update`` compiles itself once per params
    structure and runs compiled). The params' containers may change between
    ``init`` and ``update`` (a ``FrozenDict`` stepped as a dict, an
    ``nnx.State`` as its pure dict) as long as the leaf paths and shapes do
    not: the masks then follow the params' containers.
    (Pruning by ``-params`` updates makes a pruned ``inf`` parameter ``nan``:
    params must be finite.)

    Wrap the whole optimizer: ``jp.prune`` must be the last transform the
    updates pass through. A transform chained after it
    (``optax.chain(jp.prune(optax.scale_by_adam(), ...), optax.scale(-lr))``)
    rescales or clips the ``-params`` updates, and pruned entries no longer
    land on 0; write ``jp.prune(optax.chain(optax.scale_by_adam(),
    optax.scale(-lr)), ...)``. Optimizers that keep a second copy of the
    params in their state are not supported as such: schedule-free's
    evaluation params are not masked (mask them with ``jp.apply_masks``), and
    ``optax.lookahead`` cannot go inside ``jp.prune`` (its params are a pair)
    nor around it (each sync step moves the fast weights towards the unmasked
    slow ones, bringing pruned weights back).

    ``tx`` sees the pruned model: masked gradients and, on a refresh step,
    params with the newly pruned entries already 0, so optimizers that read
    params or norms (LAMB, LARS, Adafactor, weight decay) step the kept
    weights as on the pruned model alone. Put ``optax.clip_by_global_norm``
    inside (``jp.prune(optax.chain(optax.clip_by_global_norm(1.0),
    optax.adam(lr)), ...)``) to clip the pruned model's gradient norm; before
    ``jp.prune`` the norm also counts the pruned entries' gradients. Put
    ``optax.apply_if_finite`` outside (``optax.apply_if_finite(jp.prune(...),
    n)``): a skipped step then updates no criterion state and refreshes no
    mask, while inside, a non-finite step would still feed a stateful
    criterion (its state stays NaN) and a refresh. Under gradient
    accumulation, ``optax.MultiSteps(jp.prune(...), k)`` counts schedule steps
    in optimizer steps and refreshes on the accumulated gradients;
    ``jp.prune(optax.MultiSteps(...), k)`` counts micro-steps (one
    micro-batch's gradients at a refresh). A weight that a refresh
    brings back (criteria whose masks are not nested: ``random``,
    ``movement``, the EMA criteria) resumes with the optimizer moments it had
    when it was pruned, decayed while it was; ``reset_moments=True`` zeroes
    them, as :mod:`jaxprune.dynamic` does.

    Args:
      tx: the inner optimizer (any optax transformation).
      sparsity: a float in ``[0, 1]`` (a Python or NumPy number, pruned once,
        at step 0), a :class:`~jaxprune.schedules.Schedule` (e.g.
        ``jp.schedules.polynomial``) or a callable ``step -> sparsity``
        (refreshed every step). A ``jax.Array`` is refused: it is what
        ``optax.inject_hyperparams`` around ``jp.prune`` would pass, and a
        transform rebuilt at every step cannot follow it (see
        :func:`~jaxprune.schedules.as_schedule`); pass ``float(s)``.
      criterion: ``(params, [grads], *, [key], [**extra]) -> scores``, or a
        :class:`~jaxprune.criteria.StatefulCriterion`. ``grads`` are the
        step's gradients; ``key`` comes from ``tx.update(..., key=k)`` or, if not
        given there, from the ``key`` passed here folded with the step; any
        other keyword passed to ``tx.update`` reaches it by name (one it
        requires and the update lacks, such as ``jp.criteria.obd``'s
        ``hessian_diag``, is a ``ValueError`` when the step is traced). With
        ``jp.criteria.magnitude`` or ``jp.criteria.saliency``, a
        ``"layer"``/``"global"`` scope (or the capped
        ``functools.partial(jp.masks.global_topk, max_sparsity=c)``) and
        float32 params, the scores are
        recomputed inside the selection's search instead of being stored
        (same masks, see :func:`~jaxprune.masks.fused_select`), so the refresh
        adds no full-size buffer to the train step's scratch memory. (With
        bfloat16 or float16 params XLA:CPU materializes the recomputed float32
        keys at every pass, so the scores are stored once instead, which
        takes less.) A ``grads=``
        keyword to ``tx.update`` (e.g. full-batch or accumulated gradients)
        replaces the step's gradients as the criterion's ``grads``.
      scope: ``"layer"`` (exact count per leaf), ``"global"`` (exact count
        across all prunable leaves), or a selection function
        ``(scores, sparsity, *, where) -> masks`` (e.g. a structured one).
        Its masks on leaves ``where`` did not choose are not enforced (a
        structured selection's bias masks: widen ``where`` to enforce them);
        a scalar on a chosen leaf keeps (``True``) or prunes (``False``) it
        whole.
      where: predicate ``(path, leaf) -> bool`` choosing the prunable leaves;
        default: floating leaves with ``ndim >= 2``.
      reset_moments: zero the inner optimizer's per-entry moments (adam's
        ``mu``/``nu``, momentum traces: every params-shaped subtree of its
        state, found by structure as :mod:`jaxprune.dynamic` finds them) of
        every entry a refresh prunes or brings back, so a returning weight
        starts with fresh moments. Off by default: it adds two unpacks and a
        comparison to every step, and masks that only grow sparser (magnitude
        and saliency under a rising schedule) leave pruned moments unused.
      skip_inner_on_refresh: on a refresh step, skip ``tx``'s update: its
        state is left as it was and the kept params do not move; the step
        only prunes (the newly pruned entries are set to 0, and
        ``reset_moments`` still applies). This is jaxpruner's
        ``skip_gradients`` (Lee et al., 2023): ``tx`` then never steps on
        gradients taken at the weights before the refresh, whose newly pruned
        entries still shaped the loss. Off by default, when the refresh step
        is also an ordinary optimizer step.
      key: PRNG key for criteria that draw randomness (e.g. ``random``),
        any implementation. Folded with the step, it draws new scores at
        every refresh, so random masks of a gradual schedule are not nested;
        for nested random masks pass fixed scores through ``tx.update(...,
        key=k)`` with the same ``k`` at every step.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      :class:`PruneState`; read the masks with :func:`get_masks`.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, jaxprune as jp
      >>> params = {"w": jnp.arange(1.0, 9.0).reshape(2, 4), "b": jnp.zeros(4)}
      >>> tx = jp.prune(optax.sgd(0.1), sparsity=0.5)
      >>> state = tx.init(params)
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, state = jax.jit(tx.update)(grads, state, params)
      >>> params = optax.apply_updates(params, updates)
      >>> float(jp.sparsity(params)), params["w"][0].tolist()
      (0.5, [0.0, 0.0, 0.0, 0.0])

    References:
      Zhu & Gupta, "To prune, or not to prune", 2017. https://arxiv.org/abs/1710.01878
      Lee et al., "JaxPruner: A concise library for sparsity research", 2023.
      https://arxiv.org/abs/2304.14082
    """
    _check_tx(tx, "jp.prune")
    check_where(where)
    # The criterion is checked before the sparsity: under
    # optax.inject_hyperparams(jp.prune) it is an array, and its message says
    # why more plainly than the sparsity's.
    sel, where = _selector(criterion, scope, where)
    schedule = as_schedule(sparsity)
    if not isinstance(reset_moments, bool):
        raise ValueError(
            f"reset_moments must be True or False (zero the moments of entries a refresh "
            f"prunes or brings back), got {reset_moments!r}. Fix: reset_moments=True."
        )
    if not isinstance(skip_inner_on_refresh, bool):
        raise ValueError(
            f"skip_inner_on_refresh must be True or False (skip the inner optimizer's update on "
            f"refresh steps, as jaxpruner's skip_gradients), got {skip_inner_on_refresh!r}. "
            "Fix: skip_inner_on_refresh=True."
        )
    inner = optax.with_extra_args_support(tx)
    key_data, key_impl = key_parts(key, "key") if key is not None else ((), None)

    def init_fn(params):
        check_array_leaves(params, "params")  # an unfiltered equinox module: say so
        flags = prunable_flags(params, where)
        if not any(flags):
            paths = [path_str(p) for p, _ in leaves_with_paths(params)[0]]
            warnings.warn(
                f"jp.prune: `where` selects none of the params' leaves, so nothing will be "
                f"pruned; the leaves are {paths[:10]}{' ...' if len(paths) > 10 else ''}. Fix: "
                "check the predicate (paths are tuples such as ('layers', 0, 'kernel'); a "
                "misspelt name matches nothing), or leave where=None for every float leaf "
                "with ndim >= 2.",
                stacklevel=2,
            )
        pure = unwrap_variables(params)
        if sel.stacked is not None and sel.fused is not None:
            # The fused search never calls per_layer's selection, which would
            # warn about a stacked= that matches no leaf: warn here instead.
            flat = leaves_with_paths(pure)[0]
            depths = [_depth(sel.stacked, p, x) for p, x in flat]
            _warn_no_stack(flat, depths, "jp.prune(scope=jp.masks.per_layer(...))", stacklevel=3)
        return PruneState(
            count=jnp.zeros((), jnp.int32),
            packed_masks=_initial_masks(pure, flags),
            inner_state=inner.init(params),
            criterion_state=sel.crit.init(pure),
            # A copy: key_data shares the caller's key buffer, which donating this
            # state would otherwise free (for the caller and every later init).
            key_data=jax.tree.map(jnp.copy, key_data),
        )

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError(
                "jp.prune needs the current params to enforce masks: call "
                "tx.update(grads, state, params). (nnx.Optimizer does this for you.)"
            )
        _check_state_type(state, "packed_masks", "jp.prune", "PruneState")
        check_array_leaves(params, "params")
        params, kept, flags = _step_inputs(updates, state, params, where)
        step = state.count
        grads, extra = sel.criterion_args(updates, params, state, extra_args, key_impl, "jp.prune")
        cstate = _criteria.call_with(sel.crit.update, state.criterion_state, params, grads, **extra)

        # Params typed with Explicit mesh axes: masks are retyped like them.
        explicit = _explicit_axes(params) is not None

        def refresh():
            sparsity = functools.partial(static_value, schedule, step)
            return sel.packed(params, grads, cstate, extra, sparsity, flags, kept)

        refreshing = schedule.is_update_step(step)
        # Inside shard_map both branches must vary over the same mesh axes (no-op outside).
        packed = jax.lax.cond(
            refreshing,
            lambda: _vary_like(refresh(), params, updates),
            lambda: _vary_like(kept, params, updates),
        )
        # Unpacking is elementwise and fuses into the two enforcements below.
        masks = _masks.unpack(packed)
        if explicit:
            masks = _reshard_like(masks, params)
        updates = _enforce(updates, masks, flags)
        # The inner optimizer sees the pruned model: on a refresh step the entries
        # just pruned are not 0 yet, and optimizers that read the params (LAMB's and
        # LARS's trust ratios, Adafactor's parameter scale, weight decay) would
        # otherwise size the kept weights' steps by them. Elsewhere this is the
        # identity, and unused (adam, sgd) it costs nothing.
        inner_params = _enforce(params, masks, flags)
        # In the updates' containers (nnx Params from nnx.split(model, nnx.Param)
        # while params were unwrapped above): optimizers that map updates and
        # params together (adamw's weight decay) need one structure. Trace time only.
        inner_params = _in_container_of(inner_params, updates)
        u_treedef = jax.tree.structure(updates)

        def step_inner():
            return inner.update(updates, state.inner_state, inner_params, **extra_args)

        def skip_inner():
            # Zeros and the old state, typed as step_inner's outputs: lax.cond
            # needs one type per output. eval_shape computes nothing.
            new_updates, new_state = jax.eval_shape(step_inner)
            zeros = jax.tree.map(lambda u, o: jnp.zeros_like(u, o.dtype), updates, new_updates)
            old = jax.tree.map(lambda x, o: jnp.asarray(x, o.dtype), state.inner_state, new_state)
            return zeros, old

        if skip_inner_on_refresh:
            updates, inner_state = jax.lax.cond(refreshing, skip_inner, step_inner)
        else:
            updates, inner_state = step_inner()
        if reset_moments:
            # Entries the refresh pruned or brought back, after the step: they
            # leave it with exactly zero moments (none change off refresh steps).
            old = _masks.unpack(kept)
            if explicit:
                old = _reshard_like(old, params)
            changed = [
                jnp.logical_xor(m, o) if f else jnp.zeros((), bool)
                for m, o, f in zip(jax.tree.leaves(masks), jax.tree.leaves(old), flags, strict=True)
            ]
            treedefs = (jax.tree.structure(params), u_treedef)
            inner_state = _reset_moments(inner_state, treedefs, changed)
        # Negated only where masks can apply (a bool leaf has no negation).
        p_leaves = jax.tree.leaves(params)
        neg_params = [-p if f else None for p, f in zip(p_leaves, flags, strict=True)]
        updates = _enforce(updates, masks, flags, neg_params)
        new_state = PruneState(
            count=optax.safe_increment(step),
            packed_masks=packed,
            inner_state=inner_state,
            criterion_state=cstate,
            key_data=state.key_data,
        )
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, _jit_when_eager(update_fn))


def _jit_when_eager(update_fn: Callable[..., Any]) -> Callable[..., Any]:
    """Returns ``update_fn`` running under one cached ``jax.jit`` when called outside a trace.

    Called eagerly (``nnx.Optimizer.update`` without ``nnx.jit``, a quick
    experiment), the update's ``lax.cond`` would be traced and compiled anew
    at every call, its branches being new closures: about a second per step
    even when nothing refreshes. Jitted once per transform, it compiles once
    per argument structure, and a transform built anew with the same
    configuration (``optax.inject_hyperparams`` around ``jp.prune`` builds one
    at every update; a notebook cell run again) runs the program compiled for
    the first one (:func:`~jaxprune._compile.jit_by_content`). Inside a trace
    (the user's jitted step), or with extra arguments that are not arrays or
    numbers, ``update_fn`` runs as is. Python numbers among the extra
    arguments are traced, unless the update needs their values (a criterion
    branching on a ``bool`` flag): then they are static, as inside the
    user's own ``jax.jit``, with one program per distinct value.
    """
    jitted = jit_by_content(update_fn)
    kinds = (jax.Array, np.ndarray, np.generic, int, float, bool)
    by_value: dict[tuple, Callable[..., Any]] = {}  # static Python numbers -> program
    static = {"needed": False}

    def with_static(updates, state, params, extra_args):
        py = {k: v for k, v in extra_args.items() if type(v) in (bool, int, float)}
        key = tuple(sorted((k, type(v).__name__, v) for k, v in py.items()))
        if key not in by_value:
            if len(by_value) >= 64:  # a number changing every step: keep memory bounded
                by_value.clear()
            by_value[key] = jit_by_content(functools.partial(update_fn, **py))
        rest = {k: v for k, v in extra_args.items() if k not in py}
        return by_value[key](updates, state, params, **rest)

    @functools.wraps(update_fn)
    def wrapper(updates, state, params=None, **extra_args):
        leaves = jax.tree.leaves((updates, state, params, extra_args))
        if (
            params is not None
            and not any(isinstance(x, jax.core.Tracer) for x in leaves)
            and all(isinstance(x, kinds) for x in leaves)
            # A number passed as key (a seed instead of a PRNG key) runs as is, so the
            # criterion's check names the number rather than its tracer.
            and not isinstance(extra_args.get("key"), int | float | np.generic)
        ):
            python_numbers = any(type(v) in (bool, int, float) for v in extra_args.values())
            if python_numbers and static["needed"]:
                return with_static(updates, state, params, extra_args)
            try:
                return jitted(updates, state, params, **extra_args)
            except jax.errors.ConcretizationTypeError:
                if not python_numbers:
                    raise
                static["needed"] = True  # the update reads a number's value in Python
                return with_static(updates, state, params, extra_args)
        return update_fn(updates, state, params, **extra_args)

    wrapper.jitted = jitted.jitted  # its compile cache, for tests and the curious
    return wrapper
