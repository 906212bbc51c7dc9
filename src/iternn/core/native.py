"""Native code shipped as C source: compile it with the system C compiler, load it once.

Some hot loops of iternn (sparse products, fused cell updates) come as small C files
that are compiled on first use rather than at install time, so that an installation
needs no build step and each machine gets code compiled for its own CPU.

The compiler is ``$CC``, else ``cc``, ``gcc`` or ``clang`` from ``PATH``. Libraries go
into the cache folder (:func:`cache_dir`): ``$ITERNN_CACHE_DIR``, else
``$XDG_CACHE_HOME/iternn``, else ``~/.cache/iternn``. A library's file name carries a
hash of the source, the compiler, its flags and this CPU's model and features, so a
cache shared between different machines never loads a build made for another CPU.
Writes are atomic (a temporary file renamed into place), so processes starting
together are safe.

``ITERNN_NATIVE=0`` turns all native code off (:func:`enabled`); each user then runs
its torch fallback. A library that fails to build or load is reported once per
process with a ``RuntimeWarning``, and its :class:`NativeStatus` says why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from ..errors import NativeBuildError

__all__ = [
    "COMMON_FLAGS",
    "DISABLED",
    "CSource",
    "NativeBuildError",
    "NativeLoader",
    "NativeStatus",
    "cache_dir",
    "compiler",
    "cpu_signature",
    "enabled",
    "open_library",
]

#: Flags of every build: a position-independent shared library from C11.
COMMON_FLAGS = ("-std=c11", "-shared", "-fPIC")
#: The reason recorded when ``ITERNN_NATIVE`` turns native code off.
DISABLED = "disabled by ITERNN_NATIVE=0"

Lib = TypeVar("Lib")


@dataclass(frozen=True)
class NativeStatus:
    """Whether a native library is in use, and why not when it is not."""

    available: bool
    reason: str  # "loaded", "disabled by ITERNN_NATIVE=0", or the build/load error
    path: Path | None = None
    flags: tuple[str, ...] = ()

    @property
    def openmp(self) -> bool:
        """Built with OpenMP (multi-threaded)."""
        return "-fopenmp" in self.flags


def enabled() -> bool:
    """False when ``$ITERNN_NATIVE`` turns native code off (``0``, ``false``, ``no``,
    ``off``); read on each call, so a process can change it before the first load."""
    return os.environ.get("ITERNN_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    """Folder of compiled libraries: ``$ITERNN_CACHE_DIR``, ``$XDG_CACHE_HOME/iternn``
    or ``~/.cache/iternn``."""
    if os.environ.get("ITERNN_CACHE_DIR"):
        return Path(os.environ["ITERNN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "iternn"


def compiler() -> str | None:
    """The C compiler to use: ``$CC``, else the first of ``cc``, ``gcc``, ``clang`` on
    ``PATH``; None when there is none."""
    cc = os.environ.get("CC")
    if cc:
        return cc
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return found
    return None


def cpu_signature() -> str:
    """Machine, CPU model and feature flags: what ``-march=native`` compiles for, and so
    part of a library's cache key."""
    parts = [platform.machine()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features", "CPU part"):
                    parts.append(line.strip())
                if len(parts) >= 4:
                    break
    except OSError:
        parts.append(platform.processor())
    return "\n".join(parts)


@functools.cache
def _compiler_version(cc: str) -> str:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


class CSource:
    """A C source file built into a shared library, trying ``flag_sets`` in order (the
    most specific first: a compiler or CPU that refuses one still gets a build from the
    next). ``name`` starts the library's file name in the cache folder."""

    def __init__(self, source: Path, name: str, flag_sets: Sequence[tuple[str, ...]]) -> None:
        self.source = source
        self.name = name
        self.flag_sets = tuple(flag_sets)

    def library_path(self, cc: str, flags: tuple[str, ...]) -> Path:
        """Where the build of this source with ``cc`` and ``flags`` for this CPU is cached."""
        h = hashlib.sha256()
        for part in (self.source.read_bytes(), cc.encode(), " ".join(flags).encode(),
                     _compiler_version(cc).encode(), cpu_signature().encode()):
            h.update(part)
            h.update(b"\0")
        suffix = ".dll" if os.name == "nt" else ".so"
        return cache_dir() / f"{self.name}-{h.hexdigest()[:16]}{suffix}"

    def compile(self, cc: str, flags: tuple[str, ...], target: Path) -> None:
        """Compile into ``target``, atomically: the file appears complete or not at all,
        and nothing half-written is left behind. Raises :class:`NativeBuildError` with
        the end of the compiler's message."""
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp", dir=target.parent)
        os.close(fd)
        try:
            cmd = [cc, *flags, *COMMON_FLAGS, str(self.source), "-o", tmp]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.SubprocessError) as e:
                raise NativeBuildError(f"cannot run the C compiler {cc!r}: {e}") from None
            if done.returncode != 0:
                tail = (done.stderr or done.stdout).strip().splitlines()[-8:]
                raise NativeBuildError(f"`{' '.join(cmd)}` failed:\n" + "\n".join(tail))
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def build(self, *, force: bool = False) -> tuple[Path, tuple[str, ...]]:
        """The library's path and the flags it was built with: the first flag set that
        is cached (unless ``force``) or compiles. Raises :class:`NativeBuildError` with
        every attempt's message when none does."""
        if not self.source.is_file():  # an installation without the C source
            raise NativeBuildError(f"the kernel source {self.source} is missing")
        cc = compiler()
        if cc is None:
            raise NativeBuildError("no C compiler found (set CC, or install cc/gcc/clang)")
        errors = []
        for flags in self.flag_sets:
            path = self.library_path(cc, flags)
            if path.exists() and not force:
                return path, flags
            try:
                self.compile(cc, flags, path)
                return path, flags
            except NativeBuildError as e:
                errors.append(str(e))
        raise NativeBuildError("\n".join(errors))


