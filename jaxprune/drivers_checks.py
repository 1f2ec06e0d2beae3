"""The drivers' checks: their arguments, and each round's masks and trained params.

:mod:`jaxprune.drivers` checks ``criterion`` (:func:`_check_criterion`: callable
as ``criterion(params)``) and ``num_masks`` (:func:`_check_num_masks`) before
any work starts; then each round, that the selection keeps no entry the
previous round pruned (:func:`_check_nested`), that ``train`` enforced the
round's masks (:func:`_check_enforced`), and that params handed in or back
(``rewind_to``, ``train``'s result) belong to the same model
(:func:`_check_like_params`). Each raises a ``ValueError`` that names what is
wrong (the round and the leaf, where there are ones) and the fix.
"""

from __future__ import annotations

import inspect
from typing import Any

import jax
import jax.numpy as jnp

from jaxprune import criteria as _criteria
from jaxprune._criteria_args import _required
from jaxprune._mask_apply import _broadcast_prefix
from jaxprune._tree import (
    as_int,
    check_same_structure,
    leaves_with_paths,
    path_str,
    unwrap_variables,
)


def _check_criterion(criterion: Any) -> None:
    """Raises ``ValueError`` unless ``criterion`` can be called as ``criterion(params)``.

    The drivers score each round's trained params once: a stateful criterion
    (statistics accumulated over train steps), a factory of one, or a criterion
    that needs grads, a Hessian or a key cannot be called so.
    """
    fix = (
        "Fix: pass a function params -> scores (higher kept), e.g. "
        "criterion=jp.criteria.magnitude, or bind what it needs from your data: "
        "criterion=lambda p: jp.criteria.saliency(p, jax.grad(loss)(p, x, y)), or "
        "criterion=lambda p: jp.criteria.obd(p, jp.criteria.fisher_diag(loss, p, x, y))"
    )
    stateful = (
        "the driver scores each round's trained params once, so a criterion that accumulates "
        "statistics over train steps has none to score (to prune by one, use it in jp.prune "
        "inside train)"
    )
    if isinstance(criterion, _criteria.StatefulCriterion):
        raise ValueError(
            f"criterion=StatefulCriterion(...) (such as jp.criteria.movement() or "
            f"obd_fisher()) is stateful, but {stateful}. {fix}."
        )
    if any(criterion is f for f in _criteria._FACTORIES):
        raise ValueError(
            f"criterion=jp.criteria.{criterion.__name__} is a factory of a stateful "
            f"criterion, but {stateful}. {fix}."
        )
    if not callable(criterion):
        raise ValueError(
            f"criterion must be a function params -> scores, got {criterion!r}. {fix}."
        )
    try:
        params = inspect.signature(criterion).parameters.values()
    except (TypeError, ValueError):  # builtins and some C callables: take them on trust
        return
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    takes_one = bool(positional) or any(p.kind == p.VAR_POSITIONAL for p in params)
    missing = _required(criterion, 1)  # what it needs besides the params
    name = getattr(criterion, "__name__", repr(criterion))
    if getattr(criterion, "__module__", "").startswith("jaxprune.criteria"):
        name = f"jp.criteria.{name}"
    if not takes_one:
        raise ValueError(
            f"criterion={name} takes no positional argument, but the driver calls "
            f"criterion(params) on each round's trained params (a factory not yet called?). "
            f"{fix}."
        )
    if missing:
        bind = {
            "grads": "jax.grad(loss)(p, x, y)",
            "hessian_diag": "jp.criteria.fisher_diag(loss, p, x, y)",
            "key": "jax.random.key(0)",
        }
        args = ", ".join(f"{m}={bind.get(m, '...')}" for m in missing)
        raise ValueError(
            f"criterion={name} needs {missing} besides the params, but the driver calls "
            f"criterion(params) on each round's trained params. Fix: bind them, e.g. "
            f"criterion=lambda p: {name}(p, {args}) (computed from p and your data, so they "
            "follow each round's trained params)."
        )


