"""Where a checkpoint's steps are on disk: the root, its complete steps, one step's directory.

:mod:`jaxprune.checkpoint` resolves the directory it is given with
:func:`_absolute`, finds the step to read with :func:`_locate` (a root and a
step, or one step's directory) and lists the complete steps with
:func:`_steps`: orbax renames a step's directory into place when the save is
done, and a step counts once its ``meta`` item is there (:func:`_is_step_dir`).
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

from jaxprune._tree import as_int
from jaxprune.checkpoint_orbax import CheckpointError, _manager


def _absolute(directory: str | os.PathLike, name: str = "directory") -> pathlib.Path:
    if not isinstance(directory, (str, os.PathLike)):
        raise ValueError(
            f"{name} must be a path (str or os.PathLike), got {directory!r}. Fix: e.g. "
            f"{name}='/tmp/run/ckpt' (relative paths are made absolute)."
        )
    return pathlib.Path(os.path.abspath(os.path.expanduser(os.fspath(directory))))


def _as_step(step: Any, also: str, fix: str) -> int:
    """Returns ``step`` as an int (a TrainState's concrete array step too), else raises."""
    n = as_int(step)
    if n is None or n < 0:
        raise ValueError(f"step must be a non-negative int{also}, got {step!r}. Fix: {fix}.")
    return n


def _locate(directory: str | os.PathLike, step: int | None) -> tuple[pathlib.Path, int]:
    """Returns ``(root, step)``; ``directory`` may be a root or one step's directory."""
    if step is not None:
        step = _as_step(step, " or None (the newest)", "e.g. step=int(s)")
    path = _absolute(directory)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: the path does not exist.")
    if _is_step_dir(path):
        if step is not None and step != int(path.name):
            raise CheckpointError(f"{path} is the directory of step {path.name}, not {step}.")
        return path.parent, int(path.name)
    if not path.is_dir():
        raise CheckpointError(
            f"{path} is a file, not a checkpoint: pass the directory given to jp.save."
        )
    steps = _steps(path)
    if not steps:
        # Orbax writes a step into a temporary directory and renames it when done.
        partial = any(".orbax-checkpoint-tmp" in c.name for c in path.iterdir())
        foreign = sorted(int(c.name) for c in path.iterdir() if c.name.isdigit() and c.is_dir())
        if partial:
            why = "only an unfinished (interrupted) save is there"
        elif foreign:
            why = (
                f"its step directories ({', '.join(map(str, foreign[:5]))}"
                f"{', ...' if len(foreign) > 5 else ''}) were not written by jp.save (they have "
                "no meta/ directory: e.g. a plain orbax CheckpointManager's); restore them with "
                "orbax, or pass the directory given to jp.save"
            )
        else:
            why = "it holds no step directory; pass the directory given to jp.save"
        raise CheckpointError(f"no complete checkpoint in {path}: {why}.")
    if step is None:
        return path, steps[-1]
    if step not in steps:
        raise CheckpointError(f"no step {step} in {path}; steps saved: {steps}.")
    return path, step


def _steps(root: pathlib.Path) -> list[int]:
    try:
        mngr = _manager(root, read_only=True)
    except Exception as e:  # orbax raises various errors on foreign directories
        raise CheckpointError(f"{root} is not an orbax checkpoint directory ({e}).") from e
    try:
        return sorted(s for s in mngr.all_steps() if (root / str(s) / "meta").is_dir())
    finally:
        mngr.close()


def _is_step_dir(path: pathlib.Path) -> bool:
    return path.name.isdigit() and (path / "meta").is_dir()
