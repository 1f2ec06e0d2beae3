"""The ``jaxprune`` command line (also ``python -m jaxprune``).

Subcommands: ``demo`` (train and prune LeNet-300-100), ``inspect CKPT`` (the
report of a checkpoint, without the model's code; an nnx module's state other
than ``nnx.Param``, such as BatchNorm statistics, is listed apart), ``export
CKPT OUT [--format compressed|dense] [--apply-masks]`` (compressed by default)
and ``bench [NAME]`` (runs ``scripts/bench_<name>.py`` of a source checkout).
``inspect`` also gives the payload bytes the checkpoint stores (from its
metadata), and ``export`` prints one ``jaxprune: warning: ...`` line when
params hold values outside their masks, which it writes as they are unless
``--apply-masks``. Checkpoint problems, and a report that cannot be made of a
checkpoint, print one ``jaxprune: error: ...`` line and exit with status 1,
never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import pathlib
import subprocess
import sys
import warnings
from collections.abc import Iterator

__all__ = ["main", "build_parser", "scripts_dir"]


class _CommandError(Exception):
    """An expected failure: reported as one line, exit status 1."""


def _demo(args: argparse.Namespace) -> int:
    from jaxprune import demo
    from jaxprune.data import DatasetError

    # Checked before any training, so a typo does not cost a dense phase first.
    if not 0.0 <= args.sparsity <= 1.0:
        raise _CommandError(
            f"--sparsity must be in [0, 1] (the fraction of weights pruned), got "
            f"{args.sparsity}. Fix: e.g. --sparsity 0.9."
        )
    if args.seed < 0:
        raise _CommandError(f"--seed must be >= 0, got {args.seed}. Fix: e.g. --seed 0.")
    if args.quick and args.epochs is not None:
        raise _CommandError(
            f"--quick runs one short epoch per phase, so --epochs {args.epochs} would be ignored. "
            "Fix: pass one of the two."
        )
    if args.epochs is not None and args.epochs < 1:
        raise _CommandError(
            f"--epochs must be >= 1 (training epochs per phase), got {args.epochs}. Fix: e.g. "
            "--epochs 5, or leave it out for the dataset's default."
        )
    try:
        demo.run(
            dataset=args.dataset,
            sparsity=args.sparsity,
            epochs=args.epochs,
            seed=args.seed,
            quick=args.quick,
        )
    except FileNotFoundError as e:  # a dataset's files are missing; the message names the fix
        raise _CommandError(str(e)) from e
    except DatasetError as e:  # damaged files (truncated, not gzip); the message names the fix
        raise _CommandError(f"{e} Or run --dataset digits.") from e
    return 0


def _restore(path: str, step: int | None):
    """Returns ``(Checkpoint, metadata)`` of ``path`` (restored without templates)."""
    from jaxprune import checkpoint

    try:
        return checkpoint._restore(path, step)
    except (checkpoint.CheckpointError, ValueError, OSError) as e:
        raise _CommandError(str(e)) from e


def _split_state(ckpt, meta: dict) -> tuple:
    """Returns ``(params, masks, state)``: the checkpoint's params without a module's state.

    Leaves saved as nnx Variables other than ``nnx.Param`` (BatchNorm
    statistics, RNG keys and counters) are no parameters, as ``jp.report(model)``
    has it: ``state`` lists them (path, variable type, dtype, shape, size) and
    ``params``/``masks`` leave them out. So do linen variables' collections
    other than ``params`` (``batch_stats``; the variable type is the
    collection's name). Checkpoints of other plain pytrees, or nnx ones
    written before the types were recorded, have no such leaves.
    """
    from jaxprune import checkpoint
    from jaxprune._tree import leaves_with_paths, path_str
    from jaxprune.checkpoint_rebuild import nest
    from jaxprune.report import linen_state_collections

    others = checkpoint._non_params(meta)
    # Linen variables' other collections (batch_stats): state, as jp.report has it.
    collections = linen_state_collections(ckpt.params)
    var_of = {}
    for spec in meta["params"]:
        key = path_str(tuple(spec["path"]))
        if key in others:
            var_of[key] = spec["var"]
        elif spec["path"] and str(spec["path"][0]) in collections:
            var_of[key] = str(spec["path"][0])
    others = set(var_of)
    if not others:
        return ckpt.params, ckpt.masks, []

    def without(tree):
        if tree is None:
            return None
        kept = [(p, x) for p, x in leaves_with_paths(tree)[0] if path_str(p) not in others]
        return nest([p for p, _ in kept], [x for _, x in kept])

    state = []
    for spec in meta["params"]:
        key = path_str(tuple(spec["path"]))
        if key in others:
            keys = "key_impl" in spec  # raw key data: one trailing axis more than the keys
            shape = spec["shape"][:-1] if keys else spec["shape"]
            dtype = "key" if keys else spec["dtype"]
            size = math.prod(shape)
            state.append(
                {"path": key, "variable": var_of[key], "dtype": dtype, "shape": shape, "size": size}
            )
    return without(ckpt.params), without(ckpt.masks), state


def _stored_bytes(meta: dict, paths: list[str]) -> dict[str, int] | None:
    """Returns the payload bytes the checkpoint stores for each leaf of ``paths``, or None.

    Read from the metadata: each params leaf's packed arrays (shape and dtype,
    as written) and its mask's bits where the checkpoint keeps them (masks
    equal to the nonzero pattern or to a bitmask leaf's bits, and scalar
    masks, are rebuilt and cost nothing). Exact for both formats; orbax's zstd
    and its files come on top (``checkpoint.disk_bytes``). None for a
    checkpoint whose metadata does not record the arrays.
    """
    import jax.numpy as jnp

    from jaxprune._tree import path_str

    stored: dict[str, int] = {}
    for spec in meta["params"]:
        arrays = spec.get("arrays")
        if arrays is None:
            return None
        stored[path_str(tuple(spec["path"]))] = sum(
            math.prod(shape) * jnp.dtype(dtype).itemsize for shape, dtype in arrays.values()
        )
    for spec in meta.get("masks") or []:
        if spec.get("kind") == "bits":
            key = path_str(tuple(spec["path"]))
            stored[key] = stored.get(key, 0) + (math.prod(spec["shape"]) + 7) // 8
    return {k: stored.get(k, 0) for k in paths}


def _stored_line(stored: int, rep, ckpt, args: argparse.Namespace) -> str:
    """Returns the line under ``inspect``'s table that gives the bytes the checkpoint stores."""
    line = (
        f"Stored in this {ckpt.format} checkpoint: {stored:,} payload bytes of params and "
        "mask bits (its metadata's arrays; orbax's compression and files aside)"
    )
    unzeroed = int(rep.totals.get("unzeroed", 0))
    if unzeroed:
        step = "" if args.step is None else f" --step {args.step}"
        line += (
            f". {unzeroed:,} entries outside their masks are not zero yet: the compressed "
            "bytes above pack them as zeros, but a checkpoint stores them as they are. Fix: "
            f"jaxprune export {args.checkpoint} OUT{step} --apply-masks zeroes them first"
        )
    return line


