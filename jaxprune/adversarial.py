"""Adversarial attacks, latent vulnerability and ANP-VS training steps.

* :func:`pgd` / :func:`fgsm` — L-inf attacks as pure, jit-compatible functions
  of a per-example loss; :func:`attack` builds a jitted cross-entropy attack
  for a model.
* :func:`vulnerability` — the mean ``|z - z_adv|`` of chosen latent features,
  and :func:`vulnerability_loss`, the suppression term ``lambda * vulnerability``.
* :func:`anp_vs_step` — one jitted step of adversarial neural pruning with
  vulnerability suppression: mask parameters learn from the adversarial loss
  plus KL, the weights from ``(clean + 2 * adversarial) / 3 + KL + lambda *
  vulnerability``. :func:`adversarial_step` is plain adversarial training.
* :func:`robustness` — clean accuracy, PGD accuracy and vulnerability on a set.

Models enter as ``apply_fn(params, x, key) -> (logits, features)``: ``key``
samples the gates (``None``: deterministic test-time gates), ``features`` is a
list of latent arrays (may be empty for attacks and plain training).
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

from jaxprune._tree import Path, _normalize, as_float
from jaxprune.gates_tree import is_gate

__all__ = [
    "adversarial_step",
    "anp_vs_step",
    "attack",
    "cross_entropy",
    "fgsm",
    "pgd",
    "robustness",
    "vulnerability",
    "vulnerability_loss",
]

ApplyFn = Callable[[Any, jax.Array, "jax.Array | None"], tuple[jax.Array, Sequence[jax.Array]]]


def _check_attack(eps: Any, step_size: Any = 1.0, steps: Any = 1, bounds=(0.0, 1.0)) -> None:
    if not isinstance(eps, jax.core.Tracer) and not (
        as_float(eps) >= 0 and math.isfinite(as_float(eps))
    ):
        raise ValueError(
            f"eps must be a finite number >= 0 (the L-inf radius in input units), got {eps!r}. "
            "Fix: e.g. eps=0.1 for images in [0, 1]."
        )
    if not isinstance(step_size, jax.core.Tracer) and not as_float(step_size) > 0:
        raise ValueError(
            f"step_size must be > 0, got {step_size!r}. Fix: e.g. step_size=eps / 4 "
            "(or 2.5 * eps / steps)."
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


def _check_inside(x: jax.Array, bounds: tuple[float, float]) -> None:
    """Raises when ``x`` is not floating, or a concrete ``x`` lies outside ``bounds``."""
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

    Examples:
      >>> import jax.numpy as jnp
      >>> logits = jnp.array([[0.0, 0.0], [2.0, 0.0]])
      >>> [round(v, 3) for v in cross_entropy(logits, jnp.array([0, 1])).tolist()]
      [0.693, 2.127]
    """
    if jnp.ndim(labels) == jnp.ndim(logits) or not jnp.issubdtype(
        jnp.result_type(labels), jnp.integer
    ):
        raise ValueError(
            f"labels must be integer class indices, shape {tuple(jnp.shape(logits))[:-1]}, got "
            f"{jnp.result_type(labels)} of shape {tuple(jnp.shape(labels))} (one-hot or float "
            "labels?). Fix: pass y.argmax(-1) for one-hot labels, or y.astype(jnp.int32)."
        )
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


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
      step_size: step of each signed-gradient update, > 0.
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
) -> Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]:
    """Returns a jitted ``(params, x, y, key) -> x_adv`` PGD cross-entropy attack on a model.

    The model runs deterministically (``apply_fn(params, x, None)``); ``key``
    only draws the random start. ``steps=1, step_size=eps, random_start=False``
    is FGSM.

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
      Attacks", ICLR 2018. https://arxiv.org/abs/1706.06083
    """
    _check_attack(eps, step_size, steps, bounds)

    @jax.jit
    def run(params, x, y, key):
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
        )

    return run


