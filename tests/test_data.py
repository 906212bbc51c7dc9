"""Datasets of the sparsity study: shapes, determinism, disjoint splits, train-only
standardisation, class balance, the anomaly task, the IDX reader / writer, global RNG."""

from __future__ import annotations

import gzip
import hashlib
import json
import random

import numpy as np
import pytest
import torch

from iternn.study.data import (
    ANOMALY_RECIPES,
    DATASETS,
    SPLITS,
    Dataset,
    dataset_options,
    load_dataset,
    read_idx,
    write_idx,
)

SMALL_ANOMALY = {"n_train": 300, "n_val": 100, "n_test": 400}


def _load(name, seed=0, **opts):
    if name == "anomaly":
        opts = {**SMALL_ANOMALY, **opts}
    return load_dataset(name, seed=seed, **opts)


def _hashes(x: torch.Tensor) -> list[bytes]:
    a = x.numpy().reshape(len(x), -1)
    return [hashlib.sha256(r.tobytes()).digest() for r in a]


def _assert_disjoint(ds: Dataset) -> None:
    h = {s: set(_hashes(ds.split(s)[0])) for s in SPLITS}
    assert not h["train"] & h["val"]
    assert not h["train"] & h["test"]
    assert not h["val"] & h["test"]
    assert ds.duplicates_across_splits() == 0


def _tensors(ds: Dataset) -> list[torch.Tensor]:
    return [t for s in SPLITS for t in ds.split(s)]


# ---------------------------------------------------------------------------------------
# Shapes, dtypes, sizes
# ---------------------------------------------------------------------------------------


def test_mnist1d_shapes_sizes():
    ds = _load("mnist1d")
    assert ds.task == "classification" and ds.n_classes == 10 and ds.n_outputs == 10
    assert ds.feature_shape == (40,) and ds.n_features == 40 and ds.seq_len is None
    sizes = ds.sizes()
    assert sizes["train"] + sizes["val"] == 4000 and sizes["test"] == 1000
    assert sizes["val"] == pytest.approx(400, abs=10)
    for x, y in (ds.split(s) for s in SPLITS):
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.dim() == 2
        assert int(y.min()) == 0 and int(y.max()) == 9
    assert ds.meta["generator_args"]["seed"] == 42 and ds.meta["generator_args"]["num_samples"] == 5000


def test_digits_shapes_sizes():
    ds = _load("digits")
    sizes = ds.sizes()
    assert sum(sizes.values()) == 1797
    assert sizes["train"] == pytest.approx(0.6 * 1797, abs=10)
    assert sizes["val"] == pytest.approx(0.2 * 1797, abs=10)
    assert ds.feature_shape == (64,) and ds.n_classes == 10
    assert ds.x_train.dtype == torch.float32 and ds.y_test.dtype == torch.int64
    ds2 = _load("digits", val_fraction=0.1, test_fraction=0.3)
    assert ds2.sizes()["test"] == pytest.approx(0.3 * 1797, abs=10)


def test_regression_shapes_and_nonlinear_target():
    ds = _load("regression", n_train=300, n_val=50, n_test=70, n_features=5, n_outputs=2)
    assert ds.task == "regression" and ds.n_classes is None and ds.n_outputs == 2
    assert ds.sizes() == {"train": 300, "val": 50, "test": 70}
    assert ds.x_train.shape == (300, 5) and ds.y_test.shape == (70, 2)
    assert ds.y_train.dtype == torch.float32 and ds.x_val.dtype == torch.float32
    assert ds.class_counts("train") is None

    # the target is nonlinear: a linear fit leaves far more than the noise variance
    d = _load("regression", noise=0.1)
    x = np.c_[d.x_train.numpy(), np.ones(len(d.x_train))]
    w, *_ = np.linalg.lstsq(x, d.y_train.numpy(), rcond=None)
    xt = np.c_[d.x_test.numpy(), np.ones(len(d.x_test))]
    resid = d.y_test.numpy() - xt @ w
    assert resid.var() > 3 * 0.1**2


