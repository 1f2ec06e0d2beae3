"""Attacks, vulnerability and the ANP-VS step: eps-ball, monotone loss, jit, gradients, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxprune import adversarial, gates


def _params(key):
    k1, k2 = jax.random.split(key)
    return {
        "hidden": {"kernel": jax.random.normal(k1, (8, 16)) * 0.5, "bias": jnp.zeros(16)},
        "out": {"kernel": jax.random.normal(k2, (16, 3)) * 0.5, "bias": jnp.zeros(3)},
    }


def _data(key, n=32):
    x = jax.random.uniform(key, (n, 8))
    y = (x[:, 0] > 0.5).astype(jnp.int32) + (x[:, 1] > 0.5)
    return x, y


GATE = gates.BetaBernoulli()


def _apply(tree, x, key):
    """A gated MLP in the functional form: (logits, [hidden pre-activations])."""
    p = gates.apply_gates(GATE, tree["params"], tree["gates"], key=key)
    h = x @ p["hidden"]["kernel"] + p["hidden"]["bias"]
    return jax.nn.relu(h) @ p["out"]["kernel"] + p["out"]["bias"], [h]


def _tree(key):
    params = _params(key)
    gp = gates.init_gates(GATE, params, where=lambda path, x: path == ("hidden", "kernel"))
    return {"params": params, "gates": gp}


def _kl(tree):
    return gates.penalty(GATE, tree["gates"])


def test_pgd_stays_in_ball_and_bounds_and_never_lowers_the_loss(key):
    tree = _tree(key)
    x, y = _data(jax.random.key(1))

    def loss(z):
        return adversarial.cross_entropy(_apply(tree, z, None)[0], y)

    eps = 0.1

    @jax.jit
    def run(x, k):
        return adversarial.pgd(loss, x, eps=eps, step_size=0.03, steps=10, key=k)

    adv = run(x, jax.random.key(2))
    assert float(jnp.max(jnp.abs(adv - x))) <= eps + 1e-6
    assert float(jnp.min(adv)) >= 0.0 and float(jnp.max(adv)) <= 1.0
    assert bool(jnp.all(loss(adv) >= loss(x) - 1e-6))
    assert float(jnp.mean(loss(adv))) > float(jnp.mean(loss(x)))
    np.testing.assert_array_equal(adv, run(x, jax.random.key(2)))  # deterministic given a key
    assert not np.array_equal(adv, run(x, jax.random.key(3)))
    # Without keep_best the last iterate is returned; it is still in the ball.
    last = adversarial.pgd(loss, x, eps=eps, step_size=0.03, steps=10, keep_best=False)
    assert float(jnp.max(jnp.abs(last - x))) <= eps + 1e-6


def test_pgd_and_fgsm_on_a_linear_loss_hand_computed():
    w = jnp.array([1.0, -2.0, 0.5, 0.0])
    x = jnp.array([[0.5, 0.5, 0.98, 0.3]])

    def loss(z):
        return z @ w

    # The maximizer of w.z in the clipped ball: x + eps * sign(w), clipped to [0, 1].
    expected = [[0.6, 0.4, 1.0, 0.3]]
    np.testing.assert_allclose(adversarial.fgsm(loss, x, eps=0.1), expected, atol=1e-6)
    adv = adversarial.pgd(loss, x, eps=0.1, step_size=0.04, steps=5)
    np.testing.assert_allclose(adv, expected, atol=1e-6)


def test_attack_and_robustness(key):
    tree = _tree(key)
    x, y = _data(jax.random.key(1), 40)
    run = adversarial.attack(_apply, eps=0.2, step_size=0.05, steps=5)
    adv = run(tree, x, y, jax.random.key(0))
    assert float(jnp.max(jnp.abs(adv - x))) <= 0.2 + 1e-6
    r = adversarial.robustness(
        _apply,
        tree,
        np.asarray(x),
        np.asarray(y),
        eps=0.2,
        step_size=0.05,
        steps=5,
        key=key,
        batch_size=16,
    )
    assert 0 <= r["adv_acc"] <= r["clean_acc"] <= 1
    assert r["vulnerability"] > 0


def test_vulnerability_hand_computed():
    z = [jnp.array([[0.0, 1.0]]), jnp.array([1.0, 2.0, 3.0])]
    z_adv = [jnp.array([[0.5, 0.0]]), jnp.array([1.0, 2.0, 0.0])]
    # Per feature: mean(|.|) = 0.75 and 1.0; the network value is their mean.
    np.testing.assert_allclose(adversarial.vulnerability(z, z_adv), 0.875)
    np.testing.assert_allclose(adversarial.vulnerability_loss(z, z_adv, 1e-3), 0.875e-3)


def test_anp_vs_step_gradients_are_split_between_masks_and_weights(key):
    tree = _tree(key)
    x, y = _data(jax.random.key(1))
    beta, lam, n = 4.0, 0.5, 1000
    kw = dict(eps=0.1, step_size=0.03, steps=3)
    step = adversarial.anp_vs_step(
        _apply, _kl, optax.sgd(1.0), num_train=n, beta=beta, lam=lam, **kw
    )
    k = jax.random.key(9)
    new, _, metrics = step(tree, optax.sgd(1.0).init(tree), x, y, k)

    # The same step by hand: same gate sample, same PGD example, two losses.
    @jax.jit
    def by_hand(tree):
        k_gate, k_start = jax.random.split(k)
        x_adv = adversarial.pgd(
            lambda z: adversarial.cross_entropy(_apply(tree, z, k_gate)[0], y),
            x,
            key=k_start,
            **kw,
        )

        def parts(t):
            logits, f = _apply(t, x, k_gate)
            logits_adv, f_adv = _apply(t, x_adv, k_gate)
            ce = adversarial.cross_entropy(logits, y).mean()
            ce_adv = adversarial.cross_entropy(logits_adv, y).mean()
            return ce, ce_adv, beta * _kl(t) / n, lam * adversarial.vulnerability(f, f_adv)

        g_w = jax.grad(lambda t: (lambda c, a, k, v: (c + 2 * a) / 3 + k + v)(*parts(t)))(tree)
        g_m = jax.grad(lambda t: (lambda c, a, k, v: a + k)(*parts(t)))(tree)
        return g_w, g_m

    g_w, g_m = by_hand(tree)
    w0, w1 = tree["params"]["hidden"]["kernel"], new["params"]["hidden"]["kernel"]
    np.testing.assert_allclose(w1, w0 - g_w["params"]["hidden"]["kernel"], rtol=1e-4, atol=1e-5)
    gname = "hidden/kernel"
    np.testing.assert_allclose(
        new["gates"][gname]["gate_a"],
        tree["gates"][gname]["gate_a"] - g_m["gates"][gname]["gate_a"],
        rtol=1e-4,
        atol=1e-5,
    )
    assert float(metrics["vulnerability"]) > 0 and float(metrics["kl"]) > 0


def test_anp_vs_step_adv_weight_and_test_time_attack_match_a_hand_step(key):
    tree = _tree(key)
    x, y = _data(jax.random.key(1))
    beta, lam, n, w = 4.0, 0.5, 1000, 5.0
    kw = dict(eps=0.1, step_size=0.03, steps=3)
    step = adversarial.anp_vs_step(
        _apply,
        _kl,
        optax.sgd(1.0),
        num_train=n,
        beta=beta,
        lam=lam,
        adv_weight=w,
        attack_gates="test",
        **kw,
    )
    k = jax.random.key(9)
    new, _, _ = step(tree, optax.sgd(1.0).init(tree), x, y, k)
    k_gate, k_start = jax.random.split(k)
    # The attack sees the deterministic test-time network (key None) ...
    x_adv = adversarial.pgd(
        lambda z: adversarial.cross_entropy(_apply(tree, z, None)[0], y), x, key=k_start, **kw
    )

    def weights_loss(t):
        logits, f = _apply(t, x, k_gate)
        logits_adv, f_adv = _apply(t, x_adv, k_gate)
        ce = adversarial.cross_entropy(logits, y).mean()
        ce_adv = adversarial.cross_entropy(logits_adv, y).mean()
        # ... and the weights see (CE + w CE_adv) / (1 + w) with w = adv_weight.
        vuln = lam * adversarial.vulnerability(f, f_adv)
        return (ce + w * ce_adv) / (1 + w) + beta * _kl(t) / n + vuln

    g_w = jax.grad(weights_loss)(tree)
    w0, w1 = tree["params"]["hidden"]["kernel"], new["params"]["hidden"]["kernel"]
    np.testing.assert_allclose(w1, w0 - g_w["params"]["hidden"]["kernel"], rtol=1e-4, atol=1e-5)
    # The default (sampled-gate attack, w = 2) is a different step.
    other = adversarial.anp_vs_step(
        _apply, _kl, optax.sgd(1.0), num_train=n, beta=beta, lam=lam, **kw
    )
    new2, _, _ = other(tree, optax.sgd(1.0).init(tree), x, y, k)
    assert not np.allclose(new2["params"]["hidden"]["kernel"], w1, atol=1e-6)


def test_adversarial_step_clean_weight_is_the_reference_mix(key):
    tree = _tree(key)
    x, y = _data(jax.random.key(1))
    kw = dict(eps=0.1, step_size=0.03, steps=2)
    k = jax.random.key(4)
    step = adversarial.adversarial_step(
        _apply, optax.sgd(1.0), clean_weight=1 / 3, attack_gates="test", **kw
    )
    new, _, metrics = step(tree, optax.sgd(1.0).init(tree), x, y, k)
    k_gate, k_start = jax.random.split(k)
    x_adv = adversarial.pgd(
        lambda z: adversarial.cross_entropy(_apply(tree, z, None)[0], y), x, key=k_start, **kw
    )

    def loss(t):
        ce = adversarial.cross_entropy(_apply(t, x, k_gate)[0], y).mean()
        ce_adv = adversarial.cross_entropy(_apply(t, x_adv, k_gate)[0], y).mean()
        return (ce + 2 * ce_adv) / 3

    np.testing.assert_allclose(metrics["loss"], loss(tree), rtol=1e-5)
    g = jax.grad(loss)(tree)
    np.testing.assert_allclose(
        new["params"]["out"]["kernel"],
        tree["params"]["out"]["kernel"] - g["params"]["out"]["kernel"],
        rtol=1e-4,
        atol=1e-5,
    )


def test_adversarial_step_reduces_the_adversarial_loss(key):
    tree = _tree(key)
    x, y = _data(jax.random.key(1), 64)
    tx = gates.multi_transform(optax.adam(3e-2), optax.adam(1e-2))
    step = adversarial.adversarial_step(
        _apply,
        tx,
        eps=0.05,
        step_size=0.02,
        steps=2,
        clean_weight=0.5,
        penalty_fn=_kl,
        penalty_weight=1e-4,
    )
    state = tx.init(tree)
    losses = []
    for i in range(30):
        tree, state, m = step(tree, state, x, y, jax.random.fold_in(key, i))
        losses.append(float(m["loss"]))
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(eps=-0.1), r"eps must be a finite number >= 0 .*got -0.1"),
        (dict(eps=float("nan")), r"eps must be a finite number"),
        (dict(step_size=0.0), r"step_size must be > 0"),
        (dict(step_size=float("inf")), r"step_size must be finite, got inf"),
        (dict(steps=0), r"steps must be an int >= 1"),
        (dict(steps=2.5), r"steps must be an int >= 1"),
        (dict(bounds=(1.0, 0.0)), r"bounds must be \(low, high\) with low < high"),
    ],
)
def test_bad_attack_hyperparameters(kwargs, match):
    args = dict(eps=0.1, step_size=0.01, steps=3) | kwargs
    with pytest.raises(ValueError, match=match):
        adversarial.pgd(lambda z: jnp.sum(z, axis=1), jnp.zeros((1, 2)), **args)
    with pytest.raises(ValueError, match=match):
        adversarial.attack(_apply, **args)


def test_bad_training_hyperparameters():
    kw = dict(eps=0.1, step_size=0.01, steps=1)
    tx = optax.sgd(0.1)
    with pytest.raises(ValueError, match=r"beta must be >= 0, got -1.0"):
        adversarial.anp_vs_step(_apply, _kl, tx, num_train=10, beta=-1.0, **kw)
    with pytest.raises(ValueError, match=r"lam must be >= 0"):
        adversarial.anp_vs_step(_apply, _kl, tx, num_train=10, lam=-1.0, **kw)
    with pytest.raises(ValueError, match=r"num_train must be >= 1"):
        adversarial.anp_vs_step(_apply, _kl, tx, num_train=0, **kw)
    with pytest.raises(ValueError, match=r"clean_weight must be in \[0, 1\], got 2.0. Fix"):
        adversarial.adversarial_step(_apply, tx, clean_weight=2.0, **kw)
    with pytest.raises(ValueError, match=r"clean_weight must be in \[0, 1\], got True. Fix"):
        adversarial.adversarial_step(_apply, tx, clean_weight=True, **kw)
    with pytest.raises(ValueError, match=r"adv_weight must be >= 0, got -2.0"):
        adversarial.anp_vs_step(_apply, _kl, tx, num_train=10, adv_weight=-2.0, **kw)
    with pytest.raises(ValueError, match=r"attack_gates must be one of .*got 'eval'"):
        adversarial.anp_vs_step(_apply, _kl, tx, num_train=10, attack_gates="eval", **kw)
    with pytest.raises(ValueError, match=r"attack_gates must be one of .*Fix"):
        adversarial.adversarial_step(_apply, tx, attack_gates=None, **kw)
    with pytest.raises(ValueError, match=r"eps must be a finite number >= 0"):
        adversarial.fgsm(lambda z: z.sum(1), jnp.zeros((1, 2)), eps=-1.0)
    with pytest.raises(ValueError, match="vulnerability needs the same non-empty list"):
        adversarial.vulnerability([jnp.ones(2)], [])


def test_inputs_outside_bounds_are_refused_not_clipped(key):
    xn = jax.random.normal(key, (4, 3))  # standardized inputs, outside [0, 1]
    with pytest.raises(ValueError, match=r"x lies in \[.*\], outside bounds=\(0.0, 1.0\)"):
        adversarial.pgd(lambda z: jnp.sum(z, axis=1), xn, eps=0.03, step_size=0.01, steps=2)
    with pytest.raises(ValueError, match="pass the data range of x as bounds"):
        adversarial.fgsm(lambda z: jnp.sum(z, axis=1), xn, eps=0.03)
    # With their own range, the ball holds.
    lo, hi = float(jnp.min(xn)), float(jnp.max(xn))
    adv = adversarial.pgd(
        lambda z: jnp.sum(z, axis=1), xn, eps=0.03, step_size=0.01, steps=2, bounds=(lo, hi)
    )
    assert float(jnp.max(jnp.abs(adv - xn))) <= 0.03 + 1e-6


def test_integer_inputs_are_refused_with_the_scaling_fix():
    x = jnp.full((2, 3), 200, jnp.uint8)
    with pytest.raises(ValueError, match=r"x must be floating point .* got dtype uint8.*/ 255"):
        adversarial.pgd(lambda z: jnp.sum(z, axis=1), x, eps=0.1, step_size=0.05, steps=2)
    with pytest.raises(ValueError, match=r"x must be floating point .* got dtype int32"):
        adversarial.fgsm(lambda z: jnp.sum(z, axis=1), x.astype(jnp.int32), eps=0.1)


@pytest.mark.parametrize("eps", [0.03, 0.1, 0.3, 8 / 255])
def test_float32_attacks_stay_in_the_exact_eps_ball(eps):
    # x +- eps rounds in float32, and float32(0.3) > 0.3: checked in float64.
    x = jax.random.uniform(jax.random.key(0), (4000,))
    adv = adversarial.fgsm(lambda z: jnp.sum(jnp.sin(50 * z)), x, eps=eps)
    pgd = jax.jit(
        lambda x: adversarial.pgd(
            lambda z: jnp.sin(50 * z), x, eps=eps, step_size=eps / 3, steps=4, key=jax.random.key(1)
        )
    )(x)
    for a in (adv, pgd):
        d = np.abs(np.asarray(a, np.float64) - np.asarray(x, np.float64))
        assert float(d.max()) <= eps
    # FGSM steps to the sphere wherever the data range allows: the ball is not shrunk.
    d = np.abs(np.asarray(adv, np.float64) - np.asarray(x, np.float64))
    assert float(np.mean(d > 0.999 * eps)) > 0.5
