"""Pattern selections: scores -> masks where every k x k conv kernel keeps a library pattern.

PatDNN-style intra-kernel patterns: :func:`pattern_library` builds the default
library of patterns, and :func:`patterns` gives each conv kernel the library
pattern with the largest summed score, optionally dropping whole kernels on
top (connectivity pruning). Like the other selections of
:mod:`jaxprune.structured`, :func:`patterns` has the shape of
:func:`jaxprune.masks.topk` and works as ``scope=`` of :func:`jaxprune.prune`.
Both are re-exported from :mod:`jaxprune.structured` and ``jp.masks``.

References:
  Niu et al., "PatDNN: Achieving Real-Time DNN Execution on Mobile Devices
  with Pattern-based Weight Pruning", 2020. https://arxiv.org/abs/2001.00138
  Ma et al., "PCONV: The Missing but Desirable Sparsity in DNN Weight
  Pruning", 2020. https://arxiv.org/abs/1909.05073
"""

from __future__ import annotations

import functools
import itertools
import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune._structured_rank import _keeps_layout, _rank_reduced, at_least_f32
from jaxprune._tree import (
    Where,
    as_int,
    leaves_with_paths,
    mirrors_variables,
    path_str,
    prunable_flags,
)

__all__ = ["patterns", "pattern_library"]


# The most patterns pattern_library lists: each is scored against every kernel.
_MAX_PATTERNS = 10_000


