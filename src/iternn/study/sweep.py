"""Expand a study grid into runs, execute them, collect the results.

:func:`expand` turns a :class:`~iternn.study.config.StudyConfig` into a list of
:class:`Run` — datasets x budgets (``hidden``) x models x densities (for the families that
take one) x seeds, in that nesting order. :func:`run_sweep` executes them:

* **Sequentially** (``jobs=1``, in this process) or **in parallel** (``jobs=N``: a
  ``ProcessPoolExecutor`` with the ``spawn`` start method; each worker sets its own torch
  thread count, ``config.threads``, and loads each dataset once). Ctrl-C stops a
  parallel sweep at once: the workers leave SIGINT to the parent, which cancels the
  queued runs and terminates the workers (checkpoints are written atomically, so the
  next study continues the interrupted runs).
* **Every run in its own folder** ``OUT/runs/<run_id>/``: the trainer's ``checkpoint.pt``,
  ``metrics.csv``, ``metrics.json``, ``spec.json`` (the run's definition and fingerprint),
  the run's record ``result.json`` (written atomically when the run ends), plus
  ``error.txt`` (the traceback) for a failed run.
* **Faults never stop the sweep.** A run whose model diverges is recorded with status
  ``"diverged"`` (the trainer stops it); a run that raises is recorded as ``"failed"``
  with the error; a worker process that dies (killed, out of memory) breaks the pool: its
  runs are retried once, each in a fresh single-worker pool, and recorded as ``"failed"``
  if they kill that too.
* **Resumable.** A run whose ``result.json`` exists with the same *fingerprint* (a hash
  of everything that defines it: dataset and options, model, budget, density, seed,
  activation, training options but the logging switch ``tensorboard``) is skipped —
  unless its status is ``"failed"`` and ``retry_failed`` is on (the default). Any other
  run continues from its checkpoint (``train(resume=True)`` with the run's definition as
  its run options, :mod:`iternn.study.resume`): a run interrupted mid-training goes on
  from its last epoch, a finished run given more epochs trains on. A checkpoint the run
  cannot honour (another definition) is discarded and the run starts fresh; an
  unreadable checkpoint is **quarantined** — its run folder is renamed
  ``<run_id>.broken-<time>`` (kept for a post-mortem, logged, named in the record) — and
  the run trains again, so a damaged file never fails a run on every rerun.
* **One writer, one config.** The sweep runs inside
  :func:`iternn.study.folder.study_folder`: the folder is locked (a second study on it is
  a :class:`~iternn.FolderLockedError`) and belongs to the config recorded in
  ``study.json`` (another config is a :class:`~iternn.ConfigError`).
* **Results.** :func:`collect` reads the record of every run of the *whole* grid (runs
  without a record are ``"missing"``) and :func:`write_results` writes
  ``OUT/results.json`` (records with per-epoch metrics) and ``OUT/results.csv`` (one row
  per run, no curves).

Spreading a sweep over several machines
---------------------------------------
Runs are independent, so a sweep splits by runs: ``shard=(i, n)`` (``iternn study
--shard i/n``, ``1 <= i <= n``) keeps every ``n``-th run of the grid starting with the
``i``-th (``runs[i-1::n]``). Give each of ``n`` machines the same config and its own
``i``; each writes ``OUT/runs/...`` for its runs and a report of what it has. To merge,
copy every machine's ``OUT/runs/`` folders into one ``OUT/runs/`` (run ids are unique, so
nothing collides — a shared filesystem works too) and run ``iternn study --config
SAME.toml --out OUT`` once more: every run is found and skipped, and the report covers
the whole grid. (Within one machine, ``--jobs`` runs processes in parallel; a single
large run can itself be data-parallel under ``torchrun``, see
:mod:`iternn.study.distributed`.)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import multiprocessing
import signal
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import ConfigError, FormatError, ResumeError
from .checkpoint import load_checkpoint
from .config import ADDED_TRAIN_DEFAULTS, StudyConfig, train_config
from .folder import study_folder

__all__ = [
    "Run",
    "SweepResult",
    "RECORD_FIELDS",
    "collect",
    "check_grid",
    "expand",
    "load_datasets",
    "parse_shard",
    "quarantine",
    "run_one",
    "run_options",
    "run_sweep",
    "select_shard",
    "write_results",
]

RESULT_NAME = "result.json"
SPEC_NAME = "spec.json"
ERROR_NAME = "error.txt"
RUNS_DIR = "runs"
RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
DATASETS_JSON = "datasets.json"
DONE_STATUSES = ("ok", "early_stopped", "diverged")
#: Columns of ``results.csv`` (``results.json`` adds ``metrics``, ``train``, ``fingerprint``,
#: ``diverged_at``). ``wall_time_s``: the training's wall time (all sessions, if resumed);
#: ``run_time_s``: the whole run in its process, data loading and model building included.
RECORD_FIELDS = ("run_id", "index", "label", "dataset", "task", "family", "hidden", "density",
                 "extra_steps", "steps", "seed", "activation", "budget", "trainable", "live",
                 "status", "epochs_run",
                 "best_epoch", "best_val_loss", "val_acc", "test_loss", "test_acc",
                 "wall_time_s", "run_time_s", "error")


@dataclass(frozen=True)
class Run:
    """One training run of the grid (everything a worker needs, picklable)."""

    index: int
    label: str
    dataset: str
    task: str
    options: dict[str, Any]
    data_seed: int
    family: str
    hidden: tuple[int, ...]
    density: float | None
    seed: int
    activation: str
    train: dict[str, Any]
    extra_steps: int = 0
    threads: int = 1

    @property
    def run_id(self) -> str:
        """Unique folder name: ``label__family__h32[-16]__d0.1__e1__s0`` (no ``__d`` without a
        density, no ``__e`` without extra steps)."""
        parts = [self.label, self.family, "h" + "-".join(map(str, self.hidden))]
        if self.density is not None:
            parts.append(f"d{self.density!r}")
        if self.extra_steps:
            parts.append(f"e{self.extra_steps}")
        parts.append(f"s{self.seed}")
        return "__".join(parts)

    def spec(self) -> dict[str, Any]:
        """Everything that defines the run's result (no ``index``, no ``threads``, no
        ``train.tensorboard``: logging only)."""
        d = asdict(self)
        d.pop("index")
        d.pop("threads")
        d["train"].pop("tensorboard", None)
        for key, default in ADDED_TRAIN_DEFAULTS.items():  # fingerprints of older runs stay
            if key in d["train"] and d["train"][key] == default:
                d["train"].pop(key)
        if not d["extra_steps"]:
            d.pop("extra_steps")  # fingerprints of runs without extra steps stay as they were
        d["hidden"] = list(self.hidden)
        return d

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.spec(), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class SweepResult:
    """What :func:`run_sweep` did. ``records``: one per run of the *whole* grid."""

    out_dir: Path
    selected: int
    ran: int
    skipped: int
    failed: int
    diverged: int
    missing: int
    wall_time_s: float
    records: list[dict[str, Any]] = field(default_factory=list)


# --------------------------------------------------------------------------- grid


def expand(config: StudyConfig) -> list[Run]:
    """All runs of the grid, in order (dataset, budget, model, density, extra steps, seed)."""
    from .models import FAMILIES

    runs: list[Run] = []
    for ds in config.datasets:
        for hidden in ds.hidden:
            for family in ds.models:
                fam = FAMILIES[family]
                dens: Sequence[float | None]
                if fam.density == "none":
                    dens = [None]
                else:
                    dens = [d for d in ds.densities if fam.density == "any" or d < 1]
                extras = ds.extra_steps if fam.iterated else (0,)
                for d in dens:
                    for extra in extras:
                        for seed in ds.seeds:
                            runs.append(Run(index=len(runs), label=ds.label, dataset=ds.name,
                                            task=ds.task, options=dict(ds.options),
                                            data_seed=config.data_seed, family=family,
                                            hidden=tuple(hidden), density=d, seed=seed,
                                            activation=ds.activation, train=dict(ds.train),
                                            extra_steps=extra, threads=config.threads))
    return runs


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``1 <= i <= n``; :class:`~iternn.ConfigError` otherwise."""
    try:
        a, b = str(text).split("/")
        i, n = int(a), int(b)
    except ValueError:
        raise ConfigError(f"shard must be i/n (e.g. 2/4), got {text!r}") from None
    if not 1 <= i <= n:
        raise ConfigError(f"shard i/n needs 1 <= i <= n, got {text!r}")
    return i, n


