"""The ANP-VS example's unit accounting: the paper's 1370 units, counted on the shrunk net."""

import argparse
import json
from pathlib import Path

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


def test_sweep_combines_runs_saved_before_the_report_only_flags(anp_vs):
    old = _run(40.0, [_row("ANP-VS", 400, 52.0)])
    new = _run(80.0, [_row("ANP-VS", 300, 51.0)], long=False, summary=None, summary_out=None)
    assert [r["beta"] for r in anp_vs.sweep_rows([old, new])["ANP-VS"]] == [40.0, 80.0]


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


def _full_row(method, pgd, sparsity, clean=80.0, vulnerability=0.1):
    return {
        **_row(method, round(1370 * (1 - sparsity / 100)), pgd, clean),
        "unit_sparsity": sparsity,
        "vulnerability": vulnerability,
        "flops_reduction": 2.0,
    }


def test_summary_checks_anp_vs_against_the_stronger_at_row(anp_vs):
    flags = dict(train_steps=10, lam=1e-3, gate_samples="example", weight_decay=1e-4)
    met = _run(
        4.0,
        [
            _full_row("AT", 66.0, 0.0),
            _full_row("AT-mix", 67.5, 0.0),
            _full_row("ANP-VS", 67.5, 81.0),
        ],
        **flags,
    )
    weak = _run(4.0, [_full_row("AT", 69.0, 0.0), _full_row("ANP-VS", 67.0, 79.0)], **flags)
    md = anp_vs.summary([met, weak], ["met", "weak"])
    lines = md.strip().splitlines()
    assert len(lines) == 4
    # The first run is compared with AT-mix, its stronger AT row; ties count as robust.
    assert "67.50 (AT-mix)" in lines[2] and "+0.00" in lines[2] and lines[2].endswith("| met |")
    # steps 1280 // 128; adversarial weight, gate init / lr and the gates attacked default
    # to the flags' values for runs saved before those flags existed.
    assert (
        "| 10 | 10 | 4 | example | 0.0001 | 0.001 | 2 | 0 | 30 / 0.2 | sampled gates |"
        in (lines[2])
    )
    assert "| +0.00 | +1.50 | met |" in lines[2]  # AT-mix set the target; AT alone 1.5 under
    assert "-2.00" in lines[3] and lines[3].endswith("| no (robustness, units) |")
    with pytest.raises(ValueError, match=r"run 'dense' has rows \['AT'\].*--methods including"):
        anp_vs.summary([_run(4.0, [_full_row("AT", 69.0, 0.0)], **flags)], ["dense"])
    with pytest.raises(ValueError, match="2 runs but 1 names"):
        anp_vs.summary([met, weak], ["met"])


def test_summary_holds_anp_vs_from_at_to_at_trained_on_as_long(anp_vs):
    # ANP-VS started from AT beats AT but not AT-cont (AT trained on for as many
    # steps): the target is checked against AT-cont, and the gap to AT is a column.
    from_at = _run(
        5.0,
        [
            _full_row("AT", 70.0, 0.0),
            {
                **_full_row("ANP-VS", 73.0, 80.5),
                "starts_from": "AT",
                "channel_neuron_sparsity": 70.0,
            },
            _full_row("AT-cont", 75.0, 0.0),
        ],
        train_steps=10,
        lam=1e-3,
        adv_weight=1000.0,
        init_a=0.5,
        gate_lr=0.01,
        attack_gates="test",
    )
    line = anp_vs.summary([from_at], ["from_at"]).strip().splitlines()[2]
    assert "| 1000 | 0 | 0.5 / 0.01 | test gates | AT |" in line
    assert "| 80.00 / 75.00 (AT-cont) | 80.00 / 73.00 |" in line
    assert line.endswith("| -2.00 | +3.00 | no (robustness) |")
    assert "AT-cont" in anp_vs.verdict(from_at["rows"]) and "NOT met" in anp_vs.verdict(
        from_at["rows"]
    )


