"""The ``iternn`` command line.

    iternn study [--config FILE] [--quick] [--jobs N] [--out DIR] [--shard I/N]
    iternn train --dataset D --model M [...]
    iternn bench [--quick] [--which all|core|sparse]
    iternn analyze MAP [--out DIR] [--seed N] [--steps N] [--quick] [--no-pictures]
    iternn demo [--seed N] [--reps N]

``study``, ``train`` and ``bench`` are described in :mod:`iternn.study.commands`.

``analyze`` reads a map saved with ``iternn.save`` and writes a report folder
(``report.md`` and PNG pictures: structure, impulse response, spectra, fixed points,
Lyapunov exponents, trajectory, bifurcation diagram); by default the folder is
``./iternn-report-<MAP stem>`` in the current directory. It prints where the report
went.

Exit codes: 0 success, 1 failure (one line ``iternn: error: ...`` on stderr; ``--debug``
shows the traceback instead), 2 bad usage.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .study.commands import COMMANDS, add_commands, one_line, positive_int, run

__all__ = ["main", "default_report_dir"]


def default_report_dir(map_path: str) -> Path:
    """``./iternn-report-<stem>``: the default report folder of ``iternn analyze MAP``
    (in the current directory, never next to the map)."""
    return Path(f"iternn-report-{Path(map_path).stem}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="iternn",
        description="iternn: neural networks as iterated block maps.",
        epilog="Exit codes: 0 success, 1 failure, 2 bad usage.",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    # Also accepted after the subcommand; SUPPRESS keeps the top-level value otherwise.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("demo", parents=[common],
                          help="convert an MLP and an RNN and compare them with torch")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--reps", type=int, default=5, help="timing repetitions (median)")
    add_commands(sub, parents=[common])
    an = sub.add_parser(
        "analyze", parents=[common],
        help="write a report folder on the dynamics of a saved map",
        description=(
            "Analyse a map saved with iternn.save: structure, impulse response, Jacobian "
            "spectra, fixed points and their stability, Lyapunov exponents, trajectory and "
            "bifurcation diagram. Writes report.md and PNG pictures into a folder and "
            "prints where it went."
        ),
    )
    an.add_argument("map", metavar="MAP", help="a .safetensors file written by iternn.save")
    an.add_argument("--out", metavar="DIR", default=None,
                    help="report folder (default: ./iternn-report-<MAP stem>)")
    an.add_argument("--seed", type=int, default=0,
                    help="seed of the state, perturbations and starts (default 0)")
    an.add_argument("--steps", type=positive_int, default=None, metavar="N",
                    help="applications for the trajectory and the Lyapunov average "
                         "(default 400, --quick: 100)")
    an.add_argument("--quick", action="store_true",
                    help="fewer starts, steps and parameter values: a fast first look")
    an.add_argument("--no-pictures", dest="pictures", action="store_false",
                    help="write the numbers only (no PNGs; matplotlib not needed)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 failure, 2 bad usage)."""
    args = _parser().parse_args(argv)
    if args.command in COMMANDS:
        return run(args)
    try:
        if args.command == "demo":
            from .demo import run_demo

            run_demo(seed=args.seed, reps=args.reps)
        elif args.command == "analyze":
            from .dynamics.report import PICTURES, REPORT_NAME, analyze

            out = Path(args.out) if args.out is not None else default_report_dir(args.map)
            folder = analyze(args.map, out, seed=args.seed, steps=args.steps,
                             quick=args.quick, pictures=args.pictures)
            pictures = sum((folder / name).is_file() for name in PICTURES)
            print(f"report written to {folder} ({REPORT_NAME} and {pictures} pictures)")
        return 0
    except Exception as exc:  # noqa: BLE001 - one line unless --debug
        if args.debug:
            raise
        print(f"iternn: error: {one_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
