"""``shrink``: physically remove pruned channels, so the network is smaller and faster.

For every prunable dependency group (see :mod:`jaxprune.structure.graph`) and
every channel of it, the channel can go when each contraction that sums over
it (the next Dense layer's input rows, the next conv's input channels) gets
from it either exactly zero (its activation is constant zero, or the weights
reading it are masked out) or a constant that can be folded into the bias (or
BatchNorm mean) added right after that contraction: e.g. a ReLU unit whose
incoming weights are all masked outputs ``relu(b)`` for every input, and
``relu(b) * W_next[i]`` is added to the next layer's bias. Whether a fold is
position-independent is read from the program, never from the example's sizes
(a 1x1 example feature map has no border): it happens for Dense layers and
unpadded, undilated convolutions, never through a padded (SAME) or
input-dilated (transposed) convolution, whose border positions see fewer taps.
A constant that has passed through such a padded op on its way (so it differs
at the borders, and its spatial mean with the input size) counts as varying.
Channels are decided group by group in program order on an exact simulation
of the shrunk network, so folds never see stale values. The check of the
result, and the errors naming the groups that break it, are in
:mod:`jaxprune.structure.checking`.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxprune._tree import check_same_structure, leaves_with_paths, path_str
from jaxprune.bitmask import _ways
from jaxprune.masks import apply_masks
from jaxprune.structure.borders import _border_aware, _pads
from jaxprune.structure.checking import AdaptError as AdaptError
from jaxprune.structure.checking import (
    ApplyFailure,
    OutputMismatch,
    _check_outputs,
    _culprits,
    _named,
)
from jaxprune.structure.evaluate import make_evaluator, run_cached
from jaxprune.structure.graph import OUTPUT_REASON, Analysis, channel_indices, find_groups
from jaxprune.structure.program import Program, trace, where

__all__ = ["shrink", "plan"]

_PASS = frozenset({"reshape", "broadcast_in_dim", "convert_element_type", "copy", "copy_p"})


def _fold_target(prog: Program, consumers, producers, e: int):
    """Returns ``(leaf, sign, operand shape)`` of the bias added right after contraction ``e``."""
    y = prog.eqns[e].outs[0]
    users = consumers.get(y, [])
    if len(users) != 1:
        return None
    add = prog.eqns[users[0]]
    if add.prim.name not in ("add", "sub") or len(add.ins) != 2:
        return None
    if add.prim.name == "sub" and add.ins[0] != y:
        return None
    other = add.ins[1] if add.ins[0] == y else add.ins[0]
    sign = -1.0 if add.prim.name == "sub" else 1.0
    shape = prog.shapes[other]
    v = other
    while v not in prog.param_ids:
        if len(consumers.get(v, [])) != 1 or v not in producers:
            return None
        src = prog.eqns[producers[v]]
        if src.prim.name not in _PASS or len(src.ins) != 1:
            return None
        v = src.ins[0]
    if len(consumers.get(v, [])) != 1 or int(np.prod(prog.shapes[v])) != int(np.prod(shape)):
        return None
    if len(shape) != len(prog.shapes[y]):
        return None
    return prog.param_ids.index(v), sign, shape


def _reduce_delta(delta: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    """Returns ``delta`` reduced to the bias operand's ``shape``, or None if it is not constant."""
    red = delta
    for ax, n in enumerate(shape):
        if n == 1 and red.shape[ax] != 1:
            first = np.take(red, [0], axis=ax)
            scale = max(float(np.max(np.abs(red))), 1e-30)
            if not np.allclose(red, first, rtol=1e-5, atol=1e-6 * scale):
                return None
            red = first
    return red if red.shape == tuple(shape) else None


def _take(x: np.ndarray, axis: int, idx: list[int]) -> np.ndarray:
    return np.take(x, idx, axis=axis)


def _only(x: np.ndarray, axis: int, idx: list[int]) -> np.ndarray:
    keep = np.zeros(x.shape[axis], x.dtype)
    keep[idx] = 1
    shape = [1] * x.ndim
    shape[axis] = -1
    return x * keep.reshape(shape)


