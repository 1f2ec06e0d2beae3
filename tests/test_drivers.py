"""Drivers: the round structure of iterative pruning / lottery tickets, random masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune as jp
import jaxprune.drivers  # noqa: F401  (until jaxprune/__init__ exports it)


def _recording_train(log):
    def train(params, masks):
        log.append((jax.tree.map(np.asarray, params), jax.tree.map(np.asarray, masks)))
        # "Training" doubles the weights and keeps pruned entries at zero.
        return jp.apply_masks(jax.tree.map(lambda x: 2 * x + 1, params), masks)

    return train


def test_lottery_ticket_rewinds_to_theta_0_with_nested_masks():
    theta0 = {"w": jnp.arange(1.0, 17.0).reshape(4, 4), "b": jnp.zeros(4)}
    log = []
    rounds = jp.drivers.lottery_ticket(_recording_train(log), theta0, rounds=3, rate=0.5)
    assert [r.index for r in rounds] == [0, 1, 2, 3]
    assert [r.sparsity for r in rounds] == [0.0, 0.5, 0.75, 0.875]
    assert len(log) == 4
    for (start, _masks), r in zip(log[1:], rounds[1:], strict=False):
        m = np.asarray(r.masks["w"])
        # Each pruned round starts from theta_0 with the new mask applied.
        np.testing.assert_array_equal(start["w"], np.where(m, np.asarray(theta0["w"]), 0))
    for a, b in zip(rounds[1:], rounds[2:], strict=False):
        assert np.all(np.asarray(a.masks["w"]) >= np.asarray(b.masks["w"]))  # nested


def test_rewind_to_theta_k_and_continue_from_trained():
    theta0 = {"w": jnp.arange(1.0, 9.0).reshape(2, 4)}
    theta_k = {"w": -jnp.ones((2, 4))}
    log = []
    jp.drivers.lottery_ticket(_recording_train(log), theta0, rounds=1, rate=0.5, rewind_to=theta_k)
    assert set(np.unique(log[1][0]["w"]).tolist()) == {-1.0, 0.0}
    log2 = []
    rs = jp.drivers.iterative_pruning(
        _recording_train(log2), theta0, rounds=2, rate=[0.25, 0.5], trained=theta0
    )
    assert len(log2) == 2  # round 0 was given
    assert [r.sparsity for r in rs] == [0.0, 0.25, 0.5]


def test_driver_errors():
    t = lambda p, m: p
    with pytest.raises(ValueError, match="rate must be in"):
        jp.drivers.iterative_pruning(t, {"w": jnp.ones((2, 2))}, rounds=1, rate=1.5)
    with pytest.raises(ValueError, match="increasing per-round target sparsities"):
        jp.drivers.iterative_pruning(t, {"w": jnp.ones((2, 2))}, rounds=2, rate=[0.5, 0.2])
    with pytest.raises(ValueError, match="rounds must be a non-negative int"):
        jp.drivers.iterative_pruning(t, {"w": jnp.ones((2, 2))}, rounds=-1, rate=0.5)
    with pytest.raises(ValueError, match="scope must be 'layer', 'global'"):
        jp.drivers.iterative_pruning(t, {"w": jnp.ones((2, 2))}, rounds=1, rate=0.5, scope="x")
    with pytest.raises(ValueError, match="num_masks must be a positive int"):
        jp.drivers.random_masks({"w": jnp.ones((2, 2))}, 0.5, key=jax.random.key(0), num_masks=0)


def test_random_masks_are_reproducible_distinct_and_averaged():
    p = {"w": jnp.ones((8, 8))}
    a = jp.drivers.random_masks(p, 0.5, key=jax.random.key(0), num_masks=3)
    b = jp.drivers.random_masks(p, 0.5, key=jax.random.key(0), num_masks=3)
    for x, y in zip(a, b, strict=False):
        np.testing.assert_array_equal(np.asarray(x["w"]), np.asarray(y["w"]))
        assert int(x["w"].sum()) == 32
    assert not np.array_equal(np.asarray(a[0]["w"]), np.asarray(a[1]["w"]))
    w = {"w": jnp.arange(64.0).reshape(8, 8)}
    mean, std, vals = jp.drivers.average_over_masks(
        lambda m: float(jp.apply_masks(w, m)["w"].sum()),
        w,
        0.5,
        key=jax.random.key(1),
        num_masks=4,
    )
    assert mean == pytest.approx(np.mean(vals)) and std == pytest.approx(np.std(vals))
    assert len(set(vals)) > 1
