"""Sparse linear kernels: ``y = x W^T + b`` with ``W`` stored in CSR, and its backward.

``W`` (``out x in``, row = output index) is held as a fixed CSR *pattern* plus a values
vector in the pattern's row-major order; the values (with ``x`` and ``b``) are the only
differentiable tensors. For a batch ``x`` of shape ``(B, in)`` and an upstream gradient
``g`` of shape ``(B, out)``:

* forward ``y^T = W x^T + b``: one CSR x dense product (``Tensor.addmm_`` with a CSR
  ``mat1``: MKL's sparse BLAS on CPU, written straight into the result);
* input gradient ``dx^T = W^T g^T``: one CSR x dense product with the *precomputed*
  transpose pattern (CSR of ``W^T``, plus the permutation taking ``W``'s value order to
  ``W^T``'s);
* value gradient ``dv_k = sum_b g[b, r_k] x[b, c_k]`` for each stored entry
  ``(r_k, c_k)``: a sampled dense-dense product over the stored entries only
  (``torch.sparse.sampled_addmm``; a chunked gather with bounded memory where that is
  unavailable). No dense ``out x in`` weight or gradient is ever formed;
* bias gradient ``db = sum_b g[b]``.

Both products run with the batch as the *contiguous* dimension (``x^T`` is
``(in, B)`` row-major): each stored entry then touches a contiguous row of ``B``
numbers, the layout MKL's CSR kernel and ``sampled_addmm`` are fastest with. The
forward returns ``y`` as the transpose of a contiguous ``(out, B)`` tensor, so a
following sparse layer gets its ``x^T`` for free.

The dense backend (:func:`dense_weight_from_values`) instead scatters the values into a
dense ``W`` and calls ``F.linear``; above the crossover density (see
:data:`CROSSOVER_DENSITY` and :func:`choose_backend`) that is faster.

Support checked on torch 2.13 (CPU build with MKL): CSR x dense ``addmm`` and
``torch.sparse.sampled_addmm`` work in float32 and float64 (float16/bfloat16 are
refused by both); ``sampled_addmm`` is about as fast as one CSR product (4096x4096 at
10 %, batch 256: ~30-45 ms, where the chunked-gather fallback takes ~3 s), so it is the
default and the gather is only the fallback for other dtypes. Index tensors are int32
(MKL's LP64 interface), which spares torch a conversion of the pattern on every call.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "CSRPattern",
    "csr_pattern",
    "transpose_pattern",
    "pattern_rows",
    "sampled_dense_dense",
    "SparseLinearFunction",
    "sparse_linear",
    "dense_weight_from_values",
    "dense_linear",
    "CSR_DTYPES",
    "CROSSOVER_DENSITY",
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
#: Density at or below which the CSR backend is chosen ("auto"). Measured on the 2-core
#: development machine (AMD EPYC VM, AVX2, torch 2.13 CPU with MKL, 2 threads), float32,
#: forward + backward (value, input and bias gradients), ratio of the time of
#: SparseLinear(backend="csr") to SparseLinear(backend="dense") (< 1: CSR faster);
#: median of 5 interleaved repetitions, [ratio of the best calls] (the machine was shared
#: with other jobs: single entries are noisy, the trend is not). Command:
#: ``benchmarks/sparse.py --case crossover``.
#:
#:   out x in    batch   d=0.5        0.4          0.3          0.2          0.15         0.1          0.05
#:   256x256       32   0.38 [0.64]  0.96 [1.02]  0.82 [0.95]  0.88 [0.97]  0.93 [0.99]  1.04 [0.95]  0.88 [1.30]
#:   256x256      256   2.48 [2.47]  2.10 [2.22]  1.73 [1.77]  0.53 [1.23]  1.36 [1.41]  1.16 [0.91]  0.98 [1.12]
#:   1024x1024     32   0.46 [1.16]  0.41 [0.37]  0.40 [0.36]  0.38 [0.35]  0.38 [----]  0.35 [0.31]  0.38 [----]
#:   1024x1024    256   1.04 [0.97]  0.91 [2.66]  1.51 [1.70]  0.54 [0.87]  0.52 [0.72]  0.45 [0.57]  0.35 [0.32]
#:   4096x4096     32   0.53 [0.49]  0.42 [0.42]  0.38 [0.39]  0.42 [0.45]  0.31 [0.36]  0.28 [0.28]  0.14 [0.15]
#:   4096x4096    256   1.69 [1.63]  1.31 [1.31]  1.14 [1.31]  1.17 [1.03]  0.97 [1.06]  0.68 [0.61]  0.35 [0.34]
#:   3928x784     256   2.78 [2.82]  2.48 [2.43]  1.69 [1.67]  1.52 [1.67]  1.07 [1.18]  0.80 [0.75]  0.42 [0.40]
#:   ([----]: a stalled call made the best-call ratio meaningless.)
#:
#: With batch 256 the CSR kernels win below ~0.15 (the crossover, where the ratio is 1);
#: with batch 32 they win at every density up to 0.5 on blocks of 1024x1024 and more,
#: because the dense backend pays O(out * in) per call to build W (scatter, and the
#: gather of its gradient) whatever the batch. 0.15 is the safe choice for training
#: batches of a few hundred; with small batches ``backend="csr"`` is faster still.
CROSSOVER_DENSITY = 0.15
#: Blocks with at most this many positions (rows * cols) always use the dense backend:
#: per-call overheads dominate there. Measured like the table above, CSR / dense at
#: densities 0.3, 0.1 and 0.05 (batch 32 and 256): 32x32 1.37-1.48, 64x64 1.25-1.51,
#: 128x128 1.19-1.61 (dense ahead everywhere); 256x256 is about even (table above).
SMALL_BLOCK = 128 * 128


def choose_backend(out_features: int, in_features: int, nnz: int) -> str:
    """``"csr"`` or ``"dense"`` for a block of this shape and number of stored entries.

    CSR when the block has more than :data:`SMALL_BLOCK` positions and its density
    ``nnz / (out * in)`` is at most :data:`CROSSOVER_DENSITY`; dense otherwise.
    """
    positions = out_features * in_features
    if positions <= SMALL_BLOCK:
        return "dense"
    return "csr" if nnz <= CROSSOVER_DENSITY * positions else "dense"


# ----------------------------------------------------------------------------- patterns
class CSRPattern(NamedTuple):
    """The fixed sparsity pattern of an ``out x in`` matrix, in CSR and transposed CSR.

    ``crow`` (out+1,), ``col`` (nnz,): CSR of ``W`` (row-major order of the values);
    ``crow_t`` (in+1,), ``col_t`` (nnz,): CSR of ``W^T``; ``perm`` (nnz,) int64:
    ``values[perm]`` are the values in ``W^T``'s order. Index tensors are int32 when
    every index fits (what MKL takes without a conversion), else int64.
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

    ``perm`` (int64) maps ``W``'s value order to ``W^T``'s: ``values_t = values[perm]``.
    A stable sort by column keeps rows ascending within each column of ``W``.
    """
    out_f, in_f = shape
    idt = crow.dtype
    perm = torch.sort(col, stable=True).indices
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
        raise ValueError(f"method must be 'auto', 'sampled_addmm' or 'gather', got {method!r}")
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
    def forward(ctx, x: Tensor, values: Tensor, bias: Tensor | None, pattern: CSRPattern) -> Tensor:
        out_f, in_f = pattern.shape
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
            w_t = _csr(p.crow_t, p.col_t, values.index_select(0, p.perm), (in_f, out_f))
            grad_x = _result(in_f, g_t.shape[1], g_t).addmm_(w_t, g_t, beta=0).t()
        if ctx.needs_input_grad[1]:
            grad_values = sampled_dense_dense(g_t, x_t, p.crow, p.col, p.shape)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = g_t.sum(1)
        return grad_x, grad_values, grad_bias, None


def _flatten(x: Tensor, in_features: int) -> tuple[Tensor, tuple[int, ...]]:
    lead = tuple(x.shape[:-1])
    return x.reshape(-1, in_features), lead


def sparse_linear(x: Tensor, values: Tensor, bias: Tensor | None, pattern: CSRPattern) -> Tensor:
    """``x W^T + b`` through the CSR kernels, for ``x`` of shape ``(*batch, in)``
    (any number of leading dims, including none); returns ``(*batch, out)``.

    Dtypes must agree (:data:`CSR_DTYPES`); the caller checks them.
    """
    out_f, in_f = pattern.shape
    x2, lead = _flatten(x, in_f)
    if x2.shape[0] == 0 or pattern.nnz == 0:
        # Degenerate products: a zero result that keeps the graph (zero gradients for x
        # and values, from sums over empty slices) without calling MKL.
        zero = x2[:, :0].sum() + values[:0].sum()
        y2 = x2.new_zeros(x2.shape[0], out_f) + zero
        if bias is not None:
            y2 = y2 + bias
        return y2.reshape(*lead, out_f)
    y2 = SparseLinearFunction.apply(x2, values, bias, pattern).t()
    return y2.reshape(*lead, out_f)


# ----------------------------------------------------------------------------- dense path
def dense_weight_from_values(values: Tensor, pattern: CSRPattern, flat_index: Tensor | None = None) -> Tensor:
    """The dense ``(out, in)`` weight with ``values`` at the pattern and zeros elsewhere
    (differentiable in ``values``: the backward gathers the dense gradient at the
    pattern). ``flat_index`` (int64 ``row * in + col`` per entry) may be passed to skip
    recomputing it.
    """
    out_f, in_f = pattern.shape
    if flat_index is None:
        flat_index = pattern_rows(pattern.crow, pattern.nnz) * in_f + pattern.col.long()
    w = values.new_zeros(out_f * in_f).scatter(0, flat_index, values)
    return w.view(out_f, in_f)


def dense_linear(x: Tensor, values: Tensor, bias: Tensor | None, pattern: CSRPattern,
                 flat_index: Tensor | None = None) -> Tensor:
    """``F.linear(x, W, b)`` with ``W`` materialised by :func:`dense_weight_from_values`."""
    return F.linear(x, dense_weight_from_values(values, pattern, flat_index), bias)
