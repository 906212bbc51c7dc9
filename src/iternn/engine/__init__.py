"""Engine: plans that run a block map's iteration at native speed."""

from .iterate import depth, iterate, sequence_plan, step_plan, wavefront_plan

__all__ = ["iterate", "depth", "wavefront_plan", "sequence_plan", "step_plan"]