@pytest.mark.parametrize("source,n_feat", [("digits", 64), ("mnist1d", 40)])
def test_anomaly_shapes_and_balanced_labels(source, n_feat):
    ds = _load("anomaly", source=source)
    assert ds.task == "sequence" and ds.n_classes == 10 and ds.seq_len == 10
    assert ds.x_train.shape == (300, 10, n_feat) and ds.x_test.shape == (400, 10, n_feat)
    assert ds.x_val.dtype == torch.float32 and ds.y_val.dtype == torch.int64
    # each position is the odd one equally often
    assert ds.class_counts("train") == [30] * 10
    assert ds.class_counts("test") == [40] * 10
    short = _load("anomaly", source=source, length=4, n_train=8, n_val=4, n_test=4)
    assert short.x_train.shape == (8, 4, n_feat) and short.n_classes == 4


# ---------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["digits", "mnist1d", "regression", "anomaly"])
def test_same_seed_same_tensors_other_seed_differs(name):
    a, b, c = _load(name, seed=3), _load(name, seed=3), _load(name, seed=4)
    for ta, tb in zip(_tensors(a), _tensors(b)):
        assert torch.equal(ta, tb)
    assert torch.equal(a.feature_mean, b.feature_mean)
    differs = [not torch.equal(ta, tc) if ta.shape == tc.shape else True
               for ta, tc in zip(_tensors(a), _tensors(c))]
    assert any(differs)
    # the split or the data really differ, not only the order: the train rows are other rows
    assert set(_hashes(a.x_train)) != set(_hashes(c.x_train))


def test_mnist1d_seed_changes_only_the_validation_carving():
    a, c = _load("mnist1d", seed=0, standardize=False), _load("mnist1d", seed=1, standardize=False)
    assert torch.equal(a.x_test, c.x_test)  # the generator's test split, as generated
    both_a = set(_hashes(a.x_train)) | set(_hashes(a.x_val))
    both_c = set(_hashes(c.x_train)) | set(_hashes(c.x_val))
    assert both_a == both_c  # the same 4000 generator train samples ...
    assert set(_hashes(a.x_val)) != set(_hashes(c.x_val))  # ... carved differently


# ---------------------------------------------------------------------------------------
# Disjoint splits
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,opts", [("digits", {}), ("mnist1d", {}), ("regression", {}),
                                       ("anomaly", {}), ("anomaly", {"source": "mnist1d"})])
def test_splits_disjoint(name, opts):
    _assert_disjoint(_load(name, **opts))


def _scaled_keys(x: np.ndarray) -> list[bytes]:
    """A key for a digit up to a positive factor: the image divided by its maximum."""
    return [np.round(r / r.max(), 4).astype(np.float64).tobytes() for r in x]


def test_anomaly_sequences_come_from_one_class_of_one_split():
    # recipes "scale" and "noise": noise never leaves an exact zero, every digit has zeros,
    # so positions with zeros are scaled source images; identify each by its key
    ds = _load("anomaly", recipes=("scale", "noise"), standardize=False, n_train=200, n_val=50, n_test=50)
    src = _load("digits", standardize=False)
    owner: dict[bytes, tuple[str, int]] = {}
    for s in SPLITS:
        xs, ys = src.split(s)
        for k, label in zip(_scaled_keys(xs.numpy().astype(np.float64)), ys.tolist()):
            owner[k] = (s, label)
    n_checked = 0
    for s in SPLITS:
        x = ds.split(s)[0].numpy().astype(np.float64)
        for seq in x:
            scaled = seq[(seq == 0.0).any(axis=1)]
            found = [owner.get(k) for k in _scaled_keys(scaled)]
            assert None not in found  # every scaled position is a source digit times a factor
            assert {f[0] for f in found} == {s}  # ... from the source split of the same name
            assert len({f[1] for f in found}) == 1  # ... and all of one class
            n_checked += len(found)
    assert n_checked > 1000


def test_anomaly_scale_and_shift_ranges():
    ds = _load("anomaly", recipes=("scale", "shift"), standardize=False, n_train=50, n_val=10, n_test=10)
    x = ds.x_train.numpy()
    assert x.shape == (50, 10, 64)
    assert np.all(x >= 0.0)  # digits / 16, scaled by positive factors and rolled: no sign change
    assert x.max() > 1.0 and x.max() <= 2.5 + 1e-6  # some scaled up, never beyond the documented 2.5


