"""The sparsity study: parameter-matched model families, the config validator, grid
expansion and sharding, a tiny end-to-end study with its report, fault handling in a
sweep, and the exit codes of ``iternn study / train / bench``."""

from __future__ import annotations

import csv
import json
import math
import re

import pytest
import torch

from iternn import count_trainable
from iternn.cli import main as cli_main
from iternn.sparse import six_block_counts
from iternn.study import run_study
from iternn.study.config import (
    DEFAULT,
    QUICK,
    ConfigError,
    dumps,
    load_config,
    loads,
    parse_config,
)
from iternn.study.data import Dataset
from iternn.study.models import (
    FAMILIES,
    Family,
    budget,
    build_model,
    check_feasible,
    count_tolerance,
    live_trainable,
    recurrent_count,
    recurrent_width,
)
from iternn.study.report import REPORT_NAME, SECTIONS, _band_reading, compare, write_report
from iternn.study.sweep import (
    expand,
    parse_shard,
    run_sweep,
    select_shard,
)


def _fake(task: str, n_features: int, n_out: int, *, T: int | None = None, n: int = 24) -> Dataset:
    g = torch.Generator().manual_seed(0)
    shape = (n, n_features) if T is None else (n, T, n_features)
    splits = {}
    for s in ("train", "val", "test"):
        splits[f"x_{s}"] = torch.randn(shape, generator=g)
        if task == "regression":
            splits[f"y_{s}"] = torch.randn(n, n_out, generator=g)
        else:
            splits[f"y_{s}"] = torch.arange(n) % n_out
    return Dataset(name="fake", task=task, n_classes=None if task == "regression" else n_out, **splits)


NX, NY = 12, 5
FLAT = _fake("classification", NX, NY)
SEQ = _fake("sequence", 12, 10, T=5)

# A tiny study: digits at two budgets (every flat family) and a small anomaly run (every
# sequence family), one epoch.
TINY_TOML = """
name = "tiny"
seeds = [0, 1]
[train]
epochs = 1
batch_size = 128
[[datasets]]
name = "digits"
models = ["mlp", "mlp_map", "dense_map", "sparse_map"]
densities = [0.5]
hidden = [16, 24]
extra_steps = [0, 1]
[[datasets]]
name = "anomaly"
seeds = [0]
models = ["forced_map", "rnn", "gru", "lstm"]
densities = [0.5, 1.0]
hidden = [6]
[datasets.options]
n_train = 60
n_val = 20
n_test = 20
"""


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize("hidden", [(8,), (32,), (16, 12)])
def test_flat_families_match_the_mlp_budget(hidden):
    target = budget(FLAT, hidden)
    widths = [NX, *hidden, NY]
    assert target == sum(a * b + b for a, b in zip(widths, widths[1:]))
    for family, density in [("mlp", None), ("mlp_map", None), ("sparse_map", 0.05),
                            ("sparse_map", 0.3), ("sparse_map", 0.6)]:
        m = build_model(family, FLAT, hidden=hidden, density=density, seed=1)
        assert count_trainable(m) == target, (family, density)
        assert m(FLAT.x_test).shape == (24, NY)
    dense = build_model("dense_map", FLAT, hidden=hidden, seed=1)
    got, tol = count_trainable(dense), count_tolerance("dense_map", FLAT, hidden)
    assert 0 <= target - got < tol
    # the documented rounding: one more hidden unit would exceed the budget
    n_h = dense.map.slots["h"]
    assert sum(six_block_counts(NX, n_h + 1, NY, 1.0).values()) > target
    assert tol == sum(six_block_counts(NX, n_h + 1, NY, 1.0).values()) - got


@pytest.mark.parametrize("width", [4, 16, 33])
def test_sequence_families_match_the_forced_map_budget(width):
    target = budget(SEQ, width)
    assert target == width * 12 + width * width + 10 * width + width + 10
    for density in (1.0, 0.5, 0.2):
        m = build_model("forced_map", SEQ, hidden=width, density=density, seed=3)
        assert count_trainable(m) == target, density
        assert m(SEQ.x_test).shape == (24, 10)
    for kind in ("rnn", "gru", "lstm"):
        m = build_model(kind, SEQ, hidden=width, seed=3)
        got, tol = count_trainable(m), count_tolerance(kind, SEQ, width)
        assert abs(got - target) <= tol, kind
        w = recurrent_width(kind, 12, 10, target)
        assert got == recurrent_count(kind, 12, w, 10)
        for other in (w - 1, w + 1):  # no neighbouring width is closer to the budget
            if other >= 1:
                assert abs(recurrent_count(kind, 12, other, 10) - target) >= abs(got - target)
        assert m(SEQ.x_test).shape == (24, 10)


