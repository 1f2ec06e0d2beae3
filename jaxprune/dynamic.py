"""Dynamic sparse training: SET, RigL and STE as optax wrappers around any optimizer.

The network is sparse from the first step (random masks at the distribution's
per-leaf sparsities, applied to the params right after ``tx.init``) and stays
at exactly that sparsity: every ``update_every`` steps each prunable leaf
drops the ``k`` active weights of smallest magnitude and regrows ``k``
inactive ones (largest dense-gradient magnitude for RigL, at random for SET).
Regrown weights start at exactly 0 and the inner optimizer's per-parameter
moments of every dropped or regrown entry are reset to 0, so a regrown weight
does not inherit the momentum it had before it was pruned. The regrowth
candidates are every entry inactive after the drop, the ones just dropped
included (as in RigL's reference code, whose ``reinit_when_same`` is off by
default): an entry dropped and regrown in the same step never changed, keeps
its value and moments, and does not count as swapped, so a step may change
fewer than ``2 k`` mask entries. ``jp.sparsity(params)`` reads above the
target right after a rewiring, since regrown weights are exactly 0; measure
the masks (``jp.sparsity(jp.dynamic.get_masks(state))``) for the sparsity
kept.

``tx.init`` cannot change the params, only build the masks: apply them right
after it, ``params = jp.apply_masks(params, jp.get_masks(state))`` (nnx:
``nnx.update(model, jp.apply_masks(nnx.state(model, nnx.Param), masks))``).
Otherwise step 0's forward pass and gradient are the dense model's (the
gradient that seeds the inner optimizer's moments, and any evaluation or
checkpoint taken before step 1); the step's updates then land the pruned
weights on 0.

Moments are found by structure, not by optimizer type: any subtree of the
inner state with the params' tree structure, whose leaf has the param's shape,
is reset there (adam's ``mu``/``nu``, sgd's momentum ``trace``, lion's ``mu``,
``inject_hyperparams``-wrapped ones alike, and the partial trees of
``optax.masked``, ``optax.multi_transform`` and ``optax.contrib.muon``, whose
``MaskedNode`` placeholders stand for the leaves they leave out). Moments that
are not per entry cannot be reset per entry and are left as they are:
Adafactor's factored second moments (one row and one column vector per
matrix), SM3's per-axis accumulators and Novograd's per-layer second moment.
On a rewiring step the inner optimizer sees the sparse model after it: dropped
weights at 0 and only the gradients of weights active before and after.

Stacked layers (flax linen ``nn.scan``, ``nnx.vmap``-built stacks, equinox
``filter_vmap``: one kernel leaf ``[L, in, out]`` holding ``L`` layers, one
bias leaf ``[L, out]`` their biases) are one leaf to the rewiring unless
``stacked=`` says which leaves stack layers, as for ``jp.masks.per_layer``.
Then ``where`` is asked about one layer of each leaf (the ``[L, out]`` biases
are not kernels), the distribution spreads the sparsity as over the unrolled
model (ERK sizes each layer by its own fans, not ``L`` as a fan), and each
layer keeps exactly its own count: its initial mask and every drop/regrow
(``floor(f(t) * active)`` of that layer) are its own, computed for all layers
at once by one ``jax.vmap`` over the layer axis, so the compiled step does
not grow with ``L``.

Wrap the whole optimizer: as for ``jp.prune``, ``rigl``/``set`` must be the
last transform the updates pass through. They land pruned weights on exactly
0 by emitting ``-params`` updates; a transform chained after them
(``optax.chain(rigl(optax.scale_by_adam(), ...), optax.scale(-lr))``)
rescales or clips those updates, pruned entries no longer land on 0 and the
sparsity silently drops. Write ``rigl(optax.chain(optax.scale_by_adam(),
optax.scale(-lr)), ...)`` (or ``rigl(optax.adam(lr), ...)``). Element-wise
transforms *before* them (``optax.chain(optax.clip(1.0), rigl(...))``) are
fine; put ``optax.clip_by_global_norm`` *inside* (``rigl(optax.chain(
optax.clip_by_global_norm(1.0), optax.adam(lr)), ...)``), where the norm is
that of the sparse model's gradient: before, it also counts the pruned
entries' gradients and clips harder than its threshold says. Likewise
``optax.apply_if_finite`` goes *outside* (``optax.apply_if_finite(rigl(...),
max_consecutive_errors)``), so that a skipped step does not rewire on
non-finite gradients: inside, RigL would still rewire on that step and
regrow exactly the NaN/inf entries.
Optimizers that keep a second copy of the params are not supported as such,
as for ``jp.prune``: schedule-free's evaluation params are not masked, and
``optax.lookahead``'s sync steps would bring pruned weights back.

:func:`ste` (straight-through sparse training, and SR-STE) lives in
:mod:`jaxprune._ste`: it keeps the dense weights in its state and selects
the masks again at every step, so its sparsity follows a schedule and the
params hold exact zeros, not regrown ones.

The initial masks are built in :mod:`jaxprune._dynamic_init`, the moments
reset in :mod:`jaxprune._dynamic_moments`; the arguments are checked in
:mod:`jaxprune._dynamic_args`, home of :func:`cosine_drop_fraction`
(re-exported here).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxprune import criteria as _criteria
from jaxprune import distributions as _dist
from jaxprune import masks as _masks
from jaxprune._dynamic_args import (
    _check_begin_step,
    _validate,
    _warn_never_rewires,
    cosine_drop_fraction,
)
from jaxprune._dynamic_init import (
    _check_per_leaf,
    _check_total,
    _initial_masks,
    _per_layer_sparsities,
    _random_masks,
    _warn_nothing_prunable,
)
from jaxprune._dynamic_moments import _reset_moments
from jaxprune._dynamic_rewire import _drop_grow, _over_layers
from jaxprune._refresh import _reshard_like
from jaxprune._search import (
    _explicit_axes,
    _on_auto_axes,
    _placed_like,
    _sharding_or_replicated,
)
from jaxprune._ste import SteState, ste
from jaxprune._tree import (
    Where,
    check_same_leaves,
    key_parts,
    leaves_with_paths,
    prunable_flags,
    unwrap_variables,
)

# Read-only: how many leading axes of a leaf index its layers.
from jaxprune.stacked import Stacked, _depth, _warn_no_stack, layer_where_of
from jaxprune.state import get_masks as _get_masks
from jaxprune.state import register_mask_state
from jaxprune.transform import (
    _check_state_fits,
    _check_state_type,
    _check_tx,
    _fill,
    _jit_when_eager,
)

__all__ = [
    "DynamicSparseState",
    "SteState",
    "rigl",
    "set",
    "ste",
    "cosine_drop_fraction",
    "get_masks",
]


class DynamicSparseState(NamedTuple):
    """State of :func:`rigl` and :func:`set`.

    The masks are stored packed, one bit per prunable entry (as in
    :class:`~jaxprune.transform.PruneState`); ``state.masks`` unpacks them.

    Args:
      count: int32 scalar, the number of update steps taken.
      packed_masks: a tree with the params' structure: a
        :class:`~jaxprune.masks.PackedMask` per prunable leaf, a scalar ``True`` for
        every other leaf.
      inner_state: the wrapped optimizer's state.
      key_data: the uint32 raw PRNG key data (``jax.random.key_data``) of the
        transform's ``key`` (required by :func:`rigl` and :func:`set`).
    """

    count: jax.Array  # int32 [], number of update steps taken
    packed_masks: optax.Params  # PackedMask per prunable leaf; non-prunable leaves: scalar True
    inner_state: optax.OptState  # the wrapped optimizer's state
    key_data: jax.Array  # uint32 raw PRNG key data (jax.random.key_data)

    @property
    def masks(self) -> optax.Params:
        """The bool masks (params' structure; non-prunable leaves a scalar ``True``)."""
        return _masks.unpack(unwrap_variables(self.packed_masks))


# jp.get_masks (and the checkpoint and report tools) find this state too.
register_mask_state(DynamicSparseState)
get_masks = _get_masks


def _dynamic(
    tx,
    *,
    sparsity,
    key,
    regrow,
    update_every,
    end_step,
    drop_fraction,
    cosine,
    distribution,
    where,
    stacked,
    name,
    begin_step=0,
) -> optax.GradientTransformationExtraArgs:
    _check_tx(tx, f"jp.dynamic.{name}")
    _validate(
        sparsity,
        update_every,
        end_step,
        drop_fraction,
        regrow,
        key,
        distribution,
        where,
        stacked,
        cosine=cosine,
    )
    update_every = int(update_every)
    end_step = None if end_step is None else int(end_step)
    begin_step = _check_begin_step(begin_step, end_step)
    inner = optax.with_extra_args_support(tx)
    key_data, key_impl = key_parts(key, "key")
    # With `stacked`, `where` is asked about one layer of each leaf.
    leaf_where = where if stacked is None else layer_where_of(where, stacked)
    # Each warning once per transform, not at every init or retrace.
    warned = {"stacked": False, "never": False}

    def depths_of(tree):
        if stacked is None:
            return [0] * len(jax.tree.leaves(tree))
        return [_depth(stacked, p, x) for p, x in leaves_with_paths(tree)[0]]

    def init_fn(params):
        pure = unwrap_variables(params)
        depths = depths_of(pure)
        if stacked is not None and not warned["stacked"]:
            warned["stacked"] = _warn_no_stack(
                leaves_with_paths(pure)[0], depths, f"jp.dynamic.{name}", stacklevel=3
            )
        flags = prunable_flags(pure, leaf_where)
        if not any(flags):
            _warn_nothing_prunable(pure, name, None if stacked is None else depths)
        init_key = jax.random.fold_in(key, 0x5EED)
        if stacked is None:
            per_leaf = distribution(pure, float(sparsity), where=where)
            _check_per_leaf(pure, flags, per_leaf, name)
            _check_total(pure, flags, per_leaf, float(sparsity), distribution, name)
            masks = _random_masks(pure, init_key, per_leaf, flags, where)
        else:
            scores = _criteria.random(pure, key=init_key)
            per_leaf = _per_layer_sparsities(
                pure, depths, distribution, float(sparsity), where, name
            )
            masks = _initial_masks(scores, per_leaf, flags, depths)
        # Laid out like concrete sharded params (as jp.prune's initial masks are).
        masks = _placed_like(masks, pure)
        return DynamicSparseState(
            count=jnp.zeros((), jnp.int32),
            packed_masks=_masks.pack(masks),
            inner_state=inner.init(params),
            # A copy: key_data shares the caller's key buffer, which donating this
            # state would otherwise free (for the caller and every later init).
            key_data=jax.tree.map(jnp.copy, key_data),
        )

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError(
                "dynamic sparse training needs the current params (magnitudes to drop): call "
                "tx.update(grads, state, params)."
            )
        never = begin_step == 0 and end_step is not None and end_step <= update_every
        if never and not warned["never"]:
            # Here rather than when built: a transform only initialized (to read
            # its initial masks) does not train, and rewires nothing either way.
            warned["never"] = True
            _warn_never_rewires(name, end_step, update_every)
        _check_state_type(state, "packed_masks", f"jp.dynamic.{name}", "DynamicSparseState")
        params = unwrap_variables(params)
        # At trace time, as jp.prune: a state of other params (another model's
        # checkpoint) would fail inside lax.cond with JAX's own message.
        check_same_leaves(
            updates,
            params,
            "updates",
            "params",
            fix=f"pass jp.dynamic.{name}'s update the gradients of these params, "
            "tx.update(grads, state, params)",
        )
        _check_state_fits(state, params)
        flags = prunable_flags(params, leaf_where)
        depths = depths_of(params)
        step = state.count
        p_flat, treedef = jax.tree.flatten(params)
        # The trees handed to the inner optimizer and returned take the updates'
        # structure, as optax's do (an nnx.State of Params stays one), so the
        # updates apply to the params and the inner state keeps its structure.
        g_flat, u_treedef = jax.tree.flatten(updates)
        # Typed like the params on an Explicit mesh, so both cond branches agree.
        m_flat = jax.tree.leaves(_reshard_like(state.masks, params))
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.key_data, impl=key_impl), step)
        if cosine:
            frac = cosine_drop_fraction(step, alpha=float(drop_fraction), end_step=end_step)
        else:
            frac = jnp.float32(drop_fraction)
        # Rewiring at begin_step + k * update_every (never at step 0, whose
        # masks are the fresh initial ones), below end_step.
        in_window = step > 0 if begin_step == 0 else step >= begin_step
        if end_step is not None:
            in_window = in_window & (step < end_step)
        is_update = in_window & ((step - begin_step) % update_every == 0)

        def rewire():
            masks, changed = [], []
            leaves = zip(p_flat, g_flat, m_flat, flags, depths, strict=False)
            for i, (w, g, m, f, k) in enumerate(leaves):
                leaf_key = jax.random.fold_in(step_key, i)
                if f and k:
                    # Each layer drops and regrows floor(f(t) * its own active count):
                    # one vmapped program, whatever the number of layers.
                    def layers_drop_grow(w, g, m, leaf_key, frac, k=k):
                        keys = jax.random.split(leaf_key, jnp.shape(w)[:k])
                        drop_grow = _over_layers(
                            lambda w, g, m, key: _drop_grow(w, g, m, frac, key, regrow), k
                        )
                        return drop_grow(w, g, m, keys)

                    found = _explicit_axes(w)
                    if found is None:
                        new, ch = layers_drop_grow(w, g, m, leaf_key, frac)
                    else:
                        # Explicit mesh axes: vmap wants every mapped input sharded
                        # alike (the keys are not), so the layers run with the axes
                        # Auto; everything they read is passed in, none closed over.
                        mesh, axes = found
                        sh = _sharding_or_replicated(jax.typeof(m), mesh)
                        new, ch = _on_auto_axes(
                            layers_drop_grow, axes, (sh, sh), w, g, m, leaf_key, frac
                        )
                elif f:
                    new, ch = _drop_grow(w, g, m, frac, leaf_key, regrow)
                else:
                    new, ch = m, jnp.zeros_like(m)
                masks.append(new)
                changed.append(ch)
            return masks, changed

        def keep():
            return list(m_flat), [jnp.zeros_like(m) for m in m_flat]

        masks, changed = jax.lax.cond(is_update, rewire, keep)
        # The inner optimizer sees the sparse model after the rewiring: dropped
        # weights at 0, and only the weights active before and after (a regrown
        # weight starts at 0 with no step) have gradients. Optimizers reading
        # norms (LAMB, LARS, Novograd) then size the kept weights' steps as on the
        # sparse model alone.
        stay = [m & ~c for m, c in zip(masks, changed, strict=False)]
        zeroed = [
            jnp.where(s, g, jnp.zeros((), g.dtype)) if f else g
            for g, s, f in zip(g_flat, stay, flags, strict=False)
        ]
        sparse_params = [
            jnp.where(m, p, jnp.zeros((), p.dtype)) if f else p
            for p, m, f in zip(p_flat, masks, flags, strict=False)
        ]
        new_updates, inner_state = inner.update(
            jax.tree.unflatten(u_treedef, zeroed),
            state.inner_state,
            jax.tree.unflatten(u_treedef, sparse_params),
            **extra_args,
        )
        # After the step, so a rewired entry leaves this step with exactly zero moments.
        inner_state = _reset_moments(inner_state, (treedef, u_treedef), changed)
        u_flat = jax.tree.leaves(new_updates)
        # Active and not just regrown: the optimizer's step; otherwise land on exactly 0.
        # In the wider of the two dtypes (as jp.prune does): bf16 updates of f32
        # params would round -params, and dropped weights would not land on 0.
        out = [
            _fill(u, m & ~(c & m), -p) if f else u
            for u, p, m, c, f in zip(u_flat, p_flat, masks, changed, flags, strict=False)
        ]
        new_state = DynamicSparseState(
            count=optax.safe_increment(step),
            packed_masks=_masks.pack(jax.tree.unflatten(treedef, masks)),
            inner_state=inner_state,
            key_data=state.key_data,
        )
        return jax.tree.unflatten(u_treedef, out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, _jit_when_eager(update_fn))


