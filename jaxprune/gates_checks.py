"""Checks shared by the gate functions: gate kinds, gate params against params, input gates.

Each raises ``ValueError`` naming the argument or layer, what it got and the
fix. :mod:`jaxprune.gates_tree` (the functional form),
:mod:`jaxprune.gates_masks` (hard masks) and :mod:`jaxprune.gates_nnx`
(attached gates) validate their arguments with them; nothing here is public.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from jaxprune._tree import Path, path_str

if TYPE_CHECKING:
    from jaxprune.gates_tree import Gate


def _bias_path(path: Path) -> Path:
    return tuple(path[:-1]) + ("bias",)


def _check_not_stacked(path: Path, x: Any, shapes: dict) -> None:
    """Refuses a bias, or a kernel whose bias shows a leading layer axis (``nn.scan``)."""
    shape = tuple(jnp.shape(x))
    bias = shapes.get(_bias_path(path))
    why = None
    if path and path[-1] == "bias":
        why = "it is a bias; a gated kernel's sibling bias is gated with it"
    elif bias is not None and len(bias) >= 2 and bias == shape[:-2] + shape[-1:]:
        why = (
            f"its bias has shape {bias}: {shape} holds {math.prod(shape[:-2])} stacked layers "
            "(nn.scan, nnx.vmap), and one gate per unit would be shared by all of them"
        )
    if why:
        raise ValueError(
            f"init_gates: where selected {path_str(path)!r} of shape {shape}, but {why}. Fix: "
            "select unstacked kernels only, e.g. where=lambda p, x: p[-1] == 'kernel' and "
            "p[0] != 'layers' (prune a stack with jp.masks.per_layer)."
        )


def _require_per_unit(gate: Gate, what: str) -> None:
    """Raises unless ``gate`` gates whole units, which gating input features needs."""
    if not gate.per_unit:
        raise ValueError(
            f"{what} needs a per-unit gate kind, got {type(gate).__name__}, which gates single "
            "weights. Fix: gate inputs with BetaBernoulli, HardConcrete or ScalarGate."
        )


def _input_rows(name: str, g: jax.Array, kernel_shape: tuple) -> jax.Array:
    """Returns the input gates ``g`` shaped to scale the rows (axis -2) of a kernel."""
    if len(kernel_shape) < 2 or kernel_shape[-2] != g.shape[0]:
        raise ValueError(
            f"input gates of {name!r} have {g.shape[0]} features, but its kernel has shape "
            f"{kernel_shape} (inputs on axis -2). Fix: build them with "
            "jp.gates.init_gates(gate, params, inputs=True)."
        )
    return g[:, None]


def _check_gate(gate: Any) -> None:
    """Raises ``ValueError`` for anything but a gate kind instance (the class itself included)."""
    if isinstance(gate, type) or not all(
        callable(getattr(gate, a, None)) for a in ("init", "penalty", "keep")
    ):
        what = f"the class {gate.__name__}" if isinstance(gate, type) else repr(gate)
        raise ValueError(
            f"gate must be a gate kind instance, got {what}. Fix: e.g. "
            "gate=jp.gates.HardConcrete() (called), jp.gates.BetaBernoulli(), "
            "jp.gates.VariationalDropout() or jp.gates.ScalarGate()."
        )


def _check_kind(gate: Gate, gps: Sequence[Any]) -> None:
    """Raises ``ValueError`` when gate params were made by another gate kind than ``gate``."""
    want = set(jax.eval_shape(lambda k: gate.init(k, None), jnp.zeros((2, 2), jnp.float32)))
    for gp in gps:
        got = set(gp) if isinstance(gp, dict) else None
        if got != want:
            raise ValueError(
                f"gate_params hold {sorted(got) if got is not None else gp!r}, but "
                f"{type(gate).__name__} has {sorted(want)}: they were made by another gate "
                "kind. Fix: pass the gate that init_gates built them with."
            )


def _check_gate_params(gate_params: dict, index: dict[str, int]) -> None:
    missing = sorted(set(gate_params) - set(index))
    if missing:
        raise ValueError(
            f"gate_params name layers that params does not have: {missing[:5]}; params has "
            f"{sorted(index)[:8]}. Fix: build gate_params with jp.gates.init_gates(gate, params)."
        )


def _check_gate_shapes(gate: Gate, gate_params: dict, kernels: dict) -> None:
    """Raises ``ValueError`` naming the layer when a layer's gate params do not fit ``gate``."""
    for name, gp in gate_params.items():
        want = jax.eval_shape(lambda k: gate.init(k, jax.random.key(0)), kernels[name])
        want = {k: tuple(v.shape) for k, v in want.items()}
        got = {k: tuple(jnp.shape(v)) for k, v in gp.items()} if isinstance(gp, dict) else gp
        if got != want:
            raise ValueError(
                f"gate_params[{name!r}] is {got}, but {type(gate).__name__} on that layer's kernel "
                f"{tuple(jnp.shape(kernels[name]))} has {want}. Fix: build them with "
                "jp.gates.init_gates(gate, params) with the same gate kind and params."
            )


def _check_inputs(gate: Gate, input_gate_params: dict | None) -> dict:
    inputs = dict(input_gate_params or {})
    if inputs:
        _require_per_unit(gate, "input_gate_params")
    return inputs
