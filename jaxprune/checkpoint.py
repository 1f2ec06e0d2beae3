"""Orbax checkpoints of a whole pruning run, dense or in the compressed sparse format.

A checkpoint directory is an ``orbax.checkpoint.CheckpointManager`` root; each
step holds up to four orbax items:

* ``meta`` (JSON): format version, step, one entry per leaf with its path,
  shape, dtype, encoding and CRC-32, and the CRC-32 of the metadata itself
  (``meta_crc32``, over its canonical JSON without that field);
* ``params`` / ``opt_state``: the leaves, flattened to ``{"a00000": {...}}``,
  each leaf a dict of packed arrays (see :mod:`jaxprune.packing`; the dense
  format stores every leaf as itself);
* ``masks``: the enforced masks (read with :func:`jaxprune.get_masks`), as
  packed bits, or nothing when they equal the params' nonzero pattern or the
  bits of the params leaf's ``bitmask`` encoding (kept weights at exactly 0).

Trees are stored by leaf path, not by container type, so the optimizer and
pruning state travel as an opaque pytree: restoring into a template gives back
exactly its containers (``PruneState``, optax states, ``nnx.State``), and
without a template (``jaxprune inspect``) nested dicts keyed by path; leaves are
matched to a template's by path, whatever their order. Every leaf and the
metadata are checked against their CRC-32 on restore: a damaged file raises
:class:`CheckpointError`, never a silently different array or a renamed leaf.
Checkpoints written before the metadata carried its CRC-32 are restored without
that check (their metadata is still checked field by field).

Writing and reading a step's items through orbax lives in
:mod:`jaxprune.checkpoint_orbax`, which also defines :class:`CheckpointError`
(re-exported here).
"""

from __future__ import annotations

import math
import os
import pathlib
import warnings
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from jaxprune import checkpoint_meta as _meta
from jaxprune import checkpoint_rebuild as _rebuild
from jaxprune import checkpoint_trees as _trees
from jaxprune import packing
from jaxprune._tree import leaves_with_paths, path_str
from jaxprune.checkpoint_orbax import (
    FORMAT_VERSION,
    CheckpointError,
    _damaged_meta,
    _read,
    _write,
)
from jaxprune.checkpoint_steps import _absolute, _as_step, _is_step_dir, _locate, _steps
from jaxprune.state import find_prune_states, get_masks

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "save",
    "restore",
    "export",
    "latest_step",
    "disk_bytes",
]


class Checkpoint(NamedTuple):
    """What :func:`restore` returns.

    Args:
      step: the step restored.
      params: the params, in the template's structure, or without a template nested
        dicts of numpy arrays keyed by path.
      opt_state: the optimizer state, likewise; ``None`` when the checkpoint holds none.
      masks: the enforced masks: those of the restored ``opt_state`` when it holds a
        ``jp.prune`` state, else the recorded ones; ``None`` when the checkpoint holds
        none.
      format: the format the step was saved in, ``"dense"`` or ``"compressed"``.
      path: the step directory read.
    """

    step: int
    params: Any  # the template's structure, or nested dicts keyed by path
    opt_state: Any  # likewise; None when the checkpoint holds none
    masks: Any  # the enforced masks; None when the checkpoint holds none
    format: str  # "dense" or "compressed"
    path: pathlib.Path  # the step directory read


def _find_masks(opt_state: Any) -> Any:
    for candidate in (opt_state, getattr(opt_state, "opt_state", None)):
        if candidate is not None and find_prune_states(candidate):
            return get_masks(candidate)
    return None


def _flat_prune_state(opt_state: Any) -> bool:
    """Whether ``opt_state`` is an ``nnx.State`` holding a flattened jp.prune state."""
    from flax import nnx

    if not isinstance(opt_state, nnx.State):
        return False
    return any("packed_masks" in path_str(p) for p, _ in leaves_with_paths(opt_state)[0])


