"""Leaf paths and filters: which leaves of any pytree are prunable.

One path convention for every pytree jaxprune touches (linen dicts, ``nnx.State``
wrapped in Variables or pure, equinox modules, lists, tuples, NamedTuples): a
path is a tuple of ``str`` (dict keys, attribute names) and ``int`` (sequence
indices), with nnx's trailing ``.value`` stripped, so the same leaf has the same
path whether a state arrives Variable-wrapped (``tx.init``) or pure
(``tx.update``).
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Path = tuple[str | int, ...]
Where = Callable[[Path, Any], bool]

__all__ = [
    "Path",
    "Where",
    "is_prunable",
    "is_channel_bias",
    "is_variable",
    "leaves_with_paths",
    "path_str",
    "prunable_flags",
    "unwrap_variables",
    "mirror_variables",
    "mirrors_variables",
    "check_same_structure",
    "check_where",
    "flagged",
    "as_int",
]


def is_variable(x: Any) -> bool:
    """Returns whether ``x`` is a flax nnx ``Variable`` (wrapping one array)."""
    return isinstance(x, nnx.Variable)


def unwrap_variables(tree: Any) -> Any:
    """Returns ``tree`` with every nnx ``Variable`` replaced by its array."""
    return jax.tree.map(lambda x: x.get_value() if is_variable(x) else x, tree, is_leaf=is_variable)


def mirror_variables(template: Any, out: Any) -> Any:
    """Returns ``out`` wrapped in the nnx ``Variable`` s that wrap ``template`` 's arrays.

    ``out`` has ``template`` 's pure structure (what :func:`leaves_with_paths`
    unflattens to); each of its leaves where ``template`` holds a Variable is
    put in a copy of that Variable (same type and metadata), so a mask tree
    of a Variable-wrapped ``nnx.State`` has exactly that state's tree
    structure. Without Variables in ``template``, ``out`` is returned as is.
    """
    if not any(map(is_variable, jax.tree.leaves(template, is_leaf=is_variable))):
        return out
    return jax.tree.map(
        lambda v, x: v.replace(x) if is_variable(v) else x, template, out, is_leaf=is_variable
    )


def mirrors_variables(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps ``fn(tree, ...)`` (returning the pure structure) in :func:`mirror_variables`."""

    @functools.wraps(fn)
    def wrapper(tree: Any, *args: Any, **kwargs: Any) -> Any:
        return mirror_variables(tree, fn(tree, *args, **kwargs))

    return wrapper


def _key_name(key: Any) -> str | int:
    if isinstance(key, jax.tree_util.DictKey):
        k = key.key
        return k if isinstance(k, int) else str(k)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.SequenceKey):
        return key.idx
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return key.key
    return str(key)


def _normalize(path: tuple[Any, ...]) -> Path:
    """Returns a jax KeyPath as a tuple of names and indices.

    Give it paths that stop at nnx Variables (``is_leaf=is_variable``) or of
    unwrapped trees: a trailing ``value`` is kept, since it may be a NamedTuple
    or dataclass field (``optax.lbfgs``'s state has one). For a path that may
    run into a Variable, use :func:`_normalize_into_variable`.
    """
    return tuple(_key_name(k) for k in path)


def _normalize_into_variable(path: tuple[Any, ...]) -> Path:
    """:func:`_normalize` for a path that may end inside an nnx Variable.

    Variables flatten to ``(..., GetAttrKey('value'))``; that last key is
    dropped so wrapped and pure states give a leaf the same path. Only for
    trees whose Variables were not made leaves: a NamedTuple field named
    ``value`` is dropped too.
    """
    out = _normalize(path)
    if out and out[-1] == "value" and isinstance(path[-1], jax.tree_util.GetAttrKey):
        out = out[:-1]
    return out


def path_str(path: Path) -> str:
    """Returns ``path`` joined with ``/`` (``('layers', 0, 'kernel')`` -> ``layers/0/kernel``).

    The empty path (a tree that is a single leaf) is ``<root>``.

    Args:
      path: a tuple of keys (``str`` or ``int``), as :func:`leaves_with_paths` and
        ``where`` predicates receive it; each key is written with ``str``.

    Examples:
      >>> import jaxprune as jp
      >>> jp.path_str(("layers", 0, "kernel")), jp.path_str(())
      ('layers/0/kernel', '<root>')
    """
    return "/".join(str(p) for p in path) if path else "<root>"


