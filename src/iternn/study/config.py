"""Study configuration: a TOML file describing a grid, validated strictly.

A study is a grid ``datasets x budgets (hidden) x models x densities x seeds`` plus the
training options. Everything has a default; unknown keys and bad values raise
:class:`ConfigError` (a ``ValueError``) whose message starts with the key path, e.g.
``train.lr must be > 0, got -1`` or ``datasets[1].models[0]: unknown model 'mpl'``.

Format (every key optional except ``datasets[].name``)::

    name = "my-study"          # used in the report title
    seeds = [0, 1, 2]          # model-init + batch-order seeds (TrainConfig.seed)
    data_seed = 0              # fixes the dataset splits (the same for every run)
    threads = 1                # torch intra-op threads per run
    jobs = 1                   # parallel processes (the --jobs option overrides it)

    [train]                    # iternn.study.train.TrainConfig, except `seed`
    optimizer = "adam"         # adam | adamw | sgd
    lr = 0.003
    weight_decay = 0.0
    momentum = 0.0             # sgd only
    epochs = 20                # or: steps = 6000 (optimizer steps; not both in one table)
    batch_size = 64
    select = "val_loss"        # val_loss | val_acc | final: the weights a run ends with
    patience = 0               # early stopping on the select criterion; 0 = off
    loss_on = "last"           # last | all (every application of a map)
    max_grad_norm = 0          # 0 = no clipping
    lr_schedule = "constant"   # constant | cosine
    device = "cpu"             # cpu | cuda | cuda:N | auto
    tensorboard = false        # also TensorBoard events in runs/<run_id>/tensorboard

    [[datasets]]
    name = "digits"            # a name of iternn.study.data.DATASETS (required)
    label = "digits"           # unique label in run ids and the report (default: name)
    models = ["mlp", "mlp_map", "dense_map", "sparse_map"]
    densities = [0.1, 0.25, 0.5]
    hidden = [32, 64]          # budgets: an int = one hidden layer, a list = widths
    extra_steps = [0, 1]       # dense_map/sparse_map: applications beyond the MLP's depth
    activation = "relu"
    seeds = [0, 1]             # overrides the top-level seeds for this dataset
    [datasets.options]         # keyword options of load_dataset (checked by name)
    val_fraction = 0.2         # 0: no validation split (needs select = "final")
    [datasets.train]           # overrides of [train] for this dataset
    epochs = 30

Defaults per task: flat datasets (classification/regression) run ``mlp, mlp_map,
dense_map, sparse_map`` at ``hidden = [32]``, activation ``relu``, densities ``[0.1,
0.25, 0.5]``; the sequence dataset ``anomaly`` runs ``forced_map, rnn, gru, lstm`` at
``hidden = [32]`` (the forced map's width), activation ``tanh``, densities ``[0.1,
0.25, 0.5, 1.0]``. Densities apply to the families that take one (``sparse_map``:
``0 < d < 1`` — density 1 is ``dense_map``; ``forced_map``: ``0 < d <= 1``, 1 = dense).
``extra_steps`` (default ``[0]``) runs ``dense_map`` and ``sparse_map`` once per entry,
iterated that many applications more than ``matched_map``'s default (the MLP's number of
layers). It matters: with the default, the six-block map of a one-hidden-layer MLP runs 2
applications and its ``h <- h`` and ``h <- y`` blocks never reach the output — dead
parameters that at low density hold most of the budget
(:func:`iternn.study.models.live_trainable`); with one extra step every block is live.

**Budget and selection.** ``epochs`` and ``steps`` are exclusive in one table; a more
specific table's choice replaces the other (a dataset's ``steps`` replaces the top-level
``epochs``). ``select`` picks the weights whose test metrics the report shows
(:class:`~iternn.study.train.TrainConfig`): the epoch of lowest validation loss, of highest
validation accuracy, or the final weights. A dataset option ``val_fraction = 0`` (no
validation split) needs ``select = "final"`` and no ``patience``.

**Built-in studies** (:data:`PRESETS`, ``iternn study --preset NAME``), validated on first
use; the comment above them in the source gives their expected run time:

* ``quick`` (:data:`QUICK`, ``iternn study --quick``): digits and a small anomaly task.
* ``default`` (:data:`DEFAULT`, ``iternn study``): MNIST-1D, digits and the anomaly task.
  Both select the epoch of highest validation accuracy (and stop early on it): every
  claim the report reads compares test *accuracy*, so the weights are chosen by that
  score on the validation split, the same rule for every family. The rule is not what
  keeps the default study's MNIST-1D MLPs near 56-58 % (on a sample of default-study runs
  it moved test accuracy by -2 to +3 points): its one-hidden-layer MLPs train for a few
  dozen epochs at lr 0.003 before early stopping, where the published recipe trains a
  residual 40-100-100-10 network for 6000 steps at lr 0.01 (``mnist1d-baselines``).
* ``mnist1d-baselines`` (:data:`BASELINES`): the published MNIST-1D baselines through this
  trainer with the published recipe — the residual MLP 40-100-100-10 (``resmlp``), the
  1-D CNN (``cnn1d``, 25 channels) and the bidirectional GRU (``bigru``, width 6), each
  also as its exact map (``resmlp_map``, ``cnn1d_map``: ``from_module``; ``bigru_map``:
  ``from_gru``); Adam at lr 0.01, batch 100, 6000 steps, no weight decay, the generator's
  features as they are (``standardize = false``), all 4000 training samples
  (``val_fraction = 0``) and the final weights (``select = "final"``); 3 seeds. One
  difference remains: batches are drawn from a fresh shuffle each epoch, where the
  published loop walks the training set in order.

``train.tensorboard = true`` writes each run's per-epoch scalars as TensorBoard events
(:func:`iternn.study.train.train`, ``tensorboard=True``; needs ``pip install
'iternn[tensorboard]'``: the sweep stops before its first run if the package is
missing). It is logging, not part of a run's definition: switching it does not rerun
finished runs (they keep whatever events they have).

TOML is read with :mod:`tomllib`;
:func:`dumps` writes a config back (what the report folder keeps as ``config.toml``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, MapTypeError

__all__ = [
    "ConfigError",
    "DatasetSpec",
    "StudyConfig",
    "QUICK",
    "DEFAULT",
    "BASELINES",
    "PRESETS",
    "DATASET_TASKS",
    "TRAIN_DEFAULTS",
    "dumps",
    "load_config",
    "loads",
    "parse_config",
    "preset",
    "with_overrides",
]


#: Task of each dataset of :data:`iternn.study.data.DATASETS` (known without loading it).
DATASET_TASKS: dict[str, str] = {
    "mnist1d": "classification",
    "digits": "classification",
    "regression": "regression",
    "anomaly": "sequence",
    "mnist_idx": "classification",
}

#: The training options of a study and their defaults (TrainConfig minus ``seed``, plus
#: ``tensorboard``; ``patience = 0`` and ``max_grad_norm = 0`` mean "off"; ``steps =
#: None``: the budget is ``epochs``, and ``epochs = None`` when ``steps`` is set).
TRAIN_DEFAULTS: dict[str, Any] = {
    "optimizer": "adam",
    "lr": 3e-3,
    "weight_decay": 0.0,
    "momentum": 0.0,
    "epochs": 20,
    "batch_size": 64,
    "patience": 0,
    "loss_on": "last",
    "max_grad_norm": 0.0,
    "lr_schedule": "constant",
    "device": "cpu",
    "tensorboard": False,
    "select": "val_loss",
    "steps": None,
}
#: Training options added after the first study records, with the value that means
#: "as before": left out of :meth:`StudyConfig.to_dict` (and so of ``study.json`` and the
#: run fingerprints) at that value, so that folders written before them stay valid.
ADDED_TRAIN_DEFAULTS: dict[str, Any] = {"select": "val_loss", "steps": None}

_TOP_KEYS = ("name", "seeds", "data_seed", "threads", "jobs", "train", "datasets")
_DATASET_KEYS = ("name", "label", "options", "models", "densities", "hidden", "extra_steps",
                 "activation", "seeds", "train")
_LABEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")
_FLAT_MODELS = ("mlp", "mlp_map", "dense_map", "sparse_map")
_SEQ_MODELS = ("forced_map", "rnn", "gru", "lstm")


# --------------------------------------------------------------------------- data classes


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset of the grid, every default filled in (see the module docstring)."""

    name: str
    label: str
    task: str
    options: dict[str, Any]
    models: tuple[str, ...]
    densities: tuple[float, ...]
    hidden: tuple[tuple[int, ...], ...]
    extra_steps: tuple[int, ...]
    activation: str
    seeds: tuple[int, ...]
    train: dict[str, Any]  # the full training options for this dataset (no seed)

    def train_config(self, seed: int):
        """The :class:`~iternn.study.train.TrainConfig` of a run with ``seed``."""
        return train_config(self.train, seed)