def test_mlp_map_is_the_exact_twin_and_builders_are_seeded():
    state = torch.get_rng_state()
    mlp = build_model("mlp", FLAT, hidden=(16,), seed=7)
    twin = build_model("mlp_map", FLAT, hidden=(16,), seed=7)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    assert torch.equal(mlp(FLAT.x_test), twin(FLAT.x_test))
    a = build_model("sparse_map", FLAT, hidden=(16,), density=0.2, seed=5)
    b = build_model("sparse_map", FLAT, hidden=(16,), density=0.2, seed=5)
    c = build_model("sparse_map", FLAT, hidden=(16,), density=0.2, seed=6)
    assert torch.equal(a(FLAT.x_test), b(FLAT.x_test))
    assert not torch.equal(a(FLAT.x_test), c(FLAT.x_test))


@pytest.mark.parametrize("family, density", [("dense_map", None), ("sparse_map", 0.1), ("sparse_map", 0.6)])
def test_live_count_matches_the_gradient_and_extra_steps_revive_dead_blocks(family, density):
    for extra in (0, 1):
        m = build_model(family, FLAT, hidden=(16,), density=density, seed=2, extra_steps=extra)
        assert m.steps == 2 + extra
        torch.nn.functional.cross_entropy(m(FLAT.x_train), FLAT.y_train).backward()
        reached = sum(p.numel() for p in m.parameters() if p.grad is not None and bool(p.grad.ne(0).any()))
        assert live_trainable(m) == reached
        h = m.map.slots["h"]
        dead = count_trainable(m.map.block("h", "h")) + count_trainable(m.map.block("h", "y"))
        if extra == 0:  # 2 applications: h <- h and h <- y never reach y
            assert dead > 0 and live_trainable(m) == count_trainable(m) - dead, h
        else:
            assert live_trainable(m) == count_trainable(m)
    assert live_trainable(build_model("mlp_map", FLAT, hidden=(16,))) == budget(FLAT, (16,))
    assert live_trainable(build_model("forced_map", SEQ, hidden=4)) == budget(SEQ, 4)
    with pytest.raises(ValueError, match="takes no extra_steps"):
        build_model("mlp_map", FLAT, hidden=(16,), extra_steps=1)


def test_dense_forced_map_is_an_elman_rnn_with_readout():
    net = build_model("forced_map", SEQ, hidden=5, seed=0)
    m = net.map
    x = SEQ.x_test[:4]
    h = torch.zeros(4, 5)
    for t in range(x.shape[1]):
        h = torch.tanh(m.bias("h") + m.block("h", "x")(x[:, t]) + m.block("h", "h")(h))
    y = m.bias("y") + m.block("y", "h")(h)
    torch.testing.assert_close(net(x), y)


def test_build_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown model family 'nope'"):
        build_model("nope", FLAT, hidden=8)
    with pytest.raises(ValueError, match="serves tasks sequence"):
        build_model("lstm", FLAT, hidden=8)
    with pytest.raises(ValueError, match=r"density in \(0, 1\)"):
        build_model("sparse_map", FLAT, hidden=8, density=1.0)
    with pytest.raises(ValueError, match="takes no density"):
        build_model("mlp", FLAT, hidden=8, density=0.5)
    with pytest.raises(ValueError, match="one hidden width"):
        build_model("forced_map", SEQ, hidden=[4, 4])
    with pytest.raises(ValueError, match="activation"):
        build_model("rnn", SEQ, hidden=4, activation="gelu")
    # the six-block map's x -> y and y -> y blocks alone exceed a tiny budget at high density
    with pytest.raises(ValueError, match="below the smallest six-block map"):
        build_model("dense_map", FLAT, hidden=2)
    with pytest.raises(ValueError, match="below the smallest six-block map"):
        check_feasible("sparse_map", FLAT, hidden=2, density=0.9)
    check_feasible("sparse_map", FLAT, hidden=2, density=0.1)


# --------------------------------------------------------------------------- config


def _cfg(**top) -> dict:
    base = {"datasets": [{"name": "digits"}]}
    base.update(top)
    return base


