"""Sparse linear kernels: ``y = x W^T + b`` with ``W`` stored in CSR, and its backward.

``W`` (``out x in``, row = output index) is held as a fixed CSR *pattern* plus a values
vector in the pattern's row-major order; the values (with ``x`` and ``b``) are the only
differentiable tensors. For a batch ``x`` of shape ``(B, in)`` and an upstream gradient
``g`` of shape ``(B, out)``:

* forward ``y = x W^T + b``: one CSR x dense product;
* input gradient ``dx = g W``: one CSR x dense product with the *precomputed* transpose
  pattern (CSR of ``W^T``, plus the permutation taking ``W``'s value order to ``W^T``'s);
* value gradient ``dv_k = sum_b g[b, r_k] x[b, c_k]`` for each stored entry
  ``(r_k, c_k)``: a sampled dense-dense product over the stored entries only. No dense
  ``out x in`` weight or gradient is ever formed;
* bias gradient ``db = sum_b g[b]``.

Two implementations of these products (:data:`CSR_KERNELS`, chosen per call by
:func:`csr_kernel_for`):

* ``"native"`` (:class:`NativeSparseLinearFunction`): the compiled C/OpenMP kernels of
  :mod:`iternn.sparse.native`, CPU float32/float64. They read ``x`` and ``g`` in the
  layout they come in and pack one batch tile at a time into a cache-resident buffer, so
  nothing is transposed; they also have a forward-mode (jvp) formula, which the dynamics
  tools use. The default wherever they apply and built.
* ``"torch"`` (:class:`SparseLinearFunction`): ``torch.sparse`` (MKL's sparse BLAS on
  CPU): ``addmm_`` with a CSR ``mat1`` for both products and
  ``torch.sparse.sampled_addmm`` for the value gradient, with the batch as the
  contiguous dimension (``x^T`` row-major), so the forward returns ``y`` as the
  transpose of a contiguous ``(out, B)`` tensor and a following sparse layer gets its
  ``x^T`` for free. Used on other devices, when the native kernels are unavailable or
  off (``ITERNN_NATIVE=0``), and for int64 patterns. Reverse mode only.

Measured on the 2-core development machine (4096 x 4096, batch 256, float32, forward +
backward), speed-up over a dense masked block, native kernels: at density 0.1, 6.3x
with ``benchmarks/sparse.py --case block`` (2 threads, wall clock, median) and 7.6x
(1 thread: 7.1x) timing only the masked block, these kernels and the previous ones
(separate input and value gradients, a permuted copy of the values: 5.8x, 1 thread
5.4x) interleaved; at 0.01, 36x, 43x (43x) and 31x (30x). The torch kernel: 1.8x and
11x in the same benchmark.

The dense backend (:func:`dense_weight_from_values`) instead scatters the values into a
dense ``W`` and calls ``F.linear``; above the crossover density (see
:func:`crossover_density` and :func:`choose_backend`) that is faster.

Support checked on torch 2.13 (CPU build with MKL): CSR x dense ``addmm`` and
``torch.sparse.sampled_addmm`` work in float32 and float64 (float16/bfloat16 are
refused by both, as by the native kernels); the chunked-gather fallback of
:func:`sampled_dense_dense` covers other dtypes. Index tensors are int32 (MKL's LP64
interface and the native kernels' index type), which spares torch a conversion of the
pattern on every call.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..errors import MapError, MapTypeError, NativeBuildError, PatternError
from . import native
from .checks import check_csr_buffers, ensure_csr_pattern

__all__ = [
    "CSRPattern",
    "csr_pattern",
    "transpose_pattern",
    "pattern_rows",
    "sampled_dense_dense",
    "SparseLinearFunction",
    "NativeSparseLinearFunction",
    "CSR_KERNELS",
    "csr_kernel_for",
    "sparse_linear",
    "dense_weight_from_values",
    "dense_linear",
    "CSR_DTYPES",
    "CROSSOVER_DENSITY",
    "TORCH_CROSSOVER_DENSITY",
    "crossover_density",
    "SMALL_BLOCK",
    "choose_backend",
]

# torch warns once per process that CSR support is "in beta"; the kernels here use only
# the CSR operations whose results the tests check, so the notice is noise for users.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

#: Dtypes torch's CPU CSR kernels support (``addmm`` with a CSR ``mat1`` and
#: ``sampled_addmm``; torch 2.13 refuses float16/bfloat16 for both).
CSR_DTYPES = (torch.float32, torch.float64)

# ----------------------------------------------------------------------------- crossover
#: Density at or below which the CSR backend is chosen ("auto") when the native kernels
#: are in use. Measured on the 2-core development machine (AMD EPYC VM, AVX2, torch 2.13
#: CPU, 2 threads), float32, forward + backward (value, input and bias gradients), ratio
#: of the time of SparseLinear(backend="csr") to SparseLinear(backend="dense") (< 1: CSR
#: faster); median of 5 interleaved repetitions, [ratio of the best calls]; nothing else
#: ran (load average 1.6-1.8 from the benchmark itself), single entries are noisy, the
#: trend is not. Command: ``benchmarks/sparse.py --case crossover``.
#:
#:  out x in batch d=0.5      0.4        0.3        0.25       0.2        0.15       0.1        0.05
#:     64x64   32 1.44[1.30] 1.37[1.40] 1.45[1.68] 1.41[1.46] 1.37[1.35] 1.41[1.36] 1.36[1.39] 1.44[1.37]
#:   128x128   32 1.18[1.33] 1.25[1.27] 1.12[1.08] 1.29[1.20] 1.30[1.21] 1.13[1.13] 1.30[1.23] 1.20[1.07]
#:   128x128  256 1.29[1.06] 1.24[1.27] 1.30[1.10] 1.12[1.16] 0.94[1.04] 1.14[1.11] 1.06[1.02] 1.05[0.91]
#:   256x256   32 0.98[0.79] 0.90[1.00] 0.94[1.06] 0.99[0.83] 0.86[0.93] 0.94[0.98] 0.82[0.72] 0.89[1.00]
#:   256x256  256 0.97[1.17] 1.01[0.86] 0.95[0.80] 0.83[0.84] 0.72[0.72] 0.67[0.63] 0.60[0.58] 0.38[0.44]
#: 1024x1024   32 0.64[0.68] 0.59[0.48] 0.42[0.44] 0.41[0.38] 0.37[0.36] 0.33[0.24] 0.25[0.25] 0.15[0.18]
#: 1024x1024  256 0.90[1.04] 0.75[0.90] 0.63[0.62] 0.53[0.53] 0.48[0.49] 0.36[0.27] 0.29[0.25] 0.17[0.18]
#: 4096x4096   32 0.84[0.81] 0.47[0.43] 0.32[0.32] 0.26[0.21] 0.39[0.32] 0.24[0.28] 0.09[0.09] 0.06[0.05]
#: 4096x4096  256 0.94[1.04] 0.60[0.60] 0.57[0.57] 0.38[0.38] 0.43[0.43] 0.26[0.25] 0.21[0.21] 0.11[0.09]
#:  3928x784  256 0.96[0.91] 0.67[0.66] 0.53[0.53] 0.47[0.46] 0.40[0.38] 0.31[0.31] 0.25[0.23] 0.16[0.16]
#:
#: From 256 x 256 up the CSR kernels win at every density up to 0.5 with batch 32 and
#: below ~0.4 with batch 256 (the dense backend pays O(out * in) per call to build W and
#: gather its gradient, whatever the batch); on blocks of 1024 x 1024 and more up to 0.5
#: at both batches. 0.3 leaves a margin for 256 x 256 blocks with training batches of a
#: few hundred (0.95 at 0.3, 1.01 at 0.4).
CROSSOVER_DENSITY = 0.3
#: The same crossover for the torch.sparse (MKL) kernel, used when the native kernels are
#: unavailable: measured like the table above before the native kernels existed, CSR /
#: dense at batch 256 was 0.97 at density 0.15 and 1.17 at 0.2 (4096x4096), 1.07 and
#: 1.52 (3928x784); with batch 32 the torch kernel won up to 0.5 on blocks of 1024x1024
#: and more.
TORCH_CROSSOVER_DENSITY = 0.15
#: Blocks with at most this many positions (rows * cols) always use the dense backend:
#: per-call overheads dominate there (dense ahead at every density above for 64x64 and
#: at all but one entry for 128x128).
SMALL_BLOCK = 128 * 128


def crossover_density() -> float:
    """The crossover of the CSR implementation in use: :data:`CROSSOVER_DENSITY` with
    the native kernels, :data:`TORCH_CROSSOVER_DENSITY` without them."""
    return CROSSOVER_DENSITY if native.available() else TORCH_CROSSOVER_DENSITY


def choose_backend(out_features: int, in_features: int, nnz: int) -> str:
    """``"csr"`` or ``"dense"`` for a block of this shape and number of stored entries.

    CSR when the block has more than :data:`SMALL_BLOCK` positions and its density
    ``nnz / (out * in)`` is at most :func:`crossover_density`; dense otherwise.
    """
    positions = out_features * in_features
    if positions <= SMALL_BLOCK:
        return "dense"
    return "csr" if nnz <= crossover_density() * positions else "dense"


# ----------------------------------------------------------------------------- patterns
class CSRPattern(NamedTuple):
    """The fixed sparsity pattern of an ``out x in`` matrix, in CSR and transposed CSR.

    ``crow`` (out+1,), ``col`` (nnz,): CSR of ``W`` (row-major order of the values);
    ``crow_t`` (in+1,), ``col_t`` (nnz,): CSR of ``W^T``; ``perm`` (nnz,):
    ``values[perm]`` are the values in ``W^T``'s order. Index tensors (``perm``
    included) are int32 when every index fits (what MKL and the native kernels take
    without a conversion), else int64.
    """

    crow: Tensor
    col: Tensor
    crow_t: Tensor
    col_t: Tensor
    perm: Tensor
    shape: tuple[int, int]

    @property
    def nnz(self) -> int:
        return self.col.numel()


def _index_dtype(*sizes: int) -> torch.dtype:
    return torch.int32 if max(sizes) < 2**31 - 1 else torch.int64


def pattern_rows(crow: Tensor, nnz: int | None = None, dtype: torch.dtype = torch.long) -> Tensor:
    """Row index of every stored entry (``dtype``, int64 by default), from a CSR
    row-pointer vector."""
    counts = crow.diff()
    rows = torch.arange(counts.numel(), device=crow.device, dtype=dtype)
    return torch.repeat_interleave(rows, counts, output_size=nnz)


def transpose_pattern(crow: Tensor, col: Tensor, shape: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """CSR of ``W^T`` from CSR of ``W`` (``shape = (out, in)``): ``(crow_t, col_t, perm)``.

    ``perm`` (in the index dtype) maps ``W``'s value order to ``W^T``'s:
    ``values_t = values[perm]``.
    A stable sort by column keeps rows ascending within each column of ``W``.
    """
    out_f, in_f = shape
    idt = crow.dtype
    perm = torch.sort(col, stable=True).indices.to(idt)
    crow_t = torch.zeros(in_f + 1, dtype=idt, device=crow.device)
    crow_t[1:] = torch.bincount(col, minlength=in_f).cumsum(0)
    # in the index dtype throughout: a 4e6-entry pattern builds without int64 copies
    col_t = pattern_rows(crow, col.numel(), dtype=idt)[perm]
    return crow_t, col_t, perm


def csr_pattern(indices: Tensor, shape: tuple[int, int]) -> CSRPattern:
    """A :class:`CSRPattern` from ``(2, nnz)`` positions that are distinct, in range and
    sorted row-major (as :func:`~iternn.sparse.sampling.random_indices` returns them).
    """
    out_f, in_f = shape
    idt = _index_dtype(out_f + 1, in_f + 1, indices.shape[1])
    rows, cols = indices[0].long(), indices[1]
    counts = torch.bincount(rows, minlength=out_f)
    crow = torch.zeros(out_f + 1, dtype=idt, device=indices.device)
    crow[1:] = counts.cumsum(0)
    col = cols.to(idt).contiguous()
    crow_t, col_t, perm = transpose_pattern(crow, col, shape)
    return CSRPattern(crow, col, crow_t, col_t, perm, (out_f, in_f))


def _csr(crow: Tensor, col: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def _check_for_torch(crow: Tensor, col: Tensor, shape: tuple[int, int], *, name: str,
                     buffers: tuple[str, str] = ("crow_indices", "col_indices")) -> None:
    """The check before a pattern goes to torch.sparse. On CPU the full
    :func:`check_csr_pattern` on every call: torch's CPU CSR kernels read out of range
    (SIGSEGV) on a bad index, and a write through ``.data`` or a NumPy view escapes
    :func:`ensure_csr_pattern`'s memo (the native kernels check their indices themselves
    instead). Elsewhere the memo (a full check there costs several device syncs)."""
    if crow.device.type == "cpu":
        check_csr_buffers(crow, col, shape, name=name, buffers=buffers)
    else:
        ensure_csr_pattern(crow, col, shape, name=name)


def _permuted(values: Tensor, perm: Tensor, name: str) -> Tensor:
    """``values[perm]`` (the values in the transposed pattern's order); an out-of-range
    ``perm`` is a :class:`~iternn.errors.PatternError` naming it."""
    try:
        return values.index_select(0, perm)
    except IndexError:
        raise PatternError(f"{name}.perm_t", f"perm_t holds an entry outside [0, {values.numel()})"
                                             f" (the pattern changed after it was checked, "
                                             f"without its version counter)") from None


# ----------------------------------------------------------------------------- kernels
#: Entries per chunk of the gather fallback of the sampled product are chosen so that a
#: chunk's two gathered (chunk, B) operands hold at most this many numbers.
_GATHER_BUDGET = 1 << 22


def _sampled_gather(a_t: Tensor, b_t: Tensor, crow: Tensor, col: Tensor) -> Tensor:
    """Chunked gather form of :func:`sampled_dense_dense` (bounded memory, any dtype)."""
    nnz = col.numel()
    out = a_t.new_empty(nnz)
    if nnz == 0:
        return out
    rows = pattern_rows(crow, nnz)
    cols = col.long()
    batch = max(a_t.shape[1], 1)
    chunk = max(1, _GATHER_BUDGET // (2 * batch))
    for s in range(0, nnz, chunk):
        e = min(s + chunk, nnz)
        torch.sum(a_t.index_select(0, rows[s:e]) * b_t.index_select(0, cols[s:e]), dim=1, out=out[s:e])
    return out


def sampled_dense_dense(
    a_t: Tensor, b_t: Tensor, crow: Tensor, col: Tensor, shape: tuple[int, int],
    *, method: str = "auto",
) -> Tensor:
    """``out[k] = a_t[r_k] . b_t[c_k]`` for every stored entry ``(r_k, c_k)`` of a pattern.

    That is ``(a_t @ b_t^T)`` sampled at the pattern, as a ``(nnz,)`` vector in the
    pattern's row-major order, without forming the dense product. ``a_t`` is
    ``(rows, B)``, ``b_t`` ``(cols, B)`` (best contiguous: each entry then reads two
    contiguous rows). For the value gradient of ``y = x W^T``: ``a_t = g^T``,
    ``b_t = x^T``.

    ``method``: ``"sampled_addmm"`` (``torch.sparse.sampled_addmm``, CSR float32/64),
    ``"gather"`` (chunked ``index_select`` products, at most about 2**22 gathered
    numbers at a time, any dtype) or ``"auto"`` (the first where supported).
    """
    if method not in ("auto", "sampled_addmm", "gather"):
        raise MapError(f"method must be 'auto', 'sampled_addmm' or 'gather', got {method!r}")
    _check_for_torch(crow, col, shape, name="sampled_dense_dense")
    return _sampled_dense_dense(a_t, b_t, crow, col, shape, method)


def _sampled_dense_dense(a_t: Tensor, b_t: Tensor, crow: Tensor, col: Tensor,
                         shape: tuple[int, int], method: str = "auto") -> Tensor:
    """:func:`sampled_dense_dense` of a pattern the caller has just checked."""
    if method == "gather" or (method == "auto" and a_t.dtype not in CSR_DTYPES):
        return _sampled_gather(a_t, b_t, crow, col)
    # sampled_addmm computes beta * input + alpha * (mat1 @ mat2) at input's pattern; the
    # input's values must be finite even with beta = 0 (NaN * 0 stays NaN), hence zeros.
    pattern = _csr(crow, col, a_t.new_zeros(col.numel()), shape)
    # out=pattern: the result reuses the pattern's buffers instead of cloning them.
    torch.sparse.sampled_addmm(pattern, a_t, b_t.t(), beta=0.0, out=pattern)
    return pattern.values()


def _result(rows: int, cols: int, like: Tensor) -> Tensor:
    """An output buffer for ``addmm_(..., beta=0)``: uninitialised where the CSR kernel
    is MKL's (CPU), which writes every entry of the result when beta is 0 (checked by
    the tests, rows without entries included); zeros elsewhere."""
    if like.device.type == "cpu" and torch.backends.mkl.is_available():
        return like.new_empty(rows, cols)
    return like.new_zeros(rows, cols)


class SparseLinearFunction(torch.autograd.Function):
    """``y = x W^T + b`` for a 2-D ``x`` ``(B, in)``, ``W`` given by ``values`` at a
    :class:`CSRPattern`; differentiable in ``x``, ``values`` and ``bias`` (may be None).

    Returns ``y^T``, a contiguous ``(out, B)`` tensor (:func:`sparse_linear` transposes
    it outside the Function: a view made inside a custom Function could not be modified
    in place later). Every product is an in-place ``addmm_`` into a fresh buffer, which
    spares the zero fill and the copy that ``torch.sparse.mm`` / ``torch.addmm`` make of
    their result.
    """

    @staticmethod
    def forward(ctx, x: Tensor, values: Tensor, bias: Tensor | None, pattern: CSRPattern,
                name: str = "CSR pattern") -> Tensor:
        out_f, in_f = pattern.shape
        _check_for_torch(pattern.crow, pattern.col, pattern.shape, name=name)
        x_t = x.t()
        # (in, B) row-major; free when x is itself a transposed view (the output of a
        # previous sparse layer). Then x_t is a view of the input, which a Function may
        # not save: it saves x and takes the view again in backward.
        ctx.saved_input = x_t.is_contiguous()
        if not ctx.saved_input:
            x_t = x_t.contiguous()
        w = _csr(pattern.crow, pattern.col, values, pattern.shape)
        if bias is None:
            y_t = _result(out_f, x_t.shape[1], x_t).addmm_(w, x_t, beta=0)
        else:
            # clone, not contiguous(): with B = 1 the expanded bias is already contiguous
            # and contiguous() would return the bias itself, which addmm_ would overwrite.
            y_t = bias.unsqueeze(1).expand(out_f, x_t.shape[1]).clone(
                memory_format=torch.contiguous_format).addmm_(w, x_t)
        ctx.pattern = pattern
        ctx.name = name
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x if ctx.saved_input else x_t, values)
        return y_t

    @staticmethod
    @once_differentiable
    def backward(ctx, g_t: Tensor):
        x_t, values = ctx.saved_tensors
        if ctx.saved_input:
            x_t = x_t.t()
        p: CSRPattern = ctx.pattern
        out_f, in_f = p.shape
        g_t = g_t.contiguous()  # (out, B); a copy when the upstream gradient is (B, out)
        grad_x = grad_values = grad_bias = None
        if ctx.needs_input_grad[0]:
            _check_for_torch(p.crow_t, p.col_t, (in_f, out_f), name=ctx.name,
                             buffers=("crow_indices_t", "col_indices_t"))
            w_t = _csr(p.crow_t, p.col_t, _permuted(values, p.perm, ctx.name), (in_f, out_f))
            grad_x = _result(in_f, g_t.shape[1], g_t).addmm_(w_t, g_t, beta=0).t()
        if ctx.needs_input_grad[1]:
            _check_for_torch(p.crow, p.col, p.shape, name=ctx.name)
            grad_values = _sampled_dense_dense(g_t, x_t, p.crow, p.col, p.shape)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = g_t.sum(1)
        return grad_x, grad_values, grad_bias, None, None


#: Names of the transposed pattern's buffers (crow, col, perm) in the kernels' errors.
_TRANSPOSED = ("crow_indices_t", "col_indices_t", "perm_t")


class _NativeOp:
    """The pattern, the loaded library and whether the caller vouched for the pattern
    (``checked``, see :func:`iternn.sparse.native.spmm`), as one opaque argument:
    torch.func transforms wrap every tensor they find in a Function's (pytree)
    arguments, and the kernels need the pattern's real index buffers."""

    __slots__ = ("pattern", "lib", "checked", "name")

    def __init__(self, pattern: CSRPattern, lib, checked: bool = False,
                 name: str = "CSR pattern") -> None:
        self.pattern = pattern
        self.lib = lib
        self.checked = checked
        self.name = name  # the owner, in the tokens of the kernels' PatternErrors


