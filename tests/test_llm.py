"""One-shot LLM pruning on a small GPT trained here on a generated corpus.

The corpus is a second-order Markov chain with sparse random transitions, so
a trained model reaches a perplexity far below the vocabulary size and
pruning damage is measurable. At 50% and 2:4 the mean layer reconstruction
error and the perplexity both order SparseGPT <= Wanda <= magnitude, with
magnitude and Wanda ranking the same comparison group (each output unit's
weights, Wanda's; N:M groups at 2:4). With each paper's own group, per-layer
magnitude beats per-output Wanda by 3% in perplexity here: a model this small
has no outlier features (seed sweep: scripts/compare_llm.py, docs/scale.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxprune import llm
from jaxprune.models_llm import GPT, markov_corpus, train_lm

VOCAB, TIME = 32, 32


@pytest.fixture(scope="module")
def trained():
    train, calib, test = markov_corpus(vocab=VOCAB, time=TIME, sizes=(2048, 64, 128), seed=0)
    model = GPT(vocab=VOCAB, dim=64, depth=2, heads=4, max_len=TIME, rngs=nnx.Rngs(0))
    losses = train_lm(model, train, steps=250, batch_size=32, lr=1e-2, key=jax.random.key(0))
    return model, calib, test, losses


def test_model_learned(trained):
    model, _, test, losses = trained
    dense = llm.perplexity(model, test)
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, dense perplexity {dense:.3f}")
    assert losses[-1] < 0.6 * losses[0]
    assert dense < VOCAB / 4


@pytest.mark.parametrize("nm", [None, (2, 4)], ids=["50%", "2:4"])
def test_sparsegpt_beats_wanda_beats_magnitude(trained, nm):
    model, calib, test, _ = trained
    dense_before = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
    err, ppl = {}, {}
    for method in llm.METHODS:
        pruned, errors = llm.prune_decoder(
            model, calib, method=method, sparsity=0.5, nm=nm, group="output"
        )
        err[method] = float(np.mean(list(errors.values())))
        ppl[method] = llm.perplexity(pruned, test)
        for block in pruned.blocks:
            for name in block.LINEARS:
                k = np.asarray(getattr(block, name).kernel.get_value())
                if nm is None and method != "sparsegpt":  # exactly half of each output unit
                    assert np.all((k == 0).sum(axis=0) == k.shape[0] // 2)
                elif nm is None:
                    assert (k == 0).sum() == k.size // 2
                else:
                    groups = k.reshape(k.shape[0] // 4, 4, k.shape[1])
                    assert np.all((groups != 0).sum(axis=1) <= 2)
    # The input model is untouched (prune_decoder works on a copy).
    after = nnx.state(model, nnx.Param)
    assert all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(dense_before), jax.tree.leaves(after), strict=True)
    )
    print(f"nm={nm}: mean layer error {err}, perplexity {ppl}")
    assert err["sparsegpt"] <= err["wanda"] <= err["magnitude"], err
    assert ppl["sparsegpt"] <= ppl["wanda"] <= ppl["magnitude"], ppl


def test_comparison_groups():
    # Output columns differ in scale.
    w = jax.random.normal(jax.random.key(0), (8, 6)) * jnp.arange(1.0, 7.0)
    per_layer = llm.magnitude_prune(w, sparsity=0.5)
    per_output = llm.magnitude_prune(w, sparsity=0.5, group="output")
    assert int((per_layer == 0).sum()) == 24
    assert np.all((np.asarray(per_output) == 0).sum(axis=0) == 4)
    # Per layer, the small-scale first column loses more than half its weights.
    assert int((per_layer[:, 0] == 0).sum()) > 4
    # Wanda with unit input norms is magnitude in the same group.
    ones = jnp.ones(8)
    for group in llm.GROUPS:
        np.testing.assert_array_equal(
            llm.wanda_prune(w, ones, sparsity=0.5, group=group),
            llm.magnitude_prune(w, sparsity=0.5, group=group),
        )


def test_sparsegpt_exact_zero_hessian_columns_and_counts():
    x = jax.random.normal(jax.random.key(0), (512, 32)).at[:, 3].set(0.0)  # a dead input
    w = jax.random.normal(jax.random.key(1), (32, 16))
    h = x.T @ x
    p = llm.sparsegpt(w, h, sparsity=0.25, blocksize=8)
    assert np.all(np.asarray(p[3]) == 0)
    assert int((p == 0).sum()) >= round(0.25 * w.size)
    # The OBS updates of the kept weights undo part of the pruning error.
    err_obs = llm.reconstruction_error(w, llm.sparsegpt(w, h, sparsity=0.5), h)
    err_mag = llm.reconstruction_error(w, llm.magnitude_prune(w, sparsity=0.5), h)
    assert err_obs < err_mag


def test_errors_name_the_argument(trained):
    model, calib, _, _ = trained
    with pytest.raises(ValueError, match="method must be one of"):
        llm.prune_decoder(model, calib, method="obs")
    with pytest.raises(ValueError, match="nm must be"):
        llm.magnitude_prune(jnp.ones((6, 2)), nm=(2, 4))
    with pytest.raises(ValueError, match="sparsity must be in"):
        llm.wanda_prune(jnp.ones((4, 2)), jnp.ones(4), sparsity=50)
    with pytest.raises(ValueError, match="group must be one of.*'row'"):
        llm.prune_decoder(model, calib, method="wanda", group="row")
    with pytest.raises(ValueError, match="group must be one of"):
        llm.magnitude_prune(jnp.ones((4, 2)), group="rows")
    with pytest.raises(ValueError, match="hessian must be"):
        llm.sparsegpt(jnp.ones((4, 2)), jnp.ones((2, 2)))
