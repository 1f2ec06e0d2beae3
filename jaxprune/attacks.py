"""Adversarial attacks: L-inf PGD and FGSM, pure and jit-compatible.

* :func:`pgd` / :func:`fgsm` — attacks on the inputs as pure functions of a
  per-example loss (e.g. :func:`cross_entropy` of a model's logits), inside
  the eps-ball and the data range in every input dtype (bfloat16 included).
* :func:`attack` builds a jitted cross-entropy PGD attack for a model
  ``apply_fn(params, x, key) -> (logits, features)`` run with its test-time
  gates (``key=None``).

The training steps and the robustness evaluation built on them are in
:mod:`jaxprune.adversarial`, which re-exports these names.

References:
  Madry et al., "Towards Deep Learning Models Resistant to Adversarial
  Attacks", ICLR 2018. https://arxiv.org/abs/1706.06083;
  Goodfellow, Shlens & Szegedy, "Explaining and Harnessing Adversarial
  Examples", ICLR 2015. https://arxiv.org/abs/1412.6572
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from jaxprune._tree import as_float, key_parts

__all__ = ["attack", "cross_entropy", "fgsm", "pgd"]

ApplyFn = Callable[[Any, jax.Array, "jax.Array | None"], tuple[jax.Array, Sequence[jax.Array]]]


def _check_attack(eps: Any, step_size: Any = 1.0, steps: Any = 1, bounds=(0.0, 1.0)) -> None:
    if not isinstance(eps, jax.core.Tracer) and not (
        as_float(eps) >= 0 and math.isfinite(as_float(eps))
    ):
        raise ValueError(
            f"eps must be a finite number >= 0 (the L-inf radius in input units), got {eps!r}. "
            "Fix: e.g. eps=0.1 for images in [0, 1]."
        )
    if not isinstance(step_size, jax.core.Tracer):
        # eps=0 is the identity attack (the clean point of an accuracy-vs-eps curve), where
        # the usual step_size=eps / 4 is 0 too: any step_size >= 0 is then fine.
        eps_zero = not isinstance(eps, jax.core.Tracer) and as_float(eps) == 0
        if eps_zero and not as_float(step_size) >= 0:
            raise ValueError(
                f"step_size must be >= 0, got {step_size!r} (with eps=0 the attack is the "
                "identity, and any step_size >= 0 works). Fix: step_size=0.0."
            )
        if not math.isfinite(as_float(step_size)):
            raise ValueError(
                f"step_size must be finite, got {step_size!r} (an infinite step times a zero "
                "gradient sign is NaN). Fix: e.g. step_size=eps / 4, or 2.5 * eps / steps."
            )
        if not eps_zero and not as_float(step_size) > 0:
            # eps passed its check above: here it is a tracer or a number > 0.
            fix = "step_size=eps / 4"
            if not isinstance(eps, jax.core.Tracer):
                fix = f"step_size={as_float(eps) / 4:.4g} (eps / 4)"
            raise ValueError(
                f"step_size must be > 0 for eps > 0, got {step_size!r}. Fix: e.g. {fix}, or "
                "2.5 * eps / steps."
            )
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}. Fix: e.g. steps=20.")
    if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
        raise ValueError(
            f"bounds must be a pair (low, high), got {bounds!r}. Fix: (0.0, 1.0) for images "
            "scaled to [0, 1]."
        )
    lo, hi = bounds
    if not as_float(lo) < as_float(hi):
        raise ValueError(
            f"bounds must be (low, high) with low < high, got {bounds!r}. Fix: (0.0, 1.0) "
            "for images scaled to [0, 1]."
        )


def _check_keep_best(keep_best: Any) -> None:
    if not isinstance(keep_best, (bool, np.bool_)):
        raise ValueError(
            f"keep_best must be a bool, got {keep_best!r}. Fix: True keeps each example's "
            "highest-loss iterate, False returns the last one (FGSM with steps=1)."
        )


def _check_concrete_inside(x: Any, bounds: tuple[float, float]) -> None:
    """Runs :func:`_check_inside` on a concrete ``x`` before it enters a jitted function.

    Inside ``jax.jit`` ``x`` is a tracer and the range check cannot run, so the
    jitted attacks and steps call this on each call's ``x`` first. It costs
    one min and max over the batch on the host: a NumPy batch is read in place,
    a ``jax.Array`` is copied to the host (no device computation is queued, so
    asynchronous dispatch of the steps is kept).
    """
    if isinstance(x, jax.core.Tracer):
        return
    _check_inside(x if hasattr(x, "dtype") else np.asarray(x), bounds)


def _check_inside(x: jax.Array, bounds: tuple[float, float]) -> None:
    """Raises when ``x`` is not floating, or a concrete ``x`` holds NaN or leaves ``bounds``."""
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            f"x must be floating point (the attack follows the loss's gradient in x), got "
            f"dtype {x.dtype}. Fix: scale it to a float range first, e.g. "
            "x.astype(jnp.float32) / 255 with bounds=(0.0, 1.0) for uint8 images."
        )
    if isinstance(x, jax.core.Tracer) or not jnp.size(x):
        return
    # numpy, not jnp: inside a jit trace jnp ops on a constant are staged.
    v = np.asarray(x)
    lo, hi = float(np.min(v)), float(np.max(v))
    if math.isnan(lo) or math.isnan(hi):
        # min/max propagate NaN, and every comparison with NaN is False.
        raise ValueError(
            f"x holds {int(np.isnan(v).sum())} NaN values (of {v.size}): the attack's "
            "gradient and every iterate would be NaN. Fix: drop those examples with their "
            "labels (ok = ~np.isnan(x).reshape(len(x), -1).any(1); x[ok], y[ok]) or repair "
            "them (np.nan_to_num) before the attack."
        )
    if lo < float(bounds[0]) or hi > float(bounds[1]):
        raise ValueError(
            f"x lies in [{lo:.4g}, {hi:.4g}], outside bounds={tuple(bounds)!r}: the attack "
            "clips every iterate to bounds, which would move x far outside the eps-ball. Fix: "
            "pass the data range of x as bounds (e.g. the range of standardized inputs), or "
            "attack the unnormalized images."
        )


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Returns the per-example softmax cross-entropy, shape ``[N]``, in float32.

    ``labels`` are integer class indices in ``[0, classes)``, one per example
    (one-hot labels are refused). An index outside that range gives a NaN loss
    (an attack then leaves the example as it is) or, if negative, wraps to a
    class from the end; :func:`robustness` checks its labels' range.

    Args:
      logits: ``[..., classes]``, usually ``[N, classes]``; computed in float32.
      labels: integer class indices, shape ``logits.shape[:-1]`` (one fewer
        axis than ``logits``; a non-integer dtype is refused).

    Examples:
      >>> import jax.numpy as jnp
      >>> logits = jnp.array([[0.0, 0.0], [2.0, 0.0]])
      >>> [round(v, 3) for v in cross_entropy(logits, jnp.array([0, 1])).tolist()]
      [0.693, 2.127]
    """
    integer = jnp.issubdtype(jnp.result_type(labels), jnp.integer)
    if tuple(jnp.shape(labels)) != tuple(jnp.shape(logits))[:-1] or not integer:
        raise ValueError(
            f"labels must be integer class indices, shape {tuple(jnp.shape(logits))[:-1]}, got "
            f"{jnp.result_type(labels)} of shape {tuple(jnp.shape(labels))}. Fix: "
            + _labels_fix(jnp.shape(labels), jnp.shape(logits), integer)
        )
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def _labels_fix(shape: tuple[int, ...], logits_shape: tuple[int, ...], integer: bool) -> str:
    """Returns the fix for labels of ``shape`` refused by :func:`cross_entropy`."""
    cast = "" if integer else ".astype(jnp.int32)"
    if len(shape) == len(logits_shape) and shape and shape[-1] == 1:
        # A column of class indices ([N, 1], as read from a CSV): argmax over its
        # single entry would make every label 0.
        return f"drop the trailing axis of size 1, y[..., 0]{cast} (or y.squeeze(-1){cast})."
    if len(shape) == len(logits_shape) and shape[-1:] == logits_shape[-1:]:
        return "pass y.argmax(-1) for one-hot (or probability) labels."
    if tuple(shape) == tuple(logits_shape[:-1]):
        return "cast the class indices, y.astype(jnp.int32)."
    return (
        f"pass one integer class index per example, shape {tuple(logits_shape[:-1])} "
        "(y.argmax(-1) for one-hot labels)."
    )


