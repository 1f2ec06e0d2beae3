"""QA7 findings on jaxprune.llm: bf16 perplexity, the decoder protocol, eval mode.

Each test failed before its fix:
- a model with bf16 logits had its loss averaged in bf16, so its perplexity
  fell on a grid of 1/64 nat and models up to 1.6% apart tied;
- a model off the decoder protocol (linen, no ``embed_tokens``, stacked blocks,
  no ``tap=``, a tap of the wrong width...) gave a raw AttributeError/TypeError
  or a message about another function's internal arguments;
- ``prune_decoder`` and ``perplexity`` ran a model left in train mode with its
  Dropout active.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxprune import llm
from jaxprune.models_llm import GPT, Block, lm_loss

VOCAB, TIME = 32, 16
PROTOCOL = r"(?s)decoder protocol: {}.*jaxprune\.models_llm\.Block"


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(1), (8, TIME), 0, VOCAB)


def _gpt(**kw):
    return GPT(vocab=VOCAB, dim=16, depth=1, heads=2, max_len=TIME, rngs=nnx.Rngs(0), **kw)


# --- 1. the loss is computed in float32 -------------------------------------------------


class BF16GPT(GPT):
    """Stands for a model computing in bf16 (flax layers built with dtype=jnp.bfloat16)."""

    def __call__(self, tokens):
        return super().__call__(tokens).astype(jnp.bfloat16)


def test_bf16_perplexity_is_the_float32_one(tokens):
    model = BF16GPT(vocab=VOCAB, dim=16, depth=1, heads=2, max_len=TIME, rngs=nnx.Rngs(0))
    forward = nnx.jit(lambda m, t: m(t))  # jitted: op-by-op compiles cost seconds
    assert nnx.eval_shape(forward, model, tokens).dtype == jnp.bfloat16
    assert nnx.eval_shape(lm_loss, model, tokens).dtype == jnp.float32  # was bfloat16
    got, want, head = [], [], model.head.kernel.get_value()
    for scale in (0.5, 1.0, 1.5):  # untrained: perplexities 35, 51 and 94
        model.head.kernel.set_value(scale * head)
        logits = forward(model, tokens[:, :-1]).astype(jnp.float32)  # the same bf16 logits
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
        want.append(float(jnp.exp(ce)))
        got.append(llm.perplexity(model, tokens))
    # Was off by -0.45%, +0.64% and -0.88% (the bf16 mean's rounding): 35.25 vs 35.41.
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_float32_loss_is_unchanged(tokens):
    model = _gpt()
    logits = model(tokens[:, :-1])
    assert logits.dtype == jnp.float32
    want = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    assert float(lm_loss(model, tokens)) == float(want)


class NoLogits(nnx.Module):
    def __call__(self, tokens):
        return tokens.astype(jnp.float32)  # [batch, time], no vocab axis


def test_perplexity_needs_logits(tokens):
    with pytest.raises(ValueError, match=r"must return next-token logits \[batch, time, vocab\]"):
        llm.perplexity(NoLogits(), tokens)


# --- 2. the decoder protocol is checked up front ----------------------------------------


class LinenLM(nn.Module):
    @nn.compact
    def __call__(self, t):
        return nn.Dense(VOCAB)(nn.Embed(VOCAB, 16)(t))


class NoEmbedTokens(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(VOCAB, 16, rngs=rngs)
        self.blocks = nnx.List([Block(16, 2, rngs=rngs)])

    def __call__(self, t):
        return self.embed.attend(self.blocks[0](self.embed(t)))


class Decoder(NoEmbedTokens):
    """A decoder with the given blocks (an nnx.List of them unless ``stacked``)."""

    def __init__(self, blocks, rngs):
        super().__init__(rngs)
        self.blocks = blocks

    def embed_tokens(self, t):
        return self.embed(t)


class PlainBlock(nnx.Module):  # no tap=
    LINEARS = ("fc",)

    def __init__(self, rngs):
        self.fc = nnx.Linear(16, 16, rngs=rngs)

    def __call__(self, x):
        return x + self.fc(x)


class NoLinears(PlainBlock):
    LINEARS = None

    def __call__(self, x, tap=None):
        return x if tap else x + self.fc(x)


class StringLinears(NoLinears):
    LINEARS = "fc"


class MissingLinear(NoLinears):
    LINEARS = ("fc", "proj")


class NormListed(NoLinears):
    LINEARS = ("ln",)

    def __init__(self, rngs):
        super().__init__(rngs)
        self.ln = nnx.LayerNorm(16, rngs=rngs)


class WrongTap(nnx.Module):  # the tap returns the block input for every layer
    LINEARS = ("up", "down")

    def __init__(self, rngs):
        self.up = nnx.Linear(16, 32, rngs=rngs)
        self.down = nnx.Linear(32, 16, rngs=rngs)

    def __call__(self, x, tap=None):
        return x if tap else x + self.down(self.up(x))


class ScalarTap(NoLinears):
    LINEARS = ("fc",)

    def __call__(self, x, tap=None):
        return x.sum() if tap else x + self.fc(x)


class Mlp(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(16, 32, rngs=rngs)
        self.proj = nnx.Linear(32, 16, rngs=rngs)


class NestedBlock(nnx.Module):  # its layers live in a sub-module
    LINEARS = ("mlp.fc", "mlp.proj")

    def __init__(self, rngs):
        self.mlp = Mlp(rngs)

    def __call__(self, x, tap=None):
        if tap == "mlp.fc":
            return x
        h = jax.nn.gelu(self.mlp.fc(x))
        return h if tap == "mlp.proj" else x + self.mlp.proj(h)


def _stacked(rngs):
    @nnx.vmap(in_axes=0, out_axes=0)
    def make(key):
        return Block(16, 2, rngs=nnx.Rngs(key))

    return make(jax.random.split(rngs.params(), 2))


def _one(block_cls):
    return lambda r: Decoder(nnx.List([block_cls(r)]), r)


CASES = {
    "linen module": (lambda r: LinenLM(), r"it is a linen Module \(LinenLM\)"),
    "linen variables": (
        lambda r: LinenLM().init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)),
        r"it is a dict \(linen variables\?\), not an nnx.Module",
    ),
    "no embed_tokens": (NoEmbedTokens, r"NoEmbedTokens has no method embed_tokens\(tokens\)"),
    "stacked blocks": (
        lambda r: Decoder(_stacked(r), r),
        r"Decoder.blocks is one Block, not a sequence of blocks \(stacked blocks, e.g. from "
        r"nnx.vmap\?\)",
    ),
    "no blocks": (lambda r: Decoder(nnx.List([]), r), r"Decoder.blocks is empty"),
    "no LINEARS": (_one(NoLinears), r"blocks\[0\] \(NoLinears\) has no LINEARS"),
    "LINEARS a string": (
        _one(StringLinears),
        r"blocks\[0\] \(StringLinears\).LINEARS must be a non-empty tuple of names, got 'fc' "
        r"\(write \('fc',\)\)",
    ),
    "missing linear": (
        _one(MissingLinear),
        r"blocks\[0\] \(MissingLinear\) lists 'proj' in LINEARS but has no such attribute",
    ),
    "not a linear": (
        _one(NormListed),
        r"blocks\[0\] \(NormListed\).ln is a LayerNorm, not an nnx.Linear",
    ),
    "no tap": (_one(PlainBlock), r"blocks\[0\] \(PlainBlock\).__call__ takes no tap= argument"),
    "tap not an activation": (
        _one(ScalarTap),
        r"block\(x, tap='fc'\) returned shape \(\), not the layer's input \[batch, time, "
        r"features\]",
    ),
    "tap of the wrong width": (
        _one(WrongTap),
        r"the tap of layer 'blocks/0/down' gives 16 features, but its kernel \(32, 16\) expects "
        r"32 inputs; block\(x, tap='down'\) must return that layer's input",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_decoder_protocol_errors(case, tokens):
    make, message = CASES[case]
    # Was: AttributeError, TypeError, or "input_norms of 'k' has shape (16,)" for the tap.
    with pytest.raises(ValueError, match=PROTOCOL.format(message)):
        llm.prune_decoder(make(nnx.Rngs(0)), tokens, method="wanda")


def test_tap_width_is_checked_before_sparsegpt(tokens):
    make, message = CASES["tap of the wrong width"]
    # Was: "hessian must be [in, in] ... accumulate X^T X".
    with pytest.raises(ValueError, match=PROTOCOL.format(message)):
        llm.prune_decoder(make(nnx.Rngs(0)), tokens, method="sparsegpt")


def test_perplexity_refuses_linen(tokens):
    with pytest.raises(ValueError, match=r"perplexity needs a flax nnx.Module.*linen Module"):
        llm.perplexity(LinenLM(), tokens)  # was a jit "abstract array" TypeError


def test_dotted_linears_reach_into_sub_modules(tokens):
    model = Decoder(nnx.List([NestedBlock(nnx.Rngs(0))]), nnx.Rngs(0))
    pruned, errors = llm.prune_decoder(model, tokens, method="wanda", sparsity=0.5)
    assert sorted(errors) == ["blocks/0/mlp/fc/kernel", "blocks/0/mlp/proj/kernel"]
    for layer in (pruned.blocks[0].mlp.fc, pruned.blocks[0].mlp.proj):
        k = np.asarray(layer.kernel.get_value())
        assert (k == 0).sum() == k.size // 2
    assert np.all(np.asarray(model.blocks[0].mlp.fc.kernel.get_value()) != 0)  # a copy
    with pytest.raises(ValueError, match=r"input size 16 of layer 'blocks/0/mlp/fc'"):
        llm.prune_decoder(model, tokens, nm=(2, 3))


# --- 3. eval mode -----------------------------------------------------------------------


class DropBlock(Block):
    def __init__(self, dim, heads, *, rngs):
        super().__init__(dim, heads, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x, *, tap=None):
        y = super().__call__(self.drop(x), tap=tap)
        return y if tap is not None else x + self.drop(y - x)


class DropGPT(GPT):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.blocks = nnx.List([DropBlock(kw["dim"], kw["heads"], rngs=kw["rngs"])])


def _modes(model):
    return [m.deterministic for _, m in nnx.iter_modules(model) if isinstance(m, nnx.Dropout)]


def test_perplexity_and_prune_decoder_run_in_eval_mode(tokens):
    model = DropGPT(vocab=VOCAB, dim=16, depth=1, heads=2, max_len=TIME, rngs=nnx.Rngs(0))
    assert _modes(model) == [False]  # train mode, as after construction or train_lm
    reference = nnx.clone(model)
    reference.eval()
    # Was 49.078 with dropout active against 49.140 in eval mode.
    assert llm.perplexity(model, tokens) == llm.perplexity(reference, tokens)
    assert _modes(model) == [False]  # the user's model keeps its mode
    pruned, errors = llm.prune_decoder(model, tokens, method="wanda", sparsity=0.5)
    pruned_ref, errors_ref = llm.prune_decoder(reference, tokens, method="wanda", sparsity=0.5)
    assert errors == errors_ref
    for a, b in zip(
        jax.tree.leaves(nnx.state(pruned, nnx.Param)),
        jax.tree.leaves(nnx.state(pruned_ref, nnx.Param)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    assert _modes(model) == [False] and _modes(pruned) == [False]  # the copy keeps it too
    assert _modes(pruned_ref) == [True]


# --- exact counts, weights that are not finite, argument types -------------------------


@pytest.mark.parametrize(
    "shape, sparsity, blocksize",
    [((1000, 1), 0.003, 128), ((128, 2), 0.2, 1), ((300, 7), 0.37, 64), ((300, 7), 0.9, 128)],
)
def test_sparsegpt_prunes_the_layers_exact_count_however_small_each_blocks_share(
    shape, sparsity, blocksize
):
    w = jax.random.normal(jax.random.key(0), shape)
    x = jax.random.normal(jax.random.key(1), (2 * shape[0], shape[0]))
    pruned = llm.sparsegpt(w, x.T @ x, sparsity=sparsity, blocksize=blocksize)
    # Rounding each block's share on its own pruned nothing in the first two cases.
    assert int((pruned == 0).sum()) == round(sparsity * w.size)


def test_nm_as_jax_ints_and_arrays_given_as_lists():
    w = jax.random.normal(jax.random.key(0), (16, 4))
    nm = (jnp.int32(2), jnp.int32(4))
    assert int((llm.sparsegpt(w, jnp.eye(16), nm=nm) == 0).sum()) == 32
    assert int((llm.magnitude_prune(w, nm=nm) == 0).sum()) == 32
    with pytest.raises(ValueError, match=r"hessian must be an array, got list. Fix"):
        llm.sparsegpt(w, np.eye(16).tolist())
    with pytest.raises(ValueError, match=r"kernel must be an array, got list. Fix"):
        llm.magnitude_prune([[1.0, 2.0], [3.0, 4.0]])


def test_a_kernel_holding_nan_is_named_before_any_solve(tokens):
    with pytest.raises(ValueError, match=r"kernel holding NaN or inf.*Fix: check the model"):
        llm.sparsegpt(jnp.ones((8, 2)).at[0, 0].set(jnp.nan), jnp.eye(8))
    model = _gpt()
    kernel = model.blocks[0].qkv.kernel
    kernel.set_value(kernel.get_value().at[0, 0].set(jnp.nan))
    # Not the dampening advice: magnitude pruning has no Hessian to damp.
    with pytest.raises(ValueError, match=r"kernel of layer 'blocks/0/qkv' holds NaN or inf before"):
        llm.prune_decoder(model, tokens, method="magnitude", nm=(2, 4))
