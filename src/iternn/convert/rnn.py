"""Elman RNNs as forced block maps (paper eq. 8, eq. 11): ``from_rnn`` and :class:`RNNMap`.

An ``L``-layer ``nn.RNN`` becomes a block map over the slots ``x`` (the input, *forced*:
overwritten by the next input before every application, eq. 11) and ``h1 ... hL`` (one
slot per layer). With row = destination slot and column = source slot, the block matrix
of a 2-layer RNN is::

               x          h1          h2
    x    [     0          0           0     ]     (forced, never computed)
    h1   [  W_ih^1     W_hh^1         0     ]     act_h1 = tanh or relu
    h2   [     0       W_ih^2      W_hh^2   ]     act_h2 = tanh or relu

so ``F[h1, x] = W_ih^1`` (torch's ``weight_ih_l0``), ``F[hl, hl] = W_hh^l``
(``weight_hh_l{l-1}``; the recurrence is a self-loop) and ``F[hl, h(l-1)] = W_ih^l`` for
``l > 1``. Every block is a plain ``nn.Linear`` that carries its own torch bias
(``bias_ih`` on the input block, ``bias_hh`` on the recurrent block), so the map has the
same parameters as the source module, one for one, and gradients and optimizer steps
match torch's exactly. There are no slot biases.

**Update order.** The paper's application is a Jacobi update: every block reads the
previous state. For one layer that *is* the RNN: ``h_t = act(W_ih x_t + b_ih + W_hh
h_{t-1} + b_hh)``. For several layers it is not: under Jacobi, ``h2`` at application
``t`` reads ``h1`` from application ``t - 1``, so the layers are *pipelined* with a lag of
one step per layer (layer ``l`` sees the input ``l - 1`` steps late, and its first
``l - 1`` outputs are driven by the initial states of the layers below instead of by the
input). torch's stack instead feeds layer ``l`` the *same* step's output of layer
``l - 1``. :class:`RNNMap` therefore iterates with ``update="ordered"``: the strongly
connected components ``h1, h2, ..., hL`` are updated one after another within each
application, each reading the newest value of the layer below (a Gauss–Seidel sweep;
the self-loop inside each component stays Jacobi). The blocks are unchanged; only the
update order differs, and with it the multi-layer map is exact.

The engine (:func:`iternn.iterate` with ``force``) evaluates the input projection
``F[h1, x]`` for all time steps in one batched matmul, and likewise ``F[hl, h(l-1)]``
over the whole trajectory of the layer below; only the recurrent self-loop runs step by
step.

Inter-layer dropout (``nn.RNN(dropout=p)``, ``num_layers > 1``) is supported: the block
``F[hl, h(l-1)]`` becomes ``nn.Sequential(nn.Dropout(p), nn.Linear)``, active in train
mode only, applied to the whole trajectory of the layer below in one call as torch does.
On CPU it draws the same mask from the same RNG stream as ``nn.RNN`` (same seed, same
result); on CUDA torch's cuDNN kernel draws its own masks, so the two agree only in
distribution.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from ..core.block_map import BlockMap
from ..core.state import parameter_spec
from ..engine.iterate import iterate
from ..errors import ConversionError, MapError, MapTypeError

__all__ = ["RNNMap", "from_rnn"]

NONLINEARITIES = ("tanh", "relu")


# --------------------------------------------------------------------------- helpers
def rnn_options_repr(net: nn.Module, *, extra: str = "") -> str:
    """``nn.RNN``-style options of ``net`` that differ from the defaults, for extra_repr."""
    s = f"{net.input_size}, {net.hidden_size}{extra}"
    if net.num_layers != 1:
        s += f", num_layers={net.num_layers}"
    if net.nonlinearity != "tanh":
        s += f", nonlinearity={net.nonlinearity!r}"
    if not net.bias:
        s += ", bias=False"
    if net.batch_first:
        s += ", batch_first=True"
    if net.dropout:
        s += f", dropout={net.dropout}"
    return s


def rnn_config(rnn: nn.Module) -> dict:
    """Validate ``rnn`` for conversion and return its configuration as keyword arguments.

    Raises:
        MapTypeError: (a ``TypeError``) ``rnn`` is not an ``nn.RNN`` (``nn.LSTM`` and
            ``nn.GRU`` are other cells), or a subclass that overrides ``forward``.
        ConversionError: (a ``ValueError``) ``bidirectional=True``, ``proj_size > 0`` or
            an unknown nonlinearity (the message names the attribute).
    """
    if not isinstance(rnn, nn.RNN):
        raise MapTypeError(
            f"expected an nn.RNN, got {type(rnn).__name__}"
            + (" (LSTM/GRU cells are not Elman RNNs)" if isinstance(rnn, nn.RNNBase) else "")
        )
    if type(rnn).forward is not nn.RNN.forward:
        raise MapTypeError(
            f"{type(rnn).__name__} overrides nn.RNN.forward; only the plain nn.RNN "
            "computation can be converted"
        )
    if rnn.bidirectional:
        raise ConversionError("bidirectional=True is not supported: a block map runs forward in time")
    if getattr(rnn, "proj_size", 0):
        raise ConversionError(f"proj_size={rnn.proj_size} is not supported (nn.RNN has no projection)")
    if rnn.nonlinearity not in NONLINEARITIES:
        raise ConversionError(
            f"nonlinearity={rnn.nonlinearity!r} is not supported; expected one of {NONLINEARITIES}"
        )
    return dict(
        input_size=int(rnn.input_size),
        hidden_size=int(rnn.hidden_size),
        num_layers=int(rnn.num_layers),
        nonlinearity=str(rnn.nonlinearity),
        bias=bool(rnn.bias),
        batch_first=bool(rnn.batch_first),
        dropout=float(rnn.dropout),
    )


def check_config(
    input_size: int, hidden_size: int, num_layers: int, nonlinearity: str, dropout: float
) -> None:
    """The same argument checks as ``nn.RNN``, as :class:`~iternn.MapError` (a bad
    value) and :class:`~iternn.MapTypeError` (a bad type), naming the argument."""
    for name, value in (("input_size", input_size), ("hidden_size", hidden_size),
                        ("num_layers", num_layers)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise MapTypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise MapError(f"{name} must be >= 1, got {value}")
    if nonlinearity not in NONLINEARITIES:
        raise MapError(
            f"nonlinearity={nonlinearity!r} is not supported; expected one of {NONLINEARITIES}"
        )
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout <= 1:
        raise MapError(f"dropout must be a number in [0, 1], got {dropout!r}")


def activation(nonlinearity: str) -> nn.Module:
    """The slot activation of an RNN layer."""
    return nn.Tanh() if nonlinearity == "tanh" else nn.ReLU()


def linear_of(block: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` of a block (a plain one, or the last layer of Dropout+Linear)."""
    return block if isinstance(block, nn.Linear) else block[-1]


