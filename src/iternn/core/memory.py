"""Memory estimates checked before memory is touched.

An operation that can cheaply say how many bytes it will allocate calls
:func:`check_bytes` first, so that a request too large for the machine is a
:class:`~iternn.SizeError` naming the slot, option or flag and the size, instead of a
zero-fill that thrashes the machine and ends in the allocator's text.

What is available is the smaller of the machine's free memory (``MemAvailable`` of
``/proc/meminfo``; on CUDA, ``torch.cuda.mem_get_info``) and what the process's resource
limits (``RLIMIT_AS``, ``RLIMIT_DATA``) still allow. Where neither can be read, only sizes
that no machine could hold are refused.
"""

from __future__ import annotations

import os

import torch

from ..errors import SizeError

__all__ = ["available_bytes", "check_bytes", "format_bytes", "tensor_bytes"]

#: Refused wherever nothing better is known (no /proc): 2**48 bytes, 256 TiB.
_NO_MACHINE_HOLDS = 1 << 48

#: Requests below this many bytes (16 MiB) are not checked: reading what is available
#: costs about 0.1 ms, more than such an allocation, and every machine iternn runs on
#: has that much.
ALWAYS_AVAILABLE = 1 << 24


def format_bytes(n: float) -> str:
    """``n`` bytes in the largest unit (up to TB) that keeps at least one digit before the point."""
    if abs(n) < 1000:
        return f"{n:.0f} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1000
        if abs(n) < 1000:
            return f"{n:.1f} {unit}"
    return f"{n / 1000:.1f} TB"


def tensor_bytes(numel: int, dtype: torch.dtype) -> int:
    """Bytes of a tensor of ``numel`` elements of ``dtype``."""
    return int(numel) * dtype.itemsize


def _proc_kb(path: str, key: str) -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _rlimit_room() -> int | None:
    """Bytes the process's soft ``RLIMIT_AS``/``RLIMIT_DATA`` still allow, if any is set."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return None
    room = None
    for limit, usage_key in ((resource.RLIMIT_AS, "VmSize"), (resource.RLIMIT_DATA, "VmData")):
        soft, _ = resource.getrlimit(limit)
        if soft == resource.RLIM_INFINITY:
            continue
        used = _proc_kb("/proc/self/status", usage_key) or 0
        left = max(0, soft - used)
        room = left if room is None else min(room, left)
    return room


def available_bytes(device: torch.device | str | None = None) -> int:
    """Bytes this process can still allocate on ``device`` (CPU when ``None``)."""
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(device)
            return int(free)
        except (RuntimeError, AssertionError):  # pragma: no cover - no usable CUDA
            return _NO_MACHINE_HOLDS
    candidates = [_proc_kb("/proc/meminfo", "MemAvailable"), _rlimit_room()]
    known = [c for c in candidates if c is not None]
    if not known:
        try:
            known = [os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")]
        except (ValueError, OSError, AttributeError):  # pragma: no cover
            known = [_NO_MACHINE_HOLDS]
    return min(known)


def check_bytes(nbytes: int, what: str, *, device: torch.device | str | None = None) -> None:
    """Raise :class:`~iternn.SizeError` when ``nbytes`` exceed what :func:`available_bytes`
    reports (requests under :data:`ALWAYS_AVAILABLE` bytes, and any on the ``meta``
    device, which allocates nothing, pass unchecked). ``what`` names the
    thing at fault (a slot, an option, a flag) and its size, e.g.
    ``"slot 'x' (1000000000 features x batch 4, float32)"``."""
    if nbytes < ALWAYS_AVAILABLE:
        return
    if device is not None and torch.device(device).type == "meta":
        return  # meta tensors have shapes only: nothing is allocated
    room = available_bytes(device)
    if nbytes > room:
        raise SizeError(f"{what} needs {format_bytes(nbytes)} of memory, more than the "
                        f"{format_bytes(room)} available")
