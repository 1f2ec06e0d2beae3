"""The ``jaxprune`` command line (also ``python -m jaxprune``).

Subcommands: ``demo`` (train and prune LeNet-300-100), ``inspect CKPT`` (the
report of a checkpoint, without the model's code; an nnx module's state other
than ``nnx.Param``, such as BatchNorm statistics, is listed apart), ``export
CKPT OUT [--format compressed|dense]`` (compressed by default) and ``bench
[NAME]`` (runs ``scripts/bench_<name>.py`` of a source checkout). Checkpoint problems, and a
report that cannot be made of a checkpoint, print one ``jaxprune: error: ...``
line and exit with status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import subprocess
import sys

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
    ``params``/``masks`` leave them out. Checkpoints of plain pytrees, or
    written before the types were recorded, have no such leaves.
    """
    from jaxprune import checkpoint
    from jaxprune._tree import leaves_with_paths, path_str
    from jaxprune.checkpoint_rebuild import nest

    others = checkpoint._non_params(meta)
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
                {"path": key, "variable": spec["var"], "dtype": dtype, "shape": shape, "size": size}
            )
    return without(ckpt.params), without(ckpt.masks), state


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
    if args.json:
        import json

        data = rep.to_dict()
        data["checkpoint"] = {"path": str(ckpt.path), "step": ckpt.step, "format": ckpt.format}
        # A module's non-parameter state, left out of "rows" and "totals".
        data["state"] = {"size": sum(r["size"] for r in state), "leaves": state}
        print(json.dumps(data, indent=2))
    else:
        from rich.console import Console

        # Wide enough for the table when piped; a terminal keeps its own width.
        console = Console(width=None if sys.stdout.isatty() else 140)
        console.print(f"{ckpt.path} (step {ckpt.step}, {ckpt.format} format)")
        console.print(rep.table())
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


def _export(args: argparse.Namespace) -> int:
    from jaxprune import checkpoint

    ckpt, meta = _restore(args.checkpoint, args.step)
    _check_out(args.out, ckpt.step, args.format)
    try:
        # As checkpoint.export: the recorded nnx Variable types are kept.
        out = checkpoint._save(
            args.out,
            ckpt.step,
            ckpt.params,
            masks=ckpt.masks,
            format=args.format,
            kinds=checkpoint._kinds(meta),
        )
    except (checkpoint.CheckpointError, ValueError, OSError) as e:
        raise _CommandError(f"cannot write {args.out}: {e}") from e
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
    d.add_argument("--seed", type=int, default=0)
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
        return int(args.func(args) or 0)
    except _CommandError as e:
        print("jaxprune: error: " + " ".join(str(e).split()), file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