@pytest.mark.parametrize("data, message", [
    (_cfg(epochs=3), r"^epochs: unknown key"),
    (_cfg(train={"lr": -1}), r"^train\.lr must be > 0, got -1$"),
    (_cfg(train={"lrr": 0.1}), r"^train\.lrr: unknown key"),
    (_cfg(train={"epochs": 0}), r"^train\.epochs must be an int >= 1, got 0$"),
    (_cfg(train={"optimizer": "adagrad"}), r"^train\.optimizer must be one of"),
    (_cfg(train={"seed": 1}), r"^train\.seed: not allowed"),
    (_cfg(train={"tensorboard": "yes"}), r"^train\.tensorboard must be true or false, got 'yes'$"),
    (_cfg(train={"tensorboard": 1}), r"^train\.tensorboard must be true or false, got 1$"),
    (_cfg(seeds=[]), r"^seeds must be a non-empty list"),
    (_cfg(seeds=[0, 0]), r"^seeds must be a list of distinct seeds"),
    (_cfg(jobs=0), r"^jobs must be an int >= 1, got 0$"),
    ({"datasets": [{"name": "digits", "modles": ["mlp"]}]}, r"^datasets\[0\]\.modles: unknown key"),
    ({"datasets": [{"name": "digitz"}]}, r"^datasets\[0\]\.name must be one of"),
    ({"datasets": [{"label": "x"}]}, r"^datasets\[0\]\.name: missing"),
    ({"datasets": [{"name": "digits"}, {"name": "digits", "models": ["mlp", "mpl"]}]},
     r"^datasets\[1\]\.label: 'digits' is used twice|^datasets\[1\]\.models\[1\]: unknown model 'mpl'"),
    ({"datasets": [{"name": "digits", "models": ["mlp", "mpl"]}]},
     r"^datasets\[0\]\.models\[1\]: unknown model 'mpl'"),
    ({"datasets": [{"name": "digits", "models": ["lstm"]}]},
     r"^datasets\[0\]\.models\[0\]: model 'lstm' serves sequence"),
    ({"datasets": [{"name": "digits", "densities": [0.5, 1.0]}]},
     r"^datasets\[0\]\.densities\[1\]: density 1 is not sparse"),
    ({"datasets": [{"name": "digits", "densities": [0.0]}]},
     r"^datasets\[0\]\.densities\[0\] must be a number in \(0, 1\]"),
    ({"datasets": [{"name": "digits", "hidden": [8, "x"]}]}, r"^datasets\[0\]\.hidden\[1\] must be"),
    ({"datasets": [{"name": "anomaly", "hidden": [[8, 8]]}]}, r"^datasets\[0\]\.hidden\[0\] must be one int"),
    ({"datasets": [{"name": "digits", "options": {"n_train": 5}}]},
     r"^datasets\[0\]\.options\.n_train: unknown option of dataset 'digits'"),
    ({"datasets": [{"name": "digits", "train": {"batch_size": 1.5}}]},
     r"^datasets\[0\]\.train\.batch_size must be an int >= 1"),
    ({"datasets": []}, r"^datasets must be a non-empty array"),
    ({"datasets": [{"name": "digits", "extra_steps": [0, -1]}]},
     r"^datasets\[0\]\.extra_steps\[1\] must be an int >= 0, got -1$"),
    ({"datasets": [{"name": "anomaly", "extra_steps": [1]}]},
     r"^datasets\[0\]\.extra_steps: only dense_map, sparse_map take extra steps"),
    ({}, r"^datasets: missing"),
])
def test_config_errors_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(data)


def test_config_defaults_round_trip_and_files(tmp_path):
    c = parse_config({"datasets": [{"name": "digits"}, {"name": "anomaly", "label": "anom"}]})
    assert c.seeds == (0, 1, 2) and c.train["epochs"] == 20 and c.train["optimizer"] == "adam"
    flat, seq = c.datasets
    assert flat.models == ("mlp", "mlp_map", "dense_map", "sparse_map") and flat.activation == "relu"
    assert seq.models == ("forced_map", "rnn", "gru", "lstm") and seq.activation == "tanh"
    assert seq.label == "anom" and 1.0 in seq.densities
    tiny = loads(TINY_TOML)
    for cfg in (c, tiny, QUICK, DEFAULT):
        assert parse_config(cfg.to_dict()) == cfg
        assert loads(dumps(cfg)) == cfg
    path = tmp_path / "study.toml"
    path.write_text(dumps(tiny))
    assert load_config(path) == tiny
    assert tiny.datasets[0].train_config(1).seed == 1
    assert tiny.datasets[0].train_config(1).patience is None  # patience 0 = off
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("name = [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML"):
        load_config(tmp_path / "bad.toml")


# --------------------------------------------------------------------------- grid


