"""Applying masks to params, and reading a mask tree against the params' tree.

:func:`apply_masks` zeroes the pruned entries; the helpers check a mask tree
against the params it masks (dtype, shape, non-array leaves) and spread the
scalar masks that stand for whole subtrees (:func:`_broadcast_prefix`, which
``jp.report`` and the drivers read masks through too). Re-exported from
:mod:`jaxprune.masks`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune._tree import check_same_structure, leaves_with_paths, mirrors_variables, path_str
from jaxprune.bitmask import _has_packed


@mirrors_variables
def apply_masks(params: Any, masks: Any) -> Any:
    """Returns ``params`` with masked-out entries set to exactly zero (dtype kept).

    A leaf whose mask is a concrete scalar ``True`` (what the selections give
    the leaves ``where`` does not choose) is returned as it is, not as a JAX
    array: an equinox module's ``int`` field stays an ``int`` (``eqx.filter_jit``
    would otherwise trace it), and a ``str`` or function leaf passes through. A
    traced mask (under ``jax.jit``) is applied as usual.

    Args:
      params: a pytree of arrays (nnx ``Variable`` s are unwrapped, and the result
        is wrapped in copies of them); non-array leaves are allowed where the mask
        is ``True``.
      masks: bool masks with the structure of ``params`` (``True`` keeps an entry):
        per leaf an array of the leaf's shape or a scalar; a scalar may also stand
        for a whole subtree (as ``jp.get_masks`` gives under ``optax.masked``).
        Packed masks (:class:`~jaxprune.masks.PackedMask` leaves) are rejected:
        unpack them first.

    Raises:
      ValueError: the trees differ (the message lists the differing paths); a
        mask is not bool or does not fit its leaf's shape; a leaf that is not an
        array or a number (a ``str``, a function) has a mask other than ``True``.

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> jp.apply_masks({"w": jnp.array([1., 2.])}, {"w": jnp.array([True, False])})["w"].tolist()
      [1.0, 0.0]
      >>> jp.apply_masks({"w": jnp.ones(2), "heads": 2}, {"w": jnp.ones(2, bool), "heads": True})
      {'heads': 2, 'w': Array([1., 1.], dtype=float32)}
    """
    if _has_packed(masks):
        raise ValueError(
            "masks are packed (PackedMask leaves, e.g. a PruneState's packed_masks). Fix: pass "
            "jp.masks.unpack(masks), state.masks or jp.get_masks(opt_state)."
        )
    masks = _broadcast_prefix(params, masks)
    check_same_structure(params, masks, ref_name="params", other_name="masks")
    flat_p, treedef = leaves_with_paths(params)
    flat_m, _ = leaves_with_paths(masks)
    out = []
    for (path, p), (_, m) in zip(flat_p, flat_m, strict=True):
        if _keeps_whole(m):
            out.append(p)  # nothing pruned: no copy, and a Python int stays an int
            continue
        m = jnp.asarray(m)
        if m.dtype != jnp.bool_:
            raise ValueError(
                f"mask for {path_str(path)!r} has dtype {m.dtype}, not bool: True keeps an "
                "entry and False prunes it, and other values would be read as truthiness. "
                "Fix: pass bool masks, e.g. m > 0 for a 0/1 float mask."
            )
        if not (hasattr(p, "dtype") or isinstance(p, (int, float, complex, bool))):
            raise ValueError(
                f"params leaf {path_str(path)!r} is a {type(p).__name__}, not an array, but its "
                f"mask is {_mask_desc(m)}, not True: only arrays can be pruned. Fix: give it "
                "the mask True (jp.masks' selections do for the leaves `where` does not "
                "choose), or pass the arrays only, e.g. eqx.filter(model, "
                "eqx.is_inexact_array) for an equinox module."
            )
        if m.ndim and m.shape != jnp.shape(p):
            raise ValueError(
                f"mask for {path_str(path)!r} has shape {m.shape} but the parameter has "
                f"shape {jnp.shape(p)}. Fix: masks must mirror params leaf by leaf (a scalar "
                "True keeps a whole leaf)."
            )
        out.append(jnp.where(m, p, jnp.zeros((), jnp.result_type(p))))
    return jax.tree.unflatten(treedef, out)


def _keeps_whole(m: Any) -> bool:
    """Whether mask ``m`` is a concrete scalar bool ``True`` (a traced one is not known to be)."""
    if isinstance(m, jax.core.Tracer) or np.ndim(m) != 0:
        return False
    if isinstance(m, (bool, np.bool_)):
        return bool(m)
    return getattr(m, "dtype", None) == np.bool_ and bool(m)


def _mask_desc(m: jax.Array) -> str:
    if isinstance(m, jax.core.Tracer):
        return f"a traced bool{list(m.shape)}"
    return "False" if m.ndim == 0 else f"a bool{list(m.shape)} mask"


def _broadcast_prefix(params: Any, masks: Any) -> Any:
    """Spreads scalar masks that stand for whole subtrees of ``params`` over their leaves.

    ``jp.get_masks`` of a ``jp.prune`` under ``optax.masked`` has one scalar
    ``True`` where ``optax.masked`` left a whole subtree out. Masks that are not
    such a prefix of ``params`` are returned as they are (and then rejected).
    """
    if jax.tree.structure(masks) == jax.tree.structure(params):
        return masks

    def spread(m, sub):
        if jnp.ndim(m) and not hasattr(sub, "shape"):
            raise ValueError("only a scalar mask may stand for a subtree")
        return jax.tree.map(lambda _: m, sub)

    try:
        return jax.tree.map(spread, masks, params)
    except (ValueError, TypeError):
        return masks
