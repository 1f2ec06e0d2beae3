"""Time to trace and compile a train step with jp.prune, against the dense step.

Deep models have many prunable leaves, and ``jp.prune`` runs one exact top-k
search per leaf (``scope="layer"``) or one across all of them (``"global"``)
inside the step's refresh branch. This script builds MLPs of ``--layers``
256-wide layers, jits an adam train step (dense, and ``jp.prune`` with a
cubic schedule in each scope), and times ``lower`` (Python tracing and
lowering) and ``compile`` (XLA) separately, side by side in one process.
Ratios are to the dense step of the same depth.

Usage: python scripts/bench_compile.py [--layers 20,40,80] [--repeats N]
The last line is ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import optax

import jaxprune as jp

WIDTH = 256


def mlp(n_layers: int) -> list[dict]:
    keys = jax.random.split(jax.random.key(0), n_layers)
    return [
        {"kernel": jax.random.normal(k, (WIDTH, WIDTH)) * 0.05, "bias": jnp.zeros(WIDTH)}
        for k in keys
    ]


def loss(params, x):
    for layer in params:
        x = jax.nn.relu(x @ layer["kernel"] + layer["bias"])
    return jnp.mean(x**2)


def time_step(n_layers: int, scope: str | None) -> tuple[float, float]:
    """Returns ``(lower_s, compile_s)`` of a fresh jitted train step."""
    params = mlp(n_layers)
    if scope is None:
        tx = optax.adam(1e-3)
    else:
        sched = jp.schedules.polynomial(0.0, 0.9, begin_step=0, end_step=1000, frequency=10)
        tx = jp.prune(optax.adam(1e-3), sparsity=sched, scope=scope)
    state = tx.init(params)

    @jax.jit
    def step(p, s, x):
        updates, s = tx.update(jax.grad(loss)(p, x), s, p)
        return optax.apply_updates(p, updates), s

    x = jnp.ones((32, WIDTH))
    t0 = time.perf_counter()
    lowered = step.lower(params, state, x)
    t1 = time.perf_counter()
    lowered.compile()
    return t1 - t0, time.perf_counter() - t1


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", default="20,40,80", help="comma-separated depths")
    p.add_argument("--repeats", type=int, default=1, help="best of this many builds")
    args = p.parse_args(argv)
    try:
        depths = [int(v) for v in args.layers.split(",")]
    except ValueError:
        p.error(f"--layers must be comma-separated ints, e.g. 20,40,80; got {args.layers!r}")
    if args.repeats < 1 or min(depths) < 1:
        raise SystemExit("--repeats and every --layers depth must be >= 1")
    print(f"jax {jax.__version__} on {jax.default_backend()}; MLP of {WIDTH}-wide layers, adam")
    print(f"{'layers':>6} {'config':>7} {'lower s':>8} {'compile s':>9} {'total / dense':>14}")
    result: dict = {}
    for n in depths:
        row = {}
        for name, scope in (("dense", None), ("layer", "layer"), ("global", "global")):
            runs = [time_step(n, scope) for _ in range(args.repeats)]
            low, comp = min(runs, key=sum)
            row[name] = {"lower_s": low, "compile_s": comp}
        dense = row["dense"]["lower_s"] + row["dense"]["compile_s"]
        for name, r in row.items():
            total = r["lower_s"] + r["compile_s"]
            r["total_over_dense"] = total / dense
            print(
                f"{n:>6} {name:>7} {r['lower_s']:>8.2f} {r['compile_s']:>9.2f} "
                f"{r['total_over_dense']:>13.1f}x",
                flush=True,
            )
        result[str(n)] = row
    print("RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
