"""Jacobians of one application and their spectra.

Everything here is about ``G``, one application of a block map on its packed *free*
slots with the held slots fixed (:class:`~iternn.dynamics.MapFunction`): rows and
columns of every Jacobian are the free slots in slot order, held slots omitted, each
slot flattened row-major, i.e. the layout of ``MapFunction.pack`` (and of
:meth:`BlockMap.pack <iternn.BlockMap.pack>` restricted to the free slots). A shaped
slot ``(C, H, W)`` owns ``C·H·W`` consecutive rows and columns.

* :func:`jacobian` — the exact ``dG/dz`` at a state. Autograd (forward mode) in general
  (convolutions, gates, any block reading several slots); for maps whose blocks into
  the free slots are all affine one-source blocks (plain ``nn.Linear``, ``nn.Identity``,
  or blocks exposing ``dense_weight()`` such as :mod:`iternn.sparse`'s, between vector
  slots; ``nn.Identity`` also between equal shaped slots) and whose activations are
  element-wise it is assembled block by block as ``diag(act'(pre)) · W`` and can be
  returned as a sparse COO tensor that keeps the sparsity of ``W``.
* :func:`spectral_radius` — the largest ``|λ|`` of the Jacobian from Jacobian-vector
  products only (restarted Arnoldi; no dense Jacobian), robust to complex/rotating
  dominant eigenvalues.
* :func:`eigenvalues`, :func:`singular_values` — dense, for small maps.

Batched states: the leading dims of the state (those before each slot's shape) are
treated as independent batch elements (true for every row-wise or sample-wise block:
linear layers, element-wise layers, convolutions, pooling, sequences of them, sparse and
structured blocks). A batched state gives one Jacobian (one spectrum, one radius) per
element; a state without batch dims (slot tensors of exactly the slot's shape) gives a
single one. Slots missing from the state start at zero (as in :func:`iternn.iterate`).
Blocks that look across the leading dims (the attention of a transformer layer reads
the sequence dim, batch normalisation in train mode the batch) break this assumption:
for them a per-element result would not be the element's own Jacobian. A block into a
free slot that is known to mix positions (it holds a module with a ``batch_first``
flag: torch's attention and transformer layers, a converted transformer or RNN used as
a block; :func:`~iternn.dynamics.functional.mixing_blocks`) is therefore refused
without ``positions=True``, before the map is called: a
:class:`~iternn.dynamics.DynamicsError` naming the blocks. ``positions=True`` makes a
sequence one state. A custom block that mixes positions is not recognised unless it
has a ``batch_first`` attribute.

Positions: ``positions=True`` (:func:`jacobian`, :func:`spectral_radius`,
:func:`eigenvalues`, :func:`singular_values`) takes a whole sequence as one state, for
maps whose blocks mix positions (attention). The position axis is the last leading dim
of the slot tensors, ``(*batch, T, *shape)``, or the first, ``(T, *batch, *shape)``, for
sequence-first attention (``batch_first=False``, torch's default); an unbatched
``(T, *shape)`` sequence either way. Each free slot then spans ``T·n_s`` rows and
columns, its ``(T, *shape)`` flattened row-major (position by position: rows
``t·n_s … (t+1)·n_s − 1`` of a slot are position ``t``), slots in slot order, and the
result is one Jacobian (radius, spectrum) per sequence, ``(*batch, T·N, T·N)``, with the
cross-position terms. A map whose blocks into the free slots all act on each position
alone (:func:`~iternn.dynamics.functional.sequence_blocks`) has no sequence dimension:
``positions=True`` on it, or on a state without a leading dim, is a
:class:`~iternn.dynamics.DynamicsError` (see
:func:`~iternn.dynamics.functional.positions_of`).

Every function raises :class:`~iternn.dynamics.DynamicsError` (a ``ValueError``) naming
the slot or option on bad input: unknown slots, non-finite values, an empty free part,
unknown options, ``block_kwargs`` that name an unknown block or keyword arguments its
``forward`` does not take. A map whose weights hold NaN or inf is refused naming the block
``dst <- src``, and a non-finite Jacobian naming its first non-finite block, before
``torch.linalg`` sees the matrix (some LAPACK builds crash on NaN input).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Collection, Mapping

import torch
from torch import Tensor, nn

from ..core.block_map import BlockMap, block_key
from ..core.calls import is_shaped
from ..core.memory import check_bytes
from ..core.rowwise import ELEMENTWISE
from ..errors import DynamicsError
from .functional import WHOLE_SEQUENCES, MapFunction, positions_of, refuse_mixing
from .validate import (
    as_block_map,
    check_generator,
    check_hold,
    check_int,
    check_map_finite,
    check_matrix_finite,
    check_positive,
    check_state,
    check_update,
)

__all__ = [
    "jacobian",
    "spectral_radius",
    "eigenvalues",
    "singular_values",
    "JACOBIAN_METHODS",
]

#: ``method=`` values of :func:`jacobian`.
JACOBIAN_METHODS = ("auto", "autograd", "structured")


# ---------------------------------------------------------------------------- preparation


def check_positions(positions: object) -> bool:
    """``positions=`` is a bool."""
    if not isinstance(positions, bool):
        raise DynamicsError(f"positions must be a bool, got {positions!r}")
    return positions


def _prepare(
    m: object,
    state: object,
    hold: object,
    update: object,
    block_kwargs: Mapping | None = None,
    positions: object = False,
    *,
    tool: str,
) -> tuple[BlockMap, MapFunction, Tensor, tuple[int, ...]]:
    """Validated ``(map, G, z, batch)``: ``z`` the packed free slots of ``state``,
    ``batch`` its leading dims (without the position axis with ``positions``).

    The map's weights must be finite (:func:`~iternn.dynamics.validate.check_map_finite`):
    every caller hands matrices made from them to ``torch.linalg``. Without
    ``positions`` a block into a free slot must not be known to mix positions
    (:func:`~iternn.dynamics.functional.refuse_mixing`; ``tool`` names the caller).
    """
    bm = as_block_map(m)
    hold = check_hold(bm, hold)
    update = check_update(update)
    positions = check_positions(positions)
    full, batch = check_state(bm, state, hold)
    check_map_finite(bm)
    if len(hold) == len(bm.slots):
        raise DynamicsError(
            "every slot is held: the free part is empty, so there is no square Jacobian"
        )
    if not positions:
        refuse_mixing(bm, hold, f"{tool} with positions=False", WHOLE_SEQUENCES)
    pos = positions_of(bm, full, hold) if positions else None
    g = MapFunction(bm, full, hold=hold, update=update, block_kwargs=block_kwargs,
                    positions=pos)
    z = g.pack(full).detach()
    return bm, g, z, tuple(z.shape[:-1])


# ---------------------------------------------------------------------------- Jacobian


def _elementwise(act: nn.Module | None) -> bool:
    if act is None:
        return True
    if act._forward_hooks or act._forward_pre_hooks:
        return False
    if type(act) is nn.Sequential:
        return all(_elementwise(a) for a in act)
    return type(act) in ELEMENTWISE


def _affine(block: nn.Module, n_out: int, n_in: int, where: str, shaped: bool = False):
    """``(W, bias, indices)`` of an affine block ``x -> x W^T + bias``, else ``None``.

    ``W`` is ``(n_out, n_in)`` over the flattened slots. ``indices`` is the ``(2, nnz)``
    stored pattern: ``indices()`` where the block has it, the diagonal of an identity
    block, the non-zeros of ``dense_weight()`` for other structured blocks, and ``None``
    (every entry) for a dense ``nn.Linear``. A weight that must be made dense is
    checked against the memory available first (a :class:`~iternn.SizeError` naming
    ``where``, the block). On ``shaped`` slots (rank > 1 on either side) only
    ``nn.Identity`` qualifies: a linear or structured layer there acts on the last dim
    of the slot tensor, not on the flattened slot, so its weight is not ``W``.
    """
    if block._forward_hooks or block._forward_pre_hooks:
        return None
    if shaped and type(block) is not nn.Identity:
        return None
    if type(block) is nn.Linear:
        return block.weight, block.bias, None
    dtype = next(iter(block.parameters()), torch.empty(0)).dtype
    check_bytes(n_out * n_in * dtype.itemsize,
                f"the dense weight of block {where} ({type(block).__name__}, {n_out} x {n_in}, {dtype})")
    if type(block) is nn.Identity:
        eye = torch.eye(n_out, n_in)
        idx = torch.arange(n_out).repeat(2, 1)
        return eye, None, idx
    dense = getattr(block, "dense_weight", None)
    if callable(dense):
        w = dense()
        if not isinstance(w, Tensor) or w.shape != (n_out, n_in):
            return None
        b = getattr(block, "bias", None)
        idx_fn = getattr(block, "indices", None)
        idx = idx_fn() if callable(idx_fn) else None
        if idx is None:  # a structured block (diagonal, block-diagonal ...): its non-zeros
            idx = w.detach().nonzero().t()
        return w, b if isinstance(b, Tensor) else None, idx
    return None


def _block_affine(m: BlockMap, d: str, s: str):
    """:func:`_affine` of the one-source block ``F[d, s]``."""
    shaped = is_shaped(m.shapes[d], m.shapes[s])
    return _affine(m.block(d, s), m.slots[d], m.slots[s], f"{d!r} <- {s!r}", shaped)


def _structure(m: BlockMap, g: MapFunction, block_kwargs) -> str | None:
    """``None`` if the structured path applies, else why not (for the error message)."""
    if g.positions is not None:
        return "positions=True (the structured path assembles one position's Jacobian)"
    if g.update != "jacobi":
        return f"update={g.update!r} (the structured path is for the Jacobi application)"
    for d in g.free:
        if not _elementwise(m.activation(d)):
            return f"the activation of slot {d!r} is not element-wise"
    for d, s in m.edges:
        if d not in g.free:
            continue
        if not isinstance(s, str):
            return (f"block {d!r} <- {s!r} reads several slots (a multi-source block is "
                    "never affine)")
        if block_kwargs and block_key(d, s) in block_kwargs:
            return f"block {d!r} <- {s!r} takes block_kwargs"
        if _block_affine(m, d, s) is None:
            kind = type(m.block(d, s)).__name__
            where = ""
            if is_shaped(m.shapes[d], m.shapes[s]):
                where = (f" between shaped slots {d!r} {tuple(m.shapes[d])} and {s!r} "
                         f"{tuple(m.shapes[s])} (only nn.Identity is affine there)")
            return (
                f"block {d!r} <- {s!r} ({kind}) is not affine (nn.Linear, nn.Identity or a "
                f"module with dense_weight()){where}"
            )
    return None


def _derivative(act: nn.Module | None, pre: Tensor) -> Tensor | None:
    """``act'(pre)`` element-wise (``None`` for the identity)."""
    if act is None:
        return None
    return torch.func.jvp(act, (pre,), (torch.ones_like(pre),))[1]