def save(
    directory: str | os.PathLike,
    step: int,
    params: Any,
    opt_state: Any = None,
    *,
    masks: Any = None,
    format: str = "dense",
    max_to_keep: int | None = None,
) -> pathlib.Path:
    """Returns the step directory written: ``params``, ``opt_state`` and masks at ``step``.

    Of an nnx module (or ``nnx.State``), each leaf's Variable type is recorded
    too, so that ``jaxprune inspect`` counts the ``nnx.Param`` leaves as params
    and lists the rest (BatchNorm statistics, RNG state) apart.

    The save goes through ``orbax.checkpoint.CheckpointManager`` (async, then
    waited for), so a process killed mid-save leaves earlier steps intact.

    Args:
      directory: the checkpoint root; a relative path is made absolute.
      step: the training step (a non-negative int).
      params: any pytree of arrays (linen dict, ``nnx.State``), or an nnx
        ``Module`` (its ``nnx.state`` is saved). An equinox module holds
        functions: save ``eqx.filter(model, eqx.is_array)``, restore into that
        and ``eqx.combine(ckpt.params, model)``.
      opt_state: the optimizer state (any pytree, e.g. ``tx.init(params)``), or
        an ``nnx.Optimizer``; stored as an opaque tree of leaves. An
        ``nnx.state(optimizer)`` holds the masks without their shapes (those are
        in the graphdef): pass the optimizer, or ``masks=`` (a warning says so).
      masks: the masks to record; default: ``jp.get_masks(opt_state)`` when
        ``opt_state`` holds a ``jp.prune`` state.
        Checked against ``params`` before anything is written: every mask leaf
        sits at a params leaf's path and is a scalar or of that leaf's shape, or
        is a scalar standing for a whole subtree (as ``jp.get_masks`` returns
        under ``optax.masked``). Float or int masks holding only 0 and 1 are
        stored cast to bool; other values (scores, probabilities) are refused.
        Masks of a linen ``TrainState``'s params saved with the whole variables
        (``params={"params": state.params, "batch_stats": state.batch_stats}``)
        are matched under ``params/`` and recorded there; the other collections
        get no mask.
      format: ``"dense"`` (params as they are) or ``"compressed"`` (params in
        the compressed sparse format of :mod:`jaxprune.packing`; restored
        bitwise, so a ``-0.0`` outside the masks is kept as a value: a warning
        names such leaves, and ``params = jp.apply_masks(params, masks)``
        before saving writes ``+0.0`` there).
      max_to_keep: None (default: keep every step) or an int >= 1: after this
        save, only the ``max_to_keep`` most recently *saved* steps are kept
        (orbax's rule: retention follows save order, not step numbers, so
        saving step 3 into a directory holding step 10 with ``max_to_keep=1``
        keeps step 3 and deletes step 10).

    Raises:
      ValueError: an argument is invalid (``format``, ``step``, ``max_to_keep``),
        ``masks`` do not match ``params``, or a leaf is no array (a function)
        or its dtype cannot be stored; the message names the argument, the
        value and the fix. Nothing is written then.
      CheckpointError: ``step`` is already saved there, ``directory`` is
        below a file, or ``directory`` is (or is inside) one step's directory,
        such as the path ``save`` returned: :func:`restore` and
        :func:`latest_step` read that path as the one step, so a step saved
        under it would never be found. The message names the root to pass.

    Warns:
      UserWarning: with ``format="compressed"``, params hold ``-0.0`` where
        their masks are False (masked by ``w * mask``); the message gives the
        count per leaf, the bytes stored with and without them (packed values and
        mask bits), and the fix.
        The save goes ahead, bitwise.

    Examples:
      >>> import tempfile, jax.numpy as jnp
      >>> from jaxprune import checkpoint
      >>> d = tempfile.mkdtemp()
      >>> params = {"w": jnp.array([[0.0, 2.0], [0.0, 0.0]])}
      >>> _ = checkpoint.save(d, 3, params, format="compressed")
      >>> ckpt = checkpoint.restore(d, params=params)
      >>> ckpt.step, ckpt.params["w"].tolist()
      (3, [[0.0, 2.0], [0.0, 0.0]])
    """
    return _save(directory, step, params, opt_state, masks, format, max_to_keep)


