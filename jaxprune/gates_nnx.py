"""Learned gates attached to flax nnx models by wrapping their layers.

:func:`attach` replaces selected ``nnx.Linear`` / ``nnx.Conv`` layers in place
by :class:`Gated` wrappers that multiply each output unit by its gate; the
model's own ``__call__`` is untouched. Gate parameters are :class:`GateParam`
variables (an ``nnx.Param`` subclass, attribute names starting with ``gate_``),
so they train with the same optimizer as the weights or with their own via
:func:`jaxprune.gates.multi_transform`. Samples come from a per-layer key
(:class:`GateKey`) that :func:`reseed` sets from one explicit key inside the
jitted step; ``model.eval()`` switches every wrapper to its deterministic
test-time gate. A forward pass reads the key and never advances it (unlike
``nnx.Dropout``'s ``Rngs``): without :func:`reseed` every step draws the same
sample.

:func:`attach` warns (:class:`GateBeforeBatchNormWarning`, defined in
:mod:`jaxprune.gates_bn`) when a gate that is one value per unit for the whole
batch multiplies a layer feeding a ``nnx.BatchNorm``, which divides it back out.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxprune._tree import key_parts, leaves_with_paths, path_str
from jaxprune.gates_bn import GateBeforeBatchNormWarning, _warn_batchnorm
from jaxprune.gates_checks import _check_gate, _require_per_unit
from jaxprune.gates_layer import Gated, GateKey, GateParam, _check_grouped_inputs
from jaxprune.gates_layout import _aliases, _check_replaceable, _parent_and_name, _set_child
from jaxprune.gates_masks import to_masks
from jaxprune.gates_tree import Gate, _scale_rows

__all__ = [
    "GateBeforeBatchNormWarning",
    "GateKey",
    "GateParam",
    "Gated",
    "attach",
    "detach",
    "gated_layers",
    "hard_masks",
    "model_penalty",
    "reseed",
    "with_features",
]


def _is_linear_or_conv(path: tuple, module: Any) -> bool:
    del path
    return isinstance(module, (nnx.Linear, nnx.Conv))


def gated_layers(model: nnx.Module) -> list[tuple[tuple, Gated]]:
    """Returns ``[(path, Gated), ...]`` for every gated layer of ``model``, in a fixed order.

    Args:
      model: any nnx module; one without gated layers gives ``[]``.

    Examples:
      >>> import jax
      >>> from flax import nnx
      >>> from jaxprune import gates, models
      >>> m = models.MLP((4, 3, 2), rngs=nnx.Rngs(0))
      >>> gates.gated_layers(m)
      []
      >>> _ = gates.attach(m, gates.ScalarGate(), key=jax.random.key(0))
      >>> [(path, type(g.module).__name__) for path, g in gates.gated_layers(m)]
      [(('layers', 0), 'Linear'), (('layers', 1), 'Linear')]
    """
    return sorted(
        ((tuple(p), m) for p, m in nnx.iter_modules(model) if isinstance(m, Gated)),
        key=lambda pm: path_str(pm[0]),
    )


def attach(
    model: nnx.Module,
    gate: Gate,
    *,
    key: jax.Array,
    where: Callable[[tuple, Any], bool] | None = None,
    skip: Sequence[str] = (),
    inputs: Sequence[str] = (),
) -> nnx.Module:
    """Returns ``model`` with gates attached to its layers, in place (no hand rewriting).

    Args:
      model: any nnx module.
      gate: a gate kind, e.g. ``jp.gates.BetaBernoulli()``.
      key: PRNG key for gate initialization and the per-layer sample keys.
      where: predicate ``(path, module) -> bool``; default every ``nnx.Linear``
        and ``nnx.Conv``.
      skip: layer paths (``"fc2"``, ``"layers/2"``) whose outputs stay ungated:
        the classifier, whose outputs are logits, belongs here.
      inputs: layer paths whose input features (a dense layer's inputs, a
        conv's input channels) are gated too, one gate per feature; e.g.
        ``("fc1",)`` gates the flattened conv features entering LeNet-5-Caffe's
        ``fc1``, as in beta-Bernoulli dropout and ANP-VS. Needs a per-unit kind.

    Returns:
      The same ``model`` object, its selected layers wrapped by :class:`Gated`.

    In train mode each gated layer draws its sample from its :class:`GateKey`,
    which a forward pass reads but never advances (unlike ``nnx.Dropout``):
    call :func:`reseed` with a fresh key at the top of every train step.
    Without it every step draws the same sample, and the stochastic gates
    become one fixed noise pattern. The wrappers start in train mode whatever
    mode the model was in (a model without Dropout or BatchNorm keeps no record
    of ``model.eval()``): call ``model.eval()`` after ``attach`` for the
    deterministic test-time gates.

    With a gate that is one value per unit for the whole batch (the default
    shared sample, or :class:`~jaxprune.gates.ScalarGate`) on a layer whose
    next layer is a ``nnx.BatchNorm``, a :class:`GateBeforeBatchNormWarning` says
    that the BatchNorm divides the gates back out in train mode. Fix: ``per_example=True``,
    or ``skip`` the layer and gate the next layer's ``inputs``.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxprune as jp
      >>> from jaxprune import gates, models
      >>> from flax import nnx
      >>> model = models.lenet_300_100(rngs=nnx.Rngs(0))
      >>> _ = gates.attach(model, gates.HardConcrete(), key=jax.random.key(0),
      ...                     skip=("layers/2",))
      >>> [path for path, _ in gates.gated_layers(model)]
      [('layers', 0), ('layers', 1)]
      >>> model.eval(); model(jnp.ones((1, 784))).shape
      (1, 10)

      In the train step, reseed first, with a new key each step:

      >>> x = jax.random.uniform(jax.random.key(1), (2, 784))
      >>> @nnx.jit
      ... def step(model, key):
      ...     gates.reseed(model, key)  # a fresh gate sample for this step
      ...     return model(x)  # the loss and its update go here
      >>> model.train()
      >>> a, b = step(model, jax.random.key(1)), step(model, jax.random.key(2))
      >>> bool((a != b).any())  # two keys, two samples
      True
      >>> bool((model(x) == model(x)).all())  # no reseed: the same sample again
      True

    References:
      Louizos et al. 2018, https://arxiv.org/abs/1712.01312; Lee et al. 2018,
      https://arxiv.org/abs/1805.10896
    """
    _check_gate(gate)
    key_parts(key, "key")  # a clear error for key=0 or None
    where = where or _is_linear_or_conv
    skip = set(skip)
    modules = [(tuple(p), m) for p, m in nnx.iter_modules(model)]
    wrapped = [p for p, m in modules if isinstance(m, Gated)]

    def inside_wrapped(p: tuple) -> bool:
        return any(p[: len(w)] == w for w in wrapped)

    chosen = [
        (p, m)
        for p, m in modules
        if p and not inside_wrapped(p) and path_str(p) not in skip and where(p, m)
    ]
    if not chosen and not inputs:
        already = [
            p
            for p, m in modules
            if p and inside_wrapped(p) and path_str(p) not in skip and where(p, m)
        ]
        if wrapped and already:
            # The layers `where` picks are inside Gated wrappers: gated by an earlier attach.
            raise ValueError(
                f"attach found no layer to gate: the layers `where` selects are already gated "
                f"({[path_str(p) for p in wrapped][:10]}; gates.gated_layers(model) lists "
                "them), and a layer is gated once. Fix: attach to the plain model, or "
                "gates.detach(model) (a copy without gates, the trained gates folded in) "
                "and attach to that."
            )
        raise ValueError(
            "attach found no layer to gate. Fix: check `where` and `skip` (default where: "
            "nnx.Linear and nnx.Conv layers)."
        )
    by_name = {path_str(p): (p, m) for p, m in modules if p}
    layer_names = sorted(n for n, pm in by_name.items() if _is_linear_or_conv(*pm))
    unknown = sorted(n for n in skip if n not in by_name)
    if unknown:
        # A misspelt skip would silently gate the layer meant to stay ungated.
        raise ValueError(
            f"skip names {unknown}, which are not layers of the model; its layers: "
            f"{layer_names[:10]}. Fix: name layers by their '/'-joined attribute path, e.g. "
            "skip=('fc2',) (not 'fc2/kernel')."
        )
    gate_inputs = set(inputs)
    gated = sorted(
        n
        for n in gate_inputs
        if n in by_name and (isinstance(by_name[n][1], Gated) or inside_wrapped(by_name[n][0]))
    )
    if gated:
        raise ValueError(
            f"inputs names {gated}, which are already gated (gates.gated_layers(model) lists "
            "them): a layer is wrapped once, so its input gates come in the attach call that "
            "gates it. Fix: attach(..., inputs=...) on the plain model, or on "
            "gates.detach(model)."
        )
    bad = sorted(n for n in gate_inputs if n not in by_name or not _is_linear_or_conv(*by_name[n]))
    if bad:
        ungated = [n for n in layer_names if not inside_wrapped(by_name[n][0])]
        raise ValueError(
            f"inputs names {bad}, which are not ungated nnx.Linear / nnx.Conv layers of the "
            f"model; its ungated layers: {ungated[:10]}. "
            "Fix: name layers by their '/'-joined attribute path, e.g. inputs=('fc1',)."
        )
    if gate_inputs:
        _require_per_unit(gate, "inputs=")
    for n in sorted(gate_inputs):
        _check_grouped_inputs(by_name[n][1], repr(n))  # before any layer is wrapped
    outputs = {path_str(p) for p, _ in chosen}
    if gate.per_unit and not getattr(gate, "per_example", False):
        _warn_batchnorm(model, gate, chosen)
    layers = sorted([by_name[n] for n in outputs | gate_inputs], key=lambda pm: path_str(pm[0]))
    _check_replaceable(model, [a for path, m in layers for a in _aliases(model, m) or [path]])
    for i, (path, m) in enumerate(layers):
        wrapper = Gated(
            m,
            gate,
            key=jax.random.fold_in(key, i),
            outputs=path_str(path) in outputs,
            inputs=path_str(path) in gate_inputs,
        )
        # A layer held at several attributes (tied) gets one wrapper at all of them.
        for alias in _aliases(model, m) or [path]:
            _set_child(*_parent_and_name(model, alias), wrapper)
    return model


def reseed(model: nnx.Module, key: jax.Array) -> None:
    """Sets every gated layer's sample key from ``key`` (``fold_in(key, index)``), in place.

    Call it at the top of the jitted train step with a fresh key per step so
    the samples are a pure function of that key. ``index`` counts the gated
    layers in :func:`gated_layers` order (sorted by path).

    Args:
      model: an nnx model with gates attached (:func:`attach`); one without
        gated layers is left as it is.
      key: one PRNG key, a fresh one every step.

    Examples:
      >>> import jax
      >>> from flax import nnx
      >>> from jaxprune import gates, models
      >>> m = models.MLP((4, 3, 2), rngs=nnx.Rngs(0))
      >>> _ = gates.attach(m, gates.ScalarGate(), key=jax.random.key(0))
      >>> gates.reseed(m, jax.random.key(7))
      >>> k = gates.gated_layers(m)[1][1].gate_key.get_value()
      >>> bool((jax.random.key_data(k) == jax.random.key_data(
      ...     jax.random.fold_in(jax.random.key(7), 1))).all())
      True
    """
    key_parts(key, "key")
    for i, (_, m) in enumerate(gated_layers(model)):
        m.gate_key.set_value(jax.random.fold_in(key, i))


def model_penalty(model: nnx.Module) -> jax.Array:
    """Returns the regularizer (expected L0, KL, ...) of every gated layer of ``model``.

    The layers are grouped by gate kind and each kind's ``penalty`` is called
    once on all of its layers, exactly as the functional
    :func:`jaxprune.gates.penalty` does: a penalty need not be a sum over
    layers. :class:`~jaxprune.gates.ScalarGate`'s ``weight * (mean |g| - target)**2``
    takes the mean over all gates of the network (Wang et al. 2020,
    https://arxiv.org/abs/1909.12579), which a per-layer sum would not. The
    totals of the different kinds are added.

    Args:
      model: an nnx model with gates attached (:func:`attach`); one without
        gated layers gives ``0.0``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from jaxprune import gates, models
      >>> m = models.lenet_300_100(rngs=nnx.Rngs(0))
      >>> _ = gates.attach(m, gates.ScalarGate(), key=jax.random.key(0), skip=("layers/2",))
      >>> gates.gated_layers(m)[1][1].gate_scale.set_value(jnp.zeros(100))
      >>> round(float(gates.model_penalty(m)), 3)  # 0.5 * (300 / 400 - 0.2)**2
      0.151
    """
    by_kind: dict[Any, tuple[list, list]] = {}
    for _, m in gated_layers(model):
        gps, kernels = by_kind.setdefault(m.gate, ([], []))
        kernel = m.module.kernel.get_value()
        if m.gate_names:
            gps.append(m.gate_params())
            kernels.append(kernel)
        if m.input_gate_names:
            gps.append(m.input_gate_params())
            kernels.append(jnp.swapaxes(kernel, -1, -2))
    total = jnp.float32(0)
    for gate, (gps, kernels) in by_kind.items():
        total = total + gate.penalty(gps, kernels)
    return total


def with_features(
    model: nnx.Module, *args: Any, paths: Sequence[str] | None = None, **kwargs: Any
) -> tuple[Any, list[jax.Array]]:
    """Returns ``(model(*args), [outputs of the chosen layers])``: latent features for attacks.

    Args:
      model: any nnx module.
      *args, **kwargs: the model's call arguments.
      paths: layer paths (``"conv1"``, ``"layers/0"``) whose outputs to return;
        default the gated layers (their gated outputs), in :func:`gated_layers` order.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jaxprune import gates, models
      >>> m = models.lenet_300_100(rngs=nnx.Rngs(0))
      >>> y, feats = gates.with_features(m, jnp.ones((2, 784)), paths=["layers/0"])
      >>> y.shape, feats[0].shape
      ((2, 10), (2, 300))
    """
    if paths is None:
        paths = [path_str(p) for p, _ in gated_layers(model)]
        if not paths:
            raise ValueError(
                "with_features found no gated layer. Fix: attach gates first, or pass "
                "paths=['conv1', ...] naming the layers whose outputs you want."
            )
    out, inter = nnx.capture(model, nnx.Intermediate, method_outputs=nnx.Intermediate)(
        *args, **kwargs
    )
    by_path = {
        path_str(tuple(p[:-1])): v.get_value()
        for p, v in nnx.to_flat_state(inter)
        if p and p[-1] == "__call__"
    }
    missing = [p for p in paths if p not in by_path]
    if missing:
        raise ValueError(
            f"with_features: no layer at {missing}; layers called: {sorted(by_path)[:10]}. "
            "Fix: name layers by their '/'-joined attribute path, e.g. 'layers/0'."
        )
    # A layer called several times sows one output per call; the last call wins.
    return out, [by_path[p][-1] for p in paths]


def _fold(m: Gated) -> nnx.Module:
    kernel, scale = m.module.kernel.get_value(), None
    if m.gate_names:
        kernel, scale = m.gate.apply(m.gate_params(), kernel, None)
    if m.input_gate_names:
        kernel = _scale_rows(
            type(m.module).__name__, kernel, m.gate.unit_gate(m.input_gate_params(), None)
        )
    inner = nnx.clone(m.module)
    inner.kernel.set_value(kernel)
    bias = getattr(inner, "bias", None)
    if scale is not None and bias is not None:
        inner.bias.set_value(bias.get_value() * scale.astype(bias.get_value().dtype))
    return inner


def detach(model: nnx.Module) -> nnx.Module:
    """Returns a copy of ``model`` without gates, the test-time gates folded into the weights.

    Its outputs equal the gated model's in eval mode; its params tree is the
    original model's, so :func:`hard_masks` mirror it and the structured
    shrink applies.

    Args:
      model: an nnx model with gates attached (:func:`attach`); it is left
        unchanged. One without gated layers comes back as a plain copy.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from jaxprune import gates, models
      >>> m = models.MLP((4, 3, 2), rngs=nnx.Rngs(0))
      >>> _ = gates.attach(m, gates.ScalarGate(), key=jax.random.key(0), skip=("layers/1",))
      >>> gates.gated_layers(m)[0][1].gate_scale.set_value(jnp.array([1.0, 0.0, 1.0]))
      >>> plain = gates.detach(m)
      >>> type(plain.layers[0]).__name__, gates.gated_layers(plain)
      ('Linear', [])
      >>> bool((plain.layers[0].kernel.get_value()[:, 1] == 0).all())  # the closed gate, folded
      True
      >>> m.eval(); bool(jnp.allclose(plain(jnp.ones((1, 4))), m(jnp.ones((1, 4)))))
      True
    """
    out = nnx.clone(model)
    for path, m in gated_layers(out):
        folded = _fold(m)
        for alias in _aliases(out, m) or [path]:
            _set_child(*_parent_and_name(out, alias), folded)
    return out


def hard_masks(
    model: nnx.Module, *, sparsity: float | None = None, max_sparsity: float | None = None
) -> Any:
    """Returns bool masks mirroring ``nnx.state(detach(model), nnx.Param)`` from the gates.

    Pruned units have ``False`` kernel columns and biases; pruned input
    features (``attach(..., inputs=...)``) have ``False`` kernel rows. With
    ``sparsity``, the top ``1 - sparsity`` of the gates' scores are kept
    across layers, input gates included, and ``max_sparsity`` caps what any
    one layer loses. All gated layers must share one gate kind.

    Args:
      model: an nnx model with gates attached (:func:`attach`), not its
        :func:`detach`-ed copy; it is left unchanged.
      sparsity: ``None`` (default) keeps what each gate's test-time rule
        keeps; a fraction in ``[0, 1]`` instead prunes exactly that fraction
        of all the gates' units (weights, for a per-weight kind), ranked by
        the gates' scores across layers.
      max_sparsity: with ``sparsity``, the most any one layer may lose, a
        Python number in ``[0, 1]``; default ``None``, no cap. Refused
        without ``sparsity``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from jaxprune import gates, models
      >>> m = models.MLP((4, 3, 2), rngs=nnx.Rngs(0))
      >>> _ = gates.attach(m, gates.ScalarGate(), key=jax.random.key(0), skip=("layers/1",))
      >>> gates.gated_layers(m)[0][1].gate_scale.set_value(jnp.array([1.0, 0.0, 1.0]))
      >>> masks = gates.hard_masks(m)
      >>> masks["layers"][0]["bias"].tolist(), masks["layers"][0]["kernel"][0].tolist()
      ([True, False, True], [True, False, True])
      >>> bool(masks["layers"][1]["kernel"].get_value())  # an ungated layer is kept whole
      True
    """
    layers = gated_layers(model)
    kinds = {m.gate for _, m in layers}
    if not kinds:
        raise ValueError(
            f"hard_masks found no gated layer in this {type(model).__name__} "
            "(gates.gated_layers(model) is empty). Fix: attach gates first "
            "(gates.attach); detach(model) removes them, so take the masks from the gated "
            "model: hard_masks(model), not hard_masks(detach(model))."
        )
    if len(kinds) != 1:
        raise ValueError(
            f"hard_masks needs one gate kind across layers, got {len(kinds)}: {kinds}. Fix: "
            "build masks per kind with jp.gates.to_masks on each layer's gate_params()."
        )
    plain = detach(model)
    params = nnx.state(plain, nnx.Param)
    gp = {path_str(path + ("kernel",)): m.gate_params() for path, m in layers if m.gate_names}
    gpi = {
        path_str(path + ("kernel",)): m.input_gate_params()
        for path, m in layers
        if m.input_gate_names
    }
    with warnings.catch_warnings():
        # Warned below, with the fix that fits a gated nnx model.
        warnings.filterwarnings("ignore", message="unit_masks pruned every")
        masks = to_masks(
            kinds.pop(),
            gp,
            params,
            sparsity=sparsity,
            input_gate_params=gpi or None,
            max_sparsity=max_sparsity,
        )
    emptied = [
        path_str(p)
        for p, m in leaves_with_paths(masks)[0]
        if p
        and p[-1] == "kernel"
        and jnp.ndim(m) >= 2
        and not isinstance(m, jax.core.Tracer)
        and not bool(jnp.any(m))
    ]
    if emptied:
        fix = (
            "a lower sparsity (ranked across layers, the gates can empty a layer)"
            if sparsity is not None
            else "a weaker regularizer (smaller KL or L0 weight), fewer training steps, or "
            "hard_masks(model, sparsity=...) for a set budget"
        )
        warnings.warn(
            f"hard_masks pruned every unit of {emptied[:5]}: the network's output no longer "
            f"depends on its input through them. Fix: {fix}.",
            stacklevel=2,
        )
    return masks
