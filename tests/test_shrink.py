"""Shrinking: the smaller network computes what the masked one does, on each reference model."""

import warnings
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxprune as jp
from jaxprune import models, structure
from jaxprune._tree import leaves_with_paths

X_IMG = jax.random.normal(jax.random.key(7), (2, 28, 28, 1))


def _model(make, seed=0):
    """Builds ``make()`` abstractly and fills it with numpy randoms (no per-shape compiles).

    Biases and BatchNorm statistics are random too, so folding and BN really matter.
    """
    model = nnx.eval_shape(make)
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(seed)
    flat, treedef = leaves_with_paths(state)
    out = []
    for path, x in flat:
        if len(x.shape) >= 2:
            v = rng.normal(size=x.shape) * np.sqrt(2.0 / np.prod(x.shape[:-1]))
        elif path[-1] == "var":
            v = np.abs(rng.normal(size=x.shape)) * 0.3 + 0.5
        else:
            v = rng.normal(size=x.shape) * 0.3 + (1.0 if path[-1] == "scale" else 0.0)
        out.append(jnp.asarray(v, x.dtype))
    state = jax.tree.unflatten(treedef, out)
    model = nnx.merge(graphdef, state)
    model.eval()
    apply_fn, state = structure.module_apply(model)
    return model, apply_fn, state


def _assert_same(apply_fn, small, params, masks, x):
    got = jax.jit(apply_fn)(small, x)
    want = jax.jit(apply_fn)(jp.apply_masks(params, masks), x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=2e-4)


def _size(tree):
    return sum(np.size(x) for x in jax.tree.leaves(tree))


def test_mlp_kernel_only_masks_fold_relu_constants_into_the_next_bias():
    model, apply_fn, state = _model(lambda: models.lenet_300_100(rngs=nnx.Rngs(0)))
    hidden = lambda path, x: x.ndim >= 2 and path[1] != 2  # noqa: E731
    masks = jp.masks.structured(jp.criteria.magnitude(state), 0.5, axes=-1, where=hidden)
    small = structure.shrink(apply_fn, state, masks, jnp.ones((2, 784)), check=False)
    assert small["layers"][0]["kernel"].shape == (784, 150)
    assert small["layers"][1]["kernel"].shape == (150, 50)
    assert small["layers"][2]["kernel"].shape == (50, 10)
    # Biases of the removed ReLU units were nonzero: relu(b) @ W_next went into the next bias.
    assert not np.allclose(small["layers"][2]["bias"], state["layers"][2]["bias"])
    x = jax.random.normal(jax.random.key(1), (4, 784))
    _assert_same(apply_fn, small, state, masks, x)


def test_mlp_input_row_masks_remove_the_producing_units():
    model, apply_fn, state = _model(lambda: models.MLP((12, 8, 6, 3), rngs=nnx.Rngs(0)))
    only_middle = lambda path, x: path == ("layers", 1, "kernel")  # noqa: E731
    masks = jp.masks.structured(jp.criteria.magnitude(state), 0.25, axes=-2, where=only_middle)
    small = structure.shrink(apply_fn, state, masks, jnp.ones((2, 12)), check=False)
    assert small["layers"][0]["kernel"].shape == (12, 6)
    assert small["layers"][0]["bias"].shape == (6,)
    _assert_same(apply_fn, small, state, masks, jax.random.normal(jax.random.key(2), (3, 12)))


def test_lenet5_filter_masks_fold_through_pooling_into_a_valid_conv():
    model, apply_fn, state = _model(lambda: models.LeNet5Caffe(rngs=nnx.Rngs(0)))
    convs = lambda path, x: path[0] in ("conv1", "conv2") and x.ndim == 4  # noqa: E731
    masks = jp.masks.structured(jp.criteria.magnitude(state), 0.5, axes=-1, where=convs)
    small = structure.shrink(apply_fn, state, masks, X_IMG, check=False)
    assert small["conv2"]["kernel"].shape == (5, 5, 10, 25)
    assert small["fc1"]["kernel"].shape == (400, 500)
    _assert_same(apply_fn, small, state, masks, X_IMG)