def _inspect(args: argparse.Namespace) -> int:
    from jaxprune.report import report

    ckpt, meta = _restore(args.checkpoint, args.step)
    params, masks, state = _split_state(ckpt, meta)
    try:
        rep = report(params, masks)
    except Exception as e:  # any failure is one line here, never a traceback
        # A ValueError names its own fix; anything else is a bug in the report.
        detail = (
            str(e)
            if isinstance(e, ValueError)
            else f"{type(e).__name__}: {e}. Fix: please report this jaxprune bug with this line"
        )
        raise _CommandError(f"cannot report on {ckpt.path} (step {ckpt.step}): {detail}") from e
    # What the checkpoint holds for the report's rows, which may differ from their
    # compressed bytes: those pack values outside the masks as zeros.
    stored = _stored_bytes(meta, [r.path for r in rep.rows])
    if args.json:
        import json

        data = rep.to_dict()
        data["checkpoint"] = {"path": str(ckpt.path), "step": ckpt.step, "format": ckpt.format}
        data["stored"] = (
            None if stored is None else {"payload_bytes": sum(stored.values()), "leaves": stored}
        )
        # A module's non-parameter state, left out of "rows" and "totals".
        data["state"] = {"size": sum(r["size"] for r in state), "leaves": state}
        print(json.dumps(data, indent=2))
    else:
        from rich.console import Console

        # Wide enough for the table when piped; a terminal keeps its own width.
        console = Console(width=None if sys.stdout.isatty() else 140)
        console.print(f"{ckpt.path} (step {ckpt.step}, {ckpt.format} format)")
        console.print(rep.table())
        if stored is not None:
            console.print(
                _stored_line(sum(stored.values()), rep, ckpt, args), markup=False, highlight=False
            )
        if state:
            listed = ", ".join(
                f"{r['path']} {r['dtype']}{r['shape']} ({r['variable']})" for r in state[:20]
            )
            more = f" and {len(state) - 20} more" if len(state) > 20 else ""
            console.print(
                f"Not counted above: {len(state)} leaves of non-parameter state "
                f"({sum(r['size'] for r in state):,} entries): {listed}{more}",
                markup=False,
                highlight=False,
            )
    if args.plot:
        try:
            rep.plot_sparsity(args.plot)
        except ImportError as e:
            raise _CommandError(
                f"--plot needs matplotlib ({e}). Fix: pip install matplotlib (or "
                "jaxprune[examples]), or leave out --plot."
            ) from e
        except (OSError, ValueError) as e:
            raise _CommandError(f"cannot write the plot {args.plot}: {e}") from e
    return 0


