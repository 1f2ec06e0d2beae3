"""Learned gates -> masks: hard-concrete L0, variational dropout, beta-Bernoulli, scalar gates.

Gates are parameters: they live next to the weights,
are sampled with an explicit key inside the jitted train step, have a
deterministic test-time value, carry a pure regularizer, and end as hard
masks that mirror the params tree, so they feed :func:`jaxprune.apply_masks`
and the structured shrink. Three layers of API:

* gate kinds (:class:`HardConcrete`, :class:`VariationalDropout`,
  :class:`BetaBernoulli`, :class:`ScalarGate`): static hyperparameters and the
  per-layer formulas (:mod:`jaxprune.gates_kinds`);
* the functional form for any pytree model (:func:`init_gates`,
  :func:`apply_gates`, :func:`penalty`) and :func:`multi_transform` for a
  separate gate optimizer (:mod:`jaxprune.gates_tree`);
* hard masks from trained gates (:func:`to_masks`) and network slimming on
  BatchNorm scales (:func:`slimming_penalty`, :func:`slimming_masks`)
  (:mod:`jaxprune.gates_masks`);
* flax nnx attachment (:func:`attach`, :func:`reseed`, :func:`detach`,
  :func:`hard_masks`, :func:`with_features`) that wraps layers in place
  (:mod:`jaxprune.gates_nnx`), gating their output units and, with
  ``attach(..., inputs=("fc1",))``, their input features too. Linen models
  keep their code too: either
  ``model.apply({"params": apply_gates(gate, params, gp, key=k)}, x)`` or
  :func:`linen_apply`, which intercepts the layers' outputs. Both take input
  gates too (``input_gate_params=init_gates(gate, params, where=..., inputs=True)``).

Two pitfalls of training with gates:

* **Reseed every step.** An nnx gated layer reads its sample key and never
  advances it; call ``gates.reseed(model, key)`` with a fresh key at the top of
  each train step (the functional form takes ``key=`` per call), or every step
  draws the same gate sample.
* **Gates before a BatchNorm.** A gate that is one value per unit for the
  whole batch (the default shared sample of :class:`HardConcrete` and
  :class:`BetaBernoulli`, and :class:`ScalarGate`) on a layer that feeds a
  BatchNorm is divided back out by the BatchNorm in train mode: it scales the
  channel, and the BatchNorm normalizes the channel by its batch statistics.
  The data loss then gives these gates almost no gradient (in a small conv-BN
  net, a thousandth of what the gates of the next layer, which feeds no
  BatchNorm, get), the penalty alone pushes them down, and
  which channels survive depends on BatchNorm's epsilon, not on what they are
  worth. Fix: ``per_example=True`` (one sample per example: the BatchNorm does
  not cancel it), or gate after the BatchNorm: ``skip`` the layer and gate the
  next layer's input features (``attach(..., inputs=("fc",))``, or
  ``init_gates(..., inputs=True)``). :func:`attach` warns
  (:class:`GateBeforeBatchNormWarning`) when the next layer after a gated one
  is an ``nnx.BatchNorm`` of the same width; the functional form cannot see
  the model's layout and does not.

Examples:
  >>> import jax, jax.numpy as jnp, jaxprune as jp
  >>> from jaxprune import gates
  >>> params = {"fc": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)}}
  >>> gate = gates.BetaBernoulli()
  >>> gp = gates.init_gates(gate, params)
  >>> sampled = gates.apply_gates(gate, params, gp, key=jax.random.key(0))
  >>> float(gates.penalty(gate, gp)) > 0
  True
  >>> gates.to_masks(gate, gp, params)["fc"]["kernel"].all().item()
  True

References:
  Louizos et al. 2018, https://arxiv.org/abs/1712.01312; Molchanov et al. 2017,
  https://arxiv.org/abs/1701.05369; Lee et al. 2018, https://arxiv.org/abs/1805.10896;
  Wang et al. 2020, https://arxiv.org/abs/1909.12579; Liu et al. 2017,
  https://arxiv.org/abs/1708.06519
"""

from jaxprune.gates_kinds import (
    BetaBernoulli,
    HardConcrete,
    ScalarGate,
    VariationalDropout,
    beta_bernoulli_kl,
    expected_keep_probability,
    sparse_vd_neg_kl,
)
from jaxprune.gates_nnx import (
    GateBeforeBatchNormWarning,
    Gated,
    GateKey,
    GateParam,
    attach,
    detach,
    gated_layers,
    hard_masks,
    model_penalty,
    reseed,
    with_features,
)
from jaxprune.gates_tree import (
    Gate,
    apply_gates,
    gate_keys,
    init_gates,
    input_gate_keys,
    is_gate,
    linen_apply,
    multi_transform,
    penalty,
    sample_unit_gate,
    slimming_masks,
    slimming_penalty,
    to_masks,
    unit_masks,
)

__all__ = [
    "BetaBernoulli",
    "Gate",
    "GateBeforeBatchNormWarning",
    "GateKey",
    "GateParam",
    "Gated",
    "HardConcrete",
    "ScalarGate",
    "VariationalDropout",
    "apply_gates",
    "attach",
    "beta_bernoulli_kl",
    "detach",
    "expected_keep_probability",
    "gate_keys",
    "gated_layers",
    "hard_masks",
    "init_gates",
    "input_gate_keys",
    "is_gate",
    "linen_apply",
    "model_penalty",
    "multi_transform",
    "penalty",
    "reseed",
    "sample_unit_gate",
    "slimming_masks",
    "slimming_penalty",
    "sparse_vd_neg_kl",
    "to_masks",
    "unit_masks",
    "with_features",
]
