"""The model families of the sparsity study, matched to one trainable-parameter budget.

``build_model(family, data, *, hidden, density=None, seed=0, activation=None)`` builds one
model for a dataset (anything with ``task``, ``n_features``/``x_train`` and
``n_outputs``/``n_classes``, such as :class:`iternn.study.data.Dataset`). ``hidden`` fixes
the **budget** — the trainable count every family of that dataset is matched to — and
:func:`budget` computes it.

Flat tasks (``"classification"``, ``"regression"``): ``hidden`` is the list of MLP hidden
widths, e.g. ``(32,)``; the budget is the trainable count of that MLP (weights + biases).

``"mlp"``
    ``nn.Sequential(Linear, act, Linear, act, ..., Linear)`` with the hidden widths.
``"mlp_map"``
    ``iternn.from_mlp`` of that very MLP (same seed, same initial weights): its exact
    block-map twin. Trainable count: exactly the budget.
``"dense_map"``
    ``iternn.matched_map(mlp, density=1.0)``: a dense six-block ``(x, h, y)`` map iterated
    as many times as the MLP has layers. **Rounding:** with every block dense there is no
    sparse block to absorb the left-over entries, so its count is the largest that does not
    exceed the budget: ``0 <= budget - count < increment``, where ``increment`` is what one
    more hidden unit costs (``2 |h| + 1 + n_x + 2 n_y + 1``: one row and column of ``hh``, a
    row of ``hx``, a row of ``hy``, a column of ``yh``, a bias). :func:`count_tolerance`
    returns that bound.
``"sparse_map"``
    ``iternn.matched_map(mlp, density=d, seed=seed)``: the same six-block map with every
    block random-sparse at density ``d`` (``0 < d < 1``), width solved from the budget and
    the rounding remainder added as extra entries: exactly the budget.
``"resmlp"``
    A :class:`ResidualMLP`: input layer ``h = act(W_1 x + b_1)``, then one residual block
    ``h = h + act(W_k h + b_k)`` per further hidden width, then the output layer
    ``y = W_L h + b_L``. The widths must be equal (``hidden = [w, w, ...]``; one width: no
    block, the plain MLP). A residual block adds no parameter, so the count is the MLP's
    of the same widths: exactly the budget. ``hidden = [100, 100]`` on MNIST-1D is the
    published MNIST-1D MLP baseline (40-100-100-10, one residual block: 15 210 parameters).
``"resmlp_map"``
    ``iternn.from_module`` of that very network (same seed, same initial weights): its
    exact block-map twin (the skip connection is the identity block into ``h``).

**Published shapes** (not matched to the budget: ``hidden`` is the family's own width;
:attr:`Family.matched` is ``False`` and :attr:`Family.count` gives the exact count). They
read the ``F`` features of a flat sample as a 1-D signal of length ``F``:

``"cnn1d"``
    A :class:`ConvClassifier`, the published MNIST-1D CNN baseline at ``hidden = [C]``
    channels (published: 25): three ``Conv1d`` (kernel 5, 3, 3; stride 2; padding 1;
    ``1 -> C -> C -> C`` channels, ``act`` after each), flattened into
    ``Linear(C L_3, n_y)``, where ``L_3`` is the length after the three convolutions
    (5 for ``F = 40``). Count ``6 C + 2 (3 C² + C) + C L_3 n_y + n_y`` (5 210 at C = 25).
``"cnn1d_map"``
    ``iternn.from_module`` of that network: its exact block-map twin (each convolution a
    block-Toeplitz block).
``"bigru"``
    A :class:`BiGRUClassifier`, the published MNIST-1D GRU baseline at ``hidden = [H]``
    (published: 6): a bidirectional ``nn.GRU(1, H)`` over the ``F`` features as ``F`` time
    steps of one scalar, every step's ``2 H`` outputs flattened into
    ``Linear(2 H F, n_y)``. Count ``6 (H + H² + 2 H) + 2 H F n_y + n_y`` (5 134 at
    H = 6, F = 40). The gates are the GRU's own (the
    ``activation`` option does not apply, as for ``gru``).
``"bigru_map"``
    A :class:`BiGRUMap`: each direction of that GRU as ``iternn.from_gru`` of a
    one-direction GRU holding that direction's weights (the backward one reads the
    reversed sequence, as torch's reverse direction does): the same function.

Sequence tasks (``"sequence"``: ``x`` is ``(N, T, F)``, one label per sequence): ``hidden``
is one int ``H``; the budget is the trainable count of the **dense forced map** of width
``H`` (below, density 1): ``H F + H H + n_y H + H + n_y``.

``"forced_map"``
    A :class:`ForcedMap`: the ``(x, h, y)`` block map with blocks ``F[h, x]``, ``F[h, h]``
    and ``F[y, h]`` (the other three of the six are zero), slot biases on ``h`` and ``y``,
    ``tanh`` (or ``relu``) on ``h``. ``x`` is *forced* by the sequence (eq. 11) and the map
    is iterated ``T`` times with ``update="ordered"`` (``h`` first, then ``y`` reads the new
    ``h``), so ``y`` after the last step is the readout of the last hidden state: an Elman
    RNN with a linear readout, written as one block map. At ``density=1`` (default) every
    block is dense and the count is exactly the budget; at ``0 < d < 1`` all three blocks
    are random-sparse at ``d``, the width is solved from the budget with
    :func:`iternn.sparse.solve_hidden_width` and the remainder is added as extra entries:
    exactly the budget.
``"rnn"``, ``"gru"``, ``"lstm"``
    ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` (one layer, ``batch_first``) whose last hidden state
    feeds ``nn.Linear(H', n_y)``. **Rounding:** the width ``H'`` is the one whose count
    ``g (H' F + H'^2 + 2 H') + n_y H' + n_y`` (``g`` = 1, 3, 4 gates) is *closest* to the
    budget (ties: the smaller width), so ``|count - budget|`` is at most half the cost of one
    more hidden unit at that width; :func:`count_tolerance` returns that bound.

Initialisation is seeded and never touches the caller's global RNG: torch modules are
built inside :func:`torch.random.fork_rng` after ``torch.manual_seed(seed)``, the sparse
builders draw from a ``torch.Generator`` seeded with ``seed``.

:data:`FAMILIES` is the registry (name -> :class:`Family`); :func:`register_family` adds
one (tests use it to inject a failing model).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..convert.gated import from_gru
from ..convert.mlp import from_mlp
from ..convert.module import from_module
from ..core.block_map import BlockMap, source_slots
from ..core.memory import check_bytes, tensor_bytes
from ..core.summary import count_trainable
from ..engine.iterate import iterate
from ..errors import DataError, MapError, MapTypeError, StudyError
from ..sparse.builders import (
    matched_map,
    six_block_counts,
    six_block_map,
    solve_hidden_width,
)

__all__ = [
    "ACTIVATIONS",
    "BiGRUClassifier",
    "BiGRUMap",
    "ConvClassifier",
    "FAMILIES",
    "FLAT_TASKS",
    "Family",
    "ForcedMap",
    "RecurrentClassifier",
    "ResidualMLP",
    "budget",
    "build_model",
    "check_density",
    "check_feasible",
    "count_tolerance",
    "default_activation",
    "forced_map_densities",
    "live_trainable",
    "make_mlp",
    "normalize_hidden",
    "parameter_bytes",
    "recurrent_count",
    "recurrent_width",
    "register_family",
]

FLAT_TASKS = ("classification", "regression")
SEQUENCE_TASKS = ("sequence",)

#: Activation names accepted by the builders -> module class.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "silu": nn.SiLU,
}
#: Activations a recurrent family accepts (``nn.RNN`` knows only these two).
SEQUENCE_ACTIVATIONS = ("tanh", "relu")
_GATES = {"rnn": 1, "gru": 3, "lstm": 4}


@dataclass(frozen=True)
class Family:
    """A model family: which tasks it serves, whether it takes a density, its builder.

    ``build(data, hidden, density, seed, activation) -> nn.Module`` gets normalised
    arguments (``hidden`` a tuple of ints; ``density`` a float or ``None``).
    ``density``: ``"none"`` (no density), ``"sparse"`` (``0 < d < 1``) or ``"any"``
    (``0 < d <= 1``, default 1). ``matched``: ``hidden`` fixes the budget the family is
    matched to (:func:`budget`); ``False``: ``hidden`` is the family's own width (a
    published shape) and ``count(data, hidden)`` its exact trainable count.
    """

    name: str
    tasks: tuple[str, ...]
    density: str
    build: Callable[..., nn.Module]
    description: str = ""
    is_map: bool = False
    iterated: bool = False  # takes extra_steps (a held-input map iterated a fixed number of times)
    matched: bool = True
    count: Callable[[Any, tuple[int, ...]], int] | None = None


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Add (or replace) a family in :data:`FAMILIES`; returns it."""
    if not isinstance(family, Family):
        raise MapTypeError(f"expected a Family, got {type(family).__name__}")
    FAMILIES[family.name] = family
    return family