class NativeSparseLinearFunction(torch.autograd.Function):
    """``y = x W^T + b`` through the compiled kernels (:mod:`iternn.sparse.native`), for a
    2-D CPU ``x`` ``(B, in)`` with any strides; returns a contiguous ``(B, out)`` ``y``.

    Differentiable in ``x``, ``values`` and ``bias`` (may be None), in reverse mode
    (``dx = g W`` with the transposed pattern, ``dv`` sampled at the stored entries,
    both in one pass when both are wanted (:func:`~iternn.sparse.native.linear_backward`);
    ``db = sum_b g``) and in forward mode (``y' = x' W^T + x W'^T + b'``, with ``W'``
    the value tangents at the pattern). Nothing is transposed or copied: the kernels read
    ``x`` and the upstream gradient in their own layouts, the values in the transposed
    pattern's order through its permutation, and write ``dx`` in ``x``'s layout.
    """

    @classmethod
    def apply(cls, x: Tensor, values: Tensor, bias: Tensor | None, op: _NativeOp) -> Tensor:
        # torch's Function.apply binds the arguments to forward's signature on every call
        # when setup_context is defined (inspect.signature: 50-80 us per call here, more
        # than the kernel on small blocks). All four arguments always come positionally,
        # so outside torch.func transforms this goes straight to the autograd entry point.
        if torch._C._are_functorch_transforms_active():
            return super().apply(x, values, bias, op)
        args = torch._functorch.utils.unwrap_dead_wrappers((x, values, bias, op))
        return super(torch.autograd.Function, cls).apply(*args)

    @staticmethod
    def forward(x: Tensor, values: Tensor, bias: Tensor | None, op: _NativeOp) -> Tensor:
        p = op.pattern
        return native.spmm(op.lib, p.crow, p.col, values, x, p.shape[0], bias, checked=op.checked,
                           name=op.name)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        # a separate setup_context: what torch.func transforms (torch.func.jvp in the
        # dynamics tools) need from a custom Function
        x, values, bias, op = inputs
        ctx.op = op
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, values)
        ctx.save_for_forward(x, values)

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):
        x, values = ctx.saved_tensors
        lib, p, name = ctx.op.lib, ctx.op.pattern, ctx.op.name
        grad_x = grad_values = grad_bias = None
        # the patterns are checked again (a memo look-up): the buffers may have changed
        # since forward. dx comes in x's layout (what a leaf's .grad keeps as it is).
        if ctx.needs_input_grad[0] and ctx.needs_input_grad[1]:
            # one pass over the transposed pattern; W's own buffers, which it does not
            # read, are checked all the same: an edit since forward is refused either way
            ensure_csr_pattern(p.crow, p.col, p.shape, name=name)
            grad_x, grad_values = native.linear_backward(lib, p.crow_t, p.col_t, p.perm, values, g,
                                                         x, name=name, buffers=_TRANSPOSED)
        elif ctx.needs_input_grad[0]:
            grad_x = native.spmm(lib, p.crow_t, p.col_t, values, g, p.shape[1], perm=p.perm,
                                 out=None if x.is_contiguous() else torch.empty_like(x),
                                 name=name, buffers=_TRANSPOSED)
        elif ctx.needs_input_grad[1]:
            grad_values = native.sdd(lib, p.crow, p.col, g, x, name=name)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = g.sum(0)
        return grad_x, grad_values, grad_bias, None

    @staticmethod
    def jvp(ctx, x_t: Tensor | None, values_t: Tensor | None, bias_t: Tensor | None, _op) -> Tensor:
        # Through apply (not the kernels directly): under torch.func transforms the saved
        # tensors and tangents are wrapped, and apply unwraps them level by level.
        x, values = ctx.saved_tensors
        op = ctx.op
        f = NativeSparseLinearFunction.apply
        y_t = None
        if x_t is not None:
            y_t = f(x_t, values, None, op)
        if values_t is not None:
            part = f(x, values_t.contiguous(), None, op)
            y_t = part if y_t is None else y_t + part
        if bias_t is not None:
            y_t = bias_t.expand(x.shape[0], -1) if y_t is None else y_t + bias_t
        if y_t is None:
            y_t = x.new_zeros(x.shape[0], op.pattern.shape[0])
        return y_t


