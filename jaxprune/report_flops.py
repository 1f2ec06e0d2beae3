"""FLOPs of an apply function: XLA's dense count, and MACs read from its jaxpr.

The FLOP counting behind :func:`jaxprune.report`'s ``flops``: ``xla_flops``
from XLA's cost analysis of the lowered function; ``dense_macs`` the
multiply-adds of its ``dot_general`` and ``conv_general_dilated`` (a scan's
body times its length, a ``cond``'s costliest branch); ``nonzero_macs`` those
same MACs, each scaled by the density of the parameter it multiplies, followed
through reshapes, slices, gathers of its parts and masking to the matmul that
reads it (ShrinkBench). A gather of 1-D rows along a param's leading axis is an
embedding lookup, whose result is an activation: a matmul that reads rows of a
2-D kernel picked by an index array (``w[idx]``) therefore counts as dense
(see ``_takes_part``).

References:
  Blalock et al., "What is the State of Neural Network Pruning?" (ShrinkBench),
  2020. https://arxiv.org/abs/2003.03033
"""

from __future__ import annotations

import math

import jax
import jax.extend
import numpy as np

from jaxprune._tree import leaves_with_paths, path_str

# Ops through which a parameter keeps its identity on the way to a matmul.
_PASS_THROUGH = {
    "convert_element_type",
    "reshape",
    "transpose",
    "broadcast_in_dim",
    "squeeze",
    "expand_dims",
    "copy",
    "copy_p",
    "rev",
    "reduce_precision",
    "device_put",
}


# Ops taking part of a parameter (a fused QKV kernel split in three, a stacked
# layer indexed by step): every output keeps the parameter's identity, with its
# average density (an approximation when the parts' densities differ).
_SLICING = {"slice", "dynamic_slice", "gather", "split"}


# Element-wise ops whose result is zero wherever their one parameter operand is
# (a scale, a mask): `select_n` counts only when its other cases are not params.
_MASKING = {"mul", "select_n"}


def _takes_part(eqn) -> bool:
    """Whether a slicing op hands on part of its parameter, not activations read from it.

    A ``gather`` keeps the parameter's identity when it drops axes (a stacked
    layer indexed by step, ``w[i]``), indexes a non-leading axis (columns of a
    kernel, ``w[:, idx]``), or takes slices with two or more non-unit axes
    (each token's expert kernel of a mixture of experts, ``experts[ids]`` on
    ``[E, in, out]``). What is left, a gather of 1-D rows along the leading axis
    (``table[ids]``), is taken for an embedding lookup: its result is an
    activation, whose density says nothing about the layers that read it. So
    rows of a 2-D kernel picked by an index array (``w[idx]``) look like a
    lookup and the matmul that reads them counts as dense.

    >>> import jax, jax.numpy as jnp
    >>> def gather(f, *shapes):
    ...     jaxpr = jax.make_jaxpr(f)(*(jnp.ones(s) for s in shapes)).jaxpr
    ...     return next(e for e in jaxpr.eqns if e.primitive.name == "gather")
    >>> ids = jnp.array([2, 0, 1])
    >>> _takes_part(gather(lambda t: t[ids], (10, 4)))  # an embedding lookup
    False
    >>> _takes_part(gather(lambda e: e[ids], (4, 8, 8)))  # experts' kernels
    True
    >>> _takes_part(gather(lambda w: w[:, ids], (8, 8)))  # a kernel's columns
    True
    """
    if eqn.primitive.name != "gather":
        return True
    operand = eqn.invars[0].aval.shape
    if len(eqn.outvars[0].aval.shape) < len(operand):
        return True
    dn = eqn.params["dimension_numbers"]
    # vmap over a stacked table adds batching axes; they say nothing of the kind.
    axes = [a for a in range(len(operand)) if a not in dn.operand_batching_dims]
    if not axes or tuple(dn.start_index_map) != (axes[0],):
        return True
    sizes = eqn.params["slice_sizes"]
    return sum(sizes[a] != 1 for a in axes[1:]) >= 2


def _param_shaped(eqn, ins) -> bool:
    """Whether a masking op's result has its parameter operand's shape (``w * c``).

    ``x * scale`` (a norm's scale over activations) is an activation: its
    zeros are the scale's channels, counted already where the next layer's
    weights are masked.
    """
    shape = eqn.outvars[0].aval.shape
    return any(
        p is not None and tuple(v.aval.shape) == tuple(shape)
        for v, p in zip(eqn.invars, ins, strict=True)
    )


