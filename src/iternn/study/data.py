"""Datasets for the sparsity study, offline by default.

``load_dataset(name, *, seed=0, **options) -> Dataset`` builds one of the datasets in the
registry :data:`DATASETS`. Every dataset comes as fixed train / validation / test splits
of torch tensors:

* ``x``: ``float32``, shape ``(N, features)``, or ``(N, T, features)`` for sequences;
* ``y``: ``int64`` class labels of shape ``(N,)`` (classification and sequence tasks) or
  ``float32`` targets of shape ``(N, outputs)`` (regression).

Datasets
--------
``"mnist1d"``
    MNIST-1D (Greydanus 2020), generated locally by the ``mnist1d`` package's generator
    (``mnist1d.data.make_dataset``) with the published arguments, pinned here
    (:data:`MNIST1D_ARGS`: 5000 samples, ``train_split=0.8``, generator seed 42). The
    package's download path is never used, so nothing touches the network. The generator's
    4000 train / 1000 test samples are kept as generated; the validation split is a seeded,
    class-stratified ``val_fraction`` (default 10 %) of the generator's train split
    (``val_fraction=0``: none, all 4000 train, as the published baselines trained).
    ``seed`` chooses that validation split; ``generator_seed`` (default 42, the published
    data) chooses the data themselves. The generator seeds numpy's and Python's *global*
    random generators; the loader saves and restores both around the call (under a lock),
    so the caller's global random state is unchanged. 40 features, 10 classes.
``"digits"``
    scikit-learn's bundled 8x8 digits (1797 images, no download; 64 features with values
    0..16, 10 classes), split by ``seed`` into train / validation / test with fractions
    ``1 - val_fraction - test_fraction`` / ``val_fraction`` / ``test_fraction`` (default
    60 / 20 / 20), class-stratified.
``"regression"``
    A synthetic nonlinear regression set: ``x ~ N(0, I)`` with ``n_features`` features and
    ``y = tanh(x W1 + b1) W2 + noise * e`` with a random teacher (``W1 ~ N(0, 1.5^2 /
    n_features)``, ``b1 ~ U(-1, 1)``, ``W2 ~ N(0, 1 / hidden)``) and ``e ~ N(0, I)``.
    ``seed`` draws the teacher and the data. Targets are ``float32 (N, n_outputs)`` and are
    not rescaled.
``"anomaly"``
    The odd-one-out sequence task (see *Anomaly sequences* below). ``task="sequence"``,
    ``x`` of shape ``(N, length, features)``, label = the odd position ``0..length-1``.
``"mnist_idx"``
    MNIST from the four standard IDX files in the directory ``path`` (the option is
    required): ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each also accepted gzipped
    (``.gz``) or spelled with a dot (``train-images.idx3-ubyte``). Read with
    :func:`read_idx`, no torchvision. Features are ``pixel / 255`` (784 of them) before
    standardisation; the test split is the t10k files, unchanged; the validation split is a
    seeded, class-stratified ``val_fraction`` of the train files. With
    ``drop_overlap=True`` (the default) train images that are byte-identical to a test
    image are dropped from the train files first (the count is in ``meta``), so the splits
    never share a row.

Splits and standardisation
--------------------------
``val_fraction`` (``mnist1d``, ``digits``, ``mnist_idx``) may be 0: the validation split is
then empty (for training that keeps the final weights, ``select="final"`` of
:class:`~iternn.study.train.TrainConfig`); every other split must have rows.

Splits are fixed by ``seed`` and disjoint *as rows*: byte-identical samples are kept
together in one split (splitting works on groups of identical rows), so no row of one
split occurs in another (:meth:`Dataset.duplicates_across_splits` counts such rows; it is
0 for every dataset here). Classification splits are stratified by class.

With ``standardize=True`` (the default, every dataset) each feature is shifted and scaled
by the mean and standard deviation of the **train split only** (for sequences: over all
train sequences and positions), so the validation and test splits carry no information
into the statistics. A feature that is constant on the train split (std < 1e-8, e.g. the
corner pixels of the digits) is only centred (its std is taken as 1). The statistics are
kept in ``Dataset.feature_mean`` / ``Dataset.feature_std`` (raw = x * std + mean).

Randomness
----------
Everything is drawn from local ``numpy.random.Generator`` objects seeded by ``seed`` (and a
fixed per-purpose salt); no global random state is read or changed (the MNIST-1D
generator's use of the global state is undone, see above). Same seed, same options: the
same tensors, bit for bit, on the same numpy / scikit-learn / mnist1d versions.

Anomaly sequences
-----------------
A sequence holds ``length`` (default 10) *different* samples of one class (drawn without
replacement; with replacement only if that class has fewer than ``length`` samples in the
split), drawn from one split of the source dataset (``source="digits"`` by default, or
``"mnist1d"``; the source is split as its own loader splits it with the same ``seed``,
and train / validation / test sequences are built from the train / validation / test
source samples only, so no sample is shared between splits). Each sequence draws a
*recipe* for ``length - 1`` positions and a recipe of a **different kind** for the odd
position, which is the label. "Different"
means a different transform kind from :data:`ANOMALY_RECIPES` — never the same kind with
other parameters. A recipe is a kind plus parameters drawn once per sequence, so the
``length - 1`` ordinary positions share the transform exactly (only the noise realisation
is fresh per position). The source samples are first put on a common scale (digits: pixel
/ 16, in [0, 1]; MNIST-1D: as generated, already standardised), with ``u`` the standard
deviation of the source's train samples:

``"noise"``
    add Gaussian noise, std ``sigma ~ U(0.6, 1.0) * u``, a fresh draw per position.
``"shift"``
    circular shift (``numpy.roll``) along one spatial axis (for the 8x8 digits: rows or
    columns, drawn per sequence) by ``k`` positions, ``|k|`` uniform in ``[w/8, w/4]``
    (digits: 1..2, MNIST-1D: 5..10), sign random.
``"scale"``
    multiply by a factor drawn from ``U(0.25, 0.5)`` or ``U(1.75, 2.5)`` (each half the time).
``"mask"``
    set a window to 0: for images a block of half the height and half the width, for 1-D
    signals a quarter of the length, at a random place.

``recipes=`` restricts the kinds (at least two). The odd positions are balanced: each
position is the label of ``N / length`` sequences (up to rounding), in random order; the
class of each sequence is uniform. The task is learnable: the position whose distance to
the sequence's per-feature median is most atypical already names the odd position far
above chance 10 % (seed 0, test split: ~77 % from digits, ~60 % from MNIST-1D; tested > 40 %).

IDX files
---------
:func:`read_idx` / :func:`write_idx` read and write the IDX format of the MNIST files:
a 4-byte big-endian magic number ``0x0000TTNN`` (``TT`` the element type: ``0x08`` uint8,
``0x09`` int8, ``0x0B`` int16, ``0x0C`` int32, ``0x0D`` float32, ``0x0E`` float64; ``NN``
the number of dimensions), ``NN`` big-endian uint32 sizes, then the elements, big-endian,
in C order. Gzipped files are recognised by their content (and written when the name ends
in ``.gz``). Errors: a missing file raises ``FileNotFoundError`` naming it; a bad magic
number, an unknown type code, or a size that does not match the header (truncated or
trailing bytes) raises :class:`~iternn.DataError` (a ``ValueError``) naming the file.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import inspect
import os
import random
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.memory import check_bytes
from ..errors import DataError, MapTypeError, MissingDependencyError, MissingFileError

__all__ = [
    "ANOMALY_RECIPES",
    "DATASETS",
    "Dataset",
    "MNIST1D_ARGS",
    "SPLITS",
    "TASKS",
    "dataset_options",
    "load_dataset",
    "read_idx",
    "write_idx",
]

SPLITS = ("train", "val", "test")
TASKS = ("classification", "regression", "sequence")
ANOMALY_RECIPES = ("noise", "shift", "scale", "mask")

# The published MNIST-1D generator arguments (mnist1d.get_dataset_args()), pinned so that an
# update of the package's defaults cannot silently change the data. No "url": never used.
MNIST1D_ARGS: dict[str, Any] = {
    "num_samples": 5000,
    "train_split": 0.8,
    "template_len": 12,
    "padding": [36, 60],
    "scale_coeff": 0.4,
    "max_translation": 48,
    "corr_noise_scale": 0.25,
    "iid_noise_scale": 2e-2,
    "shear_scale": 0.75,
    "shuffle_seq": False,
    "final_seq_length": 40,
    "seed": 42,
}

# Salts keep the streams for different purposes independent for the same user seed.
_SALT_SPLIT, _SALT_REGRESSION, _SALT_ANOMALY = 0x5B11, 0x7E6, 0xA70


# ---------------------------------------------------------------------------------------
# The dataset container
# ---------------------------------------------------------------------------------------


@dataclass
class Dataset:
    """Fixed train / validation / test splits as torch tensors (see the module docstring).

    ``n_classes`` is the number of classes (classification) or of positions (sequence) and
    ``None`` for regression; :attr:`n_outputs` is the model output width in every case.
    ``feature_mean`` / ``feature_std`` are the train-split statistics used to standardise
    ``x`` (``None`` when the dataset was loaded with ``standardize=False``). ``meta`` holds
    JSON-able facts about the construction (source, seed, options, generator arguments).
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    task: str
    n_classes: int | None
    feature_mean: torch.Tensor | None = None
    feature_std: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise DataError(f"Dataset {self.name!r}: task must be one of {TASKS}, got {self.task!r}")
        xdim = 3 if self.task == "sequence" else 2
        for split in SPLITS:
            x, y = self.split(split)
            if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
                raise MapTypeError(f"Dataset {self.name!r}: x_{split} and y_{split} must be torch tensors")
            if x.dtype != torch.float32 or x.dim() != xdim:
                raise DataError(
                    f"Dataset {self.name!r}: x_{split} must be float32 with {xdim} dims, "
                    f"got {x.dtype} {tuple(x.shape)}"
                )
            if x.shape[1:] != self.x_train.shape[1:]:
                raise DataError(f"Dataset {self.name!r}: x_{split} has feature shape {tuple(x.shape[1:])}, "
                                 f"x_train has {tuple(self.x_train.shape[1:])}")
            if len(y) != len(x):
                raise DataError(f"Dataset {self.name!r}: x_{split} has {len(x)} rows, y_{split} {len(y)}")
            if self.task == "regression":
                if y.dtype != torch.float32 or y.dim() != 2:
                    raise DataError(
                        f"Dataset {self.name!r}: regression y_{split} must be float32 (N, outputs)")
            else:
                if y.dtype != torch.int64 or y.dim() != 1:
                    raise DataError(f"Dataset {self.name!r}: y_{split} must be int64 of shape (N,)")
                if self.n_classes is None or self.n_classes < 1:
                    raise DataError(f"Dataset {self.name!r}: task {self.task!r} needs n_classes >= 1")
                if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.n_classes):
                    raise DataError(
                        f"Dataset {self.name!r}: y_{split} has labels outside 0..{self.n_classes - 1}")

    # -- shapes ----------------------------------------------------------------------------
    @property
    def feature_shape(self) -> tuple[int, ...]:
        """Shape of one sample: ``(features,)`` or ``(T, features)``."""
        return tuple(self.x_train.shape[1:])

    @property
    def n_features(self) -> int:
        """Input width per step (the last dimension of ``x``)."""
        return int(self.x_train.shape[-1])

    @property
    def seq_len(self) -> int | None:
        """Sequence length ``T`` for sequence tasks, else ``None``."""
        return int(self.x_train.shape[1]) if self.task == "sequence" else None

    @property
    def n_outputs(self) -> int:
        """Model output width: ``n_classes``, or the number of regression targets."""
        return int(self.y_train.shape[1]) if self.task == "regression" else int(self.n_classes)

    # -- access ----------------------------------------------------------------------------
    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` of split ``"train"``, ``"val"`` or ``"test"``."""
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}; splits are {SPLITS}")
        return getattr(self, f"x_{name}"), getattr(self, f"y_{name}")

    def sizes(self) -> dict[str, int]:
        return {s: int(len(self.split(s)[0])) for s in SPLITS}

    def class_counts(self, split: str) -> list[int] | None:
        """Samples per class in ``split`` (``None`` for regression)."""
        if self.task == "regression":
            return None
        y = self.split(split)[1]
        return [int(c) for c in torch.bincount(y, minlength=self.n_classes).tolist()]

    def duplicates_across_splits(self) -> int:
        """Number of rows (samples, whole sequences for sequence tasks) whose exact bytes
        also occur in another split. 0 for every dataset :func:`load_dataset` builds."""
        seen: dict[bytes, set[int]] = {}
        keys_per_split = []
        for i, s in enumerate(SPLITS):
            keys = _row_keys(self.split(s)[0].numpy())
            keys_per_split.append(keys)
            for k in keys:
                seen.setdefault(k, set()).add(i)
        return sum(len(seen[k]) > 1 for keys in keys_per_split for k in keys)

    def summary(self) -> dict[str, Any]:
        """JSON-able description: name, task, n_classes, n_outputs, feature_shape, sizes per
        split, class balance per split (counts per class; ``None`` for regression), target
        mean / std per split (regression only), whether ``x`` is standardised, the number of
        rows shared between splits (0), and ``meta``."""
        out: dict[str, Any] = {
            "name": self.name,
            "task": self.task,
            "n_classes": self.n_classes,
            "n_outputs": self.n_outputs,
            "feature_shape": list(self.feature_shape),
            "sizes": self.sizes(),
            "class_balance": None,
            "standardized": self.feature_mean is not None,
            "cross_split_duplicates": self.duplicates_across_splits(),
            "meta": self.meta,
        }
        if self.task == "regression":
            out["targets"] = {
                s: {"mean": float(self.split(s)[1].mean()), "std": float(self.split(s)[1].std())}
                for s in SPLITS
            }
        else:
            out["class_balance"] = {s: self.class_counts(s) for s in SPLITS}
        return out


# ---------------------------------------------------------------------------------------
# Registry and entry point
# ---------------------------------------------------------------------------------------


def load_dataset(name: str, *, seed: int = 0, **options: Any) -> Dataset:
    """Build dataset ``name`` from the registry :data:`DATASETS` (see the module docstring).

    ``seed`` (an int >= 0) fixes the splits and every random draw. ``options`` are the
    dataset's keyword options (:func:`dataset_options` lists them with their defaults).
    Raises :class:`~iternn.DataError` (a ``ValueError``) for an unknown name (listing the
    registry), an unknown option (listing the valid ones) or a bad option value (naming it).
    """
    loader = _lookup(name)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"dataset {name!r}: seed must be an int >= 0, got {seed!r}")
    valid = dataset_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise DataError(
            f"dataset {name!r}: unknown option(s) {', '.join(map(repr, unknown))}; "
            f"valid options: {', '.join(valid) or '(none)'}"
        )
    return loader(int(seed), **options)


def dataset_options(name: str) -> dict[str, Any]:
    """The keyword options of dataset ``name`` with their defaults (``path`` has none: None)."""
    loader = _lookup(name)
    params = inspect.signature(loader).parameters
    return {p.name: (None if p.default is inspect.Parameter.empty else p.default)
            for p in params.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _lookup(name: str) -> Callable[..., Dataset]:
    if not isinstance(name, str) or name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


# ---------------------------------------------------------------------------------------
# Option checks
# ---------------------------------------------------------------------------------------


def _opt_int(ds: str, opt: str, v: Any, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise DataError(f"dataset {ds!r}: option {opt!r} must be an int >= {lo}, got {v!r}")
    return int(v)


def _opt_float(ds: str, opt: str, v: Any, lo: float, hi: float, *, lo_open: bool = True,
               hi_open: bool = True) -> float:
    ok = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
    if ok:
        v = float(v)
        ok = np.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
        raise DataError(f"dataset {ds!r}: option {opt!r} must be a number in {lb}{lo}, {hi}{rb}, got {v!r}")
    return v


def _opt_bool(ds: str, opt: str, v: Any) -> bool:
    if not isinstance(v, (bool, np.bool_)):
        raise DataError(f"dataset {ds!r}: option {opt!r} must be true or false, got {v!r}")
    return bool(v)


def _opt_choice(ds: str, opt: str, v: Any, choices: Sequence[str]) -> str:
    if v not in choices:
        raise DataError(f"dataset {ds!r}: option {opt!r} must be one of {', '.join(choices)}; got {v!r}")
    return v


# ---------------------------------------------------------------------------------------
# Splitting and standardisation helpers
# ---------------------------------------------------------------------------------------


def _row_keys(x: np.ndarray) -> list[bytes]:
    """A 128-bit digest of each row's bytes (rows = first axis)."""
    x2 = np.ascontiguousarray(x.reshape(len(x), int(np.prod(x.shape[1:], dtype=np.int64))))
    return [hashlib.blake2b(r.tobytes(), digest_size=16).digest() for r in x2]


def _rng(seed: int, salt: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(salt)])


def _split_indices(keys: np.ndarray, strata: np.ndarray | None, fractions: Sequence[float],
                   rng: np.random.Generator) -> list[np.ndarray]:
    """Split rows into ``len(fractions)`` parts, stratified by ``strata``, keeping rows with
    identical content (``keys``: raw rows, compared by bytes) in one part. Each part is in
    random order."""
    n = len(keys)
    gid = np.empty(n, dtype=np.int64)
    ids: dict[bytes, int] = {}
    for i, k in enumerate(_row_keys(keys)):
        gid[i] = ids.setdefault(k, len(ids))
    n_groups = len(ids)
    first = np.full(n_groups, n, dtype=np.int64)
    np.minimum.at(first, gid, np.arange(n))
    sizes = np.bincount(gid, minlength=n_groups)
    g_stratum = strata[first] if strata is not None else np.zeros(n_groups, dtype=np.int64)
    strata_ids = np.unique(g_stratum)
    totals = np.array([sizes[g_stratum == s].sum() for s in strata_ids], dtype=np.int64)
    # Row bounds of the parts per stratum: the per-stratum shares are rounded so that the
    # totals over all strata match round(fraction * n) (largest remainders get the extra rows).
    cum = np.cumsum(np.asarray(fractions, dtype=np.float64))
    cum[-1] = 1.0
    bounds = np.zeros((len(strata_ids), len(fractions)), dtype=np.int64)
    for k, c in enumerate(cum):
        exact = c * totals
        fl = np.floor(exact + 1e-9).astype(np.int64)
        extra = int(np.floor(c * totals.sum() + 0.5)) - int(fl.sum())
        if extra > 0:
            fl[np.argsort(-(exact - fl), kind="stable")[:extra]] += 1
        bounds[:, k] = fl
    bounds = np.maximum.accumulate(np.minimum(bounds, totals[:, None]), axis=1)
    bounds[:, -1] = totals
    part_of_group = np.empty(n_groups, dtype=np.int64)
    for i, s in enumerate(strata_ids):
        gs = rng.permutation(np.flatnonzero(g_stratum == s))
        before = np.cumsum(sizes[gs]) - sizes[gs]
        part_of_group[gs] = np.minimum(np.searchsorted(bounds[i], before, side="right"), len(fractions) - 1)
    part_of_row = part_of_group[gid]
    return [rng.permutation(np.flatnonzero(part_of_row == p)) for p in range(len(fractions))]


def _standardize(arrays: list[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Standardise every array by the per-feature (last axis) mean / std of ``arrays[0]``
    (the train split); features constant on train are only centred."""
    train = arrays[0]
    flat = train.reshape(-1, train.shape[-1])
    mean = flat.mean(axis=0, dtype=np.float64)
    std = flat.std(axis=0, dtype=np.float64)
    std[std < 1e-8] = 1.0
    m32, s32 = mean.astype(np.float32), std.astype(np.float32)
    out = [((a.astype(np.float32, copy=False) - m32) / s32).astype(np.float32, copy=False) for a in arrays]
    return out, m32, s32


def _build(name: str, task: str, n_classes: int | None, xs: list[np.ndarray], ys: list[np.ndarray],
           standardize: bool, meta: dict[str, Any]) -> Dataset:
    if standardize:
        xs, mean, std = _standardize(xs)
        fm, fs = torch.from_numpy(mean.copy()), torch.from_numpy(std.copy())
        meta = {**meta, "standardization": "per feature, mean/std of the train split only"}
    else:
        xs = [a.astype(np.float32) for a in xs]
        fm = fs = None
        meta = {**meta, "standardization": None}
    ydt = np.float32 if task == "regression" else np.int64
    tx = [torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in xs]  # fresh arrays
    ty = [torch.from_numpy(np.array(a, dtype=ydt, order="C", copy=True)) for a in ys]
    return Dataset(name=name, x_train=tx[0], y_train=ty[0], x_val=tx[1], y_val=ty[1], x_test=tx[2],
                   y_test=ty[2], task=task, n_classes=n_classes, feature_mean=fm, feature_std=fs, meta=meta)


# ---------------------------------------------------------------------------------------
# Sources (raw arrays, cached per process; read-only so a cache entry cannot be changed)
# ---------------------------------------------------------------------------------------

_GLOBAL_RNG_LOCK = threading.Lock()


@lru_cache(maxsize=4)
def _mnist1d_raw(generator_seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(
            "dataset 'mnist1d' needs the 'mnist1d' package: pip install 'iternn[study]'") from e
    args = get_dataset_args()  # an ObjectView; overwrite every field with the pinned values
    for k, v in MNIST1D_ARGS.items():
        setattr(args, k, list(v) if isinstance(v, list) else v)
    args.seed = int(generator_seed)
    # make_dataset seeds and draws from numpy's and Python's GLOBAL generators: undo that.
    with _GLOBAL_RNG_LOCK:
        np_state, py_state = np.random.get_state(), random.getstate()
        try:
            d = make_dataset(args)
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
    out = (np.asarray(d["x"], dtype=np.float64), np.asarray(d["y"], dtype=np.int64),
           np.asarray(d["x_test"], dtype=np.float64), np.asarray(d["y_test"], dtype=np.int64))
    for a in out:
        a.setflags(write=False)
    return out


@lru_cache(maxsize=1)
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise MissingDependencyError(
            "dataset 'digits' needs scikit-learn: pip install 'iternn[study]'") from e
    d = load_digits()
    x, y = np.asarray(d.data, dtype=np.float64), np.asarray(d.target, dtype=np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def _mnist1d_splits(seed: int, val_fraction: float, generator_seed: int):
    x, y, xt, yt = _mnist1d_raw(generator_seed)
    tr, va = _split_indices(x, y, (1.0 - val_fraction, val_fraction), _rng(seed, _SALT_SPLIT))
    return [x[tr], x[va], xt], [y[tr], y[va], yt]


def _digits_splits(seed: int, val_fraction: float, test_fraction: float):
    x, y = _digits_raw()
    parts = _split_indices(x, y, (1.0 - val_fraction - test_fraction, val_fraction, test_fraction),
                           _rng(seed, _SALT_SPLIT))
    return [x[p] for p in parts], [y[p] for p in parts]


def _check_nonempty(ds: str, xs: list[np.ndarray], *, val_fraction: float) -> None:
    """Every split has rows, but the validation split when ``val_fraction`` is 0."""
    for s, a in zip(SPLITS, xs):
        if len(a) == 0 and not (s == "val" and val_fraction == 0):
            raise DataError(f"dataset {ds!r}: the {s} split is empty; use larger split fractions")


# ---------------------------------------------------------------------------------------
# Loaders (one per registry entry; keyword-only options are the dataset's options)
# ---------------------------------------------------------------------------------------


def _load_mnist1d(seed: int, *, val_fraction: float = 0.1, generator_seed: int = 42,
                  standardize: bool = True) -> Dataset:
    ds = "mnist1d"
    val_fraction = _opt_float(ds, "val_fraction", val_fraction, 0.0, 1.0, lo_open=False)
    generator_seed = _opt_int(ds, "generator_seed", generator_seed, lo=0)
    standardize = _opt_bool(ds, "standardize", standardize)
    xs, ys = _mnist1d_splits(seed, val_fraction, generator_seed)
    _check_nonempty(ds, xs, val_fraction=val_fraction)
    meta = {"source": "mnist1d.data.make_dataset (generated locally, no download)", "seed": seed,
            "options": {"val_fraction": val_fraction, "generator_seed": generator_seed,
                        "standardize": standardize},
            "generator_args": {**MNIST1D_ARGS, "seed": generator_seed}}
    return _build(ds, "classification", 10, xs, ys, standardize, meta)


def _load_digits(seed: int, *, val_fraction: float = 0.2, test_fraction: float = 0.2,
                 standardize: bool = True) -> Dataset:
    ds = "digits"
    val_fraction = _opt_float(ds, "val_fraction", val_fraction, 0.0, 1.0, lo_open=False)
    test_fraction = _opt_float(ds, "test_fraction", test_fraction, 0.0, 1.0)
    if val_fraction + test_fraction >= 1.0:
        raise DataError(f"dataset {ds!r}: options 'val_fraction' + 'test_fraction' must be < 1, "
                         f"got {val_fraction} + {test_fraction}")
    standardize = _opt_bool(ds, "standardize", standardize)
    xs, ys = _digits_splits(seed, val_fraction, test_fraction)
    _check_nonempty(ds, xs, val_fraction=val_fraction)
    meta = {"source": "sklearn.datasets.load_digits (bundled, 8x8)", "seed": seed,
            "options": {"val_fraction": val_fraction, "test_fraction": test_fraction,
                        "standardize": standardize}}
    return _build(ds, "classification", 10, xs, ys, standardize, meta)


def _load_regression(seed: int, *, n_train: int = 2000, n_val: int = 500, n_test: int = 500,
                     n_features: int = 8, n_outputs: int = 1, hidden: int = 32, noise: float = 0.1,
                     standardize: bool = True) -> Dataset:
    ds = "regression"
    n_train, n_val, n_test = (_opt_int(ds, k, v) for k, v in
                              (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)))
    n_features = _opt_int(ds, "n_features", n_features)
    n_outputs = _opt_int(ds, "n_outputs", n_outputs)
    hidden = _opt_int(ds, "hidden", hidden)
    noise = _opt_float(ds, "noise", noise, 0.0, np.inf, lo_open=False)
    standardize = _opt_bool(ds, "standardize", standardize)
    n = n_train + n_val + n_test
    check_bytes(n * (n_features + n_outputs + hidden) * 8,
                f"dataset {ds!r} (n_train + n_val + n_test = {n} rows of {n_features} features)")
    rng = _rng(seed, _SALT_REGRESSION)
    w1 = rng.normal(0.0, 1.5 / np.sqrt(n_features), size=(n_features, hidden))
    b1 = rng.uniform(-1.0, 1.0, size=hidden)
    w2 = rng.normal(0.0, 1.0 / np.sqrt(hidden), size=(hidden, n_outputs))
    x = rng.normal(size=(n, n_features))
    y = np.tanh(x @ w1 + b1) @ w2 + noise * rng.normal(size=(n, n_outputs))
    cuts = np.cumsum([n_train, n_val])
    xs, ys = np.split(x, cuts), np.split(y, cuts)  # x is i.i.d.: the order is already random
    meta = {"source": "synthetic: y = tanh(x W1 + b1) W2 + noise * N(0, I), x ~ N(0, I)", "seed": seed,
            "options": {"n_train": n_train, "n_val": n_val, "n_test": n_test, "n_features": n_features,
                        "n_outputs": n_outputs, "hidden": hidden, "noise": noise,
                        "standardize": standardize}}
    return _build(ds, "regression", None, xs, ys, standardize, meta)


# -- anomaly sequences --------------------------------------------------------------------


def _draw_recipe(kind: str, rng: np.random.Generator, shape: tuple[int, ...], unit: float) -> dict:
    if kind == "noise":
        return {"kind": kind, "sigma": float(rng.uniform(0.6, 1.0) * unit)}
    if kind == "shift":
        axis = int(rng.integers(len(shape)))
        w = shape[axis]
        kmin = max(1, round(w / 8))
        kmax = max(kmin, round(w / 4))
        k = int(rng.integers(kmin, kmax + 1)) * (1 if rng.random() < 0.5 else -1)
        return {"kind": kind, "axis": axis, "k": k}
    if kind == "scale":
        f = rng.uniform(0.25, 0.5) if rng.random() < 0.5 else rng.uniform(1.75, 2.5)
        return {"kind": kind, "factor": float(f)}
    if kind == "mask":
        if len(shape) == 1:
            sizes = (max(1, shape[0] // 4),)
        else:
            sizes = tuple(max(1, s // 2) for s in shape)
        starts = tuple(int(rng.integers(0, s - m + 1)) for s, m in zip(shape, sizes))
        return {"kind": kind, "window": tuple(slice(a, a + m) for a, m in zip(starts, sizes))}
    raise DataError(f"unknown transform kind {kind!r}")  # pragma: no cover - validated before


def _apply_recipe(r: dict, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Apply recipe ``r`` to samples ``x`` of shape ``(n, *shape)``."""
    kind = r["kind"]
    if kind == "noise":
        return x + rng.normal(0.0, r["sigma"], size=x.shape)
    if kind == "shift":
        return np.roll(x, r["k"], axis=1 + r["axis"])
    if kind == "scale":
        return x * r["factor"]
    out = x.copy()
    out[(slice(None),) + r["window"]] = 0.0
    return out


def _load_anomaly(seed: int, *, source: str = "digits", length: int = 10, n_train: int = 3000,
                  n_val: int = 1000, n_test: int = 1000, recipes: Sequence[str] = ANOMALY_RECIPES,
                  standardize: bool = True) -> Dataset:
    ds = "anomaly"
    source = _opt_choice(ds, "source", source, ("digits", "mnist1d"))
    length = _opt_int(ds, "length", length, lo=2)
    counts = [_opt_int(ds, k, v) for k, v in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test))]
    if isinstance(recipes, str) or not isinstance(recipes, Sequence) or len(set(recipes)) < 2 \
            or len(set(recipes)) != len(recipes) or any(r not in ANOMALY_RECIPES for r in recipes):
        raise DataError(f"dataset {ds!r}: option 'recipes' must list at least two distinct kinds of "
                         f"{', '.join(ANOMALY_RECIPES)}; got {recipes!r}")
    kinds = tuple(recipes)
    standardize = _opt_bool(ds, "standardize", standardize)

    if source == "digits":
        xs, ys = _digits_splits(seed, 0.2, 0.2)
        shape: tuple[int, ...] = (8, 8)
        xs = [a / 16.0 for a in xs]
    else:
        xs, ys = _mnist1d_splits(seed, 0.1, 42)
        shape = (xs[0].shape[1],)
    check_bytes(sum(counts) * length * int(np.prod(shape)) * 8,
                f"dataset {ds!r} ({sum(counts)} sequences of length {length})")
    unit = float(xs[0].std())
    rng = _rng(seed, _SALT_ANOMALY)
    seq_x, seq_y = [], []
    for xsrc, ysrc, n in zip(xs, ys, counts):
        classes = np.unique(ysrc)
        pools = {int(c): np.flatnonzero(ysrc == c) for c in classes}
        imgs = xsrc.reshape((len(xsrc),) + shape)
        labels = rng.permutation(np.arange(n) % length)
        seq_cls = rng.choice(classes, size=n)
        out = np.empty((n, length) + shape, dtype=np.float64)
        for i in range(n):
            pool = pools[int(seq_cls[i])]
            pick = rng.choice(pool, size=length, replace=len(pool) < length)
            common, odd = rng.choice(len(kinds), size=2, replace=False)
            r_common = _draw_recipe(kinds[common], rng, shape, unit)
            r_odd = _draw_recipe(kinds[odd], rng, shape, unit)
            seq = _apply_recipe(r_common, imgs[pick], rng)
            p = int(labels[i])
            seq[p] = _apply_recipe(r_odd, imgs[pick[p]][None], rng)[0]
            out[i] = seq
        seq_x.append(out.reshape(n, length, -1))
        seq_y.append(labels)
    meta = {"source": f"{source} samples, odd-one-out sequences", "seed": seed,
            "options": {"source": source, "length": length, "n_train": counts[0], "n_val": counts[1],
                        "n_test": counts[2], "recipes": list(kinds), "standardize": standardize},
            "label": "position (0..length-1) of the sample transformed by a different recipe kind"}
    return _build(ds, "sequence", length, seq_x, seq_y, standardize, meta)


# -- MNIST from IDX files -----------------------------------------------------------------

_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _find_mnist_file(directory: Path, base: str) -> Path:
    dotted = base.replace("-idx", ".idx")
    for cand in (base, base + ".gz", dotted, dotted + ".gz"):
        p = directory / cand
        if p.is_file():
            return p
    raise MissingFileError(errno.ENOENT, f"MNIST IDX file {base!r} (or {base}.gz) not found in {directory}",
                            str(directory / base))


def _load_mnist_idx(seed: int, *, path: str | os.PathLike | None = None, val_fraction: float = 0.1,
                    drop_overlap: bool = True, standardize: bool = True) -> Dataset:
    ds = "mnist_idx"
    if path is None:
        raise DataError(f"dataset {ds!r}: option 'path' (the folder with the MNIST IDX files) is required")
    directory = Path(path)
    if not directory.is_dir():
        raise MissingFileError(errno.ENOENT, f"dataset {ds!r}: option 'path' is not a folder",
                                str(directory))
    val_fraction = _opt_float(ds, "val_fraction", val_fraction, 0.0, 1.0, lo_open=False)
    drop_overlap = _opt_bool(ds, "drop_overlap", drop_overlap)
    standardize = _opt_bool(ds, "standardize", standardize)
    files = [_find_mnist_file(directory, b) for b in _MNIST_FILES]
    arrays = [read_idx(f) for f in files]
    for f, a, nd in zip(files, arrays, (3, 1, 3, 1)):
        if a.dtype != np.uint8 or a.ndim != nd:
            raise DataError(f"{f}: expected uint8 data with {nd} dimension(s), got {a.dtype} {a.shape}")
    xi, yi, xti, yti = arrays
    for (fx, fy), (a, b) in (((files[0], files[1]), (xi, yi)), ((files[2], files[3]), (xti, yti))):
        if len(a) != len(b):
            raise DataError(f"{fx} holds {len(a)} images but {fy} holds {len(b)} labels")
        if len(b) and int(b.max()) > 9:
            raise DataError(f"{fy}: labels must be 0..9, found {int(b.max())}")
    if xi.shape[1:] != xti.shape[1:]:
        raise DataError(f"{files[0]} has images of shape {xi.shape[1:]}, {files[2]} of {xti.shape[1:]}")
    xi, xti = xi.reshape(len(xi), -1), xti.reshape(len(xti), -1)
    dropped = 0
    if drop_overlap:
        test_keys = set(_row_keys(xti))
        keep = np.array([k not in test_keys for k in _row_keys(xi)], dtype=bool)
        dropped = int((~keep).sum())
        xi, yi = xi[keep], yi[keep]
    tr, va = _split_indices(xi, yi.astype(np.int64), (1.0 - val_fraction, val_fraction),
                            _rng(seed, _SALT_SPLIT))
    xs = [xi[tr], xi[va], xti]
    ys = [yi[tr].astype(np.int64), yi[va].astype(np.int64), yti.astype(np.int64)]
    _check_nonempty(ds, xs, val_fraction=val_fraction)
    xs = [a.astype(np.float32) / np.float32(255.0) for a in xs]
    meta = {"source": f"MNIST IDX files in {directory}", "seed": seed, "files": [f.name for f in files],
            "options": {"path": str(directory), "val_fraction": val_fraction, "drop_overlap": drop_overlap,
                        "standardize": standardize},
            "dropped_train_duplicates_of_test": dropped}
    return _build(ds, "classification", 10, xs, ys, standardize, meta)


DATASETS: dict[str, Callable[..., Dataset]] = {
    "mnist1d": _load_mnist1d,
    "digits": _load_digits,
    "regression": _load_regression,
    "anomaly": _load_anomaly,
    "mnist_idx": _load_mnist_idx,
}
"""Registry: dataset name -> loader ``fn(seed, **options) -> Dataset``. Call through
:func:`load_dataset`, which checks the name, the seed and the option names."""


# ---------------------------------------------------------------------------------------
# IDX reader / writer
# ---------------------------------------------------------------------------------------

_IDX_CODES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a native-byte-order numpy array.

    Raises ``FileNotFoundError`` (naming the file) if it does not exist and :class:`~iternn.DataError`
    (naming the file) for a bad magic number, an unknown type code, a truncated header, a
    data size that does not match the header, or a corrupt gzip stream.
    """
    p = Path(path)
    if not p.is_file():
        raise MissingFileError(errno.ENOENT, "IDX file not found", str(p))
    raw = p.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{p}: corrupt gzip data ({e})") from e
    if len(raw) < 4:
        raise DataError(f"{p}: too short for an IDX header ({len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    code, ndim = raw[2], raw[3]
    if raw[0] != 0 or raw[1] != 0 or code not in _IDX_CODES or ndim == 0:
        raise DataError(
            f"{p}: bad IDX magic number 0x{magic:08X} (expected 0x0000TTNN with type code TT in "
            f"{', '.join(f'0x{c:02X}' for c in _IDX_CODES)} and NN >= 1 dimensions)"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(
            f"{p}: truncated IDX header: {ndim} dimensions need {header} bytes, file has {len(raw)}")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_CODES[code]
    count = int(np.prod(dims, dtype=np.int64))
    expected = count * dtype.itemsize
    actual = len(raw) - header
    if actual != expected:
        what = "truncated" if actual < expected else "trailing bytes"
        raise DataError(f"{p}: size mismatch ({what}): the header gives shape {dims} of {dtype.name} "
                         f"= {expected} data bytes, the file has {actual}")
    arr = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | os.PathLike, array: Any) -> Path:
    """Write ``array`` as an IDX file (gzipped when ``path`` ends in ``.gz``), atomically.

    Supported dtypes: uint8, int8, int16, int32, float32, float64 (any byte order), with
    1 to 255 dimensions. Returns the path. Raises :class:`~iternn.DataError` for another dtype or shape.
    """
    a = np.asarray(array)
    code = next((c for c, dt in _IDX_CODES.items()
                 if a.dtype.kind in "uif" and dt.kind == a.dtype.kind and dt.itemsize == a.dtype.itemsize),
                None)
    if code is None:
        raise DataError(f"write_idx: dtype {a.dtype} is not an IDX type; use one of "
                         f"{', '.join(dt.name for dt in _IDX_CODES.values())}")
    if not 1 <= a.ndim <= 255 or any(d >= 2**32 for d in a.shape):
        raise DataError(f"write_idx: IDX needs 1..255 dimensions each < 2**32, got shape {a.shape}")
    body = (bytes([0, 0, code, a.ndim]) + np.asarray(a.shape, dtype=">u4").tobytes()
            + np.ascontiguousarray(a, dtype=_IDX_CODES[code]).tobytes())
    p = Path(path)
    if p.name.endswith(".gz"):
        body = gzip.compress(body, mtime=0)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent if str(p.parent) else ".")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(body)
        os.chmod(tmp, 0o644)
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return p
