"""Sparse-kernel benchmarks: SparseLinear vs a dense masked block, as ratios.

Run ``.venv/bin/python benchmarks/sparse.py`` (about 4 minutes; ``--quick``: smaller
sizes, < 30 s). Options:

    --quick            smoke run: small sizes, 3 repetitions
    --case NAME        only this case (repeatable): block, floor, memory, mlp, profile,
                       crossover (profile and crossover are not in the default set;
                       crossover measured the constant in src/iternn/sparse/kernels.py
                       and takes a few minutes)
    --density D        density of the matched map in the mlp and profile cases
                       (repeatable; default 0.1 and 0.01 for mlp, 0.1 for profile)
    --reps N           repetitions per timing (default 7 full, 3 quick; at least 5 full)
    --threads N        torch.set_num_threads(N) (default: torch's, 2 here)

Cases:

* ``block``: one random 4096x4096 block, batch 256, densities 0.5 ... 0.01, forward +
  backward (a fixed random upstream gradient; parameter and input gradients):
  SparseLinear (csr backend) and SparseLinear (backend="auto") vs MaskedLinear (dense
  masked), and vs plain ``torch.sparse.mm`` autograd on a CSR tensor built from values
  with ``requires_grad`` (COO was 5-15x slower than CSR; see the notes). Targets: csr
  >= 8x faster than masked at 10 %, >= 40x at 1 % (the flop ideal: 10x and 100x).
* ``floor``: one thread, the block case's 4096x4096 block at 10 % and 1 %, batch 256: the
  CSR forward's time per stored entry and batch tile of 32 (row-major operands as torch
  hands them, and feature-major ones, whose packs and results are plain copies) against
  ``benchmarks/floor.c``, the bare loop of the same tile-row reads and multiply-adds
  (no packing, checks, prefetching or bias), and against a dense GEMM's time for the
  same 32 multiply-adds; the bound this puts on the forward's speedup over a dense GEMM
  of the block; and SparseLinear's forward + backward per entry, tile and multiply-add.
* ``memory``: training steps (forward, backward, SGD step) of a 20000x20000 block at 1 %
  density, batch 64, each module in its own fresh subprocess (``sys.executable``); the
  peak RSS (``ru_maxrss``) of each, and of a process that only imports torch and iternn
  and makes the input. Target: sparse < 10 % of masked.
* ``mlp``: a training step (forward, backward, SGD step) of an MLP 784-1024-1024-10 and
  of ``iternn.sparse.builders.matched_map(mlp, density=d, seed=0)`` (same trainable
  count), batch 256, at densities 0.1 and 0.01. Targets: map / MLP <= 4 at 0.1, <= 2 at
  0.01.
* ``profile``: where the matched map's training step spends its time: a few steps
  under torch.profiler, split per phase (forward, backward, optimizer), per application
  and per block (or fused product), forward and backward. The engine marks its
  applications, slots, blocks and products with ``iternn.*`` ranges when a profiler is
  running; backward nodes are attributed to the range that created them through their
  sequence numbers.
* ``crossover``: SparseLinear csr / SparseLinear dense backend for several block sizes,
  batches 32 and 256, densities 0.5 ... 0.01 (the table in kernels.py).

Timing: every implementation is called a few times in each repetition, one after the
other (interleaved, order rotated each repetition); its time in a repetition is the
median of its calls; the reported ratio is the median over repetitions of the ratio
inside each repetition, so the drifts of this shared, noisy machine cancel.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

try:
    import iternn  # noqa: F401
except ImportError:  # running from a checkout without an installed package
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))
from iternn import count_trainable
from iternn.sparse import kernels, native
from iternn.sparse.builders import matched_map
from iternn.sparse.linear import MaskedLinear, SparseLinear
from iternn.sparse.sampling import random_indices


# ============================================================================ timing
def _calls_for(fn, target_s: float, max_calls: int) -> int:
    fn()  # warm-up (allocator, MKL handles)
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    return max(1, min(max_calls, int(target_s / max(dt, 1e-6))))


def interleaved(impls: dict, reps: int, target_s: float = 0.15, max_calls: int = 50) -> dict:
    """Per-repetition median call times (s) of every implementation, interleaved.

    ``times["best"][name]`` is the fastest single call of ``name`` over all
    repetitions: interference only ever adds time, so on a busy machine the ratio of
    best calls is the less noisy view of what the code costs.
    """
    calls = {k: _calls_for(f, target_s, max_calls) for k, f in impls.items()}
    names = list(impls)
    times = {k: [] for k in names}
    best = {k: math.inf for k in names}
    for r in range(reps):
        order = names[r % len(names):] + names[: r % len(names)]
        gc.collect()
        gc.disable()
        try:
            for k in order:
                ts = []
                for _ in range(calls[k]):
                    t0 = time.perf_counter()
                    impls[k]()
                    ts.append(time.perf_counter() - t0)
                times[k].append(statistics.median(ts))
                best[k] = min(best[k], min(ts))
        finally:
            gc.enable()
    times["best"] = best
    return times


def ratio_stats(times: dict, num: str, den: str) -> tuple[float, float, float]:
    """Median and IQR over repetitions of times[num] / times[den] (per repetition)."""
    rs = sorted(a / b for a, b in zip(times[num], times[den]))
    q = statistics.quantiles(rs, n=4) if len(rs) >= 2 else [rs[0]] * 3
    return statistics.median(rs), q[0], q[2]


def _ms(ts: list[float]) -> str:
    return f"{statistics.median(ts) * 1e3:9.2f} ms"


# ============================================================================ block case
def _fwd_bwd(module, x, gy):
    def run():
        for p in module.parameters():
            p.grad = None
        x.grad = None
        module(x).backward(gy)
    return run


class TorchKernel(torch.nn.Module):
    """``src`` (a csr SparseLinear) run through the torch.sparse (MKL) implementation of
    the CSR backend instead of the native kernels; shares ``src``'s parameters."""

    def __init__(self, src: SparseLinear) -> None:
        super().__init__()
        self.src = src

    def forward(self, x):
        s = self.src
        return kernels.sparse_linear(x, s.values, s.bias, s.pattern, kernel="torch")


