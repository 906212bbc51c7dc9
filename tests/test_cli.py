"""The command line: one module, one exit-code rule, fast answers; and the demo."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

import iternn
from iternn import cli
from iternn.cli import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, exit_code, main, run_command
from iternn.demo import run_demo
from iternn.errors import (
    ConfigError,
    DataError,
    DynamicsError,
    FolderLockedError,
    FormatError,
    IterNNError,
    ResumeError,
    SizeError,
    StudyError,
)


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("iternn: error: ")
    return err[0]


def _run(*args: str, cwd=None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)


# --------------------------------------------------------------------------- demo


def test_demo_reports_exact_conversions_and_structure():
    lines: list[str] = []
    res = run_demo(reps=1, calls=1, print_fn=lines.append)
    assert res["mlp_max_diff"] <= 1e-5 and res["rnn_max_diff"] <= 1e-5
    assert res["mlp_impulse_response"] == 3
    assert res["rnn_impulse_response"] == float("inf")
    assert res["mlp_ratio"] > 0 and res["rnn_ratio"] > 0
    text = "\n".join(lines)
    assert "map/torch" in text and "impulse-response length" in text


# --------------------------------------------------------------------------- exit codes


@pytest.mark.parametrize("exc, code", [
    (ConfigError("train.lr must be > 0"), EXIT_USAGE),
    (ResumeError("--lr differs from the stored run"), EXIT_USAGE),
    (FormatError("m.safetensors: not an iternn file"), EXIT_USAGE),
    (DataError("mnist_idx: file missing"), EXIT_USAGE),
    (SizeError("--hidden needs 9 TB of memory"), EXIT_USAGE),
    (FileNotFoundError(2, "No such file or directory", "m.safetensors"), EXIT_USAGE),
    (StudyError("training diverged"), EXIT_FAILED),
    (DynamicsError("weights hold NaN"), EXIT_FAILED),
    (FolderLockedError("locked"), EXIT_FAILED),
    (RuntimeError("boom"), EXIT_FAILED),
    (ValueError("a bug"), EXIT_FAILED),
])
def test_run_command_prints_one_line_and_maps_the_error_to_its_code(exc, code, capsys):
    def handler(args):
        raise exc

    assert exit_code(exc) == code
    assert run_command(handler, cli.argparse.Namespace()) == code
    line = _err_line(capsys)
    if isinstance(exc, OSError):
        assert line == "iternn: error: No such file or directory: m.safetensors"
    elif isinstance(exc, (IterNNError, ValueError, MemoryError)):
        assert line == f"iternn: error: {exc}"
    else:  # an unexpected type: its name first
        assert line == f"iternn: error: {type(exc).__name__}: {exc}"
    with pytest.raises(type(exc)):  # --debug: the exception itself, traceback and all
        run_command(handler, cli.argparse.Namespace(debug=True))


def test_run_command_ok_and_ctrl_c(capsys):
    assert run_command(lambda args: None, cli.argparse.Namespace()) == EXIT_OK

    def interrupted(args):
        raise KeyboardInterrupt

    assert run_command(interrupted, cli.argparse.Namespace(debug=True)) == EXIT_INTERRUPTED
    assert capsys.readouterr().err == "iternn: interrupted\n"


def test_help_documents_the_exit_codes(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "exit codes:" in out
    for code in ("0 ", "1 ", "2 ", "130 "):
        assert f"\n  {code}" in out, code


@pytest.mark.parametrize("argv, words", [
    (["no-such-command"], "invalid choice: 'no-such-command'"),
    (["study", "--shard", "3/2"], "argument --shard: i/n needs 1 <= i <= n"),
    (["study", "--quick", "--config", "x"], "argument --config: not allowed with argument --quick"),
    (["study", "--jobs", "0"], "argument --jobs: must be at least 1"),
    (["train", "--model", "mlp"], "the following arguments are required: --dataset"),
    (["train", "--dataset", "digits", "--model", "mlp", "--device", "gpu0"], "argument --device: "),
    (["train", "--dataset", "digits", "--model", "mlp", "--lr", "nan"], "argument --lr: must be finite"),
    (["train", "--dataset", "digits", "--model", "mlp", "--lr", "0"], "argument --lr: must be > 0"),
    (["train", "--dataset", "digits", "--model", "mlp", "--hidden", "8,-1"], "argument --hidden: "),
    (["analyze"], "the following arguments are required: MAP"),
    (["analyze", "m.safetensors", "--steps", "0"], "argument --steps: must be at least 1"),
    (["demo", "--reps", "0"], "argument --reps: must be at least 1"),
])
def test_bad_flags_exit_2_naming_the_flag(argv, words, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("usage: iternn") and words in err


def test_study_config_errors_exit_2(tmp_path, capsys):
    assert main(["study", "--config", str(tmp_path / "missing.toml")]) == EXIT_USAGE
    assert "missing.toml does not exist" in _err_line(capsys)
    bad = tmp_path / "bad.toml"
    bad.write_text('[train]\nlr = -1\n[[datasets]]\nname = "digits"\n')
    assert main(["study", "--config", str(bad)]) == EXIT_USAGE
    assert _err_line(capsys).endswith("train.lr must be > 0, got -1")
    bad.write_text('nmae = "typo"\n[[datasets]]\nname = "digits"\n')
    assert main(["study", "--config", str(bad)]) == EXIT_USAGE
    assert "nmae" in _err_line(capsys)
    bad.write_bytes(b"\x00\xe8binary")  # not text at all: still a config error naming the file
    assert main(["study", "--config", str(bad)]) == EXIT_USAGE
    assert "bad.toml is not UTF-8 text" in _err_line(capsys)
    with pytest.raises(ConfigError):  # --debug: the exception, not the line
        main(["--debug", "study", "--config", str(bad)])
    assert not list(tmp_path.glob("iternn-study-*"))


@pytest.mark.parametrize("argv", [
    ["study", "--quick"],
    ["train", "--dataset", "regression", "--model", "mlp", "--epochs", "1"],
    ["analyze", "m.safetensors"],
])
def test_an_out_that_is_a_file_is_a_usage_error_naming_it(tmp_path, capsys, argv):
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    assert main([*argv, "--out", str(taken), "--quiet"]) == EXIT_USAGE
    assert _err_line(capsys).endswith(f"--out {taken}: is a file, not a folder")
    assert taken.read_text() == "keep me"


@pytest.mark.parametrize("extra, words", [
    (["--dataset", "nope", "--model", "mlp"], "--dataset: unknown dataset 'nope'"),
    (["--dataset", "digits", "--model", "mpl"], "--model: unknown model 'mpl'"),
    (["--dataset", "digits", "--model", "lstm"], "--model 'lstm' serves sequence datasets"),
    (["--dataset", "digits", "--model", "mlp", "--data-path", "x"], "--data-path is for"),
    (["--dataset", "digits", "--model", "mlp", "--device", "cuda:99"], "--device cuda:99: "),
    (["--dataset", "digits", "--model", "sparse_map", "--density", "1"], "--model sparse_map: "),
    (["--dataset", "digits", "--model", "mlp", "--hidden", "100000000000"], "memory"),
])
def test_train_usage_errors_exit_2_before_training(tmp_path, capsys, extra, words):
    out = tmp_path / "run"
    assert main(["train", *extra, "--out", str(out), "--quiet"]) == EXIT_USAGE
    assert words in _err_line(capsys)
    assert not out.exists()


@pytest.mark.skipif(torch.version.cuda is not None, reason="a CUDA build of torch")
def test_train_on_cuda_with_a_cpu_only_torch_is_one_line(tmp_path, capsys):
    assert main(["train", "--dataset", "digits", "--model", "mlp", "--device", "cuda",
                 "--out", str(tmp_path / "r")]) == EXIT_USAGE
    assert "--device cuda: this torch build has no CUDA support" in _err_line(capsys)


def test_train_that_diverges_exits_1_with_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--dataset", "digits", "--model", "mlp", "--hidden", "8", "--lr", "1e30",
                 "--epochs", "2", "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert json.loads(captured.out.splitlines()[0])["status"] == "diverged"
    err = captured.err.strip().splitlines()
    assert code == EXIT_FAILED and len(err) == 1
    assert err[0].startswith("iternn: error: training diverged at epoch 1")
    # resuming it with another learning rate is refused (ResumeError): usage, exit 2
    assert main(["train", "--dataset", "digits", "--model", "mlp", "--hidden", "8", "--lr", "1e-3",
                 "--epochs", "2", "--out", str(out), "--quiet", "--resume"]) == EXIT_USAGE
    assert "lr" in _err_line(capsys)


def test_study_with_failed_runs_exits_1(tmp_path, capsys, monkeypatch):
    import iternn.study as study

    class Sweep:
        ran, skipped, selected, failed, diverged, wall_time_s = 2, 0, 2, 1, 0, 0.5

    def fake_run_study(config, out, **kwargs):
        return Sweep(), out / "report.md"

    monkeypatch.setattr(study, "run_study", fake_run_study, raising=False)
    cfg = tmp_path / "s.toml"
    cfg.write_text('name = "x"\n[[datasets]]\nname = "digits"\nmodels = ["mlp"]\nhidden = [8]\n')
    argv = ["study", "--config", str(cfg), "--out", str(tmp_path / "s"), "--quiet"]
    assert main(argv) == EXIT_FAILED
    captured = capsys.readouterr()
    assert "1 failed, 0 diverged" in captured.out
    assert captured.err.startswith("iternn: error: 1 of 2 runs failed")
    Sweep.failed, Sweep.diverged = 0, 2  # every run diverged
    assert main(argv) == EXIT_FAILED
    assert "every run (2) diverged" in _err_line(capsys)
    Sweep.diverged = 1  # one of two diverged: a result of the study, not a failure
    assert main(argv) == EXIT_OK
    assert capsys.readouterr().err == ""


def test_bench_locates_runs_and_reports_the_benchmarks(tmp_path, monkeypatch, capsys):
    found = cli.find_benchmarks()
    assert found is not None and found.name == "run.py" and found.parent.name == "benchmarks"
    assert (found.parent / "sparse.py").is_file()
    fake = tmp_path / "benchmarks" / "run.py"
    fake.parent.mkdir()
    for name in ("run", "sparse"):
        (fake.parent / f"{name}.py").write_text(
            f"import json\ndef main(argv):\n    print('{name.upper()}', json.dumps(argv))\n"
            "    return 1 if argv == [] else 0\n")
    monkeypatch.setattr(cli, "find_benchmarks", lambda: fake)
    assert main(["bench", "--quick"]) == EXIT_OK
    out = capsys.readouterr().out
    assert out.index('RUN ["--quick"]') < out.index('SPARSE ["--quick"]')  # both, in order
    assert main(["bench", "--quick", "--which", "sparse"]) == EXIT_OK
    out = capsys.readouterr().out
    assert 'SPARSE ["--quick"]' in out and "RUN" not in out
    assert main(["bench"]) == EXIT_FAILED  # the benchmark reported a failed check
    assert "benchmarks/run.py exited with status 1" in _err_line(capsys)
    (fake.parent / "sparse.py").unlink()
    assert main(["bench", "--quick", "--which", "sparse"]) == EXIT_USAGE
    assert "benchmarks/sparse.py not found" in _err_line(capsys)
    monkeypatch.setattr(cli, "find_benchmarks", lambda: None)
    assert main(["bench"]) == EXIT_USAGE
    assert "benchmarks/run.py not found" in _err_line(capsys)


def test_analyze_shows_progress_on_stderr_unless_quiet(tmp_path, capsys):
    m = iternn.BlockMap({"x": 2, "h": 3})
    m.connect("h", "x", nn.Linear(2, 3, bias=False))
    m.connect("h", "h", nn.Linear(3, 3, bias=False))
    m.set_activation("h", nn.Tanh())
    iternn.save(m, tmp_path / "m.safetensors")
    argv = ["analyze", str(tmp_path / "m.safetensors"), "--quick", "--no-pictures", "--steps", "5"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == EXIT_OK
    captured = capsys.readouterr()
    assert "report written to" in captured.out and "analyze m" in captured.err
    assert main([*argv, "--out", str(tmp_path / "b"), "--quiet"]) == EXIT_OK
    assert capsys.readouterr().err == ""


def test_analyze_of_a_missing_or_foreign_file_exits_2(tmp_path, capsys):
    missing = tmp_path / "missing.safetensors"
    assert main(["analyze", str(missing), "--out", str(tmp_path / "r")]) == EXIT_USAGE
    assert "missing.safetensors" in _err_line(capsys)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"junk")
    assert main(["analyze", str(junk), "--out", str(tmp_path / "r")]) == EXIT_USAGE
    assert "junk.safetensors" in _err_line(capsys)
    iternn.save(nn.Linear(2, 2), tmp_path / "linear.safetensors")  # an iternn file, not a map
    assert main(["analyze", str(tmp_path / "linear.safetensors"), "--out", str(tmp_path / "r")]) == EXIT_USAGE
    assert "MAP: " in _err_line(capsys)
    assert not (tmp_path / "r").exists()


def _slow_map(path) -> None:
    """A 64-wide tanh recurrence near the edge of chaos: analyze takes ~40 s on it."""
    g = torch.Generator().manual_seed(1)
    m = iternn.BlockMap({"x": 2, "h": 64})
    m.connect("h", "x", nn.Linear(2, 64, bias=False))
    hh = m.connect("h", "h", nn.Linear(64, 64, bias=False))
    with torch.no_grad():
        hh.weight.copy_(1.5 * torch.randn(64, 64, generator=g) / 8)
    m.set_activation("h", nn.Tanh())
    iternn.save(m, path)


def _terminal_sigint() -> None:
    """In the child before exec: SIGINT as a terminal delivers it. A shell starts
    background commands with SIGINT ignored (``cmd &`` without job control), and an
    ignored signal stays ignored across exec, so Python would install no handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_in_analyze_exits_130_without_a_traceback(tmp_path):
    _slow_map(tmp_path / "slow.safetensors")
    proc = subprocess.Popen([sys.executable, "-m", "iternn", "analyze", "slow.safetensors",
                             "--no-pictures", "--out", "r"], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=_terminal_sigint)
    try:
        proc.stderr.read(1)  # the progress bar: imports done, the analysis has started
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert err.strip().splitlines()[-1] == "iternn: interrupted"
    assert "Traceback" not in err and "report written" not in out


