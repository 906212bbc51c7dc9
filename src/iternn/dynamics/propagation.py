"""Propagation across positions: how a perturbation of one position of a sequence
reaches the others as the map is iterated.

For a map whose blocks mix positions (attention: a transformer map, an attention block
reading several slots), the state of a sequence is ``z = (z_1, …, z_T)``, ``z_t`` the
free slots at position ``t`` (see :mod:`iternn.dynamics.functional`, *Positions*).
After ``k`` applications ``z^(k) = G^k(z^(0))`` and

    P[k − 1, j, i] = ‖ ∂z^(k)_j / ∂z^(0)_i ‖_F,

the Frobenius norm of the ``(n_free × n_free)`` block of the Jacobian of the ``k``-fold
application with row = destination position ``j`` and column = source position ``i``
(the house convention: row = destination, column = source; the layout of an attention
matrix, query row, key column). ``P[k − 1, j, i] = 0`` exactly when no perturbation at
position ``i`` reaches position ``j`` in ``k`` applications. A causal (masked)
transformer gives ``P[k − 1, j, i] = 0`` for every ``i > j`` (upper triangle), at every
``k``; a non-causal one fills the matrix after one application.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping

import torch
from torch import Tensor

from ..core.block_map import BlockMap
from ..core.memory import check_bytes
from .jacobian import _jacobian_at, _prepare
from .lyapunov import _nilpotency_bound
from .validate import check_int, check_matrix_finite

__all__ = ["propagation"]


def _position_major(sizes: tuple[int, ...], length: int) -> Tensor:
    """The permutation from the packed order (slot by slot, each ``(T, n_s)``) to
    position by position (each position: every free slot, in slot order)."""
    offsets, off = [], 0
    for size in sizes:
        offsets.append(off)
        off += size
    units = [size // length for size in sizes]
    return torch.cat([
        torch.arange(o + t * n, o + (t + 1) * n)
        for t in range(length) for o, n in zip(offsets, units)
    ])


def propagation(
    m: BlockMap,
    state: Mapping[str, Tensor],
    /,
    steps: int,
    *,
    hold: Collection[str] = (),
    update: str = "jacobi",
    block_kwargs: Mapping[str, Mapping] | None = None,
) -> Tensor:
    """How a perturbation at position ``i`` reaches position ``j`` after ``k`` applications.

    Args:
        m: the block map (or a module with one as ``.map``, e.g. a
            :class:`~iternn.convert.transformer.TransformerMap`); its blocks must mix
            positions (attention), else there is no sequence dimension.
        state: the sequence ``z^(0)`` (free slots; missing ones are zero) and the values
            of the held slots: slot tensors ``(*batch, T, *shape)``, or
            ``(T, *batch, *shape)`` for sequence-first attention (``batch_first=False``,
            torch's default), or one unbatched sequence ``(T, *shape)``.
        steps: applications ``k = 1 … steps``.
        hold: slots kept at their value in ``state`` (not perturbed, not measured).
        update: ``"jacobi"`` or ``"ordered"`` (see :func:`iternn.iterate`).
        block_kwargs: passed to the blocks (attention masks: see :func:`iternn.iterate`).

    Returns:
        float64 ``(steps, *batch, T, T)``: ``out[k − 1, ..., j, i] = ‖∂z^(k)_j /
        ∂z^(0)_i‖_F`` over all free slots (row = destination position ``j``, column =
        source position ``i``; see the module docstring), one ``(T, T)`` matrix per
        sequence of the batch.

    Exact: the Jacobians of one application at the trajectory's states (autograd over
    the whole sequence, :func:`~iternn.dynamics.jacobian.jacobian` with
    ``positions=True``) multiplied in float64, ``J^(k) = J(z^(k−1)) ⋯ J(z^(0))``. When
    the free slots form no cycle, every product is exactly 0 after the longest block
    path among them (a transformer map: after its depth) and those entries are 0
    without computing more Jacobians.

    Raises:
        DynamicsError: a bad ``steps``, hold or state; a map without a sequence
            dimension, or a state without a position axis (naming the slot): see
            :func:`~iternn.dynamics.functional.positions_of`; a Jacobian holding NaN or
            inf.
    """
    steps = check_int(steps, "steps", 1)
    bm, g, z, batch = _prepare(m, state, hold, update, block_kwargs, positions=True,
                               tool="propagation")
    length = g.positions.length  # type: ignore[union-attr]
    units = g.size // length
    # One application's Jacobian, the running product and its reordered copies (float64).
    check_bytes(4 * math.prod(batch) * g.size * g.size * 8,
                f"the Jacobians over the whole sequence ({length} positions x {units} free "
                f"units, batch {tuple(batch)}, float64)", device=z.device)
    perm = _position_major(g.sizes, length).to(z.device)
    out = torch.zeros(steps, *batch, length, length, dtype=torch.float64, device=z.device)
    live = min(steps, _nilpotency_bound(bm, g.free))  # later products are exactly 0
    product: Tensor | None = None
    with torch.no_grad():
        for k in range(int(live)):
            if k:
                z = g(z)
            jac = _jacobian_at(bm, g, z, batch, block_kwargs=block_kwargs)
            check_matrix_finite(jac, f"the Jacobian after {k} application(s)", g.free,
                                g.sizes, g.shapes)
            jac = jac.to(torch.float64)
            product = jac if product is None else jac @ product
            blocks = product[..., perm, :][..., perm].reshape(
                *batch, length, units, length, units)
            out[k] = blocks.square().sum(dim=(-3, -1)).sqrt()
    return out
