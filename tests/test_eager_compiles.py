"""Eager selections compile a few whole programs, not one per array operation.

Called outside ``jax.jit``, every jnp operation is its own compiled program.
The selections run their element-wise work (the search keys, the group
reductions, the block pooling) inside jitted helpers instead, so a first eager
call compiles a handful of programs and a call at another sparsity none.
The shapes here are used by no other test, so nothing is cached beforehand.
"""

import logging

import jax
import numpy as np
import pytest

import jaxprune as jp


def _compiled(caplog, fn) -> list[str]:
    """Returns the names of the programs XLA compiled while ``fn()`` ran."""
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="jax"), jax.log_compiles(True):
        jax.block_until_ready(fn())
    done = "Finished XLA compilation of "
    return [
        r.getMessage()[len(done) :].split(" ")[0]
        for r in caplog.records
        if r.getMessage().startswith(done)
    ]


@pytest.fixture
def scores():
    k1, k2 = jax.random.split(jax.random.key(7))
    tree = {"a": jax.random.uniform(k1, (41, 29)), "b": jax.random.uniform(k2, (29, 13))}
    return jax.block_until_ready(tree)


@pytest.mark.parametrize(
    ("select", "most"),
    [
        (lambda t, s: jp.masks.topk(t, s), 3),
        (lambda t, s: jp.masks.global_topk(t, s), 2),
        (lambda t, s: jp.structured.structured(t, s, axes=-1), 16),
        (lambda t, s: jp.structured.structured(t, s, axes=-1, scope="global"), 16),
        (lambda t, s: jp.structured.blocks(t, s, block=(1, 4)), 20),
    ],
    ids=["topk", "global_topk", "structured-layer", "structured-global", "blocks"],
)
def test_first_eager_call_compiles_a_few_programs_and_a_second_none(caplog, scores, select, most):
    first = _compiled(caplog, lambda: select(scores, 0.5))
    # Before, one program per operation: 16 (topk), 71 (structured), 43 (blocks).
    assert 1 <= len(first) <= most, first
    again = _compiled(caplog, lambda: select(scores, 0.3))
    assert again == [], again
    # The compiled helpers select what the same call traced under jax.jit does.
    want = jax.jit(lambda t: select(t, 0.3))(scores)
    for got, ref in zip(jax.tree.leaves(select(scores, 0.3)), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(got, ref)


def test_bench_eager_times_one_selection():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "bench_eager.py"
    spec = importlib.util.spec_from_file_location("bench_eager", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    row = script.one("blocks", 2)
    assert row["name"] == "blocks" and row["scores"] == "lenet"
    assert row["first_s"] > 0 and row["later_s"] > 0
    with pytest.raises(SystemExit):
        script.main(["--calls", "0"])


def test_first_eager_nm_compiles_one_program_per_leaf_shape(caplog):
    # Here 4: the count and its floor (two scalar ops) and one _nm_keep per leaf shape.
    k1, k2 = jax.random.split(jax.random.key(11))
    scores = {"a": jax.random.uniform(k1, (44, 12)), "b": jax.random.uniform(k2, (12, 20))}
    scores = jax.block_until_ready(scores)
    first = _compiled(caplog, lambda: jp.masks.nm(scores, 0.5, n=1, m=4))
    # Before, one program per operation (moves, reshapes, two argsorts, ...): 16.
    assert 1 <= len(first) <= 5, first
    again = _compiled(caplog, lambda: jp.masks.nm(scores, 0.75, n=1, m=4))
    assert again == [], again


def test_first_eager_patterns_compiles_per_leaf_programs_not_per_operation(caplog):
    k1, k2 = jax.random.split(jax.random.key(12))
    a, b = jax.random.uniform(k1, (3, 3, 8, 16)), jax.random.uniform(k2, (3, 3, 16, 24))
    scores = jax.block_until_ready({"a": a, "b": b})
    first = _compiled(caplog, lambda: jp.masks.patterns(scores, 0.5))
    # Here 12 (the pattern scores and the mask of each leaf shape, the search, a
    # few scalar ops); before, one program per operation: 52.
    assert 1 <= len(first) <= 14, first
    again = _compiled(caplog, lambda: jp.masks.patterns(scores, 0.25))
    assert again == [], again