def test_lenet5_shrunk_by_units_is_a_lenet5_of_the_kept_widths():
    model, apply_fn, state = _model(lambda: models.LeNet5Caffe(rngs=nnx.Rngs(0)))
    gs = structure.groups(apply_fn, state, X_IMG[:1], prunable_only=True)
    masks = structure.select(gs, jp.criteria.magnitude(state), 0.6)
    want = jax.jit(apply_fn)(jp.apply_masks(state, masks), X_IMG)
    small = structure.shrink_module(model, masks, X_IMG)
    kept = tuple(getattr(small, n).bias.shape[0] for n in ("conv1", "conv2", "fc1"))
    assert kept == (8, 20, 200)
    # The same network, built dense at the kept widths, takes the shrunk params as they are.
    dense = models.LeNet5Caffe(rngs=nnx.Rngs(1), features=kept)
    nnx.update(dense, nnx.state(small, nnx.Param))
    np.testing.assert_allclose(np.asarray(dense(X_IMG)), np.asarray(want), rtol=2e-4, atol=2e-4)
    for bad in ((20, 50), (20, 0, 500), (20, 50, 2.5)):
        with pytest.raises(ValueError, match=r"features must be three positive ints"):
            models.LeNet5Caffe(rngs=nnx.Rngs(0), features=bad)


def test_vgg_batchnorm_shrinks_as_a_model_in_place():
    model, apply_fn, state = _model(lambda: models.VGGSmall(rngs=nnx.Rngs(0)))
    gs = structure.groups(apply_fn, state, X_IMG[:1], prunable_only=True)
    masks = structure.select(gs, jp.criteria.magnitude(state), 0.5)
    want = jax.jit(apply_fn)(jp.apply_masks(state, masks), X_IMG)
    before = _size(state)
    same = structure.shrink_module(model, masks, X_IMG)
    assert same is model
    assert model.convs[0].kernel.shape == (3, 3, 1, 16) and model.convs[0].out_features == 16
    assert model.bns[0].mean.shape == (16,) and model.bns[0].num_features == 16
    assert model.fc1.kernel.shape == (9 * 64, 128) and model.fc1.in_features == 9 * 64
    after = _size(nnx.state(model))
    assert after < 0.3 * before
    np.testing.assert_allclose(
        np.asarray(nnx.jit(lambda m, x: m(x))(model, X_IMG)), np.asarray(want), rtol=2e-4, atol=2e-4
    )


def test_vgg_kernel_only_masks_keep_channels_that_cannot_fold_through_same_padding():
    _, apply_fn, state = _model(lambda: models.VGGSmall(rngs=nnx.Rngs(0)))
    first = lambda path, x: path == ("convs", 0, "kernel")  # noqa: E731
    masks = jp.masks.structured(jp.criteria.magnitude(state), 0.5, axes=-1, where=first)
    with pytest.warns(UserWarning, match=r"shrink kept \d+ channels .* constant output"):
        small = structure.shrink(apply_fn, state, masks, X_IMG, check=False)
    # conv bias + BN make the dead filters' outputs constants: where relu makes them 0 the
    # filter goes; where they stay positive, a SAME conv sees them differently at the
    # zero-padded border, so they cannot be folded and are kept.
    kept = small["convs"][0]["kernel"].shape[-1]
    assert 16 < kept < 32
    _assert_same(apply_fn, small, state, masks, X_IMG)


def test_resnet20_residual_groups_shrink_exactly():
    _, apply_fn, state = _model(lambda: models.ResNet20(rngs=nnx.Rngs(0)))
    gs = structure.groups(apply_fn, state, X_IMG[:1], prunable_only=True)
    masks = structure.select(gs, jp.criteria.magnitude(state), 0.25)
    small = structure.shrink(apply_fn, state, masks, X_IMG, check=False)
    assert small["stem"]["kernel"].shape == (3, 3, 1, 12)
    assert small["blocks"][8]["conv2"]["kernel"].shape == (3, 3, 48, 48)
    assert small["head"]["kernel"].shape == (48, 10)
    _assert_same(apply_fn, small, state, masks, X_IMG)


