"""First-order Taylor criteria beyond saliency: products ``w * g`` over steps and over units.

:func:`ema_saliency` and :func:`movement` accumulate ``w * g`` over steps;
:func:`taylor` sums it over each unit (its bias included) and
:func:`taylor_ema` averages either over steps. Also the float32 product and
the EMA helpers the other stateful criteria share.

Re-exported from :mod:`jaxprune.criteria` (write ``jp.criteria.taylor``).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxprune._criteria_args import StatefulCriterion
from jaxprune._tree import (
    as_float,
    as_int,
    leaves_with_paths,
    map_pair,
    mirrors_variables,
    path_str,
    unwrap_variables,
)
from jaxprune.gates_checks import _bias_path
from jaxprune.stacked import _depth, check_stacked

_GRADS_FIX = "pass the gradients of these params (jax.grad of the loss with respect to them)"


def _f32_product(_: Any, w: Any, g: Any) -> jax.Array:
    """``w * g`` in float32 (cast first: a float16 product of small values underflows).

    For a complex leaf, ``Re(w * g)``: JAX's gradient of a real loss is ``g = dL/dx -
    i dL/dy``, so the loss changes by ``Re(g * dw)`` to first order, and by
    ``-Re(w * g)`` when ``w`` is removed, as ``-w * g`` for a real leaf.
    """
    w, g = jnp.asarray(w), jnp.asarray(g)
    if jnp.iscomplexobj(w) or jnp.iscomplexobj(g):
        w = w.astype(jnp.result_type(w, jnp.complex64))
        g = g.astype(jnp.result_type(g, jnp.complex64))
        return jnp.real(w * g).astype(jnp.float32)
    return w.astype(jnp.float32) * g.astype(jnp.float32)


def _check_decay(decay: Any) -> float:
    # as_float: nan (refused below) for None, strings, bools and other non-numbers.
    if not 0.0 <= as_float(decay) < 1.0:
        raise ValueError(
            f"decay must be in [0, 1) (the EMA's weight on the past), got {decay!r}. "
            "Fix: e.g. decay=0.9."
        )
    return float(decay)


def _zeros_f32(params: optax.Params) -> optax.Params:
    """Float32 zeros in the params' pure structure (nnx Variables unwrapped)."""
    return jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), unwrap_variables(params))


def _ema(decay: float, state: Any, new: Any) -> Any:
    return jax.tree.map(lambda s, x: decay * s + (1.0 - decay) * x.astype(jnp.float32), state, new)


def _products(params: optax.Params, grads: optax.Updates) -> optax.Params:
    """``w * g`` per leaf in float32, in the params' pure structure (shapes checked)."""
    return map_pair(_f32_product, params, grads, "grads", _GRADS_FIX)


def ema_saliency(decay: float = 0.9) -> StatefulCriterion:
    """Returns a criterion scoring ``EMA_t |w_t * g_t|``, the saliency averaged over steps.

    One mini-batch gradient is noisy; averaging the first-order saliency over
    the steps between mask refreshes ranks weights by their typical effect.

    Args:
      decay: the EMA's weight on the past, in ``[0, 1)``.

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> c = jp.criteria.ema_saliency(0.5)
      >>> p, g = {"w": jnp.array([2., 1.])}, {"w": jnp.array([1., 1.])}
      >>> s = c.update(c.update(c.init(p), p, g), p, g)
      >>> c.score(s, p)["w"].tolist()
      [1.5, 0.75]

    References:
      Mozer & Smolensky, "Skeletonization", 1989; Molchanov et al., "Importance
      Estimation for Neural Network Pruning", 2019. https://arxiv.org/abs/1906.10771
    """
    decay = _check_decay(decay)
    return StatefulCriterion(
        init=_zeros_f32,
        update=lambda state, params, grads: _ema(
            decay, state, jax.tree.map(jnp.abs, _products(params, grads))
        ),
        score=lambda state, params: state,
    )