@dataclass(frozen=True)
class StudyConfig:
    """A validated study: build with :func:`parse_config` / :func:`load_config`."""

    name: str
    seeds: tuple[int, ...]
    data_seed: int
    threads: int
    jobs: int
    train: dict[str, Any]
    datasets: tuple[DatasetSpec, ...]

    def to_dict(self) -> dict[str, Any]:
        """Plain data that :func:`parse_config` turns back into an equal config."""
        out: dict[str, Any] = {"name": self.name, "seeds": list(self.seeds),
                               "data_seed": self.data_seed, "threads": self.threads,
                               "jobs": self.jobs, "train": _plain_train(self.train),
                               "datasets": []}
        for d in self.datasets:
            entry: dict[str, Any] = {
                "name": d.name, "label": d.label, "models": list(d.models),
                "densities": list(d.densities),
                "hidden": [h[0] if len(h) == 1 else list(h) for h in d.hidden],
                "activation": d.activation,
            }
            if d.extra_steps != (0,):
                entry["extra_steps"] = list(d.extra_steps)
            if d.seeds != self.seeds:
                entry["seeds"] = list(d.seeds)
            if d.options:
                entry["options"] = dict(d.options)
            over = {k: v for k, v in d.train.items() if self.train.get(k) != v and v is not None}
            if over:
                entry["train"] = over
            out["datasets"].append(entry)
        return out

    def replace(self, **changes: Any) -> StudyConfig:
        return dataclasses.replace(self, **changes)