class _LinenMLP(nn.Module):
    features: Sequence[int]

    @nn.compact
    def __call__(self, x):
        for f in self.features[:-1]:
            x = jax.nn.relu(nn.Dense(f)(x))
        return nn.Dense(self.features[-1])(x)


def test_linen_params_shrink_and_the_module_is_rebuilt_from_widths():
    module = _LinenMLP((16, 8, 3))
    x = jax.random.normal(jax.random.key(0), (2, 5))
    params = module.init(jax.random.key(1), x)["params"]
    apply_fn = lambda p, x: module.apply({"params": p}, x)  # noqa: E731
    gs = structure.groups(apply_fn, params, x, prunable_only=True)
    masks = structure.select(gs, jp.criteria.magnitude(params), 0.5)
    with pytest.raises(ValueError, match="apply_fn fails on the shrunk params"):
        structure.shrink(apply_fn, params, masks, x)
    small = structure.shrink(apply_fn, params, masks, x, check=False)
    changed = structure.widths(params, small)
    assert changed["Dense_0/kernel"] == ((5, 16), (5, 8))
    rebuilt = _LinenMLP(tuple(small[f"Dense_{i}"]["kernel"].shape[1] for i in range(3)))
    got = rebuilt.apply({"params": small}, x)
    want = apply_fn(jp.apply_masks(params, masks), x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def _mlp3(p, x):
    h = jax.nn.relu(x @ p["w1"] + p["b1"])
    h = jax.nn.relu(h @ p["w2"] + p["b2"])
    return h @ p["w3"]


def test_layerwise_driver_prunes_one_group_at_a_time_with_finetuning():
    ks = jax.random.split(jax.random.key(0), 3)
    p = {
        "w1": jax.random.normal(ks[0], (6, 8)),
        "b1": jnp.zeros(8),
        "w2": jax.random.normal(ks[1], (8, 8)),
        "b2": jnp.zeros(8),
        "w3": jax.random.normal(ks[2], (8, 2)),
    }
    x = jax.random.normal(jax.random.key(3), (4, 6))
    calls = []

    def finetune(params, masks, where):
        flat, _ = leaves_with_paths(params)
        calls.append(sorted("/".join(map(str, path)) for path, leaf in flat if where(path, leaf)))
        return jax.tree.map(lambda a: a * 1.01, params)  # a stand-in for a few SGD steps

    p2, masks = structure.prune_layerwise(
        _mlp3, p, (x,), sparsity=[0.5, 0.25], finetune=finetune, progress=False
    )
    assert calls[0] == ["b1", "b2", "w1", "w2", "w3"]  # group 1 plus the layer reading it
    assert len(calls) == 2
    small = structure.shrink(_mlp3, p2, masks, x)
    assert small["w1"].shape == (6, 4) and small["w2"].shape == (4, 6)
    with pytest.raises(ValueError, match="sparsity has 3 entries but the model has 2"):
        structure.prune_layerwise(_mlp3, p, (x,), sparsity=[0.1] * 3, progress=False)
    for window in (0, 1.5, "2", True):
        with pytest.raises(ValueError, match=r"window must be an int >= 1 .*got .*Fix"):
            structure.prune_layerwise(_mlp3, p, (x,), sparsity=0.5, window=window, progress=False)
    # Refused before float() could read them as numbers.
    for bad in (True, "0.5", [0.5, "0.25"]):
        with pytest.raises(ValueError, match="sparsity must be"):
            structure.prune_layerwise(_mlp3, p, (x,), sparsity=bad, progress=False)


def test_prune_layerwise_warns_when_rounding_empties_a_group():
    mlp = lambda p, x: jax.nn.relu(x @ p["w1"]) @ p["w2"]  # noqa: E731
    p = {"w1": jnp.ones((3, 4)), "w2": jnp.ones((4, 2))}
    with pytest.warns(UserWarning, match=r"removed every channel of 1 group.*at sparsity 0.9"):
        _, masks = structure.prune_layerwise(
            mlp, p, (jnp.ones((1, 3)),), sparsity=0.9, progress=False
        )
    assert not bool(masks["w1"].any())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # sparsity 1.0 asks for it: no warning
        structure.prune_layerwise(mlp, p, (jnp.ones((1, 3)),), sparsity=1.0, progress=False)


def test_shrink_errors():
    p = {
        "w1": jnp.ones((3, 4)),
        "b1": jnp.ones(4),
        "w2": jnp.ones((4, 2)),
        "b2": jnp.ones(2),
        "w3": jnp.ones((2, 2)),
    }
    with pytest.raises(ValueError, match="masks must have exactly the tree structure of params"):
        structure.shrink(_mlp3, p, {"w1": jnp.ones((3, 4), bool)}, jnp.ones((1, 3)))
    model = models.MLP((4, 3, 2), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="masks has leaves the model's state does not: nope"):
        structure.shrink_module(model, {"nope": jnp.ones((), bool)}, jnp.ones((1, 4)))


class _WithDropout(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(6, 8, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.l2 = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.l2(self.drop(jax.nn.relu(self.l1(x))))


def test_shrink_module_leaves_rng_streams_alone_and_takes_param_only_masks():
    model = _WithDropout(nnx.Rngs(0))
    model.eval()
    params = nnx.state(model, nnx.Param)  # what nnx.Optimizer's masks cover
    masks = jp.masks.structured(
        jp.criteria.magnitude(params), 0.5, axes=-1, where=lambda path, x: path == ("l1", "kernel")
    )
    x = jax.random.normal(jax.random.key(0), (3, 6))
    structure.shrink_module(model, masks, x)  # check=True compares with the masked model
    assert model.l1.kernel.shape == (6, 4) and model.l2.in_features == 4


class _Grouped(nnx.Module):
    def __init__(self, rngs):
        self.c1 = nnx.Conv(1, 8, (3, 3), rngs=rngs)
        self.g = nnx.Conv(8, 12, (3, 3), feature_group_count=4, rngs=rngs)
        self.c3 = nnx.Conv(12, 6, (3, 3), rngs=rngs)
        self.fc = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.relu(self.c1(x))
        h = jax.nn.relu(self.g(h))
        h = jax.nn.relu(self.c3(h))
        return self.fc(jnp.mean(h, axis=(1, 2)))


def test_grouped_conv_shrinks_every_group_alike_as_a_model_in_place():
    model, apply_fn, state = _model(lambda: _Grouped(nnx.Rngs(0)))
    gs = structure.groups(apply_fn, state, X_IMG[:1], prunable_only=True)
    masks = structure.select(gs, jp.criteria.magnitude(state), 0.5)
    want = jax.jit(apply_fn)(jp.apply_masks(state, masks), X_IMG)
    structure.shrink_module(model, masks, X_IMG)
    # 8 inputs = 4 groups x 2 positions -> 4 x 1; 12 outputs = 4 groups x 3 -> 4 x 1;
    # c3's 6 filters -> 3. Every group keeps the same width.
    assert model.g.feature_group_count == 4 and model.g.in_features == 4
    assert model.c1.kernel.shape == (3, 3, 1, 4)
    assert model.g.kernel.shape == (3, 3, 1, 4) and model.g.out_features == 4
    assert model.c3.kernel.shape == (3, 3, 4, 3)
    np.testing.assert_allclose(
        np.asarray(nnx.jit(lambda m, x: m(x))(model, X_IMG)), np.asarray(want), rtol=2e-4, atol=2e-4
    )


class _Splits(nnx.Module):
    """An equal split feeding a conv and a concatenation, and a GLU."""

    def __init__(self, rngs):
        self.c = nnx.Conv(1, 8, (3, 3), rngs=rngs)
        self.a = nnx.Conv(4, 4, (3, 3), rngs=rngs)
        self.up = nnx.Linear(8, 12, rngs=rngs)
        self.head = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        h1, h2 = jnp.split(jax.nn.relu(self.c(x)), 2, axis=-1)
        h = jnp.concatenate([self.a(h1), 2.0 * h2], axis=-1).mean((1, 2))
        g, gate = jnp.split(self.up(h), 2, axis=-1)
        return self.head(g * jax.nn.sigmoid(gate))


def test_an_equal_split_keeps_its_parts_equal_and_an_unequal_one_is_pinned():
    model, apply_fn, state = _model(lambda: _Splits(nnx.Rngs(0)))
    gs = structure.groups(apply_fn, state, X_IMG[:1], prunable_only=True)
    # Channel c of c's output is position c of both halves: pruned together.
    c_group = next(g for g in gs if any(m.path == ("c", "bias") for m in g.members))
    layouts = {m.path: m.layout for m in c_group.members}
    assert layouts[("c", "bias")] == (2, 1, 0, 4) and layouts[("a", "kernel")] == (1, 1, 0, 4)
    masks = structure.select(gs, jp.criteria.magnitude(state), 0.5)
    want = jax.jit(apply_fn)(jp.apply_masks(state, masks), X_IMG)
    structure.shrink_module(model, masks, X_IMG)  # re-traced: jnp.split halves again
    assert model.c.kernel.shape == (3, 3, 1, 4) and model.a.kernel.shape == (3, 3, 2, 2)
    assert model.up.kernel.shape == (4, 6) and model.head.kernel.shape == (3, 3)
    np.testing.assert_allclose(np.asarray(model(X_IMG)), np.asarray(want), rtol=2e-4, atol=2e-4)

    def uneven(p, x):  # fixed split indices: shrinking could not move them
        h1, h2 = jnp.split(jax.nn.relu(x @ p["w"]), [3], axis=-1)
        return h1 @ p["a"] + h2 @ p["b"]

    p = {"w": jnp.ones((2, 8)), "a": jnp.ones((3, 2)), "b": jnp.ones((5, 2))}
    (w_out,) = [g for g in structure.groups(uneven, p, jnp.ones((1, 2))) if g.channels == 8]
    assert not w_out.prunable and "split" in w_out.reasons[0]


class _Attention(nnx.Module):
    def __init__(self, rngs):
        self.emb = nnx.Linear(4, 16, rngs=rngs)
        self.att = nnx.MultiHeadAttention(4, 16, decode=False, rngs=rngs)
        self.head = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        t = self.emb(x.reshape(x.shape[0], -1, 4))
        return self.head(self.att(t).mean(1))


def test_attention_heads_shrink_and_head_dim_is_pinned():
    model, apply_fn, state = _model(lambda: _Attention(nnx.Rngs(0)))
    x = X_IMG[:, :8, :8, :]  # 16 tokens of 4 features
    groups = structure.groups(apply_fn, state, x[:1])
    head_dims = [g for g in groups if any(m.path == ("att", "query", "kernel") for m in g.members)]
    by_axis = {
        m.axis: g for g in head_dims for m in g.members if m.path[-2:] == ("query", "kernel")
    }
    assert by_axis[1].prunable and by_axis[1].channels == 4  # heads
    assert not by_axis[2].prunable and "1/sqrt(head_dim)" in by_axis[2].reasons[0]
    masks = structure.select([g for g in groups if g.prunable], jp.criteria.magnitude(state), 0.5)
    want = jax.jit(apply_fn)(jp.apply_masks(state, masks), x)
    structure.shrink_module(model, masks, x)
    assert model.att.num_heads == 2 and model.att.query.kernel.shape == (8, 2, 4)
    assert model.att.in_features == 8 and model.att.out.kernel.shape == (2, 4, 8)
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(want), rtol=2e-4, atol=2e-4)


def test_a_number_computed_from_a_width_is_named_when_the_check_fails():
    def scaled(p, x):  # divides by sqrt(fan_in): the shrunk network divides by less
        h = jax.nn.relu(jax.nn.relu(x @ p["a"]) @ p["b"])
        return h @ p["d"] / jnp.sqrt(p["d"].shape[0])

    ks = jax.random.split(jax.random.key(0), 4)
    p = {
        "a": jax.random.normal(ks[0], (4, 8)),
        "b": jax.random.normal(ks[1], (8, 6)),
        "d": jax.random.normal(ks[2], (6, 3)),
    }
    x = jax.random.normal(ks[3], (5, 4))
    gs = structure.groups(scaled, p, x, prunable_only=True)
    masks = structure.select(gs, jp.criteria.magnitude(p), 0.5)
    with pytest.raises(ValueError, match=r"alone already changes them: b\[1\], d\[0\]\. .*sqrt"):
        structure.shrink(scaled, p, masks, x)
    # Without that group the rest shrinks exactly.
    ok = [g for g in gs if all(m.path != ("d",) for m in g.members)]
    small = structure.shrink(scaled, p, structure.select(ok, jp.criteria.magnitude(p), 0.5), x)
    assert small["a"].shape == (4, 4) and small["d"].shape == (6, 3)


class _ScaledByWidth(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(4, 8, rngs=rngs)
        self.fc2 = nnx.Linear(8, 6, rngs=rngs)
        self.fc3 = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.relu(self.fc2(jax.nn.relu(self.fc1(x))))
        return self.fc3(h) / jnp.sqrt(h.shape[-1])  # recomputed from the shrunk width


def test_shrink_module_names_the_group_and_leaves_the_model_as_it_was_on_a_mismatch():
    model = _ScaledByWidth(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (5, 4))
    before = np.asarray(model(x))
    apply_fn, state = structure.module_apply(model)
    gs = structure.groups(apply_fn, state, x, prunable_only=True)
    masks = structure.select(gs, jp.criteria.magnitude(state), 0.5)
    with pytest.raises(
        ValueError,
        match=r"alone already changes them: fc2/bias\[0\], fc2/kernel\[1\], "
        r"fc3/kernel\[0\]\. .*sqrt",
    ):
        structure.shrink_module(model, masks, x)
    # Nothing was lost: same arrays, same widths, same outputs.
    assert model.fc2.kernel.shape == (8, 6) and model.fc2.out_features == 6
    assert model.fc3.in_features == 6 and model.fc1.out_features == 8
    np.testing.assert_array_equal(np.asarray(model(x)), before)
    # Without that group the rest shrinks in place and exactly.
    ok = [g for g in gs if all(m.path[0] != "fc3" for m in g.members)]
    masks = structure.select(ok, jp.criteria.magnitude(state), 0.5)
    want = np.asarray(apply_fn(jp.apply_masks(state, masks), x))
    structure.shrink_module(model, masks, x)
    assert model.fc1.out_features == 4 and model.fc2.in_features == 4
    np.testing.assert_allclose(np.asarray(model(x)), want, rtol=1e-5, atol=1e-5)


def test_masks_zeroing_output_units_are_kept_with_a_warning():
    def mlp(p, x):
        return jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    k1, k2 = jax.random.split(jax.random.key(0))
    p = {"w1": jax.random.normal(k1, (3, 4)), "b1": jnp.ones(4)}
    p |= {"w2": jax.random.normal(k2, (4, 5)), "b2": jnp.arange(5.0)}
    x = jnp.ones((2, 3))
    masks = jax.tree.map(lambda a: jnp.ones(a.shape, bool), p)
    masks["w2"] = masks["w2"].at[:, 1].set(False).at[:, 3].set(False)
    with pytest.warns(UserWarning, match=r"every weight of 2 of 5 output units \(w2\)"):
        small = structure.shrink(mlp, p, masks, x)
    assert small["w2"].shape == (4, 5)  # the output's width is the model's
    out, bias = np.asarray(mlp(small, x)), np.asarray(p["b2"])
    np.testing.assert_allclose(out[:, [1, 3]], np.broadcast_to(bias[[1, 3]], (2, 2)))
    # A hidden unit zeroed instead is cut, without a warning (warnings are errors here).
    masks = jax.tree.map(lambda a: jnp.ones(a.shape, bool), p)
    masks["w1"] = masks["w1"].at[:, 2].set(False)
    assert structure.shrink(mlp, p, masks, x)["w1"].shape == (3, 3)


def _two_layer(rng):
    def dense(n_in, n_out):
        return {
            "kernel": jnp.asarray(rng.normal(size=(n_in, n_out)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=n_out), jnp.float32),
        }

    return {"l1": dense(8, 6), "l2": dense(6, 4)}


def _hidden(p, x):
    return jax.nn.relu(x @ p["l1"]["kernel"] + p["l1"]["bias"])


_FOLDS = {  # name: (function, whether the removed units' constants can fold into l2's bias)
    "minus_bias": (lambda p, x: _hidden(p, x) @ p["l2"]["kernel"] - p["l2"]["bias"], True),
    "reshaped_bias": (
        lambda p, x: _hidden(p, x) @ p["l2"]["kernel"] + p["l2"]["bias"].reshape(1, 4),
        True,
    ),
    "bias_minus": (lambda p, x: p["l2"]["bias"] - _hidden(p, x) @ p["l2"]["kernel"], False),
    "bias_used_twice": (
        lambda p, x: (_hidden(p, x) @ p["l2"]["kernel"] + p["l2"]["bias"]) * p["l2"]["bias"],
        False,
    ),
    "product_used_twice": (
        lambda p, x: (lambda y: (y + p["l2"]["bias"]) * jnp.tanh(y))(
            _hidden(p, x) @ p["l2"]["kernel"]
        ),
        False,
    ),
}


@pytest.mark.parametrize("name", sorted(_FOLDS))
def test_relu_constants_fold_only_into_a_bias_that_is_added_once(name):
    # Removing a hidden unit whose kernel column is pruned leaves relu(b_j)
    # flowing on; it folds into l2's bias when that bias is added (or
    # subtracted) right after the product and used nowhere else. Otherwise
    # the units whose constant is nonzero are kept, and the output is still exact.
    fn, folds = _FOLDS[name]
    params = _two_layer(np.random.default_rng(0))
    where = lambda path, leaf: path == ("l1", "kernel")  # noqa: E731
    masks = jp.masks.structured(jp.criteria.magnitude(params), 0.5, axes=-1, where=where)
    constants = np.maximum(np.asarray(params["l1"]["bias"]), 0.0)
    pruned = ~np.asarray(masks["l1"]["kernel"]).any(0)
    assert pruned.sum() == 3 and (constants[pruned] > 0).sum() == 2
    if folds:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            small = structure.shrink(fn, params, masks, jnp.ones((2, 8)))
    else:
        # Those kept are named, with the fix: group masks zero l1's bias too.
        with pytest.warns(
            UserWarning,
            match=r"shrink kept 2 channels that the masks leave with a constant output \(2 of 6 "
            r"channels of l1/kernel, l2/kernel\).*a bias \(it has none, e\.g\. use_bias=False;"
            r".*jp\.structure\.select",
        ):
            small = structure.shrink(fn, params, masks, jnp.ones((2, 8)))
        groups = structure.groups(fn, params, jnp.ones((2, 8)))
        whole = structure.select(groups, jp.criteria.magnitude(params), 0.5)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            cut = structure.shrink(fn, params, whole, jnp.ones((2, 8)))
        assert cut["l1"]["kernel"].shape == (8, 3)
    kept = 3 if folds else 6 - int((constants[pruned] == 0).sum())
    assert small["l1"]["kernel"].shape == (8, kept) and small["l2"]["kernel"].shape == (kept, 4)
    x = jax.random.normal(jax.random.key(3), (5, 8))
    np.testing.assert_allclose(
        fn(small, x), fn(jp.apply_masks(params, masks), x), rtol=1e-5, atol=1e-5
    )


def test_prune_layerwise_window_trains_the_reading_layers_bias_too():
    ks = jax.random.split(jax.random.key(0), 2)
    p = {
        "a": {"kernel": jax.random.normal(ks[0], (6, 8)), "bias": jnp.zeros(8)},
        "b": {"kernel": jax.random.normal(ks[1], (8, 2)), "bias": jnp.zeros(2)},
    }

    def fn(p, x):
        h = jax.nn.relu(x @ p["a"]["kernel"] + p["a"]["bias"])
        return h @ p["b"]["kernel"] + p["b"]["bias"]

    calls = []

    def finetune(params, masks, where):
        flat, _ = leaves_with_paths(params)
        calls.append(sorted("/".join(map(str, q)) for q, leaf in flat if where(q, leaf)))
        return params

    structure.prune_layerwise(
        fn, p, (jnp.ones((2, 6)),), sparsity=0.5, finetune=finetune, progress=False
    )
    # "b" (the classifier) is in no prunable group; its bias trains with its kernel.
    assert calls == [["a/bias", "a/kernel", "b/bias", "b/kernel"]]
