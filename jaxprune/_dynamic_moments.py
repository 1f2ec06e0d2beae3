"""Resetting the inner optimizer's per-entry moments of rewired weights (RigL, SET).

After a rewiring step of :mod:`jaxprune.dynamic`, every dropped or regrown
entry leaves the step with its moments at exactly 0, so a regrown weight does
not inherit the momentum it had before it was pruned. Moments are found by
structure, not by optimizer type: any subtree of the inner state with the
params' tree structure, whose leaf has the param's shape (adam's ``mu``/``nu``,
sgd's momentum ``trace``, and the partial trees of ``optax.masked``,
``optax.multi_transform`` and ``optax.contrib.muon``, whose ``MaskedNode``
placeholders stand for the leaves they leave out).

References:
  Evci et al., "Rigging the Lottery: Making All Tickets Winners", 2020.
  https://arxiv.org/abs/1911.11134
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def _is_masked_node(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def _params_def(x: Any, treedefs: tuple[Any, ...]) -> Any:
    """Returns the one of ``treedefs`` that ``x`` has (``optax.MaskedNode`` for a leaf), or None.

    ``optax.masked``, ``optax.multi_transform`` and ``optax.partition`` (used by
    ``optax.contrib.muon``) keep their moments in params-shaped trees with a
    ``MaskedNode`` at each leaf they do not handle.
    """
    if isinstance(x, jax.Array):
        return None
    try:
        got = jax.tree.structure(x, is_leaf=_is_masked_node)
    except Exception:  # noqa: BLE001 (exotic nodes are simply not params-like)
        return None
    return next((t for t in treedefs if got == t), None)


def _reset_moments(inner_state: Any, treedefs: tuple[Any, ...], reset: list[jax.Array]) -> Any:
    """Zeroes, in every params-shaped subtree of ``inner_state``, the entries in ``reset``.

    ``treedefs``: the structures a moment tree may have, the pure params' and
    the updates' (an ``nnx.State`` of ``Param`` s keeps its moments as
    ``Param`` s, an ``nnx.Optimizer`` as arrays).
    """

    def fix(sub):
        treedef = _params_def(sub, treedefs)
        if treedef is None:
            return sub
        leaves = jax.tree.leaves(sub, is_leaf=_is_masked_node)
        out = [
            jnp.where(r, jnp.zeros((), x.dtype), x)
            if not _is_masked_node(x) and jnp.shape(x) == jnp.shape(r)
            else x
            for x, r in zip(leaves, reset, strict=False)
        ]
        return jax.tree.unflatten(treedef, out)

    if any(t.num_leaves == 1 and t == jax.tree.structure(0) for t in treedefs):
        # A bare-array params tree: every state leaf of the right shape is a moment.
        return jax.tree.map(
            lambda x: (
                jnp.where(reset[0], jnp.zeros((), x.dtype), x)
                if jnp.shape(x) == jnp.shape(reset[0]) and jnp.ndim(x)
                else x
            ),
            inner_state,
        )
    return jax.tree.map(fix, inner_state, is_leaf=lambda x: _params_def(x, treedefs) is not None)