def _check_out(out: str, step: int, fmt: str) -> None:
    """Refuses an ``export`` target that ``checkpoint.save`` would refuse, in CLI terms.

    ``save``'s own messages name its Python arguments (``save(root, step, ...)``,
    "a new step"), which ``export`` has no flags for: the output step is always
    the input's.
    """
    from jaxprune import checkpoint

    path = checkpoint._absolute(out, "OUT")
    inside = next((q for q in (path, *path.parents) if checkpoint._is_step_dir(q)), None)
    if inside is not None:
        where = "is" if inside == path else f"lies inside {inside}, which is"
        raise _CommandError(
            f"cannot write {out}: it {where} the directory of step {inside.name} of the "
            f"checkpoint {inside.parent}, and export writes a whole checkpoint (a root "
            f"directory). Fix: pass an OUT outside {inside.parent}, e.g. "
            f"{inside.parent}_{fmt}."
        )
    if (path / str(step)).exists():
        raise _CommandError(
            f"cannot write {out}: step {step} is already saved in {path}, and export saves "
            f"under the step it reads (checkpoints are never overwritten). Fix: pass another "
            f"OUT, or delete {path / str(step)} first."
        )


def _masked_params(ckpt) -> tuple:
    """Returns ``(hosts, mask_by_path)`` of a checkpoint's params, as ``save`` matches them."""
    from jaxprune import checkpoint_trees as trees
    from jaxprune._tree import leaves_with_paths, path_str

    try:
        by_path = trees.mask_lookup(trees.reroot_masks(ckpt.masks, ckpt.params), ckpt.params)
    except ValueError as e:
        raise _CommandError(f"cannot match the masks of {ckpt.path} to its params: {e}") from e
    hosts = {}
    for path, leaf in leaves_with_paths(ckpt.params)[0]:
        x, impl = trees.host(leaf)
        if impl is None:  # PRNG keys are never masked
            hosts[path_str(path)] = x
    return hosts, by_path


def _apply_masks(params, hosts: dict, by_path: dict):
    """Returns ``params`` with ``+0.0`` outside their masks, as ``jp.apply_masks`` writes.

    Matched by path, as ``checkpoint.save`` matches them: leaves without a mask
    (or with an all-True one) are kept as they are.
    """
    import jax
    import numpy as np

    from jaxprune._tree import leaves_with_paths, path_str

    flat, treedef = leaves_with_paths(params)
    leaves = []
    for path, leaf in flat:
        key = path_str(path)
        m, x = by_path.get(key), hosts.get(key)
        if m is None or x is None or m.all():
            leaves.append(leaf)
        else:
            leaves.append(np.where(np.broadcast_to(m, x.shape), x, np.zeros((), x.dtype)))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _outside_masks_warning(found: list, args: argparse.Namespace, out) -> str | None:
    """Returns the warning about params entries outside their masks that export wrote, or None.

    ``found`` holds :func:`jaxprune.checkpoint_trees.values_outside_masks`'s
    tuples. A ``-0.0`` costs bytes in the compressed format only; values not
    zeroed yet are written (and computed with) in either format.
    """
    dense = args.format == "dense"
    if dense:  # every entry is written anyway, and -0.0 == 0
        found = [f for f in found if f[1]]
    if not found:
        return None
    unzeroed = sum(f[1] for f in found)
    negative = 0 if dense else sum(f[2] for f in found)
    kinds = [f"{unzeroed:,} not zero yet"] if unzeroed else []
    if negative:
        kinds.append(
            f"{negative:,} -0.0, left by masking with w * mask (-0.0 == 0: sparsity counts them "
            "as pruned)"
        )
    leaves = "; ".join(
        f"{k!r}: {u + (0 if dense else z):,} of its {n:,} masked-out entries"
        for k, u, z, n, *_ in found[:5]
    ) + (f"; and {len(found) - 5} more leaves" if len(found) > 5 else "")
    if dense:
        cost = (
            "The dense format writes every entry (the bytes are the same), so the exported "
            "params compute with those values"
        )
    else:
        size, masked = sum(f[4] for f in found), sum(f[5] for f in found)
        cost = (
            f"The compressed format stores every entry whose bits are not all zero: those "
            f"leaves take {size:,} payload bytes (packed values and mask bits) as written, "
            f"not the {masked:,} they would take with the masks applied"
        )
    flags = "" if args.step is None else f" --step {args.step}"
    flags += " --format dense" if dense else ""
    return (
        f"params hold {unzeroed + negative:,} entries outside their masks, written as they are "
        f"({', '.join(kinds)}): {leaves}. {cost}. Fix: jaxprune export {args.checkpoint} OUT"
        f"{flags} --apply-masks (into another OUT, or after deleting {out}), which writes +0.0 "
        "there first, as jp.apply_masks does."
    )


