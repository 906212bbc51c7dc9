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

**Structural zeros.** A slot left out of the initial state is zero, and a held slot left
out stays zero for ever. A block that reads only zero slots and maps zero to zero (a
``Linear`` or convolution without bias, ``Identity``, ``ReLU``, ``Tanh``, an
``nn.Sequential`` of those, or a block class that declares ``linear = True`` (see
:class:`~iternn.core.protocols.LinearBlock`) and has no ``bias``; never a module with
hooks) adds nothing, so it is not evaluated, forward or backward. A slot none of whose
blocks is evaluated is zero after the application when it has no bias and its
activation maps 0 to 0 (none, ``nn.Identity``, ``nn.ReLU`` or ``nn.Tanh``, exact types);
it is then not evaluated either, and the blocks reading it are skipped in the next
application (in an ordered sweep, later in the same one). Which slots are zero follows
from the structure and the slots given, so plans are built for them once and cached.

**Liveness.** Asked for some slots only (``iterate(..., outputs=...)``), a step plan
evaluates in each application only what a later application, or the result, reads; a
sequence plan skips the components nothing asked for depends on. The wavefront computes
every slot (a converted model's unused layer calls keep their random draws and running
statistics) and drops values after their last reader.

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
such a module in another one to keep its hooks. The other blocks of a destination may
be taken by a *product kernel* (:func:`register_product_kernel`), which computes several
of them, and the slot bias, as one product (the sparse package registers one for its
compressed blocks).

While the autograd profiler runs (``torch.profiler.profile``), the plans label their
work with ``record_function``: ``iternn.application {k}`` (each application of a step
plan, from 1), ``iternn.wavefront``, ``iternn.component {slot,slot}``,
``iternn.slot {slot}`` (a destination's evaluation), ``iternn.product {slot}<-{src,src}``
(a product kernel's call) and ``iternn.block {dst}<-{src}`` (a block evaluated on its
own). Without a profiler nothing is labelled.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import profiler as autograd_profiler
from torch.autograd.profiler import record_function

from ..core.block_map import BlockMap, block_key, source_slots
from ..core.calls import call_block, is_shaped
from ..core.graph import BlockGraph
from ..core.rowwise import is_rowwise, is_samplewise
from ..core.state import parameter_spec
from ..errors import MapError

__all__ = [
    "Destination",
    "Product",
    "Wavefront",
    "SequencePlan",
    "StepPlan",
    "compile_destinations",
    "register_component_kernel",
    "register_product_kernel",
]


# Profiler labels: a plan asks ``autograd_profiler._is_profiler_enabled and
# torch.autograd._profiler_enabled()`` once per call. torch's Python profilers set that
# module flag when they start, and it costs nothing to read; the exact check alone, on
# every call, would cost a per cent or two of a small map's forward.


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
    keeps_zero: bool = False  # maps zero sources to zero: skipped while they all are zero

    @property
    def src(self) -> str:
        """The source of a one-source block (a linear term's)."""
        return self.srcs[0]


#: Element-wise modules with f(0) = 0 that the zero analysis knows (exact types).
_ZERO_FIXED = (nn.Identity, nn.ReLU, nn.Tanh)

#: Layers that map zero to zero when they have no bias (exact types).
_AFFINE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
           nn.ConvTranspose2d, nn.ConvTranspose3d)


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def keeps_zero(module: nn.Module) -> bool:
    """Whether ``module`` maps zero inputs to zero, from its type alone: the engine may
    then skip it while everything it reads is zero (see the module docstring)."""
    if _hooked(module):
        return False
    kind = type(module)
    if kind in _ZERO_FIXED:
        return True
    if kind in _AFFINE:
        return module.bias is None
    if kind is nn.Sequential:
        return all(keeps_zero(m) for m in module)
    return getattr(kind, "linear", None) is True and getattr(module, "bias", None) is None


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

    @property
    def zeroable(self) -> bool:
        """Whether the slot is zero whenever all its blocks are: no bias, and an
        activation that maps 0 to 0."""
        act = self.act
        return self.slot not in self.biases and (
            act is None or (type(act) in _ZERO_FIXED and not _hooked(act))
        )


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
        terms[dst].append(Term(srcs, key, mod, linear, batchable, shapes[dst] if shaped else None,
                               keeps_zero=keeps_zero(mod)))
    return {
        d: Destination(d, shape, tuple(terms[d]), m.biases._parameters, m.activation(d))
        for d, shape in shapes.items()
    }


