"""Pictures of a block map and its dynamics: files, never windows.

Every ``plot_*`` function draws on a fresh :class:`matplotlib.figure.Figure` with its own
Agg canvas (``FigureCanvasAgg``): pyplot is never imported, no window is opened and the
global backend (``matplotlib.use``) is left alone, so the functions are safe on servers,
in tests and inside notebooks. With ``path`` the figure is written there (PNG unless the
suffix names another format matplotlib knows) and the path is returned as a
:class:`~pathlib.Path`; with ``path=None`` the :class:`~matplotlib.figure.Figure` itself
is returned.

* :func:`plot_structure` — the block matrix as a spy plot (row = destination slot,
  column = source slot) with slot boundaries and names; built from
  :func:`structure_matrix`, which reads linear blocks (convolutions, pooling, ...)
  through :func:`~iternn.dynamics.matrix.as_matrix`'s per-block matrices.
* :func:`plot_eigenvalues` — eigenvalues in the complex plane with the unit circle.
* :func:`plot_singular_values` — singular values, descending, log scale.
* :func:`plot_impulse_response` — response norm per application (log scale), exact
  zeros marked, the structural length drawn.
* :func:`plot_trajectories` — a trajectory projected to 2-D by PCA.
* :func:`plot_bifurcation` — a bifurcation diagram over a one-parameter family
  (:func:`bifurcation_data` computes it).
* :func:`plot_lyapunov` — a Lyapunov spectrum.
* :func:`plot_propagation` — propagation across positions: one ``T x T`` image per
  application (:func:`~iternn.dynamics.propagation.propagation` computes it).

matplotlib is an optional dependency (``pip install iternn[plots]``); it is imported when
a picture is drawn, not when this module is imported.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..core.block_map import BlockMap, Source, source_slots
from ..core.memory import check_bytes, tensor_bytes
from ..core.rowwise import ELEMENTWISE
from ..engine.iterate import iterate
from ..errors import DynamicsError, MapError, MapTypeError, MissingDependencyError
from .impulse import ImpulseResponse
from .matrix import _matmul, _output_shape, _Part, linear_reason, module_matrix
from .validate import as_block_map, check_hold, check_int, check_state, check_update

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = [
    "structure_matrix",
    "plot_structure",
    "plot_eigenvalues",
    "plot_singular_values",
    "plot_impulse_response",
    "plot_trajectories",
    "bifurcation_data",
    "BifurcationData",
    "plot_bifurcation",
    "plot_lyapunov",
    "plot_propagation",
    "WEIGHT",
    "OPAQUE",
]

#: Value of :func:`structure_matrix` at an entry of a block's weight pattern.
WEIGHT = 1.0
#: Value of :func:`structure_matrix` inside a block whose pattern is unknown (any module
#: that is not a linear layer, a sparse/structured block or an element-wise layer).
OPAQUE = 0.5

#: Spy plots of maps larger than this are drawn at a coarser resolution (each pixel the
#: maximum over a square of entries), so the image stays small.
_MAX_CELLS = 1024

PathLike = str | os.PathLike


# ---------------------------------------------------------------------------- matplotlib
def _matplotlib():
    """``(Figure, FigureCanvasAgg)``, imported on first use."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - exercised only without matplotlib
        raise MissingDependencyError(
            "iternn's pictures need matplotlib, which is not installed: "
            "pip install 'iternn[plots]' (or pip install matplotlib)"
        ) from exc
    return Figure, FigureCanvasAgg


#: Margins of the simple plots (fractions of the figure). Fixed margins draw about
#: three times faster than a layout engine; the spy plot, whose slot names have any
#: length, uses matplotlib's constrained layout instead.
_MARGINS = {"left": 0.13, "right": 0.96, "bottom": 0.11, "top": 0.91}


def _figure(width: float = 6.4, height: float = 4.8, *, constrained: bool = False,
            **margins: float) -> Figure:
    figure_cls, canvas_cls = _matplotlib()
    fig = figure_cls(figsize=(width, height), dpi=100,
                     layout="constrained" if constrained else None)
    canvas_cls(fig)  # the Agg canvas: rendering without pyplot or a GUI
    if not constrained:
        fig.subplots_adjust(**{**_MARGINS, **margins})
    return fig


def _finish(fig: Figure, path: PathLike | None) -> Figure | Path:
    if path is None:
        return fig
    out = Path(path)
    fmt = out.suffix[1:].lower() or "png"
    fig.savefig(out, format=fmt)
    return out


def _integer_locator():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _tensor(x: Any, what: str) -> Tensor:
    """``x`` as a detached CPU tensor (complex kept, real -> float64)."""
    if isinstance(x, Tensor):
        t = x.detach().cpu()
    else:
        try:
            t = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise DynamicsError(f"{what} must be a tensor or a sequence of numbers: {exc}") from None
    if t.is_complex():
        return t.to(torch.complex128)
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64, torch.int16,
                                                  torch.int8, torch.uint8, torch.bool)):
        raise DynamicsError(f"{what} must hold numbers, got dtype {t.dtype}")
    return t.to(torch.float64)


def _log_values(y: Tensor) -> tuple[Tensor, Tensor, float]:
    """For a log-scale plot: ``(y with zeros at a floor, zero mask, floor)``.

    Exact zeros cannot be drawn on a log axis; they are drawn at a floor one decade
    below the smallest positive value (or ``1e-300`` without any) with their own marker.
    """
    finite_pos = y[torch.isfinite(y) & (y > 0)]
    floor = float(finite_pos.min()) / 10 if finite_pos.numel() else 1e-300
    floor = max(floor, 1e-300)
    zero = y == 0
    return torch.where(zero, torch.full_like(y, floor), y), zero, floor


def _num(x: float) -> str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    return f"{x:.4g}"


