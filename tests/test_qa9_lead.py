"""QA round 9, the lead's fixes: what jp.save records from an nnx.state(optimizer)."""

from __future__ import annotations

import warnings

import jax
import optax
import pytest
from flax import nnx

import jaxprune as jp


def _model_and_optimizer():
    model = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, jp.prune(optax.adam(1e-2), sparsity=0.5), wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(1), (4, 8))
    opt.update(model, nnx.grad(lambda m: (m(x) ** 2).mean())(model))  # masks refreshed
    return model, opt


def test_saving_nnx_state_of_the_optimizer_warns_that_no_masks_are_recorded(tmp_path):
    model, opt = _model_and_optimizer()
    _, state = nnx.split((model, opt))
    with pytest.warns(UserWarning, match=r"nnx.state\(optimizer\).*Fix: pass the nnx.Optimizer"):
        jp.save(tmp_path / "a", 1, state[0], state[1])  # was: silently no masks
    assert jp.restore(tmp_path / "a", params=state[0], opt_state=state[1]).masks is None


def test_saving_the_optimizer_itself_records_the_masks_without_warning(tmp_path):
    model, opt = _model_and_optimizer()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jp.save(tmp_path / "b", 1, nnx.state(model, nnx.Param), opt)
    masks = jp.restore(tmp_path / "b", params=nnx.state(model, nnx.Param), opt_state=opt).masks
    assert masks is not None
    assert float(masks["kernel"].mean()) == 0.5
    assert (masks["kernel"] == jp.get_masks(opt.opt_state)["kernel"]).all()


def _mlp_groups():
    import jax.numpy as jnp

    from jaxprune import structure

    def mlp(p, x):
        return jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"]

    p = {"w1": jnp.arange(12.0).reshape(3, 4), "b1": jnp.ones(4), "w2": jnp.ones((4, 2))}
    return structure, p, structure.groups(mlp, p, jnp.ones((1, 3)))


def test_round_to_that_undoes_a_groups_whole_cut_warns():
    structure, p, gs = _mlp_groups()
    scores = jp.criteria.magnitude(p)
    with pytest.warns(UserWarning, match=r"round_to=4 keeps every channel of group 0 \(4 channels"):
        m = structure.select(gs, scores, 0.25, round_to=4)  # was: nothing dropped, silently
    assert bool(m["w1"].all())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = structure.select(gs, scores, 0.75, round_to=2)  # 1 kept -> 2: still a cut
    assert int((~m["w1"]).all(axis=0).sum()) == 2