def _plain_train(train: Mapping[str, Any]) -> dict[str, Any]:
    """Training options as config data: ``None`` left out (TOML has none; the missing key
    means the same), and the later options at their "as before" values left out."""
    return {k: v for k, v in train.items()
            if v is not None and not (k in ADDED_TRAIN_DEFAULTS and ADDED_TRAIN_DEFAULTS[k] == v)}


# --------------------------------------------------------------------------- checks


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _err(path: str, what: str, value: Any) -> ConfigError:
    return ConfigError(f"{path} must be {what}, got {value!r}")


def _table(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _err(path, "a table", value)
    return value


def _unknown(table: Mapping[str, Any], known: tuple[str, ...], path: str) -> None:
    for key in table:
        if key not in known:
            where = f"{path}.{key}" if path else str(key)
            raise ConfigError(f"{where}: unknown key (known keys: {', '.join(known)})")


def _int(v: Any, path: str, lo: int) -> int:
    if not _is_int(v) or v < lo:
        raise _err(path, f"an int >= {lo}", v)
    return int(v)


def _str(v: Any, path: str) -> str:
    if not isinstance(v, str) or not v:
        raise _err(path, "a non-empty string", v)
    return v


def _choice(v: Any, path: str, choices: tuple[str, ...]) -> str:
    if v not in choices:
        raise _err(path, "one of " + ", ".join(repr(c) for c in choices), v)
    return v


def _seeds(v: Any, path: str) -> tuple[int, ...]:
    if not isinstance(v, list) or not v:
        raise _err(path, "a non-empty list of ints >= 0", v)
    out = tuple(_int(s, f"{path}[{i}]", 0) for i, s in enumerate(v))
    if len(set(out)) != len(out):
        raise _err(path, "a list of distinct seeds", v)
    return out


def _check_train(table: Any, path: str, base: dict[str, Any]) -> dict[str, Any]:
    t = _table(table, path)
    for key in t:
        if key == "seed":
            raise ConfigError(f"{path}.seed: not allowed here; seeds come from the grid's `seeds` list")
    _unknown(t, tuple(TRAIN_DEFAULTS), path)
    out = dict(base)
    for key, v in t.items():
        p = f"{path}.{key}"
        if key in ("optimizer", "loss_on", "lr_schedule", "select"):
            choices = {"optimizer": ("adam", "adamw", "sgd"), "loss_on": ("last", "all"),
                       "lr_schedule": ("constant", "cosine"),
                       "select": ("val_loss", "val_acc", "final")}[key]
            out[key] = _choice(v, p, choices)
        elif key == "lr":
            if not _is_num(v) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"{p} must be > 0, got {v!r}")
            out[key] = float(v)
        elif key in ("weight_decay", "max_grad_norm"):
            if not _is_num(v) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"{p} must be >= 0, got {v!r}")
            out[key] = float(v)
        elif key == "momentum":
            if not _is_num(v) or not 0 <= v < 1:
                raise _err(p, "a number in [0, 1)", v)
            out[key] = float(v)
        elif key in ("epochs", "batch_size", "steps"):
            out[key] = _int(v, p, 1)
        elif key == "patience":
            out[key] = _int(v, p, 0)
        elif key == "tensorboard":
            if not isinstance(v, bool):
                raise _err(p, "true or false", v)
            out[key] = v
        elif key == "device":
            if not isinstance(v, str) or not re.fullmatch(r"cpu|auto|cuda(:\d+)?|mps", v):
                raise _err(p, "'cpu', 'cuda', 'cuda:N', 'mps' or 'auto'", v)
            out[key] = v
    if "epochs" in t and "steps" in t:
        raise ConfigError(f"{path}: epochs and steps are exclusive budgets, got epochs = "
                          f"{t['epochs']!r} and steps = {t['steps']!r} (give one)")
    if "steps" in t:  # the step budget replaces the epochs of a less specific table
        out["epochs"] = None
    elif "epochs" in t:
        out["steps"] = None
    if out["select"] == "final" and out["patience"]:
        raise ConfigError(f"{path}.patience must be 0 with select = \"final\" (early stopping "
                          f"watches a validation criterion), got {out['patience']!r}")
    try:  # whatever TrainConfig itself refuses, named here
        train_config(out, 0)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path}: {e}") from None
    return out