#: Implementations of the CSR backend: ``"native"`` (compiled kernels, CPU float32/64,
#: int32 patterns), ``"torch"`` (``torch.sparse`` / MKL, any device torch supports) and
#: ``"auto"`` (native where it applies and is available, else torch).
CSR_KERNELS = ("auto", "native", "torch")


def csr_kernel_for(x: Tensor, pattern: CSRPattern, kernel: str = "auto") -> str:
    """``"native"`` or ``"torch"``: the implementation :func:`sparse_linear` uses for this
    input and pattern. Raises :class:`~iternn.errors.MapError` for an unknown ``kernel``
    and :class:`~iternn.errors.NativeBuildError` (a ``RuntimeError``) when ``"native"`` is
    asked for but does not apply."""
    if kernel not in CSR_KERNELS:
        raise MapError(f"kernel must be one of {CSR_KERNELS}, got {kernel!r}")
    if kernel == "torch":
        return "torch"
    why = None
    if x.device.type != "cpu":
        why = f"the input is on {x.device} (the native kernels are CPU only)"
    elif x.dtype not in CSR_DTYPES:
        why = f"dtype {x.dtype} is not float32/float64"
    elif pattern.col.dtype != torch.int32:
        why = "the pattern's indices are int64 (more than 2**31 - 1 entries or positions)"
    elif native.library() is None:
        why = f"they are unavailable: {native.status().reason}"
    if why is None:
        return "native"
    if kernel == "native":
        raise NativeBuildError(f"native CSR kernels requested but {why}")
    return "torch"


