"""Faults: a save killed midway leaves the previous step restorable; damage is an error."""

import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from jaxprune import checkpoint

_KILLED_SAVE = textwrap.dedent(
    """
    import os, pathlib, signal, sys, threading, time
    import numpy as np
    from jaxprune import checkpoint

    root = pathlib.Path(sys.argv[1])
    checkpoint.save(root, 1, {"w": np.full((64, 64), 1.0, np.float32)})

    def kill_once_writing():
        # SIGKILL as soon as the temporary step directory holds a file: mid-save.
        while True:
            tmp = [p for p in root.iterdir() if "tmp" in p.name]
            if tmp and any(f.is_file() for f in tmp[0].rglob("*")):
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.0002)

    threading.Thread(target=kill_once_writing, daemon=True).start()
    big = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)
    checkpoint.save(root, 2, {"w": np.full((64, 64), 2.0, np.float32), "big": big})
    print("save finished before the kill")
    """
)


def test_sigkill_during_save_leaves_previous_step_restorable(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_SAVE, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr[-2000:]
    assert any("tmp" in p.name for p in tmp_path.iterdir())  # the half-written step
    assert checkpoint.latest_step(tmp_path) == 1
    ckpt = checkpoint.restore(tmp_path)
    assert ckpt.step == 1 and float(ckpt.params["w"][0, 0]) == 1.0
    # Saving again works, and cleans up the leftover temporary directory.
    checkpoint.save(tmp_path, 2, {"w": np.full((64, 64), 3.0, np.float32)})
    assert checkpoint.restore(tmp_path).step == 2
    assert not any("tmp" in p.name for p in tmp_path.iterdir())


def _saved(tmp_path, fmt):
    rng = np.random.default_rng(0)
    w = np.where(rng.random((256, 256)) < 0.1, rng.standard_normal((256, 256)), 0)
    params = {"w": w.astype(np.float32), "b": np.arange(8, dtype=np.float32)}
    checkpoint.save(tmp_path, 1, params, format=fmt)
    files = (tmp_path / "1" / "params").rglob("*")
    data = [p for p in files if p.is_file() and p.parent.name == "d"]
    return max(data, key=lambda p: p.stat().st_size), params


@pytest.mark.parametrize("fmt", ["dense", "compressed"])
def test_truncated_array_file_is_a_clear_error(tmp_path, fmt):
    f, _ = _saved(tmp_path, fmt)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(checkpoint.CheckpointError, match="truncated or corrupt"):
        checkpoint.restore(tmp_path)


@pytest.mark.parametrize("fmt", ["dense", "compressed"])
def test_flipped_byte_is_a_clear_error_never_a_wrong_restore(tmp_path, fmt):
    f, params = _saved(tmp_path, fmt)
    data = bytearray(f.read_bytes())
    for i in range(len(data) // 4, len(data), len(data) // 4):
        data[i] ^= 0x10
    f.write_bytes(bytes(data))
    try:
        ckpt = checkpoint.restore(tmp_path)
    except checkpoint.CheckpointError as e:
        assert "corrupt" in str(e)
    else:  # the flips missed every array byte (e.g. landed in file framing): still exact
        assert all(ckpt.params[k].tobytes() == params[k].tobytes() for k in params)


def test_corrupt_metadata_is_a_clear_error(tmp_path):
    _saved(tmp_path, "dense")
    meta = tmp_path / "1" / "meta" / "metadata"
    meta.write_bytes(meta.read_bytes()[:-7])
    with pytest.raises(checkpoint.CheckpointError, match="metadata .* truncated or corrupt"):
        checkpoint.restore(tmp_path)


def test_foreign_metadata_is_refused(tmp_path):
    _saved(tmp_path, "dense")
    (tmp_path / "1" / "meta" / "metadata").write_text('{"hello": 1}')
    with pytest.raises(checkpoint.CheckpointError, match="not a jaxprune checkpoint"):
        checkpoint.restore(tmp_path)


def test_missing_and_empty_directories(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="the path does not exist"):
        checkpoint.restore(tmp_path / "absent")
    pathlib.Path(tmp_path / "empty").mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="no complete checkpoint"):
        checkpoint.restore(tmp_path / "empty")