def _dropped(term: Term, zero: Collection[str]) -> bool:
    """Whether ``term`` adds nothing while the slots in ``zero`` are zero."""
    return term.keeps_zero and all(s in zero for s in term.srcs)


def _kept(terms: Sequence[Term], zero: Collection[str]) -> tuple[Term, ...]:
    return tuple(t for t in terms if not _dropped(t, zero))


def _reads(terms: Sequence[Term]) -> tuple[str, ...]:
    """The slots some of ``terms`` read, each once, in call order."""
    return tuple(dict.fromkeys(s for t in terms for s in t.srcs))


class _ZeroFilled(dict):
    """Slot values in which a slot left out reads as zeros ``(*batch, *shape)``, made
    (with ``ref``'s dtype and device) when first read; ``in`` and ``get`` do not make
    them."""

    def __init__(self, values: Mapping[str, Tensor], shapes: Mapping[str, tuple[int, ...]],
                 ref: Tensor, batch: tuple[int, ...]) -> None:
        super().__init__(values)
        self._shapes, self._ref, self._batch = shapes, ref, batch

    def __missing__(self, slot: str) -> Tensor:
        zero = self[slot] = self._ref.new_zeros(*self._batch, *self._shapes[slot])
        return zero


# ---------------------------------------------------------------------------- products
class Product(Protocol):
    """What a product kernel returns: some terms of one destination as one product."""

    #: The terms it computes: a non-empty subset of the terms offered to the kernel.
    terms: tuple[Term, ...]

    def __call__(self, values: Mapping[str, Tensor], bias: Tensor | None,
                 batch: tuple[int, ...]) -> Tensor | None:
        """``bias + sum`` of its terms over ``values`` (slot -> ``(*batch, *shape)``), of
        shape ``(*batch, *dst_shape)``; ``None`` declines this call (the engine then
        evaluates the terms itself)."""
        ...


#: Product kernels, tried in registration order (see register_product_kernel).
_PRODUCT_KERNELS: list = []


def register_product_kernel(kernel) -> None:
    """Let ``kernel`` compute several blocks of one destination as one product.

    ``kernel(terms)`` is called when a plan is built, once per tuple of terms of one
    destination that the engine would add up (after the blocks skipped for reading
    zeros are left out, and without plain ``nn.Linear`` terms, which the engine fuses
    into its own matmuls): in a step plan's application, in a wavefront slot with more
    than one block or a block that is not a plain ``nn.Linear``, and in a sequence
    plan's batched drives and step loop. It returns ``None``, or a :class:`Product`
    whose ``terms`` are the terms it takes (at least one); the engine adds the others.
    A call of the product gets the slot bias the engine would otherwise add (fold it
    in: the engine does not add it again) and returns ``bias + sum`` of its terms, or
    ``None`` to decline that call. A product is not used in a call whose
    ``block_kwargs`` name one of its terms. The first kernel that returns a product
    wins; a kernel registered twice is kept once. Plans are cached per map with the
    kernels registered when they were built.
    """
    if kernel not in _PRODUCT_KERNELS:
        _PRODUCT_KERNELS.append(kernel)


def product_kernels() -> tuple:
    """The registered product kernels (part of the key a plan is cached under)."""
    return tuple(_PRODUCT_KERNELS)


def _find_product(terms: tuple[Term, ...]) -> Product | None:
    """The first registered kernel's product for ``terms`` (checked), or ``None``."""
    for kernel in _PRODUCT_KERNELS:
        product = kernel(terms)
        if product is None:
            continue
        claimed = getattr(product, "terms", None)
        if (not isinstance(claimed, tuple) or not claimed
                or any(t not in terms for t in claimed) or len(set(claimed)) != len(claimed)):
            keys = [getattr(t, "key", t) for t in claimed] if isinstance(claimed, tuple) else claimed
            raise MapError(
                f"product kernel {kernel!r} returned a product whose terms {keys!r} are not a "
                f"non-empty tuple of distinct terms among those offered {[t.key for t in terms]}"
            )
        return product
    return None


