"""The block dependency graph of a map, read from structure alone.

An edge ``(d, s)`` means block ``F[d, s]`` exists: destination slot ``d`` (row) reads
source slot ``s`` (column). Everything here works on slot names only, never on tensors,
so it is cheap and exact: impulse-response lengths, evaluation levels and the strongly
connected components the engine schedules by.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from ..errors import MapError

__all__ = ["BlockGraph"]


@dataclass(frozen=True)
class BlockGraph:
    """Slots (in order) and the edges ``(destination, source)`` between them."""

    slots: tuple[str, ...]
    edges: tuple[tuple[str, str], ...]
    _sources: Mapping[str, tuple[str, ...]] = field(init=False, repr=False, compare=False)
    _targets: Mapping[str, tuple[str, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        sources: dict[str, list[str]] = {s: [] for s in self.slots}
        targets: dict[str, list[str]] = {s: [] for s in self.slots}
        for dst, src in self.edges:
            if dst not in sources or src not in sources:
                raise MapError(f"edge {dst!r} <- {src!r} names a slot that is not in the graph")
            sources[dst].append(src)
            targets[src].append(dst)
        object.__setattr__(self, "_sources", {k: tuple(v) for k, v in sources.items()})
        object.__setattr__(self, "_targets", {k: tuple(v) for k, v in targets.items()})

    def sources(self, slot: str) -> tuple[str, ...]:
        """Slots that ``slot`` reads (its row's non-zero columns)."""
        return self._sources[slot]

    def targets(self, slot: str) -> tuple[str, ...]:
        """Slots that read ``slot`` (its column's non-zero rows)."""
        return self._targets[slot]

    def without_inputs_to(self, frozen: Iterable[str]) -> BlockGraph:
        """The graph seen by an iteration that never updates ``frozen`` slots.

        Held and forced slots keep (or are given) their value, so the blocks that write
        into them are never evaluated: dropping those edges is exactly their effect.
        """
        frozen = set(frozen)
        return BlockGraph(self.slots, tuple(e for e in self.edges if e[0] not in frozen))

    def components(self) -> list[tuple[str, ...]]:
        """Strongly connected components in dependency order (sources first).

        Tarjan's algorithm (iterative); each component lists its slots in slot order.
        A component that feeds another always comes before it.
        """
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        on_stack: set[str] = set()
        stack: list[str] = []
        found: list[tuple[str, ...]] = []
        counter = 0
        order = {s: i for i, s in enumerate(self.slots)}
        for root in self.slots:
            if root in index:
                continue
            work = [(root, iter(self._targets[root]))]
            index[root] = low[root] = counter
            counter += 1
            stack.append(root)
            on_stack.add(root)
            while work:
                node, it = work[-1]
                advanced = False
                for nxt in it:
                    if nxt not in index:
                        index[nxt] = low[nxt] = counter
                        counter += 1
                        stack.append(nxt)
                        on_stack.add(nxt)
                        work.append((nxt, iter(self._targets[nxt])))
                        advanced = True
                        break
                    if nxt in on_stack:
                        low[node] = min(low[node], index[nxt])
                if advanced:
                    continue
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        comp.append(top)
                        if top == node:
                            break
                    found.append(tuple(sorted(comp, key=order.__getitem__)))
        # Tarjan on successor edges emits sinks first; reverse for sources first.
        found.reverse()
        return found

    def is_cyclic(self, component: Sequence[str]) -> bool:
        """Whether a component contains a cycle (more than one slot, or a self-loop)."""
        return len(component) > 1 or component[0] in self._sources[component[0]]

    def is_acyclic(self) -> bool:
        """True when no slot can reach itself (the map is nilpotent in structure)."""
        return not any(self.is_cyclic(c) for c in self.components())

    def levels(self, frozen: Iterable[str] = ()) -> dict[str, int] | None:
        """Applications after which each slot is final, or ``None`` if there is a cycle.

        ``frozen`` slots (held or forced) are final from the start: level 0. Every other
        slot ``d`` is final one application after all of its sources are, so
        ``level(d) = 1 + max(level(s))`` (a slot with no sources is ``act(b)`` after one
        application: level 1). Evaluating slots in level order, each once, therefore
        gives the state of any iteration of at least ``max(levels)`` applications.
        """
        frozen = set(frozen)
        graph = self.without_inputs_to(frozen)
        if not graph.is_acyclic():
            return None
        level: dict[str, int] = {}
        for (slot,) in graph.components():
            level[slot] = 0 if slot in frozen else 1 + max(
                (level[s] for s in graph.sources(slot)), default=0
            )
        return level

    def longest_path(self) -> float:
        """Length (in blocks) of the longest path, or ``math.inf`` with a cycle."""
        dist: dict[str, int] = {}
        if not self.is_acyclic():
            return math.inf
        for (slot,) in self.components():
            dist[slot] = max((dist[s] + 1 for s in self._sources[slot]), default=0)
        return max(dist.values(), default=0)

    def impulse_response_length(self, hold: Iterable[str] = ()) -> float:
        """How many applications a perturbation of the initial state is felt for.

        For an acyclic map this is the longest path ``L``: a perturbation travels one
        block per application, so it reaches the end of the longest path at application
        ``L`` and has left the state at application ``L + 1`` (paper §4.3.1, eq. 39). A
        cycle keeps it forever (``math.inf``), and so does holding a slot that feeds any
        block: the held value is re-injected at every application, which is
        the effect of the identity block on x (eq. 50, infinite impulse response).
        """
        held = set(hold)
        if any(self._targets[s] for s in held):
            return math.inf
        return self.without_inputs_to(held).longest_path()
