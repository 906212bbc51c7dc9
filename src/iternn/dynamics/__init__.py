"""Dynamics of block maps: impulse response, fixed points, equilibrium models, spectra."""

from .functional import DynamicsError, MapFunction

__all__ = ["MapFunction", "DynamicsError"]
