"""The exceptions iternn raises: one family under :class:`IterNNError`.

Every error iternn raises on purpose is an :class:`IterNNError`, so ``except
iternn.IterNNError`` catches all of them, and each is also the built-in type a Python
programmer expects for its kind of mistake (``ValueError`` for a bad value, ``TypeError``
for a bad type, ``RuntimeError`` for a computation that failed on valid input,
``MemoryError`` for a request too large for this machine). The same mistake raises the same
type everywhere; messages name the slot, block, key, option or token at fault.

This module imports nothing of iternn: every layer may raise these.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "IterNNError",
    "MapError",
    "MapTypeError",
    "NotLinearError",
    "ConversionError",
    "SizeError",
    "PatternError",
    "FormatError",
    "DynamicsError",
    "ConvergenceError",
    "ConfigError",
    "ResumeError",
    "DataError",
    "StudyError",
    "FolderLockedError",
    "NativeBuildError",
    "TensorBoardMissingError",
    "MissingDependencyError",
    "MissingFileError",
    "NotRegisteredError",
]


class IterNNError(Exception):
    """Base of every exception iternn raises on purpose."""


# ------------------------------------------------------------------ maps, engine, converters
class MapError(IterNNError, ValueError):
    """A bad value given to a map or the engine: unknown or duplicate slot, a block of the
    wrong shape, a state that does not match the map, a bad option of ``iterate``."""


class MapTypeError(IterNNError, TypeError):
    """An argument of the wrong type, dtype or device (a map, a block, a state, an option)."""


class NotLinearError(MapTypeError):
    """A block that is not a linear (affine) map of its sources, where one matrix was asked
    for (:func:`iternn.as_matrix`).

    Its own class so that callers that can do without the matrix (a spy plot draws such
    a block as a module) catch exactly this. ``block`` is ``(dst, src)`` of the block at
    fault (``None`` for a bare module); the message names it as ``block 'dst' <- 'src'``
    and says why.
    """

    def __init__(self, message: str, block: tuple[str, Any] | None = None) -> None:
        super().__init__(message)
        self.block = block

    def __reduce__(self) -> tuple:  # picklable across processes despite the signature
        return (type(self), (str(self), self.block))


class ConversionError(IterNNError, ValueError):
    """A model that a converter cannot turn into a map exactly (unsupported layer, option
    or structure); the message names the layer or option."""


class SizeError(IterNNError, MemoryError):
    """An operation would need more memory than this machine can give; raised before any
    memory is touched, naming the slot, option or flag and the size."""


# ------------------------------------------------------------------------------- sparsity
class PatternError(IterNNError, ValueError):
    """A bad block spec or sparsity pattern. ``token`` is the offending token (a spec token,
    or the name of the buffer/block whose pattern is bad), quoted in the message."""

    def __init__(self, token: str, message: str, spec: str | None = None) -> None:
        where = f" in spec {spec!r}" if spec is not None and spec != token else ""
        super().__init__(f"bad token {token!r}{where}: {message}")
        self.token = token
        self.spec = spec

    def __reduce__(self) -> tuple:  # picklable across processes despite the signature
        return (_rebuild_pattern_error, (self.token, str(self), self.spec))


def _rebuild_pattern_error(token: str, text: str, spec: str | None) -> PatternError:
    err = PatternError.__new__(PatternError)
    Exception.__init__(err, text)
    err.token, err.spec = token, spec
    return err


class NativeBuildError(IterNNError, RuntimeError):
    """The native kernels could not be built or loaded (the message has the compiler's
    output or the loader's error)."""


# ------------------------------------------------------------------------------------- io
class FormatError(IterNNError, ValueError):
    """The file is not an iternn file, or its structure does not match its tensors; the
    message names the path and the tensor or key at fault."""


# ------------------------------------------------------------------------------- dynamics
class DynamicsError(IterNNError, ValueError):
    """Bad input to a dynamics tool (the message names the slot, block, solver or option),
    including a map whose weights or Jacobian hold non-finite values."""


class ConvergenceError(IterNNError, RuntimeError):
    """A solve did not converge and the caller asked for an error.

    A :class:`RuntimeError`, not a :class:`DynamicsError`: the input was valid, the
    computation failed. ``.info`` is the solver's report of the failed solve.
    """

    def __init__(self, message: str, info: Any = None) -> None:
        super().__init__(message)
        self.info = info

    def __reduce__(self) -> tuple:
        return (type(self), (str(self), self.info))


# ---------------------------------------------------------------------------------- study
class ConfigError(IterNNError, ValueError):
    """A bad study configuration or command-line option; the message starts with the
    offending key's path (or names the flag)."""


class ResumeError(ConfigError):
    """``--resume`` was asked to continue a run with options it cannot honour; the message
    names the options that differ from the stored run."""


class DataError(IterNNError, ValueError):
    """A data set that cannot be read or generated as asked (bad file, bad shape, bad
    split); the message names the file or option."""


class StudyError(IterNNError, RuntimeError):
    """A training run or a study failed or diverged."""


class FolderLockedError(IterNNError, RuntimeError):
    """Another process holds the lock of a study or run folder."""


class MissingDependencyError(IterNNError, ImportError):
    """An optional package that the requested feature needs is not installed; the message
    names the package and the ``pip install`` line that brings it."""


class TensorBoardMissingError(MissingDependencyError):
    """TensorBoard logging was requested, and the ``tensorboard`` package is not installed."""


# ---------------------------------------------------------------------- files, registries
class MissingFileError(IterNNError, FileNotFoundError):
    """A file or folder the caller named does not exist (``.filename`` is its path)."""


class NotRegisteredError(IterNNError, KeyError):
    """A name or class that no registry entry (codec, solver) is known by."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""
