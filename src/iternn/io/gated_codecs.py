"""Codecs for the gated converters (:mod:`iternn.convert.gated`), registered on import.

``LSTMMap`` and ``GRUMap`` are saved like ``RNNMap``: their constructor options plus the
map, which must be exactly what that constructor call builds (a hand-edited map is
refused when saving, and a file whose map does not fit its options when loading). The
blocks ``CellUpdate``, ``OutputGate`` and ``GatedMix`` have no options; ``ResetLinear``
is saved like ``nn.Linear``.

This module uses helpers of :mod:`iternn.io.codecs`; that module imports it at its end
(after those helpers are defined), so importing either one first works.
"""

from __future__ import annotations

from torch import nn

from ..convert.gated import CellUpdate, GatedMix, GRUMap, LSTMMap, OutputGate, ResetLinear
from .codecs import Config, _register_rnn_codec, _uniform_dtype
from .registry import register_codec
from .structure import Decoder, Encoder

__all__: list[str] = []


def _stateless(cls: type, name: str) -> None:
    """A codec for a block without parameters or options."""

    def encode(m: nn.Module, enc: Encoder) -> dict:
        return {}

    def decode(cfg: dict, dec: Decoder) -> nn.Module:
        Config(cfg, ())
        return cls()

    register_codec(cls, name, encode, decode)


_stateless(CellUpdate, "iternn.CellUpdate")
_stateless(OutputGate, "iternn.OutputGate")
_stateless(GatedMix, "iternn.GatedMix")


def _encode_reset_linear(m: ResetLinear, enc: Encoder) -> dict:
    return {
        "in_features": m.in_features,
        "out_features": m.out_features,
        "bias": m.bias is not None,
        "dtype": _uniform_dtype(m, enc),
    }


def _decode_reset_linear(cfg: dict, dec: Decoder) -> ResetLinear:
    c = Config(cfg, ("in_features", "out_features", "bias", "dtype"))
    return ResetLinear(c.int("in_features", low=1), c.int("out_features", low=1),
                       bias=c.bool("bias"), dtype=c.dtype("dtype"))


register_codec(ResetLinear, "iternn.ResetLinear", _encode_reset_linear, _decode_reset_linear)

_GATED_OPTIONS = {
    "input_size": "int", "hidden_size": "int", "num_layers": "int", "bias": "bool",
    "batch_first": "bool", "dropout": "float",
}
_register_rnn_codec(LSTMMap, "iternn.LSTMMap", {**_GATED_OPTIONS, "proj_size": "int"})
_register_rnn_codec(GRUMap, "iternn.GRUMap", _GATED_OPTIONS)
