"""Pruning criteria and algorithms compared on Fashion-MNIST (ShrinkBench conventions).

LeNet-300-100 and LeNet-5 (Caffe), test accuracy vs compression ratio
(total params / nonzero params, biases included) for: magnitude (per layer and
global), random, EMA saliency, Taylor, movement, OBD, SNIP, SynFlow, RigL and
lottery tickets; mean and std over seeds. Every method of one seed starts from
the same initialization and, when it prunes a trained network, from the same
dense model, and sees the same data pipeline (fixed-size shuffled batches,
per-seed order).

Protocols (step counts in ``CONFIGS``; shortened to fit the shared 2-core CPU
the benchmark was run on, so accuracies are below fully trained ones):

* dense: ``D`` Adam steps from ``theta_0`` (the snapshot ``theta_k`` at step
  ``~D / 10`` is kept for lottery-ticket rewinding).
* after training (magnitude, random, saliency, Taylor, movement, OBD): ``F``
  fine-tuning steps (half the learning rate) from the dense model under
  ``jp.prune`` with a cubic schedule from 0 to the target sparsity over the
  first half, masks refreshed every ``F / 10`` steps (Zhu & Gupta). Random
  scores are drawn once per seed, so its masks are nested across refreshes.
  OBD's Hessian diagonal is the per-example empirical Fisher of the dense model
  on 512 training images, passed to ``tx.update`` as ``hessian_diag=``. The
  rows are, exactly: saliency ``jp.criteria.ema_saliency(0.9)`` (|w * g|
  averaged over steps, not one step's ``saliency``), taylor
  ``jp.criteria.taylor_ema(0.9, group="entry")`` (per weight, not Molchanov's
  per-unit score), movement ``jp.criteria.movement()``, OBD ``jp.criteria.obd``,
  all per layer; magnitude per layer and global.
* at initialization (SNIP on one batch of 256, SynFlow with 100 iterations):
  masks fixed at ``theta_0``, then ``D`` training steps.
* RigL: ``D`` steps sparse from scratch (ERK, drop fraction 0.3 cosine,
  updates every ``D // 10`` steps until 75% of training).
* lottery ticket: one round per ratio, in increasing order: global magnitude
  pruning of the previous round's trained weights to the next ratio, survivors
  rewound to ``theta_k``, then the remaining ``D - k`` steps.

Run: ``python scripts/compare_criteria.py`` (writes ``docs/compare_criteria.md``,
``docs/compare_criteria.png``, ``docs/dense_baseline.json``), or ``--quick``
(LeNet-300-100, one seed, ratio 12, a subset of methods; prints ``RESULT {json}``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

import jaxprune as jp
import jaxprune.at_init
import jaxprune.data
import jaxprune.distributions
import jaxprune.drivers
import jaxprune.dynamic
import jaxprune.models  # noqa: F401

CHUNK = 25  # steps per jitted scan call

CONFIGS = {
    "full": {
        "lenet-300-100": dict(
            batch=128, dense_steps=300, finetune_steps=150, lr=2e-3, test_size=10000
        ),
        "lenet-5": dict(batch=32, dense_steps=100, finetune_steps=50, lr=2e-3, test_size=2000),
        "ratios": [2, 4, 8, 16, 32, 64],
        "seeds": 3,
    },
    "smoke": {  # every method on both models in a minute or two: checks the script runs
        "lenet-300-100": dict(batch=64, dense_steps=50, finetune_steps=25, lr=2e-3, test_size=2000),
        "lenet-5": dict(batch=32, dense_steps=50, finetune_steps=25, lr=2e-3, test_size=1000),
        "ratios": [4, 16],
        "seeds": 1,
    },
    "quick": {
        "lenet-300-100": dict(
            batch=128, dense_steps=300, finetune_steps=150, lr=2e-3, test_size=10000
        ),
        "ratios": [12],
        "seeds": 1,
    },
}
ALL_METHODS = [
    "magnitude (layer)",
    "magnitude (global)",
    "random",
    "saliency",
    "taylor",
    "movement",
    "obd",
    "snip",
    "synflow",
    "rigl",
    "lottery ticket",
]
QUICK_METHODS = ["magnitude (layer)", "magnitude (global)", "random", "saliency", "snip"]


# --- models: the jp.models params, applied as pure functions -----------------------------


def _pool(x):
    n, h, w, c = x.shape
    # A reshape-max: XLA:CPU's select-and-scatter (the max_pool gradient) is ~10x slower.
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _conv(x, k, b):
    # im2col + matmul: the same VALID convolution as nnx.Conv, ~10x faster to
    # differentiate on XLA:CPU than conv_general_dilated.
    kh, kw, ci, co = k.shape
    oh, ow = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    cols = jnp.concatenate(
        [x[:, i : i + oh, j : j + ow, :] for i in range(kh) for j in range(kw)], axis=-1
    )
    return cols @ k.reshape(kh * kw * ci, co) + b


def mlp_apply(p, x):
    x = x.reshape(x.shape[0], -1)
    n = len(p["layers"])
    for i in range(n):
        x = x @ p["layers"][i]["kernel"] + p["layers"][i]["bias"]
        if i < n - 1:
            x = jax.nn.relu(x)
    return x


def lenet5_apply(p, x):
    x = _pool(jax.nn.relu(_conv(x, p["conv1"]["kernel"], p["conv1"]["bias"])))
    x = _pool(jax.nn.relu(_conv(x, p["conv2"]["kernel"], p["conv2"]["bias"])))
    x = x.reshape(x.shape[0], -1)
    x = jax.nn.relu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])
    return x @ p["fc2"]["kernel"] + p["fc2"]["bias"]


def init_params(model: str, seed: int) -> dict:
    rngs = nnx.Rngs(seed)
    m = (
        jp.models.lenet_300_100(rngs=rngs)
        if model == "lenet-300-100"
        else (jp.models.LeNet5Caffe(rngs=rngs))
    )
    return nnx.to_pure_dict(nnx.state(m, nnx.Param))


APPLY = {"lenet-300-100": mlp_apply, "lenet-5": lenet5_apply}


def macs(model: str, params: dict) -> float:
    """Multiply-adds of one forward pass counting only nonzero weights (ShrinkBench)."""
    nz = lambda k: float(np.count_nonzero(np.asarray(k)))  # noqa: E731
    if model == "lenet-300-100":
        return sum(nz(layer["kernel"]) for layer in params["layers"].values())
    return (
        nz(params["conv1"]["kernel"]) * 24 * 24
        + nz(params["conv2"]["kernel"]) * 8 * 8
        + nz(params["fc1"]["kernel"])
        + nz(params["fc2"]["kernel"])
    )


# --- one experiment ----------------------------------------------------------------------


class Bench:
    """Holds the data, the model and the jitted step functions of one model."""

    def __init__(self, model: str, cfg: dict, data: Any):
        self.model, self.cfg = model, cfg
        self.apply = APPLY[model]
        mean, std = 0.2860, 0.3530
        self.x_train = jnp.asarray((data.x_train - mean) / std)
        self.y_train = jnp.asarray(data.y_train)
        # The first test_size test images (all 10,000 unless shortened for time).
        n_test = cfg["test_size"]
        self.x_test = jnp.asarray((data.x_test[:n_test] - mean) / std)
        self.y_test = jnp.asarray(data.y_test[:n_test])
        self._jitted: dict[str, Callable] = {}
        template = init_params(model, 0)
        flat = jax.tree.leaves(template)
        self.total = sum(x.size for x in flat)
        self.n_prunable = sum(x.size for x in flat if x.ndim >= 2)

    def loss(self, p, idx):
        logits = self.apply(p, self.x_train[idx])
        return optax.softmax_cross_entropy_with_integer_labels(logits, self.y_train[idx]).mean()

    def sparsity_for(self, ratio: float) -> float:
        """Prunable-leaf sparsity giving total/nonzero = ratio with biases kept."""
        keep = self.total / ratio - (self.total - self.n_prunable)
        return 1.0 - keep / self.n_prunable

    def order(self, seed: int, steps: int, stream: int) -> np.ndarray:
        rng = np.random.default_rng([seed, stream])
        n, b = len(self.y_train), self.cfg["batch"]
        epochs = math.ceil(steps * b / n) + 1
        idx = np.concatenate([rng.permutation(n) for _ in range(epochs)])
        return idx[: steps * b].reshape(steps, b)

    def run(self, name, tx, params, steps: int, seed: int, stream: int, extra=None, state=None):
        """Trains ``steps`` steps with ``tx`` (jit cached by ``name``); returns (params, state)."""
        extra = extra or {}
        if name not in self._jitted:

            def chunk(p, s, idx, extra):
                def body(c, i):
                    p, s = c
                    g = jax.grad(self.loss)(p, i)
                    u, s = tx.update(g, s, p, **extra)
                    return (optax.apply_updates(p, u), s), None

                return jax.lax.scan(body, (p, s), idx)[0]

            self._jitted[name] = jax.jit(chunk)
        fn = self._jitted[name]
        state = tx.init(params) if state is None else state
        order = self.order(seed, steps, stream)
        for start in range(0, steps, CHUNK):
            params, state = fn(params, state, jnp.asarray(order[start : start + CHUNK]), extra)
        return params, state

    def accuracy(self, params) -> float:
        if "eval" not in self._jitted:
            self._jitted["eval"] = jax.jit(
                lambda p, x, y: jnp.sum(jnp.argmax(self.apply(p, x), -1) == y)
            )
        f = self._jitted["eval"]
        correct = sum(
            int(f(params, self.x_test[i : i + 1000], self.y_test[i : i + 1000]))
            for i in range(0, len(self.y_test), 1000)
        )
        return 100.0 * correct / len(self.y_test)


def fixed_masks_tx(lr: float):
    """Adam with masks given at run time (a traced input, so one compile for all masks)."""
    inner = optax.adam(lr)

    def init(params):
        return inner.init(params)

    def update(g, s, p, masks):
        g = jax.tree.map(lambda g, m: jnp.where(m, g, 0.0), g, masks)
        u, s = inner.update(g, s, p)
        return jax.tree.map(lambda u, m, p: jnp.where(m, u, -p), u, masks, p), s

    return optax.GradientTransformationExtraArgs(init, update)


def _full_masks(params, masks):
    return jax.tree.map(lambda p, m: jnp.broadcast_to(m, p.shape), params, masks)


def with_target(criterion):
    """Wraps a criterion to also hand the run-time target sparsity to the selection.

    The target reaches the criterion as an extra ``tx.update`` argument (traced),
    so one compiled train step serves every compression ratio.
    """
    if isinstance(criterion, jp.criteria.StatefulCriterion):
        return jp.criteria.StatefulCriterion(
            init=criterion.init,
            update=criterion.update,
            score=lambda state, params, target, **kw: _carry_target(
                jp.criteria.call_with(criterion.score, state, params, **kw), target
            ),
        )
    return lambda params, grads, target, **kw: _carry_target(
        jp.criteria.call_with(criterion, params, grads=grads, **kw), target
    )


def _carry_target(scores, target):
    """Returns ``scores`` with ``target`` written over the first 1-D (never pruned) leaf.

    The scores keep the params' leaves (jp.prune checks them); the selection
    reads the target back from that leaf (:func:`scaled`).
    """
    leaves, treedef = jax.tree.flatten(scores)
    i = next(j for j, x in enumerate(leaves) if jnp.ndim(x) == 1)
    leaves[i] = jnp.full(jnp.shape(leaves[i]), target, jnp.float32)
    return jax.tree.unflatten(treedef, leaves)


def scaled(select):
    """A selection pruning ``schedule progress * target`` (see :func:`with_target`)."""

    def fn(scores, s, *, where=None):
        target = next(x for x in jax.tree.leaves(scores) if jnp.ndim(x) == 1)[0]
        return select(scores, s * target, where=where)

    return fn


def gradual_tx(criterion, scope, lr, steps):
    schedule = jp.schedules.polynomial(
        0.0, 1.0, begin_step=0, end_step=steps // 2, frequency=max(steps // 10, 1)
    )
    select = jp.masks.topk if scope == "layer" else jp.masks.global_topk
    return jp.prune(
        optax.adam(lr), sparsity=schedule, criterion=with_target(criterion), scope=scaled(select)
    )


def run_seed(bench: Bench, seed: int, ratios: list[float], methods: list[str], bar) -> dict:
    cfg, D, F = bench.cfg, bench.cfg["dense_steps"], bench.cfg["finetune_steps"]
    lr = cfg["lr"]
    theta0 = init_params(bench.model, seed)
    k = max(CHUNK, round(D / 10 / CHUNK) * CHUNK)  # whole chunks: one compile per step fn
    dense_tx = optax.adam(lr)
    theta_k, st = bench.run("dense", dense_tx, theta0, k, seed, 0)
    dense, _ = bench.run("dense", dense_tx, theta_k, D - k, seed, 1, state=st)
    out = {"dense": bench.accuracy(dense), "dense_macs": macs(bench.model, dense)}
    print(f"  {bench.model} seed {seed} dense: {out['dense']:.2f}", file=sys.stderr, flush=True)
    results: dict[str, dict] = {m: {} for m in methods}
    key = jax.random.key(seed)

    def record(method, ratio, params):
        nz = sum(int(np.count_nonzero(np.asarray(x))) for x in jax.tree.leaves(params))
        results[method][ratio] = {
            "acc": bench.accuracy(params),
            "compression": bench.total / nz,
            "speedup": out["dense_macs"] / max(macs(bench.model, params), 1.0),
        }
        bar.update(1)

    gradual = {
        "magnitude (layer)": (jp.criteria.magnitude, "layer"),
        "magnitude (global)": (jp.criteria.magnitude, "global"),
        "saliency": (jp.criteria.ema_saliency(0.9), "layer"),
        "taylor": (jp.criteria.taylor_ema(0.9, group="entry"), "layer"),
        "movement": (jp.criteria.movement(), "layer"),
        "obd": (jp.criteria.obd, "layer"),
    }
    fisher = None
    if "obd" in methods:
        calib = jnp.asarray(np.random.default_rng([seed, 9]).choice(len(bench.y_train), 512, False))
        fisher = jax.jit(
            lambda p, i: jp.criteria.fisher_diag(lambda p, i: bench.loss(p, i), p, i, chunk_size=64)
        )(dense, calib)
    for method in methods:
        t_method = time.time()
        if method in gradual:
            crit, scope = gradual[method]
            tx = gradual_tx(crit, scope, lr / 2, F)
            for r in ratios:
                extra = {"target": jnp.float32(bench.sparsity_for(r))}
                if method == "obd":
                    extra["hessian_diag"] = fisher
                p, _ = bench.run(f"gradual/{method}", tx, dense, F, seed, 2, extra)
                record(method, r, p)
        elif method == "random":
            scores = jp.criteria.random(dense, key=jax.random.fold_in(key, 1))
            tx = gradual_tx(lambda params, fixed: fixed, "layer", lr / 2, F)
            for r in ratios:
                extra = {"target": jnp.float32(bench.sparsity_for(r)), "fixed": scores}
                p, _ = bench.run("gradual/random", tx, dense, F, seed, 2, extra)
                record(method, r, p)
        elif method in ("snip", "synflow"):
            for r in ratios:
                s = bench.sparsity_for(r)
                if method == "snip":
                    rng = np.random.default_rng([seed, 3])
                    idx = jnp.asarray(rng.choice(len(bench.y_train), 256, replace=False))
                    scores = jp.at_init.snip(bench.loss, theta0, idx)
                    masks = jp.masks.global_topk(scores, s)
                else:
                    masks = jp.at_init.synflow(bench.apply, theta0, (1, 28, 28, 1), s)
                masks = _full_masks(theta0, masks)
                p, _ = bench.run(
                    "fixed",
                    fixed_masks_tx(lr),
                    jp.apply_masks(theta0, masks),
                    D,
                    seed,
                    0,
                    {"masks": masks},
                )
                record(method, r, p)
        elif method == "rigl":
            for r in ratios:
                tx = jp.dynamic.rigl(
                    optax.adam(lr),
                    sparsity=bench.sparsity_for(r),
                    key=jax.random.fold_in(key, 2),
                    end_step=int(0.75 * D),
                    update_every=max(D // 10, 1),
                )
                p, _ = bench.run(f"rigl/{r}", tx, theta0, D, seed, 0)
                record(method, r, p)
        elif method == "lottery ticket":
            tx = fixed_masks_tx(lr)

            def train(params, masks, tx=tx):
                masks = _full_masks(params, masks)
                return bench.run("fixed", tx, params, D - k, seed, 1, {"masks": masks})[0]

            rounds = jp.drivers.lottery_ticket(
                train,
                theta0,
                rounds=len(ratios),
                rate=[bench.sparsity_for(r) for r in ratios],
                rewind_to=theta_k,
                scope="global",
                trained=dense,
            )
            for r, rd in zip(ratios, rounds[1:], strict=False):
                record(method, r, rd.params)
        print(
            f"  {bench.model} seed {seed} {method}: {time.time() - t_method:.0f}s",
            file=sys.stderr,
            flush=True,
        )
    out["methods"] = results
    return out


def summarize(runs: list[dict], ratios, methods) -> dict:
    summary = {
        "dense": {
            "mean": float(np.mean([r["dense"] for r in runs])),
            "std": float(np.std([r["dense"] for r in runs])),
            "seeds": len(runs),
        }
    }
    for m in methods:
        summary[m] = {}
        for r in ratios:
            vals = [run["methods"][m][r] for run in runs]
            summary[m][r] = {
                "mean": float(np.mean([v["acc"] for v in vals])),
                "std": float(np.std([v["acc"] for v in vals])),
                "compression": float(np.mean([v["compression"] for v in vals])),
                "speedup": float(np.mean([v["speedup"] for v in vals])),
            }
    return summary


def _protocol_lines() -> list[str]:
    """The protocol bullets of this module's docstring, for the generated markdown."""
    doc = __doc__.split("Protocols", 1)[1].split("Run:", 1)[0]
    lines = [line for line in doc.splitlines() if line.strip()]
    first = next(i for i, line in enumerate(lines) if line.startswith("*"))
    return lines[first:]


