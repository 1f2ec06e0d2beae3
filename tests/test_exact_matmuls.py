"""A shrink's numeric checks trace float32 contractions at full precision on every backend.

On GPUs float32 matmuls default to TF32 and on TPUs to bfloat16 passes: the
shrunk network (fewer terms per sum) then rounds differently from the masked
one by more than the check's float32 tolerance, and an H100 run of
examples/anp_vs.py failed its shrink that way (max abs difference 0.0036).
The CPU backend computes float32 whatever the setting, so these tests check
the precision the checks trace at, which is what the backend compiles.
"""

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import structure
from jaxprune.structure import evaluate
from jaxprune.structure.evaluate import exact_matmuls, run_once


def _mlp(p, x):
    h = jax.nn.relu(x @ p["w1"] + p["b1"])
    return h @ p["w2"] + p["b2"]


def _params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {
        "w1": jax.random.normal(k1, (5, 6)),
        "b1": jnp.linspace(-1.0, 1.0, 6),
        "w2": jax.random.normal(k2, (6, 3)),
        "b2": jnp.zeros(3),
    }


def test_run_once_traces_at_highest_precision_inside_a_callers_lower_setting():
    seen = []

    def fn(x):
        seen.append(jax.config.jax_default_matmul_precision)
        return x @ x

    with jax.default_matmul_precision("bfloat16"):
        out = run_once(fn, jnp.eye(3))
        assert jax.config.jax_default_matmul_precision == "bfloat16"  # restored after
    assert seen == ["highest"]
    np.testing.assert_array_equal(out, np.eye(3))
    with exact_matmuls():
        assert jax.config.jax_default_matmul_precision == "highest"


def test_a_shrink_under_bfloat16_matmuls_runs_its_evaluator_and_check_at_highest(monkeypatch):
    seen = {"evaluator": [], "check": []}
    original = evaluate._run

    def spy(*args, **kwargs):
        seen["evaluator"].append(jax.config.jax_default_matmul_precision)
        return original(*args, **kwargs)

    monkeypatch.setattr(evaluate, "_run", spy)

    def apply_fn(p, x):
        seen["check"].append(jax.config.jax_default_matmul_precision)
        return _mlp(p, x)

    p = _params()
    masks = jax.tree.map(lambda x: jnp.ones(x.shape, bool), p)
    masks["w1"] = masks["w1"].at[:, [1, 4]].set(False)
    masks["b1"] = masks["b1"].at[jnp.array([1, 4])].set(False)
    x = jax.random.normal(jax.random.key(1), (4, 5))
    with jax.default_matmul_precision("bfloat16"):
        small = structure.shrink(apply_fn, p, masks, x)
    assert small["w1"].shape == (5, 4) and small["w2"].shape == (4, 3)
    # The bias-folding evaluator and the output check both ran, and only at "highest".
    assert seen["evaluator"] and set(seen["evaluator"]) == {"highest"}
    assert seen["check"] and set(seen["check"]) - {"bfloat16"} == {"highest"}
    masked = jax.tree.map(lambda v, m: v * m, p, masks)
    np.testing.assert_allclose(_mlp(small, x), _mlp(masked, x), rtol=1e-5, atol=1e-5)


# --- Statistics that feed solves and rankings: full float32 on every backend ---------------


def _dot_precisions(jaxpr) -> list:
    """Returns the precision of every dot_general in ``jaxpr``, nested jaxprs included."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            out.append(eqn.params["precision"])
        for v in eqn.params.values():
            for sub in v if isinstance(v, (list, tuple)) else [v]:
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    out += _dot_precisions(getattr(inner, "jaxpr", inner))
    return out


HIGHEST = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)


def test_llm_hessian_of_a_layers_inputs_is_a_highest_precision_product():
    from flax import nnx

    from jaxprune import llm
    from jaxprune.models_llm import GPT

    model = GPT(vocab=32, dim=16, depth=1, heads=2, max_len=8, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model.blocks[0])
    h = model.embed_tokens(jnp.zeros((2, 8), jnp.int32))
    # "proj": the input of the MLP's second layer, after the block's qkv, out and fc matmuls.
    jaxpr = jax.make_jaxpr(lambda s, x: llm._tap_hessian(graphdef, s, x, "proj"))(state, h)
    precisions = _dot_precisions(jaxpr.jaxpr)
    # The block's own matmuls keep the default; the Hessian X^T X (the last one) is HIGHEST.
    assert len(precisions) >= 4 and precisions[-1] == HIGHEST
    assert precisions[0] != HIGHEST


def test_merge_correlations_and_reconstruction_error_use_highest_precision():
    from jaxprune.llm import reconstruction_error
    from jaxprune.merge import most_correlated_pair

    h = jax.random.normal(jax.random.key(0), (16, 5))
    assert HIGHEST in _dot_precisions(jax.make_jaxpr(most_correlated_pair)(h).jaxpr)
    w = jax.random.normal(jax.random.key(1), (4, 3))
    jaxpr = jax.make_jaxpr(reconstruction_error)(w, w * 0.5, jnp.eye(4))
    assert _dot_precisions(jaxpr.jaxpr) == [HIGHEST, HIGHEST]
