"""Validation of CSR patterns: what the CSR kernels may trust.

The compiled kernels (:mod:`iternn.sparse.native`) and ``torch.sparse`` (built with
``check_invariants=False``) read ``values[k]`` and ``x[:, col[k]]`` for ``k`` in
``[crow[i], crow[i + 1])`` without bounds checks, so a bad pattern reads memory it does
not own and may kill the process. :func:`check_csr_pattern` refuses every such pattern
with a :class:`~iternn.errors.PatternError` naming the buffer and the bad entry.

A valid pattern of a ``rows x cols`` block (row = destination, column = source):

* ``crow_indices``: 1-D, ``rows + 1`` entries, ``crow[0] == 0``, non-decreasing,
  ``crow[-1] == nnz``;
* ``col_indices``: 1-D, ``nnz`` entries in ``[0, cols)``, strictly increasing within
  each row (sorted, no duplicate position);
* both int32 or both int64, on one device.

:func:`ensure_csr_pattern` is the same check with a memo: it runs again only when one of
the two tensors was replaced or changed in place (keyed on the tensors themselves, their
``_version`` counters, data pointers and sizes), so calling it on every product costs a
dictionary look-up (about 2 us). An in-place write through ``t.data`` or a NumPy view
bumps no version counter and is not seen: the native kernels check every index they read
themselves (and report with :func:`check_csr_buffers`), and the torch.sparse path runs
the full check on every CPU call.
"""

from __future__ import annotations

import re
import threading
import weakref

import torch
from torch import Tensor

from ..errors import MapTypeError, PatternError

__all__ = ["check_csr_pattern", "check_csr_buffers", "ensure_csr_pattern", "remember_checked",
           "stamp", "Memo", "INDEX_DTYPES"]

#: Index dtypes a pattern may have (int32: what MKL and the native kernels take).
INDEX_DTYPES = (torch.int32, torch.int64)


def _shape(shape: object, name: str) -> tuple[int, int]:
    ok = isinstance(shape, (tuple, list, torch.Size)) and len(shape) == 2 and all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
    if not ok:
        raise PatternError(name, f"shape must be a pair (rows, cols) of ints >= 0, got {shape!r}")
    return int(shape[0]), int(shape[1])


def _first(mask: Tensor) -> int:
    """Position of the first True of a 1-D bool tensor that has one."""
    return int(mask.nonzero()[0, 0])


def check_csr_pattern(crow_indices: Tensor, col_indices: Tensor, shape: tuple[int, int], *,
                      name: str) -> None:
    """Raise :class:`~iternn.errors.PatternError` unless ``(crow_indices, col_indices)``
    is a valid CSR pattern of a ``shape = (rows, cols)`` block (see the module docstring).

    ``name`` names the owner (a block, a file entry); the error's token is
    ``"<name>.crow_indices"`` or ``"<name>.col_indices"`` and its message names the first
    bad entry, e.g. ``col_indices[41] = 100000 is outside [0, 64)``. Costs a few
    vectorised passes over the pattern, on the pattern's device.
    """
    if not isinstance(name, str):
        raise MapTypeError(f"name must be a str, got {type(name).__name__}")
    rows, cols = _shape(shape, name)
    token = {part: f"{name}.{part}" if name else part for part in ("crow_indices", "col_indices")}
    for part, t in (("crow_indices", crow_indices), ("col_indices", col_indices)):
        if not isinstance(t, Tensor):
            raise PatternError(token[part], f"{part} must be a tensor, got {type(t).__name__}")
        if t.dtype not in INDEX_DTYPES:
            raise PatternError(token[part], f"{part} has dtype {t.dtype}; pattern indices are "
                                            f"int32 or int64")
        if t.dim() != 1:
            raise PatternError(token[part], f"{part} must be 1-D, got shape {tuple(t.shape)}")
    crow, col = crow_indices, col_indices
    if crow.dtype != col.dtype:
        raise PatternError(token["col_indices"], f"col_indices has dtype {col.dtype} but "
                                                 f"crow_indices has {crow.dtype}")
    if crow.device != col.device:
        raise PatternError(token["col_indices"], f"col_indices is on {col.device} but "
                                                 f"crow_indices is on {crow.device}")
    if crow.numel() != rows + 1:
        raise PatternError(token["crow_indices"], f"crow_indices has {crow.numel()} entries; a "
                                                  f"block of {rows} rows needs {rows + 1}")
    nnz = col.numel()
    first, last = int(crow[0]), int(crow[-1])
    if first != 0:
        raise PatternError(token["crow_indices"], f"crow_indices[0] = {first}, must be 0")
    if last != nnz:
        raise PatternError(token["crow_indices"], f"crow_indices[{rows}] = {last} must equal "
                                                  f"the number of entries, len(col_indices) = {nnz}")
    counts = crow.diff()
    down = counts < 0
    if bool(down.any()):
        i = _first(down)
        raise PatternError(token["crow_indices"],
                           f"crow_indices[{i + 1}] = {int(crow[i + 1])} is less than "
                           f"crow_indices[{i}] = {int(crow[i])}: row pointers must not decrease")
    if nnz == 0:
        return
    # A bound beyond the index dtype's range would wrap when compared with it.
    out = (col < 0) | (col >= cols) if cols <= torch.iinfo(col.dtype).max else col < 0
    if bool(out.any()):
        k = _first(out)
        raise PatternError(token["col_indices"],
                           f"col_indices[{k}] = {int(col[k])} is outside [0, {cols})")
    # Strictly increasing within each row: every step col[k] -> col[k + 1] that does not
    # cross a row boundary (k + 1 is not some crow[i]) must go up.
    unsorted = col.diff() <= 0
    starts = crow[1:-1]
    starts = starts[(starts > 0) & (starts < nnz)].long() - 1
    unsorted[starts] = False
    if bool(unsorted.any()):
        k = _first(unsorted)
        row = int(torch.searchsorted(crow, torch.tensor(k, dtype=crow.dtype, device=crow.device),
                                     right=True)) - 1
        what = "repeats" if int(col[k + 1]) == int(col[k]) else "is less than"
        raise PatternError(token["col_indices"],
                           f"col_indices[{k + 1}] = {int(col[k + 1])} {what} col_indices[{k}] = "
                           f"{int(col[k])} in row {row}: columns must be strictly increasing "
                           f"within a row (sorted, no duplicate position)")