def _project(z: jax.Array, x: jax.Array, eps: Any, bounds: tuple[float, float]) -> jax.Array:
    """Returns ``clip(clip(z, x - eps, x + eps), bounds)``, inside the eps-ball in ``x.dtype``.

    In float32 and wider this is the plain clip. In a narrower float dtype
    (bfloat16, float16) ``x +- eps`` rounds to the nearest representable value,
    which can lie outside the ball, so the clip is done in float32 and the
    result cast back; where rounding carried a value out of the ball (further
    from ``x`` than eps and than its float32 value) it is stepped one ulp
    toward ``x`` (``jnp.nextafter`` in ``x.dtype``), which lands between ``x`` and
    the float32 value, inside the ball. Finally the data range is enforced in
    ``x.dtype``.
    """
    lo, hi = bounds
    dt = x.dtype
    if not jnp.issubdtype(dt, jnp.floating) or jnp.finfo(dt).bits > 32:
        return jnp.clip(jnp.clip(z, x - eps, x + eps), lo, hi)
    if jnp.finfo(dt).bits == 32:
        e_hi, e_lo = _split_eps(eps)
        p = jnp.clip(jnp.clip(z, x - e_hi, x + e_hi), lo, hi)
        return jnp.where(_beyond(p, x, e_hi, e_lo), jnp.nextafter(p, x), p)
    xf = x.astype(jnp.float32)
    q = jnp.clip(jnp.clip(z.astype(jnp.float32), xf - eps, xf + eps), lo, hi)
    p = q.astype(dt)
    dev = jnp.abs(p.astype(jnp.float32) - xf)
    outward = dev > jnp.maximum(jnp.abs(q - xf), eps)
    p = jnp.where(outward, jnp.nextafter(p, x), p)
    return jnp.clip(p, jnp.asarray(lo, dt), jnp.asarray(hi, dt))


