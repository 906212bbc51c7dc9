"""``as_matrix``: the block matrix ``F`` of a map whose blocks are linear, as one sparse tensor.

One application of a block map is ``z'_d = act_d(b_d + sum_s F[d, s](z_s))``. When every
block is a linear (or affine) map of its sources, ``F`` is one ``N x N`` matrix ``W``
over the packed state (``N = m.size``): row = destination, column = source, slots in
``m.slots`` order and each slot flattened row-major — the order of :meth:`BlockMap.pack
<iternn.BlockMap.pack>`. A convolution is then its block-Toeplitz matrix, a pooling layer
its averaging matrix, a flatten the identity (paper notes §7).

The contract (:func:`as_matrix`):

* **What ``W`` is.** ``W`` is the linear part of the blocks, nothing else: for every
  state ``z`` (per sample) ``pack(m(z)) = act(b + W @ pack(z))`` where ``b`` is
  returned with ``bias=True`` and ``act`` applies each slot's activation to its rows.
  For a map without biases and activations, one application is ``W @ pack(z)``. One
  application is ``m(z)``, the Jacobi update (``update="ordered"`` sweeps are not one
  product with ``W``). Only non-zeros are stored: a sparse block's stored entries that
  are exactly zero are left out (the spy plot shows the stored pattern).
* **Biases.** A slot bias ``b_d`` and a block's own offset ``F[d, s](0)`` (the bias of an
  ``nn.Linear`` or a convolution, the shift of a batch normalisation) are the affine
  part: never in ``W``; ``bias=True`` returns ``(W, b)`` with ``b`` their sum per row.
* **Activations.** Slot activations are not part of ``F`` (the paper's map is
  ``act(b + F z)``): they are ignored, by definition, so ``as_matrix`` of a tanh RNN map
  is its weight matrix, not its Jacobian. A non-linearity *inside* a block (an
  activation in an ``nn.Sequential``) makes the block non-linear: refused.
* **Modes.** ``W`` describes the map as it applies now. Batch normalisation in eval
  mode (with running statistics) is the per-channel affine map ``x -> scale x + shift``:
  its scale is in ``W``, its shift in ``b``. In train mode it normalises by the batch's
  statistics, which couples the samples: refused (call ``m.eval()``). Dropout is the
  identity in eval mode and refused in train mode (unless ``p == 0``).
* **Refusals.** A block that is not linear raises :class:`NotLinearError` (a
  :class:`~iternn.MapTypeError`) naming the block ``dst <- src`` and why: an activation
  inside it, a max pooling, a normalisation by sample or batch statistics, a product of
  two sources, a nested block map (its slots are not the outer map's: not one matrix), a
  module with hooks, or any module not known to be linear. Every block is checked
  before anything is computed.
* **Which blocks are linear.** Exact types (subclasses may override ``forward``):
  ``nn.Linear``, ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``, ``nn.AvgPool*``,
  ``nn.AdaptiveAvgPool*``, padding layers (zero, constant, reflection, replication,
  circular), ``nn.Upsample``, ``nn.PixelShuffle``/``PixelUnshuffle``,
  ``nn.ChannelShuffle``, ``nn.Fold``/``Unfold``, ``nn.Identity``, ``nn.Flatten``,
  ``nn.Unflatten``, dropout (eval), batch and instance normalisation (eval, running
  statistics), iternn's sparse and structured blocks (``SparseLinear``,
  ``MaskedLinear``, ``DiagonalLinear``, ``BlockDiagonalLinear``, ``LowRankLinear``), an
  ``nn.Sequential`` of those, and any block class that declares the class attribute
  ``linear = True`` (its promise: ``block(*sources)`` is an affine map of its sources
  jointly, ``A_1 z_1 + A_2 z_2 + ... + c``; a multi-source block — a placement or
  concatenation — is linear only if it declares it, and its columns then span all its
  sources).

How ``W`` is computed, exactly: from the structure where it is cheap — the weight of a
linear layer, the pattern and values of a sparse block, the index geometry of a
convolution (any stride, padding, dilation, groups and padding mode), the per-channel
scale of a batch normalisation — and otherwise by probing the block on the identity
basis, in chunks (column ``j`` = response to ``e_j`` minus the response to zero; only
non-zeros are kept), on a float64 copy whose known biases are zeroed, so that no
subtraction rounds. Layers that act on every channel alike (pooling, padding,
upsampling) are probed on one channel and repeated. Every shortcut that rebuilds a
layer's geometry (convolution, normalisation, the per-channel probe) is checked against
the layer itself on one random input, and a mismatch falls back to probing. ``W`` is
float64: it holds every float16/bfloat16/float32 weight exactly. Before anything large
is allocated the number of entries is estimated and refused with
:class:`~iternn.SizeError` when it would not fit (:func:`iternn.core.memory.check_bytes`);
a probed block is checked again as it goes, from the entries found so far.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.block_map import BlockMap, source_slots
from ..core.memory import check_bytes, format_bytes, tensor_bytes
from ..core.protocols import LinearBlock
from ..core.rowwise import ELEMENTWISE
from ..errors import MapTypeError, NotLinearError
from ..sparse.linear import MaskedLinear, SparseLinear
from ..sparse.structured import BlockDiagonalLinear, DiagonalLinear, LowRankLinear
from .validate import as_block_map

__all__ = ["as_matrix", "block_matrix", "module_matrix", "linear_reason"]


# ---------------------------------------------------------------------------- kinds
_ROWWISE = (nn.Linear, SparseLinear, MaskedLinear, DiagonalLinear, BlockDiagonalLinear,
            LowRankLinear)
_RESHAPE = (nn.Identity, nn.Flatten, nn.Unflatten)
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
            nn.FeatureAlphaDropout)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d,
         nn.InstanceNorm3d)
#: Layers that act on every channel alike, by the number of trailing (spatial) dims they
#: act on; ``None``: every dim after the channel.
_CHANNELWISE: dict[type[nn.Module], int | None] = {
    nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3,
    nn.ZeroPad1d: 1, nn.ZeroPad2d: 2, nn.ZeroPad3d: 3,
    nn.ConstantPad1d: 1, nn.ConstantPad2d: 2, nn.ConstantPad3d: 3,
    nn.ReflectionPad1d: 1, nn.ReflectionPad2d: 2, nn.ReflectionPad3d: 3,
    nn.ReplicationPad1d: 1, nn.ReplicationPad2d: 2, nn.ReplicationPad3d: 3,
    nn.CircularPad1d: 1, nn.CircularPad2d: 2, nn.CircularPad3d: 3,
    nn.Upsample: None, nn.UpsamplingNearest2d: 2, nn.UpsamplingBilinear2d: 2,
}
#: Common layers that are not linear (named as such in a refusal).
_NOT_LINEAR = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d,
               nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d,
               nn.LayerNorm, nn.GroupNorm, nn.Softmax, nn.LogSoftmax, nn.Embedding,
               nn.MultiheadAttention, nn.Bilinear, nn.PReLU, nn.Softplus, nn.Hardtanh)
#: Linear index maps probed as they are.
_PROBED = (nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle, nn.Fold, nn.Unfold)

#: Bytes per stored entry, counted twice: two int64 indices and a float64 value, and
#: the copy that summing duplicates (coalescing) makes.
_ENTRY_BYTES = 2 * (2 * 8 + 8)
#: Bytes of one chunk of basis vectors and their responses when a block is probed.
_CHUNK_BYTES = 1 << 24
#: A shortcut agrees with its block on a random input to this relative tolerance.
_VERIFY_RTOL = 1e-9


def _name(module: nn.Module) -> str:
    kind = type(module)
    return f"nn.{kind.__name__}" if kind.__module__.startswith("torch.nn") else kind.__name__


def _declared_linear(module: nn.Module) -> bool:
    return isinstance(module, LinearBlock) and type(module).linear is True


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _nested_map(module: nn.Module) -> bool:
    return isinstance(module, BlockMap) or isinstance(getattr(module, "map", None), BlockMap)


def _kind(module: nn.Module, n_sources: int = 1) -> tuple[str | None, str | None]:
    """``(kind, None)`` for a linear module, ``(None, reason)`` for any other."""
    name = _name(module)
    if _hooked(module):
        return None, f"{name} has forward hooks, which may change what it computes"
    if _nested_map(module):
        return None, (f"{name} is a nested block map: its slots are not the outer map's, so "
                      "it is not one matrix (take as_matrix of the inner map)")
    kind = type(module)
    if n_sources > 1 and not _declared_linear(module):
        return None, (f"{name} reads {n_sources} slots; a block reading several slots is "
                      "linear only if its class declares `linear = True` (a product or "
                      "gate of two sources is not)")
    if kind is nn.Sequential:
        for i, layer in enumerate(module):
            _, why = _kind(layer)
            if why is not None:
                return None, f"layer {i} of its nn.Sequential: {why}"
        return "sequential", None
    if kind in _ROWWISE:
        return "rowwise", None
    if kind in _RESHAPE:
        return "identity", None
    if kind in _DROPOUT:
        if module.training and module.p != 0:
            return None, f"{name} in train mode drops random entries (call .eval())"
        return "identity", None
    if kind in _CONV:
        return "conv", None
    if kind in _CONV_T:
        return "conv_t", None
    if kind in _NORM:
        if module.running_mean is None or module.running_var is None:
            return None, (f"{name} without running statistics normalises by the statistics "
                          "of its input (track_running_stats=False)")
        if module.training:
            return None, (f"{name} in train mode normalises by the batch's statistics (call "
                          ".eval() for its affine eval-mode form)")
        return "norm", None
    if kind in _CHANNELWISE:
        return "channelwise", None
    if kind in _PROBED:
        return "probe", None
    if _declared_linear(module):
        return "declared", None
    if kind in ELEMENTWISE or kind in _NOT_LINEAR:
        return None, f"{name} is not linear"
    return None, (f"{name} is not a known linear layer (a block class declares that it is "
                  "linear with the class attribute `linear = True`)")


def linear_reason(module: nn.Module, n_sources: int = 1) -> str | None:
    """Why ``module`` is not a linear map of its ``n_sources`` inputs, or ``None`` when it
    is (as :func:`as_matrix` decides it: see the module docstring)."""
    return _kind(module, n_sources)[1]


# ---------------------------------------------------------------------------- sparse parts
@dataclass
class _Part:
    """A sparse ``shape`` matrix as coordinate lists (float64 values, int64 indices)."""

    rows: Tensor
    cols: Tensor
    vals: Tensor
    shape: tuple[int, int]

    @property
    def nnz(self) -> int:
        return int(self.vals.numel())

    def nonzero(self) -> _Part:
        keep = self.vals != 0
        if bool(keep.all()):
            return self
        return _Part(self.rows[keep], self.cols[keep], self.vals[keep], self.shape)

    def to(self, device: torch.device) -> _Part:
        return _Part(self.rows.to(device), self.cols.to(device), self.vals.to(device), self.shape)

    def coalesced(self) -> _Part:
        """Duplicates summed, sorted row-major, exact zeros dropped."""
        if self.nnz == 0:
            return self
        n_rows, n_cols = self.shape
        key = self.rows * n_cols + self.cols
        key, order = torch.sort(key, stable=True)
        vals = self.vals[order]
        uniq, inverse = torch.unique_consecutive(key, return_inverse=True)
        if uniq.numel() != key.numel():
            vals = torch.zeros(uniq.numel(), dtype=vals.dtype, device=vals.device).index_add_(
                0, inverse, vals)
        return _Part(uniq // n_cols, uniq % n_cols, vals, self.shape).nonzero()

    def dense_matvec(self, v: Tensor) -> Tensor:
        """``self @ v`` for a dense ``(n_cols,)`` vector."""
        out = torch.zeros(self.shape[0], dtype=torch.float64, device=v.device)
        return out.index_add_(0, self.rows, self.vals * v[self.cols])

    def abs_matvec(self, v: Tensor) -> Tensor:
        out = torch.zeros(self.shape[0], dtype=torch.float64, device=v.device)
        return out.index_add_(0, self.rows, self.vals.abs() * v[self.cols].abs())


def _empty(shape: tuple[int, int], device: torch.device) -> _Part:
    z = torch.zeros(0, dtype=torch.long, device=device)
    return _Part(z, z.clone(), torch.zeros(0, dtype=torch.float64, device=device), shape)


def _from_dense(w: Tensor) -> _Part:
    w = w.detach().to(torch.float64)
    idx = w.nonzero()
    return _Part(idx[:, 0], idx[:, 1], w[idx[:, 0], idx[:, 1]], tuple(w.shape))


def _kron_eye(inner: _Part, lead: int) -> _Part:
    """``I_lead (x) inner``: ``inner`` repeated along the diagonal ``lead`` times."""
    if lead == 1:
        return inner
    o, i = inner.shape
    block = torch.arange(lead, device=inner.vals.device).repeat_interleave(inner.nnz)
    return _Part(block * o + inner.rows.repeat(lead), block * i + inner.cols.repeat(lead),
                 inner.vals.repeat(lead), (lead * o, lead * i))


def _product_entries(a: _Part, b: _Part) -> int:
    """Entries of ``a @ b`` before duplicates are summed (an upper bound of its nnz)."""
    counts = torch.bincount(b.rows, minlength=b.shape[0])
    return int(counts[a.cols].sum()) if a.nnz else 0


def _matmul(a: _Part, b: _Part, where: str) -> _Part:
    """``a @ b``, coalesced (a join on the inner index; no torch.sparse kernels)."""
    total = _product_entries(a, b)
    check_bytes(total * _ENTRY_BYTES, f"{where}: a product of {total} entries",
                device=a.vals.device)
    if total == 0:
        return _empty((a.shape[0], b.shape[1]), a.vals.device)
    order = torch.argsort(b.rows, stable=True)
    b_rows, b_cols, b_vals = b.rows[order], b.cols[order], b.vals[order]
    counts = torch.bincount(b_rows, minlength=b.shape[0])
    starts = torch.cumsum(counts, 0) - counts
    per = counts[a.cols]
    rep = torch.repeat_interleave(torch.arange(a.nnz, device=per.device), per, output_size=total)
    first = torch.cumsum(per, 0) - per
    pos = torch.arange(total, device=per.device) - first[rep] + starts[a.cols][rep]
    out = _Part(a.rows[rep], b_cols[pos], a.vals[rep] * b_vals[pos], (a.shape[0], b.shape[1]))
    return out.coalesced()


# ---------------------------------------------------------------------------- helpers
def _device(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def _dtype(module: nn.Module) -> torch.dtype:
    for t in (*module.parameters(), *module.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()


@contextmanager
def _quiet(module: nn.Module):
    """No gradients, the global RNG state restored (a probe draws nothing the map sees)."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        yield


