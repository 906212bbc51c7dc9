"""The compiled CSR kernels: build ``csr_kernels.c`` with the system C compiler, load it.

:mod:`iternn.sparse.kernels` runs ``SparseLinear``'s CSR backend on CPU through these
kernels when they are available, and through ``torch.sparse`` (MKL) otherwise; the
results agree to float rounding (tested). They are faster because they read and write
the batch in whatever layout it comes (no transposed copies), keep each batch tile of
the operand cache-resident, compute both gradients in one pass over the transposed
pattern (:func:`linear_backward`) and take the values in that pattern's order through
its permutation inside the call, without a permuted copy (``csr_kernels.c`` explains
the layout and the measurements: on a 4096 x 4096 block, batch 256, forward + backward,
one thread, 3.4x the torch.sparse path at density 0.1). :func:`spmm_parts` and
:func:`sdd_parts` run one product over several blocks that share a destination, without
concatenating them.

The library is compiled on first use (about a second) with ``-O3 -march=native`` and
OpenMP where the compiler has them, and cached in :func:`cache_dir`
(``$ITERNN_CACHE_DIR``, else ``~/.cache/iternn``) per source, compiler and CPU, as
:mod:`iternn.core.native` describes.

They use ``torch.get_num_threads()`` threads, except in a process forked after they
ran (OpenMP's thread pool does not survive ``fork``), where they run on one thread.

``ITERNN_NATIVE=0`` turns the kernels off (everything then runs on ``torch.sparse``).
When a build fails, iternn warns once and falls back; :func:`status` says why, and
:func:`build` raises :class:`NativeBuildError` with the compiler's message.
"""

from __future__ import annotations

import ctypes
import os
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from ..core.native import CSource, NativeLoader, NativeStatus, cache_dir, compiler, open_library
from ..errors import MapError, MapTypeError, NativeBuildError, PatternError, SizeError
from .checks import check_csr_buffers, ensure_csr_pattern

__all__ = [
    "NativeBuildError",
    "NativeStatus",
    "SOURCE",
    "available",
    "build",
    "cache_dir",
    "library",
    "linear_backward",
    "sdd",
    "sdd_parts",
    "spmm",
    "spmm_parts",
    "status",
]

#: The C source of the kernels (shipped with the package).
SOURCE = Path(__file__).with_name("csr_kernels.c")
_ABI = 3  # iternn_kernels_abi() of the source this module was written for
_FLAG_SETS = (
    ("-O3", "-march=native", "-fopenmp"),
    ("-O3", "-march=native"),  # a compiler without OpenMP (Apple's clang): one thread
    ("-O3",),
)
_SOURCE = CSource(SOURCE, "csr_kernels", _FLAG_SETS)
_compiler, _compile = compiler, _SOURCE.compile  # a build with any flag set (tests)


def build(*, force: bool = False) -> Path:
    """Compile the kernels (unless a build for this source, compiler and CPU is cached,
    or ``force``) and return the library's path. Tries ``-march=native`` with OpenMP,
    then without OpenMP, then plain ``-O3``. Raises :class:`NativeBuildError`."""
    return _SOURCE.build(force=force)[0]


class _Library:
    """The loaded shared library with typed entry points."""

    def __init__(self, path: Path, flags: tuple[str, ...]) -> None:
        lib = open_library(path, "iternn_kernels_abi", _ABI)
        i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        signatures = {
            "spmm_parts": [i64, i64, i64, ptr, ptr, i64, i64, ptr, cint],
            "sdd_parts": [i64, i64, i64, ptr, ptr, i64, i64, cint],
            "linear_backward": [i64, i64, ptr, ptr, i64, i64, ptr, i64, i64, ptr, cint],
        }
        for entry, argtypes in signatures.items():
            table = {}
            for dtype, suffix in ((torch.float32, "f32"), (torch.float64, "f64")):
                f = getattr(lib, f"iternn_{entry}_{suffix}")
                f.argtypes = argtypes
                f.restype = cint
                table[dtype] = f
            setattr(self, entry, table)
        self.path = path
        self.flags = flags
        self._handle = lib


_loader = NativeLoader(_SOURCE, _Library, "iternn: the native CSR kernels are unavailable, "
                       "using torch.sparse instead (slower).")
