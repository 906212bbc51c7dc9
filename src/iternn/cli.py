"""The ``iternn`` command line: every parser and the one exit-code rule.

    iternn study [--config FILE | --preset NAME | --quick] [--select S] [--epochs E | --steps N]
                 [--weight-decay W] [--patience P] [--val-fraction F]
                 [--jobs N] [--out DIR] [--shard i/n] [--no-pictures]
    iternn train --dataset D --model M [--hidden W[,W...]] [--density P] [--epochs E | --steps N]
                 [--select S] [--weight-decay W] [--val-fraction F] [...]
    iternn bench [--quick] [--which all|core|sparse]
    iternn analyze MAP [--out DIR] [--seed N] [--steps N] [--quick] [--no-pictures] [--quiet]
    iternn demo [--seed N] [--reps N]
    iternn continuum [--quick] [--out DIR] [--threads N] [--no-pictures] [--quiet]
    python -m iternn.study.distributed (--build MODULE:FUNC | --dataset D) [...]

``study`` runs the grid of a config (``--preset NAME``: a built-in study, ``quick``,
``default`` or ``mnist1d-baselines``; ``--quick`` is ``--preset quick``, what ``make demo``
runs; none: the built-in default study) into ``--out`` (default
``./iternn-study-<config name>``) and prints where ``report.md`` is. ``--select``,
``--epochs``/``--steps``, ``--weight-decay``, ``--patience`` and ``--val-fraction`` set
that option for the whole study (:func:`iternn.study.config.with_overrides`). ``train`` trains one
model of one family; under ``torchrun --nproc_per_node=N`` it trains data-parallel
(:mod:`iternn.study.distributed`, whose own entry point is :func:`distributed_main`).
``bench`` runs ``benchmarks/run.py`` and ``benchmarks/sparse.py`` of the source checkout.
``analyze`` reads a map saved with ``iternn.save`` and writes a report folder
(``report.md`` and PNG pictures), by default ``./iternn-report-<MAP stem>``. ``demo`` is
the short conversion tour. ``continuum`` runs the continuum instrument
(:mod:`iternn.continuum`) and writes its report folder, by default
``./iternn-continuum-quick`` or ``./iternn-continuum-full``.

Every command runs through :func:`run_command`, so every command exits the same way:

* 0: success.
* 1: a run failed or diverged (``train`` with status ``"diverged"``; a ``study`` with a
  failed run, or whose every selected run diverged or failed; a benchmark whose
  correctness check failed), or any other error. One line ``iternn: error: ...`` on
  stderr; ``--debug`` shows the traceback instead.
* 2: usage or configuration: bad flags (argparse), a bad config file or key
  (:class:`~iternn.errors.ConfigError`, :class:`~iternn.errors.ResumeError`), a missing
  or unreadable input file, an ``--out`` that is a file, a map file that is not one
  (:class:`~iternn.errors.FormatError`), a data set that cannot be read
  (:class:`~iternn.errors.DataError`), a request too large for this machine
  (:class:`~iternn.errors.SizeError`), a ``--device`` this machine does not have.
* 130: interrupted (Ctrl-C): one line ``iternn: interrupted``, no traceback.

Parsing arguments imports neither torch nor the parts of iternn that do: ``iternn
--help`` and a usage error answer at once; a command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import (
    ConfigError,
    DataError,
    FormatError,
    IterNNError,
    MapError,
    MapTypeError,
    SizeError,
    StudyError,
)

__all__ = [
    "EXIT_OK",
    "EXIT_FAILED",
    "EXIT_USAGE",
    "EXIT_INTERRUPTED",
    "main",
    "distributed_main",
    "build_parser",
    "distributed_parser",
    "run_command",
    "exit_code",
    "check_device",
    "default_report_dir",
    "find_benchmarks",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

#: Exceptions that mean "the command as given cannot run": exit 2.
_USAGE_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, FormatError, DataError, SizeError,
    FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
)

_EXIT_CODES_HELP = """\
exit codes:
  0    success
  1    a run failed or diverged (train: status diverged; study: a failed run, or
       every run diverged), or another error: one line 'iternn: error: ...'
       (--debug: the traceback)
  2    usage or configuration: bad flags, a bad config file or key, a missing or
       unreadable input file, a map file that is not one, a request too large for
       this machine's memory, a --device it does not have
  130  interrupted (Ctrl-C)"""

#: The benchmark scripts ``iternn bench --which`` runs, in order.
_BENCH_SCRIPTS = {"all": ("run.py", "sparse.py"), "core": ("run.py",), "sparse": ("sparse.py",)}

_DEVICE_RE = re.compile(r"cpu|auto|mps|cuda(:\d+)?\Z")


# --------------------------------------------------------------------------- exit codes


def exit_code(exc: BaseException) -> int:
    """The exit code of a command that raised ``exc`` (see the module docstring)."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, _USAGE_ERRORS):
        return EXIT_USAGE
    return EXIT_FAILED


