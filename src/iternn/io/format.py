"""The file format: a safetensors file whose metadata holds the iternn JSON document.

Reading trusts nothing in the file. :func:`read_header` parses the safetensors header
itself (8-byte little-endian length, then that many bytes of JSON) with a size cap and a
nesting cap, and checks every tensor entry (dtype, shape, byte range) against the file's
real length before any tensor is read; :meth:`Header.read` then reads one tensor into a
tensor of exactly its size (one allocation, no copy). :func:`check_document` checks the
iternn document's fields and types. Writing (:func:`write_atomic`) goes through a
temporary file in the same folder and ``os.replace``.

A safetensors file is::

    u64 (little-endian) N | N bytes of JSON header | data buffer

and the header maps each tensor name to ``{"dtype": "F32", "shape": [..],
"data_offsets": [begin, end]}`` (offsets into the data buffer, which the tensors cover
in order without gaps or overlaps), plus ``"__metadata__"``: a ``str -> str`` map.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import stat
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..core.files import fsync_dir
from ..errors import FormatError, MissingFileError

__all__ = [
    "FORMAT_VERSION",
    "METADATA_KEY",
    "MAX_HEADER_BYTES",
    "MAX_JSON_DEPTH",
    "TensorInfo",
    "Header",
    "read_header",
    "parse_json",
    "check_document",
    "write_atomic",
]

#: Version of the file format written by ``save``; ``load`` reads this version.
FORMAT_VERSION = 1
#: The safetensors metadata key that holds the JSON structure.
METADATA_KEY = "iternn"
FORMAT_NAME = "iternn"
#: Largest safetensors header (JSON) read, in bytes (the safetensors library's own cap).
MAX_HEADER_BYTES = 100_000_000
#: Deepest nesting of JSON arrays/objects accepted in the header and the document.
MAX_JSON_DEPTH = 64

# safetensors dtype names -> torch dtypes (those this torch build has).
_DTYPES: dict[str, torch.dtype] = {
    name: dtype
    for name, dtype in (
        ("F64", torch.float64), ("F32", torch.float32), ("F16", torch.float16),
        ("BF16", torch.bfloat16), ("I64", torch.int64), ("I32", torch.int32),
        ("I16", torch.int16), ("I8", torch.int8), ("U8", torch.uint8), ("BOOL", torch.bool),
        ("U16", getattr(torch, "uint16", None)), ("U32", getattr(torch, "uint32", None)),
        ("U64", getattr(torch, "uint64", None)),
        ("F8_E4M3", getattr(torch, "float8_e4m3fn", None)),
        ("F8_E5M2", getattr(torch, "float8_e5m2", None)),
        ("C64", torch.complex64),
    )
    if dtype is not None
}


# ---------------------------------------------------------------------------- JSON
def _no_constant(name: str) -> Any:
    raise FormatError(f"{name} is not a JSON number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise FormatError(f"key {k!r} appears twice in one JSON object")
        out[k] = v
    return out


def _depth(value: Any) -> int:
    """Nesting depth of arrays/objects, computed without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            v = list(v.values())
        elif not isinstance(v, list):
            continue
        deepest = max(deepest, d)
        if d > MAX_JSON_DEPTH:
            break
        stack.extend((x, d + 1) for x in v if isinstance(x, (dict, list)))
    return deepest


def parse_json(text: str | bytes, what: str) -> Any:
    """Strict JSON (no NaN/Infinity, no repeated keys) nested at most ``MAX_JSON_DEPTH``.

    Raises :class:`FormatError` naming ``what`` for anything else.
    """
    try:
        value = json.loads(text, parse_constant=_no_constant, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise FormatError(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except FormatError as exc:
        raise FormatError(f"{what} is not valid JSON: {exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise FormatError(f"{what} is not valid JSON: {exc}") from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise FormatError(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels")
    return value


# ---------------------------------------------------------------------------- header
@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the header declares it: dtype, shape and byte range in the data."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class Header:
    """The checked header of one safetensors file: tensor entries and metadata.

    :meth:`read` reads a tensor's bytes from the file (and keeps it, so a tensor a codec
    read while decoding is not read again).
    """

    def __init__(self, path: str, tensors: dict[str, TensorInfo], metadata: dict[str, str],
                 data_start: int) -> None:
        self.path = path
        self.tensors = tensors
        self.metadata = metadata
        self._data_start = data_start
        self._read: dict[str, Tensor] = {}

    def read(self, name: str) -> Tensor:
        """Tensor ``name`` as stored (CPU, its own memory, exactly its size)."""
        if name in self._read:
            return self._read[name]
        info = self.tensors.get(name)
        if info is None:
            raise FormatError(f"no tensor {name!r} in the file")
        t = torch.empty(info.shape, dtype=info.dtype, device="cpu")  # also inside a meta context
        raw = t.reshape(-1).view(torch.uint8) if t.numel() else None
        if raw is not None:
            try:
                with open(self.path, "rb") as f:
                    f.seek(self._data_start + info.begin)
                    got = f.readinto(memoryview(raw.numpy()))
            except OSError as exc:
                raise FormatError(f"cannot read tensor {name!r}: {exc}") from exc
            if got != info.end - info.begin:
                raise FormatError(f"tensor {name!r} is cut short (the file changed while read)")
            if info.dtype == torch.bool and bool((raw > 1).any()):
                raise FormatError(f"tensor {name!r} (bool) holds bytes other than 0 and 1")
        self._read[name] = t
        return t


def _check_entry(name: str, entry: Any, data_len: int) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise FormatError(
            f"header entry {name!r} must be an object with exactly 'dtype', 'shape' and "
            f"'data_offsets'"
        )
    dtype = _DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise FormatError(f"tensor {name!r} has unsupported dtype {entry['dtype']!r}")
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(_is_int(n) and n >= 0 for n in shape):
        raise FormatError(f"tensor {name!r} has shape {shape!r}, not a list of ints >= 0")
    offsets = entry["data_offsets"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_len):
        raise FormatError(
            f"tensor {name!r} has data_offsets {offsets!r}, not [begin, end] within the "
            f"{data_len} bytes of data"
        )
    numel = 1
    for n in shape:
        numel *= n
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if offsets[1] - offsets[0] != nbytes:
        raise FormatError(
            f"tensor {name!r} declares shape {shape} of {entry['dtype']} ({nbytes} bytes) "
            f"but stores {offsets[1] - offsets[0]} bytes"
        )
    return TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1])


