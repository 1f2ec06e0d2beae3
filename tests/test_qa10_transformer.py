"""QA round 10, transformer persona: Wanda on attention (LinearGeneral) kernels, the
N:M axis for attention output projections, prune_decoder's message for
nnx.MultiHeadAttention, and structure's message for an embedding lookup."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxprune as jp
from jaxprune import structure
from jaxprune.llm import prune_decoder


class _Block(nnx.Module):
    def __init__(self, dim, heads, *, rngs):
        self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=heads, in_features=dim, decode=False, rngs=rngs
        )
        self.fc1 = nnx.Linear(dim, 2 * dim, rngs=rngs)
        self.fc2 = nnx.Linear(2 * dim, dim, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(jax.nn.gelu(self.fc1(x)))


class _TinyLM(nnx.Module):
    def __init__(self, *, rngs, vocab=16, dim=8, heads=2):
        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.block = _Block(dim, heads, rngs=rngs)
        self.head = nnx.Linear(dim, vocab, rngs=rngs)

    def __call__(self, tokens):
        return self.head(self.block(self.embed(tokens)))


def test_input_norms_of_attention_kernels_follow_their_input_axes():
    model = _TinyLM(rngs=nnx.Rngs(0))
    tok = jax.random.randint(jax.random.key(1), (3, 5), 0, 16)
    _, caps = jp.activations.capture_nnx(model, tok, types=(nnx.Linear, nnx.LinearGeneral))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    norms = jp.activations.input_norms(params, caps)
    attn = norms["block"]["attn"]
    # query [in, heads, head_dim] reads x[..., in]; out [heads, head_dim, out] reads
    # x[..., heads, head_dim]: one norm per input feature, shaped to broadcast.
    assert attn["query"]["kernel"].shape == (8, 1, 1)
    assert attn["out"]["kernel"].shape == (2, 4, 1)
    assert norms["block"]["fc1"]["kernel"].shape == (8,)  # Dense: [in], as before
    x_out = caps["block/attn/out"].inputs.astype(jnp.float32)
    want = jnp.sqrt(jnp.sum(x_out**2, axis=(0, 1)))  # [heads, head_dim]
    np.testing.assert_allclose(attn["out"]["kernel"][..., 0], want, rtol=1e-6)
    scores = jp.criteria.wanda(params, norms)
    w = params["block"]["attn"]["out"]["kernel"]
    np.testing.assert_allclose(
        scores["block"]["attn"]["out"]["kernel"], jnp.abs(w) * want[:, :, None], rtol=1e-6
    )
    x_q = caps["block/attn/query"].inputs.astype(jnp.float32)
    wq = params["block"]["attn"]["query"]["kernel"]
    want_q = jnp.sqrt(jnp.sum(x_q**2, axis=(0, 1)))
    np.testing.assert_allclose(
        scores["block"]["attn"]["query"]["kernel"], jnp.abs(wq) * want_q[:, None, None], rtol=1e-6
    )


def test_input_norms_of_a_conv_kernel_stay_per_input_channel():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)  # kernel [3, 3, 3, 4]: RGB

        def __call__(self, x):
            return self.conv(x)

    model = Net(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 3, 3, 3))  # a 3x3 image: shapes look alike
    _, caps = jp.activations.capture_nnx(model, x, types=(nnx.Conv,))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    norms = jp.activations.input_norms(params, caps)["conv"]["kernel"]
    assert norms.shape == (3,)
    np.testing.assert_allclose(norms, jnp.sqrt(jnp.sum(x**2, axis=(0, 1, 2))), rtol=1e-6)


def test_wanda_names_the_attention_layout_when_one_d_norms_meet_a_3d_kernel():
    w = {"q": jnp.ones((8, 2, 4))}
    msg = r"'q'.*norms\[:, None, None\] for \[in, heads, head_dim\]"
    with pytest.raises(ValueError, match=msg):
        jp.criteria.wanda(w, {"q": jnp.ones(8)})


def test_nm_axis_example_for_attention_kernels_holds_under_per_layer():
    rng = np.random.RandomState(0)
    params = {
        "layers": {
            "out": {"kernel": jnp.asarray(rng.randn(2, 4, 4, 16), jnp.float32)},
            "query": {"kernel": jnp.asarray(rng.randn(2, 16, 4, 4), jnp.float32)},
        }
    }
    axis = lambda p, x: (1 if "out" in p else 0) if x.ndim == 3 else -2  # the docstring's
    sel = jp.masks.per_layer(
        functools.partial(jp.masks.nm, axis=axis), stacked=lambda p, x: p[0] == "layers"
    )
    m = sel(params)["layers"]
    # out [L, heads, head_dim, out]: groups of 4 along head_dim keep 2 each.
    out = np.asarray(m["out"]["kernel"]).reshape(2, 4, 1, 4, 16).sum(3)
    q = np.asarray(m["query"]["kernel"]).reshape(2, 4, 4, 4, 4).sum(2)  # along in
    assert out.min() == out.max() == 2
    assert q.min() == q.max() == 2


def test_prune_decoder_names_multi_head_attention_not_stacking():
    class Block(_Block):
        LINEARS = ("attn.query", "fc1", "fc2")

        def __call__(self, x, *, tap=None):
            return self.ln1(x)

    class Dec(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(16, 8, rngs=rngs)
            self.blocks = nnx.List([Block(8, 2, rngs=rngs)])

        def embed_tokens(self, t):
            return self.embed(t)

    with pytest.raises(ValueError, match=r"LinearGeneral.*nnx.Linear q/k/v/out") as err:
        prune_decoder(Dec(nnx.Rngs(0)), jnp.zeros((2, 4), jnp.int32), method="wanda")
    assert "stacked blocks" not in str(err.value)


def test_groups_explain_an_embedding_lookup():
    model = _TinyLM(rngs=nnx.Rngs(0))
    model.eval()
    tok = jax.random.randint(jax.random.key(1), (2, 5), 0, 16)
    apply_fn, state = structure.module_apply(model)
    with pytest.warns(UserWarning, match=r"'gather' \(an embedding lookup.*expected") as rec:
        groups = structure.groups(apply_fn, state, tok)
    assert not any("standard lax primitives" in str(w.message) for w in rec)
    assert any(g.prunable for g in groups)  # MLP neurons and heads are still found


def test_input_norms_of_a_linen_dense_general_follow_its_axis():
    import flax.linen as nn

    m = nn.DenseGeneral(features=3, axis=(1, 2))  # contracts [B, a, b, T]'s axes a, b
    x = jax.random.normal(jax.random.key(0), (2, 4, 5, 6))
    v = m.init(jax.random.key(1), x)
    _, caps = jp.activations.capture_linen(m, v, x, types=(nn.DenseGeneral,))
    assert caps["<root>"].in_axes == (1, 2)
    norms = jp.activations.input_norms(v["params"], caps)["kernel"]
    assert v["params"]["kernel"].shape == (4, 5, 3)
    want = jnp.sqrt(jnp.sum(x**2, axis=(0, 3)))  # [a, b]
    np.testing.assert_allclose(norms[..., 0], want, rtol=1e-6)


def test_general_layer_called_twice_and_captures_through_jit():
    class M(nnx.Module):
        def __init__(self, rngs):
            self.o = nnx.LinearGeneral((3, 4), 5, axis=(-2, -1), rngs=rngs)

        def __call__(self, a, b):
            return self.o(a).sum() + self.o(b).sum()

    m = M(nnx.Rngs(0))
    a = jax.random.normal(jax.random.key(1), (2, 6, 3, 4))
    b = jax.random.normal(jax.random.key(2), (2, 7, 3, 4))  # another length
    _, caps = jp.activations.capture_nnx(m, a, b, types=(nnx.LinearGeneral,))
    params = nnx.to_pure_dict(nnx.state(m, nnx.Param))
    want = jnp.sqrt(jnp.sum(a**2, axis=(0, 1)) + jnp.sum(b**2, axis=(0, 1)))[..., None]
    np.testing.assert_allclose(
        jp.activations.input_norms(params, caps)["o"]["kernel"], want, rtol=1e-5
    )
    # The axes are static metadata: captures map and cross jit as arrays only.
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(caps))
    jitted = jax.jit(jp.activations.input_norms)(params, caps)["o"]["kernel"]
    np.testing.assert_allclose(jitted, want, rtol=1e-5)
    halves = jax.tree.map(lambda x: x[:1], caps)
    assert halves["o"].in_axes == caps["o"].in_axes