_LONG_STUDY = """name = "long"
seeds = [0, 1]
jobs = 2
[train]
epochs = 500
[[datasets]]
name = "regression"
models = ["mlp"]
hidden = [4]
"""


def test_ctrl_c_in_a_parallel_study_stops_it_and_its_workers_at_once(tmp_path):
    import os

    (tmp_path / "long.toml").write_text(_LONG_STUDY)
    # a terminal's Ctrl-C reaches the whole process group: the study and its workers
    proc = subprocess.Popen([sys.executable, "-m", "iternn", "study", "--config", "long.toml",
                             "--out", "s", "--no-pictures"], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            preexec_fn=_terminal_sigint)
    try:
        assert "runs in the grid" in proc.stdout.readline()  # the workers are starting now
        time.sleep(1.0)
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        waited = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # one line, no worker's traceback, and no wait for the queued runs of 500 epochs
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert err.strip() == "iternn: interrupted", err
    assert waited < 20
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # no worker outlives the study
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("a process of the study's group is still running")


# --------------------------------------------------------------------------- fast answers


def test_parsing_imports_neither_torch_nor_numpy():
    code = ("import sys\nimport iternn\nfrom iternn import cli\n"
            "cli.build_parser().parse_args(['study', '--quick', '--shard', '1/2'])\n"
            "cli.build_parser().parse_args(['train', '--dataset', 'digits', '--model', 'mlp'])\n"
            "cli.distributed_parser().parse_args(['--dataset', 'digits'])\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy')))")
    out = _run("-c", code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _best_of_3(argv, code, cwd) -> float:
    """The shortest wall time of up to 3 runs of ``python -m iternn ARGV`` (stops early
    once one run is under a second, or when the first takes over 3 s)."""
    times = []
    for _ in range(3):
        start = time.perf_counter()
        out = _run("-m", "iternn", *argv, cwd=cwd)
        times.append(time.perf_counter() - start)
        assert out.returncode == code, out.stderr
        if times[-1] < 1.0 or times[0] > 3.0:
            break
    return min(times)


def test_help_answers_in_under_a_second(tmp_path):
    for argv in (["--help"], ["study", "--help"], ["train", "--help"]):
        assert _best_of_3(argv, 0, tmp_path) < 1.0, argv
    assert "exit codes:" in _run("-m", "iternn", "--help").stdout


def test_a_config_error_answers_in_under_a_second(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('nmae = "typo"\n[[datasets]]\nname = "digits"\n')
    assert _best_of_3(["study", "--config", str(bad)], EXIT_USAGE, tmp_path) < 1.0


def test_lazy_package_keeps_every_public_name():
    ns: dict = {}
    exec("from iternn import *", ns)
    assert [n for n in iternn.__all__ if n not in ns] == []
    assert ns["BlockMap"] is iternn.BlockMap is iternn.core.BlockMap
    assert iternn.io.save is iternn.save and iternn.dynamics.DEQ is not None
    assert set(iternn.__all__) <= set(dir(iternn))
    with pytest.raises(AttributeError, match="module 'iternn' has no attribute 'no_such_name'"):
        iternn.no_such_name  # noqa: B018
