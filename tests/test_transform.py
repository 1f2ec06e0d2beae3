"""jp.prune: enforcement, refresh steps, pytrees, extra args, errors."""

import functools
from typing import NamedTuple

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import jaxprune as jp


def _record_inner():
    """An inner optimizer (sgd 0.1) that remembers the gradients it was given."""

    def init(params):
        return jax.tree.map(jnp.zeros_like, params)

    def update(updates, state, params=None):
        del state, params
        return jax.tree.map(lambda g: -0.1 * g, updates), updates

    return optax.GradientTransformation(init, update)


def _params(key):
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (20, 10)),
        "b": jnp.zeros(10),
        "w2": jax.random.normal(k2, (10, 5)),
    }


def test_pruned_grads_zeroed_before_inner_and_params_exactly_zero(key):
    params = _params(key)
    tx = jp.prune(_record_inner(), sparsity=0.6)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, state = jax.jit(tx.update)(grads, state, params)
    new = optax.apply_updates(params, updates)
    masks = jp.get_masks(state)
    seen = state.inner_state
    for name in ("w1", "w2"):
        m = np.asarray(masks[name])
        assert (~m).sum() == round(0.6 * m.size)
        assert np.all(np.asarray(seen[name])[~m] == 0) and np.all(np.asarray(seen[name])[m] == 1)
        assert np.all(np.asarray(new[name])[~m] == 0)
        np.testing.assert_allclose(np.asarray(new[name])[m], np.asarray(params[name])[m] - 0.1)
    np.testing.assert_allclose(new["b"], params["b"] - 0.1)


def test_refresh_only_on_schedule_steps(key):
    params = _params(key)
    sched = jp.schedules.polynomial(0.0, 0.8, begin_step=2, end_step=12, frequency=5)
    tx = jp.prune(optax.sgd(0.01), sparsity=sched)
    state = tx.init(params)
    step = jax.jit(lambda p, s: tx.update(jax.tree.map(jnp.ones_like, p), s, p))
    history = []
    for _ in range(16):
        updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
        history.append(float(jp.sparsity(jp.get_masks(state))))
    changes = [t for t in range(1, 16) if history[t] != history[t - 1]]
    assert history[0] == 0.0 and changes == [7, 12]
    assert history[-1] == pytest.approx(0.8, abs=1 / 250)
    assert float(jp.sparsity(params)) == pytest.approx(history[-1])


def test_global_scope_exact_total(key):
    params = _params(key)
    tx = jp.prune(optax.adam(1e-3), sparsity=0.75, scope="global")
    state = tx.init(params)
    _, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    m = jp.get_masks(state)
    assert int((~m["w1"]).sum() + (~m["w2"]).sum()) == round(0.75 * 250)


def test_extra_args_reach_criterion(key):
    params = _params(key)

    def by_batch_stat(params, *, stat):
        return jax.tree.map(lambda p: jnp.abs(p) * stat, params)

    tx = jp.prune(optax.sgd(0.1), sparsity=0.5, criterion=by_batch_stat)
    state = tx.init(params)
    stat = jnp.float32(-1.0)  # flips the ranking: the largest |w| get pruned
    _, state = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), state, params, stat=stat)
    m = np.asarray(jp.get_masks(state)["w1"])
    w = np.abs(np.asarray(params["w1"]))
    assert w[m].max() <= w[~m].min()


def test_random_criterion_key_from_update_is_used(key):
    params = _params(key)
    tx = jp.prune(optax.sgd(0.1), sparsity=0.5, criterion=jp.criteria.random)
    s0 = tx.init(params)
    g = jax.tree.map(jnp.ones_like, params)
    m1 = jp.get_masks(tx.update(g, s0, params, key=jax.random.key(1))[1])
    m2 = jp.get_masks(tx.update(g, s0, params, key=jax.random.key(1))[1])
    m3 = jp.get_masks(tx.update(g, s0, params, key=jax.random.key(2))[1])
    np.testing.assert_array_equal(m1["w1"], m2["w1"])
    assert not np.array_equal(m1["w1"], m3["w1"])


