"""Training choices: which weights a run ends with (``select``), a step budget
(``steps``), training without a validation split (``val_fraction = 0``), weight decay; in
the trainer (against a hand-written training loop), in resume, in the study config and
its presets, and on the command line."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from train_worker import _mlp, _toy

from iternn.cli import EXIT_OK, EXIT_USAGE
from iternn.cli import main as cli_main
from iternn.errors import ConfigError, DataError, ResumeError
from iternn.study import config as study_config
from iternn.study.config import (
    PRESETS,
    dumps,
    loads,
    parse_config,
    preset,
    with_overrides,
)
from iternn.study.data import load_dataset
from iternn.study.resume import RUN_JSON, stop_epoch
from iternn.study.sweep import expand
from iternn.study.train import TrainConfig, evaluate, train

SEED = 4


def _data(n_train: int = 40):
    return _toy(n_train, 60, 60, 6, 3, seed=2, dtype=torch.float64)


def _model():
    return _mlp(6, 32, 3, seed=0, dtype=torch.float64)


def _reference(data, *, lr: float, batch: int, steps: int, seed: int = SEED,
               weight_decay: float = 0.0):
    """The documented loop, written out: a generator seeded with ``seed`` draws one
    permutation per epoch; each batch's mean cross-entropy; Adam; stop after ``steps``
    steps. Returns the model and, per epoch, its parameters and (loss sum, samples)."""
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    n = data.x_train.shape[0]
    done, epochs = 0, []
    while done < steps:
        perm = torch.randperm(n, generator=g)
        total, seen = 0.0, 0
        for b in range(-(-n // batch)):
            if done == steps:
                break
            idx = perm[b * batch:(b + 1) * batch]
            opt.zero_grad()
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            loss.backward()
            opt.step()
            total, seen, done = total + loss.item() * len(idx), seen + len(idx), done + 1
        epochs.append(([p.detach().clone() for p in model.parameters()], total, seen))
    return model, epochs


def _close(params, model) -> bool:
    return all(torch.allclose(a, b, rtol=0, atol=1e-12)
               for a, b in zip(params, model.parameters(), strict=True))


# ----------------------------------------------------------------------------- TrainConfig


@pytest.mark.parametrize("kw, words", [
    ({"select": "best"}, "TrainConfig.select must be one of 'val_loss', 'val_acc', 'final'"),
    ({"steps": 0}, "TrainConfig.steps must be None or an int >= 1"),
    ({"steps": 2.5}, "TrainConfig.steps must be None or an int >= 1"),
    ({"steps": 10, "epochs": 3}, "TrainConfig.epochs and TrainConfig.steps are exclusive"),
    ({"select": "final", "patience": 2}, "TrainConfig.patience must be None with select='final'"),
])
def test_train_config_refuses_bad_choices_naming_them(kw, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")):
        TrainConfig(**kw)


def test_train_config_budget_defaults_and_round_trip():
    assert TrainConfig().epochs == 20 and TrainConfig().steps is None
    cfg = TrainConfig(steps=7, select="final", weight_decay=0.5)
    assert cfg.epochs is None and cfg.steps == 7
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert TrainConfig(epochs=3).to_dict()["steps"] is None


# ----------------------------------------------------------------------------- the trainer


@pytest.mark.parametrize("select", ["val_loss", "val_acc"])
def test_select_ends_with_the_chosen_epochs_weights(select):
    data = _data()
    model = _model()
    result = train(model, data, TrainConfig(lr=0.05, epochs=10, batch_size=8, seed=SEED,
                                            select=select), progress=False)
    n_batches = 5
    _, epochs = _reference(data, lr=0.05, batch=8, steps=10 * n_batches)
    losses = [m["val_loss"] for m in result.metrics]
    accs = [m["val_acc"] for m in result.metrics]
    by_loss = 1 + min(range(10), key=lambda i: (losses[i], i))
    by_acc = 1 + min(range(10), key=lambda i: (-accs[i], i))  # highest, the earliest on a tie
    assert by_loss != by_acc  # the rules disagree here, so the choice is visible
    chosen = by_loss if select == "val_loss" else by_acc
    assert result.best_epoch == chosen and result.status == "ok"
    assert result.best_val_loss == losses[chosen - 1]
    assert _close(epochs[chosen - 1][0], model)
    ref = _model()
    with torch.no_grad():
        for p, q in zip(ref.parameters(), epochs[chosen - 1][0]):
            p.copy_(q)
    expected = evaluate(ref, data.x_test, data.y_test, "classification")
    assert result.test_acc == expected["acc"]
    assert math.isclose(result.test_loss, expected["loss"], rel_tol=1e-12)


def test_a_step_budget_ends_part_way_through_an_epoch_with_the_final_weights():
    data = _data()  # 40 samples, batch 16: 3 batches an epoch; 8 steps = 2 epochs and 2 steps
    model = _model()
    cfg = TrainConfig(lr=0.05, steps=8, batch_size=16, seed=SEED, select="final", weight_decay=0.01)
    result = train(model, data, cfg, progress=False)
    _, epochs = _reference(data, lr=0.05, batch=16, steps=8, weight_decay=0.01)
    assert result.epochs_run == len(epochs) == 3 and result.best_epoch == 3
    assert _close(epochs[-1][0], model)
    for row, (_, total, seen) in zip(result.metrics, epochs, strict=True):
        assert math.isclose(row["train_loss"], total / seen, rel_tol=1e-12)
    assert [seen for _, _, seen in epochs] == [40, 40, 32]


def test_no_validation_split_only_with_the_final_weights():
    data = _data()
    data.x_val, data.y_val = data.x_val[:0], data.y_val[:0]
    model = _model()
    result = train(model, data, TrainConfig(lr=0.05, epochs=3, batch_size=8, seed=SEED,
                                            select="final"), progress=False)
    assert [m["val_loss"] for m in result.metrics] == [None] * 3
    assert result.best_val_loss is None and result.best_epoch == 3
    assert result.test_acc == evaluate(model, data.x_test, data.y_test, "classification")["acc"]
    for select in ("val_loss", "val_acc"):
        with pytest.raises(DataError, match=f"data.x_val is empty: select='{select}'.*'final'"):
            train(_model(), data, TrainConfig(epochs=1, select=select), progress=False)


def test_val_acc_is_refused_for_regression():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 2, generator=g)
    data = type("D", (), dict(task="regression", x_train=x, y_train=x, x_val=x, y_val=x,
                              x_test=None, y_test=None))()
    with pytest.raises(ConfigError, match="select='val_acc' needs an accuracy"):
        train(torch.nn.Linear(2, 2), data, TrainConfig(epochs=1, select="val_acc"), progress=False)


def test_patience_watches_the_selection_criterion():
    rows = [{"epoch": i + 1, "val_loss": loss, "val_acc": acc}
            for i, (loss, acc) in enumerate([(1.0, 0.5), (0.9, 0.5), (0.8, 0.4), (0.7, 0.45)])]
    assert stop_epoch(rows, 2, select="val_loss") is None  # the loss keeps falling
    assert stop_epoch(rows, 2, select="val_acc") == 3  # no higher accuracy after epoch 1
    data = _data()
    result = train(_model(), data, TrainConfig(lr=0.05, epochs=40, batch_size=8, seed=SEED,
                                               select="val_acc", patience=3), progress=False)
    assert result.status == "early_stopped"
    assert result.epochs_run == stop_epoch(result.metrics, 3, select="val_acc")


class _Stop(Exception):
    pass


def test_resume_honours_select_and_steps_and_refuses_changing_them(tmp_path):
    data = _data()
    cfg = TrainConfig(lr=0.05, steps=8, batch_size=16, seed=SEED, select="val_acc")
    whole = _model()
    full = train(whole, data, cfg, progress=False)

    def stop(row):
        if row["epoch"] == 1:
            raise _Stop

    out = tmp_path / "run"
    with pytest.raises(_Stop):
        train(_model(), data, cfg, out_dir=out, progress=False, on_epoch=stop)
    again = _model()
    resumed = train(again, data, cfg, out_dir=out, resume=True, progress=False)
    strip = lambda ms: [{k: v for k, v in m.items() if k != "time_s"} for m in ms]  # noqa: E731
    assert strip(resumed.metrics) == strip(full.metrics) and resumed.best_epoch == full.best_epoch
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), whole.parameters()))
    for change, words in (({"select": "val_loss"}, "select: stored 'val_acc', new 'val_loss'"),
                          ({"steps": 9}, "steps: stored 8, new 9")):
        other = TrainConfig(**{**cfg.to_dict(), **change})
        with pytest.raises(ResumeError, match=words):
            train(_model(), data, other, out_dir=out, resume=True, progress=False)
    # a record written before select and steps existed holds their defaults
    old = TrainConfig(lr=0.05, epochs=2, batch_size=16, seed=SEED)
    out2 = tmp_path / "old"
    train(_model(), data, old, out_dir=out2, progress=False)
    record = json.loads((out2 / RUN_JSON).read_text())
    for key in ("select", "steps"):
        del record["train"][key]
    (out2 / RUN_JSON).write_text(json.dumps(record))
    more = TrainConfig(lr=0.05, epochs=3, batch_size=16, seed=SEED)
    assert train(_model(), data, more, out_dir=out2, resume=True, progress=False).epochs_run == 3


# ----------------------------------------------------------------------------- data


@pytest.mark.parametrize("name, opts", [("mnist1d", {}), ("digits", {"test_fraction": 0.2})])
def test_val_fraction_zero_keeps_every_training_row(name, opts):
    with_val = load_dataset(name, seed=0, val_fraction=0.25, **opts).sizes()
    d = load_dataset(name, seed=0, val_fraction=0, **opts)
    sizes = d.sizes()
    assert sizes["val"] == 0 and sizes["train"] == with_val["train"] + with_val["val"]
    assert sizes["test"] == with_val["test"]
    summary = d.summary()
    assert summary["cross_split_duplicates"] == 0 and sum(summary["class_balance"]["val"]) == 0


# ----------------------------------------------------------------------------- study config

_BASE = '[[datasets]]\nname = "digits"\nmodels = ["mlp"]\nhidden = [8]\n'


@pytest.mark.parametrize("text, words", [
    ('[train]\nselect = "best"\n' + _BASE, "train.select must be one of"),
    ('[train]\nsteps = 0\n' + _BASE, "train.steps must be an int >= 1"),
    ('[train]\nsteps = 10\nepochs = 2\n' + _BASE, "train: epochs and steps are exclusive"),
    ('[train]\nselect = "final"\npatience = 3\n' + _BASE,
     'train.patience must be 0 with select = "final"'),
    (_BASE + '[datasets.options]\nval_fraction = 0.0\n',
     "datasets[0].options.val_fraction = 0 leaves no validation split, which select = 'val_loss'"),
    (_BASE + '[datasets.train]\nsteps = 5\nepochs = 5\n', "datasets[0].train: epochs and steps"),
])
def test_study_config_refuses_bad_choices_naming_the_key(text, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace("[", r"\[")):
        loads(text)


def test_study_config_budgets_and_selection_round_trip():
    c = loads('[train]\nepochs = 7\nselect = "val_acc"\nweight_decay = 0.01\n' + _BASE
              + '[datasets.train]\nsteps = 30\nselect = "final"\n[datasets.options]\nval_fraction = 0\n'
              + _BASE + 'label = "second"\n')
    first, second = c.datasets
    assert first.train["steps"] == 30 and first.train["epochs"] is None
    assert first.train["select"] == "final" and first.options == {"val_fraction": 0}
    assert second.train["epochs"] == 7 and second.train["steps"] is None
    assert second.train["select"] == "val_acc" and second.train["weight_decay"] == 0.01
    assert loads(dumps(c)) == c
    assert first.train_config(3) == TrainConfig(lr=3e-3, steps=30, select="final",
                                                weight_decay=0.01, seed=3)


def test_a_config_without_the_new_options_keeps_its_record_and_fingerprints():
    plain = loads(_BASE)
    spelled = loads('[train]\nselect = "val_loss"\n' + _BASE)
    assert plain == spelled
    assert "select" not in plain.to_dict()["train"] and "steps" not in plain.to_dict()["train"]
    assert not {"select", "steps"} & set(expand(plain)[0].spec()["train"])
    chosen = loads('[train]\nselect = "val_acc"\n' + _BASE)
    assert expand(chosen)[0].fingerprint() != expand(plain)[0].fingerprint()


def test_overrides_set_the_option_for_the_whole_study():
    c = loads('[train]\nsteps = 50\n' + _BASE + '[datasets.train]\nepochs = 3\nselect = "val_acc"\n'
              + _BASE + 'label = "second"\n')
    o = with_overrides(c, epochs=4, select="final", val_fraction=0.0, weight_decay=0.1)
    for ds in o.datasets:
        assert (ds.train["epochs"], ds.train["steps"], ds.train["select"]) == (4, None, "final")
        assert ds.options["val_fraction"] == 0.0 and ds.train["weight_decay"] == 0.1
    s = with_overrides(o, steps=9)
    assert all((d.train["epochs"], d.train["steps"]) == (None, 9) for d in s.datasets)
    assert with_overrides(c) is c
    with pytest.raises(ConfigError, match=r"^--val-fraction 0.0: datasets\[0\].options.val_fraction"):
        with_overrides(c, val_fraction=0.0)
    anomaly = loads('[[datasets]]\nname = "anomaly"\nmodels = ["rnn"]\nhidden = [4]\n')
    with pytest.raises(ConfigError, match=r"--val-fraction 0.2: datasets\[0\] \('anomaly'\) has no"):
        with_overrides(anomaly, val_fraction=0.2)
    with pytest.raises(ConfigError, match="exclusive"):
        with_overrides(c, epochs=2, steps=3)


def test_presets_are_the_documented_studies():
    assert PRESETS == ("quick", "default", "mnist1d-baselines")
    assert preset("quick") is study_config.QUICK and preset("default") is study_config.DEFAULT
    with pytest.raises(ConfigError, match="preset must be one of 'quick', 'default'"):
        preset("fast")
    for name in ("quick", "default"):
        assert all(d.train["select"] == "val_acc" for d in preset(name).datasets)
    b = preset("mnist1d-baselines")
    assert b.seeds == (0, 1, 2) and loads(dumps(b)) == b
    assert {d.label: (d.models, d.hidden) for d in b.datasets} == {
        "mnist1d-mlp": (("resmlp", "resmlp_map"), ((100, 100),)),
        "mnist1d-cnn": (("cnn1d", "cnn1d_map"), ((25,),)),
        "mnist1d-gru": (("bigru", "bigru_map"), ((6,),)),
    }
    for d in b.datasets:
        assert d.name == "mnist1d" and d.options == {"val_fraction": 0.0, "standardize": False}
        cfg = d.train_config(0)
        assert (cfg.optimizer, cfg.lr, cfg.batch_size, cfg.steps, cfg.epochs, cfg.select,
                cfg.weight_decay, cfg.patience) == ("adam", 0.01, 100, 6000, None, "final", 0.0, None)
    assert parse_config(b.to_dict()) == b


# ----------------------------------------------------------------------------- command line


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("iternn: error: "), err
    return err[0]


_TRAIN = ["train", "--dataset", "digits", "--model", "resmlp", "--hidden", "8,8", "--quiet"]


def test_cli_train_takes_the_training_choices(tmp_path, capsys):
    out = tmp_path / "r"
    argv = _TRAIN + ["--select", "final", "--val-fraction", "0", "--steps", "5",
                     "--weight-decay", "0.01", "--out", str(out)]
    assert cli_main(argv) == EXIT_OK
    summary = json.loads(capsys.readouterr().out.splitlines()[0])
    assert summary["status"] == "ok" and summary["epochs_run"] == 1 and summary["best_epoch"] == 1
    stored = json.loads((out / RUN_JSON).read_text())
    assert (stored["train"]["select"], stored["train"]["steps"], stored["train"]["epochs"],
            stored["train"]["weight_decay"]) == ("final", 5, None, 0.01)
    assert stored["options"]["val_fraction"] == 0
    assert cli_main(argv + ["--resume"]) == EXIT_OK  # the same run: nothing to do
    assert json.loads(capsys.readouterr().out.splitlines()[0])["test_acc"] == summary["test_acc"]
    assert cli_main(_TRAIN + ["--select", "val_acc", "--val-fraction", "0.2", "--steps", "5",
                              "--out", str(out), "--resume"]) == EXIT_USAGE
    line = _err_line(capsys)
    assert "select: stored 'final', new 'val_acc'" in line and "val_fraction: stored 0.0" in line


def _exit_code(argv) -> int:
    """The exit code of ``iternn ARGV``, a usage error that argparse reports included."""
    try:
        return cli_main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("extra, words", [
    (["--epochs", "2", "--steps", "3"], "argument --steps: not allowed with argument --epochs"),
    (["--val-fraction", "0"], "--val-fraction 0 leaves no validation split, which --select val_loss"),
    (["--val-fraction", "1"], "argument --val-fraction: must be in [0, 1)"),
    (["--select", "final", "--patience", "2"], "TrainConfig.patience must be None with select='final'"),
    (["--select", "best"], "argument --select: invalid choice: 'best'"),
])
def test_cli_train_refuses_bad_choices_naming_the_flag(tmp_path, capsys, extra, words):
    assert _exit_code(_TRAIN + extra + ["--out", str(tmp_path / "r")]) == EXIT_USAGE
    assert words in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_cli_train_val_fraction_needs_a_dataset_that_has_one(tmp_path, capsys):
    assert cli_main(["train", "--dataset", "anomaly", "--model", "rnn", "--val-fraction", "0.1",
                     "--out", str(tmp_path / "r")]) == EXIT_USAGE
    assert "--val-fraction: dataset 'anomaly' has no validation fraction" in _err_line(capsys)


def test_cli_study_presets_and_overrides(tmp_path, capsys):
    cfg = tmp_path / "s.toml"
    cfg.write_text('name = "sel"\nseeds = [0]\n' + _BASE)
    out = tmp_path / "s"
    assert cli_main(["study", "--config", str(cfg), "--out", str(out), "--select", "final",
                     "--steps", "3", "--val-fraction", "0", "--no-pictures", "--quiet"]) == EXIT_OK
    capsys.readouterr()
    report = (out / "report.md").read_text()
    assert 'Selection `select = "final"`: test metrics of the final weights' in report
    assert "3 optimizer steps" in report and "no validation split (val_fraction = 0)" in report
    assert study_config.load_config(out / "config.toml").datasets[0].train["steps"] == 3
    for argv, words in (
        (["--preset", "quick", "--quick"], "argument --quick: not allowed with argument --preset"),
        (["--preset", "slow"], "argument --preset: invalid choice: 'slow'"),
        (["--config", str(cfg), "--epochs", "2", "--steps", "3"], "not allowed with argument"),
        (["--config", str(cfg), "--val-fraction", "0"],
         "--val-fraction 0.0: datasets[0].options.val_fraction = 0 leaves no validation split"),
    ):
        assert _exit_code(["study", *argv, "--out", str(tmp_path / "x")]) == EXIT_USAGE
        assert words in capsys.readouterr().err
