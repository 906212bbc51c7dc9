"""Devices checked before anything is moved to them.

``torch.device("bogus")`` raises torch's raw ``RuntimeError`` and ``.to("cuda")`` on a
CPU-only build an ``AssertionError``; :func:`available_device` turns both, and a CUDA index
beyond the device count, into a :class:`~iternn.MapError` naming the device and the option.
"""

from __future__ import annotations

import torch

from ..errors import MapError, MapTypeError

__all__ = ["available_device"]


def available_device(device: object, *, what: str = "device") -> torch.device:
    """``device`` as a :class:`torch.device` that this process can use.

    Raises :class:`~iternn.MapTypeError` for something that is not a device or a string, and
    :class:`~iternn.MapError` (naming ``what`` and the device) for an unknown device string, a
    CUDA device on a build or machine without one, or an unavailable MPS backend.
    """
    if not isinstance(device, (str, torch.device)):
        raise MapTypeError(f"{what}: expected a device or a string such as 'cpu' or 'cuda:0', "
                           f"got {type(device).__name__}")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise MapError(f"{what} {device}: not a device ({' '.join(str(exc).split())})") from None
    if dev.type == "cuda":
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            raise MapError(f"{what} {device}: this torch build has no CUDA support "
                           f"(torch {torch.__version__}); use 'cpu'")
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise MapError(f"{what} {device}: no CUDA device is visible to this process")
        if dev.index is not None and dev.index >= count:
            raise MapError(f"{what} {device}: this machine has {count} CUDA device(s), "
                           f"cuda:0 to cuda:{count - 1}")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise MapError(f"{what} {device}: the MPS backend is not available here")
    elif dev.type != "cpu" and dev.type != "meta":
        try:
            torch.empty(0, device=dev)
        except (RuntimeError, AssertionError) as exc:
            raise MapError(f"{what} {device}: not usable here "
                           f"({' '.join(str(exc).split())})") from None
    return dev