def _check_operands(x: Tensor, values: Tensor, bias: Tensor | None, pattern: CSRPattern,
                    what: str) -> None:
    """One dtype for every operand and one value per stored entry: a product never
    mixes dtypes (nor reads past ``values``). Devices need no check here: torch refuses
    mixed devices itself, and the native kernels check theirs."""
    if x.dim() < 1 or x.shape[-1] != pattern.shape[1]:
        raise MapError(f"{what}: x must have shape (*batch, {pattern.shape[1]}), got {tuple(x.shape)}")
    dtype = x.dtype
    if values.dtype != dtype or (bias is not None and bias.dtype != dtype):
        raise MapTypeError(f"{what}: x is {dtype} but values are {values.dtype}"
                           + ("" if bias is None else f" and the bias {bias.dtype}")
                           + "; convert one of them")
    if values.dim() != 1 or values.shape[0] != pattern.col.shape[0]:
        raise MapError(f"{what}: values must have shape ({pattern.col.numel()},) (one per stored "
                       f"entry), got {tuple(values.shape)}")


def _flatten(x: Tensor, in_features: int) -> tuple[Tensor, tuple[int, ...]]:
    lead = tuple(x.shape[:-1])
    return x.reshape(-1, in_features), lead


def sparse_linear(x: Tensor, values: Tensor, bias: Tensor | None, pattern: CSRPattern,
                  *, kernel: str = "auto", checked: bool = False, name: str = "CSR pattern") -> Tensor:
    """``x W^T + b`` through the CSR kernels, for ``x`` of shape ``(*batch, in)``
    (any number of leading dims, including none); returns ``(*batch, out)``.

    ``kernel``: see :data:`CSR_KERNELS` and :func:`csr_kernel_for`. ``x``, ``values``
    and ``bias`` must share one dtype (:data:`CSR_DTYPES`;
    :class:`~iternn.errors.MapTypeError` otherwise). Each kernel checks the pattern
    (:func:`~iternn.sparse.checks.ensure_csr_pattern`) before it reads it, except with
    ``checked=True``: the caller vouches that the pattern passed
    :func:`~iternn.sparse.check_csr_pattern` and has not changed since (what
    ``SparseLinear`` does, from its own record of its buffers); the backward, which may
    run after the buffers changed, checks them in any case. ``name``: the pattern's
    owner, in the token of a :class:`~iternn.errors.PatternError` that the native
    kernels raise when an index is out of range after all (a buffer written through
    ``.data`` or a NumPy view, which the checks' memo does not see); the torch.sparse
    path checks the whole pattern on every CPU call instead.
    """
    out_f, in_f = pattern.shape
    _check_operands(x, values, bias, pattern, "sparse_linear")
    which = csr_kernel_for(x, pattern, kernel)
    x2, lead = _flatten(x, in_f)
    if x2.shape[0] == 0 or pattern.nnz == 0:
        # Degenerate products: a zero result that keeps the graph (zero gradients for x
        # and values, from sums over empty slices) without calling a kernel.
        zero = x2[:, :0].sum() + values[:0].sum()
        y2 = x2.new_zeros(x2.shape[0], out_f) + zero
        if bias is not None:
            y2 = y2 + bias
        return y2.reshape(*lead, out_f)
    if which == "native":
        values = values.contiguous()
        bias = None if bias is None else bias.contiguous()
        op = _NativeOp(pattern, native.library(), checked, name)
        y2 = NativeSparseLinearFunction.apply(x2, values, bias, op)
    else:
        y2 = SparseLinearFunction.apply(x2, values, bias, pattern, name).t()
    return y2.reshape(*lead, out_f)


