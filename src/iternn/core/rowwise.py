"""Modules that act on each row (the last dim) alone, whatever the leading dims are."""

from __future__ import annotations

from torch import nn

from .protocols import RowwiseBlock

__all__ = ["ELEMENTWISE", "is_rowwise"]

#: Element-wise layers: exactly a slot activation. Dropout counts (identity in eval mode).
ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.ELU, nn.SiLU, nn.Identity,
    nn.Dropout,
)


def is_rowwise(module: nn.Module) -> bool:
    """Whether ``module`` treats every leading dim as batch: a plain ``nn.Linear``, an
    element-wise layer, a module whose class sets ``rowwise = True`` (the
    :class:`~iternn.core.protocols.RowwiseBlock` protocol; the sparse and structured
    blocks do), or an ``nn.Sequential`` of those (exact types, no hooks).

    Such a block can be called once on a whole ``(T, *batch, n)`` sequence; any other
    module may give the leading dims a meaning of its own (a sequence-first transformer
    layer does) and is called step by step.
    """
    if module._forward_hooks or module._forward_pre_hooks:
        return False
    if isinstance(module, RowwiseBlock) and type(module).rowwise is True:
        return True
    if type(module) is nn.Sequential:
        return all(is_rowwise(m) for m in module)
    return type(module) is nn.Linear or type(module) in ELEMENTWISE