def _split_eps(eps: Any) -> tuple[Any, Any]:
    """Returns ``(e_hi, e_lo)``: the largest float32 ``<= eps`` and the rest, ``eps - e_hi``.

    A traced ``eps`` is a float32 already (its rest is 0). Rounding a Python
    ``eps`` to the nearest float32 can round it up (0.3 -> 0.30000001), which
    would widen the ball; rounding down never does.
    """
    if isinstance(eps, jax.core.Tracer) or isinstance(eps, jax.Array):
        return jnp.asarray(eps, jnp.float32), jnp.float32(0)
    e_hi = np.float32(eps)
    if float(e_hi) > float(eps):
        e_hi = np.nextafter(e_hi, np.float32(0))
    return e_hi, np.float32(float(eps) - float(e_hi))


def _beyond(p: jax.Array, x: jax.Array, e_hi: Any, e_lo: Any) -> jax.Array:
    """Returns where ``|p - x| > e_hi + e_lo`` in exact arithmetic, for float32 ``p``, ``x``.

    ``x +- e_hi`` rounds to the nearest float32, at most half an ulp of the
    result past the ball, which one ``nextafter`` toward ``x`` undoes. The
    difference is formed exactly (Knuth's two-sum: ``p - x = d + e``); where it
    matters ``|d|`` is within an ulp of ``e_hi``, so ``|d| - e_hi`` is exact.
    """
    d = p - x
    b = d - p
    e = (p - (d - b)) + (-x - b)
    return (jnp.abs(d) - e_hi) + (jnp.sign(d) * e - e_lo) > 0


