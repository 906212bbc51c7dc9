"""The study report: ``report.md`` with tables, plots and an honest reading of the claims.

:func:`write_report` writes into the study folder:

* ``report.md`` — sections **Datasets** (sizes, class balance), **Models** (families and
  their trainable counts against the budget), **Results** (per dataset x budget x model x
  density: test accuracy and loss, mean ± sample std over seeds, trainable count, epochs,
  wall time per run, runs ok / diverged / failed; each table says which weights its test
  metrics come from: the dataset's ``select`` rule and training budget), **Plots**,
  **Claims** (whether each of the paper's claims held *on this data*, computed from the
  numbers, with the strength of the evidence), **Context** (published MNIST-1D
  baselines; runs of the published shapes — ``resmlp``, ``cnn1d``, ``bigru`` and their
  maps — on MNIST-1D are put beside the published figures), **Failures** and **Raw
  results**.
* PNG plots (matplotlib, drawn on ``Figure`` + ``FigureCanvasAgg``; pyplot is never
  imported): ``acc_vs_params_<label>.png`` (accuracy against trainable parameters, one
  line per family / density), ``acc_vs_density_<label>_h<H>.png`` (accuracy against
  density at one budget, the other families as horizontal reference lines),
  ``curves_<label>.png`` (validation curves, mean over seeds) and
  ``structure_<label>_<family>[_d<d>].png`` (spy plot of each map family, via
  :func:`iternn.dynamics.plots.plot_structure`).
* ``config.toml`` (the config that produced it), next to ``results.csv`` /
  ``results.json`` / ``datasets.json`` written by the sweep.

**How claims are judged.** The score is test accuracy (test loss for regression, lower
is better). When one of several densities is compared with another family, the density is
chosen by mean *validation* accuracy (loss), then its *test* score is compared, so the
choice does not peek at the test split. A comparison reports both means ± std, the
number of seeds and Welch's ``t = (mean_a - mean_b) / sqrt(s_a²/n_a + s_b²/n_b)``.
Verdict: ``yes``/``no`` by the sign of the difference; the evidence is called *clear*
only with at least 3 seeds per side and ``|t| >= 2``, otherwise *weak* (and *none* with a
single seed). Several comparisons are made, so a few "clear" results can still be chance.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import StudyConfig, dumps
from .sweep import (
    DATASETS_JSON,
    RESULTS_CSV,
    RESULTS_JSON,
    RUNS_DIR,
    SweepResult,
    collect,
    load_datasets,
)

__all__ = ["write_report", "REPORT_NAME", "SECTIONS", "MNIST1D_BASELINES", "MNIST1D_PUBLISHED",
           "compare", "group_stats", "selection_text"]

REPORT_NAME = "report.md"
#: The level-2 headings of ``report.md``, in order.
SECTIONS = ("Datasets", "Models", "Results", "Plots", "Claims", "Context: published MNIST-1D baselines",
            "Failures and divergences", "Raw results")
#: Published MNIST-1D test accuracies (Greydanus 2020, "Scaling down deep learning",
#: arXiv:2011.14439, the mnist1d README), for context only: other models, sizes, training.
MNIST1D_BASELINES = (("logistic regression", 0.32), ("MLP", 0.68), ("GRU", 0.91), ("CNN", 0.94))
#: The published MNIST-1D baselines a family reproduces: family -> (the published shape's
#: ``hidden``, the baseline's name, the published test accuracy as text). The map
#: families are listed under their module's entry (``<family>_map``).
MNIST1D_PUBLISHED = {
    "resmlp": ((100, 100), "MLP 40-100-100-10 (one residual block)",
               "68 % (paper); 65.1 % (the authors' rerun)"),
    "cnn1d": ((25,), "CNN (3 conv layers, 25 channels)", "~94 %"),
    "bigru": ((6,), "GRU (bidirectional, width 6)", "~91 %"),
}
_SELECT_RULES = {"val_loss": "the epoch with the lowest validation loss",
                 "val_acc": "the epoch with the highest validation accuracy",
                 "final": "the final weights, after the last step"}
_OK = ("ok", "early_stopped")


# --------------------------------------------------------------------------- statistics


def _mean_std(xs: Sequence[float]) -> tuple[float | None, float | None]:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def group_stats(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (label, hidden, family, density), in grid order: counts of ok / diverged /
    failed / missing runs and mean ± std (over the ok and early-stopped runs) of the
    metrics, trainable count and wall time."""
    groups: dict[tuple, list[dict]] = {}
    for r in sorted(records, key=lambda r: r.get("index", 0)):
        key = (r["label"], tuple(r["hidden"]), r["family"], r["density"], r.get("extra_steps") or 0)
        groups.setdefault(key, []).append(r)
    rows = []
    for (label, hidden, family, density, extra), rs in groups.items():
        good = [r for r in rs if r["status"] in _OK]
        row: dict[str, Any] = {
            "label": label, "hidden": hidden, "family": family, "density": density,
            "extra_steps": extra,
            "steps": next((r["steps"] for r in rs if r.get("steps") is not None), None),
            "live": next((r["live"] for r in rs if r.get("live") is not None), None),
            "task": rs[0]["task"], "budget": rs[0].get("budget"),
            "n": len(rs), "n_ok": len(good),
            "n_diverged": sum(r["status"] == "diverged" for r in rs),
            "n_failed": sum(r["status"] == "failed" for r in rs),
            "n_missing": sum(r["status"] == "missing" for r in rs),
            "trainable": next((r["trainable"] for r in rs if r.get("trainable") is not None), None),
            "runs": good,
        }
        for k in ("test_acc", "test_loss", "val_acc", "best_val_loss", "epochs_run", "wall_time_s"):
            row[k], row[k + "_std"] = _mean_std([r.get(k) for r in good])
        row["test_acc_values"] = [r["test_acc"] for r in good if r.get("test_acc") is not None]
        row["test_loss_values"] = [r["test_loss"] for r in good if r.get("test_loss") is not None]
        row["all_wall"] = [r["wall_time_s"] for r in rs if r.get("wall_time_s") is not None]
        rows.append(row)
    return rows


