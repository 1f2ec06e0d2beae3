"""The metadata of a jaxprune checkpoint step: its fields, their checks and its CRC-32.

:mod:`jaxprune.checkpoint` writes the metadata with :func:`meta_crc` and, on
restore, checks it with :func:`check_fields` before any field is used (a
damaged field then names itself instead of failing deep in a decoder).
"""

from __future__ import annotations

import functools
import json
import zlib
from typing import Any

import jax
import jax.numpy as jnp

from jaxprune._tree import path_str

__all__ = ["FORMATS", "META_KEYS", "meta_crc", "check"]

FORMATS = ("dense", "compressed")

META_KEYS = frozenset(
    {"jaxprune_checkpoint", "format", "step", "params", "opt_state", "masks", "meta_crc32"}
)


def meta_crc(meta: dict) -> int:
    """Returns the CRC-32 of ``meta``'s canonical JSON, without its ``meta_crc32`` field."""
    body = {k: v for k, v in meta.items() if k != "meta_crc32"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return zlib.crc32(text.encode()) & 0xFFFFFFFF


def check(meta: dict) -> None:
    """Raises ``ValueError`` (or ``KeyError``/``TypeError``) unless ``meta`` is intact.

    Its CRC-32 is checked when it has one (checkpoints written before it had
    one are checked field by field only), then every field a restore uses.
    """
    if "meta_crc32" in meta:
        if meta_crc(meta) != meta["meta_crc32"]:
            raise ValueError("CRC-32 mismatch of the metadata")
    elif set(meta) - META_KEYS:  # e.g. the name of meta_crc32 itself damaged
        raise ValueError(f"unknown fields {sorted(set(meta) - META_KEYS)}")
    check_fields(meta)


_LEAF_KINDS = ("dense", "slices", "nm", "bitmask")
_MASK_KINDS = ("scalar", "support", "packed", "bits")


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(what)


def _is_int(x: Any, low: int = 0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def _check_shape(shape: Any, what: str) -> None:
    _need(isinstance(shape, list) and all(_is_int(d) for d in shape), f"{what} shape {shape!r}")


def _check_dtype(dtype: Any, what: str) -> None:
    _need(isinstance(dtype, str), f"{what} dtype {dtype!r}")
    jnp.dtype(dtype)  # TypeError for an unknown name


def _check_path(path: Any, what: str) -> None:
    _need(
        isinstance(path, list) and all(isinstance(k, (str, int)) for k in path),
        f"{what} path {path!r}",
    )


def check_fields(meta: dict) -> None:
    """Raises ``ValueError`` (or ``KeyError``/``TypeError``) at the first malformed field."""
    _need(meta.get("format") in FORMATS, f"format {meta.get('format')!r}")
    _need(_is_int(meta.get("step")), f"step {meta.get('step')!r}")
    _need(isinstance(meta.get("params"), list), "no params list")
    param_shapes, bitmask = {}, {}
    for name in ("params", "opt_state"):
        specs = meta.get(name)
        if specs is None and name == "opt_state":
            continue
        _need(isinstance(specs, list), f"{name} is not a list")
        seen = set()
        for spec in specs:
            _need(isinstance(spec, dict), f"a {name} entry is {type(spec).__name__}")
            _check_path(spec["path"], name)
            key = path_str(tuple(spec["path"]))
            what = f"{name} leaf {key!r}"
            _need(key not in seen, f"{what} listed twice")
            seen.add(key)
            _need(spec["kind"] in _LEAF_KINDS, f"{what} encoding {spec['kind']!r}")
            _check_shape(spec["shape"], what)
            _check_dtype(spec["dtype"], what)
            _need(_is_int(spec["crc32"]), f"{what} crc32 {spec['crc32']!r}")
            _need(isinstance(spec["arrays"], dict), f"{what} arrays {spec['arrays']!r}")
            for k, entry in spec["arrays"].items():
                _need(isinstance(entry, list) and len(entry) == 2, f"{what} array {k!r}")
                _check_shape(entry[0], f"{what} array {k!r}")
                _check_dtype(entry[1], f"{what} array {k!r}")
            if spec["kind"] == "nm":
                for k in ("axis", "n", "m", "bits"):
                    _need(_is_int(spec[k], 0 if k == "axis" else 1), f"{what} {k} {spec[k]!r}")
                _need(spec["axis"] < len(spec["shape"]), f"{what} axis {spec['axis']}")
                _need(spec["shape"][spec["axis"]] % spec["m"] == 0, f"{what} m {spec['m']}")
            if "key_impl" in spec:
                impl = spec["key_impl"]
                _need(isinstance(impl, str) and _is_key_impl(impl), f"{what} key_impl {impl!r}")
                _need(len(spec["shape"]) >= 1, f"{what} key shape {spec['shape']!r}")
            if "var" in spec or "param" in spec:  # an nnx Variable's type; older steps lack it
                _need(isinstance(spec.get("var"), str), f"{what} var {spec.get('var')!r}")
                _need(isinstance(spec.get("param"), bool), f"{what} param {spec.get('param')!r}")
            if "packed_mask" in spec:  # a PackedMask's static shape and axis; older steps lack it
                pm = spec["packed_mask"]
                _need(isinstance(pm, list) and len(pm) == 2, f"{what} packed_mask {pm!r}")
                _check_shape(pm[0], f"{what} packed_mask")
                _need(pm[1] is None or _is_int(pm[1], 0), f"{what} packed_mask axis {pm[1]!r}")
            if name == "params":
                param_shapes[key] = spec["shape"]
                bitmask[key] = spec["kind"] == "bitmask"
    masks = meta.get("masks")
    if masks is None:
        return
    _need(isinstance(masks, list), "masks is not a list")
    for spec in masks:
        _need(isinstance(spec, dict), f"a masks entry is {type(spec).__name__}")
        _check_path(spec["path"], "masks")
        key = path_str(tuple(spec["path"]))
        what = f"masks leaf {key!r}"
        _check_shape(spec["shape"], what)
        _need(spec["kind"] in _MASK_KINDS, f"{what} kind {spec['kind']!r}")
        if spec["kind"] == "scalar":
            _need(isinstance(spec["value"], bool) and not spec["shape"], f"{what} value")
        elif spec["kind"] == "support":
            _need(param_shapes.get(key) == spec["shape"], f"{what} has no params leaf")
        elif spec["kind"] == "packed":
            _need(param_shapes.get(key) == spec["shape"], f"{what} has no params leaf")
            _need(bitmask.get(key, False), f"{what}: its params leaf is not a bitmask leaf")
            _need(_is_int(spec["crc32"]), f"{what} crc32 {spec['crc32']!r}")


@functools.lru_cache(maxsize=8)
def _is_key_impl(impl: str) -> bool:
    try:
        jax.random.key(0, impl=impl)
    except (ValueError, TypeError, KeyError):
        return False
    return True
