"""``analyze``: a report folder (Markdown and pictures) on the dynamics of a saved map.

:func:`analyze` loads a map saved with :func:`iternn.save` (or takes a module), picks a
state, and writes ``report.md`` and PNG pictures into one folder: the block structure
(which blocks are linear, and each one's matrix: its size and non-zeros, from
:func:`~iternn.dynamics.matrix.block_matrix`), the structural and empirical impulse
response, for maps with attention (a block holding a module with a ``batch_first``
flag: torch's attention and transformer layers, a converted transformer) the
propagation across the positions of a random sequence
(:func:`~iternn.dynamics.propagation.propagation`), the Jacobian's spectral radius,
eigenvalues and singular values at the state, fixed points found from several starts
with their stability, the largest Lyapunov exponent and the leading ones, a trajectory
and a bifurcation diagram. For a map with attention into its free slots the state is one
sequence of one position: the spectra and exponents take it whole (``positions=True``),
and the fixed-point search is not available (its starts would be the positions of one
sequence). Slots may be shaped (a ``(C, H, W)`` feature map counts its
``C·H·W`` entries everywhere, flattened row-major as in ``m.pack``) and blocks may read
several slots. The command line runs it as ``iternn analyze MAP``.

The analysis runs on a float64 copy of the map in eval mode (dropout off); the map
given is not modified. Every number depends only on the map, the state and ``seed``:
the same inputs give the same report, byte for byte.

Each analysis is independent: one that raises an ``Exception`` is recorded in the report
as ``not available: <reason>`` and the others go on (``KeyboardInterrupt`` stops the
whole analysis). Bad input — a missing file, a file that is not an iternn file, a module
without a block map, a state that does not fit, a map whose weights hold NaN or inf —
is an error.
"""

from __future__ import annotations

import copy
import errno
import math
import os
import sys
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..core.block_map import BlockMap
from ..core.state import parameter_spec
from ..engine.iterate import iterate
from ..errors import DynamicsError, FormatError, MapTypeError, MissingFileError
from .fixed_points import find_fixed_points, fixed_point
from .functional import mixing_blocks
from .impulse import impulse_response
from .jacobian import eigenvalues, singular_values, spectral_radius
from .lyapunov import lyapunov_spectrum
from .propagation import propagation
from .solvers import Anderson
from .validate import check_hold, check_int, check_map_finite, check_update

__all__ = ["analyze", "REPORT_NAME", "PICTURES", "DENSE_LIMIT", "POSITIONS"]

#: The Markdown file written into the report folder.
REPORT_NAME = "report.md"
#: Dense spectra (eigenvalues, singular values) and the fixed-point search are made
#: only when the free state has at most this many entries.
DENSE_LIMIT = 512
#: The propagation across positions is drawn for sequences of this many positions, fewer
#: (at least 2) where the sequence's free state would have more than ``4 * DENSE_LIMIT``
#: entries (each application's Jacobian is formed over the whole sequence).
POSITIONS = 8

#: The pictures, in report order: file name -> what it shows. ``propagation.png`` is
#: drawn for maps with attention only (their blocks mix the positions of a sequence).
PICTURES = {
    "structure.png": "block structure",
    "impulse_response.png": "impulse response",
    "propagation.png": "propagation across positions",
    "eigenvalues.png": "Jacobian eigenvalues",
    "singular_values.png": "Jacobian singular values",
    "trajectory.png": "trajectory",
    "lyapunov.png": "Lyapunov spectrum",
    "bifurcation.png": "bifurcation diagram",
}