# --------------------------------------------------------------------------- helpers


def _task(data: Any) -> str:
    task = getattr(data, "task", None)
    if task not in FLAT_TASKS + SEQUENCE_TASKS:
        raise DataError(f"data.task must be one of {FLAT_TASKS + SEQUENCE_TASKS}, got {task!r}")
    return task


def _n_features(data: Any) -> int:
    n = getattr(data, "n_features", None)
    return int(n) if n is not None else int(data.x_train.shape[-1])


def _n_outputs(data: Any) -> int:
    n = getattr(data, "n_outputs", None)
    if n is not None:
        return int(n)
    if data.task == "regression":
        y = data.y_train
        return 1 if y.dim() == 1 else int(y.shape[1])
    return int(data.n_classes)


def default_activation(task: str) -> str:
    """``"relu"`` for flat tasks, ``"tanh"`` for sequences (``nn.RNN``'s default)."""
    return "tanh" if task in SEQUENCE_TASKS else "relu"


def _activation_name(task: str, activation: str | None) -> str:
    name = default_activation(task) if activation is None else activation
    allowed = SEQUENCE_ACTIVATIONS if task in SEQUENCE_TASKS else tuple(ACTIVATIONS)
    if name not in allowed:
        raise MapError(f"activation must be one of {', '.join(allowed)} for task {task!r}, "
                         f"got {name!r}")
    return name


