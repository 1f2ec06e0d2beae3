"""Trees in checkpoints: any pytree as path-keyed leaf specs, rebuilt from a template.

The storage side of :mod:`jaxprune.checkpoint`: leaves are written by path
(``leaves_with_paths``), never by container type, so optimizer and pruning
states travel as opaque trees and come back in the template's containers.
"""

from __future__ import annotations

import functools
import pathlib
import sys
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprune import packing
from jaxprune._tree import _normalize, is_variable, leaves_with_paths, path_str

__all__ = [
    "is_nnx_object",
    "as_state",
    "host",
    "check_array",
    "check_storable",
    "check_unique_paths",
    "is_storable_leaf",
    "reroot_masks",
    "mask_lookup",
    "masked_negative_zeros",
    "variable_kinds",
    "encode_tree",
    "encode_masks",
    "nest",
    "check_template",
    "passes_through",
    "masks_like",
    "like",
    "rebuild",
]


def is_nnx_object(x: Any) -> bool:
    """Returns whether ``x`` is an nnx ``Module`` or ``Optimizer`` (saved via ``nnx.state``)."""
    return isinstance(x, nnx.Pytree)


def host(x: Any) -> tuple[np.ndarray, str | None]:
    """Returns ``x`` as a numpy array (PRNG keys as their raw data) and the key impl name."""
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(x)), str(jax.random.key_impl(x))
    return np.asarray(jax.device_get(x)), None


@functools.lru_cache(maxsize=64)
def _storable(dtype: np.dtype) -> bool:
    try:
        import tensorstore
    except ImportError:  # pragma: no cover - orbax depends on it
        return True
    if dtype.fields is not None:  # structured
        return False
    try:
        tensorstore.dtype(dtype.name)
    except (ValueError, TypeError):
        return False
    return True


def is_storable_leaf(leaf: Any) -> bool:
    """Returns whether a checkpoint can hold ``leaf``: an array (or stand-in), number or string."""
    return hasattr(leaf, "dtype") or isinstance(leaf, (bool, int, float, complex, str, bytes))


def check_array(leaf: Any, path: tuple, name: str) -> None:
    """Raises ``ValueError`` when ``leaf`` is no array, number or string (a function, an object).

    ``np.asarray`` would make it an object array, and the dtype advice of
    :func:`check_storable` cannot apply to it. An unfiltered equinox module
    holds its activation functions as leaves.

    Examples:
      >>> from jaxprune.checkpoint_trees import check_array
      >>> check_array(lambda x: x, ("activation",), "params")
      Traceback (most recent call last):
        ...
      ValueError: params leaf 'activation' is a function, not an array: ...
    """
    if is_storable_leaf(leaf):
        return
    raise ValueError(
        f"{name} leaf {path_str(path)!r} is a {type(leaf).__name__}, not an array: a checkpoint "
        f"stores arrays only (the model's code rebuilds the rest). Fix: save the arrays only. "
        f"For an equinox module: arrays = eqx.filter(model, eqx.is_array); save(d, step, "
        f"arrays); to resume, restore(d, params=model) returns the module (its functions "
        f"taken from the template), or ckpt = restore(d, params=arrays) and model = "
        f"eqx.combine(ckpt.params, model). Otherwise leave that leaf out of {name}."
    )


def check_storable(x: np.ndarray, path: tuple, name: str) -> None:
    """Raises ``ValueError`` unless orbax (tensorstore) can write ``x``'s dtype.

    Checked before a save starts: orbax refuses such an array only once its
    asynchronous writes of the other leaves are under way. Leaves that are no
    arrays at all are refused first, by :func:`check_array`.
    """
    if not _storable(x.dtype):
        raise ValueError(
            f"{name} leaf {path_str(path)!r} has dtype {x.dtype}, which orbax (tensorstore) "
            "cannot store. Fix: cast that leaf to a numeric dtype (e.g. int8, float32) or "
            f"leave it out of {name}."
        )


def check_unique_paths(flat: list[tuple[tuple, Any]], name: str) -> None:
    """Raises ``ValueError`` when two leaves of ``flat`` share a path string.

    A checkpoint keys every leaf by its path string, so ``{"enc/dense": ...}``
    next to ``{"enc": {"dense": ...}}`` (or a key ``"0"`` next to an index
    ``0``) would be written as one path twice, a step that restore must refuse.
    Checked before anything is written.
    """
    seen: dict[str, tuple] = {}
    for path, _ in flat:
        key = path_str(path)
        if key in seen:
            first = seen[key]
            slashed = [str(k) for k in (*first, *path) if "/" in str(k)]
            how = (
                f"rename the key {slashed[0]!r} (e.g. replace '/' by '.' or '~')"
                if slashed
                else "rename one of the keys (a str key and an int index that read the same)"
            )
            raise ValueError(
                f"{name} leaves {first!r} and {path!r} have the same path string {key!r}, "
                f"under which a checkpoint stores each leaf, so that step could never be "
                f"restored. Fix: {how} before saving."
            )
        seen[key] = path


