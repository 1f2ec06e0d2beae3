"""Evaluates a flat :class:`Program` with, per value, whether it varies with the inputs.

Shrinking needs two facts about every channel that reaches a contraction
(``dot_general``, ``conv``): is it exactly zero, or at least input-independent
(so its contribution can be folded into a bias)? This module runs the program
on the example inputs and, alongside each value, propagates a boolean
*varies* map: inputs vary, params and constants do not; a contraction's result
varies where some varying operand entry meets a nonzero (or varying) entry of
the other operand; ``mul`` likewise; structural primitives move the map like
the data; any other element-wise primitive varies where an operand does; an
unknown primitive varies everywhere if any operand varies. The analysis is
conservative: it may call a constant "varying" (so a channel is kept), never
the reverse, and it does not depend on which example inputs were used (a ReLU
unit that is merely dead on the examples is still "varying").

Removed channels are simulated exactly: a ``keep`` vector per contraction
operand axis multiplies the left operand, so the evaluated program computes
what the shrunk network will compute.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxprune._compile import quick_options
from jaxprune.structure.graph import ELEMENTWISE
from jaxprune.structure.program import Program

__all__ = ["CONTRACTIONS", "make_evaluator", "run_cached", "run_once"]


# These programs run once or a few times on a small batch: compile time, not run
# time, is what users wait for (jaxprune/_compile.py).
@functools.lru_cache(maxsize=32)
def _jitted(fn, static_argnums: tuple[int, ...], quick: bool):
    return jax.jit(
        fn, static_argnums=static_argnums, compiler_options=quick_options() if quick else None
    )


def run_cached(fn, *args, static_argnums=()):
    """Returns ``jax.jit(fn)(*args)`` like :func:`run_once`, reusing the compiled program.

    Only for jaxprune's own pure functions (``fn`` a module-level function):
    the program is cached by ``fn``, the static arguments and the other
    arguments' shapes and dtypes, so a second call with the same structure
    (another sparsity, new scores) runs without tracing or compiling again. A
    user's function may read state that changes between calls (a closure over
    a module): :func:`run_once` traces those afresh every time.
    """
    quick = jax.default_backend() == "cpu"
    return _jitted(fn, tuple(static_argnums), quick)(*args)


def exact_matmuls():
    """Returns a context in which float32 matmuls and convolutions trace at full precision.

    A shrink compares the shrunk network with the masked one and folds pruned
    units' constant outputs into biases; both need float32 results. On GPUs
    (TF32, about 3 decimal digits on H100/A100) and TPUs (bfloat16 passes) the
    default precision of a float32 contraction is lower, and the same sum
    taken over fewer terms rounds differently by more than the check allows.
    """
    return jax.default_matmul_precision("highest")


def run_once(fn, *args, static_argnums=()):
    """Returns ``jax.jit(fn)(*args)`` compiled with XLA's fastest-to-compile CPU options.

    Traced under :func:`exact_matmuls`, so the result does not depend on the
    backend's default float32 matmul precision.
    """
    jitted = jax.jit(fn, static_argnums=static_argnums)
    with exact_matmuls():
        lowered = jitted.lower(*args)
    if jax.default_backend() != "cpu":
        return lowered.compile()(*[a for i, a in enumerate(args) if i not in static_argnums])
    compiled = lowered.compile(quick_options())
    return compiled(*[a for i, a in enumerate(args) if i not in static_argnums])


CONTRACTIONS = frozenset({"dot_general", "conv_general_dilated"})
# Structural primitives: applied to the 0/1 varies map they give 0 exactly where
# no varying entry contributes (all contributions are non-negative).
_MOVE = frozenset(
    """reshape transpose broadcast_in_dim squeeze expand_dims reduce_sum reduce_max
    reduce_window_max reduce_window_sum slice concatenate pad split cumsum cummax copy
    copy_p convert_element_type reduce_precision""".split()
)


def _bind(prim, args, params):
    out = prim.bind(*args, **params)
    return list(out) if prim.multiple_results else [out]


def _as_f32(params: dict) -> dict:
    p = dict(params)
    if "preferred_element_type" in p:
        p["preferred_element_type"] = jnp.float32
    if "new_dtype" in p:
        p["new_dtype"] = jnp.float32
    return p


def _scale_axis(x, axis, vec):
    shape = [1] * x.ndim
    shape[axis] = -1
    return x * vec.reshape(shape).astype(x.dtype)


def _run(prog: Program, want: tuple[int, ...], leaves, inputs, keeps) -> dict[int, Any]:
    val: dict[int, Any] = {}
    var: dict[int, Any] = {}
    for i, v in enumerate(prog.param_ids):
        val[v], var[v] = leaves[i], jnp.zeros(prog.shapes[v], bool)
    for i, v in enumerate(prog.input_ids):
        val[v], var[v] = inputs[i], jnp.ones(prog.shapes[v], bool)
    for v, c in prog.consts.items():
        val[v], var[v] = jnp.asarray(c), jnp.zeros(prog.shapes[v], bool)
    for idx, e in enumerate(prog.eqns):
        name = e.prim.name
        args = [val[v] for v in e.ins]
        vs = [var[v] for v in e.ins]
        if name in CONTRACTIONS:
            for key, vec in keeps.get(str(idx), {}).items():
                args[0] = _scale_axis(args[0], int(key), vec)
                vs[0] = vs[0] & (_scale_axis(jnp.ones(vs[0].shape), int(key), vec) > 0)
            outs = _bind(e.prim, args, e.params)
            nz = [v | (a != 0) for v, a in zip(vs, args, strict=True)]
            f32 = _as_f32(e.params)
            ones = [
                [a.astype(jnp.float32), b.astype(jnp.float32)]
                for a, b in ((vs[0], nz[1]), (nz[0], vs[1]))
            ]
            ovs = [(_bind(e.prim, ones[0], f32)[0] + _bind(e.prim, ones[1], f32)[0]) > 0]
        else:
            outs = _bind(e.prim, args, e.params)
            if name == "mul":
                nz = [v | (a != 0) for v, a in zip(vs, args, strict=True)]
                ovs = [(vs[0] & nz[1]) | (vs[1] & nz[0])]
            elif name in _MOVE:
                moved = _bind(e.prim, [v.astype(jnp.float32) for v in vs], _as_f32(e.params))
                ovs = [m > 0 for m in moved]
            elif name in ELEMENTWISE:
                shape = jnp.shape(outs[0])
                ovs = [functools.reduce(jnp.logical_or, [jnp.broadcast_to(v, shape) for v in vs])]
            else:
                anyv = functools.reduce(jnp.logical_or, [jnp.any(v) for v in vs], jnp.bool_(False))
                ovs = [jnp.broadcast_to(anyv, jnp.shape(o)) for o in outs]
        for o, x, xv in zip(e.outs, outs, ovs, strict=True):
            val[o], var[o] = x, jnp.broadcast_to(xv, jnp.shape(x))
    return {v: (val[v], var[v]) for v in want}


def make_evaluator(prog: Program, want: tuple[int, ...]):
    """Returns a jitted ``(leaves, inputs, keeps) -> {var: (value, varies)}`` for ``want``.

    Traced under :func:`exact_matmuls` (float32 contractions at full precision
    on every backend).

    ``keeps`` maps ``str(equation index)`` to ``{str(axis): float vector}``: the
    left operand of that contraction is scaled by the vector along the axis.
    """
    jitted = jax.jit(functools.partial(_run, prog, tuple(want)))
    cache = {}

    def run(leaves, inputs, keeps):
        if "c" not in cache:
            with exact_matmuls():
                lowered = jitted.lower(leaves, inputs, keeps)
            cpu = jax.default_backend() == "cpu"
            cache["c"] = lowered.compile(quick_options()) if cpu else lowered.compile()
        return cache["c"](leaves, inputs, keeps)

    return run
