"""Drivers: the round structure of iterative pruning / lottery tickets, random masks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxprune as jp
import jaxprune.drivers  # noqa: F401  (until jaxprune/__init__ exports it)
from jaxprune._tree import unwrap_variables


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
    with pytest.raises(ValueError, match="non-decreasing per-round target sparsities"):
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


class _MLP(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(6, 16, rngs=rngs)
        self.fc2 = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.relu(self.fc1(x)))


@nnx.jit
def _sgd_step(model, opt, x, y):
    def loss(m):
        return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

    opt.update(model, nnx.grad(loss)(model))


def _nnx_train(model, log, *, pure_return):
    """A real nnx train: load params into the model, 3 masked SGD steps, return its state."""
    x = jax.random.normal(jax.random.key(1), (32, 6))
    y = jnp.arange(32) % 3

    def train(params, masks):
        log.append((params, jax.tree.map(np.asarray, unwrap_variables(params)), masks))
        nnx.update(model, params)
        opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
        for _ in range(3):
            _sgd_step(model, opt, x, y)
            nnx.update(model, jp.apply_masks(nnx.state(model, nnx.Param), masks))
        state = nnx.state(model, nnx.Param)  # shares its Variables with `model`
        return unwrap_variables(state) if pure_return else state

    return train


def _kernels(tree):
    t = unwrap_variables(tree)
    return {k: np.asarray(t[k]["kernel"]) for k in ("fc1", "fc2")}


@pytest.mark.parametrize(
    "driver, pure_in, pure_return",
    [("lottery", False, False), ("lottery", True, True), ("iterative", False, True)],
)
def test_drivers_on_nnx_state_rewind_and_compound(driver, pure_in, pure_return):
    model = _MLP(nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)  # Variable-wrapped and shared with the model
    params = unwrap_variables(state) if pure_in else state
    theta0 = _kernels(state)
    log = []
    train = _nnx_train(model, log, pure_return=pure_return)
    if driver == "lottery":
        rs = jp.drivers.lottery_ticket(train, params, rounds=2, rate=0.5)
    else:
        rs = jp.drivers.iterative_pruning(train, params, rounds=2, rate=0.5, rewind_to=params)
    # Compounding sparsity over the 6*16 + 16*3 = 144 kernel entries: 50%, then 75%.
    assert [r.sparsity for r in rs] == [0.0, 0.5, 0.75]
    assert [sum(int((k == 0).sum()) for k in _kernels(r.params).values()) for r in rs] == [
        0,
        72,
        108,
    ]
    # train gets params in the form they came in; rounds record the form train returned.
    received = jax.tree.leaves(log[1][0], is_leaf=jp._tree.is_variable)
    assert all(isinstance(v, nnx.Param) != pure_in for v in received)
    stored = jax.tree.leaves(rs[1].params, is_leaf=jp._tree.is_variable)
    assert all(isinstance(v, nnx.Param) != pure_return for v in stored)
    for (_, start, _), r in zip(log[1:], rs[1:], strict=True):
        for name, w0 in theta0.items():
            m = np.asarray(r.masks[name]["kernel"])
            # Rewound to theta_0 (not the model's trained weights, which `state` now shows).
            np.testing.assert_array_equal(start[name]["kernel"], np.where(m, w0, 0))
            trained = _kernels(r.params)[name]
            assert np.all(trained[~m] == 0) and not np.array_equal(trained[m], w0[m])
    for a, b in zip(rs[1:], rs[2:], strict=False):
        for name in theta0:
            assert np.all(np.asarray(a.masks[name]["kernel"]) >= b.masks[name]["kernel"])
    # Earlier rounds are snapshots: later in-place training did not change them.
    assert all(int((k == 0).sum()) == 0 for k in _kernels(rs[0].params).values())
    assert jp.apply_masks(rs[2].params, rs[2].masks) is not None  # masks fit either form


def test_driver_errors_on_bad_rate_and_train_results():
    p = {"w": jnp.arange(1.0, 17.0).reshape(4, 4)}
    t = lambda q, m: jp.apply_masks(q, m)
    rs = jp.drivers.lottery_ticket(t, p, rounds=2, rate=jnp.array([0.5, 0.75]))
    assert [r.sparsity for r in rs] == [0.0, 0.5, 0.75]  # a 1-D array is a sequence
    with pytest.raises(
        ValueError, match=r"(?s)rate must be a float in \(0, 1\) or a sequence.*shape \(2, 2\).*Fix"
    ):
        jp.drivers.lottery_ticket(t, p, rounds=2, rate=jnp.full((2, 2), 0.5))
    with pytest.raises(ValueError, match=r"rate must be a float.*got 'x'"):
        jp.drivers.lottery_ticket(t, p, rounds=2, rate="x")
    with pytest.raises(ValueError, match=r"hold 2 non-decreasing per-round"):
        jp.drivers.lottery_ticket(t, p, rounds=2, rate=jnp.array([0.5, 0.75, 0.9]))
    with pytest.raises(ValueError, match=r"train\(params, masks\) returned None.*Fix: end train"):
        jp.drivers.lottery_ticket(lambda q, m: None, p, rounds=1, rate=0.5)
    with pytest.raises(ValueError, match=r"only in train\(params, masks\): v.*Fix"):
        jp.drivers.lottery_ticket(lambda q, m: {"v": q["w"]}, p, rounds=1, rate=0.5)
    with pytest.raises(ValueError, match=r"train\(params, masks\) has shape \(16,\) at 'w'"):
        jp.drivers.lottery_ticket(lambda q, m: {"w": q["w"].ravel()}, p, rounds=1, rate=0.5)
    with pytest.raises(ValueError, match=r"rewind_to must have exactly the tree structure"):
        jp.drivers.lottery_ticket(t, p, rounds=1, rate=0.5, rewind_to={"w": p["w"], "b": 1.0})
    with pytest.raises(ValueError, match=r"only in trained: x.*Fix"):
        jp.drivers.iterative_pruning(t, p, rounds=1, rate=0.5, trained={"x": p["w"]})


@pytest.mark.parametrize("reduce", ["l2", "l1", "max", "mean"])
@pytest.mark.parametrize("driver", ["lottery", "iterative"])
def test_structured_scope_keeps_masks_nested(driver, reduce):
    # Unit j's norm grows with j. Already-pruned entries are scored -inf; an l2/l1
    # reduction used to turn a pruned column into +inf and bring it back.
    w = jnp.arange(1.0, 33.0).reshape(4, 8)
    p = {"fc": {"kernel": w, "bias": jnp.zeros(8)}}
    scope = functools.partial(jp.masks.structured, reduce=reduce)
    t = lambda q, m: jp.apply_masks(q, m)  # stand-in training
    if driver == "lottery":
        rs = jp.drivers.lottery_ticket(t, p, rounds=3, rate=0.5, scope=scope)
    else:
        rs = jp.drivers.iterative_pruning(t, p, rounds=3, rate=0.5, scope=scope)
    units = [np.flatnonzero(np.asarray(r.masks["fc"]["kernel"]).all(0)).tolist() for r in rs[1:]]
    assert units == [[4, 5, 6, 7], [6, 7], [7]]
    assert [r.sparsity for r in rs] == [0.0, 0.5, 0.75, 0.875]
    for a, b in zip(rs[1:], rs[2:], strict=False):
        assert np.all(np.asarray(a.masks["fc"]["kernel"]) >= np.asarray(b.masks["fc"]["kernel"]))
