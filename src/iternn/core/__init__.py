"""Core: slots, blocks and the block map."""

from .block_map import BlockMap, block_key
from .graph import BlockGraph
from .protocols import CountsTrainable, RowwiseBlock
from .summary import BlockRow, Summary, count_entries, count_trainable

__all__ = [
    "BlockMap", "BlockGraph", "block_key", "Summary", "BlockRow", "count_trainable", "count_entries",
    "CountsTrainable", "RowwiseBlock",
]
