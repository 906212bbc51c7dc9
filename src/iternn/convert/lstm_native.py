"""The compiled LSTM cell update: build ``lstm_cell.c`` with the system C compiler, load it.

The inference path of the LSTM layer kernel (:mod:`iternn.convert.gated`, no autograd
graph, float32 on CPU) runs each time step as one GEMM (torch) and one call of this
kernel, which applies the four gate activations and the cell and output updates in one
pass (torch needs six element-wise ops for them). Its ``exp``/``tanh`` are polynomial
approximations within a few ulp, so the results agree with the torch ops to float
rounding, not bitwise (tested). On a CPU without AVX2/FMA, or when the build fails, the
torch ops are used.

Built on first use and cached as :mod:`iternn.core.native` describes (single-threaded,
so no OpenMP); ``ITERNN_NATIVE=0`` turns it off too. A failed build warns once;
:func:`status` says why.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
from torch import Tensor

from ..core.native import CSource, NativeLoader, open_library
from ..errors import MapError, MapTypeError, NativeBuildError

__all__ = ["SOURCE", "available", "build", "cell", "library", "status"]

SOURCE = Path(__file__).with_name("lstm_cell.c")
_ABI = 1  # iternn_lstm_cell_abi() of the source this module was written for
_SOURCE = CSource(SOURCE, "lstm_cell", (("-O3",), ("-O2",)))


def build(*, force: bool = False) -> Path:
    """Compile the kernel (unless cached, or ``force``) and return the library's path.
    Raises :class:`~iternn.NativeBuildError`."""
    return _SOURCE.build(force=force)[0]


class _Library:
    """The loaded shared library with its typed entry point ``step``."""

    def __init__(self, path: Path, flags: tuple[str, ...]) -> None:
        lib = open_library(path, "iternn_lstm_cell_abi", _ABI)
        self.supported = bool(lib.iternn_lstm_cell_supported())
        f = lib.iternn_lstm_cell_f32
        f.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64]
        f.restype = ctypes.c_int
        self.step = f
        self.path = path
        self.flags = flags
        self._handle = lib


_loader = NativeLoader(_SOURCE, _Library, "iternn: the native LSTM cell kernel is unavailable, "
                       "using torch ops instead (slower).",
                       unusable=lambda lib: None if lib.supported else "this CPU lacks AVX2/FMA")

#: The loaded kernel (built on first call) or None; whether they are in use and why not;
#: True when they are in use. Each outcome is remembered for the process.
library, status, available = _loader.library, _loader.status, _loader.available
_reset = _loader.reset  # forget the outcome (tests: to re-read the environment)


# ----------------------------------------------------------------------------- calls
def _describe(t: object) -> str:
    if not isinstance(t, Tensor):
        return type(t).__name__
    return f"{t.dtype} {tuple(t.shape)} on {t.device}" + ("" if t.is_contiguous() else ", strided")


def check_buffers(g: Tensor, c_prev: Tensor, c_out: Tensor, h_out: Tensor) -> int:
    """Validate the operands of :func:`cell` (or of a whole layer: ``g`` ``(..., 4, B, H)``
    with ``c_out``/``h_out`` ``(..., B, H)``); ``n = B * H``. Raises
    :class:`~iternn.MapTypeError` (not float32 CPU tensors) or :class:`~iternn.MapError`
    (shapes, layout, overlap)."""
    named = {"g": g, "c_prev": c_prev, "c_out": c_out, "h_out": h_out}
    for name, t in named.items():
        if not isinstance(t, Tensor) or t.dtype != torch.float32 or t.device.type != "cpu":
            raise MapTypeError(f"lstm cell: {name} must be a float32 CPU tensor, got {_describe(t)}")
        if not t.is_contiguous() or t.dim() < 1:
            raise MapError(f"lstm cell: {name} must be contiguous, got {_describe(t)}")
    n = c_prev.numel()
    lead = c_out.shape[:-2] if c_out.dim() > 2 else ()
    steps = max(1, c_out.numel() // max(n, 1))
    if (n == 0 or c_out.numel() != steps * n or h_out.numel() != steps * n
            or g.numel() != 4 * steps * n or tuple(h_out.shape) != tuple(c_out.shape)
            or (lead and (tuple(g.shape[:len(lead)]) != tuple(lead) or g.shape[len(lead)] != 4))):
        raise MapError(f"lstm cell: sizes do not match: g {tuple(g.shape)}, c_prev "
                       f"{tuple(c_prev.shape)}, c_out {tuple(c_out.shape)}, h_out {tuple(h_out.shape)}")
    spans = sorted((t.data_ptr(), t.data_ptr() + 4 * t.numel(), k) for k, t in named.items())
    for (_, a1, ka), (b0, _, kb) in zip(spans, spans[1:]):
        if b0 < a1:
            raise MapError(f"lstm cell: {ka} and {kb} overlap")
    return n


def cell(g: Tensor, c_prev: Tensor, c_out: Tensor, h_out: Tensor) -> None:
    """One LSTM step in place: ``g`` ``(4, B, H)`` holds the pre-activations of the gates
    i, f, o, g and receives their activations; ``c_out = f * c_prev + i * g``, ``h_out =
    o * tanh(c_out)``. Raises :class:`~iternn.NativeBuildError` when the kernel is
    unavailable, :class:`~iternn.MapTypeError`/:class:`~iternn.MapError` for bad operands."""
    lib = library()
    if lib is None:
        raise NativeBuildError(f"the native LSTM cell kernel is unavailable: {status().reason}")
    n = check_buffers(g, c_prev, c_out, h_out)
    if c_out.numel() != n:
        raise MapError(f"lstm cell: c_out must have {n} elements (one step), got {c_out.numel()}")
    if lib.step(g.data_ptr(), c_prev.data_ptr(), c_out.data_ptr(), h_out.data_ptr(), n) != 0:
        raise MapError("lstm cell: the kernel rejected its arguments")
