"""Trees in checkpoints: any pytree as path-keyed leaf specs, rebuilt from a template.

The storage side of :mod:`jaxprune.checkpoint`: leaves are written by path
(``leaves_with_paths``), never by container type, so optimizer and pruning
states travel as opaque trees and come back in the template's containers.
The restore side (a template checked and the tree rebuilt) lives in
:mod:`jaxprune.checkpoint_rebuild`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxprune import packing
from jaxprune._tree import _normalize, is_variable, leaves_with_paths, path_str, unwrap_variables
from jaxprune.checkpoint_rebuild import is_storable_leaf

__all__ = [
    "host",
    "check_array",
    "check_storable",
    "check_unique_paths",
    "reroot_masks",
    "mask_lookup",
    "mask_kind",
    "stored_nbytes",
    "masked_negative_zeros",
    "values_outside_masks",
    "variable_kinds",
    "packed_mask_meta",
    "encode_tree",
    "encode_masks",
]


def host(x: Any) -> tuple[np.ndarray, str | None]:
    """Returns ``x`` as a numpy array (PRNG keys as their raw data) and the key impl name."""
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(x)), str(jax.random.key_impl(x))
    x = np.asarray(jax.device_get(x))
    if x.dtype.byteorder not in "=|":  # e.g. np.load of a big-endian .npy
        # The CRC is of the bytes written, and the spec records only the dtype's
        # name, which restores native order: store native bytes.
        x = x.astype(x.dtype.newbyteorder("="))
    return x, None


def packed_mask_meta(tree: Any) -> dict[str, list]:
    """Returns ``{path of a PackedMask's bits: [mask shape, packed axis]}`` for ``tree``.

    A :class:`~jaxprune.bitmask.PackedMask` keeps its shape and axis in its
    treedef, not in its bits: two masks of other shapes can have bits of the
    same shape (``[3, 4]`` and ``[4, 3]`` both pack to 2 bytes). Recorded at
    save and compared with the template at restore, they keep saved bits from
    being read under another mask's shape.
    """
    from jaxprune.bitmask import PackedMask

    flat, _ = jax.tree_util.tree_flatten_with_path(
        unwrap_variables(tree), is_leaf=lambda x: isinstance(x, PackedMask)
    )
    return {
        path_str(_normalize(p) + ("bits",)): [list(x.shape), x.axis]
        for p, x in flat
        if isinstance(x, PackedMask)
    }


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


def _is_python_scalar(x: Any) -> bool:
    return isinstance(x, bool | int | float) and not isinstance(x, np.generic)


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
    packed_masks = packed_mask_meta(tree)
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
        if path_str(path) in packed_masks:
            spec["packed_mask"] = packed_masks[path_str(path)]
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


def bool_mask(m: Any, key: str, fix: str) -> np.ndarray:
    """Returns the masks leaf ``m`` as a bool array; a 0/1 number array is cast, else refused."""
    try:
        x = np.asarray(jax.device_get(m))
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"masks leaf {key!r} is not a bool array ({type(m).__name__}: {e}). {fix}"
        ) from None
    if x.dtype == bool:
        return x
    if x.dtype.kind not in "iuf":
        raise ValueError(
            f"masks leaf {key!r} is not a bool array (a {type(m).__name__} of dtype {x.dtype}). "
            f"{fix}"
        )
    if not np.isin(x, (0, 1)).all():
        bad = x[~np.isin(x, (0, 1))].reshape(-1)[0].item()
        raise ValueError(
            f"masks leaf {key!r} has dtype {x.dtype} and holds {bad!r}, not only 0 and 1: a "
            "mask keeps (True, 1) or prunes (False, 0) an entry, and scores or probabilities "
            "would be read as truthiness. Fix: threshold them first (e.g. m > 0.5), or pass "
            "jp.get_masks(opt_state) of the jp.prune state that pruned these params."
        )
    return x.astype(bool)


def mask_lookup(masks: Any, params: Any, fix: str | None = None) -> dict[str, np.ndarray]:
    """Returns the bool mask of each params leaf it covers, by path string, after checking.

    A mask leaf must sit at a params leaf's path and be a scalar or of that
    leaf's shape, or be a scalar standing for a whole params subtree (what
    ``jp.get_masks`` gives for a subtree ``optax.masked`` leaves out); such a
    prefix mask is spread over the leaves below it. Params leaves without a
    mask are fine. Float or int masks holding only 0 and 1 are cast to bool;
    other values (scores, probabilities) and non-numeric leaves are refused.
    Masks over linen variables' ``"params"`` collection are re-rooted by the
    caller (:func:`reroot_masks`), so that the masks recorded sit at the same
    paths.

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
        m = bool_mask(m, key, fix)
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