def _save(
    directory,
    step,
    params,
    opt_state=None,
    masks=None,
    format="dense",
    max_to_keep=None,
    *,
    kinds=None,
    source=None,
):
    """:func:`save`; ``kinds``: the nnx Variable types of ``params`` leaves by path (export).

    ``source``: the checkpoint an export reads, named in the fix of the ``-0.0`` warning.
    """
    if format not in _meta.FORMATS:
        raise ValueError(
            f"format must be one of {_meta.FORMATS}, got {format!r}. Fix: format='dense' for "
            "training checkpoints or format='compressed' for the smallest exact copy."
        )
    step = _as_step(step, "", "pass the training step count (int(state.step) for a traced one)")
    if max_to_keep is not None and (
        isinstance(max_to_keep, (bool, np.bool_))
        or not isinstance(max_to_keep, (int, np.integer))
        or max_to_keep < 1
    ):
        raise ValueError(
            f"max_to_keep must be None (keep every step) or an int >= 1, got {max_to_keep!r}. "
            "Fix: e.g. max_to_keep=3 to keep the 3 most recently saved steps, or leave it out "
            "to keep all (0 would delete every step, the one just saved included)."
        )
    if params is None:
        raise ValueError(
            "params is None: there is nothing to save (restore would hand back {}). Fix: pass "
            "the params (a pytree, nnx.State or nnx Module)."
        )
    directory = _absolute(directory)
    blocked = next((q for q in (directory, *directory.parents) if q.exists()), None)
    if blocked is not None and not blocked.is_dir():
        raise CheckpointError(
            f"cannot save under {directory}: {blocked} is a file, not a directory. Fix: pass "
            "a directory path (it is created if missing)."
        )
    inside = next((q for q in (directory, *directory.parents) if _is_step_dir(q)), None)
    if inside is not None:
        root = inside.parent
        where = "is" if inside == directory else f"is inside {inside}, which is"
        raise CheckpointError(
            f"cannot save under {directory}: it {where} the directory of step {inside.name} of "
            f"the checkpoint {root} (restore and latest_step read it as that one step, so a "
            f"step saved under it would never be found). Fix: pass the root, save({str(root)!r}, "
            f"{int(step)}, ...), or a directory outside {root} for a separate checkpoint."
        )
    from_opt_state = masks is None and opt_state is not None
    if from_opt_state:
        masks = _find_masks(opt_state)
        if masks is None and _flat_prune_state(opt_state):
            warnings.warn(
                "opt_state looks like nnx.state(optimizer): it holds a jp.prune state's "
                "packed masks, but their shapes live in the graphdef, so no masks are "
                "recorded: restore(...).masks will be None (a compressed save still packs "
                "each param by its zeros, and restores its values exactly). Fix: pass the "
                "nnx.Optimizer itself (nnx.merge(graphdef, state)), or "
                "masks=jp.get_masks(optimizer.opt_state).",
                stacklevel=2,
            )
    params, opt_state = _rebuild.as_state(params), _rebuild.as_state(opt_state)
    mask_by_path = None
    if masks is not None:
        # Masks of a linen TrainState's params, saved with the whole variables.
        masks = _trees.reroot_masks(masks, params)
        fix = None
        if from_opt_state:
            fix = (
                "Fix: the masks come from opt_state's jp.prune state (jp.get_masks(opt_state)): "
                "pass the params that opt_state was built for (tx.init(params)), or pass "
                "masks=... explicitly."
            )
        mask_by_path = _trees.mask_lookup(masks, params, fix)
    # Everything orbax could refuse is checked here, before its asynchronous save
    # starts: a refusal in the middle of it leaves writes running.
    p_arrays, p_specs, hosts = _trees.encode_tree(
        params, mask_by_path, format == "compressed", "params", kinds
    )
    if format == "compressed" and mask_by_path:
        _warn_negative_zeros(_trees.masked_negative_zeros(hosts, mask_by_path), source)
    meta: dict[str, Any] = {
        "jaxprune_checkpoint": FORMAT_VERSION,
        "format": format,
        "step": int(step),
        "params": p_specs,
    }
    items = {"params": p_arrays}
    if opt_state is not None:
        items["opt_state"], meta["opt_state"], _ = _trees.encode_tree(
            opt_state, None, False, "opt_state"
        )
    if masks is not None:
        packed = {
            path_str(tuple(spec["path"])): (p_arrays.get(f"a{i:05d}", {}), spec)
            for i, spec in enumerate(p_specs)
        }
        items["masks"], meta["masks"] = _trees.encode_masks(masks, hosts, packed)
    meta["meta_crc32"] = _meta.meta_crc(meta)
    return _write(directory, int(step), items, meta, max_to_keep)