# ---------------------------------------------------------------------------------------
# Standardisation from the train split only
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["digits", "anomaly"])
def test_standardisation_uses_train_statistics_only(name):
    raw = _load(name, seed=2, standardize=False)
    std = _load(name, seed=2)
    assert raw.feature_mean is None and std.feature_mean is not None
    f = raw.n_features
    tr = raw.x_train.numpy().reshape(-1, f).astype(np.float64)
    mean, sd = tr.mean(0), tr.std(0)
    sd[sd < 1e-8] = 1.0
    np.testing.assert_allclose(std.feature_mean.numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std.feature_std.numpy(), sd, rtol=1e-5, atol=1e-6)
    for s in SPLITS:
        expect = (raw.split(s)[0].numpy() - mean) / sd
        np.testing.assert_allclose(std.split(s)[0].numpy(), expect, rtol=1e-4, atol=1e-4)
        # and the inverse recovers the raw features
        back = std.split(s)[0] * std.feature_std + std.feature_mean
        np.testing.assert_allclose(back.numpy(), raw.split(s)[0].numpy(), rtol=1e-4, atol=1e-4)
    z = std.x_train.numpy().reshape(-1, f)
    varying = tr.std(0) > 1e-8
    np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(z.std(0)[varying], 1.0, atol=1e-3)
    # statistics of all splits together would differ: the check above can tell them apart
    every = np.concatenate([raw.split(s)[0].numpy().reshape(-1, f) for s in SPLITS])
    assert np.abs(every.mean(0) - mean).max() > 1e-3


# ---------------------------------------------------------------------------------------
# Summary and class balance
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["digits", "mnist1d", "anomaly"])
def test_summary_class_balance(name):
    ds = _load(name)
    s = ds.summary()
    json.dumps(s)  # JSON-able
    assert s["name"] == name and s["task"] == ds.task and s["n_classes"] == ds.n_classes
    assert s["feature_shape"] == list(ds.feature_shape)
    assert s["cross_split_duplicates"] == 0 and s["standardized"] is True
    for split in SPLITS:
        y = ds.split(split)[1].numpy()
        assert s["sizes"][split] == len(y)
        assert s["class_balance"][split] == np.bincount(y, minlength=ds.n_classes).tolist()
        assert sum(s["class_balance"][split]) == len(y)


def test_digits_split_is_stratified():
    ds = _load("digits", seed=5)
    total = np.bincount(np.concatenate([ds.split(s)[1].numpy() for s in SPLITS]), minlength=10)
    for split, frac in (("train", 0.6), ("val", 0.2), ("test", 0.2)):
        counts = np.array(ds.class_counts(split))
        assert np.all(np.abs(counts - frac * total) <= 1.0)


def test_regression_summary():
    ds = _load("regression", n_train=100, n_val=20, n_test=30)
    s = ds.summary()
    json.dumps(s)
    assert s["class_balance"] is None and s["n_outputs"] == 1
    assert s["targets"]["test"]["mean"] == pytest.approx(float(ds.y_test.mean()))


# ---------------------------------------------------------------------------------------
# The anomaly task
# ---------------------------------------------------------------------------------------


def _median_distance_accuracy(ds: Dataset) -> float:
    x, y = ds.x_test.numpy(), ds.y_test.numpy()
    d = np.linalg.norm(x - np.median(x, axis=1, keepdims=True), axis=2)  # (N, T)
    odd = np.abs(d - np.median(d, axis=1, keepdims=True)).argmax(1)  # the most atypical position
    return float((odd == y).mean())


@pytest.mark.parametrize("source", ["digits", "mnist1d"])
def test_anomaly_label_recoverable_above_chance(source):
    ds = _load("anomaly", source=source)
    acc = _median_distance_accuracy(ds)
    assert acc > 0.4, acc  # chance is 0.1
    # with the labels shuffled the same feature is at chance: the signal is in the label
    rng = np.random.default_rng(0)
    shuffled = Dataset(**{**ds.__dict__, "y_test": torch.from_numpy(rng.permutation(ds.y_test.numpy()))})
    assert _median_distance_accuracy(shuffled) < 0.2