def _check_nested(
    pure_params: Any, previous: Any, masks: Any, flags: list[bool], round_index: int
) -> None:
    """Raises ``ValueError`` when ``masks`` keeps an entry ``previous`` had pruned.

    The driver scores already-pruned entries ``-inf``; a selection that does not
    rank ``-inf`` first (e.g. a structured ``reduce`` turning it into ``+inf``)
    would bring back pruned weights while the sparsity still reads right.
    """
    flat_old = leaves_with_paths(_broadcast_prefix(pure_params, previous))[0]
    flat_new = leaves_with_paths(_broadcast_prefix(pure_params, masks))[0]
    for ((_, m_old), (path, m_new)), f in zip(
        zip(flat_old, flat_new, strict=True), flags, strict=True
    ):
        if not f or isinstance(m_new, jax.core.Tracer) or isinstance(m_old, jax.core.Tracer):
            continue
        back = int(jnp.sum(jnp.asarray(m_new, bool) & ~jnp.asarray(m_old, bool)))
        if back:
            raise ValueError(
                f"the selection of round {round_index} keeps {back} entries at "
                f"{path_str(path)!r} that round {round_index - 1} pruned, so the masks are not "
                "nested. The driver scores already-pruned entries -inf: the scope must prune "
                "them first (jp.masks' selections do; a criterion scoring live entries -inf "
                "ties with them). Fix: make the scope rank -inf scores below all others; for "
                "jp.masks.structured with a custom reduce, make a slice holding -inf reduce to "
                "-inf, or use a built-in reduce ('l2', 'l1', 'mean' or 'max')."
            )


def _check_enforced(trained: Any, masks: Any, flags: list[bool], round_index: int) -> None:
    """Raises ``ValueError`` when ``trained`` is nonzero where ``masks`` is False (prunable leaves).

    Otherwise ``Round.params`` would disagree with ``Round.masks``: the next
    round's scores, and any sparsity measured on the params, would be wrong.
    """
    flat_p = leaves_with_paths(trained)[0]
    flat_m = leaves_with_paths(_broadcast_prefix(unwrap_variables(trained), masks))[0]
    for ((path, x), (_, m)), f in zip(zip(flat_p, flat_m, strict=True), flags, strict=True):
        if not f or isinstance(x, jax.core.Tracer) or isinstance(m, jax.core.Tracer):
            continue
        bad = int(jnp.sum((jnp.asarray(x) != 0) & ~jnp.asarray(m, bool)))
        if bad:
            raise ValueError(
                f"train did not enforce the masks of round {round_index}: the params it returned "
                f"have {bad} nonzero entries at {path_str(path)!r} where the masks are False "
                f"(of {int(jnp.size(x)) - int(jnp.sum(jnp.broadcast_to(m, jnp.shape(x))))} "
                "pruned there). Fix: enforce the masks in train, e.g. params = "
                "jp.apply_masks(params, masks) after every optimizer step, or train with "
                "jp.prune(tx, sparsity=0.0, scope=lambda scores, sparsity, where=None: masks) "
                "(see the jp.drivers module docstring)."
            )


def _check_like_params(pure_params: Any, pure_other: Any, name: str) -> None:
    """Raises ``ValueError`` unless ``pure_other`` has the params' structure and leaf shapes."""
    fix = (
        f"{name} must be params of the same model (a dict/linen tree, or an nnx.State such as "
        "nnx.state(model, nnx.Param), Variable-wrapped or pure)"
    )
    check_same_structure(pure_params, pure_other, ref_name="params", other_name=name, fix=fix)
    for (path, p), (_, o) in zip(
        leaves_with_paths(pure_params)[0], leaves_with_paths(pure_other)[0], strict=True
    ):
        if jnp.shape(p) != jnp.shape(o):
            raise ValueError(
                f"{name} has shape {jnp.shape(o)} at {path_str(path)!r} but params has "
                f"{jnp.shape(p)} there. Fix: {fix}."
            )


def _check_num_masks(num_masks: Any) -> None:
    n = as_int(num_masks)  # None for bools (True is an int) and non-integers
    if n is None or n < 1:
        raise ValueError(
            f"num_masks must be a positive int (how many random masks to draw), got "
            f"{num_masks!r}. Fix: e.g. num_masks=5."
        )
