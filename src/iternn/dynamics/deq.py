"""Equilibrium mode: run a block map to its fixed point and differentiate through it.

A deep equilibrium model (Bai, Kolter & Koltun 2019) is a map iterated to convergence
with its input held: ``z* = G(z*; x, θ)`` (paper §2, "the continuum"). :class:`DEQ`
solves for ``z*`` without recording the solver's iterations for autograd and attaches
the gradient afterwards, as its ``backward=`` object says:

* :class:`Implicit` — the implicit function theorem. With ``J = ∂G/∂z`` at ``z*`` and
  ``g`` the incoming gradient, the adjoint ``u`` solves ``u = g + Jᵀ u`` (a fixed point
  of its own, solved by a solver object, one vector–Jacobian product per step), and then
  ``dL/dx = uᵀ ∂G/∂x``, ``dL/dθ = uᵀ ∂G/∂θ``. This is a custom
  ``torch.autograd.Function`` whose graph is one node: memory does not depend on the
  number of forward or backward solver steps (one evaluation of ``G`` is recorded, in
  the backward pass). First-order only (no double backward).
* :class:`Phantom` — phantom gradients (Geng et al. 2021): ``k = steps`` damped steps
  ``z <- (1 - λ) z + λ G(z)`` from ``z*`` with autograd on; memory grows with ``k``,
  not with the solver's steps. Cheap and approximate; exact as ``k -> ∞`` when ``G`` is
  contractive.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..core.block_map import BlockMap
from ..errors import ConvergenceError, DynamicsError, MapTypeError
from .functional import NO_SEQUENCES, MapFunction, refuse_mixing
from .solvers import SolverInfo, SolverLike, as_solver, solve
from .validate import (
    check_fraction,
    check_int,
    check_positive,
    check_stop_mode,
    check_update,
    shape_text,
)

__all__ = ["DEQ", "Implicit", "Phantom", "ImplicitFixedPoint"]


@dataclass(frozen=True)
class Implicit:
    """Implicit-function-theorem gradients: the adjoint fixed point ``u = g + Jᵀ u``.

    Args:
        solver: the adjoint's solver object or registered name; ``None``: the forward
            solver.
        tol: the adjoint's tolerance; ``None``: the forward ``tol``.
        max_steps: the adjoint's most updates; ``None``: the forward ``max_steps``.
    """

    solver: SolverLike | None = None
    tol: float | None = None
    max_steps: int | None = None

    def __post_init__(self) -> None:
        if self.solver is not None:
            as_solver(self.solver, "Implicit solver")
        if self.tol is not None:
            object.__setattr__(self, "tol", check_positive(self.tol, "Implicit tol"))
        if self.max_steps is not None:
            check_int(self.max_steps, "Implicit max_steps")


@dataclass(frozen=True)
class Phantom:
    """Phantom gradients: ``steps`` damped steps from ``z*`` recorded by autograd.

    Args:
        steps: unrolled steps ``k`` (``>= 1``).
        damping: ``λ`` in ``(0, 1]``.
    """

    steps: int = 5
    damping: float = 1.0

    def __post_init__(self) -> None:
        check_int(self.steps, "Phantom steps", 1)
        object.__setattr__(self, "damping", check_fraction(self.damping, "Phantom damping"))


Backward = Implicit | Phantom


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

        name, solver, tol, max_steps = deq._adjoint_settings()
        u, info = solve(adjoint, grad, solver=solver, tol=tol, max_steps=max_steps,
                        stop_mode=deq.stop_mode)
        deq.backward_info = info
        if deq.raise_on_failure and not info.converged:
            raise ConvergenceError(
                f"DEQ backward: the adjoint solve ({name!r}) did not converge "
                f"in {info.steps} steps (residual {float(info.residual.max()):.3g}; "
                f"{info.reason.message})",
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
        solver: the forward solver: a solver object (``Anderson(m=5)``, ``Picard()``,
            ``Broyden()``) or a registered name.
        tol, max_steps, stop_mode: the forward solve (see
            :func:`~iternn.dynamics.solvers.solve`; ``tol=None`` picks a tolerance by dtype).
        backward: :class:`Implicit` (default ``Implicit()``: the adjoint solved like the
            forward) or :class:`Phantom` (see the module docs).
        update: ``"jacobi"`` or ``"ordered"`` (see :func:`iternn.iterate`).
        raise_on_failure: raise :class:`~iternn.ConvergenceError` when a forward or
            adjoint solve does not converge (otherwise only reported in :attr:`info` /
            :attr:`backward_info`).

    Attributes:
        info: :class:`~iternn.dynamics.solvers.SolverInfo` of the last forward solve.
        backward_info: that of the last adjoint solve (implicit backward only).
        in_shape, out_shape: the input and output slots' shapes.
        in_features, out_features: their sizes for vector slots, ``None`` for shaped
            ones (what :meth:`BlockMap.connect <iternn.BlockMap.connect>` compares when
            a DEQ is itself a block).

    ``forward(x, z0=None)``: ``x`` is ``(*batch, *shape)`` of the input slot (a shaped
    input slot, e.g. an image ``(C, H, W)``, keeps its shape); the result is the output
    slot ``(*batch, *shape_out)`` (or every slot). ``z0`` (packed free slots, each
    flattened row-major, ``(*batch, n_free)``, in ``x``'s dtype and device) is the starting
    point; default zeros. No gradient flows into ``z0``.

    Raises:
        DynamicsError: (when made) an unknown input or output slot, a bad option; a block
            into a slot other than ``input`` that mixes positions (attention, named:
            the solver takes every batch element as a problem of its own, see
            :func:`~iternn.dynamics.functional.refuse_mixing`). (In ``forward``) ``x`` or
            ``z0`` of the wrong shape, ``z0`` in another dtype or on another device.
    """

    def __init__(
        self,
        m: BlockMap,
        /,
        *,
        input: str = "x",
        output: str | None = "y",
        solver: SolverLike = "anderson",
        tol: float | None = None,
        max_steps: int = 100,
        stop_mode: str = "abs",
        backward: Backward | None = None,
        update: str = "jacobi",
        raise_on_failure: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(m, BlockMap):
            raise MapTypeError(f"DEQ needs a BlockMap, got {type(m).__name__}")
        if input not in m.slots:
            raise DynamicsError(f"input slot {input!r} is not a slot of the map {list(m.slots)}")
        if output is not None and output not in m.slots:
            raise DynamicsError(f"output slot {output!r} is not a slot of the map {list(m.slots)}")
        if len(m.slots) == 1:
            raise DynamicsError(
                f"the map's only slot {input!r} is the held input: there is nothing to solve"
            )
        refuse_mixing(m, (input,), "DEQ", NO_SEQUENCES.format("DEQ"))
        backward = Implicit() if backward is None else backward
        if not isinstance(backward, (Implicit, Phantom)):
            raise DynamicsError(
                f"backward must be Implicit(...) or Phantom(...), got {backward!r}"
            )
        self.solver_name, self.solver = as_solver(solver)
        self.map = m
        self.input = input
        self.output = output
        self.tol = None if tol is None else check_positive(tol, "tol")
        self.max_steps = check_int(max_steps, "max_steps")
        self.stop_mode = check_stop_mode(stop_mode)
        self.backward = backward
        self.update = check_update(update)
        self.raise_on_failure = bool(raise_on_failure)
        # The slots' shapes; in_features/out_features (what BlockMap.connect compares)
        # only for vector slots: a DEQ on shaped slots is checked by a probe call.
        self.in_shape = tuple(m.shapes[input])
        self.in_features = m.slots[input] if len(self.in_shape) == 1 else None
        if output is not None:
            self.out_shape = tuple(m.shapes[output])
            self.out_features = m.slots[output] if len(self.out_shape) == 1 else None
        self.info: SolverInfo | None = None
        self.backward_info: SolverInfo | None = None

    # ------------------------------------------------------------------ pieces
    def _function(self, x: Tensor) -> MapFunction:
        return MapFunction(self.map, {self.input: x}, hold=(self.input,), update=self.update)

    def _adjoint_settings(self):
        """``(name, solver, tol, max_steps)`` of the implicit backward's adjoint solve."""
        bw = self.backward if isinstance(self.backward, Implicit) else Implicit()
        if bw.solver is None:
            name, solver = self.solver_name, self.solver
        else:
            name, solver = as_solver(bw.solver, "Implicit solver")
        tol = self.tol if bw.tol is None else bw.tol
        max_steps = self.max_steps if bw.max_steps is None else bw.max_steps
        return name, solver, tol, max_steps

    def _solve_forward(self, x: Tensor, z0: Tensor) -> Tensor:
        z, info = solve(self._function(x.detach()), z0, solver=self.solver, tol=self.tol,
                        max_steps=self.max_steps, stop_mode=self.stop_mode)
        self.info = info
        if self.raise_on_failure and not info.converged:
            raise ConvergenceError(
                f"DEQ forward: solver {self.solver_name!r} did not converge in {info.steps} "
                f"steps (residual {float(info.residual.max()):.3g}; {info.reason.message})",
                info,
            )
        return z

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, z0: Tensor | None = None):
        shape = self.in_shape
        k = len(shape)
        if not isinstance(x, Tensor) or x.dim() < k or tuple(x.shape[x.dim() - k:]) != shape:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise DynamicsError(
                f"input slot {self.input!r} needs shape {shape_text(shape, ('*batch',))}, "
                f"got {got}"
            )
        g = self._function(x)  # validates x (NaN, dtype) through MapFunction
        batch = tuple(x.shape[: x.dim() - k])
        if z0 is None:
            z0 = x.new_zeros(*batch, g.size)
        elif not isinstance(z0, Tensor) or tuple(z0.shape) != (*batch, g.size):
            shape = tuple(z0.shape) if isinstance(z0, Tensor) else type(z0).__name__
            raise DynamicsError(f"z0 must have shape {(*batch, g.size)} (free slots {list(g.free)}), "
                                f"got {shape}")
        elif z0.dtype != x.dtype or z0.device != x.device:
            raise DynamicsError(f"z0 is {z0.dtype} on {z0.device}, the input {self.input!r} is "
                                f"{x.dtype} on {x.device}")
        z0 = z0.detach()
        params = [p for p in self.map.parameters() if p.requires_grad]
        wants_grad = torch.is_grad_enabled() and (x.requires_grad or bool(params))
        if not wants_grad:
            z = self._solve_forward(x, z0)
        elif isinstance(self.backward, Implicit):
            z = ImplicitFixedPoint.apply(self, z0, x, *params)
        else:
            with torch.no_grad():
                z = self._solve_forward(x, z0)
            lam = self.backward.damping
            for _ in range(self.backward.steps):
                z = g(z) if lam == 1.0 else (1 - lam) * z + lam * g(z)
        state = g.unpack(z)
        if self.output is None:
            return {s: state[s] for s in self.map.slots}
        return state[self.output]

    def extra_repr(self) -> str:
        return (f"input={self.input!r}, output={self.output!r}, solver={self.solver!r}, "
                f"max_steps={self.max_steps}, backward={self.backward!r}")
