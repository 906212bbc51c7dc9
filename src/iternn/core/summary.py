"""Counting what training can change, and the per-block summary of a map.

A module may define ``trainable_counts() -> {parameter name: int}`` for its own direct
parameters (the :class:`~iternn.core.protocols.CountsTrainable` protocol) to say how
many of their entries training can change (a masked weight counts its mask, not its
storage). Everything else counts ``numel``. Shared tensors count once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from ..errors import MapError
from .protocols import CountsTrainable

if TYPE_CHECKING:
    from .block_map import BlockMap

__all__ = ["count_trainable", "count_entries", "BlockRow", "Summary", "summarize"]


def count_entries(module: nn.Module) -> tuple[int, int, int]:
    """``(trainable, fixed, stored)`` entries of ``module``'s parameters, shared ones once.

    *trainable*: entries training can change (``requires_grad`` and not masked out);
    *fixed*: effective entries of parameters with ``requires_grad=False``; *stored*: the
    parameters' storage (``numel``), which is larger for masked weights.
    """
    seen: set[int] = set()
    trainable = fixed = stored = 0
    for mod in module.modules():
        own = mod.trainable_counts() if isinstance(mod, CountsTrainable) else {}
        for name, p in mod._parameters.items():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            effective = int(own.get(name, p.numel()))
            stored += int(p.numel())
            if p.requires_grad:
                trainable += effective
            else:
                fixed += effective
    return trainable, fixed, stored


def count_trainable(module: nn.Module) -> int:
    """Entries of ``module``'s parameters that training can change (a Python int)."""
    return count_entries(module)[0]


@dataclass(frozen=True)
class BlockRow:
    """One block ``F[dst, src]`` (or a slot bias, ``kind == "bias"``) of a summary."""

    dst: str
    src: str | tuple[str, ...] | None  # a tuple for a block reading several slots
    kind: str
    shape: tuple[int, int]
    trainable: int
    fixed: int
    stored: int
    backend: str
    #: Effective weight entries per entry of the ``rows x cols`` block (biases not
    #: counted); ``None`` for modules that are not a weight matrix (a transformer layer,
    #: a nested map, a slot bias).
    density: float | None


@dataclass(frozen=True)
class Summary:
    """Per-block counts of a map; ``str()`` gives the table."""

    slots: tuple[tuple[str, int], ...]  # name and size
    rows: tuple[BlockRow, ...]
    activations: tuple[tuple[str, str], ...]
    impulse_response_length: float
    #: ``(trainable, fixed, stored)`` of the whole map; a tensor shared by several
    #: blocks (weight tying) counts once here but in every row that uses it.
    totals: tuple[int, int, int]
    #: name and shape of every slot (``(n,)`` for a vector slot)
    shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()

    @property
    def trainable(self) -> int:
        return self.totals[0]

    @property
    def fixed(self) -> int:
        return self.totals[1]

    @property
    def stored(self) -> int:
        return self.totals[2]

    def block(self, dst: str, src: str | tuple[str, ...]) -> BlockRow:
        src = tuple(src) if isinstance(src, list) else src
        for r in self.rows:
            if r.dst == dst and r.src == src:
                return r
        raise MapError(f"there is no block {dst!r} <- {src!r}")

    @property
    def hidden_proportion(self) -> float | None:
        """``n_hh / (n_hx + n_hh)``: the recurrent share of the ``h`` slot's trainable inputs.

        A reconstruction of the "hidden proportion" of arXiv 2509.15057
        from its configurations, defined for maps with slots ``x`` and ``h``.
        """
        names = dict(self.slots)
        if "x" not in names or "h" not in names:
            return None
        n = {r.src: r.trainable for r in self.rows if r.dst == "h" and r.kind != "bias"}
        hh, hx = n.get("h", 0), n.get("x", 0)
        return hh / (hx + hh) if hx + hh else None

    def __str__(self) -> str:
        acts = dict(self.activations)
        lines = ["slot       size  activation"]
        lines += [
            f"{s:<10} {shape[0] if len(shape) == 1 else 'x'.join(map(str, shape)):>4}  "
            f"{acts.get(s, 'identity')}"
            for s, shape in (self.shapes or tuple((s, (n,)) for s, n in self.slots))
        ]
        lines.append("")
        head = (f"{'block (dst <- src)':<22} {'kind':<20} {'shape':>11} {'density':>8} "
                f"{'trainable':>11} {'fixed':>9} {'stored':>11}  backend")
        lines.append(head)
        for r in self.rows:
            src = r.src if r.src is None or isinstance(r.src, str) else ",".join(r.src)
            name = f"{r.dst} <- {src}" if r.src is not None else f"bias {r.dst}"
            shape = f"{r.shape[0]}x{r.shape[1]}"
            density = f"{r.density:.3f}" if r.density is not None else "-"
            lines.append(
                f"{name:<22} {r.kind:<20} {shape:>11} {density:>8} {r.trainable:>11,} "
                f"{r.fixed:>9,} {r.stored:>11,}  {r.backend}"
            )
        lines.append(
            f"{'total':<22} {'':<20} {'':>11} {'':>8} {self.trainable:>11,} {self.fixed:>9,} "
            f"{self.stored:>11,}"
        )
        hp = self.hidden_proportion
        extra = f"; hidden proportion n_hh/(n_hx+n_hh) = {hp:.3f}" if hp is not None else ""
        lines.append(f"impulse-response length: {self.impulse_response_length}{extra}")
        return "\n".join(lines)


def _density(block: nn.Module, shape: tuple[int, int]) -> float | None:
    """Weight entries per matrix entry, for blocks that are a weight matrix."""
    area = shape[0] * shape[1]
    if type(block) is nn.Linear:
        return 1.0
    if isinstance(block, CountsTrainable):
        counts = block.trainable_counts()
        return sum(int(v) for k, v in counts.items() if k != "bias") / area
    return None


def summarize(m: BlockMap) -> Summary:
    """The summary of a block map: every block, then every slot bias and activation."""
    rows = []
    for dst, src in m.edges:
        block = m.block(dst, src)
        t, f, s = count_entries(block)
        backend = getattr(block, "backend", None)
        if backend is None:
            backend = "dense" if type(block) is nn.Linear else "module"
        srcs = (src,) if isinstance(src, str) else src
        shape = (m.slots[dst], sum(m.slots[s] for s in srcs))
        rows.append(BlockRow(dst, src, type(block).__name__, shape, t, f, s, str(backend),
                             _density(block, shape)))
    for slot in m.slots:
        bias = m.bias(slot)
        if bias is not None:
            n = int(bias.numel())
            rows.append(BlockRow(slot, None, "bias", (m.slots[slot], 1),
                                 n if bias.requires_grad else 0,
                                 0 if bias.requires_grad else n, n, "dense", None))
        act = m.activation(slot)
        if act is not None and any(True for _ in act.parameters()):
            t, f, s = count_entries(act)
            rows.append(BlockRow(slot, None, f"activation {type(act).__name__}",
                                 (m.slots[slot], 1), t, f, s, "module", None))
    acts = tuple((s, type(m.activation(s)).__name__) for s in m.slots if m.activation(s) is not None)
    return Summary(tuple(m.slots.items()), tuple(rows), acts, m.impulse_response_length(),
                   count_entries(m), tuple(m.shapes.items()))
