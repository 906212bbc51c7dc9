"""The compiled LSTM cell update: build ``lstm_cell.c`` with the system C compiler, load it.

The inference path of the LSTM layer kernel (:mod:`iternn.convert.gated`, no autograd
graph, float32 on CPU) runs each time step as one GEMM (torch) and one call of this
kernel, which adds the step's input drives to the GEMM's result, applies the four gate
activations and does the cell and output updates in one pass (torch needs an add and six
element-wise ops). It reads the drives where they are (any row and step strides, e.g.
column slices of one fused input projection) and writes every step's gates, cell and
output straight into the layer's trajectory buffers. Its ``exp``/``tanh`` are polynomial
approximations within a few ulp, so the results agree with the torch ops to float
rounding, not bitwise (tested). On a CPU without AVX2/FMA, or when the build fails, the
torch ops are used.

Built on first use and cached as :mod:`iternn.core.native` describes (single-threaded,
so no OpenMP); ``ITERNN_NATIVE=0`` turns it off too. A failed build warns once;
:func:`status` says why.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..core.native import CSource, NativeLoader, open_library
from ..errors import MapError, MapTypeError, NativeBuildError

__all__ = ["SOURCE", "LayerKernel", "available", "build", "library", "status"]

SOURCE = Path(__file__).with_name("lstm_cell.c")
_ABI = 2  # iternn_lstm_cell_abi() of the source this module was written for
_SOURCE = CSource(SOURCE, "lstm_cell", (("-O3",), ("-O2",)))


def build(*, force: bool = False) -> Path:
    """Compile the kernel (unless cached, or ``force``) and return the library's path.
    Raises :class:`~iternn.NativeBuildError`."""
    return _SOURCE.build(force=force)[0]


class _Layer(ctypes.Structure):
    """``iternn_lstm_layer`` of lstm_cell.c."""

    _fields_ = [("d", ctypes.c_void_p * 4), ("d_step", ctypes.c_int64 * 4),
                ("d_row", ctypes.c_int64 * 4), ("r", ctypes.c_void_p), ("c0", ctypes.c_void_p),
                ("a", ctypes.c_void_p), ("c", ctypes.c_void_p), ("h", ctypes.c_void_p),
                ("steps", ctypes.c_int64), ("rows", ctypes.c_int64), ("H", ctypes.c_int64)]


class _Library:
    """The loaded shared library with its typed entry point ``step``."""

    def __init__(self, path: Path, flags: tuple[str, ...]) -> None:
        lib = open_library(path, "iternn_lstm_cell_abi", _ABI)
        self.supported = bool(lib.iternn_lstm_cell_supported())
        f = lib.iternn_lstm_step_f32
        f.argtypes = [ctypes.POINTER(_Layer), ctypes.c_int64]
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


class LayerKernel:
    """The cell updates of one LSTM layer over a sequence, one step per call.

    Buffers (float32 CPU tensors; gate order i, f, o, g throughout):

    - ``drives``: four ``(T, B, H)`` tensors, each gate's input drive (any strides with
      unit stride along ``H``: views into a fused projection or a drive expanded over time
      work as they are);
    - ``r``: ``(4, B, H)`` contiguous, the recurrent part ``h_{t-1} W^T`` of each gate,
      written by the caller before each step;
    - ``c0``: ``(B, H)`` contiguous, the cell state before the first step;
    - ``a``: ``(T, 4, B, H)``, ``c``: ``(T, B, H)``, ``h``: ``(T, B, H)``, contiguous
      outputs (activated gates, cell states, ``o * tanh(c)``).

    ``step(t)`` does step ``t``: ``a[t] = act(drives[:, t] + r)``, ``c[t] = f * c[t-1] +
    i * g`` (``c0`` for ``t = 0``), ``h[t] = o * tanh(c[t])``. Everything is checked once
    here. Raises :class:`~iternn.NativeBuildError` when the kernel is unavailable,
    :class:`~iternn.MapTypeError`/:class:`~iternn.MapError` for bad operands (naming
    them).
    """

    def __init__(self, drives: Sequence[Tensor], r: Tensor, c0: Tensor, a: Tensor, c: Tensor,
                 h: Tensor) -> None:
        lib = library()
        if lib is None:
            raise NativeBuildError(f"the native LSTM cell kernel is unavailable: {status().reason}")
        if not isinstance(drives, (tuple, list)) or len(drives) != 4:
            raise MapTypeError(f"lstm cell: drives must be 4 tensors (i, f, o, g), got {_describe(drives)}")
        named = {**{f"drives[{k}]": d for k, d in enumerate(drives)},
                 "r": r, "c0": c0, "a": a, "c": c, "h": h}
        for name, t in named.items():
            if not isinstance(t, Tensor) or t.dtype != torch.float32 or t.device.type != "cpu":
                raise MapTypeError(f"lstm cell: {name} must be a float32 CPU tensor, got {_describe(t)}")
        if c.dim() != 3 or 0 in c.shape:
            raise MapError(f"lstm cell: c must be (T, B, H) with no empty dimension, got {tuple(c.shape)}")
        T, B, H = c.shape
        want = {"r": (4, B, H), "c0": (B, H), "a": (T, 4, B, H), "c": (T, B, H), "h": (T, B, H)}
        want.update({f"drives[{k}]": (T, B, H) for k in range(4)})
        for name, t in named.items():
            if tuple(t.shape) != want[name]:
                raise MapError(f"lstm cell: sizes do not match: {name} is {tuple(t.shape)}, "
                               f"expected {want[name]} (from c {tuple(c.shape)})")
        for name in ("r", "c0", "a", "c", "h"):
            if not named[name].is_contiguous():
                raise MapError(f"lstm cell: {name} must be contiguous, got {_describe(named[name])}")
        for k, d in enumerate(drives):
            if d.stride(2) != 1:
                raise MapError(f"lstm cell: drives[{k}] must have unit stride along H, got "
                               f"strides {d.stride()}")
        spans = sorted((t.data_ptr(), t.data_ptr() + 4 * t.numel(), k)
                       for k, t in named.items() if k in ("r", "c0", "a", "c", "h"))
        for (_, a1, ka), (b0, _, kb) in zip(spans, spans[1:]):
            if b0 < a1:
                raise MapError(f"lstm cell: {ka} and {kb} overlap")
        written = [(t.data_ptr(), t.data_ptr() + 4 * t.numel(), k) for k, t in named.items()
                   if k in ("r", "a", "c", "h")]
        for k, d in enumerate(drives):
            lo = d.data_ptr()
            hi = lo + 4 * (1 + sum((n - 1) * st for n, st in zip(d.shape, d.stride())))
            for w0, w1, kw in written:
                if lo < w1 and w0 < hi:
                    raise MapError(f"lstm cell: drives[{k}] and {kw} overlap")
        self._layer = _Layer(
            (ctypes.c_void_p * 4)(*(d.data_ptr() for d in drives)),
            (ctypes.c_int64 * 4)(*(d.stride(0) for d in drives)),
            (ctypes.c_int64 * 4)(*(d.stride(1) for d in drives)),
            r.data_ptr(), c0.data_ptr(), a.data_ptr(), c.data_ptr(), h.data_ptr(), T, B, H)
        self._ref = ctypes.byref(self._layer)
        self._step = lib.step
        self._keep = tuple(named.values())  # the buffers outlive the kernel's pointers
        self.steps = T

    def step(self, t: int) -> None:
        """Step ``t`` (``0 <= t < T``); raises :class:`~iternn.MapError` otherwise."""
        if self._step(self._ref, t) != 0:
            raise MapError(f"lstm cell: step {t} is out of range [0, {self.steps})")
