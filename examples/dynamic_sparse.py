"""Dynamic sparse training: RigL, SET and STE against a static random mask and the dense model.

LeNet-300-100 (``jp.models.lenet_300_100``) is trained on Fashion-MNIST
(scikit-learn's bundled digits when the Debian package ``dataset-fashion-mnist``
is not installed; nothing is downloaded) four ways, all from the same
initialization, with the same data order and the same number of Adam steps:

* dense — plain ``optax.adam``;
* static — sparse from the first step at ``--sparsity``, the mask never
  changes (``jp.dynamic.set`` with ``drop_fraction=0.0``: the same initial
  mask as the two below, so rewiring is the only difference);
* SET — ``jp.dynamic.set``: every ``--update-every`` steps each layer drops
  ``--drop-fraction`` of its active weights (smallest magnitude) and regrows as
  many at random;
* RigL — ``jp.dynamic.rigl``: the same drop, regrowth by the largest dense
  gradient, with the cosine-decaying drop fraction;
* STE — ``jp.dynamic.ste``: dense weights kept in the optimizer state learn
  from the sparse model's gradient (pruned entries too), and the masks are
  selected again from them at every step, at the same per-layer sparsities;
* SR-STE — the same with ``decay=--decay``: the pruned entries' dense weights
  also decay, which steadies the masks.

Static, SET and RigL share one random initial mask with the layers'
sparsities from ``--distribution`` (ERK by default, as in RigL), and keep
exactly that sparsity throughout: regrown weights start at 0 with reset Adam
moments. Rewiring stops at ``--end-fraction`` of training for both SET and
RigL (RigL's 75%), so the last regrown weights still train. STE and SR-STE
take step 0 dense, select their first masks (magnitude, the same per-layer
sparsities) from its update, and re-select at every step: a weight comes back
with its dense value, and "rewired" counts every such return. Each row reports test
accuracy ("acc", in %), the masks' sparsity, the nonzero weights (kernels)
and parameters (biases too), the connections rewired (the weights regrown,
summed over all rewiring steps, counted inside the jitted step from the masks
before and after it) and each kernel's mask sparsity (the "layer masks").

Run: ``python examples/dynamic_sparse.py`` (full, about 2.5 minutes on 2 cores)
or ``--quick`` (a smoke run on a subset, < 60 s; ends with ``RESULT {json}``
like the full run). ``--help`` lists every flag; ``--distribution uniform``
gives every layer the same sparsity, ``--methods static,RigL`` runs a subset.

Measured on 2026-11-24, 2-core CPU, jax 0.10.2, 97 s wall, with
``python examples/dynamic_sparse.py`` (the static, SET and RigL runs' masks
applied to the params right after ``tx.init``, so step 0 is sparse too)::

    fashion-mnist, 60000 train / 10000 test images; LeNet-300-100, Adam 0.001,
    batch 128, 5000 steps each; sparsity 0.9 (erk), rewiring every 100 steps
    until step 3750, drop fraction 0.3; SR-STE decay 0.02.

    | method | acc (%) | mask sparsity | nonzero weights | nonzero params | rewired | layer masks |
    |---|---|---|---|---|---|---|
    | dense | 88.58 | 0.0000 | 266,200 / 266,200 | 266,610 / 266,610 | 0 | 0.000/0.000/0.000 |
    | static | 87.57 | 0.9000 | 26,620 / 266,200 | 27,030 / 266,610 | 0 | 0.920/0.770/0.000 |
    | SET | 88.06 | 0.9000 | 26,387 / 266,200 | 26,797 / 266,610 | 272,767 | 0.920/0.770/0.000 |
    | RigL | 87.89 | 0.9000 | 26,620 / 266,200 | 27,030 / 266,610 | 121,108 | 0.920/0.770/0.000 |
    | STE | 88.49 | 0.9000 | 26,620 / 266,200 | 27,030 / 266,610 | 295,270 | 0.920/0.770/0.000 |
    | SR-STE | 88.33 | 0.9000 | 26,620 / 266,200 | 27,030 / 266,610 | 53,937 | 0.920/0.770/0.000 |

At 90% sparsity (ERK leaves the 100x10 output layer dense) the static mask
loses 1.0 point to the dense model; rewiring recovers part of that, SET 0.5
points and RigL 0.3, in this one seed (differences of a few tenths are within
seed-to-seed noise). SET rewires more than twice as many connections as
RigL, whose drop fraction decays along a cosine. Every sparse run keeps
exactly 26,620 weights in its masks; SET's 233 fewer nonzero weights are
weights regrown onto dead ReLU units (checked on a shorter run: 374 of its 378
active zero weights touch a dead unit), whose gradient is exactly 0, so they
never leave 0. STE comes within 0.1 point of the dense model: its pruned
weights keep learning, and 295,270 returns to the masks over 5000 steps
(about 59 per step) say how much the masks keep moving. SR-STE's decay cuts
the returns by 5.5x for 0.16 point less here; with ``--decay 0.002`` and
``0.2`` it measured 88.01% (71,751 returns) and 87.90% (73,160), so its
accuracy differences are within one seed's noise. Though STE selects masks
at every step (ERK's per-layer top-k), each sparse run took 14-20 s here,
compilation included (STE 15.5 s, SET 18.0 s, RigL 14.0 s).

References:
  Evci, Gale, Menick, Castro & Elsen, "Rigging the Lottery: Making All Tickets
  Winners", ICML 2020. https://arxiv.org/abs/1911.11134
  Mocanu et al., "Scalable training of artificial neural networks with
  adaptive sparse connectivity inspired by network science", Nature
  Communications 2018. https://arxiv.org/abs/1707.04780
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

import jaxprune as jp
from jaxprune.data import batches

METHODS = ("dense", "static", "SET", "RigL", "STE", "SR-STE")
DISTRIBUTIONS = {"erk": jp.distributions.erk, "uniform": jp.distributions.uniform}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run on a subset (< 60 s)")
    p.add_argument(
        "--dataset",
        default="auto",
        choices=("auto", "fashion-mnist", "mnist-5k", "digits"),
        help="auto (Fashion-MNIST if installed, else digits), fashion-mnist, mnist-5k or digits",
    )
    p.add_argument("--train-size", type=int, default=None, help="training images (default all)")
    p.add_argument("--test-size", type=int, default=None, help="test images (default all)")
    p.add_argument("--steps", type=int, default=None, help="training steps of every run (5000)")
    p.add_argument("--batch-size", type=int, default=128, help="training batch size")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--sparsity", type=float, default=0.9, help="fraction of weights pruned")
    p.add_argument(
        "--distribution", default="erk", choices=sorted(DISTRIBUTIONS), help="per-layer sparsity"
    )
    p.add_argument("--update-every", type=int, default=None, help="steps between rewirings (100)")
    p.add_argument("--drop-fraction", type=float, default=0.3, help="SET's fraction, RigL's alpha")
    p.add_argument(
        "--end-fraction",
        type=float,
        default=0.75,
        help="fraction of training after which connectivity stops changing (RigL's 0.75)",
    )
    p.add_argument(
        "--decay",
        type=float,
        default=None,
        help="SR-STE's decay of the pruned weights' dense values (lambda_W; default 2e-2)",
    )
    p.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="comma-separated subset of: " + ", ".join(METHODS),
    )
    p.add_argument("--seed", type=int, default=0, help="initialization, batches and masks")
    args = p.parse_args(argv)
    # Defaults fill only flags not given (None): an explicit 0 is checked below.
    quick = {"steps": 300, "update_every": 25, "train_size": 6000, "test_size": 2000}
    full = {"steps": 5000, "update_every": 100}
    if args.decay is None:
        args.decay = 2e-2
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.method_list = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.method_list if m not in METHODS]
    if unknown or not args.method_list:
        p.error(
            f"--methods must be a comma-separated subset of {', '.join(METHODS)}, got "
            f"{args.methods!r}; e.g. --methods static,RigL"
        )
    args.method_list = [m for m in METHODS if m in args.method_list]  # the table's order
    if not 0.0 < args.sparsity < 1.0:
        p.error(f"--sparsity must lie in (0, 1), got {args.sparsity}; e.g. --sparsity 0.9")
    if not 0.0 <= args.drop_fraction <= 1.0:
        p.error(f"--drop-fraction must lie in [0, 1], got {args.drop_fraction}; e.g. 0.3")
    if not args.decay >= 0.0:
        p.error(f"--decay must be >= 0, got {args.decay}; e.g. --decay 0.02")
    if not 0.0 < args.end_fraction <= 1.0:
        p.error(f"--end-fraction must lie in (0, 1], got {args.end_fraction}; e.g. 0.75")
    for name in ("steps", "batch_size", "update_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.train_size is not None and args.train_size < args.batch_size:
        p.error(f"--train-size must be >= --batch-size ({args.batch_size}), got {args.train_size}")
    if args.test_size is not None and args.test_size < 1:
        p.error(f"--test-size must be >= 1, got {args.test_size}; e.g. --test-size 2000")
    return args


def make_tx(method: str, args) -> optax.GradientTransformation:
    """The optimizer of one method; every sparse one starts from the same random mask."""
    adam = optax.adam(args.lr)
    if method == "dense":
        return adam
    end_step = max(1, int(args.end_fraction * args.steps))
    common = {
        "sparsity": args.sparsity,
        # One key for all three: the same initial mask, so only the rewiring differs.
        "key": jax.random.key(args.seed + 1),
        "update_every": args.update_every,
        "end_step": end_step,
        "distribution": DISTRIBUTIONS[args.distribution],
    }
    if method in ("STE", "SR-STE"):
        # Masks selected again at every step from dense weights kept in the
        # optimizer state, with the same per-layer sparsities.
        return jp.dynamic.ste(
            adam,
            sparsity=args.sparsity,
            scope=jp.distributions.selection(DISTRIBUTIONS[args.distribution]),
            decay=args.decay if method == "SR-STE" else 0.0,
        )
    if method == "static":
        return jp.dynamic.set(adam, drop_fraction=0.0, **common)
    if method == "SET":
        return jp.dynamic.set(adam, drop_fraction=args.drop_fraction, **common)
    return jp.dynamic.rigl(adam, drop_fraction=args.drop_fraction, **common)


def _regrown(old_state, new_state) -> jax.Array:
    """Weights inactive before the step and active after it (0 for a dense optimizer)."""
    if not isinstance(old_state, jp.dynamic.DynamicSparseState | jp.dynamic.SteState):
        return jnp.zeros((), jnp.int32)
    pairs = zip(jax.tree.leaves(old_state.masks), jax.tree.leaves(new_state.masks), strict=True)
    return sum(jnp.sum(new & ~old, dtype=jnp.int32) for old, new in pairs)


def train(method, args, data, graphdef, theta_0, pbar):
    """Trains ``theta_0`` with ``method`` for ``--steps``; returns ``(params, masks, rewired)``."""
    tx = make_tx(method, args)

    def loss_fn(params, x, y):
        logits = nnx.merge(graphdef, params)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(params, opt_state, x, y):
        grads = jax.grad(loss_fn)(params, x, y)
        updates, new_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_state, _regrown(opt_state, new_state)

    # A jitted init compiles ERK's solve and the initial masks into one program:
    # eagerly, their many small ops take longer than the whole quick run's training.
    params, opt_state, rewired = theta_0, jax.jit(tx.init)(theta_0), 0
    if method != "dense":
        # tx.init cannot change the params: without this, step 0's forward pass
        # and gradient (which seeds Adam's moments) would be the dense model's.
        params = jp.apply_masks(params, jp.get_masks(opt_state))
    epochs = -(-args.steps // (len(data[0]) // args.batch_size))
    stream = batches(data[0], data[1], args.batch_size, seed=args.seed, epochs=epochs)
    for _, (x, y) in zip(range(args.steps), stream, strict=False):
        params, opt_state, grown = step(params, opt_state, x, y)
        rewired += grown  # a device scalar: no sync per step
        pbar.update(1)
    masks = jp.get_masks(opt_state) if method != "dense" else None
    return params, masks, int(rewired)


def _layer_sparsity(masks, kernels) -> list[float]:
    """Each kernel's pruned fraction: of its mask (what the rewiring keeps), or of its zeros."""
    if masks is not None:
        return [
            round(float(np.mean(~np.asarray(m))), 4)
            for m in jax.tree.leaves(masks)
            if np.ndim(m) >= 2
        ]
    return [round(float(np.mean(x == 0)), 4) for x in kernels]