# ----------------------------------------------------------------------------- dense path
def dense_weight_from_values(values: Tensor, pattern: CSRPattern, flat_index: Tensor | None = None) -> Tensor:
    """The dense ``(out, in)`` weight with ``values`` at the pattern and zeros elsewhere
    (differentiable in ``values``: the backward gathers the dense gradient at the
    pattern). ``flat_index`` (int64 ``row * in + col`` per entry) may be passed to skip
    recomputing it.
    """
    out_f, in_f = pattern.shape
    if values.dim() != 1 or values.numel() != pattern.col.numel():
        raise MapError(f"values must have shape ({pattern.col.numel()},) (one per stored entry), "
                       f"got {tuple(values.shape)}")
    if flat_index is None:
        ensure_csr_pattern(pattern.crow, pattern.col, pattern.shape, name="dense weight pattern")
        flat_index = pattern_rows(pattern.crow, pattern.nnz) * in_f + pattern.col.long()
    w = values.new_zeros(out_f * in_f).scatter(0, flat_index, values)
    return w.view(out_f, in_f)


def dense_linear(x: Tensor, values: Tensor, bias: Tensor | None, pattern: CSRPattern,
                 flat_index: Tensor | None = None) -> Tensor:
    """``F.linear(x, W, b)`` with ``W`` materialised by :func:`dense_weight_from_values`."""
    _check_operands(x, values, bias, pattern, "dense_linear")
    return F.linear(x, dense_weight_from_values(values, pattern, flat_index), bias)
