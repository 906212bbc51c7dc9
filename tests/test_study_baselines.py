"""The residual MLP family and the published MNIST-1D shapes (1-D CNN, bidirectional GRU):
each against an independent reference written with ``torch.nn.functional`` (float64), its
exact map (same outputs and gradients), its trainable count, its bad inputs; and the
report that puts them beside the published figures."""

from __future__ import annotations

import csv
import statistics
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from iternn import count_trainable
from iternn.errors import MapError
from iternn.study import data as study_data
from iternn.study import run_study
from iternn.study import sweep as study_sweep
from iternn.study.config import loads
from iternn.study.models import (
    FAMILIES,
    BiGRUClassifier,
    budget,
    build_model,
    check_feasible,
    parameter_bytes,
)
from iternn.study.report import MNIST1D_PUBLISHED, selection_text
from iternn.study.train import TrainConfig, train


def _flat(n_features: int, n_out: int = 4, n: int = 32) -> types.SimpleNamespace:
    """A classification set in the default dtype (the label: the largest of the first
    ``n_out`` features, when there are that many)."""
    g = torch.Generator().manual_seed(1)
    splits = {}
    for s in ("train", "val", "test"):
        x = torch.randn(n, n_features, generator=g, dtype=torch.get_default_dtype())
        splits[f"x_{s}"] = x
        splits[f"y_{s}"] = (x[:, :n_out].argmax(1) if n_features >= n_out else torch.arange(n) % n_out)
    return types.SimpleNamespace(task="classification", n_classes=n_out, **splits)


