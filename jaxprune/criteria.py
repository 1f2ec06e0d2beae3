"""Criteria: params (+ grads, + a key, + statistics) -> scores with the params' structure.

A criterion is a plain function. The pruning transform reads its signature
once, at construction, and hands it what it names: ``params`` always,
``grads`` (the gradients of the current step), ``key`` (a PRNG key), and any
extra keyword argument given to ``tx.update``. Higher scores are kept.

A criterion that needs statistics accumulated over steps (an EMA of
saliencies, movement, ...) is a :class:`StatefulCriterion`: ``init`` builds
its state from the params, ``update`` folds in each step, ``score`` turns the
state into scores when masks refresh.

How a criterion is called (:class:`StatefulCriterion`, :func:`call_with`,
:func:`check_extra_args`, :func:`needs_key`) lives in
:mod:`jaxprune._criteria_args` and is re-exported here. The first-order Taylor
family (:func:`ema_saliency`, :func:`movement`, :func:`taylor`,
:func:`taylor_ema`) lives in :mod:`jaxprune.criteria_taylor`, the second-order
one (:func:`obd`, ...) in :mod:`jaxprune.criteria_second_order`; both are
re-exported here.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxprune._criteria_args import StatefulCriterion, call_with
from jaxprune._criteria_args import check_extra_args as check_extra_args
from jaxprune._criteria_args import needs_key as needs_key
from jaxprune._tree import (
    check_array_leaves,
    key_parts,
    leaves_with_paths,
    map_pair,
    mirrors_variables,
    path_str,
    unwrap_variables,
)
from jaxprune.criteria_second_order import fisher_diag, hutchinson_diag, obd, obd_fisher
from jaxprune.criteria_taylor import (
    _GRADS_FIX,
    _f32_product,
    ema_saliency,
    movement,
    taylor,
    taylor_ema,
)

__all__ = ["magnitude", "random", "saliency", "StatefulCriterion", "as_stateful"]


def magnitude(params: optax.Params) -> optax.Params:
    """Returns ``|w|`` for every leaf of ``params``.

    Args:
      params: a pytree of arrays (every leaf must be an array or a number).

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> jp.criteria.magnitude({"w": jnp.array([-2., 1.])})["w"].tolist()
      [2.0, 1.0]

    References:
      Han et al., "Learning both Weights and Connections for Efficient Neural
      Networks", 2015. https://arxiv.org/abs/1506.02626
    """
    check_array_leaves(params, "params")
    return jax.tree.map(jnp.abs, params)


@mirrors_variables
def random(params: optax.Params, *, key: jax.Array) -> optax.Params:
    """Returns i.i.d. uniform scores in ``[0, 1)`` shaped like each leaf of ``params``.

    Each leaf draws from ``key`` folded with a hash (CRC-32) of its path, so
    adding or removing a leaf does not reshuffle the others.

    Args:
      params: a pytree of arrays; only the leaves' shapes are read (nnx
        ``Variable`` s are unwrapped, and the result is wrapped like them).
      key: one JAX PRNG key (typed, or a raw ``uint32[2]``), required; ``jp.prune`` passes it
        from ``tx.update(..., key=k)`` or its own ``key`` folded with the step.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxprune as jp
      >>> s = jp.criteria.random({"w": jnp.zeros((2, 3))}, key=jax.random.key(0))
      >>> s["w"].shape
      (2, 3)

    References:
      Blalock et al., "What is the State of Neural Network Pruning?", 2020 (random
      pruning as the baseline). https://arxiv.org/abs/2003.03033
    """
    key_parts(key, "key")  # a clear error for key=None or a non-key
    check_array_leaves(params, "params")  # an unfiltered equinox module: say so
    flat, treedef = leaves_with_paths(params)
    scores = [
        jax.random.uniform(jax.random.fold_in(key, _path_hash(p)), jnp.shape(x), jnp.float32)
        for p, x in flat
    ]
    return jax.tree.unflatten(treedef, scores)


def _path_hash(path: Any) -> int:
    """A stable 31-bit hash of a normalized leaf path (the same in every process)."""
    return zlib.crc32(path_str(path).encode()) & 0x7FFFFFFF


@mirrors_variables
def saliency(params: optax.Params, grads: optax.Updates) -> optax.Params:
    """Returns ``|w * g|``, the first-order estimate of the loss change from removing ``w``.

    Scores are float32. A complex leaf scores ``|w| * |g|``, its moduli as in
    :func:`magnitude` (casting ``w * g`` to a real dtype would drop its
    imaginary part).

    Args:
      params: a pytree of arrays (the weights ``w``).
      grads: the loss's gradients, a pytree with the leaves of ``params`` (same paths
        and shapes).

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> p, g = {"w": jnp.array([2., 1.])}, {"w": jnp.array([-1., 3.])}
      >>> jp.criteria.saliency(p, g)["w"].tolist()
      [2.0, 3.0]

    References:
      Mozer & Smolensky, "Skeletonization", 1989; Lee et al., "SNIP", 2019.
      https://arxiv.org/abs/1810.02340
    """
    # An unfiltered equinox module: name the leaf and the fix, as magnitude does.
    check_array_leaves(params, "params")
    check_array_leaves(grads, "grads")
    return map_pair(_abs_f32_product, params, grads, "grads", _GRADS_FIX)


def _abs_f32_product(p: Any, w: Any, g: Any) -> jax.Array:
    """``|w * g|`` in float32; for complex leaves ``|w| * |g|`` (the product's modulus)."""
    if jnp.iscomplexobj(w) or jnp.iscomplexobj(g):
        # Decided at trace time: real leaves keep the fused search's ops.
        return jnp.abs(jnp.asarray(w)).astype(jnp.float32) * jnp.abs(jnp.asarray(g)).astype(
            jnp.float32
        )
    # In float32 (cast first): a float16 product of small values underflows to 0.
    return jnp.abs(_f32_product(p, w, g))


# Criteria whose scores are an element-wise function of (params, grads): jp.prune
# recomputes them inside the selection's search (fused) instead of storing them.
ELEMENTWISE = (magnitude, saliency)


def as_stateful(criterion: Callable[..., Any] | StatefulCriterion) -> StatefulCriterion:
    """Returns ``criterion`` as a :class:`StatefulCriterion` (stateless ones get an empty state).

    Args:
      criterion: a :class:`StatefulCriterion` (returned as it is once its three fields
        are checked to be callable), or a function ``(params, [grads], *, [key]) ->
        scores``, which becomes ``score`` with a ``()`` state. A factory of a stateful
        criterion (e.g. ``jp.criteria.taylor_ema``) must be called first.

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> c = jp.criteria.as_stateful(jp.criteria.magnitude)
      >>> p = {"w": jnp.array([-3.0, 1.0])}
      >>> state = c.init(p)
      >>> state, c.score(state, p)["w"].tolist()
      ((), [3.0, 1.0])
      >>> jp.criteria.as_stateful(c) is c
      True
    """
    if isinstance(criterion, StatefulCriterion):
        bad = [f for f in StatefulCriterion._fields if not callable(getattr(criterion, f))]
        if bad:
            raise ValueError(
                f"criterion is a StatefulCriterion whose {', '.join(bad)} "
                f"{'is' if len(bad) == 1 else 'are'} not callable: "
                + ", ".join(f"{f}={getattr(criterion, f)!r}" for f in bad)
                + ". Fix: StatefulCriterion(init=params -> state, update=(state, params, grads) "
                "-> state, score=(state, params) -> scores)."
            )
        return criterion
    if isinstance(criterion, jax.Array):
        # optax.inject_hyperparams(jp.prune) calls every callable argument as a
        # schedule of the step, the default criterion included.
        raise ValueError(
            f"criterion must be a function, got an array {criterion!r}: this happens when "
            "optax.inject_hyperparams wraps jp.prune, which calls the criterion as a "
            "schedule. Fix: inject hyperparameters into the inner optimizer instead: "
            "jp.prune(optax.inject_hyperparams(optax.adam)(learning_rate=1e-3), sparsity=...)."
        )
    if criterion in _FACTORIES:
        raise ValueError(
            f"criterion={criterion.__name__} is a factory of a stateful criterion: call it, "
            f"e.g. criterion=jp.criteria.{criterion.__name__}(), so that it keeps statistics "
            "across steps."
        )
    if not callable(criterion):
        raise ValueError(
            f"criterion must be a function (params, [grads], *, [key]) -> scores or a "
            f"jp.criteria.StatefulCriterion, got {criterion!r}. Fix: e.g. "
            "criterion=jp.criteria.magnitude."
        )
    return StatefulCriterion(
        init=lambda params: (),
        update=lambda state, params, grads, **extra: state,
        score=lambda state, params, **extra: call_with(criterion, params, **extra),
    )


# --- Data-aware criteria ---------------------------------------------------------------------


def _input_axis_norms(w: jax.Array, norms: Any) -> jax.Array:
    """Broadcasts per-input norms ``[in]`` against a kernel ``[..., in, out]``."""
    norms = jnp.asarray(norms, jnp.float32)
    if norms.ndim == 1 and jnp.ndim(w) >= 2:
        return norms[:, None]
    return norms


@mirrors_variables
def wanda(params: optax.Params, input_norms: Any) -> optax.Params:
    """Returns Wanda scores ``|W_ij| * ||X_i||_2`` for every leaf of ``params``.

    Flax kernels are ``[..., in, out]`` (``y = x @ W``), so the input norms,
    one per input feature (per input channel for a conv kernel), broadcast
    along the second-to-last axis. Wanda compares scores within each output
    unit (PyTorch's "output row", a column here): select with
    :func:`jaxprune.distributions.per_output` to prune the same fraction of
    every unit, as the paper does.

    Args:
      params: a pytree of weights.
      input_norms: a tree with the structure of ``params``: for each prunable
        kernel the L2 norm of its input over all calibration tokens (shape
        ``[in]``, or any shape broadcastable to the kernel, such as
        ``[heads, head_dim, 1]`` for an attention output projection
        ``[heads, head_dim, out]``); a scalar (e.g. ``1.0``) for leaves that
        are not pruned. See
        :func:`jaxprune.activations.input_norms` for capturing them.

    Returns:
      A tree of float32 scores with the structure and shapes of ``params``.

    Raises:
      ValueError: the two trees differ (the message lists the paths).

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> w = {"kernel": jnp.array([[1., -2.], [3., 1.]])}
      >>> jp.criteria.wanda(w, {"kernel": jnp.array([2., 1.])})["kernel"].tolist()
      [[2.0, 4.0], [3.0, 1.0]]

    References:
      Sun et al., "A Simple and Effective Pruning Approach for Large Language
      Models", 2023. https://arxiv.org/abs/2306.11695
    """
    from jaxprune._tree import check_same_structure

    flat, _ = leaves_with_paths(params)
    # Containers may differ (an nnx.State of Variables and the norms of its pure dict).
    if [path_str(p) for p, _ in flat] != [
        path_str(p) for p, _ in leaves_with_paths(input_norms)[0]
    ]:
        check_same_structure(
            params,
            input_norms,
            ref_name="params",
            other_name="input_norms",
            fix="give one entry per params leaf: the norms from jp.activations.input_norms, "
            "and a scalar such as 1.0 for leaves that are not pruned (biases)",
        )
    for (path, w), (_, n) in zip(flat, leaves_with_paths(input_norms)[0], strict=True):
        b = _input_axis_norms(w, n)
        try:
            if jnp.broadcast_shapes(jnp.shape(w), b.shape) != tuple(jnp.shape(w)):
                raise ValueError("the scores would not have the kernel's shape")
        except ValueError:
            general = (
                " A kernel with several input or output axes (LinearGeneral, attention "
                "projections [in, heads, head_dim] or [heads, head_dim, out]) takes norms "
                "shaped to broadcast against it, its input axes first (e.g. norms[:, None, "
                "None] for [in, heads, head_dim]); jp.activations.input_norms shapes them so."
                if jnp.ndim(w) >= 3
                else ""
            )
            raise ValueError(
                f"input_norms of {path_str(path)!r} has shape {jnp.shape(n)}, which does not "
                f"match the kernel's input axis: kernel shape {jnp.shape(w)} (a 1-D norm goes "
                f"on axis -2, {jnp.shape(w)[-2] if jnp.ndim(w) >= 2 else '?'} entries).{general} "
                "Fix: pass one norm per input feature (jp.activations.input_norms), or a "
                "scalar for leaves not pruned."
            ) from None
    return jax.tree.unflatten(
        jax.tree.structure(unwrap_variables(params)),
        [
            jnp.abs(w).astype(jnp.float32) * _input_axis_norms(w, n)
            for (_, w), (_, n) in zip(flat, leaves_with_paths(input_norms)[0], strict=True)
        ],
    )


# Functions returning a StatefulCriterion: passed uncalled, they would be taken
# for a stateless criterion and fail inside the jitted step.
_FACTORIES = (ema_saliency, movement, taylor_ema, obd_fisher)

__all__ += [
    "wanda",
    "ema_saliency",
    "movement",
    "taylor",
    "taylor_ema",
    "obd",
    "obd_fisher",
    "fisher_diag",
    "hutchinson_diag",
]
