"""The small blocks :func:`~iternn.convert.module.from_module` builds from a traced model.

Each does one job on the slot tensors of a :class:`~iternn.BlockMap` and knows the
sample shape of what it reads (``in_shape``): every leading dim in front of the sample
dims is batch, so a block works on ``(*batch, *in_shape)`` whatever the batch rank
(called batch-flattened ``(B, *in_shape)`` on shaped slots, as is on vector slots). All
are sample-wise (``samplewise = True``: no sample reads another); the element-wise ones
are row-wise too. In the paper's notation a block is ``F[d, s]`` (row = destination
slot, column = source slot); a multi-source block ``F[d, (a, b)]`` reads two slots.

* shape blocks: :class:`Reshape` (view, reshape, flatten, squeeze, unsqueeze...),
  :class:`Permute` (permute, transpose), :class:`Broadcast` (expand), :class:`Index`
  (basic indexing and slicing: getitem, narrow, the pieces of chunk/split/unbind);
* :class:`Place`: its source written into part of the destination, zeros elsewhere —
  a concatenation ``cat([a, b])`` is the sum ``Place(a) + Place(b)``;
* element-wise: :class:`UnaryOp` (neg, exp, ...), :class:`ScalarOp` (``z * 2``,
  ``1 - z``), :class:`Clamp`; with a parameter or buffer: :class:`TensorOp`
  (``z * scale``, ``z @ W``);
* :class:`BinaryOp`: a multi-source block ``op(z_a, z_b)`` (a product, a quotient, a
  matmul of two slots);
* :class:`Reduce`: a mean/sum/max over sample dims;
* :class:`IndexEmbedding`: an ``nn.Embedding`` reading its indices from a floating
  slot (slots are floating; indices below ``2**24`` in float32, ``2**53`` in float64,
  are exact there).
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import MapError, MapTypeError

__all__ = [
    "Reshape",
    "Permute",
    "Broadcast",
    "Index",
    "Place",
    "UnaryOp",
    "ScalarOp",
    "Clamp",
    "TensorOp",
    "BinaryOp",
    "Reduce",
    "IndexEmbedding",
    "UNARY",
    "BINARY",
    "REDUCTIONS",
]

#: Element-wise functions a :class:`UnaryOp` applies, by name.
UNARY = {
    "neg": torch.neg,
    "exp": torch.exp,
    "log": torch.log,
    "abs": torch.abs,
    "sqrt": torch.sqrt,
    "rsqrt": torch.rsqrt,
    "square": torch.square,
    "sin": torch.sin,
    "cos": torch.cos,
    "reciprocal": torch.reciprocal,
    "erf": torch.erf,
    "log1p": torch.log1p,
    "expm1": torch.expm1,
    "detach": torch.detach,
}

#: Binary operations of :class:`ScalarOp`, :class:`TensorOp` and :class:`BinaryOp`.
BINARY = {
    "add": operator.add,
    "sub": operator.sub,
    "mul": operator.mul,
    "div": operator.truediv,
    "pow": operator.pow,
    "matmul": operator.matmul,
    "maximum": torch.maximum,
    "minimum": torch.minimum,
}

#: The element-wise ones (the others mix entries: matmul).
ELEMENTWISE_BINARY = frozenset(BINARY) - {"matmul"}

#: The operations of :class:`ScalarOp` (a number and a tensor).
SCALAR_OPS = ("add", "sub", "mul", "div", "pow")

#: Reductions of :class:`Reduce`, by name.
REDUCTIONS = {"mean": torch.mean, "sum": torch.sum, "amax": torch.amax, "amin": torch.amin}


def _shape(shape: object, what: str) -> tuple[int, ...]:
    if not isinstance(shape, (tuple, list)) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
    ):
        raise MapTypeError(f"{what} must be a tuple of ints >= 0, got {shape!r}")
    return tuple(shape)


def _lead(z: Tensor, rank: int) -> int:
    """How many leading (batch) dims ``z`` has in front of ``rank`` sample dims."""
    return z.dim() - rank


class Reshape(nn.Module):
    """``F[d, s]``: each sample of shape ``in_shape`` read row-major as ``out_shape``
    (``view``, ``reshape``, ``flatten``, ``unflatten``, ``squeeze``, ``unsqueeze``)."""

    samplewise = True
    linear = True  # a 0/1 matrix over the flattened slots

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.in_shape = _shape(in_shape, "in_shape")
        self.out_shape = _shape(out_shape, "out_shape")
        if math.prod(self.in_shape) != math.prod(self.out_shape):
            raise MapError(f"Reshape: {self.in_shape} and {self.out_shape} differ in size")

    def forward(self, z: Tensor) -> Tensor:
        return z.reshape(*z.shape[: _lead(z, len(self.in_shape))], *self.out_shape)

    def extra_repr(self) -> str:
        return f"in_shape={self.in_shape}, out_shape={self.out_shape}"


class Permute(nn.Module):
    """``F[d, s]``: the sample dims reordered, ``out dim i = in dim perm[i]``."""

    samplewise = True
    linear = True  # a 0/1 matrix over the flattened slots

    def __init__(self, perm: tuple[int, ...]) -> None:
        super().__init__()
        self.perm = _shape(perm, "perm")
        if sorted(self.perm) != list(range(len(self.perm))):
            raise MapError(f"Permute: {self.perm} is not a permutation of 0..{len(self.perm) - 1}")

    def forward(self, z: Tensor) -> Tensor:
        k = _lead(z, len(self.perm))
        return z.permute(*range(k), *(k + p for p in self.perm))

    def extra_repr(self) -> str:
        return f"perm={self.perm}"


class Broadcast(nn.Module):
    """``F[d, s]``: each sample expanded (broadcast) from ``in_shape`` to ``out_shape``
    of the same rank (``expand``; the identity-like block of a broadcasting sum)."""

    samplewise = True
    linear = True  # a 0/1 matrix over the flattened slots

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.in_shape = _shape(in_shape, "in_shape")
        self.out_shape = _shape(out_shape, "out_shape")
        if len(self.in_shape) != len(self.out_shape) or any(
            a not in (1, b) for a, b in zip(self.in_shape, self.out_shape)
        ):
            raise MapError(f"Broadcast: {self.in_shape} does not broadcast to {self.out_shape}")

    def forward(self, z: Tensor) -> Tensor:
        return z.expand(*z.shape[: _lead(z, len(self.in_shape))], *self.out_shape)

    def extra_repr(self) -> str:
        return f"in_shape={self.in_shape}, out_shape={self.out_shape}"


def _index_item(item: object) -> int | slice | None:
    if item is None or (isinstance(item, int) and not isinstance(item, bool)):
        return item
    if isinstance(item, (list, tuple)) and len(item) == 3 and all(
        v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in item
    ):
        if item[2] is not None and item[2] <= 0:
            raise MapError(f"Index: a slice step must be positive, got {item[2]}")
        return slice(*item)
    raise MapTypeError(f"Index: an item must be an int, None or [start, stop, step], got {item!r}")


class Index(nn.Module):
    """``F[d, s]``: basic indexing of each sample, ``z[..., index]`` over the sample dims.

    ``index`` lists one item per indexed sample dim (in order, from the first): an int
    (picks one entry, the dim goes), ``[start, stop, step]`` (a slice, ``None`` for a
    default) or ``None`` (a new dim of size 1). Sample dims past the items are kept.
    """

    samplewise = True
    linear = True  # a 0/1 matrix over the flattened slots

    def __init__(self, in_shape: tuple[int, ...], index: list | tuple) -> None:
        super().__init__()
        self.in_shape = _shape(in_shape, "in_shape")
        if not isinstance(index, (list, tuple)):
            raise MapTypeError(f"Index: index must be a list, got {type(index).__name__}")
        items = tuple(_index_item(i) for i in index)
        if sum(i is not None for i in items) > len(self.in_shape):
            raise MapError(f"Index: {len(items)} items for a sample of rank {len(self.in_shape)}")
        self._items = items

    @property
    def index(self) -> list:
        """The items as given (slices as ``[start, stop, step]``)."""
        return [[i.start, i.stop, i.step] if isinstance(i, slice) else i for i in self._items]

    def forward(self, z: Tensor) -> Tensor:
        return z[(slice(None),) * _lead(z, len(self.in_shape)) + self._items]

    def extra_repr(self) -> str:
        return f"in_shape={self.in_shape}, index={self.index}"


class Place(nn.Module):
    """``F[d, s]``: the source written into ``ranges`` of sample dim ``dim`` of the
    destination (shape ``out_shape``), zeros elsewhere.

    As a matrix over the flattened slots this is a 0/1 placement: a concatenation
    ``d = cat([a, b], dim)`` is the sum of two such blocks, ``F[d, a] + F[d, b]``. A
    source of rank one less than the destination is a stacked piece (``torch.stack``):
    it gets a dim of size 1 at ``dim``. Several ranges place the same source several
    times (``cat([a, a])``).
    """

    samplewise = True
    linear = True  # a 0/1 matrix over the flattened slots

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...], dim: int,
                 ranges: list | tuple) -> None:
        super().__init__()
        self.in_shape = _shape(in_shape, "in_shape")
        self.out_shape = _shape(out_shape, "out_shape")
        if isinstance(dim, bool) or not isinstance(dim, int) or not 0 <= dim < len(self.out_shape):
            raise MapError(f"Place: dim must be a sample dim in [0, {len(self.out_shape)}), got {dim!r}")
        self.dim = dim
        spans = []
        for r in ranges:
            if not (isinstance(r, (list, tuple)) and len(r) == 2
                    and all(isinstance(v, int) and not isinstance(v, bool) for v in r)):
                raise MapTypeError(f"Place: a range must be [start, stop], got {r!r}")
            spans.append((r[0], r[1]))
        spans.sort()
        size = self.out_shape[dim]
        end = 0
        for start, stop in spans:
            if start < end or stop <= start or stop > size:
                raise MapError(f"Place: ranges {spans} do not fit dim {dim} of size {size} without overlap")
            end = stop
        if not spans:
            raise MapError("Place: at least one range is needed")
        self.ranges = tuple(spans)
        piece = list(self.out_shape)
        widths = {stop - start for start, stop in spans}
        if len(widths) != 1:
            raise MapError(f"Place: ranges {spans} have different widths")
        piece[dim] = widths.pop()
        self._piece = tuple(piece)
        if math.prod(self._piece) != math.prod(self.in_shape):
            raise MapError(f"Place: a source of shape {self.in_shape} does not fill {self._piece}")
        if self._piece != self.in_shape and self.in_shape != self._piece[:dim] + self._piece[dim + 1:]:
            raise MapError(f"Place: a source of shape {self.in_shape} is neither the piece "
                           f"{self._piece} nor the piece without dim {dim}")
        after = len(self.out_shape) - 1 - dim
        self._pads = [
            (0, 0) * after + (start, size - stop) for start, stop in self.ranges
        ]

    def forward(self, z: Tensor) -> Tensor:
        lead = z.shape[: _lead(z, len(self.in_shape))]
        if self._piece != self.in_shape:
            z = z.reshape(*lead, *self._piece)
        if len(self.ranges) == 1:
            return F.pad(z, self._pads[0])
        k = len(lead) + self.dim
        parts: list[Tensor] = []
        end = 0
        for start, stop in self.ranges:
            if start > end:
                parts.append(z.new_zeros(*lead, *self._gap(start - end)))
            parts.append(z)
            end = stop
        if end < self.out_shape[self.dim]:
            parts.append(z.new_zeros(*lead, *self._gap(self.out_shape[self.dim] - end)))
        return torch.cat(parts, dim=k)

    def _gap(self, width: int) -> tuple[int, ...]:
        return self.out_shape[: self.dim] + (width,) + self.out_shape[self.dim + 1:]

    def extra_repr(self) -> str:
        return (f"in_shape={self.in_shape}, out_shape={self.out_shape}, dim={self.dim}, "
                f"ranges={[list(r) for r in self.ranges]}")


def _op_name(op: object, table: dict, what: str) -> str:
    if not isinstance(op, str) or op not in table:
        raise MapError(f"{what}: op must be one of {sorted(table)}, got {op!r}")
    return op


class UnaryOp(nn.Module):
    """An element-wise function by name (:data:`UNARY`): ``neg``, ``exp``, ``abs``..."""

    rowwise = True
    samplewise = True

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = _op_name(op, UNARY, "UnaryOp")
        self._fn = UNARY[op]

    def forward(self, z: Tensor) -> Tensor:
        return self._fn(z)

    def extra_repr(self) -> str:
        return f"op={self.op!r}"


def _scalar(value: object, what: str) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MapTypeError(f"{what}: the scalar must be an int or a float, got {value!r}")
    return value


class ScalarOp(nn.Module):
    """``op(z, value)`` with a Python number (``op(value, z)`` when ``reverse``):
    element-wise, e.g. ``z * 0.5``, ``1 - z``, ``z ** 2``."""

    rowwise = True
    samplewise = True

    def __init__(self, op: str, value: float | int, *, reverse: bool = False) -> None:
        super().__init__()
        self.op = _op_name(op, {k: BINARY[k] for k in SCALAR_OPS}, "ScalarOp")
        self.value = _scalar(value, "ScalarOp")
        self.reverse = bool(reverse)
        self._fn = BINARY[op]

    def forward(self, z: Tensor) -> Tensor:
        return self._fn(self.value, z) if self.reverse else self._fn(z, self.value)

    def extra_repr(self) -> str:
        return f"op={self.op!r}, value={self.value!r}, reverse={self.reverse}"


class Clamp(nn.Module):
    """``clamp(z, min, max)`` with Python numbers (either may be ``None``)."""

    rowwise = True
    samplewise = True

    def __init__(self, min: float | int | None = None, max: float | int | None = None) -> None:
        super().__init__()
        if min is None and max is None:
            raise MapError("Clamp: at least one of min and max is needed")
        self.min = None if min is None else _scalar(min, "Clamp")
        self.max = None if max is None else _scalar(max, "Clamp")

    def forward(self, z: Tensor) -> Tensor:
        return torch.clamp(z, self.min, self.max)

    def extra_repr(self) -> str:
        return f"min={self.min!r}, max={self.max!r}"


class TensorOp(nn.Module):
    """``op(z, tensor)`` (``op(tensor, z)`` when ``reverse``) with a tensor the block
    holds: a parameter (trained with the map) or a buffer. The tensor broadcasts
    against each sample (it must not reach into the batch dims): ``z * scale``,
    ``z + offset``, ``z @ W``."""

    samplewise = True

    def __init__(self, op: str, tensor: Tensor, *, reverse: bool = False) -> None:
        super().__init__()
        self.op = _op_name(op, BINARY, "TensorOp")
        if not isinstance(tensor, Tensor):
            raise MapTypeError(f"TensorOp: tensor must be a tensor, got {type(tensor).__name__}")
        if isinstance(tensor, nn.Parameter):
            self.tensor = tensor
        else:
            self.register_buffer("tensor", tensor)
        self.reverse = bool(reverse)
        self._fn = BINARY[op]

    def forward(self, z: Tensor) -> Tensor:
        return self._fn(self.tensor, z) if self.reverse else self._fn(z, self.tensor)

    def extra_repr(self) -> str:
        kind = "parameter" if isinstance(self.tensor, nn.Parameter) else "buffer"
        return f"op={self.op!r}, {kind} shape={tuple(self.tensor.shape)}, reverse={self.reverse}"


class BinaryOp(nn.Module):
    """A multi-source block ``F[d, (a, b)]``: ``op(z_a, z_b)`` (:data:`BINARY`), e.g. the
    product of a gate and a value. Both sources have the same sample rank, so their
    batch dims line up and the op broadcasts only over sample dims."""

    samplewise = True

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = _op_name(op, BINARY, "BinaryOp")
        self._fn = BINARY[op]

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return self._fn(a, b)

    def extra_repr(self) -> str:
        return f"op={self.op!r}"


class Reduce(nn.Module):
    """``F[d, s]``: a reduction (:data:`REDUCTIONS`) over the sample dims ``dims``
    (counted from the first sample dim), keeping them as size 1 when ``keepdim``."""

    samplewise = True

    def __init__(self, op: str, in_shape: tuple[int, ...], dims: tuple[int, ...], *,
                 keepdim: bool = False) -> None:
        super().__init__()
        self.op = _op_name(op, REDUCTIONS, "Reduce")
        self.in_shape = _shape(in_shape, "in_shape")
        dims = _shape(dims, "dims")
        if not dims or len(set(dims)) != len(dims) or max(dims) >= len(self.in_shape):
            raise MapError(f"Reduce: dims {dims} are not distinct sample dims of {self.in_shape}")
        self.dims = tuple(sorted(dims))
        self.keepdim = bool(keepdim)
        self._fn = REDUCTIONS[op]

    def forward(self, z: Tensor) -> Tensor:
        k = _lead(z, len(self.in_shape))
        return self._fn(z, dim=tuple(k + d for d in self.dims), keepdim=self.keepdim)

    def extra_repr(self) -> str:
        return f"op={self.op!r}, in_shape={self.in_shape}, dims={self.dims}, keepdim={self.keepdim}"


class IndexEmbedding(nn.Module):
    """``F[d, s]``: ``embedding(z.long())`` — an ``nn.Embedding`` whose indices come from a
    floating slot ``s`` (the map's slots are floating; the converted model writes its
    integer input there, exactly while the indices stay below ``2**24`` in float32 or
    ``2**53`` in float64, which it checks)."""

    samplewise = True

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        if type(embedding) is not nn.Embedding:
            raise MapTypeError(f"IndexEmbedding needs an nn.Embedding, got {type(embedding).__name__}")
        self.embedding = embedding

    def forward(self, z: Tensor) -> Tensor:
        return self.embedding(z.long())
