"""Shrinking flax nnx models in place, and aligning masks with a model's full state.

nnx layers read their widths from their arrays when called, except for a few
attributes (``in_features``, ``out_features``, ``kernel_shape``,
``num_features``, ``feature_group_count``, and attention's ``num_heads``,
``head_dim``, ``qkv_features``) that :func:`shrink_module` updates after
replacing the arrays, so the same model object keeps working.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxprune._tree import leaves_with_paths, path_str
from jaxprune.masks import apply_masks
from jaxprune.structure.evaluate import run_once
from jaxprune.structure.shrinking import OutputMismatch, _check_outputs, _culprits, _named, _shrink

__all__ = ["module_apply", "full_masks", "shrink_module"]


def module_apply(model: nnx.Module) -> tuple[Any, Any]:
    """Returns ``(apply_fn, state)`` with ``apply_fn(state, *x) == model(*x)``.

    ``state`` is the model's state (Params, BatchStats; RNG streams excluded), the tree that
    :func:`~jaxprune.structure.groups` and :func:`~jaxprune.shrink` work on. It is a
    snapshot: changing the model in place afterwards (e.g. :func:`shrink_module`) leaves
    it as it was.
    """
    # RNG streams (dropout keys and counters) are not shrinkable and not maskable: they stay
    # outside the state handed to the analysis.
    graphdef, state, rng = nnx.split(model, nnx.Not(nnx.RngState), ...)
    # The split's Variables are the model's own: copy them so the snapshot stays put.
    state = jax.tree.map(lambda x: x, state)

    def apply_fn(state, *inputs):
        return nnx.merge(graphdef, state, rng)(*inputs)

    return apply_fn, state


def full_masks(state: Any, masks: Any) -> Any:
    """Returns ``masks`` extended to ``state``'s structure (True where ``masks`` has no leaf).

    Masks from ``jp.get_masks(nnx.Optimizer(...).opt_state)`` cover the Params
    only; shrinking needs one mask per state leaf (BatchStats included).

    Raises:
      ValueError: a mask path does not exist in ``state``.
    """
    s_flat, treedef = leaves_with_paths(state)
    m_flat, _ = leaves_with_paths(masks)
    by_path = {p: m for p, m in m_flat}
    known = {p for p, _ in s_flat}
    extra = [path_str(p) for p in by_path if p not in known]
    if extra:
        raise ValueError(
            f"masks has leaves the model's state does not: {', '.join(extra[:5])}. Fix: build "
            "the masks from nnx.state(model) (or its nnx.Param part)."
        )
    return jax.tree.unflatten(treedef, [by_path.get(p, jnp.ones((), bool)) for p, _ in s_flat])


def _update_attributes(model: nnx.Module) -> None:
    for _, mod in nnx.iter_modules(model):
        if isinstance(mod, nnx.Linear):
            mod.in_features, mod.out_features = (int(d) for d in mod.kernel.shape)
        elif isinstance(mod, nnx.Conv):
            shape = tuple(int(d) for d in mod.kernel.shape)
            depthwise = mod.feature_group_count == mod.in_features and mod.in_features > 1
            mult = mod.out_features // mod.in_features if depthwise else 1
            mod.kernel_shape, mod.out_features = shape, shape[-1]
            if depthwise:
                mod.in_features = mod.feature_group_count = shape[-1] // mult
            else:
                mod.in_features = shape[-2] * mod.feature_group_count
        elif isinstance(mod, nnx.LinearGeneral):
            shape = tuple(int(d) for d in mod.kernel.shape)
            n_in, n_out = len(mod.in_features), len(mod.out_features)
            mod.in_features = shape[len(shape) - n_out - n_in : len(shape) - n_out]
            mod.out_features = shape[len(shape) - n_out :]
        elif isinstance(mod, nnx.MultiHeadAttention):
            q, k, o = (tuple(int(d) for d in m.kernel.shape) for m in (mod.query, mod.key, mod.out))
            mod.in_features, mod.in_kv_features = q[0], k[0]
            mod.num_heads, mod.head_dim = q[1], q[2]
            mod.qkv_features, mod.out_features = q[1] * q[2], o[-1]
        elif isinstance(mod, (nnx.BatchNorm, nnx.LayerNorm, nnx.RMSNorm)):
            for name in ("scale", "bias", "mean", "var"):
                v = getattr(mod, name, None)
                if isinstance(v, nnx.Variable):
                    mod.num_features = int(v.get_value().shape[-1])
                    break


def shrink_module(model: nnx.Module, masks: Any, *example_inputs: Any, check: bool = True):
    """Returns ``model`` shrunk in place: pruned channels physically removed.

    The model's arrays (Params and BatchNorm statistics) are replaced by the
    smaller ones from :func:`~jaxprune.shrink` and the layers' width attributes
    updated, so the same object (and code holding it) keeps working and is
    smaller and faster. Call ``model.eval()`` first for BatchNorm models, so
    the comparison with the masked model uses the running statistics.

    Args:
      model: a flax nnx module.
      masks: bool masks over ``nnx.state(model)`` or its ``nnx.Param`` part.
      *example_inputs: a small batch of inputs.
      check: compare the shrunk model with the masked one on the inputs.

    Returns:
      ``model`` itself, shrunk.

    Raises:
      ValueError: the masks do not mirror the state, or (with ``check``) the
        shrunk model computes something else; the message names the groups
        whose cut alone changes the outputs. ``model`` is then left as it was.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxprune as jp
      >>> from jaxprune import structure
      >>> from flax import nnx
      >>> from jaxprune import models
      >>> model = models.MLP((8, 6, 3), rngs=nnx.Rngs(0))
      >>> apply_fn, state = structure.module_apply(model)
      >>> gs = structure.groups(apply_fn, state, jnp.ones((1, 8)), prunable_only=True)
      >>> masks = structure.select(gs, jp.criteria.magnitude(state), 0.5)
      >>> model = structure.shrink_module(model, masks, jnp.ones((2, 8)))
      >>> model.layers[0].kernel.shape, model.layers[1].in_features
      ((8, 3), 3)

    References:
      Fang et al., "DepGraph", 2023. https://arxiv.org/abs/2301.12900
    """
    apply_fn, state = module_apply(model)
    masks = full_masks(state, masks)
    small, removed, prog = _shrink(apply_fn, state, masks, example_inputs)

    def install(arrays):
        nnx.update(model, arrays)
        _update_attributes(model)

    def check_as(masks_, small_):
        # Installs small_ and compares the model with the original masked by masks_.
        install(small_)
        new_apply, new_state = module_apply(model)
        _check_outputs(
            lambda s, *x: new_apply(new_state, *x) if s is None else apply_fn(s, *x),
            None,
            run_once(apply_masks, state, masks_),
            example_inputs,
        )

    if not check:
        install(small)
        return model
    ok = False
    try:
        check_as(masks, small)
        ok = True
    except OutputMismatch as err:
        groups = _culprits(
            lambda m: check_as(m, _shrink(apply_fn, state, m, example_inputs)[0]),
            state,
            removed,
            prog,
        )
        raise _named(err, groups) from err
    finally:
        if not ok:
            install(state)  # the model is left as it was
    return model
