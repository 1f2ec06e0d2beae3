"""Reports of a pruned model: per-leaf sparsity, dense and compressed bytes, FLOPs.

Honest numbers: *sparsity* is the fraction of zero
entries after the masks are applied (a ``-0.0`` counts as zero); *compressed
bytes* are what ``jp.save(format="compressed")`` and ``jaxprune export
--format compressed`` store for the masked leaf, packed with its mask by the
smallest exact encoding of :mod:`jaxprune.packing` (a scalar ``True`` mask
keeps its leaf dense), plus the mask's bits where the checkpoint needs them. That
encoding restores bit for bit, so it keeps every entry whose bits are not
``+0.0``: a ``-0.0`` left by masking with ``w * mask`` (as
``torch.nn.utils.prune`` does) counts as pruned in the sparsity but is stored,
and in the bytes; each row's ``stored_zeros`` counts them, the table names
them, and ``jp.apply_masks(params, masks)`` turns them into ``+0.0``. Values
outside their masks that are not zero yet (``unzeroed``) are counted and
packed as zeros, as ``jp.prune`` keeps them: ``jp.save`` of such params stores
them unless they are masked first. *Dense FLOPs* come from XLA's cost analysis
of the lowered apply function, which counts the body of a loop (``lax.scan``,
``fori_loop``, ``while_loop``, ``nn.scan``, ``nnx.scan``) once whatever its
trip count: ``flops["loops"]`` counts such loops, and the table then says to
read the MACs, which multiply a scan's body by its length (a
``while_loop``'s trip count is not in the jaxpr and its body counts once).
FLOPs and MACs are those of the whole ``example_inputs`` batch. *Nonzero MACs*
follow ShrinkBench: the multiply-adds of convolutions and matrix products
(read from the jaxpr's ``conv_general_dilated`` and ``dot_general``), each
scaled by the density of the parameter it multiplies, followed through
reshapes, negation, ``stop_gradient``, slices and gathers of its parts (a
stacked layer's ``w[i]``, experts' kernels ``experts[ids]``, columns
``w[:, idx]``), scaling and masking (``w * c``, ``w / c``, flax's
``WeightNorm`` and ``SpectralNorm``, a folded BatchNorm ``w * gamma``: the
lowest density of the params multiplied, an upper bound), and kernels built
by ``concatenate`` of params (flax's ``OptimizedLSTMCell``, a fused QKV) or a
zero ``pad`` (the size-weighted density of the parts). A gather of 1-D rows
along the leading axis (``table[ids]``) is taken for an embedding lookup,
whose result is an activation; rows of a 2-D kernel picked the same way
(``w[idx]``) look alike, and the matmul that reads them counts as dense. A
regular conv's MACs count every kernel tap of every output, the taps over its
zero padding included (ShrinkBench's convention, and that of published counts
such as ResNet-50's 4.1 GMACs); a transposed conv's with strides above 1
only the taps on real input pixels (not the zeros inserted between them; at
stride 1 it is a regular padded conv). XLA counts neither
padded nor inserted taps: ``flops["padded_macs"]`` is the part of
``dense_macs`` over padding. Unstructured sparsity on dense hardware gives no
speedup: nonzero MACs are what a sparse kernel could skip, not a measured time.

References:
  Blalock et al., "What is the State of Neural Network Pruning?" (ShrinkBench),
  2020. https://arxiv.org/abs/2003.03033
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxprune import packing
from jaxprune._mask_apply import _broadcast_prefix
from jaxprune._tree import check_array_leaves, leaves_with_paths, path_str, unwrap_variables
from jaxprune.checkpoint_trees import bool_mask, mask_kind, reroot_masks
from jaxprune.report_flops import _flops

__all__ = ["LeafRow", "Report", "report", "plot_sparsity", "plot_accuracy_vs_compression"]


@dataclasses.dataclass(frozen=True)
class LeafRow:
    """One leaf of a :class:`Report`.

    Args:
      path: the leaf's path, as :func:`jaxprune.path_str` writes it (e.g. ``"dense/kernel"``).
      shape: the leaf's shape.
      dtype: the leaf's dtype name (e.g. ``"float32"``).
      size: the number of entries of the leaf.
      nonzeros: the entries that are not zero after the mask (a ``-0.0`` counts as zero).
      sparsity: the fraction of zero entries after the mask, ``1 - nonzeros / size``
        (0.0 for an empty leaf).
      dense_bytes: the leaf's bytes stored dense.
      compressed_bytes: the bytes ``jp.save(format="compressed")`` stores for the masked
        leaf (packed by :func:`jaxprune.packing.pack_leaf`), plus the mask's bits when the
        checkpoint needs them.
      encoding: the packing kind: ``"dense"``, ``"slices"``, ``"nm"`` or ``"bitmask"``.
      masked: whether a mask array (not a scalar) was given for this leaf.
      stored_zeros: pruned entries (outside the mask, or zeros without one) that a
        checkpoint still stores since their bits are not ``+0.0`` (a ``-0.0`` left by
        masking with ``w * mask``); they are in ``compressed_bytes``. Default 0.
      unzeroed: entries outside the mask that are not zero yet, counted (and packed) as
        zeros, as ``jp.prune`` keeps them. Default 0.
    """

    path: str
    shape: tuple[int, ...]
    dtype: str
    size: int
    nonzeros: int
    sparsity: float  # zero entries / size, after the mask
    dense_bytes: int
    compressed_bytes: int
    encoding: str  # the packing kind: dense, slices, nm or bitmask
    masked: bool  # whether a mask array was given for this leaf
    # Pruned entries (outside the mask, or zeros without one) that a checkpoint still
    # stores, since their bits are not +0.0: a -0.0 left by masking with w * mask.
    # They are in compressed_bytes.
    stored_zeros: int = 0
    # Entries outside the mask that are not zero yet: counted (and packed) as zeroed,
    # as jp.prune keeps them; jp.save would store them unless they are zeroed first.
    unzeroed: int = 0


@dataclasses.dataclass(frozen=True)
class Report:
    """Returned by :func:`report`: rows, totals, FLOPs; render with ``str``, ``to_json``.

    Args:
      rows: one :class:`LeafRow` per array leaf of the params, in flatten order.
      totals: sums over the rows: ``size``, ``nonzeros``, ``sparsity``,
        ``masked_sparsity`` (over the masked leaves only), ``compression``
        (``size / nonzeros``, ``inf`` when nothing is left), ``dense_bytes``,
        ``compressed_bytes``, ``bytes_ratio`` (compressed / dense), ``stored_zeros``
        and ``unzeroed``.
      flops: the FLOPs and MACs :func:`report` traced with ``apply_fn`` (see its
        ``apply_fn`` argument); default ``None``: none were traced.
    """

    rows: tuple[LeafRow, ...]
    totals: dict[str, float]
    flops: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Returns the report as plain JSON-able data."""
        rows = [dict(dataclasses.asdict(r), shape=list(r.shape)) for r in self.rows]
        data = {"rows": rows, "totals": dict(self.totals), "flops": self.flops}
        # Strict JSON has no inf or nan (e.g. the compression of an all-zero tree): null.
        return _finite_or_none(data)

    def to_json(self, indent: int | None = 2) -> str:
        """Returns :meth:`to_dict` as a JSON string (non-finite numbers as ``null``)."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def table(self):
        """Returns a ``rich.table.Table`` with one row per leaf and a totals row."""
        from rich.table import Table

        t = Table(title="jaxprune report", show_footer=True)
        tot = self.totals
        cols = [
            ("leaf", "total", "left"),
            ("shape", "", "left"),
            ("dtype", "", "left"),
            ("sparsity", f"{tot['sparsity']:.2%}", "right"),
            ("nonzeros", f"{int(tot['nonzeros']):,}", "right"),
            ("dense bytes", f"{int(tot['dense_bytes']):,}", "right"),
            ("compressed bytes", f"{int(tot['compressed_bytes']):,}", "right"),
            ("encoding", f"{tot['bytes_ratio']:.3f}x", "left"),
        ]
        for name, footer, justify in cols:
            t.add_column(name, footer=footer, justify=justify)
        for r in self.rows:
            t.add_row(
                r.path,
                "x".join(map(str, r.shape)) or "()",
                r.dtype,
                f"{r.sparsity:.2%}",
                f"{r.nonzeros:,}",
                f"{r.dense_bytes:,}",
                f"{r.compressed_bytes:,}",
                r.encoding,
            )
        # Without masks no leaf is "masked": leave the phrase out rather than print 0%.
        masked = (
            f"; masked leaves' sparsity {tot['masked_sparsity']:.2%}"
            if any(r.masked for r in self.rows)
            else ""
        )
        lines = [
            f"params {int(tot['size']):,}, nonzero {int(tot['nonzeros']):,} "
            f"({_ratio(tot['compression'], 'compression ', 'all pruned')}){masked}; "
            f"compressed / dense bytes {tot['bytes_ratio']:.3f}"
        ]
        if tot.get("stored_zeros"):
            lines.append(
                f"{int(tot['stored_zeros']):,} pruned entries are -0.0 (left by masking with "
                "w * mask): counted as zeros, but a checkpoint stores them (its restore is "
                "bitwise), so they are in the compressed bytes; jp.apply_masks(params, masks), or "
                "without masks jax.tree.map(lambda x: jnp.where(x == 0, 0, x), params), makes "
                "them +0.0"
            )
        if tot.get("unzeroed"):
            lines.append(
                f"{int(tot['unzeroed']):,} entries outside their masks are not zero yet: "
                "counted and packed as zeros (as jp.prune keeps them); jp.save stores them "
                "as they are unless params = jp.apply_masks(params, masks) first"
            )
        if self.flops:
            f = self.flops
            fewer = (
                "no conv or dense layers"
                if not f["dense_macs"]
                else _ratio(f["mac_reduction"], "", "all pruned", " fewer")
            )
            loops, maps = f.get("loops", 0), f.get("shard_maps", 0)
            notes = []
            if loops:
                notes.append(
                    f"{loops} loop{'s' if loops > 1 else ''} whose body XLA counts once, "
                    "whatever the trip count"
                )
            if maps:
                notes.append(
                    f"{maps} shard_map bod{'ies' if maps > 1 else 'y'} that XLA counts at one "
                    "device's share"
                )
            whiles = f.get("while_loops", 0)
            read = (
                f"read the MACs, which count the body of {whiles} while_loop"
                f"{'s' if whiles > 1 else ''} once too"
                if whiles
                else "read the MACs"
            )
            xla = f"XLA FLOPs (dense; {'; '.join(notes)}: {read})" if notes else "XLA FLOPs (dense)"
            padded = (
                f"; {f['padded_macs']:,.0f} of the dense MACs read conv padding, which XLA "
                "does not count"
                if f.get("padded_macs")
                else ""
            )
            lines.append(
                f"{xla} {f['xla_flops']:,.0f}; conv+dense MACs {f['dense_macs']:,.0f}"
                f" dense, {f['nonzero_macs']:,.0f} nonzero ({fewer}){padded}"
            )
        t.caption = "\n".join(lines)
        return t

    def __rich__(self):
        return self.table()

    def __str__(self) -> str:
        from rich.console import Console

        buf = io.StringIO()
        Console(file=buf, width=140, no_color=True, highlight=False).print(self.table())
        return buf.getvalue()

    def plot_sparsity(self, path: str | os.PathLike | None = None):
        """Returns a matplotlib ``Figure`` of per-leaf sparsity; see :func:`plot_sparsity`."""
        return plot_sparsity(self, path)


def _mask_lookup(params: Any, masks: Any, others: frozenset = frozenset()) -> dict[str, np.ndarray]:
    """Returns ``{path: mask}``; ``others`` are paths of a module's non-param state.

    Masks over an nnx model's whole state (``structure.select`` on the state of
    ``structure.module_apply``, BatchNorm statistics included) are taken: the
    masks of those other leaves are left out of the report's rows. Masks over
    the ``"params"`` collection of linen variables (``jp.get_masks`` of a
    ``jp.prune`` inside a ``TrainState``, reported with the variables that hold
    ``batch_stats`` too) are matched under ``params/`` (the other collections
    unmasked), as ``structure`` matches groups found on the variables.
    """
    if masks is None:
        return {}
    rerooted = reroot_masks(masks, params)
    try:
        return _lookup(params, rerooted, others)
    except ValueError as e:
        if (
            rerooted is masks
            and isinstance(params, Mapping)
            and "params" in params
            and not (isinstance(masks, Mapping) and "params" in masks)
        ):
            raise ValueError(
                f"{e} (Nor do they fit params['params']. For linen variables with more "
                "collections, pass masks={'params': jp.get_masks(opt_state), "
                "'batch_stats': True}.)"
            ) from None
        raise


def _lookup(params: Any, masks: Any, others: frozenset) -> dict[str, np.ndarray]:
    # A scalar mask standing for a subtree (jp.get_masks under optax.masked).
    masks = _broadcast_prefix(params, masks)
    flat, _ = leaves_with_paths(masks)
    fix = "Fix: pass the masks of these params (jp.get_masks(opt_state))."
    found = {
        path_str(p): bool_mask(m, path_str(p), fix) for p, m in flat if path_str(p) not in others
    }
    shapes = {path_str(p): np.shape(x) for p, x in leaves_with_paths(params)[0]}
    extra = sorted(set(found) - set(shapes))
    if extra:
        raise ValueError(
            f"masks has leaves that params lacks: {', '.join(extra[:10])}. Fix: pass the masks "
            "of these params (jp.get_masks(opt_state)), which mirror the params' tree."
        )
    bad = [
        f"{k}: {m.shape} vs {shapes[k]}"
        for k, m in found.items()
        if m.ndim and m.shape != shapes[k]
    ]
    if bad:
        raise ValueError(
            "masks must be scalars or have their leaf's shape; mask vs param: "
            f"{'; '.join(bad[:8])}. Fix: pass the masks of these params (jp.get_masks(opt_state))."
        )
    return found


def linen_state_collections(tree: Any) -> frozenset[str]:
    """Returns the collections of linen variables other than ``"params"``, else empty.

    ``{"params": ..., "batch_stats": ...}`` (what ``model.init`` returns)
    gives ``{"batch_stats"}``: running statistics, caches and the like, state
    saved beside the parameters, as an nnx model's non-``Param`` Variables are.
    A tree is taken for linen variables when it is a mapping with a
    ``"params"`` key and every value is a mapping (a collection).
    """
    if not isinstance(tree, Mapping) or "params" not in tree:
        return frozenset()
    if not all(isinstance(v, Mapping) for v in tree.values()):
        return frozenset()
    return frozenset(str(k) for k in tree if k != "params")


def _as_numpy(x: Any) -> np.ndarray | None:
    dtype = getattr(x, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return None
    return np.asarray(jax.device_get(x))


def report(
    params: Any,
    masks: Any = None,
    apply_fn: Callable[..., Any] | None = None,
    example_inputs: Any = None,
) -> Report:
    """Returns a :class:`Report`: one row per leaf of ``params``, totals and FLOPs.

    Args:
      params: any pytree of arrays, or an nnx ``Module`` (its ``nnx.Param`` leaves).
        Of linen variables (``model.init``'s ``{"params": ..., "batch_stats":
        ...}``) only the ``params`` collection makes rows: running statistics
        are state, not parameters, as an nnx model's ``BatchStat`` s are.
      masks: optional masks (e.g. ``jp.get_masks(opt_state)``), matched to
        ``params`` by leaf path; a scalar ``True`` leaves a leaf dense, a scalar
        ``False`` prunes all of it (as :func:`jaxprune.apply_masks` does).
        Without masks a leaf's sparsity is its fraction of exact zeros. Masks
        over the ``"params"`` collection of linen variables (``{"params",
        "batch_stats"}``) are matched under ``params/``.
      apply_fn: optional ``apply_fn(params, *example_inputs)``; with it the
        report's ``flops`` holds ``xla_flops`` (XLA's dense FLOPs, loop bodies
        once), ``loops`` (loops whose body ``xla_flops`` counts once),
        ``shard_maps`` (``shard_map`` bodies, which ``xla_flops`` counts at one
        device's share and the MACs on every device of their manual axes),
        ``while_loops`` (of the ``loops``, those whose trip count is not in
        the program, so the MACs count their body once too),
        ``dense_macs`` and ``nonzero_macs`` (the conv/dense MACs, dense and
        density-scaled), ``mac_reduction`` (their ratio) and ``padded_macs``
        (the part of ``dense_macs`` over conv padding). For an nnx ``Module``
        it defaults to calling the module.
      example_inputs: the inputs (one array or a tuple) to trace ``apply_fn`` with.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jaxprune.report import report
      >>> w = jnp.zeros((4, 8)).at[0].set(1.0)
      >>> r = report({"w": w}, apply_fn=lambda p, x: x @ p["w"],
      ...               example_inputs=jnp.ones((2, 4)))
      >>> r.rows[0].sparsity, r.rows[0].encoding, r.flops["dense_macs"], r.flops["nonzero_macs"]
      (0.75, 'slices', 64.0, 16.0)

    References:
      Blalock et al., "What is the State of Neural Network Pruning?" (ShrinkBench:
      compression ratio and theoretical speedup as reported here), 2020.
      https://arxiv.org/abs/2003.03033
    """
    others: frozenset = frozenset()
    if isinstance(params, nnx.Module):
        graphdef, state, rest = nnx.split(params, nnx.Param, ...)
        others = frozenset(path_str(p) for p, _ in leaves_with_paths(rest)[0])
        # Pure arrays, so merge builds fresh Variables inside the trace (BatchNorm
        # may update its statistics there).
        rest = unwrap_variables(rest)
        if apply_fn is None and example_inputs is not None:
            apply_fn = lambda s, *xs: nnx.merge(graphdef, s, rest)(*xs)  # noqa: E731
        params = state
    if apply_fn is None and example_inputs is not None:
        raise ValueError(
            "example_inputs was given without apply_fn, so FLOPs cannot be traced (only an nnx "
            "Module is called without one). Fix: report(params, masks, apply_fn=lambda p, x: "
            "model.apply({'params': p}, x), example_inputs=x)."
        )
    if apply_fn is not None and not callable(apply_fn):
        raise ValueError(
            f"apply_fn must be callable as apply_fn(params, *example_inputs), got {apply_fn!r}. "
            "Fix: e.g. apply_fn=lambda p, x: model.apply({'params': p}, x)."
        )
    check_array_leaves(params, "params")
    mask_of = _mask_lookup(params, masks, others)
    collections = linen_state_collections(params)
    rows = []
    for path, leaf in leaves_with_paths(params)[0]:
        x = _as_numpy(leaf)
        if x is None or (path and path[0] in collections):
            continue  # a PRNG key; linen state (batch_stats), as an nnx model's is left out
        key = path_str(path)
        mask = mask_of.get(key)
        # A scalar False prunes the whole leaf (as jp.apply_masks has it); True keeps it dense.
        whole = mask is not None and mask.ndim == 0 and not bool(mask)
        if whole:
            mask = np.zeros(x.shape, bool)
        masked = mask is not None and (mask.ndim > 0 or whole)
        nonzero = x.astype(bool)  # -0.0 is zero here, as in np.count_nonzero
        # Entries a mask (or, without one, the count of zeros) prunes.
        dropped = ~np.broadcast_to(mask, x.shape) if mask is not None else np.True_
        unzeroed = 0
        if masked:
            # Counts after the masks. A value outside its mask that is not zero yet
            # is taken as zeroed, as jp.prune keeps them (and jp.apply_masks makes
            # them): the bytes are those of the pruned leaf.
            unzeroed = int(np.count_nonzero(nonzero & dropped))
            x = np.where(dropped & nonzero, np.zeros((), x.dtype), x)
            nonzero &= ~dropped
        # Bytes as jp.save packs the leaf with its mask: every entry whose bits are
        # not +0.0 is stored (the restore is bitwise), a -0.0 outside the mask too.
        arrays, spec = packing.pack_leaf(x, mask)
        stored = sum(a.nbytes for a in arrays.values())
        bits = packing.support(x)
        if masked and not whole and mask.size and mask_kind(x, mask, spec["kind"]) == "bits":
            # The checkpoint then also stores the mask's bits: it is neither the
            # nonzero pattern nor the bits of a bitmask leaf (see encode_masks).
            stored += -(-mask.size // 8)
        nonzeros = int(np.count_nonzero(nonzero))
        rows.append(
            LeafRow(
                path=key,
                shape=tuple(x.shape),
                dtype=x.dtype.name,
                size=int(x.size),
                nonzeros=nonzeros,
                sparsity=1.0 - nonzeros / x.size if x.size else 0.0,
                dense_bytes=int(x.nbytes),
                compressed_bytes=int(stored),
                encoding=spec["kind"],
                masked=masked,
                stored_zeros=int(np.count_nonzero(bits & ~nonzero & dropped)),
                unzeroed=unzeroed,
            )
        )
    totals = _totals(rows)
    flops = None
    if apply_fn is not None:
        if example_inputs is None:
            raise ValueError(
                "apply_fn was given without example_inputs, so FLOPs cannot be traced. "
                "Fix: report(params, masks, apply_fn, example_inputs=jnp.ones((1, 28, 28, 1)))."
            )
        inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        density = {r.path: (r.nonzeros / r.size if r.size else 1.0) for r in rows}
        try:
            jax.eval_shape(apply_fn, params, *inputs)
        except Exception as e:
            shapes = [jax.tree.map(np.shape, x) for x in inputs]
            raise ValueError(
                f"apply_fn(params, *example_inputs) fails with example inputs of shapes {shapes}: "
                f"{type(e).__name__}: {(str(e).splitlines() or [''])[0].rstrip('.')}. Fix: pass "
                "example inputs the model takes (with a batch axis), as a tuple for several "
                "arguments."
            ) from e
        flops = _flops(apply_fn, params, inputs, density)
    return Report(tuple(rows), totals, flops)


def _finite_or_none(x: Any) -> Any:
    """Returns ``x`` with every non-finite float (inf, nan) replaced by None, recursively."""
    if isinstance(x, dict):
        return {k: _finite_or_none(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite_or_none(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _save(fig: Any, path: str | os.PathLike) -> None:
    """Saves ``fig`` to ``path``, creating its folder first."""
    path = os.fspath(path)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    fig.savefig(path)


def _ratio(value: float, prefix: str, if_inf: str, suffix: str = "") -> str:
    """Returns ``value`` as ``"<prefix>2.50x<suffix>"``, or ``if_inf`` when nothing is left."""
    return if_inf if math.isinf(value) else f"{prefix}{value:.2f}x{suffix}"


def _totals(rows: Sequence[LeafRow]) -> dict[str, float]:
    size = sum(r.size for r in rows)
    nnz = sum(r.nonzeros for r in rows)
    m_size = sum(r.size for r in rows if r.masked)
    m_nnz = sum(r.nonzeros for r in rows if r.masked)
    dense = sum(r.dense_bytes for r in rows)
    comp = sum(r.compressed_bytes for r in rows)
    return {
        "size": size,
        "nonzeros": nnz,
        "sparsity": 1.0 - nnz / size if size else 0.0,
        "masked_sparsity": 1.0 - m_nnz / m_size if m_size else 0.0,
        "compression": size / nnz if nnz else math.inf,
        "dense_bytes": dense,
        "compressed_bytes": comp,
        "bytes_ratio": comp / dense if dense else 1.0,
        "stored_zeros": sum(r.stored_zeros for r in rows),
        "unzeroed": sum(r.unzeroed for r in rows),
    }


def plot_sparsity(rep: Report, path: str | os.PathLike | None = None):
    """Returns a matplotlib ``Figure``: one bar per leaf with its sparsity (saved to ``path``).

    Leaves with a mask array are drawn; without any, every leaf with ``ndim >= 2``.
    """
    if not isinstance(rep, Report):
        raise ValueError(
            f"plot_sparsity plots a Report, got {type(rep).__name__}. Fix: "
            "plot_sparsity(jp.report(params, masks)), or jp.report(params, masks).plot_sparsity()."
        )
    from matplotlib.figure import Figure

    rows = [r for r in rep.rows if r.masked] or [r for r in rep.rows if len(r.shape) >= 2]
    fig = Figure(figsize=(7, 0.9 + 0.32 * max(len(rows), 1)), layout="constrained")
    ax = fig.subplots()
    ax.barh(range(len(rows)), [100 * r.sparsity for r in rows], color="tab:blue")
    ax.set_yticks(range(len(rows)), [f"{r.path} {'x'.join(map(str, r.shape))}" for r in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("sparsity (%)")
    ax.set_title(f"per-layer sparsity (total {rep.totals['sparsity']:.1%})")
    if path is not None:
        _save(fig, path)
    return fig


def _load_results(results: Any) -> list[dict[str, Any]]:
    if not isinstance(results, str | os.PathLike):
        fix = '. Fix: e.g. [{"method": "magnitude", "sparsity": 0.9, "accuracy": 0.97}].'
        if isinstance(results, Mapping) or not isinstance(results, Iterable):
            raise ValueError(
                "results must be a list of records (dicts) or the path of a .json / .csv file "
                f"of them, got {results!r}{fix}"
            )
        records = list(results)
        for i, r in enumerate(records):
            if not isinstance(r, Mapping):
                raise ValueError(f"results record {i} is {r!r}, not a dict{fix}")
        return [dict(r) for r in records]
    path = os.fspath(results)
    if not os.path.exists(path):
        raise ValueError(f"results file {path!r} does not exist. Fix: pass an existing file.")
    with open(path) as f:
        text = f.read()
    if path.endswith(".csv"):
        return [dict(r) for r in csv.DictReader(io.StringIO(text))]
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = [json.loads(line) for line in text.splitlines() if line.strip()]
    if isinstance(data, dict):  # {"results": [...]}, or a file holding one record
        return data["results"] if "results" in data else [data]
    return data


def plot_accuracy_vs_compression(results: Any, path: str | os.PathLike | None = None):
    """Returns a matplotlib ``Figure`` of accuracy against compression, one line per method.

    Args:
      results: a list of records, or a ``.json`` (a list, or ``{"results": [...]}``),
        JSON-lines or ``.csv`` file of them. A record has ``accuracy`` and either
        ``compression`` (params / nonzeros) or ``sparsity`` (turned into
        ``1 / (1 - sparsity)``), and optionally ``method`` (the line's label).
      path: where to save the figure (any format matplotlib writes), or None.

    Raises:
      ValueError: the file is missing, a record lacks ``accuracy`` or both of
        ``compression`` and ``sparsity``, or has ``compression < 1`` or a
        ``sparsity`` outside ``[0, 1)``.
    """
    from matplotlib.figure import Figure

    series: dict[str, list[tuple[float, float]]] = {}
    for i, r in enumerate(_load_results(results)):
        # Empty CSV cells and JSON nulls count as missing.
        given = {k for k, v in r.items() if v not in ("", None)}
        if "accuracy" not in given or not ({"compression", "sparsity"} & given):
            raise ValueError(
                f"results record {i} is {r!r}; each needs 'accuracy' and 'compression' (or "
                "'sparsity'). Fix: write records like "
                '{"method": "magnitude", "sparsity": 0.9, "accuracy": 0.97}.'
            )
        if "compression" in given:
            c = float(r["compression"])
            if not c >= 1.0:
                raise ValueError(
                    f"results record {i} has compression {r['compression']}; it must be >= 1 "
                    "(params / nonzero params). Fix: give params / nonzeros, or the record's "
                    "'sparsity' (a fraction in [0, 1))."
                )
        else:
            s = float(r["sparsity"])
            if s == 1.0:
                raise ValueError(
                    f"results record {i} has sparsity {r['sparsity']}: a model with every "
                    "weight pruned has no finite compression ratio to plot. Fix: drop the "
                    "record, or give its 'compression'."
                )
            if not 0.0 <= s < 1.0:
                raise ValueError(
                    f"results record {i} has sparsity {r['sparsity']}; it must be a fraction "
                    "in [0, 1). Fix: write 0.9 for 90% (not 90)."
                )
            c = 1 / (1 - s)
        series.setdefault(str(r.get("method", "")), []).append((c, float(r["accuracy"])))
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for label, pts in series.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label or None)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("compression ratio (params / nonzero params)")
    ax.set_ylabel("accuracy")
    ax.grid(True, alpha=0.3)
    if any(series):
        ax.legend()
    if path is not None:
        _save(fig, path)
    return fig