def test_anomaly_odd_position_has_a_different_kind_of_transform():
    # noise never leaves exact zeros, a mask always does (a 4x4 block of the 8x8 image):
    # the odd position is the one whose "has a zeroed block" differs from all the others
    ds = _load("anomaly", recipes=("noise", "mask"), standardize=False, n_train=10, n_val=10, n_test=300)
    x = ds.x_test.numpy().reshape(300, 10, 8, 8)
    windows = np.lib.stride_tricks.sliding_window_view(x == 0.0, (4, 4), axis=(2, 3))
    masked = windows.all(axis=(-1, -2)).any(axis=(-1, -2))  # (N, T)
    n_masked = masked.sum(1)
    assert set(n_masked.tolist()) <= {1, 9}  # one recipe for nine, another for one
    assert {1, 9} <= set(n_masked.tolist())  # both ways round occur
    odd = np.where(n_masked == 1, masked.argmax(1), (~masked).argmax(1))
    np.testing.assert_array_equal(odd, ds.y_test.numpy())


# ---------------------------------------------------------------------------------------
# Global random state
# ---------------------------------------------------------------------------------------


def test_global_rng_untouched():
    np.random.seed(1234)
    torch.manual_seed(1234)
    random.seed(1234)
    np_state, torch_state, py_state = np.random.get_state(), torch.get_rng_state(), random.getstate()
    # generator_seed=1 is not cached by any other test: the mnist1d generator really runs
    fresh = load_dataset("mnist1d", generator_seed=1)
    for name in ("digits", "regression", "anomaly"):
        _load(name)
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state
    # the draws the caller makes next are the ones it would have made anyway
    expect = np.random.RandomState(1234).rand(3)
    np.testing.assert_array_equal(np.random.rand(3), expect)
    # and the generator seed does change the data
    assert not torch.equal(fresh.x_test, _load("mnist1d").x_test)


# ---------------------------------------------------------------------------------------
# Names and options
# ---------------------------------------------------------------------------------------


def test_unknown_dataset_lists_registry():
    with pytest.raises(ValueError) as e:
        load_dataset("cifar10")
    msg = str(e.value)
    assert "'cifar10'" in msg
    for name in DATASETS:
        assert name in msg
    with pytest.raises(ValueError, match="unknown dataset"):
        dataset_options("nope")


def test_unknown_option_lists_valid_ones():
    with pytest.raises(ValueError) as e:
        load_dataset("digits", val_frac=0.1)
    msg = str(e.value)
    assert "'val_frac'" in msg and "val_fraction" in msg and "test_fraction" in msg


@pytest.mark.parametrize("name,opts,word", [
    ("digits", {"val_fraction": 1.5}, "val_fraction"),
    ("digits", {"val_fraction": 0.5, "test_fraction": 0.5}, "test_fraction"),
    ("mnist1d", {"val_fraction": 1.0}, "val_fraction"),
    ("mnist1d", {"val_fraction": -0.1}, "val_fraction"),
    ("regression", {"n_train": 0}, "n_train"),
    ("regression", {"noise": -1.0}, "noise"),
    ("anomaly", {"source": "cifar"}, "source"),
    ("anomaly", {"recipes": ("noise",)}, "recipes"),
    ("anomaly", {"recipes": ("noise", "blur")}, "recipes"),
    ("anomaly", {"length": 1}, "length"),
    ("digits", {"standardize": "yes"}, "standardize"),
    ("mnist_idx", {}, "path"),
])
def test_bad_option_values(name, opts, word):
    with pytest.raises(ValueError, match=word):
        load_dataset(name, **opts)


def test_bad_seed():
    for seed in (-1, 1.5, "0", True):
        with pytest.raises(ValueError, match="seed"):
            load_dataset("regression", seed=seed)


def test_dataset_options():
    assert set(DATASETS) == {"mnist1d", "digits", "regression", "anomaly", "mnist_idx"}
    assert dataset_options("anomaly")["recipes"] == ANOMALY_RECIPES
    assert dataset_options("mnist1d")["val_fraction"] == 0.1
    assert dataset_options("mnist_idx")["path"] is None


def test_dataset_validates_its_tensors():
    x, y = torch.zeros(4, 3), torch.zeros(4, dtype=torch.int64)
    ok = dict(name="t", x_train=x, y_train=y, x_val=x, y_val=y, x_test=x, y_test=y,
              task="classification", n_classes=2)
    Dataset(**ok)
    with pytest.raises(ValueError, match="float32"):
        Dataset(**{**ok, "x_val": x.double()})
    with pytest.raises(ValueError, match="labels outside"):
        Dataset(**{**ok, "y_test": y + 5})
    with pytest.raises(ValueError, match="task"):
        Dataset(**{**ok, "task": "ranking"})
    with pytest.raises(ValueError, match="rows"):
        Dataset(**{**ok, "y_train": y[:3]})


