"""Structured linear blocks: diagonal, low-rank and block-diagonal maps.

Each block is an ordinary ``nn.Module`` mapping ``(*batch, in_features)`` to
``(*batch, out_features)`` (any number of leading batch dimensions, including none),
with ``in_features``/``out_features`` attributes so a :class:`~iternn.BlockMap` checks
its shape without probing, ``dense_weight()`` (the ``(out, in)`` matrix the block
applies, differentiable, for tests and inspection) and ``trainable_counts()`` (how many
entries of each of its own parameters training can change when that parameter is
trainable; :func:`iternn.count_trainable` applies ``requires_grad`` itself). All state is
in registered parameters, so ``.to()``, ``.double()``, ``state_dict()`` and
``torch.save`` work as for ``nn.Linear``.

Default initialisations (``reset_parameters``), where ``f`` is the fan-in of the
parameter's rows, are ``nn.Linear``'s: ``U(-1/sqrt(f), 1/sqrt(f))``:

- :class:`DiagonalLinear`: ``diagonal = 1`` (the identity), ``bias = 0``; no randomness.
- :class:`LowRankLinear`: as two stacked ``nn.Linear`` layers ``in -> rank -> out``:
  ``v ~ U(+-1/sqrt(in))``, then ``u ~ U(+-1/sqrt(rank))``, then ``bias ~ U(+-1/sqrt(in))``.
- :class:`BlockDiagonalLinear`: every block ``~ U(+-1/sqrt(in/k))``, ``bias`` likewise.

Random draws come from the ``generator`` argument when given (never the global RNG
then); they are made in float64 on the generator's device and cast to the parameter's
dtype and device, so the same seed gives the same values (up to rounding) in any dtype.
Identity blocks are plain ``nn.Identity``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import MapError, MapTypeError

__all__ = ["DiagonalLinear", "LowRankLinear", "BlockDiagonalLinear"]


# --------------------------------------------------------------------------- draws
# Shared with iternn.sparse.patterns (private helpers; not public API).


def _gen_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _uniform(shape, low, high, generator: torch.Generator | None) -> Tensor:
    """float64 draws ``U(low, high)``; ``low``/``high`` are floats or tensors of ``shape``."""
    dev = _gen_device(generator)
    u = torch.rand(shape, generator=generator, dtype=torch.float64, device=dev)
    low = torch.as_tensor(low, dtype=torch.float64).to(dev)
    high = torch.as_tensor(high, dtype=torch.float64).to(dev)
    return low + (high - low) * u


def _normal(shape, mean, std, generator: torch.Generator | None) -> Tensor:
    """float64 draws ``N(mean, std**2)``; ``mean``/``std`` are floats or tensors of ``shape``."""
    dev = _gen_device(generator)
    z = torch.randn(shape, generator=generator, dtype=torch.float64, device=dev)
    mean = torch.as_tensor(mean, dtype=torch.float64).to(dev)
    std = torch.as_tensor(std, dtype=torch.float64).to(dev)
    return mean + std * z


def _orthogonal(shape, generator: torch.Generator | None) -> Tensor:
    """float64 (batched) semi-orthogonal matrices of ``shape = (*batch, m, n)``.

    Rows orthonormal when ``m <= n``, columns orthonormal when ``m >= n``; drawn as the
    Q factor of a Gaussian matrix with the signs of R's diagonal folded in (Haar measure).
    """
    *batch, m, n = shape
    big, small = max(m, n), min(m, n)
    a = torch.randn((*batch, big, small), generator=generator, dtype=torch.float64,
                    device=_gen_device(generator))
    q, r = torch.linalg.qr(a)
    d = torch.diagonal(r, dim1=-2, dim2=-1)
    sign = torch.where(d < 0, -1.0, 1.0).to(q)
    q = q * sign.unsqueeze(-2)
    return q.transpose(-2, -1) if m < n else q


def _fill_(param: Tensor, values: Tensor) -> None:
    """Copy float64 draws into ``param`` (its dtype and device), without autograd."""
    with torch.no_grad():
        param.copy_(values.reshape(param.shape).to(dtype=param.dtype, device=param.device))


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise MapTypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise MapError(f"{name} must be positive, got {value}")
    return value


def _check_input(x: Tensor, n: int, who: str) -> None:
    if not isinstance(x, Tensor):
        raise MapTypeError(f"{who} expects a tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] != n:
        raise MapError(f"{who} expects input of shape (*batch, {n}), got {tuple(x.shape)}")


def _check_params(module: nn.Module, x: Tensor, shapes: dict[str, tuple[int, ...]]) -> None:
    """Every parameter of ``module`` named in ``shapes`` has that shape and ``x``'s
    dtype and device: a replaced parameter of another shape could broadcast (a ``(1,)``
    diagonal scales every feature alike) and a product never mixes dtypes or devices."""
    who = type(module).__name__
    for name, shape in shapes.items():
        p = module._parameters.get(name)
        if p is None:
            continue
        if p.shape != shape:
            raise MapError(f"{who}.{name} must have shape {shape}, got {tuple(p.shape)}")
        if p.dtype != x.dtype or p.device != x.device:
            raise MapTypeError(f"{who}.{name} is {p.dtype} on {p.device} but the input is "
                               f"{x.dtype} on {x.device}; convert the module or the input")


def _own_counts(module: nn.Module) -> dict[str, int]:
    return {name: int(p.numel()) for name, p in module._parameters.items() if p is not None}


# --------------------------------------------------------------------------- blocks


class DiagonalLinear(nn.Module):
    """``y = x * diagonal (+ bias)``: a square block ``diag(diagonal)``.

    Args:
        n: size of input and output.
        bias: add a bias of shape ``(n,)`` (default ``False``: blocks carry no bias,
            a block map has one per slot).
        dtype, device: of the parameters.

    Parameters ``diagonal`` ``(n,)`` (default 1, i.e. the identity) and optional
    ``bias`` ``(n,)`` (default 0). ``trainable_counts()`` is ``{"diagonal": n}``
    (plus ``"bias": n``).
    """

    rowwise = True  # acts on the last dim only: callable on a whole sequence
    linear = True  # affine: x W^T + b (with no bias, a zero input gives zero)

    def __init__(self, n: int, *, bias: bool = False, dtype=None, device=None) -> None:
        super().__init__()
        n = _positive_int(n, "n")
        kw = {"dtype": dtype, "device": device}
        self.in_features = n
        self.out_features = n
        self.diagonal = nn.Parameter(torch.empty(n, **kw))
        self.bias = nn.Parameter(torch.empty(n, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``diagonal = 1``, ``bias = 0`` (deterministic)."""
        with torch.no_grad():
            self.diagonal.fill_(1.0)
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.in_features, "DiagonalLinear")
        n = self.in_features
        _check_params(self, x, {"diagonal": (n,), "bias": (n,)})
        y = x * self.diagonal
        return y + self.bias if self.bias is not None else y

    def dense_weight(self) -> Tensor:
        """The ``(n, n)`` matrix ``diag(diagonal)`` (differentiable)."""
        return torch.diag(self.diagonal)

    def trainable_counts(self) -> dict[str, int]:
        return _own_counts(self)

    def extra_repr(self) -> str:
        return f"n={self.in_features}, bias={self.bias is not None}"


