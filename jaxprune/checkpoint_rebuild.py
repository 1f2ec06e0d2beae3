"""Trees back from a checkpoint: a template checked against the saved leaves and rebuilt.

The restore side of :mod:`jaxprune.checkpoint` (:mod:`jaxprune.checkpoint_trees`
writes the leaves): saved leaves are matched to a template's by path, checked for
dtype and shape, and returned in the template's containers and leaf kinds (PRNG
keys, numpy, Python scalars, sharded arrays); nnx objects are updated in place.
Without a template the leaves come back as nested dicts keyed by their paths.
"""

from __future__ import annotations

import pathlib
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprune._tree import leaves_with_paths, mirror_variables, path_str

__all__ = [
    "is_nnx_object",
    "as_state",
    "is_storable_leaf",
    "nest",
    "describe",
    "leaf_desc",
    "passes_through",
    "check_template",
    "masks_like",
    "like",
    "rebuild",
]


def is_nnx_object(x: Any) -> bool:
    """Returns whether ``x`` is an nnx ``Module`` or ``Optimizer`` (saved via ``nnx.state``)."""
    return isinstance(x, nnx.Pytree)


def as_state(x: Any) -> Any:
    """Returns ``nnx.state(x)`` for an nnx object, else ``x``."""
    return nnx.state(x) if is_nnx_object(x) else x


def is_storable_leaf(leaf: Any) -> bool:
    """Returns whether a checkpoint can hold ``leaf``: an array (or stand-in), number or string."""
    return hasattr(leaf, "dtype") or isinstance(leaf, (bool, int, float, complex, str, bytes))


def nest(paths: list[tuple], leaves: list[Any]) -> Any:
    """Returns nested dicts with ``leaves`` at ``paths``."""
    root: dict = {}
    for path, leaf in zip(paths, leaves, strict=True):
        if not path:
            return leaf
        node = root
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = leaf
    return root


def describe(spec: dict) -> str:
    """Returns ``dtype[shape]`` of a saved leaf (``key[shape]`` for PRNG keys)."""
    if "key_impl" in spec:  # raw key data has one trailing axis more than the keys
        return f"key{list(spec['shape'][:-1])}"
    return f"{spec['dtype']}{list(spec['shape'])}"