# ---------------------------------------------------------------------------------------
# IDX files
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_roundtrip(tmp_path, dtype, suffix):
    rng = np.random.default_rng(0)
    a = (rng.normal(size=(3, 4, 5)) * 50).astype(dtype)
    p = write_idx(tmp_path / f"a{suffix}", a)
    b = read_idx(p)
    assert b.dtype == np.dtype(dtype) and b.dtype.isnative and b.shape == (3, 4, 5)
    np.testing.assert_array_equal(a, b)
    b[0, 0, 0] = 1  # writable, owns its memory
    assert [q.name for q in tmp_path.iterdir()] == [p.name]  # no temp file left behind


def test_idx_byte_layout(tmp_path):
    # the standard layout, written by hand: magic 0x00000803, dims big-endian, data
    imgs = np.arange(2 * 3 * 2, dtype=np.uint8).reshape(2, 3, 2)
    raw = b"\x00\x00\x08\x03" + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + (2).to_bytes(4, "big")
    (tmp_path / "hand").write_bytes(raw + imgs.tobytes())
    np.testing.assert_array_equal(read_idx(tmp_path / "hand"), imgs)
    assert write_idx(tmp_path / "ours", imgs).read_bytes() == raw + imgs.tobytes()
    # int32 big-endian
    v = np.array([1, -2, 70000], dtype=np.int32)
    (tmp_path / "i32").write_bytes(b"\x00\x00\x0c\x01" + (3).to_bytes(4, "big") + v.astype(">i4").tobytes())
    np.testing.assert_array_equal(read_idx(tmp_path / "i32"), v)
    # gzip recognised by content and written for a .gz name
    (tmp_path / "hand.gz").write_bytes(gzip.compress(raw + imgs.tobytes()))
    np.testing.assert_array_equal(read_idx(tmp_path / "hand.gz"), imgs)
    assert gzip.decompress(write_idx(tmp_path / "o.gz", imgs).read_bytes()) == raw + imgs.tobytes()


def test_idx_errors(tmp_path):
    good = write_idx(tmp_path / "good", np.arange(12, dtype=np.uint8).reshape(3, 4)).read_bytes()
    cases = {
        "badmagic": (b"\x01\x02" + good[2:], "magic"),
        "badcode": (good[:2] + b"\x07" + good[3:], "magic"),
        "zerodim": (good[:3] + b"\x00", "magic"),
        "truncated": (good[:-1], "truncated"),
        "trailing": (good + b"\x00", "trailing"),
        "shortheader": (good[:6], "header"),
        "tiny": (b"\x00\x00", "short"),
        "corrupt.gz": (gzip.compress(good)[:-6], "gzip"),
    }
    for name, (content, word) in cases.items():
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(ValueError, match=word) as e:
            read_idx(p)
        assert name in str(e.value)
    with pytest.raises(FileNotFoundError, match="missing-file"):
        read_idx(tmp_path / "missing-file")
    for bad in (np.zeros(3, dtype=bool), np.zeros(3, dtype=np.complex64), np.zeros(3, dtype=np.uint16)):
        with pytest.raises(ValueError, match="dtype"):
            write_idx(tmp_path / "x", bad)
    with pytest.raises(ValueError, match="dimensions"):
        write_idx(tmp_path / "x", np.uint8(3))


# ---------------------------------------------------------------------------------------
# MNIST from IDX files
# ---------------------------------------------------------------------------------------