def _warn_dead_outputs(groups, mask_leaves: list) -> None:
    """Warns when the masks zero every weight of some output units, which no shrink can cut.

    The model's output fixes their group's width (a classifier's classes), so
    :func:`shrink` keeps such units as they are: they give only their bias.
    """
    found = []
    for g in groups:
        if g.prunable or not any(OUTPUT_REASON in r for r in g.reasons):
            continue
        kernels = [m for m in g.members if np.ndim(mask_leaves[m.leaf]) >= 2]
        if not kernels:
            continue
        dead = np.ones(g.channels, bool)
        for m in kernels:
            mask = np.asarray(jax.device_get(mask_leaves[m.leaf]), bool)
            live = mask.any(axis=tuple(a for a in range(mask.ndim) if a != m.axis))
            size = mask.shape[m.axis]
            dead &= np.array(
                [not live[channel_indices(m.layout, size, c)].any() for c in range(g.channels)]
            )
        if dead.any():
            paths = ", ".join(sorted({path_str(m.path) for m in kernels}))
            found.append(f"{int(dead.sum())} of {g.channels} output units ({paths})")
    if found:
        warnings.warn(
            f"the masks zero every weight of {'; '.join(found[:3])}: shrink keeps them, since "
            "the model's output fixes their width, as units that give only their bias. Fix: "
            "leave the output layer out of the masks (where=...), or cut those units from the "
            "model's output by hand if they are not needed.",
            stacklevel=_user_level(),
        )