def movement() -> StatefulCriterion:
    """Returns the movement criterion ``S = -sum_t w_t * g_t`` (weights moving away from 0 kept).

    Under (stochastic) gradient descent ``-g_t`` is the direction a weight
    moves, so ``-w_t * g_t > 0`` means ``|w|`` grows: movement keeps the weights
    fine-tuning pushes away from zero, whatever their current size.

    Inside :func:`jaxprune.prune` a pruned weight is 0, so ``-w_t * g_t`` adds
    nothing and its score stays where it was when it was pruned. In Sanh et
    al. masked weights keep their values and their scores keep moving, so
    they can come back; here they rarely do, and under a gradual schedule the
    masks end up close to nested.

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> c = jp.criteria.movement()
      >>> p, g = {"w": jnp.array([2., -1.])}, {"w": jnp.array([1., 1.])}
      >>> c.score(c.update(c.init(p), p, g), p)["w"].tolist()
      [-2.0, 1.0]

    References:
      Sanh et al., "Movement Pruning: Adaptive Sparsity by Fine-Tuning", 2020.
      https://arxiv.org/abs/2005.07683
    """

    def update(state, params, grads):
        return jax.tree.map(lambda s, d: s - d, state, _products(params, grads))

    return StatefulCriterion(init=_zeros_f32, update=update, score=lambda state, params: state)


def _check_unit_axis(unit_axis: Any) -> int:
    axis = as_int(unit_axis)
    if axis is None:
        raise ValueError(
            f"unit_axis must be an int (the axis indexing units), got {unit_axis!r}. Fix: "
            "unit_axis=-1 for flax kernels (output features/channels last)."
        )
    return axis


# Leaf names of a weight with a sibling bias (``gates_checks._bias_path`` names the
# bias): flax's kernel/bias, haiku's w/b, equinox's and PyTorch's weight/bias.
_KERNEL_NAMES = ("kernel", "w", "weight")


