"""Where the fixed per-step cost of ``jp.prune`` comes from on XLA:CPU.

``scripts/bench_overhead.py`` measures a few percent of overhead on steps that
never refresh the masks. This diagnostic takes that cost apart on the same MLP
and harness (params and state donated, interleaved blocks, median of paired
ratios against the dense step), with hand-built variants of the pruning
transform that differ in one thing each:

* ``no-cond``: packed masks unpacked and enforced, no refresh code at all;
* ``cond-trivial``: plus a never-taken ``lax.cond`` whose branch flips the bits;
* ``cond-topk``: the branch is a per-layer top-k refresh of stored scores
  (``topk(magnitude(params))``, what ``jp.prune`` does for a criterion it cannot fuse);
* ``cond-fused``: the branch is ``jp.prune``'s refresh for magnitude, with the
  scores recomputed inside the search and never stored;
* ``cond-fused-first``: the same for the first (largest) kernel only;
* ``cond-fused-after-grads``: ``cond-fused`` with the predicate also computed
  from one entry of every gradient (a run-time zero), which makes XLA place
  the cond after the backward pass instead of amid the forward pass;
* ``cond-whole``: the whole update (enforcement and the inner optimizer) inside
  the cond, one branch with ``cond-fused``'s refresh and one without, so the
  refresh shares no thunk graph with the step's optimizer work;
* ``cond-callback``: ``cond-fused``'s refresh computed by a separately jitted
  function that the branch calls through ``jax.pure_callback``, so the branch
  holds one custom call and no count;
* ``cond-reads-params``: a trivial branch that reads one entry of every kernel;
* ``cond-loop``: a trivial branch with a small ``while_loop``;
* ``cond-scratch-K``: the branch is trivial except for an inert scratch buffer
  of ``K`` x 64K floats (a cumulative sum), so only the size of XLA's
  preallocated temporary buffer changes.
* ``cond-elem``: the branch recomputes the packed masks from the params with
  element-wise operations only (``pack(|w| > 0.1)``), no reduction;
* ``cond-elem-old``: the same masks XORed with the old packed bits (the
  branch also reads the masks it replaces);
* ``cond-count-fresh``: a count per kernel that only shifts the threshold of
  freshly computed masks (the branch does not read the old bits);
* ``cond-count``: the branch counts ``|w| > 0.1`` over each kernel (one
  reduction per kernel) and flips the bits with the result;
* ``cond-count-small``: the same over each kernel's first 1024 entries;
* ``cond-count-dot``: the same count as a matrix-vector product;
* ``cond-count-loop``: three to nine such counts in a ``while_loop``;
* ``cond-count-tree`` / ``cond-count-tree-small``: ``cond-count`` /
  ``cond-count-small`` with each count taken by element-wise adds of 16
  slices per level, so the branch holds no ``reduce`` op at all;
* ``cond-kth``: a per-kernel k-th-smallest-key search (``kth_smallest_keys``)
  and a strict threshold, without ``jp.prune``'s tie handling.

Each row also prints that temp size (``compiled.memory_analysis()``). On the
development machine the never-taken cond itself cost nothing measurable. A
branch of element-wise operations that reads every kernel (``cond-elem``) cost
nothing measurable either, nor did reading the old bits (``cond-elem-old``);
a branch with a count in it cost 1-2% even over 1024 entries
(``cond-count-small``), whether the count is a ``reduce`` or not
(``cond-count-tree``), and the k-th-key search as much as ``jp.prune``'s whole
refresh (BENCHMARKS.md, "Which branches cost"); the whole update inside the
cond (``cond-whole``) cost over 20%, and the refresh behind a host callback
(``cond-callback``) more than ``cond-fused``.
Pinned to one core (``taskset -c 0``) the refresh branch costs nothing; on two
cores it does, and ``scripts/diag_thunk_graph.py`` lists the orderings between
thunks that XLA:CPU's buffer reuse adds.

Usage: python scripts/diag_cond_layout.py [--rounds 200] [--block 20]
The last line is ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import functools
import json
import operator
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_overhead import make_step, mlp_init  # noqa: E402

import jaxprune as jp  # noqa: E402
from jaxprune import masks as M  # noqa: E402


def _zero_after(tree) -> jax.Array:
    """An int32 0 that XLA cannot fold, computed from the first entry of every leaf."""
    zero = jnp.zeros((), jnp.uint32)
    for x in jax.tree.leaves(tree):
        bits = jax.lax.bitcast_convert_type(x.reshape(-1)[0].astype(jnp.float32), jnp.uint32)
        zero = zero | ((bits & jnp.uint32(0x7FFFFFFF)) >> 31)
    return zero.astype(jnp.int32)


def _tree_count(x: jax.Array) -> jax.Array:
    """The sum of a 1-D int32 array by adds of 16 slices per level: no ``reduce`` op."""
    n = x.size
    while n > 1:
        m = -(-n // 16)
        x = jnp.pad(x, (0, 16 * m - n)).reshape(16, m)
        x = functools.reduce(operator.add, [x[i] for i in range(16)])
        n = m
    return x[0]


# Every variant's schedule: a refresh at step 0 only (the warm-up), none while timed.
_SCHED = jp.schedules.polynomial(0.0, 0.9, 0, 10**7, frequency=10**9)


def _fused(params, step):
    """``jp.prune``'s packed refresh for magnitude, layer scope (``cond-fused``'s branch)."""
    flags = jp._tree.prunable_flags(params, None)
    return M.pack(M.fused_select("layer", jp.criteria.magnitude, params, _SCHED(step), flags))


_fused_jit = jax.jit(_fused)


def _host_refresh(params, step):
    return jax.tree.map(np.asarray, _fused_jit(params, step))


# The never-taken branches this script can build (see variant).
KINDS = [
    "no-cond",
    "cond-trivial",
    "cond-reads-params",
    "cond-loop",
    "cond-elem",
    "cond-elem-old",
    "cond-count",
    "cond-count-fresh",
    "cond-count-small",
    "cond-count-dot",
    "cond-count-loop",
    "cond-count-tree",
    "cond-count-tree-small",
    "cond-kth",
    "cond-topk",
    "cond-fused",
    "cond-fused-first",
    "cond-fused-after-grads",
    "cond-whole",
    "cond-callback",
] + [f"cond-scratch-{k}" for k in (4, 8, 12, 16, 24)]


def variant(kind: str) -> optax.GradientTransformation:
    """A minimal pruning transform (packed masks, enforced every step) with one refresh kind."""
    inner = optax.adam(1e-3)
    sched = _SCHED

    def init(params):
        flags = jp._tree.prunable_flags(params, None)
        leaves, treedef = jax.tree.flatten(params)
        packed = [
            M.pack(jnp.ones(p.shape, bool)) if f else jnp.ones((), bool)
            for p, f in zip(leaves, flags, strict=True)
        ]
        return jnp.zeros((), jnp.int32), jax.tree.unflatten(treedef, packed), inner.init(params)

    def refresh(params, step, packed):
        if kind == "cond-trivial":
            return jax.tree.map(lambda a: a ^ jnp.ones_like(a), packed)
        if kind == "cond-topk":
            return M.pack(M.topk(jp.criteria.magnitude(params), sched(step)))
        if kind in ("cond-fused", "cond-fused-after-grads", "cond-whole"):
            return _fused(params, step)
        if kind == "cond-fused-first":  # the same, first (largest) kernel only
            first = M.fused_select(
                "layer", jp.criteria.magnitude, params[:1], sched(step), [False, True]
            )
            return M.pack(first) + list(packed[1:])
        if kind == "cond-callback":  # jp.prune's refresh, run on the host by a callback
            return jax.pure_callback(
                _host_refresh, jax.eval_shape(_fused, params, step), params, step
            )
        if kind == "cond-elem-old":  # element-wise, also reading the old bits
            return [
                {
                    "kernel": jax.tree.map(
                        operator.xor, M.pack(jnp.abs(layer["kernel"]) > 0.1), old["kernel"]
                    ),
                    "bias": old["bias"],
                }
                for layer, old in zip(params, packed, strict=True)
            ]
        if kind == "cond-count-fresh":  # one count per kernel, masks written without the old bits
            out = []
            for layer, old in zip(params, packed, strict=True):
                w = layer["kernel"]
                t = 0.1 + jnp.sum(jnp.abs(w) > 0.1).astype(jnp.float32) * 1e-12
                out.append({"kernel": M.pack(jnp.abs(w) > t), "bias": old["bias"]})
            return out
        if kind == "cond-elem":  # element-wise only: recomputed masks, no reduction
            return [
                {"kernel": M.pack(jnp.abs(layer["kernel"]) > 0.1), "bias": old["bias"]}
                for layer, old in zip(params, packed, strict=True)
            ]
        if kind in (  # one count per kernel
            "cond-count",
            "cond-count-small",
            "cond-count-dot",
            "cond-count-tree",
            "cond-count-tree-small",
        ):
            out = []
            for layer, old in zip(params, packed, strict=True):
                w = layer["kernel"]
                if kind.endswith("-small"):
                    w = w.ravel()[:1024]
                if kind.startswith("cond-count-tree"):
                    c = _tree_count((jnp.abs(w) > 0.1).astype(jnp.int32).ravel()) > 5
                elif kind == "cond-count-dot":
                    big = (jnp.abs(w) > 0.1).astype(jnp.float32)
                    c = jnp.sum(big @ jnp.ones((w.shape[1],), jnp.float32)) > 5
                else:
                    c = jnp.sum(jnp.abs(w) > 0.1) > 5
                out.append(
                    {
                        "kernel": jax.tree.map(lambda b, c=c: b ^ c, old["kernel"]),
                        "bias": old["bias"],
                    }
                )
            return out
        if kind == "cond-count-loop":  # a few counts over every kernel in a while loop

            def count_body(c):
                i, t = c
                n = sum(jnp.sum(jnp.abs(layer["kernel"]) > t) for layer in params)
                return i + 1, t * 0.5 + n.astype(jnp.float32) * 1e-9

            t = jax.lax.while_loop(
                lambda c: c[0] < 3 + step % 7, count_body, (jnp.int32(0), jnp.float32(0.1))
            )[1]
            return [
                {"kernel": M.pack(jnp.abs(layer["kernel"]) > t), "bias": old["bias"]}
                for layer, old in zip(params, packed, strict=True)
            ]
        if kind == "cond-kth":  # per-kernel k-th key search, strict threshold, no tie handling
            out = []
            for layer, old in zip(params, packed, strict=True):
                keys = M.ordered_keys(jnp.abs(layer["kernel"]))
                k = jnp.round(sched(step) * keys.size).astype(jnp.int32)
                t = M.kth_smallest_keys([keys], k)[0]
                out.append({"kernel": M.pack(keys > t), "bias": old["bias"]})
            return out
        if kind == "cond-loop":  # a small while loop over the packed masks

            def body(c):
                return c[0] + 1, jax.tree.map(lambda a: a ^ jnp.ones_like(a), c[1])

            return jax.lax.while_loop(lambda c: c[0] < step % 7, body, (jnp.int32(0), packed))[1]
        if kind == "cond-reads-params":  # trivial, but reads every kernel
            t = sum(layer["kernel"][1, 1] for layer in params)
            return jax.tree.map(lambda a: a ^ (t > 0), packed)
        k = int(kind.rsplit("-", 1)[1])  # cond-scratch-K
        first = params[0]["kernel"].ravel()[:65536]
        t = jnp.cumsum(jnp.tile(first, k))[-1]
        return [
            {"kernel": M.pack(jnp.abs(layer["kernel"]) > t), "bias": jnp.ones((), bool)}
            for layer in params
        ]

    def enforced_step(grads, inner_state, params, packed):
        flags = jp._tree.prunable_flags(params, None)
        masks = jax.tree.leaves(M.unpack(packed))
        g, treedef = jax.tree.flatten(grads)
        g = [jnp.where(m, x, 0) if f else x for x, m, f in zip(g, masks, flags, strict=True)]
        u, inner_state = inner.update(jax.tree.unflatten(treedef, g), inner_state, params)
        ps = jax.tree.leaves(params)
        u = [
            jnp.where(m, x, -p) if f else x
            for x, m, p, f in zip(jax.tree.leaves(u), masks, ps, flags, strict=True)
        ]
        return jax.tree.unflatten(treedef, u), inner_state

    def update(grads, state, params):
        step, packed, inner_state = state
        if kind == "cond-fused-after-grads":
            step = step + _zero_after(grads)
        if kind == "cond-whole":  # the whole update in the cond, once with a refresh, once without

            def with_refresh():
                new = refresh(params, step, packed)
                return *enforced_step(grads, inner_state, params, new), new

            def without():
                return *enforced_step(grads, inner_state, params, packed), packed

            u, inner_state, packed = jax.lax.cond(sched.is_update_step(step), with_refresh, without)
            return u, (step + 1, packed, inner_state)
        if kind != "no-cond":
            packed = jax.lax.cond(
                sched.is_update_step(step), lambda: refresh(params, step, packed), lambda: packed
            )
        u, inner_state = enforced_step(grads, inner_state, params, packed)
        return u, (step + 1, packed, inner_state)

    return optax.GradientTransformation(init, update)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--block", type=int, default=20, help="steps per timed block")
    parser.add_argument("--variants", default=None, help="comma-separated subset (default: all)")
    args = parser.parse_args()
    if args.rounds < 1 or args.block < 1:
        parser.error(f"--rounds and --block must be >= 1, got {args.rounds} and {args.block}")
    params = mlp_init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (128, 784))
    y = jax.random.randint(jax.random.key(2), (128,), 0, 10)
    kinds = list(KINDS)
    if args.variants:
        chosen = args.variants.split(",")
        unknown = sorted(set(chosen) - set(kinds))
        if unknown:
            parser.error(f"--variants: unknown {unknown}; choose from {kinds}")
        kinds = [k for k in kinds if k in chosen]
    configs = {"dense": optax.adam(1e-3), **{k: variant(k) for k in kinds}}
    steps, carries, temp_mb = {}, {}, {}
    for name, tx in configs.items():
        steps[name] = make_step(tx)
        state = tx.init(params)
        compiled = steps[name].lower(params, state, x, y).compile()
        temp_mb[name] = compiled.memory_analysis().temp_size_in_bytes / 1e6
        carries[name] = (jax.tree.map(jnp.copy, params), state)

    def block(name, n):
        p, s = carries[name]
        t0 = time.perf_counter()
        for _ in range(n):
            p, s = steps[name](p, s, x, y)
        jax.block_until_ready(p)
        carries[name] = (p, s)
        return time.perf_counter() - t0

    for name in configs:
        block(name, 3)
    names = list(configs)
    ratios = {name: [] for name in names if name != "dense"}
    for r in range(args.rounds):
        times = {n: block(n, args.block) for n in names[r % len(names) :] + names[: r % len(names)]}
        for name in ratios:
            ratios[name].append(times[name] / times["dense"])
    print(f"jax {jax.__version__}; {args.rounds} rounds x {args.block} steps, median ratios")
    print(f"{'variant':<24}{'temp MB':>9}{'step / dense':>14}")
    print(f"{'dense':<24}{temp_mb['dense']:>9.2f}{1.0:>13.3f}x")
    out = {}
    for name, rs in ratios.items():
        out[name] = {"temp_mb": round(temp_mb[name], 3), "ratio": statistics.median(rs)}
        print(f"{name:<24}{temp_mb[name]:>9.2f}{out[name]['ratio']:>13.3f}x")
    print("RESULT " + json.dumps({"dense_temp_mb": temp_mb["dense"], **out}))


if __name__ == "__main__":
    main()