def test_grid_expansion_and_shards():
    tiny = loads(TINY_TOML)
    runs = expand(tiny)
    # digits: 2 budgets x (mlp, mlp_map, dense_map +0/+1, sparse_map@0.5 +0/+1) x 2 seeds;
    # anomaly: 1 budget x (forced_map@0.5, forced_map@1, rnn, gru, lstm) x 1 seed
    assert len(runs) == 2 * 6 * 2 + 5
    assert {r.extra_steps for r in runs if r.family in ("dense_map", "sparse_map")} == {0, 1}
    assert all(r.extra_steps == 0 for r in runs if r.family not in ("dense_map", "sparse_map"))
    assert "digits__sparse_map__h16__d0.5__e1__s0" in {r.run_id for r in runs}
    assert len({r.run_id for r in runs}) == len(runs)
    assert [r.index for r in runs] == list(range(len(runs)))
    assert {r.density for r in runs if r.family == "sparse_map"} == {0.5}
    assert {r.density for r in runs if r.family == "forced_map"} == {0.5, 1.0}
    assert all(r.density is None for r in runs if r.family in ("mlp", "lstm"))
    assert runs[0].run_id == "digits__mlp__h16__s0"
    assert len(expand(QUICK)) == 3 * 8 * 3 + 4 * 3
    shards = [select_shard(runs, (i, 3)) for i in (1, 2, 3)]
    assert [r.index for r in shards[1]] == list(range(1, len(runs), 3))
    ids = [r.run_id for s in shards for r in s]
    assert sorted(ids) == sorted(r.run_id for r in runs) and len(set(ids)) == len(ids)
    assert select_shard(runs, None) == runs
    assert parse_shard("2/5") == (2, 5)
    for bad in ("0/2", "3/2", "a/b", "1", "1/0"):
        with pytest.raises(ValueError):
            parse_shard(bad)
    # the fingerprint changes with anything that changes the result
    import dataclasses

    r0 = runs[0]
    assert r0.fingerprint() == dataclasses.replace(r0, threads=4, index=9).fingerprint()
    assert r0.fingerprint() != dataclasses.replace(r0, train={**r0.train, "epochs": 2}).fingerprint()
    # TensorBoard is logging: switching it, or a train table from before the key existed,
    # leaves the fingerprint (and so the reuse of finished runs) as it was
    assert r0.train["tensorboard"] is False
    assert r0.fingerprint() == dataclasses.replace(r0, train={**r0.train, "tensorboard": True}).fingerprint()
    old = {k: v for k, v in r0.train.items() if k != "tensorboard"}
    assert r0.fingerprint() == dataclasses.replace(r0, train=old).fingerprint()
    assert loads(TINY_TOML.replace("epochs = 1\n", "epochs = 1\ntensorboard = true\n", 1)
                 ).datasets[0].train["tensorboard"] is True


# --------------------------------------------------------------------------- end to end


def test_tiny_study_end_to_end_with_parallel_jobs(tmp_path):
    tiny = loads(TINY_TOML)
    out = tmp_path / "study"
    lines: list[str] = []
    sweep, report = run_study(tiny, out, jobs=2, log=lines.append)
    n = len(expand(tiny))
    assert sweep.ran == n and sweep.skipped == 0 and sweep.failed == 0 and sweep.missing == 0
    assert report == out / REPORT_NAME
    text = report.read_text()
    headings = re.findall(r"^## (.+)$", text, flags=re.M)
    assert headings == list(SECTIONS)
    for needle in ("| digits | digits | classification", "| anomaly | anomaly | sequence",
                   "test acc %", "sparse_map", "forced_map", "logistic regression ~32 %",
                   "MLP ~68 %", "GRU ~91 %", "CNN ~94 %", "*A sparse forced (recurrent) map beats the LSTM",
                   "*A random-sparse map at the same budget beats the MLP*", "results.csv"):
        assert needle in text, needle
    # every picture the report links exists, and each kind is there
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links and all((out / p).is_file() and (out / p).stat().st_size > 1000 for p in links)
    for prefix in ("acc_vs_params_digits", "acc_vs_density_digits_h16", "acc_vs_density_anomaly_h6",
                   "curves_digits", "structure_digits_mlp_map", "structure_digits_dense_map",
                   "structure_digits_sparse_map_d0.5", "structure_anomaly_forced_map_d0.5"):
        assert f"{prefix}.png" in links, prefix
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == n and {r["status"] for r in rows} <= {"ok", "early_stopped"}
    assert all(0.0 <= float(r["test_acc"]) <= 1.0 for r in rows)
    records = json.loads((out / "results.json").read_text())
    assert len(records) == n and all(len(r["metrics"]) == 1 for r in records)
    for r in records:
        assert r["trainable"] is not None and r["budget"] is not None
        if r["family"] in ("mlp", "mlp_map", "sparse_map", "forced_map"):
            assert r["trainable"] == r["budget"]
        assert (out / "runs" / r["run_id"] / "metrics.csv").is_file()
    for r in records:  # one extra application makes every block of the six-block map live
        if r["family"] in ("dense_map", "sparse_map"):
            assert r["steps"] == 2 + r["extra_steps"]
            assert (r["live"] == r["trainable"]) == (r["extra_steps"] == 1)
        else:
            assert r["live"] == r["trainable"]
    assert "have dead parameters" in text and "*Iterating the sparse map more often helps*" in text
    twins = {(r["hidden"][0], r["seed"], r["family"]): r["test_acc"] for r in records
             if r["family"] in ("mlp", "mlp_map")}
    assert all(twins[(h, s, "mlp")] == twins[(h, s, "mlp_map")] for h, s, _ in twins)
    assert json.loads((out / "datasets.json").read_text())["digits"]["sizes"]["train"] > 0
    assert loads((out / "config.toml").read_text()) == tiny
    assert any(line.startswith(f"[{n}/{n}]") for line in lines)
    # resumable: a second sweep reuses every run
    again, _ = run_study(tiny, out, jobs=1, pictures=False)
    assert again.ran == 0 and again.skipped == n


