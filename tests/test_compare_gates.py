"""scripts/compare_gates.py --quick: every gate method trains, prunes and is measured."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

import jaxprune.data

_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "compare_gates.py"

pytestmark = pytest.mark.skipif(
    not jaxprune.data.fashion_mnist_available(), reason="Fashion-MNIST is not installed"
)


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("compare_gates", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_reports_every_method_sparser_and_well_above_chance(script):
    # Its own process, with XLA's default backend optimizations: the --quick run
    # trains for ~2,000 steps in all, which the suite's -O0 (tests/conftest.py)
    # slows by a quarter (52 s against 42 s), more than it saves in compile time.
    flags = os.environ.get("XLA_FLAGS", "").replace("--xla_backend_optimization_level=0", "")
    proc = subprocess.run(
        # Warnings are errors, as in the suite (tests/conftest.py).
        [sys.executable, "-W", "error", "-W", "ignore::DeprecationWarning"]
        + ["-W", "ignore::FutureWarning", str(_SCRIPT), "--quick"],
        capture_output=True,
        text=True,
        env=dict(os.environ, XLA_FLAGS=flags.strip()),
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    r = json.loads(line.removeprefix("RESULT "))
    assert set(script.METHODS) <= set(r)
    for m in script.METHODS:
        assert r[m]["acc"] > 50.0, (m, r[m])  # chance is 10%
        assert r[m]["speedup"] >= 1.0
    for m in script.GATE_METHODS:
        assert r[m]["compression"] > 1.5, (m, r[m])
        # Magnitude was pruned to the size the gates reached (more only where
        # whole units died and the shrink removed them).
        assert r[f"magnitude @ {m}"]["compression"] >= 0.95 * r[m]["compression"]
    assert r["dense"]["compression"] == 1.0
    assert r["dense"]["units"] == [784, 300, 100]
    # Unit gates remove whole neurons (the shrunk widths); the per-weight VD need not.
    for m in ("L0 (hard-concrete)", "beta-Bernoulli"):
        assert sum(r[m]["units"]) < 784 + 300 + 100
    # Scalar gates keep exactly the budget: target 0.2 of the 400 hidden units.
    assert sum(r["scalar gates"]["units"][1:]) == 80
