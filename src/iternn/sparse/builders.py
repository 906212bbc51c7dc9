"""Builders for the sparsity study: random block maps and parameter-matched maps.

The paper compares, at equal numbers of *trainable* parameters, an MLP, a dense block map
and random-sparse block maps (§8). The follow-up (arXiv 2509.15057) uses maps over the
slots ``(x, h, y)`` whose six blocks into ``h`` and ``y`` each get their own density, and
solves the hidden width ``|h|`` from a parameter budget ``N`` — a quadratic in ``|h|``:

    N = d_hh h² + (d_hx n_x + d_hy n_y + d_yh n_y + 1) h + d_yx n_y n_x + d_yy n_y² + n_y

(the two ``1``/``n_y`` terms are the trainable slot biases of ``h`` and ``y``). Block
names follow that notation: ``"hx"`` is ``F[h, x]`` (row ``h``, column ``x``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping

import torch
from torch import nn

from ..core.block_map import BlockMap
from ..core.rowwise import ELEMENTWISE
from ..core.summary import count_trainable
from ..engine.map_module import MapModule
from .patterns import BlockSpec, make_block, parse_spec

__all__ = [
    "SIX_BLOCKS",
    "random_map",
    "six_block_counts",
    "solve_hidden_width",
    "six_block_map",
    "matched_map",
    "mlp_sizes",
]

#: The six blocks of an (x, h, y) map, follow-up notation: destination then source.
SIX_BLOCKS: tuple[str, ...] = ("hx", "hh", "hy", "yx", "yh", "yy")


def _generator(seed: int | torch.Generator | None) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    if seed is None:
        raise ValueError("a seed (int) or a torch.Generator is required: builders are reproducible")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or a torch.Generator, got {type(seed).__name__}")
    return torch.Generator().manual_seed(seed)


def _spec(value: str | float | BlockSpec, where: str) -> BlockSpec:
    """A block spec from a pattern string, a spec, or a bare density."""
    if isinstance(value, BlockSpec):
        return value
    if isinstance(value, str):
        return parse_spec(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"block {where}: expected a pattern string or a density, got {value!r}")
    if not 0 <= value <= 1:
        raise ValueError(f"block {where}: density must be in [0, 1], got {value}")
    if value == 0:
        return parse_spec("0")
    return parse_spec("W" if value == 1 else f"R={value!r}")


def random_map(
    slots: Mapping[str, int],
    blocks: Mapping[tuple[str, str], str | float | BlockSpec],
    *,
    biases: tuple[str, ...] | list[str] = (),
    activations: Mapping[str, nn.Module] | None = None,
    seed: int | torch.Generator = 0,
    backend: str = "auto",
) -> BlockMap:
    """A block map with each block ``(dst, src)`` drawn from its pattern spec or density.

    ``blocks`` maps ``(destination, source)`` to a pattern string (see
    :func:`~iternn.sparse.patterns.parse_spec`, e.g. ``"R=0.1 kaiming"``), a parsed spec,
    or a density (``1`` dense, ``0`` absent, else ``R=p``). Blocks are drawn in the
    order given, all from one generator: the same seed gives the same map.
    """
    g = _generator(seed)
    m = BlockMap(slots)
    for key, value in blocks.items():
        if not (isinstance(key, tuple) and len(key) == 2):
            raise TypeError(f"block keys must be (destination, source) pairs, got {key!r}")
        dst, src = key
        m._check_slot(dst, "destination slot")
        m._check_slot(src, "source slot")
        spec = _spec(value, f"{dst!r} <- {src!r}")
        block = make_block(spec, m.slots[dst], m.slots[src], generator=g, backend=backend)
        if block is not None:
            m.connect(dst, src, block)
    for slot in biases:
        m.set_bias(slot)
    for slot, act in (activations or {}).items():
        m.set_activation(slot, act)
    return m


def _densities(densities: float | Mapping[str, float]) -> dict[str, float]:
    if isinstance(densities, Mapping):
        unknown = sorted(set(densities) - set(SIX_BLOCKS))
        if unknown:
            raise ValueError(f"unknown block name(s) {unknown}; the six blocks are {SIX_BLOCKS}")
        out = {b: float(densities.get(b, 0.0)) for b in SIX_BLOCKS}
    elif isinstance(densities, bool) or not isinstance(densities, (int, float)):
        raise TypeError(f"densities must be a float or a mapping block -> float, got {densities!r}")
    else:
        out = {b: float(densities) for b in SIX_BLOCKS}
    for b, d in out.items():
        if not 0 <= d <= 1 or math.isnan(d):
            raise ValueError(f"density of block {b!r} must be in [0, 1], got {d}")
    if out["hx"] == 0 or (out["yh"] == 0 and out["yx"] == 0):
        raise ValueError("blocks 'hx' and one of 'yh'/'yx' need a positive density: "
                         "otherwise the input never reaches the output")
    return out


def _entries(density: float, rows: int, cols: int) -> int:
    """Stored entries of a block of this density: ``W`` for 1, else ``R=p``, which draws
    exactly ``round(p * cols * rows)`` (see :func:`~iternn.sparse.patterns.make_block`)."""
    if density == 1:
        return rows * cols
    return round(density * cols * rows)


def six_block_counts(
    n_x: int, n_h: int, n_y: int, densities: float | Mapping[str, float], *, biases: bool = True
) -> dict[str, int]:
    """Trainable entries per block (and ``"bias"``) of a six-block map, exactly."""
    d = _densities(densities)
    size = {"x": n_x, "h": n_h, "y": n_y}
    out = {b: _entries(d[b], size[b[0]], size[b[1]]) for b in SIX_BLOCKS}
    out["bias"] = (n_h + n_y) if biases else 0
    return out


def solve_hidden_width(
    budget: int, n_x: int, n_y: int, densities: float | Mapping[str, float], *, biases: bool = True
) -> int:
    """The largest hidden width whose six-block map has at most ``budget`` trainable entries.

    Solves the follow-up's quadratic for ``h``, then corrects for the exact rounding of
    every block's entry count (``round(p * rows * cols)``) by checking neighbours.
    """
    if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
        raise ValueError(f"budget must be a positive int, got {budget!r}")
    d = _densities(densities)
    a = d["hh"]
    b = d["hx"] * n_x + d["hy"] * n_y + d["yh"] * n_y + (1 if biases else 0)
    c = d["yx"] * n_y * n_x + d["yy"] * n_y * n_y + (n_y if biases else 0)
    if a > 0:
        h = (-b + math.sqrt(b * b + 4 * a * (budget - c))) / (2 * a) if budget >= c else 0.0
    else:
        h = (budget - c) / b
    h = max(int(h), 1)

    def total(n: int) -> int:
        return sum(six_block_counts(n_x, n, n_y, d, biases=biases).values())

    while h > 1 and total(h) > budget:
        h -= 1
    while total(h + 1) <= budget:
        h += 1
    if total(h) > budget:
        raise ValueError(
            f"budget {budget} is below the smallest six-block map ({total(1)} trainable "
            f"entries with |h| = 1)"
        )
    return h


def six_block_map(
    n_x: int,
    n_h: int,
    n_y: int,
    densities: float | Mapping[str, float],
    *,
    activation: nn.Module | None = None,
    biases: bool = True,
    extra_entries: int = 0,
    seed: int | torch.Generator = 0,
    backend: str = "auto",
) -> BlockMap:
    """The follow-up's (x, h, y) map with a density per block.

    ``extra_entries`` adds that many entries to one sparse block (the first of ``hh,
    hx, yh, hy, yx, yy`` with room), drawn as ``S=n`` — how matched builders make the
    trainable count exact.
    """
    d = _densities(densities)
    size = {"x": n_x, "h": n_h, "y": n_y}
    counts = {b: _entries(d[b], size[b[0]], size[b[1]]) for b in SIX_BLOCKS}
    specs: dict[str, str] = {}
    for b in SIX_BLOCKS:
        specs[b] = "0" if counts[b] == 0 else ("W" if d[b] == 1 else f"R={d[b]!r}")
    if extra_entries:
        for b in ("hh", "hx", "yh", "hy", "yx", "yy"):
            area = size[b[0]] * size[b[1]]
            if d[b] < 1 and counts[b] + extra_entries <= area:
                specs[b] = f"S={counts[b] + extra_entries}"
                break
        else:
            raise ValueError(f"no block has room for {extra_entries} extra entries")
    blocks = {(b[0], b[1]): specs[b] for b in SIX_BLOCKS}
    acts = {"h": copy.deepcopy(activation)} if activation is not None else None
    return random_map(size, blocks, biases=("h", "y") if biases else (), activations=acts,
                      seed=seed, backend=backend)


def mlp_sizes(mlp: nn.Sequential) -> tuple[list[int], nn.Module | None]:
    """Layer widths ``[n_x, ..., n_y]`` of an ``nn.Sequential`` MLP and its first activation."""
    if not isinstance(mlp, nn.Sequential):
        raise TypeError(f"expected an nn.Sequential MLP, got {type(mlp).__name__}")
    widths: list[int] = []
    act = None
    for i, layer in enumerate(mlp):
        if type(layer) is nn.Linear:
            if widths and layer.in_features != widths[-1]:
                raise ValueError(f"layer {i} (Linear) has in_features={layer.in_features}, "
                                 f"expected {widths[-1]}")
            widths += [layer.in_features] if not widths else []
            widths.append(layer.out_features)
        elif isinstance(layer, ELEMENTWISE):
            if act is None and type(layer) not in (nn.Identity, nn.Dropout):
                act = layer
        else:
            raise TypeError(f"layer {i} ({type(layer).__name__}) is not Linear or element-wise")
    if not widths:
        raise ValueError("the MLP has no Linear layer")
    return widths, act


def matched_map(
    mlp: nn.Sequential,
    *,
    density: float | Mapping[str, float],
    seed: int | torch.Generator = 0,
    backend: str = "auto",
) -> MapModule:
    """A six-block (x, h, y) map with exactly the MLP's number of trainable entries.

    A drop-in for ``mlp``: same input and output sizes, ``x`` held, iterated as many
    times as the MLP has ``Linear`` layers, the MLP's first activation on ``h``. The
    hidden width comes from :func:`solve_hidden_width`; the entries that rounding leaves
    over (fewer than one hidden unit's worth) are added to one sparse block, so
    ``count_trainable(result) == count_trainable(mlp)`` exactly. With ``density=1``
    (all blocks dense) there is no room for them: then the map has at most the budget
    and misses it by fewer than the entries of one hidden unit (one row of ``hh``,
    ``hx``, ``hy`` plus one column of ``yh`` and a bias).
    """
    g = _generator(seed)
    widths, act = mlp_sizes(mlp)
    budget = count_trainable(mlp)
    n_x, n_y = widths[0], widths[-1]
    d = _densities(density)
    h = solve_hidden_width(budget, n_x, n_y, d)
    left = budget - sum(six_block_counts(n_x, h, n_y, d).values())
    room = any(d[b] < 1 for b in SIX_BLOCKS if d[b] > 0)
    m = six_block_map(n_x, h, n_y, d, activation=act, extra_entries=left if room else 0,
                      seed=g, backend=backend)
    ref = next(iter(mlp.parameters()), None)
    if ref is not None:
        m.to(dtype=ref.dtype, device=ref.device)
    return MapModule(m, input="x", output="y", steps=len(widths) - 1)
