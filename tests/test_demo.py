"""The demo runs end to end (short) and reports what it measured."""

import io

from rich.console import Console

from jaxprune import cli, demo


def test_demo_quick_runs_and_prunes():
    out = io.StringIO()
    r = demo.run(dataset="digits", quick=True, console=Console(file=out, width=120))
    assert abs(r["sparsity"] - 0.9) < 0.01
    assert r["params_nonzero"] < 0.15 * r["params_total"]
    assert r["compressed_bytes"] < 0.2 * r["dense_bytes"]
    assert 0.0 <= r["pruned_accuracy"] <= 1.0 and r["dense_accuracy"] > 0.5
    text = out.getvalue()
    assert "dense" in text and "pruned" in text and "layers/0/kernel" in text


def test_cli_parser_has_demo():
    args = cli.build_parser().parse_args(["demo", "--quick", "--dataset", "digits"])
    assert args.quick and args.dataset == "digits"


def test_help_of_every_subcommand_renders(capsys):
    import pytest

    for argv in (
        ["--help"],
        ["demo", "--help"],
        ["inspect", "--help"],
        ["export", "--help"],
        ["bench", "--help"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 0
        assert "usage: jaxprune" in capsys.readouterr().out
