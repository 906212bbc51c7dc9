"""The codec registry: how each module class is written to and rebuilt from JSON.

A codec is registered for one *exact* module type (a subclass needs its own: its
``forward`` may differ) under a ``name`` that is written in files.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import FormatError, MapError, MapTypeError, NotRegisteredError

if TYPE_CHECKING:  # pragma: no cover
    from .structure import Decoder, Encoder

__all__ = [
    "Codec",
    "register_codec",
    "unregister_codec",
    "registered_codecs",
    "codec_for_type",
    "codec_named",
    "dtype_name",
    "dtype_from_name",
]


@dataclass(frozen=True)
class Codec:
    """How one module class is written to and rebuilt from JSON (see :mod:`iternn.io`)."""

    cls: type
    name: str
    encode: Callable[[nn.Module, Encoder], dict]
    decode: Callable[[dict, Decoder], nn.Module]


_BY_TYPE: dict[type, Codec] = {}
_BY_NAME: dict[str, Codec] = {}


def register_codec(
    cls: type,
    name: str,
    encode: Callable[[nn.Module, Encoder], dict],
    decode: Callable[[dict, Decoder], nn.Module],
    *,
    replace: bool = False,
) -> Codec:
    """Register how modules of exactly type ``cls`` are saved and loaded.

    Args:
        cls: the module class (matched exactly, not its subclasses).
        name: the name written in files, e.g. ``"iternn.RNNMap"``; never reuse a name
            for a different structure (bump the name instead, e.g. ``"...@2"``).
        encode: ``encode(module, enc) -> dict``, a JSON-able config. Encode children
            with ``enc.child(sub, "attr.path")`` (it returns a reference to put in the
            config); refuse unrepresentable modules with ``raise enc.unsupported(why)``.
        decode: ``decode(config, dec) -> module`` with parameters of the recorded
            shapes and dtypes; get children with ``dec.child(ref)`` and the module's
            stored tensors, where the structure depends on them, with
            ``dec.tensor(name)``. It runs with torch's default device set to ``meta``
            (factory calls without a device allocate nothing; ``load`` then puts the
            file's tensors in place) and the global RNG forked. On a bad config it may
            raise anything (``KeyError``, ``ValueError``...): ``load`` reports it as a
            :class:`FormatError` naming the module. It must return exactly ``cls``.
        replace: allow replacing an existing registration of ``cls`` or ``name``.

    Returns the :class:`Codec`. Raises :class:`~iternn.MapError` (a ``ValueError``)
    when ``cls`` or ``name`` is already registered (unless ``replace``),
    :class:`~iternn.MapTypeError` (a ``TypeError``) on bad arguments.
    """
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise MapTypeError(f"cls must be an nn.Module subclass, got {cls!r}")
    if not isinstance(name, str) or not name:
        raise MapTypeError(f"codec name must be a non-empty str, got {name!r}")
    if not callable(encode) or not callable(decode):
        raise MapTypeError(f"encode and decode of codec {name!r} must be callable")
    old_by_type, old_by_name = _BY_TYPE.get(cls), _BY_NAME.get(name)
    if not replace:
        if old_by_type is not None:
            raise MapError(
                f"{cls.__qualname__} already has codec {old_by_type.name!r}; pass replace=True"
            )
        if old_by_name is not None:
            raise MapError(
                f"codec name {name!r} is already used by {old_by_name.cls.__qualname__}; "
                "pass replace=True"
            )
    for old in (old_by_type, old_by_name):
        if old is not None:
            _BY_TYPE.pop(old.cls, None)
            _BY_NAME.pop(old.name, None)
    codec = Codec(cls, name, encode, decode)
    _BY_TYPE[cls] = codec
    _BY_NAME[name] = codec
    return codec


def unregister_codec(cls_or_name: type | str) -> Codec:
    """Remove a registration (by class or by name) and return it; ``KeyError`` if none."""
    codec = _BY_NAME.get(cls_or_name) if isinstance(cls_or_name, str) else _BY_TYPE.get(cls_or_name)
    if codec is None:
        raise NotRegisteredError(f"no codec registered for {cls_or_name!r}")
    del _BY_TYPE[codec.cls]
    del _BY_NAME[codec.name]
    return codec


def registered_codecs() -> Mapping[str, Codec]:
    """Read-only view ``name -> Codec`` of the registry."""
    return MappingProxyType(_BY_NAME)


def codec_for_type(cls: type) -> Codec | None:
    """The codec registered for exactly ``cls``, or ``None``."""
    return _BY_TYPE.get(cls)


def codec_named(name: str) -> Codec | None:
    """The codec registered under ``name``, or ``None``."""
    return _BY_NAME.get(name)


# ---------------------------------------------------------------------------- dtypes
def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32 -> "float32"`` (the form codecs write)."""
    if not isinstance(dtype, torch.dtype):
        raise MapTypeError(f"expected a torch.dtype, got {dtype!r}")
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`; :class:`FormatError` (a ``ValueError``) for anything else."""
    value = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(value, torch.dtype) or dtype_name(value) != name:
        raise FormatError(f"{name!r} is not a torch dtype name")
    return value