def pgd(
    loss_fn: Callable[[jax.Array], jax.Array],
    x: ArrayLike,
    *,
    eps: float,
    step_size: float,
    steps: int,
    key: jax.Array | None = None,
    bounds: tuple[float, float] = (0.0, 1.0),
    keep_best: bool = True,
) -> jax.Array:
    """Returns the L-inf PGD adversarial example of ``x`` maximizing ``loss_fn``.

    ``x_{t+1} = clip(Proj_{|x' - x| <= eps}(x_t + step_size * sign(grad)), bounds)``,
    started at ``x + U(-eps, eps)`` when ``key`` is given (random start) and at
    ``x`` otherwise. With ``keep_best`` each example keeps its highest-loss
    iterate, the clean ``x`` included, so the attack never lowers the loss.
    Inputs narrower than float32 (bfloat16) are projected in float32 so that
    rounding never leaves the eps-ball. Pure and jit-compatible (a
    ``lax.fori_loop``); call it inside the jitted step, or use :func:`attack`.

    Args:
      loss_fn: ``x -> per-example losses [N]`` (e.g. cross-entropy of the
        model's logits); gradients flow through its sum.
      x: clean inputs ``[N, ...]``.
      eps: L-inf radius, >= 0.
      step_size: step of each signed-gradient update, > 0 (or 0 when ``eps`` is 0:
        the attack is then the identity).
      steps: number of updates, >= 1.
      key: PRNG key for the random start; ``None`` starts at ``x``.
      bounds: the data range ``(low, high)`` every iterate is clipped to;
        ``x`` must lie inside it (checked when ``x`` is concrete; standardized
        inputs need their own range).
      keep_best: return each example's best iterate instead of the last.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> x = jnp.full((1, 3), 0.5)
      >>> adv = pgd(lambda z: jnp.sum(z, axis=1), x, eps=0.1, step_size=0.05, steps=3)
      >>> [round(v, 3) for v in adv[0].tolist()]
      [0.6, 0.6, 0.6]

    References:
      Madry et al., "Towards Deep Learning Models Resistant to Adversarial
      Attacks", ICLR 2018. https://arxiv.org/abs/1706.06083
    """
    _check_attack(eps, step_size, steps, bounds)
    _check_keep_best(keep_best)  # a string such as "no" would count as True
    if key is not None:
        key_parts(key, "key")  # names `key` for an int seed or other non-key
    x = jnp.asarray(x)
    _check_inside(x, bounds)
    out = jax.eval_shape(loss_fn, x)
    if jnp.shape(out) != x.shape[:1]:
        raise ValueError(
            f"loss_fn must return per-example losses, shape {x.shape[:1]} for x of shape "
            f"{x.shape}, got shape {jnp.shape(out)}: the best iterate is kept per example. Fix: "
            "return the unreduced losses (e.g. jp.adversarial.cross_entropy(logits, y), no mean)."
        )
    lo, hi = bounds

    def summed(z):
        losses = loss_fn(z).astype(jnp.float32)
        return jnp.sum(losses), losses

    grad_fn = jax.grad(summed, has_aux=True)

    def per_example(z):
        return loss_fn(z).astype(jnp.float32)

    def clip(z):
        return _project(z, x, eps, (lo, hi))

    start = x
    if key is not None:
        start = clip(x + jax.random.uniform(key, x.shape, x.dtype, -eps, eps))

    def better(best, best_loss, z, z_loss):
        take = z_loss > best_loss
        shape = (-1,) + (1,) * (x.ndim - 1)
        return jnp.where(take.reshape(shape), z, best), jnp.maximum(z_loss, best_loss)

    def body(_, state):
        z, best, best_loss = state
        g, z_loss = grad_fn(z)
        if keep_best:
            best, best_loss = better(best, best_loss, z, z_loss)
        z = clip(z + step_size * jnp.sign(g).astype(x.dtype))
        return z, best, best_loss

    init_loss = per_example(x) if keep_best else jnp.zeros(x.shape[:1], jnp.float32)
    z, best, best_loss = jax.lax.fori_loop(0, steps, body, (start, x, init_loss))
    if keep_best:
        best, _ = better(best, best_loss, z, per_example(z))
        return jax.lax.stop_gradient(best)
    return jax.lax.stop_gradient(z)


def fgsm(
    loss_fn: Callable[[jax.Array], jax.Array],
    x: ArrayLike,
    *,
    eps: float,
    bounds: tuple[float, float] = (0.0, 1.0),
) -> jax.Array:
    """Returns the fast-gradient-sign example ``clip(x + eps * sign(grad loss), bounds)``.

    Args:
      loss_fn: ``x -> per-example losses [N]`` (e.g. cross-entropy of the
        model's logits); gradients flow through its sum.
      x: clean inputs ``[N, ...]``.
      eps: L-inf radius, >= 0.
      bounds: the data range ``(low, high)`` the example is clipped to; ``x``
        must lie inside it (checked when ``x`` is concrete).

    Examples:
      >>> import jax.numpy as jnp
      >>> adv = fgsm(lambda z: jnp.sum(-z, axis=1), jnp.full((1, 2), 0.5), eps=0.2)
      >>> [round(v, 3) for v in adv[0].tolist()]
      [0.3, 0.3]

    References:
      Goodfellow, Shlens & Szegedy, "Explaining and Harnessing Adversarial
      Examples", ICLR 2015. https://arxiv.org/abs/1412.6572
    """
    _check_attack(eps, 1.0, 1, bounds)
    x = jnp.asarray(x)
    _check_inside(x, bounds)
    g = jax.grad(lambda z: jnp.sum(loss_fn(z)))(x)
    adv = _project(x + eps * jnp.sign(g).astype(x.dtype), x, eps, bounds)
    return jax.lax.stop_gradient(adv)


