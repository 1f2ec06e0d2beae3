"""QA round 7 (gates) on the adversarial pieces: range checks before jit, model state
(BatchNorm) in the training steps, penalty pairing, eps=0, label and params errors, FGSM."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxprune import adversarial, gates, models

GATE = gates.BetaBernoulli()


def _tree(key):
    k1, k2 = jax.random.split(key)
    params = {
        "hidden": {"kernel": jax.random.normal(k1, (8, 16)) * 0.5, "bias": jnp.zeros(16)},
        "out": {"kernel": jax.random.normal(k2, (16, 3)) * 0.5, "bias": jnp.zeros(3)},
    }
    gp = gates.init_gates(GATE, params, where=lambda path, x: path == ("hidden", "kernel"))
    return {"params": params, "gates": gp}


def _apply(tree, x, key):
    """A gated MLP in the functional form: (logits, [hidden pre-activations])."""
    p = gates.apply_gates(GATE, tree["params"], tree["gates"], key=key)
    h = x @ p["hidden"]["kernel"] + p["hidden"]["bias"]
    return jax.nn.relu(h) @ p["out"]["kernel"] + p["out"]["bias"], [h]


def _kl(tree):
    return gates.penalty(GATE, tree["gates"])


def _data(key, n=32):
    x = jax.random.uniform(key, (n, 8))
    y = (x[:, 0] > 0.5).astype(jnp.int32) + (x[:, 1] > 0.5)
    return x, y


KW = dict(eps=0.05, step_size=0.02, steps=2)


# -- 2. bounds are checked before jit -------------------------------------------------------


def test_out_of_range_inputs_are_refused_by_every_jitted_entry_point(key):
    tree = _tree(key)
    x, y = _data(jax.random.key(1), 16)
    xs = (x - 0.5) / 0.29  # standardized: outside the default bounds (0, 1)
    match = r"x lies in \[-1.*\], outside bounds=\(0.0, 1.0\).*Fix: pass the data range"
    tx = optax.sgd(0.1)
    k = jax.random.key(2)
    with pytest.raises(ValueError, match=match):
        adversarial.attack(_apply, **KW)(tree, xs, y, k)
    with pytest.raises(ValueError, match=match):
        adversarial.robustness(_apply, tree, np.asarray(xs), np.asarray(y), key=k, **KW)
    with pytest.raises(ValueError, match=match):
        adversarial.adversarial_step(_apply, tx, **KW)(tree, tx.init(tree), xs, y, k)
    anp = adversarial.anp_vs_step(_apply, _kl, tx, num_train=16, **KW)
    with pytest.raises(ValueError, match=match):
        anp(tree, tx.init(tree), xs, y, k)
    with pytest.raises(ValueError, match=match):  # NumPy batches too
        anp(tree, tx.init(tree), np.asarray(xs), np.asarray(y), k)
    # With the data's own range the same calls run, and the ball holds.
    bounds = (float(xs.min()), float(xs.max()))
    adv = adversarial.attack(_apply, bounds=bounds, **KW)(tree, xs, y, k)
    assert float(jnp.max(jnp.abs(adv - xs))) <= KW["eps"] + 1e-6


# -- 3. model state: BatchNorm running statistics ------------------------------------------


class _BNNet(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(8, 16, rngs=rngs)
        self.bn = nnx.BatchNorm(16, momentum=0.5, rngs=rngs)
        self.out = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.bn(self.fc(x))))


def _split_bn(model, reseed=False):
    graphdef, params, state = nnx.split(model, nnx.Param, ...)

    def apply_fn(p, s, x, key):
        m = nnx.merge(graphdef, p, s, copy=True)
        if key is None:
            m.eval()
        elif reseed:
            gates.reseed(m, key)
        return m(x), [], nnx.state(m, nnx.Not(nnx.Param))

    return apply_fn, params, state


def test_adversarial_step_updates_batchnorm_statistics_from_the_clean_pass():
    model = _BNNet(nnx.Rngs(0))
    apply_fn, params, state = _split_bn(model)
    x, y = _data(jax.random.key(1))
    tx = optax.sgd(0.1)
    step = adversarial.adversarial_step(apply_fn, tx, clean_weight=0.5, has_state=True, **KW)
    new_params, new_state, _, m = step(params, state, tx.init(params), x, y, jax.random.key(3))
    h = np.asarray(x @ params["fc"]["kernel"][...] + params["fc"]["bias"][...])
    # momentum 0.5 from mean 0 and var 1: the clean batch's statistics, halfway.
    np.testing.assert_allclose(new_state["bn"]["mean"][...], 0.5 * h.mean(0), atol=1e-5)
    np.testing.assert_allclose(new_state["bn"]["var"][...], 0.5 + 0.5 * h.var(0), rtol=1e-4)
    assert bool(jnp.isfinite(m["loss"]))
    assert not np.allclose(new_params["out"]["kernel"][...], params["out"]["kernel"][...])


def test_anp_vs_step_threads_the_state_of_the_clean_pass():
    model = _BNNet(nnx.Rngs(0))
    gates.attach(model, GATE, key=jax.random.key(1), skip=("fc",))
    apply_fn, params, state = _split_bn(model, reseed=True)

    def kl(p):
        return gates.model_penalty(nnx.merge(graphdef, p, state, copy=True))

    graphdef = nnx.graphdef(model)
    x, y = _data(jax.random.key(1))
    tx = optax.sgd(0.1)
    step = adversarial.anp_vs_step(apply_fn, kl, tx, num_train=32, has_state=True, **KW)
    k = jax.random.key(5)
    _, new_state, _, m = step(params, state, tx.init(params), x, y, k)
    k_gate, _ = jax.random.split(k)
    expected = apply_fn(params, state, x, k_gate)[2]  # the clean training pass's state
    np.testing.assert_allclose(new_state["bn"]["mean"][...], expected["bn"]["mean"][...], atol=1e-6)
    assert float(jnp.abs(new_state["bn"]["mean"][...]).max()) > 1e-3  # it moved from 0
    assert set(m) == {"ce", "ce_adv", "kl", "vulnerability", "acc", "acc_adv"}


def test_batchnorm_model_trained_with_state_is_accurate_in_eval_mode():
    model = _BNNet(nnx.Rngs(0))
    apply_fn, params, state = _split_bn(model)
    x, y = _data(jax.random.key(1), 256)
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)
    step = adversarial.adversarial_step(
        apply_fn, tx, eps=0.02, step_size=0.01, steps=1, clean_weight=0.5, has_state=True
    )
    for i in range(60):
        params, state, opt_state, _ = step(params, state, opt_state, x, y, jax.random.key(i))
    eval_acc = float(jnp.mean(apply_fn(params, state, x, None)[0].argmax(-1) == y))
    train_acc = float(jnp.mean(apply_fn(params, state, x, jax.random.key(0))[0].argmax(-1) == y))
    assert eval_acc > 0.8 and abs(eval_acc - train_acc) < 0.1, (eval_acc, train_acc)
    r = adversarial.robustness(
        lambda ps, z, k: apply_fn(*ps, z, k)[:2],
        (params, state),
        x,
        y,
        key=jax.random.key(0),
        eps=0.02,
        step_size=0.01,
        steps=2,
    )
    assert r["clean_acc"] == pytest.approx(eval_acc)


def test_has_state_apply_fn_must_return_the_state():
    tx = optax.sgd(0.1)
    step = adversarial.adversarial_step(lambda p, s, x, k: (x @ p, []), tx, has_state=True, **KW)
    x, y = _data(jax.random.key(1), 4)
    w = jnp.ones((8, 3))
    with pytest.raises(ValueError, match=r"has_state=True apply_fn must return \(logits, "):
        step(w, None, tx.init(w), x, y, jax.random.key(0))
    with pytest.raises(ValueError, match="has_state must be a bool"):
        adversarial.adversarial_step(_apply, tx, has_state="yes", **KW)


# -- 4. penalty_fn and penalty_weight go together ------------------------------------------


def test_penalty_fn_and_penalty_weight_are_refused_alone(key):
    tx = optax.sgd(0.1)
    with pytest.raises(ValueError, match=r"penalty_fn is given but penalty_weight is not.*Fix"):
        adversarial.adversarial_step(_apply, tx, penalty_fn=_kl, **KW)
    with pytest.raises(ValueError, match=r"penalty_weight=0.5 is given but penalty_fn is not"):
        adversarial.adversarial_step(_apply, tx, penalty_weight=0.5, **KW)
    tree = _tree(key)
    x, y = _data(jax.random.key(1))
    k = jax.random.key(3)
    losses = {}
    for weight in (0.0, 1.0):  # 0.0 with a penalty_fn turns it off explicitly
        kw = dict(eps=0.05, step_size=0.02, steps=1)
        step = adversarial.adversarial_step(_apply, tx, penalty_fn=_kl, penalty_weight=weight, **kw)
        losses[weight] = float(step(tree, tx.init(tree), x, y, k)[2]["loss"])
    assert losses[1.0] == pytest.approx(losses[0.0] + float(_kl(tree)), rel=1e-5)


# -- 5. eps=0 with step_size=eps/4 ----------------------------------------------------------


def test_eps_zero_accepts_step_size_zero_as_the_identity_attack(key):
    tree = _tree(key)
    x, y = _data(jax.random.key(1), 16)
    adv = adversarial.pgd(
        lambda z: adversarial.cross_entropy(_apply(tree, z, None)[0], y),
        x,
        eps=0.0,
        step_size=0.0,
        steps=3,
        key=jax.random.key(2),
    )
    np.testing.assert_array_equal(adv, x)
    np.testing.assert_array_equal(
        adversarial.attack(_apply, eps=0.0, step_size=0.0, steps=2)(tree, x, y, key), x
    )
    r = adversarial.robustness(
        _apply, tree, np.asarray(x), np.asarray(y), eps=0.0, step_size=0.0, steps=2, key=key
    )
    assert r["adv_acc"] == r["clean_acc"] and r["vulnerability"] == 0.0
    # The example's training step size, 2.5 * eps / steps, is 0 too: accepted.
    adversarial.anp_vs_step(
        _apply, _kl, optax.sgd(0.1), num_train=16, eps=0.0, step_size=0.0, steps=2
    )
    with pytest.raises(ValueError, match=r"step_size must be >= 0, got -0.1 .*eps=0"):
        adversarial.attack(_apply, eps=0.0, step_size=-0.1, steps=2)
    # eps > 0: the fix is a positive number, not eps / 4 of a zero eps.
    with pytest.raises(ValueError, match=r"step_size must be > 0 .*got 0.0.*step_size=0.025"):
        adversarial.attack(_apply, eps=0.1, step_size=0.0, steps=2)


# -- 6. the fix for refused labels ----------------------------------------------------------


def test_column_labels_are_told_to_drop_the_axis_not_argmax():
    logits = jnp.array([[2.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    with pytest.raises(ValueError, match=r"y\[\.\.\., 0\] \(or y.squeeze\(-1\)\)\.$") as e:
        adversarial.cross_entropy(logits, jnp.array([[0], [2]], jnp.int32))
    assert "argmax" not in str(e.value)
    with pytest.raises(ValueError, match=r"y\[\.\.\., 0\]\.astype\(jnp.int32\)"):
        adversarial.cross_entropy(logits, jnp.array([[0.0], [2.0]]))
    with pytest.raises(ValueError, match=r"y.argmax\(-1\) for one-hot"):
        adversarial.cross_entropy(logits, jax.nn.one_hot(jnp.array([0, 2]), 3))
    with pytest.raises(ValueError, match=r"cast the class indices, y.astype\(jnp.int32\)"):
        adversarial.cross_entropy(logits, jnp.array([0.0, 2.0]))
    # The fix it gives works.
    y = jnp.array([[0], [2]], jnp.int32)
    np.testing.assert_allclose(
        adversarial.cross_entropy(logits, y[..., 0]),
        adversarial.cross_entropy(logits, jnp.array([0, 2])),
    )


# -- 7. robustness(batch_size=...) ---------------------------------------------------------


@pytest.mark.parametrize("batch_size", [0, -5, 2.5, True, None])
def test_robustness_batch_size_must_be_a_positive_int(key, batch_size):
    x, y = _data(jax.random.key(1), 4)
    with pytest.raises(ValueError, match=rf"batch_size must be an int >= 1, got {batch_size!r}"):
        adversarial.robustness(
            _apply, _tree(key), np.asarray(x), np.asarray(y), key=key, batch_size=batch_size, **KW
        )


# -- 10. the full nnx state as params --------------------------------------------------------


def test_full_nnx_state_as_params_names_the_key_leaves_and_the_fix():
    m = models.MLP((6, 8, 3), rngs=nnx.Rngs(0))
    gates.attach(m, gates.BetaBernoulli(), key=jax.random.key(1), skip=("layers/1",))
    graphdef, state = nnx.split(m)

    def apply_fn(s, z, key):
        mm = nnx.merge(graphdef, s, copy=True)
        if key is None:
            mm.eval()
        else:
            gates.reseed(mm, key)
        return gates.with_features(mm, z)

    def kl(s):
        return gates.model_penalty(nnx.merge(graphdef, s, copy=True))

    tx = optax.adam(1e-3)
    x, y = jax.random.uniform(jax.random.key(2), (4, 6)), jnp.arange(4) % 3
    match = r"1 is not floating point: layers/0/gate_key \(key<fry>\).*nnx.split\(model, nnx.Param"
    for name, step in [
        ("anp_vs_step", adversarial.anp_vs_step(apply_fn, kl, tx, num_train=4, **KW)),
        ("adversarial_step", adversarial.adversarial_step(apply_fn, tx, **KW)),
    ]:
        with pytest.raises(ValueError, match=name + " differentiates .*" + match):
            step(state, tx.init(state), x, y, jax.random.key(0))


# -- 11. attack as FGSM ---------------------------------------------------------------------


def test_attack_without_keep_best_is_fgsm_and_the_default_never_lowers_the_loss():
    # A 2-class model whose loss is not monotone along the gradient sign at this radius.
    def apply_fn(w, x, key):
        s = jnp.sin(w * x[:, 0])
        return jnp.stack([s, -s], -1), []

    w, x, y, eps = 10.0, jnp.array([[0.5], [0.2]]), jnp.array([0, 0]), 0.4
    fgsm = adversarial.fgsm(
        lambda z: adversarial.cross_entropy(apply_fn(w, z, None)[0], y), x, eps=eps
    )
    kw = dict(eps=eps, step_size=eps, steps=1, random_start=False)
    plain = adversarial.attack(apply_fn, keep_best=False, **kw)(w, x, y, jax.random.key(0))
    np.testing.assert_allclose(plain, fgsm, atol=1e-6)
    best = adversarial.attack(apply_fn, **kw)(w, x, y, jax.random.key(0))

    def ce(z):
        return adversarial.cross_entropy(apply_fn(w, z, None)[0], y)

    assert float(ce(fgsm)[0]) < float(ce(x)[0])  # the FGSM step lowers example 0's loss
    np.testing.assert_array_equal(best[0], x[0])  # so the default keeps the clean x
    assert bool(jnp.all(ce(best) >= ce(x) - 1e-6))
    with pytest.raises(ValueError, match="keep_best must be a bool"):
        adversarial.attack(apply_fn, keep_best="no", **kw)