_state = _loader.state  # the remembered outcome (tests save and restore it)

#: The loaded kernels (built on first call) or None; whether they are in use and why not;
#: True when they are in use. Each outcome is remembered for the process.
library, status, available = _loader.library, _loader.status, _loader.available
_reset = _loader.reset  # forget the outcome (tests: to re-read the environment)


# ----------------------------------------------------------------------------- calls
# GNU OpenMP's thread pool does not survive fork(): a child process forked after the
# kernels ran here (a fork-started DataLoader worker, say) would hang in its first
# parallel region. Such a child runs the kernels on its own thread instead.
_forked = False


def _after_fork_in_child() -> None:
    global _forked
    _forked = _loader.loaded


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _threads() -> int:
    return 1 if _forked else torch.get_num_threads()


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _describe(t: object) -> str:
    if not isinstance(t, Tensor):
        return type(t).__name__
    layout = "" if t.is_contiguous() else "non-contiguous "
    return f"{layout}shape {tuple(t.shape)}, {t.dtype} on {t.device}"


#: What the kernels return (csr_kernels.c, "Return value"): flags, OR-ed.
_ERR_ALLOC, _ERR_INDEX, _ERR_PERM = 1, 2, 4
_BUFFERS = ("crow_indices", "col_indices", "perm")


class _Part(NamedTuple):
    """One checked operand set of a product: a pattern of ``shape`` (rows, cols), the
    permutation its values are read through (or None), values or value gradient, the
    dense operand; ``name`` and ``buffers`` for the kernel's errors."""

    crow: Tensor
    col: Tensor
    perm: Tensor | None
    val: Tensor
    x: Tensor
    shape: tuple[int, int]
    name: str
    buffers: tuple[str, ...]


def _descriptor(parts: list[_Part]) -> array:
    """The parts as the kernels read them (csr_kernels.c, ``F_*``): ``PART_FIELDS``
    int64 numbers each, in a buffer whose address the kernels get."""
    fields = []
    for crow, col, perm, val, x, shape, _, _ in parts:
        sxb, sxj = x.stride()
        fields += (crow.data_ptr(), col.data_ptr(), 0 if perm is None else perm.data_ptr(),
                   val.data_ptr(), x.data_ptr(), sxb, sxj, shape[1], col.numel())
    return array("q", fields)


def _address(buffer: array) -> int:
    return buffer.buffer_info()[0]


def _where(what: str, name: str, single: bool) -> str:
    return what if single else f"{what}, part {name!r}"


def _float_dtype(where: str, label: str, t: object) -> torch.dtype:
    """The dtype of the products: that of ``t``, the first dense operand."""
    if not isinstance(t, Tensor):
        raise MapTypeError(f"{where}: '{label}' must be a tensor, got {type(t).__name__}")
    if t.dtype not in (torch.float32, torch.float64):
        raise MapTypeError(f"{where}: dtype {t.dtype} is not float32/float64")
    return t.dtype


def _check_index(where: str, label: str, t: object) -> None:
    if not isinstance(t, Tensor) or t.dtype != torch.int32 or t.device.type != "cpu" \
            or not t.is_contiguous() or t.dim() != 1:
        raise MapTypeError(f"{where}: '{label}' must be a contiguous 1-D int32 CPU tensor, "
                           f"got {_describe(t)}")


def _check_dense(where: str, label: str, t: object, dtype: torch.dtype) -> None:
    """The C kernels trust their pointers and strides: refuse anything they would misread."""
    if not isinstance(t, Tensor) or t.dim() != 2 or t.device.type != "cpu" or t.dtype != dtype \
            or min(t.stride(), default=0) < 0:
        raise MapTypeError(f"{where}: '{label}' must be a 2-D {dtype} CPU tensor with "
                           f"non-negative strides, got {_describe(t)}")


def _check_vector(where: str, label: str, t: object, dtype: torch.dtype, size: int) -> None:
    if not isinstance(t, Tensor) or t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous():
        raise MapTypeError(f"{where}: '{label}' must be a contiguous {dtype} CPU tensor, "
                           f"got {_describe(t)}")
    if t.numel() != size:
        raise MapError(f"{where}: '{label}' must have {size} entries, got {t.numel()}")


