"""Dependency groups: which (leaf, axis) slices must shrink together, read from the jaxpr.

A *channel element* is ``(var, axis, layout)``: the indices along one axis of
one variable that carry one channel. A layout ``(outer, inner, offset,
count)`` says channel ``c`` of ``count`` sits at indices ``k * period + offset
+ c * inner + r`` for ``k < outer``, ``r < inner`` (``period = size //
outer``): the trivial layout ``(1, 1, 0, size)`` is a plain axis, a flattened
NHWC feature map gives ``outer = H * W``, a concatenation gives an offset, a
depthwise conv with multiplier ``m`` gives ``inner = m``, and a grouped conv
with ``G`` groups gives ``outer = G`` on its input and output channel axes: a
channel is one position inside every group, so all groups keep equal widths.

Each primitive links the channel elements of its operands and results
(element-wise ops, reshape, transpose, broadcast, reductions over other axes,
pooling, padding, slicing, reversal, concatenation, dot_general and convolutions,
depthwise and grouped included); a union-find over elements, run to a fixed point, gives
the groups. An element that a primitive cannot map (a spatial axis of a conv,
a reduced axis, a model input or output, an unknown primitive) blocks its
group: the group is reported but not prunable. Unknown primitives warn, naming
the primitive (and saying so when the program draws random numbers, i.e. a
train-mode call with Dropout). Params that no equation reads (a layer used only
in a branch the traced call does not take) are pinned too, with a warning
naming them: nothing in the program ties them to the layers that feed them.
The reasons a pinned group lists, in plain words, are in
:mod:`jaxprune.structure.reasons`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

from jaxprune._tree import Path, path_str
from jaxprune.structure.graph_warnings import NEVER_USED, RANDOM, _opaque_message, _warn_unused
from jaxprune.structure.program import Program
from jaxprune.structure.reasons import _REDUCE, _Locations, _unmapped

__all__ = ["Layout", "Member", "Group", "Link", "links", "find_groups", "channel_indices"]

Layout = tuple[int, int, int, int]  # (outer, inner, offset, count)


# Why a group reaching the model output is pinned (shrink warns when masks zero its units).
OUTPUT_REASON = "reaches the model output"


class Member(NamedTuple):
    """One params leaf axis of a group: channel ``c`` is ``channel_indices(layout, size, c)``.

    Args:
      leaf: the flatten index of the params leaf (its position in
        ``Program.param_paths``).
      path: the leaf's normalized path, a tuple of keys and indices.
      axis: the leaf's axis that shrinks.
      layout: ``(outer, inner, offset, count)``, how the channels map to indices along
        ``axis`` (see :func:`channel_indices`).
    """

    leaf: int  # flatten index of the params leaf
    path: Path  # its normalized path
    axis: int  # the axis that shrinks
    layout: Layout  # how channels map to indices along ``axis``


class Group(NamedTuple):
    """Coupled params slices: dropping channel ``c`` drops its indices from every member.

    Args:
      members: the coupled params leaf axes, as :class:`Member` s.
      channels: the number of channels (the ``count`` of the members' layouts).
      prunable: False when some primitive, a model input or output, a constant or an
        unused param pins the group.
      reasons: why the group is not prunable, in plain words (empty when it is).
    """

    members: tuple[Member, ...]
    channels: int  # number of channels
    prunable: bool  # False when some primitive or a model input/output pins it
    reasons: tuple[str, ...]  # why not prunable (empty when prunable)

    def __repr__(self) -> str:
        ms = ", ".join(f"{path_str(m.path)}[{m.axis}]" for m in self.members)
        tag = "" if self.prunable else f", blocked: {'; '.join(self.reasons[:2])}"
        return f"Group({self.channels} channels: {ms}{tag})"


class Link(NamedTuple):
    """Axis ``a`` embeds in axis ``b`` between factors ``outer`` and ``inner``, at ``offset``."""

    a: tuple[int, int]
    b: tuple[int, int]
    outer: int = 1
    inner: int = 1
    offset: int = 0
    contraction: int = -1  # equation index when this links a contraction's operands
    # Grouped convs: the contraction's lhs operand is ``b`` (the kernel's input
    # axis ``a`` repeats once per group inside it), and layouts cross the link
    # only when their ``outer`` is a multiple of ``period`` (one channel = one
    # position in every group).
    lhs_is_b: bool = False
    period: int = 1
    # Depthwise convs with a channel multiplier ``m``: only layouts whose
    # ``inner`` is a multiple of ``m`` (whole input channels) cross, so that
    # every input channel keeps ``m`` outputs and the conv stays depthwise.
    inner_multiple: int = 1


def channel_indices(layout: Layout, size: int, c: int) -> list[int]:
    """Returns the indices along an axis of ``size`` that carry channel ``c`` of ``layout``.

    ``layout`` is ``(outer, inner, offset, count)``: the axis is ``outer``
    equal runs, and in each run channel ``c`` is the ``inner`` consecutive
    indices from ``offset + c * inner`` (a :class:`Member`'s ``layout``).

    Args:
      layout: ``(outer, inner, offset, count)``, with ``outer >= 1`` dividing ``size``.
      size: the axis' length.
      c: the channel, in ``[0, count)``. Neither it nor ``layout`` is checked: an
        out-of-range value gives indices of other channels or past the axis.

    Examples:
      >>> from jaxprune import structure
      >>> structure.channel_indices((1, 1, 0, 4), 4, 2)  # a plain axis of 4 channels
      [2]
      >>> structure.channel_indices((2, 1, 0, 3), 6, 1)  # 3 channels tiled twice
      [1, 4]
      >>> structure.channel_indices((1, 2, 1, 2), 5, 1)  # 2 indices a channel, after 1
      [3, 4]
    """
    outer, inner, offset, _ = layout
    period = size // outer
    return [k * period + offset + c * inner + r for k in range(outer) for r in range(inner)]


def _valid(layout: Layout, size: int) -> bool:
    o, i, off, cnt = layout
    return o >= 1 and i >= 1 and cnt >= 1 and size % o == 0 and off + cnt * i <= size // o


def _forward(link: Link, lay: Layout, n: int, s: int) -> Layout | None:
    """Maps a layout on the link's ``a`` side (size ``n``) to the ``b`` side (size ``s``)."""
    o, i, off, cnt = lay
    if o % link.period or i % link.inner_multiple:
        return None
    if link.outer == 1 and link.inner == 1 and o == 1:
        out = (1, i, off + link.offset, cnt)
    elif link.offset == 0 and s == link.outer * n * link.inner:
        out = (link.outer * o, i * link.inner, off * link.inner, cnt)
    else:
        return None
    return out if _valid(out, s) else None


def _backward(link: Link, lay: Layout, n: int, s: int) -> Layout | None:
    """Maps a layout on the ``b`` side back to the ``a`` side, when it lies inside ``a``."""
    o, i, off, cnt = lay
    if o % link.period or i % link.inner_multiple:
        return None
    cands = []
    if link.outer == 1 and link.inner == 1 and o == 1:
        cands.append((1, i, off - link.offset, cnt))
    if o % link.outer == 0 and i % link.inner == 0 and off % link.inner == 0:
        cands.append((o // link.outer, i // link.inner, off // link.inner, cnt))
    for cand in cands:
        if cand[2] >= 0 and _valid(cand, n) and _forward(link, cand, n, s) == lay:
            return cand
    return None


# Element-wise primitives: every operand axis of the result's size is the same channel.
ELEMENTWISE = frozenset(
    """abs acos acosh add and asin asinh atan atan2 atanh cbrt ceil clamp convert_element_type
    copy copy_p cos cosh div erf erf_inv erfc exp exp2 expm1 floor imag integer_pow is_finite
    log log1p logistic max min mul ne eq ge gt le lt neg nextafter not or pow real
    reduce_precision rem round rsqrt select_n sign sin sinh sqrt square stop_gradient sub tan
    tanh xor""".split()
)
_KNOWN = (
    ELEMENTWISE
    | _REDUCE
    | frozenset(
        """reshape transpose broadcast_in_dim squeeze expand_dims reduce_window_max
        reduce_window_sum reduce_window_min slice pad concatenate split dot_general
        conv_general_dilated iota cumsum cumprod cummax cummin rev""".split()
    )
)


def _reshape_links(i_id: int, o_id: int, a: tuple, b: tuple) -> list[Link]:
    """Links for reshape ``a -> b``: 1-1 axes, and merges/splits of consecutive axes."""
    sa = [(k, n) for k, n in enumerate(a) if n != 1]
    sb = [(k, n) for k, n in enumerate(b) if n != 1]
    out, p, q = [], 0, 0
    while p < len(sa) and q < len(sb):
        p2, q2, pa, pb = p + 1, q + 1, sa[p][1], sb[q][1]
        while pa != pb:
            if pa < pb:
                pa, p2 = pa * sa[p2][1], p2 + 1
            else:
                pb, q2 = pb * sb[q2][1], q2 + 1
        seg_a, seg_b = sa[p:p2], sb[q:q2]
        # Many-to-many segments (e.g. (6, 4) -> (4, 6)) scramble channels: left unlinked.
        if len(seg_a) == 1 or len(seg_b) == 1:
            if len(seg_a) == 1:
                (single, _), multi, s_id, m_id = seg_a[0], seg_b, i_id, o_id
            else:
                (single, _), multi, s_id, m_id = seg_b[0], seg_a, o_id, i_id
            for j, (k, _) in enumerate(multi):
                outer = math.prod(n for _, n in multi[:j])
                inner = math.prod(n for _, n in multi[j + 1 :])
                out.append(Link((m_id, k), (s_id, single), outer, inner))
        p, q = p2, q2
    return out


def links(prog: Program, idx: int) -> tuple[list[Link], bool]:
    """Returns ``(links, known)`` for equation ``idx``: how it maps channel elements."""
    e = prog.eqns[idx]
    name, prm = e.prim.name, e.params
    sh = prog.shapes
    out: list[Link] = []

    def same(a, b):
        return sh[a[0]][a[1]] == sh[b[0]][b[1]]

    if name in ELEMENTWISE:
        o = e.outs[0]
        for v in e.ins:
            if len(sh[v]) == len(sh[o]):
                out += [Link((v, d), (o, d)) for d in range(len(sh[o])) if same((v, d), (o, d))]
    elif name == "reshape" and prm.get("dimensions") is None:
        out = _reshape_links(e.ins[0], e.outs[0], sh[e.ins[0]], sh[e.outs[0]])
    elif name == "transpose":
        out = [Link((e.ins[0], p), (e.outs[0], j)) for j, p in enumerate(prm["permutation"])]
    elif name == "broadcast_in_dim":
        v, o = e.ins[0], e.outs[0]
        for d, bd in enumerate(prm["broadcast_dimensions"]):
            if sh[v][d] == sh[o][bd]:
                out.append(Link((v, d), (o, bd)))
    elif name == "squeeze":
        v, o = e.ins[0], e.outs[0]
        gone = {a % len(sh[v]) for a in prm["dimensions"]}
        kept = [d for d in range(len(sh[v])) if d not in gone]
        out = [Link((v, d), (o, j)) for j, d in enumerate(kept)]
    elif name == "expand_dims":
        v, o = e.ins[0], e.outs[0]
        new = set(prm["dimensions"])
        kept = [j for j in range(len(sh[o])) if j not in new]
        out = [Link((v, d), (o, j)) for d, j in enumerate(kept)]
    elif name in _REDUCE or name in ("cumsum", "cumprod", "cummax", "cummin"):
        v, o = e.ins[0], e.outs[0]
        axes = prm.get("axes", (prm.get("axis"),))
        axes = {a % len(sh[v]) for a in axes if a is not None}
        if name.startswith("cum"):
            out = [Link((v, d), (o, d)) for d in range(len(sh[v])) if d not in axes]
        else:
            kept = [d for d in range(len(sh[v])) if d not in axes]
            out = [Link((v, d), (o, j)) for j, d in enumerate(kept)]
    elif name.startswith("reduce_window"):
        n_ops = len(e.outs)
        for v, o in zip(e.ins[:n_ops], e.outs, strict=True):
            for d in range(len(sh[v])):
                plain = (
                    prm["window_dimensions"][d] == 1
                    and prm["window_strides"][d] == 1
                    and tuple(prm["padding"][d]) == (0, 0)
                    and prm.get("base_dilation", (1,) * len(sh[v]))[d] == 1
                )
                if plain:
                    out.append(Link((v, d), (o, d)))
    elif name == "rev":  # reversed axes (a transposed conv's flipped kernel) are not channels
        v, o = e.ins[0], e.outs[0]
        flipped = set(prm["dimensions"])
        out = [Link((v, d), (o, d)) for d in range(len(sh[v])) if d not in flipped]
    elif name == "slice":
        v, o = e.ins[0], e.outs[0]
        out = [Link((v, d), (o, d)) for d in range(len(sh[v])) if same((v, d), (o, d))]
    elif name == "pad":
        v, o = e.ins[0], e.outs[0]
        cfg = prm["padding_config"]
        out = [Link((v, d), (o, d)) for d in range(len(sh[v])) if tuple(cfg[d]) == (0, 0, 0)]
    elif name == "concatenate":
        o, dim, start = e.outs[0], prm["dimension"], 0
        for v in e.ins:
            out += [Link((v, d), (o, d)) for d in range(len(sh[o])) if d != dim]
            out.append(Link((v, dim), (o, dim), offset=start))
            start += sh[v][dim]
    elif name == "split":
        v, axis = e.ins[0], prm["axis"]
        sizes = [sh[o][axis] for o in e.outs]
        for o in e.outs:
            out += [Link((o, d), (v, d)) for d in range(len(sh[v])) if d != axis]
            # Re-traced on the shrunk network, ``jnp.split(x, n)`` cuts n equal
            # parts again: channel c is then position c in every part, so all
            # parts keep equal widths. Unequal parts come from fixed indices
            # that shrinking cannot update: their channels stay (unlinked).
            if len(set(sizes)) == 1:
                out.append(Link((o, axis), (v, axis), outer=len(sizes)))
    elif name == "dot_general":
        lhs, rhs, o = e.ins[0], e.ins[1], e.outs[0]
        (lc, rc), (lb, rb) = prm["dimension_numbers"]
        j = 0
        for a, b in zip(lb, rb, strict=True):
            out += [Link((lhs, a), (o, j)), Link((rhs, b), (o, j))]
            j += 1
        for d in range(len(sh[lhs])):
            if d not in lc and d not in lb:
                out.append(Link((lhs, d), (o, j)))
                j += 1
        for d in range(len(sh[rhs])):
            if d not in rc and d not in rb:
                out.append(Link((rhs, d), (o, j)))
                j += 1
        out += [Link((lhs, a), (rhs, b), contraction=idx) for a, b in zip(lc, rc, strict=True)]
    elif name == "conv_general_dilated":
        lhs, rhs, o = e.ins[0], e.ins[1], e.outs[0]
        dn = prm["dimension_numbers"]
        ls, rs, os_ = dn.lhs_spec, dn.rhs_spec, dn.out_spec
        groups = prm["feature_group_count"]
        if prm["batch_group_count"] != 1:
            return [], False
        out.append(Link((lhs, ls[0]), (o, os_[0])))
        cin = sh[lhs][ls[1]]
        if groups == 1:
            out.append(Link((lhs, ls[1]), (rhs, rs[1]), contraction=idx))
            out.append(Link((rhs, rs[0]), (o, os_[1])))
        elif groups == cin:
            # Depthwise: input channel c feeds output channels [c*m, (c+1)*m).
            # With a multiplier m > 1 a single output channel cannot go alone:
            # every input channel must keep m outputs.
            mult = sh[o][os_[1]] // cin
            out.append(Link((lhs, ls[1]), (o, os_[1]), 1, mult))
            out.append(Link((rhs, rs[0]), (o, os_[1]), inner_multiple=mult))
        else:
            # Grouped: kernel input row r reads input channel g * (cin / G) + r of
            # every group g, and output channel g * (cout / G) + j belongs to group
            # g. A channel is one in-group position across all G groups, so every
            # group keeps the same width and feature_group_count stays valid.
            out.append(Link((rhs, rs[1]), (lhs, ls[1]), groups, contraction=idx, lhs_is_b=True))
            out.append(Link((rhs, rs[0]), (o, os_[1]), period=groups))
    elif name == "iota":
        pass
    else:
        return [], False
    return out, True


class _UnionFind:
    def __init__(self):
        self.parent: dict[Any, Any] = {}

    def find(self, x):
        self.parent.setdefault(x, x)
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


class Analysis(NamedTuple):
    """Everything :func:`find_groups` learned; :mod:`shrink` reuses it."""

    groups: list[Group]
    roots: list[Any]  # union-find root of each group
    uf: _UnionFind
    layouts: dict[tuple[int, int], set]  # (var, axis) -> layouts seen there
    eqn_links: list[list[Link]]
    contractions: list[tuple[int, tuple, tuple]]  # (eqn, lhs element, rhs element)


def _void_values(prog: Program) -> set[int]:
    """Returns the values that hold no entry and feed only such values.

    jax's ``jnp.pad(mode="edge")`` pads every axis, the unpadded ones included,
    by slicing one edge row (``x[..., 0:1]``), broadcasting it to zero copies
    and concatenating the empty result: on the channel axis of an edge pad
    that touches only spatial axes, that fixed-index slice would pin the
    channels although nothing reaches the output through it. Values with a
    zero-size axis, and values read only to compute them (the edge row), carry
    nothing, so they link no channels and pin none.
    """
    sh = prog.shapes
    users: dict[int, list[int]] = {}
    for i, e in enumerate(prog.eqns):
        for v in e.ins:
            users.setdefault(v, []).append(i)
    keep = set(prog.output_ids) | set(prog.input_ids) | set(prog.param_ids)
    void: set[int] = set()
    # Ids grow in program order, so every reader's outputs are decided before a value.
    for v in reversed(range(len(sh))):
        if v in keep:
            continue
        readers = [prog.eqns[u].outs for u in users.get(v, ())]
        if 0 in sh[v] or (readers and all(outs and void.issuperset(outs) for outs in readers)):
            void.add(v)
    return void


def find_groups(prog: Program, *, warn: bool = True) -> Analysis:
    """Returns the dependency :class:`Analysis` of ``prog`` (groups with >= 1 params leaf)."""
    sh = prog.shapes
    layouts: dict[tuple[int, int], set] = {}
    uf = _UnionFind()
    for v in prog.param_ids:
        for d, n in enumerate(sh[v]):
            if n > 1:
                layouts.setdefault((v, d), set()).add((1, 1, 0, n))
                uf.find((v, d, (1, 1, 0, n)))
    void = _void_values(prog)
    eqn_links, known = [], []
    for i, e in enumerate(prog.eqns):
        if e.outs and all(o in void for o in e.outs):
            # Computes only values that end up empty: it moves no channel anywhere.
            eqn_links.append([])
            known.append(True)
            continue
        lk, kn = links(prog, i)
        lk = [link for link in lk if link.a[0] not in void and link.b[0] not in void]
        eqn_links.append(lk)
        known.append(kn)
        for link in lk:
            # A grouped conv's kernel output axis also carries the grouped layout.
            n = sh[link.a[0]][link.a[1]]
            if link.period > 1 and link.a[0] in prog.param_ids and n % link.period == 0:
                lay = (link.period, 1, 0, n // link.period)
                layouts.setdefault(link.a, set()).add(lay)
                uf.find(link.a + (lay,))

    def add(key, lay):
        s = layouts.setdefault(key, set())
        if lay in s:
            return False
        s.add(lay)
        return True

    changed = True
    while changed:
        changed = False
        for lk in eqn_links:
            for link in lk:
                n, s = sh[link.a[0]][link.a[1]], sh[link.b[0]][link.b[1]]
                for lay in list(layouts.get(link.a, ())):
                    m = _forward(link, lay, n, s)
                    if m is not None:
                        changed |= add(link.b, m)
                        uf.union(link.a + (lay,), link.b + (m,))
                for lay in list(layouts.get(link.b, ())):
                    m = _backward(link, lay, n, s)
                    if m is not None:
                        changed |= add(link.a, m)
                        uf.union(link.a + (m,), link.b + (lay,))

    blocked: dict[Any, list[str]] = {}
    opaque: dict[Any, set] = {}

    def block(var, why, prim=None):
        for d in range(len(sh[var])):
            for lay in layouts.get((var, d), ()):
                blocked.setdefault(uf.find((var, d, lay)), []).append(why)
                if prim is not None:
                    opaque.setdefault(uf.find((var, d, lay)), set()).add(prim)

    at = _Locations(prog)
    for i, (e, lk, kn) in enumerate(zip(prog.eqns, eqn_links, known, strict=True)):
        if e.outs and all(o in void for o in e.outs):
            continue
        if not kn:
            for v in e.ins + e.outs:
                block(v, f"primitive {e.prim.name!r}{at(i)} is opaque", e.prim.name)
            continue
        mapped = set()
        for link in lk:
            n, s = sh[link.a[0]][link.a[1]], sh[link.b[0]][link.b[1]]
            for lay in layouts.get(link.a, ()):
                if _forward(link, lay, n, s) is not None:
                    mapped.add(link.a + (lay,))
            for lay in layouts.get(link.b, ()):
                if _backward(link, lay, n, s) is not None:
                    mapped.add(link.b + (lay,))
        for v in set(e.ins + e.outs):
            for d in range(len(sh[v])):
                for lay in layouts.get((v, d), ()):
                    if (v, d, lay) not in mapped:
                        why = _unmapped(prog, i, v, d, at(i))
                        blocked.setdefault(uf.find((v, d, lay)), []).append(why)
    # Activations: the values computed from the inputs, in program order.
    live = set(prog.input_ids)
    for e in prog.eqns:
        if any(v in live for v in e.ins):
            live.update(e.outs)
    for i, e in enumerate(prog.eqns):
        # A product of two activations (attention's q.k and probs.v) keeps only
        # its batch axes (heads) prunable. q.k is scaled by 1 / sqrt(head_dim),
        # a constant read from the width at trace time, so a narrower head_dim
        # would be scaled differently; and attention functions require v's
        # head_dim to equal k's. No jaxpr rule can see either.
        if e.prim.name != "dot_general" or not all(v in live for v in e.ins[:2]):
            continue
        why = (
            f"the dot_general{at(i)} multiplies two activations over it (like "
            "attention's head_dim, whose 1/sqrt(head_dim) scale is read from the width)"
        )
        _, (lb, rb) = e.params["dimension_numbers"]
        for v, batch in ((e.ins[0], lb), (e.ins[1], rb)):
            for d in range(len(sh[v])):
                if d not in batch:
                    for lay in layouts.get((v, d), ()):
                        blocked.setdefault(uf.find((v, d, lay)), []).append(why)
    for v in prog.input_ids:
        block(v, "reaches a model input")
    for v in prog.output_ids:
        block(v, OUTPUT_REASON)
    for v in prog.consts:
        block(v, "touches a constant baked into the program")
    # Params no equation reads (a layer used only in a branch not taken, e.g. an
    # auxiliary head behind a flag, or an unused norm): nothing links them to the
    # layers that feed them in the untraced code, so each of their axes would be a
    # lone "prunable" group whose cut no longer fits that code. They stay whole.
    read = {v for e in prog.eqns for v in e.ins} | set(prog.output_ids)
    unused = [leaf for leaf, v in enumerate(prog.param_ids) if v not in read]
    for leaf in unused:
        block(prog.param_ids[leaf], NEVER_USED)

    members: dict[Any, list[Member]] = {}
    for leaf, v in enumerate(prog.param_ids):
        for d in range(len(sh[v])):
            for lay in sorted(layouts.get((v, d), ())):
                r = uf.find((v, d, lay))
                members.setdefault(r, []).append(Member(leaf, prog.param_paths[leaf], d, lay))
    if warn:
        _warn_unused(
            prog, [leaf for leaf in unused if any(n > 1 for n in sh[prog.param_ids[leaf]])]
        )
    rand = sorted({e.prim.name for e in prog.eqns if e.prim.name in RANDOM})
    groups, roots = [], []
    hidden: dict[tuple, list[str]] = {}  # opaque primitives -> the groups they block
    for r, ms in members.items():
        reasons = tuple(dict.fromkeys(blocked.get(r, [])))
        if warn and r in opaque:
            hidden.setdefault(tuple(sorted(opaque[r])), []).extend(
                f"{path_str(m.path)} axis {m.axis}" for m in ms[:2]
            )
        groups.append(Group(tuple(ms), ms[0].layout[3], not reasons, reasons))
        roots.append(r)
    for prims, names in hidden.items():
        warnings.warn(_opaque_message(list(prims), names, rand), stacklevel=3)
    contractions = []
    for lk in eqn_links:
        for link in lk:
            if link.contraction < 0:
                continue
            n, s = sh[link.a[0]][link.a[1]], sh[link.b[0]][link.b[1]]
            for lay in layouts.get(link.a, ()):
                m = _forward(link, lay, n, s)
                if m is not None:
                    lhs, rhs = link.a + (lay,), link.b + (m,)
                    contractions.append(
                        (link.contraction,) + ((rhs, lhs) if link.lhs_is_b else (lhs, rhs))
                    )
    return Analysis(groups, roots, uf, layouts, eqn_links, contractions)
