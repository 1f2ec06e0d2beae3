"""The ``jaxprune`` command line (also ``python -m jaxprune``)."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from jaxprune import demo

    demo.run(
        dataset=args.dataset,
        sparsity=args.sparsity,
        epochs=args.epochs,
        seed=args.seed,
        quick=args.quick,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxprune", description="Pruning for JAX: demo, checkpoint tools and benchmarks."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="train LeNet-300-100 with gradual magnitude pruning to 90%")
    d.add_argument("--dataset", default="auto", help="auto | fashion-mnist | mnist-5k | digits")
    d.add_argument("--sparsity", type=float, default=0.9, help="final sparsity (default 0.9)")
    d.add_argument("--epochs", type=int, default=None, help="training epochs (default: by dataset)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--quick", action="store_true", help="a few hundred steps, for smoke tests")
    d.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