class LowRankLinear(nn.Module):
    """``y = (x v^T) u^T (+ bias)``: a rank-``rank`` block ``W = u v``.

    Args:
        in_features, out_features: sizes (columns and rows of ``W``).
        rank: ``1 <= rank <= min(in_features, out_features)``.
        bias: add a bias of shape ``(out_features,)``.
        generator: the source of the default initialisation's randomness.
        dtype, device: of the parameters.

    Parameters ``u`` ``(out_features, rank)``, ``v`` ``(rank, in_features)`` and
    optional ``bias``. The forward pass never forms ``W``: it costs
    ``rank * (in + out)`` per input row. ``trainable_counts()`` counts every entry of
    ``u`` and ``v`` (the parametrisation has ``rank**2`` redundant directions, but all
    stored entries are trained).
    """

    rowwise = True  # acts on the last dim only: callable on a whole sequence
    linear = True  # affine: x W^T + b (with no bias, a zero input gives zero)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rank: int,
        bias: bool = True,
        generator: torch.Generator | None = None,
        dtype=None,
        device=None,
    ) -> None:
        super().__init__()
        in_features = _positive_int(in_features, "in_features")
        out_features = _positive_int(out_features, "out_features")
        rank = _positive_int(rank, "rank")
        if rank > min(in_features, out_features):
            raise MapError(
                f"rank {rank} exceeds min(in_features, out_features) = "
                f"{min(in_features, out_features)}"
            )
        kw = {"dtype": dtype, "device": device}
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.u = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.v = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """``v ~ U(+-1/sqrt(in))``, ``u ~ U(+-1/sqrt(rank))``, ``bias ~ U(+-1/sqrt(in))``."""
        if self.v.is_meta:  # torch.nn.utils.skip_init / device="meta": draw nothing
            return
        b_in = 1.0 / math.sqrt(self.in_features)
        b_r = 1.0 / math.sqrt(self.rank)
        _fill_(self.v, _uniform(self.v.shape, -b_in, b_in, generator))
        _fill_(self.u, _uniform(self.u.shape, -b_r, b_r, generator))
        if self.bias is not None:
            _fill_(self.bias, _uniform(self.bias.shape, -b_in, b_in, generator))

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.in_features, "LowRankLinear")
        _check_params(self, x, {"v": (self.rank, self.in_features),
                                "u": (self.out_features, self.rank), "bias": (self.out_features,)})
        return F.linear(F.linear(x, self.v), self.u, self.bias)

    def dense_weight(self) -> Tensor:
        """The ``(out, in)`` matrix ``u @ v`` (differentiable)."""
        return self.u @ self.v

    def trainable_counts(self) -> dict[str, int]:
        return _own_counts(self)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, bias={self.bias is not None}"
        )