def train_config(options: Mapping[str, Any], seed: int):
    """A :class:`~iternn.study.train.TrainConfig` from study train options and a seed."""
    from .train import TrainConfig

    kw = dict(options)
    kw["patience"] = kw.get("patience") or None
    kw["max_grad_norm"] = kw.get("max_grad_norm") or None
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in kw.items() if k in known}, seed=seed)


def _check_hidden(v: Any, path: str, task: str) -> tuple[tuple[int, ...], ...]:
    items = v if isinstance(v, list) else [v]
    if not items:
        raise _err(path, "a non-empty list of budgets", v)
    out = []
    for i, h in enumerate(items):
        p = f"{path}[{i}]" if isinstance(v, list) else path
        if _is_int(h):
            widths: tuple[int, ...] = (h,)
        elif isinstance(h, list) and h and all(_is_int(w) for w in h):
            widths = tuple(h)
        else:
            raise _err(p, "an int (one hidden layer) or a non-empty list of ints (the widths)", h)
        if any(w < 1 for w in widths):
            raise _err(p, "hidden widths >= 1", h)
        if task == "sequence" and len(widths) != 1:
            raise _err(p, "one int (the forced map's hidden width) for a sequence dataset", h)
        out.append(widths)
    if len(set(out)) != len(out):
        raise _err(path, "distinct budgets", v)
    return tuple(out)


