"""Second-order criteria: OBD saliency from a diagonal Hessian (Hutchinson or Fisher).

Re-exported from :mod:`jaxprune.criteria` (write ``jp.criteria.obd``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxprune.criteria import StatefulCriterion, _check_decay, _ema, _zeros_f32

__all__ = ["obd", "obd_fisher", "hutchinson_diag", "fisher_diag"]


def obd(params: optax.Params, hessian_diag: optax.Params) -> optax.Params:
    """Returns OBD saliencies ``0.5 * h_kk * w_k**2`` (the loss increase from zeroing ``w_k``).

    Args:
      params: weights.
      hessian_diag: the diagonal of the loss Hessian, with the structure of
        ``params`` (from :func:`hutchinson_diag` or :func:`fisher_diag`). Inside
        ``jp.prune`` pass it to ``tx.update(..., hessian_diag=h)``.

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> jp.criteria.obd({"w": jnp.array([2., 1.])}, {"w": jnp.array([1., 6.])})["w"].tolist()
      [2.0, 3.0]

    References:
      LeCun, Denker & Solla, "Optimal Brain Damage", NeurIPS 1990.
      https://proceedings.neurips.cc/paper/1989/hash/6c9882bbac1c7093bd25041881277658-Abstract.html
    """
    return jax.tree.map(
        lambda w, h: 0.5 * h.astype(jnp.float32) * jnp.square(w.astype(jnp.float32)),
        params,
        hessian_diag,
    )


def _check_samples(num_samples: Any) -> int:
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(
            f"num_samples must be a positive int (Rademacher probes to average), got "
            f"{num_samples!r}. Fix: e.g. num_samples=16."
        )
    return num_samples


def hutchinson_diag(
    loss_fn: Callable[..., jax.Array],
    params: optax.Params,
    *args: Any,
    key: jax.Array,
    num_samples: int = 16,
) -> optax.Params:
    """Returns Hutchinson's estimate ``E_v[v * (H v)]`` of the loss Hessian's diagonal.

    ``v`` has i.i.d. Rademacher (+-1) entries; ``H v`` is a Hessian-vector
    product (forward-over-reverse: ``jax.jvp`` of ``jax.grad``), so the
    Hessian is never formed. Unbiased; the variance falls as ``1/num_samples``.

    Args:
      loss_fn: ``loss_fn(params, *args) -> scalar``.
      params: where to evaluate the Hessian.
      *args: passed to ``loss_fn`` (e.g. a calibration batch).
      key: PRNG key for the probes.
      num_samples: number of probes averaged.

    Returns:
      A float32 tree with the structure of ``params``.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxprune as jp
      >>> loss = lambda p: 1.5 * p["w"][0] ** 2 + p["w"][1] ** 2
      >>> h = jp.criteria.hutchinson_diag(loss, {"w": jnp.ones(2)}, key=jax.random.key(0))
      >>> h["w"].tolist()
      [3.0, 2.0]

    References:
      Hutchinson, "A stochastic estimator of the trace of the influence matrix",
      1990; Yao et al., "AdaHessian", 2020. https://arxiv.org/abs/2006.00719
    """
    num_samples = _check_samples(num_samples)
    grad_fn = jax.grad(lambda p: loss_fn(p, *args))
    leaves, treedef = jax.tree.flatten(params)

    def probe(k):
        vs = [
            jax.random.rademacher(jax.random.fold_in(k, i), jnp.shape(x), jnp.float32).astype(
                jnp.result_type(x)
            )
            for i, x in enumerate(leaves)
        ]
        v = jax.tree.unflatten(treedef, vs)
        _, hv = jax.jvp(grad_fn, (params,), (v,))
        return jax.tree.map(lambda a, b: (a * b).astype(jnp.float32), v, hv)

    total = jax.lax.map(probe, jax.random.split(key, num_samples))
    return jax.tree.map(lambda x: jnp.mean(x, axis=0), total)


def fisher_diag(
    loss_fn: Callable[..., jax.Array], params: optax.Params, *batch: Any, chunk_size: int = 64
) -> optax.Params:
    """Returns the empirical Fisher diagonal ``mean_n (d loss_n / d w)**2`` over a batch.

    Per-example gradients come from ``jax.vmap`` over the leading axis of every
    array in ``batch`` (each example passed as a batch of one), ``chunk_size``
    examples at a time to bound memory.

    Args:
      loss_fn: ``loss_fn(params, *batch) -> scalar`` mean loss over a batch.
      params: where to evaluate the gradients.
      *batch: arrays sharing the leading (example) axis, e.g. ``x, y``.
      chunk_size: examples per vmapped chunk (the batch size must be a multiple,
        or smaller).

    Returns:
      A float32 tree with the structure of ``params``.

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> loss = lambda p, x: jnp.mean(p["w"] * x)
      >>> jp.criteria.fisher_diag(loss, {"w": jnp.ones(())}, jnp.array([1., 3.]))["w"].tolist()
      5.0

    References:
      Martens, "New insights and perspectives on the natural gradient method",
      2014 (empirical Fisher). https://arxiv.org/abs/1412.1193; Theis et al.,
      "Faster gaze prediction with dense networks and Fisher pruning", 2018.
      https://arxiv.org/abs/1801.05787
    """
    n = jnp.shape(batch[0])[0]
    chunk = min(chunk_size, n)
    if n % chunk:
        raise ValueError(
            f"the batch size ({n}) must be a multiple of chunk_size ({chunk_size}). Fix: pass "
            f"chunk_size={n} or trim the batch."
        )
    one = jax.grad(lambda p, *ex: loss_fn(p, *[e[None] for e in ex]))

    def chunk_sq(ex):
        g = jax.vmap(one, in_axes=(None,) + (0,) * len(ex))(params, *ex)
        return jax.tree.map(lambda x: jnp.sum(jnp.square(x.astype(jnp.float32)), axis=0), g)

    chunks = [b.reshape((n // chunk, chunk) + jnp.shape(b)[1:]) for b in batch]
    sums = jax.lax.map(lambda ex: chunk_sq(ex), tuple(chunks))
    return jax.tree.map(lambda x: jnp.sum(x, axis=0) / n, sums)


def obd_fisher(decay: float = 0.99) -> StatefulCriterion:
    """Returns OBD with the Hessian diagonal estimated online as an EMA of ``g**2``.

    Inside ``jp.prune`` only the mini-batch gradient is available, so this is
    the mini-batch Fisher (the square of the batch-mean gradient, averaged over
    steps), a cheaper and cruder estimate than the per-example
    :func:`fisher_diag`. For the per-example Fisher or Hutchinson's estimate,
    compute it in the train step and pass it as ``tx.update(...,
    hessian_diag=h)`` with ``criterion=jp.criteria.obd``.

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> c = jp.criteria.obd_fisher(0.0)
      >>> p, g = {"w": jnp.array([2., 1.])}, {"w": jnp.array([1., 2.])}
      >>> c.score(c.update(c.init(p), p, g), p)["w"].tolist()
      [2.0, 2.0]

    References:
      LeCun et al., "Optimal Brain Damage", 1990; Theis et al. 2018.
      https://arxiv.org/abs/1801.05787
    """
    decay = _check_decay(decay)
    return StatefulCriterion(
        init=_zeros_f32,
        update=lambda state, params, grads: _ema(decay, state, jax.tree.map(jnp.square, grads)),
        score=lambda state, params: obd(params, state),
    )
