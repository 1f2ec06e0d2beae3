"""Time of a mask refresh inside ``tx.update``, float32 vs bfloat16 params, and of ``global_topk``.

The 784-1024-256-10 MLP's kernels (1.07M entries), adam wrapped by
``jp.prune`` with a schedule that refreshes the masks at every step at a
fixed sparsity: the median time of one jitted ``tx.update`` (refresh
included; no forward or backward pass), for layer and global scope, float32
and bfloat16 params, at sparsities from 1e-5 (one to ten entries pruned:
the exact search's k-th key at the low end of the scores, where its sampled
bracket does not hold) to 0.9. Then ``jp.masks.global_topk`` alone on the
same kernels' magnitudes, jitted, at the same sparsities and at 1 - 1e-6.

A float32 model's refresh recomputes its scores inside the search (fused);
a bfloat16 model's stores them and runs ``topk`` / ``global_topk``, which
search 16-bit scores on 16-bit keys. Run it on two checkouts (``PYTHONPATH=``
a worktree of the other) to compare them: the figures are absolute times.

Usage: python scripts/bench_refresh.py [--repeats N]
The last line is ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import jaxprune as jp

SHAPES = [(784, 1024), (1024, 256), (256, 10)]
SPARSITIES = [1e-5, 0.5, 0.9]


def params_of(dtype) -> dict:
    keys = jax.random.split(jax.random.key(0), len(SHAPES))
    return {
        f"w{i}": (0.05 * jax.random.normal(k, s)).astype(dtype)
        for i, (k, s) in enumerate(zip(keys, SHAPES, strict=True))
    }


def median_ms(fn, repeats: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def refresh_ms(dtype, scope: str, sparsity: float, repeats: int) -> float:
    params = params_of(dtype)
    grads = jax.tree.map(lambda p: (0.1 * p).astype(p.dtype), params)
    # A constant sparsity refreshed at every step.
    schedule = jp.schedules.polynomial(sparsity, sparsity, 0, 10**7, frequency=1)
    tx = jp.prune(optax.adam(1e-3), sparsity=schedule, scope=scope)
    update = jax.jit(tx.update)
    state = [tx.init(params)]

    def step():
        updates, state[0] = update(grads, state[0], params)
        return updates

    return median_ms(step, repeats)


def select_ms(dtype, sparsity: float, repeats: int) -> float:
    scores = jp.criteria.magnitude(params_of(dtype))
    select = jax.jit(lambda s: jp.masks.global_topk(s, sparsity))
    return median_ms(lambda: select(scores), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=40, help="timed calls per figure")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; jaxprune at {jp.__file__}")
    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    result: dict = {"refresh_ms": {}, "global_topk_ms": {}}
    print(f"\n{'tx.update with a refresh, ms':<30}" + "".join(f"{s:>9g}" for s in SPARSITIES))
    for name, dtype in dtypes.items():
        for scope in ("layer", "global"):
            row = {s: refresh_ms(dtype, scope, s, args.repeats) for s in SPARSITIES}
            result["refresh_ms"][f"{name}_{scope}"] = row
            print(f"{name + ', ' + scope:<30}" + "".join(f"{v:>9.2f}" for v in row.values()))
    extremes = [*SPARSITIES, 1 - 1e-6]
    print(f"\n{'global_topk, ms':<30}" + "".join(f"{s:>9g}" for s in extremes))
    for name, dtype in dtypes.items():
        row = {s: select_ms(dtype, s, args.repeats) for s in extremes}
        result["global_topk_ms"][name] = row
        print(f"{name:<30}" + "".join(f"{v:>9.2f}" for v in row.values()))
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
