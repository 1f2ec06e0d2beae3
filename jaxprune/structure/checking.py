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
from jaxprune.structure.graph import Group, channel_indices, find_groups
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
        "Fix: read that width from the layer's params or values when called (e.g. "
        "self.g.shape[-1] or h.shape[-1] as a reshape size, instead of self.n), or select "
        "without the groups of that layer's params. "
        "Another cause: {branch}; fix: {branch_fix}. The model was left as it was."
    ),
    "linen": (
        "Likely cause: a custom module's width is fixed by an attribute (e.g. a reshape to "
        "self.features); structure.linen_apply adapts flax's own layers (Dense, Conv, ...), "
        "not custom ones. Fix: read that width from the params or values when called (e.g. "
        "h.shape[-1] as a reshape size, instead of self.features), select without the "
        "groups of that module's params, or rebuild the module with the widths from "
        "structure.widths(variables, small) and pass check=False. Another cause: {branch}; "
        "fix: {branch_fix}. If the error says a width must be divisible by the number of "
        "heads (flax's MultiHeadDotProductAttention without qkv_features), select with "
        "round_to=num_heads so the cut width stays a multiple of it."
    ),
}
# Shape-dependent control flow: the shrunk call runs another path than the traced one.
_BRANCH = (
    "a Python branch on an input width (e.g. `if x.shape[-1] != self.features:` choosing a "
    "projection shortcut) goes the other way once that width is cut, so the shrunk call "
    "takes another code path than the traced one"
)
_BRANCH_FIX = (
    "branch on a constructor attribute set when the model is built (e.g. a `proj: bool` "
    "field, or `in_features != out_features` from __init__), not on x.shape, or select "
    "without that group"
)
_MISSING_PARAM = (
    "ScopeParamNotFoundError",
    "ScopeCollectionNotFound",
    "ScopeVariableNotFoundError",
)


def _apply_fix(err: Exception, how: str) -> str:
    """Returns the likely cause and fix of ``err``, raised by the shrunk call under ``how``.

    A param that the call looks for and the variables lack comes from a code
    path that the traced call did not take: with the traced path's params
    restored, that is a branch on a width, whatever the entry point.
    """
    if type(err).__name__ in _MISSING_PARAM:
        return (
            f"Likely cause: {_BRANCH}, and the layers of the branch now taken have no params. "
            f"Fix: {_BRANCH_FIX}."
        )
    return _APPLY_FIX[how].format(branch=_BRANCH, branch_fix=_BRANCH_FIX)


class ApplyFailure(ValueError):
    """The model (``apply_fn``) fails to run on the shrunk params."""

    def __init__(self, err: Exception, how: str = "shrink", groups: str | None = None):
        # groups: _named's sentence naming the culprits, up to its final period.
        named = "" if groups is None else f" {groups}."
        super().__init__(
            f"apply_fn fails on the shrunk params ({type(err).__name__}: {err}).{named} "
            f"{_apply_fix(err, how)}"
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

    def __init__(self, diff: float | None, groups: str | None = None, several: bool = False):
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
                f"{head} {groups}. Likely cause: {_WIDTH_NUMBER}. Fix: select without "
                f"{'those groups' if several else 'that group'}, e.g. "
                "structure.select([g for g in groups if g not in bad], scores, sparsity)."
            )
        super().__init__(msg)
        self.diff = diff


def _culprits(check, params, removed, prog) -> tuple[list[Group], int]:
    """Returns ``(groups whose cut alone fails the check, number of groups cut)``.

    ``removed`` and ``prog`` are :func:`plan`'s; ``check(masks)`` shrinks by
    ``masks`` and raises ``ValueError`` when the result fails its check. Each
    cut group is re-planned alone (masks that cut only its removed channels).
    Run only after a failed check, to name the groups in the error.
    """
    flat, treedef = leaves_with_paths(params)
    out, tried = [], 0
    for g in find_groups(prog, warn=False).groups:
        if not g.prunable or not any(removed.get((m.leaf, m.axis)) for m in g.members):
            continue
        tried += 1
        one = [np.ones(np.shape(x), bool) for _, x in flat]
        for m in g.members:
            # Only this group's channels: an axis shared with another group (both
            # halves of a concatenation feeding one kernel) holds theirs too.
            size = np.shape(flat[m.leaf][1])[m.axis]
            mine = {i for c in range(g.channels) for i in channel_indices(m.layout, size, c)}
            idx = sorted(set(removed.get((m.leaf, m.axis), ())) & mine)
            if idx:
                sl = [slice(None)] * one[m.leaf].ndim
                sl[m.axis] = idx
                one[m.leaf][tuple(sl)] = False
        try:
            check(jax.tree.unflatten(treedef, one))
        except ValueError:
            out.append(g)
    return out, tried


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


