"""One-shot LLM pruning, layer by layer: magnitude, Wanda and SparseGPT.

:func:`prune_decoder` walks a decoder block by block. For each linear layer it
streams the calibration batches through the (already pruned) blocks before
it, accumulates the layer's input Hessian ``H = X^T X / tokens`` and prunes the
kernel from it, then feeds the pruned block's outputs to the next block. Only
one ``[in, in]`` Hessian is alive at a time, plus the calibration activations
of one block boundary.

The solvers of one layer (:func:`magnitude_prune`, :func:`wanda_prune`,
:func:`sparsegpt`, :func:`reconstruction_error`) live in
:mod:`jaxprune.llm_solvers` and are re-exported here.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxprune._tree import as_int
from jaxprune.llm_solvers import (
    _NOTHING_PRUNED,
    GROUPS,
    _block_size,
    _check_dampening,
    _check_group,
    _check_nm_divides,
    _resolve,
    magnitude_prune,
    reconstruction_error,
    sparsegpt,
    wanda_prune,
)

__all__ = [
    "METHODS",
    "GROUPS",
    "magnitude_prune",
    "wanda_prune",
    "sparsegpt",
    "reconstruction_error",
    "prune_decoder",
    "perplexity",
]

METHODS = ("magnitude", "wanda", "sparsegpt")
# Each paper's comparison group: magnitude pruning ranks a whole layer, Wanda
# ranks the weights feeding each output unit.
_DEFAULT_GROUP = {"magnitude": "layer", "wanda": "output"}


def _vocab_and_max_len(model: Any) -> tuple[int | None, int | None]:
    """Returns the model's vocabulary size and longest sequence, where it says them."""
    vocab = as_int(getattr(model, "vocab", None))
    if vocab is None:
        vocab = as_int(getattr(getattr(model, "embed", None), "num_embeddings", None))
    max_len = as_int(getattr(model, "max_len", None))
    return vocab, max_len


def _check_tokens(model: Any, tokens: Any, name: str) -> jax.Array:
    """Returns ``tokens`` as an array, checked to be int ``[samples, time]`` the model reads."""
    if not isinstance(tokens, jax.Array):
        tokens = jnp.asarray(tokens)
    shape = jnp.shape(tokens)
    if len(shape) != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(
            f"{name} must be int tokens [samples, time], got shape {shape} and dtype "
            f"{tokens.dtype}. Fix: batch the sequences, e.g. {name}[None] for one sequence, "
            "and pass integer token ids."
        )
    if shape[0] < 1 or shape[1] < 1:
        raise ValueError(
            f"{name} must hold at least one sample of at least one token, got shape {shape}. "
            "Fix: pass a non-empty [samples, time] token array."
        )
    vocab, max_len = _vocab_and_max_len(model)
    if max_len is not None and shape[1] > max_len:
        raise ValueError(
            f"{name} has {shape[1]} tokens per sample, more than the model's max_len={max_len} "
            f"(its position embeddings). Fix: cut the sequences, e.g. {name}[:, :{max_len}]."
        )
    if vocab is not None and not isinstance(tokens, jax.core.Tracer):
        lo, hi = int(jnp.min(tokens)), int(jnp.max(tokens))
        if lo < 0 or hi >= vocab:
            raise ValueError(
                f"{name} holds token ids in [{lo}, {hi}], outside the model's vocabulary "
                f"[0, {vocab - 1}] (the embedding would return NaN for them). Fix: tokenize "
                "with the model's own vocabulary."
            )
    return tokens


@functools.partial(jax.jit, static_argnums=(0, 3))
def _tap_hessian(graphdef, state, h, tap):
    x = nnx.merge(graphdef, state)(h, tap=tap)
    x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    return x.T @ x, x.shape[0]


@functools.partial(jax.jit, static_argnums=(0,))
def _forward(graphdef, state, h):
    return nnx.merge(graphdef, state)(h)


