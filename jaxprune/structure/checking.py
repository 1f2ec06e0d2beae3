"""Checking a shrink: does the shrunk network compute what the masked one does, and if not, why.

:func:`~jaxprune.structure.shrink` (and ``shrink_module`` / ``shrink_linen``)
runs the model on the shrunk params and compares with the masked model
(:func:`_check_outputs`, with a tolerance widened for low-precision dtypes).
When the check fails, the error says what happened: the outputs differ
(:class:`OutputMismatch`) or the model no longer runs (:class:`ApplyFailure`,
with the fix for the entry point used), and :func:`_culprits` finds the groups
whose cut alone breaks it so that :func:`_named` can name them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune._tree import leaves_with_paths, path_str
from jaxprune.structure.evaluate import run_once
from jaxprune.structure.graph import Group, find_groups
from jaxprune.structure.program import Program


class AdaptError(ValueError):
    """A model wrapper could not run on the shrunk params; its message names the fix."""


def _tolerance(rtol: float, dtypes) -> float:
    """Returns ``rtol`` widened to the round-off of the least precise float dtype in ``dtypes``.

    The shrunk network adds the same numbers in another order (folded biases,
    fewer terms in a sum), so it differs from the masked one by a few units of
    the last place: far below ``1e-4`` in float32, but bfloat16's unit is
    ``2**-7``, so a bf16 (or bf16-compute) model would fail a fixed ``1e-4``.
    """
    eps = [float(jnp.finfo(d).eps) for d in dtypes if jnp.issubdtype(d, jnp.floating)]
    return max([rtol] + [8 * e for e in eps])


# What to do when the shrunk network no longer runs, by entry point (see ApplyFailure).
_APPLY_FIX = {
    "shrink": (
        "Likely cause: a layer width is fixed by an attribute rather than read from the "
        "params' shapes (linen Dense(features=...), a grouped conv's feature_group_count). "
        "Fix: for nnx models use structure.shrink_module, for linen structure.shrink_linen "
        "(or pass structure.linen_apply(module) as apply_fn); otherwise rebuild the model "
        "with the widths from structure.widths(params, small) and pass check=False."
    ),
    "nnx": (
        "Likely cause: a custom layer's width is fixed by an attribute (e.g. a reshape to "
        "self.n set in __init__); structure.shrink_module updates the width attributes of "
        "flax's own layers (Linear, Conv, BatchNorm, ...), not those of custom layers. "
        "Fix: read that width from the layer's params or input when called (e.g. "
        "self.g.shape[-1] or x.shape[-1] instead of self.n), or select without the groups "
        "of that layer's params. The model was left as it was."
    ),
    "linen": (
        "Likely cause: a custom module's width is fixed by an attribute (e.g. a reshape to "
        "self.features); structure.linen_apply adapts flax's own layers (Dense, Conv, ...), "
        "not custom ones. Fix: read that width from the params or input when called (e.g. "
        "x.shape[-1]), select without the groups of that module's params, or rebuild the "
        "module with the widths from structure.widths(variables, small) and pass check=False. "
        "If the error says a width must be divisible by the number of heads (flax's "
        "MultiHeadDotProductAttention without qkv_features), select with round_to=num_heads "
        "so the cut width stays a multiple of it."
    ),
}


class ApplyFailure(ValueError):
    """The model (``apply_fn``) fails to run on the shrunk params."""

    def __init__(self, err: Exception, how: str = "shrink", groups: str | None = None):
        named = "" if groups is None else f" Cutting one group alone already breaks it: {groups}."
        super().__init__(
            f"apply_fn fails on the shrunk params ({type(err).__name__}: {err}).{named} "
            f"{_APPLY_FIX[how]}"
        )
        self.err, self.how = err, how


def _check_outputs(
    apply_fn,
    small,
    masked,
    example_inputs,
    rtol=1e-4,
    *,
    reference_fn=None,
    dtypes=(),
    how: str = "shrink",
) -> None:
    """Raises unless ``apply_fn(small, *x)`` matches ``reference_fn(masked, *x)``.

    ``reference_fn`` defaults to ``apply_fn``; ``dtypes`` (the program's value
    dtypes) widen ``rtol`` for low-precision models, see :func:`_tolerance`;
    ``how`` (``"shrink"``, ``"nnx"``, ``"linen"``) picks the fix named when
    ``apply_fn`` fails to run (:class:`ApplyFailure`).
    """
    reference_fn = apply_fn if reference_fn is None else reference_fn
    try:
        got = run_once(apply_fn, small, *example_inputs)
    except AdaptError:
        raise
    except Exception as err:  # noqa: BLE001 - re-raised with the likely cause
        raise ApplyFailure(err, how) from err
    want = run_once(reference_fn, masked, *example_inputs)
    leaves = jax.tree.leaves((got, want, small))
    rtol = _tolerance(rtol, list(dtypes) + [jnp.result_type(x) for x in leaves])
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        scale = max(float(np.max(np.abs(b))), 1.0) if b.size else 1.0
        if a.shape != b.shape or not np.allclose(a, b, rtol=rtol, atol=rtol * scale):
            raise OutputMismatch(float(np.max(np.abs(a - b))) if a.shape == b.shape else None)


_WIDTH_NUMBER = (
    "the model computes a number from a layer width (x / sqrt(fan_in), x.shape[-1] used "
    "as a value), which the shrunk network recomputes from the new width"
)


class OutputMismatch(ValueError):
    """The shrunk network computes something other than the masked one."""

    def __init__(self, diff: float | None, groups: str | None = None):
        head = (
            "the shrunk network's outputs differ from the masked network's (max abs "
            f"difference {'shapes differ' if diff is None else diff})."
        )
        if groups is None:
            msg = (
                f"{head} Likely cause: {_WIDTH_NUMBER}. Fix: leave that group out of the "
                "selection. If the model has no such number, this is a jaxprune bug: please "
                "report it with the model."
            )
        else:
            msg = (
                f"{head} Cutting one group alone already changes them: {groups}. Likely "
                f"cause: {_WIDTH_NUMBER}. Fix: select without that group, e.g. "
                "structure.select([g for g in groups if g not in bad], scores, sparsity)."
            )
        super().__init__(msg)
        self.diff = diff


def _culprits(check, params, removed, prog) -> list[Group]:
    """Returns the groups whose cut alone changes the outputs (one re-plan per cut group).

    ``removed`` and ``prog`` are :func:`plan`'s; ``check(masks)`` shrinks by
    ``masks`` and raises ``ValueError`` when the result fails its check. Run
    only after a failed check, to name the groups in the error.
    """
    flat, treedef = leaves_with_paths(params)
    out = []
    for g in find_groups(prog, warn=False).groups:
        if not g.prunable or not any(removed.get((m.leaf, m.axis)) for m in g.members):
            continue
        one = [np.ones(np.shape(x), bool) for _, x in flat]
        for m in g.members:
            idx = sorted(removed.get((m.leaf, m.axis), ()))
            if idx:
                sl = [slice(None)] * one[m.leaf].ndim
                sl[m.axis] = idx
                one[m.leaf][tuple(sl)] = False
        try:
            check(jax.tree.unflatten(treedef, one))
        except ValueError:
            out.append(g)
    return out


def _members(g: Group, prog: Program, shown: int = 4) -> str:
    """Returns ``g``'s members for a message: all of them (by path), or when there are more
    than ``shown``, the kernels (ndim >= 2) first and ``(+N more)``.

    A group's members are sorted by path, so a Conv-BatchNorm group cut short
    would otherwise open with the BatchNorm's four vectors and hide the layers.
    """
    ms = list(g.members)
    if len(ms) > shown:
        ndim = [len(prog.shapes[v]) for v in prog.param_ids]
        ms.sort(key=lambda m: ndim[m.leaf] < 2)  # stable: paths stay sorted
    names = ", ".join(f"{path_str(m.path)}[{m.axis}]" for m in ms[:shown])
    return names + (f" (+{len(ms) - shown} more)" if len(ms) > shown else "")


def _named(err, groups: list[Group], prog: Program, layers=None):
    """Returns ``err`` (an OutputMismatch or ApplyFailure) naming ``groups`` (or ``err``).

    ``layers(groups)``, when given, names the layers of those groups that the
    entry point cannot adapt (``""`` if none); an :class:`ApplyFailure` says so.
    """
    if not groups:
        return err
    names = "; ".join(_members(g, prog) for g in groups)
    if isinstance(err, ApplyFailure):
        suspects = layers(groups) if layers is not None else ""
        if suspects:
            names += (
                f". Of the layers in {'it' if len(groups) == 1 else 'them'}, shrink_module "
                f"does not update the width attributes of {suspects}"
            )
        return ApplyFailure(err.err, err.how, names)
    return OutputMismatch(err.diff, names)
