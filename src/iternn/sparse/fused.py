"""Fused sparse products: the CSR blocks into one destination slot as one product.

Slot ``d`` of a block map gets ``act(b_d + sum_s F[d, s] z_s)``. When several blocks
``F[d, s]`` are :class:`~iternn.sparse.SparseLinear` with the ``"csr"`` backend, their
``W_s`` (row = destination, column = source) are rows of one sparse matrix
``[W_s1 W_s2 ...]`` over the concatenated sources, and

    ``y = b + sum_p x_p W_p^T``   (``b``: the slot bias plus the blocks' own biases)

is one pass of the compiled kernels (:func:`iternn.sparse.native.spmm_parts`): every
output entry is accumulated once, the bias written with it, instead of one product per
block, the additions of the ``(B, n_d)`` outputs and the bias, and one autograd node
per block. The backward is one node too, with the gradients the inputs ask for:
``db = sum_b g``; for a part with entries whose source and values both need one,
``dx_p = g W_p`` and ``dv_p = g^T x_p`` sampled at part ``p``'s entries in one pass
over its transposed pattern (:func:`iternn.sparse.native.linear_backward`, ``g`` read
once for both: measured faster than a product and a sampled product); ``dx_p`` alone
through the transposed pattern (:func:`iternn.sparse.native.spmm`); the other ``dv_p``
(a map's input slot needs no ``dx``) in one call, :func:`iternn.sparse.native.sdd_parts`
(``g`` packed once for all of them).

:func:`fused_sparse_product` is registered with the execution plans
(:func:`iternn.engine.plan.register_product_kernel`) when :mod:`iternn.sparse` is
imported: for each destination it claims the blocks that are ``SparseLinear`` (exact
type) with the ``"csr"`` backend between vector slots, without hooks, even a single one
(the bias then costs no extra pass). Each call checks that the compiled kernels apply
(CPU, float32/float64, int32 pattern, library available) and that every operand has
one dtype and device; otherwise it declines and the engine calls the blocks one by one,
which raise the usual named errors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn.modules.module import _has_any_global_hook

from ..engine.plan import Term, register_product_kernel
from . import native
from .kernels import CSR_DTYPES, CSRPattern
from .linear import SparseLinear

__all__ = ["FusedSparseFunction", "FusedSparseProduct", "fused_sparse_product"]

#: Names of the transposed pattern's buffers (crow, col, perm) in the kernels' errors.
_TRANSPOSED = ("crow_indices_t", "col_indices_t", "perm_t")


class _FusedOp:
    """The parts' patterns, their names (the blocks' keys, in the tokens of the kernels'
    :class:`~iternn.errors.PatternError`), the loaded library, the output width and
    whether the caller vouches for the patterns (``checked``, see
    :func:`iternn.sparse.native.spmm`), as one opaque argument (torch.func transforms
    wrap every tensor they find in a Function's arguments)."""

    __slots__ = ("patterns", "names", "lib", "rows", "checked")

    def __init__(self, patterns: tuple[CSRPattern, ...], names: tuple[str, ...], lib,
                 rows: int, checked: bool) -> None:
        self.patterns = patterns
        self.names = names
        self.lib = lib
        self.rows = rows
        self.checked = checked


class FusedSparseFunction(torch.autograd.Function):
    """``y = b + sum_p x_p W_p^T`` through the compiled kernels, for 2-D CPU sources
    ``x_p`` ``(B, in_p)`` with any strides; returns a contiguous ``(B, n_d)`` ``y``.

    Called as ``apply(op, bias, x_1, ..., x_P, v_1, ..., v_P)`` (``bias`` may be None,
    ``v_p`` part ``p``'s values in its pattern's row-major order). Differentiable in
    ``bias``, every ``x_p`` and every ``v_p``: in reverse mode (``dx_p = g W_p``,
    ``dv_p`` sampled at part ``p``'s entries, ``db = sum_b g``; only the gradients asked
    for) and in forward mode (``y' = b' + sum_p (x_p' W_p^T + x_p W_p'^T)``, one fused
    product over the tangent parts). A tensor passed as two sources gets the sum of both
    parts' gradients.
    """

    @classmethod
    def apply(cls, op: _FusedOp, bias: Tensor | None, *operands: Tensor) -> Tensor:
        # Straight to the autograd entry point outside torch.func transforms: binding the
        # arguments to forward's signature on every call (what Function.apply does when
        # setup_context is defined) costs more than a small product.
        if torch._C._are_functorch_transforms_active():
            return super().apply(op, bias, *operands)
        args = torch._functorch.utils.unwrap_dead_wrappers((op, bias, *operands))
        return super(torch.autograd.Function, cls).apply(*args)

    @staticmethod
    def forward(op: _FusedOp, bias: Tensor | None, *operands: Tensor) -> Tensor:
        n = len(op.patterns)
        parts = [(p.crow, p.col, v, x) for p, x, v in zip(op.patterns, operands[:n], operands[n:])]
        return native.spmm_parts(op.lib, parts, op.rows, bias, checked=op.checked, names=op.names)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        op, bias, *operands = inputs
        ctx.op = op
        ctx.has_bias = bias is not None
        ctx.save_for_backward(*operands)
        ctx.save_for_forward(*operands)

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):
        op: _FusedOp = ctx.op
        n = len(op.patterns)
        saved = ctx.saved_tensors
        xs, vs = saved[:n], saved[n:]
        needs = ctx.needs_input_grad
        grad_xs: list[Tensor | None] = [None] * n
        grad_vs: list[Tensor | None] = [None] * n
        sampled = []  # the parts whose dv comes from sdd_parts
        for i, (p, name, v, x) in enumerate(zip(op.patterns, op.names, vs, xs)):
            # the patterns are checked again (a memo look-up): the buffers may have
            # changed since forward. A part without entries shares no pass (and its
            # empty perm_t is no permutation to linear_backward): spmm and sdd_parts.
            if needs[2 + i] and needs[2 + n + i] and p.nnz:
                grad_xs[i], grad_vs[i] = native.linear_backward(op.lib, p.crow_t, p.col_t, p.perm, v,
                                                                g, x, name=name, buffers=_TRANSPOSED)
            else:
                if needs[2 + i]:
                    grad_xs[i] = native.spmm(op.lib, p.crow_t, p.col_t, v, g, p.shape[1],
                                             perm=p.perm, name=name, buffers=_TRANSPOSED)
                if needs[2 + n + i]:
                    sampled.append(i)
        if sampled:
            dvs = native.sdd_parts(op.lib, [(op.patterns[i].crow, op.patterns[i].col, xs[i])
                                            for i in sampled], g,
                                   names=tuple(op.names[i] for i in sampled))
            for i, dv in zip(sampled, dvs):
                grad_vs[i] = dv
        grad_bias = g.sum(0) if ctx.has_bias and needs[1] else None
        return None, grad_bias, *grad_xs, *grad_vs

    @staticmethod
    def jvp(ctx, _op_t, bias_t: Tensor | None, *tangents: Tensor | None) -> Tensor:
        # Through apply (not the kernels directly): under torch.func transforms the saved
        # tensors and tangents are wrapped, and apply unwraps them level by level.
        op: _FusedOp = ctx.op
        n = len(op.patterns)
        saved = ctx.saved_tensors
        xs, vs = saved[:n], saved[n:]
        patterns, names, sources, weights = [], [], [], []
        for i in range(n):
            x_t, v_t = tangents[i], tangents[n + i]
            if x_t is not None:
                patterns.append(op.patterns[i])
                names.append(op.names[i])
                sources.append(x_t)
                weights.append(vs[i])
            if v_t is not None:
                patterns.append(op.patterns[i])
                names.append(op.names[i])
                sources.append(xs[i])
                weights.append(v_t.contiguous())
        batch = xs[0].shape[0]
        if not patterns:
            if bias_t is None:
                return xs[0].new_zeros(batch, op.rows)
            return bias_t.expand(batch, op.rows)
        tangent_op = _FusedOp(tuple(patterns), tuple(names), op.lib, op.rows, op.checked)
        return FusedSparseFunction.apply(tangent_op, None if bias_t is None else bias_t.contiguous(),
                                         *sources, *weights)


