"""RigL / SET: constant sparsity through drop/grow, regrown weights at 0, moments reset."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune as jp
import jaxprune.distributions
import jaxprune.dynamic  # noqa: F401  (until jaxprune/__init__ exports it)
from tests._invariants import check_transform


def _params():
    k1, k2 = jax.random.split(jax.random.key(1))
    return {
        "a": {"kernel": jax.random.normal(k1, (16, 12)), "bias": jnp.zeros(12)},
        "b": {"kernel": jax.random.normal(k2, (12, 4)), "bias": jnp.zeros(4)},
    }


def _loss(p, x):
    h = jax.nn.relu(x @ p["a"]["kernel"] + p["a"]["bias"])
    return jnp.mean((h @ p["b"]["kernel"] + p["b"]["bias"]) ** 2)


INNERS = {
    "adam": lambda: optax.adam(1e-2),
    "sgd_momentum": lambda: optax.sgd(1e-2, momentum=0.9),
    "lion": lambda: optax.lion(1e-3),
    "adafactor": lambda: optax.adafactor(1e-2),
    "inject_adam": lambda: optax.inject_hyperparams(optax.adam)(learning_rate=1e-2),
}


def _count(tree):
    return sum(int(np.sum(~np.asarray(m))) for m in jax.tree.leaves(tree) if np.ndim(m) >= 2)


@pytest.mark.parametrize("name", sorted(INNERS))
def test_rigl_constant_sparsity_zero_regrowth_and_reset_moments(name):
    params = _params()
    tx = jp.dynamic.rigl(
        INNERS[name](),
        sparsity=0.8,
        key=jax.random.key(0),
        end_step=40,
        update_every=3,
        distribution=jp.distributions.uniform,
    )
    state = tx.init(params)
    x = jax.random.normal(jax.random.key(2), (8, 16))
    step = jax.jit(lambda p, s: tx.update(jax.grad(_loss)(p, x), s, p))
    pruned0 = _count(state.masks)
    assert pruned0 == round(0.8 * 16 * 12) + round(0.8 * 12 * 4)
    rewired = 0
    for t in range(7):
        old = state.masks
        updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
        assert _count(state.masks) == pruned0, "total sparsity changed across drop/grow"
        for path in ("a", "b"):
            m, m_old = np.asarray(state.masks[path]["kernel"]), np.asarray(old[path]["kernel"])
            w = np.asarray(params[path]["kernel"])
            assert np.all(w[~m] == 0)
            grown = m & ~m_old
            if t > 0 and grown.any():
                rewired += 1
                assert np.all(w[grown] == 0), "regrown weights must start at exactly 0"
                for leaf in jax.tree.leaves(state.inner_state):
                    if np.shape(leaf) == m.shape and leaf.dtype != jnp.int32:
                        assert np.all(np.asarray(leaf)[grown & ~m_old] == 0)
    assert rewired > 0


def test_set_regrows_at_random_and_keeps_counts():
    params = _params()
    tx = jp.dynamic.set(
        optax.sgd(1e-2, momentum=0.9), sparsity=0.5, key=jax.random.key(3), update_every=2
    )
    state = tx.init(params)
    x = jax.random.normal(jax.random.key(2), (8, 16))
    first = state.masks
    step = jax.jit(lambda p, s: tx.update(jax.grad(_loss)(p, x), s, p))
    for _ in range(5):
        updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
    assert _count(state.masks) == _count(first)
    before, after = np.asarray(first["a"]["kernel"]), np.asarray(state.masks["a"]["kernel"])
    assert not np.array_equal(before, after)
    assert float(jp.sparsity(state.masks)) == 0.5
    assert float(jp.sparsity(params)) >= 0.5  # regrown weights sit at exactly 0 at first


def test_erk_initial_masks_follow_the_distribution():
    params = _params()
    tx = jp.dynamic.rigl(optax.adam(1e-2), sparsity=0.7, key=jax.random.key(0), end_step=10)
    state = tx.init(params)
    target = jp.distributions.erk(params, 0.7)
    for path in ("a", "b"):
        m = np.asarray(state.masks[path]["kernel"])
        assert (~m).sum() == round(float(target[path]["kernel"]) * m.size)


def test_cosine_drop_fraction():
    f = lambda t: float(jp.dynamic.cosine_drop_fraction(t, alpha=0.3, end_step=100))
    assert f(0) == pytest.approx(0.3)
    assert f(50) == pytest.approx(0.15, abs=1e-6)
    assert f(100) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"sparsity": 1.5}, "sparsity must be a float in"),
        ({"update_every": 0}, "update_every must be a positive int"),
        ({"end_step": 0}, "end_step must be a positive int"),
        ({"drop_fraction": 2.0}, "drop_fraction must be in"),
        ({"regrow": "magic"}, "regrow must be 'gradient'"),
        ({"key": 0}, "key must be a PRNG key"),
    ],
)
def test_rigl_errors(kwargs, match):
    base = dict(sparsity=0.5, key=jax.random.key(0), end_step=10)
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        jp.dynamic.rigl(optax.adam(1e-2), **base)


def test_rigl_invariants():
    check_transform(
        lambda inner: jp.dynamic.rigl(
            inner, sparsity=0.5, key=jax.random.key(0), end_step=5, update_every=2
        )
    )


def test_set_invariants():
    check_transform(
        lambda inner: jp.dynamic.set(inner, sparsity=0.5, key=jax.random.key(0), update_every=2)
    )


def test_get_masks_finds_the_state_inside_chain_and_errors_otherwise():
    tx = optax.chain(
        optax.clip(1.0),
        jp.dynamic.rigl(optax.adam(1e-2), sparsity=0.5, key=jax.random.key(0), end_step=10),
    )
    masks = jp.dynamic.get_masks(tx.init(_params()))
    assert float(jp.sparsity(masks)) == pytest.approx(0.5, abs=0.01)
    # The core jp.get_masks finds the dynamic state too.
    same = jp.get_masks(tx.init(_params()))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), masks, same))
    with pytest.raises(ValueError, match="holds no jp.prune state"):
        jp.dynamic.get_masks(optax.adam(1e-2).init(_params()))


def test_update_without_params_is_an_error():
    tx = jp.dynamic.set(optax.adam(1e-2), sparsity=0.5, key=jax.random.key(0), update_every=2)
    params = _params()
    with pytest.raises(ValueError, match="needs the current params"):
        tx.update(params, tx.init(params))


@pytest.mark.parametrize("make", [jp.dynamic.rigl, jp.dynamic.set])
def test_unbuilt_optimizer_and_foreign_state_are_explained(make):
    for tx in (optax.adam, None):
        with pytest.raises(ValueError, match=r"tx must be an optax transformation.*Fix: build it"):
            make(tx, sparsity=0.5, key=jax.random.key(0), update_every=2, end_step=100)
    tx = make(optax.adam(1e-2), sparsity=0.5, key=jax.random.key(0), update_every=2, end_step=100)
    params = _params()
    name = make.__name__
    # The inner optimizer's state alone, or a checkpoint restored without a template.
    for state in (optax.adam(1e-2).init(params), {"count": 0, "packed_masks": {}}):
        kind = type(state).__name__
        with pytest.raises(
            ValueError,
            match=rf"jp.dynamic.{name}'s update got a state of type {kind}, not the "
            r"DynamicSparseState its init builds.*Fix: restore into a template",
        ):
            tx.update(params, state, params)


def test_masks_are_stored_packed_at_one_bit_per_prunable_entry():
    params = {"w": jnp.ones((64, 48)), "b": jnp.zeros(48)}
    tx = jp.dynamic.rigl(optax.sgd(0.1), sparsity=0.5, key=jax.random.key(0), end_step=10)
    state = tx.init(params)
    assert state.packed_masks["w"].bits.dtype == jnp.uint8
    b = jp.transform.state_bytes(state)
    # 64 x 48 bits = 384 bytes, plus the step counter, a scalar mask and the key.
    assert 384 <= b["pruning"] <= 384 + 32, b
    assert state.masks["w"].shape == (64, 48) and state.masks["w"].dtype == jnp.bool_


def test_rbg_key_and_a_jax_scalar_sparsity():
    p = {"w": jax.random.normal(jax.random.key(0), (16, 16))}
    key = jax.random.key(1, impl="rbg")
    tx = jp.dynamic.rigl(
        optax.adam(1e-3), sparsity=jnp.float32(0.5), key=key, end_step=100, update_every=1
    )
    st = tx.init(p)
    step = jax.jit(tx.update)
    for _ in range(3):
        _, st = step(p, st, p)
    assert float(jp.sparsity(jp.get_masks(st))) == 0.5


def test_eager_init_searches_in_one_program_with_the_masks_of_the_leaf_by_leaf_search(
    monkeypatch,
):
    # tx.init on concrete params runs the random scores and every leaf's search as
    # one jitted program; the counts are rounded eagerly as before, so the masks
    # are those of the leaf-by-leaf search (and of jax.jit(tx.init)).
    from jaxprune import _dynamic_init as dyn
    from jaxprune import criteria, distributions

    ks = jax.random.split(jax.random.key(3), 3)
    params = {
        "a": jax.random.normal(ks[0], (40, 30)),
        "b": jax.random.normal(ks[1], (30, 7)),
        "bias": jnp.zeros(7),
        "c": jax.random.normal(ks[2], (7, 3)),
    }
    key = jax.random.key(11)
    tx = jp.dynamic.rigl(
        optax.sgd(0.1), sparsity=0.8, key=key, end_step=10, distribution=distributions.erk
    )
    calls = []
    original = dyn._random_keeps

    def counting(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(dyn, "_random_keeps", counting)
    eager = jp.get_masks(tx.init(params))
    monkeypatch.undo()
    assert calls  # the one-program path ran
    per_leaf = distributions.erk(params, 0.8)
    scores = criteria.random(params, key=jax.random.fold_in(key, 0x5EED))
    want = distributions._topk_per_leaf(scores, per_leaf, None)
    jitted = jp.get_masks(jax.jit(tx.init)(params))
    for name in ("a", "b", "c"):
        np.testing.assert_array_equal(eager[name], want[name])
        np.testing.assert_array_equal(jitted[name], want[name])
    assert bool(eager["bias"])


@pytest.mark.parametrize("make", ["rigl", "set"])
def test_begin_step_delays_the_first_rewiring(make):
    kw = {"sparsity": 0.5, "key": jax.random.key(0), "update_every": 3, "begin_step": 4}
    kw["end_step"] = 20
    tx = getattr(jp.dynamic, make)(optax.sgd(0.1), **kw)
    params = _params()
    state = tx.init(params)
    params = jp.apply_masks(params, jp.get_masks(state))
    step = jax.jit(lambda p, s, x: tx.update(jax.grad(_loss)(p, x), s, p))
    changed_at = []
    for i in range(12):
        x = jax.random.normal(jax.random.key(i), (8, 16))
        before = jp.get_masks(state)
        updates, state = step(params, state, x)
        params = optax.apply_updates(params, updates)
        after = jp.get_masks(state)
        pairs = zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True)
        if any(bool(jnp.any(a != b)) for a, b in pairs):
            changed_at.append(i)
    # Rewirings at 4, 7 and 10 (begin_step + k * update_every), none before.
    assert changed_at == [4, 7, 10]
    assert _count(jp.get_masks(state)) == _count(before)  # the sparsity is kept


@pytest.mark.parametrize(
    ("begin_step", "match"),
    [
        (-1, r"begin_step must be an int >= 0.*got -1\. Fix"),
        (2.5, r"begin_step must be an int >= 0.*got 2\.5"),
        (True, r"begin_step must be an int >= 0.*got True"),
        (10, r"begin_step=10 must be below end_step=10.*Fix"),
    ],
)
def test_bad_begin_step_is_named(begin_step, match):
    with pytest.raises(ValueError, match=match):
        jp.dynamic.rigl(
            optax.adam(1e-2),
            sparsity=0.5,
            key=jax.random.key(0),
            end_step=10,
            begin_step=begin_step,
        )