def _check_dataset(entry: Any, path: str, top: dict[str, Any]) -> DatasetSpec:
    from .data import DATASETS, dataset_options
    from .models import ACTIVATIONS, FAMILIES, SEQUENCE_ACTIVATIONS

    e = _table(entry, path)
    _unknown(e, _DATASET_KEYS, path)
    if "name" not in e:
        raise ConfigError(f"{path}.name: missing (the dataset, one of {', '.join(sorted(DATASETS))})")
    name = e["name"]
    if name not in DATASETS:
        raise _err(f"{path}.name", "one of " + ", ".join(repr(n) for n in sorted(DATASETS)), name)
    task = DATASET_TASKS.get(name, "classification")
    label = e.get("label", name)
    if not isinstance(label, str) or not _LABEL_RE.match(label):
        raise _err(f"{path}.label", "a label of letters, digits, '_', '.', '-'", label)
    options = dict(_table(e.get("options", {}), f"{path}.options"))
    valid = dataset_options(name)
    for key in options:
        if key not in valid:
            raise ConfigError(f"{path}.options.{key}: unknown option of dataset {name!r} "
                              f"(valid: {', '.join(valid) or 'none'})")
    flat = task != "sequence"
    models_v = e.get("models", list(_FLAT_MODELS if flat else _SEQ_MODELS))
    if not isinstance(models_v, list) or not models_v:
        raise _err(f"{path}.models", "a non-empty list of model names", models_v)
    models = []
    for i, m in enumerate(models_v):
        p = f"{path}.models[{i}]"
        fam = FAMILIES.get(m) if isinstance(m, str) else None
        if fam is None:
            raise ConfigError(f"{p}: unknown model {m!r} (known: {', '.join(FAMILIES)})")
        if task not in fam.tasks:
            raise ConfigError(f"{p}: model {m!r} serves {'/'.join(fam.tasks)} datasets, and "
                              f"{name!r} is a {task} dataset")
        if m in models:
            raise ConfigError(f"{p}: model {m!r} is listed twice")
        models.append(m)
    dens_v = e.get("densities", [0.1, 0.25, 0.5] if flat else [0.1, 0.25, 0.5, 1.0])
    if not isinstance(dens_v, list) or not dens_v:
        raise _err(f"{path}.densities", "a non-empty list of numbers in (0, 1]", dens_v)
    densities = []
    takes = [FAMILIES[m] for m in models if FAMILIES[m].density != "none"]
    for i, d in enumerate(dens_v):
        p = f"{path}.densities[{i}]"
        if not _is_num(d) or not 0 < d <= 1:
            raise _err(p, "a number in (0, 1]", d)
        if d == 1 and any(f.density == "sparse" for f in takes):
            sparse = [f.name for f in takes if f.density == "sparse"]
            raise ConfigError(f"{p}: density 1 is not sparse: {', '.join(sparse)} needs 0 < d < 1 "
                              "(list 'dense_map' for the dense map)")
        densities.append(float(d))
    if len(set(densities)) != len(densities):
        raise _err(f"{path}.densities", "distinct densities", dens_v)
    hidden = _check_hidden(e.get("hidden", [32]), f"{path}.hidden", task)
    ex_v = e.get("extra_steps", [0])
    if not isinstance(ex_v, list) or not ex_v:
        raise _err(f"{path}.extra_steps", "a non-empty list of ints >= 0", ex_v)
    extra = tuple(_int(x, f"{path}.extra_steps[{i}]", 0) for i, x in enumerate(ex_v))
    if len(set(extra)) != len(extra):
        raise _err(f"{path}.extra_steps", "distinct numbers", ex_v)
    if extra != (0,) and not any(FAMILIES[m].iterated for m in models):
        iterated = ", ".join(f.name for f in FAMILIES.values() if f.iterated)
        raise ConfigError(f"{path}.extra_steps: only {iterated} take extra steps, and none is in "
                          f"{path}.models")
    act_default = "relu" if flat else "tanh"
    activation = e.get("activation", act_default)
    allowed = tuple(ACTIVATIONS) if flat else SEQUENCE_ACTIVATIONS
    activation = _choice(activation, f"{path}.activation", allowed)
    seeds = _seeds(e["seeds"], f"{path}.seeds") if "seeds" in e else top["seeds"]
    train = _check_train(e.get("train", {}), f"{path}.train", top["train"])
    vf = options.get("val_fraction")
    if _is_num(vf) and vf == 0 and train["select"] != "final":
        raise ConfigError(f"{path}.options.val_fraction = 0 leaves no validation split, which "
                          f"select = {train['select']!r} chooses the weights on (set "
                          "train.select = \"final\", or a val_fraction > 0)")
    return DatasetSpec(name=name, label=label, task=task, options=options, models=tuple(models),
                       densities=tuple(sorted(densities)), hidden=hidden,
                       extra_steps=tuple(sorted(extra)), activation=activation,
                       seeds=seeds, train=train)


