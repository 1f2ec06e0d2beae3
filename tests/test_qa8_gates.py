"""QA round 8 on the functional gates: DenseGeneral biases, [out, in] layouts, bias names,
linen_apply on an nn.Embed gate."""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune as jp
from jaxprune import gates

# --- a DenseGeneral / attention projection's [heads, head_dim] bias (linen #1) ------------


class Att(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(x)


def test_densegeneral_bias_is_gated_as_linen_apply_gates_it():
    x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    m = Att()
    p = m.init(jax.random.key(1), x)["params"]
    p = jax.tree.map(lambda a: a + 0.5, p)  # nonzero biases, as after training
    g = gates.HardConcrete()
    gp = gates.init_gates(g, p, where=lambda path, a: path[-1] == "kernel" and "query" in path)
    (name,) = gp
    assert name == "MultiHeadDotProductAttention_0/query/kernel"
    assert gp[name]["gate_log_alpha"].shape == (4,)  # head_dim units, shared by the 2 heads
    gp = {name: {"gate_log_alpha": jnp.array([-10.0, 10.0, 10.0, 10.0])}}  # close unit 0

    folded = gates.apply_gates(g, p, gp)
    bias = folded["MultiHeadDotProductAttention_0"]["query"]["bias"]
    assert bias.shape == (2, 4)
    np.testing.assert_array_equal(bias[:, 0], 0.0)  # unit 0 of every head
    np.testing.assert_allclose(bias[:, 1:], 0.5)
    masks = gates.to_masks(g, gp, p)
    want = np.broadcast_to([False, True, True, True], (2, 4))
    np.testing.assert_array_equal(masks["MultiHeadDotProductAttention_0"]["query"]["bias"], want)

    o_lin = gates.linen_apply(g, m, {"params": p}, gp, x)
    o_fold = m.apply({"params": folded}, x)
    o_mask = m.apply({"params": jp.apply_masks(folded, masks)}, x)
    scale = float(jnp.abs(o_lin).max())
    assert scale > 1.0
    np.testing.assert_allclose(o_fold, o_lin, atol=1e-5 * scale)  # was 3.1 apart
    np.testing.assert_allclose(o_mask, o_lin, atol=1e-5 * scale)


# --- linen_apply on a gate that names no kernel (linen #4a) ------------------------------


class Bag(nn.Module):
    @nn.compact
    def __call__(self, tok):
        h = nn.Embed(20, 8)(tok).mean(1)
        return nn.Dense(3)(nn.relu(nn.Dense(16)(h)))


def test_linen_apply_refuses_an_embed_gate_with_the_where_fix():
    tok = jnp.zeros((2, 5), jnp.int32)
    m = Bag()
    v = m.init(jax.random.key(0), tok)
    g = gates.HardConcrete()
    gp = gates.init_gates(g, v["params"])  # the default where takes the embedding table
    assert "Embed_0/embedding" in gp
    with pytest.raises(
        ValueError,
        match=r"\['Embed_0/embedding'\] name no 'kernel' param.*where=lambda p, x: p\[-1\] == "
        r"'kernel'",
    ):
        gates.linen_apply(g, m, v, gp, tok)
    # The fix works.
    gp = gates.init_gates(g, v["params"], where=lambda p, x: p[-1] == "kernel")
    assert gates.linen_apply(g, m, v, gp, tok).shape == (2, 3)


# --- [out, in] (equinox, PyTorch) layouts (equinox #3) ----------------------------------


def _eqx_params():
    k1, k2 = jax.random.split(jax.random.key(0))
    conv = eqx.nn.Conv2d(3, 8, 3, key=k1)
    lin = eqx.nn.Linear(16, 16, key=k2)  # square: its bias fits either axis
    return {
        "conv": eqx.filter(conv, eqx.is_inexact_array),
        "lin": eqx.filter(lin, eqx.is_inexact_array),
    }


def test_init_gates_refuses_an_equinox_conv_weight():
    params = _eqx_params()
    with pytest.raises(
        ValueError,
        match=r"init_gates: 'conv/weight' of shape \(8, 3, 3, 3\) is stored \[out, in, \.\.\.\].*"
        r"'conv/bias' has shape \(8, 1, 1\).*kernel widths.*Fix: .*VariationalDropout.*where=",
    ):
        gates.init_gates(gates.HardConcrete(), params, where=lambda p, x: p[-1] == "weight")
    with pytest.raises(ValueError, match=r"'conv/weight'.*axis -2 as input features.*heights"):
        gates.init_gates(
            gates.HardConcrete(), params, where=lambda p, x: p[-1] == "weight", inputs=True
        )


def test_an_equinox_conv1d_takes_input_gates_on_its_input_channels():
    conv = eqx.nn.Conv1d(3, 8, 5, key=jax.random.key(0))  # weight [out, in, k], bias [out, 1]
    params = {"conv": eqx.filter(conv, eqx.is_inexact_array)}
    where = lambda p, x: p[-1] == "weight"  # noqa: E731
    with pytest.raises(ValueError, match=r"'conv/weight' of shape \(8, 3, 5\).*kernel widths"):
        gates.init_gates(gates.HardConcrete(), params, where=where)
    gpi = gates.init_gates(gates.HardConcrete(), params, where=where, inputs=True)
    assert gpi["conv/weight"]["gate_log_alpha"].shape == (3,)  # axis -2 is `in` here


def test_a_square_equinox_linear_is_refused_by_the_other_layers_layout():
    params = _eqx_params()
    with pytest.raises(
        ValueError, match=r"'lin/weight' of shape \(16, 16\).*square.*'conv/weight'.*input features"
    ):
        gates.init_gates(gates.HardConcrete(), params, where=lambda p, x: p == ("lin", "weight"))


def test_an_equinox_mlp_is_refused_also_where_gates_are_applied():
    mlp = eqx.filter(eqx.nn.MLP(4, 2, 6, 1, key=jax.random.key(0)), eqx.is_inexact_array)
    params = {"layers": [{"weight": lay.weight, "bias": lay.bias} for lay in mlp.layers]}
    g = gates.HardConcrete()
    with pytest.raises(ValueError, match=r"'layers/0/weight' of shape \(6, 4\) is stored \[out"):
        gates.init_gates(g, params, where=lambda p, x: p[-1] == "weight" and p[1] == 0)
    # Gate params built elsewhere (shapes of the last axis) are refused where applied too,
    # rather than gating input features and leaving the bias on axis 0 ungated.
    gp = {"layers/0/weight": {"gate_log_alpha": jnp.array([-9.0, 9.0, 9.0, 9.0])}}
    with pytest.raises(ValueError, match=r"apply_gates: 'layers/0/weight'.*\[out, in"):
        gates.apply_gates(g, params, gp)
    with pytest.raises(ValueError, match=r"to_masks: 'layers/0/weight'.*\[out, in"):
        gates.to_masks(g, gp, params)
    # A per-weight kind has no axis to get wrong.
    vd = gates.VariationalDropout()
    assert set(gates.init_gates(vd, params, where=lambda p, x: p[-1] == "weight")) == {
        "layers/0/weight",
        "layers/1/weight",
    }


def test_flax_layout_with_a_square_layer_is_accepted():
    params = {
        "a": {"kernel": jnp.ones((4, 8)), "bias": jnp.zeros(8)},
        "b": {"kernel": jnp.ones((8, 8)), "bias": jnp.zeros(8)},
        "c": {"kernel": jnp.ones((3, 3, 8, 2)), "bias": jnp.zeros(2)},
    }
    gp = gates.init_gates(gates.HardConcrete(), params)
    assert {k: v["gate_log_alpha"].shape for k, v in gp.items()} == {
        "a/kernel": (8,),
        "b/kernel": (8,),
        "c/kernel": (2,),
    }


# --- the sibling bias by name (equinox #8) ---------------------------------------------


def test_haiku_w_b_pairs_are_gated_together():
    params = {"linear": {"w": jax.random.normal(jax.random.key(0), (6, 8)), "b": jnp.full(8, 0.5)}}
    g = gates.HardConcrete()
    gp = gates.init_gates(g, params)
    gp["linear/w"]["gate_log_alpha"] = jnp.array([-20.0] * 4 + [20.0] * 4)  # close units 0-3
    gated = gates.apply_gates(g, params, gp)
    x = jax.random.normal(jax.random.key(1), (4, 6))
    h = jax.nn.relu(x @ gated["linear"]["w"] + gated["linear"]["b"])
    np.testing.assert_array_equal(h[:, :4], 0.0)  # was relu(b) = 0.5
    np.testing.assert_allclose(gated["linear"]["b"][4:], 0.5)
    masks = gates.to_masks(g, gp, params)
    assert masks["linear"]["b"].tolist() == [False] * 4 + [True] * 4


def test_a_gated_kernel_with_an_unnamed_bias_beside_it_warns_once():
    params = [(jnp.ones((6, 8)), jnp.zeros(8)), (jnp.ones((8, 3)), jnp.zeros(3))]
    with pytest.warns(
        UserWarning,
        match=r"kernels '0/0' \(beside '0/1' \(8,\)\), '1/0' \(beside '1/1' \(3,\)\) have no bias",
    ) as rec:
        gp = gates.init_gates(gates.HardConcrete(), params)
    assert len(rec) == 1
    assert set(gp) == {"0/0", "1/0"}