def _user_level() -> int:
    """Returns the ``stacklevel`` of the first caller outside jaxprune (shrink has several
    entry points: shrink, shrink_module, the linen form)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame, level = sys._getframe(2), 2  # the caller of the function that warns
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def plan(
    apply_fn: Any, params: Any, masks: Any, *example_inputs: Any, analysis: Analysis | None = None
) -> tuple[list[np.ndarray], dict[tuple[int, int], set[int]], Program]:
    """Returns ``(working leaves, removed indices per (leaf, axis), program)`` for :func:`shrink`.

    The working leaves are the masked params with every fold applied; cutting
    the removed indices out of them gives the shrunk params.
    """
    check_same_structure(params, masks, ref_name="params", other_name="masks")
    masked = run_cached(apply_masks, params, masks)
    prog = trace(apply_fn, masked, *example_inputs)
    an = analysis if analysis is not None else find_groups(prog, warn=True)
    _warn_dead_outputs(an.groups, [m for _, m in leaves_with_paths(masks)[0]])
    consumers = prog.consumers()
    producers = {o: i for i, e in enumerate(prog.eqns) for o in e.outs}
    leaves = [np.array(x) for _, x in leaves_with_paths(masked)[0]]
    inputs = [jnp.asarray(x) for x in jax.tree.leaves(example_inputs)]
    sh = prog.shapes
    eval_prog, index, extra = _border_aware(prog)
    inputs += [jnp.asarray(x) for x in extra]

    terms_by_root: dict[Any, list] = {}
    for e, le, re in an.contractions:
        terms_by_root.setdefault(an.uf.find(le), []).append((e, le, re))
    want = sorted(
        {t[1][0] for ts in terms_by_root.values() for t in ts}
        | {t[2][0] for ts in terms_by_root.values() for t in ts}
    )
    run = make_evaluator(eval_prog, tuple(want))
    keeps: dict[str, dict[str, np.ndarray]] = {}
    for e, le, _ in an.contractions:
        keeps.setdefault(str(e), {})[str(le[1])] = np.ones(sh[le[0]][le[1]], np.float32)

    order = [
        (min(t[0] for t in terms_by_root[r]), g, r)
        for g, r in zip(an.groups, an.roots, strict=True)
        if g.prunable and r in terms_by_root
    ]
    order.sort(key=lambda t: t[0])
    removed: dict[tuple[int, int], set[int]] = {}
    done: dict[Any, set[int]] = {}
    member_of: dict[int, list] = {}
    for g, r in zip(an.groups, an.roots, strict=True):
        for m in g.members:
            member_of.setdefault(m.leaf, []).append((r, m))
    targets: dict[int, Any] = {}
    kept_constant: list[tuple[Any, int, list[str]]] = []
    res = None
    for _, group, root in order:
        if res is None:
            moved = {str(j): v for k, v in keeps.items() for j in index[int(k)]}
            res = jax.device_get(run([jnp.asarray(x) for x in leaves], inputs, moved))
        cut, changed, unfolded = [], False, 0
        for c in range(group.channels):
            folds, ok, live = [], True, False
            for e, (lv, la, llay), (rv, ra, rlay) in terms_by_root[root]:
                kind = _term_kind(res, sh, (lv, la, llay), (rv, ra, rlay), c)
                if kind == "zero":
                    continue
                if kind == "live":
                    ok, live = False, True
                    break
                li = channel_indices(llay, sh[lv][la], c)
                if e not in targets:
                    # A padded or transposed conv adds a constant channel with fewer
                    # taps at the borders: no bias can hold that, at any input size.
                    foldable = not _pads(prog.eqns[e])
                    targets[e] = _fold_target(prog, consumers, producers, e) if foldable else None
                tgt = targets[e]
                if tgt is None:
                    ok = False
                    break
                eq = prog.eqns[e]
                lhs = _only(np.asarray(res[eq.ins[0]][0]), la if lv == eq.ins[0] else ra, li)
                rhs = np.asarray(res[eq.ins[1]][0])
                delta = np.asarray(eq.prim.bind(jnp.asarray(lhs), jnp.asarray(rhs), **eq.params))
                d = _reduce_delta(delta, tgt[2])
                if d is None or not _fold_allowed(tgt[0], d, leaves, member_of, done, root):
                    ok = False
                    break
                folds.append((tgt[0], tgt[1] * d))
            if not ok:
                # Kept although constant (e.g. its weights masked): it cannot fold.
                unfolded += not live and not _any_live(terms_by_root[root], res, sh, c)
                continue
            for leaf, d in folds:
                x = leaves[leaf]
                leaves[leaf] = x + d.reshape(x.shape).astype(x.dtype)
                changed = True
            for e, (lv, la, llay), _ in terms_by_root[root]:
                keeps[str(e)][str(la)][channel_indices(llay, sh[lv][la], c)] = 0.0
            cut.append(c)
        done[root] = set(cut)
        if unfolded:
            named = [m for m in group.members if leaves[m.leaf].ndim >= 2] or group.members
            kept_constant.append((group, unfolded, sorted({path_str(m.path) for m in named})))
        for m in group.members:
            idx = removed.setdefault((m.leaf, m.axis), set())
            for c in cut:
                idx.update(channel_indices(m.layout, leaves[m.leaf].shape[m.axis], c))
        if changed:
            res = None
    _warn_kept_constants(kept_constant)
    return leaves, removed, prog


def _term_kind(res, sh, lhs, rhs, c: int) -> str:
    """What channel ``c`` adds to a contraction of ``lhs`` and ``rhs`` (``(var, axis, layout)``).

    ``"zero"``: exactly nothing (a side is the constant 0); ``"live"``: a value
    that depends on the inputs; ``"constant"``: the same nonzero value always.
    """
    (lv, la, llay), (rv, ra, rlay) = lhs, rhs
    lval, lvar = (_take(np.asarray(a), la, channel_indices(llay, sh[lv][la], c)) for a in res[lv])
    rval, rvar = (_take(np.asarray(a), ra, channel_indices(rlay, sh[rv][ra], c)) for a in res[rv])
    l_const, r_const = not lvar.any(), not rvar.any()
    if (l_const and not lval.any()) or (r_const and not rval.any()):
        return "zero"
    return "constant" if l_const and r_const else "live"


def _any_live(terms, res, sh, c: int) -> bool:
    """Whether channel ``c`` feeds any of its contractions ``terms`` an input-dependent value."""
    return any(_term_kind(res, sh, lhs, rhs, c) == "live" for _, lhs, rhs in terms)


def _warn_kept_constants(kept: list[tuple[Any, int, list[str]]]) -> None:
    """Warns about channels the masks make constant but whose constant output cannot fold.

    Such a channel (its incoming weights masked, or all its inputs constant)
    still outputs a nonzero constant (``relu(bias)``, a BatchNorm shift), and
    the next layer cannot take it into its bias (a padded or transposed conv
    sees it differently at the border; the bias is used elsewhere, or there is
    none), so :func:`shrink` keeps it to stay exact.
    """
    if not kept:
        return
    listed = "; ".join(
        f"{n} of {g.channels} channels of {', '.join(paths[:4])}" for g, n, paths in kept[:3]
    )
    total = sum(n for _, n, _ in kept)
    warnings.warn(
        f"shrink kept {total} channels that the masks leave with a constant output ({listed}"
        f"{'; ...' if len(kept) > 3 else ''}): each still outputs a nonzero constant (e.g. "
        "its bias or BatchNorm shift through the activation, its incoming weights all masked) "
        "that the next layer cannot fold into a bias (it has none, e.g. use_bias=False; it is "
        "a padded or transposed conv; or its bias is used elsewhere), so cutting it would "
        "change the outputs. Fix: mask whole channel "
        "groups (jp.structure.select, or scope=jp.structure.selection(groups) in jp.prune), "
        "whose masks zero the bias and shift too; those channels are then cut.",
        stacklevel=_user_level(),
    )


def _fold_allowed(leaf, d, leaves, member_of, done, root) -> bool:
    """A fold may not land on a channel already removed, nor on the group being decided."""
    flat = np.asarray(d).reshape(leaves[leaf].shape)
    for r, m in member_of.get(leaf, []):
        if r == root:
            return False
        if r not in done or not done[r]:
            continue
        others = tuple(a for a in range(flat.ndim) if a != m.axis)
        touched = np.nonzero(np.any(flat != 0, axis=others))[0]
        size = flat.shape[m.axis]
        gone = {i for c in done[r] for i in channel_indices(m.layout, size, c)}
        if gone.intersection(touched.tolist()):
            return False
    return True


def _cut(leaves: list[np.ndarray], removed: dict[tuple[int, int], set[int]]) -> list[np.ndarray]:
    out = list(leaves)
    for (leaf, axis), idx in removed.items():
        if idx:
            out[leaf] = np.delete(out[leaf], sorted(idx), axis=axis)
    return out


def _emptied_grouped_convs(prog: Program, removed) -> list[tuple[int, int, int, bool]]:
    """Returns ``(equation, kernel leaf, feature_group_count, depthwise)`` of each grouped or
    depthwise conv whose input channels ``removed`` cuts entirely.

    Such a conv would have 0 input channels and a ``feature_group_count`` of 0
    (depthwise) or groups of width 0, which neither flax nor lax computes. The
    kernel is found through dtype casts to its params leaf; a kernel computed
    from params otherwise (weight standardization) is not checked here.
    """
    producers = {o: i for i, e in enumerate(prog.eqns) for o in e.outs}
    leaf_of = {v: k for k, v in enumerate(prog.param_ids)}
    out = []
    for i, e in enumerate(prog.eqns):
        if e.prim.name != "conv_general_dilated" or e.params["feature_group_count"] == 1:
            continue
        dn, groups = e.params["dimension_numbers"], e.params["feature_group_count"]
        depthwise = groups == prog.shapes[e.ins[0]][dn.lhs_spec[1]]
        v = e.ins[1]
        while v not in leaf_of and v in producers:
            src = prog.eqns[producers[v]]
            if src.prim.name not in _PASS or prog.shapes[src.ins[0]] != prog.shapes[v]:
                break
            v = src.ins[0]
        if v not in leaf_of:
            continue
        # A depthwise kernel's output axis carries its input channels (times the
        # multiplier); a grouped kernel's input axis is one group's input channels.
        axis = dn.rhs_spec[0] if depthwise else dn.rhs_spec[1]
        if len(removed.get((leaf_of[v], axis), ())) >= prog.shapes[v][axis]:
            out.append((i, leaf_of[v], groups, depthwise))
    return out


def _refuse_emptied_grouped_convs(prog: Program, removed) -> None:
    """Raises a ``ValueError`` naming the first conv of :func:`_emptied_grouped_convs`."""
    for i, leaf, groups, depthwise in _emptied_grouped_convs(prog, removed):
        path = prog.param_paths[leaf]
        layer = path_str(path[:-1]) if len(path) > 1 else "<root>"
        loc = where(prog.eqns[i])
        kind = "depthwise" if depthwise else "grouped"
        raise ValueError(
            f"shrink: every input channel of the {kind} conv {layer!r} would be cut "
            f"(kernel {path_str(path)}, feature_group_count={groups}"
            f"{', at ' + loc if loc else ''}), which would leave it with 0 input channels: "
            "no conv computes that (its feature_group_count would have to be 0 or its "
            f"{groups} groups empty). It happens when a selection empties the group feeding "
            "it, e.g. a global one without a cap, or one that the conv feeds: its channels "
            "then feed nothing, and shrink removes them. Fix: keep at least one channel of each "
            "group, e.g. structure.select(groups, scores, sparsity, scope='global', "
            "max_sparsity=0.9), or leave the group feeding that conv out of the selection."
        )


def _shrink(apply_fn, params, masks, example_inputs):
    """Returns ``(small, removed, prog)``: :func:`shrink`'s result, unchecked, and its plan."""
    training = getattr(apply_fn, "train_mode_batchnorm", ())
    if training:  # set by structure.module_apply
        raise ValueError(
            f"shrink: the model's BatchNorm layers {list(training[:5])} are in train mode "
            "(use_running_average=False), so they normalize with batch statistics and a pruned "
            "channel's constant output would be folded with its train-mode value: the shrunk "
            "model would not match the masked model in eval mode. Fix: call model.eval() "
            "before structure.module_apply / shrink_module."
        )
    leaves, removed, prog = plan(apply_fn, params, masks, *example_inputs)
    _refuse_emptied_grouped_convs(prog, removed)
    dtypes = [jnp.result_type(x) for _, x in leaves_with_paths(params)[0]]
    cut = _cut(leaves, removed)
    small = jax.tree.unflatten(
        prog.treedef, [jnp.asarray(x, d) for x, d in zip(cut, dtypes, strict=True)]
    )
    return small, removed, prog