def vulnerability(features: Sequence[jax.Array], features_adv: Sequence[jax.Array]) -> jax.Array:
    """Returns the mean over features of ``mean |z - z_adv|``: the latent vulnerability.

    Each feature's vulnerability is the mean absolute change of its
    activations under attack; the network's is the average over the chosen
    features (layers).

    Examples:
      >>> import jax.numpy as jnp
      >>> float(vulnerability([jnp.zeros(2), jnp.ones(4)], [jnp.ones(2), jnp.ones(4)]))
      0.5

    References:
      Madaan, Shin & Hwang, "Adversarial Neural Pruning with Latent
      Vulnerability Suppression", ICML 2020. https://arxiv.org/abs/1908.04355
    """
    if len(features) != len(features_adv) or not features:
        raise ValueError(
            f"vulnerability needs the same non-empty list of features for clean and "
            f"adversarial inputs, got {len(features)} and {len(features_adv)}. Fix: return the "
            "same latent features from both forward passes."
        )
    per = [
        jnp.mean(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))
        for a, b in zip(features, features_adv, strict=True)
    ]
    return sum(per) / len(per)


def vulnerability_loss(
    features: Sequence[jax.Array], features_adv: Sequence[jax.Array], lam: float
) -> jax.Array:
    """Returns ``lam * vulnerability(features, features_adv)``, the suppression loss.

    Examples:
      >>> import jax.numpy as jnp
      >>> float(vulnerability_loss([jnp.zeros(4)], [jnp.full(4, 0.5)], lam=0.5))
      0.25

    References:
      Madaan, Shin & Hwang, ICML 2020. https://arxiv.org/abs/1908.04355
    """
    return lam * vulnerability(features, features_adv)


def _check_nonneg(name: str, value: float, fix: str) -> None:
    if not float(value) >= 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}. Fix: {fix}")


def _combine(grads_w: Any, grads_m: Any, is_mask: Callable[[Path, Any], bool]) -> Any:
    # tree_map keeps the input's structure (nnx Variables included) for tx.update.
    return jax.tree_util.tree_map_with_path(
        lambda p, gw, gm: gm if is_mask(_normalize(p), gw) else gw, grads_w, grads_m
    )


_ATTACK_GATES = ("sampled", "test")


def _check_attack_gates(attack_gates: Any) -> None:
    if attack_gates not in _ATTACK_GATES:
        raise ValueError(
            f"attack_gates must be one of {_ATTACK_GATES}, got {attack_gates!r}. Fix: 'sampled' "
            "attacks the network with the step's gate sample, 'test' the deterministic "
            "test-time network (as the ANP-VS reference code does)."
        )


def _attack_batch(
    apply_fn, params, x, y, key, *, eps, step_size, steps, bounds, attack_gates="sampled"
):
    """Returns ``(gate_key, x_adv)``: PGD examples and the gate key of the training pass.

    The attack runs against the network with that gate sample
    (``attack_gates="sampled"``) or against the test-time network
    (``attack_gates="test"``, ``apply_fn(params, z, None)``).
    """
    k_gate, k_start = jax.random.split(key)
    k_attack = k_gate if attack_gates == "sampled" else None

    def adv_loss(z):
        return cross_entropy(apply_fn(params, z, k_attack)[0], y)

    x_adv = pgd(adv_loss, x, eps=eps, step_size=step_size, steps=steps, key=k_start, bounds=bounds)
    return k_gate, x_adv


