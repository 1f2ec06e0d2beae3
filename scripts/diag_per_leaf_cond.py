"""Does one ``lax.cond`` per layer lower ``jp.prune``'s fixed per-step cost on XLA:CPU?

``jp.prune`` refreshes all masks under one ``lax.cond``, so every layer's
optimizer update waits for the one conditional, which reads every layer's
params. A layer-scope refresh needs only its own layer, so it can be split
into one cond per leaf, each depending on that leaf alone: XLA may then
overlap a layer's update with another layer's backward matmul as in the dense
step. This diagnostic builds both forms by hand (magnitude scores, layer
scope, exact per-leaf top-k through ``jp.masks.fused_select``, packed masks,
adam) and times them beside ``jp.prune`` and the dense step in the harness of
``scripts/bench_overhead.py`` (params and state donated, blocks of 100 steps
in rotating order, buffers moved before each block, median of the ratios to
the same round's dense block).

Variants (each never refreshed, every 10 and every 100 steps, on the cubic
schedule towards 90% over 10^7 steps):

* ``jp.layer``: ``jp.prune(optax.adam(1e-3), ...)`` as shipped;
* ``one-cond``: the hand-built transform, one cond over all leaves;
* ``per-leaf``: the same with one cond per leaf.

The three give the same masks (checked on a short run before timing).

Usage: python scripts/diag_per_leaf_cond.py [--rounds 40]
The last line is ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_overhead import make_step, mlp_init, time_block  # noqa: E402

import jaxprune as jp  # noqa: E402
from jaxprune import masks as M  # noqa: E402
from jaxprune._tree import prunable_flags  # noqa: E402


def _score(src):
    return jnp.abs(src[0])


def _refresh_leaf(x, sparsity):
    m = M.fused_select("layer", _score, [x], sparsity, [True], leaf_srcs=[[x]])
    return M.pack(m)


def hand_prune(inner, schedule, *, per_leaf: bool) -> optax.GradientTransformation:
    """Layer-scope magnitude pruning of ``inner`` with one cond, or one per leaf."""

    def init(params):
        leaves, flags = jax.tree.leaves(params), prunable_flags(params, None)
        packed = [
            M.pack(jnp.ones(x.shape, bool)) if f else jnp.bool_(True)
            for x, f in zip(leaves, flags, strict=True)
        ]
        return (jnp.zeros((), jnp.int32), packed, inner.init(params))

    def update(grads, state, params):
        step, kept, inner_state = state
        leaves, treedef = jax.tree.flatten(params)
        flags = prunable_flags(params, None)
        pred, s = schedule.is_update_step(step), schedule(step)
        if per_leaf:
            new = [
                jax.lax.cond(pred, lambda x=x: _refresh_leaf(x, s), lambda k=k: k) if f else k
                for x, f, k in zip(leaves, flags, kept, strict=True)
            ]
        else:

            def refresh():
                return [
                    _refresh_leaf(x, s) if f else jnp.bool_(True)
                    for x, f in zip(leaves, flags, strict=True)
                ]

            new = jax.lax.cond(pred, refresh, lambda: list(kept))
        masks = [M.unpack(p) if f else p for p, f in zip(new, flags, strict=True)]
        g = jax.tree.leaves(grads)
        g = [jnp.where(m, a, 0) if f else a for a, m, f in zip(g, masks, flags, strict=True)]
        u, inner_state = inner.update(jax.tree.unflatten(treedef, g), inner_state, params)
        u = [
            jnp.where(m, a, -p) if f else a
            for a, m, f, p in zip(jax.tree.leaves(u), masks, flags, leaves, strict=True)
        ]
        return jax.tree.unflatten(treedef, u), (optax.safe_increment(step), new, inner_state)

    return optax.GradientTransformation(init, update)


def _configs():
    def cubic(freq):
        return jp.schedules.polynomial(0.0, 0.9, begin_step=0, end_step=10**7, frequency=freq)

    never = jp.schedules.one_shot(0.9, step=10**8)
    configs = {"dense": optax.adam(1e-3)}
    for name, sched in (("never", never), ("10", cubic(10)), ("100", cubic(100))):
        configs[f"jp.layer/{name}"] = jp.prune(optax.adam(1e-3), sparsity=sched)
        configs[f"one-cond/{name}"] = hand_prune(optax.adam(1e-3), sched, per_leaf=False)
        configs[f"per-leaf/{name}"] = hand_prune(optax.adam(1e-3), sched, per_leaf=True)
    return configs


def check_same_masks(params, x, y) -> None:
    sched = jp.schedules.polynomial(0.0, 0.9, begin_step=0, end_step=50, frequency=10)
    txs = [
        jp.prune(optax.adam(1e-3), sparsity=sched),
        hand_prune(optax.adam(1e-3), sched, per_leaf=False),
        hand_prune(optax.adam(1e-3), sched, per_leaf=True),
    ]
    finals = []
    for tx in txs:
        _, (p, _) = time_block(
            make_step(tx), (jax.tree.map(jnp.copy, params), tx.init(params)), x, y, 35
        )
        finals.append(jax.tree.leaves(p))
    for other in finals[1:]:
        for a, b in zip(finals[0], other, strict=True):
            np.testing.assert_array_equal(a, b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--block", type=int, default=100)
    args = parser.parse_args()
    if args.rounds < 1 or args.block < 1:
        parser.error(f"--rounds and --block must be >= 1, got {args.rounds} and {args.block}")
    params = mlp_init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (128, 784))
    y = jax.random.randint(jax.random.key(2), (128,), 0, 10)
    check_same_masks(params, x, y)
    configs = _configs()
    steps = {n: make_step(tx) for n, tx in configs.items()}
    carries = {n: (jax.tree.map(jnp.copy, params), tx.init(params)) for n, tx in configs.items()}
    for n in configs:
        _, carries[n] = time_block(steps[n], carries[n], x, y, 3)
    names, rng, dense = list(configs), np.random.default_rng(0), []
    ratios = {n: [] for n in names if n != "dense"}
    for r in range(args.rounds):
        times = {}
        for n in names[r % len(names) :] + names[: r % len(names)]:
            junk = np.ones(int(rng.integers(1, 1 << 22)), np.uint8)
            carries[n] = jax.tree.map(jnp.copy, carries[n])
            times[n], carries[n] = time_block(steps[n], carries[n], x, y, args.block)
            del junk
        dense.append(times["dense"])
        for n in ratios:
            ratios[n].append(times[n] / times["dense"])
    out = {"dense_step_ms": round(1e3 * statistics.median(dense) / args.block, 3)}
    out.update({n: round(statistics.median(v), 4) for n, v in ratios.items()})
    print(
        f"dense step {out['dense_step_ms']} ms; step time / dense (median of {args.rounds} rounds):"
    )
    for n in ratios:
        print(f"  {n:16s} {out[n]:.3f}x")
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
