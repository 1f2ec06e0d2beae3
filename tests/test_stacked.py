"""Stacked layers (nn.scan, nnx.vmap, lax.scan): jp.masks.per_layer against the unrolled model."""

import functools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxprune as jp

L, D = 4, 8


def _stacked(key):
    """A dict model with one stack of L Dense layers, as nn.scan lays its params out."""
    k1, k2, k3 = jax.random.split(key, 3)
    scale = jnp.array([0.05, 0.5, 1.0, 2.0])[:, None, None]  # layers of different norms
    return {
        "inp": {"kernel": jax.random.normal(k1, (3, D)), "bias": jnp.zeros(D)},
        "layers": {
            "kernel": jax.random.normal(k2, (L, D, D)) * scale,
            "bias": jax.random.normal(k3, (L, D)),
        },
    }


def _unrolled(p):
    """The same weights as one leaf per layer, in the stack's flatten order."""
    return {
        "inp": p["inp"],
        "layers": tuple(
            {"bias": p["layers"]["bias"][i], "kernel": p["layers"]["kernel"][i]} for i in range(L)
        ),
    }


def _restack(m):
    return jnp.stack([jnp.broadcast_to(m["layers"][i]["kernel"], (D, D)) for i in range(L)])


def _is_stack(path, leaf):
    del leaf
    return path[0] == "layers"


def _per_layer_sparsity(mask):
    return [float(1 - jnp.mean(mask[i])) for i in range(mask.shape[0])]


@pytest.mark.parametrize(
    "select",
    [
        jp.masks.topk,
        jp.masks.global_topk,
        functools.partial(jp.masks.global_topk, max_sparsity=0.9),
        jp.distributions.selection(jp.distributions.erk),
        functools.partial(jp.masks.structured, axes=-1),
    ],
    ids=["topk", "global", "global-capped", "erk", "structured"],
)
def test_per_layer_equals_the_unrolled_model(key, select):
    p = _stacked(key)
    scores = jp.criteria.magnitude(p)
    got = jp.masks.per_layer(select, stacked=_is_stack)(scores, 0.5)
    want = select(jp.criteria.magnitude(_unrolled(p)), 0.5)
    np.testing.assert_array_equal(got["layers"]["kernel"], _restack(want))
    np.testing.assert_array_equal(
        jnp.broadcast_to(got["inp"]["kernel"], (3, D)),
        jnp.broadcast_to(want["inp"]["kernel"], (3, D)),
    )
    # The stack's biases ([L, D], so ndim >= 2) are not kernels: kept whole, as unrolled.
    assert jnp.shape(got["layers"]["bias"]) == () and bool(got["layers"]["bias"])


def test_without_per_layer_a_stack_is_one_leaf_and_a_layer_can_be_emptied(key):
    # What per_layer is for: topk ranks the 4 layers together.
    scores = jp.criteria.magnitude(_stacked(key))
    plain = _per_layer_sparsity(jp.masks.topk(scores, 0.5)["layers"]["kernel"])
    assert plain[0] == 1.0
    m = jp.masks.per_layer(jp.masks.topk, stacked=_is_stack)(scores, 0.5)
    assert _per_layer_sparsity(m["layers"]["kernel"]) == [0.5] * L


def test_global_cap_holds_per_layer(key):
    scores = jp.criteria.magnitude(_stacked(key))
    capped = functools.partial(jp.masks.global_topk, max_sparsity=0.75)
    m = jp.masks.per_layer(capped, stacked=_is_stack)(scores, 0.6)
    per = _per_layer_sparsity(m["layers"]["kernel"])
    assert max(per) <= 0.75 and per[0] == 0.75  # the small layer is capped, not emptied