class Pair(NamedTuple):
    kernel: jax.Array
    bias: jax.Array


@pytest.mark.parametrize(
    "make",
    [
        lambda k: [jax.random.normal(k, (8, 8)), jnp.ones(8)],
        lambda k: (jax.random.normal(k, (8, 8)), jnp.ones(8)),
        lambda k: Pair(jax.random.normal(k, (8, 8)), jnp.ones(8)),
        lambda k: {"a": [Pair(jax.random.normal(k, (8, 8)), jnp.ones(8))]},
    ],
    ids=["list", "tuple", "namedtuple", "nested"],
)
def test_any_pytree(make, key):
    params = make(key)
    tx = jp.prune(optax.sgd(0.1), sparsity=0.5)
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), state, params)
    new = optax.apply_updates(params, updates)
    assert jax.tree.structure(jp.get_masks(state)) == jax.tree.structure(params)
    assert float(jp.sparsity(new)) == 0.5


def test_equinox_module(key):
    model = eqx.nn.MLP(8, 4, width_size=16, depth=2, key=key)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    tx = jp.prune(optax.adam(1e-2), sparsity=0.5)
    state = tx.init(params)
    x = jnp.ones((3, 8))

    @jax.jit
    def step(params, state):
        loss = lambda p: jnp.mean(jax.vmap(eqx.combine(p, static))(x) ** 2)
        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        return eqx.apply_updates(params, updates), state

    params, state = step(params, state)
    for layer in params.layers:
        assert float(jp.sparsity(layer.weight, where=lambda p, x: True)) == 0.5
        assert float(jp.sparsity(layer.bias, where=lambda p, x: True)) == 0.0


def test_linen_train_state(key):
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4)(nn.relu(nn.Dense(16)(x)))

    net = Net()
    params = net.init(key, jnp.ones((1, 8)))["params"]
    sched = jp.schedules.polynomial(0.0, 0.9, begin_step=0, end_step=10, frequency=2)
    state = train_state.TrainState.create(
        apply_fn=net.apply, params=params, tx=jp.prune(optax.adam(1e-2), sparsity=sched)
    )
    x = jax.random.normal(key, (32, 8))

    @jax.jit
    def step(state):
        grads = jax.grad(lambda p: jnp.mean(state.apply_fn({"params": p}, x) ** 2))(state.params)
        return state.apply_gradients(grads=grads)

    for _ in range(12):
        state = step(state)
    assert float(jp.sparsity(state.params)) == pytest.approx(0.9, abs=0.01)
    assert jax.tree.structure(jp.get_masks(state.opt_state)) == jax.tree.structure(params)


def test_nnx_optimizer_wrapped_and_pure_paths():
    model = nnx.Sequential(nnx.Linear(8, 16, rngs=nnx.Rngs(0)), nnx.Linear(16, 4, rngs=nnx.Rngs(1)))
    seen = []
    where = lambda path, x: seen.append(path) or path[-1] == "kernel"
    opt = nnx.Optimizer(model, jp.prune(optax.sgd(0.1), sparsity=0.5, where=where), wrt=nnx.Param)
    init_paths = set(seen)
    x = jnp.ones((2, 8))

    @nnx.jit
    def step(model, opt):
        opt.update(model, nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model))

    step(model, opt)
    assert init_paths == set(seen)  # same paths whether Variable-wrapped or pure
    assert ("layers", 0, "kernel") in init_paths
    assert float(jp.sparsity(nnx.state(model, nnx.Param))) == 0.5
    masks = jp.get_masks(opt.opt_state)
    assert masks["layers"][0]["kernel"].dtype == jnp.bool_


def test_get_masks_through_wrappers(key):
    params = _params(key)
    tx = optax.MultiSteps(optax.chain(optax.clip(1.0), jp.prune(optax.sgd(0.1), sparsity=0.3)), 2)
    state = tx.init(params)
    assert jp.get_masks(state)["w1"].shape == (20, 10)


# Errors.


