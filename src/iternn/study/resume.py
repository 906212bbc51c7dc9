"""What a resumed run may change: the stored run options and their comparison.

A run folder holds ``run.json``, written atomically when the run starts (and rewritten
when a resume changes an option it may change): ``{"format", "options", "train"}``, where
``options`` are the caller's run options (for the command line: dataset, model, hidden,
density, extra steps, seeds, data path, activation, ...; for a study run: its definition)
and ``train`` the :class:`~iternn.study.train.TrainConfig` as a dict.

A resume compares the new options with the stored ones (:func:`resume_differences`) and
refuses (:class:`~iternn.ResumeError`, naming every differing option with its stored and
new value) any change it cannot honour:

* anything that defines the model, the data or its split (dataset, its options and data
  seed, family, widths, density, activation, init seed, ...) and every training option
  but those below: the optimizer, learning rate, batch size, clipping, loss and schedule
  shape the trajectory, and the optimizer's restored state carries them; the selection
  rule (``select``) decides which weights every later epoch is compared with, and a step
  budget (``steps``) may end an epoch part-way;
* ``epochs`` may grow (or shrink down to the epochs already trained): training
  continues from the last checkpoint, a finished run included, and ends where an
  uninterrupted run with the new number would, bit for bit on CPU. Not with
  ``lr_schedule="cosine"``, whose learning rates depend on ``epochs`` from the first
  epoch on, so a change is refused there;
* ``patience`` may change when the new value would not have stopped the run before the
  checkpoint's epoch (checked by replaying the stored validation scores of the run's
  ``select`` criterion): early stopping only decides when to stop, so the result is again
  that of an uninterrupted run with the new patience;
* ``device`` may change (the checkpoint is read onto the CPU and moved): same numbers up
  to the arithmetic of the devices.

A run folder with a checkpoint but no ``run.json`` (written by an older version of
iternn) cannot be checked, so it is a :class:`~iternn.ResumeError` too. A stored record
without a training option added since (``select``, ``steps``) holds its default.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import ResumeError
from .checkpoint import atomic_write_text

__all__ = ["RUN_JSON", "RESUME_FREE", "ADDED_DEFAULTS", "write_run_options",
           "read_run_options", "resume_differences", "stop_epoch"]

#: The stored run options inside a run folder.
RUN_JSON = "run.json"
#: Training options a resume may change (under the rules of the module docstring).
RESUME_FREE = ("device", "epochs", "patience")
#: Training options added after the first run records: a record without one holds this.
ADDED_DEFAULTS: dict[str, Any] = {"select": "val_loss", "steps": None}
_FORMAT = "iternn.run/1"


def _plain(obj: Any) -> Any:
    """JSON's view of ``obj`` (tuples become lists), so stored and new values compare."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def write_run_options(folder: Path, options: Mapping[str, Any] | None,
                      train: Mapping[str, Any]) -> None:
    """Write ``folder/run.json`` atomically."""
    record = {"format": _FORMAT, "options": _plain(dict(options or {})), "train": _plain(dict(train))}
    atomic_write_text(folder / RUN_JSON, json.dumps(record, indent=2, sort_keys=True) + "\n")


def read_run_options(folder: Path) -> dict[str, Any]:
    """The stored ``{"options", "train"}`` of ``folder``; :class:`~iternn.ResumeError` when
    there are none (an older version's folder) or they cannot be read."""
    path = folder / RUN_JSON
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise ResumeError(
            f"cannot resume {folder}: it has a checkpoint but no stored run options ({RUN_JSON}; "
            "written by an older version of iternn), so a changed option could not be told; "
            "delete the folder (or train without resume) to train the run again") from None
    except (OSError, ValueError) as e:
        raise ResumeError(f"cannot resume {folder}: {path} is unreadable ({e}); delete the folder "
                          "(or train without resume) to train the run again") from None
    if not (isinstance(record, dict) and record.get("format") == _FORMAT
            and isinstance(record.get("options"), dict) and isinstance(record.get("train"), dict)):
        raise ResumeError(f"cannot resume {folder}: {path} is not a run record of this version "
                          f"(expected format {_FORMAT!r}); delete the folder to train the run again")
    return record


def stop_epoch(metrics: Sequence[Mapping[str, Any]], patience: int | None, *,
               select: str = "val_loss") -> int | None:
    """The epoch after which early stopping with ``patience`` stops, replaying the
    validation scores of ``metrics`` under ``select`` (``"val_loss"``: lower is better,
    ``"val_acc"``: higher; ``None``: it would not stop within them)."""
    if patience is None:
        return None
    best, bad = math.inf, 0
    for row in metrics:
        v = row["val_loss"] if select == "val_loss" else row.get("val_acc")
        if v is not None and select == "val_acc":
            v = -v
        if v is not None and v < best:
            best, bad = v, 0
        else:
            bad += 1
        if bad >= patience:
            return int(row["epoch"])
    return None


def resume_differences(stored: Mapping[str, Any], options: Mapping[str, Any] | None,
                       train: Mapping[str, Any], *, epochs_done: int,
                       metrics: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every option a resume cannot honour, as ``"key: stored X, new Y (why)"``.

    ``stored`` is :func:`read_run_options`' record; ``options`` and ``train`` are the new
    run options and training options; ``epochs_done`` and ``metrics`` come from the
    checkpoint. Empty when the resume may go on.
    """
    out: list[str] = []
    new_opts, old_opts = _plain(dict(options or {})), stored["options"]
    new_train, old_train = _plain(dict(train)), stored["train"]
    for key in sorted(set(new_opts) | set(old_opts)):
        if key in new_train or key in old_train:
            continue  # a training option: compared below, under its own rule
        if new_opts.get(key) != old_opts.get(key):
            out.append(f"{key}: stored {old_opts.get(key)!r}, new {new_opts.get(key)!r}")
    for key in sorted(set(new_train) | set(old_train)):
        old, new = old_train.get(key, ADDED_DEFAULTS.get(key)), new_train.get(key)
        if old == new or key == "device":
            continue
        if key == "epochs":
            if new_train.get("lr_schedule") == "cosine":
                out.append(f"epochs: stored {old!r}, new {new!r} (the cosine schedule spans the "
                           "epochs, so every epoch's learning rate would change)")
            elif not isinstance(new, int) or new < epochs_done:
                out.append(f"epochs: stored {old!r}, new {new!r} (the run has trained "
                           f"{epochs_done} epochs)")
        elif key == "patience":
            stop = stop_epoch(metrics, new, select=new_train.get("select", "val_loss"))
            if stop is not None and stop < epochs_done:
                out.append(f"patience: stored {old!r}, new {new!r} (with it the run would have "
                           f"stopped after epoch {stop}, before the checkpoint's epoch {epochs_done})")
        else:
            out.append(f"{key}: stored {old!r}, new {new!r}")
    return out
