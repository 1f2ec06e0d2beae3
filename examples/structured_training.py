"""Channel pruning during training, ending in a physically smaller and faster CNN.

A small VGG-style CNN with BatchNorm (``jp.models.VGGSmall``: 3x3 conv + BN +
ReLU blocks 32-M-64-M-128-M, a 128-unit hidden layer) is trained on
Fashion-MNIST, then pruned to a fraction ``s`` of its channels removed in every
prunable group (the conv filters with their BatchNorm and the next layer's
input channels, and the hidden neurons), four ways:

* one-shot: group-wise L2 magnitude (``jp.structure.select``) on the trained
  dense model, shrunk, no retraining;
* one-shot + fine-tune: the same masks, chosen at the first step of
  ``jp.prune(optax.adam(...), sparsity=s, scope=jp.structure.selection(groups))``
  and enforced inside the jitted train step while the network fine-tunes;
* gradual: the same transform with a cubic schedule (Zhu & Gupta) from 0 to
  ``s`` over the first half of the fine-tuning steps;
* scratch: a dense network with the gradual run's widths, trained from random
  initialization for as many epochs as the dense model and its fine-tuning
  together (the baseline of Liu et al. 2019).

The pruned runs train with ``nnx.Optimizer(model, tx, wrt=nnx.Param)``: the
groups come from the whole model state (BatchNorm statistics included) and
``jp.prune`` scores its ``nnx.Param`` part, matched by path. Every pruned
network is then cut with ``jp.structure.shrink_module`` (which checks that the
shrunk model computes what the masked one did), and each row reports test
accuracy, parameters, bytes, multiply-adds and the measured inference time at
batch 256 against the dense network (interleaved runs, median).

Run: ``python examples/structured_training.py`` (writes
docs/structured_training.md, .json and .png) or ``--quick`` (a smoke run on a
subset; ends with ``RESULT {json}`` like the full run). ``--help`` lists every
flag; among them ``--scope global`` ranks all groups' channels together,
``--max-sparsity`` caps what any one group loses, ``--round-to`` keeps
channel counts at multiples, ``--normalize`` puts groups on one scale for the
global ranking (``jp.structure.select``'s options of the same names), and
``--methods`` runs a subset of the four.

References:
  Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017.
  https://arxiv.org/abs/1608.08710
  Zhu & Gupta, "To prune, or not to prune", 2017. https://arxiv.org/abs/1710.01878
  Liu et al., "Rethinking the Value of Network Pruning", ICLR 2019.
  https://arxiv.org/abs/1810.05270
  Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023.
  https://arxiv.org/abs/2301.12900
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

import jaxprune as jp
from jaxprune import structure
from jaxprune.data import batches

METHODS = ("one-shot", "one-shot + fine-tune", "gradual", "scratch")


# Presets of the flags left out (None): --quick's smoke run, or the full run.
# Flags given on the command line always win, with or without --quick.
QUICK = {
    "train_size": 2048,
    "epochs": 1,
    "finetune_epochs": 1,
    "sparsities": "0.5",
    "frequency": 4,
    "runs": 5,
}
FULL = {
    "train_size": None,
    "epochs": 2,
    "finetune_epochs": 1,
    "sparsities": "0.5,0.75",
    "frequency": 25,
    "runs": 30,
}
DATASETS = ("auto", "fashion-mnist", "mnist-5k", "digits")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run on a subset (about 1 min): "
        + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items())
        + "; flags given beside it win",
    )
    p.add_argument(
        "--dataset",
        default="auto",
        choices=DATASETS,
        help="auto (Fashion-MNIST if installed, else digits), fashion-mnist, mnist-5k or digits",
    )
    p.add_argument("--train-size", type=int, default=None, help="training images (default all)")
    p.add_argument("--epochs", type=int, default=None, help="dense training epochs (2)")
    p.add_argument(
        "--finetune-epochs", type=int, default=None, help="epochs of each pruned run (1)"
    )
    p.add_argument("--batch-size", type=int, default=128, help="training batch size")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (cosine decay)")
    p.add_argument(
        "--sparsities",
        default=None,
        help="fractions of channels removed, comma-separated (0.5,0.75)",
    )
    p.add_argument(
        "--frequency", type=int, default=None, help="gradual: steps between refreshes (25)"
    )
    p.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="comma-separated subset of: " + ", ".join(METHODS),
    )
    p.add_argument(
        "--scope",
        default="layer",
        choices=("layer", "global"),
        help="remove the fraction from every group (layer) or in total, lowest first (global)",
    )
    p.add_argument(
        "--max-sparsity",
        type=float,
        default=None,
        help="largest fraction of one group's channels removed (so global never empties a layer)",
    )
    p.add_argument(
        "--round-to", type=int, default=None, help="keep a multiple of this many channels per group"
    )
    p.add_argument(
        "--normalize",
        default=None,
        choices=("mean", "max", "sum", "gaussian"),
        help="global scope: scale each group's importances before ranking them together",
    )
    p.add_argument("--runs", type=int, default=None, help="timed inference runs per network (30)")
    p.add_argument("--seed", type=int, default=0, help="initialization and batch order")
    p.add_argument("--out", default=None, help="markdown path (json and png next to it)")
    args = p.parse_args(argv)
    # Presets fill only flags not given (None): an explicit value, 0 included, is
    # kept and checked below.
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    try:
        args.sparsity_list = [float(s) for s in args.sparsities.split(",")]
    except ValueError:
        p.error(f"--sparsities must be comma-separated floats, got {args.sparsities!r}")
    bad = [s for s in args.sparsity_list if not 0.0 < s < 1.0]
    if bad:
        p.error(f"--sparsities must lie in (0, 1), got {bad}; e.g. --sparsities 0.5,0.75")
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.method_list if m not in METHODS]
    if unknown or not args.method_list:
        p.error(
            f"--methods must be a comma-separated subset of {', '.join(METHODS)}, got "
            f"{args.methods!r}; e.g. --methods 'one-shot,one-shot + fine-tune'"
        )
    args.method_list = [m for m in METHODS if m in args.method_list]  # the table's order
    if args.max_sparsity is not None and not 0.0 <= args.max_sparsity <= 1.0:
        p.error(f"--max-sparsity must lie in [0, 1], got {args.max_sparsity}; e.g. 0.9")
    if args.round_to is not None and args.round_to < 1:
        p.error(f"--round-to must be >= 1, got {args.round_to}; e.g. --round-to 8")
    for name in ("epochs", "finetune_epochs", "batch_size", "frequency", "runs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.train_size is not None and args.train_size < args.batch_size:
        p.error(f"--train-size must be >= --batch-size ({args.batch_size}), got {args.train_size}")
    if args.out is None and not args.quick:
        args.out = os.path.join(os.path.dirname(__file__), "..", "docs", "structured_training.md")
    return args


CFG = (32, "M", 64, "M", 128, "M")
HIDDEN = 128


def make_model(seed: int, widths=None, hidden: int = HIDDEN) -> nnx.Module:
    """The example's VGGSmall, optionally with other conv widths (in order) and hidden size."""
    cfg = CFG
    if widths is not None:
        it = iter(widths)
        cfg = tuple(v if v == "M" else next(it) for v in CFG)
    return jp.models.VGGSmall(rngs=nnx.Rngs(seed), cfg=cfg, hidden=hidden)


