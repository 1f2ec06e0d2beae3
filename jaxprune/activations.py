"""Activations captured in the forward pass, and the criteria computed from them.

* :func:`capture_nnx` / :func:`capture_linen` run a flax model once and return,
  for every ``Linear``/``Conv`` (nnx) or ``Dense``/``Conv`` (linen) module, its
  input and output (:class:`Captured`), keyed by the module's path
  (``"layers/0"``), with no change to the model's code.
* :func:`input_norms` turns captures from calibration batches into the
  per-input-feature norms ``jp.criteria.wanda`` needs.
* :func:`mean_abs` and :func:`apoz` score units by their activations; broadcast
  per-unit scores onto the kernels with :func:`unit_scores`, then select with a
  structured selection (whole units) or any other, passing
  ``where=scored_where(per_unit)`` (:func:`scored_where`) so that a per-layer
  selection leaves the kernels without scores dense.

BatchNorm models: the score is computed from a captured module's *output*,
so on a ``conv -> BatchNorm -> ReLU`` block (``jp.models.VGGSmall``, ResNets)
the default captures score ``relu(conv output)``, not the activation the
network computes, ``relu(BN(conv output))``. The two rankings can be
unrelated (on a trained ``VGGSmall``, 4 of the 16 channels kept at 50% were
the same). Capture the BatchNorm modules instead
(``capture_nnx(model, x, types=(nnx.BatchNorm,))``, with the model in eval
mode so BN uses its running statistics), score them, and re-key each score
to the path of the conv that feeds it before :func:`unit_scores`; see
:func:`apoz` for the recipe.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxprune._activations_capture import capture_linen, capture_nnx
from jaxprune._activations_record import Captured, _tokens_by_inputs
from jaxprune._tree import leaves_with_paths, path_str

__all__ = [
    "Captured",
    "capture_nnx",
    "capture_linen",
    "input_norms",
    "mean_abs",
    "apoz",
    "unit_scores",
    "scored_where",
]


def _kernel_owner(path: tuple, leaf: Any) -> str | None:
    """Returns the module path owning a kernel leaf (``layers/0/kernel`` -> ``layers/0``)."""
    if path and path[-1] == "kernel" and jnp.ndim(leaf) >= 2:
        return path_str(path[:-1]) if len(path) > 1 else "<root>"
    return None


def input_norms(
    params: optax.Params, captures: dict[str, Captured] | Sequence[dict[str, Captured]]
) -> optax.Params:
    """Returns, for each captured kernel, the L2 norm of its input per input feature.

    The norm runs over every calibration token (all axes but the last; for a
    conv, batch and positions per input channel) and over every batch in
    ``captures``, combined as ``sqrt(sum of squares)``. A Dense or conv kernel
    gets ``[in]``; a grouped or depthwise conv (``feature_group_count=g``,
    kernel ``[..., in / g, out]``) gets ``[in / g, out]``, each output's
    column the norms of its group's input channels. A general linear kernel
    (``nnx.LinearGeneral``, linen ``DenseGeneral``, attention projections captured with
    ``types=(nnx.Linear, nnx.LinearGeneral)``) gets its input axes' norms
    shaped to broadcast against it: ``[heads, head_dim, 1]`` for an output
    projection ``[heads, head_dim, out]``, ``[in, 1, 1]`` for a query kernel
    ``[in, heads, head_dim]``, from the layer's ``axis`` (recorded as
    :attr:`Captured.in_axes`). Leaves with no capture
    get ``1.0``, with a warning when the leaf is a kernel (``.../kernel``, ndim
    >= 2) whose module was not captured. The result feeds ``jp.criteria.wanda(params, norms)``.

    Args:
      params: the params tree of the captured model (``nnx.state(model,
        nnx.Param)``, linen's ``variables["params"]``); a kernel is matched to
        the capture of its module path (``layers/0/kernel`` to ``"layers/0"``).
      captures: ``{module path: Captured}`` as :func:`capture_nnx` and
        :func:`capture_linen` return it (their second result), or a non-empty
        sequence of such dicts, one per calibration batch.

    Raises:
      ValueError: ``captures`` is empty; no captured module owns a kernel of
        ``params`` (e.g. linen's full variables passed instead of
        ``variables["params"]``: every leaf would get ``1.0`` and Wanda would
        silently be magnitude pruning); or a module is missing from some of
        the batches.

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> from flax import nnx
      >>> from jaxprune.models import MLP
      >>> model = MLP((2, 2), rngs=nnx.Rngs(0))
      >>> _, caps = jp.activations.capture_nnx(model, jnp.array([[3., 0.], [4., 1.]]))
      >>> params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
      >>> jp.activations.input_norms(params, caps)["layers"][0]["kernel"].tolist()
      [5.0, 1.0]

    References:
      Sun et al., "A Simple and Effective Pruning Approach for Large Language
      Models", 2023. https://arxiv.org/abs/2306.11695
    """
    batches = [captures] if isinstance(captures, dict) else list(captures)
    if not batches:
        raise ValueError(
            "input_norms got captures=[] (no calibration batch). Fix: pass the captures of "
            "at least one batch, e.g. capture_nnx(model, x)[1]."
        )
    for i, b in enumerate(batches):
        if not isinstance(b, dict):
            raise ValueError(
                f"captures[{i}] must be a dict {{module path: Captured}}, got "
                f"{type(b).__name__}. Fix: pass what capture_nnx/capture_linen return "
                "(their second result), one dict per batch."
            )
    flat, treedef = leaves_with_paths(params)
    owners = {_kernel_owner(path, leaf) for path, leaf in flat} - {None}
    captured = set().union(*batches)
    if owners and not owners & captured:
        hint = ""
        if any(path and path[0] == "params" for path, _ in flat):
            hint = (
                ' These params start with "params/": for linen pass variables["params"], '
                "not the whole variables."
            )
        raise ValueError(
            f"input_norms: no captured module owns a kernel of params (every norm would be "
            f"1.0): the captures are {sorted(captured)}, the kernels' modules "
            f"{sorted(owners)}.{hint} Fix: pass the "
            "params tree of the captured model (its module paths are the captures' keys), "
            'e.g. variables["params"] for linen or nnx.state(model, nnx.Param) for nnx.'
        )
    uncaptured = sorted(owners - captured)
    if uncaptured:
        warnings.warn(
            f"input_norms: the kernels of modules {uncaptured} have no capture, so their "
            "norms are 1.0 and Wanda scores them by |w| alone, on a different scale from the "
            "captured kernels (a global selection would compare the two). Fix: capture "
            "those modules too, or leave them out of the selection with where=.",
            stacklevel=2,
        )
    for owner in sorted(owners & captured):
        missing = [i for i, b in enumerate(batches) if owner not in b]
        if missing:
            raise ValueError(
                f"input_norms: module {owner!r} is captured in some batches but not in "
                f"batches {missing} (of {len(batches)}), so its norms would cover only part of "
                "the calibration data. Fix: capture every batch with the same model and types "
                "(a module skipped on some inputs cannot be calibrated this way)."
            )
    out = []
    for path, leaf in flat:
        owner = _kernel_owner(path, leaf)
        if owner is None or owner not in captured:
            out.append(jnp.float32(1.0))
            continue
        in_axes = batches[0][owner].in_axes
        sq = sum(_square_sums(b[owner].inputs, in_axes) for b in batches)
        if in_axes is not None:
            # A general linear kernel [*in_axes, *out_axes]: the norms broadcast
            # against it, its input axes first.
            sq = sq.reshape(sq.shape + (1,) * (jnp.ndim(leaf) - sq.ndim))
        elif jnp.ndim(leaf) >= 3 and sq.shape[0] != jnp.shape(leaf)[-2]:
            sq = _grouped_norms(sq, jnp.shape(leaf), path)
        out.append(jnp.sqrt(sq))
    return jax.tree.unflatten(treedef, out)


def _grouped_norms(sq: jax.Array, shape: tuple[int, ...], path: Any) -> jax.Array:
    """Returns a grouped conv's per-channel ``sq`` ``[in]`` as ``[in / groups, out]``.

    A conv with ``feature_group_count=g`` has a kernel ``[..., in / g, out]``:
    output ``o`` reads the ``in / g`` input channels of its group
    ``o // (out / g)``, so its column gets those channels' norms.
    """
    cin, (in_g, cout) = sq.shape[0], shape[-2:]
    groups = cin // in_g if in_g and cin % in_g == 0 else 0
    if not groups or cout % groups:
        raise ValueError(
            f"input_norms: the kernel {path_str(path)!r} of shape {tuple(shape)} reads "
            f"{in_g} input channels, but its module's captured inputs have {cin}, which is "
            "not a grouped conv's (feature_group_count) multiple of it. Fix: capture the "
            "module that owns this kernel, with its own inputs."
        )
    per_group = sq.reshape(groups, in_g)
    return per_group[jnp.arange(cout) // (cout // groups)].T


def _square_sums(x: Any, in_axes: tuple[int, ...] | None) -> jax.Array:
    """Sums ``x**2`` over every axis but the input axes (the last, or ``in_axes`` in order)."""
    tokens = _tokens_by_inputs(jnp.asarray(x).astype(jnp.float32), in_axes or (-1,))
    return jnp.sum(jnp.square(tokens), axis=0)


def _check_activation(activation: Any) -> None:
    if not callable(activation):
        raise ValueError(
            f"activation must be a function applied to the outputs, got {activation!r}. Fix: "
            "jax.nn.relu (the default), or lambda z: z to score the raw outputs."
        )


def _per_unit(captures, fn):
    if not isinstance(captures, dict):
        raise ValueError(
            f"captures must be a dict {{module path: Captured}} (one batch), got "
            f"{type(captures).__name__}. Fix: pass what capture_nnx/capture_linen return (their "
            "second result); for several batches, score each and average the results."
        )
    out = {}
    for name, c in captures.items():
        z = c.outputs.astype(jnp.float32)
        units = z.shape[z.ndim - _output_axes(c) :]
        out[name] = fn(z.reshape((-1,) + units))
    return out


def _output_axes(c: Captured) -> int:
    """How many trailing axes of ``c.outputs`` index units: 1, or a general linear layer's.

    ``nnx.LinearGeneral(4, (2, 3))`` outputs ``[..., 2, 3]``: 6 units, one per
    head and feature, which a score must keep apart.
    """
    if c.in_axes is None:
        return 1
    batch = jnp.ndim(c.inputs) - len(c.in_axes)
    return max(1, jnp.ndim(c.outputs) - batch)


def mean_abs(
    captures: dict[str, Captured], activation: Callable[[jax.Array], jax.Array] = jax.nn.relu
) -> dict[str, jax.Array]:
    """Returns per-unit mean ``|activation(output)|`` of each captured module (higher kept).

    Scores ``activation(output)`` of each captured module: on a ``conv ->
    BatchNorm -> ReLU`` model that is ``relu(conv output)``, not the network's
    activation ``relu(BN(conv output))``; capture the BatchNorm modules and
    re-key the scores to the conv paths, as in :func:`apoz`'s example.

    Args:
      captures: ``{module path: Captured}`` from a capture function.
      activation: applied to each output before the mean (default
        ``jax.nn.relu``; ``lambda z: z`` scores the raw outputs).

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> caps = {"fc": jp.activations.Captured(None, jnp.array([[1., -2.], [3., -1.]]))}
      >>> jp.activations.mean_abs(caps)["fc"].tolist()
      [2.0, 0.0]

    References:
      Hu et al., "Network Trimming: A Data-Driven Neuron Pruning Approach",
      2016 (activation statistics). https://arxiv.org/abs/1607.03250
    """
    _check_activation(activation)
    return _per_unit(captures, lambda z: jnp.mean(jnp.abs(activation(z)), axis=0))


def apoz(
    captures: dict[str, Captured], activation: Callable[[jax.Array], jax.Array] = jax.nn.relu
) -> dict[str, jax.Array]:
    """Returns per-unit ``1 - APoZ`` (fraction of nonzero activations; higher kept).

    Scores ``activation(output)`` of each captured module. On a ``conv ->
    BatchNorm -> ReLU`` model (``jp.models.VGGSmall``, ResNets) the conv's
    output is not what the ReLU sees: scoring the convs' captures measures
    ``relu(conv output)``, not ``relu(BN(conv output))``, and can rank the
    channels at chance level. Capture the BatchNorm modules instead (model in
    eval mode, so BN uses its running statistics), and re-key each score to
    the path of the conv feeding that BatchNorm (``"bns/0"`` ->
    ``"convs/0"`` in ``VGGSmall``; ``"bn1"`` -> ``"conv1"`` in a ResNet
    block) before :func:`unit_scores`, as in the second example.

    Args:
      captures: ``{module path: Captured}`` from a capture function.
      activation: applied to each output before counting its zeros (default
        ``jax.nn.relu``).

    Examples:
      >>> import jax, jax.numpy as jnp, jaxprune as jp
      >>> caps = {"fc": jp.activations.Captured(None, jnp.array([[1., -2.], [3., 4.]]))}
      >>> jp.activations.apoz(caps)["fc"].tolist()
      [1.0, 0.5]

      Conv -> BatchNorm -> ReLU: score the BatchNorm outputs, keyed by conv:

      >>> from flax import nnx
      >>> model = jp.models.VGGSmall(rngs=nnx.Rngs(0), cfg=(4, "M"), hidden=8, image_size=8)
      >>> model.eval()  # BN normalizes with its running statistics
      >>> x = jax.random.normal(jax.random.key(1), (16, 8, 8, 1))
      >>> _, bn = jp.activations.capture_nnx(model, x, types=(nnx.BatchNorm,))
      >>> per_unit = {k.replace("bns", "convs"): v for k, v in jp.activations.apoz(bn).items()}
      >>> params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
      >>> scores = jp.activations.unit_scores(params, per_unit)
      >>> scores["convs"][0]["kernel"].shape
      (3, 3, 1, 4)

    References:
      Hu et al., "Network Trimming", 2016. https://arxiv.org/abs/1607.03250
    """
    _check_activation(activation)
    return _per_unit(captures, lambda z: jnp.mean(activation(z) != 0, axis=0).astype(jnp.float32))


def unit_scores(params: optax.Params, per_unit: dict[str, jax.Array]) -> optax.Params:
    """Returns ``per_unit`` scores broadcast onto each kernel's output axis (params' structure).

    A kernel ``[..., in, out]`` whose module has a per-unit score vector
    ``[out]`` gets it on every entry of each unit's column; kernels without
    scores and non-kernel leaves get ``+inf`` (ranked after every finite
    score), so ``topk``/``global_topk`` or a structured selection can consume
    the tree. Under ``jp.masks.structured(..., scope="global")`` pass
    ``reduce="max"`` (or ``"mean"``): every entry of a unit holds its score,
    so the default ``"l2"`` would rank ``score * sqrt(fan_in)`` and could
    empty a layer of small fan-in.

    The ``+inf`` keeps an unscored kernel dense only under a *global*
    selection (``global_topk``, ``structured(..., scope="global")``). A
    per-layer selection (``topk``, ``structured``'s default
    ``scope="layer"``, ``jp.prune``'s default scope) prunes
    ``round(sparsity * n)`` entries of every leaf it selects whatever their
    scores, so an unscored kernel still loses that many (ties of ``+inf``
    broken by flatten order: its first entries, or with a structured
    selection its first units; leaving the logits out of ``per_unit``
    removes half of the classes at 50%). Pass
    ``where=jp.activations.scored_where(per_unit)`` to select only the
    scored kernels (second example).

    Args:
      params: the params tree of the scored model (``nnx.state(model,
        nnx.Param)``, linen's ``variables["params"]``); only its structure and
        shapes are read.
      per_unit: ``{module path: scores}``, one score per output unit of that
        module's kernel: ``[out]`` for ``[..., in, out]``, or a general linear
        kernel's output axes (e.g. ``[heads, head_dim]``); e.g. from
        :func:`apoz` or :func:`mean_abs`. Every key must own a kernel of
        ``params``.

    Raises:
      ValueError: a key of ``per_unit`` owns no kernel of ``params`` (e.g.
        linen's full variables passed instead of ``variables["params"]``: every
        kernel would get ``+inf``; or a BatchNorm's path, whose scores belong
        to the conv feeding it: see :func:`apoz`), or a vector's length is not
        its kernel's number of units.

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> p = {"fc": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
      >>> jp.activations.unit_scores(p, {"fc": jnp.array([1., 3.])})["fc"]["kernel"].tolist()
      [[1.0, 3.0], [1.0, 3.0]]

      A kernel left out of ``per_unit`` (here ``"out"``) is still pruned by a
      per-layer selection unless ``where`` leaves it out:

      >>> p = {"fc": {"kernel": jnp.ones((2, 2))}, "out": {"kernel": jnp.ones((2, 2))}}
      >>> per_unit = {"fc": jnp.array([1., 3.])}
      >>> s = jp.activations.unit_scores(p, per_unit)
      >>> jp.masks.topk(s, 0.5)["out"]["kernel"].tolist()
      [[False, False], [True, True]]
      >>> m = jp.masks.topk(s, 0.5, where=jp.activations.scored_where(per_unit))
      >>> m["fc"]["kernel"].tolist(), m["out"]["kernel"].tolist()
      ([[False, True], [False, True]], True)
    """
    flat, treedef = leaves_with_paths(params)
    owners = {_kernel_owner(path, leaf) for path, leaf in flat} - {None}
    unused = sorted(set(per_unit) - owners)
    if unused:
        hint = ""
        if any(path and path[0] == "params" for path, _ in flat):
            hint = ' These params start with "params/": for linen pass variables["params"].'
        # A module with a per-channel "scale" but no kernel is a normalization
        # layer: its captures score the activation after BN, which belongs to
        # the conv (or dense) layer feeding it.
        norms = sorted(
            {path_str(path[:-1]) for path, _ in flat if len(path) > 1 and path[-1] == "scale"}
            & set(unused)
        )
        if norms:
            hint += (
                f" {norms} look like normalization layers (a 'scale', no kernel): to score "
                "a conv by its activation after BatchNorm, re-key each score to the path of "
                "the conv feeding it, e.g. {k.replace('bns', 'convs'): v for k, v in "
                "apoz(bn_captures).items()} for jp.models.VGGSmall (see jp.activations.apoz)."
            )
        raise ValueError(
            f"unit_scores: per_unit has scores for {unused}, which own no kernel of params "
            f"(the kernels' modules are {sorted(owners)[:10]}), so they would be dropped "
            f"silently.{hint} Fix: pass the params of the captured model (keys are module "
            "paths such as 'layers/0'), or drop those keys."
        )
    out = []
    for path, leaf in flat:
        owner = _kernel_owner(path, leaf)
        if owner is not None and owner in per_unit:
            vec = jnp.asarray(per_unit[owner], jnp.float32)
            shape = tuple(jnp.shape(leaf))
            # One score per unit: [out], or a general linear kernel's output axes ([heads, dim]).
            if not (1 <= vec.ndim < len(shape) and vec.shape == shape[len(shape) - vec.ndim :]):
                raise ValueError(
                    f"unit_scores: per_unit[{owner!r}] has shape {vec.shape}, but the kernel "
                    f"{path_str(path)!r} of shape {shape} has {shape[-1]} units (its last "
                    "axis; a general linear kernel's output axes, e.g. [heads, dim], also "
                    "fit). Fix: one score per output unit, e.g. "
                    "jp.activations.mean_abs(captures) of this model."
                )
            out.append(jnp.broadcast_to(vec, jnp.shape(leaf)))
        else:
            out.append(jnp.full(jnp.shape(leaf), jnp.inf, jnp.float32))
    return jax.tree.unflatten(treedef, out)


def scored_where(per_unit: dict[str, Any]) -> Callable[[tuple, Any], bool]:
    """Returns a ``where`` selecting only the kernels that ``per_unit`` scores.

    :func:`unit_scores` gives the kernels without scores ``+inf``, which a
    per-layer selection (``topk``, ``structured``'s default
    ``scope="layer"``, ``jp.prune``'s default scope) still prunes by
    ``round(sparsity * n)`` entries each. Pass this predicate as ``where=``
    to any selection (or to ``jp.prune``) so those kernels stay dense; it
    selects a leaf when it is a kernel (``.../kernel``, ``ndim >= 2``) of a
    module path in ``per_unit``.

    Args:
      per_unit: ``{module path: scores}``, as given to :func:`unit_scores`
        (e.g. from :func:`apoz` or :func:`mean_abs`).

    Returns:
      A predicate ``(path, leaf) -> bool``.

    Raises:
      ValueError: ``per_unit`` is not a dict keyed by module path, or is empty
        (the predicate would select nothing).

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> where = jp.activations.scored_where({"layers/0": jnp.ones(3)})
      >>> where(("layers", 0, "kernel"), jnp.ones((4, 3)))
      True
      >>> where(("layers", 0, "bias"), jnp.ones(3)), where(("out", "kernel"), jnp.ones((3, 2)))
      (False, False)
    """
    if not isinstance(per_unit, dict) or not all(isinstance(k, str) for k in per_unit):
        raise ValueError(
            f"scored_where: per_unit must be a dict {{module path: scores}}, got "
            f"{type(per_unit).__name__}. Fix: pass the dict given to unit_scores, e.g. "
            "jp.activations.apoz(captures)."
        )
    if not per_unit:
        raise ValueError(
            "scored_where: per_unit is empty, so the predicate would select no leaf and "
            "nothing would be pruned. Fix: pass the per-unit scores given to unit_scores, "
            "e.g. jp.activations.apoz(captures)."
        )
    names = frozenset(per_unit)

    def where(path: tuple, leaf: Any) -> bool:
        return _kernel_owner(tuple(path), leaf) in names

    return where
