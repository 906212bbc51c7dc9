"""LSTMs and GRUs as forced block maps: ``from_lstm``, ``from_gru``, :class:`LSTMMap`, :class:`GRUMap`.

A gated layer is a short chain of stages inside one time step. Every stage is a slot and
every product of gates is a block that reads several slots (paper notes §7). With row =
destination slot and column = source slot, layer ``l`` of an ``L``-layer ``nn.LSTM``
reads the slot ``u`` below it (``x`` for the first layer, ``h(l-1)`` for the others, or
the dropout slot ``d(l)`` when the stack has inter-layer dropout) and has the slots
``i, f, g, o, c, h`` (suffixed with ``l``)::

              u        h                           act
    i   [  W_ii     W_hi  ]                        sigmoid
    f   [  W_if     W_hf  ]                        sigmoid
    g   [  W_ig     W_hg  ]                        tanh
    o   [  W_io     W_ho  ]                        sigmoid
    c  <-  F[c, (f, c, i, g)] = f * c + i * g      (CellUpdate: four columns, one block)
    h  <-  F[h, (o, c)]       = o * tanh(c)        (OutputGate)

``F[i, u] = W_ii`` is the ``nn.Linear`` holding rows ``0:H`` of torch's
``weight_ih_l{l-1}`` and ``bias_ih_l{l-1}``; ``F[i, h] = W_hi`` holds rows ``0:H`` of
``weight_hh``/``bias_hh``; ``f, g, o`` hold rows ``H:2H``, ``2H:3H``, ``3H:4H`` (torch's
gate order). With ``proj_size = P > 0`` the layer has one more slot, ``m`` (Sak et
al.'s cell output, size ``H``): ``m <- (o, c)`` is the :class:`OutputGate` and ``h`` (size
``P``) is ``F[h, m] = W_hr``, a bias-free ``nn.Linear`` holding ``weight_hr``; the gates
then read the ``P``-sized ``h``. A layer of an ``nn.GRU`` has the slots ``r, z, n, h``::

              u        h                           act
    r   [  W_ir     W_hr  ]                        sigmoid
    z   [  W_iz     W_hz  ]                        sigmoid
    n   [  W_in      .    ] + F[n, (r, h)] = r * (W_hn h + b_hn)    tanh  (ResetLinear)
    h  <-  F[h, (z, n, h)] = (1 - z) * n + z * h   (GatedMix)

``b_hn`` stays inside the reset product, as in torch. There are no slot biases: each
torch bias lives in the block that multiplies with it, and every torch parameter is
the row-wise concatenation of block parameters (:meth:`LSTMMap.parameter_parts`), so
gradients and element-wise optimizers (SGD, Adam) agree with torch's exactly.

**Update order.** One time step is a chain (gates, then ``c``, then ``h``), so the
maps iterate with ``update="ordered"``: a Gauss-Seidel sweep over the strongly connected
components in dependency order and, inside a layer's cycle, slot by slot in slot order,
each stage reading the newest value of the stages before it; ``c`` reads its own
previous value and the gates read the previous ``h``. One application is then exactly
one time step of every layer. (The Jacobi map pipelines the stages with a lag of one
application per stage, like the layers of a Jacobi multi-layer RNN.)

**Dropout** between layers (``dropout=p``, ``num_layers > 1``) is the slot ``d(l)``
(the dropped-out input of layer ``l``, ``l >= 2``) with the block ``F[d(l), h(l-1)] =
nn.Dropout(p)``: the four (or three) gate blocks of layer ``l`` read one mask, drawn
over the whole trajectory of ``h(l-1)`` in one call, as torch does; on CPU the maps draw
the same masks from the same RNG stream as ``nn.LSTM``/``nn.GRU``.

**Speed.** The input projections (``u -> gates``) are plain ``nn.Linear`` blocks fed from
outside the layer's cycle that read one sequence, so the sequence plan evaluates them
for all time steps as one GEMM (the gates' weights stacked). The cycle itself is
recognised by the component kernel registered here
(:func:`iternn.engine.plan.register_component_kernel`): when a layer's component has
exactly the structure above (block types, sources, activations, no hooks, no
``block_kwargs``), it runs as one loop with one batched GEMM for the four (three)
recurrent blocks per step and in-place gate arithmetic, and as one autograd node whose
backward is the hand-written backpropagation through time (differentiable, so double
backward works). Without autograd (``torch.no_grad``, or nothing requires grad), a
float32 CPU layer adds the drives and applies the gate activations and the cell and
output updates of a step in one call of a small compiled kernel (:mod:`iternn.convert.lstm_native`; its
``exp``/``tanh`` agree with torch's to float rounding, not bitwise; ``ITERNN_NATIVE=0``
or a failed build falls back to the torch ops). Anything else (an edited block, a hook, ``block_kwargs``,
``torch.func`` transforms, forward-mode AD) runs through the engine's generic
Gauss-Seidel step loop, which computes the same values; the Jacobi update is never a
kernel's case.

``bidirectional=True`` is refused (:class:`~iternn.ConversionError`): the backward
direction of layer ``l`` needs the whole forward pass of layer ``l - 1`` first, which is
not one forced sweep of a map. ``PackedSequence`` inputs are refused as for ``RNNMap``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import forward_ad

from ..core.block_map import BlockMap
from ..engine.iterate import iterate
from ..engine.plan import register_component_kernel
from ..errors import ConversionError, MapError, MapTypeError
from . import lstm_native
from .rnn import check_sequence

__all__ = [
    "CellUpdate",
    "OutputGate",
    "ResetLinear",
    "GatedMix",
    "LSTMMap",
    "GRUMap",
    "from_lstm",
    "from_gru",
]

#: torch's gate order in the rows of ``weight_ih``/``weight_hh``.
LSTM_GATES = ("i", "f", "g", "o")
GRU_GATES = ("r", "z", "n")


# --------------------------------------------------------------------------- blocks
class CellUpdate(nn.Module):
    """The LSTM cell update ``F[c, (f, c, i, g)](f, c, i, g) = f * c + i * g``.

    A block reading four slots (forget gate, previous cell, input gate, candidate);
    element-wise, no parameters.
    """

    rowwise = True  # element-wise: any leading dims are batch

    def forward(self, f: Tensor, c: Tensor, i: Tensor, g: Tensor) -> Tensor:
        return torch.addcmul(f * c, i, g)


class OutputGate(nn.Module):
    """The LSTM output ``F[h, (o, c)](o, c) = o * tanh(c)``; element-wise, no parameters."""

    rowwise = True

    def forward(self, o: Tensor, c: Tensor) -> Tensor:
        return o * torch.tanh(c)


class ResetLinear(nn.Module):
    """The GRU reset product ``F[n, (r, h)](r, h) = r * (W h + b)``.

    ``W`` (``weight``, ``(out_features, in_features)``) and ``b`` (``bias``) are torch's
    ``W_hn`` and ``b_hn``: the reset gate multiplies the whole recurrent term, bias
    included. Uninitialised on construction (the converters fill it).
    """

    rowwise = True

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, *, device=None, dtype=None
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise MapTypeError(f"ResetLinear {name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise MapError(f"ResetLinear {name} must be >= 1, got {value}")
        self.in_features = in_features
        self.out_features = out_features
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None

    def forward(self, r: Tensor, h: Tensor) -> Tensor:
        return r * F.linear(h, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


class GatedMix(nn.Module):
    """The GRU state update ``F[h, (z, n, h)](z, n, h) = (1 - z) * n + z * h``.

    Computed as ``torch.lerp(n, h, z)``; element-wise, no parameters.
    """

    rowwise = True

    def forward(self, z: Tensor, n: Tensor, h: Tensor) -> Tensor:
        return torch.lerp(n, h, z)


# --------------------------------------------------------------------------- kernels
# Whole-layer kernels for the sequence plan. Step-major, gate-major buffers: the LSTM's
# activated gates are kept as (T, 4, B, H) in the order i, f, o, g (three sigmoids side
# by side, then the tanh), the GRU's as (T, 3, B, H) in the order r, z, hn (hn = W_hn h
# + b_hn, before the reset product), so every element-wise op of a step works on one
# contiguous block and the recurrent blocks of a step are one batched GEMM into it.
# (Measured on the 2-core machine: faster than gate-outermost (4, T, B, H) buffers and
# than (T, B, 4H) rows, whose per-gate slices are strided.)


def _lstm_loop(G: Tensor, C: Tensor, TC: Tensor | None, M: Tensor | None, Hs: Tensor,
               h0: Tensor, c0: Tensor, wb: Tensor, wrt: Tensor | None) -> None:
    """The LSTM recurrence in place, without autograd: ``G`` holds the drives on entry
    and the activated gates on exit; ``C``, ``TC = tanh(C)`` (if given), ``M``
    (projection only) and ``Hs`` are filled step by step. ``wb``: ``(4, P, H)``,
    ``wrt``: ``(H, P)``."""
    T, _, B, _ = G.shape
    P = Hs.shape[-1]
    steps, sig, cand = G.unbind(0), G[:, :3].unbind(0), G[:, 3].unbind(0)
    ig, fg, og = G[:, 0].unbind(0), G[:, 1].unbind(0), G[:, 2].unbind(0)
    cs, hs = C.unbind(0), Hs.unbind(0)
    ms = M.unbind(0) if M is not None else hs
    tcs = TC.unbind(0) if TC is not None else ms
    h_wide = Hs.unsqueeze(1).expand(T, 4, B, P).unbind(0)
    hx, c = h0.unsqueeze(0).expand(4, B, P), c0
    for t in range(T):
        steps[t].baddbmm_(hx, wb)
        sig[t].sigmoid_()
        cand[t].tanh_()
        c = torch.mul(fg[t], c, out=cs[t]).addcmul_(ig[t], cand[t])
        torch.mul(og[t], torch.tanh(c, out=tcs[t]), out=ms[t])
        if wrt is not None:
            torch.mm(ms[t], wrt, out=hs[t])
        hx = h_wide[t]


def _lstm_forward(drives: Sequence[Tensor], W: Tensor, h0: Tensor, c0: Tensor,
                  Wr: Tensor | None, keep_tanh: bool = True) -> tuple[Tensor, ...]:
    """``(G, C, TC, M, Hs)`` for drives ``(T, B, H)`` in the order i, f, o, g and the
    recurrent weight ``W`` (``(4H, P)``, rows in the same order); ``TC`` is ``None``
    unless ``keep_tanh``."""
    G = torch.stack(tuple(drives), 1)
    T, _, B, H = G.shape
    P = h0.shape[-1]
    C = G.new_empty(T, B, H)
    TC = torch.empty_like(C) if keep_tanh else None
    M = torch.empty_like(C) if Wr is not None else None
    Hs = G.new_empty(T, B, P)
    _lstm_loop(G, C, TC, M, Hs, h0, c0, W.view(4, H, P).transpose(1, 2),
               None if Wr is None else Wr.t())
    return G, C, TC, M, Hs


def _lstm_infer(drives: Sequence[Tensor], W: Tensor, h0: Tensor, c0: Tensor,
                Wr: Tensor | None) -> tuple[Tensor, ...]:
    """``_lstm_forward(..., keep_tanh=False)`` without autograd, through the native cell
    kernel where it applies (float32 on CPU, the kernel built): equal to float rounding.
    Each step is one batched GEMM into a small scratch buffer and one kernel call that
    reads the drives where they are and writes the step's gates, cell and output."""
    f32 = all(t.dtype == torch.float32 and t.device.type == "cpu"
              for t in (W, h0, c0, *drives, *(() if Wr is None else (Wr,))))
    lib = lstm_native.library() if f32 else None
    if lib is None or h0.numel() == 0 or c0.numel() == 0:
        return _lstm_forward(drives, W, h0, c0, Wr, keep_tanh=False)
    T, B, H = drives[0].shape
    P = h0.shape[-1]
    drives = [d if d.stride(2) == 1 else d.contiguous() for d in drives]
    G = h0.new_empty(T, 4, B, H)
    C = h0.new_empty(T, B, H)
    M = torch.empty_like(C) if Wr is not None else None
    Hs = h0.new_empty(T, B, P)
    R = h0.new_empty(4, B, H)
    kernel = lstm_native.LayerKernel(drives, R, c0.contiguous(), G, C, M if M is not None else Hs)
    wb = W.view(4, H, P).transpose(1, 2)
    wrt = None if Wr is None else Wr.t()
    hs = Hs.unbind(0)
    ms = M.unbind(0) if M is not None else hs
    h_wide = Hs.unsqueeze(1).expand(T, 4, B, P).unbind(0)
    hx = h0.unsqueeze(0).expand(4, B, P)
    for t in range(T):
        torch.bmm(hx, wb, out=R)
        kernel.step(t)
        if wrt is not None:
            torch.mm(ms[t], wrt, out=hs[t])
        hx = h_wide[t]
    return G, C, None, M, Hs