def test_unknown_scope():
    with pytest.raises(ValueError, match=r"scope must be 'layer'.*got 'per_layer'"):
        jp.prune(optax.sgd(0.1), sparsity=0.5, scope="per_layer")


def test_bad_sparsity():
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\].*got 1.5"):
        jp.prune(optax.sgd(0.1), sparsity=1.5)


def test_bad_criterion():
    with pytest.raises(ValueError, match=r"criterion must be a function"):
        jp.prune(optax.sgd(0.1), sparsity=0.5, criterion="magnitude")


def test_where_non_float_at_init():
    tx = jp.prune(optax.sgd(0.1), sparsity=0.5, where=lambda path, x: True)
    with pytest.raises(ValueError, match=r"where selected leaf 'count' of dtype int32"):
        tx.init({"w": jnp.ones((2, 2)), "count": jnp.zeros((), jnp.int32)})


def test_update_without_params(key):
    tx = jp.prune(optax.sgd(0.1), sparsity=0.5)
    params = _params(key)
    with pytest.raises(
        ValueError, match=r"needs the current params.*tx.update\(grads, state, params\)"
    ):
        tx.update(params, tx.init(params))


def test_random_without_key(key):
    tx = jp.prune(optax.sgd(0.1), sparsity=0.5, criterion=jp.criteria.random)
    params = _params(key)
    with pytest.raises(ValueError, match=r"needs a PRNG key: pass jp.prune\(\.\.\., key="):
        tx.update(params, tx.init(params), params)


def test_get_masks_without_prune_state(key):
    with pytest.raises(ValueError, match=r"opt_state holds no jp.prune state"):
        jp.get_masks(optax.adam(1e-3).init(_params(key)))


# --- Fused element-wise criteria ----------------------------------------------------------


def _tied_params(key):
    """Params with many exact ties, signed zeros, a large leaf (sampled search) and bf16."""
    k1, k2, k3 = jax.random.split(key, 3)
    big = jnp.round(jax.random.normal(k1, (300, 280)) * 4) / 4  # ~30 distinct values
    small = jax.random.normal(k2, (17, 13)).at[0, :5].set(-0.0).at[1, :5].set(0.0)
    return {
        "big": big,
        "small": small,
        "half": jax.random.normal(k3, (64, 24)).astype(jnp.bfloat16),
        "b": jnp.ones(13),
    }


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("name", ["magnitude", "saliency"])
def test_fused_elementwise_criterion_gives_the_generic_masks(key, scope, name):
    """magnitude/saliency are recomputed inside the search (fused): same masks, bit for bit.

    The same function wrapped in a lambda is not recognized as element-wise and
    takes the generic path (scores stored, then topk/global_topk).
    """
    params = _tied_params(key)
    crit = getattr(jp.criteria, name)
    generic = (lambda p: crit(p)) if name == "magnitude" else (lambda p, grads: crit(p, grads))
    sched = jp.schedules.polynomial(0.0, 0.8, 0, 6, frequency=2)
    txs = [
        jp.prune(optax.sgd(0.05), sparsity=sched, criterion=c, scope=scope) for c in (crit, generic)
    ]
    states = [tx.init(params) for tx in txs]
    ps = [params, params]
    updates = [jax.jit(tx.update) for tx in txs]
    for step in range(7):
        grads = jax.tree.map(
            lambda x, s=step: (jnp.round(jnp.cos(x.astype(jnp.float32) * (s + 1)) * 2) / 2).astype(
                x.dtype
            ),
            params,
        )
        for i in range(2):
            u, states[i] = updates[i](grads, states[i], ps[i])
            ps[i] = optax.apply_updates(ps[i], u)
        fused_masks, generic_masks = (jp.get_masks(s) for s in states)
        jax.tree.map(
            lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
            fused_masks,
            generic_masks,
        )
    n_pruned = sum(
        int((~m).sum())
        for m, f in zip(jax.tree.leaves(fused_masks), [1, 1, 0, 1], strict=True)
        if f
    )
    assert n_pruned > 0


