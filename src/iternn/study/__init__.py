"""The sparsity study: data, models, training, sweeps, reports.

Submodules: :mod:`~iternn.study.data` (datasets, offline by default),
:mod:`~iternn.study.models` (the model families at one parameter budget),
:mod:`~iternn.study.train` (the trainer; :mod:`~iternn.study.resume`: what a resume may
change), :mod:`~iternn.study.sweep` (a grid of runs), :mod:`~iternn.study.report`
(``report.md``), :mod:`~iternn.study.runner` (:func:`run_study`: sweep and report),
:mod:`~iternn.study.folder` and :mod:`~iternn.study.lock` (one writer and one config per
folder), :mod:`~iternn.study.distributed` (data-parallel training).

``run_study`` is imported on first use, so that ``iternn.study.config`` (and a config
error) does not wait for torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["run_study"]


def __getattr__(name: str) -> Any:
    if name == "run_study":
        from .runner import run_study

        return run_study
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