def test_long_sets_the_gpu_protocol_and_explicit_flags_win(anp_vs):
    _, args = anp_vs.parse_args(["--long", "--beta", "3"])
    assert (args.epochs, args.train_steps, args.eval_size) == (25, 10, 10000)
    assert args.gate_samples == "example" and args.weight_decay == 1e-4
    assert args.beta == 3.0  # given beside --long
    _, plain = anp_vs.parse_args([])
    assert (plain.epochs, plain.beta, plain.gate_samples) == (1, 80.0, "batch")
    with pytest.raises(SystemExit):
        anp_vs.parse_args(["--long", "--quick"])


def test_report_names_where_the_run_trained(anp_vs):
    row = {
        **_full_row("ANP-VS", 60.0, 82.0),
        "channel_neuron_sparsity": 80.0,
        "weight_sparsity": 90.0,
        "memory_kb": 100.0,
    }
    args = dict(
        dataset="fashion-mnist",
        train_size=1280,
        batch_size=128,
        epochs=1,
        lr=1e-3,
        gate_lr=0.2,
        schedule="staircase",
        weight_decay=0.0,
        eps=0.1,
        train_steps=3,
        attack_gates="sampled",
        gate_samples="batch",
        eval_steps=40,
        eval_step_size=0.01,
        eval_size=500,
        alpha=1e-4,
        beta=80.0,
        adv_weight=2.0,
        lam=1e-3,
        seed=0,
    )
    result = {"args": args, "rows": [row], "seconds": 120.0}
    assert "2.0 min on this machine's shared 2-core CPU." in anp_vs.render(result)
    result["device"] = "NVIDIA H100 80GB HBM3 (GPU)"
    assert "2.0 min on NVIDIA H100 80GB HBM3 (GPU)." in anp_vs.render(result)


def test_a_network_with_every_unit_pruned_shows_no_flops_ratio(anp_vs):
    gone = {**_full_row("ANP-VS", 10.0, 100.0), "flops_reduction": 2293000.0}
    assert anp_vs._flops(gone) == "all pruned"
    assert anp_vs._flops(_full_row("ANP-VS", 60.0, 81.0)) == "2.00x"
    run = _run(4.0, [_full_row("AT", 69.0, 0.0), gone], train_steps=10, lam=1e-3)
    line = anp_vs.summary([run], ["gone"]).strip().splitlines()[2]
    assert "| 100.0 | all pruned |" in line and "2293000" not in line


def test_the_gpu_page_third_batch_table_is_the_summary_of_its_jsons(anp_vs):
    # docs/anp_vs_gpu.md shows `--summary` over the ten jsons it names; a json edited
    # or a summary column changed without rewriting the page would show here.
    import json
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "docs"
    page = (root / "anp_vs_gpu.md").read_text().split("## Third batch", 1)[1]
    lines = [ln for ln in page.splitlines() if ln.startswith("| ")]
    names = [ln.split(" | ")[0][2:] for ln in lines[1:]]
    assert len(names) == 10
    results = [json.loads((root / "anp_vs_gpu" / f"{n}.json").read_text()) for n in names]
    want = anp_vs.summary(results, names).strip().splitlines()
    assert [want[0], *want[2:]] == lines


def test_anp_vs_ft_is_held_to_the_at_rows_with_at_least_its_budget(anp_vs):
    def row(method, pgd, sparsity, inherited):
        full = _full_row(method, pgd, sparsity)
        return {**full, "steps": 10, "inherited_steps": inherited, "channel_neuron_sparsity": 70.0}

    # AT (20 steps) is weaker than ANP-VS-ft (30) but does not count: AT-cont has the budget.
    rows = [row("AT", 50.0, 0.0, 10), row("ANP-VS", 45.0, 82.0, 10)]
    rows += [row("ANP-VS-ft", 56.0, 82.0, 20), row("AT-cont", 55.0, 0.0, 20)]
    text = anp_vs.verdict(rows)
    assert "against AT-cont (30 steps), +1.0 points" in text
    assert "with fine-tuning is **met**" in text
    assert "**NOT met** (robust enough: no" in text  # ANP-VS alone, against AT-cont
    weaker = anp_vs.fine_tuned({r["method"]: r for r in rows[:3]}, rows[:1])
    assert "no AT row trained as long (20 steps at most)" in weaker and "AT-cont" in weaker
    sparse_short = [*rows[:2], row("ANP-VS-ft", 56.0, 79.0, 20), rows[3]]
    assert "with fine-tuning is **NOT met**" in anp_vs.verdict(sparse_short)
    # The capacity control: AT at ANP-VS's units with ANP-VS-ft's budget.
    text = anp_vs.verdict([*rows, row("AT-cont-kept", 53.0, 82.0, 20)])
    assert "reaches 80.0% clean / 53.0% PGD-40: ANP-VS-ft is +3.0 points from it" in text
    assert "those units cost AT -2.0 points" in text


