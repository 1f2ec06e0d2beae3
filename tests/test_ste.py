"""jp.dynamic.ste: straight-through sparse training (STE) and SR-STE."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune as jp
from tests._invariants import check_transform, small_params


def _loss(params, x):
    h = jax.nn.relu(x @ params["dense"]["kernel"] + params["dense"]["bias"])
    y = h @ params["out"]["kernel"] + params["out"]["bias"]
    return jnp.mean((y.astype(jnp.float32) - 1.0) ** 2)


def _train(tx, params, steps, seed=0):
    state = tx.init(params)

    @jax.jit
    def step(params, state, x):
        grads = jax.grad(_loss)(params, x)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    dtype = jax.tree.leaves(params)[0].dtype
    history = []
    for i in range(steps):
        x = jax.random.normal(jax.random.key(seed * 1000 + i), (32, 16), dtype)
        params, state = step(params, state, x)
        history.append((params, state))
    return params, state, history


@pytest.mark.parametrize(
    "scope",
    ["layer", "global", functools.partial(jp.masks.nm, n=2, m=4)],
    ids=["layer", "global", "nm"],
)
def test_invariant_suite(scope):
    check_transform(lambda inner: jp.dynamic.ste(inner, sparsity=0.5, scope=scope))


def test_invariant_suite_with_sr_ste_decay_and_a_schedule():
    schedule = jp.schedules.polynomial(0.0, 0.75, 0, 4, frequency=2)
    check_transform(lambda inner: jp.dynamic.ste(inner, sparsity=schedule, decay=1e-3))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_params_are_exactly_the_dense_weights_where_kept_and_zero_elsewhere(dtype):
    params = small_params(dtype)
    tx = jp.dynamic.ste(optax.adam(0.05), sparsity=0.75)
    _, _, history = _train(tx, params, 12)
    changed = 0
    prev = None
    for p, state in history:
        masks = jp.get_masks(state)
        for name in ("dense", "out"):
            w = np.asarray(p[name]["kernel"], np.float32)
            d = np.asarray(state.dense[name]["kernel"], np.float32)
            m = np.asarray(masks[name]["kernel"])
            assert p[name]["kernel"].dtype == dtype == state.dense[name]["kernel"].dtype
            np.testing.assert_array_equal(w, np.where(m, d, 0.0))
            assert int((~m).sum()) == round(0.75 * m.size)  # exact count every step
            # Biases are not prunable: no dense copy, a scalar placeholder.
            assert state.dense[name]["bias"].shape == ()
        if prev is not None:
            changed += int((np.asarray(masks["dense"]["kernel"]) != prev).sum())
        prev = np.asarray(masks["dense"]["kernel"])
    assert changed > 0, "the masks never changed: STE should let pruned weights come back"


def test_pruned_weights_keep_learning_where_prune_freezes_them():
    params = small_params()
    ste_p, ste_state, _ = _train(jp.dynamic.ste(optax.sgd(0.1), sparsity=0.5), params, 3)
    pr_p, pr_state, _ = _train(jp.prune(optax.sgd(0.1), sparsity=0.5), params, 3)
    k0 = np.asarray(params["dense"]["kernel"])
    # After the first step, jp.prune's pruned weights stay exactly 0 and its
    # masks never change (a float sparsity prunes once); STE's dense weights
    # of pruned entries still move.
    ste_masks = np.asarray(jp.get_masks(ste_state)["dense"]["kernel"])
    dense = np.asarray(ste_state.dense["dense"]["kernel"])
    assert np.any(dense[~ste_masks] != k0[~ste_masks])
    pr_masks = np.asarray(jp.get_masks(pr_state)["dense"]["kernel"])
    assert np.all(np.asarray(pr_p["dense"]["kernel"])[~pr_masks] == 0)
    assert np.all(np.asarray(ste_p["dense"]["kernel"])[~ste_masks] == 0)


def test_first_step_matches_hand_computed_sgd():
    w = jnp.array([[0.5, -1.5, 2.0, -3.0], [4.0, 0.1, -0.2, 1.0]])
    g = jnp.array([[1.0, -2.0, 0.5, 0.0], [0.0, 1.0, -1.0, 2.0]])
    tx = jp.dynamic.ste(optax.sgd(0.5), sparsity=0.5)
    state = tx.init({"w": w})
    updates, state = tx.update({"w": g}, state, {"w": w})
    dense = w - 0.5 * g  # every entry steps, pruned ones included
    keep = np.zeros(8, bool)
    keep[np.argsort(-np.abs(np.asarray(dense)).ravel(), kind="stable")[:4]] = True
    keep = keep.reshape(2, 4)
    np.testing.assert_allclose(state.dense["w"], dense)
    np.testing.assert_array_equal(jp.get_masks(state)["w"], keep)
    stepped = optax.apply_updates({"w": w}, updates)["w"]
    np.testing.assert_allclose(stepped, np.where(keep, dense, 0))


def test_sr_ste_decay_shrinks_only_the_pruned_entries_dense_weights():
    w = jnp.array([[1.0, -2.0, 3.0, -4.0]])
    zero = {"w": jnp.zeros_like(w)}
    lr, decay = 0.5, 0.2
    tx = jp.dynamic.ste(optax.sgd(lr), sparsity=0.5, decay=decay)
    state = tx.init({"w": w})
    updates, state = tx.update(zero, state, {"w": w})  # step 0: nothing pruned before it
    params = optax.apply_updates({"w": w}, updates)
    np.testing.assert_allclose(state.dense["w"], w)
    np.testing.assert_allclose(params["w"], [[0.0, 0.0, 3.0, -4.0]])
    _, state = tx.update(zero, state, params)
    # Pruned entries: w - lr * decay * w; kept ones: unchanged (zero gradient).
    want = np.array([[1.0 * (1 - lr * decay), -2.0 * (1 - lr * decay), 3.0, -4.0]])
    np.testing.assert_allclose(state.dense["w"], want, rtol=1e-6)


def test_level_follows_the_schedules_refresh_grid_and_begin_step():
    schedule = jp.schedules.polynomial(0.0, 0.5, 2, 8, frequency=3, power=1)
    tx = jp.dynamic.ste(optax.sgd(0.01), sparsity=schedule, where=lambda p, x: x.ndim >= 2)
    params = {"w": jax.random.normal(jax.random.key(3), (20, 10))}
    state = tx.init(params)
    seen = []
    for _ in range(11):
        grads = {"w": jnp.ones_like(params["w"])}
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        seen.append(int((~np.asarray(jp.get_masks(state)["w"])).sum()))
    # Refresh steps 2, 5, 8 (= end): sparsity 0, 0.25, 0.5; held in between.
    want = [0, 0, 0, 0, 0, 50, 50, 50, 100, 100, 100]
    assert seen == want


def test_saliency_gets_the_steps_gradients_and_random_needs_a_key():
    params = small_params()
    _, state, _ = _train(
        jp.dynamic.ste(optax.adam(1e-2), sparsity=0.5, criterion=jp.criteria.saliency), params, 2
    )
    assert jp.sparsity(jp.get_masks(state)) == pytest.approx(0.5)
    tx = jp.dynamic.ste(optax.adam(1e-2), sparsity=0.5, criterion=jp.criteria.random)
    state = tx.init(params)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
    tx = jp.dynamic.ste(
        optax.adam(1e-2), sparsity=0.5, criterion=jp.criteria.random, key=jax.random.key(0)
    )
    _, state, history = _train(tx, params, 3)
    a, b = (np.asarray(jp.get_masks(s)["dense"]["kernel"]) for _, s in history[1:])
    assert not np.array_equal(a, b)  # fresh random scores at every step


def test_state_bytes_counts_the_dense_copy_and_checkpoints_round_trip(tmp_path):
    params = small_params()
    tx = jp.dynamic.ste(optax.adam(1e-2), sparsity=0.5)
    p, state, _ = _train(tx, params, 3)
    sizes = jp.state_bytes(state)
    kernels = sum(x.nbytes for x in jax.tree.leaves(params) if x.ndim >= 2)
    assert kernels <= sizes["pruning"] <= kernels + kernels // 32 + 64
    jp.save(tmp_path / "ckpt", 3, p, state)
    back = jp.restore(tmp_path / "ckpt", params=p, opt_state=tx.init(params))
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(back.opt_state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Resuming from the restored state continues exactly where training stopped.
    x = jnp.ones((4, 16))
    grads = jax.grad(_loss)(p, x)
    u1, _ = tx.update(grads, state, p)
    u2, _ = tx.update(grads, back.opt_state, back.params)
    for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_nm_from_scratch_keeps_two_of_every_four():
    params = small_params()
    tx = jp.dynamic.ste(
        optax.adam(1e-2), sparsity=0.5, scope=functools.partial(jp.masks.nm, n=2, m=4), decay=2e-4
    )
    p, state, _ = _train(tx, params, 5)
    for name in ("dense", "out"):
        m = np.asarray(jp.get_masks(state)[name]["kernel"])
        np.testing.assert_array_equal(np.asarray(p[name]["kernel"]) != 0, m)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"decay": -1.0}, r"decay must be a finite number >= 0.*got -1\.0.*Fix"),
        ({"decay": float("nan")}, r"decay must be a finite number >= 0.*got nan"),
        ({"decay": True}, r"decay must be a finite number >= 0.*got True"),
        ({"decay": "big"}, r"decay must be a finite number >= 0.*got 'big'"),
        ({"sparsity": 1.5}, r"sparsity"),
        ({"scope": "rows"}, r"scope must be 'layer'.*got 'rows'"),
        ({"scope": jp.distributions.erk}, r"distribution jp.distributions.erk"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    base = {"sparsity": 0.5}
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        jp.dynamic.ste(optax.adam(1e-2), **base)


def test_bad_tx_where_and_state_are_explained():
    with pytest.raises(ValueError, match=r"tx must be an optax transformation.*Fix"):
        jp.dynamic.ste(optax.adam, sparsity=0.5)
    tx = jp.dynamic.ste(optax.adam(1e-2), sparsity=0.5, where=lambda p, x: False)
    with pytest.raises(ValueError, match=r"`where` selects none of the params' leaves"):
        tx.init(small_params())
    tx = jp.dynamic.ste(optax.adam(1e-2), sparsity=0.5)
    params = small_params()
    with pytest.raises(ValueError, match=r"not the SteState its init builds.*template"):
        tx.update(params, {"count": 0}, params)
    with pytest.raises(ValueError, match=r"needs the current params"):
        tx.update(params, tx.init(params))


def test_stacked_layers_keep_their_own_counts():
    # A scanned stack of 3 layers: per_layer makes each layer its own leaf.
    params = {
        "layers": {"kernel": jax.random.normal(jax.random.key(0), (3, 16, 8))},
        "head": {"kernel": jax.random.normal(jax.random.key(1), (8, 4))},
    }
    scope = jp.masks.per_layer(jp.masks.topk, stacked=lambda path, x: "layers" in str(path))
    tx = jp.dynamic.ste(optax.adam(1e-2), sparsity=0.75, scope=scope)
    state = tx.init(params)
    step = jax.jit(tx.update)
    for i in range(3):
        grads = jax.tree.map(lambda x, i=i: jnp.sin(x * (i + 2)), params)
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
    masks = jp.get_masks(state)
    per_layer = (~np.asarray(masks["layers"]["kernel"])).sum(axis=(1, 2))
    assert per_layer.tolist() == [96, 96, 96]
    assert int((~np.asarray(masks["head"]["kernel"])).sum()) == 24
    np.testing.assert_array_equal(
        np.asarray(params["layers"]["kernel"]) != 0, np.asarray(masks["layers"]["kernel"])
    )


def test_bench_ste_reports_every_configuration(capsys):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "bench_ste.py"
    spec = importlib.util.spec_from_file_location("bench_ste", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = script.main(["--rounds", "1", "--block", "2"])
    assert set(out["ratios"]) == {"prune", "ste/layer", "ste/global", "ste/nm-2:4"}
    assert all(r > 0 for r in out["ratios"].values())
    # 3 + 2 timed warm-up steps: the STE masks are selected, jp.prune's never refreshed.
    assert out["mask_sparsity"] == pytest.approx(
        {"prune": 0.0, "ste/layer": 0.9, "ste/global": 0.9, "ste/nm-2:4": 0.5}, abs=1e-6
    )
    # STE carries a dense copy of the kernels (1,067,520 f32) beyond adam's state.
    assert out["state_mb"]["ste/layer"] - out["state_mb"]["dense"] == pytest.approx(4.268, abs=0.2)
    assert "| ste/nm-2:4 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        script.main(["--rounds", "0"])