@dataclass(frozen=True)
class _Sum:
    """The terms of one destination that one ``accumulate`` call adds up, and the
    product kernel's part of them (``rest``: the terms outside the product)."""

    slot: str
    terms: tuple[Term, ...]
    product: Product | None
    rest: tuple[Term, ...]
    label: str = ""  # the product's profiler label

    def without(self, drop: Collection[Term]) -> _Sum:
        """These terms less ``drop`` (with no product if it computes one of them)."""
        terms = tuple(t for t in self.terms if t not in drop)
        if self.product is not None and any(t in drop for t in self.product.terms):
            return _Sum(self.slot, terms, None, terms)
        return replace(self, terms=terms, rest=tuple(t for t in self.rest if t not in drop))


def _sum(slot: str, terms: Sequence[Term]) -> _Sum:
    """``terms`` of ``slot`` with the product a registered kernel offers for them."""
    terms = tuple(terms)
    offered = tuple(t for t in terms if not t.linear)
    product = _find_product(offered) if offered else None
    if product is None:
        return _Sum(slot, terms, None, terms)
    rest = tuple(t for t in terms if t not in product.terms)
    return _Sum(slot, terms, product, rest,
                f"iternn.product {slot}<-{','.join(_reads(product.terms))}")


def _add_term(out: Tensor | None, bias: Tensor | None, term: Term, values: Mapping[str, Tensor],
              kwargs: Mapping[str, Mapping] | None, batch: tuple[int, ...]):
    """``out + F(values)`` for one term; the first plain linear term also takes ``bias``
    (returned as ``None`` once added)."""
    if term.linear and _plain(term.module) and not (kwargs and term.key in kwargs):
        z = values[term.srcs[0]]
        w = term.module.weight
        wb = None if term.skip_bias else term.module.bias
        if out is None:  # the first matmul takes every bias: an (n,)-sized add
            if bias is not None:
                wb, bias = (bias if wb is None else wb + bias), None
            return F.linear(z, w, wb), bias
        if wb is None and z.dim() == 2 and out.dim() == 2:
            return torch.addmm(out, z, w.t()), bias
        return out + F.linear(z, w, wb), bias
    y = call_block(term.module, [values[s] for s in term.srcs], batch, term.out_shape,
                   kwargs.get(term.key) if kwargs else None)
    return (y if out is None else out + y), bias


def accumulate(
    s: _Sum,
    values: Mapping[str, Tensor],
    kwargs: Mapping[str, Mapping] | None,
    batch: tuple[int, ...],
    start: Tensor | None = None,
    bias: Tensor | None = None,
    prof: bool = False,
) -> Tensor | None:
    """``start + bias + sum F[., s](values[s])`` over the terms of ``s``, fused into as
    few kernels as possible (a product kernel's product first, then the other terms).

    ``batch`` is the batch shape of ``values`` (blocks on shaped slots are called with it
    flattened). Returns ``None`` when there is nothing to add (no start, no terms, no
    bias). ``prof``: label each product and block for the profiler.
    """
    terms = s.terms
    product = s.product
    if product is not None and not (kwargs and any(t.key in kwargs for t in product.terms)):
        if prof:
            with record_function(s.label):
                y = product(values, bias, batch)
        else:
            y = product(values, bias, batch)
        if y is not None:
            terms, bias = s.rest, None
            start = y if start is None else start + y
    out = start
    for term in terms:
        if prof:
            with record_function(f"iternn.block {term.key}"):
                out, bias = _add_term(out, bias, term, values, kwargs, batch)
        else:
            out, bias = _add_term(out, bias, term, values, kwargs, batch)
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


