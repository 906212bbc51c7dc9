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

**Early stopping.** After every epoch the model is evaluated on the validation split.
With ``patience=p`` training stops once ``p`` epochs in a row failed to lower the best
validation loss (status ``"early_stopped"``; a run that used all its epochs is ``"ok"``).
Whatever the status, the weights of the best epoch are restored into ``model`` at the
end and the test metrics are theirs.

**Divergence.** A non-finite training loss (checked before each optimizer step) or
validation loss stops the run with status ``"diverged"``; no exception is raised, the
completed epochs' metrics are kept, ``diverged_at`` says where, and the best weights so
far (or the initial ones, if no epoch completed) are restored.

**Files** (with ``out_dir``): ``checkpoint.pt`` (written atomically after every epoch:
model, optimizer, scheduler, RNG states, early-stopping state, best weights, metrics),
``metrics.csv`` (header + one row per completed epoch) and ``metrics.json`` (the
:meth:`TrainResult.to_dict` snapshot; ``status`` is ``"running"`` until the run ends;
non-finite numbers are written as ``null``). ``resume=True`` continues from
``checkpoint.pt`` at the next epoch and reaches exactly the numbers an uninterrupted run
would (``time_s`` and ``wall_time_s`` aside); resuming a finished run returns its result.
A fresh run (``resume=False``) deletes these files first.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.summary import count_trainable
from ..engine.iterate import iterate
from ..engine.map_module import MapModule
from .checkpoint import atomic_write_text, load_checkpoint, save_checkpoint
from ..errors import TensorBoardMissingError

