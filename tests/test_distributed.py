"""Data-parallel training: 2 CPU processes under torchrun (gloo, loopback only) train the
same parameters as one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from train_worker import build_distributed

from iternn.study.checkpoint import load_checkpoint
from iternn.study.data import DATASETS
from iternn.study.distributed import main, train_distributed
from iternn.study.resume import RUN_JSON
from iternn.study.train import CHECKPOINT_NAME, METRICS_JSON, train

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


def _launch_ranks(out: Path, store: Path, world: int = 2) -> list[subprocess.Popen]:
    """Start ``world`` rank processes the way torchrun does (RANK/WORLD_SIZE/LOCAL_RANK in
    the environment), meeting through a file:// store: no port, no network."""
    procs = []
    for rank in range(world):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world)}
        cmd = [sys.executable, "-m", "iternn.study.distributed", "--build",
               f"{WORKER}:build_distributed", "--out", str(out), "--no-progress",
               "--init-method", f"file://{store}"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=env, cwd=out.parent))
    return procs


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
    procs = _launch_ranks(out, tmp_path / "store")
    try:
        single = _single_process()  # meanwhile, in this process
        outputs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-4000:]
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
