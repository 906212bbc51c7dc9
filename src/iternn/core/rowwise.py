"""Which modules treat their leading dims as batch, so the engine may batch them over time.

Two promises, the second weaker than the first:

* **row-wise** — the module acts on each row (the last dim) alone, whatever the leading
  dims are: ``block(z)[i] == block(z[i])`` for any leading index ``i``. Such a block
  between vector slots is called once on a whole ``(T, *batch, n)`` sequence.
* **sample-wise** — the module treats its one leading dim as a batch of independent
  samples: ``block(z)[i] == block(z[i:i + 1])[0]``. A block touching a shaped slot is
  called batch-flattened (``(B, *shape)``, see :mod:`iternn.core.calls`), so such a
  block can be called once on a whole sequence flattened to ``(T * B, *shape)``.
  Convolutions, pooling and per-sample normalisations are sample-wise; batch
  normalisation is not (in train mode it couples the batch).
"""

from __future__ import annotations

from torch import nn

from .protocols import RowwiseBlock, SamplewiseBlock

__all__ = ["ELEMENTWISE", "SAMPLEWISE", "is_rowwise", "is_samplewise"]

#: Element-wise layers: exactly a slot activation. Dropout counts (identity in eval mode).
ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.ELU, nn.SiLU, nn.Identity,
    nn.Dropout,
)

#: torch layers that treat their leading dim as a batch of independent samples.
SAMPLEWISE: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
    nn.ConvTranspose3d, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
    nn.LayerNorm, nn.GroupNorm, nn.Flatten, nn.Unflatten, nn.Embedding, nn.Softmax,
    nn.LogSoftmax, nn.Dropout1d, nn.Dropout2d,
)


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def is_rowwise(module: nn.Module) -> bool:
    """Whether ``module`` treats every leading dim as batch: a plain ``nn.Linear``, an
    element-wise layer, a module whose class sets ``rowwise = True`` (the
    :class:`~iternn.core.protocols.RowwiseBlock` protocol; the sparse and structured
    blocks do), or an ``nn.Sequential`` of those (exact types, no hooks).

    Such a block can be called once on a whole ``(T, *batch, n)`` sequence; any other
    module may give the leading dims a meaning of its own (a sequence-first transformer
    layer does) and is called step by step.
    """
    if _hooked(module):
        return False
    if isinstance(module, RowwiseBlock) and type(module).rowwise is True:
        return True
    if type(module) is nn.Sequential:
        return all(is_rowwise(m) for m in module)
    return type(module) is nn.Linear or type(module) in ELEMENTWISE


def is_samplewise(module: nn.Module) -> bool:
    """Whether ``module`` treats its one leading dim as independent samples: a row-wise
    module, one of :data:`SAMPLEWISE` (exact types), a module whose class sets
    ``samplewise = True`` (:class:`~iternn.core.protocols.SamplewiseBlock`), or an
    ``nn.Sequential`` of those; never a module with hooks."""
    if _hooked(module):
        return False
    if is_rowwise(module) or type(module) in SAMPLEWISE:
        return True
    if isinstance(module, SamplewiseBlock) and type(module).samplewise is True:
        return True
    if type(module) is nn.Sequential:
        return all(is_samplewise(m) for m in module)
    return False
