"""Impulse response of an iterated block map: structural and empirical (paper §4.3.1).

*Structural*: :meth:`BlockMap.impulse_response_length` reads from the block graph how
long a perturbation can last: the longest block path for an acyclic (nilpotent) map,
``math.inf`` with a cycle or when a held slot feeds a block (the identity block on
``x``, eq. 50: infinite impulse response, eq. 54).

*Empirical*: :func:`impulse_response` perturbs the initial state of some slots (free
slots, or a held input slot), iterates, and reports the size of the response
``δz_t = z_t(perturbed) − z_t(base)`` after every application ``t = 0 … steps``. In the
default ``mode="linear"`` the response is the exact linearised one, ``δz_t = (∂z_t/∂z_0)
δz_0``, computed by forward-mode autograd (``torch.func.jvp``) through
:func:`iternn.iterate`: a response that does not depend on the perturbation is exactly
zero, bit for bit, so for a nilpotent map the response is exactly ``0.0`` after the
structural length. ``mode="difference"`` iterates the perturbed and the base state and
subtracts (the finite, non-linear response; past the structural length both runs
compute the same numbers, so it is zero as well up to floating-point determinism).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ..core.block_map import BlockMap
from ..engine.iterate import iterate
from ..errors import DynamicsError
from .validate import (
    as_block_map,
    check_block_kwargs,
    check_finite,
    check_force,
    check_generator,
    check_hold,
    check_int,
    check_positive,
    check_state,
    check_update,
    shape_text,
    slot_zeros,
)

__all__ = ["impulse_response", "ImpulseResponse", "IMPULSE_MODES"]

#: ``mode=`` values of :func:`impulse_response`.
IMPULSE_MODES = ("linear", "difference")


@dataclass(frozen=True)
class ImpulseResponse:
    """The response to a perturbation of the initial state, per application.

    Attributes:
        norm: ``(steps + 1,)`` float64; ``norm[t]`` is the Euclidean norm of the response
            over the *free* slots (those the iteration updates) and every batch element,
            after ``t`` applications. ``norm[0]`` is the perturbation itself on the free
            slots (``0`` when only a held input slot is perturbed).
        per_slot: ``slot -> (steps + 1,)`` float64, the same norm for each slot, held
            slots included (a perturbed held slot keeps its perturbation forever).
        response: ``slot -> (steps + 1, *batch, *shape)``, the response ``δz_t`` itself
            (each slot in its own shape).
        structural_length: ``m.impulse_response_length(hold)``: an int, or
            ``math.inf``. It describes the Jacobi update (an ``"ordered"`` sweep can
            forget sooner) and ignores ``force`` (an upper bound then). For a
            nilpotent map perturbed at its initial state, ``norm[t]`` is exactly zero
            for every ``t > structural_length``.
        perturbed: the perturbed slots.
        hold: the held slots.
        mode: ``"linear"`` or ``"difference"``.
        eps: size of the perturbation.
    """

    norm: Tensor
    per_slot: dict[str, Tensor]
    response: dict[str, Tensor]
    structural_length: float
    perturbed: tuple[str, ...]
    hold: tuple[str, ...]
    mode: str
    eps: float

    @property
    def steps(self) -> int:
        """Applications made."""
        return self.norm.shape[0] - 1

    @property
    def last_nonzero(self) -> int | None:
        """The last application ``t`` with a non-zero response (``None`` if none).

        For a nilpotent map perturbed at its initial state this equals the structural
        length once ``steps`` exceeds it.
        """
        nz = torch.nonzero(self.norm).flatten()
        return int(nz[-1]) if nz.numel() else None

    @property
    def vanished(self) -> bool:
        """Whether the response is exactly zero after the last application."""
        return bool(self.norm[-1] == 0)


def _norm(x: Tensor) -> Tensor:
    """Euclidean norm over every dim but the first, in float64, without underflow.

    Scaled by the largest entry, so it is ``0`` exactly when every entry is ``0``.
    """
    x = x.detach().to(torch.float64).reshape(x.shape[0], -1)
    scale = x.abs().amax(dim=1, keepdim=True) if x.shape[1] else x.new_zeros(x.shape[0], 1)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (torch.linalg.vector_norm(x / safe, dim=1) * scale.squeeze(1))


def _perturbed_slots(
    m: BlockMap, slot: object, direction: object, hold: tuple[str, ...], forced: Collection[str]
) -> tuple[str, ...]:
    if direction is not None and not isinstance(direction, Mapping):
        raise DynamicsError(
            f"direction must be a dict slot -> tensor, got {type(direction).__name__}"
        )
    if slot is None:
        if direction is not None:
            names = tuple(s for s in m.slots if s in direction)
            unknown = [s for s in direction if s not in m.slots]
            if unknown:
                raise DynamicsError(
                    f"direction names unknown slot {unknown[0]!r}; slots are {list(m.slots)}"
                )
        else:
            names = tuple(s for s in m.slots if s not in hold and s not in forced)
            if not names:
                raise DynamicsError(
                    "every slot is held or forced: name the slot to perturb with slot=..."
                )
    else:
        names = check_hold(m, slot, "slot")
        if not names:
            raise DynamicsError("slot names no slot to perturb")
        if direction is not None and set(direction) != set(names):
            raise DynamicsError(
                f"direction has slots {sorted(direction)} but slot= names {sorted(names)}"
            )
    for s in names:
        if s in forced:
            raise DynamicsError(
                f"slot {s!r} is forced: its value comes from force, it cannot be perturbed"
            )
    return names


def _direction(
    m: BlockMap, names: tuple[str, ...], direction: Mapping | None, batch, ref: Tensor,
    generator: torch.Generator | None,
) -> dict[str, Tensor]:
    """Unit-norm (per batch element) random direction, or the given one checked.

    Each slot's direction has the slot's shape: ``(*shape)`` (shared by the batch) or
    ``(*batch, *shape)``.
    """
    if direction is not None:
        out = {}
        for s in names:
            v = direction[s]
            shape = m.shapes[s]
            if not isinstance(v, Tensor) or not v.is_floating_point():
                raise DynamicsError(f"direction of slot {s!r} must be a floating tensor")
            if tuple(v.shape) not in (shape, (*batch, *shape)):
                raise DynamicsError(
                    f"direction of slot {s!r} must have the slot's shape {shape_text(shape)} "
                    f"or {shape_text(shape, batch)}, got {tuple(v.shape)}"
                )
            check_finite(s, v, "direction of slot {!r}")
            out[s] = v.to(dtype=ref.dtype, device=ref.device).expand(*batch, *shape)
        if all(bool((v == 0).all()) for v in out.values()):
            raise DynamicsError("direction is zero: there is nothing to perturb")
        return out
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    # Drawn flat per slot (row-major), so a slot's draws do not depend on its shape.
    draws = {
        s: torch.randn(*batch, m.slots[s], generator=gen, dtype=torch.float64, device=gen.device)
        for s in names
    }
    total = torch.sqrt(sum((v**2).sum(-1, keepdim=True) for v in draws.values()))
    return {
        s: (v / total).reshape(*batch, *m.shapes[s]).to(dtype=ref.dtype, device=ref.device)
        for s, v in draws.items()
    }


def impulse_response(
    m: BlockMap,
    state: Mapping[str, Tensor],
    /,
    *,
    steps: int,
    slot: str | Collection[str] | None = None,
    hold: Collection[str] = (),
    eps: float = 1e-6,
    mode: str = "linear",
    direction: Mapping[str, Tensor] | None = None,
    generator: torch.Generator | None = None,
    force: Mapping[str, Tensor] | None = None,
    update: str = "jacobi",
    block_kwargs: Mapping[str, Mapping] | None = None,
) -> ImpulseResponse:
    """Perturb the initial state and measure the response after every application.

    Args:
        m: the block map (or a :class:`~iternn.MapModule`).
        state: the base initial state (missing slots start at zero) with the values of
            held slots; ``(*batch, *shape)`` per slot (no batch dims: ``(*shape)``).
        steps: applications (``>= 1``); the result has ``steps + 1`` entries,
            ``t = 0 … steps``.
        slot: the slot(s) to perturb; default every free slot. A held slot (an input)
            may be perturbed: its perturbation is then re-injected at every
            application.
        hold: slots kept at their value (see :func:`iternn.iterate`).
        eps: size of the perturbation: ``δz_0 = eps · direction``.
        mode: ``"linear"`` (exact linearised response by forward-mode autograd;
            exactly zero where the state does not depend on the perturbation; a block
            that forward mode cannot go through raises :class:`DynamicsError`) or
            ``"difference"`` (iterate both states and subtract).
        direction: ``slot -> tensor`` (the slot's shape, or ``(*batch, *shape)``): the
            perturbation direction (not normalised). Its slots are the perturbed ones.
            Default: a random direction of unit norm per batch element (over every
            perturbed unit), drawn from ``generator`` (default: a generator seeded 0,
            so results are deterministic).
        force: forced slots, as in :func:`iternn.iterate` (same forcing in both runs;
            forced slots cannot be perturbed).
        update, block_kwargs: as in :func:`iternn.iterate`.

    Returns:
        :class:`ImpulseResponse`.
    """
    bm = as_block_map(m)
    steps = check_int(steps, "steps", 1)
    eps = check_positive(eps, "eps")
    if mode not in IMPULSE_MODES:
        raise DynamicsError(f"mode must be one of {IMPULSE_MODES}, got {mode!r}")
    hold = check_hold(bm, hold)
    update = check_update(update)
    check_generator(generator)
    check_block_kwargs(bm, block_kwargs)
    forced = check_force(bm, force, hold)
    forced_names = tuple(forced)
    full, batch = check_state(bm, state, hold, frozen=forced_names)
    names = _perturbed_slots(bm, slot, direction, hold, forced_names)
    ref = next(iter(full.values()))
    unit = _direction(bm, names, direction, batch, ref, generator)
    delta = {s: eps * unit[s] for s in names}
    base = {s: v.detach() for s, v in full.items()}

    def run(*values: Tensor) -> dict[str, Tensor]:
        start = {**base, **dict(zip(names, values))}
        return iterate(bm, start, steps, hold=hold, force=forced or None, trajectory=True,
                       update=update, block_kwargs=block_kwargs)

    try:
        if mode == "linear":
            # Grad mode on: the engine's no-grad inference paths write with out=/in-place
            # kernels that forward-mode AD does not support.
            try:
                with torch.enable_grad():
                    _, moved = torch.func.jvp(
                        run, tuple(base[s] for s in names), tuple(delta[s] for s in names)
                    )
            except (RuntimeError, NotImplementedError) as exc:
                raise DynamicsError(
                    "mode='linear' needs forward-mode autograd through every block, and "
                    f"this map has one that does not support it ({exc}); use "
                    "mode='difference'"
                ) from exc
            moved = {s: v.detach() for s, v in moved.items()}
        else:
            with torch.no_grad():
                b = run(*(base[s] for s in names))
                p = run(*(base[s] + delta[s] for s in names))
            moved = {s: p[s] - b[s] for s in bm.slots}
    except (TypeError, ValueError) as exc:  # iterate's own checks (force shapes, kwargs)
        if isinstance(exc, DynamicsError):
            raise
        raise DynamicsError(str(exc)) from exc

    response: dict[str, Tensor] = {}
    for s in bm.slots:
        first = delta[s] if s in delta else slot_zeros(bm, s, batch, ref)
        if s in forced_names:
            first = slot_zeros(bm, s, batch, ref)
        response[s] = torch.cat([first.unsqueeze(0), moved[s].detach()], dim=0)
    per_slot = {s: _norm(r) for s, r in response.items()}
    frozen = set(hold) | set(forced_names)
    free = [s for s in bm.slots if s not in frozen]
    if free:
        norm = _norm(torch.cat([response[s].reshape(steps + 1, -1) for s in free], dim=1))
    else:
        norm = torch.zeros(steps + 1, dtype=torch.float64, device=ref.device)
    structural = bm.impulse_response_length(hold)
    return ImpulseResponse(
        norm=norm,
        per_slot=per_slot,
        response=response,
        structural_length=structural if math.isinf(structural) else int(structural),
        perturbed=names,
        hold=hold,
        mode=mode,
        eps=eps,
    )
