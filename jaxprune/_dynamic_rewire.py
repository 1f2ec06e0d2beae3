"""The rewiring step of :mod:`jaxprune.dynamic`: drop the smallest weights, regrow as many.

One leaf at a time (mapped over a stack's layer axes by ``_over_layers``),
with exact counts from the same searches as ``jp.masks.topk``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxprune import masks as _masks


def _drop_grow(w, g, m, frac, key, regrow):
    """Returns ``(new_mask, changed)`` for one leaf: drop k smallest |w|, regrow k."""
    n = m.size
    active = jnp.sum(m, dtype=jnp.int32).astype(jnp.float32)
    k = jnp.floor(jnp.asarray(frac, jnp.float32) * active).astype(jnp.int32)
    # Finite placeholders (float32's largest) rank inactive entries last to drop
    # and kept ones last to regrow: an inf would trip jax_debug_infs.
    inf = jnp.float32(jnp.finfo(jnp.float32).max)
    drop_score = jnp.where(m, jnp.abs(w).astype(jnp.float32), inf)
    after = _masks._select([_masks.ordered_keys(drop_score)], k)[0].reshape(m.shape) & m
    if regrow == "gradient":
        grow = jnp.abs(g).astype(jnp.float32)
    else:
        grow = jax.random.uniform(key, m.shape, jnp.float32)
    grow_score = jnp.where(after, -inf, grow)
    top = _masks._select([_masks.ordered_keys(grow_score)], n - k)[0].reshape(m.shape)
    new = after | (top & ~after)
    return new, new != m


def _over_layers(fn: Any, k: int) -> Any:
    """Returns ``fn`` mapped over ``k`` leading (layer) axes of every argument."""
    for _ in range(k):
        fn = jax.vmap(fn)
    return fn
