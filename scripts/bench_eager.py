"""Time of eager (un-jitted) mask selections: the first call against later ones.

Outside ``jax.jit``, every jnp operation is a program that compiles at its
first use. jaxprune's selections run their element-wise work inside compiled
helpers, so a first eager call compiles a few programs, and later calls (a
sweep over sparsities, an iterative pruning loop) reuse them. Each selection
runs in a fresh process (``--one NAME``), so that its first call finds
nothing compiled by another. Scores: the magnitudes of LeNet-300-100's
weights (266K), of two layers of 10M entries in all, and of two 3x3 conv
kernels (368K, for the pattern selection).

To compare two versions of jaxprune, run this script with each on
``PYTHONPATH``, alternating.

Usage: python scripts/bench_eager.py [--calls 7]
The last line is ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jaxprune as jp  # noqa: E402

_SIZES = {
    "lenet": ((784, 300), (300, 100), (100, 10)),
    "10m": ((4000, 2500), (1024, 256)),
    "convs": ((3, 3, 64, 128), (3, 3, 128, 256)),
}
_SELECTIONS = {
    "topk": ("10m", lambda t, s: jp.masks.topk(t, s)),
    "global_topk": ("10m", lambda t, s: jp.masks.global_topk(t, s)),
    "structured_l2": ("lenet", lambda t, s: jp.structured.structured(t, s)),
    "structured_l2_global": ("lenet", lambda t, s: jp.structured.structured(t, s, scope="global")),
    "blocks": ("lenet", lambda t, s: jp.structured.blocks(t, s, block=(1, 4))),
    # n=1 keeps at least one of every 4 (sparsities of 0.9 would empty the groups).
    "nm": ("lenet", lambda t, s: jp.structured.nm(t, s, n=1, m=4)),
    "patterns": ("convs", lambda t, s: jp.structured.patterns(t, s)),
}


def _scores(size: str) -> dict:
    shapes = _SIZES[size]
    keys = jax.random.split(jax.random.key(0), len(shapes))
    pairs = enumerate(zip(keys, shapes, strict=True))
    tree = {f"w{i}": jnp.abs(jax.random.normal(k, s)) for i, (k, s) in pairs}
    return jax.block_until_ready(tree)


def _timed(fn) -> float:
    t = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t


def one(name: str, calls: int) -> dict:
    size, select = _SELECTIONS[name]
    scores = _scores(size)
    first = _timed(lambda: select(scores, 0.9))
    later = [
        _timed(lambda i=i: select(scores, 0.5 + 0.3 * i / max(calls - 1, 1))) for i in range(calls)
    ]
    return {"name": name, "scores": size, "first_s": first, "later_s": statistics.median(later)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=7, help="later calls to time (default 7)")
    ap.add_argument("--one", choices=sorted(_SELECTIONS), help="time one selection, here")
    args = ap.parse_args(argv)
    if args.calls < 1:
        ap.error(f"--calls must be >= 1, got {args.calls}")
    if args.one:
        row = one(args.one, args.calls)
        print("ROW " + json.dumps(row))
        return row
    rows = []
    for name in _SELECTIONS:
        cmd = [sys.executable, __file__, "--one", name, "--calls", str(args.calls)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        row = json.loads(next(x for x in out.splitlines() if x.startswith("ROW "))[4:])
        rows.append(row)
        print(
            f"{name:>21} ({row['scores']:>5} scores): first call {row['first_s'] * 1e3:7.0f} ms, "
            f"later (median of {args.calls}) {row['later_s'] * 1e3:7.1f} ms"
        )
    result = {"rows": rows, "backend": jax.default_backend(), "jax": jax.__version__}
    print("RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
