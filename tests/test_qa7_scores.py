"""QA round 7: unscored kernels under per-layer selections, APoZ on BatchNorm models,
and OBD with a Hessian diagonal estimate that has negative entries."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxprune as jp
from jaxprune.models import MLP, VGGSmall


def _mlp_scores():
    model = MLP((8, 6, 4, 4), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (32, 8))
    _, caps = jp.activations.capture_nnx(model, x)
    per_unit = jp.activations.mean_abs(caps)
    del per_unit["layers/2"]  # leave the logits unscored: they must stay dense
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return params, per_unit, jp.activations.unit_scores(params, per_unit)


def test_scored_where_keeps_unscored_kernels_dense_under_per_layer_selections():
    params, per_unit, scores = _mlp_scores()
    logits = lambda m: np.asarray(jnp.broadcast_to(m["layers"][2]["kernel"], (4, 4)))
    # The hazard: +inf alone does not protect a kernel from a per-layer selection.
    assert (~logits(jp.masks.topk(scores, 0.5))).sum() == 8
    assert (~logits(jp.masks.structured(scores, 0.5, reduce="max"))).all(0).sum() == 2

    where = jp.activations.scored_where(per_unit)
    for sel in (
        lambda s: jp.masks.topk(s, 0.5, where=where),
        lambda s: jp.masks.structured(s, 0.5, reduce="max", where=where),
    ):
        m = sel(scores)
        assert logits(m).all()
        for i in (0, 1):
            k = np.asarray(m["layers"][i]["kernel"])
            assert (~k).sum() == k.size // 2
    # Only the structured selection prunes whole units: the lowest mean |a|.
    m = jp.masks.structured(scores, 0.5, reduce="max", where=where)
    kept = np.asarray(m["layers"][0]["kernel"]).all(0)
    low = np.argsort(np.asarray(per_unit["layers/0"]), kind="stable")[:3]
    assert not kept[low].any() and kept.sum() == 3


def test_scored_where_in_jp_prune_leaves_the_unscored_layer_alone():
    params, per_unit, _ = _mlp_scores()
    tx = jp.prune(
        optax.sgd(0.0),
        sparsity=0.5,
        criterion=lambda p: jp.activations.unit_scores(p, per_unit),
        where=jp.activations.scored_where(per_unit),
    )
    _, st = tx.update(params, tx.init(params), params)
    masks = jp.get_masks(st)
    assert np.asarray(masks["layers"][2]["kernel"]).all()
    assert (~np.asarray(masks["layers"][0]["kernel"])).sum() == 24


def test_scored_where_refuses_bad_per_unit():
    with pytest.raises(ValueError, match="per_unit is empty"):
        jp.activations.scored_where({})
    with pytest.raises(ValueError, match="must be a dict"):
        jp.activations.scored_where([jnp.ones(3)])


def _vgg_with_batchnorm_stats():
    model = VGGSmall(rngs=nnx.Rngs(0), cfg=(6, "M"), hidden=8, image_size=8)
    bn = model.bns[0]
    # Running statistics far from the identity, as after training: BN shifts
    # and flips channels, so relu(BN(conv)) and relu(conv) differ.
    k = jax.random.split(jax.random.key(2), 3)
    bn.mean.set_value(jax.random.normal(k[0], (6,)))
    bn.scale.set_value(jnp.array([1.0, -1.0, 2.0, -0.5, 1.0, -2.0]))
    bn.bias.set_value(0.5 * jax.random.normal(k[2], (6,)))
    model.eval()
    return model


def test_apoz_after_batchnorm_by_rekeying_the_batchnorm_captures():
    model = _vgg_with_batchnorm_stats()
    x = jax.random.normal(jax.random.key(3), (32, 8, 8, 1))
    _, conv_caps = jp.activations.capture_nnx(model, x)
    _, bn_caps = jp.activations.capture_nnx(model, x, types=(nnx.BatchNorm,))
    # The recipe of apoz's docstring.
    per_unit = {k.replace("bns", "convs"): v for k, v in jp.activations.apoz(bn_caps).items()}
    act = jax.nn.relu(model.bns[0](model.convs[0](x)))  # what the network's ReLU gives
    true = np.asarray(jnp.mean(act.reshape(-1, 6) != 0, axis=0))
    np.testing.assert_allclose(np.asarray(per_unit["convs/0"]), true)
    # The default captures score relu(conv output), a different ranking.
    naive = np.asarray(jp.activations.apoz(conv_caps)["convs/0"])
    assert np.abs(naive - true).max() > 0.3
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    s = jp.activations.unit_scores(params, per_unit)["convs"][0]["kernel"]
    np.testing.assert_allclose(np.asarray(s)[0, 0, 0], true)
    # Passed without re-keying, the error says how to.
    with pytest.raises(ValueError, match=r"bns/0.*normalization layers.*re-key"):
        jp.activations.unit_scores(params, jp.activations.apoz(bn_caps))


def test_batchnorm_caveat_is_documented_in_apoz_mean_abs_and_the_module():
    for doc in (
        jp.activations.__doc__,
        jp.activations.apoz.__doc__,
        jp.activations.mean_abs.__doc__,
    ):
        assert "BatchNorm" in doc and "re-key" in doc


def _negative_hutchinson():
    # loss = 0.5 w^T H w: diag(H) = (1, 1, 1) > 0, but with one probe the
    # coupling H_01 = 3 gives v0 (H v)_0 = 1 + 3 v0 v1, i.e. -2 when v0 != v1.
    hess = jnp.array([[1.0, 3.0, 0.0], [3.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    loss = lambda p: 0.5 * p["w"] @ hess @ p["w"]
    w = {"w": jnp.array([3.0, 1.0, 0.5])}  # exact saliencies 4.5, 0.5, 0.125
    for seed in range(20):
        h = jp.criteria.hutchinson_diag(loss, w, key=jax.random.key(seed), num_samples=1)
        if float(h["w"][0]) < 0:
            return w, h
    raise AssertionError("no probe key gave a negative estimate")


def test_obd_negative_option_on_a_negative_hutchinson_estimate():
    w, h = _negative_hutchinson()
    np.testing.assert_allclose(np.asarray(h["w"]), [-2.0, -2.0, 1.0])
    every = lambda path, x: True  # the default where skips 1-D leaves
    pruned = lambda s: np.flatnonzero(~jp.masks.topk(s, 1 / 3, where=every)["w"]).tolist()
    keep = jp.criteria.obd(w, h)
    np.testing.assert_allclose(np.asarray(keep["w"]), [-9.0, -1.0, 0.125])
    assert pruned(keep) == [0]  # the largest weight goes first
    assert jp.criteria.obd(w, h, negative="keep")["w"].tolist() == keep["w"].tolist()
    clip = jp.criteria.obd(w, h, negative="clip")
    np.testing.assert_allclose(np.asarray(clip["w"]), [0.0, 0.0, 0.125])
    assert pruned(clip) == [0]  # ties at 0, still before every positive saliency
    ab = jp.criteria.obd(w, h, negative="abs")
    np.testing.assert_allclose(np.asarray(ab["w"]), [9.0, 1.0, 0.125])
    assert pruned(ab) == [2]  # as with the exact diagonal
    assert pruned(jp.criteria.obd(w, {"w": jnp.ones(3)})) == [2]
    for bad in ("relu", None, True):
        with pytest.raises(ValueError, match="negative must be one of"):
            jp.criteria.obd(w, h, negative=bad)


def test_obd_negative_abs_inside_jp_prune():
    w, h = _negative_hutchinson()
    for negative, want in (("keep", [False, True, True]), ("abs", [True, True, False])):
        crit = functools.partial(jp.criteria.obd, negative=negative)
        tx = jp.prune(optax.sgd(0.0), sparsity=1 / 3, criterion=crit, where=lambda *_: True)
        step = jax.jit(
            functools.partial(lambda tx, p, s, h: tx.update(p, s, p, hessian_diag=h), tx)
        )
        _, st = step(w, tx.init(w), h)
        assert np.asarray(jp.get_masks(st)["w"]).tolist() == want


def test_negative_estimates_are_documented_in_obd_and_hutchinson_diag():
    for fn in (jp.criteria.obd, jp.criteria.hutchinson_diag):
        assert "negative" in fn.__doc__ and "fisher_diag" in fn.__doc__
