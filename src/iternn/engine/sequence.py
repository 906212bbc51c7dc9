"""The sequence plan: a forced map over a whole sequence, one component at a time.

A forced slot ``x`` is overwritten with ``x_t`` before application ``t`` (eq. 11), and
application ``t`` computes ``z_d^t = act_d(b_d + sum_s F[d, s](z_s^{t-1}))`` (the
Jacobi update; in the ordered sweep a slot reads the new values of the slots before it).
A slot's trajectory depends only on its sources' trajectories, so the strongly
connected components of the block graph can be run one after another, each for all
``T`` steps.

:class:`SequencePlan` runs forced maps and trajectories: strongly connected components
in dependency order, each over the whole sequence. Row-wise and sample-wise blocks
(see :mod:`iternn.core.rowwise`: linear layers, element-wise layers, convolutions...)
whose sources lie outside the component (forced slots, held slots or upstream
components) are evaluated for all time steps in one batched call; blocks inside a
cycle, and other modules (which may read the leading dims as more than a batch, or
couple the batch), run step by step.

**Liveness.** Asked for some slots only (``iterate(..., outputs=...)``), a sequence
plan skips the components nothing asked for depends on.

A cyclic component of an ordered forced map can be run whole by a *component kernel*
(:func:`~iternn.engine.plan.register_component_kernel`): a converter that knows a
cell's structure (the LSTM and GRU maps register one) computes the component's
trajectories in one tight loop with a hand-written backward; a kernel recognises its
whole component and declines anything else, which then takes the generic step loop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import profiler as autograd_profiler
from torch.autograd.profiler import record_function

from ..core.block_map import BlockMap
from ..core.graph import BlockGraph
from ..errors import MapError
from .plan import (
    _COMPONENT_KERNELS,
    Destination,
    Term,
    _activation_function,
    _kept,
    _plain,
    _reads,
    _Sum,
    _sum,
    _unused,
    _zero_gradients,
    _ZeroFilled,
    accumulate,
    compile_destinations,
    finish,
)

__all__ = ["SequencePlan"]


@dataclass(frozen=True)
class _Drive:
    """One destination's external drive, by how its terms are evaluated."""

    batched: _Sum  # reading a sequence: one call over all steps
    opaque: _Sum  # reading a sequence: step by step
    const: _Sum  # reading only slots that are the same at every step (held, or zero)


@dataclass(frozen=True)
class _Component:
    dests: tuple[Destination, ...]
    external: tuple[tuple[Term, ...], ...]  # per destination: terms reading only outside
    internal: tuple[tuple[Term, ...], ...]  # per destination: terms reading inside
    outside: tuple[str, ...]  # slots outside the component that internal terms read
    cyclic: bool
    drives: tuple[_Drive, ...]  # per destination: the external terms, split
    step: tuple[_Sum, ...]  # per destination: the internal terms
    first: tuple[_Sum, ...]  # per destination: the internal terms at t = 0 (zero reads left out)
    first_fill: tuple[str, ...]  # slots of the component left out of the state read at t = 0
    first_skipped: tuple[nn.Module, ...]  # internal blocks not evaluated at t = 0

    @property
    def label(self) -> str:
        return f"iternn.component {','.join(d.slot for d in self.dests)}"


def _zero_forever(dests: Mapping[str, Destination], missing: frozenset[str],
                  frozen: frozenset[str]) -> frozenset[str]:
    """Of the slots ``missing`` from the initial state (none forced), those zero at every
    step: the held ones, and computed ones whose blocks read only such slots (and keep
    zero), with no bias and an activation that keeps zero (the largest such set: zero at
    step t, so zero at t + 1)."""
    z = set(missing)
    changed = True
    while changed:
        changed = False
        for s in list(z):
            d = dests[s]
            if s not in frozen and not (d.zeroable and not _kept(d.terms, z)):
                z.discard(s)
                changed = True
    return frozenset(z)


