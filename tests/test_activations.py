"""Activation capture (nnx and linen), Wanda norms, mean |a| and APoZ scores."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxprune as jp
import jaxprune.activations  # noqa: F401  (until jaxprune/__init__ exports it)
from jaxprune.models import MLP


def test_capture_nnx_records_inputs_and_outputs_and_restores_the_class():
    model = MLP((4, 3, 2), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (6, 4))
    y, caps = jp.activations.capture_nnx(model, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(model(x)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(caps["layers/0"].inputs), np.asarray(x))
    h = jax.nn.relu(caps["layers/0"].outputs)
    np.testing.assert_allclose(np.asarray(caps["layers/1"].inputs), np.asarray(h), rtol=1e-6)
    assert "__call__" not in nnx.Linear.__dict__ or nnx.Linear.__call__.__name__ == "__call__"
    _, caps2 = nnx.jit(lambda m, x: jp.activations.capture_nnx(m, x))(model, x)
    np.testing.assert_allclose(np.asarray(caps2["layers/1"].outputs), np.asarray(y), rtol=1e-5)


def test_capture_linen_and_wanda_end_to_end():
    m = nn.Sequential([nn.Dense(3), nn.relu, nn.Dense(2)])
    x = jax.random.normal(jax.random.key(1), (7, 4))
    v = m.init(jax.random.key(0), x)
    _, caps = jp.activations.capture_linen(m, v, x)
    norms = jp.activations.input_norms(v["params"], [caps, caps])  # two batches
    want = np.sqrt(2) * np.linalg.norm(np.asarray(x), axis=0)
    np.testing.assert_allclose(np.asarray(norms["layers_0"]["kernel"]), want, rtol=1e-5)
    s = jp.criteria.wanda(v["params"], norms)
    k = np.asarray(v["params"]["layers_0"]["kernel"])
    np.testing.assert_allclose(
        np.asarray(s["layers_0"]["kernel"]), np.abs(k) * want[:, None], rtol=1e-5
    )


def test_mean_abs_apoz_and_unit_scores():
    z = jnp.array([[1.0, -1.0, 2.0], [3.0, -2.0, -2.0]])
    caps = {"fc": jp.activations.Captured(None, z)}
    assert np.asarray(jp.activations.mean_abs(caps)["fc"]).tolist() == [2.0, 0.0, 1.0]
    assert np.asarray(jp.activations.apoz(caps)["fc"]).tolist() == [1.0, 0.0, 0.5]
    params = {
        "fc": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)},
        "other": {"kernel": jnp.ones((3, 3))},
    }
    s = jp.activations.unit_scores(params, jp.activations.mean_abs(caps))
    assert np.asarray(s["fc"]["kernel"]).tolist() == [[2.0, 0.0, 1.0]] * 2
    assert np.all(np.isinf(np.asarray(s["other"]["kernel"])))
    masks = jp.masks.topk(s, 1 / 3)  # the dead unit's column goes first
    assert np.asarray(masks["fc"]["kernel"]).tolist() == [[True, False, True]] * 2


def test_capture_restores_the_class_after_an_error():
    model = MLP((4, 3), rngs=nnx.Rngs(0))
    before = nnx.Linear.__dict__.get("__call__")
    with pytest.raises(TypeError):
        jp.activations.capture_nnx(model, jnp.ones((2, 5)), bad_kwarg=1)
    assert nnx.Linear.__dict__.get("__call__") is before


def test_activation_and_taylor_scores_drive_the_structured_selection():
    model = MLP((4, 6, 2), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (32, 4))
    _, caps = jp.activations.capture_nnx(model, x)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    per_unit = jp.activations.mean_abs(caps)
    s = jp.activations.unit_scores(params, per_unit)
    m = jp.masks.structured(
        s, 0.5, axes=-1, reduce="mean", where=lambda p, x: p[:2] == ("layers", 0) and x.ndim == 2
    )
    kept = np.asarray(m["layers"][0]["kernel"]).all(axis=0)
    order = np.argsort(np.asarray(per_unit["layers/0"]))
    assert kept.sum() == 3 and not kept[order[:3]].any()
    g = jax.grad(lambda p: jnp.mean(nnx.merge(*nnx.split(model))(x) ** 2))(model)
    grads = nnx.to_pure_dict(nnx.state(g, nnx.Param))
    t = jp.criteria.taylor(params, grads)
    mt = jp.masks.structured(t, 0.5, axes=-1, reduce="mean")
    cols = np.asarray(mt["layers"][0]["kernel"])
    assert np.all(cols.all(axis=0) | (~cols).all(axis=0))  # whole units kept or dropped
    assert cols.all(axis=0).sum() == 3


def test_activation_criterion_inside_prune_gets_the_captures_by_name():
    model = MLP((4, 6, 2), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (16, 4))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))

    def criterion(params, captures):
        return jp.activations.unit_scores(params, jp.activations.apoz(captures))

    tx = jp.prune(optax.sgd(0.0), sparsity=0.5, criterion=criterion)
    _, caps = jp.activations.capture_nnx(model, x)
    grads = jax.tree.map(jnp.zeros_like, params)
    _, state = jax.jit(tx.update)(grads, tx.init(params), params, captures=caps)
    m = np.asarray(jp.get_masks(state)["layers"][0]["kernel"])
    alive = np.asarray(jp.activations.apoz(caps)["layers/0"])
    assert (~m).sum() == 12 and alive[~m.all(axis=0)].max() <= alive[m.all(axis=0)].min()


class _DoubledLinear(nnx.Linear):
    def __call__(self, x):
        return super().__call__(x) * 2.0


class _SubclassNet(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(4, 4, rngs=rngs)
        self.b = _DoubledLinear(4, 3, rngs=rngs)

    def __call__(self, x):
        return self.b(self.a(inputs=x))  # a keyword input, as flax names it


def test_capture_nnx_records_a_subclass_call_once_and_keyword_inputs():
    model = _SubclassNet(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (5, 4))
    y, caps = jp.activations.capture_nnx(model, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(model(x)), rtol=1e-6)
    # One record per call: batch 5, not 10 (the subclass's and the parent's call).
    assert caps["a"].inputs.shape == (5, 4) and caps["a"].outputs.shape == (5, 4)
    assert caps["b"].inputs.shape == (5, 4) and caps["b"].outputs.shape == (5, 3)
    np.testing.assert_allclose(np.asarray(caps["a"].inputs), np.asarray(x))
    # The outermost call's output: after the subclass's own doubling.
    np.testing.assert_allclose(np.asarray(caps["b"].outputs), np.asarray(y), rtol=1e-6)
    assert "__call__" not in nnx.Linear.__dict__ or nnx.Linear.__call__.__name__ == "__call__"
    assert _DoubledLinear.__call__.__qualname__ == "_DoubledLinear.__call__"
    _, jcaps = nnx.jit(lambda m, x: jp.activations.capture_nnx(m, x))(model, x)
    assert jcaps["b"].inputs.shape == (5, 4)


class _Block(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(8, 8, rngs=rngs)

    def __call__(self, x):
        return jax.nn.relu(self.lin(x))


class _ScannedNet(nnx.Module):
    """An input layer, three blocks under nnx.scan, an output layer."""

    def __init__(self, rngs):
        self.inp = nnx.Linear(4, 8, rngs=rngs)

        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return _Block(rngs)

        self.blocks = make(rngs)
        self.out = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, block):
            return block(x)

        return self.out(body(self.inp(x), self.blocks))


def test_capture_nnx_warns_about_scanned_layers_it_cannot_record():
    model = _ScannedNet(nnx.Rngs(0))
    x = jnp.ones((5, 4))
    with pytest.warns(UserWarning, match=r"copies of the model's modules.*\['blocks/lin'\]"):
        y, caps = jp.activations.capture_nnx(model, x)
    # The layers outside the scan are recorded as usual, the output unchanged.
    assert sorted(caps) == ["inp", "out"]
    np.testing.assert_allclose(np.asarray(y), np.asarray(model(x)), rtol=1e-6)
    assert "__call__" not in nnx.Linear.__dict__ or nnx.Linear.__call__.__name__ == "__call__"


def test_input_norms_refuses_captures_that_match_no_kernel():
    m = nn.Sequential([nn.Dense(3), nn.relu, nn.Dense(2)])
    x = jax.random.normal(jax.random.key(1), (7, 4))
    v = m.init(jax.random.key(0), x)
    _, caps = jp.activations.capture_linen(m, v, x)
    with pytest.raises(
        ValueError, match=r'no captured module owns a kernel.*variables\["params"\]'
    ):
        jp.activations.input_norms(v, caps)  # the full variables, not v["params"]
    with pytest.raises(ValueError, match="no captured module owns a kernel"):
        jp.activations.input_norms(v["params"], {})
    with pytest.raises(ValueError, match=r"captures=\[\].*Fix"):
        jp.activations.input_norms(v["params"], [])


def test_input_norms_refuses_a_module_missing_from_some_batches():
    model = MLP((4, 3, 2), rngs=nnx.Rngs(0))
    _, caps = jp.activations.capture_nnx(model, jnp.ones((2, 4)))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    part = {k: c for k, c in caps.items() if k != "layers/1"}
    with pytest.raises(
        ValueError, match=r"'layers/1' is captured in some batches but not in batches \[0\]"
    ):
        jp.activations.input_norms(params, [part, caps])  # was silently 1.0
    with pytest.raises(
        ValueError, match=r"'layers/1' is captured in some batches but not in batches \[1\]"
    ):
        jp.activations.input_norms(params, [caps, part])  # was a raw KeyError
    # A module captured in no batch keeps the documented 1.0, with a warning naming it.
    with pytest.warns(UserWarning, match=r"modules \['layers/1'\] have no capture"):
        n = jp.activations.input_norms(params, [part, part])
    assert np.asarray(n["layers"][1]["kernel"]).tolist() == 1.0


def test_capture_nnx_keyword_input_of_a_subclass_without_its_own_call():
    class Plain(nnx.Linear):
        pass

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(4, 4, rngs=rngs)
            self.p = Plain(4, 3, rngs=rngs)

        def __call__(self, x):
            return self.p(inputs=self.a(x), out_sharding=None)

    model = Net(nnx.Rngs(0))
    x = jnp.ones((5, 4))
    y, caps = jp.activations.capture_nnx(model, x)
    assert caps["p"].inputs.shape == (5, 4)
    np.testing.assert_allclose(np.asarray(caps["p"].outputs), np.asarray(y), rtol=1e-6)
    assert "__call__" not in Plain.__dict__


@pytest.mark.parametrize("groups, cout", [(4, 4), (4, 8), (2, 6)], ids=["dw", "dw-x2", "g2"])
def test_grouped_conv_norms_give_each_output_its_groups_channels(groups, cout):
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.c = nnx.Conv(4, cout, (3, 3), feature_group_count=groups, rngs=rngs)

        def __call__(self, x):
            return self.c(x)

    model = Net(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 5, 5, 4)) * jnp.array([1.0, 2.0, 3.0, 4.0])
    _, caps = jp.activations.capture_nnx(model, x)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    norms = jp.activations.input_norms(params, caps)["c"]["kernel"]
    per_channel = np.sqrt((np.asarray(x) ** 2).reshape(-1, 4).sum(0))
    in_g, per_out = 4 // groups, cout // groups
    want = np.stack(
        [per_channel[(o // per_out) * in_g : (o // per_out + 1) * in_g] for o in range(cout)], 1
    )
    np.testing.assert_allclose(np.asarray(norms), want, rtol=1e-5)
    kernel = params["c"]["kernel"]
    scores = jp.criteria.wanda(params, jp.activations.input_norms(params, caps))["c"]["kernel"]
    assert scores.shape == kernel.shape
    np.testing.assert_allclose(np.asarray(scores), np.abs(kernel) * want, rtol=1e-5)


def test_wanda_refuses_norms_that_would_widen_the_kernel():
    params = {"c": {"kernel": jnp.ones((3, 3, 1, 4))}}
    with pytest.raises(ValueError, match=r"input_norms of 'c/kernel' has shape \(4,\).*Fix"):
        jp.criteria.wanda(params, {"c": {"kernel": jnp.ones(4)}})


def test_a_layer_called_twice_on_one_unbatched_example_keeps_its_units():
    class Twice(nnx.Module):
        def __init__(self, rngs):
            self.l = nnx.Linear(4, 4, rngs=rngs)

        def __call__(self, x):
            return self.l(jax.nn.relu(self.l(x)))

    _, caps = jp.activations.capture_nnx(Twice(nnx.Rngs(0)), jnp.arange(4.0))
    assert caps["l"].inputs.shape == (2, 4)  # two tokens of 4 features, not 8 features
    assert jp.activations.apoz(caps)["l"].shape == (4,)


def test_general_linear_scores_keep_heads_apart():
    class Query(nnx.Module):
        def __init__(self, rngs):
            self.q = nnx.LinearGeneral(4, (2, 3), rngs=rngs)

        def __call__(self, x):
            return self.q(x)

    model = Query(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (5, 7, 4))
    _, caps = jp.activations.capture_nnx(model, x, types=(nnx.Linear, nnx.LinearGeneral))
    z = np.maximum(np.asarray(model.q(x)), 0.0).reshape(-1, 2, 3)
    scores = jp.activations.mean_abs(caps)["q"]
    np.testing.assert_allclose(np.asarray(scores), np.abs(z).mean(0), rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(jp.activations.apoz(caps)["q"]), (z != 0).mean(0), rtol=1e-6
    )
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    per_entry = jp.activations.unit_scores(params, {"q": scores})["q"]["kernel"]
    np.testing.assert_allclose(np.asarray(per_entry), np.broadcast_to(scores, (4, 2, 3)))
    with pytest.raises(ValueError, match=r"per_unit\['q'\] has shape \(2,\).*output axes"):
        jp.activations.unit_scores(params, {"q": scores[:, 0]})


def test_capture_linen_refuses_a_scanned_module_under_jit_too():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, c, _):
            return nn.relu(nn.Dense(4)(c)), None

    class Scanned(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(4)(x)
            stack = nn.scan(
                Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3
            )
            x, _ = stack()(x, None)
            return nn.Dense(2)(x)

    model, x = Scanned(), jnp.ones((2, 3))
    variables = model.init(jax.random.key(0), x)
    for run in (
        lambda: jp.activations.capture_linen(model, variables, x),
        lambda: jax.jit(lambda v, x: jp.activations.capture_linen(model, v, x))(variables, x),
    ):
        with pytest.raises(ValueError, match=r"ScanBlock_0/Dense_0 run inside a lifted transform"):
            run()
    # A plain model under jit is still captured.
    plain = nn.Sequential([nn.Dense(3), nn.relu, nn.Dense(2)])
    v = plain.init(jax.random.key(0), x)
    _, caps = jax.jit(lambda v, x: jp.activations.capture_linen(plain, v, x))(v, x)
    assert sorted(caps) == ["layers_0", "layers_2"] and caps["layers_2"].inputs.shape == (2, 3)


def test_wrong_capture_function_and_activation_are_named():
    plain = nn.Sequential([nn.Dense(3), nn.relu, nn.Dense(2)])
    with pytest.raises(ValueError, match=r"capture_nnx takes a flax nnx model.*capture_linen"):
        jp.activations.capture_nnx(plain, jnp.ones((2, 3)))
    model = MLP((4, 3, 2), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"capture_linen takes a flax linen module.*capture_nnx"):
        jp.activations.capture_linen(model, {}, jnp.ones((2, 4)))
    _, caps = jp.activations.capture_nnx(model, jnp.ones((2, 4)))
    for score in (jp.activations.apoz, jp.activations.mean_abs):
        with pytest.raises(ValueError, match=r"activation must be a function.*got None. Fix"):
            score(caps, activation=None)
