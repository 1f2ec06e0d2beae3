"""Tied nnx layers, equinox-style trees, linen TrainState checkpoints, several prunes, the CLI."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxprune as jp
from jaxprune import cli, gates


class _Tied(nnx.Module):
    def __init__(self, rngs):
        self.inp = nnx.Linear(8, 16, rngs=rngs)
        self.shared = nnx.Linear(16, 16, rngs=rngs)
        self.tied = self.shared  # the same layer, used twice
        self.out = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        h = self.shared(nnx.relu(self.inp(x)))
        return self.out(nnx.relu(self.tied(nnx.relu(h))))


def test_attach_gates_a_tied_layer_at_every_use_and_detach_keeps_the_tie():
    model = _Tied(nnx.Rngs(0))
    gates.attach(model, gates.ScalarGate(), key=jax.random.key(0), skip=("out",))
    assert model.shared is model.tied and isinstance(model.tied, gates.Gated)
    g = model.shared
    name = g.gate_names[0]
    getattr(g, name).set_value(getattr(g, name).get_value().at[:8].set(0.0))
    model.eval()
    x = jax.random.normal(jax.random.key(1), (4, 8))
    h1 = model.shared(nnx.relu(model.inp(x)))
    h2 = model.tied(nnx.relu(h1))
    assert float(jnp.abs(h1[:, :8]).max()) == 0.0 and float(jnp.abs(h2[:, :8]).max()) == 0.0
    plain = gates.detach(model)
    assert plain.shared is plain.tied
    flat, _ = jp._tree.leaves_with_paths(nnx.state(plain, nnx.Param))
    paths = sorted(jp.path_str(p) for p, _ in flat)
    assert "tied/kernel" not in paths and "shared/kernel" in paths
    np.testing.assert_allclose(plain(x), model(x), rtol=1e-5, atol=1e-6)
    masks = gates.hard_masks(model)
    assert not bool(jnp.all(masks["shared"]["kernel"]))


def test_sparsity_of_an_nnx_module_counts_a_tied_weight_once():
    model = _Tied(nnx.Rngs(0))
    k = model.shared.kernel
    k.set_value(k.get_value().at[:8].set(0.0))
    assert float(jp.sparsity(model)) == pytest.approx(
        float(jp.sparsity(nnx.state(model, nnx.Param)))
    )


def test_report_and_criteria_name_a_leaf_that_is_not_an_array():
    tree = {"w": jnp.ones((4, 4)), "activation": jax.nn.relu}
    with pytest.raises(
        ValueError, match="params leaf 'activation' is a .*not an array.*eqx.filter"
    ):
        jp.report(tree)
    with pytest.raises(ValueError, match="params leaf 'activation'"):
        jp.criteria.magnitude(tree)
    params = {"w": jnp.ones((4, 4))}
    for tx in (
        jp.prune(optax.adam(1e-2), sparsity=0.5),
        jp.dynamic.ste(optax.adam(1e-2), sparsity=0.5),
    ):
        # Unfiltered, in init (optax failed on the function) and in update.
        with pytest.raises(ValueError, match="params leaf 'activation' is a .*eqx.filter"):
            tx.init(tree)
        with pytest.raises(ValueError, match="params leaf 'activation' is a .*eqx.filter"):
            tx.update(params, tx.init(params), dict(params, activation=jax.nn.relu))


def test_restore_into_a_fresh_linen_train_state(tmp_path):
    import flax.linen as nn
    from flax.training import train_state

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4)(x)

    net = Net()
    params = net.init(jax.random.key(0), jnp.ones((1, 8)))["params"]
    tx = jp.prune(optax.adam(1e-2), sparsity=0.5)
    state = train_state.TrainState.create(apply_fn=net.apply, params=params, tx=tx)
    state = state.apply_gradients(grads=jax.tree.map(jnp.ones_like, params))
    jp.save(str(tmp_path / "c"), 1, state.params, state)
    fresh = train_state.TrainState.create(apply_fn=net.apply, params=params, tx=tx)
    assert isinstance(fresh.step, int)
    got = jp.restore(str(tmp_path / "c"), params=fresh.params, opt_state=fresh)
    assert got.opt_state.step == 1
    np.testing.assert_array_equal(
        got.params["Dense_0"]["kernel"], state.params["Dense_0"]["kernel"]
    )


def test_get_masks_keeps_only_what_every_prune_keeps():
    params = {
        "enc": {"w": jnp.arange(1.0, 17.0).reshape(4, 4)},
        "dec": {"w": jnp.arange(1.0, 17.0).reshape(4, 4)},
    }
    tx = optax.multi_transform(
        {
            "enc": jp.prune(optax.sgd(0.1), sparsity=0.5),
            "dec": jp.prune(optax.sgd(0.1), sparsity=0.75),
        },
        {"enc": "enc", "dec": "dec"},
    )
    st = tx.init(params)
    u, st = tx.update(jax.tree.map(jnp.zeros_like, params), st, params)
    params = optax.apply_updates(params, u)
    m = jp.get_masks(st)
    assert float(jp.sparsity(m["enc"])) == 0.5 and float(jp.sparsity(m["dec"])) == 0.75
    for k in ("enc", "dec"):
        assert bool(jnp.all((params[k]["w"] != 0) == m[k]["w"]))


def test_demo_refuses_a_negative_seed_and_epochs_with_quick(capsys):
    assert cli.main(["demo", "--seed", "-1", "--dataset", "digits", "--quick"]) == 1
    assert "--seed must be >= 0" in capsys.readouterr().err
    assert cli.main(["demo", "--epochs", "3", "--dataset", "digits", "--quick"]) == 1
    assert "--epochs 3 would be ignored" in capsys.readouterr().err


def test_demo_names_damaged_dataset_files_in_one_line(tmp_path, monkeypatch, capsys):
    from jaxprune import data

    for img, lab in data._FASHION_FILES.values():
        (tmp_path / img).write_bytes(b"not gzip")
        (tmp_path / lab).write_bytes(b"not gzip")
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", str(tmp_path))
    assert cli.main(["demo", "--dataset", "fashion-mnist", "--quick"]) == 1
    err = capsys.readouterr().err
    assert "cannot be read as gzip" in err and "dataset-fashion-mnist" in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_a_linen_attention_width_cut_names_round_to_num_heads():
    import warnings

    import flax.linen as nn

    from jaxprune import structure

    class TF(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(16)(x)
            x = x + nn.MultiHeadDotProductAttention(num_heads=4)(x, deterministic=True)
            return nn.Dense(3)(nn.relu(x.mean(1)))

    m = TF()
    x = jax.random.normal(jax.random.key(0), (2, 5, 6))
    v = m.init(jax.random.key(1), x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f = structure.linen_apply(m)
        gs = [g for g in structure.groups(f, v, x, prunable_only=True) if g.channels == 16]
        masks = structure.select(gs, jp.criteria.magnitude(v), 0.375)  # 16 -> 10 channels
        with pytest.raises(ValueError, match="must be divisible.*round_to=num_heads"):
            structure.shrink_linen(m, v, masks, x)