def anp_vs_step(
    apply_fn: ApplyFn,
    penalty_fn: Callable[[Any], jax.Array],
    tx: optax.GradientTransformation,
    *,
    eps: float,
    step_size: float,
    steps: int,
    num_train: int,
    beta: float = 4.0,
    lam: float = 1e-3,
    adv_weight: float = 2.0,
    bounds: tuple[float, float] = (0.0, 1.0),
    is_mask: Callable[[Path, Any], bool] = is_gate,
    attack_gates: str = "sampled",
) -> Callable:
    """Returns a jitted ANP-VS step ``(params, opt_state, x, y, key) -> (params, state, metrics)``.

    One step: draw a gate sample and a PGD example (random start) against the
    sampled network (or the test-time one, ``attack_gates="test"``); then from
    one forward pass through the clean and adversarial batch, two backward
    passes give the mask parameters' gradient of ``CE(x_adv) + beta * KL / N``
    and the weights' gradient of ``(CE(x) + w CE(x_adv)) / (1 + w) + beta * KL
    / N + lam * vulnerability``, ``w = adv_weight`` (2 in the paper); ``tx``
    updates both (use :func:`jaxprune.gates.multi_transform` for separate
    optimizers).

    Args:
      apply_fn: ``(params, x, key) -> (logits, latent features)``.
      penalty_fn: ``params -> KL`` summed over gates (e.g. ``jp.gates.penalty``).
      tx: optax transform over the whole params tree.
      eps, step_size, steps: the training PGD attack.
      num_train: ``N``, the training-set size the KL is divided by.
      beta: KL weight, >= 0 (4 in the paper).
      lam: vulnerability-suppression weight, >= 0 (1e-3 in the paper).
      adv_weight: ``w``, the weight of the adversarial cross-entropy against
        the clean one in the weights' loss, >= 0 (the reference code's
        ``adv_weight``, 2).
      bounds: the data range.
      is_mask: ``(path, leaf) -> bool`` telling mask parameters from weights.
      attack_gates: ``"sampled"`` attacks the network with the step's gate
        sample; ``"test"`` attacks the deterministic test-time network, as the
        reference code's ``PGDAttack`` (``train=False``) does.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> def apply_fn(p, x, key):  # gated inputs of a linear model; key unused here
      ...     h = x * jax.nn.sigmoid(p["gate_logit"])
      ...     return h @ p["w"], [h]
      >>> p = {"w": jnp.array([[1.0, -1.0], [-1.0, 1.0]]), "gate_logit": jnp.zeros(2)}
      >>> kl = lambda p: jnp.sum(jax.nn.sigmoid(p["gate_logit"]))  # a stand-in penalty
      >>> tx = optax.sgd(0.1)
      >>> step = anp_vs_step(apply_fn, kl, tx, eps=0.05, step_size=0.02, steps=2, num_train=2)
      >>> x, y = jnp.array([[0.9, 0.1], [0.2, 0.8]]), jnp.array([0, 1])
      >>> p, opt_state, m = step(p, tx.init(p), x, y, jax.random.key(0))
      >>> sorted(m), float(m["kl"]), bool(jnp.isfinite(m["vulnerability"]))
      (['acc', 'acc_adv', 'ce', 'ce_adv', 'kl', 'vulnerability'], 1.0, True)

    References:
      Madaan, Shin & Hwang, "Adversarial Neural Pruning with Latent
      Vulnerability Suppression", ICML 2020. https://arxiv.org/abs/1908.04355;
      reference code https://github.com/divyam3897/ANP_VS
      (``src/experiments/run.py``).
    """
    _check_attack(eps, step_size, steps, bounds)
    _check_nonneg("beta", beta, "use the paper's 4.0.")
    _check_nonneg("lam", lam, "use the paper's 1e-3.")
    _check_nonneg("adv_weight", adv_weight, "use the reference code's 2.0.")
    _check_attack_gates(attack_gates)
    if num_train < 1:
        raise ValueError(
            f"num_train must be >= 1 (the training-set size), got {num_train!r}. Fix: pass "
            "len(x_train), the N the KL is divided by."
        )
    w = float(adv_weight)
    c_weights = jnp.array([1 / (1 + w), w / (1 + w), beta / num_train, lam], jnp.float32)
    c_masks = jnp.array([0.0, 1.0, beta / num_train, 0.0], jnp.float32)

    @jax.jit
    def step(params, opt_state, x, y, key):
        k_gate, x_adv = _attack_batch(
            apply_fn,
            params,
            x,
            y,
            key,
            eps=eps,
            step_size=step_size,
            steps=steps,
            bounds=bounds,
            attack_gates=attack_gates,
        )

        def terms(p):
            logits, feats = apply_fn(p, x, k_gate)
            logits_adv, feats_adv = apply_fn(p, x_adv, k_gate)
            ce = jnp.mean(cross_entropy(logits, y))
            ce_adv = jnp.mean(cross_entropy(logits_adv, y))
            vuln = vulnerability(feats, feats_adv) if feats else jnp.float32(0)
            out = jnp.stack([ce, ce_adv, penalty_fn(p).astype(jnp.float32), vuln])
            return out, (logits, logits_adv)

        values, vjp_fn, (logits, logits_adv) = jax.vjp(terms, params, has_aux=True)
        (g_w,) = vjp_fn(c_weights)
        (g_m,) = vjp_fn(c_masks)
        grads = _combine(g_w, g_m, is_mask)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {
            "ce": values[0],
            "ce_adv": values[1],
            "kl": values[2],
            "vulnerability": values[3],
            "acc": jnp.mean(jnp.argmax(logits, -1) == y),
            "acc_adv": jnp.mean(jnp.argmax(logits_adv, -1) == y),
        }
        return params, opt_state, metrics

    return step


