"""The ``study``, ``train`` and ``bench`` subcommands of ``iternn``.

The top-level command line (``iternn.cli``) calls :func:`add_commands` on its
subparsers object and :func:`run` for these commands::

    iternn study [--config FILE] [--quick] [--jobs N] [--out DIR] [--shard i/n] [--no-pictures]
    iternn train --dataset D --model M [--hidden H] [--density P] [--extra-steps N] [--seed S]
                 [--epochs E] [--lr LR] [--batch-size B] [--out DIR] [--resume] [--tensorboard]
                 [--quiet]
    iternn bench [--quick] [--which all|core|sparse]

``study`` runs the grid of a config (``--quick``: the built-in quick study, what ``make
demo`` runs; neither: the built-in default study) into ``--out`` (default
``./iternn-study-<config name>``) and prints where ``report.md`` is. ``train`` trains one
model of one family (``--tensorboard``: also TensorBoard events in ``OUT/tensorboard``,
needs ``pip install 'iternn[tensorboard]'``); under ``torchrun --nproc_per_node=N`` it
trains data-parallel (:mod:`iternn.study.distributed`). ``bench`` runs
``benchmarks/run.py`` and ``benchmarks/sparse.py`` of the source checkout.

:func:`run` returns the exit code: 0 success, 1 failure — one line ``iternn: error: ...``
on stderr (the traceback instead when ``args.debug`` is set), a missing optional package
included. Bad usage is argparse's exit 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["COMMANDS", "add_commands", "run", "find_benchmarks"]

COMMANDS = ("study", "train", "bench")
#: The benchmark scripts ``iternn bench --which`` runs, in order.
_BENCH_SCRIPTS = {"all": ("run.py", "sparse.py"), "core": ("run.py",), "sparse": ("sparse.py",)}


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def _nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def _shard(text: str) -> tuple[int, int]:
    from .sweep import parse_shard

    try:
        return parse_shard(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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
        raise argparse.ArgumentTypeError(f"hidden widths must be comma-separated ints, got {text!r}") from None
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"hidden widths must be ints >= 1, got {text!r}")
    return widths


def add_commands(subparsers: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    """Register ``study``, ``train`` and ``bench`` on an argparse subparsers object
    (``parents`` are passed to every subparser, e.g. one that adds ``--debug``)."""
    parents = list(parents)
    st = subparsers.add_parser(
        "study", parents=parents, help="run the sparsity study and write a report",
        description=(
            "Run a grid of trainings (datasets x budgets x models x densities x seeds) and write "
            "a report folder: report.md with tables, plots and a reading of the paper's claims, "
            "results.csv/json and one folder per run. Runs already present are reused, so an "
            "interrupted study continues where it stopped. Without --config and --quick the "
            "built-in default study runs (see iternn.study.config.DEFAULT for its run time)."),
        epilog="Several machines: give each the same config and --shard i/n (i = 1..n), then copy "
               "all runs/ folders into one --out and run the study once more to get one report.")
    src = st.add_mutually_exclusive_group()
    src.add_argument("--config", metavar="FILE", help="a TOML study config")
    src.add_argument("--quick", action="store_true",
                     help="the built-in quick study (about 1.5 minutes on 2 CPU cores; `make demo`)")
    st.add_argument("--jobs", type=positive_int, default=None, metavar="N",
                    help="parallel processes (default: the config's `jobs`)")
    st.add_argument("--out", metavar="DIR", default=None,
                    help="study folder (default: ./iternn-study-<config name>)")
    st.add_argument("--shard", type=_shard, default=None, metavar="i/n",
                    help="run only every n-th run of the grid, starting with the i-th (1 <= i <= n)")
    st.add_argument("--no-pictures", dest="pictures", action="store_false",
                    help="no PNG plots in the report")
    st.add_argument("--quiet", action="store_true", help="no progress lines")

    tr = subparsers.add_parser(
        "train", parents=parents, help="train one model of one family on one dataset",
        description=(
            "Train one model and write checkpoint.pt, metrics.csv and metrics.json into --out "
            "(default ./iternn-train-<dataset>-<model>). Under `torchrun --nproc_per_node=N` "
            "it trains data-parallel (gloo on CPU, nccl on GPU)."))
    tr.add_argument("--dataset", required=True, help="mnist1d, digits, regression, anomaly, mnist_idx")
    tr.add_argument("--model", required=True,
                    help="mlp, mlp_map, dense_map, sparse_map (flat data); forced_map, rnn, gru, lstm "
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
    tr.add_argument("--epochs", type=positive_int, default=20, help="default 20")
    tr.add_argument("--lr", type=float, default=3e-3, help="default 0.003")
    tr.add_argument("--batch-size", type=positive_int, default=64, help="default 64")
    tr.add_argument("--optimizer", choices=("adam", "adamw", "sgd"), default="adam")
    tr.add_argument("--patience", type=_nonneg_int, default=0,
                    help="early stopping after N epochs without a better validation loss (0: off)")
    tr.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    tr.add_argument("--out", metavar="DIR", default=None, help="run folder")
    tr.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    tr.add_argument("--tensorboard", action="store_true",
                    help="also write the per-epoch scalars as TensorBoard events into OUT/tensorboard "
                         "(needs pip install 'iternn[tensorboard]')")
    tr.add_argument("--quiet", action="store_true", help="no per-epoch lines")

    be = subparsers.add_parser(
        "bench", parents=parents, help="run the benchmarks of the source checkout (like make bench)",
        description="Run the benchmarks from the source checkout and print their ratios: "
                    "benchmarks/run.py (block maps vs torch modules) and benchmarks/sparse.py "
                    "(sparse kernels vs a dense masked block).")
    be.add_argument("--quick", action="store_true", help="smoke sizes (< 30 s each)")
    be.add_argument("--which", choices=tuple(_BENCH_SCRIPTS), default="all",
                    help="core: benchmarks/run.py; sparse: benchmarks/sparse.py; all: both (default)")


# --------------------------------------------------------------------------- commands


def _say(args: argparse.Namespace) -> Any:
    if getattr(args, "quiet", False):
        return None
    return lambda line: print(line, flush=True)


def _cmd_study(args: argparse.Namespace) -> int:
    from .config import DEFAULT, QUICK, load_config
    from .sweep import run_study

    config = load_config(args.config) if args.config else (QUICK if args.quick else DEFAULT)
    out = Path(args.out) if args.out else Path(f"iternn-study-{config.name}")
    sweep, report = run_study(config, out, jobs=args.jobs, shard=args.shard, log=_say(args),
                              pictures=args.pictures)
    note = ""
    if sweep.failed or sweep.diverged:
        note = f" ({sweep.failed} failed, {sweep.diverged} diverged: see the report)"
    print(f"report written to {report} ({sweep.ran} runs trained, {sweep.skipped} reused, "
          f"{sweep.wall_time_s:.1f} s){note}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import json

    from .config import DATASET_TASKS, train_config
    from .data import load_dataset
    from .models import FAMILIES, build_model

    options = {"path": args.data_path} if args.data_path else {}
    if args.data_path and args.dataset != "mnist_idx":
        raise ValueError("--data-path is for --dataset mnist_idx")
    if args.model not in FAMILIES:
        raise ValueError(f"unknown model {args.model!r}; known: {', '.join(FAMILIES)}")
    task = DATASET_TASKS.get(args.dataset)
    if task is not None and task not in FAMILIES[args.model].tasks:
        raise ValueError(f"model {args.model!r} serves {'/'.join(FAMILIES[args.model].tasks)} datasets; "
                         f"{args.dataset!r} is a {task} dataset")
    if args.tensorboard:
        from .train import summary_writer_class

        summary_writer_class()  # a missing package fails here, before the data is loaded
    hidden = args.hidden or (32,)
    cfg = train_config({"optimizer": args.optimizer, "lr": args.lr, "epochs": args.epochs,
                        "batch_size": args.batch_size, "patience": args.patience,
                        "device": args.device}, args.seed)
    data = load_dataset(args.dataset, seed=args.data_seed, **options)
    model = build_model(args.model, data, hidden=hidden, density=args.density, seed=args.seed,
                        activation=args.activation, extra_steps=args.extra_steps)
    name = args.model + ("" if args.density is None else f"-d{args.density:g}") \
        + (f"-e{args.extra_steps}" if args.extra_steps else "")
    out = Path(args.out) if args.out else Path(f"iternn-train-{args.dataset}-{name}")
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("RANK", "0") or 0)
    log = _say(args) if rank == 0 else None
    if world > 1:
        from .distributed import train_distributed

        result = train_distributed(model, data, cfg, out_dir=out, resume=args.resume, progress=not args.quiet,
                                   log=log, tensorboard=args.tensorboard)
    else:
        from .train import train

        result = train(model, data, cfg, out_dir=out, resume=args.resume, progress=not args.quiet, log=log,
                       tensorboard=args.tensorboard)
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
    return 0


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


def _cmd_bench(args: argparse.Namespace) -> int:
    path = find_benchmarks()
    if path is None:
        raise FileNotFoundError("benchmarks/run.py not found: the benchmarks ship with the source "
                                "checkout, not the installed package (run from the repository)")
    for name in _BENCH_SCRIPTS[args.which]:
        script = path.parent / name
        if not script.is_file():
            raise FileNotFoundError(f"benchmarks/{name} not found next to {path}")
        code = _run_script(script, ["--quick"] if args.quick else [])
        if code:
            raise RuntimeError(f"benchmarks/{name} exited with status {code} (a correctness check failed)")
    return 0


_HANDLERS = {"study": _cmd_study, "train": _cmd_train, "bench": _cmd_bench}


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, FileNotFoundError) and exc.filename and exc.strerror:
        text = f"{exc.strerror}: {exc.filename}"
    if not text:
        return type(exc).__name__
    if isinstance(exc, (ValueError, TypeError, OSError, ImportError)):
        return text
    return f"{type(exc).__name__}: {text}"


def run(args: argparse.Namespace) -> int:
    """Run the command ``args.command`` (one of :data:`COMMANDS`); returns the exit code.

    Failures print one line ``iternn: error: ...`` on stderr and return 1 (with
    ``args.debug`` set, the exception propagates instead). ``KeyboardInterrupt`` returns 130.
    """
    handler = _HANDLERS.get(getattr(args, "command", None))
    if handler is None:
        print(f"iternn: error: unknown command {getattr(args, 'command', None)!r}", file=sys.stderr)
        return 2
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("iternn: interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001 - one line unless --debug
        if getattr(args, "debug", False):
            raise
        print(f"iternn: error: {one_line(exc)}", file=sys.stderr)
        return 1
