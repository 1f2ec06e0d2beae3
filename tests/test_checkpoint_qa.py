"""Checkpoint QA findings: max_to_keep, leaf order, damaged metadata, bad masks, failed saves."""

import importlib
import json
import pathlib
import shutil
import threading
import typing

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune as jp
from jaxprune import checkpoint, cli


def _bits(tree):
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def _steps(root: pathlib.Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


# -- 1. max_to_keep ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_invalid_max_to_keep_is_refused_before_anything_is_deleted(tmp_path, bad):
    p = {"w": np.ones((4, 4), np.float32)}
    checkpoint.save(tmp_path, 1, p)
    checkpoint.save(tmp_path, 2, p)
    with pytest.raises(ValueError, match=r"max_to_keep must be None .* int >= 1, got .*Fix:"):
        checkpoint.save(tmp_path, 3, p, max_to_keep=bad)
    assert checkpoint.latest_step(tmp_path) == 2
    assert [s for s in _steps(tmp_path) if s.isdigit()] == ["1", "2"]


def test_max_to_keep_follows_save_order(tmp_path):
    # Documented: orbax keeps the most recently saved steps, not the highest.
    p = {"w": np.ones(3, np.float32)}
    checkpoint.save(tmp_path, 10, p)
    checkpoint.save(tmp_path, 3, p, max_to_keep=np.int64(1))
    assert checkpoint.latest_step(tmp_path) == 3 and not (tmp_path / "10").exists()


# -- 5. leaves matched by path, not position ----------------------------------------------------


class Layer(typing.NamedTuple):
    w: jax.Array  # fields not in sorted order: an export stores them as b, w
    b: jax.Array


@pytest.mark.parametrize("fmt", ["dense", "compressed"])
def test_export_of_a_namedtuple_restores_into_its_template(tmp_path, fmt):
    params = Layer(
        w=jnp.arange(8.0).reshape(2, 4) * (jnp.arange(8).reshape(2, 4) % 2), b=jnp.ones(4)
    )
    masks = Layer(w=params.w != 0, b=jnp.bool_(True))
    checkpoint.save(tmp_path / "src", 0, params, masks=masks)
    checkpoint.export(tmp_path / "src", tmp_path / "dst", format=fmt)
    ckpt = checkpoint.restore(tmp_path / "dst", params=params)
    assert isinstance(ckpt.params, Layer) and _bits(ckpt.params) == _bits(params)
    assert isinstance(ckpt.masks, Layer) and _bits(ckpt.masks) == _bits(masks)
    # The abstract template works as well.
    abstract = jax.eval_shape(lambda: params)
    assert _bits(checkpoint.restore(tmp_path / "dst", params=abstract).params) == _bits(params)


def test_template_mismatch_is_still_reported_with_paths(tmp_path):
    checkpoint.save(tmp_path, 0, Layer(w=jnp.zeros((2, 4)), b=jnp.zeros(4)))
    with pytest.raises(ValueError, match=r"w: checkpoint float32\[2, 4\] vs template float32\[4\]"):
        checkpoint.restore(tmp_path, params=Layer(w=jnp.zeros(4), b=jnp.zeros(4)))


# -- 7. damaged metadata ------------------------------------------------------------------------


def _meta_file(step_dir: pathlib.Path) -> pathlib.Path:
    return step_dir / "meta" / "metadata"


def _damage(step_dir: pathlib.Path, old: str, new: str) -> None:
    f = _meta_file(step_dir)
    text = f.read_text()
    assert old in text
    f.write_text(text.replace(old, new, 1))


def _legacy(step_dir: pathlib.Path) -> None:
    """Rewrites the metadata as written before it carried its CRC-32."""
    f = _meta_file(step_dir)
    meta = json.loads(f.read_text())
    del meta["meta_crc32"]
    f.write_text(json.dumps(meta))


_PARAMS = {"w": np.eye(8, dtype=np.float32), "b": np.arange(8, dtype=np.float32)}
_DAMAGE = [
    ('"format"', '"xormat"'),
    ('"float32"', '"xloat32"'),
    ('"path": ["w"]', '"path": ["x"]'),
    ('"kind": "', '"kind": "x'),
    ('"arrays": {', '"arrays": {"x": 1, '),
]


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("old,new", _DAMAGE)
def test_damaged_metadata_raises_checkpoint_error_naming_the_step(tmp_path, old, new, legacy):
    step_dir = checkpoint.save(tmp_path, 0, _PARAMS, masks={"w": np.eye(8, dtype=bool)})
    if legacy:
        _legacy(step_dir)
        assert _bits(checkpoint.restore(tmp_path).params) == _bits(_PARAMS)  # no checksum: fine
    _damage(step_dir, old, new)
    with pytest.raises(checkpoint.CheckpointError, match=f"metadata of {step_dir} is damaged"):
        checkpoint.restore(tmp_path)


def test_renamed_path_is_detected_by_the_metadata_checksum(tmp_path):
    step_dir = checkpoint.save(tmp_path, 0, _PARAMS, masks={"w": np.eye(8, dtype=bool)})
    _damage(
        step_dir, '"path": ["w"], "shape": [8, 8], "kind"', '"path": ["x"], "shape": [8, 8], "kind"'
    )
    with pytest.raises(checkpoint.CheckpointError, match="CRC-32 mismatch of the metadata"):
        checkpoint.restore(tmp_path, params=_PARAMS)


def test_damaged_checksum_field_name_is_detected(tmp_path):
    step_dir = checkpoint.save(tmp_path, 0, _PARAMS)
    _damage(step_dir, '"meta_crc32"', '"meta_crc3x"')
    with pytest.raises(checkpoint.CheckpointError, match=r"unknown fields \['meta_crc3x'\]"):
        checkpoint.restore(tmp_path)


@pytest.mark.parametrize("legacy", [False, True])
def test_single_character_damage_never_escapes_as_another_error(tmp_path, legacy):
    src = checkpoint.save(tmp_path / "src", 0, _PARAMS, masks={"w": np.eye(8, dtype=bool)})
    if legacy:
        _legacy(src)
    text = _meta_file(src).read_text()
    rng = np.random.default_rng(0)
    for n, pos in enumerate(rng.choice(len(text), size=25, replace=False)):
        work = tmp_path / f"w{n}"
        shutil.copytree(tmp_path / "src", work)
        ch = "x" if text[pos] != "x" else "1"
        _meta_file(work / "0").write_text(text[:pos] + ch + text[pos + 1 :])
        try:
            ckpt = checkpoint.restore(work)
        except checkpoint.CheckpointError as e:
            assert str(work / "0") in str(e)
            continue
        # Accepted only when no array changed; with the checksum, no path either.
        if legacy:
            assert sorted(_bits(ckpt.params)) == sorted(_bits(_PARAMS)), (pos, ch)
        else:
            assert _bits(ckpt.params) == _bits(_PARAMS) and sorted(ckpt.params) == ["b", "w"]


@pytest.mark.parametrize("field,value", [("dtype", "xloat32"), ("kind", None), ("shape", "ab")])
def test_unpack_leaf_reports_a_malformed_spec_as_pack_error(field, value):
    from jaxprune import packing

    arrays, spec = packing.pack_leaf(np.eye(3, dtype=np.float32))
    spec = (
        dict(spec, **{field: value})
        if value is not None
        else {k: v for k, v in spec.items() if k != field}
    )
    with pytest.raises(packing.PackError, match="malformed leaf spec"):
        packing.unpack_leaf(arrays, spec)


def test_cli_prints_one_line_for_damaged_metadata(tmp_path, capsys):
    step_dir = checkpoint.save(tmp_path, 0, _PARAMS)
    _legacy(step_dir)
    _damage(step_dir, '"float32"', '"xloat32"')
    assert cli.main(["inspect", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("jaxprune: error: the metadata of") and err.count("\n") == 1


# -- 6 (CLI part). report errors are one line ---------------------------------------------------


@pytest.mark.parametrize("exc", [ValueError("bad masks. Fix: x."), RuntimeError("boom")])
def test_inspect_turns_report_errors_into_one_line(tmp_path, capsys, monkeypatch, exc):
    report_module = importlib.import_module("jaxprune.report")  # jaxprune.report: the function
    checkpoint.save(tmp_path, 4, _PARAMS)

    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(report_module, "report", fail)
    assert cli.main(["inspect", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"jaxprune: error: cannot report on {tmp_path / '4'} (step 4): ")
    assert str(exc) in err and err.count("\n") == 1


# -- 8. masks validated against params ----------------------------------------------------------


@pytest.mark.parametrize("fmt", ["dense", "compressed"])
@pytest.mark.parametrize(
    "masks,match",
    [
        (
            {"w": np.ones((4, 4), bool)},
            r"masks leaf 'w' has shape \(4, 4\) but the params leaf 'w' has shape \(2, 8\)",
        ),
        ({"w": np.ones((2, 8), bool), "zz": np.ones(3, bool)}, r"masks leaf 'zz' .*no params"),
        ({"w": np.ones((2, 8), bool), "zz": np.zeros(0, bool)}, r"masks leaf 'zz' .*no params"),
        ({"sub": np.ones(2, bool)}, r"masks leaf 'sub' has shape \(2,\) but stands for"),
    ],
)
def test_save_checks_masks_against_params(tmp_path, fmt, masks, match):
    params = {"w": np.ones((2, 8), np.float32), "sub": {"a": np.ones(2, np.float32)}}
    with pytest.raises(ValueError, match=match + r".*Fix: .*jp\.get_masks\(opt_state\)"):
        checkpoint.save(tmp_path / "ck", 0, params, masks=masks, format=fmt)
    assert not (tmp_path / "ck").exists() or not any((tmp_path / "ck").iterdir())


@pytest.mark.parametrize("fmt", ["dense", "compressed"])
def test_prefix_masks_of_optax_masked_are_saved(tmp_path, fmt):
    k = jax.random.key(0)
    params = {
        "enc": {"kernel": jax.random.normal(k, (16, 16)), "bias": jnp.zeros(16)},
        "head": {"kernel": jax.random.normal(k, (16, 4))},
    }
    tx = optax.masked(jp.prune(optax.sgd(0.1), sparsity=0.5), {"enc": True, "head": False})
    st = tx.init(params)
    upd, st = tx.update(jax.tree.map(jnp.ones_like, params), st, params)
    params = optax.apply_updates(params, upd)
    masks = jp.get_masks(st)
    assert jax.tree.structure(masks) != jax.tree.structure(params)  # head: one scalar
    checkpoint.save(tmp_path, 1, params, masks=masks, format=fmt)
    ckpt = checkpoint.restore(tmp_path, params=params)
    assert _bits(ckpt.params) == _bits(params) and _bits(ckpt.masks) == _bits(masks)


def test_empty_masks_are_stored_without_bits(tmp_path):
    keys = jax.random.split(jax.random.key(0), 0)  # a PRNG key leaf: no host copy to compare with
    params = {"k": keys, "e": np.zeros((0, 4), np.float32), "w": np.ones((2, 2), np.float32)}
    masks = {"k": np.zeros((0,), bool), "e": np.zeros((0, 4), bool), "w": np.eye(2)}
    checkpoint.save(tmp_path, 0, params, masks=masks, format="compressed")
    ckpt = checkpoint.restore(tmp_path)
    assert ckpt.masks["k"].shape == (0,) and ckpt.masks["e"].shape == (0, 4)
    np.testing.assert_array_equal(ckpt.masks["w"], np.eye(2, dtype=bool))  # float: cast to bool


def test_unstorable_dtype_is_refused_before_orbax_starts(tmp_path):
    params = {"w": np.ones((2, 8), np.float32), "name": np.array(["a", "b"])}
    with pytest.raises(ValueError, match=r"params leaf 'name' has dtype <U1, which orbax"):
        checkpoint.save(tmp_path / "ck", 0, params)
    assert not (tmp_path / "ck").exists() or not any((tmp_path / "ck").iterdir())


# -- 9. a failed save leaves no writer and no partial step -----------------------------------------


def _orbax_threads():
    from orbax.checkpoint._src.futures import future

    return {t for t in threading.enumerate() if isinstance(t, future._SignalingThread)}


def test_failed_save_inside_orbax_is_cleaned_up(tmp_path):
    from jaxprune import checkpoint_orbax

    # What a refusal inside orbax's save looks like: the params writes start, masks fail.
    items = {
        "params": {f"a{i:05d}": {"values": np.ones((64, 64), np.float32)} for i in range(8)},
        "masks": {"m00000": {"bits": np.zeros((0,), np.uint8)}},
    }
    meta = {"jaxprune_checkpoint": 1, "format": "dense", "step": 0, "params": []}
    before = _orbax_threads()
    with pytest.raises(ValueError, match="zero size"):
        checkpoint_orbax._write(tmp_path, 0, items, meta, None)
    assert not [t for t in _orbax_threads() - before if t.is_alive()]
    assert not list(tmp_path.glob("0.orbax-checkpoint-tmp*"))
    checkpoint.save(tmp_path, 0, {"w": np.ones(3, np.float32)})
    assert checkpoint.restore(tmp_path).params["w"].tolist() == [1.0, 1.0, 1.0]


def test_failed_save_releases_a_writer_waiting_for_a_signal(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp
    from orbax.checkpoint._src.futures import future, synchronization

    signal = synchronization.HandlerAwaitableSignal.STEP_DIRECTORY_CREATION
    started = []

    def failing_save(self, step, *args, **kwargs):
        # A commit thread waiting for a signal that the failed save never sends (orbax
        # would wait 300 s, keeping the interpreter alive), and a temporary step directory.
        (pathlib.Path(self.directory) / f"{step}.orbax-checkpoint-tmp").mkdir()

        async def write():
            return None

        started.append(future.CommitFuture(write(), receive_signals=[signal]))
        raise ValueError("refused by orbax")

    monkeypatch.setattr(ocp.CheckpointManager, "save", failing_save)
    try:
        with pytest.raises(ValueError, match="refused by orbax"):
            checkpoint.save(tmp_path, 0, {"w": np.ones(3, np.float32)})
        assert not started[0]._t.is_alive()
        assert not list(tmp_path.glob("0.orbax-checkpoint-tmp*"))
    finally:  # never leave the thread waiting, even when the test fails
        for f in started:
            future.set_signals([signal], operation_id=f._t._operation_id)
    monkeypatch.undo()
    checkpoint.save(tmp_path, 0, {"w": np.ones(3, np.float32)})
    assert checkpoint.latest_step(tmp_path) == 0


# -- 10. latest_step of a step directory; export --format help ------------------------------------


def test_latest_step_accepts_a_step_directory(tmp_path):
    checkpoint.save(tmp_path, 3, _PARAMS)
    checkpoint.save(tmp_path, 5, _PARAMS)
    assert checkpoint.latest_step(tmp_path) == 5
    assert checkpoint.latest_step(tmp_path / "3") == 3  # as restore(tmp_path / "3") reads
    assert checkpoint.restore(tmp_path / "3").step == 3


def test_export_format_has_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["export", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "compressed: each params leaf in its smallest exact sparse encoding (the default)" in out


# -- Python scalars saved, restored into a JAX template -------------------------------------


@pytest.mark.parametrize("fmt", ["dense", "compressed"])
def test_python_scalar_leaves_restore_into_a_jax_template(tmp_path, fmt):
    # TrainState.create sets step=0 (a Python int, stored by numpy as int64); the
    # template built from a trained state has a JAX int32 there.
    jp.save(tmp_path / "c", 0, {"step": 3, "lr": 0.1, "on": True}, format=fmt)
    tm = {"step": jnp.zeros((), jnp.int32), "lr": jnp.zeros((), jnp.float32), "on": False}
    got = jp.restore(tmp_path / "c", params=tm).params
    assert got["step"].dtype == jnp.int32 and int(got["step"]) == 3
    assert got["lr"].dtype == jnp.float32 and float(got["lr"]) == np.float32(0.1)
    assert got["on"] is True
    # A saved int32 array still refuses a float template: only Python scalars widen.
    with pytest.raises(ValueError, match="step: checkpoint int64"):
        jp.restore(tmp_path / "c", params=dict(tm, step=jnp.zeros((), jnp.float32)))


def test_python_int_too_big_for_the_template_dtype_is_refused(tmp_path):
    jp.save(tmp_path / "c", 0, {"n": 2**40})
    with pytest.raises(ValueError, match="saved as the Python int 1099511627776, which the "):
        jp.restore(tmp_path / "c", params={"n": jnp.zeros((), jnp.int32)})


@pytest.mark.parametrize("fmt", ["dense", "compressed"])
def test_python_scalars_restore_into_numpy_scalar_templates_in_their_dtype(tmp_path, fmt):
    jp.save(tmp_path / "c", 0, {"i": 3, "f": 0.1, "a": np.ones(2, np.float32)}, format=fmt)
    tm = {"i": np.int8(0), "f": np.float32(0), "a": np.zeros(2, np.float32)}
    got = jp.restore(tmp_path / "c", params=tm).params
    assert type(got["i"]) is np.int8 and got["i"] == 3
    assert type(got["f"]) is np.float32 and got["f"] == np.float32(0.1)
    assert isinstance(got["a"], np.ndarray) and got["a"].dtype == np.float32
    # A NumPy int8 refuses what it cannot hold, as a jnp.int8 template does.
    jp.save(tmp_path / "d", 0, {"i": 300})
    with pytest.raises(ValueError, match="saved as the Python int 300, which the template's int8"):
        jp.restore(tmp_path / "d", params={"i": np.int8(0)})


@pytest.mark.parametrize("fmt", ["dense", "compressed"])
def test_variable_wrapped_state_template_restores_in_its_variables(tmp_path, fmt):
    from flax import nnx

    model = nnx.Sequential(nnx.Linear(8, 8, rngs=nnx.Rngs(0)), nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
    state = nnx.state(model, nnx.Param)
    masks = jp.masks.topk(jp.criteria.magnitude(state), 0.5)
    jp.save(tmp_path / "c", 0, jp.apply_masks(state, masks), masks=masks, format=fmt)
    template = nnx.state(
        nnx.Sequential(nnx.Linear(8, 8, rngs=nnx.Rngs(5)), nnx.Linear(8, 2, rngs=nnx.Rngs(6))),
        nnx.Param,
    )
    ckpt = jp.restore(tmp_path / "c", params=template)
    assert jax.tree.structure(ckpt.params) == jax.tree.structure(state)
    assert isinstance(ckpt.params["layers"][0]["kernel"], nnx.Param)
    assert _bits(ckpt.params) == _bits(jp.apply_masks(state, masks))
    assert jax.tree.structure(ckpt.masks) == jax.tree.structure(state)
    assert _bits(ckpt.masks) == _bits(masks)
    # A Module template is updated in place; the params come back as its nnx.state.
    fresh = nnx.Sequential(nnx.Linear(8, 8, rngs=nnx.Rngs(7)), nnx.Linear(8, 2, rngs=nnx.Rngs(8)))
    ckpt = jp.restore(tmp_path / "c", params=fresh)
    assert _bits(nnx.state(fresh, nnx.Param)) == _bits(jp.apply_masks(state, masks))
    assert jax.tree.structure(ckpt.params) == jax.tree.structure(nnx.state(fresh))


@pytest.mark.parametrize("fmt", ["dense", "compressed"])
def test_trained_train_state_restores_into_a_fresh_create_template(tmp_path, fmt):
    # The trained state's step is a JAX int32; TrainState.create's is the
    # Python int 0. The fresh template takes the saved step as a Python int.
    import flax.linen as nn
    from flax.training import train_state

    model = nn.Dense(6)
    params = model.init(jax.random.key(0), jnp.ones((1, 8)))["params"]
    tx = jp.prune(optax.adam(1e-2), sparsity=0.5)

    def fresh():
        return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

    @jax.jit
    def step(state):
        def loss(p):
            return jnp.sum(model.apply({"params": p}, jnp.ones((2, 8))) ** 2)

        return state.apply_gradients(grads=jax.grad(loss)(state.params))

    state = step(step(fresh()))
    checkpoint.save(tmp_path, int(state.step), state, format=fmt)
    got = checkpoint.restore(tmp_path, params=fresh()).params
    assert type(got.step) is int and got.step == 2
    assert _bits(got.params) == _bits(state.params)
    np.testing.assert_array_equal(
        jp.get_masks(got.opt_state)["kernel"], jp.get_masks(state.opt_state)["kernel"]
    )
    assert int((~jp.get_masks(got.opt_state)["kernel"]).sum()) == 24
    # A Python float template leaf does not take the saved int32 step.
    bad = fresh().replace(step=0.0)
    with pytest.raises(ValueError, match=r"step: checkpoint int32\[\] vs template"):
        checkpoint.restore(tmp_path, params=bad)


@pytest.mark.parametrize(
    ("mask", "match"),
    [
        (np.full((2, 2), 0.5, np.float32), r"masks leaf 'w' has dtype float32 and holds 0\.5"),
        (np.array([[2, 0], [0, 1]]), r"masks leaf 'w' has dtype int64 and holds 2"),
        ("keep", r"masks leaf 'w' is not a bool array \(a str of dtype <U4\)"),
        (object(), r"masks leaf 'w' is not a bool array \(a object of dtype object\)"),
    ],
    ids=["scores", "counts", "string", "object"],
)
def test_masks_that_are_not_bool_or_zero_one_are_refused_before_writing(tmp_path, mask, match):
    # They were cast to bool: every nonzero score, a string, any object read as True.
    params = {"w": np.ones((2, 2), np.float32)}
    with pytest.raises(ValueError, match=match):
        checkpoint.save(tmp_path, 0, params, masks={"w": mask}, format="compressed")
    assert not (tmp_path / "0").exists()
    # 0/1 numbers are masks written as numbers: cast, as before.
    checkpoint.save(tmp_path, 1, params, masks={"w": np.eye(2, dtype=np.int32)})
    np.testing.assert_array_equal(checkpoint.restore(tmp_path).masks["w"], np.eye(2, dtype=bool))
