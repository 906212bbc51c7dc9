"""The block pattern grammar: compact text specs for sparse and structured blocks.

A spec such as ``"R=0.1 kaiming"`` or ``"Row=8;G=0,0.01;fixed"`` names a sparsity
pattern, optionally an initialisation, and optionally ``fixed``. :func:`parse_spec`
turns the text into a :class:`BlockSpec`; :func:`make_block` turns a spec and a block
shape (``rows`` = destination/output size, ``cols`` = source/input size) into a module.

Grammar
-------
::

    spec    := token (SEP token)*          SEP = one or more of whitespace and ';'
    token   := pattern | init | "fixed"    (no spaces inside a token; names are
                                            case-sensitive; tokens in any order)
    pattern := "0" | "W" | "D" | "I"
             | "R=" FLOAT | "S=" INT | "Row=" INT | "LR=" INT | "BD=" INT
    init    := "G=" FLOAT "," FLOAT | "U=" FLOAT "," FLOAT | "C=" FLOAT
             | "kaiming" | "xavier" | "orthogonal"
    INT     := [0-9]+                              (decimal digits only)
    FLOAT   := [+-]? ([0-9]+ ("." [0-9]*)? | "." [0-9]+) ([eE] [+-]? [0-9]+)?   (finite)

A spec has exactly one pattern, at most one init and at most one ``fixed``.

Patterns (a ``rows x cols`` block; the module :func:`make_block` returns):

- ``0``: absent (zero) block -> ``None``.
- ``W``: dense -> ``nn.Linear(cols, rows, bias=False)``.
- ``D``: diagonal, square blocks only -> :class:`DiagonalLinear`.
- ``I``: identity, square blocks only, no parameters -> ``nn.Identity``.
- ``R=p``: ``round(p*rows*cols)`` random entries, ``0 < p <= 1`` -> ``SparseLinear``.
- ``S=n``: exactly ``n`` random entries, ``1 <= n <= rows*cols`` -> ``SparseLinear``.
- ``Row=n``: exactly ``n`` random entries in every row, ``1 <= n <= cols`` ->
  ``SparseLinear``.
- ``LR=r``: rank ``r``, ``1 <= r <= min(rows, cols)`` -> :class:`LowRankLinear`.
- ``BD=k``: ``k`` equal diagonal blocks, ``k`` divides ``rows`` and ``cols`` ->
  :class:`BlockDiagonalLinear`.

Random patterns are drawn uniformly without replacement, so every stored position is
distinct: ``R``/``S`` through :func:`iternn.sparse.sampling.random_indices`, ``Row``
row by row. **Rounding of** ``R=p``: the entry count is Python's ``round`` of the
float64 product ``p * cols * rows``, i.e. round-half-to-even (``R=0.25`` on a 2x5
block gives 2 entries, on a 2x7 block 4) — the same expression, hence the same count,
as ``SparseLinear(density=p)``.
There is **no minimum**: a tiny block whose count rounds to 0 becomes a
``SparseLinear`` with no entries (an all-zero block that stays in the map and has no
trainable entries), so entry budgets stay exact; write ``S=1`` to force one entry.

Initialisations apply to the *stored* entries only (``R``/``S``/``Row``: the
``values`` of the stored positions; ``W``: the weight; ``D``: the diagonal; ``LR``:
both factors ``v`` then ``u``; ``BD``: all blocks). Let ``f_i`` be the **effective
fan-in** of row ``i`` (stored entries in row ``i`` of the parameter's matrix) and
``g_j`` the effective fan-out of column ``j`` (stored entries in column ``j``). For a
dense ``rows x cols`` weight ``f_i = cols`` and ``g_j = rows``; for ``D`` both are 1;
for ``BD=k`` they are ``cols/k`` and ``rows/k``; for ``LR=r`` the factor ``v`` (r x
cols) has ``f = cols, g = r`` and ``u`` (rows x r) has ``f = r, g = rows``.

- ``G=mu,sigma``: ``N(mu, sigma^2)``, ``sigma >= 0``.
- ``U=a,b``: ``U(a, b)``, ``a <= b``.
- ``C=v``: the constant ``v``.
- ``kaiming``: ``N(0, 2 / f_i)`` for entry ``(i, j)`` (He, fan-in mode, ReLU gain).
- ``xavier``: ``U(-s, s)`` with ``s = sqrt(6 / (f_i + g_j))`` for entry ``(i, j)``
  (Glorot; for a dense block this is the usual ``sqrt(6 / (cols + rows))``).
- ``orthogonal``: ``W``: a Haar-random semi-orthogonal matrix (orthonormal rows if
  ``rows <= cols``, else orthonormal columns); ``LR``: ``u`` with orthonormal columns
  and ``v`` with orthonormal rows (``u v`` is a partial isometry of rank ``r``);
  ``BD``: every block semi-orthogonal; ``D``: random signs ``+-1`` (the only
  orthogonal diagonal matrices). It is rejected for ``R``/``S``/``Row``: a random
  sparse pattern has in general no orthogonal matrix supported on it.
- no init (the default): ``U(-1/sqrt(f_i), 1/sqrt(f_i))`` — ``nn.Linear``'s default,
  with the effective fan-in — except ``D``, which starts as the identity (all ones).

``fixed`` sets ``requires_grad=False`` on the block's parameters. ``0`` and ``I``
have no parameters and take neither an init nor ``fixed``. Blocks never carry a bias
(a block map has one per slot).

Randomness: every draw (pattern, then values) comes from the ``generator`` passed to
:func:`make_block`; the global RNG is not touched when one is given (with
``generator=None`` torch's default generator is used, as ``torch.rand`` does). The
same generator state gives an identical pattern and identical values.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..core.memory import check_bytes, tensor_bytes
from ..errors import MapError, MapTypeError, PatternError
from .linear import SparseLinear
from .sampling import random_indices
from .structured import (
    BlockDiagonalLinear,
    DiagonalLinear,
    LowRankLinear,
    _fill_,
    _normal,
    _orthogonal,
    _uniform,
)

__all__ = ["BlockSpec", "PatternError", "parse_spec", "make_block", "PATTERNS", "INITS"]

#: Pattern kinds -> argument type (None: no argument).
PATTERNS: dict[str, type | None] = {
    "0": None, "W": None, "D": None, "I": None,
    "R": float, "S": int, "Row": int, "LR": int, "BD": int,
}
#: Init kinds -> number of float arguments (0: a bare word).
INITS: dict[str, int] = {"G": 2, "U": 2, "C": 1, "kaiming": 0, "xavier": 0, "orthogonal": 0}
_FIXED = "fixed"
_SPARSE = frozenset({"R", "S", "Row"})
_NO_PARAMS = frozenset({"0", "I"})

_INT_RE = re.compile(r"[0-9]+\Z")
_FLOAT_RE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\Z")
_SEP_RE = re.compile(r"[\s;]+")


# --------------------------------------------------------------------------- numbers


def _fmt(x: float | int) -> str:
    """Canonical text of a number: ints as digits, floats by ``repr`` less a trailing ``.0``."""
    if isinstance(x, int):
        return str(x)
    text = repr(float(x))
    return text[:-2] if text.endswith(".0") else text


def _parse_int(text: str, token: str, spec: str | None) -> int:
    if not _INT_RE.match(text):
        raise PatternError(token, f"needs a positive integer written in digits, got {text!r}", spec)
    return int(text)


def _parse_float(text: str, token: str, spec: str | None) -> float:
    if not _FLOAT_RE.match(text):
        raise PatternError(token, f"{text!r} is not a decimal number", spec)
    value = float(text)
    if not math.isfinite(value):
        raise PatternError(token, f"{text!r} is not finite", spec)
    return value


# --------------------------------------------------------------------------- checks


def _check_pattern(kind: str, arg, token: str, spec: str | None) -> None:
    """Range checks of a pattern's argument that need no block shape."""
    if kind == "R":
        if not 0 < arg <= 1:
            raise PatternError(token, f"density p must satisfy 0 < p <= 1, got {_fmt(arg)}", spec)
    elif PATTERNS[kind] is int and arg < 1:
        what = {"S": "entries", "Row": "entries per row", "LR": "rank", "BD": "diagonal blocks"}
        raise PatternError(token, f"{kind}=n needs n >= 1 ({what[kind]}), got {arg}", spec)


