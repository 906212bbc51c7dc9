"""Sparse and structured blocks, the pattern grammar, and parameter-matched builders.

* :mod:`.linear` — ``SparseLinear`` (CSR storage, values the only weight parameter,
  custom autograd kernels) and ``MaskedLinear`` (dense weight, fixed mask).
* :mod:`.kernels` — the CSR products and their autograd functions; :mod:`.native` — the
  compiled C/OpenMP kernels they use on CPU (built on first use, ``torch.sparse``
  otherwise); :mod:`.checks` — :func:`check_csr_pattern`, the check every pattern passes
  before a kernel reads it.
* :mod:`.fused` — the CSR blocks into one destination slot as one product (with the slot
  bias), registered with the execution plans on import.
* :mod:`.structured` — diagonal, low-rank and block-diagonal blocks.
* :mod:`.patterns` — the block pattern grammar (``R=0.1 kaiming``, ``Row=4``, ``D fixed``)
  and ``make_block``.
* :mod:`.builders` — random maps, the six-block (x, h, y) maps of arXiv 2509.15057 and
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
from .checks import check_csr_pattern
from .fused import FusedSparseProduct, fused_sparse_product
from .linear import MaskedLinear, SparseLinear
from .patterns import BlockSpec, PatternError, make_block, parse_spec
from .sampling import random_indices
from .structured import BlockDiagonalLinear, DiagonalLinear, LowRankLinear

__all__ = [
    "SparseLinear",
    "MaskedLinear",
    "FusedSparseProduct",
    "fused_sparse_product",
    "DiagonalLinear",
    "LowRankLinear",
    "BlockDiagonalLinear",
    "BlockSpec",
    "PatternError",
    "check_csr_pattern",
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
