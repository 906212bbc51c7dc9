"""Small helpers for writing files that survive a crash."""

from __future__ import annotations

import os

__all__ = ["fsync_dir"]


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename inside ``folder`` durable by syncing the folder itself (best effort:
    not every platform can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
