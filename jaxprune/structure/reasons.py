"""Why an axis carries no channel, in plain words: the reasons a blocked group lists.

:func:`~jaxprune.structure.graph.find_groups` pins a group when some equation
does not map one of its axes channel-wise; :func:`_unmapped` says why for the
usual cases (a conv's spatial axis, a grouped or depthwise conv's balance, a
reduction over the channels, fixed indices of a slice or concatenate), and
:class:`_Locations` says where in the user's code that equation was traced.
"""

from __future__ import annotations

from jaxprune.structure.program import Program, where

# Reductions: graph.links maps their other axes; over these axes they mix channels.
_REDUCE = frozenset(
    "reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or argmax argmin".split()
)


class _Locations:
    """``at(i)``: `` at <where equation i was traced>`` (see :func:`~.program.where`), cached."""

    def __init__(self, prog: Program):
        self.prog, self.cache = prog, {}

    def __call__(self, i: int) -> str:
        if i not in self.cache:
            loc = where(self.prog.eqns[i])
            self.cache[i] = f" at {loc}" if loc else ""
        return self.cache[i]


def _unmapped(prog: Program, i: int, v: int, d: int, at: str) -> str:
    """Returns, in plain words, why equation ``i`` does not carry axis ``d`` of ``v`` channel-wise.

    ``at`` says where in the user's code the equation was traced (see
    :class:`_Locations`); conv cases end with the technical statement.
    """
    e, sh = prog.eqns[i], prog.shapes
    name, prm = e.prim.name, e.params
    tech = f"({name} does not map axis {d} channel-wise)"
    if name == "conv_general_dilated":
        dn = prm["dimension_numbers"]
        lhs, rhs, o = e.ins[0], e.ins[1], e.outs[0]
        groups, cin = prm["feature_group_count"], sh[lhs][dn.lhs_spec[1]]
        feature = (
            (v == lhs and d == dn.lhs_spec[1])
            or (v == rhs and d == dn.rhs_spec[0])
            or (v == o and d == dn.out_spec[1])
        )
        if feature and 1 < groups < cin:
            return (
                f"a per-channel cut would unbalance the groups of the grouped conv{at} "
                f"(feature_group_count={groups}), which loses one position in every group "
                f"at a time {tech}"
            )
        if feature and groups == cin > 1:
            mult = sh[o][dn.out_spec[1]] // cin
            return (
                f"one output of the depthwise conv{at} (channel multiplier {mult}) cannot go "
                f"alone, only a whole input channel with its {mult} outputs {tech}"
            )
        if any(v == u and d in spec[2:] for u, spec in zip(e.ins[:2] + e.outs, dn, strict=True)):
            return f"a spatial axis of the conv{at} {tech}"
    if name in _REDUCE and v == e.ins[0]:
        axes = prm.get("axes", (prm.get("axis"),))
        if d in {a % len(sh[v]) for a in axes if a is not None}:
            return (
                f"the {name}{at} reduces over these channels (a LayerNorm, a softmax or a "
                "mean over features), which mixes them"
            )
    if name == "concatenate" and d == prm["dimension"]:
        parts = " + ".join(str(sh[u][d]) for u in e.ins)
        return (
            f"these channels straddle the parts of the concatenate{at} ({parts} channels), "
            "e.g. a grouped conv's groups reading across them"
        )
    if name in ("slice", "pad", "split"):
        return f"the {name}{at} works on fixed indices of this axis, which shrinking cannot move"
    return f"{name}{at} does not map axis {d} channel-wise"
