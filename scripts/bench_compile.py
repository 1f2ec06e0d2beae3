"""Time to trace and compile a train step with jp.prune, against the dense step.

Deep models have many prunable leaves, and ``jp.prune`` runs one exact top-k
search per leaf (``scope="layer"``) or one across all of them (``"global"``)
inside the step's refresh branch. This script jits an adam train step (dense,
and ``jp.prune`` with a cubic schedule in each scope) and times ``lower``
(Python tracing and lowering) and ``compile`` (XLA) separately, side by side
in one process. Ratios are to the dense step of the same model.

``--model mlp`` (default): MLPs of ``--layers`` 256-wide layers (65,536
entries per kernel: each search brackets its k-th score by the exact range).
``--model resnet50``: the 53 conv kernels and the classifier of a ResNet-50
(25.5M entries, 37,632 to 2.4M per kernel: the large ones are bracketed from
a strided sample first), each with a bias, under a sum-of-squares loss, so
the dense step is small and the added seconds are the pruning's own; it also
times the first and a later eager ``jp.masks.global_topk`` of the kernels.

Usage: python scripts/bench_compile.py [--model mlp|resnet50] [--layers 20,40,80] [--repeats N]
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


def resnet50_shapes() -> list[tuple[int, ...]]:
    """The kernel shapes of a ResNet-50 (HWIO convs, then the classifier)."""
    shapes, width_in = [(7, 7, 3, 64)], 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [(1, 1, width_in, width), (3, 3, width, width), (1, 1, width, 4 * width)]
            if b == 0:
                shapes.append((1, 1, width_in, 4 * width))  # the projection shortcut
            width_in = 4 * width
    return shapes + [(2048, 1000)]


def resnet50() -> list[dict]:
    keys = jax.random.split(jax.random.key(0), len(resnet50_shapes()))
    return [
        {"kernel": jax.random.normal(k, s) * 0.05, "bias": jnp.zeros(s[-1])}
        for k, s in zip(keys, resnet50_shapes(), strict=True)
    ]


def squares(params, x):
    del x
    return sum(jnp.sum(p["kernel"] ** 2) + jnp.sum(p["bias"] ** 2) for p in params)


def time_step(n_layers: int, scope: str | None, model: str = "mlp") -> tuple[float, float]:
    """Returns ``(lower_s, compile_s)`` of a fresh jitted train step."""
    params, fn = (mlp(n_layers), loss) if model == "mlp" else (resnet50(), squares)
    if scope is None:
        tx = optax.adam(1e-3)
    else:
        sched = jp.schedules.polynomial(0.0, 0.9, begin_step=0, end_step=1000, frequency=10)
        tx = jp.prune(optax.adam(1e-3), sparsity=sched, scope=scope)
    state = tx.init(params)

    @jax.jit
    def step(p, s, x):
        updates, s = tx.update(jax.grad(fn)(p, x), s, p)
        return optax.apply_updates(p, updates), s

    x = jnp.ones((32, WIDTH))
    t0 = time.perf_counter()
    lowered = step.lower(params, state, x)
    t1 = time.perf_counter()
    lowered.compile()
    return t1 - t0, time.perf_counter() - t1


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("mlp", "resnet50"), default="mlp")
    p.add_argument("--layers", default="20,40,80", help="comma-separated MLP depths")
    p.add_argument("--repeats", type=int, default=1, help="best of this many builds")
    args = p.parse_args(argv)
    try:
        depths = [int(v) for v in args.layers.split(",")]
    except ValueError:
        p.error(f"--layers must be comma-separated ints, e.g. 20,40,80; got {args.layers!r}")
    if args.repeats < 1 or min(depths) < 1:
        raise SystemExit("--repeats and every --layers depth must be >= 1")
    if args.model == "resnet50":
        depths = [len(resnet50_shapes())]
        what = "ResNet-50 kernel shapes with biases, sum-of-squares loss"
    else:
        what = f"MLP of {WIDTH}-wide layers"
    print(f"jax {jax.__version__} on {jax.default_backend()}; {what}, adam")
    print(f"{'layers':>6} {'config':>7} {'lower s':>8} {'compile s':>9} {'total / dense':>14}")
    result: dict = {}
    for n in depths:
        row = {}
        for name, scope in (("dense", None), ("layer", "layer"), ("global", "global")):
            runs = [time_step(n, scope, args.model) for _ in range(args.repeats)]
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
    if args.model == "resnet50":
        kernels = [p["kernel"] for p in resnet50()]
        calls = []
        for sparsity in (0.8, 0.9):  # the first call compiles; the second reuses it
            t0 = time.perf_counter()
            jax.block_until_ready(jp.masks.global_topk(kernels, sparsity))
            calls.append(time.perf_counter() - t0)
        print(f"eager jp.masks.global_topk: first call {calls[0]:.2f} s, later {calls[1]:.3f} s")
        result["eager_global_topk_s"] = {"first": calls[0], "later": calls[1]}
    print("RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
