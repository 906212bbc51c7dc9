"""MLPs as block maps (paper §2): ``from_mlp`` and its inverse ``to_mlp``.

An MLP with ``L`` weight layers becomes slots ``x, h1 ... h{L-1}, y`` with
``F[h1, x] = W1, F[h2, h1] = W2, ..., F[y, h{L-1}] = WL`` on the block sub-diagonal,
the layer biases as slot biases and the element-wise layers between two ``Linear``\\ s
as the activation of the slot they follow. With ``x`` held, ``L`` applications give
``y = MLP(x)`` and further applications change nothing (a fixed point); the map itself
is strictly block-lower-triangular, i.e. nilpotent.
"""

from __future__ import annotations

import copy

from torch import nn

from ..core.block_map import BlockMap
from ..core.rowwise import ELEMENTWISE
from ..engine.map_module import MapModule
from ..errors import ConversionError, MapError, MapTypeError

__all__ = ["from_mlp", "to_mlp", "ELEMENTWISE"]


def _activation(mods: list[nn.Module]) -> nn.Module | None:
    mods = [copy.deepcopy(m) for m in mods if type(m) is not nn.Identity]
    if not mods:
        return None
    return mods[0] if len(mods) == 1 else nn.Sequential(*mods)


def from_mlp(mlp: nn.Sequential) -> MapModule:
    """Convert an ``nn.Sequential`` MLP into an equivalent iterated block map.

    The result is a :class:`~iternn.MapModule` (``net.map`` is the
    :class:`~iternn.BlockMap`) with copies of the parameters: ``net(x) == mlp(x)``,
    with the same gradients, and training one does not change the other. The train/eval
    mode is copied too. ``nn.Dropout`` layers become part of a slot activation: active
    in train mode, drawing from the same RNG stream in the same order as the source
    module (same seed, same masks), and the identity in eval mode.

    Raises:
        MapTypeError: (a ``TypeError``) ``mlp`` is not an ``nn.Sequential``, or a layer
            is neither ``Linear`` nor one of :data:`ELEMENTWISE` (the message names the
            layer and its index).
        ConversionError: (a ``ValueError``) no ``Linear`` layer, an element-wise layer
            before the first ``Linear``, consecutive ``Linear`` sizes that do not chain,
            or one ``Linear`` used twice (tied weights).
    """
    if not isinstance(mlp, nn.Sequential):
        raise MapTypeError(f"from_mlp needs an nn.Sequential, got {type(mlp).__name__}")
    linears: list[tuple[int, nn.Linear]] = []
    acts: list[list[nn.Module]] = []
    first_index: dict[int, int] = {}
    for i, layer in enumerate(mlp):
        if type(layer) is nn.Linear and id(layer) in first_index:
            raise ConversionError(
                f"layer {i} (Linear) is the same module as layer {first_index[id(layer)]}: "
                "from_mlp does not convert tied weights (the copies would train apart)"
            )
        first_index.setdefault(id(layer), i)
        if type(layer) is nn.Linear:
            if linears and layer.in_features != linears[-1][1].out_features:
                prev_i, prev = linears[-1]
                raise ConversionError(
                    f"layer {i} (Linear) has in_features={layer.in_features} but layer "
                    f"{prev_i} (Linear) has out_features={prev.out_features}"
                )
            linears.append((i, layer))
            acts.append([])
        elif isinstance(layer, ELEMENTWISE):
            if not linears:
                raise ConversionError(
                    f"layer {i} ({type(layer).__name__}) comes before the first Linear; "
                    "from_mlp needs the Sequential to start with a Linear"
                )
            acts[-1].append(layer)
        else:
            raise MapTypeError(
                f"layer {i} ({type(layer).__name__}) is not supported by from_mlp: "
                f"expected Linear or one of {[t.__name__ for t in ELEMENTWISE]}"
            )
    if not linears:
        raise ConversionError("from_mlp needs at least one Linear layer")
    n_layers = len(linears)
    names = ["x"] + [f"h{k}" for k in range(1, n_layers)] + ["y"]
    sizes = [linears[0][1].in_features] + [lin.out_features for _, lin in linears]
    m = BlockMap(dict(zip(names, sizes)))
    for k, (_, lin) in enumerate(linears):
        dst, src = names[k + 1], names[k]
        block = nn.Linear(lin.in_features, lin.out_features, bias=False,
                          device=lin.weight.device, dtype=lin.weight.dtype)
        block.weight.data.copy_(lin.weight.detach())
        block.weight.requires_grad_(lin.weight.requires_grad)
        m.connect(dst, src, block)
        if lin.bias is not None:
            m.set_bias(dst, lin.bias)
            m.bias(dst).requires_grad_(lin.bias.requires_grad)
        m.set_activation(dst, _activation(acts[k]))
    net = MapModule(m, input="x", output="y")
    net.train(mlp.training)
    return net


