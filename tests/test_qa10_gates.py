"""QA round 10 on learned gates and the adversarial tools: grouped-conv input gates,
BetaBernoulli score precision, to_masks / unit_masks checks, anp_vs_step weights,
robustness inputs, vulnerability shapes, NaN inputs and JAX-scalar hyperparameters."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxprune import adversarial, gates
from jaxprune.gates_checks import _input_rows
from jaxprune.gates_tree import _gate_features

# --- 1. input gates on a grouped conv ----------------------------------------------------


class _GroupedNNX(nnx.Module):
    def __init__(self, rngs):
        self.c = nnx.Conv(4, 4, (3, 3), feature_group_count=2, rngs=rngs)
        self.d = nnx.Conv(4, 4, (3, 3), rngs=rngs)
        self.fc = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.fc(self.d(self.c(x)).mean((1, 2)))


def test_attach_refuses_input_gates_on_a_grouped_conv_at_attach_time(key):
    m = _GroupedNNX(nnx.Rngs(0))
    with pytest.raises(
        ValueError,
        match=r"inputs of 'c', an nnx.Conv with feature_group_count=2 .*"
        r"\(3, 3, 2, 4\).*Fix: gate its outputs instead \(leave it out of inputs=",
    ):
        gates.attach(m, gates.HardConcrete(), key=key, skip=("fc",), inputs=("c",))
    # Refused before any layer was wrapped.
    assert gates.gated_layers(m) == []
    # Its outputs, and an ungrouped conv's inputs, are fine.
    gates.attach(m, gates.HardConcrete(), key=key, skip=("fc",), inputs=("d",))
    m.eval()
    assert m(jnp.ones((2, 6, 6, 4))).shape == (2, 2)


def test_gated_refuses_input_gates_on_a_depthwise_conv(key):
    conv = nnx.Conv(4, 4, (3, 3), feature_group_count=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"feature_group_count=4.*not supported"):
        gates.Gated(conv, gates.BetaBernoulli(), key=key, inputs=True)
    y = gates.Gated(conv, gates.BetaBernoulli(), key=key)(jnp.ones((1, 5, 5, 4)))
    assert y.shape == (1, 5, 5, 4)


class _GroupedLinen(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Conv(4, (3, 3), feature_group_count=2, name="c")(x)
        return nn.Dense(2, name="fc")(h.mean((1, 2)))


def test_linen_apply_refuses_input_gates_on_a_grouped_conv():
    m, x = _GroupedLinen(), jnp.ones((2, 6, 6, 4))
    v = m.init(jax.random.key(0), x)
    gpi = gates.init_gates(
        gates.HardConcrete(), v["params"], where=lambda p, a: p == ("c", "kernel"), inputs=True
    )
    with pytest.raises(
        ValueError, match=r"'c/kernel', a Conv with feature_group_count=2.*Fix: gate a grouped"
    ):
        gates.linen_apply(gates.HardConcrete(), m, v, {}, x, input_gate_params=gpi)


def test_input_gate_mismatch_messages_mention_grouped_convs():
    # One gate per real input channel (4) on a grouped conv's kernel with 2 rows.
    with pytest.raises(ValueError, match=r"grouped or depthwise conv \(feature_group_count=2\)"):
        _input_rows("c/kernel", jnp.ones(4), (3, 3, 2, 4))
    with pytest.raises(ValueError, match=r"feature_group_count=2.*Fix: gate inputs only"):
        _gate_features(jnp.ones((1, 5, 5, 4)), jnp.ones(2), "'c'", "nn.Conv")
    # Not a multiple: no grouped hint.
    with pytest.raises(ValueError) as e:
        _gate_features(jnp.ones((1, 5)), jnp.ones(3), "'fc'", "nn.Dense")
    assert "grouped" not in str(e.value)
    # A Dense kernel is never grouped.
    with pytest.raises(ValueError) as e:
        _input_rows("fc/kernel", jnp.ones(4), (2, 3))
    assert "grouped" not in str(e.value)


def test_init_gates_documents_grouped_convs():
    assert "feature_group_count" in gates.init_gates.__doc__


# --- 2. BetaBernoulli score precision -----------------------------------------------------


def test_beta_bernoulli_score_is_monotone_in_float32_for_small_a():
    g = gates.BetaBernoulli()
    ga = jnp.linspace(-14.0, -6.0, 2001)
    gp = {"gate_a": ga, "gate_b": jnp.full_like(ga, 0.5413249)}
    s = np.asarray(g.score(gp))
    assert s.dtype == np.float32
    assert np.all(np.diff(s) > 0)
    # log E[pi] = log(b B(1 + 1/a, b)); for b = 1 (here softplus(0.5413249)) it is
    # log(a / (a + 1)).
    a, b = (np.asarray(v, np.float64) for v in g.ab(gp))
    np.testing.assert_allclose(b, 1.0, atol=1e-5)
    np.testing.assert_allclose(s, np.log(a / (a + 1)), atol=2e-5)


def test_expected_keep_probability_for_tiny_a():
    for a in (1e-4, 1e-5, 1e-6):
        got = float(gates.expected_keep_probability(a, 1.0))
        assert got == pytest.approx(a / (a + 1), rel=1e-5)


def test_unit_masks_sparsity_keeps_the_unit_with_larger_expected_keep_probability():
    gp = {"l/kernel": {"gate_a": jnp.array([-13.996, -13.992]), "gate_b": jnp.full(2, 0.5413249)}}
    keep = gates.unit_masks(gates.BetaBernoulli(), gp, sparsity=0.5)
    assert keep["l/kernel"].tolist() == [False, True]


# --- 3. to_masks / unit_masks checks ----------------------------------------------------


@pytest.fixture
def params():
    return {
        "fc": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)},
        "out": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)},
    }


def test_to_masks_and_unit_masks_refuse_another_kinds_params(params):
    hc = gates.init_gates(gates.HardConcrete(), params, where=lambda p, x: p == ("fc", "kernel"))
    with pytest.raises(ValueError, match=r"ScalarGate has \['gate_scale'\].*another gate kind"):
        gates.to_masks(gates.ScalarGate(), hc, params)
    with pytest.raises(ValueError, match=r"BetaBernoulli has \['gate_a', 'gate_b'\]"):
        gates.unit_masks(gates.BetaBernoulli(), hc)
    hci = gates.init_gates(
        gates.HardConcrete(), params, where=lambda p, x: p == ("fc", "kernel"), inputs=True
    )
    sg = gates.init_gates(gates.ScalarGate(), params, where=lambda p, x: p == ("fc", "kernel"))
    with pytest.raises(ValueError, match=r"another gate kind"):
        gates.to_masks(gates.ScalarGate(), sg, params, input_gate_params=hci)


@pytest.mark.parametrize("n", [1, 3])
def test_to_masks_refuses_gate_vectors_of_the_wrong_length(params, n):
    bad = {"fc/kernel": {"gate_log_alpha": jnp.full(n, -10.0)}}
    with pytest.raises(
        ValueError, match=rf"gate_params\['fc/kernel'\] is \{{'gate_log_alpha': \({n},\)\}}"
    ):
        gates.to_masks(gates.HardConcrete(), bad, params)
    with pytest.raises(ValueError, match=r"has \{'gate_log_alpha': \(4,\)\}"):
        gates.unit_masks(gates.HardConcrete(), bad, params)


def test_to_masks_refuses_gates_sized_as_inputs_and_input_gates_sized_as_outputs(params):
    wrong = {"out/kernel": {"gate_log_alpha": jnp.full(4, 10.0)}}
    with pytest.raises(ValueError, match=r"on that layer's kernel \(4, 2\) has"):
        gates.to_masks(gates.HardConcrete(), wrong, params)
    wrong_in = {"fc/kernel": {"gate_log_alpha": jnp.full(4, 10.0)}}
    with pytest.raises(
        ValueError,
        match=r"input gates of 'fc/kernel' have 4 features, but its kernel has shape \(3, 4\)"
        r".*inputs=True",
    ):
        gates.to_masks(gates.HardConcrete(), {}, params, input_gate_params=wrong_in)
    # A gate vector of the right length but the wrong rank.
    wrong_rank = {"fc/kernel": {"gate_log_alpha": jnp.full((3, 2), 10.0)}}
    with pytest.raises(
        ValueError,
        match=r"input_gate_params\['fc/kernel'\] is \{'gate_log_alpha': \(3, 2\)\}, but "
        r"HardConcrete on the inputs \(axis -2\) of that layer's kernel \(3, 4\) has "
        r"\{'gate_log_alpha': \(3,\)\}",
    ):
        gates.unit_masks(gates.HardConcrete(), {}, params, input_gate_params=wrong_rank)


def test_to_masks_still_matches_for_right_gates(params):
    g = gates.HardConcrete()
    gp = {"fc/kernel": {"gate_log_alpha": jnp.array([-10.0, 10.0, 10.0, 10.0])}}
    gpi = {"out/kernel": {"gate_log_alpha": jnp.array([10.0, -10.0, 10.0, 10.0])}}
    m = gates.to_masks(g, gp, params, input_gate_params=gpi)
    assert m["fc"]["bias"].tolist() == [False, True, True, True]
    assert m["fc"]["kernel"][:, 0].tolist() == [False] * 3
    assert m["out"]["kernel"][1].tolist() == [False, False]
    assert bool(m["out"]["kernel"][0].all())


def test_unit_masks_grouped_conv_hint_for_input_gates():
    params = {"c": {"kernel": jnp.ones((3, 3, 2, 4)), "bias": jnp.zeros(4)}}
    gpi = {"c/kernel": {"gate_log_alpha": jnp.full(4, 3.0)}}
    with pytest.raises(ValueError, match=r"feature_group_count=2.*Fix: .*grouped conv's outputs"):
        gates.unit_masks(gates.HardConcrete(), {}, params, input_gate_params=gpi)


# --- 4. anp_vs_step weights and num_train ------------------------------------------------


def _apply(p, x, key):
    return x @ p["w"], [x @ p["w"]]


def _pen(p):
    return jnp.sum(p["gate_s"] ** 2)


KW = dict(eps=0.1, step_size=0.05, steps=1)


@pytest.mark.parametrize("name", ["beta", "lam", "adv_weight"])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_anp_vs_step_refuses_non_finite_weights(name, value):
    with pytest.raises(ValueError, match=rf"{name} must be a finite number >= 0, got -?(inf|nan)"):
        adversarial.anp_vs_step(_apply, _pen, optax.sgd(0.1), num_train=10, **KW, **{name: value})


def test_adversarial_step_refuses_infinite_penalty_weight():
    with pytest.raises(ValueError, match=r"penalty_weight must be a finite number >= 0, got inf"):
        adversarial.adversarial_step(
            _apply, optax.sgd(0.1), penalty_fn=_pen, penalty_weight=float("inf"), **KW
        )


@pytest.mark.parametrize("n", [1.5, 10.0, "10", True, 0, -3])
def test_anp_vs_step_num_train_must_be_a_positive_int(n):
    with pytest.raises(ValueError, match=r"num_train must be >= 1, an int .*Fix: pass len"):
        adversarial.anp_vs_step(_apply, _pen, optax.sgd(0.1), num_train=n, **KW)


def test_anp_vs_step_num_train_accepts_numpy_and_jax_ints():
    p = {"w": jnp.eye(3), "gate_s": jnp.ones(3)}
    x, y = jnp.full((2, 3), 0.5), jnp.array([0, 1])
    tx = optax.sgd(0.1)
    out = []
    for n in (10, np.int64(10), jnp.int32(10)):
        step = adversarial.anp_vs_step(_apply, _pen, tx, num_train=n, **KW)
        p1, _, m = step(p, tx.init(p), x, y, jax.random.key(0))
        assert all(bool(jnp.isfinite(v).all()) for v in p1.values())
        out.append(p1)
    for other in out[1:]:
        for k in p:
            np.testing.assert_array_equal(other[k], out[0][k])


# --- 5. robustness with x as a nested list -----------------------------------------------


def test_robustness_accepts_x_as_a_nested_list():
    w = jnp.array([[1.0, -1.0], [-1.0, 1.0]])

    def apply_fn(w, x, key):
        logits = x @ w
        return logits, [logits]

    x, y = np.array([[0.6, 0.4], [0.1, 0.9]]), np.array([0, 1])
    kw = dict(eps=0.2, step_size=0.05, steps=10, key=jax.random.key(0))
    want = adversarial.robustness(apply_fn, w, x, y, **kw)
    assert adversarial.robustness(apply_fn, w, x.tolist(), y.tolist(), **kw) == want
    assert want["clean_acc"] == 1.0


# --- 6. vulnerability shapes, NaN x, JAX scalar hyperparameters --------------------------


def test_vulnerability_names_the_feature_with_mismatched_shapes():
    a, b = [jnp.zeros(2), jnp.zeros((2, 3))], [jnp.zeros(2), jnp.zeros((2, 4))]
    with pytest.raises(
        ValueError,
        match=r"features\[1\] of shape \(2, 3\) with features_adv\[1\] of shape \(2, 4\)",
    ):
        adversarial.vulnerability(a, b)
    assert float(adversarial.vulnerability([jnp.zeros(2)], [jnp.ones(2)])) == 1.0


def test_attacks_refuse_nan_in_x():
    x = np.full((2, 3), 0.5, np.float32)
    x[0, 1] = np.nan
    y = np.array([0, 1])
    run = adversarial.attack(_apply, **KW)
    p = {"w": jnp.eye(3)}
    with pytest.raises(ValueError, match=r"x holds 1 NaN values \(of 6\).*Fix: drop"):
        run(p, x, y, jax.random.key(0))
    with pytest.raises(ValueError, match=r"NaN"):
        adversarial.pgd(lambda z: jnp.sum(z, -1), jnp.asarray(x), **KW)


def test_gate_hyperparameters_accept_concrete_jax_scalars():
    g = gates.HardConcrete(beta=jnp.float32(0.5))
    assert g == gates.HardConcrete(beta=0.5) and isinstance(g.beta, float)
    assert hash(g) == hash(gates.HardConcrete(beta=0.5))
    assert gates.BetaBernoulli(alpha=jnp.array(1e-3)).alpha == pytest.approx(1e-3)
    assert gates.ScalarGate(target=np.array(0.3)).target == pytest.approx(0.3)
    assert gates.VariationalDropout(threshold=jnp.int32(2)).threshold == 2.0
    with pytest.raises(
        ValueError, match=r"beta must be a finite real number, got Array.* \(a Python or NumPy"
    ):
        gates.HardConcrete(beta=jnp.array([0.5, 0.5]))
    with pytest.raises(ValueError, match=r"beta must be > 0"):
        gates.HardConcrete(beta=jnp.float32(0.0))
    with pytest.raises(ValueError, match=r"finite real number"):
        jax.jit(lambda b: gates.HardConcrete(beta=b).beta)(0.5)


# --- layers held in a dict or a tuple ----------------------------------------------------


class _DictHeld(nnx.Module):
    def __init__(self, rngs):
        self.blocks = nnx.data({"a": nnx.Linear(4, 5, rngs=rngs), "b": nnx.Linear(5, 3, rngs=rngs)})

    def __call__(self, x):
        return self.blocks["b"](self.blocks["a"](x))


class _TupleHeld(nnx.Module):
    def __init__(self, rngs):
        self.blocks = nnx.data((nnx.Linear(4, 5, rngs=rngs), nnx.Linear(5, 3, rngs=rngs)))

    def __call__(self, x):
        return self.blocks[1](self.blocks[0](x))


def test_attach_and_detach_layers_held_in_a_dict(key):
    model = _DictHeld(nnx.Rngs(0))
    gates.attach(model, gates.ScalarGate(), key=key, skip=("blocks/b",))
    assert [p for p, _ in gates.gated_layers(model)] == [("blocks", "a")]
    assert isinstance(model.blocks["a"], gates.Gated)
    x = jax.random.normal(key, (3, 4))
    model.eval()
    plain = gates.detach(model)
    assert isinstance(plain.blocks["a"], nnx.Linear) and gates.gated_layers(plain) == []
    np.testing.assert_allclose(plain(x), model(x), rtol=1e-6, atol=1e-6)


def test_attach_refuses_a_layer_in_a_tuple_before_wrapping_any(key):
    model = _TupleHeld(nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"'blocks/1' is item 1 of a tuple.*Fix: hold the layers"):
        gates.attach(model, gates.ScalarGate(), key=key, where=lambda p, m: p[-1] == 1)
    with pytest.raises(ValueError, match=r"'blocks/0' is item 0 of a tuple"):
        gates.attach(model, gates.ScalarGate(), key=key)
    assert gates.gated_layers(model) == []  # nothing half-wrapped
