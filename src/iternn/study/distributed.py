"""Data-parallel training with ``torch.distributed`` (one process per device).

Run under torchrun::

    torchrun --nproc_per_node=2 -m iternn.study.distributed --build mypkg.jobs:build --out run/
    torchrun --nproc_per_node=2 -m iternn.study.distributed --dataset digits --hidden 64 --out run/

or start every process yourself with ``RANK``, ``WORLD_SIZE`` (and ``LOCAL_RANK``) in its
environment and either ``MASTER_ADDR``/``MASTER_PORT`` or ``--init-method
file:///shared/path``, or call :func:`train_distributed` in every process. The same command without
torchrun (no ``WORLD_SIZE`` in the environment) trains in one process with
:func:`iternn.study.train.train`. The flags are those of ``iternn train`` for the budget
(``--epochs`` or ``--steps``), the selection (``--select``, ``--patience``) and, with
``--dataset``, the validation split (``--val-fraction``); see ``--help``. Every rank loads
the same split, and the validation and test sets are sharded over the ranks and their sums
all-reduced, so the selection sees the numbers of one process (the loss up to summation
order).

**Exactness.** Every rank draws the same shuffled order (the generator is seeded with
``config.seed``), cuts each *global* batch of ``config.batch_size`` samples into
``world_size`` contiguous, disjoint shards (``tensor_split``: sizes differ by at most
one; a rank may get none in a short last batch) and backpropagates the sum of its
per-sample losses divided by the global batch size. The gradients are all-reduced
(summed) in one flat buffer per dtype, so every rank holds the gradient of the *global
batch mean* — the same as one process with the same batch (equal to averaging the ranks'
mean gradients when the shards are equal). Clipping and the optimizer step then run on
identical gradients, so parameters stay identical on every rank (checked at the end:
:class:`~iternn.StudyError`, a ``RuntimeError``, if not). Rank 0's initial parameters and
buffers are broadcast at the start, so the ranks' own initialisations do not matter. The result equals
single-process training up to floating-point summation order.

Not covered by that equality: randomness inside the model (each rank's global RNG is
seeded with ``seed + rank``, so dropout masks differ from a single process's) and
batch-statistics layers (BatchNorm sees the local shard; running buffers are taken from
rank 0 at the end of training, like DDP's ``broadcast_buffers``).

**Files.** Only rank 0 writes ``checkpoint.pt``/``metrics.*`` (see
:mod:`iternn.study.train`). On resume rank 0 reads the checkpoint and broadcasts it, so the
other machines need no shared filesystem. RNG states of every rank are gathered into
the checkpoint; resuming with the same ``world_size`` is bit-exact.

**Backends.** ``gloo`` for CPU training, ``nccl`` for CUDA (rank ``r`` uses
``cuda:LOCAL_RANK``); chosen from ``config.device`` unless ``backend`` is given.

**Several machines.** torchrun on each node with ``--nnodes=M --node_rank=i
--master_addr=HOST --master_port=PORT`` (or ``--rdzv-endpoint``); the data must be
loadable on every node (each rank loads the whole dataset and takes its shards).
To spread a *sweep* instead, give each machine a disjoint subset of the runs (every run
is an independent single-process job with its own ``out_dir``).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import StudyError
from .train import TrainConfig, TrainResult, _fit, _resolve_device

__all__ = ["TorchComm", "train_distributed", "main"]


class TorchComm:
    """The collectives the trainer needs, on the default process group."""

    def __init__(self, device: torch.device) -> None:
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.device = device

    def all_reduce_(self, tensor: Tensor) -> None:
        """Sum ``tensor`` over the ranks, in place."""
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self._object_device())
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_module(self, model: nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every rank."""
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(t.data, src=0)

    def max_param_difference(self, model: nn.Module) -> float:
        """Largest absolute difference between this rank's parameters and rank 0's, over
        all ranks."""
        params = [p.detach().reshape(-1).double() for p in model.parameters()]
        if not params:
            return 0.0
        flat = torch.cat(params)
        ref = flat.clone()
        dist.broadcast(ref, src=0)
        diff = (flat - ref).abs().max().reshape(1)
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        return float(diff)

    def _object_device(self) -> torch.device | None:
        return self.device if dist.get_backend() == "nccl" else None


def train_distributed(
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
    backend: str | None = None,
    init_method: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> TrainResult:
    """Data-parallel :func:`~iternn.study.train.train`; call it in every process.

    If the default process group is not initialised yet it is created here (and destroyed
    on return): from torchrun's environment (``init_method="env://"``) by default, or
    from ``init_method`` (e.g. ``"file:///tmp/x"``), ``rank`` and ``world_size``.

    Args:
        model, data, config, out_dir, resume, progress, log, on_epoch, tensorboard,
            run_options: as for ``train``; ``config.batch_size`` is the global batch. Only rank 0 writes
            files (TensorBoard events included), draws bars and calls ``log`` and
            ``on_epoch``.
        backend: ``"gloo"`` or ``"nccl"``; default ``nccl`` when the device is CUDA.

    Returns:
        The same :class:`TrainResult` on every rank (``world_size`` set).
    """
    config = TrainConfig() if config is None else config
    created = False
    if not dist.is_initialized():
        device = _resolve_device(config.device)
        if backend is None:
            backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl":
            local_rank = int(os.environ.get("LOCAL_RANK", rank if rank is not None else 0))
            torch.cuda.set_device(local_rank)
        kwargs: dict[str, Any] = {"backend": backend, "init_method": init_method or "env://"}
        if rank is not None:
            kwargs["rank"] = rank
        if world_size is not None:
            kwargs["world_size"] = world_size
        dist.init_process_group(**kwargs)
        created = True
    try:
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = _resolve_device(config.device)
            if device.type == "cuda" and device.index is None:
                device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        config = dataclasses.replace(config, device=str(device))
        comm = TorchComm(device)
        model.to(device)
        comm.broadcast_module(model)
        result = _fit(model, data, config, out_dir=out_dir, resume=resume, progress=progress,
                      log=log, on_epoch=on_epoch, comm=comm, device=device,
                      tensorboard=tensorboard, run_options=run_options)
        comm.broadcast_module(model)  # buffers (BatchNorm statistics) as rank 0 has them
        diff = comm.max_param_difference(model)
        if diff != 0.0:
            raise StudyError(f"parameters differ between ranks after training (max {diff})")
        return result
    finally:
        if created:
            dist.destroy_process_group()


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m iternn.study.distributed``: the parser and exit codes of
    :func:`iternn.cli.distributed_main` (0 done, 1 failed or diverged, 2 bad usage).

    Rank 0 prints the result as one JSON line on stdout and log lines on stderr.
    """
    from ..cli import distributed_main

    return distributed_main(argv)


if __name__ == "__main__":
    code = main()
    if "WORLD_SIZE" in os.environ:
        # Every file is written and the process group destroyed by now. Leave without the
        # interpreter's finalization: torch's gloo worker threads can make it abort there
        # ("terminate called without an active exception", SIGABRT) on a loaded machine,
        # turning a finished run into a crash for whoever launched it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
