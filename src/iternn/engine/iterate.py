"""``iterate``: apply a block map many times, with held and forced slots."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping

import torch
from torch import Tensor

from ..core import memory
from ..core.block_map import BlockMap
from ..core.state import batch_of, check_state, check_tensor, shape_text
from ..errors import MapError, MapTypeError
from .plan import keeps_zero, product_kernels
from .sequence import SequencePlan
from .step import StepPlan
from .wavefront import Wavefront

__all__ = ["iterate", "UPDATES", "wavefront_plan", "sequence_plan", "step_plan"]

UPDATES = ("jacobi", "ordered")

#: The key of ``BlockMap._plans`` under which the blocks that mapped zero to zero when
#: the cached plans were built are kept (the plans skip them while they read zeros).
_ZERO_BLOCKS = "blocks keeping zero"


def _plan(m: BlockMap, kind: str, frozen: frozenset[str], update: str, *,
          forced: frozenset[str] = frozenset(), zero: frozenset[str] = frozenset(),
          outputs: frozenset[str] | None = None):
    """The cached plan of ``kind`` for these frozen (and, of them, ``forced``) slots,
    the slots ``zero`` left out of the state and the slots ``outputs`` returned (a
    sequence plan's); rebuilt after any change of the map or of the product kernels, and
    after a block the plans skip while it reads zeros stops mapping zero to zero (a bias
    or a hook given to it later)."""
    plans = m._plans
    assumed = plans.get(_ZERO_BLOCKS)
    if assumed is not None and not all(keeps_zero(b) for b in assumed):
        plans.clear()
        assumed = None
    if assumed is None:  # no plan is cached: the plans built from now on assume these
        plans[_ZERO_BLOCKS] = tuple(b for b in m.blocks.values() if keeps_zero(b))
    key = (kind, frozen, update, forced, zero, outputs, product_kernels())
    plan = plans.get(key)
    if plan is None:
        if kind == "wave":
            levels = m.graph().levels(frozen)
            if levels is None:
                plan = False
            else:
                depth = max(levels.values(), default=0)
                if update == "ordered":  # one sweep in level order finishes everything
                    depth = min(depth, 1)
                plan = Wavefront(m, frozen, depth, zero)
        elif kind == "seq":
            plan = SequencePlan(m, frozen, update, forced=forced, zero=zero, outputs=outputs)
        else:
            plan = StepPlan(m, frozen, update)
        m._plans[key] = plan
    return plan


def wavefront_plan(m: BlockMap, *, frozen: frozenset[str] = frozenset(),
                   update: str = "jacobi") -> Wavefront | None:
    """The map's cached :class:`~iternn.engine.wavefront.Wavefront` with the slots ``frozen``
    held: each block runs once, at the level of its destination row. ``None`` when the
    graph left after freezing has a cycle (no wavefront exists)."""
    return _plan(m, "wave", frozenset(frozen), update) or None


def sequence_plan(m: BlockMap, *, frozen: frozenset[str] = frozenset(),
                  update: str = "jacobi", forced: frozenset[str] = frozenset(),
                  zero: frozenset[str] = frozenset(),
                  outputs: frozenset[str] | None = None) -> SequencePlan:
    """The map's cached :class:`~iternn.engine.sequence.SequencePlan`: the plan of a forced
    iteration (row-wise blocks outside a cycle batched over the whole sequence) with the
    slots ``forced`` (of ``frozen``) forced, the slots ``zero`` left out of the initial
    state and the trajectories of ``outputs`` (``None``: every slot) returned."""
    return _plan(m, "seq", frozenset(frozen), update, forced=frozenset(forced),
                 zero=frozenset(zero), outputs=None if outputs is None else frozenset(outputs))


def step_plan(m: BlockMap, *, frozen: frozenset[str] = frozenset(),
              update: str = "jacobi") -> StepPlan:
    """The map's cached :class:`~iternn.engine.step.StepPlan`: one application of the map
    (Jacobi, or ordered over strongly connected components) with ``frozen`` slots held."""
    return _plan(m, "step", frozenset(frozen), update)


def _check_slots(m: BlockMap, names: object, role: str) -> frozenset[str]:
    if isinstance(names, str):
        names = (names,)
    if not isinstance(names, Collection):
        raise MapTypeError(f"{role} must be a collection of slot names, got {type(names).__name__}")
    for s in names:
        if not isinstance(s, str):
            raise MapTypeError(f"{role} must name slots by str, got {type(s).__name__} {s!r}")
        if s not in m.slots:
            raise MapError(f"{role} names unknown slot {s!r}; slots are {list(m.slots)}")
    return frozenset(names)


def _check_memory(
    m: BlockMap,
    missing: set[str],
    batch: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    *,
    steps: int,
    frozen: frozenset[str],
    sequence: bool,
) -> None:
    """Refuse, before anything is allocated, an iteration this machine cannot hold.

    What an iteration allocates is known in advance: the zeros of the ``missing`` slots
    (left out of the state) and a new value of every slot it computes (not frozen),
    ``batch x n_s`` entries each; and, when the whole sequence is kept (``sequence``: a
    trajectory, or a forced iteration whose plan runs over all steps at once),
    ``steps x batch x n_s`` entries of every computed slot. (The messages are built
    only for sizes :func:`check_bytes` checks at all.)
    """
    row_bytes = math.prod(batch) * dtype.itemsize
    # Cheap bound first (every slot new, every step kept): the usual small iteration
    # returns here without looking at the slots one by one.
    if row_bytes * m.size * (steps if sequence and steps > 1 else 1) < memory.ALWAYS_AVAILABLE:
        return
    slots = m.slots
    computed = [s for s in slots if s not in frozen] if steps else []
    new = [s for s in slots if s in missing or (steps and s not in frozen)]
    n_computed = sum(slots[s] for s in computed)
    state_bytes = row_bytes * sum(slots[s] for s in new)
    seq_bytes = steps * row_bytes * n_computed if sequence else 0
    if max(state_bytes, seq_bytes) < memory.ALWAYS_AVAILABLE:
        return
    if new:
        big = max(new, key=slots.__getitem__)
        others = f" and {len(new) - 1} other slot(s)" if len(new) > 1 else ""
        memory.check_bytes(
            state_bytes,
            f"the state: slot {big!r} (shape {shape_text(batch, m.shapes[big])}){others}, "
            f"{dtype},",
            device=device,
        )
    if seq_bytes:
        memory.check_bytes(
            seq_bytes,
            f"steps={steps} kept as a sequence (trajectory, or forcing) of the computed "
            f"slot(s) {computed[:3]}{' ...' if len(computed) > 3 else ''}: shape "
            f"{shape_text((steps, *batch), (n_computed,))} (flattened), {dtype},",
            device=device,
        )


def iterate(
    m: BlockMap,
    state: Mapping[str, Tensor],
    steps: int,
    *,
    hold: Collection[str] = (),
    force: Mapping[str, Tensor] | None = None,
    inner: int = 1,
    trajectory: bool = False,
    update: str = "jacobi",
    block_kwargs: Mapping[str, Mapping] | None = None,
    outputs: Collection[str] | None = None,
) -> dict[str, Tensor]:
    """Apply ``m`` to ``state`` ``steps`` times.

    Args:
        m: the block map.
        state: initial vector ``z0`` as a dict ``slot -> (*batch, *shape)``. Slots left
            out start at zero (for an MLP map, only ``x`` matters); a held slot left out
            stays zero. Zeros cost nothing: blocks that read only zero slots and map
            zero to zero are not evaluated (see :mod:`iternn.engine.plan`).
        steps: number of applications; with ``force``, the number of forcing steps
            (each made of ``inner`` applications).
        hold: slots that keep their initial value. This is the effect of the paper's
            identity block on ``x`` (eq. 50) as an option of the iteration: the blocks
            writing into a held slot are not evaluated and the map itself stays as it is.
        force: ``slot -> (steps, *batch, *shape)`` sequences, time first. Before forcing
            step ``t`` the slot is overwritten with ``force[slot][t]`` (eq. 11) and it
            keeps that value through the step's applications.
        inner: applications per forcing step (``K``); needs ``force``.
        trajectory: return every state instead of the last one: ``slot -> (T, *batch,
            *shape)`` with ``T = steps``, the state after each application (after each
            forcing step when ``inner > 1``).
        update: ``"jacobi"`` (the paper's map: every block reads the previous state) or
            ``"ordered"``: a Gauss–Seidel sweep, slots updated one at a time, each
            reading the newest value of every slot; strongly connected components in
            dependency order and, inside a cycle, slots in slot order. An acyclic map
            reaches its fixed point in one ordered application, and a recurrent cell
            whose stages are declared in order (an LSTM's gates, cell and output)
            computes one time step per application.
        block_kwargs: ``"dst<-src" -> kwargs`` passed to that block at every call (e.g.
            attention masks).
        outputs: the slots to return (a collection of slot names; ``None``: every
            slot). Only what they depend on is computed: application ``T`` computes the
            outputs, application ``T - 1`` the slots that application ``T`` reads, and
            so on backwards (in an ordered sweep, a slot read later in the same sweep
            is computed before its reader); a forced iteration skips the components of
            the map that no output depends on; a trajectory holds the outputs at every
            step. (An acyclic map iterated at least its depth is evaluated whole, each
            slot once, and only the outputs are kept.) Skipped blocks are not called,
            so their side effects (random draws, running statistics) do not happen.

    Returns:
        The final state (every slot, or the ``outputs``), or the trajectory.

    Raises:
        MapError: (a ``ValueError``) an unknown slot (in ``hold``, ``force`` or
            ``outputs``), a tensor of the wrong shape, a bad option value (the message
            names the slot or option).
        MapTypeError: (a ``TypeError``) an argument of the wrong type or dtype.
        SizeError: (a ``MemoryError``) the state it builds (zeros of the slots left out
            of ``state``, a new value of every computed slot), or the ``steps x batch``
            sequence a trajectory or a forced run keeps, would not fit in the memory
            available; checked before anything is allocated.

    The schedule is chosen by structure (see :mod:`iternn.engine.plan`) and gives the
    same result as applying ``m`` step by step: acyclic maps iterated at least their
    depth are evaluated as a wavefront, each block once; forced maps evaluate blocks
    fed from outside a cycle in one batched call over the whole sequence.
    """
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise MapTypeError(f"steps must be an int, got {type(steps).__name__}")
    if steps < 0:
        raise MapError(f"steps must be >= 0, got {steps}")
    if isinstance(inner, bool) or not isinstance(inner, int):
        raise MapTypeError(f"inner must be an int, got {type(inner).__name__}")
    if inner < 1:
        raise MapError(f"inner must be an int >= 1, got {inner!r}")
    if update not in UPDATES:
        raise MapError(f"update must be one of {UPDATES}, got {update!r}")
    if inner > 1 and not force:
        raise MapError("inner applications need forced slots (force=...)")
    if block_kwargs is not None:
        unknown = [k for k in block_kwargs if k not in m.blocks]
        if unknown:
            raise MapError(f"block_kwargs names unknown block(s) {unknown}")
    held = _check_slots(m, hold, "hold")
    wanted = None if outputs is None else _check_slots(m, outputs, "outputs")
    batch, dtype, device = check_state(m, state)
    forced: dict[str, Tensor] = {}
    if force is not None:
        if not isinstance(force, Mapping):
            raise MapTypeError(f"force must be a dict slot -> sequence, got {type(force).__name__}")
        both = held & set(force)
        if both:
            raise MapError(f"slot(s) {sorted(both)} cannot be both held and forced")
        for slot, seq in force.items():
            _check_slots(m, (slot,), "force")
            check_tensor(m, slot, seq, "forced slot")
            seq_batch = batch_of(m, slot, seq)
            if not seq_batch or seq.shape[0] != steps:
                raise MapError(
                    f"forced slot {slot!r} needs a sequence of shape "
                    f"{shape_text((steps, '*batch'), m.shapes[slot])} (time first, one entry "
                    f"per step), got {tuple(seq.shape)}"
                )
            seq_batch = seq_batch[1:]
            if batch is None:
                batch, dtype, device = seq_batch, seq.dtype, seq.device
                check_state(m, {}, batch=batch, dtype=dtype, device=device)
            if seq_batch != batch:
                raise MapError(
                    f"forced slot {slot!r} has batch shape {seq_batch}, the state has {batch}"
                )
            if seq.dtype != dtype:
                raise MapTypeError(f"forced slot {slot!r} has dtype {seq.dtype}, the state has {dtype}")
            if seq.device != device:
                raise MapError(f"forced slot {slot!r} is on {seq.device}, the state is on {device}")
            forced[slot] = seq
    if batch is None:
        raise MapError("state is empty: give at least one slot (it sets the batch shape)")
    frozen = held | frozenset(forced)
    sequence = steps > 0 and (trajectory or (bool(forced) and inner == 1))
    # Slots left out start at zero (made only where something reads them).
    zero = frozenset(s for s in m.slots if s not in state and s not in forced)
    wave = None
    if steps > 0 and not (forced or trajectory):
        wave = _plan(m, "wave", frozen, update, zero=zero & frozen)
        if not (wave and steps >= wave.depth):
            wave = None
    # A wavefront computes every slot that is not frozen before reading it, so only its
    # frozen ones may need zeros.
    missing = {s for s in zero if wave is None or s in frozen}
    _check_memory(m, missing, batch, dtype, device, steps=steps, frozen=frozen, sequence=sequence)
    ref = next(iter(forced.values())) if forced else next(iter(state.values()))
    given = dict(state)
    names = tuple(s for s in m.slots if wanted is None or s in wanted)

    if wave is not None:
        out = wave(given, block_kwargs, ref, batch, keep=wanted)
        return {s: out[s] for s in names}
    if steps == 0:
        if trajectory:
            return {s: ref.new_empty(0, *batch, *m.shapes[s]) for s in names}
        return {s: given[s] if s in given else ref.new_zeros(*batch, *m.shapes[s]) for s in names}
    if (forced or trajectory) and inner == 1:
        plan = _plan(m, "seq", frozen, update, forced=frozenset(forced), zero=zero, outputs=wanted)
        traj = plan(given, forced, block_kwargs, ref, batch, steps)
        if trajectory:
            return traj
        return {s: traj[s][-1] for s in names}
    step = _plan(m, "step", frozen, update)
    return step.run(given, block_kwargs, ref, batch, steps=steps, zero=zero, outputs=names,
                    forced=forced, inner=inner, trajectory=trajectory)


def depth(m: BlockMap, hold: Collection[str] = (), update: str = "jacobi") -> float:
    """Applications after which iterating ``m`` (with ``hold``) changes nothing more.

    The wavefront depth for acyclic structure; ``math.inf`` with a cycle.
    """
    wave = _plan(m, "wave", _check_slots(m, hold, "hold"), update)
    return wave.depth if wave else math.inf
