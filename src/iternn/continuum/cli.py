"""``iternn continuum [--quick] [--out DIR]``: the continuum instrument from the command line.

:func:`add_parser` adds the subcommand to ``iternn``'s parser; :func:`run` runs parsed
arguments and returns the exit code under the rule of :mod:`iternn.cli` (0 success; 1
every training diverged, or another error; 2 usage or configuration, such as an
``--out`` that is a file; 130 interrupted). Parsing imports neither torch nor the
instrument: they are imported when the command runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

__all__ = ["add_parser", "run", "handle", "default_out"]


def default_out(quick: bool) -> str:
    """``iternn-continuum-quick`` or ``iternn-continuum-full`` (in the current folder)."""
    return f"iternn-continuum-{'quick' if quick else 'full'}"


def add_parser(subparsers: Any, parents: Sequence[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add ``continuum`` to ``subparsers`` (from ``add_subparsers``) with ``parents`` (the
    shared ``--debug`` flag); its handler is :func:`handle`. Returns the new parser."""
    from ..cli import positive_int

    p = subparsers.add_parser(
        "continuum", parents=list(parents),
        help="move one map from the MLP end to the RNN end and measure where it stands",
        description=(
            "Sweep one map family along the continuum between MLPs and RNNs: applications "
            "per input k (1 to beyond the depth), the initial vector (zeros, carried state, "
            "random), a feedback scale alpha in [0, 1] and held or forced input. Measure the "
            "memory across inputs, the impulse response, the spectral radius at the fixed "
            "point and the largest Lyapunov exponent at every point, and the test accuracy on "
            "digits (no memory needed) and the anomaly sequences (memory needed) on the "
            "(k, alpha) grid, at equal trainable parameters. Writes report.md (with a reading "
            "of where the claims held), continuum.json and pictures. The full run takes about "
            "45 minutes on 2 CPU cores; --quick a few minutes. Exits 1 when every training "
            "diverged (the report is written anyway)."))
    p.add_argument("--quick", action="store_true",
                   help="a coarse grid, one trained setting, less data and fewer epochs "
                        "(under 5 minutes on 2 CPU cores)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="report folder (default: ./iternn-continuum-quick or "
                        "./iternn-continuum-full)")
    p.add_argument("--threads", type=positive_int, default=1, metavar="N",
                   help="torch threads while it runs (default 1: fastest for these small maps)")
    p.add_argument("--no-pictures", dest="pictures", action="store_false",
                   help="no PNG pictures (matplotlib not needed)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(handler=handle)
    return p


def handle(args: argparse.Namespace) -> None:
    """Run the command (errors propagate; :func:`run` turns them into the exit code)."""
    from pathlib import Path

    from ..errors import ConfigError, StudyError

    out = Path(args.out or default_out(args.quick))
    if out.exists() and not out.is_dir():  # refused before torch is imported
        raise ConfigError(f"--out {out}: is a file, not a folder")
    from . import config
    from .run import run_continuum

    say = None if args.quiet else (lambda line: print(line, flush=True))
    result = run_continuum(config.QUICK if args.quick else config.FULL, out, log=say,
                           pictures=args.pictures, threads=args.threads)
    print(f"report written to {result.report} ({len(result.points)} points, "
          f"{result.trainings} trainings, {result.wall_time_s:.0f} s)")
    if result.trainings and result.diverged == result.trainings:
        raise StudyError(f"every training ({result.trainings}) diverged: see {result.report}")


def run(args: argparse.Namespace) -> int:
    """Run parsed ``continuum`` arguments; returns the exit code (see the module docstring)."""
    from ..cli import run_command

    return run_command(handle, args)
