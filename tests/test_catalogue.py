"""The catalogue of bad input and faults: every public entry point refuses what it cannot do.

Each case gives one bad input (or one fault) to the API or the ``iternn`` command line and
asserts the named error: its iternn class (under :class:`iternn.IterNNError`), its built-in
base (``ValueError``, ``TypeError``, ``RuntimeError``, ``MemoryError``), and that the
message names the slot, block, key, option, flag, token or path at fault. Fault cases
assert the safe outcome instead (nothing lost, process alive, exit code).

Every case runs under a memory cap (the autouse fixture :func:`memory_cap`): a case that
would allocate gigabytes fails fast instead of hurting the machine, and iternn's own size
checks (:func:`iternn.core.memory.available_bytes` reads the rlimits) see the cap. Cases
where a missing check would crash the interpreter (a segfault in a native kernel or in
LAPACK) run in a forked child, so a crash fails one case, not the session.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import re
import resource
import select
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import iternn
from iternn import dynamics as dyn
from iternn.errors import (
    ConfigError,
    ConvergenceError,
    ConversionError,
    DataError,
    DynamicsError,
    FormatError,
    IterNNError,
    MapError,
    MapTypeError,
    PatternError,
    ResumeError,
    SizeError,
    StudyError,
)

# ----------------------------------------------------------------------------- the memory cap

#: Room each case gets above what the process already maps.
CAP_ROOM = int(1.5 * 2**30)


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


@pytest.fixture(autouse=True)
def memory_cap():
    """Lower the soft ``RLIMIT_AS`` to the current virtual size + :data:`CAP_ROOM` for one
    case, and restore it afterwards (torch's large reservations are counted in the
    current size, so the cap is relative to it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _proc_status("VmSize") + CAP_ROOM
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    if soft != resource.RLIM_INFINITY:
        cap = min(cap, soft)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield cap
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def test_memory_cap_is_in_force(memory_cap):
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    assert soft == memory_cap
    with pytest.raises((RuntimeError, MemoryError)):
        torch.empty(2**30, dtype=torch.float32)  # 4 GiB
    # iternn's size checks see the cap
    from iternn.core.memory import available_bytes

    assert available_bytes() <= CAP_ROOM + 2**26


# ----------------------------------------------------------------------------- helpers


def _check(err: BaseException, kind: type, base: type, patterns) -> None:
    assert isinstance(err, IterNNError), f"{type(err).__name__} is not an IterNNError: {err}"
    assert isinstance(err, kind), f"expected {kind.__name__}, got {type(err).__name__}: {err}"
    assert isinstance(err, base), f"{type(err).__name__} is not a {base.__name__}"
    text = str(err)
    for p in patterns:
        assert re.search(p, text), f"message does not name {p!r}: {text}"


def _raises(fn, kind: type, base: type, patterns) -> BaseException:
    try:
        fn()
    except BaseException as err:  # noqa: BLE001 - inspected below
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise
        _check(err, kind, base, patterns)
        return err
    pytest.fail(f"no error: expected {kind.__name__} naming {patterns}")


def _forked(fn, timeout: float = 120.0):
    """Run ``fn()`` in a forked child; return its result or re-raise its exception here.

    A child killed by a signal (a segfault in native code) fails the case with the
    signal's name instead of killing the test session."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(r)
            # the OpenMP pools of the parent do not survive fork: run the child serially
            torch.set_num_threads(1)
            try:
                out = ("ok", fn())
            except BaseException as exc:  # noqa: BLE001 - sent to the parent
                out = ("raised", exc)
            try:
                data = pickle.dumps(out)
            except Exception:  # noqa: BLE001
                data = pickle.dumps(("raised", RuntimeError(f"unpicklable: {out[1]!r}")))
            with os.fdopen(w, "wb") as f:
                f.write(data)
        except BaseException:  # noqa: BLE001
            code = 3
        finally:
            os._exit(code)
    os.close(w)
    chunks, deadline = [], time.monotonic() + timeout
    with os.fdopen(r, "rb") as f:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail(f"child did not finish in {timeout} s")
            ready, _, _ = select.select([f], [], [], left)
            if ready:
                chunk = os.read(f.fileno(), 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        pytest.fail(f"the process crashed: killed by {signal.Signals(os.WTERMSIG(status)).name}")
    what, value = pickle.loads(b"".join(chunks))
    if what == "raised":
        raise value
    return value


def _mlp_map() -> iternn.BlockMap:
    m = iternn.BlockMap({"x": 3, "h": 8, "y": 2})
    m.connect("h", "x", nn.Linear(3, 8, bias=False))
    m.connect("y", "h", nn.Linear(8, 2))
    m.set_activation("h", nn.Tanh())
    return m


def _rec(n: int = 4, *, scale: float = 0.5, dtype=torch.float64) -> iternn.BlockMap:
    """x -> h with a contracting h <- h feedback (float64 unless told)."""
    g = torch.Generator().manual_seed(0)
    m = iternn.BlockMap({"x": 2, "h": n})
    hx = nn.Linear(2, n, dtype=dtype)
    hh = nn.Linear(n, n, bias=False, dtype=dtype)
    with torch.no_grad():
        hx.weight.copy_(torch.randn(n, 2, generator=g, dtype=dtype))
        w = torch.randn(n, n, generator=g, dtype=dtype)
        hh.weight.copy_(scale * w / torch.linalg.matrix_norm(w, 2))
    m.connect("h", "x", hx)
    m.connect("h", "h", hh)
    m.set_activation("h", nn.Tanh())
    return m


def _s(m: iternn.BlockMap, batch=(1,), **given):
    g = torch.Generator().manual_seed(1)
    dtype = next(m.parameters()).dtype
    out = {"x": torch.randn(*batch, m.slots["x"], generator=g, dtype=dtype)}
    out.update(given)
    return out


def _rec_y() -> iternn.BlockMap:
    """:func:`_rec` with an output slot ``y`` read from ``h``."""
    m = iternn.BlockMap({"x": 2, "h": 4, "y": 1})
    m.connect("h", "x", nn.Linear(2, 4))
    m.connect("h", "h", nn.Linear(4, 4, bias=False))
    m.connect("y", "h", nn.Linear(4, 1))
    return m


def _nan_map() -> iternn.BlockMap:
    m = _rec(dtype=torch.float32)
    with torch.no_grad():
        m.block("h", "h").weight[1, 2] = float("nan")
    return m


class _Slice(nn.Module):
    """An opaque module (no in/out_features) that drops features."""

    def forward(self, x):
        return x[..., :2]


class _Opaque(nn.Module):
    """A module with no codec."""

    def forward(self, x):
        return x


# ============================================================================= maps and engine
# (core/engine: MapError for a bad value, MapTypeError for a bad type)

def _connect_twice():
    m = _mlp_map()
    m.connect("h", "x", nn.Linear(3, 8))


def _bias_dtype():
    m = _mlp_map()  # float32 parameters
    m.set_bias("h", torch.zeros(8, dtype=torch.float64))


def _forward(state_fn, **kw):
    def run():
        m = _mlp_map()
        return m(state_fn(m), **kw)
    return run


def _it(state_fn=None, steps=3, **kw):
    def run():
        m = _mlp_map()
        state = state_fn(m) if state_fn else {"x": torch.randn(4, 3)}
        return iternn.iterate(m, state, steps, **kw)
    return run


MAP_CASES = [
    ("slots-not-a-mapping", lambda: iternn.BlockMap([("x", 3)]), MapTypeError, TypeError, ["slots", "list"]),
    ("no-slots", lambda: iternn.BlockMap({}), MapError, ValueError, ["at least one slot"]),
    ("slot-name-not-identifier", lambda: iternn.BlockMap({"my slot": 3}), MapError, ValueError,
     ["'my slot'"]),
    ("slot-name-reserved", lambda: iternn.BlockMap({"keys": 3}), MapError, ValueError,
     ["'keys'", "reserved"]),
    ("slot-size-zero", lambda: iternn.BlockMap({"x": 3, "h": 0}), MapError, ValueError, ["'h'", "positive"]),
    ("slot-size-float", lambda: iternn.BlockMap({"x": 3.0}), MapTypeError, TypeError, ["'x'", "int"]),
    ("connect-unknown-destination", lambda: _mlp_map().connect("z", "x", nn.Linear(3, 3)),
     MapError, ValueError, ["'z'"]),
    ("connect-not-a-module", lambda: _mlp_map().connect("y", "x", torch.zeros(2, 3)),
     MapTypeError, TypeError, ["'y' <- 'x'", "nn.Module"]),
    ("connect-wrong-in-features", lambda: _mlp_map().connect("y", "x", nn.Linear(5, 2)),
     MapError, ValueError, ["'y' <- 'x'", "in_features=5", "'x'"]),
    ("connect-wrong-out-features", lambda: _mlp_map().connect("y", "x", nn.Linear(3, 7)),
     MapError, ValueError, ["out_features=7", "'y'"]),
    ("connect-twice", _connect_twice, MapError, ValueError, ["'h' <- 'x'", "already exists"]),
    ("connect-opaque-wrong-shape", lambda: _mlp_map().connect("h", "h", _Slice()),
     MapError, ValueError, ["'h' <- 'h'"]),
    ("disconnect-missing-block", lambda: _mlp_map().disconnect("y", "x"), MapError, ValueError,
     ["'y' <- 'x'"]),
    ("activation-changes-shape", lambda: _mlp_map().set_activation("h", nn.Linear(8, 3)),
     MapError, ValueError, ["activation of slot 'h'"]),
    ("activation-not-a-module", lambda: _mlp_map().set_activation("h", torch.tanh),
     MapTypeError, TypeError, ["slot 'h'"]),
    ("bias-wrong-shape", lambda: _mlp_map().set_bias("h", torch.zeros(3)), MapError, ValueError,
     ["bias of slot 'h'", r"\(8,\)"]),
    ("bias-integer", lambda: _mlp_map().set_bias("h", torch.zeros(8, dtype=torch.long)),
     MapTypeError, TypeError, ["slot 'h'", "floating"]),
    ("bias-dtype-differs", _bias_dtype, MapTypeError, TypeError, ["slot 'h'", "float64"]),
    ("bias-unknown-slot", lambda: _mlp_map().set_bias("q"), MapError, ValueError, ["'q'"]),
    ("unpack-wrong-size", lambda: _mlp_map().unpack(torch.zeros(2, 12)), MapError, ValueError, ["13", "12"]),
    ("forward-missing-slot", _forward(lambda m: {"x": torch.zeros(1, 3)}), MapError, ValueError,
     ["missing", "'h'"]),
    ("forward-unknown-block-kwargs",
     _forward(lambda m: {s: torch.zeros(1, n) for s, n in m.slots.items()}, **{"h<-y": {}}),
     MapError, ValueError, ["h<-y"]),
    ("iterate-unknown-slot", _it(lambda m: {"x": torch.zeros(1, 3), "q": torch.zeros(1, 3)}),
     MapError, ValueError, ["'q'"]),
    ("iterate-negative-steps", _it(steps=-1), MapError, ValueError, ["steps", "-1"]),
    ("iterate-float-steps", _it(steps=2.0), MapTypeError, TypeError, ["steps", "float"]),
    ("iterate-inner-zero", _it(inner=0), MapError, ValueError, ["inner"]),
    ("iterate-inner-without-force", _it(inner=2), MapError, ValueError, ["inner", "force"]),
    ("iterate-unknown-update", _it(update="gauss"), MapError, ValueError, ["update", "'gauss'"]),
    ("iterate-hold-unknown-slot", _it(hold=["q"]), MapError, ValueError, ["hold", "'q'"]),
    ("iterate-hold-and-force", _it(hold=["x"], force={"x": torch.zeros(3, 4, 3)}), MapError, ValueError,
     ["'x'", "held and forced"]),
    ("iterate-force-wrong-length", _it(lambda m: {}, steps=5, force={"x": torch.zeros(3, 4, 3)}),
     MapError, ValueError, ["forced slot 'x'", r"\(5, \*batch, 3\)"]),
    ("iterate-force-batch-differs", _it(lambda m: {"h": torch.zeros(2, 8)},
     force={"x": torch.zeros(3, 4, 3)}), MapError, ValueError, ["forced slot 'x'", "batch"]),
    ("iterate-wrong-feature-size", _it(lambda m: {"x": torch.zeros(4, 5)}), MapError, ValueError,
     ["slot 'x'", r"\(\*batch, 3\)"]),
    ("iterate-integer-state", _it(lambda m: {"x": torch.zeros(4, 3, dtype=torch.long)}),
     MapTypeError, TypeError, ["slot 'x'", "floating"]),
    ("iterate-state-dtype-differs-from-map", _it(lambda m: {"x": torch.zeros(4, 3, dtype=torch.float64)}),
     MapTypeError, TypeError, ["float64", "float32"]),
    ("iterate-batch-shapes-differ", _it(lambda m: {"x": torch.zeros(4, 3), "h": torch.zeros(2, 8)}),
     MapError, ValueError, ["slot 'h'", "batch"]),
    ("iterate-empty-state", _it(lambda m: {}), MapError, ValueError, ["empty"]),
    ("iterate-state-not-a-dict", _it(lambda m: torch.zeros(4, 3)), MapTypeError, TypeError,
     ["state", "Tensor"]),
    ("mapmodule-not-a-map", lambda: iternn.MapModule(nn.Linear(2, 2)), MapTypeError, TypeError,
     ["map", "Linear"]),
    ("mapmodule-unknown-output", lambda: iternn.MapModule(_mlp_map(), output="out"), MapError, ValueError,
     ["output slot 'out'"]),
    ("mapmodule-cycle-without-steps", lambda: iternn.MapModule(_rec_y()), MapError, ValueError, ["steps"]),
    ("mapmodule-negative-steps", lambda: iternn.MapModule(_mlp_map(), steps=-2), MapError, ValueError,
     ["steps", "-2"]),
    ("mapmodule-wrong-input", lambda: iternn.MapModule(_mlp_map())(torch.zeros(2, 4)), MapError, ValueError,
     ["input slot 'x'", r"\(\*batch, 3\)"]),
]


@pytest.mark.parametrize("fn, kind, base, patterns",
                         [pytest.param(*c[1:], id=c[0]) for c in MAP_CASES])
def test_map_and_engine(fn, kind, base, patterns):
    _raises(fn, kind, base, patterns)


# ---------------------------------------------------------------- sizes before memory


def test_iterate_huge_slot_is_refused_before_the_zero_fill():
    m = iternn.BlockMap({"x": 2, "h": 10**9})  # no allocation yet: no blocks
    before = _proc_status("VmRSS")
    _raises(lambda: iternn.iterate(m, {"x": torch.zeros(1, 2)}, 1), SizeError, MemoryError,
            ["'h'", "GB"])
    assert _proc_status("VmRSS") - before < 2**28  # nothing big was touched


def test_iterate_huge_trajectory_is_refused_before_building_it():
    m = _mlp_map()
    _raises(lambda: iternn.iterate(m, {"x": torch.zeros(1, 3)}, 10**9, trajectory=True),
            SizeError, MemoryError, ["steps|trajectory", "GB"])


def _tight(fn, room: int = 2**26):
    """``fn`` under a cap of only ``room`` bytes more (for a forked child): a build that
    grows by Python objects, slot by slot, runs out in seconds instead of minutes."""
    def run():
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (_proc_status("VmSize") + room, hard))
        return fn()
    return run


def _huge_jacobian():
    m = iternn.BlockMap({"x": 2, "h": 10**5})
    m.connect("h", "x", nn.Linear(2, 10**5))
    return dyn.jacobian(m, {"x": torch.zeros(2)}, hold=["x"])


def _huge_regression():
    from iternn.study.data import load_dataset

    return load_dataset("regression", n_train=10**10)


#: Requests too large for the machine: refused before any memory is touched, naming the
#: token, option or slot and the size (under the memory cap an unchecked one fails fast).
SIZE_CASES = [
    ("dense-block-10^6-squared", lambda: iternn.sparse.make_block("W", 10**6, 10**6), ["'W'", "TB"]),
    ("row-pattern-10^10-entries", lambda: iternn.sparse.make_block("Row=100000", 10**5, 10**5),
     ["'Row=100000'", "GB"]),
    ("random-block-5x10^11-entries", lambda: iternn.SparseLinear(10**6, 10**6, density=0.5), ["TB"]),
    ("lifted-rnn-10^8-steps", lambda: _forked(_tight(lambda: iternn.lift_rnn(nn.RNN(2, 3), T=10**8))),
     [r"\bT\b"]),
    ("jacobian-10^5-free-units", _huge_jacobian, ["[Jj]acobian", "GB"]),
    ("dataset-10^10-rows", _huge_regression, ["n_train"]),
]


@pytest.mark.parametrize("fn, patterns", [pytest.param(*c[1:], id=c[0]) for c in SIZE_CASES])
def test_too_large_requests(fn, patterns):
    _raises(fn, SizeError, MemoryError, patterns)


# ============================================================================= converters


def _encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    return iternn.from_transformer(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False))


def _tied_mlp():
    lin = nn.Linear(4, 4)
    return iternn.from_mlp(nn.Sequential(lin, nn.ReLU(), lin))


def _cyclic_to_mlp():
    return iternn.to_mlp(_rec_y())


CONVERT_CASES = [
    ("from-mlp-not-sequential", lambda: iternn.from_mlp(nn.Linear(2, 2)), IterNNError, TypeError,
     ["Sequential"]),
    ("from-mlp-sizes-do-not-chain", lambda: iternn.from_mlp(nn.Sequential(nn.Linear(2, 3), nn.Linear(4, 1))),
     ConversionError, ValueError, ["layer 1", "in_features=4", "layer 0"]),
    ("from-mlp-unsupported-layer",
     lambda: iternn.from_mlp(nn.Sequential(nn.Linear(2, 3), nn.Conv1d(3, 3, 1))),
     IterNNError, TypeError, ["layer 1", "Conv1d"]),
    ("from-mlp-no-linear", lambda: iternn.from_mlp(nn.Sequential()), ConversionError, ValueError, ["Linear"]),
    ("from-mlp-activation-first", lambda: iternn.from_mlp(nn.Sequential(nn.ReLU(), nn.Linear(2, 2))),
     ConversionError, ValueError, ["layer 0", "ReLU"]),
    ("from-mlp-tied-weights", _tied_mlp, ConversionError, ValueError, ["layer 2", "layer 0"]),
    ("from-rnn-lstm", lambda: iternn.from_rnn(nn.LSTM(2, 3)), IterNNError, TypeError, ["LSTM"]),
    ("from-rnn-bidirectional", lambda: iternn.from_rnn(nn.RNN(2, 3, bidirectional=True)),
     ConversionError, ValueError, ["bidirectional"]),
    ("from-rnn-wrong-input-size", lambda: iternn.from_rnn(nn.RNN(2, 3))(torch.zeros(5, 1, 4)),
     IterNNError, ValueError, ["input slot", "2"]),
    ("from-rnn-h0-wrong-shape",
     lambda: iternn.from_rnn(nn.RNN(2, 3))(torch.zeros(5, 1, 2), torch.zeros(2, 1, 3)),
     MapError, ValueError, ["h0", r"\(1, 1, 3\)"]),
    ("lifted-rnn-wrong-length", lambda: iternn.lift_rnn(nn.RNN(2, 3), T=4)(torch.zeros(5, 1, 2)),
     MapError, ValueError, ["T=4", "5"]),
    ("transformer-integer-mask", lambda: _encoder()(torch.zeros(2, 3, 8),
                                                    src_key_padding_mask=torch.zeros(2, 3, dtype=torch.long)),
     MapTypeError, TypeError, ["src_key_padding_mask"]),
    ("lift-rnn-zero-length", lambda: iternn.lift_rnn(nn.RNN(2, 3), T=0), IterNNError, ValueError, ["T", "0"]),
    ("from-transformer-not-an-encoder", lambda: iternn.from_transformer(nn.Linear(2, 2)),
     IterNNError, TypeError, ["TransformerEncoder"]),
    ("to-mlp-on-a-cycle", _cyclic_to_mlp, IterNNError, ValueError, ["'h'"]),
]


@pytest.mark.parametrize("fn, kind, base, patterns",
                         [pytest.param(*c[1:], id=c[0]) for c in CONVERT_CASES])
def test_converters(fn, kind, base, patterns):
    _raises(fn, kind, base, patterns)


# ============================================================================= sparse blocks


def _sl(**kw):
    kw.setdefault("generator", torch.Generator().manual_seed(0))
    return iternn.SparseLinear(6, 5, **kw)


def _load_other_pattern():
    a, b = _sl(density=0.5, backend="csr"), _sl(density=0.5, backend="csr",
                                                generator=torch.Generator().manual_seed(1))
    a.load_state_dict(b.state_dict())


def _matched(density, **kw):
    mlp = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 5))
    return lambda: iternn.matched_map(mlp, density=density, **kw)


SPARSE_CASES = [
    ("spec-unknown-token", lambda: iternn.sparse.parse_spec("W Q=3"), PatternError, ValueError, ["'Q=3'"]),
    ("spec-wrong-case", lambda: iternn.sparse.parse_spec("row=4"), PatternError, ValueError,
     ["'row=4'", "did you mean 'Row'"]),
    ("spec-density-above-one", lambda: iternn.sparse.parse_spec("R=1.5"), PatternError, ValueError,
     ["'R=1.5'"]),
    ("spec-two-patterns", lambda: iternn.sparse.parse_spec("W D"), PatternError, ValueError, ["'D'", "'W'"]),
    ("spec-init-on-identity", lambda: iternn.sparse.parse_spec("I kaiming"), PatternError, ValueError,
     ["'kaiming'", "'I'"]),
    ("spec-orthogonal-on-random", lambda: iternn.sparse.parse_spec("R=0.5 orthogonal"), PatternError,
     ValueError, ["'orthogonal'"]),
    ("spec-negative-sigma", lambda: iternn.sparse.parse_spec("W G=0,-1"), PatternError, ValueError,
     ["'G=0,-1'", "sigma"]),
    ("spec-fractional-count", lambda: iternn.sparse.parse_spec("S=1.5"), PatternError, ValueError,
     ["'S=1.5'"]),
    ("spec-infinite-number", lambda: iternn.sparse.parse_spec("W C=1e999"), PatternError, ValueError,
     ["'C=1e999'", "finite"]),
    ("spec-empty", lambda: iternn.sparse.parse_spec(" ; "), PatternError, ValueError, ["pattern"]),
    ("spec-not-a-string", lambda: iternn.sparse.parse_spec(0.5), IterNNError, TypeError, ["str", "float"]),
    ("block-diagonal-not-square", lambda: iternn.sparse.make_block("D", 3, 4), PatternError, ValueError,
     ["'D'", "3x4"]),
    ("block-row-count-above-cols", lambda: iternn.sparse.make_block("Row=5", 3, 4), PatternError, ValueError,
     ["'Row=5'", "cols = 4"]),
    ("block-bd-does-not-divide", lambda: iternn.sparse.make_block("BD=3", 4, 6), PatternError, ValueError,
     ["'BD=3'"]),
    ("block-zero-rows", lambda: iternn.sparse.make_block("W", 0, 4), IterNNError, ValueError, ["rows"]),
    ("sparse-density-zero", lambda: _sl(density=0.0), IterNNError, ValueError, ["density"]),
    ("sparse-density-and-indices", lambda: _sl(density=0.5, indices=torch.zeros(2, 1, dtype=torch.long)),
     IterNNError, ValueError, ["density", "indices"]),
    ("sparse-index-out-of-range", lambda: _sl(indices=torch.tensor([[0, 1], [2, 9]])), PatternError,
     ValueError, ["column index 9", "in_features=6"]),
    ("sparse-duplicate-index", lambda: _sl(indices=torch.tensor([[1, 1], [2, 2]])), PatternError, ValueError,
     ["duplicate", r"\(1, 2\)"]),
    ("sparse-unknown-backend", lambda: _sl(density=0.5, backend="gpu"), IterNNError, ValueError,
     ["backend", "'gpu'"]),
    ("sparse-input-dtype", lambda: _sl(density=0.5)(torch.zeros(2, 6, dtype=torch.float64)),
     IterNNError, TypeError, ["SparseLinear", "float64"]),
    ("sparse-load-other-pattern", _load_other_pattern, PatternError, ValueError,
     ["crow_indices|col_indices"]),
    ("csr-row-pointers-decrease",
     lambda: iternn.sparse.check_csr_pattern(torch.tensor([0, 2, 1, 3]), torch.tensor([0, 1, 2]), (3, 4),
                                             name="blk"), PatternError, ValueError, ["blk.crow_indices"]),
    ("csr-column-out-of-range",
     lambda: iternn.sparse.check_csr_pattern(torch.tensor([0, 1, 2]), torch.tensor([0, 7]), (2, 4),
                                             name="blk"), PatternError, ValueError, ["blk.col_indices", "7"]),
    ("masked-mask-wrong-shape", lambda: iternn.MaskedLinear(6, 5, mask=torch.ones(6, 5, dtype=torch.bool)),
     IterNNError, ValueError, ["mask", r"\(5, 6\)"]),
    ("matched-map-no-seed", _matched(0.2, seed=None), IterNNError, ValueError, ["seed"]),
    ("matched-map-unknown-block", _matched({"hx": 0.5, "yh": 0.5, "hq": 0.5}), IterNNError, ValueError,
     ["'hq'"]),
    ("matched-map-input-unreachable", _matched({"yh": 0.5}), IterNNError, ValueError, ["'hx'"]),
    ("matched-map-density-too-small", _matched(1e-12), IterNNError, ValueError,
     ["density", "at least|minimum"]),
    ("random-map-unknown-slot", lambda: iternn.sparse.random_map({"x": 2, "h": 3}, {("h", "q"): "W"}),
     IterNNError, ValueError, ["'q'"]),
    ("random-map-bad-spec", lambda: iternn.sparse.random_map({"x": 2, "h": 3}, {("h", "x"): "R=2"}),
     PatternError, ValueError, ["'R=2'"]),
    ("solve-hidden-width-zero-budget",
     lambda: iternn.sparse.solve_hidden_width(0, 4, 2, dict.fromkeys(iternn.sparse.SIX_BLOCKS, 1.0)),
     IterNNError, ValueError, ["budget"]),
]


@pytest.mark.parametrize("fn, kind, base, patterns",
                         [pytest.param(*c[1:], id=c[0]) for c in SPARSE_CASES])
def test_sparse(fn, kind, base, patterns):
    _raises(fn, kind, base, patterns)


def _edit_col_and_call():
    sl = iternn.SparseLinear(8, 8, density=0.5, backend="csr", generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sl.col_indices[-1] = 100000
    return sl(torch.randn(3, 8))


def _edit_crow_and_call():
    sl = iternn.SparseLinear(8, 8, density=0.5, backend="csr", generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sl.crow_indices[3] = 10**6
    return sl(torch.randn(3, 8))


@pytest.mark.parametrize("edit, buffer", [
    pytest.param(_edit_col_and_call, "col_indices", id="col-index-edited"),
    pytest.param(_edit_crow_and_call, "crow_indices", id="row-pointer-edited"),
])
def test_sparse_pattern_edited_in_place_is_named_not_a_crash(edit, buffer):
    """An in-place edit of a documented pattern buffer, then a call: a PatternError, and
    the process lives (without the check the native kernel reads out of bounds)."""
    with pytest.raises(Exception) as info:
        _forked(edit)
    _check(info.value, PatternError, ValueError, [buffer])


# ============================================================================= save / load


def _saved(tmp_path: Path, module=None) -> Path:
    path = tmp_path / "m.safetensors"
    iternn.save(module if module is not None else nn.Linear(2, 2), path)
    return path


def _rewrite(path: Path, edit_doc=None, edit_tensors=None, raw_meta=None) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if edit_doc is not None:
        doc = json.loads(meta["iternn"])
        edit_doc(doc)
        meta["iternn"] = json.dumps(doc)
    if raw_meta is not None:
        meta["iternn"] = raw_meta
    if edit_tensors is not None:
        edit_tensors(tensors)
    out = path.with_name("edited.safetensors")
    save_file(tensors, str(out), metadata=meta)
    return out


def _linear_cfg(doc):
    return next(mod["config"] for mod in doc["modules"] if mod["codec"] == "torch.nn.Linear")


def _huge_linear(doc):
    cfg = _linear_cfg(doc)
    cfg["in_features"] = cfg["out_features"] = 30000


def _set(key, value):
    def edit(doc):
        doc[key] = value
    return edit


def _unknown_codec(doc):
    doc["modules"][doc["root"]]["codec"] = "acme.Widget"


def _garbage(tmp_path):
    p = tmp_path / "garbage.safetensors"
    p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
    return p


def _no_metadata(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(p))
    return p


def _sparse_file_bad_col(tmp_path):
    sl = iternn.SparseLinear(6, 5, density=0.5, generator=torch.Generator().manual_seed(0))
    path = _saved(tmp_path, sl)

    def edit(t):
        t["col_indices"] = t["col_indices"].clone()
        t["col_indices"][-1] = 100000
    return _rewrite(path, edit_tensors=edit)


def _wrong_shape(t):
    t["weight"] = torch.zeros(3, 3)


LOAD_CASES = [
    ("directory", lambda p: p.parent, (FormatError, IsADirectoryError), []),
    ("not-safetensors", lambda p: _garbage(p.parent), (FormatError,), []),
    ("no-iternn-metadata", lambda p: _no_metadata(p.parent), (FormatError,), ["iternn"]),
    ("metadata-not-json", lambda p: _rewrite(p, raw_meta="{oops"), (FormatError,), ["JSON"]),
    ("metadata-deeply-nested", lambda p: _rewrite(p, raw_meta="[" * 200000 + "]" * 200000), (FormatError,),
     []),
    ("format-version-from-the-future", lambda p: _rewrite(p, _set("version", 99)), (FormatError,),
     ["version 99"]),
    ("unknown-codec", lambda p: _rewrite(p, _unknown_codec), (FormatError,), ["acme.Widget"]),
    ("declares-30000x30000-linear", lambda p: _rewrite(p, _huge_linear), (FormatError,), ["weight"]),
    ("tensor-shape-differs", lambda p: _rewrite(p, edit_tensors=_wrong_shape), (FormatError,), ["'weight'"]),
    ("sparse-pattern-out-of-range", lambda p: _sparse_file_bad_col(p.parent), (FormatError, PatternError),
     ["col_indices"]),
]


@pytest.mark.parametrize("make, kinds, patterns", [pytest.param(*c[1:], id=c[0]) for c in LOAD_CASES])
def test_load_refuses(tmp_path, make, kinds, patterns):
    path = make(_saved(tmp_path))
    before = _proc_status("VmRSS")
    with pytest.raises(kinds) as info:
        iternn.load(path)
    err = info.value
    assert not isinstance(err, RecursionError)
    if isinstance(err, IterNNError):
        _check(err, type(err), ValueError, patterns)
    assert str(path) in str(err), f"message does not name the path: {err}"
    assert _proc_status("VmRSS") - before < 2**28  # nothing of the declared size was built


SAVE_CASES = [
    ("save-not-a-module", lambda p: iternn.save({"w": torch.zeros(2)}, p), IterNNError, TypeError,
     ["Module|dict"]),
    ("save-module-without-codec", lambda p: iternn.save(nn.Sequential(nn.Linear(2, 2), _Opaque()), p),
     IterNNError, TypeError, ["_Opaque", "1"]),
]


@pytest.mark.parametrize("fn, kind, base, patterns", [pytest.param(*c[1:], id=c[0]) for c in SAVE_CASES])
def test_save_refuses(tmp_path, fn, kind, base, patterns):
    path = tmp_path / "out.safetensors"
    _raises(lambda: fn(path), kind, base, patterns)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_save_into_a_missing_folder_names_the_path(tmp_path):
    target = tmp_path / "no-such-folder" / "m.safetensors"
    with pytest.raises(OSError) as info:
        iternn.save(nn.Linear(2, 2), target)
    assert str(target) in str(info.value), str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("device", [
    pytest.param("bogus", id="unknown-device"),
    pytest.param("cuda", id="cuda-on-a-cpu-build",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_load_onto_a_device_this_machine_lacks(tmp_path, device):
    path = _saved(tmp_path)
    _raises(lambda: iternn.load(path, device=device), IterNNError, ValueError, [f"'?{device}'?"])


# ============================================================================= dynamics


def _fp(**kw):
    def run():
        m = _rec()
        state = kw.pop("state", None) or _s(m)
        return dyn.fixed_point(m, state, hold=kw.pop("hold", ["x"]), **kw)
    return run


def _ffp(states=None, **kw):
    def run():
        m = _rec()
        st = states(m) if states else {"x": torch.zeros(2, dtype=torch.float64),
                                        "h": torch.zeros(3, 4, dtype=torch.float64)}
        return dyn.find_fixed_points(m, st, hold=["x"], opt_steps=5, polish=False, **kw)
    return run


def _jac(fn, state=None, **kw):
    def run():
        m = _rec()
        return fn(m, state(m) if state else _s(m), hold=kw.pop("hold", ["x"]), **kw)
    return run


def _solve(f, z0, **kw):
    return lambda: dyn.solve(f, z0, **kw)


def _deq(**kw):
    def run():
        return dyn.DEQ(_rec(), output="h", **kw)
    return run


def _deq_call():
    return dyn.DEQ(_rec(), output="h")(torch.zeros(2, 5, dtype=torch.float64))


def _nan_state(m):
    return _s(m, h=torch.full((1, 4), float("nan"), dtype=torch.float64))


DYN_CASES = [
    ("fixed-point-unknown-solver", _fp(solver="newton"), DynamicsError, ValueError, ["'newton'"]),
    ("fixed-point-negative-tol", _fp(tol=-1.0), DynamicsError, ValueError, ["tol", "-1"]),
    ("fixed-point-negative-max-steps", _fp(max_steps=-1), DynamicsError, ValueError, ["max_steps"]),
    ("picard-damping-zero", lambda: dyn.Picard(damping=0.0), DynamicsError, ValueError, ["damping"]),
    ("anderson-negative-lam", lambda: dyn.Anderson(lam=-1.0), DynamicsError, ValueError, ["lam"]),
    ("fixed-point-everything-held", _fp(hold=["x", "h"], state=None), DynamicsError, ValueError, ["held"]),
    ("fixed-point-nan-state", lambda: dyn.fixed_point(_rec(), _nan_state(_rec()), hold=["x"]),
     DynamicsError, ValueError, ["'h'", "NaN"]),
    ("fixed-point-hold-unknown-slot", _fp(hold=["q"]), IterNNError, ValueError, ["'q'"]),
    ("fixed-point-update-unknown", _fp(update="async"), DynamicsError, ValueError, ["update", "'async'"]),
    ("solve-integer-start", _solve(lambda z: z, torch.zeros(3, dtype=torch.long)), IterNNError, TypeError,
     ["z0", "floating"]),
    ("solve-f-changes-shape", _solve(lambda z: z[..., :2], torch.zeros(1, 3)), DynamicsError, ValueError,
     ["f must map"]),
    ("solve-bad-stop-mode", _solve(lambda z: z, torch.zeros(1, 3), stop_mode="max"), DynamicsError,
     ValueError, ["stop_mode", "'max'"]),
    ("solve-nan-start", _solve(lambda z: z, torch.tensor([[0.0, float("nan")]])), DynamicsError, ValueError,
     ["z0", "NaN"]),
    ("anderson-memory-zero", lambda: dyn.Anderson(m=0), DynamicsError, ValueError, [r"\bm\b", "0"]),
    ("broyden-rank-zero", lambda: dyn.Broyden(memory=0), DynamicsError, ValueError, ["memory"]),
    ("deq-phantom-zero-steps", lambda: dyn.DEQ(_rec(), output="h", backward=dyn.Phantom(steps=0)),
     DynamicsError, ValueError, ["steps"]),
    ("deq-unknown-input-slot", _deq(input="q"), DynamicsError, ValueError, ["'q'"]),
    ("deq-wrong-input-shape", _deq_call, DynamicsError, ValueError, ["input slot 'x'"]),
    ("find-unknown-method", _ffp(method="sgd"), DynamicsError, ValueError, ["method", "'sgd'"]),
    ("find-slow-tol-below-fixed-tol", _ffp(fixed_tol=1e-3, slow_tol=1e-6), DynamicsError, ValueError,
     ["slow_tol", "fixed_tol"]),
    ("find-starts-not-2d", _ffp(lambda m: {"x": torch.zeros(2, dtype=torch.float64),
                                           "h": torch.zeros(4, dtype=torch.float64)}),
     DynamicsError, ValueError, ["'h'", r"\(N, n\)"]),
    ("find-held-slot-missing", _ffp(lambda m: {"h": torch.zeros(3, 4, dtype=torch.float64)}),
     DynamicsError, ValueError, ["'x'"]),
    ("find-negative-lr", _ffp(lr=-0.1), DynamicsError, ValueError, ["lr"]),
    ("jacobian-unknown-method", _jac(dyn.jacobian, method="finite"), DynamicsError, ValueError,
     ["method", "'finite'"]),
    ("jacobian-nan-state", _jac(dyn.jacobian, _nan_state), DynamicsError, ValueError, ["'h'", "NaN"]),
    ("jacobian-unknown-slot", _jac(dyn.jacobian, lambda m: _s(m, q=torch.zeros(1, 2))), DynamicsError,
     ValueError, ["'q'"]),
    ("spectral-radius-zero-iters", _jac(dyn.spectral_radius, iters=0), DynamicsError, ValueError, ["iters"]),
    ("spectral-radius-bad-generator", _jac(dyn.spectral_radius, generator=0), DynamicsError, ValueError,
     ["generator"]),
    ("lyapunov-zero-steps", _jac(dyn.lyapunov_spectrum, steps=0), DynamicsError, ValueError, ["steps"]),
    ("lyapunov-k-too-large", _jac(dyn.lyapunov_spectrum, steps=5, k=9), DynamicsError, ValueError,
     [r"\bk\b"]),
    ("lyapunov-held-and-forced", _jac(dyn.lyapunov_spectrum, steps=3, force={"x": torch.zeros(3, 1, 2)}),
     DynamicsError, ValueError, ["'x'"]),
    ("impulse-unknown-mode", _jac(dyn.impulse_response, steps=3, mode="cubic"), DynamicsError, ValueError,
     ["mode", "'cubic'"]),
    ("impulse-zero-direction", _jac(dyn.impulse_response, steps=3, slot="h",
                                    direction={"h": torch.zeros(1, 4, dtype=torch.float64)}),
     DynamicsError, ValueError, ["direction"]),
    ("impulse-negative-eps", _jac(dyn.impulse_response, steps=3, eps=-1e-3), DynamicsError, ValueError,
     ["eps"]),
    ("lyapunov-negative-warmup", _jac(dyn.lyapunov_spectrum, steps=3, warmup=-1), DynamicsError, ValueError,
     ["warmup"]),
    ("jacobian-sparse-not-bool", _jac(dyn.jacobian, sparse="yes"), DynamicsError, ValueError, ["sparse"]),
    ("impulse-negative-steps", _jac(dyn.impulse_response, steps=-2), DynamicsError, ValueError, ["steps"]),
    ("impulse-perturb-unknown-slot", _jac(dyn.impulse_response, steps=3, slot="q"), DynamicsError, ValueError,
     ["'q'"]),
]


@pytest.mark.parametrize("fn, kind, base, patterns", [pytest.param(*c[1:], id=c[0]) for c in DYN_CASES])
def test_dynamics(fn, kind, base, patterns):
    _raises(fn, kind, base, patterns)


def test_fixed_point_not_converged_raises_with_the_report():
    m = _rec(scale=0.99)
    err = _raises(lambda: dyn.fixed_point(m, _s(m), hold=["x"], solver="picard", max_steps=1,
                                          raise_on_failure=True),
                  ConvergenceError, RuntimeError, ["'picard'", "did not converge"])
    assert err.info is not None and not err.info.converged


def test_anderson_memory_can_be_set():
    """The map argument of fixed_point no longer shadows Anderson's memory ``m``."""
    m = _rec()
    z, info = dyn.fixed_point(m, _s(m), hold=["x"], solver=dyn.Anderson(m=5))
    assert info.converged
    again = m({**z})
    assert torch.allclose(again["h"], z["h"], atol=1e-8)


@pytest.mark.parametrize("tool", [
    pytest.param(lambda m: dyn.eigenvalues(m, _s(m), hold=["x"]), id="eigenvalues"),
    pytest.param(lambda m: dyn.spectral_radius(m, _s(m), hold=["x"]), id="spectral-radius"),
])
def test_nan_weight_is_named_not_a_crash(tool):
    """A NaN weight: a DynamicsError naming the block (unchecked, LAPACK crashes or raises
    its own RuntimeError)."""
    with pytest.raises(Exception) as info:
        _forked(lambda: tool(_nan_map()))
    _check(info.value, DynamicsError, ValueError, ["h<-h|'h' <- 'h'"])


def test_find_fixed_points_solves_are_verified_with_two_threads():
    """Newton's polish on a 256-dimensional map with an explicit thread count (the
    configuration where batched float64 solves can fail silently) still returns true
    fixed points."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        m = _rec(256, scale=0.5)
        x = torch.zeros(1, 2, dtype=torch.float64)
        z, _ = dyn.fixed_point(m, {"x": x}, hold=["x"], solver="picard", max_steps=20)
        g = torch.Generator().manual_seed(3)
        starts = {"x": x[0], "h": z["h"] + 1e-3 * torch.randn(3, 256, generator=g, dtype=torch.float64)}
        fps = dyn.find_fixed_points(m, starts, hold=["x"], opt_steps=0, polish_steps=2)
    finally:
        torch.set_num_threads(threads)
    assert len(fps) >= 1
    h = fps.states["h"]
    x = torch.zeros(h.shape[0], 2, dtype=torch.float64)
    with torch.no_grad():
        step = m({"x": x, "h": h})["h"]
    assert float((step - h).abs().max()) < 1e-8


# ============================================================================= study config


def _cfg(text: str):
    from iternn.study.config import loads

    return lambda: loads(text)


_DS = '[[datasets]]\nname = "digits"\n'

CONFIG_CASES = [
    ("unknown-top-key", _cfg('colour = "red"\n' + _DS), ["colour", "unknown key"]),
    ("negative-lr", _cfg("[train]\nlr = -1\n" + _DS), ["train.lr", "-1"]),
    ("seed-under-train", _cfg("[train]\nseed = 3\n" + _DS), ["train.seed"]),
    ("unknown-train-key", _cfg("[train]\nlearning_rate = 0.1\n" + _DS), ["train.learning_rate"]),
    ("bad-optimizer", _cfg('[train]\noptimizer = "lion"\n' + _DS), ["train.optimizer", "'lion'"]),
    ("bad-device", _cfg('[train]\ndevice = "tpu"\n' + _DS), ["train.device", "'tpu'"]),
    ("no-datasets", _cfg('name = "x"\n'), ["datasets"]),
    ("dataset-without-name", _cfg("[[datasets]]\nlabel = \"a\"\n"), [r"datasets\[0\]\.name", "missing"]),
    ("unknown-dataset", _cfg('[[datasets]]\nname = "imagenet"\n'), [r"datasets\[0\]\.name", "'imagenet'"]),
    ("unknown-model", _cfg(_DS + 'models = ["mpl"]\n'), [r"datasets\[0\]\.models\[0\]", "'mpl'"]),
    ("model-for-another-task", _cfg(_DS + 'models = ["rnn"]\n'), [r"datasets\[0\]\.models\[0\]", "'rnn'"]),
    ("density-zero", _cfg(_DS + "densities = [0.0]\n"), [r"datasets\[0\]\.densities\[0\]"]),
    ("duplicate-seeds", _cfg("seeds = [1, 1]\n" + _DS), ["seeds", "distinct"]),
    ("duplicate-labels", _cfg(_DS + _DS), [r"datasets\[1\]\.label", "'digits'"]),
    ("unknown-dataset-option", _cfg(_DS + "[datasets.options]\ncolour = 1\n"),
     [r"datasets\[0\]\.options\.colour"]),
    ("sequence-budget-as-list", _cfg('[[datasets]]\nname = "anomaly"\nhidden = [[8, 8]]\n'),
     [r"datasets\[0\]\.hidden"]),
    ("zero-threads", _cfg("threads = 0\n" + _DS), ["threads"]),
    ("jobs-as-string", _cfg('jobs = "2"\n' + _DS), ["jobs", "'2'"]),
    ("extra-steps-without-iterated-model", _cfg(_DS + 'models = ["mlp"]\nextra_steps = [1]\n'),
     [r"datasets\[0\]\.extra_steps"]),
    ("momentum-one", _cfg("[train]\nmomentum = 1.0\n" + _DS), ["train.momentum"]),
    ("not-toml", _cfg("name = = 3\n"), ["TOML"]),
]


@pytest.mark.parametrize("fn, patterns", [pytest.param(*c[1:], id=c[0]) for c in CONFIG_CASES])
def test_study_config(fn, patterns):
    _raises(fn, ConfigError, ValueError, patterns)


def test_study_config_missing_file(tmp_path):
    from iternn.study.config import load_config

    path = tmp_path / "nope.toml"
    _raises(lambda: load_config(path), ConfigError, ValueError, [re.escape(str(path))])


def test_train_config_bad_value_names_the_key():
    from iternn.study.train import TrainConfig

    _raises(lambda: TrainConfig(lr=0.0), ConfigError, ValueError, ["lr"])


# ============================================================================= data sets


def _idx(tmp_path, raw: bytes) -> Path:
    p = tmp_path / "bad-idx"
    p.write_bytes(raw)
    return p


def _read_idx(raw: bytes):
    def run(tmp_path):
        from iternn.study.data import read_idx

        p = _idx(tmp_path, raw)
        return p, lambda: read_idx(p)
    return run


def _dataset_rows_differ(tmp_path):
    from iternn.study.data import Dataset

    x, y = torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)
    return None, lambda: Dataset(name="toy", x_train=x, y_train=y[:3], x_val=x, y_val=y, x_test=x, y_test=y,
                                 task="classification", n_classes=2)


def _load(name, **options):
    def run(tmp_path):
        from iternn.study.data import load_dataset

        return None, lambda: load_dataset(name, **options)
    return run


DATA_CASES = [
    ("unknown-dataset", _load("imagenet"), ["'imagenet'"]),
    ("bad-option-value", _load("regression", noise=-1.0), ["'noise'"]),
    ("unknown-option", _load("regression", colour=1), ["colour"]),
    ("negative-seed", _load("regression", seed=-1), ["seed"]),
    ("idx-too-short", _read_idx(b"\x00\x00"), ["too short"]),
    ("idx-bad-magic", _read_idx(b"\x01\x02\x08\x01" + struct.pack(">I", 1) + b"\x00"), ["magic"]),
    ("idx-size-mismatch", _read_idx(b"\x00\x00\x08\x01" + struct.pack(">I", 10) + b"\x00" * 3),
     ["size mismatch"]),
    ("idx-corrupt-gzip", _read_idx(b"\x1f\x8b" + b"\x00" * 20), ["gzip"]),
    ("dataset-rows-differ", _dataset_rows_differ, ["y_train|x_train", "'toy'"]),
]


@pytest.mark.parametrize("make, patterns", [pytest.param(*c[1:], id=c[0]) for c in DATA_CASES])
def test_data(tmp_path, make, patterns):
    path, fn = make(tmp_path)
    err = _raises(fn, DataError, ValueError, patterns)
    if path is not None:
        assert str(path) in str(err)


# ============================================================================= training


def _regression():
    from iternn.study.data import load_dataset

    return load_dataset("regression", n_train=64, n_val=16, n_test=16)


def test_train_model_without_trainable_parameters():
    from iternn.study.train import TrainConfig, train

    model = nn.Linear(8, 1)
    model.requires_grad_(False)
    _raises(lambda: train(model, _regression(), TrainConfig(epochs=1), progress=False),
            IterNNError, ValueError, ["trainable"])


def test_train_resume_without_folder():
    from iternn.study.train import TrainConfig, train

    _raises(lambda: train(nn.Linear(8, 1), _regression(), TrainConfig(epochs=1), resume=True, progress=False),
            IterNNError, ValueError, ["resume", "out_dir"])


def test_unreadable_checkpoint_gives_our_advice(tmp_path):
    from iternn.study.checkpoint import load_checkpoint

    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    err = _raises(lambda: load_checkpoint(path), IterNNError, ValueError, [re.escape(str(path))])
    assert "weights_only=False" not in str(err)


# ============================================================================= the command line


def _cli(argv, capsys):
    from iternn.cli import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


USAGE_CASES = [
    ("unknown-command", ["frobnicate"], ["frobnicate"]),
    ("train-without-model", ["train", "--dataset", "digits"], ["--model"]),
    ("train-density-above-one", ["train", "--dataset", "digits", "--model", "sparse_map", "--density", "2"],
     ["--density"]),
    ("train-negative-epochs", ["train", "--dataset", "digits", "--model", "mlp", "--epochs", "-3"],
     ["--epochs"]),
    ("train-bad-hidden", ["train", "--dataset", "digits", "--model", "mlp", "--hidden", "8,x"], ["--hidden"]),
    ("study-shard-out-of-range", ["study", "--shard", "5/4"], ["--shard"]),
    ("study-config-and-quick", ["study", "--quick", "--config", "a.toml"], ["--config|--quick"]),
    ("analyze-zero-steps", ["analyze", "m.safetensors", "--steps", "0"], ["--steps"]),
    ("train-unknown-optimizer", ["train", "--dataset", "digits", "--model", "mlp", "--optimizer", "lion"],
     ["--optimizer"]),
]


@pytest.mark.parametrize("argv, patterns", [pytest.param(*c[1:], id=c[0]) for c in USAGE_CASES])
def test_cli_usage(capsys, argv, patterns):
    code, _, err = _cli(argv, capsys)
    assert code == 2
    for p in patterns:
        assert re.search(p, err), f"stderr does not name {p!r}: {err}"


def _one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines, "nothing on stderr"
    assert "Traceback" not in err and "AssertionError" not in err, err
    return lines[-1]


def _bad_config(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('[[datasets]]\nname = "digits"\ncolour = "red"\n')
    return ["study", "--config", p, "--out", tmp_path / "study"], [re.escape("datasets[0].colour")]


def _missing_config(tmp_path):
    p = tmp_path / "missing.toml"
    return ["study", "--config", p, "--out", tmp_path / "study"], [re.escape(str(p))]


def _missing_map(tmp_path):
    p = tmp_path / "missing.safetensors"
    return ["analyze", p, "--out", tmp_path / "r", "--no-pictures"], [re.escape(str(p))]


def _garbage_map(tmp_path):
    p = _garbage(tmp_path)
    return ["analyze", p, "--out", tmp_path / "r", "--no-pictures"], [re.escape(str(p))]


def _train(*extra):
    def make(tmp_path):
        return ["train", "--dataset", "regression", "--model", "mlp", "--epochs", "1", "--quiet",
                "--out", tmp_path / "run", *extra], []
    return make


def _huge_hidden(tmp_path):
    argv, _ = _train("--hidden", "1000000000")(tmp_path)
    return argv, ["--hidden", "GB"]


def _data_path_for_digits(tmp_path):
    return ["train", "--dataset", "digits", "--model", "mlp", "--data-path", tmp_path], ["--data-path"]


def _unknown_model(tmp_path):
    return ["train", "--dataset", "regression", "--model", "mpl", "--quiet"], ["'mpl'"]


def _missing_idx_folder(tmp_path):
    p = tmp_path / "no-such-folder"
    return ["train", "--dataset", "mnist_idx", "--model", "mlp", "--data-path", p, "--quiet",
            "--out", tmp_path / "run"], [re.escape(str(p))]


def _not_a_map(tmp_path):
    p = tmp_path / "linear.safetensors"
    iternn.save(nn.Linear(2, 2), p)
    return ["analyze", p, "--out", tmp_path / "r", "--no-pictures"], [re.escape(str(p))]


CLI_CONFIG_CASES = [
    ("analyze-file-holds-no-map", _not_a_map),
    ("study-unknown-config-key", _bad_config),
    ("study-missing-config-file", _missing_config),
    ("analyze-missing-map", _missing_map),
    ("analyze-not-a-map", _garbage_map),
    ("train-hidden-too-large", _huge_hidden),
    ("train-data-path-without-idx", _data_path_for_digits),
    ("train-unknown-model", _unknown_model),
    ("train-missing-idx-folder", _missing_idx_folder),
]


@pytest.mark.parametrize("make", [pytest.param(c[1], id=c[0]) for c in CLI_CONFIG_CASES])
def test_cli_configuration_errors_exit_2(tmp_path, capsys, make):
    argv, patterns = make(tmp_path)
    code, _, err = _cli(argv, capsys)
    line = _one_line(err)
    assert code == 2, f"exit {code}: {err}"
    assert line.startswith("iternn: error:"), line
    for p in patterns:
        assert re.search(p, line), f"the error line does not name {p!r}: {line}"


def test_cli_diverged_training_exits_1(tmp_path, capsys):
    code, out, err = _cli(_train("--hidden", "4", "--lr", "1e30")(tmp_path)[0], capsys)
    assert code == 1, f"exit {code}: {out} {err}"
    assert "diverged" in (out + err)


def test_cli_debug_raises_the_named_error(tmp_path):
    """With --debug the diverged run's error propagates: a StudyError (a RuntimeError)."""
    from iternn.cli import main

    argv = [str(a) for a in _train("--hidden", "4", "--lr", "1e30")(tmp_path)[0]]
    _raises(lambda: main(["--debug", *argv]), StudyError, RuntimeError, ["diverged"])


def test_cli_cuda_on_a_cpu_build_is_one_line(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = _cli(_train("--hidden", "4", "--device", "cuda")(tmp_path)[0], capsys)
    line = _one_line(err)
    assert code == 2, f"exit {code}: {err}"
    assert "--device" in line and "cuda" in line, line


def test_cli_analyze_nan_map_fails(tmp_path):
    path = tmp_path / "nan.safetensors"
    iternn.save(_nan_map(), path)

    def run():
        from iternn.cli import main

        buf = io.StringIO()
        with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(io.StringIO()):
            code = main(["analyze", str(path), "--out", str(tmp_path / "r"), "--quick", "--no-pictures"])
        return code, buf.getvalue()

    code, err = _forked(run, timeout=120)
    line = _one_line(err)
    assert code == 1, f"exit {code}: {err}"
    assert re.search(r"h<-h|'h' <- 'h'", line), line


def test_cli_ctrl_c_in_analyze_exits_130(tmp_path, capsys, monkeypatch):
    import iternn.dynamics.report as report

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "analyze", interrupted)
    path = _saved(tmp_path, _mlp_map())
    code, _, err = _cli(["analyze", path, "--out", tmp_path / "r"], capsys)
    assert code == 130
    assert "Traceback" not in err


# ---------------------------------------------------------------- studies


def _tiny_study(tmp_path, **train):
    options = "\n".join(f"{k} = {v}" for k, v in {"epochs": 1, "batch_size": 64, **train}.items())
    p = tmp_path / "tiny.toml"
    p.write_text('name = "tiny"\nseeds = [0]\njobs = 1\n[train]\n' + options + "\n"
                 '[[datasets]]\nname = "regression"\nmodels = ["mlp"]\nhidden = [4]\n'
                 "[datasets.options]\nn_train = 64\nn_val = 16\nn_test = 16\n")
    return p


def test_cli_study_whose_every_run_diverged_exits_1(tmp_path, capsys):
    out = tmp_path / "study"
    code, so, err = _cli(["study", "--config", _tiny_study(tmp_path, lr=1e30), "--out", out,
                          "--no-pictures", "--quiet"], capsys)
    assert code == 1, f"exit {code}: {so} {err}"
    assert (out / "report.md").is_file()  # the report is still written


def test_cli_study_retrains_a_run_whose_checkpoint_is_unreadable(tmp_path, capsys):
    """An unfinished run with a broken checkpoint is set aside (kept, not deleted) and
    trained again, instead of failing on every rerun."""
    out = tmp_path / "study"
    argv = ["study", "--config", _tiny_study(tmp_path), "--out", out, "--no-pictures", "--quiet"]
    code, _, err = _cli(argv, capsys)
    assert code == 0, err
    (run,) = (out / "runs").iterdir()
    (run / "result.json").unlink()  # unfinished ...
    (run / "checkpoint.pt").write_bytes(b"not a checkpoint")  # ... with a broken checkpoint
    code, _, err = _cli(argv, capsys)
    assert code == 0, err
    records = json.loads((out / "results.json").read_text())
    assert [r["status"] for r in records] == ["ok"]
    kept = [p for p in (out / "runs").iterdir() if p.name != run.name]
    assert len(kept) == 1 and kept[0].name.startswith(run.name)
    assert (kept[0] / "checkpoint.pt").read_bytes() == b"not a checkpoint"  # nothing lost


def test_locked_folder_is_refused(tmp_path):
    import fcntl

    from iternn.errors import FolderLockedError
    from iternn.study.lock import LOCK_NAME, FolderLock

    folder = tmp_path / "study"
    folder.mkdir()
    with open(folder / LOCK_NAME, "w") as f:  # another open file: another holder
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        f.write("424242")
        f.flush()

        def take():
            with FolderLock(folder, what="study folder"):
                pass
        _raises(take, FolderLockedError, RuntimeError, [re.escape(str(folder)), "424242"])


def test_cli_study_on_a_locked_folder_refuses_and_keeps_its_files(tmp_path, capsys):
    import fcntl

    from iternn.study.lock import LOCK_NAME

    out = tmp_path / "study"
    out.mkdir()
    (out / "keep.txt").write_text("results of the other study")
    with open(out / LOCK_NAME, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, _, err = _cli(["study", "--config", _tiny_study(tmp_path), "--out", out, "--no-pictures",
                             "--quiet"], capsys)
    line = _one_line(err)
    assert code != 0
    assert str(out) in line, line
    assert (out / "keep.txt").read_text() == "results of the other study"
    assert not (out / "runs").exists()


# ---------------------------------------------------------------- --resume


@pytest.fixture
def finished_run(tmp_path, capsys):
    argv = _train("--hidden", "4", "--batch-size", "256")(tmp_path)[0]
    code, out, err = _cli(argv, capsys)
    assert code == 0, err
    return argv


@pytest.mark.parametrize("change, flag", [
    pytest.param(["--activation", "tanh"], "--activation", id="activation-changed"),
    pytest.param(["--data-seed", "1"], "--data-seed", id="data-seed-changed"),
    pytest.param(["--hidden", "5"], "--hidden", id="hidden-changed"),
])
def test_cli_resume_refuses_a_changed_run(finished_run, capsys, change, flag):
    run_dir = Path(finished_run[finished_run.index("--out") + 1])
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    code, _, err = _cli([*finished_run, "--resume", *change], capsys)
    line = _one_line(err)
    assert code == 2, f"exit {code}: {err}"
    option = flag.lstrip("-").replace("-", "_")
    assert flag in line or re.search(rf"\b{option}\b", line), line
    after = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    assert after == before  # nothing of the finished run was touched


def test_cli_resume_extends_epochs(finished_run, capsys):
    argv = [a if a != "1" or i == 0 or finished_run[i - 1] != "--epochs" else "2"
            for i, a in enumerate(finished_run)]
    code, out, err = _cli([*argv, "--resume"], capsys)
    assert code == 0, err
    summary = json.loads(out.splitlines()[0])
    assert summary["epochs_run"] == 2


def test_resume_error_names_options_in_python(tmp_path):
    """The same check in ``train``: a ResumeError (a ConfigError) naming the option."""
    from iternn.study.train import TrainConfig, train

    data = _regression()
    train(nn.Linear(8, 1), data, TrainConfig(epochs=1), out_dir=tmp_path, progress=False)
    _raises(lambda: train(nn.Linear(8, 1), data, TrainConfig(epochs=1, lr=0.5), out_dir=tmp_path,
                          resume=True, progress=False),
            ResumeError, ValueError, ["lr"])


# ---------------------------------------------------------------- responsiveness (subprocesses)


def _timed(args, cwd):
    code = ("import sys, runpy, time\n"
            "sys.argv = ['iternn'] + sys.argv[1:]\n"
            "try:\n"
            "    runpy.run_module('iternn', run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    rc = e.code\n"
            "else:\n"
            "    rc = 0\n"
            "print('TORCH', 'torch' in sys.modules, file=sys.stderr)\n"
            "sys.exit(rc)\n")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          cwd=cwd, timeout=60)
    return proc, time.perf_counter() - start


def test_help_is_fast_and_documents_exit_codes(tmp_path):
    proc, wall = _timed(["--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "130" in proc.stdout and re.search(r"\b2\b", proc.stdout)
    assert "TORCH False" in proc.stderr, "torch was imported to print the help"
    assert wall < 1.5, f"iternn --help took {wall:.2f} s"


def test_config_error_is_fast(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('colour = "red"\n[[datasets]]\nname = "digits"\n')
    proc, wall = _timed(["study", "--config", str(bad), "--out", str(tmp_path / "s")], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "colour" in proc.stderr
    assert "TORCH False" in proc.stderr, "torch was imported before the config was checked"
    assert wall < 1.5, f"a config error took {wall:.2f} s"
    assert not (tmp_path / "s").exists()
