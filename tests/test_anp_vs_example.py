"""The ANP-VS example's unit accounting: the paper's 1370 units, counted on the shrunk net."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jaxprune import gates
from jaxprune.models import LeNet5Caffe

_PATH = pathlib.Path(__file__).resolve().parents[1] / "examples" / "anp_vs.py"


@pytest.fixture(scope="module")
def anp_vs():
    spec = importlib.util.spec_from_file_location("anp_vs_example", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_units_are_the_papers_and_count_what_the_shrunk_network_uses(anp_vs):
    assert sum(anp_vs.UNITS.values()) == 1370  # the reference code's net_weights
    model = LeNet5Caffe(rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x = jnp.ones((2, 28, 28, 1))
    assert anp_vs.kept_units(graphdef, params, rest, x) == anp_vs.UNITS
    gates.attach(
        model, gates.BetaBernoulli(), key=jax.random.key(1), skip=("fc2",), inputs=("fc1",)
    )
    # All 16 features of conv2 channel 0 pruned (feature i is of channel i % 50), and
    # three single features; two conv1 channels and five fc1 neurons.
    dead = jnp.concatenate([jnp.arange(16) * 50, jnp.array([1, 2, 3])])
    model.fc1.gate_in_a.set_value(model.fc1.gate_in_a.get_value().at[dead].set(-20.0))
    model.conv1.gate_a.set_value(model.conv1.gate_a.get_value().at[:2].set(-20.0))
    model.fc1.gate_a.set_value(model.fc1.gate_a.get_value().at[:5].set(-20.0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    units = anp_vs.kept_units(graphdef, params, rest, x)
    # conv2 channel 0 feeds nothing any more: it counts as pruned though its gate is open.
    assert units == {"conv1": 18, "conv2": 49, "fc1_in": 781, "fc1": 495}
    macs, n_params = anp_vs.cost(units)
    assert macs == 24 * 24 * 25 * 18 + 8 * 8 * 25 * 18 * 49 + 781 * 495 + 495 * 10
    assert n_params == (25 * 18 + 18) + (25 * 18 * 49 + 49) + (781 * 495 + 495) + 4960


def test_rows_saved_without_input_gates_render_with_the_papers_units(anp_vs):
    old = {"units_kept": {"conv1": 18, "conv2": 38, "fc1": 46}, "unit_sparsity": 82.1}
    row = anp_vs._with_inputs(old)
    assert row["units_kept"]["fc1_in"] == 16 * 38
    assert row["channel_neuron_sparsity"] == 82.1
    assert row["unit_sparsity"] == pytest.approx(100 * (1 - (18 + 38 + 608 + 46) / 1370))
    assert anp_vs._with_inputs(row) is row
