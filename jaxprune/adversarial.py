"""Adversarial attacks, latent vulnerability and ANP-VS training steps.

* :func:`pgd` / :func:`fgsm` — L-inf attacks as pure, jit-compatible functions
  of a per-example loss; :func:`attack` builds a jitted cross-entropy attack
  for a model. They live in :mod:`jaxprune.attacks`, with
  :func:`cross_entropy`, and are re-exported here.
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

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune._tree import Path, _normalize
from jaxprune.attacks import ApplyFn, _check_attack, attack, cross_entropy, fgsm, pgd
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
