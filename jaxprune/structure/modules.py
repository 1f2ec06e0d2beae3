"""Shrinking flax nnx models in place, and aligning masks with a model's full state.

nnx layers read their widths from their arrays when called, except for a few
attributes (``in_features``, ``out_features``, ``kernel_shape``,
``num_features``, ``feature_group_count``, GroupNorm's ``num_groups``, Einsum's
``kernel_shape`` and ``bias_shape``, and attention's ``num_heads``,
``head_dim``, ``qkv_features``) that :func:`shrink_module` updates after
replacing the arrays, so the same model object keeps working.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import errors as flax_errors
from flax import nnx

from jaxprune._tree import leaves_with_paths, path_str
from jaxprune.masks import apply_masks
from jaxprune.structure.evaluate import run_cached
from jaxprune.structure.shrinking import _check_naming, _check_outputs, _shrink

__all__ = ["module_apply", "full_masks", "shrink_module"]


def module_apply(model: nnx.Module) -> tuple[Any, Any]:
    """Returns ``(apply_fn, state)`` with ``apply_fn(state, *x) == model(*x)``.

    ``state`` is the model's state (Params, BatchStats; RNG streams excluded), the tree that
    :func:`~jaxprune.structure.groups` and :func:`~jaxprune.shrink` work on. It is a
    snapshot: changing the model in place afterwards (e.g. :func:`shrink_module`) leaves
    it as it was. Call ``model.eval()`` before shrinking: :func:`~jaxprune.shrink` and
    :func:`shrink_module` refuse an ``apply_fn`` whose BatchNorm layers are in train mode
    (``ValueError`` naming them; ``groups`` works in either mode), and a model drawing
    random numbers (Dropout in train mode) cannot be traced, so ``apply_fn`` then raises
    a ``ValueError`` saying so.

    Args:
      model: the flax nnx Module to call. Not modified; ``apply_fn`` calls a copy merged
        from its graph and ``state``, with the model's own RNG streams.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from jaxprune import models, structure
      >>> model = models.MLP((3, 4, 2), rngs=nnx.Rngs(0))
      >>> apply_fn, state = structure.module_apply(model)
      >>> x = jnp.ones((1, 3))
      >>> bool(jnp.allclose(apply_fn(state, x), model(x))), state["layers"][0]["kernel"].shape
      (True, (3, 4))
    """
    # A BatchNorm in train mode normalizes with batch statistics: shrinking would fold a
    # constant channel with its train-mode value, wrong for the eval-mode model. The
    # analysis (groups) is fine; shrink refuses such an apply_fn (see _shrink).
    training = tuple(
        path_str(p) or "<model>"
        for p, m in nnx.iter_graph(model)
        if isinstance(m, nnx.Module) and getattr(m, "use_running_average", None) is False
    )
    # RNG streams (dropout keys and counters) are not shrinkable and not maskable: they stay
    # outside the state handed to the analysis.
    graphdef, state, rng = nnx.split(model, nnx.Not(nnx.RngState), ...)
    # The split's Variables are the model's own: copy them so the snapshot stays put.
    state = jax.tree.map(lambda x: x, state)

    def apply_fn(state, *inputs):
        try:
            return nnx.merge(graphdef, state, rng)(*inputs)
        except flax_errors.TraceContextError as err:
            # The RNG streams are the model's own Variables: drawing from them (Dropout
            # in train mode) under jax tracing, as groups and shrink do, is refused.
            if not jax.tree.leaves(rng) or "Rng" not in str(err):
                raise
            raise ValueError(
                f"{type(model).__name__} draws random numbers when called (e.g. Dropout in "
                "train mode), which structure.groups / shrink cannot trace, and the analysis "
                "needs the deterministic model anyway. Fix: call model.eval() before "
                "structure.module_apply (and model.train() afterwards to keep training)."
            ) from err

    apply_fn.train_mode_batchnorm = training
    return apply_fn, state


def full_masks(state: Any, masks: Any) -> Any:
    """Returns ``masks`` extended to ``state``'s structure (True where ``masks`` has no leaf).

    Masks from ``jp.get_masks(nnx.Optimizer(...).opt_state)`` cover the Params
    only; shrinking needs one mask per state leaf (BatchStats included).

    Args:
      state: the model's full state, e.g. ``nnx.state(model)`` or
        :func:`module_apply`'s ``state``.
      masks: bool masks for some of ``state``'s leaves (matched by path); every one of
        its paths must be in ``state``. Missing leaves get a scalar True (kept whole).

    Raises:
      ValueError: a mask path does not exist in ``state``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxprune import structure
      >>> state = {"w": jnp.ones((2, 3)), "bn": {"mean": jnp.zeros(3)}}
      >>> full = structure.full_masks(state, {"w": jnp.ones((2, 3), bool)})
      >>> full["w"].shape, full["bn"]["mean"].tolist()  # True: kept whole
      ((2, 3), True)
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
        # Widths are read from the trailing axes: a stack of layers built with
        # nnx.vmap has a leading layer axis on every array.
        if isinstance(mod, nnx.Linear):
            mod.in_features, mod.out_features = _trailing(mod.kernel.shape, 2)
        elif isinstance(mod, nnx.Conv):
            shape = _trailing(mod.kernel.shape, len(mod.kernel_size) + 2)
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
            q, k, o = (_trailing(m.kernel.shape, 3) for m in (mod.query, mod.key, mod.out))
            mod.in_features, mod.in_kv_features = q[0], k[0]
            mod.num_heads, mod.head_dim = q[1], q[2]
            mod.qkv_features, mod.out_features = q[1] * q[2], o[-1]
        elif isinstance(mod, nnx.ConvTranspose):
            shape = _trailing(mod.kernel.shape, len(mod.kernel_size) + 2)
            mod.kernel_shape = shape
            if mod.transpose_kernel:  # kernel (..., out, in)
                mod.out_features, mod.in_features = shape[-2], shape[-1]
            else:
                mod.in_features, mod.out_features = shape[-2], shape[-1]
        elif isinstance(mod, nnx.Einsum):
            mod.kernel_shape = _trailing(mod.kernel.shape, len(mod.kernel_shape))
            if isinstance(mod.bias, nnx.Variable):
                n = len(mod.bias_shape) if mod.bias_shape is not None else mod.bias.ndim
                mod.bias_shape = _trailing(mod.bias.get_value().shape, n)
        elif isinstance(mod, (nnx.BatchNorm, nnx.LayerNorm, nnx.RMSNorm, nnx.GroupNorm)):
            arrays = (getattr(mod, name, None) for name in ("scale", "bias", "mean", "var"))
            widths = [int(v.get_value().shape[-1]) for v in arrays if isinstance(v, nnx.Variable)]
            if not widths:
                continue  # no arrays: nothing was cut here
            if hasattr(mod, "num_features"):
                mod.num_features = widths[0]
            if isinstance(mod, nnx.GroupNorm) and widths[0] % mod.group_size == 0:
                # GroupNorm reshapes to (num_groups, group_size) when called. Only
                # group_size 1 (one channel per group) is ever prunable, since a
                # cut inside a group would change its statistics: the group size
                # stays and the number of groups follows the channels.
                mod.num_groups = widths[0] // mod.group_size


