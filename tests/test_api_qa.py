"""API review findings: nnx Modules in tree functions, packed masks, keys, early checks."""

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import jaxprune as jp


def test_an_nnx_module_in_a_tree_function_is_refused_with_the_state_to_pass():
    model = jp.models.lenet_300_100(rngs=nnx.Rngs(0), in_features=16)
    with pytest.raises(ValueError, match=r"nnx Module MLP itself .* nnx.state\(model, nnx.Param\)"):
        jp.criteria.magnitude(model)
    with pytest.raises(ValueError, match="nnx Module MLP itself"):
        jp.apply_masks(model, jp.masks.topk(jp.criteria.magnitude(nnx.state(model)), 0.5))
    # The fix the message gives works, and jp.sparsity still takes the module.
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jp.apply_masks(state, jp.masks.topk(jp.criteria.magnitude(state), 0.5)))
    assert float(jp.sparsity(model)) == 0.5


def test_sparsity_counts_packed_masks():
    params = {"w": jnp.arange(1.0, 33.0).reshape(4, 8)}
    tx = jp.prune(optax.sgd(0.1), sparsity=0.75)
    _, state = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    assert float(jp.sparsity(state.packed_masks)) == 0.75 == float(jp.sparsity(state.masks))


def test_gate_keys_must_be_prng_keys():
    params = {"fc": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)}}
    with pytest.raises(ValueError, match=r"key must be a PRNG key, got 0. Fix: key=jax.random"):
        jp.gates.init_gates(jp.gates.HardConcrete(), params, key=0)
    gp = jp.gates.init_gates(jp.gates.HardConcrete(), params)
    with pytest.raises(ValueError, match="key must be a PRNG key, got 0"):
        jp.gates.gate_keys(gp, 0)


@pytest.mark.parametrize("make", [jp.dynamic.rigl, jp.dynamic.set])
def test_dynamic_where_is_checked_when_built(make):
    kw = {"end_step": 10} if make is jp.dynamic.rigl else {}
    with pytest.raises(ValueError, match="where must be a predicate .* got True"):
        make(optax.sgd(0.1), sparsity=0.5, key=jax.random.key(0), update_every=5, where=True, **kw)


def test_gate_masks_with_a_budget_warn_about_an_emptied_layer_and_take_a_cap():
    params = {
        "l1": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)},
        "l2": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)},
    }
    gp = {
        "l1/kernel": {"gate_log_alpha": jnp.full(4, -5.0)},
        "l2/kernel": {"gate_log_alpha": jnp.arange(4.0)},
    }
    with pytest.warns(UserWarning, match=r"unit_masks pruned every unit of \['l1/kernel'\]"):
        jp.gates.to_masks(jp.gates.HardConcrete(), gp, params, sparsity=0.5)
    m = jp.gates.to_masks(jp.gates.HardConcrete(), gp, params, sparsity=0.5, max_sparsity=0.75)
    assert m["l1"]["bias"].tolist() == [False, False, False, True]  # first in flatten order


def test_apply_masks_names_packed_masks():
    params = {"w": jnp.arange(1.0, 17.0).reshape(2, 8)}
    tx = jp.prune(optax.sgd(0.1), sparsity=0.5)
    _, state = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    with pytest.raises(ValueError, match=r"masks are packed .* jp.masks.unpack\(masks\)"):
        jp.apply_masks(params, state.packed_masks)
    assert float(jp.sparsity(jp.apply_masks(params, jp.masks.unpack(state.packed_masks)))) == 0.5


def test_rigl_raises_no_false_inf_alarm_under_debug_infs():
    params = {"w": jax.random.normal(jax.random.key(1), (16, 32))}
    grads = jax.tree.map(lambda a: 0.1 * a, params)
    tx = jp.dynamic.rigl(
        optax.sgd(0.1), sparsity=0.5, key=jax.random.key(0), end_step=10, update_every=1
    )
    _, state = tx.update(grads, tx.init(params), params)  # rewiring starts at step 1
    with jax.debug_infs(True), jax.disable_jit():
        _, state = tx.update(grads, state, params)
    assert float(jp.sparsity(jp.get_masks(state))) == 0.5


def test_load_digits_refuses_a_size_below_the_images_own():
    # size // 8 == 0 repeats shrank the images to nothing: all-zero inputs, no error.
    with pytest.raises(ValueError, match=r"size must be an int >= 8.*got 4"):
        jp.data.load_digits(size=4)
    assert float(jp.data.load_digits(size=8).x_train.max()) == 1.0


def test_gates_to_masks_warns_when_the_gates_alone_empty_a_layer():
    # The default path (no sparsity=) emptied a layer silently: 10% accuracy, no word.
    from jaxprune import gates

    p = {"fc": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)}}
    gp = {"fc/kernel": {"gate_a": jnp.full(4, -20.0), "gate_b": jnp.zeros(4)}}
    with pytest.warns(UserWarning, match=r"pruned every unit of \['fc/kernel'\].*penalty weight"):
        m = gates.to_masks(gates.BetaBernoulli(), gp, p)
    assert not bool(jnp.any(m["fc"]["kernel"]))


def test_a_schedule_returning_a_tree_or_an_array_is_named():
    params = {"w": jnp.ones((4, 4))}
    for bad, match in (
        (lambda step: {"w": 0.5}, r"one number per step, got a dict.*selection"),
        (lambda step: jnp.full(2, 0.5), r"one number per step, got an array of shape \(2,\)"),
    ):
        tx = jp.prune(optax.sgd(0.1), sparsity=bad)
        with pytest.raises(ValueError, match=match):
            tx.update(params, tx.init(params), params)


def test_fashion_mnist_empty_directory_is_the_current_one_not_the_default(tmp_path, monkeypatch):
    from jaxprune import data

    monkeypatch.chdir(tmp_path)  # no idx files here
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", str(tmp_path / "elsewhere"))
    for pair in data._FASHION_FILES.values():
        for name in pair:
            (tmp_path / "elsewhere").mkdir(exist_ok=True)
            (tmp_path / "elsewhere" / name).write_bytes(b"")
    assert data.fashion_mnist_available() is True  # the default folder has the files
    assert data.fashion_mnist_available("") is False  # "" is the current folder
    with pytest.raises(FileNotFoundError, match="looked in ''"):
        data.load_fashion_mnist("")