def select_shard(runs: Sequence[Run], shard: tuple[int, int] | None) -> list[Run]:
    """Every ``n``-th run starting with the ``i``-th (1-based): ``runs[i-1::n]``."""
    if shard is None:
        return list(runs)
    i, n = shard
    if not 1 <= i <= n:
        raise ConfigError(f"shard i/n needs 1 <= i <= n, got {i}/{n}")
    return list(runs)[i - 1::n]


# --------------------------------------------------------------------------- data


@lru_cache(maxsize=8)
def _dataset(name: str, data_seed: int, options_json: str):
    from .data import load_dataset

    return load_dataset(name, seed=data_seed, **json.loads(options_json))


def dataset_for(run: Run):
    """The run's dataset (cached per process)."""
    return _dataset(run.dataset, run.data_seed, json.dumps(run.options, sort_keys=True))


def load_datasets(config: StudyConfig) -> dict[str, Any]:
    """Load every dataset of the config (label -> Dataset); a loading error becomes a
    :class:`ConfigError` naming ``datasets[i].options``."""
    out = {}
    for i, ds in enumerate(config.datasets):
        try:
            out[ds.label] = _dataset(ds.name, config.data_seed, json.dumps(ds.options, sort_keys=True))
        except (ValueError, TypeError, OSError) as e:
            raise ConfigError(f"datasets[{i}].options: {' '.join(str(e).split())}") from None
    return out