def variable_kinds(tree: Any) -> dict[str, dict]:
    """Returns ``{"var": type name, "param": bool}`` of each nnx Variable of ``tree``, by path.

    Saved in each leaf's spec, so that a reader without the model's code
    (``jaxprune inspect``) can tell the parameters (``nnx.Param`` and its
    subclasses) from the other state of a module: BatchNorm statistics, RNG
    keys and counters. A tree without Variables (a linen dict) gives ``{}``.

    Examples:
      >>> from flax import nnx
      >>> from jaxprune.checkpoint_trees import variable_kinds
      >>> bn = nnx.BatchNorm(2, rngs=nnx.Rngs(0))
      >>> variable_kinds(nnx.state(bn))["mean"]
      {'var': 'BatchStat', 'param': False}
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_variable)
    return {
        path_str(_normalize(p)): {"var": type(x).__name__, "param": isinstance(x, nnx.Param)}
        for p, x in flat
        if is_variable(x)
    }


def _kind_of(kinds: dict[str, dict], path: tuple) -> dict | None:
    # A Variable holding a pytree (not one array) covers every leaf below it.
    for n in range(len(path), -1, -1):
        kind = kinds.get(path_str(path[:n]))
        if kind is not None:
            return kind
    return None


def encode_tree(
    tree: Any,
    masks: dict[str, Any] | None,
    compress: bool,
    name: str = "params",
    kinds: dict[str, dict] | None = None,
) -> tuple[dict, list, dict]:
    """Returns ``(arrays, specs, hosts)`` of ``tree``: orbax-ready packed arrays.

    ``specs`` has one JSON-able entry per leaf (path, shape, dtype, encoding,
    CRC-32, and for an nnx Variable its type, see :func:`variable_kinds`);
    ``hosts`` the host copy of each non-key leaf by path string. ``kinds``
    gives the Variable types by path where ``tree`` has lost them (an export
    of a checkpoint read without the model's code).

    Raises:
      ValueError: a leaf is no array (a function), its dtype cannot be stored,
        or two leaves share a path string (both named with their paths).

    Examples:
      >>> import numpy as np
      >>> from jaxprune.checkpoint_trees import encode_tree
      >>> encode_tree({"enc/dense": np.ones(2), "enc": {"dense": np.ones(2)}}, None, False)
      Traceback (most recent call last):
        ...
      ValueError: params leaves ('enc', 'dense') and ('enc/dense',) have the same path ...
    """
    flat, _ = leaves_with_paths(tree)
    check_unique_paths(flat, name)
    for path, leaf in flat:
        check_array(leaf, path, name)
    kinds = {**(kinds or {}), **variable_kinds(tree)}
    arrays, specs, hosts = {}, [], {}
    for i, (path, leaf) in enumerate(flat):
        x, impl = host(leaf)
        check_storable(x, path, name)
        if impl is None:
            hosts[path_str(path)] = x
        if compress:
            # A PRNG key is stored as its raw data, with a trailing axis its mask lacks.
            mask = None if masks is None or impl is not None else masks.get(path_str(path))
            packed, spec = packing.pack_leaf(x, mask)
        else:
            packed = {"values": x}
            spec = {"kind": "dense", "shape": list(x.shape), "dtype": x.dtype.name}
            spec["crc32"] = packing.crc32(x)
        spec["path"] = list(path)
        spec["arrays"] = {k: [list(v.shape), v.dtype.name] for k, v in packed.items()}
        if impl is not None:
            spec["key_impl"] = impl
        kind = _kind_of(kinds, path)
        if kind is not None:
            spec.update(kind)
        if _is_python_scalar(leaf):
            # numpy stores a Python int as int64; a JAX template of the same
            # leaf (a traced step counter) is int32. Noting it lets it match.
            spec["python"] = type(leaf).__name__
        # Orbax refuses zero-size arrays; their shape in the spec is enough.
        kept = {k: v for k, v in packed.items() if v.size}
        if kept:
            arrays[f"a{i:05d}"] = kept
        specs.append(spec)
    return arrays, specs, hosts


def _parts(path: tuple) -> tuple[str, ...]:
    return tuple(str(k) for k in path)


def reroot_masks(masks: Any, params: Any) -> Any:
    """Returns ``masks``, or ``{"params": masks}`` when they are masks of linen variables' params.

    Inside a linen ``TrainState``, ``jp.prune`` sees the ``"params"`` collection
    alone, so ``jp.get_masks(state.opt_state)`` names ``Conv_0/kernel``; the
    variables saved with their BatchNorm statistics (``{"params": ...,
    "batch_stats": ...}``) hold that leaf at ``params/Conv_0/kernel``. When
    ``params`` is a mapping with a ``"params"`` key and every mask leaf sits
    under ``params["params"]`` (and not at its own path of ``params``), the
    masks are re-rooted there and the other collections get no mask, as
    :func:`jaxprune.structure.select` matches groups found on the variables.

    Examples:
      >>> import numpy as np
      >>> from jaxprune.checkpoint_trees import reroot_masks
      >>> variables = {"params": {"w": np.ones(2)}, "batch_stats": {"mean": np.zeros(2)}}
      >>> reroot_masks({"w": np.array([True, False])}, variables)
      {'params': {'w': array([ True, False])}}
      >>> reroot_masks({"params": {"w": True}}, variables)  # already at their paths
      {'params': {'w': True}}
    """
    if not isinstance(params, Mapping) or "params" not in params:
        return masks
    m_paths = [_parts(p) for p, _ in leaves_with_paths(masks)[0]]
    if not m_paths:
        return masks
    # A mask sits at a params leaf or stands (as a scalar) for a subtree: any prefix.
    p_paths = [_parts(p) for p, _ in leaves_with_paths(params)[0]]
    prefixes = {ks[:n] for ks in p_paths for n in range(len(ks) + 1)}
    if all(p in prefixes for p in m_paths) or not all(("params", *p) in prefixes for p in m_paths):
        return masks
    return {"params": masks}


def mask_lookup(masks: Any, params: Any, fix: str | None = None) -> dict[str, np.ndarray]:
    """Returns the bool mask of each params leaf it covers, by path string, after checking.

    A mask leaf must sit at a params leaf's path and be a scalar or of that
    leaf's shape, or be a scalar standing for a whole params subtree (what
    ``jp.get_masks`` gives for a subtree ``optax.masked`` leaves out); such a
    prefix mask is spread over the leaves below it. Params leaves without a
    mask are fine. Float or int masks are cast to bool. Masks over linen
    variables' ``"params"`` collection are re-rooted by the caller
    (:func:`reroot_masks`), so that the masks recorded sit at the same paths.

    Raises:
      ValueError: naming ``masks``, the leaf path, both shapes and ``fix`` (by
        default: pass ``jp.get_masks(opt_state)``); or two leaves of ``params``
        (or of ``masks``) share a path string.
    """
    p_flat, _ = leaves_with_paths(params)
    check_unique_paths(p_flat, "params")
    m_flat, _ = leaves_with_paths(masks)
    check_unique_paths(m_flat, "masks")
    shapes = {path_str(p): tuple(np.shape(x)) for p, x in p_flat}
    parts = {path_str(p): _parts(p) for p, _ in p_flat}
    fix = fix or (
        "Fix: pass the masks of these params, e.g. masks=jp.get_masks(opt_state) of the "
        "jp.prune state that pruned them (a mask is a bool scalar or has its leaf's shape)."
    )
    out: dict[str, np.ndarray] = {}
    for path, m in m_flat:
        key = path_str(path)
        try:
            m = np.asarray(jax.device_get(m), bool)
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"masks leaf {key!r} is not a bool array ({type(m).__name__}: {e}). {fix}"
            ) from None
        if key in shapes:
            if m.ndim and m.shape != shapes[key]:
                raise ValueError(
                    f"masks leaf {key!r} has shape {m.shape} but the params leaf {key!r} has "
                    f"shape {shapes[key]}. {fix}"
                )
            out[key] = m
            continue
        prefix = _parts(path)
        below = [k for k, ks in parts.items() if ks[: len(prefix)] == prefix]
        if not below:
            raise ValueError(
                f"masks leaf {key!r} (shape {m.shape}) matches no params leaf (params' "
                f"leaves: {', '.join(sorted(shapes)[:10]) or 'none'}). {fix}"
            )
        if m.ndim:
            raise ValueError(
                f"masks leaf {key!r} has shape {m.shape} but stands for the params subtree "
                f"{key!r} (leaves {', '.join(below[:5])}); only a scalar mask may stand for "
                f"a subtree. {fix}"
            )
        for k in below:
            out.setdefault(k, m)
    return out


def masked_negative_zeros(
    hosts: dict[str, np.ndarray], mask_by_path: dict[str, np.ndarray]
) -> list[tuple[str, int, int, int, int]]:
    """Returns ``(path, count, masked_out, nbytes, nbytes_clean)`` of each leaf with ``-0.0``
    where its mask is False.

    The compressed format drops an entry outside the mask only if its bits are
    all zero, so that a restore is bitwise: a ``-0.0`` (left by masking through
    a multiplication, ``w * mask``, where a negative weight was pruned) is kept
    as a value. ``nbytes`` is the leaf's packed size as it is, ``nbytes_clean``
    with those entries ``+0.0`` (what :func:`jaxprune.apply_masks` writes).

    Examples:
      >>> import numpy as np
      >>> from jaxprune.checkpoint_trees import masked_negative_zeros
      >>> w = np.array([[-1.0, 2.0, -3.0, 4.0]], np.float32)
      >>> m = np.array([[False, True, False, True]])
      >>> masked_negative_zeros({"w": w * m}, {"w": m})  # the two pruned entries are -0.0
      [('w', 2, 2, 16, 9)]
    """
    out = []
    for key, m in mask_by_path.items():
        x = hosts.get(key)
        if x is None or not x.size or not jnp.issubdtype(x.dtype, jnp.inexact):
            continue
        masked_out = ~np.broadcast_to(m, x.shape)
        neg = masked_out & (x == 0) & packing.support(x)  # == 0 with nonzero bits: -0.0
        n = int(np.count_nonzero(neg))
        if n:
            clean = np.where(neg, np.zeros((), x.dtype), x)
            out.append(
                (
                    key,
                    n,
                    int(np.count_nonzero(masked_out)),
                    packing.packed_nbytes(x, m),
                    packing.packed_nbytes(clean, m),
                )
            )
    return out


def encode_masks(masks: Any, params: dict[str, np.ndarray]) -> tuple[dict, list]:
    """Returns ``(arrays, specs)`` of ``masks``: packed bits only where they are needed.

    A scalar mask is stored in its spec; a mask equal to the support of the
    params leaf at its path costs nothing (it is rebuilt from the restored leaf);
    an empty mask needs no bits (orbax refuses zero-size arrays).
    """
    flat, _ = leaves_with_paths(masks)
    arrays, specs = {}, []
    for i, (path, m) in enumerate(flat):
        m = np.asarray(jax.device_get(m), bool)
        spec: dict[str, Any] = {"path": list(path), "shape": list(m.shape)}
        p = params.get(path_str(path))
        if m.ndim == 0:
            spec.update(kind="scalar", value=bool(m))
        elif p is not None and p.shape == m.shape and np.array_equal(packing.support(p), m):
            spec["kind"] = "support"  # rebuilt from the restored param
        else:
            spec["kind"] = "bits"
            if m.size:
                arrays[f"m{i:05d}"] = {"bits": np.packbits(m.reshape(-1))}
        specs.append(spec)
    return arrays, specs


def as_state(x: Any) -> Any:
    """Returns ``nnx.state(x)`` for an nnx object, else ``x``."""
    return nnx.state(x) if is_nnx_object(x) else x


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


def _is_python_scalar(x: Any) -> bool:
    return isinstance(x, bool | int | float) and not isinstance(x, np.generic)


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

    A checkpoint stores arrays only (:func:`check_array`), so a function or
    object leaf of a template (an equinox module's activation) was never
    saved; nor, with ``equinox`` (the template is an ``eqx.Module``), a Python
    number such as ``eqx.nn.Dropout``'s ``p``, which
    ``eqx.filter(model, eqx.is_array)`` leaves out.

    Examples:
      >>> import jax, numpy as np
      >>> from jaxprune.checkpoint_trees import passes_through
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
      >>> from jaxprune.checkpoint_trees import masks_like
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
    return jax.tree.unflatten(treedef, out) if used == len(masks_by_path) else None


def like(template: Any, x: np.ndarray, spec: dict) -> Any:
    """Returns ``x`` as the template leaf's kind: key, numpy, Python scalar or sharded array."""
    if "key_impl" in spec:
        return jax.random.wrap_key_data(jnp.asarray(x), impl=spec["key_impl"])
    if isinstance(template, np.ndarray | np.generic):
        return x.reshape(np.shape(template))
    if isinstance(template, bool | int | float | complex):
        return type(template)(x.item())
    if "python" in spec and getattr(template, "dtype", None) is not None:
        x = _cast_scalar(x, np.dtype(template.dtype), spec)
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
    out = jax.tree.unflatten(treedef, new)
    if is_nnx_object(template):
        nnx.update(template, out)
    return out