def _structured(m: BlockMap, g: MapFunction, z: Tensor, batch, sparse: bool) -> Tensor:
    # Every slot flattened row-major: (*batch, n_s), the Jacobian's layout.
    state = {s: v.reshape(*batch, m.slots[s]) for s, v in g.unpack(z).items()}
    offsets, off = {}, 0
    for s, n in zip(g.free, g.sizes):
        offsets[s] = off
        off += n
    n = g.size
    dtype, device = z.dtype, z.device
    parts: dict[str, list] = {d: [] for d in g.free}
    for d, s in m.edges:
        if d in parts:  # one-source blocks only (checked by _structure)
            w, b, idx = _block_affine(m, d, s)
            parts[d].append((s, w.to(dtype=dtype, device=device), b, idx))
    if sparse:
        rows, cols, vals = [], [], []
    else:
        jac = z.new_zeros(*batch, n, n)
    for d in g.free:
        pre = None
        for s, w, b, _ in parts[d]:
            y = state[s] @ w.t()
            if b is not None:
                y = y + b
            pre = y if pre is None else pre + y
        bias = m.bias(d)
        if bias is not None:
            bias = bias.reshape(m.slots[d])
            pre = bias if pre is None else pre + bias
        if pre is None:
            pre = z.new_zeros(*batch, m.slots[d])
        elif pre.shape[:-1] != batch:
            pre = pre.expand(*batch, m.slots[d])
        deriv = _derivative(m.activation(d), pre)
        r0 = offsets[d]
        for s, w, _, idx in parts[d]:
            if s not in offsets:  # a held source: a constant, no column
                continue
            c0 = offsets[s]
            if sparse:
                if idx is None:
                    r, c = torch.meshgrid(
                        torch.arange(w.shape[0], device=device),
                        torch.arange(w.shape[1], device=device),
                        indexing="ij",
                    )
                    r, c = r.reshape(-1), c.reshape(-1)
                else:
                    r, c = idx[0].to(device), idx[1].to(device)
                v = w[r, c]
                if deriv is not None:
                    v = v * deriv[r]
                rows.append(r + r0)
                cols.append(c + c0)
                vals.append(v)
            else:
                block = w if deriv is None else deriv.unsqueeze(-1) * w
                jac[..., r0 : r0 + w.shape[0], c0 : c0 + w.shape[1]] = block
    if not sparse:
        return jac
    if rows:
        index = torch.stack([torch.cat(rows), torch.cat(cols)])
        values = torch.cat(vals)
    else:
        index = torch.zeros(2, 0, dtype=torch.long, device=device)
        values = z.new_zeros(0)
    return torch.sparse_coo_tensor(index, values, (n, n), check_invariants=False).coalesce()


