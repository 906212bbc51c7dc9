"""One trainer for every model of the study: MLPs, block maps, RNN baselines.

:func:`train` fits any ``nn.Module`` that maps a batch of inputs to logits (or regression
targets) on a dataset object and returns a :class:`TrainResult`.

**Data.** ``data`` is duck-typed: any object with ``x_train, y_train, x_val, y_val,
x_test, y_test`` (tensors; ``x_test``/``y_test`` may be ``None``), ``task``
(``"classification"``, ``"regression"`` or ``"sequence"``) and ``n_classes`` works, such
as :class:`iternn.study.data.Dataset`. For ``"sequence"`` ``x`` is ``(N, T, F)`` and the
model returns ``(N, n_classes)``. Inputs are cast to the model's floating dtype and moved
to the device once, at the start.

**Loss.** Cross-entropy for classification and sequence tasks, MSE for regression (mean
over the output entries of a sample, then over samples). ``loss_on="all"`` averages the
loss over every application of an iterated model: a model opts in by defining
``forward_all(x) -> sequence of outputs`` (one per application, the last being
``forward(x)``); a :class:`~iternn.engine.map_module.MapModule` is supported directly
(its trajectory); any other model falls back to its single output (logged once).
Validation and test metrics always use ``model(x)``, the last output.

**Determinism.** Same seed, same data, same initial weights -> the same numbers on CPU
(with the same thread count). The batch order comes from a ``torch.Generator`` seeded
with ``config.seed``; randomness inside the model (dropout) uses torch's global RNG,
which :func:`train` seeds with ``config.seed`` inside :func:`torch.random.fork_rng`, so the
caller's global RNG state is left exactly as it was. Model initialisation is the
caller's business. Every RNG state is saved in the checkpoints, so a resumed run
continues bit for bit.

**Budget.** ``epochs`` passes over the training split, or ``steps`` optimizer steps
(one per batch; the last epoch stops part-way when ``steps`` is not a multiple of the
batches per epoch, and counts as an epoch). The two are exclusive.

**Selection.** After every epoch the model is evaluated on the validation split (when it
has one). ``select`` says which weights the run ends with, and so which weights the test
metrics describe: ``"val_loss"`` (default) the epoch with the lowest validation loss,
``"val_acc"`` the epoch with the highest validation accuracy (the earliest on a tie; not
for regression), ``"final"`` the weights after the last step. Only ``"final"`` trains
without a validation split (an empty ``x_val``). With ``patience=p`` training stops once
``p`` epochs in a row failed to improve the selection criterion (status
``"early_stopped"``; a run that used its whole budget is ``"ok"``; not with ``"final"``).
Whatever the status, the selected weights are restored into ``model`` at the end and the
test metrics are theirs.

**Divergence.** A non-finite training loss (checked before each optimizer step) or
validation loss stops the run with status ``"diverged"``; no exception is raised, the
completed epochs' metrics are kept, ``diverged_at`` says where, and the best weights so
far (or the initial ones, if no epoch completed) are restored.

**Files** (with ``out_dir``): ``run.json`` (the run options and the config, written
when the run starts: :mod:`iternn.study.resume`), ``checkpoint.pt`` (written atomically
after every epoch: model, optimizer, scheduler, RNG states, early-stopping state, best
weights, metrics; the finished run's checkpoint keeps them too, with the result),
``metrics.csv`` (header + one row per completed epoch) and ``metrics.json`` (the
:meth:`TrainResult.to_dict` snapshot; ``status`` is ``"running"`` until the run ends;
non-finite numbers are written as ``null``). While a run trains, ``out_dir`` is locked
(:class:`~iternn.study.lock.FolderLock`): a second run into it is a
:class:`~iternn.FolderLockedError`. ``resume=True`` continues from ``checkpoint.pt`` at
the next epoch and reaches exactly the numbers an uninterrupted run would (``time_s`` and
``wall_time_s`` aside). It refuses (:class:`~iternn.ResumeError`) options that differ from
the stored ones, but for ``epochs`` (more epochs continue a finished run too, to the
result of an uninterrupted run of that length; not with the cosine schedule),
``patience`` and ``device``: see :mod:`iternn.study.resume`. Resuming a finished run with
nothing left to do returns its result. A fresh run (``resume=False``) deletes these files
first.

**TensorBoard** (optional: ``pip install 'iternn[tensorboard]'``). With
``tensorboard=True`` (and an ``out_dir``) every completed epoch's scalars are written with
``torch.utils.tensorboard.SummaryWriter`` into ``out_dir/tensorboard`` (see it with
``tensorboard --logdir OUT``): the ``metrics.csv`` values under the tags of
:data:`TENSORBOARD_TAGS` (``loss/train``, ``loss/val``, ``accuracy/val`` (not for
regression), ``time/epoch_s``) plus ``lr``, the learning rate the epoch trained with;
the step is the epoch (1-based). The events are flushed after every epoch and the writer
is closed when the run ends, also on an exception. A resumed run writes from the epoch
after its checkpoint on, into a new events file of the same folder, and marks a restart
at that epoch (``purge_step``), so TensorBoard drops any point a killed session wrote
past its last checkpoint and shows each epoch once; epochs trained before the resume
keep the points their session wrote (none if that session ran without TensorBoard). A
fresh run deletes old events files from ``out_dir/tensorboard`` with the other files.
Without the ``tensorboard`` package, requesting it raises
:class:`TensorBoardMissingError` before anything is trained or written.

**Progress.** With ``progress=True`` and a TTY on stderr a tqdm bar over epochs (and one
over the batches of the current epoch) is drawn (tqdm is optional: without it, no bar);
``log`` (a ``str -> None`` callable, default: no output) receives one clean line per
epoch and per event either way; ``on_epoch`` receives each epoch's metrics row (the hook
for any other sink).

**Data parallel.** :mod:`iternn.study.distributed` runs this same loop in several
processes; ``config.batch_size`` is then the global batch.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib
import io
import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.summary import count_trainable
from ..engine.iterate import iterate
from ..engine.map_module import MapModule
from ..errors import (
    ConfigError,
    DataError,
    MapError,
    MapTypeError,
    ResumeError,
    TensorBoardMissingError,
)
from .checkpoint import atomic_write_text, load_checkpoint, save_checkpoint
from .lock import FolderLock
from .resume import read_run_options, resume_differences, write_run_options

__all__ = [
    "TrainConfig",
    "TrainResult",
    "TensorBoardMissingError",
    "train",
    "evaluate",
    "TASKS",
    "OPTIMIZERS",
    "SELECTIONS",
    "STATUSES",
    "METRIC_FIELDS",
    "CHECKPOINT_NAME",
    "METRICS_CSV",
    "METRICS_JSON",
    "TENSORBOARD_DIR",
    "TENSORBOARD_TAGS",
    "summary_writer_class",
]

TASKS = ("classification", "regression", "sequence")
OPTIMIZERS = ("adam", "adamw", "sgd")
#: Which weights a run ends with (see the module docstring).
SELECTIONS = ("val_loss", "val_acc", "final")
LR_SCHEDULES = ("constant", "cosine")
LOSS_ON = ("last", "all")
STATUSES = ("ok", "early_stopped", "diverged")
METRIC_FIELDS = ("epoch", "train_loss", "val_loss", "val_acc", "time_s")
CHECKPOINT_NAME = "checkpoint.pt"
METRICS_CSV = "metrics.csv"
METRICS_JSON = "metrics.json"
#: Folder of the TensorBoard events inside ``out_dir`` (``tensorboard=True``).
TENSORBOARD_DIR = "tensorboard"
#: TensorBoard tag of each per-epoch scalar: the :data:`METRIC_FIELDS` columns but
#: ``epoch`` (the step), and ``lr``, the learning rate the epoch trained with.
TENSORBOARD_TAGS = {"train_loss": "loss/train", "val_loss": "loss/val", "val_acc": "accuracy/val",
                    "time_s": "time/epoch_s", "lr": "lr"}
_EVENTS_PREFIX = "events.out.tfevents."
_FORMAT = "iternn.train/2"
_EVAL_CHUNK = 1024


# --------------------------------------------------------------------------- config


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class TrainConfig:
    """Training options (validated on construction; errors name the key).

    Attributes:
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"``.
        lr: learning rate (> 0).
        weight_decay: L2 penalty (``adam``, ``sgd``) or decoupled decay (``adamw``), >= 0.
        momentum: SGD momentum in [0, 1); ignored by the Adam variants.
        epochs: maximum number of epochs (>= 1); ``None`` when ``steps`` is given.
            Neither given: 20. Both given: a :class:`~iternn.ConfigError`.
        batch_size: samples per optimizer step (the *global* batch under
            :mod:`iternn.study.distributed`).
        patience: early stopping after this many epochs without an improvement of the
            selection criterion; ``None`` disables it (and must, with ``select="final"``).
        seed: seeds the batch order and the global RNG used inside the model.
        loss_on: ``"last"`` (the model's output) or ``"all"`` (mean over applications,
            see the module docstring).
        max_grad_norm: clip the global gradient norm to this value; ``None``: no clipping.
        lr_schedule: ``"constant"`` or ``"cosine"`` (annealed to 0 over ``epochs``,
            stepped once per epoch).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` … or ``"auto"`` (CUDA when available).
            The model is moved there (in place).
        select: ``"val_loss"``, ``"val_acc"`` or ``"final"``: which weights the run ends
            with (see the module docstring).
        steps: the budget in optimizer steps (>= 1) instead of ``epochs``; ``None``: the
            budget is ``epochs``.
    """

    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.0
    epochs: int | None = None
    batch_size: int = 64
    patience: int | None = None
    seed: int = 0
    loss_on: str = "last"
    max_grad_norm: float | None = None
    lr_schedule: str = "constant"
    device: str = "cpu"
    select: str = "val_loss"
    steps: int | None = None

    def __post_init__(self) -> None:
        def bad(key: str, what: str) -> ConfigError:
            return ConfigError(f"TrainConfig.{key} must be {what}, got {getattr(self, key)!r}")

        for key, choices in (("optimizer", OPTIMIZERS), ("loss_on", LOSS_ON),
                             ("lr_schedule", LR_SCHEDULES), ("select", SELECTIONS)):
            if getattr(self, key) not in choices:
                raise bad(key, "one of " + ", ".join(repr(c) for c in choices))
        if not (_is_number(self.lr) and math.isfinite(self.lr) and self.lr > 0):
            raise bad("lr", "a finite number > 0")
        if not (_is_number(self.weight_decay) and math.isfinite(self.weight_decay)
                and self.weight_decay >= 0):
            raise bad("weight_decay", "a finite number >= 0")
        if not (_is_number(self.momentum) and 0 <= self.momentum < 1):
            raise bad("momentum", "a number in [0, 1)")
        if self.steps is not None:
            if not (_is_int(self.steps) and self.steps >= 1):
                raise bad("steps", "None or an int >= 1")
            if self.epochs is not None:
                raise ConfigError(f"TrainConfig.epochs and TrainConfig.steps are exclusive "
                                  f"budgets, got epochs={self.epochs!r} and steps={self.steps!r} "
                                  "(give one)")
        elif self.epochs is None:
            object.__setattr__(self, "epochs", 20)
        if self.epochs is not None and not (_is_int(self.epochs) and self.epochs >= 1):
            raise bad("epochs", "an int >= 1")
        if not (_is_int(self.batch_size) and self.batch_size >= 1):
            raise bad("batch_size", "an int >= 1")
        if self.patience is not None and not (_is_int(self.patience) and self.patience >= 1):
            raise bad("patience", "None or an int >= 1")
        if self.patience is not None and self.select == "final":
            raise ConfigError(f"TrainConfig.patience must be None with select='final' (early "
                              f"stopping watches a validation criterion), got {self.patience!r}")
        if not (_is_int(self.seed) and 0 <= self.seed < 2**63):
            raise bad("seed", "an int in [0, 2**63)")
        if self.max_grad_norm is not None and not (
            _is_number(self.max_grad_norm) and math.isfinite(self.max_grad_norm)
            and self.max_grad_norm > 0
        ):
            raise bad("max_grad_norm", "None or a finite number > 0")
        if not isinstance(self.device, str):
            raise bad("device", "a device string such as 'cpu', 'cuda:0' or 'auto'")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise bad("device", "a device string such as 'cpu', 'cuda:0' or 'auto'") from None
        for key in ("lr", "weight_decay", "momentum"):
            object.__setattr__(self, key, float(getattr(self, key)))
        if self.max_grad_norm is not None:
            object.__setattr__(self, "max_grad_norm", float(self.max_grad_norm))

    def to_dict(self) -> dict[str, Any]:
        """The options as a plain dict (JSON-ready)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> TrainConfig:
        """Build from a dict; an unknown key is a :class:`~iternn.ConfigError` that names it."""
        if not isinstance(options, dict):
            raise MapTypeError(f"options must be a dict, got {type(options).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known, key=str)
        if unknown:
            raise ConfigError(
                f"unknown TrainConfig key {unknown[0]!r} (known: {', '.join(sorted(known))})"
            )
        return cls(**options)


def summary_writer_class() -> type:
    """``torch.utils.tensorboard.SummaryWriter``; :class:`TensorBoardMissingError` when the
    ``tensorboard`` package (which it needs) cannot be imported."""
    try:
        importlib.import_module("tensorboard")  # what torch.utils.tensorboard needs
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise TensorBoardMissingError("TensorBoard logging needs the 'tensorboard' package: "
                                      "pip install 'iternn[tensorboard]'") from e
    return SummaryWriter


def _remove_events(folder: Path) -> None:
    """Delete the TensorBoard events files of ``folder`` (and the folder, if left empty)."""
    if not folder.is_dir():
        return
    for f in folder.iterdir():
        if f.is_file() and f.name.startswith(_EVENTS_PREFIX):
            f.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:  # other files in it: not ours to delete
        pass


def _write_scalars(writer: Any, values: dict[str, Any], step: int) -> None:
    for key, tag in TENSORBOARD_TAGS.items():
        v = values.get(key)
        if v is not None:
            writer.add_scalar(tag, float(v), step)
    writer.flush()


# --------------------------------------------------------------------------- result


def _finite_or_none(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite_or_none(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite_or_none(x) for x in v]
    return v


@dataclass
class TrainResult:
    """What a run produced.

    Attributes:
        status: ``"ok"`` (all epochs ran), ``"early_stopped"`` or ``"diverged"``.
        epochs_run: completed epochs (``len(metrics)``).
        best_epoch: the epoch (1-based) whose weights ``select`` chose (the lowest
            validation loss, the highest validation accuracy, or the last); ``None`` if
            none completed.
        best_val_loss: that epoch's validation loss (``None`` without a validation split).
        metrics: one dict per completed epoch with :data:`METRIC_FIELDS` (``val_acc`` is
            ``None`` for regression, ``val_loss`` and ``val_acc`` without a validation
            split; ``time_s`` is that epoch's wall time).
        test: ``{"test_loss", "test_acc"}`` of the chosen weights, ``None`` when there are
            none or no test split.
        wall_time_s: total wall time, summed over resumed sessions.
        trainable: trainable entries of the model (:func:`iternn.count_trainable`).
        diverged_at: ``{"epoch", "batch", "loss"}`` for a diverged run (``batch`` is
            ``None`` when the validation loss was the non-finite one).
        resumed_from: the checkpoint's epoch when the run was resumed, else ``None``.
        world_size: processes that trained it (1 unless distributed).
        config: the :class:`TrainConfig` as a dict.
        out_dir: where the files went, if anywhere.
    """

    status: str
    epochs_run: int
    best_epoch: int | None
    best_val_loss: float | None
    metrics: list[dict[str, Any]]
    test: dict[str, Any] | None
    wall_time_s: float
    trainable: int
    diverged_at: dict[str, Any] | None = None
    resumed_from: int | None = None
    world_size: int = 1
    config: dict[str, Any] = field(default_factory=dict)
    out_dir: str | None = None

    @property
    def test_loss(self) -> float | None:
        return None if self.test is None else self.test["test_loss"]

    @property
    def test_acc(self) -> float | None:
        return None if self.test is None else self.test["test_acc"]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (non-finite floats become ``None``)."""
        return _finite_or_none(dataclasses.asdict(self))

    @classmethod
    def _from_state(cls, d: dict[str, Any]) -> TrainResult:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# --------------------------------------------------------------------------- communication


class _LocalComm:
    """The single-process stand-in for :class:`iternn.study.distributed.TorchComm`."""

    rank = 0
    world_size = 1

    def all_reduce_(self, tensor: Tensor) -> None:  # sum, in place
        pass

    def broadcast_object(self, obj: Any) -> Any:
        return obj

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]


# --------------------------------------------------------------------------- helpers


def _check_data(data: Any, config: TrainConfig) -> None:
    for name in ("x_train", "y_train", "x_val", "y_val", "task"):
        if not hasattr(data, name):
            raise MapTypeError(f"data has no attribute {name!r} (expected a Dataset-like object)")
    if data.task not in TASKS:
        raise DataError(f"data.task must be one of {', '.join(TASKS)}, got {data.task!r}")
    if config.select == "val_acc" and data.task == "regression":
        raise ConfigError("TrainConfig.select='val_acc' needs an accuracy, and task 'regression' "
                          "has none (use 'val_loss' or 'final')")
    for split in ("train", "val", "test"):
        x, y = getattr(data, f"x_{split}", None), getattr(data, f"y_{split}", None)
        if split == "test" and x is None and y is None:
            continue
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise MapTypeError(f"data.x_{split} and data.y_{split} must be tensors")
        if x.shape[0] != y.shape[0]:
            raise DataError(
                f"data.x_{split} has {x.shape[0]} samples but data.y_{split} has {y.shape[0]}"
            )
        if split == "train" and x.shape[0] == 0:
            raise DataError("data.x_train is empty")
        if split == "val" and x.shape[0] == 0 and config.select != "final":
            raise DataError(f"data.x_val is empty: select={config.select!r} chooses the weights "
                            "on the validation split (select='final' trains without one)")
        if data.task != "regression" and y.is_floating_point():
            raise DataError(
                f"data.y_{split} must hold integer class labels for task {data.task!r}, "
                f"got dtype {y.dtype}"
            )


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _float_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def _prepare(x: Tensor, y: Tensor, task: str, dtype: torch.dtype,
             device: torch.device) -> tuple[Tensor, Tensor]:
    x = x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)
    y = y.to(device=device, dtype=dtype) if task == "regression" else y.to(device, torch.long)
    return x, y


def _per_sample_loss(out: Tensor, y: Tensor, task: str) -> Tensor:
    if task == "regression":
        if out.shape != y.shape:
            if out.numel() != y.numel():
                raise MapError(
                    f"model output {tuple(out.shape)} does not match targets {tuple(y.shape)}"
                )
            y = y.reshape(out.shape)
        loss = F.mse_loss(out, y, reduction="none")
        return loss.reshape(loss.shape[0], -1).mean(1)
    if out.dim() != 2:
        raise MapError(
            f"for task classification/sequence the model must return (N, n_classes) logits, "
            f"got shape {tuple(out.shape)}"
        )
    return F.cross_entropy(out, y, reduction="none")


def _outputs_all(model: nn.Module, x: Tensor) -> list[Tensor] | None:
    """Per-application outputs of ``model`` at ``x``, or ``None`` when it has none."""
    forward_all = getattr(model, "forward_all", None)
    if callable(forward_all):
        outs = list(forward_all(x))
        if not outs:
            raise MapError("model.forward_all returned no outputs")
        return outs
    if isinstance(model, MapModule) and model.steps >= 1:
        traj = iterate(model.map, {model.input: x}, model.steps, hold=(model.input,),
                       trajectory=True)[model.output]
        return list(traj.unbind(0))
    return None


def _param_groups_by_dtype(params: Sequence[Tensor]) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((p.dtype, p.device), []).append(i)
    return groups


@torch.no_grad()
def _evaluate(model: nn.Module, x: Tensor, y: Tensor, task: str, comm: Any,
              device: torch.device) -> tuple[float, float | None]:
    """Mean loss and accuracy (``None`` for regression) of ``model(x)``; each rank takes a
    contiguous shard and the sums are all-reduced."""
    n = x.shape[0]
    shard = torch.arange(n).tensor_split(comm.world_size)[comm.rank]
    start, stop = (int(shard[0]), int(shard[-1]) + 1) if shard.numel() else (0, 0)
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        for i in range(start, stop, _EVAL_CHUNK):
            j = min(i + _EVAL_CHUNK, stop)
            out = model(x[i:j])
            sums[0] += _per_sample_loss(out, y[i:j], task).sum().double()
            if task != "regression":
                sums[1] += (out.argmax(-1) == y[i:j]).sum().double()
    finally:
        model.train(was_training)
    comm.all_reduce_(sums)
    loss = float(sums[0]) / n
    acc = None if task == "regression" else float(sums[1]) / n
    return loss, acc


def evaluate(model: nn.Module, x: Tensor, y: Tensor, task: str) -> dict[str, float | None]:
    """``{"loss", "acc"}`` of ``model`` on ``(x, y)`` for ``task`` (``acc`` is ``None`` for
    regression), in eval mode and without gradients, on the model's device and dtype."""
    if task not in TASKS:
        raise DataError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    x, y = _prepare(x, y, task, _float_dtype(model), device)
    loss, acc = _evaluate(model, x, y, task, _LocalComm(), device)
    return {"loss": loss, "acc": acc}


def _score(select: str, val_loss: float | None, val_acc: float | None) -> float:
    """The selection criterion of an epoch, lower is better (``"final"``: always 0)."""
    if select == "val_loss":
        return val_loss
    if select == "val_acc":
        return -val_acc
    return 0.0


def _state_copy(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _make_optimizer(params: list[Tensor], config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=config.lr, weight_decay=config.weight_decay)


def _make_scheduler(opt: torch.optim.Optimizer, config: TrainConfig, epochs: int):
    if config.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    return None


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _csv_text(metrics: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(METRIC_FIELDS)
    for row in metrics:
        writer.writerow(["" if row.get(k) is None else repr(row[k]) if isinstance(row[k], float)
                         else row[k] for k in METRIC_FIELDS])
    return buf.getvalue()


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class _Progress:
    """tqdm bars (epochs, batches of the current epoch) or nothing."""

    def __init__(self, enabled: bool, epochs: int, initial: int) -> None:
        self._tqdm = None
        self.epochs = self.batches = None
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:  # progress bars are optional
            return
        self._tqdm = tqdm
        self.epochs = tqdm(total=epochs, initial=initial, desc="train", unit="epoch",
                           file=sys.stderr, dynamic_ncols=True)

    def start_epoch(self, epoch: int, n_batches: int) -> None:
        if self._tqdm is not None:
            self.batches = self._tqdm(total=n_batches, desc=f"epoch {epoch}", unit="batch",
                                      leave=False, file=sys.stderr, dynamic_ncols=True)

    def batch(self) -> None:
        if self.batches is not None:
            self.batches.update(1)

    def end_epoch(self, row: dict[str, Any]) -> None:
        if self.batches is not None:
            self.batches.close()
            self.batches = None
        if self.epochs is not None:
            self.epochs.set_postfix(train_loss=_fmt(row["train_loss"]),
                                    val_loss=_fmt(row["val_loss"]), refresh=False)
            self.epochs.update(1)

    def write(self, log: Callable[[str], Any], line: str) -> None:
        if self._tqdm is not None:
            with self._tqdm.external_write_mode(file=sys.stderr):
                log(line)
        else:
            log(line)

    def close(self) -> None:
        for bar in (self.batches, self.epochs):
            if bar is not None:
                bar.close()
        self.batches = self.epochs = None


# --------------------------------------------------------------------------- training


def train(
    model: nn.Module,
    data: Any,
    config: TrainConfig | None = None,
    *,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], Any] | None = None,
    on_epoch: Callable[[dict[str, Any]], Any] | None = None,
    tensorboard: bool = False,
    run_options: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train ``model`` on ``data`` (see the module docstring for every rule).

    Args:
        model: any ``nn.Module`` mapping a batch of ``x`` to outputs; trained in place
            and left holding the best epoch's weights.
        data: a Dataset-like object (``x_train, y_train, x_val, y_val, x_test, y_test,
            task``).
        config: the options; ``None`` means ``TrainConfig()``.
        out_dir: folder for ``checkpoint.pt``, ``metrics.csv``, ``metrics.json`` and
            ``run.json`` (created, and locked while the run trains); ``None`` writes nothing.
        resume: continue from ``out_dir/checkpoint.pt`` if it exists (a fresh run
            otherwise), under the rules of :mod:`iternn.study.resume`: ``epochs`` may
            grow, ``patience`` and ``device`` may change, nothing else.
        progress: draw tqdm bars when stderr is a TTY.
        log: receives one line per epoch and per event (resume, early stop, divergence,
            end); default: no output.
        on_epoch: called with each completed epoch's metrics row (after the files are
            written): a hook for any other sink.
        tensorboard: also write each epoch's scalars (the ``metrics.csv`` values and the
            learning rate, tags :data:`TENSORBOARD_TAGS`, step = epoch) to TensorBoard
            events in ``out_dir/tensorboard``; needs ``out_dir`` and the ``tensorboard``
            package (``pip install 'iternn[tensorboard]'``). A resumed run writes from the
            epoch after its checkpoint on (see the module docstring).
        run_options: what defines the run besides ``config`` (JSON-ready values: the
            dataset and its options, the model family, widths, activation, ...), stored
            in ``out_dir/run.json`` and compared on resume.

    Raises:
        MapTypeError / ConfigError / DataError: a bad model, config or data set;
            ``tensorboard=True`` or ``resume=True`` without ``out_dir``.
        ResumeError: ``resume=True`` with options the checkpoint cannot honour (the
            message names each one with its stored and new value), or a folder without
            stored options.
        FormatError: an unreadable checkpoint (the message names the file).
        FolderLockedError: another process trains into ``out_dir``.
        TensorBoardMissingError: ``tensorboard=True`` without the ``tensorboard``
            package (an ``ImportError``), raised before training starts.
    """
    return _fit(model, data, config, out_dir=out_dir, resume=resume, progress=progress,
                log=log, on_epoch=on_epoch, comm=_LocalComm(), tensorboard=tensorboard,
                run_options=run_options)


def _fit(model: nn.Module, data: Any, config: TrainConfig | None, *, out_dir, resume: bool,
         progress: bool, log, comm: Any, device: torch.device | None = None,
         on_epoch=None, tensorboard: bool = False,
         run_options: Mapping[str, Any] | None = None) -> TrainResult:
    """:func:`train` with a communicator (``comm``): the checks, the folder lock, the run."""
    session_start = time.perf_counter()
    config = TrainConfig() if config is None else config
    if not isinstance(config, TrainConfig):
        raise MapTypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise MapTypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_data(data, config)
    if resume and out_dir is None:
        raise ConfigError("resume=True needs out_dir (where the checkpoint is)")
    if not isinstance(tensorboard, bool):
        raise MapTypeError(f"tensorboard must be True or False, got {tensorboard!r}")
    if tensorboard and out_dir is None:
        raise ConfigError(f"tensorboard=True needs out_dir (the events go to OUT/{TENSORBOARD_DIR})")
    if run_options is not None and not isinstance(run_options, Mapping):
        raise MapTypeError(f"run_options must be a mapping, got {type(run_options).__name__}")
    # on every rank, so that all of them stop before the first collective
    writer_class = summary_writer_class() if tensorboard else None
    out = Path(out_dir) if out_dir is not None else None
    run = _Run(model, data, config, out=out, comm=comm, device=device, log=log,
               on_epoch=on_epoch, session_start=session_start)
    try:
        # the global RNG (in-model randomness) is seeded, and restored for the caller at the end
        with torch.random.fork_rng(devices=run.cuda_devices):
            finished = run.start(resume, run_options)
            if finished is not None:
                return finished
            return run.train(progress=progress, writer_class=writer_class, resume=resume)
    finally:
        run.release()


class _Run:
    """One training session: the data on the device, the optimizer and the RNGs, the
    early-stopping state, and the steps :func:`_fit` takes — :meth:`start` (lock the
    folder, then restore or start fresh), :meth:`train` (the epochs, each an
    :meth:`epoch_pass`, then :meth:`finish`) and :meth:`release` (the lock)."""

    def __init__(self, model: nn.Module, data: Any, config: TrainConfig, *, out: Path | None,
                 comm: Any, device: torch.device | None, log, on_epoch,
                 session_start: float) -> None:
        self.model, self.config, self.out, self.comm = model, config, out, comm
        self.rank0 = comm.rank == 0
        self.emit = log if (log is not None and self.rank0) else None
        self.on_epoch = on_epoch
        self.session_start = session_start
        self.task = task = data.task
        self.device = device = device if device is not None else _resolve_device(config.device)
        model.to(device)
        dtype = _float_dtype(model)
        self.x_train, self.y_train = _prepare(data.x_train, data.y_train, task, dtype, device)
        self.x_val, self.y_val = _prepare(data.x_val, data.y_val, task, dtype, device)
        self.has_val = self.x_val.shape[0] > 0
        x_test = getattr(data, "x_test", None)
        self.has_test = x_test is not None and x_test.shape[0] > 0
        if self.has_test:
            self.x_test, self.y_test = _prepare(data.x_test, data.y_test, task, dtype, device)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise MapError("the model has no trainable parameters")
        self.trainable = count_trainable(model)
        self.opt = _make_optimizer(self.params, config)
        # the budget: every epoch has n_batches steps, but the last under a step budget
        self.n_batches = -(-self.x_train.shape[0] // config.batch_size)
        self.total_epochs = config.epochs if config.steps is None else \
            -(-config.steps // self.n_batches)
        self.sched = _make_scheduler(self.opt, config, self.total_epochs)
        self.shuffle = torch.Generator()
        self.shuffle.manual_seed(config.seed)
        self.cuda_devices = [device.index if device.index is not None
                             else torch.cuda.current_device()] if device.type == "cuda" else []
        self.ckpt_path = out / CHECKPOINT_NAME if out is not None else None
        self.config_dict = config.to_dict()
        # the state every epoch changes (saved in the checkpoints)
        self.epoch = 0
        self.metrics: list[dict[str, Any]] = []
        self.best_epoch: int | None = None
        self.best_val: float | None = None  # the selected epoch's validation loss
        self.best_score = math.inf  # the selection criterion, lower is better
        self.bad_epochs = 0
        self.best_state = _state_copy(model)  # the initial weights until an epoch completes
        self.wall_before = 0.0
        self.resumed_from: int | None = None
        self.warned_all = False
        # rank 0 writes the files: it holds the folder's lock from start() to release()
        self._lock = FolderLock(out, what="run folder") if out is not None and self.rank0 else None

    def release(self) -> None:
        """Release the folder's lock (if this rank holds it)."""
        if self._lock is not None:
            self._lock.release()

    # ---------------------------------------------------------------- start or restore
    def start(self, resume: bool, run_options: Mapping[str, Any] | None) -> TrainResult | None:
        """Lock the folder and read the checkpoint (rank 0; shared with every rank), or
        clear the folder for a fresh run; seed the global RNG, restore the checkpoint's
        state. Returns the stored result when a finished run has nothing left to do."""
        outcome: tuple[str, Any] = ("fresh", None)
        if self.rank0 and self.out is not None:
            try:
                self._lock.acquire()
                outcome = self._open_folder(resume, run_options)
            except Exception as e:  # noqa: BLE001 - raised on every rank below
                outcome = ("error", e)
        if self.comm.world_size > 1 and self.out is not None:
            outcome = self.comm.broadcast_object(outcome)
        kind, ckpt = outcome
        if kind == "error":
            raise ckpt
        torch.manual_seed(self.config.seed + self.comm.rank)
        return None if kind == "fresh" else self._restore(ckpt)

    def _open_folder(self, resume: bool, run_options: Mapping[str, Any] | None) -> tuple[str, Any]:
        out = self.out
        if resume and self.ckpt_path.is_file():
            ckpt = load_checkpoint(self.ckpt_path)
            if ckpt.get("format") != _FORMAT:
                raise ResumeError(f"cannot resume {out}: {self.ckpt_path} is not a training checkpoint "
                                  f"of this version (format {ckpt.get('format')!r}, expected "
                                  f"{_FORMAT!r}); delete the folder to train the run again")
            stored = read_run_options(out)
            diffs = resume_differences(stored, run_options, self.config_dict,
                                       epochs_done=int(ckpt["epoch"]), metrics=ckpt["metrics"])
            if diffs:
                raise ResumeError(f"cannot resume {out}: {len(diffs)} option(s) differ from the "
                                  f"stored run: {'; '.join(diffs)} (train without resume, or "
                                  "into another folder, to start over)")
            write_run_options(out, run_options, self.config_dict)
            return "resume", ckpt
        if resume:
            _emit(self.emit, f"no checkpoint in {out}: starting a fresh run")
        else:
            for name in (CHECKPOINT_NAME, METRICS_CSV, METRICS_JSON):
                (out / name).unlink(missing_ok=True)
            _remove_events(out / TENSORBOARD_DIR)
        write_run_options(out, run_options, self.config_dict)
        return "fresh", None

    def _restore(self, ckpt: dict[str, Any]) -> TrainResult | None:
        comm = self.comm
        self.epoch = self.resumed_from = int(ckpt["epoch"])
        self.metrics = [dict(r) for r in ckpt["metrics"]]
        best = ckpt["best"]
        self.best_epoch, self.best_val, self.bad_epochs = \
            best["epoch"], best["val_loss"], best["bad_epochs"]
        self.best_score = best.get("score", best["val_loss"])  # older checkpoints: val_loss
        self.best_state = ckpt["best_model"]
        self.wall_before = float(ckpt["wall_time_s"])
        if ckpt.get("finished") and (ckpt.get("train_state") is None or not self._continues()):
            self.model.load_state_dict(ckpt["best_model"])
            result = TrainResult._from_state(ckpt["result"])
            result.resumed_from = self.epoch
            _emit(self.emit, f"{self.ckpt_path} is a finished run (status {result.status}): "
                  "nothing to do")
            return result
        state = ckpt["train_state"]
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        if self.sched is not None:
            self.sched.load_state_dict(state["scheduler"])
        rng = state["rng"]
        self.shuffle.set_state(rng["shuffle"])
        if len(rng["torch"]) == comm.world_size:
            torch.set_rng_state(rng["torch"][comm.rank])
            if self.cuda_devices and rng.get("cuda") and len(rng["cuda"]) == comm.world_size:
                torch.cuda.set_rng_state(rng["cuda"][comm.rank], self.cuda_devices[0])
        else:
            torch.manual_seed(self.config.seed + comm.rank + 7919 * self.epoch)
            _emit(self.emit, f"the checkpoint was written by {len(rng['torch'])} processes, not "
                  f"{comm.world_size}: in-model randomness is reseeded (not bit-exact)")
        _emit(self.emit, f"resumed from {self.ckpt_path} at epoch {self.epoch}")
        return None

    def _continues(self) -> bool:
        """Whether another epoch would run (budget left, not early-stopped)."""
        return self.epoch < self.total_epochs and not self._early_stop_due()

    def _early_stop_due(self) -> bool:
        return (self.best_epoch is not None and self.config.patience is not None
                and self.bad_epochs >= self.config.patience)

    # ---------------------------------------------------------------- the epochs
    def train(self, *, progress: bool, writer_class: type | None, resume: bool) -> TrainResult:
        """The epochs until the end, then :meth:`finish`."""
        status, diverged_at = self._epochs(progress, writer_class, resume)
        return self.finish(status, diverged_at)

    def _epochs(self, progress: bool, writer_class: type | None,
                resume: bool) -> tuple[str, dict[str, Any] | None]:
        config, total = self.config, self.total_epochs
        bar = _Progress(progress and self.rank0 and _isatty(sys.stderr), total, self.epoch)
        emit = (lambda line: bar.write(self.emit, line)) if self.emit is not None else None
        tb = None
        try:
            if writer_class is not None and self.rank0:
                # purge_step: TensorBoard hides points a killed session wrote past the
                # checkpoint (epochs >= epoch + 1), which this session writes again
                tb = writer_class(log_dir=str(self.out / TENSORBOARD_DIR),
                                  purge_step=self.epoch + 1 if resume else None)
            self.model.train()
            while self.epoch < total:
                if self._early_stop_due():
                    what = "lower validation loss" if config.select == "val_loss" else \
                        "higher validation accuracy"
                    _emit(emit, f"early stop after epoch {self.epoch}: no {what} for "
                          f"{self.bad_epochs} epochs (best epoch {self.best_epoch})")
                    return "early_stopped", None
                self.epoch += 1
                t0 = time.perf_counter()
                lr = self.opt.param_groups[0]["lr"]  # what this epoch trains with
                n_batches = self.n_batches if config.steps is None else \
                    min(self.n_batches, config.steps - (self.epoch - 1) * self.n_batches)
                bar.start_epoch(self.epoch, n_batches)
                loss_total, n_seen, diverged_at = self.epoch_pass(bar, emit, n_batches)
                if diverged_at is not None:
                    _emit(emit, f"diverged at epoch {self.epoch}, batch "
                          f"{diverged_at['batch']}: loss {diverged_at['loss']}")
                    return "diverged", diverged_at
                if self.sched is not None:
                    self.sched.step()
                val_loss = val_acc = None
                if self.has_val:
                    val_loss, val_acc = _evaluate(self.model, self.x_val, self.y_val, self.task,
                                                  self.comm, self.device)
                row = {"epoch": self.epoch, "train_loss": loss_total / n_seen,
                       "val_loss": val_loss, "val_acc": val_acc, "time_s": time.perf_counter() - t0}
                self.metrics.append(row)
                bar.end_epoch(row)
                if tb is not None:
                    _write_scalars(tb, {**row, "lr": lr}, self.epoch)
                if val_loss is not None and not math.isfinite(val_loss):
                    _emit(emit, f"diverged at epoch {self.epoch}: validation loss {val_loss}")
                    return "diverged", {"epoch": self.epoch, "batch": None, "loss": val_loss}
                score = _score(config.select, val_loss, val_acc)
                if score < self.best_score or config.select == "final":
                    self.best_score, self.best_val, self.best_epoch, self.bad_epochs = \
                        score, val_loss, self.epoch, 0
                    self.best_state = _state_copy(self.model)
                else:
                    self.bad_epochs += 1
                self.save_checkpoint()
                _emit(emit, f"epoch {self.epoch}/{total}  train_loss "
                      f"{_fmt(row['train_loss'])}  val_loss {_fmt(val_loss)}  val_acc "
                      f"{_fmt(val_acc)}  {row['time_s']:.2f}s")
                if self.on_epoch is not None and self.rank0:
                    self.on_epoch(dict(row))
            return "ok", None
        finally:
            bar.close()
            if tb is not None:
                tb.close()

    def epoch_pass(self, bar: _Progress, emit,
                   n_batches: int) -> tuple[float, int, dict[str, Any] | None]:
        """One pass over the shuffled training set, its first ``n_batches`` batches:
        ``(summed loss, samples seen, diverged_at)``, where ``diverged_at`` is set (and the
        pass stopped) at the first non-finite batch loss."""
        config, comm, model = self.config, self.comm, self.model
        batch = config.batch_size
        n_train = self.x_train.shape[0]
        perm = torch.randperm(n_train, generator=self.shuffle).to(self.device)
        loss_total = 0.0
        seen = 0
        for b in range(n_batches):
            idx = perm[b * batch:(b + 1) * batch]
            global_n = idx.numel()
            local = idx.tensor_split(comm.world_size)[comm.rank] if comm.world_size > 1 else idx
            self.opt.zero_grad(set_to_none=True)
            if local.numel():
                xb, yb = self.x_train[local], self.y_train[local]
                outs = _outputs_all(model, xb) if config.loss_on == "all" else None
                if outs is None:
                    if config.loss_on == "all" and not self.warned_all:
                        self.warned_all = True
                        _emit(emit, f"loss_on='all': {type(model).__name__} has "
                              "no forward_all, using its single output")
                    outs = [model(xb)]
                if len(outs) == 1:
                    per_sample = _per_sample_loss(outs[0], yb, self.task)
                else:
                    per_sample = torch.stack(
                        [_per_sample_loss(o, yb, self.task) for o in outs]).mean(0)
                loss_sum = per_sample.sum()
                (loss_sum / global_n).backward()
                loss_sum = loss_sum.detach()
            else:
                loss_sum = torch.zeros((), device=self.device)
            if comm.world_size > 1:
                loss_value = _all_reduce_grads(self.params, loss_sum, comm, self.device)
            else:
                loss_value = float(loss_sum)
            if not math.isfinite(loss_value):
                return loss_total, seen, {"epoch": self.epoch, "batch": b + 1,
                                          "loss": loss_value / global_n}
            if config.max_grad_norm is not None:
                nn.utils.clip_grad_norm_(self.params, config.max_grad_norm)
            self.opt.step()
            loss_total += loss_value
            seen += global_n
            bar.batch()
        return loss_total, seen, None

    # ---------------------------------------------------------------- checkpoints, end
    def _rng_states(self) -> dict[str, Any]:
        """Every RNG state (a collective: every rank calls it)."""
        states = {"shuffle": self.shuffle.get_state(),
                  "torch": self.comm.all_gather_object(torch.get_rng_state()), "cuda": None}
        if self.cuda_devices:
            states["cuda"] = self.comm.all_gather_object(
                torch.cuda.get_rng_state(self.cuda_devices[0]).cpu())
        return states

    def _checkpoint(self, *, finished: bool, train_state: dict[str, Any] | None) -> dict[str, Any]:
        return {"format": _FORMAT, "epoch": self.epoch, "finished": finished,
                "config": self.config_dict, "world_size": self.comm.world_size,
                "train_state": train_state, "best_model": self.best_state,
                "best": {"epoch": self.best_epoch, "val_loss": self.best_val,
                         "score": self.best_score, "bad_epochs": self.bad_epochs},
                "metrics": self.metrics,
                "wall_time_s": self.wall_before + time.perf_counter() - self.session_start}

    def _train_state(self, rng: dict[str, Any]) -> dict[str, Any]:
        """What continuing needs beyond the early-stopping state: weights, optimizer,
        schedule, RNGs."""
        return {"model": _state_copy(self.model), "optimizer": self.opt.state_dict(),
                "scheduler": None if self.sched is None else self.sched.state_dict(), "rng": rng}

    def save_checkpoint(self) -> None:
        """After an epoch: the checkpoint and the metric files (rank 0; the RNG states are
        a collective, so every rank calls this)."""
        if self.out is None:
            return
        rng = self._rng_states()
        if self.rank0:
            save_checkpoint(self.ckpt_path, self._checkpoint(finished=False,
                                                             train_state=self._train_state(rng)))
            self._write_files(self._snapshot("running"))

    def _snapshot(self, status: str, test=None, diverged_at=None) -> TrainResult:
        return TrainResult(
            status=status, epochs_run=len(self.metrics), best_epoch=self.best_epoch,
            best_val_loss=self.best_val,
            metrics=[dict(r) for r in self.metrics], test=test,
            wall_time_s=self.wall_before + time.perf_counter() - self.session_start,
            trainable=self.trainable, diverged_at=diverged_at, resumed_from=self.resumed_from,
            world_size=self.comm.world_size, config=self.config_dict,
            out_dir=None if self.out is None else str(self.out))

    def _write_files(self, result: TrainResult) -> None:
        atomic_write_text(self.out / METRICS_CSV, _csv_text(result.metrics))
        atomic_write_text(self.out / METRICS_JSON,
                          json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n")

    def finish(self, status: str, diverged_at: dict[str, Any] | None) -> TrainResult:
        """The best weights back, the test metrics, the finished checkpoint (which keeps
        the last epoch's state, so that more epochs can follow; not after a divergence)
        and the final files."""
        train_state = None
        if self.out is not None and status != "diverged" and self.metrics:
            rng = self._rng_states()
            train_state = self._train_state(rng) if self.rank0 else None
        self.model.load_state_dict(self.best_state)
        test = None
        if self.best_epoch is not None and self.has_test:
            test_loss, test_acc = _evaluate(self.model, self.x_test, self.y_test, self.task,
                                            self.comm, self.device)
            test = {"test_loss": test_loss, "test_acc": test_acc}
        result = self._snapshot(status, test, diverged_at)
        if self.out is not None and self.rank0:
            state = self._checkpoint(finished=True, train_state=train_state)
            state["result"] = dataclasses.asdict(result)
            save_checkpoint(self.ckpt_path, state)
            self._write_files(result)
        _emit(self.emit, _done_line(result))
        return result


def _emit(log: Callable[[str], Any] | None, line: str) -> None:
    if log is not None:
        log(line)


def _done_line(r: TrainResult) -> str:
    parts = [f"done: status {r.status}", f"{r.epochs_run} epochs",
             f"best epoch {_fmt(r.best_epoch)}"]
    if r.test is not None:
        parts.append(f"test_loss {_fmt(r.test['test_loss'])}")
        if r.test["test_acc"] is not None:
            parts.append(f"test_acc {_fmt(r.test['test_acc'])}")
    parts.append(f"{r.wall_time_s:.1f}s")
    return ", ".join(parts)


def _all_reduce_grads(params: list[Tensor], loss_sum: Tensor, comm: Any,
                      device: torch.device) -> float:
    """Sum every rank's gradients (each rank's loss is already divided by the global batch,
    so the sum is the gradient of the global batch mean) and the loss sums; returns the
    global loss sum. A parameter no rank produced a gradient for keeps ``grad=None``."""
    stats = torch.zeros(1 + len(params), dtype=torch.float64, device=device)
    stats[0] = loss_sum.double()
    for i, p in enumerate(params):
        if p.grad is not None:
            stats[1 + i] = 1.0
    comm.all_reduce_(stats)
    for idx in _param_groups_by_dtype(params).values():
        grads = [params[i].grad if params[i].grad is not None else torch.zeros_like(params[i])
                 for i in idx]
        flat = torch.cat([g.reshape(-1) for g in grads])
        comm.all_reduce_(flat)
        offset = 0
        for i in idx:
            p = params[i]
            n = p.numel()
            if stats[1 + i] > 0:
                p.grad = flat[offset:offset + n].view_as(p).clone()
            else:
                p.grad = None
            offset += n
    return float(stats[0])