def check_grid(config: StudyConfig, datasets: dict[str, Any]) -> None:
    """Every (budget, model, density) of the grid can be built: a :class:`ConfigError`
    naming ``datasets[i].hidden[j]`` otherwise (e.g. a budget below the smallest dense
    six-block map)."""
    from .models import FAMILIES, check_feasible

    for i, ds in enumerate(config.datasets):
        data = datasets[ds.label]
        for j, hidden in enumerate(ds.hidden):
            for family in ds.models:
                fam = FAMILIES[family]
                dens = [None] if fam.density == "none" else \
                    [d for d in ds.densities if fam.density == "any" or d < 1]
                for d in dens:
                    try:
                        check_feasible(family, data, hidden=hidden, density=d)
                    except ValueError as e:
                        raise ConfigError(f"datasets[{i}].hidden[{j}] ({list(hidden)}): {e}") from None


# --------------------------------------------------------------------------- one run


def _atomic_json(path: Path, obj: Any) -> None:
    from .checkpoint import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False, default=str) + "\n")


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def base_record(run: Run) -> dict[str, Any]:
    """The record of a run before (or without) training: status ``"missing"``."""
    from .models import FAMILIES, budget

    rec: dict[str, Any] = {k: None for k in RECORD_FIELDS}
    rec.update(run_id=run.run_id, index=run.index, label=run.label, dataset=run.dataset,
               task=run.task, family=run.family, hidden=list(run.hidden), density=run.density,
               extra_steps=run.extra_steps, seed=run.seed, activation=run.activation, status="missing",
               fingerprint=run.fingerprint(), train=dict(run.train), metrics=[])

    try:
        data = dataset_for(run)
        if FAMILIES[run.family].matched:  # a published shape has no budget
            rec["budget"] = budget(data, run.hidden)
    except Exception:  # noqa: BLE001 - the run itself will report the error
        pass
    return rec


def run_options(run: Run) -> dict[str, Any]:
    """The run options a run stores and compares on resume (:mod:`iternn.study.resume`):
    its definition (:meth:`Run.spec`) but the training options, which the trainer
    compares itself."""
    spec = run.spec()
    spec.pop("train")
    return spec


