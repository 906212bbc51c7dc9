"""Execution plans: the same iteration, scheduled so the map runs at native speed.

Every plan computes exactly what repeated application of :meth:`BlockMap.forward`
computes (the Jacobi update, or the ordered sweep of ``update="ordered"``); only the
schedule differs. Each plan has a module of its own:
:class:`~iternn.engine.wavefront.Wavefront` (acyclic structure, each slot evaluated
once), :class:`~iternn.engine.sequence.SequencePlan` (forced maps and trajectories, one
component at a time over the whole sequence) and :class:`~iternn.engine.step.StepPlan`
(one application at a time). This module holds what they share: each destination slot
``d`` compiled to the terms of ``z'_d = act_d(b_d + sum_s F[d, s](z_s))``
(:func:`compile_destinations`), their sum and activation (:func:`accumulate`,
:func:`finish`), the zero analysis, and the product- and component-kernel registries.

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

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.profiler import record_function

from ..core.block_map import BlockMap, block_key, source_slots
from ..core.calls import call_block, is_shaped
from ..core.rowwise import is_rowwise, is_samplewise
from ..errors import MapError

__all__ = [
    "Destination",
    "Product",
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


def _plain(module: nn.Module) -> bool:
    """An ``nn.Linear`` the engine may evaluate from its parameters: no hooks (pruning
    and weight norm work through forward pre-hooks) and a real ``weight`` parameter."""
    return not (module._forward_hooks or module._forward_pre_hooks) and (
        "weight" in module._parameters
    )


#: Built-in activations called as functions in the recurrent loop (exact types only).
_FUNCTIONS = {nn.Tanh: torch.tanh, nn.Sigmoid: torch.sigmoid}


def _activation_function(act: nn.Module | None):
    """A built-in activation module as its function (exact types), else the module."""
    if act is None:
        return None
    if type(act) is nn.ReLU and not act.inplace:
        return torch.relu
    return _FUNCTIONS.get(type(act), act)


#: Whole-component kernels, tried in registration order (see register_component_kernel).
_COMPONENT_KERNELS: list = []


def register_component_kernel(kernel) -> None:
    """Let ``kernel`` run whole cyclic components of ordered sequence plans.

    ``kernel(comp, drives, init, batch, steps, kwargs)`` is called for every cyclic
    component of a :class:`~iternn.engine.sequence.SequencePlan` with
    ``update="ordered"`` that the one-slot :func:`~iternn.engine.sequence._recurrence`
    loop does not take, before the generic step loop. ``comp`` has
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
