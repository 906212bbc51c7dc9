"""Sparse and structured blocks, the pattern grammar, and parameter-matched builders.

* :mod:`.linear` — ``SparseLinear`` (CSR storage, values the only weight parameter,
  custom autograd kernels) and ``MaskedLinear`` (dense weight, fixed mask).
* :mod:`.kernels` — the CSR products and their autograd functions; :mod:`.native` — the
  compiled C/OpenMP kernels they use on CPU (built on first use, ``torch.sparse``
  otherwise).
* :mod:`.structured` — diagonal, low-rank and block-diagonal blocks.
* :mod:`.patterns` — the block pattern grammar (``R=0.1 kaiming``, ``Row=4``, ``D fixed``)
  and ``make_block``.
* :mod:`.builders` — random maps, the follow-up's six-block (x, h, y) maps and
  ``matched_map``: a drop-in for an MLP with exactly its trainable count.
"""

from .builders import (
    SIX_BLOCKS,
    matched_map,
    random_map,
    six_block_counts,
    six_block_map,
    solve_hidden_width,
)
from .linear import MaskedLinear, SparseLinear
from .patterns import BlockSpec, PatternError, make_block, parse_spec
from .sampling import random_indices
from .structured import BlockDiagonalLinear, DiagonalLinear, LowRankLinear

__all__ = [
    "SparseLinear",
    "MaskedLinear",
    "DiagonalLinear",
    "LowRankLinear",
    "BlockDiagonalLinear",
    "BlockSpec",
    "PatternError",
    "parse_spec",
    "make_block",
    "random_indices",
    "random_map",
    "six_block_map",
    "six_block_counts",
    "solve_hidden_width",
    "matched_map",
    "SIX_BLOCKS",
]