def mask_kind(x: np.ndarray | None, mask: np.ndarray, leaf_kind: str | None) -> str:
    """Returns how a checkpoint stores ``mask`` beside the params leaf ``x`` (packed as
    ``leaf_kind``).

    ``"scalar"`` (in the metadata), ``"support"`` (equal to the nonzero
    pattern of ``x``: rebuilt from the restored leaf), ``"packed"`` (``x`` is
    stored in the ``bitmask`` encoding and its bits are ``mask`` itself, as
    when kept weights are exactly 0 and nothing outside the mask is: regrown
    weights, int8 weights rounding to 0) or ``"bits"`` (a packed bit per
    entry, ``ceil(mask.size / 8)`` bytes). Only ``"bits"`` costs bytes.

    Examples:
      >>> import numpy as np
      >>> from jaxprune.checkpoint_trees import mask_kind
      >>> m = np.array([[False, True, True, True]])
      >>> mask_kind(np.array([[0.0, 2.0, 3.0, 4.0]], np.float32), m, "bitmask")
      'support'
      >>> mask_kind(np.array([[0.0, 0.0, 3.0, 4.0]], np.float32), m, "bitmask")  # kept at 0
      'packed'
      >>> mask_kind(np.array([[0.0, 0.0, 3.0, 4.0]], np.float32), m, "dense")
      'bits'
    """
    if mask.ndim == 0:
        return "scalar"
    if x is not None and x.shape == mask.shape:
        if np.array_equal(packing.support(x), mask):
            return "support"
        if leaf_kind == "bitmask" and np.array_equal(packing.support(x, mask), mask):
            return "packed"
    return "bits"


