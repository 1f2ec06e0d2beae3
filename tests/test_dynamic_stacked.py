"""RigL / SET on stacked layers (nn.scan, nnx.vmap stacks): each layer as a leaf of its own."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune as jp
import jaxprune.dynamic  # noqa: F401  (until jaxprune/__init__ exports it)
from tests.test_stacked import _LinenStack

L, D = 3, 16
SCALE = jnp.array([0.05, 1.0, 3.0])[:, None, None]  # layers of different norms


def _stacked():
    """One Dense "inp" and a stack of L Dense layers, as nn.scan lays their params out."""
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    return {
        "inp": {"kernel": jax.random.normal(k1, (5, D)), "bias": jnp.zeros(D)},
        "layers": {
            "kernel": jax.random.normal(k2, (L, D, D)) * SCALE,
            "bias": jax.random.normal(k3, (L, D)),
        },
    }


def _unrolled(p):
    """The same weights with one leaf per layer."""
    layers = p["layers"]
    return {
        "inp": p["inp"],
        "layers": tuple(
            {"bias": layers["bias"][i], "kernel": layers["kernel"][i]} for i in range(L)
        ),
    }


def _is_stack(path, leaf):
    del leaf
    return path[0] == "layers"


def _loss(p, x):
    h = x @ p["inp"]["kernel"] + p["inp"]["bias"]
    for i in range(L):
        h = h + jax.nn.relu(h @ p["layers"]["kernel"][i] + p["layers"]["bias"][i])
    return jnp.mean(h**2)


def _pruned_per_layer(mask):
    return [int(np.sum(~np.asarray(mask[i]))) for i in range(mask.shape[0])]


@pytest.mark.parametrize("distribution", ["erk", "uniform"])
def test_initial_layers_are_sparsified_as_in_the_unrolled_model(distribution):
    dist = getattr(jp.distributions, distribution)
    p = _stacked()
    kw = dict(sparsity=0.8, key=jax.random.key(0), end_step=10, distribution=dist)
    masks = jp.dynamic.rigl(optax.adam(1e-2), stacked=_is_stack, **kw).init(p).masks
    want = jp.dynamic.rigl(optax.adam(1e-2), **kw).init(_unrolled(p)).masks
    got = _pruned_per_layer(masks["layers"]["kernel"])
    assert got == [int(np.sum(~want["layers"][i]["kernel"])) for i in range(L)]
    assert int(np.sum(~masks["inp"]["kernel"])) == int(np.sum(~want["inp"]["kernel"]))
    # The unrolled model's per-layer sparsities, from the distribution itself.
    per = dist(_unrolled(p), 0.8)
    assert got == [round(float(per["layers"][i]["kernel"]) * D * D) for i in range(L)]
    # The stack's biases ([L, D], 2-D) are not kernels.
    assert jnp.shape(masks["layers"]["bias"]) == () and bool(masks["layers"]["bias"])
    if distribution == "erk":
        # As one leaf, ERK would count L as a fan: 0.8 over the kernels, differently spread.
        plain = jp.distributions.erk(p, 0.8)["layers"]["kernel"]
        assert abs(float(plain) - float(per["layers"][0]["kernel"])) > 0.01


def test_jitted_rigl_keeps_each_layers_count_and_resets_moments():
    p = _stacked()
    tx = jp.dynamic.rigl(
        optax.adam(1e-2),
        sparsity=0.8,
        key=jax.random.key(0),
        end_step=40,
        update_every=2,
        stacked=_is_stack,
    )
    state = tx.init(p)
    counts = _pruned_per_layer(state.masks["layers"]["kernel"])
    x = jax.random.normal(jax.random.key(2), (8, 5))
    step = jax.jit(lambda p, s: tx.update(jax.grad(_loss)(p, x), s, p))
    moved = np.zeros(L, int)
    for t in range(9):
        old = state.masks["layers"]["kernel"]
        updates, state = step(p, state)
        p = optax.apply_updates(p, updates)
        new = state.masks["layers"]["kernel"]
        assert _pruned_per_layer(new) == counts  # every layer keeps exactly its count
        active = (D * D - np.array(counts)).astype(np.float32)
        f = np.float32(jp.dynamic.cosine_drop_fraction(t, alpha=0.3, end_step=40))
        k = np.floor(f * active)
        dropped = np.sum(np.asarray(old & ~new), axis=(1, 2))
        assert np.all(dropped <= (k if t % 2 == 0 and t > 0 else 0))
        moved += dropped
        # Dropped weights at exactly 0; regrown ones start at 0 with zero moments.
        w = p["layers"]["kernel"]
        assert bool(jnp.all(jnp.where(new, True, w == 0)))
        adam = state.inner_state[0]
        for moment in (adam.mu, adam.nu):
            assert bool(jnp.all(jnp.where(new & ~old, moment["layers"]["kernel"] == 0, True)))
    # Every layer rewired (as one leaf, the small layer 0 would take all the drops).
    assert np.all(moved > 0)
    # The stacked biases are trained, never pruned.
    assert bool(jnp.all(p["layers"]["bias"] != 0)) and bool(state.masks["layers"]["bias"])


def test_a_rigl_rewiring_equals_the_unrolled_models():
    p = _stacked()
    kw = dict(
        sparsity=0.7,
        key=jax.random.key(0),
        end_step=10,
        update_every=1,
        distribution=jp.distributions.uniform,
    )
    tx = jp.dynamic.rigl(optax.adam(1e-1), stacked=_is_stack, **kw)
    tx_unrolled = jp.dynamic.rigl(optax.adam(1e-1), **kw)
    state = tx.init(p)
    masks = state.masks
    # Small gradients on the active weights: a dropped weight is not regrown, so the
    # drops show in the masks.
    grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(3), x.shape), p)
    for leaf in ("inp", "layers"):
        g, m = grads[leaf]["kernel"], masks[leaf]["kernel"]
        grads[leaf]["kernel"] = jnp.where(m, 1e-3 * g, g)
    # The unrolled model starts from the same masks.
    unrolled_masks = {
        "inp": masks["inp"],
        "layers": tuple(
            {"bias": masks["layers"]["bias"], "kernel": masks["layers"]["kernel"][i]}
            for i in range(L)
        ),
    }
    state_u = tx_unrolled.init(_unrolled(p))._replace(packed_masks=jp.masks.pack(unrolled_masks))
    pu, gu = _unrolled(p), _unrolled(grads)
    for _ in range(2):  # step 0 is an adam step, step 1 rewires
        updates, state = jax.jit(tx.update)(grads, state, p)
        updates_u, state_u = jax.jit(tx_unrolled.update)(gu, state_u, pu)
        p, pu = optax.apply_updates(p, updates), optax.apply_updates(pu, updates_u)
    got, want = state.masks, state_u.masks
    # Every layer rewired: dropped by |w| and regrown by |grad| (deterministic) as unrolled.
    assert all(
        not np.array_equal(got["layers"]["kernel"][i], masks["layers"]["kernel"][i])
        for i in range(L)
    )
    np.testing.assert_array_equal(
        got["layers"]["kernel"], jnp.stack([want["layers"][i]["kernel"] for i in range(L)])
    )
    np.testing.assert_array_equal(got["inp"]["kernel"], want["inp"]["kernel"])
    assert _pruned_per_layer(got["layers"]["kernel"]) == [round(0.7 * D * D)] * L
    # Each layer drops exactly floor(f(1) * its active count).
    f = np.float32(jp.dynamic.cosine_drop_fraction(1, alpha=0.3, end_step=10))
    k = int(np.floor(f * np.float32(D * D - round(0.7 * D * D))))
    dropped = np.sum(np.asarray(masks["layers"]["kernel"] & ~got["layers"]["kernel"]), (1, 2))
    assert dropped.tolist() == [k] * L
    # The same updates and moments as the unrolled model's.
    np.testing.assert_array_equal(
        p["layers"]["kernel"], jnp.stack([pu["layers"][i]["kernel"] for i in range(L)])
    )
    np.testing.assert_array_equal(
        state.inner_state[0].mu["layers"]["kernel"],
        jnp.stack([state_u.inner_state[0].mu["layers"][i]["kernel"] for i in range(L)]),
    )


def test_set_on_a_jitted_linen_scan_model():
    net = _LinenStack(out=2)
    x = jax.random.normal(jax.random.key(1), (16, 5))
    params = net.init(jax.random.key(0), x)["params"]
    tx = jp.dynamic.set(
        optax.sgd(1e-2, momentum=0.9),
        sparsity=0.75,
        key=jax.random.key(0),
        update_every=2,
        drop_fraction=0.5,
        stacked=lambda path, _: path[0] == "layers",
    )
    state = tx.init(params)
    stack = state.masks["layers"]["Dense_0"]
    n_layers, d = stack["kernel"].shape[0], stack["kernel"].shape[1]
    counts = _pruned_per_layer(stack["kernel"])
    per = jp.distributions.erk(
        {
            "layers": tuple(jnp.ones((d, d)) for _ in range(n_layers)),
            **{k: v["kernel"] for k, v in params.items() if k != "layers"},
        },
        0.75,
    )  # the unrolled model's kernels
    assert counts == [round(float(s) * d * d) for s in per["layers"]]
    assert jnp.shape(stack["bias"]) == ()

    @jax.jit
    def step(params, state):
        grads = jax.grad(lambda p: jnp.mean(net.apply({"params": p}, x) ** 2))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    moved = np.zeros(n_layers, int)
    for _ in range(5):
        old = state.masks["layers"]["Dense_0"]["kernel"]
        params, state = step(params, state)
        new = state.masks["layers"]["Dense_0"]["kernel"]
        assert _pruned_per_layer(new) == counts
        # At most floor(0.5 * active) of each layer moves per rewiring.
        dropped = np.sum(np.asarray(old & ~new), axis=(1, 2))
        assert np.all(dropped <= np.floor(0.5 * (d * d - np.array(counts))))
        moved += dropped
    assert np.all(moved > 0)
    # Pruned weights at exactly 0 (regrown ones too, until their first step).
    k = params["layers"]["Dense_0"]["kernel"]
    assert bool(jnp.all(jnp.where(new, True, k == 0)))


def test_jitted_init_two_layer_axes_and_explicit_per_layer_names():
    # [stage, layer, in, out]: stacked returns the number of leading layer axes.
    p = {"w": jax.random.normal(jax.random.key(0), (2, 3, 8, 8)), "v": jnp.ones((8, 4))}
    tx = jp.dynamic.set(
        optax.sgd(0.1),
        sparsity=0.5,
        key=jax.random.key(0),
        update_every=1,
        stacked=lambda path, x: 2 if path == ("w",) else 0,
    )
    eager = tx.init(p).masks
    jitted = jax.jit(tx.init)(p).masks  # ERK's per-layer values traced
    np.testing.assert_array_equal(eager["w"], jitted["w"])
    want = jp.distributions.erk({"v": p["v"], "w": tuple(jnp.ones((8, 8)) for _ in range(6))}, 0.5)
    assert _pruned_per_layer(eager["w"].reshape(6, 8, 8)) == [
        round(float(s) * 64) for s in want["w"]
    ]
    # explicit names each layer of a stack by its index.
    s = {"inp/kernel": 0.5, **{f"layers/kernel/{i}": (i + 1) / 4 for i in range(L)}}
    total = (0.5 * 5 * D + (0.25 + 0.5 + 0.75) * D * D) / (5 * D + L * D * D)
    tx = jp.dynamic.set(
        optax.sgd(0.1),
        sparsity=total,
        key=jax.random.key(0),
        update_every=1,
        distribution=jp.distributions.explicit(s),
        stacked=_is_stack,
    )
    assert _pruned_per_layer(tx.init(_stacked()).masks["layers"]["kernel"]) == [64, 128, 192]


def test_stacked_false_everywhere_matches_stacked_none():
    p = _stacked()
    kw = dict(sparsity=0.8, key=jax.random.key(0), end_step=10, update_every=1)
    plain = jp.dynamic.rigl(optax.adam(1e-2), **kw)
    never = jp.dynamic.rigl(optax.adam(1e-2), stacked=lambda path, x: False, **kw)
    # A predicate matching nothing is most likely a wrong path: init says so, once.
    with pytest.warns(UserWarning, match=r"stacked= matched none of the 4 array leaves"):
        s1, s2 = plain.init(p), never.init(p)
    for _ in range(2):
        u1, s1 = plain.update(p, s1, p)
        u2, s2 = never.update(p, s2, p)
    for a, b in zip(jax.tree.leaves((u1, s1)), jax.tree.leaves((u2, s2)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_bad_stacked_is_named():
    kw = dict(sparsity=0.5, key=jax.random.key(0), end_step=10)
    with pytest.raises(ValueError, match=r"stacked must be a predicate .* got 1\. Fix"):
        jp.dynamic.rigl(optax.sgd(0.1), stacked=1, **kw)
    with pytest.raises(ValueError, match=r"stacked must be a predicate .* got 'layers'"):
        jp.dynamic.set(
            optax.sgd(0.1), sparsity=0.5, key=jax.random.key(0), update_every=1, stacked="layers"
        )
    tx = jp.dynamic.rigl(optax.sgd(0.1), stacked=lambda path, x: 3, **kw)
    with pytest.raises(
        ValueError, match=r"leading layer axes .* got 3 for 'inp/bias' of shape \(16,\)\. Fix"
    ):
        tx.init(_stacked())
    tx = jp.dynamic.rigl(optax.sgd(0.1), stacked=lambda path, x: "yes", **kw)
    with pytest.raises(ValueError, match=r"stacked must return a bool .* got 'yes'"):
        tx.init(_stacked())


def test_per_layer_counts_are_exact_for_every_layer_size():
    # round(0.3 * 35) = 10 per layer (Python's rounding, as topk on one layer), not
    # round(0.3 * 140) = 42 for the stack, nor 11 from float32's 0.3.
    p = {"layers": {"kernel": jnp.ones((4, 7, 5))}}
    masks = (
        jp.dynamic.rigl(
            optax.sgd(0.1),
            sparsity=0.3,
            key=jax.random.key(0),
            end_step=10,
            distribution=jp.distributions.uniform,
            stacked=_is_stack,
        )
        .init(p)
        .masks
    )
    one = int(np.sum(~jp.masks.topk({"w": jnp.ones((7, 5))}, 0.3)["w"]))
    assert _pruned_per_layer(masks["layers"]["kernel"]) == [one] * 4 == [10] * 4