def test_capped_global_scope_fuses_its_scores_with_the_same_masks(key, monkeypatch):
    """functools.partial(global_topk, max_sparsity=c) runs the fused search: the masks
    of the stored-score path, bit for bit, through a gradual schedule."""
    caps = []
    original = jp.masks.fused_select

    def counting(*args, **kwargs):
        caps.append(kwargs.get("max_sparsity"))
        return original(*args, **kwargs)

    monkeypatch.setattr(jp.masks, "fused_select", counting)
    ks = jax.random.split(key, 3)
    # A layer of small weights that an uncapped global search would empty.
    params = {
        "small": jax.random.normal(ks[0], (32, 16)) * 1e-3,
        "big": jax.random.normal(ks[1], (16, 64)),
        "ties": jnp.round(jax.random.normal(ks[2], (64, 8)), 1),
        "bias": jnp.zeros(8),
    }
    capped = functools.partial(jp.masks.global_topk, max_sparsity=0.9)
    sched = jp.schedules.polynomial(0.0, 0.95, 0, 6, frequency=2)
    fused = jp.prune(optax.sgd(0.1), sparsity=sched, scope=capped)
    stored = jp.prune(
        optax.sgd(0.1), sparsity=sched, scope=capped, criterion=lambda p: jp.criteria.magnitude(p)
    )
    states = {"fused": (params, fused.init(params)), "stored": (params, stored.init(params))}
    for i in range(8):
        grads = jax.tree.map(lambda x, c=0.01 * (i + 1): jnp.full_like(x, c), params)
        for name, tx in (("fused", fused), ("stored", stored)):
            p, s = states[name]
            u, s = jax.jit(tx.update)(grads, s, p)
            states[name] = (optax.apply_updates(p, u), s)
        a = jp.get_masks(states["fused"][1])
        b = jp.get_masks(states["stored"][1])
        for k in ("small", "big", "ties"):
            assert bool((a[k] == b[k]).all()), (i, k)
    assert caps and set(caps) == {0.9}  # the fused path ran (once, at trace time)
    masks = jp.get_masks(states["fused"][1])
    # The cap held: the small layer keeps 10% though the total asks for 95%.
    assert int(masks["small"].sum()) == 32 * 16 - int(0.9 * 32 * 16)


def test_fused_refresh_adds_no_scratch_to_the_train_step(key):
    """With magnitude scores fused into the search, the jitted train step needs no
    more of XLA's scratch memory than the dense step (up to small partial counts)."""

    def init(k):
        ks = jax.random.split(k, 3)
        sizes = [(256, 512), (512, 256), (256, 10)]
        return [
            {"w": jax.random.normal(kk, s) * 0.05, "b": jnp.zeros(s[1])}
            for kk, s in zip(ks, sizes, strict=True)
        ]

    def loss(p, x, y):
        for layer in p[:-1]:
            x = jax.nn.relu(x @ layer["w"] + layer["b"])
        logits = x @ p[-1]["w"] + p[-1]["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def temp_bytes(tx):
        def step(p, s, x, y):
            g = jax.grad(loss)(p, x, y)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        params = init(key)
        x, y = jnp.ones((64, 256)), jnp.zeros(64, jnp.int32)
        lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), x, y)
        analysis = lowered.compile().memory_analysis()
        if analysis is None:
            pytest.skip("this backend gives no memory analysis")
        return analysis.temp_size_in_bytes

    sched = jp.schedules.polynomial(0.0, 0.9, 0, 1000, frequency=100)
    dense = temp_bytes(optax.adam(1e-3))
    leaf = 512 * 256 * 4
    capped = functools.partial(jp.masks.global_topk, max_sparsity=0.95)
    for scope in ("layer", "global", capped):
        pruned = temp_bytes(jp.prune(optax.adam(1e-3), sparsity=sched, scope=scope))
        # What remains is strided samples of the scores and partial counts.
        assert pruned - dense < leaf // 2, (scope, pruned, dense)
    # The generic path stores the scores (full-size arrays), for comparison.
    generic = temp_bytes(
        jp.prune(optax.adam(1e-3), sparsity=sched, criterion=lambda p: jp.criteria.magnitude(p))
    )
    assert generic - dense >= leaf // 2, (generic, dense)