def _trailing(shape: tuple, n: int) -> tuple[int, ...]:
    return tuple(int(d) for d in shape[len(shape) - n :])


_WIDTHS = (
    "in_features out_features kernel_shape feature_group_count in_kv_features num_heads "
    "head_dim qkv_features bias_shape num_features num_groups"
).split()


def _snapshot(model: nnx.Module) -> list[tuple[Any, dict]]:
    """Returns every module's width attributes, to put back after a failed shrink."""
    return [
        (mod, {a: getattr(mod, a) for a in _WIDTHS if hasattr(mod, a)})
        for _, mod in nnx.iter_modules(model)
    ]


# Layers whose width attributes _update_attributes sets (all of them read the rest
# from their arrays when called).
_ADAPTED = (
    nnx.Linear,
    nnx.Conv,
    nnx.LinearGeneral,
    nnx.MultiHeadAttention,
    nnx.ConvTranspose,
    nnx.Einsum,
    nnx.BatchNorm,
    nnx.LayerNorm,
    nnx.RMSNorm,
    nnx.GroupNorm,
)


def _unadapted_layers(model: nnx.Module, groups: list) -> str:
    """Returns the modules holding ``groups``' members that :func:`_update_attributes` does not
    know, as ``"dw (MyDepthwise), ..."``: the custom layer a failed shrink points at."""
    owners = {tuple(p): m for p, m in nnx.iter_modules(model)}
    found: dict[str, str] = {}
    for g in groups:
        for m in g.members:
            prefix = tuple(m.path[:-1])
            while prefix not in owners and prefix:
                prefix = prefix[:-1]
            mod = owners.get(prefix)
            if mod is not None and not isinstance(mod, _ADAPTED):
                found.setdefault(path_str(prefix) if prefix else "<model>", type(mod).__name__)
    return ", ".join(f"{p} ({t})" for p, t in found.items())


