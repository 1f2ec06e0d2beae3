"""Measures of adversarial robustness: latent vulnerability and accuracy under PGD.

* :func:`vulnerability` — the mean ``|z - z_adv|`` of chosen latent features,
  and :func:`vulnerability_loss`, the suppression term ``lambda * vulnerability``
  (the training steps of :mod:`jaxprune.adversarial` add it to their loss).
* :func:`robustness` — clean accuracy, PGD accuracy and vulnerability on a set,
  with the test-time gates (``key=None``); it checks a concrete ``x`` against
  ``bounds`` before entering ``jax.jit``.

:mod:`jaxprune.adversarial` re-exports these names.

References:
  Madry et al., "Towards Deep Learning Models Resistant to Adversarial
  Attacks", ICLR 2018. https://arxiv.org/abs/1706.06083;
  Madaan, Shin & Hwang, "Adversarial Neural Pruning with Latent
  Vulnerability Suppression", ICML 2020. https://arxiv.org/abs/1908.04355
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxprune._compile import jit_by_content
from jaxprune._tree import as_float, as_int, key_parts
from jaxprune.attacks import ApplyFn, _check_concrete_inside, _jitted_attack

__all__ = ["robustness", "vulnerability", "vulnerability_loss"]


def vulnerability(features: Sequence[jax.Array], features_adv: Sequence[jax.Array]) -> jax.Array:
    """Returns the mean over features of ``mean |z - z_adv|``: the latent vulnerability.

    Each feature's vulnerability is the mean absolute change of its
    activations under attack; the network's is the average over the chosen
    features (layers).

    Args:
      features: the latent features on the clean inputs, a non-empty sequence
        of arrays (one per layer), compared in float32.
      features_adv: the same features on the adversarial inputs: as many, in
        the same order, each of its clean counterpart's shape.

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
    for i, (a, b) in enumerate(zip(features, features_adv, strict=True)):
        if jnp.shape(a) != jnp.shape(b):
            raise ValueError(
                f"vulnerability compares features[{i}] of shape {tuple(jnp.shape(a))} with "
                f"features_adv[{i}] of shape {tuple(jnp.shape(b))}: the same feature must have "
                "the same shape for clean and adversarial inputs. Fix: return the same latent "
                "features, in the same order, from both forward passes on batches of one size."
            )
    per = [
        jnp.mean(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32)))
        for a, b in zip(features, features_adv, strict=True)
    ]
    return sum(per) / len(per)


def vulnerability_loss(
    features: Sequence[jax.Array], features_adv: Sequence[jax.Array], lam: float
) -> jax.Array:
    """Returns ``lam * vulnerability(features, features_adv)``, the suppression loss.

    ``lam`` is a finite number >= 0 (the paper's 1e-3), checked when concrete; a
    traced ``lam`` (a schedule inside ``jax.jit``) is taken as it is.

    Args:
      features, features_adv: the clean and adversarial latent features, as
        for :func:`vulnerability`.
      lam: the term's weight, a finite number >= 0 (0 turns the term off).

    Raises:
      ValueError: a concrete ``lam`` that is negative, inf, NaN or not a number
        (a string, a bool, None).

    Examples:
      >>> import jax.numpy as jnp
      >>> float(vulnerability_loss([jnp.zeros(4)], [jnp.full(4, 0.5)], lam=0.5))
      0.25

    References:
      Madaan, Shin & Hwang, ICML 2020. https://arxiv.org/abs/1908.04355
    """
    if not isinstance(lam, jax.core.Tracer):
        v = as_float(lam if np.ndim(lam) == 0 else math.nan)
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(
                f"lam must be a finite number >= 0 (the weight of the vulnerability term), got "
                f"{lam!r}. Fix: e.g. lam=1e-3 (the paper's), or lam=0 to turn the term off."
            )
    return lam * vulnerability(features, features_adv)