class SequencePlan:
    """Strongly connected components in order, each over the whole sequence.

    Built for the slots ``forced`` (a sequence each), the slots ``zero`` left out of the
    initial state (not forced; held ones stay zero) and the slots returned, ``outputs``
    (``None``: every slot): terms reading only slots that are zero at every step are
    left out, at ``t = 0`` in a cycle those reading zero initial values too, and the
    components nothing in ``outputs`` depends on are skipped.
    """

    def __init__(self, m: BlockMap, frozen: frozenset[str], update: str, *,
                 forced: frozenset[str] = frozenset(), zero: frozenset[str] = frozenset(),
                 outputs: frozenset[str] | None = None) -> None:
        dests = compile_destinations(m)
        graph: BlockGraph = m.graph().without_inputs_to(frozen)
        self.frozen = frozen
        self.ordered = update == "ordered"
        self.forced = forced
        self.held = frozen - forced
        self._shapes = dict(m.shapes)
        missing = zero - forced
        always = _zero_forever(dests, missing, frozen)
        const = self.held | always  # the same value at every step
        kept = {s: _kept(dests[s].terms, always) for s in m.slots if s not in frozen}
        self.outputs = tuple(s for s in m.slots if outputs is None or s in outputs)
        needed, todo = set(self.outputs), list(self.outputs)
        while todo:  # what the outputs depend on
            for t in kept.get(todo.pop(), ()):
                for s in t.srcs:
                    if s not in needed:
                        needed.add(s)
                        todo.append(s)
        comps = []
        for comp in graph.components():
            if comp[0] in frozen or comp[0] in always or not needed.intersection(comp):
                continue  # frozen slots are singletons; a cycle is zero all or nothing
            inside = set(comp)
            ds = tuple(dests[d] for d in comp)
            internal = tuple(
                tuple(_fold_bias(t) for t in kept[d.slot] if inside.intersection(t.srcs))
                for d in ds
            )
            external = tuple(
                tuple(t for t in kept[d.slot] if not inside.intersection(t.srcs)) for d in ds
            )
            outside = {s for terms in internal for t in terms for s in t.srcs if s not in inside}
            first, fill, first_skipped = [], set(), []
            for i, (d, terms) in enumerate(zip(ds, internal)):
                # At t = 0 Jacobi reads the initial state; the ordered sweep reads the new
                # values of the slots before this one, and upstream slots' new values.
                later = {x.slot for x in ds[i:]}
                start_zero = (missing if not self.ordered
                              else always | {s for s in missing if s in later})
                kept_first = _kept(terms, start_zero)
                first.append(_sum(d.slot, kept_first))
                first_skipped.extend(t.module for t in terms if t not in kept_first)
                fill.update(s for s in _reads(kept_first) if s in missing and s in inside
                            and (not self.ordered or s in later))
            comps.append(_Component(
                ds, external, internal, tuple(sorted(outside)), graph.is_cyclic(comp),
                tuple(_split(d.slot, ext, const) for d, ext in zip(ds, external)),
                tuple(_sum(d.slot, terms) for d, terms in zip(ds, internal)),
                tuple(first), tuple(s for s in comp if s in fill), tuple(first_skipped),
            ))
        self.components = tuple(comps)
        evaluated = {t.key for c in comps for terms in (*c.internal, *c.external) for t in terms}
        self._skipped = tuple(_unused([dests[s] for s in m.slots if s in needed and s not in frozen],
                                      evaluated).values())
        # Slots whose sequence a later component reads (the others need no shifted copy).
        self.read_downstream = frozenset(
            s for c in comps for terms in c.external for t in terms for s in t.srcs
        ) | frozenset(s for c in comps for s in c.outside)

    def _drive(
        self, drive: _Drive, seq: Mapping[str, Tensor], held: Mapping[str, Tensor],
        kwargs, bias: Tensor | None, steps: int, batch: tuple[int, ...],
        start: Tensor | None, fused: Term | None, prof: bool,
    ) -> Tensor | None:
        """External drive of one slot: sequence terms batched over time, held terms once,
        added to ``start`` (a part computed already, over the whole sequence: the
        product of the ``fused`` term)."""
        batched, opaque = drive.batched, drive.opaque
        if fused is not None:
            batched = batched.without((fused,))
        if kwargs:  # a block given keyword arguments is called step by step
            moved = tuple(t for t in batched.terms if t.key in kwargs)
            if moved:
                batched = batched.without(moved)
                opaque = replace(opaque, terms=opaque.terms + moved, rest=opaque.rest + moved)
        out = start
        if batched.terms:
            # Row-wise and sample-wise blocks: one call for the whole sequence (a held
            # source of a multi-source block is expanded over time, a view).
            values = {s: seq[s] if s in seq else held[s].expand(steps, *held[s].shape)
                      for t in batched.terms for s in t.srcs}
            out = accumulate(batched, values, kwargs, (steps, *batch), start=out, bias=bias,
                             prof=prof)
            bias = None
        if opaque.terms:
            # An opaque module may give the leading dims a meaning of its own (a
            # sequence-first transformer layer does), so it is called step by step.
            per_step = [
                accumulate(opaque, {s: seq[s][i] if s in seq else held[s]
                                    for t in opaque.terms for s in t.srcs}, kwargs, batch,
                           prof=prof)
                for i in range(steps)
            ]
            y = torch.stack(per_step)
            out = y if out is None else out + y
        c = accumulate(drive.const, held, kwargs, batch, bias=bias, prof=prof)
        if c is not None:
            out = c if out is None else out + c
        return out

    def __call__(
        self,
        init: Mapping[str, Tensor],
        forced: Mapping[str, Tensor],
        kwargs,
        ref: Tensor,
        batch: tuple[int, ...],
        steps: int,
    ) -> dict[str, Tensor]:
        """Trajectories ``(steps, *batch, *shape)`` of the plan's outputs: the state after
        each application. ``init`` holds the slots given (the others start at zero),
        ``forced`` the sequences of the plan's forced slots."""
        if forced.keys() != self.forced:
            raise MapError(f"this plan forces the slots {sorted(self.forced)}, "
                           f"got sequences for {sorted(forced)}")
        prof = autograd_profiler._is_profiler_enabled and torch.autograd._profiler_enabled()
        init = _ZeroFilled(init, self._shapes, ref, batch)
        # What each block reads at application t (Jacobi: the state before it).
        reads: dict[str, Tensor] = dict(forced)
        traj: dict[str, Tensor] = dict(forced)
        for comp in self.components:
            if prof:
                with record_function(comp.label):
                    self._component(comp, init, reads, traj, kwargs, ref, batch, steps, True)
            else:
                self._component(comp, init, reads, traj, kwargs, ref, batch, steps, False)
        out = {}
        for s in self.outputs:
            if s in traj:
                out[s] = traj[s]
            elif s in self.held:
                out[s] = init[s].expand(steps, *init[s].shape)
            else:  # zero at every step
                out[s] = ref.new_zeros(steps, *batch, *self._shapes[s])
        skipped = self._skipped
        if steps == 1:  # the internal blocks of a cycle skipped at t = 0 never ran
            skipped = skipped + tuple(m for c in self.components for m in c.first_skipped)
        return _zero_gradients(out, skipped, self.frozen)

    def _component(self, comp: _Component, init: _ZeroFilled, reads: dict[str, Tensor],
                   traj: dict[str, Tensor], kwargs, ref: Tensor, batch: tuple[int, ...],
                   steps: int, prof: bool) -> None:
        """The trajectories of one component, recorded into ``traj`` (and ``reads``)."""
        biases = []
        for d, internal in zip(comp.dests, comp.internal):
            # Biases of internal plain-linear blocks join the slot bias in the drive,
            # once for the whole sequence instead of once per step.
            bias = d.bias
            for t in internal:
                if t.skip_bias:
                    bias = t.module.bias if bias is None else bias + t.module.bias
            biases.append(bias)
        fused = _shared_source_products(comp, reads, kwargs, biases)
        drives = []
        for k, (d, drive, bias) in enumerate(zip(comp.dests, comp.drives, biases)):
            term = start = None
            if k in fused:
                term, start = fused[k]
                bias = None
            if prof:
                with record_function(f"iternn.slot {d.slot}"):
                    drives.append(self._drive(drive, reads, init, kwargs, bias, steps, batch,
                                              start, term, True))
            else:
                drives.append(self._drive(drive, reads, init, kwargs, bias, steps, batch,
                                          start, term, False))
        if not comp.cyclic:
            (d,), (drive,) = comp.dests, drives
            self._record(d.slot, finish(d, drive, ref, (steps, *batch)), init, reads, traj)
            return
        fast = _recurrence(comp, drives, init, batch)
        if fast is not None:
            self._record(comp.dests[0].slot, fast, init, reads, traj)
            return
        if self.ordered:
            whole = _component_kernel(comp, drives, init, batch, steps, kwargs)
            if whole is not None:
                for d in comp.dests:
                    self._record(d.slot, whole[d.slot], init, reads, traj)
                return
        # Per destination: the drive's steps (a time-varying drive), or one tensor
        # that every step reads (held sources and biases only), or None.
        timed: list[tuple[Tensor, ...] | None] = []
        const: list[Tensor | None] = []
        for d, drive in zip(comp.dests, drives):
            varies = drive is not None and drive.dim() == len(batch) + len(d.shape) + 1
            timed.append(drive.unbind(0) if varies else None)
            const.append(None if drive is None or varies else drive.expand(*batch, *d.shape))
        outside = [(s, reads[s].unbind(0) if s in reads else None) for s in comp.outside]
        # The initial values read at t = 0 (the others are not made).
        prev = {d.slot: init[d.slot] for d in comp.dests
                if d.slot in init or d.slot in comp.first_fill}
        outs: list[list[Tensor]] = [[] for _ in comp.dests]
        for t in range(steps):
            sums = comp.first if t == 0 else comp.step
            cur = dict(prev)
            for s, steps_of in outside:  # what internal terms read outside the cycle
                cur[s] = steps_of[t] if steps_of is not None else init[s]
            new = {}
            for i, d in enumerate(comp.dests):
                start = timed[i][t] if timed[i] is not None else const[i]
                if prof:
                    with record_function(f"iternn.slot {d.slot}"):
                        pre = accumulate(sums[i], cur, kwargs, batch, start=start, prof=True)
                        out = finish(d, pre, ref, batch)
                else:
                    out = finish(d, accumulate(sums[i], cur, kwargs, batch, start=start), ref, batch)
                new[d.slot] = out
                outs[i].append(out)
                if self.ordered:  # Gauss-Seidel: later slots read the newest value
                    cur[d.slot] = out
            prev = new
        for d, o in zip(comp.dests, outs):
            self._record(d.slot, torch.stack(o), init, reads, traj)

    def _record(self, slot: str, seq: Tensor, init, reads, traj) -> None:
        traj[slot] = seq
        if slot not in self.read_downstream:
            return
        if self.ordered:
            reads[slot] = seq
        else:  # Jacobi: application t reads the state after t-1 applications
            reads[slot] = torch.cat([init[slot].unsqueeze(0), seq[:-1]], dim=0)