def _metric(task: str) -> tuple[str, bool]:
    """(record key of the score, higher is better)."""
    return ("test_loss", False) if task == "regression" else ("test_acc", True)


def _values(row: dict[str, Any], key: str) -> list[float]:
    return row[key + "_values"]


def compare(a: Sequence[float], b: Sequence[float], *, higher_better: bool = True) -> dict[str, Any]:
    """Is ``a`` better than ``b``? ``{"better", "diff", "t", "evidence", "n_a", "n_b"}``;
    evidence is ``"clear"`` (>= 3 seeds each and ``|t| >= 2``), ``"weak"`` (also when
    neither side varies across seeds: ``t`` is then ``None``) or ``"none"`` (one seed on a
    side, or no data)."""
    a = [x for x in a if x is not None]
    b = [x for x in b if x is not None]
    out: dict[str, Any] = {"n_a": len(a), "n_b": len(b), "better": None, "diff": None, "t": None,
                           "evidence": "none"}
    if not a or not b:
        return out
    ma, mb = statistics.fmean(a), statistics.fmean(b)
    diff = ma - mb
    out["diff"] = diff
    out["better"] = diff > 0 if higher_better else diff < 0
    if len(a) > 1 and len(b) > 1:
        se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
        if se > 0:
            t = diff / se
            out["t"] = t
            out["evidence"] = "clear" if len(a) >= 3 and len(b) >= 3 and abs(t) >= 2 else "weak"
        else:  # no spread across seeds at all: the noise cannot be estimated
            out["evidence"] = "weak"
    return out


# --------------------------------------------------------------------------- formatting


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _ms(mean: float | None, std: float | None, pct: bool) -> str:
    if mean is None:
        return "–"
    if pct:
        return f"{100 * mean:.1f} ± {100 * std:.1f}" if std is not None else f"{100 * mean:.1f}"
    return f"{mean:.4g} ± {std:.2g}" if std is not None else f"{mean:.4g}"


def _h(hidden: Sequence[int]) -> str:
    return "x".join(map(str, hidden))


def _model_name(family: str, density: float | None, extra_steps: int = 0) -> str:
    name = family if density is None else f"{family} d={density:g}"
    return name + (f" +{extra_steps} step{'s' if extra_steps > 1 else ''}" if extra_steps else "")


def _name(row: dict[str, Any]) -> str:
    return _model_name(row["family"], row["density"], row.get("extra_steps") or 0)


