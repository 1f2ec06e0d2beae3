"""The shared invariant suite on jp.prune in its core configurations."""

import jax
import pytest

import jaxprune as jp
from tests._invariants import check_transform


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize(
    "sparsity",
    [0.5, jp.schedules.polynomial(0.0, 0.8, begin_step=0, end_step=4, frequency=2)],
    ids=["constant", "polynomial"],
)
def test_prune_magnitude(scope, sparsity):
    check_transform(lambda inner: jp.prune(inner, sparsity=sparsity, scope=scope))


def test_prune_saliency_uses_grads():
    check_transform(lambda inner: jp.prune(inner, sparsity=0.5, criterion=jp.criteria.saliency))


def test_prune_random_with_state_key():
    check_transform(
        lambda inner: jp.prune(
            inner, sparsity=0.5, criterion=jp.criteria.random, key=jax.random.key(3)
        )
    )


def test_prune_random_with_update_key():
    check_transform(
        lambda inner: jp.prune(inner, sparsity=0.5, criterion=jp.criteria.random),
        extra_fn=lambda i: {"key": jax.random.key(i)},
    )
