"""Orbax checkpoints of a pruning run: bit-for-bit resume, nnx and linen, formats, errors."""

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxprune as jp
from jaxprune import checkpoint
from jaxprune.models import lenet_300_100


def _bits(tree):
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def _make_tx():
    schedule = jp.schedules.polynomial(0.0, 0.8, begin_step=0, end_step=8, frequency=2)
    return jp.prune(
        optax.adam(1e-2), sparsity=schedule, criterion=jp.criteria.random, key=jax.random.key(7)
    )


def _batch(i):
    k = jax.random.fold_in(jax.random.key(1), i)
    return jax.random.normal(k, (8, 12)), jax.random.randint(k, (8,), 0, 3)


def _linen_setup():
    model = linen.Sequential([linen.Dense(16), linen.relu, linen.Dense(3)])
    params = model.init(jax.random.key(0), jnp.ones((1, 12)))["params"]
    tx = _make_tx()

    @jax.jit
    def step(params, state, i):
        x, y = _batch(i)
        loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
            model.apply({"params": p}, x), y
        ).mean()
        grads = jax.grad(loss)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return params, tx, step


def test_linen_resume_is_bit_for_bit(tmp_path):
    params, tx, step = _linen_setup()
    state = tx.init(params)
    for i in range(4):
        params, state = step(params, state, i)
    checkpoint.save(tmp_path, 4, params, state)
    ref_p, ref_s = params, state
    for i in range(4, 10):
        ref_p, ref_s = step(ref_p, ref_s, i)

    fresh, tx2, _ = _linen_setup()
    ckpt = checkpoint.restore(tmp_path, params=fresh, opt_state=tx.init(fresh))
    assert ckpt.step == 4 and ckpt.format == "dense"
    assert jax.tree.structure(ckpt.opt_state) == jax.tree.structure(state)
    p, s = ckpt.params, ckpt.opt_state
    for i in range(ckpt.step, 10):
        p, s = step(p, s, i)
    assert _bits(p) == _bits(ref_p)
    assert _bits(jp.get_masks(s)) == _bits(jp.get_masks(ref_s))
    assert _bits(s) == _bits(ref_s)


def test_nnx_module_and_optimizer_restored_in_place_and_resume(tmp_path):
    def build(seed):
        model = lenet_300_100(rngs=nnx.Rngs(seed), in_features=12, num_classes=3)
        tx = jp.prune(optax.sgd(0.1, momentum=0.9), sparsity=jp.schedules.one_shot(0.7, 2))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def train(model, opt, x, y):
        loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()  # noqa: E731
        opt.update(model, nnx.grad(loss)(model))

    model, opt = build(0)
    for i in range(3):
        train(model, opt, *_batch(i))
    path = checkpoint.save(tmp_path / "run", 3, model, opt)
    assert path == tmp_path / "run" / "3"
    for i in range(3, 7):
        train(model, opt, *_batch(i))

    model2, opt2 = build(1)  # different init: every value must come from the file
    ckpt = checkpoint.restore(tmp_path / "run", params=model2, opt_state=opt2)
    assert _bits(ckpt.masks) == _bits(jp.get_masks(opt2.opt_state))
    for i in range(ckpt.step, 7):
        train(model2, opt2, *_batch(i))
    assert _bits(nnx.state(model2)) == _bits(nnx.state(model))
    assert _bits(jp.get_masks(opt2.opt_state)) == _bits(jp.get_masks(opt.opt_state))


def test_compressed_format_restores_params_and_masks_bitwise(tmp_path):
    params = {"w": jax.random.normal(jax.random.key(0), (256, 192)), "b": jnp.arange(192.0)}
    masks = jp.masks.topk(jp.criteria.magnitude(params), 0.9)
    params = jp.apply_masks(params, masks)
    dense_dir = checkpoint.save(tmp_path / "d", 0, params, masks=masks)
    comp_dir = checkpoint.save(tmp_path / "c", 0, params, masks=masks, format="compressed")
    assert checkpoint.disk_bytes(comp_dir) < checkpoint.disk_bytes(dense_dir)
    ckpt = checkpoint.restore(tmp_path / "c", params=params)
    assert ckpt.format == "compressed"
    assert _bits(ckpt.params) == _bits(params)
    assert _bits(ckpt.masks) == _bits(masks)


def test_masks_that_differ_from_the_nonzeros_are_stored(tmp_path):
    params = {"w": jnp.ones((8, 8))}  # a kept weight may be zero; here all are nonzero
    masks = {"w": jnp.eye(8, dtype=bool)}
    checkpoint.save(tmp_path, 1, params, masks=masks, format="compressed")
    ckpt = checkpoint.restore(tmp_path)
    assert isinstance(ckpt.params, dict) and set(ckpt.params) == {"w"}
    np.testing.assert_array_equal(ckpt.masks["w"], np.eye(8, dtype=bool))
    np.testing.assert_array_equal(ckpt.params["w"], np.ones((8, 8)))


