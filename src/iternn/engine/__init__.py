"""Engine: plans that run a block map's iteration at native speed."""

from .iterate import depth, iterate

__all__ = ["iterate", "depth"]
