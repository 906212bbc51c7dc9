"""Sparse linear blocks: :class:`SparseLinear` (compressed storage) and :class:`MaskedLinear`.

Both compute ``y = x W^T + b`` for inputs of shape ``(*batch, in_features)`` (any number of
leading dims), like ``nn.Linear``, with a fixed sparsity pattern whose entries alone are
trainable.

* :class:`SparseLinear` stores only the pattern (CSR row pointers and column indices, as
  buffers, so ``state_dict`` carries it) and one value per stored entry (the ``values``
  parameter). Its ``"csr"`` backend never forms a dense weight or a dense weight gradient
  (see :mod:`iternn.sparse.kernels`); its ``"dense"`` backend scatters the values into a
  dense weight for ``F.linear``, which is faster above the measured crossover density.
* :class:`MaskedLinear` keeps a dense ``weight`` and a boolean ``mask`` buffer and
  computes ``F.linear(x, weight * mask, bias)``: the straightforward reference, and the
  better choice for dense-ish patterns.

Row = output index (destination), column = input index (source), as everywhere in
iternn. The default initialisation is ``nn.Linear``'s, with each row's fan-in replaced by
its *effective* fan-in, the number of stored entries in that row:
``U(-1/sqrt(f_i), 1/sqrt(f_i))`` for the entries and the bias of row ``i`` (rows with no
entries get a zero bias).
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.memory import check_bytes, tensor_bytes
from ..errors import MapError, MapTypeError, PatternError
from . import kernels
from .checks import Memo, check_csr_pattern, remember_checked
from .kernels import CSRPattern
from .sampling import random_indices

__all__ = ["SparseLinear", "MaskedLinear"]

_BACKENDS = ("auto", "csr", "dense")
#: SparseLinear's pattern buffers: the CSR pattern (saved), then the transposed pattern
#: and the permutation derived from it (not saved).
_PATTERN_BUFFERS = ("crow_indices", "col_indices", "crow_indices_t", "col_indices_t", "perm_t")
#: SparseLinear modules whose pattern buffers were checked since they last changed.
_checked = Memo()


def _check_features(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise MapTypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise MapError(f"{name} must be positive, got {value}")
    return value


def _check_dtype(dtype: torch.dtype | None) -> torch.dtype:
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise MapTypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    return dtype


def _check_generator(generator: object) -> torch.Generator | None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise MapTypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator


def _check_density(density: object) -> float:
    if isinstance(density, bool) or not isinstance(density, numbers.Real):
        raise MapTypeError(f"density must be a real number in (0, 1], got {type(density).__name__}")
    value = float(density)
    if not (0.0 < value <= 1.0):  # also rejects NaN
        raise MapError(f"density must be in (0, 1], got {density!r}")
    return value


def _check_indices(indices: object, out_features: int, in_features: int) -> Tensor:
    """Validated ``(2, nnz)`` int64 CPU positions, sorted row-major."""
    if not isinstance(indices, Tensor):
        raise MapTypeError(f"indices must be a (2, nnz) integer tensor, got {type(indices).__name__}")
    if indices.dtype == torch.bool or indices.is_floating_point() or indices.is_complex():
        raise MapTypeError(f"indices must be an integer tensor, got dtype {indices.dtype}")
    if indices.dim() != 2 or indices.shape[0] != 2:
        raise PatternError("indices", f"indices must have shape (2, nnz), got {tuple(indices.shape)}")
    idx = indices.detach().to("cpu", torch.long)
    rows, cols = idx[0], idx[1]
    for name, part, size, what in ((0, rows, out_features, "out_features"),
                                   (1, cols, in_features, "in_features")):
        if part.numel() and (int(part.min()) < 0 or int(part.max()) >= size):
            bad = part[(part < 0) | (part >= size)][0].item()
            kind = "row" if name == 0 else "column"
            raise PatternError(
                "indices", f"indices: {kind} index {bad} is out of range [0, {size}) ({what}={size})"
            )
    flat, order = torch.sort(rows * in_features + cols)
    dup = flat.diff() == 0
    if bool(dup.any()):
        first = int(flat[1:][dup][0])
        raise PatternError(
            "indices",
            f"indices contain {int(dup.sum())} duplicate position(s), e.g. "
            f"({first // in_features}, {first % in_features})"
        )
    return idx[:, order]


def _row_bounds(row_counts: Tensor) -> Tensor:
    """``1/sqrt(f_i)`` per row (float64), 0 for rows with no entries."""
    counts = row_counts.to(torch.float64)
    return torch.where(counts > 0, counts.clamp(min=1).rsqrt(), torch.zeros_like(counts))


def _check_input(module: nn.Module, x: object, param_name: str, param: Tensor) -> Tensor:
    cls = type(module).__name__
    if not isinstance(x, Tensor):
        raise MapTypeError(f"{cls} input must be a tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != module.in_features:
        raise MapError(
            f"{cls} input must have last dim in_features={module.in_features}, "
            f"got shape {tuple(x.shape)}"
        )
    if x.dtype != param.dtype:
        raise MapTypeError(
            f"{cls}.{param_name} has dtype {param.dtype} but the input has dtype {x.dtype}; "
            f"convert the module (.to({x.dtype})) or the input"
        )
    return x


class _PatternCheck:
    """What the two pattern-carrying blocks share: their trainable count (only the
    pattern's entries) and a ``_load_from_state_dict`` guard: pattern buffers must match
    the module's exactly.
    """

    _pattern_buffers: tuple[str, ...] = ()
    _weight_name = "weight"  # the parameter holding the pattern's entries

    def trainable_counts(self) -> dict[str, int]:
        """Entries training can change, per own parameter: the weight parameter -> nnz
        (stored or masked entries only), ``bias`` -> out_features
        (:class:`iternn.core.protocols.CountsTrainable`)."""
        counts = {self._weight_name: self.nnz}
        if self.bias is not None:
            counts["bias"] = self.out_features
        return counts

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        self._check_loaded_pattern(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _check_loaded_pattern(self, state_dict, prefix: str) -> None:
        for name in self._pattern_buffers:
            key = prefix + name
            if key not in state_dict:
                continue  # strict loading reports missing keys itself
            new, own = state_dict[key], getattr(self, name)
            same = (
                isinstance(new, Tensor)
                and tuple(new.shape) == tuple(own.shape)
                and torch.equal(new.detach().to(device=own.device, dtype=own.dtype), own)
            )
            if not same:
                shape = tuple(new.shape) if isinstance(new, Tensor) else type(new).__name__
                raise PatternError(
                    key,
                    f"{type(self).__name__}: state_dict buffer {key!r} (shape {shape}) differs "
                    f"from this block's pattern (shape {tuple(own.shape)}); the sparsity "
                    f"pattern is fixed at construction, build the block with the saved pattern"
                )


class SparseLinear(_PatternCheck, nn.Module):
    """A linear map with a fixed sparse weight, stored compressed; drop-in for ``nn.Linear``.

    ``y = x W^T + b`` where ``W`` (``out_features x in_features``) has ``nnz`` stored
    entries. The pattern is given either by ``density`` (exactly
    ``round(density * in_features * out_features)`` distinct positions -- Python's
    ``round``, halves to even -- drawn uniformly without replacement with ``generator``)
    or by ``indices`` (``(2, nnz)`` integer positions ``(row = output index, column =
    input index)``, distinct and in range, any order).

    Parameters: ``values`` (``(nnz,)``, in the pattern's row-major order: see
    :meth:`indices`) and ``bias`` (``(out_features,)``, or ``None`` with ``bias=False``).
    Buffers: ``crow_indices`` (``(out_features + 1,)``) and ``col_indices`` (``(nnz,)``),
    the CSR pattern, saved in ``state_dict``; the transposed pattern used by the input
    gradient (``crow_indices_t``, ``col_indices_t`` and the permutation ``perm_t``) is
    derived from it and not saved. Loading a ``state_dict`` whose pattern differs raises a
    :class:`~iternn.errors.PatternError` (a ``ValueError``) naming the buffer. The
    buffers may be edited (in place or by assignment): the next use of the pattern
    checks it again (:func:`~iternn.sparse.check_csr_pattern`; a ``PatternError`` names
    the buffer and the bad entry, before any kernel reads it) and derives the transposed
    buffers from the CSR ones again. Index buffers are int32 when every index fits (the
    form MKL takes), so ``.double()`` and ``.to(dtype)`` convert only values and bias.

    ``backend``: ``"csr"`` (compressed kernels, never a dense weight or gradient; float32
    and float64 only; on CPU the compiled kernels of :mod:`iternn.sparse.native`, else
    ``torch.sparse``), ``"dense"`` (values scattered into a dense weight, then
    ``F.linear``) or ``"auto"`` (chosen from the shape and density by
    :func:`iternn.sparse.kernels.choose_backend`: CSR at or below the crossover density
    measured on the development machine for the CSR implementation in use). The
    resolved choice is the ``backend`` attribute; assigning ``"csr"``/``"dense"``/``"auto"``
    to it later is allowed.

    Same ``generator`` seed -> identical pattern, values and bias.
    """

    rowwise = True  # acts on the last dim only: callable on a whole sequence
    linear = True  # affine: x W^T + b (with no bias, a zero input gives zero)

    _pattern_buffers = ("crow_indices", "col_indices")
    _weight_name = "values"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        density: float | None = None,
        indices: Tensor | None = None,
        bias: bool = True,
        generator: torch.Generator | None = None,
        backend: str = "auto",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = _check_features(in_features, "in_features")
        self.out_features = _check_features(out_features, "out_features")
        if not isinstance(bias, bool):
            raise MapTypeError(f"bias must be a bool, got {type(bias).__name__}")
        generator = _check_generator(generator)
        dtype = _check_dtype(dtype)
        self._check_backend(backend)
        if (density is None) == (indices is None):
            raise MapError(
                "give exactly one of density and indices "
                f"(got {'both' if density is not None else 'neither'})"
            )
        if density is not None:
            p = _check_density(density)
            k = round(p * in_features * out_features)
            idx = random_indices(out_features, in_features, k, generator=generator)
        else:
            idx = _check_indices(indices, out_features, in_features)
        nnz = idx.shape[1]
        # The pattern and its transpose hold a row pointer per output and per input (the
        # int64 counts they are built from), three int64 index arrays of nnz and the values.
        check_bytes(8 * (2 * (out_features + in_features + 2) + 3 * nnz)
                    + tensor_bytes(nnz + out_features, dtype),
                    f"SparseLinear(in_features={in_features}, out_features={out_features}) "
                    f"with {nnz} entries ({dtype})")
        pattern = kernels.csr_pattern(idx, (out_features, in_features))
        del idx  # (2, nnz) int64: the largest temporary of a big block
        self.register_buffer("crow_indices", pattern.crow.to(device))
        self.register_buffer("col_indices", pattern.col.to(device))
        self.register_buffer("crow_indices_t", pattern.crow_t.to(device), persistent=False)
        self.register_buffer("col_indices_t", pattern.col_t.to(device), persistent=False)
        self.register_buffer("perm_t", pattern.perm.to(device), persistent=False)

        bounds = _row_bounds(pattern.crow.diff()).to(dtype)
        entry_bounds = bounds.repeat_interleave(pattern.crow.diff().long(), output_size=nnz)
        values = torch.rand(nnz, generator=generator, dtype=dtype).mul_(2).sub_(1).mul_(entry_bounds)
        self.values = nn.Parameter(values.to(device))
        if bias:
            b = torch.rand(out_features, generator=generator, dtype=dtype).mul_(2).sub_(1).mul_(bounds)
            self.bias = nn.Parameter(b.to(device))
        else:
            self.register_parameter("bias", None)
        self.backend = backend
        if self.col_indices.device.type != "meta":  # checked once here, then on each change
            self._check_pattern(tuple(self._buffers[n] for n in _PATTERN_BUFFERS),
                                (out_features, in_features))

    # ------------------------------------------------------------------ pattern
    @staticmethod
    def _check_backend(backend: object) -> str:
        if backend not in _BACKENDS:
            raise MapError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        return backend

    @property
    def backend(self) -> str:
        """``"csr"`` or ``"dense"``: how :meth:`forward` computes (``"auto"`` resolved)."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        self._check_backend(value)
        if value == "auto":
            value = kernels.choose_backend(self.out_features, self.in_features, self.nnz)
        self._backend = value

    @property
    def pattern(self) -> CSRPattern:
        """The pattern (CSR and transposed CSR) as a :class:`~iternn.sparse.kernels.CSRPattern`,
        checked: every use of the pattern (:meth:`forward`, :meth:`indices`,
        :meth:`dense_weight`) goes through here.

        The first call after any change of a pattern buffer (in place, by assignment, by
        ``load_state_dict``, by ``.to()``) runs
        :func:`~iternn.sparse.check_csr_pattern` on ``crow_indices`` and ``col_indices``
        (a :class:`~iternn.errors.PatternError` naming the buffer and the bad entry) and
        derives the transposed buffers again from them; other calls cost a comparison of
        the buffers' version counters and data pointers.
        """
        b = self._buffers
        tensors = (b.get("crow_indices"), b.get("col_indices"), b.get("crow_indices_t"),
                   b.get("col_indices_t"), b.get("perm_t"))
        shape = (self.out_features, self.in_features)
        if not _checked.hit(self, tensors, shape):
            tensors = self._check_pattern(tensors, shape)
        return CSRPattern(*tensors, shape)

    def _check_pattern(self, tensors: tuple, shape: tuple[int, int]) -> tuple[Tensor, ...]:
        """Check the CSR buffers, derive the transposed ones again where they differ,
        remember the result."""
        crow, col = tensors[:2]
        check_csr_pattern(crow, col, shape, name=type(self).__name__)
        derived = kernels.transpose_pattern(crow, col, shape)
        for name, own, new in zip(_PATTERN_BUFFERS[2:], tensors[2:], derived):
            same = isinstance(own, Tensor) and own.dtype == new.dtype and own.shape == new.shape \
                and own.device == new.device and torch.equal(own, new)
            if not same:
                setattr(self, name, new)
        tensors = (crow, col, *(self._buffers[name] for name in _PATTERN_BUFFERS[2:]))
        remember_checked(crow, col, shape)
        remember_checked(tensors[2], tensors[3], (shape[1], shape[0]))
        _checked.add(self, tensors, shape)
        self._flat_index = None  # the dense backend's scatter positions, derived on use
        return tensors

    @property
    def nnz(self) -> int:
        """Number of stored entries."""
        return self.col_indices.numel()

    @property
    def density(self) -> float:
        """``nnz / (out_features * in_features)``."""
        return self.nnz / (self.out_features * self.in_features)

    def indices(self) -> Tensor:
        """``(2, nnz)`` int64 positions ``(row, column)``, row-major: ``values[k]`` sits at
        ``indices()[:, k]``."""
        p = self.pattern
        rows = kernels.pattern_rows(p.crow, p.nnz)
        return torch.stack((rows, p.col.long()))

    def dense_weight(self) -> Tensor:
        """The dense ``(out_features, in_features)`` weight (differentiable in ``values``);
        for tests and inspection, it materialises the whole matrix."""
        return kernels.dense_weight_from_values(self.values, self.pattern)

    # ------------------------------------------------------------------ compute
    def forward(self, x: Tensor) -> Tensor:
        _check_input(self, x, "values", self.values)
        if self._backend == "dense":
            p = self.pattern
            flat = self.__dict__.get("_flat_index")
            if flat is None or flat.device != p.col.device:
                # row * in + col of every entry: derived once per checked pattern (a
                # change of the pattern buffers runs _check_pattern, which drops it)
                flat = kernels.pattern_rows(p.crow, p.nnz) * self.in_features + p.col.long()
                self._flat_index = flat
            return kernels.dense_linear(x, self.values, self.bias, p, flat)
        if x.dtype not in kernels.CSR_DTYPES:
            raise MapTypeError(
                f"SparseLinear.values has dtype {x.dtype}, which the 'csr' backend does not "
                f"support (torch's CSR kernels take {[str(d) for d in kernels.CSR_DTYPES]}); "
                f"use backend='dense' or convert the module"
            )
        # checked: self.pattern has just checked (or found checked and unchanged) all five
        # pattern buffers, so the kernels need not check them again
        return kernels.sparse_linear(x, self.values, self.bias, self.pattern, checked=True,
                                     name=type(self).__name__)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"nnz={self.nnz}, density={self.density:.4g}, backend={self.backend!r}, "
            f"bias={self.bias is not None}"
        )


