"""iternn benchmarks: block maps vs the native torch modules, as interleaved ratios.

Run ``make bench`` (or ``.venv/bin/python benchmarks/run.py``). Options:

    --quick          smoke run: small sizes, few repetitions (< 30 s)
    --case NAME      run only this case (repeatable): a case ("mlp_large", "mlp_small",
                     "rnn", "resnet", "lstm", "gru") or one mode of it ("mlp_large/fwd",
                     "rnn/fwdbwd")
    --reps N         repetitions per case (default 11 full, 3 quick; at least 5 in full)
    --json FILE      also write the results as JSON to FILE
    --list           list the cases and exit

Every case compares, INTERLEAVED inside each repetition (A, B, C, then the next
repetition in a rotated order), the torch module, the iternn map and, for the MLP and
RNN cases, a naive reference: the whole state packed into one vector, one dense N x N
matrix, iterated. The CNN, LSTM and GRU cases run at 2 threads. Each
repetition times a few calls with ``time.perf_counter`` after warm-up; the reported
ratio is the median over repetitions of (impl time / torch time) in that repetition,
so slow drifts of this noisy shared machine cancel. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    import iternn
except ImportError:  # running from a checkout without an installed package
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))
    import iternn


# ============================================================================ naive reference
class DenseReference(nn.Module):
    """The naive big-matrix iteration of a block map (the reference column).

    The whole state is one vector ``z`` of size ``N = sum of slot sizes``; every block
    is placed in one dense ``N x N`` matrix ``W`` at row = destination, column = source;
    slot biases and block biases go into one bias vector. One application is
    ``z' = act(b + W z)`` with the per-slot activations applied to slices. Frozen
    (held or forced) slots are re-written into their slice before every application.
    Only plain ``nn.Linear`` blocks are supported (that is all the benchmarks use).
    """

    def __init__(self, m: iternn.BlockMap) -> None:
        super().__init__()
        names = list(m.slots)
        sizes = [m.slots[s] for s in names]
        offsets, off = {}, 0
        for s, n in zip(names, sizes):
            offsets[s] = off
            off += n
        ref = next(iter(m.parameters()))
        n_total = off
        W = torch.zeros(n_total, n_total, dtype=ref.dtype, device=ref.device)
        b = torch.zeros(n_total, dtype=ref.dtype, device=ref.device)
        with torch.no_grad():
            for dst, src in m.edges:
                blk = m.block(dst, src)
                if type(blk) is not nn.Linear:
                    raise iternn.MapTypeError(f"block {dst!r} <- {src!r} is {type(blk).__name__}: "
                                              "DenseReference supports nn.Linear blocks only")
                r, c = offsets[dst], offsets[src]
                W[r : r + m.slots[dst], c : c + m.slots[src]] = blk.weight
                if blk.bias is not None:
                    b[r : r + m.slots[dst]] += blk.bias
            for s in names:
                sb = m.bias(s)
                if sb is not None:
                    b[offsets[s] : offsets[s] + m.slots[s]] += sb
        self.W = nn.Parameter(W)
        self.b = nn.Parameter(b)
        self.names = names
        self.sizes = sizes
        self.acts = nn.ModuleDict({s: m.activation(s) for s in names if m.activation(s) is not None})

    def step(self, parts: list[Tensor], frozen: dict[str, Tensor]) -> list[Tensor]:
        """One application on the state kept as per-slot slices of one packed vector.

        Frozen slots are (re-)written into their slice first (the hold of ``x`` / the
        forcing of eq. 11), then the state is packed into ``z`` (``B x N``) and
        ``z' = act(b + W z)`` is computed with one ``N x N`` matmul.
        """
        z = torch.cat([frozen.get(s, p) for s, p in zip(self.names, parts)], dim=-1)
        pre = F.linear(z, self.W, self.b)  # (B, N): row = destination
        out = []
        for s, p in zip(self.names, torch.split(pre, self.sizes, dim=-1)):
            if s in frozen:
                out.append(frozen[s])
            elif s in self.acts:
                out.append(self.acts[s](p))
            else:
                out.append(p)
        return out

    def init(self, state: dict[str, Tensor], batch: tuple[int, ...], like: Tensor) -> list[Tensor]:
        return [state[s] if s in state else like.new_zeros(*batch, n) for s, n in zip(self.names, self.sizes)]

    def run_held(self, x: Tensor, steps: int, input: str = "x", output: str = "y") -> Tensor:
        """MLP use: ``x`` held, ``steps`` applications from ``z0 = (x, 0, ...)``."""
        parts = self.init({input: x}, tuple(x.shape[:-1]), x)
        for _ in range(steps):
            parts = self.step(parts, {input: x})
        return parts[self.names.index(output)]

    def run_forced(self, xs: Tensor, h0: Tensor, input: str = "x", hidden: str = "h") -> Tensor:
        """RNN use: ``input`` overwritten with ``xs[t]`` before application ``t``; returns the
        trajectory of ``hidden``."""
        parts = self.init({hidden: h0}, tuple(h0.shape[:-1]), h0)
        i = self.names.index(hidden)
        outs = []
        for t in range(xs.shape[0]):
            parts = self.step(parts, {input: xs[t]})
            outs.append(parts[i])
        return torch.stack(outs)


# ============================================================================ timing
@dataclass
class Impl:
    name: str
    fn: Callable[[], object]
    calls: int = 1
    t_call: float = 0.0


@dataclass
class Result:
    case: str
    mode: str
    impl: str
    target: float | None
    median_s: float
    ratio: float
    ratio_iqr: tuple[float, float]
    best_s: float
    best_ratio: float
    times_s: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    calls: int = 1


def _time_calls(fn: Callable[[], object], calls: int) -> list[float]:
    """Seconds of each of ``calls`` consecutive calls."""
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def calibrate(impls: list[Impl], chunk_s: float, warmup: int, max_calls: int) -> float:
    """Warm every impl up, choose its calls per repetition (~chunk_s); return one rep's cost."""
    cost = 0.0
    for impl in impls:
        first = _time_calls(impl.fn, 1)[0]  # the first call pays one-off costs
        # slow impls (the naive reference) get a single further call
        ts = _time_calls(impl.fn, 1 if first > 0.25 else max(1, warmup - 1))
        impl.t_call = min(ts)
        impl.calls = max(1, min(max_calls, round(chunk_s / max(impl.t_call, 1e-7))))
        cost += impl.calls * impl.t_call
    return cost


