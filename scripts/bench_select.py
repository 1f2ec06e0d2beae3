"""Time of an eager ``structure.select``: the first call against later ones, side by side.

``structure.select`` runs its group importances and exact selections as one
compiled program. The first call traces and compiles it; the counts of a
concrete sparsity enter that program as values, so later calls on the same
groups (another sparsity, new scores: a sweep, an iterative pruning loop) reuse
it. This script builds ``jaxprune.models.VGGSmall`` (BatchNorm CNN) and the
784-1024-256-10 MLP of ``bench_overhead.py``, then times, in one process,
the first ``select`` and the median of ``--calls`` more at other sparsities
(each on freshly perturbed scores, so nothing is reused but the program).

Usage: python scripts/bench_select.py [--calls 20]
The last line is ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import jaxprune as jp  # noqa: E402
from jaxprune import models, structure  # noqa: E402


def _mlp_apply(p, x):
    h = jax.nn.relu(x @ p["w1"] + p["b1"])
    h = jax.nn.relu(h @ p["w2"] + p["b2"])
    return h @ p["w3"] + p["b3"]


def _mlp():
    ks = jax.random.split(jax.random.key(0), 3)
    dims = (784, 1024, 256, 10)
    p = {}
    for i, k in enumerate(ks):
        p[f"w{i + 1}"] = jax.random.normal(k, dims[i : i + 2]) * 0.05
        p[f"b{i + 1}"] = jnp.zeros(dims[i + 1])
    return _mlp_apply, p, jnp.ones((2, 784))


def _vgg():
    model = models.VGGSmall(rngs=nnx.Rngs(0))
    model.eval()
    apply_fn, state = structure.module_apply(model)
    return apply_fn, state, jnp.ones((2, 28, 28, 1))


def _timed(fn) -> float:
    t = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t


def bench(name: str, build, calls: int) -> dict:
    apply_fn, params, x = build()
    gs = structure.groups(apply_fn, params, x, prunable_only=True)
    scores = jp.criteria.magnitude(params)
    first = _timed(lambda: structure.select(gs, scores, 0.5))
    later = []
    for i in range(calls):
        s = 0.1 + 0.8 * i / max(calls - 1, 1)
        fresh = jax.tree.map(lambda a, i=i: a * (1.0 + 1e-3 * (i + 1)), scores)
        later.append(_timed(lambda s=s, fresh=fresh: structure.select(gs, fresh, s)))
    med = statistics.median(later)
    row = {"model": name, "groups": len(gs), "first_s": first, "later_s": med}
    row["ratio"] = first / med
    print(
        f"{name:>9}: {len(gs)} groups, first select {first * 1e3:8.1f} ms, later "
        f"(median of {calls}, other sparsities) {med * 1e3:6.2f} ms: {first / med:6.0f}x"
    )
    return row


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20, help="later calls to time (default 20)")
    args = ap.parse_args(argv)
    if args.calls < 1:
        ap.error(f"--calls must be >= 1, got {args.calls}")
    rows = [bench("mlp", _mlp, args.calls), bench("vgg_small", _vgg, args.calls)]
    result = {"rows": rows, "backend": jax.default_backend(), "jax": jax.__version__}
    print("RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
