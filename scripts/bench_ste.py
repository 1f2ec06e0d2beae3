"""Per-step cost of straight-through sparse training (``jp.dynamic.ste``) vs dense training.

Side by side in one run, on CPU, with the harness of ``bench_overhead.py``: a
784-1024-256-10 MLP, batch 128, adam, params and state donated; blocks of
``--block`` steps timed in rotating order, params and state moved to fresh
buffers before each block; each round's block time divided by the same
round's dense block, median over rounds. Configurations:

* ``prune``: ``jp.prune`` at 90%, masks enforced but never refreshed (its
  fixed cost, for reference);
* ``ste/layer``, ``ste/global``: STE at 90%, masks selected again at every
  step (the fused exact top-k of ``jp.prune``'s refresh);
* ``ste/nm-2:4``: STE with 2:4 N:M masks (SR-STE's setting, ``decay=2e-4``).

STE runs a selection at every step, where ``jp.prune`` runs one per refresh,
and carries a dense copy of the weights: this measures what that costs.

Usage: python scripts/bench_ste.py [--rounds R] [--block B]
The last line is ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxprune as jp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_overhead import make_step, mlp_init, time_block  # noqa: E402


def configs() -> dict[str, optax.GradientTransformation]:
    return {
        "dense": optax.adam(1e-3),
        "prune": jp.prune(optax.adam(1e-3), sparsity=jp.schedules.one_shot(0.9, step=10**8)),
        "ste/layer": jp.dynamic.ste(optax.adam(1e-3), sparsity=0.9),
        "ste/global": jp.dynamic.ste(optax.adam(1e-3), sparsity=0.9, scope="global"),
        "ste/nm-2:4": jp.dynamic.ste(
            optax.adam(1e-3),
            sparsity=0.5,
            scope=functools.partial(jp.masks.nm, n=2, m=4),
            decay=2e-4,
        ),
    }


def bench(rounds: int, block: int) -> dict:
    params = mlp_init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (128, 784))
    y = jax.random.randint(jax.random.key(2), (128,), 0, 10)
    txs = configs()
    steps = {name: make_step(tx) for name, tx in txs.items()}
    carries = {name: (jax.tree.map(jnp.copy, params), tx.init(params)) for name, tx in txs.items()}
    for name in txs:  # compile and warm up
        _, carries[name] = time_block(steps[name], carries[name], x, y, 3)
    names = list(txs)
    ratios = {name: [] for name in names if name != "dense"}
    dense = []
    rng = np.random.default_rng(0)
    for r in range(rounds):
        times = {}
        for name in names[r % len(names) :] + names[: r % len(names)]:
            junk = np.ones(int(rng.integers(1, 1 << 22)), np.uint8)  # a new placement
            carries[name] = jax.tree.map(jnp.copy, carries[name])
            times[name], carries[name] = time_block(steps[name], carries[name], x, y, block)
            del junk
        dense.append(times["dense"] / block)
        for name in ratios:
            ratios[name].append(times[name] / times["dense"])
    kept = {name: float(jp.sparsity(jp.get_masks(carries[name][1]))) for name in ratios}
    return {
        "dense_ms": 1e3 * statistics.median(dense),
        "ratios": {name: statistics.median(v) for name, v in ratios.items()},
        "mask_sparsity": kept,
        "state_mb": {
            name: sum(a.nbytes for a in jax.tree.leaves(carries[name][1])) / 1e6 for name in names
        },
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=15, help="timed rounds (15)")
    p.add_argument("--block", type=int, default=50, help="steps per timed block (50)")
    args = p.parse_args(argv)
    for name in ("rounds", "block"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}; e.g. --{name} 10")
    t0 = time.perf_counter()
    out = bench(args.rounds, args.block)
    print(
        f"784-1024-256-10 MLP, batch 128, adam; {args.rounds} rounds of {args.block} steps; "
        f"dense step {out['dense_ms']:.2f} ms; jax {jax.__version__}, {jax.default_backend()}"
    )
    print()
    print("| config | step time / dense | mask sparsity | optimizer state (MB) |")
    print("|---|---|---|---|")
    print(f"| dense | 1.000x | 0.00 | {out['state_mb']['dense']:.2f} |")
    for name, ratio in out["ratios"].items():
        print(
            f"| {name} | {ratio:.3f}x | {out['mask_sparsity'][name]:.2f} "
            f"| {out['state_mb'][name]:.2f} |"
        )
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print("RESULT " + json.dumps(out))
    return out


if __name__ == "__main__":
    main()
