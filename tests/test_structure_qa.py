"""Regressions from a QA pass of jaxprune.structure: untraced params, linen training, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import jaxprune as jp
from jaxprune import structure

X6 = jax.random.normal(jax.random.key(1), (4, 6))


class _AuxHead(nnx.Module):
    """An auxiliary head used only when ``use_aux`` is set (e.g. only in training)."""

    def __init__(self, rngs):
        self.l1 = nnx.Linear(6, 16, rngs=rngs)
        self.head = nnx.Linear(16, 3, rngs=rngs)
        self.aux = nnx.Linear(16, 3, rngs=rngs)
        self.use_aux = False

    def __call__(self, x):
        h = nnx.relu(self.l1(x))
        out = self.head(h)
        return out + self.aux(h) if self.use_aux else out


def _touches(group, name):
    return any(m.path[0] == name for m in group.members)


def test_params_the_traced_call_never_reads_are_pinned_and_named():
    model = _AuxHead(nnx.Rngs(0))
    apply_fn, state = structure.module_apply(model)
    with pytest.warns(UserWarning, match=r"params aux/bias, aux/kernel are never used.*use_aux"):
        everything = structure.groups(apply_fn, state, X6)
    aux = [g for g in everything if _touches(g, "aux")]
    assert len(aux) == 3  # aux/bias[0], aux/kernel[0], aux/kernel[1]
    assert not any(g.prunable for g in aux)
    assert all("never used by the traced call" in g.reasons for g in aux)
    with pytest.warns(UserWarning, match="never used"):
        gs = structure.groups(apply_fn, state, X6, prunable_only=True)
    assert [sorted(f"{m.path[0]}/{m.path[1]}" for m in g.members) for g in gs] == [
        ["head/kernel", "l1/bias", "l1/kernel"]
    ]
    masks = structure.select(gs, jp.criteria.magnitude(state), 0.5)
    assert bool(jnp.all(masks["aux"]["kernel"])) and bool(jnp.all(masks["aux"]["bias"]))
    # Shrinking leaves the untraced layer whole (and says so again).
    with pytest.warns(UserWarning, match="never used"):
        structure.shrink_module(model, masks, X6)
    assert model.aux.kernel.shape == (16, 3) and model.l1.kernel.shape == (6, 8)


def test_tracing_the_branch_that_uses_a_layer_ties_it_to_its_producer():
    model = _AuxHead(nnx.Rngs(0))
    model.use_aux = True
    apply_fn, state = structure.module_apply(model)
    gs = structure.groups(apply_fn, state, X6, prunable_only=True)  # no warning
    assert len(gs) == 1 and _touches(gs[0], "aux") and _touches(gs[0], "l1")
    masks = structure.select(gs, jp.criteria.magnitude(state), 0.5)
    want = apply_fn(jp.apply_masks(state, masks), X6)
    structure.shrink_module(model, masks, X6)
    assert model.aux.kernel.shape == (8, 3) and model.l1.kernel.shape == (6, 8)
    np.testing.assert_allclose(np.asarray(model(X6)), np.asarray(want), rtol=1e-5, atol=1e-5)


class _UnusedNorm(nnx.Module):
    def __init__(self, rngs):
        self.c1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.gn = nnx.GroupNorm(8, num_groups=4, rngs=rngs)  # defined, never called
        self.fc = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.fc(nnx.relu(self.c1(x)).mean((1, 2)))


def test_an_unused_norm_layer_is_not_a_prunable_group():
    model = _UnusedNorm(nnx.Rngs(0))
    apply_fn, state = structure.module_apply(model)
    x = jax.random.normal(jax.random.key(2), (2, 5, 5, 3))
    with pytest.warns(UserWarning, match=r"params gn/bias, gn/scale are never used"):
        gs = structure.groups(apply_fn, state, x, prunable_only=True)
    assert len(gs) == 1 and not any(_touches(g, "gn") for g in gs)


class _CNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        for f in (8, 8):
            x = nn.Conv(f, (3, 3))(x)
            x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(16)(x))
        return nn.Dense(3)(x)


class _TrainState(train_state.TrainState):
    batch_stats: dict


def test_linen_batchnorm_trains_in_a_train_state_and_shrinks():
    net = _CNN()
    x = jax.random.normal(jax.random.key(0), (8, 6, 6, 3))
    y = jnp.arange(8) % 3
    variables = net.init(jax.random.key(1), x, train=False)
    # BatchNorm needs batch_stats, so the groups come from the full variables
    # (members "params/Conv_0/kernel", ...), while jp.prune sees only the params.
    apply_fn = structure.linen_apply(net, train=False)
    gs = structure.groups(apply_fn, variables, x[:2], prunable_only=True)
    assert sorted(g.channels for g in gs) == [8, 8, 16]
    tx = jp.prune(optax.adam(1e-2), sparsity=0.5, scope=structure.selection(gs))
    ts = _TrainState.create(
        apply_fn=net.apply, params=variables["params"], batch_stats=variables["batch_stats"], tx=tx
    )

    @jax.jit
    def step(ts, x, y):
        def loss(p):
            v = {"params": p, "batch_stats": ts.batch_stats}
            out, upd = ts.apply_fn(v, x, train=True, mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(out, y).mean(), upd

        (_, upd), grads = jax.value_and_grad(loss, has_aux=True)(ts.params)
        return ts.apply_gradients(grads=grads).replace(batch_stats=upd["batch_stats"])

    for _ in range(3):
        ts = step(ts, x, y)
    masks = jp.get_masks(ts.opt_state)
    assert int(jnp.sum(jnp.any(masks["Conv_0"]["kernel"], axis=(0, 1, 2)))) == 4
    assert int(jnp.sum(jnp.any(masks["Dense_0"]["kernel"], axis=0))) == 8
    trained = {"params": ts.params, "batch_stats": ts.batch_stats}
    small, small_apply = structure.shrink_linen(net, trained, masks, x[:2], train=False)
    new = structure.widths(trained, small)
    assert new["params/Conv_1/kernel"][1] == (3, 3, 4, 4)
    assert new["batch_stats/BatchNorm_1/mean"][1] == (4,)
    assert new["params/Dense_0/kernel"][1] == (144, 8)
    want = net.apply(trained, x, train=False)  # jp.prune keeps the params masked
    np.testing.assert_allclose(
        np.asarray(small_apply(small, x)), np.asarray(want), rtol=1e-5, atol=1e-5
    )


def test_linen_params_scores_match_groups_found_on_the_variables():
    net = _CNN()
    x = jax.random.normal(jax.random.key(3), (2, 6, 6, 3))
    variables = net.init(jax.random.key(4), x, train=False)
    gs = structure.groups(structure.linen_apply(net, train=False), variables, x)
    full = structure.select(gs, jp.criteria.magnitude(variables), 0.5)
    part = structure.select(gs, jp.criteria.magnitude(variables["params"]), 0.5)
    for a, b in zip(jax.tree.leaves(full["params"]), jax.tree.leaves(part), strict=True):
        np.testing.assert_array_equal(np.broadcast_to(a, np.shape(b)), b)
    assert not bool(jnp.all(part["Conv_1"]["kernel"]))
    other = {"w": jnp.ones((3, 3))}
    with pytest.raises(ValueError, match=r"does not match the groups' tree.*for linen"):
        structure.select(gs, other, 0.5)


class _Scale(nnx.Module):
    """A custom per-channel layer whose width is an attribute used in the forward pass."""

    def __init__(self, n):
        self.n = n
        self.g = nnx.Param(jnp.full((n,), 2.0))

    def __call__(self, x):
        return x * self.g[...].reshape(1, 1, 1, self.n)


class _WithScale(nnx.Module):
    def __init__(self, rngs):
        self.c1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.s = _Scale(8)
        self.c2 = nnx.Conv(8, 4, (3, 3), rngs=rngs)

    def __call__(self, x):
        return self.c2(nnx.relu(self.s(self.c1(x)))).mean((1, 2))


def test_shrink_module_names_a_custom_width_attribute_without_pointing_at_itself():
    model = _WithScale(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(5), (2, 5, 5, 3))
    apply_fn, state = structure.module_apply(model)
    gs = structure.groups(apply_fn, state, x, prunable_only=True)
    masks = structure.select(gs, jp.criteria.magnitude(state), 0.5)
    with pytest.raises(ValueError, match=r"alone already breaks it: .*s/g\[0\].*self\.n") as info:
        structure.shrink_module(model, masks, x)
    assert "use structure.shrink_module" not in str(info.value)
    assert model.c1.kernel.shape == (3, 3, 3, 8) and model.s.g.shape == (8,)  # left as it was


class _LinenReshape(nn.Module):
    width: int = 8

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(self.width)(x))
        return nn.Dense(2)(h.reshape(h.shape[0], self.width, 1).sum(-1))


def test_shrink_linen_names_a_custom_width_attribute():
    module = _LinenReshape()
    params = module.init(jax.random.key(6), X6)["params"]
    gs = structure.groups(structure.linen_apply(module), params, X6, prunable_only=True)
    masks = structure.select(gs, jp.criteria.magnitude(params), 0.5)
    with pytest.raises(ValueError, match=r"custom module's width.*structure.widths") as info:
        structure.shrink_linen(module, params, masks, X6)
    assert "use structure.shrink_linen" not in str(info.value)


class _Dropout(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.relu(nn.Dense(8)(x))
        x = nn.relu(nn.Dense(8)(x))
        x = nn.Dropout(0.5, deterministic=not train)(x)
        return nn.Dense(2)(x)


def test_linen_dropout_in_train_mode_says_to_trace_the_eval_call():
    variables = _Dropout().init(jax.random.key(0), X6, train=False)
    with pytest.raises(ValueError, match=r"draws random numbers when called with train=True.*"):
        structure.groups(structure.linen_apply(_Dropout(), train=True), variables, X6)
    rngs = {"dropout": jax.random.key(1)}
    apply_fn = structure.linen_apply(_Dropout(), train=True, rngs=rngs)
    with pytest.warns(UserWarning, match=r"draws random numbers.*train=False"):
        gs = structure.groups(apply_fn, variables, X6, prunable_only=True)
    assert len(gs) == 1
    gs = structure.groups(structure.linen_apply(_Dropout(), train=False), variables, X6)
    assert sum(g.prunable for g in gs) == 2


def test_linen_batchnorm_in_train_mode_says_to_trace_the_eval_call():
    x = jnp.ones((2, 6, 6, 3))
    variables = _CNN().init(jax.random.key(0), x, train=False)
    with pytest.raises(ValueError, match=r"updates its variables when called with train=True.*"):
        structure.groups(structure.linen_apply(_CNN(), train=True), variables, x)
    with pytest.raises(ValueError, match=r"Fix: pass the eval-mode arguments.*train=False"):
        masks = jax.tree.map(lambda a: jnp.ones(jnp.shape(a), bool), variables)
        structure.shrink_linen(_CNN(), variables, masks, x, train=True)


def test_shrinking_without_example_inputs_says_to_pass_them():
    model = nnx.Sequential(
        nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(8, 2, rngs=nnx.Rngs(1))
    )
    apply_fn, state = structure.module_apply(model)
    masks = jax.tree.map(lambda a: jnp.ones(jnp.shape(a), bool), state)
    with pytest.raises(ValueError, match=r"example_inputs is empty.*Fix: pass a small batch"):
        jp.shrink(apply_fn, state, masks)
    with pytest.raises(ValueError, match="example_inputs is empty"):
        structure.shrink_module(model, masks)
    assert model.layers[0].kernel.shape == (4, 8)


def test_shrinking_refuses_batchnorm_in_train_mode():
    # model.eval() forgotten: a cut filter's constant output was folded with the
    # train-mode (batch-statistics) BatchNorm, off by 0.23 from the eval-mode model.
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.c0 = nnx.Conv(3, 8, (3, 3), padding="VALID", rngs=rngs)
            self.bn0 = nnx.BatchNorm(8, rngs=rngs)
            self.d = nnx.Linear(8, 4, rngs=rngs)

        def __call__(self, x):
            return self.d(nnx.relu(self.bn0(self.c0(x))).mean((1, 2)))

    def make():
        m = Net(nnx.Rngs(0))
        m.c0.bias.set_value(jnp.linspace(0.5, 1.5, 8))
        m.bn0.mean.set_value(jnp.linspace(-1.0, 1.0, 8))
        return m

    x = jax.random.normal(jax.random.key(1), (2, 6, 6, 3))
    model = make()
    params = nnx.state(model, nnx.Param)
    masks = jp.masks.structured(jp.criteria.magnitude(params), 0.5, axes=-1)
    apply_fn, state = structure.module_apply(model)
    assert structure.groups(apply_fn, state, x)  # the analysis works in either mode
    with pytest.raises(ValueError, match=r"BatchNorm layers \['bn0'\] are in train mode"):
        structure.shrink_module(model, masks, x)
    with pytest.raises(ValueError, match="call model.eval()"):
        jp.shrink(apply_fn, state, structure.full_masks(state, masks), x)
    assert model.c0.kernel.shape == (3, 3, 3, 8)  # left as it was
    model.eval()
    ref_fn, ref_state = structure.module_apply(model)
    want = ref_fn(jp.apply_masks(ref_state, structure.full_masks(ref_state, masks)), x)
    with pytest.warns(UserWarning, match="output units"):  # the masks zero some of the head's units
        structure.shrink_module(model, masks, x)
    assert model.c0.kernel.shape == (3, 3, 3, 4)
    np.testing.assert_allclose(model(x), want, atol=1e-5)


def test_select_rounds_a_python_sparsity_as_python_and_layerwise_takes_array_scalars():
    k = jax.random.split(jax.random.key(0), 2)

    def mlp(p, x):
        return jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"]

    p = {
        "w1": jax.random.normal(k[0], (3, 5)),
        "b1": jnp.zeros(5),
        "w2": jax.random.normal(k[1], (5, 2)),
    }
    x = jnp.ones((1, 3))
    gs = structure.groups(mlp, p, x, prunable_only=True)
    sc = jp.criteria.magnitude(p)
    for sp, want in ((0.7, 4), (0.1, 0)):  # round(sp * 5); a float32 sp gave 3 and 1
        for kw in ({}, {"scope": "global"}):
            assert int((~structure.select(gs, sc, sp, **kw)["b1"]).sum()) == want
    with pytest.raises(ValueError, match="reduce must be one of"):
        structure.selection(gs, reduce="l3")  # at build time, not at the first refresh
    small, masks = structure.prune_layerwise(mlp, p, (x,), sparsity=np.float32(0.4), progress=False)
    assert int((~masks["b1"]).sum()) == 2
