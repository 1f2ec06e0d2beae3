"""First eager calls compile few programs, and transforms built anew reuse them.

Pinned by the programs XLA compiles (``jax.log_compiles``), never by times:

* ``jp.at_init``'s scores are one program per call (the loss or model traced
  anew each time), not one program per operation of the gradient, and a call
  tracing to a program compiled before finds it;
* a transform built anew with the same configuration (a ``jp.dynamic.rigl``
  cell run again; ``optax.inject_hyperparams`` around ``jp.prune``, which builds
  one at every update) runs the program compiled for the first one, and only
  while it is the same program (same constants, such as the learning rate).

Each test uses shapes no other test uses, so nothing is compiled beforehand.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune as jp
from jaxprune import _compile
from tests import _compiles


@pytest.fixture
def programs(monkeypatch):
    """An empty cache of programs by content, for this test alone."""
    _compiles.empty_programs(monkeypatch)


def _mlp(sizes, seed=0):
    keys = jax.random.split(jax.random.key(seed), len(sizes) - 1)
    layers = zip(keys, sizes[:-1], sizes[1:], strict=True)
    p = {
        f"l{i}": {"kernel": jax.random.normal(k, (a, b)) / np.sqrt(a), "bias": jnp.zeros(b)}
        for i, (k, a, b) in enumerate(layers)
    }
    return jax.block_until_ready(p)


def _apply(p, x):
    for i in range(len(p)):
        x = x @ p[f"l{i}"]["kernel"] + p[f"l{i}"]["bias"]
        if i < len(p) - 1:
            x = jnp.tanh(x)
    return x


def _loss(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(_apply(p, x), y).mean()


def _leaves_equal(a, b) -> bool:
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return all(np.array_equal(np.asarray(u), np.asarray(v)) for u, v in pairs)


# -- jp.at_init: one program per call ------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "before"),
    [("snip", 86), ("grasp", 93), ("synflow_scores", 47)],
)
def test_at_init_scores_are_one_program_per_eager_call(caplog, programs, name, before):
    sizes = (27, 19, 7)
    p = _mlp(sizes)
    x = jax.random.normal(jax.random.key(1), (9, 27))
    y = jnp.arange(9) % 7
    call = {
        "snip": lambda: jp.at_init.snip(_loss, p, x, y),
        "grasp": lambda: jp.at_init.grasp(_loss, p, x, y),
        "synflow_scores": lambda: jp.at_init.synflow_scores(_apply, p, (1, 27)),
    }[name]
    first, scores = _compiles.compiled(caplog, call)
    # Before, one program per operation of the gradient and the checks (`before` here);
    # now the scores' program, the compile options' probe (once per process) and,
    # for SynFlow, the check of R.
    assert 1 <= len(first) <= 4 < before, first
    assert "jit(scores_of)" in first, first
    # Traced anew at every call (never cached by the loss), to the same program,
    # which is found compiled.
    again, _ = _compiles.compiled(caplog, call)
    assert again == [], again
    # The masks are those of the operations run one by one, as before.
    with jax.disable_jit():
        eager = call()
    for s in (0.5, 0.8, 0.95):
        assert _leaves_equal(jp.masks.topk(scores, s), jp.masks.topk(eager, s))
        assert _leaves_equal(jp.masks.global_topk(scores, s), jp.masks.global_topk(eager, s))
    # The scores agree to float32 rounding: one program may fuse the products
    # and sums otherwise (GraSP's H g cancels, so its small entries differ most).
    top = max(float(jnp.max(jnp.abs(v))) for v in jax.tree.leaves(eager))
    for got, want in zip(jax.tree.leaves(scores), jax.tree.leaves(eager), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * top)


def test_synflow_final_round_is_one_program(caplog, programs):
    p = _mlp((29, 17, 5))

    def call():
        return jp.at_init.synflow(_apply, p, (1, 29), 0.8, iterations=3)

    first, masks = _compiles.compiled(caplog, call)
    # Before: 60 (the final round's gradient op by op); now 10 (the rounds' program,
    # the final scores' program, the selection's search, a few array constructions).
    assert len(first) <= 12, first
    assert "jit(final_scores)" in first and "jit(round_fn)" in first, first
    # Before, the rounds compiled again at every call; now a call on the same
    # model finds both programs.
    again, _ = _compiles.compiled(caplog, call)
    assert again == [], again
    with jax.disable_jit():
        eager = jp.at_init.synflow(_apply, p, (1, 29), 0.8, iterations=3)
    assert _leaves_equal(masks, eager)


def test_at_init_traces_the_loss_anew_at_every_call(caplog, programs):
    # A loss reading state that changes between calls (a model switched to eval
    # mode, a rebuilt model): a trace cached by loss_fn would replay the old one.
    state = {"scale": 1.0}
    p = _mlp((13, 6))
    x = jax.random.normal(jax.random.key(2), (4, 13))

    def loss(p, x):
        return state["scale"] * jnp.sum(_apply(p, x) ** 2)

    s1 = jp.at_init.grasp(loss, p, x)
    state["scale"] = 2.0
    # Another constant in the program: another program (a stale one would give s1).
    names, s2 = _compiles.compiled(caplog, lambda: jp.at_init.grasp(loss, p, x))
    assert names == ["jit(scores_of)"], names  # g and H g both double: scores x4
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2), strict=True):
        np.testing.assert_allclose(b, 4.0 * a, rtol=1e-5, atol=1e-12)


def test_a_loss_reading_the_batch_in_python_runs_op_by_op_as_before(caplog):
    p = _mlp((11, 3))
    x = jax.random.normal(jax.random.key(3), (5, 11))
    y = np.array([0, 2, 1, 1, 0])

    def numpy_loss(p, x, y):
        onehot = np.eye(3)[np.asarray(y)]  # NumPy on the labels' values: untraceable
        return -jnp.mean(jnp.sum(jax.nn.log_softmax(_apply(p, x)) * onehot, axis=-1))

    names, got = _compiles.compiled(caplog, lambda: jp.at_init.snip(numpy_loss, p, x, y))
    assert "jit(scores_of)" not in names  # the trace failed: op by op
    want = jp.at_init.snip(_loss, p, x, jnp.asarray(y))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-12)


def test_batch_leaves_that_are_not_arrays_reach_the_loss_as_they_are():
    p = _mlp((7, 4))
    x = jax.random.normal(jax.random.key(4), (3, 7))
    seen = []

    def loss(p, x, train, name):
        seen.append((type(train), name))
        out = _apply(p, x)
        return jnp.sum(out**2) if train else jnp.sum(out)  # Python control flow on a flag

    s = jp.at_init.snip(loss, p, x, True, "batch-0")
    assert seen == [(bool, "batch-0")]
    assert np.isclose(sum(float(jnp.sum(v)) for v in jax.tree.leaves(s)), 1.0, rtol=1e-5)


def test_at_init_inside_jit_is_traced_with_the_caller(caplog):
    p = _mlp((15, 8))
    x = jax.random.normal(jax.random.key(5), (6, 15))
    y = jnp.arange(6) % 8
    inside = jax.jit(lambda p, x, y: jp.at_init.snip(_loss, p, x, y))
    names, got = _compiles.compiled(caplog, lambda: inside(p, x, y))
    assert "jit(scores_of)" not in names, names  # no program of its own inside a trace
    want = jp.at_init.snip(_loss, p, x, y)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    # SynFlow's rounds too take the caller's trace.
    masks = jax.jit(lambda p: jp.at_init.synflow(_apply, p, (1, 15), 0.5, iterations=2))(p)
    assert _leaves_equal(masks, jp.at_init.synflow(_apply, p, (1, 15), 0.5, iterations=2))


def test_a_loss_closing_over_large_arrays_runs_op_by_op(caplog, monkeypatch):
    # The program would embed them as constants; past MAX_CONST_BYTES, op by op.
    monkeypatch.setattr(_compile, "MAX_CONST_BYTES", 100)
    p = _mlp((9, 3))
    x = jax.random.normal(jax.random.key(6), (4, 9))
    frozen = jnp.arange(64.0)  # 256 bytes, closed over

    def loss(p, x):
        return jnp.sum(_apply(p, x)) + jnp.sum(frozen) * 0.0

    names, got = _compiles.compiled(caplog, lambda: jp.at_init.snip(loss, p, x))
    assert "jit(scores_of)" not in names, names
    monkeypatch.setattr(_compile, "MAX_CONST_BYTES", 2**20)
    want = jp.at_init.snip(loss, p, x)
    assert _leaves_equal(jp.masks.topk(got, 0.5), jp.masks.topk(want, 0.5))


# -- jp.dynamic: a transform built anew runs the program compiled for the first -------------


def _rigl(tx, sparsity=0.75):
    return jp.dynamic.rigl(
        tx, sparsity=sparsity, key=jax.random.key(7), end_step=40, update_every=2
    )


def test_a_rigl_transform_built_anew_compiles_nothing(caplog, programs):
    p = _mlp((31, 21, 9))
    g = jax.tree.map(lambda v: 0.1 * jnp.ones_like(v), p)
    tx = _rigl(optax.adam(1e-3))
    state = tx.init(p)
    first, _ = _compiles.compiled(caplog, lambda: tx.update(g, state, p))
    assert first == ["jit(update_fn)"], first
    # The same configuration built anew (a notebook cell run again, a sweep
    # over seeds of the data): before, its update compiled again (about 3 s
    # for a 784-1024-256-10 MLP on 2 cores); now, nothing.
    tx2 = _rigl(optax.adam(1e-3), sparsity=0.5)  # the sparsity only shapes init's masks
    state2 = tx2.init(p)
    again, _ = _compiles.compiled(caplog, lambda: tx2.update(g, state2, p))
    assert again == [], again
    # Another optimizer is another program.
    tx3 = _rigl(optax.sgd(0.1, momentum=0.9))
    state3 = tx3.init(p)
    other, _ = _compiles.compiled(caplog, lambda: tx3.update(g, state3, p))
    assert other == ["jit(update_fn)"], other


@pytest.mark.parametrize("kind", ["rigl", "set", "stacked"])
def test_eager_updates_of_transforms_built_anew_are_the_jitted_ones_bit_for_bit(kind, programs):
    p = _mlp((33, 14, 6), seed=1)
    if kind == "stacked":
        p["stack"] = jax.random.normal(jax.random.key(8), (3, 10, 10))
    x = jax.random.normal(jax.random.key(9), (12, 33))
    y = jnp.arange(12) % 6

    def loss(p):
        body = {k: v for k, v in p.items() if k != "stack"}
        extra = jnp.sum(p["stack"] ** 3) if "stack" in p else 0.0
        return _loss(body, x, y) + extra

    def make():
        if kind == "set":
            return jp.dynamic.set(
                optax.sgd(0.1, momentum=0.9), sparsity=0.6, key=jax.random.key(3), update_every=2
            )
        return jp.dynamic.rigl(
            optax.adam(1e-2),
            sparsity=0.8,
            key=jax.random.key(4),
            end_step=12,
            update_every=2,
            stacked=(lambda path, leaf: path[0] == "stack") if kind == "stacked" else None,
        )

    stacked = make().init(p)  # only for its initial masks
    runs = []
    # jax.jit, then eagerly a transform that compiles, then one built anew that finds it.
    for update in ("jit", "eager", "eager"):
        tx = make()
        state = tx.init(p)
        q = jp.apply_masks(p, jp.get_masks(state))
        step = jax.jit(tx.update) if update == "jit" else tx.update
        for _ in range(6):  # rewirings at steps 2 and 4
            u, state = step(jax.grad(loss)(q), state, q)
            q = optax.apply_updates(q, u)
        runs.append((q, state))
    assert _leaves_equal(runs[0], runs[1]) and _leaves_equal(runs[0], runs[2])
    assert not _leaves_equal(jp.get_masks(runs[0][1]), jp.get_masks(stacked))


# -- transforms built anew: optax.inject_hyperparams around jp.prune -------------------------


def _injected(schedule_end=20):
    return optax.inject_hyperparams(
        lambda learning_rate: jp.prune(
            optax.adam(learning_rate),
            sparsity=jp.schedules.polynomial(0.0, 0.9, 0, schedule_end, frequency=2),
        )
    )(learning_rate=1e-3)


def _loop(tx, p, g, steps, caplog=None, lrs=None):
    """Returns the params, the state and the programs compiled at each eager step."""
    state = tx.init(p)
    compiled = []
    for i in range(steps):
        if lrs is not None:
            hp = dict(state.hyperparams, learning_rate=jnp.float32(lrs[i]))
            state = state._replace(hyperparams=hp)
        if caplog is None:
            u, state = tx.update(g, state, p)
        else:
            names, (u, state) = _compiles.compiled(caplog, lambda s=state, q=p: tx.update(g, s, q))
            compiled.append(names)
        p = optax.apply_updates(p, u)
    return p, state, compiled


def test_inject_hyperparams_around_prune_compiles_its_update_once(caplog, programs, monkeypatch):
    p = _mlp((35, 22, 8))
    g = jax.tree.map(lambda v: 0.01 * jnp.sign(v), p)
    q, state, compiled = _loop(_injected(), p, g, 5, caplog)
    # Before: jp.prune built anew at every update, its update compiled at every step.
    assert [len(c) >= 1 for c in compiled] == [True, False, False, False, False], compiled
    assert all(c == [] for c in compiled[1:]), compiled
    # Bit for bit what a program compiled for each step's transform computes.
    monkeypatch.setattr(_compile, "_by_content_off", lambda: True)
    want = _loop(_injected(), p, g, 5)
    assert _leaves_equal((q, state), want[:2])


def test_a_changed_hyperparameter_is_a_new_program_not_a_stale_one(caplog, programs, monkeypatch):
    p = _mlp((37, 12, 4))
    g = jax.tree.map(lambda v: 0.01 * jnp.sign(v), p)
    lrs = [1e-3, 1e-3, 5e-2, 5e-2, 1e-3]
    q, state, compiled = _loop(_injected(), p, g, 5, caplog, lrs)
    # The learning rate is a constant of each step's program: another value is
    # another program (step 2), the first value again the first program (step 4).
    assert [bool(c) for c in compiled] == [True, False, True, False, False], compiled
    monkeypatch.setattr(_compile, "_by_content_off", lambda: True)
    want = _loop(_injected(), p, g, 5, lrs=lrs)
    assert _leaves_equal((q, state), want[:2])


def test_prune_built_anew_reuses_the_program_only_for_the_same_configuration(caplog, programs):
    p = _mlp((39, 10))
    g = jax.tree.map(jnp.ones_like, p)

    def make(end):
        return jp.prune(optax.adam(1e-3), sparsity=jp.schedules.polynomial(0.0, 0.5, 0, end))

    tx = make(10)
    first, _ = _compiles.compiled(caplog, lambda: tx.update(g, tx.init(p), p))
    assert len(first) >= 1
    tx_again = make(10)  # a notebook cell run again
    again, _ = _compiles.compiled(caplog, lambda: tx_again.update(g, tx_again.init(p), p))
    assert again == [], again
    other = make(30)  # another schedule: another program
    names, _ = _compiles.compiled(caplog, lambda: other.update(g, other.init(p), p))
    assert len(names) >= 1, names
    # Later steps of the transform that found the program compile nothing either.
    s = tx_again.init(p)
    for _ in range(3):
        names, (u, s) = _compiles.compiled(caplog, lambda s=s: tx_again.update(g, s, p))
        assert names == [], names


def test_extra_arguments_and_other_shapes_look_the_program_up_again(caplog, programs):
    p = _mlp((41, 9))
    g = jax.tree.map(jnp.ones_like, p)

    def make():
        return jp.prune(
            optax.sgd(0.1), sparsity=0.5, criterion=jp.criteria.random, key=jax.random.key(0)
        )

    a, b = make(), make()
    k = jax.random.key(5)
    want = a.update(g, a.init(p), p, key=k)
    names, got = _compiles.compiled(caplog, lambda: b.update(g, b.init(p), p, key=k))
    assert names == [], names
    assert _leaves_equal(got, want)
    # Params of other shapes: the borrowed program does not fit, a new one compiles.
    p2 = _mlp((41, 5))
    g2 = jax.tree.map(jnp.ones_like, p2)
    names, _ = _compiles.compiled(caplog, lambda: b.update(g2, b.init(p2), p2, key=k))
    assert names, names


def test_bench_first_call_script_runs_a_case_in_a_fresh_process():
    import json
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "bench_first_call.py"
    out = subprocess.run(
        [sys.executable, str(script), "--cases", "snip"], capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout.splitlines()[-1].removeprefix("RESULT "))["snip"]["this"]
    # One program for the scores (plus the finiteness check's), not one per operation.
    assert 1 <= result["first_compiles"] < 20 and result["later_compiles"] == 0