def write_outputs(all_summaries: dict, ratios, methods, out_dir: str, meta: dict) -> None:
    os.makedirs(out_dir, exist_ok=True)
    lines = [
        "# Pruning criteria compared on Fashion-MNIST",
        "",
        "Generated by `python scripts/compare_criteria.py` "
        f"({meta['when']}, {meta['wall']} on {meta['machine']}). "
        "Test accuracy (%) as mean ± std over "
        f"{meta['seeds']} seeds at each target compression ratio (total / nonzero parameters, "
        "biases included; the measured ratio and the theoretical speedup, dense / nonzero "
        "multiply-adds, are in the second table of each model). Training is SHORTENED to fit "
        "a shared 2-core CPU: the step counts below, so absolute accuracies sit below fully "
        "trained models; the comparison between methods is the point.",
        "",
        "## Protocol",
        "",
        *_protocol_lines(),
        "",
    ]
    for model, summ in all_summaries.items():
        cfg = meta["configs"][model]
        lines += [
            f"## {model}",
            "",
            f"Dense: {summ['dense']['mean']:.2f} ± {summ['dense']['std']:.2f} "
            f"({cfg['dense_steps']} Adam steps of batch {cfg['batch']}, lr {cfg['lr']}; "
            f"fine-tuning {cfg['finetune_steps']} steps; evaluated on the first "
            f"{cfg['test_size']} test images).",
            "",
            "| method | " + " | ".join(f"{r}x" for r in ratios) + " |",
            "|---|" + "---|" * len(ratios),
        ]
        for m in methods:
            cells = [f"{summ[m][r]['mean']:.2f} ± {summ[m][r]['std']:.2f}" for r in ratios]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "Measured compression / theoretical speedup:",
            "",
            "| method | " + " | ".join(f"{r}x" for r in ratios) + " |",
            "|---|" + "---|" * len(ratios),
        ]
        for m in methods:
            cells = [
                f"{summ[m][r]['compression']:.1f} / {summ[m][r]['speedup']:.1f}" for r in ratios
            ]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    with open(os.path.join(out_dir, "compare_criteria.md"), "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(out_dir, "dense_baseline.json"), "w") as f:
        json.dump(
            {m: {"accuracy": s["dense"], **meta["configs"][m]} for m, s in all_summaries.items()},
            f,
            indent=2,
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(all_summaries), figsize=(6.5 * len(all_summaries), 4.8), squeeze=False
    )
    for ax, (model, summ) in zip(axes[0], all_summaries.items(), strict=False):
        for m in methods:
            mean = np.array([summ[m][r]["mean"] for r in ratios])
            std = np.array([summ[m][r]["std"] for r in ratios])
            k = methods.index(m)
            ax.errorbar(
                ratios,
                mean,
                yerr=std,
                marker="osd^v<>phX*"[k % 11],
                ms=3,
                capsize=2,
                label=m,
                color=plt.cm.tab20(k / max(len(methods) - 1, 1)),
                ls="-" if k % 2 else "--",
            )
        ax.axhline(summ["dense"]["mean"], color="k", ls="--", lw=1, label="dense")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("compression ratio (total / nonzero params)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{model} on Fashion-MNIST")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "compare_criteria.png"), dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small subset, under 5 minutes")
    ap.add_argument(
        "--out",
        default=None,
        help="output folder (default: docs; /tmp/compare_criteria_smoke with --smoke)",
    )
    ap.add_argument("--smoke", action="store_true", help="every method, tiny budgets")
    ap.add_argument(
        "--wall", default=None, help="wall time to state when the parts were computed earlier"
    )
    ap.add_argument(
        "--resume",
        action="store_true",
        help="reuse the per-model results a previous run left under /tmp",
    )
    ap.add_argument("--models", nargs="*", default=None)
    args = ap.parse_args(argv)
    mode = "quick" if args.quick else "smoke" if args.smoke else "full"
    conf = CONFIGS[mode]
    models = args.models or [m for m in ("lenet-300-100", "lenet-5") if m in conf]
    unknown = [m for m in models if m not in conf]
    if unknown:
        ap.error(f"--models names {unknown}; this mode has {[m for m in conf if 'lenet' in m]}")
    methods = QUICK_METHODS if args.quick else ALL_METHODS
    if args.out is None:
        args.out = os.path.join("/tmp", "compare_criteria_smoke") if args.smoke else "docs"
    ratios, seeds = conf["ratios"], conf["seeds"]
    data = jp.data.load("fashion-mnist")
    t0 = time.time()
    all_summaries = {}
    parts = os.path.join("/tmp", f"compare_criteria_parts_{mode}")
    os.makedirs(parts, exist_ok=True)
    for model in models:
        part = os.path.join(parts, f"{model}.json")
        if args.resume and os.path.exists(part):
            with open(part) as f:
                all_summaries[model] = {
                    k: (v if k == "dense" else {int(r): x for r, x in v.items()})
                    for k, v in json.load(f).items()
                }
            print(f"{model}: reusing {part}", flush=True)
            continue
        bench = Bench(model, conf[model], data)
        with tqdm(total=seeds * len(methods) * len(ratios), desc=model, file=sys.stdout) as bar:
            runs = [run_seed(bench, s, ratios, methods, bar) for s in range(seeds)]
        all_summaries[model] = summarize(runs, ratios, methods)
        with open(part, "w") as f:
            json.dump(all_summaries[model], f)
        print(json.dumps({model: all_summaries[model]}, indent=1), flush=True)
    elapsed = time.time() - t0
    if args.quick:
        model = models[0]
        summ = all_summaries[model]
        result = {
            "model": model,
            "dense": round(summ["dense"]["mean"], 2),
            **{m: round(summ[m][12]["mean"], 2) for m in methods},
        }
        print("RESULT " + json.dumps(result))
        return 0
    meta = {
        "when": time.strftime("%Y-%m-%d", time.gmtime()),
        "wall": args.wall or f"{elapsed / 60:.1f} min",
        "machine": "a shared 2-core CPU (JAX CPU backend)",
        "seeds": seeds,
        "configs": {m: conf[m] for m in models},
    }
    write_outputs(all_summaries, ratios, methods, args.out, meta)
    print(
        f"wrote {args.out}/compare_criteria.md, .png, dense_baseline.json in {elapsed / 60:.1f} min"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
