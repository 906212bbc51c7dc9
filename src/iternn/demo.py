"""The short tour behind ``make demo``: convert an MLP and an RNN, compare with torch."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from .convert import from_mlp, from_rnn

__all__ = ["run_demo"]


def _median_times(fns: dict[str, Callable[[], object]], reps: int, calls: int) -> dict[str, float]:
    """Median seconds per call, the implementations interleaved in every repetition."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():  # warm-up
        f()
    for _ in range(reps):
        for k, f in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                f()
            times[k].append((time.perf_counter() - start) / calls)
    return {k: statistics.median(v) for k, v in times.items()}


def _fwd_bwd(model: nn.Module, *args: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        out = model(*args)
        out = out[0] if isinstance(out, tuple) else out
        out.sum().backward()

    return step


def run_demo(*, seed: int = 0, reps: int = 5, calls: int = 10, print_fn=print) -> dict[str, float]:
    """Run the tour; return the measured numbers (differences, lengths, ratios)."""
    torch.manual_seed(seed)
    results: dict[str, float] = {}
    print_fn("iternn tour: ordinary PyTorch models as iterated block maps\n")

    mlp = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.Tanh(),
                        nn.Linear(128, 10))
    net = from_mlp(mlp)
    x = torch.randn(64, 64)
    results["mlp_max_diff"] = (net(x) - mlp(x)).abs().max().item()
    results["mlp_impulse_response"] = net.map.impulse_response_length()
    print_fn("MLP 64-128-128-10 as a block map:")
    print_fn(str(net.map.summary()))
    print_fn(f"max |map(x) - mlp(x)| = {results['mlp_max_diff']:.2e}\n")

    rnn = nn.RNN(16, 64, num_layers=2, batch_first=True)
    rnet = from_rnn(rnn)
    xs = torch.randn(32, 50, 16)
    out_t, h_t = rnn(xs)
    out_m, h_m = rnet(xs)
    results["rnn_max_diff"] = max((out_t - out_m).abs().max().item(), (h_t - h_m).abs().max().item())
    results["rnn_impulse_response"] = rnet.map.impulse_response_length()
    print_fn("2-layer RNN (16 -> 64, T = 50) as a forced block map:")
    print_fn(str(rnet.map.summary()))
    print_fn(f"max |map - rnn| over outputs and h_n = {results['rnn_max_diff']:.2e}\n")

    t = _median_times(
        {"mlp": _fwd_bwd(mlp, x), "mlp map": _fwd_bwd(net, x),
         "rnn": _fwd_bwd(rnn, xs), "rnn map": _fwd_bwd(rnet, xs)},
        reps, calls,
    )
    results["mlp_ratio"] = t["mlp map"] / t["mlp"]
    results["rnn_ratio"] = t["rnn map"] / t["rnn"]
    print_fn(f"forward+backward, median of {reps} interleaved runs of {calls} calls:")
    print_fn(f"{'model':<8} {'torch':>10} {'map':>10} {'map/torch':>10}")
    for name in ("mlp", "rnn"):
        print_fn(f"{name:<8} {t[name] * 1e3:>8.2f}ms {t[name + ' map'] * 1e3:>8.2f}ms "
                 f"{results[name + '_ratio']:>10.2f}")
    print_fn("\nstructural impulse-response length: MLP "
             f"{results['mlp_impulse_response']} (its depth), RNN "
             f"{results['rnn_impulse_response']} (the recurrence is a cycle)")
    return results
