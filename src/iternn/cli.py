"""The ``iternn`` command line."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="iternn", description=__doc__)
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="convert an MLP and an RNN and compare them with torch")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--reps", type=int, default=5, help="timing repetitions (median)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 failure, 2 bad usage)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import run_demo

            run_demo(seed=args.seed, reps=args.reps)
        return 0
    except (ValueError, TypeError, OSError) as exc:
        if args.debug:
            raise
        print(f"iternn: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
