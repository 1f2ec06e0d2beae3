"""QA round 7, core API edges: an injected sparsity, params changing containers, a criterion's
missing keyword, a selection without `where`, saliency/random on bad leaves."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.core import freeze

import jaxprune as jp


def _params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {
        "Dense_0": {"kernel": jax.random.normal(k1, (16, 8)), "bias": jnp.zeros(8)},
        "Dense_1": {"kernel": jax.random.normal(k2, (8, 8)), "bias": jnp.zeros(8)},
    }


# --- 1. A jax.Array sparsity (optax.inject_hyperparams around jp.prune) ---------------------


def test_injected_sparsity_stepped_eagerly_is_refused_like_under_jit():
    # Eagerly the injected value is a concrete 0-d jax.Array: a constant(s) built from it
    # ignored later values of the hyperparameter and recompiled at every step.
    tx = optax.inject_hyperparams(lambda sparsity: jp.prune(optax.sgd(1e-3), sparsity=sparsity))(
        sparsity=0.5
    )
    with pytest.raises(ValueError, match=r"got a jax.Array .*Fix: pass float\(sparsity\)"):
        tx.init(_params())


def test_jax_array_sparsity_is_refused_numbers_are_accepted():
    with pytest.raises(ValueError, match=r"jp.prune\(optax.inject_hyperparams\(optax.adam\)"):
        jp.prune(optax.sgd(0.1), sparsity=jnp.float32(0.5))
    params = {"w": jnp.arange(1.0, 17.0).reshape(4, 4)}
    for s in (0.5, np.float32(0.5), np.array(0.5)):
        tx = jp.prune(optax.sgd(0.1), sparsity=s)
        _, state = tx.update(params, tx.init(params), params)
        assert int((~jp.get_masks(state)["w"]).sum()) == 8
    # The schedule builders, called directly, still take a concrete array.
    assert float(jp.schedules.constant(jnp.float32(0.25))(3)) == 0.25


# --- 2. Params changing containers between tx.init and tx.update -----------------------------


def _run(tx, init_params, step_params, steps=2):
    state = tx.init(init_params)
    update = jax.jit(tx.update)
    p = step_params
    for _ in range(steps):
        updates, state = update(jax.tree.map(jnp.ones_like, p), state, p)
        p = optax.apply_updates(p, updates)
    return p, state


@pytest.mark.parametrize(
    "to_init,to_step",
    [(freeze, lambda p: p), (lambda p: p, freeze)],
    ids=["FrozenDict->dict", "dict->FrozenDict"],
)
def test_params_changing_container_keep_their_masks(to_init, to_step):
    params = {"Dense_0": _params()["Dense_0"]}
    # Pruned at step 0; step 1 keeps the masks. Both branches of the refresh's cond are
    # traced at every step, and they disagreed on the container: JAX's raw TypeError.
    tx = jp.prune(optax.sgd(1e-3), sparsity=0.5)
    p, state = _run(tx, to_init(params), to_step(params))
    masks = jp.get_masks(state)
    # The state follows the params' container, so its masks apply to them.
    assert type(masks) is type(to_step(params))
    want = jp.masks.topk(jp.criteria.magnitude(params), 0.5)
    np.testing.assert_array_equal(masks["Dense_0"]["kernel"], want["Dense_0"]["kernel"])
    pruned = ~want["Dense_0"]["kernel"]
    assert float(jnp.abs(p["Dense_0"]["kernel"][pruned]).max()) == 0.0
    assert float(jp.sparsity(p)) == 0.5


def test_nnx_state_at_init_pure_dict_at_update():
    model = jp.models.MLP((16, 8, 4), rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(state)
    tx = jp.prune(optax.sgd(1e-3), sparsity=0.5)
    p, st = _run(tx, state, pure, steps=2)
    assert isinstance(jp.get_masks(st), dict)
    assert float(jp.sparsity(p)) == pytest.approx(0.5)


# --- 3. A criterion's required keyword missing from tx.update --------------------------------


def _step(tx, params, **extra):
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    return jax.jit(functools.partial(tx.update, **extra))(grads, state, params)


def test_obd_without_hessian_diag_names_it_and_the_fix():
    params = _params()
    tx = jp.prune(optax.sgd(0.1), sparsity=0.5, criterion=jp.criteria.obd)
    fix = r"Fix: pass hessian_diag at every step: tx.update\(grads, state, params, hessian_diag="
    with pytest.raises(ValueError, match=r"obd needs the keyword argument hessian_diag.*" + fix):
        _step(tx, params)
    with pytest.raises(ValueError, match=r"obd does not take \['hessian'\] \(misspelt\?\)"):
        _step(tx, params, hessian=jax.tree.map(jnp.ones_like, params))
    h = jax.tree.map(jnp.ones_like, params)
    _, state = _step(tx, params, hessian_diag=h)  # given: it runs
    assert int((~jp.get_masks(state)["Dense_0"]["kernel"]).sum()) == 64


def test_wanda_and_stateful_criteria_missing_keyword():
    params = _params()
    tx = jp.prune(optax.sgd(0.1), sparsity=0.5, criterion=jp.criteria.wanda)
    with pytest.raises(ValueError, match=r"wanda needs the keyword argument input_norms.*nnx: "):
        _step(tx, params)

    crit = jp.criteria.StatefulCriterion(
        init=lambda p: (),
        update=lambda state, p, g, *, scale: state,
        score=lambda state, p: jp.criteria.magnitude(p),
    )
    tx = jp.prune(optax.sgd(0.1), sparsity=0.5, criterion=crit)
    with pytest.raises(ValueError, match=r"needs the keyword argument scale"):
        _step(tx, params)
    _step(tx, params, scale=2.0)
    # A criterion taking **kwargs requires nothing more; an optional keyword may be left out.
    kwargs_crit = lambda p, **kw: jp.criteria.magnitude(p)  # noqa: E731
    optional_crit = lambda p, *, s=1.0: jp.criteria.magnitude(p)  # noqa: E731
    for c in (kwargs_crit, optional_crit):
        _step(jp.prune(optax.sgd(0.1), sparsity=0.5, criterion=c), params, unused=1.0)


# --- 4. A selection without a `where` keyword ------------------------------------------------


def test_scope_without_where_is_refused_when_prune_is_built():
    with pytest.raises(ValueError, match=r"\(scores, sparsity, \*, where\).*<lambda>\(s, sp\)"):
        jp.prune(optax.sgd(0.1), sparsity=0.5, scope=lambda s, sp: jp.masks.topk(s, sp))
    # The library's selections, and ones taking where by **kwargs, are accepted.
    for scope in (
        lambda s, sp, **kw: jp.masks.topk(s, sp, **kw),
        functools.partial(jp.masks.structured, reduce="max"),
        functools.partial(jp.masks.global_topk, max_sparsity=0.9),
        jp.masks.per_layer(jp.masks.topk, stacked=lambda p, x: False),
        jp.distributions.selection(jp.distributions.erk),
        jp.masks.nm,
    ):
        jp.prune(optax.sgd(0.1), sparsity=0.5, scope=scope)


# --- 5. saliency and random: unfiltered equinox modules, complex leaves ----------------------


def test_saliency_and_random_name_an_unfiltered_equinox_leaf():
    model = eqx.nn.MLP(4, 2, 8, 1, key=jax.random.key(0))
    fix = r"params leaf 'activation' is a custom_jvp.*eqx.filter\(model, eqx.is_inexact_array\)"
    with pytest.raises(ValueError, match=fix):
        jp.criteria.saliency(model, model)
    with pytest.raises(ValueError, match=fix):
        jp.criteria.random(model, key=jax.random.key(0))
    params = eqx.filter(model, eqx.is_inexact_array)
    assert jax.tree.structure(jp.criteria.saliency(params, params)) == jax.tree.structure(params)


def test_saliency_of_complex_leaves_is_the_modulus_product():
    # Cast to float32, the imaginary part was dropped (with JAX's ComplexWarning): 1j scored 0.
    w = {"c": jnp.array([[1j, 1 + 0j, 3 - 4j]]), "r": jnp.array([[-2.0, 0.5]])}
    g = {"c": jnp.array([[1j, 2j, 1 + 0j]]), "r": jnp.array([[3.0, -4.0]])}
    s = jp.criteria.saliency(w, g)
    assert s["c"].dtype == jnp.float32 and s["c"].tolist() == [[1.0, 2.0, 5.0]]
    assert s["r"].tolist() == [[6.0, 2.0]]


# --- Params as nnx Params (nnx.split(model, nnx.Param)) with a weight-decaying inner optimizer ---


def test_nnx_param_params_with_adamw_weight_decay():
    # The inner optimizer got unwrapped params next to Param-wrapped updates, and
    # adamw's decay (a map over both) failed on the structure mismatch.
    model = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = jp.prune(optax.adamw(1e-2, weight_decay=0.1), sparsity=0.5)
    state = tx.init(params)
    loss = lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x) ** 2)  # noqa: E731
    grads = jax.grad(loss)(params, jnp.ones((2, 8)))
    updates, state = jax.jit(tx.update)(grads, state, params)
    new = optax.apply_updates(params, updates)
    assert isinstance(new["kernel"], nnx.Param)
    kernel = np.asarray(new["kernel"][...])
    assert (kernel == 0).sum() == 16  # exactly half of 8 x 4 pruned to 0
    # Decay reached the kept weights: same step as adamw on the masked params alone.
    pure = nnx.to_pure_dict(params)
    masks = jax.tree.unflatten(jax.tree.structure(pure), jax.tree.leaves(jp.get_masks(state)))
    ref_tx = optax.adamw(1e-2, weight_decay=0.1)
    masked = jp.apply_masks(pure, masks)
    g = jp.apply_masks(nnx.to_pure_dict(grads), masks)
    ref_u, _ = ref_tx.update(g, ref_tx.init(masked), masked)
    ref = jp.apply_masks(optax.apply_updates(masked, ref_u), masks)
    np.testing.assert_allclose(kernel, np.asarray(ref["kernel"]), rtol=1e-6, atol=1e-7)


def test_fused_per_layer_warns_when_stacked_matches_no_leaf():
    # The fused search never calls per_layer's selection, whose warning this was.
    params = {"params": {"blocks": {"kernel": jnp.ones((3, 8, 8)), "bias": jnp.zeros((3, 8))}}}
    scope = jp.masks.per_layer(jp.masks.topk, stacked=lambda path, leaf: path[0] == "layers")
    tx = jp.prune(optax.sgd(0.1), sparsity=0.5, scope=scope)
    with pytest.warns(UserWarning, match="stacked= matched none"):
        tx.init(params)
    ok = jp.masks.per_layer(jp.masks.topk, stacked=lambda path, leaf: "blocks" in path)
    jp.prune(optax.sgd(0.1), sparsity=0.5, scope=ok).init(params)  # no warning (errors in tests)