#: Rows of a Jacobian computed together in reverse mode (each holds its own backward
#: pass's intermediate values).
_ROWS = 256


def _autograd_jacobian(g: MapFunction, z: Tensor) -> Tensor:
    """Exact ``dG/dz`` per batch element: forward mode, one shared tangent per column.

    Batch elements being independent, perturbing every element by the same ``u``
    gives ``d G(z + u)[b] / du = J_b``. Modules without forward mode (torch's attention
    kernels) go to reverse mode, :data:`_ROWS` rows at a time (``jacrev``), and modules
    that ``vmap`` cannot handle to reverse mode one row at a time.
    """
    n = g.size
    zero = z.new_zeros(n)
    try:
        return torch.func.jacfwd(lambda u: g(z + u), randomness="same")(zero)
    except (RuntimeError, NotImplementedError):
        pass
    try:
        with warnings.catch_warnings():  # vmap's note that a kernel runs sample by sample
            warnings.filterwarnings("ignore", "There is a performance drop", UserWarning)
            return torch.func.jacrev(lambda u: g(z + u), chunk_size=_ROWS)(zero)
    except (RuntimeError, NotImplementedError):
        pass
    with torch.enable_grad():
        zz = z.detach().clone().requires_grad_(True)
        out = g(zz)
        rows = []
        for i in range(n):
            (row,) = torch.autograd.grad(
                out[..., i].sum(), zz, retain_graph=True, allow_unused=True
            )
            rows.append(torch.zeros_like(zz) if row is None else row)
    return torch.stack(rows, dim=-2).detach()


