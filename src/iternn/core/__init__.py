"""Core: slots, blocks and the block map."""

from .block_map import BlockMap, Source, block_key, source_slots
from .graph import BlockGraph
from .protocols import CountsTrainable, LinearBlock, RowwiseBlock, SamplewiseBlock
from .summary import BlockRow, Summary, count_entries, count_trainable

__all__ = [
    "BlockMap", "BlockGraph", "block_key", "Summary", "BlockRow", "count_trainable", "count_entries",
    "CountsTrainable", "LinearBlock", "RowwiseBlock", "SamplewiseBlock", "Source", "source_slots",
]
