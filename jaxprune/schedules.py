"""Schedules: step -> sparsity, and on which steps masks are refreshed.

A schedule is a small frozen record: calling it with a step gives the target
sparsity at that step (a float32 array, traceable), and
:meth:`Schedule.is_update_step` says whether masks are recomputed at that step.
Everything is plain ``jnp`` arithmetic, so the transform evaluates it inside
the jitted train step without retracing.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxprune._tree import as_int

__all__ = ["Schedule", "constant", "one_shot", "polynomial", "as_schedule"]


def _check_fraction(name: str, value: Any) -> float:
    if isinstance(value, (bool, str, bytes)):
        # float(True) == 1.0 and float("0.5") == 0.5 would pass silently.
        raise ValueError(
            f"{name} must be a number in [0, 1], got {value!r}. Fix: pass e.g. 0.9 for 90% "
            "sparsity."
        )
    if isinstance(value, jax.core.Tracer):
        raise ValueError(
            f"{name} must be a concrete number in [0, 1]: schedules are built outside jit, and "
            f"{name} here is traced (e.g. a sparsity swept with jax.vmap or passed into a jitted "
            "function). Fix: pass jp.prune(..., sparsity=lambda step: s), a schedule reading the "
            "traced s at every step, or build the schedule outside the transformation."
        )
    try:
        v = float(value)
    except (TypeError, ValueError):
        tree = isinstance(value, dict | list | tuple) or hasattr(value, "items")
        raise ValueError(
            f"{name} must be a number in [0, 1], got {value!r}. Fix: "
            + (
                "a schedule takes one sparsity; for one per leaf, give them to the selection, "
                "keyed by path: jp.prune(tx, sparsity=1.0, scope=jp.distributions.selection("
                "jp.distributions.explicit({'layers/0/kernel': 0.9, ...}))) (the schedule "
                "then only says when masks refresh), or jp.masks.topk(scores, tree of "
                "sparsities) for one-shot masks."
                if tree
                else "pass e.g. 0.9 for 90% sparsity."
            )
        ) from None
    if not 0.0 <= v <= 1.0:
        raise ValueError(
            f"{name} must be in [0, 1] (the fraction of weights pruned), got {v}. "
            "Fix: pass e.g. 0.9 for 90% sparsity."
        )
    return v


def _check_step(name: str, value: Any) -> int:
    v = as_int(value)
    if v is None or not 0 <= v < 2**31:
        raise ValueError(
            f"{name} must be an int in [0, 2**31) (the step counter is int32), got {value!r}."
        )
    return v


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A sparsity schedule: ``schedule(step) -> sparsity`` plus its refresh steps.

    A frozen dataclass (hashable, comparable by fields), so a schedule can be
    passed to :func:`jax.jit` or closed over by a jitted function as is.

    Args:
      fn: ``step -> sparsity`` (traceable).
        It must return one number per step (not a tuple, nor an array with axes).
      begin_step: first step on which masks are refreshed.
        An int in ``[0, 2**31)`` (the step counter is int32).
      end_step: last refresh step (inclusive), or ``None`` for no end.
        An int in ``[begin_step, 2**31)`` when given.
      frequency: masks refresh every ``frequency`` steps from ``begin_step``;
        ``end_step`` is always a refresh step, so the final sparsity is reached.
        An int ``>= 1``.
    """

    fn: Callable[[jax.Array], jax.Array]
    begin_step: int
    end_step: int | None
    frequency: int

    def __post_init__(self) -> None:
        # Built by hand (a TF-MOT port, a custom ramp) the fields are checked
        # here; the factories below check their own arguments by name first.
        if not callable(self.fn):
            raise ValueError(
                f"Schedule's fn must be a callable step -> sparsity, got {self.fn!r:.80}. Fix: "
                "e.g. Schedule(lambda step: 0.9 * jnp.minimum(step / 1000, 1.0), begin_step=0, "
                "end_step=1000, frequency=100)."
            )
        begin = _check_step("begin_step", self.begin_step)
        end = None if self.end_step is None else _check_step("end_step", self.end_step)
        if end is not None and end < begin:
            raise ValueError(
                f"end_step must be >= begin_step (or None for no end), got end_step={end} < "
                f"begin_step={begin}. Fix: pass end_step={begin} or later."
            )
        # Stored as Python ints, so that the refresh grid is static under jit.
        object.__setattr__(self, "begin_step", begin)
        object.__setattr__(self, "end_step", end)
        object.__setattr__(self, "frequency", _check_frequency(self.frequency))

    def __call__(self, step: ArrayLike) -> jax.Array:
        value = self.fn(jnp.asarray(step))
        if isinstance(value, tuple) and len(value) == 2 and _is_bool_like(value[0]):
            # TF-MOT's PruningSchedule.__call__ returns (should_prune, sparsity);
            # here the refresh steps are the Schedule's, not the function's.
            raise ValueError(
                f"a sparsity schedule must return one number per step, got a 2-tuple "
                f"({value!r:.80}); this looks like a TF-MOT schedule returning (should_prune, "
                "sparsity). Fix: return only the sparsity, and say when to refresh with "
                "jp.schedules.Schedule(fn, begin_step=..., end_step=..., frequency=...); a plain "
                "callable refreshes every step."
            )
        if not hasattr(value, "dtype") and not isinstance(value, int | float):
            raise ValueError(
                f"a sparsity schedule must return one number per step, got a "
                f"{type(value).__name__} ({value!r:.80}). Fix: for per-layer sparsities pass "
                "a selection that spreads one number over the layers as scope, e.g. "
                "scope=jp.distributions.selection(jp.distributions.erk), or "
                "selection(jp.distributions.explicit({path: sparsity}))."
            )
        if jnp.ndim(value):
            raise ValueError(
                f"a sparsity schedule must return one number per step, got an array of shape "
                f"{tuple(jnp.shape(value))}. Fix: return a scalar, e.g. lambda step: 0.9 * "
                "jnp.minimum(step / 1000, 1.0)."
            )
        return jnp.asarray(value, jnp.float32)

    def is_update_step(self, step: ArrayLike) -> jax.Array:
        """Returns whether masks are recomputed at ``step`` (a bool array)."""
        step = jnp.asarray(step, jnp.int32)
        on_grid = (step >= self.begin_step) & ((step - self.begin_step) % self.frequency == 0)
        if self.end_step is None:
            return on_grid
        return (on_grid & (step <= self.end_step)) | (step == self.end_step)


