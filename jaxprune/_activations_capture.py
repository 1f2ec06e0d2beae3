"""The capture stage of :mod:`jaxprune.activations`: run a flax model once, record layers' I/O.

:func:`capture_nnx` (nnx models) and :func:`capture_linen` (linen modules)
return each chosen layer's inputs and outputs (:class:`Captured`) by module
path; the criteria in :mod:`jaxprune.activations` score them. Public through
``jp.activations``.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import jax
from flax import linen as nn
from flax import nnx

from jaxprune._activations_record import (
    Captured,
    _call_input,
    _first_input_name,
    _general_axes,
    _record,
)
from jaxprune._tree import path_str

__all__ = ["capture_nnx", "capture_linen"]


def _check_kind(model: Any, *, linen: bool) -> None:
    """Raises unless ``model`` is the flax kind its capture function takes (naming the other)."""
    want, other = (nn.Module, nnx.Module) if linen else (nnx.Module, nn.Module)
    if isinstance(model, want):
        return
    name, kind = ("capture_linen", "linen module") if linen else ("capture_nnx", "nnx model")
    fix = (
        (
            "capture_nnx(model, *args) for an nnx model"
            if linen
            else "capture_linen(module, variables, *args) for a linen module"
        )
        if isinstance(model, other)
        else f"pass the {kind} itself"
    )
    raise ValueError(f"{name} takes a flax {kind}, got {type(model).__name__}. Fix: {fix}.")


def capture_nnx(
    model: nnx.Module, *args: Any, types: tuple[type, ...] = (nnx.Linear, nnx.Conv), **kwargs: Any
) -> tuple[Any, dict[str, Captured]]:
    """Returns ``(model(*args, **kwargs), {module path: Captured})`` for an nnx model.

    The ``__call__`` of each module class in ``types`` is wrapped for the
    duration of the call (and restored after, also on errors); only instances
    inside ``model`` are recorded. The input recorded is the call's first
    positional argument, or its keyword (``layer(inputs=x)``). Each call of a
    module is recorded once, even when a subclass's ``__call__`` reaches the
    wrapped parent's through ``super().__call__``: the outermost call of that
    instance, its output after the subclass's own work. A module called
    several times records all its calls, pooled along the batch axis (see
    :class:`Captured`). Works
    under ``jax.jit``/``nnx.jit`` when the captures are returned from the
    jitted function. Layers run inside ``nnx.scan``, ``nnx.vmap`` or
    ``nnx.remat`` are copies whose inputs cannot leave the transform: they are
    not recorded, and a warning names the modules left out.

    Args:
      model: the nnx model (a linen module is refused: use
        :func:`capture_linen`).
      *args: the inputs, passed to ``model`` with ``**kwargs``.
      types: the module classes whose calls are recorded, subclasses included
        (default ``(nnx.Linear, nnx.Conv)``); a tuple of classes, or one class.
      **kwargs: passed to ``model``.

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> from flax import nnx
      >>> from jaxprune.models import MLP
      >>> model = MLP((4, 3, 2), rngs=nnx.Rngs(0))
      >>> y, caps = jp.activations.capture_nnx(model, jnp.ones((5, 4)))
      >>> sorted(caps), caps["layers/1"].inputs.shape
      (['layers/0', 'layers/1'], (5, 3))
    """
    _check_kind(model, linen=False)
    types = _check_types(types, "(nnx.Linear, nnx.Conv)")
    targets = {
        id(m): path_str(tuple(p)) for p, m in nnx.iter_modules(model) if isinstance(m, types)
    }
    records: dict[str, Captured] = {}
    classes = []
    for _, m in nnx.iter_modules(model):
        if id(m) in targets and type(m) not in classes:
            classes.append(type(m))
    saved = [(cls, cls.__dict__.get("__call__")) for cls in classes]
    # Ids of the modules whose call is running: a subclass's ``__call__`` that
    # calls ``super().__call__`` (both wrapped) records only the outer call.
    active: set[int] = set()
    # Calls on instances that are not the model's own: nnx.scan, nnx.vmap and
    # nnx.remat run copies of its modules, whose inputs are that transform's.
    foreign: list[str] = []

    def wrap(original):
        first = _first_input_name(original)

        @functools.wraps(original)  # a subclass wrapped over this wrapper sees the signature
        def call(self, *a, **kw):
            if id(self) in active:
                return original(self, *a, **kw)
            if id(self) not in targets:
                foreign.append(type(self).__name__)
            active.add(id(self))
            try:
                out = original(self, *a, **kw)
            finally:
                active.discard(id(self))
            if id(self) in targets:
                x = _call_input(targets[id(self)], first, a, kw)
                _record(records, targets[id(self)], x, out, _general_axes(self))
            return out

        return call

    try:
        for cls, _ in saved:
            cls.__call__ = wrap(cls.__call__)
        out = model(*args, **kwargs)
    finally:
        for cls, own in saved:
            if own is None:
                del cls.__call__
            else:
                cls.__call__ = own
    if foreign:
        missed = sorted(set(targets.values()) - set(records))
        warnings.warn(
            f"capture_nnx: {len(foreign)} call(s) of {sorted(set(foreign))} ran on copies of "
            "the model's modules (nnx.scan, nnx.vmap and nnx.remat call copies, whose inputs "
            f"cannot leave the transform), so they are not recorded; modules not recorded: "
            f"{missed[:10]}{' ...' if len(missed) > 10 else ''}. Fix: capture an unrolled "
            "(unscanned, non-remat) copy of the model with the same params, or leave those "
            "layers out of the selection with where=.",
            stacklevel=2,
        )
    return out, records


def _check_types(types: Any, default: str) -> tuple[type, ...]:
    """Returns ``types`` as a tuple of classes (one class is taken as a tuple of one)."""
    if isinstance(types, type):
        return (types,)
    if not isinstance(types, tuple | list) or not all(isinstance(t, type) for t in types):
        raise ValueError(
            f"types must be a tuple of module classes, got {types!r}. Fix: e.g. "
            f"types={default} (classes, not their names)."
        )
    return tuple(types)


def capture_linen(
    module: nn.Module,
    variables: Any,
    *args: Any,
    types: tuple[type, ...] = (nn.Dense, nn.Conv),
    **kwargs: Any,
) -> tuple[Any, dict[str, Captured]]:
    """Returns ``(module.apply(variables, *args), {module path: Captured})`` for a linen model.

    Uses ``flax.linen.intercept_methods``, so the module's code is unchanged;
    paths are the modules' scope paths (``"Dense_0"``, ``"block/Conv_1"``), the
    same names as in ``variables["params"]``. A module called several times
    records all its calls, pooled along the batch axis (see :class:`Captured`).

    Args:
      module: the linen model.
      variables: its variables (``{"params": ..., "batch_stats": ...}``).
      *args: the inputs, passed to ``module.apply`` with ``**kwargs``.
      types: the module classes whose calls are recorded (default
        ``(nn.Dense, nn.Conv)``).
      **kwargs: passed to ``module.apply`` (e.g. ``train=False``).

    Examples:
      >>> import jax, jax.numpy as jnp, jaxprune as jp
      >>> import flax.linen as nn
      >>> m = nn.Sequential([nn.Dense(3), nn.relu, nn.Dense(2)])
      >>> v = m.init(jax.random.key(0), jnp.ones((1, 4)))
      >>> y, caps = jp.activations.capture_linen(m, v, jnp.ones((5, 4)))
      >>> sorted(caps), caps["layers_2"].outputs.shape
      (['layers_0', 'layers_2'], (5, 2))
    """
    _check_kind(module, linen=True)
    types = _check_types(types, "(nn.Dense, nn.Conv)")
    records: dict[str, Captured] = {}
    lifted: list[str] = []
    outer = [x for x in jax.tree.leaves((variables, args)) if isinstance(x, jax.core.Tracer)]
    # Under jax.jit a lifted transform's values are tracers of its own inner trace.
    outer_traces = {id(getattr(x, "_trace", None)) for x in outer}
    can_tell = all(hasattr(x, "_trace") for x in outer)

    def in_lifted(x: Any) -> bool:
        if not isinstance(x, jax.core.Tracer):
            return False
        if not outer:
            return True
        return can_tell and id(getattr(x, "_trace", None)) not in outer_traces

    def interceptor(next_fun, a, kw, context):
        out = next_fun(*a, **kw)
        if context.method_name == "__call__" and isinstance(context.module, types):
            name = path_str(tuple(context.module.path))
            first = _first_input_name(type(context.module).__call__)
            x = _call_input(name, first, a, kw, "capture_linen")
            if in_lifted(x):
                # Inside nn.scan / nn.vmap / nn.remat: its values live in that trace only.
                lifted.append(name)
            else:
                _record(records, name, x, out, _general_axes(context.module))
        return out

    with nn.intercept_methods(interceptor):
        out = module.apply(variables, *args, **kwargs)
    if lifted:
        names = ", ".join(dict.fromkeys(lifted))
        raise ValueError(
            f"capture_linen: module(s) {names} run inside a lifted transform (nn.scan, nn.vmap, "
            "nn.remat), whose activations exist only inside it and cannot be captured from "
            "outside. Fix: capture an unrolled (unscanned, non-remat) copy of the model with "
            "the same variables, or sow the activations with self.sow inside the module."
        )
    return out, records
