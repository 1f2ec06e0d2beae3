"""Adversarial attacks, latent vulnerability and ANP-VS training steps.

* :func:`pgd` / :func:`fgsm` — L-inf attacks as pure, jit-compatible functions
  of a per-example loss; :func:`attack` builds a jitted cross-entropy attack
  for a model. They live in :mod:`jaxprune.attacks`, with
  :func:`cross_entropy`, and are re-exported here.
* :func:`vulnerability` — the mean ``|z - z_adv|`` of chosen latent features,
  and :func:`vulnerability_loss`, the suppression term ``lambda * vulnerability``.
  They live in :mod:`jaxprune.robustness`, with :func:`robustness`, and are
  re-exported here.
* :func:`anp_vs_step` — one jitted step of adversarial neural pruning with
  vulnerability suppression: mask parameters learn from the adversarial loss
  plus KL, the weights from ``(clean + 2 * adversarial) / 3 + KL + lambda *
  vulnerability``. :func:`adversarial_step` is plain adversarial training.
* :func:`robustness` — clean accuracy, PGD accuracy and vulnerability on a set.

Models enter as ``apply_fn(params, x, key) -> (logits, features)``: ``key``
samples the gates (``None``: deterministic test-time gates), ``features`` is a
list of latent arrays (may be empty for attacks and plain training).

A model with state that training updates (BatchNorm running statistics) needs
``has_state=True`` in the training steps: ``apply_fn(params, state, x, key) ->
(logits, features, new_state)`` and the step threads ``state``. Without it
the state passed in through a closure never changes, and a BatchNorm model
evaluated with its running statistics (``key=None``, as :func:`robustness`
runs it) stays at its initial mean 0 and variance 1: near chance however well
it trained.

Each call of :func:`attack`, :func:`robustness` and the training steps
checks a concrete ``x`` against ``bounds`` before entering ``jax.jit``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune._tree import (
    Path,
    _normalize,
    as_float,
    as_int,
    is_variable,
    leaves_with_paths,
    path_str,
    unwrap_variables,
)
from jaxprune.attacks import (
    ApplyFn,
    _check_attack,
    _check_concrete_inside,
    attack,
    cross_entropy,
    fgsm,
    pgd,
)
from jaxprune.gates_tree import is_gate
from jaxprune.robustness import robustness, vulnerability, vulnerability_loss

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


def _check_nonneg(name: str, value: float, fix: str) -> None:
    # inf is refused too: the step's weights would become inf / inf, NaN.
    v = as_float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}. Fix: {fix}")
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}. Fix: {fix}")


def _combine(grads_w: Any, grads_m: Any, is_mask: Callable[[Path, Any], bool]) -> Any:
    # tree_map keeps the input's structure (nnx Variables included) for tx.update.
    # Variables are leaves, so a path never runs into one (a NamedTuple field named
    # `value` keeps its name); the predicate sees the array, as `where`s do.
    return jax.tree_util.tree_map_with_path(
        lambda p, gw, gm: gm if is_mask(_normalize(p), unwrap_variables(gw)) else gw,
        grads_w,
        grads_m,
        is_leaf=is_variable,
    )


_ATTACK_GATES = ("sampled", "test")


def _check_attack_gates(attack_gates: Any) -> None:
    if attack_gates not in _ATTACK_GATES:
        raise ValueError(
            f"attack_gates must be one of {_ATTACK_GATES}, got {attack_gates!r}. Fix: 'sampled' "
            "attacks the network with the step's gate sample, 'test' the deterministic "
            "test-time network (as the ANP-VS reference code does)."
        )


def _forward(apply_fn: Callable, has_state: bool) -> Callable:
    """Returns ``(params, state, x, key) -> (logits, features, new_state)`` for either contract."""
    if not isinstance(has_state, (bool, np.bool_)):
        raise ValueError(
            f"has_state must be a bool, got {has_state!r}. Fix: True when apply_fn is "
            "(params, state, x, key) -> (logits, features, new_state), else False."
        )
    if has_state:

        def fwd(params, state, x, key):
            out = apply_fn(params, state, x, key)
            if not isinstance(out, (tuple, list)) or len(out) != 3:
                raise ValueError(
                    "with has_state=True apply_fn must return (logits, features, new_state), "
                    f"got {type(out).__name__}"
                    + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else "")
                    + ". Fix: return the updated state too, e.g. nnx.state(model, "
                    "nnx.Not(nnx.Param)) after the forward pass, or has_state=False."
                )
            return out

        return fwd

    def fwd(params, state, x, key):
        logits, features = apply_fn(params, x, key)
        return logits, features, state

    return fwd


def _check_params(params: Any, name: str) -> None:
    """Raises when a ``params`` leaf is not floating point (checked once, at trace time).

    Every leaf is differentiated and updated by ``tx``; a PRNG key or an integer
    counter fails deep inside ``jax.grad`` or optax with an error naming neither.
    """
    bad = [
        f"{path_str(p)} ({getattr(x, 'dtype', type(x).__name__)})"
        for p, x in leaves_with_paths(params)[0]
        if not (hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact))
    ]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ValueError(
            f"{name} differentiates and updates every params leaf, but {len(bad)} "
            f"{'is' if len(bad) == 1 else 'are'} not floating point: {shown} (the full "
            "nnx.split(model) state holds the gates' keys and other non-parameters). Fix: "
            "graphdef, params, rest = nnx.split(model, nnx.Param, ...), pass params and "
            "close over rest in apply_fn (as examples/anp_vs.py does), or pass rest as the "
            "state with has_state=True."
        )


def _attack_batch(
    fwd, params, state, x, y, key, *, eps, step_size, steps, bounds, attack_gates="sampled"
):
    """Returns ``(gate_key, x_adv)``: PGD examples and the gate key of the training pass.

    The attack runs against the network with that gate sample
    (``attack_gates="sampled"``) or against the test-time network
    (``attack_gates="test"``, ``key=None``). The state the attack's passes
    return is dropped: only the training passes update it.
    """
    k_gate, k_start = jax.random.split(key)
    k_attack = k_gate if attack_gates == "sampled" else None

    def adv_loss(z):
        return cross_entropy(fwd(params, state, z, k_attack)[0], y)

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
    has_state: bool = False,
) -> Callable:
    """Returns an ANP-VS step ``(params, opt_state, x, y, key) -> (params, opt_state, metrics)``.

    One step: draw a gate sample and a PGD example (random start) against the
    sampled network (or the test-time one, ``attack_gates="test"``); then from
    one forward pass through the clean and adversarial batch, two backward
    passes give the mask parameters' gradient of ``CE(x_adv) + beta * KL / N``
    and the weights' gradient of ``(CE(x) + w CE(x_adv)) / (1 + w) + beta * KL
    / N + lam * vulnerability``, ``w = adv_weight`` (2 in the paper); ``tx``
    updates both (use :func:`jaxprune.gates.multi_transform` for separate
    optimizers).

    The step is jitted; each call first checks a concrete NumPy ``x`` against
    ``bounds`` on the host (one min and max; a ``jax.Array`` batch on the first
    call only, since each check would copy it to the host; skipped when the
    step is called inside a caller's own ``jax.jit``), and the first call of
    each params structure checks that every params leaf is floating point.

    Model state (BatchNorm): with the default ``has_state=False`` nothing but
    ``params`` is updated, so BatchNorm running statistics closed over by
    ``apply_fn`` stay at their initial values and the test-time network
    (``key=None``, what :func:`robustness` evaluates) is near chance. Pass
    ``has_state=True`` for such models: ``apply_fn(params, state, x, key) ->
    (logits, features, new_state)`` and the step becomes ``(params, state,
    opt_state, x, y, key) -> (params, state, opt_state, metrics)``, keeping
    the state of the clean training pass (the attack's and the adversarial
    pass's are dropped). See :func:`adversarial_step` for an example.
    Models without BatchNorm (LeNet-5-Caffe in examples/anp_vs.py) need none.

    Args:
      apply_fn: ``(params, x, key) -> (logits, latent features)``, or with
        ``has_state`` ``(params, state, x, key) -> (logits, features,
        new_state)``.
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
      has_state: thread a model state (e.g. BatchNorm statistics), see above.

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
    fwd = _forward(apply_fn, has_state)
    n = as_int(num_train)
    if n is None or n < 1:
        raise ValueError(
            f"num_train must be >= 1, an int (the training-set size), got {num_train!r}. Fix: "
            "pass len(x_train), the N the KL is divided by."
        )
    num_train = n
    w = float(adv_weight)
    c_weights = jnp.array([1 / (1 + w), w / (1 + w), beta / num_train, lam], jnp.float32)
    c_masks = jnp.array([0.0, 1.0, beta / num_train, 0.0], jnp.float32)

    @jax.jit
    def jitted(params, state, opt_state, x, y, key):
        _check_params(params, "anp_vs_step")
        k_gate, x_adv = _attack_batch(
            fwd,
            params,
            state,
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
            logits, feats, new_state = fwd(p, state, x, k_gate)
            logits_adv, feats_adv, _ = fwd(p, state, x_adv, k_gate)
            ce = jnp.mean(cross_entropy(logits, y))
            ce_adv = jnp.mean(cross_entropy(logits_adv, y))
            vuln = vulnerability(feats, feats_adv) if feats else jnp.float32(0)
            out = jnp.stack([ce, ce_adv, penalty_fn(p).astype(jnp.float32), vuln])
            return out, (logits, logits_adv, new_state)

        values, vjp_fn, (logits, logits_adv, new_state) = jax.vjp(terms, params, has_aux=True)
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
        return params, new_state, opt_state, metrics

    return _wrap_step(jitted, bounds, has_state)


def _wrap_step(jitted: Callable, bounds: tuple[float, float], has_state: bool) -> Callable:
    """Returns the public step: the range check of a concrete ``x``, then the jitted step.

    A NumPy batch is checked at every call (a min and max on the host). A
    ``jax.Array`` batch is checked at the first call only: reading it back
    at every step would copy each batch to the host and wait for it.
    """
    checked_device_batch = []

    def check(x: Any) -> None:
        if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
            if checked_device_batch:
                return
            checked_device_batch.append(True)
        _check_concrete_inside(x, bounds)

    if has_state:

        def step_with_state(params, state, opt_state, x, y, key):
            check(x)
            return jitted(params, state, opt_state, x, y, key)

        return step_with_state

    def step(params, opt_state, x, y, key):
        check(x)
        params, _, opt_state, metrics = jitted(params, None, opt_state, x, y, key)
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
    penalty_weight: float | None = None,
    bounds: tuple[float, float] = (0.0, 1.0),
    attack_gates: str = "sampled",
    has_state: bool = False,
) -> Callable:
    """Returns an adversarial-training step ``(params, opt_state, x, y, key) -> ...``.

    Loss ``(1 - clean_weight) CE(x_adv) + clean_weight CE(x) + penalty_weight *
    penalty_fn(params)``, ``x_adv`` a PGD example (random start) against the
    network with the step's gate sample (``attack_gates="sampled"``) or the
    test-time network (``"test"``; the same for an ungated model).
    ``clean_weight=0`` is Madry et al.'s adversarial training;
    ``clean_weight=1/3`` is the ``(CE(x) + 2 CE(x_adv)) / 3`` mix that the
    ANP-VS reference code trains its adversarial baseline with. ``steps`` can
    be tiny for cheap variants. ``penalty_fn`` needs a ``penalty_weight``,
    and a ``penalty_weight > 0`` needs a ``penalty_fn``: either alone is
    refused rather than ignored (``penalty_weight=0.0`` turns the penalty
    off explicitly).

    The step returns ``(params, opt_state, {"loss", "acc_adv"})`` and is
    jitted; each call first checks a concrete NumPy ``x`` against ``bounds``
    on the host (one min and max; a ``jax.Array`` batch on the first call
    only, since each check would copy it to the host; skipped when the step is
    called inside a caller's own ``jax.jit``), and the first call of each
    params structure checks that every params leaf is floating point.

    Model state (BatchNorm): with the default ``has_state=False`` nothing but
    ``params`` is updated, so BatchNorm running statistics closed over by
    ``apply_fn`` stay at their initial values and the test-time network
    (``key=None``, what :func:`robustness` evaluates) is near chance. Pass
    ``has_state=True`` for such models: ``apply_fn(params, state, x, key) ->
    (logits, features, new_state)`` and the step becomes ``(params, state,
    opt_state, x, y, key) -> (params, state, opt_state, metrics)``, keeping
    the state of the clean training pass (the adversarial pass's when
    ``clean_weight=0``; the attack's passes never update it). For flax nnx::

      graphdef, params, state = nnx.split(model, nnx.Param, ...)

      def apply_fn(params, state, x, key):
          m = nnx.merge(graphdef, params, state, copy=True)
          if key is None:
              m.eval()  # running statistics, test-time gates
          else:
              jp.gates.reseed(m, key)  # a gated model's sample
          logits = m(x)
          return logits, [], nnx.state(m, nnx.Not(nnx.Param))

    and evaluate with ``robustness(lambda ps, x, k: apply_fn(*ps, x, k)[:2],
    (params, state), ...)``.

    Args:
      apply_fn: ``(params, x, key) -> (logits, latent features)``, or with
        ``has_state`` ``(params, state, x, key) -> (logits, features,
        new_state)``; ``key=None`` asks for the test-time network.
      tx: optax transform over the whole params tree.
      eps, step_size, steps: the training PGD attack (L-inf radius >= 0, step
        > 0, steps >= 1).
      clean_weight: the clean cross-entropy's share of the loss, in ``[0, 1]``
        (default 0, Madry's AT).
      penalty_fn: ``params -> scalar`` added to the loss (e.g.
        ``jp.gates.penalty``); needs ``penalty_weight``.
      penalty_weight: its weight, >= 0.
      bounds: the data range ``(low, high)``.
      attack_gates: ``"sampled"`` attacks the network with the step's gate
        sample; ``"test"`` the deterministic test-time network.
      has_state: thread a model state (e.g. BatchNorm statistics), see above.

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

      With a state: here a running mean of the inputs, updated from the
      training pass (the adversarial one, as ``clean_weight=0``):

      >>> def apply_fn(w, mean, x, key):
      ...     return x @ w, [], 0.5 * mean + 0.5 * jnp.mean(x, 0)
      >>> step = adversarial_step(apply_fn, tx, eps=0.0, step_size=0.0, steps=1, has_state=True)
      >>> w, mean, opt_state, m = step(w, jnp.zeros(2), tx.init(w), x, y, jax.random.key(0))
      >>> [round(v, 3) for v in mean.tolist()]  # eps=0: x_adv is x
      [0.275, 0.225]

    References:
      Madry et al., ICLR 2018. https://arxiv.org/abs/1706.06083;
      Madaan, Shin & Hwang, ICML 2020, https://arxiv.org/abs/1908.04355
      (reference code https://github.com/divyam3897/ANP_VS, ``base`` mode).
    """
    _check_attack(eps, step_size, steps, bounds)
    if isinstance(clean_weight, (bool, str)) or not 0.0 <= as_float(clean_weight) <= 1.0:
        raise ValueError(
            f"clean_weight must be in [0, 1], got {clean_weight!r}. Fix: 0.0 for Madry's "
            "adversarial loss, 1/3 for the ANP-VS code's (clean + 2 adv) / 3."
        )
    if penalty_weight is not None:
        _check_nonneg("penalty_weight", penalty_weight, "e.g. beta / num_train for a KL.")
    if penalty_fn is not None and penalty_weight is None:
        raise ValueError(
            "penalty_fn is given but penalty_weight is not: the penalty would be ignored. "
            "Fix: pass both, e.g. penalty_fn=kl, penalty_weight=beta / num_train for a KL "
            "(penalty_weight=0.0 turns the penalty off explicitly)."
        )
    if penalty_fn is None and penalty_weight is not None and float(penalty_weight) > 0:
        raise ValueError(
            f"penalty_weight={penalty_weight!r} is given but penalty_fn is not: there is no "
            "penalty to weight. Fix: pass both, e.g. penalty_fn=lambda p: "
            "jp.gates.penalty(gate, p['gates']), penalty_weight=beta / num_train, or drop "
            "penalty_weight."
        )
    _check_attack_gates(attack_gates)
    fwd = _forward(apply_fn, has_state)
    weight = 0.0 if penalty_weight is None else float(penalty_weight)

    @jax.jit
    def jitted(params, state, opt_state, x, y, key):
        _check_params(params, "adversarial_step")
        k_gate, x_adv = _attack_batch(
            fwd,
            params,
            state,
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
            logits_adv, _, new_state = fwd(p, state, x_adv, k_gate)
            total = (1 - clean_weight) * jnp.mean(cross_entropy(logits_adv, y))
            if clean_weight > 0:
                logits, _, new_state = fwd(p, state, x, k_gate)
                total = total + clean_weight * jnp.mean(cross_entropy(logits, y))
            if penalty_fn is not None and weight > 0:
                total = total + weight * penalty_fn(p)
            return total, (logits_adv, new_state)

        (value, (logits_adv, new_state)), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        acc_adv = jnp.mean(jnp.argmax(logits_adv, -1) == y)
        metrics = {"loss": value, "acc_adv": acc_adv}
        return params, new_state, opt_state, metrics

    return _wrap_step(jitted, bounds, has_state)