def rigl(
    tx: optax.GradientTransformation,
    *,
    sparsity: float,
    key: jax.Array,
    end_step: int,
    update_every: int = 100,
    drop_fraction: float = 0.3,
    regrow: str = "gradient",
    distribution: Any = _dist.erk,
    where: Where | None = None,
    stacked: Stacked | None = None,
    begin_step: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """Returns ``tx`` trained sparse with RigL: drop by |w|, regrow by |dense gradient|.

    Every ``update_every`` steps before ``end_step``, each prunable leaf drops
    ``floor(f(t) * active)`` active weights of smallest magnitude (the product
    in float32: ``0.13 * 900`` is ``116.99999`` there, so 116), with the
    cosine fraction ``f(t) = drop_fraction / 2 * (1 + cos(pi t / end_step))``,
    and regrows as many inactive ones with the largest dense gradient
    (``regrow="random"`` draws them at random instead; the candidates include
    the entries just dropped, and one regrown at once keeps its value and
    moments). Regrown weights start at 0 and their optimizer moments are
    reset; per-leaf and total mask sparsity are exactly constant.

    Wrap the whole optimizer: ``rigl`` must be the last transform the updates
    pass through, ``rigl(optax.chain(optax.scale_by_adam(), optax.scale(-lr)),
    ...)`` (see the module docstring).

    Apply the initial masks right after ``init``, ``state = tx.init(params)``
    then ``params = jp.apply_masks(params, jp.get_masks(state))``: ``init``
    cannot change the params, and step 0 would otherwise run the dense model
    (its gradient seeds the optimizer's moments).

    Args:
      tx: the inner optimizer (adam, sgd with momentum, lion, adafactor,
        ``inject_hyperparams``-built ones, chains...).
      sparsity: the constant total fraction of pruned prunable weights, in
        ``[0, 1)``. The masks follow ``distribution``'s per-leaf sparsities;
        an ``explicit`` mapping ignores the total, so ``sparsity`` must then
        equal the mapping's size-weighted total (a ``ValueError`` at ``init``
        otherwise, rather than a silently overridden ``sparsity``).
      key: PRNG key for the initial random masks (and random regrowth).
      end_step: the step at which the cosine drop fraction reaches 0 and
        connectivity stops changing (RigL: 75% of training); required.
        Rewirings happen at the positive multiples of ``update_every`` below
        it, so ``end_step <= update_every`` never rewires (a warning).
      update_every: steps between drop/grow updates (RigL: 100).
      begin_step: the first rewiring step: rewirings happen at
        ``begin_step + k * update_every`` below ``end_step``; the default 0
        rewires at the positive multiples of ``update_every``. (jaxpruner's
        ``update_start_step`` keeps the absolute grid ``step % update_freq
        == 0`` from the start step on.) The masks stay the initial
        ones before it (the cosine fraction still counts from step 0). An
        int in ``[0, end_step)``.
      drop_fraction: the initial drop fraction ``alpha``, a number in
        ``[0, 1]`` (RigL: 0.3).
      regrow: ``"gradient"`` (RigL) or ``"random"``.
      distribution: a callable ``(params, sparsity, *, where) -> per-leaf
        sparsities`` spreading ``sparsity`` over the leaves
        (``jp.distributions.erk``, ``uniform``, or ``explicit({path: s})``,
        whose per-leaf values are used as given and must total
        ``sparsity``).
      where: predicate choosing the prunable leaves (default: floating leaves
        with ``ndim >= 2``); ``init`` warns when it chooses none. With
        ``stacked``, it is asked with a stacked leaf's path and one layer (a
        ``jax.ShapeDtypeStruct``), so the default takes a stack of kernels
        but not a stack of biases ``[L, out]``.
      stacked: predicate ``(path, leaf) -> bool | int`` telling which leaves
        stack layers along their first axis (``True``) or their first ``k``
        axes (``k``), as in ``jp.masks.per_layer`` (which does the same for
        ``jp.prune``'s selections); ``None`` (default): every leaf is one
        layer. Each layer is then sparsified and rewired as a leaf of its
        own: ``distribution`` sees the unrolled model, each layer at the
        stack's path with its index appended (``explicit`` names a layer
        ``"layers/kernel/0"``), the masks keep every layer's count exactly,
        and each rewiring drops and regrows ``floor(f(t) * active)`` of each
        layer. Paths are tuples of keys: an nnx stack attribute ``layers``
        gives ``path[0] == "layers"``, a linen ``nn.scan`` module named
        ``blocks`` paths starting ``("params", "blocks", ...)`` (``lambda
        path, leaf: "blocks" in path``); ``init`` warns when it matches no
        leaf.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state
      :class:`DynamicSparseState`; :func:`get_masks` reads its masks.

    Raises:
      ValueError: an argument is out of range or of the wrong kind (named in
        the message: e.g. a string or bool ``drop_fraction``, a
        ``distribution`` or ``stacked`` that is not callable, a selection
        such as ``jp.distributions.selection(erk)`` or ``jp.masks.topk`` as
        the ``distribution``); at ``init``,
        ``sparsity`` disagrees with the distribution's total, the
        distribution returns an array for a leaf (a selection of one's own,
        which returns masks), or
        ``stacked`` returns neither a bool nor an int in ``[0, ndim]``; at
        ``update``, the updates do not have the params' leaves or the
        state was built for other params (a leaf missing or resized).

    Warns:
      UserWarning: at ``init``, no leaf of the params is prunable (training
        would be dense), or ``stacked`` matches no leaf (a predicate written
        for another layout: linen ``nn.scan`` paths start with
        ``"params"``); at the first ``update``, ``end_step <= update_every``
        (no step can rewire). The last two once per transform.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, jaxprune as jp
      >>> params = {"w": jnp.ones((8, 8))}
      >>> tx = jp.dynamic.rigl(optax.adam(1e-2), sparsity=0.75, key=jax.random.key(0),
      ...                      end_step=10, update_every=2, distribution=jp.distributions.uniform)
      >>> state = tx.init(params)
      >>> params = jp.apply_masks(params, jp.get_masks(state))  # sparse from step 0
      >>> float(jp.sparsity(params))
      0.75
      >>> for _ in range(5):
      ...     updates, state = tx.update(params, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> float(jp.sparsity(params)), float(jp.sparsity(jp.dynamic.get_masks(state)))
      (0.75, 0.75)

      A stack of 3 layers (as ``nn.scan`` lays it out): each layer keeps its
      own count, and the stacked biases are not pruned.

      >>> stack = {"layers": {"kernel": jnp.ones((3, 8, 8)), "bias": jnp.ones((3, 8))}}
      >>> tx = jp.dynamic.rigl(optax.adam(1e-2), sparsity=0.75, key=jax.random.key(0),
      ...                      end_step=10, stacked=lambda path, leaf: path[0] == "layers")
      >>> masks = jp.dynamic.get_masks(tx.init(stack))["layers"]
      >>> (~masks["kernel"]).sum(axis=(1, 2)).tolist(), masks["bias"].shape
      ([48, 48, 48], ())

    References:
      Evci et al., "Rigging the Lottery: Making All Tickets Winners", 2020.
      https://arxiv.org/abs/1911.11134
    """
    return _dynamic(
        tx,
        sparsity=sparsity,
        key=key,
        regrow=regrow,
        update_every=update_every,
        end_step=end_step,
        drop_fraction=drop_fraction,
        cosine=True,
        distribution=distribution,
        where=where,
        stacked=stacked,
        name="rigl",
        begin_step=begin_step,
    )


def set(  # noqa: A001 (the algorithm's name; the builtin is not used in this module)
    tx: optax.GradientTransformation,
    *,
    sparsity: float,
    key: jax.Array,
    update_every: int,
    drop_fraction: float = 0.3,
    end_step: int | None = None,
    distribution: Any = _dist.erk,
    where: Where | None = None,
    stacked: Stacked | None = None,
    begin_step: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """Returns ``tx`` trained sparse with SET: drop a constant fraction by |w|, regrow at random.

    Every ``update_every`` steps (the paper: each epoch) each prunable leaf
    drops ``floor(drop_fraction * active)`` weights closest to zero (the
    product in float32, as in :func:`rigl`) and regrows
    as many at random; regrown weights start at 0 with reset moments. See
    :func:`rigl` for the arguments (``stacked`` included: each layer of a
    stack drops and regrows its own ``floor(drop_fraction * active)``),
    errors and warnings; here ``end_step`` is optional (``None``: update until
    training ends, SET's constant fraction needs no horizon).

    Wrap the whole optimizer: ``set`` must be the last transform the updates
    pass through, ``set(optax.chain(optax.scale_by_adam(), optax.scale(-lr)),
    ...)`` (see the module docstring). As for :func:`rigl`, apply the initial
    masks right after ``init``: ``params = jp.apply_masks(params,
    jp.get_masks(state))``.

    Args:
      tx: the inner optimizer, as for :func:`rigl`.
      sparsity: the constant total fraction of pruned prunable weights, a concrete
        real number in ``[0, 1)``, spread over the leaves by ``distribution``.
      key: PRNG key for the initial random masks and the random regrowth.
      update_every: steps between drop/regrow updates, a positive int.
      drop_fraction: the constant fraction of each leaf's active weights dropped and
        regrown per update, a real number in ``[0, 1]``; default 0.3 (0.0 keeps the
        initial random masks).
      end_step: the step from which connectivity stops changing, a positive int, or
        ``None`` (default): update until training ends.
      distribution: a callable ``(params, sparsity, *, where) -> per-leaf sparsities``;
        default ``jp.distributions.erk`` (see :func:`rigl`).
      where: predicate choosing the prunable leaves; default: floating leaves with
        ``ndim >= 2`` (see :func:`rigl`).
      stacked: predicate ``(path, leaf) -> bool | int`` telling which leaves stack
        layers along their leading axes; ``None`` (default): every leaf is one layer
        (see :func:`rigl`).
      begin_step: the first rewiring step, an int ``>= 0`` (below ``end_step`` when
        that is given); default 0: rewire at the positive multiples of
        ``update_every``. Before it the masks stay the initial ones.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, jaxprune as jp
      >>> tx = jp.dynamic.set(optax.sgd(0.1, momentum=0.9), sparsity=0.5,
      ...                     key=jax.random.key(0), update_every=1)
      >>> params = {"w": jnp.ones((4, 4))}
      >>> state = tx.init(params)
      >>> params = jp.apply_masks(params, jp.get_masks(state))  # sparse from step 0
      >>> updates, state = tx.update(params, state, params)
      >>> float(jp.sparsity(optax.apply_updates(params, updates)))
      0.5

    References:
      Mocanu et al., "Scalable training of artificial neural networks with
      adaptive sparse connectivity inspired by network science", 2018.
      https://arxiv.org/abs/1707.04780
    """
    return _dynamic(
        tx,
        sparsity=sparsity,
        key=key,
        regrow="random",
        update_every=update_every,
        end_step=end_step,
        drop_fraction=drop_fraction,
        cosine=False,
        distribution=distribution,
        where=where,
        stacked=stacked,
        name="set",
        begin_step=begin_step,
    )
