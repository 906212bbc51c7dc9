"""The continuum report: ``report.md``, its pictures and the reading of the claims.

:func:`readings` checks the paper's statements of the continuum (notes §8) against the
measured points, one verdict per statement, computed from the numbers (never written in
advance); :func:`write_report` puts them with the tables into ``report.md``;
:func:`draw_pictures` draws the phase diagram (memory and accuracy over ``(k, alpha)``),
the memory profiles and the one-application measures against ``alpha``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MissingDependencyError
from .config import ContinuumConfig

__all__ = ["readings", "write_report", "draw_pictures", "spearman", "REPORT_NAME", "PICTURES"]

REPORT_NAME = "report.md"
#: The pictures :func:`draw_pictures` writes.
PICTURES = ("phase.png", "memory.png", "dynamics.png")


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rank correlation (ties get their mean rank); ``None`` for fewer than
    three pairs or a constant side."""
    if len(a) < 3:
        return None

    def ranks(v: Sequence[float]) -> np.ndarray:
        v = np.asarray(v, dtype=float)
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=float)
        for value in np.unique(v):  # ties: mean rank
            same = v == value
            r[same] = r[same].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def _verdict(ok: int, total: int) -> str:
    if total == 0:
        return "not measured"
    return "held" if ok == total else ("did not hold" if ok == 0 else "held in part")


def _pick(points: list[dict], **where: Any) -> list[dict]:
    return [p for p in points if all(p[k] == v for k, v in where.items())]


def _acc(p: dict, task: str) -> float | None:
    r = p.get(task)
    return None if r is None or r["status"] == "diverged" else r["test_acc"]


def readings(config: ContinuumConfig, points: list[dict], meta: dict) -> list[dict[str, Any]]:
    """One dict per statement: ``claim``, ``verdict`` (``"held"``, ``"held in part"``,
    ``"did not hold"``, ``"inconclusive"``, ``"not measured"``) and ``evidence`` (the
    numbers behind it)."""
    L = meta["depth"]
    out: list[dict[str, Any]] = []

    def add(claim: str, ok: int, total: int, evidence: str) -> None:
        out.append({"claim": claim, "verdict": _verdict(ok, total), "evidence": evidence})

    free = [p for p in points if p["alpha"] == 0]
    mlp_end = [p for p in free if p["k"] >= L or p["policy"] != "carried"]
    ok = sum(set(p["nonzero_lags"]) <= {0} for p in mlp_end)
    add(f"k >= L (= {L}) or the state reset gives y_t = MLP(x_t): no memory of past inputs "
        "(alpha = 0)", ok, len(mlp_end),
        f"{ok} of {len(mlp_end)} such points have memory at lag 0 only (or none: reset with "
        f"k < L, where y_t cannot see x_t yet)")
    delay = _pick(free, k=1, policy="carried")
    ok = sum(p["nonzero_lags"] == [L - 1] for p in delay)
    add("k = 1 with the state carried is a pure delay line: memory only at lag L - 1",
        ok, len(delay), f"{ok} of {len(delay)} points have memory exactly at lag {L - 1} only")
    between = [p for p in free if p["policy"] == "carried"]
    ok = sum(p["nonzero_lags"] == p["predicted_lags"] for p in between)
    add("with the state carried the memory of the feed-forward map sits at lag ⌈L/k⌉ - 1 "
        "(every k)", ok, len(between),
        f"{ok} of {len(between)} points match the derived lag exactly (zero elsewhere, bit for bit)")
    if "forced" in config.modes and "held" in config.modes:
        pairs = [(p, q) for p in _pick(free, mode="forced") for q in _pick(free, mode="held")
                 if (p["k"], p["policy"]) == (q["k"], q["policy"])]
        ok = sum(p["memory"] == q["memory"] for p, q in pairs)
        add("held and forced input are the same iteration when nothing feeds back into x "
            "(alpha = 0)", ok, len(pairs), f"{ok} of {len(pairs)} profile pairs are identical")
    fed = [p for p in points if p["alpha"] > 0 and p["policy"] == "carried"]
    oldest = [j for j in (meta["length"] - 2, meta["length"] - 1) if j >= 0]
    last = sum(any(p["memory"][j] > 0 for j in oldest) for p in fed)
    add("feedback (alpha > 0) makes the memory infinite (IIR): the output still depends on "
        "the oldest inputs", last, len(fed),
        f"{last} of {len(fed)} carried points with alpha > 0 have non-zero memory at one of "
        f"the two largest lags measured ({', '.join(map(str, oldest))}; two, because every "
        "cycle of this family has length two)")
    every = [p for p in fed if p["nonzero_lags"] == list(range(min(p["nonzero_lags"], default=0),
                                                               meta["length"]))]
    gaps = sorted({p["k"] for p in fed if p not in every})
    add("... and at every lag from the first on", len(every), len(fed),
        f"{len(every)} of {len(fed)} have no zero lag after the first non-zero one"
        + (f"; the others (k = {', '.join(map(str, gaps))}) skip lags: every cycle of the "
           "family has length two (two neighbouring slots), so with fewer applications per "
           "input than that the walks from x to y reach only every other lag" if gaps else ""))
    # the one-application measures: nilpotent without feedback, a cycle with it
    forced0 = _pick(free, mode="forced")
    ok = sum(p["spectral_radius"] == 0 and p["lyapunov"] == -math.inf for p in forced0)
    add("without feedback the forced map is nilpotent: spectral radius 0, Lyapunov exponent "
        "-inf, finite impulse response", ok, len(forced0),
        f"{ok} of {len(forced0)} alpha = 0 forced points; structural impulse-response length "
        f"{sorted({p['impulse_structural'] for p in forced0})}, empirical "
        f"{sorted({p['impulse_empirical'] for p in forced0})}")
    held0 = _pick(free, mode="held")
    ok = sum(p["impulse_structural"] == math.inf and p["impulse_censored"] for p in held0)
    add("the identity block of a held input gives an infinite impulse response (eq. 54)",
        ok, len(held0), f"{ok} of {len(held0)} alpha = 0 held points never forget a "
        "perturbation (structural and empirical)")
    out.extend(_accuracy_readings(config, points, meta))
    return out