def _warn_negative_zeros(found: list, source: Any) -> None:
    """Warns that params hold ``-0.0`` outside their masks, which the compressed format keeps."""
    if not found:
        return
    total = sum(n for _, n, *_ in found)
    leaves = "; ".join(
        f"{k!r}: {n:,} of its {out:,} masked-out entries" for k, n, out, *_ in found[:5]
    ) + (f"; and {len(found) - 5} more leaves" if len(found) > 5 else "")
    size, clean = sum(f[3] for f in found), sum(f[4] for f in found)
    fix = (
        "params = jp.apply_masks(params, masks) before saving, which writes +0.0 there "
        "(equal values, ==)"
        if source is None
        else f"ckpt = jp.restore({str(source)!r}), then jp.save(dst, ckpt.step, "
        "jp.apply_masks(ckpt.params, ckpt.masks), masks=ckpt.masks, format='compressed'), "
        "which writes +0.0 there (equal values, ==); on the command line, jaxprune export "
        f"{str(source)} DST --apply-masks"
    )
    warnings.warn(
        f"params hold {total:,} -0.0 entries where their masks are False ({leaves}). The "
        "compressed format stores every entry whose bits are not all zero, so that a restore "
        f"is bitwise: saved as they are, those leaves take {size:,} packed bytes, not {clean:,} "
        "(values, and the mask bits a mask other than the nonzero pattern needs; -0.0 == 0: "
        "sparsity counts them as pruned). Masking by a multiplication (w * mask, as "
        f"torch.nn.utils.prune does) leaves -0.0 where a negative weight was pruned. Fix: {fix}.",
        stacklevel=4,  # the caller of save / export
    )


def latest_step(directory: str | os.PathLike) -> int | None:
    """Returns the newest complete step saved under ``directory``, or None.

    ``directory`` is a checkpoint root, or (as for :func:`restore`) one step's
    directory, whose step is returned.

    Args:
      directory: a checkpoint root written by :func:`save`, or one step's directory
        (a relative path is made absolute); a root that does not exist gives None.

    Examples:
      >>> import tempfile, jax.numpy as jnp
      >>> from jaxprune import checkpoint
      >>> params = {"w": jnp.ones((2, 2))}
      >>> with tempfile.TemporaryDirectory() as d:
      ...     before = checkpoint.latest_step(d)
      ...     _ = checkpoint.save(d, 10, params)
      ...     step_dir = checkpoint.save(d, 2, params)
      ...     steps = checkpoint.latest_step(d), checkpoint.latest_step(step_dir)
      >>> before, steps  # the highest step, not the last saved
      (None, (10, 2))
    """
    path = _absolute(directory)
    if _is_step_dir(path):
        return int(path.name)
    steps = _steps(path) if path.is_dir() else []
    return steps[-1] if steps else None


def _decode(specs: list, arrays: dict, where: pathlib.Path, name: str) -> list[np.ndarray]:
    out = []
    for i, spec in enumerate(specs):
        got = dict(arrays.get(f"a{i:05d}", {}))
        for k, (shape, dtype) in spec["arrays"].items():
            if not math.prod(shape):
                got[k] = np.empty(tuple(shape), jnp.dtype(dtype))
        try:
            out.append(packing.unpack_leaf({k: np.asarray(v) for k, v in got.items()}, spec))
        except packing.PackError as e:
            raise CheckpointError(
                f"{name} leaf {path_str(tuple(spec['path']))!r} in {where} is corrupt: {e}"
            ) from e
    return out


def _masks(meta, items, params_by_path, where) -> tuple[list, list]:
    leaves = []
    index = {path_str(tuple(s["path"])): i for i, s in enumerate(meta["params"])}
    for i, spec in enumerate(meta["masks"]):
        key = path_str(tuple(spec["path"]))
        if spec["kind"] == "scalar":
            leaves.append(np.asarray(spec["value"], bool))
        elif spec["kind"] == "support":
            leaves.append(packing.support(params_by_path[key]))
        elif spec["kind"] == "packed":  # the bits of the params leaf's bitmask encoding
            size = math.prod(spec["shape"])
            bits = items.get("params", {}).get(f"a{index[key]:05d}", {}).get("bits")
            m = np.unpackbits(np.asarray(bits), count=size).astype(bool).reshape(spec["shape"])
            if packing.crc32(m) != spec["crc32"]:
                raise CheckpointError(
                    f"the mask of {key!r} in {where} is corrupt: CRC-32 mismatch of the bits "
                    "it shares with its params leaf."
                )
            leaves.append(m)
        else:
            size = math.prod(spec["shape"])
            if not size:
                leaves.append(np.zeros(spec["shape"], bool))
                continue
            bits = np.asarray(items.get("masks", {}).get(f"m{i:05d}", {}).get("bits"))
            if bits.shape != (math.ceil(size / 8),):
                raise CheckpointError(f"the mask of {key!r} in {where} is truncated or corrupt.")
            leaves.append(np.unpackbits(bits, count=size).astype(bool).reshape(spec["shape"]))
    return [tuple(s["path"]) for s in meta["masks"]], leaves


