"""Which constants a shrink may fold: those that stay the same at any input size.

A pruned unit that outputs a nonzero constant is folded into the next layer's
bias. That is right at every input size only when the constant does not depend
on one: a padded or transposed convolution gives fewer taps at the borders
(:func:`_pads`), and a sum along an axis grows with its length
(:func:`_sized`). :func:`_border_aware` rewrites the program so the evaluator
counts such constants as varying, and they are never folded.
"""

from __future__ import annotations

import jax
import numpy as np

from jaxprune.structure.program import Eqn, Program

__all__: list[str] = []


def _pads(e: Eqn) -> bool:
    """Whether ``e``'s result at a position depends on its distance from the border.

    A padded or input-dilated (transposed) convolution and a padded sum-pool
    read fewer real entries near the border (or between dilated entries), and
    ``pad`` adds a border; so a channel that is constant going in is not
    constant coming out, whatever the sizes in the example happen to show.
    Max/min pools pad with their identity and keep constants constant.
    """
    name, prm = e.prim.name, e.params
    if name == "conv_general_dilated":
        return any(lo > 0 or hi > 0 for lo, hi in prm["padding"]) or any(
            d != 1 for d in prm["lhs_dilation"]
        )
    if name == "reduce_window_sum":
        return any(lo > 0 or hi > 0 for lo, hi in prm["padding"]) or any(
            d != 1 for d in prm.get("base_dilation", ())
        )
    if name == "pad":
        return any(lo > 0 or hi > 0 or mid > 0 for lo, hi, mid in prm["padding_config"])
    return False


# Sums and products along an axis, and their running forms: on a nonzero constant
# their result depends on the axis' length (or, running, on the position).
_SIZED = ("reduce_sum", "reduce_prod", "cumsum", "cumprod")


def _sized(prog: Program, i: int, consumers: dict[int, list[int]]) -> bool:
    """Whether equation ``i`` turns a nonzero constant into one that depends on a size.

    ``x.sum(1)`` of a constant ``c`` is ``T * c``, with ``T`` the example's
    length: folded into a bias, it would be right at that length only (a sum
    pool over a variable number of tokens). A mean (a sum whose every use
    divides it by the summed size, ``jnp.mean``'s form, or multiplies it by its
    inverse) keeps a constant constant at any size.
    """
    e = prog.eqns[i]
    if e.prim.name not in _SIZED:
        return False
    if e.prim.name != "reduce_sum":
        return True
    shape = prog.shapes[e.ins[0]]
    n = float(np.prod([shape[a] for a in e.params["axes"]]))
    users = consumers.get(e.outs[0], [])

    def scales_by_inverse(j: int) -> bool:
        u = prog.eqns[j]
        if u.prim.name not in ("div", "mul") or len(u.ins) != 2:
            return False
        other = u.ins[1] if u.ins[0] == e.outs[0] else u.ins[0]
        if u.prim.name == "div" and u.ins[0] != e.outs[0]:
            return False
        c = prog.consts.get(other)
        if c is None or np.size(c) != 1:
            return False
        v = float(np.asarray(c).reshape(()))
        return abs(v - n) <= 1e-6 * n if u.prim.name == "div" else abs(v * n - 1) <= 1e-6

    return not (users and all(scales_by_inverse(j) for j in users))


def _border_aware(prog: Program) -> tuple[Program, dict[int, list[int]], list[np.ndarray]]:
    """Returns ``(program, index map, extra inputs)``: ``prog`` for the evaluator.

    The evaluator calls an entry constant when no model input reaches it. A
    padded op (:func:`_pads`) applied to a nonzero constant gives a constant
    that differs at the borders, and a sum along an axis (:func:`_sized`) one
    that grows with its length, so folding it later (e.g. after a global mean)
    would only be right at the example's input size. Each such ``y = op(x, ...)``
    becomes ``y = op(x, ...) + op(x * z, ...)`` with ``z`` an extra all-zero
    input: the value is unchanged, and wherever a nonzero constant entry of
    ``x`` reaches ``y`` it now counts as varying (input-dependent), so it is
    never folded. The index map sends an equation of ``prog`` to the equations
    of the new program that get its ``keeps`` (both copies of a contraction).
    """
    eqns: list[Eqn] = []
    shapes, dtypes = list(prog.shapes), list(prog.dtypes)
    input_ids, extra = list(prog.input_ids), []
    index: dict[int, list[int]] = {}

    def new(like: int) -> int:
        shapes.append(shapes[like])
        dtypes.append(dtypes[like])
        return len(shapes) - 1

    def zero_input(like: int) -> int:
        z = new(like)
        input_ids.append(z)
        extra.append(np.zeros(shapes[like], dtypes[like]))
        return z

    consumers = prog.consumers()
    for i, e in enumerate(prog.eqns):
        if not (_pads(e) or _sized(prog, i, consumers)):
            index[i] = [len(eqns)]
            eqns.append(e)
            continue
        x, y = e.ins[0], e.outs[0]
        xz, y0, t = new(x), new(y), new(y)
        eqns.append(Eqn(jax.lax.mul_p, {}, (x, zero_input(x)), (xz,)))
        rest = e.ins[1:]
        if e.prim.name == "pad":  # the border itself counts when the padding value is nonzero
            pv, pz = e.ins[1], new(e.ins[1])
            eqns.append(Eqn(jax.lax.mul_p, {}, (pv, zero_input(pv)), (pz,)))
            rest = (pz,)
        index[i] = [len(eqns), len(eqns) + 1]
        eqns.append(Eqn(e.prim, e.params, e.ins, (y0,)))
        eqns.append(Eqn(e.prim, e.params, (xz,) + rest, (t,)))
        eqns.append(Eqn(jax.lax.add_p, {}, (y0, t), (y,)))
    out = prog._replace(eqns=eqns, shapes=shapes, dtypes=dtypes, input_ids=input_ids)
    return out, index, extra
