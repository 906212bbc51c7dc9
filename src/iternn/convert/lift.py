"""The lifted RNN (paper eqs. 15–19): ``lift_rnn`` and :class:`LiftedRNN`.

An RNN run for ``T`` steps is unrolled into one block map in which *every time step
gets its own slots*: inputs ``x1 ... xT`` and states ``h0 ... hT`` (``h0`` the initial
state). Inputs and ``h0`` are held; the only blocks are, for ``t = 1 ... T``,

    F[h_t, x_t] = W_ih        F[h_t, h_{t-1}] = W_hh

with **weight tying**: the same two ``nn.Linear`` modules (torch's ``weight_ih_l0``/
``bias_ih_l0`` and ``weight_hh_l0``/``bias_hh_l0``) are the blocks of every step, so
``parameters()`` holds each tied tensor once and its gradient is the sum of the
contributions of all steps, exactly as backpropagation through time computes it. For
``T = 3`` (row = destination slot, column = source slot; the held rows are zero)::

              x1     x2     x3     h0     h1     h2     h3
    h1   [  W_ih    0      0     W_hh    0      0      0   ]
    h2   [   0     W_ih    0      0     W_hh    0      0   ]
    h3   [   0      0     W_ih    0      0     W_hh    0   ]

The ``h`` part is strictly block-lower-triangular: the map is **nilpotent**, its block
graph is acyclic and its impulse-response length (longest block path) is ``T``. Iterated
``T`` times with the inputs and ``h0`` held, it reaches its fixed point, which is the
RNN's trajectory ``(x, h0, h_1(x), ..., h_T(x))``; further applications change nothing.
This is the paper's point: **an RNN over T steps is a deep MLP with shared weights** —
the same object as :func:`iternn.from_mlp`'s map, with a different sparsity pattern and
tied blocks.

With ``L > 1`` layers the state slots are ``h{l}_{t}`` (layer ``l``, step ``t``; the
initial states are ``h{l}_0``), with ``F[h{l}_{t}, h{l-1}_{t}] = W_ih^l`` (``x_t`` for
``l = 1``) and ``F[h{l}_{t}, h{l}_{t-1}] = W_hh^l``, tied over ``t``. The longest path is
then ``T + L - 1``: the lifted map needs no update ordering because every (layer, step)
pair is its own slot. The engine (:func:`iternn.iterate`) runs it as a wavefront,
evaluating every block exactly once.

Inter-layer dropout is supported as a ``Dropout`` in front of the tied ``W_ih^l``
blocks (train mode only); masks are drawn step by step, so they agree with
``nn.RNN``'s in distribution, not bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..core.block_map import BlockMap
from ..core.memory import check_bytes, format_bytes
from ..engine.iterate import depth, iterate
from ..errors import MapError, MapTypeError
from .rnn import (
    RNNMap,
    activation,
    check_config,
    check_h0,
    check_sequence,
    copy_rnn_parameters,
    input_block,
    linear_of,
    rnn_config,
    rnn_options_repr,
)

__all__ = ["LiftedRNN", "lift_rnn"]

#: Python bookkeeping of the lifted map per (layer, step) pair: its slot, two block
#: entries, an activation entry and the plan. Measured with tracemalloc on CPython 3.11,
#: torch 2.13: about 0.7-0.8 KB kept and 1.7-2.0 KB at the peak of construction.
_BYTES_PER_SLOT = 1500


class LiftedRNN(nn.Module):
    """An RNN unrolled over exactly ``T`` steps as one nilpotent block map with tied weights.

    ``net(x, h0)`` returns what ``nn.RNN(x, h0)`` returns, ``(output, h_n)``, for
    sequences of length ``T``. ``net.map`` is the lifted :class:`~iternn.BlockMap`
    described in :mod:`iternn.convert.lift`; use :meth:`input_slot` and
    :meth:`state_slot` for its slot names.

    Args:
        input_size, hidden_size, num_layers, nonlinearity, bias, batch_first, dropout:
            as ``nn.RNN`` (same uniform initialisation).
        T: the number of time steps (``>= 1``).
        device, dtype: of the parameters.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        T: int,
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
        if isinstance(T, bool) or not isinstance(T, int):
            raise MapTypeError(f"T must be an int, got {type(T).__name__}")
        if T < 1:
            raise MapError(f"T (sequence length) must be >= 1, got {T}")
        check_bytes(
            T * num_layers * _BYTES_PER_SLOT,
            f"T={T}: the lifted map of {T} steps x {num_layers} layer(s) = {T * num_layers} "
            f"state slots, about {format_bytes(_BYTES_PER_SLOT)} of bookkeeping each,",
        )
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.T = T
        self.num_layers = num_layers
        self.nonlinearity = nonlinearity
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        self.dropout = float(dropout)

        slots = {self.input_slot(t): input_size for t in range(1, T + 1)}
        for t in range(T + 1):
            for l in range(1, num_layers + 1):
                slots[self.state_slot(t, l)] = hidden_size
        m = BlockMap(slots)
        for l in range(1, num_layers + 1):
            n_in = input_size if l == 1 else hidden_size
            ih = input_block(n_in, hidden_size, self.bias, self.dropout if l > 1 else 0.0,
                             device, dtype)
            hh = nn.Linear(hidden_size, hidden_size, bias=self.bias, device=device, dtype=dtype)
            act = activation(nonlinearity)
            for t in range(1, T + 1):  # the same modules at every step: weight tying
                dst = self.state_slot(t, l)
                below = self.input_slot(t) if l == 1 else self.state_slot(t, l - 1)
                m.connect(dst, below, ih)
                m.connect(dst, self.state_slot(t - 1, l), hh)
                m.set_activation(dst, act)
        self.map = m
        self.initial_slots: tuple[str, ...] = tuple(
            self.state_slot(0, l) for l in range(1, num_layers + 1)
        )
        self.held_slots: tuple[str, ...] = (
            tuple(self.input_slot(t) for t in range(1, T + 1)) + self.initial_slots
        )
        #: Applications to the fixed point with inputs and h0 held: ``T + L - 1``.
        self.steps: int = int(depth(m, self.held_slots))
        self.reset_parameters()

    # ------------------------------------------------------------------ slot names
    def input_slot(self, t: int) -> str:
        """Name of the input slot of step ``t`` (``1 <= t <= T``): ``"x{t}"``."""
        return f"x{t}"

    def state_slot(self, t: int, layer: int = 1) -> str:
        """Name of the state slot of ``layer`` after step ``t`` (``t = 0``: initial state).

        ``"h{t}"`` for a one-layer RNN, ``"h{layer}_{t}"`` otherwise.
        """
        return f"h{t}" if self.num_layers == 1 else f"h{layer}_{t}"

    # ------------------------------------------------------------------ parameters
    def torch_parameters(self) -> dict[str, nn.Parameter]:
        """``nn.RNN`` parameter name -> the tied parameter of the lifted map."""
        out: dict[str, nn.Parameter] = {}
        for l in range(1, self.num_layers + 1):
            dst = self.state_slot(1, l)
            below = self.input_slot(1) if l == 1 else self.state_slot(1, l - 1)
            ih = linear_of(self.map.block(dst, below))
            hh = linear_of(self.map.block(dst, self.state_slot(0, l)))
            out[f"weight_ih_l{l - 1}"] = ih.weight
            out[f"weight_hh_l{l - 1}"] = hh.weight
            if self.bias:
                out[f"bias_ih_l{l - 1}"] = ih.bias
                out[f"bias_hh_l{l - 1}"] = hh.bias
        return out

    def reset_parameters(self) -> None:
        """``nn.RNN``'s initialisation: every parameter ``U(-1/sqrt(H), 1/sqrt(H))``."""
        bound = 1.0 / self.hidden_size**0.5
        with torch.no_grad():
            for p in self.torch_parameters().values():
                p.uniform_(-bound, bound)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(output, h_n)`` exactly as ``nn.RNN`` returns them, for length-``T`` input.

        The inputs ``x_t`` and the initial states are held, and the map is iterated
        :attr:`steps` (= its depth) times, i.e. evaluated once as a wavefront.
        """
        seq, batched = check_sequence(
            x, input_size=self.input_size, batch_first=self.batch_first, ref=self.map
        )
        if seq.shape[0] != self.T:
            raise MapError(
                f"sequence length {seq.shape[0]} does not match the lifted length T={self.T}; "
                f"a LiftedRNN runs exactly T steps (lift again for another length)"
            )
        h = check_h0(h0, seq=seq, batched=batched, num_layers=self.num_layers,
                     hidden_size=self.hidden_size, slots=list(self.initial_slots))
        state = {self.input_slot(t + 1): xt for t, xt in enumerate(seq.unbind(0))}
        if h is not None:
            state.update(zip(self.initial_slots, h))
        z = iterate(self.map, state, self.steps, hold=self.held_slots)
        last = self.num_layers
        output = torch.stack([z[self.state_slot(t, last)] for t in range(1, self.T + 1)])
        if batched and self.batch_first:
            output = output.transpose(0, 1)
        h_n = torch.stack([z[self.state_slot(self.T, l)] for l in range(1, last + 1)])
        return output, h_n

    def extra_repr(self) -> str:
        return rnn_options_repr(self, extra=f", T={self.T}") + f", steps={self.steps}"


def lift_rnn(rnn: nn.RNN | RNNMap, T: int) -> LiftedRNN:
    """Unroll an ``nn.RNN`` (or an :class:`~iternn.convert.rnn.RNNMap`) over ``T`` steps.

    The result has copies of the parameters (each tied over all steps), the same
    ``requires_grad`` flags, train/eval mode, dtype and device; ``net(x, h0)`` equals
    ``rnn(x, h0)`` for sequences of length ``T``, with the same gradients. The
    conversion draws no random numbers.

    Raises:
        MapTypeError: (a ``TypeError``) ``rnn`` is not an ``nn.RNN`` (e.g. ``nn.LSTM``)
            or ``T`` not an int.
        ConversionError: (a ``ValueError``) ``bidirectional``/``proj_size`` is set.
        MapError: (a ``ValueError``) ``T < 1``.
    """
    if isinstance(rnn, RNNMap):
        cfg = dict(input_size=rnn.input_size, hidden_size=rnn.hidden_size,
                   num_layers=rnn.num_layers, nonlinearity=rnn.nonlinearity, bias=rnn.bias,
                   batch_first=rnn.batch_first, dropout=rnn.dropout)
        source = rnn.torch_parameters()
    else:
        cfg = rnn_config(rnn)
        source = {name: getattr(rnn, name) for name, _ in rnn.named_parameters()}
    ref = source["weight_ih_l0"]
    # Built on the meta device: no initialisation, so the global RNG is not consumed.
    net = LiftedRNN(**cfg, T=T, device="meta", dtype=ref.dtype).to_empty(device=ref.device)
    copy_rnn_parameters(net.torch_parameters(), source)
    net.train(rnn.training)
    return net