def jacobian(
    m: BlockMap,
    state: Mapping[str, Tensor],
    /,
    *,
    hold: Collection[str] = (),
    update: str = "jacobi",
    method: str = "auto",
    sparse: bool = False,
    block_kwargs: Mapping[str, Mapping] | None = None,
    positions: bool = False,
) -> Tensor:
    """The exact Jacobian ``dG/dz`` of one application at ``state``.

    Args:
        m: the block map (or a :class:`~iternn.MapModule`, whose map is used).
        state: the point ``z`` (free slots; missing ones are zero) and the values of
            the held slots. Slot tensors of the slots' shapes give one Jacobian
            ``(N, N)``; ``(*batch, *shape)`` give one per batch element,
            ``(*batch, N, N)``.
        hold: slots kept fixed (not rows or columns of the Jacobian).
        update: ``"jacobi"`` or ``"ordered"`` (see :func:`iternn.iterate`).
        method: ``"autograd"`` (forward-mode autograd, any differentiable map),
            ``"structured"`` (assembled block by block as ``diag(act'(pre)) · W``; needs
            Jacobi update, element-wise activations on the free slots and affine
            one-source blocks into them: ``nn.Linear``, ``nn.Identity`` or a module with
            ``dense_weight()``, taken to compute ``x @ dense_weight().T + bias``, between
            vector slots; ``nn.Identity`` between shaped slots) or
            ``"auto"`` (structured where it applies, else autograd).
        sparse: return a coalesced sparse COO tensor ``(N, N)`` (needs a state without
            batch dims). On the structured path its pattern is the blocks' own pattern
            (``indices()`` of sparse blocks, the diagonal of identity blocks, the
            non-zeros of other ``dense_weight()`` blocks, every entry of a dense
            ``nn.Linear``); otherwise it is the non-zeros of the dense Jacobian.
        block_kwargs: passed to the blocks (see :func:`iternn.iterate`).
        positions: take the position axis of a sequence state into the state (see the
            module docstring): one Jacobian ``(T·N, T·N)`` per sequence with the
            cross-position terms, for maps whose blocks mix positions (attention).
            ``sparse=True`` then needs one unbatched sequence ``(T, *shape)``. Such a
            map without it is a :class:`DynamicsError` naming the blocks.

    Rows and columns are the free slots in slot order, each flattened row-major
    (``MapFunction.pack``). ``N`` is the total number of units of the free slots.
    Gradients are not tracked (the result is a plain tensor, in the state's dtype).
    """
    if method not in JACOBIAN_METHODS:
        raise DynamicsError(f"method must be one of {JACOBIAN_METHODS}, got {method!r}")
    if not isinstance(sparse, bool):
        raise DynamicsError(f"sparse must be a bool, got {sparse!r}")
    bm, g, z, batch = _prepare(m, state, hold, update, block_kwargs, positions,
                               tool="jacobian")
    if sparse and batch:
        raise DynamicsError(
            "sparse=True needs a state without batch dims (each slot tensor exactly the "
            f"slot's shape{', after its positions' if positions else ''}), got batch {batch}"
        )
    return _jacobian_at(bm, g, z, batch, method=method, sparse=sparse, block_kwargs=block_kwargs)


