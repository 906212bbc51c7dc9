"""How a block or an activation is called on slot tensors of any batch shape.

A slot tensor is ``(*batch, *shape)``. Blocks between vector slots (every slot of the
block has a shape ``(n,)``) are called on the tensors as they are: ``nn.Linear`` and
element-wise layers accept any leading dims. A block that touches a *shaped* slot (rank
``> 1``, e.g. a ``(C, H, W)`` feature map) is called with the batch dims flattened into
exactly one leading dim, ``(B, *shape)`` with ``B = prod(batch)``, which is what
convolutions, pooling and batch normalisation accept, and its output is given the batch
dims back. Flattening is a view for contiguous tensors and keeps the element order, so a
module that draws random numbers (dropout) draws them in the same order either way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from torch import Tensor, nn

__all__ = ["call_block", "is_shaped"]


def is_shaped(*shapes: tuple[int, ...]) -> bool:
    """Whether any of these slot shapes has rank > 1 (the block is called batch-flattened)."""
    return any(len(s) > 1 for s in shapes)


def call_block(
    module: nn.Module,
    inputs: Sequence[Tensor],
    batch: tuple[int, ...],
    out_shape: tuple[int, ...] | None,
    kwargs: Mapping | None = None,
) -> Tensor:
    """``module(*inputs, **kwargs)`` with the batch convention above.

    ``out_shape`` is the destination slot's shape when the block is called batch-flattened
    (see :func:`is_shaped`), ``None`` when it is called on the tensors as they are.
    """
    if out_shape is None or len(batch) == 1:  # already (B, *shape): nothing to flatten
        return module(*inputs, **kwargs) if kwargs else module(*inputs)
    nb, rows = len(batch), math.prod(batch)
    flat = [z.reshape(rows, *z.shape[nb:]) for z in inputs]
    y = module(*flat, **kwargs) if kwargs else module(*flat)
    return y.reshape(*batch, *out_shape)