def shrink_module(
    model: nnx.Module, masks: Any, *example_inputs: Any, check: bool = True
) -> nnx.Module:
    """Returns ``model`` shrunk in place: pruned channels physically removed.

    The model's arrays (Params and BatchNorm statistics) are replaced by the
    smaller ones from :func:`~jaxprune.shrink` and the layers' width attributes
    updated, so the same object (and code holding it) keeps working and is
    smaller and faster. Call ``model.eval()`` first for BatchNorm models, so
    the comparison with the masked model uses the running statistics.

    The shrunk model equals the masked one in the mode the analysis traced,
    eval mode: cuts and folds read through a BatchNorm use its running
    statistics (a filter whose kernel alone is masked outputs the constant
    ``relu(BN_eval(bias))``, which is cut or folded). In train mode, where
    BatchNorm uses the batch's statistics, a model shrunk under kernel-only
    masks (``jp.masks.structured(axes=-1)``) computes something else than the
    masked one. To fine-tune after shrinking, select with
    :func:`~jaxprune.structure.select` (or ``selection``): its group masks also
    zero the BatchNorm scale and shift, so the two agree in train mode too.

    Args:
      model: a flax nnx module.
      masks: bool masks over ``nnx.state(model)`` or its ``nnx.Param`` part.
      *example_inputs: a small batch of inputs.
      check: compare the shrunk model with the masked one on the inputs.

    Returns:
      ``model`` itself, shrunk.

    Raises:
      ValueError: the masks do not mirror the state, remove every input
        channel of a depthwise or grouped conv (the message names it; select
        with ``max_sparsity``), or (with ``check``) the shrunk model fails or
        computes something else; the message names the groups whose cut alone
        breaks it, and the layers in them whose width attributes are not
        updated. ``model`` is then left as it was.

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
    widths = _snapshot(model)

    def restore_widths():
        for mod, attrs in widths:
            for a, v in attrs.items():
                setattr(mod, a, v)

    def install(arrays):
        # From the model as it was: each culprit check (see _check_naming) installs
        # another shrink, and _update_attributes reads the current attributes (a
        # depthwise conv is told by feature_group_count == in_features), which a
        # previous install changed.
        restore_widths()
        nnx.update(model, arrays)
        _update_attributes(model)

    def check_as(masks_, small_):
        # Installs small_ and compares the model with the original masked by masks_.
        # The new state goes in as an argument of the jitted function, not as a
        # closure: nnx transforms inside the model (nnx.remat, nnx.vmap) refuse
        # Variables captured from outside the trace.
        install(small_)
        new_apply, new_state = module_apply(model)
        _check_outputs(
            new_apply,
            new_state,
            run_cached(apply_masks, state, masks_),
            example_inputs,
            reference_fn=apply_fn,
            dtypes=prog.dtypes,
            how="nnx",
        )

    if not check:
        install(small)
        return model
    ok = False
    try:
        _check_naming(
            check_as,
            apply_fn,
            state,
            masks,
            small,
            removed,
            prog,
            example_inputs,
            layers=lambda groups: _unadapted_layers(model, groups),
        )
        ok = True
    finally:
        if not ok:  # the model is left as it was: its arrays and its attributes
            nnx.update(model, state)
            restore_widths()
    return model
