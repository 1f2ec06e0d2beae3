"""Criteria against hand-computed values: Wanda, Taylor, movement, EMA saliency, OBD."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune as jp
import jaxprune.distributions  # noqa: F401  (until jaxprune/__init__ exports it)


def test_wanda_matches_the_direct_formula():
    k1, k2 = jax.random.split(jax.random.key(0))
    w = jax.random.normal(k1, (6, 4))
    x = jax.random.normal(k2, (32, 6))  # 32 calibration tokens, 6 input features
    norms = jnp.sqrt(jnp.sum(x**2, axis=0))
    s = jp.criteria.wanda({"k": w, "b": jnp.ones(4)}, {"k": norms, "b": 1.0})
    want = np.abs(np.asarray(w)) * np.linalg.norm(np.asarray(x), axis=0)[:, None]
    np.testing.assert_allclose(np.asarray(s["k"]), want, rtol=1e-6)
    # Compared per output unit: every column keeps the same count.
    m = jp.distributions.per_output(s, 0.5)["k"]
    assert np.asarray(m).sum(axis=0).tolist() == [3, 3, 3, 3]
    for j in range(4):
        kept = np.asarray(m)[:, j]
        assert want[kept, j].min() >= want[~kept, j].max()


def test_wanda_rejects_mismatched_trees():
    with pytest.raises(ValueError, match="input_norms must have exactly the tree structure"):
        jp.criteria.wanda({"k": jnp.ones((2, 2))}, {"other": jnp.ones(2)})
    with pytest.raises(ValueError, match=r"input_norms of 'k' has shape \(5,\).*\(3, 4\)"):
        jp.criteria.wanda({"k": jnp.ones((3, 4))}, {"k": jnp.ones(5)})


def test_taylor_equals_the_feature_map_criterion():
    # Molchanov 2017: |sum_n dC/dz_nj * (z_nj - b_j)| per unit == |sum_i W_ij dC/dW_ij|.
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    w = jax.random.normal(k1, (5, 3))
    x = jax.random.normal(k2, (16, 5))
    t = jax.random.normal(k3, (16, 3))
    loss = lambda w, z_shift=0.0: jnp.sum((x @ w + z_shift - t) ** 2)
    g = jax.grad(loss)(w)
    z = x @ w
    dz = jax.grad(lambda z: jnp.sum((z - t) ** 2))(z)
    direct = jnp.abs(jnp.sum(dz * z, axis=0))
    direct = direct / jnp.linalg.norm(direct)
    s = jp.criteria.taylor({"k": w}, {"k": g})["k"]
    np.testing.assert_allclose(np.asarray(s[0]), np.asarray(direct), rtol=1e-5)
    assert np.all(np.asarray(s) == np.asarray(s[0]))  # broadcast over the unit's inputs


def test_taylor_ema_group_and_errors():
    c = jp.criteria.taylor_ema(0.5)
    p = {"k": jnp.array([[1.0, 2.0], [3.0, 4.0]])}
    g = {"k": jnp.array([[1.0, 1.0], [1.0, -1.0]])}
    s = c.score(c.update(c.init(p), p, g), p)["k"]
    # unit sums of w*g: (1 + 3, 2 - 4) -> squares 16, 4, times (1 - 0.5)
    assert np.asarray(s).tolist() == [[8.0, 2.0], [8.0, 2.0]]
    with pytest.raises(ValueError, match="group must be 'unit'"):
        jp.criteria.taylor_ema(group="row")
    with pytest.raises(ValueError, match="decay must be in"):
        jp.criteria.taylor_ema(1.5)


def test_movement_accumulates_minus_w_times_g():
    c = jp.criteria.movement()
    p1, g1 = {"w": jnp.array([1.0, -2.0])}, {"w": jnp.array([0.5, 0.5])}
    p2, g2 = {"w": jnp.array([2.0, -1.0])}, {"w": jnp.array([-1.0, 1.0])}
    st = c.update(c.update(c.init(p1), p1, g1), p2, g2)
    assert np.asarray(c.score(st, p2)["w"]).tolist() == [-0.5 + 2.0, 1.0 + 1.0]


def test_ema_saliency_inside_prune_keeps_the_salient_weight():
    params = {"w": jnp.array([[1.0, 1.0], [1.0, 1.0]])}
    grads = {"w": jnp.array([[4.0, 0.1], [0.2, 3.0]])}
    tx = jp.prune(optax.sgd(0.0), sparsity=0.5, criterion=jp.criteria.ema_saliency(0.9))
    st = tx.init(params)
    u, st = jax.jit(tx.update)(grads, st, params)
    assert np.asarray(jp.get_masks(st)["w"]).tolist() == [[True, False], [False, True]]


def _quadratic():
    # loss(w) = 0.5 w^T A w + b^T w with a symmetric A: Hessian = A everywhere.
    a = jnp.array([[3.0, 1.0, 0.5], [1.0, 2.0, -0.3], [0.5, -0.3, 4.0]])
    b = jnp.array([0.1, -0.2, 0.3])
    return lambda p: 0.5 * p["w"] @ a @ p["w"] + b @ p["w"], a


def test_hutchinson_diagonal_matches_the_exact_hessian():
    loss, a = _quadratic()
    params = {"w": jnp.array([1.0, -2.0, 0.5])}
    exact = jnp.diag(jax.hessian(loss)(params)["w"]["w"])
    np.testing.assert_allclose(np.asarray(exact), np.diag(np.asarray(a)), rtol=1e-6)
    est = jp.criteria.hutchinson_diag(loss, params, key=jax.random.key(0), num_samples=4000)
    np.testing.assert_allclose(np.asarray(est["w"]), np.asarray(exact), atol=0.1)
    s = jp.criteria.obd(params, est)["w"]
    np.testing.assert_allclose(
        np.asarray(s), 0.5 * np.asarray(exact) * np.asarray(params["w"]) ** 2, rtol=0.05
    )
    with pytest.raises(ValueError, match="num_samples must be a positive int"):
        jp.criteria.hutchinson_diag(loss, params, key=jax.random.key(0), num_samples=0)


def test_fisher_diagonal_equals_the_hessian_of_a_linear_gaussian_model():
    # Squared error of a linear model: Gauss-Newton = Hessian = mean_n x_n x_n^T;
    # the empirical Fisher's diagonal is mean_n (r_n x_n)^2 and at residuals r_n = +-1
    # the two diagonals agree exactly.
    x = jax.random.normal(jax.random.key(3), (8, 3))
    r = jnp.array([1.0, -1.0] * 4)
    w = jnp.zeros(3)
    y = x @ w - r
    loss = lambda p, x, y: 0.5 * jnp.mean((x @ p["w"] - y) ** 2)
    f = jp.criteria.fisher_diag(loss, {"w": w}, x, y, chunk_size=4)["w"]
    h = jnp.diag(jax.hessian(lambda p: loss(p, x, y))({"w": w})["w"]["w"])
    np.testing.assert_allclose(np.asarray(f), np.asarray(h), rtol=1e-5)
    # A batch that is not a multiple of chunk_size: the leftover is one smaller chunk.
    f3 = jp.criteria.fisher_diag(loss, {"w": w}, x, y, chunk_size=3)["w"]
    np.testing.assert_allclose(np.asarray(f3), np.asarray(f), rtol=1e-6)


def test_obd_with_hessian_passed_to_prune_and_obd_fisher():
    params = {"w": jnp.array([[1.0, 2.0], [3.0, 0.5]])}
    h = {"w": jnp.array([[8.0, 0.1], [0.1, 1.0]])}  # saliencies 4, 0.2, 0.45, 0.125
    tx = jp.prune(optax.sgd(0.0), sparsity=0.5, criterion=jp.criteria.obd)
    _, st = tx.update(params, tx.init(params), params, hessian_diag=h)
    assert np.asarray(jp.get_masks(st)["w"]).tolist() == [[True, False], [True, False]]
    c = jp.criteria.obd_fisher(0.0)
    s = c.score(c.update(c.init(params), params, {"w": jnp.ones((2, 2))}), params)["w"]
    assert np.asarray(s).tolist() == [[0.5, 2.0], [4.5, 0.125]]


def test_fisher_diag_and_obd_reject_bad_arguments():
    loss = lambda p, x: jnp.mean(p["w"] * x)
    p, x = {"w": jnp.ones(())}, jnp.array([1.0, 3.0])
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match=rf"chunk_size must be a positive int.*got {bad!r}"):
            jp.criteria.fisher_diag(loss, p, x, chunk_size=bad)
    assert float(jp.criteria.fisher_diag(loss, p, x, chunk_size=np.int64(1))["w"]) == 5.0
    with pytest.raises(ValueError, match="fisher_diag needs the batch"):
        jp.criteria.fisher_diag(loss, p)
    with pytest.raises(ValueError, match=r"leading sizes \[2, 3\]"):
        jp.criteria.fisher_diag(lambda p, x, y: loss(p, x), p, x, jnp.ones(3))
    with pytest.raises(
        ValueError,
        match=r"hessian_diag must have exactly the tree structure.*"
        r"only in hessian_diag: v.*Fix",
    ):
        jp.criteria.obd({"w": jnp.ones(2)}, {"v": jnp.ones(2)})
    with pytest.raises(ValueError, match=r"hessian_diag at 'w' has shape \(3,\).*\(2,\).*Fix"):
        jp.criteria.obd({"w": jnp.ones(2)}, {"w": jnp.ones(3)})
    assert jp.criteria.obd({"w": jnp.array([2.0, 1.0])}, {"w": 2.0})["w"].tolist() == [4.0, 1.0]


def test_obd_on_nnx_state_wrapped_against_pure_hessian():
    from flax import nnx

    state = nnx.state(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), nnx.Param)
    pure_h = jax.tree.map(lambda v: jnp.full(v.shape, 2.0), jp._tree.unwrap_variables(state))
    s = jp._tree.unwrap_variables(jp.criteria.obd(state, pure_h))
    w = np.asarray(state["kernel"].get_value())
    np.testing.assert_allclose(np.asarray(s["kernel"]), w**2, rtol=1e-6)
