"""The continuum instrument: one map moved from the MLP end to the RNN end, measured.

The paper's continuum (notes §8): with an MLP map of depth ``L``, inputs written into
``x`` one after another and ``k`` applications per input, ``k >= L`` (or the state reset
between inputs) is the MLP (no memory), ``k = 1`` with the state carried a pure delay
line, and feedback (above-diagonal) blocks scaled by ``alpha`` make the memory infinite.
This package sweeps those knobs on one map family and measures where each point stands:

* :func:`feedback_map` — the family: an MLP map with fixed feedback blocks ``alpha V``
  on the first block super-diagonal and the identity block on ``x``;
  :class:`ContinuumNet` runs it over a sequence with ``k``, the initial-vector policy
  (:data:`POLICIES`) and held or forced input (:data:`MODES`);
* :func:`run_continuum` — the sweep of a :class:`ContinuumConfig` (:data:`QUICK`,
  :data:`FULL`): memory profiles (:func:`iternn.dynamics.input_memory`), impulse
  response, spectral radius at the fixed point, largest Lyapunov exponent, and test
  accuracy on digits (no memory needed) and the anomaly sequences (memory needed),
  trained at equal trainable parameters; it writes ``report.md`` (with a reading of
  where the claims held), ``continuum.json`` (every point) and pictures (the phase
  diagram of memory and accuracy over ``(k, alpha)``, memory profiles, dynamics).

Command line: ``iternn continuum [--quick] [--out DIR]``.

Time, on the 2-core development machine (shared and loaded, load average 5-7; one
torch thread): ``--quick`` (k 1-4 x alpha 0, 0.5, 1: 72 measured points, 24 trainings)
measured 134-142 s, of which about 125 s training. The full run (k 1-5 x 5 alphas x 3
policies x 2 modes: 150 points, 300 trainings, 3000 anomaly sequences, 20 / 40 epochs)
measured 46.5 minutes (load average 1.5-3): 8 s for the one-application measures, 17 s
for the memory profiles, 2748 s for the 300 trainings (9.1 s each on average).

Every name is imported on first use (PEP 562), so that ``iternn continuum --help`` does
not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import FULL, MODES, POLICIES, QUICK, ContinuumConfig
    from .family import ContinuumNet, feedback_map, initial_state
    from .report import readings
    from .run import ContinuumResult, memory_summary, predicted_lags, run_continuum

_LAZY = {
    **dict.fromkeys(("ContinuumConfig", "QUICK", "FULL", "POLICIES", "MODES"), ".config"),
    **dict.fromkeys(("feedback_map", "initial_state", "ContinuumNet"), ".family"),
    **dict.fromkeys(("run_continuum", "ContinuumResult", "memory_summary", "predicted_lags"),
                    ".run"),
    "readings": ".report",
}

__all__ = [
    "ContinuumConfig",
    "QUICK",
    "FULL",
    "POLICIES",
    "MODES",
    "feedback_map",
    "initial_state",
    "ContinuumNet",
    "run_continuum",
    "ContinuumResult",
    "memory_summary",
    "predicted_lags",
    "readings",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
