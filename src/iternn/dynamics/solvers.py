"""Fixed-point solvers for ``z = f(z)`` with one call shape (a TorchDEQ-style registry).

Every solver is called through :func:`solve`::

    z_star, info = solve(f, z0, solver="anderson", tol=1e-10, max_steps=200, m=5)

``f`` maps ``(*batch, n)`` to ``(*batch, n)``; every batch element is an independent
problem (``f`` must not mix batch elements). An element stops as soon as its residual
is at most ``tol`` (it is frozen there: later steps do not move it, so its result does
not depend on what else is in the batch) and the solve stops when every element has
converged or failed, or after ``max_steps`` updates. The returned ``z_star`` holds, per
element, the iterate with the smallest residual seen, and ``info.residual`` is exactly
the residual of that iterate.

Residual: ``stop_mode="abs"`` (default) uses ``||f(z) - z||_2`` per element;
``"rel"`` divides it by ``||f(z)||_2``.

Solvers (options in brackets):

* ``"picard"`` — damped fixed-point iteration ``z <- (1 - beta) z + beta f(z)``
  [``beta=1.0``].
* ``"anderson"`` — Anderson acceleration (type II, the constrained least-squares form of
  Walker & Ni 2011): mixes the last ``m`` iterates with weights ``alpha`` minimising
  ``||sum_i alpha_i (f(z_i) - z_i)||^2 + lam * s ||alpha||^2`` subject to
  ``sum alpha = 1``, where ``s`` is the mean squared residual in memory (so ``lam`` is
  scale-free) [``m=5``, ``lam=1e-4``, ``beta=1.0``]. The small ``m x m`` systems are
  solved in float64 whatever the dtype of ``z``; a singular system falls back to a
  Picard step for that element.
* ``"broyden"`` — "good" Broyden quasi-Newton on ``g(z) = f(z) - z``, limited memory:
  the inverse Jacobian estimate starts at ``-I`` (so the first step is a Picard step)
  and is kept as ``-I + U V^T`` with at most ``memory`` rank-one Sherman–Morrison
  updates (when full, the oldest is overwritten, as in TorchDEQ). Full steps, no line
  search: for maps that are far from contractive prefer ``"anderson"`` [``memory=30``].

A solver that meets a non-finite value (``f(z)`` overflows, an extrapolation blows up)
stops that element at its best finite iterate and marks it failed; the others go on.
``info.reason`` says ``"non-finite"`` then. Nothing is printed.

:func:`solve` never differentiates: it runs without autograd and returns detached
tensors (use :class:`iternn.dynamics.DEQ` for gradients through a fixed point).

New solvers are added with :func:`register_solver`; a solver is a function
``fn(f, z0, *, tol, max_steps, stop_mode, **options) -> (z_star, SolverInfo)`` that
receives ``f`` and ``z0`` flattened to one batch dim ``(B, n)`` and returns ``z_star``
of shape ``(B, n)`` and per-element fields of shape ``(B,)``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .functional import DynamicsError
from ..errors import ConvergenceError

__all__ = [
    "solve",
    "SolverInfo",
    "SOLVERS",
    "register_solver",
    "ConvergenceError",
    "default_tol",
    "STOP_MODES",
]

STOP_MODES = ("abs", "rel")


@dataclass
class SolverInfo:
    """What a solve did.

    Attributes:
        solver: the solver's name.
        converged: ``True`` when every batch element converged.
        converged_each: per-element flags, shape ``batch`` (``()`` for an unbatched solve).
        steps: updates made (``f`` was evaluated ``steps + 1`` times by the built-in
            solvers, once per iterate).
        residual_trace: 1-D float64 tensor of length ``steps + 1``: the largest residual
            over the batch at each iterate (``inf`` where one was not finite).
        residual: per-element residual of the returned iterate, shape ``batch``.
        tol: the tolerance used. stop_mode: ``"abs"`` or ``"rel"``.
        reason: ``"converged"``, ``"max_steps"`` or ``"non-finite"``.
    """

    solver: str
    converged: bool
    converged_each: Tensor
    steps: int
    residual_trace: Tensor
    residual: Tensor
    tol: float
    stop_mode: str
    reason: str

    def __repr__(self) -> str:
        n = self.converged_each.numel()
        ok = int(self.converged_each.sum())
        res = float(self.residual.max()) if self.residual.numel() else float("nan")
        return (
            f"SolverInfo(solver={self.solver!r}, converged={self.converged} ({ok}/{n}), "
            f"steps={self.steps}, residual={res:.3g}, tol={self.tol:g}, reason={self.reason!r})"
        )


SolverFn = Callable[..., "tuple[Tensor, SolverInfo]"]
SOLVERS: dict[str, SolverFn] = {}


def register_solver(name: str, fn: SolverFn) -> SolverFn:
    """Add (or replace) solver ``name``; returns ``fn``.

    ``fn(f, z0, *, tol, max_steps, stop_mode, **options) -> (z_star, SolverInfo)``; the
    keyword options it declares are the options :func:`solve` accepts for it.
    """
    if not isinstance(name, str) or not name:
        raise DynamicsError(f"solver name must be a non-empty str, got {name!r}")
    if not callable(fn):
        raise DynamicsError(f"solver {name!r} must be callable, got {type(fn).__name__}")
    SOLVERS[name] = fn
    return fn


def check_solver(name: object) -> SolverFn:
    """The registered solver ``name``, or a :class:`DynamicsError` listing the available ones."""
    if not isinstance(name, str) or name not in SOLVERS:
        raise DynamicsError(f"unknown solver {name!r}; available solvers: {sorted(SOLVERS)}")
    return SOLVERS[name]


def default_tol(dtype: torch.dtype) -> float:
    """The default residual tolerance for a dtype: 1e-10 (float64), 1e-5 (float32), 1e-2."""
    if dtype == torch.float64:
        return 1e-10
    if dtype == torch.float32:
        return 1e-5
    return 1e-2


def check_tol(tol: object, name: str = "tol") -> float:
    if isinstance(tol, bool) or not isinstance(tol, (int, float)):
        raise DynamicsError(f"{name} must be a positive number, got {tol!r}")
    if not (math.isfinite(tol) and tol > 0):
        raise DynamicsError(f"{name} must be a positive finite number, got {tol!r}")
    return float(tol)


def check_steps(steps: object, name: str = "max_steps", minimum: int = 0) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < minimum:
        raise DynamicsError(f"{name} must be an int >= {minimum}, got {steps!r}")
    return steps


def check_options(name: str, fn: SolverFn, options: dict) -> None:
    """Every key of ``options`` must be a keyword the solver declares."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    own = [k for k, p in params.items()
           if p.kind is inspect.Parameter.KEYWORD_ONLY and k not in ("tol", "max_steps", "stop_mode")]
    unknown = [k for k in options if k not in own]
    if unknown:
        raise DynamicsError(
            f"solver {name!r} has no option(s) {unknown}; its options are {own}"
        )


