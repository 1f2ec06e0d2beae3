"""What :mod:`jaxprune.activations` records: :class:`Captured`, and how a module call is recorded.

:func:`_record` adds one call of a module to the captures, pooling repeated
calls of a shared module along the batch axis (:func:`_join`); the input of a
call is its first positional argument or its keyword (:func:`_first_input_name`,
:func:`_call_input`), and a general linear layer's contracted input axes
(:func:`_general_axes`) travel with it as static metadata (:class:`_Axes`).
:mod:`jaxprune.activations` re-exports :class:`Captured`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx


class Captured(NamedTuple):
    """A module's inputs and outputs, all of its calls in the forward pass together.

    A module called once records that call. A module called several times
    (shared weights: one layer applied at two places) records every call,
    concatenated along the leading (batch) axis as if the calls were one
    larger batch; when the calls' shapes beyond the leading axis differ, each
    is first flattened to ``[tokens, features]``. Every consumer here
    (:func:`input_norms`, :func:`mean_abs`, :func:`apoz`) reduces over all
    axes but the last, so they see every input and output distribution the
    module saw.

    Args:
      inputs: the module's input, ``[..., in]`` (dense) or ``[N, H, W, C_in]``
        (conv): the call's first positional argument, or its input keyword.
      outputs: the module's output, ``[..., out]`` (before any activation
        applied after the module).
      in_axes: the input axes a general linear kernel contracts
        (``nnx.LinearGeneral``'s and linen ``DenseGeneral``'s ``axis``, e.g.
        ``(-2, -1)`` for an attention output projection), in any order: the
        kernel holds them in ascending order, as flax sorts them; ``None``
        (default) for Dense and conv layers, whose inputs are on the last axis.
    """

    inputs: jax.Array  # [..., in] (dense) or [N, H, W, C_in] (conv)
    outputs: jax.Array  # [..., out] (pre-activation)
    # The input axes a general linear kernel contracts, in the kernel's order
    # (``nnx.LinearGeneral``'s and linen ``DenseGeneral``'s ``axis``, e.g.
    # ``(-2, -1)`` for an attention output projection); None for Dense and
    # conv layers, whose inputs are on the last axis.
    in_axes: tuple[int, ...] | None = None


def _join(a: Any, b: Any) -> Any:
    """Returns ``a`` and ``b`` concatenated along the leading axis (flattened if they differ)."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    # A call on one unbatched example ([features]) is one token, not a batch axis.
    a, b = (x[None] if x.ndim == 1 else x for x in (a, b))
    if a.ndim >= 1 and a.shape[1:] == b.shape[1:]:
        return jnp.concatenate([a, b], axis=0)
    if a.ndim == 0 or b.ndim == 0 or a.shape[-1] != b.shape[-1]:
        raise ValueError(
            f"a module called twice got arrays of shapes {a.shape} and {b.shape}, whose "
            "features (last axis) differ, so the calls cannot be pooled. Fix: capture one "
            "call at a time, e.g. by capturing a sub-model."
        )
    return jnp.concatenate([a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])], axis=0)


class _Axes(tuple):
    """The axes of :attr:`Captured.in_axes`: static pytree metadata, not leaves.

    So captures still map (``jax.tree.map``) and pass through ``jax.jit`` as
    arrays only; it compares equal to the plain tuple.
    """


jax.tree_util.register_static(_Axes)


def _record(records: dict[str, Captured], name: str, x: Any, out: Any, in_axes: Any = None) -> None:
    prev = records.get(name)
    if prev is None:
        records[name] = Captured(x, out, in_axes)
        return
    if in_axes is not None and jnp.shape(prev.inputs)[1:] != jnp.shape(x)[1:]:
        # Calls of other shapes: each is cut to [tokens, *input axes] first, so
        # the axes the kernel contracts survive the pooling (_join flattens to
        # [tokens, last axis]).
        prev_x = _tokens_by_inputs(prev.inputs, prev.in_axes)
        x = _tokens_by_inputs(x, in_axes)
        in_axes = _Axes(range(-len(in_axes), 0))
        records[name] = Captured(_join(prev_x, x), _join(prev.outputs, out), in_axes)
        return
    records[name] = Captured(_join(prev.inputs, x), _join(prev.outputs, out), in_axes)


def _tokens_by_inputs(x: Any, in_axes: tuple[int, ...]) -> jax.Array:
    """Returns ``x`` as ``[tokens, *x's in_axes in ascending order]``.

    Ascending, as flax orders a general linear kernel's input axes whatever
    order ``axis`` names them in (``axis=(-1, -2)`` contracts a kernel
    ``[x.shape[-2], x.shape[-1], *out]``).
    """
    x = jnp.asarray(x)
    axes = sorted(int(a) % x.ndim for a in in_axes)
    moved = jnp.moveaxis(x, axes, list(range(x.ndim - len(axes), x.ndim)))
    return moved.reshape((-1,) + moved.shape[x.ndim - len(axes) :])


def _general_axes(module: Any) -> tuple[int, ...] | None:
    """Returns the contracted input axes of a general linear layer, else None."""
    general = (isinstance(module, nnx.LinearGeneral) and not module.batch_axis) or (
        isinstance(module, nn.DenseGeneral) and not module.batch_dims
    )
    if not general:
        return None
    axes = module.axis if isinstance(module.axis, (tuple, list)) else (module.axis,)
    return _Axes(int(a) for a in axes)


def _first_input_name(fn: Callable[..., Any]) -> str | None:
    """Returns the name of ``fn``'s first parameter after ``self`` (``"inputs"`` for flax)."""
    try:
        params = list(inspect.signature(fn).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    if params and params[0].kind in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
        return params[0].name
    return None


def _call_input(
    name: str, first: str | None, args: tuple, kwargs: dict, fn: str = "capture_nnx"
) -> Any:
    """Returns the input of a module call: its first positional argument, or the keyword."""
    if args:
        return args[0]
    if first is not None and first in kwargs:
        return kwargs[first]
    if len(kwargs) == 1:
        return next(iter(kwargs.values()))
    raise ValueError(
        f"{fn}: module {name!r} was called with no positional argument and keywords "
        f"{sorted(kwargs)}, none of which is its input {first!r}, so its input cannot be "
        "recorded. Fix: pass the module's input positionally (layer(x)) or by its parameter "
        "name (layer(inputs=x) for flax's Linear and Conv)."
    )
