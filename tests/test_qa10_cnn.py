"""QA round 10 (CNN filter pruning): silent group selections, edge padding, messages.

structure.select warns when a per-group count empties a group and when a group
no member of which votes loses channels by index order; an edge pad on spatial
axes leaves the channels prunable; prune_layerwise's ``where`` takes jax
KeyPaths; a linen branch on ``x.shape`` gets its own cause and fix.
"""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune as jp
from jaxprune import structure


def _mlp(p, x):
    return jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"]


def _narrow():
    w1 = jnp.asarray(np.random.default_rng(0).standard_normal((3, 2)), jnp.float32)
    return {"w1": w1, "b1": jnp.zeros(2), "w2": jnp.ones((2, 4))}


def test_layer_select_emptying_a_group_warns():
    p = _narrow()
    gs = structure.groups(_mlp, p, jnp.ones((2, 3)), prunable_only=True)
    with pytest.warns(
        UserWarning,
        match=r"layer selection at sparsity 0.75 removed every channel of 1 group\(s\), since "
        r"round\(0.75 \* channels\) == channels .*b1\[0\].*layer collapse.*max_sparsity=0.9",
    ):
        m = structure.select(gs, jp.criteria.magnitude(p), 0.75)
    assert not bool(m["b1"].any())
    # A cap keeps one channel; sparsity 1 empties the group on purpose: neither warns.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        capped = structure.select(gs, jp.criteria.magnitude(p), 0.75, max_sparsity=0.9)
        full = structure.select(gs, jp.criteria.magnitude(p), 1.0)
    assert int(capped["b1"].sum()) == 1 and not bool(full["b1"].any())


def test_layer_select_emptying_under_jit_does_not_warn():
    p = _narrow()
    gs = structure.groups(_mlp, p, jnp.ones((2, 3)), prunable_only=True)
    scores = jp.criteria.magnitude(p)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = jax.jit(lambda s: structure.select(gs, scores, s))(0.75)
    assert not bool(m["b1"].any())


def _slimming(p, x):
    dn = ("NHWC", "HWIO", "NHWC")
    h = jax.lax.conv_general_dilated(x, p["c1"]["kernel"], (1, 1), "SAME", dimension_numbers=dn)
    h = jax.nn.relu(h * p["bn"]["scale"] + p["bn"]["bias"])
    h = jax.lax.conv_general_dilated(h, p["c2"]["kernel"], (1, 1), "SAME", dimension_numbers=dn)
    return jax.nn.relu(h + p["c2"]["bias"]).mean((1, 2)) @ p["fc"]["kernel"]


def _slimming_params():
    k = jax.random.split(jax.random.key(0), 4)
    return {
        "c1": {"kernel": jax.random.normal(k[0], (3, 3, 3, 8))},
        "bn": {"scale": jax.random.uniform(k[1], (8,)), "bias": jnp.zeros(8)},
        "c2": {"kernel": jax.random.normal(k[2], (3, 3, 8, 6)), "bias": jnp.zeros(6)},
        "fc": {"kernel": jax.random.normal(k[3], (6, 4))},
    }


def _bn_scale(path, leaf):
    return path[-1] == "scale"


def test_select_warns_for_a_group_no_member_votes_for():
    # Network slimming: only BatchNorm scales vote; c2 has no BatchNorm after it.
    p = _slimming_params()
    x = jnp.ones((2, 6, 6, 3))
    gs = structure.groups(_slimming, p, x, prunable_only=True)
    assert sorted(g.channels for g in gs) == [6, 8]
    with pytest.warns(
        UserWarning,
        match=r"no member of 1 group\(s\) is selected by where= \(Group\(6 channels: "
        r"c2/bias.*fall by position.*Fix: include a member of each such group in where=",
    ):
        m = structure.select(gs, jp.criteria.magnitude(p), 0.5, where=_bn_scale)
    # The cut there is by index: the first 3 filters go.
    assert m["c2"]["bias"].tolist() == [False] * 3 + [True] * 3
    # The BatchNorm group voted: its cut follows the scales, and does not warn.
    scale = np.asarray(p["bn"]["scale"])
    assert m["bn"]["scale"].tolist() == (scale >= np.sort(scale)[4]).tolist()


def test_select_does_not_warn_when_every_cut_group_votes():
    p = _slimming_params()
    gs = structure.groups(_slimming, p, jnp.ones((2, 6, 6, 3)), prunable_only=True)
    scores = jp.criteria.magnitude(p)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # The unvoted group loses nothing at sparsity 0 ...
        structure.select(gs, scores, 0.0, where=_bn_scale)
        # ... and the default where (kernels) reaches every group.
        structure.select(gs, scores, 0.5)
        # A selection (jp.prune's scope) leaves the groups of unselected leaves unmasked.
        masks = structure.selection(gs)(scores, 0.5, where=_bn_scale)
    assert masks["c2"]["bias"].shape == () and masks["bn"]["scale"].shape == (8,)


def _edge_net(p, x, mode):
    dn = ("NHWC", "HWIO", "NHWC")
    h = jax.lax.conv_general_dilated(x, p["k1"], (1, 1), "VALID", dimension_numbers=dn)
    h = jax.nn.relu(h + p["b1"])
    h = jnp.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)), mode=mode)
    h = jax.lax.conv_general_dilated(h, p["k2"], (1, 1), "VALID", dimension_numbers=dn)
    return h.mean((1, 2))


