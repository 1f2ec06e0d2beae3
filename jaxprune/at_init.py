"""Pruning at initialization: SNIP, GraSP and SynFlow choose a mask before training.

Each returns scores (higher kept) or, for the iterative SynFlow, masks. Scores
feed any selection (``jp.masks.topk``, ``jp.masks.global_topk``); masks chosen
here (SynFlow's, or a selection of the scores) train with ``jp.prune`` through a
``scope`` that returns them, which holds them fixed::

    masks = jp.at_init.synflow(apply_fn, params, (1, 784), 0.9)
    tx = jp.prune(optax.adam(1e-3), sparsity=0.9,
                  scope=lambda scores, sparsity, where=None: masks)

(a ``criterion`` returning the masks is refused: a criterion returns scores
with the params' shapes, and masks hold a scalar ``True`` for the leaves
``where`` leaves out).

Called outside ``jax.jit``, each call computes its scores (and SynFlow's final
round) as one program, traced anew with the ``loss_fn`` / ``apply_fn`` of the
call (state they read, such as eval mode, is current) and compiled once per
program, instead of compiling every operation of the gradient apart: SNIP's
first call on a 784-1024-256-10 MLP compiles 3 programs instead of 117, and a
later call on the same model and shapes none (see
``jaxprune._compile.one_program``, which also says when a call runs op by op
as before).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune import _counts
from jaxprune import masks as _masks
from jaxprune._compile import jit_by_content, one_program
from jaxprune._tree import (
    Where,
    as_int,
    flagged,
    leaves_with_paths,
    path_str,
    prunable_flags,
)
from jaxprune.at_init_checks import (
    _check_differentiable,
    _check_finite,
    _check_input_shape,
    _check_scores_finite,
    _check_temperature,
    _input_dtype,
    _num_not_finite,
    _widened,
    _working_dtype,
)

__all__ = ["snip", "grasp", "synflow_scores", "synflow"]


def snip(loss_fn: Callable[..., jax.Array], params: optax.Params, *batch: Any) -> optax.Params:
    """Returns SNIP connection sensitivities ``|w * dL/dw| / sum |w * dL/dw|`` on one batch.

    Args:
      loss_fn: ``loss_fn(params, *batch) -> scalar``.
      params: the initialized params.
      *batch: one batch of data passed to ``loss_fn``.

    Returns:
      float32 scores with the params' structure (they sum to 1 over all leaves),
      computed with float16 params widened to float32 (float16 products of
      small weights and gradients would underflow to 0).

    Raises:
      ValueError: a leaf of ``params`` is not floating (an integer step
        counter: pass only the params); or, outside a trace, a score is inf
        or nan (a NaN/inf in the batch or the params, or a loss that
        overflows), where a selection would pick the masks by flatten order.

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> loss = lambda p, x: jnp.sum(p["w"] * x)
      >>> jp.at_init.snip(loss, {"w": jnp.array([1., -3.])}, jnp.array([2., 2.]))["w"].tolist()
      [0.25, 0.75]

    References:
      Lee, Ajanthan & Torr, "SNIP: Single-shot Network Pruning based on
      Connection Sensitivity", 2019. https://arxiv.org/abs/1810.02340
    """
    _check_differentiable(params, "snip")

    def scores_of(wide, *batch):
        grads = jax.grad(loss_fn)(wide, *batch)
        s = jax.tree.map(lambda w, g: jnp.abs(w * g).astype(jnp.float32), wide, grads)
        total = sum(jnp.sum(x) for x in jax.tree.leaves(s))
        return jax.tree.map(lambda x: x / jnp.maximum(total, 1e-30), s), _num_not_finite(s)

    # float16 widened: a float16 product of small weights and gradients
    # underflows to 0, and flatten order would then pick the mask.
    scores, bad = one_program(scores_of, _widened(params), *batch)
    _check_scores_finite(scores, bad, "snip", "|w * dL/dw|")
    return scores


def grasp(
    loss_fn: Callable[..., jax.Array],
    params: optax.Params,
    *batch: Any,
    temperature: float | None = None,
) -> optax.Params:
    """Returns GraSP scores to keep: ``w * (H g)``, the negation of the paper's ``-w * (H g)``.

    GraSP removes the weights whose removal least reduces the gradient flow,
    i.e. the HIGHEST ``S = -w * (H g)``; negated here so that, as for every
    jaxprune criterion, higher scores are kept. ``H g`` is one Hessian-vector
    product (``jax.jvp`` of ``jax.grad``) with ``g`` held fixed, computed with
    float16 params widened to float32 (in float16, ``H g`` underflows to 0).

    The authors' code computes ``g`` and ``H g`` on the cross-entropy of the
    logits divided by a temperature ``T = 200`` (the paper does not mention
    it). The default here is the plain loss (``T = 1``); pass
    ``temperature=200.0`` and a ``loss_fn`` that takes a ``temperature``
    keyword and divides its logits by it, as the official code does. Measured
    on a small VGG with BatchNorm (16-32 channels) on 8x8 digits, 256
    calibration images, global selection, 150 Adam steps: test accuracy
    0.214 at 90% sparsity with ``T = 1`` against 0.531 with ``T = 200``
    (random masks 0.227, SNIP 0.728); at 50%, 0.834 and 0.824.

    Args:
      loss_fn: ``loss_fn(params, *batch) -> scalar``; with ``temperature``,
        ``loss_fn(params, *batch, temperature=T)``, the loss of the logits
        divided by ``T``.
      params: the initialized params.
      *batch: one batch of data passed to ``loss_fn``.
      temperature: ``None`` (default: ``loss_fn`` is called as it is) or a
        positive float passed to ``loss_fn`` as ``temperature=``; the official
        code uses 200.

    Returns:
      float32 scores with the params' structure.

    Raises:
      ValueError: ``temperature`` is not a positive number, or ``loss_fn``
        takes no ``temperature`` keyword while one is given; a leaf of
        ``params`` is not floating; or, outside a trace, a score is inf or nan.

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> loss = lambda p, x: 0.5 * jnp.sum(x * p["w"] ** 2)   # H = diag(x), g = x * w
      >>> jp.at_init.grasp(loss, {"w": jnp.array([1., 2.])}, jnp.array([3., 1.]))["w"].tolist()
      [9.0, 4.0]

      With the official code's temperature, ``loss_fn`` divides its logits by it:

      >>> loss_t = lambda p, x, temperature: 0.5 * jnp.sum(x * (p["w"] / temperature) ** 2)
      >>> jp.at_init.grasp(loss_t, {"w": jnp.array([1., 2.])}, jnp.array([3., 1.]),
      ...                  temperature=2.0)["w"].tolist()  # H = diag(x) / 4, g = x * w / 4
      [0.5625, 0.25]

    References:
      Wang, Zhang & Grosse, "Picking Winning Tickets Before Training by
      Preserving Gradient Flow", 2020. https://arxiv.org/abs/2002.07376
      Official code (``T = 200``): https://github.com/alecwangcq/GraSP
    """
    _check_differentiable(params, "grasp")
    kwargs = {}
    if temperature is not None:
        kwargs["temperature"] = _check_temperature(temperature, loss_fn)

    def scores_of(params, *batch):
        grad_fn = jax.grad(lambda p: loss_fn(p, *batch, **kwargs))
        g = jax.lax.stop_gradient(grad_fn(params))
        _, hg = jax.jvp(grad_fn, (params,), (g,))
        scores = jax.tree.map(lambda w, h: (w * h).astype(jnp.float32), params, hg)
        return scores, _num_not_finite(scores)

    # float16's H g underflows to 0 on typical initializations.
    scores, bad = one_program(scores_of, _widened(params), *batch)
    _check_scores_finite(scores, bad, "grasp", "w * (H g)")
    return scores


def _apply_ones(apply_fn: Callable[..., Any], params: Any, x: jax.Array) -> jax.Array:
    """Returns ``apply_fn(params, x)``, a failure re-raised as a ``ValueError`` about ``x``'s shape.

    A wrong ``input_shape`` otherwise surfaces as a raw ``dot_general`` or
    ``conv`` shape error from deep inside the model.
    """
    try:
        return apply_fn(params, x)
    except (TypeError, ValueError) as e:
        cause = str(e).strip().splitlines()[0].rstrip(".") if str(e).strip() else "no message"
        if len(cause) > 300:
            cause = cause[:300] + "..."
        raise ValueError(
            f"apply_fn(params, x) failed on the all-ones x of input_shape={tuple(x.shape)}: "
            f"{type(e).__name__}: {cause}. Fix: input_shape must be the shape of one input "
            "batch the model accepts, batch of 1 included, with the feature (channel) size "
            "the first layer expects where the model reads it, e.g. (1, 784) for an MLP on "
            "flat MNIST, (1, 28, 28, 1) for a channels-last (flax NHWC) CNN, (1, 1, 28, 28) "
            "for a channels-first (equinox, PyTorch NCHW) one."
        ) from e


def _scores_and_r(
    apply_fn: Callable[..., Any], params: Any, input_shape: Any
) -> tuple[Any, jax.Array]:
    """Returns ``(scores, R)``, both in the params' dtype (float32 at least), never cast down.

    A float32 cast of ``R`` or of the scores would turn float64 values past
    ``3.4e38`` (deep networks) into ``inf`` and undo ``jax_enable_x64``.
    """
    x = jnp.ones(_check_input_shape(input_shape), _input_dtype(params))
    abs_params = jax.tree.map(jnp.abs, params)

    def r_fn(p):
        out = jnp.asarray(_apply_ones(apply_fn, p, x))
        return jnp.sum(out.astype(_working_dtype(out.dtype)))

    r, grads = jax.value_and_grad(r_fn)(abs_params)
    # |dR/dw * w|, as Tanaka et al.'s code (torch.clone(p.grad * p).detach().abs_()). The
    # sign matters: R does not change when a layer before a LayerNorm, a GroupNorm or a
    # train-mode BatchNorm is scaled, so by Euler's theorem that layer's signed scores sum
    # to ~0, half are negative and a signed ranking would prune them first (and below the
    # -1 marker of pruned entries, the rounds would bring pruned entries back).
    scores = jax.tree.map(
        lambda w, g: jnp.abs(w * g).astype(_working_dtype(jnp.result_type(w, g))),
        abs_params,
        grads,
    )
    return scores, r


def synflow_scores(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    params: optax.Params,
    input_shape: tuple[int, ...],
) -> optax.Params:
    """Returns SynFlow scores ``|dR/dw * w|`` with ``R = 1^T f(|W|; 1)``, data-free.

    The scores are ``>= 0``: the absolute value is taken, as in the authors'
    code. It matters for a layer that feeds a normalization layer (LayerNorm,
    GroupNorm, or BatchNorm on batch statistics): ``R`` does not change when
    that layer is scaled, so its signed ``dR/dw * w`` sum to about 0, half
    negative. (On a 64-256-LayerNorm-256-10 MLP on digits at 90% sparsity,
    ranking the signed values kept 73 of the first layer's 16,384 weights and
    reached 0.768 test accuracy after training, against 5,909 and 0.924.)

    The scores keep the params' dtype (float32 at least), so float64 params
    under ``jax_enable_x64`` give float64 scores: ``R`` is a product of
    ``|W|`` over the network's depth and overflows float32 (``3.4e38``) on deep
    networks (a 60-layer ReLU MLP at lecun-normal init has ``R ~ 1e50``).

    ``apply_fn`` must run the network in inference mode: ``model.eval()``
    before ``nnx.split`` (linen: ``use_running_average=True``,
    ``deterministic=True``), so BatchNorm uses its running averages and dropout
    is off. SynFlow scores the synaptic flow of the network on one all-ones
    input; in training mode BatchNorm normalises that batch by its own
    statistics, which removes almost all of the signal, the layers before it
    score near 0 and a global selection empties them (layer collapse), and
    dropout makes the scores random. For an nnx model::

        model.eval()
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        apply_fn = lambda p, x: nnx.merge(graphdef, p, rest, copy=True)(x)

    Args:
      apply_fn: ``apply_fn(params, x) -> outputs`` of the network, in
        inference mode (see above).
      params: params (already masked, for the iterative use).
      input_shape: the shape of one all-ones input batch, e.g. ``(1, 28, 28, 1)``.

    Raises:
      ValueError: ``input_shape`` is not a tuple of positive ints, or
        ``apply_fn`` fails on an input of that shape (the message quotes the
        model's error, e.g. a ``dot_general`` size mismatch); or, outside a
        trace, ``R`` or a score is inf/nan (the params' dtype overflowed: run
        in float64 with ``jax_enable_x64``, or use fewer layers / rescale).

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> f = lambda p, x: x @ p["a"] @ p["b"]
      >>> p = {"a": jnp.array([[1., -2.]]), "b": jnp.array([[3.], [1.]])}
      >>> jp.at_init.synflow_scores(f, p, (1, 1))["a"].tolist()  # paths 1*3 and 2*1
      [[3.0, 2.0]]

    References:
      Tanaka et al., "Pruning neural networks without any data by iteratively
      conserving synaptic flow", 2020. https://arxiv.org/abs/2006.05467
    """
    _check_differentiable(params, "synflow_scores")

    def scores_of(params):
        scores, r = _scores_and_r(apply_fn, params, input_shape)
        return scores, r, _num_not_finite(scores)

    scores, r, bad = one_program(scores_of, params)
    _check_finite(r, bad, scores, "")
    return scores


def _masked_scores(
    apply_fn: Callable[..., Any], params: Any, masks: Any, input_shape: Any, flags: list[bool]
) -> tuple[Any, jax.Array, jax.Array]:
    """Returns ``(selection scores, R, number of non-finite live scores)``.

    Pruned entries get ``-1`` so they stay pruned (their score is 0, but so
    may be others'); every live score is ``>= 0`` (``|dR/dw * w|``), so the
    rounds' masks are nested. Selections compare scores as float32: wider scores are
    first divided by the largest live prunable score, in their own dtype, so
    float64 scores past float32's range keep their order.
    """
    scores, r = _scores_and_r(apply_fn, _masks.apply_masks(params, masks), input_shape)
    bad = _num_not_finite(scores, masks)
    sel = scores
    leaves = jax.tree.leaves(scores)
    if any(jnp.finfo(x.dtype).bits > 32 for x in leaves):
        m_leaves = jax.tree.leaves(masks)
        top = jnp.zeros((), jnp.result_type(*leaves))
        for x, m, f in zip(leaves, m_leaves, flags, strict=True):
            if f and jnp.size(x):
                top = jnp.maximum(top, jnp.max(jnp.where(m, x, 0)))
        scale = jnp.where(top > 0, top, 1)
        # In float32 after the division, as the selection compares them anyway.
        sel = jax.tree.map(lambda x: (x / scale.astype(x.dtype)).astype(jnp.float32), scores)
    sel = jax.tree.map(lambda x, m: jnp.where(m, x, -1.0), sel, masks)
    return sel, r, bad


def synflow(
    apply_fn: Callable[[Any, jax.Array], jax.Array],
    params: optax.Params,
    input_shape: tuple[int, ...],
    sparsity: float,
    *,
    iterations: int = 100,
    where: Where | None = None,
) -> optax.Params:
    """Returns SynFlow masks: ``iterations`` rounds of scoring and global pruning.

    Round ``k`` keeps the global top ``density**(k / iterations)`` of the
    scores of the masked network (the exponential schedule), so the final
    masks prune exactly ``round(sparsity * N)`` prunable entries. Each round's
    masks are a subset of the previous round's (a pruned entry stays pruned).

    ``apply_fn`` must run the network in inference mode (``model.eval()``;
    BatchNorm on its running averages, no dropout): in training mode
    BatchNorm normalises the all-ones input by its own statistics, the layers
    before it score near 0 and are emptied (layer collapse, the failure
    SynFlow is meant to prevent); see :func:`synflow_scores` for an nnx
    example. A prunable leaf that ends with no entry kept is warned about.

    The rounds are traced afresh at every call (so a model switched to eval
    mode, or other state ``apply_fn`` reads, is seen) and compiled once per
    program: a later call that traces to the same program compiles nothing.
    Scores are computed in the params' dtype: on deep networks ``R``
    overflows float32, which raises a ``ValueError``; pass float64 params with
    ``jax_enable_x64`` on, as the paper does (the masks are the same bools).

    Args:
      apply_fn: ``apply_fn(params, x) -> outputs``, in inference mode.
      params: the initialized params.
      input_shape: shape of the all-ones input, batch of 1 included.
      sparsity: final fraction to prune in ``[0, 1]``.
      iterations: number of score/prune rounds (the paper uses 100).
      where: predicate choosing the prunable leaves.

    Raises:
      ValueError: ``iterations`` is not a positive int, ``sparsity`` is out of
        range, or ``input_shape`` is malformed or not an input ``apply_fn``
        accepts (checked once, before the rounds); or ``R`` or a score of a
        round is inf/nan (overflow on a deep network: run in float64 with
        ``jax_enable_x64``, or use fewer layers / rescale the weights).

    Warns:
      UserWarning: a prunable leaf is pruned entirely (``sparsity < 1``),
        naming the leaves: usually a model in training mode, or layers that
        feed a LayerNorm / GroupNorm.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxprune as jp
      >>> f = lambda p, x: jax.nn.relu(x @ p["a"]) @ p["b"]
      >>> p = {"a": jax.random.normal(jax.random.key(0), (4, 8)), "b": jnp.ones((8, 2))}
      >>> m = jp.at_init.synflow(f, p, (1, 4), 0.5, iterations=10)
      >>> float(jp.sparsity(m))
      0.5

    References:
      Tanaka et al. 2020. https://arxiv.org/abs/2006.05467
    """
    n_iterations = as_int(iterations)  # NumPy and concrete JAX integers too; None for bools
    if n_iterations is None or n_iterations < 1:
        raise ValueError(
            f"iterations must be a positive int (score/prune rounds), got {iterations!r}. "
            "Fix: iterations=100 as in the paper."
        )
    iterations = n_iterations
    if isinstance(sparsity, jax.core.Tracer):
        raise ValueError(
            "synflow's sparsity must be a concrete number in [0, 1], got a traced value: its "
            "rounds run as separate compiled steps on the host, each with its own target "
            "1 - density**(k / iterations). Fix: call synflow outside jax.jit / jax.vmap (it "
            "compiles its rounds itself)."
        )
    _counts._check_sparsity(sparsity)
    _check_differentiable(params, "synflow")
    flags = prunable_flags(params, where)
    if not any(flags) and float(sparsity) > 0:
        shown = ", ".join(
            f"{path_str(p)} {tuple(jnp.shape(x))}" for p, x in leaves_with_paths(params)[0][:8]
        )
        warnings.warn(
            f"synflow found no prunable leaf in params ({shown or 'no leaves'}): nothing is "
            f"pruned, although sparsity={float(sparsity)}. Fix: pass a `where` predicate "
            "(path, leaf) -> bool that selects the kernels by this model's paths (equinox's "
            "Linear names them 'weight', not 'kernel'), or leave where=None (floating leaves "
            "with ndim >= 2).",
            UserWarning,
            stacklevel=2,
        )
    chosen = flagged(params, flags)  # `where` would judge the scores' and masks' dtypes
    input_shape = _check_input_shape(input_shape)
    x = jax.ShapeDtypeStruct(input_shape, _input_dtype(params))
    jax.eval_shape(partial(_apply_ones, apply_fn), params, x)  # fail fast, before any round

    # Built here, not at module level: a jit keyed on apply_fn would replay the
    # first call's trace, with whatever apply_fn closed over then (train/eval
    # mode, BatchNorm statistics, a rebuilt model). Traced at every call, it
    # compiles once per program (a later call on the same model finds it).
    @jit_by_content
    def round_fn(params, masks, s):
        sel, r, bad = _masked_scores(apply_fn, params, masks, input_shape, flags)
        return _masks.global_topk(sel, s, where=chosen), r, bad

    ones = jax.tree.map(lambda x: jnp.ones(jnp.shape(x), jnp.float32), params)
    masks = _masks.global_topk(ones, 0.0, where=chosen)
    density = 1.0 - float(sparsity)
    for k in range(1, iterations + 1):
        s = jnp.float32(1.0 - density ** (k / iterations))
        new_masks, r, bad = round_fn(params, masks, s)
        # The scores that chose new_masks were those of `masks`' network.
        _check_finite(r, bad, params, f" in round {k} of {iterations}")
        masks = new_masks

    # The traced count rounds in float32; fix the exact count on the last scores
    # (one program: op by op, about 60 compiled at the first call).
    def final_scores(params, masks):
        return _masked_scores(apply_fn, params, masks, input_shape, flags)

    sel, r, bad = one_program(final_scores, params, masks)
    _check_finite(r, bad, params, " in the final round")
    if any(flags):  # else the masks stay all True (warned about above)
        masks = _masks.global_topk(sel, float(sparsity), where=chosen)
    _warn_collapsed(masks, flags, float(sparsity))
    return masks


def _warn_collapsed(masks: Any, flags: list[bool], sparsity: float) -> None:
    """Warns naming the prunable leaves with no entry kept (concrete masks, ``sparsity < 1``)."""
    if sparsity >= 1.0:
        return
    collapsed = []
    for (path, m), f in zip(leaves_with_paths(masks)[0], flags, strict=True):
        if not f or not jnp.size(m) or isinstance(m, jax.core.Tracer):
            continue
        if not np.any(np.asarray(m)):  # on the host: no program compiled per leaf shape
            collapsed.append(path_str(path))
    if collapsed:
        warnings.warn(
            f"synflow pruned every entry of {collapsed} at sparsity={sparsity}: layer collapse, "
            "the network is cut at these layers, the failure SynFlow is meant to prevent. "
            "Possible causes: apply_fn runs the model in training mode, where BatchNorm "
            "normalises the all-ones input by its own statistics and the layers before it "
            "score near 0 (fix: score the model in inference mode; nnx: model.eval() before "
            "nnx.split; linen: use_running_average=True, deterministic=True); or these layers "
            "feed a normalization layer that uses its input's own statistics in every mode "
            "(LayerNorm, GroupNorm, RMSNorm): R does not change when such a layer is scaled, "
            "so its synaptic flow is not conserved and its scores can rank below the other "
            "layers' (fix: lower sparsity, or pass a `where` that leaves these leaves out, or "
            "select per layer from jp.at_init.synflow_scores with jp.masks.topk).",
            UserWarning,
            stacklevel=3,
        )
