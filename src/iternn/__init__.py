"""iternn: neural networks as iterated block maps.

MLPs, RNNs and transformer stacks are one object, a block map
``z <- act(b + sum F z)`` iterated over named slots; they differ only in sparsity
pattern, weight tying, iteration count, initial vector and forcing (arXiv 2404.00880).
"""

from .errors import (
    ConfigError,
    ConversionError,
    ConvergenceError,
    DataError,
    DynamicsError,
    FolderLockedError,
    FormatError,
    IterNNError,
    MapError,
    MapTypeError,
    NativeBuildError,
    PatternError,
    ResumeError,
    SizeError,
    StudyError,
    TensorBoardMissingError,
)
from .core import BlockGraph, BlockMap, Summary, block_key, count_trainable
from .convert import (
    EncoderLayerBlock,
    LiftedRNN,
    RNNMap,
    TransformerMap,
    from_mlp,
    from_rnn,
    from_transformer,
    lift_rnn,
    to_mlp,
)
from .engine import depth, iterate
from .engine.map_module import MapModule
from .io import load, register_codec, save
from . import dynamics, sparse
from .sparse import MaskedLinear, SparseLinear, matched_map

__version__ = "0.1.0"

__all__ = [
    "BlockMap",
    "BlockGraph",
    "block_key",
    "Summary",
    "count_trainable",
    "iterate",
    "depth",
    "MapModule",
    "from_mlp",
    "to_mlp",
    "from_rnn",
    "RNNMap",
    "lift_rnn",
    "LiftedRNN",
    "from_transformer",
    "TransformerMap",
    "EncoderLayerBlock",
    "save",
    "load",
    "register_codec",
    "dynamics",
    "sparse",
    "SparseLinear",
    "MaskedLinear",
    "matched_map",
    "IterNNError",
    "MapError",
    "MapTypeError",
    "ConversionError",
    "SizeError",
    "PatternError",
    "FormatError",
    "DynamicsError",
    "ConvergenceError",
    "ConfigError",
    "ResumeError",
    "DataError",
    "StudyError",
    "FolderLockedError",
    "NativeBuildError",
    "TensorBoardMissingError",
    "__version__",
]
