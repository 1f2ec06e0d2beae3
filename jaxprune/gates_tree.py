"""Learned gates on any pytree of parameters: the plain functional form.

Gate parameters live in their own tree, ``{path_str(kernel_path): {"gate_...": array}}``,
next to the model's params. :func:`apply_gates` returns gated params (a sample
when given a key, the deterministic test-time gates without one) that the
model's own apply function consumes unchanged, so this works for linen
(``model.apply({"params": gated}, x)``), nnx (``nnx.merge(graphdef, gated)``),
equinox or hand-written models alike. A per-unit gate scales a kernel's last
axis and the sibling bias (``bias`` beside ``kernel`` or ``weight``, ``b``
beside haiku's ``w``), which equals scaling that unit's output.
That is flax's layout, ``[..., in, out]`` (output units last); equinox's and
PyTorch's weights are ``[out, in]`` (``[out, in, kh, kw]`` for a conv), where
the gates would scale input features (a conv's kernel width):
:func:`init_gates` reads that layout from the sibling bias and refuses it.
(:func:`jaxprune.masks.structured`'s ``axes=-1`` likewise means output units
in flax's layout only.)

The hard masks read from the gates (:func:`unit_masks`, :func:`to_masks`) and
network slimming (:func:`slimming_penalty`, :func:`slimming_masks`) live in
:mod:`jaxprune.gates_masks`, the argument checks in
:mod:`jaxprune.gates_checks`; the public names are re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import optax

from jaxprune._tree import (
    Path,
    Where,
    _normalize,
    is_variable,
    key_parts,
    leaves_with_paths,
    mirror_variables,
    path_str,
    prunable_flags,
)
from jaxprune.gates_checks import (
    _GROUPED_FIX,
    _bias_path,
    _check_gate,
    _check_gate_params,
    _check_gate_shapes,
    _check_inputs,
    _check_kind,
    _check_layout,
    _check_not_stacked,
    _check_single_output_axis,
    _grouped_hint,
    _input_rows,
    _is_unit_bias,
    _require_per_unit,
    _warn_unpaired_bias,
)
from jaxprune.gates_kinds import _check_folded
from jaxprune.gates_masks import (
    INPUTS_SUFFIX,
    slimming_masks,
    slimming_penalty,
    to_masks,
    unit_masks,
)

__all__ = [
    "Gate",
    "apply_gates",
    "gate_keys",
    "init_gates",
    "input_gate_keys",
    "is_gate",
    "linen_apply",
    "multi_transform",
    "penalty",
    "sample_unit_gate",
    "slimming_masks",
    "slimming_penalty",
    "to_masks",
    "unit_masks",
]


class Gate(Protocol):
    """The protocol every gate kind follows (see :mod:`jaxprune.gates_kinds`).

    Args:
      *args, **kwargs: none are taken: a protocol is not instantiated
        (``Gate()`` raises ``TypeError``). A gate kind is any object with a
        ``per_unit`` flag and the methods below; the built-in kinds are
        frozen dataclasses built from their own hyperparameters, e.g.
        ``HardConcrete(beta=2 / 3)``.
    """

    per_unit: bool

    def init(self, kernel: jax.Array, key: jax.Array | None = None) -> dict: ...
    def apply(self, gp: dict, kernel: jax.Array, key: jax.Array | None) -> tuple: ...
    def penalty(self, gps: Sequence[dict], kernels: Sequence[jax.Array]) -> jax.Array: ...
    def score(self, gp: dict, kernel: jax.Array) -> jax.Array: ...
    def keep(self, gp: dict, kernel: jax.Array) -> jax.Array: ...


def is_gate(path: Path, leaf: Any = None) -> bool:
    """Returns whether ``path`` names a gate parameter (its last name starts with ``gate_``).

    Works on the functional gate trees, on nnx states of attached models and on
    any tree that nests them, so one predicate partitions every layout.

    Args:
      path: a key path, a tuple of names and indices; nnx's ``"value"`` and
        ``"raw_value"`` components are skipped.
      leaf: ignored (default ``None``); taken so that ``is_gate`` serves as a
        ``(path, leaf)`` predicate.

    Examples:
      >>> is_gate(("gates", "fc1/kernel", "gate_log_alpha")), is_gate(("fc1", "kernel"))
      (True, False)
      >>> is_gate(("mlp", "gate_proj", "kernel"))  # a layer named gate_*, not a gate
      False
    """
    del leaf
    # The parameter's own name only: a layer named gate_* (Llama's gate_proj) is
    # not a gate, nor are the weights under it.
    comps = [p for p in path if p not in ("value", "raw_value")]
    return bool(comps) and isinstance(comps[-1], str) and comps[-1].startswith("gate_")


def init_gates(
    gate: Gate,
    params: Any,
    *,
    where: Where | None = None,
    key: jax.Array | None = None,
    inputs: bool = False,
) -> dict[str, dict[str, jax.Array]]:
    """Returns gate parameters for every leaf of ``params`` selected by ``where``.

    Args:
      gate: a gate kind, e.g. ``jp.gates.HardConcrete()``.
      params: any pytree of parameters.
      where: predicate ``(path, leaf) -> bool`` choosing the gated kernels;
        default floating leaves with ``ndim >= 2``. Leave the classifier's
        kernel out (its outputs are logits).
      key: optional PRNG key (for kinds with random initialization).
      inputs: gate the kernels' input features (axis -2: a dense layer's
        inputs, a conv's input channels) instead of their output units, one
        gate per feature, as beta-Bernoulli dropout gates the flattened
        features entering LeNet-5-Caffe's first dense layer. Pass the result
        as ``input_gate_params=`` to :func:`apply_gates`, :func:`penalty`,
        :func:`to_masks` and :func:`linen_apply`. Needs a per-unit kind.
        Not for grouped or depthwise convs (``feature_group_count != 1``):
        their kernel's axis -2 holds ``in_features / groups`` rows, each
        shared by ``groups`` input channels, and params alone cannot tell
        such a kernel from an ordinary conv's, so the gates would silently
        tie unrelated channels together. Leave them out with ``where``
        (:func:`linen_apply` and nnx :func:`~jaxprune.gates.attach` refuse
        them). A general linear kernel ``[in, heads, head_dim]``
        (``DenseGeneral``, attention's q/k/v), told by its bias ``[heads,
        head_dim]``, is refused: its axis -2 holds output heads.

    Per-unit gates take a kernel's last axis as its output units (flax's
    ``[..., in, out]``; haiku's ``w`` too). A kernel stored ``[out, in]``
    (equinox's ``eqx.nn.Linear.weight``, PyTorch) or ``[out, in, kh, kw]``
    (``eqx.nn.Conv2d``) is told by its sibling bias having one entry per entry
    of axis 0 (``[out]`` or ``[out, 1, 1]``) and is refused with a
    ``ValueError`` naming it: the gates would scale its input features (a
    conv's kernel width). A square ``[n, n]`` kernel's bias fits both axes, so
    it is refused only when another kernel of ``params`` shows ``[out, in]``.
    Gate such weights stored transposed (output units last), or with a
    per-weight kind (``VariationalDropout``). The bias gated with a kernel is
    the sibling leaf named ``bias`` (beside ``kernel``, ``weight`` or any other
    name) or ``b`` (beside ``w``); a gated kernel with neither, but a 1-D leaf
    of its units' length beside it (a tuple's ``(w, b)``), is warned about
    once, since that leaf is left ungated.

    Returns:
      ``{path_str(path): {"gate_...": array}}`` in flatten order.

    Examples:
      >>> import jax.numpy as jnp, jaxprune as jp
      >>> from jaxprune import gates
      >>> params = {"fc": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)}}
      >>> gp = gates.init_gates(gates.HardConcrete(), params)
      >>> {k: v["gate_log_alpha"].shape for k, v in gp.items()}
      {'fc/kernel': (4,)}
      >>> gpi = gates.init_gates(gates.HardConcrete(), params, inputs=True)
      >>> {k: v["gate_log_alpha"].shape for k, v in gpi.items()}
      {'fc/kernel': (3,)}
    """
    _check_gate(gate)
    if key is not None:
        key_parts(key, "key")
    if inputs:
        _require_per_unit(gate, "inputs=True")
    flags = prunable_flags(params, where)
    flat, _ = leaves_with_paths(params)
    shapes = {p: tuple(jnp.shape(x)) for p, x in flat if hasattr(x, "dtype")}
    selected = [path_str(p) for (p, x), f in zip(flat, flags, strict=True) if f]
    out = {}
    for i, ((p, x), f) in enumerate(zip(flat, flags, strict=True)):
        if f and jnp.ndim(x) < 2:
            raise ValueError(
                f"init_gates: where selected {path_str(p)!r} of shape {jnp.shape(x)}, but gates "
                "sit on kernels (ndim >= 2, units on the last axis); a gated kernel's sibling "
                "bias is gated with it, so gating a bias would gate it twice. Fix: select "
                "kernels only, e.g. where=lambda p, x: p[-1] == 'kernel' and x.ndim >= 2."
            )
        if f:
            _check_not_stacked(p, x, shapes)
            k = None if key is None else jax.random.fold_in(key, i)
            x = jnp.asarray(x)
            if inputs:
                _check_single_output_axis(p, x, shapes)
                # Input features are the kernel's axis -2; a separate key from the outputs'.
                x, k = jnp.swapaxes(x, -1, -2), None if k is None else jax.random.fold_in(k, 2)
            out[path_str(p)] = gate.init(x, k)
    if gate.per_unit:
        _check_layout("init_gates", selected, shapes, inputs=inputs)
        if not inputs:
            _warn_unpaired_bias(selected, shapes)
    return out


def gate_keys(gate_params: dict, key: jax.Array) -> dict[str, jax.Array]:
    """Returns one independent key per gated layer: ``fold_in(key, index)`` in key order.

    Args:
      gate_params: ``{kernel path: gate params}``; only its keys are read, and
        a layer's ``index`` is its rank among them, sorted.
      key: one PRNG key (``jax.random.key``, or a raw uint32 ``[2]`` key).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jaxprune import gates
      >>> gp = {"fc2/kernel": {}, "fc1/kernel": {}}  # gate params, by kernel path
      >>> keys = gates.gate_keys(gp, jax.random.key(0))
      >>> list(keys)
      ['fc1/kernel', 'fc2/kernel']
      >>> same = jax.random.key_data(jax.random.fold_in(jax.random.key(0), 1))
      >>> bool((jax.random.key_data(keys["fc2/kernel"]) == same).all())
      True
    """
    key_parts(key, "key")
    return {name: jax.random.fold_in(key, i) for i, name in enumerate(sorted(gate_params))}


def input_gate_keys(input_gate_params: dict, key: jax.Array) -> dict[str, jax.Array]:
    """Returns the keys the input gates are sampled with: ``gate_keys(.., fold_in(key, 1))``.

    A stream apart from the output gates' keys, so a layer's input and output
    samples are independent.

    Args:
      input_gate_params: ``{kernel path: input-gate params}``
        (``init_gates(..., inputs=True)``); only its keys are read.
      key: the PRNG key the output gates' keys come from (the one given to
        :func:`gate_keys`).

    Examples:
      >>> import jax
      >>> from jaxprune import gates
      >>> gp = {"fc1/kernel": {}}  # input-gate params, by kernel path
      >>> k_in = gates.input_gate_keys(gp, jax.random.key(0))["fc1/kernel"]
      >>> k_out = gates.gate_keys(gp, jax.random.key(0))["fc1/kernel"]
      >>> same = gates.gate_keys(gp, jax.random.fold_in(jax.random.key(0), 1))["fc1/kernel"]
      >>> data = jax.random.key_data
      >>> bool((data(k_in) == data(same)).all()), bool((data(k_in) == data(k_out)).all())
      (True, False)
    """
    key_parts(key, "key")  # named before fold_in sees a non-key
    return gate_keys(input_gate_params, jax.random.fold_in(key, 1))


def sample_unit_gate(gate: Gate, gp: dict, key: jax.Array | None, x: jax.Array) -> jax.Array:
    """Returns a per-unit gate to multiply ``x`` by (units on its last axis).

    The test-time gate without ``key``. With ``key``, a sample: one per unit
    shared by the batch, or, for kinds built with ``per_example=True``, one per
    example and unit, shaped ``[batch, 1, ..., 1, units]`` (``x``'s axis 0 is
    the batch), as the reference implementations of hard-concrete and
    beta-Bernoulli gates sample them. Gate layer outputs or inputs with it.

    Args:
      gate: a per-unit gate kind (one with ``unit_gate``; not
        ``VariationalDropout``).
      gp: one layer's gate params (one entry of :func:`init_gates`' result).
      key: PRNG key of the sample; ``None`` gives the test-time gate.
      x: the array to be gated, units on its last axis. Only its shape is
        read, and only with ``key`` and a ``per_example=True`` kind, which
        need a batch axis first (``ndim >= 2``).

    Examples:
      >>> import jax, jax.numpy as jnp, jaxprune as jp
      >>> g = jp.gates.BetaBernoulli(per_example=True)
      >>> gp = g.init(jnp.zeros((3, 4)))
      >>> y = jnp.ones((2, 5, 5, 4))  # NHWC conv output, 4 channels
      >>> jp.gates.sample_unit_gate(g, gp, jax.random.key(0), y).shape
      (2, 1, 1, 4)
    """
    _check_gate(gate)
    _require_per_unit(gate, "sample_unit_gate")
    if key is None or not getattr(gate, "per_example", False):
        return gate.unit_gate(gp, key)
    if jnp.ndim(x) < 2:
        raise ValueError(
            f"{type(gate).__name__}(per_example=True) needs a batch axis first, got an input "
            f"of shape {jnp.shape(x)}. Fix: call the model on a batch (x[None] for one "
            "example), or per_example=False."
        )
    z = gate.unit_gate(gp, key, batch=jnp.shape(x)[0])
    return z.reshape((z.shape[0],) + (1,) * (jnp.ndim(x) - 2) + z.shape[1:])


def _gate_features(x: jax.Array, g: jax.Array, layer: str, layers: str) -> jax.Array:
    """Returns ``x`` with its last axis (a layer's input features) multiplied by the gates ``g``.

    ``g`` is ``[features]`` or, per example, ``[batch, 1, ..., features]``.
    ``layer`` names the layer and ``layers`` the kinds that take their input
    features on the last axis, for the error on a size mismatch.
    """
    if jnp.shape(x)[-1:] != g.shape[-1:]:
        channels = jnp.shape(x)[-1] if jnp.ndim(x) else 0
        grouped = _grouped_hint(channels, g.shape[-1])
        raise ValueError(
            f"input gates of {layer} have {g.shape[-1]} features, but the layer's input has "
            f"shape {jnp.shape(x)}.{grouped} Fix: gate inputs only on layers whose input "
            f"features are the input's last axis ({layers})"
            + (f"; {_GROUPED_FIX}." if grouped else ".")
        )
    return x * g.astype(x.dtype)


def _scale_rows(name: str, kernel: jax.Array, g: jax.Array) -> jax.Array:
    """Returns ``kernel`` with its rows (axis -2, the input features) scaled by the gates ``g``."""
    return kernel * _input_rows(name, g, jnp.shape(kernel)).astype(kernel.dtype)


def apply_gates(
    gate: Gate,
    params: Any,
    gate_params: dict,
    *,
    key: jax.Array | None = None,
    input_gate_params: dict | None = None,
) -> Any:
    """Returns ``params`` with the gates applied: sampled with ``key``, test-time without.

    Per-unit gates multiply each gated kernel's last axis and its sibling
    bias (see :func:`init_gates`), broadcast along the bias's last axis when
    the bias has the kernel's trailing axes: a DenseGeneral / attention
    projection's ``[heads, head_dim]`` bias of an ``[in, heads, head_dim]``
    kernel, as :func:`linen_apply` gates that layer's output. Such a gate has
    ``head_dim`` units, each shared by all heads (one ``head_dim`` slot across
    heads), and the structured shrink keeps ``head_dim`` whole, so these
    units are zeroed, not cut. Per-weight kinds (variational dropout) perturb
    the kernel. With ``key=None`` the result is the deterministic model used
    at test time (the test gates "folded" into the weights).
    ``input_gate_params`` (``init_gates(..., inputs=True)``) multiply the
    kernels' rows (axis -2), which equals gating the layers' input features;
    they are sampled with :func:`input_gate_keys`.

    Args:
      gate: the gate kind the gates were built with, e.g.
        ``jp.gates.HardConcrete()``.
      params: the model's params, any pytree.
      gate_params: ``{kernel path: gate params}`` from :func:`init_gates` on
        ``params``; every path must name a leaf of ``params``.
      key: PRNG key of the samples (one key per layer, :func:`gate_keys`);
        ``None`` (default) applies the deterministic test-time gates. A kind
        built with ``per_example=True`` refuses a key: its per-example samples
        cannot be folded into a kernel.
      input_gate_params: ``{kernel path: input-gate params}`` from
        ``init_gates(..., inputs=True)``; default ``None``, no input gates.
        Needs a per-unit kind.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxprune as jp
      >>> from jaxprune import gates
      >>> params = {"fc": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
      >>> gp = {"fc/kernel": {"gate_log_alpha": jnp.array([-9.0, 9.0])}}
      >>> g = gates.apply_gates(gates.HardConcrete(), params, gp)
      >>> g["fc"]["kernel"].tolist(), g["fc"]["bias"].tolist()
      ([[0.0, 1.0], [0.0, 1.0]], [0.0, 1.0])
    """
    _check_gate(gate)
    inputs = _check_inputs(gate, input_gate_params)
    _check_folded(gate, key)
    if key is not None:
        key_parts(key, "key")  # raises, naming `key`, for anything but a PRNG key
    flat, treedef = leaves_with_paths(params)
    index = {path_str(p): i for i, (p, _) in enumerate(flat)}
    _check_gate_params(gate_params, index)
    _check_gate_params(inputs, index)
    kernels = {name: jnp.asarray(flat[index[name]][1]) for name in gate_params}
    _check_gate_shapes(gate, gate_params, kernels)  # input gates are checked where applied
    if gate.per_unit:
        shapes = {p: tuple(jnp.shape(x)) for p, x in flat if hasattr(x, "dtype")}
        _check_layout("apply_gates", sorted(gate_params), shapes)
        _check_layout("apply_gates", sorted(inputs), shapes, inputs=True)
    keys = gate_keys(gate_params, key) if key is not None else {}
    in_keys = input_gate_keys(inputs, key) if key is not None else {}
    leaves = [x for _, x in flat]
    for name, gp in gate_params.items():
        i = index[name]
        kernel, scale = gate.apply(gp, jnp.asarray(leaves[i]), keys.get(name))
        leaves[i] = kernel
        b = index.get(path_str(_bias_path(flat[i][0])))
        # A bias of the kernel's trailing axes ([out], DenseGeneral's [heads, head_dim])
        # is scaled along its last axis, the units, as the layer's output is.
        if (
            scale is not None
            and b is not None
            and _is_unit_bias(jnp.shape(kernel), jnp.shape(leaves[b]))
            and jnp.shape(leaves[b])[-1:] == scale.shape
        ):
            leaves[b] = leaves[b] * scale.astype(jnp.result_type(leaves[b]))
    for name, gp in inputs.items():
        i = index[name]
        leaves[i] = _scale_rows(name, jnp.asarray(leaves[i]), gate.unit_gate(gp, in_keys.get(name)))
    return mirror_variables(params, jax.tree.unflatten(treedef, leaves))


def penalty(
    gate: Gate, gate_params: dict, params: Any = None, *, input_gate_params: dict | None = None
) -> jax.Array:
    """Returns the gates' regularizer (expected L0, KL, ...) over all layers' gates.

    ``params`` is needed only by kinds whose penalty reads the weights
    (variational dropout). ``input_gate_params`` (``init_gates(...,
    inputs=True)``) are regularized together with the output gates, as one
    set: a kind whose penalty is not a plain sum (``ScalarGate``'s mean)
    sees all of them at once, as :func:`jaxprune.gates.model_penalty` does.

    Args:
      gate: the gate kind the gates were built with.
      gate_params: ``{kernel path: gate params}`` from :func:`init_gates`, all
        made by ``gate``'s kind.
      params: the model's params (default ``None``); required by per-weight
        kinds (``VariationalDropout``), and when given every path of
        ``gate_params`` must name a leaf of it.
      input_gate_params: ``{kernel path: input-gate params}`` from
        ``init_gates(..., inputs=True)``; default ``None``, none. Needs a
        per-unit kind.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxprune import gates
      >>> gp = {"fc/kernel": {"gate_log_alpha": jnp.array([-9.0, 9.0])}}
      >>> round(float(gates.penalty(gates.HardConcrete(), gp)), 2)  # expected L0: one open gate
      1.0
      >>> gp = {"fc/kernel": {"gate_scale": jnp.array([1.0, 0.0])}}
      >>> gpi = {"fc/kernel": {"gate_scale": jnp.array([1.0, 1.0, 1.0])}}
      >>> round(float(gates.penalty(gates.ScalarGate(), gp, input_gate_params=gpi)), 6)
      0.18

    References:
      Louizos et al. 2018 (expected L0), https://arxiv.org/abs/1712.01312;
      Molchanov et al. 2017 (variational dropout KL), https://arxiv.org/abs/1701.05369;
      Lee et al. 2018 (beta-Bernoulli KL), https://arxiv.org/abs/1805.10896;
      Wang et al. 2020 (scalar gates), https://arxiv.org/abs/1909.12579
    """
    _check_gate(gate)
    inputs = _check_inputs(gate, input_gate_params)
    names, in_names = sorted(gate_params), sorted(inputs)
    kernels: list[jax.Array] = []
    if params is not None:
        flat, _ = leaves_with_paths(params)
        index = {path_str(p): x for p, x in flat}
        _check_gate_params(gate_params, index)
        _check_gate_params(inputs, index)
        # A gate vector of the wrong length would broadcast into a wrong penalty.
        _check_gate_shapes(gate, gate_params, index)
        _check_gate_shapes(gate, inputs, index, inputs=True)
        kernels = [jnp.asarray(index[n]) for n in names]
        kernels += [jnp.swapaxes(jnp.asarray(index[n]), -1, -2) for n in in_names]
    elif not gate.per_unit:
        raise ValueError(
            f"{type(gate).__name__}'s penalty reads the weights, but params is None. "
            "Fix: call jp.gates.penalty(gate, gate_params, params)."
        )
    gps = [gate_params[n] for n in names] + [inputs[n] for n in in_names]
    _check_kind(gate, gps)
    return gate.penalty(gps, kernels)


def multi_transform(
    params_tx: optax.GradientTransformation, gates_tx: optax.GradientTransformation
) -> optax.GradientTransformationExtraArgs:
    """Returns an optax transform updating weights with ``params_tx`` and gates with ``gates_tx``.

    Leaves are told apart by :func:`is_gate` on their paths, so it works on a
    ``{"params": ..., "gates": ...}`` pair, on an nnx state of an attached
    model (including inside ``nnx.Optimizer``) and on anything that nests
    them. Freeze the weights ("pruning from scratch") with
    ``params_tx=optax.set_to_zero()``.

    Args:
      params_tx: the optax transform of every leaf that is not a gate.
      gates_tx: the optax transform of the gate parameters (the leaves whose
        path :func:`is_gate` accepts).

    Examples:
      >>> import jax.numpy as jnp, optax, jaxprune as jp
      >>> from jaxprune import gates
      >>> tree = {"w": jnp.ones(2), "gates": {"fc": {"gate_scale": jnp.ones(2)}}}
      >>> tx = gates.multi_transform(optax.set_to_zero(), optax.sgd(1.0))
      >>> u, _ = tx.update(tree, tx.init(tree), tree)
      >>> u["w"].tolist(), u["gates"]["fc"]["gate_scale"].tolist()
      ([0.0, 0.0], [-1.0, -1.0])
    """

    def labels(tree):
        # Same structure as the input (nnx Variables stay leaves): optax matches
        # the label tree against the tree it is given, wrapped or pure.
        return jax.tree_util.tree_map_with_path(
            lambda p, x: "gates" if is_gate(_normalize(p)) else "params", tree, is_leaf=is_variable
        )

    inner = optax.multi_transform({"params": params_tx, "gates": gates_tx}, labels)
    return optax.with_extra_args_support(inner)


def linen_apply(
    gate: Gate,
    model: Any,
    variables: Any,
    gate_params: dict,
    *args: Any,
    key: jax.Array | None = None,
    input_gate_params: dict | None = None,
    **kwargs: Any,
) -> Any:
    """Returns ``model.apply(variables, *args)`` with per-unit gates on its layers' outputs.

    A flax linen module is left as written: every submodule call whose
    ``path/kernel`` names an entry of ``gate_params`` (built with
    ``init_gates(gate, variables["params"])``) has its output's last axis
    multiplied by the gate (sampled with ``key``, test-time without), by
    intercepting the call (``nn.intercept_methods``). Equal to running the
    model on :func:`apply_gates`'s gated params; this form also gates layers
    whose parameters are not named ``kernel``/``bias``. A layer named in
    ``input_gate_params`` (``init_gates(..., inputs=True)``) has its input's
    last axis (its input features) multiplied by those gates, sampled with
    :func:`input_gate_keys`.

    Args:
      gate: a per-unit gate kind (a per-weight kind, ``VariationalDropout``,
        is refused: gate its params with :func:`apply_gates` instead).
      model: the flax linen module.
      variables: its variables (``{"params": ..., "batch_stats": ...}``),
        passed to ``model.apply`` as they are.
      gate_params: ``{"path/kernel": gate params}`` from
        ``init_gates(gate, variables["params"])``; each must match a
        submodule called during the apply.
      *args: the inputs, passed to ``model.apply`` with ``**kwargs``.
      key: PRNG key of the gate samples; ``None`` (default) applies the
        test-time gates.
      input_gate_params: ``{"path/kernel": input-gate params}`` from
        ``init_gates(..., inputs=True)``, applied to those submodules' first
        positional argument; default ``None``, no input gates. Not for grouped
        or depthwise convs (``feature_group_count != 1``).
      **kwargs: passed to ``model.apply`` (the model's keyword arguments, or
        ``apply``'s own, e.g. ``rngs=``).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import flax.linen as nn
      >>> from jaxprune import gates
      >>> model = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
      >>> variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
      >>> gp = gates.init_gates(gates.HardConcrete(), variables["params"],
      ...                       where=lambda path, x: path == ("layers_0", "kernel"))
      >>> gates.linen_apply(gates.HardConcrete(), model, variables, gp, jnp.ones((1, 3))).shape
      (1, 2)
    """
    _check_gate(gate)
    import flax.linen as nn

    if not gate.per_unit:
        raise ValueError(
            f"linen_apply gates layer outputs, which needs a per-unit gate; got "
            f"{type(gate).__name__}. Fix: use apply_gates(gate, params, gate_params, key=k) "
            "and model.apply({'params': gated}, x) for per-weight gates."
        )
    inputs = _check_inputs(gate, input_gate_params)
    if key is not None:
        key_parts(key, "key")
    keys = gate_keys(gate_params, key) if key is not None else {}
    in_keys = input_gate_keys(inputs, key) if key is not None else {}
    gated: set[str] = set()
    gated_inputs: set[str] = set()

    def interceptor(next_fun, call_args, call_kwargs, context):
        name = path_str(tuple(context.module.path) + ("kernel",))
        if context.method_name != "__call__":
            return next_fun(*call_args, **call_kwargs)
        if name in inputs and call_args:
            groups = getattr(context.module, "feature_group_count", 1)
            if groups != 1:
                # Gates folded into the kernel's rows (apply_gates, to_masks) would tie
                # the `groups` input channels sharing each row: refused, as nnx attach does.
                raise ValueError(
                    f"linen_apply: input_gate_params names {name!r}, a "
                    f"{type(context.module).__name__} with feature_group_count={groups} (a "
                    "grouped or depthwise conv), whose kernel holds in_features / groups rows "
                    "on axis -2, each shared by several input channels: input gates on it are "
                    f"not supported. Fix: {_GROUPED_FIX}."
                )
            x, *rest = call_args
            g = sample_unit_gate(gate, inputs[name], in_keys.get(name), x)
            x = _gate_features(x, g, repr(name), "nn.Dense, channels-last nn.Conv")
            call_args = (x, *rest)
            gated_inputs.add(name)
        out = next_fun(*call_args, **call_kwargs)
        if name not in gate_params:
            return out
        gated.add(name)
        z = sample_unit_gate(gate, gate_params[name], keys.get(name), out)
        return out * z.astype(out.dtype)

    with nn.intercept_methods(interceptor):
        out = model.apply(variables, *args, **kwargs)
    missing = sorted(set(gate_params) - gated) + [
        f"{n}{INPUTS_SUFFIX}" for n in sorted(set(inputs) - gated_inputs)
    ]
    unkernel = [n for n in missing if n.removesuffix(INPUTS_SUFFIX).split("/")[-1] != "kernel"]
    if unkernel:
        # The default where of init_gates takes any 2-D leaf, an nn.Embed table too.
        raise ValueError(
            f"linen_apply: the gates {unkernel[:5]} name no 'kernel' param, and linen_apply "
            "gates the output of the submodule calls whose 'path/kernel' is gated (nn.Dense, "
            "nn.Conv, nn.DenseGeneral, ...), so these gate nothing. Fix: leave them out with "
            "init_gates(gate, variables['params'], where=lambda p, x: p[-1] == 'kernel'), or "
            "gate them with apply_gates(gate, params, gate_params) and "
            "model.apply({'params': gated}, x)."
        )
    if missing:
        # A gate on no called layer would silently not gate anything.
        raise ValueError(
            f"linen_apply: no submodule call matched the gates {missing[:5]} (a gate named "
            "'path/kernel' applies to the __call__ of the submodule at 'path'; input gates "
            "need the input passed positionally). Fix: build the gates with "
            "jp.gates.init_gates(gate, variables['params'], ...)."
        )
    return out
