"""Gate kinds: the per-layer formulas of learned gates (sample, test gate, penalty, keep).

A gate kind is a frozen (hashable) dataclass holding only static
hyperparameters; its methods are pure functions of one layer's gate
parameters (a dict of arrays whose names start with ``gate_``) and, where the
formula needs it, the layer's kernel:

* ``init(kernel, key) -> dict`` — the gate parameters of one layer;
* ``apply(gp, kernel, key) -> (kernel, unit_scale)`` — the gated kernel and the
  per-output-unit factor to apply to the bias (``None`` when the bias is not
  gated); a sample when ``key`` is given, the deterministic test-time gate when
  ``key`` is ``None``;
* ``unit_gate(gp, key, batch=None)`` (per-unit kinds) — the ``[units]`` gate
  itself, or with ``batch`` one ``[batch, units]`` sample per example (kinds
  with ``per_example=True``; see :func:`jaxprune.gates.sample_unit_gate`);
* ``penalty(gps, kernels) -> scalar`` — the regularizer over all gated layers;
* ``keep(gp, kernel) -> bool`` and ``score(gp, kernel)`` — the hard mask and the
  score a global selection ranks.

Per-unit kinds gate the last axis of a kernel (output features of a flax Dense,
output channels of a flax Conv): multiplying output column ``j`` and bias ``j``
by ``z_j`` is the same as multiplying unit ``j``'s output by ``z_j``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import betaln, digamma

__all__ = [
    "BetaBernoulli",
    "HardConcrete",
    "ScalarGate",
    "VariationalDropout",
    "beta_bernoulli_kl",
    "expected_keep_probability",
    "sparse_vd_neg_kl",
]

_EULER = 0.5772156649015329
_TINY = 1e-6


def _check(name: str, value: float, ok: bool, valid: str, fix: str) -> None:
    if not ok or (isinstance(value, float) and math.isnan(value)):
        raise ValueError(f"{name} must be {valid}, got {value!r}. Fix: {fix}")


def _uniform(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jax.random.uniform(key, shape, jnp.float32, _TINY, 1.0 - _TINY)


def _check_folded(gate, key) -> None:
    """Raises if a per-example gate is asked for a sample folded into a kernel."""
    if key is not None and getattr(gate, "per_example", False):
        raise ValueError(
            f"{type(gate).__name__}(per_example=True) draws one gate per example, which a "
            "gate folded into the kernel (jp.gates.apply_gates, gate.apply) cannot hold: "
            "every example would share one sample. Fix: apply the gates to layer outputs "
            "(jp.gates.attach for nnx, jp.gates.linen_apply for linen), or per_example=False."
        )


def _as_number(v: object) -> object:
    """Returns a concrete 0-d JAX or NumPy array of a real dtype as a Python float, else ``v``.

    The gate kinds are hashable static configuration (jit's static arguments,
    dict keys), which an array is not.
    """
    if isinstance(v, (jax.Array, np.ndarray)) and not isinstance(v, jax.core.Tracer):
        if v.ndim == 0 and (
            jnp.issubdtype(v.dtype, jnp.floating) or jnp.issubdtype(v.dtype, jnp.integer)
        ):
            return float(v)
    return v


def _check_numbers(gate) -> None:
    """Raises unless every float field of ``gate`` holds a finite real number.

    A concrete 0-d JAX or NumPy array (``jnp.float32(0.5)``) is stored as the
    Python float it holds.
    """
    for f in dataclasses.fields(gate):
        if f.type not in ("float", float):
            continue
        v = _as_number(getattr(gate, f.name))
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError(
                f"{f.name} must be a finite real number, got {v!r} (a Python or NumPy number, "
                f"or a concrete 0-d JAX array). Fix: e.g. the default, {f.name}={f.default!r}."
            )
        object.__setattr__(gate, f.name, v)


def _check_flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}. Fix: {name}=True.")


def _sample_shape(batch: int | None, units: tuple[int, ...]) -> tuple[int, ...]:
    return units if batch is None else (batch, *units)


def _logit(p: jax.Array) -> jax.Array:
    return jnp.log(p) - jnp.log1p(-p)


def _softplus_inv(y: float) -> float:
    return y + math.log(-math.expm1(-y))


@dataclasses.dataclass(frozen=True)
class HardConcrete:
    """The hard-concrete L0 gate (one ``log_alpha`` per output unit).

    Sample ``u ~ U(0, 1)``, ``s = sigmoid((log u - log(1 - u) + log_alpha) / beta)``,
    ``z = clip(s * (zeta - gamma) + gamma, 0, 1)``; test gate
    ``clip(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1)``; penalty the
    expected number of open gates ``sum sigmoid(log_alpha - beta * log(-gamma / zeta))``.
    A unit is pruned when its test gate is exactly 0.

    Args:
      beta: temperature, > 0 (2/3 in the paper).
      gamma: stretch lower bound, < 0.
      zeta: stretch upper bound, > 1.
      init_log_alpha: initial ``log_alpha`` (3.0 opens every test gate fully).
      per_example: draw one gate sample per example of the batch (the
        reference implementation's ``sample_z(batch_size)``) instead of one
        per step shared by the batch. It needs the gates applied to layer
        outputs or inputs (``jp.gates.attach``, ``jp.gates.linen_apply``), not
        folded into the kernel; the test gate is the same either way.

    Examples:
      >>> import jax.numpy as jnp
      >>> g = HardConcrete()
      >>> gp = {"gate_log_alpha": jnp.array([-10.0, 0.0, 10.0])}
      >>> [round(v, 3) for v in g.unit_gate(gp, None).tolist()]
      [0.0, 0.5, 1.0]

    References:
      Louizos, Welling & Kingma, "Learning Sparse Neural Networks through L0
      Regularization", ICLR 2018. https://arxiv.org/abs/1712.01312
    """

    beta: float = 2.0 / 3.0
    gamma: float = -0.1
    zeta: float = 1.1
    init_log_alpha: float = 3.0
    per_example: bool = False

    per_unit = True

    def __post_init__(self):
        _check_numbers(self)
        _check_flag("per_example", self.per_example)
        _check(
            "beta",
            self.beta,
            self.beta > 0,
            "> 0 (the concrete temperature)",
            "use the paper's 2/3.",
        )
        _check(
            "gamma",
            self.gamma,
            self.gamma < 0,
            "< 0 (the stretch must pass below 0)",
            "use the paper's -0.1.",
        )
        _check(
            "zeta",
            self.zeta,
            self.zeta > 1,
            "> 1 (the stretch must pass above 1)",
            "use the paper's 1.1.",
        )

    def init(self, kernel: jax.Array, key: jax.Array | None = None) -> dict[str, jax.Array]:
        del key
        return {"gate_log_alpha": jnp.full((kernel.shape[-1],), self.init_log_alpha, jnp.float32)}

    def unit_gate(
        self, gp: dict[str, jax.Array], key: jax.Array | None, batch: int | None = None
    ) -> jax.Array:
        la = gp["gate_log_alpha"]
        if key is None:
            s = jax.nn.sigmoid(la)
        else:
            u = _uniform(key, _sample_shape(batch, la.shape))
            s = jax.nn.sigmoid((jnp.log(u) - jnp.log1p(-u) + la) / self.beta)
        return jnp.clip(s * (self.zeta - self.gamma) + self.gamma, 0.0, 1.0)

    def apply(self, gp, kernel, key):
        _check_folded(self, key)
        z = self.unit_gate(gp, key)
        return kernel * z.astype(kernel.dtype), z

    def penalty(self, gps: Sequence[dict], kernels: Sequence[jax.Array] = ()) -> jax.Array:
        del kernels
        shift = self.beta * math.log(-self.gamma / self.zeta)
        return sum(
            (jnp.sum(jax.nn.sigmoid(gp["gate_log_alpha"] - shift)) for gp in gps), jnp.float32(0)
        )

    def score(self, gp, kernel=None):
        """Returns ``log_alpha``: the global-selection score of each unit (higher keeps).

        The clipped test gate saturates at exactly 1 once ``log_alpha`` exceeds
        ``logit((1 - gamma) / (zeta - gamma))`` (about 2.4), so ranking by it
        would break ties among confidently open units by flatten order;
        ``log_alpha`` is monotone in the unclipped keep probability
        ``sigmoid(log_alpha)`` and never saturates.
        """
        del kernel
        return gp["gate_log_alpha"].astype(jnp.float32)

    def keep(self, gp, kernel=None):
        del kernel
        return self.unit_gate(gp, None) > 0


def _log_expected_keep_probability(a: jax.Array, b: jax.Array) -> jax.Array:
    """Returns ``log E[pi] = log b + log Beta(1 + 1/a, b)`` for ``pi ~ Kumaraswamy(a, b)``.

    Computed in log space so that it neither underflows for tiny ``E[pi]`` nor
    depends on the test gate's threshold: the ranking score of
    :class:`BetaBernoulli`. ``betaln`` keeps it accurate, and monotone in
    ``a``, in float32 when ``1/a`` is large (``a`` below about ``1e-3``, the
    units under the default threshold), where ``gammaln(1 + 1/a) -
    gammaln(1 + 1/a + b)`` cancels catastrophically.

    Examples:
      >>> round(float(_log_expected_keep_probability(1.0, 1.0)), 4)  # log(1/2)
      -0.6931
      >>> round(float(_log_expected_keep_probability(1e-6, 1.0)), 4)  # log(a / (a + 1))
      -13.8155
    """
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return jnp.log(b) + betaln(1 + 1 / a, b)


def expected_keep_probability(a: jax.Array, b: jax.Array) -> jax.Array:
    """Returns ``E[pi] = b * Beta(1 + 1/a, b)`` for ``pi ~ Kumaraswamy(a, b)``.

    Args:
      a, b: the Kumaraswamy parameters, arrays (or numbers) that broadcast
        together, computed in float32; both must be > 0, which is not
        checked (:meth:`BetaBernoulli.ab` keeps them above 0).

    Examples:
      >>> round(float(expected_keep_probability(2.0, 1.0)), 4)  # a / (a + 1) when b = 1
      0.6667

    References:
      Lee et al., "Adaptive Network Sparsification with Dependent Variational
      Beta-Bernoulli Dropout", 2018. https://arxiv.org/abs/1805.10896
    """
    return jnp.exp(_log_expected_keep_probability(a, b))


def beta_bernoulli_kl(a: jax.Array, b: jax.Array, alpha: float) -> jax.Array:
    """Returns ``KL(Kumaraswamy(a, b) || Beta(alpha, 1))`` elementwise (exact for prior beta 1).

    ``(1 - alpha/a)(-euler_gamma - digamma(b) - 1/b) + log(a b / alpha) - (b - 1)/b``.

    Args:
      a, b: the Kumaraswamy posterior's parameters, arrays (or numbers) that
        broadcast together, computed in float32; both must be > 0, which is
        not checked.
      alpha: the concentration of the ``Beta(alpha, 1)`` prior, > 0 (not
        checked here; :class:`BetaBernoulli` checks its ``alpha``, default
        1e-4).

    Examples:
      >>> round(float(beta_bernoulli_kl(1.0, 1.0, 1.0)), 6)  # both are U(0, 1)
      0.0

    References:
      Lee et al., "Adaptive Network Sparsification with Dependent Variational
      Beta-Bernoulli Dropout", 2018. https://arxiv.org/abs/1805.10896
    """
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return (1 - alpha / a) * (-_EULER - digamma(b) - 1 / b) + jnp.log(a * b / alpha) - (b - 1) / b


@dataclasses.dataclass(frozen=True)
class BetaBernoulli:
    """Beta-Bernoulli dropout (one Kumaraswamy posterior per output unit).

    Prior ``pi_k ~ Beta(alpha, 1)``, ``z_k ~ Bernoulli(pi_k)``; the posterior of
    ``pi_k`` is ``Kumaraswamy(a_k, b_k)`` (``a, b = softplus`` of the gate
    parameters), sampled as ``(1 - u**(1/b))**(1/a)``, and ``z`` is a relaxed
    Bernoulli sample at ``temperature``. The test gate is ``E[pi]``, set to 0
    below ``threshold``; a unit is pruned when its test gate is 0.

    Args:
      alpha: prior concentration, > 0 (small values favour sparsity).
      temperature: relaxed-Bernoulli temperature, > 0 (about 0.1).
      threshold: test gates below this are zero, in ``[0, 1)``.
      init_a: initial ``a`` (> 0); with ``init_b = 1``, ``E[pi] = a / (a + 1)``.
      init_b: initial ``b`` (> 0).
      per_example: draw one relaxed Bernoulli ``z`` per example of the batch
        from the step's one ``pi`` sample, as the reference code does
        (``n_samples`` = the batch size), instead of one ``z`` per step shared
        by the batch. It needs the gates applied to layer outputs or inputs
        (``jp.gates.attach``, ``jp.gates.linen_apply``), not folded into the
        kernel; the test gate is the same either way.

    Examples:
      >>> import jax.numpy as jnp
      >>> g = BetaBernoulli()
      >>> gp = g.init(jnp.zeros((3, 4)))
      >>> [round(v, 4) for v in g.unit_gate(gp, None).tolist()]  # E[pi] = 10 / 11
      [0.9091, 0.9091, 0.9091, 0.9091]

    References:
      Lee et al., "Adaptive Network Sparsification with Dependent Variational
      Beta-Bernoulli Dropout", 2018. https://arxiv.org/abs/1805.10896
    """

    alpha: float = 1e-4
    temperature: float = 0.1
    threshold: float = 1e-3
    init_a: float = 10.0
    init_b: float = 1.0
    per_example: bool = False

    per_unit = True

    def __post_init__(self):
        _check_numbers(self)
        _check_flag("per_example", self.per_example)
        _check(
            "alpha",
            self.alpha,
            self.alpha > 0,
            "> 0 (the Beta prior's concentration)",
            "use e.g. 1e-4.",
        )
        _check(
            "temperature",
            self.temperature,
            self.temperature > 0,
            "> 0 (the relaxed-Bernoulli temperature)",
            "use e.g. 0.1.",
        )
        _check(
            "threshold",
            self.threshold,
            0 <= self.threshold < 1,
            "in [0, 1)",
            "use the paper's 1e-3.",
        )
        for name in ("init_a", "init_b"):
            v = getattr(self, name)
            _check(name, v, v > 0, "> 0 (a Kumaraswamy parameter)", "use e.g. 10.0 and 1.0.")

    def init(self, kernel: jax.Array, key: jax.Array | None = None) -> dict[str, jax.Array]:
        del key
        n = (kernel.shape[-1],)
        return {
            "gate_a": jnp.full(n, _softplus_inv(self.init_a), jnp.float32),
            "gate_b": jnp.full(n, _softplus_inv(self.init_b), jnp.float32),
        }

    def ab(self, gp: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """Returns the Kumaraswamy parameters ``(a, b)`` (softplus of the gate parameters)."""
        return jax.nn.softplus(gp["gate_a"]) + _TINY, jax.nn.softplus(gp["gate_b"]) + _TINY

    def unit_gate(
        self, gp: dict[str, jax.Array], key: jax.Array | None, batch: int | None = None
    ) -> jax.Array:
        a, b = self.ab(gp)
        if key is None:
            pi = expected_keep_probability(a, b)
            return jnp.where(pi < self.threshold, 0.0, pi)
        k_pi, k_z = jax.random.split(key)
        u = _uniform(k_pi, a.shape)
        # (1 - u**(1/b))**(1/a) computed in log space for stability.
        pi = jnp.exp(jnp.log(-jnp.expm1(jnp.log(u) / b)) / a)
        pi = jnp.clip(pi, _TINY, 1 - _TINY)
        # One pi per unit and step; z per unit, or per example and unit.
        v = _uniform(k_z, _sample_shape(batch, a.shape))
        return jax.nn.sigmoid((_logit(pi) + _logit(v)) / self.temperature)

    def apply(self, gp, kernel, key):
        _check_folded(self, key)
        z = self.unit_gate(gp, key)
        return kernel * z.astype(kernel.dtype), z

    def penalty(self, gps: Sequence[dict], kernels: Sequence[jax.Array] = ()) -> jax.Array:
        del kernels
        total = jnp.float32(0)
        for gp in gps:
            a, b = self.ab(gp)
            total = total + jnp.sum(beta_bernoulli_kl(a, b, self.alpha))
        return total

    def score(self, gp, kernel=None):
        """Returns ``log E[pi]`` without the threshold: the global-selection score (higher keeps).

        The test gate is 0 for every unit below ``threshold``, so ranking by it
        would break ties among those units by flatten order; the log of the
        unthresholded ``E[pi]`` is monotone in it and does not underflow.
        """
        del kernel
        return _log_expected_keep_probability(*self.ab(gp))

    def keep(self, gp, kernel=None):
        del kernel
        return self.unit_gate(gp, None) > 0


_K1, _K2, _K3 = 0.63576, 1.87320, 1.48695


def sparse_vd_neg_kl(log_alpha: jax.Array) -> jax.Array:
    """Returns Molchanov's approximation of ``-KL(q(w) || log-uniform)`` per weight.

    ``k1 * sigmoid(k2 + k3 * log_alpha) - 0.5 * log1p(exp(-log_alpha)) - k1``.

    Args:
      log_alpha: ``log sigma^2 - log w^2`` per weight, any shape (or a
        number), computed in float32; :class:`VariationalDropout` clips it to
        ``[-8, 8]`` before calling this.

    Examples:
      >>> abs(float(sparse_vd_neg_kl(20.0))) < 1e-3  # -> 0 as alpha -> infinity
      True

    References:
      Molchanov, Ashukha & Vetrov, "Variational Dropout Sparsifies Deep Neural
      Networks", ICML 2017. https://arxiv.org/abs/1701.05369
    """
    la = jnp.asarray(log_alpha, jnp.float32)
    return _K1 * jax.nn.sigmoid(_K2 + _K3 * la) - 0.5 * jax.nn.softplus(-la) - _K1


@dataclasses.dataclass(frozen=True)
class VariationalDropout:
    """Sparse variational dropout (one ``log sigma^2`` per weight).

    ``log_alpha = clip(log sigma^2 - log w^2, -8, 8)``; the penalty is the KL
    approximation summed over weights; a weight is pruned where
    ``log_alpha > threshold``. The functional form samples the weights
    themselves, ``w + sigma * eps`` (one sample per step, shared by the batch);
    the nnx wrapper (:func:`jaxprune.gates.attach`) uses the local
    reparameterization trick on the layer's outputs instead (per example).

    Args:
      threshold: prune where ``log_alpha`` exceeds it (3.0 in the paper).
      init_log_sigma2: initial ``log sigma^2`` (-10: almost no noise).

    Examples:
      >>> import jax.numpy as jnp
      >>> g = VariationalDropout()
      >>> gp = {"gate_log_sigma2": jnp.array([-10.0, 0.0])}
      >>> g.keep(gp, jnp.array([1.0, 0.01])).tolist()
      [True, False]

    References:
      Molchanov, Ashukha & Vetrov, "Variational Dropout Sparsifies Deep Neural
      Networks", ICML 2017. https://arxiv.org/abs/1701.05369
    """

    threshold: float = 3.0
    init_log_sigma2: float = -10.0

    per_unit = False

    def __post_init__(self):
        _check_numbers(self)
        _check(
            "threshold",
            self.threshold,
            -8 < self.threshold < 8,
            "in (-8, 8) (log_alpha is clipped to [-8, 8])",
            "use the paper's 3.0.",
        )

    def init(self, kernel: jax.Array, key: jax.Array | None = None) -> dict[str, jax.Array]:
        del key
        return {"gate_log_sigma2": jnp.full(kernel.shape, self.init_log_sigma2, jnp.float32)}

    def log_alpha(
        self, gp: dict[str, jax.Array], kernel: jax.Array, *, clip: bool = True
    ) -> jax.Array:
        """Returns ``clip(log sigma^2 - log w^2, -8, 8)`` (unclipped with ``clip=False``).

        The clip keeps the KL approximation in its fitted range (Molchanov et
        al. 2017); the ranking score needs the unclipped value, whose order the
        clip would flatten into ties.
        """
        if kernel is None:
            raise ValueError(
                "VariationalDropout reads each gated layer's kernel, but kernel is None. Fix: pass "
                "the params that gate_params was built from (jp.gates.init_gates(gate, params))."
            )
        w2 = jnp.square(kernel.astype(jnp.float32))
        la = gp["gate_log_sigma2"] - jnp.log(w2 + 1e-8)
        return jnp.clip(la, -8.0, 8.0) if clip else la

    def apply(self, gp, kernel, key):
        if key is None:
            return jnp.where(self.keep(gp, kernel), kernel, jnp.zeros((), kernel.dtype)), None
        eps = jax.random.normal(key, kernel.shape, jnp.float32)
        noisy = kernel.astype(jnp.float32) + jnp.exp(0.5 * gp["gate_log_sigma2"]) * eps
        return noisy.astype(kernel.dtype), None

    def penalty(self, gps: Sequence[dict], kernels: Sequence[jax.Array]) -> jax.Array:
        pairs = zip(gps, kernels, strict=True)
        kls = (-jnp.sum(sparse_vd_neg_kl(self.log_alpha(g, k))) for g, k in pairs)
        return sum(kls, jnp.float32(0))

    def score(self, gp, kernel):
        """Returns ``-log_alpha``, unclipped: the global-selection score (higher keeps).

        ``keep`` thresholds the clipped ``log_alpha`` at a value inside
        ``(-8, 8)``, which equals thresholding the unclipped one; ranking by the
        clipped value would tie every weight beyond ``+-8`` and break the ties by
        flatten order.
        """
        return -self.log_alpha(gp, kernel, clip=False)

    def keep(self, gp, kernel):
        return self.log_alpha(gp, kernel) <= self.threshold


@dataclasses.dataclass(frozen=True)
class ScalarGate:
    """Deterministic scalar channel gates, "pruning from scratch".

    One real gate ``g`` per output unit (init ``init_value``), trained with the
    weights frozen at their random initialization; penalty
    ``weight * (mean |g| - target)**2`` over all gates; a unit is pruned when
    ``|g| <= threshold`` (or, with ``to_masks(..., sparsity=s)``, by a global
    ranking of ``|g|``). No noise is drawn: with a ``key`` (training) the gate
    is ``g`` itself; without one (the test-time model) a pruned unit's gate
    is 0, so the folded, detached and shrunk models agree. Train with a key
    (any key) so that a gate under the threshold still gets gradients.

    Args:
      target: the mean ``|g|`` the penalty pulls toward, in ``(0, 1]`` (0.2).
      weight: the penalty's coefficient, >= 0 (0.5).
      init_value: initial gate value (1.0).
      threshold: prune where ``|g|`` is at most this, >= 0.

    Examples:
      >>> import jax.numpy as jnp
      >>> g = ScalarGate()
      >>> round(float(g.penalty([{"gate_scale": jnp.array([1.0, 0.0])}])), 6)  # 0.5 * 0.3**2
      0.045

    References:
      Wang et al., "Pruning from Scratch", AAAI 2020. https://arxiv.org/abs/1909.12579
    """

    target: float = 0.2
    weight: float = 0.5
    init_value: float = 1.0
    threshold: float = 1e-2

    per_unit = True

    def __post_init__(self):
        _check_numbers(self)
        _check(
            "target",
            self.target,
            0 < self.target <= 1,
            "in (0, 1]",
            "use the paper's 0.2 (the kept fraction of gate mass).",
        )
        _check("weight", self.weight, self.weight >= 0, ">= 0", "use the paper's 0.5.")
        _check("threshold", self.threshold, self.threshold >= 0, ">= 0", "use e.g. 1e-2.")

    def init(self, kernel: jax.Array, key: jax.Array | None = None) -> dict[str, jax.Array]:
        del key
        return {"gate_scale": jnp.full((kernel.shape[-1],), self.init_value, jnp.float32)}

    def unit_gate(self, gp, key):
        g = gp["gate_scale"]
        if key is not None:
            return g
        # Pruned units (|g| <= threshold) are exactly 0 in the test-time model
        # too, so folding, detaching and shrinking agree.
        return jnp.where(jnp.abs(g) <= self.threshold, jnp.zeros((), g.dtype), g)

    def apply(self, gp, kernel, key):
        z = self.unit_gate(gp, key)
        return kernel * z.astype(kernel.dtype), z

    def penalty(self, gps: Sequence[dict], kernels: Sequence[jax.Array] = ()) -> jax.Array:
        del kernels
        if not gps:
            return jnp.float32(0)
        g = jnp.concatenate([jnp.abs(gp["gate_scale"]) for gp in gps])
        return self.weight * jnp.square(jnp.mean(g) - self.target)

    def score(self, gp, kernel=None):
        del kernel
        return jnp.abs(gp["gate_scale"])

    def keep(self, gp, kernel=None):
        return self.score(gp) > self.threshold
