"""The continuum instrument: the map family, a tiny sweep checked against direct calls,
the readings, the command line."""

import argparse
import json
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

import iternn
from iternn.continuum import (
    FULL,
    QUICK,
    ContinuumConfig,
    ContinuumNet,
    feedback_map,
    initial_state,
    memory_summary,
    predicted_lags,
    readings,
    run_continuum,
)
from iternn.continuum import cli as continuum_cli
from iternn.continuum.run import ContinuumResult
from iternn.core.summary import count_trainable
from iternn.dynamics import eigenvalues, fixed_point, lyapunov_spectrum
from iternn.dynamics.memory import feed_inputs, input_memory
from iternn.errors import ConfigError, DynamicsError, MapError
from iternn.study.data import load_dataset
from iternn.study.models import make_mlp
from iternn.study.train import TrainConfig, train

F64 = torch.float64
SIZES = [5, 4, 4, 3]


# --------------------------------------------------------------------------- the family


def test_feedback_map_without_feedback_is_the_seeded_mlp():
    m = feedback_map(SIZES, alpha=0.0, seed=3).double()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        mlp = make_mlp(5, [4, 4], 3, "tanh").double()
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(0), dtype=F64)
    out = iternn.iterate(m, {"x": x}, 3, hold=("x",))["y"]
    torch.testing.assert_close(out, mlp(x), rtol=1e-12, atol=1e-14)
    assert count_trainable(m) == count_trainable(mlp)
    assert set(m.edges) == {("h1", "x"), ("h2", "h1"), ("y", "h2"), ("x", "x")}


def test_feedback_blocks_are_alpha_times_one_fixed_matrix():
    half, full = feedback_map(SIZES, alpha=0.5, seed=1), feedback_map(SIZES, alpha=1.0, seed=1)
    feedback = [("x", "h1"), ("h1", "h2"), ("h2", "y")]
    for d, s in feedback:
        w = half.block(d, s).weight
        assert not w.requires_grad
        torch.testing.assert_close(w, 0.5 * full.block(d, s).weight, rtol=0, atol=0)
    assert count_trainable(half) == count_trainable(feedback_map(SIZES, alpha=0.0, seed=1))
    assert math.isinf(half.impulse_response_length())  # cycles between neighbours


@pytest.mark.parametrize("policy", ["zeros", "random"])
def test_a_resetting_net_runs_only_the_last_input(policy):
    m = feedback_map(SIZES, alpha=0.5, seed=0).double()
    net = ContinuumNet(m, applications=2, policy=policy, mode="forced", seed=4)
    xs = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(2), dtype=F64)  # (B, T, F)
    want = feed_inputs(m, xs.transpose(0, 1), applications=2, carry=False,
                       state=initial_state(m, policy, seed=4))["y"][-1]
    torch.testing.assert_close(net(xs), want, rtol=0, atol=0)


def test_a_carrying_held_net_is_feed_inputs():
    m = feedback_map(SIZES, alpha=0.5, seed=0).double()
    net = ContinuumNet(m, applications=3, policy="carried", mode="held")
    xs = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(2), dtype=F64)
    want = feed_inputs(m, xs.transpose(0, 1), applications=3, carry=True, held=True)["y"][-1]
    torch.testing.assert_close(net(xs), want, rtol=0, atol=0)


def test_random_initial_vector_is_seeded():
    m = feedback_map(SIZES, alpha=0.0)
    a, b = initial_state(m, "random", seed=5), initial_state(m, "random", seed=5)
    assert set(a) == {"h1", "h2", "y"} and all(torch.equal(a[s], b[s]) for s in a)
    assert not torch.equal(a["h1"], initial_state(m, "random", seed=6)["h1"])
    assert initial_state(m, "carried") is None