def _jacobian_at(bm, g, z, batch, *, method="auto", sparse=False, block_kwargs=None) -> Tensor:
    """The Jacobian of a prepared ``G`` at packed ``z`` (``(*batch, N)``)."""
    def check_dense() -> None:  # a dense (*batch, N, N) matrix will be built
        check_bytes(math.prod(batch) * g.size * g.size * z.element_size(),
                    f"the Jacobian over {g.size} free units (batch {tuple(batch)}, {z.dtype})",
                    device=z.device)

    if not sparse:  # before the blocks' weights are made dense to find the path
        check_dense()
    why = _structure(bm, g, block_kwargs) if method != "autograd" else "autograd requested"
    if method == "structured" and why is not None:
        raise DynamicsError(f"method='structured' does not apply: {why}")
    if sparse and why is not None:
        check_dense()
    with torch.no_grad():
        if why is None:
            return _structured(bm, g, z, batch, sparse)
        jac = _autograd_jacobian(g, z)
    return jac.to_sparse().coalesce() if sparse else jac


# ---------------------------------------------------------------------------- spectra


def _sort_by_modulus(values: Tensor) -> Tensor:
    """Descending modulus; conjugate pairs with the positive imaginary part first."""
    if values.is_complex():
        order = torch.sort(values.imag, dim=-1, descending=True, stable=True).indices
        values = torch.gather(values, -1, order)
    order = torch.sort(values.abs(), dim=-1, descending=True, stable=True).indices
    return torch.gather(values, -1, order)


def _nilpotent(m: BlockMap, g: MapFunction) -> bool:
    """Whether the Jacobian is nilpotent by structure: no cycle among the free slots.

    Then ``J`` is strictly block-triangular in a suitable slot order (Jacobi update; an
    ordered sweep of an acyclic map does not read the free slots at all), so every
    eigenvalue is exactly 0 — a fact numerical eigensolvers only approximate, since
    defective eigenvalues are ill-conditioned (``|λ| ~ eps^(1/p)`` for a Jordan block of
    size ``p``).
    """
    return m.graph().without_inputs_to(g.hold).is_acyclic()


