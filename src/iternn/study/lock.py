"""An exclusive lock on a study or run folder, so that two writers never share one.

:class:`FolderLock` takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` on the file ``iternn.lock``
inside the folder and writes the holder's pid into it. A second process asking for the
same folder gets :class:`~iternn.FolderLockedError` at once, naming the folder and the
holder's pid. The kernel drops the lock when the holder exits, however it exits (SIGKILL
included), so a killed run never leaves a stale lock.

The lock file is removed on release. Removing a locked file would let a third process
lock a new file of the same name while a second one waits on the old one, so a process
that got the lock checks that the file it locked is still the one at the path (same
inode) and otherwise tries again.

Within one process the lock is re-entrant: nested ``FolderLock`` of the same folder (a
study that runs its sweep, then writes its report) share one lock.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from types import TracebackType

from ..errors import FolderLockedError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locking
    fcntl = None  # type: ignore[assignment]

__all__ = ["FolderLock", "LOCK_NAME"]

#: Name of the lock file inside a locked folder.
LOCK_NAME = "iternn.lock"

_held: dict[Path, tuple[int, int]] = {}  # folder -> (fd, depth), this process
_guard = threading.Lock()


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"


class FolderLock:
    """``with FolderLock(folder): ...`` holds the folder's lock (see the module docstring).

    Args:
        folder: the folder (created if missing).
        what: how the message names the folder, e.g. ``"study folder"``.
    """

    def __init__(self, folder: str | os.PathLike, *, what: str = "folder") -> None:
        self.folder = Path(folder)
        self.what = what
        self._key: Path | None = None

    def acquire(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        key = self.folder.resolve()
        with _guard:
            if key in _held:
                fd, depth = _held[key]
                _held[key] = (fd, depth + 1)
                self._key = key
                return
            fd = self._lock_file(key / LOCK_NAME) if fcntl is not None else -1
            _held[key] = (fd, 1)
            self._key = key

    def _lock_file(self, path: Path) -> int:
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise FolderLockedError(
                    f"{self.what} {self.folder} is in use by another iternn process (pid "
                    f"{_holder(path)}); wait for it to finish or use another folder") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return fd
            os.close(fd)  # the holder removed the file as we opened it: take the new one

    def release(self) -> None:
        key, self._key = self._key, None
        if key is None:
            return
        with _guard:
            fd, depth = _held[key]
            if depth > 1:
                _held[key] = (fd, depth - 1)
                return
            del _held[key]
            if fd >= 0:
                try:
                    (key / LOCK_NAME).unlink(missing_ok=True)
                except OSError:
                    pass
                os.close(fd)  # releases the flock

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