def _hooked(module: torch.nn.Module) -> bool:
    """Whether calling ``module`` would run hooks of its own, which a fused product would
    skip (global hooks are checked on each call)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _claims(term: Term) -> bool:
    m = term.module
    return (type(m) is SparseLinear and m.backend == "csr" and term.out_shape is None
            and len(term.srcs) == 1 and not _hooked(m))


class FusedSparseProduct:
    """The fused product of a destination's CSR :class:`~iternn.sparse.SparseLinear`
    terms (see the module docstring); what the engine's ``Product`` contract asks.

    ``terms``: the terms it computes. Calling it with ``values`` (slot -> tensor of
    shape ``(*batch, n_s)``), the slot bias (or None) and ``batch`` returns
    ``bias + sum_p F[d, s_p](z_{s_p})`` of shape ``(*batch, n_d)`` (the blocks' own
    biases included, unless a term's ``skip_bias`` says another part adds it), or
    ``None`` when the compiled kernels do not apply to this call.
    """

    def __init__(self, terms: Sequence[Term]) -> None:
        self.terms = tuple(terms)
        self._modules = tuple(t.module for t in self.terms)
        self._sources = tuple(t.srcs[0] for t in self.terms)
        self._names = tuple(t.key for t in self.terms)
        self._own_bias = tuple(not t.skip_bias for t in self.terms)
        self._rows = self._modules[0].out_features

    def __repr__(self) -> str:
        return f"FusedSparseProduct({', '.join(self._names)})"

    def __call__(self, values: Mapping[str, Tensor], bias: Tensor | None,
                 batch: tuple[int, ...]) -> Tensor | None:
        lib = native.library()
        count = math.prod(batch)
        if lib is None or count == 0 or _has_any_global_hook():
            return None
        rows = self._rows
        # attributes, not _parameters: torch.func.functional_call swaps tensors in there
        dtype = self._modules[0].values.dtype
        if dtype not in CSR_DTYPES:
            return None
        biases = [] if bias is None else [bias]
        xs, vs, patterns = [], [], []
        for m, src, own_bias in zip(self._modules, self._sources, self._own_bias):
            if m._backend != "csr" or _hooked(m):
                return None
            x, v = values[src], m.values
            if (x.dtype != dtype or v.dtype != dtype or not x.is_cpu or not v.is_cpu
                    or x.shape[:-1] != batch or x.shape[-1] != m.in_features
                    or m.out_features != rows):
                return None
            p = m.pattern
            if p.col.dtype != torch.int32:
                return None
            xs.append(x if x.dim() == 2 else x.reshape(count, m.in_features))
            vs.append(v.contiguous())
            patterns.append(p)
            b = m.bias
            if own_bias and b is not None:
                biases.append(b)
        for b in biases:
            if b.dtype != dtype or not b.is_cpu or b.shape != (rows,):
                return None
        total = None
        for b in biases:
            total = b if total is None else total + b
        if total is not None:
            total = total.contiguous()
        # checked: each module's pattern property has just checked (or found checked and
        # unchanged) its buffers
        op = _FusedOp(tuple(patterns), self._names, lib, rows, True)
        y = FusedSparseFunction.apply(op, total, *xs, *vs)
        return y if len(batch) == 1 else y.reshape(*batch, rows)


def fused_sparse_product(terms: Sequence[Term]) -> FusedSparseProduct | None:
    """The product kernel of the execution plans: a :class:`FusedSparseProduct` of the
    terms among ``terms`` (one destination's) that are ``SparseLinear`` (exact type) with
    the ``"csr"`` backend, one vector source and no hooks; ``None`` when there are none."""
    claimed = tuple(t for t in terms if _claims(t))
    return FusedSparseProduct(claimed) if claimed else None


register_product_kernel(fused_sparse_product)
