"""A model's apply function as one flat list of primitive equations.

``trace(apply_fn, params, *example_inputs)`` runs ``jax.make_jaxpr`` and
inlines every call-like sub-jaxpr (``jit``, ``custom_jvp_call``,
``custom_vjp_call``, ``closed_call``, ``remat``/``checkpoint``), so that the dependency
analysis and the evaluator in this package see primitives only. Variables are
integers; literals and closed-over constants become constant variables.
Each equation keeps its source info (and that of the calls it was inlined
from), so that messages can say where in the user's code it was traced
(:func:`where`).
"""

from __future__ import annotations

import os
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from jaxprune._tree import Path, leaves_with_paths

try:  # private: where an equation was traced; without it messages lose their locations
    from jax._src import source_info_util
except ImportError:  # pragma: no cover - a jax that moved it
    source_info_util = None

__all__ = ["Eqn", "Program", "trace", "where"]

# Call-like primitives whose body is inlined: they compute exactly their body.
_CALLS = {
    "pjit": "jaxpr",
    "jit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
    # jax.checkpoint / nnx.remat / nn.remat: "remat2" (an open Jaxpr) in current jax,
    # "checkpoint" or "remat" in others. Rematerialization changes memory, not values.
    "remat2": "jaxpr",
    "remat": "jaxpr",
    "checkpoint": "jaxpr",
}


class Eqn(NamedTuple):
    """One primitive application: ``outs = prim.bind(*ins, **params)``."""

    prim: Any  # the jax Primitive
    params: dict  # its static parameters
    ins: tuple[int, ...]  # variable ids of the operands
    outs: tuple[int, ...]  # variable ids of the results
    # jax source infos: the equation's own, then those of the calls it was inlined
    # from (innermost first). An inlined jit body (jax.nn.relu's) has no user frame
    # of its own; the call that reached it has. Empty for equations jaxprune adds.
    source: tuple = ()


class Program(NamedTuple):
    """A flat program: equations over integer variable ids.

    Args:
      eqns: the primitive equations (:class:`Eqn`) in program order, call-like
        sub-jaxprs inlined.
      shapes: the shape of each variable, indexed by variable id.
      dtypes: the dtype of each variable, indexed by variable id.
      consts: constant variable id -> its value (literals and closed-over constants).
      param_ids: the variable id of each params leaf, in flatten order.
      param_paths: the normalized path of each params leaf, in the same order.
      input_ids: the variable ids of the flattened example inputs.
      output_ids: the variable ids of the flattened outputs.
      treedef: the params' treedef (pure, Variables unwrapped).
    """

    eqns: list[Eqn]
    shapes: list[tuple[int, ...]]  # per variable id
    dtypes: list[Any]  # per variable id
    consts: dict[int, Any]  # constant variable id -> value
    param_ids: list[int]  # variable id of each params leaf, flatten order
    param_paths: list[Path]  # normalized path of each params leaf
    input_ids: list[int]  # variable ids of the flattened example inputs
    output_ids: list[int]  # variable ids of the flattened outputs
    treedef: Any  # the params' treedef (pure, Variables unwrapped)

    def consumers(self) -> dict[int, list[int]]:
        """Returns variable id -> indices of the equations that read it."""
        out: dict[int, list[int]] = {}
        for i, e in enumerate(self.eqns):
            for v in e.ins:
                out.setdefault(v, []).append(i)
        return out


def _sub_jaxpr(eqn: Any) -> Any:
    key = _CALLS.get(eqn.primitive.name)
    if key is None or key not in eqn.params:
        return None
    sub = eqn.params[key]
    if isinstance(sub, jcore.ClosedJaxpr):
        return sub
    if isinstance(sub, jcore.Jaxpr):
        return jcore.ClosedJaxpr(sub, ())
    return None


class _Builder:
    def __init__(self):
        self.eqns, self.shapes, self.dtypes, self.consts = [], [], [], {}

    def new(self, shape, dtype) -> int:
        self.shapes.append(tuple(int(d) for d in shape))
        self.dtypes.append(dtype)
        return len(self.shapes) - 1

    def const(self, value) -> int:
        value = np.asarray(value) if not isinstance(value, jax.Array) else value
        i = self.new(np.shape(value), value.dtype)
        self.consts[i] = value
        return i

    def inline(self, closed: Any, in_ids: list[int], outer: tuple = ()) -> list[int]:
        jaxpr = closed.jaxpr
        env: dict[Any, int] = {}
        for v, c in zip(jaxpr.constvars, closed.consts, strict=True):
            env[v] = self.const(c)
        for v, i in zip(jaxpr.invars, in_ids, strict=True):
            env[v] = i

        def read(v):
            if isinstance(v, jcore.Literal):
                return self.const(v.val)
            return env[v]

        for e in jaxpr.eqns:
            ins = [read(v) for v in e.invars]
            sub = _sub_jaxpr(e)
            source = (e.source_info,) + outer
            if sub is not None:
                outs = self.inline(sub, ins, source)
            else:
                outs = [self.new(v.aval.shape, v.aval.dtype) for v in e.outvars]
                self.eqns.append(Eqn(e.primitive, dict(e.params), tuple(ins), tuple(outs), source))
            for v, o in zip(e.outvars, outs, strict=True):
                if not isinstance(v, jcore.DropVar):
                    env[v] = o
        return [read(v) for v in jaxpr.outvars]


