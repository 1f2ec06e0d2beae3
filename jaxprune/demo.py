"""The demo: LeNet-300-100 with gradual magnitude pruning to 90%, on real offline data.

Trains a dense LeNet-300-100 (flax nnx), then continues training it wrapped in
``jp.prune`` with Zhu & Gupta's cubic schedule, and prints dense vs pruned test
accuracy, nonzero parameters, bytes and per-layer sparsity.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

import jaxprune as jp
from jaxprune import data as _data
from jaxprune.models import lenet_300_100

__all__ = ["run", "compressed_bytes"]


def compressed_bytes(params: Any, where=None) -> int:
    """Returns the bytes of ``params`` stored sparse: prunable leaves as a bitmask plus
    their nonzero values, other leaves dense."""
    flags = jp._tree.prunable_flags(params, where)
    total = 0
    for leaf, f in zip(jax.tree.leaves(params), flags, strict=True):
        x = np.asarray(leaf)
        if f:
            total += (x.size + 7) // 8 + int(np.count_nonzero(x)) * x.itemsize
        else:
            total += x.nbytes
    return total


def _accuracy(apply, params, x, y, batch=2000):
    correct = 0
    for i in range(0, len(x), batch):
        logits = apply(params, jnp.asarray(x[i : i + batch]))
        correct += int(jnp.sum(jnp.argmax(logits, -1) == jnp.asarray(y[i : i + batch])))
    return correct / len(x)


def run(
    dataset: str = "auto",
    sparsity: float = 0.9,
    epochs: int | None = None,
    seed: int = 0,
    quick: bool = False,
    batch_size: int = 128,
    console: Console | None = None,
) -> dict[str, Any]:
    """Runs the demo and returns its measured results (also printed as tables).

    Args:
      dataset: ``auto`` (Fashion-MNIST if installed, else bundled digits),
        ``fashion-mnist``, ``mnist-5k`` or ``digits``.
      sparsity: final sparsity of the weight matrices.
      epochs: epochs per phase (dense, then pruning + fine-tuning); default
        by dataset size.
      seed: seed of the initialization and the data order.
      quick: a short run (for smoke tests).
      batch_size: minibatch size.
      console: the ``rich`` console the tables print to (default: a new one on
        stdout).

    Returns:
      A dict with ``dense_accuracy``, ``pruned_accuracy``, ``sparsity``,
      parameter counts, bytes, per-layer sparsity and ``seconds``.
    """
    # Piped, rich would wrap the table at 80 columns.
    console = console or Console(width=None if sys.stdout.isatty() else 120)
    t_start = time.perf_counter()
    ds = _data.load(dataset)
    if epochs is not None and (isinstance(epochs, bool) or int(epochs) != epochs or epochs < 1):
        raise ValueError(f"epochs must be an int >= 1 or None, got {epochs!r}. Fix: e.g. epochs=5.")
    if epochs is None:
        epochs = (
            max(1, 2_000 // max(1, len(ds.x_train) // batch_size))
            if len(ds.x_train) < 10_000
            else 5
        )
    if quick:
        epochs = 1
    steps_per_epoch = len(ds.x_train) // batch_size
    if quick:
        steps_per_epoch = min(steps_per_epoch, 60)

    model = lenet_300_100(rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.as_pure(params)

    def apply(params, x):
        return nnx.merge(graphdef, params)(x)

    apply = jax.jit(apply)

    def loss_fn(params, x, y):
        logits = nnx.merge(graphdef, params)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def make_step(tx):
        @jax.jit
        def step(params, opt_state, x, y):
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        return step

    def train(params, tx, n_epochs, desc, seed_offset):
        opt_state = tx.init(params)
        step = make_step(tx)
        it = _data.batches(
            ds.x_train, ds.y_train, batch_size, seed=seed + seed_offset, epochs=n_epochs
        )
        # disable=None: no bar frames when the output is piped to a file.
        bar = tqdm(
            total=n_epochs * steps_per_epoch, desc=desc, unit="step", leave=False, disable=None
        )
        done = 0
        for x, y in it:
            if done >= n_epochs * steps_per_epoch:
                break
            params, opt_state, loss = step(params, opt_state, x, y)
            done += 1
            if done % 50 == 0:
                bar.set_postfix(loss=f"{float(loss):.3f}")
            bar.update(1)
        bar.close()
        return params, opt_state

    # Phase 1: dense training.
    dense, _ = train(params, optax.adam(1e-3), epochs, "dense", 0)
    dense_acc = _accuracy(apply, dense, ds.x_test, ds.y_test)

    # Phase 2: gradual magnitude pruning (cubic, Zhu & Gupta) then fine-tuning
    # at the final sparsity: the schedule ends after two thirds of the phase.
    total = epochs * steps_per_epoch
    end = max(1, (2 * total) // 3)
    schedule = jp.schedules.polynomial(
        0.0, sparsity, begin_step=0, end_step=end, frequency=max(1, end // 20)
    )
    pruned, opt_state = train(
        dense, jp.prune(optax.adam(1e-3), sparsity=schedule), epochs, "pruning", 1
    )
    pruned_acc = _accuracy(apply, pruned, ds.x_test, ds.y_test)

    n_total = sum(int(np.size(x)) for x in jax.tree.leaves(dense))
    n_nonzero = sum(int(np.count_nonzero(np.asarray(x))) for x in jax.tree.leaves(pruned))
    dense_bytes = sum(int(np.asarray(x).nbytes) for x in jax.tree.leaves(dense))
    sparse_bytes = compressed_bytes(pruned)
    flat, _ = jp._tree.leaves_with_paths(pruned)
    per_layer = {
        jp.path_str(p): float(jp.sparsity(x, where=lambda *_: True))
        for p, x in flat
        if np.ndim(x) >= 2
    }
    results = {
        "dataset": ds.name,
        "dense_accuracy": dense_acc,
        "pruned_accuracy": pruned_acc,
        "target_sparsity": sparsity,
        "sparsity": float(jp.sparsity(pruned)),
        "params_total": n_total,
        "params_nonzero": n_nonzero,
        "dense_bytes": dense_bytes,
        "compressed_bytes": sparse_bytes,
        "per_layer_sparsity": per_layer,
        "epochs_per_phase": epochs,
        "seconds": time.perf_counter() - t_start,
    }
    _print(console, results)
    return results


def _print(console: Console, r: dict[str, Any]) -> None:
    t = Table(
        title=f"LeNet-300-100 on {r['dataset']}: "
        f"gradual magnitude pruning to {r['target_sparsity']:.0%}"
    )
    t.add_column("model")
    t.add_column("test accuracy", justify="right")
    t.add_column("nonzero params", justify="right")
    t.add_column("bytes", justify="right")
    t.add_column("params ratio", justify="right")
    t.add_column("bytes ratio", justify="right")
    t.add_row(
        "dense",
        f"{r['dense_accuracy']:.2%}",
        f"{r['params_total']:,}",
        f"{r['dense_bytes']:,}",
        "1.0x",
        "1.0x",
    )
    t.add_row(
        "pruned",
        f"{r['pruned_accuracy']:.2%}",
        f"{r['params_nonzero']:,}",
        f"{r['compressed_bytes']:,}",
        f"{r['params_total'] / max(r['params_nonzero'], 1):.1f}x",
        f"{r['dense_bytes'] / max(r['compressed_bytes'], 1):.1f}x",
    )
    console.print(t)
    layers = Table(title="per-layer sparsity (weight matrices; biases kept dense)")
    layers.add_column("layer")
    layers.add_column("sparsity", justify="right")
    for name, s in r["per_layer_sparsity"].items():
        layers.add_row(name, f"{s:.2%}")
    console.print(layers)
    console.print(
        f"bytes: pruned = 1-bit mask + float32 nonzeros. Unstructured sparsity gives no speedup "
        f"on dense hardware; see `jp.shrink` for structured pruning. ({r['seconds']:.0f} s)"
    )
