"""The one object of iternn: a block non-linear map over named slots.

A state ``z = (z_1, ..., z_S)`` is a dict of tensors, one per named slot, each of shape
``(*batch, *shape_slot)`` (batch-first; every slot shares the batch shape; a vector slot
has shape ``(n,)``, a shaped slot any shape, e.g. ``(C, H, W)`` for a feature map). A
block ``F[d, s]`` is any ``nn.Module`` that maps source slot ``s`` to destination slot
``d`` (row = destination, column = source, the ordinary matrix convention); a block may
read several slots, ``F[d, (s, t)](z_s, z_t)`` (a gate, a product, attention). One
application is

    z'_d = act_d( b_d + sum_s F[d, s](z_s) )        for every slot d,

a Jacobi update: every block reads the old state. Missing blocks are zero and cost
nothing; a slot with no incoming block becomes ``act_d(b_d)``. Iterating the
application (see :func:`iternn.iterate`) is a discrete dynamical system; MLPs, RNNs and
transformer stacks are choices of blocks, tying, iteration count, initial state and
forcing.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from types import MappingProxyType

import torch
from torch import Tensor, nn

from ..errors import MapError, MapTypeError
from .calls import call_block, is_shaped
from .graph import BlockGraph
from .memory import check_bytes, tensor_bytes
from .state import check_state, zeros_like_batch
from .summary import Summary, summarize

__all__ = ["BlockMap", "block_key", "Source"]

#: A block's source: one slot name, or a tuple of slot names (a multi-source block).
Source = str | tuple[str, ...]

# Names that nn.ModuleDict / nn.ParameterDict keep for themselves; a slot cannot use them.
_RESERVED = frozenset(dir(nn.ModuleDict())) | frozenset(dir(nn.ParameterDict()))


def block_key(dst: str, src: Source) -> str:
    """The ``state_dict`` key of block ``F[dst, src]``: ``"dst<-src"``, or ``"dst<-a,b"``
    for a block reading the slots ``(a, b)``."""
    return f"{dst}<-{src}" if isinstance(src, str) else f"{dst}<-{','.join(src)}"


def source_slots(src: Source) -> tuple[str, ...]:
    """The slots a block reads, in call order."""
    return (src,) if isinstance(src, str) else src


def _out_of_place(module: nn.Module) -> nn.Module:
    """``module``, or a copy with every ``inplace=True`` switched off (sharing its
    parameters and buffers with ``module``).

    Blocks and activations read tensors the caller still owns (an identity block hands
    the caller's slot tensor on; a bias broadcast is a view of the parameter), so none
    may write into its input.
    """
    if not any(getattr(m, "inplace", False) is True for m in module.modules()):
        return module
    # A copy of the module objects only: parameters and buffers stay the caller's, so
    # weights shared with other blocks (tying) stay shared.
    memo = {id(t): t for t in (*module.parameters(), *module.buffers())}
    module = copy.deepcopy(module, memo)
    for m in module.modules():
        if getattr(m, "inplace", False) is True:
            m.inplace = False
    return module


def _shape_text(shape: tuple[int, ...]) -> str:
    return str(tuple(shape))


def _probe(
    module: nn.Module,
    in_shapes: tuple[tuple[int, ...], ...],
    out_shape: tuple[int, ...],
    where: str,
    src: str,
    dst: str,
) -> None:
    """Call ``module`` once on zeros ``(2, *shape)`` per source and check that it returns
    ``(2, *out_shape)``.

    Runs in eval mode without gradients; the global RNG state and the train/eval mode
    of every submodule are restored afterwards.
    """
    ref = next(iter(module.parameters()), None)
    if ref is None:
        ref = next(iter(module.buffers()), None)
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.get_default_dtype()
    device = ref.device if ref is not None else torch.device("cpu")
    shown = ", ".join(_shape_text((2, *s)) for s in in_shapes)
    check_bytes(tensor_bytes(2 * sum(math.prod(s) for s in in_shapes), dtype),
                f"{where}: the probe input {shown} of {src}", device=device)
    modes = [(m, m.training) for m in module.modules()]
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            module.eval()
            out = module(*(torch.zeros(2, *s, dtype=dtype, device=device) for s in in_shapes))
    except Exception as exc:  # the probe is the only way to learn an opaque module's sizes
        raise MapError(f"{where}: module failed on input {shown} ({src}): {exc}") from exc
    finally:
        for m, mode in modes:
            m.training = mode
    if not isinstance(out, Tensor) or out.shape != (2, *out_shape):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise MapError(
            f"{where}: module maps {shown} to {got}, but {dst} needs {_shape_text((2, *out_shape))}"
        )


def _check_shape(name: str, size: object) -> tuple[int, ...]:
    """A slot's declared size (an int) or shape (a tuple of ints) as a shape tuple."""
    dims = size if isinstance(size, tuple) else (size,)
    if not dims:
        raise MapError(f"shape of slot {name!r} must have at least one dim, got ()")
    for n in dims:
        if isinstance(n, bool) or not isinstance(n, int):
            raise MapTypeError(
                f"size of slot {name!r} must be an int or a tuple of ints, got {size!r}"
            )
        if n <= 0:
            raise MapError(f"size of slot {name!r} must be positive, got {size!r}")
    return dims


def _features(module: nn.Module) -> tuple[int | None, int | None]:
    """Declared (in, out) sizes of a module, where it declares them."""
    n_in = getattr(module, "in_features", None)
    n_out = getattr(module, "out_features", None)
    return (n_in if isinstance(n_in, int) else None, n_out if isinstance(n_out, int) else None)


class BlockMap(nn.Module):
    """A block map ``z -> act(b + F z)`` over named slots.

    Args:
        slots: ordered mapping ``name -> size``. Names must be Python identifiers; a
            size is a positive int (a vector slot) or a tuple of positive ints (a shaped
            slot, e.g. ``(16, 32, 32)``; ``(n,)`` is the same as ``n``). The order is the
            order of :meth:`pack`.

    Blocks are added with :meth:`connect`, per-slot biases with :meth:`set_bias` and
    per-slot activations with :meth:`set_activation` (identity when unset). Calling the
    map, ``m(state)``, is one application. All state lives in registered parameters,
    buffers and submodules, so ``.to()``, ``.double()`` and ``state_dict()`` just work.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from iternn import BlockMap
        >>> m = BlockMap({"x": 3, "h": 4, "y": 2})
        >>> _ = m.connect("h", "x", nn.Linear(3, 4, bias=False))
        >>> _ = m.connect("y", "h", nn.Linear(4, 2, bias=False))
        >>> m.set_activation("h", nn.Tanh())
        >>> m.impulse_response_length()
        2
    """

    def __init__(self, slots: Mapping[str, int | tuple[int, ...]]) -> None:
        super().__init__()
        if not isinstance(slots, Mapping):
            raise MapTypeError(f"slots must be a mapping name -> size, got {type(slots).__name__}")
        if not slots:
            raise MapError("a BlockMap needs at least one slot")
        shapes: dict[str, tuple[int, ...]] = {}
        for name, size in slots.items():
            if not isinstance(name, str) or not name.isidentifier():
                raise MapError(f"slot name {name!r} is not a Python identifier")
            if name in _RESERVED:
                raise MapError(f"slot name {name!r} is reserved (it is an nn.Module attribute)")
            shapes[name] = _check_shape(name, size)
        self._shapes = shapes
        self._slots = {name: math.prod(shape) for name, shape in shapes.items()}
        self.blocks = nn.ModuleDict()
        self.biases = nn.ParameterDict()
        self.activations = nn.ModuleDict()
        self._edges: dict[tuple[str, Source], str] = {}
        # Bumped on every structural change; the engine keys its cached plans on it.
        self._version = 0
        self._plans: dict = {}
        self.register_load_state_dict_post_hook(BlockMap._loaded)

    # ------------------------------------------------------------------ structure
    @property
    def slots(self) -> Mapping[str, int]:
        """Read-only ordered mapping ``slot -> size`` (its number of units: the product
        of its shape)."""
        return MappingProxyType(self._slots)

    @property
    def shapes(self) -> Mapping[str, tuple[int, ...]]:
        """Read-only ordered mapping ``slot -> shape`` (``(n,)`` for a vector slot); a
        slot tensor is ``(*batch, *shape)``."""
        return MappingProxyType(self._shapes)

    @property
    def size(self) -> int:
        """Total state size ``sum_s n_s`` (the length of a packed state)."""
        return sum(self._slots.values())

    @property
    def edges(self) -> tuple[tuple[str, Source], ...]:
        """``(destination, source)`` of every block, in the order they were connected;
        ``source`` is a slot name, or a tuple of names for a multi-source block."""
        return tuple(self._edges)

    def _check_slot(self, slot: object, role: str = "slot") -> str:
        if not isinstance(slot, str):
            raise MapTypeError(f"{role} must be a slot name (str), got {type(slot).__name__}")
        if slot not in self._slots:
            raise MapError(f"unknown {role} {slot!r}; slots are {list(self._slots)}")
        return slot

    def _changed(self) -> None:
        self._version += 1
        self._plans.clear()

    def _check_source(self, src: object) -> Source:
        """A block's source as stored: a slot name, or a tuple of >= 2 slot names."""
        if isinstance(src, (tuple, list)):
            if not src:
                raise MapError("a block needs at least one source slot, got ()")
            for s in src:
                self._check_slot(s, "source slot")
            return src[0] if len(src) == 1 else tuple(src)
        return self._check_slot(src, "source slot")

    def connect(self, dst: str, src: Source, module: nn.Module) -> nn.Module:
        """Add block ``F[dst, src] = module`` (row ``dst``, column ``src``) and return it.

        ``src`` is a slot name, or a tuple of slot names for a block that reads several
        slots: ``module(z_a, z_b, ...)`` in the tuple's order (a gate, a product,
        attention); its output is summed into ``dst`` like any block's. ``module`` maps
        tensors ``(*batch, *shape_src)`` to ``(*batch, *shape_dst)``; a block touching a
        shaped slot is called with the batch dims flattened into one, ``(B, *shape)``
        (see :mod:`iternn.core.calls`), so convolutions and pooling are blocks as they
        are. Sizes are checked now: from ``in_features``/``out_features`` where a
        one-source block between vector slots declares them, otherwise by one probe call
        on zeros ``(2, *shape)`` per source (in eval mode, without gradients, with the
        global RNG state and every submodule's mode restored). Connecting a block that
        already exists is an error; :meth:`disconnect` it first. A module with in-place
        operations (``inplace=True``) would overwrite the state it reads, so such a
        module is stored as an out-of-place copy (of the module objects only: it shares
        the given module's parameters and buffers); any other module is stored as given
        (the returned object is the one in the map).
        """
        self._check_slot(dst, "destination slot")
        src = self._check_source(src)
        if not isinstance(module, nn.Module):
            raise MapTypeError(
                f"block {dst!r} <- {src!r} must be an nn.Module, got {type(module).__name__}"
            )
        if (dst, src) in self._edges:
            raise MapError(f"block {dst!r} <- {src!r} already exists; disconnect it first")
        self._check_block_shape(dst, src, module)
        module = _out_of_place(module)
        key = block_key(dst, src)
        self.blocks[key] = module
        self._edges[(dst, src)] = key
        self._changed()
        return module

    def _check_block_shape(self, dst: str, src: Source, module: nn.Module) -> None:
        where = f"block {dst!r} <- {src!r}"
        srcs = source_slots(src)
        in_shapes = tuple(self._shapes[s] for s in srcs)
        if len(srcs) > 1 or is_shaped(*in_shapes, self._shapes[dst]):
            names = ", ".join(repr(s) for s in srcs)
            _probe(module, in_shapes, self._shapes[dst], where,
                   f"source slot(s) {names}", f"destination slot {dst!r}")
            return
        n_src, n_dst = self._slots[src], self._slots[dst]
        n_in, n_out = _features(module)
        if n_in is not None and n_in != n_src:
            raise MapError(
                f"{where}: module has in_features={n_in} but source slot {src!r} has size {n_src}"
            )
        if n_out is not None and n_out != n_dst:
            raise MapError(
                f"{where}: module has out_features={n_out} but destination slot {dst!r} "
                f"has size {n_dst}"
            )
        if n_in is None or n_out is None:
            _probe(module, in_shapes, (n_dst,), where, f"source slot {src!r}",
                   f"destination slot {dst!r}")

    def disconnect(self, dst: str, src: Source) -> nn.Module:
        """Remove block ``F[dst, src]`` and return it."""
        src = tuple(src) if isinstance(src, list) else src
        if (dst, src) not in self._edges:
            raise MapError(f"there is no block {dst!r} <- {src!r}")
        key = self._edges.pop((dst, src))
        module = self.blocks[key]
        del self.blocks[key]
        self._changed()
        return module

    def block(self, dst: str, src: Source) -> nn.Module:
        """The module of block ``F[dst, src]`` (``src`` a slot, or a tuple of slots)."""
        src = tuple(src) if isinstance(src, list) else src
        key = self._edges.get((dst, src))
        if key is None:
            self._check_slot(dst, "destination slot")
            self._check_source(src)
            raise MapError(f"there is no block {dst!r} <- {src!r}")
        return self.blocks[key]

    def set_activation(self, slot: str, module: nn.Module | None) -> None:
        """Set ``act_slot`` to an element-wise module; ``None`` (or ``nn.Identity``) clears it.

        The module must map ``(*batch, *shape)`` to the same shape (checked by a probe;
        on a shaped slot it is called batch-flattened, like a block). An in-place module
        (``inplace=True``) is stored as an out-of-place copy.
        """
        self._check_slot(slot)
        if module is not None and not isinstance(module, nn.Module):
            raise MapTypeError(
                f"activation of slot {slot!r} must be an nn.Module or None, "
                f"got {type(module).__name__}"
            )
        if module is None or type(module) is nn.Identity:
            if slot in self.activations:
                del self.activations[slot]
        else:
            shape = self._shapes[slot]
            _probe(module, (shape,), shape, f"activation of slot {slot!r}", f"slot {slot!r}",
                   f"slot {slot!r}")
            self.activations[slot] = _out_of_place(module)
        self._changed()

    def activation(self, slot: str) -> nn.Module | None:
        """The activation module of ``slot`` (``None`` means identity)."""
        self._check_slot(slot)
        return self.activations[slot] if slot in self.activations else None

    def set_bias(self, slot: str, bias: Tensor | bool | None = True) -> None:
        """Give ``slot`` a trainable bias ``b_slot``.

        ``bias`` is a tensor of the slot's shape (copied into a new parameter), ``True``
        for a zero-initialised one, or ``None``/``False`` to remove it.
        """
        self._check_slot(slot)
        n, shape = self._slots[slot], self._shapes[slot]
        if bias is None or bias is False:
            if slot in self.biases:
                del self.biases[slot]
            self._changed()
            return
        if bias is True:
            ref = next(iter(self.parameters()), None)
            dtype = ref.dtype if ref is not None else torch.get_default_dtype()
            device = ref.device if ref is not None else None
            check_bytes(tensor_bytes(n, dtype), f"bias of slot {slot!r} ({n} entries, {dtype})",
                        device=device)
            value = torch.zeros(shape, dtype=dtype, device=device)
        elif isinstance(bias, Tensor):
            if bias.shape != shape:
                raise MapError(
                    f"bias of slot {slot!r} must have shape {_shape_text(shape)}, "
                    f"got {tuple(bias.shape)}"
                )
            if not bias.is_floating_point():
                raise MapTypeError(f"bias of slot {slot!r} must be floating point, got {bias.dtype}")
            dtypes = {p.dtype for p in self.parameters() if p.is_floating_point()}
            if dtypes and bias.dtype not in dtypes:
                raise MapTypeError(
                    f"bias of slot {slot!r} has dtype {bias.dtype} but the map's parameters are "
                    f"{sorted(map(str, dtypes))}; convert it first"
                )
            value = bias.detach().clone()
        else:
            raise MapTypeError(
                f"bias of slot {slot!r} must be a tensor, True or None, got {type(bias).__name__}"
            )
        self.biases[slot] = nn.Parameter(value)
        self._changed()

    def bias(self, slot: str) -> Tensor | None:
        """The bias parameter of ``slot``, or ``None``."""
        self._check_slot(slot)
        return self.biases[slot] if slot in self.biases else None

    def graph(self) -> BlockGraph:
        """The block dependency graph (row = destination, column = source); a block
        reading several slots is an edge from each."""
        pairs = (
            (d, s) for (d, src) in self._edges for s in source_slots(src)
        )
        return BlockGraph(tuple(self._slots), tuple(dict.fromkeys(pairs)))

    def impulse_response_length(self, hold: tuple[str, ...] | list[str] = ()) -> float:
        """How many applications the initial state is felt for (the impulse response's length).

        The longest block path for an acyclic map (``L`` for an ``L``-layer MLP): after
        ``L`` applications the output still depends on the initial state, after ``L + 1``
        nothing does. ``math.inf`` with a cycle, or when a held slot feeds a block.
        """
        for s in hold:
            self._check_slot(s, "held slot")
        length = self.graph().impulse_response_length(hold)
        return length if math.isinf(length) else int(length)

    def sources(self, dst: str) -> tuple[str, ...]:
        """Slots read by ``dst`` (the non-zero columns of row ``dst``), each once, in
        connect order."""
        self._check_slot(dst)
        found = (s for (d, src) in self._edges if d == dst for s in source_slots(src))
        return tuple(dict.fromkeys(found))

    # ------------------------------------------------------------------ state
    def pack(self, state: Mapping[str, Tensor]) -> Tensor:
        """Flatten every slot row-major and concatenate them in slot order:
        ``(*batch, size)``."""
        batch, _, _ = check_state(self, state, require_all=True)
        return torch.cat([state[s].reshape(*batch, n) for s, n in self._slots.items()], dim=-1)

    def unpack(self, flat: Tensor) -> dict[str, Tensor]:
        """Split a packed ``(*batch, size)`` tensor into a state dict of
        ``(*batch, *shape)`` tensors (views, no copy)."""
        if not isinstance(flat, Tensor):
            raise MapTypeError(f"packed state must be a tensor, got {type(flat).__name__}")
        if flat.dim() < 1 or flat.shape[-1] != self.size:
            raise MapError(
                f"packed state must have last dim {self.size} (sum of slot sizes), "
                f"got shape {tuple(flat.shape)}"
            )
        parts = torch.split(flat, list(self._slots.values()), dim=-1)
        batch = flat.shape[:-1]
        return {s: p.view(*batch, *self._shapes[s]) for s, p in zip(self._slots, parts)}

    # ------------------------------------------------------------------ application
    def destination(self, dst: str, state: Mapping[str, Tensor], **block_kwargs) -> Tensor:
        """``act_dst(b_dst + sum_s F[dst, s](state[s]))`` for one destination slot."""
        shape = self._shapes[dst]
        ref_slot = next(iter(state))
        ref = state[ref_slot]
        batch = tuple(ref.shape[: ref.dim() - len(self._shapes[ref_slot])])
        out = None
        for (d, src), key in self._edges.items():
            if d != dst:
                continue
            srcs = source_slots(src)
            flat = is_shaped(shape, *(self._shapes[s] for s in srcs))
            y = call_block(self.blocks[key], [state[s] for s in srcs], batch,
                           shape if flat else None, block_kwargs.get(key))
            out = y if out is None else out + y
        b = self.biases[dst] if dst in self.biases else None
        if out is None:
            out = zeros_like_batch(ref, batch, shape)
        if b is not None:
            out = out + b
        if dst in self.activations:
            out = call_block(self.activations[dst], (out,), batch,
                             shape if is_shaped(shape) else None)
        return out

    def forward(self, state: Mapping[str, Tensor], **block_kwargs) -> dict[str, Tensor]:
        """One application ``z' = act(b + F z)`` (Jacobi: every block reads ``state``).

        ``state`` must hold every slot. Keyword arguments named by a block key
        (``"dst<-src"``) are passed to that block, e.g. attention masks. Returns a new
        dict; the input tensors are never modified.
        """
        check_state(self, state, require_all=True)
        unknown = [k for k in block_kwargs if k not in self.blocks]
        if unknown:
            raise MapError(f"block_kwargs names unknown block(s) {unknown}")
        return {d: self.destination(d, state, **block_kwargs) for d in self._slots}

    # ------------------------------------------------------------------ display
    def extra_repr(self) -> str:
        slots = ", ".join(
            f"{k}={v[0] if len(v) == 1 else v}" for k, v in self._shapes.items()
        )
        return f"slots=({slots}), blocks={len(self._edges)}"

    def summary(self) -> Summary:
        """Per block: kind, shape, density, trainable/fixed/stored counts and backend;
        slot biases; totals. ``print(m.summary())`` shows the table."""
        return summarize(self)

    # ------------------------------------------------------------------ internals
    def _apply(self, fn, *args, **kwargs):  # .to(), .double(), .cuda() ...
        out = super()._apply(fn, *args, **kwargs)
        self._plans.clear()
        return out

    @staticmethod
    def _loaded(module: BlockMap, incompatible_keys) -> None:
        module._plans.clear()  # parameters may have been replaced (assign=True)

    def __getstate__(self):  # copies and pickles rebuild their plans
        state = self.__dict__.copy()
        state["_plans"] = {}
        return state