def solve(
    f: Callable[[Tensor], Tensor],
    z0: Tensor,
    *,
    solver: str = "anderson",
    tol: float | None = None,
    max_steps: int = 200,
    stop_mode: str = "abs",
    **options,
) -> tuple[Tensor, SolverInfo]:
    """Solve ``z = f(z)`` from ``z0`` with a registered solver.

    Args:
        f: ``(*batch, n) -> (*batch, n)``, batch elements independent.
        z0: starting point ``(*batch, n)`` (or ``(n,)``), finite, floating point.
        solver: a name in :data:`SOLVERS` (``"picard"``, ``"anderson"``, ``"broyden"``).
        tol: residual tolerance; ``None`` picks :func:`default_tol` for ``z0``'s dtype.
        max_steps: at most this many updates (``0`` only measures the residual of ``z0``).
        stop_mode: ``"abs"`` or ``"rel"`` residual (see the module docs).
        **options: the solver's own options (e.g. ``m``, ``lam``, ``beta``, ``memory``).

    Returns:
        ``(z_star, info)``: ``z_star`` with ``z0``'s shape (detached), and a
        :class:`SolverInfo` whose per-element fields have ``z0``'s batch shape.

    Raises:
        DynamicsError: unknown solver or option, bad ``tol``/``max_steps``/``stop_mode``,
            ``z0`` not a finite floating tensor, or ``f`` returning the wrong shape.
    """
    fn = check_solver(solver)
    check_options(solver, fn, options)
    if not isinstance(z0, Tensor):
        raise DynamicsError(f"z0 must be a tensor, got {type(z0).__name__}")
    if not z0.is_floating_point():
        raise DynamicsError(f"z0 must be floating point, got {z0.dtype}")
    if z0.dim() < 1 or z0.shape[-1] == 0:
        raise DynamicsError(f"z0 must have shape (*batch, n) with n >= 1, got {tuple(z0.shape)}")
    tol = default_tol(z0.dtype) if tol is None else check_tol(tol)
    max_steps = check_steps(max_steps)
    if stop_mode not in STOP_MODES:
        raise DynamicsError(f"stop_mode must be one of {STOP_MODES}, got {stop_mode!r}")
    if z0.numel() and not torch.isfinite(z0).all():
        raise DynamicsError("z0 contains NaN or infinite values")
    batch, n = tuple(z0.shape[:-1]), z0.shape[-1]

    def flat_f(z: Tensor) -> Tensor:
        out = f(z.reshape(*batch, n))
        if not isinstance(out, Tensor) or out.shape != (*batch, n):
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise DynamicsError(f"f must map shape {(*batch, n)} to the same shape, got {shape}")
        return out.reshape(-1, n)

    with torch.no_grad():
        z, info = fn(flat_f, z0.detach().reshape(-1, n).clone(), tol=tol,
                     max_steps=max_steps, stop_mode=stop_mode, **options)
    info.solver = solver
    info.converged_each = info.converged_each.reshape(batch)
    info.residual = info.residual.reshape(batch)
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
            reason = "converged"
        elif bool(self.failed.any()):
            reason = "non-finite"
        else:
            reason = "max_steps"
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