def input_block(
    n_in: int, n_out: int, bias: bool, dropout: float, device, dtype
) -> nn.Module:
    """``F[hl, h(l-1)]``: a plain ``nn.Linear``, preceded by ``nn.Dropout`` when ``dropout > 0``."""
    lin = nn.Linear(n_in, n_out, bias=bias, device=device, dtype=dtype)
    return nn.Sequential(nn.Dropout(dropout), lin) if dropout > 0 else lin


def copy_rnn_parameters(dst: Mapping[str, nn.Parameter], source: Mapping[str, Tensor]) -> None:
    """Copy ``source[name]`` (values and ``requires_grad``) into ``dst[name]`` for every name."""
    with torch.no_grad():
        for name, p in dst.items():
            src = source[name]
            p.copy_(src.detach())
            p.requires_grad_(src.requires_grad)


def check_sequence(
    x: object,
    *,
    input_size: int,
    batch_first: bool,
    ref: nn.Module,
    slot: str = "x",
) -> tuple[Tensor, bool]:
    """Validate an RNN input and return it time-first ``(T, *batch, n_in)`` and ``batched``.

    Accepts ``nn.RNN``'s layouts: ``(T, B, n_in)`` (``(B, T, n_in)`` with
    ``batch_first``) or unbatched ``(T, n_in)``. Errors name the input slot.
    """
    if isinstance(x, PackedSequence):
        raise MapTypeError(
            f"input slot {slot!r}: PackedSequence is not supported; pass a padded tensor"
        )
    if not isinstance(x, Tensor):
        raise MapTypeError(f"input slot {slot!r} must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise MapTypeError(f"input slot {slot!r} must be floating point, got {x.dtype}")
    if x.dim() not in (2, 3):
        layout = "(B, T, n_in)" if batch_first else "(T, B, n_in)"
        raise MapError(
            f"input slot {slot!r} must be 3-D {layout} or unbatched 2-D (T, n_in), "
            f"got {x.dim()}-D shape {tuple(x.shape)}"
        )
    if x.shape[-1] != input_size:
        raise MapError(
            f"input slot {slot!r} has {x.shape[-1]} features (shape {tuple(x.shape)}), "
            f"expected input_size={input_size}"
        )
    batched = x.dim() == 3
    seq = x.transpose(0, 1) if batched and batch_first else x
    if seq.shape[0] == 0:
        raise MapError(
            f"input slot {slot!r} has sequence length 0; an RNN needs at least one step"
        )
    dtype, device = parameter_spec(ref)
    if dtype is not None and x.dtype != dtype:
        raise MapTypeError(
            f"input slot {slot!r} has dtype {x.dtype} but the parameters are {dtype}; "
            f"convert one of them (e.g. net.to({x.dtype}))"
        )
    if device is not None and x.device != device:
        raise MapError(f"input slot {slot!r} is on {x.device} but the parameters are on {device}")
    return seq, batched


def check_h0(
    h0: object,
    *,
    seq: Tensor,
    batched: bool,
    num_layers: int,
    hidden_size: int,
    slots: list[str],
) -> list[Tensor] | None:
    """Validate ``h0`` (``(L, B, H)``, unbatched ``(L, H)``) and split it per layer slot.

    ``slots[l]`` is the slot whose initial value is ``h0[l]``; errors name them.
    """
    if h0 is None:
        return None
    names = slots[0] if len(slots) == 1 else f"{slots[0]}..{slots[-1]}"
    what = f"h0 (initial value of slot(s) {names})"
    rows = ", ".join(f"h0[{i}] -> slot {s!r}" for i, s in enumerate(slots))
    if not isinstance(h0, Tensor):
        raise MapTypeError(f"{what} must be a tensor, got {type(h0).__name__}")
    if not h0.is_floating_point():
        raise MapTypeError(f"{what} must be floating point, got {h0.dtype}")
    expected = (num_layers, *seq.shape[1:-1], hidden_size)
    if tuple(h0.shape) != expected:
        layout = "(L, B, H)" if batched else "(L, H) for unbatched input"
        raise MapError(
            f"h0 must have shape {layout} = {expected}, got {tuple(h0.shape)} "
            f"(initial values: {rows})"
        )
    if h0.dtype != seq.dtype:
        raise MapTypeError(f"{what} has dtype {h0.dtype}, the input has {seq.dtype}")
    if h0.device != seq.device:
        raise MapError(f"{what} is on {h0.device}, the input is on {seq.device}")
    return list(h0.unbind(0))


# --------------------------------------------------------------------------- module
class RNNMap(nn.Module):
    """An Elman RNN (``nn.RNN``) as a forced block map; ``net(x, h0)`` equals ``rnn(x, h0)``.

    Constructed like ``nn.RNN`` (same arguments, same uniform initialisation
    ``U(-1/sqrt(H), 1/sqrt(H))``), or from an existing module with :func:`from_rnn`.
    ``net.map`` is the :class:`~iternn.BlockMap` over slots ``x, h1 ... hL`` described in
    :mod:`iternn.convert.rnn`; ``net`` iterates it with ``x`` forced by the input
    sequence, ``h1 ... hL`` started at ``h0`` (zeros by default) and
    ``update="ordered"``, and returns ``(output, h_n)`` in ``nn.RNN``'s layout: the
    trajectory of ``hL`` and the last value of every layer slot.

    Args:
        input_size, hidden_size, num_layers, nonlinearity, bias, batch_first, dropout:
            as ``nn.RNN`` (``bidirectional`` and ``proj_size`` are not supported).
        device, dtype: of the parameters.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        nonlinearity: str = "tanh",
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_config(input_size, hidden_size, num_layers, nonlinearity, dropout)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.nonlinearity = nonlinearity
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        self.dropout = float(dropout)
        self.layer_slots: tuple[str, ...] = tuple(f"h{l}" for l in range(1, num_layers + 1))
        m = BlockMap({"x": input_size, **{s: hidden_size for s in self.layer_slots}})
        below = "x"
        for l, slot in enumerate(self.layer_slots):
            n_in = input_size if l == 0 else hidden_size
            p = self.dropout if l > 0 else 0.0  # torch drops between layers only
            m.connect(slot, below, input_block(n_in, hidden_size, self.bias, p, device, dtype))
            m.connect(slot, slot, nn.Linear(hidden_size, hidden_size, bias=self.bias,
                                            device=device, dtype=dtype))
            m.set_activation(slot, activation(nonlinearity))
            below = slot
        self.map = m
        self.reset_parameters()

    # ------------------------------------------------------------------ parameters
    def torch_parameters(self) -> dict[str, nn.Parameter]:
        """``nn.RNN`` parameter name (``weight_ih_l0``, ``bias_hh_l1``, ...) -> map parameter."""
        out: dict[str, nn.Parameter] = {}
        below = "x"
        for l, slot in enumerate(self.layer_slots):
            ih = linear_of(self.map.block(slot, below))
            hh = linear_of(self.map.block(slot, slot))
            out[f"weight_ih_l{l}"] = ih.weight
            out[f"weight_hh_l{l}"] = hh.weight
            if self.bias:
                out[f"bias_ih_l{l}"] = ih.bias
                out[f"bias_hh_l{l}"] = hh.bias
            below = slot
        return out

    def reset_parameters(self) -> None:
        """``nn.RNN``'s initialisation: every parameter ``U(-1/sqrt(H), 1/sqrt(H))``."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        with torch.no_grad():
            for p in self.torch_parameters().values():
                p.uniform_(-bound, bound)

    def to_rnn(self) -> nn.RNN:
        """An ``nn.RNN`` with copies of this map's parameters (and its train/eval mode)."""
        ref = next(iter(self.parameters()))
        rnn = nn.RNN(
            self.input_size, self.hidden_size, self.num_layers, nonlinearity=self.nonlinearity,
            bias=self.bias, batch_first=self.batch_first, dropout=self.dropout,
            device=ref.device, dtype=ref.dtype,
        )
        with torch.no_grad():
            for name, p in self.torch_parameters().items():
                getattr(rnn, name).copy_(p.detach())
                getattr(rnn, name).requires_grad_(p.requires_grad)
        rnn.train(self.training)
        return rnn

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(output, h_n)`` exactly as ``nn.RNN`` returns them.

        ``x``: ``(T, B, n_in)`` (``(B, T, n_in)`` with ``batch_first``) or unbatched
        ``(T, n_in)``; ``h0``: ``(L, B, H)`` or unbatched ``(L, H)``, zeros when
        ``None``. ``output`` is the trajectory of slot ``hL`` (``(T, B, H)``, batch-first
        or unbatched like the input) and ``h_n`` stacks the final value of ``h1 ... hL``.
        """
        seq, batched = check_sequence(
            x, input_size=self.input_size, batch_first=self.batch_first, ref=self.map
        )
        h = check_h0(h0, seq=seq, batched=batched, num_layers=self.num_layers,
                     hidden_size=self.hidden_size, slots=list(self.layer_slots))
        init = {} if h is None else dict(zip(self.layer_slots, h))
        traj = iterate(self.map, init, seq.shape[0], force={"x": seq}, trajectory=True,
                       update="ordered")
        output = traj[self.layer_slots[-1]]
        if batched and self.batch_first:
            output = output.transpose(0, 1)
        h_n = torch.stack([traj[s][-1] for s in self.layer_slots])
        return output, h_n

    def extra_repr(self) -> str:
        return rnn_options_repr(self) + ", update='ordered'"


def from_rnn(rnn: nn.RNN) -> RNNMap:
    """Convert an ``nn.RNN`` into an equivalent :class:`RNNMap` (a forced block map).

    The result has copies of the parameters (training one does not change the other),
    the same ``requires_grad`` flags, train/eval mode, dtype and device; ``net(x, h0)``
    returns what ``rnn(x, h0)`` returns, with the same gradients. The conversion draws
    no random numbers.

    Raises:
        MapTypeError: (a ``TypeError``) ``rnn`` is not an ``nn.RNN`` (e.g. ``nn.LSTM``).
        ConversionError: (a ``ValueError``) ``bidirectional`` or ``proj_size`` is set.
    """
    cfg = rnn_config(rnn)
    ref = rnn.weight_ih_l0
    # Built on the meta device: no initialisation, so the global RNG is not consumed.
    net = RNNMap(**cfg, device="meta", dtype=ref.dtype).to_empty(device=ref.device)
    copy_rnn_parameters(net.torch_parameters(), dict(rnn.named_parameters()))
    net.train(rnn.training)
    return net