def train(model, tx, data, *, epochs, batch_size, seed, pbar):
    """Trains ``model`` in place with ``nnx.Optimizer(model, tx, wrt=nnx.Param)``; returns it."""
    model.train()
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(m, o, x, y):
        def loss(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

        o.update(m, nnx.grad(loss)(m))

    for x, y in batches(data[0], data[1], batch_size, seed=seed, epochs=epochs):
        step(model, opt, jnp.asarray(x), jnp.asarray(y))
        pbar.update(1)
    model.eval()
    return opt


@nnx.jit
def _predict(model, x):
    return jnp.argmax(model(x), -1)


def accuracy(model, x, y, batch: int = 1000) -> float:
    model.eval()
    hits = sum(
        int((_predict(model, x[i : i + batch]) == y[i : i + batch]).sum())
        for i in range(0, len(x), batch)
    )
    return 100.0 * hits / len(x)


def widths(model) -> list:
    """``[conv widths, hidden width]`` of the example's VGGSmall."""
    return [[int(c.kernel.shape[-1]) for c in model.convs], int(model.fc1.kernel.shape[-1])]


def cost(model, x1) -> dict:
    """Params, float32 bytes and multiply-adds (conv and dense, batch 1) of ``model``."""
    rep = jp.report(model, example_inputs=x1)
    return {
        "params": int(rep.totals["size"]),
        "bytes": int(rep.totals["dense_bytes"]),
        "macs": float(rep.flops["dense_macs"]),
    }


def latencies(models: dict, x, runs: int) -> dict[str, float]:
    """Median ms of one jitted forward pass at ``x``'s batch, timed interleaved."""
    fns = {}
    for name, m in models.items():
        graphdef, state = nnx.split(m)
        f = jax.jit(lambda s, x, g=graphdef: nnx.merge(g, s)(x))
        jax.block_until_ready(f(state, x))
        fns[name] = (f, state)
    times = {name: [] for name in models}
    for _ in range(runs):
        for name, (f, state) in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(state, x))
            times[name].append(1e3 * (time.perf_counter() - t0))
    return {name: statistics.median(t) for name, t in times.items()}