@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class _Constant:
    """``fn`` of :func:`constant` and :func:`one_shot`: the same sparsity at every step.

    Keeps the Python float it was built from, so that prune counts taken from
    it are Python's ``round(s * n)`` (see :func:`static_value`), not those of
    its float32 rounding: ``float32(0.7) * 5`` is just under 3.5.
    """

    value: float

    def __call__(self, step: jax.Array) -> jax.Array:
        return jnp.full((), self.value, jnp.float32)

    def __repr__(self) -> str:
        return f"constant({self.value!r})"


def static_value(schedule: Schedule, step: ArrayLike) -> jax.Array | float:
    """The sparsity of ``schedule`` at ``step``: a Python float where it is one number for good.

    For :func:`constant` and :func:`one_shot` schedules (and a float given as
    a sparsity) it is the number given, so the selections count
    ``round(s * n)`` in Python's arithmetic even inside ``jax.jit``; for any
    other schedule it is ``schedule(step)``, a float32 array.
    """
    if isinstance(schedule.fn, _Constant):
        return schedule.fn.value
    return schedule(step)


def _is_bool_like(x: Any) -> bool:
    """Is ``x`` a Python bool or a scalar bool array (a ``should_prune`` flag)?"""
    if isinstance(x, bool | np.bool_):
        return True
    return getattr(x, "dtype", None) == jnp.bool_ and jnp.ndim(x) == 0