__all__ = [
    "TrainConfig",
    "TrainResult",
    "TensorBoardMissingError",
    "train",
    "evaluate",
    "TASKS",
    "OPTIMIZERS",
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
_FORMAT = "iternn.train/1"
_EVAL_CHUNK = 1024
# Keys that may differ between the run that wrote a checkpoint and the one resuming it.
_RESUME_FREE = ("device",)


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
        epochs: maximum number of epochs (>= 1).
        batch_size: samples per optimizer step (the *global* batch under
            :mod:`iternn.study.distributed`).
        patience: early stopping after this many epochs without a lower validation
            loss; ``None`` disables it.
        seed: seeds the batch order and the global RNG used inside the model.
        loss_on: ``"last"`` (the model's output) or ``"all"`` (mean over applications,
            see the module docstring).
        max_grad_norm: clip the global gradient norm to this value; ``None``: no clipping.
        lr_schedule: ``"constant"`` or ``"cosine"`` (annealed to 0 over ``epochs``,
            stepped once per epoch).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` … or ``"auto"`` (CUDA when available).
            The model is moved there (in place).
    """

    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.0
    epochs: int = 20
    batch_size: int = 64
    patience: int | None = None
    seed: int = 0
    loss_on: str = "last"
    max_grad_norm: float | None = None
    lr_schedule: str = "constant"
    device: str = "cpu"

    def __post_init__(self) -> None:
        def bad(key: str, what: str) -> ValueError:
            return ValueError(f"TrainConfig.{key} must be {what}, got {getattr(self, key)!r}")

        for key, choices in (("optimizer", OPTIMIZERS), ("loss_on", LOSS_ON),
                             ("lr_schedule", LR_SCHEDULES)):
            if getattr(self, key) not in choices:
                raise bad(key, "one of " + ", ".join(repr(c) for c in choices))
        if not (_is_number(self.lr) and math.isfinite(self.lr) and self.lr > 0):
            raise bad("lr", "a finite number > 0")
        if not (_is_number(self.weight_decay) and math.isfinite(self.weight_decay)
                and self.weight_decay >= 0):
            raise bad("weight_decay", "a finite number >= 0")
        if not (_is_number(self.momentum) and 0 <= self.momentum < 1):
            raise bad("momentum", "a number in [0, 1)")
        if not (_is_int(self.epochs) and self.epochs >= 1):
            raise bad("epochs", "an int >= 1")
        if not (_is_int(self.batch_size) and self.batch_size >= 1):
            raise bad("batch_size", "an int >= 1")
        if self.patience is not None and not (_is_int(self.patience) and self.patience >= 1):
            raise bad("patience", "None or an int >= 1")
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
        """Build from a dict; an unknown key is a ``ValueError`` that names it."""
        if not isinstance(options, dict):
            raise TypeError(f"options must be a dict, got {type(options).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known, key=str)
        if unknown:
            raise ValueError(
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
        best_epoch: epoch (1-based) with the lowest validation loss; ``None`` if none
            completed.
        best_val_loss: that loss.
        metrics: one dict per completed epoch with :data:`METRIC_FIELDS` (``val_acc`` is
            ``None`` for regression; ``time_s`` is that epoch's wall time).
        test: ``{"test_loss", "test_acc"}`` of the best weights, ``None`` when there are
            no best weights or no test split.
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


def _check_data(data: Any) -> None:
    for name in ("x_train", "y_train", "x_val", "y_val", "task"):
        if not hasattr(data, name):
            raise TypeError(f"data has no attribute {name!r} (expected a Dataset-like object)")
    if data.task not in TASKS:
        raise ValueError(f"data.task must be one of {', '.join(TASKS)}, got {data.task!r}")
    for split in ("train", "val", "test"):
        x, y = getattr(data, f"x_{split}", None), getattr(data, f"y_{split}", None)
        if split == "test" and x is None and y is None:
            continue
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise TypeError(f"data.x_{split} and data.y_{split} must be tensors")
        if x.shape[0] != y.shape[0]:
            raise ValueError(
                f"data.x_{split} has {x.shape[0]} samples but data.y_{split} has {y.shape[0]}"
            )
        if split != "test" and x.shape[0] == 0:
            raise ValueError(f"data.x_{split} is empty")
        if data.task != "regression" and y.is_floating_point():
            raise ValueError(
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
                raise ValueError(
                    f"model output {tuple(out.shape)} does not match targets {tuple(y.shape)}"
                )
            y = y.reshape(out.shape)
        loss = F.mse_loss(out, y, reduction="none")
        return loss.reshape(loss.shape[0], -1).mean(1)
    if out.dim() != 2:
        raise ValueError(
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
            raise ValueError("model.forward_all returned no outputs")
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
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    x, y = _prepare(x, y, task, _float_dtype(model), device)
    loss, acc = _evaluate(model, x, y, task, _LocalComm(), device)
    return {"loss": loss, "acc": acc}


def _state_copy(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _make_optimizer(params: list[Tensor], config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=config.lr, weight_decay=config.weight_decay)


def _make_scheduler(opt: torch.optim.Optimizer, config: TrainConfig):
    if config.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs)
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
) -> TrainResult:
    """Train ``model`` on ``data`` (see the module docstring for every rule).

    Args:
        model: any ``nn.Module`` mapping a batch of ``x`` to outputs; trained in place
            and left holding the best epoch's weights.
        data: a Dataset-like object (``x_train, y_train, x_val, y_val, x_test, y_test,
            task``).
        config: the options; ``None`` means ``TrainConfig()``.
        out_dir: folder for ``checkpoint.pt``, ``metrics.csv``, ``metrics.json``
            (created); ``None`` writes nothing.
        resume: continue from ``out_dir/checkpoint.pt`` if it exists (a fresh run
            otherwise). The checkpoint's config must equal ``config`` (``device`` aside).
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

    Raises:
        ValueError / TypeError: bad data, config, or a checkpoint from another config;
            ``tensorboard=True`` without ``out_dir``.
        TensorBoardMissingError: ``tensorboard=True`` without the ``tensorboard``
            package (an ``ImportError``), raised before training starts.
    """
    return _fit(model, data, config, out_dir=out_dir, resume=resume, progress=progress,
                log=log, on_epoch=on_epoch, comm=_LocalComm(), tensorboard=tensorboard)


def _fit(model: nn.Module, data: Any, config: TrainConfig | None, *, out_dir, resume: bool,
         progress: bool, log, comm: Any, device: torch.device | None = None,
         on_epoch=None, tensorboard: bool = False) -> TrainResult:
    session_start = time.perf_counter()
    if config is None:
        config = TrainConfig()
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_data(data)
    if resume and out_dir is None:
        raise ValueError("resume=True needs out_dir (where the checkpoint is)")
    if not isinstance(tensorboard, bool):
        raise TypeError(f"tensorboard must be True or False, got {tensorboard!r}")
    if tensorboard and out_dir is None:
        raise ValueError(f"tensorboard=True needs out_dir (the events go to OUT/{TENSORBOARD_DIR})")
    # on every rank, so that all of them stop before the first collective
    writer_class = summary_writer_class() if tensorboard else None
    out = Path(out_dir) if out_dir is not None else None
    rank0 = comm.rank == 0
    emit_raw = log if (log is not None and rank0) else None

    task = data.task
    device = device if device is not None else _resolve_device(config.device)
    model.to(device)
    dtype = _float_dtype(model)
    x_train, y_train = _prepare(data.x_train, data.y_train, task, dtype, device)
    x_val, y_val = _prepare(data.x_val, data.y_val, task, dtype, device)
    x_test = getattr(data, "x_test", None)
    has_test = x_test is not None and x_test.shape[0] > 0
    if has_test:
        x_test, y_test = _prepare(data.x_test, data.y_test, task, dtype, device)

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    trainable = count_trainable(model)
    opt = _make_optimizer(params, config)
    sched = _make_scheduler(opt, config)
    shuffle = torch.Generator()
    shuffle.manual_seed(config.seed)
    n_train = x_train.shape[0]
    batch = config.batch_size
    n_batches = -(-n_train // batch)
    cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []

    ckpt_path = out / CHECKPOINT_NAME if out is not None else None
    config_dict = config.to_dict()

    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(config.seed + comm.rank)
        epoch = 0
        metrics: list[dict[str, Any]] = []
        best_epoch: int | None = None
        best_val = math.inf
        bad_epochs = 0
        best_state = _state_copy(model)  # the initial weights until an epoch completes
        wall_before = 0.0
        resumed_from: int | None = None

        # ---- resume or start fresh
        ckpt = None
        if resume:
            if rank0 and ckpt_path.is_file():
                ckpt = load_checkpoint(ckpt_path)
            ckpt = comm.broadcast_object(ckpt)
        elif out is not None and rank0:
            for name in (CHECKPOINT_NAME, METRICS_CSV, METRICS_JSON):
                (out / name).unlink(missing_ok=True)
            _remove_events(out / TENSORBOARD_DIR)
        if resume and ckpt is None:
            _emit(emit_raw, f"no checkpoint in {out}: starting a fresh run")
        if ckpt is not None:
            _check_checkpoint(ckpt, ckpt_path, config_dict)
            epoch = int(ckpt["epoch"])
            resumed_from = epoch
            model.load_state_dict(ckpt["model"])
            if ckpt.get("finished"):
                result = TrainResult._from_state(ckpt["result"])
                result.resumed_from = epoch
                _emit(emit_raw, f"{ckpt_path} is a finished run (status {result.status}): "
                      "nothing to do")
                return result
            opt.load_state_dict(ckpt["optimizer"])
            if sched is not None:
                sched.load_state_dict(ckpt["scheduler"])
            rng = ckpt["rng"]
            shuffle.set_state(rng["shuffle"])
            if len(rng["torch"]) == comm.world_size:
                torch.set_rng_state(rng["torch"][comm.rank])
                if cuda_devices and rng.get("cuda") and len(rng["cuda"]) == comm.world_size:
                    torch.cuda.set_rng_state(rng["cuda"][comm.rank], cuda_devices[0])
            else:
                torch.manual_seed(config.seed + comm.rank + 7919 * epoch)
                _emit(emit_raw,
                      f"the checkpoint was written by {len(rng['torch'])} processes, not "
                      f"{comm.world_size}: in-model randomness is reseeded (not bit-exact)")
            best = ckpt["best"]
            best_epoch, best_val, bad_epochs = best["epoch"], best["val_loss"], best["bad_epochs"]
            best_state = ckpt["best_model"]
            metrics = [dict(r) for r in ckpt["metrics"]]
            wall_before = float(ckpt["wall_time_s"])
            _emit(emit_raw, f"resumed from {ckpt_path} at epoch {epoch}")

        def snapshot(status: str, test=None, diverged_at=None) -> TrainResult:
            return TrainResult(
                status=status, epochs_run=len(metrics), best_epoch=best_epoch,
                best_val_loss=None if best_epoch is None else best_val,
                metrics=[dict(r) for r in metrics], test=test,
                wall_time_s=wall_before + time.perf_counter() - session_start,
                trainable=trainable, diverged_at=diverged_at, resumed_from=resumed_from,
                world_size=comm.world_size, config=config_dict,
                out_dir=None if out is None else str(out))

        def write_files(result: TrainResult) -> None:
            atomic_write_text(out / METRICS_CSV, _csv_text(result.metrics))
            atomic_write_text(out / METRICS_JSON,
                              json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n")

        def rng_states() -> dict[str, Any]:
            states = {"shuffle": shuffle.get_state(),
                      "torch": comm.all_gather_object(torch.get_rng_state()), "cuda": None}
            if cuda_devices:
                states["cuda"] = comm.all_gather_object(
                    torch.cuda.get_rng_state(cuda_devices[0]).cpu())
            return states

        bar = _Progress(progress and rank0 and _isatty(sys.stderr), config.epochs, epoch)
        emit = (lambda line: bar.write(emit_raw, line)) if emit_raw is not None else None
        status = "ok"
        diverged_at = None
        warned_all = False
        tb = None
        try:
            if writer_class is not None and rank0:
                # purge_step: TensorBoard hides points a killed session wrote past the
                # checkpoint (epochs >= epoch + 1), which this session writes again
                tb = writer_class(log_dir=str(out / TENSORBOARD_DIR),
                                  purge_step=epoch + 1 if resume else None)
            model.train()
            while True:
                if epoch >= config.epochs:
                    break
                if best_epoch is not None and config.patience is not None \
                        and bad_epochs >= config.patience:
                    status = "early_stopped"
                    _emit(emit, f"early stop after epoch {epoch}: no lower validation "
                          f"loss for {bad_epochs} epochs (best epoch {best_epoch})")
                    break
                epoch += 1
                t0 = time.perf_counter()
                lr = opt.param_groups[0]["lr"]  # what this epoch trains with
                bar.start_epoch(epoch, n_batches)
                perm = torch.randperm(n_train, generator=shuffle).to(device)
                loss_total = 0.0
                for b in range(n_batches):
                    idx = perm[b * batch:(b + 1) * batch]
                    global_n = idx.numel()
                    local = idx.tensor_split(comm.world_size)[comm.rank] \
                        if comm.world_size > 1 else idx
                    opt.zero_grad(set_to_none=True)
                    if local.numel():
                        xb, yb = x_train[local], y_train[local]
                        outs = _outputs_all(model, xb) if config.loss_on == "all" else None
                        if outs is None:
                            if config.loss_on == "all" and not warned_all:
                                warned_all = True
                                _emit(emit, f"loss_on='all': {type(model).__name__} has "
                                      "no forward_all, using its single output")
                            outs = [model(xb)]
                        if len(outs) == 1:
                            per_sample = _per_sample_loss(outs[0], yb, task)
                        else:
                            per_sample = torch.stack(
                                [_per_sample_loss(o, yb, task) for o in outs]).mean(0)
                        loss_sum = per_sample.sum()
                        (loss_sum / global_n).backward()
                        loss_sum = loss_sum.detach()
                    else:
                        loss_sum = torch.zeros((), device=device)
                    if comm.world_size > 1:
                        loss_value = _all_reduce_grads(params, loss_sum, comm, device)
                    else:
                        loss_value = float(loss_sum)
                    if not math.isfinite(loss_value):
                        diverged_at = {"epoch": epoch, "batch": b + 1,
                                       "loss": loss_value / global_n}
                        break
                    if config.max_grad_norm is not None:
                        nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                    opt.step()
                    loss_total += loss_value
                    bar.batch()
                if diverged_at is not None:
                    status = "diverged"
                    _emit(emit, f"diverged at epoch {epoch}, batch "
                          f"{diverged_at['batch']}: loss {diverged_at['loss']}")
                    break
                if sched is not None:
                    sched.step()
                val_loss, val_acc = _evaluate(model, x_val, y_val, task, comm, device)
                row = {"epoch": epoch, "train_loss": loss_total / n_train, "val_loss": val_loss,
                       "val_acc": val_acc, "time_s": time.perf_counter() - t0}
                metrics.append(row)
                bar.end_epoch(row)
                if tb is not None:
                    _write_scalars(tb, {**row, "lr": lr}, epoch)
                if not math.isfinite(val_loss):
                    status = "diverged"
                    diverged_at = {"epoch": epoch, "batch": None, "loss": val_loss}
                    _emit(emit, f"diverged at epoch {epoch}: validation loss {val_loss}")
                    break
                if val_loss < best_val:
                    best_val, best_epoch, bad_epochs = val_loss, epoch, 0
                    best_state = _state_copy(model)
                else:
                    bad_epochs += 1
                # a collective: every rank takes part (out_dir is the same on every rank)
                rng = rng_states() if out is not None else None
                if out is not None and rank0:
                    save_checkpoint(ckpt_path, {
                        "format": _FORMAT, "epoch": epoch, "finished": False,
                        "config": config_dict, "world_size": comm.world_size,
                        "model": model.state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": None if sched is None else sched.state_dict(),
                        "rng": rng, "best_model": best_state,
                        "best": {"epoch": best_epoch, "val_loss": best_val,
                                 "bad_epochs": bad_epochs},
                        "metrics": metrics,
                        "wall_time_s": wall_before + time.perf_counter() - session_start,
                    })
                    write_files(snapshot("running"))
                _emit(emit, f"epoch {epoch}/{config.epochs}  train_loss "
                      f"{_fmt(row['train_loss'])}  val_loss {_fmt(val_loss)}  val_acc "
                      f"{_fmt(val_acc)}  {row['time_s']:.2f}s")
                if on_epoch is not None and rank0:
                    on_epoch(dict(row))
        finally:
            bar.close()
            if tb is not None:
                tb.close()

        # ---- the end: best weights back, test metrics, final files
        model.load_state_dict(best_state)
        test = None
        if best_epoch is not None and has_test:
            test_loss, test_acc = _evaluate(model, x_test, y_test, task, comm, device)
            test = {"test_loss": test_loss, "test_acc": test_acc}
        result = snapshot(status, test, diverged_at)
        if out is not None and rank0:
            save_checkpoint(ckpt_path, {
                "format": _FORMAT, "epoch": epoch, "finished": True, "config": config_dict,
                "world_size": comm.world_size, "model": model.state_dict(),
                "result": dataclasses.asdict(result),
            })
            write_files(result)
        _emit(emit, _done_line(result))
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


def _check_checkpoint(ckpt: dict[str, Any], path: Path, config_dict: dict[str, Any]) -> None:
    if ckpt.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a training checkpoint of this version "
                         f"(format {ckpt.get('format')!r}, expected {_FORMAT!r})")
    saved = ckpt.get("config", {})
    for key in config_dict:
        if key in _RESUME_FREE:
            continue
        if saved.get(key) != config_dict[key]:
            raise ValueError(
                f"cannot resume from {path}: it was written with {key}={saved.get(key)!r}, "
                f"this run has {key}={config_dict[key]!r}"
            )


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