def restore(
    directory: str | os.PathLike,
    step: int | None = None,
    *,
    params: Any = None,
    opt_state: Any = None,
) -> Checkpoint:
    """Returns the :class:`Checkpoint` saved at ``step`` (default: the newest complete one).

    Args:
      directory: a checkpoint root written by :func:`save` (or one step's directory).
      step: which step; default the newest complete one.
      params: a template with the saved params' structure (arrays or
        ``jax.ShapeDtypeStruct`` leaves, e.g. from ``jax.eval_shape``); its
        containers, leaf types and shardings are reproduced. An nnx ``Module``
        is updated in place. Without a template: nested dicts of numpy arrays.
      opt_state: likewise for the optimizer state (e.g. ``tx.init(params)``, or
        an ``nnx.Optimizer``, updated in place).

    Returns:
      ``Checkpoint(step, params, opt_state, masks, format, path)``; ``masks`` are
      those of the restored ``opt_state`` when it holds a ``jp.prune`` state, else
      the recorded ones (in the params' structure when it matches).

    Raises:
      CheckpointError: nothing complete is saved there, a file is truncated or
        corrupt (every leaf and the metadata are checked against their CRC-32),
        the metadata is damaged, or ``opt_state`` is given for a checkpoint
        saved without one; the message names the step directory.
      ValueError: a template's structure differs; the message lists the paths.

    Examples:
      >>> import tempfile, jax, jax.numpy as jnp, optax, jaxprune as jp
      >>> from jaxprune import checkpoint
      >>> params = {"w": jnp.array([[1.0, -3.0], [0.5, 2.0]])}
      >>> tx = jp.prune(optax.sgd(0.1), sparsity=0.5)
      >>> state = tx.init(params)
      >>> updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
      >>> params = optax.apply_updates(params, updates)
      >>> with tempfile.TemporaryDirectory() as d:
      ...     _ = checkpoint.save(d, 1, params, state)
      ...     ckpt = checkpoint.restore(d, params=params, opt_state=state)
      ...     raw = checkpoint.restore(d)  # no template: nested dicts of numpy arrays
      >>> ckpt.step, ckpt.format, type(ckpt.opt_state).__name__
      (1, 'dense', 'PruneState')
      >>> ckpt.params["w"].tolist(), ckpt.masks["w"].tolist()
      ([[0.0, -3.0], [0.0, 2.0]], [[False, True], [False, True]])
      >>> type(raw.params["w"]).__name__
      'ndarray'
    """
    return _restore(directory, step, params, opt_state)[0]


def _restore(directory, step, params=None, opt_state=None) -> tuple[Checkpoint, dict]:
    """Returns :func:`restore`'s :class:`Checkpoint` and the step's (checked) metadata."""
    root, step = _locate(directory, step)
    meta, items = _read(root, step)
    where = root / str(step)
    with _damaged_meta(where):
        p_leaves = _decode(meta["params"], items.get("params", {}), where, "params")
    params_out = _rebuild.rebuild(meta["params"], p_leaves, params, "params", where)
    if opt_state is not None and meta.get("opt_state") is None:
        # Silently returning None would resume without the optimizer's moments
        # and the pruning state (masks, step counter).
        raise CheckpointError(
            f"{where} holds no optimizer state (it was saved without opt_state, e.g. by "
            "`jaxprune export`, which keeps params and masks only). Fix: restore it without "
            "opt_state=... and start the optimizer afresh with tx.init(params), or resume "
            "from the original checkpoint."
        )
    opt_out = None
    if meta.get("opt_state") is not None:
        with _damaged_meta(where):
            o_leaves = _decode(meta["opt_state"], items.get("opt_state", {}), where, "opt_state")
        opt_out = _rebuild.rebuild(meta["opt_state"], o_leaves, opt_state, "opt_state", where)
    masks_out = None
    if opt_state is not None and opt_out is not None:
        masks_out = _find_masks(opt_state if _rebuild.is_nnx_object(opt_state) else opt_out)
    if masks_out is None and meta.get("masks") is not None:
        paths = [path_str(tuple(s["path"])) for s in meta["params"]]
        by_path = dict(zip(paths, p_leaves, strict=True))
        with _damaged_meta(where):
            m_paths, m_leaves = _masks(meta, items, by_path, where)
            masks_out = _rebuild.nest(m_paths, m_leaves)
        m_by_path = {path_str(p): m for p, m in zip(m_paths, m_leaves, strict=True)}
        if params is not None and len(m_by_path) == len(m_paths):
            # In the params' structure when the masks cover exactly its saved leaves.
            shaped = _rebuild.masks_like(params, m_by_path)
            masks_out = masks_out if shaped is None else shaped
    return Checkpoint(int(step), params_out, opt_out, masks_out, meta["format"], where), meta