def fit_budget(impls: list[Impl], rep_cost: float, budget_s: float, reps: int, min_reps: int) -> int:
    """Repetitions that fit ``budget_s`` (never fewer than ``min_reps``; then fewer calls)."""
    fit = int(budget_s / max(rep_cost, 1e-9))
    if fit >= min_reps:
        return min(reps, fit)
    scale = budget_s / (min_reps * rep_cost)
    for impl in impls:
        impl.calls = max(1, int(impl.calls * scale))
    return min_reps


def measure(impls: list[Impl], reps: int) -> dict[str, tuple[list[float], list[float], float]]:
    """Interleaved timing: per impl, its per-repetition times, ratios to impls[0], best call.

    In repetition ``r`` every impl runs its ``calls`` calls, one impl after the other, in
    an order rotated by ``r`` (no impl always runs first or after the same one). The
    time of an impl in a repetition is the median of its individually timed calls, so a
    call stalled by another process (a preempted OpenMP thread) does not count; the
    ratio of a repetition compares impls measured within the same ~second.
    """
    times: dict[str, list[float]] = {i.name: [] for i in impls}
    best: dict[str, float] = {i.name: float("inf") for i in impls}
    gc_was = gc.isenabled()
    try:
        for r in range(reps):
            k = r % len(impls)
            order = impls[k:] + impls[:k]
            gc.collect()
            gc.disable()
            for impl in order:
                ts = _time_calls(impl.fn, impl.calls)
                times[impl.name].append(statistics.median(ts))
                best[impl.name] = min(best[impl.name], min(ts))
            if gc_was:
                gc.enable()
    finally:
        if gc_was:
            gc.enable()
    base = times[impls[0].name]
    return {k: (v, [a / b for a, b in zip(v, base)], best[k]) for k, v in times.items()}


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


# ============================================================================ cases
def _zero(*mods: nn.Module) -> None:
    for mod in mods:
        for p in mod.parameters():
            p.grad = None


def _fwd(module_call: Callable[[], Tensor]) -> Callable[[], object]:
    def run():
        with torch.no_grad():
            return module_call()
    return run


