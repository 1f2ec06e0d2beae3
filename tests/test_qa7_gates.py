"""QA round 7 on gates: gates before BatchNorm, misuse messages, reseed in attach's docs,
slimming's default scales."""

import doctest
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxprune import gates
from jaxprune.models import MLP, VGGSmall

# --- gates before a BatchNorm (finding 1) -----------------------------------------------


class ConvBN(nnx.Module):
    """conv -> BN -> relu -> pool -> fc -> out: conv's gates feed a BatchNorm, fc's do not."""

    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 8, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.fc = nnx.Linear(8, 16, rngs=rngs)
        self.ln = nnx.LayerNorm(16, rngs=rngs)  # a LayerNorm does not divide a unit's gate out
        self.out = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.relu(self.bn(self.conv(x))).mean((1, 2))
        return self.out(jax.nn.relu(self.ln(self.fc(h))))


X = jax.random.uniform(jax.random.key(0), (8, 6, 6, 1))


@pytest.mark.parametrize("make", [gates.HardConcrete, gates.BetaBernoulli, gates.ScalarGate])
def test_attach_warns_when_shared_gates_feed_a_batchnorm(make):
    with pytest.warns(gates.GateBeforeBatchNormWarning, match=r"\['conv'\].*\['bn'\]") as rec:
        gates.attach(ConvBN(nnx.Rngs(0)), make(), key=jax.random.key(1), skip=("out",))
    assert len(rec) == 1 and "'fc'" not in str(rec[0].message)  # fc feeds a LayerNorm
    fix = "per_example=True" if make is not gates.ScalarGate else "inputs="
    assert fix in str(rec[0].message)


def test_no_batchnorm_warning_where_the_batchnorm_cannot_divide_the_gate_out():
    # Warnings are errors here: none of these may warn.
    for gate in (gates.HardConcrete(per_example=True), gates.VariationalDropout()):
        gates.attach(ConvBN(nnx.Rngs(0)), gate, key=jax.random.key(1), skip=("out",))
    # The fix the warning gives: gate after the BatchNorm, through fc's input features.
    m = gates.attach(
        ConvBN(nnx.Rngs(0)), gates.ScalarGate(), key=jax.random.key(1), skip=("out", "conv"),
        inputs=("fc",),
    )  # fmt: skip
    m.train()
    gates.reseed(m, jax.random.key(2))
    a = m(X)
    m.fc.gate_in_scale.set_value(jnp.linspace(0.05, 1.0, 8))
    assert float(jnp.abs(m(X) - a).max()) > 1e-2  # the gates after the BN act on the output
    # A frozen BatchNorm: the documented filter silences it.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=gates.GateBeforeBatchNormWarning)
        gates.attach(ConvBN(nnx.Rngs(0)), gates.ScalarGate(), key=jax.random.key(1))


def test_shared_scalar_gates_before_batchnorm_do_not_move_the_train_mode_output():
    # What the warning is about, measured: the BN divides the conv's per-channel gate out.
    # The same gate values after the BN (fc's input gates) move it a hundredfold more.
    with pytest.warns(gates.GateBeforeBatchNormWarning):
        m = gates.attach(
            ConvBN(nnx.Rngs(0)), gates.ScalarGate(), key=jax.random.key(1), inputs=("fc",)
        )
    m.train()
    a = m(X)
    m.conv.gate_scale.set_value(jnp.linspace(0.05, 1.0, 8))
    before = float(jnp.abs(m(X) - a).max())  # 0.006: BN's epsilon, nothing else
    m.conv.gate_scale.set_value(jnp.ones(8))
    m.fc.gate_in_scale.set_value(jnp.linspace(0.05, 1.0, 8))
    after = float(jnp.abs(m(X) - a).max())  # 0.54
    assert before < 0.02 * after


def test_batchnorm_layouts_found_without_false_alarms():
    seq = nnx.Sequential(
        nnx.Linear(4, 6, rngs=nnx.Rngs(0)),
        jax.nn.relu,
        nnx.BatchNorm(6, rngs=nnx.Rngs(0)),
        nnx.Linear(6, 3, rngs=nnx.Rngs(0)),
    )
    with pytest.warns(gates.GateBeforeBatchNormWarning, match=r"\['layers/0'\].*\['layers/2'\]"):
        gates.attach(seq, gates.HardConcrete(), key=jax.random.key(0), skip=("layers/3",))
    # VGG keeps its convs and BatchNorms in two lists: convs[i] feeds bns[i].
    vgg = VGGSmall(rngs=nnx.Rngs(0), cfg=(4, "M", 6), image_size=8)
    with pytest.warns(gates.GateBeforeBatchNormWarning, match=r"\['convs/0', 'convs/1'\]"):
        gates.attach(vgg, gates.ScalarGate(), key=jax.random.key(0), skip=("fc2",))
    # A BatchNorm of another width, or one that a layer in between separates: no warning.
    for widths in ((6, 5), (6, 6)):
        layers = [nnx.Linear(4, 6, rngs=nnx.Rngs(0))]
        if widths[1] == 6:
            layers.append(nnx.Linear(6, 6, rngs=nnx.Rngs(0)))
        layers.append(nnx.BatchNorm(widths[1], rngs=nnx.Rngs(0)))
        gates.attach(
            nnx.Sequential(*layers),
            gates.HardConcrete(),
            key=jax.random.key(0),
            where=lambda p, m: p == ("layers", 0),
        )