def adversarial_step(
    apply_fn: ApplyFn,
    tx: optax.GradientTransformation,
    *,
    eps: float,
    step_size: float,
    steps: int,
    clean_weight: float = 0.0,
    penalty_fn: Callable[[Any], jax.Array] | None = None,
    penalty_weight: float = 0.0,
    bounds: tuple[float, float] = (0.0, 1.0),
    attack_gates: str = "sampled",
) -> Callable:
    """Returns a jitted adversarial-training step ``(params, opt_state, x, y, key) -> ...``.

    Loss ``(1 - clean_weight) CE(x_adv) + clean_weight CE(x) + penalty_weight *
    penalty_fn(params)``, ``x_adv`` a PGD example (random start) against the
    network with the step's gate sample (``attack_gates="sampled"``) or the
    test-time network (``"test"``; the same for an ungated model).
    ``clean_weight=0`` is Madry et al.'s adversarial training;
    ``clean_weight=1/3`` is the ``(CE(x) + 2 CE(x_adv)) / 3`` mix that the
    ANP-VS reference code trains its adversarial baseline with. ``steps`` can
    be tiny for cheap variants.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> apply_fn = lambda w, x, key: (x @ w, [])  # a linear 2-class model, no gates
      >>> w = jnp.array([[1.0, -1.0], [-1.0, 1.0]])
      >>> tx = optax.sgd(0.1)
      >>> step = adversarial_step(apply_fn, tx, eps=0.05, step_size=0.02, steps=2)
      >>> x, y = jnp.array([[0.9, 0.1], [0.2, 0.8]]), jnp.array([0, 1])
      >>> w, opt_state, m = step(w, tx.init(w), x, y, jax.random.key(0))
      >>> float(m["acc_adv"]), bool(jnp.isfinite(m["loss"])), w.shape
      (1.0, True, (2, 2))

    References:
      Madry et al., ICLR 2018. https://arxiv.org/abs/1706.06083;
      Madaan, Shin & Hwang, ICML 2020, https://arxiv.org/abs/1908.04355
      (reference code https://github.com/divyam3897/ANP_VS, ``base`` mode).
    """
    _check_attack(eps, step_size, steps, bounds)
    if not 0.0 <= clean_weight <= 1.0:
        raise ValueError(
            f"clean_weight must be in [0, 1], got {clean_weight!r}. Fix: 0.0 for Madry's "
            "adversarial loss, 1/3 for the ANP-VS code's (clean + 2 adv) / 3."
        )
    _check_nonneg("penalty_weight", penalty_weight, "e.g. beta / num_train for a KL.")
    _check_attack_gates(attack_gates)

    @jax.jit
    def step(params, opt_state, x, y, key):
        k_gate, x_adv = _attack_batch(
            apply_fn,
            params,
            x,
            y,
            key,
            eps=eps,
            step_size=step_size,
            steps=steps,
            bounds=bounds,
            attack_gates=attack_gates,
        )

        def loss(p):
            logits_adv = apply_fn(p, x_adv, k_gate)[0]
            total = (1 - clean_weight) * jnp.mean(cross_entropy(logits_adv, y))
            logits = logits_adv
            if clean_weight > 0:
                logits = apply_fn(p, x, k_gate)[0]
                total = total + clean_weight * jnp.mean(cross_entropy(logits, y))
            if penalty_fn is not None and penalty_weight > 0:
                total = total + penalty_weight * penalty_fn(p)
            return total, logits_adv

        (value, logits_adv), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        acc_adv = jnp.mean(jnp.argmax(logits_adv, -1) == y)
        return params, opt_state, {"loss": value, "acc_adv": acc_adv}

    return step