def _unit_sums(
    params: optax.Params, grads: optax.Updates, unit_axis: int, stacked: Any = None
) -> tuple[Any, list[tuple[jax.Array, jax.Array | None, int]]]:
    """Returns ``(treedef, [(w * g, its per-unit sum or None, layer axes), ...])``, in float32.

    A kernel's per-unit sum (every axis but ``unit_axis`` and its leading
    layer axes summed, dims kept) includes ``b * dC/db`` of its sibling bias
    (``.../bias`` next to ``.../kernel`` or ``.../weight``, ``.../b`` next to
    ``.../w``, one entry per unit and layer) when the units are the kernel's
    outputs (its last axis; or axis 0 of a ``weight`` stored ``[out, in,
    ...]``): ``sum_i W_ij g_ij + b_j g_bj`` is ``sum dC/dz_j * z_j`` over the
    batch and positions, the paper's quantity. Leaves with fewer than 2 axes
    per layer have no unit sum.
    ``stacked`` (as in :func:`jaxprune.masks.per_layer`) tells how many
    leading axes of a leaf index stacked layers; each layer gets its own sums.
    """
    axis = _check_unit_axis(unit_axis)
    check_stacked(stacked)
    prods = _products(params, grads)
    flat, treedef = leaves_with_paths(prods)
    by_path = dict(flat)
    out = []
    for path, prod in flat:
        k = _depth(stacked, path, prod) if stacked is not None else 0
        nd = prod.ndim
        if nd - k < 2:
            out.append((prod, None, k))
            continue
        # Counted within one layer (as per_layer's selections count axes): a
        # non-negative axis skips the k layer axes.
        ax = axis + k if axis >= 0 else axis + nd
        if not k <= ax < nd:
            raise ValueError(
                f"unit_axis={axis} is out of range for {path_str(path)!r} of shape "
                f"{prod.shape} ({nd - k} axes per layer"
                f"{f', after {k} stacked layer axes' if k else ''}). Fix: unit_axis=-1 (flax "
                "kernels: units last), or an axis every kernel has."
            )
        total = jnp.sum(prod, axis=tuple(a for a in range(k, nd) if a != ax), keepdims=True)
        name = path[-1] if path else None
        bias = by_path.get(_bias_path(path)) if name in _KERNEL_NAMES else None
        # Only an output unit has a bias term (a square kernel's bias would also
        # fit its input axis): the last axis, or axis 0 of an [out, in, ...] `weight`.
        if (
            bias is not None
            and name == "weight"
            and ax == k
            and bias.ndim >= k + 1
            and bias.shape[: k + 1] == prod.shape[: k + 1]
            and math.prod(bias.shape[k + 1 :]) == 1
        ):
            # equinox / PyTorch: [out] for a Linear, [out, 1, 1] for an equinox Conv2d;
            # a stack of them (eqx.filter_vmap) adds its k layer axes to both.
            total = total + bias.reshape(total.shape)
        elif (
            bias is not None
            and name == "weight"
            and not k
            and ax == 0
            and bias.ndim >= 2
            and bias.shape[:2] == prod.shape[:2]
            and math.prod(bias.shape[2:]) == 1
        ):
            # [L, out] next to [L, out, in]: units on axis 0 would be the layers.
            warnings.warn(
                f"{path_str(path)!r} of shape {prod.shape} has a bias of shape {bias.shape}: "
                f"it looks like {bias.shape[0]} stacked equinox layers (eqx.filter_vmap), scored "
                "here with each layer as one unit and without the bias term. Fix: pass "
                "stacked=lambda path, leaf: ... (as to jp.masks.per_layer), e.g. with "
                "functools.partial(jp.criteria.taylor, unit_axis=0, stacked=...).",
                stacklevel=3,
            )
        elif bias is not None and ax == nd - 1:
            if bias.shape == prod.shape[:k] + (prod.shape[ax],):
                total = total + bias.reshape(total.shape)
            elif (
                not k
                and bias.ndim >= 2
                and bias.shape[:-1] == prod.shape[: bias.ndim - 1]
                and bias.shape[-1] == prod.shape[ax]
            ):
                # The stack layout ([L, in, out] with [L, out]), not DenseGeneral's
                # ([in, heads, head_dim] with [heads, head_dim]).
                warnings.warn(
                    f"{path_str(path)!r} of shape {prod.shape} has a bias of shape "
                    f"{bias.shape}: it looks like {bias.shape[0]} stacked layers, scored here as "
                    "one layer (units summed over all of them) without the bias term. Fix: "
                    "pass stacked=lambda path, leaf: ... (as to jp.masks.per_layer), e.g. with "
                    "functools.partial(jp.criteria.taylor, stacked=...).",
                    stacklevel=3,
                )
        out.append((prod, total, k))
    return treedef, out