def _export(args: argparse.Namespace) -> int:
    from jaxprune import checkpoint
    from jaxprune.checkpoint_trees import values_outside_masks

    ckpt, meta = _restore(args.checkpoint, args.step)
    _check_out(args.out, ckpt.step, args.format)
    params, found = ckpt.params, []
    if ckpt.masks is None:
        if args.apply_masks:
            raise _CommandError(
                f"--apply-masks: {ckpt.path} records no masks to apply. Fix: leave "
                "--apply-masks out, or export a checkpoint saved with masks=."
            )
    else:
        hosts, by_path = _masked_params(ckpt)
        if args.apply_masks:
            params = _apply_masks(params, hosts, by_path)
        else:
            found = values_outside_masks(hosts, by_path)
    try:
        with warnings.catch_warnings():
            # The -0.0 warning of checkpoint.save: the warning below names those
            # entries too, with the command line's fix.
            warnings.filterwarnings(
                "ignore", r"params hold [\d,]+ -0\.0 entries", category=UserWarning
            )
            # As checkpoint.export: the recorded nnx Variable types are kept.
            out = checkpoint._save(
                args.out,
                ckpt.step,
                params,
                masks=ckpt.masks,
                format=args.format,
                kinds=checkpoint._kinds(meta),
            )
    except (checkpoint.CheckpointError, ValueError, OSError) as e:
        raise _CommandError(f"cannot write {args.out}: {e}") from e
    warning = _outside_masks_warning(found, args, out)
    if warning:
        print("jaxprune: warning: " + " ".join(warning.split()), file=sys.stderr)
    before = checkpoint.disk_bytes(ckpt.path)
    after = checkpoint.disk_bytes(out)
    print(
        f"wrote {out} ({args.format}): {after:,} bytes on disk, {after / before:.3f}x of "
        f"{ckpt.path} ({before:,} bytes, including its optimizer state if any)"
    )
    return 0


def scripts_dir() -> pathlib.Path | None:
    """Returns the ``scripts/`` folder of the source checkout jaxprune runs from, or None."""
    here = pathlib.Path(__file__).resolve().parent.parent / "scripts"
    return here if here.is_dir() else None


def _bench(args: argparse.Namespace) -> int:
    folder = scripts_dir()
    if folder is None:
        raise _CommandError(
            "benchmarks live in the scripts/ folder of a source checkout, and this jaxprune "
            "is installed without one. Fix: git clone the repository, pip install -e . there, "
            "and run `jaxprune bench` again."
        )
    available = sorted(p.stem.removeprefix("bench_") for p in folder.glob("bench_*.py"))
    if args.list or not available:
        print("benchmarks:", ", ".join(available) or f"none in {folder}")
        return 0
    names = [args.name] if args.name else available
    unknown = [n for n in names if n not in available]
    if unknown:
        raise _CommandError(
            f"no benchmark {unknown[0]!r} in {folder}; available: {', '.join(available)}."
        )
    status = 0
    for name in names:
        script = folder / f"bench_{name}.py"
        print(f"== {script.name}", flush=True)
        # Every benchmark runs; the first failure's status is returned.
        rc = subprocess.call([sys.executable, str(script), *args.args])
        status = status or rc
    return status


def _step(text: str) -> int:
    """``--step``: a saved step number, checked when the command line is parsed."""
    try:
        step = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a whole number >= 0 (a saved step), got {text!r}; e.g. --step 5, or "
            "leave it out for the newest step"
        ) from None
    if step < 0:
        raise argparse.ArgumentTypeError(
            f"must be >= 0 (a saved step), got {step}; e.g. --step 5, or leave it out for "
            "the newest step"
        )
    return step


