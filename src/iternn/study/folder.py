"""A study folder holds the runs of one config, and one writer at a time.

:func:`study_folder` is what a sweep (and the report after it) runs inside:

* it locks the folder (:class:`~iternn.study.lock.FolderLock`, file ``iternn.lock``): a
  second study on the same folder is a :class:`~iternn.FolderLockedError` naming the
  folder and the holder's pid, raised before anything is read or written;
* it records the config in ``study.json`` the first time, and refuses
  (:class:`~iternn.ConfigError`, naming the keys that differ) a later study whose config
  differs in anything but ``jobs``, ``threads`` and the training option ``tensorboard``
  (how it runs, not what) and the training options ``epochs`` and ``patience``
  (top-level or of a dataset): its runs would
  replace the recorded config's runs of the same name, and the folder's ``results.*`` and
  report would stop describing them. Under new ``epochs`` or ``patience`` the runs
  continue from their checkpoints instead (:mod:`iternn.study.resume`; with the cosine
  schedule, whose rates depend on ``epochs``, they train again), and the record is
  updated. A folder written before ``study.json`` existed is adopted unless it holds a
  run record of a run outside the new grid.

Shards of one config share the folder (same config); copying their ``runs/`` folders
into one folder and running the study there once more merges them.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .checkpoint import atomic_write_text
from .config import StudyConfig
from .lock import FolderLock

__all__ = ["STUDY_JSON", "study_folder", "config_differences"]

#: The config a study folder belongs to.
STUDY_JSON = "study.json"
_FORMAT = "iternn.study/1"
_HOW = ("jobs", "threads")  # how the study runs, not what it computes
# runs continue under a change of these (or do not depend on them: tensorboard)
_FREE = ("train.epochs", "train.patience", "train.tensorboard")
_RUNS_DIR = "runs"
_RESULT_NAME = "result.json"


def _free(difference: str) -> bool:
    key = difference.split(":", 1)[0]
    return any(key == k or key.endswith("." + k) for k in _FREE)


def _what(config: StudyConfig) -> dict[str, Any]:
    d = config.to_dict()
    for key in _HOW:
        d.pop(key, None)
    return json.loads(json.dumps(d, sort_keys=True))


def _flatten(obj: Any, path: str, out: dict[str, Any]) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{path}.{k}" if path else str(k), out)
    elif isinstance(obj, list) and obj and all(isinstance(v, dict) for v in obj):
        for i, v in enumerate(obj):
            _flatten(v, f"{path}[{i}]", out)
    else:
        out[path] = obj


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``"key: recorded X, new Y"`` for every key (a dotted path) that differs."""
    a: dict[str, Any] = {}
    b: dict[str, Any] = {}
    _flatten(old, "", a)
    _flatten(new, "", b)
    keys = sorted(set(a) | set(b))
    return [f"{k}: recorded {a.get(k)!r}, new {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def _foreign_runs(grid: Mapping[str, str], out: Path) -> list[str]:
    """Run folders of ``out`` whose record belongs to no run of ``grid`` (run id ->
    fingerprint)."""
    foreign = []
    runs = out / _RUNS_DIR
    if not runs.is_dir():
        return []
    for d in sorted(runs.iterdir()):
        if ".broken-" in d.name:  # a quarantined run folder: kept aside, not a run
            continue
        try:
            rec = json.loads((d / _RESULT_NAME).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and grid.get(d.name) != rec.get("fingerprint"):
            foreign.append(d.name)
    return foreign


def _claim(config: StudyConfig, out: Path, grid: Mapping[str, str]) -> None:
    path = out / STUDY_JSON
    new = _what(config)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        record = None
    except (OSError, ValueError) as e:
        raise ConfigError(f"study folder {out}: {path} is unreadable ({e}); delete it if the "
                          "folder holds this config's runs") from None
    if record is not None:
        old = record.get("config") if isinstance(record, dict) else None
        if not isinstance(old, dict) or record.get("format") != _FORMAT:
            raise ConfigError(f"study folder {out}: {path} is not a study record of this version")
        diffs = [d for d in config_differences(old, new) if not _free(d)]
        if not diffs:
            if old != new:  # epochs, patience or the logging switch: the runs continue
                _record(path, new)
            return
        raise ConfigError(
            f"study folder {out} holds the runs of another config ({len(diffs)} difference(s): "
            f"{'; '.join(diffs[:8])}{'; ...' if len(diffs) > 8 else ''}); use another --out, "
            "or delete the folder to start over")
    foreign = _foreign_runs(grid, out)
    if foreign:
        raise ConfigError(
            f"study folder {out} holds {len(foreign)} run(s) of another config (e.g. "
            f"{foreign[0]}); use another --out, or delete the folder to start over")
    _record(path, new)


def _record(path: Path, config: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps({"format": _FORMAT, "config": config}, indent=2,
                                       sort_keys=True) + "\n")


@contextlib.contextmanager
def study_folder(config: StudyConfig, out_dir: str | Path, *,
                 grid: Mapping[str, str]) -> Iterator[Path]:
    """Lock ``out_dir`` (created) and check it belongs to ``config``, whose runs are
    ``grid`` (run id -> fingerprint); yields its path."""
    out = Path(out_dir)
    with FolderLock(out, what="study folder"):
        _claim(config, out, grid)
        yield out