def leaves_with_paths(tree: Any) -> tuple[list[tuple[Path, Any]], Any]:
    """Returns ``([(path, leaf), ...], treedef)`` of ``tree`` with normalized paths.

    nnx Variables are unwrapped first, so the treedef is the pure one.

    Raises:
      ValueError: ``tree`` is an nnx ``Module``, whose treedef would rebuild a
        module holding bare arrays where its ``nnx.Param`` s were.
    """
    if isinstance(tree, nnx.Module):
        raise ValueError(
            f"got the nnx Module {type(tree).__name__} itself where a tree of arrays is expected; "
            "a result built from it would be a module holding bare arrays, not nnx.Params. Fix: "
            "pass its state, nnx.state(model, nnx.Param), and write pruned params back with "
            "nnx.update(model, pruned) (jp.sparsity, jp.report and jp.save take the module itself)."
        )
    tree = unwrap_variables(tree)
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [(_normalize(p), x) for p, x in flat], treedef


def is_prunable(path: Path, leaf: Any) -> bool:
    """Default ``where``: floating-point leaves with ``ndim >= 2`` (kernels; biases stay dense).

    A leaf named ``bias`` of shape ``[n, 1, ..., 1]`` (one entry per output
    channel, trailing singleton axes) is a bias too, and stays dense: equinox's
    ``Conv2d`` stores its bias as ``[out, 1, 1]`` (``Conv1d``: ``[out, 1]``),
    to broadcast over the spatial axes.

    Attention layers' ``[heads, head_dim]`` biases (flax ``MultiHeadAttention``,
    ``DenseGeneral``) are 2-D with more than one entry per head, so this
    predicate selects them. To keep every bias dense: ``where=lambda path, leaf:
    path[-1] != "bias" and jp.is_prunable(path, leaf)``.

    Args:
      path: the leaf's normalized path, a tuple of ``str``/``int`` keys (only its
        last key is read, to recognise a ``bias``).
      leaf: the leaf; anything without a ``dtype`` (a function, a Python number) is
        not prunable.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxprune as jp
      >>> jp.is_prunable(("w",), jnp.ones((3, 2))), jp.is_prunable(("b",), jnp.ones(2))
      (True, False)
      >>> jp.is_prunable(("conv", "bias"), jnp.ones((16, 1, 1)))  # an equinox Conv2d bias
      False
      >>> jp.is_prunable(("attn", "bias"), jnp.ones((4, 8)))  # [heads, head_dim]: selected
      True
      >>> jp.is_prunable(("ids",), jnp.ones((3, 2), jnp.int32))  # integer: never pruned
      False
      >>> jp.is_prunable(("activation",), jax.nn.relu)  # not an array (an equinox field)
      False
    """
    # A leaf without a dtype (a function an unfiltered equinox module holds,
    # a Python number) is never a weight; jnp.ndim on it is deprecated in JAX.
    if not hasattr(leaf, "dtype"):
        return False
    if is_channel_bias(path, leaf):
        return False
    return jnp.ndim(leaf) >= 2 and jnp.issubdtype(jnp.result_type(leaf), jnp.floating)


def is_channel_bias(path: Path, leaf: Any) -> bool:
    """Whether ``leaf`` is a bias named ``bias`` of shape ``[n, 1, ..., 1]`` (ndim >= 2).

    equinox convolutions store their biases so (``[out, 1, 1]``), ready to
    broadcast over the spatial axes; by shape alone they would pass for kernels.
    """
    shape = tuple(getattr(leaf, "shape", ()))
    return bool(path) and path[-1] == "bias" and len(shape) >= 2 and math.prod(shape[1:]) == 1


def _is_floating(leaf: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(leaf), jnp.floating)


def _is_numeric(leaf: Any) -> bool:
    """Whether ``leaf`` is a number or an array of numbers or bools (not a key or a function)."""
    if not (hasattr(leaf, "dtype") or isinstance(leaf, (int, float, complex, bool))):
        return False
    dtype = jnp.result_type(leaf)
    return dtype == jnp.bool_ or jnp.issubdtype(dtype, np.number)


def _dtype_name(leaf: Any) -> str:
    return str(jnp.result_type(leaf)) if hasattr(leaf, "dtype") else type(leaf).__name__


