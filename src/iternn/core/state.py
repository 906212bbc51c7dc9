"""Checking a state dict against a map: names, sizes, batch shape, dtype and device."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..errors import MapError, MapTypeError

if TYPE_CHECKING:
    from .block_map import BlockMap

__all__ = ["check_state", "zeros_like_batch", "parameter_spec", "batch_of", "shape_text"]


def zeros_like_batch(ref: Tensor, batch: tuple[int, ...], shape: tuple[int, ...]) -> Tensor:
    """Zeros of shape ``(*batch, *shape)`` with ``ref``'s dtype and device."""
    return ref.new_zeros(*batch, *shape)


def batch_of(m: BlockMap, slot: str, value: Tensor) -> tuple[int, ...]:
    """The batch shape of a (checked) slot tensor: its dims before the slot's shape."""
    return tuple(value.shape[: value.dim() - len(m.shapes[slot])])


def shape_text(batch: tuple[int | str, ...], shape: tuple[int, ...]) -> str:
    """``(*batch, *shape)`` as text, e.g. ``(*batch, 3, 8)`` or ``(5, 2, 3, 8)``."""
    return "(" + ", ".join(str(d) for d in (*batch, *shape)) + ")"


def parameter_spec(module: torch.nn.Module) -> tuple[torch.dtype | None, torch.device | None]:
    """The one floating dtype and the one device of a module's parameters, where unique.

    Cached in the map's plan cache, which every structural change, ``.to()`` and
    ``load_state_dict`` clear.
    """
    cache = getattr(module, "_plans", None)
    if cache is not None and "spec" in cache:
        return cache["spec"]
    dtypes = {p.dtype for p in module.parameters() if p.is_floating_point()}
    devices = {p.device for p in module.parameters()}
    spec = (
        next(iter(dtypes)) if len(dtypes) == 1 else None,
        next(iter(devices)) if len(devices) == 1 else None,
    )
    if cache is not None:
        cache["spec"] = spec
    return spec


def check_tensor(
    m: BlockMap, slot: str, value: object, what: str = "slot"
) -> Tensor:
    """One slot tensor: a floating tensor whose trailing dims are the slot's shape."""
    if not isinstance(value, Tensor):
        raise MapTypeError(f"{what} {slot!r} must be a tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise MapTypeError(f"{what} {slot!r} must be floating point, got {value.dtype}")
    shape = m.shapes[slot]
    k = len(shape)
    if value.dim() < k or tuple(value.shape[value.dim() - k:]) != shape:
        raise MapError(
            f"{what} {slot!r} must have shape {shape_text(('*batch',), shape)}, "
            f"got {tuple(value.shape)}"
        )
    return value


def check_state(
    m: BlockMap,
    state: Mapping[str, Tensor],
    *,
    require_all: bool = False,
    batch: tuple[int, ...] | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
) -> tuple[tuple[int, ...] | None, torch.dtype | None, torch.device | None]:
    """Validate ``state`` for ``m``; return its (batch shape, dtype, device).

    Unknown slot names, wrong last dims, differing batch shapes, dtypes or devices, and
    a dtype or device that differs from the map's parameters are errors naming the
    slot. ``batch``/``dtype``/``device`` pre-set what the tensors must agree with.
    """
    if not isinstance(state, Mapping):
        raise MapTypeError(f"state must be a dict slot -> tensor, got {type(state).__name__}")
    for slot, value in state.items():
        if slot not in m.slots:
            raise MapError(f"state names unknown slot {slot!r}; slots are {list(m.slots)}")
        check_tensor(m, slot, value)
        b = batch_of(m, slot, value)
        if batch is None:
            batch, dtype, device = b, dtype or value.dtype, device or value.device
        if b != batch:
            raise MapError(f"slot {slot!r} has batch shape {b}, other slots have {batch}")
        if value.dtype != dtype:
            raise MapTypeError(f"slot {slot!r} has dtype {value.dtype}, other slots have {dtype}")
        if value.device != device:
            raise MapError(f"slot {slot!r} is on {value.device}, other slots are on {device}")
    if require_all:
        missing = [s for s in m.slots if s not in state]
        if missing:
            raise MapError(f"state is missing slot(s) {missing}")
    if dtype is not None:
        p_dtype, p_device = parameter_spec(m)
        if p_dtype is None:
            mixed = sorted({str(p.dtype) for p in m.parameters() if p.is_floating_point()})
            if len(mixed) > 1:
                raise MapTypeError(
                    f"the map's parameters have mixed dtypes {mixed}; convert the map "
                    "(e.g. map.to(torch.float32)) before iterating"
                )
        if p_dtype is not None and dtype != p_dtype:
            raise MapTypeError(
                f"state has dtype {dtype} but the map's parameters are {p_dtype}; "
                f"convert one of them (e.g. map.to({dtype}))"
            )
        if p_device is not None and device != p_device:
            raise MapError(
                f"state is on {device} but the map's parameters are on {p_device}"
            )
    return batch, dtype, device
