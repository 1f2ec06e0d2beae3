"""examples/structured_training.py: a BatchNorm CNN channel-pruned under nnx.Optimizer, shrunk."""

import json
import re

import pytest

from tests._examples import load_example


@pytest.fixture(scope="module")
def example():
    return load_example("structured_training")


def test_quick_run_prunes_exact_channel_counts_and_writes_its_report(example, tmp_path, capsys):
    out = tmp_path / "docs" / "run.md"
    result = example.main(["--quick", "--dataset", "digits", "--out", str(out)])
    rows = result["rows"]
    assert [r["method"] for r in rows] == ["dense", *example.METHODS]
    dense = rows[0]
    assert dense["widths"] == [[32, 64, 128], 128]
    for r in rows[1:]:
        # Half the channels of every prunable group, from every method: the masks
        # chosen inside the jitted train step shrink to exactly those widths.
        assert r["sparsity"] == 0.5 and r["widths"] == [[16, 32, 64], 64]
        assert r["params"] < dense["params"] / 3 and r["mac_reduction"] > 3
        assert 0.0 <= r["accuracy"] <= 100.0 and r["ms"] > 0
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows))
    assert out.with_suffix(".png").stat().st_size > 0
    assert "| gradual | 50% |" in out.read_text()
    # Written outside the repository's docs/: the page records the path as given.
    assert f"--out {out}`" in out.read_text()
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("RESULT ") and "gradual 0.5" in json.loads(last[len("RESULT ") :])


def test_global_scope_with_limits_keeps_capped_multiples_of_eight(example, capsys):
    argv = ["--quick", "--dataset", "digits", "--sparsities", "0.75", "--scope", "global"]
    argv += ["--max-sparsity", "0.6", "--round-to", "8", "--normalize", "mean"]
    argv += ["--methods", "one-shot + fine-tune"]
    result = example.main(argv)
    assert [r["method"] for r in result["rows"]] == ["dense", "one-shot + fine-tune"]
    convs, hidden = result["rows"][1]["widths"]
    for kept, channels in zip([*convs, hidden], [32, 64, 128, 128], strict=True):
        assert kept % 8 == 0 and channels - int(0.6 * channels) <= kept <= channels
    assert result["args"]["scope"] == "global"
    text = example.render(result)
    assert "--scope global --max-sparsity 0.6 --round-to 8 --normalize mean" in text
    assert "No group loses more than 60% of its channels." in text
    capsys.readouterr()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--methods", "gradual,lottery"], "--methods must be a comma-separated subset of"),
        (["--max-sparsity", "1.2"], r"--max-sparsity must lie in \[0, 1\], got 1.2"),
        (["--round-to", "0"], "--round-to must be >= 1, got 0"),
        (["--sparsities", "0.5,1.5"], r"--sparsities must lie in \(0, 1\), got \[1.5\]"),
        (["--sparsities", "half"], "--sparsities must be comma-separated floats, got 'half'"),
        (["--finetune-epochs", "0"], "--finetune-epochs must be >= 1, got 0"),
    ],
)
def test_bad_flags_name_the_flag_and_value(example, argv, message, capsys):
    with pytest.raises(SystemExit):
        example.parse_args(argv)
    assert re.search(message, capsys.readouterr().err)
