"""Dependency groups read from the jaxpr: reference models, concat, depthwise, opaque ops."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxprune as jp
from jaxprune import models, structure
from jaxprune._tree import path_str

X_IMG = jax.ShapeDtypeStruct((2, 28, 28, 1), jnp.float32)


def _groups(make, x=X_IMG):
    # Groups need shapes only: an abstract model traces without running any initializer.
    apply_fn, state = structure.module_apply(nnx.eval_shape(make))
    return structure.groups(apply_fn, state, x)


def _names(group):
    return {f"{path_str(m.path)}[{m.axis}]" for m in group.members}


def _prunable(gs):
    return [g for g in gs if g.prunable]


def test_mlp_groups_tie_columns_bias_and_next_rows():
    gs = _groups(lambda: models.lenet_300_100(rngs=nnx.Rngs(0)), jnp.ones((2, 784)))
    got = {frozenset(_names(g)): g.channels for g in _prunable(gs)}
    assert got == {
        frozenset({"layers/0/kernel[1]", "layers/0/bias[0]", "layers/1/kernel[0]"}): 300,
        frozenset({"layers/1/kernel[1]", "layers/1/bias[0]", "layers/2/kernel[0]"}): 100,
    }
    blocked = {frozenset(_names(g)): g.reasons for g in gs if not g.prunable}
    assert any(
        "model output" in r for r in blocked[frozenset({"layers/2/kernel[1]", "layers/2/bias[0]"})]
    )
    assert any("model input" in r for r in blocked[frozenset({"layers/0/kernel[0]"})])


def test_lenet5_flatten_maps_conv_channels_to_strided_dense_rows():
    gs = _prunable(_groups(lambda: models.LeNet5Caffe(rngs=nnx.Rngs(0))))
    assert sorted(g.channels for g in gs) == [20, 50, 500]
    g50 = next(g for g in gs if g.channels == 50)
    assert _names(g50) == {"conv2/kernel[3]", "conv2/bias[0]", "fc1/kernel[0]"}
    fc1 = next(m for m in g50.members if path_str(m.path) == "fc1/kernel")
    assert fc1.layout == (16, 1, 0, 50)  # 4x4 positions, channel is the minor (NHWC) factor
    assert structure.channel_indices(fc1.layout, 800, 3)[:3] == [3, 53, 103]


def test_vgg_groups_include_batchnorm_parameters_and_statistics():
    gs = _prunable(_groups(lambda: models.VGGSmall(rngs=nnx.Rngs(0))))
    assert sorted(g.channels for g in gs) == [32, 32, 64, 64, 128, 256]
    g0 = next(g for g in gs if "convs/0/kernel[3]" in _names(g))
    assert _names(g0) == {
        "convs/0/kernel[3]",
        "convs/0/bias[0]",
        "convs/1/kernel[2]",
        "bns/0/scale[0]",
        "bns/0/bias[0]",
        "bns/0/mean[0]",
        "bns/0/var[0]",
    }
    last = next(g for g in gs if "convs/4/kernel[3]" in _names(g))
    assert "fc1/kernel[0]" in _names(last)


def test_resnet20_residual_additions_tie_a_whole_stage():
    gs = _groups(lambda: models.ResNet20(rngs=nnx.Rngs(0)))
    live = _prunable(gs)
    assert len(live) == 12  # 3 residual streams + one inner group per basic block
    stage1 = next(g for g in live if "stem/kernel[3]" in _names(g))
    names = _names(stage1)
    assert stage1.channels == 16
    for want in (
        "blocks/0/conv2/kernel[3]",
        "blocks/2/bn2/scale[0]",
        "blocks/3/conv1/kernel[2]",
        "blocks/3/proj/kernel[2]",
        "blocks/1/conv1/kernel[2]",
    ):
        assert want in names
    stage3 = next(g for g in live if "head/kernel[0]" in _names(g))
    assert stage3.channels == 64 and "blocks/6/proj/kernel[3]" in _names(stage3)
    inner = [g for g in live if len(g.members) == 6]
    assert len(inner) == 9


def _concat_fn(p, x):
    a = jax.nn.relu(x @ p["wa"] + p["ba"])
    b = jax.nn.relu(x @ p["wb"])
    return jnp.concatenate([a, b], axis=-1) @ p["wo"]


def _concat_params():
    ks = jax.random.split(jax.random.key(0), 4)
    return {
        "wa": jax.random.normal(ks[0], (5, 3)),
        "ba": jax.random.normal(ks[1], (3,)),
        "wb": jax.random.normal(ks[2], (5, 4)),
        "wo": jax.random.normal(ks[3], (7, 2)),
    }


def test_concatenate_gives_each_input_an_offset_slice_of_the_consumer():
    p = _concat_params()
    gs = _prunable(structure.groups(_concat_fn, p, jnp.ones((2, 5))))
    by = {frozenset(_names(g)): g for g in gs}
    ga = by[frozenset({"wa[1]", "ba[0]", "wo[0]"})]
    gb = by[frozenset({"wb[1]", "wo[0]"})]
    assert next(m for m in ga.members if m.path == ("wo",)).layout == (1, 1, 0, 3)
    assert next(m for m in gb.members if m.path == ("wo",)).layout == (1, 1, 3, 4)
    masks = jax.tree.map(lambda x: jnp.ones(x.shape, bool), p)
    masks["wb"] = masks["wb"].at[:, 1].set(False)
    masks["wa"] = masks["wa"].at[:, 0].set(False)
    masks["ba"] = masks["ba"].at[0].set(False)
    small = structure.shrink(_concat_fn, p, masks, jnp.ones((2, 5)))
    assert small["wo"].shape == (5, 2) and small["wa"].shape == (5, 2)


def _depthwise_fn(p, x):
    dn = ("NHWC", "HWIO", "NHWC")
    h = jax.nn.relu(jax.lax.conv_general_dilated(x, p["pw1"], (1, 1), "SAME", dimension_numbers=dn))
    c = h.shape[-1]
    h = jax.lax.conv_general_dilated(
        h, p["dw"], (1, 1), "SAME", dimension_numbers=dn, feature_group_count=c
    )
    h = jax.nn.relu(h)
    return jnp.mean(
        jax.lax.conv_general_dilated(h, p["pw2"], (1, 1), "SAME", dimension_numbers=dn), axis=(1, 2)
    )


def test_depthwise_conv_ties_input_channel_to_its_filter_and_the_next_conv():
    p = {"pw1": jnp.ones((1, 1, 3, 4)), "dw": jnp.ones((3, 3, 1, 4)), "pw2": jnp.ones((1, 1, 4, 2))}
    gs = _prunable(structure.groups(_depthwise_fn, p, jnp.ones((1, 6, 6, 3))))
    assert [(_names(g), g.channels) for g in gs] == [({"pw1[3]", "dw[3]", "pw2[2]"}, 4)]


def _grouped_fn(p, x):
    dn = ("NHWC", "HWIO", "NHWC")
    conv = lambda h, w, g=1: jax.lax.conv_general_dilated(  # noqa: E731
        h, w, (1, 1), "SAME", dimension_numbers=dn, feature_group_count=g
    )
    h = jax.nn.relu(conv(x, p["c1"]) + p["b1"])
    h = jax.nn.relu(conv(h, p["g"], 2) + p["bg"])
    return jnp.mean(conv(h, p["c3"]), axis=(1, 2))


def test_grouped_conv_channels_are_in_group_positions_across_all_groups():
    p = {
        "c1": jnp.ones((3, 3, 3, 8)),
        "b1": jnp.ones(8),
        "g": jnp.ones((3, 3, 4, 6)),  # 2 groups: 8 -> 6 channels
        "bg": jnp.ones(6),
        "c3": jnp.ones((1, 1, 6, 2)),
    }
    gs = _prunable(structure.groups(_grouped_fn, p, jnp.ones((1, 6, 6, 3))))
    got = sorted((sorted(_names(g)), g.channels) for g in gs)
    assert got == [
        (["b1[0]", "c1[3]", "g[2]"], 4),  # in-group input position r of both groups
        (["bg[0]", "c3[2]", "g[3]"], 3),  # in-group output position j of both groups
    ]
    by_leaf = {path_str(m.path): m.layout for g in gs for m in g.members}
    assert by_leaf["c1"] == (2, 1, 0, 4) and by_leaf["g"] == (2, 1, 0, 3)
    # Any per-channel (ungrouped) pruning of those axes would unbalance the groups.
    blocked = [
        g for g in structure.groups(_grouped_fn, p, jnp.ones((1, 6, 6, 3))) if not g.prunable
    ]
    assert any("c1[3]" in _names(g) for g in blocked)


def _opaque_fn(p, x):
    h = jax.nn.relu(x @ p["w1"])
    h = jax.lax.sort(h, dimension=1)  # mixes the hidden units: cannot be seen through
    return h @ p["w2"]


def test_opaque_primitive_warns_and_pins_its_group():
    p = {"w1": jnp.ones((3, 4)), "w2": jnp.ones((4, 2))}
    with pytest.warns(
        UserWarning,
        match=r"primitive\(s\) \['sort'\] cannot be seen through; the channel groups along "
        r"w1 axis 1, w2 axis 0 are left unprunable",
    ):
        gs = structure.groups(_opaque_fn, p, jnp.ones((2, 3)))
    g = next(g for g in gs if "w1[1]" in _names(g))
    assert not g.prunable and any("'sort'" in r for r in g.reasons)


def test_reduction_over_channels_pins_the_group_without_warning():
    def f(p, x):
        h = x @ p["w1"]
        h = h - jnp.mean(h, axis=-1, keepdims=True)  # layer-norm-like: channels interact
        return h @ p["w2"]

    gs = structure.groups(f, {"w1": jnp.ones((3, 4)), "w2": jnp.ones((4, 2))}, jnp.ones((2, 3)))
    g = next(g for g in gs if "w1[1]" in _names(g))
    assert not g.prunable and any("reduce_sum" in r for r in g.reasons)


def test_group_scores_sum_kernel_members():
    p = {"w1": jnp.arange(12.0).reshape(3, 4), "b1": jnp.ones(4), "w2": jnp.ones((4, 2))}

    def f(p, x):
        return jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"]

    (g,) = structure.groups(f, p, jnp.ones((1, 3)), prunable_only=True)
    (imp,) = structure.group_scores([g], p)
    want = np.linalg.norm(np.asarray(p["w1"]), axis=0) + np.sqrt(2.0)
    np.testing.assert_allclose(np.asarray(imp), want, rtol=1e-6)
    (imp_all,) = structure.group_scores([g], p, reduce="l1", where=lambda path, x: True)
    np.testing.assert_allclose(np.asarray(imp_all), np.abs(p["w1"]).sum(0) + 1.0 + 2.0)


def test_select_exact_channel_counts_on_every_member_and_as_prune_scope():
    model = models.lenet_300_100(rngs=nnx.Rngs(0))
    apply_fn, state = structure.module_apply(model)
    gs = structure.groups(apply_fn, state, jnp.ones((1, 784)))
    masks = structure.select(gs, jp.criteria.magnitude(state), 0.3)
    assert int((~np.asarray(masks["layers"][0]["kernel"]).any(0)).sum()) == 90
    assert int((~np.asarray(masks["layers"][0]["bias"])).sum()) == 90
    assert int((~np.asarray(masks["layers"][1]["kernel"]).any(1)).sum()) == 90
    assert int((~np.asarray(masks["layers"][1]["bias"])).sum()) == 30
    assert masks["layers"][2]["bias"].shape == ()

    params = nnx.state(model, nnx.Param)
    tx = jp.prune(optax.sgd(0.1), sparsity=0.5, scope=structure.selection(gs))
    state = tx.init(params)
    grads = jax.tree.map(jnp.zeros_like, params)
    _, state = jax.jit(tx.update)(grads, state, params)
    got = jp.get_masks(state)
    assert int((~np.asarray(got["layers"][1]["kernel"]).any(0)).sum()) == 50
    assert got["layers"][1]["bias"].shape == ()


def test_channel_pruning_of_a_batchnorm_cnn_trained_with_nnx_optimizer_then_shrunk():
    # Groups from the whole state (BatchNorm statistics included); jp.prune under
    # nnx.Optimizer(wrt=nnx.Param) scores the Param part only, matched by path.
    model = models.VGGSmall(rngs=nnx.Rngs(0), cfg=(8, "M", 16, "M"), image_size=8, hidden=12)
    x = jax.random.uniform(jax.random.key(1), (4, 8, 8, 1))
    model.eval()
    apply_fn, state = structure.module_apply(model)
    gs = structure.groups(apply_fn, state, x[:2], prunable_only=True)
    model.train()
    sched = jp.schedules.polynomial(0.0, 0.5, begin_step=0, end_step=2, frequency=1)
    tx = jp.prune(optax.adam(1e-2), sparsity=sched, scope=structure.selection(gs))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(m, o, x):
        o.update(m, nnx.grad(lambda m: jnp.mean(m(x) ** 2))(m))

    for _ in range(4):
        step(model, opt, x)
    masks = jp.get_masks(opt.opt_state)
    assert int((~np.asarray(masks["convs"][1]["kernel"]).any((0, 1, 2))).sum()) == 8
    model.eval()
    want = model(x)
    structure.shrink_module(model, masks, x)
    assert [c.kernel.shape[-1] for c in model.convs] == [4, 8]
    assert [bn.mean.shape for bn in model.bns] == [(4,), (8,)]
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_select_errors():
    with pytest.raises(ValueError, match="scope must be 'layer' .*'global' .*'isomorphic'"):
        structure.select([], {}, 0.5, scope="model")
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\]"):
        structure.select([], {}, 2.0)
