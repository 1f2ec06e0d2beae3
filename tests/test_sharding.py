"""Sharded params: selections, jp.prune and checkpoints keep the sharding and match one device.

The checks run in a subprocess with 8 simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set before jax
is imported); it prints one JSON line of measurements that the tests assert on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

_SCRIPT = textwrap.dedent(
    r"""
    import json, os, re
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import jaxprune as jp

    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    specs = {
        "tp_col": P(None, "model"),     # tensor parallel: output columns split
        "tp_row": P("model", None),     # tensor parallel: input rows split
        "fsdp": P(("data", "model"), None),  # FSDP: rows over all 8 devices
        "both": P("data", "model"),
        "bias": P(),
    }
    shapes = {"tp_col": (256, 512), "tp_row": (512, 128), "fsdp": (256, 256),
              "both": (128, 256), "bias": (512,)}
    keys = jax.random.split(jax.random.key(0), len(shapes))
    host = {n: np.asarray(jax.random.normal(k, s)) for (n, s), k in zip(shapes.items(), keys)}
    # Heavy ties (values on a coarse grid) exercise the tie-breaking path.
    host["both"] = np.round(host["both"] * 2) / 2
    shard = {n: NamedSharding(mesh, specs[n]) for n in shapes}
    params = {n: jax.device_put(host[n], shard[n]) for n in shapes}
    single = {n: jax.device_put(host[n], jax.devices()[0]) for n in shapes}
    out = {}

    def same(a, b):
        return all(np.array_equal(np.asarray(x), np.asarray(y))
                   for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))

    def spec_of(x):
        spec = list(x.sharding.spec)
        while spec and spec[-1] is None:  # P("a") and P("a", None) are the same layout
            spec.pop()
        return spec

    for scope, fn in (("layer", jp.masks.topk), ("global", jp.masks.global_topk)):
        f = jax.jit(lambda s, fn=fn: fn(jp.criteria.magnitude(s), 0.7))
        m_sh, m_1 = f(params), f(single)
        out[f"{scope}_equal"] = same(m_sh, m_1)
        out[f"{scope}_sharding_kept"] = all(
            m_sh[n].sharding.is_equivalent_to(params[n].sharding, 2) for n in shapes if n != "bias")

    def run(p, steps=3):
        tx = jp.prune(optax.adam(1e-2), sparsity=jp.schedules.polynomial(
            0.3, 0.8, begin_step=0, end_step=2, frequency=1), scope="global")
        state = tx.init(p)
        step = jax.jit(lambda g, s, p: tx.update(g, s, p))
        for i in range(steps):
            g = jax.tree.map(lambda x: jnp.cos(x * (i + 1)), p)
            u, state = step(g, state, p)
            p = optax.apply_updates(p, u)
        return p, state, tx, step, g

    p_sh, s_sh, tx, step, g = run(params)
    p_1, s_1, _, _, _ = run(single)
    out["prune_masks_equal"] = same(jp.get_masks(s_sh), jp.get_masks(s_1))
    out["prune_params_equal"] = same(p_sh, p_1)
    packed = s_sh.packed_masks
    out["state_spec"] = {n: list(map(str, spec_of(packed[n].bits))) for n in shapes if n != "bias"}
    out["param_spec"] = {n: list(map(str, spec_of(p_sh[n]))) for n in shapes if n != "bias"}
    out["params_sharding_kept"] = all(
        p_sh[n].sharding.is_equivalent_to(params[n].sharding, p_sh[n].ndim) for n in shapes)
    init_packed = tx.init(params).packed_masks
    out["init_spec"] = {n: list(map(str, spec_of(init_packed[n].bits)))
                        for n in shapes if n != "bias"}

    def gather_sizes(hlo):
        sizes = []
        for line in hlo.splitlines():
            m = re.search(r"=\s*\(?(\w+)\[([\d,]*)\][^=]*\ball-gather(-start)?\(", line)
            if m:
                dims = [int(d) for d in m.group(2).split(",") if d]
                sizes.append(int(np.prod(dims)) if dims else 1)
        return sizes

    # Compiled HLO of the update step, whose refresh branch is always compiled.
    hlo = step.lower(g, s_sh, p_sh).compile().as_text()
    out["all_gather_sizes"] = gather_sizes(hlo)
    # Positive control: a sort over a flattened sharded leaf must show up as a gather.
    ctrl = jax.jit(lambda x: jnp.sort(x.reshape(-1))[::97]).lower(params["tp_col"]).compile()
    out["control_gather"] = max(gather_sizes(ctrl.as_text()), default=0)
    out["smallest_prunable"] = min(int(np.prod(s)) for n, s in shapes.items() if n != "bias")
    out["all_to_all"] = hlo.count("all-to-all(")
    # Checkpoints: a compressed save of sharded params and state, restored onto
    # sharded templates (live arrays, and ShapeDtypeStructs carrying shardings).
    import tempfile
    from jaxprune import checkpoint as ckpt
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), p_sh)
    with tempfile.TemporaryDirectory() as d:
        ckpt.save(d, 3, p_sh, s_sh, format="compressed")
        live = ckpt.restore(d, params=p_sh, opt_state=s_sh)
        shapes_only = ckpt.restore(d, params=abstract)
    out["ckpt_params_equal"] = same(live.params, p_sh) and same(shapes_only.params, p_sh)
    out["ckpt_state_equal"] = same(live.opt_state, s_sh)
    out["ckpt_masks_equal"] = same(live.masks, jp.get_masks(s_sh))
    out["ckpt_sharding_kept"] = all(
        r[n].sharding.is_equivalent_to(p_sh[n].sharding, p_sh[n].ndim)
        for r in (live.params, shapes_only.params) for n in shapes)
    out["ckpt_state_sharding_kept"] = all(
        a.sharding.is_equivalent_to(b.sharding, a.ndim)
        for a, b in zip(jax.tree.leaves(live.opt_state), jax.tree.leaves(s_sh), strict=True)
        if isinstance(b, jax.Array))
    out["ckpt_spec"] = {n: list(map(str, spec_of(shapes_only.params[n]))) for n in shapes
                        if n != "bias"}
    print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def sharded() -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_selection_matches_single_device_and_keeps_sharding(sharded, scope):
    assert sharded[f"{scope}_equal"]
    assert sharded[f"{scope}_sharding_kept"]


def test_prune_step_matches_single_device(sharded):
    assert sharded["prune_masks_equal"]
    assert sharded["prune_params_equal"]
    assert sharded["params_sharding_kept"]


def test_packed_state_keeps_param_sharding(sharded):
    assert sharded["state_spec"] == sharded["param_spec"]
    assert sharded["init_spec"] == sharded["param_spec"]


def test_refresh_gathers_no_full_parameter(sharded):
    # Only the strided sample (a few thousand keys) may be gathered; never a leaf.
    sizes = sharded["all_gather_sizes"]
    assert max(sizes, default=0) < sharded["smallest_prunable"] // 4, sizes
    assert sharded["control_gather"] >= sharded["smallest_prunable"]  # the check can fail
    assert sharded["all_to_all"] == 0


def test_compressed_checkpoint_restores_onto_sharded_templates(sharded):
    assert sharded["ckpt_params_equal"]
    assert sharded["ckpt_state_equal"]
    assert sharded["ckpt_masks_equal"]
    assert sharded["ckpt_sharding_kept"]
    assert sharded["ckpt_state_sharding_kept"]
    assert sharded["ckpt_spec"] == sharded["param_spec"]
