"""QA round 8 (structure): static flags as example inputs, params-only BatchNorm, culprit wording.

- A positional static flag in ``example_inputs`` (``groups(linen_apply(m), v, x,
  False)``) is named with its position and the keyword fix before tracing; a
  Python number that breaks the trace is named too; ``None`` and numbers the
  model only computes with still pass.
- ``variables["params"]`` alone of a BatchNorm model: a ValueError naming the
  missing collection and the fix, not flax's raw ``ScopeCollectionNotFound``.
- A failed ``jp.shrink`` names its culprits as "one group (named by its N
  members)" out of the groups cut, so one group's members do not read as
  several groups; grouped/depthwise convs in them are named.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import jaxprune as jp
from jaxprune import structure

X = jax.random.normal(jax.random.key(1), (2, 5, 5, 3))


class _FlagCNN(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(4, (3, 3))(x)))
        return nn.Dense(2)(x.reshape(x.shape[0], -1))


@pytest.fixture(scope="module")
def flag_cnn():
    module = _FlagCNN()
    return module, module.init(jax.random.key(0), X, False)


def test_a_positional_flag_is_named_with_the_keyword_fix(flag_cnn):
    # Before: traced as an array; "fails with example inputs of shapes [(2, 5, 5, 3),
    # ()] (TracerBoolConversionError ...) Fix: pass a small batch ...".
    module, v = flag_cnn
    x = X
    with pytest.raises(ValueError, match=r"example_inputs\[1\] is the Python bool False") as e:
        structure.groups(structure.linen_apply(module), v, x, False)
    assert "structure.linen_apply(module, train=False)" in str(e.value)
    assert "small batch of what the model takes" not in str(e.value)
    masks = jp.masks.structured(jp.criteria.magnitude(v["params"]), 0.5)
    with pytest.raises(ValueError, match=r"example_inputs\[1\] is the Python bool False"):
        structure.shrink_linen(module, v, masks, x, False)
    # The fix the message gives works.
    gs = structure.groups(structure.linen_apply(module, train=False), v, x, prunable_only=True)
    assert [g.channels for g in gs] == [4]


def _dense(p, x, *rest):
    return jnp.tanh(x @ p["w"])


W = {"w": jnp.ones((3, 2))}


def test_a_string_inside_an_input_is_named_by_its_path():
    # Before: "fails with example inputs of shapes ..." (str is not a valid JAX type).
    with pytest.raises(ValueError, match=r"example_inputs\[1\]\['mode'\] is the Python str"):
        structure.groups(_dense, W, jnp.ones((2, 3)), {"mode": "eval"})


def test_a_number_that_breaks_the_trace_is_named_and_others_still_work():
    def reshaped(p, x, n):
        return jnp.tanh(x @ p["w"]).reshape(n, -1)  # n used as a static shape

    # Before: "pass a small batch of what the model takes", the batch being fine.
    with pytest.raises(ValueError, match=r"example_inputs\[1\] is the Python int 2") as e:
        structure.groups(reshaped, W, jnp.ones((2, 3)), 2)
    assert "name=2" in str(e.value)
    # A number the model computes with, and None (an empty pytree), still trace.
    scaled = structure.groups(lambda p, x, s: _dense(p, x) * s, W, jnp.ones((2, 3)), 2.0)
    none = structure.groups(_dense, W, jnp.ones((2, 3)), None)
    assert [g.channels for g in scaled] == [g.channels for g in none] == [3, 2]


class _BN(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(4, (3, 3))(x)))
        return nn.Dense(2)(x.reshape(x.shape[0], -1))


def test_params_alone_of_a_batchnorm_model_name_the_missing_collection():
    # Before: flax.errors.ScopeCollectionNotFound (not a ValueError), no fix.
    module, x = _BN(), X
    v = module.init(jax.random.key(0), x)
    apply_fn = structure.linen_apply(module, train=False)
    fix = r"reads the 'batch_stats' collection.*Fix: pass the full variables"
    with pytest.raises(ValueError, match=fix) as e:
        apply_fn(v["params"], x)
    assert "'params' collection alone" in str(e.value)
    assert "masks may stay over variables['params']" in str(e.value)
    with pytest.raises(ValueError, match=fix):
        structure.groups(apply_fn, v["params"], x)
    masks = jp.masks.structured(jp.criteria.magnitude(v["params"]), 0.5)
    with pytest.raises(ValueError, match=fix):
        structure.shrink_linen(module, v["params"], masks, x, train=False)
    # The fix: the full variables, masks over params.
    # The masks zero some of the classifier's units, which shrink says.
    with pytest.warns(UserWarning, match="output units"):
        small, _ = structure.shrink_linen(module, v, masks, x, train=False)
    assert small["params"]["Conv_0"]["kernel"].shape == (3, 3, 3, 2)


class _DwNet(nnx.Module):
    """conv -> depthwise conv -> 1x1 conv (-> depthwise conv) -> Dense -> Dense."""

    def __init__(self, rngs, second_dw=False):
        self.c1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.dw = nnx.Conv(8, 8, (3, 3), feature_group_count=8, rngs=rngs)
        self.pw = nnx.Conv(8, 8, (1, 1), rngs=rngs)
        self.dw2 = nnx.Conv(8, 8, (3, 3), feature_group_count=8, rngs=rngs) if second_dw else None
        self.fc1 = nnx.Linear(8, 6, rngs=rngs)
        self.fc2 = nnx.Linear(6, 4, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.dw(nnx.relu(self.c1(x))))
        h = nnx.relu(self.pw(h))
        if self.dw2 is not None:
            h = nnx.relu(self.dw2(h))
        return self.fc2(nnx.relu(self.fc1(h.mean((1, 2)))))


def _merged(model):
    graphdef, state = nnx.split(model)
    return (lambda s, x: nnx.merge(graphdef, s)(x)), state


def test_a_depthwise_culprit_reads_as_one_group_of_those_cut():
    # Before: "Cutting one group alone already breaks it: c1/kernel[3], dw/kernel[3],
    # pw/kernel[2], c1/bias[0] (+1 more)", read as four groups each breaking it
    # alone, while of the 3 groups cut only the depthwise one does.
    apply_fn, state = _merged(_DwNet(nnx.Rngs(0)))
    masks = jp.masks.structured(jp.criteria.magnitude(state), 0.5, axes=-1)
    fails = pytest.raises(ValueError, match="already breaks it")
    with fails as e, pytest.warns(UserWarning, match="output units"):
        jp.shrink(apply_fn, state, masks, X)
    msg = str(e.value)
    assert (
        "Of the 3 groups the masks cut, one group (named by its 5 members, leaf[axis]) cut "
        "alone already breaks it: c1/kernel[3], dw/kernel[3], pw/kernel[2], c1/bias[0] "
        "(+1 more). It holds the depthwise conv with kernel dw/kernel (feature_group_count=8)"
    ) in msg, msg


def test_several_culprits_are_numbered_as_groups():
    apply_fn, state = _merged(_DwNet(nnx.Rngs(0), second_dw=True))
    gs = structure.groups(apply_fn, state, X, prunable_only=True)
    dw = [g for g in gs if any(m.path[0] in ("dw", "dw2") for m in g.members)]
    masks = structure.select(dw, jp.criteria.magnitude(state), 0.5)
    with pytest.raises(ValueError, match="each when cut alone") as e:
        jp.shrink(apply_fn, state, masks, X)
    msg = str(e.value)
    assert "Of the 2 groups the masks cut, both break it, each when cut alone" in msg, msg
    assert "(1) c1/kernel[3], dw/kernel[3], pw/kernel[2], c1/bias[0] (+1 more); (2) " in msg
    assert "(2) dw2/kernel[3], fc1/kernel[0], pw/kernel[3], dw2/bias[0] (+1 more)." in msg
    assert "They hold the depthwise conv with kernel dw/kernel" in msg
