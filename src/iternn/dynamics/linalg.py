"""Linear solves whose answers are checked: :func:`verified_solve`.

Every linear system the dynamics tools solve (Newton steps of the fixed-point search,
the small mixing systems of Anderson acceleration) goes through :func:`verified_solve`,
which checks the residual of each answer instead of trusting LAPACK's ``info``. This
matters: on some torch/MKL builds the *batched* float64 LU solve of systems with a few
hundred unknowns, after ``torch.set_num_threads(n)``, raises ("Pivots given to
lu_solve must all be greater or equal to 1") or returns a wrong answer with
``info == 0``; the same systems solved one at a time are right.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConvergenceError

__all__ = ["verified_solve", "SOLVE_ONE_BY_ONE"]

#: Batched CPU systems with at least this many unknowns are solved one by one (the
#: batched LU of some builds mishandles its pivots from about 192 unknowns on; one by
#: one costs nothing extra at this size, the work is in the factorisation).
SOLVE_ONE_BY_ONE = 128

_F64 = torch.float64


def _residual_ok(a: Tensor, x: Tensor, b: Tensor) -> Tensor:
    """Per system: finite ``x`` with ``||a x - b|| <= c n eps (||a|| ||x|| + ||b||)``."""
    n = a.shape[-1]
    tol = 64 * max(n, 1) * torch.finfo(_F64).eps
    res = torch.linalg.matrix_norm(a @ x - b)
    bound = tol * (torch.linalg.matrix_norm(a) * torch.linalg.matrix_norm(x)
                   + torch.linalg.matrix_norm(b))
    return torch.isfinite(x).flatten(1).all(-1) & (res <= bound)


def _one_by_one(a: Tensor, b: Tensor, which: Tensor) -> Tensor:
    x = torch.zeros_like(b)
    for i in torch.nonzero(which).flatten().tolist():
        xi, info = torch.linalg.solve_ex(a[i], b[i])
        x[i] = xi if int(info) == 0 else torch.nan
    return x


def verified_solve(
    a: Tensor, b: Tensor, *, what: str, allow_failure: bool = False
) -> tuple[Tensor, Tensor]:
    """Solve ``a x = b`` and check every answer by its residual.

    Args:
        a: ``(*batch, n, n)`` systems (any floating dtype; solved in float64).
        b: ``(*batch, n, k)`` right-hand sides.
        what: names the solve in the error message (e.g. ``"Newton step"``).
        allow_failure: return failed systems as ``ok == False`` (their ``x`` is zero)
            instead of raising.

    The systems are solved batched where that is safe (one by one for large systems on
    the CPU, see :data:`SOLVE_ONE_BY_ONE`); a system whose residual is not at rounding
    level ``64 n eps (||a|| ||x|| + ||b||)`` is solved again on its own, then by least
    squares (``torch.linalg.lstsq``), each answer checked again. A system with a
    non-finite entry is never handed to LAPACK: it fails.

    Returns:
        ``(x, ok)``: ``x`` with ``b``'s shape in ``a``'s dtype and ``ok`` of shape
        ``batch``, true where the answer passed the check.

    Raises:
        ConvergenceError: a system failed every method and ``allow_failure`` is false
            (singular or too ill-conditioned); the message names ``what`` and the
            batch elements.
    """
    batch, n = a.shape[:-2], a.shape[-1]
    aa = a.detach().to(_F64).reshape(-1, n, n)
    bb = b.detach().to(_F64).reshape(-1, n, b.shape[-1])
    finite = torch.isfinite(aa).flatten(1).all(-1) & torch.isfinite(bb).flatten(1).all(-1)
    eye = torch.eye(n, dtype=_F64, device=aa.device)
    aa = torch.where(finite[:, None, None], aa, eye)
    bb = torch.where(finite[:, None, None], bb, 0.0)
    count = aa.shape[0]
    x = torch.zeros_like(bb)
    solo = False  # already solved one by one: a retry the same way would repeat it
    if count:
        if aa.device.type == "cpu" and count > 1 and n >= SOLVE_ONE_BY_ONE:
            x, solo = _one_by_one(aa, bb, finite), True
        else:
            try:
                x, info = torch.linalg.solve_ex(aa, bb)
                x = torch.where((info == 0)[:, None, None], x, torch.nan)
            except RuntimeError:
                x, solo = _one_by_one(aa, bb, finite), True
    ok = finite & _residual_ok(aa, x, bb)
    redo = finite & ~ok
    if bool(redo.any()):  # one by one, then least squares
        if not solo:
            again = _one_by_one(aa, bb, redo)
            good = redo & _residual_ok(aa, again, bb)
            x = torch.where(good[:, None, None], again, x)
            ok |= good
            redo &= ~good
        if bool(redo.any()):
            idx = torch.nonzero(redo).flatten()
            lsq = torch.linalg.lstsq(aa[idx], bb[idx]).solution
            good_l = _residual_ok(aa[idx], lsq, bb[idx])
            x[idx] = torch.where(good_l[:, None, None], lsq, x[idx])
            ok[idx] = good_l
    x = torch.where(ok[:, None, None], x, 0.0)
    if not allow_failure and not bool(ok.all()):
        bad = torch.nonzero(~ok).flatten().tolist()
        raise ConvergenceError(
            f"{what}: the linear solve failed for batch element(s) {bad[:10]} (singular, "
            "non-finite or too ill-conditioned: no method gave a residual at rounding level)"
        )
    return x.to(a.dtype).reshape(b.shape), ok.reshape(batch)