def robustness(
    apply_fn: ApplyFn,
    params: Any,
    x: np.ndarray,
    y: np.ndarray,
    *,
    eps: float,
    step_size: float,
    steps: int,
    key: jax.Array,
    batch_size: int = 500,
    bounds: tuple[float, float] = (0.0, 1.0),
    progress: bool = False,
) -> dict[str, float]:
    """Returns ``{"clean_acc", "adv_acc", "vulnerability"}`` under a PGD attack (test-time gates).

    Vulnerability is averaged over the features ``apply_fn`` returns (``nan``
    when it returns none).

    Raises:
      ValueError: ``y`` holds labels outside ``[0, classes)``, or is not integer
        class indices; ``x`` and ``y`` are empty or differ in length.

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> def apply_fn(w, x, key):  # a linear 2-class model; its logits as the feature
      ...     logits = x @ w
      ...     return logits, [logits]
      >>> w = jnp.array([[1.0, -1.0], [-1.0, 1.0]])
      >>> x, y = np.array([[0.6, 0.4], [0.1, 0.9]]), np.array([0, 1])
      >>> key = jax.random.key(0)
      >>> r = robustness(apply_fn, w, x, y, eps=0.2, step_size=0.05, steps=10, key=key)
      >>> r["clean_acc"], r["adv_acc"], round(r["vulnerability"], 3)
      (1.0, 0.5, 0.4)

    References:
      Madry et al., "Towards Deep Learning Models Resistant to Adversarial
      Attacks", ICLR 2018. https://arxiv.org/abs/1706.06083;
      Madaan, Shin & Hwang, "Adversarial Neural Pruning with Latent
      Vulnerability Suppression", ICML 2020. https://arxiv.org/abs/1908.04355
    """
    run = attack(apply_fn, eps=eps, step_size=step_size, steps=steps, bounds=bounds)

    @jax.jit
    def scores(params, xb, x_adv, yb):
        logits, f = apply_fn(params, xb, None)
        logits_adv, f_adv = apply_fn(params, x_adv, None)
        v = vulnerability(f, f_adv) if f else jnp.float32(jnp.nan)
        return (jnp.sum(jnp.argmax(logits, -1) == yb), jnp.sum(jnp.argmax(logits_adv, -1) == yb), v)

    y_np = np.asarray(y)
    if not len(y_np) or len(x) != len(y_np):
        raise ValueError(
            f"x and y must hold the same number (>= 1) of examples, got {len(x)} inputs and "
            f"{len(y_np)} labels. Fix: pass the evaluation set, e.g. x_test[:500], y_test[:500]."
        )
    if len(y_np):
        logits_shape = jax.eval_shape(lambda p, xb: apply_fn(p, xb, None)[0], params, x[:1])
        classes = logits_shape.shape[-1]
        if np.issubdtype(y_np.dtype, np.integer) and (y_np.min() < 0 or y_np.max() >= classes):
            raise ValueError(
                f"y holds labels in [{y_np.min()}, {y_np.max()}], outside [0, {classes}) for a "
                f"model with {classes} classes (an out-of-range label gives a NaN loss, and the "
                "attack leaves that example alone). Fix: pass class indices 0..classes-1."
            )
    starts = range(0, len(x), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"PGD-{steps}", leave=False)
    clean = adv = 0
    vulns, sizes = [], []
    for i, s in enumerate(starts):
        xb, yb = jnp.asarray(x[s : s + batch_size]), jnp.asarray(y[s : s + batch_size])
        x_adv = run(params, xb, yb, jax.random.fold_in(key, i))
        c, a, v = scores(params, xb, x_adv, yb)
        clean, adv = clean + int(c), adv + int(a)
        vulns.append(float(v))
        sizes.append(len(xb))
    n = sum(sizes)
    return {
        "clean_acc": clean / n,
        "adv_acc": adv / n,
        "vulnerability": float(np.average(vulns, weights=sizes)),
    }
