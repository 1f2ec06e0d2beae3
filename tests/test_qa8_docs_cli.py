"""QA round 8 (docs and CLI): example flags, CLI errors in CLI terms, rendered notes, API docs.

Everything here parses arguments, renders saved results or saves a tiny checkpoint:
nothing trains.
"""

import importlib
import json
import pathlib

import jax.numpy as jnp
import pytest

from jaxprune import checkpoint, cli
from tests._examples import load_example

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture(scope="module")
def structured():
    return load_example("structured_training")


@pytest.fixture(scope="module")
def anp_vs():
    return load_example("anp_vs")


# --- #1: --quick fills only the flags left out -------------------------------------------


def test_structured_quick_keeps_the_flags_given_beside_it(structured):
    argv = ["--quick", "--epochs", "3", "--finetune-epochs", "2", "--runs", "50"]
    argv += ["--sparsities", "0.3,0.6", "--frequency", "10", "--train-size", "640"]
    a = structured.parse_args(argv)
    got = (a.epochs, a.finetune_epochs, a.runs, a.sparsity_list, a.frequency, a.train_size)
    assert got == (3, 2, 50, [0.3, 0.6], 10, 640)
    q = structured.parse_args(["--quick"])  # left out: the smoke run's presets
    got = (q.epochs, q.finetune_epochs, q.runs, q.sparsity_list, q.frequency, q.train_size)
    assert got == (1, 1, 5, [0.5], 4, 2048)
    f = structured.parse_args([])  # and without --quick, the full run's
    got = (f.epochs, f.finetune_epochs, f.runs, f.sparsity_list, f.frequency, f.train_size)
    assert got == (2, 1, 30, [0.5, 0.75], 25, None)


def test_structured_quick_checks_an_explicit_zero_instead_of_replacing_it(structured, capsys):
    with pytest.raises(SystemExit):
        structured.parse_args(["--quick", "--runs", "0"])
    assert "--runs must be >= 1, got 0" in capsys.readouterr().err


def test_structured_rendered_command_names_the_flags_given(structured):
    a = vars(structured.parse_args(["--quick", "--epochs", "3", "--sparsities", "0.3"]))
    assert structured._flags(a) == " --quick --epochs 3 --sparsities 0.3"
    assert structured._flags(vars(structured.parse_args(["--quick"]))) == " --quick"
    assert structured._flags(vars(structured.parse_args(["--runs", "7"]))) == " --runs 7"


def test_anp_vs_quick_keeps_the_flags_given_beside_it(anp_vs, capsys):
    _, a = anp_vs.parse_args(["--quick", "--epochs", "3", "--train-size", "640"])
    assert (a.train_size, a.epochs, a.eval_size) == (640, 3, 100)
    _, q = anp_vs.parse_args(["--quick"])
    assert (q.train_size, q.epochs, q.eval_size) == (1920, 1, 100)
    _, full = anp_vs.parse_args([])  # the published runs' defaults are unchanged
    assert (full.train_size, full.epochs, full.eval_size, full.beta) == (51200, 1, 500, 80.0)
    with pytest.raises(SystemExit):
        anp_vs.parse_args(["--quick", "--eval-size", "0"])  # was a silent 100
    assert "--eval-size must be >= 1, got 0" in capsys.readouterr().err


# --- #2: flags refused at parse time --------------------------------------------------------