def _linear_copy(module: nn.Module) -> nn.Module:
    """A float64 copy of ``module`` whose known affine offsets are zero: its response to
    ``e_j`` is column ``j`` exactly, with no subtraction."""
    c = copy.deepcopy(module).to(torch.float64)
    with torch.no_grad():
        for sub in c.modules():
            kind = type(sub)
            if kind in _ROWWISE or kind in _CONV or kind in _CONV_T or kind in _NORM:
                if getattr(sub, "bias", None) is not None:
                    sub.bias.zero_()
                if kind in _NORM and sub.running_mean is not None:
                    sub.running_mean.zero_()
            elif kind in (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d):
                sub.value = 0.0
    return c


def _zeros(shape: tuple[int, ...], rows: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.zeros(rows, *shape, dtype=dtype, device=device)


def _output_shape(module: nn.Module, in_shape: tuple[int, ...], where: str) -> tuple[int, ...]:
    """The per-sample output shape of ``module`` on one sample of ``in_shape``."""
    check_bytes(tensor_bytes(math.prod(in_shape), torch.float64), f"{where}: a probe of shape "
                f"{(1, *in_shape)}", device=_device(module))
    with _quiet(module):
        y = module(_zeros(in_shape, 1, _dtype(module), _device(module)))
    return tuple(y.shape[1:])


# ---------------------------------------------------------------------------- estimates
def _entries_bound(module: nn.Module, kind: str, in_shapes: Sequence[tuple[int, ...]],
                   out_shape: tuple[int, ...]) -> int:
    """An upper bound of the block's stored entries, from its structure alone (for a
    probed block its output size: the probe checks itself as it goes)."""
    n_out = math.prod(out_shape)
    n_in = sum(math.prod(s) for s in in_shapes)
    dense = n_out * n_in
    if kind == "rowwise":
        lead = n_in // module.in_features if module.in_features else 0
        if isinstance(module, SparseLinear):
            inner = module.nnz
        elif isinstance(module, MaskedLinear):
            inner = int(module.mask.sum())
        elif isinstance(module, DiagonalLinear):
            inner = module.in_features
        elif isinstance(module, BlockDiagonalLinear):
            inner = module.in_features * module.out_features // module.blocks
        else:
            inner = module.in_features * module.out_features
        return min(dense, lead * inner)
    if kind in ("identity", "norm"):
        return n_out
    if kind == "conv":
        k = math.prod(module.kernel_size)
        return min(dense, n_out * (module.in_channels // module.groups) * k)
    if kind == "conv_t":
        k = math.prod(module.kernel_size)
        return min(dense, n_in * (module.out_channels // module.groups) * k)
    if kind == "channelwise":
        dims = _CHANNELWISE[type(module)] or len(in_shapes[0]) - 1
        sp_in, sp_out = in_shapes[0][-dims:], out_shape[-dims:]
        window = getattr(module, "kernel_size", None)
        if isinstance(window, int):
            per_row = window**dims
        elif isinstance(window, tuple):
            per_row = math.prod(window)
        elif "Adaptive" in type(module).__name__:
            per_row = math.prod(-(-i // max(1, o)) + 1 for i, o in zip(sp_in, sp_out))
        elif "Pad" in type(module).__name__:
            per_row = 1
        else:  # upsampling: at most 4 inputs per dim (bicubic)
            per_row = 4**dims
        return min(dense, n_out * per_row)
    if kind == "sequential":
        shape, per_row = in_shapes[0], 1.0
        for layer in module:
            out = _output_shape(layer, shape, _name(module))
            sub_kind, _ = _kind(layer)
            bound = _entries_bound(layer, sub_kind, (shape,), out)
            per_row *= bound / max(1, math.prod(out))
            shape = out
        return min(dense, math.ceil(n_out * per_row))
    return n_out  # probed: checked again from what the probe finds


# ---------------------------------------------------------------------------- probing
def _probe(fn: Callable[..., Tensor], in_shapes: Sequence[tuple[int, ...]],
           out_shape: tuple[int, ...], device: torch.device, where: str) -> _Part:
    """Columns ``fn(e_j) - fn(0)`` over all sources (the others at zero), in chunks of
    basis vectors; only non-zeros are kept. ``fn`` takes float64 ``(k, *shape)`` inputs."""
    n_out = math.prod(out_shape)
    sizes = [math.prod(s) for s in in_shapes]
    n_in = sum(sizes)
    f64 = torch.float64
    with torch.no_grad():
        y0 = fn(*(_zeros(s, 1, f64, device) for s in in_shapes)).reshape(n_out)
    offset = y0 if bool((y0 != 0).any()) else None
    rows, cols, vals = [], [], []
    found = 0
    done = 0
    col0 = 0
    for i, (shape, n) in enumerate(zip(in_shapes, sizes)):
        k = max(1, min(n, _CHUNK_BYTES // (8 * (sum(sizes) + n_out))))
        check_bytes(tensor_bytes(k * (n_in + 2 * n_out), f64),
                    f"{where}: a probe chunk of {k} basis vectors", device=device)
        others = [_zeros(s, k, f64, device) for s in in_shapes]
        for j0 in range(0, n, k):
            kk = min(k, n - j0)
            x = torch.zeros(kk, n, dtype=f64, device=device)
            x[torch.arange(kk, device=device), torch.arange(j0, j0 + kk, device=device)] = 1.0
            inputs = [o[:kk] for o in others]
            inputs[i] = x.view(kk, *shape)
            with torch.no_grad():
                y = fn(*inputs).reshape(kk, n_out)
            if offset is not None:
                y = y - offset
            nz = y.nonzero()
            rows.append(nz[:, 1])
            cols.append(nz[:, 0] + (col0 + j0))
            vals.append(y[nz[:, 0], nz[:, 1]])
            found += nz.shape[0]
            done += kk
            projected = math.ceil(found * n_in / done)
            check_bytes(projected * _ENTRY_BYTES,
                        f"{where}: about {projected} entries (projected from {found} in the "
                        f"first {done} of {n_in} columns)", device=device)
        col0 += n
    if not rows:
        return _empty((n_out, n_in), device)
    return _Part(torch.cat(rows), torch.cat(cols), torch.cat(vals), (n_out, n_in))


def _call(module: nn.Module) -> Callable[..., Tensor]:
    def fn(*xs: Tensor) -> Tensor:
        with _quiet(module):
            return module(*xs)
    return fn


def _verify(module64: nn.Module, part: _Part, in_shape: tuple[int, ...],
            out_shape: tuple[int, ...], device: torch.device) -> bool:
    """Whether ``part`` is ``module64``'s linear part on one random input (float64)."""
    n_in = math.prod(in_shape)
    gen = torch.Generator(device=device).manual_seed(n_in * 7919 + part.shape[0])
    v = torch.randn(n_in, generator=gen, dtype=torch.float64, device=device)
    with _quiet(module64):
        y = module64(v.view(1, *in_shape)).reshape(-1)
        y0 = module64(_zeros(in_shape, 1, torch.float64, device)).reshape(-1)
    if y.numel() != part.shape[0]:
        return False
    got = part.dense_matvec(v)
    scale = part.abs_matvec(v) + (y - y0).abs()
    return bool(((y - y0 - got).abs() <= _VERIFY_RTOL * scale + 1e-300).all())


# ---------------------------------------------------------------------------- structure
def _rowwise(module: nn.Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
             where: str) -> _Part | None:
    """A layer acting on the last dim: its weight, repeated over the leading dims."""
    n_in_f, n_out_f = module.in_features, module.out_features
    if in_shape[-1] != n_in_f or out_shape[-1] != n_out_f or in_shape[:-1] != out_shape[:-1]:
        return None
    lead = math.prod(in_shape[:-1])
    with torch.no_grad():
        if isinstance(module, SparseLinear):
            idx = module.indices()
            inner = _Part(idx[0], idx[1], module.values.detach().to(torch.float64),
                          (n_out_f, n_in_f))
        elif isinstance(module, MaskedLinear):
            idx = module.indices()
            w = module.weight.detach()
            inner = _Part(idx[0], idx[1], w[idx[0], idx[1]].to(torch.float64), (n_out_f, n_in_f))
        elif isinstance(module, DiagonalLinear):
            r = torch.arange(n_in_f, device=module.diagonal.device)
            inner = _Part(r, r.clone(), module.diagonal.detach().to(torch.float64),
                          (n_out_f, n_in_f))
        elif isinstance(module, nn.Linear):
            inner = _from_dense(module.weight)
        else:  # BlockDiagonalLinear, LowRankLinear
            check_bytes(tensor_bytes(n_in_f * n_out_f, torch.float64),
                        f"{where}: the dense weight of {_name(module)} ({n_out_f}x{n_in_f})",
                        device=_device(module))
            inner = _from_dense(module.dense_weight())
    return _kron_eye(inner.nonzero(), lead)


def _taps(size: int, other: int, k: int, stride: int, left: int, dilation: int,
          mode: str, device: torch.device) -> tuple[Tensor, Tensor]:
    """Per position ``q < size`` and tap ``t < k``: the position ``q * stride - left + t *
    dilation`` in a dim of length ``other`` (mapped by the padding mode) and whether it
    is inside."""
    q = torch.arange(size, device=device).unsqueeze(1)
    t = torch.arange(k, device=device).unsqueeze(0)
    p = q * stride - left + t * dilation
    if mode == "zeros":
        return p, (p >= 0) & (p < other)
    if mode == "circular":
        p = torch.remainder(p, other)
    elif mode == "replicate":
        p = p.clamp(0, other - 1)
    elif mode == "reflect":
        period = 2 * (other - 1) if other > 1 else 1
        p = torch.remainder(p, period)
        p = torch.where(p >= other, period - p, p)
    return p, torch.ones_like(p, dtype=torch.bool)


def _grid(per_dim: list[tuple[Tensor, Tensor]], other: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Combine per-dim taps into ``(positions, valid)`` of shape ``(Q, K)``: flat position
    over all iterated dims by flat position over all tap dims (row-major both)."""
    nd = len(per_dim)
    flat = None
    valid = None
    for d, (p, ok) in enumerate(per_dim):
        view = [1] * (2 * nd)
        view[d], view[nd + d] = p.shape
        stride = math.prod(other[d + 1:])
        term = (p * stride).view(view)
        flat = term if flat is None else flat + term
        valid = ok.view(view) if valid is None else valid & ok.view(view)
    q = math.prod(p.shape[0] for p, _ in per_dim)
    k = math.prod(p.shape[1] for p, _ in per_dim)
    return flat.reshape(q, k), valid.expand(flat.shape).reshape(q, k)


def _left_padding(conv: nn.Module, nd: int) -> list[int]:
    rp = conv._reversed_padding_repeated_twice
    return [int(rp[2 * (nd - 1 - d)]) for d in range(nd)]


def _conv(module: nn.Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
          where: str) -> _Part | None:
    """The block-Toeplitz matrix of a convolution, from its index geometry."""
    nd = len(module.kernel_size)
    if len(in_shape) != nd + 1 or len(out_shape) != nd + 1:
        return None
    device = module.weight.device
    c_in, c_out, g = in_shape[0], out_shape[0], module.groups
    cin_g, cout_g = c_in // g, c_out // g
    sp_in, sp_out = in_shape[1:], out_shape[1:]
    mode = module.padding_mode
    left = _left_padding(module, nd) if mode != "zeros" or isinstance(module.padding, str) \
        else list(module.padding)
    taps = [_taps(sp_out[d], sp_in[d], module.kernel_size[d], module.stride[d], left[d],
                  module.dilation[d], mode, device) for d in range(nd)]
    pos, valid = _grid(taps, sp_in)  # (Q_out, K)
    q_idx, k_idx = valid.nonzero().unbind(1)
    p_idx = pos[q_idx, k_idx]
    m = q_idx.numel()
    check_bytes(c_out * cin_g * m * _ENTRY_BYTES, f"{where}: {_name(module)} with "
                f"{c_out * cin_g * m} entries", device=device)
    n_q, n_p, n_k = math.prod(sp_out), math.prod(sp_in), math.prod(module.kernel_size)
    o = torch.arange(c_out, device=device).view(c_out, 1, 1)
    cl = torch.arange(cin_g, device=device).view(1, cin_g, 1)
    c = (o // cout_g) * cin_g + cl
    w = module.weight.detach().to(torch.float64).reshape(c_out, cin_g, n_k)
    rows = (o * n_q + q_idx.view(1, 1, m)).expand(c_out, cin_g, m)
    cols = c * n_p + p_idx.view(1, 1, m)
    vals = w[:, :, k_idx]
    part = _Part(rows.reshape(-1), cols.reshape(-1), vals.reshape(-1),
                 (c_out * n_q, c_in * n_p))
    # With zero padding every (output, tap) reads its own input position: no duplicates.
    return part.nonzero() if mode == "zeros" else part.coalesced()


def _conv_t(module: nn.Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
            where: str) -> _Part | None:
    """A transposed convolution: input position ``p`` and tap ``t`` feed output position
    ``p * stride - padding + t * dilation``."""
    nd = len(module.kernel_size)
    if len(in_shape) != nd + 1 or len(out_shape) != nd + 1 or module.padding_mode != "zeros":
        return None
    device = module.weight.device
    c_in, c_out, g = in_shape[0], out_shape[0], module.groups
    cin_g, cout_g = c_in // g, c_out // g
    sp_in, sp_out = in_shape[1:], out_shape[1:]
    taps = [_taps(sp_in[d], sp_out[d], module.kernel_size[d], module.stride[d],
                  module.padding[d], module.dilation[d], "zeros", device) for d in range(nd)]
    pos, valid = _grid(taps, sp_out)  # (P_in, K): output positions
    p_idx, k_idx = valid.nonzero().unbind(1)
    r_idx = pos[p_idx, k_idx]
    m = p_idx.numel()
    check_bytes(c_in * cout_g * m * _ENTRY_BYTES, f"{where}: {_name(module)} with "
                f"{c_in * cout_g * m} entries", device=device)
    n_q, n_p, n_k = math.prod(sp_out), math.prod(sp_in), math.prod(module.kernel_size)
    c = torch.arange(c_in, device=device).view(c_in, 1, 1)
    ol = torch.arange(cout_g, device=device).view(1, cout_g, 1)
    o = (c // cin_g) * cout_g + ol
    w = module.weight.detach().to(torch.float64).reshape(c_in, cout_g, n_k)
    rows = o * n_q + r_idx.view(1, 1, m)
    cols = (c * n_p + p_idx.view(1, 1, m)).expand(c_in, cout_g, m)
    vals = w[:, :, k_idx]
    part = _Part(rows.reshape(-1), cols.reshape(-1), vals.reshape(-1),
                 (c_out * n_q, c_in * n_p))
    return part.nonzero()  # (output, input) positions determine the tap: no duplicates


def _norm(module: nn.Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> _Part | None:
    """Eval-mode normalisation: ``weight / sqrt(running_var + eps)`` per channel (dim 0 of
    the sample), on the diagonal."""
    if in_shape != out_shape or module.running_var.numel() != in_shape[0]:
        return None
    scale = torch.rsqrt(module.running_var.detach().to(torch.float64) + module.eps)
    if module.weight is not None:
        scale = scale * module.weight.detach().to(torch.float64)
    n = math.prod(in_shape)
    r = torch.arange(n, device=scale.device)
    return _Part(r, r.clone(), scale.repeat_interleave(n // in_shape[0]), (n, n)).nonzero()


def _channelwise(module64: nn.Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
                 where: str, device: torch.device) -> _Part | None:
    """A layer acting on every channel alike: probed on one channel, repeated."""
    dims = _CHANNELWISE[type(module64)]
    dims = len(in_shape) - 1 if dims is None else dims
    if dims < 1 or len(in_shape) < dims or len(out_shape) != len(in_shape) \
            or in_shape[:-dims] != out_shape[:-dims]:
        return None
    sp_in, sp_out = (1, *in_shape[-dims:]), (1, *out_shape[-dims:])
    inner = _probe(_call(module64), (sp_in,), sp_out, device, where)
    lead = math.prod(in_shape[:-dims])
    check_bytes(lead * inner.nnz * _ENTRY_BYTES,
                f"{where}: {_name(module64)} with {lead * inner.nnz} entries", device=device)
    return _kron_eye(inner, lead)


# ---------------------------------------------------------------------------- one module
def _linear_part(module: nn.Module, kind: str, in_shapes: Sequence[tuple[int, ...]],
                 out_shape: tuple[int, ...], where: str) -> _Part:
    """The linear part of a (classified) linear module: ``(n_out, sum n_in)``, non-zeros
    only, each position at most once, in no particular order (callers coalesce)."""
    device = _device(module)
    n_out = math.prod(out_shape)
    n_in = sum(math.prod(s) for s in in_shapes)
    if kind == "identity":
        if n_in != n_out:
            raise MapTypeError(f"{where}: {_name(module)} maps {n_in} entries to {n_out}")
        r = torch.arange(n_in, device=device)
        return _Part(r, r.clone(), torch.ones(n_in, dtype=torch.float64, device=device),
                     (n_out, n_in))
    if kind == "sequential":
        shape = in_shapes[0]
        part = None
        for i, layer in enumerate(module):
            out = _output_shape(layer, shape, where)
            sub_kind, _ = _kind(layer)
            sub = _linear_part(layer, sub_kind, (shape,), out, f"{where} (layer {i})")
            part = sub if part is None else _matmul(sub, part, where)
            shape = out
        if part is None:  # an empty nn.Sequential is the identity
            return _linear_part(nn.Identity(), "identity", in_shapes, out_shape, where)
        return part
    if len(in_shapes) == 1:
        in_shape = in_shapes[0]
        fast = None
        if kind == "rowwise":
            fast = _rowwise(module, in_shape, out_shape, where)
            if fast is not None:
                return fast
        elif kind == "conv":
            fast = _conv(module, in_shape, out_shape, where)
        elif kind == "conv_t":
            fast = _conv_t(module, in_shape, out_shape, where)
        elif kind == "norm":
            fast = _norm(module, in_shape, out_shape)
        if kind in ("conv", "conv_t", "norm", "channelwise"):
            module64 = _linear_copy(module)
            if kind == "channelwise":
                fast = _channelwise(module64, in_shape, out_shape, where, device)
            if fast is not None and _verify(module64, fast, in_shape, out_shape, device):
                return fast
            return _probe(_call(module64), in_shapes, out_shape, device, where)
    module64 = _linear_copy(module)
    return _probe(_call(module64), in_shapes, out_shape, device, where)


def _check_kind(module: nn.Module, n_sources: int, where: str, block) -> str:
    kind, why = _kind(module, n_sources)
    if kind is None:
        raise NotLinearError(f"{where} is not linear: {why}", block)
    return kind


def module_matrix(module: nn.Module, in_shapes: Sequence[tuple[int, ...]],
                  out_shape: tuple[int, ...], /, *, where: str | None = None) -> Tensor:
    """The linear part of ``module`` as a sparse COO tensor ``(prod(out_shape),
    sum_i prod(in_shapes[i]))`` (float64, coalesced, on the module's device).

    ``module`` maps samples ``(k, *in_shapes[i])`` (one per source, in order) to
    ``(k, *out_shape)``, as a block is called. Columns run over the sources in order,
    each flattened row-major. Raises :class:`NotLinearError` for a module that is not
    linear (see the module docstring), naming ``where`` (default: the module's class).
    """
    in_shapes = [tuple(s) for s in in_shapes]
    out_shape = tuple(out_shape)
    where = where or _name(module)
    kind = _check_kind(module, len(in_shapes), where, None)
    est = _entries_bound(module, kind, in_shapes, out_shape)
    check_bytes(est * _ENTRY_BYTES, f"{where}: about {est} matrix entries", device=_device(module))
    return _to_coo(_linear_part(module, kind, in_shapes, out_shape, where).coalesced())


def _to_coo(part: _Part, device: torch.device | None = None) -> Tensor:
    part = part if device is None else part.to(device)
    return torch.sparse_coo_tensor(torch.stack((part.rows, part.cols)), part.vals, part.shape,
                                   check_invariants=False, is_coalesced=True)


# ---------------------------------------------------------------------------- the map
def _where(dst: str, src: object) -> str:
    return f"block {dst!r} <- {src!r}"


def _map_device(bm: BlockMap) -> torch.device:
    return _device(bm)


def _offset(module: nn.Module, in_shapes: Sequence[tuple[int, ...]], n_out: int) -> Tensor:
    """The block's response to zero sources, as the map computes it (its own dtype)."""
    with _quiet(module):
        y = module(*(_zeros(s, 1, _dtype(module), _device(module)) for s in in_shapes))
    return y.detach().reshape(n_out).to(torch.float64)


def _blocks(bm: BlockMap, edges) -> list[tuple[str, object, nn.Module, str, list, tuple]]:
    """Every block of ``edges`` classified (the first non-linear one refused), and the map
    refused when its estimated entries do not fit."""
    out = []
    total = 0
    for dst, src in edges:
        module = bm.block(dst, src)
        srcs = source_slots(src)
        in_shapes = [bm.shapes[s] for s in srcs]
        where = _where(dst, src)
        kind = _check_kind(module, len(srcs), where, (dst, src))
        out.append((dst, src, module, kind, in_shapes, bm.shapes[dst]))
    for _, _, module, kind, in_shapes, out_shape in out:
        total += _entries_bound(module, kind, in_shapes, out_shape)
    n = bm.size
    check_bytes(total * _ENTRY_BYTES,
                f"as_matrix of the {n}x{n} map: about {total} entries "
                f"({format_bytes(total * _ENTRY_BYTES)} while it is built)",
                device=_map_device(bm))
    return out


def block_matrix(
    m: BlockMap | nn.Module, dst: str, src: str | tuple[str, ...], /, *, bias: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """The matrix of one block ``F[dst, src]``: a sparse COO tensor ``(n_dst, sum_s n_s)``
    (float64, coalesced; columns over the block's sources in its order, each flattened
    row-major), so that ``block(z) = W @ z + c`` per sample. ``bias=True`` returns ``(W,
    c)``, ``c = block(0)`` (dense ``(n_dst,)``). Raises :class:`NotLinearError` when the
    block is not linear; see :func:`as_matrix`."""
    bm = as_block_map(m)
    src = tuple(src) if isinstance(src, list) else src
    bm.block(dst, src)  # names an unknown block
    ((dst, src, module, kind, in_shapes, out_shape),) = _blocks(bm, [(dst, src)])
    part = _linear_part(module, kind, in_shapes, out_shape, _where(dst, src)).coalesced()
    device = _map_device(bm)
    w = _to_coo(part, device)
    if not bias:
        return w
    return w, _offset(module, in_shapes, math.prod(out_shape)).to(device)


def as_matrix(m: BlockMap | nn.Module, /, *, bias: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """The block matrix ``F`` of a map whose blocks are linear, as one sparse ``(N, N)``
    COO tensor (``N = m.size``; float64, coalesced, on the map's device).

    Row = destination, column = source; slots in ``m.slots`` order, each flattened
    row-major (the order of ``m.pack``). For every state ``z`` (per sample)::

        pack(m(z)) == act(b + W @ pack(z))

    where ``act`` applies each slot's activation to its rows and ``b`` (dense ``(N,)``,
    returned with ``bias=True`` as ``(W, b)``) is the sum of the slot biases and the
    blocks' own offsets ``F[d, s](0)``. So a map without biases and activations is one
    product ``W @ pack(z)``. Slot activations are not part of ``F`` and are ignored;
    a block that is not linear (an activation or max pooling inside it, batch
    normalisation in train mode, a product of two sources, a nested map, an opaque
    module) raises :class:`NotLinearError` naming ``dst <- src`` — every block is
    checked before anything is computed. An estimate of the entries is checked against
    the memory available first (:class:`~iternn.SizeError`). See the module docstring
    for which blocks are linear and how the matrix is computed.

    Args:
        m: a :class:`~iternn.BlockMap`, or a module holding one as ``.map``.
        bias: also return the affine part ``b``.
    """
    bm = as_block_map(m)
    if not isinstance(bias, bool):
        raise MapTypeError(f"bias must be a bool, got {type(bias).__name__}")
    blocks = _blocks(bm, bm.edges)
    device = _map_device(bm)
    offsets: dict[str, int] = {}
    at = 0
    for s, n in bm.slots.items():
        offsets[s] = at
        at += n
    n = bm.size
    rows, cols, vals = [], [], []
    b = torch.zeros(n, dtype=torch.float64, device=device) if bias else None
    for dst, src, module, kind, in_shapes, out_shape in blocks:
        part = _linear_part(module, kind, in_shapes, out_shape, _where(dst, src)).to(device)
        # Column c of the block lies in source i at c - start_i: move it to that slot.
        col_map = torch.cat([torch.arange(math.prod(sh), device=device) + offsets[s]
                             for s, sh in zip(source_slots(src), in_shapes)])
        rows.append(part.rows + offsets[dst])
        cols.append(col_map[part.cols])
        vals.append(part.vals)
        if b is not None:
            r0 = offsets[dst]
            b[r0:r0 + part.shape[0]] += _offset(module, in_shapes, part.shape[0]).to(device)
    if b is not None:
        for s, p in bm.biases.items():
            b[offsets[s]:offsets[s] + bm.slots[s]] += p.detach().reshape(-1).to(device,
                                                                                torch.float64)
    if rows:
        whole = _Part(torch.cat(rows), torch.cat(cols), torch.cat(vals), (n, n)).coalesced()
    else:
        whole = _empty((n, n), device)
    w = _to_coo(whole)
    return (w, b) if b is not None else w
