"""The layer-level solvers of one-shot LLM pruning: magnitude, Wanda and SparseGPT.

Each prunes one ``[in, out]`` kernel on its own (given, for Wanda and
SparseGPT, its input norms or input Hessian ``H = X^T X``), with the argument
checks they share; :func:`jaxprune.llm.prune_decoder` runs them layer by layer
over a decoder. Re-exported from :mod:`jaxprune.llm` (write
``jp.llm.sparsegpt``).

Kernels are flax's ``[in, out]`` (``y = x @ W``): the papers' "row" (an output
unit) is a column here, and N:M groups run along the input axis.

References:
  Han et al. 2015, https://arxiv.org/abs/1506.02626; Sun et al. 2023 (Wanda),
  https://arxiv.org/abs/2306.11695; Frantar & Alistarh 2023 (SparseGPT),
  https://arxiv.org/abs/2301.00774
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import _counts
from jaxprune import criteria as _criteria
from jaxprune import masks as _masks
from jaxprune._tree import as_int

__all__ = [
    "GROUPS",
    "magnitude_prune",
    "wanda_prune",
    "sparsegpt",
    "reconstruction_error",
]

GROUPS = ("layer", "output")


def _everything(path: Any, x: Any) -> bool:
    del path, x
    return True


def _check_sparsity(sparsity: Any) -> None:
    if isinstance(sparsity, (str, bytes, bool, np.bool_)) or isinstance(sparsity, jax.core.Tracer):
        v = None
    else:
        try:
            v = float(sparsity)
        except (TypeError, ValueError):
            v = None
    if v is None:
        raise ValueError(
            f"sparsity must be in [0, 1] (a concrete number, the fraction to prune), got "
            f"{sparsity!r}. Fix: e.g. sparsity=0.5."
        )
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}. Fix: e.g. sparsity=0.5.")


_NOTHING_PRUNED = "nothing is pruned"


def _check_nm(nm: Any, stacklevel: int = 3) -> None:
    """Checks that ``nm`` is ``(n, m)`` with ints ``0 < n <= m``; warns when ``n == m``."""
    try:
        n, m = nm
    except (TypeError, ValueError):
        n = m = None
    if as_int(n) is None or as_int(m) is None or not 0 < n <= m:
        raise ValueError(
            f"nm must be a pair of ints (n, m) with 0 < n <= m (keep n of every m consecutive "
            f"inputs), got nm={nm!r}. Fix: e.g. nm=(2, 4) for 2:4 sparsity."
        )
    if n == m:
        # As jp.masks.nm, n == m is allowed (it keeps every group whole), but here
        # nm is the whole pruning request, so say that it prunes nothing.
        warnings.warn(
            f"nm={tuple(nm)!r} keeps n={n} of every m={m} inputs: {_NOTHING_PRUNED}. "
            "Fix: use n < m, e.g. nm=(2, 4).",
            UserWarning,
            stacklevel=stacklevel,
        )


def _check_nm_divides(nm: tuple[int, int], kernel_shape: tuple[int, ...], what: str) -> None:
    m = nm[1]
    if kernel_shape[0] % m:
        raise ValueError(
            f"nm must be (n, m) with the group size m dividing the input size "
            f"{kernel_shape[0]} of {what} (shape {tuple(kernel_shape)}), got nm={tuple(nm)!r} "
            f"(m={m}). Fix: choose an m dividing {kernel_shape[0]}, e.g. nm=(2, 4) when it is "
            "a multiple of 4."
        )


def _check_kernel(kernel: Any, name: str = "kernel") -> None:
    if not hasattr(kernel, "shape") or not hasattr(kernel, "dtype"):
        raise ValueError(
            f"{name} must be an array, got {type(kernel).__name__}. Fix: pass a jax or numpy "
            f"array, e.g. jnp.asarray({name})."
        )
    if jnp.ndim(kernel) != 2:
        raise ValueError(
            f"{name} must be a 2-D [in, out] kernel, got shape {jnp.shape(kernel)}. Fix: pass "
            "a Linear/Dense layer's kernel (reshape others to [in, out] first)."
        )


def _resolve(sparsity: Any, nm: Any, stacklevel: int) -> tuple[float, tuple[int, int] | None]:
    """Returns ``(sparsity, nm)`` to use: ``sparsity`` (default 0.5) or ``nm``'s ``1 - n/m``.

    A ``sparsity`` given together with ``nm`` must agree with it, so a request
    such as ``sparsity=0.7, nm=(2, 4)`` is refused instead of silently pruning 50%.
    ``nm`` comes back as Python ints (a JAX int would become a traced shape).
    """
    if sparsity is not None:
        _check_sparsity(sparsity)
    if nm is None:
        return (0.5 if sparsity is None else sparsity), None
    _check_nm(nm, stacklevel=stacklevel)
    nm = (int(nm[0]), int(nm[1]))
    implied = 1.0 - nm[0] / nm[1]
    if sparsity is not None and abs(float(sparsity) - implied) > 1e-9:
        raise ValueError(
            f"sparsity={sparsity} conflicts with nm={tuple(nm)!r}, which prunes "
            f"{nm[1] - nm[0]} of every {nm[1]} inputs (sparsity {implied:g}). Fix: pass nm "
            "alone for N:M sparsity, or sparsity alone for unstructured sparsity."
        )
    return implied, nm


def _check(
    sparsity: Any, nm: Any, kernel_shape: tuple[int, ...]
) -> tuple[float, tuple[int, int] | None]:
    """Validates ``sparsity`` and ``nm``; returns them as :func:`_resolve` does."""
    # stacklevel: the caller of magnitude_prune/wanda_prune/sparsegpt
    s, nm = _resolve(sparsity, nm, stacklevel=5)
    if nm is not None:
        _check_nm_divides(nm, kernel_shape, "the kernel")
    return s, nm


def _check_dampening(dampening: Any) -> None:
    try:
        v = None if isinstance(dampening, (str, bytes, bool)) else float(dampening)
    except (TypeError, ValueError):
        v = None
    if v is None or not math.isfinite(v) or v <= 0.0:
        raise ValueError(
            f"dampening must be a finite number > 0 (lambda as a fraction of the mean diagonal "
            f"of H), got {dampening!r}. Fix: use the paper's 0.01."
        )


def _check_group(group: str) -> None:
    if group not in GROUPS:
        raise ValueError(
            f"group must be one of {GROUPS}, got {group!r}. Fix: group='layer' ranks the whole "
            "layer, group='output' the weights of each output unit."
        )


def _keep(scores: jax.Array, sparsity: float, nm: tuple[int, int] | None, group: str):
    if nm is not None:
        return _nm_keep(scores, nm)
    if group == "output":
        return _per_output_keep(scores, sparsity)
    return _masks._topk({"k": scores}, sparsity, _everything)[0]["k"]


def _per_output_keep(scores: jax.Array, sparsity: float) -> jax.Array:
    """Returns a keep-mask pruning exactly ``round(s * in)`` entries of each output column."""
    one = lambda col: _masks._topk({"c": col}, sparsity, _everything)[0]["c"]  # noqa: E731
    return jax.vmap(one, in_axes=1, out_axes=1)(scores)


def _nm_keep(scores: jax.Array, nm: tuple[int, int]) -> jax.Array:
    n, m = nm
    return _masks.nm({"k": scores}, n=n, m=m, axis=0, where=_everything)["k"]


def magnitude_prune(
    kernel: jax.Array,
    *,
    sparsity: float | None = None,
    nm: tuple[int, int] | None = None,
    group: str = "layer",
) -> jax.Array:
    """Returns ``kernel`` ``[in, out]`` with its smallest ``|w|`` zeroed (per layer, or N:M).

    ``group="layer"`` (the default, as in the paper) prunes exactly
    ``round(sparsity * size)`` of the whole kernel; ``group="output"`` prunes
    ``round(sparsity * in)`` of the weights of each output unit, Wanda's
    comparison group (so the two criteria can be compared on equal terms).
    ``nm=(n, m)`` keeps ``n`` of every ``m`` inputs instead. ``sparsity``
    defaults to 0.5; given with ``nm``, it must equal ``1 - n/m``.

    Args:
      kernel: a 2-D ``[in, out]`` kernel.
      sparsity: the fraction to prune, a concrete number in ``[0, 1]`` (default None:
        0.5, or ``1 - n/m`` with ``nm``).
      nm: ``(n, m)``, ints with ``0 < n <= m`` and ``m`` dividing ``in``, to keep ``n``
        of every ``m`` consecutive inputs of each output instead (default None:
        unstructured); ``n == m`` prunes nothing and warns.
      group: ``"layer"`` (the default) or ``"output"``, the set ranked together;
        ignored with ``nm``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxprune.llm import magnitude_prune
      >>> w = jnp.array([[1., -8.], [2., 5.], [-3., 6.], [4., 7.]])
      >>> magnitude_prune(w, sparsity=0.5).tolist()
      [[0.0, -8.0], [0.0, 5.0], [0.0, 6.0], [0.0, 7.0]]
      >>> magnitude_prune(w, nm=(2, 4)).tolist()  # 2 of every 4 inputs of each output
      [[0.0, -8.0], [0.0, 0.0], [-3.0, 0.0], [4.0, 7.0]]

    References:
      Han et al., "Learning both Weights and Connections", 2015.
      https://arxiv.org/abs/1506.02626
    """
    _check_kernel(kernel)
    sparsity, nm = _check(sparsity, nm, jnp.shape(kernel))
    _check_group(group)
    keep = _keep(jnp.abs(kernel).astype(jnp.float32), sparsity, nm, group)
    return jnp.where(keep, kernel, jnp.zeros((), kernel.dtype))


def wanda_prune(
    kernel: jax.Array,
    input_norms: jax.Array,
    *,
    sparsity: float | None = None,
    nm: tuple[int, int] | None = None,
    group: str = "output",
) -> jax.Array:
    """Returns ``kernel`` pruned by Wanda: lowest ``|W_ij| * ||X_i||`` within each output unit.

    No weight update. ``input_norms`` ``[in]`` are the L2 norms of the layer's
    input features over the calibration tokens (``sqrt(diag(X^T X))``).
    ``group="output"`` (the default, the paper's choice for LLMs) prunes
    exactly ``round(sparsity * in)`` weights of each output unit;
    ``group="layer"`` ranks the whole kernel, as magnitude pruning does by
    default. ``nm=(n, m)`` keeps ``n`` of every ``m`` inputs instead.
    ``sparsity`` defaults to 0.5; given with ``nm``, it must equal ``1 - n/m``.

    Args:
      kernel: a 2-D ``[in, out]`` kernel.
      input_norms: ``[in]``, the L2 norm of each input feature over the calibration
        tokens, finite and ``>= 0`` (e.g. from :func:`jaxprune.activations.input_norms`;
        ``jnp.ones(in)`` gives magnitude pruning).
      sparsity: the fraction to prune, a concrete number in ``[0, 1]`` (default None:
        0.5, or ``1 - n/m`` with ``nm``).
      nm: ``(n, m)``, ints with ``0 < n <= m`` and ``m`` dividing ``in``, to keep ``n``
        of every ``m`` consecutive inputs of each output instead (default None:
        unstructured); ``n == m`` prunes nothing and warns.
      group: ``"output"`` (the default) or ``"layer"``, the set ranked together;
        ignored with ``nm``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxprune.llm import wanda_prune
      >>> w = jnp.array([[1., 4.], [2., 1.], [3., 2.], [4., 3.]])
      >>> wanda_prune(w, jnp.array([4., 1., 1., 1.]), sparsity=0.5).tolist()
      [[1.0, 4.0], [0.0, 0.0], [0.0, 0.0], [4.0, 3.0]]

    References:
      Sun et al., "A Simple and Effective Pruning Approach for Large Language
      Models", 2023. https://arxiv.org/abs/2306.11695
    """
    _check_kernel(kernel)
    sparsity, nm = _check(sparsity, nm, jnp.shape(kernel))
    _check_group(group)
    if input_norms is None or isinstance(input_norms, (str, bytes, dict)):
        raise ValueError(
            f"input_norms must be an array of L2 norms, one per input feature, got "
            f"{input_norms!r}. Fix: pass jp.activations.input_norms(...)'s entry for this "
            "kernel, or jnp.ones(kernel.shape[0]) for plain magnitude pruning."
        )
    if not isinstance(input_norms, jax.core.Tracer):
        norms = jnp.asarray(input_norms)
        if bool(jnp.any(~jnp.isfinite(norms))) or bool(jnp.any(norms < 0)):
            raise ValueError(
                "input_norms must be finite L2 norms (>= 0), got a negative, NaN or infinite "
                "entry. Fix: pass sqrt(sum of squares) of the layer's inputs per input "
                "feature, from calibration data without NaN/inf."
            )
    scores = _criteria.wanda({"k": kernel}, {"k": input_norms})["k"]
    keep = _keep(scores, sparsity, nm, group)
    return jnp.where(keep, kernel, jnp.zeros((), kernel.dtype))


def _block_size(cols: int, blocksize: int, nm: tuple[int, int] | None) -> int:
    """Returns the columns per full block; the last block holds the ragged remainder.

    As in the reference implementation (``i2 = min(i1 + blocksize, cols)``),
    the block is not shrunk to a divisor of ``cols``: shrinking it (to 1 for a
    prime input size) would choose the adaptive mask column by column. With
    N:M the block is the largest multiple of ``m`` not above ``blocksize``
    (at least ``m``) so that no N:M group straddles two blocks; ``m`` divides
    ``cols``, so the ragged last block is a whole number of groups too.
    """
    if as_int(blocksize) is None or blocksize < 1:
        raise ValueError(
            f"blocksize must be a positive int, got {blocksize!r}. Fix: use the paper's 128."
        )
    size = min(int(blocksize), cols)
    if nm is not None:
        m = nm[1]
        size = max(m, size - size % m)
    return size


@functools.partial(jax.jit, static_argnames=("sparsity", "nm", "blocksize", "dampening"))
def _sparsegpt_rows(w, h, *, sparsity, nm, blocksize, dampening):
    """SparseGPT on ``w`` ``[rows=out, cols=in]`` with input Hessian ``h`` ``[in, in]``.

    ``cols // blocksize`` full blocks in a ``fori_loop``, then (shapes are
    static) one ragged block of ``cols % blocksize`` columns.
    """
    rows, cols = w.shape
    eye = jnp.eye(cols, dtype=jnp.float32)
    dead = jnp.diag(h) == 0
    h = h + jnp.diag(dead.astype(jnp.float32))
    w = jnp.where(dead[None, :], 0.0, w)
    h = h + dampening * jnp.mean(jnp.diag(h)) * eye
    hinv = jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(h), True), eye)
    u = jnp.linalg.cholesky(hinv).T  # upper: hinv = u^T u
    col_idx = jnp.arange(cols)

    # Block b prunes cum[b + 1] - cum[b] entries, cum[j] = round(s * rows * j-th block end):
    # the layer loses exactly round(s * rows * cols), however small each block's share.
    full, tail = divmod(cols, blocksize)
    ends = [b * blocksize for b in range(full + 1)] + ([cols] if tail else [])
    cum = jnp.stack([_counts._count(sparsity, rows * e) for e in ends])

    def block(i1, size, w, b):
        # i1 and b may be traced; size is a Python int.
        w1 = jax.lax.dynamic_slice(w, (0, i1), (rows, size))
        u1 = jax.lax.dynamic_slice(u, (i1, i1), (size, size))
        d1 = jnp.diag(u1)
        if nm is None:
            # Adaptive mask over the whole block, exact count (OBS error w^2 / U_ii^2).
            keys = _masks.ordered_keys(((w1 / d1) ** 2).reshape(-1))
            keep = _masks._select([keys], cum[b + 1] - cum[b])[0].reshape(rows, size)
            pruned = ~keep
        else:
            pruned = jnp.zeros((rows, size), bool)

        def column(i, carry):
            w1, pruned, err = carry
            if nm is not None:
                n, m = nm

                def choose(p):
                    g = jax.lax.dynamic_slice(w1, (0, i), (rows, m))
                    s = (g / jax.lax.dynamic_slice(d1, (i,), (m,))) ** 2
                    order = jnp.argsort(s, axis=1, stable=True)
                    rank = jnp.argsort(order, axis=1, stable=True)
                    return jax.lax.dynamic_update_slice(p, rank < m - n, (0, i))

                pruned = jax.lax.cond(i % m == 0, choose, lambda p: p, pruned)
            wi = w1[:, i]
            q = jnp.where(pruned[:, i], 0.0, wi)
            e = (wi - q) / u1[i, i]
            # u1 is upper triangular: only columns >= i move.
            w1 = w1 - e[:, None] * u1[i][None, :]
            return w1, pruned, err.at[:, i].set(e)

        init = (w1, pruned, jnp.zeros((rows, size), jnp.float32))
        w1, pruned, err = jax.lax.fori_loop(0, size, column, init)
        w = jax.lax.dynamic_update_slice(w, jnp.where(pruned, 0.0, w1), (0, i1))
        later = jax.lax.dynamic_slice(u, (i1, 0), (size, cols))
        return w - jnp.where(col_idx[None, :] >= i1 + size, err @ later, 0.0)

    with jax.default_matmul_precision("highest"):
        w = jax.lax.fori_loop(0, full, lambda b, w: block(b * blocksize, blocksize, w, b), w)
        if tail:
            w = block(full * blocksize, tail, w, full)
        return w


def sparsegpt(
    kernel: jax.Array,
    hessian: jax.Array,
    *,
    sparsity: float | None = None,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    dampening: float = 0.01,
) -> jax.Array:
    """Returns ``kernel`` ``[in, out]`` pruned by SparseGPT, its kept weights updated.

    Optimal Brain Surgeon row updates, processed one input column at a time
    in ``blocksize``-column blocks with ``H^-1`` from a Cholesky factor of
    ``H + lambda I``, ``lambda = dampening * mean(diag(H))``. Unstructured:
    the mask of each block prunes its share of the layer's exact
    ``round(sparsity * out * in)`` (``round(sparsity * out * end)`` less the
    same up to the block's start) entries with the lowest ``w^2 / U_ii^2``,
    ``U`` the upper Cholesky factor of ``H^-1`` (``U_ii^2`` is ``[H_F^-1]_ii``
    over the columns ``F`` not yet swept, as in the reference code); N:M
    (``nm=(n, m)``, ``n`` kept of every ``m`` inputs): chosen group by group
    as the sweep reaches it. Inputs that are zero on every calibration token
    (dead: ``H_ii == 0``, e.g. ReLU units that never fire) have their weights
    zeroed first, as in the reference code: they add to the pruned count, even
    at ``sparsity=0``, so check such layers' sparsity afterwards.

    Args:
      kernel: ``[in, out]`` weights.
      hessian: ``[in, in]``, ``X^T X`` of the layer's inputs (any positive scale).
      sparsity: fraction to prune (unstructured), default 0.5.
      nm: ``(n, m)`` for N:M sparsity instead (``sparsity``, if given, must
        then equal ``1 - n/m``).
      blocksize: columns per lazy-update block (128 in the paper); the last block
        holds the remainder when it does not divide the input size. With
        ``nm`` it is rounded down to a multiple of ``m``.
      dampening: ``lambda`` as a fraction of the mean diagonal of ``H``: a
        finite number ``> 0`` (0.01 in the paper).

    Raises:
      ValueError: ``kernel`` not 2-D, ``hessian`` not ``[in, in]``, invalid
        ``sparsity``, ``nm``, ``blocksize`` or ``dampening``, or (when
        concrete) a non-finite result: the damped Hessian was not positive
        definite.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jaxprune.llm import sparsegpt
      >>> x = jax.random.normal(jax.random.key(0), (256, 16))
      >>> w = jax.random.normal(jax.random.key(1), (16, 8))
      >>> p = sparsegpt(w, x.T @ x, sparsity=0.5)
      >>> int((p == 0).sum())
      64

    References:
      Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately
      Pruned in One-Shot", 2023. https://arxiv.org/abs/2301.00774; Hassibi &
      Stork, "Second Order Derivatives for Network Pruning: Optimal Brain
      Surgeon", NeurIPS 1992 (the row updates).
    """
    _check_kernel(kernel)
    sparsity, nm = _check(sparsity, nm, jnp.shape(kernel))
    _check_dampening(dampening)
    _check_kernel(hessian, "hessian")
    if jnp.shape(hessian) != (kernel.shape[0],) * 2:
        raise ValueError(
            f"hessian must be [in, in] = {(kernel.shape[0],) * 2} for a kernel of shape "
            f"{kernel.shape}, got {hessian.shape}. Fix: accumulate X^T X of the layer's inputs."
        )
    if not isinstance(kernel, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(kernel))):
        raise ValueError(
            "sparsegpt got a kernel holding NaN or inf, which no pruning can repair. Fix: check "
            "the model's weights (a diverged run or a damaged checkpoint)."
        )
    size = _block_size(kernel.shape[0], blocksize, nm)
    rows = _sparsegpt_rows(
        kernel.T.astype(jnp.float32),
        hessian.astype(jnp.float32),
        sparsity=float(sparsity),
        nm=nm,
        blocksize=size,
        dampening=float(dampening),
    )
    if not isinstance(rows, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(rows))):
        raise ValueError(
            "sparsegpt made the kernel non-finite: the damped Hessian is not positive definite "
            f"enough for its Cholesky factor (indefinite, non-finite, or dampening={dampening} "
            "too small for a rank-deficient X^T X). Fix: pass X^T X of finite inputs, and raise "
            "dampening (e.g. to 0.1) or use more calibration tokens."
        )
    return rows.T.astype(kernel.dtype)


def reconstruction_error(kernel: jax.Array, pruned: jax.Array, hessian: jax.Array) -> jax.Array:
    """Returns ``||X (W - W')||^2 / ||X W||^2`` computed from ``H = X^T X``.

    ``0`` when both are zero (e.g. a layer whose inputs are all zero after an
    earlier layer was pruned away), ``inf`` when only the reference is.

    Args:
      kernel: the reference ``[in, out]`` kernel ``W``.
      pruned: its pruned (and possibly updated) copy ``W'``, of the same shape.
      hessian: ``[in, in]``, ``X^T X`` of the layer's inputs (any positive scale: it
        cancels in the ratio).

    Raises:
      ValueError: ``pruned`` is not ``kernel``'s shape ``[in, out]``, or
        ``hessian`` is not ``[in, in]``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jaxprune.llm import magnitude_prune, reconstruction_error, sparsegpt
      >>> w = jnp.array([[3., 0.], [0., 4.]])
      >>> err = reconstruction_error(w, w.at[0, 0].set(0.0), jnp.eye(2))
      >>> round(float(err), 4)  # 3**2 / (3**2 + 4**2)
      0.36
      >>> x = jax.random.normal(jax.random.key(0), (256, 16)) * jnp.arange(1.0, 17.0)
      >>> w = jax.random.normal(jax.random.key(1), (16, 8))
      >>> h = x.T @ x  # inputs of unequal scales: |w| alone ranks the weights badly
      >>> bool(reconstruction_error(w, sparsegpt(w, h), h) < reconstruction_error(
      ...     w, magnitude_prune(w), h))
      True

    References:
      Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately
      Pruned in One-Shot", 2023. https://arxiv.org/abs/2301.00774
    """
    k_shape, p_shape, h_shape = jnp.shape(kernel), jnp.shape(pruned), jnp.shape(hessian)
    if len(k_shape) != 2 or p_shape != k_shape or h_shape != (k_shape[0],) * 2:
        raise ValueError(
            f"reconstruction_error needs kernel [in, out], pruned of the same shape and hessian "
            f"[in, in], got kernel {k_shape}, pruned {p_shape} and hessian {h_shape}. Fix: pass "
            "the layer's kernel, its pruned copy and X^T X of the layer's inputs."
        )
    return _reconstruction_error(kernel, pruned, hessian)


@jax.jit
def _reconstruction_error(kernel, pruned, hessian):
    # One program per shape: called eagerly per layer, op by op it compiled each op.
    # All in float32: strict dtype promotion refuses a bfloat16 hessian times float32.
    delta = (kernel - pruned).astype(jnp.float32)
    w = kernel.astype(jnp.float32)
    hessian = hessian.astype(jnp.float32)
    # Full float32 on every backend (GPUs default to TF32 for float32 matmuls).
    num = jnp.sum(delta * jnp.matmul(hessian, delta, precision=jax.lax.Precision.HIGHEST))
    den = jnp.sum(w * jnp.matmul(hessian, w, precision=jax.lax.Precision.HIGHEST))
    safe = jnp.where(den > 0, den, 1.0)
    return jnp.where(den > 0, num / safe, jnp.where(num > 0, jnp.inf, 0.0))