def _macs(eqn) -> float:
    out = math.prod(eqn.outvars[0].aval.shape)
    if eqn.primitive.name == "dot_general":
        (lc, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        return float(out * math.prod(lhs[i] for i in lc))
    rhs = eqn.invars[1].aval.shape
    dn = eqn.params["dimension_numbers"]
    out_dim = dn.rhs_spec[0]
    if any(d != 1 for d in eqn.params.get("lhs_dilation") or ()):
        return _transposed_conv_macs(eqn)
    # Per output entry: the kernel's size without its output-feature axis (a conv
    # shrunk to no filters has out == 0 and must count 0, not divide by 0).
    per_output = math.prod(d for i, d in enumerate(rhs) if i != out_dim)
    return float(out * per_output)


def _transposed_conv_macs(eqn) -> float:
    """MACs of a conv with input dilation (a transposed conv): taps on real input pixels only.

    Counting every (output, tap) pair would charge the zeros inserted between
    input pixels, about ``prod(lhs_dilation)`` times the work done.
    """
    lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
    out = eqn.outvars[0].aval.shape
    dn, p = eqn.params["dimension_numbers"], eqn.params
    taps = 1
    for d in range(len(dn.lhs_spec) - 2):
        size, k = lhs[dn.lhs_spec[2 + d]], rhs[dn.rhs_spec[2 + d]]
        o = np.arange(out[dn.out_spec[2 + d]])[:, None]
        q = o * p["window_strides"][d] + np.arange(k)[None, :] * p["rhs_dilation"][d]
        q = q - p["padding"][d][0]
        s = p["lhs_dilation"][d]
        taps *= int(np.sum((q >= 0) & (q <= (size - 1) * s) & (q % s == 0)))
    batch_out = out[dn.out_spec[0]] * out[dn.out_spec[1]]
    return float(batch_out * rhs[dn.rhs_spec[1]] * taps)


def _sub_jaxprs(eqn):
    for v in eqn.params.values():
        items = v if isinstance(v, tuple | list) else (v,)
        for j in items:
            if isinstance(j, jax.extend.core.ClosedJaxpr):
                yield j.jaxpr
            elif isinstance(j, jax.extend.core.Jaxpr):
                yield j


def _sub_inputs(eqn, ins: list) -> list[tuple]:
    """Each sub-jaxpr of ``eqn`` with the leaf paths of its inputs (``None``: unknown).

    A ``while``'s inputs are ``cond_consts + body_consts + carry``: its cond
    takes ``cond_consts + carry`` and its body ``body_consts + carry``, so
    neither is the tail of ``ins``. Other ops (``cond`` after its index,
    ``scan``, calls) pass a sub-jaxpr the last of their inputs.
    """
    if eqn.primitive.name == "while":
        nc, nb = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
        cond, body = eqn.params["cond_jaxpr"].jaxpr, eqn.params["body_jaxpr"].jaxpr
        return [(cond, ins[:nc] + ins[nc + nb :]), (body, ins[nc:])]
    out = []
    for sub in _sub_jaxprs(eqn):
        offset = len(eqn.invars) - len(sub.invars)
        out.append((sub, ins[offset:] if offset >= 0 else None))
    return out


def _walk(jaxpr, src: dict, density: dict[str, float]) -> tuple[float, float]:
    """Returns ``(dense_macs, nonzero_macs)`` of ``jaxpr``; ``src`` maps vars to leaf paths."""
    dense = nonzero = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        ins = [None if isinstance(v, jax.extend.core.Literal) else src.get(v) for v in eqn.invars]
        if name in ("dot_general", "conv_general_dilated"):
            d = _macs(eqn)
            scale = math.prod(density[p] for p in ins if p is not None)
            dense, nonzero = dense + d, nonzero + d * scale
        elif name in _PASS_THROUGH and ins and ins[0] is not None:
            src[eqn.outvars[0]] = ins[0]
        elif name in _SLICING and ins and ins[0] is not None and _takes_part(eqn):
            for out in eqn.outvars:
                src[out] = ins[0]
        elif (
            name in _MASKING
            and len({p for p in ins if p is not None}) == 1
            and _param_shaped(eqn, ins)
        ):
            # w * c, or where(m, w, 0) (jp.apply_masks inside apply_fn): the result
            # is nonzero at most where the one parameter it reads is, so it keeps
            # that parameter's density (an upper bound if it zeroes more).
            src[eqn.outvars[0]] = next(p for p in ins if p is not None)
        else:
            subs = _sub_inputs(eqn, ins)
            results = []
            for sub, sub_ins in subs:
                inner = {}
                if sub_ins is not None:
                    for v, p in zip(sub.invars, sub_ins, strict=True):
                        if p is not None:
                            inner[v] = p
                results.append(_walk(sub, inner, density))
                if len(subs) == 1 and name not in ("cond", "scan", "while"):
                    # A call (a nested jit, a custom_jvp): its outputs that are a
                    # parameter passed through keep that parameter's identity.
                    for ov, out in zip(sub.outvars, eqn.outvars, strict=False):
                        if not isinstance(ov, jax.extend.core.Literal) and ov in inner:
                            src[out] = inner[ov]
            if results:
                # cond: the costliest branch; scan: every iteration.
                times = float(eqn.params.get("length", 1)) if name == "scan" else 1.0
                d, n = max(results) if name == "cond" else map(sum, zip(*results, strict=True))
                dense, nonzero = dense + times * d, nonzero + times * n
    return dense, nonzero


def _flops(apply_fn, params, inputs, density: dict[str, float]) -> dict[str, float]:
    lowered = jax.jit(apply_fn).lower(params, *inputs)
    # The lowered (whole-program) module's cost: the compiled one's is per device,
    # so 1/8 of the model's on 8 devices when params or inputs are sharded.
    cost = lowered.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    if not cost or "flops" not in cost:
        cost = lowered.compile().cost_analysis()
        if isinstance(cost, list | tuple):
            cost = cost[0] if cost else {}
    xla = float((cost or {}).get("flops", math.nan))
    closed = jax.make_jaxpr(apply_fn)(params, *inputs)
    flat, _ = leaves_with_paths(params)
    # The jaxpr's inputs are the params' leaves, then the example inputs.
    invars = closed.jaxpr.invars[: len(flat)]
    src = {v: path_str(p) for v, (p, _) in zip(invars, flat, strict=True) if path_str(p) in density}
    dense, nonzero = _walk(closed.jaxpr, src, density)
    return {
        "xla_flops": xla,
        "dense_macs": dense,
        "nonzero_macs": nonzero,
        # No conv/dense MACs at all: nothing to reduce (1x), not "infinitely fewer".
        "mac_reduction": dense / nonzero if nonzero else (math.inf if dense else 1.0),
    }