def read_header(path: str) -> Header:
    """Read and check the header of the safetensors file at ``path``.

    Raises :class:`MissingFileError` (a ``FileNotFoundError``) when nothing is at
    ``path`` and :class:`FormatError` (naming what is wrong; the caller adds the path)
    for a folder, an unreadable file, a file too short or not safetensors, a header
    larger than ``MAX_HEADER_BYTES`` or than the file, and entries whose dtype, shape or
    byte range are bad or do not tile the data.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError as exc:
        raise MissingFileError(errno.ENOENT, "no such file", str(path)) from exc
    except OSError as exc:
        raise FormatError(f"cannot open: {exc.strerror or exc}") from exc
    if stat.S_ISDIR(st.st_mode):
        raise FormatError("is a folder, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise FormatError("is not a regular file")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FormatError(f"is not a safetensors file: {len(head)} bytes, too short")
            n = int.from_bytes(head, "little")
            size = st.st_size
            if n > MAX_HEADER_BYTES:
                raise FormatError(
                    f"is not a safetensors file: its header declares {n} bytes, more than "
                    f"the {MAX_HEADER_BYTES} read"
                )
            if 8 + n > size:
                raise FormatError(
                    f"is not a safetensors file: its header declares {n} bytes, the file "
                    f"has only {size - 8} after the length"
                )
            raw = f.read(n)
    except FormatError:
        raise
    except OSError as exc:
        raise FormatError(f"cannot read: {exc.strerror or exc}") from exc
    if len(raw) != n:
        raise FormatError("is not a safetensors file: the header is cut short")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(f"is not a safetensors file: the header is not UTF-8 ({exc})") from None
    try:
        header = parse_json(text, "its header")
    except FormatError as exc:
        raise FormatError(f"is not a safetensors file: {exc}") from None
    if not isinstance(header, dict):
        raise FormatError("is not a safetensors file: the header is not a JSON object")
    data_len = size - 8 - n
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise FormatError("header '__metadata__' must map str to str")
    tensors = {name: _check_entry(name, entry, data_len) for name, entry in header.items()}
    at = 0
    for info in sorted(tensors.values(), key=lambda i: (i.begin, i.end)):
        if info.begin != at:
            raise FormatError(
                f"tensor {info.name!r} starts at byte {info.begin} of the data, expected "
                f"{at} (tensors must tile the data without gaps or overlaps)"
            )
        at = info.end
    if at != data_len:
        raise FormatError(f"the tensors cover {at} bytes of data, the file holds {data_len}")
    return Header(path, tensors, metadata, 8 + n)


# ---------------------------------------------------------------------------- document
_FIELDS = {
    "root": int, "modules": list, "aliases": dict, "views": dict, "frozen": list,
    "training": bool, "mode_flips": list,
}


def check_document(doc: Any) -> None:
    """Check the iternn document's format, version and top-level field types."""
    if not isinstance(doc, dict):
        raise FormatError(f"the {METADATA_KEY!r} metadata must be a JSON object")
    if doc.get("format") != FORMAT_NAME:
        raise FormatError(f"metadata 'format' is {doc.get('format')!r}, expected {FORMAT_NAME!r}")
    version = doc.get("version")
    if not _is_int(version):
        raise FormatError(f"format version must be an int, got {version!r}")
    if version != FORMAT_VERSION:
        newer = " (written by a newer iternn)" if version > FORMAT_VERSION else ""
        raise FormatError(
            f"format version {version} is not supported{newer}; this iternn reads "
            f"version {FORMAT_VERSION}"
        )
    for field, kind in _FIELDS.items():
        value = doc.get(field)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise FormatError(f"field {field!r} must be a {kind.__name__}, got {value!r}")
    for field in ("aliases", "views"):
        for k, v in doc[field].items():
            if not isinstance(v, str):
                raise FormatError(f"{field}[{k!r}] must be a str, got {v!r}")
    for field in ("frozen", "mode_flips"):
        bad = next((v for v in doc[field] if not isinstance(v, str)), None)
        if bad is not None:
            raise FormatError(f"field {field!r} must be a list of str, holds {bad!r}")


# ---------------------------------------------------------------------------- writing
def write_atomic(path: str, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file at ``path`` via a temporary file and ``os.replace``."""
    from safetensors.torch import save_file

    folder = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    if not os.path.isdir(folder):
        raise MissingFileError(errno.ENOENT, f"cannot save {path}: no such folder", folder)
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
    fsync_dir(folder)