@dataclass(frozen=True)
class _Eval:
    """One destination of an application: the sum of its terms left after the zero
    analysis, or ``None`` when it comes out zero (its old value is then dropped)."""

    dest: Destination
    sum: _Sum | None
    fill: tuple[str, ...] = ()  # zero slots its terms read: made before it runs


def _evaluate(ev: _Eval, values: Mapping[str, Tensor], kwargs, ref: Tensor,
              batch: tuple[int, ...], prof: bool) -> Tensor:
    """The new value of ``ev.dest.slot`` from ``values``."""
    d = ev.dest
    if prof:
        with record_function(f"iternn.slot {d.slot}"):
            return finish(d, accumulate(ev.sum, values, kwargs, batch, bias=d.bias, prof=True),
                          ref, batch)
    return finish(d, accumulate(ev.sum, values, kwargs, batch, bias=d.bias), ref, batch)


class _ZeroGradient(torch.autograd.Function):
    """A zero scalar whose gradient is zeros for each of its inputs (parameters)."""

    @staticmethod
    def forward(*params: Tensor) -> Tensor:
        return params[0].new_zeros(())

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.specs = [(p.shape, p.dtype, p.device) for p in inputs]

    @staticmethod
    def backward(ctx, grad: Tensor):
        return tuple(torch.zeros(shape, dtype=dtype, device=device)
                     for shape, dtype, device in ctx.specs)

    @staticmethod
    def jvp(ctx, *tangents):
        _, dtype, device = ctx.specs[0]
        return torch.zeros((), dtype=dtype, device=device)


def _unused(dests: Sequence[Destination], evaluated: Collection[str]) -> dict[str, nn.Module]:
    """The blocks into ``dests`` whose keys are not ``evaluated``, by key."""
    return {t.key: t.module for d in dests for t in d.terms if t.key not in evaluated}


def _zero_gradients(out: dict[str, Tensor], skipped: Sequence[nn.Module],
                    frozen: Collection[str]) -> dict[str, Tensor]:
    """``out`` (updated in place) where the computed slots that need a gradient also
    give the parameters of ``skipped`` a zero gradient.

    The blocks skipped for reading only zeros, when no application evaluates them,
    would otherwise leave their parameters without a gradient (``None``), where
    applying the map step by step gives zeros; an optimizer with weight decay or
    momentum treats the two differently.
    """
    if not skipped or not torch.is_grad_enabled() or torch._C._are_functorch_transforms_active():
        return out
    params = list({id(p): p for mod in skipped for p in mod.parameters() if p.requires_grad}.values())
    if params:
        zero = _ZeroGradient.apply(*params)
        for s, v in out.items():
            if s not in frozen and v.requires_grad:
                out[s] = v + zero
    return out


# ---------------------------------------------------------------------------- step plan
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


# ---------------------------------------------------------------------------- wavefront
class Wavefront:
    """Each slot evaluated once, in a topological order (acyclic structure only).

    ``zero``: frozen slots that are left out of the state (zero). A slot whose blocks
    read only zeros comes out zero (see the module docstring) and is not evaluated.

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


# ---------------------------------------------------------------------------- sequence plan
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


def _plain(module: nn.Module) -> bool:
    """An ``nn.Linear`` the engine may evaluate from its parameters: no hooks (pruning
    and weight norm work through forward pre-hooks) and a real ``weight`` parameter."""
    return not (module._forward_hooks or module._forward_pre_hooks) and (
        "weight" in module._parameters
    )


def _fold_bias(term: Term) -> Term:
    """An internal plain-linear term whose bias the drive carries instead (it then maps
    zero to zero)."""
    if term.linear and term.module.bias is not None and _plain(term.module):
        return replace(term, batchable=True, out_shape=None, skip_bias=True, keeps_zero=True)
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
    reads, or ``None``), ``init`` the state before the first step (a slot left out of
    the state reads as zeros). It returns the trajectory ``(steps, *batch, *shape)`` of
    every destination, exactly what the Gauss-Seidel step loop computes (values and
    gradients), or ``None`` to decline: it must recognise the whole component (every
    block, activation, drive and ``block_kwargs`` entry) and decline anything else. A
    kernel registered twice is kept once.
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