@pytest.mark.parametrize("kwargs,match", [
    ({"sizes": [5]}, "at least two widths"),
    ({"sizes": [5, 0, 3]}, "ints >= 1"),
    ({"alpha": -0.1}, "alpha must be a finite number >= 0"),
    ({"alpha": float("nan")}, "alpha must be a finite number >= 0"),
    ({"seed": -1}, "seed must be an int >= 0"),
    ({"activation": "swish"}, "activation must be one of"),
])
def test_feedback_map_bad_input(kwargs, match):
    args = {"sizes": SIZES, "alpha": 0.5, **kwargs}
    with pytest.raises(MapError, match=match):
        feedback_map(args.pop("sizes"), **args)


@pytest.mark.parametrize("kwargs,match", [
    ({"applications": 0}, "applications must be an int >= 1"),
    ({"policy": "warm"}, "policy must be one of"),
    ({"mode": "pulsed"}, "mode must be one of"),
    ({"input": "u"}, "input slot 'u'"),
])
def test_continuum_net_bad_input(kwargs, match):
    with pytest.raises(MapError, match=match):
        ContinuumNet(feedback_map(SIZES, alpha=0.0), **{"applications": 1, **kwargs})


def test_continuum_net_needs_a_sequence():
    net = ContinuumNet(feedback_map(SIZES, alpha=0.0), applications=1)
    with pytest.raises(DynamicsError, match=r"\(batch, time, features\)"):
        net(torch.zeros(4, 5))


