"""Saving and loading models: tensors in safetensors, structure in JSON, no pickle.

``save(module, path)`` writes ONE ``.safetensors`` file:

* the tensors are the module's ``state_dict()`` (parameters and persistent buffers),
  each stored once: keys that name the same tensor (tied weights, a module used in two
  places) are written under their first key and recorded as aliases;
* the file's safetensors metadata holds, under the key ``"iternn"``, a JSON document
  that describes how to rebuild the module (see *File format* below).

``load(path)`` reads the JSON, rebuilds the module with fresh parameters, checks that
the rebuilt module's ``state_dict`` has exactly the file's tensors (keys, shapes,
dtypes), restores the tying and fills the tensors with ``load_state_dict(strict=True)``.
Nothing is unpickled: the file is JSON and raw tensor bytes, read by ``safetensors``.

The structure is described by *codecs*, one per module class, kept in a public
registry (:func:`register_codec`). A codec has a ``name`` (written in the file), an
``encode(module, enc) -> dict`` that returns a JSON-able config, and a
``decode(config, dec) -> module`` that builds a module with freshly created parameters
of the right shapes and dtypes (their values are overwritten on load). Children are
encoded with ``enc.child(submodule, attribute_path)`` and decoded with
``dec.child(ref)``; a module reached twice is written once, so shared submodules stay
shared. Codecs are looked up by *exact* type: a subclass needs its own codec, since
its ``forward`` may differ. Example, for a module ``Scale(n, dtype)`` with one
parameter ``weight`` and a child ``act``::

    from iternn import io

    def encode(m, enc):
        return {"n": m.weight.shape[0], "dtype": io.dtype_name(m.weight.dtype),
                "act": enc.child(m.act, "act")}

    def decode(cfg, dec):
        return Scale(cfg["n"], dtype=io.dtype_from_name(cfg["dtype"]), act=dec.child(cfg["act"]))

    io.register_codec(Scale, "mypkg.Scale", encode, decode)

A codec that meets a module it cannot represent raises ``enc.unsupported("why")``
(a ``TypeError`` naming the module's path). ``save`` checks every codec's work before
writing: it decodes the structure and compares the rebuilt module with the original
(submodule paths and types, ``state_dict`` keys, order, shapes and dtypes), so a file
that ``save`` writes is one that ``load`` reads back. Non-tensor attributes the codec
leaves out (a dropout probability, an epsilon) cannot be checked this way: a codec must
record every constructor option and refuse (``enc.unsupported``) a module whose
attributes no constructor call would produce.

Codecs ship for the torch modules iternn's converters use (``Linear``, ``LayerNorm``,
the element-wise activations, ``Dropout``, ``Sequential``, ``ModuleList``, ``ModuleDict``,
``TransformerEncoderLayer``, ``TransformerEncoder``), for :class:`~iternn.BlockMap` and
:class:`~iternn.MapModule`, and for every converter result: ``RNNMap``, ``LiftedRNN``
(its blocks tied over the time steps stay tied), ``TransformerMap`` and
``EncoderLayerBlock``. A converter result is written as its constructor options plus
its map; its codec refuses a map edited by hand into one that no constructor call builds.

Besides the structure the file records the training mode of every submodule and which
parameters have ``requires_grad=False``. Hooks, devices and attributes set by hand are
not saved; ``load`` builds on the CPU (``device=`` moves the result).

File format (version 1), the JSON under metadata key ``"iternn"``::

    {"format": "iternn", "version": 1, "writer": "iternn 0.1.0",
     "root": 0,                                  # index into "modules"
     "modules": [{"codec": NAME, "path": "map.blocks.h<-x", "config": {...}}, ...],
     "aliases": {KEY: CANONICAL_KEY, ...},       # same tensor object: stored once
     "views": {KEY: CANONICAL_KEY, ...},         # distinct parameters, same memory
     "frozen": [KEY, ...],                       # parameters with requires_grad=False
     "training": true, "mode_flips": [PATH, ...]}  # submodules in the other mode

Children in a config are references: indices into ``"modules"``.
"""

from __future__ import annotations

import json
import os
import secrets
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .convert.lift import LiftedRNN
from .convert.rnn import RNNMap
from .convert.transformer import EncoderLayerBlock, TransformerMap
from .core.block_map import BlockMap, block_key
from .engine.map_module import MapModule
from .sparse.linear import (
    MaskedLinear,
    SparseLinear,
    decode_masked_linear,
    decode_sparse_linear,
    encode_masked_linear,
    encode_sparse_linear,
)
from .sparse.structured import BlockDiagonalLinear, DiagonalLinear, LowRankLinear
from .errors import FormatError

