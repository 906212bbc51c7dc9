"""Exact conversions of PyTorch models into block maps."""

from .gated import GRUMap, LSTMMap, from_gru, from_lstm
from .lift import LiftedRNN, lift_rnn
from .mlp import from_mlp, to_mlp
from .module import ModuleMap, from_module
from .rnn import RNNMap, from_rnn
from .transformer import EncoderLayerBlock, TransformerMap, from_transformer

__all__ = [
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
]