@mirrors_variables
def taylor(
    params: optax.Params, grads: optax.Updates, *, unit_axis: int = -1, stacked: Any = None
) -> optax.Params:
    """Returns Molchanov 2017's per-unit Taylor scores, broadcast to each kernel's shape.

    For a unit ``j`` with pre-activation ``z_j = sum_i x_i W_ij + b_j`` the
    paper's feature-map criterion ``|sum_{batch, positions} dC/dz_j * z_j|``
    equals ``|sum_i W_ij * dC/dW_ij + b_j * dC/db_j|`` (the chain rule summed
    over the batch), so it is computed from the weights, the biases and their
    gradients alone, for dense and conv kernels. This is the criterion of
    ``ALGORITHMS.md`` with the absolute value taken over the whole batch: the
    paper takes it per example and averages over the minibatch, which needs
    per-example gradients (a train step's gradients are already summed over
    the batch), and can rank units differently when examples disagree in
    sign. A kernel's bias is the
    sibling leaf with one entry per unit, by the usual names: ``bias`` next to
    ``kernel`` (flax), ``b`` next to ``w`` (haiku), ``bias`` next to ``weight``
    (equinox, PyTorch; stored ``[out, in, ...]``, so score them with
    ``unit_axis=0`` and the bias is added on axis 0). Without one (another
    name, a tuple ``(w, b)``) the bias term is 0. Scores are l2-normalized
    per layer as in the paper. Every entry of a unit carries the unit's score: select with a
    structured selection (``jp.masks.structured``) to remove whole units, or
    with ``topk`` (equal scores are pruned together, in flatten order).
    Leaves with fewer than 2 axes (per layer, for a stack) get ``|w * g|``.
    Scores are float32.

    With ``scope="global"``, select with ``reduce="max"`` (or ``"mean"``):
    every entry of a unit holds the same score, so the default ``"l2"`` would
    rank ``score * sqrt(fan_in)`` and could empty a layer of small fan-in.
    For stacked layers (``[L, in, out]`` kernels, ``[L, out]`` biases), pass
    ``stacked`` and select with ``jp.masks.per_layer``; without it a stack is
    scored as one layer (with a warning when its bias shows the stack).

    BatchNorm: for a kernel that feeds a BatchNorm normalizing with batch
    statistics (training mode, e.g. ``conv -> BatchNorm -> ReLU`` in
    ``jp.models.VGGSmall`` and ResNets), this score is about 0 for every
    unit, because the BatchNorm's output does not change when ``z_j`` is
    scaled or shifted, so ``sum dC/dz_j * z_j = 0`` up to the BatchNorm's
    ``eps``. What is ranked is then ``eps`` and float32 rounding: on
    VGGSmall's first conv the unit sums were 3e-6 of ``sum |W g|`` (1.8e-7
    with inputs of scale 10), and the float32 ranking agreed with a float64
    run at a rank correlation of only 0.51 (inputs of scale 10). Score such
    a channel at the BatchNorm's affine output instead, as Molchanov 2019
    does: ``|gamma_j * dC/dgamma_j + beta_j * dC/dbeta_j|`` from the
    BatchNorm's ``scale`` and ``bias`` and their gradients, broadcast to the
    conv kernel's shape under the conv's path (as :func:`jaxprune.activations.apoz`
    re-keys BatchNorm scores to the conv)::

        bn, g = params["bns"][0], grads["bns"][0]   # pure dicts (nnx.to_pure_dict)
        unit = jnp.abs(bn["scale"] * g["scale"] + bn["bias"] * g["bias"])
        kernel = params["convs"][0]["kernel"]
        scores["convs"][0]["kernel"] = jnp.broadcast_to(unit, kernel.shape)

    Or compute the gradients with the model in eval mode (BatchNorm on its
    running statistics, which does not cancel the scale), or prune by the
    BatchNorm scales themselves (network slimming,
    :func:`jaxprune.gates.slimming_masks`). There is no BatchNorm-aware Taylor
    criterion in jaxprune. A LayerNorm or GroupNorm cancels one unit's scale
    only when it normalizes over that unit alone (GroupNorm with one channel
    per group), in every mode.

    Args:
      params: weights; kernels ``[..., in, out]`` (``weight`` leaves may be
        ``[out, in, ...]`` with ``unit_axis=0``).
      grads: gradients of the loss with the leaves (paths and shapes) of ``params``.
      unit_axis: the axis indexing units (flax, haiku: ``-1``, output
        features/channels; equinox, PyTorch ``weight``: ``0``), counted within
        one layer for a stack. The bias term is added only when the units are
        the outputs (the last axis; axis 0 of a ``weight`` with a ``[out]`` or
        ``[out, 1, 1]`` bias).
      stacked: ``None``, or a predicate ``(path, leaf) -> bool | int`` telling
        which leaves stack layers along their leading axes (as for
        :func:`jaxprune.masks.per_layer`): each layer is scored and normalized
        apart, with its row of the stacked bias. In ``jp.prune``:
        ``criterion=functools.partial(jp.criteria.taylor, stacked=...)``.

    Raises:
      ValueError: ``grads`` do not match ``params``; ``unit_axis`` not an int or
        out of range for a kernel.

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> w, g = {"k": jnp.array([[1., 2.], [3., 0.]])}, {"k": jnp.array([[1., 1.], [1., 1.]])}
      >>> s = jp.criteria.taylor(w, g)["k"]  # unit sums 4 and 2, divided by sqrt(20)
      >>> (5 * s**2).round().tolist()
      [[4.0, 1.0], [4.0, 1.0]]

    References:
      Molchanov et al., "Pruning Convolutional Neural Networks for Resource
      Efficient Inference", 2017. https://arxiv.org/abs/1611.06440
    """
    treedef, pairs = _unit_sums(params, grads, unit_axis, stacked)
    out = []
    for prod, total, k in pairs:
        if total is None:
            out.append(jnp.abs(prod))
            continue
        s = jnp.abs(total)
        if k:  # each stacked layer normalized apart
            norm = jnp.sqrt(jnp.sum(s**2, axis=tuple(range(k, s.ndim)), keepdims=True))
        else:
            norm = jnp.linalg.norm(s)
        s = s / jnp.maximum(norm, 1e-12)
        out.append(jnp.broadcast_to(s, prod.shape))
    return jax.tree.unflatten(treedef, out)