def constant(sparsity: float, begin_step: int = 0, frequency: int | None = None) -> Schedule:
    """Returns a schedule holding ``sparsity`` from ``begin_step`` on.

    Masks are computed at ``begin_step`` and then every ``frequency`` steps
    (never again when ``frequency`` is ``None``).

    Args:
      sparsity: the fraction to prune, a concrete number in ``[0, 1]`` (not a bool,
        a string or a traced value).
      begin_step: the first refresh step, an int in ``[0, 2**31)``; default 0.
      frequency: steps between refreshes, an int ``>= 1``, or ``None`` (default):
        masks are computed once, at ``begin_step``.

    Examples:
      >>> import jaxprune as jp
      >>> s = jp.schedules.constant(0.8, begin_step=10)
      >>> float(s(0)), float(s(10)), bool(s.is_update_step(10)), bool(s.is_update_step(11))
      (0.800000011920929, 0.800000011920929, True, False)
    """
    v = _check_fraction("sparsity", sparsity)
    begin_step = _check_step("begin_step", begin_step)
    if frequency is None:
        return Schedule(_Constant(v), begin_step, begin_step, 1)
    frequency = _check_frequency(frequency)
    return Schedule(_Constant(v), begin_step, None, frequency)


def one_shot(sparsity: float, step: int) -> Schedule:
    """Returns a schedule that prunes to ``sparsity`` once, at ``step``.

    Args:
      sparsity: the fraction to prune, a concrete number in ``[0, 1]`` (not a bool,
        a string or a traced value).
      step: the one refresh step, an int in ``[0, 2**31)``.

    Examples:
      >>> import jaxprune as jp
      >>> s = jp.schedules.one_shot(0.5, step=100)
      >>> bool(s.is_update_step(99)), bool(s.is_update_step(100)), bool(s.is_update_step(200))
      (False, True, False)
    """
    v = _check_fraction("sparsity", sparsity)
    step = _check_step("step", step)
    return Schedule(_Constant(v), step, step, 1)


def _check_frequency(frequency: Any) -> int:
    v = as_int(frequency)
    if v is None or v < 1:
        raise ValueError(
            f"frequency must be an int >= 1 (refresh masks every `frequency` steps), got "
            f"{frequency!r}. Fix: e.g. frequency=100."
        )
    return v