def _static_fix(value: Any) -> str:
    """Returns examples of passing ``value`` as a static keyword rather than an example input."""
    kw = f"{'train' if isinstance(value, bool) else 'name'}={value!r}"
    return (
        f"structure.linen_apply(module, {kw}), structure.shrink_linen(module, variables, "
        f"masks, x, {kw}), or a function closing over it (apply_fn = lambda p, x: "
        f"model.apply(p, x, {value!r}))"
    )


def _python_scalars(example_inputs: tuple, types: tuple) -> list[tuple[str, Any]]:
    """Returns ``(position, value)`` of each leaf of ``example_inputs`` of one of ``types``."""
    flat, _ = jax.tree_util.tree_flatten_with_path(example_inputs)
    return [(jax.tree_util.keystr(k), x) for k, x in flat if isinstance(x, types)]


def _refuse_static_inputs(example_inputs: tuple) -> None:
    """Raises a ``ValueError`` naming the first Python bool or str among ``example_inputs``.

    Every example input is traced as an array, so a positional flag
    (``model.apply(v, x, False)``) reaches the model as an abstract bool that
    ``if train:`` or ``not train`` cannot read, and a string cannot be traced at
    all: either way the model's own error would blame the batch. ``None`` is an
    empty pytree that passes through untraced, and numbers may be real inputs,
    so only these two are refused up front.
    """
    found = _python_scalars(example_inputs, (bool, str))
    if found:
        where_, value = found[0]
        raise ValueError(
            f"example_inputs{where_} is the Python {type(value).__name__} {value!r}, a static "
            "setting rather than an array: the dependency analysis traces "
            "apply_fn(params, *example_inputs) with every example input as an abstract array, "
            "so a flag the model branches on (train, deterministic) cannot be read. Fix: pass "
            f"it by keyword to the apply function instead, e.g. {_static_fix(value)}; and pass "
            "only arrays (a small batch) as example inputs."
        )


def trace(apply_fn: Any, params: Any, *example_inputs: Any) -> Program:
    """Returns the flat :class:`Program` of ``apply_fn(params, *example_inputs)``.

    Every leaf of ``example_inputs`` is traced as an abstract array (``None``
    is an empty pytree and passes through as it is).

    Args:
      apply_fn: a function ``(params, *inputs) -> outputs`` (not an nnx Module: see
        :func:`module_apply`).
      params: the pytree of parameters passed first to ``apply_fn``; its leaves become
        ``param_ids``.
      *example_inputs: the remaining arguments of ``apply_fn``, e.g. a small batch
        (arrays or pytrees of arrays, no Python ``bool`` or ``str``); only their shapes
        and dtypes are used.

    Raises:
      ValueError: an example input is a Python ``bool`` or ``str`` (a static
        setting such as a positional ``train`` flag, named with its position
        and the fix: pass it by keyword, e.g. ``linen_apply(module,
        train=False)``), ``apply_fn`` is not a function (an nnx Module is named,
        with :func:`module_apply` as the fix), or ``apply_fn`` cannot be traced
        on the inputs.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jaxprune import structure
      >>> f = jax.jit(lambda p, x: jnp.tanh(x @ p["w"]))  # the jit is inlined
      >>> prog = structure.trace(f, {"w": jnp.ones((3, 2))}, jnp.ones((1, 3)))
      >>> [e.prim.name for e in prog.eqns], prog.param_paths
      (['dot_general', 'tanh'], [('w',)])
      >>> [prog.shapes[i] for i in prog.output_ids]
      [(1, 2)]
    """
    from flax import nnx

    if isinstance(apply_fn, nnx.Module) or not callable(apply_fn):
        what = "an nnx Module" if isinstance(apply_fn, nnx.Module) else repr(apply_fn)
        raise ValueError(
            f"apply_fn must be a function (params, *inputs) -> outputs, got {what}; the "
            "arguments are (apply_fn, params, *example_inputs). Fix: for an nnx model, "
            "apply_fn, state = jp.structure.module_apply(model), then pass (apply_fn, state, x)."
        )
    _refuse_static_inputs(example_inputs)
    flat, treedef = leaves_with_paths(params)
    leaves = [x for _, x in flat]
    in_leaves, in_def = jax.tree.flatten(example_inputs)

    def fn(leaves, inputs):
        return apply_fn(jax.tree.unflatten(treedef, leaves), *jax.tree.unflatten(in_def, inputs))

    try:
        closed = jax.make_jaxpr(fn)(leaves, in_leaves)
    except TypeError as err:
        if example_inputs:
            shapes = [tuple(jnp.shape(x)) for x in in_leaves]
            scalars = _python_scalars(example_inputs, (int, float, complex))
            if scalars:
                # A number the model uses as a static value (a shape, a loop count):
                # traced, it is an abstract array, and the batch is not the problem.
                where_, value = scalars[0]
                raise ValueError(
                    f"apply_fn(params, *example_inputs) fails ({type(err).__name__}: {err}), "
                    f"and example_inputs{where_} is the Python {type(value).__name__} "
                    f"{value!r}, which the dependency analysis traces as an array like every "
                    "example input. Fix: if the model takes it as a static setting, pass it by "
                    f"keyword to the apply function, e.g. {_static_fix(value)}."
                ) from err
            raise ValueError(
                f"apply_fn(params, *example_inputs) fails with example inputs of shapes "
                f"{shapes} ({type(err).__name__}: {err}). The dependency analysis traces the "
                "model on them. Fix: pass a small batch of what the model takes, e.g. x[:2] "
                "with the training data's shape."
            ) from err
        # jp.shrink(apply_fn, params, masks) without inputs: the model's own call
        # then fails deep inside (``__call__() missing 'x'``).
        raise ValueError(
            f"example_inputs is empty, and apply_fn(params) fails without inputs "
            f"({type(err).__name__}: {err}). The dependency analysis and the output check "
            "trace apply_fn(params, *example_inputs). Fix: pass a small batch after the "
            "params (and masks), e.g. jp.shrink(apply_fn, params, masks, x[:2]), "
            "structure.shrink_module(model, masks, x[:2]) or "
            "structure.groups(apply_fn, params, x[:2])."
        ) from err
    b = _Builder()
    avals = [v.aval for v in closed.jaxpr.invars]
    ids = [b.new(a.shape, a.dtype) for a in avals]
    outs = b.inline(closed, ids)
    return Program(
        eqns=b.eqns,
        shapes=b.shapes,
        dtypes=b.dtypes,
        consts=b.consts,
        param_ids=ids[: len(leaves)],
        param_paths=[p for p, _ in flat],
        input_ids=ids[len(leaves) :],
        output_ids=outs,
        treedef=treedef,
    )


