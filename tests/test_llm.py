"""One-shot LLM pruning on a small GPT trained here on a generated corpus.

The corpus is a second-order Markov chain with sparse random transitions, so
a trained model reaches a perplexity far below the vocabulary size and
pruning damage is measurable. At 50% and 2:4 the mean layer reconstruction
error orders SparseGPT <= Wanda <= magnitude, with magnitude and Wanda ranking
the same comparison group (each output unit's weights, Wanda's; N:M groups at
2:4), and SparseGPT has the lowest perplexity. Whether Wanda's perplexity
beats magnitude's depends on the trained model (the seed, and the jax
version's numerics), so only their closeness is asserted. With each paper's own group, per-layer
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

# One worker runs these (`--dist loadgroup`): the trained model fixture is built once.
pytestmark = pytest.mark.xdist_group("llm")

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
def test_sparsegpt_beats_wanda_beats_magnitude_in_layer_error(trained, nm):
    model, calib, test, _ = trained
    dense_before = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
    err, ppl = {}, {}
    for method in llm.METHODS:
        pruned, errors = llm.prune_decoder(
            model,
            calib,
            method=method,
            sparsity=0.5,
            nm=nm,
            group=None if method == "sparsegpt" else "output",
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
    assert ppl["sparsegpt"] <= min(ppl["wanda"], ppl["magnitude"]), ppl
    # Wanda's lower layer errors need not carry through two blocks to the
    # perplexity: at 50% Wanda measured 6.63 against magnitude's 6.69 on jax
    # 0.10.2 and 6.91 against 6.66 on jax 0.12.0.1, whose trained model differs.
    # Asserted: the two land within 20% of each other (2:4: 9.68 and 10.67 on
    # jax 0.10.2), which a broken criterion would not.
    assert max(ppl["wanda"], ppl["magnitude"]) <= 1.2 * min(ppl["wanda"], ppl["magnitude"]), ppl


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
    with pytest.raises(ValueError, match="group='output' does not apply to method='sparsegpt'"):
        llm.prune_decoder(model, calib, method="sparsegpt", group="output")
    with pytest.raises(ValueError, match="group must be one of"):
        llm.magnitude_prune(jnp.ones((4, 2)), group="rows")
    with pytest.raises(ValueError, match="hessian must be"):
        llm.sparsegpt(jnp.ones((4, 2)), jnp.ones((2, 2)))


@pytest.fixture(scope="module")
def small():
    model = GPT(vocab=32, dim=32, depth=1, heads=2, max_len=16, rngs=nnx.Rngs(0))
    calib = jax.random.randint(jax.random.key(0), (8, 16), 0, 32)
    return model, calib


def test_prune_decoder_refuses_bad_calibration(small):
    model, calib = small
    with pytest.raises(ValueError, match=r"calibration holds token ids in \[100, 131\].*\[0, 31\]"):
        llm.prune_decoder(model, calib + 100)  # was: every pruned kernel NaN
    with pytest.raises(ValueError, match=r"calibration holds token ids in \[-1"):
        llm.prune_decoder(model, calib.at[0, 0].set(-1), method="wanda")
    with pytest.raises(ValueError, match=r"calibration must hold at least one sample"):
        llm.prune_decoder(model, calib[:0])
    with pytest.raises(ValueError, match=r"calibration has 20 tokens.*max_len=16"):
        llm.prune_decoder(model, jnp.zeros((4, 20), jnp.int32))
    with pytest.raises(
        ValueError, match=r"calibration must be int tokens \[samples, time\].*\(16,\)"
    ):
        llm.prune_decoder(model, calib[0])
    with pytest.raises(ValueError, match=r"calibration must be int tokens.*float32"):
        llm.prune_decoder(model, calib.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"tokens holds ids in \[100, 131\]"):
        model.embed_tokens(calib + 100)
    with pytest.raises(ValueError, match=r"tokens has 20 positions, more than max_len=16"):
        model.embed_tokens(jnp.zeros((1, 20), jnp.int32))
    with pytest.raises(ValueError, match=r"tokens holds token ids in \[100"):
        llm.perplexity(model, calib + 100)
    with pytest.raises(ValueError, match=r"tokens must have at least 2 tokens per sample"):
        llm.perplexity(model, calib[:, :1])  # nothing to predict


@pytest.mark.parametrize("bad", [-1.0, 0.0, float("nan"), float("inf")])
def test_dampening_must_be_positive_and_finite(small, bad):
    model, calib = small
    with pytest.raises(ValueError, match=r"dampening must be a finite number > 0.*Fix"):
        llm.prune_decoder(model, calib, dampening=bad)
    with pytest.raises(ValueError, match=r"dampening must be a finite number > 0"):
        llm.sparsegpt(jnp.ones((4, 2)), jnp.eye(4), dampening=bad)


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_batch_size_must_be_a_positive_int(small, bad):
    model, calib = small
    with pytest.raises(ValueError, match=rf"batch_size must be a positive int.*got {bad}"):
        llm.prune_decoder(model, calib, batch_size=bad)
    with pytest.raises(ValueError, match=rf"batch_size must be a positive int.*got {bad}"):
        llm.perplexity(model, calib, batch_size=bad)


def test_nm_and_sparsity_checks(small):
    model, calib = small
    with pytest.raises(ValueError, match=r"0 < n <= m.*got nm=\(3, 2\)") as e:
        llm.prune_decoder(model, calib, nm=(3, 2))
    assert "input size" not in str(e.value)  # was "m dividing the input size 2"
    with pytest.raises(ValueError, match=r"m dividing the input size 32 of layer 'blocks/0/qkv'"):
        llm.prune_decoder(model, calib, nm=(2, 3))
    with pytest.raises(ValueError, match=r"nm must be a pair of ints"):
        llm.prune_decoder(model, calib, nm=4)
    with pytest.raises(ValueError, match=r"nm must be a pair of ints.*\(2\.5, 4\)"):
        llm.magnitude_prune(jnp.ones((8, 2)), nm=(2.5, 4))
    # sparsity is validated even when nm is given, and must agree with it.
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\], got 1.5"):
        llm.prune_decoder(model, calib, nm=(2, 4), sparsity=1.5)
    with pytest.raises(ValueError, match=r"sparsity=0.7 conflicts with nm=\(2, 4\).*0.5"):
        llm.prune_decoder(model, calib, nm=(2, 4), sparsity=0.7)  # was: 50% pruned silently
    for fn in (llm.magnitude_prune, lambda k, **kw: llm.wanda_prune(k, jnp.ones(8), **kw)):
        with pytest.raises(ValueError, match=r"sparsity=0.25 conflicts with nm=\(1, 4\)"):
            fn(jnp.ones((8, 2)), sparsity=0.25, nm=(1, 4))
        kept = fn(jnp.arange(1.0, 17.0).reshape(8, 2), sparsity=0.75, nm=(1, 4))  # agrees
        assert int(jnp.sum(kept != 0)) == 4
    with pytest.raises(ValueError, match=r"sparsity=0.9 conflicts with nm=\(2, 4\)"):
        llm.sparsegpt(jnp.ones((4, 2)), jnp.eye(4), sparsity=0.9, nm=(2, 4))
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\].*'0.5'"):
        llm.magnitude_prune(jnp.ones((8, 2)), sparsity="0.5")
    # n == m is allowed, as jp.masks.nm allows it, but warned about once: it prunes nothing.
    with pytest.warns(UserWarning, match=r"nm=\(4, 4\).*nothing is pruned") as rec:
        pruned, errors = llm.prune_decoder(model, calib, nm=(4, 4), method="magnitude")
    assert len([w for w in rec if "nothing is pruned" in str(w.message)]) == 1
    assert all(v == 0.0 for v in errors.values())
    with pytest.warns(UserWarning, match="nothing is pruned"):
        llm.sparsegpt(jnp.ones((4, 2)), jnp.eye(4), nm=(4, 4))


def test_kernels_must_be_2d_and_errors_are_finite():
    with pytest.raises(ValueError, match=r"kernel must be a 2-D \[in, out\] kernel.*\(16,\)"):
        llm.sparsegpt(jnp.ones(16), jnp.eye(16))
    with pytest.raises(ValueError, match=r"kernel must be a 2-D.*\(2, 16, 8\)"):
        llm.magnitude_prune(jnp.ones((2, 16, 8)))
    with pytest.raises(ValueError, match=r"kernel must be a 2-D"):
        llm.wanda_prune(jnp.ones(16), jnp.ones(16))
    # A layer whose inputs are all zero (an earlier layer pruned away) has error 0, not NaN.
    assert (
        float(llm.reconstruction_error(jnp.ones((4, 2)), jnp.zeros((4, 2)), jnp.zeros((4, 4))))
        == 0.0
    )
    assert (
        float(llm.reconstruction_error(jnp.zeros((4, 2)), jnp.ones((4, 2)), jnp.eye(4))) == np.inf
    )


def test_sparsity_one_gives_finite_errors(small):
    model, calib = small
    _, errors = llm.prune_decoder(model, calib, sparsity=1.0)
    assert all(np.isfinite(v) for v in errors.values()), errors