def stored_nbytes(x: np.ndarray, mask: np.ndarray) -> int:
    """Returns the bytes a compressed checkpoint stores for ``x`` with ``mask``: values and mask.

    That is the packed arrays of ``x`` (:func:`jaxprune.packing.packed_nbytes`)
    plus ``ceil(mask.size / 8)`` bytes of mask bits where :func:`encode_masks`
    writes them (:func:`mask_kind` ``"bits"``: the mask is neither a scalar,
    nor the nonzero pattern of ``x``, nor the bits of its ``bitmask`` encoding).

    Examples:
      >>> import numpy as np
      >>> from jaxprune.checkpoint_trees import stored_nbytes
      >>> m = np.array([[False, True, False, True]])
      >>> stored_nbytes(np.array([[0.0, 2.0, 0.0, 4.0]], np.float32), m)  # mask = support
      9
      >>> stored_nbytes(np.array([[-0.0, 2.0, 0.0, 4.0]], np.float32), m)  # + 1 byte of mask
      14
    """
    kind, n = packing.packed_plan(x, mask)
    if mask.size and mask_kind(x, mask, kind) == "bits":
        n += -(-mask.size // 8)
    return n


def masked_negative_zeros(
    hosts: dict[str, np.ndarray], mask_by_path: dict[str, np.ndarray]
) -> list[tuple[str, int, int, int, int]]:
    """Returns ``(path, count, masked_out, nbytes, nbytes_clean)`` of each leaf with ``-0.0``
    where its mask is False.

    The compressed format drops an entry outside the mask only if its bits are
    all zero, so that a restore is bitwise: a ``-0.0`` (left by masking through
    a multiplication, ``w * mask``, where a negative weight was pruned) is kept
    as a value. ``nbytes`` is what the checkpoint stores for the leaf as it is,
    ``nbytes_clean`` with those entries ``+0.0`` (what :func:`jaxprune.apply_masks`
    writes): the packed values plus, where the mask differs from the nonzero
    pattern, the mask's bits (:func:`stored_nbytes`).

    Examples:
      >>> import numpy as np
      >>> from jaxprune.checkpoint_trees import masked_negative_zeros
      >>> w = np.array([[-1.0, 2.0, -3.0, 4.0]], np.float32)
      >>> m = np.array([[False, True, False, True]])
      >>> masked_negative_zeros({"w": w * m}, {"w": m})  # the two pruned entries are -0.0
      [('w', 2, 2, 17, 9)]
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
                    stored_nbytes(x, m),
                    stored_nbytes(clean, m),
                )
            )
    return out


def values_outside_masks(
    hosts: dict[str, np.ndarray], mask_by_path: dict[str, np.ndarray]
) -> list[tuple[str, int, int, int, int, int]]:
    """Returns ``(path, unzeroed, negative_zeros, masked_out, nbytes, nbytes_masked)`` of each
    leaf holding entries whose bits are not all zero where its mask is False.

    A checkpoint stores such entries as they are: ``unzeroed`` counts those
    that are not zero (values the masks prune but nothing zeroed yet),
    ``negative_zeros`` the ``-0.0`` (see :func:`masked_negative_zeros`).
    ``nbytes`` is what a compressed checkpoint stores for the leaf as it is,
    ``nbytes_masked`` with the mask applied (``+0.0`` outside it, as
    :func:`jaxprune.apply_masks` writes), both by :func:`stored_nbytes`.

    Examples:
      >>> import numpy as np
      >>> from jaxprune.checkpoint_trees import values_outside_masks
      >>> w = np.array([[-1.0, 2.0, -0.0, 4.0]], np.float32)
      >>> values_outside_masks({"w": w}, {"w": np.array([[False, True, False, True]])})
      [('w', 1, 1, 2, 17, 9)]
    """
    out = []
    for key, m in mask_by_path.items():
        x = hosts.get(key)
        if x is None or not x.size or (m.ndim and m.shape != x.shape):
            continue
        masked_out = ~np.broadcast_to(m, x.shape)
        kept = masked_out & packing.support(x)
        n = int(np.count_nonzero(kept))
        if n:
            with np.errstate(invalid="ignore"):  # a signalling NaN compared
                neg = int(np.count_nonzero(kept & (x == 0)))  # == 0 with nonzero bits: -0.0
            masked = np.where(masked_out, np.zeros((), x.dtype), x)
            out.append(
                (
                    key,
                    n - neg,
                    neg,
                    int(np.count_nonzero(masked_out)),
                    stored_nbytes(x, m),
                    stored_nbytes(masked, m),
                )
            )
    return out


def encode_masks(
    masks: Any, params: dict[str, np.ndarray], packed: dict[str, tuple[dict, dict]] | None = None
) -> tuple[dict, list]:
    """Returns ``(arrays, specs)`` of ``masks``: packed bits only where they are needed.

    A scalar mask is stored in its spec; a mask equal to the support of the
    params leaf at its path costs nothing (it is rebuilt from the restored leaf),
    nor does one equal to the bits of that leaf's ``bitmask`` encoding
    (``packed``: each params leaf's ``(arrays, spec)`` by path, as
    :func:`encode_tree` wrote them; rebuilt from those bits, and checked against
    the mask's CRC-32 on restore); an empty mask needs no bits (orbax refuses
    zero-size arrays).
    """
    flat, _ = leaves_with_paths(masks)
    arrays, specs = {}, []
    for i, (path, m) in enumerate(flat):
        m = np.asarray(jax.device_get(m), bool)
        spec: dict[str, Any] = {"path": list(path), "shape": list(m.shape)}
        key = path_str(path)
        p_arrays, p_spec = (packed or {}).get(key, ({}, {}))
        kind = mask_kind(params.get(key), m, p_spec.get("kind"))
        if kind == "packed":
            bits = p_arrays.get("bits")
            same = bits is not None and np.array_equal(
                np.unpackbits(bits, count=m.size).reshape(m.shape), m
            )
            kind = "packed" if same else "bits"
        spec["kind"] = kind
        if kind == "scalar":
            spec["value"] = bool(m)
        elif kind == "packed":
            spec["crc32"] = packing.crc32(m)
        elif kind == "bits" and m.size:
            arrays[f"m{i:05d}"] = {"bits": np.packbits(m.reshape(-1))}
        specs.append(spec)
    return arrays, specs