def shrink(apply_fn: Any, params: Any, masks: Any, *example_inputs: Any, check: bool = True) -> Any:
    """Returns smaller params computing what ``apply_masks(params, masks)`` computes.

    Every channel (neuron, feature map) of a prunable dependency group that the
    masks make dead is cut from all the leaves tied to it — its kernel column,
    bias, BatchNorm scale/shift/statistics and the next layer's input rows —
    with constant outputs of removed units folded into the next bias where the
    math allows. Groups come from the jaxpr of ``apply_fn(params, *example_inputs)``.

    Args:
      apply_fn: ``(params, *inputs) -> outputs``; layer widths must follow
        from the params' shapes (true of functional code and of
        ``nnx.merge(graphdef, state)(x)`` for Linear/Conv/BatchNorm; for nnx
        models prefer :func:`~jaxprune.structure.shrink_module`).
      params: the params (any pytree; for nnx the full state incl. BatchStats).
      masks: bool masks with the params' structure (e.g. from
        :func:`jaxprune.structure.select` or ``jp.masks.structured``).
      *example_inputs: a small batch; it fixes shapes for tracing and is used
        to check the result.
      check: run ``apply_fn`` on the result and compare with the masked model.

    Returns:
      Params with the same paths and smaller leaves (the same tree structure
      for dicts and other plain pytrees; nnx ``Variable`` leaves come back as
      plain arrays, which ``apply_fn`` and ``nnx.merge`` take as they are).

    Raises:
      ValueError: the masks do not mirror the params, remove every input
        channel of a depthwise or grouped conv (named, with the fix), ``apply_fn``
        (from ``structure.module_apply``) runs BatchNorm in train mode, or
        ``apply_fn`` cannot run on the shrunk params (see the message for the
        fix).

    Examples:
      >>> import jax, jax.numpy as jnp, jaxprune as jp
      >>> from jaxprune import structure
      >>> def mlp(p, x):
      ...     return jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
      >>> p = {"w1": jnp.ones((3, 4)), "b1": jnp.ones(4), "w2": jnp.ones((4, 2)),
      ...      "b2": jnp.zeros(2)}
      >>> m = jax.tree.map(lambda x: jnp.ones(x.shape, bool), p)
      >>> m["w1"] = m["w1"].at[:, 1].set(False)
      >>> small = structure.shrink(mlp, p, m, jnp.ones((1, 3)))
      >>> small["w1"].shape, small["b2"].tolist()
      ((3, 3), [1.0, 1.0])

    References:
      Fang et al., "DepGraph: Towards Any Structural Pruning", 2023.
      https://arxiv.org/abs/2301.12900
    """
    return _shrink_checked(apply_fn, params, masks, example_inputs, check)


