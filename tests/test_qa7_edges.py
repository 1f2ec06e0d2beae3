"""QA7 api_edges findings 3-6 and 7d: path collisions in checkpoints, the int32 limit of a
global selection, jp.sparsity of integer weights, non-array leaves, and -0.0 ranking."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune as jp
from jaxprune import _tree, checkpoint

# -- 3. colliding path strings in a checkpoint ---------------------------------------------


def _colliding():
    return {
        "enc/dense": {"kernel": np.ones((4, 4), np.float32)},
        "enc": {"dense": {"kernel": 2 * np.ones((4, 4), np.float32)}},
    }


def test_save_refuses_two_leaves_with_one_path_string_before_writing(tmp_path):
    root = tmp_path / "ck"
    with pytest.raises(
        ValueError,
        match=r"params leaves .*'enc', 'dense', 'kernel'.* and .*'enc/dense', 'kernel'.* same "
        r"path string 'enc/dense/kernel'.*Fix: rename the key 'enc/dense'",
    ):
        checkpoint.save(root, 1, _colliding())
    assert not root.exists()  # nothing written: no step that restore would refuse


def test_save_refuses_colliding_opt_state_and_masks(tmp_path):
    # A str key "0" next to the index 0 reads the same; so do the masks of the colliding params.
    p = {"w": np.ones((4, 4), np.float32)}
    opt = {"a": [np.zeros(2)], "a/0": np.zeros(2)}
    with pytest.raises(ValueError, match=r"opt_state leaves .*same path string 'a/0'"):
        checkpoint.save(tmp_path / "o", 1, p, opt_state=opt)
    masks = {"w/x": np.ones((2, 2), bool), "w": {"x": np.ones((2, 2), bool)}}
    with pytest.raises(ValueError, match=r"masks leaves .*same path string 'w/x'.*'w/x'"):
        checkpoint.save(tmp_path / "m", 1, {"w": {"x": np.ones((2, 2))}}, masks=masks)
    assert not (tmp_path / "o").exists() and not (tmp_path / "m").exists()


def test_a_single_key_with_a_slash_still_round_trips(tmp_path):
    p = {"mlp/~/linear": {"w": np.arange(16, dtype=np.float32).reshape(4, 4)}}
    checkpoint.save(tmp_path, 1, p)
    back = checkpoint.restore(tmp_path, params=p).params
    assert np.array_equal(back["mlp/~/linear"]["w"], p["mlp/~/linear"]["w"])


# -- 4. global selection over 2**31 entries in total -----------------------------------------


def _big():  # three 1B-entry leaves: each under 2**31, 3.2B in total; abstract, no memory
    return {f"l{i}": jax.ShapeDtypeStruct((32768, 32768), jnp.float32) for i in range(3)}


_LIMIT = (
    r"global selection counts in int32: at most 2\*\*31 - 1 .* got 3,221,225,472.*Fix: per-layer"
)


@pytest.mark.parametrize(
    "select",
    [
        lambda s: jp.masks.global_topk(s, 0.5),
        lambda s: jp.masks.global_topk(s, s["l0"][0, 0] * 0 + 0.5),  # traced sparsity
        lambda s: jp.masks.global_topk(s, 0.5, max_sparsity=0.9),
        lambda s: jp.masks.fused_select("global", lambda x: x, s, 0.5, [True] * 3),
    ],
    ids=["python", "traced", "capped", "fused"],
)
def test_global_selection_over_int32_total_is_a_clear_error(select):
    with pytest.raises(ValueError, match=_LIMIT):
        jax.eval_shape(select, _big())


def test_prune_global_scope_over_int32_total_is_a_clear_error():
    s = _big()
    tx = jp.prune(optax.sgd(0.1), sparsity=0.5, scope="global")
    with pytest.raises(ValueError, match=_LIMIT):
        jax.eval_shape(tx.update, s, jax.eval_shape(tx.init, s), s)


def test_global_selection_at_the_limit_and_per_layer_over_it_trace():
    # 2**31 - 1 entries in total is the largest accepted; per layer, the 3.2B model is fine.
    at_limit = {
        "a": jax.ShapeDtypeStruct((32768, 32768), jnp.float32),
        "b": jax.ShapeDtypeStruct((32767, 32768), jnp.float32),
        "c": jax.ShapeDtypeStruct((32767, 1), jnp.float32),  # ndim 2: prunable
    }
    assert sum(int(np.prod(x.shape)) for x in at_limit.values()) == 2**31 - 1
    out = jax.eval_shape(lambda s: jp.masks.global_topk(s, 0.5), at_limit)
    assert out["a"].shape == (32768, 32768)
    jax.eval_shape(lambda s: jp.masks.topk(s, 0.5), _big())


# -- 5. jp.sparsity of integer (quantized) weights -------------------------------------------


def _quantized():
    w = jnp.array([[0, 3, 0, -2]] * 4, jnp.int8)  # half zeros
    return {"dense": {"kernel_q": w, "scale": jnp.float32(0.1)}}


def test_sparsity_counts_int_leaves_selected_by_where():
    q = _quantized()
    got = jp.sparsity(q, where=lambda p, x: p[-1] == "kernel_q")
    assert float(got) == 0.5
    rows = {r.path: r.sparsity for r in jp.report(q).rows}
    assert rows["dense/kernel_q"] == 0.5  # the same as jp.report
    # complex, uint8 and bool leaves too
    other = {
        "c": jnp.array([[0j, 1j]]),
        "u": jnp.array([[0, 7, 0, 0]], jnp.uint8),
        "b": jnp.array([True, False]),
    }
    assert float(jp.sparsity(other, where=lambda p, x: True)) == 5 / 8


def test_sparsity_default_warns_when_it_counts_nothing_but_skipped_int_kernels():
    with pytest.warns(UserWarning, match=r"counted no leaf .*'dense/kernel_q' \(int8\).*Fix"):
        assert float(jp.sparsity(_quantized())) == 0.0


def test_sparsity_default_stays_silent_and_unchanged_otherwise():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert float(jp.sparsity({})) == 0.0
        assert float(jp.sparsity({"b": jnp.zeros(3)})) == 0.0  # biases only: nothing prunable
        mixed = {"w": jnp.array([[0.0, 1.0]]), "ids": jnp.zeros((2, 2), jnp.int32)}
        assert float(jp.sparsity(mixed)) == 0.5  # default where: float kernels only


def test_sparsity_where_selecting_a_non_array_names_it():
    tree = {"w": jnp.zeros((2, 2)), "act": jax.nn.relu, "key": jax.random.key(0)}
    for name in ("act", "key"):
        with pytest.raises(ValueError, match=rf"where selected leaf '{name}'.*Fix"):
            jp.sparsity(tree, where=lambda p, x, n=name: p[-1] == n)


# -- 6. non-array leaves in is_prunable and check_same_leaves --------------------------------


def test_non_array_leaves_give_no_jax_deprecation_warnings():
    tree = {"w": jnp.ones((4, 4)), "activation": jax.nn.relu, "n": 3}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert jp.is_prunable(("activation",), jax.nn.relu) is False
        flags = _tree.prunable_flags(tree)
        _tree.check_same_leaves(tree, tree, "grads", "params")
        masks = jp.masks.topk(tree, 0.5)
    assert flags == [False, False, True]  # flatten order: activation, n, w
    assert int((~masks["w"]).sum()) == 8
    dep = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert dep == []


# -- 7d. -0.0 ranks below +0.0 (documented, not changed) -------------------------------------


def test_negative_zero_ranks_below_positive_zero_as_documented():
    m = jp.masks.topk({"w": jnp.array([[0.0, -0.0, 0.0, -0.0]])}, 0.5)
    assert m["w"].tolist() == [[True, False, True, False]]
    assert "-0.0`` ranks below ``+0.0" in jp.masks.topk.__doc__
    assert "do not tie" in jp.masks.ordered_keys.__doc__