def _se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 1e-12) / n)


def _accuracy_readings(config: ContinuumConfig, points: list[dict], meta: dict) -> list[dict]:
    out = []
    trained = [p for p in points if p["digits"] is not None]
    if not trained:
        return [{"claim": "accuracy", "verdict": "not measured", "evidence": "no training grid"}]
    n_d, n_a = meta["n_test"]["digits"], meta["n_test"]["anomaly"]
    chance = meta["chance"]
    digits = [a for p in trained if (a := _acc(p, "digits")) is not None]
    anomaly = [(p, a) for p in trained if (a := _acc(p, "anomaly")) is not None]
    mlp = [_acc(p, "digits") for p in trained if p["alpha"] == 0 and p["k"] >= meta["depth"]
           and p["policy"] in ("zeros", "carried")]
    mlp = [a for a in mlp if a is not None]
    if digits and mlp:
        ref = max(mlp)
        near = sum(abs(a - ref) <= 2 * _se(ref, n_d) * math.sqrt(2) for a in digits)
        out.append({
            "claim": "digits needs no memory: where the input reaches the output its accuracy "
                     "does not depend on where the map stands",
            "verdict": _verdict(near, len(digits)),
            "evidence": f"{near} of {len(digits)} trained points are within two standard "
                        f"errors (of a difference of accuracies) of the MLP end "
                        f"({100 * ref:.1f} %); range "
                        f"{100 * min(digits):.1f}-{100 * max(digits):.1f} %"})
    if anomaly:
        accs = [a for _, a in anomaly]
        se = _se(chance, n_a)
        above = sum(a > chance + 2 * se for a in accs)
        out.append({
            "claim": "the anomaly task is learnt above chance somewhere on the continuum",
            "verdict": "held" if above else "did not hold",
            "evidence": f"{above} of {len(accs)} trained points beat chance ({100 * chance:.0f} %) "
                        f"by two standard errors; range {100 * min(accs):.1f}-{100 * max(accs):.1f} %"})
        mem = [(p["past_share"], a) for p, a in anomaly if p["past_share"] is not None]
        rho = spearman([m for m, _ in mem], [a for _, a in mem])
        trained_mem = [(sum(p["memory_trained"][1:]) / s, a) for p, a in anomaly
                       if p["memory_trained"] and (s := sum(p["memory_trained"])) > 0]
        rho_t = spearman([m for m, _ in trained_mem], [a for _, a in trained_mem])
        if rho is None:
            verdict, txt = "not measured", "too few points with memory to correlate"
        elif not above:
            verdict = "inconclusive"
            txt = (f"no trained point beat chance, so the correlation over {len(mem)} points "
                   f"between accuracy and the share of memory on past inputs ({rho:+.2f}) is "
                   "between chance-level numbers")
        else:
            verdict = "held" if rho > 0.5 else ("held in part" if rho > 0 else "did not hold")
            txt = (f"Spearman correlation over {len(mem)} points between anomaly accuracy and "
                   f"the share of memory on past inputs: {rho:+.2f} (untrained map)"
                   + ("" if rho_t is None else f", {rho_t:+.2f} (trained map)"))
        out.append({"claim": "the task that needs memory is learnt where the map has memory",
                    "verdict": verdict, "evidence": txt})
    return out


