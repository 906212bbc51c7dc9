"""Helpers shared by the converter tests: where a line is, the tensors of an output."""

from __future__ import annotations

import inspect
import os

from torch import Tensor


def source_line(fn, text: str) -> str:
    """``<file>:<line>`` of the line of ``fn``'s source containing ``text`` (what a
    conversion error names)."""
    lines, start = inspect.getsourcelines(fn)
    here = os.path.basename(inspect.getsourcefile(fn))
    for i, line in enumerate(lines):
        if text in line:
            return f"{here}:{start + i}"
    raise AssertionError(f"{text!r} not in the source of {fn}")


def leaves(out) -> list[Tensor]:
    """The tensors of a (nested) output, in order."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in leaves(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in leaves(v)]
    return []
