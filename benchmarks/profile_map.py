"""Where does a map's time go? cProfile + torch.profiler for one benchmark case.

    .venv/bin/python benchmarks/profile_map.py mlp_small/fwd
    .venv/bin/python benchmarks/profile_map.py rnn/fwd --calls 200 --top 15

Builds the case exactly as ``benchmarks/run.py`` does (full sizes unless ``--quick``),
then prints, for the iternn impl and for torch:

1. aten operator counts and self CPU time per call (torch.profiler): the kernels;
2. cProfile of the iternn calls, sorted by own time: the Python in iterate/plan;
3. per-call wall time of torch, iternn, and the kernel-only floor (the profiled self
   CPU of aten ops), so that ``iternn - floor`` estimates the Python overhead.

Diagnostic only; ratios for decisions come from run.py (interleaved, repeated).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402  (the benchmark cases)


def _per_call(fn, calls: int) -> float:
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def _ops(fn, calls: int):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
    counts, self_us = Counter(), Counter()
    for ev in prof.key_averages():
        if ev.key.startswith("aten::") or "Backward" in ev.key:
            counts[ev.key] += ev.count
            self_us[ev.key] += ev.self_cpu_time_total
    return counts, self_us


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("case", help="case/mode, e.g. mlp_small/fwd, rnn/fwdbwd")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--calls", type=int, default=None, help="calls per measurement")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads for the diagnosis (default: torch's default); "
                         "1 removes OpenMP stalls on a busy machine, the Python overhead stays")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    case, _, mode = args.case.partition("/")
    builder, full, quick, desc, _targets = run.CASES[case]
    kwargs = quick if args.quick else full
    print(f"== {case}/{mode}: {desc.format(**kwargs)} | threads {torch.get_num_threads()}")
    impls, _ = builder(case, **kwargs)
    by_name = {i.name: i.fn for i in impls[mode]}
    torch_fn, map_fn = by_name["torch"], by_name["iternn"]
    t1 = min(_per_call(map_fn, 1) for _ in range(3))
    calls = args.calls or max(3, min(3000, int(0.5 / max(t1, 1e-6))))

    print(f"\n-- aten ops per call ({calls} calls profiled)")
    rows = {}
    for name, fn in (("torch", torch_fn), ("iternn", map_fn)):
        counts, self_us = _ops(fn, calls)
        rows[name] = (counts, self_us)
    keys = sorted(set(rows["torch"][0]) | set(rows["iternn"][0]),
                  key=lambda k: -(rows["iternn"][1][k] + rows["torch"][1][k]))
    print(f"  {'op':<44} {'torch n':>8} {'torch us':>9} {'iternn n':>9} {'iternn us':>10}")
    for k in keys[: args.top * 2]:
        tc, tu = rows["torch"][0][k] / calls, rows["torch"][1][k] / calls
        ic, iu = rows["iternn"][0][k] / calls, rows["iternn"][1][k] / calls
        print(f"  {k[:44]:<44} {tc:>8.1f} {tu:>9.1f} {ic:>9.1f} {iu:>10.1f}")
    floor = {n: sum(r[1].values()) / calls for n, r in rows.items()}
    n_ops = {n: sum(r[0].values()) / calls for n, r in rows.items()}
    print(f"  total ops/call: torch {n_ops['torch']:.0f}, iternn {n_ops['iternn']:.0f}; "
          f"self CPU of ops (us/call): torch {floor['torch']:.0f}, iternn {floor['iternn']:.0f}")

    print(f"\n-- cProfile of iternn ({calls} calls), by own time")
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        map_fn()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(args.top)
    text = s.getvalue()
    print(text[text.find("   ncalls"):].rstrip())

    tt, tm = _per_call(torch_fn, calls), _per_call(map_fn, calls)
    print(f"\n-- wall time per call (best of 5 x {calls}; not interleaved, indicative only)")
    print(f"  torch {tt * 1e6:.1f} us | iternn {tm * 1e6:.1f} us | ratio {tm / tt:.3f}")
    print(f"  iternn minus torch: {(tm - tt) * 1e6:.1f} us/call")


if __name__ == "__main__":
    main()
