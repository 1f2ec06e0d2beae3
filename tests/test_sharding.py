"""Sharded params: selections, jp.prune and checkpoints keep the sharding and match one device.

The checks run in subprocesses with 8 simulated CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set before jax
is imported); each prints one JSON line of measurements that the tests assert
on. ``_SCRIPT`` uses a ``Mesh`` with Auto axes; ``_EXPLICIT_SCRIPT`` one with
Explicit axes (sharding in types, the default of ``jax.make_mesh`` in jax
0.10), where the searches' reshapes and cumulative sums used to raise
``ShardingTypeError``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

# One worker runs every test here (`pytest -n 2 --dist loadgroup`, the README's
# command), so each module fixture's subprocess runs once, not once per worker.
pytestmark = pytest.mark.xdist_group("sharding")

_SCRIPT = textwrap.dedent(
    r"""
    import json, os, re
    flags = os.environ.get("XLA_FLAGS", "")  # keeps the suite's (tests/conftest.py)
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8"
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


def _run(script: str) -> dict:
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
    env = dict(os.environ, XLA_FLAGS=flags)
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


@pytest.fixture(scope="module")
def sharded() -> dict:
    return _run(_SCRIPT)


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


# Explicit mesh axes ("sharding in types"): every array's type carries its
# sharding, and reshapes or cumulative sums whose output sharding jax cannot
# infer raise ShardingTypeError. The axis types are given explicitly so that
# the test does not depend on jax.make_mesh's default.
_EXPLICIT_SCRIPT = textwrap.dedent(
    r"""
    import json, os, re
    flags = os.environ.get("XLA_FLAGS", "")  # keeps the suite's (tests/conftest.py)
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
    import jaxprune as jp

    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    auto = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    specs = {
        "tp_col": P(None, "model"),
        "tp_row": P("model", None),
        "fsdp": P(("data", "model"), None),
        "both": P("data", "model"),
        "odd": P("data", None),  # 24 rows pack into 3 bytes: not even over 2 devices
        "bias": P(),
    }
    # tp_col makes the total large enough for the sampled bracket (> 65,536).
    shapes = {"tp_col": (256, 512), "tp_row": (128, 64), "fsdp": (64, 64),
              "both": (32, 64), "odd": (24, 20), "bias": (64,)}
    keys = jax.random.split(jax.random.key(0), len(shapes))
    host = {n: np.asarray(jax.random.normal(k, s)) for (n, s), k in zip(shapes.items(), keys)}
    host["both"] = np.round(host["both"] * 2) / 2  # heavy ties: the tie-breaking path
    params = {n: jax.device_put(host[n], NamedSharding(mesh, specs[n])) for n in shapes}
    single = {n: jnp.asarray(host[n]) for n in shapes}
    prunable = [n for n in shapes if n != "bias"]
    total = sum(host[n].size for n in prunable)
    out = {}

    def same(a, b):
        return all(np.array_equal(np.asarray(x), np.asarray(y))
                   for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))

    def spec_of(x):
        spec = list(jax.typeof(x).sharding.spec)
        while spec and spec[-1] is None:  # P("a") and P("a", None) are the same layout
            spec.pop()
        return [str(s) for s in spec]

    def typed_like_params(tree, names):
        return all(jax.typeof(tree[n]).sharding.mesh.axis_types == (AxisType.Explicit,) * 2
                   and spec_of(tree[n]) == spec_of(params[n]) for n in names)

    def pruned(m):
        return int((~np.asarray(m)).sum())

    sel = {
        "layer": (lambda t: jp.masks.topk(jp.criteria.magnitude(t), 0.7), 0.7),
        "global": (lambda t: jp.masks.global_topk(jp.criteria.magnitude(t), 0.7), 0.7),
        "global_cap": (lambda t: jp.masks.global_topk(
            jp.criteria.magnitude(t), 0.9, max_sparsity=0.95), 0.9),
    }
    for name, (fn, s) in sel.items():
        ref = fn(single)
        for mode, f in (("eager", fn), ("jit", jax.jit(fn))):
            m = f(params)
            key = f"{name}_{mode}"
            out[f"{key}_equal"] = same(m, ref)
            out[f"{key}_sharding_kept"] = typed_like_params(m, prunable)
            if name == "layer":
                out[f"{key}_counts"] = all(
                    pruned(m[n]) == round(s * host[n].size) for n in prunable)
            else:
                out[f"{key}_counts"] = sum(pruned(m[n]) for n in prunable) == round(s * total)
                out[f"{key}_capped"] = all(
                    pruned(m[n]) <= int(0.95 * host[n].size) for n in prunable)
    # Under a context mesh too (jax.sharding.set_mesh, as jax's docs recommend).
    with jax.sharding.set_mesh(mesh):
        m = jax.jit(sel["global"][0])(params)
    out["set_mesh_equal"] = same(m, sel["global"][0](single))

    k = jnp.int32(700)
    out["kth_equal"] = same(
        jp.masks.kth_smallest_keys([jp.masks.ordered_keys(params["both"])], k),
        jp.masks.kth_smallest_keys([jp.masks.ordered_keys(single["both"])], k))
    bools = {n: params[n] > 0 for n in prunable}
    packed = jax.jit(jp.masks.pack)(bools)
    out["pack_equal"] = same(packed, jp.masks.pack({n: single[n] > 0 for n in prunable}))
    out["unpack_equal"] = same(jp.masks.unpack(packed), bools)
    out["pack_spec"] = {n: spec_of(packed[n].bits) for n in prunable}

    def run(p, scope, steps=3, context=True):
        tx = jp.prune(optax.adam(1e-2), sparsity=jp.schedules.polynomial(
            0.3, 0.8, begin_step=0, end_step=2, frequency=1), scope=scope)
        if context:  # a jitted init builds arrays from no input's data: it needs the mesh
            with jax.sharding.set_mesh(mesh):
                state = jax.jit(tx.init)(p)
        else:
            state = tx.init(p)
        step = jax.jit(tx.update)
        for i in range(steps):
            g = jax.tree.map(lambda x: jnp.cos(x * (i + 1)), p)
            if context:
                with jax.sharding.set_mesh(mesh):
                    u, state = step(g, state, p)
            else:
                u, state = step(g, state, p)
            p = optax.apply_updates(p, u)
        return p, state, tx, step, g

    def gathers(hlo):
        sizes = []
        for line in hlo.splitlines():
            m = re.search(r"=\s*\(?(\w+)\[([\d,]*)\][^=]*\ball-gather(-start)?\(", line)
            if m:
                sizes.append(int(np.prod([int(d) for d in m.group(2).split(",") if d])))
        return sorted(sizes)

    for scope in ("layer", "global"):
        p_sh, s_sh, tx, step, g = run(params, scope)
        p_1, s_1, _, _, _ = run(single, scope, context=False)
        m_sh = jp.get_masks(s_sh)
        out[f"prune_{scope}_masks_equal"] = same(m_sh, jp.get_masks(s_1))
        out[f"prune_{scope}_params_equal"] = same(p_sh, p_1)
        if scope == "layer":
            out[f"prune_{scope}_counts"] = all(
                pruned(m_sh[n]) == round(0.8 * host[n].size) for n in prunable)
        else:
            out[f"prune_{scope}_counts"] = (
                sum(pruned(m_sh[n]) for n in prunable) == round(0.8 * total))
        out[f"prune_{scope}_params_sharding_kept"] = typed_like_params(p_sh, list(shapes))
        out[f"prune_{scope}_state_spec"] = {n: spec_of(s_sh.packed_masks[n].bits)
                                            for n in prunable}
    # The compiled global step (refresh branch included) communicates exactly
    # what the same step does on an Auto mesh with the same layout.
    with jax.sharding.set_mesh(mesh):
        out["explicit_gathers"] = gathers(step.lower(g, s_sh, p_sh).compile().as_text())
    p_auto = {n: jax.device_put(host[n], NamedSharding(auto, specs[n])) for n in shapes}
    g_auto = {n: jax.device_put(np.asarray(g[n]), p_auto[n].sharding) for n in shapes}
    s_auto = tx.init(p_auto)
    out["auto_gathers"] = gathers(step.lower(g_auto, s_auto, p_auto).compile().as_text())
    # Without a context mesh, the mesh comes from the params' types.
    _, s_nc, _, _, _ = run(params, "global", steps=1, context=False)
    _, s_1, _, _, _ = run(single, "global", steps=1, context=False)
    out["prune_no_context_equal"] = same(jp.get_masks(s_nc), jp.get_masks(s_1))
    out["param_spec"] = {n: spec_of(params[n]) for n in prunable}

    def run_tx(tx, p, steps):
        with jax.sharding.set_mesh(mesh):
            state = jax.jit(tx.init)(p)
            step = jax.jit(tx.update)
            for i in range(steps):
                g = jax.tree.map(lambda x: jnp.cos(x * (i + 1)), p)
                u, state = step(g, state, p)
                p = optax.apply_updates(p, u)
        return p, state

    # jp.prune(reset_moments=True): the old masks are retyped like the params too.
    reset = jp.prune(optax.adam(1e-2), sparsity=lambda s: 0.7, criterion=jp.criteria.random,
                     key=jax.random.key(3), reset_moments=True)
    (p_sh, s_sh), (p_1, s_1) = run_tx(reset, params, 2), run_tx(reset, single, 2)
    # The masks and adam's moments bit for bit. The params within 2 ulp: the
    # update divides the moments in two differently partitioned programs, and
    # XLA may round an entry of the two apart (1 ulp was seen).
    out["reset_moments_equal"] = same((jp.get_masks(s_sh), s_sh.inner_state),
                                      (jp.get_masks(s_1), s_1.inner_state))

    def ulps(a, b):
        i, j = (np.asarray(x, np.float32).view(np.int32).astype(np.int64) for x in (a, b))
        i, j = (np.where(x < 0, -(x & 0x7FFFFFFF), x) for x in (i, j))
        return int(np.abs(i - j).max(initial=0))

    out["reset_params_ulps"] = max(ulps(a, b) for a, b in zip(jax.tree.leaves(p_sh),
                                                               jax.tree.leaves(p_1), strict=True))

    # jp.dynamic.ste: the dense copy and the masks follow the params' layout.
    ste = jp.dynamic.ste(optax.adam(1e-2), sparsity=0.7, scope="global", decay=1e-3)
    (p_sh, s_sh), (p_1, s_1) = run_tx(ste, params, 3), run_tx(ste, single, 3)
    out["ste_equal"] = same((p_sh, s_sh.dense, jp.get_masks(s_sh)),
                            (p_1, s_1.dense, jp.get_masks(s_1)))
    out["ste_sharding_kept"] = (typed_like_params(p_sh, list(shapes))
                                and typed_like_params(s_sh.dense, prunable))
    print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def explicit() -> dict:
    return _run(_EXPLICIT_SCRIPT)


@pytest.mark.parametrize("scope", ["layer", "global", "global_cap"])
@pytest.mark.parametrize("mode", ["eager", "jit"])
def test_explicit_axes_selection_exact_and_sharded(explicit, scope, mode):
    key = f"{scope}_{mode}"
    assert explicit[f"{key}_equal"]  # bit-identical to the single-device masks
    assert explicit[f"{key}_counts"]  # round(s * n), per leaf or in total
    assert explicit[f"{key}_sharding_kept"]  # typed like the params, Explicit axes
    if scope == "global_cap":
        assert explicit[f"{key}_capped"]


def test_explicit_axes_selection_under_set_mesh(explicit):
    assert explicit["set_mesh_equal"]


def test_explicit_axes_kth_smallest_and_packing(explicit):
    assert explicit["kth_equal"]
    assert explicit["pack_equal"]
    assert explicit["unpack_equal"]
    # The bits keep the mask's layout, but for a packed axis whose bytes do not
    # divide over its devices (odd: 3 bytes over 2), which is replicated.
    want = {**explicit["param_spec"], "odd": []}
    assert explicit["pack_spec"] == want


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_explicit_axes_prune_matches_single_device(explicit, scope):
    assert explicit[f"prune_{scope}_masks_equal"]
    assert explicit[f"prune_{scope}_params_equal"]
    assert explicit[f"prune_{scope}_counts"]
    assert explicit[f"prune_{scope}_params_sharding_kept"]
    want = {**explicit["param_spec"], "odd": []}
    assert explicit[f"prune_{scope}_state_spec"] == want


def test_explicit_axes_prune_gathers_what_an_auto_mesh_does(explicit):
    assert explicit["explicit_gathers"] == explicit["auto_gathers"]
    assert max(explicit["explicit_gathers"], default=0) < 256 * 512 // 4


def test_explicit_axes_prune_without_context_mesh(explicit):
    assert explicit["prune_no_context_equal"]


def test_explicit_axes_ste_and_reset_moments_match_one_device_and_keep_layouts(explicit):
    assert explicit["reset_moments_equal"]
    assert explicit["reset_params_ulps"] <= 2
    assert explicit["ste_equal"]
    assert explicit["ste_sharding_kept"]
