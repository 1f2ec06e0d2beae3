"""The shared invariant suite every public transform runs through.

Call :func:`check_transform` from a test with a factory ``make_tx(inner) -> tx``
(``inner`` is the optimizer to wrap). It checks, on a small two-layer model:
jit with no retracing across steps (``chex.assert_max_traces``); f32 and bf16
params keep their dtype; the state is stable under ``lax.cond`` (same tree,
shapes and dtypes after ``update`` as after ``init``); ``optax.chain``;
``optax.MultiSteps``; an ``optax.inject_hyperparams``-built inner optimizer;
``nnx.Optimizer``; and, when the transform prunes, that pruned entries are
exactly zero and ``jp.get_masks`` finds the masks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxprune as jp

MakeTx = Callable[[optax.GradientTransformation], optax.GradientTransformation]
ExtraFn = Callable[[int], dict[str, Any]]


def small_params(dtype=jnp.float32, seed: int = 0) -> dict:
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {
        "dense": {
            "kernel": jax.random.normal(k1, (16, 8), dtype),
            "bias": jnp.zeros((8,), dtype),
        },
        "out": {"kernel": jax.random.normal(k2, (8, 4), dtype), "bias": jnp.zeros((4,), dtype)},
    }


def _loss(params, x):
    h = jax.nn.relu(x @ params["dense"]["kernel"] + params["dense"]["bias"])
    y = h @ params["out"]["kernel"] + params["out"]["bias"]
    return jnp.mean(y.astype(jnp.float32) ** 2)


def _data(dtype):
    return jax.random.normal(jax.random.key(42), (32, 16), dtype)


def _no_extra(step: int) -> dict[str, Any]:
    del step
    return {}


def _shape_dtype(tree):
    return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), tree)


def _run(tx, params, steps, extra_fn, name):
    chex.clear_trace_counter()
    x = _data(jax.tree.leaves(params)[0].dtype)
    state = tx.init(params)
    init_sig = _shape_dtype(state)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, state, extra):
        grads = jax.grad(_loss)(params, x)
        updates, state = tx.update(grads, state, params, **extra)
        return optax.apply_updates(params, updates), state

    for i in range(steps):
        params, state = step(params, state, extra_fn(i))
    chex.assert_trees_all_equal_structs(init_sig, _shape_dtype(state))
    assert _shape_dtype(state) == init_sig, f"{name}: state shapes/dtypes changed across update"
    return params, state


def _check_zeros(params, state, name):
    if not jp.transform.find_prune_states(state):
        return
    masks = jp.get_masks(state)
    for (path, p), m in zip(
        jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(masks), strict=True
    ):
        m = np.broadcast_to(np.asarray(m), np.shape(p))
        assert np.all(np.asarray(p, np.float32)[~m] == 0), f"{name}: pruned entries of {path} not 0"


def check_transform(
    make_tx: MakeTx,
    *,
    extra_fn: ExtraFn = _no_extra,
    steps: int = 6,
    inner: optax.GradientTransformation | None = None,
) -> None:
    """Runs ``make_tx`` through every invariant; raises AssertionError on a failure."""
    inner = inner if inner is not None else optax.adam(1e-2)

    # jit, no retrace, dtype preserved (f32 and bf16), exact zeros.
    for dtype in (jnp.float32, jnp.bfloat16):
        params0 = small_params(dtype)
        params, state = _run(make_tx(inner), params0, steps, extra_fn, f"jit/{dtype.__name__}")
        for a, b in zip(jax.tree.leaves(params0), jax.tree.leaves(params), strict=True):
            assert a.dtype == b.dtype, f"dtype changed: {a.dtype} -> {b.dtype}"
        _check_zeros(params, state, f"jit/{jnp.dtype(dtype).name}")

    # State stable under lax.cond (both branches must agree on types).
    tx = make_tx(inner)
    params = small_params()
    state = tx.init(params)
    grads = jax.grad(_loss)(params, _data(jnp.float32))

    @jax.jit
    def cond_step(pred, state, extra):
        return jax.lax.cond(
            pred, lambda s: tx.update(grads, s, params, **extra)[1], lambda s: s, state
        )

    state = cond_step(True, state, extra_fn(0))
    state = cond_step(False, state, extra_fn(1))

    # Inside optax.chain, under MultiSteps, around inject_hyperparams.
    chained = optax.chain(optax.clip_by_global_norm(10.0), make_tx(inner))
    params, state = _run(chained, small_params(), steps, extra_fn, "chain")
    _check_zeros(params, state, "chain")
    multi = optax.MultiSteps(make_tx(inner), every_k_schedule=2)
    params, state = _run(multi, small_params(), steps, extra_fn, "MultiSteps")
    _check_zeros(params, state, "MultiSteps")
    injected = make_tx(optax.inject_hyperparams(optax.adam)(learning_rate=1e-2))
    params, state = _run(injected, small_params(), steps, extra_fn, "inject_hyperparams")
    _check_zeros(params, state, "inject_hyperparams")

    # nnx.Optimizer with a real module.
    model = nnx.Sequential(
        nnx.Linear(16, 8, rngs=nnx.Rngs(0)), jax.nn.relu, nnx.Linear(8, 4, rngs=nnx.Rngs(1))
    )
    opt = nnx.Optimizer(model, make_tx(inner), wrt=nnx.Param)
    x = _data(jnp.float32)

    @nnx.jit
    def nnx_step(model, opt, extra):
        grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
        opt.update(model, grads, **extra)

    for i in range(steps):
        nnx_step(model, opt, extra_fn(i))
    pure = nnx.as_pure(nnx.state(model, nnx.Param))
    _check_zeros(pure, nnx.as_pure(opt.opt_state), "nnx.Optimizer")