def quarantine(run_dir: Path) -> Path:
    """Rename ``run_dir`` to ``<name>.broken-<UTC time>`` (``-2``, ``-3``, ... if taken);
    returns the new path."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = run_dir.with_name(f"{run_dir.name}.broken-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = run_dir.with_name(f"{run_dir.name}.broken-{stamp}-{n}")
    run_dir.rename(target)
    return target


def _unreadable_checkpoint(run_dir: Path) -> str | None:
    """Why ``run_dir``'s checkpoint cannot be read, or ``None`` (readable, or none)."""
    from .train import CHECKPOINT_NAME

    path = run_dir / CHECKPOINT_NAME
    if not path.is_file():
        return None
    try:
        load_checkpoint(path)
    except FormatError as e:
        return str(e)
    return None


def run_one(run: Run, study_dir: str | Path, *, log: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Train one run into ``study_dir/runs/<run_id>``; returns its record (never raises
    for a failure inside the run: the record says ``"failed"`` and why).

    The run resumes its checkpoint when it can (same definition; more epochs allowed),
    starts afresh over a checkpoint of another definition, and quarantines a folder whose
    checkpoint is unreadable (:func:`quarantine`; the record's ``quarantined`` names the
    new folder) before training again.
    """
    import torch

    from ..core.summary import count_trainable
    from .models import build_model, live_trainable
    from .train import train

    run_dir = Path(study_dir) / RUNS_DIR / run.run_id
    t0 = time.perf_counter()
    rec = base_record(run)
    old_threads = torch.get_num_threads()
    try:
        broken = _unreadable_checkpoint(run_dir)
        if broken is not None:
            moved = quarantine(run_dir)
            rec["quarantined"] = str(moved)
            if log is not None:
                log(f"{run.run_id}: {broken}; moved the run folder to {moved.name} and training "
                    "the run again")
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / ERROR_NAME).unlink(missing_ok=True)
        _atomic_json(run_dir / SPEC_NAME, {"fingerprint": run.fingerprint(), "run": run.spec()})
        torch.set_num_threads(run.threads)
        data = dataset_for(run)
        cfg = train_config(run.train, run.seed)

        def fit(resume: bool):
            model = build_model(run.family, data, hidden=run.hidden, density=run.density,
                                seed=run.seed, activation=run.activation, extra_steps=run.extra_steps)
            rec["trainable"] = count_trainable(model)
            rec["live"] = live_trainable(model)
            rec["steps"] = getattr(model, "steps", None)
            return train(model, data, cfg, out_dir=run_dir, resume=resume, progress=False, log=None,
                         tensorboard=bool(run.train.get("tensorboard", False)),
                         run_options=run_options(run))

        try:
            res = fit(resume=True)
        except ResumeError:  # a checkpoint of another definition (or version): start afresh
            res = fit(resume=False)
        best = None
        if res.best_epoch is not None:
            best = next((m for m in res.metrics if m.get("epoch") == res.best_epoch), None)
        rec.update(status=res.status, epochs_run=res.epochs_run, best_epoch=res.best_epoch,
                   best_val_loss=res.best_val_loss,
                   val_acc=None if best is None else best.get("val_acc"),
                   test_loss=res.test_loss, test_acc=res.test_acc,
                   metrics=[dict(m) for m in res.metrics], trainable=res.trainable,
                   diverged_at=res.diverged_at, wall_time_s=res.wall_time_s)
    except Exception as e:  # noqa: BLE001 - a failed run is a record, not a crash
        rec["status"] = "failed"
        rec["error"] = _one_line(e)
        try:
            (run_dir / ERROR_NAME).write_text(traceback.format_exc())
        except OSError:
            pass
    finally:
        torch.set_num_threads(old_threads)
    rec["run_time_s"] = time.perf_counter() - t0  # with data loading and model building
    if rec.get("wall_time_s") is None:
        rec["wall_time_s"] = rec["run_time_s"]
    rec = _clean(rec)
    run_dir.mkdir(parents=True, exist_ok=True)
    _atomic_json(run_dir / RESULT_NAME, rec)
    if log is not None:
        log(_run_line(rec))
    return rec


def _worker(run: Run, study_dir: str) -> dict[str, Any]:
    return run_one(run, study_dir)


def _run_line(rec: dict[str, Any]) -> str:
    parts = [f"{rec['run_id']}: {rec['status']}"]
    if rec.get("test_acc") is not None:
        parts.append(f"test_acc {rec['test_acc']:.4f}")
    elif rec.get("test_loss") is not None:
        parts.append(f"test_loss {rec['test_loss']:.4g}")
    if rec.get("error"):
        parts.append(rec["error"])
    if rec.get("quarantined"):
        parts.append(f"unreadable checkpoint: run folder moved to {Path(rec['quarantined']).name}")
    if rec.get("wall_time_s") is not None:
        parts.append(f"{rec['wall_time_s']:.1f}s")
    return ", ".join(parts)


def _read_record(run: Run, study_dir: Path) -> dict[str, Any] | None:
    p = study_dir / RUNS_DIR / run.run_id / RESULT_NAME
    try:
        rec = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or rec.get("fingerprint") != run.fingerprint():
        return None
    rec["index"] = run.index
    return rec


# --------------------------------------------------------------------------- sweep


def run_sweep(config: StudyConfig, out_dir: str | Path, *, jobs: int | None = None,
              shard: tuple[int, int] | None = None, retry_failed: bool = True,
              log: Callable[[str], Any] | None = None) -> SweepResult:
    """Run the (shard of the) grid into ``out_dir``; see the module docstring.

    ``jobs`` defaults to ``config.jobs``. Datasets are loaded (and validated) first, in this
    process; then the folder is locked and checked against the config
    (:func:`~iternn.study.folder.study_folder`: :class:`~iternn.FolderLockedError`,
    :class:`~iternn.ConfigError`), and the dataset summaries go to
    ``out_dir/datasets.json``. Returns a
    :class:`SweepResult` whose ``records`` cover the whole grid (``"missing"`` for runs of
    other shards not present on disk); ``results.json``/``results.csv`` are written.
    """
    t0 = time.perf_counter()
    emit = log or (lambda line: None)
    jobs = config.jobs if jobs is None else jobs
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"jobs must be an int >= 1, got {jobs!r}")
    datasets = load_datasets(config)
    check_grid(config, datasets)
    runs = expand(config)
    selected = select_shard(runs, shard)
    with study_folder(config, out_dir, grid={r.run_id: r.fingerprint() for r in runs}) as out:
        _atomic_json(out / DATASETS_JSON, _clean({lab: d.summary() for lab, d in datasets.items()}))
        return _sweep(config, out, runs, selected, jobs=jobs, shard=shard,
                      retry_failed=retry_failed, emit=emit, t0=t0)


def _sweep(config: StudyConfig, out: Path, runs: list[Run], selected: list[Run], *, jobs: int,
           shard: tuple[int, int] | None, retry_failed: bool, emit: Callable[[str], Any],
           t0: float) -> SweepResult:
    """The body of :func:`run_sweep`, inside the locked study folder."""
    todo: list[Run] = []
    skipped = 0
    for r in selected:
        rec = _read_record(r, out)
        if rec is not None and (rec.get("status") in DONE_STATUSES
                                or (rec.get("status") == "failed" and not retry_failed)):
            skipped += 1
        else:
            todo.append(r)
    if any(r.train.get("tensorboard") for r in todo):
        from .train import summary_writer_class

        summary_writer_class()  # TensorBoardMissingError before any run, not one per run
    where = f" (shard {shard[0]}/{shard[1]})" if shard else ""
    emit(f"{len(runs)} runs in the grid{where}: {len(selected)} selected, {skipped} already done, "
         f"{len(todo)} to run with {min(jobs, max(len(todo), 1))} process(es)")
    done = 0

    def note(rec: dict[str, Any]) -> None:
        nonlocal done
        done += 1
        emit(f"[{done}/{len(todo)}] " + _run_line(rec))

    if jobs == 1 or len(todo) <= 1:
        for r in todo:
            note(run_one(r, out))
    else:
        _run_parallel(todo, out, jobs, note)
    records = collect(config, out)
    write_results(records, out)
    by = {r["run_id"]: r for r in records}
    chosen = [by[r.run_id] for r in selected]
    return SweepResult(
        out_dir=out, selected=len(selected), ran=len(todo), skipped=skipped,
        failed=sum(r["status"] == "failed" for r in chosen),
        diverged=sum(r["status"] == "diverged" for r in chosen),
        missing=sum(r["status"] == "missing" for r in records),
        wall_time_s=time.perf_counter() - t0, records=records)


_SIGMASK = hasattr(signal, "pthread_sigmask")


def _ignore_sigint() -> None:
    """Worker initializer: Ctrl-C is the parent's to handle (see :func:`_pool`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if _SIGMASK:  # blocked while the worker started (see _submit_all); now ignored
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _submit_all(pool: ProcessPoolExecutor, runs: Sequence[Run], out: Path,
                worker: Callable[[Run, str], dict]) -> dict[Any, Run]:
    """Submit every run. The pool starts its workers here; SIGINT is blocked meanwhile,
    which they inherit, so a Ctrl-C while a worker still imports torch stays pending
    until its initializer ignores it (no traceback from the worker); the parent gets it
    when this returns."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if _SIGMASK else None
    try:
        return {pool.submit(worker, r, str(out)): r for r in runs}
    finally:
        if old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def _pool(workers: int, ctx: Any) -> Iterator[ProcessPoolExecutor]:
    """A process pool whose workers ignore Ctrl-C. Leaving it by an exception (Ctrl-C
    included) cancels the runs not started and terminates the workers, whose
    checkpoints are written atomically, so the process exits at once instead of waiting
    for every queued run (the next study resumes them)."""
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_ignore_sigint)
    try:
        yield pool
    except BaseException:
        procs = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.join(5)
        raise
    pool.shutdown(wait=True)


def _run_parallel(todo: list[Run], out: Path, jobs: int, note: Callable[[dict], None],
                  worker: Callable[[Run, str], dict] = _worker) -> None:
    ctx = multiprocessing.get_context("spawn")
    broken: list[Run] = []
    with _pool(min(jobs, len(todo)), ctx) as pool:
        futures = _submit_all(pool, todo, out, worker)
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in finished:
                r = futures[f]
                try:
                    note(f.result())
                except BrokenProcessPool:
                    broken.append(r)
                except Exception as e:  # noqa: BLE001 - e.g. a result that failed to pickle
                    note(_failed_record(r, out, _one_line(e)))
    for r in sorted(broken, key=lambda r: r.index):  # retry each alone, once
        try:
            with _pool(1, ctx) as pool:
                (future,) = _submit_all(pool, [r], out, worker)
                note(future.result())
        except BrokenProcessPool:
            note(_failed_record(r, out, "worker process died (killed or out of memory)"))
        except Exception as e:  # noqa: BLE001
            note(_failed_record(r, out, _one_line(e)))


def _failed_record(run: Run, out: Path, error: str) -> dict[str, Any]:
    rec = base_record(run)
    rec.update(status="failed", error=error)
    run_dir = out / RUNS_DIR / run.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    _atomic_json(run_dir / RESULT_NAME, _clean(rec))
    return rec


# --------------------------------------------------------------------------- results


def collect(config: StudyConfig, out_dir: str | Path) -> list[dict[str, Any]]:
    """One record per run of the whole grid, in grid order (``"missing"`` if none on disk)."""
    out = Path(out_dir)
    records = []
    for r in expand(config):
        rec = _read_record(r, out)
        records.append(rec if rec is not None else base_record(r))
    return records


def _csv_cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, list):
        return "-".join(map(str, v))
    if isinstance(v, float):
        return repr(v)
    return v


def write_results(records: list[dict[str, Any]], out_dir: str | Path) -> tuple[Path, Path]:
    """``results.json`` (full records) and ``results.csv`` (:data:`RECORD_FIELDS`)."""
    import csv
    import io

    from .checkpoint import atomic_write_text

    out = Path(out_dir)
    pj, pc = out / RESULTS_JSON, out / RESULTS_CSV
    _atomic_json(pj, _clean(records))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(RECORD_FIELDS)
    for rec in records:
        w.writerow([_csv_cell(rec.get(k)) for k in RECORD_FIELDS])
    atomic_write_text(pc, buf.getvalue())
    return pj, pc
