"""Exact k-th smallest search without sorting, and the selection built on it.

The k-th smallest score is found by a safeguarded interpolation search over
the order-preserving integer image of the float32 scores (:func:`ordered_keys`),
counting ``key <= t`` with one reduction per probe. That is O(N) per probe,
converges in a handful of probes on real score distributions (never more than
64), and on sharded arrays each probe is a reduction, not a gather. Scores
that are all bfloat16 (or all float16) are searched on the order-preserving
image of their 16 bits instead (:func:`jaxprune._keys._keys_as`): the same order, in a key
range 65,536 times narrower, which the ties of 16-bit scores need.
:func:`select_keys` turns the threshold into keep-masks that prune exactly
``k`` entries, ties broken by flatten order. :mod:`jaxprune.masks` builds
``topk`` / ``global_topk`` on it.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxprune._keys import (
    _ordered_keys,  # noqa: F401  (imported from here by other modules)
    _score_keys,
    _warn_float64,
    ordered_keys,
)
from jaxprune._search_sharding import (
    _explicit_axes,
    _on_auto_axes,
    _placed_like,  # noqa: F401  (imported from here by other modules)
    _replicated,
    _sharding_or_replicated,
)

__all__ = ["ordered_keys", "kth_smallest_keys", "select_keys"]


def _chunk(n: int, cap: int = 32) -> int:
    """Returns the largest divisor of ``n`` that is at most ``cap`` (``n`` itself when small)."""
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def _split_runs(b: jax.Array, axis: int) -> jax.Array:
    """Returns ``b`` with ``axis`` split in place into ``(n / c, c)``: runs of ``c <= 32`` entries.

    ``c`` is the largest divisor of the axis length up to 32; an axis without
    one between 8 and 32 (e.g. a prime length) is padded with ``False`` to a
    multiple of 32 rather than split into runs of one. Splitting in place
    keeps a sharded axis sharded.
    """
    axis = axis % b.ndim
    n = b.shape[axis]
    c = _chunk(n)
    if c < 8 < n:
        pad = [(0, 0)] * b.ndim
        pad[axis] = (0, -n % 32)
        b = jnp.pad(b, pad)
        n, c = b.shape[axis], 32
    return b.reshape(b.shape[:axis] + (n // c, c) + b.shape[axis + 1 :])


def _row_counts(b: jax.Array) -> jax.Array:
    """Returns the number of ``True`` along the last axis of ``b`` (int32, shape ``b.shape[:-1]``).

    Two stages: runs of up to 32 entries are summed into uint8 first, which
    XLA fuses with the comparison producing ``b``, so no full-size integer
    copy of ``b`` is ever written; only the 32x smaller partial sums are.
    The runs are those of :func:`_split_runs` along the last axis.
    """
    b = b.reshape(1) if b.ndim == 0 else b
    part = jnp.sum(_split_runs(b, -1), axis=-1, dtype=jnp.uint8)
    return jnp.sum(part, axis=-1, dtype=jnp.int32)


def _total_count(b: jax.Array) -> jax.Array:
    """Returns the number of ``True`` in ``b`` (int32), two-stage like :func:`_row_counts`.

    The runs summed into uint8 lie along the last axis when its length has a
    divisor of at least 8 (up to 32); otherwise along the axis with the
    largest such divisor (a prime-length last axis would leave runs of one,
    about 4x slower to count), split by :func:`_split_runs`.
    """
    b = b.reshape(1) if b.ndim == 0 else b
    chunks = [_chunk(n) for n in b.shape]
    axis = b.ndim - 1
    if chunks[axis] < 8:
        axis = max(range(b.ndim), key=lambda a: (chunks[a], a))
    part = jnp.sum(_split_runs(b, axis), axis=axis + 1, dtype=jnp.uint8)
    return jnp.sum(part, dtype=jnp.int32)


def _any_leading(b: jax.Array) -> jax.Array:
    """Returns ``jnp.any`` of ``b`` over all axes but the last, without a full-size copy.

    A plain ``jnp.any`` over a long axis becomes a windowed reduction on
    XLA:CPU that does not fuse with the comparison producing ``b``, so ``b``
    would be written out in full. Reducing runs of at most 32 entries of the
    first axis first (fused, like :func:`_row_counts`) leaves only a small
    partial result for the rest.
    """
    if b.ndim < 2:
        return b
    # uint8 partial sums (not a second any): XLA would merge two ``any`` into one.
    part = jnp.sum(_split_runs(b, 0), axis=1, dtype=jnp.uint8)
    return jnp.max(part, axis=tuple(range(part.ndim - 1))) > 0


def _max_key(x: jax.Array, zero: jax.Array) -> jax.Array:
    """Returns the largest entry of the uint32 array ``x``, without a full-size copy.

    Two stages, like :func:`_row_counts`: a plain ``jnp.max`` over a 2-D array
    becomes a windowed reduction on XLA:CPU that does not fuse with the
    computation producing ``x``, so ``x`` would be written out in full (in a
    refresh of many small layers, every layer's keys at once). Runs of at most
    32 entries are reduced first, fused; the padding of :func:`_split_runs` is
    0, the identity of an unsigned maximum. ``zero`` is a uint32 0 known only at
    run time: xor-ed between the stages, it keeps XLA from merging them back
    into one reduction.
    """
    x = x.reshape(1) if x.ndim == 0 else x
    return jnp.max(jnp.max(_split_runs(x, -1), axis=-1) ^ zero)


def _count_le(keys: list[jax.Array], t: jax.Array) -> jax.Array:
    return sum(_total_count(k <= t) for k in keys)


# Every search below takes a key function ``fn`` and its sources ``src``
# (``fn(src)`` is the list of uint32 keys) and recomputes the keys wherever it
# reads them. Key functions are element-wise (bitcasts, ``abs``, products), so
# XLA fuses them into each count, and keys computed from the params inside the
# train step are never stored; a keys array handed to a loop or a branch would
# be written out in full (4 bytes per score) and kept in the step's scratch
# memory. Callers that hold stored keys pass them with ``fn = _identity``.


def _identity(src: list[jax.Array]) -> list[jax.Array]:
    return list(src)


def _salted(src: Any, salt: jax.Array) -> Any:
    """Returns ``src`` with every leaf combined with ``salt``, which is 0 at run time.

    Floating leaves are multiplied by ``1 - salt`` (exactly 1: IEEE ``x * 1``
    is ``x``, signed zeros and infinities included), integer leaves xor-ed
    with ``salt``, bool leaves with ``salt != 0``. Inside a loop body,
    ``fn(_salted(src, salt))`` with a loop-carried ``salt`` is then not
    loop-invariant from its very first operation, so XLA does not hoist any
    part of it out of the loop into a full-size array: it stays fused into the
    count that consumes it. Other leaves (PRNG keys, ...) are left as they are.
    """

    def one(x):
        if not isinstance(x, jax.Array):
            return x
        if jnp.issubdtype(x.dtype, jnp.floating):
            return x * (1 - salt).astype(x.dtype)
        if x.dtype == jnp.bool_:
            return x ^ (salt != 0)
        if jnp.issubdtype(x.dtype, jnp.integer):
            return x ^ salt.astype(x.dtype)
        return x

    return jax.tree.map(one, src)


def _zero_from(c: jax.Array) -> jax.Array:
    """Returns ``c >> 31`` as uint32: 0 for a count ``0 <= c < 2**31``, unknown to XLA."""
    return jax.lax.shift_right_logical(c.astype(jnp.uint32), jnp.uint32(31))


class _Keys:
    """The keys ``fn(src)``, recomputed at every place that reads them.

    Each read (:meth:`fresh`) salts ``src`` with its own run-time zero (derived
    from ``base``, a non-negative int32 such as the count to prune), so XLA can
    neither merge two reads into one array (which a consumer that cannot fuse
    it would then force into memory) nor hoist a read out of a loop.
    """

    def __init__(self, fn, src, base):
        self.fn, self.src = fn, src
        self.base = jnp.asarray(base, jnp.int32)
        self.shapes = [tuple(x.shape) for x in jax.eval_shape(fn, src)]
        self.n = sum(math.prod(s) for s in self.shapes)
        self._reads = 0

    def at(self, zero: jax.Array) -> list[jax.Array]:
        return self.fn(_salted(self.src, zero))

    def fresh(self) -> list[jax.Array]:
        self._reads += 1
        return self.at(_zero_from(self.base + self._reads))


def _varying_axes(x: Any) -> set:
    """The manual mesh axes ``x`` varies over inside ``shard_map`` (empty outside)."""
    t = jax.typeof(x)
    mat = getattr(t, "manual_axis_type", None)  # jax 0.10, 0.12
    if mat is not None:
        return set(mat.varying)
    return set(getattr(t, "vma", ()) or ())  # jax 0.11


def _vary_like(init: Any, *refs: Any) -> Any:
    """Returns a loop's ``init`` varying over every mesh axis that ``refs`` vary over.

    Inside ``shard_map`` (with its default ``check_vma=True``) values computed
    from a shard's data are typed as varying across the manual mesh axes,
    while constants are not, and ``lax.while_loop`` needs its carry typed the
    same going in and coming out. Outside ``shard_map`` it returns ``init``.
    """
    vma = set()
    for r in jax.tree.leaves(refs):
        vma |= _varying_axes(r)
    if not vma:
        return init

    def one(x):
        missing = tuple(sorted(vma - _varying_axes(x)))
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(one, init)


def _bracket_search(K, k, lo, hi, c_lo, c_hi):
    """Narrows ``c(lo) < k <= c(hi)`` until ``c(hi) == k`` or ``hi == lo + 1``."""

    def cond(state):
        lo, hi, c_lo, c_hi, _, _ = state
        return (c_hi != k) & (hi - lo > 1)

    def body(state):
        lo, hi, c_lo, c_hi, interpolate, salt = state
        width = hi - lo
        frac = (k - c_lo).astype(jnp.float32) / (c_hi - c_lo).astype(jnp.float32)
        step_i = jnp.floor(frac * width.astype(jnp.float32))
        step_i = jnp.clip(step_i, 1.0, 4.0e9).astype(jnp.uint32)
        step_i = jnp.clip(step_i, jnp.uint32(1), width - 1)
        t = lo + jnp.where(interpolate, step_i, width // 2)
        c = _count_le(K.at(salt), t)
        go_left = c >= k
        new_lo, new_c_lo = jnp.where(go_left, lo, t), jnp.where(go_left, c_lo, c)
        new_hi, new_c_hi = jnp.where(go_left, t, hi), jnp.where(go_left, c, c_hi)
        # Interpolate next only if this step at least halved the bracket.
        halved = (new_hi - new_lo) <= width // 2
        return new_lo, new_hi, new_c_lo, new_c_hi, halved, _zero_from(c)

    init = (lo, hi, c_lo, c_hi, jnp.bool_(True), _zero_from(c_lo))
    init = _vary_like(init, init, k, K.src)
    lo, hi, c_lo, c_hi, _, _ = jax.lax.while_loop(cond, body, init)
    return lo, hi, c_lo, c_hi


def _full_bracket(K, k):
    if K.n <= 4 * _SAMPLE or K.fn is _identity:
        # The exact key range, by reductions fused with the keys: always for
        # stored keys (a k-th key at either end of the scores, where a large
        # search's sample bracket does not hold, took twice the time from the
        # whole uint32 range, and 16-bit keys (_keys_as) 2.5x).
        zero = _zero_from(K.base)
        lo = ~jnp.max(jnp.stack([_max_key(~x, zero) for x in K.fresh()]))
        hi = jnp.max(jnp.stack([_max_key(x, zero) for x in K.fresh()]))
    else:  # large keys recomputed where they are read (a train step's fused
        # refresh): the whole uint32 range, so that only counts read them
        lo, hi = jnp.uint32(0), jnp.uint32(0xFFFFFFFF)
    c_lo = _count_le(K.fresh(), lo)
    # If the minimum already covers k entries, the answer is the minimum and
    # nothing lies below it: encode as an empty bracket with c(lo) = 0.
    at_min = c_lo >= k
    c_hi = jnp.where(at_min, c_lo, jnp.int32(K.n))
    return lo, jnp.where(at_min, lo, hi), jnp.where(at_min, 0, c_lo), c_hi


_SAMPLE = 16384


def _sample_bracket(K, k):
    """Brackets the k-th key by searching a strided sample first (cheap, usually valid)."""
    n = K.n
    stride = max(1, n // _SAMPLE)
    sample = [_strided_sample(x, stride) for x in K.fresh()]
    if len(sample) > 1:
        # One stored array: the two searches below then count it with one
        # reduction per probe, not one per leaf (XLA compiles each apart: a
        # train step with a global refresh of a ResNet-50's 54 kernels took
        # 15.6-17.2 s to compile, against 13.3-15.2 s; BENCHMARKS.md).
        sample = [jnp.concatenate([x.reshape(-1) for x in sample])]
    n_s = sum(x.size for x in sample)
    q = k.astype(jnp.float32) / n
    k_s = q * n_s
    # ~4 standard deviations of the sample quantile on each side.
    delta = 4.0 * jnp.sqrt(jnp.maximum(k_s * (1.0 - q), 1.0)) + 2.0
    k_lo = jnp.clip(jnp.floor(k_s - delta), 1, n_s).astype(jnp.int32)
    k_hi = jnp.clip(jnp.ceil(k_s + delta), 1, n_s).astype(jnp.int32)
    t_lo = _kth(_Keys(_identity, sample, k_lo), k_lo)[0]
    t_hi = _kth(_Keys(_identity, sample, k_hi), k_hi)[0]
    lo = jnp.where(t_lo > 0, t_lo - 1, t_lo)
    return lo, t_hi, _count_le(K.fresh(), lo), _count_le(K.fresh(), t_hi)


def _strided_sample(x: jax.Array, stride: int) -> jax.Array:
    """Returns about every ``stride``-th entry of ``x``, strided along each axis.

    Striding every axis (not a flattened copy) keeps each shard's part of the
    sample on its own device: only the small sample is ever gathered.
    """
    steps = [1] * x.ndim
    remaining = stride
    axes = sorted(range(x.ndim), key=lambda a: -x.shape[a])
    for left, a in zip(range(x.ndim, 0, -1), axes, strict=True):
        s = min(x.shape[a], max(1, round(remaining ** (1.0 / left))))
        steps[a] = s
        remaining = max(1, math.ceil(remaining / s))
    return x[tuple(slice(None, None, s) for s in steps)]


def _flat_index(shape: tuple[int, ...], offset: int) -> jax.Array:
    """Returns each entry's position in flatten (row-major) order, plus ``offset``."""
    idx = jnp.full(shape, offset, jnp.int32)
    stride = 1
    for axis in reversed(range(len(shape))):
        idx = idx + jax.lax.broadcasted_iota(jnp.int32, shape, axis) * stride
        stride *= shape[axis]
    return idx


def _last_tied(K, t: jax.Array, need: jax.Array) -> jax.Array:
    """Returns the flat position (over all ``keys``) of the ``need``-th key equal to ``t``.

    Two levels, both sharding-safe: the ties of each row (all axes but the
    last) are counted with one reduction, the boundary row is found by
    bisection over those small counts, and only that one row is scanned with a
    cumulative sum. A cumulative sum over a flattened copy would gather a
    whole sharded leaf.
    """
    shapes = [s if s else (1,) for s in K.shapes]
    rows = [_row_counts(x.reshape(s) == t) for x, s in zip(K.fresh(), shapes, strict=True)]
    row_idx, row_off, off = [], [], []
    n_rows = n = 0
    for s, r in zip(shapes, rows, strict=True):
        row_idx.append(_flat_index(r.shape, n_rows))
        row_off.append(n_rows)
        off.append(n)
        n_rows += r.size
        n += math.prod(s)

    def ties_up_to(p):
        pairs = zip(rows, row_idx, strict=True)
        return sum(jnp.sum(jnp.where(i <= p, r, 0), dtype=jnp.int32) for r, i in pairs)

    def body(state):
        lo, hi = state
        mid = lo + (hi - lo) // 2
        go_left = ties_up_to(mid) >= need
        return jnp.where(go_left, lo, mid), jnp.where(go_left, mid, hi)

    # Invariant: ties_up_to(lo) < need <= ties_up_to(hi); hi ends as the boundary row.
    init = _vary_like((jnp.int32(-1), jnp.int32(n_rows - 1)), need, rows)
    _, row = jax.lax.while_loop(lambda s: s[1] - s[0] > 1, body, init)
    left = need - ties_up_to(row - 1)  # ties to prune inside the boundary row

    last = jnp.int32(0)
    keys = [x.reshape(s) for x, s in zip(K.fresh(), shapes, strict=True)]
    for x, r, ri, r0, x0 in zip(keys, rows, row_idx, row_off, off, strict=True):
        local = jnp.clip(row - r0, 0, r.size - 1)
        # The boundary row by a masked reduction (a dynamic slice along a
        # sharded axis would gather the whole leaf first). Only one row is
        # selected, so an any() over the other axes is that row's ties.
        on_row = (x == t) & (ri == row)[..., None]
        line = _any_leading(on_row).astype(jnp.int32)
        col = jnp.argmax(jnp.cumsum(line) >= left).astype(jnp.int32)
        holds = (row >= r0) & (row < r0 + r.size)
        last = jnp.where(holds, x0 + local * x.shape[-1] + col, last)
    return last


def _kth(K, k):
    lo, hi, c_lo, c_hi = _full_bracket(K, k)
    lo, hi, c_lo, c_hi = _bracket_search(K, k, lo, hi, c_lo, c_hi)
    return hi, jnp.where(c_hi == k, k, c_lo), c_hi


def kth_smallest_keys(
    keys: list[jax.Array], k: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns ``(t, below, at_or_below)``: the k-th smallest key over all ``keys``.

    ``below < k <= at_or_below`` with ``below = #{key < t}`` and ``at_or_below
    = #{key <= t}``, except that ``below == at_or_below == k`` when ``{key <=
    t}`` holds exactly ``k`` keys.
    Safeguarded interpolation search (regula falsi on the count function with a
    bisection step whenever an interpolation step fails to halve the bracket),
    started from a bracket found on a strided sample when the input is large:
    exact, no sort.

    Args:
      keys: a list of uint32 key arrays of any shapes (e.g. from :func:`ordered_keys`),
        searched together as one pool.
      k: the rank sought, an integer scalar (may be traced; cast to int32), meaningful
        for ``1 <= k <=`` the total number of keys: a smaller ``k`` gives the smallest
        key, a larger one the largest, and the bounds above then do not hold.

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> keys = [jp.masks.ordered_keys(jnp.array([3.0, 1.0, 2.0, 1.0]))]
      >>> t, below, at = jp.masks.kth_smallest_keys(keys, 1)
      >>> bool(t == jp.masks.ordered_keys(jnp.float32(1.0))), int(below), int(at)  # a tie at 1.0
      (True, 0, 2)
      >>> [int(c) for c in jp.masks.kth_smallest_keys(keys, 2)[1:]]  # exactly 2 keys <= t
      [2, 2]
    """
    found = _explicit_axes(keys)
    if found is not None:
        mesh, axes = found
        out = (_replicated(mesh),) * 3
        return _on_auto_axes(kth_smallest_keys, axes, out, list(keys), k)
    k = jnp.asarray(k, jnp.int32)
    return _kth_smallest(_Keys(_identity, list(keys), jnp.maximum(k, 0)), k)


def _kth_smallest(K, k):
    """:func:`kth_smallest_keys` of the lazily computed keys ``K``."""
    k = jnp.asarray(k, jnp.int32)
    if K.n <= 4 * _SAMPLE:
        return _kth(K, k)
    lo, hi, c_lo, c_hi = _sample_bracket(K, k)
    valid = (c_lo < k) & (k <= c_hi)
    lo, hi, c_lo, c_hi = jax.lax.cond(
        valid, lambda: (lo, hi, c_lo, c_hi), lambda: _full_bracket(K, k)
    )
    lo, hi, c_lo, c_hi = _bracket_search(K, k, lo, hi, c_lo, c_hi)
    return hi, jnp.where(c_hi == k, k, c_lo), c_hi


def select_keys(fn, src: Any, k: jax.Array) -> list[jax.Array]:
    """Returns keep-masks pruning exactly ``k`` smallest keys ``fn(src)``, ties by flat order.

    ``fn`` maps ``src`` (any pytree) to a list of uint32 key arrays (see
    :func:`ordered_keys`) and should be element-wise and cheap: it is traced
    once per place that reads the keys, and the keys are never stored. The
    masks have the shapes of the keys and are one element-wise expression of
    them and three scalars (threshold, tie boundary, ``k <= 0``), so XLA fuses
    them into whatever consumes them (e.g. :func:`jaxprune.masks.pack`); the searches only
    ever write small partial counts. Not jitted: call it under ``jax.jit``.

    On arrays whose type carries Explicit mesh axes (sharding in types, the
    default of ``jax.make_mesh``), the search runs with those axes made Auto
    and the masks come back typed with the keys' shardings; see
    :func:`_on_auto_axes`.
    """
    found = _explicit_axes(src)
    if found is None:
        return _select_keys(fn, src, k)
    mesh, axes = found
    # The keys' types (not jax.eval_shape's, which drops the sharding when the
    # mesh mixes Explicit and Auto axes); tracing fn here computes nothing.
    out = [_sharding_or_replicated(a, mesh) for a in jax.make_jaxpr(fn)(src).out_avals]
    return _on_auto_axes(functools.partial(_select_keys, fn), axes, out, src, k)


def _cut(K: _Keys, k: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns ``(t, last)``: the ``k`` smallest keys are those ``< t``, and those ``== t``
    at flat positions ``<= last`` (``k >= 1``, ``K.n >= 1``)."""
    t, below, at_or_below = _kth_smallest(K, jnp.maximum(k, 1))
    # Without ties at t, every key <= t goes (the boundary is past the end);
    # otherwise the first (k - below) keys equal to t in flatten order go.
    last = jax.lax.cond(
        at_or_below == k,
        lambda: _vary_like(jnp.int32(K.n), t, k),
        lambda: _last_tied(K, t, k - below),
    )
    return t, last


def select_cut(fn, src: Any, k: int, base: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns the scalars ``(t, last)`` that mark the ``k`` smallest keys ``fn(src)``.

    Key ``x`` at flat position ``i`` (flatten order over ``fn(src)``'s arrays)
    is among them iff ``x < t | (x == t & i <= last)``: the complement of
    :func:`select_keys`' masks, as an element-wise test a caller can fuse into
    its own reads of the keys instead of storing a mask. ``k`` is a Python int
    in ``[1, n)``; arrays without Explicit mesh axes only. ``base`` is a
    non-negative int32 known only at run time (e.g. a traced count to prune):
    the keys' reads are salted from it (see :class:`_Keys`), and a constant
    would let XLA merge them into one stored array.
    """
    K = _Keys(fn, src, base)
    return _cut(K, jnp.int32(k))


def _select_keys(fn, src: Any, k: jax.Array) -> list[jax.Array]:
    """:func:`select_keys` on arrays without Explicit mesh axes."""
    k = jnp.asarray(k, jnp.int32)
    # The salts' base behind a barrier: a count XLA knows (a constant sparsity)
    # would let it fold every read's salt to one constant and merge the reads
    # into one stored array.
    K = _Keys(fn, src, jax.lax.optimization_barrier(jnp.maximum(k, 0)))
    n = K.n
    if n == 0:
        return [jnp.ones(s, bool) for s in K.shapes]
    t, last = _cut(K, k)
    out, offset = [], 0
    for x in K.fresh():
        idx = _flat_index(x.shape, offset)
        out.append((k <= 0) | (x > t) | ((x == t) & (idx > last)))
        offset += x.size
    return out


# Jitted so that eager one-shot calls compile once per shape, not per op.
_select_jit = jax.jit(select_keys, static_argnums=0)


def _select(keys: list[jax.Array], k: jax.Array) -> list[jax.Array]:
    """Returns flat keep-masks pruning exactly ``k`` smallest ``keys`` (ties by flat order)."""
    return _select_jit(_identity, list(keys), k)


@jax.jit
def _select_scores_jit(scores: list[jax.Array], k: jax.Array) -> list[jax.Array]:
    return select_keys(_identity, _score_keys(scores, warn=False), k)


def _select_scores(scores: list[jax.Array], k: jax.Array) -> list[jax.Array]:
    """:func:`_select` of the keys of ``scores`` (:func:`_score_keys`), made in its program.

    Called eagerly, the keys' element-wise operations then compile with the
    search, not one small program each (a first eager ``topk`` or structured
    selection compiled about eight more programs per leaf shape). The keys are
    still computed once and stored, as the search reads them at every probe.
    """
    # As arrays first: a nested jit would take a ShapeDtypeStruct (a stacked
    # layer's stand-in) for an abstract value, where ordered_keys refuses it.
    scores = [jnp.asarray(x) for x in scores]
    for x in scores:
        _warn_float64(x)
    return _select_scores_jit(scores, k)
