"""The step plan: the map applied one application at a time.

One application computes ``z'_d = act_d(b_d + sum_s F[d, s](z_s))`` for every slot
``d`` that is not frozen (held or forced): in the Jacobi update every block reads the
state before the application; in the ordered sweep (``update="ordered"``, Gauss-Seidel)
the slots are taken component by component in dependency order, each reading the newest
values.

:class:`StepPlan` runs one application at a time (inner applications per forcing step,
unforced cyclic maps such as equilibrium iterations).

**Liveness.** Asked for some slots only (``iterate(..., outputs=...)``), a step plan
evaluates in each application only what a later application, or the result, reads.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.autograd import profiler as autograd_profiler
from torch.autograd.profiler import record_function

from ..core.block_map import BlockMap
from .plan import (
    _Eval,
    _evaluate,
    _kept,
    _reads,
    _sum,
    _unused,
    _zero_gradients,
    _ZeroFilled,
    compile_destinations,
)

__all__ = ["StepPlan"]


class _Application:
    """One application specialised to the slots zero before it and the slots wanted
    after it: ``evals`` in sweep order; ``needs``, the computed slots it reads from the
    state before it; ``skipped``, the blocks into its slots that it does not evaluate."""

    def __init__(self, evals: tuple[_Eval, ...], needs: frozenset[str], ordered: bool) -> None:
        self.evals = evals
        self.needs = needs
        self.ordered = ordered
        self.fill = tuple(dict.fromkeys(s for ev in evals for s in ev.fill))
        self.computed = tuple(ev for ev in evals if ev.sum is not None)
        self.cleared = tuple(ev.dest.slot for ev in evals if ev.sum is None)
        self.evaluated = frozenset(t.key for ev in self.computed for t in ev.sum.terms)
        self.skipped = _unused([ev.dest for ev in evals], self.evaluated)

    def __call__(self, cur: dict[str, Tensor], kwargs, ref: Tensor, batch: tuple[int, ...],
                 zeros: Mapping[str, Tensor], prof: bool) -> dict[str, Tensor]:
        """Update ``cur`` in place (and return it). Slots zero before the application are
        absent from ``cur`` or zeros; slots that come out zero are removed."""
        if self.ordered:  # Gauss-Seidel: each slot reads the newest values
            for ev in self.evals:
                if ev.sum is None:
                    cur.pop(ev.dest.slot, None)
                    continue
                for s in ev.fill:
                    cur[s] = zeros[s]
                cur[ev.dest.slot] = _evaluate(ev, cur, kwargs, ref, batch, prof)
            return cur
        for s in self.fill:  # Jacobi: everything reads the state before the application
            cur[s] = zeros[s]
        new = [(ev.dest.slot, _evaluate(ev, cur, kwargs, ref, batch, prof)) for ev in self.computed]
        for s in self.cleared:
            cur.pop(s, None)
        cur.update(new)
        return cur


class StepPlan:
    """Applications of the map with some slots frozen (held or forced).

    Called, it is one application of every slot. :meth:`run` iterates: each
    application is specialised (and cached) to the slots known to be zero before it and
    the slots a later application or the result reads after it (see
    :meth:`schedule`).
    """

    def __init__(self, m: BlockMap, frozen: frozenset[str], update: str) -> None:
        dests = compile_destinations(m)
        graph = m.graph().without_inputs_to(frozen)
        self.frozen = frozen
        self.ordered = update == "ordered"
        # Gauss-Seidel: slot by slot, components in dependency order; Jacobi: slot order.
        order = [d for comp in graph.components() for d in comp] if self.ordered else list(m.slots)
        self.sweep = tuple(dests[d] for d in order if d not in frozen)
        self._computed = frozenset(d.slot for d in self.sweep)
        self._shapes = dict(m.shapes)
        self._apps: dict[tuple[frozenset[str], frozenset[str]], _Application] = {}
        self._after: dict[frozenset[str], frozenset[str]] = {}
        self._schedules: dict[tuple, tuple[tuple[_Application, int], ...]] = {}

    def _zero_after(self, zero: frozenset[str]) -> frozenset[str]:
        """The slots zero after one application that starts with ``zero`` zero (every
        slot computed)."""
        after = self._after.get(zero)
        if after is None:
            z = set(zero)
            if self.ordered:
                for d in self.sweep:
                    if d.zeroable and not _kept(d.terms, z):
                        z.add(d.slot)
                    else:
                        z.discard(d.slot)
            else:
                z = (z & self.frozen) | {d.slot for d in self.sweep
                                         if d.zeroable and not _kept(d.terms, zero)}
            after = self._after[zero] = frozenset(z)
        return after

    def _application(self, zero: frozenset[str], live: frozenset[str]) -> _Application:
        """The application that starts with the slots ``zero`` zero and must leave the
        computed slots ``live`` right (the others may be stale)."""
        key = (zero, live)
        app = self._apps.get(key)
        if app is not None:
            return app
        z = set(zero)
        kept = []  # per sweep position: the terms evaluated there, and what is zero there
        for d in self.sweep:
            terms = _kept(d.terms, z)
            kept.append((d, terms, frozenset(z)))
            if self.ordered:
                if d.zeroable and not terms:
                    z.add(d.slot)
                else:
                    z.discard(d.slot)
        # Backwards over the sweep: a slot is computed when it is wanted after it. In
        # the ordered sweep, slots after it read the value computed here and slots
        # before it the value of the previous application; in Jacobi everything reads
        # the previous application.
        need = set(live)
        evals = []
        for d, terms, zero_here in reversed(kept):
            if d.slot not in need:
                continue
            if self.ordered:
                need.discard(d.slot)
            if d.zeroable and not terms:
                evals.append(_Eval(d, None))
                continue
            reads = _reads(terms)
            evals.append(_Eval(d, _sum(d.slot, terms), tuple(s for s in reads if s in zero_here)))
            if self.ordered:
                need.update(reads)
        if not self.ordered:
            need = {s for ev in evals if ev.sum is not None for s in _reads(ev.sum.terms)}
        evals.reverse()
        app = self._apps[key] = _Application(tuple(evals), frozenset(need) & self._computed,
                                             self.ordered)
        return app

    def schedule(
        self, zero: frozenset[str], outputs: frozenset[str], steps: int, record: int = 0
    ) -> tuple[tuple[tuple[_Application, int], ...], tuple[nn.Module, ...]]:
        """The applications of an iteration of ``steps`` that starts with the slots
        ``zero`` zero and returns ``outputs`` after the last one (and after every
        ``record``-th one, if ``record``), as ``(application, repeats)`` runs; and the
        blocks into the slots computed that no application evaluates.

        Forward, which slots are zero before each application; backward from the end,
        which slots each application must compute (liveness): application ``k`` computes
        the slots application ``k + 1`` reads (or that are returned after it).
        """
        key = (zero, outputs, steps, record)
        found = self._schedules.get(key)
        if found is not None:
            return found
        zeros = [zero]
        for _ in range(steps - 1):
            zeros.append(self._zero_after(zeros[-1]))
        wanted = outputs & self._computed
        live = wanted
        backwards: list[list] = []
        for k in range(steps, 0, -1):
            app = self._application(zeros[k - 1], live)
            if backwards and backwards[-1][0] is app:
                backwards[-1][1] += 1
            else:
                backwards.append([app, 1])
            live = app.needs
            if record and (k - 1) % record == 0:
                live = live | wanted
        runs = tuple((app, n) for app, n in reversed(backwards))
        evaluated = frozenset().union(*(app.evaluated for app, _ in runs))
        never = {k: mod for app, _ in runs for k, mod in app.skipped.items() if k not in evaluated}
        found = self._schedules[key] = (runs, tuple(never.values()))
        return found

    def __call__(self, state: Mapping[str, Tensor], kwargs, ref: Tensor, batch) -> dict[str, Tensor]:
        """One application of every slot to ``state`` (which holds every slot)."""
        app = self._application(frozenset(), self._computed)
        zeros = _ZeroFilled({}, self._shapes, ref, batch)
        prof = autograd_profiler._is_profiler_enabled and torch.autograd._profiler_enabled()
        cur = app(dict(state), kwargs, ref, batch, zeros, prof)
        for s in app.cleared:
            cur[s] = zeros[s]
        return _zero_gradients(cur, tuple(app.skipped.values()), self.frozen)

    def run(
        self,
        state: Mapping[str, Tensor],
        kwargs,
        ref: Tensor,
        batch: tuple[int, ...],
        *,
        steps: int,
        zero: frozenset[str],
        outputs: tuple[str, ...],
        forced: Mapping[str, Tensor] | None = None,
        inner: int = 1,
        trajectory: bool = False,
    ) -> dict[str, Tensor]:
        """Iterate from ``state`` (the slots ``zero`` left out: they start at zero) and
        return ``outputs``: the final state, or with ``trajectory`` the state after each
        forcing step. ``forced[s][t]`` is written into ``s`` before forcing step ``t``,
        each of ``inner`` applications (``steps`` of them in all without ``forced``)."""
        total = steps * inner if forced else steps
        runs, skipped = self.schedule(zero, frozenset(outputs), total, inner if trajectory else 0)
        prof = autograd_profiler._is_profiler_enabled and torch.autograd._profiler_enabled()
        zeros = _ZeroFilled({}, self._shapes, ref, batch)
        cur = dict(state)
        states = []
        k = 0
        for app, repeats in runs:
            for _ in range(repeats):
                if forced and k % inner == 0:
                    t = k // inner
                    cur.update({s: seq[t] for s, seq in forced.items()})
                k += 1
                if prof:
                    with record_function(f"iternn.application {k}"):
                        cur = app(cur, kwargs, ref, batch, zeros, prof)
                else:
                    cur = app(cur, kwargs, ref, batch, zeros, prof)
                if trajectory and k % inner == 0:
                    states.append({s: cur[s] if s in cur else zeros[s] for s in outputs})
        if trajectory:
            out = {s: torch.stack([st[s] for st in states]) for s in outputs}
        else:
            out = {s: cur[s] if s in cur else zeros[s] for s in outputs}
        return _zero_gradients(out, skipped, self.frozen)
