"""Fixed-point solvers for ``z = f(z)``: solver objects with one call shape.

A solver is a small frozen object holding its own options, validated when it is made
(a bad option is a :class:`~iternn.DynamicsError` naming it)::

    z_star, info = solve(f, z0, solver=Anderson(m=5), tol=1e-10, max_steps=200)

The problem's settings (``tol``, ``max_steps``, ``stop_mode``) are arguments of
:func:`solve`; the method's settings live in the solver. A string names a registered
solver: ``"picard"``, ``"anderson"`` and ``"broyden"`` are shorthand for ``Picard()``,
``Anderson()`` and ``Broyden()``.

``f`` maps ``(*batch, n)`` to ``(*batch, n)``; every batch element is an independent
problem (``f`` must not mix batch elements). An element stops as soon as its residual
is at most ``tol`` (it is frozen there: later steps do not move it, so its result does
not depend on what else is in the batch) and the solve stops when every element has
converged or failed, or after ``max_steps`` updates. The returned ``z_star`` holds, per
element, the iterate with the smallest residual seen, and ``info.residual`` is exactly
the residual of that iterate.

Residual: ``stop_mode="abs"`` (default) uses ``||f(z) - z||_2`` per element;
``"rel"`` divides it by ``||f(z)||_2``.

Solvers:

* :class:`Picard` — damped fixed-point iteration ``z <- (1 - damping) z + damping f(z)``.
* :class:`Anderson` — Anderson acceleration (type II, the constrained least-squares form
  of Walker & Ni 2011): mixes the last ``m`` iterates with weights ``alpha`` minimising
  ``||sum_i alpha_i (f(z_i) - z_i)||^2 + lam * s ||alpha||^2`` subject to
  ``sum alpha = 1``, where ``s`` is the mean squared residual in memory (so ``lam`` is
  scale-free), then damps the mixed step by ``beta``. The small ``m x m`` systems are
  solved in float64 whatever the dtype of ``z``, each answer checked
  (:func:`~iternn.dynamics.linalg.verified_solve`); a singular system falls back to a
  Picard step for that element.
* :class:`Broyden` — "good" Broyden quasi-Newton on ``g(z) = f(z) - z``, limited memory:
  the inverse Jacobian estimate starts at ``-I`` (so the first step is a Picard step)
  and is kept as ``-I + U V^T`` with at most ``memory`` rank-one Sherman–Morrison
  updates (when full, the oldest is overwritten, as in TorchDEQ). Full steps, no line
  search: for maps that are far from contractive prefer :class:`Anderson`.

A solver that meets a non-finite value (``f(z)`` overflows, an extrapolation blows up)
stops that element at its best finite iterate and marks it failed; the others go on.
``info.reason`` is :attr:`StopReason.NON_FINITE` then. Nothing is printed.

:func:`solve` never differentiates: it runs without autograd and returns detached
tensors (use :class:`iternn.dynamics.DEQ` for gradients through a fixed point).

New solvers: any callable ``solver(f, z0, *, tol, max_steps, stop_mode) -> (z_star,
SolverInfo)`` — the call shape of the built-in ones — can be passed as ``solver=`` or
registered under a name with :func:`register_solver`. It receives ``f`` and ``z0``
flattened to one batch dim ``(B, n)`` and returns ``z_star`` of shape ``(B, n)`` and
per-element fields of shape ``(B,)``; its options belong in the object (a frozen
dataclass, like the built-in solvers).
"""

from __future__ import annotations

import abc
import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import ClassVar, Protocol

import torch
from torch import Tensor

from ..core.memory import check_bytes, tensor_bytes
from ..errors import ConvergenceError, DynamicsError
from .linalg import verified_solve
from .validate import (
    STOP_MODES,
    check_fraction,
    check_int,
    check_non_negative,
    check_positive,
    check_start,
    check_stop_mode,
)

__all__ = [
    "solve",
    "Solver",
    "Picard",
    "Anderson",
    "Broyden",
    "SolverInfo",
    "StopReason",
    "SOLVERS",
    "register_solver",
    "as_solver",
    "ConvergenceError",
    "default_tol",
    "STOP_MODES",
]


class StopReason(enum.StrEnum):
    """Why a solve stopped; each member carries its message (``.message``).

    A string enum: ``StopReason.CONVERGED == "converged"``.
    """

    CONVERGED = ("converged", "every element reached the tolerance")
    MAX_STEPS = ("max_steps", "max_steps updates were made before every element converged")
    NON_FINITE = ("non-finite", "f(z) or a step was not finite: that element was stopped at "
                  "its best finite iterate")

    message: str

    def __new__(cls, value: str, message: str) -> StopReason:
        member = str.__new__(cls, value)
        member._value_ = value
        member.message = message
        return member


