"""The hooks a block module may offer the core, as ``typing.Protocol``\\ s.

A block ``F[d, s]`` of a :class:`~iternn.BlockMap` is any ``nn.Module``; these protocols
name the two things a block class can say about itself beyond that, so the core asks
for them by name (``isinstance(block, CountsTrainable)``) instead of probing attributes:

* :class:`CountsTrainable` — how many entries of its own parameters training can change
  (a masked or structured weight counts its pattern, not its storage); read by
  :func:`iternn.core.summary.count_entries` and the per-block density of a summary.
* :class:`RowwiseBlock` — whether it acts on each row (the last dim) alone, whatever the
  leading dims are; read by :func:`iternn.core.rowwise.is_rowwise`, which lets the engine
  call such a block once on a whole ``(T, *batch, n)`` sequence.
* :class:`LinearBlock` — whether it is an affine map of its sources (jointly, for a
  block reading several slots); read by :func:`iternn.as_matrix`, which then puts its
  linear part into the map's one matrix ``W``.
* :class:`SamplewiseBlock` — whether it treats its one leading dim as independent
  samples; read by :func:`iternn.core.rowwise.is_samplewise`, which lets the engine call
  a block on shaped slots once on a whole sequence flattened to ``(T * B, *shape)``.

Both are ``runtime_checkable``; a class satisfies them by defining the member, no
inheritance needed.
"""

from __future__ import annotations

from typing import ClassVar, Protocol, runtime_checkable

__all__ = ["CountsTrainable", "LinearBlock", "RowwiseBlock", "SamplewiseBlock"]


@runtime_checkable
class CountsTrainable(Protocol):
    """A module that says how many entries of its own parameters training can change."""

    def trainable_counts(self) -> dict[str, int]:
        """``{name: count}`` for the module's direct parameters (``self._parameters``).

        ``count`` is the number of entries of parameter ``name`` that training can
        change: its mask's non-zeros for a masked weight, ``numel`` for a plain one. A
        parameter left out counts ``numel``; submodules report their own parameters.
        """
        ...


@runtime_checkable
class RowwiseBlock(Protocol):
    """A block class that declares whether it treats every leading dim as batch.

    ``rowwise = True`` promises ``block(z)[i] == block(z[i])`` for any leading index
    ``i``: the block reads only the last dim of each row (a linear layer, a masked or
    sparse weight). The engine then evaluates it once over a whole sequence instead of
    step by step. ``False`` (or no attribute) keeps the step-by-step call.
    """

    rowwise: ClassVar[bool]


@runtime_checkable
class SamplewiseBlock(Protocol):
    """A block class that declares whether it treats its one leading dim as a batch.

    ``samplewise = True`` promises ``block(z)[i] == block(z[i:i + 1])[0]`` (and the same
    for every input of a multi-source block): no sample reads another. Convolutions do;
    batch normalisation in train mode does not. The engine then evaluates a block fed
    from outside a cycle once over a whole sequence.
    """

    samplewise: ClassVar[bool]


@runtime_checkable
class LinearBlock(Protocol):
    """A block class that declares whether it is an affine map of its sources.

    ``linear = True`` promises ``block(*z) = A z + c`` for one matrix ``A`` over the
    flattened sources (jointly, for a block reading several slots: a placement block
    writing two slots side by side is linear, a product of two slots is not).
    :func:`iternn.as_matrix` then reads ``A`` by probing the block, exactly. The constant
    ``c`` must be the block's ``bias`` (``None`` when there is none): the engine skips a
    linear block without a bias while everything it reads is zero.
    """

    linear: ClassVar[bool]
