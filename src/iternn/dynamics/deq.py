"""Equilibrium mode: run a block map to its fixed point and differentiate through it.

A deep equilibrium model (Bai, Kolter & Koltun 2019) is a map iterated to convergence
with its input held: ``z* = G(z*; x, θ)`` (paper §2, "the continuum"). :class:`DEQ`
solves for ``z*`` without recording the solver's iterations for autograd and attaches
the gradient afterwards:

* ``backward="implicit"`` — the implicit function theorem. With ``J = ∂G/∂z`` at ``z*``
  and ``g`` the incoming gradient, the adjoint ``u`` solves ``u = g + Jᵀ u`` (a fixed
  point of its own, solved with the same solver registry, one vector–Jacobian product
  per step), and then ``dL/dx = uᵀ ∂G/∂x``, ``dL/dθ = uᵀ ∂G/∂θ``. This is a custom
  ``torch.autograd.Function`` whose graph is one node: memory does not depend on the
  number of forward or backward solver steps (one evaluation of ``G`` is recorded, in
  the backward pass). First-order only (no double backward).
* ``backward="phantom"`` — phantom gradients (Geng et al. 2021): ``k = phantom_steps``
  damped steps ``z <- (1 - λ) z + λ G(z)`` from ``z*`` with autograd on; memory grows
  with ``k``, not with the solver's steps. Cheap and approximate; exact as ``k -> ∞``
  when ``G`` is contractive.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..core.block_map import BlockMap
from ..engine.iterate import UPDATES
from .functional import DynamicsError, MapFunction
from .solvers import (
    ConvergenceError,
    SolverInfo,
    STOP_MODES,
    check_options,
    check_solver,
    check_steps,
    check_tol,
    solve,
)

__all__ = ["DEQ", "ImplicitFixedPoint", "BACKWARDS"]

BACKWARDS = ("implicit", "phantom")


class ImplicitFixedPoint(torch.autograd.Function):
    """``z* = G(z*; x, θ)`` as one autograd node: solve forward, adjoint solve backward.

    ``ImplicitFixedPoint.apply(deq, z0, x, *params)``: ``deq`` is the :class:`DEQ`
    (its map, input slot, solver settings; it receives ``info``/``backward_info``),
    ``z0`` the starting point of the packed free slots, ``x`` the held input and
    ``params`` the map's parameters that need gradients (the very tensors the map
    uses, so autograd routes their gradients). Returns ``z*``, packed.
    """

    @staticmethod
    def forward(ctx, deq: DEQ, z0: Tensor, x: Tensor, *params: Tensor) -> Tensor:
        z_star = deq._solve_forward(x, z0)
        ctx.deq = deq
        ctx.save_for_backward(z_star, x, *params)
        return z_star

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        deq: DEQ = ctx.deq
        z_star, x, *params = ctx.saved_tensors
        need_x = ctx.needs_input_grad[2]
        need_p = ctx.needs_input_grad[3:]
        with torch.enable_grad():
            zr = z_star.detach().requires_grad_(True)
            xr = x.detach().requires_grad_(need_x)
            fz = deq._function(xr)(zr)
        grad = grad.contiguous()

        def adjoint(u: Tensor) -> Tensor:  # u -> g + J^T u
            (vjp,) = torch.autograd.grad(fz, zr, u, retain_graph=True, allow_unused=True)
            return grad if vjp is None else grad + vjp

        u, info = solve(adjoint, grad, solver=deq.backward_solver, tol=deq.backward_tol,
                        max_steps=deq.backward_max_steps, stop_mode=deq.stop_mode,
                        **deq.backward_options)
        deq.backward_info = info
        if deq.raise_on_failure and not info.converged:
            raise ConvergenceError(
                f"DEQ backward: the adjoint solve ({deq.backward_solver!r}) did not converge "
                f"in {info.steps} steps (residual {float(info.residual.max()):.3g}; {info.reason})",
                info,
            )
        wrt = ([xr] if need_x else []) + [p for p, need in zip(params, need_p) if need]
        grads = list(torch.autograd.grad(fz, wrt, u, allow_unused=True)) if wrt else []
        gx = grads.pop(0) if need_x else None
        gp = [grads.pop(0) if need else None for need in need_p]
        return (None, None, gx, *gp)


class DEQ(nn.Module):
    """A block map run to its fixed point with ``input`` held: an equilibrium layer.

    Args:
        m: the block map (registered as ``self.map``; its parameters are this module's).
        input: the held slot that receives the argument of :meth:`forward`.
        output: the slot returned; ``None`` returns the whole state (a dict).
        solver, tol, max_steps, stop_mode: forward solve (see :func:`~iternn.dynamics.solvers.solve`;
            ``tol=None`` picks a tolerance by dtype).
        solver_options: the forward solver's own options (e.g. ``{"m": 5}``).
        backward: ``"implicit"`` or ``"phantom"`` (see the module docs).
        backward_solver, backward_tol, backward_max_steps, backward_options: the adjoint
            solve (default: the forward settings).
        phantom_steps: unrolled steps ``k`` for phantom gradients (``>= 1``).
        phantom_damping: ``λ`` in ``(0, 1]`` for phantom gradients.
        update: ``"jacobi"`` or ``"ordered"`` (see :func:`iternn.iterate`).
        raise_on_failure: raise :class:`~iternn.dynamics.solvers.ConvergenceError` when a
            forward or adjoint solve does not converge (otherwise only reported in
            :attr:`info` / :attr:`backward_info`).

    Attributes:
        info: :class:`~iternn.dynamics.solvers.SolverInfo` of the last forward solve.
        backward_info: that of the last adjoint solve (implicit backward only).

    ``forward(x, z0=None)``: ``z0`` (packed free slots, ``(*batch, n_free)``) is the
    starting point; default zeros. No gradient flows into ``z0``.
    """

    def __init__(
        self,
        m: BlockMap,
        *,
        input: str = "x",
        output: str | None = "y",
        solver: str = "anderson",
        tol: float | None = None,
        max_steps: int = 100,
        stop_mode: str = "abs",
        solver_options: Mapping | None = None,
        backward: str = "implicit",
        backward_solver: str | None = None,
        backward_tol: float | None = None,
        backward_max_steps: int | None = None,
        backward_options: Mapping | None = None,
        phantom_steps: int = 5,
        phantom_damping: float = 1.0,
        update: str = "jacobi",
        raise_on_failure: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(m, BlockMap):
            raise DynamicsError(f"DEQ needs a BlockMap, got {type(m).__name__}")
        if input not in m.slots:
            raise DynamicsError(f"input slot {input!r} is not a slot of the map {list(m.slots)}")
        if output is not None and output not in m.slots:
            raise DynamicsError(f"output slot {output!r} is not a slot of the map {list(m.slots)}")
        if len(m.slots) == 1:
            raise DynamicsError(
                f"the map's only slot {input!r} is the held input: there is nothing to solve"
            )
        if backward not in BACKWARDS:
            raise DynamicsError(f"backward must be one of {BACKWARDS}, got {backward!r}")
        if stop_mode not in STOP_MODES:
            raise DynamicsError(f"stop_mode must be one of {STOP_MODES}, got {stop_mode!r}")
        if update not in UPDATES:
            raise DynamicsError(f"update must be one of {UPDATES}, got {update!r}")
        check_options(solver, check_solver(solver), dict(solver_options or {}))
        backward_solver = solver if backward_solver is None else backward_solver
        if backward_options is None:
            backward_options = solver_options if backward_solver == solver else {}
        check_options(backward_solver, check_solver(backward_solver), dict(backward_options or {}))
        self.map = m
        self.input = input
        self.output = output
        self.solver = solver
        self.tol = None if tol is None else check_tol(tol)
        self.max_steps = check_steps(max_steps)
        self.stop_mode = stop_mode
        self.solver_options = dict(solver_options or {})
        self.backward = backward
        self.backward_solver = backward_solver
        self.backward_tol = (self.tol if backward_tol is None
                             else check_tol(backward_tol, "backward_tol"))
        self.backward_max_steps = (self.max_steps if backward_max_steps is None
                                   else check_steps(backward_max_steps, "backward_max_steps"))
        self.backward_options = dict(backward_options or {})
        self.phantom_steps = check_steps(phantom_steps, "phantom_steps", minimum=1)
        if (isinstance(phantom_damping, bool) or not isinstance(phantom_damping, (int, float))
                or not 0 < phantom_damping <= 1):
            raise DynamicsError(f"phantom_damping must be a number in (0, 1], got {phantom_damping!r}")
        self.phantom_damping = float(phantom_damping)
        self.update = update
        self.raise_on_failure = bool(raise_on_failure)
        self.in_features = m.slots[input]
        if output is not None:
            self.out_features = m.slots[output]
        self.info: SolverInfo | None = None
        self.backward_info: SolverInfo | None = None

    # ------------------------------------------------------------------ pieces
    def _function(self, x: Tensor) -> MapFunction:
        return MapFunction(self.map, {self.input: x}, hold=(self.input,), update=self.update)

    def _solve_forward(self, x: Tensor, z0: Tensor) -> Tensor:
        z, info = solve(self._function(x.detach()), z0, solver=self.solver, tol=self.tol,
                        max_steps=self.max_steps, stop_mode=self.stop_mode,
                        **self.solver_options)
        self.info = info
        if self.raise_on_failure and not info.converged:
            raise ConvergenceError(
                f"DEQ forward: solver {self.solver!r} did not converge in {info.steps} steps "
                f"(residual {float(info.residual.max()):.3g}; {info.reason})",
                info,
            )
        return z

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, z0: Tensor | None = None):
        n_in = self.in_features
        if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != n_in:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise DynamicsError(f"input slot {self.input!r} needs shape (*batch, {n_in}), got {shape}")
        g = self._function(x)  # validates x (NaN, dtype) through MapFunction
        batch = tuple(x.shape[:-1])
        if z0 is None:
            z0 = x.new_zeros(*batch, g.size)
        elif not isinstance(z0, Tensor) or tuple(z0.shape) != (*batch, g.size):
            shape = tuple(z0.shape) if isinstance(z0, Tensor) else type(z0).__name__
            raise DynamicsError(f"z0 must have shape {(*batch, g.size)} (free slots {list(g.free)}), "
                                f"got {shape}")
        z0 = z0.detach()
        params = [p for p in self.map.parameters() if p.requires_grad]
        wants_grad = torch.is_grad_enabled() and (x.requires_grad or bool(params))
        if not wants_grad:
            z = self._solve_forward(x, z0)
        elif self.backward == "implicit":
            z = ImplicitFixedPoint.apply(self, z0, x, *params)
        else:
            with torch.no_grad():
                z = self._solve_forward(x, z0)
            lam = self.phantom_damping
            for _ in range(self.phantom_steps):
                z = g(z) if lam == 1.0 else (1 - lam) * z + lam * g(z)
        state = g.unpack(z)
        if self.output is None:
            return {s: state[s] for s in self.map.slots}
        return state[self.output]

    def extra_repr(self) -> str:
        return (f"input={self.input!r}, output={self.output!r}, solver={self.solver!r}, "
                f"max_steps={self.max_steps}, backward={self.backward!r}")