@dataclass(frozen=True)
class SolverInfo:
    """What a solve did. Frozen: its fields cannot be reassigned once returned.

    The tensors it holds are its own (no other object refers to them); do not modify
    them in place — a frozen dataclass stops reassignment, not in-place writes.

    Attributes:
        solver: the solver's name (``"anderson"``, ... or the registered name).
        converged: ``True`` when every batch element converged.
        converged_each: per-element flags, shape ``batch`` (``()`` for an unbatched solve).
        steps: updates made (``f`` was evaluated ``steps + 1`` times by the built-in
            solvers, once per iterate).
        residual_trace: 1-D float64 tensor of length ``steps + 1``: the largest residual
            over the batch at each iterate (``inf`` where one was not finite).
        residual: per-element residual of the returned iterate, shape ``batch``.
        tol: the tolerance used. stop_mode: ``"abs"`` or ``"rel"``.
        reason: a :class:`StopReason` (its ``.message`` says it in words).
    """

    solver: str
    converged: bool
    converged_each: Tensor
    steps: int
    residual_trace: Tensor
    residual: Tensor
    tol: float
    stop_mode: str
    reason: StopReason

    def __repr__(self) -> str:
        n = self.converged_each.numel()
        ok = int(self.converged_each.sum())
        res = float(self.residual.max()) if self.residual.numel() else float("nan")
        return (
            f"SolverInfo(solver={self.solver!r}, converged={self.converged} ({ok}/{n}), "
            f"steps={self.steps}, residual={res:.3g}, tol={self.tol:g}, "
            f"reason={self.reason.value!r})"
        )


class SolverFn(Protocol):
    """The one call shape of every solver."""

    def __call__(self, f: Callable[[Tensor], Tensor], z0: Tensor, *, tol: float,
                 max_steps: int, stop_mode: str) -> tuple[Tensor, SolverInfo]: ...


SolverLike = str | SolverFn

#: Registered solvers by name (the string shorthand of ``solver=``).
SOLVERS: dict[str, SolverFn] = {}


def register_solver(name: str, solver: SolverFn) -> SolverFn:
    """Add (or replace) solver ``name``; returns ``solver``.

    ``solver`` is a solver object or any callable of the same call shape
    ``solver(f, z0, *, tol, max_steps, stop_mode) -> (z_star, SolverInfo)``.
    """
    if not isinstance(name, str) or not name:
        raise DynamicsError(f"solver name must be a non-empty str, got {name!r}")
    if not callable(solver):
        raise DynamicsError(f"solver {name!r} must be callable, got {type(solver).__name__}")
    SOLVERS[name] = solver
    return solver


def as_solver(solver: object, what: str = "solver") -> tuple[str, SolverFn]:
    """``(name, solver)`` for a registered name or a solver object (callable)."""
    if isinstance(solver, str):
        if solver not in SOLVERS:
            raise DynamicsError(
                f"unknown {what} {solver!r}; available solvers: {sorted(SOLVERS)}"
            )
        return solver, SOLVERS[solver]
    if callable(solver) and not isinstance(solver, type):
        for name in (getattr(solver, "name", None), getattr(solver, "__name__", None)):
            if isinstance(name, str):
                return name, solver
        return type(solver).__name__, solver
    raise DynamicsError(
        f"{what} must be a solver object (Picard(), Anderson(), Broyden() or a callable "
        f"solver) or a registered name {sorted(SOLVERS)}, got {solver!r}"
    )


def default_tol(dtype: torch.dtype) -> float:
    """The default residual tolerance for a dtype: 1e-10 (float64), 1e-5 (float32), 1e-2."""
    if dtype == torch.float64:
        return 1e-10
    if dtype == torch.float32:
        return 1e-5
    return 1e-2


