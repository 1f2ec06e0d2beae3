"""Magnitude vs Wanda vs SparseGPT on the small GPT of ``tests/test_llm.py``, over seeds.

For each seed: generate a second-order Markov language (vocab 32), train the
2-block GPT (dim 64) on it for ``--steps`` steps, prune every block's linear
layers one-shot from 64 calibration sequences, and measure the mean layer
reconstruction error and the perplexity on 128 test sequences. Rows:

* 50% with the per-layer comparison group (magnitude's default);
* 50% with the per-output group (Wanda's default);
* 2:4 (groups of 4 inputs of each output unit, for all three methods).

SparseGPT ranks within its own 128-column blocks, so it has one row per
sparsity whatever the group.

Usage: python scripts/compare_llm.py [--seeds 0 1 2] [--steps 250]
The last line is ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jaxprune import llm
from jaxprune.models_llm import GPT, markov_corpus, train_lm

VOCAB, TIME = 32, 32
SETTINGS = (  # (label, nm, group)
    ("50% per layer", None, "layer"),
    ("50% per output", None, "output"),
    ("2:4", (2, 4), None),
)


def run_seed(seed: int, steps: int, bar) -> dict:
    train, calib, test = markov_corpus(vocab=VOCAB, time=TIME, sizes=(2048, 64, 128), seed=seed)
    model = GPT(vocab=VOCAB, dim=64, depth=2, heads=4, max_len=TIME, rngs=nnx.Rngs(seed))
    train_lm(model, train, steps=steps, batch_size=32, lr=1e-2, key=jax.random.key(seed))
    out = {"dense": llm.perplexity(model, test)}
    sgpt = {}  # by nm: SparseGPT takes no group
    for label, nm, group in SETTINGS:
        for method in llm.METHODS:
            if method == "sparsegpt" and nm in sgpt:
                out[f"{label}/{method}"] = sgpt[nm]
                continue
            pruned, errors = llm.prune_decoder(
                model,
                calib,
                method=method,
                sparsity=0.5,
                nm=nm,
                group=None if method == "sparsegpt" else group,
            )
            res = {
                "ppl": llm.perplexity(pruned, test),
                "error": float(np.mean(list(errors.values()))),
            }
            out[f"{label}/{method}"] = res
            if method == "sparsegpt":
                sgpt[nm] = res
            bar.update(1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=250, help="training steps of each model")
    args = parser.parse_args()
    t0 = time.time()
    # One pruning run per (setting, method), SparseGPT once per distinct nm.
    n_sgpt = len({nm for _, nm, _ in SETTINGS})
    per_run = len(SETTINGS) * (len(llm.METHODS) - 1) + n_sgpt
    with tqdm(total=per_run * len(args.seeds), desc="prune", unit="run") as bar:
        results = {s: run_seed(s, args.steps, bar) for s in args.seeds}

    heads = " | ".join(f"seed {s} ppl (error)" for s in args.seeds)
    print(f"\n| setting | method | {heads} |")
    print("|---|---|" + "---|" * len(args.seeds))
    print("| dense | | " + " | ".join(f"{results[s]['dense']:.3f}" for s in args.seeds) + " |")
    for label, _, _ in SETTINGS:
        for method in llm.METHODS:
            cells = [results[s][f"{label}/{method}"] for s in args.seeds]
            row = " | ".join(f"{c['ppl']:.3f} ({c['error']:.4f})" for c in cells)
            print(f"| {label} | {method} | {row} |")
    orders = {}
    for label, _, _ in SETTINGS:
        ok = 0
        for s in args.seeds:
            r = results[s]
            ppl = [r[f"{label}/{m}"]["ppl"] for m in ("sparsegpt", "wanda", "magnitude")]
            ok += ppl[0] <= ppl[1] <= ppl[2]
        orders[label] = f"{ok}/{len(args.seeds)}"
    print(f"\nperplexity order SparseGPT <= Wanda <= magnitude held in: {orders}")
    print(f"({time.time() - t0:.0f} s)")
    summary = {
        str(s): {k: (v if k == "dense" else v["ppl"]) for k, v in r.items()}
        for s, r in results.items()
    }
    print("RESULT " + json.dumps({"order_held": orders, "perplexity": summary}))


if __name__ == "__main__":
    main()
