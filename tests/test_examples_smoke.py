"""examples/lottery_ticket.py and examples/dynamic_sparse.py: tiny runs of their main()."""

import json
import math
import re

import pytest

from tests._examples import load_example


def _result_line(out: str) -> dict:
    last = out.strip().splitlines()[-1]
    assert last.startswith("RESULT ")
    return json.loads(last[len("RESULT ") :])


@pytest.fixture(scope="module")
def lottery():
    return load_example("lottery_ticket")


@pytest.fixture(scope="module")
def dynamic():
    return load_example("dynamic_sparse")


def test_lottery_rounds_prune_exact_counts_and_report_the_reinit_control(lottery, capsys):
    argv = ["--quick", "--dataset", "digits", "--steps", "80", "--rounds", "2"]
    argv += ["--rate", "0.5", "--rewind-step", "10", "--controls", "1"]
    result = lottery.main(argv)
    rows = result["rows"]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r, target in zip(rows, [0.0, 0.5, 0.75], strict=True):
        # Global magnitude keeps exactly N - round(s * N) weights, and the trained
        # params are nonzero exactly there (the masks were enforced).
        assert r["weights"] == 266_200
        assert r["kept_weights"] == r["weights"] - round(target * r["weights"])
        assert r["nonzero_weights"] == r["kept_weights"]
        assert abs(r["sparsity"] - target) < 1e-6
        assert 0.5 < r["accuracy"] <= 1.0  # digits: chance is 0.1
    (control,) = result["controls"]
    assert 0.0 <= control["accuracy"] <= 1.0
    assert result["ticket_wins"] == (rows[-1]["accuracy"] > control["accuracy"])
    diff = rows[-1]["accuracy"] - control["accuracy"]
    assert result["ticket_minus_best_control_images"] == round(diff * result["test_images"])
    images = round(abs(diff) * result["test_images"])
    assert result["within_noise"] == (
        images == 0 or abs(diff) < 2 * result["difference_standard_error"]
    )
    out = capsys.readouterr().out
    assert "| reinit (seed 1000) | 25.0% | 0.7500 | same masks |" in out
    summary = _result_line(out)
    assert summary["sparsity"] == [0.0, 0.5, 0.75]
    assert summary["accuracy"] == [round(r["accuracy"], 4) for r in rows]
    assert summary["control_accuracy"] == [round(control["accuracy"], 4)]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rewind-step", "300", "--steps", "300"], r"--rewind-step must lie in \[0, --steps\)"),
        (["--rate", "1.0"], r"--rate must lie in \(0, 1\), got 1.0"),
        (["--rounds", "0"], "--rounds must be >= 1, got 0"),
        (["--quick", "--test-size", "0"], "--test-size must be >= 1, got 0"),
        (["--test-size", "-5"], "--test-size must be >= 1, got -5"),
    ],
)
def test_lottery_bad_flags_name_the_flag_and_value(lottery, argv, message, capsys):
    with pytest.raises(SystemExit):
        lottery.parse_args(argv)
    assert re.search(message, capsys.readouterr().err)


# Uniform 90%: every kernel keeps exactly round(0.1 * n) weights (235,200 / 30,000 / 1,000).
_KEPT = [23_520, 3_000, 100]


def _dynamic_run(dynamic, methods):
    argv = ["--quick", "--dataset", "digits", "--steps", "100", "--update-every", "25"]
    return dynamic.main([*argv, "--methods", methods, "--distribution", "uniform"])["rows"]


def test_dynamic_static_keeps_its_exact_mask_and_dense_stays_dense(dynamic, capsys):
    dense, static = _dynamic_run(dynamic, "dense,static")
    assert dense["nonzero_weights"] == dense["weights"] == 266_200
    assert dense["rewired"] == 0 and dense["mask_sparsity"] == 0.0
    assert static["layer_sparsity"] == [0.9, 0.9, 0.9]
    assert round((1 - static["mask_sparsity"]) * static["weights"]) == sum(_KEPT)
    assert static["nonzero_weights"] <= sum(_KEPT)  # params are zero off the mask
    assert static["rewired"] == 0
    for r in (dense, static):
        assert 0.5 < r["accuracy"] <= 1.0  # digits: chance is 0.1
    summary = _result_line(capsys.readouterr().out)
    assert summary["static"] == {
        "accuracy": round(static["accuracy"], 4),
        "sparsity": 0.9,
        "nonzero_weights": static["nonzero_weights"],
        "rewired": 0,
    }
    assert summary["dense"]["nonzero_weights"] == 266_200


