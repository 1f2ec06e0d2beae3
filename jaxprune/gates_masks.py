"""Hard masks from learned gates, and network slimming on BatchNorm scales.

The gates' last stage: :func:`unit_masks` reads which units (weights) the
gates keep, by their test-time value or ranked across layers to an exact
sparsity, and :func:`to_masks` spreads them into bool masks mirroring the
params tree (a pruned unit's kernel column and bias ``False``), ready for
:func:`jaxprune.apply_masks` and the structured shrink. Network slimming
(:func:`slimming_penalty`, :func:`slimming_masks`) learns BatchNorm scales
under an L1 penalty and prunes the channels with the smallest ones, with the
same global ranking and the same masks on scale and bias. All of them are
re-exported by :mod:`jaxprune.gates_tree` and :mod:`jaxprune.gates`.

References:
  Liu et al., "Learning Efficient Convolutional Networks through Network
  Slimming", ICCV 2017. https://arxiv.org/abs/1708.06519
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from jaxprune._tree import Path, Where, leaves_with_paths, mirror_variables, path_str
from jaxprune.gates_checks import (
    _bias_path,
    _check_gate,
    _check_gate_params,
    _check_gate_shapes,
    _check_inputs,
    _check_kind,
    _check_layout,
    _input_rows,
    _is_unit_bias,
)
from jaxprune.masks import global_topk

if TYPE_CHECKING:
    from jaxprune.gates_tree import Gate

__all__ = ["slimming_masks", "slimming_penalty", "to_masks", "unit_masks"]

# unit_masks' key suffix for the gates on a layer's input features.
INPUTS_SUFFIX = ":inputs"


def unit_masks(
    gate: Gate,
    gate_params: dict,
    params: Any = None,
    *,
    sparsity: float | None = None,
    input_gate_params: dict | None = None,
    max_sparsity: float | None = None,
) -> dict[str, jax.Array]:
    """Returns ``{layer: bool[units or kernel shape]}``: which units (weights) the gates keep.

    With ``sparsity`` the kept set is instead the top ``1 - sparsity`` of the
    gates' scores across all layers (exact count, :func:`jaxprune.masks.global_topk`);
    ``max_sparsity`` caps what any one layer loses, and a layer left with no
    unit is warned about.
    ``input_gate_params`` (per-unit kinds) maps kernel paths to gates on the
    layers' input features; their keeps come back under ``"<kernel path>:inputs"``
    and take part in the ``sparsity`` ranking.

    Args:
      gate: the gate kind the gates were trained with.
      gate_params: ``{kernel path: gate params}``, all made by ``gate``'s kind.
      params: the model params (default ``None``); required by per-weight
        kinds (:class:`VariationalDropout`), which read their kernels from it.
        When given, the gate params' paths and shapes are checked against it.
      sparsity: ``None`` (default) keeps what each gate's test-time rule
        keeps; a fraction in ``[0, 1]`` instead prunes exactly that fraction
        of all units (weights, for a per-weight kind), ranked by the gates'
        scores across layers.
      input_gate_params: ``{kernel path: gates on the layer's input
        features}`` (per-unit kinds); default ``None``, none.
      max_sparsity: with ``sparsity``, the most any one layer may lose, a
        Python number in ``[0, 1]``; default ``None``, no cap. Refused without
        ``sparsity``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxprune import gates
      >>> gp = {"fc/kernel": {"gate_log_alpha": jnp.array([-9.0, 9.0])}}
      >>> gates.unit_masks(gates.HardConcrete(), gp)["fc/kernel"].tolist()
      [False, True]
      >>> gp = {
      ...     "a/kernel": {"gate_scale": jnp.array([0.5, 0.0, 0.9])},
      ...     "b/kernel": {"gate_scale": jnp.array([0.1, 0.3])},
      ... }
      >>> keep = gates.unit_masks(gates.ScalarGate(), gp, sparsity=0.4)  # ranked across layers
      >>> keep["a/kernel"].tolist(), keep["b/kernel"].tolist()
      ([True, False, True], [False, True])
    """
    _check_gate(gate)
    if sparsity is None and max_sparsity is not None:
        raise ValueError(
            f"max_sparsity={max_sparsity!r} caps a ranking by sparsity=, but sparsity is None "
            "(each gate's own test-time rule decides, and no cap applies). Fix: pass sparsity= "
            "too (e.g. sparsity=0.8, max_sparsity=0.9), or leave max_sparsity out."
        )
    inputs = _check_inputs(gate, input_gate_params)
    names = sorted(gate_params)
    kernels = {}
    if params is not None:
        flat, _ = leaves_with_paths(params)
        # (An equinox module's functions are no kernels.)
        kernels = {path_str(p): jnp.asarray(x) for p, x in flat if hasattr(x, "dtype")}
        # Before scoring: a per-weight kind reads kernels[name], and a name that
        # params lacks must get the clear message, not an error on ``None``.
        _check_gate_params(gate_params, kernels)
        _check_gate_params(inputs, kernels)
    if not gate.per_unit and params is None:
        raise ValueError(
            "variational dropout masks read the weights, but params is None. Fix: pass params."
        )
    # The checks apply_gates and penalty run: another kind's params would fail on a
    # missing key, and a gate vector of the wrong length would broadcast (length 1
    # silently) over the kernel.
    _check_kind(gate, [gate_params[n] for n in names] + [inputs[n] for n in sorted(inputs)])
    if params is not None:
        _check_gate_shapes(gate, gate_params, kernels)
        _check_gate_shapes(gate, inputs, kernels, inputs=True)
    every = {n: (gate_params[n], kernels.get(n)) for n in names}
    every.update({f"{n}{INPUTS_SUFFIX}": (inputs[n], None) for n in sorted(inputs)})
    if sparsity is None:
        keep = {n: gate.keep(gp, k) for n, (gp, k) in every.items()}
        _warn_emptied(
            "unit_masks",
            keep,
            "a smaller penalty weight, or unit_masks(..., sparsity=s, max_sparsity=0.9) to keep "
            "the best-scored units of every layer",
            what="unit" if gate.per_unit else "weight",
        )
        return keep
    scores = {n: gate.score(gp, k) for n, (gp, k) in every.items()}
    keep = global_topk(scores, sparsity, where=lambda p, x: True, max_sparsity=max_sparsity)
    _warn_emptied("unit_masks", keep)
    return keep


def _warn_emptied(
    name: str, keep: dict, fix: str = "max_sparsity=0.9 (or lower sparsity)", what: str = "unit"
) -> None:
    # Warned only when the masks are concrete (the masks are also built under jit).
    emptied = [
        n
        for n, k in keep.items()
        if not isinstance(k, jax.core.Tracer) and k.size and not bool(jnp.any(k))
    ]
    if emptied:
        warnings.warn(
            f"{name} pruned every {what} of {emptied[:5]}: the network's output no longer "
            f"depends on its input. Fix: {fix}.",
            stacklevel=3,
        )


def to_masks(
    gate: Gate,
    gate_params: dict,
    params: Any,
    *,
    sparsity: float | None = None,
    input_gate_params: dict | None = None,
    max_sparsity: float | None = None,
) -> Any:
    """Returns bool hard masks mirroring ``params``: pruned units' columns and biases ``False``.

    Feed them to :func:`jaxprune.apply_masks` (on the folded params,
    ``apply_gates(gate, params, gate_params)``, whose pruned units are already
    zero) and to the structured shrink. A per-unit gate masks the sibling bias
    that :func:`jaxprune.gates.apply_gates` scales, broadcast along its last
    axis (a DenseGeneral's ``[heads, head_dim]`` bias). Leaves without a gate
    get a scalar ``True``. ``input_gate_params`` (kernel path -> gates on the layer's
    input features) makes pruned inputs' kernel rows ``False``.

    Args:
      gate: the gate kind the gates were trained with.
      gate_params: ``{kernel path: gate params}``.
      params: the model params the masks mirror; per-weight kinds
        (:class:`VariationalDropout`) also read their kernels from it.
      sparsity: ``None`` (default) keeps what each gate's test-time rule keeps;
        a fraction in ``[0, 1]`` instead prunes exactly that fraction of all
        units, ranked by the gates' scores across layers (as in
        :func:`unit_masks`).
      input_gate_params: ``{kernel path: gates on the layer's input features}``.
      max_sparsity: with ``sparsity``, the most any one layer may lose, in
        ``[0, 1]`` (default: no cap).

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> from jaxprune import gates
      >>> params = {"fc": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
      >>> gp = {"fc/kernel": {"gate_log_alpha": jnp.array([-9.0, 9.0])}}
      >>> m = gates.to_masks(gates.HardConcrete(), gp, params)
      >>> m["fc"]["kernel"].tolist(), m["fc"]["bias"].tolist()
      ([[False, True], [False, True]], [False, True])
    """
    _check_gate(gate)
    units = unit_masks(
        gate,
        gate_params,
        params,
        sparsity=sparsity,
        input_gate_params=input_gate_params,
        max_sparsity=max_sparsity,
    )
    flat, treedef = leaves_with_paths(params)
    index = {path_str(p): i for i, (p, _) in enumerate(flat)}
    _check_gate_params(gate_params, index)
    if gate.per_unit:
        shapes = {p: tuple(jnp.shape(x)) for p, x in flat if hasattr(x, "dtype")}
        _check_layout("to_masks", sorted(gate_params), shapes)
        _check_layout("to_masks", sorted(input_gate_params or {}), shapes, inputs=True)
    leaves: list[Any] = [jnp.ones((), bool) for _ in flat]
    rows = {n.removesuffix(INPUTS_SUFFIX): k for n, k in units.items() if n.endswith(INPUTS_SUFFIX)}
    for name, keep in units.items():
        if name.endswith(INPUTS_SUFFIX):
            continue
        i = index[name]
        shape = jnp.shape(flat[i][1])
        leaves[i] = jnp.broadcast_to(keep, shape)
        b = index.get(path_str(_bias_path(flat[i][0])))
        bias_shape = jnp.shape(flat[b][1]) if b is not None else ()
        # The bias apply_gates scales: the kernel's trailing axes, units last.
        if gate.per_unit and _is_unit_bias(shape, bias_shape) and bias_shape[-1:] == keep.shape:
            leaves[b] = jnp.broadcast_to(keep, bias_shape)
    for name, keep in rows.items():
        i = index[name]
        shape = jnp.shape(flat[i][1])
        leaves[i] = leaves[i] & jnp.broadcast_to(_input_rows(name, keep, shape), shape)
    return mirror_variables(params, jax.tree.unflatten(treedef, leaves))


def _is_1d_scale(path: Path, leaf: Any) -> bool:
    return bool(path) and path[-1] == "scale" and jnp.ndim(leaf) == 1


# A BatchNorm keeps running statistics beside its scale (nnx.BatchNorm's BatchStat
# ``mean``/``var``; linen's ``batch_stats`` collection); LayerNorm, GroupNorm and
# RMSNorm have a 1-D ``scale`` too but no statistics.
_BN_STATS = ("mean", "var")
_LINEN_COLLECTIONS = ("params", "batch_stats")


def _bn_scales(flat: list[tuple[Path, Any]]) -> Where:
    """Returns the default slimming ``where`` for the leaves ``flat`` of one tree.

    With BatchNorm statistics in the tree: the 1-D scales that have a ``mean``
    or ``var`` in the same module (for linen variables
    ``{"params": ..., "batch_stats": ...}``, at the same module path in
    ``batch_stats``). Without (a params-only tree): every 1-D ``scale``.
    """
    top = {p[0] for p, _ in flat if p}
    linen = set(_LINEN_COLLECTIONS) <= top

    def module(path: Path) -> Path:
        # linen keeps params and statistics in separate collections: compare the module paths.
        return tuple(path[1:-1]) if linen and path[0] in _LINEN_COLLECTIONS else tuple(path[:-1])

    with_stats = {module(p) for p, x in flat if p and p[-1] in _BN_STATS and jnp.ndim(x) == 1}
    if not with_stats:
        return _is_1d_scale
    return lambda p, x: _is_1d_scale(p, x) and module(p) in with_stats


def slimming_penalty(params: Any, *, where: Where | None = None) -> jax.Array:
    """Returns ``sum |gamma|`` over BatchNorm scales: network slimming's L1 term.

    Multiply by lambda (1e-4 for VGG, 1e-5 for ResNet in the paper) and add to
    the loss. ``where`` picks the scales. The default depends on what the tree
    holds, because LayerNorm, GroupNorm and RMSNorm also have a 1-D ``scale``:

    * with BatchNorm statistics in the tree (``nnx.state(model)``, or linen
      ``{"params": ..., "batch_stats": ...}``): only the 1-D scales with a
      ``mean`` / ``var`` in the same module, the BatchNorm scales;
    * without them (``nnx.state(model, nnx.Param)``, linen ``variables["params"]``):
      every 1-D leaf named ``scale``, **other norms' scales included**. Pass
      ``where`` to keep to the BatchNorms, e.g. for nnx
      ``bns = {p for p, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)}``,
      ``where=lambda p, x: p[-1] == "scale" and tuple(p[:-1]) in bns``; for linen's
      default names ``where=lambda p, x: p[-1] == "scale" and "BatchNorm" in str(p[-2])``.

    Args:
      params: any pytree holding the BatchNorm scales (with or without their
        statistics, as above).
      where: predicate ``(path, leaf) -> bool`` choosing the scale leaves;
        default ``None``, the rule above.

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> from jaxprune import gates
      >>> float(gates.slimming_penalty({"bn": {"scale": jnp.array([1.0, -2.0])}}))
      3.0
      >>> tree = {  # with statistics in the tree, the LayerNorm's scale is left out
      ...     "bn": {"scale": jnp.array([1.0, -2.0]), "mean": jnp.zeros(2), "var": jnp.ones(2)},
      ...     "ln": {"scale": jnp.array([5.0, 5.0])},
      ... }
      >>> float(gates.slimming_penalty(tree))
      3.0

    References:
      Liu et al., "Learning Efficient Convolutional Networks through Network
      Slimming", ICCV 2017. https://arxiv.org/abs/1708.06519
    """
    flat, _ = leaves_with_paths(params)
    where = where or _bn_scales(flat)
    scales = [x for p, x in flat if where(p, x)]
    if not scales:
        raise ValueError(
            "slimming_penalty found no BatchNorm scales (1-D leaves named 'scale', with a "
            "'mean'/'var' beside them when the tree has statistics), so the penalty would be 0 "
            "and nothing would be slimmed. Fix: pass where=lambda path, x: ... selecting the "
            "per-channel scale leaves."
        )
    return sum((jnp.sum(jnp.abs(x.astype(jnp.float32))) for x in scales), jnp.float32(0))


def slimming_masks(
    params: Any,
    sparsity: float,
    *,
    where: Where | None = None,
    max_sparsity: float | None = None,
) -> Any:
    """Returns masks mirroring ``params`` that prune the smallest ``|gamma|`` channels globally.

    Exactly ``round(sparsity * C)`` of the ``C`` BatchNorm channels are pruned;
    each pruned channel's ``scale`` and sibling ``bias`` are ``False``, so its
    output is exactly zero and the structured shrink can remove it with the
    producing conv's filter. A global ranking can take every channel of one
    layer, leaving a network whose output is constant: ``max_sparsity`` caps
    what one layer loses (``floor(max_sparsity * channels)``; see
    :func:`jaxprune.masks.global_topk`), and an emptied layer warns.

    ``where`` picks the scales, with the default of :func:`slimming_penalty`:
    the scales with BatchNorm statistics beside them when the tree has any
    (``nnx.state(model)``, linen ``{"params": ..., "batch_stats": ...}``),
    otherwise every 1-D ``scale``, **LayerNorm, GroupNorm and RMSNorm scales
    included**, ranked against the BatchNorm channels. For a params-only tree
    of a model with other norms, pass the ``where`` given there.

    Args:
      params: any pytree holding the BatchNorm scales (with or without their
        statistics, as above); the masks mirror it.
      sparsity: the fraction of all selected channels to prune, in ``[0, 1]``.
      where: predicate ``(path, leaf) -> bool`` choosing the scale leaves;
        default ``None``, the rule above. It must select at least one leaf.
      max_sparsity: the most any one layer may lose, a Python number in
        ``[0, 1]``; default ``None``, no cap.

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> from jaxprune import gates
      >>> p = {"bn": {"scale": jnp.array([0.1, 2.0]), "bias": jnp.ones(2)}}
      >>> m = gates.slimming_masks(p, 0.5)
      >>> m["bn"]["scale"].tolist(), m["bn"]["bias"].tolist()
      ([False, True], [False, True])

    References:
      Liu et al., "Learning Efficient Convolutional Networks through Network
      Slimming", ICCV 2017. https://arxiv.org/abs/1708.06519
    """
    flat, treedef = leaves_with_paths(params)
    where = where or _bn_scales(flat)
    scales = {path_str(p): jnp.abs(x) for p, x in flat if where(p, x)}
    if not scales:
        raise ValueError(
            "slimming_masks found no BatchNorm scales (1-D leaves named 'scale', with a "
            "'mean'/'var' beside them when the tree has statistics). Fix: pass "
            "where=lambda path, x: ... selecting the per-channel scale leaves."
        )
    keep = global_topk(scales, sparsity, where=lambda p, x: True, max_sparsity=max_sparsity)
    _warn_emptied("slimming_masks", keep)
    index = {path_str(p): i for i, (p, _) in enumerate(flat)}
    leaves: list[Any] = [jnp.ones((), bool) for _ in flat]
    for name, k in keep.items():
        i = index[name]
        leaves[i] = k
        b = index.get(path_str(_bias_path(flat[i][0])))
        if b is not None and jnp.shape(flat[b][1]) == k.shape:
            leaves[b] = k
    return mirror_variables(params, jax.tree.unflatten(treedef, leaves))