def _shrink_checked(apply_fn, params, masks, example_inputs, check, how="shrink"):
    """:func:`shrink`; ``how`` names the entry point for the fix in an :class:`ApplyFailure`."""
    small, removed, prog = _shrink(apply_fn, params, masks, example_inputs)

    def check_as(masks_, small_):
        want = run_cached(apply_masks, params, masks_)
        _check_outputs(apply_fn, small_, want, example_inputs, dtypes=prog.dtypes, how=how)

    if check:
        _check_naming(check_as, apply_fn, params, masks, small, removed, prog, example_inputs)
    return _placed_on_mesh(small, params)


def _placed_on_mesh(small: Any, params: Any) -> Any:
    """Returns ``small`` with each leaf on its params leaf's mesh (cut on the host otherwise).

    A leaf keeps its ``PartitionSpec`` where every sharded axis still divides over
    its devices, and is replicated on the mesh where the cut left one that does not.
    """
    s_flat, treedef = jax.tree.flatten(small)
    p_flat = jax.tree.leaves(params)
    if len(s_flat) != len(p_flat):
        return small
    out = []
    for s, p in zip(s_flat, p_flat, strict=True):
        sharding = getattr(p, "sharding", None)
        if (
            isinstance(p, jax.Array)
            and not isinstance(p, jax.core.Tracer)
            and isinstance(sharding, NamedSharding)
            and len(sharding.device_set) > 1
            and hasattr(s, "shape")
        ):
            spec = sharding.spec
            fits = len(spec) <= len(s.shape) and all(
                s.shape[d] % _ways(sharding.mesh, axis) == 0 for d, axis in enumerate(spec)
            )
            s = jax.device_put(s, sharding if fits else NamedSharding(sharding.mesh, P()))
        out.append(s)
    return jax.tree.unflatten(treedef, out)