def _split(slot: str, terms: Sequence[Term], const: frozenset[str]) -> _Drive:
    """A destination's external terms by how they are evaluated over a sequence."""
    timed = tuple(t for t in terms if any(s not in const for s in t.srcs))
    return _Drive(
        _sum(slot, [t for t in timed if t.batchable]),
        _sum(slot, [t for t in timed if not t.batchable]),
        _sum(slot, [t for t in terms if t not in timed]),
    )


def _transformed(*tensors: Tensor) -> bool:
    """Whether torch.func (jvp, vmap, grad) is tracing these tensors: then ``out=`` and
    in-place kernels are unavailable and the out-of-place path must be taken."""
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return any(wrapped(t) for t in tensors)


def _fold_bias(term: Term) -> Term:
    """An internal plain-linear term whose bias the drive carries instead (it then maps
    zero to zero)."""
    if term.linear and term.module.bias is not None and _plain(term.module):
        return replace(term, batchable=True, out_shape=None, skip_bias=True, keeps_zero=True)
    return term


_IN_PLACE = {None: None, torch.tanh: torch.tanh_, torch.sigmoid: torch.sigmoid_,
             torch.relu: torch.relu_}


def _recurrence(
    comp: _Component, drives: list[Tensor | None], init: Mapping[str, Tensor], batch: tuple
) -> Tensor | None:
    """The common recurrent cell ``h_t = act(drive_t + h_{t-1} W^T)``, as a tight loop.

    Used for a component of one slot whose only internal block is a plain linear
    self-loop (an RNN layer), with a time-varying drive and one batch dim; returns
    ``None`` when the component is not of that form (the general loop handles it). A
    slot left out of the initial state starts at zero: the first step is
    ``act(drive_0)``.
    """
    if len(comp.dests) != 1 or len(comp.internal[0]) != 1 or len(batch) != 1:
        return None
    (dest,), ((term,),), (drive,) = comp.dests, comp.internal, drives
    if not term.linear or not _plain(term.module) or drive is None or drive.dim() != 3:
        return None
    if term.module.bias is not None and not term.skip_bias:
        return None
    wt = term.module.weight.t()
    act = _activation_function(dest.act)
    h = init.get(dest.slot)
    given = () if h is None else (h,)
    if not torch.is_grad_enabled() and act in _IN_PLACE and not _transformed(drive, wt, *given):
        # Inference: every step written straight into one new (T, *batch, n) buffer,
        # no per-step allocation and no final stack. (Never into the drive: it may be
        # the caller's tensor, handed on by an identity block.)
        act_ = _IN_PLACE[act]
        buf = torch.empty(drive.shape, dtype=drive.dtype, device=drive.device)
        for x_t, y in zip(drive.unbind(0), buf.unbind(0)):
            if h is None:
                y.copy_(x_t)
            else:
                torch.addmm(x_t, h, wt, out=y)
            if act_ is not None:
                act_(y)
            h = y
        return buf
    outs = []
    for x_t in drive.unbind(0):
        h = x_t if h is None else torch.addmm(x_t, h, wt)
        if act is not None:
            h = act(h)
        outs.append(h)
    return torch.stack(outs)


