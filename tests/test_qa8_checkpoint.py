"""QA8 checkpoint findings: a linen BatchNorm TrainState saved with masks over its params
(linen #2), a whole equinox module as restore's template (equinox #5), and -0.0 outside the
masks in a compressed save (resume_report #3)."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

import jaxprune as jp
from jaxprune import checkpoint, cli


def _bits(x):
    """Dtype, shape and bytes of a leaf (PRNG keys as their data): equal iff bitwise equal."""
    if jax.dtypes.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    x = np.asarray(x)
    return x.dtype.name, x.shape, x.tobytes()


def _bitwise(a, b):
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        _bits(x) == _bits(y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


# -- linen #2: masks over a TrainState's params, saved with the whole variables ---------------


class _BNNet(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(8, (3, 3))(x)))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


class _TrainState(train_state.TrainState):
    batch_stats: dict


def _bn_state():
    model, x = _BNNet(), jnp.ones((2, 6, 6, 1))
    v = model.init(jax.random.key(0), x)
    tx = jp.prune(optax.adam(1e-2), sparsity=0.5)
    st = _TrainState.create(
        apply_fn=model.apply, params=v["params"], tx=tx, batch_stats=v["batch_stats"]
    )

    def loss(p, bs):
        y, upd = model.apply(
            {"params": p, "batch_stats": bs}, x, train=True, mutable=["batch_stats"]
        )
        return jnp.mean(y**2), upd["batch_stats"]

    for _ in range(2):
        g, bs = jax.grad(loss, has_aux=True)(st.params, st.batch_stats)
        st = st.apply_gradients(grads=g).replace(batch_stats=bs)
    return st


def test_linen_batchnorm_trainstate_saves_with_masks_over_params(tmp_path, capsys):
    st = _bn_state()
    variables = {"params": st.params, "batch_stats": st.batch_stats}
    masks = jp.get_masks(st.opt_state)
    # The masks from opt_state (the default), and the same masks passed explicitly.
    checkpoint.save(tmp_path / "a", 2, variables, st.opt_state, format="compressed")
    checkpoint.save(tmp_path / "b", 2, variables, st.opt_state, masks=masks)

    for name in ("a", "b"):
        ck = checkpoint.restore(tmp_path / name, params=variables, opt_state=st.opt_state)
        assert _bitwise(ck.params, variables) and _bitwise(ck.opt_state, st.opt_state)
        assert _bitwise(ck.masks, masks)
        # Recorded under params/, the batch statistics without a mask.
        raw = checkpoint.restore(tmp_path / name, params=variables)
        assert set(raw.masks) == {"params"}
        np.testing.assert_array_equal(
            raw.masks["params"]["Dense_0"]["kernel"], masks["Dense_0"]["kernel"]
        )
        assert float(jp.sparsity(jp.apply_masks(st.params, masks))) == pytest.approx(0.5, 0.01)

    assert cli.main(["inspect", str(tmp_path / "a"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = {r["path"]: r for r in data["rows"]}
    assert rows["params/Dense_0/kernel"]["sparsity"] == pytest.approx(0.5)
    # The running statistics are state, listed apart from the parameters.
    assert "batch_stats/BatchNorm_0/var" not in rows
    state = {r["path"]: r for r in data["state"]["leaves"]}
    assert state["batch_stats/BatchNorm_0/var"]["variable"] == "batch_stats"

    # Masks that sit neither at the variables' paths nor under params/ are still refused.
    with pytest.raises(ValueError, match="masks leaf 'Dense_1/kernel'.*matches no params leaf"):
        checkpoint.save(tmp_path / "c", 2, variables, masks={"Dense_1": {"kernel": True}})
    assert not (tmp_path / "c").exists()


# -- equinox #5: a whole module as restore's template ------------------------------------------


def test_restore_into_a_whole_equinox_module_returns_the_module(tmp_path):
    eqx = pytest.importorskip("equinox")
    model = eqx.nn.MLP(4, 2, 8, 1, key=jax.random.key(0))
    arrays = eqx.filter(model, eqx.is_array)
    tx = jp.prune(optax.sgd(0.1), sparsity=0.5)
    state = tx.init(arrays)
    updates, state = tx.update(jax.tree.map(jnp.ones_like, arrays), state, arrays)
    arrays = optax.apply_updates(arrays, updates)
    model = eqx.combine(arrays, model)
    checkpoint.save(tmp_path / "a", 1, arrays, state)

    other = eqx.nn.MLP(4, 2, 8, 1, key=jax.random.key(1))
    ck = checkpoint.restore(tmp_path / "a", params=other)  # was a numpy TypeError
    assert type(ck.params) is type(model) and ck.params.activation is other.activation
    x = jnp.linspace(-1.0, 1.0, 4)
    np.testing.assert_array_equal(ck.params(x), model(x))
    assert _bitwise(eqx.filter(ck.params, eqx.is_array), arrays)
    # The recorded masks come back in the structure of jp.get_masks(state).
    assert _bitwise(ck.masks, jp.get_masks(state))

    # An equinox number (Dropout's p) was never saved either: taken from the template.
    seq = eqx.nn.Sequential([eqx.nn.Linear(4, 3, key=jax.random.key(2)), eqx.nn.Dropout(0.1)])
    checkpoint.save(tmp_path / "b", 1, eqx.filter(seq, eqx.is_array))
    back = checkpoint.restore(
        tmp_path / "b",
        params=eqx.nn.Sequential([eqx.nn.Linear(4, 3, key=jax.random.key(3)), eqx.nn.Dropout(0.3)]),
    ).params
    assert back.layers[1].p == 0.3
    np.testing.assert_array_equal(back.layers[0].weight, seq.layers[0].weight)

    # A function where an array was saved is a mismatch named with its path, not a TypeError.
    checkpoint.save(tmp_path / "c", 1, {"act": np.ones(2, np.float32)})
    with pytest.raises(ValueError, match=r"act: checkpoint float32\[2\] vs template a custom_jvp"):
        checkpoint.restore(tmp_path / "c", params={"act": jax.nn.relu})


# -- resume_report #3: -0.0 outside the masks in a compressed save ------------------------------


def test_compressed_save_warns_about_negative_zeros_outside_the_masks(tmp_path):
    w = {"kernel": jax.random.normal(jax.random.key(0), (64, 32)), "bias": jnp.zeros(32)}
    masks = jp.masks.topk(jp.criteria.magnitude(w), 0.9)
    by_mul = jax.tree.map(lambda a, m: a * m.astype(a.dtype), w, masks)  # -0.0 where a < 0
    k, m = np.asarray(by_mul["kernel"]), np.asarray(masks["kernel"])
    n = int(np.count_nonzero(np.signbit(k) & (k == 0) & ~m))
    assert n > 500

    with pytest.warns(UserWarning, match=rf"{n:,} -0.0 entries.*'kernel'.*jp.apply_masks") as rec:
        checkpoint.save(tmp_path / "a", 0, by_mul, masks=masks, format="compressed")
    assert len(rec) == 1 and rec[0].filename == __file__
    ck = checkpoint.restore(tmp_path / "a", params=by_mul)
    assert _bitwise(ck.params, by_mul)  # still bitwise: nothing dropped silently

    # The fix the warning gives: apply_masks writes +0.0, and the save is smaller.
    fixed = jp.apply_masks(by_mul, masks)
    assert not np.signbit(np.asarray(fixed["kernel"])[~m]).any()
    checkpoint.save(tmp_path / "b", 0, fixed, masks=masks, format="compressed")
    assert checkpoint.disk_bytes(tmp_path / "b") < checkpoint.disk_bytes(tmp_path / "a")
    # The dense format stores every entry anyway: nothing to warn about.
    checkpoint.save(tmp_path / "c", 0, by_mul, masks=masks)
    with pytest.warns(UserWarning, match=r"-0.0 entries.*ckpt = jp.restore\("):
        checkpoint.export(tmp_path / "c", tmp_path / "d")
