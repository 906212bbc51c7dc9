"""The checks every dynamics tool makes on its input, in one place.

Each check raises :class:`~iternn.DynamicsError` (a ``ValueError``) or
:class:`~iternn.MapTypeError` (a ``TypeError``) whose message names the option, slot or
block at fault. Besides option and state checks this module has the *finite* checks:
a map whose weights hold NaN or inf, or a Jacobian that does, is refused before any
LAPACK routine (``torch.linalg``) sees the matrix — some of them crash the process on a
NaN input instead of raising.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Collection, Mapping

import torch
from torch import Tensor, nn

from ..core.block_map import BlockMap, block_key, source_slots
from ..core.state import check_state as _engine_check_state
from ..engine.iterate import UPDATES
from ..errors import DynamicsError, MapTypeError

__all__ = [
    "STOP_MODES",
    "as_block_map",
    "check_update",
    "check_stop_mode",
    "check_hold",
    "check_int",
    "check_positive",
    "check_non_negative",
    "check_fraction",
    "check_generator",
    "check_block_kwargs",
    "check_finite",
    "check_state",
    "check_force",
    "check_start",
    "check_map_finite",
    "check_matrix_finite",
    "shape_text",
    "slot_zeros",
]

#: ``stop_mode=`` values of the fixed-point solvers.
STOP_MODES = ("abs", "rel")


# ---------------------------------------------------------------------------- options
def as_block_map(m: object) -> BlockMap:
    """The BlockMap of ``m``: a map itself, or a module holding one as ``.map``
    (:class:`~iternn.MapModule` and every converter's result)."""
    if isinstance(m, BlockMap):
        return m
    inner = getattr(m, "map", None)
    if isinstance(m, nn.Module) and isinstance(inner, BlockMap):
        return inner
    raise MapTypeError(f"expected a BlockMap (or a module with one as .map), got {type(m).__name__}")


def check_update(update: object) -> str:
    """``"jacobi"`` or ``"ordered"``."""
    if update not in UPDATES:
        raise DynamicsError(f"update must be one of {UPDATES}, got {update!r}")
    return update  # type: ignore[return-value]


def check_stop_mode(stop_mode: object) -> str:
    """``"abs"`` or ``"rel"``."""
    if stop_mode not in STOP_MODES:
        raise DynamicsError(f"stop_mode must be one of {STOP_MODES}, got {stop_mode!r}")
    return stop_mode  # type: ignore[return-value]


def check_hold(m: BlockMap, hold: object, role: str = "hold") -> tuple[str, ...]:
    """Slot names (a str or a collection of them), each a slot of ``m``, no duplicates."""
    if isinstance(hold, str):
        hold = (hold,)
    if not isinstance(hold, Collection):
        raise DynamicsError(f"{role} must be a collection of slot names, got {type(hold).__name__}")
    out: list[str] = []
    for s in hold:
        if not isinstance(s, str) or s not in m.slots:
            raise DynamicsError(f"{role} names unknown slot {s!r}; slots are {list(m.slots)}")
        if s not in out:
            out.append(s)
    return tuple(out)


def check_int(value: object, name: str, minimum: int = 0) -> int:
    """An int (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DynamicsError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _number(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def check_positive(value: object, name: str) -> float:
    """A finite number ``> 0``."""
    if not _number(value) or value <= 0:  # type: ignore[operator]
        raise DynamicsError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def check_non_negative(value: object, name: str) -> float:
    """A finite number ``>= 0``."""
    if not _number(value) or value < 0:  # type: ignore[operator]
        raise DynamicsError(f"{name} must be a non-negative finite number, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def check_fraction(value: object, name: str) -> float:
    """A number in ``(0, 1]`` (a damping or mixing weight)."""
    if not _number(value) or not 0 < value <= 1:  # type: ignore[operator]
        raise DynamicsError(f"{name} must be a number in (0, 1], got {value!r}")
    return float(value)  # type: ignore[arg-type]


def check_generator(generator: object) -> torch.Generator | None:
    """``None`` or a :class:`torch.Generator`."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise DynamicsError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return generator


def check_block_kwargs(m: BlockMap, block_kwargs: object) -> None:
    """``None``, or a dict block key (``"dst<-src"``) -> dict of keyword arguments that
    the block's ``forward`` takes (with the block's sources before them: checked by
    binding them to its signature, unless the block has hooks, which may change the call).
    """
    if block_kwargs is None:
        return
    if not isinstance(block_kwargs, Mapping):
        raise DynamicsError(
            "block_kwargs must be a dict block key ('dst<-src') -> dict of keyword arguments, "
            f"got {type(block_kwargs).__name__}"
        )
    edges = {block_key(d, s): (d, s) for d, s in m.edges}
    for key, kwargs in block_kwargs.items():
        if key not in edges:
            raise DynamicsError(f"block_kwargs names unknown block {key!r}; blocks are {list(edges)}")
        d, s = edges[key]
        if not isinstance(kwargs, Mapping):
            raise DynamicsError(
                f"block_kwargs[{key!r}] must be a dict of keyword arguments for block {d!r} <- "
                f"{s!r}, got {type(kwargs).__name__}"
            )
        block = m.block(d, s)
        if block._forward_hooks or block._forward_pre_hooks:
            continue
        try:
            signature = inspect.signature(block.forward)
        except (TypeError, ValueError):  # no signature to read (a compiled forward)
            continue
        try:
            signature.bind(*source_slots(s), **kwargs)
        except TypeError as exc:
            raise DynamicsError(
                f"block_kwargs[{key!r}]: block {d!r} <- {s!r} ({type(block).__name__}) does not "
                f"take them: {exc}"
            ) from None


# ---------------------------------------------------------------------------- states
def shape_text(shape: tuple[int, ...], batch: tuple[int | str, ...] = ()) -> str:
    """A tensor shape as text, ``(3, 8, 8)`` or with batch dims first ``(*batch, 3, 8, 8)``."""
    dims = [*map(str, batch), *map(str, shape)]
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


def slot_zeros(m: BlockMap, slot: str, batch: tuple[int, ...], ref: Tensor) -> Tensor:
    """Zeros of slot ``slot``: ``(*batch, *shape)`` in ``ref``'s dtype and device."""
    return ref.new_zeros(*batch, *m.shapes[slot])


def check_finite(slot: str, value: Tensor, what: str = "slot {!r} of the state") -> None:
    """NaN or inf in ``value`` is an error naming the slot (``what`` formats it)."""
    if bool(torch.isfinite(value).all()):  # one pass in the usual case
        return
    if torch.isnan(value).any():
        raise DynamicsError(f"{what.format(slot)} contains NaN")
    if torch.isinf(value).any():
        raise DynamicsError(f"{what.format(slot)} contains inf")


def check_state(
    m: BlockMap, state: object, hold: tuple[str, ...], frozen: Collection[str] = ()
) -> tuple[dict[str, Tensor], tuple[int, ...]]:
    """Validate ``state``; return the full state (free slots filled with zeros) and batch.

    ``frozen`` are slots that get their values elsewhere (forced slots): they are
    neither required nor filled.
    """
    if not isinstance(state, Mapping):
        raise DynamicsError(f"state must be a dict slot -> tensor, got {type(state).__name__}")
    for s, v in state.items():
        if s not in m.slots:
            raise DynamicsError(f"state names unknown slot {s!r}; slots are {list(m.slots)}")
        if not isinstance(v, Tensor) or not v.is_floating_point():
            got = v.dtype if isinstance(v, Tensor) else type(v).__name__
            raise DynamicsError(f"slot {s!r} of the state must be a floating tensor, got {got}")
        check_finite(s, v)
    try:
        batch, _, _ = _engine_check_state(m, state)
    except (TypeError, ValueError) as exc:
        raise DynamicsError(str(exc)) from exc
    for s in hold:
        if s not in state:
            raise DynamicsError(f"held slot {s!r} needs a value in state")
    if batch is None:
        raise DynamicsError("state is empty: give at least one slot (it sets the batch shape)")
    ref = next(iter(state.values()))
    full = {
        s: state[s] if s in state else slot_zeros(m, s, batch, ref)
        for s in m.slots
        if s in state or s not in frozen
    }
    return full, batch


def check_force(
    m: BlockMap,
    force: object,
    hold: tuple[str, ...],
    *,
    length: int | None = None,
    batch: tuple[int, ...] = (),
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
) -> dict[str, Tensor]:
    """Forced slots ``slot -> (T, *batch, *shape)`` (``None``: none), as in
    :func:`iternn.iterate`.

    Every slot must be a slot of ``m``, not held, its sequence finite. With ``length``
    the sequences must also be floating tensors of shape ``(length, *batch, *shape)`` in
    ``dtype`` on ``device`` (without it, :func:`iternn.iterate` checks their shapes).
    """
    if force is None:
        return {}
    if not isinstance(force, Mapping):
        raise DynamicsError(f"force must be a dict slot -> sequence, got {type(force).__name__}")
    out = {}
    for s, seq in force.items():
        if not isinstance(s, str) or s not in m.slots:
            raise DynamicsError(f"force names unknown slot {s!r}; slots are {list(m.slots)}")
        if s in hold:
            raise DynamicsError(f"slot {s!r} cannot be both held and forced")
        if length is not None:
            if not isinstance(seq, Tensor) or not seq.is_floating_point():
                raise DynamicsError(f"forced slot {s!r} must be a floating tensor")
            want = (length, *batch, *m.shapes[s])
            if tuple(seq.shape) != want:
                raise DynamicsError(
                    f"forced slot {s!r} needs shape {want} (time first: warmup + steps "
                    f"entries, then the batch shape {tuple(batch)}, then the slot's shape "
                    f"{shape_text(m.shapes[s])}), got {tuple(seq.shape)}"
                )
            if seq.dtype != dtype or seq.device != device:
                raise DynamicsError(
                    f"forced slot {s!r} is {seq.dtype} on {seq.device}, "
                    f"the state is {dtype} on {device}"
                )
        if isinstance(seq, Tensor) and seq.is_floating_point():
            check_finite(s, seq, "forced slot {!r}")
        out[s] = seq
    return out


def check_start(z0: object) -> Tensor:
    """A solver's starting point: a finite floating tensor ``(*batch, n)``, ``n >= 1``."""
    if not isinstance(z0, Tensor):
        raise MapTypeError(f"z0 must be a tensor, got {type(z0).__name__}")
    if not z0.is_floating_point():
        raise MapTypeError(f"z0 must be floating point, got {z0.dtype}")
    if z0.dim() < 1 or z0.shape[-1] == 0:
        raise DynamicsError(f"z0 must have shape (*batch, n) with n >= 1, got {tuple(z0.shape)}")
    if z0.numel() and not torch.isfinite(z0).all():
        raise DynamicsError("z0 contains NaN or infinite values")
    return z0


# ---------------------------------------------------------------------------- finite maps
def _bad(t: Tensor) -> str | None:
    """``"NaN"``/``"inf"`` when a floating tensor holds one, else ``None``."""
    if not (t.is_floating_point() or t.is_complex()) or not t.numel():
        return None
    if t.is_sparse:
        t = t.coalesce().values()
    elif t.layout != torch.strided:  # compressed sparse layouts
        t = t.values()
    if torch.isnan(t).any():
        return "NaN"
    if torch.isinf(t).any():
        return "inf"
    return None


def _tensors(module: nn.Module):
    yield from module.named_parameters()
    yield from module.named_buffers()


def check_map_finite(m: BlockMap) -> None:
    """Every weight, bias and buffer of ``m`` is finite, else a :class:`DynamicsError`
    naming the block ``dst <- src`` (or the slot's bias or activation) and the tensor."""
    for d, s in m.edges:
        for name, t in _tensors(m.block(d, s)):
            bad = _bad(t)
            if bad:
                raise DynamicsError(
                    f"block {d!r} <- {s!r} holds {bad} in {name!r}: the map's weights must be "
                    "finite for its dynamics to be analysed"
                )
    for d in m.slots:
        bias = m.bias(d)
        if isinstance(bias, Tensor) and _bad(bias):
            raise DynamicsError(f"the bias of slot {d!r} holds {_bad(bias)}")
        act = m.activation(d)
        if isinstance(act, nn.Module):
            for name, t in _tensors(act):
                bad = _bad(t)
                if bad:
                    raise DynamicsError(f"the activation of slot {d!r} holds {bad} in {name!r}")


def _unit(index: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The position in a slot of ``shape`` of its flattened (row-major) unit ``index``."""
    pos = []
    for d in reversed(shape):
        index, r = divmod(index, d)
        pos.append(r)
    return tuple(reversed(pos))


def check_matrix_finite(
    matrix: Tensor,
    what: str,
    slots: tuple[str, ...] = (),
    sizes: tuple[int, ...] = (),
    shapes: tuple[tuple[int, ...], ...] = (),
) -> None:
    """A matrix (``(*batch, N, N)``) about to go to ``torch.linalg`` must be finite.

    With the free ``slots`` and their ``sizes`` (the packing of the rows and columns),
    the message names the slots of the first non-finite entry: row = destination slot,
    column = source slot; with their ``shapes`` too, the units within shaped slots
    (``'h'[1, 0, 2]``: channel 1, row 0, column 2 of a ``(C, H, W)`` slot).
    """
    if matrix.layout != torch.strided:
        matrix = matrix.to_dense()
    bad = ~torch.isfinite(matrix)
    if not bool(bad.any()):
        return
    kind = "NaN" if bool(torch.isnan(matrix).any()) else "inf"
    where = ""
    if slots:
        row, col = (int(i) for i in torch.nonzero(bad.reshape(-1, *matrix.shape[-2:]).any(0))[0])
        bounds, off = [], 0
        for i, (s, n) in enumerate(zip(slots, sizes)):
            bounds.append((s, off, off + n, shapes[i] if i < len(shapes) else (n,)))
            off += n
        dst, r0, _, dshape = next(b for b in bounds if b[1] <= row < b[2])
        src, c0, _, sshape = next(b for b in bounds if b[1] <= col < b[2])
        units = ""
        if len(dshape) > 1 or len(sshape) > 1:
            units = (f", row {dst!r}{list(_unit(row - r0, dshape))}, column "
                     f"{src!r}{list(_unit(col - c0, sshape))}")
        where = f" (first at the block {dst!r} <- {src!r}{units})"
    raise DynamicsError(f"{what} holds {kind}{where}; nothing was computed from it")
