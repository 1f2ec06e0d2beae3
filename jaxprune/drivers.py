"""Drivers: loops around a user's train function (iterative pruning, lottery tickets, random masks).

The train function is the user's: ``train(params, masks) -> params`` trains
with exactly the given masks enforced and returns the trained params. Drivers
only decide which masks and which starting params each round gets, and check
that the trained params are zero wherever the round's masks are ``False``
(a ``ValueError`` naming the round and the leaf otherwise). Two ways to
enforce them:

- ``jp.apply_masks(params, masks)`` after every optimizer step;
- ``jp.prune`` with a scope that returns the driver's masks as they are::

      def train(params, masks):
          tx = jp.prune(optax.adam(1e-3), sparsity=0.0,
                        scope=lambda scores, sparsity, where=None: masks)
          ...  # the usual loop with tx (pass the driver's `where=` too, if any)

  (a ``criterion=`` that re-selects, such as masks-as-scores with the default
  ``scope="layer"``, re-chooses the survivors per layer and brings back
  weights the driver pruned).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxprune import criteria as _criteria
from jaxprune import masks as _masks
from jaxprune._mask_apply import _broadcast_prefix
from jaxprune._tree import (
    Where,
    as_int,
    check_array_leaves,
    check_same_structure,
    flagged,
    is_variable,
    key_parts,
    leaves_with_paths,
    prunable_flags,
    unwrap_variables,
)
from jaxprune.drivers_checks import (
    _check_criterion,
    _check_enforced,
    _check_like_params,
    _check_nested,
    _check_num_masks,
)

__all__ = ["Round", "iterative_pruning", "lottery_ticket", "random_masks", "average_over_masks"]


class Round(NamedTuple):
    """One round of :func:`iterative_pruning`.

    Args:
      index: the round's number, 0 for the dense round, then ``1`` to ``rounds``.
      sparsity: the masks' fraction of pruned prunable entries (0.0 in round 0).
      masks: the bool masks this round trained with, with the params' structure and
        the params' shapes on the prunable leaves (all ``True`` in round 0).
      params: the params after this round's training.
    """

    index: int  # 0 for the dense round
    sparsity: float  # the masks' fraction of pruned prunable entries
    masks: optax.Params  # the masks this round trained with (params' shapes on prunable leaves)
    params: optax.Params  # the params after this round's training


def _scope_fn(scope: str | Callable[..., Any]) -> Callable[..., Any]:
    if callable(scope):
        return scope
    if scope == "layer":
        return _masks.topk
    if scope == "global":
        return _masks.global_topk
    raise ValueError(
        f"scope must be 'layer', 'global' or a selection function, got {scope!r}. "
        "Fix: scope='global' (as the lottery-ticket paper's conv nets) or 'layer'."
    )


def _ones(params: Any) -> Any:
    return jax.tree.map(lambda x: jnp.ones(jnp.shape(x), bool), params)


def iterative_pruning(
    train: Callable[[Any, Any], Any],
    params: optax.Params,
    *,
    rounds: int,
    rate: float | Sequence[float],
    rewind_to: optax.Params | None = None,
    criterion: Callable[..., Any] = _criteria.magnitude,
    scope: str | Callable[..., Any] = "global",
    where: Where | None = None,
    trained: optax.Params | None = None,
    progress: bool = False,
) -> list[Round]:
    """Returns the rounds of prune -> (rewind) -> train, repeated ``rounds`` times.

    Round 0 trains ``params`` dense (or takes ``trained``, if given). Round
    ``r >= 1`` prunes about ``rate`` of the weights still alive after round
    ``r-1``: the ``n`` prunable entries in total (``scope="global"``, the
    default) or of each leaf (``scope="layer"``) go to
    ``round((1 - (1 - rate)**r) * n)`` pruned entries (so a small leaf can
    differ by one from torch's per-call ``round(rate * remaining)``), by
    ``criterion`` on the trained params,
    then trains again starting from ``rewind_to`` masked (lottery-ticket
    rewinding: ``theta_0`` or ``theta_k``), or, when ``rewind_to`` is ``None``,
    from the trained params masked (Han et al.'s prune-retrain).

    Params may be any pytree: dicts (linen), or an ``nnx.State`` (Variable-wrapped
    as ``nnx.state(model, nnx.Param)`` gives it, or pure). ``train`` always gets
    params in the form ``params`` came in, with fresh Variables, and may return
    either form; each round records what ``train`` returned, detached from the
    model (``nnx.state`` shares its Variables with the model, so a model trained
    in place would otherwise change ``theta_0`` and earlier rounds). Masks are
    Variable-free trees of bools (``jp.apply_masks`` takes them with either form).

    Args:
      train: ``train(params, masks) -> trained params`` with the masks enforced
        (for nnx: ``nnx.update(model, params)``, train, ``return nnx.state(model,
        nnx.Param)``); see the module docstring for two ways to enforce them.
        The trained params must be exactly zero where ``masks`` is ``False`` on
        the prunable leaves (checked after every pruned round).
      params: the initial params (``theta_0``).
      rounds: number of pruning rounds after the dense one.
      rate: fraction of the surviving prunable weights removed each round, in
        (0, 1); or a sequence (list, tuple, 1-D array) of ``rounds``
        non-decreasing target sparsities in (0, 1) (a repeated target keeps
        the masks and trains again).
      rewind_to: params to restart every pruned round from; ``None`` continues
        from the trained weights.
      criterion: ``params -> scores`` (higher kept) on the trained params,
        called with the params alone: bind what else it needs, e.g.
        ``lambda p: jp.criteria.saliency(p, jax.grad(loss)(p, x, y))``
        (stateful criteria such as ``movement()`` are refused).
      scope: ``"global"``, ``"layer"`` or a selection function
        (``scores, sparsity, *, where -> masks``, e.g. ``functools.partial(
        jp.masks.structured, axes=-1)``). Already-pruned entries are scored
        ``-inf``, so the selection must prune ``-inf`` first (the built-in
        ones do), which keeps the masks nested.
      where: predicate choosing the prunable leaves.
      trained: round 0's trained params, to skip its training.
      progress: show a tqdm bar over rounds.

    Returns:
      ``rounds + 1`` :class:`Round` records, dense first.

    Raises:
      ValueError: ``rounds`` or ``rate`` out of range or of the wrong kind;
        ``criterion`` is stateful, a factory, or needs more than the params;
        ``params`` holds a leaf that is not an array, such as a whole equinox
        module's activation function (all checked before any training);
        ``train`` returns ``None`` or params of another structure or shape than
        ``params`` (as may ``rewind_to``, ``trained`` and the criterion's scores);
        ``train`` returns params that are not zero where the round's masks are
        ``False`` on a prunable leaf (it did not enforce the masks); ``scope``
        keeps an entry the previous round pruned (masks not nested).

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> train = lambda p, m: jp.apply_masks(p, m)  # a stand-in for real training
      >>> rs = jp.drivers.iterative_pruning(train, {"w": jnp.arange(1., 17.).reshape(4, 4)},
      ...                                   rounds=2, rate=0.5)
      >>> [r.sparsity for r in rs], [int((r.params["w"] != 0).sum()) for r in rs]
      ([0.0, 0.5, 0.75], [16, 8, 4])

    References:
      Han et al. 2015, https://arxiv.org/abs/1506.02626; Frankle & Carbin,
      "The Lottery Ticket Hypothesis", 2019, https://arxiv.org/abs/1803.03635;
      Frankle et al., "Stabilizing the Lottery Ticket Hypothesis" (rewinding to
      theta_k), 2019, https://arxiv.org/abs/1903.01611
    """
    n_rounds = as_int(rounds)  # NumPy and concrete JAX integers too; None for bools
    if n_rounds is None or n_rounds < 0:
        raise ValueError(f"rounds must be a non-negative int, got {rounds!r}. Fix: e.g. rounds=5.")
    rounds = n_rounds
    # Before round 0's training, the most expensive part, so a criterion the
    # rounds cannot call fails at once.
    _check_criterion(criterion)
    targets = _targets(rate, rounds)
    select = _scope_fn(scope)
    # Work on Variable-free snapshots: an nnx.State from nnx.state(model) shares its
    # Variables with the model, so training the model in place would otherwise
    # change theta_0 (and every earlier round's params) behind the driver's back.
    pure_params = unwrap_variables(params)
    # A whole equinox module holds its activation functions: the criterion would
    # refuse them only after round 0's training.
    check_array_leaves(pure_params, "params")
    flags = prunable_flags(pure_params, where)
    counted = flagged(pure_params, flags)  # `where` would judge the scores' and masks' dtypes
    pure_rewind = None
    if rewind_to is not None:
        pure_rewind = unwrap_variables(rewind_to)
        _check_like_params(pure_params, pure_rewind, "rewind_to")
    masks = _ones(pure_params)
    if trained is not None:
        current = _detached(trained, "trained", pure_params)
    else:
        current = _detached(
            train(_like(params, pure_params), masks), "train(params, masks)", pure_params
        )
    out = [Round(0, 0.0, masks, current)]
    for r in tqdm(range(1, rounds + 1), desc="pruning rounds", disable=not progress):
        target = targets[r - 1]
        scores = unwrap_variables(criterion(current))
        check_same_structure(
            pure_params,
            scores,
            ref_name="params",
            other_name="criterion(params)",
            fix="make criterion return one score array per parameter leaf, in the params' "
            "tree structure (as jp.criteria.magnitude does)",
        )
        # Already-pruned entries go first whatever their score, so masks are nested.
        scores = jax.tree.map(
            lambda s, m, f: jnp.where(m, s.astype(jnp.float32), -jnp.inf) if f else s,
            scores,
            masks,
            _tree_of(pure_params, flags),
        )
        previous, masks = masks, _full(pure_params, select(scores, target, where=counted), flags)
        _check_nested(pure_params, previous, masks, flags, r)
        start = pure_rewind if pure_rewind is not None else unwrap_variables(current)
        # Masks come back Variable-free; `train` gets params in the form it was first given.
        current = _detached(
            train(_like(params, _masks.apply_masks(start, masks)), masks),
            "train(params, masks)",
            pure_params,
        )
        _check_enforced(current, masks, flags, r)
        out.append(Round(r, float(_masks.sparsity(masks, where=counted)), masks, current))
    return out


def _full(pure_params: Any, masks: Any, flags: list[bool]) -> Any:
    """Returns ``masks`` with a scalar mask on a prunable leaf broadcast to the leaf's shape.

    A selection may keep a prunable leaf whole with a scalar ``True``
    (``patterns`` on a Dense kernel, ``nm(skip_indivisible=True)`` on an RGB
    conv); counted as one entry, it would inflate ``Round.sparsity``. Other
    leaves' masks are kept as the selection gave them.
    """
    masks = _broadcast_prefix(pure_params, masks)
    check_same_structure(
        pure_params,
        masks,
        ref_name="params",
        other_name="scope(scores, sparsity, where=...)",
        fix="make the scope return one bool mask per params leaf (or a scalar), in the "
        "params' tree structure, as jp.masks.topk does",
    )
    p_flat = [x for _, x in leaves_with_paths(pure_params)[0]]
    m_flat, treedef = leaves_with_paths(masks)
    # Not cast: a non-bool mask still reaches apply_masks' dtype error.
    out = [
        jnp.broadcast_to(m, jnp.shape(p)) if f and jnp.ndim(m) == 0 else m
        for (_, m), p, f in zip(m_flat, p_flat, flags, strict=True)
    ]
    return jax.tree.unflatten(treedef, out)


def _targets(rate: Any, rounds: int) -> list[float]:
    """Returns the per-round target sparsities of ``rate`` (a float or a sequence)."""
    if isinstance(rate, (jax.Array, np.ndarray)) and np.ndim(rate) == 1:
        rate = [float(x) for x in np.asarray(rate)]  # a 1-D array is a sequence of targets
    if isinstance(rate, (list, tuple)):
        try:
            targets = [float(x) for x in rate]
        except (TypeError, ValueError):
            targets = []
        if (
            len(targets) != rounds
            or any(not 0.0 < t < 1.0 for t in targets)
            or any(b < a for a, b in zip(targets, targets[1:], strict=False))
        ):
            raise ValueError(
                f"rate as a sequence must hold {rounds} non-decreasing per-round target "
                f"sparsities in (0, 1) (each round prunes up to its target), got {rate!r}. Fix: "
                "e.g. rate=[0.5, 0.75, 0.875] for rounds=3."
            )
        return targets
    try:
        value = float(rate) if np.ndim(rate) == 0 and not isinstance(rate, str) else None
    except (TypeError, ValueError):
        value = None
    if value is None:
        raise ValueError(
            f"rate must be a float in (0, 1) or a sequence (list, tuple or 1-D array) of "
            f"{rounds} non-decreasing target sparsities, got {rate!r} (shape {np.shape(rate)}). "
            "Fix: e.g. rate=0.2, or rate=[0.5, 0.75] for rounds=2."
        )
    if not 0.0 < value < 1.0:
        raise ValueError(
            f"rate must be in (0, 1) (the fraction of surviving weights pruned per round), got "
            f"{rate!r}. Fix: e.g. rate=0.2 as in the lottery-ticket paper."
        )
    return [1.0 - (1.0 - value) ** r for r in range(1, rounds + 1)]


def _tree_of(params: Any, values: Sequence[Any]) -> Any:
    return jax.tree.unflatten(jax.tree.structure(params), list(values))


def _like(template: Any, pure: Any) -> Any:
    """Returns the Variable-free ``pure`` in ``template``'s form (fresh nnx Variables rewrapped).

    ``pure`` must have the structure of ``unwrap_variables(template)``; templates
    without nnx Variables (dicts, linen params, pure ``nnx.State``) give ``pure``.
    """
    t_leaves, t_def = jax.tree.flatten(template, is_leaf=is_variable)
    if not any(is_variable(v) for v in t_leaves):
        return pure
    values = jax.tree.leaves(pure)
    return jax.tree.unflatten(
        t_def,
        [v.replace(x) if is_variable(v) else x for v, x in zip(t_leaves, values, strict=True)],
    )


def _detached(tree: Any, name: str, pure_params: Any) -> Any:
    """Returns ``tree`` (params from ``train`` or ``trained``) checked, in its own form.

    nnx Variables are replaced by fresh ones holding the same (immutable) arrays,
    so later in-place training of the model cannot change a recorded round.
    """
    if tree is None:  # only train's result can be None here (trained=None means "train it")
        raise ValueError(
            f"{name} returned None, but the driver needs the trained params. Fix: end train "
            "with `return params` (for nnx: `return nnx.state(model, nnx.Param)`)."
        )
    pure = unwrap_variables(tree)
    _check_like_params(pure_params, pure, name)
    return _like(tree, pure)


def lottery_ticket(
    train: Callable[[Any, Any], Any],
    init_params: optax.Params,
    *,
    rounds: int,
    rate: float | Sequence[float] = 0.2,
    rewind_to: optax.Params | None = None,
    scope: str | Callable[..., Any] = "global",
    where: Where | None = None,
    trained: optax.Params | None = None,
    progress: bool = False,
) -> list[Round]:
    """Returns iterative magnitude pruning rounds, each restarted from ``theta_0`` or ``theta_k``.

    :func:`iterative_pruning` with magnitude scores and rewinding to
    ``init_params`` (``theta_0``), or to ``rewind_to`` (``theta_k``, the params
    after ``k`` early training steps, which the paper shows is needed for
    deeper networks).

    Args:
      train: ``train(params, masks) -> trained params`` with the masks enforced,
        as in :func:`iterative_pruning`.
      init_params: the initial params (``theta_0``).
      rounds: number of pruning rounds after the dense one.
      rate: fraction of the surviving prunable weights removed each round, in
        (0, 1) (default 0.2, the paper's rate for fully connected layers), or a
        sequence of ``rounds`` target sparsities, as in :func:`iterative_pruning`.
      rewind_to: params to restart every pruned round from (``theta_k``);
        ``None`` (default) rewinds to ``init_params``.
      scope: ``"global"`` (default: one ranking across all prunable leaves, as
        the paper prunes VGG-19 and ResNet-18), ``"layer"`` (the same rate in
        every leaf; the paper's LeNet and Conv-2/4/6 rates differ by layer
        type) or a selection function.
      where: which leaves are prunable (default: floating leaves with
        ``ndim >= 2``).
      trained: the already trained dense params of round 0 (skips its training).
      progress: show a progress bar over the rounds.

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> theta0 = {"w": jnp.ones((2, 4))}
      >>> train = lambda p, m: jp.apply_masks(
      ...     {"w": p["w"] * jnp.arange(1., 9.).reshape(2, 4)}, m)  # trains w to 1..8
      >>> r = jp.drivers.lottery_ticket(train, theta0, rounds=1, rate=0.5)[1]
      >>> r.masks["w"].tolist()
      [[False, False, False, False], [True, True, True, True]]
      >>> r.params["w"].tolist()  # survivors restarted from theta_0, then trained
      [[0.0, 0.0, 0.0, 0.0], [5.0, 6.0, 7.0, 8.0]]

    References:
      Frankle & Carbin 2019, https://arxiv.org/abs/1803.03635; Frankle et al.
      2019 (rewinding), https://arxiv.org/abs/1912.05671
    """
    return iterative_pruning(
        train,
        init_params,
        rounds=rounds,
        rate=rate,
        rewind_to=init_params if rewind_to is None else rewind_to,
        criterion=_criteria.magnitude,
        scope=scope,
        where=where,
        trained=trained,
        progress=progress,
    )


def random_masks(
    params: optax.Params,
    sparsity: Any,
    *,
    key: jax.Array,
    num_masks: int = 1,
    scope: str | Callable[..., Any] = "layer",
    where: Where | None = None,
) -> list[optax.Params]:
    """Returns ``num_masks`` independent random masks, each with exact counts.

    Mask ``i`` draws its scores from ``jax.random.fold_in(key, i)``, so the
    same key always gives the same masks.

    Args:
      params: the params to mask (any pytree).
      sparsity: fraction of prunable entries pruned, in ``[0, 1]``.
      key: a PRNG key.
      num_masks: how many independent masks to draw.
      scope: ``"layer"`` (default: ``round(sparsity * n)`` pruned in each
        leaf), ``"global"`` (``round(sparsity * N)`` in total) or a selection
        function ``(scores, sparsity, *, where) -> masks``.
      where: which leaves are prunable (default: floating leaves with
        ``ndim >= 2``).

    Raises:
      ValueError: ``key`` is not a PRNG key (``jax.random.key(seed)``, or a raw
        ``uint32[2]`` key), or ``num_masks`` is not a positive int (a bool is
        not one).

    Examples:
      >>> import jax, jax.numpy as jnp, jaxprune as jp
      >>> ms = jp.drivers.random_masks({"w": jnp.ones((4, 4))}, 0.5, key=jax.random.key(0),
      ...                              num_masks=3)
      >>> [int(m["w"].sum()) for m in ms]
      [8, 8, 8]

    References:
      Blalock et al., "What is the State of Neural Network Pruning?", 2020.
      https://arxiv.org/abs/2003.03033
    """
    _check_num_masks(num_masks)
    key_parts(key, "key")  # a ValueError naming `key` for anything that is not a PRNG key
    select = _scope_fn(scope)
    return [
        select(_criteria.random(params, key=jax.random.fold_in(key, i)), sparsity, where=where)
        for i in range(int(num_masks))
    ]


def average_over_masks(
    evaluate: Callable[[Any], float],
    params: optax.Params,
    sparsity: Any,
    *,
    key: jax.Array,
    num_masks: int = 5,
    scope: str | Callable[..., Any] = "layer",
    where: Where | None = None,
) -> tuple[float, float, list[float]]:
    """Returns ``(mean, std, values)`` of ``evaluate(masks)`` over random masks.

    Randomized pruning is a distribution, not one number: evaluate several
    random masks (e.g. each fine-tuned and tested) and report mean and spread.

    Args:
      evaluate: ``masks -> metric`` (e.g. train with the masks, return test accuracy).
      params: params (shapes only).
      sparsity: fraction to prune.
      key: PRNG key; mask ``i`` uses ``fold_in(key, i)``.
      num_masks: number of masks, a positive int.
      scope: ``"layer"``, ``"global"`` or a selection function.
      where: predicate choosing the prunable leaves.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxprune as jp
      >>> w = {"w": jnp.arange(16.).reshape(4, 4)}
      >>> kept = lambda m: float(jp.apply_masks(w, m)["w"].sum())
      >>> mean, std, vals = jp.drivers.average_over_masks(kept, w, 0.5, key=jax.random.key(0))
      >>> len(vals), 0 < mean < 120
      (5, True)
    """
    _check_num_masks(num_masks)
    key_parts(key, "key")
    values = [
        float(evaluate(m))
        for m in random_masks(
            params, sparsity, key=key, num_masks=num_masks, scope=scope, where=where
        )
    ]
    return float(np.mean(values)), float(np.std(values)), values