def cosine(lr: float, steps: int):
    return optax.cosine_decay_schedule(lr, max(steps, 1))


def run(args) -> dict:
    t_start = time.perf_counter()
    ds = jp.data.load(args.dataset)
    n = len(ds.x_train) if args.train_size is None else min(args.train_size, len(ds.x_train))
    train_xy = (ds.x_train[:n], ds.y_train[:n])
    x_test, y_test = jnp.asarray(ds.x_test), jnp.asarray(ds.y_test)
    if args.quick:
        x_test, y_test = x_test[:500], y_test[:500]
    per_epoch = n // args.batch_size
    dense_steps, ft_steps = per_epoch * args.epochs, per_epoch * args.finetune_epochs
    sps = args.sparsity_list
    todo = args.method_list
    per_s = ft_steps * (("one-shot + fine-tune" in todo) + ("gradual" in todo))
    per_s += (dense_steps + ft_steps) * ("scratch" in todo)
    total = dense_steps + len(sps) * per_s
    limits = {"scope": args.scope, "max_sparsity": args.max_sparsity, "round_to": args.round_to}
    limits["normalize"] = args.normalize
    x_check = x_test[:8]

    with tqdm(total=total, desc="train", unit="step", disable=None) as pbar:
        dense = make_model(args.seed)
        train(
            dense,
            optax.adam(cosine(args.lr, dense_steps)),
            train_xy,
            epochs=args.epochs,
            batch_size=args.batch_size,
            seed=args.seed,
            pbar=pbar,
        )
        apply_fn, state = structure.module_apply(dense)
        groups = structure.groups(apply_fn, state, x_check[:2], prunable_only=True)
        channels = sum(g.channels for g in groups)
        rows = [
            {
                "method": "dense",
                "sparsity": 0.0,
                "accuracy": accuracy(dense, x_test, y_test),
                "widths": widths(dense),
            }
        ]
        nets = {"dense": dense}
        for s in sps:
            oneshot = nnx.clone(dense)
            masks = structure.select(groups, jp.criteria.magnitude(state), s, **limits)
            structure.shrink_module(oneshot, masks, x_check)
            nets[f"one-shot {s}"] = oneshot

            def prune_run(sparsity):
                m = nnx.clone(dense)
                tx = jp.prune(
                    optax.adam(cosine(args.lr, ft_steps)),
                    sparsity=sparsity,
                    scope=structure.selection(groups, **limits),
                )
                opt = train(
                    m,
                    tx,
                    train_xy,
                    epochs=args.finetune_epochs,
                    batch_size=args.batch_size,
                    seed=args.seed + 1,
                    pbar=pbar,
                )
                return structure.shrink_module(m, jp.get_masks(opt.opt_state), x_check)

            if "one-shot + fine-tune" in todo:
                nets[f"one-shot + fine-tune {s}"] = prune_run(s)
            if "gradual" in todo:
                ramp = max(ft_steps // 2, 1)
                nets[f"gradual {s}"] = prune_run(
                    jp.schedules.polynomial(
                        0.0, s, begin_step=0, end_step=ramp, frequency=min(args.frequency, ramp)
                    )
                )
            if "scratch" in todo:
                # At the gradual run's widths (or the latest pruned run's, without one).
                pruned = [nets[k] for k in (f"{m} {s}" for m in METHODS[:3]) if k in nets]
                convs, hidden = widths(pruned[-1])
                scratch = make_model(args.seed + 2, convs, hidden)
                steps = dense_steps + ft_steps
                train(
                    scratch,
                    optax.adam(cosine(args.lr, steps)),
                    train_xy,
                    epochs=args.epochs + args.finetune_epochs,
                    batch_size=args.batch_size,
                    seed=args.seed + 2,
                    pbar=pbar,
                )
                nets[f"scratch {s}"] = scratch
            if "one-shot" not in todo:
                del nets[f"one-shot {s}"]
            for method in todo:
                m = nets[f"{method} {s}"]
                rows.append(
                    {
                        "method": method,
                        "sparsity": s,
                        "accuracy": accuracy(m, x_test, y_test),
                        "widths": widths(m),
                    }
                )
                tqdm.write(json.dumps(rows[-1]))

    x1 = x_test[:1]
    # Networks of the same widths run the same program: time one of each
    # architecture, so that rows differing only in how they were trained do
    # not differ by timing noise.
    shapes = {}
    for name, m in nets.items():
        shapes.setdefault(json.dumps(widths(m)), name)
    ms = latencies({k: nets[n] for k, n in shapes.items()}, jnp.asarray(ds.x_test[:256]), args.runs)
    dense_ms = ms[json.dumps(widths(dense))]
    for row, m in zip(rows, nets.values(), strict=True):
        t = ms[json.dumps(widths(m))]
        row.update(cost(m, x1), ms=t, speedup=dense_ms / t)
    base = rows[0]
    for row in rows:
        row["mac_reduction"] = base["macs"] / row["macs"]
        row["compression"] = base["params"] / row["params"]
    return {
        "dataset": ds.name,
        "train_images": n,
        "test_images": int(len(x_test)),
        "channels": channels,
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "jax": jax.__version__,
        "seconds": round(time.perf_counter() - t_start, 1),
        "rows": rows,
    }


def _n(k: int, word: str) -> str:
    return f"{k} {word}" + ("" if k == 1 else "s")


def _flags(a: dict) -> str:
    """The command-line flags that differ from the defaults (of ``--quick`` if given), as typed."""
    preset = QUICK if a["quick"] else FULL
    out = " --quick" if a["quick"] else ""
    if a.get("dataset", "auto") != "auto":
        out += f" --dataset {a['dataset']}"
    for flag in ("train_size", "epochs", "finetune_epochs"):
        if a.get(flag, preset[flag]) != preset[flag]:
            out += f" --{flag.replace('_', '-')} {a[flag]}"
    for flag, default in (("batch_size", 128), ("lr", 2e-3)):
        if a.get(flag, default) != default:
            out += f" --{flag.replace('_', '-')} {a[flag]}"
    # Compared as numbers: runs saved before the presets kept "0.5,0.75" under --quick.
    listed = [float(s) for s in preset["sparsities"].split(",")]
    if a.get("sparsity_list", listed) != listed:
        out += f" --sparsities {a['sparsities']}"
    if a.get("frequency", preset["frequency"]) != preset["frequency"]:
        out += f" --frequency {a['frequency']}"
    if a.get("methods", ",".join(METHODS)) != ",".join(METHODS):
        out += f" --methods '{a['methods']}'"
    if a.get("scope", "layer") != "layer":
        out += f" --scope {a['scope']}"
    for flag in ("max_sparsity", "round_to", "normalize"):
        if a.get(flag) is not None:
            out += f" --{flag.replace('_', '-')} {a[flag]}"
    if a.get("runs", preset["runs"]) != preset["runs"]:
        out += f" --runs {a['runs']}"
    if a.get("seed", 0) != 0:
        out += f" --seed {a['seed']}"
    return out


_DOCS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs")


def _out_flag(png: str, out: str | None = None) -> str:
    """``--out`` as typed, when the run was written elsewhere than the default docs page."""
    stem = os.path.splitext(png)[0]
    if out is not None and os.path.realpath(os.path.dirname(os.path.abspath(out))) != (
        os.path.realpath(_DOCS)
    ):
        return f" --out {out}"  # outside docs/: the path as given
    return "" if stem == "structured_training" else f" --out docs/{stem}.md"


def _limits_text(a: dict) -> str:
    scope = a.get("scope", "layer")
    text = (
        "Each fraction of channels is removed from every prunable group."
        if scope == "layer"
        else "Each fraction is of all the groups' channels together, the lowest-ranked "
        "removed first wherever they are (global scope)."
    )
    if a.get("max_sparsity") is not None:
        text += f" No group loses more than {100 * a['max_sparsity']:g}% of its channels."
    if a.get("round_to") is not None:
        text += f" Every group keeps a multiple of {a['round_to']} channels (rounded up)."
    if a.get("normalize") is not None and scope == "global":
        text += f" Each group's importances are scaled by the {a['normalize']!r} normalizer."
    return text


def _setup_text(result: dict, a: dict) -> str:
    """The note under the table: how the dense model and each method that ran were trained."""
    todo = a.get("method_list", METHODS)  # runs saved before the list was recorded ran all
    tuned = [m for m in ("one-shot + fine-tune", "gradual") if m in todo]
    text = (
        f"{result['dataset']}, {result['train_images']} training images, "
        f"{result['test_images']} test images; VGGSmall 32-M-64-M-128-M with BatchNorm and a "
        f"{HIDDEN}-unit hidden layer ({result['channels']} prunable channels in its groups). "
        f"Dense: {_n(a['epochs'], 'epoch')}"
    )
    if tuned:
        text += f"; pruned runs: {_n(a['finetune_epochs'], 'epoch')} from the dense model"
    if "scratch" in todo:
        text += (
            f"; scratch: {_n(a['epochs'] + a['finetune_epochs'], 'epoch')} from random "
            "initialization at the "
            + ("gradual run's" if "gradual" in todo else "pruned runs'")
            + " widths"
        )
    text += (
        f". {_limits_text(a)} Adam, learning rate {a['lr']} with cosine decay in each run, "
        f"batch {a['batch_size']}, seed {a['seed']}"
    )
    if "gradual" in todo:
        text += (
            f"; the gradual schedule refreshes the masks every {a['frequency']} steps over "
            "the first half of fine-tuning"
        )
    return text + (
        ". Channels are ranked by the group-wise L2 of the kernels; MACs count "
        "the conv and dense multiply-adds of the shrunk network. "
        f"Inference: one jitted forward pass at batch 256, median of {a['runs']} interleaved "
        "runs of each architecture (rows with the same widths share it), on this machine's "
        f"CPU (jax {result['jax']}). Run time {result['seconds']:.0f} s."
    )


def render(result: dict, png: str = "structured_training.png", out: str | None = None) -> str:
    a = result["args"]
    lines = [
        "# Channel pruning during training: accuracy, size and measured speed",
        "",
        f"`python examples/structured_training.py{_flags(a)}{_out_flag(png, out)}`",
        "",
        "| method | channels removed | test acc (%) | conv widths / hidden | params | bytes "
        "| MACs (batch 1) | MAC reduction | ms (batch 256) | measured speedup |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        convs, hidden = r["widths"]
        lines.append(
            f"| {r['method']} | {100 * r['sparsity']:.0f}% | {r['accuracy']:.2f} "
            f"| {'-'.join(map(str, convs))} / {hidden} | {r['params']:,} | {r['bytes']:,} "
            f"| {r['macs']:,.0f} | {r['mac_reduction']:.2f}x | {r['ms']:.2f} "
            f"| {r['speedup']:.2f}x |"
        )
    lines += [
        "",
        _setup_text(result, a),
        "",
        f"![test accuracy against measured speedup]({png})",
        "",
    ]
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    rows = result["rows"]
    ax.scatter(
        [rows[0]["speedup"]],
        [rows[0]["accuracy"]],
        marker="*",
        s=150,
        c="k",
        label="dense",
        zorder=3,
    )
    for method, marker in zip(METHODS, "osD^", strict=True):
        pts = sorted((r["speedup"], r["accuracy"]) for r in rows if r["method"] == method)
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=marker, label=method)
    ax.set_xlabel("measured inference speedup vs dense (batch 256, CPU)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(
        "Channels removed: " + ", ".join(f"{100 * s:.0f}%" for s in result["args"]["sparsity_list"])
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    result = run(args)
    print(render(result))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        stem = os.path.splitext(args.out)[0]
        with open(args.out, "w") as f:
            f.write(render(result, png=os.path.basename(stem) + ".png", out=args.out))
        with open(stem + ".json", "w") as f:
            json.dump(result, f, indent=1)
        plot(result, stem + ".png")
    summary = {
        r["method"] + (f" {r['sparsity']}" if r["sparsity"] else ""): {
            "accuracy": round(r["accuracy"], 2),
            "speedup": round(r["speedup"], 2),
            "params": r["params"],
        }
        for r in result["rows"]
    }
    print("RESULT " + json.dumps({"seconds": result["seconds"], **summary}))
    return result


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