def prunable_flags(
    tree: Any,
    where: Where | None = None,
    *,
    allow_bool: bool = False,
    allow_numeric: bool = False,
) -> list[bool]:
    """Returns one bool per leaf of ``tree`` (flatten order): is it selected by ``where``?

    ``allow_numeric`` (for measuring, not pruning: ``jp.sparsity`` counts
    zeros): an explicit ``where`` may also select integer, complex and bool
    leaves. The default ``where`` is unchanged by it.

    Raises:
      ValueError: ``where`` selects a leaf that is not floating point (or bool
        when ``allow_bool``, or any number or bool when ``allow_numeric``),
        naming the leaf's path and dtype.
    """
    flat, _ = leaves_with_paths(tree)
    if where is None:
        if allow_bool or allow_numeric:
            return [
                bool(
                    hasattr(x, "dtype")
                    and np.ndim(x) >= 2
                    and (_is_floating(x) or jnp.result_type(x) == jnp.bool_)
                    and not is_channel_bias(p, x)
                )
                for p, x in flat
            ]
        return [bool(is_prunable(p, x)) for p, x in flat]
    check_where(where)
    flags = []
    for p, x in flat:
        selected = bool(where(p, x))
        if selected and allow_numeric:
            if not _is_numeric(x):
                raise ValueError(
                    f"where selected leaf {path_str(p)!r} of dtype {_dtype_name(x)}, but only "
                    "numeric or bool leaves have zeros to count. Fix: make `where` return "
                    f"False for {path_str(p)!r}, e.g. `where=lambda path, x: "
                    "jnp.issubdtype(x.dtype, jnp.number) and ...`."
                )
        elif selected and not (_is_floating(x) or (allow_bool and jnp.result_type(x) == jnp.bool_)):
            raise ValueError(
                f"where selected leaf {path_str(p)!r} of dtype {jnp.result_type(x)}, but "
                "only floating-point leaves can be pruned. Fix: make `where` return "
                f"False for {path_str(p)!r}, e.g. `where=lambda path, x: "
                "jnp.issubdtype(x.dtype, jnp.floating) and ...`."
            )
        flags.append(selected)
    return flags


def check_where(where: Any) -> None:
    """Raises ``ValueError`` unless ``where`` is ``None`` or a predicate."""
    if where is not None and not callable(where):
        raise ValueError(
            f"where must be a predicate (path, leaf) -> bool, or None, got {where!r}. Fix: "
            "e.g. where=lambda path, leaf: leaf.ndim >= 2."
        )


def flagged(tree: Any, flags: list[bool]) -> Where:
    """Returns a ``where`` selecting, by path, the leaves of ``tree`` that ``flags`` marks.

    For trees that mirror ``tree`` (scores, masks): asking the user's ``where``
    again about them would judge other dtypes (float32 scores, bool masks).
    """
    chosen = {p for (p, _), f in zip(leaves_with_paths(tree)[0], flags, strict=True) if f}
    return lambda path, _: path in chosen


def as_float(value: Any) -> float:
    """Returns ``value`` as a float; ``nan`` (so every range check fails) for non-numbers.

    Strings, bytes, bools and None count as non-numbers: ``float("0.5")`` and
    ``float(True)`` would pass a range check silently.
    """
    if isinstance(value, (str, bytes, bool)) or value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def as_int(value: Any) -> int | None:
    """Returns ``value`` as a Python int (ints, NumPy and concrete JAX integers), else None."""
    if isinstance(value, (bool, np.bool_)) or isinstance(value, jax.core.Tracer):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _path_detail(a: list[str], only_a: str, b: list[str], only_b: str, limit: int) -> list[str]:
    """Returns ``"<only_a>: ..."`` (paths only in ``a``) and ``"<only_b>: ..."``, when non-empty."""
    out = []
    for label, paths in ((only_a, sorted(set(a) - set(b))), (only_b, sorted(set(b) - set(a)))):
        if paths:
            out.append(f"{label}: {', '.join(paths[:limit])}")
    return out


def check_same_structure(
    reference: Any, other: Any, *, ref_name: str, other_name: str, fix: str | None = None
) -> None:
    """Raises ``ValueError`` listing the differing paths when the tree structures differ.

    ``fix`` replaces the default advice (build masks from the params' scores).
    """
    ref_flat, ref_def = leaves_with_paths(reference)
    oth_flat, oth_def = leaves_with_paths(other)
    if ref_def == oth_def:
        return
    detail = _path_detail(
        [path_str(p) for p, _ in ref_flat],
        f"only in {ref_name}",
        [path_str(p) for p, _ in oth_flat],
        f"only in {other_name}",
        10,
    )
    if not detail:
        detail.append(f"same paths but different containers:\n  {ref_def}\nvs\n  {oth_def}")
    if fix is None:
        fix = (
            f"build {other_name} from {ref_name} (e.g. with jp.masks.topk(scores) where "
            f"scores = criterion({ref_name}))"
        )
    raise ValueError(
        f"{other_name} must have exactly the tree structure of {ref_name}; "
        + "; ".join(detail)
        + f". Fix: {fix}."
    )


