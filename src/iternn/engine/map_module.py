"""``MapModule``: a block map run as an ordinary tensor -> tensor module."""

from __future__ import annotations

import math

from torch import Tensor, nn

from ..core.block_map import BlockMap
from ..core.state import check_state, shape_text
from ..errors import MapError, MapTypeError
from .iterate import depth, iterate, wavefront_plan

__all__ = ["MapModule"]


class MapModule(nn.Module):
    """Hold ``input``, iterate ``map`` ``steps`` times, return the ``output`` slot.

    This is how a feed-forward network is a block map: ``from_mlp`` returns one, and a
    ``MapModule`` can itself be a block of another map (between vector slots,
    ``in_features`` and ``out_features`` are the two slots' sizes), which is how maps
    nest.

    Args:
        map: the block map.
        input: slot that receives the argument and is held.
        output: slot returned.
        steps: applications; by default the map's depth with ``input`` held (``L`` for
            an ``L``-layer MLP), which must then be finite. With at least that many
            applications the result is a fixed point: more change nothing.

    A cyclic map (``steps`` given) is iterated with ``outputs=(output,)``: each
    application computes only what the output still depends on (see
    :func:`~iternn.engine.iterate.iterate`).
    """

    def __init__(
        self, map: BlockMap, *, input: str = "x", output: str = "y", steps: int | None = None
    ) -> None:
        super().__init__()
        if not isinstance(map, BlockMap):
            raise MapTypeError(f"map must be a BlockMap, got {type(map).__name__}")
        for role, slot in (("input", input), ("output", output)):
            if slot not in map.slots:
                raise MapError(f"{role} slot {slot!r} is not a slot of the map {list(map.slots)}")
        if steps is None:
            steps = depth(map, (input,))
            if math.isinf(steps):
                raise MapError(
                    "the map has a cycle, so it has no finite depth: pass steps= explicitly"
                )
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise MapTypeError(f"steps must be an int, got {type(steps).__name__}")
        if steps < 0:
            raise MapError(f"steps must be an int >= 0, got {steps!r}")
        self.map = map
        self.input = input
        self.output = output
        self.steps = steps
        self._held = frozenset((input,))
        self._keep = frozenset((output,))  # the one slot computed for (and kept)
        self._in_shape = map.shapes[input]
        # Declared sizes of a block between vector slots (how maps nest, see connect).
        if len(self._in_shape) == 1 and len(map.shapes[output]) == 1:
            self.in_features = map.slots[input]
            self.out_features = map.slots[output]

    def forward(self, x: Tensor) -> Tensor:
        m = self.map
        k = len(self._in_shape)
        if not isinstance(x, Tensor) or x.dim() < k or tuple(x.shape[x.dim() - k:]) != self._in_shape:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise MapError(
                f"input slot {self.input!r} needs shape {shape_text(('*batch',), self._in_shape)}, "
                f"got {shape}"
            )
        frozen = self._held
        wave = wavefront_plan(m, frozen=frozen)
        if not (wave and self.steps >= wave.depth and x.is_floating_point()):
            return iterate(m, {self.input: x}, self.steps, hold=frozen,
                           outputs=self._keep)[self.output]
        if (wave.dtype is not None and x.dtype != wave.dtype) or (
            wave.device is not None and x.device != wave.device
        ):
            return iterate(m, {self.input: x}, self.steps, hold=frozen,
                           outputs=self._keep)[self.output]  # raises
        try:  # the fast path: no per-call checks beyond the shape and dtype above
            batch = tuple(x.shape[: x.dim() - k])
            return wave({self.input: x}, None, x, batch, keep=self._keep)[self.output]
        except RuntimeError:
            # A dtype or device mismatch surfaces as a RuntimeError from a kernel:
            # raise the named error instead, if that is what it was.
            check_state(m, {self.input: x})
            raise

    def extra_repr(self) -> str:
        return f"input={self.input!r}, output={self.output!r}, steps={self.steps}"