def leaf_desc(x: Any) -> str:
    """Returns ``dtype[shape]`` of a template leaf, comparable with :func:`describe`.

    A leaf no checkpoint can hold (a function, an object) is described by its type.
    """
    if not is_storable_leaf(x):
        return f"a {type(x).__name__} (not an array)"
    dtype = getattr(x, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return f"key{list(np.shape(x))}"
    dtype = np.result_type(x).name if dtype is None else jnp.dtype(dtype).name
    return f"{dtype}{list(np.shape(x))}"


# The numpy dtype kinds a Python scalar type stands for.
_KINDS = {"bool": "b", "int": "iu", "float": "f"}


def _python_saved_fits(spec: dict, x: Any) -> bool:
    """Whether a scalar array template leaf takes a leaf saved from a Python scalar.

    ``TrainState.create`` sets ``step=0``, a Python int numpy stores as int64,
    while the template built from a trained state has a JAX int32 there.
    """
    dtype = getattr(x, "dtype", None)
    if "python" not in spec or dtype is None or np.shape(x) != ():
        return False
    try:
        return np.dtype(dtype).kind in _KINDS[spec["python"]]
    except (TypeError, KeyError):
        return False


def _scalar_fits(x: Any, saved: str) -> bool:
    """Whether a Python-scalar template leaf takes the saved scalar ``saved`` (``dtype[]``).

    A Python ``int`` stands for any integer scalar (``TrainState.create`` sets
    ``step=0``, while the trained state's step is a JAX int32), a ``float``
    for any float, a ``bool`` for a bool; :func:`like` returns that Python type.
    """
    if isinstance(x, np.generic) or not isinstance(x, (bool, int, float)):
        return False
    dtype, _, shape = saved.partition("[")
    if shape != "]":
        return False
    try:
        return np.dtype(dtype).kind in _KINDS[type(x).__name__]
    except TypeError:
        return False


def _is_equinox_module(x: Any) -> bool:
    eqx = sys.modules.get("equinox")  # a template that is one has imported it
    return eqx is not None and isinstance(x, eqx.Module)


def passes_through(x: Any, equinox: bool) -> bool:
    """Whether a template leaf that the checkpoint lacks is handed back as it is.

    A checkpoint stores arrays only (:func:`jaxprune.checkpoint_trees.check_array`), so a
    function or object leaf of a template (an equinox module's activation) was never
    saved; nor, with ``equinox`` (the template is an ``eqx.Module``), a Python
    number such as ``eqx.nn.Dropout``'s ``p``, which
    ``eqx.filter(model, eqx.is_array)`` leaves out.

    Examples:
      >>> import jax, numpy as np
      >>> from jaxprune.checkpoint_rebuild import passes_through
      >>> passes_through(jax.nn.relu, False), passes_through(np.ones(2), True)
      (True, False)
      >>> passes_through(0.1, False), passes_through(0.1, True)
      (False, True)
    """
    return not is_storable_leaf(x) or (equinox and not hasattr(x, "dtype"))


def check_template(specs: list, template: Any, name: str, where: pathlib.Path):
    """Returns ``(flat, treedef, order)`` of ``template`` after checking it matches ``specs``.

    ``flat, treedef = leaves_with_paths(template)``; ``order[j]`` is the index in
    ``specs`` of the saved leaf for ``flat[j]``, or None for a template leaf the
    checkpoint lacks and :func:`passes_through` (an equinox module's functions).
    Saved leaves are matched to the template's by path, so the order of the
    leaves does not matter (an export, read without the model's code, stores a
    NamedTuple's or a dataclass's fields in sorted order).

    Raises:
      ValueError: listing the paths only in the checkpoint, only in the template,
        and those whose dtype or shape differ.
    """
    flat, treedef = leaves_with_paths(template)
    saved_paths = [path_str(tuple(s["path"])) for s in specs]
    equinox, saved_set = _is_equinox_module(template), set(saved_paths)
    # Kept from the template: leaves never saved (functions; an equinox module's numbers).
    passed = {
        j
        for j, (p, x) in enumerate(flat)
        if passes_through(x, equinox) and path_str(p) not in saved_set
    }
    flat_all, flat = flat, [f for j, f in enumerate(flat) if j not in passed]
    wanted_paths = [path_str(p) for p, _ in flat]
    saved = {k: describe(s) for k, s in zip(saved_paths, specs, strict=True)}
    wanted = {k: leaf_desc(x) for k, (_, x) in zip(wanted_paths, flat, strict=True)}
    only_saved = sorted(set(saved) - set(wanted))
    only_wanted = sorted(set(wanted) - set(saved))
    templ = {k: x for k, (_, x) in zip(wanted_paths, flat, strict=True)}
    by_path = dict(zip(saved_paths, specs, strict=True))
    differ = sorted(
        k
        for k in set(saved) & set(wanted)
        if saved[k] != wanted[k]
        and not _scalar_fits(templ[k], saved[k])
        and not _python_saved_fits(by_path[k], templ[k])
    )
    # A PackedMask's shape and axis live in the treedef, not in its bits: two
    # masks of other shapes can pack to bits of one shape.
    from jaxprune.checkpoint_trees import packed_mask_meta

    packed = packed_mask_meta(template)
    for k in sorted(set(saved) & set(wanted)):
        got = by_path[k].get("packed_mask")  # absent in steps saved before it was recorded
        if got is not None and k in packed and got != packed[k] and k not in differ:
            differ.append(k)
            saved[k] = f"bits of a packed bool{list(got[0])} mask"
            wanted[k] = f"bits of a packed bool{list(packed[k][0])} mask"
            if got[0] == packed[k][0]:  # same shape, another packed axis
                saved[k] += f" (axis {got[1]})"
                wanted[k] += f" (axis {packed[k][1]})"
    differ.sort()
    unique = len(saved) == len(saved_paths) and len(wanted) == len(wanted_paths)
    # Paths are unique in any real tree; if two leaves share a path string, only
    # their positions can tell them apart.
    order_ok = unique or saved_paths == wanted_paths
    if only_saved or only_wanted or differ or not order_ok:
        detail = []
        if only_saved:
            detail.append(f"only in the checkpoint: {', '.join(only_saved[:20])}")
        if only_wanted:
            detail.append(f"only in the template: {', '.join(only_wanted[:20])}")
        for k in differ[:20]:
            detail.append(f"{k}: checkpoint {saved[k]} vs template {wanted[k]}")
        if not detail:
            detail.append("leaves share a path and come in a different order")
        raise ValueError(
            f"the {name} template does not match the {name} saved in {where}; "
            + "; ".join(detail)
            + f". Fix: build the {name} template exactly as the saved run did (same model, "
            "optimizer and jp.prune settings), or pass no template to get nested dicts."
        )
    if unique:
        index = {k: i for i, k in enumerate(saved_paths)}
        kept = iter([index[k] for k in wanted_paths])
    else:
        kept = iter(range(len(specs)))
    order = [None if j in passed else next(kept) for j in range(len(flat_all))]
    return flat_all, treedef, order


def masks_like(template: Any, masks_by_path: dict[str, np.ndarray]) -> Any:
    """Returns the masks in ``template``'s structure, or None unless they cover its leaves.

    Every template leaf needs a mask, but for a leaf :func:`passes_through`,
    which gets None (as in ``eqx.filter(model, eqx.is_array)``); every mask
    must sit at a template leaf.

    Examples:
      >>> import jax, numpy as np
      >>> from jaxprune.checkpoint_rebuild import masks_like
      >>> masks_like({"w": np.ones(2), "act": jax.nn.relu}, {"w": np.array([True, False])})
      {'act': None, 'w': Array([ True, False], dtype=bool)}
      >>> masks_like({"w": np.ones(2), "b": np.ones(2)}, {"w": np.array([True, False])}) is None
      True
    """
    target = as_state(template)
    flat, treedef = leaves_with_paths(target)
    equinox = _is_equinox_module(target)
    out, used = [], 0
    for p, x in flat:
        m = masks_by_path.get(path_str(p))
        if m is not None:
            out.append(jnp.asarray(m))
            used += 1
        elif passes_through(x, equinox):
            out.append(None)
        else:
            return None
    if used != len(masks_by_path):
        return None
    return mirror_variables(target, jax.tree.unflatten(treedef, out))


def like(template: Any, x: np.ndarray, spec: dict) -> Any:
    """Returns ``x`` as the template leaf's kind: key, numpy, Python scalar or sharded array."""
    if "key_impl" in spec:
        return jax.random.wrap_key_data(jnp.asarray(x), impl=spec["key_impl"])
    if isinstance(template, bool | int | float | complex):
        return type(template)(x.item())
    if "python" in spec and getattr(template, "dtype", None) is not None:
        x = _cast_scalar(x, np.dtype(template.dtype), spec)
    if isinstance(template, np.generic):
        return x.reshape(()).astype(template.dtype)[()]  # a NumPy scalar, as the template
    if isinstance(template, np.ndarray):
        return x.reshape(np.shape(template))
    sharding = getattr(template, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding) and isinstance(
        sharding.mesh, jax.sharding.AbstractMesh
    ):
        sharding = _concrete(sharding, spec)
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.device_put(x, sharding)
    return jnp.asarray(x)


def _cast_scalar(x: np.ndarray, dtype: np.dtype, spec: dict) -> np.ndarray:
    """Returns a leaf saved from a Python scalar in the template's ``dtype``, value checked."""
    with np.errstate(over="ignore", invalid="ignore"):
        y = x.astype(dtype)
    # A float rounds (0.1 in float32); an int must keep its value, a finite float stay finite.
    lost = np.isfinite(x).all() and not np.isfinite(y).all() if dtype.kind == "f" else y != x
    if lost:
        raise ValueError(
            f"the checkpoint's {path_str(tuple(spec['path']))!r} was saved as the Python "
            f"{spec['python']} {x.item()!r}, which the template's {dtype.name} cannot hold "
            f"({y.item()!r}). Fix: use a wider dtype in the template for this leaf."
        )
    return y


def _concrete(sharding: Any, spec: dict) -> Any:
    """Returns ``sharding`` on the mesh set with ``jax.sharding.set_mesh``, for an abstract one.

    ``jax.eval_shape`` on arrays of an Explicit mesh gives shardings on an
    ``AbstractMesh``, which has no devices to put the restored leaf on.
    """
    mesh = jax.sharding.get_mesh()
    if getattr(mesh, "empty", True) or mesh.shape_tuple != sharding.mesh.shape_tuple:
        raise ValueError(
            f"the template of {path_str(tuple(spec['path']))!r} is sharded on an abstract mesh "
            f"{dict(sharding.mesh.shape)} (jax.eval_shape of arrays on an Explicit mesh), which "
            "has no devices. Fix: restore inside `with jax.sharding.set_mesh(mesh):` with the "
            "mesh the arrays live on, or pass templates with concrete shardings."
        )
    return jax.sharding.NamedSharding(mesh, sharding.spec)


def rebuild(specs, leaves, template, name, where):
    """Returns ``leaves`` in ``template``'s structure (nnx objects updated in place).

    Saved leaves are matched to the template's by path, in whatever order each
    lists them; template leaves never saved (an equinox module's functions, see
    :func:`passes_through`) are handed back as they are, so a whole equinox
    module restores as the module. Without a template: nested dicts keyed by
    the saved paths.
    """
    if template is None:
        keys = [
            jax.random.wrap_key_data(jnp.asarray(x), impl=s["key_impl"]) if "key_impl" in s else x
            for x, s in zip(leaves, specs, strict=True)
        ]
        return nest([tuple(s["path"]) for s in specs], keys)
    target = as_state(template)
    flat, treedef, order = check_template(specs, target, name, where)
    new = [
        t if i is None else like(t, leaves[i], specs[i])
        for (_, t), i in zip(flat, order, strict=True)
    ]
    out = mirror_variables(target, jax.tree.unflatten(treedef, new))
    if is_nnx_object(template):
        nnx.update(template, out)
    return out
