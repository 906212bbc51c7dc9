""":func:`save` and :func:`load`: a module to one safetensors file and back.

Loading trusts nothing the file says. In order, before any tensor is read:

1. the safetensors header is parsed and checked against the file's length
   (:func:`~iternn.io.format.read_header`);
2. the iternn document is parsed (strict JSON, bounded nesting) and its fields checked;
3. the module tree is decoded with torch's default device set to ``meta``: modules get
   their declared shapes and dtypes and no memory (codecs whose structure depends on
   stored values, the sparse blocks, read just those tensors, checked first);
4. every tensor of that tree (keys, shapes, dtypes) is compared with the header, and the
   total size with the memory available.

Only then are the tensors read, each once into memory of its exact size, and put in
place with ``load_state_dict(assign=True)``: no random initialisation, no second copy.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..core.device import available_device
from ..core.memory import check_bytes
from ..errors import FormatError, MapError, MapTypeError
from .format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    METADATA_KEY,
    check_document,
    parse_json,
    read_header,
    write_atomic,
)
from .registry import dtype_name
from .structure import Decoder, Encoder, show

__all__ = ["save", "load"]

Described = Mapping[str, "tuple[torch.dtype, tuple[int, ...]]"]


# ---------------------------------------------------------------------------- tensors
def _layout(state: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, str], dict[str, str]]:
    """Split a ``state_dict(keep_vars=True)`` into tensors to store once and aliases."""
    stored: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    views: dict[str, str] = {}
    by_id: dict[int, str] = {}
    by_view: dict[tuple, str] = {}
    regions: dict[tuple, list[tuple[int, int, str]]] = {}
    for key, t in state.items():
        if not isinstance(t, Tensor):
            raise MapTypeError(
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
                raise MapError(
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


def _described(state: Mapping[str, Tensor]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    return {k: (t.dtype, tuple(t.shape)) for k, t in state.items()}


def _compare_state(expected: Described, found: Described) -> list[str]:
    """Human-readable differences in keys, shapes and dtypes (empty when they match)."""
    problems = []
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    if missing:
        problems.append(f"missing tensor(s) {missing}")
    if extra:
        problems.append(f"unexpected tensor(s) {extra}")
    for k, (dtype, shape) in found.items():
        if k not in expected:
            continue
        e_dtype, e_shape = expected[k]
        if tuple(e_shape) != tuple(shape):
            problems.append(f"tensor {k!r} has shape {list(shape)}, the structure needs {list(e_shape)}")
        if e_dtype != dtype:
            problems.append(
                f"tensor {k!r} has dtype {dtype_name(dtype)}, the structure needs {dtype_name(e_dtype)}"
            )
    return problems


def _links(doc: dict) -> dict[str, str]:
    """Every alias key -> the key its tensor is stored under."""
    return {**doc["aliases"], **doc["views"]}


# ---------------------------------------------------------------------------- documents
def _document(module: nn.Module) -> tuple[dict, dict[str, Tensor]]:
    enc = Encoder()
    root = enc.encode(module, "")
    stored, aliases, views = _layout(module.state_dict(keep_vars=True))
    frozen = [k for k, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad]
    flips = [
        p for p, m in module.named_modules(remove_duplicate=False)
        if p and m.training != module.training
    ]
    from .. import __version__

    doc = {
        "format": FORMAT_NAME,
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


def _decode(doc: dict, info: Callable, read: Callable[[str], Tensor]) -> nn.Module:
    """The module tree the document describes, on the meta device (no memory, no RNG)."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        return Decoder(doc["modules"], info=info, read=read).child(doc["root"])


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


def _check_aliases(doc: dict, stored: Mapping[str, Any]) -> None:
    for field in ("aliases", "views"):
        for alias, canon in doc[field].items():
            if alias in stored:
                raise FormatError(f"tensor {alias!r} is stored but also recorded as an alias")
            if canon not in stored:
                raise FormatError(f"{field} entry {alias!r} names tensor {canon!r}, which is not stored")


# ---------------------------------------------------------------------------- save
def save(module: nn.Module, path: str | os.PathLike, *, check: bool = True) -> None:
    """Write ``module`` (structure and tensors) to one safetensors file at ``path``.

    The file is written to a temporary file in the same folder and moved into place
    (``os.replace``), so ``path`` holds either the old file or the complete new one.

    Args:
        module: any module whose every submodule has a registered codec.
        path: destination file (conventionally ``*.safetensors``); replaced if present.
        check: decode the structure before writing, as :func:`load` will (on the meta
            device: it allocates nothing), and compare it with ``module`` (submodule
            types, ``state_dict`` keys, order, shapes, dtypes).

    Raises:
        MapTypeError: (a ``TypeError``) a submodule has no codec, or its codec cannot
            represent it; the message names its path, e.g. ``"map.blocks.h<-x: Conv1d"``.
        MapError: (a ``ValueError``) tensors partially share memory, or (``check``) the
            structure would rebuild a different model.
        OSError: the folder does not exist or cannot be written.
    """
    if not isinstance(module, nn.Module):
        raise MapTypeError(f"save needs an nn.Module, got {type(module).__name__}")
    doc, stored = _document(module)
    text = json.dumps(doc, allow_nan=False, separators=(",", ":"))
    if check:
        _check_rebuild(module, text, stored)
    write_atomic(os.fspath(path), stored, {"format": "pt", METADATA_KEY: text})


