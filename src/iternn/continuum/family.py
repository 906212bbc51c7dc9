"""The map family the continuum instrument moves along, and the model it trains.

:func:`feedback_map` is an MLP map (:func:`iternn.from_mlp`) of ``L`` weight layers on
the slots ``x, h1 … h_{L-1}, y`` with two additions:

* **feedback blocks** on the first block super-diagonal, one per forward block and
  mirroring it: ``F[x, h1], F[h1, h2], …, F[h_{L-1}, y]`` (row = destination, column =
  source: each slot reads the next slot of the chain). Each is ``α V_i`` with ``V_i``
  a fixed random matrix drawn from the seed as ``nn.Linear`` draws its weights
  (``U(-1/√fan_in, 1/√fan_in)``), the same ``V_i`` for every ``α``. They are **not
  trainable**: every point of the continuum has exactly the MLP's trainable
  parameters, and ``α`` stays the feedback's strength after training. ``α = 0`` connects
  none of them (a zero block is no block): the map is the MLP map, nilpotent;
  ``α > 0`` closes a cycle between every two neighbouring slots (recurrence).
* the **identity block** ``F[x, x] = I`` (eq. 50), which keeps a held input. A forced
  input (the input slot overwritten before every application) never evaluates it, nor
  ``F[x, h1]``; a held one (written once per input) evaluates both:
  ``x ← x + α V_0 h1``.

:class:`ContinuumNet` runs such a map over a sequence (``(batch, T, features)``) with the
four knobs of the continuum: ``k`` applications per input, the initial-vector policy,
held or forced input, and ``α`` (in the map). Its output is ``y`` after the last input.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..convert.mlp import from_mlp
from ..core.block_map import BlockMap
from ..dynamics.memory import feed_inputs
from ..errors import DynamicsError, MapError
from ..study.models import ACTIVATIONS, make_mlp
from .config import MODES, POLICIES

__all__ = ["POLICIES", "MODES", "feedback_map", "initial_state", "ContinuumNet"]

#: Salts of the seeded draws (feedback blocks, random initial vector).
_SALT_FEEDBACK = 7919
_SALT_INITIAL = 104729


def _slot_names(layers: int) -> list[str]:
    return ["x", *(f"h{i}" for i in range(1, layers)), "y"]


def feedback_map(sizes: Sequence[int], *, alpha: float, seed: int = 0,
                 activation: str = "tanh") -> BlockMap:
    """The continuum's map: an MLP map with feedback ``α V`` and the identity block on ``x``.

    Args:
        sizes: ``[n_x, h_1, …, h_{L-1}, n_y]``, the MLP's widths (``L >= 1`` layers).
        alpha: the feedback scale ``α >= 0`` (``0``: no feedback block at all).
        seed: draws the forward weights (as :func:`iternn.study.models.make_mlp` does,
            under a forked global RNG seeded with ``seed``: the MLP of that seed) and the
            fixed feedback matrices ``V_i`` (from a ``torch.Generator``).
        activation: of the hidden slots, a name of :data:`iternn.study.models.ACTIVATIONS`.

    Returns:
        The :class:`~iternn.BlockMap` (float32, the default dtype), slots ``x, h1 …
        h_{L-1}, y``; its trainable parameters are exactly the MLP's.

    Raises:
        MapError: fewer than two sizes, a size below 1, a bad ``alpha``, ``seed`` or
            ``activation`` (the message names it).
    """
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence) or len(sizes) < 2:
        raise MapError(f"sizes must list at least two widths [n_x, ..., n_y], got {sizes!r}")
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes):
        raise MapError(f"sizes must be ints >= 1, got {list(sizes)}")
    if (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
            or not math.isfinite(alpha) or alpha < 0):
        raise MapError(f"alpha must be a finite number >= 0, got {alpha!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise MapError(f"seed must be an int >= 0, got {seed!r}")
    if activation not in ACTIVATIONS:
        raise MapError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    sizes = list(sizes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mlp = make_mlp(sizes[0], sizes[1:-1], sizes[-1], activation)
    m = from_mlp(mlp).map
    names = _slot_names(len(sizes) - 1)
    gen = torch.Generator().manual_seed((seed * 1_000_003 + _SALT_FEEDBACK) % (1 << 63))
    for dst, src in zip(names, names[1:]):
        fan_in, bound = m.slots[src], 1.0 / math.sqrt(m.slots[src])
        v = torch.empty(m.slots[dst], fan_in).uniform_(-bound, bound, generator=gen)
        if alpha > 0:
            block = nn.Linear(fan_in, m.slots[dst], bias=False)
            block.weight.data.copy_(alpha * v)
            block.weight.requires_grad_(False)
            m.connect(dst, src, block)
    m.connect("x", "x", nn.Identity())
    return m


def initial_state(m: BlockMap, policy: str, *, input: str = "x",
                  seed: int = 0) -> dict[str, Tensor] | None:
    """The initial vector of ``policy`` (:data:`POLICIES`: ``"zeros"`` resets the state to
    zeros before every input, ``"carried"`` carries it from the previous input, the first
    starting from zeros, ``"random"`` resets it to one fixed random vector) for every
    slot but ``input``: ``None`` (zeros)
    for ``"zeros"`` and ``"carried"``, one ``N(0, 1)`` draw per unit (the slots' shapes,
    the map's dtype, drawn from ``seed``) for ``"random"``."""
    if policy not in POLICIES:
        raise MapError(f"policy must be one of {POLICIES}, got {policy!r}")
    if policy != "random":
        return None
    gen = torch.Generator().manual_seed((seed * 1_000_003 + _SALT_INITIAL) % (1 << 63))
    dtype = next((p.dtype for p in m.parameters() if p.is_floating_point()),
                 torch.get_default_dtype())
    return {s: torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
            for s, shape in m.shapes.items() if s != input}


class ContinuumNet(nn.Module):
    """A map run over a sequence with the continuum's knobs; ``(B, T, F) -> (B, n_y)``.

    Each of the ``T`` inputs is written into ``input`` (``mode``: forced or held) and
    followed by ``applications`` applications (:func:`iternn.dynamics.feed_inputs`); the
    state between inputs follows ``policy`` (:data:`POLICIES`). The output is ``output``
    after the last input. With a policy that resets the state (``"zeros"``,
    ``"random"``) the output depends on the last input only, so only that one is run.
    The random initial vector is kept as buffers (``z0_0, z0_1, …``, slots in map order).
    """

    def __init__(self, map: BlockMap, *, applications: int, policy: str = "carried",
                 mode: str = "forced", input: str = "x", output: str = "y",
                 seed: int = 0) -> None:
        super().__init__()
        if not isinstance(map, BlockMap):
            raise MapError(f"map must be a BlockMap, got {type(map).__name__}")
        if isinstance(applications, bool) or not isinstance(applications, int) or applications < 1:
            raise MapError(f"applications must be an int >= 1, got {applications!r}")
        if mode not in MODES:
            raise MapError(f"mode must be one of {MODES}, got {mode!r}")
        for role, slot in (("input", input), ("output", output)):
            if slot not in map.slots:
                raise MapError(f"{role} slot {slot!r} is not a slot of the map {list(map.slots)}")
        self.map = map
        self.applications = applications
        self.policy = policy
        self.mode = mode
        self.input = input
        self.output = output
        z0 = initial_state(map, policy, input=input, seed=seed) or {}
        self._z0_slots = tuple(z0)
        for i, v in enumerate(z0.values()):
            self.register_buffer(f"z0_{i}", v)

    def initial(self) -> dict[str, Tensor] | None:
        """The initial vector (``None``: zeros)."""
        if not self._z0_slots:
            return None
        return {s: getattr(self, f"z0_{i}") for i, s in enumerate(self._z0_slots)}

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 3:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise DynamicsError(f"ContinuumNet needs a (batch, time, features) tensor, got {shape}")
        seq = x.transpose(0, 1)
        carry = self.policy == "carried"
        if not carry:
            seq = seq[-1:]
        out = feed_inputs(self.map, seq, applications=self.applications, carry=carry,
                          held=self.mode == "held", input=self.input, state=self.initial())
        return out[self.output][-1]

    def extra_repr(self) -> str:
        return (f"applications={self.applications}, policy={self.policy!r}, "
                f"mode={self.mode!r}, input={self.input!r}, output={self.output!r}")
