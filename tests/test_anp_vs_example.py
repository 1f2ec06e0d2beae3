"""The ANP-VS example's unit accounting: the paper's 1370 units, counted on the shrunk net."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from jaxprune import gates
from jaxprune.models import LeNet5Caffe
from tests._examples import load_example


@pytest.fixture(scope="module")
def anp_vs():
    return load_example("anp_vs")


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


def _run(beta, rows, **flags):
    args = {"beta": beta, "methods": "x", "out": "o.md", "train_size": 1280, "batch_size": 128}
    args.update(epochs=1, eps=0.1, seed=0, **flags)
    return {"args": args, "rows": rows, "seconds": 1.0}


def _row(method, units, pgd, clean=80.0):
    kept = {"conv1": 20, "conv2": 50, "fc1_in": 800, "fc1": 500}
    sparsity = 100 * (1 - units / 1370)
    return {
        "method": method,
        "units_kept": kept,
        "unit_sparsity": sparsity,
        "pgd_acc": pgd,
        "clean_acc": clean,
    }


def test_sweep_keeps_each_runs_gated_rows_and_the_first_dense_ones(anp_vs, tmp_path):
    runs = [
        _run(
            40.0,
            [
                _row("standard", 1370, 11.0),
                _row("AT", 1370, 57.0),
                _row("ANP-VS", 400, 52.0),
                _row("AT-kept", 400, 55.0),
            ],
        ),
        _run(110.0, [_row("standard", 1370, 11.0), _row("ANP-VS", 160, 48.0)]),
    ]
    by = anp_vs.sweep_rows(runs)
    assert [r["beta"] for r in by["ANP-VS"]] == [40.0, 110.0]
    assert [r["pgd_acc"] for r in by["ANP-VS"]] == [52.0, 48.0]
    assert len(by["standard"]) == 1 and len(by["AT"]) == 1 and len(by["AT-kept"]) == 1
    path = tmp_path / "sweep.png"
    fig = anp_vs.plot_sweep(runs, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    left = fig.axes[0]
    anp_line = next(ln for ln in left.lines if ln.get_label() == "ANP-VS")
    assert list(anp_line.get_ydata()) == [52.0, 48.0]  # sorted by units pruned


def test_sweep_refuses_runs_that_differ_in_more_than_beta(anp_vs):
    runs = [
        _run(40.0, [_row("ANP-VS", 400, 52.0)]),
        _run(80.0, [_row("ANP-VS", 300, 51.0)], train_steps=10),
    ]
    with pytest.raises(
        ValueError, match=r"run 1 has train_steps=10 but run 0 has train_steps=None"
    ):
        anp_vs.sweep_rows(runs)
    with pytest.raises(ValueError, match="at least one run"):
        anp_vs.sweep_rows([])
