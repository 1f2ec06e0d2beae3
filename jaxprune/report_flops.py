"""FLOPs of an apply function: XLA's dense count, and MACs read from its jaxpr.

The FLOP counting behind :func:`jaxprune.report`'s ``flops``: ``xla_flops``
from XLA's cost analysis of the lowered function, which counts the body of a
loop (``lax.scan``, ``fori_loop``, ``while_loop``, ``nn.scan``, ``nnx.scan``)
once whatever its trip count, so ``loops`` counts the loops it saw that way
(``dense_macs`` is the figure to read for such models); ``dense_macs`` the
multiply-adds of its ``dot_general`` and ``conv_general_dilated`` (a scan's
body times its length, a ``cond``'s costliest branch); ``nonzero_macs`` those
same MACs, each scaled by the density of the parameter it multiplies, followed
to the matmul that reads it through reshapes, negation, ``stop_gradient``,
slices and gathers of its parts, masking and scaling (``w * c``, ``w / c``,
``w * gamma``: at most the lowest density of the params multiplied), and
kernels built of parts (``concatenate`` of params, as flax's
``OptimizedLSTMCell`` and a fused QKV do, and zero ``pad``: the size-weighted
density of the parts) (ShrinkBench). A gather of 1-D rows along a param's
leading axis is an embedding lookup, whose result is an activation: a matmul
that reads rows of a 2-D kernel picked by an index array (``w[idx]``)
therefore counts as dense (see ``_takes_part``).

Conv MACs: a regular conv counts every kernel tap of every output, taps over
its zero padding included (the convention of ShrinkBench and of published
counts such as ResNet-50's 4.1 GMACs); a transposed conv with strides above 1
(input dilation) counts only the taps on real input pixels, since every
(output, tap) pair would charge the zeros inserted between pixels, about
``prod(strides)`` times the work. At stride 1 a transposed conv inserts no
zeros: it is a regular padded conv, and counted as one (padding included).
XLA's cost analysis counts neither padded nor inserted taps, so ``xla_flops``
is below ``2 * dense_macs`` for a padded conv (a 3x3 SAME conv on 7x7 inputs:
by 22%); ``padded_macs`` is the part of ``dense_macs`` that reads padding, so
``dense_macs - padded_macs`` is XLA's count of real taps.

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
    # shard_map's casts of a replicated value to a device-varying one (check_vma).
    "pvary",
    "pbroadcast",
    "pcast",
    # The zeros of -w and of stop_gradient(w) are those of w.
    "neg",
    "stop_gradient",
}


class _Spread(str):
    """A param's path, for a var that broadcasts it to a larger shape (``gamma`` over ``w``'s rows).

    A product ``w * gamma`` keeps ``w``'s identity, the param it has the shape
    of; ``a * b`` of two weight tensors of the result's shape keeps neither.
    """


# Stands for a var known to be all zeros (jnp.zeros, a literal 0): a part of a
# kernel built by concatenate or pad that holds no weights.
_ZERO = "<zeros>"


# Ops taking part of a parameter (a fused QKV kernel split in three, a stacked
# layer indexed by step): every output keeps the parameter's identity, with its
# average density (an approximation when the parts' densities differ).
_SLICING = {"slice", "dynamic_slice", "gather", "split"}


# Element-wise ops whose result is zero wherever a parameter operand is (a scale,
# a mask, w / c): `select_n` counts only when its other cases are not params, and
# `div` only for its numerator.
_MASKING = {"mul", "div", "select_n"}


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


def _macs(eqn) -> tuple[float, float]:
    """Returns ``(macs, padded)`` of a ``dot_general`` or conv: ``padded`` the taps over padding.

    A regular conv counts every kernel tap of every output, the taps that read
    its zero padding included (``padded`` of them); a conv with input dilation
    (a transposed conv with strides above 1) only the taps on real input
    pixels (``padded`` 0); see the module's docstring.
    """
    out = math.prod(eqn.outvars[0].aval.shape)
    if eqn.primitive.name == "dot_general":
        (lc, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        return float(out * math.prod(lhs[i] for i in lc)), 0.0
    rhs = eqn.invars[1].aval.shape
    dn = eqn.params["dimension_numbers"]
    out_dim = dn.rhs_spec[0]
    real = _real_tap_macs(eqn)
    if any(d != 1 for d in eqn.params.get("lhs_dilation") or ()):
        return real, 0.0
    # Per output entry: the kernel's size without its output-feature axis (a conv
    # shrunk to no filters has out == 0 and must count 0, not divide by 0).
    per_output = math.prod(d for i, d in enumerate(rhs) if i != out_dim)
    macs = float(out * per_output)
    return macs, macs - real


def _real_tap_macs(eqn) -> float:
    """MACs of a conv counting only the taps on real input pixels (XLA's count).

    For a transposed conv (input dilation), counting every (output, tap) pair
    would charge the zeros inserted between input pixels, about
    ``prod(lhs_dilation)`` times the work done; for a regular conv it leaves out
    the taps over the zero padding.
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


def _is_zero_literal(v) -> bool:
    if not isinstance(v, jax.extend.core.Literal):
        return False
    try:
        return bool(np.all(np.asarray(v.val) == 0))
    except (TypeError, ValueError):
        return False


def _derived(density: dict[str, float], name: str, value: float) -> str:
    """Returns a new key of ``density`` holding ``value``: a kernel built of params' parts."""
    key = f"<{name} {len(density)}>"
    density[key] = min(1.0, value)
    return key


def _built(eqn, raw: list, density: dict[str, float]) -> str | None:
    """The key of a kernel a ``concatenate`` or zero ``pad`` builds of params, or None.

    Its density is the size-weighted mean of its parts' (an all-zero part 0):
    ``jnp.concatenate`` of the gate kernels of flax's ``OptimizedLSTMCell``, of
    q, k and v into a fused QKV kernel, or ``jnp.pad(w, ...)``. A part that is
    an activation (neither a param nor zeros) leaves the result an activation.

    >>> import jax, jax.numpy as jnp
    >>> f = lambda a, b: jnp.concatenate([a, b, jnp.zeros((2, 4))], axis=1)
    >>> jaxpr = jax.make_jaxpr(f)(jnp.ones((2, 2)), jnp.ones((2, 2))).jaxpr
    >>> density = {"a": 0.5, "b": 1.0}
    >>> key = _built(jaxpr.eqns[-1], ["a", "b", _ZERO], density)
    >>> density[key]  # (4 * 0.5 + 4 * 1.0 + 8 * 0) / 16
    0.375
    """
    size = math.prod(eqn.outvars[0].aval.shape)
    if not size:
        return None
    if eqn.primitive.name == "concatenate":
        if not any(p not in (None, _ZERO) for p in raw) or any(p is None for p in raw):
            return None
        nonzero = sum(
            (0.0 if p == _ZERO else density[p]) * math.prod(v.aval.shape)
            for v, p in zip(eqn.invars, raw, strict=True)
        )
        return _derived(density, "concatenate", nonzero / size)
    # pad(operand, padding_value): zeros added around (and between) its entries.
    if raw[0] in (None, _ZERO) or raw[1] != _ZERO:
        return None
    nonzero = density[raw[0]] * math.prod(eqn.invars[0].aval.shape)
    return _derived(density, "pad", nonzero / size)


def _walk(jaxpr, src: dict, density: dict[str, float], seen: dict[str, int]) -> tuple[float, ...]:
    """Returns ``(dense_macs, nonzero_macs, padded_macs)`` of ``jaxpr``.

    ``src`` maps vars to leaf paths (or ``_ZERO``); ``density`` gains the keys
    of kernels built of params; ``seen`` counts, under :func:`_flops`'s keys,
    the loops whose body XLA's cost analysis counts once (``while_loops``:
    those that are ``while`` loops, counted once here too) and the
    ``shard_map`` bodies (counted here once per device of their manual mesh
    axes, by XLA at one device's share).
    """
    dense = nonzero = padded = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        # raw: what each input is, zeros included; ins: the params among them.
        raw = [
            _ZERO
            if _is_zero_literal(v)
            else None
            if isinstance(v, jax.extend.core.Literal)
            else src.get(v)
            for v in eqn.invars
        ]
        ins = [None if p == _ZERO else p for p in raw]
        shape = tuple(eqn.outvars[0].aval.shape) if eqn.outvars else ()
        if name in ("dot_general", "conv_general_dilated"):
            d, pad = _macs(eqn)
            scale = math.prod(density[p] for p in ins if p is not None)
            dense, nonzero, padded = dense + d, nonzero + d * scale, padded + pad
        elif name in _PASS_THROUGH and raw and raw[0] is not None:
            p = raw[0]
            if name == "broadcast_in_dim" and p != _ZERO:
                if math.prod(shape) > math.prod(eqn.invars[0].aval.shape):
                    p = _Spread(p)
            src[eqn.outvars[0]] = p
        elif name == "optimization_barrier":
            for out, p in zip(eqn.outvars, raw, strict=True):
                if p is not None:
                    src[out] = p
        elif name in ("concatenate", "pad"):
            key = _built(eqn, raw, density)
            if key is not None:
                src[eqn.outvars[0]] = key
        elif name in _SLICING and ins and ins[0] is not None and _takes_part(eqn):
            for out in eqn.outvars:
                src[out] = ins[0]
        elif name in _MASKING and (kept := _masks(eqn, ins, shape, density)) is not None:
            # w * c, w / c, w * gamma, or where(m, w, 0) (jp.apply_masks inside
            # apply_fn): the result is nonzero at most where each parameter it
            # multiplies is, so it keeps the sparsest one's density (an upper bound).
            src[eqn.outvars[0]] = kept
        else:
            subs = _sub_inputs(eqn, raw)
            if name == "while" or (name == "scan" and _rolled(eqn)):
                seen["loops"] += 1  # XLA counts the body once (a fully unrolled scan has no loop)
            if name == "while":
                seen["while_loops"] += 1  # the MACs too: its trip count is not in the jaxpr
            if name == "shard_map":
                seen["shard_maps"] += 1
            results = []
            for sub, sub_ins in subs:
                inner = {}
                if sub_ins is not None:
                    for v, p in zip(sub.invars, sub_ins, strict=True):
                        # A loop's carry starting at zeros is not zeros in its body.
                        if p is not None and not (p == _ZERO and name in ("scan", "while")):
                            inner[v] = p
                results.append(_walk(sub, inner, density, seen))
                if len(subs) == 1 and name not in ("cond", "scan", "while"):
                    # A call (a nested jit, a custom_jvp): its outputs that are a
                    # parameter passed through keep that parameter's identity.
                    for ov, out in zip(sub.outvars, eqn.outvars, strict=False):
                        if not isinstance(ov, jax.extend.core.Literal) and ov in inner:
                            src[out] = inner[ov]
            if results:
                # cond: the costliest branch; scan: every iteration; shard_map:
                # its body, traced at one device's shapes, on every device.
                times = float(eqn.params.get("length", 1)) if name == "scan" else 1.0
                if name == "shard_map":
                    times = _shard_map_copies(eqn)
                if name == "cond":
                    d, n, pad = max(results)
                else:
                    d, n, pad = map(sum, zip(*results, strict=True))
                dense, nonzero = dense + times * d, nonzero + times * n
                padded += times * pad
    return dense, nonzero, padded


def _shard_map_copies(eqn) -> float:
    """How many distinct parts of the work a ``shard_map``'s body does, one per device.

    The product of the manual mesh axes that split some input (``in_specs``):
    along a manual axis that splits none, the devices repeat the same work on
    the same data, which is not more of the model's.
    """
    mesh = eqn.params["mesh"]
    manual = eqn.params.get("newly_manual_axes")
    if manual is None:  # older jax: every mesh axis not left automatic
        auto = eqn.params.get("auto", frozenset())
        manual = [a for a in mesh.axis_names if a not in auto]
    split = set()
    for spec in eqn.params.get("in_specs", ()):
        for entry in spec or ():
            split.update(entry if isinstance(entry, tuple) else (entry,))
    sizes = dict(mesh.shape)
    return float(math.prod(sizes[a] for a in manual if a in split))


def _rolled(eqn) -> bool:
    """Whether a ``scan`` lowers to a loop: unrolled fully, XLA sees every step."""
    unroll, length = eqn.params.get("unroll", 1), eqn.params.get("length", 1)
    return not (unroll is True or unroll >= length)


def _masks(eqn, ins: list, shape: tuple, density: dict[str, float]) -> str | None:
    """The param whose zeros a masking op's result keeps (it then has its density), or None.

    The result keeps a param's identity when one param operand has the result's
    shape (``w * c``, ``w / c``, ``where(m, w, 0)``); params broadcast over it
    (a scale ``w * gamma``, flax's ``WeightNorm``) add their zeros, so the
    result takes the lowest density of the params multiplied (an upper bound).
    ``x * scale``, a norm's scale over activations, is an activation: its zeros
    are the scale's channels, counted already where the next layer's weights are
    masked. Two weight tensors of the result's shape multiplied (``a * b``) keep
    neither's. A ``select_n`` counts only with one param among its cases, a
    ``div`` only for its numerator (``c / w`` is no mask).
    """
    name = eqn.primitive.name
    params = [(v, p) for v, p in zip(eqn.invars, ins, strict=True) if p is not None]
    if name == "div":
        params = params[:1] if ins[0] is not None else []
    if name == "select_n":
        if len({p for _, p in params}) != 1:
            return None
        full = {p for v, p in params if tuple(v.aval.shape) == shape}
    else:
        full = {p for v, p in params if tuple(v.aval.shape) == shape and not isinstance(p, _Spread)}
    if len(full) != 1:
        return None
    return str(min((p for _, p in params), key=density.__getitem__))


def _flops(apply_fn, params, inputs, density: dict[str, float]) -> dict[str, float]:
    # Traced through a fresh function each call: jax caches traces by the function's
    # identity, and apply_fn may read state that changed since (a flag, eval mode).
    fresh = lambda *args: apply_fn(*args)  # noqa: E731
    lowered = jax.jit(fresh).lower(params, *inputs)
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
    closed = jax.make_jaxpr(fresh)(params, *inputs)
    flat, _ = leaves_with_paths(params)
    # The jaxpr's inputs are the params' leaves, then the example inputs.
    invars = closed.jaxpr.invars[: len(flat)]
    src = {v: path_str(p) for v, (p, _) in zip(invars, flat, strict=True) if path_str(p) in density}
    density = dict(density)  # gains the keys of kernels built of params' parts
    seen = {"loops": 0, "shard_maps": 0, "while_loops": 0}
    dense, nonzero, padded = _walk(closed.jaxpr, src, density, seen)
    return {
        "xla_flops": xla,
        "dense_macs": dense,
        "nonzero_macs": nonzero,
        # No conv/dense MACs at all: nothing to reduce (1x), not "infinitely fewer".
        "mac_reduction": dense / nonzero if nonzero else (math.inf if dense else 1.0),
        # Conv taps over zero padding, in dense_macs (XLA's cost analysis skips them).
        "padded_macs": padded,
        # loops: their body xla_flops counts once, whatever their trip count;
        # shard_maps: bodies xla_flops counts at one device's share;
        # while_loops (fori_loop with traced bounds too): bodies the MACs count once.
        **seen,
    }