def _lstm_backward_fast(G, C, TC, M, Hs, h0, c0, W, Wr, gG, gC, gTC, gM, gH, need_w):
    """Backpropagation through time for :class:`_LSTMSequence` into preallocated
    buffers (no autograd graph; first-order backward only). Same formulas as the
    differentiable path of ``_LSTMSequence.backward``."""
    T, _, B, H = G.shape
    P = Hs.shape[-1]
    i, f, o, g = G.unbind(1)
    acts = [torch.addcmul(x, x, x, value=-1) for x in (i, f, o)]  # sigmoid' = s - s^2
    acts.append(torch.mul(g, g).neg_().add_(1))  # tanh' = 1 - g^2
    K = G.new_empty(T, B, 4, H)  # d pre / d c (i, f, g) or d pre / d m (o), gate order
    torch.mul(g, acts[0], out=K[:, :, 0])
    torch.mul(C[:-1], acts[1][1:], out=K[1:, :, 1])
    torch.mul(c0, acts[1][0], out=K[0, :, 1])
    torch.mul(TC, acts[2], out=K[:, :, 2])
    torch.mul(i, acts[3], out=K[:, :, 3])
    E = None
    if gG is not None:
        E = torch.stack([gG[:, k] * acts[k] for k in range(4)], 2)
    dtanh = torch.mul(TC, TC).neg_().add_(1)
    d_pre = G.new_empty(T, B, 4, H)
    # total d loss / d h_t, completed step by step (contiguous: gH may be a transposed view)
    d_h = G.new_zeros(T, B, P) if gH is None else gH.clone(memory_format=torch.contiguous_format)
    dc = c0.new_zeros(c0.shape)
    tmp = torch.empty_like(dc)
    dm = torch.empty_like(dc) if Wr is not None else None
    ks, k_o, pre, pre_o = K.unbind(0), K[:, :, 2].unbind(0), d_pre.unbind(0), d_pre[:, :, 2].unbind(0)
    os_, fs, dts, dhs = o.unbind(0), f.unbind(0), dtanh.unbind(0), d_h.unbind(0)
    wide = d_pre.view(T, B, 4 * H).unbind(0)
    dh0 = None
    for t in range(T - 1, -1, -1):
        if Wr is not None:
            torch.mm(dhs[t], Wr, out=dm)
            m_t = dm if gM is None else dm.add_(gM[t])
        else:
            m_t = dhs[t]
        torch.mul(m_t, os_[t], out=tmp)
        if gTC is not None:
            tmp.add_(gTC[t])
        if gC is not None:
            dc.add_(gC[t])
        dc.addcmul_(tmp, dts[t])
        torch.mul(ks[t], dc.unsqueeze(1), out=pre[t])
        torch.mul(k_o[t], m_t, out=pre_o[t])
        if E is not None:
            pre[t].add_(E[t])
        dc.mul_(fs[t])
        if t > 0:
            dhs[t - 1].addmm_(wide[t], W)
        else:
            dh0 = wide[0] @ W
    d_pre = d_pre.view(T, B, 4 * H)
    dW = dWr = None
    if need_w[0]:
        h_prev = torch.cat([h0.unsqueeze(0), Hs[:-1]])
        dW = d_pre.view(T * B, 4 * H).t() @ h_prev.view(T * B, P)
    if Wr is not None and need_w[1]:
        dWr = d_h.view(T * B, P).t() @ M.view(T * B, H)
    return (*d_pre.split(H, -1), dW, dh0, dc, dWr)


