"""Input gates in the functional form (``init_gates(..., inputs=True)``) and in
``linen_apply``: the same gates as ``attach(..., inputs=...)`` on nnx, for any pytree
model and for linen models left as written."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxprune as jp
from jaxprune import gates


class LinenFlatCNN(nn.Module):
    """conv -> flatten -> fc1 -> fc2, linen: fc1's 16 inputs are (position, channel) features."""

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(4, (3, 3), padding="VALID", name="conv")(x)).reshape(x.shape[0], -1)
        return nn.Dense(3, name="fc2")(nn.relu(nn.Dense(6, name="fc1")(h)))


def _is(*names):
    return lambda path, x: path in [(n, "kernel") for n in names]


@pytest.fixture
def setup(key):
    model = LinenFlatCNN()
    x = jax.random.uniform(key, (5, 4, 4, 1))
    variables = model.init(jax.random.key(1), x)
    params = variables["params"]
    gate = gates.BetaBernoulli()
    gp = gates.init_gates(gate, params, where=_is("conv", "fc1"))
    gpi = gates.init_gates(gate, params, where=_is("fc1"), inputs=True)
    # Distinct values per feature, so a wrong axis or key cannot pass.
    gpi = {"fc1/kernel": {**gpi["fc1/kernel"], "gate_a": jnp.linspace(-2.0, 4.0, 16)}}
    return model, x, variables, gate, gp, gpi


def test_init_gates_inputs_shapes_and_keys(setup):
    _, _, variables, gate, gp, gpi = setup
    assert set(gpi) == {"fc1/kernel"} and gpi["fc1/kernel"]["gate_b"].shape == (16,)
    assert gp["fc1/kernel"]["gate_b"].shape == (6,)
    k = jax.random.key(3)
    keys, in_keys = gates.gate_keys(gp, k), gates.input_gate_keys(gpi, k)
    np.testing.assert_array_equal(
        jax.random.key_data(in_keys["fc1/kernel"]),
        jax.random.key_data(jax.random.fold_in(jax.random.fold_in(k, 1), 0)),
    )
    assert not np.array_equal(
        jax.random.key_data(in_keys["fc1/kernel"]), jax.random.key_data(keys["fc1/kernel"])
    )


@pytest.mark.parametrize("sampled", [True, False])
def test_functional_and_linen_forms_agree_with_the_hand_computed_net(setup, sampled):
    model, x, variables, gate, gp, gpi = setup
    k = jax.random.key(7) if sampled else None
    folded = gates.apply_gates(gate, variables["params"], gp, key=k, input_gate_params=gpi)
    got_functional = model.apply({"params": folded}, x)
    got_linen = gates.linen_apply(gate, model, variables, gp, x, key=k, input_gate_params=gpi)
    # By hand, with the documented keys: conv gated, flattened, inputs gated, fc1 gated.
    keys = gates.gate_keys(gp, k) if sampled else {}
    in_keys = gates.input_gate_keys(gpi, k) if sampled else {}
    z = {n: gate.unit_gate(gp[n], keys.get(n)) for n in gp}
    z_in = gate.unit_gate(gpi["fc1/kernel"], in_keys.get("fc1/kernel"))
    p = variables["params"]
    conv = nn.Conv(4, (3, 3), padding="VALID").apply({"params": p["conv"]}, x)
    h = (nn.relu(conv * z["conv/kernel"]).reshape(5, -1)) * z_in
    h = nn.relu((h @ p["fc1"]["kernel"] + p["fc1"]["bias"]) * z["fc1/kernel"])
    want = h @ p["fc2"]["kernel"] + p["fc2"]["bias"]
    np.testing.assert_allclose(got_functional, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_linen, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(z_in, z_in[0])


def test_functional_test_time_matches_nnx_attach(key):
    layer = nnx.Linear(5, 3, rngs=nnx.Rngs(0))
    params = {"kernel": layer.kernel.get_value(), "bias": layer.bias.get_value()}
    gate = gates.HardConcrete()
    gpi = {"kernel": {"gate_log_alpha": jnp.array([-9.0, 0.5, 2.0, -1.0, 9.0])}}
    gp = {"kernel": {"gate_log_alpha": jnp.array([1.0, -9.0, 3.0])}}
    wrapped = gates.Gated(nnx.clone(layer), gate, key=key, inputs=True)
    wrapped.gate_log_alpha.set_value(gp["kernel"]["gate_log_alpha"])
    wrapped.gate_in_log_alpha.set_value(gpi["kernel"]["gate_log_alpha"])
    wrapped.deterministic = True
    x = jax.random.normal(key, (4, 5))
    folded = gates.apply_gates(gate, params, gp, input_gate_params=gpi)
    np.testing.assert_allclose(
        x @ folded["kernel"] + folded["bias"], wrapped(x), rtol=1e-5, atol=1e-6
    )
    # The penalties agree too: the same gates, regularized as one set.
    np.testing.assert_allclose(
        gates.penalty(gate, gp, input_gate_params=gpi),
        gate.penalty([gp["kernel"], gpi["kernel"]]),
        rtol=1e-6,
    )


def test_penalty_sees_input_gates_as_one_set():
    # ScalarGate's penalty is on the mean |g| of all gates: 0.5 * (mean - 0.2)**2.
    gate = gates.ScalarGate()
    params = {"fc": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}}
    gp = {"fc/kernel": {"gate_scale": jnp.array([1.0, 0.0])}}
    gpi = {"fc/kernel": {"gate_scale": jnp.array([0.0, 0.0, 1.0])}}
    got = gates.penalty(gate, gp, params, input_gate_params=gpi)
    np.testing.assert_allclose(got, 0.5 * (2 / 5 - 0.2) ** 2, rtol=1e-6)
    np.testing.assert_allclose(
        gates.penalty(gate, gp, input_gate_params=gpi), got, rtol=1e-6
    )  # params are optional for per-unit kinds