DATA = _flat(12)


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _grads(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad()
    (model(x) ** 2).sum().backward()
    return [p.grad.clone() for p in model.parameters()]


# ----------------------------------------------------------------------------- resmlp


@pytest.mark.parametrize("hidden", [(7,), (9, 9), (5, 5, 5)])
def test_resmlp_is_the_residual_network_at_the_mlp_budget(float64, hidden):
    data = _flat(12)
    model = build_model("resmlp", data, hidden=hidden, seed=3)
    assert count_trainable(model) == budget(data, hidden)
    x = data.x_test
    w = [model.input] + list(model.blocks) + [model.output]
    h = F.relu(F.linear(x, w[0].weight, w[0].bias))
    for layer in w[1:-1]:
        h = h + F.relu(F.linear(h, layer.weight, layer.bias))
    ref = F.linear(h, w[-1].weight, w[-1].bias)
    assert torch.allclose(model(x), ref, rtol=0, atol=1e-12)
    twin = build_model("resmlp_map", data, hidden=hidden, seed=3)
    assert count_trainable(twin) == count_trainable(model)
    assert torch.allclose(twin(x), ref, rtol=0, atol=1e-12)
    for a, b in zip(_grads(twin, x), _grads(model, x), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-10)


def test_resmlp_trains_and_its_map_trains_to_the_same_numbers(float64):
    data = _flat(12, n=96)
    cfg = TrainConfig(lr=0.02, epochs=6, batch_size=16, seed=1)
    results = [train(build_model(f, data, hidden=(16, 16), seed=0), data, cfg, progress=False)
               for f in ("resmlp", "resmlp_map")]
    assert results[0].metrics[-1]["train_loss"] < 0.5 * results[0].metrics[0]["train_loss"]
    assert results[0].test_acc > 0.5  # 4 classes: chance is 25 %
    assert results[0].test_acc == results[1].test_acc
    for a, b in zip(results[0].metrics, results[1].metrics, strict=True):
        assert abs(a["val_loss"] - b["val_loss"]) < 1e-9


# ----------------------------------------------------------------------------- cnn1d


@pytest.mark.parametrize("n_features", [3, 12, 40])
def test_cnn1d_is_the_published_convolution_stack(float64, n_features):
    data = _flat(n_features)
    model = build_model("cnn1d", data, hidden=(5,), seed=2)
    assert count_trainable(model) == FAMILIES["cnn1d"].count(data, (5,))
    assert parameter_bytes("cnn1d", data, (5,))[0] == count_trainable(model)
    x = data.x_test
    h = x[:, None, :]
    for conv in (model.conv1, model.conv2, model.conv3):
        h = F.relu(F.conv1d(h, conv.weight, conv.bias, stride=2, padding=1))
    ref = F.linear(h.reshape(len(x), -1), model.linear.weight, model.linear.bias)
    assert torch.allclose(model(x), ref, rtol=0, atol=1e-12)
    twin = build_model("cnn1d_map", data, hidden=(5,), seed=2)
    assert torch.allclose(twin(x), ref, rtol=0, atol=1e-12)
    for a, b in zip(_grads(twin, x), _grads(model, x), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-10)


def test_published_cnn_and_gru_counts_on_mnist1d_shapes():
    shaped = _flat(40, n_out=10)
    assert count_trainable(build_model("cnn1d", shaped, hidden=(25,))) == 5210
    assert count_trainable(build_model("bigru", shaped, hidden=(6,))) == 5134
    assert budget(shaped, (100, 100)) == count_trainable(
        build_model("resmlp", shaped, hidden=(100, 100))) == 15210


# ----------------------------------------------------------------------------- bigru


def _gru_direction(x: torch.Tensor, w_ih, w_hh, b_ih, b_hh) -> torch.Tensor:
    """A GRU written out (torch's gate order r, z, n), over (B, T, 1) -> (B, T, H)."""
    H = w_hh.shape[1]
    h = x.new_zeros(x.shape[0], H)
    out = []
    for t in range(x.shape[1]):
        gi = F.linear(x[:, t], w_ih, b_ih)
        gh = F.linear(h, w_hh, b_hh)
        r = torch.sigmoid(gi[:, :H] + gh[:, :H])
        z = torch.sigmoid(gi[:, H:2 * H] + gh[:, H:2 * H])
        n = torch.tanh(gi[:, 2 * H:] + r * gh[:, 2 * H:])
        h = (1 - z) * n + z * h
        out.append(h)
    return torch.stack(out, 1)


@pytest.mark.parametrize("n_features, width", [(5, 2), (12, 3)])
def test_bigru_and_its_map_are_the_published_bidirectional_gru(float64, n_features, width):
    data = _flat(n_features)
    model = build_model("bigru", data, hidden=(width,), seed=4)
    assert isinstance(model, BiGRUClassifier)
    assert count_trainable(model) == FAMILIES["bigru"].count(data, (width,))
    x = data.x_test
    g = model.gru
    seq = x[:, :, None]
    fwd = _gru_direction(seq, g.weight_ih_l0, g.weight_hh_l0, g.bias_ih_l0, g.bias_hh_l0)
    bwd = _gru_direction(seq.flip(1), g.weight_ih_l0_reverse, g.weight_hh_l0_reverse,
                         g.bias_ih_l0_reverse, g.bias_hh_l0_reverse).flip(1)
    ref = model.readout(torch.cat([fwd, bwd], -1).reshape(len(x), -1))
    assert torch.allclose(model(x), ref, rtol=0, atol=1e-12)
    twin = build_model("bigru_map", data, hidden=(width,), seed=4)
    assert count_trainable(twin) == count_trainable(model)
    assert torch.allclose(twin(x), ref, rtol=0, atol=1e-12)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    for net, xi in zip((model, twin), xs):
        (net(xi) ** 2).sum().backward()
    assert torch.allclose(xs[0].grad, xs[1].grad, rtol=0, atol=1e-10)
    cfg = TrainConfig(lr=0.02, epochs=2, batch_size=8, seed=1)
    a, b = (train(build_model(f, data, hidden=(width,), seed=4), data, cfg, progress=False)
            for f in ("bigru", "bigru_map"))
    for ra, rb in zip(a.metrics, b.metrics, strict=True):
        assert abs(ra["train_loss"] - rb["train_loss"]) < 1e-9
        assert abs(ra["val_loss"] - rb["val_loss"]) < 1e-9


@pytest.mark.parametrize("family, hidden, words", [
    ("resmlp", (8, 6), "resmlp needs equal hidden widths"),
    ("resmlp_map", (8, 6), "resmlp(_map)? needs equal hidden widths"),
    ("cnn1d", (8, 8), "cnn1d takes one hidden width"),
    ("bigru", (3, 3), "bigru takes one hidden width"),
])
def test_bad_widths_are_refused_naming_the_family(family, hidden, words):
    with pytest.raises(MapError, match=words):
        check_feasible(family, DATA, hidden=hidden)
    with pytest.raises(MapError, match=words):
        build_model(family, DATA, hidden=hidden)


def test_cnn1d_needs_three_features():
    with pytest.raises(MapError, match="cnn1d needs at least 3 features"):
        check_feasible("cnn1d_map", _flat(2, n_out=2), hidden=(4,))


# ----------------------------------------------------------------------------- the report


@pytest.fixture
def small_mnist1d(monkeypatch):
    """MNIST-1D's loader over a small stand-in for the generator's output (40 features,
    10 classes), so that the report's MNIST-1D section can be exercised in a second."""
    rng = np.random.default_rng(0)
    templates = rng.normal(size=(10, 40))

    def raw(seed):
        def part(n):
            y = np.arange(n) % 10
            return templates[y] + 0.3 * rng.normal(size=(n, 40)), y
        (x, y), (xt, yt) = part(200), part(100)
        return x, y, xt, yt

    monkeypatch.setattr(study_data, "_mnist1d_raw", raw)
    study_sweep._dataset.cache_clear()
    yield
    study_sweep._dataset.cache_clear()


def test_report_puts_the_published_shapes_beside_the_published_figures(tmp_path, small_mnist1d):
    text = """
name = "b"
seeds = [0, 1]
[train]
steps = 6
batch_size = 50
lr = 0.01
select = "final"
[[datasets]]
name = "mnist1d"
label = "m-mlp"
models = ["resmlp", "resmlp_map"]
hidden = [[100, 100]]
[datasets.options]
val_fraction = 0
standardize = false
[[datasets]]
name = "mnist1d"
label = "m-gru"
models = ["bigru", "bigru_map"]
hidden = [2]
[datasets.options]
val_fraction = 0
"""
    config = loads(text)
    sweep, report = run_study(config, tmp_path / "s", jobs=1, pictures=False)
    assert sweep.failed == 0 and sweep.ran == 8
    md = report.read_text()
    rows = list(csv.DictReader((tmp_path / "s" / "results.csv").open()))
    assert all(r["epochs_run"] == "2" and r["best_epoch"] == "2" and r["budget"] ==
               ("15210" if r["family"].startswith("resmlp") else "") for r in rows)
    context = md.split("## Context: published MNIST-1D baselines", 1)[1].split("## Failures", 1)[0]
    for family in ("resmlp", "resmlp_map"):
        accs = [float(r["test_acc"]) for r in rows if r["family"] == family]
        mean, std = 100 * statistics.fmean(accs), 100 * statistics.stdev(accs)
        line = next(x for x in context.splitlines() if f"`{family}`" in x)
        assert MNIST1D_PUBLISHED["resmlp"][2] in line
        assert f"{mean:.1f} ± {std:.1f} (n=2)" in line
    gru = next(x for x in context.splitlines() if "`bigru`" in x)
    assert "– (published shape: hidden 6)" in gru  # width 2 is not the published GRU
    assert selection_text(config.datasets[0].train, config.datasets[0].options) in context
    assert ("test metrics of the final weights, after the last step; 6 optimizer steps of batch "
            "50, adam at lr 0.01; no validation split (val_fraction = 0); raw (unstandardised) "
            "features.") in md
    claims = md.split("## Claims", 1)[1]
    assert "*`resmlp` and its block-map twin `resmlp_map` (`from_module`) train to the same " \
           "numbers*: **yes**" in claims
    assert "Published shape: hidden 2 (not matched to a budget)." in claims
    assert "inputs as the source gives them (not standardised)" in md


@pytest.mark.parametrize("select, words", [
    ("val_loss", "the epoch with the lowest validation loss"),
    ("val_acc", "the epoch with the highest validation accuracy"),
    ("final", "the final weights, after the last step"),
])
def test_selection_text_names_the_rule_and_the_budget(select, words):
    train_opts = {"select": select, "epochs": 30, "steps": None, "batch_size": 64,
                  "optimizer": "adam", "lr": 0.003, "patience": 5, "weight_decay": 0.0}
    text = selection_text(train_opts, {})
    assert text.startswith(f'Selection `select = "{select}"`: test metrics of {words}; ')
    assert "up to 30 epochs of batch 64" in text and "early stopping after 5 epochs" in text
