"""Atomic checkpoints and metric files for training runs.

A checkpoint is a nested structure of *plain* values only: tensors, ``None``, ``bool``,
``int``, ``float``, ``str`` and ``dict``/``list``/``tuple`` of those (dict keys ``str`` or
``int``). That is what ``torch.load(weights_only=True)`` can read back without running
arbitrary pickled code, so :func:`save_checkpoint` checks it before writing and
:func:`load_checkpoint` always loads with ``weights_only=True``.

Every write is atomic: the bytes go to a temporary file in the same folder, which is
flushed and ``fsync``-ed and then renamed over the target with :func:`os.replace`. A
process killed at any moment (SIGKILL included) leaves either the previous complete file
or the new complete file, never a torn one. A killed writer may leave its temporary file
(``.NAME.tmp``) behind; the next write to the same target reuses and replaces it.
"""

from __future__ import annotations

import errno
import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..core.files import fsync_dir
from ..errors import FormatError, MapTypeError, MissingFileError

__all__ = ["save_checkpoint", "load_checkpoint", "atomic_write_bytes", "atomic_write_text"]

_SCALARS = (type(None), bool, int, float, str)


def _check_plain(obj: Any, where: str) -> None:
    if isinstance(obj, _SCALARS) or isinstance(obj, torch.Tensor):
        return
    if isinstance(obj, Mapping):
        if not isinstance(obj, dict):
            raise MapTypeError(f"checkpoint entry {where} is a {type(obj).__name__}, not a dict")
        for key, value in obj.items():
            if isinstance(key, bool) or not isinstance(key, (str, int)):
                raise MapTypeError(
                    f"checkpoint entry {where} has a key of type {type(key).__name__} "
                    "(only str and int keys can be loaded with weights_only=True)"
                )
            _check_plain(value, f"{where}[{key!r}]")
        return
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
        return
    raise MapTypeError(
        f"checkpoint entry {where} is a {type(obj).__name__}: only tensors, None, bool, int, "
        "float, str and dict/list/tuple of those can be saved"
    )


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + fsync + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> Path:
    """Save ``state`` (a dict of plain values and tensors) to ``path`` atomically.

    Raises:
        MapTypeError: ``state`` holds something other than tensors and plain containers
            (a ``TypeError``); the message names the offending entry. Nothing is written
            then.
    """
    if not isinstance(state, dict):
        raise MapTypeError(f"state must be a dict, got {type(state).__name__}")
    _check_plain(state, "state")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | os.PathLike, *, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    The safe loader is never switched off: a file it cannot read is damaged (a torn copy,
    a full disk) or was not written by :func:`save_checkpoint`, and is reported as such.

    Raises:
        FileNotFoundError: no file at ``path``.
        FormatError: the file is not a readable checkpoint (a ``ValueError``); the message
            names the file, what is wrong and what to do.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(errno.ENOENT, "no checkpoint", str(path))
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - reported as one clear error naming the file
        raise FormatError(f"checkpoint {path} is unreadable ({_reason(e)}): it is damaged or "
                          f"was not written by iternn; {_ADVICE.format(folder=path.parent)}") from None
    if not isinstance(state, dict):
        raise FormatError(f"checkpoint {path} holds a {type(state).__name__}, not a dict of "
                          f"tensors; {_ADVICE.format(folder=path.parent)}")
    return state


_ADVICE = "delete the run folder {folder} (or train it without resume) to train the run again"


def _reason(e: BaseException) -> str:
    """A short cause from the loader's error, without the loader's advice (which is to
    load with the safety switched off: never what a damaged file needs)."""
    text = str(e)
    if "weights_only" in text or "Weights only load failed" in text:
        return "it holds objects other than tensors and plain values"
    if "zip archive" in text or "central directory" in text:
        return "not a complete checkpoint archive: truncated or overwritten"
    first = (text.strip().splitlines() or [""])[0][:120]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__