def parse_config(data: Mapping[str, Any]) -> StudyConfig:
    """Validate a config given as plain data (what TOML parses to)."""
    t = _table(data, "config")
    _unknown(t, _TOP_KEYS, "")
    top: dict[str, Any] = {}
    top["name"] = _str(t.get("name", "study"), "name")
    top["seeds"] = _seeds(t.get("seeds", [0, 1, 2]), "seeds")
    top["data_seed"] = _int(t.get("data_seed", 0), "data_seed", 0)
    top["threads"] = _int(t.get("threads", 1), "threads", 1)
    top["jobs"] = _int(t.get("jobs", 1), "jobs", 1)
    top["train"] = _check_train(t.get("train", {}), "train", TRAIN_DEFAULTS)
    ds = t.get("datasets")
    if ds is None:
        raise ConfigError("datasets: missing (at least one [[datasets]] table)")
    if not isinstance(ds, list) or not ds:
        raise _err("datasets", "a non-empty array of tables ([[datasets]])", ds)
    specs = tuple(_check_dataset(e, f"datasets[{i}]", top) for i, e in enumerate(ds))
    labels = [s.label for s in specs]
    for i, lab in enumerate(labels):
        if lab in labels[:i]:
            raise ConfigError(f"datasets[{i}].label: {lab!r} is used twice (give each entry its own label)")
    return StudyConfig(name=top["name"], seeds=top["seeds"], data_seed=top["data_seed"],
                       threads=top["threads"], jobs=top["jobs"], train=top["train"], datasets=specs)


# --------------------------------------------------------------------------- TOML


def loads(text: str) -> StudyConfig:
    """Parse and validate TOML text."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"not valid TOML: {e}") from None
    return parse_config(data)


def load_config(path: str | Path) -> StudyConfig:
    """Read and validate a TOML config file (errors name the file and the key)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {p} is not UTF-8 text (byte {e.start}): not a TOML "
                          "config") from None
    try:
        return loads(text)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        r = repr(v)
        return r if any(c in r for c in ".en") else r + ".0"
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_value(x)}" for k, x in v.items()) + "}"
    raise MapTypeError(f"cannot write {type(v).__name__} to TOML")


def dumps(config: StudyConfig) -> str:
    """The config as TOML text; ``loads(dumps(c)) == c``."""
    d = config.to_dict()
    lines = [f"{k} = {_value(d[k])}" for k in ("name", "seeds", "data_seed", "threads", "jobs")]
    lines += ["", "[train]"] + [f"{k} = {_value(v)}" for k, v in d["train"].items()]
    for e in d["datasets"]:
        lines += ["", "[[datasets]]"]
        lines += [f"{k} = {_value(v)}" for k, v in e.items() if k not in ("options", "train")]
        for sub in ("options", "train"):
            if sub in e:
                lines += [f"[datasets.{sub}]"] + [f"{json.dumps(str(k))} = {_value(v)}"
                                                  for k, v in e[sub].items()]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- built-ins

_QUICK_DICT: dict[str, Any] = {
    "name": "quick",
    "seeds": [0, 1, 2],
    "jobs": 2,
    "train": {"epochs": 15, "lr": 3e-3, "batch_size": 64, "select": "val_acc"},
    "datasets": [
        {"name": "digits", "models": ["mlp", "mlp_map", "dense_map", "sparse_map"],
         "densities": [0.1, 0.5], "hidden": [16, 32, 64], "extra_steps": [0, 1]},
        {"name": "anomaly", "models": ["forced_map", "rnn", "lstm"], "densities": [0.5, 1.0],
         "hidden": [24], "options": {"n_train": 2000, "n_val": 400, "n_test": 400},
         "train": {"epochs": 15, "lr": 1e-2}},
    ],
}