def polynomial(
    initial_sparsity: float,
    final_sparsity: float,
    begin_step: int,
    end_step: int,
    frequency: int = 1,
    power: float = 3,
) -> Schedule:
    """Returns the gradual pruning schedule of Zhu & Gupta (2017).

    ``s_t = s_f + (s_i - s_f) * (1 - p) ** power`` with
    ``p = clip((t - begin_step) / (end_step - begin_step), 0, 1)``; masks refresh at
    ``begin_step, begin_step + frequency, ...`` and at ``end_step``. With
    ``power=3`` the sparsity values are TF-MOT's ``PolynomialDecay``, with two
    differences when porting:

    * ``frequency`` comes before ``power`` (the order of the signature
      ``polynomial(initial_sparsity, final_sparsity, begin_step, end_step,
      frequency=1, power=3)``), while ``PolynomialDecay`` takes ``power``
      first: ``PolynomialDecay(0.0, 0.9, 0, 1000, 3, 100)`` is
      ``polynomial(0.0, 0.9, 0, 1000, 100, 3)``. Passing them by keyword
      avoids the mix-up; a ``power`` above 10 (a decay that reaches the final
      sparsity almost at once) warns that the two may have been swapped.
    * jaxprune also refreshes at ``end_step`` when it is off the ``frequency``
      grid (``(end_step - begin_step) % frequency != 0``), so the final sparsity
      is reached; TF-MOT's last refresh is the last grid step before it.

    Args:
      initial_sparsity: sparsity at ``begin_step``, in ``[0, 1]``.
      final_sparsity: sparsity from ``end_step`` on, in ``[0, 1]`` and
        ``>= initial_sparsity`` (the schedule prunes more over time).
      begin_step: first refresh step (``>= 0``).
      end_step: last refresh step (``>= begin_step``).
      frequency: steps between refreshes (``>= 1``).
      power: exponent of the decay, a positive number (3 in the paper).

    Raises:
      ValueError: a sparsity is not a number in ``[0, 1]``, ``initial_sparsity >
        final_sparsity``, a step or ``frequency`` is out of range, or ``power``
        is not a positive number.

    Examples:
      >>> import jaxprune as jp
      >>> s = jp.schedules.polynomial(0.0, 0.9, begin_step=0, end_step=100)
      >>> [round(float(s(t)), 4) for t in (0, 50, 100, 200)]
      [0.0, 0.7875, 0.9, 0.9]

    References:
      Zhu & Gupta, "To prune, or not to prune: exploring the efficacy of pruning
      for model compression", 2017. https://arxiv.org/abs/1710.01878
    """
    s_i = _check_fraction("initial_sparsity", initial_sparsity)
    s_f = _check_fraction("final_sparsity", final_sparsity)
    if s_i > s_f:
        # Zhu & Gupta's schedule ramps up (s_i <= s_f); a decreasing one would
        # regrow pruned weights at every refresh.
        raise ValueError(
            f"initial_sparsity must be <= final_sparsity (the gradual schedule prunes more over "
            f"time), got initial_sparsity={s_i} > final_sparsity={s_f}. Fix: swap them, e.g. "
            f"polynomial({s_f}, {s_i}, ...), or use jp.schedules.constant({s_f}) for a fixed "
            "sparsity."
        )
    begin_step = _check_step("begin_step", begin_step)
    end_step = _check_step("end_step", end_step)
    if end_step < begin_step:
        raise ValueError(
            f"end_step must be >= begin_step, got end_step={end_step} < begin_step="
            f"{begin_step}. Fix: pass end_step={begin_step} or later."
        )
    frequency = _check_frequency(frequency)
    try:
        p = None if isinstance(power, (bool, str, bytes)) else float(power)
    except (TypeError, ValueError):
        p = None
    if p is None or not math.isfinite(p) or not p > 0:
        raise ValueError(
            f"power must be a positive number (the exponent of the decay), got {power!r}. "
            "Fix: e.g. power=3 as in Zhu & Gupta (TF-MOT's PolynomialDecay)."
        )
    if p > 10:
        warnings.warn(
            f"polynomial(..., frequency={frequency}, power={power!r}): a power above 10 reaches "
            "the final sparsity almost at once. TF-MOT's PolynomialDecay takes power before "
            "frequency; if this was ported positionally, swap them, e.g. "
            f"polynomial(..., frequency={int(p) if p == int(p) else p}, power={frequency}).",
            UserWarning,
            stacklevel=2,
        )
    return Schedule(
        _Polynomial(s_i, s_f, begin_step, end_step, power), begin_step, end_step, frequency
    )


@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class _Polynomial:
    """``fn`` of :func:`polynomial`: a value (equal when built from equal arguments)."""

    s_i: float
    s_f: float
    begin: int
    end: int
    power: Any

    def __call__(self, step: jax.Array) -> jax.Array:
        if self.end == self.begin:
            p = jnp.where(step >= self.begin, 1.0, 0.0)
        else:
            step = jnp.asarray(step)
            if jnp.issubdtype(step.dtype, jnp.integer):
                # Counted in ints: float32 holds every step only up to 2**24, and a ramp
                # that begins after that would advance in jumps.
                done = jnp.clip(step, self.begin, self.end) - self.begin
                p = done.astype(jnp.float32) / (self.end - self.begin)
            else:
                t = (step.astype(jnp.float32) - self.begin) / (self.end - self.begin)
                p = jnp.clip(t, 0.0, 1.0)
        # At p = 0 the formula in float32 can land an ulp below s_i (0.09999996 for
        # polynomial(0.1, 0.9, ...)), one entry fewer in a leaf where s_i * n ends in .5.
        decayed = self.s_f + (self.s_i - self.s_f) * (1.0 - p) ** self.power
        return jnp.where(p <= 0.0, jnp.float32(self.s_i), decayed)

    def __repr__(self) -> str:
        return (
            f"polynomial({self.s_i!r}, {self.s_f!r}, {self.begin}, {self.end}, "
            f"power={self.power!r})"
        )


