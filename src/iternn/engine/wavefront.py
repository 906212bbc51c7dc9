"""The wavefront: an acyclic map evaluated slot by slot, each slot once.

Without a cycle (the frozen slots' incoming blocks left out), slot ``d`` is final one
application after all its sources are (its level, see :meth:`BlockGraph.levels`), and
after ``depth`` applications, the deepest level, the state no longer changes. Each block
row, ``z_d = act_d(b_d + sum_s F[d, s](z_s))``, is then evaluated once, from the final
values of its sources.

:class:`Wavefront` is for acyclic structure and enough applications: each slot is
evaluated once, when its sources are final (see :meth:`BlockGraph.levels`), in a
topological order that follows slot order where it may (so modules that draw random
numbers draw them in the order the slots were declared). This is provably the state
after any number of applications ``>= depth``.

**Liveness.** Asked for some slots only (``iterate(..., outputs=...)``), the wavefront
still computes every slot (a converted model's unused layer calls keep their random
draws and running statistics) and drops values after their last reader.
"""

from __future__ import annotations

import heapq

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import profiler as autograd_profiler
from torch.autograd.profiler import record_function

from ..core.block_map import BlockMap
from ..core.state import parameter_spec
from .plan import (
    _activation_function,
    _Eval,
    _evaluate,
    _kept,
    _plain,
    _reads,
    _sum,
    _unused,
    _zero_gradients,
    _ZeroFilled,
    compile_destinations,
)

__all__ = ["Wavefront"]


class Wavefront:
    """Each slot evaluated once, in a topological order (acyclic structure only).

    ``zero``: frozen slots that are left out of the state (zero). A slot whose blocks
    read only zeros comes out zero (see :mod:`iternn.engine.plan`) and is not evaluated.

    Called with ``keep`` (the slots the caller reads afterwards, e.g. a model's
    outputs), a slot's value is dropped as soon as its last reader has run, so memory
    is reused while the wavefront advances, as in the source model's own forward; the
    result then holds only ``keep`` and the frozen slots given.
    """

    def __init__(self, m: BlockMap, frozen: frozenset[str], depth: int,
                 zero: frozenset[str] = frozenset()) -> None:
        dests = compile_destinations(m)
        self.frozen = frozen
        self.depth = depth  # applications after which the state is final
        self._shapes = dict(m.shapes)
        z = set(zero)
        evals = []
        for s in _topological(m, frozen):
            d = dests[s]
            terms = _kept(d.terms, z)
            if d.zeroable and not terms:
                z.add(s)
                continue
            reads = _reads(terms)
            evals.append(_Eval(d, _sum(s, terms), tuple(x for x in reads if x in z)))
        self.zero = frozenset(z)  # slots that are zero in the result
        self.order = tuple(ev.dest for ev in evals)
        self._skipped = tuple(_unused([dests[s] for s in m.slots if s not in frozen],
                                      {t.key for ev in evals for t in ev.sum.terms}).values())
        self._zeros = bool(self.zero) or any(ev.fill for ev in evals)  # made in a call
        # One linear block into a slot (the MLP case): precompiled to a fused matmul.
        self.steps = tuple(
            (ev.dest.slot, ev.sum.terms[0].src, ev.sum.terms[0].module, ev.dest.biases,
             _activation_function(ev.dest.act), ev)
            if len(ev.sum.terms) == 1 and ev.sum.terms[0].linear and not ev.fill
            else (ev.dest.slot, None, None, None, None, ev)
            for ev in evals
        )
        # The dtype/device inputs must have (checked per call by MapModule's fast path).
        self.dtype, self.device = parameter_spec(m)
        self._releases: dict[frozenset[str], tuple[tuple[str, ...], ...]] = {}

    def _release_after(self, keep: frozenset[str]) -> tuple[tuple[str, ...], ...]:
        """Per step, the computed slots nobody reads after it (and not kept)."""
        plan = self._releases.get(keep)
        if plan is None:
            last: dict[str, int] = {}
            for i, (slot, *_, ev) in enumerate(self.steps):
                last[slot] = i  # a slot nobody reads is dropped right after it is computed
                for src in _reads(ev.sum.terms):
                    if src not in self.frozen and src not in self.zero:
                        last[src] = i
            drop: list[list[str]] = [[] for _ in self.steps]
            for slot, i in last.items():
                if slot not in keep:
                    drop[i].append(slot)
            plan = self._releases[keep] = tuple(tuple(x) for x in drop)
        return plan

    def __call__(self, values: dict[str, Tensor], kwargs, ref: Tensor, batch,
                 keep: frozenset[str] | None = None) -> dict[str, Tensor]:
        if autograd_profiler._is_profiler_enabled and torch.autograd._profiler_enabled():
            with record_function("iternn.wavefront"):
                return self._run(values, kwargs, ref, batch, keep, True)
        return self._run(values, kwargs, ref, batch, keep, False)

    def _run(self, values, kwargs, ref, batch, keep, prof) -> dict[str, Tensor]:
        values = dict(values)
        drops = self._release_after(keep) if keep is not None else None
        zeros = _ZeroFilled({}, self._shapes, ref, batch) if self._zeros else None
        for i, (slot, src, lin, biases, act, ev) in enumerate(self.steps):
            if lin is None or prof or kwargs or not _plain(lin):
                for s in ev.fill:  # (a fast step reads no zeros)
                    values[s] = zeros[s]
                values[slot] = _evaluate(ev, values, kwargs, ref, batch, prof)
            else:
                params = lin._parameters
                b, wb = biases.get(slot), params["bias"]
                if b is None:
                    b = wb
                elif wb is not None:
                    b = wb + b
                out = F.linear(values[src], params["weight"], b)
                values[slot] = out if act is None else act(out)
            if drops is not None:
                for dead in drops[i]:
                    del values[dead]
        if zeros is not None:
            for s in self.zero:  # (a value given for a computed slot is an old one)
                if keep is None or s in keep:
                    values[s] = zeros[s]
                elif s not in self.frozen:
                    values.pop(s, None)
        if self._skipped:
            return _zero_gradients(values, self._skipped, self.frozen)
        return values


def _topological(m: BlockMap, frozen: frozenset[str]) -> list[str]:
    """The slots that are not frozen, in a topological order of the acyclic graph left
    after freezing: each after its sources, and otherwise in slot order (Kahn's algorithm
    taking the first ready slot each time)."""
    graph = m.graph().without_inputs_to(frozen)
    index = {s: i for i, s in enumerate(m.slots)}
    waiting = {s: {x for x in graph.sources(s) if x not in frozen} for s in m.slots if s not in frozen}
    ready = [index[s] for s, deps in waiting.items() if not deps]
    heapq.heapify(ready)
    names = list(m.slots)
    order: list[str] = []
    while ready:
        s = names[heapq.heappop(ready)]
        order.append(s)
        for t in graph.targets(s):
            deps = waiting.get(t)
            if deps and s in deps:
                deps.discard(s)
                if not deps:
                    heapq.heappush(ready, index[t])
    return order
