"""Trees in checkpoints: any pytree as path-keyed leaf specs, rebuilt from a template.

The storage side of :mod:`jaxprune.checkpoint`: leaves are written by path
(``leaves_with_paths``), never by container type, so optimizer and pruning
states travel as opaque trees and come back in the template's containers.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprune import packing
from jaxprune._tree import leaves_with_paths, path_str

__all__ = [
    "is_nnx_object",
    "as_state",
    "host",
    "encode_tree",
    "encode_masks",
    "nest",
    "check_template",
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


def encode_tree(tree: Any, masks: dict[str, Any] | None, compress: bool) -> tuple[dict, list, dict]:
    """Returns ``(arrays, specs, hosts)`` of ``tree``: orbax-ready packed arrays.

    ``specs`` has one JSON-able entry per leaf (path, shape, dtype, encoding,
    CRC-32); ``hosts`` the host copy of each non-key leaf by path string.
    """
    flat, _ = leaves_with_paths(tree)
    arrays, specs, hosts = {}, [], {}
    for i, (path, leaf) in enumerate(flat):
        x, impl = host(leaf)
        if impl is None:
            hosts[path_str(path)] = x
        if compress:
            mask = None if masks is None else masks.get(path_str(path))
            packed, spec = packing.pack_leaf(x, mask)
        else:
            packed = {"values": x}
            spec = {"kind": "dense", "shape": list(x.shape), "dtype": x.dtype.name}
            spec["crc32"] = packing.crc32(x)
        spec["path"] = list(path)
        spec["arrays"] = {k: [list(v.shape), v.dtype.name] for k, v in packed.items()}
        if impl is not None:
            spec["key_impl"] = impl
        # Orbax refuses zero-size arrays; their shape in the spec is enough.
        kept = {k: v for k, v in packed.items() if v.size}
        if kept:
            arrays[f"a{i:05d}"] = kept
        specs.append(spec)
    return arrays, specs, hosts


def encode_masks(masks: Any, params: dict[str, np.ndarray]) -> tuple[dict, list]:
    """Returns ``(arrays, specs)`` of ``masks``: packed bits only where they are needed.

    A scalar mask is stored in its spec; a mask equal to the support of the
    params leaf at its path costs nothing (it is rebuilt from the restored leaf).
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
    """Returns ``dtype[shape]`` of a template leaf, comparable with :func:`describe`."""
    dtype = getattr(x, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return f"key{list(np.shape(x))}"
    dtype = np.result_type(x).name if dtype is None else jnp.dtype(dtype).name
    return f"{dtype}{list(np.shape(x))}"


def check_template(specs: list, template: Any, name: str, where: pathlib.Path):
    """Returns ``leaves_with_paths(template)`` after checking it matches the saved ``specs``.

    Raises:
      ValueError: listing the paths only in the checkpoint, only in the template,
        and those whose dtype or shape differ.
    """
    flat, treedef = leaves_with_paths(template)
    saved = {path_str(tuple(s["path"])): describe(s) for s in specs}
    wanted = {path_str(p): leaf_desc(x) for p, x in flat}
    only_saved = sorted(set(saved) - set(wanted))
    only_wanted = sorted(set(wanted) - set(saved))
    differ = sorted(k for k in set(saved) & set(wanted) if saved[k] != wanted[k])
    order = [path_str(tuple(s["path"])) for s in specs] == [path_str(p) for p, _ in flat]
    if only_saved or only_wanted or differ or not order:
        detail = []
        if only_saved:
            detail.append(f"only in the checkpoint: {', '.join(only_saved[:20])}")
        if only_wanted:
            detail.append(f"only in the template: {', '.join(only_wanted[:20])}")
        for k in differ[:20]:
            detail.append(f"{k}: checkpoint {saved[k]} vs template {wanted[k]}")
        if not detail:
            detail.append("same leaves in a different order")
        raise ValueError(
            f"the {name} template does not match the {name} saved in {where}; "
            + "; ".join(detail)
            + f". Fix: build the {name} template exactly as the saved run did (same model, "
            "optimizer and jp.prune settings), or pass no template to get nested dicts."
        )
    return flat, treedef


def like(template: Any, x: np.ndarray, spec: dict) -> Any:
    """Returns ``x`` as the template leaf's kind: key, numpy, Python scalar or sharded array."""
    if "key_impl" in spec:
        return jax.random.wrap_key_data(jnp.asarray(x), impl=spec["key_impl"])
    if isinstance(template, np.ndarray | np.generic):
        return x.reshape(np.shape(template))
    if isinstance(template, bool | int | float | complex):
        return type(template)(x.item())
    sharding = getattr(template, "sharding", None)
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.device_put(x, sharding)
    return jnp.asarray(x)


def rebuild(specs, leaves, template, name, where):
    """Returns ``leaves`` in ``template``'s structure (nnx objects updated in place).

    Without a template: nested dicts keyed by the saved paths.
    """
    if template is None:
        keys = [
            jax.random.wrap_key_data(jnp.asarray(x), impl=s["key_impl"]) if "key_impl" in s else x
            for x, s in zip(leaves, specs, strict=True)
        ]
        return nest([tuple(s["path"]) for s in specs], keys)
    target = as_state(template)
    flat, treedef = check_template(specs, target, name, where)
    new = [like(t, x, s) for (_, t), x, s in zip(flat, leaves, specs, strict=True)]
    out = jax.tree.unflatten(treedef, new)
    if is_nnx_object(template):
        nnx.update(template, out)
    return out
