"""Orbax I/O of one checkpoint step: its items written and read back, failures cleaned up.

:mod:`jaxprune.checkpoint` encodes the trees (see :mod:`jaxprune.checkpoint_trees`)
and hands a step's items and metadata to :func:`_write`, which saves them
through an ``orbax.checkpoint.CheckpointManager``; :func:`_read` returns them as
numpy, the metadata checked first (see :mod:`jaxprune.checkpoint_meta`). A save
that fails inside orbax leaves no writer thread running and no partial step
behind; a read that fails raises :class:`CheckpointError` naming the step
directory. ``CheckpointError`` and ``FORMAT_VERSION`` are re-exported from
:mod:`jaxprune.checkpoint` (write ``jp.CheckpointError``).
"""

from __future__ import annotations

import contextlib
import gc
import math
import pathlib
import shutil
import sys
import threading
import time

import jax.numpy as jnp
import numpy as np

from jaxprune import checkpoint_meta as _meta

__all__ = ["FORMAT_VERSION", "CheckpointError"]

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, truncated or corrupt."""


def _manager(directory: pathlib.Path, *, read_only: bool, max_to_keep: int | None = None):
    import orbax.checkpoint as ocp

    # Readers are not marked read_only: orbax would log a warning on every restore.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=not read_only,
        enable_async_checkpointing=not read_only,
        cleanup_tmp_directories=not read_only,  # leftovers of a killed save
    )
    return ocp.CheckpointManager(directory, options=options)


def _write(directory, step, items, meta, max_to_keep) -> pathlib.Path:
    import orbax.checkpoint as ocp

    args = {k: ocp.args.StandardSave(v) for k, v in items.items() if v}
    args["meta"] = ocp.args.JsonSave(meta)
    mngr = _manager(directory, read_only=False, max_to_keep=max_to_keep)
    closed = False
    try:
        if step in mngr.all_steps():
            raise CheckpointError(
                f"step {step} is already saved in {directory}; checkpoints are never "
                f"overwritten. Fix: save under a new step (e.g. {max(mngr.all_steps()) + 1}), "
                "or delete that step's directory first."
            )
        before = set(threading.enumerate())
        try:
            mngr.save(step, args=ocp.args.Composite(**args), force=True)
            mngr.wait_until_finished()
        except BaseException:
            closed = True
            _abandon_save(mngr, before, directory, step)
            raise
    finally:
        if not closed:
            mngr.close()
    return directory / str(step)


def _abandon_save(mngr, before: set, directory: pathlib.Path, step: int) -> None:
    """Cleans up after a failed ``mngr.save``: no writer left running, no partial step.

    When an item fails inside orbax's asynchronous save, the writes it already
    started for the other items run on in orbax's background threads, which
    nothing waits for: they can recreate the step's temporary directory under a
    later save, or wait for a signal that never comes and keep the interpreter
    from exiting. They are waited for (and released from such a wait, see
    :func:`_stop_orbax_threads`), then the step's temporary directory is
    removed. Secondary errors are swallowed: the original one is re-raised.
    """
    with contextlib.suppress(Exception):
        mngr.wait_until_finished()
    _stop_orbax_threads(before)
    with contextlib.suppress(Exception):
        mngr.close()
    for tmp in directory.glob(f"{step}.orbax-checkpoint-tmp*"):
        shutil.rmtree(tmp, ignore_errors=True)


def _stop_orbax_threads(before: set, grace: float = 2.0, timeout: float = 60.0) -> None:
    """Waits for the orbax commit threads started since ``before`` was taken.

    They normally finish within moments. One still waiting after ``grace``
    seconds may wait for a signal of the failed save that never comes (orbax
    would wait 300 s, keeping the interpreter alive): its signals are set so it
    runs, or fails, and ends. Nothing waits longer than ``timeout`` seconds.
    """
    try:
        from orbax.checkpoint._src.futures import future as ocp_future
        from orbax.checkpoint._src.futures import synchronization

        cls = ocp_future._SignalingThread
        failed = synchronization.OperationIdGenerator.get_current_operation_id()
    except (ImportError, AttributeError):  # another orbax version: nothing to wait for
        return
    # Only the failed save's threads: a save running in another thread keeps its own.
    threads = [
        t
        for t in threading.enumerate()
        if t not in before and isinstance(t, cls) and getattr(t, "_operation_id", failed) == failed
    ]
    start = time.monotonic()
    while any(t.is_alive() for t in threads) and time.monotonic() - start < grace:
        time.sleep(0.02)
    for t in threads:
        if t.is_alive():
            with contextlib.suppress(Exception):
                ocp_future.set_signals(t._receive_signals, operation_id=t._operation_id)
    for t in threads:
        # Thread.join itself: orbax's join re-raises the thread's error.
        threading.Thread.join(t, max(0.0, start + timeout - time.monotonic()))


def _read(root: pathlib.Path, step: int) -> tuple[dict, dict]:
    """Returns ``(meta, items)`` of one step, every array as numpy."""
    import orbax.checkpoint as ocp

    where = root / str(step)
    mngr = _manager(root, read_only=True)
    try:
        try:
            meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:
            raise CheckpointError(
                f"cannot read the metadata of {where}, which is missing, truncated or corrupt: "
                f"{_brief(e)}"
            ) from e
        if not isinstance(meta, dict) or meta.get("jaxprune_checkpoint") != FORMAT_VERSION:
            raise CheckpointError(
                f"{where} is not a jaxprune checkpoint of format version {FORMAT_VERSION} "
                "(its metadata is missing, corrupt or from another writer)."
            )
        _check_meta(meta, where)
        args = {}
        with _damaged_meta(where):
            for name, prefix in (("params", "a"), ("opt_state", "a"), ("masks", "m")):
                abstract = _abstract(meta.get(name), prefix)
                if abstract:
                    args[name] = ocp.args.StandardRestore(abstract)
        try:
            items = mngr.restore(step, args=ocp.args.Composite(**args)) if args else {}
        except Exception as e:
            _drain_failed_reads()
            raise CheckpointError(
                f"cannot read the arrays of {where}: {_brief(e)}. The checkpoint is truncated "
                "or corrupt; restore an earlier step."
            ) from e
    finally:
        mngr.close()
    return meta, {k: items[k] for k in args}


def _drain_failed_reads(seconds: float = 0.3) -> None:
    """Waits for the reads orbax left pending when one failed, hiding their one known error.

    When a read fails, orbax returns while tensorstore still completes the other
    reads; their callbacks then target orbax's closed event loop and Python
    reports ``RuntimeError: Event loop is closed`` as an unraisable exception (a
    traceback on stderr, or a test failure under ``-W error``). Nothing is lost:
    the restore has already failed with a clear error.
    """
    previous = sys.unraisablehook

    def hook(unraisable):
        exc = unraisable.exc_value
        if not (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"):
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        time.sleep(seconds)
        gc.collect()
    finally:
        sys.unraisablehook = previous


@contextlib.contextmanager
def _damaged_meta(where: pathlib.Path):
    """Turns the errors of decoding damaged metadata into :class:`CheckpointError`."""
    try:
        yield
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise CheckpointError(_damaged(where, _brief(e))) from e


def _damaged(where: pathlib.Path, what: str) -> str:
    return (
        f"the metadata of {where} is damaged ({what}). Fix: restore another step, or re-save "
        "this one from its source; the file was modified after it was written."
    )


def _check_meta(meta: dict, where: pathlib.Path) -> None:
    """Raises :class:`CheckpointError` naming ``where`` unless ``meta`` is intact."""
    with _damaged_meta(where):
        _meta.check(meta)


def _brief(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def _abstract(specs: list | None, prefix: str) -> dict:
    if not specs:
        return {}
    out = {}
    for i, spec in enumerate(specs):
        if prefix == "m":
            nbytes = math.ceil(math.prod(spec["shape"]) / 8)
            if spec["kind"] == "bits" and nbytes:  # empty masks store no bits
                out[f"m{i:05d}"] = {"bits": np.empty((nbytes,), np.uint8)}
            continue
        arrays = {
            k: np.empty(tuple(shape), jnp.dtype(dtype))
            for k, (shape, dtype) in spec["arrays"].items()
            if math.prod(shape)
        }
        if arrays:
            out[f"{prefix}{i:05d}"] = arrays
    return out
