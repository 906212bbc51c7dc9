"""A whole study: the sweep, then the report, in one locked study folder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import StudyConfig
from .lock import FolderLock
from .report import write_report
from .sweep import SweepResult, run_sweep

__all__ = ["run_study"]


def run_study(config: StudyConfig, out_dir: str | Path, *, jobs: int | None = None,
              shard: tuple[int, int] | None = None, log: Callable[[str], Any] | None = None,
              pictures: bool = True) -> tuple[SweepResult, Path]:
    """:func:`~iternn.study.sweep.run_sweep` then
    :func:`~iternn.study.report.write_report`, both while holding the folder's lock
    (:class:`~iternn.study.lock.FolderLock`; the sweep checks the folder belongs to
    ``config``, :func:`~iternn.study.folder.study_folder`); returns the sweep's result and the path of
    ``report.md``.

    Raises:
        ConfigError: a bad config or option, or a folder that holds another config's runs.
        FolderLockedError: another process works in ``out_dir``.
    """
    out = Path(out_dir)
    with FolderLock(out, what="study folder"):  # run_sweep claims it for config (re-entrant)
        sweep = run_sweep(config, out, jobs=jobs, shard=shard, log=log)
        report = write_report(config, out, records=sweep.records, pictures=pictures, sweep=sweep)
    return sweep, report