class TorchSparseMM(torch.nn.Module):
    """``y = x W^T + b`` with plain torch.sparse.mm autograd on a CSR tensor whose values
    require grad (the tensor is rebuilt each call from the trainable values)."""

    def __init__(self, src: SparseLinear) -> None:
        super().__init__()
        self.crow = src.crow_indices.long()
        self.col = src.col_indices.long()
        self.shape = (src.out_features, src.in_features)
        self.values = torch.nn.Parameter(src.values.detach().clone())
        self.bias = torch.nn.Parameter(src.bias.detach().clone())

    def forward(self, x):
        w = torch.sparse_csr_tensor(self.crow, self.col, self.values, self.shape, check_invariants=False)
        return torch.sparse.mm(w, x.t()).t() + self.bias


def _masked_from(src: SparseLinear) -> MaskedLinear:
    mask = torch.zeros(src.out_features, src.in_features, dtype=torch.bool)
    idx = src.indices()
    mask[idx[0], idx[1]] = True
    m = MaskedLinear(src.in_features, src.out_features, mask=mask)
    with torch.no_grad():
        m.weight.zero_()
        m.weight[idx[0], idx[1]] = src.values
        m.bias.copy_(src.bias)
    return m


def case_block(quick: bool, reps: int) -> bool:
    n, batch = (1024, 64) if quick else (4096, 256)
    densities = (0.1, 0.01) if quick else (0.5, 0.25, 0.1, 0.05, 0.01)
    targets = {0.1: 8.0, 0.01: 40.0}
    print(f"\n== block: one random {n}x{n} block, batch {batch}, float32, forward+backward "
          f"(values/weight, bias and input gradients), {reps} repetitions ==")
    print("  speedup = masked time / impl time (median over interleaved repetitions; IQR in brackets)")
    header = (f"  {'density':>7}  {'impl':<24} {'median/call':>12}  {'speedup':>8}  "
              f"{'IQR':>16}  {'best/call':>12} {'best spd':>8}  {'target':>7}  verdict")
    print(header)
    print("  " + "-" * (len(header) - 2))
    ok = True
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, n, generator=gen).requires_grad_()
    gy = torch.randn(batch, n, generator=gen)
    for d in densities:
        sp = SparseLinear(n, n, density=d, backend="csr", generator=gen)
        auto = SparseLinear(n, n, indices=sp.indices(), backend="auto")
        with torch.no_grad():
            auto.values.copy_(sp.values)
            auto.bias.copy_(sp.bias)
        masked = _masked_from(sp)
        tsm = TorchSparseMM(sp)
        tk = TorchKernel(sp)
        # correctness: every implementation against the masked (dense) reference
        ref = None
        for name, m in (("masked", masked), ("csr", sp), ("auto", auto), ("csr torch", tk),
                        ("sparse.mm", tsm)):
            xx = x.detach().clone().requires_grad_()
            y = m(xx)
            y.backward(gy)
            src = m.src if isinstance(m, TorchKernel) else m
            wg = m.weight.grad[m.mask] if isinstance(m, MaskedLinear) else src.values.grad
            got = (y.detach(), xx.grad, wg, src.bias.grad)
            if ref is None:
                ref = got
            else:
                err = max(float((a - b).abs().max() / (a.abs().max() + 1e-30)) for a, b in zip(ref, got))
                if err > 1e-4:
                    print(f"  FAIL {name} at density {d}: max relative difference {err:.2e}")
                    ok = False
            m.zero_grad(set_to_none=True)
        impls = {
            "masked (dense)": _fwd_bwd(masked, x, gy),
            "SparseLinear csr": _fwd_bwd(sp, x, gy),
            "SparseLinear auto": _fwd_bwd(auto, x, gy),
            "csr, torch kernel": _fwd_bwd(tk, x, gy),
            "torch.sparse.mm": _fwd_bwd(tsm, x, gy),
        }
        times = interleaved(impls, reps, target_s=0.05 if quick else 0.15)
        base = "masked (dense)"
        for name in impls:
            med, lo, hi = ratio_stats(times, base, name)  # masked / impl = speedup
            # the targets are for the full-size case; --quick is a smoke run
            tgt = targets.get(d) if name == "SparseLinear csr" and not quick else None
            label = name + (f" [{auto.backend}]" if name == "SparseLinear auto" else "")
            if name == "SparseLinear csr":
                label += f" [{kernels.csr_kernel_for(x, sp.pattern)}]"
            verdict = "" if tgt is None else ("MEETS" if med >= tgt else "MISSES")
            if name == base:
                verdict = "(baseline)"
            best = times["best"][base] / times["best"][name]
            print(f"  {d:>7}  {label:<24} {_ms(times[name]):>12}  {med:7.2f}x  "
                  f"[{lo:6.2f}, {hi:6.2f}]  {times['best'][name] * 1e3:9.2f} ms {best:7.2f}x  "
                  f"{'>=' + str(tgt) + 'x' if tgt else '-':>7}  {verdict}")
        del sp, auto, masked, tsm, tk
        gc.collect()
    return ok