def open_library(path: Path, abi_function: str, abi: int) -> ctypes.CDLL:
    """Load the shared library at ``path`` and check that its ``abi_function()`` returns
    ``abi``: a library from an older source (a stale cache, a copied file) must not be
    called with another interface. Raises :class:`NativeBuildError`."""
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise NativeBuildError(f"cannot load {path}: {e}") from None
    found = getattr(lib, abi_function)()
    if found != abi:
        raise NativeBuildError(f"{path} has interface {found}, expected {abi}")
    return lib


class NativeLoader(Generic[Lib]):
    """A native library loaded at most once per process: the first :meth:`library`,
    :meth:`status` or :meth:`available` builds ``source`` and opens it with
    ``open(path, flags)``; the outcome, and the :class:`NativeStatus` that explains it,
    are remembered until :meth:`reset`. A module that ships a C source binds these
    methods as its own ``library``, ``status`` and ``available``.

    A failed build or load warns once, ``warning`` followed by the reason, and leaves
    the library unavailable. ``unusable(lib)``, when given, names a reason a library
    that loaded still cannot run here (a CPU without the instructions it needs), or
    returns None; such a library is unavailable without a warning.
    """

    def __init__(self, source: CSource, open: Callable[[Path, tuple[str, ...]], Lib], warning: str,
                 unusable: Callable[[Lib], str | None] | None = None) -> None:
        self.source = source
        self.open = open
        self.warning = warning
        self.unusable = unusable
        #: The remembered outcome: ``"lib"`` and ``"status"``, empty before the first load.
        self.state: dict[str, object] = {}
        self._lock = threading.Lock()

    def _load(self) -> tuple[Lib | None, NativeStatus]:
        if not enabled():
            return None, NativeStatus(False, DISABLED)
        try:
            path, flags = self.source.build()
            lib = self.open(path, flags)
        except NativeBuildError as e:
            # stacklevel: past this loader to the code that asked for the library
            warnings.warn(f"{self.warning} Reason: {e}", RuntimeWarning, stacklevel=4)
            return None, NativeStatus(False, str(e))
        why = self.unusable(lib) if self.unusable is not None else None
        if why is not None:
            return None, NativeStatus(False, why, path, flags)
        return lib, NativeStatus(True, "loaded", path, flags)

    @property
    def loaded(self) -> bool:
        """True once a load was attempted in this process (whatever its outcome)."""
        return "lib" in self.state

    def _outcome(self) -> dict[str, object]:
        if "lib" not in self.state:
            with self._lock:
                if "lib" not in self.state:
                    self.state["lib"], self.state["status"] = self._load()
        return self.state

    def library(self) -> Lib | None:
        """The loaded library (built on first call), or None when unavailable (see
        :meth:`status`). The outcome is remembered for the process."""
        return self._outcome()["lib"]  # type: ignore[return-value]

    def status(self) -> NativeStatus:
        """Whether the library is in use, and why not when it is not (loads it on
        first call)."""
        return self._outcome()["status"]  # type: ignore[return-value]

    def available(self) -> bool:
        """True when the library is loaded and in use."""
        return self._outcome()["lib"] is not None

    def reset(self) -> None:
        """Forget the outcome, so that the next call reads the environment and loads
        again (tests)."""
        with self._lock:
            self.state.clear()
