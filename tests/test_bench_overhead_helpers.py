"""scripts/bench_overhead.py's hand-masked transform: the enforcement it times is real."""

import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax


def _script():
    scripts = pathlib.Path(__file__).resolve().parents[1] / "scripts"
    sys.path.insert(0, str(scripts))
    try:
        spec = importlib.util.spec_from_file_location(
            "bench_overhead", scripts / "bench_overhead.py"
        )
        script = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(script)
    finally:
        sys.path.remove(str(scripts))
    return script


def test_hand_masked_zeroes_its_pruned_weights_and_trains_the_rest():
    script = _script()
    params = script.mlp_init(jax.random.key(0))
    tx = script.hand_masked(optax.adam(1e-2), params, sparsity=0.9)
    state = tx.init(params)
    masks = jax.tree.map(np.asarray, state[0])  # the step donates the state
    step = script.make_step(tx)
    x = jax.random.normal(jax.random.key(1), (8, 784))
    y = jnp.arange(8) % 10
    before = jax.tree.map(jnp.copy, params)
    params, state = step(params, state, x, y)
    params, state = step(params, state, x, y)
    for p, b, m in zip(
        jax.tree.leaves(params), jax.tree.leaves(before), jax.tree.leaves(masks), strict=True
    ):
        p, b, m = np.asarray(p), np.asarray(b), np.asarray(m)
        if p.ndim > 1:  # kernels: ~90% pruned, exactly zero there
            assert 0.88 < 1 - m.mean() < 0.92
            assert np.all(p[~m] == 0)
        else:  # biases are never masked
            assert m.all()
        assert np.any(p[m] != b[m])  # the kept entries moved
    # init after a donated step still has its masks (init hands out copies).
    again = tx.init(params)[0]
    np.testing.assert_array_equal(
        np.concatenate([np.ravel(m) for m in jax.tree.leaves(masks)]),
        np.concatenate([np.ravel(np.asarray(a)) for a in jax.tree.leaves(again)]),
    )