def run(args) -> dict:
    t_start = time.perf_counter()
    ds = jp.data.load(args.dataset)
    n = len(ds.x_train) if args.train_size is None else min(args.train_size, len(ds.x_train))
    m = len(ds.x_test) if args.test_size is None else min(args.test_size, len(ds.x_test))
    data, x_test, y_test = (ds.x_train[:n], ds.y_train[:n]), ds.x_test[:m], ds.y_test[:m]
    graphdef, theta_0 = nnx.split(jp.models.lenet_300_100(rngs=nnx.Rngs(args.seed)), nnx.Param)
    theta_0 = nnx.as_pure(theta_0)
    predict = jax.jit(lambda p, x: jnp.argmax(nnx.merge(graphdef, p)(x), -1))
    rows = []
    with tqdm(
        total=len(args.method_list) * args.steps, desc="train", unit="step", disable=None
    ) as pbar:
        for method in args.method_list:
            t0 = time.perf_counter()
            params, masks, rewired = train(method, args, data, graphdef, theta_0, pbar)
            hits = sum(
                int((predict(params, x_test[i : i + 2000]) == y_test[i : i + 2000]).sum())
                for i in range(0, m, 2000)
            )
            leaves = [np.asarray(x) for x in jax.tree.leaves(params)]
            kernels = [x for x in leaves if x.ndim >= 2]
            rows.append(
                {
                    "method": method,
                    "accuracy": hits / m,
                    "sparsity": float(jp.sparsity(params)),
                    "mask_sparsity": 0.0 if masks is None else float(jp.sparsity(masks)),
                    "nonzero_weights": sum(int(np.count_nonzero(x)) for x in kernels),
                    "weights": sum(x.size for x in kernels),
                    "nonzero_params": sum(int(np.count_nonzero(x)) for x in leaves),
                    "params": sum(x.size for x in leaves),
                    "layer_sparsity": _layer_sparsity(masks, kernels),
                    "rewired": rewired,
                    "seconds": round(time.perf_counter() - t0, 1),
                }
            )
            tqdm.write(json.dumps(rows[-1]))
    return {
        "dataset": ds.name,
        "train_images": n,
        "test_images": m,
        "args": vars(args),
        "jax": jax.__version__,
        "seconds": round(time.perf_counter() - t_start, 1),
        "rows": rows,
    }


