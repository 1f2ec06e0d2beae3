"""jp.prune and jp.dynamic around optimizers that read params or keep partial moment trees."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune as jp

_P = {"w": jax.random.normal(jax.random.key(0), (32, 32)) * 0.5}
_G = {"w": jax.random.normal(jax.random.key(1), (32, 32))}


@pytest.mark.parametrize(
    "make", [optax.lamb, optax.lars, optax.adafactor, lambda lr: optax.adamw(lr, weight_decay=0.5)]
)
def test_inner_optimizer_sees_the_pruned_params_on_a_refresh_step(make):
    # Reference: the same optimizer on the pruned model (pruned entries 0, their
    # grads zeroed). LAMB/LARS trust ratios and Adafactor's parameter scale read
    # the params' norm, which the entries pruned on this step must not inflate.
    opt = make(0.01)
    tx = jp.prune(opt, sparsity=0.9)  # one-shot at step 0
    u, s = tx.update(_G, tx.init(_P), _P)
    m = jp.get_masks(s)
    pruned_p = jp.apply_masks(_P, m)
    ref, _ = opt.update(jp.apply_masks(_G, m), opt.init(pruned_p), pruned_p)
    keep = np.asarray(m["w"])
    np.testing.assert_allclose(
        np.asarray(u["w"])[keep], np.asarray(ref["w"])[keep], rtol=1e-5, atol=1e-7
    )
    assert bool(jnp.all(optax.apply_updates(_P, u)["w"][~keep] == 0))


@pytest.mark.parametrize("make", [optax.lamb, optax.novograd])
def test_rigl_inner_optimizer_sees_the_rewired_sparse_model(make):
    opt = make(0.01)
    tx = jp.dynamic.rigl(
        opt,
        sparsity=0.5,
        key=jax.random.key(0),
        end_step=100,
        update_every=1,
        distribution=jp.distributions.uniform,
    )
    s = tx.init(_P)
    m0 = jp.get_masks(s)
    _, s = tx.update(_G, s, _P)  # step 0: no rewiring
    p1 = jp.apply_masks(_P, m0)
    g1 = {"w": jax.random.normal(jax.random.key(5), (32, 32))}
    inner_before = s.inner_state
    u, s = tx.update(g1, s, p1)  # step 1: drop and regrow
    m1 = np.asarray(jp.get_masks(s)["w"])
    stay = m1 & np.asarray(m0["w"])
    assert stay.sum() < m1.sum()  # something was regrown
    ref, _ = opt.update({"w": g1["w"] * stay}, inner_before, {"w": p1["w"] * stay})
    np.testing.assert_allclose(
        np.asarray(u["w"])[stay], np.asarray(ref["w"])[stay], rtol=1e-5, atol=1e-7
    )


_PARAMS = {
    "w1": jax.random.normal(jax.random.key(0), (16, 12)),
    "b1": jnp.zeros(12),
    "w2": jax.random.normal(jax.random.key(1), (12, 4)),
}


def _loss(p):
    x = jax.random.normal(jax.random.key(2), (32, 16))
    y = jax.random.normal(jax.random.key(3), (32, 4))
    return jnp.mean((jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] - y) ** 2)


@pytest.mark.parametrize(
    "opt",
    [
        optax.masked(optax.adam(0.01), {"w1": True, "b1": False, "w2": True}),
        optax.multi_transform(
            {"a": optax.adam(0.01), "b": optax.sgd(0.01)}, {"w1": "a", "b1": "b", "w2": "a"}
        ),
        optax.contrib.muon(0.01),
    ],
    ids=["masked", "multi_transform", "muon"],
)
def test_rigl_resets_moments_inside_partial_moment_trees(opt):
    # optax.masked / multi_transform / muon keep moments in params-shaped trees
    # with MaskedNode placeholders; those moments are reset like adam's.
    tx = jp.dynamic.rigl(
        opt,
        sparsity=0.5,
        key=jax.random.key(0),
        end_step=100,
        update_every=3,
        distribution=jp.distributions.uniform,
    )
    p, s = _PARAMS, tx.init(_PARAMS)
    step = jax.jit(lambda p, s: tx.update(jax.grad(_loss)(p), s, p))
    for _ in range(4):  # step 3 is the first rewiring
        m_old = jp.get_masks(s)["w1"]
        u, s = step(p, s)
        p = optax.apply_updates(p, u)
    changed = np.asarray(m_old != jp.get_masks(s)["w1"])
    assert changed.any()
    moments = [
        leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(s.inner_state)
        if getattr(leaf, "shape", None) == changed.shape and "'w1'" in jax.tree_util.keystr(path)
    ]
    assert moments
    for leaf in moments:
        assert not np.any(np.asarray(leaf)[changed])


@pytest.mark.parametrize("dynamic", [False, True])
def test_eager_updates_compile_once_not_at_every_step(dynamic):
    # Called outside jit, the update's lax.cond used to be traced and compiled
    # at every call (new closures each time): about a second per step.
    traces = []

    def criterion(params):
        traces.append(1)
        return jp.criteria.magnitude(params)

    p = {"w": jnp.arange(1.0, 65.0).reshape(8, 8)}
    g = jax.tree.map(lambda x: 0.01 * x, p)
    if dynamic:
        tx = jp.dynamic.rigl(
            optax.adam(1e-3), sparsity=0.5, key=jax.random.key(0), end_step=50, update_every=2
        )
    else:
        sched = jp.schedules.polynomial(0.0, 0.5, 0, 20, frequency=2)
        tx = jp.prune(optax.adam(1e-3), sparsity=sched, criterion=criterion)
    s = tx.init(p)
    for _ in range(6):
        u, s = tx.update(g, s, p)
        p = optax.apply_updates(p, u)
    assert tx.update.jitted._cache_size() == 1
    assert len(traces) == (0 if dynamic else 1)
    assert float(jp.sparsity(jp.get_masks(s))) > 0
