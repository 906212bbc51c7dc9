"""Subprocess entry points for the trainer tests (not a test module itself).

``python tests/train_worker.py OUT [--sleep S] [--resume]`` trains :func:`build_small`'s
model into OUT, sleeping S seconds after each epoch's log line (so a test can kill it
mid-run), and prints the result as JSON. ``python tests/train_worker.py OUT --study TOML
[--sleep S]`` runs the study of the config file TOML into OUT instead (sleeping S seconds
after each run's line, while it holds the folder) and prints ``ok`` or the error's one
line, exiting 0 or 3. :func:`build_distributed` is the ``--build``
target of the torchrun test.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types

import torch
from torch import nn


def _toy(n_train: int, n_val: int, n_test: int, features: int, classes: int, *, seed: int,
         dtype=torch.float32) -> types.SimpleNamespace:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(features, classes, generator=g, dtype=torch.float64)

    def split(n):
        x = torch.randn(n, features, generator=g, dtype=torch.float64)
        y = (x @ w + 0.5 * torch.randn(n, classes, generator=g, dtype=torch.float64)).argmax(1)
        return x.to(dtype), y

    (xt, yt), (xv, yv), (xs, ys) = split(n_train), split(n_val), split(n_test)
    return types.SimpleNamespace(name="toy", task="classification", n_classes=classes,
                                 x_train=xt, y_train=yt, x_val=xv, y_val=yv,
                                 x_test=xs, y_test=ys)


def _mlp(features: int, hidden: int, classes: int, *, seed: int, dropout: float = 0.0,
         dtype=torch.float32) -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers = [nn.Linear(features, hidden), nn.Tanh()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(hidden, classes))
        return nn.Sequential(*layers).to(dtype)


def build_small(init_seed: int = 0):
    """(model, data, config): a float32 MLP with dropout (the global RNG matters)."""
    from iternn.study.train import TrainConfig

    data = _toy(160, 48, 48, 6, 3, seed=1)
    model = _mlp(6, 12, 3, seed=init_seed, dropout=0.2)
    config = TrainConfig(optimizer="adam", lr=0.01, epochs=6, batch_size=16, seed=3,
                         lr_schedule="cosine")
    return model, data, config


def build_distributed():
    """(model, data, config) in float64: 97 training samples and a global batch of 32,
    so the last batch has 1 sample and one of two ranks gets an empty shard."""
    from iternn.study.train import TrainConfig

    data = _toy(97, 40, 40, 5, 3, seed=2, dtype=torch.float64)
    model = _mlp(5, 8, 3, seed=0, dtype=torch.float64)
    config = TrainConfig(optimizer="adam", lr=0.02, epochs=3, batch_size=32, seed=5,
                         max_grad_norm=0.5)
    return model, data, config


def build_distributed_final():
    """build_distributed with ``select="final"`` (which allows no patience)."""
    import dataclasses

    model, data, config = build_distributed()
    return model, data, dataclasses.replace(config, select="final")


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--study", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # as in the test process (conftest): same kernels, same bits
    if args.study is not None:
        return _study(args.study, args.out, args.sleep)
    from iternn.study.train import train

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)
        if line.startswith("epoch "):
            time.sleep(args.sleep)

    model, data, config = build_small()
    result = train(model, data, config, out_dir=args.out, resume=args.resume,
                   progress=False, log=log)
    print(json.dumps(result.to_dict()))
    return 0


def _study(config_path: str, out: str, sleep: float) -> int:
    from iternn.errors import IterNNError
    from iternn.study import run_study
    from iternn.study.config import load_config

    try:
        run_study(load_config(config_path), out, jobs=1, pictures=False,
                  log=lambda line: time.sleep(sleep))
    except IterNNError as e:
        print(f"{type(e).__name__}: {e}", flush=True)
        return 3
    print("ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