def normalize_hidden(hidden: int | Sequence[int], task: str) -> tuple[int, ...]:
    """``hidden`` as a tuple of positive ints: MLP widths (flat), or ``(H,)`` (sequence)."""
    if isinstance(hidden, bool):
        raise MapTypeError(f"hidden must be an int or a list of ints, got {hidden!r}")
    if isinstance(hidden, int):
        widths: tuple[int, ...] = (hidden,)
    elif isinstance(hidden, Sequence) and not isinstance(hidden, str):
        widths = tuple(hidden)
    else:
        raise MapTypeError(f"hidden must be an int or a list of ints, got {hidden!r}")
    if not widths or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
        raise MapError(f"hidden widths must be ints >= 1, got {list(widths)}")
    if task in SEQUENCE_TASKS and len(widths) != 1:
        raise MapError(f"a sequence task takes one hidden width (the forced map's), got {list(widths)}")
    return widths


def _seeded(seed: int, fn: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


def make_mlp(n_in: int, hidden: Sequence[int], n_out: int, activation: str = "relu") -> nn.Sequential:
    """``Linear, act, ..., Linear`` (initialised from torch's global RNG)."""
    layers: list[nn.Module] = []
    width = n_in
    for h in hidden:
        layers += [nn.Linear(width, h), ACTIVATIONS[activation]()]
        width = h
    layers.append(nn.Linear(width, n_out))
    return nn.Sequential(*layers)


def _mlp_count(n_in: int, hidden: Sequence[int], n_out: int) -> int:
    widths = [n_in, *hidden, n_out]
    return sum(a * b + b for a, b in zip(widths, widths[1:]))


def forced_map_densities(density: float) -> dict[str, float]:
    """The six-block densities of a forced map: ``hx``, ``hh``, ``yh`` at ``density``."""
    return {"hx": density, "hh": density, "hy": 0.0, "yx": 0.0, "yh": density, "yy": 0.0}


def _forced_total(n_x: int, n_h: int, n_y: int, density: float) -> int:
    return sum(six_block_counts(n_x, n_h, n_y, forced_map_densities(density)).values())


def budget(data: Any, hidden: int | Sequence[int]) -> int:
    """The trainable budget of ``hidden`` on ``data``: the MLP's count (flat tasks) or the
    dense forced map's count (sequences)."""
    task = _task(data)
    widths = normalize_hidden(hidden, task)
    n_x, n_y = _n_features(data), _n_outputs(data)
    if task in SEQUENCE_TASKS:
        return _forced_total(n_x, widths[0], n_y, 1.0)
    return _mlp_count(n_x, widths, n_y)


def recurrent_count(kind: str, n_x: int, width: int, n_y: int) -> int:
    """Trainable count of ``nn.RNN/GRU/LSTM(n_x, width)`` plus ``Linear(width, n_y)``."""
    g = _GATES[kind]
    return g * (width * n_x + width * width + 2 * width) + n_y * width + n_y


def recurrent_width(kind: str, n_x: int, n_y: int, target: int) -> int:
    """The width whose :func:`recurrent_count` is closest to ``target`` (ties: smaller)."""
    g = _GATES[kind]
    a, b, c = g, g * (n_x + 2) + n_y, n_y - target
    root = (-b + math.sqrt(max(b * b - 4 * a * c, 0.0))) / (2 * a)
    cands = {max(1, math.floor(root) + k) for k in (-1, 0, 1, 2)}
    return min(sorted(cands), key=lambda w: abs(recurrent_count(kind, n_x, w, n_y) - target))


def count_tolerance(family: str, data: Any, hidden: int | Sequence[int],
                    density: float | None = None) -> int:
    """The documented bound on ``|count - budget|`` of a family (0: exact).

    ``dense_map``: the model has ``0 <= budget - count < tolerance`` (the cost of one more
    hidden unit); ``rnn``/``gru``/``lstm``: ``|count - budget| <= tolerance`` (half the cost
    of one more unit at the chosen width, rounded up).
    """
    task = _task(data)
    widths = normalize_hidden(hidden, task)
    n_x, n_y = _n_features(data), _n_outputs(data)
    target = budget(data, widths)
    if family == "dense_map":
        h = solve_hidden_width(target, n_x, n_y, 1.0)
        total = lambda n: sum(six_block_counts(n_x, n, n_y, 1.0).values())  # noqa: E731
        return total(h + 1) - total(h)
    if family in _GATES:
        w = recurrent_width(family, n_x, n_y, target)
        step = recurrent_count(family, n_x, w + 1, n_y) - recurrent_count(family, n_x, w, n_y)
        return -(-step // 2)
    return 0


# --------------------------------------------------------------------------- modules


class ForcedMap(nn.Module):
    """A block map over ``(x, h, y)`` run over a sequence: ``x`` forced, output ``y``.

    ``forward(x)`` takes ``(B, T, F)`` (batch first, as the datasets give it) and returns
    ``y`` after the last of ``T`` applications, iterated with ``update="ordered"`` so that
    ``y`` reads the newest ``h``: ``h_t = act(b_h + F_hx x_t + F_hh h_{t-1})``,
    ``y = b_y + F_yh h_T``. ``self.map`` is the :class:`~iternn.BlockMap`.
    """

    def __init__(self, map: BlockMap, *, input: str = "x", output: str = "y") -> None:
        super().__init__()
        if not isinstance(map, BlockMap):
            raise MapTypeError(f"map must be a BlockMap, got {type(map).__name__}")
        self.map = map
        self.input = input
        self.output = output

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 3:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise MapError(f"ForcedMap needs a (batch, time, features) tensor, got {shape}")
        seq = x.transpose(0, 1)
        out = iterate(self.map, {}, seq.shape[0], force={self.input: seq}, update="ordered")
        return out[self.output]

    def extra_repr(self) -> str:
        return f"input={self.input!r} (forced), output={self.output!r}, update='ordered'"


class RecurrentClassifier(nn.Module):
    """``nn.RNN``/``nn.GRU``/``nn.LSTM`` (batch first) whose last hidden state feeds a
    ``Linear`` readout; ``forward(x: (B, T, F)) -> (B, n_out)``."""

    def __init__(self, kind: str, n_in: int, width: int, n_out: int, activation: str = "tanh") -> None:
        super().__init__()
        if kind not in _GATES:
            raise MapError(f"kind must be one of {tuple(_GATES)}, got {kind!r}")
        self.kind = kind
        if kind == "rnn":
            self.rnn: nn.Module = nn.RNN(n_in, width, batch_first=True, nonlinearity=activation)
        elif kind == "gru":
            self.rnn = nn.GRU(n_in, width, batch_first=True)
        else:
            self.rnn = nn.LSTM(n_in, width, batch_first=True)
        self.readout = nn.Linear(width, n_out)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.readout(out[:, -1])


class ResidualMLP(nn.Module):
    """``h = act(W_1 x + b_1)``; ``h = h + act(W_k h + b_k)`` for each block; ``y = W_L h + b_L``.

    ``input`` is the first layer, ``blocks`` the residual layers (``width -> width``),
    ``output`` the last; each use of the activation is its own module. Built in that
    order from torch's global RNG (as ``nn.Sequential`` of the same layers would be).
    """

    def __init__(self, n_in: int, width: int, n_blocks: int, n_out: int,
                 activation: str = "relu") -> None:
        super().__init__()
        self.input = nn.Linear(n_in, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(n_blocks))
        self.output = nn.Linear(width, n_out)
        self.acts = nn.ModuleList(ACTIVATIONS[activation]() for _ in range(n_blocks + 1))

    def forward(self, x: Tensor) -> Tensor:
        h = self.acts[0](self.input(x))
        for block, act in zip(self.blocks, self.acts[1:]):
            h = h + act(block(h))
        return self.output(h)


def _conv_lengths(n: int) -> tuple[int, int, int]:
    """Signal lengths after each convolution of :class:`ConvClassifier`."""
    out = []
    for kernel in (5, 3, 3):
        n = (n + 2 - kernel) // 2 + 1
        out.append(n)
    return tuple(out)


class ConvClassifier(nn.Module):
    """Three ``Conv1d`` (kernel 5, 3, 3; stride 2; padding 1) over the features as a
    one-channel signal, ``act`` after each, then ``Linear`` on the flattened channels;
    ``forward(x: (B, F)) -> (B, n_out)``."""

    def __init__(self, n_in: int, channels: int, n_out: int, activation: str = "relu") -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.linear = nn.Linear(channels * _conv_lengths(n_in)[-1], n_out)
        self.acts = nn.ModuleList(ACTIVATIONS[activation]() for _ in range(3))

    def forward(self, x: Tensor) -> Tensor:
        h = x.unsqueeze(1)
        for conv, act in zip((self.conv1, self.conv2, self.conv3), self.acts):
            h = act(conv(h))
        return self.linear(h.flatten(1))


class BiGRUClassifier(nn.Module):
    """A bidirectional ``nn.GRU(1, width)`` over the ``seq_len`` features as time steps of
    one scalar; every step's ``2 width`` outputs (forward direction first) feed
    ``Linear(2 width seq_len, n_out)``; ``forward(x: (B, seq_len)) -> (B, n_out)``."""

    def __init__(self, seq_len: int, width: int, n_out: int) -> None:
        super().__init__()
        self.gru = nn.GRU(1, width, batch_first=True, bidirectional=True)
        self.readout = nn.Linear(2 * width * seq_len, n_out)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.gru(x.unsqueeze(-1))
        return self.readout(out.flatten(1))


def _direction(gru: nn.GRU, suffix: str) -> nn.GRU:
    """A one-direction ``nn.GRU`` holding copies of one direction's weights of ``gru``."""
    ref = gru.weight_ih_l0
    one = nn.GRU(gru.input_size, gru.hidden_size, batch_first=gru.batch_first,
                 device="meta", dtype=ref.dtype).to_empty(device=ref.device)
    with torch.no_grad():
        for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
            getattr(one, name).copy_(getattr(gru, name + suffix))
    return one


class BiGRUMap(nn.Module):
    """:class:`BiGRUClassifier` with each direction of its GRU as a block map:
    ``forward_map`` is ``iternn.from_gru`` of the forward direction, ``backward_map`` of
    the reverse direction, run on the reversed sequence (and its outputs reversed back),
    which is what torch's reverse direction computes. ``readout`` is a copy."""

    def __init__(self, source: BiGRUClassifier) -> None:
        super().__init__()
        if not isinstance(source, BiGRUClassifier):
            raise MapTypeError(f"source must be a BiGRUClassifier, got {type(source).__name__}")
        self.forward_map = from_gru(_direction(source.gru, ""))
        self.backward_map = from_gru(_direction(source.gru, "_reverse"))
        self.readout = copy.deepcopy(source.readout)

    def forward(self, x: Tensor) -> Tensor:
        seq = x.unsqueeze(-1)
        fwd, _ = self.forward_map(seq)
        bwd, _ = self.backward_map(seq.flip(1))
        return self.readout(torch.cat([fwd, bwd.flip(1)], -1).flatten(1))


# --------------------------------------------------------------------------- builders


def _build_mlp(data, hidden, density, seed, activation) -> nn.Module:
    return _seeded(seed, lambda: make_mlp(_n_features(data), hidden, _n_outputs(data), activation))


def _build_mlp_map(data, hidden, density, seed, activation) -> nn.Module:
    return from_mlp(_build_mlp(data, hidden, density, seed, activation))


def _build_dense_map(data, hidden, density, seed, activation) -> nn.Module:
    mlp = _build_mlp(data, hidden, None, seed, activation)
    return matched_map(mlp, density=1.0, seed=seed)


def _build_sparse_map(data, hidden, density, seed, activation) -> nn.Module:
    mlp = _build_mlp(data, hidden, None, seed, activation)
    return matched_map(mlp, density=density, seed=seed)


def _equal_widths(family: str, hidden: tuple[int, ...]) -> int:
    if len(set(hidden)) != 1:
        raise MapError(f"{family} needs equal hidden widths (each residual block adds h to "
                       f"act(W h)), got {list(hidden)}")
    return hidden[0]


def _one_width(family: str, hidden: tuple[int, ...]) -> int:
    if len(hidden) != 1:
        raise MapError(f"{family} takes one hidden width (its published shape's width), got "
                       f"{list(hidden)}")
    return hidden[0]


def _build_resmlp(data, hidden, density, seed, activation) -> nn.Module:
    width = _equal_widths("resmlp", hidden)
    return _seeded(seed, lambda: ResidualMLP(_n_features(data), width, len(hidden) - 1,
                                             _n_outputs(data), activation))


def _example(data) -> Tensor:
    return torch.zeros(1, _n_features(data), dtype=torch.get_default_dtype())


def _build_resmlp_map(data, hidden, density, seed, activation) -> nn.Module:
    return from_module(_build_resmlp(data, hidden, density, seed, activation), _example(data))


def _check_conv_input(data) -> None:
    if _n_features(data) < 3:
        raise MapError(f"cnn1d needs at least 3 features (its first kernel spans 5 with padding "
                       f"1), the data has {_n_features(data)}")


def _build_cnn1d(data, hidden, density, seed, activation) -> nn.Module:
    channels = _one_width("cnn1d", hidden)
    _check_conv_input(data)
    return _seeded(seed, lambda: ConvClassifier(_n_features(data), channels, _n_outputs(data),
                                                activation))


def _build_cnn1d_map(data, hidden, density, seed, activation) -> nn.Module:
    return from_module(_build_cnn1d(data, hidden, density, seed, activation), _example(data))


def _build_bigru(data, hidden, density, seed, activation) -> nn.Module:
    width = _one_width("bigru", hidden)
    return _seeded(seed, lambda: BiGRUClassifier(_n_features(data), width, _n_outputs(data)))


def _build_bigru_map(data, hidden, density, seed, activation) -> nn.Module:
    return BiGRUMap(_build_bigru(data, hidden, density, seed, activation))


def _cnn1d_count(data, hidden: tuple[int, ...]) -> int:
    c = _one_width("cnn1d", hidden)
    _check_conv_input(data)
    n_y = _n_outputs(data)
    return 6 * c + 2 * (3 * c * c + c) + c * _conv_lengths(_n_features(data))[-1] * n_y + n_y


def _bigru_count(data, hidden: tuple[int, ...]) -> int:
    h = _one_width("bigru", hidden)
    n_y = _n_outputs(data)
    return 6 * (h + h * h + 2 * h) + 2 * h * _n_features(data) * n_y + n_y


def _build_forced_map(data, hidden, density, seed, activation) -> nn.Module:
    n_x, n_y = _n_features(data), _n_outputs(data)
    target = budget(data, hidden)
    d = 1.0 if density is None else density
    dens = forced_map_densities(d)
    if d == 1.0:
        width, extra = hidden[0], 0
    else:
        width = solve_hidden_width(target, n_x, n_y, dens)
        extra = target - _forced_total(n_x, width, n_y, d)
    m = six_block_map(n_x, width, n_y, dens, activation=ACTIVATIONS[activation](),
                      extra_entries=extra, seed=seed)
    return ForcedMap(m)


def _recurrent_builder(kind: str) -> Callable[..., nn.Module]:
    def build(data, hidden, density, seed, activation) -> nn.Module:
        n_x, n_y = _n_features(data), _n_outputs(data)
        width = recurrent_width(kind, n_x, n_y, budget(data, hidden))
        return _seeded(seed, lambda: RecurrentClassifier(kind, n_x, width, n_y, activation))
    build.__name__ = f"_build_{kind}"
    return build


for _fam in (
    Family("mlp", FLAT_TASKS, "none", _build_mlp, "nn.Sequential MLP (the budget)"),
    Family("mlp_map", FLAT_TASKS, "none", _build_mlp_map, "from_mlp(MLP): its exact block-map twin",
           is_map=True),
    Family("dense_map", FLAT_TASKS, "none", _build_dense_map,
           "matched_map(MLP, density=1): dense six-block map", is_map=True, iterated=True),
    Family("sparse_map", FLAT_TASKS, "sparse", _build_sparse_map,
           "matched_map(MLP, density=d): random-sparse six-block map", is_map=True, iterated=True),
    Family("resmlp", FLAT_TASKS, "none", _build_resmlp,
           "residual MLP: h = h + act(W h) blocks between input and output layers"),
    Family("resmlp_map", FLAT_TASKS, "none", _build_resmlp_map,
           "from_module(residual MLP): its exact block-map twin", is_map=True),
    Family("cnn1d", FLAT_TASKS, "none", _build_cnn1d,
           "1-D CNN (published MNIST-1D shape; hidden = channels)", matched=False,
           count=_cnn1d_count),
    Family("cnn1d_map", FLAT_TASKS, "none", _build_cnn1d_map,
           "from_module(1-D CNN): its exact block-map twin", is_map=True, matched=False,
           count=_cnn1d_count),
    Family("bigru", FLAT_TASKS, "none", _build_bigru,
           "bidirectional GRU over the features (published MNIST-1D shape; hidden = width)",
           matched=False, count=_bigru_count),
    Family("bigru_map", FLAT_TASKS, "none", _build_bigru_map,
           "from_gru of each direction of that GRU: the same function", is_map=True,
           matched=False, count=_bigru_count),
    Family("forced_map", SEQUENCE_TASKS, "any", _build_forced_map,
           "forced (x, h, y) map over the sequence, blocks hx, hh, yh at density d", is_map=True),
    Family("rnn", SEQUENCE_TASKS, "none", _recurrent_builder("rnn"), "nn.RNN + Linear readout"),
    Family("gru", SEQUENCE_TASKS, "none", _recurrent_builder("gru"), "nn.GRU + Linear readout"),
    Family("lstm", SEQUENCE_TASKS, "none", _recurrent_builder("lstm"), "nn.LSTM + Linear readout"),
):
    register_family(_fam)
del _fam


def check_density(family: Family, density: float | None) -> float | None:
    """Validate ``density`` for ``family``; returns the normalised value."""
    if family.density == "none":
        if density is not None:
            raise MapError(f"model {family.name!r} takes no density, got {density!r}")
        return None
    if density is None:
        if family.density == "any":
            return 1.0
        raise MapError(f"model {family.name!r} needs a density in (0, 1)")
    if isinstance(density, bool) or not isinstance(density, (int, float)) or math.isnan(density):
        raise MapTypeError(f"density must be a number, got {density!r}")
    hi_ok = family.density == "any"
    if not (0 < density < 1 or (hi_ok and density == 1)):
        rng = "(0, 1]" if hi_ok else "(0, 1)"
        raise MapError(f"model {family.name!r} needs a density in {rng}, got {density!r}")
    return float(density)


def check_feasible(family: str, data: Any, *, hidden: int | Sequence[int],
                   density: float | None = None) -> None:
    """Raise :class:`~iternn.MapError` if ``family`` cannot be built at the budget of ``hidden``.

    A six-block map always holds its ``y <- x`` and ``y <- y`` blocks (``n_y n_x + n_y²``
    entries at density 1) whatever its hidden width, so a small budget can be below the
    smallest such map: e.g. ``dense_map`` on digits (64 features, 10 classes) needs more
    than the 610 parameters of a hidden-8 MLP. Also refused: ``resmlp`` widths that differ,
    and a published-shape family (``cnn1d``, ``bigru`` and their maps) given more than one
    width (or, ``cnn1d``, fewer than 3 features). Cheap (arithmetic only).
    """
    fam = FAMILIES.get(family)
    if fam is None or family not in _BUILTIN:
        return
    task = _task(data)
    widths = normalize_hidden(hidden, task)
    d = check_density(fam, density)
    n_x, n_y = _n_features(data), _n_outputs(data)
    target = budget(data, widths)
    if not fam.matched:
        fam.count(data, widths)  # a MapError naming the family
        return
    if family in ("resmlp", "resmlp_map"):
        _equal_widths(family, widths)
        return
    try:
        if family == "dense_map":
            solve_hidden_width(target, n_x, n_y, 1.0)
        elif family == "sparse_map":
            solve_hidden_width(target, n_x, n_y, d)
        elif family == "forced_map" and d < 1:
            solve_hidden_width(target, n_x, n_y, forced_map_densities(d))
    except ValueError as e:
        what = family if d is None else f"{family} at density {d:g}"
        raise MapError(f"{what}: {e}") from None


def build_model(family: str, data: Any, *, hidden: int | Sequence[int], density: float | None = None,
                seed: int = 0, activation: str | None = None, extra_steps: int = 0,
                check: bool = True) -> nn.Module:
    """Build one model of ``family`` for ``data`` at the budget ``hidden`` fixes.

    ``extra_steps`` (``dense_map``/``sparse_map`` only) iterates the map that many more
    times than ``matched_map``'s default (the MLP's number of layers): see
    :func:`live_trainable` for why that matters. With ``check=True`` (default) the
    trainable count is verified against :func:`budget` within :func:`count_tolerance`
    (a published-shape family: against its :attr:`Family.count`, exactly;
    :class:`~iternn.StudyError` otherwise; a built-in family never fails it). Raises
    :class:`~iternn.MapError` for an unknown family, a family that does not serve the
    dataset's task, a bad density, hidden width, activation or ``extra_steps``, and
    :class:`~iternn.SizeError` (a ``MemoryError``), before anything is allocated, when the
    parameters alone of a built-in family at ``hidden`` would not fit in memory
    (:func:`parameter_bytes`).
    """
    fam = FAMILIES.get(family)
    if fam is None:
        raise MapError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    task = _task(data)
    if task not in fam.tasks:
        raise MapError(f"model {family!r} serves tasks {', '.join(fam.tasks)}, not {task!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise MapError(f"seed must be an int >= 0, got {seed!r}")
    widths = normalize_hidden(hidden, task)
    d = check_density(fam, density)
    act = _activation_name(task, activation)
    if isinstance(extra_steps, bool) or not isinstance(extra_steps, int) or extra_steps < 0:
        raise MapError(f"extra_steps must be an int >= 0, got {extra_steps!r}")
    if extra_steps and not fam.iterated:
        raise MapError(f"model {family!r} takes no extra_steps (only "
                         f"{', '.join(f.name for f in FAMILIES.values() if f.iterated)} do)")
    if family in _BUILTIN:
        n, nbytes = parameter_bytes(family, data, widths)
        dtype = str(torch.get_default_dtype()).removeprefix("torch.")
        also = ", built from an MLP of as many" if _COPIES.get(family, 1) > 1 else ""
        check_bytes(nbytes, f"hidden {list(widths)} (--hidden: model {family!r} of {n:,} {dtype} "
                            f"parameters{also})")
    with torch.random.fork_rng(devices=[]):  # no builder may move the caller's global RNG
        torch.manual_seed(seed)
        model = fam.build(data, widths, d, seed, act)
    if extra_steps:
        model.steps += extra_steps
    if check and family in _BUILTIN:
        target = budget(data, widths) if fam.matched else fam.count(data, widths)
        got = count_trainable(model)
        tol = count_tolerance(family, data, widths, d)
        ok = (0 <= target - got < tol) if family == "dense_map" else abs(got - target) <= tol
        if not ok:  # pragma: no cover - a bug in a builder
            raise StudyError(f"{family}: {got} trainable entries, budget {target} (tolerance {tol})")
    return model


_BUILTIN = frozenset(FAMILIES)
#: Parameter copies alive while a built-in family is built: the maps made from an MLP hold
#: the MLP and the map at once.
_COPIES = {"mlp_map": 2, "dense_map": 2, "sparse_map": 2, "resmlp_map": 2, "cnn1d_map": 2,
           "bigru_map": 2}


def parameter_bytes(family: str, data: Any, hidden: int | Sequence[int]) -> tuple[int, int]:
    """``(parameters, bytes)``: a built-in family's trainable count at the budget of
    ``hidden`` (every family is matched to :func:`budget`, up to :func:`count_tolerance`)
    and the bytes its parameters take in the default dtype while it is built (the MLP and
    the map at once for the maps made from an MLP). Arithmetic only: a lower bound of what
    building needs (no index arrays, no activations), so it never refuses a model that fits.
    """
    fam = FAMILIES[family]
    n = budget(data, hidden) if fam.matched else fam.count(data, normalize_hidden(hidden, _task(data)))
    return n, tensor_bytes(n * _COPIES.get(family, 1), torch.get_default_dtype())


def _nonzero_at_zero(act: nn.Module | None) -> bool:
    if act is None:
        return False
    try:
        with torch.no_grad():
            return bool(act(torch.zeros(1)).ne(0).any())
    except Exception:  # noqa: BLE001 - unknown module: assume it can be non-zero
        return True


def live_trainable(model: nn.Module) -> int:
    """Trainable entries that can influence the output (the *live* ones).

    For a :class:`~iternn.MapModule` (input held, Jacobi update, other slots starting at
    zero, ``steps`` applications) a block ``F[d, s]`` is live when, at some application
    ``k``, its source ``s`` can be non-zero at ``k - 1`` and slot ``d`` at ``k`` can still
    reach the output by application ``steps``; a slot bias is live when its slot can reach
    the output. Everything else gets no gradient, ever. Example: ``matched_map`` of a
    one-hidden-layer MLP runs 2 applications, so in its six-block ``(x, h, y)`` map the
    blocks ``F[h, h]`` and ``F[h, y]`` are dead (``h`` at application 2 is never read): at
    low density they hold most of the "matched" budget. One more application
    (``extra_steps=1``) makes every block live. Any other model: :func:`count_trainable`
    (all of it; a forced map over ``T >= 2`` steps uses all its blocks).
    """
    from ..engine.map_module import MapModule

    if not isinstance(model, MapModule):
        return count_trainable(model)
    m, inp, out, steps = model.map, model.input, model.output, model.steps
    slots = list(m.slots)
    # (destination, one source) per block and source; blocks into a held slot never run
    edges = [(d, s) for d, src in m.edges if d != inp for s in source_slots(src)]
    blocks = [(d, src) for d, src in m.edges if d != inp]
    nonzero = [{s: s == inp for s in slots}]
    for _ in range(steps):
        prev = nonzero[-1]
        cur = {}
        for d in slots:
            if d == inp:
                cur[d] = True
                continue
            cur[d] = (m.bias(d) is not None or _nonzero_at_zero(m.activation(d))
                      or any(prev[s] for dd, s in edges if dd == d))
        nonzero.append(cur)
    reach = [dict.fromkeys(slots, False) for _ in range(steps + 1)]
    reach[steps][out] = True
    for k in range(steps, 0, -1):
        for d, s in edges:
            if reach[k][d]:
                reach[k - 1][s] = True
        if inp in slots and reach[k][inp]:
            reach[k - 1][inp] = True
    live = 0
    for d, src in blocks:  # a block reading several slots is live through any of them
        if any(nonzero[k - 1][s] and reach[k][d] for k in range(1, steps + 1)
               for s in source_slots(src)):
            live += count_trainable(m.block(d, src))
    for d in slots:
        b = m.bias(d)
        if d != inp and b is not None and b.requires_grad and any(reach[k][d] for k in range(1, steps + 1)):
            live += b.numel()
    return live
