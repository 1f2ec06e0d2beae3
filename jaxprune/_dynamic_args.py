"""The arguments of ``jp.dynamic.rigl`` / ``set``: their checks and RigL's drop fraction.

Every argument is checked once, when the transform is built (outside jit),
and RigL's cosine schedule of the fraction of active weights dropped and
regrown at each rewiring, :func:`cosine_drop_fraction`, checks its own
concrete arguments the same way.
"""

from __future__ import annotations

import functools
import numbers
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune._tree import as_int, check_where, key_parts
from jaxprune.stacked import check_stacked

__all__ = ["cosine_drop_fraction"]


def _is_real(value: Any) -> bool:
    """Is ``value`` a real number: a Python or NumPy scalar, or a concrete 0-d float array?

    ``bool`` is not one (``True`` would pass as 1.0), nor is a string
    (``float("0.3")`` would parse it).
    """
    # numbers.Real covers Python and NumPy scalars alike (np.float32 is not a float).
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
        return True
    # A concrete 0-d float array (jnp.float32(0.9), np.array(0.9)) is a real number too.
    return (
        isinstance(value, (jax.Array, np.ndarray))
        and not isinstance(value, jax.core.Tracer)
        and np.ndim(value) == 0
        and jnp.issubdtype(value.dtype, jnp.floating)
    )


def cosine_drop_fraction(step: Any, *, alpha: float, end_step: int) -> jax.Array:
    """Returns RigL's drop fraction ``alpha / 2 * (1 + cos(pi * step / end_step))``.

    ``step`` may be traced; ``alpha`` must be in ``[0, 1]`` and ``end_step`` a
    positive int (checked when they are concrete). Steps past ``end_step``
    give 0; a concrete negative step is refused (the cosine would mirror it).

    Args:
      step: the current step, an int or float scalar (may be traced); computed in
        float32 and clipped to at most ``end_step``.
      alpha: the drop fraction at step 0, a real number in ``[0, 1]`` (not a bool;
        checked unless traced), e.g. 0.3 as in RigL.
      end_step: the step where the fraction reaches 0, a positive int (checked unless
        traced).

    Raises:
      ValueError: ``alpha`` is not a number in ``[0, 1]``, ``end_step`` is
        not a positive int, or a concrete ``step`` is negative.

    Examples:
      >>> import jaxprune as jp
      >>> [round(float(jp.dynamic.cosine_drop_fraction(t, alpha=0.3, end_step=10)), 4)
      ...  for t in (0, 5, 10)]
      [0.3, 0.15, 0.0]

    References:
      Evci et al., "Rigging the Lottery: Making All Tickets Winners", 2020.
      https://arxiv.org/abs/1911.11134
    """
    if not isinstance(alpha, jax.core.Tracer) and (
        not _is_real(alpha) or not 0.0 <= float(alpha) <= 1.0
    ):
        raise ValueError(
            f"alpha must be a number in [0, 1] (the initial fraction of active weights dropped "
            f"and regrown), got {alpha!r}. Fix: e.g. alpha=0.3 as in RigL."
        )
    if not isinstance(end_step, jax.core.Tracer) and (as_int(end_step) is None or end_step < 1):
        raise ValueError(
            f"end_step must be a positive int (the step where the drop fraction reaches 0), got "
            f"{end_step!r}. Fix: RigL uses 75% of the training steps, e.g. "
            "end_step=int(0.75 * total_steps)."
        )
    if not isinstance(step, jax.core.Tracer) and np.any(np.asarray(step) < 0):
        # Checked, not clipped: the cosine is even, so a negative step would mirror
        # a positive one, and any op on a traced step changes the compiled program.
        raise ValueError(
            f"step must be >= 0 (RigL's schedule starts at step 0), got {step!r}. Fix: count "
            "steps from 0."
        )
    t = jnp.minimum(jnp.asarray(step, jnp.float32), end_step)
    return jnp.float32(alpha / 2) * (1.0 + jnp.cos(jnp.pi * t / end_step))


def _is_selection(fn: Any) -> bool:
    """Is ``fn`` one of jaxprune's selections (masks, not per-leaf sparsities)?

    ``jp.distributions.selection(d)``, a ``jp.masks`` selection (``topk``,
    ``global_topk``, ...), a ``functools.partial`` of one, or a
    ``jp.masks.per_layer`` of one. A selection of the user's own is caught
    when it returns (``_check_per_leaf``).
    """
    while isinstance(fn, functools.partial):
        fn = fn.func
    if hasattr(fn, "per_layer"):  # jp.masks.per_layer(select, stacked=...)
        return True
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", "")
    return module == "jaxprune.masks" or (
        module == "jaxprune.distributions" and qualname.startswith("selection.")
    )


def _label(fn: Any) -> str:
    """Names a selection as the user wrote it: ``selection(...)``, ``jp.masks.topk``."""
    qualname = getattr(fn, "__qualname__", None) or repr(fn)
    if qualname.startswith("selection."):
        return "jp.distributions.selection(...)"
    if getattr(fn, "__module__", None) == "jaxprune.masks":
        return f"jp.masks.{qualname}"
    return repr(fn)


