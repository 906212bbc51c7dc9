"""A block map as a plain function on a packed state, for the dynamics tools.

Solvers, Jacobians and Lyapunov exponents want ``z -> G(z)`` on one flat vector. The
*free* slots (those the iteration updates) are packed in slot order, each flattened
row-major (the layout of :meth:`BlockMap.pack <iternn.BlockMap.pack>` restricted to
the free slots: a ``(C, H, W)`` slot contributes ``C·H·W`` consecutive entries); held
slots are fixed at given values and are not part of ``z`` — so a fixed point of ``G``
is a fixed point of the map with the input held (paper §4.3.2: ``z* = act(b + F z*)``).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch
from torch import Tensor

from ..core.block_map import BlockMap
from ..core.state import check_state
from ..engine.iterate import step_plan
from ..errors import DynamicsError, MapTypeError
from .validate import as_block_map, check_finite, check_hold, check_update, shape_text

__all__ = ["MapFunction", "DynamicsError", "as_block_map", "pack_slots"]


def pack_slots(
    m: BlockMap, state: Mapping[str, Tensor], slots: tuple[str, ...], batch: tuple[int, ...]
) -> Tensor:
    """``(*batch, sum n_s)``: the given slots of ``state`` flattened row-major and
    concatenated in the order of ``slots`` (each tensor ``(*batch, *shape_s)``)."""
    return torch.cat([state[s].reshape(*batch, m.slots[s]) for s in slots], dim=-1)


class MapFunction:
    """``G(z)``: one application of ``m`` on the packed free slots, held slots fixed.

    Args:
        m: the block map.
        state: values of the held slots (and the batch shape); other slots given here
            are ignored except as a starting point via :meth:`pack`.
        hold: slots kept at their value in ``state``.
        update: ``"jacobi"`` (the paper's map) or ``"ordered"`` (see :func:`iterate`).

    ``G`` maps ``(*batch, n_free)`` to ``(*batch, n_free)``; autograd flows through it.
    ``n_free`` is the number of units of the free slots: a shaped slot ``(*shape)``
    counts ``prod(shape)``, flattened row-major, slots in slot order (:meth:`pack`).
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
    ) -> None:
        if not isinstance(m, BlockMap):
            raise MapTypeError(f"expected a BlockMap, got {type(m).__name__}")
        update = check_update(update)
        hold = check_hold(m, hold)
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
        self.held = {s: state[s] for s in hold}
        self.free = tuple(s for s in m.slots if s not in hold)
        if not self.free:
            raise DynamicsError("every slot is held: there is nothing to iterate")
        self.sizes = tuple(m.slots[s] for s in self.free)
        self.shapes = tuple(m.shapes[s] for s in self.free)
        self.size = sum(self.sizes)
        self._frozen = frozenset(hold)
        if block_kwargs is not None:
            unknown = [k for k in block_kwargs if k not in m.blocks]
            if unknown:
                raise DynamicsError(f"block_kwargs names unknown block(s) {unknown}")

    def unpack(self, z: Tensor) -> dict[str, Tensor]:
        """The full state for packed free slots ``z`` (held slots from ``state``): every
        slot ``(*batch, *shape)``, free slots as views of ``z``."""
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
            shape = self.map.shapes[s]
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
        return parts

    def pack(self, state: Mapping[str, Tensor]) -> Tensor:
        """Pack the free slots of a state (slot order, each flattened row-major):
        ``(*batch, n_free)``. Missing free slots, or a slot whose trailing dims are not
        its shape, or batch shapes that differ, are errors naming the slot."""
        missing = [s for s in self.free if s not in state]
        if missing:
            raise DynamicsError(f"state is missing free slot(s) {missing}")
        batch = None
        for s, shape in zip(self.free, self.shapes):
            v = state[s]
            k = len(shape)
            if not isinstance(v, Tensor) or v.dim() < k or tuple(v.shape[v.dim() - k:]) != shape:
                got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
                raise DynamicsError(
                    f"slot {s!r} must have shape (*batch, {', '.join(map(str, shape))}), got {got}"
                )
            b = tuple(v.shape[: v.dim() - k])
            if batch is None:
                batch = b
            elif b != batch:
                raise DynamicsError(f"slot {s!r} has batch shape {b}, other slots have {batch}")
        return pack_slots(self.map, state, self.free, batch)

    def __call__(self, z: Tensor) -> Tensor:
        state = self.unpack(z)
        batch = tuple(z.shape[:-1])
        # One application through the engine's step plan (checked once, in __init__).
        step = step_plan(self.map, frozen=self._frozen, update=self.update)
        out = step(state, self.block_kwargs, z, batch)
        return pack_slots(self.map, out, self.free, batch)
