"""Argument checks and warnings of ``structure.select`` / ``structure.selection``.

The checks run when a selection is built or called, before anything is
traced: bad ``scope``, ``max_sparsity``, ``round_to``, ``normalize`` and
``sparsity`` raise a ``ValueError`` naming the argument. The warnings name
the groups a concrete selection empties (layer collapse), cuts without a
vote from ``where``, or whose whole cut ``round_to`` undoes.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import numpy as np

from jaxprune import _counts

# How select(normalize=...) scales each group's importances (see importance._normalized).
_NORMALIZERS = ("mean", "max", "sum", "gaussian")


def _warn_emptied(groups, keeps: dict, s: float, scope: str, cap) -> None:
    """Warns when a concrete ``sparsity < 1`` removes every channel of a group (layer collapse)."""
    emptied = [i for i, keep in keeps.items() if not np.any(keep)]
    if not emptied or not s < 1.0:
        return
    names = "; ".join(repr(groups[i]) for i in emptied[:3])
    if scope == "global":
        msg = (
            f"global selection at sparsity {s:g} removed every channel of {len(emptied)} "
            f"group(s) ({names}): the network's output no longer depends on its input through "
            "them (layer collapse). Fix: pass max_sparsity=0.9 (or another cap) so that every "
            "group keeps some channels, or use scope='layer'."
        )
    else:
        fix = (
            "a lower sparsity for them (select them apart and AND the masks), or "
            "max_sparsity=0.9 (or another cap below 1) so that every group keeps some channels"
            if cap is None
            else f"a max_sparsity below {cap:g}, or a lower sparsity for them"
        )
        msg = (
            f"layer selection at sparsity {s:g} removed every channel of {len(emptied)} "
            f"group(s), since round({s:g} * channels) == channels for them ({names}): the "
            "network's output no longer depends on its input through them (layer collapse). "
            f"Fix: {fix}."
        )
    # _warn_emptied < _select_warned < select (or a selection's select_fn) < the caller.
    warnings.warn(msg, stacklevel=4)


def _warn_unvoted(groups, unvoted_keeps: dict) -> None:
    """Warns when a group none of whose members ``where`` selects loses channels.

    ``unvoted_keeps``: the kept channels of those groups. Their importances
    are all 0, so the channels dropped are their first ones in index order: a
    cut by position, not by importance.
    """
    unvoted = [i for i, keep in unvoted_keeps.items() if not np.all(keep)]
    if not unvoted:
        return
    names = "; ".join(repr(groups[i]) for i in unvoted[:3])
    more = f" and {len(unvoted) - 3} more" if len(unvoted) > 3 else ""
    warnings.warn(
        f"no member of {len(unvoted)} group(s) is selected by where= ({names}{more}), so "
        "their importances are all 0 and the channels cut there fall by position (the first "
        "ones in index order), not by importance. Fix: include a member of each such group "
        "in where= (e.g. its kernel, or a BatchNorm scale), or leave the group out of the "
        "groups passed to select.",
        stacklevel=4,
    )


def _check_select_sparsity(sparsity: Any) -> None:
    """Raises unless ``sparsity`` is one number in [0, 1] (no tree: one ratio for all groups)."""
    flat = jax.tree.leaves(sparsity)
    if (len(flat) > 1 or (flat and flat[0] is not sparsity)) or (
        flat and not isinstance(sparsity, (str, bytes)) and np.ndim(sparsity) > 0
    ):
        raise ValueError(
            f"sparsity must be one number in [0, 1] (the fraction of channels to drop, the same "
            f"for every group), got {sparsity!r}. Fix: for per-group ratios, call select once "
            "per subset of groups and AND the masks: jax.tree.map(jnp.logical_and, "
            "select(groups_a, scores, ra), select(groups_b, scores, rb))."
        )
    _counts._check_sparsity(sparsity, tree_ok=False)


def _check_select_args(scope: Any, max_sparsity: Any, round_to: Any, normalize: Any) -> None:
    if scope not in ("layer", "global", "isomorphic"):
        raise ValueError(
            f"scope must be 'layer' (per group), 'global' (one ranking across groups) or "
            f"'isomorphic' (one ranking per class of isomorphic groups), got {scope!r}. "
            "Fix: e.g. scope='global'."
        )
    if normalize is not None and normalize not in _NORMALIZERS:
        raise ValueError(
            f"normalize must be None or one of {', '.join(map(repr, _NORMALIZERS))} (how each "
            f"group's importances are scaled before a global ranking), got {normalize!r}. "
            "Fix: e.g. normalize='mean'."
        )
    _counts._check_max_sparsity(max_sparsity, "max_sparsity", "group", "channels")
    if round_to is not None and (
        not isinstance(round_to, (int, np.integer)) or isinstance(round_to, bool) or round_to < 1
    ):
        raise ValueError(
            f"round_to must be an int >= 1 (keep a multiple of this many channels per group) "
            f"or None, got {round_to!r}. Fix: e.g. round_to=8."
        )


def _warn_round_to_cancels(groups, keeps: dict, sparsity: float, r: int, cap) -> None:
    """Warns when rounding kept channels up to ``r`` undoes a group's whole cut (layer scope)."""
    cancelled = []
    for i, keep in keeps.items():
        c = groups[i].channels
        d = int(_counts._count(sparsity, c))
        if cap is not None:
            d = min(d, _counts._cap(cap, c))
        if d > 0 and np.all(keep):
            cancelled.append(f"group {i} ({c} channels, {d} to drop)")
    if cancelled:
        warnings.warn(
            f"round_to={r} keeps every channel of {', '.join(cancelled[:5])}: the kept "
            f"count is rounded up to a multiple of {r}, so nothing is dropped there "
            "(Torch-Pruning rounds down). Fix: a higher sparsity, or a smaller round_to.",
            stacklevel=4,
        )