def _validate(
    sparsity,
    update_every,
    end_step,
    drop_fraction,
    regrow,
    key,
    distribution,
    where,
    stacked,
    *,
    cosine,
):
    if not _is_real(sparsity) or not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(
            f"sparsity must be a float in [0, 1) (a Python, NumPy or 0-d JAX real number: the "
            f"constant "
            f"fraction of pruned weights), got {sparsity!r}. Fix: e.g. sparsity=0.9."
        )
    if as_int(update_every) is None or update_every < 1:
        raise ValueError(
            f"update_every must be a positive int (steps between drop/grow), got "
            f"{update_every!r}. Fix: e.g. update_every=100 as in RigL."
        )
    if cosine and end_step is None:
        # The cosine drop fraction f(t) = alpha/2 (1 + cos(pi t / T_end)) needs T_end.
        raise ValueError(
            "end_step must be a positive int for RigL (its cosine drop schedule decays to 0 at "
            "end_step), got None. Fix: RigL uses 75% of the training steps, e.g. "
            "end_step=int(0.75 * total_steps)."
        )
    if end_step is not None and (as_int(end_step) is None or end_step < 1):
        raise ValueError(
            f"end_step must be a positive int (last drop/grow step)"
            f"{'' if cosine else ' or None (update until training ends)'}, got {end_step!r}. "
            "Fix: RigL uses 75% of the training steps."
        )
    if not _is_real(drop_fraction):
        raise ValueError(
            f"drop_fraction must be a real number in [0, 1] (a Python, NumPy or 0-d JAX float: "
            f"the fraction of active weights dropped and regrown per update), got "
            f"{drop_fraction!r} of type {type(drop_fraction).__name__}. Fix: e.g. "
            "drop_fraction=0.3 as in RigL (a number, not a string or a bool)."
        )
    if not 0.0 <= float(drop_fraction) <= 1.0:
        raise ValueError(
            f"drop_fraction must be in [0, 1] (the fraction of active weights dropped and "
            f"regrown per update), got {drop_fraction!r}. Fix: e.g. drop_fraction=0.3."
        )
    if not callable(distribution):
        raise ValueError(
            f"distribution must be a callable (params, sparsity, *, where) -> per-leaf "
            f"sparsities, got {distribution!r}. Fix: e.g. distribution=jp.distributions.erk "
            "(the function, not the string 'erk'), jp.distributions.uniform or "
            "jp.distributions.explicit({path: sparsity})."
        )
    if _is_selection(distribution):
        raise ValueError(
            f"distribution must be a distribution (params, sparsity, *, where) -> one sparsity "
            f"per leaf, got the selection {_label(distribution)}, which returns masks (the "
            "form jp.prune's scope takes). Fix: pass the distribution itself, e.g. "
            "distribution=jp.distributions.erk, not jp.distributions.selection(erk) or a mask "
            "selection such as jp.masks.topk."
        )
    if regrow not in ("gradient", "random"):
        raise ValueError(f"regrow must be 'gradient' (RigL) or 'random' (SET), got {regrow!r}.")
    check_where(where)
    check_stacked(stacked)
    key_parts(key, "key")  # one PRNG key, typed or raw, for the initial random masks


def _check_begin_step(begin_step, end_step: int | None) -> int:
    """Returns ``begin_step`` as an int in ``[0, end_step)``, else raises a ``ValueError``."""
    b = as_int(begin_step)
    if b is None or isinstance(begin_step, bool) or b < 0:
        raise ValueError(
            f"begin_step must be an int >= 0 (the first rewiring step), got {begin_step!r}. "
            "Fix: e.g. begin_step=0 (rewire from the first update_every steps on)."
        )
    if end_step is not None and b >= end_step:
        raise ValueError(
            f"begin_step={b} must be below end_step={end_step} (rewiring happens from "
            "begin_step until end_step), or nothing would ever rewire. Fix: a smaller "
            f"begin_step (e.g. begin_step={end_step // 4}) or a larger end_step."
        )
    return b


def _warn_never_rewires(name: str, end_step: int, update_every: int) -> None:
    """Warns that ``end_step <= update_every`` leaves no step to rewire at.

    A rewiring step is a positive multiple of ``update_every`` below
    ``end_step``: a short run with RigL's ``update_every=100`` and
    ``end_step=int(0.75 * steps)`` (``steps <= 133``) has none, and trains
    at the initial random masks.
    """
    warnings.warn(
        f"jp.dynamic.{name} will never rewire: with end_step={end_step} <= "
        f"update_every={update_every} no step is both a positive multiple of update_every "
        f"(the first rewiring would be step {update_every}) and below end_step (where "
        "rewiring stops), so training stays at the initial random masks (static sparse). "
        f"Fix: lower update_every below end_step (e.g. update_every={max(1, end_step // 10)}) "
        "or raise end_step (RigL: 75% of the training steps); for a static random mask on "
        f"purpose, pass jp.dynamic.set(..., drop_fraction=0.0).",
        UserWarning,
        stacklevel=3,
    )
