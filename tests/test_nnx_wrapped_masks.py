"""Masks of a Variable-wrapped ``nnx.State`` have exactly its tree structure.

``nnx.state(model, nnx.Param)`` holds ``nnx.Param`` nodes around its arrays
(what ``nnx.Optimizer`` passes to ``tx.init``). The selections and
``apply_masks`` return their trees in the same Variables, so the masks mirror
the params (``jax.tree.map(f, params, masks)`` works), with the same masks as
the pure state gives.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxprune as jp


def _is_var(x):
    return isinstance(x, nnx.Variable)


class _Net(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(4, 8, kernel_size=(3, 3), rngs=rngs)
        self.fc = nnx.Linear(8, 16, rngs=rngs)


SELECTIONS = {
    "topk": functools.partial(jp.masks.topk, sparsity=0.5),
    "global_topk": functools.partial(jp.masks.global_topk, sparsity=0.5),
    "structured": functools.partial(jp.masks.structured, sparsity=0.5, axes=-1),
    "nm": functools.partial(jp.masks.nm, n=2, m=4),
    "blocks": functools.partial(jp.masks.blocks, sparsity=0.5, block=(1, 4)),
    "patterns": functools.partial(jp.masks.patterns, where=lambda p, x: x.ndim == 4),
    "erk": functools.partial(jp.distributions.selection(jp.distributions.erk), sparsity=0.5),
    "per_output": functools.partial(jp.distributions.per_output, sparsity=0.5),
}


@pytest.fixture(scope="module")
def states():
    wrapped = nnx.state(_Net(nnx.Rngs(0)), nnx.Param)
    pure = nnx.to_pure_dict(nnx.state(_Net(nnx.Rngs(0)), nnx.Param))
    return wrapped, pure


def _same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("name", sorted(SELECTIONS))
def test_selections_mirror_the_wrapped_state(states, name):
    wrapped, pure = states
    assert any(isinstance(x, nnx.Param) for x in jax.tree.leaves(wrapped, is_leaf=_is_var))
    masks = SELECTIONS[name](jp.criteria.magnitude(wrapped))
    assert jax.tree.structure(masks) == jax.tree.structure(wrapped)
    assert all(
        type(m) is type(p)
        for m, p in zip(
            jax.tree.leaves(masks, is_leaf=_is_var),
            jax.tree.leaves(wrapped, is_leaf=_is_var),
            strict=True,
        )
    )
    _same(masks, SELECTIONS[name](jp.criteria.magnitude(pure)))
    jax.tree.map(lambda p, m: p * m, wrapped, masks)  # the trees line up
    pruned = jp.apply_masks(wrapped, masks)
    assert jax.tree.structure(pruned) == jax.tree.structure(wrapped)
    _same(pruned, jp.apply_masks(pure, SELECTIONS[name](jp.criteria.magnitude(pure))))


def test_apply_masks_keeps_the_wrapped_structure_with_pure_masks(states):
    wrapped, _ = states
    arrays = jax.tree.map(lambda v: v.get_value(), wrapped, is_leaf=_is_var)  # pure nnx.State
    masks = jp.masks.topk(jp.criteria.magnitude(arrays), 0.75)
    assert jax.tree.structure(masks) == jax.tree.structure(arrays)
    out = jp.apply_masks(wrapped, masks)
    assert jax.tree.structure(out) == jax.tree.structure(wrapped)
    assert isinstance(out["fc"]["kernel"], nnx.Param)
    assert float(jp.sparsity(out)) == pytest.approx(0.75, abs=1e-3)
    model = _Net(nnx.Rngs(0))
    nnx.update(model, out)  # written back into the model as it is
    assert float(jp.sparsity(model)) == pytest.approx(0.75, abs=1e-3)


def test_selections_under_jit_return_the_wrapped_structure(states):
    wrapped, _ = states
    masks = jax.jit(lambda t: jp.masks.topk(jp.criteria.magnitude(t), 0.5))(wrapped)
    assert jax.tree.structure(masks) == jax.tree.structure(wrapped)
    assert masks["fc"]["kernel"].get_value().dtype == jnp.bool_


def test_criteria_and_group_selections_mirror_the_wrapped_state(states):
    wrapped, _ = states
    structure = jax.tree.structure(wrapped)
    assert jax.tree.structure(jp.criteria.random(wrapped, key=jax.random.key(0))) == structure
    assert jax.tree.structure(jp.criteria.saliency(wrapped, wrapped)) == structure
    model = _Net(nnx.Rngs(0))
    graphdef = nnx.graphdef(model)

    def apply_fn(p, x):
        net = nnx.merge(graphdef, p)
        return net.fc(jax.nn.relu(net.conv(x)).mean(axis=(1, 2)))

    groups = jp.structure.groups(apply_fn, wrapped, jnp.ones((2, 6, 6, 4)))
    scores = jp.criteria.magnitude(wrapped)
    for masks in (
        jp.structure.select(groups, scores, 0.5),
        jp.structure.selection(groups)(scores, 0.5),
    ):
        assert jax.tree.structure(masks) == structure
        assert int((~masks["conv"]["kernel"].get_value()).any(axis=(0, 1, 2)).sum()) == 4


@pytest.mark.parametrize(
    "distribution",
    [
        jp.distributions.uniform,
        jp.distributions.erk,
        functools.partial(jp.distributions.uniform, fixed={"fc/kernel": 0.25}),
        jp.distributions.explicit({}, default=0.5),
    ],
)
def test_distributions_mirror_the_wrapped_state(states, distribution):
    wrapped, pure = states
    per_leaf = distribution(wrapped, 0.5)
    assert jax.tree.structure(per_leaf) == jax.tree.structure(wrapped)
    assert isinstance(per_leaf["fc"]["kernel"], nnx.Param)
    _same(per_leaf, distribution(pure, 0.5))
    # Lines up with the params and the scores, e.g. to prune leaf by leaf by hand.
    counts = jax.tree.map(lambda p, s: round(s * p.size), wrapped, per_leaf)
    assert int(counts["fc"]["bias"].get_value()) == 0


def test_taylor_scores_mirror_the_wrapped_state(states):
    wrapped, pure = states
    scores = jp.criteria.taylor(wrapped, wrapped)
    assert jax.tree.structure(scores) == jax.tree.structure(wrapped)
    _same(scores, jp.criteria.taylor(pure, pure))


def test_wanda_takes_the_norms_of_the_pure_state_for_the_wrapped_one():
    from jaxprune.models import MLP

    model = MLP((4, 3, 2), rngs=nnx.Rngs(0))
    _, caps = jp.activations.capture_nnx(model, jax.random.normal(jax.random.key(0), (5, 4)))
    wrapped = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(wrapped)
    norms = jp.activations.input_norms(pure, caps)
    scores = jp.criteria.wanda(wrapped, norms)
    assert jax.tree.structure(scores) == jax.tree.structure(wrapped)
    _same(scores, jp.criteria.wanda(pure, norms))
    with pytest.raises(ValueError, match=r"only in params: layers/1/bias, layers/1/kernel"):
        jp.criteria.wanda(pure, {"layers": {0: norms["layers"][0]}})
