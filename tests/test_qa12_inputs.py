"""Second QA pass: bad input named, silent no-ops warned, numerics at the edges."""

import importlib
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxprune as jp
from jaxprune import structure

P = {"w": jnp.arange(1.0, 33.0).reshape(8, 4), "b": jnp.zeros(4)}


@pytest.mark.parametrize(
    "select",
    [
        lambda s: jp.masks.topk(s, 0.5),
        lambda s: jp.masks.global_topk(s, 0.5),
        lambda s: jp.masks.structured(s, 0.5),
        lambda s: jp.masks.nm(s),
        lambda s: jp.masks.blocks(s, 0.5, block=(2, 2)),
        lambda s: jp.distributions.per_output(s, 0.5),
    ],
    ids=["topk", "global_topk", "structured", "nm", "blocks", "per_output"],
)
def test_selections_warn_when_where_selects_nothing(select):
    ints = {"w": jnp.arange(16).reshape(4, 4)}
    with pytest.warns(
        UserWarning, match=r"selects none of the scores' leaves \('w' int32\[4, 4\]\)"
    ):
        masks = select(ints)
    assert bool(jnp.all(masks["w"]))


def test_selections_stay_quiet_at_sparsity_0_and_under_jit():
    ints = {"w": jnp.arange(16).reshape(4, 4)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jp.masks.topk(ints, 0.0)
        jax.jit(lambda s: jp.masks.topk(ints, s))(0.5)  # traced: unknown, no warning
        jp.masks.topk({"w": jnp.ones((4, 4))}, 0.5)


def test_a_misspelt_scored_where_is_warned():
    where = jp.activations.scored_where({"l3": jnp.ones(6)})
    with pytest.warns(UserWarning, match="selects none"):
        jp.masks.structured({"l1": {"kernel": jnp.ones((8, 6))}}, 0.5, where=where)


@pytest.mark.parametrize("bad", [1.5, -0.5, float("nan"), 0.0, 1.0, True, "0.2"])
def test_test_fraction_is_checked(bad):
    with pytest.raises(ValueError, match=r"test_fraction must be a number in \(0, 1\)"):
        jp.data.load_digits(test_fraction=bad)


def test_batches_checks_its_arguments():
    x, y = np.zeros((5, 3)), np.arange(5)
    with pytest.raises(ValueError, match=r"batch_size must be an int in \[1, 5\].*got 2.0"):
        list(jp.data.batches(x, y, 2.0))
    with pytest.raises(ValueError, match="epochs must be an int >= 1, got -1"):
        list(jp.data.batches(x, y, 2, epochs=-1))
    with pytest.raises(ValueError, match="x holds no examples"):
        list(jp.data.batches(x[:0], y[:0], 2))
    assert len(list(jp.data.batches(x, y, np.int64(2), epochs=2))) == 4


def test_gate_masks_refuse_a_cap_without_a_budget():
    hc = jp.gates.HardConcrete()
    params = {"l1": {"kernel": jnp.ones((8, 6))}, "l2": {"kernel": jnp.ones((6, 3))}}
    gp = jp.gates.init_gates(hc, params)
    with pytest.raises(ValueError, match=r"max_sparsity=0.5 caps a ranking by sparsity="):
        jp.gates.unit_masks(hc, gp, max_sparsity=0.5)
    with pytest.raises(ValueError, match="max_sparsity=0.5 caps"):
        jp.gates.to_masks(hc, gp, params, max_sparsity=0.5)
    keep = jp.gates.unit_masks(hc, gp, sparsity=0.5, max_sparsity=0.6)
    assert sum(int(k.sum()) for k in keep.values()) == 5  # 9 units, round(4.5) = 4 pruned


def test_report_names_dropped_or_failing_flops_arguments():
    p = {"w": jnp.ones((8, 4))}
    with pytest.raises(ValueError, match="example_inputs was given without apply_fn"):
        jp.report(p, None, None, jnp.ones((2, 8)))
    with pytest.raises(ValueError, match="apply_fn must be callable.*got 'f'"):
        jp.report(p, None, "f", jnp.ones((2, 8)))
    with pytest.raises(
        ValueError, match=r"fails with example inputs of shapes \[\(2, 5\)\]: TypeError"
    ):
        jp.report(p, None, lambda q, x: x @ q["w"], jnp.ones((2, 5)))
    rep = importlib.import_module("jaxprune.report")
    with pytest.raises(ValueError, match="plot_sparsity plots a Report, got dict"):
        rep.plot_sparsity(p)
    with pytest.raises(ValueError, match="results record 0 is 1, not a dict"):
        rep.plot_accuracy_vs_compression([1, 2])
    with pytest.raises(ValueError, match="results must be a list of records"):
        rep.plot_accuracy_vs_compression({"accuracy": 0.9})


def test_attacks_check_the_key_and_the_labels():
    x = jnp.full((10, 4), 0.5)
    w = jnp.ones((4, 3))
    apply_fn = lambda q, z, k: (z @ q, [])  # noqa: E731
    with pytest.raises(ValueError, match="key must be a PRNG key, got 0"):
        jp.adversarial.pgd(lambda z: z.sum(1), x, eps=0.1, step_size=0.01, steps=2, key=0)
    run = jp.adversarial.attack(apply_fn, eps=0.1, step_size=0.01, steps=2)
    with pytest.raises(ValueError, match="key must be a PRNG key, got 0"):
        run(w, x, jnp.zeros(10, jnp.int32), 0)
    with pytest.raises(ValueError, match=r"x and y must hold as many examples.*\(10, 4\).*\(5,\)"):
        run(w, x, jnp.zeros(5, jnp.int32), jax.random.key(0))
    with pytest.raises(ValueError, match="key must be a PRNG key, got 0"):
        jp.adversarial.robustness(
            apply_fn, w, x, jnp.zeros(10, jnp.int32), eps=0.1, step_size=0.01, steps=2, key=0
        )


def test_an_int_key_is_named_by_its_value_not_its_tracer():
    tx = jp.prune(optax.sgd(0.1), sparsity=0.5, criterion=jp.criteria.random)
    with pytest.raises(ValueError, match="key must be a PRNG key, got 3\\."):
        tx.update(P, tx.init(P), P, key=3)


def test_selection_checks_its_functions_when_built():
    with pytest.raises(ValueError, match="distribution must be a function.*got 0.5"):
        jp.distributions.selection(0.5)
    with pytest.raises(ValueError, match="select must be a selection.*got 'topk'"):
        jp.distributions.selection(jp.distributions.erk, "topk")


def test_second_order_estimates_name_an_integer_leaf():
    lf = lambda q, x: (x @ q["w"].astype(jnp.float32)).sum()  # noqa: E731
    qi = {"w": jnp.ones((8, 4), jnp.int32)}
    with pytest.raises(ValueError, match="fisher_diag: params leaf 'w' has dtype int32"):
        jp.criteria.fisher_diag(lf, qi, jnp.ones((2, 8)))
    with pytest.raises(ValueError, match="hutchinson_diag: params leaf 'w' has dtype int32"):
        jp.criteria.hutchinson_diag(lf, qi, jnp.ones((2, 8)), key=jax.random.key(0))


def test_structure_functions_refuse_a_module_as_apply_fn():
    model = jp.models.lenet_300_100(rngs=nnx.Rngs(0), in_features=16)
    x = jnp.ones((2, 16))
    with pytest.raises(ValueError, match=r"got an nnx Module.*structure.module_apply\(model\)"):
        structure.groups(model, x)
    apply_fn, state = structure.module_apply(model)
    assert sum(g.prunable for g in structure.groups(apply_fn, state, x)) == 2


def test_widths_names_leaves_missing_from_small():
    with pytest.raises(ValueError, match=r"only in params \['b'\], only in small \[\]"):
        structure.widths({"a": jnp.ones(2), "b": jnp.ones(2)}, {"a": jnp.ones(1)})


def test_small_input_checks():
    with pytest.raises(ValueError, match="at least 2 units to pair, got shape \\(32, 0\\)"):
        jp.merge.most_correlated_pair(jnp.ones((32, 0)))
    with pytest.raises(ValueError, match="b_out must be an array, got None"):
        jp.merge.noiseout(jnp.ones((4, 3)), jnp.ones((3, 2)), None, 2)
    model = jp.models.MLP((4, 3, 2), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="types must be a tuple of module classes, got 'Linear'"):
        jp.activations.capture_nnx(model, jnp.ones((5, 4)), types="Linear")
    _, caps = jp.activations.capture_nnx(model, jnp.ones((5, 4)), types=nnx.Linear)
    assert sorted(caps) == ["layers/0", "layers/1"]
    with pytest.raises(
        ValueError, match=r"mask must be a scalar or have the leaf's shape \(2, 2\)"
    ):
        jp.packing.pack_leaf(jnp.ones((2, 2)), jnp.ones(3, bool))
    with pytest.raises(ValueError, match="whose init, update, score are not callable"):
        jp.criteria.as_stateful(jp.criteria.StatefulCriterion(None, None, None))


def test_static_arguments_say_they_cannot_be_traced():
    f = lambda q, x: x @ q["w"]  # noqa: E731
    with pytest.raises(ValueError, match="synflow's sparsity must be a concrete number"):
        jax.jit(lambda s: jp.at_init.synflow(f, P, (1, 8), s, iterations=2))(0.5)
    with pytest.raises(ValueError, match="n and m cannot be traced"):
        jax.jit(lambda n: jp.masks.nm(P, n=n, m=4))(2)
    with pytest.raises(ValueError, match=r"for one per leaf.*distributions.explicit"):
        jp.prune(optax.sgd(0.1), sparsity={"w": 0.5, "b": 0.0})


def test_nm_ranks_a_denormal_above_zero():
    w = jnp.array([[1e-40], [0.0]], jnp.float32)
    assert jp.masks.nm({"w": w}, n=1, m=2)["w"][:, 0].tolist() == [True, False]
    # -0.0 still ties +0.0 (by position), and a NaN is the highest.
    z = jnp.array([[0.0], [-0.0], [jnp.nan], [1.0]], jnp.float32)
    assert jp.masks.nm({"w": z}, n=2, m=4)["w"][:, 0].tolist() == [False, False, True, True]
    z = jnp.array([[-0.0], [0.0], [2.0], [1.0]], jnp.float32)
    assert jp.masks.nm({"w": z}, n=2, m=4)["w"][:, 0].tolist() == [False, False, True, True]


def test_polynomial_starts_exactly_at_its_initial_sparsity():
    s = jp.schedules.polynomial(0.1, 0.9, begin_step=0, end_step=100)
    assert float(s(jnp.int32(0))) == float(np.float32(0.1))
    p = {"w": jnp.arange(1.0, 16.0).reshape(3, 5)}
    tx = jp.prune(optax.sgd(0.0), sparsity=s)
    _, st = tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)
    assert int((~jp.get_masks(st)["w"]).sum()) == 2  # round(0.1 * 15), as topk gives