# --------------------------------------------------------------------------- pictures


def _figure(w: float, h: float, **margins: float):
    """An Agg figure with fixed margins (a layout engine draws several times slower)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MissingDependencyError(
            "the continuum's pictures need matplotlib, which is not installed: "
            "pip install 'iternn[plots]' (or run without pictures)") from exc
    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    fig.subplots_adjust(**{"left": 0.07, "right": 0.97, "bottom": 0.14, "top": 0.86,
                           "wspace": 0.35, **margins})
    return fig


def _grid(config: ContinuumConfig, points: list[dict], value, policy: str, mode: str) -> np.ndarray:
    """``(len(ks), len(alphas))`` of ``value(point)`` (NaN where ``None``)."""
    g = np.full((len(config.ks), len(config.alphas)), np.nan)
    for p in _pick(points, policy=policy, mode=mode):
        v = value(p)
        if v is not None:
            g[config.ks.index(p["k"]), config.alphas.index(p["alpha"])] = v
    return g


def _heat(ax, config: ContinuumConfig, grid: np.ndarray, title: str, fmt: str, cmap: str,
          vmin: float | None = None, vmax: float | None = None) -> None:
    im = ax.imshow(grid, origin="lower", aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_xticks(range(len(config.alphas)), [f"{a:g}" for a in config.alphas])
    ax.set_yticks(range(len(config.ks)), [str(k) for k in config.ks])
    ax.set_xlabel("feedback scale α")
    ax.set_ylabel("applications per input k")
    ax.set_title(title, fontsize=10)
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, "–" if np.isnan(v) else format(v, fmt), ha="center", va="center",
                fontsize=8, color="black",
                bbox={"facecolor": "white", "alpha": 0.6, "pad": 1, "linewidth": 0})
    ax.figure.colorbar(im, ax=ax, shrink=0.8, pad=0.02)


def draw_pictures(out: Path, config: ContinuumConfig, points: list[dict]) -> list[Path]:
    """Write :data:`PICTURES` into ``out``; returns their paths.

    ``phase.png``: over ``(k, alpha)``, the mean lag of the memory (untrained map) and
    the test accuracy on digits and anomaly, one row per trained policy and mode;
    ``memory.png``: memory profiles (log scale; a lag with exactly zero memory is not
    drawn) per ``alpha``, for the first trained policy and mode; ``dynamics.png``:
    spectral radius and largest Lyapunov exponent against ``alpha``, per input mode.
    """
    policy, mode = config.train_policies[0], config.train_modes[0]
    settings = [(p, m) for p in config.train_policies for m in config.train_modes]
    paths = []
    rows = len(settings)
    fig = _figure(13.5, 4.0 * rows, left=0.05, right=0.99, wspace=0.3, hspace=0.45,
                  bottom=0.14 / rows, top=1 - 0.14 / rows)
    axes = np.atleast_2d(fig.subplots(rows, 3))
    top = max((p["mean_lag"] for p in points if p["mean_lag"] is not None), default=0) or 1.0
    for row, (policy, mode) in zip(axes, settings):
        _heat(row[0], config, _grid(config, points, lambda p: p["mean_lag"], policy, mode),
              f"memory: mean lag (inputs)\n{policy} state, {mode} input, untrained", ".2f",
              "viridis", 0, top)
        for ax, task in zip(row[1:], ("digits", "anomaly")):
            g = _grid(config, points,
                      lambda p, t=task: None if _acc(p, t) is None else 100 * _acc(p, t),
                      policy, mode)
            _heat(ax, config, g, f"{task}: test accuracy (%)\n{policy} state, {mode} input",
                  ".0f", "magma", 0, 100)
    paths.append(out / PICTURES[0])
    fig.savefig(paths[-1], dpi=90)

    fig = _figure(4.0 * len(config.alphas), 3.6, left=0.8 / (4.0 * len(config.alphas)),
                  wspace=0.1)
    axes = np.atleast_1d(fig.subplots(1, len(config.alphas), sharex=True, sharey=True))
    for ax, a in zip(axes, config.alphas):
        for p in _pick(points, alpha=a, policy=policy, mode=mode):
            lags = [j for j, v in enumerate(p["memory"]) if v > 0]
            ax.plot(lags, [p["memory"][j] for j in lags], marker="o", label=f"k={p['k']}")
        ax.set_yscale("log")
        ax.set_xlabel("lag j (inputs)")
        ax.set_title(f"α = {a:g}", fontsize=10)
    axes[0].set_ylabel("mean ‖∂y_t/∂x_{t-j}‖")
    axes[-1].legend(fontsize=8)
    paths.append(out / PICTURES[1])
    fig.savefig(paths[-1], dpi=90)

    fig = _figure(9.0, 3.6, left=0.08, wspace=0.25)
    axes = fig.subplots(1, 2)
    for m in config.modes:
        rows = sorted(_pick(points, k=config.ks[0], policy=policy, mode=m), key=lambda p: p["alpha"])
        xs = [p["alpha"] for p in rows]
        rad = [np.nan if p["spectral_radius"] is None else p["spectral_radius"] for p in rows]
        lya = [p["lyapunov"] if math.isfinite(p["lyapunov"]) else np.nan for p in rows]
        axes[0].plot(xs, rad, marker="o", label=f"{m} input")
        axes[1].plot(xs, lya, marker="o", label=f"{m} input")
    axes[0].axhline(1.0, color="grey", lw=0.8, ls="--")
    axes[1].axhline(0.0, color="grey", lw=0.8, ls="--")
    axes[0].set_title("spectral radius at the fixed point", fontsize=10)
    axes[1].set_title("largest Lyapunov exponent (-inf not drawn)", fontsize=10)
    for ax in axes:
        ax.set_xlabel("feedback scale α")
        ax.legend(fontsize=8)
    paths.append(out / PICTURES[2])
    fig.savefig(paths[-1], dpi=90)
    return paths


# --------------------------------------------------------------------------- report


def _num(v: Any, fmt: str = ".3g") -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and math.isinf(v):
        return "∞" if v > 0 else "-∞"
    return format(v, fmt) if isinstance(v, float) else str(v)


def _table(header: Sequence[str], rows: list[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def write_report(out: Path, config: ContinuumConfig, points: list[dict], meta: dict,
                 timing: dict, pictures: list[Path]) -> Path:
    """Write ``report.md`` into ``out``; returns its path."""
    L = meta["depth"]
    lines = [
        "# The continuum, measured",
        "",
        f"Configuration `{config.name}`: a map of L = {L} weight layers, widths "
        f"{meta['sizes']} (slots x, {', '.join(f'h{i}' for i in range(1, L))}, y), tanh on the "
        f"hidden slots, feedback blocks F[x, h1], F[h1, h2], …, F[h{L - 1}, y] scaled by α "
        f"(fixed, not trained), the identity block on x. Every point has "
        f"{meta['trainable']} trainable parameters (the MLP's). Swept: k ∈ {list(config.ks)}, "
        f"α ∈ {list(config.alphas)}, initial vector ∈ {list(config.policies)}, input ∈ "
        f"{list(config.modes)}; trained: {list(config.train_policies)} × "
        f"{list(config.train_modes)} at every (k, α), digits for {config.digits_epochs} epochs, "
        f"anomaly ({config.anomaly['n_train']} training sequences) for {config.anomaly_epochs}, "
        f"seed {config.seed}.",
        "",
        f"Time: {timing['wall_s']:.0f} s in all ({timing['dynamics_s']:.0f} s one-application "
        f"measures, {timing['memory_s']:.0f} s memory profiles, {timing['training_s']:.0f} s for "
        f"{timing['trainings']} trainings, {timing['mean_training_s']:.1f} s each on average), "
        f"{meta['threads']} torch thread(s).",
        "",
        "Memory is the mean Frobenius norm of ∂y_t/∂x_{t-j} over the outputs t ≥ j and "
        f"{config.memory_batch} anomaly test sequences of {meta['length']} inputs "
        "(`iternn.dynamics.input_memory`, exact). The one-application measures are taken at "
        f"{config.probe_batch} digits test images, independent of k. Digits is written as a "
        f"constant stream of {meta['length']} inputs; anomaly asks for the position of the odd "
        f"one of {meta['length']} digits (chance {100 * meta['chance']:.0f} %).",
        "",
        "## Reading: where the claims held on this data",
        "",
    ]
    lines += _table(["claim", "verdict", "evidence"],
                    [(r["claim"], f"**{r['verdict']}**", r["evidence"])
                     for r in readings(config, points, meta)])
    lines += ["", "## Pictures", ""]
    lines += [f"![{p.stem}]({p.name})" for p in pictures] or ["(not drawn)"]
    lines += ["", "## Memory of the feed-forward map (α = 0)", ""]
    rows = [(p["k"], p["policy"], p["mode"], p["nonzero_lags"], p["predicted_lags"],
             ", ".join(_num(v, ".2e") for v in p["memory"][:5]))
            for p in points if p["alpha"] == 0]
    lines += _table(["k", "initial vector", "input", "lags with memory", "derived ⌈L/k⌉-1",
                     "memory at lags 0-4"], rows)
    lines += ["", "## One application (at the probe inputs)", ""]
    seen, rows = set(), []
    for p in points:
        key = (p["alpha"], p["policy"] == "random", p["mode"])
        if key in seen:
            continue
        seen.add(key)
        rows.append((_num(p["alpha"], "g"), "random" if key[1] else "zeros", p["mode"],
                     _num(p["impulse_structural"]),
                     f"{p['impulse_empirical']}{'+' if p['impulse_censored'] else ''}",
                     _num(p["spectral_radius"]) if p["fixed_point_converged"] else "no fixed point",
                     _num(p["lyapunov"])))
    lines += _table(["α", "start", "input", "impulse response: structural", "empirical",
                     "spectral radius", "Lyapunov"], rows)
    lines += ["", "(`N+`: still above the tolerance after the last application measured.)", "",
              "## Accuracy (test, best epoch)", ""]
    rows = []
    for p in points:
        if p["digits"] is None:
            continue
        rows.append((p["k"], _num(p["alpha"], "g"), p["policy"], p["mode"],
                     _num(p["mean_lag"], ".2f"),
                     *(f"{100 * _acc(p, t):.1f}" if _acc(p, t) is not None else p[t]["status"]
                       for t in ("digits", "anomaly"))))
    lines += _table(["k", "α", "initial vector", "input", "memory: mean lag", "digits %",
                     "anomaly %"], rows) if rows else ["(no training grid)"]
    lines += ["", "Every measured point is in `continuum.json`.", ""]
    path = out / REPORT_NAME
    path.write_text("\n".join(lines))
    return path