def one_line(exc: BaseException) -> str:
    """``exc`` as one line: its message (the type's name first for types that do not say
    what went wrong by themselves, such as a bare ``RuntimeError``)."""
    text = " ".join(str(exc).split())
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        text = f"{exc.strerror}: {exc.filename}"
    if not text:
        return type(exc).__name__
    if isinstance(exc, (IterNNError, ValueError, TypeError, OSError, ImportError, MemoryError)):
        return text
    return f"{type(exc).__name__}: {text}"


def run_command(handler: Callable[[argparse.Namespace], None], args: argparse.Namespace) -> int:
    """Run ``handler(args)`` and turn its outcome into the exit code.

    Returning is 0. An exception prints one line ``iternn: error: ...`` on stderr and
    gives :func:`exit_code` (with ``args.debug`` set it propagates instead, traceback and
    all); Ctrl-C prints ``iternn: interrupted`` and gives 130.
    """
    try:
        handler(args)
    except KeyboardInterrupt:
        print("iternn: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - one line unless --debug
        if getattr(args, "debug", False):
            raise
        print(f"iternn: error: {one_line(exc)}", file=sys.stderr, flush=True)
        return exit_code(exc)
    return EXIT_OK


# --------------------------------------------------------------------------- argument types


def _int_at_least(text: str, low: int) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {v}")
    return v


def positive_int(text: str) -> int:
    """An int >= 1 (argparse type)."""
    return _int_at_least(text, 1)


def _nonneg_int(text: str) -> int:
    return _int_at_least(text, 0)


def _finite_float(text: str, *, positive: bool) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be finite, got {text}")
    if positive and v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    if not positive and v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return v


def _positive_float(text: str) -> float:
    return _finite_float(text, positive=True)


def _nonneg_float(text: str) -> float:
    return _finite_float(text, positive=False)


def _shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``1 <= i <= n``."""
    try:
        a, b = text.split("/")
        i, n = int(a), int(b)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be i/n (e.g. 2/4), got {text!r}") from None
    if not 1 <= i <= n:
        raise argparse.ArgumentTypeError(f"i/n needs 1 <= i <= n, got {text!r}")
    return i, n


def _density(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return v


def _hidden(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in text.split(",") if w.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"hidden widths must be comma-separated ints, got {text!r}") from None
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"hidden widths must be ints >= 1, got {text!r}")
    return widths


def _hidden_or_none(text: str) -> tuple[int, ...]:
    """Like ``--hidden`` but an empty string is no hidden layer (a linear model)."""
    return () if not text.strip() else _hidden(text)


def _fraction(text: str) -> float:
    """A number in [0, 1) (argparse type)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return v


_SELECT_HELP = ("which weights a run ends with (and its test metrics describe): val_loss, the "
                "epoch of lowest validation loss; val_acc, of highest validation accuracy; final, "
                "the last")


def _device(text: str) -> str:
    if not _DEVICE_RE.match(text):
        raise argparse.ArgumentTypeError(
            f"must be cpu, cuda, cuda:N, mps or auto, got {text!r}")
    return text


# --------------------------------------------------------------------------- parsers


def _debug_parent() -> argparse.ArgumentParser:
    """``--debug`` after the subcommand too; SUPPRESS keeps the top-level value otherwise."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error instead of one line")
    return common


def _add_budget_flags(p: argparse.ArgumentParser, *,
                      split_datasets: str = "mnist1d, digits, mnist_idx") -> None:
    """The budget and selection flags of ``iternn train`` and ``python -m
    iternn.study.distributed``: ``--epochs``/``--steps`` (exclusive), ``--select``,
    ``--patience`` (0: off) and ``--val-fraction``, with ``iternn train``'s defaults.
    ``split_datasets`` names, in ``--val-fraction``'s help, the datasets the command can
    load that have a validation split."""
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=positive_int, default=None, help="default 20")
    budget.add_argument("--steps", type=positive_int, default=None,
                        help="optimizer steps instead of epochs")
    p.add_argument("--select", choices=("val_loss", "val_acc", "final"), default="val_loss",
                   help=_SELECT_HELP + " (default val_loss)")
    p.add_argument("--patience", type=_nonneg_int, default=0,
                   help="early stopping after N epochs without improvement of the --select "
                        "criterion (0: off)")
    p.add_argument("--val-fraction", type=_fraction, default=None, metavar="F",
                   help=f"validation share of the training data ({split_datasets}; "
                        "0: none, with --select final)")


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``iternn`` with every subcommand (builds without importing torch)."""
    p = argparse.ArgumentParser(
        prog="iternn",
        description="iternn: neural networks as iterated block maps.",
        epilog=_EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of an error instead of one line")
    parents = [_debug_parent()]
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    st = sub.add_parser(
        "study", parents=parents, help="run the sparsity study and write a report",
        description=(
            "Run a grid of trainings (datasets x budgets x models x densities x seeds) and write "
            "a report folder: report.md with tables, plots and a reading of the paper's claims, "
            "results.csv/json and one folder per run. Runs already present are reused, so an "
            "interrupted study continues where it stopped. Without --config and --preset the "
            "built-in default study runs (see iternn.study.config for the built-in studies and "
            "their run times). The training flags set that option for the whole study. Exits 1 "
            "when a run failed or every run diverged (the report is written anyway)."),
        epilog="Several machines: give each the same config and --shard i/n (i = 1..n), then copy "
               "all runs/ folders into one --out and run the study once more to get one report.")
    src = st.add_mutually_exclusive_group()
    src.add_argument("--config", metavar="FILE", help="a TOML study config")
    src.add_argument("--preset", choices=("quick", "default", "mnist1d-baselines"), default=None,
                     help="a built-in study: quick (about 1.5 minutes on 2 CPU cores), default "
                          "(MNIST-1D, digits, anomaly), mnist1d-baselines (the published MNIST-1D "
                          "MLP, CNN and GRU with the published recipe, each also as its map)")
    src.add_argument("--quick", action="store_true",
                     help="the built-in quick study: --preset quick (`make demo`)")
    st.add_argument("--select", choices=("val_loss", "val_acc", "final"), default=None,
                    help=_SELECT_HELP)
    budget = st.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=positive_int, default=None, metavar="N",
                        help="epochs of every run")
    budget.add_argument("--steps", type=positive_int, default=None, metavar="N",
                        help="optimizer steps of every run (instead of epochs)")
    st.add_argument("--weight-decay", type=_nonneg_float, default=None, metavar="W",
                    help="weight decay of every run")
    st.add_argument("--patience", type=_nonneg_int, default=None, metavar="N",
                    help="early stopping after N epochs without improvement (0: off)")
    st.add_argument("--val-fraction", type=_fraction, default=None, metavar="F",
                    help="validation share of every dataset's training data (0: none, with "
                         "--select final)")
    st.add_argument("--jobs", type=positive_int, default=None, metavar="N",
                    help="parallel processes (default: the config's `jobs`)")
    st.add_argument("--out", metavar="DIR", default=None,
                    help="study folder (default: ./iternn-study-<config name>)")
    st.add_argument("--shard", type=_shard, default=None, metavar="i/n",
                    help="run only every n-th run of the grid, starting with the i-th (1 <= i <= n)")
    st.add_argument("--no-pictures", dest="pictures", action="store_false",
                    help="no PNG plots in the report")
    st.add_argument("--quiet", action="store_true", help="no progress lines")
    st.set_defaults(handler=_cmd_study)

    tr = sub.add_parser(
        "train", parents=parents, help="train one model of one family on one dataset",
        description=(
            "Train one model and write checkpoint.pt, metrics.csv and metrics.json into --out "
            "(default ./iternn-train-<dataset>-<model>). Under `torchrun --nproc_per_node=N` "
            "it trains data-parallel (gloo on CPU, nccl on GPU). Exits 1 when training "
            "diverged."))
    tr.add_argument("--dataset", required=True, help="mnist1d, digits, regression, anomaly, mnist_idx")
    tr.add_argument("--model", required=True,
                    help="mlp, mlp_map, dense_map, sparse_map, resmlp, resmlp_map (matched to the "
                         "budget), cnn1d, cnn1d_map, bigru, bigru_map (published MNIST-1D shapes; "
                         "--hidden is their width) for flat data; forced_map, rnn, gru, lstm "
                         "(anomaly)")
    tr.add_argument("--hidden", type=_hidden, default=None, metavar="W[,W...]",
                    help="MLP hidden widths fixing the budget (sequences: the forced map's width); "
                         "default 32")
    tr.add_argument("--density", type=_density, default=None, metavar="P",
                    help="block density for sparse_map (0 < P < 1) or forced_map (0 < P <= 1)")
    tr.add_argument("--extra-steps", type=_nonneg_int, default=0, metavar="N",
                    help="dense_map/sparse_map: iterate N more times than the MLP has layers "
                         "(1 makes every block of the six-block map live; default 0)")
    tr.add_argument("--seed", type=_nonneg_int, default=0, help="init and batch-order seed (default 0)")
    tr.add_argument("--data-seed", type=_nonneg_int, default=0, help="dataset split seed (default 0)")
    tr.add_argument("--data-path", metavar="DIR", default=None,
                    help="folder of the MNIST IDX files (dataset mnist_idx)")
    tr.add_argument("--activation", default=None, help="relu, tanh, ... (default relu; tanh for sequences)")
    _add_budget_flags(tr)
    tr.add_argument("--lr", type=_positive_float, default=3e-3, help="default 0.003")
    tr.add_argument("--batch-size", type=positive_int, default=64, help="default 64")
    tr.add_argument("--optimizer", choices=("adam", "adamw", "sgd"), default="adam")
    tr.add_argument("--weight-decay", type=_nonneg_float, default=0.0, metavar="W",
                    help="default 0")
    tr.add_argument("--device", type=_device, default="cpu",
                    help="cpu, cuda, cuda:N, mps or auto (default cpu)")
    tr.add_argument("--out", metavar="DIR", default=None, help="run folder")
    tr.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    tr.add_argument("--tensorboard", action="store_true",
                    help="also write the per-epoch scalars as TensorBoard events into OUT/tensorboard "
                         "(needs pip install 'iternn[tensorboard]')")
    tr.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    tr.set_defaults(handler=_cmd_train)

    be = sub.add_parser(
        "bench", parents=parents, help="run the benchmarks of the source checkout (like make bench)",
        description="Run the benchmarks from the source checkout and print their ratios: "
                    "benchmarks/run.py (block maps vs torch modules) and benchmarks/sparse.py "
                    "(sparse kernels vs a dense masked block). Exits 1 when a correctness "
                    "check fails.")
    be.add_argument("--quick", action="store_true", help="smoke sizes (< 30 s each)")
    be.add_argument("--which", choices=tuple(_BENCH_SCRIPTS), default="all",
                    help="core: benchmarks/run.py; sparse: benchmarks/sparse.py; all: both (default)")
    be.set_defaults(handler=_cmd_bench)

    an = sub.add_parser(
        "analyze", parents=parents,
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
    an.add_argument("--seed", type=_nonneg_int, default=0,
                    help="seed of the state, perturbations and starts (default 0)")
    an.add_argument("--steps", type=positive_int, default=None, metavar="N",
                    help="applications for the trajectory and the Lyapunov average "
                         "(default 400, --quick: 100)")
    an.add_argument("--quick", action="store_true",
                    help="fewer starts, steps and parameter values: a fast first look")
    an.add_argument("--no-pictures", dest="pictures", action="store_false",
                    help="write the numbers only (no PNGs; matplotlib not needed)")
    an.add_argument("--quiet", action="store_true",
                    help="no progress bar on stderr (one step per report section)")
    an.set_defaults(handler=_cmd_analyze)

    demo = sub.add_parser("demo", parents=parents,
                          help="convert an MLP and an RNN and compare them with torch")
    demo.add_argument("--seed", type=_nonneg_int, default=0)
    demo.add_argument("--reps", type=positive_int, default=5, help="timing repetitions (median)")
    demo.set_defaults(handler=_cmd_demo)

    from .continuum.cli import add_parser as add_continuum_parser  # it imports this module

    add_continuum_parser(sub, parents)
    return p


#: ``python -m iternn.study.distributed`` flag dest -> TrainConfig field.
_OVERRIDES = {
    "optimizer": "optimizer", "lr": "lr", "weight_decay": "weight_decay",
    "momentum": "momentum", "epochs": "epochs", "steps": "steps", "batch_size": "batch_size",
    "patience": "patience", "select": "select", "seed": "seed", "loss_on": "loss_on",
    "max_grad_norm": "max_grad_norm", "lr_schedule": "lr_schedule", "device": "device",
}
#: The exclusive budgets: a flag setting one clears the other.
_OTHER_BUDGET = {"epochs": "steps", "steps": "epochs"}


def distributed_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m iternn.study.distributed`` (torchrun's entry point)."""
    p = argparse.ArgumentParser(
        prog="python -m iternn.study.distributed",
        description="Train one model, data-parallel under torchrun (or in one process). "
                    "Rank 0 prints the result as one JSON line on stdout. A training flag left "
                    "out keeps the value of the TrainConfig that --build returns (else "
                    "TrainConfig's default, as below); --val-fraction is for --dataset.",
        epilog=_EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--build", metavar="MODULE:FUNC",
                      help="callable returning (model, dataset) or (model, dataset, "
                           "TrainConfig); MODULE may be a path to a .py file")
    what.add_argument("--dataset", help="a dataset name of iternn.study.data (MLP model)")
    p.add_argument("--hidden", type=_hidden_or_none, default=(64,), metavar="W[,W...]",
                   help="MLP hidden widths, comma-separated (default 64)")
    p.add_argument("--data-seed", type=_nonneg_int, default=0, help="dataset seed")
    p.add_argument("--optimizer", choices=("adam", "adamw", "sgd"))
    p.add_argument("--lr", type=_positive_float)
    p.add_argument("--weight-decay", type=_nonneg_float)
    p.add_argument("--momentum", type=_nonneg_float)
    _add_budget_flags(p, split_datasets="mnist1d, digits")  # mnist_idx needs --data-path
    p.set_defaults(select=None, patience=None)  # absent: kept from the config (same defaults)
    p.add_argument("--batch-size", type=positive_int, help="global batch size")
    p.add_argument("--seed", type=_nonneg_int)
    p.add_argument("--loss-on", choices=("last", "all"))
    p.add_argument("--max-grad-norm", type=_positive_float)
    p.add_argument("--lr-schedule", choices=("constant", "cosine"))
    p.add_argument("--device", type=_device)
    p.add_argument("--backend", choices=("gloo", "nccl"))
    p.add_argument("--init-method", help="process-group rendezvous, e.g. file:///shared/x "
                                         "(default env://, as set by torchrun)")
    p.add_argument("--out", help="output folder (checkpoint, metrics)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no log lines on stderr")
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of an error instead of one line")
    p.set_defaults(handler=_cmd_distributed)
    return p


# --------------------------------------------------------------------------- shared checks


def check_device(device: str, flag: str = "--device") -> None:
    """:class:`ConfigError` unless this machine has ``device`` (imports torch)."""
    if device == "auto":
        return
    from .core.device import available_device

    try:
        available_device(device, what=flag)
    except MapError as exc:
        raise ConfigError(str(exc)) from None


def _out_folder(value: str | None, default: str, flag: str = "--out") -> Path:
    """The folder a command writes (``value``, else ``default``); :class:`ConfigError`
    naming ``flag`` when a file already stands at that path."""
    path = Path(value) if value else Path(default)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path}: is a file, not a folder")
    return path


def _say(args: argparse.Namespace) -> Callable[[str], None] | None:
    if getattr(args, "quiet", False):
        return None
    return lambda line: print(line, flush=True)


def _flag_error(flag: str, exc: Exception) -> Exception:
    """A value refused while building from the flags, as a :class:`ConfigError` naming
    ``flag`` (errors that already mean bad usage, such as a DataError, as they are)."""
    if isinstance(exc, _USAGE_ERRORS):
        return exc
    return ConfigError(f"{flag}: {exc}")


def _diverged_line(result: Any) -> str:
    where = getattr(result, "diverged_at", None) or {}
    at = f" at epoch {where['epoch']}" if "epoch" in where else ""
    loss = f" (loss {where['loss']})" if "loss" in where else ""
    return f"training diverged{at}{loss}: try a smaller --lr"


# --------------------------------------------------------------------------- commands


def _cmd_study(args: argparse.Namespace) -> None:
    from .study import config as study_config

    if args.config:  # a bad config is refused before torch is imported
        config = study_config.load_config(args.config)
    else:
        config = study_config.preset("quick" if args.quick else args.preset or "default")
    config = study_config.with_overrides(
        config, select=args.select, weight_decay=args.weight_decay, epochs=args.epochs,
        steps=args.steps, patience=args.patience, val_fraction=args.val_fraction)
    from .study import run_study

    out = _out_folder(args.out, f"iternn-study-{config.name}")
    sweep, report = run_study(config, out, jobs=args.jobs, shard=args.shard, log=_say(args),
                              pictures=args.pictures)
    note = ""
    if sweep.failed or sweep.diverged:
        note = f" ({sweep.failed} failed, {sweep.diverged} diverged: see the report)"
    print(f"report written to {report} ({sweep.ran} runs trained, {sweep.skipped} reused, "
          f"{sweep.wall_time_s:.1f} s){note}")
    if sweep.failed:
        raise StudyError(f"{sweep.failed} of {sweep.selected} runs failed; their errors are in "
                         f"{report}")
    if sweep.selected and sweep.diverged == sweep.selected:
        raise StudyError(f"every run ({sweep.selected}) diverged: see {report}")


def _resolved_activation(args: argparse.Namespace) -> str | None:
    """``--activation``, or the family's default for the dataset's task when it is absent (so a
    run resumed with the default spelled out is the same run)."""
    if args.activation is not None:
        return args.activation
    from .study.config import DATASET_TASKS
    from .study.models import default_activation

    task = DATASET_TASKS.get(args.dataset)
    return None if task is None else default_activation(task)


def _train_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options that define a ``train`` run, keyed by flag dest (resume compares them)."""
    return {"dataset": args.dataset, "model": args.model, "hidden": list(args.hidden or (32,)),
            "density": args.density, "extra_steps": args.extra_steps, "seed": args.seed,
            "data_seed": args.data_seed, "data_path": args.data_path,
            "activation": _resolved_activation(args), "optimizer": args.optimizer, "lr": args.lr,
            "batch_size": args.batch_size, "epochs": args.epochs, "steps": args.steps,
            "patience": args.patience, "weight_decay": args.weight_decay, "select": args.select,
            "val_fraction": args.val_fraction, "device": args.device}


def _cmd_train(args: argparse.Namespace) -> None:
    import json

    from .study.config import DATASET_TASKS, train_config

    task = DATASET_TASKS.get(args.dataset)
    if task is None:
        raise ConfigError(f"--dataset: unknown dataset {args.dataset!r} "
                          f"(known: {', '.join(DATASET_TASKS)})")
    if args.data_path and args.dataset != "mnist_idx":
        raise ConfigError(f"--data-path is for --dataset mnist_idx, not {args.dataset!r}")
    if args.val_fraction is not None:
        _check_val_fraction(args.dataset, args.val_fraction, args.select)
    from .study.models import FAMILIES

    family = FAMILIES.get(args.model)
    if family is None:
        raise ConfigError(f"--model: unknown model {args.model!r} (known: {', '.join(FAMILIES)})")
    if task not in family.tasks:
        raise ConfigError(f"--model {args.model!r} serves {'/'.join(family.tasks)} datasets; "
                          f"--dataset {args.dataset!r} is a {task} dataset")
    check_device(args.device)
    name = args.model + ("" if args.density is None else f"-d{args.density:g}") \
        + (f"-e{args.extra_steps}" if args.extra_steps else "")
    out = _out_folder(args.out, f"iternn-train-{args.dataset}-{name}")
    if args.tensorboard:
        from .study.train import summary_writer_class

        summary_writer_class()  # a missing package fails here, before the data is loaded
    try:
        cfg = train_config({"optimizer": args.optimizer, "lr": args.lr, "epochs": args.epochs,
                            "steps": args.steps, "batch_size": args.batch_size,
                            "patience": args.patience, "weight_decay": args.weight_decay,
                            "select": args.select, "device": args.device}, args.seed)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"train options: {e}") from None
    from .study.data import load_dataset
    from .study.models import build_model

    options: dict[str, Any] = {"path": args.data_path} if args.data_path else {}
    if args.val_fraction is not None:
        options["val_fraction"] = args.val_fraction
    try:
        data = load_dataset(args.dataset, seed=args.data_seed, **options)
    except (ValueError, TypeError) as e:  # a bad option; DataError (a bad file) as it is
        raise _flag_error(f"--dataset {args.dataset}", e) from None
    try:
        model = build_model(args.model, data, hidden=args.hidden or (32,), density=args.density,
                            seed=args.seed, activation=args.activation,
                            extra_steps=args.extra_steps)
    except (ValueError, TypeError) as e:  # density, width, activation, extra steps refused
        raise _flag_error(f"--model {args.model}", e) from None
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("RANK", "0") or 0)
    log = _say(args) if rank == 0 else None
    kwargs = dict(out_dir=out, resume=args.resume, progress=not args.quiet, log=log,
                  tensorboard=args.tensorboard, run_options=_train_options(args))
    if world > 1:
        from .study.distributed import train_distributed

        result = train_distributed(model, data, cfg, **kwargs)
    else:
        from .study.train import train

        result = train(model, data, cfg, **kwargs)
    if rank == 0:
        test = result.test or {}
        acc = test.get("test_acc")
        print(json.dumps({"status": result.status, "epochs_run": result.epochs_run,
                          "best_epoch": result.best_epoch, "test_loss": test.get("test_loss"),
                          "test_acc": acc, "trainable": result.trainable,
                          "wall_time_s": round(result.wall_time_s, 3)}))
        print(f"{args.model} on {args.dataset}: status {result.status}, {result.trainable} trainable"
              + (f", test accuracy {100 * acc:.1f} %" if acc is not None else "")
              + f"; metrics and checkpoint in {out}")
    if result.status == "diverged":
        raise StudyError(_diverged_line(result))


def find_benchmarks() -> Path | None:
    """``benchmarks/run.py`` of the source checkout this package runs from (or of the
    current directory), or ``None``."""
    here = Path(__file__).resolve()
    candidates = [p / "benchmarks" / "run.py" for p in here.parents[:5]]
    candidates.append(Path.cwd() / "benchmarks" / "run.py")
    return next((c for c in candidates if c.is_file()), None)


def _run_script(path: Path, argv: list[str]) -> int:
    """``main(argv)`` of a benchmark script, loaded from its file."""
    spec = importlib.util.spec_from_file_location(f"_iternn_benchmarks_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        return module.main(argv)
    finally:
        sys.modules.pop(spec.name, None)


def _cmd_bench(args: argparse.Namespace) -> None:
    path = find_benchmarks()
    if path is None:
        raise ConfigError("bench: benchmarks/run.py not found: the benchmarks ship with the "
                          "source checkout, not the installed package (run from the repository)")
    for name in _BENCH_SCRIPTS[args.which]:
        script = path.parent / name
        if not script.is_file():
            raise ConfigError(f"bench: benchmarks/{name} not found next to {path}")
        code = _run_script(script, ["--quick"] if args.quick else [])
        if code:
            raise StudyError(f"benchmarks/{name} exited with status {code} "
                             "(a correctness check failed)")


def default_report_dir(map_path: str) -> Path:
    """``./iternn-report-<stem>``: the default report folder of ``iternn analyze MAP``
    (in the current directory, never next to the map)."""
    return Path(f"iternn-report-{Path(map_path).stem}")


def _cmd_analyze(args: argparse.Namespace) -> None:
    from .dynamics.report import PICTURES, REPORT_NAME, analyze

    out = _out_folder(args.out, str(default_report_dir(args.map)))
    try:
        folder = analyze(args.map, out, seed=args.seed, steps=args.steps, quick=args.quick,
                         pictures=args.pictures, progress=not args.quiet)
    except MapTypeError as e:  # the file holds a module that is not a block map: bad MAP
        raise ConfigError(f"MAP: {e}") from e
    pictures = sum((folder / name).is_file() for name in PICTURES)
    print(f"report written to {folder} ({REPORT_NAME} and {pictures} pictures)")


def _cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(seed=args.seed, reps=args.reps)


# --------------------------------------------------------------------------- distributed


def _load_callable(spec: str) -> Callable[[], Any]:
    """``package.module:function`` or ``path/to/file.py:function`` (the ``--build`` flag)."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise ConfigError(f"--build must be MODULE:FUNCTION or FILE.py:FUNCTION, got {spec!r}")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ConfigError(f"--build: file {target} does not exist")
        mod_name = f"_iternn_build_{abs(hash(str(path.resolve())))}"
        spec_obj = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec_obj)
        sys.modules[mod_name] = module
        spec_obj.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as e:
            raise ConfigError(f"--build: no module {target!r} ({e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"--build: {target} has no callable {name!r}")
    return fn


def _build_from_dataset(args: argparse.Namespace, seed: int) -> tuple[Any, Any]:
    """``(model, data)``: an MLP with ``--hidden`` widths (ReLU) for ``--dataset`` (split
    with ``--val-fraction`` when given), its parameters drawn from ``seed`` without moving
    the global RNG."""
    import torch
    from torch import nn

    from .core.memory import check_bytes, tensor_bytes
    from .study.data import load_dataset

    options = {} if args.val_fraction is None else {"val_fraction": args.val_fraction}
    data = load_dataset(args.dataset, seed=args.data_seed, **options)
    if data.x_train.dim() != 2:
        raise ConfigError(f"--dataset {args.dataset}: inputs are {data.x_train.dim() - 1}-D; "
                          "the built-in MLP needs flat features (use --build)")
    outputs = data.n_classes if data.task != "regression" else (
        1 if data.y_train.dim() == 1 else data.y_train.shape[1])
    widths = [data.x_train.shape[1], *args.hidden, outputs]
    numel = sum((a + 1) * b for a, b in zip(widths[:-1], widths[1:]))
    # parameters, their gradients and two Adam moments
    check_bytes(4 * tensor_bytes(numel, torch.get_default_dtype()),
                f"--hidden {','.join(map(str, args.hidden))} ({numel} parameters, their "
                "gradients and optimizer state)")
    layers: list[nn.Module] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for a, b in zip(widths[:-2], widths[1:-1]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(widths[-2], widths[-1]))
    return nn.Sequential(*layers), data


def _config_with(config: Any, args: argparse.Namespace) -> Any:
    """``config`` with the flags given, all at once (``--select val_loss --patience 3`` on
    a config with ``select="final"`` is valid only as a whole); a combination TrainConfig
    refuses names the flags."""
    import dataclasses

    flags, change = [], {}
    for dest, field in _OVERRIDES.items():
        value = getattr(args, dest)
        if value is None:
            continue
        flags.append("--" + dest.replace("_", "-"))
        change[field] = None if dest == "patience" and value == 0 else value
        if field in _OTHER_BUDGET:
            change[_OTHER_BUDGET[field]] = None
    try:
        return dataclasses.replace(config, **change)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{', '.join(flags)}: {e}") from None


def _check_val_fraction(dataset: str, fraction: float, select: str) -> None:
    """:class:`ConfigError` naming ``--val-fraction`` unless ``dataset`` has a validation
    fraction and ``select`` can do without a validation split when ``fraction`` is 0."""
    from .study.data import dataset_options

    if "val_fraction" not in dataset_options(dataset):
        raise ConfigError(f"--val-fraction: dataset {dataset!r} has no validation "
                          "fraction (its splits are given by count)")
    if fraction == 0 and select != "final":
        raise ConfigError(f"--val-fraction 0 leaves no validation split, which --select "
                          f"{select} chooses the weights on (use --select final)")


def _cmd_distributed(args: argparse.Namespace) -> None:
    import json

    from .study.distributed import train_distributed
    from .study.train import TrainConfig, train

    if args.resume and not args.out:
        raise ConfigError("--resume needs --out")
    if args.out:
        _out_folder(args.out, args.out)
    if args.device is not None:
        check_device(args.device)
    if args.build and args.val_fraction is not None:
        raise ConfigError("--val-fraction is for --dataset: a --build function returns its "
                          "data already split")
    if args.build:
        built = _load_callable(args.build)()
        if not isinstance(built, tuple) or len(built) not in (2, 3):
            raise ConfigError("--build must return (model, dataset) or "
                              "(model, dataset, TrainConfig)")
        model, data = built[:2]
        config = built[2] if len(built) == 3 else TrainConfig()
    else:
        config = TrainConfig()
    config = _config_with(config, args)
    if args.dataset:
        if args.val_fraction is not None:
            _check_val_fraction(args.dataset, args.val_fraction, config.select)
        model, data = _build_from_dataset(args, config.seed)
    distributed = "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0)) if distributed else 0
    log = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    # what defines the model and the data (the training options are compared from config)
    options = {"build": args.build} if args.build else {
        "dataset": args.dataset, "hidden": list(args.hidden), "data_seed": args.data_seed}
    if args.val_fraction is not None:  # absent otherwise: run folders of before still resume
        options["val_fraction"] = args.val_fraction
    kwargs = dict(out_dir=args.out, resume=args.resume, progress=not args.no_progress, log=log,
                  run_options=options)
    if distributed:
        result = train_distributed(model, data, config, backend=args.backend,
                                   init_method=args.init_method, rank=rank,
                                   world_size=int(os.environ["WORLD_SIZE"]), **kwargs)
    else:
        result = train(model, data, config, **kwargs)
    if rank == 0:
        print(json.dumps(result.to_dict(), allow_nan=False), flush=True)
    if result.status == "diverged":
        raise StudyError(_diverged_line(result))


# --------------------------------------------------------------------------- entry points


def main(argv: Sequence[str] | None = None) -> int:
    """``iternn``: parse ``argv`` (bad usage exits 2 through argparse) and run the command;
    returns the exit code (see the module docstring)."""
    args = build_parser().parse_args(argv)
    return run_command(args.handler, args)


def distributed_main(argv: Sequence[str] | None = None) -> int:
    """``python -m iternn.study.distributed``: as :func:`main`, for the one command there."""
    args = distributed_parser().parse_args(argv)
    return run_command(args.handler, args)


if __name__ == "__main__":
    sys.exit(main())