def test_without_template_trees_come_back_as_nested_dicts(tmp_path):
    params, tx, _ = _linen_setup()
    checkpoint.save(tmp_path, 2, params, tx.init(params))
    ckpt = checkpoint.restore(tmp_path)
    assert set(ckpt.params) == {"layers_0", "layers_2"}
    assert ckpt.params["layers_0"]["kernel"].shape == (12, 16)
    assert isinstance(ckpt.opt_state, dict) and ckpt.masks["layers_0"]["kernel"].dtype == bool


def test_abstract_template_keys_and_python_scalars(tmp_path):
    tree = {"k": jax.random.key(3), "n": 5, "x": jnp.arange(4, dtype=jnp.int8)}
    checkpoint.save(tmp_path, 0, tree)
    abstract = jax.eval_shape(lambda: {"k": jax.random.key(0), "n": 0, "x": jnp.zeros(4, jnp.int8)})
    abstract["n"] = 0
    out = checkpoint.restore(tmp_path, params=abstract).params
    assert out["n"] == 5 and isinstance(out["n"], int)
    assert jax.random.key_data(out["k"]).tolist() == jax.random.key_data(tree["k"]).tolist()
    assert out["x"].dtype == jnp.int8 and out["x"].tolist() == [0, 1, 2, 3]
    untyped = checkpoint.restore(tmp_path).params  # no template: keys still come back as keys
    assert jax.dtypes.issubdtype(untyped["k"].dtype, jax.dtypes.prng_key)


def test_relative_path_is_made_absolute_and_steps_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for s in range(4):
        out = checkpoint.save("ckpts", s, {"w": jnp.full((2, 2), float(s))}, max_to_keep=2)
        assert out.is_absolute()
    assert checkpoint.latest_step("ckpts") == 3
    assert checkpoint.latest_step(tmp_path / "nothing") is None
    assert checkpoint.restore(tmp_path / "ckpts", 2).params["w"][0, 0] == 2.0
    assert checkpoint.restore(tmp_path / "ckpts" / "3").step == 3
    with pytest.raises(checkpoint.CheckpointError, match="is the directory of step 3, not 2"):
        checkpoint.restore(tmp_path / "ckpts" / "3", 2)
    with pytest.raises(checkpoint.CheckpointError, match=r"no step 0 .* steps saved: \[2, 3\]"):
        checkpoint.restore("ckpts", 0)
    with pytest.raises(checkpoint.CheckpointError, match=r"step 3 is already saved .* \(e.g. 4\)"):
        checkpoint.save("ckpts", 3, {"w": jnp.zeros((2, 2))})
    assert checkpoint.restore("ckpts", 3).params["w"][0, 0] == 3.0  # untouched
    with pytest.raises(ValueError, match=r"step must be a non-negative int or None .*got '3'"):
        checkpoint.restore("ckpts", "3")


def test_structure_mismatch_lists_the_differing_paths(tmp_path):
    checkpoint.save(tmp_path, 0, {"a": jnp.zeros((2, 3)), "b": jnp.zeros(3), "c": jnp.zeros(1)})
    template = {"a": jnp.zeros((2, 4)), "b": jnp.zeros(3), "d": jnp.zeros(1)}
    with pytest.raises(
        ValueError,
        match=r"only in the checkpoint: c; only in the template: d; "
        r"a: checkpoint float32\[2, 3\] vs template float32\[2, 4\]",
    ):
        checkpoint.restore(tmp_path, params=template)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="format must be one of .* got 'zip'"):
        checkpoint.save("/tmp/unused", 0, {}, format="zip")
    with pytest.raises(ValueError, match="step must be a non-negative int, got -1"):
        checkpoint.save("/tmp/unused", -1, {})


def test_home_relative_path_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    out = checkpoint.save("~/ckpts", 1, {"w": jnp.ones((2, 2))})
    assert out.is_relative_to(tmp_path / "ckpts") and not (tmp_path / "~").exists()
    assert checkpoint.restore("~/ckpts").step == 1


def test_paths_that_are_not_checkpoints_say_so(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(checkpoint.CheckpointError, match="is a file, not a checkpoint"):
        checkpoint.restore(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="holds no step directory"):
        checkpoint.restore(tmp_path / "empty")
    (tmp_path / "killed" / "3.orbax-checkpoint-tmp-12").mkdir(parents=True)
    with pytest.raises(checkpoint.CheckpointError, match="only an unfinished .*save"):
        checkpoint.restore(tmp_path / "killed")


def test_restoring_an_optimizer_from_a_params_only_checkpoint_raises(tmp_path):
    params = {"w": jnp.ones((2, 2))}
    checkpoint.save(tmp_path / "ck", 1, params)  # what `jaxprune export` writes: no opt_state
    state = optax.adam(1e-3).init(params)
    with pytest.raises(checkpoint.CheckpointError, match="holds no optimizer state"):
        checkpoint.restore(tmp_path / "ck", params=params, opt_state=state)
    assert checkpoint.restore(tmp_path / "ck", params=params).opt_state is None