def prune_decoder(
    model: Any,
    calibration: jax.Array,
    *,
    method: str = "sparsegpt",
    sparsity: float | None = None,
    nm: tuple[int, int] | None = None,
    batch_size: int = 8,
    blocksize: int = 128,
    dampening: float = 0.01,
    group: str | None = None,
) -> tuple[Any, dict[str, float]]:
    """Returns ``(pruned copy of model, {layer path: relative reconstruction error})``.

    Prunes every linear layer of every block (embeddings and the output head
    stay dense, as in the papers), block after block: each layer's Hessian
    comes from the calibration tokens passed through the already pruned
    blocks. The error of a layer is ``||X (W - W')||^2 / ||X W||^2`` on those
    inputs.

    Args:
      model: a decoder with ``embed_tokens(tokens)``, a sequence ``blocks`` whose
        members have ``LINEARS`` (names of ``nnx.Linear`` attributes) and accept
        ``tap=name`` to return that layer's input (e.g.
        :class:`jaxprune.models_llm.GPT`). Not modified.
      calibration: int tokens ``[samples, time]``.
      method: ``"magnitude"``, ``"wanda"`` or ``"sparsegpt"``.
      sparsity: fraction of each layer to prune (unstructured), in ``[0, 1]``;
        default 0.5. With ``nm``, leave it out (or give ``1 - n/m``).
      nm: ``(n, m)``, ints ``0 < n <= m``: keep ``n`` of every ``m`` consecutive
        inputs instead.
      batch_size: calibration samples per forward pass (a positive int).
      blocksize, dampening: SparseGPT's (see :func:`sparsegpt`); validated for
        every method.
      group: comparison group of magnitude and Wanda, ``"layer"`` or
        ``"output"`` (see :func:`magnitude_prune`); ``None`` takes each paper's
        (magnitude: layer, Wanda: output). SparseGPT ranks within each block.

    Raises:
      ValueError: unknown ``method`` or ``group``; invalid ``sparsity``, ``nm``
        (``m`` must divide every layer's input size), ``batch_size``,
        ``blocksize`` or ``dampening``; ``calibration`` not non-empty int
        ``[samples, time]``, longer than the model's ``max_len`` or (when
        concrete) holding ids outside its vocabulary; a layer's inputs or
        pruned kernel not finite.

    Warns:
      UserWarning: ``nm=(m, m)``, which prunes nothing.

    References:
      Frantar & Alistarh 2023, https://arxiv.org/abs/2301.00774; Sun et al. 2023,
      https://arxiv.org/abs/2306.11695
    """
    if method not in METHODS:
        raise ValueError(
            f"method must be one of {METHODS}, got {method!r}. Fix: method='sparsegpt'."
        )
    sparsity = _resolve(sparsity, nm, stacklevel=4)
    if nm is not None:
        for b, block in enumerate(model.blocks):
            for name in block.LINEARS:
                shape = jnp.shape(getattr(block, name).kernel.get_value())
                _check_nm_divides(nm, shape, f"layer 'blocks/{b}/{name}'")
    if group is not None:
        _check_group(group)
    if as_int(batch_size) is None or batch_size < 1:
        raise ValueError(
            f"batch_size must be a positive int (calibration samples per forward pass), got "
            f"{batch_size!r}. Fix: e.g. batch_size=8."
        )
    _block_size(1, blocksize, None)  # validates blocksize
    _check_dampening(dampening)
    calibration = _check_tokens(model, calibration, "calibration")
    grp = group or _DEFAULT_GROUP.get(method, "layer")
    model = nnx.clone(model)
    hs = [
        model.embed_tokens(calibration[i : i + batch_size])
        for i in range(0, calibration.shape[0], batch_size)
    ]
    errors = {}
    for b, block in enumerate(model.blocks):
        for name in block.LINEARS:
            graphdef, state = nnx.split(block)
            hess, tokens = 0.0, 0
            for h in hs:
                part, n = _tap_hessian(graphdef, state, h, name)
                hess, tokens = hess + part, tokens + n
            hess = hess / tokens
            if not bool(jnp.all(jnp.isfinite(hess))):
                raise ValueError(
                    f"the inputs of layer 'blocks/{b}/{name}' are not finite (NaN or inf in "
                    "its calibration Hessian). Fix: check the model's weights and the "
                    "calibration tokens (in range for the embedding)."
                )
            layer = getattr(block, name)
            kernel = layer.kernel.get_value()
            with warnings.catch_warnings():  # nm=(m, m) was warned about once, above
                warnings.filterwarnings("ignore", f"nm=.*{_NOTHING_PRUNED}", UserWarning)
                if method == "magnitude":
                    new = magnitude_prune(kernel, sparsity=sparsity, nm=nm, group=grp)
                elif method == "wanda":
                    norms = jnp.sqrt(jnp.diag(hess))
                    new = wanda_prune(kernel, norms, sparsity=sparsity, nm=nm, group=grp)
                else:
                    new = sparsegpt(
                        kernel,
                        hess,
                        sparsity=sparsity,
                        nm=nm,
                        blocksize=blocksize,
                        dampening=dampening,
                    )
            if not bool(jnp.all(jnp.isfinite(new))):
                raise ValueError(
                    f"{method} made the kernel of layer 'blocks/{b}/{name}' non-finite (the "
                    "damped Hessian is too ill-conditioned for its Cholesky factor). Fix: raise "
                    f"dampening (now {dampening}), e.g. to 0.1, or use more calibration tokens."
                )
            errors[f"blocks/{b}/{name}/kernel"] = float(reconstruction_error(kernel, new, hess))
            layer.kernel.set_value(new)
            del hess
        graphdef, state = nnx.split(block)
        hs = [_forward(graphdef, state, h) for h in hs]
    return model, errors