@pytest.mark.parametrize("kwargs,match", [
    ({"ks": []}, "ks must be a non-empty list"),
    ({"ks": [0, 1]}, "ks must hold ints >= 1"),
    ({"alphas": [0.0, 1.5]}, r"alphas must hold numbers in \[0, 1\]"),
    ({"alphas": [0.5, 0.5]}, "alphas repeats a value"),
    ({"policies": ["zeros", "warm"]}, "policies has 'warm'"),
    ({"policies": ["zeros"], "train_policies": ["carried"]}, "train_policies has 'carried'"),
    ({"anomaly": {"n_tran": 5}}, "anomaly must be a dict with keys among"),
    ({"anomaly": {"n_train": 0}}, r"anomaly.n_train must be an int >= 1"),
    ({"digits_epochs": 0}, "digits_epochs must be an int >= 1"),
    ({"anomaly_lr": 0.0}, "anomaly_lr must be a finite number > 0"),
    ({"hidden": []}, "hidden must be a non-empty list"),
])
def test_config_bad_keys(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ContinuumConfig(**kwargs)


def test_quick_is_a_subset_of_full():
    assert QUICK.depth == FULL.depth == 3
    assert set(QUICK.ks) <= set(FULL.ks) and max(FULL.ks) > FULL.depth
    assert set(QUICK.alphas) <= set(FULL.alphas) and FULL.alphas[0] == 0 and FULL.alphas[-1] == 1


# --------------------------------------------------------------------------- a tiny sweep

TINY = ContinuumConfig(
    name="tiny", hidden=(6,), ks=(1, 2), alphas=(0.0, 0.5), policies=("zeros", "carried"),
    train_policies=("carried",), train_modes=("forced",),
    anomaly={"n_train": 64, "n_val": 32, "n_test": 32}, digits_epochs=1, anomaly_epochs=1,
    memory_batch=2, probe_batch=1, dynamics_steps=12)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("continuum")
    result = run_continuum(TINY, out)
    doc = json.loads((out / "continuum.json").read_text())
    return result, doc


def test_tiny_run_writes_the_folder(tiny):
    result, doc = tiny
    assert isinstance(result, ContinuumResult)
    assert result.report.read_text().startswith("# The continuum, measured")
    assert [p.name for p in result.pictures] == ["phase.png", "memory.png", "dynamics.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in result.pictures)
    assert len(doc["points"]) == 2 * 2 * 2 * 2 == len(result.points)
    assert result.trainings == 2 * 2 * 2 and doc["timing"]["trainings"] == 8
    assert doc["meta"]["sizes"] == [64, 6, 10] and doc["meta"]["depth"] == 2
    assert doc["config"]["ks"] == [1, 2]


def point(doc, **where):
    (p,) = [p for p in doc["points"] if all(p[k] == v for k, v in where.items())]
    return p


def test_tiny_run_json_matches_direct_calls(tiny):
    _, doc = tiny
    p = point(doc, k=1, alpha=0.5, policy="carried", mode="forced")
    anomaly = load_dataset("anomaly", seed=0, length=10, n_train=64, n_val=32, n_test=32)
    digits = load_dataset("digits", seed=0)
    m = feedback_map([64, 6, 10], alpha=0.5, seed=0).double()
    probe = anomaly.x_test[:2].transpose(0, 1).double()
    mem = input_memory(m, probe, applications=1, carry=True)
    assert p["memory"] == mem.tolist()  # bit for bit through JSON
    assert p == {**p, **memory_summary(p["memory"])}
    x0 = digits.x_test[:1].double()
    z_star, info = fixed_point(m, {"x": x0}, hold=("x",), max_steps=100)
    assert p["fixed_point_converged"] == info.converged is True
    radius = eigenvalues(m, z_star, hold=("x",)).abs().amax(-1).mean()
    assert p["spectral_radius"] == pytest.approx(float(radius), rel=1e-12)
    # 16 free units (h1, y): 4 exponents, as run_continuum asks for (whole Jacobians)
    lyap = lyapunov_spectrum(m, {"x": x0}, steps=12, hold=("x",), k=4)[..., 0]
    assert p["lyapunov"] == pytest.approx(float(lyap.mean()), rel=1e-12)
    assert p["impulse_structural"] == "inf" and not p["impulse_censored"]
    # the accuracy: the same training, directly
    net = ContinuumNet(feedback_map([64, 6, 10], alpha=0.5, seed=0), applications=1)
    r = train(net, anomaly, TrainConfig(epochs=1, lr=TINY.anomaly_lr, batch_size=64, seed=0),
              progress=False)
    assert p["anomaly"]["test_acc"] == r.test_acc
    assert p["anomaly"]["trainable"] == r.trainable == 64 * 6 + 6 + 6 * 10 + 10


def test_tiny_run_feed_forward_points_match_the_derivation(tiny):
    _, doc = tiny
    for p in doc["points"]:
        if p["alpha"] == 0:
            assert p["nonzero_lags"] == p["predicted_lags"] == predicted_lags(2, p["k"], p["policy"])
            if p["mode"] == "forced":
                assert p["spectral_radius"] == 0 and p["lyapunov"] == "-inf"
                assert p["impulse_structural"] == 1 and p["impulse_empirical"] == 1
            else:  # the identity block on x: infinite impulse response
                assert p["impulse_structural"] == "inf" and p["impulse_censored"]
        else:
            assert p["predicted_lags"] is None
    trained = [p for p in doc["points"] if p["anomaly"] is not None]
    assert {(p["policy"], p["mode"]) for p in trained} == {("carried", "forced")}
    assert all(len(p["memory_trained"]) == 10 for p in trained)


def test_tiny_run_readings(tiny):
    result, doc = tiny
    read = {r["claim"]: r for r in readings(TINY, result.points, doc["meta"])}
    delay = read["k = 1 with the state carried is a pure delay line: memory only at lag L - 1"]
    assert delay["verdict"] == "held" and "2 of 2" in delay["evidence"]
    assert all(r["verdict"] in ("held", "held in part", "did not hold", "inconclusive",
                                "not measured") for r in read.values())
    text = result.report.read_text()
    assert all(r["claim"] in text for r in read.values())


def test_readings_notice_a_broken_claim(tiny):
    result, doc = tiny
    broken = [dict(p) for p in result.points]
    for p in broken:
        if p["alpha"] == 0 and p["k"] == 1 and p["policy"] == "carried":
            p["nonzero_lags"] = [0, 1]
    read = {r["claim"]: r["verdict"] for r in readings(TINY, broken, doc["meta"])}
    assert read["k = 1 with the state carried is a pure delay line: memory only at lag L - 1"] \
        == "did not hold"


def test_memory_summary_and_predicted_lags():
    s = memory_summary([0.0, 2.0, 0.0, 2.0])
    assert s == {"mean_lag": 2.0, "past_share": 1.0, "nonzero_lags": [1, 3]}
    assert memory_summary([0.0, 0.0])["mean_lag"] is None
    assert [predicted_lags(4, k, "carried") for k in (1, 2, 3, 4, 5)] == [[3], [1], [1], [0], [0]]
    assert predicted_lags(3, 2, "zeros") == [] and predicted_lags(3, 3, "random") == [0]


def test_run_refuses_a_file_as_folder(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        run_continuum(TINY, f)


def test_run_sets_and_restores_the_threads(tmp_path, monkeypatch):
    seen = []

    def fail(*args):
        seen.append(torch.get_num_threads())
        raise RuntimeError("stop")

    monkeypatch.setattr("iternn.continuum.run._run", fail)
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="stop"):
        run_continuum(TINY, tmp_path, threads=before + 1)
    assert seen == [before + 1] and torch.get_num_threads() == before


def test_run_refuses_another_config():
    with pytest.raises(ConfigError, match="config must be a ContinuumConfig"):
        run_continuum({"ks": [1]}, "unused")


# --------------------------------------------------------------------------- command line


def parse(*argv):
    parser = argparse.ArgumentParser(prog="iternn")
    sub = parser.add_subparsers(dest="command", required=True)
    continuum_cli.add_parser(sub, [])
    return parser.parse_args(["continuum", *argv])


def fake_result(tmp_path, trainings, diverged):
    return ContinuumResult(out_dir=tmp_path, report=tmp_path / "report.md", json=tmp_path / "j",
                           pictures=[], points=[], trainings=trainings, diverged=diverged,
                           wall_time_s=1.0)


def test_cli_passes_the_options(tmp_path, monkeypatch, capsys):
    seen = {}

    def fake(config, out, **kwargs):
        seen.update(config=config, out=out, **kwargs)
        return fake_result(tmp_path, 4, 1)

    monkeypatch.setattr("iternn.continuum.run.run_continuum", fake)
    args = parse("--quick", "--out", str(tmp_path / "o"), "--no-pictures", "--threads", "2",
                 "--quiet")
    assert continuum_cli.run(args) == 0
    assert seen["config"] is QUICK and str(seen["out"]) == str(tmp_path / "o")
    assert seen["pictures"] is False and seen["threads"] == 2 and seen["log"] is None
    assert "report written to" in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    assert continuum_cli.run(parse()) == 0
    assert seen["config"] is FULL and str(seen["out"]) == "iternn-continuum-full"


def test_cli_exit_codes(tmp_path, monkeypatch, capsys):
    f = tmp_path / "file"
    f.write_text("")
    assert continuum_cli.run(parse("--out", str(f))) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    monkeypatch.setattr("iternn.continuum.run.run_continuum",
                        lambda *a, **k: fake_result(tmp_path, 3, 3))
    assert continuum_cli.run(parse("--out", str(tmp_path / "o"))) == 1
    assert "every training (3) diverged" in capsys.readouterr().err

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("iternn.continuum.run.run_continuum", interrupted)
    assert continuum_cli.run(parse("--out", str(tmp_path / "o"))) == 130


def test_cli_bad_flag_is_a_usage_error():
    with pytest.raises(SystemExit) as e:
        parse("--threads", "0")
    assert e.value.code == 2


def test_cli_parses_without_torch():
    code = ("import argparse, sys; from iternn.continuum.cli import add_parser; "
            "p = argparse.ArgumentParser(); add_parser(p.add_subparsers(), []); "
            "p.parse_args(['continuum', '--quick']); "
            "import iternn.continuum as c; c.__dir__(); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_held_and_forced_memory_differ_with_feedback_into_x():
    m = feedback_map([5, 4, 3], alpha=1.0, seed=0).double()
    xs = torch.randn(4, 2, 5, generator=torch.Generator().manual_seed(0), dtype=F64)
    # k = 3: y reads, through h1, the x of the second application, which feedback has moved
    held = input_memory(m, xs, applications=3, held=True)
    forced = input_memory(m, xs, applications=3, held=False)
    assert torch.all(held > 0) and torch.all(forced > 0) and not torch.equal(held, forced)
    assert isinstance(m.block("x", "x"), nn.Identity)