def _chain(m: BlockMap, start: str, end: str) -> list[str]:
    """The slots of a chain ``start -> ... -> end`` that covers the whole map."""
    graph = m.graph()
    if graph.sources(start):
        raise ConversionError(f"input slot {start!r} has incoming blocks; not a chain")
    order, slot = [start], start
    while slot != end:
        nxt = graph.targets(slot)
        if len(nxt) != 1:
            raise ConversionError(
                f"slot {slot!r} feeds {len(nxt)} blocks {list(nxt)}; a chain feeds exactly one"
            )
        slot = nxt[0]
        if slot in order:
            raise ConversionError(f"slot {slot!r} is on a cycle; not a chain")
        if len(graph.sources(slot)) != 1:
            raise ConversionError(f"slot {slot!r} reads {list(graph.sources(slot))}; a chain slot reads one")
        order.append(slot)
    if graph.targets(end):
        raise ConversionError(f"output slot {end!r} feeds {list(graph.targets(end))}; not a chain")
    off = [s for s in m.slots if s not in order]
    if off:
        raise ConversionError(f"slot(s) {off} are not on the chain {start!r} -> {end!r}")
    return order


def to_mlp(net: MapModule | BlockMap, *, input: str = "x", output: str = "y") -> nn.Sequential:
    """Convert a chain-shaped map back into an ``nn.Sequential`` (copies parameters).

    Every block must be a plain ``nn.Linear``; a slot's bias becomes that layer's bias
    and its activation follows the layer. ``input``/``output`` name the end slots when
    a bare :class:`BlockMap` is given (a :class:`MapModule` knows them).

    Raises:
        MapTypeError: ``net`` is neither a :class:`MapModule` nor a :class:`BlockMap`, or
            a block is not a plain ``nn.Linear`` (the message names the block).
        MapError: ``input``/``output`` is not a slot of the map.
        ConversionError: the map is not a chain ``input -> ... -> output``, a slot has
            two biases, or the :class:`MapModule` runs fewer applications than its depth.
    """
    if isinstance(net, MapModule):
        m, input, output = net.map, net.input, net.output
        depth = m.graph().levels((input,))
        if depth is not None and net.steps < max(depth.values(), default=0):
            raise ConversionError(
                f"the MapModule runs {net.steps} application(s), fewer than its chain's depth "
                f"{max(depth.values())}: it is not the MLP of its blocks"
            )
    elif isinstance(net, BlockMap):
        m = net
        for role, slot in (("input", input), ("output", output)):
            if slot not in m.slots:
                raise MapError(f"{role} slot {slot!r} is not a slot of the map {list(m.slots)}")
    else:
        raise MapTypeError(f"to_mlp needs a MapModule or a BlockMap, got {type(net).__name__}")
    order = _chain(m, input, output)
    layers: list[nn.Module] = []
    for src, dst in zip(order, order[1:]):
        block = m.block(dst, src)
        if type(block) is not nn.Linear:
            raise MapTypeError(
                f"block {dst!r} <- {src!r} is {type(block).__name__}; to_mlp needs nn.Linear"
            )
        bias = m.bias(dst)
        if bias is not None and block.bias is not None:
            raise ConversionError(
                f"block {dst!r} <- {src!r} has its own bias and slot {dst!r} has one too; "
                "an nn.Linear holds one"
            )
        w = block.weight
        lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None or block.bias is not None,
                        device=w.device, dtype=w.dtype)
        lin.weight.data.copy_(w.detach())
        b = bias if bias is not None else block.bias
        if b is not None:
            lin.bias.data.copy_(b.detach())
        layers.append(lin)
        act = m.activation(dst)
        if isinstance(act, nn.Sequential):
            layers.extend(copy.deepcopy(a) for a in act)
        elif act is not None:
            layers.append(copy.deepcopy(act))
    seq = nn.Sequential(*layers)
    seq.train(m.training)
    return seq
