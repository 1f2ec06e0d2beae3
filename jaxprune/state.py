"""Finding and measuring the pruning state inside an optimizer state.

``jp.prune`` and the other mask-enforcing transforms (``jp.dynamic.rigl`` /
``set``) keep their masks in a state that may sit anywhere in the optimizer's
state: inside ``optax.chain``, ``optax.MultiSteps``, ``inject_hyperparams``,
one per ``optax.multi_transform`` partition, or ``nnx.Optimizer.opt_state``.
:func:`get_masks` finds them and reads the masks they enforce;
:func:`state_bytes` weighs them against the inner optimizer's state.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxprune._tree import unwrap_variables

__all__ = ["get_masks", "find_prune_states", "register_mask_state", "state_bytes"]

# State classes whose ``masks`` (field or property) are the masks being
# enforced: jp.prune's PruneState and those of other mask-enforcing transforms
# (e.g. jp.dynamic), which register theirs.
_MASK_STATES: list[type] = []


def register_mask_state(cls: type) -> type:
    """Registers a state class (with ``masks`` and ``inner_state``) for :func:`get_masks`.

    For the authors of mask-enforcing transforms: once registered, the class's
    states are found wherever they sit in an optimizer state (by
    :func:`get_masks`, :func:`find_prune_states`, :func:`state_bytes` and the
    checkpoint's mask lookup), as ``jp.dynamic`` registers its own. ``masks``
    is a tree of bool arrays (True keeps) over the params; ``inner_state`` is
    searched for nested pruning states. Returns ``cls``, so it works as a
    decorator; registering twice is harmless.

    Examples:
      >>> from typing import Any, NamedTuple
      >>> import jax.numpy as jnp, optax, jaxprune as jp
      >>> from jaxprune.state import register_mask_state
      >>> @register_mask_state
      ... class FixedMaskState(NamedTuple):  # the state of a transform with a fixed mask
      ...     masks: Any
      ...     inner_state: Any
      >>> params = {"w": jnp.ones(3)}
      >>> mine = FixedMaskState({"w": jnp.array([True, False, True])}, optax.sgd(0.1).init(params))
      >>> opt_state = (optax.EmptyState(), mine)  # e.g. inside an optax.chain
      >>> jp.get_masks(opt_state)["w"].tolist()
      [True, False, True]
    """
    if cls not in _MASK_STATES:
        _MASK_STATES.append(cls)
    return cls


def _is_mask_state(x: Any) -> bool:
    return isinstance(x, tuple(_MASK_STATES))


def find_prune_states(opt_state: Any) -> list[Any]:
    """Returns every pruning state inside ``opt_state`` (outermost first).

    That is every :class:`~jaxprune.transform.PruneState`, and the states of
    other registered mask-enforcing transforms (``jp.dynamic.rigl`` / ``set``).
    """
    found = []

    def visit(x):
        if _is_mask_state(x):
            found.append(x)
            jax.tree.map(visit, x.inner_state, is_leaf=_is_mask_state)
        return x

    jax.tree.map(visit, opt_state, is_leaf=_is_mask_state)
    return found


def get_masks(opt_state: Any) -> optax.Params:
    """Returns the masks currently enforced by the ``jp.prune`` inside ``opt_state``.

    Finds the pruning state inside ``optax.chain``, ``optax.MultiSteps``,
    ``inject_hyperparams`` states and ``nnx.Optimizer.opt_state``; also the
    masks of ``jp.dynamic.rigl`` / ``set``. Where ``opt_state`` holds several
    (one ``jp.prune`` per ``optax.multi_transform`` partition, or one nested in
    another), an entry is kept only where every one of them keeps it.

    Args:
      opt_state: an optimizer state holding a pruning state (from ``tx.init`` of a
        ``jp.prune`` or ``jp.dynamic`` transform, possibly nested in other optax
        states), or an ``nnx.Optimizer``'s ``opt_state``.

    Raises:
      ValueError: ``opt_state`` holds no pruning state, or pruning states over
        different trees.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, jaxprune as jp
      >>> params = {"w": jnp.arange(1.0, 9.0).reshape(2, 4), "b": jnp.zeros(4)}
      >>> tx = optax.MultiSteps(jp.prune(optax.sgd(0.1), sparsity=0.5), 1)
      >>> state = tx.init(params)
      >>> bool(jp.get_masks(state)["w"].all())  # nothing pruned before the first step
      True
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> _, state = tx.update(grads, state, params)
      >>> masks = jp.get_masks(state)
      >>> masks["w"].tolist(), masks["b"].tolist()  # 1-D leaves are not pruned
      ([[False, False, False, False], [True, True, True, True]], True)
    """
    states = find_prune_states(opt_state)
    if not states and _looks_restored_plain(opt_state):
        raise ValueError(
            "opt_state holds jp.prune's state as plain dicts (a checkpoint restored without a "
            "template), whose masks cannot be unpacked. Fix: restore into a template, "
            "jp.restore(d, params=params, opt_state=tx.init(params)), or read the restored "
            "checkpoint's .masks."
        )
    if not states:
        raise ValueError(
            "opt_state holds no jp.prune state. Fix: build the optimizer with "
            "tx = jp.prune(optax.adam(1e-3), sparsity=...) and pass tx.init(params) "
            "(or nnx.Optimizer(model, tx, wrt=nnx.Param).opt_state) here; nnx.state(optimizer) "
            "is not enough, as it leaves the masks' shapes in the graphdef."
        )
    # Under optax.masked, leaves the pruning never sees are MaskedNode(): they
    # are not pruned, so their mask is a scalar True, as for any unpruned leaf.
    masked = optax.MaskedNode
    out = unwrap_variables(states[0].masks)
    for other in states[1:]:
        out = _merge_masks(out, unwrap_variables(other.masks), len(states))
    return jax.tree.map(
        lambda x: jnp.ones((), bool) if isinstance(x, masked) else x,
        out,
        is_leaf=lambda x: isinstance(x, masked),
    )


def _merge_masks(a: Any, b: Any, n: int) -> Any:
    """Returns the masks keeping what both ``a`` and ``b`` keep.

    A ``MaskedNode`` (a subtree ``optax.masked`` or ``multi_transform`` kept
    from that pruning) takes the other tree's subtree there.
    """
    if isinstance(a, optax.MaskedNode):
        return b
    if isinstance(b, optax.MaskedNode):
        return a
    ca, da = jax.tree.flatten(a, is_leaf=lambda x: x is not a)
    cb, db = jax.tree.flatten(b, is_leaf=lambda x: x is not b)
    if jax.tree_util.treedef_is_leaf(da) and jax.tree_util.treedef_is_leaf(db):
        return jnp.logical_and(a, b)
    if da != db:
        raise ValueError(
            f"opt_state holds {n} pruning states over different trees, so their masks cannot "
            "be combined. Fix: read each one's masks from its own state "
            "(jp.transform.find_prune_states(opt_state)[i].masks)."
        )
    return jax.tree.unflatten(da, [_merge_masks(x, y, n) for x, y in zip(ca, cb, strict=True)])


def _nbytes(tree: Any) -> int:
    """Returns the bytes of ``tree``'s leaves (arrays or ``jax.ShapeDtypeStruct``s)."""
    total = 0
    for x in jax.tree.leaves(unwrap_variables(tree)):
        x = x if hasattr(x, "dtype") else jnp.asarray(x)
        total += math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
    return total


def state_bytes(opt_state: Any) -> dict[str, int]:
    """Returns the bytes of the pruning state and of the inner optimizer's state.

    ``{"pruning": b, "inner": i, "total": b + i}``: ``pruning`` counts the packed
    masks, step counter, criterion statistics and key of every
    :func:`~jaxprune.transform.prune` in ``opt_state``; ``inner`` all the rest (Adam's
    moments, ...). With a
    stateless criterion the pruning state is ``ceil(n / 8)`` bytes per prunable
    leaf of ``n`` entries, plus a few bytes per leaf.

    Args:
      opt_state: an optimizer state holding at least one pruning state (as for
        :func:`get_masks`); its leaves may be arrays or ``jax.ShapeDtypeStruct`` s.

    Raises:
      ValueError: ``opt_state`` holds no pruning state.

    Examples:
      >>> import jax.numpy as jnp, optax, jaxprune as jp
      >>> state = jp.prune(optax.adam(1e-3), sparsity=0.5).init({"w": jnp.ones((64, 64))})
      >>> b = jp.transform.state_bytes(state)
      >>> b["pruning"] <= 64 * 64 // 8 + 16, b["inner"] >= 2 * 64 * 64 * 4
      (True, True)
    """
    states = find_prune_states(opt_state)
    if not states:
        get_masks(opt_state)  # raises the explanatory error
    total = _nbytes(opt_state)
    # Each PruneState nests its inner state; count only its own fields.
    pruning = sum(_nbytes(s._replace(inner_state=())) for s in states)
    return {"pruning": pruning, "inner": total - pruning, "total": total}


def _looks_restored_plain(tree: Any) -> bool:
    """True when ``tree`` holds a dict with jp.prune's state keys (restored without a template)."""
    if isinstance(tree, dict):
        if "packed_masks" in tree and "inner_state" in tree:
            return True
        return any(_looks_restored_plain(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return any(_looks_restored_plain(v) for v in tree)
    return False