class _LSTMSequence(torch.autograd.Function):
    """A whole LSTM layer over a sequence: ``(Di, Df, Do, Dg, W, h0, c0, Wr) ->
    (G, C, TC, [M,] H)``; backward is backpropagation through time: into preallocated
    buffers for a first-order backward, and with differentiable ops on the saved
    inputs and outputs under ``create_graph`` (so double backward works)."""

    @staticmethod
    def forward(ctx, di, df, do, dg, W, h0, c0, Wr):
        G, C, TC, M, Hs = _lstm_forward((di, df, do, dg), W, h0, c0, Wr)
        ctx.set_materialize_grads(False)
        ctx.proj = Wr is not None
        ctx.save_for_backward(G, C, TC, M, Hs, h0, c0, W, Wr)
        return (G, C, TC, Hs) if M is None else (G, C, TC, M, Hs)

    @staticmethod
    def backward(ctx, *grads):
        G, C, TC, M, Hs, h0, c0, W, Wr = ctx.saved_tensors
        if ctx.proj:
            gG, gC, gTC, gM, gH = grads
        else:
            (gG, gC, gTC, gH), gM = grads, None
        if not torch.is_grad_enabled():  # no create_graph: the buffer version
            return _lstm_backward_fast(G, C, TC, M, Hs, h0, c0, W, Wr, gG, gC, gTC, gM, gH,
                                       (ctx.needs_input_grad[4], ctx.needs_input_grad[7]))
        T, _, B, H = G.shape
        h_prev = torch.cat([h0.unsqueeze(0), Hs[:-1]])
        c_prev = torch.cat([c0.unsqueeze(0), C[:-1]])
        i, f, o, g = G.unbind(1)
        # d gate / d pre-activation, per gate (T, B, H)
        acts = [torch.addcmul(x, x, x, value=-1) for x in (i, f, o)] + [1 - g * g]
        # what multiplies dc (for i, f, g) or dm (for o) in d loss / d pre-activation,
        # side by side as (T, B, 4H) in the kernel's gate order
        K = torch.stack([g * acts[0], c_prev * acts[1], TC * acts[2], i * acts[3]], 2)
        K = K.view(T, B, 4 * H)
        E = None
        if gG is not None:
            E = torch.stack([gG[:, k] * acts[k] for k in range(4)], 2).view(T, B, 4 * H)
        dtanh = 1 - TC * TC
        zeros = torch.zeros_like(c0)
        dh, dc = (gH[T - 1] if gH is not None else None), None
        dpre_steps: list[Tensor] = [zeros] * T
        dh_steps: list[Tensor | None] = [None] * T
        for t in range(T - 1, -1, -1):
            dm = dh
            if ctx.proj:
                dh_steps[t] = dh
                dm = dh @ Wr if dh is not None else None
                if gM is not None:
                    dm = gM[t] if dm is None else dm + gM[t]
            dtc = dm * o[t] if dm is not None else None
            if gTC is not None:
                dtc = gTC[t] if dtc is None else dtc + gTC[t]
            if gC is not None:
                dc = gC[t] if dc is None else dc + gC[t]
            if dtc is not None:
                dc = dtc * dtanh[t] if dc is None else torch.addcmul(dc, dtc, dtanh[t])
            dc = zeros if dc is None else dc
            dm = zeros if dm is None else dm
            dpre = torch.cat([dc, dc, dm, dc], -1) * K[t]
            if E is not None:
                dpre = dpre + E[t]
            dpre_steps[t] = dpre
            dc = dc * f[t]
            if t > 0 and gH is not None:
                dh = torch.addmm(gH[t - 1], dpre, W)
            else:
                dh = dpre @ W
        d_pre = torch.stack(dpre_steps)
        dW = d_pre.flatten(0, -2).t() @ h_prev.flatten(0, -2) if ctx.needs_input_grad[4] else None
        dWr = None
        if ctx.proj and ctx.needs_input_grad[7]:
            d_h = torch.stack([zeros.new_zeros(h0.shape) if x is None else x for x in dh_steps])
            dWr = d_h.flatten(0, -2).t() @ M.flatten(0, -2)
        di, df, do, dg = d_pre.split(H, -1)
        return di, df, do, dg, dW, dh, dc, dWr


