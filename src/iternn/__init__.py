"""iternn: neural networks as iterated block maps.

MLPs, RNNs and transformer stacks are one object, a block map
``z <- act(b + sum F z)`` iterated over named slots; they differ only in sparsity
pattern, weight tying, iteration count, initial vector and forcing (arXiv 2404.00880).

``import iternn`` imports only the exceptions; every other public name (and every
subpackage, ``iternn.dynamics``, ``iternn.io``, ...) is imported on first use (PEP 562),
so that the command line answers ``iternn --help`` without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import errors as _errors
from .errors import *  # noqa: F403 - the whole error family is public API

if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from . import continuum, dynamics, sparse
    from .convert import (
        EncoderLayerBlock,
        GRUMap,
        LiftedRNN,
        LSTMMap,
        ModuleMap,
        RNNMap,
        TransformerMap,
        from_gru,
        from_lstm,
        from_mlp,
        from_module,
        from_rnn,
        from_transformer,
        lift_rnn,
        to_mlp,
    )
    from .core import BlockGraph, BlockMap, Summary, block_key, count_trainable
    from .dynamics import as_matrix
    from .engine import depth, iterate
    from .engine.map_module import MapModule
    from .io import load, register_codec, save
    from .sparse import MaskedLinear, SparseLinear, matched_map

__version__ = "0.1.0"

#: Public name -> the module that defines it (imported on first access).
_LAZY: dict[str, str] = {
    **dict.fromkeys(("BlockMap", "BlockGraph", "block_key", "Summary", "count_trainable"),
                    ".core"),
    **dict.fromkeys(("iterate", "depth"), ".engine"),
    "MapModule": ".engine.map_module",
    **dict.fromkeys(("from_module", "ModuleMap", "from_mlp", "to_mlp", "from_rnn", "RNNMap",
                     "from_lstm", "LSTMMap", "from_gru", "GRUMap", "lift_rnn", "LiftedRNN",
                     "from_transformer", "TransformerMap", "EncoderLayerBlock"), ".convert"),
    **dict.fromkeys(("save", "load", "register_codec"), ".io"),
    "as_matrix": ".dynamics",
    **dict.fromkeys(("SparseLinear", "MaskedLinear", "matched_map"), ".sparse"),
}

#: Subpackages and modules reachable as ``iternn.<name>`` without importing them first.
_SUBMODULES = frozenset({"cli", "continuum", "convert", "core", "demo", "dynamics", "engine",
                         "errors", "io", "sparse", "study"})

__all__ = [
    "BlockMap",
    "BlockGraph",
    "block_key",
    "Summary",
    "count_trainable",
    "iterate",
    "depth",
    "MapModule",
    "from_module",
    "ModuleMap",
    "from_mlp",
    "to_mlp",
    "from_rnn",
    "RNNMap",
    "from_lstm",
    "LSTMMap",
    "from_gru",
    "GRUMap",
    "lift_rnn",
    "LiftedRNN",
    "from_transformer",
    "TransformerMap",
    "EncoderLayerBlock",
    "save",
    "load",
    "register_codec",
    "as_matrix",
    "dynamics",
    "continuum",
    "sparse",
    "SparseLinear",
    "MaskedLinear",
    "matched_map",
    *_errors.__all__,
    "__version__",
]


def __getattr__(name: str) -> Any:
    """Import a public name or a subpackage on first access and keep it (PEP 562)."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | _SUBMODULES)