def eigenvalues(
    m: BlockMap,
    state: Mapping[str, Tensor],
    /,
    *,
    hold: Collection[str] = (),
    update: str = "jacobi",
    block_kwargs: Mapping[str, Mapping] | None = None,
    positions: bool = False,
) -> Tensor:
    """All eigenvalues of the Jacobian at ``state``, largest modulus first (complex).

    Dense (``torch.linalg.eigvals`` of :func:`jacobian`), so for small maps. Shape
    ``(N,)``, or ``(*batch, N)`` for a batched state. At a fixed point, ``|λ| < 1`` for
    all of them means the fixed point is stable. When the free slots form no cycle
    (an MLP-like map) the Jacobian is nilpotent by structure and the eigenvalues are
    returned as exact zeros. ``positions=True``: of the Jacobian over whole sequences,
    ``(*batch, T·N)`` (see the module docstring).
    """
    bm, g, z, batch = _prepare(m, state, hold, update, block_kwargs, positions,
                               tool="eigenvalues")
    if _nilpotent(bm, g):
        ctype = torch.complex128 if z.dtype == torch.float64 else torch.complex64
        return torch.zeros(*batch, g.size, dtype=ctype, device=z.device)
    jac = _jacobian_at(bm, g, z, batch, block_kwargs=block_kwargs)
    check_matrix_finite(jac, "the Jacobian", g.free, g.sizes, g.shapes)
    return _sort_by_modulus(torch.linalg.eigvals(jac))


def singular_values(
    m: BlockMap,
    state: Mapping[str, Tensor],
    /,
    *,
    hold: Collection[str] = (),
    update: str = "jacobi",
    block_kwargs: Mapping[str, Mapping] | None = None,
    positions: bool = False,
) -> Tensor:
    """Singular values of the Jacobian at ``state``, descending: ``(N,)`` or ``(*batch, N)``.

    Dense (``torch.linalg.svdvals`` of :func:`jacobian`). The largest is the local
    Lipschitz constant of one application (in the 2-norm). ``positions=True``: of the
    Jacobian over whole sequences, ``(*batch, T·N)`` (see the module docstring).
    """
    bm, g, z, batch = _prepare(m, state, hold, update, block_kwargs, positions,
                               tool="singular_values")
    jac = _jacobian_at(bm, g, z, batch, block_kwargs=block_kwargs)
    check_matrix_finite(jac, "the Jacobian", g.free, g.sizes, g.shapes)
    return torch.linalg.svdvals(jac)


def _matvec(g: MapFunction, z: Tensor):
    """``v -> J v`` at ``z`` in float64 (the map runs in ``z``'s dtype).

    Forward mode (``torch.func.jvp``). A block that forward mode cannot go through
    (a custom ``autograd.Function`` without a forward-mode formula) switches it to
    ``v -> Jᵀ v`` by reverse mode on one retained graph: the transpose has the same
    eigenvalues, which is all the spectral radius needs.
    """
    reverse: list = []

    def transposed(v: Tensor) -> Tensor:
        if not reverse:
            with torch.enable_grad():
                zz = z.detach().clone().requires_grad_(True)
                reverse.extend((zz, g(zz)))
        zz, out = reverse
        if not out.requires_grad:  # G does not read the free slots: J = 0
            return torch.zeros_like(v)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(out, zz, v.to(z.dtype), retain_graph=True,
                                          allow_unused=True)
        return torch.zeros_like(v) if grad is None else grad.to(torch.float64)

    def matvec(v: Tensor) -> Tensor:
        if reverse:
            return transposed(v)
        try:
            return torch.func.jvp(g, (z,), (v.to(z.dtype),))[1].to(torch.float64)
        except (RuntimeError, NotImplementedError):
            return transposed(v)

    return matvec


