"""``prune(tx, ...)``: the optax wrapper that is the clock of the pipeline.

Inside the jitted train step it asks the schedule for today's sparsity, runs
criterion and selection under ``lax.cond`` on refresh steps, and enforces the
masks on every step: gradients of pruned entries are zeroed before the inner
optimizer sees them, and the emitted updates are ``where(mask, u, -params)`` so
that after ``optax.apply_updates`` pruned entries are exactly zero.

Reading the pruning state back out of an optimizer state (:func:`get_masks`,
:func:`find_prune_states`, :func:`state_bytes`, :func:`register_mask_state`)
lives in :mod:`jaxprune.state`; they are re-exported here.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune import criteria as _criteria
from jaxprune import masks as _masks
from jaxprune._search import _explicit_axes
from jaxprune._tree import (
    Where,
    check_same_leaves,
    check_same_structure,
    check_where,
    flagged,
    key_parts,
    leaves_with_paths,
    path_str,
    prunable_flags,
    unwrap_variables,
)
from jaxprune.schedules import Schedule, as_schedule
from jaxprune.stacked import _depth, _fast_path, _warn_no_stack, layer_where_of
from jaxprune.state import find_prune_states, get_masks, register_mask_state, state_bytes

__all__ = [
    "PruneState",
    "prune",
    "get_masks",
    "find_prune_states",
    "register_mask_state",
    "state_bytes",
]

Selection = Callable[..., Any]


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

_SCOPES = {"layer": _masks.topk, "global": _masks.global_topk}


def _resolve_selection(scope: str | Selection) -> Selection:
    if callable(scope):
        _check_selection(scope)
        return scope
    if not isinstance(scope, str) or scope not in _SCOPES:
        raise ValueError(
            f"scope must be 'layer' (per-leaf exact counts), 'global' (one threshold across "
            f"all prunable leaves) or a selection function (scores, sparsity, *, where) -> "
            f"masks, got {scope!r}. Fix: scope='layer' or scope='global'."
        )
    return _SCOPES[scope]


def _is_distribution(fn: Any) -> bool:
    """Is ``fn`` a ``jp.distributions`` distribution (``uniform``, ``erk``, ``explicit(...)``)?

    A ``functools.partial`` of one counts too. ``selection(...)`` closures and
    ``per_output`` live in the same module but return masks.
    """
    while isinstance(fn, functools.partial):
        fn = fn.func
    if getattr(fn, "__module__", None) != "jaxprune.distributions":
        return False
    qualname = getattr(fn, "__qualname__", "")
    return qualname in ("uniform", "erk") or qualname.startswith("explicit.")


def _label(fn: Any) -> str:
    """Names ``fn`` for an error message: ``jp.distributions.erk`` or its repr."""
    base = fn
    while isinstance(base, functools.partial):
        base = base.func
    qualname = getattr(base, "__qualname__", "")
    if qualname.startswith("explicit."):
        return "jp.distributions.explicit(...)"
    if qualname:
        return f"jp.distributions.{qualname}"
    return repr(fn)


def _check_selection(select: Selection) -> None:
    """Raises ``ValueError`` when ``select`` cannot be called as ``(scores, sparsity, *, where)``.

    Checked when ``prune`` is built: the step calls it so on its first
    refresh, where a ``TypeError`` would come from inside the jitted update.
    A callable whose signature cannot be read is left to the step.
    """
    if _is_distribution(select):
        # A distribution has the same signature as a selection, but returns one
        # float sparsity per leaf; _conform casts it to bool, so every leaf would
        # be kept whole (nothing pruned, no error). jaxpruner users pass erk as
        # `sparsity_distribution_fn`, so this mistake is the natural port.
        raise ValueError(
            f"scope takes a selection (scores, sparsity, *, where) -> masks, got the "
            f"distribution {_label(select)}, which returns one sparsity per leaf (used as "
            "scope it would prune nothing). Fix: wrap the distribution, e.g. "
            "scope=jp.distributions.selection(jp.distributions.erk)."
        )
    try:
        sig = inspect.signature(select)
    except (TypeError, ValueError):
        return
    try:
        sig.bind(None, None, where=None)
    except TypeError as e:
        name = getattr(select, "__name__", type(select).__name__)
        raise ValueError(
            f"scope must be a selection (scores, sparsity, *, where) -> masks, but {name}{sig} "
            f"cannot be called so ({e}); jp.prune passes `where` (the prunable leaves) by "
            "keyword. Fix: accept it and pass it on, e.g. scope=lambda scores, sparsity, *, "
            "where=None: jp.masks.topk(scores, sparsity, where=where)."
        ) from None


def _initial_masks(params: Any, flags: list[bool]) -> Any:
    """Returns all-True packed masks; on concrete sharded params, sharded like them."""
    flat, treedef = leaves_with_paths(params)
    leaves = []
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


def _conform(masks: Any, params: Any, flags: list[bool]) -> Any:
    """Returns a selection's ``masks`` in the state's form: full on prunable leaves, ``True`` else.

    A selection may leave a prunable leaf out with a scalar (a kernel in no
    prunable channel group, a layer ``nm(skip_indivisible=True)`` skips): it is
    broadcast. A mask on a leaf ``where`` did not choose (a structured
    selection's bias mask) is dropped: ``where`` decides what is enforced.
    """
    m_flat, treedef = jax.tree.flatten(masks)
    p_flat = jax.tree.leaves(params)
    if len(m_flat) != len(p_flat):
        check_same_structure(params, masks, ref_name="params", other_name="the selection's masks")
    out = []
    for m, p, f in zip(m_flat, p_flat, flags, strict=True):
        if not f:
            out.append(jnp.ones((), bool))
        elif jnp.shape(m) != jnp.shape(p):
            if jnp.ndim(m) != 0:
                raise ValueError(
                    f"the selection returned a mask of shape {jnp.shape(m)} for a leaf of shape "
                    f"{jnp.shape(p)}. Fix: a selection returns one bool mask per prunable leaf, "
                    "of the leaf's shape, or a scalar to keep (True) or prune (False) it whole."
                )
            out.append(jnp.broadcast_to(jnp.asarray(m, bool), jnp.shape(p)))
        else:
            out.append(jnp.asarray(m, bool))
    return jax.tree.unflatten(jax.tree.structure(params), out)


def _reshard_like(tree: Any, ref: Any) -> Any:
    """Returns ``tree`` with each leaf retyped to the sharding of ``ref``'s leaf of its shape.

    Only for arrays with Explicit mesh axes (sharding in types, the default of
    ``jax.make_mesh``), where ``jnp.where(mask, param, 0)`` and the branches
    of ``lax.cond`` must agree on shardings exactly: masks are typed like the
    params, and a refresh's packed masks like the state's. Leaves of another
    shape (a scalar ``True``) and trees of other sizes are left as they are.
    See https://docs.jax.dev/en/latest/notebooks/explicit-sharding.html.
    """
    flat, treedef = jax.tree.flatten(tree)
    refs = jax.tree.leaves(ref)
    if len(refs) != len(flat):
        return tree
    out = []
    for x, r in zip(flat, refs, strict=True):
        if (
            isinstance(r, jax.Array)
            and jnp.ndim(r)
            and jnp.shape(x) == jnp.shape(r)
            and _explicit_axes(r) is not None
            and jax.typeof(x).sharding != jax.typeof(r).sharding
        ):
            x = jax.sharding.reshard(x, jax.typeof(r).sharding)
        out.append(x)
    return jax.tree.unflatten(treedef, out)


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


class _Selector(NamedTuple):
    """How a refresh turns params (and grads) into packed masks.

    Built once per transform by :func:`_selector` and shared by
    :func:`prune` and ``jp.dynamic.ste``: the criterion, the selection, and
    whether the fused exact search (scores recomputed inside each count, see
    :func:`~jaxprune.masks.fused_select`) applies.
    """

    criterion: Any  # as the user gave it
    crit: _criteria.StatefulCriterion  # the same, as a stateful criterion
    select: Selection
    fused: str | None  # "layer" / "global" when the fused search applies, else None
    cap: Any  # global_topk's max_sparsity on the fused path, else None
    stacked: Any  # per_layer's stacked=, else None
    wants_key: bool  # the criterion draws randomness

    def criterion_args(self, updates, params, state, extra_args, key_impl, name):
        """Returns ``(grads, extra)``: the criterion's gradients and keywords for one step.

        A ``grads=`` keyword replaces the step's gradients; a criterion
        drawing randomness gets ``key=`` from the update or, else, the
        transform's key folded with the step. Checked at trace time: a
        keyword the criterion needs and the step lacks (obd's
        ``hessian_diag``) would be a bare TypeError from inside the jitted step.
        """
        extra = dict(extra_args)
        grads = updates
        if "grads" in extra:
            grads = extra.pop("grads")
            check_same_leaves(grads, params, "grads", "params")
            # Same leaves, maybe other containers (a FrozenDict): the params' tree.
            grads = jax.tree.unflatten(
                jax.tree.structure(params), [g for _, g in leaves_with_paths(grads)[0]]
            )
        if self.wants_key and "key" not in extra:
            if not isinstance(state.key_data, jax.Array):
                raise ValueError(
                    "this criterion draws randomness and needs a PRNG key: pass "
                    f"{name}(..., key=jax.random.key(0)) or tx.update(..., key=k)."
                )
            wrapped = jax.random.wrap_key_data(state.key_data, impl=key_impl)
            extra["key"] = jax.random.fold_in(wrapped, state.count)
        _criteria.check_extra_args(self.criterion, extra, given=sorted(extra_args))
        return grads, extra

    def packed(self, params, grads, cstate, extra, sparsity, flags, kept):
        """Returns the packed masks of ``params`` (traced inside a refresh).

        ``sparsity`` is a thunk returning the sparsity, called where the
        selection needs it (after a stored criterion's scores).
        """
        explicit = _explicit_axes(params) is not None
        # Recomputed scores pay only with float32 params (see prune's docstring).
        fuse = self.fused
        if any(
            f and jnp.result_type(x) != jnp.float32
            for x, f in zip(jax.tree.leaves(params), flags, strict=True)
        ):
            fuse = None
        if explicit and self.stacked is not None and (fuse == "layer" or self.cap is not None):
            fuse = None  # per_layer's own paths, made for Explicit meshes
        if fuse is not None:
            # Element-wise scores are recomputed where the search reads
            # them, never stored: no full-size scratch in the train step.
            def score_fn(src):
                return _criteria.call_with(self.criterion, src[0], grads=src[1], **extra)

            leaf_srcs = depths = None
            if fuse == "layer" or self.cap is not None:
                # One (param, grad) pair per leaf: each leaf's search traces
                # its own scores only (linear, not quadratic, tracing time).
                # check_same_leaves put the two in the same leaf order.
                p_flat, g_flat = leaves_with_paths(params)[0], leaves_with_paths(grads)[0]
                pairs = zip(p_flat, g_flat, strict=True)
                leaf_srcs = [(x, g) for (_, x), (_, g) in pairs]
                if self.stacked is not None:
                    depths = [_depth(self.stacked, p, x) for p, x in p_flat]
            masks = _masks.fused_select(
                fuse,
                score_fn,
                (params, grads),
                sparsity(),
                flags,
                leaf_srcs=leaf_srcs,
                depths=depths,
                max_sparsity=self.cap,
            )
        else:
            scores = _criteria.call_with(self.crit.score, cstate, params, grads=grads, **extra)
            check_same_leaves(scores, params, "the criterion's scores", "params")
            # The prunable leaves were chosen on the params; `where` is not
            # asked again about the scores, whose dtypes (float32) may differ.
            masks = self.select(scores, sparsity(), where=flagged(params, flags))
            masks = _conform(masks, params, flags)
        if not explicit:
            return _masks.pack(masks)
        packed = _masks.pack(_reshard_like(masks, params))
        return _reshard_like(packed, kept)


def _selector(criterion: Any, scope: Any, where: Where | None) -> tuple[_Selector, Where | None]:
    """Returns the refresh's :class:`_Selector` and the ``where`` it prunes (argument checks)."""
    # The criterion first: under optax.inject_hyperparams(jp.prune) it is an
    # array, and its message says why more plainly than the sparsity's.
    crit = _criteria.as_stateful(criterion)
    select = _resolve_selection(scope)
    # jp.masks.per_layer(select, stacked=...) names its inner selection and its
    # stacks: `where` is asked about one layer (a stack's [L, out] biases are
    # not kernels), and a per-layer topk / global_topk runs the fused searches.
    base, stacked = getattr(select, "per_layer", (select, None))
    if stacked is not None:
        where = layer_where_of(where, stacked)
    if isinstance(criterion, _criteria.StatefulCriterion):
        wants_key = _criteria.needs_key(criterion.update) or _criteria.needs_key(criterion.score)
    else:
        wants_key = _criteria.needs_key(criterion)
    fused = cap = None
    # topk, global_topk or functools.partial(global_topk, max_sparsity=c), as
    # per_layer recognizes them: per_layer(topk) searches each stack's layers
    # apart, per_layer(global_topk) without a cap is global_topk (the layers
    # keep the flatten order), and a cap holds per layer of each stack.
    search = _fast_path(base, (None,), {})
    if search is not None and any(criterion is c for c in _criteria.ELEMENTWISE):
        fused = {"topk": "layer", "global": "global"}[search[0]]
        cap = search[2]
    return _Selector(criterion, crit, select, fused, cap, stacked, wants_key), where


def prune(
    tx: optax.GradientTransformation,
    *,
    sparsity: float | Schedule | Callable[[jax.Array], jax.Array],
    criterion: Callable[..., Any] | _criteria.StatefulCriterion = _criteria.magnitude,
    scope: str | Selection = "layer",
    where: Where | None = None,
    key: jax.Array | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Returns ``tx`` wrapped so that it prunes and keeps pruned entries at exactly zero.

    Masks refresh inside ``update`` on the schedule's steps; on every step the
    gradients of pruned entries are zeroed before ``tx`` sees them and the
    emitted updates set pruned params to exactly 0 after ``optax.apply_updates``.
    Nothing else changes in the training loop, which may be jitted as usual
    (called outside ``jax.jit``, ``update`` compiles itself once, see
    :func:`jit_when_eager`). The params' containers may change between
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
    when it was pruned, decayed while it was; :mod:`jaxprune.dynamic` resets
    them.

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
    """
    if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
        raise ValueError(
            f"tx must be an optax transformation (with init and update), got {tx!r}. Fix: "
            "build it, e.g. jp.prune(optax.adam(1e-3), ...), not jp.prune(optax.adam, ...)."
        )
    check_where(where)
    # The criterion is checked before the sparsity: under
    # optax.inject_hyperparams(jp.prune) it is an array, and its message says
    # why more plainly than the sparsity's.
    sel, where = _selector(criterion, scope, where)
    schedule = as_schedule(sparsity)
    inner = optax.with_extra_args_support(tx)
    key_data, key_impl = key_parts(key, "key") if key is not None else ((), None)

    def init_fn(params):
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
            key_data=key_data,
        )

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError(
                "jp.prune needs the current params to enforce masks: call "
                "tx.update(grads, state, params). (nnx.Optimizer does this for you.)"
            )
        if not hasattr(state, "packed_masks"):
            plain = isinstance(state, (dict, list, tuple))
            raise ValueError(
                f"jp.prune's update got a state of type {type(state).__name__}, not the "
                "PruneState its init builds"
                + (
                    " (a checkpoint restored without a template gives plain dicts and lists)"
                    if plain
                    else ""
                )
                + ". Fix: restore into a template, jp.restore(d, params=params, "
                "opt_state=tx.init(params)) (or orbax's restore with the target tree), then "
                "resume with that opt_state."
            )
        params = unwrap_variables(params)
        check_same_leaves(updates, params, "updates", "params")
        _check_state_fits(state, params)
        kept = _in_container_of(
            state.packed_masks, params, is_leaf=lambda x: isinstance(x, _masks.PackedMask)
        )
        flags = prunable_flags(params, where)
        step = state.count
        grads, extra = sel.criterion_args(updates, params, state, extra_args, key_impl, "jp.prune")
        cstate = _criteria.call_with(sel.crit.update, state.criterion_state, params, grads, **extra)

        # Params typed with Explicit mesh axes: masks are retyped like them.
        explicit = _explicit_axes(params) is not None

        def refresh():
            return sel.packed(params, grads, cstate, extra, lambda: schedule(step), flags, kept)

        packed = jax.lax.cond(schedule.is_update_step(step), refresh, lambda: kept)
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
        updates, inner_state = inner.update(updates, state.inner_state, inner_params, **extra_args)
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

    return optax.GradientTransformationExtraArgs(init_fn, jit_when_eager(update_fn))


def jit_when_eager(update_fn: Callable[..., Any]) -> Callable[..., Any]:
    """Returns ``update_fn`` running under one cached ``jax.jit`` when called outside a trace.

    Called eagerly (``nnx.Optimizer.update`` without ``nnx.jit``, a quick
    experiment), the update's ``lax.cond`` would be traced and compiled anew
    at every call, its branches being new closures: about a second per step
    even when nothing refreshes. Jitted once per transform, it compiles once
    per argument structure. Inside a trace (the user's jitted step), or with
    extra arguments that are not arrays or numbers, ``update_fn`` runs as is.
    """
    jitted = jax.jit(update_fn)
    kinds = (jax.Array, np.ndarray, np.generic, int, float, bool)

    @functools.wraps(update_fn)
    def wrapper(updates, state, params=None, **extra_args):
        leaves = jax.tree.leaves((updates, state, params, extra_args))
        if (
            params is not None
            and not any(isinstance(x, jax.core.Tracer) for x in leaves)
            and all(isinstance(x, kinds) for x in leaves)
        ):
            return jitted(updates, state, params, **extra_args)
        return update_fn(updates, state, params, **extra_args)

    wrapper.jitted = jitted  # its compile cache, for tests and the curious
    return wrapper
