"""The criterion calling convention: what a criterion is called with, read from its signature.

The pruning transform reads a criterion's signature once, at construction,
and hands it what it names: ``params`` always, ``grads``, ``key`` and any extra
keyword argument given to ``tx.update``. This module holds that plumbing
(:func:`call_with`, :func:`check_extra_args`, :func:`needs_key`) and the
:class:`StatefulCriterion` it dispatches on; all are re-exported from
:mod:`jaxprune.criteria`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import optax


class StatefulCriterion(NamedTuple):
    """A criterion that accumulates statistics across train steps.

    Args:
      init: ``params -> state``.
      update: ``(state, params, grads, **extra) -> state``, run on every step.
        It is passed only the keyword arguments (``tx.update``'s extra ones, and
        ``key``) that its signature names, or all of them if it takes ``**kwargs``.
      score: ``(state, params, **extra) -> scores``, run when masks refresh.
        Its keyword arguments are picked the same way, ``grads`` among them.
    """

    init: Callable[[optax.Params], Any]
    update: Callable[..., Any]
    score: Callable[..., optax.Params]


def _accepts(fn: Callable[..., Any]) -> tuple[set[str], bool]:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return set(), True
    names = {
        n
        for n, p in sig.parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        # A key already bound (functools.partial(random, key=k)) is the user's
        # choice: it is neither required nor replaced.
        and not (n == "key" and p.default is not p.empty and p.default is not None)
    }
    var_kw = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    return names, var_kw


def call_with(fn: Callable[..., Any], *args: Any, **available: Any) -> Any:
    """Calls ``fn(*args, **kw)`` with only the keyword arguments ``fn`` declares."""
    names, var_kw = _accepts(fn)
    kw = {k: v for k, v in available.items() if var_kw or k in names}
    return fn(*args, **kw)


def _required(fn: Callable[..., Any], n_positional: int) -> list[str]:
    """Names of ``fn``'s parameters without a default after its first ``n_positional``.

    A signature that cannot be read (a builtin) requires nothing we can tell.
    """
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return []
    out, skipped = [], 0
    for p in sig.parameters.values():
        if p.kind == p.VAR_POSITIONAL:
            skipped = n_positional  # *args takes whatever positionals are left
        elif p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and skipped < n_positional:
            skipped += 1
        elif p.kind != p.VAR_KEYWORD and p.default is p.empty:
            out.append(p.name)
    return out


def check_extra_args(
    criterion: Callable[..., Any] | StatefulCriterion, extra: dict[str, Any], given: list[str]
) -> None:
    """Raises ``ValueError`` when ``criterion`` needs a keyword that ``extra`` lacks.

    ``extra`` are the keywords the pruning transform hands the criterion
    besides ``params`` and ``grads`` (those of ``tx.update``, and the ``key``
    it derives); ``given`` are the names passed to ``tx.update``, for the
    message. Keywords the criterion does not take are not an error by
    themselves (the inner optimizer may read them), but a misspelt one shows
    in the message next to the missing name.
    """
    available = set(extra) | {"grads"}
    if isinstance(criterion, StatefulCriterion):
        # Called as update(state, params, grads, **extra), score(state, params, grads=, **extra).
        parts = [(criterion.update, 3), (criterion.score, 2)]
    else:
        parts = [(criterion, 1)]
    missing = sorted({n for fn, k in parts for n in _required(fn, k)} - available)
    if not missing:
        return
    accepted, var_kw = set(), False
    for fn, _ in parts:
        names, kw = _accepts(fn)
        accepted |= names
        var_kw |= kw
    unused = [] if var_kw else sorted(set(given) - accepted - {"grads"})
    fn = getattr(criterion, "func", criterion)  # a functools.partial's function
    name = getattr(fn, "__name__", type(criterion).__name__)
    arg = missing[0]
    if not given:
        detail = "it was given no extra keyword"
    else:
        detail = f"it was given {sorted(given)}"
        if unused:
            detail += f", of which {name} does not take {unused} (misspelt?)"
    raise ValueError(
        f"criterion {name} needs the keyword argument{'s' if len(missing) > 1 else ''} "
        f"{', '.join(missing)}, which tx.update was not given ({detail}). Fix: pass "
        f"{arg} at every step: tx.update(grads, state, params, {arg}=...) (nnx: "
        f"optimizer.update(model, grads, {arg}=...))."
    )


def needs_key(fn: Callable[..., Any]) -> bool:
    """Returns whether ``fn`` declares a ``key`` argument not already bound to a key."""
    names, _ = _accepts(fn)
    return "key" in names