def _span(t: Tensor) -> tuple[int, int]:
    """The bytes ``[start, end)`` a tensor with non-negative strides reads or writes."""
    if t.numel() == 0:
        return 0, 0
    extent = sum(st * (n - 1) for st, n in zip(t.stride(), t.shape)) + 1
    start = t.data_ptr()
    return start, start + extent * t.element_size()


def _overlapping(t: Tensor) -> bool:
    """Whether two entries of ``t`` (non-negative strides) share memory: taken by
    increasing stride, each dim's stride must reach past all the dims before it."""
    reach = 1  # one past the furthest offset of the dims so far
    for st, n in sorted((st, n) for st, n in zip(t.stride(), t.shape) if n > 1):
        if st < reach:
            return True
        reach += st * (n - 1)
    return False


def _inputs(parts: list[_Part], extra: Tensor | None) -> list[Tensor]:
    """Every tensor the kernels read for ``parts`` (and ``extra``)."""
    tensors = [t for part in parts for t in part[:5] if t is not None]
    return tensors if extra is None else [*tensors, extra]


def _check_out(where: str, out: object, shape: tuple[int, int], dtype: torch.dtype,
               inputs: list[Tensor]) -> Tensor:
    """``out`` for a product's result: the shape and dtype, each number its own memory
    (no stride 0, no overlap) and none of the inputs' (the kernels read those while
    they write)."""
    _check_dense(where, "out", out, dtype)
    if tuple(out.shape) != shape:
        raise MapError(f"{where}: 'out' must have shape {shape}, got {tuple(out.shape)}")
    if _overlapping(out):
        raise MapError(f"{where}: 'out' has overlapping entries (strides {out.stride()} for shape "
                       f"{tuple(out.shape)}); each result needs its own memory")
    a, b = _span(out)
    for t in inputs:
        c, d = _span(t)
        if a < d and c < b:
            raise MapError(f"{where}: 'out' overlaps the memory of an input")
    return out


def _names(what: str, names: object, count: int) -> tuple[str, ...]:
    if names is None:
        return tuple(f"part {p}" for p in range(count))
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or len(names) != count \
            or not all(isinstance(n, str) for n in names):
        raise MapTypeError(f"{what}: 'names' must be a list or tuple of {count} str (one per part), "
                           f"got {names!r}")
    return tuple(names)


def _parts_list(what: str, parts: object, width: int) -> list[tuple]:
    if isinstance(parts, (str, bytes, Tensor)) or not isinstance(parts, (list, tuple)):
        raise MapTypeError(f"{what}: 'parts' must be a list or tuple of parts, got {type(parts).__name__}")
    if not parts:
        raise MapError(f"{what}: 'parts' is empty; a product needs at least one part")
    for p, part in enumerate(parts):
        if not isinstance(part, (list, tuple)) or len(part) != width:
            raise MapTypeError(f"{what}: part {p} must be a tuple of {width} tensors, got {part!r:.80}")
    return list(parts)


def _bad_index(part: _Part) -> PatternError | None:
    """The error for a part whose pattern holds an index out of range (as the full check
    finds it), or None: a pattern changed behind :func:`ensure_csr_pattern`'s memo (a
    write through ``.data``, a NumPy view or raw memory bumps no version counter)."""
    try:
        check_csr_buffers(part.crow, part.col, part.shape, name=part.name, buffers=part.buffers[:2],
                          note=_CHANGED)
    except PatternError as e:
        return e
    return None


def _bad_perm(part: _Part) -> PatternError | None:
    perm, nnz = part.perm, part.col.numel()
    if perm is None or perm.numel() == 0:
        return None
    bad = (perm < 0) | (perm >= nnz)
    if not bool(bad.any()):
        return None
    k = int(bad.nonzero()[0, 0])
    label = part.buffers[2]
    return PatternError(f"{part.name}.{label}" if part.name else label,
                        f"{label}[{k}] = {int(perm[k])} is outside [0, {nnz})" + _CHANGED)


_CHANGED = (" (the pattern changed after it was checked, without its version counter: "
            "a write through .data or a NumPy view?)")


