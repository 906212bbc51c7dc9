"""The built-in codecs, all in one place, registered on import.

Torch modules (``Linear``, ``LayerNorm``, the element-wise activations, ``Dropout``,
``Sequential``, ``ModuleList``, ``ModuleDict``, ``TransformerEncoderLayer``,
``TransformerEncoder``, convolutions, transposed convolutions, batch and group
normalisation, pooling, ``Flatten``/``Unflatten``, ``Embedding``, ``Softmax``), iternn's
maps (``BlockMap``, ``MapModule``), the converter results (``RNNMap``, ``LiftedRNN``,
``TransformerMap``, ``EncoderLayerBlock``; ``ModuleMap`` and the blocks of
:mod:`iternn.convert.ops` in :mod:`~iternn.io.module_codecs`; ``LSTMMap``, ``GRUMap``
and their gate blocks ``CellUpdate``, ``OutputGate``, ``ResetLinear``, ``GatedMix`` in
:mod:`~iternn.io.gated_codecs`) and the sparse and structured blocks (``SparseLinear``,
``MaskedLinear``, ``DiagonalLinear``, ``LowRankLinear``, ``BlockDiagonalLinear``).

Every decode reads its config through :class:`Config`, which refuses missing or
unexpected fields and values of the wrong type or range, naming the field. Decodes run
with torch's default device set to ``meta`` (see :func:`iternn.io.register_codec`); a
block whose constructor draws its initial values on the CPU whatever the default device
(the structured blocks) first checks its declared sizes against the stored tensors
(:meth:`~iternn.io.Decoder.tensor_shape`), so a file cannot make it allocate more than
the file holds. ``SparseLinear`` and ``MaskedLinear`` are built from the stored pattern
(``crow_indices``/``col_indices``, or ``mask``), which is validated first: a bad pattern
is a :class:`~iternn.FormatError` naming the tensor, never a read out of bounds in the
kernels.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..convert.lift import LiftedRNN
from ..convert.rnn import RNNMap
from ..convert.transformer import EncoderLayerBlock, TransformerMap
from ..core.block_map import BlockMap, block_key
from ..engine.map_module import MapModule
from ..errors import FormatError
from ..sparse.checks import INDEX_DTYPES, check_csr_pattern
from ..sparse.kernels import pattern_rows
from ..sparse.linear import MaskedLinear, SparseLinear
from ..sparse.structured import BlockDiagonalLinear, DiagonalLinear, LowRankLinear
from .registry import dtype_from_name, dtype_name, register_codec
from .structure import Decoder, Encoder, join, show

__all__ = ["Config"]

_MISSING = object()


class Config:
    """A codec config read with checks: exactly ``fields``, each of the asked type.

    Every getter raises :class:`FormatError` naming the field (the decoder adds the
    module's path and the loader the file's).
    """

    def __init__(self, cfg: dict, fields: tuple[str, ...]) -> None:
        missing = [f for f in fields if f not in cfg]
        extra = sorted(set(cfg) - set(fields))
        if missing or extra:
            raise FormatError(f"config fields: missing {missing}, unexpected {extra}")
        self._cfg = cfg

    def raw(self, key: str) -> Any:
        return self._cfg[key]

    def int(self, key: str, *, low: int = 0) -> int:
        v = self._cfg[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise FormatError(f"config field {key!r} must be an int >= {low}, got {v!r}")
        return v

    def bool(self, key: str) -> bool:
        v = self._cfg[key]
        if not isinstance(v, bool):
            raise FormatError(f"config field {key!r} must be true or false, got {v!r}")
        return v

    def float(self, key: str, *, low: float = -math.inf, high: float = math.inf) -> float:
        v = self._cfg[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= v <= high:
            raise FormatError(f"config field {key!r} must be a number in [{low}, {high}], got {v!r}")
        return float(v)

    def str(self, key: str, choices: tuple[str, ...] | None = None) -> str:
        v = self._cfg[key]
        if not isinstance(v, str) or (choices is not None and v not in choices):
            want = f"one of {list(choices)}" if choices is not None else "a str"
            raise FormatError(f"config field {key!r} must be {want}, got {v!r}")
        return v

    def dtype(self, key: str, *, optional: bool = False) -> torch.dtype | None:
        v = self._cfg[key]
        if v is None and optional:
            return None
        try:
            dtype = dtype_from_name(v)
        except FormatError:
            dtype = None
        if dtype is None or not dtype.is_floating_point:
            raise FormatError(f"config field {key!r} must name a floating-point dtype, got {v!r}")
        return dtype

    def list(self, key: str, *, item_len: int | None = None) -> list:
        v = self._cfg[key]
        if not isinstance(v, list) or (item_len is not None and not all(
                isinstance(x, list) and len(x) == item_len for x in v)):
            shape = f" of {item_len}-element lists" if item_len is not None else ""
            raise FormatError(f"config field {key!r} must be a list{shape}, got {v!r}")
        return v


def _names(items: list, key: str, at: int = 0) -> None:
    bad = next((x for x in items if not isinstance(x[at], str)), _MISSING)
    if bad is not _MISSING:
        raise FormatError(f"config field {key!r}: {bad!r} does not start with a name (str)")


def _uniform_dtype(m: nn.Module, enc: Encoder) -> str | None:
    dtypes = {t.dtype for t in m.parameters()} | {t.dtype for t in m.buffers()}
    if len(dtypes) > 1:
        raise enc.unsupported(f"mixes dtypes {sorted(dtype_name(d) for d in dtypes)}")
    return dtype_name(dtypes.pop()) if dtypes else None


def _param_dtype(m: nn.Module, enc: Encoder) -> str:
    dtypes = {p.dtype for p in m.parameters()}
    if len(dtypes) != 1:
        raise enc.unsupported(f"mixes dtypes {sorted(dtype_name(d) for d in dtypes)}")
    return dtype_name(dtypes.pop())


# ---------------------------------------------------------------------------- torch modules
def _simple(cls: type, name: str, fields: dict[str, str]) -> None:
    """A codec for a module whose constructor takes exactly these attributes, each read
    with the :class:`Config` getter named in ``fields`` (``"bool"``, ``"float"``...)."""

    def encode(m, enc):
        return {f: getattr(m, f) for f in fields}

    def decode(cfg, dec):
        c = Config(cfg, tuple(fields))
        return cls(**{f: getattr(c, kind)(f) for f, kind in fields.items()})

    register_codec(cls, name, encode, decode)


_simple(nn.Identity, "torch.nn.Identity", {})
_simple(nn.ReLU, "torch.nn.ReLU", {"inplace": "bool"})
_simple(nn.LeakyReLU, "torch.nn.LeakyReLU", {"negative_slope": "float", "inplace": "bool"})
_simple(nn.Tanh, "torch.nn.Tanh", {})
_simple(nn.Sigmoid, "torch.nn.Sigmoid", {})
_simple(nn.GELU, "torch.nn.GELU", {"approximate": "str"})
_simple(nn.ELU, "torch.nn.ELU", {"alpha": "float", "inplace": "bool"})
_simple(nn.SiLU, "torch.nn.SiLU", {"inplace": "bool"})
_simple(nn.Dropout, "torch.nn.Dropout", {"p": "float", "inplace": "bool"})


def _json_value(v: Any) -> Any:
    """A constructor option as JSON: tuples become lists."""
    return list(v) if isinstance(v, tuple) else v


def _option(key: str, v: Any) -> Any:
    """A constructor option read back: a number, bool, str, None or a list of ints (a
    tuple again); anything else is a :class:`FormatError` naming the field."""
    if isinstance(v, list):
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            raise FormatError(f"config field {key!r} must be a list of ints, got {v!r}")
        return tuple(v)
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise FormatError(f"config field {key!r} has an unsupported value {v!r}")


def _layer(cls: type, name: str, fields: tuple[str, ...], *, flags: dict | None = None) -> None:
    """A codec for a torch layer rebuilt from its constructor options ``fields`` (read
    from the attributes of the same name) and, where it holds tensors, its ``dtype``.
    ``flags`` maps an option to a function of the module computing it (``bias`` of a
    convolution is whether it has one). ``save`` compares the rebuilt layer's public
    attributes with the original's, so an option left out here cannot pass unnoticed."""
    flags = flags or {}

    def encode(m, enc):
        cfg = {f: _json_value(flags[f](m) if f in flags else getattr(m, f)) for f in fields}
        floating = {t.dtype for t in (*m.parameters(), *m.buffers()) if t.is_floating_point()}
        if len(floating) > 1:
            raise enc.unsupported(f"mixes dtypes {sorted(dtype_name(d) for d in floating)}")
        cfg["dtype"] = dtype_name(floating.pop()) if floating else None
        return cfg

    def decode(cfg, dec):
        c = Config(cfg, (*fields, "dtype"))
        kwargs = {f: _option(f, c.raw(f)) for f in fields}
        if c.raw("dtype") is not None:
            kwargs["dtype"] = c.dtype("dtype")
        return cls(**kwargs)

    register_codec(cls, name, encode, decode)


