"""Gates on a layer's input features (``attach(..., inputs=...)``): the 800 gates ANP-VS puts
on the flattened features entering LeNet-5-Caffe's fc1."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxprune as jp
from jaxprune import gates
from jaxprune.structure import shrink_module


class FlatCNN(nnx.Module):
    """conv -> flatten -> dense -> dense: fc1's inputs are (position, channel) features."""

    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), padding="VALID", rngs=rngs)
        self.fc1 = nnx.Linear(2 * 2 * 4, 6, rngs=rngs)
        self.fc2 = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.relu(self.conv(x)).reshape(x.shape[0], -1)
        return self.fc2(jax.nn.relu(self.fc1(h)))


def _model(**kw):
    model = FlatCNN(nnx.Rngs(0))
    gates.attach(model, gates.BetaBernoulli(), key=jax.random.key(1), skip=("fc2",), **kw)
    return model


def test_input_gates_attach_and_sample_as_written(key):
    model = _model(inputs=("fc1",))
    layers = dict(gates.gated_layers(model))
    assert layers[("fc1",)].input_gate_names == ("gate_a", "gate_b")
    assert layers[("conv",)].input_gate_names == ()
    assert model.fc1.gate_in_a.get_value().shape == (16,)
    x = jax.random.uniform(key, (5, 4, 4, 1))
    gates.reseed(model, jax.random.key(7))
    got = model(x)
    # By hand: conv output gated, flattened, inputs gated, fc1, outputs gated.
    fc1, conv, gate = model.fc1, model.conv, gates.BetaBernoulli()
    k_fc1 = fc1.gate_key.get_value()
    z_conv = gate.unit_gate(conv.gate_params(), conv.gate_key.get_value())
    z_in = gate.unit_gate(fc1.input_gate_params(), jax.random.fold_in(k_fc1, 1))
    z_out = gate.unit_gate(fc1.gate_params(), k_fc1)
    h = jax.nn.relu(conv.module(x) * z_conv).reshape(5, -1) * z_in
    want = model.fc2(jax.nn.relu(fc1.module(h) * z_out))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(z_in, 1.0) and not np.allclose(z_in, z_out[0])
    # The penalty counts the input gates: their KL comes on top of the output gates'.
    gps = [conv.gate_params(), fc1.gate_params(), fc1.input_gate_params()]
    np.testing.assert_allclose(gates.model_penalty(model), gate.penalty(gps), rtol=1e-6)


def test_pruned_inputs_eval_detach_masks_and_shrink(key):
    model = _model(inputs=("fc1",))
    fc1 = model.fc1
    dead = jnp.array([0, 3, 4, 9])  # features of channels 0, 3, 0, 1
    fc1.gate_in_a.set_value(fc1.gate_in_a.get_value().at[dead].set(-12.0))
    # Channel 2's four features (2, 6, 10, 14) all pruned: the channel itself goes.
    fc1.gate_in_a.set_value(fc1.gate_in_a.get_value().at[jnp.array([2, 6, 10, 14])].set(-12.0))
    model.eval()
    x = jax.random.uniform(key, (5, 4, 4, 1))
    out = model(x)
    plain = gates.detach(model)
    np.testing.assert_allclose(plain(x), out, rtol=1e-5, atol=1e-6)
    masks = gates.hard_masks(model)
    rows = np.asarray(masks["fc1"]["kernel"]).all(axis=1)
    assert sorted(np.flatnonzero(~rows)) == [0, 2, 3, 4, 6, 9, 10, 14]
    assert np.asarray(masks["fc1"]["bias"]).all() and np.asarray(masks["conv"]["bias"]).all()
    graphdef, params = nnx.split(plain, nnx.Param)
    masked = nnx.merge(graphdef, jp.apply_masks(params, masks))
    np.testing.assert_allclose(masked(x), out, rtol=1e-5, atol=1e-6)
    small = shrink_module(plain, masks, x)
    np.testing.assert_allclose(small(x), out, rtol=1e-5, atol=1e-6)
    # Channel 2 goes with its features; the four single features stay as zero rows.
    assert small.conv.kernel.shape[-1] == 3 and small.fc1.kernel.shape[0] == 12