_DEFAULT_DICT: dict[str, Any] = {
    "name": "default",
    "seeds": [0, 1, 2],
    "jobs": 2,
    "train": {"epochs": 100, "lr": 3e-3, "batch_size": 64, "patience": 15, "select": "val_acc"},
    "datasets": [
        {"name": "mnist1d", "models": ["mlp", "mlp_map", "dense_map", "sparse_map"],
         "densities": [0.05, 0.1, 0.2, 0.35, 0.5, 0.75], "hidden": [32, 64, 128],
         "extra_steps": [0, 1]},
        {"name": "digits", "models": ["mlp", "mlp_map", "dense_map", "sparse_map"],
         "densities": [0.05, 0.1, 0.2, 0.35, 0.5, 0.75], "hidden": [16, 32, 64],
         "extra_steps": [0, 1]},
        {"name": "anomaly", "models": ["forced_map", "rnn", "gru", "lstm"],
         "densities": [0.1, 0.25, 0.5, 1.0], "hidden": [32], "train": {"epochs": 60}},
    ],
}

# The quick study (``iternn study --quick``, ``make demo``): digits at three budgets
# (hidden 16, 32, 64) with mlp, mlp_map, dense_map and sparse_map at densities 0.1 and 0.5,
# the maps at the default number of applications and one more (``extra_steps = [0, 1]``),
# 3 seeds, 15 epochs; plus a small anomaly run (2000 training sequences, the forced map at
# density 0.5 and 1 against nn.RNN and nn.LSTM, 3 seeds, 15 epochs at lr 0.01). 84 runs in 2
# processes; the weights of the epoch of highest validation accuracy. Measured on the 2-core
# development machine (shared, partly loaded): 81 s for the sweep, 92 s for the whole command
# including the report (selecting by validation loss; by accuracy, as now: 102 s and 110 s
# under a heavier load).
#
# The default study (``iternn study``): MNIST-1D (hidden 32, 64, 128) and digits (hidden
# 16, 32, 64) with mlp, mlp_map, dense_map and sparse_map at six densities (0.05 ... 0.75),
# the maps at the default number of applications and one more; the anomaly task (3000
# training sequences) with the forced map at densities 0.1, 0.25, 0.5 and 1 against nn.RNN,
# nn.GRU and nn.LSTM; 3 seeds; up to 100 epochs (60 for anomaly) with early stopping
# (patience 15), the weights of the epoch of highest validation accuracy. 309 runs in 2
# processes. Measured on the 2-core development machine (shared, load 2-3 for part of the
# run): 27 minutes for the sweep (1616 s), 27.2 for the whole command; the MNIST-1D sparse
# maps take 61 % of the summed run time (3193 s). Re-run on a quiet machine with the
# current kernels: 19.2 minutes for the whole command (sweep 1134 s), summed run time
# 2221 s, of which the MNIST-1D sparse maps again 61 %: every family ran 0.70x its earlier
# time, so the machine, not the kernels, made most of the difference; every number the
# README reads from the study came out the same. Before the engine skipped structural
# zeros and dead applications and fused the sparse products, the same study selecting by
# validation loss (which stops earlier: 1.28x fewer epochs on nine sampled runs) took 34
# minutes.
#
# The MNIST-1D baselines (``iternn study --preset mnist1d-baselines``): 18 runs of 6000
# steps in 2 processes, 34 minutes on the same machine while it was shared (load 4-6 on
# its 2 cores); the mean training time of one run there: resmlp 89 s, resmlp_map 91 s,
# cnn1d 192 s, cnn1d_map 165 s, bigru 441 s, bigru_map 317 s (the GRU written as maps runs
# faster than nn.GRU's CPU kernel, whose backward dominates).
_RAW_MNIST1D = {"val_fraction": 0.0, "standardize": False}
_BASELINES_DICT: dict[str, Any] = {
    "name": "mnist1d-baselines",
    "seeds": [0, 1, 2],
    "jobs": 2,
    "train": {"optimizer": "adam", "lr": 1e-2, "weight_decay": 0.0, "batch_size": 100,
              "steps": 6000, "select": "final"},
    "datasets": [
        {"name": "mnist1d", "label": "mnist1d-mlp", "models": ["resmlp", "resmlp_map"],
         "hidden": [[100, 100]], "options": _RAW_MNIST1D},
        {"name": "mnist1d", "label": "mnist1d-cnn", "models": ["cnn1d", "cnn1d_map"],
         "hidden": [25], "options": _RAW_MNIST1D},
        {"name": "mnist1d", "label": "mnist1d-gru", "models": ["bigru", "bigru_map"],
         "hidden": [6], "options": _RAW_MNIST1D},
    ],
}

