"""The refresh shared by ``jp.prune`` and ``jp.dynamic.ste``: criterion + selection -> masks.

:func:`_selector` checks a transform's ``criterion`` and ``scope`` when it is
built and returns a :class:`_Selector`, which turns params (and grads) into
packed masks inside the jitted step: through the fused exact search when the
criterion is element-wise and the scope a top-k (scores recomputed inside
each count, never stored), else through the criterion's scores and the
selection, conformed to the params' tree (:func:`_conform`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxprune import criteria as _criteria
from jaxprune import masks as _masks
from jaxprune._search import _explicit_axes
from jaxprune._tree import (
    Where,
    check_same_leaves,
    check_same_structure,
    flagged,
    leaves_with_paths,
)
from jaxprune.stacked import _depth, _fast_path, layer_where_of

Selection = Callable[..., Any]


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
        if f and jnp.result_type(m) != jnp.bool_:
            # Under jit the values cannot be checked: 0.5 would be read as True.
            raise ValueError(
                f"the selection returned a mask of dtype {jnp.result_type(m)} for a leaf of "
                f"shape {jnp.shape(p)}; masks are bool (True keeps an entry, False prunes it). "
                "Fix: return a comparison, e.g. scores > threshold, or m.astype(bool) for 0/1 "
                "values."
            )
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
