"""Learned gates: formulas, KL terms vs quadrature, determinism, jit, masks, attach, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import jaxprune as jp
from jaxprune import gates
from jaxprune.models import lenet_300_100
from tests._invariants import check_transform


def _mlp_params(key):
    k1, k2 = jax.random.split(key)
    return {
        "hidden": {"kernel": jax.random.normal(k1, (6, 5)), "bias": jnp.linspace(-1, 1, 5)},
        "out": {"kernel": jax.random.normal(k2, (5, 3)), "bias": jnp.zeros(3)},
    }


def _mlp(params, x):
    h = jax.nn.relu(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
    return h @ params["out"]["kernel"] + params["out"]["bias"]


def _hidden_only(path, leaf):
    return path == ("hidden", "kernel")


def _trapezoid(y, x):
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2)


# --- formulas vs hand-computed values -------------------------------------------------


def test_hard_concrete_formulas(key):
    g = gates.HardConcrete()
    la = jnp.array([-10.0, 0.0, 1.0, 10.0])
    gp = {"gate_log_alpha": la}
    expected_test = [max(0.0, min(1.0, 1.2 / (1 + math.exp(-v)) - 0.1)) for v in la.tolist()]
    np.testing.assert_allclose(g.unit_gate(gp, None), expected_test, atol=1e-6)
    # Expected L0: sum_j sigmoid(log_alpha_j - beta * log(-gamma / zeta)).
    shift = (2 / 3) * math.log(0.1 / 1.1)
    expected_l0 = sum(1 / (1 + math.exp(-(v - shift))) for v in la.tolist())
    np.testing.assert_allclose(g.penalty([gp]), expected_l0, rtol=1e-6)
    # The sample from the same uniforms, written out by hand.
    u = np.asarray(jax.random.uniform(key, la.shape, jnp.float32, 1e-6, 1 - 1e-6), np.float64)
    s = 1 / (1 + np.exp(-(np.log(u) - np.log(1 - u) + np.asarray(la)) / (2 / 3)))
    np.testing.assert_allclose(g.unit_gate(gp, key), np.clip(s * 1.2 - 0.1, 0, 1), atol=1e-5)


def test_hard_concrete_penalty_is_probability_of_nonzero_gate(key):
    g = gates.HardConcrete()
    gp = {"gate_log_alpha": jnp.full((20000,), 0.5)}
    z = g.unit_gate(gp, key)
    np.testing.assert_allclose(jnp.mean(z > 0), g.penalty([gp]) / 20000, atol=0.015)


def test_beta_bernoulli_kl_and_mean_match_quadrature():
    x = np.linspace(0, 1, 400_001)[1:-1]
    for a, b, alpha in [(2.0, 3.0, 0.5), (1.5, 1.0, 1.0), (3.0, 2.0, 2.0), (0.7, 1.3, 0.3)]:
        logq = np.log(a * b) + (a - 1) * np.log(x) + (b - 1) * np.log1p(-(x**a))
        logp = np.log(alpha) + (alpha - 1) * np.log(x)
        q = np.exp(logq)
        kl = _trapezoid(q * (logq - logp), x)
        mean = _trapezoid(q * x, x)
        np.testing.assert_allclose(gates.beta_bernoulli_kl(a, b, alpha), kl, atol=2e-3)
        np.testing.assert_allclose(gates.expected_keep_probability(a, b), mean, atol=1e-4)


def test_beta_bernoulli_samples_and_test_gate(key):
    g = gates.BetaBernoulli(temperature=0.01)
    gp = {"gate_a": jnp.full((40000,), 1.0), "gate_b": jnp.full((40000,), 0.5)}
    a, b = g.ab(gp)
    z = g.unit_gate(gp, key)
    assert float(jnp.min(z)) >= 0 and float(jnp.max(z)) <= 1
    # Near-binary samples at low temperature whose mean is E[pi].
    assert float(jnp.mean((z > 0.05) & (z < 0.95))) < 0.1
    np.testing.assert_allclose(jnp.mean(z), gates.expected_keep_probability(a[0], b[0]), atol=0.02)
    # The test gate is E[pi], zeroed below the threshold.
    small = {"gate_a": jnp.array([-12.0, 3.0]), "gate_b": jnp.array([0.5, 0.5])}
    t = g.unit_gate(small, None)
    assert float(t[0]) == 0.0 and 0 < float(t[1]) < 1
    assert g.keep(small).tolist() == [False, True]


def test_sparse_vd_kl_matches_quadrature():
    # -KL = 0.5 log alpha - E log|eps| - k1 with eps ~ N(1, alpha) (the constant makes
    # -KL -> 0 as alpha -> inf); Molchanov's fit is within ~0.01 of it.
    x = np.linspace(-12, 12, 1_000_001)
    pdf = np.exp(-x * x / 2) / np.sqrt(2 * np.pi)
    for la in [-4.0, -2.0, 0.0, 2.0, 4.0]:
        elog = _trapezoid(np.log(np.abs(1 + np.exp(0.5 * la) * x) + 1e-300) * pdf, x)
        exact = 0.5 * la - elog - 0.63576
        np.testing.assert_allclose(gates.sparse_vd_neg_kl(la), exact, atol=0.012)


def test_variational_dropout_log_alpha_keep_and_penalty():
    g = gates.VariationalDropout()
    w = jnp.array([[1.0, 0.1], [2.0, 1e-3]])
    gp = {"gate_log_sigma2": jnp.log(jnp.array([[0.01, 0.1], [40.0, 1.0]]))}
    la = np.log([[0.01, 10.0], [10.0, 1e6]])
    np.testing.assert_allclose(g.log_alpha(gp, w), np.clip(la, -8, 8), atol=1e-4)
    assert g.keep(gp, w).tolist() == [[True, True], [True, False]]
    np.testing.assert_allclose(
        g.penalty([gp], [w]), -jnp.sum(gates.sparse_vd_neg_kl(g.log_alpha(gp, w))), rtol=1e-6
    )


def test_scalar_gate_and_slimming_hand_computed():
    g = gates.ScalarGate(target=0.2, weight=0.5, threshold=0.05)
    gps = [{"gate_scale": jnp.array([1.0, -0.5])}, {"gate_scale": jnp.array([0.0, 0.01])}]
    mean_abs = (1.0 + 0.5 + 0.0 + 0.01) / 4
    np.testing.assert_allclose(g.penalty(gps), 0.5 * (mean_abs - 0.2) ** 2, rtol=1e-6)
    assert g.keep(gps[1]).tolist() == [False, False]
    params = {
        "bn1": {"scale": jnp.array([0.5, -3.0, 0.1]), "bias": jnp.ones(3)},
        "bn2": {"scale": jnp.array([2.0, 0.2]), "bias": jnp.ones(2)},
        "conv": {"kernel": jnp.ones((3, 3, 1, 3))},
    }
    np.testing.assert_allclose(gates.slimming_penalty(params), 5.8, rtol=1e-6)
    m = gates.slimming_masks(params, 0.4)  # round(0.4 * 5) = 2 channels, globally
    assert m["bn1"]["scale"].tolist() == [True, True, False]
    assert m["bn2"]["scale"].tolist() == [True, False]
    assert m["bn2"]["bias"].tolist() == [True, False]
    assert m["conv"]["kernel"].shape == ()
    # The test-time gate is 0 exactly where keep is False (training sees g).
    gp = {"gate_scale": jnp.array([0.01, -0.04, 0.3])}
    assert g.unit_gate(gp, None).tolist() == [0.0, 0.0, pytest.approx(0.3)]
    assert g.unit_gate(gp, jax.random.key(0)).tolist() == pytest.approx([0.01, -0.04, 0.3])
    assert g.keep(gp).tolist() == [False, False, True]
    folded = gates.apply_gates(g, {"k": jnp.ones((2, 3))}, {"k": gp})["k"]
    assert folded[:, :2].tolist() == [[0.0, 0.0], [0.0, 0.0]]


def test_slimming_masks_cap_and_warning_for_an_emptied_layer():
    params = {
        "bn1": {"scale": jnp.array([0.01, 0.02, 0.03, 0.04]), "bias": jnp.ones(4)},
        "bn2": {"scale": jnp.array([1.0, 2.0, 3.0, 4.0]), "bias": jnp.ones(4)},
    }
    with pytest.warns(UserWarning, match=r"pruned every unit of \[.bn1/scale.\].*max_sparsity"):
        m = gates.slimming_masks(params, 0.5)
    assert not any(m["bn1"]["scale"].tolist())
    m = gates.slimming_masks(params, 0.5, max_sparsity=0.75)  # bn1 keeps 1, bn2 loses 1
    assert m["bn1"]["scale"].tolist() == [False, False, False, True]
    assert m["bn2"]["scale"].tolist() == [False, True, True, True]
    with pytest.raises(ValueError, match="max_sparsity must be a Python number in"):
        gates.slimming_masks(params, 0.5, max_sparsity=2.0)


# --- determinism, jit, functional form -------------------------------------------------


@pytest.mark.parametrize(
    "gate",
    [gates.HardConcrete(), gates.BetaBernoulli(), gates.VariationalDropout(), gates.ScalarGate()],
    ids=lambda g: type(g).__name__,
)
def test_apply_gates_deterministic_given_key_and_jittable(gate, key):
    params = _mlp_params(key)
    gp = gates.init_gates(gate, params, where=_hidden_only)
    if isinstance(gate, gates.VariationalDropout):
        gp = jax.tree.map(lambda v: v + 9.0, gp)  # visible noise
    k1, k2 = jax.random.key(1), jax.random.key(2)
    a = gates.apply_gates(gate, params, gp, key=k1)
    b = jax.jit(lambda p, g, k: gates.apply_gates(gate, p, g, key=k))(params, gp, k1)
    chex_equal = jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, atol=1e-6), a, b)
    del chex_equal
    c = gates.apply_gates(gate, params, gp, key=k2)
    noisy = not isinstance(gate, gates.ScalarGate)
    differs = not np.allclose(a["hidden"]["kernel"], c["hidden"]["kernel"])
    assert differs == noisy
    np.testing.assert_allclose(a["out"]["kernel"], params["out"]["kernel"])  # ungated leaf
    pen = jax.jit(lambda g, p: gates.penalty(gate, g, p))(gp, params)
    np.testing.assert_allclose(pen, gates.penalty(gate, gp, params), rtol=1e-5)


def test_per_unit_gate_equals_scaling_the_layer_output_linen(key):
    model = nn.Dense(4)
    x = jax.random.normal(key, (3, 5))
    params = model.init(key, x)["params"]
    params = {**params, "bias": jnp.arange(4.0)}
    gate = gates.BetaBernoulli()
    gp = gates.init_gates(gate, params)
    k = jax.random.key(7)
    gated = gates.apply_gates(gate, params, gp, key=k)
    z = gate.unit_gate(gp["kernel"], gates.gate_keys(gp, k)["kernel"])
    np.testing.assert_allclose(
        model.apply({"params": gated}, x),
        model.apply({"params": params}, x) * z,
        rtol=1e-5,
        atol=1e-6,
    )
    # Intercepting the layer's output instead of gating its params gives the same.
    np.testing.assert_allclose(
        gates.linen_apply(gate, model, {"params": params}, gp, x, key=k),
        model.apply({"params": gated}, x),
        rtol=1e-5,
        atol=1e-6,
    )
    with pytest.raises(ValueError, match="linen_apply gates layer outputs"):
        gates.linen_apply(gates.VariationalDropout(), model, {"params": params}, {}, x)


def test_hard_masks_reproduce_test_mode_outputs_functional(key):
    gate = gates.HardConcrete()
    params = _mlp_params(key)
    gp = gates.init_gates(gate, params, where=_hidden_only)
    gp["hidden/kernel"]["gate_log_alpha"] = jnp.array([-8.0, 3.0, -6.0, 0.5, 2.0])
    folded = gates.apply_gates(gate, params, gp)
    masks = gates.to_masks(gate, gp, params)
    jax.tree.map(
        lambda p, m: (
            None if jnp.ndim(m) == 0 else np.testing.assert_equal(jnp.shape(p), jnp.shape(m))
        ),
        params,
        masks,
    )
    assert masks["hidden"]["bias"].tolist() == [False, True, False, True, True]
    x = jax.random.normal(jax.random.key(3), (4, 6))
    np.testing.assert_array_equal(_mlp(jp.apply_masks(folded, masks), x), _mlp(folded, x))
    # A global sparsity instead of the gates' own rule: exact count of units.
    m2 = gates.to_masks(gate, gp, params, sparsity=0.6)
    assert int(jnp.sum(m2["hidden"]["bias"])) == 2


def test_trained_gate_masks_shrink_with_unchanged_test_outputs(key):
    from jaxprune.structure import shrink

    gate = gates.BetaBernoulli()
    params = _mlp_params(key)
    gp = gates.init_gates(gate, params, where=_hidden_only)
    x = jax.random.normal(jax.random.key(3), (64, 6))
    y = (x[:, 0] > 0).astype(jnp.int32) + (x[:, 1] > 0)
    tree = {"params": params, "gates": gp}
    tx = gates.multi_transform(optax.adam(1e-2), optax.adam(0.3))
    state = tx.init(tree)

    @jax.jit
    def step(tree, state, k):
        def loss(t):
            logits = _mlp(gates.apply_gates(gate, t["params"], t["gates"], key=k), x)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return ce + 0.02 * gates.penalty(gate, t["gates"])

        g = jax.grad(loss)(tree)
        u, state = tx.update(g, state, tree)
        return optax.apply_updates(tree, u), state

    for i in range(60):
        tree, state = step(tree, state, jax.random.fold_in(key, i))
    keep = gates.unit_masks(gate, tree["gates"])["hidden/kernel"]
    assert 0 < int(keep.sum()) < 5, "the KL should prune some but not all hidden units"
    folded = gates.apply_gates(gate, tree["params"], tree["gates"])
    masks = gates.to_masks(gate, tree["gates"], tree["params"])
    small = shrink(_mlp, folded, masks, x)
    assert small["hidden"]["kernel"].shape == (6, int(keep.sum()))
    np.testing.assert_allclose(_mlp(small, x), _mlp(folded, x), rtol=1e-5, atol=1e-5)


# --- nnx attachment ---------------------------------------------------------------------


class TinyCNN(nnx.Module):
    """conv-relu-conv-relu-pool-dense: the LeNet-5 pattern at test size."""

    def __init__(self, rngs):
        self.conv1 = nnx.Conv(1, 6, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(6, 8, (3, 3), rngs=rngs)
        self.fc1 = nnx.Linear(8, 12, rngs=rngs)
        self.fc2 = nnx.Linear(12, 3, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.conv2(jax.nn.relu(self.conv1(x))))
        return self.fc2(jax.nn.relu(self.fc1(jnp.mean(x, axis=(1, 2)))))


def test_attach_nnx_eval_detach_and_masks(key):
    model = TinyCNN(nnx.Rngs(0))
    x = jax.random.uniform(key, (2, 6, 6, 1))
    ref = model(x)
    gates.attach(model, gates.BetaBernoulli(), key=jax.random.key(1), skip=("fc2",))
    assert [p for p, _ in gates.gated_layers(model)] == [("conv1",), ("conv2",), ("fc1",)]
    # Samples are a pure function of the reseed key.
    gates.reseed(model, jax.random.key(5))
    a = model(x)
    gates.reseed(model, jax.random.key(5))
    np.testing.assert_array_equal(a, model(x))
    gates.reseed(model, jax.random.key(6))
    assert not np.allclose(a, model(x))
    # Kill some units; eval mode == detached model == hard-masked detached params.
    conv2 = model.conv2
    conv2.gate_a.set_value(conv2.gate_a.get_value().at[:3].set(-12.0))
    model.eval()
    out = model(x)
    assert not np.allclose(out, ref)
    plain = gates.detach(model)
    np.testing.assert_allclose(plain(x), out, rtol=1e-5, atol=1e-5)
    masks = gates.hard_masks(model)
    assert int(jnp.sum(masks["conv2"]["bias"])) == 5
    graphdef, params = nnx.split(plain, nnx.Param)
    masked = nnx.merge(graphdef, jp.apply_masks(params, masks))
    gap = float(jnp.max(jnp.abs(masked(x) - out)))
    assert gap < 1e-5, gap
    assert len(gates.with_features(model, x)[1]) == 3
    # The structured shrink removes the dead channels; test-mode outputs unchanged.
    from jaxprune.structure import shrink_module

    small = shrink_module(plain, masks, x)
    assert small.conv2.kernel.shape[-1] == 5 and small.fc1.kernel.shape[0] == 5
    np.testing.assert_allclose(small(x), out, rtol=1e-5, atol=1e-5)


def test_nnx_variational_dropout_and_jit(key):
    model = lenet_300_100(rngs=nnx.Rngs(0))
    gates.attach(model, gates.VariationalDropout(init_log_sigma2=-2.0), key=key, skip=("layers/2",))
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, x, k):
        m = nnx.merge(graphdef, state, copy=True)
        gates.reseed(m, k)
        return m(x), gates.model_penalty(m)

    x = jnp.ones((2, 784))
    (a, pen), (b, _) = forward(state, x, jax.random.key(1)), forward(state, x, jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, forward(state, x, jax.random.key(2))[0])
    assert float(pen) > 0
    # Eager eval mode masks a copy of the kernel, never the layer's own weights.
    w0 = model.layers[0].module.kernel.get_value()
    model.eval()
    np.testing.assert_array_equal(model(x), model(x))
    np.testing.assert_array_equal(model.layers[0].module.kernel.get_value(), w0)


def test_gate_params_train_with_frozen_weights_pruning_from_scratch(key):
    model = lenet_300_100(rngs=nnx.Rngs(0))
    gates.attach(model, gates.ScalarGate(), key=key, skip=("layers/2",))
    tx = gates.multi_transform(optax.set_to_zero(), optax.adam(0.05))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x = jax.random.uniform(key, (32, 784))
    y = jnp.arange(32) % 10
    w0 = model.layers[0].module.kernel.get_value()

    @nnx.jit
    def step(model, opt):
        def loss(m):
            ce = optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
            return ce + gates.model_penalty(m)

        grads = nnx.grad(loss)(model)
        opt.update(model, grads)
        return gates.model_penalty(model)

    first = step(model, opt)
    for _ in range(20):
        last = step(model, opt)
    assert float(last) < float(first)
    np.testing.assert_array_equal(model.layers[0].module.kernel.get_value(), w0)
    assert not np.allclose(model.layers[0].gate_scale.get_value(), 1.0)


def test_multi_transform_invariants():
    check_transform(lambda inner: gates.multi_transform(inner, optax.sgd(0.1)))


# --- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: gates.HardConcrete(beta=0.0), r"beta must be > 0 .*got 0.0"),
        (lambda: gates.HardConcrete(gamma=0.1), r"gamma must be < 0"),
        (lambda: gates.HardConcrete(zeta=0.9), r"zeta must be > 1"),
        (lambda: gates.BetaBernoulli(temperature=0.0), r"temperature must be > 0"),
        (lambda: gates.BetaBernoulli(alpha=-1.0), r"alpha must be > 0"),
        (lambda: gates.BetaBernoulli(threshold=1.0), r"threshold must be in \[0, 1\)"),
        (lambda: gates.BetaBernoulli(init_a=0.0), r"init_a must be > 0"),
        (lambda: gates.VariationalDropout(threshold=9.0), r"threshold must be in \(-8, 8\)"),
        (lambda: gates.ScalarGate(target=0.0), r"target must be in \(0, 1\]"),
        (lambda: gates.ScalarGate(weight=-1.0), r"weight must be >= 0"),
        (lambda: gates.BetaBernoulli(alpha="x"), r"alpha must be a finite real number, got 'x'"),
        (lambda: gates.HardConcrete(init_log_alpha=math.nan), r"init_log_alpha must be a finite"),
        (lambda: gates.VariationalDropout(threshold=True), r"threshold must be a finite real"),
    ],
)
def test_bad_hyperparameters(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_usage_errors(key):
    params = _mlp_params(key)
    gate = gates.HardConcrete()
    with pytest.raises(ValueError, match="gate_params name layers that params does not have"):
        gates.apply_gates(gate, params, {"nope/kernel": {"gate_log_alpha": jnp.zeros(5)}})
    gp = gates.init_gates(gate, params)
    with pytest.raises(ValueError, match=r"key must be a PRNG key, got 0\. Fix"):
        gates.apply_gates(gate, params, gp, key=0)
    with pytest.raises(ValueError, match="penalty reads the weights, but params is None"):
        gates.penalty(gates.VariationalDropout(), {})
    with pytest.raises(ValueError, match="masks read the weights, but params is None"):
        gates.unit_masks(gates.VariationalDropout(), {})
    with pytest.raises(ValueError, match="slimming_masks found no BatchNorm scales"):
        gates.slimming_masks(params, 0.5)
    model = lenet_300_100(rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"skip names \['ouput'\], which are not layers"):
        gates.attach(lenet_300_100(rngs=nnx.Rngs(0)), gate, key=key, skip=("ouput",))
    with pytest.raises(ValueError, match=r"skip names \['layers/2/kernel'\].*not 'fc2/kernel'"):
        gates.attach(lenet_300_100(rngs=nnx.Rngs(0)), gate, key=key, skip=("layers/2/kernel",))
    with pytest.raises(ValueError, match="attach found no layer to gate"):
        gates.attach(model, gate, key=key, where=lambda p, m: False)
    with pytest.raises(ValueError, match="with_features found no gated layer"):
        gates.with_features(model, jnp.ones((1, 784)))
    with pytest.raises(ValueError, match="with_features: no layer at"):
        gates.with_features(model, jnp.ones((1, 784)), paths=["fc9"])
    with pytest.raises(ValueError, match="can only gate layers with a `kernel`"):
        gates.Gated(nnx.Dropout(0.5), gate, key=key)
    gates.attach(model, gate, key=key, where=lambda p, m: p == ("layers", 0))
    gates.attach(model, gates.BetaBernoulli(), key=key, where=lambda p, m: p == ("layers", 1))
    with pytest.raises(ValueError, match="hard_masks needs one gate kind"):
        gates.hard_masks(model)


def test_slimming_masks_under_jit():
    params = {"bn": {"scale": jnp.array([0.1, 2.0, 3.0]), "bias": jnp.ones(3)}}
    m = jax.jit(lambda p: gates.slimming_masks(p, 1 / 3))(params)
    assert m["bn"]["scale"].tolist() == [False, True, True]
