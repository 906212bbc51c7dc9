"""Exact random sparsity patterns: k distinct positions of a rows x cols block.

The paper's implementations drew entries *with* replacement and summed duplicates, so a
pattern asked for at density 0.5 came out at 0.506 in one layer and 0.391 in another.
:func:`random_indices` draws exactly ``k`` distinct positions, uniformly over all
``k``-subsets, without ever materialising ``rows * cols`` of anything on large blocks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core.memory import check_bytes
from ..errors import MapError, MapTypeError

__all__ = ["random_indices"]

# Up to this many positions a random permutation of all of them is cheap (8 bytes each).
_PERMUTE_MAX = 1 << 22
# Dropping the surplus of distinct draws uses a permutation up to this size.
_DROP_PERMUTE_MAX = 1 << 16


def _check_count(value: object, name: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise MapTypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise MapError(f"{name} must be >= {minimum}, got {value}")
    return value


def _draw_distinct(n: int, k: int, generator: torch.Generator | None) -> Tensor:
    """``k`` distinct integers of ``[0, n)``, uniformly, as a sorted int64 tensor.

    For ``k <= n / 2``: draw i.i.d. positions, enough that ``k`` distinct ones are
    (almost surely) among them, keep the distinct ones, then keep a uniformly random
    ``k`` of those. Conditioned on its size, the set of distinct draws is a uniformly
    random subset (every position plays the same role), and a uniform ``k``-subset of a
    uniform subset is a uniform ``k``-subset; so the result is exactly uniform. Memory
    and time are O(k log k), independent of ``n``.
    """
    if k == 0:
        return torch.zeros(0, dtype=torch.long)
    # Draws m such that the expected number of distinct values, n (1 - exp(-m/n)), is k,
    # plus a margin of a few standard deviations; redrawn (larger) in the rare miss.
    m = int(math.ceil(-n * math.log1p(-k / n)))
    m += 4 * int(math.isqrt(m)) + 16
    while True:
        draws = torch.randint(0, n, (m,), generator=generator, dtype=torch.long)
        distinct = torch.unique(draws, sorted=True)
        if distinct.numel() >= k:
            break
        m *= 2
    excess = distinct.numel() - k
    if excess > 0:
        # Drop a uniformly random `excess` of them (few: about 4 sqrt(m)), drawn the same
        # way, so nothing of size m is permuted.
        keep = torch.ones(distinct.numel(), dtype=torch.bool)
        if distinct.numel() > _DROP_PERMUTE_MAX and 4 * excess <= distinct.numel():
            # Recursion on a problem at most a quarter of the size: it ends.
            keep[_draw_distinct(distinct.numel(), excess, generator)] = False
        else:
            keep[torch.randperm(distinct.numel(), generator=generator)[:excess]] = False
        distinct = distinct[keep]  # still sorted
    return distinct


def random_indices(
    rows: int, cols: int, k: int, *, generator: torch.Generator | None = None
) -> Tensor:
    """Exactly ``k`` distinct positions of a ``rows x cols`` block, drawn uniformly.

    Returns a CPU ``LongTensor`` of shape ``(2, k)``: row ``0`` holds the row indices
    (destination / output index), row ``1`` the column indices (source / input index),
    sorted row-major (by row, then column). Every ``k``-subset of the ``rows * cols``
    positions is equally likely; all randomness comes from ``generator`` (a CPU
    ``torch.Generator``; ``None`` uses torch's global generator), so the same seed gives
    the same pattern.

    Memory is O(k) for large blocks (a 20000 x 20000 block at 1 % density draws its
    4,000,000 entries without touching the 4e8 positions); blocks of at most 2**22
    positions use one random permutation of all positions.

    Raises:
        MapTypeError: ``rows``, ``cols`` or ``k`` is not an int (a ``TypeError``).
        MapError: ``rows`` or ``cols`` < 1, or ``k`` outside ``[0, rows * cols]``.
        SizeError: the draw needs more memory than is available (a ``MemoryError``).
    """
    rows = _check_count(rows, "rows", minimum=1)
    cols = _check_count(cols, "cols", minimum=1)
    k = _check_count(k, "k", minimum=0)
    n = rows * cols
    if k > n:
        raise MapError(f"k must be <= rows * cols = {n}, got {k}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise MapTypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and generator.device.type != "cpu":
        raise MapTypeError(f"generator must be a CPU generator, got one on {generator.device}")
    # the (2, k) result, the draws and their sorted copy (int64), or a permutation / mask
    # of all n positions: refused before any of it is allocated
    need = 8 * n if n <= _PERMUTE_MAX else 40 * min(k, n - k) + 16 * k + (n if 2 * k > n else 0)
    check_bytes(need, f"random_indices: {k} entries of a {rows} x {cols} block")
    if n <= _PERMUTE_MAX:
        flat = torch.randperm(n, generator=generator)[:k].sort().values
    elif 2 * k <= n:
        flat = _draw_distinct(n, k, generator)
    else:
        # Dense-ish and large: draw the n - k positions to leave out. The result holds
        # k >= n / 2 int64 positions anyway, so an n-byte mask is the smaller cost.
        keep = torch.ones(n, dtype=torch.bool)
        keep[_draw_distinct(n, n - k, generator)] = False
        flat = keep.nonzero().squeeze(1)
    out = torch.empty(2, k, dtype=torch.long)
    torch.div(flat, cols, rounding_mode="floor", out=out[0])
    torch.remainder(flat, cols, out=out[1])
    return out
