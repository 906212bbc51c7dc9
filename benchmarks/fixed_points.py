"""Fixed-point search on a trained 3-bit flip-flop RNN: time and what is found.

Run ``.venv/bin/python benchmarks/fixed_points.py`` from the repository root. It

1. trains a tanh ``nn.RNN(3, 64)`` with a linear readout on the 3-bit flip-flop task
   (Sussillo & Barak 2013): three input channels of sparse +1/-1 pulses; each output
   channel holds the sign of the last pulse on its channel. Every random draw (weights,
   task batches, starting states) comes from one seeded ``torch.Generator``;
2. converts it with ``iternn.from_rnn``, holds the input slot ``x`` at zero and calls
   ``iternn.dynamics.find_fixed_points`` with its default options from ``--starts``
   states: hidden states visited by the network on flip-flop inputs, plus Gaussian noise
   (std 0.05), in float64;
3. prints the median wall time of ``--reps`` calls (after one warm-up call) and the
   points found: fixed or slow, stable or saddle. A trained flip-flop network has 27
   fixed points, the corners, edge and face centres and centre of a cube: 8 stable
   (the memories) and 19 saddles; the script exits with status 1 if the count differs.

Options: ``--threads N`` (``torch.set_num_threads``, default 2), ``--reps N`` (default 5),
``--starts N`` (default 1024), ``--seed N`` (default 0). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import Counter

import torch
from torch import Tensor, nn

try:
    import iternn
except ImportError:  # running from a checkout without an installed package
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))
    import iternn
from iternn.dynamics import find_fixed_points

HIDDEN = 64
BITS = 3
EXPECTED = {"stable": 8, "saddle": 19}


def flip_flop(batch: int, steps: int, p: float, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """``(inputs, targets)``, each ``(batch, steps, 3)``: a pulse (+1 or -1, equally
    likely) on each channel at each step with probability ``p``; the target of a channel
    is the last pulse on it (0 before the first)."""
    pulse = torch.rand(batch, steps, BITS, generator=gen) < p
    sign = torch.where(torch.rand(batch, steps, BITS, generator=gen) < 0.5, -1.0, 1.0)
    inputs = torch.where(pulse, sign, 0.0)
    targets = torch.empty_like(inputs)
    last = torch.zeros(batch, BITS)
    for t in range(steps):
        last = torch.where(pulse[:, t], inputs[:, t], last)
        targets[:, t] = last
    return inputs, targets


def train(gen: torch.Generator, *, steps: int = 400) -> tuple[nn.RNN, float]:
    """A tanh RNN trained on the flip-flop task (Adam, lr 1e-2, gradient norm clipped at
    1, batches of 128 sequences of 32 steps, pulse probability 0.1); its final loss."""
    rnn = nn.RNN(BITS, HIDDEN, batch_first=True)
    readout = nn.Linear(HIDDEN, BITS)
    params = [*rnn.parameters(), *readout.parameters()]
    with torch.no_grad():  # torch's default initialisation (all bounds 1/sqrt(64)), from gen
        for p in params:
            p.uniform_(-(HIDDEN**-0.5), HIDDEN**-0.5, generator=gen)
    opt = torch.optim.Adam(params, lr=1e-2)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        x, y = flip_flop(128, 32, 0.1, gen)
        h, _ = rnn(x)
        loss = (readout(h) - y).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    return rnn, loss.item()


def starting_states(rnn: nn.RNN, n: int, gen: torch.Generator) -> Tensor:
    """``(n, 64)`` float64: hidden states of ``rnn`` on fresh flip-flop inputs (pulse
    probability 0.05), picked at random, plus noise of std 0.05."""
    x, _ = flip_flop(128, 64, 0.05, gen)
    with torch.no_grad():
        h, _ = rnn(x)
    h = h.reshape(-1, HIDDEN).double()
    pick = torch.randint(h.shape[0], (n,), generator=gen)
    return h[pick] + 0.05 * torch.randn(n, HIDDEN, generator=gen, dtype=torch.float64)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--starts", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    print(f"torch {torch.__version__}, {args.threads} thread(s), load average "
          f"{[round(v, 2) for v in os.getloadavg()]}")

    t0 = time.perf_counter()
    rnn, loss = train(gen)
    print(f"trained nn.RNN({BITS}, {HIDDEN}) on the 3-bit flip-flop task in "
          f"{time.perf_counter() - t0:.1f} s (final loss {loss:.4f})")
    m = iternn.from_rnn(rnn).double().map
    states = {"x": torch.zeros(BITS, dtype=torch.float64),
              "h1": starting_states(rnn, args.starts, gen)}

    def run():
        return find_fixed_points(m, states, hold=["x"])

    run()  # warm-up: first calls load and set up kernels
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        found = run()
        times.append(time.perf_counter() - t0)
    kinds = Counter(found.kind)
    stability = Counter(s for s, k in zip(found.stability, found.kind) if k == "fixed")
    print(f"find_fixed_points from {args.starts} starts: median {statistics.median(times):.2f} s "
          f"over {args.reps} calls (min {min(times):.2f}, max {max(times):.2f}); "
          f"load average {[round(v, 2) for v in os.getloadavg()]}")
    print(f"points: {len(found)} ({kinds['fixed']} fixed, {kinds['slow']} slow; "
          f"{found.n_discarded} starts discarded); fixed points: "
          + ", ".join(f"{stability[s]} {s}" for s in sorted(stability)))
    ok = kinds["slow"] == 0 and dict(stability) == EXPECTED
    print(("OK" if ok else "FAIL") + f": expected {EXPECTED['stable']} stable points and "
          f"{EXPECTED['saddle']} saddles")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
