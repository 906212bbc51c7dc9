"""A block map as a plain function on a packed state, for the dynamics tools.

Solvers, Jacobians and Lyapunov exponents want ``z -> G(z)`` on one flat vector. The
*free* slots (those the iteration updates) are packed in slot order, each flattened
row-major (the layout of :meth:`BlockMap.pack <iternn.BlockMap.pack>` restricted to
the free slots: a ``(C, H, W)`` slot contributes ``C·H·W`` consecutive entries); held
slots are fixed at given values and are not part of ``z`` — so a fixed point of ``G``
is a fixed point of the map with the input held (paper §4.3.2: ``z* = act(b + F z*)``).

**Positions.** Slot tensors are ``(*batch, *shape)`` and the leading dims are batch:
each batch element is its own state. A sequence model keeps its positions in a leading
dim too (a transformer's slot tensors are ``(B, T, d)``, or ``(T, B, d)`` for
sequence-first layers), and its attention blocks mix them, so one position's state is
not a state of its own. With :class:`Positions` the position axis is part of the state:
a slot contributes its ``T`` positions, ``(T, *shape)`` flattened row-major (position
by position), and ``G`` maps ``(*batch, T·n_free)`` to ``(*batch, T·n_free)``, the
cross-position terms included. :func:`positions_of` finds the axis from the map and the
state (the tools' ``positions=True``). Without it a tool refuses a map with a block
known to mix positions (:func:`mixing_blocks`, :func:`refuse_mixing`) before calling it.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from ..core.block_map import BlockMap, Source, source_slots
from ..core.calls import is_shaped
from ..core.rowwise import is_rowwise, is_samplewise
from ..core.state import check_state
from ..engine.iterate import step_plan
from ..errors import DynamicsError, MapTypeError
from .validate import (
    as_block_map,
    check_block_kwargs,
    check_finite,
    check_hold,
    check_update,
    shape_text,
)

__all__ = [
    "MapFunction",
    "Positions",
    "positions_of",
    "sequence_blocks",
    "mixing_blocks",
    "refuse_mixing",
    "DynamicsError",
    "as_block_map",
    "pack_slots",
]




# ---------------------------------------------------------------------------- positions
@dataclass(frozen=True)
class Positions:
    """Where a sequence's positions are, for a :class:`MapFunction` over whole sequences.

    Attributes:
        axis: the position axis of the slot tensors the caller gives (:meth:`MapFunction.pack`,
            the held values), counted among their leading dims from the end: ``-1`` is
            the dim just before the slot's shape. Counting from the end keeps it right
            when more leading dims (time, in a trajectory) are put in front.
        length: the number of positions ``T``.
        first: the map's blocks take the positions first, ``(T, B, *shape)`` (sequence-
            first layers, ``batch_first=False``), else ``(B, T, *shape)``.
    """

    axis: int
    length: int
    first: bool


def _position_wise(module: nn.Module, shaped: bool) -> bool:
    """Whether ``module`` acts on each position alone: row-wise on vector slots (called
    on the tensors as they are), sample-wise on shaped slots (called batch-flattened,
    every position a sample of its own)."""
    return is_samplewise(module) if shaped else is_rowwise(module)


def sequence_blocks(m: BlockMap, free: Collection[str]) -> list[tuple[str, Source | None]]:
    """The blocks into the ``free`` slots that may mix positions, as ``(dst, src)``
    (``src`` ``None`` for a slot activation).

    A block mixes positions unless it is known to act on each one alone: a row-wise
    block between vector slots (``nn.Linear``, element-wise layers, a class declaring
    ``rowwise = True``: see :func:`iternn.core.rowwise.is_rowwise`), or a sample-wise
    one on shaped slots (called batch-flattened: every position is a sample). An
    attention block (any transformer layer, a custom block that reads other positions)
    is never known to be either.
    """
    out: list[tuple[str, Source | None]] = []
    for d, src in m.edges:
        if d in free:
            shaped = is_shaped(m.shapes[d], *(m.shapes[s] for s in source_slots(src)))
            if not _position_wise(m.block(d, src), shaped):
                out.append((d, src))
    for d in m.slots:
        act = m.activation(d)
        if d in free and act is not None and not _position_wise(act, len(m.shapes[d]) > 1):
            out.append((d, None))
    return out


def _where(d: str, src: Source | None) -> str:
    if src is None:
        return f"the activation of slot {d!r}"
    return f"block {d!r} <- {src!r}"


def _module(m: BlockMap, d: str, src: Source | None) -> nn.Module:
    """Block ``F[d, src]``, or the activation of slot ``d`` (``src`` ``None``)."""
    return m.activation(d) if src is None else m.block(d, src)  # type: ignore[return-value]


def _flags(module: nn.Module) -> set[bool]:
    """The ``batch_first`` flags of ``module`` and its submodules."""
    return {flag for sub in module.modules()
            if isinstance(flag := getattr(sub, "batch_first", None), bool)}


def mixing_blocks(m: BlockMap, free: Collection[str]) -> list[tuple[str, Source | None]]:
    """The blocks of :func:`sequence_blocks` known to mix positions, as ``(dst, src)``.

    A block is known to read a whole sequence when it says where the sequence's
    positions are: it holds a module with a ``batch_first`` flag
    (``nn.MultiheadAttention``, hence every torch transformer layer; a sequence model
    used as a block, such as a converted transformer or RNN). The other blocks
    :func:`sequence_blocks` lists are only not known to act on each position alone (a
    custom block, batch normalisation): the tools take them to treat every leading dim
    as batch. A custom block that mixes positions says so with a ``batch_first``
    attribute, which also gives ``positions=True`` its layout.
    """
    return [(d, src) for d, src in sequence_blocks(m, free) if _flags(_module(m, d, src))]


#: The remedy of :func:`refuse_mixing` for a tool with ``positions=``.
WHOLE_SEQUENCES = "pass positions=True to take each sequence as one state"
#: The remedy for a tool without it (``.format(tool)``).
NO_SEQUENCES = (
    "{} has no positions=True; jacobian, eigenvalues, singular_values, spectral_radius, "
    "lyapunov_spectrum and propagation take each sequence as one state (positions=True)"
)


def refuse_mixing(m: BlockMap, frozen: Collection[str], what: str, remedy: str) -> None:
    """Refuse a map whose blocks into the slots not ``frozen`` mix positions
    (:func:`mixing_blocks`), for a tool that treats every leading index of the state as
    a state of its own: ``what`` says which, ``remedy`` what to do instead.

    Raises:
        DynamicsError: naming every such block ``dst <- src`` (or slot activation).
    """
    blocks = mixing_blocks(m, [s for s in m.slots if s not in frozen])
    if blocks:
        names = ", ".join(_where(d, src) for d, src in blocks)
        verb = "mixes" if len(blocks) == 1 else "mix"
        raise DynamicsError(
            f"{what} treats every leading index of the state as a state of its own, but "
            f"{names} {verb} the positions of a sequence (attention: a module with a "
            f"batch_first flag reads the whole sequence): {remedy}"
        )


def _layout(m: BlockMap, blocks: list[tuple[str, Source | None]]) -> bool:
    """Whether the map takes positions first: from the ``batch_first`` flag of the
    modules in ``blocks`` that have one (see :func:`mixing_blocks`); none: ``False``."""
    flags: dict[bool, str] = {}
    for d, src in blocks:
        for flag in sorted(_flags(_module(m, d, src))):
            flags.setdefault(flag, _where(d, src))
    if len(flags) > 1:
        raise DynamicsError(
            f"positions=True: the blocks disagree on where the positions are: {flags[True]} "
            f"is batch-first (B, T, ...), {flags[False]} sequence-first (T, B, ...)"
        )
    return set(flags) == {False}


def positions_of(
    m: BlockMap, state: Mapping[str, Tensor], frozen: Collection[str] = ()
) -> Positions:
    """The :class:`Positions` of a (checked) ``state`` of ``m``, for ``positions=True``.

    The map must have a sequence dimension: a block into a slot that is not ``frozen``
    (held or forced) that mixes positions (:func:`sequence_blocks`). The position axis
    is the last leading dim of the slot tensors — ``(*batch, T, *shape)`` — unless the
    map's attention is sequence-first (``batch_first=False``, torch's default), then
    the first — ``(T, *batch, *shape)``; with one leading dim it is that dim either way
    (an unbatched sequence ``(T, *shape)``).

    Raises:
        DynamicsError: no block mixes positions (the map has no sequence dimension);
            the blocks disagree on the layout; a slot tensor of the state has no leading
            dim (no position axis) or zero positions (both name the slot).
    """
    free = [s for s in m.slots if s not in frozen]
    blocks = sequence_blocks(m, free)
    if not blocks:
        raise DynamicsError(
            f"positions=True needs a map with a sequence dimension, a block that mixes "
            f"positions (attention); every block into the free slots {free} acts on each "
            "position alone (row-wise, or sample-wise on shaped slots), so the map has none "
            "(positions inside a slot's shape are part of the state already): use "
            "positions=False"
        )
    first = _layout(m, blocks)
    where = "(T, *batch, *shape)" if first else "(*batch, T, *shape)"
    for s, v in state.items():
        lead = v.dim() - len(m.shapes[s])
        if lead < 1:
            raise DynamicsError(
                f"positions=True: slot {s!r} of the state has shape {tuple(v.shape)}, the "
                f"slot's own shape {shape_text(m.shapes[s])}: it has no position axis; give "
                f"{where} (or (T, *shape) for one sequence)"
            )
        axis = -lead if first else -1
        length = v.shape[lead + axis]
        if length == 0:
            raise DynamicsError(f"positions=True: slot {s!r} of the state has 0 positions")
        return Positions(axis=axis, length=length, first=first)
    raise DynamicsError("state is empty: give at least one slot (it sets the positions)")


def pack_slots(
    m: BlockMap,
    state: Mapping[str, Tensor],
    slots: tuple[str, ...],
    batch: tuple[int, ...],
    positions: Positions | None = None,
) -> Tensor:
    """``(*batch, sum n_s)``: the given slots of ``state`` flattened row-major and
    concatenated in the order of ``slots`` (each tensor ``(*batch, *shape_s)``). With
    ``positions`` each tensor has the position axis where :class:`Positions` says, and
    a slot contributes its ``(T, *shape_s)`` (``batch`` is then without that axis)."""
    if positions is None:
        return torch.cat([state[s].reshape(*batch, m.slots[s]) for s in slots], dim=-1)
    parts = []
    for s in slots:
        v = state[s]
        lead = v.dim() - len(m.shapes[s])
        parts.append(v.movedim(lead + positions.axis, lead - 1)
                     .reshape(*batch, positions.length * m.slots[s]))
    return torch.cat(parts, dim=-1)


# ---------------------------------------------------------------------------- G
class MapFunction:
    """``G(z)``: one application of ``m`` on the packed free slots, held slots fixed.

    Args:
        m: the block map.
        state: values of the held slots (and the batch shape); other slots given here
            are ignored except as a starting point via :meth:`pack`.
        hold: slots kept at their value in ``state``.
        update: ``"jacobi"`` (the paper's map) or ``"ordered"`` (see :func:`iterate`).
        positions: the position axis of ``state``'s slot tensors, which becomes part of
            the state (see the module docstring); ``None``: every leading dim is batch.

    ``G`` maps ``(*batch, n_free)`` to ``(*batch, n_free)``; autograd flows through it.
    ``n_free`` is the number of units of the free slots: a shaped slot ``(*shape)``
    counts ``prod(shape)``, flattened row-major, slots in slot order (:meth:`pack`).
    With ``positions`` a slot counts as the shape ``(T, *shape)`` (``shapes`` and
    ``sizes`` say so): ``n_free`` is ``T`` times the free units, position by position
    within each slot, and ``batch`` is the leading dims without the position axis.
    """

    def __init__(
        self,
        m: BlockMap,
        state: Mapping[str, Tensor],
        /,
        *,
        hold: Collection[str] = (),
        update: str = "jacobi",
        block_kwargs: Mapping[str, Mapping] | None = None,
        positions: Positions | None = None,
    ) -> None:
        if not isinstance(m, BlockMap):
            raise MapTypeError(f"expected a BlockMap, got {type(m).__name__}")
        update = check_update(update)
        hold = check_hold(m, hold)
        check_block_kwargs(m, block_kwargs)
        for s in hold:
            if s not in state:
                raise DynamicsError(f"held slot {s!r} needs a value in state")
        for s, v in state.items():
            if isinstance(v, Tensor) and v.is_floating_point():
                check_finite(s, v)
        check_state(m, state)  # names, shapes, batch shape, dtype and device
        self.map = m
        self.hold = hold
        self.update = update
        self.block_kwargs = block_kwargs
        self.positions = positions
        self.free = tuple(s for s in m.slots if s not in hold)
        if not self.free:
            raise DynamicsError("every slot is held: there is nothing to iterate")
        lead = () if positions is None else (positions.length,)
        self.shapes = tuple((*lead, *m.shapes[s]) for s in self.free)
        self.sizes = tuple(math.prod(shape) for shape in self.shapes)
        self.size = sum(self.sizes)
        self.held = {s: self._canonical(s, state[s]) for s in hold}
        self._frozen = frozenset(hold)

    # The packed layout is "canonical": every slot (*batch, T, *shape) with positions.
    # The blocks are called in the map's own layout: the batch dims flattened into one,
    # the positions before or after it (``Positions.first``); (T, *shape) unbatched.
    def _shape(self, s: str) -> tuple[int, ...]:
        shape = self.map.shapes[s]
        return shape if self.positions is None else (self.positions.length, *shape)

    def _canonical(self, s: str, v: Tensor) -> Tensor:
        """A slot tensor as the caller gives it -> ``(*batch, *shape)`` with the
        position axis (if any) just before the slot's shape (a view)."""
        p = self.positions
        if p is None:
            return v
        k = len(self.map.shapes[s])
        lead = v.dim() - k
        if lead < -p.axis or v.shape[lead + p.axis] != p.length:
            raise DynamicsError(
                f"slot {s!r} must have {p.length} positions at leading dim {p.axis} (counted "
                f"from the slot's shape), got shape {tuple(v.shape)}"
            )
        return v.movedim(lead + p.axis, lead - 1)

    def _engine(self, v: Tensor, batch: tuple[int, ...], s: str) -> Tensor:
        """A canonical ``(*batch, T, *shape)`` slot tensor in the blocks' layout."""
        p = self.positions
        if p is None or not batch:
            return v
        v = v.reshape(math.prod(batch), *self._shape(s))
        return v.transpose(0, 1) if p.first else v

    def _engine_batch(self, batch: tuple[int, ...]) -> tuple[int, ...]:
        p = self.positions
        if p is None:
            return batch
        if not batch:
            return (p.length,)
        rows = math.prod(batch)
        return (p.length, rows) if p.first else (rows, p.length)

    def _from_engine(self, v: Tensor, batch: tuple[int, ...], s: str) -> Tensor:
        """A slot tensor in the blocks' layout -> packed ``(*batch, sizes[s])``."""
        p = self.positions
        if p is not None and batch and p.first:
            v = v.transpose(0, 1)
        return v.reshape(*batch, self.map.slots[s] * (1 if p is None else p.length))

    def unpack(self, z: Tensor) -> dict[str, Tensor]:
        """The full state for packed free slots ``z`` (held slots from ``state``): every
        slot as the blocks take it, ``(*batch, *shape)`` (free slots as views of ``z``);
        with ``positions``, the batch dims flattened into one and the positions before
        or after it (``(T, *shape)`` for a ``z`` without batch dims)."""
        if z.dim() < 1 or z.shape[-1] != self.size:
            raise DynamicsError(
                f"packed state must have last dim {self.size} (free slots {list(self.free)}), "
                f"got {tuple(z.shape)}"
            )
        batch = tuple(z.shape[:-1])
        parts = {
            s: p.reshape(*batch, *shape)
            for s, p, shape in zip(self.free, torch.split(z, list(self.sizes), dim=-1),
                                   self.shapes)
        }
        for s, v in self.held.items():
            shape = self._shape(s)
            have = tuple(v.shape[: v.dim() - len(shape)])
            if have != batch:
                try:
                    v = v.expand(*batch, *shape)
                except RuntimeError:
                    raise DynamicsError(
                        f"packed state has batch shape {batch} but held slot {s!r} "
                        f"(shape {shape_text(shape)}) has batch shape {have}, which does "
                        "not broadcast to it"
                    ) from None
            parts[s] = v
        return {s: self._engine(v, batch, s) for s, v in parts.items()}

    def pack(self, state: Mapping[str, Tensor]) -> Tensor:
        """Pack the free slots of a state (slot order, each flattened row-major):
        ``(*batch, n_free)``. Missing free slots, or a slot whose trailing dims are not
        its shape, or batch shapes that differ, are errors naming the slot. With
        ``positions`` the slot tensors have the position axis where the caller's state
        had it (:class:`Positions`), with any leading dims before them."""
        missing = [s for s in self.free if s not in state]
        if missing:
            raise DynamicsError(f"state is missing free slot(s) {missing}")
        batch = None
        parts = []
        for s, size in zip(self.free, self.sizes):
            v, shape = state[s], self.map.shapes[s]
            k = len(shape)
            if not isinstance(v, Tensor) or v.dim() < k or tuple(v.shape[v.dim() - k:]) != shape:
                got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
                raise DynamicsError(
                    f"slot {s!r} must have shape (*batch, {', '.join(map(str, shape))}), got {got}"
                )
            v = self._canonical(s, v)
            b = tuple(v.shape[: v.dim() - len(self._shape(s))])
            if batch is None:
                batch = b
            elif b != batch:
                raise DynamicsError(f"slot {s!r} has batch shape {b}, other slots have {batch}")
            parts.append(v.reshape(*b, size))
        return torch.cat(parts, dim=-1)

    def element(self, z: Tensor, index: tuple[int, ...]) -> tuple[MapFunction, Tensor]:
        """``(G_b, z_b)`` for batch element ``index`` of packed ``z`` (``(*batch, n_free)``):
        ``G`` with the held slots at that element's values, and its packed state."""
        batch = tuple(z.shape[:-1])
        held = {s: v.expand(*batch, *self._shape(s))[index] for s, v in self.held.items()}
        positions = None if self.positions is None else replace(self.positions, axis=-1)
        g = MapFunction(self.map, held, hold=self.hold, update=self.update,
                        block_kwargs=self.block_kwargs, positions=positions)
        return g, z[index]

    def __call__(self, z: Tensor) -> Tensor:
        state = self.unpack(z)
        batch = tuple(z.shape[:-1])
        # One application through the engine's step plan (checked once, in __init__).
        step = step_plan(self.map, frozen=self._frozen, update=self.update)
        out = step(state, self.block_kwargs, z, self._engine_batch(batch))
        return torch.cat([self._from_engine(out[s], batch, s) for s in self.free], dim=-1)
