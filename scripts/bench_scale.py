"""Scale benchmark: mask refresh time vs parameter count, per-step overhead, state bytes.

On jax's default backend (always; the CPU on a machine without a GPU):
  * global mask refresh (magnitude scores + exact global threshold) on
    1M..100M parameters; the log-log slope of time vs N must be ~1 (linear);
  * per-step time of a 784-1024-256-10 MLP with Adam, dense vs ``jp.prune``
    refreshing every 100 steps (and every step), measured interleaved;
  * bytes of the pruning state next to Adam's.
GPU (only when jax's default backend is a GPU): refresh scaling up to ~1B
parameters and a 2:4-masked vs dense matmul timing, recorded with the device
name. XLA has no sparse tensor-core kernels, so the 2:4 matmul is a dense
matmul over a masked weight: it measures, honestly, no speedup.

Prints a table and, last, ``RESULT {json}``. ``--quick`` stops at 10M.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import jaxprune as jp


def _time(fn, *args, reps: int = 5) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _params(n: int, key: jax.Array) -> dict:
    # Four kernels of 1024 rows sharing n entries, like the layers of a model.
    cols = max(1, n // (4 * 1024))
    keys = jax.random.split(key, 4)
    return {f"k{i}": jax.random.normal(keys[i], (1024, cols)) for i in range(4)}


def refresh_scaling(sizes: list[int]) -> list[dict]:
    refresh = jax.jit(lambda p: jp.masks.global_topk(jp.criteria.magnitude(p), 0.9))
    rows = []
    for n in tqdm(sizes, desc="refresh vs N"):
        params = _params(n, jax.random.key(n))
        actual = sum(x.size for x in jax.tree.leaves(params))
        rows.append({"n": actual, "seconds": _time(refresh, params)})
        del params
    return rows


def _fit_exponent(rows: list[dict]) -> float:
    x = np.log([r["n"] for r in rows])
    y = np.log([r["seconds"] for r in rows])
    return float(np.polyfit(x, y, 1)[0])


def step_overhead(steps: int = 300, batch: int = 128) -> dict:
    from flax import nnx

    from jaxprune.models import MLP

    model = MLP((784, 1024, 256, 10), rngs=nnx.Rngs(0))
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    graphdef = nnx.graphdef(model)
    x = jax.random.normal(jax.random.key(1), (batch, 784))
    y = jax.random.randint(jax.random.key(2), (batch,), 0, 10)

    def loss(p):
        logits = nnx.merge(graphdef, p)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def make(tx):
        @jax.jit
        def step(p, s):
            g = jax.grad(loss)(p)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        return step, tx.init(params)

    every = lambda f: jp.schedules.polynomial(0.0, 0.9, 0, 10_000, frequency=f)  # noqa: E731
    txs = {
        "dense": optax.adam(1e-3),
        "prune_every_100": jp.prune(optax.adam(1e-3), sparsity=every(100)),
        "prune_every_step": jp.prune(optax.adam(1e-3), sparsity=every(1)),
    }
    runs = {name: make(tx) for name, tx in txs.items()}
    states = {name: (params, s) for name, (_, s) in runs.items()}
    for name, (step, _) in runs.items():  # compile
        states[name] = jax.block_until_ready(step(*states[name]))
    times = {name: [] for name in runs}
    # Round-robin, one step each, so machine noise hits every variant alike;
    # means over whole multiples of 100 steps include the refresh steps.
    for _ in tqdm(range(steps), desc="step overhead"):
        for name, (step, _) in runs.items():
            t0 = time.perf_counter()
            states[name] = jax.block_until_ready(step(*states[name]))
            times[name].append(time.perf_counter() - t0)

    # Trimmed mean: drop the 2% slowest steps of every variant (other jobs'
    # bursts), which never removes more refresh steps than dense outliers.
    def trimmed(t):
        t = np.sort(t)
        return float(np.mean(t[: int(0.98 * len(t))]))

    per_step = {name: trimmed(t) for name, t in times.items()}
    medians = {name: float(np.median(t)) for name, t in times.items()}
    sizes = jp.transform.state_bytes(states["prune_every_100"][1])
    n_prunable = 784 * 1024 + 1024 * 256 + 256 * 10
    return {
        "dense_ms": 1e3 * per_step["dense"],
        "every_100_ms": 1e3 * per_step["prune_every_100"],
        "every_step_ms": 1e3 * per_step["prune_every_step"],
        "ratio_every_100": per_step["prune_every_100"] / per_step["dense"],
        "ratio_every_step": per_step["prune_every_step"] / per_step["dense"],
        "median_ratio_every_100": medians["prune_every_100"] / medians["dense"],
        "pruning_state_bytes": sizes["pruning"],
        "adam_state_bytes": sizes["inner"],
        "bits_per_prunable_param": 8 * sizes["pruning"] / n_prunable,
    }


def state_bytes_at(n: int) -> dict:
    shapes = jax.eval_shape(lambda: _params(n, jax.random.key(0)))
    tx = jp.prune(optax.adam(1e-3), sparsity=0.9)
    return jp.transform.state_bytes(jax.eval_shape(tx.init, shapes))


def gpu_section(max_n: int) -> dict:
    device = jax.devices()[0].device_kind
    sizes = [int(s) for s in np.geomspace(1e7, max_n, 4)]
    rows = refresh_scaling(sizes)
    k = 8192
    a = jax.random.normal(jax.random.key(0), (k, k), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (k, k), jnp.bfloat16)
    w24 = jnp.where(jp.masks.nm({"w": jnp.abs(w)}, n=2, m=4)["w"], w, 0)
    mm = jax.jit(lambda a, w: a @ w)
    dense_s, sparse_s = _time(mm, a, w, reps=10), _time(mm, a, w24, reps=10)
    return {
        "device": device,
        "refresh": rows,
        "exponent": _fit_exponent(rows),
        "matmul_dense_ms": 1e3 * dense_s,
        "matmul_2to4_masked_ms": 1e3 * sparse_s,
        "matmul_ratio": sparse_s / dense_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="stop the CPU sweep at 10M")
    parser.add_argument("--steps", type=int, default=400, help="steps per overhead variant")
    args = parser.parse_args()
    if args.steps < 100 or args.steps % 100:
        parser.error(f"--steps must be a positive multiple of 100, got {args.steps}")
    sizes = [1_000_000, 3_000_000, 10_000_000, 30_000_000, 100_000_000]
    if args.quick:
        sizes = sizes[:3]
    print(f"backend: {jax.default_backend()}  devices: {jax.devices()}")
    rows = refresh_scaling(sizes)
    exponent = _fit_exponent(rows)
    backend = jax.default_backend().upper()
    print(f"\nglobal mask refresh (magnitude + exact global top-k, 90%), {backend}")
    print(f"{'params':>12} {'seconds':>9} {'ns/param':>9}")
    for r in rows:
        print(f"{r['n']:>12,} {r['seconds']:>9.3f} {1e9 * r['seconds'] / r['n']:>9.2f}")
    print(f"log-log slope (1.0 = linear): {exponent:.3f}")
    # The smallest sizes' keys fit in the CPU's caches; above that every
    # probe streams from memory, so this slope is the asymptotic one.
    big = [r for r in rows if r["n"] >= 9_000_000]  # the "10M" size and up
    exponent_big = _fit_exponent(big) if len(big) >= 2 else None
    if exponent_big is not None:
        print(f"log-log slope from 10M up: {exponent_big:.3f}")
    over = step_overhead(args.steps)
    print(f"\nMLP 784-1024-256-10, Adam, batch 128: per-step time, {backend}")
    print(f"  dense            {over['dense_ms']:.3f} ms")
    print(f"  prune, every 100 {over['every_100_ms']:.3f} ms  ({over['ratio_every_100']:.3f}x)")
    print(f"  prune, every step {over['every_step_ms']:.3f} ms  ({over['ratio_every_step']:.3f}x)")
    print(
        f"  state: pruning {over['pruning_state_bytes']:,} B "
        f"({over['bits_per_prunable_param']:.3f} bit/param) vs Adam {over['adam_state_bytes']:,} B"
    )
    big = state_bytes_at(sizes[-1])
    print(f"state at {sizes[-1]:,} params: pruning {big['pruning']:,} B, Adam {big['inner']:,} B")
    result = {
        "cpu_exponent": exponent,
        "cpu_exponent_from_10m": exponent_big,
        "cpu_refresh": rows,
        "ratio_every_100": over["ratio_every_100"],
        "median_ratio_every_100": over["median_ratio_every_100"],
        "ratio_every_step": over["ratio_every_step"],
        "pruning_state_bytes": over["pruning_state_bytes"],
        "adam_state_bytes": over["adam_state_bytes"],
        "bits_per_prunable_param": over["bits_per_prunable_param"],
        "state_bytes_at_max": big,
        "gpu": None,
    }
    if jax.default_backend() == "gpu":
        result["gpu"] = gpu_section(1_000_000_000)
        print(f"\nGPU {result['gpu']['device']}: {json.dumps(result['gpu'])}")
    else:
        print("\nno GPU backend: GPU section skipped")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