def _check_init(kind: str, args: tuple[float, ...], token: str, spec: str | None) -> None:
    if kind == "G" and args[1] < 0:
        raise PatternError(token, f"G=mu,sigma needs sigma >= 0, got {_fmt(args[1])}", spec)
    if kind == "U" and args[0] > args[1]:
        raise PatternError(
            token, f"U=a,b needs a <= b, got a={_fmt(args[0])} > b={_fmt(args[1])}", spec
        )


def _check_combination(pattern: str, p_token: str, init: str | None, i_token: str | None,
                       trainable: bool, spec: str | None) -> None:
    if pattern in _NO_PARAMS:
        if init is not None:
            raise PatternError(
                i_token, f"pattern {p_token!r} has no parameters to initialise", spec
            )
        if not trainable:
            raise PatternError(_FIXED, f"pattern {p_token!r} has no parameters to fix", spec)
    if init == "orthogonal" and pattern in _SPARSE:
        raise PatternError(
            i_token,
            f"orthogonal init is defined for W, D, LR and BD blocks, not for the random "
            f"sparse pattern {p_token!r}",
            spec,
        )


# --------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class BlockSpec:
    """A parsed block spec: pattern kind and argument, init kind and arguments, trainable.

    ``pattern`` is a key of :data:`PATTERNS` (``"R"``, ``"Row"``, ...) and ``arg`` its
    argument (``float`` for ``R``, ``int`` for ``S``/``Row``/``LR``/``BD``, ``None``
    otherwise); ``init`` is a key of :data:`INITS` or ``None`` (the default init) and
    ``init_args`` its float arguments; ``trainable=False`` is the ``fixed`` flag.
    ``str(spec)`` is the canonical text, and ``parse_spec(str(spec)) == spec``.
    Constructing one directly validates it like :func:`parse_spec` does.
    """

    pattern: str
    arg: int | float | None = None
    init: str | None = None
    init_args: tuple[float, ...] = ()
    trainable: bool = True

    def __post_init__(self) -> None:
        if self.pattern not in PATTERNS:
            raise PatternError(str(self.pattern), f"unknown pattern; known: {list(PATTERNS)}")
        kind = PATTERNS[self.pattern]
        arg = self.arg
        if kind is None:
            if arg is not None:
                raise PatternError(self.pattern, f"pattern {self.pattern!r} takes no argument")
        elif kind is int:
            if isinstance(arg, bool) or not isinstance(arg, int):
                raise PatternError(f"{self.pattern}={arg}", "the argument must be an int")
        else:
            if isinstance(arg, bool) or not isinstance(arg, (int, float)):
                raise PatternError(f"{self.pattern}={arg}", "the argument must be a number")
            arg = float(arg)
            if not math.isfinite(arg):
                raise PatternError(f"{self.pattern}={arg}", "the argument must be finite")
            object.__setattr__(self, "arg", arg)
        _check_pattern(self.pattern, self.arg, self.pattern_token, None)

        if self.init is not None:
            if self.init not in INITS:
                raise PatternError(str(self.init), f"unknown init; known: {list(INITS)}")
            args = tuple(self.init_args)
            if len(args) != INITS[self.init] or any(
                isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a)
                for a in args
            ):
                raise PatternError(
                    f"{self.init}={args}", f"init {self.init!r} takes {INITS[self.init]} "
                    f"finite number(s), got {args!r}"
                )
            object.__setattr__(self, "init_args", tuple(float(a) for a in args))
            _check_init(self.init, self.init_args, self.init_token, None)
        elif tuple(self.init_args):
            raise PatternError(repr(self.init_args), "init_args given without an init")
        else:
            object.__setattr__(self, "init_args", ())
        if not isinstance(self.trainable, bool):
            raise MapTypeError(f"trainable must be a bool, got {type(self.trainable).__name__}")
        _check_combination(self.pattern, self.pattern_token, self.init, self.init_token,
                           self.trainable, None)

    @property
    def pattern_token(self) -> str:
        """Canonical text of the pattern token, e.g. ``"R=0.5"``."""
        return self.pattern if self.arg is None else f"{self.pattern}={_fmt(self.arg)}"

    @property
    def init_token(self) -> str | None:
        """Canonical text of the init token (``None`` for the default init)."""
        if self.init is None:
            return None
        if not self.init_args:
            return self.init
        return f"{self.init}=" + ",".join(_fmt(a) for a in self.init_args)

    def __str__(self) -> str:
        parts = [self.pattern_token]
        if self.init is not None:
            parts.append(self.init_token)
        if not self.trainable:
            parts.append(_FIXED)
        return " ".join(parts)


