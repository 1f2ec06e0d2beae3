"""Warns when a gate that is one value per unit for the batch feeds a BatchNorm.

:func:`jaxprune.gates.attach` warns (:class:`GateBeforeBatchNormWarning`) when a
gate that is one value per unit for the whole batch (the default shared sample,
:class:`~jaxprune.gates.ScalarGate`) multiplies a layer whose next layer is a
``nnx.BatchNorm``: in train mode the BatchNorm divides that per-channel
constant back out, so the data loss leaves the gates almost untouched. The
check reads the code's layout (attribute and list order), not a trace.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
from flax import nnx

from jaxprune._tree import path_str
from jaxprune.gates_layout import _children, _parent_and_name
from jaxprune.gates_tree import Gate

__all__ = ["GateBeforeBatchNormWarning"]


class GateBeforeBatchNormWarning(UserWarning):
    """:func:`attach` gates, with one value per unit for the batch, a layer that feeds a BatchNorm.

    In train mode a BatchNorm normalizes each channel by its batch statistics,
    so a gate that multiplies the whole channel by one number (the default
    shared sample of :class:`~jaxprune.gates.HardConcrete` and
    :class:`~jaxprune.gates.BetaBernoulli`, and :class:`~jaxprune.gates.ScalarGate`)
    is divided back out: the data loss gives it almost no gradient, and the
    penalty alone decides which units go. Fixes: ``per_example=True`` (one
    sample per example, which the BatchNorm does not cancel), or gate after the
    BatchNorm (``skip`` the layer and gate the next layer's ``inputs``). A frozen
    BatchNorm (``use_running_average=True`` while training) does not divide the
    gate out: silence the warning with
    ``warnings.filterwarnings("ignore", category=jp.gates.GateBeforeBatchNormWarning)``.
    """


def _has_params(node: Any) -> bool:
    return isinstance(node, nnx.Module) and bool(jax.tree.leaves(nnx.state(node, nnx.Param)))


def _batchnorm_after(model: nnx.Module, path: tuple, module: Any) -> tuple | None:
    """Returns the path of the ``nnx.BatchNorm`` that ``module`` (at ``path``) feeds, or None.

    A cheap reading of the code's layout, not a trace (attach sees no input):
    the BatchNorm is the next sibling with parameters (``self.conv1`` then
    ``self.bn1``; ``nnx.Sequential(conv, relu, bn)``), or, for a layer in a list,
    the item at the same index of a sibling list (``self.convs[i]``,
    ``self.bns[i]``), with ``num_features`` equal to the layer's outputs.
    """
    kernel = getattr(module, "kernel", None)
    if kernel is None or not path:
        return None
    units = kernel.shape[-1]

    def feeds(m: Any) -> bool:
        return isinstance(m, nnx.BatchNorm) and m.num_features == units

    parent, name = _parent_and_name(model, path)
    siblings = _children(parent)
    names = [n for n, _ in siblings]
    if name in names:
        for n, child in siblings[names.index(name) + 1 :]:
            if feeds(child):
                return path[:-1] + (n,)
            if _has_params(child):
                break  # another layer comes first
    if isinstance(name, int) and len(path) >= 2:
        grand, list_name = _parent_and_name(model, path[:-1])
        for n, child in _children(grand):
            if n != list_name and isinstance(child, (list, nnx.List)) and len(child) > name:
                if feeds(child[name]):
                    return path[:-2] + (n, name)
    return None


def _warn_batchnorm(model: nnx.Module, gate: Gate, chosen: list[tuple[tuple, Any]]) -> None:
    fed = [(p, bn) for p, m in chosen if (bn := _batchnorm_after(model, p, m)) is not None]
    if not fed:
        return
    kind = type(gate).__name__
    layers = [path_str(p) for p, _ in fed]
    fix = f"{kind}(per_example=True) (a sample per example, which the BatchNorm keeps), or "
    if not hasattr(gate, "per_example"):
        fix = ""
    many = f"{len(layers)} layers, " if len(layers) > 5 else ""  # the lists show 5
    warnings.warn(
        f"attach gates the outputs of {many}{layers[:5]}, which feed the BatchNorms "
        f"{[path_str(bn) for _, bn in fed][:5]}, with {kind} gates that are one value per "
        "unit for the whole batch: in train mode the BatchNorm divides them back out, so the "
        "data loss gives them almost no gradient and the penalty alone decides which units "
        f"go. Fix: {fix}gate after the BatchNorm: skip={tuple(layers[:5])} and gate the next "
        "layer's inputs with inputs=(...). A frozen BatchNorm does not divide them out: "
        "filter category jp.gates.GateBeforeBatchNormWarning.",
        GateBeforeBatchNormWarning,
        stacklevel=3,
    )
