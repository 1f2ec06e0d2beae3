"""Pruning at initialization: SNIP, GraSP and SynFlow choose a mask before training.

Each returns scores (higher kept) or, for the iterative SynFlow, masks, so the
result feeds any selection (``jp.masks.topk``, ``jp.masks.global_topk``) or a
``jp.prune`` whose criterion returns the precomputed scores.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxprune import masks as _masks
from jaxprune._tree import Where, as_int, prunable_flags

__all__ = ["snip", "grasp", "synflow_scores", "synflow"]


def snip(loss_fn: Callable[..., jax.Array], params: optax.Params, *batch: Any) -> optax.Params:
    """Returns SNIP connection sensitivities ``|w * dL/dw| / sum |w * dL/dw|`` on one batch.

    Args:
      loss_fn: ``loss_fn(params, *batch) -> scalar``.
      params: the initialized params.
      *batch: one batch of data passed to ``loss_fn``.

    Returns:
      float32 scores with the params' structure (they sum to 1 over all leaves).

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> loss = lambda p, x: jnp.sum(p["w"] * x)
      >>> jp.at_init.snip(loss, {"w": jnp.array([1., -3.])}, jnp.array([2., 2.]))["w"].tolist()
      [0.25, 0.75]

    References:
      Lee, Ajanthan & Torr, "SNIP: Single-shot Network Pruning based on
      Connection Sensitivity", 2019. https://arxiv.org/abs/1810.02340
    """
    grads = jax.grad(loss_fn)(params, *batch)
    s = jax.tree.map(lambda w, g: jnp.abs(w * g).astype(jnp.float32), params, grads)
    total = sum(jnp.sum(x) for x in jax.tree.leaves(s))
    return jax.tree.map(lambda x: x / jnp.maximum(total, 1e-30), s)


def grasp(loss_fn: Callable[..., jax.Array], params: optax.Params, *batch: Any) -> optax.Params:
    """Returns GraSP scores to keep: ``w * (H g)``, the negation of the paper's ``-w * (H g)``.

    GraSP removes the weights whose removal least reduces the gradient flow,
    i.e. the HIGHEST ``S = -w * (H g)``; negated here so that, as for every
    jaxprune criterion, higher scores are kept. ``H g`` is one Hessian-vector
    product (``jax.jvp`` of ``jax.grad``) with ``g`` held fixed.

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> loss = lambda p, x: 0.5 * jnp.sum(x * p["w"] ** 2)   # H = diag(x), g = x * w
      >>> jp.at_init.grasp(loss, {"w": jnp.array([1., 2.])}, jnp.array([3., 1.]))["w"].tolist()
      [9.0, 4.0]

    References:
      Wang, Zhang & Grosse, "Picking Winning Tickets Before Training by
      Preserving Gradient Flow", 2020. https://arxiv.org/abs/2002.07376
    """
    grad_fn = jax.grad(lambda p: loss_fn(p, *batch))
    g = jax.lax.stop_gradient(grad_fn(params))
    _, hg = jax.jvp(grad_fn, (params,), (g,))
    return jax.tree.map(lambda w, h: (w * h).astype(jnp.float32), params, hg)


def _check_input_shape(input_shape: Any) -> tuple[int, ...]:
    """Returns ``input_shape`` as a tuple of positive ints, else raises ``ValueError``."""
    try:
        dims = [as_int(d) for d in input_shape]
    except TypeError:
        dims = [None]
    if not dims or any(d is None or d < 1 for d in dims):
        raise ValueError(
            f"input_shape must be the shape of one all-ones input batch, a tuple of positive "
            f"ints with the batch of 1 included, got {input_shape!r}. Fix: e.g. "
            "input_shape=(1, 784) for an MLP on flat MNIST, (1, 28, 28, 1) for an NHWC CNN."
        )
    return tuple(dims)


def _apply_ones(apply_fn: Callable[..., Any], params: Any, x: jax.Array) -> jax.Array:
    """Returns ``apply_fn(params, x)``, a failure re-raised as a ``ValueError`` about ``x``'s shape.

    A wrong ``input_shape`` otherwise surfaces as a raw ``dot_general`` or
    ``conv`` shape error from deep inside the model.
    """
    try:
        return apply_fn(params, x)
    except (TypeError, ValueError) as e:
        cause = str(e).strip().splitlines()[0].rstrip(".") if str(e).strip() else "no message"
        if len(cause) > 300:
            cause = cause[:300] + "..."
        raise ValueError(
            f"apply_fn(params, x) failed on the all-ones x of input_shape={tuple(x.shape)}: "
            f"{type(e).__name__}: {cause}. Fix: input_shape must be the shape of one input "
            "batch the model accepts, batch of 1 included, with the feature (channel) size "
            "the first layer expects last, e.g. (1, 784) for an MLP on flat MNIST or "
            "(1, 28, 28, 1) for an NHWC CNN."
        ) from e


def synflow_scores(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    params: optax.Params,
    input_shape: tuple[int, ...],
) -> optax.Params:
    """Returns SynFlow scores ``|dR/dw * w|`` with ``R = 1^T f(|W|; 1)``, data-free.

    Args:
      apply_fn: ``apply_fn(params, x) -> outputs`` of the network.
      params: params (already masked, for the iterative use).
      input_shape: the shape of one all-ones input batch, e.g. ``(1, 28, 28, 1)``.

    Raises:
      ValueError: ``input_shape`` is not a tuple of positive ints, or
        ``apply_fn`` fails on an input of that shape (the message quotes the
        model's error, e.g. a ``dot_general`` size mismatch).

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> f = lambda p, x: x @ p["a"] @ p["b"]
      >>> p = {"a": jnp.array([[1., -2.]]), "b": jnp.array([[3.], [1.]])}
      >>> jp.at_init.synflow_scores(f, p, (1, 1))["a"].tolist()  # paths 1*3 and 2*1
      [[3.0, 2.0]]

    References:
      Tanaka et al., "Pruning neural networks without any data by iteratively
      conserving synaptic flow", 2020. https://arxiv.org/abs/2006.05467
    """
    x = jnp.ones(_check_input_shape(input_shape), jnp.result_type(jax.tree.leaves(params)[0]))
    abs_params = jax.tree.map(jnp.abs, params)
    grads = jax.grad(lambda p: jnp.sum(_apply_ones(apply_fn, p, x).astype(jnp.float32)))(abs_params)
    return jax.tree.map(lambda w, g: (w * g).astype(jnp.float32), abs_params, grads)


@partial(jax.jit, static_argnums=(0, 1, 2))
def _synflow_round(apply_fn, input_shape, where, params, masks, s):
    """One SynFlow round; jitted once per (apply_fn, shapes), not once per call."""
    scores = synflow_scores(apply_fn, _masks.apply_masks(params, masks), input_shape)
    # Pruned entries must stay pruned: their SynFlow score is 0 but so may be others'.
    scores = jax.tree.map(lambda x, m: jnp.where(m, x, -1.0), scores, masks)
    return _masks.global_topk(scores, s, where=where)


def synflow(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    params: optax.Params,
    input_shape: tuple[int, ...],
    sparsity: float,
    *,
    iterations: int = 100,
    where: Where | None = None,
) -> optax.Params:
    """Returns SynFlow masks: ``iterations`` rounds of scoring and global pruning.

    Round ``k`` keeps the global top ``density**(k / iterations)`` of the
    scores of the masked network (the exponential schedule), so the final
    masks prune exactly ``round(sparsity * N)`` prunable entries.

    Args:
      apply_fn: ``apply_fn(params, x) -> outputs``.
      params: the initialized params.
      input_shape: shape of the all-ones input, batch of 1 included.
      sparsity: final fraction to prune in ``[0, 1]``.
      iterations: number of score/prune rounds (the paper uses 100).
      where: predicate choosing the prunable leaves.

    Raises:
      ValueError: ``iterations`` is not a positive int, ``sparsity`` is out of
        range, or ``input_shape`` is malformed or not an input ``apply_fn``
        accepts (checked once, before the rounds).

    Examples:
      >>> import jax, jax.numpy as jnp, jaxprune as jp
      >>> f = lambda p, x: jax.nn.relu(x @ p["a"]) @ p["b"]
      >>> p = {"a": jax.random.normal(jax.random.key(0), (4, 8)), "b": jnp.ones((8, 2))}
      >>> m = jp.at_init.synflow(f, p, (1, 4), 0.5, iterations=10)
      >>> float(jp.sparsity(m))
      0.5

    References:
      Tanaka et al. 2020. https://arxiv.org/abs/2006.05467
    """
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(
            f"iterations must be a positive int (score/prune rounds), got {iterations!r}. "
            "Fix: iterations=100 as in the paper."
        )
    _masks._check_sparsity(sparsity)
    prunable_flags(params, where)
    input_shape = _check_input_shape(input_shape)
    x = jax.ShapeDtypeStruct(input_shape, jnp.result_type(jax.tree.leaves(params)[0]))
    jax.eval_shape(partial(_apply_ones, apply_fn), params, x)  # fail fast, before any round

    masks = _masks.global_topk(jax.tree.map(jnp.ones_like, params), 0.0, where=where)
    density = 1.0 - float(sparsity)
    for k in range(1, iterations + 1):
        s = jnp.float32(1.0 - density ** (k / iterations))
        masks = _synflow_round(apply_fn, input_shape, where, params, masks, s)
    # The traced count rounds in float32; fix the exact count on the last scores.
    scores = synflow_scores(apply_fn, _masks.apply_masks(params, masks), input_shape)
    scores = jax.tree.map(lambda x, m: jnp.where(m, x, -1.0), scores, masks)
    return _masks.global_topk(scores, float(sparsity), where=where)
