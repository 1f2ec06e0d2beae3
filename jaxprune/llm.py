"""One-shot LLM pruning, layer by layer: magnitude, Wanda and SparseGPT.

:func:`prune_decoder` walks a decoder block by block. For each linear layer it
streams the calibration batches through the (already pruned) blocks before
it, accumulates the layer's input Hessian ``H = X^T X / tokens`` and prunes the
kernel from it, then feeds the pruned block's outputs to the next block. Only
one ``[in, in]`` Hessian is alive at a time, plus the calibration activations
of one block boundary.

The decoder is a flax nnx Module that follows a small protocol (see
:func:`prune_decoder`; :class:`jaxprune.models_llm.GPT` and
:class:`jaxprune.models_llm.Block` are the example). linen models and stacked
blocks (``nnx.vmap``/``nnx.scan`` over one block) are not supported. Both
:func:`prune_decoder` and :func:`perplexity` run the model in eval mode
(``model.eval()``: no dropout, BatchNorm running averages) and leave its mode
as it was.

The solvers of one layer (:func:`magnitude_prune`, :func:`wanda_prune`,
:func:`sparsegpt`, :func:`reconstruction_error`) live in
:mod:`jaxprune.llm_solvers` and are re-exported here.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import warnings
from collections.abc import Iterator
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


_PROTOCOL = (
    "prune_decoder needs a flax nnx.Module decoder with embed_tokens(tokens) -> the first "
    "block's input, and a sequence `blocks` (e.g. nnx.List) of nnx.Modules, each with "
    "LINEARS (a tuple of the names of its nnx.Linear layers; dotted names such as 'mlp.fc' "
    "reach into sub-modules) and __call__(x, tap=name) returning the input of layer name. "
    "linen models and stacked (nnx.vmap/nnx.scan) blocks are not supported. Fix: follow "
    "jaxprune.models_llm.GPT and jaxprune.models_llm.Block."
)


def _not_a_decoder(what: str) -> ValueError:
    return ValueError(f"model does not follow the decoder protocol: {what}. {_PROTOCOL}")


def _not_nnx(model: Any) -> str | None:
    """Returns why ``model`` is not an nnx Module, or None if it is one."""
    if isinstance(model, nnx.Module):
        return None
    kind = type(model).__name__
    linen = sys.modules.get("flax.linen")  # not imported: model cannot be a linen Module
    if linen is not None and isinstance(model, linen.Module):
        return f"it is a linen Module ({kind})"
    if isinstance(model, dict) or hasattr(model, "unfreeze"):
        return f"it is a {kind} (linen variables?), not an nnx.Module"
    return f"it is a {kind}, not an nnx.Module"


def _layer(block: Any, name: str) -> Any:
    """Returns the sub-module ``name`` of ``block``; a dotted name walks into sub-modules."""
    return functools.reduce(getattr, name.split("."), block)


def _takes_tap(fn: Any) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # no signature to read: let the call decide
        return True
    return any(p.name == "tap" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _check_decoder(model: Any) -> list[tuple[Any, tuple[str, ...]]]:
    """Returns ``[(block, LINEARS)]`` of ``model``, checked against the decoder protocol."""
    why = _not_nnx(model)
    if why is not None:
        raise _not_a_decoder(why)
    cls = type(model).__name__
    if not callable(getattr(model, "embed_tokens", None)):
        raise _not_a_decoder(f"{cls} has no method embed_tokens(tokens)")
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise _not_a_decoder(f"{cls} has no attribute blocks")
    try:
        blocks = list(blocks)
    except TypeError:
        stacked = " (stacked blocks, e.g. from nnx.vmap?)" if isinstance(blocks, nnx.Module) else ""
        raise _not_a_decoder(
            f"{cls}.blocks is one {type(blocks).__name__}, not a sequence of blocks{stacked}"
        ) from None
    if not blocks:
        raise _not_a_decoder(f"{cls}.blocks is empty, so there is nothing to prune")
    out = []
    for b, block in enumerate(blocks):
        where = f"blocks[{b}] ({type(block).__name__})"
        if not isinstance(block, nnx.Module):
            raise _not_a_decoder(f"{where} is not an nnx.Module")
        names = getattr(block, "LINEARS", None)
        if names is None:
            raise _not_a_decoder(f"{where} has no LINEARS")
        if (
            not isinstance(names, tuple | list)
            or not names
            or not all(isinstance(n, str) for n in names)
        ):
            raise _not_a_decoder(
                f"{where}.LINEARS must be a non-empty tuple of names, got {names!r}"
                + (f" (write ({names!r},))" if isinstance(names, str) else "")
            )
        names = tuple(names)
        for name in names:
            try:
                layer = _layer(block, name)
            except AttributeError:
                raise _not_a_decoder(
                    f"{where} lists {name!r} in LINEARS but has no such attribute"
                ) from None
            kernel = getattr(layer, "kernel", None)
            if not isinstance(kernel, nnx.Variable):
                raise _not_a_decoder(
                    f"{where}.{name} is a {type(layer).__name__}, not an nnx.Linear (no "
                    "kernel Variable)"
                )
            shape = jnp.shape(kernel.get_value())
            if len(shape) != 2:
                if isinstance(layer, nnx.LinearGeneral) or not isinstance(layer, nnx.Linear):
                    why = (
                        f" ({type(layer).__name__}: a kernel with several input or output "
                        "axes, as in nnx.MultiHeadAttention's [in, heads, head_dim] and "
                        "[heads, head_dim, out]; prune_decoder solves [in, out] layers only. "
                        "Build attention from nnx.Linear q/k/v/out projections, as "
                        "jaxprune.models_llm.Block does, or leave it out of LINEARS)"
                    )
                elif len(shape) == 3:
                    why = " (stacked blocks, e.g. from nnx.vmap?)"
                else:
                    why = ""
                raise _not_a_decoder(
                    f"the kernel of {where}.{name} has shape {shape}, not [in, out]{why}"
                )
        if not _takes_tap(block.__call__):
            raise _not_a_decoder(f"{where}.__call__ takes no tap= argument")
        out.append((block, names))
    return out


@contextlib.contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """Runs the body with ``model.eval()``, then restores each module's mode attributes."""
    # eval() sets these two attributes wherever a module has them (Dropout, BatchNorm,
    # attention and users' own modules); saving them restores exactly the modes before.
    saved = [
        (module, attr, getattr(module, attr))
        for _, module in nnx.iter_modules(model)
        for attr in ("deterministic", "use_running_average")
        if hasattr(module, attr)
    ]
    model.eval()
    try:
        yield
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _tap_hessian(graphdef, state, h, tap):
    x = nnx.merge(graphdef, state)(h, tap=tap)
    if not isinstance(x, jax.Array) or x.ndim < 2:
        got = f"shape {x.shape}" if isinstance(x, jax.Array) else f"a {type(x).__name__}"
        raise _not_a_decoder(
            f"block(x, tap={tap!r}) returned {got}, not the layer's input [batch, time, features]"
        )
    x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    # Full float32: GPUs default to TF32 (about 3 digits), and the OBS solve inverts
    # this matrix (the SparseGPT authors' code turns TF32 off for the same reason).
    return jnp.matmul(x.T, x, precision=jax.lax.Precision.HIGHEST), x.shape[0]


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

    The blocks run in eval mode (``model.eval()``: no dropout, BatchNorm
    running averages), as the papers' drivers do; the returned copy keeps the
    mode ``model`` was in.

    Args:
      model: a flax nnx decoder with ``embed_tokens(tokens)`` (the first
        block's input) and a sequence ``blocks`` (e.g. ``nnx.List``) whose
        members have ``LINEARS`` (names of ``nnx.Linear`` attributes; a dotted
        name such as ``"mlp.fc"`` reaches into a sub-module) and accept
        ``tap=name`` to return that layer's input, e.g.
        :class:`jaxprune.models_llm.GPT` and :class:`jaxprune.models_llm.Block`.
        linen models and stacked blocks (``nnx.vmap``/``nnx.scan`` over one
        block) are not supported. Not modified.
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
        (magnitude: layer, Wanda: output). SparseGPT ranks within each block
        and refuses a ``group``.

    Raises:
      ValueError: ``model`` not following the protocol above (not an nnx
        Module, no ``embed_tokens``, ``blocks`` not a sequence, ``LINEARS``
        naming no 2-D ``kernel``, no ``tap=``, or a tap whose width is not the
        layer's input size); unknown ``method`` or ``group``, or a ``group``
        with ``method="sparsegpt"``; invalid ``sparsity``, ``nm``
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

    Examples:
      Wanda on a one-block GPT (marked skip: compiling each layer's solver takes
      about 7 s of CPU; the output shown is what it prints):

      >>> from flax import nnx
      >>> from jaxprune.llm import prune_decoder
      >>> from jaxprune.models_llm import GPT, markov_corpus
      >>> model = GPT(vocab=16, dim=32, depth=1, heads=2, max_len=8, rngs=nnx.Rngs(0))
      >>> (calibration,) = markov_corpus(vocab=16, time=8, sizes=(4,))
      >>> pruned, errors = prune_decoder(  # doctest: +SKIP
      ...     model, calibration, method="wanda", sparsity=0.5
      ... )
      >>> sorted(errors)  # doctest: +SKIP
      ['blocks/0/fc/kernel', 'blocks/0/out/kernel', 'blocks/0/proj/kernel', 'blocks/0/qkv/kernel']
      >>> float((pruned.blocks[0].fc.kernel.get_value() == 0).mean())  # doctest: +SKIP
      0.5
      >>> float((model.blocks[0].fc.kernel.get_value() == 0).mean())  # model is not modified
      0.0
    """
    if method not in METHODS:
        raise ValueError(
            f"method must be one of {METHODS}, got {method!r}. Fix: method='sparsegpt'."
        )
    linears = [names for _, names in _check_decoder(model)]
    sparsity, nm = _resolve(sparsity, nm, stacklevel=4)
    if nm is not None:
        for b, (block, names) in enumerate(zip(model.blocks, linears, strict=True)):
            for name in names:
                shape = jnp.shape(_layer(block, name).kernel.get_value())
                path = "/".join(("blocks", str(b), *name.split(".")))
                _check_nm_divides(nm, shape, f"layer {path!r}")
    if group is not None:
        _check_group(group)
        if method == "sparsegpt":
            raise ValueError(
                f"group={group!r} does not apply to method='sparsegpt', which ranks the "
                "weights of each block of columns by its own reconstruction error. Fix: leave "
                "group=None, or use method='magnitude' or 'wanda' to choose the group."
            )
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
    with _eval_mode(model):
        hs = [
            model.embed_tokens(calibration[i : i + batch_size])
            for i in range(0, calibration.shape[0], batch_size)
        ]
        errors = {}
        for b, (block, names) in enumerate(zip(model.blocks, linears, strict=True)):
            for name in names:
                path = "/".join(("blocks", str(b), *name.split(".")))
                graphdef, state = nnx.split(block)
                hess, tokens = 0.0, 0
                for h in hs:
                    part, n = _tap_hessian(graphdef, state, h, name)
                    hess, tokens = hess + part, tokens + n
                    del part  # one [in, in] matrix alive while the layer is solved
                hess = hess / tokens
                layer = _layer(block, name)
                kernel = layer.kernel.get_value()
                if hess.shape[0] != kernel.shape[0]:
                    raise _not_a_decoder(
                        f"the tap of layer {path!r} gives {hess.shape[0]} features, but its kernel "
                        f"{tuple(kernel.shape)} expects {kernel.shape[0]} inputs; "
                        f"block(x, tap={name!r}) must return that layer's input"
                    )
                if not bool(jnp.all(jnp.isfinite(hess))):
                    raise ValueError(
                        f"the inputs of layer {path!r} are not finite (NaN or inf in "
                        "its calibration Hessian). Fix: check the model's weights and the "
                        "calibration tokens (in range for the embedding)."
                    )
                if not bool(jnp.all(jnp.isfinite(kernel))):
                    raise ValueError(
                        f"the kernel of layer {path!r} holds NaN or inf before pruning, which "
                        "no pruning method can repair. Fix: check the model's weights (a "
                        "diverged training run or a damaged checkpoint)."
                    )
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
                        f"{method} made the kernel of layer {path!r} non-finite (the damped "
                        "Hessian is too ill-conditioned for its Cholesky factor). Fix: raise "
                        f"dampening (now {dampening}), e.g. to 0.1, or use more calibration "
                        "tokens."
                    )
                errors[f"{path}/kernel"] = float(reconstruction_error(kernel, new, hess))
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

    ``model`` is a flax nnx Module whose ``__call__(tokens)`` returns
    next-token logits ``[batch, time, vocab]`` (linen models are not
    supported). It runs in eval mode (``model.eval()``: no dropout, BatchNorm
    running averages), and its mode is restored afterwards. The cross-entropy
    is computed in float32 whatever the logits' dtype (see
    :func:`jaxprune.models_llm.lm_loss`).

    Args:
      model: a flax nnx language model, as above. Not modified (its mode is restored).
      tokens: int token ids ``[n, time]``, ``n >= 1`` and ``time >= 2`` (and at most the
        model's ``max_len`` when it has one), ids within the model's vocabulary.
      batch_size: sequences per forward pass, a positive int (default 32); the last
        batch holds the remainder. The result does not depend on it (up to rounding).

    Raises:
      ValueError: ``model`` not an nnx Module or not returning logits
        ``[batch, time, vocab]``; ``batch_size`` not a positive int; ``tokens``
        not int ``[n, time]`` with ``n >= 1`` and ``time >= 2``, longer than
        the model's ``max_len`` or holding ids outside its vocabulary.

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
    why = _not_nnx(model)
    if why is not None:
        raise ValueError(
            f"perplexity needs a flax nnx.Module whose __call__(tokens) returns next-token "
            f"logits [batch, time, vocab], but model is not one: {why}. linen models are not "
            "supported. Fix: pass an nnx model such as jaxprune.models_llm.GPT, or compute "
            "exp(mean cross-entropy) of your apply function's logits yourself."
        )
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
    # The graphdef keeps the eval-mode attributes, so the model's own mode is back
    # before anything runs.
    with _eval_mode(model):
        graphdef, state = nnx.split(model)
    total, count = 0.0, 0
    for i in range(0, tokens.shape[0], batch_size):
        batch = tokens[i : i + batch_size]
        total += float(_nll(graphdef, state, batch)) * batch.shape[0]
        count += batch.shape[0]
    return float(jnp.exp(total / count))