def solve(
    f: Callable[[Tensor], Tensor],
    z0: Tensor,
    *,
    solver: SolverLike = "anderson",
    tol: float | None = None,
    max_steps: int = 200,
    stop_mode: str = "abs",
) -> tuple[Tensor, SolverInfo]:
    """Solve ``z = f(z)`` from ``z0``.

    Args:
        f: ``(*batch, n) -> (*batch, n)``, batch elements independent.
        z0: starting point ``(*batch, n)`` (or ``(n,)``), finite, floating point.
        solver: a solver object (:class:`Picard`, :class:`Anderson`, :class:`Broyden`,
            or any callable of their call shape) or a name in :data:`SOLVERS`.
        tol: residual tolerance; ``None`` picks :func:`default_tol` for ``z0``'s dtype.
        max_steps: at most this many updates (``0`` only measures the residual of ``z0``).
        stop_mode: ``"abs"`` or ``"rel"`` residual (see the module docs).

    Returns:
        ``(z_star, info)``: ``z_star`` with ``z0``'s shape (detached), and a
        :class:`SolverInfo` whose per-element fields have ``z0``'s batch shape.

    Raises:
        DynamicsError: unknown solver, bad ``tol``/``max_steps``/``stop_mode``, ``z0``
            not a finite tensor ``(*batch, n)``, or ``f`` returning the wrong shape.
        MapTypeError: ``z0`` not a floating tensor.
    """
    name, fn = as_solver(solver)
    check_start(z0)
    tol = default_tol(z0.dtype) if tol is None else check_positive(tol, "tol")
    max_steps = check_int(max_steps, "max_steps")
    check_stop_mode(stop_mode)
    batch, n = tuple(z0.shape[:-1]), z0.shape[-1]

    def flat_f(z: Tensor) -> Tensor:
        out = f(z.reshape(*batch, n))
        if not isinstance(out, Tensor) or out.shape != (*batch, n):
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise DynamicsError(f"f must map shape {(*batch, n)} to the same shape, got {shape}")
        return out.reshape(-1, n)

    with torch.no_grad():
        z, info = fn(flat_f, z0.detach().reshape(-1, n).clone(), tol=tol,
                     max_steps=max_steps, stop_mode=stop_mode)
    if not isinstance(info, SolverInfo):
        raise DynamicsError(f"solver {name!r} must return (z_star, SolverInfo), "
                            f"got {type(info).__name__} for the info")
    try:
        reason = StopReason(info.reason)
    except ValueError:
        raise DynamicsError(
            f"solver {name!r} returned reason {info.reason!r}; it must be one of "
            f"{[r.value for r in StopReason]} (a StopReason)"
        ) from None
    info = replace(info, solver=name, converged_each=info.converged_each.reshape(batch),
                   residual=info.residual.reshape(batch), reason=reason)
    return z.reshape(*batch, n), info


# ---------------------------------------------------------------------- machinery
class _Loop:
    """Bookkeeping shared by the built-in solvers: residuals, best iterates, masks."""

    def __init__(self, z0: Tensor, tol: float, max_steps: int, stop_mode: str) -> None:
        b = z0.shape[0]
        self.tol, self.max_steps, self.stop_mode = tol, max_steps, stop_mode
        self.z_best = z0.clone()
        self.r_best = torch.full((b,), math.inf, dtype=z0.dtype, device=z0.device)
        self.converged = torch.zeros(b, dtype=torch.bool, device=z0.device)
        self.failed = torch.zeros(b, dtype=torch.bool, device=z0.device)
        self.trace: list[Tensor] = []

    def residual(self, z: Tensor, fz: Tensor) -> Tensor:
        r = torch.linalg.vector_norm(fz - z, dim=-1)
        if self.stop_mode == "rel":
            r = r / (torch.linalg.vector_norm(fz, dim=-1) + torch.finfo(r.dtype).tiny)
        return r

    def observe(self, z: Tensor, fz: Tensor) -> Tensor:
        """Record ``f(z)`` at the current iterate; return the mask of elements still running."""
        r = self.residual(z, fz)
        active = ~(self.converged | self.failed)
        finite = torch.isfinite(r)  # a non-finite f(z) gives a non-finite norm
        better = active & finite & (r < self.r_best)
        self.z_best = torch.where(better[:, None], z, self.z_best)
        self.r_best = torch.where(better, r, self.r_best)
        self.converged |= active & finite & (r <= self.tol)
        self.failed |= active & ~finite
        self.trace.append(torch.where(torch.isfinite(r), r, torch.inf).max().to(torch.float64)
                          if r.numel() else r.new_zeros((), dtype=torch.float64))
        return ~(self.converged | self.failed)

    def finish(self, solver: str, steps: int) -> tuple[Tensor, SolverInfo]:
        if bool(self.converged.all()):
            reason = StopReason.CONVERGED
        elif bool(self.failed.any()):
            reason = StopReason.NON_FINITE
        else:
            reason = StopReason.MAX_STEPS
        info = SolverInfo(
            solver=solver,
            converged=bool(self.converged.all()),
            converged_each=self.converged.clone(),
            steps=steps,
            residual_trace=torch.stack(self.trace).cpu(),
            residual=self.r_best.clone(),
            tol=self.tol,
            stop_mode=self.stop_mode,
            reason=reason,
        )
        return self.z_best, info