def _tokens(text: str) -> list[str]:
    return [t for t in _SEP_RE.split(text) if t]


def _hint(name: str) -> str:
    known = [*PATTERNS, *INITS, _FIXED]
    for k in known:
        if k.lower() == name.lower():
            return f" (did you mean {k!r}?)"
    return ""


def parse_spec(text: str) -> BlockSpec:
    """Parse a block spec such as ``"R=0.1 kaiming fixed"`` (grammar: module docstring).

    Raises :class:`PatternError` (a ``ValueError``) quoting the offending token for
    unknown tokens, malformed or out-of-range numbers, a missing argument, duplicate
    pattern/init/``fixed`` tokens, and combinations that make no sense (an init or
    ``fixed`` on ``0``/``I``, ``orthogonal`` on a random sparse pattern). Errors that
    depend on the block's shape are raised by :func:`make_block`.
    """
    if not isinstance(text, str):
        raise MapTypeError(f"a block spec must be a str, got {type(text).__name__}")
    tokens = _tokens(text)
    if not tokens:
        raise PatternError(text, "empty spec: it needs a pattern token (e.g. 'W', 'R=0.1')")
    pattern = arg = p_token = None
    init = i_token = None
    init_args: tuple[float, ...] = ()
    fixed_token = None
    for token in tokens:
        name, eq, rest = token.partition("=")
        if token == _FIXED:
            if fixed_token is not None:
                raise PatternError(token, "'fixed' given twice", text)
            fixed_token = token
        elif name in PATTERNS:
            if pattern is not None:
                raise PatternError(
                    token, f"a spec has one pattern, and {p_token!r} came first", text
                )
            kind = PATTERNS[name]
            if kind is None:
                if eq:
                    raise PatternError(token, f"pattern {name!r} takes no argument", text)
                value = None
            else:
                if not eq or not rest:
                    raise PatternError(token, f"pattern {name!r} needs an argument: "
                                       f"{name}={'p' if kind is float else 'n'}", text)
                if kind is int:
                    value = _parse_int(rest, token, text)
                else:
                    value = _parse_float(rest, token, text)
                _check_pattern(name, value, token, text)
            pattern, arg, p_token = name, value, token
        elif name in INITS:
            if init is not None:
                raise PatternError(token, f"a spec has one init, and {i_token!r} came first", text)
            n_args = INITS[name]
            if n_args == 0:
                if eq:
                    raise PatternError(token, f"init {name!r} takes no argument", text)
                values: tuple[float, ...] = ()
            else:
                if not eq or not rest:
                    form = {"G": "G=mu,sigma", "U": "U=a,b", "C": "C=v"}[name]
                    raise PatternError(token, f"init {name!r} needs arguments: {form}", text)
                parts = rest.split(",")
                if len(parts) != n_args:
                    form = {"G": "G=mu,sigma", "U": "U=a,b", "C": "C=v"}[name]
                    raise PatternError(
                        token, f"init {name!r} takes {n_args} comma-separated number(s) "
                        f"({form}), got {rest!r}", text
                    )
                values = tuple(_parse_float(p, token, text) for p in parts)
                _check_init(name, values, token, text)
            init, init_args, i_token = name, values, token
        else:
            raise PatternError(token, f"unknown token{_hint(name)}; patterns are "
                               f"0 W D I R=p S=n Row=n LR=r BD=k, inits G=mu,sigma U=a,b "
                               f"C=v kaiming xavier orthogonal, and 'fixed'", text)
    if pattern is None:
        raise PatternError(text, "no pattern token (e.g. 'W', 'R=0.1', 'S=100')")
    _check_combination(pattern, p_token, init, i_token, fixed_token is None, text)
    return BlockSpec(pattern, arg, init, init_args, fixed_token is None)


