"""Exact conversions of PyTorch models into block maps."""

from .mlp import from_mlp, to_mlp

__all__ = ["from_mlp", "to_mlp"]