def test_failed_and_diverged_runs_are_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    def boom(*args):
        raise RuntimeError("boom: this family always fails")

    monkeypatch.setitem(FAMILIES, "boom", Family("boom", ("classification",), "none", boom))
    cfg = parse_config({
        "seeds": [0], "train": {"epochs": 1},
        "datasets": [
            {"name": "digits", "models": ["mlp", "boom", "mlp_map"], "hidden": [8]},
            {"name": "digits", "label": "digits-sgd", "models": ["mlp"], "hidden": [8],
             "train": {"optimizer": "sgd", "lr": 1e12}},
        ]})
    out = tmp_path / "faults"
    sweep, report = run_study(cfg, out, jobs=1, pictures=False)
    status = {r["run_id"]: r for r in sweep.records}
    assert status["digits__mlp__h8__s0"]["status"] == "ok"
    assert status["digits__mlp_map__h8__s0"]["status"] == "ok"  # ran after the failure
    failed = status["digits__boom__h8__s0"]
    assert failed["status"] == "failed" and failed["error"] == "RuntimeError: boom: this family always fails"
    assert "Traceback" in (out / "runs" / "digits__boom__h8__s0" / "error.txt").read_text()
    div = status["digits-sgd__mlp__h8__s0"]
    assert div["status"] == "diverged" and div["test_acc"] is None
    assert sweep.failed == 1 and sweep.diverged == 1
    text = report.read_text()
    assert "`digits__boom__h8__s0`: **failed** — RuntimeError: boom" in text
    assert "`digits-sgd__mlp__h8__s0`: **diverged** — non-finite loss at epoch 1" in text
    # a second sweep retries the failed run only (diverged is a result, not a failure)
    again = run_sweep(cfg, out, jobs=1)
    assert again.ran == 1 and again.skipped == 3 and again.failed == 1
    again = run_sweep(cfg, out, jobs=1, retry_failed=False)
    assert again.ran == 0


def test_interrupted_redefined_and_extended_runs(tmp_path):
    def cfg(n_train, epochs=2):
        return parse_config({"seeds": [0], "train": {"epochs": epochs}, "datasets": [
            {"name": "regression", "models": ["mlp"], "hidden": [4],
             "options": {"n_train": n_train, "n_val": 16, "n_test": 16}}]})

    a = run_sweep(cfg(64), tmp_path)
    rid = "regression__mlp__h4__s0"
    first = a.records[0]
    assert a.ran == 1 and first["status"] == "ok" and first["test_acc"] is None
    (tmp_path / "runs" / rid / "result.json").unlink()  # as if killed before the record
    b = run_sweep(cfg(64), tmp_path)
    assert b.ran == 1 and b.records[0]["test_loss"] == first["test_loss"]
    assert b.records[0]["wall_time_s"] == first["wall_time_s"]  # the finished checkpoint, not a retrain
    # another config on the folder: refused, naming the key; the folder's results stay
    with pytest.raises(ConfigError, match=r"datasets\[0\]\.options\.n_train: recorded 64, new 80"):
        run_sweep(cfg(80), tmp_path)
    assert json.loads((tmp_path / "results.json").read_text())[0]["test_loss"] == first["test_loss"]
    # a run whose folder holds another definition's checkpoint trains afresh
    from iternn.study.sweep import run_one

    other = run_one(expand(cfg(80))[0], tmp_path)
    assert other["status"] == "ok" and other["fingerprint"] != first["fingerprint"]
    assert other["test_loss"] != first["test_loss"]
    # more epochs: the folder's runs continue from their checkpoints, to the numbers of an
    # uninterrupted run of that length (bit for bit)
    run_sweep(cfg(64), tmp_path / "again")
    longer = run_sweep(cfg(64, epochs=3), tmp_path / "again").records[0]
    fresh = run_sweep(cfg(64, epochs=3), tmp_path / "fresh").records[0]
    assert longer["epochs_run"] == 3 and longer["test_loss"] == fresh["test_loss"]
    assert [m["val_loss"] for m in longer["metrics"]] == [m["val_loss"] for m in fresh["metrics"]]
    resumed = json.loads((tmp_path / "again" / "runs" / rid / "metrics.json").read_text())
    assert resumed["resumed_from"] == 2  # continued, not retrained


_WRITER_TOML = """name = "w{n}"
seeds = [0]
[train]
epochs = 1
[[datasets]]
name = "regression"
models = ["mlp"]
hidden = [4]
[datasets.options]
n_train = {n}
n_val = 16
n_test = 16
"""