def _grouped_convs(groups: list[Group], prog: Program) -> str:
    """Returns the grouped and depthwise convs whose kernel is in ``groups``, for a message.

    Their ``feature_group_count`` is a static number in the traced program; a
    model that keeps it in an attribute (``nnx.Conv`` run through
    ``nnx.merge``, linen's ``Conv``) fails on a shrunk kernel, the usual reason
    a plain ``apply_fn`` cannot run a shrunk depthwise stage.
    """
    producers = {o: i for i, e in enumerate(prog.eqns) for o in e.outs}
    leaf_of = {v: k for k, v in enumerate(prog.param_ids)}
    members = {m.leaf for g in groups for m in g.members}
    found = []
    for e in prog.eqns:
        count = (
            e.params.get("feature_group_count", 1) if e.prim.name == "conv_general_dilated" else 1
        )
        if count == 1:
            continue
        v = e.ins[1]
        while v not in leaf_of and v in producers and len(prog.eqns[producers[v]].ins) == 1:
            v = prog.eqns[producers[v]].ins[0]  # through casts and reshapes
        if leaf_of.get(v) in members:
            dn = e.params["dimension_numbers"]
            kind = "depthwise" if count == prog.shapes[e.ins[0]][dn.lhs_spec[1]] else "grouped"
            name = path_str(prog.param_paths[leaf_of[v]])
            entry = f"the {kind} conv with kernel {name} (feature_group_count={count})"
            if entry not in found:
                found.append(entry)
    return ", ".join(found)


def _named(err, groups: list[Group], prog: Program, layers=None, tried: int | None = None):
    """Returns ``err`` (an OutputMismatch or ApplyFailure) naming ``groups`` (or ``err``).

    ``groups`` are :func:`_culprits`'s, each of which fails the check when cut
    alone; ``tried`` is how many groups were cut in all. Each group is named by
    its members (``leaf[axis]``), so the sentence says how many groups that
    list is and of how many, lest one group's members read as several groups.
    ``layers(groups)``, when given, names the layers of those groups that the
    entry point cannot adapt (``""`` if none); an :class:`ApplyFailure` says so,
    and otherwise (plain ``jp.shrink``) names the grouped convs in them.
    """
    if not groups:
        return err
    n = len(groups)
    tried = max(tried or n, n)
    if n == 1:
        size = len(groups[0].members)
        one = f"(named by its {size} member{'s' if size > 1 else ''}, leaf[axis]) cut alone"
        lead = (
            f"Of the {tried} groups the masks cut, one group {one}"
            if tried > 1
            else f"The masks cut one group, and that group {one}"
        )
        verb = "already breaks it" if isinstance(err, ApplyFailure) else "already changes them"
        names = _members(groups[0], prog)
    else:
        some = ("both" if n == 2 else f"all {n}") if n == tried else str(n)
        lead = f"Of the {tried} groups the masks cut, {some}"
        effect = "break it" if isinstance(err, ApplyFailure) else "change them"
        verb = f"{effect}, each when cut alone (groups named by their members, leaf[axis])"
        names = "; ".join(f"({k}) {_members(g, prog)}" for k, g in enumerate(groups, 1))
    text = f"{lead} {verb}: {names}"
    if isinstance(err, ApplyFailure):
        it, they = ("it", "It holds") if n == 1 else ("them", "They hold")
        suspects = layers(groups) if layers is not None else ""
        if suspects:
            text += (
                f". Of the layers in {it}, shrink_module does not update the width "
                f"attributes of {suspects}"
            )
        elif err.how == "shrink":
            convs = _grouped_convs(groups, prog)
            if convs:
                text += (
                    f". {they} {convs}, which a "
                    "layer keeping feature_group_count in an attribute (nnx.Conv run through "
                    "nnx.merge, linen Conv) cannot run cut"
                )
        return ApplyFailure(err.err, err.how, text)
    return OutputMismatch(err.diff, text, several=n > 1)
