"""Random block maps and a step-by-step reference iteration for the tests.

The reference applies ``BlockMap.forward`` (one Jacobi application, no plan) again and
again, re-writing held and forced slots by hand; the engine's plans must agree with it.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st
from torch import nn

import iternn

ACTIVATIONS = [None, nn.Tanh, nn.ReLU, nn.Sigmoid, nn.GELU, nn.SiLU, nn.ELU]


@st.composite
def random_maps(draw, max_slots: int = 4, max_size: int = 4, acyclic: bool | None = None):
    """A random BlockMap (float64) with linear or activation-terminated blocks."""
    n = draw(st.integers(1, max_slots))
    names = [f"s{i}" for i in range(n)]
    sizes = [draw(st.integers(1, max_size)) for _ in names]
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    m = iternn.BlockMap(dict(zip(names, sizes)))
    pairs = [(d, s) for d in range(n) for s in range(n)]
    if acyclic is True:
        pairs = [(d, s) for d, s in pairs if d > s]
    chosen = draw(st.lists(st.sampled_from(pairs), unique=True, max_size=len(pairs))) if pairs else []
    if acyclic is False and (0, 0) not in chosen:
        chosen.append((0, 0))
    for d, s in chosen:
        kind = draw(st.sampled_from(["linear", "linear_bias", "seq"]))
        lin = nn.Linear(sizes[s], sizes[d], bias=kind == "linear_bias")
        with torch.no_grad():
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.7)
            if lin.bias is not None:
                lin.bias.copy_(torch.randn(lin.bias.shape, generator=g))
        block = nn.Sequential(lin, nn.Tanh()) if kind == "seq" else lin
        m.connect(names[d], names[s], block)
    for i, name in enumerate(names):
        act = draw(st.sampled_from(ACTIVATIONS))
        m.set_activation(name, act() if act else None)
        if draw(st.booleans()):
            m.set_bias(name, torch.randn(sizes[i], generator=g))
    return m.double()


class GatedConv(nn.Module):
    """``conv(a) * sigmoid(b)`` on feature maps: a two-source, sample-wise, non-linear block."""

    samplewise = True

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, a, b):
        return self.conv(a) * torch.sigmoid(b)


def random_state(m: iternn.BlockMap, batch=(3,), seed: int = 0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return {
        s: torch.randn(*batch, n, generator=g, dtype=torch.float64).requires_grad_(requires_grad)
        for s, n in m.slots.items()
    }


def reference_iterate(m, state, steps, hold=(), force=None, inner=1, trajectory=False,
                      update="jacobi"):
    """Step-by-step iteration with ``BlockMap.forward`` and hand-written hold/force."""
    cur = dict(state)
    states = []
    frozen = set(hold) | set(force or {})
    order = _sweep_order(m, frozen) if update == "ordered" else None
    for t in range(steps):
        if force:
            cur = dict(cur)
            for s, seq in force.items():
                cur[s] = seq[t]
        for _ in range(inner):
            if order is None:
                new = m(cur)
            else:  # ordered: Gauss-Seidel, slot by slot (components in dependency order,
                # slot order inside one), each reading the newest values
                new = dict(cur)
                for comp in order:
                    for d in comp:
                        if d not in frozen:
                            new[d] = m(new)[d]
            for s in frozen:
                new[s] = cur[s]
            cur = new
        states.append(cur)
    if trajectory:
        return {s: torch.stack([c[s] for c in states]) for s in m.slots}
    return cur


def _sweep_order(m, frozen):
    """Strongly connected components in dependency order, by brute force (independent of
    the library's graph code): mutual reachability, then Kahn's algorithm."""
    names = list(m.slots)
    edges = {(d, s) for d, src in m.edges if d not in frozen
             for s in ((src,) if isinstance(src, str) else src)}
    reach = {a: {a} for a in names}
    changed = True
    while changed:  # transitive closure: reach[a] = slots a feeds, directly or not
        changed = False
        for d, s in edges:
            for a in names:
                if s in reach[a] and d not in reach[a]:
                    reach[a].add(d)
                    changed = True
    comps = []
    for a in names:
        comp = tuple(b for b in names if b in reach[a] and a in reach[b])
        if comp not in comps:
            comps.append(comp)
    ordered = []
    while comps:
        for c in comps:
            feeders = [o for o in comps if o is not c and any(x in reach[o[0]] for x in c)]
            if not feeders:
                ordered.append(c)
                comps.remove(c)
                break
    return ordered
