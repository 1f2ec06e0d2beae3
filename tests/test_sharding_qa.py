"""Sharded params, found in review: report FLOPs, structured selections, rigl and restore.

One subprocess with 8 simulated CPU devices (``XLA_FLAGS`` must be set before
jax is imported) prints a JSON line of checks that the test asserts on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

_SCRIPT = textwrap.dedent(
    r"""
    import json, os, tempfile
    flags = os.environ.get("XLA_FLAGS", "")  # keeps the suite's (tests/conftest.py)
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import functools
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import jaxprune as jp

    out = {}
    rng = np.random.default_rng(0)
    auto = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    explicit = jax.make_mesh((2, 4), ("data", "model"))

    # jp.report's xla_flops is the whole model's, not one device's share.
    w = rng.normal(size=(64, 128)).astype(np.float32)
    x = rng.normal(size=(16, 64)).astype(np.float32)
    apply = lambda p, x: jnp.tanh(x @ p["w"])
    one = jp.report({"w": jnp.asarray(w)}, apply_fn=apply, example_inputs=jnp.asarray(x))
    sharded = jp.report(
        {"w": jax.device_put(w, NamedSharding(auto, P(None, "model")))},
        apply_fn=apply,
        example_inputs=jax.device_put(x, NamedSharding(auto, P("data", None))),
    )
    out["flops"] = [one.flops["xla_flops"], sharded.flops["xla_flops"]]

    # Under shard_map the MACs are the whole model's (the body runs on every device),
    # and the weight keeps its identity through the pvary that check_vma inserts.
    try:
        from jax import shard_map
    except ImportError:  # older jax
        from jax.experimental.shard_map import shard_map
    masked = {"w": jnp.asarray(w).at[:48].set(0.0)}  # density 0.25
    out["shard_map"] = []
    for check in (True, False):
        body = shard_map(lambda w, x: x @ w, mesh=auto, in_specs=(P(), P("data")),
                         out_specs=P("data"), check_vma=check)
        r = jp.report(masked, apply_fn=lambda p, x: body(p["w"], x), example_inputs=x)
        out["shard_map"].append([r.flops["dense_macs"], r.flops["nonzero_macs"],
                                 r.flops["shard_maps"], "shard_map body" in str(r)])

    # Selections and jp.prune inside shard_map on per-shard params (an ensemble, FSDP):
    # each shard's masks are those of its own block, as outside.
    W = jax.random.normal(jax.random.key(0), (32, 16))
    tx = jp.prune(optax.adam(1e-2), sparsity=0.5)

    def prune_step(w):
        p = {"w": w}
        u, _ = tx.update(p, tx.init(p), p)
        return optax.apply_updates(p, u)["w"] != 0

    out["in_shard_map"] = {}
    for name, f in {
        "topk": lambda w: jp.masks.topk({"w": w}, 0.5)["w"],
        "global_topk": lambda w: jp.masks.global_topk({"w": w, "v": w[:, :4] * 2}, 0.5)["w"],
        "structured": lambda w: jp.masks.structured({"w": w}, 0.5)["w"],
        "ties": lambda w: jp.masks.topk({"w": jnp.ones_like(w)}, 0.5)["w"],
        "prune": prune_step,
    }.items():
        got = shard_map(f, mesh=auto, in_specs=P("data"), out_specs=P("data"))(W)
        ref = np.concatenate([np.asarray(f(W[:16])), np.asarray(f(W[16:]))])
        out["in_shard_map"][name] = bool(np.array_equal(np.asarray(got), ref))

    # Structured selections on an Explicit mesh: equal to one device, and usable as a scope.
    def put(a, spec):
        return jax.device_put(a, NamedSharding(explicit, spec))

    conv = rng.normal(size=(3, 3, 8, 16)).astype(np.float32)
    dense = rng.normal(size=(16, 12)).astype(np.float32)
    cases = {
        "patterns": (jp.masks.patterns, {"c": conv}, P(None, None, None, "model")),
        "blocks": (functools.partial(jp.masks.blocks, block=(1, 4)), {"w": dense},
                   P(None, "model")),
        "nm": (lambda s, sp, where=None: jp.masks.nm(s, where=where), {"w": dense[:8]},
               P("model", None)),
        "structured": (jp.masks.structured, {"w": dense}, P("model", None)),
    }
    for name, (sel, tree, spec) in cases.items():
        ref = sel(jax.tree.map(jnp.abs, tree), 0.5)
        params = {k: put(v, spec) for k, v in tree.items()}
        got = sel(jp.criteria.magnitude(params), 0.5)
        same = all(bool(np.array_equal(np.asarray(a), np.asarray(b)))
                   for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)))
        spec_kept = all(jax.typeof(m).sharding.spec == spec for m in jax.tree.leaves(got))
        tx = jp.prune(optax.sgd(0.1), sparsity=0.5, scope=sel)
        with jax.sharding.set_mesh(explicit):
            u, s = jax.jit(tx.update)(params, tx.init(params), params)
        new = optax.apply_updates(params, u)
        enforced = all(bool(jnp.all(jnp.where(m, True, p == 0)))
                       for m, p in zip(jax.tree.leaves(jp.get_masks(s)), jax.tree.leaves(new)))
        # A traced sparsity (a schedule's) typed on the Explicit mesh, as
        # jax.jit(tx.init) under set_mesh makes it.
        tx = jp.prune(optax.sgd(0.1), sparsity=jp.schedules.polynomial(0.5, 0.5, 0, 1), scope=sel)
        with jax.sharding.set_mesh(explicit):
            u, s = jax.jit(tx.update)(params, jax.jit(tx.init)(params), params)
        traced = all(bool(np.array_equal(np.asarray(a), np.asarray(b)))
                     for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(jp.get_masks(s))))
        out[name] = [same, spec_kept, enforced, traced]

    # Concrete sharded scores on an Auto mesh: masks placed like them.
    fsdp = jax.device_put(dense, NamedSharding(auto, P(("data", "model"), None)))
    m = jp.masks.structured({"w": jnp.abs(fsdp)}, 0.5)["w"]
    out["structured_auto_placed"] = m.sharding == fsdp.sharding

    # rigl / set under set_mesh on an Explicit mesh; initial masks laid out like the params.
    p = {"w": put(rng.normal(size=(64, 128)).astype(np.float32), P(None, "model"))}
    g = jax.tree.map(jnp.sin, p)
    ok = []
    for make in (jp.dynamic.rigl, jp.dynamic.set):
        tx = make(optax.adam(1e-2), sparsity=0.8, key=jax.random.key(0), end_step=6, update_every=1)
        st = tx.init(p)
        ok.append(st.packed_masks["w"].bits.sharding.spec == P(None, "model"))
        with jax.sharding.set_mesh(explicit):
            u, st = jax.jit(tx.update)(g, st, p)
            u, st = jax.jit(tx.update)(g, st, optax.apply_updates(p, u))
        ok.append(abs(float(jp.sparsity(jp.get_masks(st))) - 0.8) < 1e-3)
    out["dynamic"] = ok

    # Restore onto jax.eval_shape templates of Explicit-mesh arrays.
    d = os.path.join(tempfile.mkdtemp(), "ckpt")
    wp = put(rng.normal(size=(64, 32)).astype(np.float32), P("data", "model"))
    jp.save(d, 0, {"w": wp})
    template = jax.eval_shape(lambda t: t, {"w": wp})
    try:
        jp.restore(d, params=template)
        out["restore_no_mesh"] = "no error"
    except ValueError as e:
        out["restore_no_mesh"] = str(e)
    with jax.sharding.set_mesh(explicit):
        r = jp.restore(d, params=template)
    out["restore_in_mesh"] = [bool(np.array_equal(np.asarray(r.params["w"]), np.asarray(wp))),
                              r.params["w"].sharding.spec == P("data", "model")]

    # Stacked layers, the layer axis sharded on an Explicit mesh: per_layer's
    # topk and global_topk (direct and as jp.prune's scope) equal one device's.
    ws = rng.normal(size=(4, 32, 16)).astype(np.float32)
    stack = {"layers": {"kernel": ws, "bias": np.ones((4, 16), np.float32)}}
    out["stacked"] = []
    for base in (jp.masks.topk, jp.masks.global_topk):
        sel = jp.masks.per_layer(base, stacked=lambda p, _: p[0] == "layers")
        want = np.asarray(sel(jp.criteria.magnitude(stack), 0.5)["layers"]["kernel"])
        specs = {"kernel": P("data", None, "model"), "bias": P("data", "model")}
        sharded = {"layers": {k: jax.device_put(v, NamedSharding(explicit, specs[k]))
                              for k, v in stack["layers"].items()}}
        with jax.sharding.set_mesh(explicit):
            direct = jax.jit(lambda s: sel(s, 0.5))(jp.criteria.magnitude(sharded))
            tx = jp.prune(optax.sgd(0.1), sparsity=0.5, scope=sel)
            grads = jax.tree.map(jnp.ones_like, sharded)
            _, st = jax.jit(tx.update)(grads, tx.init(sharded), sharded)
        got = [np.asarray(direct["layers"]["kernel"]),
               np.asarray(jp.get_masks(st)["layers"]["kernel"])]
        out["stacked"] += [bool(np.array_equal(g, want)) for g in got]

    # The capped per-layer global search needs no cut either; a selection that
    # cuts says so when the layer axis is sharded, and a stack `where` leaves
    # out (the biases, layer axis sharded) is not cut at all.
    capped = jp.masks.per_layer(functools.partial(jp.masks.global_topk, max_sparsity=0.6),
                                stacked=lambda p, _: p[0] == "layers")
    want = np.asarray(capped(jp.criteria.magnitude(stack), 0.5)["layers"]["kernel"])
    structured = jp.masks.per_layer(functools.partial(jp.masks.structured, axes=-1),
                                    stacked=lambda p, _: p[0] == "layers")
    want_s = np.asarray(structured(jp.criteria.magnitude(stack), 0.5)["layers"]["kernel"])
    bias_only = {"layers": {
        "kernel": jax.device_put(ws, NamedSharding(explicit, P(None, None, "model"))),
        "bias": jax.device_put(stack["layers"]["bias"],
                               NamedSharding(explicit, P("data", "model"))),
    }}
    with jax.sharding.set_mesh(explicit):
        got = jax.jit(lambda s: capped(s, 0.5))(jp.criteria.magnitude(sharded))
        got_s = jax.jit(lambda s: structured(s, 0.5))(jp.criteria.magnitude(bias_only))
        try:
            jax.jit(lambda s: structured(s, 0.5))(jp.criteria.magnitude(sharded))
            refused = "no error"
        except ValueError as e:
            refused = str(e)
    out["stacked_cut"] = [bool(np.array_equal(np.asarray(got["layers"]["kernel"]), want)),
                          bool(np.array_equal(np.asarray(got_s["layers"]["kernel"]), want_s)),
                          refused]

    # rigl with stacked=, the layer axis sharded on the Explicit mesh: the same
    # masks as on one device after rewirings (vmapped per layer).
    def rigl_masks(p, mesh=None):
        tx = jp.dynamic.rigl(optax.adam(1e-2), sparsity=0.8, key=jax.random.key(0),
                             end_step=100, update_every=2,
                             stacked=lambda path, _: path[0] == "layers")

        @jax.jit
        def step(p, s):
            u, s = tx.update(jax.tree.map(lambda x: jnp.sin(3.0 * x), p), s, p)
            return optax.apply_updates(p, u), s

        def run():
            q, s = p, tx.init(p)
            for _ in range(5):
                q, s = step(q, s)
            return np.asarray(jp.get_masks(s)["layers"]["kernel"])

        if mesh is None:
            return run()
        with jax.sharding.set_mesh(mesh):
            return run()

    one_device = rigl_masks(jax.tree.map(jnp.asarray, stack))
    on_mesh = rigl_masks(sharded, explicit)
    out["rigl_stacked"] = [bool(np.array_equal(one_device, on_mesh)),
                           (one_device.sum((1, 2)) == round(0.2 * 32 * 16)).all().item()]

    # jp.prune's capped global scope (fused: per-leaf cuts tested where the keys
    # are recomputed) on an Auto and an Explicit mesh: the one-device masks.
    cap_scope = functools.partial(jp.masks.global_topk, max_sparsity=0.9)
    tree = {"w": rng.normal(size=(16, 12)).astype(np.float32),
            "v": rng.normal(size=(16, 8)).astype(np.float32) * 1e-3}
    cap_tx = jp.prune(optax.sgd(0.1), sparsity=0.95, scope=cap_scope)
    one_dev = jax.tree.map(jnp.asarray, tree)
    cap_ref = jp.get_masks(jax.jit(cap_tx.update)(one_dev, cap_tx.init(one_dev), one_dev)[1])
    out["capped_scope"] = []
    for mesh_ in (auto, explicit):
        placed = {k: jax.device_put(v, NamedSharding(mesh_, P("model", None)))
                  for k, v in tree.items()}
        with jax.sharding.set_mesh(mesh_):
            _, st = jax.jit(cap_tx.update)(placed, cap_tx.init(placed), placed)
        got = jp.get_masks(st)
        out["capped_scope"].append(all(
            bool(np.array_equal(np.asarray(cap_ref[k]), np.asarray(got[k]))) for k in tree))
    # A leaf whose shards along the packed axis are not a multiple of 8 long:
    # its packed mask is replicated, and jp.prune says so when it is built.
    import warnings

    def layout_warnings(shape):
        w = jax.device_put(np.ones(shape, np.float32), NamedSharding(auto, P(("data", "model"))))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            jp.prune(optax.sgd(0.1), sparsity=0.5).init({"w": w})
        msgs = [str(c.message) for c in caught]
        return [m for m in msgs if "cannot keep the params' layout" in m]

    out["layout_warnings"] = [layout_warnings((1000, 256)), layout_warnings((64, 128))]
    print("RESULT " + json.dumps(out))
    """
)


def test_sharded_report_selections_dynamic_and_restore():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=600
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT ") :])
    one, sharded = out["flops"]
    assert sharded == one  # not one device's share
    assert out["in_shard_map"] == dict.fromkeys(out["in_shard_map"], True), out["in_shard_map"]
    assert len(out["in_shard_map"]) == 5
    # 16 x 64 x 128 MACs over both data shards, a quarter of them on nonzero weights.
    assert out["shard_map"] == [[16 * 64 * 128, 16 * 64 * 128 / 4, 1, True]] * 2, out["shard_map"]
    for name in ("patterns", "blocks", "nm", "structured"):
        assert out[name] == [True, True, True, True], (name, out[name])
    assert out["structured_auto_placed"]
    assert all(out["dynamic"]), out["dynamic"]
    assert "abstract mesh" in out["restore_no_mesh"] and "set_mesh" in out["restore_no_mesh"]
    assert out["restore_in_mesh"] == [True, True]
    assert out["stacked"] == [True] * 4, out["stacked"]
    assert out["rigl_stacked"] == [True, True], out["rigl_stacked"]
    assert out["capped_scope"] == [True, True], out["capped_scope"]
    odd, even = out["layout_warnings"]
    assert len(odd) == 1 and "w (1000, 256): axis 0" in odd[0] and not even, out["layout_warnings"]
    capped_ok, bias_not_cut, refused = out["stacked_cut"]
    assert capped_ok and bias_not_cut
    assert "layers/kernel" in refused and "per_layer(jp.masks.topk)" in refused, refused