def _run(name: str, f, z0: Tensor, tol: float, max_steps: int, stop_mode: str, update):
    """The common loop: evaluate, record, stop or take the solver's update."""
    loop = _Loop(z0, tol, max_steps, stop_mode)
    z, k = z0, 0
    while True:
        fz = f(z)
        active = loop.observe(z, fz)
        if k == max_steps or not bool(active.any()):
            break
        z_new = update(k, z, fz, active)
        # Frozen elements (converged or failed) stay at their best iterate.
        z = torch.where(active[:, None], z_new, loop.z_best)
        k += 1
    return loop.finish(name, k)


def _history(length: int, max_steps: int, shape: tuple[int, int], z0: Tensor, what: str) -> int:
    """The number of kept iterates of a solver whose memory is ``length``: no more than
    the ``max_steps`` updates can fill (at least 1), its two ``(batch, length, n)``
    buffers checked against the memory available first (naming ``what``)."""
    length = max(1, min(length, max_steps))
    b, n = shape
    check_bytes(2 * tensor_bytes(b * length * n, z0.dtype),
                f"{what} (2 x {b} x {length} x {n}, {z0.dtype})", device=z0.device)
    return length


# ---------------------------------------------------------------------- solvers
class Solver(abc.ABC):
    """Base of the built-in solvers: frozen dataclasses, options checked when made.

    Subclasses set :attr:`name` and implement :meth:`__call__` with the one call shape
    ``(f, z0, *, tol, max_steps, stop_mode) -> (z_star, SolverInfo)`` on ``(B, n)``.
    """

    name: ClassVar[str] = "solver"

    @abc.abstractmethod
    def __call__(self, f, z0: Tensor, *, tol: float, max_steps: int,
                 stop_mode: str = "abs") -> tuple[Tensor, SolverInfo]:
        """One solve of ``z = f(z)`` from ``z0`` (``(B, n)``)."""


@dataclass(frozen=True)
class Picard(Solver):
    """Damped fixed-point iteration ``z <- (1 - damping) z + damping f(z)``.

    Args:
        damping: the step weight in ``(0, 1]`` (``1``: plain iteration of ``f``).
    """

    damping: float = 1.0
    name: ClassVar[str] = "picard"

    def __post_init__(self) -> None:
        object.__setattr__(self, "damping", check_fraction(self.damping, "Picard damping"))

    def __call__(self, f, z0: Tensor, *, tol: float, max_steps: int,
                 stop_mode: str = "abs") -> tuple[Tensor, SolverInfo]:
        beta = self.damping

        def update(k, z, fz, active):
            return fz if beta == 1.0 else torch.lerp(z, fz, beta)

        return _run(self.name, f, z0, tol, max_steps, stop_mode, update)