def _check_rebuild(module: nn.Module, text: str, stored: dict[str, Tensor]) -> None:
    """Refuse to write a file that :func:`load` would not read back as ``module``."""
    try:
        doc = parse_json(text, f"the {METADATA_KEY!r} metadata")  # exactly what load reads
        links = _links(doc)
        shapes = _described(stored)
        resolve = lambda key: links.get(key, key)  # noqa: E731
        rebuilt = _decode(doc, lambda k: shapes.get(resolve(k)), lambda k: stored[resolve(k)])
        _tie(rebuilt, doc)
        _apply_flags(rebuilt, doc)
    except FormatError as exc:
        raise MapError(f"cannot save: the structure written would not load: {exc}") from exc
    want = [(p, type(m)) for p, m in module.named_modules(remove_duplicate=False)]
    got = [(p, type(m)) for p, m in rebuilt.named_modules(remove_duplicate=False)]
    if want != got:
        have, built = dict(want), dict(got)
        for p in list(have) + list(built):
            a, b = have.get(p), built.get(p)
            if a is not b:
                a_name = a.__name__ if a else "nothing"
                b_name = b.__name__ if b else "nothing"
                raise MapTypeError(
                    f"cannot save {show(p)}: {a_name} is not what its codec rebuilds "
                    f"({b_name}); the codec of the enclosing module does not cover it"
                )
        raise MapTypeError("cannot save: the rebuilt model orders its submodules differently")
    expected = rebuilt.state_dict(keep_vars=True)
    found = module.state_dict(keep_vars=True)
    problems = _compare_state(_described(expected), _described(found))
    if problems:
        raise MapError("cannot save: the structure would rebuild different tensors: " + "; ".join(problems))
    if list(expected) != list(found):
        raise MapError(
            "cannot save: the rebuilt model orders its tensors differently "
            f"({list(found)} vs {list(expected)}); optimizer states would not line up"
        )


# ---------------------------------------------------------------------------- load
def load(path: str | os.PathLike, *, device: str | torch.device | None = None) -> nn.Module:
    """Rebuild the module :func:`save` wrote to ``path``. Unpickles nothing.

    The result has the saved classes, tensors (bit for bit, dtypes included), weight
    tying, training modes and ``requires_grad`` flags. It is built on the CPU, each
    tensor read once into its own memory, and moved to ``device`` when given. The
    global RNG state is left unchanged. The whole file is checked before any tensor is
    read (see :mod:`iternn.io.saveload`): a file that declares sizes its tensors do not
    have allocates nothing.

    Raises:
        MissingFileError: (a ``FileNotFoundError``) nothing is at ``path``.
        MapError: ``device`` is not a device this process can use (checked first).
        FormatError: (a ``ValueError``) anything else that is wrong: a folder, an
            unreadable or truncated file, not a safetensors file, no or invalid iternn
            metadata (bad JSON, nested too deep, wrong field types), an unsupported
            format version, an unknown codec name, a bad config, a bad sparsity
            pattern, or tensors that do not match the structure. The message starts
            with the path and names the key, module or tensor at fault.
        SizeError: (a ``MemoryError``) the file's tensors need more memory than is
            available.
    """
    path = os.fspath(path)
    target = None if device is None else available_device(device, what="load(device=...)")
    try:
        model = _load(path)
    except FormatError as exc:
        raise FormatError(f"{path}: {exc}") from exc
    if target is not None:
        model.to(target)
    return model


def _load(path: str) -> nn.Module:
    header = read_header(path)
    text = header.metadata.get(METADATA_KEY)
    if text is None:
        raise FormatError(f"not an iternn file: no {METADATA_KEY!r} metadata")
    doc = parse_json(text, f"the {METADATA_KEY!r} metadata")
    check_document(doc)
    stored = header.tensors
    _check_aliases(doc, stored)
    links = _links(doc)

    def resolve(key: str) -> str:
        return links.get(key, key)

    def info(key: str):
        found = stored.get(resolve(key))
        return (found.dtype, found.shape) if found is not None else None

    model = _decode(doc, info, lambda key: header.read(resolve(key)))
    found = {k: (i.dtype, i.shape) for k, i in stored.items()}
    found.update({alias: found[canon] for alias, canon in links.items()})
    problems = _compare_state(_described(model.state_dict(keep_vars=True)), found)
    if problems:
        raise FormatError("the tensors do not match the structure: " + "; ".join(problems))
    check_bytes(sum(i.end - i.begin for i in stored.values()), f"loading {path}")

    tensors = {k: header.read(k) for k in stored}
    full = {k: tensors[resolve(k)] for k in found}
    try:
        model.load_state_dict(full, strict=True, assign=True)
    except (RuntimeError, ValueError) as exc:
        raise FormatError(f"{type(exc).__name__}: {exc}") from exc
    _tie(model, doc)
    _apply_flags(model, doc)
    for kind, items in (("parameter", model.named_parameters(remove_duplicate=False)),
                        ("buffer", model.named_buffers(remove_duplicate=False))):
        for key, t in items:
            if t.is_meta:
                raise FormatError(
                    f"{kind} {key!r} is not stored and its codec left it unbuilt (on the meta "
                    "device); the codec's decode must build it outside torch.device('meta')"
                )
    return model
