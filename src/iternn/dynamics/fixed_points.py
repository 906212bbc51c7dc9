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

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.block_map import BlockMap
from ..core.memory import check_bytes
from ..core.state import check_state
from ..errors import ConvergenceError, DynamicsError
from .functional import NO_SEQUENCES, MapFunction, refuse_mixing
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

#: fixed_point's part of the remedy for a map that mixes positions.
ONE_POSITION = "it solves a state of one position, (1, *shape), on such a map; "


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
            (nothing to solve), NaN in the state or the map's weights, an unknown held
            slot or one without a value in ``state``, bad ``block_kwargs``; a block into
            a free slot that mixes positions (attention, named: the solver takes every
            batch element as a problem of its own, see
            :func:`~iternn.dynamics.functional.refuse_mixing`), unless the state is one
            position, ``(1, *shape)`` (every leading dim 1).
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
    for s in hold:
        if s not in state:
            raise DynamicsError(f"held slot {s!r} needs a value in state")
    check_map_finite(m)
    if not batch or math.prod(batch) != 1:  # one state of one position: nothing to mix
        refuse_mixing(m, hold, "fixed_point", ONE_POSITION + NO_SEQUENCES.format("fixed_point"))
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
    """``J[b] = dG(z)[b] / dz[b]`` for every start ``b`` of ``z`` (``(N, n)``), exact and
    batched: assembled block by block where the map allows it, else by forward-mode
    autograd (``torch.func.jacfwd``, one tangent per column shared by every start)."""
    return _jacobian_at(g.map, g, z.detach(), tuple(z.shape[:-1]),
                        block_kwargs=g.block_kwargs)