# --- misuse messages (finding 7) --------------------------------------------------------


def _gated_mlp():
    m = MLP((4, 3, 2), rngs=nnx.Rngs(0))
    return gates.attach(m, gates.HardConcrete(), key=jax.random.key(0))


def test_attach_on_a_gated_model_says_it_is_gated():
    m = _gated_mlp()
    with pytest.raises(ValueError, match=r"already gated \(\['layers/0', 'layers/1'\].*detach"):
        gates.attach(m, gates.BetaBernoulli(), key=jax.random.key(0))
    # Nothing selected on a model that has gates elsewhere: the old message still fits.
    part = MLP((4, 3, 2), rngs=nnx.Rngs(0))
    gates.attach(part, gates.HardConcrete(), key=jax.random.key(0), skip=("layers/1",))
    with pytest.raises(ValueError, match=r"no layer to gate\. Fix: check `where` and `skip`"):
        gates.attach(part, gates.HardConcrete(), key=jax.random.key(0), where=lambda p, m: False)


@pytest.mark.parametrize("name", ["layers/1", "layers/1/module"])
def test_inputs_naming_a_gated_layer_says_it_is_gated(name):
    m = _gated_mlp()
    with pytest.raises(ValueError, match=rf"inputs names \['{name}'\], which are already gated"):
        gates.attach(
            m, gates.HardConcrete(), key=jax.random.key(0), where=lambda p, m: False, inputs=(name,)
        )


def test_hard_masks_without_gates_says_attach_first():
    plain = gates.detach(_gated_mlp())
    with pytest.raises(ValueError, match=r"no gated layer.*attach gates first.*not hard_masks"):
        gates.hard_masks(plain)


# --- reseed in attach's example (finding 8) ---------------------------------------------


def test_attach_docstring_shows_reseed_and_the_fixed_sample_without_it():
    doc = gates.attach.__doc__
    assert "gates.reseed(model, key)" in doc and "same sample" in doc
    finder = doctest.DocTestFinder()
    (test,) = finder.find(gates.attach, "attach", globs={})
    # The example (run by --doctest-modules) reseeds inside a jitted step.
    assert any("gates.reseed(model, key)" in ex.source for ex in test.examples)


# --- slimming's default scales (finding 9) ----------------------------------------------


def _small_ln_scales(model):
    model.ln.scale.set_value(jnp.linspace(0.01, 0.5, 16))  # LN scales below every BN scale
    return model


def test_slimming_defaults_to_batchnorm_scales_when_the_tree_has_statistics():
    m = _small_ln_scales(ConvBN(nnx.Rngs(0)))
    full = nnx.state(m)  # Params and BatchStats: the BN's mean/var sit beside its scale
    assert float(gates.slimming_penalty(full)) == pytest.approx(8.0)
    masks = gates.slimming_masks(full, 0.5)
    assert int((~masks["bn"]["scale"]).sum()) == 4 and bool(masks["ln"]["scale"].get_value())
    # Params only: no statistics to tell the norms apart; the documented where does.
    params = nnx.state(m, nnx.Param)
    assert float(gates.slimming_penalty(params)) > 8.0
    bns = {p for p, mod in nnx.iter_modules(m) if isinstance(mod, nnx.BatchNorm)}

    def where(p, x):
        return p[-1] == "scale" and tuple(p[:-1]) in bns

    assert float(gates.slimming_penalty(params, where=where)) == pytest.approx(8.0)
    assert int((~gates.slimming_masks(params, 0.5, where=where)["bn"]["scale"]).sum()) == 4


class LinenBNLN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.BatchNorm(use_running_average=not train)(nn.Dense(4)(x))
        return nn.LayerNorm()(nn.Dense(6)(x))


def test_slimming_on_linen_variables_takes_the_batchnorm_scales():
    v = LinenBNLN().init(jax.random.key(0), jnp.ones((2, 3)))
    v = jax.tree.map(lambda x: x, v)
    v["params"]["LayerNorm_0"]["scale"] = jnp.full(6, 0.01)
    assert float(gates.slimming_penalty(v)) == pytest.approx(4.0)  # params + batch_stats
    masks = gates.slimming_masks(v, 0.5)
    assert int((~masks["params"]["BatchNorm_0"]["scale"]).sum()) == 2
    assert bool(masks["params"]["LayerNorm_0"]["scale"])
    # variables["params"] alone: every 1-D scale, unless where= keeps to the BatchNorms.
    params = v["params"]
    np.testing.assert_allclose(gates.slimming_penalty(params), 4.06, rtol=1e-6)

    def where(p, x):
        return p[-1] == "scale" and "BatchNorm" in str(p[-2])

    assert float(gates.slimming_penalty(params, where=where)) == pytest.approx(4.0)