class BlockDiagonalLinear(nn.Module):
    """``blocks`` equal diagonal blocks, each ``(out/blocks) x (in/blocks)``.

    Args:
        in_features, out_features: sizes, both divisible by ``blocks``.
        blocks: number of diagonal blocks ``k >= 1``.
        bias: add a bias of shape ``(out_features,)``.
        generator: the source of the default initialisation's randomness.
        dtype, device: of the parameters.

    Input chunk ``j`` (features ``j*in/k ... (j+1)*in/k - 1``) feeds only output chunk
    ``j`` through ``weight[j]``. Parameters ``weight`` ``(k, out/k, in/k)`` and optional
    ``bias``; ``trainable_counts()`` is ``{"weight": out*in/k}`` (plus ``"bias"``).
    """

    rowwise = True  # acts on the last dim only: callable on a whole sequence
    linear = True  # affine: x W^T + b (with no bias, a zero input gives zero)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        blocks: int,
        bias: bool = True,
        generator: torch.Generator | None = None,
        dtype=None,
        device=None,
    ) -> None:
        super().__init__()
        in_features = _positive_int(in_features, "in_features")
        out_features = _positive_int(out_features, "out_features")
        blocks = _positive_int(blocks, "blocks")
        if in_features % blocks or out_features % blocks:
            raise MapError(
                f"blocks={blocks} must divide both in_features={in_features} and "
                f"out_features={out_features}"
            )
        kw = {"dtype": dtype, "device": device}
        self.in_features = in_features
        self.out_features = out_features
        self.blocks = blocks
        self.weight = nn.Parameter(
            torch.empty(blocks, out_features // blocks, in_features // blocks, **kw)
        )
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """``weight ~ U(+-1/sqrt(in/k))``, then ``bias ~ U(+-1/sqrt(in/k))``."""
        if self.weight.is_meta:  # torch.nn.utils.skip_init / device="meta": draw nothing
            return
        bound = 1.0 / math.sqrt(self.in_features // self.blocks)
        _fill_(self.weight, _uniform(self.weight.shape, -bound, bound, generator))
        if self.bias is not None:
            _fill_(self.bias, _uniform(self.bias.shape, -bound, bound, generator))

    def forward(self, x: Tensor) -> Tensor:
        _check_input(x, self.in_features, "BlockDiagonalLinear")
        k = self.blocks
        _check_params(self, x, {"weight": (k, self.out_features // k, self.in_features // k),
                                "bias": (self.out_features,)})
        xb = x.unflatten(-1, (self.blocks, self.in_features // self.blocks))
        y = torch.einsum("...ki,koi->...ko", xb, self.weight).flatten(-2)
        return y + self.bias if self.bias is not None else y

    def dense_weight(self) -> Tensor:
        """The ``(out, in)`` block-diagonal matrix (differentiable)."""
        return torch.block_diag(*self.weight.unbind(0))

    def trainable_counts(self) -> dict[str, int]:
        return _own_counts(self)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"blocks={self.blocks}, bias={self.bias is not None}"
        )
