"""Optional TensorBoard logging of the trainer: the events hold the metrics.csv values per
epoch, a resumed run shows every epoch once, the writer is closed on an exception, and a
missing ``tensorboard`` package is a clear error before anything is trained (trainer,
``iternn train --tensorboard`` and a study with ``tensorboard = true``)."""

from __future__ import annotations

import csv
import io
import math
import sys
import time

import pytest
import torch
from train_worker import build_small

import iternn.study.train as train_mod
from iternn.cli import main as cli_main
from iternn.study.config import loads
from iternn.study.sweep import RUNS_DIR, expand, run_sweep
from iternn.study.train import (
    CHECKPOINT_NAME,
    METRICS_CSV,
    TENSORBOARD_DIR,
    TENSORBOARD_TAGS,
    TensorBoardMissingError,
    train,
)

MESSAGE = "TensorBoard logging needs the 'tensorboard' package: pip install 'iternn[tensorboard]'"

_STUDY_TOML = """
name = "tb"
seeds = [0]
[train]
epochs = 2
tensorboard = true
[[datasets]]
name = "digits"
models = ["mlp"]
hidden = [8]
"""


class _Stop(Exception):
    pass


def _no_tensorboard(monkeypatch) -> None:
    """Make ``import tensorboard`` (and torch's wrapper of it) fail, as if not installed."""
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)


def _scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _f32(v: float) -> float:
    """What TensorBoard stores for a float (a float32)."""
    return float(torch.tensor(v, dtype=torch.float32))


def _check_against_csv(events: dict, run_dir, lr0: float, epochs: int) -> None:
    rows = list(csv.DictReader(io.StringIO((run_dir / METRICS_CSV).read_text())))
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))
    assert set(events) == set(TENSORBOARD_TAGS.values())
    for field, tag in TENSORBOARD_TAGS.items():
        assert [step for step, _ in events[tag]] == list(range(1, epochs + 1)), tag  # each epoch once
        if field == "lr":  # cosine annealing to 0 over the epochs, stepped once per epoch
            want = [lr0 * (1 + math.cos(math.pi * (e - 1) / epochs)) / 2 for e in range(1, epochs + 1)]
            assert [v for _, v in events[tag]] == pytest.approx(want, rel=1e-6, abs=1e-9)
        else:
            assert [v for _, v in events[tag]] == [_f32(float(r[field])) for r in rows], tag


def test_events_hold_the_csv_values_of_every_epoch(tmp_path):
    pytest.importorskip("tensorboard")
    model, data, config = build_small()
    result = train(model, data, config, out_dir=tmp_path, progress=False, tensorboard=True)
    assert result.epochs_run == config.epochs == 6 and config.lr_schedule == "cosine"
    _check_against_csv(_scalars(tmp_path / TENSORBOARD_DIR), tmp_path, config.lr, config.epochs)
    # a fresh run in the same folder replaces the old events instead of adding to them
    train(build_small()[0], data, config, out_dir=tmp_path, progress=False, tensorboard=True)
    assert len(list((tmp_path / TENSORBOARD_DIR).iterdir())) == 1
    _check_against_csv(_scalars(tmp_path / TENSORBOARD_DIR), tmp_path, config.lr, config.epochs)
    # ... and a fresh run without TensorBoard removes them with the other files
    train(build_small()[0], data, config, out_dir=tmp_path, progress=False)
    assert not (tmp_path / TENSORBOARD_DIR).exists()


def test_resume_writes_each_epoch_once_and_the_writer_closes_on_an_exception(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    model, data, config = build_small()
    closed = []
    real_writer = train_mod.summary_writer_class()

    class Recording(real_writer):
        def close(self):
            closed.append(self.log_dir)
            super().close()

    monkeypatch.setattr(train_mod, "summary_writer_class", lambda: Recording)
    real_save = train_mod.save_checkpoint

    def save_fails_at_epoch_3(path, payload):
        if payload["epoch"] == 3 and not payload["finished"]:
            raise _Stop  # epoch 3's events are written, its checkpoint is not
        real_save(path, payload)

    monkeypatch.setattr(train_mod, "save_checkpoint", save_fails_at_epoch_3)
    with pytest.raises(_Stop):
        train(model, data, config, out_dir=tmp_path, progress=False, tensorboard=True)
    assert closed == [str(tmp_path / TENSORBOARD_DIR)]
    assert [s for s, _ in _scalars(tmp_path / TENSORBOARD_DIR)["loss/val"]] == [1, 2, 3]
    assert train_mod.load_checkpoint(tmp_path / CHECKPOINT_NAME)["epoch"] == 2
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    # events files sort by their creation second: start the resumed one in a later second
    time.sleep(1.05 - time.time() % 1)
    resumed = train(build_small(init_seed=99)[0], data, config, out_dir=tmp_path, resume=True,
                    progress=False, tensorboard=True)
    assert resumed.resumed_from == 2 and resumed.epochs_run == config.epochs
    assert len(closed) == 2 and len(list((tmp_path / TENSORBOARD_DIR).iterdir())) == 2
    # epoch 3 of the failed session is superseded (not shown twice); values = metrics.csv
    _check_against_csv(_scalars(tmp_path / TENSORBOARD_DIR), tmp_path, config.lr, config.epochs)


def test_a_study_writes_events_per_run_and_the_switch_reuses_finished_runs(tmp_path):
    pytest.importorskip("tensorboard")
    config = loads(_STUDY_TOML)
    sweep = run_sweep(config, tmp_path)
    assert sweep.ran == 1 and sweep.failed == 0
    run_dir = tmp_path / RUNS_DIR / expand(config)[0].run_id
    events = _scalars(run_dir / TENSORBOARD_DIR)
    assert [s for s, _ in events["loss/train"]] == [1, 2]
    off = loads(_STUDY_TOML.replace("tensorboard = true", "tensorboard = false"))
    assert run_sweep(off, tmp_path).skipped == 1  # logging is not part of a run's definition


def test_missing_package_is_a_clear_error_before_training(tmp_path, monkeypatch, capsys):
    model, data, config = build_small()
    train(model, data, config, out_dir=tmp_path, progress=False)  # a finished run's files
    before = sorted(p.name for p in tmp_path.iterdir())
    _no_tensorboard(monkeypatch)
    with pytest.raises(TensorBoardMissingError) as exc:
        train(build_small()[0], data, config, out_dir=tmp_path, progress=False, tensorboard=True)
    assert str(exc.value) == MESSAGE and isinstance(exc.value, ImportError)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing deleted or written
    # the command line: its one-line error, exit 1, before any data is loaded
    out = tmp_path / "cli"
    code = cli_main(["train", "--dataset", "digits", "--model", "mlp", "--epochs", "1", "--out", str(out),
                     "--tensorboard", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err == [f"iternn: error: {MESSAGE}"] and not out.exists()
    # a study that asks for it stops before its first run
    with pytest.raises(TensorBoardMissingError, match="pip install 'iternn\\[tensorboard\\]'"):
        run_sweep(loads(_STUDY_TOML), tmp_path / "study")
    assert not (tmp_path / "study" / RUNS_DIR).exists()
    # without the option nothing needs the package
    assert train(build_small()[0], data, config, progress=False).epochs_run == config.epochs


def test_tensorboard_option_is_checked(tmp_path):
    model, data, config = build_small()
    with pytest.raises(ValueError, match="tensorboard=True needs out_dir"):
        train(model, data, config, progress=False, tensorboard=True)
    with pytest.raises(TypeError, match="tensorboard must be True or False, got 'yes'"):
        train(model, data, config, out_dir=tmp_path, progress=False, tensorboard="yes")