def _table(header: Sequence[str], rows: list[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def selection_text(train: dict[str, Any], options: dict[str, Any]) -> str:
    """One sentence: which weights a dataset's test metrics come from (its ``select``
    rule) and the training that led there (budget, batch, optimizer, early stopping, a
    missing validation split)."""
    select = train.get("select") or "val_loss"
    budget = (f"{train['steps']} optimizer steps" if train.get("steps")
              else f"up to {train['epochs']} epochs")
    parts = [f"{budget} of batch {train['batch_size']}, {train['optimizer']} at lr {train['lr']:g}"]
    if train.get("weight_decay"):
        parts.append(f"weight decay {train['weight_decay']:g}")
    if train.get("patience"):
        parts.append(f"early stopping after {train['patience']} epochs without improvement")
    if options.get("val_fraction") == 0:
        parts.append("no validation split (val_fraction = 0)")
    if options.get("standardize") is False:
        parts.append("raw (unstandardised) features")
    return (f"Selection `select = \"{select}\"`: test metrics of {_SELECT_RULES[select]}; "
            + "; ".join(parts) + ".")


def _score_text(row: dict[str, Any]) -> str:
    key, _ = _metric(row["task"])
    pct = key == "test_acc"
    unit = " %" if pct else ""
    return f"{_ms(row[key], row[key + '_std'], pct)}{unit} (n={row['n_ok']})"


# --------------------------------------------------------------------------- plots


def _figure(w: float = 6.4, h: float = 4.4):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=90)
    return path


def _plot_acc_vs_params(rows: list[dict], label: str, path: Path) -> Path | None:
    task = rows[0]["task"]
    key, _ = _metric(task)
    series: dict[str, list[tuple[float, float, float]]] = {}
    for r in rows:
        if r[key] is None or r["trainable"] is None:
            continue
        name = _name(r)
        series.setdefault(name, []).append((r["trainable"], r[key], r[key + "_std"] or 0.0))
    if not series:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    for name, pts in series.items():
        pts.sort()
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts],
                    marker="o", capsize=3, label=name)
    if len({p[0] for pts in series.values() for p in pts}) > 1:
        ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("test accuracy" if key == "test_acc" else "test loss")
    ax.set_title(f"{label}: {'accuracy' if key == 'test_acc' else 'loss'} vs trainable parameters")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _plot_acc_vs_density(rows: list[dict], label: str, hidden: tuple[int, ...], path: Path) -> Path | None:
    rows = [r for r in rows if tuple(r["hidden"]) == hidden]
    task = rows[0]["task"]
    key, _ = _metric(task)
    by_fam: dict[str, list[tuple[float, float, float]]] = {}
    refs = []
    for r in rows:
        if r[key] is None:
            continue
        if r["density"] is None:
            refs.append((_name(r), r[key], r[key + "_std"] or 0.0))
        else:
            fam = _model_name(r["family"], None, r.get("extra_steps") or 0)
            by_fam.setdefault(fam, []).append((r["density"], r[key], r[key + "_std"] or 0.0))
    if not by_fam:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    for fam, pts in by_fam.items():
        pts.sort()
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts],
                    marker="o", capsize=3, lw=2, label=fam)
    styles = ["--", ":", "-.", (0, (5, 1)), (0, (1, 1))]
    for i, (fam, m, s) in enumerate(refs):
        line = ax.axhline(m, ls=styles[i % len(styles)], color=f"C{i + len(by_fam)}", label=fam)
        if s:
            ax.axhspan(m - s, m + s, color=line.get_color(), alpha=0.08)
    ax.set_xscale("log")
    ax.set_xlabel("density of the map's blocks (log scale)")
    ax.set_ylabel("test accuracy" if key == "test_acc" else "test loss")
    budget = rows[0].get("budget")
    ax.set_title(f"{label}: {'accuracy' if key == 'test_acc' else 'loss'} vs density "
                 f"at a fixed budget ({budget} trainable, hidden {_h(hidden)})", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _save(fig, path)


def _plot_curves(rows: list[dict], label: str, path: Path) -> Path | None:
    hidden = tuple(rows[0]["hidden"])
    task = rows[0]["task"]
    field = "val_loss" if task == "regression" else "val_acc"
    if not any(m.get(field) is not None for r in rows for run in r["runs"]
               for m in run.get("metrics", [])):
        field = "train_loss"  # no validation split
    fig = _figure()
    ax = fig.add_subplot()
    drawn = 0
    for r in rows:
        if tuple(r["hidden"]) != hidden or not r["runs"]:
            continue
        curves = [[m.get(field) for m in run.get("metrics", [])] for run in r["runs"]]
        length = max((len(c) for c in curves), default=0)
        if not length:
            continue
        mean = []
        for e in range(length):
            vals = [c[e] for c in curves if e < len(c) and c[e] is not None]
            mean.append(statistics.fmean(vals) if vals else float("nan"))
        ax.plot(range(1, length + 1), mean, marker="." if length < 30 else None,
                label=_name(r))
        drawn += 1
    if not drawn:
        return None
    ax.set_xlabel("epoch")
    ax.set_ylabel({"val_acc": "validation accuracy", "val_loss": "validation loss",
                   "train_loss": "training loss (no validation split)"}[field])
    ax.set_title(f"{label}: training curves (mean over seeds, hidden {_h(hidden)})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _spy_plots(config: StudyConfig, datasets: dict[str, Any], out: Path,
               notes: list[str]) -> list[tuple[str, str, Path]]:
    """Spy plot of each map family (first budget, seed 0) -> [(label, model name, path)]."""
    try:
        from ..dynamics.plots import plot_structure
    except ImportError as e:  # pragma: no cover - dynamics always ships with iternn
        notes.append(f"spy plots skipped: {e}")
        return []
    from .models import FAMILIES, build_model

    made = []
    for ds in config.datasets:
        data = datasets.get(ds.label)
        if data is None:
            continue
        hidden = ds.hidden[0]
        for family in ds.models:
            fam = FAMILIES[family]
            if not fam.is_map or family in ("bigru_map",):  # two maps, no single structure
                continue
            dens: list[float | None] = [None] if fam.density == "none" else \
                [d for d in ds.densities if fam.density == "any" or d < 1]
            for d in dens:
                name = _model_name(family, d)
                fname = f"structure_{ds.label}_{family}" + ("" if d is None else f"_d{d:g}") + ".png"
                try:
                    model = build_model(family, data, hidden=hidden, density=d, seed=ds.seeds[0],
                                        activation=ds.activation)
                    hold = ("x",) if ds.task != "sequence" else ()
                    plot_structure(model, out / fname, hold=hold,
                                   title=f"{ds.label}: {name} (hidden {_h(hidden)})")
                    made.append((ds.label, name, out / fname))
                except Exception as e:  # noqa: BLE001 - a picture must not sink the report
                    notes.append(f"spy plot of {ds.label} {name} failed: {' '.join(str(e).split())}")
    return made


# --------------------------------------------------------------------------- claims


def _verdict(c: dict[str, Any], what: str, a_row: dict, b_row: dict,
             chance: float | None = None) -> str:
    if c["better"] is None:
        return f"{what}: **no data** (a side has no completed run)"
    yes = "yes" if c["better"] else "no"
    ev = {"clear": "clear evidence", "weak": "weak evidence", "none": "no evidence (one seed)"}[c["evidence"]]
    t = "" if c["t"] is None else f", t = {c['t']:.1f}"
    near = ""
    if chance is not None and a_row.get("test_acc") is not None and b_row.get("test_acc") is not None:
        low = [_name(r) for r in (a_row, b_row)
               if r["test_acc"] < chance + 0.05]
        if len(low) == 2:
            near = (f" — **both within 5 points of chance ({100 * chance:.0f} %): the comparison is "
                    "uninformative**")
        elif low:
            near = (f" — note: {low[0]} stayed within 5 points of chance ({100 * chance:.0f} %), i.e. it "
                    "did not learn with this training budget; the gap says more about how fast each "
                    "trains than about what each can represent")
    tie = ""
    if not c["better"] and c["evidence"] != "clear":
        tie = " (not a clear loss either: within the seed-to-seed noise)"
    return f"{what}: **{yes}** — {_score_text(a_row)} vs {_score_text(b_row)}{t}; {ev}{tie}{near}"


def _band_reading(wins: Sequence[float], tested: Sequence[float]) -> str:
    """Read the densities whose mean beats the dense map (``wins``, among ``tested``: the
    densities with completed runs) against the paper's claim that a band of *intermediate*
    sparsity beats dense.

    An intermediate band is a non-empty set of winning densities that excludes both the
    sparsest and the densest density tested (so at least three were tested). The cases:
    no wins; a single density tested (no band can be seen); every density; only the
    sparsest; only the densest (the one closest to dense); an intermediate band (called
    one band only when no tested density between its ends loses); wins that include an
    end of the tested range (the range then shows no edge of a band on that side).
    """
    grid = sorted(set(tested) | set(wins))
    won = sorted(set(wins))

    def fmt(ds: Sequence[float]) -> str:
        return ", ".join(f"{d:g}" for d in ds)

    if not won:
        return "no density tested beats dense"
    if len(grid) == 1:
        return f"the only density tested ({fmt(grid)}) beats dense; one density cannot show a band"
    lo, hi = grid[0], grid[-1]
    if won == grid:
        return (f"every density tested ({fmt(grid)}) beats dense: sparsity helps across the "
                "whole range, not in an intermediate band")
    if won == [lo]:
        return f"only the sparsest density tested ({lo:g}) beats dense: no intermediate band"
    if won == [hi]:
        return (f"only the densest density tested ({hi:g}, the one closest to dense) beats dense: "
                "no intermediate band")
    if lo not in won and hi not in won:
        idx = [grid.index(d) for d in won]
        gaps = [d for d in grid[idx[0]:idx[-1] + 1] if d not in won]
        if not gaps:
            return f"an intermediate band ({fmt(won)}) beats dense"
        return (f"intermediate densities ({fmt(won)}) beat dense, but not as one band: "
                f"{fmt(gaps)} between them do{'es' if len(gaps) == 1 else ''} not")
    if lo in won and hi in won:
        ends, side = f"both the sparsest ({lo:g}) and the densest ({hi:g}) density tested", "at either end"
    elif lo in won:
        ends, side = f"the sparsest density tested ({lo:g})", "at the sparse end"
    else:
        ends, side = f"the densest density tested ({hi:g})", "at the dense end"
    return (f"the wins ({fmt(won)}) include {ends}, so the range tested shows no edge of a band "
            f"{side}: not an intermediate band")


def _best_by_val(rows: list[dict], task: str) -> dict | None:
    rows = [r for r in rows if r["n_ok"]]
    if not rows or all(r["val_acc"] is None and r["best_val_loss"] is None for r in rows):
        return None  # nothing completed, or no validation split to choose by
    if task == "regression":
        return min(rows, key=lambda r: (r["best_val_loss"] if r["best_val_loss"] is not None else math.inf))
    return max(rows, key=lambda r: (r["val_acc"] if r["val_acc"] is not None else -math.inf))


#: (module family, its block-map family, the converter): pairs that must be the same network.
_TWINS = (("mlp", "mlp_map", "from_mlp"), ("resmlp", "resmlp_map", "from_module"),
          ("cnn1d", "cnn1d_map", "from_module"), ("bigru", "bigru_map", "from_gru per direction"))


def _twin_claim(records: list[dict], label: str, hidden: tuple, module: str, twin: str, how: str,
                key: str, row: dict) -> list[str]:
    """The claim line "the module and its map train to the same numbers", from the per-seed
    scores of the runs both completed (none: no line)."""
    pairs: dict[int, dict[str, dict]] = {}
    for r in records:
        if r["label"] == label and tuple(r["hidden"]) == hidden and \
                r["family"] in (module, twin) and r["status"] in _OK:
            pairs.setdefault(r["seed"], {})[r["family"]] = r
    diffs = [abs(p[module][key] - p[twin][key]) for p in pairs.values()
             if len(p) == 2 and p[module].get(key) is not None and p[twin].get(key) is not None]
    if not diffs:
        return []
    same = max(diffs) <= (1e-3 if key == "test_acc" else 1e-4 * max(1.0, abs(row[key] or 1.0)))
    unit = " points" if key == "test_acc" else ""
    mx = 100 * max(diffs) if key == "test_acc" else max(diffs)
    what = ("The MLP and its block-map twin (`from_mlp`)" if module == "mlp" else
            f"`{module}` and its block-map twin `{twin}` (`{how}`)")
    return [f"- *{what} train to the same numbers*: **{'yes' if same else 'no'}** — same "
            f"function, same seed, same initial weights; largest |Δ {key}| over {len(diffs)} "
            f"seed(s): {mx:.3g}{unit} "
            + ("(identical up to float rounding)" if same else
               "(the two evaluate in a different order, and the float rounding that opens grows "
               "over the training steps)")]


def _claims(config: StudyConfig, stats: list[dict], records: list[dict],
            summaries: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for ds in config.datasets:
        n_cls = (summaries.get(ds.label) or {}).get("n_classes")
        chance = 1.0 / n_cls if ds.task != "regression" and n_cls else None
        rows = [r for r in stats if r["label"] == ds.label]
        if not rows:
            continue
        key, hib = _metric(ds.task)
        vals = "test_acc" if key == "test_acc" else "test_loss"
        lines += ["", f"### {ds.label}", ""]
        for hidden in ds.hidden:
            hr = [r for r in rows if tuple(r["hidden"]) == hidden]
            if not hr:
                continue
            get = {_name(r): r for r in hr}
            fam = lambda f, hr=hr: [r for r in hr if r["family"] == f]  # noqa: E731
            budget = hr[0].get("budget")
            lines.append(f"Budget: hidden {_h(hidden)} = {budget} trainable parameters."
                         if budget is not None else
                         f"Published shape: hidden {_h(hidden)} (not matched to a budget).")
            lines.append("")
            cmp = lambda a, b, vals=vals, hib=hib: compare(  # noqa: E731
                _values(a, vals), _values(b, vals), higher_better=hib)
            if ds.task != "sequence":
                mlp = get.get("mlp")
                sparse = [r for r in fam("sparse_map") if r["n_ok"]]
                for module, twin, how in _TWINS:
                    if get.get(module) and get.get(twin):
                        lines += _twin_claim(records, ds.label, hidden, module, twin, how, key,
                                             get[module])
                extras = sorted({r.get("extra_steps") or 0 for r in hr
                                 if r["family"] in ("dense_map", "sparse_map")}) or [0]
                best_per_extra = {}
                for e in extras:
                    sp = [r for r in sparse if (r.get("extra_steps") or 0) == e]
                    dn = next((r for r in fam("dense_map") if (r.get("extra_steps") or 0) == e), None)
                    steps = next((r["steps"] for r in sp + ([dn] if dn else []) if r.get("steps")), None)
                    tag = f" [maps iterated {steps} times{f', +{e}' if e else ''}]" if steps else ""
                    if len(extras) > 1:
                        lines.append(f"- With {'the default number of' if not e else f'{e} extra'} "
                                     f"application{'s' if e != 1 else ''}{tag}:")
                    pre = "  - " if len(extras) > 1 else "- "
                    sub = "    - " if len(extras) > 1 else "  - "
                    best = _best_by_val(sp, ds.task) if sp else None
                    if sp and best is None:
                        lines.append(pre + "no validation scores to choose a density by (no "
                                     "validation split): the sparse maps are not compared")
                        sp = []
                    if sp and mlp and mlp["n_ok"]:
                        best_per_extra[e] = best
                        claim = ("*A random-sparse map at the same budget beats the MLP* (best density "
                                 f"by validation: d={best['density']:g})")
                        lines.append(pre + _verdict(cmp(best, mlp), claim, best, mlp, chance))
                        wins = [r["density"] for r in sp if cmp(r, mlp)["better"]]
                        lines.append(f"{sub}densities whose mean beats the MLP: "
                                     f"{', '.join(f'{d:g}' for d in wins) if wins else 'none'} "
                                     f"(of {', '.join(format(r['density'], 'g') for r in sp)})")
                    if sp and dn and dn["n_ok"]:
                        claim = ("*Some sparsity beats the dense map at the same budget* (best density "
                                 f"by validation: d={best['density']:g})")
                        lines.append(pre + _verdict(cmp(best, dn), claim, best, dn, chance))
                        wins = [r["density"] for r in sp if cmp(r, dn)["better"]]
                        tested = [r["density"] for r in sp]
                        lines.append(f"{sub}densities whose mean beats dense_map: "
                                     f"{', '.join(f'{d:g}' for d in sorted(wins)) if wins else 'none'} "
                                     f"(of {', '.join(f'{d:g}' for d in sorted(tested))}) → "
                                     f"{_band_reading(wins, tested)} "
                                     "(the paper's direction: a band of intermediate sparsity beats dense)")
                    if dn and mlp and dn["n_ok"] and mlp["n_ok"]:
                        claim = "*The dense map beats the MLP at (about) the same budget*"
                        lines.append(pre + _verdict(cmp(dn, mlp), claim, dn, mlp, chance))
                    dead = [r for r in sp + ([dn] if dn else []) if r.get("live") is not None
                            and r.get("trainable") and r["live"] < r["trainable"]]
                    if dead:
                        lines.append(f"{sub}**caveat: dead parameters.** Only part of these maps' trainable "
                                     "entries can reach the output in their applications: "
                                     + "; ".join(f"{_name(r)}: {r['live']} of {r['trainable']} live "
                                                 f"({100 * r['live'] / r['trainable']:.0f} %)" for r in dead)
                                     + ". The comparison is at equal *trainable* count, not equal *live* "
                                     "count" + (" (see the extra-step variants)" if len(extras) > 1 else
                                                " (run `extra_steps = [0, 1]` to compare)") + ".")
                if len(best_per_extra) > 1:
                    lo, hi = min(best_per_extra), max(best_per_extra)
                    a, b = best_per_extra[hi], best_per_extra[lo]
                    lines.append("- " + _verdict(
                        cmp(a, b), f"*Iterating the sparse map more often helps* (best sparse map with "
                                   f"+{hi} vs +{lo} applications, each chosen by validation)", a, b, chance))
            else:
                forced = [r for r in fam("forced_map") if r["n_ok"]]
                sparse = [r for r in forced if r["density"] is not None and r["density"] < 1]
                dense = next((r for r in forced if r["density"] == 1.0), None)
                best = _best_by_val(sparse, ds.task) if sparse else None
                for base in ("lstm", "gru", "rnn"):
                    b = get.get(base)
                    if best is not None and b is not None and b["n_ok"]:
                        what = (f"*A sparse forced (recurrent) map beats the {base.upper()} at the same "
                                f"budget* (best density by validation: d={best['density']:g})")
                        lines.append("- " + _verdict(cmp(best, b), what, best, b, chance))
                if best is not None and dense is not None:
                    lines.append("- " + _verdict(cmp(best, dense),
                                                 f"*The sparse forced map beats the dense forced map* "
                                                 f"(d={best['density']:g})", best, dense, chance))
                if best is None and dense is not None:
                    lines.append("- no sparse forced map was run (only density 1): the sparse claims "
                                 "are not tested here")
                if not any(get.get(b) for b in ("lstm", "gru", "rnn")):
                    lines.append("- no RNN/GRU/LSTM baseline was run: the comparison is not tested here")
            lines.append("")
    return lines


# --------------------------------------------------------------------------- context


def _twin_gap(records: list[dict], label: str, hidden: tuple, family: str) -> float | None:
    """Largest |test accuracy of the map - of its module| over the seeds both completed."""
    by_seed: dict[int, dict[str, float]] = {}
    for r in records:
        if r["label"] == label and tuple(r["hidden"]) == hidden and r["status"] in _OK \
                and r["family"] in (family, family + "_map") and r.get("test_acc") is not None:
            by_seed.setdefault(r["seed"], {})[r["family"]] = r["test_acc"]
    gaps = [abs(p[family] - p[family + "_map"]) for p in by_seed.values() if len(p) == 2]
    return max(gaps) if gaps else None


def _context(config: StudyConfig, stats: list[dict], records: list[dict]) -> list[str]:
    """The Context section: the published MNIST-1D figures, and beside them this study's
    runs of the published shapes (or its MLP and best model)."""
    L = [("Test accuracies reported with MNIST-1D (Greydanus 2020, *Scaling down deep learning*, "
          "arXiv:2011.14439, and the dataset's README): "
          + ", ".join(f"{n} ~{100 * a:.0f} %" for n, a in MNIST1D_BASELINES)
          + "; a later rerun of the MLP by the dataset's authors gave 65.1 %. Their recipe: Adam at "
          "lr 0.01, batch 100, 6000 steps on the 4000 training samples as generated, the final "
          "weights scored on the 1000 test samples.")]
    specs = {d.label: d for d in config.datasets if d.name == "mnist1d"}
    m1 = [r for r in stats if r["label"] in specs]
    if not m1:
        return L + ["", "(MNIST-1D was not part of this study.)"]
    base = [r for r in m1 if r["family"].removesuffix("_map") in MNIST1D_PUBLISHED]
    if base:
        L += ["", "The published shapes, trained here through the same trainer (each also as its "
              "exact block map: `from_module` for the MLP and the CNN, `from_gru` per direction "
              "of the GRU). Measured: mean ± sample std of the test accuracy over seeds, and each "
              "seed's value; *map vs module*: the largest per-seed gap between a map and its "
              "module, which only float rounding in another evaluation order can open.", ""]
        rows = []
        for r in base:
            fam = r["family"].removesuffix("_map")
            shape, what, published = MNIST1D_PUBLISHED[fam]
            if tuple(r["hidden"]) != shape:
                published = f"– (published shape: hidden {_h(shape)})"
            gap = _twin_gap(records, r["label"], tuple(r["hidden"]), fam) \
                if r["family"].endswith("_map") else None
            seeds = ", ".join(f"{100 * v:.1f}" for v in r["test_acc_values"]) or "–"
            rows.append([f"{what}: `{r['family']}`", _h(r["hidden"]),
                         "–" if r["trainable"] is None else r["trainable"], published,
                         _ms(r["test_acc"], r["test_acc_std"], True) + f" (n={r['n_ok']})", seeds,
                         "–" if gap is None else f"{100 * gap:.2g} points",
                         "–" if not r["all_wall"] else f"{statistics.fmean(r['all_wall']):.1f}"])
        L += _table(["model", "hidden", "trainable", "published test acc", "measured test acc %",
                     "per seed %", "map vs module", "wall s/run"], rows)
        L.append("")
        for label in dict.fromkeys(r["label"] for r in base):
            L.append(f"- {label}: {selection_text(specs[label].train, specs[label].options)}")
        return L
    L.append("")
    best = max((r for r in m1 if r["test_acc"] is not None), key=lambda r: r["test_acc"], default=None)
    mlps = [r for r in m1 if r["family"] == "mlp" and r["test_acc"] is not None]
    if mlps:
        big = max(mlps, key=lambda r: r["budget"] or 0)
        L.append(f"Here: the MLP with hidden {_h(big['hidden'])} ({big['budget']} parameters) reached "
                 f"{_score_text(big)} against the published MLP's ~68 % (other sizes and training: "
                 f"{selection_text(specs[big['label']].train, specs[big['label']].options)})")
    if best is not None:
        L.append(f"Best model here: {_name(best)} with hidden "
                 f"{_h(best['hidden'])}: {_score_text(best)}.")
    return L


# --------------------------------------------------------------------------- the report


def write_report(config: StudyConfig, out_dir: str | Path, *, records: list[dict] | None = None,
                 pictures: bool = True, sweep: SweepResult | None = None,
                 datasets: dict[str, Any] | None = None) -> Path:
    """Write ``report.md`` (and its PNGs and ``config.toml``) into ``out_dir``; returns
    the path of ``report.md``. ``records`` default to :func:`~iternn.study.sweep.collect`."""
    import json

    from .checkpoint import atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if records is None:
        records = collect(config, out)
    atomic_write_text(out / "config.toml", dumps(config))
    summaries: dict[str, Any] = {}
    try:
        summaries = json.loads((out / DATASETS_JSON).read_text())
    except (OSError, ValueError):
        pass
    notes: list[str] = []
    need_data = pictures or any(ds.label not in summaries for ds in config.datasets)
    if need_data and datasets is None:
        datasets = load_datasets(config)
    datasets = datasets or {}
    for lab, d in datasets.items():
        summaries.setdefault(lab, d.summary())

    stats = group_stats(records)
    counts = {s: sum(r["status"] == s for r in records)
              for s in ("ok", "early_stopped", "diverged", "failed", "missing")}
    total_wall = sum(r.get("wall_time_s") or 0.0 for r in records)
    L: list[str] = []
    L += [f"# iternn sparsity study: {config.name}", ""]
    L.append(f"Written {_dt.datetime.now().isoformat(timespec='seconds')} by `iternn study`. "
             f"{len(records)} runs in the grid: {counts['ok']} ok, {counts['early_stopped']} "
             f"early-stopped, {counts['diverged']} diverged, {counts['failed']} failed, "
             f"{counts['missing']} missing. Sum of run wall times: {total_wall:.1f} s"
             + (f"; this sweep took {sweep.wall_time_s:.1f} s wall ({sweep.ran} run, "
                f"{sweep.skipped} reused)" if sweep is not None else "") + ".")
    L.append("")
    L.append(_environment(config))
    L += ["", f"Reproduce: `iternn study --config config.toml --out {out.name}` (the config is in "
          "this folder; runs already present are reused). The question: at an equal number of "
          "*trainable* parameters, how do an MLP, its block-map twin, a dense block map and "
          "random-sparse block maps compare — and, on the anomaly sequence task, a forced "
          "(recurrent) map against RNN/GRU/LSTM? (arXiv 2404.00880 §8 and its predecessors.)"]
    if counts["missing"]:
        L += ["", f"**{counts['missing']} runs are missing** (another shard's, or not run yet): the "
              "tables below cover the runs present."]

    # -- datasets
    L += ["", "## Datasets", ""]
    rows = []
    for ds in config.datasets:
        s = summaries.get(ds.label)
        if s is None:
            rows.append([ds.label, ds.name, ds.task, "–", "–", "–", "–", "–", "–"])
            continue
        sizes = s.get("sizes", {})
        bal = s.get("class_balance") or {}
        tb = bal.get("train") if isinstance(bal, dict) else None
        balance = "–" if not tb else f"{min(tb)}–{max(tb)} per class ({len(tb)} classes)"
        rows.append([ds.label, ds.name, ds.task, "×".join(map(str, s.get("feature_shape", []))),
                     sizes.get("train", "–"), sizes.get("val", "–"), sizes.get("test", "–"),
                     balance, s.get("cross_split_duplicates", "–")])
    L += _table(["label", "dataset", "task", "sample shape", "train", "val", "test",
                 "class balance (train)", "rows shared across splits"], rows)
    L.append("")
    for ds in config.datasets:
        s = summaries.get(ds.label) or {}
        meta = s.get("meta") or {}
        if meta.get("source"):
            scaled = ("inputs standardised with train-split statistics" if s.get("standardized", True)
                      else "inputs as the source gives them (not standardised)")
            L.append(f"- **{ds.label}**: {meta['source']}; options {ds.options or 'default'}; "
                     f"splits seeded with data_seed={config.data_seed}; {scaled}.")
    # -- models
    L += ["", "## Models", ""]
    L.append("Every family of a dataset is matched to one *budget* of trainable parameters: the MLP's "
             "count (flat tasks) or the dense forced map's (sequences). `mlp_map` and `sparse_map` "
             "and `forced_map` match it exactly; `dense_map` has at most the budget and misses it by "
             "less than one hidden unit; `rnn`/`gru`/`lstm` take the hidden width whose count is "
             "closest (see `iternn.study.models`). *Live*: the trainable entries that can reach the "
             "output within the model's applications (`iternn.study.models.live_trainable`); the "
             "others never get a gradient. *Steps*: applications of a held-input map (`+n`: extra "
             "applications beyond the MLP's number of layers). `resmlp` and `resmlp_map` match "
             "the budget of their widths exactly; the published MNIST-1D shapes (`cnn1d`, "
             "`bigru` and their maps) are not matched to a budget: their `hidden` is their own "
             "width, and their budget is shown as –.")
    L.append("")
    from .models import FAMILIES

    fam_rows = []
    for ds in config.datasets:
        for hidden in ds.hidden:
            for r in stats:
                if r["label"] == ds.label and tuple(r["hidden"]) == hidden:
                    b, t, lv = r.get("budget"), r.get("trainable"), r.get("live")
                    diff = "–" if b is None or t is None else f"{t - b:+d}"
                    live = "–" if lv is None else (f"{lv}" if t is None or lv == t else
                                                    f"**{lv}** ({100 * lv / t:.0f} %)")
                    fam_rows.append([ds.label, _h(hidden), _name(r),
                                     FAMILIES[r["family"]].description if r["family"] in FAMILIES else "",
                                     "–" if r.get("steps") is None else r["steps"],
                                     "–" if b is None else b, "–" if t is None else t, diff, live])
    L += _table(["dataset", "hidden", "model", "what", "steps", "budget", "trainable", "vs budget",
                 "live"], fam_rows)
    dead = [r for r in stats
            if r.get("live") is not None and r.get("trainable") and r["live"] < r["trainable"]]
    if dead:
        L += ["", f"**{len(dead)} model(s) have dead parameters** (live < trainable, in bold above): "
              "a held-input map iterated as many times as the MLP has layers never carries its "
              "`h <- h` and `h <- y` blocks to the output, so at low density most of its 'matched' "
              "budget cannot learn. Their comparisons are at equal trainable, not equal live, count; "
              "one extra application (`extra_steps = [0, 1]` in the config) makes every block live."]

    # -- results
    L += ["", "## Results", ""]
    L.append("Mean ± sample standard deviation over seeds of the runs that completed (status ok or "
             "early-stopped). Each table says which weights its test metrics come from (the "
             "dataset's selection rule). Accuracies in %. Wall time: mean per run, seconds.")
    for ds in config.datasets:
        rs = [r for r in stats if r["label"] == ds.label]
        if not rs:
            continue
        L += ["", f"### {ds.label}", "", selection_text(ds.train, ds.options), ""]
        table = []
        for r in rs:
            table.append([_h(r["hidden"]), _model_name(r["family"], None, r.get("extra_steps") or 0),
                          "–" if r["density"] is None else f"{r['density']:g}",
                          "–" if r["trainable"] is None else r["trainable"],
                          f"{r['n_ok']}/{r['n_diverged']}/{r['n_failed']}/{r['n_missing']}",
                          _ms(r["test_acc"], r["test_acc_std"], True),
                          _ms(r["test_loss"], r["test_loss_std"], False),
                          _ms(r["val_acc"], r["val_acc_std"], True),
                          "–" if r["epochs_run"] is None else f"{r['epochs_run']:.1f}",
                          "–" if not r["all_wall"] else f"{statistics.fmean(r['all_wall']):.1f}"])
        L += _table(["hidden", "model", "density", "trainable", "runs ok/div/fail/miss",
                     "test acc %", "test loss", "val acc %", "epochs", "wall s/run"], table)

    # -- plots
    L += ["", "## Plots", ""]
    pics: list[tuple[str, str, Path]] = []
    if pictures:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            notes.append("plots skipped: matplotlib is not installed (pip install iternn[plots])")
            pictures = False
    if pictures:
        for ds in config.datasets:
            rs = [r for r in stats if r["label"] == ds.label]
            if not rs:
                continue
            p = _plot_acc_vs_params(rs, ds.label, out / f"acc_vs_params_{ds.label}.png")
            if p:
                pics.append(("Accuracy vs trainable parameters", ds.label, p))
            for hidden in ds.hidden:
                name = f"acc_vs_density_{ds.label}_h{_h(hidden)}.png"
                p = _plot_acc_vs_density(rs, ds.label, hidden, out / name)
                if p:
                    pics.append(("Accuracy vs density at a fixed budget",
                                 f"{ds.label}, hidden {_h(hidden)}", p))
            p = _plot_curves(rs, ds.label, out / f"curves_{ds.label}.png")
            if p:
                pics.append(("Training curves", ds.label, p))
        for lab, name, p in _spy_plots(config, datasets, out, notes):
            pics.append(("Block structure (spy plots)", f"{lab}: {name}", p))
    for heading in ("Accuracy vs trainable parameters", "Accuracy vs density at a fixed budget",
                    "Training curves", "Block structure (spy plots)"):
        L += [f"### {heading}", ""]
        items = [(cap, p) for h, cap, p in pics if h == heading]
        if not items:
            L += ["(none: " + ("no data for this plot" if pictures else "pictures off") + ")", ""]
        for cap, p in items:
            L += [f"![{heading}: {cap}]({p.name})", ""]
    if pictures:
        L.append("Training curves: validation accuracy (loss for regression; the training loss where "
                 "a dataset has no validation split) per epoch at the first "
                 "budget, the mean over the seeds still running (a run that stopped early drops out). "
                 "Spy plots: rows are destination slots, columns source slots (the paper's F); black: "
                 "a weight entry. Sparse blocks show their actual random pattern.")
    for n in notes:
        L += ["", f"- note: {n}"]

    # -- claims
    L += ["", "## Claims", ""]
    L.append("Whether the paper's claims held **on this data**, computed from the table above "
             "(score: test accuracy, test loss for regression). Where several densities were run, "
             "the density is chosen by validation score before its test score is compared. "
             "Evidence is *clear* only with >= 3 seeds per side and |Welch t| >= 2, otherwise "
             "*weak*; with this many comparisons a few clear results can still be chance, and "
             "small budgets, few epochs and one data split limit what any of this says about the "
             "paper's setting. The paper itself calls its evidence weak.")
    L += _claims(config, stats, records, summaries)

    # -- context
    L += ["## Context: published MNIST-1D baselines", ""]
    L += _context(config, stats, records)

    # -- failures
    L += ["", "## Failures and divergences", ""]
    bad = [r for r in records if r["status"] in ("failed", "diverged")]
    if not bad:
        L.append("None: every run present completed.")
    for r in bad:
        extra = r.get("error") or ""
        if r["status"] == "diverged" and r.get("diverged_at"):
            da = r["diverged_at"]
            extra = f"non-finite loss at epoch {da.get('epoch')}, batch {da.get('batch')}"
        L.append(f"- `{r['run_id']}`: **{r['status']}** — {extra} (see `{RUNS_DIR}/{r['run_id']}/`)")

    # -- raw
    L += ["", "## Raw results", ""]
    L.append(f"- `{RESULTS_CSV}`: one row per run (the table's raw numbers).")
    L.append(f"- `{RESULTS_JSON}`: the same records with per-epoch metrics and training options.")
    L.append(f"- `{DATASETS_JSON}`: dataset summaries; `config.toml`: the study's config.")
    L.append(f"- `{RUNS_DIR}/<run_id>/`: `metrics.csv`, `metrics.json`, `checkpoint.pt` (best weights "
             "at the end), `result.json`, and `error.txt` for a failed run.")
    path = out / REPORT_NAME
    atomic_write_text(path, "\n".join(L) + "\n")
    return path


def _environment(config: StudyConfig) -> str:
    import torch

    from .. import __version__

    return (f"Environment: iternn {__version__}, torch {torch.__version__}, Python "
            f"{platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs; "
            f"{config.threads} torch thread(s) per run; device {config.train.get('device', 'cpu')}.")

