"""The :class:`Gated` wrapper: one nnx layer and its gates, and their variable types.

:func:`jaxprune.gates.attach` wraps each selected layer in a :class:`Gated`,
which holds the gate parameters (:class:`GateParam`, named ``gate_*``, and
``gate_in_*`` for input gates) and the sample key (:class:`GateKey`) next to
the layer, and multiplies the layer's output units (and input features) by
their gates in its ``__call__``. :mod:`jaxprune.gates_nnx` re-exports the
three classes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxprune._tree import key_parts
from jaxprune.gates_checks import _require_per_unit
from jaxprune.gates_tree import Gate, _gate_features, sample_unit_gate


class GateParam(nnx.Param):
    """A trainable gate parameter (select with ``nnx.All(GateParam)`` or ``jp.gates.is_gate``).

    Args:
      *args, **kwargs: those of ``nnx.Param``: the value, one gate array of a
        layer (float32, e.g. ``[units]`` for a per-unit kind), and optional
        variable metadata.
    """


class GateKey(nnx.Variable):
    """The PRNG key a :class:`Gated` layer draws its gate samples from.

    Args:
      *args, **kwargs: those of ``nnx.Variable``: the value, one PRNG key
        (:class:`Gated` stores ``fold_in(key, 1)`` of its ``key``;
        :func:`~jaxprune.gates.reseed` replaces it), and optional variable
        metadata.
    """


_INPUT_PREFIX = "gate_in_"


def _input_name(name: str) -> str:
    # gate_a -> gate_in_a: an input gate's parameter, next to the output gate's.
    return _INPUT_PREFIX + name.removeprefix("gate_")


def _check_grouped_inputs(module: nnx.Module, name: str) -> None:
    """Raises ``ValueError`` for input gates on a grouped or depthwise conv.

    Such a conv (``feature_group_count=groups``) stores ``in_features / groups``
    kernel rows (axis -2), each shared by ``groups`` input channels: gates
    built from the kernel would be too few for the input, and gates folded
    into its rows (:func:`detach`, :func:`hard_masks`) would tie unrelated
    channels together.
    """
    groups = getattr(module, "feature_group_count", 1)
    if isinstance(module, nnx.Conv) and groups != 1:
        raise ValueError(
            f"cannot gate the inputs of {name}, an nnx.Conv with feature_group_count={groups} "
            f"(a grouped or depthwise conv): its kernel {tuple(module.kernel.shape)} holds "
            f"in_features / groups = {module.kernel.shape[-2]} rows on axis -2, each shared by "
            f"{groups} input channels, so input gates on it are not supported. Fix: gate its "
            "outputs instead "
            "(leave it out of inputs=, or Gated(..., inputs=False)), or gate the inputs of an "
            "ungrouped layer."
        )


class Gated(nnx.Module):
    """Wraps a linear layer (``kernel`` with outputs on the last axis) and gates its units.

    Training mode (``deterministic=False``) draws the gate sample of the
    layer's :class:`GateKey` (set it per step with :func:`reseed`); eval mode
    uses the deterministic test-time gate. Per-unit gates multiply the
    output's last axis; variational dropout uses the local reparameterization
    trick (output mean ``f(x; w)``, variance ``f(x^2; sigma^2)``).

    With ``inputs=True`` a per-unit gate also multiplies each input feature
    (the input's last axis: a dense layer's input features, a conv's input
    channels), as beta-Bernoulli dropout gates the 800 flattened features
    that enter LeNet-5-Caffe's first dense layer (Lee et al. 2018; the ANP-VS
    reference code). Its parameters are named ``gate_in_*``; with
    ``outputs=False`` the layer has input gates only.

    Args:
      *args, **kwargs: the constructor's ``(module, gate, *, key,
        outputs=True, inputs=False)`` (nnx's module metaclass hides them
        from ``inspect.signature``), described below.
      module: the layer to wrap, with a ``kernel`` whose last axis holds the
        output units (``nnx.Linear``, ``nnx.Conv``); not a stack of layers (a
        kernel with a leading layer axis, from ``nnx.vmap``).
      gate: a gate kind, e.g. ``jp.gates.HardConcrete()``.
      key: PRNG key of the gates' initialization and, through
        ``fold_in(key, 1)``, of the layer's :class:`GateKey`.
      outputs: gate the output units (default ``True``).
      inputs: gate the input features too (default ``False``). Needs a
        per-unit kind, and is refused on a grouped or depthwise ``nnx.Conv``.
        ``outputs`` and ``inputs`` must not both be ``False``.
    """

    def __init__(
        self,
        module: nnx.Module,
        gate: Gate,
        *,
        key: jax.Array,
        outputs: bool = True,
        inputs: bool = False,
    ):
        if not hasattr(module, "kernel"):
            raise ValueError(
                f"can only gate layers with a `kernel` (nnx.Linear, nnx.Conv), got "
                f"{type(module).__name__}. Fix: narrow `where` to linear and conv layers."
            )
        expected = len(getattr(module, "kernel_size", ())) + 2
        if isinstance(module, nnx.Linear | nnx.Conv) and module.kernel.ndim > expected:
            raise ValueError(
                f"cannot gate a stack of layers: this {type(module).__name__}'s kernel has shape "
                f"{tuple(module.kernel.shape)}, with {module.kernel.ndim - expected} leading "
                "layer axis (built with nnx.vmap, applied with nnx.scan), and its gates would "
                "have no layer axis to scan over. Fix: leave it out (skip=(name,) or where=) "
                "and prune the stack with jp.masks.per_layer."
            )
        if not (outputs or inputs):
            raise ValueError(
                "Gated needs outputs=True or inputs=True, got both False. Fix: leave the "
                "layer unwrapped instead."
            )
        key_parts(key, "key")  # an int seed is named, not failed on inside fold_in
        if inputs:
            _require_per_unit(gate, "inputs=True")
            _check_grouped_inputs(module, "this layer")
        self.module = module
        self.gate = gate
        kernel = module.kernel.get_value()
        gp = gate.init(kernel, key) if outputs else {}
        self.gate_names = tuple(sorted(gp))
        for name, value in gp.items():
            setattr(self, name, GateParam(value))
        gpi = gate.init(jnp.swapaxes(kernel, -1, -2), jax.random.fold_in(key, 2)) if inputs else {}
        self.input_gate_names = tuple(sorted(gpi))
        for name, value in gpi.items():
            setattr(self, _input_name(name), GateParam(value))
        self.gate_key = GateKey(jax.random.fold_in(key, 1))
        self.deterministic = False

    def gate_params(self) -> dict[str, jax.Array]:
        """Returns this layer's output-gate parameters as a plain dict (empty without them)."""
        return {n: getattr(self, n).get_value() for n in self.gate_names}

    def input_gate_params(self) -> dict[str, jax.Array]:
        """Returns the input gates' parameters under the gate kind's names (empty without)."""
        return {n: getattr(self, _input_name(n)).get_value() for n in self.input_gate_names}

    def _sample_key(self) -> jax.Array | None:
        # The key is read, never advanced: a forward pass is a pure function of
        # the key that reseed() set, so attacks and losses can re-run it.
        return None if self.deterministic else self.gate_key.get_value()

    def _call_with(self, kernel: jax.Array, zero_bias: bool, x: jax.Array, *args, **kwargs):
        graphdef, state = nnx.split(self.module)
        copy = nnx.merge(graphdef, state, copy=True)
        copy.kernel.set_value(kernel)
        if zero_bias and getattr(copy, "bias", None) is not None:
            copy.bias.set_value(jnp.zeros_like(copy.bias.get_value()))
        return copy(x, *args, **kwargs)

    def __call__(self, x: jax.Array, *args, **kwargs) -> jax.Array:
        key = self._sample_key()
        if self.input_gate_names:
            g = sample_unit_gate(
                self.gate,
                self.input_gate_params(),
                None if key is None else jax.random.fold_in(key, 1),
                x,
            )
            x = _gate_features(
                x, g, type(self.module).__name__, "nnx.Linear, channels-last nnx.Conv"
            )
        if not self.gate_names:
            return self.module(x, *args, **kwargs)
        gp = self.gate_params()
        if self.gate.per_unit:
            y = self.module(x, *args, **kwargs)
            y = y * sample_unit_gate(self.gate, gp, key, y).astype(y.dtype)
        elif key is None:
            kernel, _ = self.gate.apply(gp, self.module.kernel.get_value(), None)
            y = self._call_with(kernel, False, x, *args, **kwargs)
        else:
            mean = self.module(x, *args, **kwargs)
            sigma2 = jnp.exp(gp["gate_log_sigma2"]).astype(mean.dtype)
            var = self._call_with(sigma2, True, x * x, *args, **kwargs)
            eps = jax.random.normal(key, mean.shape, mean.dtype)
            y = mean + jnp.sqrt(var + 1e-8) * eps
        return y
