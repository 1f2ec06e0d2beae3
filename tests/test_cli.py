"""The command line: inspect, export, bench; one-line errors, never a traceback."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

import jaxprune as jp
from jaxprune import checkpoint, cli


@pytest.fixture
def run_dir(tmp_path):
    params = {
        "dense": {
            "kernel": jax.random.normal(jax.random.key(0), (64, 32)),
            "bias": np.zeros(32, np.float32),
        }
    }
    tx = jp.prune(optax.sgd(0.1), sparsity=0.9)
    state = tx.init(params)
    grads = jax.tree.map(np.zeros_like, params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    checkpoint.save(tmp_path / "run", 10, params, state)
    return tmp_path / "run"


def test_inspect_prints_the_report_without_model_code(run_dir, capsys):
    assert cli.main(["inspect", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "step 10, dense format" in out and "dense/kernel" in out and "89.99%" in out


def test_inspect_json_and_plot(run_dir, capsys, tmp_path):
    assert cli.main(["inspect", str(run_dir), "--json", "--plot", str(tmp_path / "s.png")]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = {r["path"]: r for r in data["rows"]}
    assert rows["dense/kernel"]["nonzeros"] == 64 * 32 - round(0.9 * 64 * 32)
    assert data["checkpoint"]["step"] == 10 and (tmp_path / "s.png").exists()


def test_export_compressed_then_inspect(run_dir, tmp_path, capsys):
    out = tmp_path / "small"
    assert cli.main(["export", str(run_dir), str(out), "--format", "compressed"]) == 0
    assert "wrote" in capsys.readouterr().out
    ckpt = checkpoint.restore(out)
    orig = checkpoint.restore(run_dir)
    assert ckpt.format == "compressed" and ckpt.step == 10 and ckpt.opt_state is None
    assert ckpt.params["dense"]["kernel"].tobytes() == orig.params["dense"]["kernel"].tobytes()
    np.testing.assert_array_equal(ckpt.masks["dense"]["kernel"], orig.masks["dense"]["kernel"])
    assert cli.main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"]["format"] == "compressed"


def test_missing_and_corrupt_checkpoints_exit_1_with_one_line(tmp_path, run_dir, capsys):
    assert cli.main(["inspect", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("jaxprune: error: no checkpoint at") and err.count("\n") == 1
    meta = run_dir / "10" / "meta" / "metadata"
    meta.write_text(meta.read_text()[:50])
    assert cli.main(["export", str(run_dir), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "missing, truncated or corrupt" in err and err.count("\n") == 1


def test_command_line_process_prints_no_traceback(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "jaxprune", "inspect", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "jaxprune: error: no checkpoint" in proc.stderr


def test_orbax_log_lines_stay_out_of_the_one_line_error(run_dir):
    # A damaged orbax metadata file makes orbax log through absl (ERROR:absl:...)
    # before jaxprune's own error: the command silences it, in a real process.
    (run_dir / "10" / "_CHECKPOINT_METADATA").write_text("garbage")
    meta = run_dir / "10" / "meta" / "metadata"
    meta.write_text("{")
    proc = subprocess.run(
        [sys.executable, "-m", "jaxprune", "inspect", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("jaxprune: error: cannot read the metadata of")


def test_step_directories_not_written_by_jp_save_are_named(tmp_path, capsys):
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(tmp_path / "plain") as mngr:
        mngr.save(2, args=ocp.args.StandardSave({"w": np.ones(3, np.float32)}))
        mngr.wait_until_finished()
    assert cli.main(["inspect", str(tmp_path / "plain")]) == 1
    err = capsys.readouterr().err
    assert "its step directories (2) were not written by jp.save" in err and err.count("\n") == 1


def test_bench_lists_runs_and_explains_a_missing_scripts_folder(tmp_path, monkeypatch, capsys):
    (tmp_path / "bench_fast.py").write_text("import sys; print('ran', sys.argv[1:])")
    monkeypatch.setattr(cli, "scripts_dir", lambda: tmp_path)
    assert cli.main(["bench", "--list"]) == 0
    assert "fast" in capsys.readouterr().out
    # The script runs in a child process; its output goes to the inherited stdout.
    assert cli.main(["bench", "fast", "--repeats", "1"]) == 0
    assert cli.main(["bench", "slow"]) == 1
    assert "no benchmark 'slow'" in capsys.readouterr().err
    monkeypatch.setattr(cli, "scripts_dir", lambda: None)
    assert cli.main(["bench"]) == 1
    assert "scripts/ folder of a source checkout" in capsys.readouterr().err


def test_scripts_folder_of_this_checkout_is_found():
    folder = cli.scripts_dir()
    assert folder is not None and (folder / "bench_checkpoint.py").exists()


def test_bench_runs_every_script_after_a_failure(tmp_path, monkeypatch):
    (tmp_path / "bench_a.py").write_text("import sys; sys.exit(3)")
    (tmp_path / "bench_b.py").write_text(f"open({str(tmp_path / 'b_ran')!r}, 'w').close()")
    monkeypatch.setattr(cli, "scripts_dir", lambda: tmp_path)
    assert cli.main(["bench"]) == 3  # the first failure's status
    assert (tmp_path / "b_ran").exists()


def test_demo_rejects_a_bad_sparsity_before_training(capsys):
    assert cli.main(["demo", "--sparsity", "1.5", "--dataset", "digits", "--quick"]) == 1
    err = capsys.readouterr().err
    assert "--sparsity must be in [0, 1]" in err and "Traceback" not in err
    assert cli.main(["demo", "--epochs", "0", "--dataset", "digits"]) == 1
    assert "--epochs must be >= 1" in capsys.readouterr().err


def test_export_errors_are_one_line(run_dir, tmp_path, capsys):
    out = tmp_path / "small"
    assert cli.main(["export", str(run_dir), str(out)]) == 0
    capsys.readouterr()
    # The step exists already: refused, in one line.
    assert cli.main(["export", str(run_dir), str(out)]) == 1
    err = capsys.readouterr().err
    assert "step 10 is already saved" in err and err.count("\n") == 1
    (tmp_path / "file").write_text("x")
    assert cli.main(["export", str(run_dir), str(tmp_path / "file")]) == 1
    err = capsys.readouterr().err
    assert "is a file, not a directory" in err and err.count("\n") == 1


def test_inspect_plot_into_a_new_folder(run_dir, tmp_path, capsys):
    plot = tmp_path / "new" / "dir" / "s.png"
    assert cli.main(["inspect", str(run_dir), "--plot", str(plot)]) == 0
    assert plot.exists()
    assert cli.main(["inspect", str(run_dir), "--plot", str(tmp_path / "s.notaformat")]) == 1
    assert "cannot write the plot" in capsys.readouterr().err


def test_demo_on_damaged_fashion_mnist_files_fails_in_one_line_naming_the_fallback(
    tmp_path, monkeypatch, capsys
):
    from jaxprune import data

    for pair in data._FASHION_FILES.values():
        for name in pair:
            (tmp_path / name).write_bytes(b"not gzip")
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", str(tmp_path))
    assert cli.main(["demo", "--dataset", "fashion-mnist", "--quick"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("jaxprune: error: ") and err.count("\n") == 1
    assert "cannot be read as gzip" in err and err.rstrip().endswith("Or run --dataset digits.")