__all__ = [
    "save",
    "load",
    "register_codec",
    "unregister_codec",
    "registered_codecs",
    "Codec",
    "Encoder",
    "Decoder",
    "FormatError",
    "dtype_name",
    "dtype_from_name",
    "FORMAT_VERSION",
    "METADATA_KEY",
]

#: Version of the file format written by :func:`save`; :func:`load` reads this version.
FORMAT_VERSION = 1
#: The safetensors metadata key that holds the JSON structure.
METADATA_KEY = "iternn"
_FORMAT_NAME = "iternn"


# ---------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Codec:
    """How one module class is written to and rebuilt from JSON (see the module doc)."""

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
        decode: ``decode(config, dec) -> module`` with fresh parameters of the recorded
            shapes and dtypes; get children with ``dec.child(ref)``. On a bad config
            it may raise anything (``KeyError``, ``ValueError``...): ``load`` reports
            it as a :class:`FormatError` naming the module. It must return exactly
            ``cls``. It runs with the global RNG forked, so random init is harmless.
        replace: allow replacing an existing registration of ``cls`` or ``name``.

    Returns the :class:`Codec`. Raises ``ValueError`` when ``cls`` or ``name`` is
    already registered (unless ``replace``), ``TypeError`` on bad arguments.
    """
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"cls must be an nn.Module subclass, got {cls!r}")
    if not isinstance(name, str) or not name:
        raise TypeError(f"codec name must be a non-empty str, got {name!r}")
    if not callable(encode) or not callable(decode):
        raise TypeError("encode and decode must be callable")
    old_by_type, old_by_name = _BY_TYPE.get(cls), _BY_NAME.get(name)
    if not replace:
        if old_by_type is not None:
            raise ValueError(
                f"{cls.__qualname__} already has codec {old_by_type.name!r}; pass replace=True"
            )
        if old_by_name is not None:
            raise ValueError(
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
        raise KeyError(f"no codec registered for {cls_or_name!r}")
    del _BY_TYPE[codec.cls]
    del _BY_NAME[codec.name]
    return codec


def registered_codecs() -> Mapping[str, Codec]:
    """Read-only view ``name -> Codec`` of the registry."""
    return MappingProxyType(_BY_NAME)


# ---------------------------------------------------------------------------- helpers
def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32 -> "float32"`` (the form codecs write)."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"expected a torch.dtype, got {dtype!r}")
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`; ``ValueError`` for anything else."""
    value = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(value, torch.dtype) or dtype_name(value) != name:
        raise ValueError(f"{name!r} is not a torch dtype name")
    return value