def test_nm_and_patterns_see_one_layer(key):
    w = jax.random.normal(key, (L, D, D))
    conv = jax.random.normal(key, (2, 3, 3, 4, 4))  # a stack of 2 conv kernels
    tree = {"layers": {"kernel": w, "conv": conv}}
    nm = jp.masks.per_layer(functools.partial(jp.masks.nm, n=2, m=4), stacked=_is_stack)
    m = nm(jp.criteria.magnitude(tree), 0.5)["layers"]["kernel"]
    per_layer = [jp.masks.nm({"k": jnp.abs(w[i])}, 0.5, n=2, m=4)["k"] for i in range(L)]
    np.testing.assert_array_equal(m, jnp.stack(per_layer))
    pat = jp.masks.per_layer(functools.partial(jp.masks.patterns, where=None), stacked=_is_stack)
    mc = pat(jp.criteria.magnitude({"layers": {"conv": conv}}), 0.5)["layers"]["conv"]
    assert mc.shape == conv.shape
    want = [jp.masks.patterns({"c": jnp.abs(conv[i])}, 0.5)["c"] for i in range(2)]
    np.testing.assert_array_equal(mc, jnp.stack(want))
    assert set(np.unique(mc.sum(axis=(1, 2))).tolist()) <= {0, 4}  # 4-tap patterns, as unstacked


def test_where_sees_the_stack_path_and_sparsity_trees_spread(key):
    p = _stacked(key)
    seen = []

    def where(path, leaf):
        seen.append(path)
        return path[-1] == "kernel"

    s = {"inp": {"kernel": 0.25, "bias": 0.0}, "layers": {"kernel": 0.75, "bias": 0.0}}
    m = jp.masks.per_layer(jp.masks.topk, stacked=_is_stack)(
        jp.criteria.magnitude(p), s, where=where
    )
    assert ("layers", "kernel") in seen and not any(len(q) > 2 for q in seen)
    assert _per_layer_sparsity(m["layers"]["kernel"]) == [0.75] * L
    assert float(1 - m["inp"]["kernel"].mean()) == 0.25


def test_two_leading_layer_axes(key):
    w = jax.random.normal(key, (2, 3, D, D))  # e.g. [stage, layer, in, out]
    m = jp.masks.per_layer(jp.masks.topk, stacked=lambda p, x: 2)({"w": w}, 0.5)["w"]
    assert m.shape == w.shape
    assert bool(jnp.all(m.reshape(6, -1).mean(axis=1) == 0.5))


class _LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + nn.relu(nn.Dense(D)(x)), None


class _LinenStack(nn.Module):
    """Dense "inp", a stack of L blocks under nn.scan ("layers"), then an optional Dense "out"."""

    out: int | None = None

    @nn.compact
    def __call__(self, x):
        stack = nn.scan(
            _LinenBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=L
        )
        x, _ = stack(name="layers")(nn.Dense(D, name="inp")(x), None)
        return x if self.out is None else nn.Dense(self.out, name="out")(x)


def test_prune_with_a_per_layer_scope_in_a_jitted_linen_scan_model():
    net = _LinenStack(out=2)
    x = jax.random.normal(jax.random.key(1), (16, 5))
    params = net.init(jax.random.key(0), x)["params"]
    scope = jp.masks.per_layer(jp.masks.topk, stacked=lambda p, _: p[0] == "layers")
    tx = jp.prune(optax.adam(1e-2), sparsity=jp.schedules.polynomial(0.0, 0.8, 0, 4), scope=scope)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(lambda p: jnp.mean(net.apply({"params": p}, x) ** 2))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(6):
        params, state = step(params, state)
    k = params["layers"]["Dense_0"]["kernel"]
    assert k.shape == (L, D, D)
    assert [float(jnp.mean(k[i] == 0)) for i in range(L)] == pytest.approx([0.8] * L, abs=1 / 64)
    masks = jp.get_masks(state)
    assert bool(jnp.all(masks["layers"]["Dense_0"]["bias"]))  # stacked biases kept
    assert float(jnp.mean(params["layers"]["Dense_0"]["bias"] == 0)) < 0.5


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="stacked must be a predicate"):
        jp.masks.per_layer(jp.masks.topk, stacked=1)
    with pytest.raises(ValueError, match="select must be a selection"):
        jp.masks.per_layer("topk", stacked=_is_stack)
    sel = jp.masks.per_layer(jp.masks.topk, stacked=lambda p, x: 3)
    with pytest.raises(ValueError, match=r"leading layer axes .* got 3 for 'w' of shape \(2, 2\)"):
        sel({"w": jnp.ones((2, 2))}, 0.5)


