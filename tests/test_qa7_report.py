"""QA7 findings on reports, checkpoints and inspect, each counted or checked by hand.

* report: a ``while_loop``'s cond and body each read their own params;
* report: gathers of a param that keep its rank (experts' kernels, columns)
  keep the param's density, an embedding lookup does not;
* save refuses a step directory (the path ``save`` returned) as its root;
* save of a whole equinox module names the function leaf and the eqx fix;
* ``jaxprune inspect`` of an nnx module counts its ``nnx.Param`` leaves only.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxprune as jp
from jaxprune import checkpoint, cli

# ---------------------------------------------------------------- report: while_loop


def test_while_loop_cond_and_body_read_their_own_params():
    params = {"w": jnp.ones((8, 8)), "v": jnp.ones((8, 8))}
    masks = {"w": jnp.zeros((8, 8), bool).at[0].set(True), "v": jnp.ones((8, 8), bool)}

    def apply_fn(p, x):
        def cond(c):
            i, h = c
            return ((h @ p["v"]).sum() < 1e9) & (i < 1)

        def body(c):
            i, h = c
            return i + 1, jnp.tanh(h @ p["w"])

        return jax.lax.while_loop(cond, body, (0, x))[1]

    r = jp.report(params, masks, apply_fn, jnp.ones((2, 8)))
    body = cond = 2 * 8 * 8  # each counted once, as documented
    assert r.flops["dense_macs"] == body + cond
    # The body at w's density 1/8, the cond at v's 1 (was 32: v's matmul read as w's).
    assert r.flops["nonzero_macs"] == body / 8 + cond
    # Only the cond reads a param (1/4 dense): the body's carry must not take it.
    masks = {"w": masks["w"], "v": jnp.zeros((8, 8), bool).at[:2].set(True)}

    def cond_only(p, x):
        def cond(c):
            i, h = c
            return ((h @ p["v"]).sum() < 1e9) & (i < 1)

        def body(c):
            i, h = c
            return i + 1, h @ h.T @ h  # activations only: dense

        return jax.lax.while_loop(cond, body, (0, x))[1]

    r = jp.report(params, masks, cond_only, jnp.ones((8, 8)))
    assert r.flops["dense_macs"] == 3 * 8**3
    assert r.flops["nonzero_macs"] == 8**3 / 4 + 2 * 8**3


# ---------------------------------------------------------------- report: gathers

N_EXP, D_IN, D_OUT, T = 4, 8, 8, 6


@pytest.fixture
def moe_params():
    p = {
        "experts": jnp.ones((N_EXP, D_IN, D_OUT)),
        "router": jnp.ones((D_IN, N_EXP)),
        "w": jnp.ones((D_IN, D_OUT)),
    }
    m = {
        "experts": jnp.zeros((N_EXP, D_IN, D_OUT), bool).at[:, :2].set(True),  # 25% kept
        "router": jnp.ones((D_IN, N_EXP), bool),
        "w": jnp.zeros((D_IN, D_OUT), bool).at[:2].set(True),  # 25% kept
    }
    return p, m


def test_moe_gather_of_expert_kernels_keeps_their_density(moe_params):
    p, m = moe_params

    def moe(p, x):  # top-1 routing: each token's expert kernel gathered
        ids = jnp.argmax(x @ p["router"], -1)
        return jnp.einsum("ti,tio->to", x, p["experts"][ids])

    x = jnp.ones((T, D_IN))
    r = jp.report(p, m, moe, x)
    assert r.flops["dense_macs"] == T * D_IN * N_EXP + T * D_IN * D_OUT
    assert r.flops["nonzero_macs"] == T * D_IN * N_EXP + 0.25 * T * D_IN * D_OUT  # was 576: dense
    # A gather dropping the experts' axis was right before, and stays so.
    r = jp.report(p, m, lambda p, x: x @ p["experts"][1], x)
    assert r.flops["nonzero_macs"] == 0.25 * T * D_IN * D_OUT
    # An embedding lookup is an activation: the layer reading it counts at its
    # own density only (w's 1/4), not at the table's too.
    params = {"emb": jnp.ones((10, D_IN)), "w": p["w"]}
    masks = {"emb": jnp.zeros((10, D_IN), bool).at[:, :2].set(True), "w": m["w"]}
    ids = jnp.array([1, 2, 3, 0, 1, 2])
    r = jp.report(params, masks, lambda p, ids: p["emb"][ids] @ p["w"], ids)
    assert r.flops["nonzero_macs"] == 0.25 * T * D_IN * D_OUT


def test_column_gather_keeps_the_kernel_density(moe_params):
    p, m = moe_params
    r = jp.report(p, m, lambda p, x: x @ p["w"][:, jnp.array([0, 2, 4, 6])], jnp.ones((T, D_IN)))
    assert r.flops["dense_macs"] == T * D_IN * 4
    assert r.flops["nonzero_macs"] == 0.25 * T * D_IN * 4  # was 192: dense


# ---------------------------------------------------------------- checkpoint: step dirs


def test_save_into_a_step_directory_is_refused_naming_the_root(tmp_path):
    step_dir = checkpoint.save(tmp_path, 100, {"w": jnp.full((2, 2), 1.0)})
    with pytest.raises(checkpoint.CheckpointError, match="directory of step 100") as e:
        checkpoint.save(step_dir, 200, {"w": jnp.full((2, 2), 2.0)})
    assert f"save({str(tmp_path)!r}, 200" in str(e.value)
    with pytest.raises(checkpoint.CheckpointError, match="is inside"):
        checkpoint.export(tmp_path, step_dir / "export")
    assert not (step_dir / "200").exists() and not (step_dir / "export").exists()
    assert checkpoint.latest_step(tmp_path) == 100
    # A sibling of the root, or a fresh directory below it, is fine.
    assert checkpoint.export(tmp_path, tmp_path / "export").name == "100"


# ---------------------------------------------------------------- checkpoint: equinox


def test_save_of_a_whole_equinox_module_names_the_function_and_the_fix(tmp_path):
    eqx = pytest.importorskip("equinox")
    model = eqx.nn.MLP(4, 2, 8, 1, key=jax.random.key(0))
    with pytest.raises(ValueError, match="'activation' is a custom_jvp, not an array") as e:
        checkpoint.save(tmp_path / "a", 1, model)
    assert "eqx.filter(model, eqx.is_array)" in str(e.value)
    assert "eqx.combine" in str(e.value) and "cast" not in str(e.value)
    assert not (tmp_path / "a").exists()
    # The fix works as stated.
    checkpoint.save(tmp_path / "b", 1, eqx.filter(model, eqx.is_array))
    other = eqx.nn.MLP(4, 2, 8, 1, key=jax.random.key(1))
    ckpt = checkpoint.restore(tmp_path / "b", params=eqx.filter(other, eqx.is_array))
    back = eqx.combine(ckpt.params, other)
    np.testing.assert_array_equal(back(jnp.ones(4)), model(jnp.ones(4)))
    # Strings are arrays orbax cannot store: a cast is the fix there.
    with pytest.raises(ValueError, match="cast that leaf to a numeric dtype"):
        checkpoint.save(tmp_path / "c", 1, {"w": jnp.ones(2), "name": np.array(["a", "b"])})


# ---------------------------------------------------------------- inspect: nnx state


class _CNN(nnx.Module):
    def __init__(self, rngs):
        self.c1 = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.do = nnx.Dropout(0.2, rngs=rngs)
        self.fc = nnx.Linear(4 * 4 * 4, 3, rngs=rngs)

    def __call__(self, x):
        x = self.do(nnx.relu(self.bn(self.c1(x))))
        return self.fc(x.reshape(x.shape[0], -1))


@pytest.fixture(scope="module")
def nnx_run(tmp_path_factory):
    model = _CNN(nnx.Rngs(0))
    opt = nnx.Optimizer(model, jp.prune(optax.sgd(0.1), sparsity=0.75), wrt=nnx.Param)
    opt.update(model, jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param)))  # prunes
    d = tmp_path_factory.mktemp("nnx") / "run"
    checkpoint.save(d, 1, model, opt)
    return d, jp.report(model, jp.get_masks(opt.opt_state))


def test_inspect_of_an_nnx_module_counts_params_only(nnx_run, capsys):
    d, rep = nnx_run
    params = 4 * 9 + 4 + 4 + 4 + 64 * 3 + 3  # conv, bn scale and bias, fc
    assert rep.totals["size"] == params
    assert cli.main(["inspect", str(d), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["totals"]["size"] == params  # was params + 4 + 4 + 1 + 1: bn stats, rngs
    assert data["totals"]["compression"] == pytest.approx(rep.totals["compression"])
    state = {r["path"]: r["variable"] for r in data["state"]["leaves"]}
    assert state == {
        "bn/mean": "BatchStat",
        "bn/var": "BatchStat",
        "do/rngs/count": "RngCount",
        "do/rngs/key": "RngKey",
    }
    assert data["state"]["size"] == 4 + 4 + 1 + 1
    assert not {r["path"] for r in data["rows"]} & set(state)
    assert cli.main(["inspect", str(d)]) == 0
    out = capsys.readouterr().out
    assert "non-parameter state" in out and "bn/mean float32[4] (BatchStat)" in out


def test_export_keeps_the_variable_types(nnx_run, tmp_path, capsys):
    d, rep = nnx_run
    out = checkpoint.export(d, tmp_path / "exp")
    assert cli.main(["export", str(d), str(tmp_path / "exp_cli")]) == 0
    capsys.readouterr()
    for path in (out, tmp_path / "exp_cli"):
        assert cli.main(["inspect", str(path), "--json"]) == 0
        data = json.loads(capsys.readouterr().out)
        assert data["totals"]["size"] == rep.totals["size"]
        assert len(data["state"]["leaves"]) == 4


def test_pytree_checkpoints_count_every_leaf(tmp_path, capsys):
    # No Variable types recorded (a linen dict, or a checkpoint of older jaxprune).
    checkpoint.save(tmp_path, 1, {"w": jnp.ones((4, 4)), "mean": jnp.zeros(4)})
    assert cli.main(["inspect", str(tmp_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["totals"]["size"] == 20 and data["state"] == {"size": 0, "leaves": []}


def test_recorded_variable_types_are_checked_on_restore(nnx_run):
    from jaxprune import checkpoint_meta

    d, _ = nnx_run
    _, meta = checkpoint._restore(d, None)
    spec = next(s for s in meta["params"] if s["path"] == ["bn", "mean"])
    assert (spec["var"], spec["param"]) == ("BatchStat", False)
    broken = json.loads(json.dumps(meta))
    next(s for s in broken["params"] if s["path"] == ["bn", "mean"])["param"] = "no"
    with pytest.raises(ValueError, match="param 'no'"):
        checkpoint_meta.check_fields(broken)
