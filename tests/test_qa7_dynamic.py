"""QA7 findings 2-8 on dynamic sparse training (rigl / set) and stacked layers."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxprune as jp
from tests._examples import load_example

_K = jax.random.key(0)


def _rigl(inner, **kw):
    kw = {"sparsity": 0.5, "key": _K, "end_step": 10, "update_every": 1, **kw}
    return jp.dynamic.rigl(inner, distribution=jp.distributions.uniform, **kw)


def _set(inner, **kw):
    kw = {"sparsity": 0.5, "key": _K, "update_every": 1, **kw}
    return jp.dynamic.set(inner, distribution=jp.distributions.uniform, **kw)


# --- 2. nnx.split(model, nnx.Param): updates and inner state keep the Params -----------------


def _nnx_params():
    model = nnx.Sequential(
        nnx.Linear(8, 16, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(16, 4, rngs=nnx.Rngs(1))
    )
    graphdef, params = nnx.split(model, nnx.Param)
    x = jax.random.normal(jax.random.key(1), (4, 8))
    return params, lambda p: jnp.mean(nnx.merge(graphdef, p)(x) ** 2)


def _is_var(x):
    return isinstance(x, nnx.Variable)


@pytest.mark.parametrize("make", [_rigl, _set])
def test_nnx_param_state_steps_with_apply_updates_and_a_stable_state(make):
    params, loss = _nnx_params()
    # adamw reads the params too (weight decay): they reach it as Params as well.
    tx = make(optax.adamw(1e-2, weight_decay=0.1))
    s0 = tx.init(params)
    step = jax.jit(
        lambda p, s: (lambda u, s: (optax.apply_updates(p, u), s, u))(
            *tx.update(jax.grad(loss)(p), s, p)
        )
    )
    p, s, u = params, s0, None
    for _ in range(3):  # steps 1 and 2 rewire
        p, s, u = step(p, s)
    types_ = {type(x).__name__ for x in jax.tree.leaves(u, is_leaf=_is_var)}
    assert types_ == {"Param"}
    assert jax.tree.structure(p) == jax.tree.structure(params)
    assert jax.tree.structure(s) == jax.tree.structure(s0)
    masks = jp.get_masks(s)
    assert float(jp.sparsity(masks)) == 0.5
    # Pruned entries landed on 0, and the Param-shaped moments were reset where rewired.
    kernel = nnx.as_pure(p)["layers"][0]["kernel"]
    keep = np.asarray(masks["layers"][0]["kernel"])
    assert not np.asarray(kernel)[~keep].any()
    mu = nnx.as_pure(s.inner_state[0].mu)["layers"][0]["kernel"]
    assert type(s.inner_state[0].mu["layers"][0]["kernel"]).__name__ == "Param"
    assert not np.asarray(mu)[~keep].any()


def test_rigl_resets_param_shaped_moments_of_rewired_entries():
    params, loss = _nnx_params()
    tx = _rigl(optax.adam(1e-2), update_every=2)
    s = tx.init(params)
    step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p))
    for _ in range(2):
        u, s = step(params, s)
        params = optax.apply_updates(params, u)
    m_before = np.asarray(jp.get_masks(s)["layers"][0]["kernel"])
    u, s = step(params, s)  # step 2 rewires
    m_after = np.asarray(jp.get_masks(s)["layers"][0]["kernel"])
    changed = m_before != m_after
    assert changed.any()
    for moment in (s.inner_state[0].mu, s.inner_state[0].nu):
        assert not np.asarray(nnx.as_pure(moment)["layers"][0]["kernel"])[changed].any()


# --- 3. params that do not fit the state ------------------------------------------------------


_P = {"a": {"kernel": jnp.ones((16, 8)), "bias": jnp.zeros(8)}, "b": {"kernel": jnp.ones((8, 4))}}


@pytest.mark.parametrize("make", [_rigl, _set])
def test_params_that_do_not_fit_the_state_are_named(make):
    tx = make(optax.adam(1e-3))
    s = tx.init(_P)
    missing = {"a": _P["a"]}
    resized = {"a": _P["a"], "b": {"kernel": jnp.ones((8, 6))}}
    with pytest.raises(ValueError, match=r"built for other params.*lacks: \['b/kernel'\].*Fix"):
        tx.update(missing, s, missing)
    with pytest.raises(ValueError, match=r"built for other params.*'b/kernel \(8, 6\)'.*Fix"):
        tx.update(resized, s, resized)
    with pytest.raises(ValueError, match=r"updates must have the leaves.*b/kernel.*Fix: pass"):
        tx.update(missing, s, _P)


# --- 4. a selection passed as the distribution ------------------------------------------------


@pytest.mark.parametrize(
    "dist",
    [
        jp.distributions.selection(jp.distributions.erk),
        jp.masks.topk,
        functools.partial(jp.masks.global_topk, max_sparsity=0.9),
        jp.masks.per_layer(jp.masks.topk, stacked=lambda p, x: False),
    ],
    ids=["selection", "topk", "partial", "per_layer"],
)
def test_a_selection_as_distribution_is_refused_when_built(dist):
    with pytest.raises(ValueError, match=r"got the selection .*returns masks.*distributions.erk,"):
        jp.dynamic.rigl(optax.adam(1e-3), sparsity=0.5, key=_K, end_step=10, distribution=dist)
    with pytest.raises(ValueError, match=r"got the selection"):
        jp.dynamic.set(optax.adam(1e-3), sparsity=0.5, key=_K, update_every=2, distribution=dist)


@pytest.mark.parametrize("stacked", [None, lambda p, x: p[0] == "b"], ids=["flat", "stacked"])
def test_a_selection_of_ones_own_as_distribution_is_named_at_init(stacked):
    params = {**_P, "b": {"kernel": jnp.ones((2, 8, 4))}}
    own = lambda p, s, *, where=None: jp.masks.topk(p, s, where=where)  # noqa: E731
    tx = jp.dynamic.rigl(
        optax.adam(1e-3), sparsity=0.5, key=_K, end_step=10, distribution=own, stacked=stacked
    )
    # Unstacked, its masks are refused; stacked, it fails on the layers' stand-ins
    # (shapes only) before it returns.
    fix = r"Fix: pass the distribution itself, e.g. distribution=jp.distributions.erk, not"
    if stacked is None:
        why = r"must return one sparsity \(a number\) per leaf, got a \(16, 8\) bool array for "
        fix = why + r"'a/kernel'.*" + fix
    else:
        fix = r"raised TypeError .*ShapeDtypeStructs.*one sparsity per leaf.*" + fix
    with pytest.raises(ValueError, match=fix):
        tx.init(params)
    with pytest.raises(ValueError, match=fix):
        jax.jit(tx.init)(params)


# --- 5. end_step <= update_every never rewires ------------------------------------------------


def test_never_rewiring_configurations_warn_once_at_the_first_update():
    p = {"w": jnp.ones((8, 8))}
    kw = {"sparsity": 0.5, "key": _K, "distribution": jp.distributions.uniform}
    for tx in (
        jp.dynamic.rigl(optax.sgd(0.1), end_step=90, update_every=100, **kw),
        jp.dynamic.set(optax.sgd(0.1), end_step=5, update_every=5, **kw),
    ):
        s = tx.init(p)  # init alone trains nothing: no warning
        # Traced only (eval_shape): the warning comes when the step is traced.
        with pytest.warns(UserWarning, match=r"never rewire.*update_every.*Fix: lower"):
            jax.eval_shape(tx.update, p, s, p)
        jax.eval_shape(tx.update, p, s, p)  # once per transform (warnings are errors here)
    # One rewiring is possible (step 100): no warning.
    tx = jp.dynamic.rigl(optax.sgd(0.1), end_step=101, update_every=100, **kw)
    jax.eval_shape(tx.update, p, tx.init(p), p)


# --- 6. stacked= matching no leaf -------------------------------------------------------------


_LINEN = {
    "params": {
        "blocks": {
            "kernel": jax.random.normal(jax.random.key(0), (4, 16, 16)),
            "bias": jnp.zeros((4, 16)),
        }
    }
}


def test_a_stacked_predicate_that_matches_nothing_warns_once():
    docs = lambda path, leaf: path[0] == "layers"  # noqa: E731 (the nnx predicate)
    linen = lambda path, leaf: "blocks" in path  # noqa: E731
    match = r"stacked= matched none of the 2 array leaves.*\('params', 'blocks', 'bias'\).*Fix"
    # Traced only (eval_shape): the shapes of the masks are what this is about.
    tx = _rigl(optax.adam(1e-3), stacked=docs)
    with pytest.warns(UserWarning, match="jp.dynamic.rigl: " + match):
        masks = jax.eval_shape(lambda p: tx.init(p).masks, _LINEN)
    assert masks["params"]["blocks"]["bias"].shape == (4, 16)  # the biases taken for kernels
    jax.eval_shape(tx.init, _LINEN)  # once per transform
    select = jp.masks.per_layer(jp.masks.topk, stacked=docs)
    with pytest.warns(UserWarning, match="jp.masks.per_layer: " + match):
        jax.eval_shape(select, _LINEN, 0.5)
    jax.eval_shape(select, _LINEN, 0.5)
    # The linen predicate matches: no warning, and the stacked biases are not pruned.
    tx = _set(optax.adam(1e-3), stacked=linen)
    masks = jax.eval_shape(lambda p: tx.init(p).masks, _LINEN)
    assert masks["params"]["blocks"]["bias"].shape == ()
    select = jp.masks.per_layer(jp.masks.topk, stacked=linen)
    assert jax.eval_shape(select, _LINEN, 0.5)["params"]["blocks"]["bias"].shape == ()


# --- 7. the no-prunable-leaf warning under stacked= -------------------------------------------


def test_no_prunable_leaf_under_stacked_lists_the_one_layer_shapes():
    params = {"layers": {"kernel": jnp.ones((4, 16, 16)), "bias": jnp.zeros((4, 16))}}
    tx = _rigl(
        optax.adam(1e-3),
        stacked=lambda path, leaf: path[0] == "layers",
        where=lambda path, leaf: leaf.ndim >= 3,
    )
    one_layer = r"layers/kernel one layer \(16, 16\) of \(4, 16, 16\)"
    with pytest.warns(UserWarning, match=rf"no prunable leaf.*{one_layer}.*asked about one layer"):
        tx.init(params)


# --- 8. sparse from step 0: apply the initial masks after init --------------------------------


def test_docs_and_example_apply_the_initial_masks_after_init():
    for doc in (jp.dynamic.rigl.__doc__, jp.dynamic.set.__doc__, jp.dynamic.__doc__):
        assert "jp.apply_masks(params, jp.get_masks(state))" in " ".join(doc.split())
    # nnx: the documented update of a model's Params.
    model = nnx.Linear(16, 8, rngs=nnx.Rngs(0))
    tx = _rigl(optax.adam(1e-3), sparsity=0.75)
    masks = jp.get_masks(tx.init(nnx.state(model, nnx.Param)))
    nnx.update(model, jp.apply_masks(nnx.state(model, nnx.Param), masks))
    assert float(jp.sparsity(model.kernel.get_value())) == 0.75

    # The example's training starts from the masked params: with no step taken,
    # its params are nonzero exactly on the masks (dense before the fix).
    example = load_example("dynamic_sparse")
    args = example.parse_args(["--quick", "--steps", "1", "--distribution", "uniform"])
    args.steps = 0
    graphdef, theta_0 = nnx.split(jp.models.lenet_300_100(rngs=nnx.Rngs(0)), nnx.Param)
    theta_0 = nnx.as_pure(theta_0)
    data = (np.zeros((args.batch_size, 784), np.float32), np.zeros(args.batch_size, np.int32))
    pbar = types.SimpleNamespace(update=lambda n: None)
    params, _, rewired = example.train("RigL", args, data, graphdef, theta_0, pbar)
    assert rewired == 0
    kernels = [x for x in jax.tree.leaves(params) if x.ndim == 2]
    assert sum(int(np.count_nonzero(x)) for x in kernels) == 23_520 + 3_000 + 100