class _Block(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, x):
        return x + nnx.relu(self.lin(x))


class _NnxStack(nnx.Module):
    """The nnx scan-over-layers recipe (nnx.vmap to build, nnx.scan to apply) and a head."""

    def __init__(self, rngs):
        self.inp = nnx.Linear(3, D, rngs=rngs)

        @nnx.split_rngs(splits=L)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return _Block(rngs)

        self.blocks = make(rngs)
        self.head = nnx.Linear(D, 16, rngs=rngs)
        self.out = nnx.Linear(16, 2, rngs=rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def body(b, x):
            return b(x)

        return self.out(nnx.relu(self.head(body(self.blocks, self.inp(x)))))


def test_shrink_module_cuts_the_head_of_an_nnx_model_holding_a_stack():
    from jaxprune import structure

    model, x = _NnxStack(nnx.Rngs(0)), jnp.ones((2, 3))
    apply_fn, state = structure.module_apply(model)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")  # the stack is opaque to groups (documented)
        groups = structure.groups(apply_fn, state, x, prunable_only=True)
        masks = structure.select(groups, jp.criteria.magnitude(state), 0.5)
        want = apply_fn(jp.apply_masks(state, masks), x)
        n_warned = len(seen)
        structure.shrink_module(model, masks, x)
    # One warning for the scan, naming the fix that applies to stacks.
    assert n_warned == 1 and "jp.masks.per_layer" in str(seen[0].message)
    assert model.head.kernel.shape == (D, 8) and model.out.in_features == 8
    assert model.blocks.lin.kernel.shape == (L, D, D) and model.blocks.lin.in_features == D
    np.testing.assert_allclose(model(x), want, atol=1e-5)


def test_gates_refuse_a_stack_of_layers(key):
    with pytest.raises(ValueError, match=r"cannot gate a stack of layers: .* \(4, 8, 8\)"):
        jp.gates.attach(_NnxStack(nnx.Rngs(0)), jp.gates.HardConcrete(), key=key)
    p = _stacked(key)
    with pytest.raises(ValueError, match=r"'layers/bias' .* it is a bias"):
        jp.gates.init_gates(jp.gates.HardConcrete(), p)  # the default where takes [L, out]
    with pytest.raises(ValueError, match=r"'layers/kernel' .* its bias has shape \(4, 8\)"):
        jp.gates.init_gates(jp.gates.HardConcrete(), p, where=lambda q, x: q[-1] == "kernel")
    # The unstacked layers alone are fine.
    gp = jp.gates.init_gates(jp.gates.HardConcrete(), p, where=lambda q, x: q == ("inp", "kernel"))
    assert list(gp) == ["inp/kernel"]


def test_an_ensemble_trained_under_vmap_reads_and_saves_its_masks(tmp_path):
    # jax.vmap(tx.init) gives packed bits with a leading member axis; get_masks unpacks them all.
    tx = jp.prune(optax.sgd(0.1), sparsity=0.5)
    for shape, members in [((32, 64), 4), ((7, 9), 8)]:
        keys = jax.random.split(jax.random.key(0), members)
        params = jax.vmap(lambda k, s=shape: {"w": jax.random.normal(k, s)})(keys)
        state = jax.vmap(tx.init)(params)
        grads = jax.tree.map(jnp.zeros_like, params)
        _, state = jax.jit(jax.vmap(tx.update))(grads, state, params)
        masks = jp.get_masks(state)["w"]
        np.testing.assert_array_equal(masks, jax.vmap(jp.get_masks)(state)["w"])
        assert masks.shape == (members, *shape)
        assert [int((~masks[i]).sum()) for i in range(members)] == [
            round(0.5 * masks[0].size)
        ] * members
    jp.save(tmp_path / "c", 1, params, state)
    back = jp.restore(tmp_path / "c", params=params, opt_state=state)
    np.testing.assert_array_equal(jp.get_masks(back.opt_state)["w"], jp.get_masks(state)["w"])


def test_bits_that_do_not_fit_the_mask_are_refused():
    packed = jp.masks.pack({"w": jnp.ones((16, 8), bool)})["w"]
    bad = jp.masks.PackedMask(packed.bits[:1], packed.shape, packed.axis)
    with pytest.raises(ValueError, match=r"bits of shape \(1, 8\) do not hold a mask of shape"):
        jp.masks.unpack({"w": bad})


def test_a_traced_sparsity_in_a_schedule_points_to_a_callable():
    with pytest.raises(ValueError, match=r"sparsity here is traced .* sparsity=lambda step: s"):
        jax.vmap(jp.schedules.constant)(jnp.array([0.1, 0.2]))


def test_capture_linen_under_nn_scan_says_why_it_cannot_capture():
    net, x = _LinenStack(), jnp.ones((2, 3))
    variables = net.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"module\(s\) layers/Dense_0 run inside a lifted"):
        jp.activations.capture_linen(net, variables, x)