def _kinds(meta: dict) -> dict[str, dict]:
    """Returns the nnx Variable type recorded for each params leaf, by path string.

    Empty for params saved without Variables (a linen dict) and for
    checkpoints written before the types were recorded.
    """
    return {
        path_str(tuple(s["path"])): {"var": s["var"], "param": s["param"]}
        for s in meta["params"]
        if "var" in s and "param" in s
    }


def _non_params(meta: dict) -> set[str]:
    """Returns the paths of the params leaves recorded as nnx Variables other than ``Param``.

    BatchNorm statistics, RNG keys and counters: state saved with a module's
    params, not parameters (``jp.report(model)`` leaves them out too).
    """
    return {k for k, kind in _kinds(meta).items() if not kind["param"]}


def export(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    step: int | None = None,
    format: str = "compressed",
) -> pathlib.Path:
    """Returns the step directory written: ``src``'s params and masks re-saved in ``format``.

    The optimizer state is left out (an export is for deployment). Needs no
    model code: the trees are read by path.

    Args:
      src: a checkpoint directory written by :func:`save`.
      dst: the checkpoint directory to write the export to, as :func:`save`
        takes it; the export is its step ``step``.
      step: the step of ``src`` to export (default: its latest).
      format: ``"compressed"`` (default; pruned params stored as bitmask and
        kept values) or ``"dense"``, as in :func:`save`.

    Examples:
      >>> import os, tempfile, jax.numpy as jnp, optax, jaxprune as jp
      >>> from jaxprune import checkpoint
      >>> params = {"w": jnp.array([[0.0, 2.0], [0.0, 0.0]])}
      >>> state = jp.prune(optax.sgd(0.1), sparsity=0.5).init(params)
      >>> with tempfile.TemporaryDirectory() as d:
      ...     _ = checkpoint.save(d, 4, params, state)
      ...     out = checkpoint.export(d, os.path.join(d, "export"))
      ...     ckpt = checkpoint.restore(out)
      >>> out.name, ckpt.format, ckpt.opt_state, ckpt.params["w"].tolist()
      ('4', 'compressed', None, [[0.0, 2.0], [0.0, 0.0]])
    """
    ckpt, meta = _restore(src, step)
    # Read without the model's code, the params are plain dicts: the recorded
    # nnx Variable types are handed on, so `jaxprune inspect` of the export
    # still tells the params from a module's other state.
    return _save(
        dst,
        ckpt.step,
        ckpt.params,
        masks=ckpt.masks,
        format=format,
        kinds=_kinds(meta),
        source=ckpt.path,
    )


def disk_bytes(path: str | os.PathLike) -> int:
    """Returns the bytes of all files under ``path`` (a checkpoint root or step).

    Args:
      path: a checkpoint root or one step's directory (a relative path is made
        absolute); every file below it is counted, recursively (a file counts its own
        size).

    Raises:
      FileNotFoundError: ``path`` does not exist.

    Examples:
      >>> import tempfile, jax.numpy as jnp
      >>> from jaxprune import checkpoint
      >>> with tempfile.TemporaryDirectory() as d:
      ...     _ = checkpoint.save(d, 0, {"w": jnp.ones((4, 4))})
      ...     step_dir = checkpoint.save(d, 1, {"w": jnp.ones((4, 4))})
      ...     root, one = checkpoint.disk_bytes(d), checkpoint.disk_bytes(step_dir)
      >>> 0 < one < root
      True
    """
    root = _absolute(path, "path")
    if not root.exists():
        raise FileNotFoundError(f"disk_bytes: {str(root)!r} does not exist.")
    if root.is_file():
        return root.stat().st_size
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
