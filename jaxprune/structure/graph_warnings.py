"""The warnings of :func:`~jaxprune.structure.graph.find_groups`, in plain words.

Groups that opaque primitives hide are left unprunable, with one warning per
set of such primitives (:func:`_opaque_message`) naming them and the likely
fix: a train-mode call when the program draws random numbers (:data:`RANDOM`),
layers stacked under a scan, an embedding lookup. Params that no equation
reads are pinned (:data:`NEVER_USED`), with a warning naming them
(:func:`_warn_unused`).
"""

from __future__ import annotations

import warnings

from jaxprune._tree import path_str
from jaxprune.structure.program import Program

# Primitives that draw random numbers: a program holding them is a train-mode call.
RANDOM = frozenset(
    """random_bits random_seed random_wrap random_unwrap random_fold_in random_split
    threefry2x32 rng_bit_generator rng_uniform""".split()
)
NEVER_USED = "never used by the traced call"


def _opaque_message(prims: list[str], names: list[str], rand: list[str]) -> str:
    """Returns the one warning for the groups that ``prims`` hide."""
    shown = ", ".join(dict.fromkeys(names[:6])) + (" ..." if len(names) > 6 else "")
    where = f"the channel groups along {shown} are left unprunable"
    if rand:
        return (
            f"jaxprune.structure: the traced call draws random numbers ({rand}, e.g. Dropout "
            f"in train mode), and primitive(s) {prims} on them cannot be seen through; {where}. "
            "Fix: trace the deterministic (eval-mode) call: for linen, pass deterministic=True "
            "/ train=False (e.g. structure.linen_apply(module, train=False)); for nnx, call "
            "model.eval() before structure.module_apply."
        )
    if {"scan", "while"} & set(prims):
        return (
            f"jaxprune.structure: primitive(s) {prims} cannot be seen through: layers stacked "
            f"under lax.scan, nn.scan or nnx.scan (or a while loop) are not cut, and {where}. "
            "Fix: to plan channel pruning of a stack, trace an unrolled copy of the model; "
            "prune a stack's weights (unstructured, N:M) with jp.masks.per_layer."
        )
    if prims == ["gather"]:
        return (
            f"jaxprune.structure: primitive 'gather' (an embedding lookup table[ids], or "
            f"indexing with an array, e.g. jax.image.resize 'nearest') cannot be seen through, "
            f"so {where}. For a transformer's embedding table this is expected: its width is "
            "the residual stream's, which the residual adds pin anyway, and the other groups "
            "(attention heads, MLP neurons) are still found. Otherwise the width of what is "
            "indexed stays whole. Fix: nothing, for an embedding into a residual stream; for "
            "other indexing, take whole slices along an axis that is not pruned (e.g. resize "
            "with jnp.repeat), or prune other groups."
        )
    return (
        f"jaxprune.structure: primitive(s) {prims} cannot be seen through; {where}. Fix: "
        "express the op with standard lax primitives, or prune other groups."
    )


def _warn_unused(prog: Program, leaves: list[int]) -> None:
    """Warns that the params ``leaves`` are never read by ``prog`` (their groups are pinned)."""
    if not leaves:
        return
    names = ", ".join(path_str(prog.param_paths[i]) for i in leaves[:8])
    more = f" and {len(leaves) - 8} more" if len(leaves) > 8 else ""
    warnings.warn(
        f"jaxprune.structure: params {names}{more} are never used by the traced call (e.g. "
        "a layer used only in a branch these inputs and arguments do not take), so nothing "
        "ties their channels to the layers feeding them: their groups are left unprunable "
        "and shrinking leaves them whole, but a pruned layer feeding them in the untraced "
        "branch would no longer fit them. Fix: trace the branch that uses them (e.g. set "
        "the flag that enables them, such as use_aux=True, or pass the arguments that "
        "reach them), or remove the unused layers from the model.",
        stacklevel=4,
    )