def _krylov_radius(
    matvec, n: int, draw, *, krylov: int, max_products: int, tol: float,
    unit: float = torch.finfo(torch.float64).eps,
):
    """Spectral radius by a thick-restarted Krylov method (float64).

    A basis ``V`` (``n × m``, orthonormal) and its products ``JV`` are kept. The basis
    grows by the Krylov direction (the part of ``JV`` outside ``span V``) up to
    ``krylov`` vectors; the Ritz values are the eigenvalues of ``B = Vᵀ J V`` and the
    dominant Ritz pair ``(θ, x)`` is accepted when ``‖J x − θ x‖ <= tol·|θ|``. A restart
    keeps the real and imaginary parts of the leading Ritz vectors (with their
    products: no new Jacobian-vector products), so a complex (rotating) dominant pair
    stays in the basis and converges like a real one, at a rate set by the gap to the
    next modulus. Without the restart (``n <= krylov``, or an invariant subspace found)
    the Ritz values are exact eigenvalues up to rounding. This is Krylov–Schur without
    the Schur form: the restarted space is a Krylov decomposition ``J V = V B + r bᵀ``.

    A restart keeps about half the basis, more when the leading moduli cluster (all Ritz
    values within 1 % of the largest, up to three quarters of the basis), so that
    nearly equal dominant eigenvalues stay together. A first convergence is checked
    once: a fresh random direction (``draw()``) joins the kept vectors and the
    iteration goes on until it converges again, so a dominant eigenvector that an
    early restart lost gets another chance to show up.

    ``unit`` is the rounding unit of the products (the map's dtype): a residual at that
    level also counts as converged.

    Returns ``(radius, converged, products, residual)``.
    """
    k = min(krylov, n)
    base, cap = max(2, k // 2), max(2, k - max(1, k // 4))
    eps = torch.finfo(torch.float64).eps
    v = draw()
    v = (v / v.norm()).unsqueeze(1)
    basis, prods = v, matvec(v[:, 0]).unsqueeze(1)
    products, radius, resid = 1, math.nan, math.inf
    checked = False
    while True:
        exhausted = False
        while basis.shape[1] < k and products < max_products:
            # The Krylov direction: the largest part of J V outside span V.
            outside = prods - basis @ (basis.t() @ prods)
            w = outside[:, int(torch.argmax(outside.norm(dim=0)))]
            for _ in range(2):
                w = w - basis @ (basis.t() @ w)
            wn = w.norm()
            if wn <= 8 * n * eps * max(float(prods.abs().max()), 1e-300) or wn == 0:
                exhausted = True  # an invariant subspace: its Ritz values are exact
                break
            w = w / wn
            basis = torch.cat([basis, w.unsqueeze(1)], dim=1)
            prods = torch.cat([prods, matvec(w).unsqueeze(1)], dim=1)
            products += 1
        b = basis.t() @ prods
        check_matrix_finite(prods, "a Jacobian-vector product")
        theta, y = torch.linalg.eig(b)
        mod = theta.abs()
        top = int(torch.argmax(mod))
        radius = float(mod[top])
        yc = y[:, top]
        r = prods.to(yc.dtype) @ yc - theta[top] * (basis.to(yc.dtype) @ yc)
        resid = float(r.norm() / yc.norm())
        bnorm = float(b.abs().max()) if b.numel() else 0.0
        if exhausted or basis.shape[1] == n:
            return radius, True, products, resid
        converged = resid <= tol * radius or resid <= 8 * n * unit * bnorm
        if converged and checked:
            return radius, True, products, resid
        if products >= max_products:
            return radius, False, products, resid
        # Thick restart: the leading Ritz vectors' real and imaginary parts, about half
        # the basis, never splitting a complex pair (its span is then B-invariant).
        cluster = int((mod >= 0.99 * mod.max()).sum())
        keep = min(max(base, cluster), cap)
        parts: list[Tensor] = []
        for i in torch.argsort(mod, descending=True).tolist():
            if theta[i].imag < 0 and bool((theta == theta[i].conj()).any()):
                continue  # the conjugate partner gives the same real span
            new = [y[:, i].real] + ([y[:, i].imag] if theta[i].imag != 0 else [])
            if parts and len(parts) + len(new) > keep:
                break
            parts += new
        q, rr = torch.linalg.qr(torch.stack(parts, dim=1))
        diag = torch.diagonal(rr).abs()
        q = q[:, diag > 1e-10 * diag.max()]
        basis, prods = basis @ q, prods @ q
        if converged:  # check once, with a fresh direction in the basis
            checked = True
            w = draw()
            for _ in range(2):
                w = w - basis @ (basis.t() @ w)
            if w.norm() > 0 and basis.shape[1] < k:
                w = w / w.norm()
                basis = torch.cat([basis, w.unsqueeze(1)], dim=1)
                prods = torch.cat([prods, matvec(w).unsqueeze(1)], dim=1)
                products += 1


def spectral_radius(
    m: BlockMap,
    state: Mapping[str, Tensor],
    /,
    *,
    hold: Collection[str] = (),
    update: str = "jacobi",
    iters: int = 5000,
    tol: float = 1e-10,
    krylov: int = 32,
    generator: torch.Generator | None = None,
    strict: bool = True,
    block_kwargs: Mapping[str, Mapping] | None = None,
    positions: bool = False,
) -> Tensor:
    """Spectral radius ``max |λ|`` of the Jacobian of one application at ``state``.

    Uses Jacobian-vector products only (forward-mode autograd through one
    application), so no dense Jacobian is formed: a thick-restarted Krylov method
    (Arnoldi) with at most ``krylov`` basis vectors — power iteration generalised to a
    subspace, which handles complex (rotating) and equal-modulus dominant eigenvalues
    that plain power iteration cannot. For ``N <= krylov`` free dims the first cycle
    spans the whole space and the result is exact up to rounding. When the free slots
    form no cycle the Jacobian is nilpotent by structure and the radius is exactly 0
    (no products are made).

    Args:
        iters: at most this many Jacobian-vector products (power-iteration steps).
        tol: convergence when the residual of the dominant Ritz pair is at most
            ``tol · radius`` (or at rounding level).
        krylov: at most this many basis vectors (``>= 3``, so that a complex pair and
            a new direction fit after a restart); more converge in fewer products.
        generator: draws the random start vector (default: a generator seeded 0, so
            results are deterministic).
        strict: raise :class:`DynamicsError` when not converged within ``iters``
            products; ``False`` returns the last estimate.
        positions: take the position axis of a sequence state into the state (see the
            module docstring): one Jacobian ``(T·N, T·N)`` per sequence with the
            cross-position terms, for maps whose blocks mix positions (attention).
            ``N`` is then ``T`` times the free units. Such a map without it is a
            :class:`DynamicsError` naming the blocks.

    Like any Krylov eigensolver it can settle on a slightly smaller eigenvalue when
    several eigenvalues have nearly the same modulus and ``krylov`` is too small to
    hold them all together with a few new directions; :func:`eigenvalues` (dense) is
    the reference for small maps.

    Returns:
        float64: a 0-d tensor, or ``(*batch,)`` for a batched state (one radius per
        batch element, computed element by element).
    """
    iters = check_int(iters, "iters", 1)
    krylov = check_int(krylov, "krylov", 3)
    tol = check_positive(tol, "tol")
    check_generator(generator)
    bm, g, z, batch = _prepare(m, state, hold, update, block_kwargs, positions,
                               tool="spectral_radius")
    if _nilpotent(bm, g):  # exactly 0 by structure (see _nilpotent)
        return torch.zeros(batch, dtype=torch.float64, device=z.device)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    out = torch.empty(batch, dtype=torch.float64)
    for idx in itertools.product(*(range(b) for b in batch)):
        ge, ze = g.element(z, idx)

        def draw() -> Tensor:
            return torch.randn(g.size, generator=gen, dtype=torch.float64,
                               device=gen.device).to(z.device)

        with torch.no_grad():
            radius, ok, products, resid = _krylov_radius(
                _matvec(ge, ze), g.size, draw, krylov=krylov, max_products=iters, tol=tol,
                unit=torch.finfo(ze.dtype).eps,
            )
        if not ok and strict:
            where = f" (batch element {idx})" if batch else ""
            raise DynamicsError(
                f"spectral_radius did not converge in iters={iters} Jacobian-vector products"
                f"{where}: estimate {radius:.6g}, residual {resid:.3g} > tol={tol:g}·radius; "
                "raise iters or krylov, or pass strict=False for the estimate"
            )
        out[idx] = radius
    return out.to(z.device)
