"""Regressions from a review of jaxprune.structure: folds, remat, norms, checks, misuse."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxprune as jp
from jaxprune import structure
from jaxprune._tree import leaves_with_paths


def _max_diff(a, b) -> float:
    return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


class _FCN(nnx.Module):
    """Fully convolutional (global mean pool), so it runs at any input size."""

    def __init__(self, rngs):
        self.c1 = nnx.Conv(3, 8, (3, 3), strides=2, padding="SAME", use_bias=False, rngs=rngs)
        self.b1 = nnx.BatchNorm(8, rngs=rngs)
        self.c2 = nnx.Conv(8, 8, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
        self.b2 = nnx.BatchNorm(8, rngs=rngs)
        self.fc = nnx.Linear(8, 4, rngs=rngs)
        self.b1.bias.value = jnp.linspace(0.5, 1.5, 8)  # trained BN shifts are nonzero
        self.b2.bias.value = jnp.linspace(-0.3, 0.3, 8)

    def __call__(self, x):
        h = nnx.relu(self.b1(self.c1(x)))
        h = nnx.relu(self.b2(self.c2(h)))
        return self.fc(h.mean((1, 2)))


X_SMALL = jax.random.normal(jax.random.key(0), (2, 2, 2, 3))  # 1x1 after c1: no border
X_LARGE = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))


def test_constants_are_not_folded_through_a_padded_conv_seen_at_1x1():
    model = _FCN(nnx.Rngs(0))
    model.eval()
    apply_fn, state = structure.module_apply(model)
    masks = jp.masks.structured(jp.criteria.magnitude(state), 0.5, axes=-1)  # kernels only
    with (
        pytest.warns(UserWarning, match="output units"),  # the head's kernel is masked too
        pytest.warns(UserWarning, match=r"shrink kept \d+ channels .* of c1/kernel"),
    ):
        small = jp.shrink(apply_fn, state, masks, X_SMALL)
    masked = jp.apply_masks(state, masks)
    assert _max_diff(apply_fn(small, X_LARGE), apply_fn(masked, X_LARGE)) < 1e-5
    new = structure.widths(state, small)
    # c1's constant channels feed the SAME conv c2: kept. c2's pruned filters give an
    # exact zero before b2, whose constant shift still folds into the Dense bias.
    assert "c1/kernel" not in new
    assert new["c2/kernel"][1] == (3, 3, 8, 4) and new["fc/kernel"][1] == (4, 4)


def test_a_constant_that_passed_a_padded_conv_is_not_folded_after_the_mean():
    # Every c1 filter pruned: c2 then sees only constants, and its output differs at
    # the borders, so its global mean depends on the input size.
    model = _FCN(nnx.Rngs(0))
    model.eval()
    apply_fn, state = structure.module_apply(model)
    masks = jax.tree.map(lambda x: jnp.ones(x.shape, bool), state)
    masks["c1"]["kernel"] = jnp.zeros(state["c1"]["kernel"].shape, bool)
    with pytest.warns(UserWarning, match=r"shrink kept \d+ channels .* constant output"):
        small = jp.shrink(apply_fn, state, masks, X_SMALL)
    masked = jp.apply_masks(state, masks)
    assert _max_diff(apply_fn(small, X_LARGE), apply_fn(masked, X_LARGE)) < 1e-5
    assert structure.widths(state, small) == {}


def test_constants_still_fold_through_a_valid_conv_and_a_dense():
    def net(p, x):
        h = jax.nn.relu(
            jax.lax.conv_general_dilated(x, p["k1"], (1, 1), "VALID", dimension_numbers=DN)
            + p["b1"]
        )
        h = jax.lax.conv_general_dilated(h, p["k2"], (1, 1), "VALID", dimension_numbers=DN)
        return (h + p["b2"]).mean((1, 2)) @ p["w"]

    DN = ("NHWC", "HWIO", "NHWC")
    ks = jax.random.split(jax.random.key(2), 3)
    p = {
        "k1": jax.random.normal(ks[0], (3, 3, 2, 6)),
        "b1": jnp.linspace(0.1, 1.0, 6),
        "k2": jax.random.normal(ks[1], (3, 3, 6, 4)),
        "b2": jnp.zeros(4),
        "w": jax.random.normal(ks[2], (4, 3)),
    }
    masks = jax.tree.map(lambda x: jnp.ones(x.shape, bool), p)
    masks["k1"] = masks["k1"].at[..., :3].set(False)  # relu(b1) is constant: folds into b2
    x = jax.random.normal(jax.random.key(3), (2, 5, 5, 2))
    small = jp.shrink(net, p, masks, x)
    assert small["k1"].shape == (3, 3, 2, 3) and small["k2"].shape == (3, 3, 3, 4)
    x_large = jax.random.normal(jax.random.key(4), (2, 9, 9, 2))
    assert _max_diff(net(small, x_large), net(jp.apply_masks(p, masks), x_large)) < 1e-4


def test_jax_checkpoint_is_inlined_like_the_plain_function():
    def plain(p, x):
        return jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"]

    def remat(p, x):
        layer = jax.checkpoint(lambda p, x: jax.nn.relu(x @ p["w1"] + p["b1"]))
        return layer(p, x) @ p["w2"]

    p = {"w1": jnp.ones((3, 4)), "b1": jnp.ones(4), "w2": jnp.ones((4, 2))}
    x = jnp.ones((1, 3))
    want = structure.groups(plain, p, x, prunable_only=True)
    assert len(want) == 1
    assert structure.groups(remat, p, x, prunable_only=True) == want


class _Remat(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(6, 12, rngs=rngs)
        self.o = nnx.Linear(12, 2, rngs=rngs)

    def __call__(self, x):
        return self.o(nnx.remat(lambda mdl, x: nnx.relu(mdl.a(x)))(self, x))


def test_shrink_module_checks_a_model_that_uses_nnx_transforms():
    model = _Remat(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (4, 6))
    apply_fn, state = structure.module_apply(model)
    gs = structure.groups(apply_fn, state, x, prunable_only=True)
    assert len(gs) == 1  # remat is seen through
    masks = structure.select(gs, jp.criteria.magnitude(state), 0.5)
    want = apply_fn(jp.apply_masks(state, masks), x)
    structure.shrink_module(model, masks, x)  # the check runs through nnx.remat
    assert model.a.kernel.shape == (6, 6)
    assert _max_diff(model(x), want) < 1e-5


class _GN(nnx.Module):
    def __init__(self, rngs, **kw):
        self.c1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.gn = nnx.GroupNorm(8, rngs=rngs, **kw)
        self.c2 = nnx.Conv(8, 4, (1, 1), rngs=rngs)
        self.fc = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.c2(nnx.relu(self.gn(self.c1(x)))))
        return self.fc(h.mean((1, 2)))


def test_nnx_groupnorm_with_one_channel_per_group_shrinks():
    model = _GN(nnx.Rngs(0), num_groups=8)
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
    apply_fn, state = structure.module_apply(model)
    gs = structure.groups(apply_fn, state, x, prunable_only=True)
    masks = structure.select(gs, jp.criteria.magnitude(state), 0.5)
    want = apply_fn(jp.apply_masks(state, masks), x)
    structure.shrink_module(model, masks, x)
    assert (model.gn.num_groups, model.gn.group_size) == (4, 1)
    assert _max_diff(model(x), want) < 1e-5


def test_linen_groupnorm_given_num_groups_equal_to_channels_shrinks():
    class LGN(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.relu(nn.GroupNorm(num_groups=8)(nn.Conv(8, (3, 3))(x)))
            return nn.Dense(3)(nn.relu(nn.Conv(4, (1, 1))(h)).mean((1, 2)))

    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
    module = LGN()
    variables = module.init(jax.random.key(1), x)
    apply_fn = structure.linen_apply(module)
    gs = structure.groups(apply_fn, variables, x, prunable_only=True)
    masks = structure.select(gs, jp.criteria.magnitude(variables), 0.5)
    small, fn = structure.shrink_linen(module, variables, masks, x)
    assert small["params"]["GroupNorm_0"]["scale"].shape == (4,)
    assert _max_diff(fn(small, x), apply_fn(jp.apply_masks(variables, masks), x)) < 1e-5


def test_einsum_and_conv_transpose_attributes_follow_the_shrunk_kernels():
    class M(nnx.Module):
        def __init__(self, rngs):
            self.e = nnx.Einsum("bi,io->bo", (6, 8), (8,), rngs=rngs)
            self.t = nnx.ConvTranspose(8, 6, (3, 3), strides=(2, 2), rngs=rngs)
            self.c = nnx.Conv(6, 4, (1, 1), rngs=rngs)

        def __call__(self, x):
            h = nnx.relu(self.e(x))[:, None, None, :]
            return self.c(nnx.relu(self.t(h))).mean((1, 2))

    model = M(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 6))
    apply_fn, state = structure.module_apply(model)
    gs = structure.groups(apply_fn, state, x, prunable_only=True)
    masks = structure.select(gs, jp.criteria.magnitude(state), 0.5)
    structure.shrink_module(model, masks, x)
    assert (model.e.kernel_shape, model.e.bias_shape) == ((6, 4), (4,))
    assert model.t.kernel_shape == model.t.kernel.shape == (3, 3, 4, 3)
    assert (model.t.in_features, model.t.out_features) == (4, 3)


class _MLP(nnx.Module):
    def __init__(self, rngs, dtype):
        bias = nnx.initializers.normal(1.0)
        kw = {"dtype": dtype, "param_dtype": dtype, "bias_init": bias, "rngs": rngs}
        self.a = nnx.Linear(32, 64, **kw)
        self.b = nnx.Linear(64, 64, **kw)
        self.o = nnx.Linear(64, 4, **kw)

    def __call__(self, x):
        return self.o(nnx.relu(self.b(nnx.relu(self.a(x)))))


def test_low_precision_models_pass_the_check(dtype=jnp.bfloat16):
    model = _MLP(nnx.Rngs(0), dtype)
    x = jax.random.normal(jax.random.key(1), (8, 32)).astype(dtype)
    apply_fn, state = structure.module_apply(model)
    masks = jp.masks.structured(jp.criteria.magnitude(state), 0.5, axes=-1)  # folds biases
    want = apply_fn(jp.apply_masks(state, masks), x)
    with pytest.warns(UserWarning, match="output units"):  # the output layer's kernel is masked too
        structure.shrink_module(model, masks, x)
    assert model.b.kernel.shape == (32, 32)
    assert _max_diff(model(x), want) <= 8 * float(jnp.finfo(dtype).eps) * 4


def test_select_matches_members_by_path_and_rejects_other_trees():
    model = jp.models.VGGSmall(rngs=nnx.Rngs(0), cfg=(8, "M"), image_size=4, hidden=8)
    model.eval()
    x = jnp.ones((2, 4, 4, 1))
    apply_fn, state = structure.module_apply(model)
    gs = structure.groups(apply_fn, state, x, prunable_only=True)
    # The nnx.Param part (what nnx.Optimizer hands jp.prune): BatchNorm
    # statistics get no mask and do not vote; the rest is as over the whole state.
    params_only = jp.criteria.magnitude(nnx.state(model, nnx.Param))
    part = structure.select(gs, params_only, 0.5)
    whole = structure.select(gs, jp.criteria.magnitude(state), 0.5)
    assert "mean" not in part["bns"][0]
    got = dict(leaves_with_paths(part)[0])
    ref = dict(leaves_with_paths(whole)[0])
    for path, m in got.items():
        np.testing.assert_array_equal(np.asarray(m), np.asarray(ref[path]))
    np.testing.assert_array_equal(
        np.asarray(structure.group_scores(gs, params_only)[0]),
        np.asarray(structure.group_scores(gs, jp.criteria.magnitude(state))[0]),
    )
    other = {"w": jnp.ones((3, 3)), "b": jnp.ones(3)}
    no_member = r"no member of the group over bns/0/bias.*\(2 leaves: b, w\)"
    with pytest.raises(ValueError, match=no_member):
        structure.select(gs, other, 0.5)
    with pytest.raises(ValueError, match="does not match the groups' tree"):
        structure.group_scores(gs, other)
    wrong_width = jax.tree.map(lambda s: s[..., :1] if s.ndim == 1 else s, dict(state))
    with pytest.raises(ValueError, match="channels its group expects"):
        structure.select(gs, wrong_width, 0.5)
    masks = structure.select(gs, jp.criteria.magnitude(state), 0.5)
    assert int(np.sum(~np.asarray(masks["bns"][0]["mean"]))) == 4


def test_a_model_in_train_mode_with_dropout_names_the_fix():
    class Drop(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(6, 8, rngs=rngs)
            self.d = nnx.Dropout(0.5, rngs=rngs)
            self.o = nnx.Linear(8, 2, rngs=rngs)

        def __call__(self, x):
            return self.o(self.d(nnx.relu(self.a(x))))

    model = Drop(nnx.Rngs(0))
    x = jnp.ones((2, 6))
    apply_fn, state = structure.module_apply(model)
    with pytest.raises(ValueError, match=r"model\.eval\(\)"):
        structure.groups(apply_fn, state, x)
    model.eval()
    apply_fn, state = structure.module_apply(model)
    assert len(structure.groups(apply_fn, state, x, prunable_only=True)) == 1
