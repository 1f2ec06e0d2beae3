"""First-call latency of eager calls: pruning at initialization and eager transform updates.

Each case runs in a fresh process (a first call is one per process) on a
784-1024-256-10 MLP with a batch of 128, and reports the wall time and the
number of XLA compilations (``jax_log_compiles``) of its first call and of a
later one:

- ``snip``, ``grasp``, ``synflow``: ``jp.at_init``'s functions, called twice;
- ``prune``: ``tx.update`` of a ``jp.prune`` transform called eagerly, then
  of a second transform built anew with the same configuration;
- ``inject``: ``optax.inject_hyperparams`` around ``jp.prune`` (which builds
  a new ``jp.prune`` at every update), steps 2-4 against step 1;
- ``rigl``: ``tx.update`` of ``jp.dynamic.rigl``, then of a second one built
  anew with the same configuration.

With ``--baseline DIR`` (a folder holding another version's ``jaxprune``
package, e.g. from ``git archive REV jaxprune | tar -x -C DIR``) each case
also runs on that version, alternating with this one, side by side.

Usage: python scripts/bench_first_call.py [--cases snip,grasp] [--rounds N] [--baseline DIR]
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

CASES = ("snip", "grasp", "synflow", "prune", "inject", "rigl")


def child(case: str) -> dict:
    """Runs one case in this process; returns its timings and compile counts."""
    import logging

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import jaxprune as jp

    compiles = [0]

    class Count(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("Finished XLA compilation"):
                compiles[0] += 1

    logger = logging.getLogger("jax")
    logger.addHandler(Count())
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    jax.config.update("jax_log_compiles", True)

    sizes = (784, 1024, 256, 10)
    keys = jax.random.split(jax.random.key(0), len(sizes) - 1)
    params = {
        f"l{i}": {"kernel": jax.random.normal(k, (a, b)) / np.sqrt(a), "bias": jnp.zeros(b)}
        for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:], strict=True))
    }

    def apply(p, x):
        for i in range(len(p)):
            x = x @ p[f"l{i}"]["kernel"] + p[f"l{i}"]["bias"]
            x = jax.nn.relu(x) if i < len(p) - 1 else x
        return x

    def loss(p, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(apply(p, x), y).mean()

    x = jax.random.normal(jax.random.key(1), (128, 784))
    y = jax.random.randint(jax.random.key(2), (128,), 0, 10)
    params, x, y = jax.block_until_ready((params, x, y))

    def timed(fn):
        c0, t0 = compiles[0], time.perf_counter()
        jax.block_until_ready(fn())
        return time.perf_counter() - t0, compiles[0] - c0

    def sched():
        return jp.schedules.polynomial(0.0, 0.9, 0, 10, frequency=2)

    if case in ("snip", "grasp", "synflow"):
        fn = {
            "snip": lambda: jp.at_init.snip(loss, params, x, y),
            "grasp": lambda: jp.at_init.grasp(loss, params, x, y),
            "synflow": lambda: jp.at_init.synflow(apply, params, (1, 784), 0.9, iterations=10),
        }[case]
        first, later = timed(fn), timed(fn)
    elif case in ("prune", "rigl"):

        def make():
            if case == "prune":
                return jp.prune(optax.adam(1e-3), sparsity=sched())
            return jp.dynamic.rigl(
                optax.adam(1e-3), sparsity=0.9, key=jax.random.key(3), end_step=1000
            )

        tx, tx2 = make(), make()
        st, st2 = tx.init(params), tx2.init(params)
        grads = jax.block_until_ready(jax.grad(loss)(params, x, y))
        first = timed(lambda: tx.update(grads, st, params))
        later = timed(lambda: tx2.update(grads, st2, params))
    else:  # inject
        tx = optax.inject_hyperparams(
            lambda learning_rate: jp.prune(optax.adam(learning_rate), sparsity=sched())
        )(learning_rate=1e-3)
        st, p = tx.init(params), params
        grads = jax.block_until_ready(jax.grad(loss)(params, x, y))
        runs = []
        for _ in range(4):
            out = {}

            def step(st=st, p=p, out=out):
                out["u"], out["st"] = tx.update(grads, st, p)
                return out["u"]

            runs.append(timed(step))
            p, st = optax.apply_updates(p, out["u"]), out["st"]
        first = runs[0]
        later = (statistics.median(r[0] for r in runs[1:]), max(r[1] for r in runs[1:]))
    return {"first_s": first[0], "first_compiles": first[1], "later_s": later[0],
            "later_compiles": later[1]}  # fmt: skip


def run(case: str, path: str | None) -> dict:
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    if path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [path, env.get("PYTHONPATH")]))
    out = subprocess.run(
        [sys.executable, __file__, "--child", case],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("CHILD ")][-1]
    return json.loads(line.removeprefix("CHILD "))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--baseline", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("CHILD " + json.dumps(child(args.child)))
        return
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; choose from {', '.join(CASES)}")
    versions = {"this": None} | ({"baseline": args.baseline} if args.baseline else {})
    results: dict = {}
    for case in cases:
        for _ in range(args.rounds):
            for name, path in reversed(versions.items()):  # the baseline first
                results.setdefault(case, {}).setdefault(name, []).append(run(case, path))
    print(f"{'case':8} {'version':9} {'first call':>18} {'later call':>18}")
    summary = {}
    for case, by_version in results.items():
        for name, rows in by_version.items():
            med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
            summary.setdefault(case, {})[name] = med
            print(
                f"{case:8} {name:9} {med['first_s'] * 1e3:9.0f} ms {med['first_compiles']:3.0f} "
                f"progs {med['later_s'] * 1e3:9.1f} ms {med['later_compiles']:3.0f} progs"
            )
    print("RESULT " + json.dumps(summary))


if __name__ == "__main__":
    main()