def test_nm_default_axis_refuses_a_stacked_attention_kernel_and_patterns_name_stacks(key):
    q = jax.random.normal(key, (2, 32, 4, 8))  # [L, in, heads, head_dim]
    with pytest.raises(ValueError, match=r"stacked one\), wrap nm in jp.masks.per_layer"):
        jp.masks.nm({"query": {"kernel": q}}, 0.5, n=2, m=4)
    conv = jax.random.normal(key, (2, 3, 3, 4, 4))
    with pytest.warns(UserWarning, match=r"more than 4 axes dense .*layers/conv \(2, 3, 3, 4, 4\)"):
        jp.masks.patterns({"layers": {"conv": conv}}, 0.5, where=lambda p, x: True)


def test_a_user_where_in_prune_is_asked_about_one_layer(key):
    # where=ndim >= 2 on the whole [L, out] bias would take it for a kernel.
    p = _stacked(key)
    scope = jp.masks.per_layer(jp.masks.topk, stacked=_is_stack)
    tx = jp.prune(optax.sgd(0.0), sparsity=0.5, scope=scope, where=lambda q, x: x.ndim >= 2)
    updates, state = tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)
    new = optax.apply_updates(p, updates)
    assert bool(jnp.all(new["layers"]["bias"] == p["layers"]["bias"]))
    assert _per_layer_sparsity(jp.get_masks(state)["layers"]["kernel"]) == [0.5] * L


def test_stacks_with_per_layer_scalars_and_non_arrays_and_sparsity_defaults(key):
    tree = {"layers": {"w": jax.random.normal(key, (L, D, D)), "alpha": jnp.ones(L), "p": 0.1}}
    m = jp.masks.per_layer(jp.masks.topk, stacked=_is_stack)(tree, 0.5)
    assert jnp.shape(m["layers"]["alpha"]) == () and m["layers"]["p"] is not None
    assert _per_layer_sparsity(m["layers"]["w"]) == [0.5] * L
    # nm's sparsity has a default; the wrapper keeps it.
    nm = jp.masks.per_layer(functools.partial(jp.masks.nm, n=2, m=4), stacked=_is_stack)
    assert (
        _per_layer_sparsity(nm({"layers": {"w": tree["layers"]["w"]}})["layers"]["w"]) == [0.5] * L
    )


