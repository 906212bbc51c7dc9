"""Builders for the sparsity study: random block maps and parameter-matched maps.

The paper compares, at equal numbers of *trainable* parameters, an MLP, a dense block map
and random-sparse block maps (§8). arXiv 2509.15057 uses maps over the slots
``(x, h, y)`` whose six blocks into ``h`` and ``y`` each get their own density, and
solves the hidden width ``|h|`` from a parameter budget ``N`` — a quadratic in ``|h|``:

    N = d_hh h² + (d_hx n_x + d_hy n_y + d_yh n_y + 1) h + d_yx n_y n_x + d_yy n_y² + n_y

(the two ``1``/``n_y`` terms are the trainable slot biases of ``h`` and ``y``). Block
names follow that notation: ``"hx"`` is ``F[h, x]`` (row ``h``, column ``x``).

Degenerate maps are refused (:class:`~iternn.errors.MapError`): a six-block or matched
map whose drawn pattern leaves every unit of ``y`` independent of ``x`` within its
number of applications (a block rounded to no entries, or entries that do not connect)
is an error naming the blocks at fault and the density that would give each block of an
``x -> y`` path an entry (:func:`reachable_units` is the check).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..core.block_map import BlockMap
from ..core.rowwise import ELEMENTWISE
from ..core.summary import count_trainable
from ..engine.map_module import MapModule
from ..errors import MapError, MapTypeError
from .linear import MaskedLinear, SparseLinear
from .patterns import BlockSpec, make_block, parse_spec
from .structured import DiagonalLinear

__all__ = [
    "SIX_BLOCKS",
    "random_map",
    "six_block_counts",
    "solve_hidden_width",
    "six_block_map",
    "matched_map",
    "mlp_sizes",
    "reachable_units",
]

#: The six blocks of an (x, h, y) map (arXiv 2509.15057's notation): destination then source.
SIX_BLOCKS: tuple[str, ...] = ("hx", "hh", "hy", "yx", "yh", "yy")


def _generator(seed: int | torch.Generator | None) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    if seed is None:
        raise MapError("a seed (int) or a torch.Generator is required: builders are reproducible")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise MapTypeError(f"seed must be an int or a torch.Generator, got {type(seed).__name__}")
    return torch.Generator().manual_seed(seed)


def _spec(value: str | float | BlockSpec, where: str) -> BlockSpec:
    """A block spec from a pattern string, a spec, or a bare density."""
    if isinstance(value, BlockSpec):
        return value
    if isinstance(value, str):
        return parse_spec(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MapTypeError(f"block {where}: expected a pattern string or a density, got {value!r}")
    if not 0 <= value <= 1:
        raise MapError(f"block {where}: density must be in [0, 1], got {value}")
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
            raise MapTypeError(f"block keys must be (destination, source) pairs, got {key!r}")
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
            raise MapError(f"unknown block name(s) {unknown}; the six blocks are {SIX_BLOCKS}")
        out = {b: float(densities.get(b, 0.0)) for b in SIX_BLOCKS}
    elif isinstance(densities, bool) or not isinstance(densities, (int, float)):
        raise MapTypeError(f"densities must be a float or a mapping block -> float, got {densities!r}")
    else:
        out = {b: float(densities) for b in SIX_BLOCKS}
    for b, d in out.items():
        if not 0 <= d <= 1 or math.isnan(d):
            raise MapError(f"density of block {b!r} must be in [0, 1], got {d}")
    if out["hx"] == 0 or (out["yh"] == 0 and out["yx"] == 0):
        raise MapError("blocks 'hx' and one of 'yh'/'yx' need a positive density: "
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

    Solves the quadratic of arXiv 2509.15057 for ``h``, then corrects for the exact rounding of
    every block's entry count (``round(p * rows * cols)``) by checking neighbours.
    """
    if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
        raise MapError(f"budget must be a positive int, got {budget!r}")
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
        raise MapError(
            f"budget {budget} is below the smallest six-block map ({total(1)} trainable "
            f"entries with |h| = 1)"
        )
    return h


def _six_specs(size: dict[str, int], d: dict[str, float], extra_entries: int) -> tuple[dict, dict]:
    """Spec and exact entry count of each of the six blocks (``"0"`` for a block that
    rounds to no entries), ``extra_entries`` added to the first of ``hh, hx, yh, hy, yx,
    yy`` with room."""
    counts = {b: _entries(d[b], size[b[0]], size[b[1]]) for b in SIX_BLOCKS}
    specs = {b: "0" if counts[b] == 0 else ("W" if d[b] == 1 else f"R={d[b]!r}") for b in SIX_BLOCKS}
    if extra_entries:
        for b in ("hh", "hx", "yh", "hy", "yx", "yy"):
            area = size[b[0]] * size[b[1]]
            if d[b] < 1 and counts[b] + extra_entries <= area:
                counts[b] += extra_entries
                specs[b] = f"S={counts[b]}"
                break
        else:
            raise MapError(f"no block has room for {extra_entries} extra entries")
    return specs, counts