def _fake_mnist(folder, n_train=150, n_test=50, side=5, gz=False, dotted=False, seed=0):
    rng = np.random.default_rng(seed)
    files = {
        "train-images-idx3-ubyte": rng.integers(0, 256, size=(n_train, side, side), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, size=(n_test, side, side), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, size=n_test, dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in files.items():
        if dotted:
            name = name.replace("-idx", ".idx")
        write_idx(folder / (name + (".gz" if gz else "")), arr)
    return files


@pytest.mark.parametrize("gz,dotted", [(False, False), (True, False), (False, True)])
def test_mnist_idx_loader(tmp_path, gz, dotted):
    files = _fake_mnist(tmp_path / "mnist", gz=gz, dotted=dotted)
    ds = load_dataset("mnist_idx", path=tmp_path / "mnist", seed=1)
    assert ds.feature_shape == (25,) and ds.n_classes == 10 and ds.task == "classification"
    assert ds.sizes() == {"train": 135, "val": 15, "test": 50}
    # the test split is the t10k files, in order
    np.testing.assert_array_equal(ds.y_test.numpy(), files["t10k-labels-idx1-ubyte"])
    back = ds.x_test * ds.feature_std + ds.feature_mean
    pixels = files["t10k-images-idx3-ubyte"].reshape(50, 25)
    np.testing.assert_allclose(back.numpy() * 255.0, pixels, atol=1e-3)
    # train + val are the train files, each image once with its own label
    imgs = files["train-images-idx3-ubyte"].reshape(150, 25)
    raw = load_dataset("mnist_idx", path=tmp_path / "mnist", seed=1, standardize=False)
    got = np.concatenate([raw.x_train.numpy(), raw.x_val.numpy()]) * 255.0
    lab = np.concatenate([raw.y_train.numpy(), raw.y_val.numpy()])
    order = np.lexsort(np.round(got).astype(np.int64).T[::-1])
    ref = np.lexsort(imgs.astype(np.int64).T[::-1])
    np.testing.assert_allclose(got[order], imgs[ref], atol=1e-3)
    np.testing.assert_array_equal(lab[order], files["train-labels-idx1-ubyte"][ref])
    _assert_disjoint(ds)
    expect = np.bincount(files["t10k-labels-idx1-ubyte"], minlength=10).tolist()
    assert ds.summary()["class_balance"]["test"] == expect


def test_mnist_idx_duplicates_never_cross_splits(tmp_path):
    folder = tmp_path / "dup"
    files = _fake_mnist(folder, n_train=100, n_test=20)
    tr = files["train-images-idx3-ubyte"].copy()
    te = files["t10k-images-idx3-ubyte"]
    tr[1::2] = tr[0::2]  # every train image twice
    tr[:3] = te[:3]  # and three test images inside train (twice, with their copies at 1, 3 ...)
    tr[3] = te[:3][1]
    write_idx(folder / "train-images-idx3-ubyte", tr)
    labels = files["train-labels-idx1-ubyte"].copy()
    labels[1::2] = labels[0::2]
    write_idx(folder / "train-labels-idx1-ubyte", labels)
    ds = load_dataset("mnist_idx", path=folder, val_fraction=0.3)
    _assert_disjoint(ds)
    assert ds.meta["dropped_train_duplicates_of_test"] == 4  # rows 0, 1, 2, 3
    # without dropping, the train files' copies of test images do cross: the check sees it
    kept = load_dataset("mnist_idx", path=folder, val_fraction=0.3, drop_overlap=False)
    assert kept.duplicates_across_splits() > 0
    train_val = set(_hashes(kept.x_train)) & set(_hashes(kept.x_val))
    assert not train_val  # identical train rows stay in one of train / val


def test_mnist_idx_errors(tmp_path):
    folder = tmp_path / "m"
    _fake_mnist(folder)
    (folder / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_dataset("mnist_idx", path=folder)
    with pytest.raises(FileNotFoundError):
        load_dataset("mnist_idx", path=tmp_path / "nowhere")

    _fake_mnist(folder)
    write_idx(folder / "train-labels-idx1-ubyte", np.zeros(149, dtype=np.uint8))
    with pytest.raises(ValueError, match="149 labels"):
        load_dataset("mnist_idx", path=folder)

    _fake_mnist(folder)
    write_idx(folder / "t10k-images-idx3-ubyte", np.zeros((50, 5, 5), dtype=np.float32))
    with pytest.raises(ValueError, match="uint8"):
        load_dataset("mnist_idx", path=folder)

    _fake_mnist(folder)
    write_idx(folder / "t10k-labels-idx1-ubyte", np.full(50, 12, dtype=np.uint8))
    with pytest.raises(ValueError, match="0..9"):
        load_dataset("mnist_idx", path=folder)

    _fake_mnist(folder)
    p = folder / "train-images-idx3-ubyte"
    p.write_bytes(b"\x00\x00\x08\x09" + p.read_bytes()[4:])  # 9 dims claimed: header/size mismatch
    with pytest.raises(ValueError, match="train-images-idx3-ubyte"):
        load_dataset("mnist_idx", path=folder)
