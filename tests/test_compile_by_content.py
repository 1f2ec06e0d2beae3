"""A program found by content runs only where it computes what the caller's own would.

``jit_by_content`` and ``one_program`` run a program compiled for another
function whose lowered text is the same. The text does not show everything:
weak types, the Python functions a program calls back, the ``jax.Ref`` s it
holds, the settings (64-bit types, rank promotion) a later call runs under.
Each test compares with ``jax.jit`` of the caller's own function.
"""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import _compile
from tests import _compiles


@pytest.fixture(autouse=True)
def programs(monkeypatch):
    """An empty cache of programs by content, for each test alone."""
    _compiles.empty_programs(monkeypatch)


def _named(body):
    """Returns a new function ``fn`` computing ``body``: the same name, the same program text."""

    def fn(*args):
        return body(*args)

    return fn


def _types(tree):
    return jax.tree.structure(tree), [jax.typeof(x) for x in jax.tree.leaves(tree)]


def _same(got, want) -> bool:
    if _types(got) != _types(want):
        return False
    pairs = zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
    return all(np.array_equal(np.asarray(u), np.asarray(v)) for u, v in pairs)


# -- defects: the program of another function ran where it computes something else ----------


def test_outputs_differing_only_in_weak_type_are_different_programs():
    x = jnp.arange(3.0)
    lender = _named(lambda x: (x, jnp.float32(1.0)))  # a float32 output
    borrower = _named(lambda x: (x, 1.0))  # the same text, a weak float32 output
    _compile.jit_by_content(lender)(x)
    got = _compile.jit_by_content(borrower)(x)
    assert _same(got, jax.jit(borrower)(x))
    # Weak, it adds to bfloat16 as bfloat16; strong, as float32.
    assert (got[1] + jnp.ones(2, jnp.bfloat16)).dtype == jnp.bfloat16


@pytest.mark.parametrize(("first", "then"), [("array", "python"), ("python", "array")])
def test_a_borrowed_program_runs_only_for_arguments_of_the_same_weak_types(first, then):
    xb = jnp.arange(4, dtype=jnp.bfloat16)
    y = {"array": jnp.float32(1.0), "python": 1.0}
    add = _named(lambda a, b: a + b)
    _compile.jit_by_content(add)(xb, y[first])
    borrower = _compile.jit_by_content(_named(lambda a, b: a + b))
    assert _same(borrower(xb, y[first]), jax.jit(add)(xb, y[first]))  # borrowed
    # A compiled program takes a weak float32 for a float32 (and the reverse).
    assert _same(borrower(xb, y[then]), jax.jit(add)(xb, y[then]))


def test_a_borrowed_program_runs_only_under_the_settings_it_was_found_under():
    x = jnp.ones(3, jnp.float32)
    widen = _named(lambda x: jnp.asarray(x, dtype=float) * 2)
    _compile.jit_by_content(widen)(x)
    borrower = _compile.jit_by_content(_named(lambda x: jnp.asarray(x, dtype=float) * 2))
    assert borrower(x).dtype == jnp.float32  # borrowed
    with jax.enable_x64(True):
        assert borrower(x).dtype == jax.jit(widen)(x).dtype == jnp.float64
    add = _named(lambda a, b: a + b)
    a, b = jnp.ones((2, 5)), jnp.ones(5)
    _compile.jit_by_content(add)(a, b)
    borrower = _compile.jit_by_content(_named(lambda a, b: a + b))
    borrower(a, b)  # borrowed
    with jax.numpy_rank_promotion("raise"), pytest.raises(ValueError, match="rank_promotion"):
        borrower(a, b)  # as jax.jit(add)(a, b) does


def test_programs_calling_python_back_are_never_shared(capsys):
    x = jnp.ones(5)

    def scaled(k):
        shape = jax.ShapeDtypeStruct(x.shape, x.dtype)
        return _named(lambda x: jax.pure_callback(lambda v: (v * k).astype(v.dtype), shape, x))

    # The text holds the callback's index, not the function: the same for both.
    assert _same(_compile.jit_by_content(scaled(2.0))(x), 2 * x)
    assert _same(_compile.jit_by_content(scaled(3.0))(x), 3 * x)
    assert _same(_compile.one_program(scaled(4.0), x), 4 * x)
    assert _same(_compile.one_program(scaled(5.0), x), 5 * x)

    def printing(tag):
        return _named(lambda x: (jax.debug.print(tag + " {}", x.sum()), x)[1])

    jax.block_until_ready(_compile.jit_by_content(printing("first"))(x))
    jax.block_until_ready(_compile.jit_by_content(printing("second"))(x))
    jax.effects_barrier()
    assert capsys.readouterr().out.split() == ["first", "5.0", "second", "5.0"]