# ---------------------------------------------------------------------------- structure
def _eye(n: int) -> Tensor:
    return torch.arange(n).repeat(2, 1)


def _as_part(pat: Tensor | str, n_out: int, n_in: int) -> _Part:
    """A pattern as a sparse matrix of ones (``"dense"``: every entry)."""
    if isinstance(pat, str):
        idx = torch.ones(n_out, n_in, dtype=torch.bool).nonzero().t()
    else:
        idx = pat.to("cpu", torch.long)
    return _Part(idx[0], idx[1], torch.ones(idx.shape[1], dtype=torch.float64), (n_out, n_in))


def _duck_pattern(block: nn.Module, n_out: int, n_in: int) -> Tensor | None:
    """The stored pattern of a duck-typed sparse block between vector slots:
    ``indices()``, else the non-zeros of ``dense_weight()``."""
    indices = getattr(block, "indices", None)
    if callable(indices):
        try:
            with torch.no_grad():
                idx = indices()
        except Exception:  # noqa: BLE001 - a foreign indices(): fall back to dense_weight
            idx = None
        if isinstance(idx, Tensor) and idx.dim() == 2 and idx.shape[0] == 2:
            idx = idx.detach().cpu().long()
            ok = idx.numel() == 0 or (
                int(idx.min()) >= 0 and int(idx[0].max()) < n_out and int(idx[1].max()) < n_in
            )
            if ok:
                return idx
    dense = getattr(block, "dense_weight", None)
    if callable(dense):
        try:
            with torch.no_grad():
                w = dense()
        except Exception:  # noqa: BLE001 - treated as opaque
            return None
        if isinstance(w, Tensor) and tuple(w.shape) == (n_out, n_in):
            return (w.detach().cpu() != 0).nonzero().t()
    return None


def _pattern(block: nn.Module, in_shape: tuple[int, ...],
             out_shape: tuple[int, ...]) -> Tensor | str | None:
    """The non-zero pattern of a one-source block from ``in_shape`` to ``out_shape``
    (per-sample shapes; entries numbered row-major).

    ``"dense"`` (every entry), a ``(2, nnz)`` index tensor ``(row, column)``, or ``None``
    when the pattern cannot be read (an opaque module).
    """
    if block._forward_hooks or block._forward_pre_hooks:
        return None
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    vector = len(in_shape) == 1 and len(out_shape) == 1
    kind = type(block)
    if kind is nn.Linear and vector:
        return "dense"
    if kind in ELEMENTWISE:
        return _eye(n_out) if n_out == n_in else None
    if kind is nn.Sequential:
        # Compose the patterns: element-wise layers keep positions, linear ones mix.
        reach = None
        shape = in_shape
        for layer in block:
            try:
                out = _output_shape(layer, shape, "a layer of a block")
            except (MapError, MapTypeError, RuntimeError, TypeError, ValueError, IndexError):
                return None
            pat = _pattern(layer, shape, out)
            if pat is None:
                return None
            part = _as_part(pat, math.prod(out), math.prod(shape))
            reach = part if reach is None else _matmul(part, reach, "a spy plot")
            shape = out
        if shape != tuple(out_shape):
            return None
        if reach is None:
            return _eye(n_out) if n_out == n_in else None
        return torch.stack((reach.rows, reach.cols))
    if vector:
        pat = _duck_pattern(block, n_out, n_in)
        if pat is not None:
            return pat
    if linear_reason(block) is None:
        return module_matrix(block, (in_shape,), out_shape).indices().cpu()
    return None


def _block_patterns(bm: BlockMap, dst: str, src: Source) -> list[tuple[str, Tensor | str | None]]:
    """``(source slot, pattern over its columns)`` for every source of block ``dst <- src``;
    a multi-source block that is not linear is ``None`` (a module) over each source."""
    block = bm.block(dst, src)
    out_shape = bm.shapes[dst]
    srcs = source_slots(src)
    if len(srcs) == 1:
        return [(srcs[0], _pattern(block, bm.shapes[srcs[0]], out_shape))]
    if linear_reason(block, len(srcs)) is not None:
        return [(s, None) for s in srcs]
    idx = module_matrix(block, [bm.shapes[s] for s in srcs], out_shape).indices().cpu()
    found = []
    start = 0
    for s in srcs:
        n = bm.slots[s]
        inside = (idx[1] >= start) & (idx[1] < start + n)
        part = idx[:, inside].clone()
        part[1] -= start
        found.append((s, part))
        start += n
    return found


@contextmanager
def _eval_mode(module: nn.Module):
    """Every submodule in eval mode for the duration; each one's mode restored after."""
    modes = [(sub, sub.training) for sub in module.modules()]
    try:
        module.eval()
        yield
    finally:
        for sub, mode in modes:
            sub.training = mode