def test_masks_of_pruned_inputs_reproduce_the_test_time_net(setup):
    model, x, variables, gate, gp, gpi = setup
    dead = [0, 3, 5, 11]
    gpi = {"fc1/kernel": {**gpi["fc1/kernel"]}}
    gpi["fc1/kernel"]["gate_a"] = gpi["fc1/kernel"]["gate_a"].at[jnp.array(dead)].set(-12.0)
    folded = gates.apply_gates(gate, variables["params"], gp, input_gate_params=gpi)
    masks = gates.to_masks(gate, gp, variables["params"], input_gate_params=gpi)
    rows = np.asarray(masks["fc1"]["kernel"]).all(axis=1)
    assert sorted(np.flatnonzero(~rows)) == dead
    np.testing.assert_array_equal(np.asarray(folded["fc1"]["kernel"])[dead], 0.0)
    want = gates.linen_apply(gate, model, variables, gp, x, input_gate_params=gpi)
    masked = jp.apply_masks(folded, masks)
    np.testing.assert_allclose(model.apply({"params": masked}, x), want, rtol=1e-5, atol=1e-6)


def test_input_gates_train_under_jit(setup):
    model, x, variables, gate, gp, gpi = setup
    y = jnp.arange(5) % 3
    tree = {"params": variables["params"], "gates": gp, "input_gates": gpi}
    tx = gates.multi_transform(optax.adam(1e-3), optax.adam(0.1))
    state = tx.init(tree)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(tree, state, k):
        def loss(t):
            logits = gates.linen_apply(
                gate,
                model,
                {"params": t["params"]},
                t["gates"],
                x,
                key=k,
                input_gate_params=t["input_gates"],
            )
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            reg = gates.penalty(gate, t["gates"], input_gate_params=t["input_gates"])
            return ce + 1e-3 * reg

        grads = jax.grad(loss)(tree)
        updates, state = tx.update(grads, state, tree)
        return optax.apply_updates(tree, updates), state, grads

    before = tree["input_gates"]["fc1/kernel"]["gate_a"]
    for i in range(3):
        tree, state, grads = step(tree, state, jax.random.key(i))
    assert np.abs(np.asarray(grads["input_gates"]["fc1/kernel"]["gate_a"])).sum() > 0
    assert not np.allclose(tree["input_gates"]["fc1/kernel"]["gate_a"], before)


def test_functional_input_gate_errors(setup):
    model, x, variables, gate, gp, gpi = setup
    params = variables["params"]
    with pytest.raises(ValueError, match="inputs=True needs a per-unit gate kind"):
        gates.init_gates(gates.VariationalDropout(), params, inputs=True)
    with pytest.raises(ValueError, match="input_gate_params needs a per-unit gate kind"):
        gates.apply_gates(gates.VariationalDropout(), params, {}, input_gate_params=gpi)
    with pytest.raises(ValueError, match="input_gate_params needs a per-unit gate kind"):
        gates.penalty(gates.VariationalDropout(), {}, params, input_gate_params=gpi)
    with pytest.raises(ValueError, match=r"params does not have: \['fc9/kernel'\]"):
        gates.apply_gates(gate, params, gp, input_gate_params={"fc9/kernel": gpi["fc1/kernel"]})
    wrong = {"fc2/kernel": gpi["fc1/kernel"]}  # 16 gates on fc2's 6 inputs
    with pytest.raises(ValueError, match=r"input gates of 'fc2/kernel' have 16 features"):
        gates.apply_gates(gate, params, gp, input_gate_params=wrong)
    with pytest.raises(ValueError, match=r"input gates of 'fc2/kernel' have 16 features"):
        gates.linen_apply(gate, model, variables, gp, x, input_gate_params=wrong)
    # A gate on a layer no call reaches would gate nothing: an error, not a silent no-op.
    with pytest.raises(ValueError, match=r"no submodule call matched the gates \['fc9/kernel"):
        gates.linen_apply(gate, model, variables, {"fc9/kernel": gp["fc1/kernel"]}, x)
    with pytest.raises(ValueError, match=r"matched the gates \['fc9/kernel:inputs'\]"):
        gates.linen_apply(
            gate, model, variables, gp, x, input_gate_params={"fc9/kernel": gpi["fc1/kernel"]}
        )