def taylor_ema(
    decay: float = 0.9, *, group: str = "unit", unit_axis: int = -1, stacked: Any = None
) -> StatefulCriterion:
    """Returns Molchanov 2019's Taylor importance ``(sum_{s in group} g_s * w_s)**2`` with momentum.

    Args:
      decay: momentum of the running average (the paper uses 0.9).
      group: ``"unit"`` (all weights feeding one output unit/channel and its
        bias, as in :func:`taylor`; scores broadcast to the kernel's shape, for
        structured selections) or
        ``"entry"`` (each weight its own group: ``(g * w)**2``, for unstructured
        selections).
      unit_axis: the axis indexing units for ``group="unit"``.
      stacked: ``None``, or which leaves stack layers, for ``group="unit"``
        (see :func:`taylor`).

    As for :func:`taylor`, rank ``group="unit"`` scores under
    ``scope="global"`` with ``reduce="max"`` (or ``"mean"``), not the default
    ``"l2"``. Also as for :func:`taylor`, a unit that feeds a train-mode
    BatchNorm scores about 0 (plus rounding noise): the paper scores the
    BatchNorm's ``gamma`` and ``beta`` instead (see :func:`taylor`).

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> c = jp.criteria.taylor_ema(0.0, group="entry")
      >>> p, g = {"w": jnp.array([[2., 1.]])}, {"w": jnp.array([[1., 3.]])}
      >>> c.score(c.update(c.init(p), p, g), p)["w"].tolist()
      [[4.0, 9.0]]

    References:
      Molchanov et al., "Importance Estimation for Neural Network Pruning",
      2019. https://arxiv.org/abs/1906.10771
    """
    decay = _check_decay(decay)
    if group not in ("unit", "entry"):
        raise ValueError(
            f"group must be 'unit' (one score per output unit) or 'entry' (one per weight), "
            f"got {group!r}. Fix: group='unit' for structured pruning, 'entry' otherwise."
        )

    _check_unit_axis(unit_axis)
    check_stacked(stacked)

    def update(state, params, grads):
        if group == "entry":
            return _ema(decay, state, jax.tree.map(jnp.square, _products(params, grads)))
        treedef, pairs = _unit_sums(params, grads, unit_axis, stacked)
        new = [
            prod**2 if total is None else jnp.broadcast_to(total**2, prod.shape)
            for prod, total, _ in pairs
        ]
        return _ema(decay, state, jax.tree.unflatten(treedef, new))

    return StatefulCriterion(init=_zeros_f32, update=update, score=lambda state, params: state)