@pytest.mark.skipif(not hasattr(jax, "new_ref"), reason="a JAX without jax.Ref")
def test_functions_closing_over_refs_run_with_their_own_refs():
    x = jnp.ones(6)

    def accumulating(ref):
        def fn(x):
            ref[...] = ref[...] + x
            return ref[...] * 1

        return fn

    # Before: lowered.in_avals raised (the ref is an argument the tree does not show),
    # and a program found would have held the lender's ref.
    r1, r2 = jax.new_ref(jnp.zeros(6)), jax.new_ref(jnp.full(6, 10.0, jnp.float32))
    assert _same(_compile.jit_by_content(accumulating(r1))(x), jnp.ones(6))
    assert _same(_compile.jit_by_content(accumulating(r2))(x), jnp.full(6, 11.0, jnp.float32))
    r3 = jax.new_ref(jnp.full(6, 20.0, jnp.float32))
    assert _same(_compile.one_program(accumulating(r3), x), jnp.full(6, 21.0, jnp.float32))
    assert _same(r1[...], jnp.ones(6)) and _same(r3[...], jnp.full(6, 21.0, jnp.float32))


# -- safe: what the key or the compiled program's own checks already tell apart -------------

NT = collections.namedtuple("NT", "a b")


@pytest.mark.parametrize(
    ("lender", "borrower"),
    [
        (lambda x: {"a": x}, lambda x: {"b": x}),
        (lambda x: (x, x), lambda x: [x, x]),
        (lambda x: NT(x, x), lambda x: (x, x)),
        (lambda k: jax.random.wrap_key_data(k), lambda k: k),  # a typed key or its data
    ],
)
def test_outputs_come_in_the_callers_structure_and_types(lender, borrower):
    x = jax.random.key_data(jax.random.key(7))
    _compile.jit_by_content(_named(lender))(x)
    assert _same(_compile.jit_by_content(_named(borrower))(x), jax.jit(_named(borrower))(x))


def test_inputs_of_other_trees_or_key_types_are_other_programs():
    x = jnp.arange(7.0)
    double = _named(lambda t: jax.tree.map(lambda v: v * 2, t))
    for t in ({"a": x}, {"b": x}, (x,), [x]):
        assert _same(_compile.jit_by_content(double)(t), jax.jit(double)(t))
    is_key = lambda k: jax.dtypes.issubdtype(k.dtype, jax.dtypes.prng_key)  # noqa: E731
    draw = _named(lambda k: jax.random.uniform(k, (2,)) if is_key(k) else k + 1)
    key = jax.random.key(3)
    for k in (key, jax.random.key_data(key), jax.random.key(3, impl="rbg")):
        assert _same(_compile.jit_by_content(draw)(k), jax.jit(draw)(k))


def test_different_closed_over_arrays_are_different_programs():
    c1 = np.arange(1000, dtype=np.float32)
    c2 = c1.copy()
    c2[500] += 1  # one value apart: the text holds every value
    x = jnp.zeros(1000)
    for c in (c1, c2, jnp.asarray(c2), jax.random.key(0), jax.random.key(1)):
        if isinstance(c, np.ndarray) or c.dtype == jnp.float32:
            fn = _named(lambda x, c=c: x + c)
        else:
            fn = _named(lambda x, c=c: x + jax.random.uniform(c, x.shape))
        assert _same(_compile.jit_by_content(fn)(x), jax.jit(fn)(x))
    assert len(_compile._PROGRAMS) == 4  # c2 as a NumPy or a JAX array: one program


def test_arguments_that_no_longer_fit_the_borrowed_program_look_again():
    double = _named(lambda x: x * 2)
    _compile.jit_by_content(double)(jnp.ones(9))
    borrower = _compile.jit_by_content(_named(lambda x: x * 2))
    borrower(jnp.ones(9))  # borrowed
    for x in (jnp.ones(10), jnp.ones(9, jnp.int32), jnp.ones((9, 1)), np.ones(9), 2.0, 2):
        assert _same(borrower(x), jax.jit(double)(x))


def test_a_function_built_anew_still_compiles_nothing(caplog):
    def make():
        scale = 0.5

        def update_fn(g, s):
            return jax.tree.map(lambda v: v * scale, g), s + 1

        return _compile.jit_by_content(update_fn)

    g = {"w": jnp.ones((11, 3)), "b": jnp.ones(3)}
    s = jnp.int32(0)
    names, _ = _compiles.compiled(caplog, lambda: make()(g, s))
    assert names == ["jit(update_fn)"], names
    again = make()
    for _ in range(3):  # found, then borrowed while the types stay the same
        names, (_, s) = _compiles.compiled(caplog, lambda s=s: again(g, s))
        assert names == [], names
    assert int(s) == 3