@dataclass(frozen=True)
class Anderson(Solver):
    """Anderson acceleration (see the module docs).

    Args:
        m: memory, the number of past iterates mixed (``>= 1``; no more than
            ``max_steps`` are kept, and their buffers are checked against the memory
            available before they are allocated: a :class:`~iternn.SizeError`).
        lam: Tikhonov weight of the mixing system, relative to the mean squared residual
            in memory (``>= 0``).
        beta: damping of the mixed step in ``(0, 1]``.
    """

    m: int = 5
    lam: float = 1e-4
    beta: float = 1.0
    name: ClassVar[str] = "anderson"

    def __post_init__(self) -> None:
        check_int(self.m, "Anderson m (memory)", 1)
        object.__setattr__(self, "lam", check_non_negative(self.lam, "Anderson lam"))
        object.__setattr__(self, "beta", check_fraction(self.beta, "Anderson beta"))

    def __call__(self, f, z0: Tensor, *, tol: float, max_steps: int,
                 stop_mode: str = "abs") -> tuple[Tensor, SolverInfo]:
        lam, beta = self.lam, self.beta
        b, n = z0.shape
        # at most max_steps updates: a longer memory than that holds nothing more
        m = _history(self.m, max_steps, (b, n), z0, f"Anderson(m={self.m}) history")
        xs = z0.new_zeros(b, m, n)
        fs = z0.new_zeros(b, m, n)
        tiny = torch.finfo(torch.float64).tiny

        def update(k, z, fz, active):
            slot = k % m
            xs[:, slot] = z
            fs[:, slot] = fz
            nk = min(k + 1, m)
            if nk == 1:
                return torch.lerp(z, fz, beta)
            gx = (fs[:, :nk] - xs[:, :nk]).to(torch.float64)  # residuals in memory (b, nk, n)
            gg = torch.nan_to_num(gx @ gx.transpose(1, 2), nan=0.0, posinf=0.0, neginf=0.0)
            scale = torch.diagonal(gg, dim1=1, dim2=2).mean(-1)
            eye = torch.eye(nk, dtype=torch.float64, device=z.device)
            h = gg.new_zeros(b, nk + 1, nk + 1)
            h[:, 0, 1:] = 1.0
            h[:, 1:, 0] = 1.0
            h[:, 1:, 1:] = gg + (lam * scale + tiny)[:, None, None] * eye
            rhs = gg.new_zeros(b, nk + 1, 1)
            rhs[:, 0] = 1.0
            sol, ok = verified_solve(h, rhs, what="Anderson mixing weights", allow_failure=True)
            alpha = torch.where(ok[:, None], sol[:, 1:, 0], 0.0).to(z.dtype)
            mixed_f = (alpha[:, None, :] @ fs[:, :nk]).squeeze(1)
            mixed_x = (alpha[:, None, :] @ xs[:, :nk]).squeeze(1)
            new = mixed_f if beta == 1.0 else beta * mixed_f + (1 - beta) * mixed_x
            return torch.where(ok[:, None], new, torch.lerp(z, fz, beta))

        return _run(self.name, f, z0, tol, max_steps, stop_mode, update)


@dataclass(frozen=True)
class Broyden(Solver):
    """Limited-memory good Broyden on ``g(z) = f(z) - z`` (see the module docs).

    Args:
        memory: rank of the inverse-Jacobian update ``U V^T`` (``>= 1``; bounded and
            checked like :class:`Anderson`'s ``m``).
    """

    memory: int = 30
    name: ClassVar[str] = "broyden"

    def __post_init__(self) -> None:
        check_int(self.memory, "Broyden memory (rank)", 1)

    def __call__(self, f, z0: Tensor, *, tol: float, max_steps: int,
                 stop_mode: str = "abs") -> tuple[Tensor, SolverInfo]:
        b, n = z0.shape
        memory = _history(self.memory, max_steps, (b, n), z0, f"Broyden(memory={self.memory}) rank")
        us = z0.new_zeros(b, n, memory)  # H = -I + U V^T
        vs = z0.new_zeros(b, n, memory)
        prev: dict[str, Tensor] = {}
        eps = torch.finfo(z0.dtype).eps
        count = [0]

        def h_times(x: Tensor) -> Tensor:  # H x
            return -x + (us @ (vs.transpose(1, 2) @ x[:, :, None]))[:, :, 0]

        def ht_times(x: Tensor) -> Tensor:  # H^T x
            return -x + (vs @ (us.transpose(1, 2) @ x[:, :, None]))[:, :, 0]

        def update(k, z, fz, active):
            g = fz - z
            if prev:
                s = z - prev["z"]
                y = g - prev["g"]
                hy = h_times(y)
                v = ht_times(s)  # (s^T H)^T
                denom = (v * y).sum(-1)
                ok = (active & torch.isfinite(denom) & torch.isfinite(hy).all(-1)
                      & (denom.abs() > eps * torch.linalg.vector_norm(s, dim=-1)
                         * torch.linalg.vector_norm(y, dim=-1).clamp_min(torch.finfo(z.dtype).tiny)))
                safe = torch.where(ok, denom, torch.ones_like(denom))
                u = torch.where(ok[:, None], (s - hy) / safe[:, None], 0.0)
                v = torch.where(ok[:, None], v, 0.0)
                col = count[0] % memory
                us[:, :, col] = u
                vs[:, :, col] = v
                count[0] += 1
            prev["z"], prev["g"] = z, g
            step = -h_times(g)  # Newton step with the inverse-Jacobian estimate
            new = z + step
            return torch.where(torch.isfinite(new).all(-1, keepdim=True), new, fz)

        return _run(self.name, f, z0, tol, max_steps, stop_mode, update)


register_solver("picard", Picard())
register_solver("anderson", Anderson())
register_solver("broyden", Broyden())
