"""Execution plans: the same iteration, scheduled so the map runs at native speed.

Every plan computes exactly what repeated application of :meth:`BlockMap.forward`
computes (the Jacobi update, or the ordered sweep of ``update="ordered"``); only the
schedule differs:

* :class:`Wavefront` — acyclic structure, enough applications: each slot is evaluated
  once, when its sources are final (see :meth:`BlockGraph.levels`), in a topological
  order that follows slot order where it may (so modules that draw random numbers draw
  them in the order the slots were declared). This is provably the state after any
  number of applications ``>= depth``.
* :class:`SequencePlan` — forced maps and trajectories: strongly connected components
  in dependency order, each over the whole sequence. Row-wise and sample-wise blocks
  (see :mod:`iternn.core.rowwise`: linear layers, element-wise layers, convolutions...)
  whose sources lie outside the component (forced slots, held slots or upstream
  components) are evaluated for all time steps in one batched call; blocks inside a
  cycle, and other modules (which may read the leading dims as more than a batch, or
  couple the batch), run step by step.
* :class:`StepPlan` — one application at a time (inner applications per forcing step,
  unforced cyclic maps such as equilibrium iterations).

A cyclic component of an ordered forced map can be run whole by a *component kernel*
(:func:`register_component_kernel`): a converter that knows a cell's structure (the
LSTM and GRU maps register one) computes the component's trajectories in one tight
loop with a hand-written backward; a kernel recognises its whole component and declines
anything else, which then takes the generic step loop.

Blocks that share a destination are combined: the first plain ``nn.Linear`` block takes
the slot bias into its matmul and later ones accumulate with ``addmm``, so a
destination costs one fused GEMM per block and no extra additions. Plain ``nn.Linear``
blocks without hooks are evaluated from their ``weight``/``bias`` (a block with forward
or pre-forward hooks, e.g. pruned or weight-normed, is called as a module), and the
built-in ``nn.ReLU``/``nn.Tanh``/``nn.Sigmoid`` slot activations (exact types) are called
as functions, so hooks registered on those activation modules are not called; wrap
such a module in another one to keep its hooks.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.block_map import BlockMap, block_key, source_slots
from ..core.calls import call_block, is_shaped
from ..core.graph import BlockGraph
from ..core.rowwise import is_rowwise, is_samplewise
from ..core.state import parameter_spec

__all__ = [
    "Destination",
    "Wavefront",
    "SequencePlan",
    "StepPlan",
    "compile_destinations",
    "register_component_kernel",
]


@dataclass(frozen=True)
class Term:
    """One block ``F[dst, srcs]`` as the engine calls it."""

    srcs: tuple[str, ...]  # the slots it reads, in call order
    key: str
    module: nn.Module
    linear: bool  # a plain nn.Linear between vector slots: evaluated as a fused matmul
    batchable: bool  # callable once on a whole sequence (row-wise, or sample-wise if shaped)
    out_shape: tuple[int, ...] | None  # destination shape if called batch-flattened
    skip_bias: bool = False  # its bias is added elsewhere (folded into a drive)

    @property
    def src(self) -> str:
        """The source of a one-source block (a linear term's)."""
        return self.srcs[0]


@dataclass(frozen=True)
class Destination:
    """Everything needed to compute ``act(b + sum_s F[d, s] z_s)`` for one slot ``d``.

    The bias is looked up when the plan runs (``biases`` is the map's parameter table),
    so replacing a parameter object, e.g. ``load_state_dict(..., assign=True)``, is seen.
    """

    slot: str
    shape: tuple[int, ...]
    terms: tuple[Term, ...]
    biases: dict
    act: nn.Module | None

    @property
    def bias(self) -> Tensor | None:
        return self.biases.get(self.slot)


def compile_destinations(m: BlockMap) -> dict[str, Destination]:
    """Group the map's blocks by destination slot, in connect order."""
    shapes = m.shapes
    terms: dict[str, list[Term]] = {s: [] for s in m.slots}
    for dst, src in m.edges:
        key = block_key(dst, src)
        mod = m.blocks[key]
        srcs = source_slots(src)
        shaped = is_shaped(shapes[dst], *(shapes[s] for s in srcs))
        linear = type(mod) is nn.Linear and len(srcs) == 1 and not shaped
        batchable = is_samplewise(mod) if shaped else is_rowwise(mod)
        terms[dst].append(Term(srcs, key, mod, linear, batchable, shapes[dst] if shaped else None))
    return {
        d: Destination(d, shape, tuple(terms[d]), m.biases._parameters, m.activation(d))
        for d, shape in shapes.items()
    }


def accumulate(
    terms: Sequence[Term],
    values: Mapping[str, Tensor],
    kwargs: Mapping[str, Mapping] | None,
    batch: tuple[int, ...],
    start: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor | None:
    """``start + bias + sum F[., s](values[s])`` fused into as few kernels as possible.

    ``batch`` is the batch shape of ``values`` (blocks on shaped slots are called with it
    flattened). Returns ``None`` when there is nothing to add (no start, no terms, no
    bias).
    """
    out = start
    for term in terms:
        if term.linear and _plain(term.module) and not (kwargs and term.key in kwargs):
            z = values[term.srcs[0]]
            w = term.module.weight
            wb = None if term.skip_bias else term.module.bias
            if out is None:  # the first matmul takes every bias: an (n,)-sized add
                if bias is not None:
                    wb, bias = (bias if wb is None else wb + bias), None
                out = F.linear(z, w, wb)
            elif wb is None and z.dim() == 2 and out.dim() == 2:
                out = torch.addmm(out, z, w.t())
            else:
                out = out + F.linear(z, w, wb)
        else:
            y = call_block(term.module, [values[s] for s in term.srcs], batch, term.out_shape,
                           kwargs.get(term.key) if kwargs else None)
            out = y if out is None else out + y
    if bias is not None:
        out = bias if out is None else out + bias
    return out


def finish(dest: Destination, pre: Tensor | None, ref: Tensor, batch: tuple[int, ...]) -> Tensor:
    """Apply the slot activation; a slot with nothing incoming is ``act(0)``."""
    if pre is None:
        pre = ref.new_zeros(*batch, *dest.shape)
    elif pre.dim() != len(batch) + len(dest.shape):  # only a bias or held sources: broadcast
        pre = pre.expand(*batch, *dest.shape)
    if dest.act is None:
        return pre
    if len(dest.shape) > 1:
        return call_block(dest.act, (pre,), batch, dest.shape)
    return dest.act(pre)


def evaluate(
    dest: Destination,
    values: Mapping[str, Tensor],
    kwargs: Mapping[str, Mapping] | None,
    ref: Tensor,
    batch: tuple[int, ...],
) -> Tensor:
    """The new value of ``dest.slot`` from ``values`` (one application, one slot)."""
    return finish(dest, accumulate(dest.terms, values, kwargs, batch, bias=dest.bias), ref, batch)


class StepPlan:
    """One application of the map with some slots frozen (held or forced)."""

    def __init__(self, m: BlockMap, frozen: frozenset[str], update: str) -> None:
        dests = compile_destinations(m)
        graph = m.graph().without_inputs_to(frozen)
        self.frozen = frozen
        if update == "ordered":  # Gauss-Seidel: slot by slot, each reading the newest state
            self.groups = [
                (dests[d],) for comp in graph.components() for d in comp if d not in frozen
            ]
        else:  # jacobi: one group, everything reads the old state
            self.groups = [tuple(dests[d] for d in m.slots if d not in frozen)]

    def __call__(self, state: dict[str, Tensor], kwargs, ref: Tensor, batch) -> dict[str, Tensor]:
        cur = dict(state)
        for group in self.groups:
            new = {d.slot: evaluate(d, cur, kwargs, ref, batch) for d in group}
            cur.update(new)
        return cur


class Wavefront:
    """Each slot evaluated once, in a topological order (acyclic structure only).

    Called with ``keep`` (the slots the caller reads afterwards, e.g. a model's
    outputs), a slot's value is dropped as soon as its last reader has run, so memory
    is reused while the wavefront advances, as in the source model's own forward; the
    result then holds only ``keep`` and the frozen slots given.
    """

    def __init__(self, m: BlockMap, frozen: frozenset[str], depth: int) -> None:
        dests = compile_destinations(m)
        self.frozen = frozen
        self.depth = depth  # applications after which the state is final
        self.order = tuple(dests[s] for s in _topological(m, frozen))

        # One linear block into a slot (the MLP case): precompiled to a fused matmul.
        self.steps = tuple(
            (d.slot, d.terms[0].src, d.terms[0].module, d.biases, _activation_function(d.act), d)
            if len(d.terms) == 1 and d.terms[0].linear
            else (d.slot, None, None, None, None, d)
            for d in self.order
        )
        # The dtype/device inputs must have (checked per call by MapModule's fast path).
        self.dtype, self.device = parameter_spec(m)
        self._releases: dict[frozenset[str], tuple[tuple[str, ...], ...]] = {}

    def _release_after(self, keep: frozenset[str]) -> tuple[tuple[str, ...], ...]:
        """Per step, the computed slots nobody reads after it (and not kept)."""
        plan = self._releases.get(keep)
        if plan is None:
            last: dict[str, int] = {}
            for i, d in enumerate(self.order):
                last[d.slot] = i  # a slot nobody reads is dropped right after it is computed
                for t in d.terms:
                    for src in t.srcs:
                        if src not in self.frozen:
                            last[src] = i
            drop: list[list[str]] = [[] for _ in self.order]
            for slot, i in last.items():
                if slot not in keep:
                    drop[i].append(slot)
            plan = self._releases[keep] = tuple(tuple(x) for x in drop)
        return plan

    def __call__(self, values: dict[str, Tensor], kwargs, ref: Tensor, batch,
                 keep: frozenset[str] | None = None) -> dict[str, Tensor]:
        values = dict(values)
        drops = self._release_after(keep) if keep is not None else None
        for i, (slot, src, lin, biases, act, dest) in enumerate(self.steps):
            if lin is None or not _plain(lin) or kwargs:
                values[slot] = evaluate(dest, values, kwargs, ref, batch)
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


@dataclass(frozen=True)
class _Component:
    dests: tuple[Destination, ...]
    external: tuple[tuple[Term, ...], ...]  # per destination: terms reading only outside
    internal: tuple[tuple[Term, ...], ...]  # per destination: terms reading inside
    outside: tuple[str, ...]  # slots outside the component that internal terms read
    cyclic: bool


class SequencePlan:
    """Strongly connected components in order, each over the whole sequence."""

    def __init__(self, m: BlockMap, frozen: frozenset[str], update: str) -> None:
        dests = compile_destinations(m)
        graph: BlockGraph = m.graph().without_inputs_to(frozen)
        self.frozen = frozen
        self.ordered = update == "ordered"
        comps = []
        for comp in graph.components():
            if comp[0] in frozen:  # frozen slots have no inputs left: singletons
                continue
            inside = set(comp)
            ds = tuple(dests[d] for d in comp)
            internal = tuple(
                tuple(_fold_bias(t) for t in d.terms if inside.intersection(t.srcs)) for d in ds
            )
            outside = {s for terms in internal for t in terms for s in t.srcs if s not in inside}
            comps.append(
                _Component(
                    ds,
                    tuple(tuple(t for t in d.terms if not inside.intersection(t.srcs)) for d in ds),
                    internal,
                    tuple(sorted(outside)),
                    graph.is_cyclic(comp),
                )
            )
        self.components = tuple(comps)
        # Slots whose sequence a later component reads (the others need no shifted copy).
        self.read_downstream = frozenset(
            s for c in comps for terms in c.external for t in terms for s in t.srcs
        ) | frozenset(s for c in comps for s in c.outside)

    def _drive(
        self, terms: Sequence[Term], seq: Mapping[str, Tensor], held: Mapping[str, Tensor],
        kwargs, bias: Tensor | None, steps: int, batch: tuple[int, ...],
        start: Tensor | None = None,
    ) -> Tensor | None:
        """External drive of one slot: sequence terms batched over time, held terms once,
        added to ``start`` (a part computed already, over the whole sequence)."""
        timed = tuple(t for t in terms if any(s in seq for s in t.srcs))
        const = tuple(t for t in terms if t not in timed)
        batched = tuple(t for t in timed if t.batchable and not (kwargs and t.key in kwargs))
        opaque = tuple(t for t in timed if t not in batched)
        out = start
        if batched:
            # Row-wise and sample-wise blocks: one call for the whole sequence (a held
            # source of a multi-source block is expanded over time, a view).
            values = {s: seq[s] if s in seq else held[s].expand(steps, *held[s].shape)
                      for t in batched for s in t.srcs}
            out = accumulate(batched, values, kwargs, (steps, *batch), start=out, bias=bias)
            bias = None
        if opaque:
            # An opaque module may give the leading dims a meaning of its own (a
            # sequence-first transformer layer does), so it is called step by step.
            per_step = [
                accumulate(opaque, {s: seq[s][i] if s in seq else held[s]
                                    for t in opaque for s in t.srcs}, kwargs, batch)
                for i in range(steps)
            ]
            y = torch.stack(per_step)
            out = y if out is None else out + y
        c = accumulate(const, held, kwargs, batch, bias=bias)
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
        """Trajectories ``(steps, *batch, *shape)`` of every slot: the state after each
        application."""
        held = {s: v for s, v in init.items() if s in self.frozen and s not in forced}
        # What each block reads at application t (Jacobi: the state before it).
        reads: dict[str, Tensor] = dict(forced)
        traj: dict[str, Tensor] = dict(forced)
        for comp in self.components:
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
            for k, (ext, bias) in enumerate(zip(comp.external, biases)):
                start = None
                if k in fused:
                    term, start = fused[k]
                    ext, bias = tuple(t for t in ext if t is not term), None
                drives.append(self._drive(ext, reads, held, kwargs, bias, steps, batch, start))
            if not comp.cyclic:
                (d,), (drive,) = comp.dests, drives
                out = finish(d, drive, ref, (steps, *batch))
                self._record(d.slot, out, init, reads, traj)
                continue
            fast = _recurrence(comp, drives, init, batch)
            if fast is not None:
                self._record(comp.dests[0].slot, fast, init, reads, traj)
                continue
            if self.ordered:
                whole = _component_kernel(comp, drives, init, batch, steps, kwargs)
                if whole is not None:
                    for d in comp.dests:
                        self._record(d.slot, whole[d.slot], init, reads, traj)
                    continue
            # Per destination: the drive's steps (a time-varying drive), or one tensor
            # that every step reads (held sources and biases only), or None.
            timed: list[tuple[Tensor, ...] | None] = []
            const: list[Tensor | None] = []
            for d, drive in zip(comp.dests, drives):
                varies = drive is not None and drive.dim() == len(batch) + len(d.shape) + 1
                timed.append(drive.unbind(0) if varies else None)
                const.append(None if drive is None or varies else drive.expand(*batch, *d.shape))
            outside = [(s, reads[s].unbind(0) if s in reads else None) for s in comp.outside]
            prev = {d.slot: init[d.slot] for d in comp.dests}
            outs: list[list[Tensor]] = [[] for _ in comp.dests]
            for t in range(steps):
                cur = dict(prev)
                for s, steps_of in outside:  # what internal terms read outside the cycle
                    cur[s] = steps_of[t] if steps_of is not None else held[s]
                new = {}
                for i, d in enumerate(comp.dests):
                    start = timed[i][t] if timed[i] is not None else const[i]
                    pre = accumulate(comp.internal[i], cur, kwargs, batch, start=start)
                    new[d.slot] = out = finish(d, pre, ref, batch)
                    outs[i].append(out)
                    if self.ordered:  # Gauss-Seidel: later slots read the newest value
                        cur[d.slot] = out
                prev = new
            for d, o in zip(comp.dests, outs):
                self._record(d.slot, torch.stack(o), init, reads, traj)
        for s, v in held.items():
            traj[s] = v.expand(steps, *v.shape)
        return traj

    def _record(self, slot: str, seq: Tensor, init, reads, traj) -> None:
        traj[slot] = seq
        if slot not in self.read_downstream:
            return
        if self.ordered:
            reads[slot] = seq
        else:  # Jacobi: application t reads the state after t-1 applications
            reads[slot] = torch.cat([init[slot].unsqueeze(0), seq[:-1]], dim=0)


def _transformed(*tensors: Tensor) -> bool:
    """Whether torch.func (jvp, vmap, grad) is tracing these tensors: then ``out=`` and
    in-place kernels are unavailable and the out-of-place path must be taken."""
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return any(wrapped(t) for t in tensors)


def _plain(module: nn.Module) -> bool:
    """An ``nn.Linear`` the engine may evaluate from its parameters: no hooks (pruning
    and weight norm work through forward pre-hooks) and a real ``weight`` parameter."""
    return not (module._forward_hooks or module._forward_pre_hooks) and (
        "weight" in module._parameters
    )


def _fold_bias(term: Term) -> Term:
    """An internal plain-linear term whose bias the drive carries instead."""
    if term.linear and term.module.bias is not None:
        return Term(term.srcs, term.key, term.module, True, True, None, skip_bias=True)
    return term


#: Built-in activations called as functions in the recurrent loop (exact types only).
_FUNCTIONS = {nn.Tanh: torch.tanh, nn.Sigmoid: torch.sigmoid}


_IN_PLACE = {None: None, torch.tanh: torch.tanh_, torch.sigmoid: torch.sigmoid_,
             torch.relu: torch.relu_}


def _activation_function(act: nn.Module | None):
    """A built-in activation module as its function (exact types), else the module."""
    if act is None:
        return None
    if type(act) is nn.ReLU and not act.inplace:
        return torch.relu
    return _FUNCTIONS.get(type(act), act)


def _recurrence(
    comp: _Component, drives: list[Tensor | None], init: Mapping[str, Tensor], batch: tuple
) -> Tensor | None:
    """The common recurrent cell ``h_t = act(drive_t + h_{t-1} W^T)``, as a tight loop.

    Used for a component of one slot whose only internal block is a plain linear
    self-loop (an RNN layer), with a time-varying drive and one batch dim; returns
    ``None`` when the component is not of that form (the general loop handles it).
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
    h = init[dest.slot]
    if not torch.is_grad_enabled() and act in _IN_PLACE and not _transformed(drive, h, wt):
        # Inference: every step written straight into one new (T, *batch, n) buffer,
        # no per-step allocation and no final stack. (Never into the drive: it may be
        # the caller's tensor, handed on by an identity block.)
        act_ = _IN_PLACE[act]
        buf = torch.empty(drive.shape, dtype=drive.dtype, device=drive.device)
        for x_t, y in zip(drive.unbind(0), buf.unbind(0)):
            torch.addmm(x_t, h, wt, out=y)
            if act_ is not None:
                act_(y)
            h = y
        return buf
    outs = []
    for x_t in drive.unbind(0):
        h = torch.addmm(x_t, h, wt)
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


#: Whole-component kernels, tried in registration order (see register_component_kernel).
_COMPONENT_KERNELS: list = []


def register_component_kernel(kernel) -> None:
    """Let ``kernel`` run whole cyclic components of ordered sequence plans.

    ``kernel(comp, drives, init, batch, steps, kwargs)`` is called for every cyclic
    component of a :class:`SequencePlan` with ``update="ordered"`` that the one-slot
    :func:`_recurrence` loop does not take, before the generic step loop. ``comp`` has
    ``dests`` (the component's destinations in slot order), ``internal``
    (per destination, the terms reading inside the component; plain-linear ones with
    ``skip_bias`` have their bias in the drive) and ``outside``; ``drives[i]`` is the
    external drive of ``dests[i]`` (``(steps, *batch, *shape)``, a tensor every step
    reads, or ``None``), ``init`` the state before the first step. It returns the
    trajectory ``(steps, *batch, *shape)`` of every destination, exactly what the
    Gauss-Seidel step loop computes (values and gradients), or ``None`` to decline: it
    must recognise the whole component (every block, activation, drive and
    ``block_kwargs`` entry) and decline anything else. A kernel registered twice is
    kept once.
    """
    if kernel not in _COMPONENT_KERNELS:
        _COMPONENT_KERNELS.append(kernel)


def _component_kernel(
    comp: _Component, drives: list, init: Mapping[str, Tensor], batch: tuple, steps: int, kwargs
) -> dict[str, Tensor] | None:
    """The first registered kernel's trajectories for ``comp``, or ``None``."""
    for kernel in _COMPONENT_KERNELS:
        out = kernel(comp, drives, init, batch, steps, kwargs)
        if out is not None:
            return out
    return None