def _path_has_entries(counts: Mapping[str, int], steps: int | None) -> bool:
    """Whether some ``x -> y`` path within ``steps`` applications (None: any number) has
    an entry in each of its blocks. Every such path starts with ``yx`` (one application)
    or with ``hx`` and reaches ``y`` through ``yh`` (two applications at least)."""
    return counts["yx"] > 0 or ((steps is None or steps >= 2) and counts["hx"] > 0 and counts["yh"] > 0)


def _support(block: nn.Module, rows: int, cols: int) -> tuple[Tensor, Tensor] | None:
    """Stored positions ``(row, column)`` of a block, or None for a block that may
    connect every source unit to every destination unit."""
    if isinstance(block, (SparseLinear, MaskedLinear)):
        idx = block.indices().cpu()
        return idx[0], idx[1]
    if isinstance(block, (DiagonalLinear, nn.Identity)) and rows == cols:
        unit = torch.arange(rows)
        return unit, unit
    return None


def reachable_units(m: BlockMap, source: str, target: str, *, steps: int | None = None) -> int:
    """How many units of slot ``target`` depend on slot ``source`` after ``steps``
    applications of ``m`` with ``source`` held (``None``: after any number).

    Read from the blocks' stored positions (``SparseLinear``, ``MaskedLinear``,
    diagonal and identity blocks; any other block may connect every unit of its source
    to every unit of its destination): unit ``i`` of slot ``d`` depends on the source
    after ``t + 1`` applications when some block ``F[d, s]`` stores an entry ``(i, j)``
    whose unit ``j`` of ``s`` depends on it after ``t``.
    """
    m._check_slot(source, "source slot")
    m._check_slot(target, "target slot")
    reach = {slot: torch.zeros(n, dtype=torch.bool) for slot, n in m.slots.items()}
    reach[source][:] = True
    # A block reading several slots may connect every unit of each to every unit of d.
    supports: dict[tuple[str, str], tuple[Tensor, Tensor] | None] = {}
    for d, src in m.edges:
        if isinstance(src, str):
            supports[(d, src)] = _support(m.block(d, src), m.slots[d], m.slots[src])
        else:
            supports.update(((d, s), None) for s in src)
    t = 0
    while steps is None or t < steps:
        new = {slot: r.clone() if slot == source else torch.zeros_like(r) for slot, r in reach.items()}
        for (d, s), sup in supports.items():
            if not bool(reach[s].any()):
                continue
            if sup is None:
                new[d][:] = True
            else:
                rows, cols = sup
                new[d][rows[reach[s][cols]]] = True
        t += 1
        if steps is None and all(torch.equal(new[k], reach[k]) for k in reach):
            break
        reach = new
    return int(reach[target].sum())


def _one_entry_densities(size: Mapping[str, int], blocks: tuple[str, ...]) -> str:
    """The density above which each block gets an entry: ``round(p * rows * cols) >= 1``
    exactly when ``p > 0.5 / (rows * cols)``."""
    return ", ".join(f"{b!r} ({size[b[0]]} x {size[b[1]]}) needs p > {0.5 / (size[b[0]] * size[b[1]]):.3g}"
                     for b in blocks)


def _check_connected(m: BlockMap, counts: Mapping[str, int], size: Mapping[str, int],
                     steps: int | None, advice=None) -> None:
    """Refuse a six-block map whose output no longer depends on its input. ``advice()``
    says what would work (default: the density each path block needs for one entry)."""
    if reachable_units(m, "x", "y", steps=steps) > 0:
        return
    within = "in any number of applications" if steps is None else f"within {steps} application(s)"
    path = ("yx",) if steps == 1 else ("hx", "yh", "yx")
    if _path_has_entries(counts, steps):
        why = ("the drawn entries do not connect: no unit of h that 'hx' writes is read by 'yh'"
               if counts["yx"] == 0 else "the drawn entries do not connect")
    else:
        why = "blocks without entries: " + ", ".join(f"{b!r} has {counts[b]}" for b in path)
    if advice is None:
        advice = (f"for one entry, {_one_entry_densities(size, path)}; use larger densities for "
                  f"those blocks, or another seed")
    else:
        advice = advice()
    raise MapError(f"the output y does not depend on the input x {within} ({why}); {advice}")