def as_schedule(sparsity: Any) -> Schedule:
    """Returns ``sparsity`` as a :class:`Schedule`.

    A Python or NumPy number becomes ``constant(sparsity)`` (pruned once, at
    step 0); a ``Schedule`` is returned as is; any other callable ``step ->
    sparsity`` is refreshed on every step.

    A ``jax.Array`` is refused, concrete or traced: it is what
    ``optax.inject_hyperparams`` around ``jp.prune`` passes (traced under
    ``jax.jit``, concrete when stepped eagerly), and a transform rebuilt at
    every step from an injected number would hold it as a constant pruned at
    step 0 only, ignoring later values (and recompile at every eager step).
    Pass ``float(s)`` for a fixed sparsity, or a schedule for one that changes.

    Args:
      sparsity: a :class:`Schedule`, a callable ``step -> sparsity`` (checked at a few
        concrete steps to give values in ``[0, 1]`` where it can run outside a
        trace), or a Python or NumPy number in ``[0, 1]``; not a ``jax.Array``.

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> s = jp.schedules.as_schedule(0.5)
      >>> float(s(100)), bool(s.is_update_step(0)), bool(s.is_update_step(1))
      (0.5, True, False)
      >>> s = jp.schedules.as_schedule(lambda step: jnp.minimum(step / 100, 0.5))
      >>> round(float(s(10)), 4), bool(s.is_update_step(7)), s.end_step
      (0.1, True, None)
    """
    if isinstance(sparsity, Schedule):
        return sparsity
    if isinstance(sparsity, jax.core.Tracer):
        raise ValueError(
            f"sparsity must be known when the transform is built, got a traced value "
            f"{sparsity!r} (e.g. from optax.inject_hyperparams around jp.prune). Fix: pass "
            "a float or a schedule (jp.schedules.polynomial, or a callable step -> "
            "sparsity), and wrap the inner optimizer instead: "
            "jp.prune(optax.inject_hyperparams(optax.adam)(learning_rate=1e-3), sparsity=...)."
        )
    if isinstance(sparsity, jax.Array):
        # The same refusal as for the traced value above: a concrete array is
        # what optax.inject_hyperparams passes when its update runs eagerly.
        raise ValueError(
            f"sparsity must be a Python or NumPy number or a schedule, got a jax.Array "
            f"{sparsity!r}: optax.inject_hyperparams around jp.prune passes one (traced under "
            "jax.jit, concrete eagerly), and the transform it rebuilds at every step would prune "
            "once, at step 0, ignoring later values of the injected sparsity. Fix: pass "
            "float(sparsity) for a fixed sparsity, or a schedule (jp.schedules.polynomial, or a "
            "callable step -> sparsity) for one that changes, and inject hyperparameters into the "
            "inner optimizer instead: "
            "jp.prune(optax.inject_hyperparams(optax.adam)(learning_rate=1e-3), sparsity=...)."
        )
    if callable(sparsity):
        _check_callable(sparsity)
        return Schedule(sparsity, 0, None, 1)
    return constant(sparsity)


def _check_callable(fn: Callable[[jax.Array], Any]) -> None:
    """Raises ``ValueError`` when ``fn(step)`` is concrete and not a fraction in [0, 1].

    Checked eagerly at steps 0, 1, 10, ..., 10**7 (a schedule in percent, or
    one that overshoots, shows within them); inside the step the value is
    clipped to [0, 1]. A callable that cannot run outside a trace is left to
    fail, if it does, where the transform calls it.
    """
    for step in (0, 1, 10, 100, 1_000, 10_000, 100_000, 1_000_000, 10_000_000):
        try:
            v = np.asarray(fn(jnp.asarray(step, jnp.int32)), np.float64)
        except Exception:  # noqa: BLE001 - the transform reports its own errors later
            return
        if v.shape == () and not 0.0 <= float(v) <= 1.0:
            raise ValueError(
                f"sparsity(step) must return a fraction in [0, 1], got {float(v)} at step "
                f"{step}. Fix: return e.g. 0.9 for 90% sparsity, not 90."
            )
