"""Module trees to and from the document's ``"modules"`` list.

:class:`Encoder` walks a module tree through the registered codecs and lists one entry
``{"codec", "path", "config"}`` per distinct module (a module reached twice is written
once; configs refer to children by index). :class:`Decoder` rebuilds the tree from that
list, each module once, so shared modules stay shared.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import FormatError, MapError, MapTypeError
from .registry import codec_for_type, codec_named, registered_codecs

__all__ = ["Encoder", "Decoder", "MAX_MODULE_DEPTH", "show", "join"]

#: Deepest nesting of modules (a child of a child of ...) that the decoder follows.
MAX_MODULE_DEPTH = 100


def show(path: str) -> str:
    """A module path for messages: ``"<root>"`` for the root."""
    return path if path else "<root>"


def join(parent: str, name: str) -> str:
    """``parent.name`` (just ``name`` under the root)."""
    return f"{parent}.{name}" if parent else name


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# ---------------------------------------------------------------------------- encoding
class Encoder:
    """Passed to every ``encode``: encodes children and names the current module."""

    def __init__(self) -> None:
        self.modules: list[dict | None] = []
        self._index: dict[int, int] = {}
        self._in_progress: set[int] = set()
        self._keep: list[nn.Module] = []  # ids stay valid while we hold the modules
        self._stack: list[tuple[str, nn.Module]] = []

    @property
    def path(self) -> str:
        """Attribute path of the module being encoded (``""`` for the root)."""
        return self._stack[-1][0] if self._stack else ""

    def unsupported(self, why: str) -> MapTypeError:
        """A :class:`~iternn.MapTypeError` (a ``TypeError``) naming the current module,
        for ``raise enc.unsupported(...)``."""
        path, module = self._stack[-1] if self._stack else ("", None)
        kind = type(module).__name__ if module is not None else "?"
        return MapTypeError(f"cannot save {show(path)}: {kind} {why}")

    def child(self, module: nn.Module, name: str) -> int:
        """Encode ``module`` (found at attribute ``name`` of the current one); its reference."""
        return self.encode(module, join(self.path, name))

    def encode(self, module: nn.Module, path: str) -> int:
        """Encode ``module`` found at ``path`` (``""``: the root); its index."""
        if not isinstance(module, nn.Module):
            raise MapTypeError(f"cannot save {show(path)}: {type(module).__name__} is not an nn.Module")
        key = id(module)
        if key in self._index:
            if key in self._in_progress:
                raise MapError(f"cannot save {show(path)}: the module contains itself")
            return self._index[key]
        codec = codec_for_type(type(module))
        if codec is None:
            cls = type(module)
            base = next((c for c in cls.__mro__[1:] if codec_for_type(c) is not None), None)
            hint = (
                f"; it subclasses {base.__qualname__}, whose codec does not cover subclasses "
                "(their forward may differ)"
                if base is not None
                else ""
            )
            raise MapTypeError(
                f"cannot save {show(path)}: {cls.__name__} ({_qualname(cls)}) has no "
                f"registered codec{hint}; register one with iternn.io.register_codec"
            )
        index = len(self.modules)
        self._index[key] = index
        self._keep.append(module)
        self.modules.append(None)
        self._in_progress.add(key)
        self._stack.append((path, module))
        try:
            config = codec.encode(module, self)
        finally:
            self._stack.pop()
            self._in_progress.discard(key)
        if not isinstance(config, dict):
            raise MapTypeError(
                f"codec {codec.name!r} returned {type(config).__name__} for {show(path)}, "
                "not a dict"
            )
        try:
            json.dumps(config, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise MapTypeError(
                f"codec {codec.name!r} returned a config for {show(path)} that is not "
                f"strict JSON: {exc}"
            ) from exc
        self.modules[index] = {"codec": codec.name, "path": path, "config": config}
        return index


# ---------------------------------------------------------------------------- decoding
#: ``source(key) -> tensor`` for stored tensors; ``info(key) -> (dtype, shape)`` or None.
TensorLookup = Callable[[str], "tuple[torch.dtype, tuple[int, ...]] | None"]


class Decoder:
    """Passed to every ``decode``: rebuilds children from their references and hands
    out the module's stored tensors (:meth:`tensor`)."""

    def __init__(self, modules: list, *, info: TensorLookup | None = None,
                 read: Callable[[str], Tensor] | None = None) -> None:
        self._entries = modules
        self._info = info
        self._read = read
        self._built: dict[int, nn.Module] = {}
        self._in_progress: set[int] = set()
        self._stack: list[str] = []

    @property
    def path(self) -> str:
        """Attribute path (as recorded) of the module being decoded."""
        return self._stack[-1] if self._stack else ""

    def _stored(self, name: str) -> tuple[str, torch.dtype, tuple[int, ...]]:
        key = join(self.path, name)
        found = self._info(key) if self._info is not None else None
        if found is None:
            raise FormatError(f"tensor {key!r}, which the structure needs, is not stored")
        return key, found[0], tuple(found[1])

    def tensor_shape(self, name: str, shape: tuple[int, ...]) -> None:
        """Check, reading nothing, that the module being decoded has a stored tensor
        ``name`` of shape ``shape``; :class:`FormatError` naming the key otherwise.

        For codecs whose constructor allocates (draws initial values) on the CPU
        whatever the default device: checking the declared sizes first means a file
        cannot make them allocate more than it stores.
        """
        key, _, got = self._stored(name)
        if got != tuple(shape):
            raise FormatError(f"tensor {key!r} has shape {list(got)}, the structure needs {list(shape)}")

    def tensor(self, name: str, *, dtypes: tuple[torch.dtype, ...] | None = None,
               shape: tuple[int, ...] | None = None) -> Tensor:
        """The stored tensor ``name`` of the module being decoded (key ``path.name``).

        For codecs whose structure depends on stored values (a sparsity pattern). Its
        dtype must be one of ``dtypes`` and its shape ``shape`` (when given), which is
        checked before anything is read; otherwise, or when the file lacks it, a
        :class:`FormatError` names the key.
        """
        key, dtype, _ = self._stored(name)
        if dtypes is not None and dtype not in dtypes:
            want = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
            raise FormatError(
                f"tensor {key!r} has dtype {str(dtype).removeprefix('torch.')}, expected {want}"
            )
        if shape is not None:
            self.tensor_shape(name, shape)
        return self._read(key)

    def child(self, ref: Any) -> nn.Module:
        """The module that reference ``ref`` names (built once, then shared)."""
        if isinstance(ref, bool) or not isinstance(ref, int) or not 0 <= ref < len(self._entries):
            raise FormatError(
                f"bad module reference {ref!r} in {show(self.path)}: expected an index "
                f"below {len(self._entries)}"
            )
        if ref in self._built:
            return self._built[ref]
        if ref in self._in_progress:
            raise FormatError(f"module {ref} contains itself")
        if len(self._stack) >= MAX_MODULE_DEPTH:
            raise FormatError(f"modules are nested deeper than {MAX_MODULE_DEPTH} levels at module {ref}")
        entry = self._entries[ref]
        if not isinstance(entry, dict) or not isinstance(entry.get("codec"), str) \
                or not isinstance(entry.get("config"), dict):
            raise FormatError(f"module {ref} must be an object with 'codec' (str) and 'config' (object)")
        name, path = entry["codec"], entry.get("path", f"#{ref}")
        path = path if isinstance(path, str) else f"#{ref}"
        codec = codec_named(name)
        if codec is None:
            raise FormatError(
                f"unknown codec {name!r} for module {show(path)}; registered codecs are "
                f"{sorted(registered_codecs())} (register it with iternn.io.register_codec "
                "before loading)"
            )
        self._in_progress.add(ref)
        self._stack.append(path)
        try:
            module = codec.decode(entry["config"], self)
        except FormatError as exc:
            if getattr(exc, "module_path", None) is not None:  # a child's: names its module
                raise
            raise _named(f"bad config for {show(path)} (codec {name!r}): {exc}", path) from exc
        except Exception as exc:  # a bad config: name the module it belongs to
            raise _named(
                f"bad config for {show(path)} (codec {name!r}): {type(exc).__name__}: {exc}", path
            ) from exc
        finally:
            self._stack.pop()
            self._in_progress.discard(ref)
        if type(module) is not codec.cls:
            raise _named(
                f"codec {name!r} built {type(module).__name__} for {show(path)}, "
                f"expected {codec.cls.__name__}",
                path,
            )
        self._built[ref] = module
        return module


def _named(message: str, path: str) -> FormatError:
    err = FormatError(message)
    err.module_path = path  # type: ignore[attr-defined]
    return err