def _check_naming(
    check_as, apply_fn, params, masks, small, removed, prog, example_inputs, layers=None
):
    """Runs ``check_as(masks, small)``; on a mismatch, re-raises it naming the culprit groups.

    ``check_as(masks_, small_)`` raises :class:`OutputMismatch` when ``small_``
    (the shrink of ``params`` under ``masks_``) computes something else, or
    :class:`ApplyFailure` when the model cannot run on it; each group of
    ``removed`` is then checked alone (see :func:`_culprits`). ``layers`` is
    :func:`_named`'s.
    """
    try:
        check_as(masks, small)
    except (OutputMismatch, ApplyFailure) as err:
        groups, tried = _culprits(
            lambda m: check_as(m, _shrink(apply_fn, params, m, example_inputs)[0]),
            params,
            removed,
            prog,
        )
        raise _named(err, groups, prog, layers, tried) from err


def widths(params: Any, small: Any) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Returns ``{path: (old shape, new shape)}`` for every leaf :func:`shrink` changed.

    For linen, whose layer widths are module attributes (``nn.Dense(features)``),
    rebuild the module with the new widths read from here, then ``apply`` it
    with the shrunk params.

    Args:
      params: the full-size params (or variables) that were shrunk.
      small: what :func:`shrink` returned for them: the same leaf paths (else
        ``ValueError``), in any order.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxprune as jp
      >>> from jaxprune import structure
      >>> def mlp(p, x):
      ...     return jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"]
      >>> p = {"w1": jnp.ones((3, 4)), "b1": jnp.ones(4), "w2": jnp.ones((4, 2))}
      >>> m = jax.tree.map(lambda x: jnp.ones(x.shape, bool), p)
      >>> m["w2"] = m["w2"].at[:2].set(False)  # hidden units 0 and 1 feed nothing
      >>> structure.widths(p, structure.shrink(mlp, p, m, jnp.ones((1, 3))))
      {'b1': ((4,), (2,)), 'w1': ((3, 4), (3, 2)), 'w2': ((4, 2), (2, 2))}
    """
    old = {path_str(p): tuple(np.shape(x)) for p, x in leaves_with_paths(params)[0]}
    new = {path_str(p): tuple(np.shape(x)) for p, x in leaves_with_paths(small)[0]}
    if old.keys() != new.keys():
        raise ValueError(
            f"small must hold the leaves of params (shrunk), but they differ: only in params "
            f"{[p for p in old if p not in new][:10]}, only in small "
            f"{[p for p in new if p not in old][:10]}. Fix: pass the params and what jp.shrink "
            "returned for them."
        )
    return {p: (shape, new[p]) for p, shape in old.items() if shape != new[p]}