def _raise(rc: int, what: str, parts: list[_Part]) -> None:
    """Raise the error a kernel's return code ``rc`` (non-zero) stands for."""
    if rc & (_ERR_INDEX | _ERR_PERM):
        for find in (_bad_index, _bad_perm):
            for part in parts:
                err = find(part)
                if err is not None:
                    raise err
        # valid again by now (changed while the kernel read it): still refuse the result
        part = parts[0]
        raise PatternError(f"{part.name}.{part.buffers[0]}" if part.name else part.buffers[0],
                           f"{'/'.join(part.buffers)} held an index out of range while the kernel "
                           f"read them" + _CHANGED)
    raise SizeError(f"{what}: cannot allocate its work buffers")


def _spmm(lib: _Library, what: str, parts: list[tuple], rows: int, bias: Tensor | None,
          checked: bool, names: tuple[str, ...], buffers: tuple[str, ...], out: object,
          single: bool) -> Tensor:
    """The checks and the call of :func:`spmm_parts`; ``parts`` of (crow, col, values, x,
    perm or None)."""
    dtype = _float_dtype(_where(what, names[0], single), "x", parts[0][3])
    batch = None
    checked_parts = []
    for (crow, col, values, x, perm), name in zip(parts, names):
        where = _where(what, name, single)
        _check_index(where, "crow", crow)
        _check_index(where, "col", col)
        _check_dense(where, "x", x, dtype)
        if perm is not None:
            _check_vector(where, "perm", perm, torch.int32, col.numel())
        _check_vector(where, "values", values, dtype, col.numel())
        if crow.numel() != rows + 1:
            raise MapError(f"{where}: {rows} rows need crow of {rows + 1} entries, got {crow.numel()}")
        if batch is None:
            batch = x.shape[0]
        elif x.shape[0] != batch:
            raise MapError(f"{where}: 'x' has batch {x.shape[0]} but the first part's has {batch}; "
                           f"all parts need the same batch")
        shape = (rows, x.shape[1])
        if not checked:
            ensure_csr_pattern(crow, col, shape, name=name)
        checked_parts.append(_Part(crow, col, perm, values, x, shape, name, buffers))
    if bias is not None:
        _check_vector(what, "bias", bias, dtype, rows)
    if out is None:
        y = parts[0][3].new_empty(batch, rows)
    else:
        y = _check_out(what, out, (batch, rows), dtype, _inputs(checked_parts, bias))
    desc = _descriptor(checked_parts)
    rc = lib.spmm_parts[dtype](rows, batch, len(checked_parts), _address(desc),
                               y.data_ptr(), y.stride(0), y.stride(1), _ptr(bias), _threads())
    if rc:
        _raise(rc, what, checked_parts)
    if out is not None:
        torch.autograd.graph.increment_version(y)
    return y


def spmm(lib: _Library, crow: Tensor, col: Tensor, values: Tensor, x: Tensor, rows: int,
         bias: Tensor | None = None, *, perm: Tensor | None = None, out: Tensor | None = None,
         checked: bool = False, name: str = "native spmm",
         buffers: tuple[str, ...] = _BUFFERS) -> Tensor:
    """``Y[b, i] = bias[i] + sum_k values[k] x[b, col[k]]`` over row ``i``'s entries.

    ``x``: ``(B, srcs)`` CPU tensor with any non-negative strides (read in place);
    ``crow`` (rows + 1), ``col`` int32 contiguous; ``values``, ``bias`` contiguous, of
    ``x``'s dtype. ``perm`` (int32, one per entry, optional): entry ``k`` uses
    ``values[perm[k]]`` (the input gradient reads ``W``'s values in the transposed
    pattern's order this way, without a permuted copy). Returns a new contiguous
    ``(B, rows)`` tensor, or writes into ``out``: a ``(B, rows)`` tensor of any strides
    (not overlapping itself or an input), whose version counter it bumps.

    The pattern is checked (:func:`~iternn.sparse.checks.ensure_csr_pattern`, a
    :class:`~iternn.errors.PatternError`) before the kernel reads it, unless
    ``checked``: the caller vouches that ``(crow, col)`` passed that check for
    ``(rows, srcs)`` and has not changed since (``SparseLinear`` does, from its own
    record of its buffers).

    The kernel checks every index it reads in any case (a write through ``.data`` or a
    NumPy view escapes the memo), ``perm``'s entries included: a bad one raises
    :class:`~iternn.errors.PatternError` with the token ``"<name>.<buffer>"``,
    ``buffers`` being the names of ``(crow, col)`` or ``(crow, col, perm)`` to report.
    """
    buffers = (*buffers[:2], buffers[2] if len(buffers) > 2 else _BUFFERS[2])
    return _spmm(lib, "native spmm", [(crow, col, values, x, perm)], rows, bias, checked, (name,),
                 buffers, out, True)