def test_signed_criteria_take_a_complex_leaf():
    p = {"w": jnp.ones((8, 8)), "c": jnp.full((4, 4), 1 + 2j, jnp.complex64)}
    g = {"w": jnp.ones((8, 8)), "c": jnp.full((4, 4), 3 - 1j, jnp.complex64)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tx = jp.prune(optax.sgd(0.1), sparsity=0.5, criterion=jp.criteria.movement())
        tx.update(g, tx.init(p), p)
    # Re(w * g) = Re((1 + 2j)(3 - 1j)) = 5: the first-order loss change of removing w.
    from jaxprune.criteria_taylor import _f32_product

    prod = _f32_product(None, p["c"], g["c"])
    assert prod.dtype == jnp.float32 and float(prod[0, 0]) == 5.0


def test_structured_group_scores_keep_float64_and_warn():
    code = """
import warnings, jax, jax.numpy as jnp, jaxprune as jp
from jaxprune import structure
w1 = jnp.ones((3, 4)) * (1 + jnp.array([4e-12, 3e-12, 2e-12, 1e-12]))
p = {"w1": w1, "b1": jnp.ones(4), "w2": jnp.ones((4, 2))}
f = lambda p, x: jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"]
gs = structure.groups(f, p, jnp.ones((1, 3)), prunable_only=True)
assert structure.group_scores(gs, jp.criteria.magnitude(p))[0].dtype == jnp.float64
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    structure.select(gs, jp.criteria.magnitude(p), 0.25)
assert any("float64 scores are compared as float32" in str(x.message) for x in w)
print("ok")
"""
    import os
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "JAX_ENABLE_X64": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


@pytest.mark.parametrize(
    "make",
    [
        lambda k: jp.prune(optax.sgd(0.1), sparsity=0.5, criterion=jp.criteria.random, key=k),
        lambda k: jp.dynamic.rigl(optax.sgd(0.1), sparsity=0.5, key=k, end_step=10, update_every=2),
        lambda k: jp.dynamic.set(optax.sgd(0.1), sparsity=0.5, key=k, end_step=10, update_every=2),
        lambda k: jp.dynamic.ste(optax.sgd(0.1), sparsity=0.5, key=k, criterion=jp.criteria.random),
    ],
    ids=["prune", "rigl", "set", "ste"],
)
def test_donating_the_state_leaves_the_callers_key_alive(make):
    key = jax.random.key(0)
    tx = make(key)
    p = {"w": jax.random.normal(jax.random.key(1), (8, 8))}

    def step(p, s):
        u, s = tx.update(jax.tree.map(jnp.ones_like, p), s, p)
        return optax.apply_updates(p, u), s

    jax.jit(step, donate_argnums=(0, 1))(jax.tree.map(jnp.copy, p), tx.init(p))
    assert jax.random.normal(key, (2,)).shape == (2,)  # the caller's key is not deleted
    out, _ = jax.jit(step)(p, tx.init(p))  # nor the one a later init stores
    assert out["w"].shape == (8, 8)


def test_an_eager_update_passes_python_flags_as_values():
    p = {"w": jax.random.normal(jax.random.key(0), (8, 8))}
    seen = []

    def crit(params, grads, *, use_grads=False):
        seen.append(use_grads)
        if use_grads:  # a Python branch on the flag: it must not be a tracer
            return jax.tree.map(lambda w, g: jnp.abs(w * g), params, grads)
        return jax.tree.map(jnp.abs, params)

    tx = jp.prune(optax.sgd(0.1), sparsity=0.5, criterion=crit)
    s, g = tx.init(p), jax.tree.map(jnp.ones_like, p)
    jitted = jax.jit(lambda g, s, q: tx.update(g, s, q, use_grads=True))(g, s, p)
    eager = tx.update(g, s, p, use_grads=True)
    assert bool(jnp.all(jitted[0]["w"] == eager[0]["w"]))
    n = len(seen)
    for _ in range(3):
        tx.update(g, s, p, use_grads=True)
    assert len(seen) == n  # compiled once for the value, not traced at every call
    tx.update(g, s, p, use_grads=False)  # another value: its own program
    assert seen[-1] is False


def test_cross_entropy_refuses_labels_that_would_broadcast():
    from jaxprune.attacks import cross_entropy

    logits = jnp.ones((3, 2))
    for labels in (jnp.array([0]), jnp.array(0)):
        with pytest.raises(ValueError, match=r"labels must be integer class indices, shape \(3,\)"):
            cross_entropy(logits, labels)
    assert cross_entropy(logits, jnp.array([0, 1, 0])).shape == (3,)


def test_gate_inputs_named():
    gp = {"fc1/kernel": {"gate_log_alpha": jnp.zeros(3)}}
    with pytest.raises(ValueError, match="key must be a PRNG key, got 0"):
        jp.gates.input_gate_keys(gp, 0)
    vd = jp.gates.VariationalDropout()
    with pytest.raises(ValueError, match="needs a per-unit gate kind, got VariationalDropout"):
        jp.gates.sample_unit_gate(vd, vd.init(jnp.zeros((3, 4))), None, jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="slimming_penalty found no BatchNorm scales"):
        jp.gates.slimming_penalty({"w": jnp.ones((3, 4))})
    with pytest.raises(ValueError, match="key must be a PRNG key, got 0"):
        jp.gates.Gated(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), jp.gates.HardConcrete(), key=0)