@pytest.mark.parametrize(
    "where",
    [None, lambda path, x: jnp.issubdtype(x.dtype, jnp.floating) and x.ndim >= 2],
    ids=["default", "dtype-based"],
)
def test_unfused_criteria_select_the_leaves_chosen_on_the_params(where):
    # Scores are float32 whatever the param dtype: `where` must not be asked
    # again about them (an int leaf would become prunable and break the state).
    params = {"kernel": jnp.arange(1.0, 25.0).reshape(4, 6), "table": jnp.ones((3, 3), jnp.int32)}
    tx = jp.prune(
        optax.sgd(0.1),
        sparsity=0.5,
        criterion=jp.criteria.random,
        where=where,
        key=jax.random.key(0),
    )
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), state, params)
    masks = jp.get_masks(state)
    assert int((~masks["kernel"]).sum()) == 12 and masks["table"].shape == ()


def test_low_precision_updates_still_zero_pruned_params_exactly():
    # Mixed precision: f32 params, bf16 gradients. -params rounded to bf16 would
    # leave pruned entries at about 1e-3 instead of 0.
    params = {"w": jax.random.normal(jax.random.key(0), (16, 16)) * 3.0}
    tx = jp.prune(optax.sgd(0.1), sparsity=0.5)
    state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.ones_like(p, jnp.bfloat16), params)
    updates, state = jax.jit(tx.update)(grads, state, params)
    new = optax.apply_updates(params, updates)
    assert new["w"].dtype == jnp.float32
    pruned = ~jp.get_masks(state)["w"]
    assert int(pruned.sum()) == 128 and float(jnp.abs(new["w"][pruned]).max()) == 0.0
    assert float(jp.sparsity(new)) == 0.5


def test_get_masks_under_optax_masked_applies_to_the_params():
    params = {
        "a": {"kernel": jnp.arange(1.0, 65.0).reshape(8, 8)},
        "b": {"kernel": jnp.ones((4, 4))},
    }
    tx = optax.masked(jp.prune(optax.sgd(0.1), sparsity=0.5), {"a": True, "b": False})
    state = tx.init(params)
    _, state = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), state, params)
    masks = jp.get_masks(state)
    assert masks["b"].shape == () and bool(masks["b"])  # untouched by the pruning
    out = jp.apply_masks(params, masks)
    assert int((out["a"]["kernel"] == 0).sum()) == 32 and bool((out["b"]["kernel"] == 1).all())


def test_sparsity_injected_as_a_hyperparameter_says_how_to_wrap_instead():
    tx = optax.inject_hyperparams(lambda sparsity: jp.prune(optax.sgd(0.1), sparsity=sparsity))(
        sparsity=0.5
    )
    params = {"w": jnp.ones((4, 4))}
    # Traced under jax.jit, a concrete jax.Array eagerly: refused either way (eagerly it
    # used to be held as a constant, pruned at step 0 only, whatever was injected later).
    with pytest.raises(ValueError, match=r"traced value .*jp.prune\(optax.inject_hyperparams"):
        jax.jit(tx.init)(params)
    with pytest.raises(ValueError, match=r"got a jax.Array .*jp.prune\(optax.inject_hyperparams"):
        tx.init(params)


def test_random_scores_of_a_leaf_do_not_depend_on_the_other_leaves():
    key = jax.random.key(0)
    before = jp.criteria.random({"b": jnp.zeros((3, 3)), "c": jnp.zeros(4)}, key=key)
    after = jp.criteria.random(
        {"a": jnp.zeros(2), "b": jnp.zeros((3, 3)), "c": jnp.zeros(4)}, key=key
    )
    for name in ("b", "c"):
        np.testing.assert_array_equal(before[name], after[name])
    assert not np.array_equal(before["b"].reshape(-1)[:4], before["c"])