# jaxprune.structure's own frames (module_apply, linen_apply's interceptor) sit
# between the user's model and flax's layers: skipped like jax's and flax's.
_OWN = os.path.dirname(os.path.abspath(__file__)) + os.sep

# Layer libraries whose frames are never the user's line. jax's own heuristic
# skips jax and the standard library only; flax registers three of its files
# with it, not its layers (linen's LayerNorm, nnx's Conv). Under an interpreter
# whose site-packages sits inside the standard library's folder (pyenv, a
# system Python) jax skips every installed package by accident; in a virtual
# environment it does not, so the libraries are named here.
_LIBRARIES = ("flax", "equinox", "haiku")


def _skipped_dirs() -> tuple[str, ...]:
    """Returns the folders whose frames :func:`where` skips besides jax's (loaded libraries)."""
    dirs = [_OWN]
    for name in _LIBRARIES:
        file = getattr(sys.modules.get(name), "__file__", None)
        if file:
            dirs.append(os.path.dirname(os.path.abspath(file)) + os.sep)
    return tuple(dirs)


def _user_frame(info: Any) -> str:
    """Returns ``file:line:column (function)`` of ``info``'s innermost user frame, or ``""``."""
    if source_info_util is None:
        return ""
    try:
        skipped = _skipped_dirs()
        for f in source_info_util.user_frames(info.traceback):
            if not os.path.abspath(f.file_name).startswith(skipped):
                return f"{f.file_name}:{f.start_line}:{f.start_column} ({f.function_name})"
    except Exception:  # noqa: BLE001 - jax-internal helpers: a message loses its location
        pass
    return ""


def where(eqn: Eqn) -> str:
    """Returns where ``eqn`` was traced in the user's code, or ``""`` when that is unknown.

    The innermost user frame (``file:line:column (function)``, as jax prints
    it in its own errors, skipping jax's, flax's, equinox's, haiku's and
    jaxprune.structure's own frames), preceded by the
    flax module path when the name stack has one (linen modules push their
    names; nnx modules do not, and their ``__call__`` line names the layer).
    Messages say this rather than the equation's position in the inlined
    program, which the user never sees.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxprune import structure
      >>> def f(p, x):
      ...     return jnp.tanh(x @ p["w"])
      >>> prog = structure.trace(f, {"w": jnp.ones((3, 2))}, jnp.ones((1, 3)))
      >>> "(f)" in structure.program.where(prog.eqns[1])  # ...<doctest ...>:2:11 (f)
      True
    """
    loc = next((f for f in map(_user_frame, eqn.source) if f), "")
    # Name stacks are relative to the call they were traced in: outermost first.
    names = [str(getattr(info, "name_stack", "")) for info in reversed(eqn.source)]
    module = "/".join(n for n in names if n)
    if module and loc:
        return f"{module} ({loc})"
    return module or loc
