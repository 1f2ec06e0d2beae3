"""Benchmark: shrunk vs dense inference on CPU, next to XLA's theoretical FLOP ratio.

For the LeNet-300-100 MLP and two VGG-style CNNs with BatchNorm
(``jaxprune.models.VGGSmall``: ``vgg`` with VGG-16's first three stage widths,
64-64-M-128-128-M-256-M, and ``vgg_small``, half as wide, 32-32-M-64-64-M-128-M),
25/50/75% of the channels of every prunable group are removed (group-wise L2
magnitude, ``jp.structure.select``) and the network is physically shrunk with
``jp.shrink``; each shrunk model is timed against the dense one, side by side in
one run (interleaved, median of ``--runs`` timings, batch 256), and the
theoretical ratio is dense FLOPs / shrunk FLOPs from XLA's cost analysis of the
two compiled functions. For contrast the same networks are timed with 90%
unstructured (per-layer magnitude) masks: the compute stays dense, so there is
no speedup on dense hardware.

Usage: python scripts/bench_structured.py [--runs 30] [--batch 256]
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
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import jaxprune as jp  # noqa: E402
from jaxprune import models, structure  # noqa: E402


def _flops(fn, params, x) -> float:
    cost = jax.jit(fn).lower(params, x).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost["flops"])


def _time_pair(fn, dense, other, x, runs):
    """Returns median seconds of ``fn(dense, x)`` and ``fn(other, x)``, interleaved."""
    f = jax.jit(fn)
    for _ in range(3):
        jax.block_until_ready(f(dense, x))
        jax.block_until_ready(f(other, x))
    td, to = [], []
    for _ in range(runs):
        t = time.perf_counter()
        jax.block_until_ready(f(dense, x))
        td.append(time.perf_counter() - t)
        t = time.perf_counter()
        jax.block_until_ready(f(other, x))
        to.append(time.perf_counter() - t)
    return statistics.median(td), statistics.median(to)


def _n(tree) -> int:
    return int(sum(np.size(a) for a in jax.tree.leaves(tree)))


def bench(name, make, x, fractions, runs):
    model = make()
    model.eval()
    apply_fn, state = structure.module_apply(model)
    probe = x[:2]
    gs = structure.groups(apply_fn, state, probe, prunable_only=True)
    scores = jp.criteria.magnitude(state)
    dense_flops = _flops(apply_fn, state, x)
    rows = []
    for frac in tqdm(fractions, desc=name, leave=False):
        masks = structure.select(gs, scores, frac)
        small = structure.shrink(apply_fn, state, masks, probe)
        theo = dense_flops / _flops(apply_fn, small, x)
        td, ts = _time_pair(apply_fn, state, small, x, runs)
        rows.append(
            {
                "model": name,
                "kind": "structured",
                "fraction": frac,
                "params": _n(small),
                "dense_params": _n(state),
                "dense_ms": 1e3 * td,
                "ms": 1e3 * ts,
                "speedup": td / ts,
                "theoretical": theo,
            }
        )
    masks = jp.masks.topk(scores, 0.9)
    sparse = jp.apply_masks(state, masks)
    theo = dense_flops / _flops(apply_fn, sparse, x)
    td, ts = _time_pair(apply_fn, state, sparse, x, runs)
    rows.append(
        {
            "model": name,
            "kind": "unstructured",
            "fraction": 0.9,
            "params": _n(state),
            "dense_params": _n(state),
            "dense_ms": 1e3 * td,
            "ms": 1e3 * ts,
            "speedup": td / ts,
            "theoretical": theo,
        }
    )
    return rows


# VGG-16's first three stages (64, 128, 256 channels), each followed by max-pooling.
VGG_CFG = (64, 64, "M", 128, 128, "M", 256, "M")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args()
    if args.runs < 1:
        ap.error(f"--runs must be >= 1, got {args.runs}")
    key = jax.random.key(0)
    fractions = (0.25, 0.5, 0.75)
    x_flat = jax.random.normal(key, (args.batch, 784))
    x_img = jax.random.normal(key, (args.batch, 28, 28, 1))
    rows = bench(
        "mlp", lambda: models.lenet_300_100(rngs=nnx.Rngs(0)), x_flat, fractions, args.runs
    )
    rows += bench(
        "vgg",
        lambda: models.VGGSmall(rngs=nnx.Rngs(0), cfg=VGG_CFG),
        x_img,
        fractions,
        args.runs,
    )
    rows += bench(
        "vgg_small", lambda: models.VGGSmall(rngs=nnx.Rngs(0)), x_img, fractions, args.runs
    )

    print(
        f"\njax {jax.__version__}, {jax.devices()[0].platform}, batch {args.batch}, "
        f"median of {args.runs} interleaved runs"
    )
    print(
        f"{'model':9} {'kind':12} {'removed':>7} {'params':>9} {'dense ms':>9} {'ms':>8} "
        f"{'speedup':>8} {'theory':>7} {'ratio':>6}"
    )
    for r in rows:
        print(
            f"{r['model']:9} {r['kind']:12} {r['fraction']:7.0%} {r['params']:9d} "
            f"{r['dense_ms']:9.3f} {r['ms']:8.3f} {r['speedup']:7.2f}x {r['theoretical']:6.2f}x "
            f"{r['speedup'] / r['theoretical']:6.2f}"
        )
    print(
        "unstructured rows: masked-but-dense weights; XLA still runs the dense matmuls/convs, "
        "so there is no speedup on dense hardware."
    )
    result = {}
    for r in rows:
        key = f"{r['fraction']:.2f}"
        if r["kind"] == "unstructured":
            key = f"unstructured_{key}"
        result.setdefault(r["model"], {})[key] = {
            "speedup": round(r["speedup"], 3),
            "theoretical": round(r["theoretical"], 3),
            "dense_ms": round(r["dense_ms"], 3),
            "ms": round(r["ms"], 3),
            "params": r["params"],
        }
    ratio = {m: result[m]["0.50"]["speedup"] / result[m]["0.50"]["theoretical"] for m in result}
    result["targets"] = {
        "mlp_50_ratio": round(ratio["mlp"], 3),
        "mlp_50_target": 0.8,
        "vgg_50_ratio": round(ratio["vgg"], 3),
        "vgg_50_target": 0.6,
        "vgg_small_50_ratio": round(ratio["vgg_small"], 3),
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