def _gru_loop(A: Tensor, N: Tensor, Hs: Tensor, h0: Tensor, wb: Tensor, Dn: Tensor) -> None:
    """The GRU recurrence in place, without autograd: ``A`` (``(T, 3, B, H)``) holds
    the r, z drives and ``b_hn`` on entry, activated r, z and ``hn = W_hn h + b_hn`` on
    exit."""
    T, _, B, H = A.shape
    steps, rz = A.unbind(0), A[:, :2].unbind(0)
    rg, zg, hn = A[:, 0].unbind(0), A[:, 1].unbind(0), A[:, 2].unbind(0)
    ns, hs, dn = N.unbind(0), Hs.unbind(0), Dn.unbind(0)
    h_wide = Hs.unsqueeze(1).expand(T, 3, B, H).unbind(0)
    h, hx = h0, h0.unsqueeze(0).expand(3, B, H)
    for t in range(T):
        steps[t].baddbmm_(hx, wb)
        rz[t].sigmoid_()
        n = torch.addcmul(dn[t], rg[t], hn[t], out=ns[t]).tanh_()
        h = torch.lerp(n, h, zg[t], out=hs[t])
        hx = h_wide[t]


def _gru_forward(dr: Tensor, dz: Tensor, dn: Tensor, W: Tensor, bn: Tensor | None,
                 h0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(A, N, Hs)`` for drives ``(T, B, H)`` and ``W = [W_hr; W_hz; W_hn]``."""
    T, B, H = dn.shape
    third = (bn if bn is not None else dn.new_zeros(())).expand(T, B, H)
    A = torch.stack((dr, dz, third), 1)
    N = torch.empty_like(dn)
    Hs = torch.empty_like(N)
    _gru_loop(A, N, Hs, h0, W.view(3, H, H).transpose(1, 2), dn)
    return A, N, Hs


class _GRUSequence(torch.autograd.Function):
    """A whole GRU layer over a sequence: ``(Dr, Dz, Dn, W, b_hn, h0) -> (A, N, H)``."""

    @staticmethod
    def forward(ctx, dr, dz, dn, W, bn, h0):
        A, N, Hs = _gru_forward(dr, dz, dn, W, bn, h0)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(A, N, Hs, h0, W)
        return A, N, Hs

    @staticmethod
    def backward(ctx, gA, gN, gH):
        A, N, Hs, h0, W = ctx.saved_tensors
        T, _, B, H = A.shape
        h_prev = torch.cat([h0.unsqueeze(0), Hs[:-1]])
        r, z, hn = A.unbind(1)
        dtanh = 1 - N * N
        dsig_r, dsig_z = torch.addcmul(r, r, r, value=-1), torch.addcmul(z, z, z, value=-1)
        k_n = (1 - z) * dtanh  # d h_t / d pre_n, times d h_t
        # [d pre_r, d pre_z, d hn] = [d pre_n, d h_t, d pre_n] * K, side by side (T, B, 3H)
        K = torch.stack([hn * dsig_r, (h_prev - N) * dsig_z, r], 2).view(T, B, 3 * H)
        e_n = None if gN is None else gN * dtanh
        E = None
        if gA is not None:
            g_r, g_z, g_hn = gA.unbind(1)
            E = torch.stack([g_r * dsig_r, g_z * dsig_z, g_hn], 2)
            E = E.view(T, B, 3 * H)
        dh = gH[T - 1] if gH is not None else torch.zeros_like(h0)
        da_steps: list[Tensor] = [dh] * T
        dn_steps: list[Tensor] = [dh] * T
        for t in range(T - 1, -1, -1):
            dpn = dh * k_n[t]
            if e_n is not None:
                dpn = dpn + e_n[t]
            da = torch.cat([dpn, dh, dpn], -1) * K[t]
            if E is not None:
                da = da + E[t]
            da_steps[t], dn_steps[t] = da, dpn
            keep = dh * z[t]
            if t > 0 and gH is not None:
                keep = keep + gH[t - 1]
            dh = torch.addmm(keep, da, W)
        d_a = torch.stack(da_steps)
        dW = d_a.flatten(0, -2).t() @ h_prev.flatten(0, -2) if ctx.needs_input_grad[3] else None
        dr, dz, d_hn = d_a.chunk(3, -1)
        dbn = d_hn.sum((0, 1)) if ctx.needs_input_grad[4] else None
        return dr, dz, torch.stack(dn_steps), dW, dbn, dh


def _only(comp, k: int):
    """The one internal term of destination ``k``, or ``None`` (none, or several)."""
    terms = comp.internal[k]
    return terms[0] if len(terms) == 1 else None


def _hookless(module: nn.Module | None) -> bool:
    return module is not None and not (module._forward_hooks or module._forward_pre_hooks)


def _activation_is(dest, cls: type | None) -> bool:
    act = dest.act
    return act is None if cls is None else type(act) is cls and _hookless(act)


def _recurrent_weight(term, src: str) -> Tensor | None:
    """The weight of a plain-linear term reading ``src`` whose bias (if any) is in the
    drive, or ``None``."""
    if term is None or not term.linear or term.srcs != (src,) or not _hookless(term.module):
        return None
    weight = term.module._parameters.get("weight")
    if weight is None or (term.module.bias is not None and not term.skip_bias):
        return None
    return weight


def _block_is(term, cls: type, srcs: tuple[str, ...]) -> nn.Module | None:
    if term is None or type(term.module) is not cls or term.srcs != srcs:
        return None
    return term.module if _hookless(term.module) else None


def _traced(tensors: Sequence[Tensor]) -> bool:
    """Whether a transform the kernels do not implement sees these tensors: torch.func
    (functorch wrappers), forward-mode AD (dual tensors) or a ``__torch_function__``
    subclass. The generic loop handles those."""
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    if any(wrapped(t) for t in tensors) or torch.overrides.has_torch_function(tuple(tensors)):
        return True
    return any(forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def _as_sequence(drive: Tensor | None, steps: int, batch: tuple, n: int, like: Tensor) -> Tensor:
    """A destination's drive as ``(T, B, n)`` (a view where it can be)."""
    rows = math.prod(batch)
    if drive is None:
        return like.new_zeros(()).expand(steps, rows, n)
    if drive.dim() == len(batch) + 2:
        return drive.reshape(steps, rows, n)
    return drive.expand(*batch, n).reshape(rows, n).expand(steps, rows, n)


def _needs_graph(tensors: Sequence[Tensor | None]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _lstm_component(comp, drives, init, batch, steps):
    ds = comp.dests
    proj = len(ds) == 7
    i, f, g, o, c = (d.slot for d in ds[:5])
    h = ds[-1].slot
    H = ds[0].shape[0]
    if any(d.shape != (H,) for d in ds[:-1]) or len(ds[-1].shape) != 1:
        return None  # one size H for the gates, c and m (element-wise blocks broadcast)
    for d, cls in zip(ds[:4], (nn.Sigmoid, nn.Sigmoid, nn.Tanh, nn.Sigmoid)):
        if not _activation_is(d, cls):
            return None
    weights = [_recurrent_weight(_only(comp, k), h) for k in range(4)]
    if any(w is None for w in weights):
        return None
    tail = ds[4:]
    if any(not _activation_is(d, None) for d in tail) or any(x is not None for x in drives[4:]):
        return None
    if _block_is(_only(comp, 4), CellUpdate, (f, c, i, g)) is None:
        return None
    out_slot = ds[5].slot
    if _block_is(_only(comp, 5), OutputGate, (o, c)) is None:
        return None
    wr = None
    if proj:
        wr = _recurrent_weight(_only(comp, 6), out_slot)
        if wr is None or _only(comp, 6).module.bias is not None:
            return None
    P = ds[-1].shape[0]
    rows = math.prod(batch)
    h0, c0 = init[h], init[c]
    ref = h0
    d_i, d_f, d_g, d_o = (_as_sequence(x, steps, batch, H, ref) for x in drives[:4])
    inputs = [d_i, d_f, d_o, d_g, *weights, h0, c0] + ([wr] if proj else [])
    if _traced(inputs):
        return None
    h0, c0 = h0.reshape(rows, P), c0.reshape(rows, H)
    w_i, w_f, w_g, w_o = weights
    if _needs_graph(inputs):
        W = torch.cat([w_i, w_f, w_o, w_g])
        outs = _LSTMSequence.apply(d_i, d_f, d_o, d_g, W, h0, c0, wr)
        G, C, _, *rest = outs
        M, Hs = rest if proj else (None, rest[0])
    else:
        with torch.no_grad():
            W = torch.cat([w_i, w_f, w_o, w_g])
            G, C, _, M, Hs = _lstm_infer((d_i, d_f, d_o, d_g), W, h0, c0, wr)
    out = {i: G[:, 0], f: G[:, 1], g: G[:, 3], o: G[:, 2], c: C, h: Hs}
    if proj:
        out[out_slot] = M
    return {s: v.reshape(steps, *batch, v.shape[-1]) for s, v in out.items()}


def _gru_component(comp, drives, init, batch, steps):
    ds = comp.dests
    r, z, n, h = (d.slot for d in ds)
    H = ds[0].shape[0]
    if any(d.shape != (H,) for d in ds):
        return None
    for d, cls in zip(ds, (nn.Sigmoid, nn.Sigmoid, nn.Tanh, None)):
        if not _activation_is(d, cls):
            return None
    w_r, w_z = (_recurrent_weight(_only(comp, k), h) for k in range(2))
    reset = _block_is(_only(comp, 2), ResetLinear, (r, h))
    if w_r is None or w_z is None or reset is None or drives[3] is not None:
        return None
    if _block_is(_only(comp, 3), GatedMix, (z, n, h)) is None:
        return None
    rows = math.prod(batch)
    h0 = init[h]
    d_r, d_z, d_n = (_as_sequence(x, steps, batch, H, h0) for x in drives[:3])
    bn = reset.bias
    inputs = [d_r, d_z, d_n, w_r, w_z, reset.weight, h0] + ([bn] if bn is not None else [])
    if _traced(inputs):
        return None
    h0 = h0.reshape(rows, H)
    if _needs_graph(inputs):
        W = torch.cat([w_r, w_z, reset.weight])
        A, N, Hs = _GRUSequence.apply(d_r, d_z, d_n, W, bn, h0)
    else:
        with torch.no_grad():
            W = torch.cat([w_r, w_z, reset.weight])
            A, N, Hs = _gru_forward(d_r, d_z, d_n, W, bn, h0)
    out = {r: A[:, 0], z: A[:, 1], n: N, h: Hs}
    return {s: v.reshape(steps, *batch, H) for s, v in out.items()}


def gated_component_kernel(comp, drives, init, batch, steps, kwargs):
    """The sequence-plan kernel for LSTM and GRU layers (see the module docstring).

    Registered with :func:`iternn.engine.plan.register_component_kernel` on import;
    returns ``None`` for any component that is not exactly an LSTM layer (slots ``i, f,
    g, o, c, [m,] h`` in that order) or a GRU layer (``r, z, n, h``) built of the blocks
    of this module.
    """
    if comp.outside or len(comp.dests) not in (4, 6, 7):
        return None
    if kwargs and any(t.key in kwargs for terms in comp.internal for t in terms):
        return None
    if len(comp.dests) == 4:
        return _gru_component(comp, drives, init, batch, steps)
    return _lstm_component(comp, drives, init, batch, steps)


register_component_kernel(gated_component_kernel)


# --------------------------------------------------------------------------- checks
def check_gated_config(
    input_size: int, hidden_size: int, num_layers: int, dropout: float, proj_size: int = 0
) -> None:
    """``nn.LSTM``/``nn.GRU``'s argument checks as :class:`~iternn.MapError` (a bad
    value) and :class:`~iternn.MapTypeError` (a bad type), naming the argument."""
    for name, value, low in (("input_size", input_size, 1), ("hidden_size", hidden_size, 1),
                             ("num_layers", num_layers, 1), ("proj_size", proj_size, 0)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise MapTypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < low:
            raise MapError(f"{name} must be >= {low}, got {value}")
    if proj_size >= hidden_size:
        raise MapError(f"proj_size must be smaller than hidden_size, got {proj_size} >= {hidden_size}")
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout <= 1:
        raise MapError(f"dropout must be a number in [0, 1], got {dropout!r}")


def source_config(net: nn.Module, cls: type) -> dict:
    """Validate an ``nn.LSTM``/``nn.GRU`` (``cls``) for conversion; its options as kwargs.

    Raises:
        MapTypeError: (a ``TypeError``) ``net`` is not a ``cls``, or a subclass that
            overrides ``forward``.
        ConversionError: (a ``ValueError``) ``bidirectional=True``, or an option this
            converter does not know (the message names it).
    """
    if not isinstance(net, cls):
        raise MapTypeError(f"expected an nn.{cls.__name__}, got {type(net).__name__}")
    if type(net).forward is not cls.forward:
        raise MapTypeError(
            f"{type(net).__name__} overrides nn.{cls.__name__}.forward; only the plain "
            f"nn.{cls.__name__} computation can be converted"
        )
    if net.bidirectional:
        raise ConversionError(
            "bidirectional=True is not supported: the backward direction of each layer "
            "needs the whole output of the layer below, which one forward sweep of a map "
            "does not have"
        )
    proj = int(getattr(net, "proj_size", 0))
    if proj and cls is not nn.LSTM:
        raise ConversionError(f"proj_size={proj} is not supported for nn.{cls.__name__}")
    cfg = dict(
        input_size=int(net.input_size), hidden_size=int(net.hidden_size),
        num_layers=int(net.num_layers), bias=bool(net.bias),
        batch_first=bool(net.batch_first), dropout=float(net.dropout),
    )
    if cls is nn.LSTM:
        cfg["proj_size"] = proj
    return cfg


def check_initial(
    value: object, name: str, *, seq: Tensor, batched: bool, size: int, slots: Sequence[str]
) -> list[Tensor]:
    """Validate an initial state (``(L, B, n)``, unbatched ``(L, n)``) and split it per
    layer slot; ``slots[l]`` receives ``value[l]``. Errors name ``name`` and the slots."""
    rows = ", ".join(f"{name}[{k}] -> slot {s!r}" for k, s in enumerate(slots))
    what = f"{name} (initial values: {rows})"
    if not isinstance(value, Tensor):
        raise MapTypeError(f"{what} must be a tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise MapTypeError(f"{what} must be floating point, got {value.dtype}")
    expected = (len(slots), *seq.shape[1:-1], size)
    if tuple(value.shape) != expected:
        layout = "(L, B, n)" if batched else "(L, n) for unbatched input"
        raise MapError(f"{name} must have shape {layout} = {expected}, got {tuple(value.shape)} "
                       f"(initial values: {rows})")
    if value.dtype != seq.dtype:
        raise MapTypeError(f"{what} has dtype {value.dtype}, the input has {seq.dtype}")
    if value.device != seq.device:
        raise MapError(f"{what} is on {value.device}, the input is on {seq.device}")
    return list(value.unbind(0))


def _options_repr(net: nn.Module) -> str:
    s = f"{net.input_size}, {net.hidden_size}"
    if net.num_layers != 1:
        s += f", num_layers={net.num_layers}"
    if not net.bias:
        s += ", bias=False"
    if net.batch_first:
        s += ", batch_first=True"
    if net.dropout:
        s += f", dropout={net.dropout}"
    if getattr(net, "proj_size", 0):
        s += f", proj_size={net.proj_size}"
    return s + ", update='ordered'"


# --------------------------------------------------------------------------- modules
class _GatedMap(nn.Module):
    """What LSTMMap and GRUMap share: options, the layer below each layer, dropout slots,
    parameter bookkeeping and the forced iteration."""

    _source: type  # nn.LSTM or nn.GRU
    _gates: tuple[str, ...]

    def _setup(self, input_size, hidden_size, num_layers, bias, batch_first, dropout,
               proj_size) -> None:
        check_gated_config(input_size, hidden_size, num_layers, dropout, proj_size)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        self.dropout = float(dropout)
        self.layer_slots: tuple[str, ...] = tuple(f"h{l}" for l in range(1, num_layers + 1))

    def _below(self, l: int) -> str:
        """The slot layer ``l`` (1-based) reads: ``x``, ``d{l}`` (dropout) or ``h{l-1}``."""
        if l == 1:
            return "x"
        return f"d{l}" if self.dropout > 0 else f"h{l - 1}"

    def _dropout_slots(self, l: int, n: int) -> dict[str, int]:
        return {f"d{l}": n} if l > 1 and self.dropout > 0 else {}

    def _gate_linears(self, m: BlockMap, l: int, n_in: int, n_h: int, H: int, gates,
                      dtype) -> None:
        """``F[gate, below]`` and ``F[gate, h]`` for every gate of layer ``l`` (on the
        meta device: see :meth:`_finish`)."""
        kw = {"device": "meta", "dtype": dtype}
        for gate in gates:
            m.connect(f"{gate}{l}", self._below(l), nn.Linear(n_in, H, bias=self.bias, **kw))
            if gate != "n":
                m.connect(f"{gate}{l}", f"h{l}", nn.Linear(n_h, H, bias=self.bias, **kw))

    def _connect_dropout(self, m: BlockMap, l: int) -> None:
        if l > 1 and self.dropout > 0:
            m.connect(f"d{l}", f"h{l - 1}", nn.Dropout(self.dropout))

    def _finish(self, m: BlockMap, device) -> None:
        """Install the map, built on the meta device (so nothing draws random numbers
        but :meth:`reset_parameters`), on ``device`` and initialise it as torch does."""
        self.map = m
        self.to_empty(device=torch.get_default_device() if device is None else device)
        self.reset_parameters()

    def parameter_parts(self) -> dict[str, tuple[nn.Parameter, ...]]:
        """torch parameter name -> the map parameters whose row-wise concatenation it is,
        in torch's parameter order (``weight_ih_l0`` is ``(W_ii; W_if; W_ig; W_io)`` for
        an LSTM: the weights of blocks ``i1<-x, f1<-x, g1<-x, o1<-x``)."""
        out: dict[str, tuple[nn.Parameter, ...]] = {}
        m = self.map
        for k in range(self.num_layers):
            l = k + 1
            below = self._below(l)
            ih = [m.block(f"{gate}{l}", below) for gate in self._gates]
            hh = self._recurrent_parts(l)
            out[f"weight_ih_l{k}"] = tuple(b.weight for b in ih)
            out[f"weight_hh_l{k}"] = tuple(b.weight for b in hh)
            if self.bias:
                out[f"bias_ih_l{k}"] = tuple(b.bias for b in ih)
                out[f"bias_hh_l{k}"] = tuple(b.bias for b in hh)
            if getattr(self, "proj_size", 0):
                out[f"weight_hr_l{k}"] = (m.block(f"h{l}", f"m{l}").weight,)
        return out

    def torch_state(self) -> dict[str, Tensor]:
        """torch parameter name -> a detached copy of the concatenated value."""
        return {name: torch.cat([p.detach() for p in parts])
                for name, parts in self.parameter_parts().items()}

    def reset_parameters(self) -> None:
        """torch's initialisation: every torch parameter ``U(-1/sqrt(H), 1/sqrt(H))``,
        drawn whole in torch's order and split into the blocks, so a map built after
        ``torch.manual_seed(s)`` equals the torch module built after the same seed."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        with torch.no_grad():
            for parts in self.parameter_parts().values():
                full = torch.empty(sum(p.shape[0] for p in parts), *parts[0].shape[1:],
                                   dtype=parts[0].dtype, device=parts[0].device)
                full.uniform_(-bound, bound)
                for p, v in zip(parts, full.split([p.shape[0] for p in parts])):
                    p.copy_(v)

    def load_torch(self, net: nn.Module) -> None:
        """Copy the parameters (values and ``requires_grad``) of a torch module with
        the same options into the blocks."""
        source = dict(net.named_parameters())
        parts_of = self.parameter_parts()
        for name, parts in parts_of.items():
            shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
            if name not in source or tuple(source[name].shape) != shape:
                got = tuple(source[name].shape) if name in source else "missing"
                raise MapError(f"parameter {name!r} of the source is {got}, this "
                               f"{type(self).__name__} needs {shape}")
        with torch.no_grad():
            for name, parts in parts_of.items():
                full = source[name]
                for p, v in zip(parts, full.detach().split([p.shape[0] for p in parts])):
                    p.copy_(v)
                    p.requires_grad_(full.requires_grad)

    def _to_torch(self, **options) -> nn.Module:
        ref = next(iter(self.parameters()))
        net = self._source(
            self.input_size, self.hidden_size, self.num_layers, bias=self.bias,
            batch_first=self.batch_first, dropout=self.dropout, device=ref.device,
            dtype=ref.dtype, **options,
        )
        with torch.no_grad():
            for name, parts in self.parameter_parts().items():
                getattr(net, name).copy_(torch.cat([p.detach() for p in parts]))
                getattr(net, name).requires_grad_(parts[0].requires_grad)
        net.train(self.training)
        return net

    def _run(self, seq: Tensor, init: dict[str, Tensor], batched: bool) -> tuple[dict, Tensor]:
        traj = iterate(self.map, init, seq.shape[0], force={"x": seq}, trajectory=True,
                       update="ordered")
        output = traj[self.layer_slots[-1]]
        if batched and self.batch_first:
            output = output.transpose(0, 1)
        return traj, output

    def _sequence(self, x: object) -> tuple[Tensor, bool]:
        return check_sequence(x, input_size=self.input_size, batch_first=self.batch_first,
                              ref=self.map)

    def extra_repr(self) -> str:
        return _options_repr(self)


class LSTMMap(_GatedMap):
    """An ``nn.LSTM`` as a forced block map; ``net(x, (h0, c0))`` equals ``lstm(x, (h0, c0))``.

    Constructed like ``nn.LSTM`` (same arguments, same initialisation and, from the same
    seed, the same values), or from an existing module with :func:`from_lstm`.
    ``net.map`` is the :class:`~iternn.BlockMap` over the slots ``x`` and, per layer
    ``l``, ``[d{l},] i{l}, f{l}, g{l}, o{l}, c{l}, [m{l},] h{l}`` described in
    :mod:`iternn.convert.gated`; ``net`` iterates it with ``x`` forced by the input,
    ``h{l}``/``c{l}`` started at ``h0[l-1]``/``c0[l-1]`` (zeros by default) and
    ``update="ordered"``, and returns ``(output, (h_n, c_n))`` in ``nn.LSTM``'s layout.

    Args:
        input_size, hidden_size, num_layers, bias, batch_first, dropout, proj_size: as
            ``nn.LSTM`` (``bidirectional`` is not supported).
        device, dtype: of the parameters.
    """

    _source = nn.LSTM
    _gates = LSTM_GATES

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        *,
        proj_size: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self._setup(input_size, hidden_size, num_layers, bias, batch_first, dropout, proj_size)
        self.proj_size = proj_size
        H, P = hidden_size, proj_size or hidden_size
        self.cell_slots: tuple[str, ...] = tuple(f"c{l}" for l in range(1, num_layers + 1))
        slots: dict[str, int] = {"x": input_size}
        for l in range(1, num_layers + 1):
            slots.update(self._dropout_slots(l, P))
            slots.update({f"{gate}{l}": H for gate in LSTM_GATES})
            slots[f"c{l}"] = H
            if proj_size:
                slots[f"m{l}"] = H
            slots[f"h{l}"] = P
        m = BlockMap(slots)
        for l in range(1, num_layers + 1):
            self._connect_dropout(m, l)
            n_in = input_size if l == 1 else P
            self._gate_linears(m, l, n_in, P, H, LSTM_GATES, dtype)
            acts = {"i": nn.Sigmoid, "f": nn.Sigmoid, "g": nn.Tanh, "o": nn.Sigmoid}
            for gate, act in acts.items():
                m.set_activation(f"{gate}{l}", act())
            m.connect(f"c{l}", (f"f{l}", f"c{l}", f"i{l}", f"g{l}"), CellUpdate())
            if proj_size:
                m.connect(f"m{l}", (f"o{l}", f"c{l}"), OutputGate())
                m.connect(f"h{l}", f"m{l}", nn.Linear(H, P, bias=False, device="meta",
                                                       dtype=dtype))
            else:
                m.connect(f"h{l}", (f"o{l}", f"c{l}"), OutputGate())
        self._finish(m, device)

    def _recurrent_parts(self, l: int) -> list[nn.Module]:
        return [self.map.block(f"{gate}{l}", f"h{l}") for gate in LSTM_GATES]

    def to_lstm(self) -> nn.LSTM:
        """An ``nn.LSTM`` with copies of this map's parameters (and its train/eval mode)."""
        return self._to_torch(proj_size=self.proj_size)

    def forward(
        self, x: Tensor, hx: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """``(output, (h_n, c_n))`` exactly as ``nn.LSTM`` returns them.

        ``x``: ``(T, B, n_in)`` (``(B, T, n_in)`` with ``batch_first``) or unbatched
        ``(T, n_in)``; ``hx = (h0, c0)``: ``(L, B, P)`` and ``(L, B, H)`` (``P =
        proj_size or H``), unbatched ``(L, P)``/``(L, H)``, zeros when ``None``.
        ``output`` is the trajectory of slot ``hL``; ``h_n``/``c_n`` stack the final
        values of ``h1 ... hL`` and ``c1 ... cL``.
        """
        seq, batched = self._sequence(x)
        init: dict[str, Tensor] = {}
        if hx is not None:
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise MapTypeError(
                    f"hx must be a tuple (h0, c0) (initial values of slots "
                    f"{self.layer_slots[0]}.. and {self.cell_slots[0]}..), got "
                    f"{type(hx).__name__}" + (f" of length {len(hx)}" if isinstance(
                        hx, (tuple, list)) else "")
                )
            P = self.proj_size or self.hidden_size
            init.update(zip(self.layer_slots, check_initial(
                hx[0], "h0", seq=seq, batched=batched, size=P, slots=self.layer_slots)))
            init.update(zip(self.cell_slots, check_initial(
                hx[1], "c0", seq=seq, batched=batched, size=self.hidden_size,
                slots=self.cell_slots)))
        traj, output = self._run(seq, init, batched)
        h_n = torch.stack([traj[s][-1] for s in self.layer_slots])
        c_n = torch.stack([traj[s][-1] for s in self.cell_slots])
        return output, (h_n, c_n)


class GRUMap(_GatedMap):
    """An ``nn.GRU`` as a forced block map; ``net(x, h0)`` equals ``gru(x, h0)``.

    Constructed like ``nn.GRU`` (same arguments, same initialisation and, from the same
    seed, the same values), or from an existing module with :func:`from_gru`.
    ``net.map`` is the :class:`~iternn.BlockMap` over the slots ``x`` and, per layer
    ``l``, ``[d{l},] r{l}, z{l}, n{l}, h{l}`` described in :mod:`iternn.convert.gated`;
    ``net`` iterates it with ``x`` forced by the input, ``h{l}`` started at ``h0[l-1]``
    (zeros by default) and ``update="ordered"``, and returns ``(output, h_n)`` in
    ``nn.GRU``'s layout.

    Args:
        input_size, hidden_size, num_layers, bias, batch_first, dropout: as ``nn.GRU``
            (``bidirectional`` is not supported).
        device, dtype: of the parameters.
    """

    _source = nn.GRU
    _gates = GRU_GATES

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self._setup(input_size, hidden_size, num_layers, bias, batch_first, dropout, 0)
        H = hidden_size
        slots: dict[str, int] = {"x": input_size}
        for l in range(1, num_layers + 1):
            slots.update(self._dropout_slots(l, H))
            slots.update({f"{s}{l}": H for s in ("r", "z", "n", "h")})
        m = BlockMap(slots)
        for l in range(1, num_layers + 1):
            self._connect_dropout(m, l)
            n_in = input_size if l == 1 else H
            self._gate_linears(m, l, n_in, H, H, GRU_GATES, dtype)
            m.connect(f"n{l}", (f"r{l}", f"h{l}"),
                      ResetLinear(H, H, bias=self.bias, device="meta", dtype=dtype))
            m.connect(f"h{l}", (f"z{l}", f"n{l}", f"h{l}"), GatedMix())
            m.set_activation(f"r{l}", nn.Sigmoid())
            m.set_activation(f"z{l}", nn.Sigmoid())
            m.set_activation(f"n{l}", nn.Tanh())
        self._finish(m, device)

    def _recurrent_parts(self, l: int) -> list[nn.Module]:
        return [self.map.block(f"r{l}", f"h{l}"), self.map.block(f"z{l}", f"h{l}"),
                self.map.block(f"n{l}", (f"r{l}", f"h{l}"))]

    def to_gru(self) -> nn.GRU:
        """An ``nn.GRU`` with copies of this map's parameters (and its train/eval mode)."""
        return self._to_torch()

    def forward(self, x: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(output, h_n)`` exactly as ``nn.GRU`` returns them.

        ``x``: ``(T, B, n_in)`` (``(B, T, n_in)`` with ``batch_first``) or unbatched
        ``(T, n_in)``; ``h0``: ``(L, B, H)`` or unbatched ``(L, H)``, zeros when ``None``.
        """
        seq, batched = self._sequence(x)
        init: dict[str, Tensor] = {}
        if h0 is not None:
            init.update(zip(self.layer_slots, check_initial(
                h0, "h0", seq=seq, batched=batched, size=self.hidden_size,
                slots=self.layer_slots)))
        traj, output = self._run(seq, init, batched)
        return output, torch.stack([traj[s][-1] for s in self.layer_slots])


def _convert(net: nn.Module, cls: type, source: type) -> _GatedMap:
    cfg = source_config(net, source)
    ref = net.weight_ih_l0
    # Built on the meta device: no initialisation, so the global RNG is not consumed.
    out = cls(**cfg, device="meta", dtype=ref.dtype).to_empty(device=ref.device)
    out.load_torch(net)
    out.train(net.training)
    return out


def from_lstm(lstm: nn.LSTM) -> LSTMMap:
    """Convert an ``nn.LSTM`` into an equivalent :class:`LSTMMap` (a forced block map).

    The result has copies of the parameters (split into the gate blocks), the same
    ``requires_grad`` flags, train/eval mode, dtype and device; ``net(x, hx)`` returns
    what ``lstm(x, hx)`` returns, with the same gradients. No random numbers are drawn.

    Raises:
        MapTypeError: (a ``TypeError``) ``lstm`` is not an ``nn.LSTM``.
        ConversionError: (a ``ValueError``) ``bidirectional=True``.
    """
    return _convert(lstm, LSTMMap, nn.LSTM)


def from_gru(gru: nn.GRU) -> GRUMap:
    """Convert an ``nn.GRU`` into an equivalent :class:`GRUMap`; see :func:`from_lstm`.

    Raises:
        MapTypeError: (a ``TypeError``) ``gru`` is not an ``nn.GRU``.
        ConversionError: (a ``ValueError``) ``bidirectional=True``.
    """
    return _convert(gru, GRUMap, nn.GRU)