# ============================================================================ memory case
def memory_worker(kind: str, n: int, density: float, batch: int, steps: int) -> None:
    """Runs in a fresh subprocess; prints one JSON line with its peak RSS."""
    def rss_mb() -> float:
        # Peak RSS of this process: VmHWM, which exec resets. ru_maxrss survives exec on
        # Linux, so a child of a big parent inherits the parent's peak; it is printed
        # too (ru_maxrss_mb) for reference, but the table uses VmHWM.
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, n, generator=gen)
    start = rss_mb()
    t0 = time.perf_counter()
    if kind == "baseline":
        m = None
    elif kind == "sparse":
        m = SparseLinear(n, n, density=density, backend="csr", generator=gen)
    elif kind == "masked":
        idx = random_indices(n, n, round(density * n * n), generator=gen)
        mask = torch.zeros(n, n, dtype=torch.bool)
        mask[idx[0], idx[1]] = True
        del idx
        m = MaskedLinear(n, n, mask=mask, generator=gen)
        del mask
    else:
        raise SystemExit(f"unknown kind {kind!r}")
    build_s = time.perf_counter() - t0
    after_build = rss_mb()
    step_times = []
    if m is not None:
        opt = torch.optim.SGD(m.parameters(), lr=1e-3)
        for _ in range(steps):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = m(x).square().mean()
            loss.backward()
            opt.step()
            step_times.append(time.perf_counter() - t0)
    print(json.dumps({"kind": kind, "start_mb": start, "after_build_mb": after_build,
                      "peak_mb": rss_mb(), "build_s": build_s, "step_s": step_times,
                      "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def _run_worker(kind: str, n: int, density: float, batch: int, steps: int, timeout: float):
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-worker", kind, str(n),
           str(density), str(batch), str(steps)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    if out.returncode != 0:
        return None, f"exit status {out.returncode}: {out.stderr.strip().splitlines()[-1:] }"
    return json.loads(out.stdout.strip().splitlines()[-1]), None


def case_memory(quick: bool) -> bool:
    density, batch, steps = 0.01, 64, 3
    n = 3000 if quick else 20000
    # The dense-masked 20000 x 20000 block needs weight + mask + masked copy + two dense
    # gradients: ~1.6 GB each in float32, about 7 GB at peak. Run it when the machine has
    # the room; otherwise fall back to a proportionally smaller size and say so.
    avail_gb = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail_gb = int(line.split()[1]) / 2**20
    except OSError:
        pass
    need_gb = 5 * 4 * n * n / 2**30 + 1
    if avail_gb is not None and need_gb > 0.8 * avail_gb:
        n_new = int(((0.8 * avail_gb - 1) * 2**30 / 20) ** 0.5)
        print(f"  note: the masked {n}x{n} block needs ~{need_gb:.1f} GB, {avail_gb:.1f} GB "
              f"available; measuring {n_new}x{n_new} instead")
        n = n_new
    print(f"\n== memory: {n}x{n} block, density {density}, batch {batch}, {steps} training steps "
          f"(forward, backward, SGD step); each in a fresh subprocess ==")
    res = {}
    for kind in ("baseline", "sparse", "masked"):
        r, err = _run_worker(kind, n, density, batch, steps, timeout=240)
        if r is None:
            print(f"  {kind}: no result ({err})")
            return False
        res[kind] = r
    base = res["baseline"]["peak_mb"]
    print(f"  {'process':<28} {'peak RSS':>10} {'above baseline':>15} {'after build':>12} "
          f"{'ru_maxrss':>10} {'build':>8} {'median step':>12}")
    for kind, label in (("baseline", "baseline (torch + input)"), ("sparse", "SparseLinear (csr)"),
                        ("masked", "MaskedLinear (dense)")):
        r = res[kind]
        step = f"{statistics.median(r['step_s']):9.3f} s" if r["step_s"] else "-"
        print(f"  {label:<28} {r['peak_mb']:8.0f} MB {r['peak_mb'] - base:12.0f} MB "
              f"{r['after_build_mb']:9.0f} MB {r['ru_maxrss_mb']:7.0f} MB {r['build_s']:7.2f}s {step:>12}")
    ratio = res["sparse"]["peak_mb"] / res["masked"]["peak_mb"]
    ratio_above = (res["sparse"]["peak_mb"] - base) / max(res["masked"]["peak_mb"] - base, 1e-9)
    verdict = ("MEETS" if ratio < 0.10 else "MISSES") if not quick else "target is for 20000x20000"
    print(f"  sparse / masked peak RSS: {ratio:.3f} (target < 0.10: {verdict}); "
          f"above the baseline process: {ratio_above:.3f}")
    print("  (peak RSS = VmHWM of the worker; ru_maxrss is inherited across exec from this "
          "process, so it is shown for reference only)")
    return True


# ============================================================================ MLP case
#: Targets of the mlp case: matched-map step / MLP step at each density.
MLP_TARGETS = {0.1: 4.0, 0.01: 2.0}


def case_mlp(quick: bool, reps: int, density: float = 0.1) -> bool:
    batch = 64 if quick else 256
    print("\n== mlp: training step (forward, backward, SGD step) of an MLP 784-1024-1024-10 "
          f"vs matched_map(mlp, density={density}, seed=0), batch {batch} ==")
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(784, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024),
                              torch.nn.ReLU(), torch.nn.Linear(1024, 10))
    smap = matched_map(mlp, density=density, seed=0)
    print(f"  trainable: MLP {count_trainable(mlp):,}, matched map {count_trainable(smap):,} "
          f"(slot h: {smap.map.slots['h']})")
    backends = sorted({getattr(m, "backend", None) for m in smap.modules() if isinstance(m, SparseLinear)})
    print(f"  SparseLinear backends in the map: {backends or 'none'}")
    x = torch.randn(batch, 784)

    def step_of(model):
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def run():
            opt.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            opt.step()
        return run

    times = interleaved({"MLP": step_of(mlp), "matched map": step_of(smap)}, reps,
                        target_s=0.05 if quick else 0.15)
    med, lo, hi = ratio_stats(times, "matched map", "MLP")
    best = times["best"]["matched map"] / times["best"]["MLP"]
    target = None if quick else MLP_TARGETS.get(density)
    verdict = "" if target is None else f"  (target <= {target}: {'MEETS' if med <= target else 'MISSES'})"
    print(f"  MLP          {_ms(times['MLP'])}")
    print(f"  matched map  {_ms(times['matched map'])}   map / MLP time: {med:.2f} [{lo:.2f}, {hi:.2f}], "
          f"best calls {best:.2f}{verdict}")
    return True


# ============================================================================ profile
_UNIT = ("iternn.block ", "iternn.product ")


def _label_of(event, prefixes) -> str | None:
    """The name of the innermost enclosing range of ``event`` (itself included) whose
    name starts with one of ``prefixes``."""
    e = event
    while e is not None:
        if e.name.startswith(prefixes):
            return e.name
        e = e.cpu_parent
    return None


def _profile_split(events) -> tuple[dict, dict, dict]:
    """Per phase, per (application, unit) forward and backward milliseconds (summed
    over the profiled steps) from torch.profiler events: forward time is the duration
    of each ``iternn.block``/``iternn.product`` range (and the rest of each application
    goes to ``slot work``: bias, activation, additions); backward time is the duration
    of each autograd node, attributed to the range that created it through the node's
    sequence number."""
    phases: dict[str, float] = {}
    fwd: dict[tuple[str, str], float] = {}
    bwd: dict[tuple[str, str], float] = {}
    owner: dict[int, tuple[str, str]] = {}
    for e in events:
        ms = e.cpu_time_total / 1e3
        if e.name.startswith("phase "):
            phases[e.name[6:]] = phases.get(e.name[6:], 0.0) + ms
        elif e.name.startswith("iternn.application ") or e.name == "iternn.wavefront":
            key = (e.name.removeprefix("iternn."), "slot work (bias, activation, adds)")
            fwd[key] = fwd.get(key, 0.0) + ms
        elif e.name.startswith(_UNIT):
            app = _label_of(e, ("iternn.application ", "iternn.wavefront")) or "iternn.?"
            app = app.removeprefix("iternn.")
            unit = e.name.removeprefix("iternn.")
            fwd[(app, unit)] = fwd.get((app, unit), 0.0) + ms
            rest = (app, "slot work (bias, activation, adds)")
            fwd[rest] = fwd.get(rest, 0.0) - ms
        if e.sequence_nr >= 0 and not e.name.startswith("autograd::engine") and e.cpu_parent is not None \
                and not e.cpu_parent.name.startswith("autograd::engine"):
            unit = _label_of(e, _UNIT)
            app = _label_of(e, ("iternn.application ", "iternn.wavefront"))
            if app is not None:
                owner.setdefault(e.sequence_nr, (app.removeprefix("iternn."),
                                                 (unit or "iternn.slot work (bias, activation, adds)")
                                                 .removeprefix("iternn.")))
    for e in events:
        if e.name.startswith("autograd::engine::evaluate_function: ") and e.sequence_nr >= 0:
            key = owner.get(e.sequence_nr, ("-", "loss and gradient accumulation"))
            bwd[key] = bwd.get(key, 0.0) + e.cpu_time_total / 1e3
    return phases, fwd, bwd


def case_profile(quick: bool, reps: int, density: float = 0.1) -> bool:
    """Where a matched map's training step spends its time (see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    batch = 64 if quick else 256
    print(f"\n== profile: training step (forward, backward, SGD step) of matched_map(mlp "
          f"784-1024-1024-10, density={density}, seed=0), batch {batch} ==")
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(784, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024),
                              torch.nn.ReLU(), torch.nn.Linear(1024, 10))
    smap = matched_map(mlp, density=density, seed=0)
    sizes = ", ".join(f"{s}={n}" for s, n in smap.map.slots.items())
    print(f"  slots {sizes}; blocks: " + ", ".join(
        f"{k} {getattr(b, 'backend', type(b).__name__)} nnz={getattr(b, 'nnz', '-')}"
        for k, b in smap.map.blocks.items()))
    x = torch.randn(batch, 784)
    opt = torch.optim.SGD(smap.parameters(), lr=1e-3)

    def step() -> None:
        with record_function("phase optimizer"):
            opt.zero_grad(set_to_none=True)
        with record_function("phase forward"):
            loss = smap(x).square().mean()
        with record_function("phase backward"):
            loss.backward()
        with record_function("phase optimizer"):
            opt.step()

    for _ in range(2):
        step()
    steps = max(reps, 3)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    phases, fwd, bwd = _profile_split(prof.events())
    total = sum(phases.values())
    print(f"  per step (mean of {steps} profiled steps; the profiler adds some overhead):")
    for name in ("forward", "backward", "optimizer"):
        ms = phases.get(name, 0.0) / steps
        print(f"    {name:<10} {ms:9.2f} ms  {100 * phases.get(name, 0.0) / total:5.1f} %")
    print(f"    {'total':<10} {total / steps:9.2f} ms")
    print("  per application and block/product, ms per step (forward | backward):")
    keys = sorted(set(fwd) | set(bwd), key=lambda k: (k[0] == "-", k[0], k[1]))
    for app, unit in keys:
        f, b = fwd.get((app, unit), 0.0) / steps, bwd.get((app, unit), 0.0) / steps
        print(f"    {app:<15} {unit:<36} {f:9.2f} | {b:9.2f}")
    if not fwd:
        print("  (no iternn.* ranges in the trace: the engine adds them only when the profiler is on)")
    return True


# ============================================================================ crossover
def case_crossover(quick: bool, reps: int) -> bool:
    shapes = [(1024, 1024, 32), (1024, 1024, 256)] if quick else [
        (64, 64, 32), (128, 128, 32), (128, 128, 256),
        (256, 256, 32), (256, 256, 256), (1024, 1024, 32), (1024, 1024, 256),
        (4096, 4096, 32), (4096, 4096, 256), (3928, 784, 256)]
    densities = (0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1, 0.05)
    print(f"\n== crossover: SparseLinear csr time / dense-backend time, forward+backward, "
          f"float32, {reps} repetitions (< 1: csr faster); median of per-repetition ratios, "
          f"then (in brackets) the ratio of the best calls ==")
    print(f"  {'out x in':<11} {'batch':>5}  " + "  ".join(f"{'d=' + str(d):>13}" for d in densities))
    gen = torch.Generator().manual_seed(0)
    for out_f, in_f, batch in shapes:
        row = []
        x = torch.randn(batch, in_f, generator=gen).requires_grad_()
        gy = torch.randn(batch, out_f, generator=gen)
        for d in densities:
            a = SparseLinear(in_f, out_f, density=d, backend="csr", generator=gen)
            b = SparseLinear(in_f, out_f, indices=a.indices(), backend="dense")
            times = interleaved({"csr": _fwd_bwd(a, x, gy), "dense": _fwd_bwd(b, x, gy)}, reps, target_s=0.1)
            best = times["best"]["csr"] / times["best"]["dense"]
            row.append(f"{ratio_stats(times, 'csr', 'dense')[0]:5.2f} [{best:5.2f}]")
        print(f"  {str(out_f) + 'x' + str(in_f):<11} {batch:>5}  " + "  ".join(f"{r:>13}" for r in row))
    print(f"  CSR kernel: {kernels.csr_kernel_for(x, a.pattern)}; crossover in use "
          f"{kernels.crossover_density()} (CROSSOVER_DENSITY = {kernels.CROSSOVER_DENSITY}, "
          f"TORCH_CROSSOVER_DENSITY = {kernels.TORCH_CROSSOVER_DENSITY}), "
          f"SMALL_BLOCK = {kernels.SMALL_BLOCK}")
    return True


# ============================================================================ floor
_TILE = 32  # float32 lanes of a batch tile (csr_kernels.c: NVEC * VL; floor.c: TILE)


def _floor_library():
    """benchmarks/floor.c built (cached like the kernels) and loaded, or None with the
    reason printed."""
    import ctypes
    from pathlib import Path

    from iternn.core.native import CSource, NativeBuildError, open_library

    source = CSource(Path(__file__).with_name("floor.c"), "bench_floor",
                     (("-O3", "-march=native"), ("-O3",)))
    try:
        path, _ = source.build()
        lib = open_library(path, "floor_abi", 1)
    except NativeBuildError as e:
        print(f"  floor loop unavailable: {e}")
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.floor_rows.argtypes = [ptr, ptr, ptr, ptr, i64, i64, ptr]
    lib.floor_rows.restype = None
    return lib


def _floor_impls(lib, klib, sp: SparseLinear, x: torch.Tensor, tiles: int,
                 gen: torch.Generator) -> tuple[float, dict]:
    """The CSR forward of ``sp``'s pattern on ``x`` (row-major, and feature-major: then
    the packs and results are plain copies) and the floor loop over the same pattern;
    first, the floor loop's max relative difference from the product it stands for."""
    n, tile = sp.out_features, _TILE
    crow, col, vals = sp.crow_indices, sp.col_indices, sp.values.detach()
    x_fm = x.t().contiguous().t()
    y_fm = torch.empty(n, x.shape[0]).t()
    pack = torch.randn(sp.in_features, tile, generator=gen)  # the loop's time does not depend on the numbers
    out = torch.empty(n, tile)
    # the loop computes the product it stands for: W @ pack (no bias)
    lib.floor_rows(pack.data_ptr(), crow.data_ptr(), col.data_ptr(), vals.data_ptr(), n, 1, out.data_ptr())
    w = torch.zeros(n, sp.in_features)
    idx = sp.indices()
    w[idx[0], idx[1]] = vals
    ref = w @ pack
    err = float((out - ref).abs().max() / ref.abs().max())
    xg = x.detach().clone().requires_grad_()
    gy = torch.randn(x.shape[0], n, generator=gen)
    return err, {
        "fwd+bwd": _fwd_bwd(sp, xg, gy),
        "kernel": lambda: native.spmm(klib, crow, col, vals, x, n, checked=True),
        "feature-major": lambda: native.spmm(klib, crow, col, vals, x_fm, n, out=y_fm, checked=True),
        "floor": lambda: lib.floor_rows(pack.data_ptr(), crow.data_ptr(), col.data_ptr(), vals.data_ptr(),
                                        n, tiles, out.data_ptr()),
    }


def case_floor(quick: bool, reps: int) -> bool:
    """The CSR forward's time per stored entry and batch tile against the bare loop of
    its memory accesses (benchmarks/floor.c) and against a dense GEMM's time for the
    same 32 multiply-adds; one thread."""
    n, batch = (1024, 64) if quick else (4096, 256)
    tile = _TILE
    tiles = -(-batch // tile)
    print(f"\n== floor: CSR forward vs the bare loop of its tile-row reads, {n}x{n}, batch "
          f"{batch} ({tiles} tiles of {tile}), float32, 1 thread, {reps} repetitions ==")
    lib, klib = _floor_library(), native.library()
    if lib is None or klib is None:
        print("  skipped: " + ("no floor loop" if lib is None else "the native kernels are unavailable"))
        return True
    threads, ok = torch.get_num_threads(), True
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(batch, n, generator=gen)
        w = torch.randn(n, n, generator=gen)
        print(f"  ns per stored entry and tile ({tile} multiply-adds); dense GEMM: ns per {tile} "
              "multiply-adds of x W^T")
        print(f"  {'density':>7}  {'kernel fwd':>10}  {'feature-major':>13}  {'fwd+bwd / 3':>11}  "
              f"{'floor':>7}  {'GEMM':>6}  {'kernel/floor':>12}  {'floor/GEMM':>10}  "
              f"{'fwd speedup bound':>17}")
        for d in (0.1, 0.01):
            sp = SparseLinear(n, n, density=d, backend="csr", generator=gen)
            err, impls = _floor_impls(lib, klib, sp, x, tiles, gen)
            if err > 1e-4:
                print(f"  FAIL floor loop at density {d}: max relative difference {err:.2e} from W @ pack")
                ok = False
            impls["gemm"] = lambda: torch.mm(x, w.t())
            times = interleaved(impls, reps, target_s=0.05 if quick else 0.15)
            per = {k: statistics.median(times[k]) * 1e9 / (sp.nnz * tiles)
                   for k in ("kernel", "feature-major", "floor")}
            # three multiply-adds per stored entry and batch element: forward, input and value gradients
            per["fwd+bwd"] = statistics.median(times["fwd+bwd"]) * 1e9 / (3 * sp.nnz * tiles)
            gemm = statistics.median(times["gemm"]) * 1e9 / (batch * n * n / tile)
            k_f, _, _ = ratio_stats(times, "kernel", "floor")
            fl_g = per["floor"] / gemm
            print(f"  {d:>7}  {per['kernel']:10.2f}  {per['feature-major']:13.2f}  {per['fwd+bwd']:11.2f}  "
                  f"{per['floor']:7.2f}  {gemm:6.2f}  {k_f:12.2f}  {fl_g:10.2f}  {1 / (d * fl_g):16.1f}x")
            del sp
    finally:
        torch.set_num_threads(threads)
    print("  fwd+bwd / 3: SparseLinear forward + backward per stored entry and tile, over its three\n"
          "  multiply-adds per entry and batch element (forward, input and value gradients).\n"
          "  kernel/floor: median of per-repetition ratios. fwd speedup bound: 1/density x GEMM rate /\n"
          "  floor rate, the most a forward that reads one random tile row per stored entry and tile\n"
          "  can gain over a dense GEMM of the block")
    return ok


# ============================================================================ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--case", action="append",
                    choices=["block", "floor", "memory", "mlp", "profile", "crossover"])
    ap.add_argument("--density", action="append", type=float, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: torch's); 1 is less sensitive to other "
                         "processes on a busy 2-core machine")
    ap.add_argument("--memory-worker", nargs=5, metavar=("KIND", "N", "DENSITY", "BATCH", "STEPS"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_worker:
        kind, n, d, b, s = args.memory_worker
        memory_worker(kind, int(n), float(d), int(b), int(s))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    reps = args.reps or (3 if args.quick else 7)
    if not args.quick:
        reps = max(reps, 5)
    # memory first: its workers' numbers do not depend on it, but it keeps this process
    # small while they run
    cases = args.case or ["memory", "block", "floor", "mlp"]
    t0 = time.perf_counter()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f} (quick={args.quick})")
    ok = True
    for c in cases:
        if c == "memory":
            ok &= case_memory(args.quick)
        elif c in ("mlp", "profile"):
            for d in args.density or ((0.1, 0.01) if c == "mlp" else (0.1,)):
                ok &= (case_mlp if c == "mlp" else case_profile)(args.quick, reps, d)
        else:
            ok &= {"block": case_block, "floor": case_floor, "crossover": case_crossover}[c](args.quick, reps)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s, load average at end {os.getloadavg()[0]:.2f}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