def _speed(g: MapFunction, z: Tensor) -> Tensor:
    """``q = 1/2 ||z - G(z)||^2`` per row."""
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
    check_after: int | None = 50,
    update: str = "jacobi",
    block_kwargs: Mapping[str, Mapping] | None = None,
) -> FixedPoints:
    """Find fixed and slow points of ``m`` (``hold`` slots fixed) from many starts.

    Each start is optimised (``method``), then polished by Newton's method; a start
    stops costing work once it has converged:

    * *Convergence checks* (Adam with ``polish``): after ``check_after`` optimiser
      steps, then after twice as many, four times …, the iterates are checked. A start
      has converged when Newton's method from its iterate reaches a fixed point
      (``q <= fixed_tol``) at most ``8 * polish_radius`` away; it then leaves the
      optimisation. (From farther away, the remaining optimiser steps could still lead
      it to another point, so it goes on.)
    * *De-duplication before the polish*: a start near a fixed point found already
      (within the same distance) first takes chord steps
      ``z <- z - (J* - I)^{-1} (G(z) - z)`` with the Jacobian ``J*`` of that point,
      each decreasing ``q`` and at most half as long as the one before; if they reach
      ``q <= fixed_tol`` within ``unique_tol`` of the point, the start is its duplicate
      and is not polished. Newton's method runs on a few starts
      at a time, spread out over the state space, and the others are tried against the
      points it finds before they are polished themselves.
    * The optimiser and the polish work on the active starts only, and the Jacobians
      of a batch of points are computed at once (block by block where the map allows
      it, else by forward-mode autograd).

    A start that converges at no check runs every optimiser step and is polished at the
    end, as is every start with ``check_after=None`` or ``method="lbfgs"``; without
    ``polish`` nothing is checked and the optimiser's best iterates are the result.
    A check hands a start to Newton's method before the optimiser is done with it, so
    now and then a start reaches another fixed point than it would after every step;
    a point reached from several starts is found either way. ``check_after=None``
    searches without checks: start by start as the optimiser and the polish lead.

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
        check_after: optimiser steps before the first convergence check (an int
            ``>= 1``; later checks double the count), or ``None``: no checks.
        update, block_kwargs: as for :func:`iternn.iterate`.

    Returns:
        A :class:`FixedPoints` (lowest ``q`` first: fixed points before slow points;
        empty for ``N = 0`` starts).

    Raises:
        DynamicsError: a bad option, starting state or held value (naming the slot), a
            map whose weights hold NaN or inf; a block into a free slot that mixes
            positions (attention, named: the starts are a batch of single states, see
            :func:`~iternn.dynamics.functional.refuse_mixing`).
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
    if check_after is not None:
        check_int(check_after, "check_after", minimum=1)
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
    refuse_mixing(m, hold, "find_fixed_points", NO_SEQUENCES.format("find_fixed_points"))
    g = MapFunction(m, full, hold=hold, update=update, block_kwargs=block_kwargs)
    z = g.pack(full).detach().clone()

    search = _Search(g, full, polish=polish and polish_steps > 0, polish_steps=polish_steps,
                     polish_radius=polish_radius, fixed_tol=fixed_tol, unique_tol=unique_tol)
    if n_starts:
        everyone = torch.arange(n_starts, device=z.device)
        if opt_steps and method == "adam":
            search.adam(z, opt_steps, lr, check_after if search.polish else None)
        else:
            if opt_steps:
                z = _lbfgs(g, z, opt_steps, lr)
            search.settle(everyone, z, final=True)
    points, q, origin = search.candidates()
    keep = torch.isfinite(q) & (q <= slow_tol)
    n_discarded = int((~keep).sum())
    idx = torch.nonzero(keep).flatten()
    idx = idx[torch.argsort(q[idx], stable=True)]
    chosen = idx[_cover(search.place(points[idx], origin[idx]), unique_tol)]
    points, q_sel, origin = points[chosen], q[chosen], origin[chosen]
    if len(chosen):
        g_sel = search.g(origin)
        jac = _jacobians(g_sel, points)
        check_matrix_finite(jac, "the Jacobian at a found point", g.free, g.sizes, g.shapes)
        eig = torch.linalg.eigvals(jac)
        order = torch.argsort(eig.abs(), dim=-1, descending=True, stable=True)
        eig = torch.gather(eig, -1, order)
        out_states = g_sel.unpack(points)
    else:
        eig = torch.zeros(0, g.size, dtype=torch.complex128 if z.dtype == torch.float64
                          else torch.complex64, device=z.device)
        out_states = {s: full[s][:0] for s in m.slots}
    return FixedPoints(
        points=points,
        states={s: out_states[s] for s in m.slots},
        q=q_sel,
        kind=tuple("fixed" if v else "slow" for v in (q_sel <= fixed_tol).tolist()),
        eigenvalues=eig,
        stability=_classify(eig.abs(), marginal_tol),
        free=g.free,
        n_starts=n_starts,
        n_discarded=n_discarded,
    )


def _classify(mod: Tensor, tol: float) -> tuple[str, ...]:
    """Per row of ``|λ|``: stable, unstable, saddle or marginal (see FixedPoints)."""
    above = (mod > 1 + tol).any(-1).tolist()
    below = (mod < 1 - tol).any(-1).tolist()
    every_below = (mod < 1 - tol).all(-1).tolist()
    return tuple(
        ("saddle" if b else "unstable") if a else ("stable" if e else "marginal")
        for a, b, e in zip(above, below, every_below)
    )


def _cover(x: Tensor, radius: float) -> Tensor:
    """Greedy cover of the rows of ``x`` in their order: a row is kept unless a kept
    row lies within ``radius`` (Euclidean); the indices of the kept rows."""
    kept: list[int] = []
    free = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    while True:
        left = torch.nonzero(free)
        if not left.numel():
            break
        i = int(left[0])
        kept.append(i)
        free &= torch.linalg.vector_norm(x - x[i], dim=-1) > radius
    return torch.tensor(kept, dtype=torch.long, device=x.device)


# How far a convergence check may carry a start: Newton's method from an iterate farther
# than this many polish radii from the fixed point it reaches may land elsewhere than it
# would after the remaining optimiser steps, so such a start keeps optimising.
_REACH = 8.0
# Chord steps must shrink at least by this factor each step (a contraction towards the
# point whose Jacobian they use), or the start is not that point's duplicate.
_CONTRACT = 0.5


def _spread(x: Tensor, k: int) -> Tensor:
    """``k`` rows of ``x`` spread out: the first row, then repeatedly the row farthest
    from those taken (greedy farthest-point); their indices."""
    taken = [0]
    dist = torch.linalg.vector_norm(x - x[0], dim=-1)
    for _ in range(min(k, x.shape[0]) - 1):
        i = int(torch.argmax(dist))
        if not float(dist[i]) > 0:
            break
        taken.append(i)
        dist = torch.minimum(dist, torch.linalg.vector_norm(x - x[i], dim=-1))
    return torch.tensor(taken, dtype=torch.long, device=x.device)


def _by_speed(q: Tensor) -> Tensor:
    """Indices ordering ``q`` ascending, non-finite last."""
    return torch.argsort(torch.where(torch.isfinite(q), q, torch.inf), stable=True)


def _nearest(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """For each row of ``x``: the index of the nearest row of ``y`` and its distance
    (exact differences, in chunks of rows so the distance matrix stays small)."""
    index, dist = [], []
    for part in torch.split(x, max(1, 2**22 // max(y.shape[0], 1))):
        d = torch.cdist(part, y, compute_mode="donot_use_mm_for_euclid_dist").min(dim=-1)
        index.append(d.indices)
        dist.append(d.values)
    return torch.cat(index), torch.cat(dist)


class _Search:
    """The bookkeeping of one search over ``N`` starts.

    ``full`` holds the starts' states (held slots ``(N, *shape)``). The search keeps the
    fixed points found so far (``points``, their ``q``, the start each came from, which
    gives its held values, and ``(J - I)^{-1}`` there for chord steps where ``J - I`` is
    invertible, ``chordable``) and the final iterate of every start that converged to
    none of them (``ends``).
    """

    def __init__(self, g: MapFunction, full: Mapping[str, Tensor], *, polish: bool,
                 polish_steps: int, polish_radius: float, fixed_tol: float,
                 unique_tol: float) -> None:
        self.full = full
        self.map, self.hold = g.map, g.hold
        self.update, self.block_kwargs = g.update, g.block_kwargs
        self.polish, self.polish_steps, self.radius = polish, polish_steps, polish_radius
        self.fixed_tol, self.unique_tol = fixed_tol, unique_tol
        self.reach = _REACH * polish_radius
        ref = g.pack(full)
        n_starts, n = ref.shape
        self.held = (torch.cat([full[s].flatten(1) for s in g.hold], dim=-1)
                     if g.hold else ref.new_zeros(n_starts, 0))
        self.points = ref.new_zeros(0, n)
        self.q = ref.new_zeros(0)
        self.origin = torch.zeros(0, dtype=torch.long, device=ref.device)
        self.inv = ref.new_zeros(0, n, n)
        self.chordable = torch.zeros(0, dtype=torch.bool, device=ref.device)
        self.ends: list[tuple[Tensor, Tensor, Tensor]] = []

    def g(self, idx: Tensor) -> MapFunction:
        """``G`` on the starts ``idx`` (with their held values)."""
        return MapFunction(self.map, {s: self.full[s][idx] for s in self.hold},
                           hold=self.hold, update=self.update, block_kwargs=self.block_kwargs)

    def place(self, z: Tensor, idx: Tensor) -> Tensor:
        """Rows ``z`` of the starts ``idx`` with their held values appended: distances
        between these are distances over every slot."""
        return torch.cat([z, self.held[idx]], dim=-1)

    def candidates(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(points, q, origin)``: the fixed points found, then every final iterate."""
        parts = [(self.points, self.q, self.origin), *self.ends]
        return tuple(torch.cat(p) for p in zip(*parts))  # type: ignore[return-value]

    # ------------------------------------------------------------------ optimisation
    def adam(self, z0: Tensor, steps: int, lr: float, check_after: int | None) -> None:
        """Adam on ``q`` from every start (``torch.optim.Adam``'s update with its default
        betas and eps, the learning rate decaying geometrically to ``lr / 100``), on the
        starts not converged yet. Each start keeps its best iterate; the convergence
        checks (after ``check_after`` steps, then twice as many, …) and the end settle
        those."""
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        gamma = 0.01 ** (1.0 / max(steps, 1))
        idx = torch.arange(z0.shape[0], device=z0.device)
        g = self.g(idx)
        z = z0.clone()
        avg, avg_sq = torch.zeros_like(z), torch.zeros_like(z)
        best = z0.clone()
        with torch.no_grad():
            best_q = _speed(g, z0)
        best_q = torch.where(torch.isfinite(best_q), best_q, torch.inf)
        failed = torch.zeros_like(best_q, dtype=torch.bool)  # Newton from it reached no point
        check = check_after
        for t in range(steps):
            with torch.enable_grad():
                zz = z.detach().requires_grad_(True)
                r = zz - g(zz)
                (grad,) = torch.autograd.grad(r, zz, r.detach())  # dq/dz, q = |r|^2 / 2
            with torch.no_grad():
                q = 0.5 * r.detach().pow(2).sum(-1)
                better = q < best_q  # false for NaN
                best = torch.where(better[:, None], z, best)
                best_q = torch.where(better, q, best_q)
                if bool((best_q == 0).all()):
                    break
                avg.lerp_(grad, 1 - beta1)
                avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (avg_sq.sqrt() / (1 - beta2 ** (t + 1)) ** 0.5).add_(eps)
                z = z.addcdiv(avg, denom, value=-lr * gamma**t / (1 - beta1 ** (t + 1)))
            if check is not None and t + 1 == check and t + 1 < steps:
                check *= 2
                done, no_point = self.settle(idx, best, final=False, skip=failed)
                failed |= no_point
                if bool(done.any()):
                    left = ~done
                    idx, z, best, best_q = idx[left], z[left], best[left], best_q[left]
                    avg, avg_sq, failed = avg[left], avg_sq[left], failed[left]
                    if not idx.numel():
                        return
                    g = self.g(idx)
        with torch.no_grad():
            q = _speed(g, z)
        self.settle(idx, torch.where((q < best_q)[:, None], z, best), final=True)

    # ------------------------------------------------------------------ settling
    def settle(self, idx: Tensor, z: Tensor, *, final: bool,
               skip: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Settle the starts ``idx`` at their iterates ``z``.

        A start converges when chord steps take it to a fixed point already found
        (:meth:`_chord`) or Newton's method from it reaches ``q <= fixed_tol`` (a new
        point unless within ``unique_tol`` of one found). Newton's method runs on up to
        ``2 sqrt(M)`` starts at a time, spread out among the half with the lower ``q``,
        and the others are tried against the points it finds before they are polished
        themselves; rounds go on while at least a quarter of the points they reach are
        new.

        At a check (``final=False``) a start converges only within ``_REACH`` polish
        radii of its point, the ``skip`` starts are not polished, and the rest go on
        optimising from where they were. At the end (``final=True``) every start
        converges or is polished, and the polished iterates of the others are kept as
        candidates for slow points.

        Returns ``(done, failed)`` per start: converged, and polished without reaching
        a point.
        """
        with torch.no_grad():
            q = _speed(self.g(idx), z)
        if not self.polish:
            self.ends.append((z, q, idx))
            return torch.ones_like(q, dtype=torch.bool), torch.zeros_like(q, dtype=torch.bool)
        done = self._chord(idx, z, q, torch.ones_like(q, dtype=torch.bool))
        failed = torch.zeros_like(done)
        tried = done | skip if skip is not None else done.clone()
        budget = math.ceil(2 * idx.numel() ** 0.5)
        spread = True
        while not bool(tried.all()):
            todo = torch.nonzero(~tried).flatten()
            todo = todo[_by_speed(q[todo])]
            if spread and todo.numel() > budget:
                pool = todo[: max(budget, todo.numel() // 2)]
                todo = pool[_spread(self.place(z[pool], idx[pool]), budget)]
            zr, qr = self._newton(idx[todo], z[todo], math.inf if final else self.reach)
            reached = qr <= self.fixed_tol
            near = torch.linalg.vector_norm(zr - z[todo], dim=-1) <= self.reach
            ok = reached if final else reached & near
            new = self._add(zr[ok], qr[ok], idx[todo[ok]])
            done[todo[ok]] = True
            failed[todo[~reached & near]] = True
            tried[todo] = True
            if final:
                self.ends.append((zr[~ok], qr[~ok], idx[todo[~ok]]))
                done[todo] = True
            if new:
                done |= self._chord(idx, z, q, ~done)
                tried |= done
                if 4 * new >= int(ok.sum()):
                    continue
            if not final:
                break
            spread = False  # few new points: polish the rest at once
        return done, failed

    def _add(self, z: Tensor, q: Tensor, idx: Tensor) -> int:
        """Add fixed points (``q <= fixed_tol``) not within ``unique_tol`` of a found one
        (nor of each other: the lowest ``q`` is kept) with ``(J - I)^{-1}`` there, after
        chord steps down to rounding level; return how many were added."""
        if not z.shape[0]:
            return 0
        order = _by_speed(q)
        z, q, idx = z[order], q[order], idx[order]
        x = self.place(z, idx)
        if self.points.shape[0]:
            new = _nearest(x, self.place(self.points, self.origin))[1] > self.unique_tol
            z, q, idx, x = z[new], q[new], idx[new], x[new]
        keep = _cover(x, self.unique_tol)
        z, q, idx = z[keep], q[keep], idx[keep]
        if not z.shape[0]:
            return 0
        g = self.g(idx)
        jac = _jacobians(g, z)
        eye = torch.eye(z.shape[-1], dtype=z.dtype, device=z.device)
        inv, ok = verified_solve(jac - eye, eye.expand_as(jac), what="chord matrix",
                                 allow_failure=True)
        with torch.no_grad():  # q may just have passed fixed_tol: refine to rounding level
            r = g(z) - z
            for _ in range(self.polish_steps):
                trial = z - torch.bmm(inv, r.unsqueeze(-1)).squeeze(-1)
                r_trial = g(trial) - trial
                q_trial = 0.5 * r_trial.pow(2).sum(-1)
                accept = ok & (q_trial < q)
                if not bool(accept.any()):
                    break
                z = torch.where(accept[:, None], trial, z)
                r = torch.where(accept[:, None], r_trial, r)
                q = torch.where(accept, q_trial, q)
        self.points = torch.cat([self.points, z])
        self.q = torch.cat([self.q, q])
        self.origin = torch.cat([self.origin, idx])
        self.inv = torch.cat([self.inv, inv])
        self.chordable = torch.cat([self.chordable, ok])  # (J - I) invertible there
        return z.shape[0]

    def _chord(self, idx: Tensor, z: Tensor, q: Tensor, which: Tensor) -> Tensor:
        """Which starts (of ``which``) are duplicates of a found point.

        A start within ``_REACH`` polish radii of its nearest found point ``p`` (over
        every slot) takes chord steps ``z <- z - (J_p - I)^{-1} (G(z) - z)``, each
        decreasing ``q`` and at most ``_CONTRACT`` times as long as the one before; it
        is a duplicate of ``p`` if it so reaches ``q <= fixed_tol`` within ``unique_tol``
        of ``p``.
        """
        out = torch.zeros_like(which)
        sel = torch.nonzero(which & torch.isfinite(q)).flatten()
        if not sel.numel() or not self.points.shape[0]:
            return out
        near, dist = _nearest(self.place(z[sel], idx[sel]), self.place(self.points, self.origin))
        usable = (dist <= self.reach) & self.chordable[near]
        sel, near = sel[usable], near[usable]
        if not sel.numel():
            return out
        g = self.g(idx[sel])
        zc, qc = z[sel], q[sel]
        alive = qc > self.fixed_tol
        last = torch.full_like(qc, torch.inf)
        groups = [(k, torch.nonzero(near == k).flatten()) for k in torch.unique(near).tolist()]
        with torch.no_grad():
            r = g(zc) - zc
            for _ in range(self.polish_steps):
                if not bool(alive.any()):
                    break
                step = torch.zeros_like(zc)
                for k, rows in groups:
                    step[rows] = r[rows] @ self.inv[k].T
                size = torch.linalg.vector_norm(step, dim=-1)
                trial = zc - step
                r_trial = g(trial) - trial
                q_trial = 0.5 * r_trial.pow(2).sum(-1)
                accept = alive & (q_trial < qc) & (size <= _CONTRACT * last)
                last = size
                zc = torch.where(accept[:, None], trial, zc)
                r = torch.where(accept[:, None], r_trial, r)
                qc = torch.where(accept, q_trial, qc)
                alive = accept & (qc > self.fixed_tol)
        dist = torch.linalg.vector_norm(
            self.place(zc, idx[sel]) - self.place(self.points[near], self.origin[near]), dim=-1)
        out[sel] = (qc <= self.fixed_tol) & (dist <= self.unique_tol)
        return out

    def _newton(self, idx: Tensor, z: Tensor, reach: float) -> tuple[Tensor, Tensor]:
        """Newton on ``G(z) - z`` from the starts ``idx`` at ``z``: capped, backtracked
        steps that must decrease ``q``. A start stops when its step is not taken, when a
        full step no longer halves ``q <= fixed_tol`` (rounding level), or when it is
        farther than ``reach`` from where it began. Returns the iterates and their ``q``."""
        z0 = z.detach()
        z = z0.clone()
        n = z.shape[-1]
        check_bytes((z.shape[0] + 1) * n * n * z.element_size(),
                    f"the Newton polish (polish_steps) of {z.shape[0]} point(s) over {n} free "
                    f"units (a {n} x {n} Jacobian each, {z.dtype})", device=z.device)
        eye = torch.eye(n, dtype=z.dtype, device=z.device)
        g = self.g(idx)
        with torch.no_grad():
            q = _speed(g, z)
        live = torch.nonzero(torch.isfinite(q)).flatten()
        for _ in range(self.polish_steps):
            if not live.numel():
                break
            gl = g if live.numel() == z.shape[0] else self.g(idx[live])
            zl, ql = z[live], q[live]
            jac = _jacobians(gl, zl)
            with torch.no_grad():
                r = gl(zl) - zl
                dz, ok = verified_solve(jac - eye, -r.unsqueeze(-1), what="Newton polish step",
                                        allow_failure=True)
                dz = torch.where(ok[:, None], dz.squeeze(-1), 0.0)
                norm = torch.linalg.vector_norm(dz, dim=-1, keepdim=True)
                scale = self.radius / norm.clamp_min(torch.finfo(z.dtype).tiny)
                full = (scale >= 1).squeeze(-1)
                dz = dz * torch.clamp(scale, max=1.0)
                moved = torch.zeros_like(ok)
                t = 1.0
                for _ in range(12):
                    todo = ok & ~moved
                    if not bool(todo.any()):
                        break
                    trial = zl + t * dz
                    q_trial = _speed(gl, trial)
                    accept = todo & torch.isfinite(q_trial) & (q_trial < ql)
                    zl = torch.where(accept[:, None], trial, zl)
                    ql = torch.where(accept, q_trial, ql)
                    if t == 1.0:
                        full &= accept
                    moved |= accept
                    t *= 0.5
                flat = full & (ql <= self.fixed_tol) & (ql > 0.5 * q[live])
                near = torch.linalg.vector_norm(zl - z0[live], dim=-1) <= reach
            z[live], q[live] = zl, ql
            live = live[moved & ~flat & near]
        return z, q


def _lbfgs(g, z0: Tensor, steps: int, lr: float) -> Tensor:
    """``torch.optim.LBFGS`` on the sum of ``q``; per start the better of the first and
    the last iterate."""
    z = z0.clone().requires_grad_(True)
    with torch.no_grad():
        q0 = _speed(g, z0)
    q0 = torch.where(torch.isfinite(q0), q0, torch.inf)
    with torch.enable_grad():
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
        better = torch.isfinite(q) & (q < q0)
        return torch.where(better[:, None], z.detach(), z0)