def six_block_map(
    n_x: int,
    n_h: int,
    n_y: int,
    densities: float | Mapping[str, float],
    *,
    activation: nn.Module | None = None,
    biases: bool = True,
    extra_entries: int = 0,
    steps: int | None = None,
    seed: int | torch.Generator = 0,
    backend: str = "auto",
) -> BlockMap:
    """The (x, h, y) map of arXiv 2509.15057 with a density per block.

    ``extra_entries`` adds that many entries to one sparse block (the first of ``hh,
    hx, yh, hy, yx, yy`` with room), drawn as ``S=n`` — how matched builders make the
    trainable count exact.

    Raises :class:`~iternn.errors.MapError` when no unit of ``y`` depends on ``x``
    within ``steps`` applications with ``x`` held (``None``: any number) in the drawn
    pattern (see :func:`reachable_units`), naming the blocks without entries and the
    density each needs for one entry (``p > 0.5 / (rows * cols)``).
    """
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise MapError(f"steps must be an int >= 1 or None, got {steps!r}")
    d = _densities(densities)
    size = {"x": n_x, "h": n_h, "y": n_y}
    m, counts = _six_block_map(size, d, activation, biases, extra_entries, seed, backend)
    _check_connected(m, counts, size, steps)
    return m


def _six_block_map(size: dict[str, int], d: dict[str, float], activation: nn.Module | None,
                   biases: bool, extra_entries: int, seed, backend: str) -> tuple[BlockMap, dict]:
    specs, counts = _six_specs(size, d, extra_entries)
    blocks = {(b[0], b[1]): specs[b] for b in SIX_BLOCKS}
    acts = {"h": copy.deepcopy(activation)} if activation is not None else None
    m = random_map(size, blocks, biases=("h", "y") if biases else (), activations=acts,
                   seed=seed, backend=backend)
    return m, counts


def mlp_sizes(mlp: nn.Sequential) -> tuple[list[int], nn.Module | None]:
    """Layer widths ``[n_x, ..., n_y]`` of an ``nn.Sequential`` MLP and its first activation."""
    if not isinstance(mlp, nn.Sequential):
        raise MapTypeError(f"expected an nn.Sequential MLP, got {type(mlp).__name__}")
    widths: list[int] = []
    act = None
    for i, layer in enumerate(mlp):
        if type(layer) is nn.Linear:
            if widths and layer.in_features != widths[-1]:
                raise MapError(f"layer {i} (Linear) has in_features={layer.in_features}, "
                                 f"expected {widths[-1]}")
            widths += [layer.in_features] if not widths else []
            widths.append(layer.out_features)
        elif isinstance(layer, ELEMENTWISE):
            if act is None and type(layer) not in (nn.Identity, nn.Dropout):
                act = layer
        else:
            raise MapTypeError(f"layer {i} ({type(layer).__name__}) is not Linear or element-wise")
    if not widths:
        raise MapError("the MLP has no Linear layer")
    return widths, act


def _matched_plan(budget: int, n_x: int, n_y: int, d: dict[str, float]) -> tuple[int, int, dict]:
    """Hidden width, extra entries and per-block entry counts of the matched map."""
    h = solve_hidden_width(budget, n_x, n_y, d)
    left = budget - sum(six_block_counts(n_x, h, n_y, d).values())
    room = any(d[b] < 1 for b in SIX_BLOCKS if d[b] > 0)
    extra = left if room else 0
    _, counts = _six_specs({"x": n_x, "h": h, "y": n_y}, d, extra)
    return h, extra, counts


def _min_scale(budget: int, n_x: int, n_y: int, d: dict[str, float], steps: int) -> float | None:
    """The smallest factor ``s`` such that the matched map with densities ``s * d``
    (capped at 1) has an entry in every block of some ``x -> y`` path within ``steps``
    applications: bisection on ``log s`` between a factor that fails and one that works,
    the hidden width solved again at each; 0.0 when every positive factor works, None
    when none up to all-dense does."""
    top = 1.0 / max(d.values())

    def works(scale: float) -> bool:
        try:
            return _path_has_entries(_matched_plan(budget, n_x, n_y, {b: min(1.0, v * scale)
                                                                     for b, v in d.items()})[2], steps)
        except MapError:  # the budget cannot pay for this map at all
            return False

    hi = 1.0
    while not works(hi):
        if hi >= top:
            return None
        hi = min(top, hi * 2)
    lo = hi / 2
    for _ in range(1100):  # down to the smallest floats
        if not works(lo):
            break
        hi, lo = lo, lo / 2
        if lo == 0.0:
            return 0.0
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        if mid in (lo, hi):
            break
        lo, hi = (lo, mid) if works(mid) else (mid, hi)
    return hi


