"""Dynamics of block maps: impulse response, fixed points, equilibrium models, spectra.

Every tool works on a :class:`~iternn.BlockMap` (or a module with ``.map``) and a state
dict, with held slots as in :func:`iternn.iterate`; internally the map is the function
``G`` on its packed free slots (:class:`MapFunction`).
"""

from ..errors import ConvergenceError, DynamicsError
from .deq import DEQ, Implicit, Phantom
from .fixed_points import FixedPoints, find_fixed_points, fixed_point
from .functional import MapFunction
from .impulse import ImpulseResponse, impulse_response
from .jacobian import eigenvalues, jacobian, singular_values, spectral_radius
from .linalg import verified_solve
from .lyapunov import largest_lyapunov, lyapunov_spectrum
from .matrix import as_matrix
from .memory import MEMORY_MODES, feed_inputs, input_memory
from .plots import (
    BifurcationData,
    bifurcation_data,
    plot_bifurcation,
    plot_eigenvalues,
    plot_impulse_response,
    plot_lyapunov,
    plot_propagation,
    plot_singular_values,
    plot_structure,
    plot_trajectories,
    structure_matrix,
)
from .propagation import propagation
from .report import analyze
from .solvers import (
    SOLVERS,
    Anderson,
    Broyden,
    Picard,
    Solver,
    SolverInfo,
    StopReason,
    register_solver,
    solve,
)

__all__ = [
    "MapFunction",
    "DynamicsError",
    "ConvergenceError",
    "impulse_response",
    "ImpulseResponse",
    "fixed_point",
    "find_fixed_points",
    "FixedPoints",
    "solve",
    "Solver",
    "Picard",
    "Anderson",
    "Broyden",
    "SolverInfo",
    "StopReason",
    "SOLVERS",
    "register_solver",
    "verified_solve",
    "DEQ",
    "Implicit",
    "Phantom",
    "jacobian",
    "eigenvalues",
    "singular_values",
    "spectral_radius",
    "lyapunov_spectrum",
    "largest_lyapunov",
    "propagation",
    "input_memory",
    "feed_inputs",
    "MEMORY_MODES",
    "plot_propagation",
    "analyze",
    "as_matrix",
    "structure_matrix",
    "plot_structure",
    "plot_eigenvalues",
    "plot_singular_values",
    "plot_impulse_response",
    "plot_trajectories",
    "bifurcation_data",
    "BifurcationData",
    "plot_bifurcation",
    "plot_lyapunov",
]