def spmm_parts(lib: _Library, parts: Sequence[tuple[Tensor, Tensor, Tensor, Tensor]], rows: int,
               bias: Tensor | None = None, *, checked: bool = False,
               names: Sequence[str] | None = None, out: Tensor | None = None) -> Tensor:
    """``Y = bias + sum_p x_p W_p^T``: one CSR product over several sources that share
    the destination, without concatenating them.

    ``parts``: a sequence of ``(crow, col, values, x)``: part ``p`` is a
    ``(rows x srcs_p)`` CSR block ``W_p`` (``crow``, ``col`` int32 contiguous,
    ``values`` contiguous) and ``x_p`` its ``(B, srcs_p)`` operand with any
    non-negative strides; every part has the same ``B`` and dtype. One pass: each
    output row's accumulators run over every part's entries of that row, and the bias
    is added there. Returns a new contiguous ``(B, rows)`` tensor, or writes into
    ``out`` (as for :func:`spmm`: the caller chooses the layout).

    ``names[p]``: part ``p``'s name in errors (the token of a
    :class:`~iternn.errors.PatternError` is ``"<name>.crow_indices"`` or
    ``"<name>.col_indices"``; default ``"part <p>"``). ``checked``: as for
    :func:`spmm`, for every part. Every bad operand is a named
    :class:`~iternn.errors.MapError` / :class:`~iternn.errors.MapTypeError` naming the
    part.
    """
    what = "native spmm_parts"
    parts = _parts_list(what, parts, 4)
    names = _names(what, names, len(parts))
    return _spmm(lib, what, [(*part, None) for part in parts], rows, bias, checked, names, _BUFFERS,
                 out, False)


def _sdd(lib: _Library, what: str, parts: list[tuple], g: object, checked: bool,
         names: tuple[str, ...], buffers: tuple[str, ...], single: bool) -> list[Tensor]:
    dtype = _float_dtype(what, "g", g)
    _check_dense(what, "g", g, dtype)
    batch, rows = g.shape
    checked_parts = []
    for (crow, col, x), name in zip(parts, names):
        where = _where(what, name, single)
        _check_index(where, "crow", crow)
        _check_index(where, "col", col)
        _check_dense(where, "x", x, dtype)
        if x.shape[0] != batch or crow.numel() != rows + 1:
            raise MapError(f"{where}: g {tuple(g.shape)} and x {tuple(x.shape)} need the same batch "
                           f"and crow of g.shape[1] + 1 = {rows + 1} entries (got {crow.numel()})")
        shape = (rows, x.shape[1])
        if not checked:
            ensure_csr_pattern(crow, col, shape, name=name)
        checked_parts.append(_Part(crow, col, None, x.new_empty(col.numel()), x, shape, name, buffers))
    desc = _descriptor(checked_parts)
    rc = lib.sdd_parts[dtype](rows, batch, len(checked_parts), _address(desc),
                              g.data_ptr(), g.stride(0), g.stride(1), _threads())
    if rc:
        _raise(rc, what, checked_parts)
    return [part.val for part in checked_parts]


def sdd(lib: _Library, crow: Tensor, col: Tensor, g: Tensor, x: Tensor, *,
        checked: bool = False, name: str = "native sdd",
        buffers: tuple[str, ...] = _BUFFERS) -> Tensor:
    """``dv[k] = sum_b g[b, r_k] x[b, c_k]`` for each stored entry ``(r_k, c_k)``: the
    product ``g^T x`` sampled at the pattern, in its row-major order. ``g`` ``(B, rows)``
    and ``x`` ``(B, srcs)`` with any non-negative strides; returns ``(nnz,)``.
    ``checked``, ``name``, ``buffers``: as for :func:`spmm`."""
    return _sdd(lib, "native sdd", [(crow, col, x)], g, checked, (name,), buffers, True)[0]


