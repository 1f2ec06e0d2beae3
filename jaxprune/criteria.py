"""Criteria: params (+ grads, + a key, + statistics) -> scores with the params' structure.

A criterion is a plain function. The pruning transform reads its signature
once, at construction, and hands it what it names: ``params`` always,
``grads`` (the gradients of the current step), ``key`` (a PRNG key), and any
extra keyword argument given to ``tx.update``. Higher scores are kept.

A criterion that needs statistics accumulated over steps (an EMA of
saliencies, movement, ...) is a :class:`StatefulCriterion`: ``init`` builds
its state from the params, ``update`` folds in each step, ``score`` turns the
state into scores when masks refresh.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = ["magnitude", "random", "saliency", "StatefulCriterion", "as_stateful"]


def magnitude(params: optax.Params) -> optax.Params:
    """Returns ``|w|`` for every leaf of ``params``.

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> jp.criteria.magnitude({"w": jnp.array([-2., 1.])})["w"].tolist()
      [2.0, 1.0]

    References:
      Han et al., "Learning both Weights and Connections for Efficient Neural
      Networks", 2015. https://arxiv.org/abs/1506.02626
    """
    return jax.tree.map(jnp.abs, params)


def random(params: optax.Params, *, key: jax.Array) -> optax.Params:
    """Returns i.i.d. uniform scores in ``[0, 1)`` shaped like each leaf of ``params``.

    Each leaf draws from ``key`` folded with its flatten index, so adding or
    removing a leaf does not reshuffle the others.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxprune as jp
      >>> s = jp.criteria.random({"w": jnp.zeros((2, 3))}, key=jax.random.key(0))
      >>> s["w"].shape
      (2, 3)

    References:
      Blalock et al., "What is the State of Neural Network Pruning?", 2020 (random
      pruning as the baseline). https://arxiv.org/abs/2003.03033
    """
    leaves, treedef = jax.tree.flatten(params)
    scores = [
        jax.random.uniform(jax.random.fold_in(key, i), jnp.shape(x), jnp.float32)
        for i, x in enumerate(leaves)
    ]
    return jax.tree.unflatten(treedef, scores)


def saliency(params: optax.Params, grads: optax.Updates) -> optax.Params:
    """Returns ``|w * g|``, the first-order estimate of the loss change from removing ``w``.

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> jp.criteria.saliency({"w": jnp.array([2., 1.])}, {"w": jnp.array([-1., 3.])})["w"].tolist()
      [2.0, 3.0]

    References:
      Mozer & Smolensky, "Skeletonization", 1989; Lee et al., "SNIP", 2019.
      https://arxiv.org/abs/1810.02340
    """
    return jax.tree.map(lambda w, g: jnp.abs(w * g), params, grads)


class StatefulCriterion(NamedTuple):
    """A criterion that accumulates statistics across train steps.

    Attributes:
      init: ``params -> state``.
      update: ``(state, params, grads, **extra) -> state``, run on every step.
      score: ``(state, params, **extra) -> scores``, run when masks refresh.
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
    }
    var_kw = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    return names, var_kw


def call_with(fn: Callable[..., Any], *args: Any, **available: Any) -> Any:
    """Calls ``fn(*args, **kw)`` with only the keyword arguments ``fn`` declares."""
    names, var_kw = _accepts(fn)
    kw = {k: v for k, v in available.items() if var_kw or k in names}
    return fn(*args, **kw)


def needs_key(fn: Callable[..., Any]) -> bool:
    """Returns whether ``fn`` declares a ``key`` argument."""
    names, _ = _accepts(fn)
    return "key" in names


def as_stateful(criterion: Callable[..., Any] | StatefulCriterion) -> StatefulCriterion:
    """Returns ``criterion`` as a :class:`StatefulCriterion` (stateless ones get an empty state)."""
    if isinstance(criterion, StatefulCriterion):
        return criterion
    if not callable(criterion):
        raise ValueError(
            f"criterion must be a function (params, [grads], *, [key]) -> scores or a "
            f"jp.criteria.StatefulCriterion, got {criterion!r}. Fix: e.g. "
            "criterion=jp.criteria.magnitude."
        )
    return StatefulCriterion(
        init=lambda params: (),
        update=lambda state, params, grads, **extra: state,
        score=lambda state, params, **extra: call_with(criterion, params, **extra),
    )
