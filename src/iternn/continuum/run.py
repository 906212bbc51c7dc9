"""Run the continuum sweep: measure every point, train the grid, write the folder.

For every point ``(k, alpha, policy, mode)`` of the sweep (:class:`ContinuumConfig`)
:func:`run_continuum` measures, on the seeded untrained map of the family
(:func:`~iternn.continuum.family.feedback_map`, in float64):

* the **input-memory profile** (:func:`iternn.dynamics.input_memory`) on
  ``memory_batch`` anomaly test sequences (``T = 10`` inputs), with its mean lag
  ``Σ j m_j / Σ m_j`` and the share of it on past inputs ``Σ_{j>=1} m_j / Σ m_j``;
* the properties of **one application** at a static input (``probe_batch`` digits test
  images), which do not depend on ``k``: the structural impulse-response length (the
  longest block path among the slots the iteration updates; ``inf`` with a cycle), the
  empirical one (the last application whose exact linear response
  (:func:`iternn.dynamics.impulse_response`) to a perturbation of those slots exceeds
  ``1e-6`` of the perturbation, within ``dynamics_steps``), the spectral radius of the
  Jacobian at the fixed point (:func:`iternn.dynamics.fixed_point`,
  :func:`iternn.dynamics.spectral_radius`; ``None`` where the solver found none) and the
  largest Lyapunov exponent (:func:`iternn.dynamics.largest_lyapunov`, natural log per
  application) along the iteration from the policy's initial vector (zeros for
  ``"zeros"``/``"carried"``). A forced input is held fixed in these (it is not part of
  the state); a held one is a slot of the state, kept by the identity block.

and, for the points of the training grid (``train_policies x train_modes`` at every
``(k, alpha)``), trains a fresh map of the same seed (the same initial weights and the
same trainable count everywhere: the MLP's) on two tasks with
:func:`iternn.study.train.train` and records the test accuracy of the best epoch:
**digits**, a static task (each image written as a constant stream of ``T = 10``
inputs, so that every ``k`` reaches the output; the answer depends on the current input
alone), and **anomaly** (``iternn.study.data`` odd-one-out sequences of 10 digits:
position of the odd one, which needs memory of every position). The memory profile of
the trained anomaly map is measured too. Both tasks have 64 input features and 10
classes, so one map serves both.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..core.block_map import BlockMap
from ..core.graph import BlockGraph
from ..core.summary import count_trainable
from ..dynamics import eigenvalues, fixed_point, impulse_response, lyapunov_spectrum
from ..dynamics.memory import input_memory
from ..errors import ConfigError, DataError
from ..study.data import load_dataset
from ..study.train import TrainConfig, train
from .config import QUICK, ContinuumConfig
from .family import ContinuumNet, feedback_map, initial_state

__all__ = ["ContinuumResult", "run_continuum", "memory_summary", "predicted_lags",
           "JSON_NAME", "IMPULSE_TOL"]

JSON_NAME = "continuum.json"
#: The empirical impulse response ends where its norm falls to this share of the
#: perturbation's.
IMPULSE_TOL = 1e-6
#: Anomaly sequences have this many inputs (and classes); the digits stream as many.
_LENGTH = 10
#: Most updates of the fixed-point solver (Anderson).
_FIXED_POINT_STEPS = 100


@dataclass
class ContinuumResult:
    """What :func:`run_continuum` wrote and measured.

    Attributes:
        out_dir: the folder. report: ``report.md``. json: ``continuum.json``.
        pictures: the PNG files written.
        points: one dict per ``(k, alpha, policy, mode)`` (as in the JSON).
        trainings: models trained. diverged: those whose training diverged.
        wall_time_s: the whole run.
    """

    out_dir: Path
    report: Path
    json: Path
    pictures: list[Path]
    points: list[dict[str, Any]]
    trainings: int
    diverged: int
    wall_time_s: float


def _jsonable(v: Any) -> Any:
    """JSON has no infinity: ``±inf`` become the strings ``"inf"``/``"-inf"``, NaN ``None``."""
    if isinstance(v, float):
        if math.isnan(v):
            return None
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return v
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def memory_summary(profile: list[float]) -> dict[str, Any]:
    """``mean_lag`` (``Σ j m_j / Σ m_j``), ``past_share`` (``Σ_{j>=1} m_j / Σ m_j``; both
    ``None`` for a profile of zeros) and ``nonzero_lags`` (the lags with ``m_j > 0``)."""
    total = sum(profile)
    nonzero = [j for j, v in enumerate(profile) if v > 0]
    if total <= 0:
        return {"mean_lag": None, "past_share": None, "nonzero_lags": nonzero}
    return {"mean_lag": sum(j * v for j, v in enumerate(profile)) / total,
            "past_share": sum(profile[1:]) / total, "nonzero_lags": nonzero}


def predicted_lags(depth: int, k: int, policy: str) -> list[int]:
    """The lags with memory of the feedback-free (``alpha = 0``) map of ``depth`` layers
    (:mod:`iternn.dynamics.memory`): ``[⌈L/k⌉ - 1]`` with the state carried; ``[0]``
    (``k >= L``) or ``[]`` (``k < L``) with it reset."""
    if policy == "carried":
        return [-(-depth // k) - 1]
    return [0] if k >= depth else []


def _structural_length(m: BlockMap, hold: tuple[str, ...]) -> float:
    """The longest block path among the slots the iteration updates (``inf``: a cycle)."""
    free = tuple(s for s in m.slots if s not in hold)
    edges = tuple(e for e in m.graph().edges if e[0] in free and e[1] in free)
    return BlockGraph(free, edges).longest_path()


def _dynamics(m: BlockMap, x0: Tensor, z0: dict[str, Tensor] | None, mode: str,
              steps: int) -> dict[str, Any]:
    """One application's measures at the static inputs ``x0`` (batch), from ``z0``."""
    hold = ("x",) if mode == "forced" else ()
    batch = x0.shape[0]
    state = {"x": x0, **{s: v.expand(batch, *v.shape).clone() for s, v in (z0 or {}).items()}}
    ir = impulse_response(m, state, steps=steps, hold=hold, mode="difference")
    above = torch.nonzero(ir.norm > IMPULSE_TOL * ir.norm[0]).flatten()
    last = int(above[-1])
    z_star, info = fixed_point(m, state, hold=hold, max_steps=_FIXED_POINT_STEPS)
    radius = None
    if info.converged:
        radius = float(eigenvalues(m, z_star, hold=hold).abs().amax(-1).mean())
    n_free = sum(n for s, n in m.slots.items() if s not in hold)
    # k >= n_free / 4 exponents: whole Jacobians per application, no Jacobian-vector products
    lyap = float(lyapunov_spectrum(m, state, steps=steps, hold=hold,
                                   k=-(-n_free // 4))[..., 0].mean())
    structural = _structural_length(m, hold)
    return {"impulse_structural": structural if math.isinf(structural) else int(structural),
            "impulse_empirical": last, "impulse_censored": last == steps,
            "fixed_point_converged": bool(info.converged), "spectral_radius": radius,
            "lyapunov": lyap}


def _stream(digits: Any, length: int) -> Any:
    """The digits data set with every image written as a constant stream of ``length``
    inputs: a sequence task of ``(N, length, 64)``."""
    def rep(x: Tensor) -> Tensor:
        return x.unsqueeze(1).expand(x.shape[0], length, x.shape[1]).contiguous()

    return dataclasses.replace(
        digits, x_train=rep(digits.x_train), x_val=rep(digits.x_val), x_test=rep(digits.x_test),
        task="sequence",
        meta={**digits.meta, "stream": f"each image written as {length} identical inputs"})


def _train(task: str, data: Any, config: ContinuumConfig, k: int, alpha: float, policy: str,
           mode: str, sizes: list[int]) -> tuple[dict[str, Any], ContinuumNet]:
    epochs, lr = ((config.digits_epochs, config.digits_lr) if task == "digits"
                  else (config.anomaly_epochs, config.anomaly_lr))
    net = ContinuumNet(feedback_map(sizes, alpha=alpha, seed=config.seed,
                                    activation=config.activation),
                       applications=k, policy=policy, mode=mode, seed=config.seed)
    cfg = TrainConfig(epochs=epochs, lr=lr, batch_size=config.batch_size, seed=config.seed)
    r = train(net, data, cfg, progress=False)
    return {"status": r.status, "test_acc": r.test_acc, "best_epoch": r.best_epoch,
            "epochs_run": r.epochs_run, "trainable": r.trainable,
            "wall_time_s": r.wall_time_s}, net


def run_continuum(config: ContinuumConfig = QUICK, out_dir: str | Path = "iternn-continuum",
                  *, log: Callable[[str], Any] | None = None, pictures: bool = True,
                  threads: int = 1) -> ContinuumResult:
    """Measure and train every point of ``config``; write ``report.md``,
    ``continuum.json`` and the pictures into ``out_dir`` (created).

    ``log`` receives one line per stage and per trained point. ``threads``: torch's
    intra-op threads while it runs (restored after; the maps are small, and one thread is
    the fastest for them on a shared machine).

    ``continuum.json`` holds ``config``, ``meta`` (versions, sizes, the trainable count),
    ``timing`` and ``points``: one dict per ``(k, alpha, policy, mode)`` with ``memory``
    (the profile, lags ``0 … 9``), :func:`memory_summary`'s keys, ``predicted_lags``
    (``alpha = 0`` only), the one-application measures of the module docstring, and
    ``digits`` / ``anomaly`` (training results, ``None`` off the training grid) and
    ``memory_trained`` (the trained anomaly map's profile). Infinite values are the
    strings ``"inf"`` / ``"-inf"`` (JSON has no infinity).

    Raises:
        ConfigError: ``config`` is not a :class:`ContinuumConfig`, ``out_dir`` is a file.
        DataError: the data sets cannot be built.
        MissingDependencyError: ``pictures=True`` without matplotlib.
    """
    if not isinstance(config, ContinuumConfig):
        raise ConfigError(f"config must be a ContinuumConfig, got {type(config).__name__}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads must be an int >= 1, got {threads!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out_dir {out}: is a file, not a folder")
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(config, out, log or (lambda line: None), pictures)
    finally:
        torch.set_num_threads(old_threads)


def _run(config: ContinuumConfig, out: Path, say: Callable[[str], Any],
         pictures: bool) -> ContinuumResult:
    from .report import draw_pictures, write_report

    start = time.perf_counter()
    anomaly = load_dataset("anomaly", seed=config.seed, length=_LENGTH, **config.anomaly)
    digits = _stream(load_dataset("digits", seed=config.seed), _LENGTH)
    if (anomaly.n_features, anomaly.n_outputs) != (digits.n_features, digits.n_outputs):
        raise DataError("the anomaly and digits data sets must have the same input and output "
                        "sizes for one map to serve both")
    sizes = [anomaly.n_features, *config.hidden, anomaly.n_outputs]
    L = config.depth
    probe = anomaly.x_test[: config.memory_batch].transpose(0, 1).double()
    x0 = digits.x_test[: config.probe_batch, 0].double()
    maps = {a: feedback_map(sizes, alpha=a, seed=config.seed, activation=config.activation).double()
            for a in config.alphas}
    timing: dict[str, float] = {"data_s": time.perf_counter() - start}

    t0 = time.perf_counter()
    dyn: dict[tuple, dict[str, Any]] = {}
    for a, m in maps.items():
        for policy in config.policies:
            for mode in config.modes:
                start_kind = "random" if policy == "random" else "zeros"
                if (a, start_kind, mode) not in dyn:
                    z0 = initial_state(m, policy, seed=config.seed)
                    dyn[a, start_kind, mode] = _dynamics(m, x0, z0, mode, config.dynamics_steps)
        say(f"dynamics: alpha={a:g} measured")
    timing["dynamics_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    points: list[dict[str, Any]] = []
    for k in config.ks:
        for a, m in maps.items():
            for policy in config.policies:
                z0 = initial_state(m, policy, seed=config.seed)
                for mode in config.modes:
                    profile = input_memory(m, probe, applications=k, carry=policy == "carried",
                                           held=mode == "held", state=z0).tolist()
                    start_kind = "random" if policy == "random" else "zeros"
                    points.append({
                        "k": k, "alpha": a, "policy": policy, "mode": mode,
                        "memory": profile, **memory_summary(profile),
                        "predicted_lags": predicted_lags(L, k, policy) if a == 0 else None,
                        **dyn[a, start_kind, mode],
                        "digits": None, "anomaly": None, "memory_trained": None})
    timing["memory_s"] = time.perf_counter() - t0
    say(f"memory: {len(points)} profiles measured")

    t0 = time.perf_counter()
    trainings = diverged = 0
    train_times: list[float] = []
    for p in points:
        if p["policy"] not in config.train_policies or p["mode"] not in config.train_modes:
            continue
        for task, data in (("digits", digits), ("anomaly", anomaly)):
            res, net = _train(task, data, config, p["k"], p["alpha"], p["policy"], p["mode"],
                              sizes)
            p[task] = res
            trainings += 1
            diverged += res["status"] == "diverged"
            train_times.append(res["wall_time_s"])
            if task == "anomaly":
                trained = copy.deepcopy(net.map).double()
                z0 = net.initial()  # the initial vector it was trained with
                z0 = None if z0 is None else {s: v.double() for s, v in z0.items()}
                p["memory_trained"] = input_memory(
                    trained, probe, applications=p["k"], carry=p["policy"] == "carried",
                    held=p["mode"] == "held", state=z0).tolist()
        acc = [f"{t} {100 * p[t]['test_acc']:.1f} %" for t in ("digits", "anomaly")
               if p[t]["test_acc"] is not None]
        say(f"trained k={p['k']} alpha={p['alpha']:g} {p['policy']}/{p['mode']}: {', '.join(acc)}")
    timing["training_s"] = time.perf_counter() - t0
    timing["trainings"] = trainings
    timing["mean_training_s"] = sum(train_times) / len(train_times) if train_times else 0.0

    out.mkdir(parents=True, exist_ok=True)
    trainable = count_trainable(maps[config.alphas[0]])  # the same at every alpha
    meta = {"sizes": sizes, "depth": L, "trainable": trainable, "length": _LENGTH,
            "chance": 1 / anomaly.n_outputs, "n_test": {"digits": len(digits.y_test),
                                                        "anomaly": len(anomaly.y_test)},
            "impulse_tol": IMPULSE_TOL, "torch": torch.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads()}
    pics = draw_pictures(out, config, points) if pictures else []
    timing["wall_s"] = time.perf_counter() - start
    doc = {"config": config.to_dict(), "meta": meta, "timing": timing, "points": points}
    json_path = out / JSON_NAME
    json_path.write_text(json.dumps(_jsonable(doc), indent=1, allow_nan=False) + "\n")
    report = write_report(out, config, points, meta, timing, pics)
    return ContinuumResult(out_dir=out, report=report, json=json_path, pictures=pics,
                           points=points, trainings=trainings, diverged=diverged,
                           wall_time_s=time.perf_counter() - start)
