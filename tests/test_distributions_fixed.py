"""ERK and uniform with leaves whose sparsity is fixed by hand (jaxpruner's custom_sparsity_map)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune as jp

PARAMS = {
    "conv": {"kernel": jnp.ones((3, 3, 1, 8)), "bias": jnp.ones(8)},
    "fc": {"kernel": jnp.ones((200, 100)), "bias": jnp.ones(100)},
    "mid": {"kernel": jnp.ones((100, 100)), "bias": jnp.ones(100)},
    "out": {"kernel": jnp.ones((100, 10)), "bias": jnp.ones(10)},
}
SIZES = {"conv": 72, "fc": 20000, "mid": 10000, "out": 1000}


def _kept(d):
    return sum((1 - float(d[k]["kernel"])) * n for k, n in SIZES.items())


@pytest.mark.parametrize("s", [0.9, 0.92])
def test_erk_fixed_leaves_keep_their_value_and_the_others_make_up_the_total(s):
    d = jp.distributions.erk(PARAMS, s, fixed={"fc/kernel": 0.95, "conv/kernel": 0.0})
    assert float(d["fc"]["kernel"]) == 0.95 and float(d["conv"]["kernel"]) == 0.0
    assert _kept(d) == pytest.approx((1 - s) * sum(SIZES.values()), rel=1e-5)
    # The free leaves keep ERK's proportions between them: density ~ (sum d) / (prod d).
    dm, do = 1 - float(d["mid"]["kernel"]), 1 - float(d["out"]["kernel"])
    assert dm / do == pytest.approx((200 / 10000) / (110 / 1000), rel=1e-5)
    assert d["fc"]["bias"] == 0.0


def test_erk_fixed_overflow_makes_a_free_leaf_dense_and_re_solves():
    # With fc fixed at 0.95, the others must keep a lot: "conv" and "out" overflow density 1.
    d = jp.distributions.erk(PARAMS, 0.75, fixed={"fc/kernel": 0.95})
    assert float(d["out"]["kernel"]) == 0.0 and float(d["conv"]["kernel"]) == 0.0
    assert 0.0 < float(d["mid"]["kernel"]) < 1.0
    assert _kept(d) == pytest.approx(0.25 * sum(SIZES.values()), rel=1e-5)


def test_uniform_fixed_shares_the_rest_evenly():
    d = jp.distributions.uniform(PARAMS, 0.8, fixed={"out/kernel": 0.0})
    assert float(d["out"]["kernel"]) == 0.0
    rest = [float(d[k]["kernel"]) for k in ("conv", "fc", "mid")]
    assert rest == pytest.approx([rest[0]] * 3, rel=1e-6)
    assert _kept(d) == pytest.approx(0.2 * sum(SIZES.values()), rel=1e-5)
    # Without `fixed`, uniform is unchanged: the value itself, not a solve.
    assert jp.distributions.uniform(PARAMS, 0.8)["fc"]["kernel"] == 0.8


def test_erk_fixed_traced_total_matches_the_eager_one():
    f = functools.partial(jp.distributions.erk, fixed={"fc/kernel": 0.95})
    eager, traced = f(PARAMS, 0.9), jax.jit(lambda s: f(PARAMS, s))(jnp.float32(0.9))
    for k in SIZES:
        assert float(traced[k]["kernel"]) == pytest.approx(float(eager[k]["kernel"]), abs=1e-6)


def test_erk_fixed_unreachable_total_raises_eagerly_and_clips_when_traced():
    fixed = {"fc/kernel": 0.9}  # prunes 18000 of 31072 entries on its own: 0.579 of the total
    with pytest.raises(
        ValueError, match=r"sparsity 0\.3 cannot be reached with fixed=.*\[0\.5793, "
    ):
        jp.distributions.erk(PARAMS, 0.3, fixed=fixed)
    with pytest.raises(ValueError, match=r"can only range over \[0\.0000, 0\.3563\]"):
        jp.distributions.uniform(PARAMS, 0.5, fixed={"fc/kernel": 0.0})
    # Traced (a schedule's early value inside jp.prune): the free leaves stay dense.
    d = jax.jit(lambda s: jp.distributions.erk(PARAMS, s, fixed=fixed))(jnp.float32(0.3))
    assert [float(d[k]["kernel"]) for k in ("conv", "mid", "out")] == [0.0, 0.0, 0.0]
    assert float(d["fc"]["kernel"]) == pytest.approx(0.9)


@pytest.mark.parametrize(
    "fixed, match",
    [
        ([("fc/kernel", 0.5)], r"fixed takes a mapping \{path: sparsity\}, got list"),
        ({"fc/kernal": 0.5}, r"fixed names no leaf: \['fc/kernal'\]; the leaves are \["),
        ({"fc/bias": 0.5}, r"fixed names a leaf that is not prunable: 'fc/bias'"),
        (
            {"fc/kernel": 1.5},
            r"fixed sparsity for 'fc/kernel' must be a number in \[0, 1\], got 1\.5",
        ),
        ({"fc/kernel": True}, r"fixed sparsity for 'fc/kernel' must be a number .*got True"),
    ],
)
def test_erk_fixed_bad_input(fixed, match):
    with pytest.raises(ValueError, match=match):
        jp.distributions.erk(PARAMS, 0.9, fixed=fixed)


def _ramp(params):
    return jax.tree.map(lambda x: x * jnp.arange(1, x.size + 1).reshape(x.shape), params)


def test_erk_fixed_as_a_prune_scope_under_a_schedule():
    dist = functools.partial(jp.distributions.erk, fixed={"conv/kernel": 0.0, "fc/kernel": 0.95})
    tx = jp.prune(
        optax.sgd(0.1),
        sparsity=jp.schedules.polynomial(0.0, 0.9, 0, 2),
        scope=jp.distributions.selection(dist),
    )
    params = _ramp(PARAMS)
    st = tx.init(params)
    step = jax.jit(tx.update)
    for _ in range(3):
        _, st = step(params, st, params)
    masks = jp.get_masks(st)
    want = dist(PARAMS, 0.9)
    for k in SIZES:
        m = np.asarray(masks[k]["kernel"])
        assert (~m).sum() == round(float(want[k]["kernel"]) * m.size), k
    assert not (~np.asarray(masks["conv"]["kernel"])).any()
    assert (~np.asarray(masks["fc"]["kernel"])).sum() == 19000


def test_erk_fixed_as_a_rigl_distribution():
    dist = functools.partial(jp.distributions.erk, fixed={"mid/kernel": 0.5})
    tx = jp.dynamic.rigl(
        optax.sgd(0.1), sparsity=0.8, key=jax.random.key(0), end_step=10, distribution=dist
    )
    st = tx.init(_ramp(PARAMS))
    want = dist(PARAMS, 0.8)
    for k in SIZES:
        m = np.asarray(st.masks[k]["kernel"])
        assert (~m).sum() == round(float(want[k]["kernel"]) * m.size), k
    assert (~np.asarray(st.masks["mid"]["kernel"])).sum() == 5000