def test_inputs_only_layer_and_sparsity_ranking(key):
    # fc2's outputs are logits (skipped), its inputs can still be gated.
    model = _model(inputs=("fc2",))
    fc2 = dict(gates.gated_layers(model))[("fc2",)]
    assert fc2.gate_names == () and fc2.input_gate_names == ("gate_a", "gate_b")
    fc2.gate_in_a.set_value(jnp.linspace(-3.0, 3.0, 6))
    x = jax.random.uniform(key, (2, 4, 4, 1))
    model.eval()
    np.testing.assert_allclose(gates.detach(model)(x), model(x), rtol=1e-5, atol=1e-6)
    # 4 + 6 output units and 6 input features: sparsity 0.25 prunes exactly 4 of the 16,
    # the 3 lowest fc2 inputs among them (every other gate ties at the initial value).
    masks = gates.hard_masks(model, sparsity=0.25)
    units = gates.unit_masks(
        gates.BetaBernoulli(),
        {"conv/kernel": model.conv.gate_params(), "fc1/kernel": model.fc1.gate_params()},
        sparsity=0.25,
        input_gate_params={"fc2/kernel": fc2.input_gate_params()},
    )
    assert sum(int(np.sum(~np.asarray(v))) for v in units.values()) == 4
    assert np.asarray(units["fc2/kernel:inputs"]).tolist()[:3] == [False, False, False]
    np.testing.assert_array_equal(
        np.asarray(masks["fc2"]["kernel"]).all(axis=1), np.asarray(units["fc2/kernel:inputs"])
    )


def test_input_gates_train_under_jit(key):
    model = _model(inputs=("fc1",))
    tx = gates.multi_transform(optax.adam(1e-3), optax.adam(0.1))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = tx.init(params)
    x = jax.random.uniform(key, (8, 4, 4, 1))
    y = jnp.arange(8) % 3

    @jax.jit
    def step(params, opt_state, k):
        def loss(p):
            m = nnx.merge(graphdef, p, rest, copy=True)
            gates.reseed(m, k)
            ce = optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
            return ce + 1e-3 * gates.model_penalty(m)

        grads = jax.grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    a0 = params["fc1"]["gate_in_a"].get_value()
    for i in range(3):
        params, opt_state = step(params, opt_state, jax.random.fold_in(key, i))
    assert not np.allclose(params["fc1"]["gate_in_a"].get_value(), a0)


def test_input_gate_errors(key):
    with pytest.raises(ValueError, match=r"inputs names \['fc9'\].*Fix: name layers"):
        _model(inputs=("fc9",))
    with pytest.raises(ValueError, match="inputs=True needs a per-unit gate kind"):
        gates.Gated(
            nnx.Linear(3, 2, rngs=nnx.Rngs(0)), gates.VariationalDropout(), key=key, inputs=True
        )
    with pytest.raises(ValueError, match="needs outputs=True or inputs=True"):
        gates.Gated(
            nnx.Linear(3, 2, rngs=nnx.Rngs(0)), gates.BetaBernoulli(), key=key, outputs=False
        )
    params = {"fc": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}}
    with pytest.raises(ValueError, match=r"input gates of 'fc/kernel' have 4 features"):
        gates.to_masks(
            gates.BetaBernoulli(),
            {},
            params,
            input_gate_params={"fc/kernel": gates.BetaBernoulli().init(jnp.ones((1, 4)))},
        )
    with pytest.raises(ValueError, match="input_gate_params needs a per-unit gate kind"):
        gates.unit_masks(
            gates.VariationalDropout(), {}, params, input_gate_params={"fc/kernel": {}}
        )
    g = gates.Gated(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), gates.BetaBernoulli(), key=key, inputs=True)
    with pytest.raises(ValueError, match=r"input gates of Linear have 3 features"):
        g(jnp.ones((1, 2, 3)).reshape(3, 2))