def test_summary_gives_anp_vs_ft_a_line_held_to_its_budget(anp_vs):
    def row(method, pgd, sparsity, inherited):
        full = _full_row(method, pgd, sparsity)
        return {**full, "steps": 10, "inherited_steps": inherited, "starts_from": "x"}

    rows = [row("AT", 50.0, 0.0, 10), row("ANP-VS", 45.0, 82.0, 10)]
    rows += [row("ANP-VS-ft", 56.0, 82.0, 20), row("AT-cont", 55.0, 0.0, 20)]
    lines = anp_vs.summary([_run(4.0, rows, train_steps=3, lam=1e-3)], ["r"]).splitlines()
    assert len(lines) == 4
    assert lines[2].startswith("| r |") and lines[2].endswith(
        "| -10.00 | -5.00 | no (robustness) |"
    )
    assert lines[3].startswith("| r (ANP-VS-ft) |") and "| 80.00 / 56.00 |" in lines[3]
    assert lines[3].endswith("| +1.00 | +6.00 | met |")
    # Without an AT row trained as long, ANP-VS-ft gets no line.
    short = anp_vs.summary([_run(4.0, rows[:3], train_steps=3, lam=1e-3)], ["r"])
    assert "ANP-VS-ft" not in short


@pytest.mark.parametrize(
    "stem", ["anp_vs_ft_mix", "anp_vs_ft_aw1000", "anp_vs_ft_aw1000_seed1", "anp_vs_ft_beta40"]
)
def test_the_fine_tuning_pages_render_from_their_json(anp_vs, stem):
    docs = Path(__file__).resolve().parents[1] / "docs"
    result = json.loads((docs / f"{stem}.json").read_text())
    text = anp_vs.render(result)
    assert (docs / f"{stem}.md").read_text() == text
    assert "**Settings.** This run differs from the example's default run" in text
    assert "the paper's shape with fine-tuning is **NOT met**" in text
    assert "AT-cont-kept, the AT model shrunk to ANP-VS's units" in text


def test_only_the_default_run_gets_the_default_runs_notes(anp_vs):
    args = vars(anp_vs.make_parser().parse_args([]))
    docs = Path(__file__).resolve().parents[1] / "docs"
    rows = json.loads((docs / "anp_vs_eps005.json").read_text())["rows"]
    default = {"args": {**args, "out": "docs/anp_vs.md"}, "rows": rows, "seconds": 60.0}
    assert anp_vs.changed_flags(argparse.Namespace(**default["args"])) == []
    text = anp_vs.render(default)
    assert anp_vs.PAPER_NOTE in text and "**Settings.**" not in text
    # Widths saved by json as a list are the default, not a change.
    flags = dict(args, widths=[20, 50, 500], eps=0.05, finetune=False, methods="standard,AT")
    changed = anp_vs.changed_flags(argparse.Namespace(**flags))
    assert changed == ["--eps 0.05", "--no-finetune", "--methods standard,AT"]
    text = anp_vs.render({"args": flags, "rows": rows, "seconds": 60.0})
    assert anp_vs.PAPER_NOTE not in text
    assert "differs from the example's default run (`docs/anp_vs.md`) in `--eps 0.05`, " in text
    assert anp_vs.changed_flags(argparse.Namespace(**dict(args, widths=(20, 50, 44)))) == [
        "--widths 20/50/44"
    ]