def check_csr_buffers(crow_indices: Tensor, col_indices: Tensor, shape: tuple[int, int], *,
                      name: str, buffers: tuple[str, str] = ("crow_indices", "col_indices"),
                      note: str = "") -> None:
    """:func:`check_csr_pattern` for a pattern whose two buffers go by other names
    (``buffers``, e.g. ``("crow_indices_t", "col_indices_t")``): the error's token is
    ``"<name>.<buffer>"`` and its message names the buffer and the entry. ``note`` is
    appended to the message."""
    try:
        check_csr_pattern(crow_indices, col_indices, shape, name="")
    except PatternError as e:
        buffer = buffers[0] if e.token == "crow_indices" else buffers[1]
        message = str(e).split(": ", 1)[-1]
        message = re.sub(r"\bcrow_indices\b", buffers[0], message)
        message = re.sub(r"\bcol_indices\b", buffers[1], message)
        raise PatternError(f"{name}.{buffer}" if name else buffer, message + note) from None


# ------------------------------------------------------------------------------- memo
def stamp(tensors: tuple[Tensor, ...]) -> list | None:
    """What changes when any of ``tensors`` is edited in place or replaced: version
    counter, data pointer and size of each (a ``.data =`` assignment does not bump the
    version; it changes the pointer or the size). A dtype change at the same address
    is left to the kernels, which check their index dtypes on every call. None when one
    is an inference tensor (no version counter: it is then checked on every call)."""
    try:
        return [(t._version, t.data_ptr(), t.numel()) for t in tensors]
    except RuntimeError:  # "Inference tensors do not track version counter"
        return None


class Memo:
    """What was checked since its last change: ``id(owner)`` -> (a weak reference to
    ``owner``, weak references to the checked tensors, their :func:`stamp`, and an
    ``extra`` key such as the shape). A weak reference that still returns the very
    object proves it is the same one (its address was not reused by a newer object);
    equal stamps prove no tensor changed. An entry goes when its owner is freed."""

    def __init__(self) -> None:
        self._entries: dict[int, tuple] = {}
        self._lock = threading.RLock()  # re-entrant: a weakref callback may run inside add()

    def hit(self, owner: object, tensors: tuple[Tensor, ...], extra: object = None) -> bool:
        """Whether ``tensors`` (of ``owner``, for ``extra``) are unchanged since :meth:`add`."""
        entry = self._entries.get(id(owner))
        if entry is None or entry[0]() is not owner or entry[3] != extra:
            return False
        refs = entry[1]
        if len(refs) != len(tensors):
            return False
        for r, t in zip(refs, tensors):
            if r() is not t:
                return False
        return entry[2] is not None and entry[2] == stamp(tensors)

    def add(self, owner: object, tensors: tuple[Tensor, ...], extra: object = None) -> None:
        """Record ``tensors`` (of ``owner``, for ``extra``) as checked in their present state."""
        key = id(owner)
        entries = self._entries

        def forget(_ref, key=key) -> None:
            with self._lock:
                entry = entries.get(key)
                if entry is not None and entry[0]() is None:
                    del entries[key]

        with self._lock:
            entries[key] = (weakref.ref(owner, forget), tuple(weakref.ref(t) for t in tensors),
                            stamp(tensors), extra)


_memo = Memo()


def remember_checked(crow_indices: Tensor, col_indices: Tensor, shape: tuple[int, int]) -> None:
    """Record that ``(crow_indices, col_indices)`` passed :func:`check_csr_pattern` for
    ``shape``, so that :func:`ensure_csr_pattern` skips them until they change."""
    _memo.add(col_indices, (crow_indices, col_indices), tuple(shape))


def ensure_csr_pattern(crow_indices: Tensor, col_indices: Tensor, shape: tuple[int, int], *,
                       name: str) -> None:
    """:func:`check_csr_pattern`, skipped when these very tensors passed it for this
    ``shape`` and have not changed since (in place or by ``.data`` assignment). Writes
    that bypass the tensor's version counter -- into ``t.data[...]``, a NumPy view or
    raw memory -- are not seen. What every CSR product calls before handing a pattern
    to a kernel."""
    tensors = (crow_indices, col_indices)
    if isinstance(col_indices, Tensor) and isinstance(crow_indices, Tensor) \
            and _memo.hit(col_indices, tensors, shape):
        return
    check_csr_pattern(crow_indices, col_indices, shape, name=name)
    remember_checked(crow_indices, col_indices, shape)