def _fwdbwd(module_call: Callable[[], Tensor], *mods: nn.Module) -> Callable[[], object]:
    def run():
        _zero(*mods)
        module_call().sum().backward()
    return run


def _check(label: str, got: Tensor, want: Tensor, tol: float) -> tuple[str, float, bool]:
    err = (got - want).abs().max().item()
    ok = err <= tol
    print(f"  check {label:<38} max|diff| = {err:.2e}  (tol {tol:.0e})  {'OK' if ok else 'FAIL'}")
    return label, err, ok


def mlp_case(name: str, sizes: list[int], batch: int, seed: int = 0):
    """nn.Sequential MLP (ReLU) vs iternn.from_mlp vs the dense reference."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    seq = nn.Sequential(*layers)
    net = iternn.from_mlp(seq)
    dense = DenseReference(net.map)
    L = len(sizes) - 1
    x = torch.randn(batch, sizes[0])
    with torch.no_grad():
        want = seq(x)
        checks = [
            _check(f"{name}: from_mlp vs nn.Sequential", net(x), want, 1e-5),
            _check(f"{name}: dense reference vs nn.Sequential", dense.run_held(x, L), want, 1e-4),
        ]
    impls = {
        "fwd": [
            Impl("torch", _fwd(lambda: seq(x))),
            Impl("iternn", _fwd(lambda: net(x))),
            Impl("naive-W", _fwd(lambda: dense.run_held(x, L))),
        ],
        "fwdbwd": [
            Impl("torch", _fwdbwd(lambda: seq(x), seq)),
            Impl("iternn", _fwdbwd(lambda: net(x), net)),
            Impl("naive-W", _fwdbwd(lambda: dense.run_held(x, L), dense)),
        ],
    }
    return impls, checks


def rnn_case(name: str, n_in: int, H: int, batch: int, T: int, seed: int = 0):
    """nn.RNN(tanh) vs iternn.from_rnn (the forced (x, h1) block map) vs the dense reference."""
    torch.manual_seed(seed)
    rnn = nn.RNN(n_in, H, nonlinearity="tanh")  # time first, like iterate's force
    xs = torch.randn(T, batch, n_in)
    h0 = torch.zeros(batch, H)
    h0_rnn = h0.unsqueeze(0)
    with torch.no_grad():
        want = rnn(xs, h0_rnn)[0]
    net = iternn.from_rnn(rnn)  # a converter that fails or disagrees fails the benchmark
    (hidden,) = net.layer_slots

    def map_call() -> Tensor:
        return net(xs, h0_rnn)[0]

    dense = DenseReference(net.map)
    with torch.no_grad():
        checks = [
            _check(f"{name}: map (iternn.from_rnn) vs nn.RNN", map_call(), want, 1e-5),
            _check(f"{name}: dense reference vs nn.RNN",
                   dense.run_forced(xs, h0, hidden=hidden), want, 1e-4),
        ]
    impls = {
        "fwd": [
            Impl("torch", _fwd(lambda: rnn(xs, h0_rnn)[0])),
            Impl("iternn", _fwd(map_call)),
            Impl("naive-W", _fwd(lambda: dense.run_forced(xs, h0, hidden=hidden))),
        ],
        "fwdbwd": [
            Impl("torch", _fwdbwd(lambda: rnn(xs, h0_rnn)[0], rnn)),
            Impl("iternn", _fwdbwd(map_call, net)),
            Impl("naive-W", _fwdbwd(lambda: dense.run_forced(xs, h0, hidden=hidden), dense)),
        ],
    }
    return impls, checks


class _BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the shortcut (identity, or a strided 1x1 conv + BN)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.short = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.short(x))


def resnet(widths: tuple[int, ...] = (16, 32), classes: int = 10) -> nn.Sequential:
    """A ResNet-style CNN for 3x32x32 inputs: stem, one basic block per width (stride 2
    from the second on), global average pooling, a linear classifier."""
    layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, padding=1, bias=False),
                               nn.BatchNorm2d(widths[0]), nn.ReLU()]
    c = widths[0]
    for i, w in enumerate(widths):
        layers.append(_BasicBlock(c, w, 1 if i == 0 else 2))
        c = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes)]
    return nn.Sequential(*layers)


def resnet_case(name: str, widths: tuple[int, ...], batch: int, seed: int = 0):
    """A ResNet-style CNN (train mode: BatchNorm batch statistics) vs iternn.from_module."""
    torch.manual_seed(seed)
    model = resnet(widths)
    x = torch.randn(batch, 3, 32, 32)
    net = iternn.from_module(model, x)  # a converter that fails or disagrees fails the benchmark
    model.eval()
    net.eval()
    with torch.no_grad():
        checks = [_check(f"{name}: from_module vs source (eval)", net(x), model(x), 1e-4)]
    model.train()
    net.train()
    impls = {
        "fwd": [Impl("torch", _fwd(lambda: model(x))), Impl("iternn", _fwd(lambda: net(x)))],
        "fwdbwd": [Impl("torch", _fwdbwd(lambda: model(x), model)),
                   Impl("iternn", _fwdbwd(lambda: net(x), net))],
    }
    return impls, checks


def gated_case(name: str, cell: str, n_in: int, H: int, layers: int, batch: int, T: int,
               seed: int = 0):
    """nn.LSTM / nn.GRU vs iternn.from_lstm / iternn.from_gru (the forced gate maps)."""
    torch.manual_seed(seed)
    source = (nn.LSTM if cell == "lstm" else nn.GRU)(n_in, H, num_layers=layers)
    convert = iternn.from_lstm if cell == "lstm" else iternn.from_gru
    net = convert(source)
    xs = torch.randn(T, batch, n_in)
    with torch.no_grad():
        checks = [_check(f"{name}: {convert.__name__} vs nn.{type(source).__name__}",
                         net(xs)[0], source(xs)[0], 1e-5)]
    impls = {
        "fwd": [Impl("torch", _fwd(lambda: source(xs)[0])), Impl("iternn", _fwd(lambda: net(xs)[0]))],
        "fwdbwd": [Impl("torch", _fwdbwd(lambda: source(xs)[0], source)),
                   Impl("iternn", _fwdbwd(lambda: net(xs)[0], net))],
    }
    return impls, checks


#: Threads for the cases that fix them (the others run at torch's default).
THREADS = {"resnet": 2, "lstm": 2, "gru": 2}

# name -> (builder, full kwargs, quick kwargs, description, targets per mode)
CASES = {
    "mlp_large": (
        mlp_case,
        dict(sizes=[784, 1024, 1024, 1024, 10], batch=256),
        dict(sizes=[784, 256, 256, 256, 10], batch=64),
        "MLP {sizes} ReLU, batch {batch}, float32",
        {"fwd": 1.05, "fwdbwd": 1.05},
    ),
    "mlp_small": (
        mlp_case,
        dict(sizes=[32, 64, 64, 10], batch=32),
        dict(sizes=[32, 64, 64, 10], batch=32),
        "MLP {sizes} ReLU, batch {batch}, float32",
        {"fwd": 1.15, "fwdbwd": 1.15},
    ),
    "rnn": (
        rnn_case,
        dict(n_in=64, H=256, batch=64, T=100),
        dict(n_in=64, H=128, batch=32, T=25),
        "RNN tanh input {n_in}, hidden {H}, batch {batch}, T {T}, float32",
        {"fwd": 1.0, "fwdbwd": 1.15},
    ),
    "resnet": (
        resnet_case,
        dict(widths=(16, 32), batch=32),
        dict(widths=(8, 16), batch=8),
        "ResNet-style CNN 3x32x32, widths {widths}, batch {batch}, train mode, float32, 2 threads",
        {"fwd": None, "fwdbwd": 1.10},
    ),
    "lstm": (
        gated_case,
        dict(cell="lstm", n_in=64, H=128, layers=2, batch=32, T=50),
        dict(cell="lstm", n_in=16, H=32, layers=2, batch=8, T=10),
        "nn.LSTM({n_in}, {H}, num_layers={layers}), batch {batch}, T {T}, float32, 2 threads",
        {"fwd": 1.15, "fwdbwd": 1.30},
    ),
    "gru": (
        gated_case,
        dict(cell="gru", n_in=64, H=128, layers=2, batch=32, T=50),
        dict(cell="gru", n_in=16, H=32, layers=2, batch=8, T=10),
        "nn.GRU({n_in}, {H}, num_layers={layers}), batch {batch}, T {T}, float32, 2 threads",
        {"fwd": 1.15, "fwdbwd": 1.30},
    ),
}
MODES = ("fwd", "fwdbwd")
MODE_LABEL = {"fwd": "forward (no_grad)", "fwdbwd": "forward+backward"}


def select(names: list[str] | None) -> list[tuple[str, str]]:
    if not names:
        return [(c, m) for c in CASES for m in MODES]
    out = []
    for n in names:
        case, _, mode = n.partition("/")
        if case not in CASES or (mode and mode not in MODES):
            valid = ", ".join(list(CASES) + [f"{c}/{m}" for c in CASES for m in MODES])
            raise SystemExit(f"unknown case {n!r}; valid: {valid}")
        for m in (mode,) if mode else MODES:
            if (case, m) not in out:
                out.append((case, m))
    return out


def print_table(rows: list[Result], desc: str) -> None:
    print(f"  {desc}")
    head = (f"  {'case':<17} {'impl':<8} {'median/call':>12} {'ratio':>6} {'IQR of ratio':>14} "
            f"{'best/call':>11} {'best ratio':>10} {'target':>7}  verdict")
    print(head)
    print("  " + "-" * (len(head) - 2))
    for r in rows:
        if r.impl == "torch":
            ratio, iqr, bratio, tgt, verdict = "1.00", "", "1.00", "", "(baseline)"
        else:
            ratio = f"{r.ratio:.2f}"
            iqr = f"[{r.ratio_iqr[0]:.2f}, {r.ratio_iqr[1]:.2f}]"
            bratio = f"{r.best_ratio:.2f}"
            tgt = f"<={r.target:.2f}" if r.target is not None else "-"
            if r.target is None:
                verdict = "(reference)" if r.impl != "iternn" else "(no target)"
            else:
                verdict = "MEETS" if r.ratio <= r.target else "MISSES"
                if _noisy(r):
                    verdict += " (noisy: rerun)"
        case = f"{r.case}/{r.mode}"
        print(f"  {case:<17} {r.impl:<8} {_ms(r.median_s):>12} {ratio:>6} {iqr:>14} "
              f"{_ms(r.best_s):>11} {bratio:>10} {tgt:>7}  {verdict}")
    print()


NOISY_IQR = 0.10  # an IQR of the ratio wider than this: the verdict is not reliable


def _noisy(r: Result) -> bool:
    return r.ratio_iqr[1] - r.ratio_iqr[0] > NOISY_IQR


def _ms(s: float) -> str:
    return f"{s * 1e3:.3f} ms" if s < 1 else f"{s:.3f} s"


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _load_warning(load: list[float] | None) -> str:
    if load and load[0] > (os.cpu_count() or 1) * 0.75:
        return ("  -- WARNING: other processes are using the CPUs; with torch's default threads a "
                "stalled thread inflates times, trust the ratios only where the IQR is narrow")
    return ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: small sizes, few repetitions")
    ap.add_argument("--case", action="append", metavar="NAME", help="case or case/mode (repeatable)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 11; 3 with --quick)")
    ap.add_argument("--json", metavar="FILE", help="write results as JSON to FILE")
    ap.add_argument("--list", action="store_true", help="list cases and exit")
    ap.add_argument("--budget", type=float, default=None, metavar="S",
                    help="seconds of timing for the whole run (default 160; 15 with --quick): "
                         "repetitions are cut to fit, never below 5 (3 quick)")
    args = ap.parse_args(argv)
    if args.list:
        for c, (_, full, quick, desc, targets) in CASES.items():
            print(f"{c:<10} {desc.format(**full)}   targets {targets}   (quick: {desc.format(**quick)})")
        return 0
    wanted = select(args.case)
    reps = args.reps or (3 if args.quick else 11)
    if not args.quick and reps < 5:
        raise SystemExit("--reps must be at least 5 in a full run (median of >= 5)")
    chunk_s = 0.02 if args.quick else 0.12
    warmup = 2 if args.quick else 3
    max_calls = 200
    min_reps = min(reps, 3 if args.quick else 5)
    budget_s = args.budget if args.budget is not None else (15.0 if args.quick else 160.0)

    t_start = time.perf_counter()
    print(
        f"iternn {iternn.__version__} | torch {torch.__version__} | threads {torch.get_num_threads()} "
        f"| cpus {os.cpu_count()} | {platform.machine()} | python {platform.python_version()}"
    )
    print(f"mode: {'QUICK (smoke sizes; targets not meaningful)' if args.quick else 'full'}, "
          f"up to {reps} interleaved repetitions (>= {min_reps}), ~{chunk_s * 1e3:.0f} ms of calls "
          f"per impl per repetition, timing budget {budget_s:.0f} s")
    load0 = _load()
    print(f"load average at start: {load0}" + _load_warning(load0) + "\n")

    results: list[Result] = []
    all_checks = []
    done: list[tuple[str, str, int]] = []
    default_threads = torch.get_num_threads()
    for case in dict.fromkeys(c for c, _ in wanted):
        builder, full, quick, desc, targets = CASES[case]
        kwargs = quick if args.quick else full
        torch.set_num_threads(THREADS.get(case, default_threads))
        print(f"== {case}: {desc.format(**kwargs)}")
        impls_by_mode, checks = builder(case, **kwargs)
        all_checks += checks
        for mode in (m for c, m in wanted if c == case):
            impls = impls_by_mode[mode]
            rep_cost = calibrate(impls, chunk_s, warmup, max_calls)
            left = len(wanted) - len(done)
            n_reps = fit_budget(impls, rep_cost, (budget_s - (time.perf_counter() - t_start)) / left,
                                reps, min_reps)
            data = measure(impls, n_reps)
            done.append((case, mode, n_reps))
            rows = []
            best_base = data[impls[0].name][2]
            for impl in impls:
                ts, rs, best = data[impl.name]
                tgt = targets.get(mode) if impl.name == "iternn" else None
                rows.append(Result(
                    case, mode, impl.name, tgt, statistics.median(ts), statistics.median(rs),
                    (_quantile(rs, 0.25), _quantile(rs, 0.75)), best, best / best_base,
                    ts, rs, impl.calls,
                ))
            print_table(rows, f"{MODE_LABEL[mode]}: {n_reps} repetitions; calls per repetition: "
                        + ", ".join(f"{i.name} {i.calls}" for i in impls))
            results += rows

    elapsed = time.perf_counter() - t_start
    summary = [
        f"{r.case + '/' + r.mode:<17} {r.ratio:.2f}  IQR [{r.ratio_iqr[0]:.2f}, {r.ratio_iqr[1]:.2f}]  "
        f"best {r.best_ratio:.2f}  target <= {r.target:.2f}  "
        f"{'MEETS' if r.ratio <= r.target else 'MISSES'}{' (noisy: rerun)' if _noisy(r) else ''}"
        for r in results if r.target is not None
    ]
    print("summary (iternn / torch, median of interleaved per-repetition ratios):")
    for s in summary:
        print("  " + s)
    bad = [c for c in all_checks if not c[2]]
    load1 = _load()
    print(f"correctness checks: {len(all_checks) - len(bad)}/{len(all_checks)} OK; "
          f"total time {elapsed:.1f} s; "
          f"load average at end: {load1}" + _load_warning(load1))

    payload = {
        "torch": torch.__version__, "iternn": iternn.__version__, "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(), "quick": args.quick, "elapsed_s": round(elapsed, 2),
        "load_start": load0, "load_end": load1,
        "reps": {f"{c}/{m}": n for c, m, n in done},
        "checks": [{"label": l, "max_abs_diff": e, "ok": ok} for l, e, ok in all_checks],
        "results": [
            {"case": r.case, "mode": r.mode, "impl": r.impl, "median_s": r.median_s, "ratio": r.ratio,
             "ratio_q25": r.ratio_iqr[0], "ratio_q75": r.ratio_iqr[1], "best_s": r.best_s,
             "best_ratio": r.best_ratio, "target": r.target,
             "meets": (r.ratio <= r.target) if r.target is not None else None,
             "noisy": _noisy(r),
             "calls_per_rep": r.calls, "times_s": r.times_s, "ratios": r.ratios}
            for r in results
        ],
    }
    print("BENCH_JSON " + json.dumps({k: v for k, v in payload.items()} | {
        "results": [{k: v for k, v in d.items() if k not in ("times_s", "ratios")}
                    for d in payload["results"]]
    }, separators=(",", ":")))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
        print(f"wrote {args.json}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