def test_an_ensemble_of_stacked_models_saves_its_masks(tmp_path, key):
    scope = jp.masks.per_layer(jp.masks.topk, stacked=_is_stack)
    tx = jp.prune(optax.sgd(0.1), sparsity=0.5, scope=scope)
    params = jax.tree.map(lambda x: jnp.stack([x, 2 * x]), _stacked(key))
    state = jax.vmap(tx.init)(params)
    updates, state = jax.jit(jax.vmap(tx.update))(
        jax.tree.map(jnp.ones_like, params), state, params
    )
    params = optax.apply_updates(params, updates)
    masks = jp.get_masks(state)
    assert masks["layers"]["kernel"].shape == (2, L, D, D)
    assert jnp.shape(masks["layers"]["bias"]) == () and jnp.shape(masks["inp"]["bias"]) == ()
    jp.save(tmp_path / "c", 1, params, state)
    back = jp.restore(tmp_path / "c", params=params, opt_state=state)
    np.testing.assert_array_equal(
        jp.get_masks(back.opt_state)["layers"]["kernel"], masks["layers"]["kernel"]
    )


def test_layer_where_counts_what_the_default_where_prunes(key):
    p = _stacked(key)
    select = jp.masks.per_layer(jp.masks.topk, stacked=_is_stack)
    pruned = jp.apply_masks(p, select(jp.criteria.magnitude(p), 0.5))
    assert float(jp.sparsity(pruned, where=select.layer_where(None))) == 0.5
    assert float(jp.sparsity(pruned)) < 0.5  # the [L, out] biases are 2-D, and counted


