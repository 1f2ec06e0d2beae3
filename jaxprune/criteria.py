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
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxprune._tree import leaves_with_paths, path_str

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

    Each leaf draws from ``key`` folded with a hash (CRC-32) of its path, so
    adding or removing a leaf does not reshuffle the others.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxprune as jp
      >>> s = jp.criteria.random({"w": jnp.zeros((2, 3))}, key=jax.random.key(0))
      >>> s["w"].shape
      (2, 3)

    References:
      Blalock et al., "What is the State of Neural Network Pruning?", 2020 (random
      pruning as the baseline). https://arxiv.org/abs/2003.03033
    """
    flat, treedef = leaves_with_paths(params)
    scores = [
        jax.random.uniform(jax.random.fold_in(key, _path_hash(p)), jnp.shape(x), jnp.float32)
        for p, x in flat
    ]
    return jax.tree.unflatten(treedef, scores)


def _path_hash(path: Any) -> int:
    """A stable 31-bit hash of a normalized leaf path (the same in every process)."""
    return zlib.crc32(path_str(path).encode()) & 0x7FFFFFFF


def saliency(params: optax.Params, grads: optax.Updates) -> optax.Params:
    """Returns ``|w * g|``, the first-order estimate of the loss change from removing ``w``.

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> p, g = {"w": jnp.array([2., 1.])}, {"w": jnp.array([-1., 3.])}
      >>> jp.criteria.saliency(p, g)["w"].tolist()
      [2.0, 3.0]

    References:
      Mozer & Smolensky, "Skeletonization", 1989; Lee et al., "SNIP", 2019.
      https://arxiv.org/abs/1810.02340
    """
    return jax.tree.map(lambda w, g: jnp.abs(w * g), params, grads)


# Criteria whose scores are an element-wise function of (params, grads): jp.prune
# recomputes them inside the selection's search (fused) instead of storing them.
ELEMENTWISE = (magnitude, saliency)


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
        n for n, p in sig.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
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
    if isinstance(criterion, jax.Array):
        # optax.inject_hyperparams(jp.prune) calls every callable argument as a
        # schedule of the step, the default criterion included.
        raise ValueError(
            f"criterion must be a function, got an array {criterion!r}: this happens when "
            "optax.inject_hyperparams wraps jp.prune, which calls the criterion as a "
            "schedule. Fix: inject hyperparameters into the inner optimizer instead: "
            "jp.prune(optax.inject_hyperparams(optax.adam)(learning_rate=1e-3), sparsity=...)."
        )
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


# --- Data-aware and accumulated criteria -------------------------------------------------


def _input_axis_norms(w: jax.Array, norms: Any) -> jax.Array:
    """Broadcasts per-input norms ``[in]`` against a kernel ``[..., in, out]``."""
    norms = jnp.asarray(norms, jnp.float32)
    if norms.ndim == 1 and jnp.ndim(w) >= 2:
        return norms[:, None]
    return norms


def wanda(params: optax.Params, input_norms: Any) -> optax.Params:
    """Returns Wanda scores ``|W_ij| * ||X_i||_2`` for every leaf of ``params``.

    Flax kernels are ``[..., in, out]`` (``y = x @ W``), so the input norms,
    one per input feature (per input channel for a conv kernel), broadcast
    along the second-to-last axis. Wanda compares scores within each output
    unit (PyTorch's "output row", a column here): select with
    :func:`jaxprune.distributions.per_output` to prune the same fraction of
    every unit, as the paper does.

    Args:
      params: a pytree of weights.
      input_norms: a tree with the structure of ``params``: for each prunable
        kernel the L2 norm of its input over all calibration tokens (shape
        ``[in]``, or any shape broadcastable to the kernel); a scalar (e.g.
        ``1.0``) for leaves that are not pruned. See
        :func:`jaxprune.activations.input_norms` for capturing them.

    Returns:
      A tree of float32 scores with the structure and shapes of ``params``.

    Raises:
      ValueError: the two trees differ (the message lists the paths).

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> w = {"kernel": jnp.array([[1., -2.], [3., 1.]])}
      >>> jp.criteria.wanda(w, {"kernel": jnp.array([2., 1.])})["kernel"].tolist()
      [[2.0, 4.0], [3.0, 1.0]]

    References:
      Sun et al., "A Simple and Effective Pruning Approach for Large Language
      Models", 2023. https://arxiv.org/abs/2306.11695
    """
    from jaxprune._tree import check_same_structure

    check_same_structure(
        params,
        input_norms,
        ref_name="params",
        other_name="input_norms",
        fix="give one entry per params leaf: the norms from jp.activations.input_norms, and "
        "a scalar such as 1.0 for leaves that are not pruned (biases)",
    )
    flat, _ = leaves_with_paths(params)
    for (path, w), n in zip(flat, jax.tree.leaves(input_norms), strict=True):
        b = _input_axis_norms(w, n)
        try:
            jnp.broadcast_shapes(jnp.shape(w), b.shape)
        except ValueError:
            raise ValueError(
                f"input_norms of {path_str(path)!r} has shape {jnp.shape(n)}, which does not "
                f"match the kernel's input axis: kernel shape {jnp.shape(w)} (inputs on axis "
                f"-2, {jnp.shape(w)[-2] if jnp.ndim(w) >= 2 else '?'} of them). Fix: pass one "
                "norm per input feature (jp.activations.input_norms), or a scalar for leaves "
                "not pruned."
            ) from None
    return jax.tree.map(
        lambda w, n: jnp.abs(w).astype(jnp.float32) * _input_axis_norms(w, n), params, input_norms
    )


def _check_decay(decay: Any) -> float:
    if not 0.0 <= float(decay) < 1.0:
        raise ValueError(
            f"decay must be in [0, 1) (the EMA's weight on the past), got {decay!r}. "
            "Fix: e.g. decay=0.9."
        )
    return float(decay)


def _zeros_f32(params: optax.Params) -> optax.Params:
    return jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), params)


def _ema(decay: float, state: Any, new: Any) -> Any:
    return jax.tree.map(lambda s, x: decay * s + (1.0 - decay) * x.astype(jnp.float32), state, new)


def ema_saliency(decay: float = 0.9) -> StatefulCriterion:
    """Returns a criterion scoring ``EMA_t |w_t * g_t|``, the saliency averaged over steps.

    One mini-batch gradient is noisy; averaging the first-order saliency over
    the steps between mask refreshes ranks weights by their typical effect.

    Args:
      decay: the EMA's weight on the past, in ``[0, 1)``.

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> c = jp.criteria.ema_saliency(0.5)
      >>> p, g = {"w": jnp.array([2., 1.])}, {"w": jnp.array([1., 1.])}
      >>> s = c.update(c.update(c.init(p), p, g), p, g)
      >>> c.score(s, p)["w"].tolist()
      [1.5, 0.75]

    References:
      Mozer & Smolensky, "Skeletonization", 1989; Molchanov et al., "Importance
      Estimation for Neural Network Pruning", 2019. https://arxiv.org/abs/1906.10771
    """
    decay = _check_decay(decay)
    return StatefulCriterion(
        init=_zeros_f32,
        update=lambda state, params, grads: _ema(decay, state, saliency(params, grads)),
        score=lambda state, params: state,
    )


def movement() -> StatefulCriterion:
    """Returns the movement criterion ``S = -sum_t w_t * g_t`` (weights moving away from 0 kept).

    Under (stochastic) gradient descent ``-g_t`` is the direction a weight
    moves, so ``-w_t * g_t > 0`` means ``|w|`` grows: movement keeps the weights
    fine-tuning pushes away from zero, whatever their current size.

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> c = jp.criteria.movement()
      >>> p, g = {"w": jnp.array([2., -1.])}, {"w": jnp.array([1., 1.])}
      >>> c.score(c.update(c.init(p), p, g), p)["w"].tolist()
      [-2.0, 1.0]

    References:
      Sanh et al., "Movement Pruning: Adaptive Sparsity by Fine-Tuning", 2020.
      https://arxiv.org/abs/2005.07683
    """

    def update(state, params, grads):
        return jax.tree.map(lambda s, w, g: s - (w * g).astype(jnp.float32), state, params, grads)

    return StatefulCriterion(init=_zeros_f32, update=update, score=lambda state, params: state)


def _unit_sum(x: jax.Array, unit_axis: int) -> jax.Array:
    """Sums over every axis but ``unit_axis``, keeping dims (broadcastable back)."""
    if jnp.ndim(x) < 2:
        return x
    axis = unit_axis % jnp.ndim(x)
    return jnp.sum(x, axis=tuple(a for a in range(jnp.ndim(x)) if a != axis), keepdims=True)


def taylor(params: optax.Params, grads: optax.Updates, *, unit_axis: int = -1) -> optax.Params:
    """Returns Molchanov 2017's per-unit Taylor scores, broadcast to each kernel's shape.

    For a unit ``j`` with pre-activation ``z_j = sum_i x_i W_ij (+ b_j)`` the
    paper's feature-map criterion ``|sum_{batch, positions} dC/dz_j * (z_j - b_j)|``
    equals ``|sum_i W_ij * dC/dW_ij|`` (the chain rule summed over the batch),
    so it is computed from the weights and their gradients alone, for dense
    and conv kernels. Scores are l2-normalized per layer as in the paper.
    Every entry of a unit carries the unit's score: select with a structured
    selection (``jp.masks.structured``) to remove whole units, or with
    ``topk`` (equal scores are pruned together, in flatten order). Leaves with
    ``ndim < 2`` get ``|w * g|``.

    Args:
      params: weights; kernels ``[..., in, out]``.
      grads: gradients of the loss with the structure of ``params``.
      unit_axis: the axis indexing units (flax: ``-1``, output features/channels).

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> w, g = {"k": jnp.array([[1., 2.], [3., 0.]])}, {"k": jnp.array([[1., 1.], [1., 1.]])}
      >>> s = jp.criteria.taylor(w, g)["k"]  # unit sums 4 and 2, divided by sqrt(20)
      >>> (5 * s**2).round().tolist()
      [[4.0, 1.0], [4.0, 1.0]]

    References:
      Molchanov et al., "Pruning Convolutional Neural Networks for Resource
      Efficient Inference", 2017. https://arxiv.org/abs/1611.06440
    """

    def one(w, g):
        prod = (w * g).astype(jnp.float32)
        if jnp.ndim(w) < 2:
            return jnp.abs(prod)
        s = jnp.abs(_unit_sum(prod, unit_axis))
        s = s / jnp.maximum(jnp.linalg.norm(s), 1e-12)
        return jnp.broadcast_to(s, jnp.shape(w))

    return jax.tree.map(one, params, grads)


def taylor_ema(
    decay: float = 0.9, *, group: str = "unit", unit_axis: int = -1
) -> StatefulCriterion:
    """Returns Molchanov 2019's Taylor importance ``(sum_{s in group} g_s * w_s)**2`` with momentum.

    Args:
      decay: momentum of the running average (the paper uses 0.9).
      group: ``"unit"`` (all weights feeding one output unit/channel; scores
        broadcast to the kernel's shape, for structured selections) or
        ``"entry"`` (each weight its own group: ``(g * w)**2``, for unstructured
        selections).
      unit_axis: the axis indexing units for ``group="unit"``.

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> c = jp.criteria.taylor_ema(0.0, group="entry")
      >>> p, g = {"w": jnp.array([[2., 1.]])}, {"w": jnp.array([[1., 3.]])}
      >>> c.score(c.update(c.init(p), p, g), p)["w"].tolist()
      [[4.0, 9.0]]

    References:
      Molchanov et al., "Importance Estimation for Neural Network Pruning",
      2019. https://arxiv.org/abs/1906.10771
    """
    decay = _check_decay(decay)
    if group not in ("unit", "entry"):
        raise ValueError(
            f"group must be 'unit' (one score per output unit) or 'entry' (one per weight), "
            f"got {group!r}. Fix: group='unit' for structured pruning, 'entry' otherwise."
        )

    def importance(w, g):
        prod = (w * g).astype(jnp.float32)
        if group == "entry" or jnp.ndim(w) < 2:
            return prod**2
        return jnp.broadcast_to(_unit_sum(prod, unit_axis) ** 2, jnp.shape(w))

    def update(state, params, grads):
        return _ema(decay, state, jax.tree.map(importance, params, grads))

    return StatefulCriterion(init=_zeros_f32, update=update, score=lambda state, params: state)


from jaxprune.criteria_second_order import (  # noqa: E402  (re-export; it imports this module)
    fisher_diag,
    hutchinson_diag,
    obd,
    obd_fisher,
)

__all__ += [
    "wanda",
    "ema_saliency",
    "movement",
    "taylor",
    "taylor_ema",
    "obd",
    "obd_fisher",
    "fisher_diag",
    "hutchinson_diag",
]