def _shared_source_products(
    comp: _Component, seq: Mapping[str, Tensor], kwargs, biases: Sequence[Tensor | None]
) -> dict[int, tuple[Term, Tensor]]:
    """Plain-linear drive terms of several destinations of ``comp`` that read the same
    sequence, as one matmul: ``{destination index: (term, its part of the product)}``.

    The weights (and each destination's drive bias) are stacked by rows, so the product
    is ``(steps, *batch, sum n_d)`` and each part a column slice of it (a view). An LSTM
    layer's four input projections become one GEMM. Terms whose weights differ in dtype
    or device, or that take ``block_kwargs``, are left to :meth:`SequencePlan._drive`.
    """
    groups: dict[str, list[tuple[int, Term]]] = {}
    for k, ext in enumerate(comp.external):
        seen = set()
        for t in ext:
            if (t.linear and t.src in seq and t.src not in seen and _plain(t.module)
                    and not (kwargs and t.key in kwargs)):
                seen.add(t.src)
                groups.setdefault(t.src, []).append((k, t))
    fused: dict[int, tuple[Term, Tensor]] = {}
    for members in groups.values():
        members = [(k, t) for k, t in members if k not in fused]  # one product per slot
        if len(members) < 2:
            continue
        weights = [t.module.weight for _, t in members]
        parts = [biases[k] if t.module.bias is None else (
                 t.module.bias if biases[k] is None else t.module.bias + biases[k])
                 for k, t in members]
        kinds = {(x.dtype, x.device) for x in (*weights, *parts) if x is not None}
        if len(kinds) != 1:
            continue
        bias = None
        if any(b is not None for b in parts):
            bias = torch.cat([w.new_zeros(w.shape[0]) if b is None else b
                              for w, b in zip(weights, parts)])
        out = F.linear(seq[members[0][1].src], torch.cat(weights), bias)
        for (k, t), piece in zip(members, out.split([w.shape[0] for w in weights], -1)):
            fused[k] = (t, piece)
    return fused


def _component_kernel(
    comp: _Component, drives: list, init: Mapping[str, Tensor], batch: tuple, steps: int, kwargs
) -> dict[str, Tensor] | None:
    """The first registered kernel's trajectories for ``comp``, or ``None``."""
    for kernel in _COMPONENT_KERNELS:
        out = kernel(comp, drives, init, batch, steps, kwargs)
        if out is not None:
            return out
    return None