def _cut_per_layer_topk(scores, sparsity, stacked):
    """per_layer(topk) the slow way: every layer of a stack as its own leaf (the reference)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(scores)
    out = []
    for path, x in flat:
        names = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)
        k = int(stacked(names, x))
        if x.ndim - k < 2:  # the default where, asked about one layer
            out.append(jnp.ones((), bool))
            continue
        layers = x.reshape((-1,) + x.shape[k:])
        masks = [jp.masks.topk({"w": layer}, sparsity)["w"] for layer in layers]
        out.append(jnp.stack(masks).reshape(x.shape))
    return jax.tree.unflatten(treedef, out)


@pytest.mark.parametrize("shape", [(3, 8, 8), (2, 2, 4, 6), (2, 300, 256)], ids=str)
@pytest.mark.parametrize("tied", [False, True], ids=["random", "all-tied"])
def test_per_layer_topk_is_searched_per_layer_at_once_with_the_masks_of_the_cut(shape, tied):
    # (2, 300, 256): layers of 76,800 entries, past the sampled bracket's threshold.
    k = 2 if len(shape) == 4 else 1
    w = jnp.ones(shape) if tied else jax.random.normal(jax.random.key(0), shape)
    scores = {"layers": {"kernel": w, "bias": jnp.ones(shape[:k] + shape[-1:])}}
    stacked = lambda path, leaf: k if path[0] == "layers" else 0  # noqa: E731
    select = jp.masks.per_layer(jp.masks.topk, stacked=stacked)
    for s in (0.3, 0.77):
        got = select(scores, s)
        want = _cut_per_layer_topk(scores, s, stacked)
        assert got["layers"]["bias"].shape == ()
        np.testing.assert_array_equal(got["layers"]["kernel"], want["layers"]["kernel"])
        traced = jax.jit(select)(scores, jnp.float32(s))  # a traced sparsity: exact counts too
        np.testing.assert_array_equal(traced["layers"]["kernel"], want["layers"]["kernel"])


@pytest.mark.parametrize(
    "base",
    [
        jp.masks.topk,
        jp.masks.global_topk,
        functools.partial(jp.masks.global_topk, max_sparsity=0.7),
    ],
    ids=["topk", "global", "capped"],
)
def test_prune_fuses_a_per_layer_search_with_the_same_masks_and_no_scratch(base):
    # jp.prune recomputes magnitude scores inside its searches for per_layer(topk)
    # and per_layer(global_topk), capped (per layer) or not, as for topk and
    # global_topk: the masks are those of the selection on stored scores, and the
    # step keeps no full-size scores.
    w = jax.random.normal(jax.random.key(0), (6, 64, 64)) * jnp.arange(1.0, 7.0)[:, None, None]
    params = {"layers": {"kernel": w, "bias": jnp.ones((6, 64))}, "out": jnp.ones((64, 4))}
    params["out"] = params["out"].at[0].set(0.5)  # ties in a leaf that is not stacked
    select = jp.masks.per_layer(base, stacked=lambda p, _: p[0] == "layers")
    tx = jp.prune(optax.sgd(0.0), sparsity=0.6, scope=select)
    grads = jax.tree.map(jnp.zeros_like, params)
    step = jax.jit(tx.update)
    _, state = step(grads, tx.init(params), params)
    want = select(jp.criteria.magnitude(params), 0.6)
    for got, ref in zip(jax.tree.leaves(jp.get_masks(state)), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(got, ref)
    temp = step.lower(grads, tx.init(params), params).compile().memory_analysis()
    # Unfused, the step keeps the stored scores (1.0x w here for topk, 1.9x for global,
    # 1.0x capped); the capped search keeps about a quarter of w for its per-layer cuts.
    assert temp.temp_size_in_bytes < (0.5 if isinstance(base, functools.partial) else 0.25) * (
        w.nbytes
    )


def test_stacks_where_leaves_out_are_not_cut_and_keep_a_scalar_mask_under_jit(key):
    # The [L, out] biases: never sliced, a scalar True eagerly and under jit (a
    # full all-True [L, out] mask under jit made jp.sparsity count them: 0.444).
    p = _stacked(key)
    sel = jp.masks.per_layer(functools.partial(jp.masks.structured, axes=-1), stacked=_is_stack)
    scores = jp.criteria.magnitude(p)  # nonnegative: the l2 norm of raw weights would warn
    eager, jitted = sel(scores, 0.5), jax.jit(lambda s: sel(s, 0.5))(scores)
    for m in (eager, jitted):
        assert jnp.shape(m["layers"]["bias"]) == ()
    assert float(jp.sparsity(jitted)) == float(jp.sparsity(eager))
    # layer_where on masks (their stacked bias is a scalar) counts as on params.
    masks = jp.masks.per_layer(jp.masks.topk, stacked=_is_stack)(p, 0.5)
    assert float(jp.sparsity(masks, where=sel.layer_where(None))) == 0.5


def test_capped_global_per_layer_is_one_program_whatever_the_number_of_layers():
    # per_layer(partial(global_topk, max_sparsity=c)) caps each layer by one
    # vmapped search per stack, not a cut into L leaves (13.6 s to compile at L=64).
    sel = jp.masks.per_layer(
        functools.partial(jp.masks.global_topk, max_sparsity=0.6), stacked=_is_stack
    )
    sizes = []
    for n_layers in (2, 16):
        w = jnp.stack([jnp.full((8, 8), 0.1 * (i + 1)) for i in range(n_layers)])
        scores = {"layers": {"kernel": w}, "head": jnp.full((8, 4), 0.05)}
        sizes.append(len(jax.make_jaxpr(lambda s: sel(s, 0.5))(scores).eqns))
        m = sel(scores, 0.5)
        # Lowest first (the head, then layer 0, 1, ...), each leaf and layer capped at 60%.
        assert int(jnp.sum(~m["head"])) == 19  # floor(0.6 * 32)
        per = [int(jnp.sum(~m["layers"]["kernel"][i])) for i in range(n_layers)]
        assert sum(per) + 19 == round(0.5 * (8 * 8 * n_layers + 32))
        assert per == sorted(per, reverse=True) and max(per) == 38  # floor(0.6 * 64)
    assert sizes[0] == sizes[1]


def test_a_traced_array_in_a_sparsity_tree_is_named():
    sel = jp.masks.per_layer(jp.masks.topk, stacked=_is_stack)
    scores = {"layers": {"kernel": jnp.ones((4, 8, 8))}}
    with pytest.raises(ValueError, match=r"sparsity\['layers/kernel'\] must be one number.*\(4,\)"):
        jax.jit(sel)(scores, {"layers": {"kernel": jnp.array([0.25, 0.5, 0.75, 0.9])}})


def test_review_edges_of_the_per_layer_paths(key):
    stack = lambda p, _: p[0] == "layers"  # noqa: E731
    # A stack of empty layers is cut without a ZeroDivisionError.
    empty = {"layers": {"kernel": jnp.ones((3, 0, 4))}}
    structured = jp.masks.per_layer(functools.partial(jp.masks.structured, axes=-1), stacked=stack)
    assert jnp.shape(structured(empty, 0.5)["layers"]["kernel"]) in ((), (3, 0, 4))
    # The uncapped global search leaves a bool leaf alone, as topk and global_topk do.
    scores = {"layers": {"kernel": jnp.ones((2, 4, 4))}, "frozen": jnp.ones((4, 4), bool)}
    glob = jp.masks.per_layer(jp.masks.global_topk, stacked=stack)
    assert bool(glob(scores, 0.5)["frozen"])
    # `where` is asked once per stack, about a stand-in of one layer, on every path.
    seen = []

    def where(path, leaf):
        seen.append(type(leaf).__name__)
        return jnp.ndim(leaf) >= 2

    sel = jp.masks.per_layer(
        functools.partial(jp.masks.global_topk, max_sparsity=0.9), stacked=stack
    )
    for s in (sel, glob, jp.masks.per_layer(jp.masks.topk, stacked=stack), structured):
        seen.clear()
        s({"layers": {"kernel": jnp.ones((2, 4, 4))}}, 0.5, where=where)
        assert seen == ["ShapeDtypeStruct"], seen
    # fused_select's depths need leaf_srcs; a global search names its one-number sparsity.
    with pytest.raises(ValueError, match=r"depths .* needs scope='layer' \(or a capped global"):
        jp.masks.fused_select(
            "layer", jp.criteria.magnitude, scores, 0.5, [True, False], depths=[1, 0]
        )
    with pytest.raises(ValueError, match="a global selection takes one number"):
        jax.jit(jp.masks.global_topk)(scores, jnp.full(2, 0.5))


def test_taylor_counts_unit_axis_per_layer_and_does_not_warn_on_dense_general():
    import warnings

    p = {"attn": {"query": {"kernel": jnp.ones((8, 2, 4)), "bias": jnp.ones((2, 4))}}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jp.criteria.taylor(p, p)  # DenseGeneral [in, heads, head_dim]: not a stack
    p3 = {"l": {"kernel": jnp.arange(48.0).reshape(3, 4, 4), "bias": jnp.ones((3, 4))}}
    by_first = jp.criteria.taylor(p3, p3, stacked=lambda p, x: True, unit_axis=1)
    by_last = jp.criteria.taylor(p3, p3, stacked=lambda p, x: True, unit_axis=-1)
    np.testing.assert_array_equal(by_first["l"]["kernel"], by_last["l"]["kernel"])


def test_prune_capped_per_layer_over_two_layer_axes_matches_the_stored_scores(monkeypatch):
    # per_layer(partial(global_topk, max_sparsity=c)) fused in jp.prune caps each
    # layer of a [2, 3, ...] stack apart; ties included; caps 0 and 1 too.
    fused = []
    original = jp.masks.fused_select

    def counting(*args, **kwargs):
        fused.append((kwargs.get("max_sparsity"), kwargs.get("depths")))
        return original(*args, **kwargs)

    monkeypatch.setattr(jp.masks, "fused_select", counting)
    rng = np.random.default_rng(1)
    w = rng.normal(size=(2, 3, 16, 8)) * np.arange(1, 7).reshape(2, 3, 1, 1)
    w = jnp.asarray(w, jnp.float32).at[0, 1, :4].set(0.5)
    head = jnp.asarray(rng.normal(size=(8, 4)) * 0.01, jnp.float32)
    params = {"blocks": {"kernel": w, "bias": jnp.ones((2, 3, 8))}, "head": head}
    grads = jax.tree.map(jnp.zeros_like, params)
    for cap, s in ((0.0, 0.6), (0.3, 0.6), (0.7, 0.9), (1.0, 0.2)):
        sel = jp.masks.per_layer(
            functools.partial(jp.masks.global_topk, max_sparsity=cap),
            stacked=lambda p, _: 2 if p[0] == "blocks" else 0,  # [stage, layer, in, out]
        )
        tx = jp.prune(optax.sgd(0.0), sparsity=s, scope=sel)
        _, state = jax.jit(tx.update)(grads, tx.init(params), params)
        want = sel(jp.criteria.magnitude(params), s)
        got = jp.get_masks(state)
        np.testing.assert_array_equal(got["blocks"]["kernel"], want["blocks"]["kernel"])
        np.testing.assert_array_equal(got["head"], want["head"])
        # The fused search ran, with the cap and the stack's two layer axes.
        assert fused[-1][0] == cap and 2 in fused[-1][1], fused[-1]
    with pytest.raises(ValueError, match="max_sparsity caps a global search, got scope='layer'"):
        jp.masks.fused_select(
            "layer", jp.criteria.magnitude, params, 0.5, [False, True, True], max_sparsity=0.5
        )


@pytest.mark.parametrize(
    "select",
    [
        functools.partial(jp.masks.structured, axes=-1),
        functools.partial(jp.masks.blocks, block=(2, 2)),
    ],
    ids=["structured", "blocks"],
)
@pytest.mark.parametrize("as_keyword", [False, True])
def test_per_layer_gives_each_layer_its_stacks_value_of_a_per_leaf_sparsity_tree(
    select, as_keyword
):
    # Layers are cut from the stack; a per-leaf sparsity tree names the stack
    # once, and each of its layers takes that value (the head keeps its own).
    scores = {
        "layers": {"kernel": jnp.abs(jax.random.normal(jax.random.key(0), (3, 8, 8)))},
        "head": {"kernel": jnp.abs(jax.random.normal(jax.random.key(1), (8, 8)))},
    }
    sparsity = {"layers": {"kernel": 0.5}, "head": {"kernel": 0.25}}
    fn = jp.masks.per_layer(select, stacked=lambda p, x: p[0] == "layers")
    m = fn(scores, sparsity=sparsity) if as_keyword else fn(scores, sparsity)
    assert m["layers"]["kernel"].shape == (3, 8, 8)
    assert [int((~m["layers"]["kernel"][i]).sum()) for i in range(3)] == [32, 32, 32]
    assert int((~m["head"]["kernel"]).sum()) == 16
    # The same as each layer pruned alone at its stack's value.
    for i in range(3):
        alone = select({"w": scores["layers"]["kernel"][i]}, 0.5)["w"]
        np.testing.assert_array_equal(m["layers"]["kernel"][i], alone)


def test_taylor_of_an_equinox_stack_scores_each_layer_with_its_bias_row():
    eqx = pytest.importorskip("equinox")
    keys = jax.random.split(jax.random.key(0), 3)
    blocks = eqx.filter_vmap(lambda k: eqx.nn.Linear(4, 4, key=k))(keys)
    p = {"blocks": eqx.filter(blocks, eqx.is_array)}
    g = jax.tree.map(lambda a: jax.random.normal(jax.random.key(1), a.shape), p)
    scores = jp.criteria.taylor(p, g, unit_axis=0, stacked=lambda path, leaf: True)
    w, gw, b, gb = (
        np.asarray(x)
        for x in (p["blocks"].weight, g["blocks"].weight, p["blocks"].bias, g["blocks"].bias)
    )
    for layer in range(3):  # |sum_i W_ji G_ji + b_j g_bj|, normalized per layer
        want = np.abs((w[layer] * gw[layer]).sum(1) + b[layer] * gb[layer])
        want /= np.linalg.norm(want)
        np.testing.assert_allclose(scores["blocks"].weight[layer][:, 0], want, rtol=1e-5)
    # Without stacked=, axis 0 is the layers: said, not scored silently.
    with pytest.warns(UserWarning, match=r"looks like 3 stacked equinox layers.*stacked="):
        jp.criteria.taylor(p, g, unit_axis=0)
