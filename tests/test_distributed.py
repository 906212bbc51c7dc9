"""Data-parallel training: 2 CPU processes under torchrun (gloo, loopback only) train the
same parameters as one process with the same global batch."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from train_worker import build_distributed

from iternn.cli import build_parser, distributed_parser
from iternn.study import distributed as distributed_module
from iternn.study.checkpoint import load_checkpoint
from iternn.study.data import DATASETS, load_dataset
from iternn.study.distributed import main, train_distributed
from iternn.study.resume import RUN_JSON
from iternn.study.train import CHECKPOINT_NAME, METRICS_JSON, TrainConfig, train

WORKER = Path(__file__).with_name("train_worker.py")
TORCHRUN = Path(sys.executable).with_name("torchrun")


def _strip_time(metrics):
    return [{k: v for k, v in row.items() if k != "time_s"} for row in metrics]


def _assert_close_metrics(a, b, tol):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        for key in ("epoch", "train_loss", "val_loss", "val_acc"):
            assert ra[key] == pytest.approx(rb[key], abs=tol, rel=tol), key


needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _launch_ranks(out: Path, store: Path, world: int = 2,
                  what: tuple[str, ...] = ("--build", f"{WORKER}:build_distributed"),
                  ) -> list[subprocess.Popen]:
    """Start ``world`` rank processes the way torchrun does (RANK/WORLD_SIZE/LOCAL_RANK in
    the environment), meeting through a file:// store: no port, no network. ``what``: the
    model and training flags."""
    procs = []
    for rank in range(world):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world)}
        cmd = [sys.executable, "-m", "iternn.study.distributed", *what, "--out", str(out),
               "--no-progress", "--init-method", f"file://{store}"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=env, cwd=out.parent))
    return procs


def _communicate(procs: list[subprocess.Popen], meanwhile):
    """``meanwhile()`` (in this process) while the ranks run, then every rank's
    ``(stdout, stderr)``; the ranks are killed if anything goes wrong."""
    try:
        value = meanwhile()
        outputs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-4000:]
    return value, outputs


def _check_against_single_process(out: Path, stdout: str, stderr: str, single) -> None:
    model, result_single = single
    # rank 0 alone prints the result and writes the files
    printed = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 1 and printed[0]["world_size"] == 2
    assert sorted(p.name for p in out.iterdir()) == sorted([CHECKPOINT_NAME, "metrics.csv",
                                                            METRICS_JSON, RUN_JSON])
    assert "epoch 3/3" in stderr
    ckpt = load_checkpoint(out / CHECKPOINT_NAME)
    assert ckpt["finished"] and ckpt["world_size"] == 2
    for name, p in model.state_dict().items():
        q = ckpt["best_model"][name]
        assert q.dtype == torch.float64
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6)
    result = ckpt["result"]
    _assert_close_metrics(result["metrics"], result_single.metrics, 1e-6)
    assert result["test"]["test_loss"] == pytest.approx(result_single.test["test_loss"],
                                                        abs=1e-6)
    assert result["test"]["test_acc"] == result_single.test["test_acc"]
    assert printed[0]["best_epoch"] == result_single.best_epoch == result["best_epoch"]


def _single_process():
    model, data, config = build_distributed()
    return model, train(model, data, config, progress=False)


@needs_gloo
def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    out = tmp_path / "run"
    single, outputs = _communicate(_launch_ranks(out, tmp_path / "store"), _single_process)
    assert outputs[1][0] == ""  # rank 1 prints nothing
    _check_against_single_process(out, outputs[0][0], outputs[0][1], single)


@needs_gloo
@pytest.mark.skipif(os.environ.get("ITERNN_TORCHRUN") != "1",
                    reason="torchrun adds ~15 s of start-up; set ITERNN_TORCHRUN=1 to run it")
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed next to python")
def test_under_torchrun(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(TORCHRUN), "--standalone", "--nnodes=1", "--nproc_per_node=2",
           "-m", "iternn.study.distributed", "--build", f"{WORKER}:build_distributed",
           "--out", str(out), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=tmp_path)
    try:
        single = _single_process()
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr[-4000:]
    _check_against_single_process(out, stdout, stderr, single)


def test_one_rank_process_group_is_bitwise_single_process(tmp_path):
    """The distributed code path (TorchComm, broadcast, gathered RNG states) in-process with
    a 1-rank gloo group over a file:// store; then resuming it with plain ``train``."""
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    model, data, config = build_distributed()
    r1 = train_distributed(model, data, config, out_dir=tmp_path / "d", progress=False,
                           backend="gloo", init_method=f"file://{tmp_path / 'store'}",
                           rank=0, world_size=1)
    assert not dist.is_initialized()  # destroyed again: it created it
    ref_model, _, _ = build_distributed()
    r2 = train(ref_model, data, config, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref_model.parameters()))
    assert _strip_time(r1.metrics) == _strip_time(r2.metrics) and r1.test == r2.test