def test_dynamic_rigl_rewires_within_its_cosine_budget(dynamic, capsys):
    (rigl,) = _dynamic_run(dynamic, "RigL")
    assert rigl["layer_sparsity"] == [0.9, 0.9, 0.9]
    assert round((1 - rigl["mask_sparsity"]) * rigl["weights"]) == sum(_KEPT)
    assert 0.5 < rigl["accuracy"] <= 1.0
    # Rewiring at steps 25 and 50 (end_step 75), each dropping floor(f(t) * kept)
    # per layer with RigL's cosine f(t) = 0.15 (1 + cos(pi t / 75)); a regrown
    # weight may be one just dropped (not a change), so this is an upper bound.
    fracs = [0.15 * (1 + math.cos(math.pi * t / 75)) for t in (25, 50)]
    assert 0 < rigl["rewired"] <= sum(int(f * k) for f in fracs for k in _KEPT)
    assert _result_line(capsys.readouterr().out)["RigL"]["rewired"] == rigl["rewired"]


def test_dynamic_set_rewires_its_constant_fraction(dynamic, capsys):
    (set_,) = _dynamic_run(dynamic, "SET")
    assert set_["layer_sparsity"] == [0.9, 0.9, 0.9]
    assert round((1 - set_["mask_sparsity"]) * set_["weights"]) == sum(_KEPT)
    assert 0.5 < set_["accuracy"] <= 1.0
    # Two rewirings of floor(0.3 * kept) per layer, regrown at random among the
    # ~90% inactive weights: only a few percent can land on a weight just dropped.
    bound = 2 * sum(int(0.3 * k) for k in _KEPT)
    assert 0.9 * bound < set_["rewired"] <= bound
    assert _result_line(capsys.readouterr().out)["SET"]["sparsity"] == 0.9


def test_dynamic_ste_reselects_every_step_at_exact_per_layer_counts(dynamic, capsys):
    ste, sr_ste = _dynamic_run(dynamic, "STE,SR-STE")
    for r in (ste, sr_ste):
        assert r["layer_sparsity"] == [0.9, 0.9, 0.9]
        assert round((1 - r["mask_sparsity"]) * r["weights"]) == sum(_KEPT)
        # Kept weights are the dense values (nonzero), the rest exactly 0.
        assert sum(_KEPT) - 5 <= r["nonzero_weights"] <= sum(_KEPT)
        assert r["rewired"] > 0  # pruned weights came back during training
        assert 0.5 < r["accuracy"] <= 1.0
    out = capsys.readouterr().out
    assert "; SR-STE decay 0.02;" in out
    assert _result_line(out)["SR-STE"]["rewired"] == sr_ste["rewired"]


def test_dynamic_sparse_bad_methods_are_named(dynamic, capsys):
    with pytest.raises(SystemExit):
        dynamic.parse_args(["--methods", "RigL,GraNet"])
    assert "--methods must be a comma-separated subset of" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--quick", "--update-every", "0"], "--update-every must be >= 1, got 0"),
        (["--test-size", "0"], "--test-size must be >= 1, got 0"),
        (["--decay", "-0.1"], "--decay must be >= 0, got -0.1"),
    ],
)
def test_dynamic_sparse_zero_flags_are_refused_not_replaced_by_defaults(
    dynamic, argv, message, capsys
):
    with pytest.raises(SystemExit):
        dynamic.parse_args(argv)
    assert message in capsys.readouterr().err
    args = dynamic.parse_args(["--quick"])  # flags not given take the quick defaults
    assert (args.steps, args.update_every, args.test_size) == (300, 25, 2000)