def render(result: dict) -> str:
    a = result["args"]
    lines = [
        f"{result['dataset']}, {result['train_images']} train / {result['test_images']} test "
        f"images; LeNet-300-100, Adam {a['lr']}, batch {a['batch_size']}, {a['steps']} steps "
        f"each; sparsity {a['sparsity']} ({a['distribution']}), rewiring every "
        f"{a['update_every']} steps until step {max(1, int(a['end_fraction'] * a['steps']))}, "
        f"drop fraction {a['drop_fraction']}"
        + (f"; SR-STE decay {a['decay']}" if "SR-STE" in a.get("method_list", ()) else "")
        + f"; {result['seconds']:.0f} s.",
        "",
        "| method | acc (%) | mask sparsity | nonzero weights | nonzero params "
        "| rewired | layer masks |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['method']} | {100 * r['accuracy']:.2f} | {r['mask_sparsity']:.4f} "
            f"| {r['nonzero_weights']:,} / {r['weights']:,} "
            f"| {r['nonzero_params']:,} / {r['params']:,} | {r['rewired']:,} "
            f"| {'/'.join(f'{s:.3f}' for s in r['layer_sparsity'])} |"
        )
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    result = run(args)
    print(render(result))
    summary = {
        "seconds": result["seconds"],
        "dataset": result["dataset"],
        **{
            r["method"]: {
                "accuracy": round(r["accuracy"], 4),
                "sparsity": round(r["mask_sparsity"], 4),
                "nonzero_weights": r["nonzero_weights"],
                "rewired": r["rewired"],
            }
            for r in result["rows"]
        },
    }
    print("RESULT " + json.dumps(summary))
    return result


if __name__ == "__main__":
    main()