# ---------------------------------------------------------------------------- formatting
def _f(x: Any, digits: int = 6) -> str:
    """A number for the report: ``inf``/``-inf``/``nan`` spelled out, else ``.6g``."""
    if isinstance(x, Tensor):
        x = x.item()
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    x = float(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    text = f"{x:.{digits}g}"
    return "0" if text == "-0" else text


def _c(z: complex) -> str:
    re, im = _f(z.real, 5), _f(abs(z.imag), 5)
    if z.imag == 0:
        return re
    return f"{re} {'+' if z.imag > 0 else '-'} {im}i"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    def cells(row: list[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |"

    return [cells(head), "|" + "|".join("---" for _ in head) + "|", *map(cells, rows)]


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or "(no message)"
    return f"{type(exc).__name__}: {text}"


# ---------------------------------------------------------------------------- input
def _load(source: object) -> tuple[nn.Module, str, str, str]:
    """``(module, name, description, where)``; missing and non-iternn files raise."""
    if isinstance(source, (str, os.PathLike)):
        from ..io import load  # imported here: io imports the whole package

        path = Path(source)
        if not path.exists():
            raise MissingFileError(errno.ENOENT, "no such file", str(path))
        if path.is_dir():
            raise FormatError(f"{path}: is a folder, not a saved map")
        module = load(path)
        return module, path.stem, f"`{path.name}` ({type(module).__name__})", str(path)
    if isinstance(source, nn.Module):
        name = type(source).__name__
        return source, name, f"an in-memory {name}", ""
    raise MapTypeError(
        f"analyze needs a path to a saved map or a module, got {type(source).__name__}"
    )


def _block_map(module: nn.Module, where: str) -> BlockMap:
    if isinstance(module, BlockMap):
        return module
    inner = getattr(module, "map", None)
    if isinstance(inner, BlockMap):
        return inner
    what = f"{where} holds a {type(module).__name__}" if where else f"{type(module).__name__}"
    raise MapTypeError(f"{what}, which is not a block map (neither a BlockMap nor a module with "
                    "a .map)")


def _default_hold(module: nn.Module, bm: BlockMap) -> tuple[str, ...]:
    """The MapModule's input slot, else a slot named ``x``, else nothing."""
    inp = getattr(module, "input", None)
    if isinstance(inp, str) and inp in bm.slots:
        return (inp,)
    return ("x",) if "x" in bm.slots else ()


def _attends(m: BlockMap) -> bool:
    """Whether a block of ``m`` is known to mix positions
    (:func:`~iternn.dynamics.functional.mixing_blocks`: it holds a module with a
    ``batch_first`` flag, such as torch's attention). Its report shows the propagation
    across them."""
    return bool(mixing_blocks(m, m.slots))


def _default_update(module: nn.Module) -> str:
    """How the module itself iterates its map: ``"ordered"`` for an RNNMap."""
    from ..convert.rnn import RNNMap

    return "ordered" if isinstance(module, RNNMap) else "jacobi"


def _shape_text(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def _state(bm: BlockMap, state: Mapping[str, Tensor] | None, seed: int,
           dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
    """Batch-1 state ``(1, *shape)`` per slot in the analysis dtype: random normal from
    ``seed`` by default (drawn as ``(1, n)`` per slot in slot order, then shaped)."""
    if state is None:
        gen = torch.Generator().manual_seed(seed % 2**64)
        return {s: torch.randn(1, n, generator=gen, dtype=torch.float64).to(dtype=dtype,
                                                                             device=device)
                .reshape(1, *bm.shapes[s])
                for s, n in bm.slots.items()}
    if not isinstance(state, Mapping):
        raise MapTypeError(f"state must be a dict slot -> tensor, got {type(state).__name__}")
    out = {}
    for s, v in state.items():
        if s not in bm.slots:
            raise DynamicsError(f"state names unknown slot {s!r}; slots are {list(bm.slots)}")
        if not isinstance(v, Tensor) or not v.is_floating_point():
            raise MapTypeError(f"slot {s!r} of the state must be a floating tensor")
        shape = bm.shapes[s]
        if v.shape not in (shape, (1, *shape)):
            raise DynamicsError(
                f"slot {s!r} of the state must have shape {_shape_text(shape)} or "
                f"{_shape_text((1, *shape))} (analyze takes one state), got {tuple(v.shape)}"
            )
        if not bool(torch.isfinite(v).all()):
            raise DynamicsError(f"slot {s!r} of the state contains NaN or inf")
        out[s] = v.detach().reshape(1, *shape).to(dtype=dtype, device=device)
    for s, shape in bm.shapes.items():  # missing slots start at zero, as in iterate
        out.setdefault(s, torch.zeros(1, *shape, dtype=dtype, device=device))
    return out


# ---------------------------------------------------------------------------- progress
class _Progress:
    """One step per report section on stderr: a ``tqdm`` bar, else one line per section.

    Disabled, it does nothing (the API's default); the command line enables it.
    """

    def __init__(self, name: str, total: int, *, enabled: bool) -> None:
        self.name, self.total, self.enabled = name, total, enabled
        self.bar: Any = None
        self.count = 0

    def __enter__(self) -> _Progress:
        if self.enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                self.bar = None
            else:
                self.bar = tqdm(total=self.total, desc=f"analyze {self.name}", unit="section",
                                file=sys.stderr, leave=True)
        return self

    def start(self, section: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(section)
        else:
            print(f"analyze {self.name}: {section} ({self.count + 1}/{self.total})",
                  file=sys.stderr, flush=True)

    def done(self) -> None:
        self.count += 1
        if self.bar is not None:
            self.bar.update(1)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ---------------------------------------------------------------------------- analyze
class _Run:
    """Runs one analysis at a time, recording failures instead of raising.

    Only ``Exception`` is recorded: ``KeyboardInterrupt`` and ``SystemExit`` (which are
    not ``Exception``) go through and stop the analysis.
    """

    def __init__(self) -> None:
        self.notes: list[str] = []

    def __call__(self, what: str, fn: Callable[[], Any]) -> tuple[Any, str | None]:
        try:
            return fn(), None
        except Exception as exc:  # noqa: BLE001 - recorded in the report, by design
            reason = _reason(exc)
            self.notes.append(f"{what}: not available: {reason}")
            return None, reason


def analyze(
    path_or_module: str | os.PathLike | nn.Module,
    out_dir: str | os.PathLike,
    *,
    state: Mapping[str, Tensor] | None = None,
    seed: int = 0,
    steps: int | None = None,
    quick: bool = False,
    hold: Collection[str] | None = None,
    update: str | None = None,
    pictures: bool = True,
    progress: bool = False,
) -> Path:
    """Analyse a block map and write ``report.md`` and pictures into ``out_dir``.

    Args:
        path_or_module: a file written by :func:`iternn.save`, or a module: a
            :class:`~iternn.BlockMap` or any module with a ``.map`` (``MapModule``,
            ``RNNMap``, ...).
        out_dir: the report folder (created with its parents; a previous report in it
            — ``report.md`` and the pictures named in :data:`PICTURES` — is replaced,
            other files are left alone; nothing is written outside it).
        state: the state the analyses start from, ``slot -> tensor`` of the slot's shape
            or ``(1, *shape)`` (missing slots are zero). Default: standard normal entries
            for every slot, drawn from ``seed``.
        seed: seeds the default state, the random perturbation directions, tangent
            bases and the fixed-point search's starting points.
        steps: applications for the trajectory and the Lyapunov average (default 400,
            ``quick``: 100).
        quick: fewer starts, steps and parameter values (for a first look or tests).
        hold: slots held at their value in ``state`` (the input). Default: a
            ``MapModule``'s input slot, else a slot named ``x``, else none.
        update: ``"jacobi"`` or ``"ordered"``; default the module's own (``"ordered"``
            for an ``RNNMap``, otherwise ``"jacobi"``, the paper's map).
        pictures: draw the PNGs (needs matplotlib: ``pip install iternn[plots]``;
            without it the report says so and has the numbers only). ``False``: numbers
            only, faster.
        progress: show a progress bar on stderr, one step per report section (``tqdm``,
            imported when asked for; without it, one line per section).

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.

    Raises:
        FileNotFoundError: no such file. iternn.FormatError: not an iternn file.
        MapTypeError: not a block map, a state or option of the wrong type.
        DynamicsError: a bad state, hold or option, or a map whose weights hold NaN or
            inf (named by block).
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise MapTypeError(f"seed must be an int, got {type(seed).__name__}")
    if steps is not None:
        check_int(steps, "steps", 1)
    if update is not None:
        check_update(update)
    module, name, described, where = _load(path_or_module)
    bm = _block_map(module, where)
    hold = _default_hold(module, bm) if hold is None else check_hold(bm, hold)
    if len(hold) == len(bm.slots):
        raise DynamicsError("every slot is held: there is nothing to analyse")
    check_map_finite(bm)
    update = update or _default_update(module)
    _, device = parameter_spec(bm)
    device = device or torch.device("cpu")
    start = _state(bm, state, seed, torch.float64, device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for file in PICTURES:  # a previous report's pictures: redrawn below, or gone
        (out / file).unlink(missing_ok=True)

    am = copy.deepcopy(bm).to(torch.float64).eval()  # the user's map is untouched
    report = _Analysis(am, name, described, hold, update, start, state is not None, seed,
                       steps or (100 if quick else 400), quick, out, bool(pictures))
    text = report.run(_Progress(name, len(_Analysis.SECTIONS), enabled=bool(progress)))
    (out / REPORT_NAME).write_text(text, encoding="utf-8")
    return out


class _Analysis:
    def __init__(self, m: BlockMap, name: str, described: str, hold: tuple[str, ...],
                 update: str, state: dict[str, Tensor], given_state: bool, seed: int,
                 steps: int, quick: bool, out: Path, pictures: bool) -> None:
        self.m = m
        self.given_state = given_state
        self.length_free: float | None = None
        self.name = name
        self.described = described
        self.hold = hold
        self.update = update
        self.state = state
        self.seed = seed
        self.steps = steps
        self.quick = quick
        self.out = out
        self.free = tuple(s for s in m.slots if s not in hold)
        # The state (1, *shape) of a map whose free slots' blocks mix positions is one
        # sequence of one position: the spectra take it whole (shapes without a batch).
        self.positions = bool(mixing_blocks(m, self.free))
        self.n_free = sum(m.slots[s] for s in self.free)
        self.attempt = _Run()
        self.pictures = pictures
        if pictures:
            from .plots import _matplotlib

            _, why = self.attempt("pictures", _matplotlib)
            self.pictures = why is None
        else:
            self.attempt.notes.append("pictures: not drawn (pictures=False)")
        self.lines: list[str] = []
        self.traj: dict[str, Tensor] | None = None

    # ------------------------------------------------------------------ helpers
    def gen(self, offset: int) -> torch.Generator:
        """A generator per analysis, so that one analysis does not shift another."""
        return torch.Generator().manual_seed((self.seed * 1000 + offset) % 2**64)

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def picture(self, file: str, draw: Callable[[Path], Any]) -> None:
        if not self.pictures:
            return
        target = self.out / file
        _, why = self.attempt(f"picture {file}", lambda: draw(target))
        if why is None:
            self.add("", f"![{PICTURES[file]}]({file})")
        else:
            self.add("", f"*Picture {file}: not available: {why}*")

    def unavailable(self, why: str) -> None:
        self.add("", f"Not available: {why}")

    # ------------------------------------------------------------------ sections
    #: The report's sections, in order (one progress step each).
    SECTIONS = ("header", "parameters", "structure", "impulse", "propagation", "spectrum",
                "trajectory", "fixed_points", "lyapunov", "bifurcation")

    def run(self, progress: _Progress) -> str:
        with progress:
            for section in self.SECTIONS:
                progress.start(section.replace("_", " "))
                getattr(self, section)()
                progress.done()
        self.add("", "## Notes", "")
        if self.attempt.notes:
            self.add(*[f"- {n}" for n in self.attempt.notes])
        else:
            self.add("- Every analysis completed.")
        return "\n".join(self.lines) + "\n"

    def header(self) -> None:
        m = self.m
        self.add(f"# iternn analysis: {self.name}", "",
                 f"Map: {self.described}, {len(m.slots)} slots, {len(m.edges)} blocks, "
                 f"state size {m.size} ({self.n_free} free).", "")
        held = ", ".join(f"`{s}`" for s in self.hold) or "none"
        self.add(
            f"- Held slots (kept at their value, the input): {held}",
            f"- Update: `{self.update}`",
            f"- Seed: {self.seed}; state: "
            + ("given" if self.given_state else "standard normal entries for every slot, "
               "drawn from the seed (batch 1)"),
            f"- Analysed as a float64 copy in eval mode (dropout off); {self.steps} "
            f"applications for the trajectory and the Lyapunov average"
            + (" (quick mode)" if self.quick else ""),
            "",
        )
        rows = []
        for s, n in m.slots.items():
            act = m.activation(s)
            shape = m.shapes[s]
            size = str(n) if len(shape) == 1 else f"{n} = {'x'.join(map(str, shape))}"
            rows.append([f"`{s}`", size, type(act).__name__ if act is not None else "identity",
                         "held" if s in self.hold else "free",
                         "yes" if m.bias(s) is not None else "no"])
        self.add(*_table(["slot", "size", "activation", "role", "slot bias"], rows))

    def parameters(self) -> None:
        self.add("", "## Parameters", "")
        summ, why = self.attempt("parameter counts", self.m.summary)
        if summ is None:
            self.unavailable(why)
            return
        rows = []
        for r in summ.rows:
            src = r.src if r.src is None or isinstance(r.src, str) else ", ".join(r.src)
            block = f"`{r.dst} <- {src}`" if r.src is not None else f"bias `{r.dst}`"
            if r.src is None and r.kind != "bias":
                block = f"activation `{r.dst}`"
            rows.append([block, r.kind, f"{r.shape[0]}x{r.shape[1]}",
                         _f(r.density, 3) if r.density is not None else "-",
                         f"{r.trainable:,}", f"{r.fixed:,}", f"{r.stored:,}", r.backend])
        rows.append(["**total**", "", "", "", f"**{summ.trainable:,}**", f"{summ.fixed:,}",
                     f"{summ.stored:,}", ""])
        self.add(*_table(["block (dst <- src)", "kind", "shape", "density", "trainable",
                          "fixed", "stored", "backend"], rows))
        hp = summ.hidden_proportion
        if hp is not None:
            self.add("", f"Hidden proportion n_hh / (n_hx + n_hh): {_f(hp, 4)}")

    def structure(self) -> None:
        from .plots import plot_structure

        self.add("", "## Structure and impulse-response length", "")
        rows = []
        length, why = self.attempt("structural impulse-response length",
                                   self.m.impulse_response_length)
        rows.append(["nothing held", _f(length) if why is None else f"not available: {why}"])
        self.length_free = length
        if self.hold:
            held, why = self.attempt("structural impulse-response length (held)",
                                     lambda: self.m.impulse_response_length(self.hold))
            label = ", ".join(self.hold) + " held"
            rows.append([label, _f(held) if why is None else f"not available: {why}"])
        self.add("Structural impulse-response length (applications a perturbation of the "
                 "initial state is felt for; `inf` with a cycle or a held input feeding a "
                 "block):", "")
        self.add(*_table(["iteration", "impulse-response length"], rows))
        self.block_matrix()
        self.picture("structure.png", lambda p: plot_structure(self.m, p, hold=self.hold))

    def block_matrix(self) -> None:
        """Which blocks are linear, and the size and sparsity of each one's matrix
        (:func:`~iternn.dynamics.matrix.block_matrix`); the whole of ``F`` when every
        block is linear."""
        from .matrix import block_matrix, linear_reason

        m = self.m
        if not m.edges:
            return
        rows = []
        nnz_total, linear = 0, 0
        for dst, src in m.edges:
            srcs = (src,) if isinstance(src, str) else src
            module = m.block(dst, src)
            n_out, n_in = m.slots[dst], sum(m.slots[s] for s in srcs)
            label = f"`{dst} <- {', '.join(srcs)}`"
            row = [label, type(module).__name__, f"{n_out}x{n_in}"]
            reason = linear_reason(module, len(srcs))
            if reason is not None:
                rows.append([*row, f"no: {reason}", "-", "-"])
                continue
            w, why = self.attempt(f"matrix of block {dst} <- {', '.join(srcs)}",
                                  lambda d=dst, s=src: block_matrix(m, d, s))
            if w is None:
                rows.append([*row, "yes", f"not available: {why}", "-"])
                continue
            linear += 1
            nnz = int(w._nnz())
            nnz_total += nnz
            rows.append([*row, "yes", f"{nnz:,}", _f(nnz / (n_out * n_in), 3)])
        n = m.size
        if linear == len(m.edges):
            self.add("", f"Block matrix `F` (`iternn.as_matrix`): every block is linear, so `F` "
                     f"is one {n}x{n} matrix over the packed state with {nnz_total:,} "
                     f"non-zeros (density {_f(nnz_total / (n * n), 3)}); one application is "
                     "`act(b + F z)`.", "")
        else:
            self.add("", f"Block matrix `F` (`iternn.as_matrix`): {linear} of {len(m.edges)} "
                     "blocks are linear maps with a matrix, so `F` is not one matrix (the "
                     "table says why for each other block).", "")
        self.add(*_table(["block (dst <- src)", "module", "matrix", "linear", "non-zeros",
                          "density"], rows))

    def impulse(self) -> None:
        from .plots import plot_impulse_response

        self.add("", "## Empirical impulse response", "")
        n_steps = 20 if self.quick else 50
        if self.length_free is not None and math.isfinite(self.length_free):
            n_steps = max(n_steps, int(self.length_free) + 3)
        runs: dict[str, Any] = {}

        def measure(**kw):
            try:
                return impulse_response(self.m, self.state, steps=n_steps, update=self.update,
                                        generator=self.gen(1), **kw)
            except DynamicsError:
                # Exact linear response needs forward-mode autograd through every block
                # (attention kernels lack it): measure the finite difference instead.
                return impulse_response(self.m, self.state, steps=n_steps, update=self.update,
                                        generator=self.gen(1), mode="difference", **kw)

        res, why = self.attempt("impulse response (initial state)", lambda: measure())
        if res is not None:
            runs["initial state perturbed, nothing held"] = res
        if self.hold:
            res, why2 = self.attempt("impulse response (held input)",
                                     lambda: measure(slot=self.hold, hold=self.hold))
            if res is not None:
                runs[f"held input {', '.join(self.hold)} perturbed"] = res
        if not runs:
            self.unavailable(why or "no run completed")
            return
        self.add(f"Norm of the response over the free slots after each application "
                 f"(perturbation of size {_f(next(iter(runs.values())).eps)}, mode "
                 f"`{next(iter(runs.values())).mode}`):", "")
        rows = []
        for label, r in runs.items():
            last = r.last_nonzero
            rows.append([label, _f(r.structural_length), "-" if last is None else str(last),
                         _f(r.norm[-1]), _f(r.steps)])
        self.add(*_table(["perturbation", "structural length", "last non-zero application",
                          f"norm after {n_steps} applications", "applications"], rows))
        shown = list(range(min(n_steps + 1, 12)))
        if n_steps not in shown:
            shown.append(n_steps)
        labels = list(runs)
        table = [[str(t)] + [_f(runs[k].norm[t], 4) for k in labels] for t in shown]
        self.add("", *_table(["t"] + labels, table))
        self.picture("impulse_response.png", lambda p: plot_impulse_response(runs, p))

    def propagation(self) -> None:
        """For a map with attention (:func:`_attends`): how a perturbation at one position
        of a random sequence reaches the others, application by application."""
        from .plots import plot_propagation

        if not _attends(self.m):
            return
        self.add("", "## Propagation across positions", "")
        n_all = self.m.size
        length = min(POSITIONS, 4 * DENSE_LIMIT // n_all)
        if length < 2:
            note = (f"propagation across positions: skipped, a sequence of 2 positions has "
                    f"{2 * n_all} > {4 * DENSE_LIMIT} state entries")
            self.attempt.notes.append(note)
            self.unavailable(f"skipped ({2 * n_all} > {4 * DENSE_LIMIT} state entries for 2 "
                             "positions)")
            return
        n_steps = 4 if self.quick else 8
        if self.length_free is not None and math.isfinite(self.length_free):
            n_steps = min(max(int(self.length_free), 1), 8)
        gen = self.gen(6)
        ref = self.state[next(iter(self.m.slots))]
        seq = {s: torch.randn(length, *shape, generator=gen, dtype=torch.float64)
               .to(dtype=ref.dtype, device=ref.device) for s, shape in self.m.shapes.items()}
        prop, why = self.attempt("propagation across positions", lambda: propagation(
            self.m, seq, n_steps, update=self.update).cpu())
        if prop is None:
            self.unavailable(why)
            return
        self.add(f"A random sequence of {length} positions (standard normal entries for every "
                 "slot, drawn from the seed; one unbatched sequence), nothing held: "
                 "`P_k[j, i] = ‖∂z^(k)_j / ∂z^(0)_i‖` over all slots "
                 "(`iternn.dynamics.propagation(...)[k − 1]`), how a perturbation at "
                 "position `i` reaches position `j` after `k` applications (row = "
                 "destination `j`, column = source `i`).", "")
        upper = torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)
        rows = []
        for k in range(n_steps):
            p = prop[k]
            rows.append([str(k + 1), _f(p.max()), f"{int((p > 0).sum())} of {length * length}",
                         _f(not bool((p[upper] > 0).any())),
                         _f(bool((p[~torch.eye(length, dtype=torch.bool)] > 0).all()))])
        self.add(*_table(["k", "largest ‖·‖", "non-zero entries",
                          "zero above the diagonal (causal: i > j never reached)",
                          "every other position reached"], rows))
        self.picture("propagation.png", lambda p: plot_propagation(prop, p))

    def spectrum(self) -> None:
        from .plots import plot_eigenvalues, plot_singular_values

        self.add("", "## Jacobian at the state", "")
        self.add("The Jacobian of one application with respect to the free slots "
                 f"({self.n_free} entries), at the starting state.", "")
        radius, why = self.attempt(
            "spectral radius",
            lambda: float(spectral_radius(self.m, self.state, hold=self.hold,
                                          update=self.update, generator=self.gen(2),
                                          positions=self.positions).reshape(-1)[0]))
        self.add("- Spectral radius (Krylov, Jacobian-vector products): "
                 + (_f(radius) if why is None else f"not available: {why}"))
        if self.n_free > DENSE_LIMIT:
            note = (f"dense eigenvalues and singular values: skipped, the free state has "
                    f"{self.n_free} > {DENSE_LIMIT} entries")
            self.attempt.notes.append(note)
            self.add(f"- Eigenvalues and singular values: skipped ({self.n_free} > "
                     f"{DENSE_LIMIT} free entries)")
            return
        eig, why_e = self.attempt("eigenvalues", lambda: eigenvalues(
            self.m, self.state, hold=self.hold, update=self.update,
            positions=self.positions).reshape(-1, self.n_free)[0])
        sv, why_s = self.attempt("singular values", lambda: singular_values(
            self.m, self.state, hold=self.hold, update=self.update,
            positions=self.positions).reshape(-1, self.n_free)[0])
        if eig is not None:
            self.add(f"- Largest |eigenvalue| (dense): {_f(eig.abs()[0]) if eig.numel() else '-'}")
        if sv is not None:
            self.add(f"- Largest singular value (local Lipschitz constant): "
                     f"{_f(sv[0]) if sv.numel() else '-'}; smallest: "
                     f"{_f(sv[-1]) if sv.numel() else '-'}")
        k = 8
        if eig is not None or sv is not None:
            rows = []
            for i in range(min(k, self.n_free)):
                rows.append([
                    str(i + 1),
                    _c(complex(eig[i])) if eig is not None else "-",
                    _f(eig[i].abs()) if eig is not None else "-",
                    _f(sv[i]) if sv is not None else "-",
                ])
            more = f" (the {k} largest of {self.n_free})" if self.n_free > k else ""
            self.add("", f"Eigenvalues by modulus and singular values{more}:", "")
            self.add(*_table(["i", "eigenvalue λ_i", "|λ_i|", "singular value σ_i"], rows))
        if eig is None:
            self.add(f"- Eigenvalues: not available: {why_e}")
        else:
            self.picture("eigenvalues.png", lambda p: plot_eigenvalues(eig, p))
        if sv is None:
            self.add(f"- Singular values: not available: {why_s}")
        else:
            self.picture("singular_values.png", lambda p: plot_singular_values(sv, p))

    def trajectory(self) -> None:
        from .plots import plot_trajectories

        self.add("", "## Trajectory", "")

        def run():
            with torch.no_grad():
                return iterate(self.m, self.state, self.steps, hold=self.hold,
                               trajectory=True, update=self.update)

        traj, why = self.attempt("trajectory", run)
        if traj is None:
            self.unavailable(why)
            return
        self.traj = traj
        free = torch.cat([traj[s][:, 0].flatten(1) for s in self.free], dim=-1)  # (T, n_free)
        finite = bool(torch.isfinite(free).all())
        rows = [["applications", str(self.steps)],
                ["all values finite", "yes" if finite else "no"]]
        if not finite:
            bad = int(torch.nonzero(~torch.isfinite(free).all(dim=-1)).min()) + 1
            rows.append(["first application with a non-finite value", str(bad)])
        if finite:
            rows.append(["‖z_T‖ (free slots)", _f(torch.linalg.vector_norm(free[-1]))])
            if free.shape[0] >= 2:
                rows.append(["‖z_T − z_(T−1)‖", _f(torch.linalg.vector_norm(free[-1] - free[-2]))])
        self.add(*_table(["", "value"], rows))
        path = {s: torch.cat([self.state[s].unsqueeze(0), traj[s]]).flatten(2)
                for s in self.free}  # (T + 1, 1, n) per slot
        self.picture("trajectory.png", lambda p: plot_trajectories(path, p))

    def fixed_points(self) -> None:
        self.add("", "## Fixed points", "")
        if self.hold:
            self.add(f"Fixed points of the map with {', '.join(self.hold)} held at the state's "
                     "value.", "")

        def solve():
            return fixed_point(self.m, self.state, hold=self.hold, update=self.update,
                               solver=Anderson(), max_steps=200 if self.quick else 500)

        res, why = self.attempt("fixed-point solve (Anderson)", solve)
        solved = None
        if res is not None and res[1].converged:
            solved = torch.cat([res[0][s].reshape(1, -1) for s in self.free], dim=-1)
        if res is None:
            self.add(f"- Solve from the state (Anderson): not available: {why}")
        else:
            _, info = res
            self.add(f"- Solve from the state (Anderson): converged {_f(info.converged)}, "
                     f"{info.steps} steps, residual {_f(info.residual.max())} "
                     f"(tol {_f(info.tol)}, {info.reason.value})")
        if self.positions:
            self.add("- Search from several starts: skipped (the map's blocks into the free "
                     "slots mix positions: its starts would be read as the positions of one "
                     "sequence)")
            return
        if self.n_free > DENSE_LIMIT:
            note = (f"fixed-point search: skipped, the free state has {self.n_free} > "
                    f"{DENSE_LIMIT} entries")
            self.attempt.notes.append(note)
            self.add(f"- Search from several starts: skipped ({self.n_free} > {DENSE_LIMIT} "
                     "free entries)")
            return
        n_starts = 8 if self.quick else 16
        found, why = self.attempt("fixed-point search", lambda: self._search(n_starts, solved))
        if found is None:
            self.add(f"- Search from {n_starts} starts: not available: {why}")
            return
        fp = found
        counts: dict[str, int] = {}
        for k, s in zip(fp.kind, fp.stability):
            counts[f"{s} {k} point"] = counts.get(f"{s} {k} point", 0) + 1
        summary = ", ".join(f"{v} {k}{'s' if v != 1 else ''}" for k, v in sorted(counts.items()))
        self.add(f"- Search from {fp.n_starts} starts (the solved point, states along the "
                 "trajectory and random ones; minimise ½‖z − G(z)‖², Newton polish): "
                 f"{len(fp)} distinct point{'s' if len(fp) != 1 else ''} found"
                 + (f" ({summary})" if summary else "")
                 + f", {fp.n_discarded} start{'s' if fp.n_discarded != 1 else ''} discarded "
                 "(speed above the slow-point tolerance)")
        if not len(fp):
            return
        rows = []
        shown = min(len(fp), 12)
        for i in range(shown):
            point = fp.points[i]
            head = ", ".join(_f(v, 4) for v in point[:3].tolist())
            if point.numel() > 3:
                head += ", …"
            rows.append([str(i + 1), fp.kind[i], fp.stability[i], _f(fp.q[i], 3),
                         _f(fp.spectral_radius[i]), _f(torch.linalg.vector_norm(point)),
                         head])
        self.add("", *_table(["#", "kind", "stability", "speed q", "max |λ|", "‖z*‖",
                              f"z* ({', '.join(self.free)}; first entries)"], rows))
        if shown < len(fp):
            self.add("", f"({len(fp) - shown} more not shown.)")

    def _search(self, n_starts: int, solved: Tensor | None):
        """Starts: the solved fixed point (if any), then half states along the trajectory
        (plus a little noise), half standard normal draws."""
        gen = self.gen(3)
        n_random = n_starts // 2
        n_traj = n_starts - n_random
        parts = [torch.randn(n_random, self.n_free, generator=gen, dtype=torch.float64)]
        free = None
        if self.traj is not None:
            free = torch.cat([self.traj[s][:, 0].flatten(1) for s in self.free], dim=-1).cpu()
            free = free[torch.isfinite(free).all(dim=-1)]
        if free is not None and free.shape[0]:
            pick = torch.randint(free.shape[0], (n_traj,), generator=gen)
            noise = torch.randn(n_traj, self.n_free, generator=gen, dtype=torch.float64)
            parts.append(free[pick].to(torch.float64) + 0.1 * noise)
        else:
            parts.append(torch.randn(n_traj, self.n_free, generator=gen, dtype=torch.float64))
        if solved is not None:
            parts.insert(0, solved.detach().cpu().to(torch.float64))
        z = torch.cat(parts).to(self.state[self.free[0]].device)
        starts: dict[str, Tensor] = {}
        off = 0
        for s in self.free:
            n = self.m.slots[s]
            starts[s] = z[:, off:off + n].reshape(-1, *self.m.shapes[s])
            off += n
        for s in self.hold:
            starts[s] = self.state[s]
        return find_fixed_points(self.m, starts, hold=self.hold, update=self.update,
                                 opt_steps=200 if self.quick else 600)

    def lyapunov(self) -> None:
        from .plots import plot_lyapunov

        self.add("", "## Lyapunov exponents", "")
        warmup = self.steps // 4
        k = min(3 if self.quick else 5, self.n_free)
        spec, why = self.attempt("Lyapunov spectrum", lambda: lyapunov_spectrum(
            self.m, self.state, steps=self.steps, hold=self.hold, k=k, warmup=warmup,
            update=self.update, generator=self.gen(5),
            positions=self.positions).reshape(-1, k)[0])
        largest = None if spec is None else float(spec[0])
        self.add(f"Natural log per application, averaged over {self.steps} applications after "
                 f"{warmup} warm-up applications (QR method, the {k} leading exponents).", "")
        if largest is None:
            self.add(f"- Largest Lyapunov exponent: not available: {why}")
        else:
            if math.isinf(largest) and largest < 0:
                meaning = ("the free slots form no cycle: every perturbation vanishes after "
                           "finitely many applications")
            elif largest > 1e-3:
                meaning = "positive: nearby trajectories separate (chaos)"
            elif largest < -1e-3:
                meaning = "negative: nearby trajectories converge (a stable orbit)"
            else:
                meaning = "about zero: marginal (a neutral direction, e.g. a cycle or a drift)"
            self.add(f"- Largest Lyapunov exponent: {_f(largest)} — {meaning}")
        if spec is None:
            return
        self.add("", *_table(["i", "λ_i"], [[str(i + 1), _f(v)] for i, v in
                                           enumerate(spec.tolist())]))
        self.picture("lyapunov.png", lambda p: plot_lyapunov(spec, p))

    def bifurcation(self) -> None:
        from .plots import _draw_bifurcation, bifurcation_data

        self.add("", "## Bifurcation diagram", "")
        n_params = 31 if self.quick else 81
        n_steps = 100 if self.quick else 300
        keep = 20 if self.quick else 60
        params = torch.linspace(0.0, 2.0, n_params, dtype=torch.float64)
        data, why = self.attempt("bifurcation diagram", lambda: bifurcation_data(
            self.m, self.state, param_values=params, hold=self.hold, steps=n_steps, keep=keep,
            update=self.update))
        if data is None:
            self.unavailable(why)
            return
        self.add(f"Parameter: {data.parameter}, from 0 to 2 ({n_params} values; 1 is the map "
                 f"as saved); coordinate `{data.slot}[{data.index}]`, last {keep} of "
                 f"{n_steps} applications.")
        self.picture("bifurcation.png", lambda p: _draw_bifurcation(data, p, None))