def build_parser() -> argparse.ArgumentParser:
    """Returns the ``jaxprune`` argument parser: ``demo``, ``inspect``, ``export`` and ``bench``.

    Each subcommand's parsed namespace carries ``func``, the function
    :func:`main` calls with it. Exposed so that tools (docs, shell completion)
    can read the flags without running anything.

    Examples:
      >>> from jaxprune.cli import build_parser
      >>> args = build_parser().parse_args(["inspect", "ckpt", "--step", "5", "--json"])
      >>> args.command, args.checkpoint, args.step, args.json
      ('inspect', 'ckpt', 5, True)
      >>> build_parser().parse_args(["export", "ckpt", "out"]).format
      'compressed'
    """
    parser = argparse.ArgumentParser(
        prog="jaxprune", description="Pruning for JAX: demo, checkpoint tools and benchmarks."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="train LeNet-300-100 with gradual magnitude pruning to 90%%")
    d.add_argument(
        "--dataset",
        default="auto",
        choices=("auto", "fashion-mnist", "mnist-5k", "digits"),
        help="auto | fashion-mnist | mnist-5k | digits",
    )
    d.add_argument("--sparsity", type=float, default=0.9, help="final sparsity (default 0.9)")
    d.add_argument("--epochs", type=int, default=None, help="training epochs (default: by dataset)")
    d.add_argument("--seed", type=int, default=0, help="initialization and batch order")
    d.add_argument(
        "--quick", action="store_true", help="one short epoch per phase (<= 60 steps), for tests"
    )
    d.set_defaults(func=_demo)

    i = sub.add_parser("inspect", help="per-leaf sparsity and bytes of a checkpoint")
    i.add_argument("checkpoint", help="a checkpoint directory (or one step's directory)")
    i.add_argument("--step", type=_step, default=None, help="which step (default: the newest)")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    i.add_argument("--plot", default=None, help="also save a per-layer sparsity plot here")
    i.set_defaults(func=_inspect)

    e = sub.add_parser("export", help="re-save a checkpoint's params and masks, e.g. compressed")
    e.add_argument("checkpoint", help="the checkpoint to read")
    e.add_argument("out", help="the checkpoint directory to write")
    e.add_argument(
        "--format",
        choices=("compressed", "dense"),
        default="compressed",
        help="compressed: each params leaf in its smallest exact sparse encoding (the "
        "default); dense: every leaf as it is",
    )
    e.add_argument(
        "--step", type=_step, default=None, help="which step to read (default: the newest)"
    )
    e.add_argument(
        "--apply-masks",
        action="store_true",
        help="write +0.0 where the recorded masks are False before saving (as jp.apply_masks "
        "does); without it, values there are written as they are, with a warning",
    )
    e.set_defaults(func=_export)

    b = sub.add_parser("bench", help="run scripts/bench_<name>.py (all of them without NAME)")
    b.add_argument("name", nargs="?", default=None, help="e.g. checkpoint, overhead, scale")
    b.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    b.add_argument("args", nargs=argparse.REMAINDER, help="passed on to the script")
    b.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the ``jaxprune`` command line on ``argv`` (default ``sys.argv[1:]``).

    Returns the exit status: 0 on success, 1 for an expected failure (a
    checkpoint problem, a bad flag value found after parsing), printed as one
    ``jaxprune: error: ...`` line on stderr, never a traceback. Argument errors
    found while parsing exit with status 2 through argparse (``SystemExit``).

    Examples:
      >>> import os, tempfile, jax.numpy as jnp
      >>> from jaxprune import checkpoint
      >>> from jaxprune.cli import main
      >>> d = tempfile.mkdtemp()
      >>> _ = checkpoint.save(os.path.join(d, "ck"), 5, {"w": jnp.zeros((64, 64))})
      >>> main(["export", os.path.join(d, "ck"), os.path.join(d, "small")])  # doctest: +ELLIPSIS
      wrote .../small/5 (compressed): ... bytes on disk, ...
      0
      >>> main(["export", os.path.join(d, "ck"), os.path.join(d, "small")])  # error on stderr
      1
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with _quiet_orbax(args.func in (_inspect, _export)):
            return int(args.func(args) or 0)
    except _CommandError as e:
        print("jaxprune: error: " + " ".join(str(e).split()), file=sys.stderr)
        return 1


@contextlib.contextmanager
def _quiet_orbax(quiet: bool) -> Iterator[None]:
    """Silences orbax's log lines (absl's logger) while ``inspect`` or ``export`` reads.

    A damaged checkpoint makes orbax log ``ERROR:absl:Failed to json parse
    ...`` or ``WARNING:absl:Metadata file does not exist`` before jaxprune
    reports the problem; the command's own error names the file, in one line.
    """
    if not quiet:
        yield
        return
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