def test_two_studies_on_one_folder_never_lose_or_mix_results(tmp_path):
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    from iternn import FolderLockedError

    worker = Path(__file__).with_name("train_worker.py")
    out = tmp_path / "study"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(worker.parent), *filter(None, [os.environ.get("PYTHONPATH")])])}
    (tmp_path / "a.toml").write_text(_WRITER_TOML.format(n=48))
    other = loads(_WRITER_TOML.format(n=64))
    # process 1 runs its study (pausing 0.5 s after each progress line, lock held) ...
    proc = subprocess.Popen([sys.executable, str(worker), str(out), "--study", str(tmp_path / "a.toml"),
                             "--sleep", "0.5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        lock = out / "iternn.lock"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if lock.is_file() and lock.read_text().strip() == str(proc.pid):
                break
            time.sleep(0.02)
        # ... while this process, with another config, is refused at once, naming the holder
        with pytest.raises(FolderLockedError, match=rf"study folder {re.escape(str(out))} is in use "
                           rf"by another iternn process \(pid {proc.pid}\)"):
            run_study(other, out, jobs=1, pictures=False)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and stdout.strip() == "ok", stderr
    # the first study's results are all there, and only its config's
    first = loads(_WRITER_TOML.format(n=48))
    records = json.loads((out / "results.json").read_text())
    assert [r["fingerprint"] for r in records] == [r.fingerprint() for r in expand(first)]
    assert all(r["status"] == "ok" for r in records)
    assert sorted(p.name for p in (out / "runs").iterdir()) == [r.run_id for r in expand(first)]
    assert not (out / "iternn.lock").exists()
    # later, the other config is refused too (its runs would replace these): nothing changes
    with pytest.raises(ConfigError, match=r"holds the runs of another config \(2 difference\(s\): "
                       r"datasets\[0\]\.options\.n_train: recorded 48, new 64; name: "):
        run_study(other, out, jobs=1, pictures=False)
    assert json.loads((out / "results.json").read_text()) == records


@pytest.mark.parametrize("text, words", [
    ("{not json", "study.json is unreadable"),
    ("[1, 2]", "is not a study record of this version"),  # valid JSON, not a record
    ('{"format": "iternn.study/0", "config": {}}', "is not a study record of this version"),
])
def test_a_damaged_study_record_is_a_config_error_naming_it(tmp_path, text, words):
    from iternn.study.folder import study_folder

    (tmp_path / "study.json").write_text(text)
    cfg = loads(_WRITER_TOML.format(n=48))
    with pytest.raises(ConfigError, match=f"study folder {re.escape(str(tmp_path))}.*{words}"):
        with study_folder(cfg, tmp_path, grid={}):
            pass
    assert not (tmp_path / "iternn.lock").exists()  # the lock went with the refusal


def test_an_unreadable_checkpoint_is_quarantined_and_the_run_retrained(tmp_path):
    cfg = loads(_WRITER_TOML.format(n=48))
    first = run_sweep(cfg, tmp_path).records[0]
    rid = first["run_id"]
    run_dir = tmp_path / "runs" / rid
    (run_dir / "checkpoint.pt").write_bytes(b"torn")  # damaged, and no record: must rerun
    (run_dir / "result.json").unlink()
    lines: list[str] = []
    again = run_sweep(cfg, tmp_path, log=lines.append)
    rec = again.records[0]
    assert again.ran == 1 and again.failed == 0 and rec["status"] == "ok"
    assert rec["test_loss"] == first["test_loss"]  # retrained from scratch: same numbers
    broken = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith(rid + ".broken-")]
    assert len(broken) == 1 and (broken[0] / "checkpoint.pt").read_bytes() == b"torn"
    assert rec["quarantined"] == str(broken[0])
    assert any("unreadable checkpoint: run folder moved to " + broken[0].name in line for line in lines)
    # the next sweep reuses the retrained run: no failure on every rerun
    assert run_sweep(cfg, tmp_path).skipped == 1


def test_a_width_no_machine_holds_is_refused_before_building():
    from iternn import SizeError

    flat = _fake("classification", 40, 10)
    for family, density in (("mlp", None), ("sparse_map", 0.5)):
        with pytest.raises(SizeError, match=r"hidden \[1000000000000\] \(--hidden: model "
                           rf"'{family}' of 51,000,000,000,010 float32 parameters"):
            build_model(family, flat, hidden=10**12, density=density)


def test_sweep_and_report_do_not_import_each_other():
    import ast
    from pathlib import Path

    import iternn.study.sweep as sweep_module

    tree = ast.parse(Path(sweep_module.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & {"report", "runner"}, imported


def _crashing_worker(run, study_dir):
    """Runs in a spawned worker (this module is importable there): kills the process."""
    import os

    from iternn.study.sweep import run_one

    if run.family == "mlp_map":
        os._exit(3)
    return run_one(run, study_dir)


def test_a_dying_worker_fails_its_run_only(tmp_path):
    from iternn.study.sweep import _run_parallel, collect

    cfg = parse_config({"seeds": [0], "train": {"epochs": 1}, "datasets": [
        {"name": "regression", "models": ["mlp", "mlp_map"], "hidden": [4],
         "options": {"n_train": 64, "n_val": 16, "n_test": 16}}]})
    runs = expand(cfg)
    got: list[dict] = []
    _run_parallel(runs, tmp_path, 2, got.append, worker=_crashing_worker)
    by = {r["run_id"]: r for r in got}
    assert len(by) == 2
    assert by["regression__mlp_map__h4__s0"]["status"] == "failed"
    assert "worker process died" in by["regression__mlp_map__h4__s0"]["error"]
    assert by["regression__mlp__h4__s0"]["status"] == "ok"
    on_disk = {r["run_id"]: r["status"] for r in collect(cfg, tmp_path)}
    assert on_disk == {"regression__mlp__h4__s0": "ok", "regression__mlp_map__h4__s0": "failed"}


def test_compare_evidence_rules():
    c = compare([0.9, 0.91, 0.92], [0.8, 0.81, 0.79])
    assert c["better"] is True and c["evidence"] == "clear" and c["t"] > 2
    c = compare([0.9, 0.91], [0.8, 0.81])
    assert c["better"] is True and c["evidence"] == "weak"
    c = compare([0.5], [0.6])
    assert c["better"] is False and c["evidence"] == "none" and c["t"] is None
    c = compare([0.2, 0.3, 0.25], [0.3, 0.35, 0.4], higher_better=False)  # losses
    assert c["better"] is True and math.isclose(c["diff"], -0.1)
    assert compare([], [0.5])["better"] is None
    c = compare([0.9, 0.9, 0.9], [0.8, 0.8, 0.8])  # no spread: noise not estimable
    assert c["better"] is True and c["t"] is None and c["evidence"] == "weak"


# --------------------------------------------------------------------------- claim wording

_BAND_TOML = """
name = "band"
seeds = [0, 1, 2]
[[datasets]]
name = "digits"
models = ["dense_map", "sparse_map"]
densities = [0.05, 0.2, 0.5, 0.75]
hidden = [32]
"""


def _band_records(config, sparse_acc: dict[float, float], dense_acc: float) -> list[dict]:
    """Hand-made records of a finished sweep (every run ok; accuracies per density with a
    small spread over the seeds)."""
    records = []
    for run in expand(config):
        acc = dense_acc if run.family == "dense_map" else sparse_acc[run.density]
        acc += 0.002 * run.seed
        records.append({
            "run_id": run.run_id, "index": run.index, "label": run.label, "dataset": run.dataset,
            "task": run.task, "family": run.family, "hidden": list(run.hidden),
            "density": run.density, "extra_steps": 0, "steps": 2, "seed": run.seed,
            "budget": 1000, "trainable": 1000, "live": 1000, "status": "ok", "epochs_run": 3,
            "best_epoch": 3, "best_val_loss": 1.0 - acc, "val_acc": acc, "test_loss": 1.0 - acc,
            "test_acc": acc, "wall_time_s": 1.0, "run_time_s": 1.0, "error": None, "metrics": []})
    return records


def _band_line(tmp_path, sparse_acc: dict[float, float], dense_acc: float) -> str:
    config = loads(_BAND_TOML)
    report = write_report(config, tmp_path, records=_band_records(config, sparse_acc, dense_acc),
                          pictures=False, datasets={})
    lines = [ln for ln in report.read_text().splitlines() if "densities whose mean beats dense_map" in ln]
    assert len(lines) == 1, lines
    return lines[0]


def test_band_wording_tells_the_densest_win_from_an_intermediate_band(tmp_path):
    # only the densest density tested (0.75, the closest to dense) wins: not a band
    line = _band_line(tmp_path / "a", {0.05: 0.80, 0.2: 0.82, 0.5: 0.84, 0.75: 0.95}, 0.90)
    assert "densities whose mean beats dense_map: 0.75 (of 0.05, 0.2, 0.5, 0.75)" in line
    assert "only the densest density tested (0.75, the one closest to dense) beats dense" in line
    assert "an intermediate band" not in line and ": no intermediate band" in line
    # 0.2 and 0.5 win, neither end does: an intermediate band
    line = _band_line(tmp_path / "b", {0.05: 0.80, 0.2: 0.95, 0.5: 0.96, 0.75: 0.85}, 0.90)
    assert "densities whose mean beats dense_map: 0.2, 0.5 (of 0.05, 0.2, 0.5, 0.75)" in line
    assert "→ an intermediate band (0.2, 0.5) beats dense" in line
    # nothing wins
    line = _band_line(tmp_path / "c", {0.05: 0.80, 0.2: 0.81, 0.5: 0.82, 0.75: 0.83}, 0.90)
    assert "beats dense_map: none (of" in line and "no density tested beats dense" in line


def test_band_reading_cases():
    grid = [0.05, 0.2, 0.5, 0.75]
    assert _band_reading([], grid) == "no density tested beats dense"
    assert _band_reading([0.05], grid) == \
        "only the sparsest density tested (0.05) beats dense: no intermediate band"
    assert _band_reading([0.75], grid).startswith("only the densest density tested (0.75, the one closest")
    assert _band_reading([0.5, 0.2], grid) == "an intermediate band (0.2, 0.5) beats dense"
    five = [0.05, 0.1, 0.2, 0.5, 0.75]
    assert _band_reading([0.1, 0.5], five) == ("intermediate densities (0.1, 0.5) beat dense, but not as one "
                                              "band: 0.2 between them does not")
    spread = _band_reading([0.05, 0.2], grid)
    assert "include the sparsest density tested (0.05), so" in spread
    assert "no edge of a band at the sparse end" in spread
    assert "not an intermediate band" in spread
    spread = _band_reading([0.5, 0.75], grid)
    assert "include the densest density tested (0.75), so" in spread and "at the dense end" in spread
    both = _band_reading([0.05, 0.75], grid)
    assert "both the sparsest (0.05) and the densest (0.75) density tested" in both
    assert _band_reading(grid, grid).startswith("every density tested (0.05, 0.2, 0.5, 0.75) beats dense")
    assert _band_reading([0.1], [0.1]).startswith("the only density tested (0.1) beats dense")
    assert _band_reading([0.5], [0.1, 0.5]).startswith("only the densest")  # two densities: no interior


# --------------------------------------------------------------------------- command line


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("iternn: error: ")
    return err[0]


def test_cli_study_and_train_call_the_study(tmp_path, capsys):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text('name = "cli"\nseeds = [0]\n[train]\nepochs = 1\n[[datasets]]\nname = "digits"\n'
                   'models = ["mlp", "sparse_map"]\ndensities = [0.5]\nhidden = [8]\n')
    assert cli_main(["study", "--config", str(cfg), "--out", str(tmp_path / "s"),
                     "--no-pictures", "--quiet"]) == 0
    assert f"report written to {tmp_path / 's' / 'report.md'}" in capsys.readouterr().out
    (tmp_path / "bad.toml").write_text('[train]\nlr = -1\n[[datasets]]\nname = "digits"\n')
    assert cli_main(["study", "--config", str(tmp_path / "bad.toml")]) != 0
    assert _err_line(capsys).endswith("train.lr must be > 0, got -1")
    (tmp_path / "small.toml").write_text(
        '[[datasets]]\nname = "digits"\nmodels = ["dense_map"]\nhidden = [8]\n')
    assert cli_main(["study", "--config", str(tmp_path / "small.toml"), "--out", str(tmp_path / "z")]) != 0
    assert "datasets[0].hidden[0] ([8]): dense_map: budget 610 is below the smallest" in _err_line(capsys)

    run_dir = tmp_path / "t"
    argv = ["train", "--dataset", "digits", "--model", "sparse_map", "--density", "0.5", "--hidden", "8",
            "--extra-steps", "1", "--epochs", "2", "--out", str(run_dir), "--quiet"]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    summary = json.loads(out.splitlines()[0])
    assert summary["status"] == "ok" and summary["epochs_run"] == 2 and summary["trainable"] == 610
    assert (run_dir / "metrics.csv").is_file() and (run_dir / "checkpoint.pt").is_file()
    assert cli_main(argv + ["--resume"]) == 0  # a finished run: same result
    assert json.loads(capsys.readouterr().out.splitlines()[0])["test_acc"] == summary["test_acc"]
    # a changed activation or data seed would train another model or let the test split
    # overlap the data trained on: refused, naming both options with their values
    assert cli_main(argv + ["--resume", "--activation", "tanh", "--data-seed", "1"]) != 0
    line = _err_line(capsys)
    assert "activation: stored 'relu', new 'tanh'" in line and "data_seed: stored 0, new 1" in line
    # the default activation spelled out is the same run
    assert cli_main(argv + ["--resume", "--activation", "relu"]) == 0
    capsys.readouterr()
    # more epochs continue the finished run
    assert cli_main(argv + ["--epochs", "3", "--resume"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["epochs_run"] == 3
    # a width no machine holds: refused before anything is allocated, naming the flag
    assert cli_main(["train", "--dataset", "digits", "--model", "mlp", "--hidden", "1000000000000",
                     "--out", str(tmp_path / "huge")]) != 0
    line = _err_line(capsys)
    assert "hidden [1000000000000] (--hidden" in line and "of memory, more than the" in line


def test_live_trainable_of_blocks_reading_two_slots():
    from torch import nn

    from iternn import BlockMap, MapModule

    m = BlockMap({"x": 3, "h": 3, "g": 3, "y": 2})
    m.connect("h", "x", nn.Linear(3, 3))
    m.connect("y", ("h", "x"), nn.Bilinear(3, 3, 2))  # live: h is non-zero after 1 application
    m.connect("y", ("g", "g"), nn.Bilinear(3, 3, 2))  # dead: nothing ever writes g
    net = MapModule(m, input="x", output="y")
    dead = count_trainable(m.block("y", ("g", "g")))
    assert dead == 3 * 3 * 2 + 2
    assert live_trainable(net) == count_trainable(net) - dead