def sdd_parts(lib: _Library, parts: Sequence[tuple[Tensor, Tensor, Tensor]], g: Tensor, *,
              checked: bool = False, names: Sequence[str] | None = None) -> list[Tensor]:
    """The value gradients of :func:`spmm_parts`: ``dv_p[k] = sum_b g[b, row_k]
    x_p[b, col_k]`` for each part ``(crow, col, x)`` (as there, without values) and a
    ``(B, rows)`` upstream gradient ``g`` with any non-negative strides, packed once per
    batch tile for all parts. Returns one ``(nnz_p,)`` tensor per part. ``checked``,
    ``names``: as for :func:`spmm_parts`."""
    what = "native sdd_parts"
    parts = _parts_list(what, parts, 3)
    names = _names(what, names, len(parts))
    return _sdd(lib, what, parts, g, checked, names, _BUFFERS, False)


def linear_backward(lib: _Library, crow_t: Tensor, col_t: Tensor, perm: Tensor, values: Tensor,
                    g: Tensor, x: Tensor, *, out: Tensor | None = None, checked: bool = False,
                    name: str = "native linear_backward",
                    buffers: tuple[str, str, str] = ("crow_indices_t", "col_indices_t", "perm_t"),
                    ) -> tuple[Tensor, Tensor]:
    """Both gradients of ``y = x W^T + b`` in one pass: ``(dx, dv)`` with ``dx = g W``
    and ``dv[k] = sum_b g[b, r_k] x[b, c_k]`` in ``W``'s row-major order.

    The pass runs over the transposed pattern ``(crow_t, col_t)`` (CSR of ``W^T``,
    ``srcs x rows``) with ``perm`` (int32: entry ``k`` of ``W^T`` is ``values[perm[k]]``,
    :func:`~iternn.sparse.kernels.transpose_pattern`): for source ``j``, each stored
    entry ``(j, i)`` reads ``g[:, i]`` once for both ``dx[:, j]`` and its ``dv``. ``g``
    ``(B, rows)`` and ``x`` ``(B, srcs)`` with any non-negative strides. ``dx`` is
    written into ``out`` when given (any strides, as for :func:`spmm`), else into a new
    tensor in ``x``'s layout (``torch.empty_like``). ``dv`` holds zeros where ``perm``
    misses an entry (a permutation changed behind the checks), never uninitialised memory.
    ``checked``, ``name``, ``buffers`` (``crow_t``, ``col_t``, ``perm``): as for
    :func:`spmm`.
    """
    what = "native linear_backward"
    dtype = _float_dtype(what, "g", g)
    _check_dense(what, "g", g, dtype)
    _check_dense(what, "x", x, dtype)
    _check_index(what, "crow_t", crow_t)
    _check_index(what, "col_t", col_t)
    nnz = col_t.numel()
    _check_vector(what, "perm", perm, torch.int32, nnz)
    _check_vector(what, "values", values, dtype, nnz)
    (batch, rows), srcs = g.shape, x.shape[1]
    if x.shape[0] != batch or crow_t.numel() != srcs + 1:
        raise MapError(f"{what}: g {tuple(g.shape)} and x {tuple(x.shape)} need the same batch and "
                       f"crow_t of x.shape[1] + 1 = {srcs + 1} entries (got {crow_t.numel()})")
    if not checked:
        ensure_csr_pattern(crow_t, col_t, (srcs, rows), name=name)
    part = _Part(crow_t, col_t, perm, values, x, (srcs, rows), name, buffers)
    if out is None:
        dx = torch.empty_like(x)
    else:
        dx = _check_out(what, out, (batch, srcs), dtype, _inputs([part], g))
    dv = x.new_zeros(nnz)
    desc = _descriptor([part])
    rc = lib.linear_backward[dtype](srcs, batch, _address(desc), g.data_ptr(), g.stride(0),
                                    g.stride(1), dx.data_ptr(), dx.stride(0), dx.stride(1),
                                    dv.data_ptr(), _threads())
    if rc:
        _raise(rc, what, [part])
    if out is not None:
        torch.autograd.graph.increment_version(dx)
    return dx, dv