def test_main_without_torchrun_trains_in_one_process(tmp_path, monkeypatch, capsys):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "run"
    code = main(["--build", f"{WORKER}:build_distributed", "--out", str(out), "--epochs", "2",
                 "--quiet", "--no-progress"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["epochs_run"] == 2 and printed["config"]["epochs"] == 2
    assert printed["world_size"] == 1
    saved = json.loads((out / METRICS_JSON).read_text())
    assert saved["status"] == "ok"
    # resuming the finished run is a no-op that prints the same numbers
    assert main(["--build", f"{WORKER}:build_distributed", "--out", str(out), "--epochs", "2",
                 "--resume", "--quiet"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert _strip_time(again["metrics"]) == _strip_time(printed["metrics"])


def test_main_usage_errors_exit_2(tmp_path, capsys):
    assert main(["--build", "no_colon_here"]) == 2
    assert "MODULE:FUNCTION" in capsys.readouterr().err
    assert main(["--build", f"{WORKER}:no_such_function"]) == 2
    assert "no callable 'no_such_function'" in capsys.readouterr().err
    assert main(["--build", "no_such_package_xyz:build"]) == 2
    assert "--build: no module 'no_such_package_xyz'" in capsys.readouterr().err
    # a value the parser lets through and TrainConfig refuses: named by its flag
    assert main(["--build", f"{WORKER}:build_distributed", "--momentum", "1.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("iternn: error: --momentum: ")
    assert main(["--build", f"{WORKER}:build_distributed", "--resume"]) == 2
    assert "--resume needs --out" in capsys.readouterr().err
    assert main(["--build", f"{WORKER}:build_distributed", "--device", "cuda:99"]) == 2
    assert "--device cuda:99: " in capsys.readouterr().err
    for argv in ([], ["--build", f"{WORKER}:build_distributed", "--lr", "-1"],
                 ["--dataset", "digits", "--device", "gpu"], ["--dataset", "digits", "--epochs", "0"]):
        with pytest.raises(SystemExit) as exc:  # argparse: neither --build nor --dataset, bad values
            main(argv)
        assert exc.value.code == 2, argv


def test_main_builds_an_mlp_for_a_named_dataset(tmp_path, monkeypatch, capsys):
    assert "regression" in DATASETS
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "run"
    code = main(["--dataset", "regression", "--hidden", "8", "--epochs", "1", "--quiet",
                 "--no-progress", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    printed = json.loads(capsys.readouterr().out)
    assert printed["status"] == "ok" and printed["test"]["test_acc"] is None
    # resuming it as another model is refused (ResumeError, exit 2), naming the option
    assert main(["--dataset", "regression", "--hidden", "16", "--epochs", "1", "--quiet",
                 "--out", str(out), "--resume"]) == 2
    assert "hidden" in capsys.readouterr().err
    # a run that diverges prints its result and exits 1 with one line saying so
    code = main(["--dataset", "regression", "--hidden", "8", "--epochs", "1", "--lr", "1e30",
                 "--quiet", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 1 and json.loads(captured.out)["status"] == "diverged"
    assert captured.err.startswith("iternn: error: training diverged at epoch 1")
    # widths no machine holds: refused before anything is allocated
    assert main(["--dataset", "regression", "--hidden", "100000000000", "--quiet"]) == 2
    assert "--hidden 100000000000 (" in capsys.readouterr().err


# --------------------------------------------------------------- the flags iternn train has

#: An MLP on digits trained with the selection and budget flags of ``iternn train``: 30 %
#: of the data for validation, the weights of the best validation accuracy, 40 optimizer
#: steps (15 batches an epoch: 3 epochs, the last stopping after 10).
_DIGITS = ("--dataset", "digits", "--hidden", "16", "--val-fraction", "0.3", "--select",
           "val_acc", "--steps", "40", "--batch-size", "64", "--lr", "0.01", "--seed", "3")


def _digits_reference():
    """What ``_DIGITS`` asks for, built by hand and trained in one process by ``train``:
    ``(trained model, result)``."""
    data = load_dataset("digits", seed=0, val_fraction=0.3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    config = TrainConfig(lr=0.01, steps=40, batch_size=64, seed=3, select="val_acc")
    return model, train(model, data, config, progress=False)


def _rank0_of_one(monkeypatch, tmp_path):
    """The environment of a 1-process torchrun job; the calls of ``train_distributed``
    (which the command must take) are recorded in the returned list."""
    for var, value in (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(var, value)
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs["world_size"])
        return train_distributed(*args, **kwargs)

    monkeypatch.setattr(distributed_module, "train_distributed", spy)
    return calls, ["--init-method", f"file://{tmp_path / 'store'}", "--quiet", "--no-progress"]


def test_selection_budget_and_val_fraction_flags_equal_train_in_one_process(
        tmp_path, monkeypatch, capsys):
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    calls, rank_flags = _rank0_of_one(monkeypatch, tmp_path)
    out = tmp_path / "run"
    assert main([*_DIGITS, *rank_flags, "--out", str(out)]) == 0
    assert calls == [1] and not dist.is_initialized()
    printed = json.loads(capsys.readouterr().out)
    ref_model, ref = _digits_reference()
    assert (printed["config"]["select"], printed["config"]["steps"],
            printed["config"]["epochs"]) == ("val_acc", 40, None)
    assert [row["epoch"] for row in printed["metrics"]] == [1, 2, 3]
    # bit for bit the run of train(): the same split, budget and selected weights
    assert _strip_time(printed["metrics"]) == _strip_time(ref.metrics)
    assert printed["test"] == ref.test and printed["best_epoch"] == ref.best_epoch
    accs = [row["val_acc"] for row in ref.metrics]
    assert ref.best_epoch == 1 + accs.index(max(accs))  # the earliest highest accuracy
    best = load_checkpoint(out / CHECKPOINT_NAME)["best_model"]
    assert all(torch.equal(best[k], v) for k, v in ref_model.state_dict().items())
    stored = json.loads((out / RUN_JSON).read_text())
    assert stored["options"]["val_fraction"] == 0.3  # a resume with another split is refused


def test_steps_and_select_override_the_build_config_in_one_process(tmp_path, monkeypatch,
                                                                   capsys):
    """``--steps`` replaces the epochs of the config ``--build`` returns; ``--patience 0``
    is off, as for ``iternn train``."""
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    calls, rank_flags = _rank0_of_one(monkeypatch, tmp_path)
    assert main(["--build", f"{WORKER}:build_distributed", "--steps", "5", "--select", "final",
                 "--patience", "0", *rank_flags]) == 0
    assert calls == [1]
    printed = json.loads(capsys.readouterr().out)
    model, data, _ = build_distributed()
    config = TrainConfig(optimizer="adam", lr=0.02, steps=5, batch_size=32, seed=5,
                         max_grad_norm=0.5, select="final")
    ref = train(model, data, config, progress=False)
    assert printed["config"] == config.to_dict()
    assert [row["epoch"] for row in printed["metrics"]] == [1, 2]  # 4 batches an epoch
    assert printed["best_epoch"] == 2  # final: the last epoch's weights, whatever val says
    assert _strip_time(printed["metrics"]) == _strip_time(ref.metrics)
    assert printed["test"] == ref.test


def test_flags_apply_together_not_one_at_a_time(tmp_path, monkeypatch, capsys):
    """On a config with ``select="final"``, ``--select val_loss --patience 2`` is valid as
    a whole (patience alone, or first, would be refused)."""
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    calls, rank_flags = _rank0_of_one(monkeypatch, tmp_path)
    assert main(["--build", f"{WORKER}:build_distributed_final", "--patience", "2", "--select",
                 "val_loss", "--steps", "2", *rank_flags]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["config"]["select"], printed["config"]["patience"]) == ("val_loss", 2)


@needs_gloo
def test_val_split_and_selection_under_two_processes_equal_one_process(tmp_path):
    """Every rank loads the same split; validation is sharded and summed, so the selection
    sees the numbers of one process."""
    out = tmp_path / "run"
    procs = _launch_ranks(out, tmp_path / "store", what=_DIGITS)
    (ref_model, ref), outputs = _communicate(procs, _digits_reference)
    printed = json.loads(outputs[0][0])
    assert printed["world_size"] == 2 and printed["config"]["select"] == "val_acc"
    _assert_close_metrics(printed["metrics"], ref.metrics, 1e-5)
    assert printed["best_epoch"] == ref.best_epoch
    assert printed["test"]["test_acc"] == ref.test["test_acc"]
    best = load_checkpoint(out / CHECKPOINT_NAME)["best_model"]
    for name, p in ref_model.state_dict().items():
        torch.testing.assert_close(best[name], p, rtol=1e-5, atol=1e-5)


_BUILD = ("--build", f"{WORKER}:build_distributed")


@pytest.mark.parametrize("argv, words", [
    ((*_BUILD, "--epochs", "2", "--steps", "3"),
     "argument --steps: not allowed with argument --epochs"),
    ((*_BUILD, "--select", "best"), "argument --select: invalid choice: 'best'"),
    (("--dataset", "digits", "--val-fraction", "1"), "argument --val-fraction: must be in [0, 1)"),
    ((*_BUILD, "--patience", "-1"), "argument --patience: must be at least 0"),
])
def test_bad_selection_flags_are_argparse_errors(argv, words, capsys):
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    assert exc.value.code == 2 and words in capsys.readouterr().err


@pytest.mark.parametrize("argv, words", [
    ((*_BUILD, "--val-fraction", "0.2"), "--val-fraction is for --dataset"),
    (("--dataset", "regression", "--val-fraction", "0.2"),
     "--val-fraction: dataset 'regression' has no validation fraction"),
    (("--dataset", "digits", "--val-fraction", "0"),
     "--val-fraction 0 leaves no validation split, which --select val_loss"),
    ((*_BUILD, "--select", "final", "--patience", "2"),
     "--patience, --select: TrainConfig.patience must be None with select='final'"),
    (("--dataset", "regression", "--select", "val_acc", "--epochs", "1"),
     "select='val_acc' needs an accuracy"),
])
def test_selection_flags_the_run_cannot_honour_exit_2_naming_them(argv, words, tmp_path,
                                                                  monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "run"
    assert main([*argv, "--quiet", "--no-progress", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("iternn: error: ") and words in err[0]
    assert not (out / CHECKPOINT_NAME).exists()


def _actions(parser: argparse.ArgumentParser) -> dict[str, tuple]:
    return {a.dest: (a.option_strings, a.type, a.choices, a.metavar, a.help)
            for a in parser._actions}


def test_help_lists_the_flags_of_iternn_train(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("[--epochs EPOCHS | --steps STEPS]", "--select {val_loss,val_acc,final}",
                 "--patience PATIENCE", "--val-fraction F"):
        assert flag in text, flag
    train_parser = next(a for a in build_parser()._actions
                        if isinstance(a, argparse._SubParsersAction)).choices["train"]
    ours, theirs = _actions(distributed_parser()), _actions(train_parser)
    for dest in ("epochs", "steps", "select", "patience"):
        assert ours[dest] == theirs[dest], dest
    assert ours["val_fraction"][:4] == theirs["val_fraction"][:4]
    # the datasets named in the help are those each command can load: mnist_idx needs
    # iternn train's --data-path, which the distributed command has not
    assert "mnist_idx" in theirs["val_fraction"][4]
    assert "mnist_idx" not in ours["val_fraction"][4] and "digits" in ours["val_fraction"][4]
    # absent, they keep the config's values (TrainConfig's defaults: val_loss, no patience)
    args = distributed_parser().parse_args(list(_BUILD))
    assert (args.epochs, args.steps, args.select, args.patience, args.val_fraction) == (None,) * 5