QUICK: StudyConfig  # built by __getattr__ on first use
DEFAULT: StudyConfig
BASELINES: StudyConfig
#: The built-in studies of ``iternn study --preset NAME`` (:func:`preset`).
PRESETS = ("quick", "default", "mnist1d-baselines")
_BUILT_INS = {"QUICK": _QUICK_DICT, "DEFAULT": _DEFAULT_DICT, "BASELINES": _BASELINES_DICT}
_PRESET_NAMES = dict(zip(PRESETS, _BUILT_INS))
_built: dict[str, StudyConfig] = {}


def __getattr__(name: str) -> StudyConfig:
    """``QUICK``, ``DEFAULT`` and ``BASELINES``, validated on first use (validating needs
    the data and model registries, which import torch: a config error must not wait for it)."""
    if name not in _BUILT_INS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _built:
        _built[name] = parse_config(_BUILT_INS[name])
    return _built[name]


def preset(name: str) -> StudyConfig:
    """The built-in study ``name`` (one of :data:`PRESETS`)."""
    if name not in _PRESET_NAMES:
        raise ConfigError(f"preset must be one of {', '.join(map(repr, PRESETS))}, got {name!r}")
    return __getattr__(_PRESET_NAMES[name])


def with_overrides(config: StudyConfig, *, select: str | None = None,
                   weight_decay: float | None = None, epochs: int | None = None,
                   steps: int | None = None, patience: int | None = None,
                   val_fraction: float | None = None) -> StudyConfig:
    """``config`` with training options (and the dataset option ``val_fraction``) set for
    the whole study, as the command line's flags do: each given option replaces the
    top-level value and every dataset's own; ``epochs`` replaces the step budget and
    ``steps`` the epochs. ``None``: unchanged. The result is validated again; a
    :class:`ConfigError` names the flags (``--select``, ...) and then the key at fault.
    """
    given = {k: v for k, v in (("select", select), ("weight_decay", weight_decay),
                               ("epochs", epochs), ("steps", steps), ("patience", patience),
                               ("val_fraction", val_fraction)) if v is not None}
    if not given:
        return config
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in given.items())
    if "epochs" in given and "steps" in given:
        raise ConfigError(f"{flags}: epochs and steps are exclusive budgets (give one)")
    data = config.to_dict()
    train_keys = {k: v for k, v in given.items() if k != "val_fraction"}
    budget = {"epochs": "steps", "steps": "epochs"}
    for table in [data["train"]] + [e.get("train", {}) for e in data["datasets"]]:
        for key in train_keys:
            table.pop(key, None)
            table.pop(budget.get(key, key), None)
    data["train"].update(train_keys)
    if "val_fraction" in given:
        from .data import dataset_options

        for i, entry in enumerate(data["datasets"]):
            if "val_fraction" not in dataset_options(entry["name"]):
                raise ConfigError(f"{flags}: datasets[{i}] ({entry['name']!r}) has no "
                                  "val_fraction option")
            entry["options"] = {**entry.get("options", {}), "val_fraction": val_fraction}
    try:
        return parse_config(data)
    except ConfigError as e:
        raise ConfigError(f"{flags}: {e}") from None
