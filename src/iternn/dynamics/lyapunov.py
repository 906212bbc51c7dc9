"""Lyapunov exponents of an iterated block map (the QR method).

Along the trajectory ``z_{t+1} = G_t(z_t)`` (one application on the free slots, held
slots fixed, forced slots overwritten with their next value before each application),
an orthonormal tangent basis ``Q`` (``N × k``) is pushed forward by the Jacobian,
``J(z_t) Q_t = Q_{t+1} R_t`` (QR), and the exponents are the time averages

    λ_i = (1 / steps) · Σ_t log |R_t[i, i]|.

Units: natural log per application (per forcing step with ``force``). The trajectory
is computed by :func:`iternn.iterate` in chunks. For small maps (``N <= 64`` free dims,
or ``k >= N/4``) the exact Jacobians of a whole chunk are formed at once
(:func:`~iternn.dynamics.jacobian.jacobian`'s structured or forward-mode path, time as
a batch dim) and ``J Q`` is a matrix product; otherwise ``J Q`` is ``k``
Jacobian-vector products per application and no Jacobian is formed. The QR
factorisations and the averages are in float64 whatever the map's dtype (the map itself
runs in its own dtype: pass ``m.double()`` and a float64 state for a float64
trajectory).

With ``positions=True`` the state is a whole sequence (as in
:func:`~iternn.dynamics.jacobian.jacobian`): the tangent space is the free slots at
every position, ``N = T · n_free``, so a perturbation can move between positions
through the map's attention; one spectrum per sequence. Without it a map whose blocks
into the free slots are known to mix positions is refused (see
:func:`~iternn.dynamics.jacobian.jacobian`).

When the free slots form no cycle (an MLP-like map with its input held) every product
of ``p + 1`` Jacobians is exactly zero (``p`` the longest block path among the free
slots), so with ``steps >= p + 1`` every exponent is exactly ``-inf``; this is read
from the structure and returned without iterating.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping

import torch
from torch import Tensor

from ..core.block_map import BlockMap
from ..core.graph import BlockGraph
from ..core.memory import check_bytes
from ..engine.iterate import iterate
from ..errors import DynamicsError
from .functional import WHOLE_SEQUENCES, MapFunction, pack_slots, positions_of, refuse_mixing
from .jacobian import _autograd_jacobian, _jacobian_at, check_positions
from .validate import (
    as_block_map,
    check_block_kwargs,
    check_force,
    check_generator,
    check_hold,
    check_int,
    check_map_finite,
    check_matrix_finite,
    check_state,
    check_update,
)

__all__ = ["lyapunov_spectrum", "largest_lyapunov"]

#: Free dims up to which whole Jacobians are formed (else ``k`` JVPs per application).
_DENSE_N = 64
#: Entries of the Jacobians held at once (float64): chunks of the trajectory.
_DENSE_BUDGET = 1 << 22


def _nilpotency_bound(m: BlockMap, free: tuple[str, ...]) -> float:
    """Applications after which any product of Jacobians is 0 (``inf`` with a cycle).

    Among the free slots an acyclic block graph makes every Jacobian strictly
    block-triangular in one slot order, so a product of ``p + 1`` of them vanishes,
    ``p`` the longest block path among the free slots.
    """
    keep = set(free)
    # m.graph() has one edge per (destination, source slot): a block reading several
    # slots is an edge from each of them.
    sub = BlockGraph(free, tuple(e for e in m.graph().edges if e[0] in keep and e[1] in keep))
    return sub.longest_path() + 1


def _columns(g: MapFunction, z: Tensor, q: Tensor) -> Tensor:
    """``J(z) Q`` for a basis ``q`` of shape ``(*batch, N, k)`` (one JVP per column;
    the dense Jacobian by reverse mode where forward mode is not supported)."""

    def one(v: Tensor) -> Tensor:
        return torch.func.jvp(g, (z,), (v,))[1]

    try:
        return torch.func.vmap(one, in_dims=-1, out_dims=-1, randomness="same")(q)
    except (RuntimeError, NotImplementedError):
        pass
    try:  # modules vmap cannot handle
        return torch.stack([one(q[..., i]) for i in range(q.shape[-1])], dim=-1)
    except (RuntimeError, NotImplementedError):
        pass
    # Modules forward mode cannot go through: the whole Jacobian by reverse mode.
    return _autograd_jacobian(g, z) @ q


def lyapunov_spectrum(
    m: BlockMap,
    state: Mapping[str, Tensor],
    /,
    *,
    steps: int,
    hold: Collection[str] = (),
    k: int | None = None,
    warmup: int = 0,
    force: Mapping[str, Tensor] | None = None,
    update: str = "jacobi",
    generator: torch.Generator | None = None,
    block_kwargs: Mapping[str, Mapping] | None = None,
    positions: bool = False,
) -> Tensor:
    """The ``k`` largest Lyapunov exponents along the trajectory from ``state``.

    Args:
        m: the block map (or a :class:`~iternn.MapModule`).
        state: initial state (free slots; missing ones start at zero) and the values
            of held slots. Slot tensors of the slots' shapes give one spectrum ``(k,)``;
            a batched state ``(*batch, *shape)`` gives one per element, ``(*batch, k)``
            (batch elements are independent trajectories).
        steps: applications averaged over (``>= 1``).
        hold: slots kept fixed (not part of the tangent space).
        k: number of exponents, ``1 <= k <= N`` (``N`` = total number of units of the
            free slots, each flattened row-major as in ``MapFunction.pack``); default
            all ``N``.
        warmup: applications made first without averaging: the state moves onto its
            attractor and the tangent basis aligns with the leading directions.
        force: ``slot -> (warmup + steps, *batch, *shape)``: before application ``t`` the
            slot is set to ``force[slot][t]`` (a driven system; exponents of the
            non-autonomous map). Forced slots are not part of the tangent space.
        update: ``"jacobi"`` or ``"ordered"`` (see :func:`iternn.iterate`).
        generator: draws the initial random orthonormal tangent basis (default: a
            generator seeded 0, so results are deterministic).
        positions: the state is a sequence whose position axis belongs to the state
            (see :func:`~iternn.dynamics.jacobian.jacobian`): ``N`` counts the free
            units at every position, ``(*batch, k)`` has no position axis, and the
            tangent vectors carry the cross-position terms of attention blocks. A map
            with a block into a free slot known to mix positions is refused without
            it (a :class:`~iternn.dynamics.DynamicsError` naming the blocks, see
            :func:`~iternn.dynamics.functional.refuse_mixing`).

    Returns:
        float64 exponents, largest first, in natural log per application.
    """
    bm = as_block_map(m)
    steps = check_int(steps, "steps", 1)
    warmup = check_int(warmup, "warmup", 0)
    hold = check_hold(bm, hold)
    update = check_update(update)
    check_generator(generator)
    check_block_kwargs(bm, block_kwargs)
    positions = check_positions(positions)
    forced_names = tuple(force) if isinstance(force, Mapping) else ()
    full, lead = check_state(bm, state, hold, frozen=forced_names)
    check_map_finite(bm)  # the tangent basis goes through torch.linalg.qr
    ref = next(iter(full.values()))
    forced = check_force(bm, force, hold, length=warmup + steps, batch=lead, dtype=ref.dtype,
                         device=ref.device)
    frozen = hold + tuple(s for s in bm.slots if s in forced)
    free = tuple(s for s in bm.slots if s not in frozen)
    if not free:
        raise DynamicsError(
            "every slot is held or forced: the tangent space is empty, there are no exponents"
        )
    if not positions:
        refuse_mixing(bm, frozen, "the Lyapunov exponents with positions=False", WHOLE_SEQUENCES)
    pos = positions_of(bm, full, frozen) if positions else None
    batch = lead  # the leading dims of one trajectory's state, without its positions
    if pos is not None:
        cut = len(lead) + pos.axis
        batch = lead[:cut] + lead[cut + 1:]
    n = sum(bm.slots[s] for s in free) * (1 if pos is None else pos.length)
    if k is None:
        k = n
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise DynamicsError(
            f"k must be an int with 1 <= k <= {n} (the size of the free slots {list(free)}), "
            f"got {k!r}"
        )
    if steps >= _nilpotency_bound(bm, free):
        # No cycle among the free slots: every product of that many Jacobians along the
        # trajectory is exactly 0, so the tangent volume collapses: every exponent is
        # -inf (numerically the QR method would only give large negative numbers).
        return torch.full((*batch, k), -math.inf, dtype=torch.float64, device=ref.device)
    check_bytes(2 * math.prod(batch) * n * k * 8,
                f"the tangent basis (k={k} exponents over {n} free units, batch {tuple(batch)}, "
                f"float64)", device=ref.device)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    basis = torch.randn(*batch, n, k, generator=gen, dtype=torch.float64, device=gen.device)
    q = torch.linalg.qr(basis.to(ref.device)).Q
    held = {s: full[s] for s in hold}
    cur = {s: v.detach() for s, v in full.items()}
    total = torch.zeros(*batch, k, dtype=torch.float64, device=ref.device)
    numel = max(1, math.prod(batch)) * n * n
    dense = n <= _DENSE_N or 4 * k >= n
    chunk = max(1, _DENSE_BUDGET // numel) if dense else 1
    length, t = warmup + steps, 0
    with torch.no_grad():
        while t < length:
            size = min(chunk, length - t)
            part = {s: seq[t : t + size] for s, seq in forced.items()}
            # The states z_t ... z_{t+size} (one call: the engine's fast plans).
            traj = iterate(bm, cur, size, hold=hold, force=part or None, trajectory=True,
                           update=update, block_kwargs=block_kwargs)
            for s in free:
                if not torch.isfinite(traj[s]).all():
                    raise DynamicsError(
                        f"the trajectory left the finite numbers (slot {s!r}, within "
                        f"applications {t + 1}..{t + size}); the map diverges from this state"
                    )
            before = {s: torch.cat([cur[s].unsqueeze(0), traj[s][:-1]]) for s in free}
            zs = pack_slots(bm, before, free, (size, *batch), pos)
            if dense:  # G_t at every state of the chunk, time as one more batch dim
                timed = {s: v.expand(size, *v.shape) for s, v in held.items()}
                g = MapFunction(bm, {**timed, **part}, hold=frozen, update=update,
                                block_kwargs=block_kwargs, positions=pos)
                jac = _jacobian_at(bm, g, zs, (size, *batch),
                                   block_kwargs=block_kwargs).to(torch.float64)
            elif not part:
                g = MapFunction(bm, held, hold=frozen, update=update, block_kwargs=block_kwargs,
                                positions=pos)
            for i in range(size):
                if dense:
                    jq = jac[i] @ q
                else:
                    if part:
                        g = MapFunction(bm, {**held, **{s: seq[i] for s, seq in part.items()}},
                                        hold=frozen, update=update, block_kwargs=block_kwargs,
                                        positions=pos)
                    jq = _columns(g, zs[i], q.to(zs.dtype)).to(torch.float64)
                check_matrix_finite(jq, "the tangent vectors J q")
                q, r = torch.linalg.qr(jq)
                if t + i >= warmup:
                    total += torch.log(torch.diagonal(r, dim1=-2, dim2=-1).abs())
            cur = {**cur, **{s: traj[s][-1] for s in free}}
            t += size
    exps = total / steps
    return torch.sort(exps, dim=-1, descending=True).values


def largest_lyapunov(
    m: BlockMap,
    state: Mapping[str, Tensor],
    /,
    *,
    steps: int,
    hold: Collection[str] = (),
    warmup: int = 0,
    force: Mapping[str, Tensor] | None = None,
    update: str = "jacobi",
    generator: torch.Generator | None = None,
    block_kwargs: Mapping[str, Mapping] | None = None,
    positions: bool = False,
) -> Tensor:
    """The largest Lyapunov exponent (``k = 1``: one tangent vector, renormalised each
    application): a 0-d float64 tensor, or ``(*batch,)``. Natural log per application;
    positive means chaos (nearby trajectories separate), negative a stable orbit.
    ``positions=True``: over whole sequences, as in :func:`lyapunov_spectrum`."""
    return lyapunov_spectrum(
        m, state, steps=steps, hold=hold, k=1, warmup=warmup, force=force, update=update,
        generator=generator, block_kwargs=block_kwargs, positions=positions,
    )[..., 0]
