"""Checkpoint size and speed: dense orbax vs jaxprune's compressed sparse format.

A ~10M-parameter MLP (1024-2048-2048-1024-1000) is pruned with per-layer
magnitude top-k to 50/90/95% unstructured sparsity in float32, and to 2:4
(two kept in every four consecutive inputs of each kernel, computed here from
magnitudes) in float16. Each is saved with ``jaxprune.checkpoint.save`` in the
dense format (plain orbax arrays) and in the compressed format, then restored
into a template; the best of ``--repeats`` runs is kept.

Bytes are reported three ways: the nominal dense bytes (size x itemsize), the
compressed payload (the packed arrays' bytes), and the bytes on disk (orbax
compresses every chunk with zstd, which already shrinks runs of zeros in the
dense files). Timings are wall-clock on this machine and noisy on a shared one.

The last line is ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

import jaxprune as jp  # noqa: E402
from jaxprune import checkpoint, packing  # noqa: E402

FEATURES = (1024, 2048, 2048, 1024, 1000)


def make_params(seed: int) -> dict:
    keys = jax.random.split(jax.random.key(seed), len(FEATURES) - 1)
    layers = {}
    for i, (k, a, b) in enumerate(zip(keys, FEATURES[:-1], FEATURES[1:], strict=True)):
        layers[f"dense{i}"] = {
            "kernel": jax.random.normal(k, (a, b), jnp.float32) / np.sqrt(a),
            "bias": jnp.full((b,), 0.01, jnp.float32),
        }
    return layers


def two_four(params: dict) -> tuple[dict, dict]:
    """Returns (float16 params, masks) keeping the 2 largest of every 4 inputs per output."""
    out, masks = {}, {}
    for name, layer in params.items():
        w = np.asarray(layer["kernel"], np.float16)
        g = np.abs(w).reshape(w.shape[0] // 4, 4, w.shape[1])
        top = np.argsort(-g, axis=1, kind="stable")[:, :2]
        m = np.zeros(g.shape, bool)
        np.put_along_axis(m, top, True, axis=1)
        m = m.reshape(w.shape)
        kernel = jnp.asarray(np.where(m, w, np.float16(0)))
        out[name] = {"kernel": kernel, "bias": layer["bias"].astype(jnp.float16)}
        masks[name] = {"kernel": jnp.asarray(m), "bias": jnp.ones((), bool)}
    return out, masks


def unstructured(params: dict, sparsity: float) -> tuple[dict, dict]:
    masks = jp.masks.topk(jp.criteria.magnitude(params), sparsity)
    return jp.apply_masks(params, masks), masks


def measure(params, masks, fmt: str, root: str, repeats: int) -> dict:
    save_t, restore_t = [], []
    for r in range(repeats):
        d = os.path.join(root, f"{fmt}-{r}")
        shutil.rmtree(d, ignore_errors=True)
        t0 = time.perf_counter()
        checkpoint.save(d, 0, params, masks=masks, format=fmt)
        save_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ckpt = checkpoint.restore(d, params=params)
        jax.block_until_ready(ckpt.params)
        restore_t.append(time.perf_counter() - t0)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ckpt.params), strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), "restore is not bitwise"
    disk = checkpoint.disk_bytes(os.path.join(root, f"{fmt}-0"))
    return {"save_s": min(save_t), "restore_s": min(restore_t), "disk_bytes": disk}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    base = make_params(0)
    n = sum(x.size for x in jax.tree.leaves(base))
    configs = [
        ("50%", lambda: unstructured(base, 0.5)),
        ("90%", lambda: unstructured(base, 0.9)),
        ("95%", lambda: unstructured(base, 0.95)),
        ("2:4 f16", lambda: two_four(base)),
    ]
    rows = []
    root = tempfile.mkdtemp(prefix="bench_checkpoint_")
    try:
        for name, build in tqdm(configs, desc="configs"):
            params, masks = build()
            nominal = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
            payload = sum(
                sum(a.nbytes for a in packing.pack_leaf(np.asarray(x), np.asarray(m))[0].values())
                for x, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks), strict=True)
            )
            dense = measure(params, masks, "dense", root, args.repeats)
            comp = measure(params, masks, "compressed", root, args.repeats)
            rows.append(
                {
                    "config": name,
                    "params": n,
                    "nominal_bytes": nominal,
                    "payload_ratio": payload / nominal,
                    "dense_disk_bytes": dense["disk_bytes"],
                    "compressed_disk_bytes": comp["disk_bytes"],
                    "disk_ratio_vs_nominal": comp["disk_bytes"] / nominal,
                    "disk_ratio_vs_dense_orbax": comp["disk_bytes"] / dense["disk_bytes"],
                    "dense_save_s": dense["save_s"],
                    "compressed_save_s": comp["save_s"],
                    "dense_restore_s": dense["restore_s"],
                    "compressed_restore_s": comp["restore_s"],
                    "restore_time_ratio": comp["restore_s"] / dense["restore_s"],
                    "save_time_ratio": comp["save_s"] / dense["save_s"],
                }
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"\n{n:,} parameters; best of {args.repeats}; bytes ratios relative to nominal dense")
    head = (
        "| config | payload / dense | disk / dense | dense orbax disk | compressed disk | "
        "compressed / dense orbax disk | save dense / compressed (s) | "
        "restore dense / compressed (s) | restore ratio |"
    )
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        print(
            f"| {r['config']} | {r['payload_ratio']:.4f}x | {r['disk_ratio_vs_nominal']:.4f}x | "
            f"{r['dense_disk_bytes'] / 1e6:.1f} MB | {r['compressed_disk_bytes'] / 1e6:.1f} MB | "
            f"{r['disk_ratio_vs_dense_orbax']:.3f}x | {r['dense_save_s']:.2f} / "
            f"{r['compressed_save_s']:.2f} | {r['dense_restore_s']:.2f} / "
            f"{r['compressed_restore_s']:.2f} | {r['restore_time_ratio']:.2f}x |"
        )
    by = {r["config"]: r for r in rows}
    result = {
        "params": n,
        "ratio_bytes_50": by["50%"]["disk_ratio_vs_nominal"],
        "ratio_bytes_90": by["90%"]["disk_ratio_vs_nominal"],
        "ratio_bytes_95": by["95%"]["disk_ratio_vs_nominal"],
        "ratio_bytes_2_4_f16": by["2:4 f16"]["disk_ratio_vs_nominal"],
        "payload_ratio_90": by["90%"]["payload_ratio"],
        "payload_ratio_2_4_f16": by["2:4 f16"]["payload_ratio"],
        "ratio_vs_dense_orbax_disk_90": by["90%"]["disk_ratio_vs_dense_orbax"],
        "restore_time_ratio_50": by["50%"]["restore_time_ratio"],
        "restore_time_ratio_90": by["90%"]["restore_time_ratio"],
        "restore_time_ratio_95": by["95%"]["restore_time_ratio"],
        "restore_time_ratio_2_4_f16": by["2:4 f16"]["restore_time_ratio"],
        "target_90_f32": 0.14,
        "target_2_4_f16": 0.57,
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
