"""Criteria found wrong or crashing by a user-side QA pass, each pinned by a test."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.core import FrozenDict

import jaxprune as jp
from jaxprune.models import MLP


def test_taylor_includes_the_bias_term_of_the_feature_map_criterion():
    # Molchanov 2017 scores |sum_n dC/dz_nj * z_nj| with z = x @ W + b: the bias adds
    # b_j * dC/db_j, which the kernel alone leaves out (and re-ranked the units).
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    p = {"d": {"kernel": jax.random.normal(k1, (5, 4)), "bias": jax.random.normal(k2, (4,))}}
    x, t = jax.random.normal(k3, (16, 5)), jax.random.normal(k4, (16, 4))
    z = x @ p["d"]["kernel"] + p["d"]["bias"]
    dz = jax.grad(lambda z: jnp.sum(jax.nn.relu(z) - t) ** 2)(z)
    g = jax.grad(lambda p: jnp.sum(jax.nn.relu(x @ p["d"]["kernel"] + p["d"]["bias"]) - t) ** 2)(p)
    direct = jnp.abs(jnp.sum(dz * z, axis=0))
    direct = direct / jnp.linalg.norm(direct)
    s = jp.criteria.taylor(p, g)["d"]["kernel"]
    np.testing.assert_allclose(np.asarray(s[0]), np.asarray(direct), rtol=1e-4)
    # taylor_ema's unit group sums the bias too: (sum_i W_ij g_ij + b_j g_bj)**2.
    c = jp.criteria.taylor_ema(0.0)
    e = c.score(c.update(c.init(p), p, g), p)["d"]["kernel"][0]
    unit = jnp.sum(p["d"]["kernel"] * g["d"]["kernel"], 0) + p["d"]["bias"] * g["d"]["bias"]
    np.testing.assert_allclose(np.asarray(e), np.asarray(unit**2), rtol=1e-4)


def test_float16_products_are_formed_in_float32():
    # Cast first: a float16 product of 1e-4-sized values underflowed to 0 (ties, wrong order).
    w = {"w": jnp.array([[1e-4, 2e-4, 4e-4, 8e-4]], jnp.float16)}
    g = {"w": jnp.array([[1e-4, 1e-4, 1e-4, 1e-4]], jnp.float16)}
    exact = np.asarray(w["w"], np.float32) * np.asarray(g["w"], np.float32)
    c = jp.criteria.ema_saliency(0.0)
    np.testing.assert_allclose(c.score(c.update(c.init(w), w, g), w)["w"], exact, rtol=1e-6)
    c = jp.criteria.movement()
    np.testing.assert_allclose(c.score(c.update(c.init(w), w, g), w)["w"], -exact, rtol=1e-6)
    c = jp.criteria.taylor_ema(0.0, group="entry")
    np.testing.assert_allclose(c.score(c.update(c.init(w), w, g), w)["w"], exact**2, rtol=1e-5)
    c = jp.criteria.obd_fisher(0.0)
    h = np.asarray(g["w"], np.float32) ** 2
    want = 0.5 * h * np.asarray(w["w"], np.float32) ** 2
    np.testing.assert_allclose(c.score(c.update(c.init(w), w, g), w)["w"], want, rtol=1e-5)


def test_criteria_take_nnx_state_params_with_pure_grads():
    # nnx.state(model) is Variable-wrapped; jax.grad over a pure state and
    # input_norms return pure trees. Every two-tree criterion crashed on the mix.
    model = MLP((4, 3, 2), rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(state)
    grads = jax.tree.map(jnp.ones_like, pure)
    want = jax.tree.map(lambda w: np.abs(np.asarray(w)), pure)
    got = nnx.to_pure_dict(nnx.State(jp.criteria.saliency(state, grads)))
    jax.tree.map(np.testing.assert_allclose, got, want)
    _, caps = jp.activations.capture_nnx(model, jnp.ones((2, 4)))
    jp.criteria.wanda(state, jp.activations.input_norms(state, caps))
    jp.criteria.taylor(state, grads)
    for c in (jp.criteria.ema_saliency(), jp.criteria.movement(), jp.criteria.taylor_ema()):
        c.score(c.update(c.init(state), state, grads), state)


def test_two_tree_criteria_refuse_grads_of_other_shapes():
    p = {"w": jnp.ones((2, 3))}
    for fn in (jp.criteria.saliency, jp.criteria.taylor):
        with pytest.raises(ValueError, match=r"grads must have the leaves.*w: \(4, 2, 3\) vs"):
            fn(p, {"w": jnp.ones((4, 2, 3))})  # unreduced per-example grads broadcast before
    c = jp.criteria.movement()
    with pytest.raises(ValueError, match="grads must have the leaves"):
        c.update(c.init(p), p, {"w": jnp.ones((3,))})


def test_taylor_checks_unit_axis():
    p, g = {"k": jnp.ones((2, 3))}, {"k": jnp.ones((2, 3))}
    with pytest.raises(ValueError, match=r"unit_axis=5 is out of range for 'k' of shape \(2, 3\)"):
        jp.criteria.taylor(p, g, unit_axis=5)  # was wrapped modulo ndim
    with pytest.raises(ValueError, match="unit_axis must be an int"):
        jp.criteria.taylor(p, g, unit_axis="out")
    with pytest.raises(ValueError, match="unit_axis must be an int"):
        jp.criteria.taylor_ema(unit_axis=1.5)


def test_prune_grads_keyword_in_another_container():
    # check_same_leaves lets containers differ; the criteria then crashed on the mix.
    params = {"w": jax.random.normal(jax.random.key(0), (4, 4))}
    g = FrozenDict({"w": jnp.broadcast_to(jnp.arange(1.0, 5.0), (4, 4))})
    for crit in (jp.criteria.saliency, jp.criteria.taylor, jp.criteria.ema_saliency()):
        tx = jp.prune(optax.sgd(0.1), sparsity=0.5, criterion=crit)
        _, state = jax.jit(tx.update)(
            jax.tree.map(jnp.zeros_like, params), tx.init(params), params, grads=g
        )
        assert float(jp.sparsity(jp.get_masks(state))) == 0.5


def test_a_criterion_with_its_key_bound_keeps_it():
    params = {"w": jnp.ones((4, 8))}
    k = jax.random.key(7)
    crit = functools.partial(jp.criteria.random, key=k)
    want = jp.masks.topk(crit(params), 0.5)
    for key in (None, jax.random.key(1)):  # refused before; then the bound key was replaced
        tx = jp.prune(optax.sgd(0.1), sparsity=0.5, criterion=crit, key=key)
        _, state = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
        np.testing.assert_array_equal(jp.get_masks(state)["w"], want["w"])
    # A key parameter defaulting to None still gets jp.prune's key.
    seen = []

    def crit_opt(params, *, key=None):
        seen.append(key is not None)
        return jp.criteria.magnitude(params)

    tx = jp.prune(optax.sgd(0.1), sparsity=0.5, criterion=crit_opt, key=jax.random.key(0))
    tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    assert seen and all(seen)


def test_second_order_estimates_keep_one_running_sum():
    # Scratch memory was one params-sized array per probe / chunk.
    p = {"w": jnp.ones((256, 256))}
    loss = lambda p, x: jnp.mean((x @ p["w"]) ** 2)  # noqa: E731
    x = jnp.ones((64, 256))

    def temp(fn):
        return jax.jit(fn).lower(p).compile().memory_analysis().temp_size_in_bytes

    h4 = temp(
        lambda p: jp.criteria.hutchinson_diag(loss, p, x, key=jax.random.key(0), num_samples=4)
    )
    h64 = temp(
        lambda p: jp.criteria.hutchinson_diag(loss, p, x, key=jax.random.key(0), num_samples=64)
    )
    assert h64 < 1.5 * h4, (h4, h64)
    f4 = temp(lambda p: jp.criteria.fisher_diag(loss, p, x[:16], chunk_size=4))
    f64 = temp(lambda p: jp.criteria.fisher_diag(loss, p, x, chunk_size=4))
    assert f64 < 1.5 * f4, (f4, f64)
    # Still the right numbers: exact on a diagonal quadratic; fisher against a loop.
    q = lambda p: 1.5 * p["w"][0] ** 2 + p["w"][1] ** 2  # noqa: E731
    h = jp.criteria.hutchinson_diag(
        q, {"w": jnp.ones(2)}, key=jax.random.key(0), num_samples=np.int64(3)
    )
    assert h["w"].tolist() == [3.0, 2.0]
    lin = lambda p, x: jnp.mean(p["w"] * x)  # noqa: E731
    assert jp.criteria.fisher_diag(lin, {"w": jnp.ones(())}, [1.0, 3.0], chunk_size=1)["w"] == 5.0


def test_key_none_is_named():
    with pytest.raises(ValueError, match="key must be a PRNG key, got None"):
        jp.criteria.random({"w": jnp.ones(2)}, key=None)
    with pytest.raises(ValueError, match="key must be a PRNG key, got None"):
        jp.criteria.hutchinson_diag(lambda p: jnp.sum(p["w"]), {"w": jnp.ones(2)}, key=None)


def test_capture_linen_records_a_keyword_input():
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.relu(nn.Dense(4, name="fc1")(x))
            return nn.Dense(2, name="fc2")(inputs=h)  # was skipped without a word

    net = Net()
    v = net.init(jax.random.key(0), jnp.ones((1, 3)))
    x = jax.random.normal(jax.random.key(1), (5, 3))
    _, caps = jp.activations.capture_linen(net, v, x)
    assert sorted(caps) == ["fc1", "fc2"]
    h = jax.nn.relu(x @ v["params"]["fc1"]["kernel"] + v["params"]["fc1"]["bias"])
    np.testing.assert_allclose(caps["fc2"].inputs, h, rtol=1e-6)


def test_unit_scores_refuses_keys_that_own_no_kernel_and_wrong_lengths():
    import flax.linen as nn

    m = nn.Sequential([nn.Dense(3), nn.relu, nn.Dense(2)])
    v = m.init(jax.random.key(0), jnp.ones((1, 4)))
    _, caps = jp.activations.capture_linen(m, v, jnp.ones((5, 4)))
    per_unit = jp.activations.mean_abs(caps)
    s = jp.activations.unit_scores(v["params"], per_unit)
    assert np.isfinite(np.asarray(s["layers_0"]["kernel"])).all()
    # The full variables: every kernel got +inf, and topk pruned in flatten order.
    with pytest.raises(ValueError, match=r"own no kernel of params.*variables\[\"params\"\]"):
        jp.activations.unit_scores(v, per_unit)
    with pytest.raises(ValueError, match=r"per_unit\['layers_0'\] has shape \(2,\).*3 units"):
        jp.activations.unit_scores(v["params"], {"layers_0": jnp.ones(2)})
    with pytest.raises(ValueError, match="captures must be a dict"):
        jp.activations.mean_abs([caps])


def test_noiseout_never_pairs_constant_units_float32_cannot_represent():
    rng = np.random.default_rng(0)
    a = rng.normal(size=64).astype(np.float32)
    h = np.stack([a, a + 1e-2 * rng.normal(size=64), np.full(64, 0.1), np.full(64, 0.3)], 1)
    i, j = jp.merge.most_correlated_pair(jnp.asarray(h, jnp.float32))
    assert (int(i), int(j)) == (0, 1)  # was (2, 3): rounding errors looked correlated
    with pytest.raises(ValueError, match=r"alive must have one entry per unit, shape \(4,\)"):
        jp.merge.most_correlated_pair(h, jnp.ones(3, bool))


def test_prune_takes_bool_leaves_and_refuses_uncalled_factories_and_foreign_states():
    params = {"w": jnp.ones((4, 4)), "flag": jnp.array(True)}
    tx = jp.prune(optax.sgd(0.1), sparsity=0.5)
    upd = {"w": jnp.ones((4, 4)), "flag": jnp.array(False)}
    out, _ = jax.jit(tx.update)(upd, tx.init(params), params)  # was: neg of a bool
    assert float(jp.sparsity(jax.tree.map(lambda p, u: p + u, params["w"], out["w"]))) == 0.5
    for factory in (jp.criteria.movement, jp.criteria.ema_saliency, jp.criteria.taylor_ema):
        with pytest.raises(ValueError, match=rf"criterion={factory.__name__} is a factory.*call"):
            jp.prune(optax.sgd(0.1), sparsity=0.5, criterion=factory)
    with pytest.warns(UserWarning, match=r"`where` selects none of the params' leaves"):
        jp.prune(optax.sgd(0.1), sparsity=0.5, where=lambda p, x: p[-1] == "kernal").init(params)
    other = {"v": jnp.ones((4, 4))}
    with pytest.raises(ValueError, match=r"opt_state's masks were built for other params.*'v'"):
        tx.update({"w": jnp.ones((4, 4)), "flag": jnp.array(True)}, tx.init(other), params)


def test_attack_labels_and_sparsegpt_failures_are_named():
    from jaxprune import adversarial, llm

    logits = jnp.zeros((4, 3))
    with pytest.raises(ValueError, match="labels must be integer class indices.*argmax"):
        adversarial.cross_entropy(logits, jax.nn.one_hot(jnp.arange(4) % 3, 3))

    def apply_fn(p, x, key):
        return x @ p["w"], []

    p = {"w": jnp.ones((2, 3))}
    x = np.full((4, 2), 0.5, np.float32)
    kw = dict(eps=0.1, step_size=0.05, steps=2, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"labels in \[0, 7\], outside \[0, 3\)"):
        adversarial.robustness(apply_fn, p, x, np.array([0, 1, 2, 7]), **kw)  # was a NaN loss
    out = adversarial.robustness(apply_fn, p, x, np.array([0, 1, 2, 0]), **kw)
    assert 0.0 <= out["adv_acc"] <= out["clean_acc"] <= 1.0
    h = -jnp.eye(4)  # indefinite: the Cholesky factor is NaN
    with pytest.raises(ValueError, match="sparsegpt made the kernel non-finite"):
        llm.sparsegpt(jnp.ones((4, 2)), h, sparsity=0.5)


def test_gate_predicate_reads_the_parameter_name_only_and_gates_need_kernels():
    from jaxprune import gates

    # Llama's gate_proj: its weights are not gate parameters (multi_transform gave
    # them the gate optimizer, and frozen weights moved).
    assert not gates.is_gate(("mlp", "gate_proj", "kernel"))
    assert gates.is_gate(("layers", 0, "gate_log_alpha"))
    assert gates.is_gate(("gates", "fc/kernel", "gate_a", "value"))
    tree = {"mlp": {"gate_proj": {"kernel": jnp.ones((2, 2))}}, "g": {"gate_scale": jnp.ones(2)}}
    tx = gates.multi_transform(optax.set_to_zero(), optax.sgd(1.0))
    u, _ = tx.update(tree, tx.init(tree), tree)
    assert float(jnp.abs(u["mlp"]["gate_proj"]["kernel"]).sum()) == 0.0
    assert u["g"]["gate_scale"].tolist() == [-1.0, -1.0]
    params = {"fc": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}}
    with pytest.raises(ValueError, match=r"selected 'fc/bias' of shape \(2,\).*twice"):
        gates.init_gates(gates.HardConcrete(), params, where=lambda p, x: True)
    model = MLP((4, 3, 2), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="key must be a PRNG key, got 0"):
        gates.attach(model, gates.HardConcrete(), key=0)


def test_pgd_needs_per_example_losses_and_wanda_prune_nonnegative_norms():
    from jaxprune import adversarial, llm

    x = jnp.full((3, 2), 0.5)
    with pytest.raises(ValueError, match=r"per-example losses, shape \(3,\).*got shape \(\)"):
        adversarial.pgd(lambda z: jnp.sum(z), x, eps=0.1, step_size=0.05, steps=2)
    with pytest.raises(ValueError, match="input_norms must be finite L2 norms"):
        llm.wanda_prune(jnp.ones((4, 2)), jnp.array([1.0, -1.0, 1.0, 1.0]))


def test_apply_gates_names_gate_params_of_another_kind_or_shape():
    from jaxprune import gates

    params = {"fc": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}}
    hc = gates.init_gates(gates.HardConcrete(), params)
    with pytest.raises(ValueError, match=r"gate_params\['fc/kernel'\] is .*gate_log_alpha.*BetaB"):
        gates.apply_gates(gates.BetaBernoulli(), params, hc)  # was KeyError: 'gate_a'
    wrong = {"fc/kernel": {"gate_log_alpha": jnp.zeros(5)}}
    with pytest.raises(ValueError, match=r"is \{'gate_log_alpha': \(5,\)\}.*\(3, 2\)"):
        gates.apply_gates(gates.HardConcrete(), params, wrong)


def test_hard_masks_warn_when_a_layer_empties():
    from jaxprune import gates

    model = MLP((4, 3, 2), rngs=nnx.Rngs(0))
    gates.attach(model, gates.HardConcrete(), key=jax.random.key(0), skip=())
    layer = gates.gated_layers(model)[0][1]
    layer.gate_log_alpha.set_value(jnp.full((3,), -20.0))  # every unit of layers/0 off
    with pytest.warns(UserWarning, match=r"hard_masks pruned every unit of \['layers/0/kernel'\]"):
        masks = gates.hard_masks(model)
    assert not bool(jnp.any(masks["layers"][0]["kernel"]))