def _logits(out: Any) -> jax.Array:
    return out[0] if isinstance(out, tuple) else out


def attack(
    apply_fn: ApplyFn,
    *,
    eps: float,
    step_size: float,
    steps: int,
    random_start: bool = True,
    bounds: tuple[float, float] = (0.0, 1.0),
    keep_best: bool = True,
) -> Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]:
    """Returns a jitted ``(params, x, y, key) -> x_adv`` PGD cross-entropy attack on a model.

    The model runs deterministically (``apply_fn(params, x, None)``); ``key``
    only draws the random start. With the default ``keep_best=True`` each
    example keeps its highest-loss iterate, the clean ``x`` included (see
    :func:`pgd`), so ``steps=1, step_size=eps, random_start=False`` is FGSM
    that never lowers the loss: where the FGSM step lowers it, ``x`` is
    returned. Add ``keep_best=False`` for :func:`fgsm` itself.

    Each call checks a concrete ``x`` against ``bounds`` before the jitted
    attack runs (a ``ValueError`` as in :func:`pgd`); inside a caller's own
    ``jax.jit`` ``x`` is traced and the check is skipped.

    Args:
      apply_fn: ``(params, x, key) -> (logits, features)`` (or ``logits``).
      eps, step_size, steps, bounds: as in :func:`pgd` (``step_size`` may be
        0 when ``eps`` is 0, the identity attack).
      random_start: start at ``x + U(-eps, eps)`` drawn from ``key`` (a
        ``ValueError`` when ``key`` is then ``None``).
      keep_best: return each example's best iterate, never lowering the loss
        (the default); ``False`` returns the last iterate.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> apply_fn = lambda w, x, key: (x @ w, [])  # a linear 2-class model
      >>> w = jnp.array([[1.0, -1.0], [-1.0, 1.0]])
      >>> run = attack(apply_fn, eps=0.1, step_size=0.05, steps=3, random_start=False)
      >>> x_adv = run(w, jnp.array([[0.6, 0.4]]), jnp.array([0]), jax.random.key(0))
      >>> [round(v, 3) for v in x_adv[0].tolist()]  # pushed towards class 1, by eps
      [0.5, 0.5]

    References:
      Madry et al., "Towards Deep Learning Models Resistant to Adversarial
      Attacks", ICLR 2018. https://arxiv.org/abs/1706.06083;
      Goodfellow, Shlens & Szegedy, "Explaining and Harnessing Adversarial
      Examples", ICLR 2015. https://arxiv.org/abs/1412.6572
    """
    jitted = _jitted_attack(
        apply_fn,
        eps=eps,
        step_size=step_size,
        steps=steps,
        random_start=random_start,
        bounds=bounds,
        keep_best=keep_best,
    )

    def run(params: Any, x: jax.Array, y: jax.Array, key: jax.Array) -> jax.Array:
        if key is not None:
            key_parts(key, "key")
        if jnp.ndim(y) < 1 or jnp.shape(x)[:1] != jnp.shape(y)[:1]:
            raise ValueError(
                f"x and y must hold as many examples, got x of shape {jnp.shape(x)} and y of "
                f"shape {jnp.shape(y)}. Fix: pass the labels [N] of the N inputs."
            )
        _check_concrete_inside(x, bounds)
        return jitted(params, x, y, key)

    return run


def _jitted_attack(
    apply_fn: ApplyFn,
    *,
    eps: float,
    step_size: float,
    steps: int,
    random_start: bool = True,
    bounds: tuple[float, float] = (0.0, 1.0),
    keep_best: bool = True,
) -> Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]:
    """Returns :func:`attack`'s jitted function, without the range check of ``x``."""
    _check_attack(eps, step_size, steps, bounds)
    _check_keep_best(keep_best)

    @jax.jit
    def run(params, x, y, key):
        if random_start and key is None:
            # pgd takes key=None for "no random start": say so instead of skipping it.
            raise ValueError(
                "key=None, but random_start=True draws the random start from key (the model "
                "itself always runs with key=None). Fix: pass a key, e.g. "
                "jax.random.key(0), or build the attack with random_start=False."
            )

        def loss(z):
            return cross_entropy(_logits(apply_fn(params, z, None)), y)

        return pgd(
            loss,
            x,
            eps=eps,
            step_size=step_size,
            steps=steps,
            key=key if random_start else None,
            bounds=bounds,
            keep_best=bool(keep_best),
        )

    return run