def check_same_leaves(
    tree: Any, reference: Any, name: str, ref_name: str, fix: str | None = None
) -> None:
    """Raises ``ValueError`` unless ``tree`` has ``reference``'s leaf paths and shapes.

    Containers may differ (a ``FrozenDict`` of grads against a dict of
    params, an ``nnx.State`` of Variables against a pure one); the error names
    the first differing paths or shapes, then ``fix`` (default: advice for
    ``jp.prune``'s updates and grads). Runs at trace time only.
    """
    flat, _ = leaves_with_paths(tree)
    ref_flat, _ = leaves_with_paths(reference)
    # np.shape reads .shape where there is one (arrays, tracers) and gives ()
    # for other leaves, where jnp.shape warns (an error in a future JAX).
    got = [(path_str(p), tuple(np.shape(x))) for p, x in flat]
    want = [(path_str(p), tuple(np.shape(x))) for p, x in ref_flat]
    if got == want:
        return
    paths, ref_paths = [p for p, _ in got], [p for p, _ in want]
    if paths != ref_paths:
        parts = _path_detail(ref_paths, f"missing in {name}", paths, f"not in {ref_name}", 8)
        detail = "; ".join(parts or ["the same paths in a different order"])
    else:
        bad = [(p, s, r) for (p, s), (_, r) in zip(got, want, strict=True) if s != r]
        detail = "; ".join(f"{p}: {s} vs {r}" for p, s, r in bad[:8])
    if fix is None:
        fix = (
            f"pass {name} computed from these {ref_name} (a wrapper such as optax.lookahead, "
            "whose params are a pair of trees, cannot go inside jp.prune)"
        )
    raise ValueError(
        f"{name} must have the leaves (paths and shapes) of {ref_name}; {detail}. Fix: {fix}."
    )


def map_pair(fn: Any, tree: Any, other: Any, other_name: str, fix: str) -> Any:
    """Returns ``fn(path, x, y)`` over the paired leaves of two trees, in ``tree``'s structure.

    The two must have the same leaf paths and shapes (checked, naming
    ``other_name`` and ``fix``); their containers may differ, e.g. an
    ``nnx.State`` of Variables against the pure one ``jax.grad`` returns, or a
    ``FrozenDict`` against a dict.
    """
    check_same_leaves(other, tree, other_name, "params", fix=fix)
    flat, treedef = leaves_with_paths(tree)
    others = [y for _, y in leaves_with_paths(other)[0]]
    out = [fn(p, x, y) for (p, x), y in zip(flat, others, strict=True)]
    return jax.tree.unflatten(treedef, out)


def check_array_leaves(tree: Any, name: str) -> None:
    """Raises ``ValueError`` naming the first leaf of ``tree`` that is not an array or a number.

    An unfiltered equinox module holds its activation functions as leaves.
    """
    for p, x in leaves_with_paths(tree)[0]:
        check_array_leaf(x, p, name)


def check_array_leaf(leaf: Any, path: Path, name: str) -> None:
    """Raises ``ValueError`` naming ``path`` unless ``leaf`` is an array or a number."""
    if not (hasattr(leaf, "dtype") or isinstance(leaf, (int, float, complex, bool))):
        raise ValueError(
            f"{name} leaf {path_str(path)!r} is a {type(leaf).__name__}, not an array. Fix: pass "
            "the arrays only, e.g. eqx.filter(model, eqx.is_inexact_array) for an equinox "
            "module, or nnx.state(model, nnx.Param) for flax nnx."
        )


def key_parts(key: Any, name: str) -> tuple[jax.Array, Any]:
    """Returns ``(key_data, impl)`` of a typed or raw PRNG key, to rebuild it inside a step.

    Raises ``ValueError`` naming ``name`` for anything that is not a key.
    """
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(
                f"{name} must be one PRNG key, got a batch of keys of shape {key.shape}. Fix: "
                f"pass one key (e.g. {name}=keys[0]), or jax.vmap over the keys."
            )
        return jax.random.key_data(key), jax.random.key_impl(key)
    if isinstance(key, jax.Array) and key.dtype == jnp.uint32 and key.shape == (2,):
        return key, None  # a raw key of the default implementation
    raise ValueError(
        f"{name} must be a PRNG key, got {key!r}. Fix: {name}=jax.random.key(0) (any "
        "implementation)."
    )
