"""Per-example gate samples (``per_example=True``): one hard-concrete or beta-Bernoulli sample
per example and unit, as the reference implementations draw them, instead of one per step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

from jaxprune import gates

KINDS = [
    pytest.param(lambda **kw: gates.HardConcrete(**kw), id="HardConcrete"),
    pytest.param(lambda **kw: gates.BetaBernoulli(**kw), id="BetaBernoulli"),
]


class ConvNet(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 3, (3, 3), padding="VALID", rngs=rngs)
        self.fc1 = nnx.Linear(2 * 2 * 3, 5, rngs=rngs)
        self.fc2 = nnx.Linear(5, 2, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.relu(self.conv(x)).reshape(x.shape[0], -1)
        return self.fc2(jax.nn.relu(self.fc1(h)))


@pytest.mark.parametrize("make", KINDS)
def test_unit_gate_batch_shape_determinism_and_distribution(make, key):
    g = make(per_example=True)
    gp = g.init(jnp.zeros((3, 4)))
    z = g.unit_gate(gp, key, batch=6)
    assert z.shape == (6, 4) and z.dtype == jnp.float32
    np.testing.assert_array_equal(z, g.unit_gate(gp, key, batch=6))
    assert not np.allclose(z[0], z[1])  # independent rows
    # The same marginal distribution as the per-step sample: 2000 steps x 10
    # examples against 20000 steps (beta-Bernoulli shares its pi within a step).
    gp1 = jax.tree.map(lambda v: v[:1] - 2.0, g.init(jnp.zeros((3, 1))))  # well inside (0, 1)
    keys = jax.random.split(key, 20000)
    per_example = jax.vmap(lambda k: g.unit_gate(gp1, k, batch=10))(keys[:2000])
    per_step = jax.vmap(lambda k: g.unit_gate(gp1, k))(keys)
    np.testing.assert_allclose(jnp.mean(per_example), jnp.mean(per_step), atol=0.02)
    # The test gate does not depend on the flag.
    np.testing.assert_array_equal(g.unit_gate(gp, None), make().unit_gate(gp, None))


def test_beta_bernoulli_shares_pi_across_the_batch(key):
    # As in the reference, a step draws one pi per unit and one z ~ relaxed
    # Bernoulli(pi) per example. With pi ~ Kumaraswamy(1, 1) = U(0, 1) and a
    # near-zero temperature, a step's batch mean of z is its pi: it spreads over
    # (0, 1) across steps (std 0.29), where independent pi per example would
    # average to 1/2 (std 0.016 over 1000 examples).
    g = gates.BetaBernoulli(per_example=True, temperature=1e-3)
    gp = {k: jnp.full((1,), float(np.log(np.expm1(1.0)))) for k in ("gate_a", "gate_b")}
    np.testing.assert_allclose([float(v[0]) for v in g.ab(gp)], [1.0, 1.0], rtol=1e-5)
    means = jax.vmap(lambda k: jnp.mean(g.unit_gate(gp, k, batch=1000)))(jax.random.split(key, 200))
    assert 0.2 < float(jnp.std(means)) < 0.4, float(jnp.std(means))


def test_sample_unit_gate_shapes_and_errors(key):
    g = gates.HardConcrete(per_example=True)
    gp = g.init(jnp.zeros((3, 4)))
    assert gates.sample_unit_gate(g, gp, key, jnp.ones((2, 5, 5, 4))).shape == (2, 1, 1, 4)
    assert gates.sample_unit_gate(g, gp, key, jnp.ones((7, 4))).shape == (7, 4)
    assert gates.sample_unit_gate(g, gp, None, jnp.ones((7, 4))).shape == (4,)
    assert gates.sample_unit_gate(gates.HardConcrete(), gp, key, jnp.ones((7, 4))).shape == (4,)
    with pytest.raises(ValueError, match=r"per_example=True\) needs a batch axis first.*\(4,\)"):
        gates.sample_unit_gate(g, gp, key, jnp.ones(4))
    with pytest.raises(ValueError, match="per_example must be True or False, got 1"):
        gates.BetaBernoulli(per_example=1)


@pytest.mark.parametrize("make", KINDS)
def test_nnx_attach_per_example_outputs_and_inputs(make, key):
    model = ConvNet(nnx.Rngs(0))
    gates.attach(model, make(per_example=True), key=key, skip=("fc2",), inputs=("fc1",))
    ref = ConvNet(nnx.Rngs(0))
    gates.attach(ref, make(), key=key, skip=("fc2",), inputs=("fc1",))
    x = jnp.broadcast_to(jax.random.uniform(key, (1, 4, 4, 1)), (8, 4, 4, 1))
    gates.reseed(model, jax.random.key(3))
    y = model(x)
    # Identical examples see different gates: outputs differ across the batch.
    assert not np.allclose(y[0], y[1])
    # By hand: every gated layer (conv outputs, fc1 inputs and outputs) per example.
    g, conv, fc1 = model.conv.gate, model.conv, model.fc1
    k_fc1 = fc1.gate_key.get_value()
    z_conv = g.unit_gate(conv.gate_params(), conv.gate_key.get_value(), batch=8)
    z_in = g.unit_gate(fc1.input_gate_params(), jax.random.fold_in(k_fc1, 1), batch=8)
    z_out = g.unit_gate(fc1.gate_params(), k_fc1, batch=8)
    h = jax.nn.relu(conv.module(x) * z_conv[:, None, None, :]).reshape(8, -1) * z_in
    want = model.fc2(jax.nn.relu(fc1.module(h) * z_out))
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
    # Test mode is the same deterministic network with either kind of sampling.
    model.eval()
    ref.eval()
    np.testing.assert_allclose(model(x), ref(x), rtol=1e-6, atol=1e-6)
    # Under jit too (the sample comes from the reseeded key).
    model.train()
    out = nnx.jit(lambda m, x: m(x))(model, x)
    np.testing.assert_allclose(out, y, rtol=1e-5, atol=1e-6)


def test_linen_apply_per_example_and_folded_error(key):
    model = nn.Dense(4)
    x = jnp.ones((6, 5))
    params = model.init(key, x)["params"]
    gate = gates.BetaBernoulli(per_example=True)
    gp = gates.init_gates(gate, params)
    k = jax.random.key(7)
    got = gates.linen_apply(gate, model, {"params": params}, gp, x, key=k)
    z = gate.unit_gate(gp["kernel"], gates.gate_keys(gp, k)["kernel"], batch=6)
    np.testing.assert_allclose(got, model.apply({"params": params}, x) * z, rtol=1e-5, atol=1e-6)
    assert not np.allclose(got[0], got[1])
    # Folding a per-example sample into the kernel would share it: a loud error.
    with pytest.raises(ValueError, match=r"BetaBernoulli\(per_example=True\) draws one gate"):
        gates.apply_gates(gate, params, gp, key=k)
    with pytest.raises(ValueError, match=r"HardConcrete\(per_example=True\) draws one gate"):
        gates.HardConcrete(per_example=True).apply(
            {"gate_log_alpha": jnp.zeros(4)}, params["kernel"], k
        )
    # The test-time network folds as before.
    test_params = gates.apply_gates(gate, params, gp)
    np.testing.assert_allclose(
        model.apply({"params": test_params}, x),
        gates.linen_apply(gate, model, {"params": params}, gp, x),
        rtol=1e-6,
        atol=1e-6,
    )