# --------------------------------------------------------------------------- sampling


def _row_indices(rows: int, cols: int, n: int, generator: torch.Generator | None,
                 *, draws: int | None = None) -> Tensor:
    """``(2, rows*n)`` positions: ``n`` distinct uniformly random columns in every row.

    Sorted row-major. For ``2n >= cols`` a random permutation per row (argsort of
    uniform keys, in chunks of rows), else the first ``n`` distinct values of a stream
    of uniform column draws per row (sequential sampling without replacement, hence
    uniform over ``n``-subsets), redrawing the rare rows whose stream was too short.
    Memory is ``O(rows * n)`` apart from the bounded chunks. ``draws`` overrides the
    initial stream length (tests use it to exercise the redraws).
    """
    dev = generator.device if generator is not None else torch.device("cpu")
    chosen = torch.empty(rows, n, dtype=torch.long, device=dev)
    if 2 * n >= cols:
        step = max(1, (1 << 22) // cols)
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            keys = torch.rand(stop - start, cols, generator=generator, dtype=torch.float64,
                              device=dev)
            chosen[start:stop] = keys.argsort(dim=1)[:, :n].sort(dim=1).values
    else:
        # Expected draws to see n distinct of cols: sum_t cols/(cols-t) < 2n here.
        expected = sum(cols / (cols - t) for t in range(n))
        m = int(math.ceil(expected + 6.0 * math.sqrt(2.0 * n))) + 8 if draws is None else draws
        pending = torch.arange(rows, device=dev)
        while pending.numel():
            cand = torch.randint(cols, (pending.numel(), m), generator=generator, device=dev)
            srt, order = cand.sort(dim=1, stable=True)
            first_sorted = torch.ones_like(srt, dtype=torch.bool)
            first_sorted[:, 1:] = srt[:, 1:] != srt[:, :-1]
            first = torch.empty_like(first_sorted).scatter_(1, order, first_sorted)
            rank = first.cumsum(dim=1)
            ok = rank[:, -1] >= n
            take = first & (rank <= n)
            sel = cand[ok][take[ok]].view(-1, n)
            chosen[pending[ok]] = sel.sort(dim=1).values
            pending = pending[~ok]
            m *= 2
    row_idx = torch.arange(rows, device=dev).repeat_interleave(n)
    return torch.stack([row_idx, chosen.reshape(-1)])


# --------------------------------------------------------------------------- make_block


def _shape_error(spec: BlockSpec, rows: int, cols: int, message: str) -> PatternError:
    return PatternError(
        spec.pattern_token,
        f"does not fit a {rows}x{cols} block (rows x cols = destination x source): {message}",
        str(spec),
    )


def _size(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise MapTypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise MapError(f"{name} must be positive, got {value}")
    return value


def _counts(index: Tensor, size: int) -> Tensor:
    return torch.bincount(index, minlength=size).to(torch.float64)


#: Bytes per stored entry a sparse block needs while it is built: the (2, n) int64
#: positions, the CSR and transposed pattern with its permutation, the values and their
#: float64 draws.
_SPARSE_ENTRY_BYTES = 48


def _check_size(spec: BlockSpec, rows: int, cols: int) -> None:
    """Refuse (:class:`~iternn.errors.SizeError`) a block too large for this machine
    before anything is allocated, naming the token."""
    kind, arg = spec.pattern, spec.arg
    entries = {"W": rows * cols, "D": rows, "I": 0, "LR": (arg or 0) * (rows + cols),
               "BD": rows * cols // (arg or 1), "R": round((arg or 0) * cols * rows),
               "S": arg or 0, "Row": rows * (arg or 0)}[kind]
    # dense kinds: the parameter (default dtype) and the float64 draws of its init
    per = _SPARSE_ENTRY_BYTES if kind in _SPARSE else tensor_bytes(1, torch.get_default_dtype()) + 8
    check_bytes(entries * per, f"block {spec.pattern_token!r} ({rows} x {cols}, {entries} entries)")


def make_block(
    spec: BlockSpec | str,
    rows: int,
    cols: int,
    *,
    generator: torch.Generator | None = None,
    backend: str = "auto",
) -> nn.Module | None:
    """Build the ``rows x cols`` block (``rows`` outputs, ``cols`` inputs) that ``spec`` names.

    Returns ``None`` for ``0``, ``nn.Identity`` for ``I``, ``nn.Linear`` (no bias) for
    ``W``, :class:`DiagonalLinear`, :class:`LowRankLinear` or
    :class:`BlockDiagonalLinear` (no bias) for ``D``/``LR``/``BD``, and
    ``SparseLinear(cols, rows, indices=..., bias=False, backend=backend)`` for
    ``R``/``S``/``Row``. ``backend`` is passed to ``SparseLinear`` and ignored by the
    other kinds. Draws the pattern, then the values, from ``generator``; see the module
    docstring for counts, rounding and init formulas. Raises :class:`PatternError` naming
    the token and the shape when the pattern cannot fit the block (``S=n`` with
    ``n > rows*cols``, ``Row=n`` with ``n > cols``, ``D``/``I`` on a non-square block,
    ``BD=k`` not dividing both sizes, ``LR=r`` with ``r > min(rows, cols)``), and
    :class:`~iternn.errors.SizeError` naming the token when the block needs more memory
    than this machine has (checked before anything is allocated).
    """
    if isinstance(spec, str):
        spec = parse_spec(spec)
    elif not isinstance(spec, BlockSpec):
        raise MapTypeError(f"spec must be a BlockSpec or a str, got {type(spec).__name__}")
    rows = _size(rows, "rows")
    cols = _size(cols, "cols")
    kind, arg = spec.pattern, spec.arg

    if kind == "0":
        return None
    if kind in ("I", "D") and rows != cols:
        raise _shape_error(spec, rows, cols, f"{kind} needs a square block")
    if kind == "I":
        return nn.Identity()

    # (parameter, fan-in f, fan-out g) for every weight tensor, in draw order.
    targets: list[tuple[Tensor, Tensor | float, Tensor | float]]
    if kind == "S" and arg > rows * cols:
        raise _shape_error(spec, rows, cols, f"S=n needs n <= rows*cols = {rows * cols}")
    if kind == "Row" and arg > cols:
        raise _shape_error(spec, rows, cols, f"Row=n needs n <= cols = {cols}")
    if kind == "LR" and arg > min(rows, cols):
        raise _shape_error(spec, rows, cols, f"LR=r needs r <= min(rows, cols) = {min(rows, cols)}")
    if kind == "BD" and (rows % arg or cols % arg):
        raise _shape_error(spec, rows, cols, f"BD=k needs k to divide both {rows} and {cols}")
    _check_size(spec, rows, cols)

    if kind in _SPARSE:
        if kind == "Row":
            indices = _row_indices(rows, cols, arg, generator)
        else:
            # The same float expression as SparseLinear(density=p): the same count.
            k = round(arg * cols * rows) if kind == "R" else arg
            indices = random_indices(rows, cols, k, generator=generator)
        # SparseLinear's own default init is this module's default, U(+-1/sqrt(f_i)), drawn
        # from the same generator: without an INIT token it is kept, so "R=p" gives the
        # very block SparseLinear(density=p) gives from the same seed.
        block = SparseLinear(cols, rows, indices=indices.cpu(), bias=False,
                             generator=generator, backend=backend)
        if spec.init is None:
            targets = []
        else:
            stored = block.indices().cpu()
            f = _counts(stored[0], rows)[stored[0]]
            g = _counts(stored[1], cols)[stored[1]]
            targets = [(block.values, f, g)]
    elif kind == "W":
        block = torch.nn.utils.skip_init(nn.Linear, cols, rows, bias=False)
        targets = [(block.weight, float(cols), float(rows))]
    elif kind == "D":
        block = DiagonalLinear(rows)
        targets = [(block.diagonal, 1.0, 1.0)]
    elif kind == "LR":
        block = torch.nn.utils.skip_init(LowRankLinear, cols, rows, rank=arg, bias=False)
        targets = [(block.v, float(cols), float(arg)), (block.u, float(arg), float(rows))]
    else:  # BD
        block = torch.nn.utils.skip_init(BlockDiagonalLinear, cols, rows, blocks=arg, bias=False)
        targets = [(block.weight, float(cols // arg), float(rows // arg))]

    _initialise(spec, kind, targets, generator)
    if not spec.trainable:
        for p in block.parameters():
            p.requires_grad_(False)
    return block


def _initialise(spec: BlockSpec, kind: str, targets, generator) -> None:
    init, a = spec.init, spec.init_args
    for param, f, g in targets:
        shape = param.shape
        if param.numel() == 0:
            continue
        if init is None:
            if kind == "D":
                values = torch.ones(shape, dtype=torch.float64)
            else:
                bound = 1.0 / torch.sqrt(torch.as_tensor(f, dtype=torch.float64))
                values = _uniform(shape, -bound, bound, generator)
        elif init == "G":
            values = _normal(shape, a[0], a[1], generator)
        elif init == "U":
            values = _uniform(shape, a[0], a[1], generator)
        elif init == "C":
            values = torch.full(shape, a[0], dtype=torch.float64)
        elif init == "kaiming":
            std = torch.sqrt(2.0 / torch.as_tensor(f, dtype=torch.float64))
            values = _normal(shape, 0.0, std, generator)
        elif init == "xavier":
            f_t = torch.as_tensor(f, dtype=torch.float64)
            g_t = torch.as_tensor(g, dtype=torch.float64)
            bound = torch.sqrt(6.0 / (f_t + g_t))
            values = _uniform(shape, -bound, bound, generator)
        else:  # orthogonal (rejected for sparse patterns by BlockSpec)
            if kind == "D":
                u = torch.rand(shape, generator=generator, dtype=torch.float64,
                               device=generator.device if generator is not None else None)
                values = torch.where(u < 0.5, -1.0, 1.0)
            else:
                values = _orthogonal(tuple(shape), generator)
        _fill_(param, values)
