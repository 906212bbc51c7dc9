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

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..convert.mlp import from_mlp
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
    "FAMILIES",
    "FLAT_TASKS",
    "Family",
    "ForcedMap",
    "RecurrentClassifier",
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
    (``0 < d <= 1``, default 1).
    """

    name: str
    tasks: tuple[str, ...]
    density: str
    build: Callable[..., nn.Module]
    description: str = ""
    is_map: bool = False
    iterated: bool = False  # takes extra_steps (a held-input map iterated a fixed number of times)


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
    than the 610 parameters of a hidden-8 MLP. Cheap (arithmetic only).
    """
    fam = FAMILIES.get(family)
    if fam is None or family not in _BUILTIN:
        return
    task = _task(data)
    widths = normalize_hidden(hidden, task)
    d = check_density(fam, density)
    n_x, n_y = _n_features(data), _n_outputs(data)
    target = budget(data, widths)
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
    (:class:`~iternn.StudyError` otherwise; a built-in family never fails it). Raises
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
        target = budget(data, widths)
        got = count_trainable(model)
        tol = count_tolerance(family, data, widths, d)
        ok = (0 <= target - got < tol) if family == "dense_map" else abs(got - target) <= tol
        if not ok:  # pragma: no cover - a bug in a builder
            raise StudyError(f"{family}: {got} trainable entries, budget {target} (tolerance {tol})")
    return model


_BUILTIN = frozenset(FAMILIES)
#: Parameter copies alive while a built-in family is built: the maps made from an MLP hold
#: the MLP and the map at once.
_COPIES = {"mlp_map": 2, "dense_map": 2, "sparse_map": 2}


def parameter_bytes(family: str, data: Any, hidden: int | Sequence[int]) -> tuple[int, int]:
    """``(parameters, bytes)``: a built-in family's trainable count at the budget of
    ``hidden`` (every family is matched to :func:`budget`, up to :func:`count_tolerance`)
    and the bytes its parameters take in the default dtype while it is built (the MLP and
    the map at once for the maps made from an MLP). Arithmetic only: a lower bound of what
    building needs (no index arrays, no activations), so it never refuses a model that fits.
    """
    n = budget(data, hidden)
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