def _has_bias(m: nn.Module) -> bool:
    return m.bias is not None


_CONV = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
         "bias", "padding_mode")
for _cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    _layer(_cls, f"torch.nn.{_cls.__name__}", _CONV, flags={"bias": _has_bias})
for _cls in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    _layer(_cls, f"torch.nn.{_cls.__name__}", (*_CONV, "output_padding"),
           flags={"bias": _has_bias})
for _cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
    _layer(_cls, f"torch.nn.{_cls.__name__}",
           ("num_features", "eps", "momentum", "affine", "track_running_stats"))
_layer(nn.GroupNorm, "torch.nn.GroupNorm", ("num_groups", "num_channels", "eps", "affine"))
for _cls in (nn.MaxPool1d, nn.MaxPool2d):
    _layer(_cls, f"torch.nn.{_cls.__name__}",
           ("kernel_size", "stride", "padding", "dilation", "return_indices", "ceil_mode"))
_layer(nn.AvgPool1d, "torch.nn.AvgPool1d",
       ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"))
_layer(nn.AvgPool2d, "torch.nn.AvgPool2d",
       ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"))
for _cls in (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d,
             nn.AdaptiveMaxPool2d):
    _layer(_cls, f"torch.nn.{_cls.__name__}",
           ("output_size",) + (("return_indices",) if "Max" in _cls.__name__ else ()))
_layer(nn.Flatten, "torch.nn.Flatten", ("start_dim", "end_dim"))
_layer(nn.Unflatten, "torch.nn.Unflatten", ("dim", "unflattened_size"))
_layer(nn.Embedding, "torch.nn.Embedding",
       ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
        "scale_grad_by_freq", "sparse"))
for _cls in (nn.Dropout1d, nn.Dropout2d):
    _layer(_cls, f"torch.nn.{_cls.__name__}", ("p", "inplace"))
for _cls in (nn.Softmax, nn.LogSoftmax):
    _layer(_cls, f"torch.nn.{_cls.__name__}", ("dim",))


def _encode_linear(m: nn.Linear, enc: Encoder) -> dict:
    return {
        "in_features": m.in_features,
        "out_features": m.out_features,
        "bias": m.bias is not None,
        "dtype": _uniform_dtype(m, enc),
    }


def _decode_linear(cfg: dict, dec: Decoder) -> nn.Linear:
    c = Config(cfg, ("in_features", "out_features", "bias", "dtype"))
    return nn.Linear(c.int("in_features"), c.int("out_features"), bias=c.bool("bias"),
                     dtype=c.dtype("dtype"))


register_codec(nn.Linear, "torch.nn.Linear", _encode_linear, _decode_linear)


def _encode_layer_norm(m: nn.LayerNorm, enc: Encoder) -> dict:
    return {
        "normalized_shape": list(m.normalized_shape),
        "eps": m.eps,
        "elementwise_affine": m.elementwise_affine,
        "bias": m.bias is not None,
        "dtype": _uniform_dtype(m, enc),
    }


def _decode_layer_norm(cfg: dict, dec: Decoder) -> nn.LayerNorm:
    c = Config(cfg, ("normalized_shape", "eps", "elementwise_affine", "bias", "dtype"))
    shape = c.list("normalized_shape")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise FormatError(f"config field 'normalized_shape' must list ints >= 0, got {shape!r}")
    return nn.LayerNorm(
        tuple(shape), eps=c.float("eps", low=0.0), elementwise_affine=c.bool("elementwise_affine"),
        bias=c.bool("bias"), dtype=c.dtype("dtype", optional=True),
    )


register_codec(nn.LayerNorm, "torch.nn.LayerNorm", _encode_layer_norm, _decode_layer_norm)


def _encode_sequential(m: nn.Sequential, enc: Encoder) -> dict:
    return {"children": [[name, enc.child(sub, name)] for name, sub in m._modules.items()]}


def _decode_sequential(cfg: dict, dec: Decoder) -> nn.Sequential:
    children = Config(cfg, ("children",)).list("children", item_len=2)
    _names(children, "children")
    return nn.Sequential(OrderedDict((name, dec.child(ref)) for name, ref in children))


register_codec(nn.Sequential, "torch.nn.Sequential", _encode_sequential, _decode_sequential)


def _encode_module_list(m: nn.ModuleList, enc: Encoder) -> dict:
    return {"children": [enc.child(sub, str(i)) for i, sub in enumerate(m)]}


def _decode_module_list(cfg: dict, dec: Decoder) -> nn.ModuleList:
    return nn.ModuleList(dec.child(ref) for ref in Config(cfg, ("children",)).list("children"))


register_codec(nn.ModuleList, "torch.nn.ModuleList", _encode_module_list, _decode_module_list)


def _encode_module_dict(m: nn.ModuleDict, enc: Encoder) -> dict:
    return {"children": [[k, enc.child(sub, k)] for k, sub in m.items()]}


def _decode_module_dict(cfg: dict, dec: Decoder) -> nn.ModuleDict:
    children = Config(cfg, ("children",)).list("children", item_len=2)
    _names(children, "children")
    return nn.ModuleDict(OrderedDict((k, dec.child(ref)) for k, ref in children))


register_codec(nn.ModuleDict, "torch.nn.ModuleDict", _encode_module_dict, _decode_module_dict)

_ACTIVATION_FNS = {"relu": F.relu, "gelu": F.gelu}

_ENCODER_LAYER_PARTS = {
    "self_attn": nn.MultiheadAttention, "linear1": nn.Linear, "linear2": nn.Linear,
    "dropout": nn.Dropout, "dropout1": nn.Dropout, "dropout2": nn.Dropout,
    "norm1": nn.LayerNorm, "norm2": nn.LayerNorm,
}
_ENCODER_LAYER_FIELDS = (
    "d_model", "nhead", "dim_feedforward", "dropout", "activation", "layer_norm_eps",
    "batch_first", "norm_first", "bias", "dtype",
)


def _encode_encoder_layer(m: nn.TransformerEncoderLayer, enc: Encoder) -> dict:
    for attr, cls in _ENCODER_LAYER_PARTS.items():
        part = getattr(m, attr, None)
        if type(part) is not cls:
            raise enc.unsupported(
                f"has {join(enc.path, attr)}: {type(part).__name__}, not what the "
                f"TransformerEncoderLayer codec rebuilds ({cls.__name__})"
            )
    attn = m.self_attn
    act = m.activation
    if isinstance(act, nn.Module):
        activation: Any = {"module": enc.child(act, "activation")}
    else:
        activation = next((k for k, fn in _ACTIVATION_FNS.items() if act is fn), None)
        if activation is None:
            raise enc.unsupported(
                f"has activation {act!r}; only F.relu, F.gelu or a module with a codec can be saved"
            )
    p = m.dropout.p
    if not (m.dropout1.p == m.dropout2.p == attn.dropout == p):
        raise enc.unsupported(
            f"has differing dropout probabilities (dropout {p}, dropout1 {m.dropout1.p}, "
            f"dropout2 {m.dropout2.p}, self_attn {attn.dropout}); its constructor sets one"
        )
    if m.norm1.eps != m.norm2.eps:
        raise enc.unsupported(f"has norm1.eps={m.norm1.eps} != norm2.eps={m.norm2.eps}")
    if attn.add_zero_attn or attn.bias_k is not None or not attn._qkv_same_embed_dim:
        raise enc.unsupported("has a self_attn its constructor does not build")
    if m.dropout.inplace or m.dropout1.inplace or m.dropout2.inplace:
        raise enc.unsupported("has an in-place dropout its constructor does not build")
    own = {id(t) for t in act.parameters()} if isinstance(act, nn.Module) else set()
    dtypes = {t.dtype for t in m.parameters() if id(t) not in own}
    if len(dtypes) > 1:
        raise enc.unsupported(f"mixes dtypes {sorted(dtype_name(d) for d in dtypes)}")
    return {
        "d_model": attn.embed_dim,
        "nhead": attn.num_heads,
        "dim_feedforward": m.linear1.out_features,
        "dropout": p,
        "activation": activation,
        "layer_norm_eps": m.norm1.eps,
        "batch_first": attn.batch_first,
        "norm_first": m.norm_first,
        "bias": m.linear1.bias is not None,
        "dtype": dtype_name(m.linear1.weight.dtype),
    }


def _decode_encoder_layer(cfg: dict, dec: Decoder) -> nn.TransformerEncoderLayer:
    c = Config(cfg, _ENCODER_LAYER_FIELDS)
    act = c.raw("activation")
    if isinstance(act, dict) and set(act) == {"module"}:
        activation = dec.child(act["module"])
    elif isinstance(act, str) and act in _ACTIVATION_FNS:
        activation = _ACTIVATION_FNS[act]
    else:
        raise FormatError(
            f"config field 'activation' must be one of {sorted(_ACTIVATION_FNS)} or "
            f"{{'module': reference}}, got {act!r}"
        )
    return nn.TransformerEncoderLayer(
        c.int("d_model", low=1), c.int("nhead", low=1),
        dim_feedforward=c.int("dim_feedforward", low=1), dropout=c.float("dropout", low=0.0, high=1.0),
        activation=activation, layer_norm_eps=c.float("layer_norm_eps", low=0.0),
        batch_first=c.bool("batch_first"), norm_first=c.bool("norm_first"), bias=c.bool("bias"),
        dtype=c.dtype("dtype"),
    )


register_codec(
    nn.TransformerEncoderLayer, "torch.nn.TransformerEncoderLayer",
    _encode_encoder_layer, _decode_encoder_layer,
)


def _encode_encoder(m: nn.TransformerEncoder, enc: Encoder) -> dict:
    if m.num_layers != len(m.layers):
        raise enc.unsupported(f"has num_layers={m.num_layers} but {len(m.layers)} layers")
    if type(m.layers) is not nn.ModuleList:
        raise enc.unsupported("has layers that are not an nn.ModuleList")
    return {
        "layers": [enc.child(layer, f"layers.{i}") for i, layer in enumerate(m.layers)],
        "norm": enc.child(m.norm, "norm") if m.norm is not None else None,
        "enable_nested_tensor": m.enable_nested_tensor,
        "use_nested_tensor": m.use_nested_tensor,
        "mask_check": m.mask_check,
    }


def _decode_encoder(cfg: dict, dec: Decoder) -> nn.TransformerEncoder:
    c = Config(cfg, ("layers", "norm", "enable_nested_tensor", "use_nested_tensor", "mask_check"))
    layers = [dec.child(ref) for ref in c.list("layers")]
    norm = dec.child(c.raw("norm")) if c.raw("norm") is not None else None
    with warnings.catch_warnings():  # the constructor's nested-tensor warning was seen at creation
        warnings.simplefilter("ignore")
        m = nn.TransformerEncoder(
            layers[0] if layers else nn.Identity(), 0, norm=norm,
            enable_nested_tensor=c.bool("enable_nested_tensor"), mask_check=c.bool("mask_check"),
        )
    m.layers = nn.ModuleList(layers)  # built once each, not deep copies of the first
    m.num_layers = len(layers)
    m.use_nested_tensor = c.bool("use_nested_tensor")
    return m


register_codec(nn.TransformerEncoder, "torch.nn.TransformerEncoder", _encode_encoder, _decode_encoder)


# ---------------------------------------------------------------------------- maps
def _encode_block_map(m: BlockMap, enc: Encoder) -> dict:
    return {
        "slots": [[name, shape[0] if len(shape) == 1 else list(shape)]
                  for name, shape in m.shapes.items()],
        "blocks": [
            [dst, src if isinstance(src, str) else list(src),
             enc.child(m.block(dst, src), f"blocks.{block_key(dst, src)}")]
            for dst, src in m.edges
        ],
        "biases": [[slot, dtype_name(p.dtype)] for slot, p in m.biases.items()],
        "activations": [[slot, enc.child(a, f"activations.{slot}")] for slot, a in m.activations.items()],
    }


def _decode_block_map(cfg: dict, dec: Decoder) -> BlockMap:
    c = Config(cfg, ("slots", "blocks", "biases", "activations"))
    slots, blocks = c.list("slots", item_len=2), c.list("blocks", item_len=3)
    biases, activations = c.list("biases", item_len=2), c.list("activations", item_len=2)
    for key, items, at in (("slots", slots, 0), ("blocks", blocks, 0),
                           ("biases", biases, 0), ("activations", activations, 0)):
        _names(items, key, at)
    for item in blocks:  # a source is a slot name or a list of them
        src = item[1]
        if not (isinstance(src, str) or (
                isinstance(src, list) and src and all(isinstance(x, str) for x in src))):
            raise FormatError(f"config field 'blocks': {item!r} has a source that is neither "
                              "a slot name nor a list of slot names")
    m = BlockMap(OrderedDict(
        (name, tuple(size) if isinstance(size, list) else size) for name, size in slots
    ))
    for dst, src, ref in blocks:
        m.connect(dst, src if isinstance(src, str) else tuple(src), dec.child(ref))
    for slot, dtype in biases:
        if slot not in m.slots:
            raise FormatError(f"config field 'biases' names slot {slot!r}, which the map lacks")
        m.set_bias(slot, torch.zeros(m.shapes[slot], dtype=dtype_from_name(dtype)))
    for slot, ref in activations:
        m.set_activation(slot, dec.child(ref))
    return m


register_codec(BlockMap, "iternn.BlockMap", _encode_block_map, _decode_block_map)


def _encode_map_module(m: MapModule, enc: Encoder) -> dict:
    return {"map": enc.child(m.map, "map"), "input": m.input, "output": m.output, "steps": m.steps}


def _decode_map_module(cfg: dict, dec: Decoder) -> MapModule:
    c = Config(cfg, ("map", "input", "output", "steps"))
    return MapModule(dec.child(c.raw("map")), input=c.raw("input"), output=c.raw("output"),
                     steps=c.raw("steps"))


register_codec(MapModule, "iternn.MapModule", _encode_map_module, _decode_map_module)


# ---------------------------------------------------------------------------- converters
# The converter classes (iternn.convert) are saved as their constructor options plus
# their child map, encoded like any other module (so a block used at several places,
# e.g. LiftedRNN's tied step blocks, is written once and comes back as one module).
# RNNMap and LiftedRNN build their map inside __init__; they are rebuilt as a
# constructor call on the meta device (no initialisation, no RNG, no memory) whose map
# is then replaced by the decoded one: ``map`` is their only submodule and everything
# else they hold is derived from the options. The decoded map must have exactly the
# structure that constructor call builds (slots, blocks, types, tying, shapes and
# hyperparameters): a map edited by hand is refused when saving, since no constructor
# call gives it.
_UNSET = object()


def _public_attrs(m: nn.Module) -> dict[str, Any]:
    """The plain attributes a module's constructor set (hooks, caches: private)."""
    return {k: v for k, v in vars(m).items() if not k.startswith("_") and k != "training"}


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and torch.equal(a, b)
    return type(a) is type(b) and a == b


def _attrs_mismatch(got: nn.Module, want: nn.Module, path: str) -> str | None:
    """Why ``got``'s attributes differ from those of the reference ``want``, or None."""
    for k, v in _public_attrs(want).items():
        have = vars(got).get(k, _UNSET)
        if have is _UNSET:
            return f"{join(path, k)} is missing (the constructor sets {v!r})"
        if not _same_value(have, v):
            return f"{join(path, k)} is {have!r}, the constructor gives {v!r}"
    return None


def _partition(items: list[tuple[str, Any]]) -> list[str]:
    """For every (key, object), the first key naming the same object."""
    first: dict[int, str] = {}
    return [first.setdefault(id(obj), key) for key, obj in items]


def _tree_mismatch(got: nn.Module, want: nn.Module, path: str = "") -> str | None:
    """Why the module tree ``got`` is not the one ``want`` (a constructor's) has, or None.

    Compares submodule paths and types, which submodules and parameters are shared,
    every submodule's plain attributes (sizes, dropout ``p``, ``inplace`` ...), block
    map slots and edges, and parameter and buffer names and shapes (not values, dtypes
    or devices: ``want`` may live on the meta device).
    """
    gm = list(got.named_modules(remove_duplicate=False))
    wm = list(want.named_modules(remove_duplicate=False))
    if [p for p, _ in gm] != [p for p, _ in wm]:
        have, need = [p for p, _ in gm], [p for p, _ in wm]
        extra = [p for p in have if p not in need]
        missing = [p for p in need if p not in have]
        return (
            f"{show(path)} has submodules {have} where the constructor builds {need} "
            f"(extra {extra}, missing {missing})"
        )
    for (p, a), (_, b) in zip(gm, wm):
        if type(a) is not type(b):
            return (
                f"{show(join(path, p))} is a {type(a).__name__}, the constructor builds "
                f"a {type(b).__name__}"
            )
    for kind, g_items, w_items in (
        ("module", gm, wm),
        ("parameter", list(got.named_parameters(remove_duplicate=False)),
         list(want.named_parameters(remove_duplicate=False))),
        ("buffer", list(got.named_buffers(remove_duplicate=False)),
         list(want.named_buffers(remove_duplicate=False))),
    ):
        if [k for k, _ in g_items] != [k for k, _ in w_items]:
            return (
                f"{show(path)} has {kind}s {[k for k, _ in g_items]}, the constructor "
                f"builds {[k for k, _ in w_items]}"
            )
        for k, g_first, w_first in zip(
            [k for k, _ in g_items], _partition(g_items), _partition(w_items)
        ):
            if g_first != w_first:
                where = show(join(path, k))
                if g_first != k:
                    return (
                        f"{kind} {where} is the same object as {join(path, g_first)}; "
                        "the constructor makes them separate"
                    )
                return (
                    f"{kind} {where} is not the same object as {join(path, w_first)}; "
                    "the constructor ties them"
                )
        if kind != "module":
            for (k, a), (_, b) in zip(g_items, w_items):
                if tuple(a.shape) != tuple(b.shape):
                    return (
                        f"{kind} {join(path, k)} has shape {list(a.shape)}, the "
                        f"constructor builds {list(b.shape)}"
                    )
    for (p, a), (_, b) in zip(gm, wm):
        where = join(path, p)
        why = _attrs_mismatch(a, b, where)
        if why:
            return why
        if isinstance(b, BlockMap):
            if list(a.shapes.items()) != list(b.shapes.items()):
                return f"{show(where)} has slots {dict(a.shapes)}, the constructor builds {dict(b.shapes)}"
            if a.edges != b.edges:
                return f"{show(where)} has blocks {list(a.edges)}, the constructor builds {list(b.edges)}"
    return None


# option -> Config getter
_RNN_OPTIONS = {
    "input_size": "int", "hidden_size": "int", "num_layers": "int", "nonlinearity": "str",
    "bias": "bool", "batch_first": "bool", "dropout": "float",
}


def _register_rnn_codec(cls: type, name: str, options: dict[str, str]) -> None:
    """Codec for a class built as ``cls(**options, device=, dtype=)`` that owns ``map``."""

    def encode(m, enc):
        opts = {k: getattr(m, k) for k in options}
        try:
            ref = cls(**opts, device="meta")
        except (TypeError, ValueError) as exc:
            raise enc.unsupported(f"has options no constructor call accepts: {exc}") from exc
        why = _tree_mismatch(m, ref)
        if why:
            raise enc.unsupported(f"is not what {cls.__name__}(...) builds: {why}")
        return {**opts, "map": enc.child(m.map, "map")}

    def decode(cfg, dec):
        c = Config(cfg, (*options, "map"))
        net = cls(**{k: getattr(c, kind)(k) for k, kind in options.items()}, device="meta")
        m = dec.child(c.raw("map"))
        why = _tree_mismatch(m, net.map, "map")
        if why:
            raise FormatError(f"the map does not fit the options: {why}")
        net.map = m  # the only submodule; replaces the meta skeleton's map
        return net

    register_codec(cls, name, encode, decode)


_register_rnn_codec(RNNMap, "iternn.RNNMap", _RNN_OPTIONS)
_register_rnn_codec(LiftedRNN, "iternn.LiftedRNN", {**_RNN_OPTIONS, "T": "int"})


def _encode_encoder_layer_block(m: EncoderLayerBlock, enc: Encoder) -> dict:
    try:
        ref = EncoderLayerBlock(m.layer)
    except TypeError as exc:
        raise enc.unsupported(str(exc)) from exc
    why = _attrs_mismatch(m, ref, enc.path)
    if why:
        raise enc.unsupported(f"is not what EncoderLayerBlock(layer) builds: {why}")
    return {"layer": enc.child(m.layer, "layer")}


def _decode_encoder_layer_block(cfg: dict, dec: Decoder) -> EncoderLayerBlock:
    return EncoderLayerBlock(dec.child(Config(cfg, ("layer",)).raw("layer")))


register_codec(
    EncoderLayerBlock, "iternn.EncoderLayerBlock",
    _encode_encoder_layer_block, _decode_encoder_layer_block,
)

_TRANSFORMER_MAP_OPTIONS = ("batch_first", "enable_nested_tensor", "use_nested_tensor", "mask_check")


def _encode_transformer_map(m: TransformerMap, enc: Encoder) -> dict:
    opts = {k: getattr(m, k) for k in _TRANSFORMER_MAP_OPTIONS}
    try:
        ref = TransformerMap(m.map, tuple(m.layer_keys), m.output, **opts)
    except Exception as exc:  # e.g. a map without slot "x"
        raise enc.unsupported(f"has a structure no constructor call accepts: {exc}") from exc
    why = _attrs_mismatch(m, ref, enc.path)
    if why:
        raise enc.unsupported(f"is not what TransformerMap(...) builds: {why}")
    return {
        "map": enc.child(m.map, "map"),
        "layer_keys": list(m.layer_keys),
        "output": m.output,
        **opts,
    }


def _decode_transformer_map(cfg: dict, dec: Decoder) -> TransformerMap:
    c = Config(cfg, ("map", "layer_keys", "output", *_TRANSFORMER_MAP_OPTIONS))
    keys = c.list("layer_keys")
    if not all(isinstance(k, str) for k in keys):
        raise FormatError(f"config field 'layer_keys' must be a list of str, got {keys!r}")
    nested = None if c.raw("use_nested_tensor") is None else c.bool("use_nested_tensor")
    return TransformerMap(
        dec.child(c.raw("map")), tuple(keys), c.str("output"),
        batch_first=c.bool("batch_first"), enable_nested_tensor=c.bool("enable_nested_tensor"),
        use_nested_tensor=nested, mask_check=c.bool("mask_check"),
    )


register_codec(TransformerMap, "iternn.TransformerMap", _encode_transformer_map, _decode_transformer_map)


# ---------------------------------------------------------------------------- sparse blocks
_SPARSE_FIELDS = ("in_features", "out_features", "nnz", "bias", "backend", "dtype")


def _encode_sparse_linear(m: SparseLinear, enc: Encoder) -> dict:
    return {"in_features": m.in_features, "out_features": m.out_features, "nnz": m.nnz,
            "bias": m.bias is not None, "backend": m.backend, "dtype": _param_dtype(m, enc)}


def _decode_sparse_linear(cfg: dict, dec: Decoder) -> SparseLinear:
    """Built from the stored pattern, checked first by ``check_csr_pattern``."""
    c = Config(cfg, _SPARSE_FIELDS)
    n_in, n_out, nnz = c.int("in_features", low=1), c.int("out_features", low=1), c.int("nnz")
    crow = dec.tensor("crow_indices", dtypes=INDEX_DTYPES, shape=(n_out + 1,))
    col = dec.tensor("col_indices", dtypes=INDEX_DTYPES, shape=(nnz,))
    check_csr_pattern(crow, col, (n_out, n_in), name=show(dec.path))
    rows = pattern_rows(crow, nnz)
    with torch.device("cpu"):  # the pattern and its transpose are real, not meta
        return SparseLinear(n_in, n_out, indices=torch.stack((rows, col.long())),
                            bias=c.bool("bias"), backend=c.str("backend", ("auto", "csr", "dense")),
                            dtype=c.dtype("dtype"))


def _encode_masked_linear(m: MaskedLinear, enc: Encoder) -> dict:
    return {"in_features": m.in_features, "out_features": m.out_features,
            "bias": m.bias is not None, "dtype": _param_dtype(m, enc)}


def _decode_masked_linear(cfg: dict, dec: Decoder) -> MaskedLinear:
    """Built from the stored mask; the weight stays on the meta device until loaded."""
    c = Config(cfg, ("in_features", "out_features", "bias", "dtype"))
    n_in, n_out = c.int("in_features", low=1), c.int("out_features", low=1)
    mask = dec.tensor("mask", dtypes=(torch.bool,), shape=(n_out, n_in))
    m = MaskedLinear(n_in, n_out, mask=mask, bias=c.bool("bias"), dtype=c.dtype("dtype"),
                     device="meta")
    m.mask = mask  # the stored mask itself (the constructor kept a meta copy)
    return m


register_codec(SparseLinear, "iternn.SparseLinear", _encode_sparse_linear, _decode_sparse_linear)
register_codec(MaskedLinear, "iternn.MaskedLinear", _encode_masked_linear, _decode_masked_linear)


def _structured(cls: type, name: str, extra: str | None, shapes) -> None:
    """A codec for a structured block: its sizes, ``extra`` (``rank``/``blocks``), bias
    flag and dtype. ``shapes(n_in, n_out, k)`` gives the parameter shapes the stored
    tensors must have: checked before the constructor draws initial values."""

    def encode(m, enc):
        return {"in_features": m.in_features, "out_features": m.out_features,
                "rank": getattr(m, "rank", None), "blocks": getattr(m, "blocks", None),
                "bias": m.bias is not None, "dtype": _uniform_dtype(m, enc)}

    def decode(cfg, dec):
        c = Config(cfg, ("in_features", "out_features", "rank", "blocks", "bias", "dtype"))
        n_in, n_out = c.int("in_features", low=1), c.int("out_features", low=1)
        k = c.int(extra, low=1) if extra is not None else None
        for other in ("rank", "blocks"):
            if other != extra and c.raw(other) is not None:
                raise FormatError(f"config field {other!r} must be null, got {c.raw(other)!r}")
        bias = c.bool("bias")
        wanted = dict(shapes(n_in, n_out, k))
        if bias:
            wanted["bias"] = (n_out,)
        for pname, shape in wanted.items():
            dec.tensor_shape(pname, shape)
        kwargs = {extra: k} if extra is not None else {}
        if cls is DiagonalLinear:
            if n_in != n_out:
                raise FormatError(f"a DiagonalLinear has in_features == out_features, got {n_in}, {n_out}")
            return cls(n_in, bias=bias, dtype=c.dtype("dtype"), device="meta")
        return cls(n_in, n_out, **kwargs, bias=bias, dtype=c.dtype("dtype"), device="meta")

    register_codec(cls, name, encode, decode)


_structured(DiagonalLinear, "iternn.DiagonalLinear", None, lambda i, o, k: {"diagonal": (i,)})
_structured(LowRankLinear, "iternn.LowRankLinear", "rank",
            lambda i, o, k: {"u": (o, k), "v": (k, i)})
_structured(BlockDiagonalLinear, "iternn.BlockDiagonalLinear", "blocks",
            lambda i, o, k: {"weight": (k, o // k, i // k)})

# The converters' results and blocks: from_module (and the element-wise layers it
# folds), from_lstm and from_gru.
from . import gated_codecs, module_codecs  # noqa: E402,F401