def _check_beta(beta: object) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 < beta <= 1:
        raise DynamicsError(f"beta must be a number in (0, 1], got {beta!r}")
    return float(beta)


# ---------------------------------------------------------------------- solvers
def picard(f, z0: Tensor, *, tol: float, max_steps: int, stop_mode: str = "abs",
           beta: float = 1.0) -> tuple[Tensor, SolverInfo]:
    """Damped Picard iteration ``z <- (1 - beta) z + beta f(z)``."""
    beta = _check_beta(beta)

    def update(k, z, fz, active):
        return fz if beta == 1.0 else torch.lerp(z, fz, beta)

    return _run("picard", f, z0, tol, max_steps, stop_mode, update)


def anderson(f, z0: Tensor, *, tol: float, max_steps: int, stop_mode: str = "abs",
             m: int = 5, lam: float = 1e-4, beta: float = 1.0) -> tuple[Tensor, SolverInfo]:
    """Anderson acceleration with memory ``m`` (see the module docs)."""
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise DynamicsError(f"m (Anderson memory) must be an int >= 1, got {m!r}")
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (math.isfinite(lam) and lam >= 0):
        raise DynamicsError(f"lam must be a finite number >= 0, got {lam!r}")
    beta = _check_beta(beta)
    b, n = z0.shape
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
        sol, info = torch.linalg.solve_ex(h, rhs)
        alpha = sol[:, 1:, 0]
        ok = (info == 0) & torch.isfinite(alpha).all(-1)
        alpha = torch.where(ok[:, None], alpha, 0.0).to(z.dtype)
        mixed_f = (alpha[:, None, :] @ fs[:, :nk]).squeeze(1)
        mixed_x = (alpha[:, None, :] @ xs[:, :nk]).squeeze(1)
        new = mixed_f if beta == 1.0 else beta * mixed_f + (1 - beta) * mixed_x
        return torch.where(ok[:, None], new, torch.lerp(z, fz, beta))

    return _run("anderson", f, z0, tol, max_steps, stop_mode, update)


def broyden(f, z0: Tensor, *, tol: float, max_steps: int, stop_mode: str = "abs",
            memory: int = 30) -> tuple[Tensor, SolverInfo]:
    """Limited-memory good Broyden on ``g(z) = f(z) - z`` (see the module docs)."""
    if isinstance(memory, bool) or not isinstance(memory, int) or memory < 1:
        raise DynamicsError(f"memory (Broyden rank) must be an int >= 1, got {memory!r}")
    b, n = z0.shape
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

    return _run("broyden", f, z0, tol, max_steps, stop_mode, update)


register_solver("picard", picard)
register_solver("anderson", anderson)
register_solver("broyden", broyden)