def test_distributions_take_one_sparsity():
    with pytest.raises(ValueError, match=r"must be a number in \[0, 1\], got \{'w': 0.5\}"):
        jp.distributions.erk({"w": jnp.ones((4, 4))}, {"w": 0.5})


def test_packing_refuses_score_valued_masks():
    with pytest.raises(ValueError, match=r"mask must be bool \(or 0/1\).*\[0.5\]"):
        jp.packing.support(np.ones(3), np.array([0.5, 1.0, 0.0]))
    assert jp.packing.support(np.zeros(3), np.array([1, 0, 1])).tolist() == [True, False, True]


def test_disk_bytes_of_a_file_is_its_size(tmp_path):
    f = tmp_path / "blob"
    f.write_bytes(b"x" * 123)
    assert jp.checkpoint.disk_bytes(f) == 123


def test_widths_ignores_leaf_order():
    small = {"b": jnp.ones(1), "a": jnp.ones(2)}
    assert structure.widths([jnp.ones(2), jnp.ones(2)], [jnp.ones(2), jnp.ones(1)]) == {
        "1": ((2,), (1,))
    }
    assert structure.widths({"a": jnp.ones(2), "b": jnp.ones(2)}, small) == {"b": ((2,), (1,))}


def test_models_check_their_inputs():
    model = jp.models.LeNet5Caffe(rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"LeNet5Caffe takes \[N, 28, 28, channels\] images"):
        model(jnp.ones((2, 32, 32, 1)))
    with pytest.raises(ValueError, match="cfg has 6 poolings"):
        jp.models.VGGSmall(cfg=(8, "M") * 6, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="cfg must hold positive int widths"):
        jp.models.VGGSmall(cfg=(8, "X"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"features needs at least \(in, out\).*Fix"):
        jp.models.MLP((4,), rngs=nnx.Rngs(0))


def test_pattern_library_refuses_a_huge_enumeration():
    with pytest.raises(ValueError, match="42,504 patterns"):
        jp.masks.pattern_library((5, 5), 6)
    assert jp.masks.pattern_library((5, 5), 4).shape == (2024, 5, 5)


def _three_layer():
    def mlp(p, x):
        h = jax.nn.relu(x @ p["w1"] + p["b1"])
        h = jax.nn.relu(h @ p["w2"] + p["b2"])
        return h @ p["w3"]

    k = jax.random.split(jax.random.key(0), 3)
    p = {
        "w1": jax.random.normal(k[0], (3, 4)),
        "b1": jnp.ones(4),
        "w2": jax.random.normal(k[1], (4, 4)),
        "b2": jnp.ones(4),
        "w3": jax.random.normal(k[2], (4, 2)),
    }
    return mlp, p


def test_group_scores_count_pruned_entries_of_live_channels_as_zero():
    mlp, p = _three_layer()
    groups = structure.groups(mlp, p, jnp.ones((1, 3)), prunable_only=True)
    s = jp.criteria.magnitude(p)
    # Round 1 cut hidden-1 channel 0 and hidden-2 channel 3 (-inf, as jp.drivers marks them):
    # w2's rows (members of group 1) now hold some -inf entries in live channels too.
    s["w1"] = s["w1"].at[:, 0].set(-jnp.inf)
    s["w2"] = s["w2"].at[0, :].set(-jnp.inf).at[:, 3].set(-jnp.inf)
    s["w3"] = s["w3"].at[3, :].set(-jnp.inf)
    g1, g2 = structure.group_scores(groups, s)
    assert float(g1[0]) == -np.inf and bool(jnp.all(jnp.isfinite(g1[1:])))
    assert float(g2[3]) == -np.inf and bool(jnp.all(jnp.isfinite(g2[:3])))
    m = structure.select(groups, s, 0.5)
    assert not bool(m["w1"][:, 0].any()) and not bool(m["w2"][:, 3].any())


def test_iterative_pruning_with_group_selection_is_nested():
    mlp, p = _three_layer()
    groups = structure.groups(mlp, p, jnp.ones((1, 3)), prunable_only=True)
    rounds = jp.drivers.iterative_pruning(
        lambda q, m: jp.apply_masks(q, m), p, rounds=2, rate=0.5, scope=structure.selection(groups)
    )
    kept = [int(r.masks["w1"].any(0).sum()) for r in rounds[1:]]
    assert kept == [2, 1]  # channels of 4: round((1 - 0.5**r) * 4) pruned


def test_group_selection_masks_biases_when_where_takes_them():
    model = jp.models.VGGSmall(cfg=(8, "M"), hidden=16, rngs=nnx.Rngs(0))
    model.eval()
    x = jnp.ones((2, 28, 28, 1))
    apply_fn, state = structure.module_apply(model)
    groups = structure.groups(apply_fn, state, x, prunable_only=True)
    params = nnx.state(model, nnx.Param)
    tx = jp.prune(
        optax.sgd(0.1),
        sparsity=0.5,
        scope=structure.selection(groups),
        where=lambda path, leaf: jnp.issubdtype(leaf.dtype, jnp.floating),
    )
    _, s = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    m = jp.get_masks(s)
    assert int((~m["bns"][0]["scale"]).sum()) == 4 and int((~m["convs"][0]["bias"]).sum()) == 4


_SHARDED = r"""
import json, os
flags = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import jaxprune as jp
from jaxprune import structure

rng = np.random.default_rng(0)
host = {"w1": rng.normal(size=(64, 128)).astype(np.float32),
        "w2": rng.normal(size=(128, 16)).astype(np.float32)}
apply = lambda p, x: jax.nn.relu(x @ p["w1"]) @ p["w2"]
x = np.ones((4, 64), np.float32)
plain = {k: jnp.asarray(v) for k, v in host.items()}
gs = structure.groups(apply, plain, jnp.asarray(x), prunable_only=True)
want = structure.select(gs, jp.criteria.magnitude(plain), 0.5)
out = {}
for kind in ("explicit", "auto"):
    mesh = (jax.make_mesh((8,), ("model",), axis_types=(AxisType.Explicit,)) if kind == "explicit"
            else Mesh(np.array(jax.devices()), ("model",)))
    spec = NamedSharding(mesh, P(None, "model"))
    params = {k: jax.device_put(v, spec) for k, v in host.items()}
    got = structure.select(gs, jp.criteria.magnitude(params), 0.5)
    out[kind + "_equal"] = all(bool(jnp.all(got[k] == want[k])) for k in want)
    out[kind + "_placed"] = got["w1"].sharding.is_equivalent_to(params["w1"].sharding, 2)
    tx = jp.prune(optax.sgd(0.1), sparsity=0.5, scope=structure.selection(gs))
    with jax.sharding.set_mesh(mesh):
        _, s = jax.jit(tx.update)(params, tx.init(params), params)
    out[kind + "_prune_equal"] = bool(jnp.all(jp.get_masks(s)["w1"] == want["w1"]))
small = structure.shrink(apply, params, want, x)
out["shrunk_spec"] = list(small["w1"].sharding.spec)
# 60 kept channels do not split over 8 devices: replicated on the mesh instead.
keep = jnp.arange(128) < 60
odd = {"w1": jnp.broadcast_to(keep, (64, 128)), "w2": jnp.broadcast_to(keep[:, None], (128, 16))}
small = structure.shrink(apply, params, odd, x)
out["odd"] = [small["w1"].shape[1], list(small["w1"].sharding.spec), len(small["w1"].devices())]
print(json.dumps(out))
"""


def test_group_selection_and_shrink_keep_the_params_mesh():
    import json
    import os
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-c", _SHARDED],
        capture_output=True,
        text=True,
        timeout=600,
        env=os.environ,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    for kind in ("explicit", "auto"):
        assert out[kind + "_equal"] and out[kind + "_placed"] and out[kind + "_prune_equal"], out
    assert out["shrunk_spec"] == [None, "model"]
    assert out["odd"] == [60, [], 8], out


def test_gate_penalty_checks_gate_shapes_against_params():
    hc = jp.gates.HardConcrete()
    params = {"l1": {"kernel": jnp.ones((8, 6))}}
    gp = jp.gates.init_gates(hc, params)
    bad = {"l1/kernel": {k: v[:3] for k, v in gp["l1/kernel"].items()}}
    with pytest.raises(
        ValueError, match=r"gate_params\['l1/kernel'\] is \{'gate_log_alpha': \(3,\)\}"
    ):
        jp.gates.penalty(hc, bad, params)
