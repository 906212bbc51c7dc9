"""Codecs for what :func:`~iternn.from_module` builds: its result class
(:class:`~iternn.convert.module.ModuleMap`), its blocks (:mod:`iternn.convert.ops`) and
the element-wise torch layers it folds into slot activations beyond those of
:mod:`iternn.io.codecs`.

Every decode reads its config through :class:`~iternn.io.codecs.Config` (exact fields,
typed getters, :class:`~iternn.FormatError` naming the field) and rebuilds the module
through its constructor, which checks the values again (shapes that do not fit, an
unknown op name: the loader reports the constructor's error as a ``FormatError`` naming
the module). The only tensor a block of :mod:`~iternn.convert.ops` holds is
:class:`~iternn.convert.ops.TensorOp`'s, declared by shape, dtype and kind (parameter or
buffer) and filled from the file.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..convert import ops
from ..convert.module import ModuleMap
from ..errors import FormatError
from .codecs import Config
from .registry import dtype_name, register_codec
from .structure import Decoder, Encoder

__all__: list[str] = []


def _ints(c: Config, key: str, *, low: int = 0) -> tuple[int, ...]:
    v = c.list(key)
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= low for n in v):
        raise FormatError(f"config field {key!r} must be a list of ints >= {low}, got {v!r}")
    return tuple(v)


def _number(c: Config, key: str, *, optional: bool = False) -> float | int | None:
    v = c.raw(key)
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise FormatError(f"config field {key!r} must be a finite number, got {v!r}")
    return v


def _finite(m: nn.Module, enc: Encoder, **values: float | int | None) -> None:
    for k, v in values.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise enc.unsupported(f"has {k}={v!r}, which strict JSON cannot hold")


# ---------------------------------------------------------------------------- torch layers
def _plain(cls: type, name: str, fields: dict[str, str]) -> None:
    """A codec for an element-wise layer rebuilt from the attributes ``fields``."""

    def encode(m, enc):
        cfg = {f: getattr(m, f) for f in fields}
        _finite(m, enc, **cfg)
        return cfg

    def decode(cfg, dec):
        c = Config(cfg, tuple(fields))
        return cls(**{f: getattr(c, kind)(f) for f, kind in fields.items()})

    register_codec(cls, name, encode, decode)


_plain(nn.Softplus, "torch.nn.Softplus", {"beta": "float", "threshold": "float"})
_plain(nn.Mish, "torch.nn.Mish", {"inplace": "bool"})
_plain(nn.Hardswish, "torch.nn.Hardswish", {"inplace": "bool"})
_plain(nn.Hardsigmoid, "torch.nn.Hardsigmoid", {"inplace": "bool"})
_plain(nn.ReLU6, "torch.nn.ReLU6", {"inplace": "bool"})
_plain(nn.SELU, "torch.nn.SELU", {"inplace": "bool"})
_plain(nn.CELU, "torch.nn.CELU", {"alpha": "float", "inplace": "bool"})
_plain(nn.Softsign, "torch.nn.Softsign", {})
_plain(nn.LogSigmoid, "torch.nn.LogSigmoid", {})
# nn.Hardtanh converts but has no codec yet: tests/test_io.py uses it as its example of an
# unregistered module.


# ---------------------------------------------------------------------------- shape blocks
def _encode_reshape(m: ops.Reshape, enc: Encoder) -> dict:
    return {"in_shape": list(m.in_shape), "out_shape": list(m.out_shape)}


def _decode_reshape(cfg: dict, dec: Decoder) -> ops.Reshape:
    c = Config(cfg, ("in_shape", "out_shape"))
    return ops.Reshape(_ints(c, "in_shape"), _ints(c, "out_shape"))


register_codec(ops.Reshape, "iternn.ops.Reshape", _encode_reshape, _decode_reshape)


def _decode_broadcast(cfg: dict, dec: Decoder) -> ops.Broadcast:
    c = Config(cfg, ("in_shape", "out_shape"))
    return ops.Broadcast(_ints(c, "in_shape"), _ints(c, "out_shape"))


register_codec(ops.Broadcast, "iternn.ops.Broadcast", _encode_reshape, _decode_broadcast)
register_codec(
    ops.Permute, "iternn.ops.Permute",
    lambda m, enc: {"perm": list(m.perm)},
    lambda cfg, dec: ops.Permute(_ints(Config(cfg, ("perm",)), "perm")),
)


def _decode_index(cfg: dict, dec: Decoder) -> ops.Index:
    c = Config(cfg, ("in_shape", "index"))
    return ops.Index(_ints(c, "in_shape"), c.list("index"))


register_codec(
    ops.Index, "iternn.ops.Index",
    lambda m, enc: {"in_shape": list(m.in_shape), "index": m.index}, _decode_index,
)


def _encode_place(m: ops.Place, enc: Encoder) -> dict:
    return {"in_shape": list(m.in_shape), "out_shape": list(m.out_shape), "dim": m.dim,
            "ranges": [list(r) for r in m.ranges]}


def _decode_place(cfg: dict, dec: Decoder) -> ops.Place:
    c = Config(cfg, ("in_shape", "out_shape", "dim", "ranges"))
    return ops.Place(_ints(c, "in_shape"), _ints(c, "out_shape"), c.int("dim"),
                     c.list("ranges", item_len=2))


register_codec(ops.Place, "iternn.ops.Place", _encode_place, _decode_place)


# ---------------------------------------------------------------------------- operations
register_codec(
    ops.UnaryOp, "iternn.ops.UnaryOp",
    lambda m, enc: {"op": m.op},
    lambda cfg, dec: ops.UnaryOp(Config(cfg, ("op",)).str("op", tuple(ops.UNARY))),
)
register_codec(
    ops.BinaryOp, "iternn.ops.BinaryOp",
    lambda m, enc: {"op": m.op},
    lambda cfg, dec: ops.BinaryOp(Config(cfg, ("op",)).str("op", tuple(ops.BINARY))),
)


def _encode_scalar(m: ops.ScalarOp, enc: Encoder) -> dict:
    _finite(m, enc, value=m.value)
    return {"op": m.op, "value": m.value, "reverse": m.reverse}


def _decode_scalar(cfg: dict, dec: Decoder) -> ops.ScalarOp:
    c = Config(cfg, ("op", "value", "reverse"))
    return ops.ScalarOp(c.str("op", tuple(ops.BINARY)), _number(c, "value"), reverse=c.bool("reverse"))


register_codec(ops.ScalarOp, "iternn.ops.ScalarOp", _encode_scalar, _decode_scalar)


def _encode_clamp(m: ops.Clamp, enc: Encoder) -> dict:
    _finite(m, enc, min=m.min, max=m.max)
    return {"min": m.min, "max": m.max}


def _decode_clamp(cfg: dict, dec: Decoder) -> ops.Clamp:
    c = Config(cfg, ("min", "max"))
    return ops.Clamp(_number(c, "min", optional=True), _number(c, "max", optional=True))


register_codec(ops.Clamp, "iternn.ops.Clamp", _encode_clamp, _decode_clamp)


def _encode_tensor_op(m: ops.TensorOp, enc: Encoder) -> dict:
    t = m.tensor
    if not t.is_floating_point():
        raise enc.unsupported(f"holds a {t.dtype} tensor; only floating tensors are saved")
    return {"op": m.op, "reverse": m.reverse, "shape": list(t.shape), "dtype": dtype_name(t.dtype),
            "kind": "parameter" if isinstance(t, nn.Parameter) else "buffer"}


def _decode_tensor_op(cfg: dict, dec: Decoder) -> ops.TensorOp:
    """The tensor is declared here (on the meta device) and filled from the file."""
    c = Config(cfg, ("op", "reverse", "shape", "dtype", "kind"))
    shape = _ints(c, "shape")
    dec.tensor_shape("tensor", shape)
    t = torch.empty(shape, dtype=c.dtype("dtype"))
    if c.str("kind", ("parameter", "buffer")) == "parameter":
        t = nn.Parameter(t)
    return ops.TensorOp(c.str("op", tuple(ops.BINARY)), t, reverse=c.bool("reverse"))


register_codec(ops.TensorOp, "iternn.ops.TensorOp", _encode_tensor_op, _decode_tensor_op)


def _encode_reduce(m: ops.Reduce, enc: Encoder) -> dict:
    return {"op": m.op, "in_shape": list(m.in_shape), "dims": list(m.dims), "keepdim": m.keepdim}


def _decode_reduce(cfg: dict, dec: Decoder) -> ops.Reduce:
    c = Config(cfg, ("op", "in_shape", "dims", "keepdim"))
    return ops.Reduce(c.str("op", tuple(ops.REDUCTIONS)), _ints(c, "in_shape"), _ints(c, "dims"),
                      keepdim=c.bool("keepdim"))


register_codec(ops.Reduce, "iternn.ops.Reduce", _encode_reduce, _decode_reduce)
register_codec(
    ops.IndexEmbedding, "iternn.ops.IndexEmbedding",
    lambda m, enc: {"embedding": enc.child(m.embedding, "embedding")},
    lambda cfg, dec: ops.IndexEmbedding(dec.child(Config(cfg, ("embedding",)).raw("embedding"))),
)


# ---------------------------------------------------------------------------- the result
def _json_default(v: object) -> bool:
    return v is None or isinstance(v, (bool, int, str)) or (isinstance(v, float) and math.isfinite(v))


def _encode_module_map(m: ModuleMap, enc: Encoder) -> dict:
    """The map and the signature's templates (constants must be JSON scalars)."""

    def check(t: dict, path: str) -> None:
        if "const" in t and not _json_default(t["const"]):
            raise enc.unsupported(f"is specialised to {path} = {t['const']!r}, which JSON cannot hold")
        for kind in ("tuple", "list"):
            for i, sub in enumerate(t.get(kind, ())):
                check(sub, f"{path}[{i}]")
        for k, sub in t.get("dict", ()):
            check(sub, f"{path}[{k!r}]")

    for name, _, default, tpl in m.params:
        check(tpl, name)
        if default is not None and not _json_default(default["value"]):
            raise enc.unsupported(f"has parameter {name!r} with the default {default['value']!r}, "
                                  "which JSON cannot hold")
    check(m.outputs, "the output")
    return {"map": enc.child(m.map, "map"), "params": [list(p) for p in m.params],
            "outputs": m.outputs, "sources": [[k, v] for k, v in m.source_names.items()]}


def _decode_module_map(cfg: dict, dec: Decoder) -> ModuleMap:
    c = Config(cfg, ("map", "params", "outputs", "sources"))
    outputs = c.raw("outputs")
    if not isinstance(outputs, dict):
        raise FormatError(f"config field 'outputs' must be an object, got {outputs!r}")
    sources = c.list("sources", item_len=2)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in sources):
        raise FormatError("config field 'sources' must list [name, source name] pairs of str")
    return ModuleMap(dec.child(c.raw("map")), c.list("params", item_len=4), outputs,
                     sources=dict(sources))


register_codec(ModuleMap, "iternn.ModuleMap", _encode_module_map, _decode_module_map)