def pattern_library(kernel_size: tuple[int, int] = (3, 3), n: int = 4) -> np.ndarray:
    """Returns the default pattern library: bool ``[P, kh, kw]``, ``n`` entries each.

    For 3 x 3 kernels and ``n = 4``, the 8 PatDNN-style patterns: the centre
    plus three of its four edge neighbours (4 patterns) and the centre plus two
    adjacent edge neighbours and the corner between them (4 patterns). For
    other sizes: every pattern of ``n`` entries that contains the centre.

    Args:
      kernel_size: ``(kh, kw)``, the kernels' spatial size, a pair of ints ``>= 1``
        (default ``(3, 3)``). The centre is entry ``(kh // 2, kw // 2)``.
      n: the entries each pattern keeps, an int in ``[1, kh * kw]`` (default 4, as in
        PatDNN).

    Raises:
      ValueError: ``kernel_size`` is not a pair of ints ``>= 1``, ``n`` not an
        int in ``[1, kh * kw]``, or the library would hold more than 10,000
        patterns (``(5, 5)`` with ``n = 6`` has 42,504).

    Examples:
      >>> import jaxprune as jp
      >>> lib = jp.masks.pattern_library()
      >>> lib.shape, lib.sum(axis=(1, 2)).tolist()
      ((8, 3, 3), [4, 4, 4, 4, 4, 4, 4, 4])

    References:
      Niu et al., "PatDNN: Achieving Real-Time DNN Execution on Mobile Devices
      with Pattern-based Weight Pruning", 2020. https://arxiv.org/abs/2001.00138
    """
    try:
        kh, kw = (as_int(k) for k in kernel_size)
    except (TypeError, ValueError):  # not a pair
        kh = kw = None
    if kh is None or kw is None or kh < 1 or kw < 1:
        raise ValueError(
            f"kernel_size must be a pair of ints >= 1 (kh, kw), got {kernel_size!r}. Fix: e.g. "
            "kernel_size=(3, 3)."
        )
    if as_int(n) is None or not 1 <= n <= kh * kw:
        raise ValueError(
            f"n must be in [1, {kh * kw}], an int (the entries each pattern keeps of a {kh} x "
            f"{kw} kernel), got {n!r}. Fix: e.g. n=4 for 3 x 3 kernels, as in PatDNN."
        )
    centre = (kh // 2, kw // 2)
    pats = []
    if (kh, kw) == (3, 3) and n == 4:
        edges = [(0, 1), (1, 2), (2, 1), (1, 0)]
        for drop in range(4):
            pats.append([centre] + [e for j, e in enumerate(edges) if j != drop])
        for j in range(4):
            a, b = edges[j], edges[(j + 1) % 4]
            corner = (a[0] if a[0] != 1 else b[0], a[1] if a[1] != 1 else b[1])
            pats.append([centre, a, b, corner])
    else:
        others = [(r, c) for r in range(kh) for c in range(kw) if (r, c) != centre]
        count = math.comb(len(others), n - 1)
        if count > _MAX_PATTERNS:
            raise ValueError(
                f"pattern_library({(kh, kw)}, n={n}) would list every one of the {count:,} "
                f"patterns holding the centre (at most {_MAX_PATTERNS:,} are built: "
                "jp.masks.patterns scores each against every kernel). Fix: pass your own "
                "library to jp.masks.patterns (a bool array [num_patterns, kh, kw]), or a "
                "smaller n or kernel."
            )
        for combo in itertools.combinations(others, n - 1):
            pats.append([centre, *combo])
    lib = np.zeros((len(pats), kh, kw), bool)
    for p, entries in enumerate(pats):
        for r, c in entries:
            lib[p, r, c] = True
    return lib


def _check_library(library: Any) -> np.ndarray:
    lib = np.asarray(library)
    if lib.ndim != 3 or lib.shape[0] < 1 or lib.dtype != bool:
        raise ValueError(
            f"library must be a bool array [P, kh, kw] with P >= 1 patterns, got shape "
            f"{lib.shape} and dtype {lib.dtype}. Fix: jp.masks.pattern_library((3, 3), 4)."
        )
    return lib


def _check_kernel_axes(kernel_axes: Any) -> tuple[int, int]:
    """Returns ``kernel_axes`` as two distinct axes in ``0..3``, else raises naming it."""
    try:
        ints = tuple(as_int(a) for a in kernel_axes)
    except TypeError:  # not iterable
        ints = ()
    ok = len(ints) == 2 and all(a is not None and -4 <= a < 4 for a in ints)
    if not ok or ints[0] % 4 == ints[1] % 4:
        raise ValueError(
            f"kernel_axes must be two distinct ints in -4..3, the spatial axes of the 4-D conv "
            f"kernels patterns apply to, got {kernel_axes!r}. Fix: kernel_axes=(0, 1) for flax "
            "NHWC kernels [kh, kw, in, out], (2, 3) for equinox/PyTorch [out, in, kh, kw]."
        )
    return (ints[0] % 4, ints[1] % 4)


@functools.partial(jax.jit, static_argnums=(3,))
def _pattern_scores(
    x: jax.Array, lib_f: jax.Array, lib_b: jax.Array, kernel_axes: tuple[int, int]
) -> tuple[jax.Array, jax.Array]:
    """Returns each kernel's best pattern score and that pattern, ``[kh*kw, *rest]``.

    Jitted: called eagerly, its dozen operations compile as one program per
    leaf shape instead of one each.
    """
    x = jnp.moveaxis(x, kernel_axes, (0, 1))
    ks, rest = x.shape[:2], x.shape[2:]
    # Only the two kernel axes are merged: the channel axes, which a mesh may
    # shard, stay as they are (merging them would gather one).
    flat_x = x.reshape((ks[0] * ks[1],) + rest)

    # Non-finite entries are summed apart: in the product a pattern's 0 times a
    # NaN or an inf it leaves out would give NaN, the best score, to every pattern.
    # -inf means prune first: a pattern covering a -inf entry scores -inf, so a
    # kernel keeps its pattern of finite entries and a kernel of -inf goes first,
    # which keeps jp.drivers' masks nested. NaN and +inf rank highest, as in
    # jp.masks.topk: a pattern covering one scores NaN (+inf), and a kernel keeps
    # the best of those patterns by its finite entries.
    def covers(entries):
        return jnp.tensordot(lib_f, entries.astype(x.dtype), axes=1) > 0

    finite = jnp.where(jnp.isfinite(flat_x), flat_x, 0.0)
    sums = jnp.tensordot(lib_f, finite, axes=1)  # [P, *rest]
    pat_scores = jnp.where(covers(flat_x == jnp.inf), jnp.inf, sums)
    pat_scores = jnp.where(covers(jnp.isnan(flat_x)), jnp.nan, pat_scores)
    pat_scores = jnp.where(covers(flat_x == -jnp.inf), -jnp.inf, pat_scores)
    top = jnp.max(pat_scores, axis=0)  # NaN where any pattern is NaN
    tied = (pat_scores == top) | (jnp.isnan(pat_scores) & jnp.isnan(top))
    best = jnp.argmax(jnp.where(tied, sums, -jnp.inf), axis=0)
    return top, jnp.moveaxis(lib_b[best], -1, 0)


@functools.partial(jax.jit, static_argnames=("shape", "kernel_axes"))
def _apply_pattern(
    chosen: jax.Array, keep: jax.Array, *, shape: tuple[int, ...], kernel_axes: tuple[int, int]
) -> jax.Array:
    """Returns a leaf's mask: each kept kernel's ``chosen`` pattern, laid out like the leaf.

    ``shape`` is ``(kh, kw, *rest)``, the leaf's shape with its kernel axes first.
    """
    return jnp.moveaxis((chosen & keep[None]).reshape(shape), (0, 1), kernel_axes)


@_keeps_layout
@mirrors_variables
def patterns(
    scores: Any,
    sparsity: Any = 0.0,
    *,
    library: Any = None,
    kernel_axes: tuple[int, int] = (0, 1),
    where: Where | None = None,
) -> Any:
    """Returns bool masks where every k x k kernel keeps its best pattern from ``library``.

    Each kernel (one (in, out) pair of a conv kernel) keeps the library pattern
    with the largest summed score. ``sparsity`` additionally drops that
    fraction of whole kernels per leaf, ranked by their kept pattern's score
    (PatDNN's connectivity pruning); with ``sparsity = 0`` only patterns apply,
    so a schedule passed to ``jp.prune`` ramps connectivity pruning on top.

    Args:
      scores: a pytree of scores.
      sparsity: fraction of kernels to drop entirely, in ``[0, 1]``.
      library: bool ``[P, kh, kw]``; default ``pattern_library((3, 3))`` (8
        patterns of 4 entries), for 3 x 3 kernels.
      kernel_axes: the two spatial axes of the conv kernels (flax NHWC
        ``[kh, kw, in, out]``: ``(0, 1)``; equinox / PyTorch
        ``[out, in, kh, kw]``: ``(2, 3)``). A flax
        ``ConvTranspose(transpose_kernel=True)`` kernel ``[kh, kw, out, in]``
        has them at ``(0, 1)`` too.
      where: predicate narrowing the leaves (default: all). Patterns apply
        only to floating 4-d leaves whose kernel size equals the library's:
        1 x 1 convs and Dense kernels are left alone (so ``jp.prune``'s
        default ``where`` works); other kernel sizes, 3-D leaves (1-D conv
        kernels ``[k, in, out]``) and leaves of more than 4 axes (3-D conv
        kernels ``[kd, kh, kw, in, out]``, stacks of 2-D ones) are left dense
        with a warning, which ``where=`` silences by leaving them out.

    Returns:
      A tree of bool masks with exactly the structure of ``scores``.

    Raises:
      ValueError: the library or ``kernel_axes`` is malformed.

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> m = jp.masks.patterns({"k": jnp.ones((3, 3, 2, 2))})
      >>> m["k"].sum(axis=(0, 1)).tolist()
      [[4, 4], [4, 4]]

    References:
      Niu et al., "PatDNN", 2020. https://arxiv.org/abs/2001.00138
      Ma et al., "PCONV: The Missing but Desirable Sparsity in DNN Weight
      Pruning", 2020. https://arxiv.org/abs/1909.05073
    """
    lib = None if library is None else _check_library(library)
    kernel_axes = _check_kernel_axes(kernel_axes)
    flat, _ = leaves_with_paths(scores)

    def default_where(path, x):
        del path
        if jnp.ndim(x) != 4 or not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            return False
        ks = tuple(jnp.shape(x)[a] for a in kernel_axes)
        return ks == (lib.shape[1:] if lib is not None else (3, 3))

    # `where` narrows the leaves; patterns apply only where they fit (jp.prune
    # passes its own `where`, which selects Dense kernels too).
    applies = prunable_flags(scores, default_where)
    chosen = prunable_flags(scores, where) if where is not None else [True] * len(flat)
    flags = [a and c for a, c in zip(applies, chosen, strict=True)]
    skipped = [
        f"{path_str(p)} {tuple(jnp.shape(x)[a] for a in kernel_axes)}"
        for (p, x), a, c in zip(flat, applies, chosen, strict=True)
        if c
        and not a
        and jnp.ndim(x) == 4
        and jnp.issubdtype(jnp.result_type(x), jnp.floating)
        and tuple(jnp.shape(x)[a] for a in kernel_axes) != (1, 1)
    ]

    def unfit(ndim_ok):
        return [
            f"{path_str(p)} {tuple(jnp.shape(x))}"
            for (p, x), a, c in zip(flat, applies, chosen, strict=True)
            if c
            and not a
            and ndim_ok(jnp.ndim(x))
            and jnp.issubdtype(jnp.result_type(x), jnp.floating)
        ]

    stacked, conv1d = unfit(lambda nd: nd > 4), unfit(lambda nd: nd == 3)
    # stacklevel 3: patterns < _keeps_layout < the caller.
    if stacked:
        warnings.warn(
            f"patterns left these leaves of more than 4 axes dense (3-D conv kernels, or stacks "
            f"of 2-D ones): {stacked[:5]}. Patterns are 2-D, so 3-D conv kernels "
            "[kd, kh, kw, in, out] are not supported. Fix: for "
            "a stack of 2-D conv kernels [L, kh, kw, in, out], "
            "jp.masks.per_layer(jp.masks.patterns, stacked=...) prunes each kernel of the "
            "stack; leave 3-D conv kernels out with where= (which also silences this).",
            stacklevel=3,
        )
    if conv1d:
        warnings.warn(
            f"patterns left these 3-D leaves dense: {conv1d[:5]}. Patterns are 2-D (k x k "
            "kernels), so 1-D conv kernels [k, in, out] are not supported. Fix: leave them "
            "out with where= (which also silences this), or select them with "
            "jp.masks.structured, nm or blocks.",
            stacklevel=3,
        )
    if skipped:
        want = lib.shape[1:] if lib is not None else (3, 3)
        warnings.warn(
            f"patterns left these conv kernels dense, their kernel size is not the "
            f"library's {want}: {skipped[:5]}. Fix: pass library=jp.masks.pattern_library("
            "kernel_size) for their size, and where= to choose them.",
            stacklevel=3,
        )
    reduced, expand = {}, {}
    for i, ((_, x), f) in enumerate(zip(flat, flags, strict=True)):
        if not f:
            continue
        ks = tuple(jnp.shape(x)[a] for a in kernel_axes)
        leaf_lib = lib if lib is not None else pattern_library(ks)
        x = at_least_f32(x)
        ka = tuple(a % jnp.ndim(x) for a in kernel_axes)
        rest = tuple(d for a, d in enumerate(jnp.shape(x)) if a not in ka)
        lib_f = jnp.asarray(leaf_lib.reshape(leaf_lib.shape[0], -1), x.dtype)
        lib_b = jnp.asarray(leaf_lib.reshape(leaf_lib.shape[0], -1))
        reduced[i], chosen = _pattern_scores(x, lib_f, lib_b, ka)

        expand[i] = functools.partial(_apply_pattern, chosen, shape=ks + rest, kernel_axes=ka)
    return _rank_reduced(
        scores, sparsity, reduced, expand, "layer", name="patterns", things="kernels"
    )
