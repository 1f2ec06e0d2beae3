"""Explicit-sharding helpers of the exact searches (:mod:`jaxprune._search`).

On arrays whose type carries Explicit mesh axes (sharding in types, the
default of ``jax.make_mesh``), the searches and selections run with those
axes made Auto and only their results typed again: :func:`_explicit_axes`
finds such axes in a tree, :func:`_on_auto_axes` runs a function under
``jax.sharding.auto_axes``, and :func:`_replicated`,
:func:`_sharding_or_replicated` and :func:`_placed_like` give the results'
shardings. :mod:`jaxprune._search` re-exports them for the modules that
import them from there.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

# Explicit sharding ("sharding in types", the default axis type of
# ``jax.make_mesh``) types every array with its sharding, and then rejects the
# reshapes that split a sharded axis into runs (:func:`_split_runs`) and the
# cumulative sum over the boundary row in :func:`_last_tied` unless their
# output shardings are spelled out. The searches are written to be
# sharding-safe already (reductions, never a gather of a whole leaf), so on
# such arrays they run as they do on an Auto mesh: under
# ``jax.sharding.auto_axes``, with only the results typed again.
# https://docs.jax.dev/en/latest/notebooks/explicit-sharding.html


def _explicit_axes(tree: Any) -> tuple[Any, tuple[str, ...]] | None:
    """Returns ``(mesh, names)`` of the Explicit mesh axes typing an array of ``tree``, or None.

    ``None`` (the common case: one device, or a ``Mesh`` with Auto axes)
    leaves every caller on its unchanged code path.
    """
    for x in jax.tree.leaves(tree):
        if not isinstance(x, jax.Array):  # tracers are jax.Array instances too
            continue
        mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
        if mesh is None or not getattr(mesh, "axis_types", None):
            continue
        pairs = zip(mesh.axis_names, mesh.axis_types, strict=True)
        names = tuple(n for n, t in pairs if t == AxisType.Explicit)
        if names:
            return mesh, names
    return None


def _replicated(mesh: Any) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _sharding_or_replicated(x: Any, mesh: Any) -> Any:
    """Returns the sharding in the abstract type ``x``, replicated on ``mesh`` if it has none."""
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding) and not sharding.mesh.empty:
        return sharding
    return _replicated(mesh)


def _placed_like(masks: Any, scores: Any) -> Any:
    """Returns concrete ``masks`` placed like the leaves of ``scores`` sharded over devices.

    A mask computed eagerly from sharded scores (broadcast from a keep-vector,
    or drawn on one device) would otherwise sit replicated or on one device.
    """
    m_flat, treedef = jax.tree.flatten(masks)
    s_flat = jax.tree.leaves(scores)
    if len(m_flat) != len(s_flat):
        return masks
    out = []
    for m, x in zip(m_flat, s_flat, strict=True):
        if (
            isinstance(x, jax.Array)
            and isinstance(m, jax.Array)
            and not isinstance(x, jax.core.Tracer)
            and not isinstance(m, jax.core.Tracer)
            and m.shape == x.shape
            and len(x.sharding.device_set) > 1
            and m.sharding != x.sharding
        ):
            m = jax.device_put(m, x.sharding)
        out.append(m)
    return jax.tree.unflatten(treedef, out)


def _on_auto_axes(f, axes: tuple[str, ...], out_sharding: Any, *args: Any) -> Any:
    """Returns ``f(*args)`` run with the mesh ``axes`` Auto, the results typed ``out_sharding``.

    ``jax.sharding.auto_axes`` drops ``axes`` from the inputs' types, so
    ``f`` is traced as on a ``Mesh`` with Auto axes (XLA's partitioner places
    its intermediates), and reshards the results to ``out_sharding``. Used
    only when the inputs carry Explicit axes (:func:`_explicit_axes`).
    """
    return jax.sharding.auto_axes(f, axes=axes, out_sharding=out_sharding)(*args)