def _structure(bm: BlockMap, cell: int) -> tuple[Tensor, tuple[int, ...]]:
    """The structure image with ``cell x cell`` entries per pixel (max over the square)."""
    bounds = [0]
    for n in bm.slots.values():
        bounds.append(bounds[-1] + n)
    total = bounds[-1]
    side = -(-total // cell)
    check_bytes(tensor_bytes(side * side, torch.float32),
                f"the structure image of the map ({side}x{side} pixels, float32)")
    image = torch.zeros(side, side, dtype=torch.float32)
    offset = dict(zip(bm.slots, bounds))
    with _eval_mode(bm):
        for dst, src in bm.edges:
            n_out, r0 = bm.slots[dst], offset[dst]
            rows = slice(r0 // cell, (r0 + n_out - 1) // cell + 1)
            for s, pat in _block_patterns(bm, dst, src):
                n_in, c0 = bm.slots[s], offset[s]
                cols = slice(c0 // cell, (c0 + n_in - 1) // cell + 1)
                if pat is None:
                    image[rows, cols] = torch.clamp(image[rows, cols], min=OPAQUE)
                elif isinstance(pat, str):
                    image[rows, cols] = WEIGHT
                elif pat.numel():
                    image[(pat[0] + r0) // cell, (pat[1] + c0) // cell] = WEIGHT
    return image, tuple(bounds)


def structure_matrix(m: BlockMap | nn.Module, /) -> tuple[Tensor, tuple[int, ...]]:
    """The data of the spy plot: ``(mask, boundaries)``.

    ``mask`` is an ``(N, N)`` float32 tensor over the packed state (``N = m.size``, slots
    in order, each flattened row-major as in ``m.pack``), row = destination slot,
    column = source slot, as the block matrix ``F``: :data:`WEIGHT` (1.0) at every entry
    of a block's weight pattern — every entry of a dense ``nn.Linear`` between vector
    slots, the stored pattern (``indices()``) of a sparse block, the non-zeros of
    ``dense_weight()`` for other structured blocks, the diagonal of an element-wise
    block, the non-zeros of :func:`~iternn.dynamics.matrix.as_matrix`'s matrix for any
    other linear block (a convolution shows its block-Toeplitz pattern, a pooling layer
    its windows), the composed pattern of an ``nn.Sequential`` of those —,
    :data:`OPAQUE` (0.5) over the whole of a block that is another kind of module, and
    0 where there is no block. A block reading several slots shows its columns over each
    source: its matrix's pattern where it declares itself linear, :data:`OPAQUE` over
    each source's columns otherwise. Patterns are read with the map in eval mode
    (dropout off, batch normalisation with its running statistics; every module's mode
    is restored afterwards). ``boundaries`` are the slot offsets ``(0, n_1, n_1 + n_2,
    ..., N)``: slot ``i`` covers rows and columns ``boundaries[i]:boundaries[i + 1]``.
    """
    return _structure(as_block_map(m), 1)


def plot_structure(
    m: BlockMap | nn.Module,
    /,
    path: PathLike | None = None,
    *,
    hold: Collection[str] = (),
    title: str | None = None,
) -> Figure | Path:
    """Spy plot of the block matrix (row = destination slot, column = source slot).

    Black: entries of a block's weight pattern (dense blocks filled, sparse blocks their
    actual pattern, a convolution its block-Toeplitz pattern: any linear block its
    matrix's non-zeros); grey: blocks whose module is not a linear map (a transformer
    layer, a nested map, a gate: over each of its sources); red lines: slot boundaries;
    slot names on both axes (held slots marked). Maps with more than 1024 state entries are drawn at a coarser
    resolution (a pixel is black if any entry in it is). See :func:`structure_matrix`.
    """
    bm = as_block_map(m)
    hold = check_hold(bm, hold)
    total = bm.size
    cell = max(1, -(-total // _MAX_CELLS))
    image, bounds = _structure(bm, cell)
    side = image.shape[0] * cell
    fig = _figure(6.4, 6.0, constrained=True)
    ax = fig.add_subplot()
    ax.imshow(image.numpy(), cmap="Greys", vmin=0.0, vmax=1.0, interpolation="nearest",
              extent=(0, side, side, 0), aspect="equal")
    ax.set_xlim(0, total)
    ax.set_ylim(total, 0)
    for b in bounds[1:-1]:
        ax.axhline(b, color="tab:red", lw=0.8)
        ax.axvline(b, color="tab:red", lw=0.8)
    names = [f"{s} (held)" if s in hold else s for s in bm.slots]
    centres = [(bounds[i] + bounds[i + 1]) / 2 for i in range(len(names))]
    ax.set_xticks(centres, names, rotation=90 if len(names) > 6 else 0)
    ax.set_yticks(centres, names)
    ax.tick_params(length=0)
    ax.set_xlabel("source slot (column)")
    ax.set_ylabel("destination slot (row)")
    ax.xaxis.set_label_position("top")
    ax.xaxis.tick_top()
    n_blocks = len(bm.edges)
    res = f", {cell}x{cell} entries per pixel" if cell > 1 else ""
    ax.set_title(title or f"block structure: {total}x{total}, {n_blocks} block"
                 f"{'s' if n_blocks != 1 else ''}{res}", pad=12)
    from matplotlib.patches import Patch

    handles = [Patch(facecolor="black", label="weight entry")]
    if bool((image == OPAQUE).any()):
        handles.append(Patch(facecolor="0.5", label="module block (pattern unknown)"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
    return _finish(fig, path)


# ---------------------------------------------------------------------------- spectra
def plot_eigenvalues(
    eigs: Tensor | Sequence[complex], path: PathLike | None = None, *, title: str | None = None
) -> Figure | Path:
    """Eigenvalues in the complex plane with the unit circle (``|λ| = 1``).

    ``eigs``: any shape (flattened), real or complex. Inside the circle the
    linearisation contracts, outside it expands.
    """
    ev = _tensor(eigs, "eigs").flatten()
    ev = ev if ev.is_complex() else ev.to(torch.complex128)
    ev = ev[torch.isfinite(ev.real) & torch.isfinite(ev.imag)]
    fig = _figure(5.6, 5.2, left=0.14, right=0.97, bottom=0.1, top=0.93)
    ax = fig.add_subplot()
    theta = torch.linspace(0, 2 * math.pi, 361, dtype=torch.float64)
    ax.plot(torch.cos(theta).numpy(), torch.sin(theta).numpy(), "--", color="0.4", lw=1,
            label="unit circle")
    ax.axhline(0, color="0.8", lw=0.8, zorder=0)
    ax.axvline(0, color="0.8", lw=0.8, zorder=0)
    radius = float(ev.abs().max()) if ev.numel() else 0.0
    if ev.numel():
        outside = ev.abs() > 1
        ax.scatter(ev.real[~outside].numpy(), ev.imag[~outside].numpy(), s=22,
                   color="tab:blue", label="|λ| ≤ 1", zorder=3)
        if bool(outside.any()):
            ax.scatter(ev.real[outside].numpy(), ev.imag[outside].numpy(), s=22,
                       color="tab:red", label="|λ| > 1", zorder=3)
        # Coinciding eigenvalues (e.g. the exact zeros of a nilpotent map) get a count.
        keys = torch.round(torch.stack([ev.real, ev.imag], dim=-1) * 1e6)
        uniq, counts = torch.unique(keys, dim=0, return_counts=True)
        for key, count in zip(uniq.tolist(), counts.tolist()):
            if count > 1:
                ax.annotate(f"×{count}", (key[0] / 1e6, key[1] / 1e6), xytext=(6, 6),
                            textcoords="offset points", fontsize="small")
    lim = max(1.15, 1.1 * radius)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_xlabel("Re λ")
    ax.set_ylabel("Im λ")
    ax.set_title(title or f"Jacobian eigenvalues ({ev.numel()}, max |λ| = {_num(radius)})")
    ax.legend(loc="upper right", fontsize="small")
    return _finish(fig, path)


def plot_singular_values(
    s: Tensor | Sequence[float], path: PathLike | None = None, *, title: str | None = None
) -> Figure | Path:
    """Singular values, largest first, on a log scale (exact zeros marked).

    ``s``: ``(k,)``, or ``(B, k)`` for one curve per row. The line ``σ = 1`` separates
    expanding from contracting directions.
    """
    sv = _tensor(s, "s")
    rows = sv.reshape(1, -1) if sv.dim() <= 1 else sv.reshape(-1, sv.shape[-1])
    fig = _figure()
    ax = fig.add_subplot()
    any_zero = False
    for i, row in enumerate(rows):
        row = torch.sort(row, descending=True).values
        y, zero, _ = _log_values(row)
        x = torch.arange(1, row.numel() + 1)
        label = "singular values" if rows.shape[0] == 1 else f"element {i}"
        ax.plot(x[~zero].numpy(), y[~zero].numpy(), "o-", ms=4, label=label)
        if bool(zero.any()):
            ax.plot(x[zero].numpy(), y[zero].numpy(), "v", color="0.3", ms=6,
                    label="exactly 0 (drawn at the bottom)" if not any_zero else None)
            any_zero = True
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(_integer_locator())
    ax.axhline(1.0, color="tab:red", ls="--", lw=1, label="σ = 1")
    ax.set_xlabel("index (descending)")
    ax.set_ylabel("singular value σ")
    top = float(rows.max()) if rows.numel() else 0.0
    ax.set_title(title or f"Jacobian singular values (max σ = {_num(top)})")
    ax.legend(fontsize="small")
    ax.grid(True, which="major", alpha=0.3)
    return _finish(fig, path)


# ---------------------------------------------------------------------------- impulse
def _curves(data: Any) -> list[tuple[str, Tensor, float | None]]:
    if isinstance(data, ImpulseResponse):
        return [("response", data.norm.detach().cpu().to(torch.float64),
                 float(data.structural_length))]
    if isinstance(data, Mapping):
        out = []
        for label, item in data.items():
            for _, norm, length in _curves(item):
                out.append((str(label), norm, length))
        if not out:
            raise DynamicsError("plot_impulse_response got an empty mapping")
        return out
    norm = _tensor(data, "norms").flatten()
    if norm.is_complex():
        raise DynamicsError("impulse-response norms must be real")
    return [("response", norm, None)]


def plot_impulse_response(
    result_or_norms: ImpulseResponse | Tensor | Sequence[float] | Mapping[str, Any],
    path: PathLike | None = None,
    *,
    structural_length: float | None = None,
    title: str | None = None,
) -> Figure | Path:
    """Response norm ``||δz_t||`` per application ``t`` on a log scale.

    ``result_or_norms``: an :class:`~iternn.dynamics.ImpulseResponse` (its structural
    length is drawn), a 1-D sequence of norms, or a mapping ``label -> either`` for
    several curves. Exact zeros (a nilpotent map past its structural length) are drawn
    at the bottom of the axis with a ``v`` marker. ``structural_length`` overrides the
    one of the result(s); a finite length is drawn as a dashed vertical line, an
    infinite one is named in the legend.
    """
    curves = _curves(result_or_norms)
    fig = _figure()
    ax = fig.add_subplot()
    all_vals = torch.cat([c[1] for c in curves])
    _, _, floor = _log_values(all_vals)
    drawn: set[float] = set()
    any_zero = False
    for label, norm, length in curves:
        if structural_length is not None:
            length = float(structural_length)
        t = torch.arange(norm.numel())
        zero = norm == 0
        y = torch.where(zero, torch.full_like(norm, floor), norm)
        name = label
        if length is not None:
            name += f" (structural length {_num(length)})"
        line = ax.plot(t[~zero].numpy(), y[~zero].numpy(), "o-", ms=3, label=name)[0]
        if bool(zero.any()):
            ax.plot(t[zero].numpy(), y[zero].numpy(), "v", color=line.get_color(), ms=6)
            any_zero = True
        if length is not None and math.isfinite(length) and length not in drawn:
            drawn.add(length)
            ax.axvline(length, color=line.get_color(), ls="--", lw=1)
    if any_zero:  # one neutral legend entry for the zero markers of every curve
        ax.plot([], [], "v", color="0.3", ms=6, label="exactly 0 (drawn at the bottom)")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(_integer_locator())
    ax.set_xlabel("application t")
    ax.set_ylabel("response norm ||δz_t||")
    ax.set_title(title or "impulse response")
    ax.legend(fontsize="small")
    ax.grid(True, which="major", alpha=0.3)
    return _finish(fig, path)


# ---------------------------------------------------------------------------- trajectories
def _trajectory_points(
    traj: Any, slots: Collection[str] | None, map: BlockMap | None = None
) -> tuple[Tensor, str]:
    """``(T, B, n)`` float64 from a tensor or a ``slot -> (T, *batch, n)`` trajectory (with
    ``map``, a slot's trailing dims are its shape, flattened)."""
    if isinstance(traj, Mapping):
        names = list(traj) if slots is None else list(slots)
        unknown = [s for s in names if s not in traj]
        if unknown:
            raise DynamicsError(f"slots {unknown} are not in the trajectory {list(traj)}")
        if not names:
            raise DynamicsError("no slots to plot")
        parts = []
        for s in names:
            v = _tensor(traj[s], f"trajectory of slot {s!r}")
            shape = map.shapes[s] if map is not None and s in map.shapes else v.shape[-1:]
            if v.dim() < 1 + len(shape) or tuple(v.shape[v.dim() - len(shape):]) != tuple(shape):
                want = "(T, *batch, " + ", ".join(str(d) for d in shape) + ")"
                raise DynamicsError(
                    f"trajectory of slot {s!r} must be {want}, got {tuple(v.shape)}"
                )
            parts.append(v.reshape(v.shape[0], -1, math.prod(shape)))
        shapes = {p.shape[:2] for p in parts}
        if len(shapes) != 1:
            raise DynamicsError("the slots' trajectories differ in length or batch")
        return torch.cat(parts, dim=-1), ", ".join(names)
    x = _tensor(traj, "trajectory")
    if x.is_complex():
        raise DynamicsError("trajectories must be real")
    if x.dim() == 1:
        x = x.unsqueeze(-1)
    if x.dim() < 2:
        raise DynamicsError(f"trajectory must be (T, n) or (T, *batch, n), got {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1, x.shape[-1]), "state"


def _pca2(x: Tensor) -> tuple[Tensor, Tensor]:
    """Project ``(P, n)`` points on their two leading principal components.

    Returns ``(projection (P, 2), explained variance ratio (2,))`` (via
    ``torch.linalg.svd``; the sign of each component is fixed so that its largest
    loading is positive, for deterministic pictures).
    """
    # Computed on the points scaled to at most 1 in size (huge states, as from a map
    # that diverges, would overflow the variances), then scaled back.
    scale = float(x.abs().max()) if x.numel() else 0.0
    scale = scale if 0 < scale < math.inf else 1.0
    xs = x / scale
    centred = xs - xs.mean(dim=0, keepdim=True)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    k = min(2, vh.shape[0])
    comps = vh[:k]
    signs = torch.sign(comps.gather(1, comps.abs().argmax(dim=1, keepdim=True)))
    comps = comps * torch.where(signs == 0, torch.ones_like(signs), signs)
    proj = (centred @ comps.t()) * scale
    var = s**2
    ratio = var[:k] / var.sum() if float(var.sum()) > 0 else torch.zeros(k, dtype=x.dtype)
    # A component with a rounding-level share of the variance (relative size 1e-12)
    # is noise: draw it flat.
    proj[:, ratio < 1e-24] = 0.0
    if k < 2:
        proj = torch.cat([proj, torch.zeros_like(proj)], dim=1)
        ratio = torch.cat([ratio, torch.zeros(1, dtype=ratio.dtype)])
    return proj, ratio


def plot_trajectories(
    traj_or_tensor: Tensor | Mapping[str, Tensor],
    path: PathLike | None = None,
    *,
    slots: Collection[str] | None = None,
    map: BlockMap | None = None,
    title: str | None = None,
) -> Figure | Path:
    """A trajectory (or several) projected to 2-D by PCA, coloured by time.

    ``traj_or_tensor``: a ``(T, n)`` or ``(T, *batch, n)`` tensor (time first, one curve
    per batch element), or the ``slot -> (T, *batch, *shape)`` dict of
    ``iternn.iterate(..., trajectory=True)`` (the named ``slots``, default all, are
    flattened and concatenated; pass the ``map`` for slots with a shape of more than one
    dim, whose trailing dims are otherwise read as batch and features). The principal
    components are those of all points together (``torch.linalg.svd``). A
    one-dimensional state is drawn as its return map ``(z_t, z_{t+1})`` instead.
    """
    x, what = _trajectory_points(traj_or_tensor, slots, map)
    steps, batch, n = x.shape
    if steps == 0:
        raise DynamicsError("the trajectory is empty")
    finite = torch.isfinite(x).all(dim=-1)  # (T, B)
    fig = _figure(6.4, 5.2)
    ax = fig.add_subplot()
    if n == 1:
        if steps < 2:
            raise DynamicsError("a return map needs a trajectory of at least 2 states")
        a, b = x[:-1, :, 0], x[1:, :, 0]
        ok = finite[:-1] & finite[1:]
        t = torch.arange(steps - 1, dtype=torch.float64).unsqueeze(1).expand(-1, batch)
        sc = ax.scatter(a[ok].numpy(), b[ok].numpy(), c=t[ok].numpy(), s=10, cmap="viridis")
        lo = float(torch.minimum(a[ok].min(), b[ok].min())) if bool(ok.any()) else 0.0
        hi = float(torch.maximum(a[ok].max(), b[ok].max())) if bool(ok.any()) else 1.0
        ax.plot([lo, hi], [lo, hi], "--", color="0.5", lw=1, label="z_{t+1} = z_t")
        ax.set_xlabel(f"{what} z_t")
        ax.set_ylabel(f"{what} z_(t+1)")
        ax.legend(fontsize="small")
        ax.set_title(title or f"return map of a 1-D trajectory ({steps} states)")
    else:
        pts = x[finite]
        if pts.shape[0] == 0:
            raise DynamicsError("the trajectory has no finite state to plot")
        proj_all, ratio = _pca2(pts)
        # Scatter every finite point coloured by time, one line per batch element.
        full = torch.full((steps, batch, 2), float("nan"), dtype=torch.float64)
        full[finite] = proj_all
        t = torch.arange(steps, dtype=torch.float64).unsqueeze(1).expand(-1, batch)
        for b in range(batch):
            ax.plot(full[:, b, 0].numpy(), full[:, b, 1].numpy(), "-", color="0.6", lw=0.8,
                    zorder=1)
            first = int(torch.nonzero(finite[:, b]).min()) if bool(finite[:, b].any()) else None
            if first is not None:
                last = int(torch.nonzero(finite[:, b]).max())
                ax.plot(*full[first, b].numpy(), "o", color="black", ms=6, zorder=3,
                        label="start" if b == 0 else None)
                ax.plot(*full[last, b].numpy(), "X", color="tab:red", ms=8, zorder=3,
                        label="end" if b == 0 else None)
        sc = ax.scatter(full[..., 0][finite].numpy(), full[..., 1][finite].numpy(),
                        c=t[finite].numpy(), s=10, cmap="viridis", zorder=2)
        ax.set_xlabel(f"PC1 ({100 * float(ratio[0]):.1f}% of variance)")
        ax.set_ylabel(f"PC2 ({100 * float(ratio[1]):.1f}% of variance)")
        ax.legend(fontsize="small")
        curves = f", {batch} trajectories" if batch > 1 else ""
        ax.set_title(title or f"trajectory of {what} ({n} dims, {steps} states{curves}), PCA")
    fig.colorbar(sc, ax=ax, label="application t")
    return _finish(fig, path)


# ---------------------------------------------------------------------------- bifurcation
class _ScaledBlock(nn.Module):
    """``x -> inner(0) + scale · (inner(x) − inner(0))``: for an affine block ``Wx + b``
    exactly ``(scale · W) x + b``. A block reading several slots is scaled about its
    value with every source at zero."""

    def __init__(self, inner: nn.Module, n_in: int | None = None,
                 n_out: int | None = None) -> None:
        super().__init__()
        self.inner = inner
        if n_in is not None and n_out is not None:  # vector slots: no probe on connect
            self.in_features = n_in
            self.out_features = n_out
        self.scale = 1.0

    def forward(self, *xs: Tensor) -> Tensor:
        y = self.inner(*xs)
        if self.scale == 1.0:
            return y
        y0 = self.inner(*(torch.zeros_like(x) for x in xs))
        return y0 + self.scale * (y - y0)


@dataclass(frozen=True)
class BifurcationData:
    """What :func:`bifurcation_data` computed.

    Attributes:
        params: ``(P,)`` float64 parameter values.
        values: ``(P, keep · B)`` float64: the last ``keep`` values of the coordinate per
            parameter value (``B`` batch elements of the state), ``nan`` where the
            trajectory left the finite numbers.
        slot, index: the coordinate plotted (``index`` into the slot flattened row-major).
        parameter: a description of the parameter (``"scale on block h <- h"``).
        steps, keep: applications made and values kept per parameter value.
    """

    params: Tensor
    values: Tensor
    slot: str
    index: int
    parameter: str
    steps: int
    keep: int


def _default_block(bm: BlockMap, hold: tuple[str, ...]) -> tuple[str, Source]:
    """The first block inside a cycle among free slots, else the first block into a free
    slot (a block reading several slots is inside the cycle when any source is)."""
    graph = bm.graph().without_inputs_to(hold)
    cyclic: dict[str, int] = {}
    for i, comp in enumerate(graph.components()):
        if graph.is_cyclic(comp):
            for s in comp:
                cyclic[s] = i
    for d, s in bm.edges:
        if d in cyclic and any(cyclic.get(x) == cyclic[d] for x in source_slots(s)):
            return d, s
    for d, s in bm.edges:
        if d not in hold:
            return d, s
    raise DynamicsError("the map has no block writing into a free slot: nothing to scale")


def bifurcation_data(
    m: BlockMap | nn.Module,
    state: Mapping[str, Tensor],
    /,
    *,
    param_values: Sequence[float] | Tensor,
    scale_block: tuple[str, str] | Callable[[BlockMap, float], Any] | None = None,
    hold: Collection[str] = (),
    steps: int = 200,
    keep: int = 50,
    slot: str | None = None,
    index: int = 0,
    update: str = "jacobi",
) -> BifurcationData:
    """Iterate a one-parameter family of maps and keep the tail of one coordinate.

    For every value ``p`` of ``param_values`` the map is iterated ``steps`` times from
    ``state`` (held slots fixed) and the last ``keep`` values of coordinate ``index`` of
    ``slot`` (``state[slot][..., index]`` for a vector slot) are kept: a fixed point
    gives one value per ``p``, a period-``k`` orbit ``k`` values, chaos a smear. The
    user's map is never modified: the family is built on deep copies.

    Args:
        m: the block map (or a module with ``.map``).
        state: initial state (missing free slots start at zero) and the held values;
            ``shape`` or ``(*batch, *shape)`` per slot (every batch element is one more
            trajectory on the diagram).
        param_values: the parameter values (finite, at least one).
        scale_block: ``(dst, src)`` (``src`` a slot, or the tuple of slots of a block
            reading several): the parameter is a scale ``p`` on that block's
            weight, ``W -> p · W`` (exact for affine blocks; for any other module the
            block's output is scaled about its value at zero,
            ``F(0) + p · (F(x) − F(0))``). Default: the first block inside a cycle of
            free slots (the recurrence), else the first block into a free slot. Or a
            callable ``fn(map_copy, p)`` that sets the parameter on a fresh deep copy of
            the map for every ``p`` (in place, or returning the map to use).
        hold: slots kept at their value (the input).
        steps: applications per parameter value (``>= 1``).
        keep: values kept from the end (``1 <= keep <= steps``).
        slot: the slot of the coordinate; default the destination of ``scale_block``
            (or the first free slot for a callable).
        index: the coordinate within ``slot`` (flattened row-major for a shaped slot).
        update: ``"jacobi"`` or ``"ordered"`` (see :func:`iternn.iterate`).
    """
    bm = as_block_map(m)
    hold = check_hold(bm, hold)
    update = check_update(update)
    steps = check_int(steps, "steps", 1)
    keep = check_int(keep, "keep", 1)
    if keep > steps:
        raise DynamicsError(f"keep must be at most steps ({steps}), got {keep}")
    params = _tensor(param_values, "param_values").flatten()
    if params.is_complex() or params.numel() == 0 or not bool(torch.isfinite(params).all()):
        raise DynamicsError("param_values must be at least one finite real number")
    full, batch = check_state(bm, state, hold)
    setter: Callable[[BlockMap, float], Any] | None = None
    if callable(scale_block):
        setter = scale_block
        parameter = getattr(scale_block, "__name__", "")
        if not parameter.isidentifier():  # a lambda or a callable object
            parameter = "parameter"
        default_slot = next((s for s in bm.slots if s not in hold), None)
    else:
        if scale_block is None:
            dst, src = _default_block(bm, hold)
        else:
            if (not isinstance(scale_block, (tuple, list)) or len(scale_block) != 2
                    or not isinstance(scale_block[0], str)
                    or not (isinstance(scale_block[1], str) or (
                        isinstance(scale_block[1], (tuple, list)) and scale_block[1]
                        and all(isinstance(s, str) for s in scale_block[1])))):
                raise DynamicsError(
                    f"scale_block must be (dst, src) slot names or a callable, got {scale_block!r}"
                )
            dst, src = scale_block
            if isinstance(src, (tuple, list)):
                src = src[0] if len(src) == 1 else tuple(src)
            if (dst, src) not in bm.edges:
                raise DynamicsError(f"there is no block {dst!r} <- {src!r} to scale")
            if dst in hold:
                raise DynamicsError(
                    f"block {dst!r} <- {src!r} writes into the held slot {dst!r}: it is never "
                    "evaluated, scaling it changes nothing"
                )
        parameter = f"scale on block {dst} <- {src}"
        default_slot = dst
    if slot is None:
        slot = default_slot
    if not isinstance(slot, str) or slot not in bm.slots:
        raise DynamicsError(f"slot must name a slot of the map {list(bm.slots)}, got {slot!r}")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < bm.slots[slot]:
        raise DynamicsError(
            f"index must be an int in [0, {bm.slots[slot]}) for slot {slot!r}, got {index!r}"
        )
    start = {s: v.detach() for s, v in full.items()}

    def tail(mc: BlockMap) -> Tensor:
        with torch.no_grad():
            traj = iterate(mc, start, steps, hold=hold, trajectory=True, update=update)
        rank = len(mc.shapes[slot])
        v = traj[slot][-keep:].flatten(-rank)[..., index].to(torch.float64).reshape(-1).cpu()
        return torch.where(torch.isfinite(v), v, torch.full_like(v, float("nan")))

    rows = []
    if setter is not None:
        for p in params.tolist():
            mc = copy.deepcopy(bm)
            out = setter(mc, p)
            rows.append(tail(out if isinstance(out, BlockMap) else mc))
    else:
        mc = copy.deepcopy(bm)
        inner = mc.disconnect(dst, src)
        vector = isinstance(src, str) and len(bm.shapes[src]) == 1 and len(bm.shapes[dst]) == 1
        wrapper = mc.connect(dst, src, _ScaledBlock(inner, bm.slots[src], bm.slots[dst])
                             if vector else _ScaledBlock(inner))
        for p in params.tolist():
            wrapper.scale = float(p)
            rows.append(tail(mc))
    return BifurcationData(params=params, values=torch.stack(rows), slot=slot, index=index,
                           parameter=parameter, steps=steps, keep=keep)


def _draw_bifurcation(data: BifurcationData, path: PathLike | None, title: str | None):
    fig = _figure(6.4, 4.8)
    ax = fig.add_subplot()
    per = data.values.shape[1]
    x = data.params.unsqueeze(1).expand(-1, per)
    ok = torch.isfinite(data.values)
    size = 6.0 if int(ok.sum()) < 5000 else 1.5
    ax.scatter(x[ok].numpy(), data.values[ok].numpy(), s=size, color="black", alpha=0.6,
               linewidths=0)
    ax.set_xlabel(data.parameter)
    ax.set_ylabel(f"{data.slot}[{data.index}]")
    lost = int((~ok).sum())
    extra = f"; {lost} non-finite values left out" if lost else ""
    ax.set_title(title or f"bifurcation diagram: last {data.keep} of {data.steps} "
                 f"applications{extra}", fontsize="medium")
    ax.grid(True, alpha=0.3)
    return _finish(fig, path)


def plot_bifurcation(
    m: BlockMap | nn.Module,
    state: Mapping[str, Tensor],
    /,
    *,
    param_values: Sequence[float] | Tensor,
    scale_block: tuple[str, str] | Callable[[BlockMap, float], Any] | None = None,
    hold: Collection[str] = (),
    steps: int = 200,
    keep: int = 50,
    slot: str | None = None,
    index: int = 0,
    update: str = "jacobi",
    path: PathLike | None = None,
    title: str | None = None,
) -> Figure | Path:
    """Bifurcation diagram: the last ``keep`` values of ``slot[index]`` against the
    parameter. Arguments as :func:`bifurcation_data` (the user's map is not modified)."""
    data = bifurcation_data(m, state, param_values=param_values, scale_block=scale_block,
                            hold=hold, steps=steps, keep=keep, slot=slot, index=index,
                            update=update)
    return _draw_bifurcation(data, path, title)


# ---------------------------------------------------------------------------- Lyapunov
def plot_lyapunov(
    spectrum: Tensor | Sequence[float], path: PathLike | None = None, *, title: str | None = None
) -> Figure | Path:
    """A Lyapunov spectrum: exponent ``λ_i`` against ``i`` (largest first), with 0 marked.

    ``spectrum``: ``(k,)``, or ``(B, k)`` for one series per row. ``-inf`` exponents
    (a nilpotent map) are drawn as ``v`` markers at the bottom of the axis.
    """
    sp = _tensor(spectrum, "spectrum")
    if sp.is_complex():
        raise DynamicsError("Lyapunov exponents must be real")
    rows = sp.reshape(1, -1) if sp.dim() <= 1 else sp.reshape(-1, sp.shape[-1])
    fig = _figure()
    ax = fig.add_subplot()
    finite = rows[torch.isfinite(rows)]
    if finite.numel():
        lo, hi = float(finite.min()), float(finite.max())
    else:
        lo, hi = -1.0, 1.0
    span = max(hi - lo, abs(hi), abs(lo), 1e-3)
    bottom = min(lo, 0.0) - 0.15 * span
    top = max(hi, 0.0) + 0.15 * span
    ax.axhline(0.0, color="tab:red", ls="--", lw=1, label="0 (chaos above)")
    ninf_label = True
    for i, row in enumerate(rows):
        idx = torch.arange(1, row.numel() + 1)
        ok = torch.isfinite(row)
        label = "exponents" if rows.shape[0] == 1 else f"element {i}"
        if bool(ok.any()):
            ax.plot(idx[ok].numpy(), row[ok].numpy(), "o-", ms=6, label=label)
        neg = row == -math.inf
        if bool(neg.any()):
            ax.plot(idx[neg].numpy(), [bottom + 0.05 * (top - bottom)] * int(neg.sum()), "v",
                    color="0.2", ms=9, label="−∞" if ninf_label else None)
            ninf_label = False
    ax.set_ylim(bottom, top)
    ax.set_xlabel("exponent index i")
    ax.set_ylabel("λ_i (nats per application)")
    if rows.numel():
        ax.set_xticks(range(1, rows.shape[1] + 1))
        first = float(rows[0, 0])
        ax.set_title(title or f"Lyapunov spectrum (λ1 = {_num(first)})")
    else:
        ax.set_title(title or "Lyapunov spectrum (empty)")
    ax.legend(fontsize="small")
    ax.grid(True, alpha=0.3)
    return _finish(fig, path)


# ---------------------------------------------------------------------------- positions
#: :func:`plot_propagation` draws at most this many applications (the first ones).
_MAX_PANELS = 16


def plot_propagation(
    prop: Tensor | Sequence, path: PathLike | None = None, *, title: str | None = None
) -> Figure | Path:
    """Propagation across positions: one ``T x T`` image per application ``k``.

    ``prop``: ``(steps, T, T)`` as returned by
    :func:`~iternn.dynamics.propagation.propagation` for one sequence (``[k − 1, j, i]``
    = ``‖∂z^(k)_j / ∂z^(0)_i‖``), or one ``(T, T)`` matrix. Row = destination position
    ``j``, column = source position ``i`` (a causal map is lower-triangular); one
    logarithmic colour scale for all panels, exact zeros white. At most 16 applications
    are drawn (the first ones; the title says so).
    """
    p = _tensor(prop, "propagation")
    if p.is_complex():
        raise DynamicsError("propagation norms must be real")
    if p.dim() == 2:
        p = p.unsqueeze(0)
    if p.dim() != 3 or p.shape[-1] != p.shape[-2] or not p.numel():
        raise DynamicsError(
            "propagation must be (steps, T, T) or (T, T) for one sequence (select a batch "
            f"element first), got shape {tuple(p.shape)}"
        )
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm

    steps, length = p.shape[0], p.shape[-1]
    shown = min(steps, _MAX_PANELS)
    cols = min(shown, 4)
    rows = -(-shown // cols)
    fig = _figure(2.4 * cols + 1.4, 2.4 * rows + 0.9, constrained=True)
    axes = fig.subplots(rows, cols, squeeze=False)
    positive = p[torch.isfinite(p) & (p > 0)]
    scale = (LogNorm(vmin=float(positive.min()), vmax=float(positive.max()))
             if positive.numel() else LogNorm(vmin=1.0, vmax=10.0))
    cmap = colormaps["viridis"].with_extremes(bad="white")
    image = None
    for k, ax in enumerate(axes.flat):
        if k >= shown:
            ax.set_axis_off()
            continue
        data = np.ma.masked_where(~(p[k] > 0).numpy(), p[k].numpy())
        image = ax.imshow(data, cmap=cmap, norm=scale, interpolation="nearest")
        ax.set_title(f"k = {k + 1}", fontsize="medium")
        ax.xaxis.set_major_locator(_integer_locator())
        ax.yaxis.set_major_locator(_integer_locator())
        if k % cols == 0:
            ax.set_ylabel("destination position j")
        if k // cols == rows - 1 or k + cols >= shown:
            ax.set_xlabel("source position i")
    fig.colorbar(image, ax=axes, shrink=0.9,
                 label=r"$\|\partial z^{(k)}_j / \partial z^{(0)}_i\|$ (white: exactly 0)")
    more = f", first {shown} of {steps} applications" if shown < steps else ""
    fig.suptitle(title or f"propagation across {length} positions{more}")
    return _finish(fig, path)