def _show(path: str) -> str:
    return path if path else "<root>"


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _join(parent: str, name: str) -> str:
    return f"{parent}.{name}" if parent else name


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

    def unsupported(self, why: str) -> TypeError:
        """A ``TypeError`` naming the current module, for ``raise enc.unsupported(...)``."""
        path, module = self._stack[-1] if self._stack else ("", None)
        kind = type(module).__name__ if module is not None else "?"
        return TypeError(f"cannot save {_show(path)}: {kind} {why}")

    def child(self, module: nn.Module, name: str) -> int:
        """Encode ``module`` (found at attribute ``name`` of the current one); its reference."""
        return self._encode(module, _join(self.path, name))

    def _encode(self, module: nn.Module, path: str) -> int:
        if not isinstance(module, nn.Module):
            raise TypeError(f"cannot save {_show(path)}: {type(module).__name__} is not an nn.Module")
        key = id(module)
        if key in self._index:
            if key in self._in_progress:
                raise ValueError(f"cannot save {_show(path)}: the module contains itself")
            return self._index[key]
        codec = _BY_TYPE.get(type(module))
        if codec is None:
            cls = type(module)
            base = next((c for c in cls.__mro__[1:] if c in _BY_TYPE), None)
            hint = (
                f"; it subclasses {base.__qualname__}, whose codec does not cover subclasses "
                "(their forward may differ)"
                if base is not None
                else ""
            )
            raise TypeError(
                f"cannot save {_show(path)}: {cls.__name__} ({_qualname(cls)}) has no "
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
            raise TypeError(
                f"codec {codec.name!r} returned {type(config).__name__} for {_show(path)}, "
                "not a dict"
            )
        try:
            json.dumps(config, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"codec {codec.name!r} returned a config for {_show(path)} that is not "
                f"strict JSON: {exc}"
            ) from exc
        self.modules[index] = {"codec": codec.name, "path": path, "config": config}
        return index


# ---------------------------------------------------------------------------- decoding
class Decoder:
    """Passed to every ``decode``: rebuilds children from their references."""

    def __init__(self, modules: list) -> None:
        self._entries = modules
        self._built: dict[int, nn.Module] = {}
        self._in_progress: set[int] = set()
        self._stack: list[str] = []

    @property
    def path(self) -> str:
        """Attribute path (as recorded) of the module being decoded."""
        return self._stack[-1] if self._stack else ""

    def child(self, ref: Any) -> nn.Module:
        """The module that reference ``ref`` names (built once, then shared)."""
        if isinstance(ref, bool) or not isinstance(ref, int) or not 0 <= ref < len(self._entries):
            raise FormatError(
                f"bad module reference {ref!r} in {_show(self.path)}: expected an index "
                f"below {len(self._entries)}"
            )
        if ref in self._built:
            return self._built[ref]
        if ref in self._in_progress:
            raise FormatError(f"module {ref} contains itself")
        entry = self._entries[ref]
        if not isinstance(entry, dict) or not isinstance(entry.get("codec"), str) \
                or not isinstance(entry.get("config"), dict):
            raise FormatError(f"module {ref} must be an object with 'codec' (str) and 'config' (object)")
        name, path = entry["codec"], entry.get("path", f"#{ref}")
        path = path if isinstance(path, str) else f"#{ref}"
        codec = _BY_NAME.get(name)
        if codec is None:
            raise FormatError(
                f"unknown codec {name!r} for module {_show(path)}; registered codecs are "
                f"{sorted(_BY_NAME)} (register it with iternn.io.register_codec before loading)"
            )
        self._in_progress.add(ref)
        self._stack.append(path)
        try:
            module = codec.decode(entry["config"], self)
        except FormatError:  # from a child: it names its own module
            raise
        except Exception as exc:  # a bad config: name the module it belongs to
            raise FormatError(
                f"bad config for {_show(path)} (codec {name!r}): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        finally:
            self._stack.pop()
            self._in_progress.discard(ref)
        if type(module) is not codec.cls:
            raise FormatError(
                f"codec {name!r} built {type(module).__name__} for {_show(path)}, "
                f"expected {codec.cls.__name__}"
            )
        self._built[ref] = module
        return module


# ---------------------------------------------------------------------------- tensors
def _layout(state: Mapping[str, Any]):
    """Split a ``state_dict(keep_vars=True)`` into tensors to store once and aliases."""
    stored: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    views: dict[str, str] = {}
    by_id: dict[int, str] = {}
    by_view: dict[tuple, str] = {}
    regions: dict[tuple, list[tuple[int, int, str]]] = {}
    for key, t in state.items():
        if not isinstance(t, Tensor):
            raise TypeError(
                f"cannot save {key!r}: its state_dict value is {type(t).__name__}, not a "
                "tensor (extra state is not supported)"
            )
        if id(t) in by_id:
            aliases[key] = by_id[id(t)]
            continue
        by_id[id(t)] = key
        data = t.detach()
        if t.numel() == 0:
            stored[key] = data.to("cpu", copy=True)
            continue
        storage = (t.device, t.untyped_storage().data_ptr())
        view = (*storage, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if view in by_view:
            views[key] = by_view[view]
            continue
        by_view[view] = key
        start = t.storage_offset() * t.element_size()
        end = start + (1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))) * t.element_size()
        others = regions.setdefault(storage, [])
        for s2, e2, k2 in others:
            if start < e2 and s2 < end:
                raise ValueError(
                    f"cannot save: tensors {k2!r} and {key!r} share memory without being "
                    "the same tensor (partial views cannot be stored)"
                )
        if others or not data.is_contiguous() or data.device.type != "cpu":
            data = data.to("cpu", memory_format=torch.contiguous_format, copy=True)
        others.append((start, end, key))
        stored[key] = data
    return stored, aliases, views


def _owner(root: nn.Module, key: str) -> tuple[nn.Module, str]:
    path, _, name = key.rpartition(".")
    return (root.get_submodule(path) if path else root), name


def _describe(t: Tensor) -> str:
    return f"{dtype_name(t.dtype)}{list(t.shape)}"


def _compare_state(expected: Mapping[str, Tensor], found: Mapping[str, Tensor]) -> list[str]:
    """Human-readable differences in keys, shapes and dtypes (empty when they match)."""
    problems = []
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    if missing:
        problems.append(f"missing tensor(s) {missing}")
    if extra:
        problems.append(f"unexpected tensor(s) {extra}")
    for k, t in found.items():
        e = expected.get(k)
        if e is None:
            continue
        if tuple(e.shape) != tuple(t.shape):
            problems.append(f"tensor {k!r} has shape {list(t.shape)}, the structure needs {list(e.shape)}")
        if e.dtype != t.dtype:
            problems.append(
                f"tensor {k!r} has dtype {dtype_name(t.dtype)}, the structure needs {dtype_name(e.dtype)}"
            )
    return problems


# ---------------------------------------------------------------------------- documents
def _document(module: nn.Module) -> tuple[dict, dict[str, Tensor]]:
    enc = Encoder()
    root = enc._encode(module, "")
    state = module.state_dict(keep_vars=True)
    stored, aliases, views = _layout(state)
    frozen = [k for k, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad]
    flips = [
        p for p, m in module.named_modules(remove_duplicate=False)
        if p and m.training != module.training
    ]
    from . import __version__

    doc = {
        "format": _FORMAT_NAME,
        "version": FORMAT_VERSION,
        "writer": f"iternn {__version__}",
        "root": root,
        "modules": enc.modules,
        "aliases": aliases,
        "views": views,
        "frozen": frozen,
        "training": module.training,
        "mode_flips": flips,
    }
    return doc, stored


def _check_document(doc: Any) -> None:
    if not isinstance(doc, dict):
        raise FormatError(f"the {METADATA_KEY!r} metadata must be a JSON object")
    if doc.get("format") != _FORMAT_NAME:
        raise FormatError(f"metadata 'format' is {doc.get('format')!r}, expected {_FORMAT_NAME!r}")
    version = doc.get("version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise FormatError(f"format version must be an int, got {version!r}")
    if version != FORMAT_VERSION:
        newer = " (written by a newer iternn)" if version > FORMAT_VERSION else ""
        raise FormatError(
            f"format version {version} is not supported{newer}; this iternn reads "
            f"version {FORMAT_VERSION}"
        )
    expected = {
        "root": int, "modules": list, "aliases": dict, "views": dict, "frozen": list,
        "training": bool, "mode_flips": list,
    }
    for field, kind in expected.items():
        value = doc.get(field)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise FormatError(f"field {field!r} must be a {kind.__name__}, got {value!r}")
    for field in ("aliases", "views"):
        for k, v in doc[field].items():
            if not isinstance(v, str):
                raise FormatError(f"{field}[{k!r}] must be a str, got {v!r}")
    for field in ("frozen", "mode_flips"):
        if not all(isinstance(v, str) for v in doc[field]):
            raise FormatError(f"field {field!r} must be a list of str")


def _rebuild(doc: dict) -> nn.Module:
    """The module the document describes, with fresh (uninitialised-value) parameters."""
    # Fresh parameters draw from the global RNG; loading must not change it.
    with torch.random.fork_rng(devices=[]):
        return Decoder(doc["modules"]).child(doc["root"])


def _apply_flags(model: nn.Module, doc: dict) -> None:
    """Restore training modes and ``requires_grad`` flags recorded in ``doc``."""
    modules = dict(model.named_modules(remove_duplicate=False))
    flips = set(doc["mode_flips"])
    unknown = sorted(flips - set(modules) - {""})
    if unknown:
        raise FormatError(f"mode_flips names submodule(s) the structure lacks: {unknown}")
    for path, mod in model.named_modules(remove_duplicate=False):
        mod.training = doc["training"] != (path in flips)
    params = dict(model.named_parameters(remove_duplicate=False))
    unknown = [k for k in doc["frozen"] if k not in params]
    if unknown:
        raise FormatError(f"frozen names parameter(s) the structure lacks: {unknown}")
    for k in doc["frozen"]:
        params[k].requires_grad_(False)


def _tie(model: nn.Module, doc: dict) -> None:
    """Make alias keys name the canonical tensor again (same object, or same memory)."""
    for field in ("aliases", "views"):
        for alias, canon in doc[field].items():
            try:
                owner, name = _owner(model, alias)
                c_owner, c_name = _owner(model, canon)
            except AttributeError as exc:
                raise FormatError(f"{field} entry {alias!r} -> {canon!r}: {exc}") from exc
            target = c_owner._parameters.get(c_name)
            if target is None:
                target = c_owner._buffers.get(c_name)
            if target is None:
                raise FormatError(f"{field} entry {alias!r} -> {canon!r}: no tensor {canon!r}")
            if field == "views":
                target = (
                    nn.Parameter(target.detach(), requires_grad=target.requires_grad)
                    if isinstance(target, nn.Parameter)
                    else target.detach()
                )
            if name in owner._parameters:
                if not isinstance(target, nn.Parameter):
                    raise FormatError(f"alias {alias!r} is a parameter but {canon!r} is a buffer")
                owner._parameters[name] = target
            elif name in owner._buffers:
                owner._buffers[name] = target.detach() if isinstance(target, nn.Parameter) else target
            else:
                raise FormatError(f"{field} entry {alias!r} -> {canon!r}: no tensor {alias!r}")


# ---------------------------------------------------------------------------- save / load
def save(module: nn.Module, path: str | os.PathLike, *, check: bool = True) -> None:
    """Write ``module`` (structure and tensors) to one safetensors file at ``path``.

    The file is written to a temporary file in the same folder and moved into place
    (``os.replace``), so ``path`` holds either the old file or the complete new one.

    Args:
        module: any module whose every submodule has a registered codec.
        path: destination file (conventionally ``*.safetensors``); replaced if present.
        check: rebuild the structure before writing and compare it with ``module``
            (submodule types, ``state_dict`` keys, order, shapes, dtypes). It costs one
            construction of the model; leave it on unless the model is huge.

    Raises:
        TypeError: a submodule has no codec, or its codec cannot represent it; the
            message names its path, e.g. ``"map.blocks.h<-x: Conv1d"``.
        ValueError: tensors partially share memory, or (``check``) the structure
            would rebuild a different model.
        OSError: the folder does not exist or cannot be written.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"save needs an nn.Module, got {type(module).__name__}")
    doc, stored = _document(module)
    text = json.dumps(doc, allow_nan=False, separators=(",", ":"))
    if check:
        _check_rebuild(module, json.loads(text))  # exactly what load will read
    metadata = {"format": "pt", METADATA_KEY: text}
    _write_atomic(os.fspath(path), stored, metadata)


def _check_rebuild(module: nn.Module, doc: dict) -> None:
    try:
        rebuilt = _rebuild(doc)
        _tie(rebuilt, doc)
        _apply_flags(rebuilt, doc)
    except FormatError as exc:
        raise ValueError(f"cannot save: the structure written would not load: {exc}") from exc
    want = [(p, type(m)) for p, m in module.named_modules(remove_duplicate=False)]
    got = [(p, type(m)) for p, m in rebuilt.named_modules(remove_duplicate=False)]
    if want != got:
        have, built = dict(want), dict(got)
        for p in list(have) + list(built):
            a, b = have.get(p), built.get(p)
            if a is not b:
                a_name = a.__name__ if a else "nothing"
                b_name = b.__name__ if b else "nothing"
                raise TypeError(
                    f"cannot save {_show(p)}: {a_name} is not what its codec rebuilds "
                    f"({b_name}); the codec of the enclosing module does not cover it"
                )
        raise TypeError("cannot save: the rebuilt model orders its submodules differently")
    expected = rebuilt.state_dict()
    found = module.state_dict()
    problems = _compare_state(expected, found)
    if problems:
        raise ValueError("cannot save: the structure would rebuild different tensors: " + "; ".join(problems))
    if list(expected) != list(found):
        raise ValueError(
            "cannot save: the rebuilt model orders its tensors differently "
            f"({list(found)} vs {list(expected)}); optimizer states would not line up"
        )


def _write_atomic(path: str, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    folder = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    while True:  # reserve a fresh name; the kernel applies umask (and default ACLs)
        tmp = os.path.join(folder, f".{base}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        mode = os.fstat(fd).st_mode & 0o777
        os.close(fd)
        save_file(tensors, tmp, metadata=metadata)  # it writes with mode 0600
        os.chmod(tmp, mode)  # the mode an ordinary new file would have had
        with open(tmp, "r+b") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable, where the platform allows
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def load(path: str | os.PathLike, *, device: str | torch.device | None = None) -> nn.Module:
    """Rebuild the module :func:`save` wrote to ``path``. Unpickles nothing.

    The result has the saved classes, tensors (bit for bit, dtypes included), weight
    tying, training modes and ``requires_grad`` flags. It is built on the CPU and moved
    to ``device`` when given. The global RNG state is left unchanged.

    Raises:
        FormatError: (a ``ValueError``) not a safetensors file, no or invalid iternn
            metadata, an unsupported format version, an unknown codec name, or tensors
            that do not match the structure (the message names the keys).
        OSError: the file cannot be opened.
    """
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    try:
        handle = safe_open(path, framework="pt")
    except SafetensorError as exc:
        raise FormatError(f"{path} is not a safetensors file: {exc}") from exc
    with handle as f:
        meta = f.metadata() or {}
        text = meta.get(METADATA_KEY)
        if text is None:
            raise FormatError(f"{path} is not an iternn file: no {METADATA_KEY!r} metadata")
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FormatError(f"{path}: the {METADATA_KEY!r} metadata is not valid JSON: {exc}") from exc
        _check_document(doc)
        model = _rebuild(doc)
        try:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        except SafetensorError as exc:
            raise FormatError(f"{path}: cannot read tensors: {exc}") from exc

    for field in ("aliases", "views"):
        for alias, canon in doc[field].items():
            if alias in tensors:
                raise FormatError(f"{path}: tensor {alias!r} is stored but also recorded as an alias")
            if canon not in tensors:
                raise FormatError(f"{path}: alias {alias!r} names tensor {canon!r}, which is missing")
    full = dict(tensors)
    for field in ("aliases", "views"):
        for alias, canon in doc[field].items():
            full[alias] = tensors[canon]
    problems = _compare_state(model.state_dict(), full)
    if problems:
        raise FormatError(f"{path}: the tensors do not match the structure: " + "; ".join(problems))
    _tie(model, doc)
    try:
        model.load_state_dict(full, strict=True)
    except RuntimeError as exc:
        raise FormatError(f"{path}: {exc}") from exc
    _apply_flags(model, doc)
    if device is not None:
        model.to(device)
    return model


# ---------------------------------------------------------------------------- codecs
def _simple(cls: type, name: str, fields: tuple[str, ...]) -> None:
    """A codec for a module whose constructor takes exactly these attributes."""

    def encode(m, enc):
        return {f: getattr(m, f) for f in fields}

    def decode(cfg, dec):
        extra = set(cfg) - set(fields)
        if extra:
            raise ValueError(f"unexpected config field(s) {sorted(extra)}")
        return cls(**{f: cfg[f] for f in fields})

    register_codec(cls, name, encode, decode)


_simple(nn.Identity, "torch.nn.Identity", ())
_simple(nn.ReLU, "torch.nn.ReLU", ("inplace",))
_simple(nn.LeakyReLU, "torch.nn.LeakyReLU", ("negative_slope", "inplace"))
_simple(nn.Tanh, "torch.nn.Tanh", ())
_simple(nn.Sigmoid, "torch.nn.Sigmoid", ())
_simple(nn.GELU, "torch.nn.GELU", ("approximate",))
_simple(nn.ELU, "torch.nn.ELU", ("alpha", "inplace"))
_simple(nn.SiLU, "torch.nn.SiLU", ("inplace",))
_simple(nn.Dropout, "torch.nn.Dropout", ("p", "inplace"))


def _uniform_dtype(m: nn.Module, enc: Encoder) -> str | None:
    dtypes = {t.dtype for t in m.parameters()} | {t.dtype for t in m.buffers()}
    if len(dtypes) > 1:
        raise enc.unsupported(f"mixes dtypes {sorted(dtype_name(d) for d in dtypes)}")
    return dtype_name(dtypes.pop()) if dtypes else None


def _encode_linear(m: nn.Linear, enc: Encoder) -> dict:
    return {
        "in_features": m.in_features,
        "out_features": m.out_features,
        "bias": m.bias is not None,
        "dtype": _uniform_dtype(m, enc),
    }


def _decode_linear(cfg: dict, dec: Decoder) -> nn.Linear:
    return nn.Linear(cfg["in_features"], cfg["out_features"], bias=cfg["bias"],
                     dtype=dtype_from_name(cfg["dtype"]))


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
    dtype = cfg["dtype"]
    return nn.LayerNorm(
        tuple(cfg["normalized_shape"]), eps=cfg["eps"], elementwise_affine=cfg["elementwise_affine"],
        bias=cfg["bias"], dtype=dtype_from_name(dtype) if dtype is not None else None,
    )


register_codec(nn.LayerNorm, "torch.nn.LayerNorm", _encode_layer_norm, _decode_layer_norm)


def _encode_sequential(m: nn.Sequential, enc: Encoder) -> dict:
    return {"children": [[name, enc.child(sub, name)] for name, sub in m._modules.items()]}


def _decode_sequential(cfg: dict, dec: Decoder) -> nn.Sequential:
    return nn.Sequential(OrderedDict((name, dec.child(ref)) for name, ref in cfg["children"]))


register_codec(nn.Sequential, "torch.nn.Sequential", _encode_sequential, _decode_sequential)


def _encode_module_list(m: nn.ModuleList, enc: Encoder) -> dict:
    return {"children": [enc.child(sub, str(i)) for i, sub in enumerate(m)]}


def _decode_module_list(cfg: dict, dec: Decoder) -> nn.ModuleList:
    return nn.ModuleList(dec.child(ref) for ref in cfg["children"])


register_codec(nn.ModuleList, "torch.nn.ModuleList", _encode_module_list, _decode_module_list)


def _encode_module_dict(m: nn.ModuleDict, enc: Encoder) -> dict:
    return {"children": [[k, enc.child(sub, k)] for k, sub in m.items()]}


def _decode_module_dict(cfg: dict, dec: Decoder) -> nn.ModuleDict:
    return nn.ModuleDict(OrderedDict((k, dec.child(ref)) for k, ref in cfg["children"]))


register_codec(nn.ModuleDict, "torch.nn.ModuleDict", _encode_module_dict, _decode_module_dict)

_ACTIVATION_FNS = {"relu": F.relu, "gelu": F.gelu}


_ENCODER_LAYER_PARTS = {
    "self_attn": nn.MultiheadAttention, "linear1": nn.Linear, "linear2": nn.Linear,
    "dropout": nn.Dropout, "dropout1": nn.Dropout, "dropout2": nn.Dropout,
    "norm1": nn.LayerNorm, "norm2": nn.LayerNorm,
}


def _encode_encoder_layer(m: nn.TransformerEncoderLayer, enc: Encoder) -> dict:
    for attr, cls in _ENCODER_LAYER_PARTS.items():
        part = getattr(m, attr, None)
        if type(part) is not cls:
            raise TypeError(
                f"cannot save {_join(enc.path, attr)}: {type(part).__name__} is not what "
                f"the TransformerEncoderLayer codec rebuilds ({cls.__name__})"
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
    act = cfg["activation"]
    if isinstance(act, dict):
        activation = dec.child(act["module"])
    elif act in _ACTIVATION_FNS:
        activation = _ACTIVATION_FNS[act]
    else:
        raise ValueError(f"unknown activation {act!r}")
    return nn.TransformerEncoderLayer(
        cfg["d_model"], cfg["nhead"], dim_feedforward=cfg["dim_feedforward"],
        dropout=cfg["dropout"], activation=activation, layer_norm_eps=cfg["layer_norm_eps"],
        batch_first=cfg["batch_first"], norm_first=cfg["norm_first"], bias=cfg["bias"],
        dtype=dtype_from_name(cfg["dtype"]),
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
    layers = [dec.child(ref) for ref in cfg["layers"]]
    norm = dec.child(cfg["norm"]) if cfg["norm"] is not None else None
    with warnings.catch_warnings():  # the constructor's nested-tensor warning was seen at creation
        warnings.simplefilter("ignore")
        m = nn.TransformerEncoder(
            layers[0] if layers else nn.Identity(), 0, norm=norm,
            enable_nested_tensor=cfg["enable_nested_tensor"], mask_check=cfg["mask_check"],
        )
    m.layers = nn.ModuleList(layers)  # built once each, not deep copies of the first
    m.num_layers = len(layers)
    m.use_nested_tensor = bool(cfg["use_nested_tensor"])
    return m


register_codec(nn.TransformerEncoder, "torch.nn.TransformerEncoder", _encode_encoder, _decode_encoder)


def _encode_block_map(m: BlockMap, enc: Encoder) -> dict:
    return {
        "slots": [[name, size] for name, size in m.slots.items()],
        "blocks": [
            [dst, src, enc.child(m.block(dst, src), f"blocks.{block_key(dst, src)}")]
            for dst, src in m.edges
        ],
        "biases": [[slot, dtype_name(p.dtype)] for slot, p in m.biases.items()],
        "activations": [[slot, enc.child(a, f"activations.{slot}")] for slot, a in m.activations.items()],
    }


def _decode_block_map(cfg: dict, dec: Decoder) -> BlockMap:
    m = BlockMap(OrderedDict((name, size) for name, size in cfg["slots"]))
    for dst, src, ref in cfg["blocks"]:
        m.connect(dst, src, dec.child(ref))
    for slot, dtype in cfg["biases"]:
        m.set_bias(slot, torch.zeros(m.slots[slot], dtype=dtype_from_name(dtype)))
    for slot, ref in cfg["activations"]:
        m.set_activation(slot, dec.child(ref))
    return m


register_codec(BlockMap, "iternn.BlockMap", _encode_block_map, _decode_block_map)


def _encode_map_module(m: MapModule, enc: Encoder) -> dict:
    return {"map": enc.child(m.map, "map"), "input": m.input, "output": m.output, "steps": m.steps}


def _decode_map_module(cfg: dict, dec: Decoder) -> MapModule:
    return MapModule(dec.child(cfg["map"]), input=cfg["input"], output=cfg["output"], steps=cfg["steps"])


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
            return f"{_join(path, k)} is missing (the constructor sets {v!r})"
        if not _same_value(have, v):
            return f"{_join(path, k)} is {have!r}, the constructor gives {v!r}"
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
            f"{_show(path)} has submodules {have} where the constructor builds {need} "
            f"(extra {extra}, missing {missing})"
        )
    for (p, a), (_, b) in zip(gm, wm):
        if type(a) is not type(b):
            return (
                f"{_show(_join(path, p))} is a {type(a).__name__}, the constructor builds "
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
                f"{_show(path)} has {kind}s {[k for k, _ in g_items]}, the constructor "
                f"builds {[k for k, _ in w_items]}"
            )
        for k, g_first, w_first in zip(
            [k for k, _ in g_items], _partition(g_items), _partition(w_items)
        ):
            if g_first != w_first:
                where = _show(_join(path, k))
                if g_first != k:
                    return (
                        f"{kind} {where} is the same object as {_join(path, g_first)}; "
                        "the constructor makes them separate"
                    )
                return (
                    f"{kind} {where} is not the same object as {_join(path, w_first)}; "
                    "the constructor ties them"
                )
        if kind != "module":
            for (k, a), (_, b) in zip(g_items, w_items):
                if tuple(a.shape) != tuple(b.shape):
                    return (
                        f"{kind} {_join(path, k)} has shape {list(a.shape)}, the "
                        f"constructor builds {list(b.shape)}"
                    )
    for (p, a), (_, b) in zip(gm, wm):
        where = _join(path, p)
        why = _attrs_mismatch(a, b, where)
        if why:
            return why
        if isinstance(b, BlockMap):
            if list(a.slots.items()) != list(b.slots.items()):
                return f"{_show(where)} has slots {dict(a.slots)}, the constructor builds {dict(b.slots)}"
            if a.edges != b.edges:
                return f"{_show(where)} has blocks {list(a.edges)}, the constructor builds {list(b.edges)}"
    return None


def _check_fields(cfg: dict, fields: tuple[str, ...]) -> None:
    missing = [f for f in fields if f not in cfg]
    extra = sorted(set(cfg) - set(fields))
    if missing or extra:
        raise ValueError(f"config fields: missing {missing}, unexpected {extra}")


_RNN_OPTIONS = (
    "input_size", "hidden_size", "num_layers", "nonlinearity", "bias", "batch_first", "dropout",
)


def _register_rnn_codec(cls: type, name: str, options: tuple[str, ...]) -> None:
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
        _check_fields(cfg, (*options, "map"))
        net = cls(**{k: cfg[k] for k in options}, device="meta")
        m = dec.child(cfg["map"])
        why = _tree_mismatch(m, net.map, "map")
        if why:
            raise ValueError(f"the map does not fit the options: {why}")
        net.map = m  # the only submodule; replaces the meta skeleton's map
        return net

    register_codec(cls, name, encode, decode)


_register_rnn_codec(RNNMap, "iternn.RNNMap", _RNN_OPTIONS)
_register_rnn_codec(LiftedRNN, "iternn.LiftedRNN", (*_RNN_OPTIONS, "T"))


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
    _check_fields(cfg, ("layer",))
    return EncoderLayerBlock(dec.child(cfg["layer"]))


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
    _check_fields(cfg, ("map", "layer_keys", "output", *_TRANSFORMER_MAP_OPTIONS))
    if not isinstance(cfg["layer_keys"], list) or not all(isinstance(k, str) for k in cfg["layer_keys"]):
        raise ValueError(f"layer_keys must be a list of str, got {cfg['layer_keys']!r}")
    return TransformerMap(
        dec.child(cfg["map"]), tuple(cfg["layer_keys"]), cfg["output"],
        **{k: cfg[k] for k in _TRANSFORMER_MAP_OPTIONS},
    )


register_codec(TransformerMap, "iternn.TransformerMap", _encode_transformer_map, _decode_transformer_map)


# ---------------------------------------------------------------------------- sparse blocks
def _structured(cls: type, name: str, make) -> None:
    """A codec for a structured block: its sizes, bias flag and dtype."""

    def encode(m, enc):
        return {"in_features": m.in_features, "out_features": m.out_features,
                "rank": getattr(m, "rank", None), "blocks": getattr(m, "blocks", None),
                "bias": m.bias is not None, "dtype": _uniform_dtype(m, enc)}

    def decode(cfg, dec):
        return make(cfg, dtype_from_name(cfg["dtype"]))

    register_codec(cls, name, encode, decode)


register_codec(SparseLinear, "iternn.SparseLinear", encode_sparse_linear, decode_sparse_linear)
register_codec(MaskedLinear, "iternn.MaskedLinear", encode_masked_linear, decode_masked_linear)
_structured(DiagonalLinear, "iternn.DiagonalLinear",
            lambda c, dt: DiagonalLinear(c["in_features"], bias=c["bias"], dtype=dt))
_structured(LowRankLinear, "iternn.LowRankLinear",
            lambda c, dt: LowRankLinear(c["in_features"], c["out_features"], rank=c["rank"],
                                        bias=c["bias"], dtype=dt))
_structured(BlockDiagonalLinear, "iternn.BlockDiagonalLinear",
            lambda c, dt: BlockDiagonalLinear(c["in_features"], c["out_features"],
                                              blocks=c["blocks"], bias=c["bias"], dtype=dt))
