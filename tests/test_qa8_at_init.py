"""QA round 8, pruning at init and second-order / Taylor criteria: the fixed findings.

SynFlow's scores are ``|dR/dw * w|`` (nested rounds with a LayerNorm), SNIP and
GraSP refuse non-finite scores, ``fisher_diag`` takes any batch size, OBD pairs
an ``nnx.State`` with a pure dict, integer leaves get a clear error, GraSP takes
the official code's temperature, Taylor finds haiku's and equinox's biases and
documents the BatchNorm case.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxprune as jp
import jaxprune.at_init  # noqa: F401  (until jaxprune/__init__ exports it)
import jaxprune.masks as jm
from jaxprune import at_init


class _PreLN(nnx.Module):
    """16-32 -> ReLU -> LayerNorm -> 32-32 -> ReLU -> 10: R is scale-invariant in ``l1``."""

    def __init__(self, rngs):
        self.l1 = nnx.Linear(16, 32, rngs=rngs)
        self.ln = nnx.LayerNorm(32, rngs=rngs)
        self.l2 = nnx.Linear(32, 32, rngs=rngs)
        self.l3 = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        x = self.ln(jax.nn.relu(self.l1(x)))
        return self.l3(jax.nn.relu(self.l2(x)))


def _pre_ln():
    model = _PreLN(nnx.Rngs(0))
    model.eval()
    gd, params, rest = nnx.split(model, nnx.Param, ...)
    return (lambda p, x: nnx.merge(gd, p, rest, copy=True)(x)), params


def test_synflow_scores_are_nonnegative_and_rounds_nested_with_a_layernorm(monkeypatch):
    apply_fn, params = _pre_ln()
    s = nnx.to_pure_dict(jp.at_init.synflow_scores(apply_fn, params, (1, 16)))
    # Old code: the signed |w| * dR/d|w|, half negative in l1 (R ignores l1's scale).
    for leaf in jax.tree.leaves(s):
        assert float(jnp.min(leaf)) >= 0.0
    assert float(jnp.sum(s["l1"]["kernel"])) > 1e-3  # not the ~0 signed sum

    rounds = []
    orig = jm.global_topk

    def spy(scores, sparsity, **kw):
        out = orig(scores, sparsity, **kw)
        rounds.append(out)
        return out

    monkeypatch.setattr(jm, "global_topk", spy)
    with jax.disable_jit():
        masks = jp.at_init.synflow(apply_fn, params, (1, 16), 0.9, iterations=4)
    # rounds: the all-True start, 4 rounds, the exact final selection.
    assert len(rounds) == 6
    for prev, new in zip(rounds[:-1], rounds[1:], strict=True):
        for a, b in zip(jax.tree.leaves(prev), jax.tree.leaves(new), strict=True):
            assert not bool(jnp.any(jnp.asarray(b) & ~jnp.asarray(a)))
    m = nnx.to_pure_dict(masks)
    kept = {k: int(jnp.sum(m[k]["kernel"])) for k in ("l1", "l2", "l3")}
    assert all(v > 0 for v in kept.values()), kept  # no layer collapse before the LN


def test_synflow_collapse_warning_names_normalization_layers():
    masks = {"a": jnp.zeros((2, 3), bool), "b": jnp.ones((3, 2), bool)}
    with pytest.warns(UserWarning, match=r"\['a'\].*training mode.*LayerNorm, GroupNorm"):
        at_init._warn_collapsed(masks, [True, True], 0.5)


def _mlp_loss():
    p = {
        "l1": {"kernel": jax.random.normal(jax.random.key(0), (6, 8)), "bias": jnp.zeros(8)},
        "l2": {"kernel": jax.random.normal(jax.random.key(1), (8, 3)), "bias": jnp.zeros(3)},
    }

    def logits(p, x):
        return jax.nn.relu(x @ p["l1"]["kernel"] + p["l1"]["bias"]) @ p["l2"]["kernel"]

    def loss(p, x, y, temperature=1.0):
        z = (logits(p, x) + p["l2"]["bias"]) / temperature
        return optax.softmax_cross_entropy_with_integer_labels(z, y).mean()

    x = jax.random.normal(jax.random.key(2), (16, 6))
    y = jnp.arange(16) % 3
    return p, loss, x, y


def test_snip_and_grasp_refuse_nonfinite_scores():
    p, loss, x, y = _mlp_loss()
    bad = x.at[3, 2].set(jnp.nan)
    for fn in (jp.at_init.snip, jp.at_init.grasp):
        # Old code: every score nan, no error, and global_topk picks by flatten order.
        with pytest.raises(ValueError, match=r"scores .* are not finite: \d+ of 83 .*Fix"):
            fn(loss, p, bad, y)
        s = fn(loss, p, x, y)  # finite batch: no error
        assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(s))
        # Inside a trace the values are not known: no check, the caller sees the nans.
        traced = jax.jit(lambda p, x, y, fn=fn: fn(loss, p, x, y))(p, bad, y)
        assert not bool(jnp.all(jnp.isfinite(traced["l1"]["kernel"])))


def test_fisher_diag_takes_a_batch_that_is_not_a_multiple_of_chunk_size():
    p, loss, x, y = _mlp_loss()
    x, y = x[:10], y[:10]
    whole = jp.criteria.fisher_diag(loss, p, x, y, chunk_size=10)
    # Old code: "the batch size (10) must be a multiple of chunk_size (4)".
    for chunk in (4, 3, 64):
        got = jp.criteria.fisher_diag(loss, p, x, y, chunk_size=chunk)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(whole), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-8)
    # And against the per-example gradients by hand.
    per = [jax.grad(loss)(p, x[i : i + 1], y[i : i + 1]) for i in range(10)]
    want = jax.tree.map(lambda *g: sum(jnp.square(a) for a in g) / 10, *per)
    np.testing.assert_allclose(
        np.asarray(whole["l1"]["kernel"]), np.asarray(want["l1"]["kernel"]), rtol=1e-5
    )


def test_obd_pairs_an_nnx_state_with_a_pure_dict_hessian():
    model = jp.models.MLP((6, 5, 3), rngs=nnx.Rngs(0))
    gd, params = nnx.split(model, nnx.Param)
    x = jax.random.normal(jax.random.key(1), (8, 6))
    y = jnp.arange(8) % 3

    def loss(p, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(nnx.merge(gd, p)(x), y).mean()

    h = jp.criteria.fisher_diag(loss, params, x, y)
    want = nnx.to_pure_dict(jp.criteria.obd(params, h))
    # Old code: "same paths but different containers".
    got = jp.criteria.obd(params, nnx.to_pure_dict(h))
    assert isinstance(got, nnx.State)
    for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(got)), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # And inside jp.prune under nnx.Optimizer, with hessian_diag= a pure dict.
    tx = jp.prune(optax.sgd(0.0), sparsity=0.5, criterion=jp.criteria.obd)
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    grads = nnx.grad(lambda m: loss(nnx.state(m, nnx.Param), x, y))(model)
    opt.update(model, grads, hessian_diag=nnx.to_pure_dict(h))
    assert abs(float(jp.sparsity(nnx.state(model, nnx.Param))) - 0.5) < 0.05
    # Different paths are still refused, naming them.
    bad = nnx.to_pure_dict(h)
    bad["extra"] = jnp.ones(())
    with pytest.raises(ValueError, match="only in hessian_diag.*extra"):
        jp.criteria.obd(params, bad)


def test_an_integer_leaf_gets_a_clear_error_naming_it():
    p = {"step": jnp.int32(0), "w1": jnp.ones((4, 8)) * 0.1, "w2": jnp.ones((8, 2)) * 0.1}
    f = lambda p, x: jax.nn.relu(x @ p["w1"]) @ p["w2"]
    loss = lambda p, x: f(p, x).sum()
    calls = {
        "synflow": lambda: jp.at_init.synflow(f, p, (1, 4), 0.5, iterations=2),
        "synflow_scores": lambda: jp.at_init.synflow_scores(f, p, (1, 4)),
        "snip": lambda: jp.at_init.snip(loss, p, jnp.ones((2, 4))),
        "grasp": lambda: jp.at_init.grasp(loss, p, jnp.ones((2, 4))),
    }
    for name, call in calls.items():
        # Old code: JAX's "grad requires real- or complex-valued inputs" TypeError.
        with pytest.raises(ValueError, match=rf"^{name}: params leaf 'step' has dtype int32.*Fix"):
            call()
    # The all-ones input takes the first floating leaf's dtype, not the first leaf's.
    assert at_init._input_dtype(p) == jnp.float32
    assert at_init._input_dtype({"a": jnp.int8(1), "b": jnp.ones(2, jnp.bfloat16)}) == jnp.bfloat16


def test_synflow_masks_train_through_the_documented_scope():
    doc = jp.at_init.__doc__
    assert "scope=lambda scores, sparsity, where=None: masks" in doc
    model = jp.models.MLP((16, 8, 4), rngs=nnx.Rngs(0))
    model.eval()
    gd, params, rest = nnx.split(model, nnx.Param, ...)
    apply_fn = lambda q, x: nnx.merge(gd, q, rest, copy=True)(x)
    masks = jp.at_init.synflow(apply_fn, params, (1, 16), 0.9, iterations=4)
    model.train()
    tx = jp.prune(optax.adam(1e-2), sparsity=0.9, scope=lambda scores, sparsity, where=None: masks)
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(1), (8, 16))
    for _ in range(2):
        opt.update(model, nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model))
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    m = nnx.to_pure_dict(masks)
    for layer in ("0", "1"):
        w, keep = state["layers"][int(layer)]["kernel"], m["layers"][int(layer)]["kernel"]
        assert bool(jnp.all(jnp.where(keep, True, w == 0)))
    assert float(jp.sparsity(masks)) == pytest.approx(0.9, abs=1e-3)


def test_grasp_temperature_divides_the_logits():
    p, loss, x, y = _mlp_loss()
    plain = jp.at_init.grasp(loss, p, x, y)
    # Default: today's behaviour, loss_fn called as it is.
    same = jp.at_init.grasp(lambda p, x, y: loss(p, x, y), p, x, y)
    np.testing.assert_array_equal(
        np.asarray(plain["l1"]["kernel"]), np.asarray(same["l1"]["kernel"])
    )
    # temperature=200 is the official code's loss(logits / 200), by hand.
    got = jp.at_init.grasp(loss, p, x, y, temperature=200.0)
    by_hand = jp.at_init.grasp(functools.partial(loss, temperature=200.0), p, x, y)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(by_hand), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-12)
    assert not np.allclose(np.asarray(got["l1"]["kernel"]), np.asarray(plain["l1"]["kernel"]))
    for bad in (0.0, -1.0, "200", float("inf")):
        with pytest.raises(ValueError, match="temperature must be a positive number.*Fix"):
            jp.at_init.grasp(loss, p, x, y, temperature=bad)
    with pytest.raises(ValueError, match="takes no such keyword.*Fix"):
        jp.at_init.grasp(lambda p, x, y: loss(p, x, y), p, x, y, temperature=200.0)
    assert "200" in jp.at_init.grasp.__doc__


def _layer(key, n_in, n_out):
    k1, k2 = jax.random.split(key)
    return jax.random.normal(k1, (n_in, n_out)), jax.random.normal(k2, (n_out,))


def test_taylor_adds_the_bias_term_for_haiku_and_equinox_names():
    k, b = _layer(jax.random.key(0), 5, 4)
    gk, gb = _layer(jax.random.key(1), 5, 4)
    flax = jp.criteria.taylor({"d": {"kernel": k, "bias": b}}, {"d": {"kernel": gk, "bias": gb}})
    no_bias = jp.criteria.taylor({"d": {"kernel": k}}, {"d": {"kernel": gk}})
    assert not np.allclose(np.asarray(flax["d"]["kernel"]), np.asarray(no_bias["d"]["kernel"]))
    # haiku: w / b.  Old code: no bias term for these names.
    hk = jp.criteria.taylor({"d": {"w": k, "b": b}}, {"d": {"w": gk, "b": gb}})
    np.testing.assert_allclose(np.asarray(hk["d"]["w"]), np.asarray(flax["d"]["kernel"]), rtol=1e-6)
    # flax-layout weight / bias.
    wt = jp.criteria.taylor({"d": {"weight": k, "bias": b}}, {"d": {"weight": gk, "bias": gb}})
    np.testing.assert_allclose(
        np.asarray(wt["d"]["weight"]), np.asarray(flax["d"]["kernel"]), rtol=1e-6
    )
    # equinox / PyTorch: weight [out, in] with unit_axis=0.
    eq = jp.criteria.taylor(
        {"d": {"weight": k.T, "bias": b}}, {"d": {"weight": gk.T, "bias": gb}}, unit_axis=0
    )
    np.testing.assert_allclose(
        np.asarray(eq["d"]["weight"]), np.asarray(flax["d"]["kernel"]).T, rtol=1e-6
    )
    # equinox Conv2d: weight [out, in, kh, kw], bias [out, 1, 1], units on axis 0.
    w4 = jax.random.normal(jax.random.key(2), (4, 3, 2, 2))
    g4 = jax.random.normal(jax.random.key(3), (4, 3, 2, 2))
    b4, gb4 = b.reshape(4, 1, 1), gb.reshape(4, 1, 1)
    conv = jp.criteria.taylor({"weight": w4, "bias": b4}, {"weight": g4, "bias": gb4}, unit_axis=0)
    unit = jnp.abs(jnp.sum(w4 * g4, axis=(1, 2, 3)) + b * gb)
    np.testing.assert_allclose(
        np.asarray(conv["weight"][:, 0, 0, 0]), np.asarray(unit / jnp.linalg.norm(unit)), rtol=1e-5
    )
    # A bias on the input axis is never added (a square kernel's bias fits both axes).
    sq, gsq = jnp.eye(4) + 1.0, jnp.ones((4, 4))
    k0 = jp.criteria.taylor({"kernel": sq, "bias": b}, {"kernel": gsq, "bias": gb}, unit_axis=0)
    k0n = jp.criteria.taylor({"kernel": sq}, {"kernel": gsq}, unit_axis=0)
    np.testing.assert_array_equal(np.asarray(k0["kernel"]), np.asarray(k0n["kernel"]))
    # taylor_ema(group="unit") shares the pairing.
    c = jp.criteria.taylor_ema(0.0)
    st = c.update(c.init({"w": k, "b": b}), {"w": k, "b": b}, {"w": gk, "b": gb})
    want = (jnp.sum(k * gk, axis=0) + b * gb) ** 2
    np.testing.assert_allclose(np.asarray(st["w"][0]), np.asarray(want), rtol=1e-5)


class _ConvBN(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.head = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.relu(self.bn(self.conv(x)))
        return self.head(h.mean(axis=(1, 2)))


def test_taylor_documents_the_train_mode_batchnorm_case():
    doc = jp.criteria.taylor.__doc__
    assert "BatchNorm" in doc and "slimming_masks" in doc and "gamma_j" in doc
    assert "BatchNorm" in jp.criteria.taylor_ema.__doc__
    # The documented fact: a conv feeding a train-mode BatchNorm has unit sums ~0.
    model = _ConvBN(nnx.Rngs(0))
    gd, params, rest = nnx.split(model, nnx.Param, ...)
    x = jax.random.normal(jax.random.key(1), (16, 6, 6, 1))
    y = jnp.arange(16) % 3

    def loss(p):
        out = nnx.merge(gd, p, rest, copy=True)(x)
        return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()

    p = nnx.to_pure_dict(params)
    g = nnx.to_pure_dict(jax.grad(loss)(params))
    c, gc = p["conv"], g["conv"]
    unit = jnp.abs(jnp.sum(c["kernel"] * gc["kernel"], axis=(0, 1, 2)) + c["bias"] * gc["bias"])
    ref = jnp.sum(jnp.abs(c["kernel"] * gc["kernel"]), axis=(0, 1, 2))
    assert float(jnp.max(unit / ref)) < 1e-3
    # The recipe's BatchNorm-output score carries signal.
    bn, gbn = p["bn"], g["bn"]
    bn_unit = jnp.abs(bn["scale"] * gbn["scale"] + bn["bias"] * gbn["bias"])
    assert float(jnp.min(bn_unit / jnp.sum(jnp.abs(bn["scale"] * gbn["scale"])))) > 1e-3