def _round_up(x: float) -> float:
    """``x`` rounded up to 3 significant digits: a number a message prints exactly."""
    step = 10.0 ** (math.floor(math.log10(x)) - 2)
    return float(f"{math.ceil(round(x / step, 6)) * step:.3g}")


def _first_connecting(budget: int, n_x: int, n_y: int, steps: int, draw, densities,
                      start: float, top: float) -> float | None:
    """The first ``q`` of ``start * 2**(k/2)``, ``k = 0, 1, ...``, each rounded up to 3
    digits and capped at ``top``, whose matched map with ``densities(q)``, drawn by
    ``draw(size, densities, extra)``, carries the input to the output within ``steps``
    applications; None when none does."""
    q = start
    while True:
        q = min(top, _round_up(q))
        d = densities(q)
        try:
            h, extra, _ = _matched_plan(budget, n_x, n_y, d)
        except MapError:  # the budget cannot pay for this map at all
            h = None
        if h is not None and reachable_units(draw({"x": n_x, "h": h, "y": n_y}, d, extra),
                                             "x", "y", steps=steps) > 0:
            return q
        if q >= top:
            return None
        q *= math.sqrt(2)


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

    Raises :class:`~iternn.errors.MapError` when the drawn map's output does not depend
    on its input within those applications (see :func:`reachable_units`): a density so
    small that the blocks of every ``x -> y`` path round to no entries (``1e-12`` gives
    a map without a single weight), or entries that happen not to connect. The message
    gives the smallest density (for a mapping: the smallest factor on all densities)
    at which every block of some ``x -> y`` path gets an entry for this MLP's budget,
    found by bisection with the hidden width solved again at each density, and the
    smallest density (tried upwards in steps of a factor ``sqrt(2)``, each rounded up to
    the 3 digits printed) whose map drawn with this ``seed`` does connect: passing that
    number with the same seed gives a map.
    """
    g = _generator(seed)
    widths, act = mlp_sizes(mlp)
    budget = count_trainable(mlp)
    n_x, n_y = widths[0], widths[-1]
    steps = len(widths) - 1
    d = _densities(density)
    h, extra, _ = _matched_plan(budget, n_x, n_y, d)
    size = {"x": n_x, "h": h, "y": n_y}
    drawn_from = g.get_state()
    m, counts = _six_block_map(size, d, act, True, extra, g, backend)

    def draw(size: dict[str, int], densities: dict[str, float], extra: int) -> BlockMap:
        again = torch.Generator(device=g.device)
        again.set_state(drawn_from)  # the draw this call made, at other densities
        return _six_block_map(size, densities, None, True, extra, again, "dense")[0]

    def advice() -> str:
        scale = _min_scale(budget, n_x, n_y, d, steps)
        how = ("found by bisection over the density, with the hidden width solved again at each "
               "and a block's entries round(p * rows * cols)")
        if scale is None:
            return (f"no density up to all-dense gives an x -> y path within {steps} application(s) "
                    f"an entry in each block for this MLP's budget of {budget} trainable entries")
        if isinstance(density, Mapping):
            scaled = {b: float(f"{min(1.0, v * scale):.3g}") for b, v in d.items() if v > 0}
            need = f"densities of at least about {scaled} (every density times {scale:.3g})"
        else:
            need = f"a density of at least about {scale * d['hx']:.3g}"
        # the given densities (factor 1) failed; below the threshold no draw can work
        start = scale if scale > 1 else math.sqrt(2)
        if isinstance(density, Mapping):  # q: a factor on every density
            unit, top = "every density times ", 1.0 / max(d.values())
            works = _first_connecting(budget, n_x, n_y, steps, draw,
                                      lambda q: {b: min(1.0, v * q) for b, v in d.items()}, start, top)
        else:  # q: the density of every block
            unit = ""
            works = _first_connecting(budget, n_x, n_y, steps, draw, lambda q: dict.fromkeys(d, q),
                                      start * d["hx"], 1.0)
            start *= d["hx"]
        drawn = (f"with this seed no larger density connects x to y within {steps} application(s)"
                 if works is None else
                 f"with this seed the smallest density that connects (tried in steps of a factor "
                 f"sqrt(2) from {unit}{_round_up(start):.3g}) is {unit}{works:.3g}")
        return (f"for this MLP's budget of {budget} trainable entries, {need} gives every block "
                f"of an x -> y path an entry ({how}); {drawn}")

    _check_connected(m, counts, size, steps, advice)
    ref = next(iter(mlp.parameters()), None)
    if ref is not None:
        m.to(dtype=ref.dtype, device=ref.device)
    return MapModule(m, input="x", output="y", steps=steps)
