"""The compiled CSR kernels: build ``csr_kernels.c`` with the system C compiler, load it.

:mod:`iternn.sparse.kernels` runs ``SparseLinear``'s CSR backend on CPU through these
kernels when they are available, and through ``torch.sparse`` (MKL) otherwise; the
results agree to float rounding (tested). They are faster because they read and write
the batch in whatever layout it comes (no transposed copies) and keep each batch tile of
the operand cache-resident (``csr_kernels.c`` explains the layout;
``benchmarks/README.md`` has the measurements: 1.9-2.7x the torch.sparse path on a 4096 x
4096 block, batch 256, forward + backward).

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
from pathlib import Path

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
    "sdd",
    "spmm",
    "status",
]

#: The C source of the kernels (shipped with the package).
SOURCE = Path(__file__).with_name("csr_kernels.c")
_ABI = 2  # iternn_kernels_abi() of the source this module was written for
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
        self.spmm = {}
        self.sdd = {}
        for dtype, suffix in ((torch.float32, "f32"), (torch.float64, "f64")):
            f = getattr(lib, f"iternn_spmm_{suffix}")
            f.argtypes = [i64, i64, i64, i64, ptr, ptr, ptr, ptr, i64, i64, ptr, i64, i64, ptr, cint]
            f.restype = cint
            self.spmm[dtype] = f
            g = getattr(lib, f"iternn_sdd_{suffix}")
            g.argtypes = [i64, i64, i64, i64, ptr, ptr, ptr, ptr, i64, i64, ptr, i64, i64, cint]
            g.restype = cint
            self.sdd[dtype] = g
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


def _check(what: str, crow: Tensor, col: Tensor, dense: dict[str, Tensor],
           vectors: dict[str, Tensor | None]) -> None:
    """The C kernels trust their pointers and sizes: refuse anything they would misread.
    (The pattern's entries are checked by :func:`ensure_csr_pattern`, and again by the
    kernels themselves, see :func:`_bad_index`.)"""
    for name, t in (("crow", crow), ("col", col)):
        if not isinstance(t, Tensor) or t.dtype != torch.int32 or t.device.type != "cpu" \
                or not t.is_contiguous():
            raise MapTypeError(f"{what}: '{name}' must be a contiguous int32 CPU tensor, "
                               f"got {_describe(t)}")
    dtype = next(iter(dense.values())).dtype
    if dtype not in (torch.float32, torch.float64):
        raise MapTypeError(f"{what}: dtype {dtype} is not float32/float64")
    for name, t in dense.items():
        if t.dim() != 2 or t.device.type != "cpu" or t.dtype != dtype or min(t.stride(), default=0) < 0:
            raise MapTypeError(f"{what}: '{name}' must be a 2-D {dtype} CPU tensor with "
                               f"non-negative strides, got {_describe(t)}")
    for name, t in vectors.items():
        if t is not None and (t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous()):
            raise MapTypeError(f"{what}: '{name}' must be a contiguous {dtype} CPU tensor, "
                               f"got {_describe(t)}")


#: What the kernels return when an index was out of range (csr_kernels.c, "Indices").
_ERR_ALLOC, _ERR_INDEX = 1, 2


def _bad_index(crow: Tensor, col: Tensor, shape: tuple[int, int], name: str,
               buffers: tuple[str, str]) -> PatternError:
    """The error for a kernel that met an index out of range: a pattern changed behind
    :func:`ensure_csr_pattern`'s memo (a write through ``.data``, a NumPy view or raw
    memory bumps no version counter). The full check names the buffer and the entry;
    the token names the buffer as ``buffers`` (the caller's names for crow and col)."""
    note = (" (the pattern changed after it was checked, without its version counter: "
            "a write through .data or a NumPy view?)")
    try:
        check_csr_buffers(crow, col, shape, name=name, buffers=buffers, note=note)
    except PatternError as e:
        return e
    # valid again by now (changed while the kernel read it): still refuse the result
    return PatternError(f"{name}.{buffers[0]}" if name else buffers[0],
                        f"{buffers[0]}/{buffers[1]} held an index out of range while the "
                        f"kernel read them" + note)


def spmm(lib: _Library, crow: Tensor, col: Tensor, values: Tensor, x: Tensor, rows: int,
         bias: Tensor | None = None, *, checked: bool = False, name: str = "native spmm",
         buffers: tuple[str, str] = ("crow_indices", "col_indices")) -> Tensor:
    """``Y[b, i] = bias[i] + sum_k values[k] x[b, col[k]]`` over row ``i``'s entries.

    ``x``: ``(B, srcs)`` CPU tensor with any non-negative strides (read in place);
    ``crow`` (rows + 1), ``col`` int32 contiguous; ``values``, ``bias`` contiguous, of
    ``x``'s dtype. Returns a new contiguous ``(B, rows)`` tensor.

    The pattern is checked (:func:`~iternn.sparse.checks.ensure_csr_pattern`, a
    :class:`~iternn.errors.PatternError`) before the kernel reads it, unless
    ``checked``: the caller vouches that ``(crow, col)`` passed that check for
    ``(rows, srcs)`` and has not changed since (``SparseLinear`` does, from its own
    record of its buffers).

    The kernel checks every index it reads in any case (a write through ``.data`` or a
    NumPy view escapes the memo): a bad one raises :class:`~iternn.errors.PatternError`
    with the token ``"<name>.<buffer>"``, ``buffers`` being the names of ``(crow, col)``
    to report.
    """
    _check("native spmm", crow, col, {"x": x}, {"values": values, "bias": bias})
    if crow.numel() != rows + 1 or values.numel() != col.numel() \
            or (bias is not None and bias.numel() != rows):
        raise MapError(f"native spmm: {rows} rows need crow of {rows + 1}, values of {col.numel()} "
                       f"and bias of {rows} entries")
    batch, srcs = x.shape
    if not checked:
        ensure_csr_pattern(crow, col, (rows, srcs), name="native spmm")
    y = x.new_empty(batch, rows)
    rc = lib.spmm[x.dtype](rows, srcs, batch, col.numel(), crow.data_ptr(), col.data_ptr(),
                           values.data_ptr(), x.data_ptr(), x.stride(0), x.stride(1),
                           y.data_ptr(), y.stride(0), y.stride(1), _ptr(bias), _threads())
    if rc == _ERR_INDEX:
        raise _bad_index(crow, col, (rows, srcs), name, buffers)
    if rc:
        raise SizeError(f"native CSR product: cannot allocate its work buffer ({srcs} x tile)")
    return y


def sdd(lib: _Library, crow: Tensor, col: Tensor, g: Tensor, x: Tensor, *,
        checked: bool = False, name: str = "native sdd",
        buffers: tuple[str, str] = ("crow_indices", "col_indices")) -> Tensor:
    """``dv[k] = sum_b g[b, r_k] x[b, c_k]`` for each stored entry ``(r_k, c_k)``: the
    product ``g^T x`` sampled at the pattern, in its row-major order. ``g`` ``(B, rows)``
    and ``x`` ``(B, srcs)`` with any non-negative strides; returns ``(nnz,)``.
    ``checked``, ``name``, ``buffers``: as for :func:`spmm`."""
    _check("native sdd", crow, col, {"g": g, "x": x}, {})
    if g.shape[0] != x.shape[0] or crow.numel() != g.shape[1] + 1:
        raise MapError(f"native sdd: g {tuple(g.shape)} and x {tuple(x.shape)} need the same batch "
                       f"and crow of g.shape[1] + 1 entries")
    batch, rows = g.shape
    srcs = x.shape[1]
    if not checked:
        ensure_csr_pattern(crow, col, (rows, srcs), name="native sdd")
    dv = x.new_empty(col.numel())
    rc = lib.sdd[x.dtype](rows, srcs, batch, col.numel(), crow.data_ptr(), col.data_ptr(),
                          dv.data_ptr(), g.data_ptr(), g.stride(0), g.stride(1), x.data_ptr(),
                          x.stride(0), x.stride(1), _threads())
    if rc == _ERR_INDEX:
        raise _bad_index(crow, col, (rows, srcs), name, buffers)
    if rc:
        raise SizeError("native sampled product: cannot allocate its work buffers")
    return dv