class MaskedLinear(_PatternCheck, nn.Module):
    """A dense linear map whose weight is restricted to a fixed boolean mask.

    ``y = F.linear(x, weight * mask, bias)``. ``mask`` is a bool tensor of shape
    ``(out_features, in_features)`` (row = output index); ``in_features`` and
    ``out_features`` are read from it. ``weight`` is a dense parameter whose masked-out
    entries are zero from construction and get zero gradients (so SGD, momentum, weight
    decay and Adam leave them at zero); only the ``mask.sum()`` masked-in entries and the
    bias count as trainable. ``mask`` is a buffer (in ``state_dict``); loading a
    ``state_dict`` with a different mask raises a ``ValueError``. ``generator`` seeds the
    initialisation.
    """

    rowwise = True  # acts on the last dim only: callable on a whole sequence
    linear = True  # affine: x W^T + b (with no bias, a zero input gives zero)

    _pattern_buffers = ("mask",)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        mask: Tensor,
        bias: bool = True,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = _check_features(in_features, "in_features")
        self.out_features = _check_features(out_features, "out_features")
        if not isinstance(bias, bool):
            raise MapTypeError(f"bias must be a bool, got {type(bias).__name__}")
        generator = _check_generator(generator)
        dtype = _check_dtype(dtype)
        if not isinstance(mask, Tensor):
            raise MapTypeError(f"mask must be a bool tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise MapTypeError(f"mask must have dtype torch.bool, got {mask.dtype}")
        if tuple(mask.shape) != (out_features, in_features):
            raise PatternError(
                "mask",
                f"mask must have shape (out_features, in_features) = "
                f"({out_features}, {in_features}), got {tuple(mask.shape)}"
            )
        check_bytes(tensor_bytes(out_features * in_features, dtype),
                    f"MaskedLinear({in_features}, {out_features}) weight ({dtype})")
        mask = mask.detach().to("cpu").clone()
        bounds = _row_bounds(mask.sum(1)).to(dtype)
        # In place: a large block's initialisation holds one dense temporary, the weight.
        w = torch.rand(out_features, in_features, generator=generator, dtype=dtype)
        w.mul_(2).sub_(1).mul_(bounds.unsqueeze(1)).mul_(mask)
        self.register_buffer("mask", mask.to(device))
        self.weight = nn.Parameter(w.to(device))
        if bias:
            b = torch.rand(out_features, generator=generator, dtype=dtype).mul_(2).sub_(1).mul_(bounds)
            self.bias = nn.Parameter(b.to(device))
        else:
            self.register_parameter("bias", None)

    @property
    def backend(self) -> str:
        """Always ``"masked"`` (dense product with the masked weight)."""
        return "masked"

    @property
    def nnz(self) -> int:
        """Number of masked-in (trainable) weight entries."""
        return int(self._checked_mask().sum())

    @property
    def density(self) -> float:
        return self.nnz / (self.out_features * self.in_features)

    def indices(self) -> Tensor:
        """``(2, nnz)`` int64 positions of the masked-in entries, row-major."""
        return self._checked_mask().nonzero().t()

    def dense_weight(self) -> Tensor:
        """``weight * mask`` (differentiable in ``weight``)."""
        return self.weight * self._checked_mask()

    def _checked_mask(self) -> Tensor:
        """The mask, refused unless it is a bool tensor of shape (out_features,
        in_features) on the weight's device and the weight has that shape too: a float
        mask would scale entries, a broadcasting one would unmask whole rows or columns."""
        mask, weight = self._buffers.get("mask"), self.weight
        shape = (self.out_features, self.in_features)
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != shape:
            got = f"{mask.dtype}, shape {tuple(mask.shape)}" if isinstance(mask, Tensor) \
                else type(mask).__name__
            raise PatternError("mask", f"MaskedLinear.mask must be a torch.bool tensor of shape "
                                       f"{shape}, got {got}")
        if weight.shape != shape:
            raise MapError(f"MaskedLinear.weight must have shape {shape}, got {tuple(weight.shape)}")
        if mask.device != weight.device:
            raise MapTypeError(f"MaskedLinear.mask is on {mask.device} but the weight is on "
                               f"{weight.device}")
        return mask

    def forward(self, x: Tensor) -> Tensor:
        _check_input(self, x, "weight", self.weight)
        if self.bias is not None and (self.bias.shape != (self.out_features,) or self.bias.dtype != x.dtype):
            raise MapTypeError(f"MaskedLinear.bias must be a ({self.out_features},) {x.dtype} tensor, "
                               f"got {self.bias.dtype}, shape {tuple(self.bias.shape)}")
        return F.linear(x, self.weight * self._checked_mask(), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"nnz={self.nnz}, density={self.density:.4g}, bias={self.bias is not None}"
        )