@functools.partial(jax.jit, static_argnums=(0,))
def _nll(graphdef, state, tokens):
    from jaxprune.models_llm import lm_loss

    return lm_loss(nnx.merge(graphdef, state), tokens)


def perplexity(model: Any, tokens: jax.Array, *, batch_size: int = 32) -> float:
    """Returns ``exp(mean next-token cross-entropy)`` of ``model`` on ``tokens`` ``[n, time]``.

    Raises:
      ValueError: ``batch_size`` not a positive int; ``tokens`` not int
        ``[n, time]`` with ``n >= 1`` and ``time >= 2``, longer than the
        model's ``max_len`` or holding ids outside its vocabulary.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jaxprune.llm import perplexity
      >>> from jaxprune.models_llm import GPT
      >>> model = GPT(vocab=16, dim=32, depth=1, heads=2, max_len=8, rngs=nnx.Rngs(0))
      >>> model.head.kernel.set_value(jnp.zeros((32, 16)))  # uniform next-token guesses
      >>> round(perplexity(model, jnp.zeros((2, 8), jnp.int32)), 3)  # = the vocabulary size
      16.0
    """
    if as_int(batch_size) is None or batch_size < 1:
        raise ValueError(
            f"batch_size must be a positive int, got {batch_size!r}. Fix: e.g. batch_size=32."
        )
    tokens = _check_tokens(model, tokens, "tokens")
    if tokens.shape[1] < 2:
        raise ValueError(
            f"tokens must have at least 2 tokens per sample (one to read, one to predict), "
            f"got shape {tokens.shape}. Fix: pass longer sequences."
        )
    graphdef, state = nnx.split(model)
    total, count = 0.0, 0
    for i in range(0, tokens.shape[0], batch_size):
        batch = tokens[i : i + batch_size]
        total += float(_nll(graphdef, state, batch)) * batch.shape[0]
        count += batch.shape[0]
    return float(jnp.exp(total / count))
