"""The study trainer: config validation, determinism, early stopping, divergence, metric
files, checkpoints and exact resume (in process and after SIGKILL), progress output."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from torch import nn
from train_worker import _mlp, _toy, build_small

from iternn.errors import FolderLockedError, FormatError, ResumeError
from iternn.study.checkpoint import (
    atomic_write_text,
    load_checkpoint,
    save_checkpoint,
)
from iternn.study.train import (
    CHECKPOINT_NAME,
    METRIC_FIELDS,
    METRICS_CSV,
    METRICS_JSON,
    TrainConfig,
    TrainResult,
    evaluate,
    train,
)

WORKER = Path(__file__).with_name("train_worker.py")


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _same_params(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def _strip_time(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "time_s"} for row in metrics]


def _toy_data(**kw):
    return _toy(kw.pop("n_train", 120), 40, 40, kw.pop("features", 6), kw.pop("classes", 3),
                seed=kw.pop("seed", 1), **kw)


def _regression_data(n=96, features=4, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(features, 2, generator=g)

    def split(m):
        x = torch.randn(m, features, generator=g)
        return x, scale * (x @ w)

    (xt, yt), (xv, yv), (xs, ys) = split(n), split(32), split(32)
    return types.SimpleNamespace(name="reg", task="regression", n_classes=0, x_train=xt,
                                 y_train=yt, x_val=xv, y_val=yv, x_test=xs, y_test=ys)


class _Stop(Exception):
    pass


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "key, value",
    [("optimizer", "rmsprop"), ("lr", 0.0), ("lr", float("nan")), ("lr", True),
     ("weight_decay", -1.0), ("momentum", 1.0), ("epochs", 0), ("epochs", 2.0),
     ("batch_size", 0), ("patience", 0), ("seed", -1), ("loss_on", "first"),
     ("max_grad_norm", 0.0), ("lr_schedule", "step"), ("device", "gpu7")],
)
def test_config_rejects_bad_values_naming_the_key(key, value):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{key} "):
        TrainConfig(**{key: value})


def test_config_dict_round_trip_and_unknown_key():
    cfg = TrainConfig(optimizer="sgd", lr=1, momentum=0.9, patience=3, max_grad_norm=2)
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert TrainConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="unknown TrainConfig key 'learning_rate'"):
        TrainConfig.from_dict({"learning_rate": 0.1})


def test_bad_data_is_a_clear_error():
    model = _mlp(6, 4, 3, seed=0)
    data = _toy_data()
    data.task = "ranking"
    with pytest.raises(ValueError, match="data.task"):
        train(model, data, TrainConfig(epochs=1), progress=False)
    data = _toy_data()
    data.y_val = data.y_val[:-1]
    with pytest.raises(ValueError, match="x_val has 40 samples but data.y_val has 39"):
        train(model, data, TrainConfig(epochs=1), progress=False)
    data = _toy_data()
    data.y_train = data.y_train.float()
    with pytest.raises(ValueError, match="integer class labels"):
        train(model, data, TrainConfig(epochs=1), progress=False)
    with pytest.raises(TypeError, match="no attribute 'x_train'"):
        train(model, object(), TrainConfig(epochs=1), progress=False)
    with pytest.raises(ValueError, match="resume=True needs out_dir"):
        train(model, _toy_data(), TrainConfig(epochs=1), resume=True, progress=False)


# ----------------------------------------------------------------------------- training


def test_learns_and_reports_everything():
    data = _toy_data(n_train=200)
    model = _mlp(6, 16, 3, seed=0)
    result = train(model, data, TrainConfig(lr=0.02, epochs=8, batch_size=16), progress=False)
    assert isinstance(result, TrainResult)
    assert result.status == "ok" and result.epochs_run == 8 and len(result.metrics) == 8
    assert [r["epoch"] for r in result.metrics] == list(range(1, 9))
    assert all(set(r) == set(METRIC_FIELDS) for r in result.metrics)
    assert result.metrics[-1]["train_loss"] < result.metrics[0]["train_loss"]
    assert result.metrics[-1]["val_acc"] > 0.7
    best = min(result.metrics, key=lambda r: r["val_loss"])
    assert result.best_epoch == best["epoch"] and result.best_val_loss == best["val_loss"]
    assert result.trainable == sum(p.numel() for p in model.parameters())
    # the model holds the best weights and the test metrics are theirs
    assert evaluate(model, data.x_val, data.y_val, data.task)["loss"] == pytest.approx(
        result.best_val_loss, rel=1e-6)
    ev = evaluate(model, data.x_test, data.y_test, data.task)
    assert result.test == {"test_loss": pytest.approx(ev["loss"]), "test_acc": ev["acc"]}
    assert result.test_acc == result.test["test_acc"] and result.wall_time_s > 0
    assert json.loads(json.dumps(result.to_dict(), allow_nan=False))["status"] == "ok"


def test_same_seed_same_numbers_and_caller_rng_untouched():
    data = _toy_data()
    runs = []
    for _ in range(2):
        model = _mlp(6, 12, 3, seed=0, dropout=0.3)  # dropout: the global RNG is used
        torch.manual_seed(1234)
        before = torch.get_rng_state()
        result = train(model, data, TrainConfig(epochs=3, batch_size=16, seed=7), progress=False)
        assert torch.equal(torch.get_rng_state(), before)  # fork_rng: caller's state intact
        runs.append((model, result))
    (m1, r1), (m2, r2) = runs
    assert _same_params(m1, m2)
    assert _strip_time(r1.metrics) == _strip_time(r2.metrics) and r1.test == r2.test
    m3 = _mlp(6, 12, 3, seed=0, dropout=0.3)
    r3 = train(m3, data, TrainConfig(epochs=3, batch_size=16, seed=8), progress=False)
    assert _strip_time(r3.metrics) != _strip_time(r1.metrics)


def test_regression_and_float64_and_sgd():
    data = _regression_data()
    model = nn.Linear(4, 2).double()
    result = train(model, data, TrainConfig(optimizer="sgd", lr=0.05, momentum=0.9, epochs=15,
                                            batch_size=16, weight_decay=1e-4), progress=False)
    assert result.status == "ok"
    assert result.metrics[0]["val_acc"] is None and result.test["test_acc"] is None
    assert result.test["test_loss"] < 1e-2  # a linear target: nearly exact
    # targets of shape (N,) against a (N, 1) output
    data1 = _regression_data()
    data1.y_train, data1.y_val, data1.y_test = (y[:, 0] for y in
                                                (data1.y_train, data1.y_val, data1.y_test))
    r1 = train(nn.Linear(4, 1), data1, TrainConfig(lr=0.05, epochs=5, optimizer="adamw"),
               progress=False)
    assert r1.metrics[-1]["val_loss"] < r1.metrics[0]["val_loss"]


class _SeqModel(nn.Module):
    """(N, T, F) -> (N, n_classes) with a GRU; ``forward_all`` gives one output per step."""

    def __init__(self, features, hidden, classes):
        super().__init__()
        self.rnn = nn.GRU(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)
        self.calls_all = 0

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])

    def forward_all(self, x):
        self.calls_all += 1
        return list(self.head(self.rnn(x)[0]).unbind(1))


def _sequence_data(n=64, steps=5, features=3, seed=0):
    g = torch.Generator().manual_seed(seed)

    def split(m):
        x = torch.randn(m, steps, features, generator=g)
        return x, (x[:, :, 0].sum(1) > 0).long()

    (xt, yt), (xv, yv), (xs, ys) = split(n), split(32), split(32)
    return types.SimpleNamespace(name="seq", task="sequence", n_classes=2, x_train=xt,
                                 y_train=yt, x_val=xv, y_val=yv, x_test=xs, y_test=ys)


def test_sequence_task_and_loss_on_all():
    data = _sequence_data()
    torch.manual_seed(0)
    last = _SeqModel(3, 8, 2)
    torch.manual_seed(0)
    every = _SeqModel(3, 8, 2)
    r_last = train(last, data, TrainConfig(epochs=2, batch_size=16), progress=False)
    r_all = train(every, data, TrainConfig(epochs=2, batch_size=16, loss_on="all"),
                  progress=False)
    assert last.calls_all == 0 and every.calls_all == 2 * 4  # 2 epochs x 4 batches
    assert r_last.metrics[0]["train_loss"] != r_all.metrics[0]["train_loss"]
    # a model without forward_all falls back to its output, and says so once
    lines = []
    plain = _mlp(6, 8, 3, seed=0)
    ref = _mlp(6, 8, 3, seed=0)
    r1 = train(plain, _toy_data(), TrainConfig(epochs=2, loss_on="all"), progress=False,
               log=lines.append)
    r2 = train(ref, _toy_data(), TrainConfig(epochs=2), progress=False)
    assert sum("no forward_all" in line for line in lines) == 1
    assert _strip_time(r1.metrics) == _strip_time(r2.metrics) and _same_params(plain, ref)


def test_loss_on_all_for_a_map_module_uses_its_trajectory():
    from iternn.convert.mlp import from_mlp
    from iternn.study.train import _outputs_all

    net = _mlp(6, 8, 3, seed=0)
    mm = from_mlp(nn.Sequential(net[0], net[1], net[2]))
    x = torch.randn(5, 6)
    outs = _outputs_all(mm, x)
    assert len(outs) == mm.steps == 2
    torch.testing.assert_close(outs[-1], mm(x))
    data = _toy_data()
    r_all = train(mm, data, TrainConfig(epochs=2, loss_on="all"), progress=False)
    mm2 = from_mlp(nn.Sequential(*_mlp(6, 8, 3, seed=0)))
    r_last = train(mm2, data, TrainConfig(epochs=2), progress=False)
    assert r_all.status == r_last.status == "ok"
    assert r_all.metrics[0]["train_loss"] != r_last.metrics[0]["train_loss"]


def test_early_stopping_restores_the_best_weights():
    data = _toy_data(n_train=200)
    data.y_val = (data.y_val + 1) % 3  # what training learns makes validation worse
    model = _mlp(6, 16, 3, seed=0)
    result = train(model, data, TrainConfig(lr=0.03, epochs=30, batch_size=16, patience=2),
                   progress=False)
    assert result.status == "early_stopped"
    assert result.epochs_run == result.best_epoch + 2 < 30
    val_losses = [r["val_loss"] for r in result.metrics]
    assert result.best_val_loss == min(val_losses)
    assert all(v >= result.best_val_loss for v in val_losses[result.best_epoch:])
    assert evaluate(model, data.x_val, data.y_val, "classification")["loss"] == pytest.approx(
        result.best_val_loss, rel=1e-6)


def test_divergence_stops_the_run_without_an_exception(tmp_path):
    data = _regression_data(scale=1e3)
    model = nn.Linear(4, 2)
    lines = []
    result = train(model, data, TrainConfig(optimizer="sgd", lr=10.0, epochs=20,
                                            batch_size=16), out_dir=tmp_path, progress=False,
                   log=lines.append)
    assert result.status == "diverged"
    assert result.diverged_at is not None and result.diverged_at["epoch"] >= 1
    assert not math.isfinite(result.diverged_at["loss"])
    assert result.epochs_run == len(result.metrics) == result.diverged_at["epoch"] - (
        1 if result.diverged_at["batch"] is not None else 0)
    assert all(torch.isfinite(p).all() for p in model.parameters())  # best/initial restored
    assert any(line.startswith("diverged at epoch") for line in lines)
    saved = json.loads((tmp_path / METRICS_JSON).read_text())
    assert saved["status"] == "diverged" and saved["diverged_at"]["loss"] is None
    # a diverged run in a sweep: the next one runs normally
    ok = train(nn.Linear(4, 2), _regression_data(), TrainConfig(epochs=2), progress=False)
    assert ok.status == "ok"


def test_divergence_in_the_first_batch_keeps_the_initial_weights():
    data = _toy_data()
    data.x_train = data.x_train.clone()
    data.x_train[:] = float("nan")
    model = _mlp(6, 4, 3, seed=0)
    before = _params(model)
    result = train(model, data, TrainConfig(epochs=3), progress=False)
    assert result.status == "diverged" and result.epochs_run == 0
    assert result.diverged_at == {"epoch": 1, "batch": 1, "loss": pytest.approx(math.nan,
                                                                                nan_ok=True)}
    assert result.best_epoch is None and result.test is None
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ----------------------------------------------------------------------------- files, resume


def test_metric_files_and_checkpoint_contents(tmp_path):
    model, data, config = build_small()
    result = train(model, data, config, out_dir=tmp_path, progress=False)
    rows = list(csv.DictReader(io.StringIO((tmp_path / METRICS_CSV).read_text())))
    assert tuple(rows[0]) == METRIC_FIELDS and len(rows) == result.epochs_run == config.epochs
    for row, m in zip(rows, result.metrics):
        assert int(row["epoch"]) == m["epoch"]
        assert float(row["val_loss"]) == m["val_loss"]  # repr: exact round trip
    saved = json.loads((tmp_path / METRICS_JSON).read_text())
    assert saved == json.loads(json.dumps(result.to_dict()))
    ckpt = load_checkpoint(tmp_path / CHECKPOINT_NAME)  # weights_only=True
    assert ckpt["finished"] and ckpt["epoch"] == config.epochs
    # the best weights (those the model holds) and the last epoch's state to continue from
    assert all(torch.equal(ckpt["best_model"][k], v) for k, v in model.state_dict().items())
    assert ckpt["train_state"]["optimizer"]["state"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [  # no temp files, no lock left
        CHECKPOINT_NAME, METRICS_CSV, METRICS_JSON, "run.json"]


def test_metric_files_are_written_every_epoch(tmp_path):
    model, data, config = build_small()
    seen = []

    def log(line):
        if line.startswith("epoch "):
            rows = (tmp_path / METRICS_CSV).read_text().splitlines()
            snap = json.loads((tmp_path / METRICS_JSON).read_text())
            ckpt = load_checkpoint(tmp_path / CHECKPOINT_NAME)
            seen.append((len(rows) - 1, snap["status"], snap["epochs_run"], ckpt["epoch"]))

    rows = []
    result = train(model, data, config, out_dir=tmp_path, progress=False, log=log,
                   on_epoch=rows.append)
    assert seen == [(e, "running", e, e) for e in range(1, config.epochs + 1)]
    assert rows == result.metrics


def test_resume_in_process_is_exact(tmp_path):
    model, data, config = build_small()
    full = train(model, data, config, progress=False)

    def stop_after(epoch):
        def log(line):
            if line.startswith(f"epoch {epoch}/"):
                raise _Stop
        return log

    with pytest.raises(_Stop):
        train(build_small()[0], data, config, out_dir=tmp_path, progress=False,
              log=stop_after(2))
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["epoch"] == 2
    # the resumed model starts from other weights: they must come from the checkpoint
    resumed_model = build_small(init_seed=99)[0]
    lines = []
    resumed = train(resumed_model, data, config, out_dir=tmp_path, resume=True,
                    progress=False, log=lines.append)
    assert lines[0].startswith("resumed from") and resumed.resumed_from == 2
    assert _same_params(resumed_model, model)
    assert _strip_time(resumed.metrics) == _strip_time(full.metrics)
    assert resumed.test == full.test and resumed.status == full.status
    assert resumed.best_epoch == full.best_epoch
    # resuming a finished run returns its result and its weights without training
    again_model = build_small(init_seed=5)[0]
    again = train(again_model, data, config, out_dir=tmp_path, resume=True, progress=False)
    assert _same_params(again_model, model) and again.test == full.test
    assert _strip_time(again.metrics) == _strip_time(full.metrics)
    # another config cannot resume this checkpoint
    with pytest.raises(ResumeError, match=r"lr: stored 0.01, new 0.02"):
        train(build_small()[0], data, TrainConfig(**{**config.to_dict(), "lr": 0.02}),
              out_dir=tmp_path, resume=True, progress=False)


def test_resume_without_a_checkpoint_starts_fresh_and_fresh_runs_clear_old_files(tmp_path):
    model, data, config = build_small()
    lines = []
    r = train(model, data, config, out_dir=tmp_path, resume=True, progress=False,
              log=lines.append)
    assert lines[0].startswith("no checkpoint") and r.resumed_from is None

    class Broken(nn.Module):  # fails in its first forward, before any epoch ends
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 3)

        def forward(self, x):
            raise _Stop

    with pytest.raises(_Stop):
        train(Broken(), data, config, out_dir=tmp_path, progress=False)
    # the fresh run deleted the finished run's files first: a later resume starts over
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]
    lines = []
    train(build_small()[0], data, config, out_dir=tmp_path, resume=True, progress=False,
          log=lines.append)
    assert lines[0].startswith("no checkpoint")


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(WORKER.parent), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.Popen([sys.executable, str(WORKER), str(out), "--sleep", "0.5"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 60
        ckpt = None
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / CHECKPOINT_NAME).exists():
                ckpt = load_checkpoint(out / CHECKPOINT_NAME)  # atomic: never torn
                if ckpt["epoch"] >= 1:
                    break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()
        # the run folder is locked while the worker trains: a second writer is refused
        with pytest.raises(FolderLockedError, match=f"run folder {out} is in use by another "
                           rf"iternn process \(pid {proc.pid}\)"):
            train(build_small()[0], build_small()[1], build_small()[2], out_dir=out,
                  resume=True, progress=False)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    killed_at = load_checkpoint(out / CHECKPOINT_NAME)
    _, data, config = build_small()
    assert 1 <= killed_at["epoch"] < config.epochs and not killed_at["finished"]

    resumed_model = build_small(init_seed=42)[0]
    resumed = train(resumed_model, data, config, out_dir=out, resume=True, progress=False)
    model = build_small()[0]
    full = train(model, data, config, progress=False)
    assert resumed.resumed_from == killed_at["epoch"]
    assert _same_params(resumed_model, model)
    assert _strip_time(resumed.metrics) == _strip_time(full.metrics)
    assert resumed.test == full.test and resumed.status == full.status == "ok"
    assert len((out / METRICS_CSV).read_text().splitlines()) == config.epochs + 1
    assert not (out / "iternn.lock").exists()  # the killed holder's lock went with it


def _small64(init_seed=0, *, epochs=2, schedule="constant", patience=None):
    """A float64 MLP with dropout (the global RNG matters) and its data and config."""
    data = _toy(96, 40, 40, 5, 3, seed=4, dtype=torch.float64)
    model = _mlp(5, 8, 3, seed=init_seed, dropout=0.2, dtype=torch.float64)
    config = TrainConfig(optimizer="adam", lr=0.02, epochs=epochs, batch_size=16, seed=7,
                         lr_schedule=schedule, patience=patience)
    return model, data, config


_OPTIONS = {"dataset": "toy", "model": "mlp", "hidden": [8], "activation": "tanh",
            "data_seed": 0, "epochs": 2, "lr": 0.02}


def test_resume_refuses_changed_options_naming_each(tmp_path):
    model, data, config = _small64()
    train(model, data, config, out_dir=tmp_path, progress=False, run_options=_OPTIONS)
    stored = json.loads((tmp_path / "run.json").read_text())
    assert stored["options"]["activation"] == "tanh" and stored["train"]["lr"] == 0.02

    def resume(config=config, **changes):
        return train(_small64()[0], data, config, out_dir=tmp_path, resume=True, progress=False,
                     run_options={**_OPTIONS, **changes})

    # another activation builds another model; another data seed another split, whose test
    # set may overlap what was trained on: both refused, both named with their values
    with pytest.raises(ResumeError, match="2 option") as exc:
        resume(activation="relu", data_seed=1)
    assert "activation: stored 'tanh', new 'relu'" in str(exc.value)
    assert "data_seed: stored 0, new 1" in str(exc.value)
    with pytest.raises(ResumeError, match="lr: stored 0.02, new 0.03"):
        resume(TrainConfig(**{**config.to_dict(), "lr": 0.03}))
    with pytest.raises(ResumeError, match=r"epochs: stored 2, new 1 \(the run has trained 2 epochs\)"):
        resume(TrainConfig(**{**config.to_dict(), "epochs": 1}))
    # device and the epochs' count in the run options (compared via the config) are free
    assert resume(TrainConfig(**{**config.to_dict(), "device": "cpu:0"}), epochs=5).epochs_run == 2
    # a folder of an older version (no stored options): a clear refusal, not a crash
    (tmp_path / "run.json").unlink()
    with pytest.raises(ResumeError, match="no stored run options"):
        resume()


def test_cosine_schedule_refuses_more_epochs_and_patience_is_replayed(tmp_path):
    from iternn.study.resume import resume_differences, stop_epoch

    model, data, config = _small64(schedule="cosine")
    train(model, data, config, out_dir=tmp_path, progress=False)
    with pytest.raises(ResumeError, match="cosine schedule spans the epochs"):
        train(_small64()[0], data, TrainConfig(**{**config.to_dict(), "epochs": 3}),
              out_dir=tmp_path, resume=True, progress=False)
    # patience only decides when to stop: a new value is allowed unless it would have
    # stopped the run before the checkpoint's epoch
    metrics = [{"epoch": e, "val_loss": v} for e, v in enumerate([1.0, 0.9, 0.95, 0.97, 0.8], 1)]
    assert stop_epoch(metrics, 2) == 4 and stop_epoch(metrics, 3) is None
    stored = {"options": {}, "train": {"patience": None, "epochs": 9}}
    new = {"patience": 2, "epochs": 9}
    assert resume_differences(stored, {}, new, epochs_done=3, metrics=metrics[:3]) == []
    diff = resume_differences(stored, {}, new, epochs_done=5, metrics=metrics)
    assert diff == ["patience: stored None, new 2 (with it the run would have stopped after "
                    "epoch 4, before the checkpoint's epoch 5)"]


def test_more_epochs_continue_a_finished_run_exactly(tmp_path):
    model, data, config = _small64(epochs=2)
    train(model, data, config, out_dir=tmp_path, progress=False, run_options=_OPTIONS)
    longer = TrainConfig(**{**config.to_dict(), "epochs": 4})
    resumed_model = _small64(init_seed=9)[0]
    resumed = train(resumed_model, data, longer, out_dir=tmp_path, resume=True, progress=False,
                    run_options={**_OPTIONS, "epochs": 4})
    full_model = _small64()[0]
    full = train(full_model, data, longer, progress=False)
    assert resumed.resumed_from == 2 and resumed.epochs_run == 4
    assert _same_params(resumed_model, full_model)  # float64, bit for bit
    assert _strip_time(resumed.metrics) == _strip_time(full.metrics)
    assert resumed.test == full.test and resumed.best_epoch == full.best_epoch
    assert json.loads((tmp_path / "run.json").read_text())["train"]["epochs"] == 4


# ----------------------------------------------------------------------------- progress


class _TTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_only_on_a_tty_and_log_lines(monkeypatch, capsys):
    model, data, config = build_small()
    lines = []
    train(model, data, config, progress=True, log=lines.append)  # pytest's stderr: no TTY
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert [line.split()[1] for line in lines if line.startswith("epoch ")] == [
        f"{e}/{config.epochs}" for e in range(1, config.epochs + 1)]
    assert lines[-1].startswith("done: status ok")
    assert train(build_small()[0], data, config, progress=True).status == "ok"  # log=None
    assert capsys.readouterr() == ("", "")

    fake = _TTY()
    monkeypatch.setattr(sys, "stderr", fake)
    train(build_small()[0], data, config, progress=True)
    assert f"{config.epochs}/{config.epochs}" in fake.getvalue() and "epoch" in fake.getvalue()
    fake2 = _TTY()
    monkeypatch.setattr(sys, "stderr", fake2)
    train(build_small()[0], data, config, progress=False)
    assert fake2.getvalue() == ""


# ----------------------------------------------------------------------------- checkpoint io


def test_checkpoint_round_trip_and_validation(tmp_path):
    state = {"a": torch.arange(3), "b": [1, 2.5, None, "x", (True, {"c": torch.ones(2)})],
             3: {"nested": torch.zeros(1)}}
    path = save_checkpoint(tmp_path / "sub" / "c.pt", state)
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["a"], state["a"]) and loaded["b"][:4] == [1, 2.5, None, "x"]
    assert torch.equal(loaded["b"][4][1]["c"], torch.ones(2)) and 3 in loaded
    with pytest.raises(TypeError, match=r"state\['m'\] is a Linear"):
        save_checkpoint(tmp_path / "bad.pt", {"m": nn.Linear(1, 1)})
    with pytest.raises(TypeError, match="key of type"):
        save_checkpoint(tmp_path / "bad.pt", {(1, 2): 0})
    assert not (tmp_path / "bad.pt").exists()
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(FormatError, match="junk.pt is unreadable"):
        load_checkpoint(tmp_path / "junk.pt")
    # a file of pickled objects: our message (which file, what is wrong, what to do), never
    # torch's advice to load with the safety switched off
    torch.save({"m": nn.Linear(1, 1)}, tmp_path / "pickled.pt")
    with pytest.raises(FormatError) as exc:
        load_checkpoint(tmp_path / "pickled.pt")
    text = str(exc.value)
    assert "pickled.pt is unreadable (it holds objects other than tensors" in text
    assert f"delete the run folder {tmp_path}" in text and "weights_only" not in text
    (tmp_path / "pickled.pt").unlink()
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")
    # a leftover temp file from a killed writer is reused, and the target replaced whole
    (tmp_path / ".t.txt.tmp").write_text("partial")
    atomic_write_text(tmp_path / "t.txt", "one")
    atomic_write_text(tmp_path / "t.txt", "two")
    assert (tmp_path / "t.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.pt", "sub", "t.txt"]
