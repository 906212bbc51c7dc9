"""Core: slots, blocks and the block map."""

from .block_map import BlockMap, block_key
from .graph import BlockGraph

__all__ = ["BlockMap", "BlockGraph", "block_key"]