def robustness(
    apply_fn: ApplyFn,
    params: Any,
    x: ArrayLike,
    y: ArrayLike,
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
    when it returns none, or, as :func:`~jaxprune.adversarial.attack` allows,
    returns its logits alone). A model trained with ``has_state=True`` (see
    :func:`~jaxprune.adversarial.adversarial_step`) is evaluated with its state as part of
    ``params``: ``robustness(lambda ps, x, k: apply_fn(*ps, x, k)[:2],
    (params, state), ...)``.

    Args:
      apply_fn: ``apply_fn(params, x, key) -> (logits, features)`` or logits
        alone, with the gates at test time.
      params: what ``apply_fn`` takes first.
      x, y: test inputs ``[N, ...]`` in ``bounds`` and integer labels ``[N]``.
      eps, step_size, steps: the PGD attack's radius, step and number of steps
        (see :func:`~jaxprune.attacks.pgd`).
      key: PRNG key of the attack's random start.
      batch_size: examples attacked per jitted call (default 500).
      bounds: the data range ``(low, high)``.
      progress: show a progress bar over the batches.

    Raises:
      ValueError: ``y`` holds labels outside ``[0, classes)``, or is not integer
        class indices; ``x`` and ``y`` are empty or differ in length; ``x``
        lies outside ``bounds``; ``batch_size`` is not an int >= 1; ``key``
        (the random start's) is ``None``.

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
    # Content-keyed: a later call (a new closure, the same program) reuses the compiled
    # attack and scores instead of compiling them again (~0.8 s for a small MLP).
    run = jit_by_content(
        _jitted_attack(apply_fn, eps=eps, step_size=step_size, steps=steps, bounds=bounds)
    )
    if key is None:
        # The model runs with key=None (its test-time gates); this key draws PGD's random start.
        raise ValueError(
            "robustness needs key, the PRNG key of PGD's random start, got None (the model "
            "itself always runs with key=None, its test-time gates). Fix: pass e.g. "
            "key=jax.random.key(0)."
        )
    key_parts(key, "key")
    # A nested list (or any array-like without a dtype) as one array, as attack takes it:
    # eval_shape and the batch slices below need an array.
    x = x if hasattr(x, "dtype") else np.asarray(x)
    size = as_int(batch_size)
    if size is None or size < 1:
        raise ValueError(
            f"batch_size must be an int >= 1, got {batch_size!r}. Fix: e.g. batch_size=500 "
            "(the default), or len(x) for a single batch."
        )
    # Checked here, not inside the jitted attack, where x is traced (and clipping
    # out-of-range inputs into bounds would be silent).
    _check_concrete_inside(x, bounds)

    def outputs(params, xb):
        # As attack takes it: (logits, features), or the logits alone (no features).
        out = apply_fn(params, xb, None)
        return out if isinstance(out, tuple) else (out, [])

    @jit_by_content
    def scores(params, xb, x_adv, yb):
        logits, f = outputs(params, xb)
        logits_adv, f_adv = outputs(params, x_adv)
        v = vulnerability(f, f_adv) if f else jnp.float32(jnp.nan)
        return (jnp.sum(jnp.argmax(logits, -1) == yb), jnp.sum(jnp.argmax(logits_adv, -1) == yb), v)

    y_np = np.asarray(y)
    if not len(y_np) or len(x) != len(y_np):
        raise ValueError(
            f"x and y must hold the same number (>= 1) of examples, got {len(x)} inputs and "
            f"{len(y_np)} labels. Fix: pass the evaluation set, e.g. x_test[:500], y_test[:500]."
        )
    if len(y_np):
        logits_shape = jax.eval_shape(lambda p, xb: outputs(p, xb)[0], params, x[:1])
        classes = logits_shape.shape[-1]
        if np.issubdtype(y_np.dtype, np.integer) and (y_np.min() < 0 or y_np.max() >= classes):
            raise ValueError(
                f"y holds labels in [{y_np.min()}, {y_np.max()}], outside [0, {classes}) for a "
                f"model with {classes} classes (an out-of-range label gives a NaN loss, and the "
                "attack leaves that example alone). Fix: pass class indices 0..classes-1."
            )
    starts = range(0, len(x), size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"PGD-{steps}", leave=False, disable=None)  # none when piped
    clean = adv = 0
    vulns, sizes = [], []
    for i, s in enumerate(starts):
        xb, yb = jnp.asarray(x[s : s + size]), jnp.asarray(y[s : s + size])
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
