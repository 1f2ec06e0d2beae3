"""Checks shared by the gate functions: gate kinds, gate params against params, input gates.

Each raises ``ValueError`` naming the argument or layer, what it got and the
fix. :mod:`jaxprune.gates_tree` (the functional form),
:mod:`jaxprune.gates_masks` (hard masks) and :mod:`jaxprune.gates_nnx`
(attached gates) validate their arguments with them; nothing here is public.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from jaxprune._tree import Path, path_str

if TYPE_CHECKING:
    from jaxprune.gates_tree import Gate


# The bias a kernel-like leaf pairs with, by the naming conventions in use: flax's
# kernel/bias, equinox's and PyTorch's weight/bias (any other name falls back to
# ``bias`` too) and haiku's w/b.
_BIAS_NAMES = {"w": "b"}


def _bias_path(path: Path) -> Path:
    """Returns the path of the bias beside the kernel at ``path`` (``w`` pairs with ``b``)."""
    return tuple(path[:-1]) + (_BIAS_NAMES.get(path[-1] if path else None, "bias"),)


def _is_unit_bias(kernel_shape: tuple, bias_shape: tuple) -> bool:
    """Returns whether a bias holds one entry per output unit of a kernel with units last.

    That is, whether it equals the kernel's trailing axes: ``[out]`` of
    ``[..., in, out]``, ``[heads, head_dim]`` of a DenseGeneral / attention
    projection's ``[in, heads, head_dim]``. A per-unit gate scales such a bias
    broadcast along its last axis, as it scales the layer's output.
    """
    n = len(bias_shape)
    return 1 <= n < len(kernel_shape) and tuple(kernel_shape[-n:]) == tuple(bias_shape)


def _is_out_first(kernel_shape: tuple, bias_shape: tuple) -> bool:
    """Returns whether a kernel's bias shows an ``[out, in, ...]`` layout (equinox, PyTorch).

    One bias entry per entry of axis 0 (``[out]``, or equinox conv's
    ``[out, 1, 1]``), and not the kernel's trailing axes.
    """
    return (
        len(kernel_shape) >= 2
        and len(bias_shape) >= 1
        and bias_shape[0] == kernel_shape[0]
        and math.prod(bias_shape[1:]) == 1
        and not _is_unit_bias(kernel_shape, bias_shape)
    )


def _check_layout(fn: str, names: Sequence[str], shapes: dict, inputs: bool = False) -> None:
    """Raises ``ValueError`` when a gated kernel is stored ``[out, in, ...]``.

    Per-unit gates take a kernel's last axis as its output units (its axis -2
    as its input features), flax's ``[..., in, out]``. Read from the sibling
    bias: one entry per entry of axis 0 shows equinox's / PyTorch's
    ``[out, in]`` (``[out, in, kh, kw]`` for a conv), where the gates would
    scale input features (a conv's kernel width). A square 2-D kernel's bias
    fits both axes, so it is refused only when another kernel of the same
    ``shapes`` (``{path: shape}`` of the whole params) shows ``[out, in]``
    and none shows units last.
    """
    by_name = {path_str(p): p for p in shapes}
    kernels = {p: s for p, s in shapes.items() if len(s) >= 2 and _bias_path(p) in shapes}
    out_first = [p for p, s in kernels.items() if _is_out_first(s, shapes[_bias_path(p)])]
    units_last = [
        p
        for p, s in kernels.items()
        if _is_unit_bias(s, shapes[_bias_path(p)]) and shapes[_bias_path(p)][0] != s[0]
    ]
    for name in names:
        p = by_name.get(name)
        if p not in kernels:
            continue
        shape, bias = shapes[p], shapes[_bias_path(p)]
        if inputs and len(shape) == 3:
            continue  # [out, in, k] (a Conv1d) has its inputs on axis -2, where they are gated
        if _is_out_first(shape, bias):
            why = f"{path_str(_bias_path(p))!r} has shape {bias}, one entry per entry of axis 0"
        elif out_first and not units_last and len(shape) == 2 and bias == shape[:1]:
            why = (
                f"it is square, so its bias {path_str(_bias_path(p))!r} {bias} fits either axis, "
                f"and {path_str(out_first[0])!r} {shapes[out_first[0]]} of the same params "
                f"has a bias {shapes[_bias_path(out_first[0])]} on axis 0"
            )
        else:
            continue
        wrong = (
            ("output units" if len(shape) == 2 else "kernel heights")
            if inputs
            else ("input features" if len(shape) == 2 else "kernel widths")
        )
        axis = "axis -2 as input features" if inputs else "the last axis as output units"
        raise ValueError(
            f"{fn}: {name!r} of shape {shape} is stored [out, in, ...] (equinox, PyTorch): "
            f"{why}. Per-unit gates take {axis} (flax's [..., in, out]), so here they would "
            f"gate {wrong}. Fix: gate a copy in flax's layout (w.T for a Linear, "
            "jnp.transpose(w, (2, 3, 1, 0)) and a 1-D bias for a Conv2d) and transpose the "
            "gated copy back before the model runs, use a per-weight kind "
            "(jp.gates.VariationalDropout()), or leave this leaf out with where=."
        )


def _warn_unpaired_bias(names: Sequence[str], shapes: dict) -> None:
    """Warns once when gated kernels have no paired bias but a bias-shaped leaf beside them.

    Only the pairs of :func:`_bias_path` are gated with the kernel; any other
    leaf (a tuple's ``(w, b)``, other names) keeps its bias, so a closed unit
    outputs its activation of that bias, not 0.
    """
    by_name = {path_str(p): p for p in shapes}
    found = []
    for name in names:
        p = by_name.get(name)
        if p is None or _bias_path(p) in shapes:
            continue
        shape = shapes[p]
        for q, s in shapes.items():
            if q != p and q[:-1] == p[:-1] and len(s) == 1 and _is_unit_bias(shape, s):
                found.append(f"{name!r} (beside {path_str(q)!r} {s})")
                break
    if found:
        warnings.warn(
            f"init_gates: the gated kernels {', '.join(found[:5])} have no bias named 'bias' "
            "('b' beside 'w') but a leaf of their units' length beside them, which the gates "
            "leave alone: a closed unit still outputs that bias. Fix: name the pair kernel/bias, "
            "weight/bias or w/b (a dict, not a tuple), or silence this with "
            "warnings.filterwarnings if that leaf is not the layer's bias.",
            stacklevel=3,
        )


def _check_not_stacked(path: Path, x: Any, shapes: dict) -> None:
    """Refuses a bias, or a kernel whose bias shows a leading layer axis (``nn.scan``)."""
    shape = tuple(jnp.shape(x))
    bias = shapes.get(_bias_path(path))
    why = None
    if path and path[-1] == "bias":
        why = "it is a bias; a gated kernel's sibling bias is gated with it"
    elif (
        bias is not None
        and len(bias) >= 2
        and bias == shape[:-2] + shape[-1:]
        # [in, heads, head_dim] with bias [heads, head_dim] and in == heads fits
        # both layouts; a general linear kernel (attention's q/k/v) is the likelier.
        and bias != shape[-len(bias) :]
    ):
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


def _check_single_output_axis(path: Path, x: Any, shapes: dict) -> None:
    """Refuses input gates on a kernel whose bias shows several output axes.

    A general linear kernel ``[in, heads, head_dim]`` (flax ``DenseGeneral``,
    attention's q/k/v) with bias ``[heads, head_dim]`` has its output heads on
    axis -2, where input gates scale rows: they would close whole heads.
    """
    shape = tuple(jnp.shape(x))
    bias = shapes.get(_bias_path(path))
    if (
        bias is not None
        and len(bias) >= 2
        and len(shape) > len(bias)
        and bias == shape[-len(bias) :]
        and bias[-1] != 1  # not an equinox conv's [out, 1, 1] bias
    ):
        raise ValueError(
            f"init_gates(inputs=True): {path_str(path)!r} of shape {shape} has a bias of shape "
            f"{bias}: a general linear kernel [in, {', '.join(map(str, bias))}] (DenseGeneral, "
            "attention projections), whose axis -2 is an output axis, so input gates would close "
            "whole output heads. Input gates are for Dense and conv kernels [..., in, out]. Fix: "
            "leave it out with where=, or gate its outputs (inputs=False)."
        )


def _require_per_unit(gate: Gate, what: str) -> None:
    """Raises unless ``gate`` gates whole units (gating input features, a unit's sample)."""
    if not gate.per_unit:
        raise ValueError(
            f"{what} needs a per-unit gate kind, got {type(gate).__name__}, which gates single "
            "weights. Fix: use BetaBernoulli, HardConcrete or ScalarGate (per-weight gates scale "
            "the kernel: gates.apply_gates)."
        )


def _grouped_hint(features: int, rows: int) -> str:
    """Returns why ``features`` input gates may not fit ``rows`` kernel rows: a grouped conv.

    A grouped or depthwise conv (``feature_group_count=groups``) stores
    ``in_features / groups`` rows on its kernel's axis -2, so one gate per
    input channel is ``groups`` times the rows. Empty unless ``features`` is
    such a multiple.
    """
    if rows < 1 or features <= rows or features % rows:
        return ""
    return (
        f" If this is a grouped or depthwise conv (feature_group_count={features // rows}), "
        f"its kernel's axis -2 holds in_features / groups = {rows} rows, each shared by "
        f"{features // rows} input channels: input gates on grouped convs are not supported."
    )


_GROUPED_FIX = (
    "gate a grouped conv's outputs instead, or leave it out of inputs= / input_gate_params"
)


def _input_rows(name: str, g: jax.Array, kernel_shape: tuple) -> jax.Array:
    """Returns the input gates ``g`` shaped to scale the rows (axis -2) of a kernel."""
    if len(kernel_shape) < 2 or kernel_shape[-2] != g.shape[0]:
        grouped = _grouped_hint(g.shape[0], kernel_shape[-2]) if len(kernel_shape) >= 3 else ""
        raise ValueError(
            f"input gates of {name!r} have {g.shape[0]} features, but its kernel has shape "
            f"{kernel_shape} (inputs on axis -2).{grouped} Fix: build them with "
            "jp.gates.init_gates(gate, params, inputs=True)"
            + (f"; {_GROUPED_FIX}." if grouped else ".")
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


def _check_gate_shapes(gate: Gate, gate_params: dict, kernels: dict, inputs: bool = False) -> None:
    """Raises ``ValueError`` naming the layer when a layer's gate params do not fit ``gate``.

    With ``inputs`` the gate params are input gates, one per row (axis -2)
    of the kernel.
    """
    for name, gp in gate_params.items():
        shape = tuple(jnp.shape(kernels[name]))
        if inputs and len(shape) < 2:
            raise ValueError(
                f"input_gate_params[{name!r}] gates a leaf of shape {shape}, but input gates sit "
                "on a kernel's rows (ndim >= 2, inputs on axis -2). Fix: build them with "
                "jp.gates.init_gates(gate, params, inputs=True)."
            )
        if inputs and isinstance(gp, dict):
            for v in gp.values():
                if jnp.ndim(v) >= 1:
                    _input_rows(name, jnp.asarray(v), shape)  # raises on a wrong feature count
        want = jax.eval_shape(
            lambda k: gate.init(jnp.swapaxes(k, -1, -2) if inputs else k, jax.random.key(0)),
            kernels[name],
        )
        want = {k: tuple(v.shape) for k, v in want.items()}
        got = {k: tuple(jnp.shape(v)) for k, v in gp.items()} if isinstance(gp, dict) else gp
        if got != want:
            arg, on, build = (
                ("input_gate_params", "the inputs (axis -2) of ", "params, inputs=True")
                if inputs
                else ("gate_params", "", "params")
            )
            raise ValueError(
                f"{arg}[{name!r}] is {got}, but {type(gate).__name__} on {on}that layer's kernel "
                f"{shape} has {want}. Fix: build them with "
                f"jp.gates.init_gates(gate, {build}) with the same gate kind and params."
            )


def _check_inputs(gate: Gate, input_gate_params: dict | None) -> dict:
    inputs = dict(input_gate_params or {})
    if inputs:
        _require_per_unit(gate, "input_gate_params")
    return inputs