def test_edge_pad_on_spatial_axes_keeps_channels_prunable_and_shrinks_exactly():
    k = jax.random.split(jax.random.key(0), 3)
    p = {
        "k1": jax.random.normal(k[0], (3, 3, 3, 8)),
        "b1": jnp.full((8,), 0.1),
        "k2": jax.random.normal(k[1], (3, 3, 8, 4)),
    }
    x = jax.random.normal(k[2], (2, 6, 6, 3))

    def fn(p, x):
        return _edge_net(p, x, "edge")

    gs = structure.groups(fn, p, x)
    (g,) = [g for g in gs if g.channels == 8]
    assert g.prunable and g.reasons == ()
    masks = structure.select(gs, jp.criteria.magnitude(p), 0.5)
    small = jp.shrink(fn, p, masks, x)
    assert small["k1"].shape == (3, 3, 3, 4) and small["k2"].shape == (3, 3, 4, 4)
    x2 = jax.random.normal(jax.random.key(5), (3, 9, 7, 3))
    np.testing.assert_allclose(
        fn(small, x2), fn(jp.apply_masks(p, masks), x2), rtol=1e-5, atol=1e-5
    )


def test_edge_pad_on_the_channel_axis_still_pins_it():
    p = {"k1": jnp.ones((3, 3, 3, 8)), "b1": jnp.zeros(8), "k2": jnp.ones((3, 3, 10, 4))}

    def fn(p, x):
        dn = ("NHWC", "HWIO", "NHWC")
        h = jax.lax.conv_general_dilated(x, p["k1"], (1, 1), "VALID", dimension_numbers=dn)
        h = jnp.pad(jax.nn.relu(h + p["b1"]), ((0, 0), (0, 0), (0, 0), (1, 1)), mode="edge")
        return jax.lax.conv_general_dilated(h, p["k2"], (1, 1), "VALID", dimension_numbers=dn)

    (g,) = [g for g in structure.groups(fn, p, jnp.ones((1, 5, 5, 3))) if g.channels == 8]
    assert not g.prunable and any("fixed indices" in r for r in g.reasons)


def _deep(p, x):
    h = jax.nn.relu(x @ p["w1"])
    return jax.nn.relu(h @ p["w2"]) @ p["w3"]


def test_layerwise_where_accepts_jax_keypaths_and_normalized_paths():
    p = {"w1": jnp.ones((3, 4)), "w2": jnp.ones((4, 4)), "w3": jnp.ones((4, 2))}
    seen = []

    def finetune(params, masks, where):
        by_key = [
            jax.tree_util.keystr(k)
            for k, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
            if where(k, leaf)
        ]
        by_tuple = [k for k in params if where((k,), params[k])]
        seen.append((by_key, by_tuple))
        return jax.tree_util.tree_map_with_path(lambda k, x: x - 0.1 if where(k, x) else x, params)

    p2, m = structure.prune_layerwise(
        _deep, p, (jnp.ones((1, 3)),), sparsity=0.5, finetune=finetune, progress=False
    )
    assert seen == [
        (["['w1']", "['w2']", "['w3']"], ["w1", "w2", "w3"]),
        (["['w2']", "['w3']"], ["w2", "w3"]),
    ]
    # The window was trained: w3's kept rows moved twice, w1's kept entries once.
    np.testing.assert_allclose(np.asarray(p2["w3"])[np.asarray(m["w3"])], 0.8, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(p2["w1"])[np.asarray(m["w1"])], 0.9, rtol=1e-6)


class _Block(nn.Module):
    c: int

    @nn.compact
    def __call__(self, x):
        h = nn.Conv(self.c, (3, 3))(nn.relu(nn.Conv(self.c, (3, 3))(x)))
        if x.shape[-1] != self.c:  # a projection chosen from the input width
            x = nn.Conv(self.c, (1, 1))(x)
        return nn.relu(h + x)


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = _Block(8)(nn.relu(nn.Conv(8, (3, 3))(x)))
        return nn.Dense(3)(x.mean((1, 2)))


def test_linen_branch_on_input_width_names_the_branch_and_its_fix():
    x = jnp.ones((2, 6, 6, 3))
    net = _Net()
    v = net.init(jax.random.key(0), x)
    gs = structure.groups(structure.linen_apply(net), v, x)
    masks = structure.select(gs, jp.criteria.magnitude(v), 0.5)
    with pytest.raises(ValueError, match=r"ScopeParamNotFoundError") as info:
        structure.shrink_linen(net, v, masks, x)
    msg = str(info.value)
    assert "Likely cause: a Python branch on an input width" in msg
    assert "branch on a constructor attribute" in msg and "not on x.shape" in msg
    assert "custom module's width" not in msg  # not the attribute-width cause


def test_selection_select_fn_does_not_call_an_unvoted_group_collapsed():
    def mlp(p, x):
        h = jax.nn.relu(x @ p["w1"] + p["b1"])
        h = jax.nn.relu(h @ p["w2"] + p["b2"])
        return h @ p["w3"]

    k = jax.random.split(jax.random.key(0), 3)
    p = {
        "w1": jax.random.normal(k[0], (3, 8)), "b1": jnp.ones(8),
        "w2": jax.random.normal(k[1], (8, 2)), "b2": jnp.ones(2),
        "w3": jax.random.normal(k[2], (2, 5)),
    }  # fmt: skip
    groups = structure.groups(mlp, p, jnp.ones((1, 3)))
    scores = jax.tree.map(jnp.abs, p)
    where = lambda path, x: "1" in jax.tree_util.keystr(path)  # the 2-channel group unvoted
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = structure.selection(groups)(scores, 0.75, where=where)
    assert bool(jnp.all(m["w2"])) and bool(jnp.all(m["w3"]))  # nothing of it was cut
