"""Input checks and dtype helpers of :mod:`jaxprune.at_init`'s criteria.

What SNIP, GraSP and SynFlow check before and after computing their scores
(differentiable params, temperature, input shape, finite scores and SynFlow's
``R``), and the dtypes they compute in (float16 widened, the input's dtype).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxprune._tree import as_float, as_int, leaves_with_paths, path_str


def _check_temperature(temperature: Any, loss_fn: Callable[..., Any]) -> float:
    """Returns ``temperature`` as a positive float once ``loss_fn`` is seen to take it."""
    t = as_float(temperature)  # nan for a non-number (a string, a bool, None)
    if not math.isfinite(t) or t <= 0:
        raise ValueError(
            f"grasp: temperature must be a positive number (the logits are divided by it), got "
            f"{temperature!r}. Fix: temperature=200.0 as the official GraSP code, or leave it "
            "None for the plain loss."
        )
    try:
        params_ = inspect.signature(loss_fn).parameters.values()
    except (TypeError, ValueError):
        return t  # no signature to read (a builtin): the call itself will tell
    if not any(
        p.kind == p.VAR_KEYWORD
        or (p.name == "temperature" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))
        for p in params_
    ):
        raise ValueError(
            f"grasp: temperature={temperature!r} is passed to loss_fn as the keyword "
            f"`temperature`, but loss_fn {getattr(loss_fn, '__name__', loss_fn)!r} takes no such "
            "keyword. Fix: def loss_fn(params, x, y, temperature=1.0): return "
            "cross_entropy(apply(params, x) / temperature, y); or drop temperature= and divide "
            "the logits inside loss_fn."
        )
    return t


def _check_differentiable(params: Any, fn: str) -> None:
    """Raises ``ValueError`` naming the first leaf of ``params`` that is not floating.

    ``jax.grad`` refuses integer and bool leaves with a message about its
    inputs; here the leaf is named, with what to pass instead.
    """
    for path, x in leaves_with_paths(params)[0]:
        try:
            dtype = jnp.result_type(x)
        except TypeError:
            dtype = None  # not an array (a string, an object)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            what = (
                f"is a {type(x).__name__}, not an array" if dtype is None else f"has dtype {dtype}"
            )
            raise ValueError(
                f"{fn}: params leaf {path_str(path)!r} {what}, and {fn} differentiates "
                "every leaf of params, which only a floating leaf allows (an integer step "
                "counter, an RNG count, a bool flag or a function cannot be). Fix: pass only "
                "the float params (nnx: nnx.split(model, nnx.Param, ...); linen: "
                "variables['params']; equinox: eqx.partition(model, eqx.is_inexact_array), "
                "then eqx.combine inside the function you pass) and close over the rest."
            )


def _check_scores_finite(scores: Any, bad: Any, fn: str, formula: str) -> None:
    """Raises ``ValueError`` when ``bad`` scores are inf/nan (concrete only; skipped in a trace)."""
    if isinstance(bad, jax.core.Tracer):
        return  # inside a trace: the caller sees the values it gets back
    if int(bad) == 0:
        return
    n = sum(int(jnp.size(x)) for x in jax.tree.leaves(scores))
    raise ValueError(
        f"{fn}'s scores {formula} are not finite: {int(bad)} of {n} are inf or nan. A selection "
        "would then pick the masks by the leaves' flatten order (one nan in the batch makes "
        "every score nan, and global_topk empties the first layers). Usual causes: a nan or "
        "inf in the batch or the params, or a loss that overflows (log of 0, float16 logits). "
        "Fix: check jnp.isfinite on the batch and on loss_fn(params, *batch), and compute the "
        "loss in float32 (e.g. optax.softmax_cross_entropy_with_integer_labels on float32 logits)."
    )


def _widened(params: Any) -> Any:
    """Returns ``params`` with float16 (and narrower-range) leaves in float32.

    bfloat16 has float32's exponent range and does not underflow here, so it
    stays (an LLM's bf16 params are not copied).
    """
    f32_range = jnp.finfo(jnp.float32).maxexp

    def widen(x):
        if (
            hasattr(x, "dtype")
            and jnp.issubdtype(x.dtype, jnp.floating)
            and jnp.finfo(x.dtype).maxexp < f32_range
        ):
            return jnp.asarray(x, jnp.float32)
        return x

    return jax.tree.map(widen, params)


def _check_input_shape(input_shape: Any) -> tuple[int, ...]:
    """Returns ``input_shape`` as a tuple of positive ints, else raises ``ValueError``."""
    try:
        dims = [as_int(d) for d in input_shape]
    except TypeError:
        dims = [None]
    if not dims or any(d is None or d < 1 for d in dims):
        raise ValueError(
            f"input_shape must be the shape of one all-ones input batch, a tuple of positive "
            f"ints with the batch of 1 included, got {input_shape!r}. Fix: e.g. "
            "input_shape=(1, 784) for an MLP on flat MNIST, (1, 28, 28, 1) for an NHWC CNN."
        )
    return tuple(dims)


def _working_dtype(dtype: Any) -> Any:
    """Returns ``dtype`` widened to float32 at least (bfloat16 sums in float32, float64 stays).

    Chosen by width, not by ``jnp.promote_types``, which refuses float16 with
    float32 under ``jax_numpy_dtype_promotion="strict"``.
    """
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits >= 32:
        return dtype
    return jnp.dtype(jnp.float32)


def _input_dtype(params: Any) -> Any:
    """Returns the dtype of the all-ones input: the first floating leaf's (float32 if none)."""
    for x in jax.tree.leaves(params):
        dtype = jnp.result_type(x)
        if jnp.issubdtype(dtype, jnp.floating):
            return dtype
    return jnp.float32


def _num_not_finite(scores: Any, masks: Any | None = None) -> jax.Array:
    """Returns the number of inf/nan scores (only where ``masks`` is True, when given)."""
    leaves = jax.tree.leaves(scores)
    m_leaves = jax.tree.leaves(masks) if masks is not None else [True] * len(leaves)
    total = jnp.int32(0)
    for x, m in zip(leaves, m_leaves, strict=True):
        total = total + jnp.sum(~jnp.isfinite(x) & m, dtype=jnp.int32)
    return total


def _check_finite(r: Any, num_bad: Any, like: Any, context: str) -> None:
    """Raises ``ValueError`` when ``R`` or a score is inf/nan (concrete values only)."""
    if isinstance(r, jax.core.Tracer) or isinstance(num_bad, jax.core.Tracer):
        return  # inside a trace the caller checks the values it gets back
    if bool(jnp.isfinite(r)) and int(num_bad) == 0:
        return
    dtype = jnp.result_type(r)
    n = sum(int(jnp.size(x)) for x in jax.tree.leaves(like))
    fix = (
        "run SynFlow in float64, as the paper does: jax.config.update('jax_enable_x64', True) "
        "at startup and pass params=jax.tree.map(lambda x: x.astype(jnp.float64), params) "
        "(the masks are the same bool tree), or use fewer layers, or rescale each layer's "
        "weights by a positive constant first (for bias-free ReLU/linear nets that keeps "
        "the ranking)"
        if jnp.finfo(dtype).bits < 64
        else "use fewer layers, or rescale each layer's weights by a positive constant first "
        "(for bias-free ReLU/linear nets that keeps the ranking)"
    )
    raise ValueError(
        f"SynFlow's scores are not finite{context}: R = sum(apply_fn(|params|, ones)) = "
        f"{float(r)} and {int(num_bad)} of {n} scores are inf or nan, in {dtype} (largest "
        f"finite value {float(jnp.finfo(dtype).max):.1e}). SynFlow multiplies |W| along every "
        "input-output path, so R grows like the product of the layers' weight norms and "
        f"overflows {dtype} on deep networks (or params / apply_fn hold inf or nan). The masks "
        f"would then depend only on the leaves' order. Fix: {fix}."
    )
