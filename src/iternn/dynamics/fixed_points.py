"""Fixed points of a block map: solve from one state, or find many and classify them.

With some slots held (the input), a fixed point is ``z* = act(b + F z*)`` on the free
slots (paper §4.3.2). :func:`fixed_point` solves for it from a starting state with the
solvers of :mod:`iternn.dynamics.solvers`. :func:`find_fixed_points` looks for every
fixed *and slow* point reachable from many starting states, the FixedPointFinder method
(Sussillo & Barak 2013; Golub & Sussillo 2018): minimise the speed
``q(z) = 1/2 ||z - G(z)||^2`` from each start, polish with Newton's method, keep the
points with small ``q``, drop duplicates and classify each by the eigenvalues of the
Jacobian of ``G`` there.

Neither function differentiates through the solve (results are detached); for
gradients through a fixed point use :class:`iternn.dynamics.DEQ`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.block_map import BlockMap
from ..core.memory import check_bytes
from ..core.state import check_state
from ..errors import ConvergenceError, DynamicsError
from .functional import MapFunction
from .jacobian import _jacobian_at
from .linalg import verified_solve
from .solvers import SolverInfo, SolverLike, as_solver, solve
from .validate import (
    as_block_map,
    check_hold,
    check_int,
    check_map_finite,
    check_matrix_finite,
    check_non_negative,
    check_positive,
    check_stop_mode,
    check_update,
    shape_text,
    slot_zeros,
)

__all__ = ["fixed_point", "find_fixed_points", "FixedPoints", "ConvergenceError"]


def fixed_point(
    m: BlockMap,
    state: Mapping[str, Tensor],
    /,
    *,
    solver: SolverLike = "anderson",
    tol: float | None = None,
    max_steps: int = 200,
    hold: Collection[str] = (),
    raise_on_failure: bool = False,
    update: str = "jacobi",
    stop_mode: str = "abs",
    block_kwargs: Mapping[str, Mapping] | None = None,
) -> tuple[dict[str, Tensor], SolverInfo]:
    """Solve ``z* = m(z*)`` with the ``hold`` slots fixed, starting from ``state``.

    Args:
        m: the block map.
        state: starting state ``slot -> (*batch, *shape)``; free slots left out start at
            zero, held slots must be given. Every batch element is solved independently
            (the solver works on the packed free slots, each flattened row-major).
        solver: a solver object (``Anderson(m=5)``, ``Picard(damping=0.5)``,
            ``Broyden()``, see :mod:`iternn.dynamics.solvers`) or a registered name
            (``"anderson"``, ``"picard"``, ``"broyden"``: the default object).
        tol: residual tolerance ``||G(z) - z||`` (``None``: by dtype, see
            :func:`~iternn.dynamics.solvers.default_tol`).
        max_steps: most solver updates.
        hold: slots kept at their value (the input).
        raise_on_failure: raise :class:`ConvergenceError` (a ``RuntimeError`` carrying
            ``.info``) unless every element converged; otherwise failure is only reported.
        update: ``"jacobi"`` (the paper's map) or ``"ordered"`` (see :func:`iternn.iterate`).
        stop_mode, block_kwargs: passed to the solver / the map.

    Returns:
        ``(state_star, info)``: every slot at the fixed point (held slots as given, free
        slots detached) and the :class:`~iternn.dynamics.solvers.SolverInfo`.

    Raises:
        DynamicsError: unknown solver, bad ``tol``/``max_steps``, every slot held
            (nothing to solve), NaN in the state or the map's weights, unknown held slot.
        ConvergenceError: not converged and ``raise_on_failure`` is true.
    """
    m = as_block_map(m)
    name, solver = as_solver(solver)
    if tol is not None:
        check_positive(tol, "tol")
    check_int(max_steps, "max_steps")
    check_stop_mode(stop_mode)
    batch, _, _ = check_state(m, state)
    if batch is None:
        raise DynamicsError("state is empty: give at least the held slots (they set the batch shape)")
    hold = check_hold(m, hold)
    check_map_finite(m)
    ref = next(iter(state.values()))
    full = {s: state[s] if s in state else slot_zeros(m, s, batch, ref) for s in m.slots}
    g = MapFunction(m, full, hold=hold, update=update, block_kwargs=block_kwargs)
    z, info = solve(g, g.pack(full), solver=solver, tol=tol, max_steps=max_steps,
                    stop_mode=stop_mode)
    if raise_on_failure and not info.converged:
        n_bad = int((~info.converged_each).sum())
        raise ConvergenceError(
            f"fixed_point: solver {name!r} did not converge for {n_bad} of "
            f"{info.converged_each.numel() or 1} element(s) in {info.steps} steps "
            f"(residual {float(info.residual.max()):.3g} > tol {info.tol:g}; "
            f"{info.reason.message})",
            info,
        )
    out = g.unpack(z)
    return {s: out[s] for s in m.slots}, info


# ---------------------------------------------------------------------- finding
@dataclass
class FixedPoints:
    """Fixed and slow points found by :func:`find_fixed_points`, lowest ``q`` first.

    Attributes:
        points: ``(K, n_free)`` packed free slots (slot order ``free``, each flattened
            row-major).
        states: ``slot -> (K, *shape)``, every slot (held ones included).
        q: ``(K,)`` speed ``1/2 ||z - G(z)||^2``.
        kind: ``"fixed"`` (``q <= fixed_tol``) or ``"slow"`` per point.
        eigenvalues: ``(K, n_free)`` complex eigenvalues of the Jacobian of ``G``,
            by decreasing modulus.
        stability: ``"stable"`` (every ``|λ| < 1``), ``"unstable"`` (every ``|λ| > 1``),
            ``"saddle"`` (some of each) or ``"marginal"`` (the largest ``|λ|`` is 1 within
            ``marginal_tol``, none above) per point.
        free: the free slots, in packing order.
        n_starts: number of starting states.
        n_discarded: starts whose final ``q`` exceeded ``slow_tol`` (or was not finite).
    """

    points: Tensor
    states: dict[str, Tensor]
    q: Tensor
    kind: tuple[str, ...]
    eigenvalues: Tensor
    stability: tuple[str, ...]
    free: tuple[str, ...]
    n_starts: int
    n_discarded: int

    def __len__(self) -> int:
        return self.points.shape[0]

    @property
    def spectral_radius(self) -> Tensor:
        """``(K,)`` largest ``|λ|`` per point."""
        return self.eigenvalues.abs()[:, 0] if len(self) else self.q.new_zeros(0)

    def __repr__(self) -> str:
        rows = [f"FixedPoints({len(self)} found from {self.n_starts} starts, "
                f"{self.n_discarded} discarded)"]
        for i in range(len(self)):
            rows.append(f"  {i}: {self.kind[i]:5s} {self.stability[i]:8s} q={float(self.q[i]):.3g} "
                        f"|λ|max={float(self.spectral_radius[i]):.4g}")
        return "\n".join(rows)


def _jacobians(g: MapFunction, z: Tensor) -> Tensor:
    """``J[b] = dG(z)[b] / dz[b]`` for every start ``b`` of ``z`` (``(N, n)``), exact:
    assembled block by block where the map allows it, else by forward-mode autograd."""
    return _jacobian_at(g.map, g, z.detach(), tuple(z.shape[:-1]),
                        block_kwargs=g.block_kwargs)


def _speed(g, z: Tensor) -> Tensor:
    return 0.5 * (z - g(z)).pow(2).sum(-1)


def find_fixed_points(
    m: BlockMap,
    states: Mapping[str, Tensor],
    /,
    *,
    hold: Collection[str] = (),
    method: str = "adam",
    opt_steps: int = 1000,
    lr: float = 1e-2,
    polish: bool = True,
    polish_steps: int = 20,
    polish_radius: float = 0.1,
    fixed_tol: float = 1e-12,
    slow_tol: float = 1e-4,
    unique_tol: float = 1e-4,
    marginal_tol: float = 1e-6,
    update: str = "jacobi",
    block_kwargs: Mapping[str, Mapping] | None = None,
) -> FixedPoints:
    """Find fixed and slow points of ``m`` (``hold`` slots fixed) from many starts.

    Args:
        m: the block map.
        states: starting states ``slot -> (N, *shape)``: free slots (left out: zero)
            give the ``N`` starts; a held slot may be ``(*shape)`` (shared by all
            starts), ``(1, *shape)`` or ``(N, *shape)``.
        hold: slots kept fixed (e.g. a constant input).
        method: ``"adam"`` (each start independent: Adam is element-wise and ``q`` is a
            sum over starts; the learning rate decays geometrically to ``lr / 100``) or
            ``"lbfgs"`` (``torch.optim.LBFGS`` with a strong-Wolfe line search on the sum
            of ``q``; faster on smooth problems, but the starts share one line search).
        opt_steps: optimiser steps (L-BFGS: iterations).
        lr: learning rate (Adam) or initial step (L-BFGS).
        polish: refine with Newton's method on ``G(z) - z`` (exact Jacobian, at most
            ``polish_steps`` steps, each capped at ``polish_radius`` in norm and halved
            until ``q`` decreases; a step that does not decrease ``q`` is not taken).
        fixed_tol: ``q`` at most this: a fixed point.
        slow_tol: ``q`` at most this (and above ``fixed_tol``): a slow point; larger ``q``
            is discarded.
        unique_tol: points closer than this (Euclidean, over every slot) are the same;
            the one with the lower ``q`` is kept.
        marginal_tol: ``|λ|`` within this of 1 counts as 1 (``"marginal"``).
        update, block_kwargs: as for :func:`iternn.iterate`.

    Returns:
        A :class:`FixedPoints` (lowest ``q`` first: fixed points before slow points).
    """
    m = as_block_map(m)
    hold = check_hold(m, hold)
    if method not in ("adam", "lbfgs"):
        raise DynamicsError(f"method must be 'adam' or 'lbfgs', got {method!r}")
    check_int(opt_steps, "opt_steps")
    check_int(polish_steps, "polish_steps")
    lr = check_positive(lr, "lr")
    polish_radius = check_positive(polish_radius, "polish_radius")
    fixed_tol = check_non_negative(fixed_tol, "fixed_tol")
    slow_tol = check_non_negative(slow_tol, "slow_tol")
    if slow_tol < fixed_tol:
        raise DynamicsError(f"slow_tol ({slow_tol}) must be >= fixed_tol ({fixed_tol})")
    unique_tol = check_non_negative(unique_tol, "unique_tol")
    marginal_tol = check_non_negative(marginal_tol, "marginal_tol")
    check_update(update)
    check_map_finite(m)
    if not isinstance(states, Mapping):
        raise DynamicsError(
            f"states must be a dict slot -> (N, *shape) tensor, got {type(states).__name__}"
        )
    for s in states:
        if s not in m.slots:
            raise DynamicsError(f"states names unknown slot {s!r}; slots are {list(m.slots)}")
    for s in hold:
        if s not in m.slots:
            raise DynamicsError(f"hold names unknown slot {s!r}; slots are {list(m.slots)}")
    free_given = [s for s in m.slots if s in states and s not in hold]
    if not free_given:
        raise DynamicsError(
            "states must give at least one free slot as an (N, *shape) tensor of starting "
            "points"
        )
    first = free_given[0]
    ref = states[first]
    shape = m.shapes[first]
    if (not isinstance(ref, Tensor) or ref.dim() != 1 + len(shape)
            or tuple(ref.shape[1:]) != shape):
        raise DynamicsError(
            f"starting states must be (N, *shape) tensors ((N, n) for a vector slot of "
            f"size n); slot {first!r} needs "
            f"{shape_text(shape, ('N',))}, got "
            f"{tuple(ref.shape) if isinstance(ref, Tensor) else type(ref).__name__}"
        )
    n_starts = ref.shape[0]
    full: dict[str, Tensor] = {}
    for s in m.slots:
        v = states.get(s)
        shape = m.shapes[s]
        if v is None:
            if s in hold:
                raise DynamicsError(f"held slot {s!r} needs a value in states")
            v = slot_zeros(m, s, (n_starts,), ref)
        elif isinstance(v, Tensor) and s in hold and tuple(v.shape) in (shape, (1, *shape)):
            v = v.expand(n_starts, *shape)  # one value shared by every start
        full[s] = v
    check_state(m, full)
    g = MapFunction(m, full, hold=hold, update=update, block_kwargs=block_kwargs)
    z = g.pack(full).detach().clone()

    if n_starts and opt_steps:
        z = _minimise(g, z, method, opt_steps, lr)
    if n_starts and polish and polish_steps:
        z = _newton(g, z, polish_steps, polish_radius)

    with torch.no_grad():
        q = _speed(g, z) if n_starts else z.new_zeros(0)
    keep = torch.isfinite(q) & (q <= slow_tol)
    n_discarded = int((~keep).sum())
    idx = torch.nonzero(keep).flatten()
    idx = idx[torch.argsort(q[idx], stable=True)]
    packed_all = m.pack(g.unpack(z))  # every slot: starts with other held values differ
    chosen: list[int] = []
    for i in idx.tolist():
        if chosen and bool((torch.linalg.vector_norm(
                packed_all[chosen] - packed_all[i], dim=-1) <= unique_tol).any()):
            continue
        chosen.append(i)
    sel = torch.tensor(chosen, dtype=torch.long, device=z.device)
    points = z[sel]
    q_sel = q[sel]
    held_sel = {s: full[s][sel] for s in hold}
    g_sel = MapFunction(m, held_sel, hold=hold, update=update,
                        block_kwargs=block_kwargs) if chosen else None
    if chosen:
        jac = _jacobians(g_sel, points)
        check_matrix_finite(jac, "the Jacobian at a found point", g.free, g.sizes, g.shapes)
        eig = torch.linalg.eigvals(jac)
        order = torch.argsort(eig.abs(), dim=-1, descending=True, stable=True)
        eig = torch.gather(eig, -1, order)
    else:
        eig = torch.zeros(0, g.size, dtype=torch.complex128 if z.dtype == torch.float64
                          else torch.complex64, device=z.device)
    stability = tuple(_classify(e, marginal_tol) for e in eig.abs())
    kind = tuple("fixed" if float(v) <= fixed_tol else "slow" for v in q_sel)
    out_states = g_sel.unpack(points) if chosen else {
        s: full[s][:0] for s in m.slots}
    return FixedPoints(
        points=points,
        states={s: out_states[s] for s in m.slots},
        q=q_sel,
        kind=kind,
        eigenvalues=eig,
        stability=stability,
        free=g.free,
        n_starts=n_starts,
        n_discarded=n_discarded,
    )


def _classify(mod: Tensor, tol: float) -> str:
    above = bool((mod > 1 + tol).any())
    below = bool((mod < 1 - tol).any())
    if above:
        return "saddle" if below else "unstable"
    return "stable" if bool((mod < 1 - tol).all()) else "marginal"


def _minimise(g, z0: Tensor, method: str, steps: int, lr: float) -> Tensor:
    """Minimise ``q`` from every start; return the best iterate per start."""
    z = z0.clone().requires_grad_(True)
    best = z0.clone()
    with torch.no_grad():
        best_q = _speed(g, z0)
    best_q = torch.where(torch.isfinite(best_q), best_q, torch.inf)
    with torch.enable_grad():
        if method == "adam":
            opt = torch.optim.Adam([z], lr=lr)
            gamma = 0.01 ** (1.0 / max(steps, 1))
            sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma)
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                q = _speed(g, z)
                qd = q.detach()
                better = torch.isfinite(qd) & (qd < best_q)
                best = torch.where(better[:, None], z.detach(), best)
                best_q = torch.where(better, qd, best_q)
                if bool((best_q == 0).all()):
                    break
                q.sum().backward()
                opt.step()
                sched.step()
        else:
            opt = torch.optim.LBFGS([z], lr=lr, max_iter=steps, tolerance_grad=0.0,
                                    tolerance_change=0.0, history_size=20,
                                    line_search_fn="strong_wolfe")

            def closure():
                opt.zero_grad(set_to_none=True)
                loss = _speed(g, z).sum()
                loss.backward()
                return loss

            opt.step(closure)
    with torch.no_grad():
        q = _speed(g, z)
        better = torch.isfinite(q) & (q < best_q)
        return torch.where(better[:, None], z.detach(), best)


def _newton(g, z: Tensor, steps: int, radius: float) -> Tensor:
    """Newton on ``G(z) - z`` with capped, backtracked steps that must decrease ``q``."""
    z = z.detach().clone()
    n = z.shape[-1]
    check_bytes((z.shape[0] + 1) * n * n * z.element_size(),
                f"the Newton polish (polish_steps) of {z.shape[0]} point(s) over {n} free units "
                f"(a {n} x {n} Jacobian each, {z.dtype})", device=z.device)
    eye = torch.eye(n, dtype=z.dtype, device=z.device)
    with torch.no_grad():
        q = _speed(g, z)
    for _ in range(steps):
        jac = _jacobians(g, z)
        with torch.no_grad():
            r = g(z) - z
            dz, ok = verified_solve(jac - eye, -r.unsqueeze(-1), what="Newton polish step",
                                    allow_failure=True)
            dz = dz.squeeze(-1)
            ok = ok & torch.isfinite(q)
            dz = torch.where(ok[:, None], dz, 0.0)
            norm = torch.linalg.vector_norm(dz, dim=-1, keepdim=True)
            dz = dz * torch.clamp(radius / norm.clamp_min(torch.finfo(z.dtype).tiny), max=1.0)
            moved = torch.zeros_like(ok)
            t = 1.0
            for _ in range(12):
                todo = ok & ~moved
                if not bool(todo.any()):
                    break
                trial = z + t * dz
                q_trial = _speed(g, trial)
                accept = todo & torch.isfinite(q_trial) & (q_trial < q)
                z = torch.where(accept[:, None], trial, z)
                q = torch.where(accept, q_trial, q)
                moved |= accept
                t *= 0.5
            if not bool(moved.any()):
                break
    return z