@pytest.mark.parametrize("name", ["structured_training", "dynamic_sparse", "lottery_ticket"])
def test_examples_refuse_an_unknown_dataset_and_list_mnist_5k(name, capsys):
    example = load_example(name)
    with pytest.raises(SystemExit) as e:
        example.parse_args(["--dataset", "foo"])
    assert e.value.code == 2
    assert "invalid choice: 'foo'" in capsys.readouterr().err
    assert example.parse_args(["--dataset", "mnist-5k"]).dataset == "mnist-5k"
    with pytest.raises(SystemExit):
        example.parse_args(["--help"])
    assert "mnist-5k" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--train-size", "0"], "--train-size must be >= 1, got 0"),
        (["--epochs", "0"], "--epochs must be >= 1, got 0"),
        (["--eval-size", "0"], "--eval-size must be >= 1, got 0"),
        (["--eval-steps", "0"], "--eval-steps must be >= 1, got 0"),
        (["--train-steps", "0"], "--train-steps must be >= 1, got 0"),
        (["--eps", "-1"], "--eps must be >= 0, got -1.0; e.g. --eps 0.1"),
        (["--eps", "nan"], "--eps must be >= 0, got nan"),
        (["--beta", "-1"], "--beta must be >= 0, got -1.0"),
        (["--lam", "-1"], "--lam must be >= 0, got -1.0"),
        (["--weight-decay", "-0.5"], "--weight-decay must be >= 0, got -0.5"),
        (["--adv-weight", "-2"], "--adv-weight must be >= 0, got -2.0"),
        (["--alpha", "0"], "--alpha must be > 0, got 0.0"),
        (["--lr", "0"], "--lr must be > 0, got 0.0"),
        (["--train-size", "64"], "--train-size must be >= --batch-size (128), got 64"),
    ],
)
def test_anp_vs_numeric_flags_are_refused_before_data_loads(anp_vs, argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        anp_vs.parse_args(["--quick", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


# --- #3: CLI errors say what to type -------------------------------------------------------


@pytest.mark.parametrize("value", ["-1", "five"])
def test_cli_step_is_checked_when_parsed(value, capsys):
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(["inspect", "ck", "--step", value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --step" in err and "e.g. --step 5" in err and "step=int" not in err


def test_cli_export_refuses_a_taken_or_nested_out_in_cli_terms(tmp_path, capsys):
    src = tmp_path / "ck"
    checkpoint.save(src, 5, {"w": jnp.zeros((4, 4))})
    out = tmp_path / "out"
    assert cli.main(["export", str(src), str(out)]) == 0
    capsys.readouterr()
    assert cli.main(["export", str(src), str(out)]) == 1  # out already holds step 5
    err = capsys.readouterr().err
    assert f"delete {out / '5'} first" in err and "pass another OUT" in err
    assert "new step" not in err
    assert cli.main(["export", str(src), str(src / "5" / "sub")]) == 1
    err = capsys.readouterr().err
    assert f"pass an OUT outside {src}" in err and "save(" not in err
    assert not (src / "5" / "sub").exists()


# --- #5: docstrings with examples; __all__ of internal modules -----------------------------


@pytest.mark.parametrize(
    "name",
    [
        "jaxprune.cli.main",
        "jaxprune.cli.build_parser",
        "jaxprune.llm.prune_decoder",
        "jaxprune.data.load",
        "jaxprune.models.MLP",
        "jaxprune.models.lenet_300_100",
        "jaxprune.models.VGGSmall",
        "jaxprune.models.ResNet20",
        "jaxprune.models_llm.train_lm",
        "jaxprune.state.register_mask_state",
        "jaxprune.bitmask.PackedMask",
    ],
)
def test_user_facing_names_have_an_example(name):
    module, attr = name.rsplit(".", 1)
    doc = getattr(importlib.import_module(module), attr).__doc__ or ""
    assert "Examples:" in doc and ">>> " in doc


def test_internal_modules_declare_what_is_public():
    from jaxprune import bitmask, gates_layout, masks

    assert gates_layout.__all__ == []
    assert set(bitmask.__all__) == {"PackedMask", "pack", "unpack"}
    assert all(getattr(masks, n) is getattr(bitmask, n) for n in bitmask.__all__)
    # What other modules import from them by name stays importable.
    from jaxprune.bitmask import _has_packed  # noqa: F401
    from jaxprune.gates_layout import _aliases, _children, _parent_and_name, _set_child  # noqa: F401


# --- #6: the structured_global pages describe only the methods that ran --------------------


@pytest.mark.parametrize(
    "stem", ["structured_global", "structured_global_limits", "structured_global_mean"]
)
def test_structured_global_pages_render_from_their_json(structured, stem):
    result = json.loads((DOCS / f"{stem}.json").read_text())
    text = structured.render(result, png=f"{stem}.png")
    assert (DOCS / f"{stem}.md").read_text() == text
    assert result["args"]["method_list"] == ["one-shot", "one-shot + fine-tune"]
    assert "scratch" not in text and "gradual" not in text
    assert "pruned runs: 1 epoch from the dense model" in text


def test_structured_note_names_scratch_and_gradual_only_when_they_ran(structured):
    result = json.loads((DOCS / "structured_global.json").read_text())
    for methods, scratch, gradual in [
        (list(structured.METHODS), True, True),
        (["one-shot", "scratch"], True, False),
        (["gradual"], False, True),
        (["one-shot"], False, False),
    ]:
        result["args"]["method_list"] = methods
        note = structured._setup_text(result, result["args"])
        assert ("scratch: 3 epochs" in note) == scratch, methods
        assert ("the gradual schedule refreshes" in note) == gradual, methods
        tuned = {"one-shot + fine-tune", "gradual"} & set(methods)
        assert ("pruned runs:" in note) == bool(tuned), methods
