"""Running a flax linen module on shrunk params, without rebuilding it.

Linen layers fix their widths in attributes (``nn.Dense(features=300)``), and
``module.apply`` refuses params of another shape. :func:`linen_apply` runs the
*same* module on smaller params by intercepting every layer call
(``nn.intercept_methods``) and setting, on that call's bound layer only, the
width attributes the layer's params now imply. The module, its code and its
stored attributes are unchanged; full-size params run exactly as before.

Layers it knows: ``Dense``, ``DenseGeneral``, ``Einsum``, ``Conv`` (grouped and
depthwise included), ``ConvLocal`` and ``ConvTranspose``. Norm layers
(``BatchNorm``, ``LayerNorm``, ``RMSNorm``, ``GroupNorm`` with ``group_size``)
read their widths from the input and need nothing; a ``GroupNorm`` with one
channel per group given as ``num_groups`` gets ``num_groups`` set to its
shrunk input's channels. Any other layer whose params
changed shape raises a ``ValueError`` that names it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import errors as flax_errors

from jaxprune.structure.shrinking import AdaptError, _shrink_checked

__all__ = ["linen_apply", "shrink_linen"]


def _kernel(mod: nn.Module):
    if not mod.has_variable("params", "kernel"):
        return None  # init, or a layer without a kernel
    return jnp.shape(mod.get_variable("params", "kernel"))


def _set(mod: nn.Module, **attrs: Any) -> None:
    # Linen modules are frozen dataclasses; this instance is the one bound for
    # this apply only (rebuilt by the next apply), so the change does not leak.
    for k, v in attrs.items():
        if getattr(mod, k) != v:
            object.__setattr__(mod, k, v)


def _adapt(mod: nn.Module, args: tuple) -> None:
    """Sets ``mod``'s width attributes to what its (possibly shrunk) params imply."""
    if isinstance(mod, nn.GroupNorm):
        # Only a GroupNorm with one channel per group has prunable channels (a cut
        # inside a larger group would change its statistics). Given num_groups=C,
        # its shrunk input has fewer channels than groups, which flax rejects:
        # there the groups follow the channels, as group_size=1 would.
        channels = jnp.shape(args[0])[-1] if args else 0
        if mod.num_groups is not None and 0 < channels < mod.num_groups:
            _set(mod, num_groups=channels)
        return
    shape = _kernel(mod)
    if shape is None:
        return
    if isinstance(mod, nn.Dense):
        _set(mod, features=shape[-1])
    elif isinstance(mod, nn.DenseGeneral):
        if isinstance(mod.features, int):
            _set(mod, features=shape[-1])
        else:
            _set(mod, features=tuple(shape[len(shape) - len(mod.features) :]))
    elif isinstance(mod, nn.Einsum):
        _set(mod, shape=tuple(shape))
    elif isinstance(mod, nn.ConvTranspose):
        _set(mod, features=shape[-2] if mod.transpose_kernel else shape[-1])
    elif isinstance(mod, nn.Conv):
        attrs = {"features": shape[-1]}
        if mod.feature_group_count != 1 and args:
            # kernel (..., in / groups, out): the groups follow the input's channels.
            attrs["feature_group_count"] = max(1, jnp.shape(args[0])[-1] // shape[-2])
        _set(mod, **attrs)
    elif isinstance(mod, nn.ConvLocal):
        _set(mod, features=shape[-1])


def _interceptor(next_fun, args, kwargs, context):
    if context.method_name == "__call__":
        _adapt(context.module, args)
    return next_fun(*args, **kwargs)


def linen_apply(
    module: nn.Module, *, method: Any = None, rngs: Any = None, **kwargs: Any
) -> Callable[..., Any]:
    """Returns ``apply_fn(variables, *inputs)`` running ``module`` on full or shrunk variables.

    ``variables`` is either the module's variables dict (``{"params": ...,
    "batch_stats": ...}``) or its ``"params"`` collection alone. Each known
    layer (see the module docstring) takes its widths from its params at call
    time, so the params from :func:`jaxprune.shrink` run without rebuilding the
    module; ``kwargs`` are passed to the module's method (e.g. ``train=False``).

    Args:
      module: a flax linen Module (an nnx model is refused: use
        :func:`~jaxprune.structure.shrink_module`). Not modified.
      method: passed to ``module.apply`` (default None: ``__call__``).
      rngs: passed to ``module.apply`` (default None: the call draws no random numbers).
      **kwargs: passed to ``module.apply`` and on to the module's method on every call,
        e.g. ``train=False``.

    Raises:
      ValueError: a layer's params changed shape and the layer's widths are not
        known to jaxprune (the message names the layer and the fix), or the
        call draws random numbers without ``rngs`` (Dropout in train mode) or
        updates an immutable collection (BatchNorm in train mode): pass the
        eval-mode ``kwargs``, e.g. ``train=False``; or the module reads a
        collection ``variables`` lack (BatchNorm's ``batch_stats`` when given
        ``variables["params"]`` alone): pass the full variables.

    Examples:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxprune as jp
      >>> from jaxprune import structure
      >>> class MLP(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         h = jax.nn.relu(nn.Dense(8)(x))
      ...         return nn.Dense(2)(h)
      >>> x = jnp.ones((1, 3))
      >>> params = MLP().init(jax.random.key(0), x)["params"]
      >>> apply_fn = structure.linen_apply(MLP())
      >>> gs = structure.groups(apply_fn, params, x, prunable_only=True)
      >>> masks = structure.select(gs, jp.criteria.magnitude(params), 0.5)
      >>> small = structure.shrink(apply_fn, params, masks, x)
      >>> small["Dense_0"]["kernel"].shape, apply_fn(small, x).shape
      ((3, 4), (1, 2))
    """
    if not isinstance(module, nn.Module):
        raise ValueError(
            f"module must be a flax.linen Module, got {type(module).__name__}. Fix: for flax "
            "nnx models use structure.shrink_module; for plain functions use structure.shrink."
        )

    def apply_fn(variables, *inputs):
        v = variables if _is_variables(variables) else {"params": variables}
        try:
            with nn.intercept_methods(_interceptor):
                return module.apply(v, *inputs, method=method, rngs=rngs, **kwargs)
        except flax_errors.InvalidRngError as err:
            # Dropout (or another layer drawing random numbers) in train mode.
            raise ValueError(
                f"{type(module).__name__} draws random numbers when called with "
                f"{_call_args(kwargs)} ({err}; e.g. Dropout in train mode), which "
                "structure.groups / shrink cannot trace without rngs, and the analysis "
                "needs the deterministic model anyway. Fix: pass the eval-mode arguments, e.g. "
                "structure.linen_apply(module, train=False) or deterministic=True "
                "(and use_running_average=True for BatchNorm)."
            ) from err
        except flax_errors.ModifyScopeVariableError as err:
            # BatchNorm in train mode updates batch_stats, immutable in an apply.
            raise ValueError(
                f"{type(module).__name__} updates its variables when called with "
                f"{_call_args(kwargs)} ({err}; e.g. BatchNorm in train mode). The analysis "
                "and the output check need the eval-mode call, which uses the running "
                "statistics. Fix: pass the eval-mode arguments, e.g. "
                "structure.linen_apply(module, train=False) or use_running_average=True."
            ) from err
        except flax_errors.ScopeCollectionNotFound as err:
            # The params alone of a model with state (BatchNorm's batch_stats): the
            # eval-mode call reads the running statistics from that collection.
            found = re.search(r'collection "([^"]+)"', str(err))
            col = found.group(1) if found else "a collection"
            raise ValueError(
                f"{type(module).__name__} reads the {col!r} collection, which the variables "
                f"passed lack (they hold {_collections(variables)}; {err}). Fix: pass the "
                f"full variables from module.init, {{'params': ..., {col!r}: ...}}, e.g. "
                "structure.groups(structure.linen_apply(module, train=False), variables, x) "
                "or structure.shrink_linen(module, variables, masks, x, train=False); "
                "masks may stay over variables['params']."
            ) from err
        except flax_errors.ScopeParamShapeError as err:
            raise AdaptError(
                f"a layer of {type(module).__name__} has params of a new shape that "
                f"jaxprune cannot adapt its attributes to ({err}). structure.linen_apply "
                "adapts Dense, DenseGeneral, Einsum, Conv, ConvLocal, ConvTranspose "
                "and input-sized norms. Fix: size that layer from its input, or rebuild "
                "the module with the widths from structure.widths(params, small)."
            ) from err

    return apply_fn


def _call_args(kwargs: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "no keyword arguments"


def _collections(variables: Any) -> str:
    if _is_variables(variables):
        names = ", ".join(repr(c) for c in variables)
        return f"the collection{'s' if len(variables) > 1 else ''} {names}"
    return "the 'params' collection alone"


def _is_variables(tree: Any) -> bool:
    return isinstance(tree, Mapping) and "params" in tree


def shrink_linen(
    module: nn.Module,
    variables: Any,
    masks: Any,
    *example_inputs: Any,
    check: bool = True,
    method: Any = None,
    **kwargs: Any,
) -> tuple[Any, Any]:
    """Returns ``(small, apply_fn)``: ``module`` physically shrunk, with no rebuild.

    ``small`` are the smaller variables :func:`jaxprune.shrink` computes and
    ``apply_fn = linen_apply(module, ...)`` runs the unchanged module on them
    (``apply_fn(small, *x)``). Pass BatchNorm models' full variables and
    ``train=False`` (or ``use_running_average=True``) in ``kwargs``, so the
    check compares with the running statistics.

    Args:
      module: a flax linen module.
      variables: its variables dict, or its ``"params"`` alone.
      masks: bool masks over ``variables``, or over ``variables["params"]``
        (other collections are then kept whole where their channels are).
      *example_inputs: a small batch of inputs.
      check: compare the shrunk module's outputs with the masked module's.
      method, **kwargs: passed to ``module.apply``.

    Examples:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> from jaxprune import structure
      >>> class MLP(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         h = jax.nn.relu(nn.Dense(4)(x))
      ...         return nn.Dense(2)(h)
      >>> x = jnp.ones((1, 3))
      >>> params = MLP().init(jax.random.key(0), x)["params"]
      >>> masks = jax.tree.map(lambda a: jnp.ones(a.shape, bool), params)
      >>> masks["Dense_1"]["kernel"] = masks["Dense_1"]["kernel"].at[:2].set(False)
      >>> small, apply_fn = structure.shrink_linen(MLP(), params, masks, x)
      >>> small["Dense_0"]["kernel"].shape, apply_fn(small, x).shape
      ((3, 2), (1, 2))

    References:
      Fang et al., "DepGraph: Towards Any Structural Pruning", 2023.
      https://arxiv.org/abs/2301.12900
    """
    apply_fn = linen_apply(module, method=method, **kwargs)
    if _is_variables(variables) and not _is_variables(masks):
        masks = {
            c: masks if c == "params" else jax.tree.map(lambda _: jnp.ones((), bool), t)
            for c, t in variables.items()
        }
    small = _shrink_checked(apply_fn, variables, masks, example_inputs, check, how="linen")
    return small, apply_fn
