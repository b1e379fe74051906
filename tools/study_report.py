"""The report of a study (tools.study): mean, std and 95% CI per arm, Welch tests of the
reference arm against every other arm with Holm's correction, per-epoch curves, plots.

Reads only what the runner keeps under <out>/runs/<arm>-s<seed>/: eval.json (python -m
train.evaluate on the final weights), train_eval.json (the same weights on the training list,
when the study asks for it) and summary.csv (per-epoch log of python -m train).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import stats

__all__ = ["SCALARS", "TESTED", "aggregate", "summary_table", "tests_table", "read_curves"]

SCALARS = (("top1", "top-1"), ("top5", "top-5"), ("nll", "NLL"), ("ece", "ECE"),
           ("auroc", "OOD AUROC"), ("aupr_in", "AUPR-In"), ("aupr_out", "AUPR-Out"),
           ("fpr95", "FPR@95"), ("auroc_8", "AUROC bag only"),
           ("auroc_9", "AUROC ankle boot only"), ("train_top1", "train top-1"))
# Metrics tested reference vs each other arm (the first is the primary endpoint); "occl_random"
# is the random patch-drop mean over ratios 0.1-0.9. Holm's correction runs within each metric.
TESTED = ("top1", "nll", "ece", "auroc", "occl_random")


def _mean_std(values: list[float]) -> dict[str, Any]:
    a = np.asarray(values, dtype=np.float64)
    std = float(a.std(ddof=1)) if a.size > 1 else float("nan")
    row = {"mean": float(a.mean()), "std": std, "n": int(a.size), "values": a.tolist()}
    if a.size > 1:
        row["ci95"] = list(stats.mean_ci(a.tolist()))
    return row


def _pool_bins(runs: list[list[dict[str, float]]]) -> list[dict[str, float]]:
    """Calibration bins of several runs merged (counts summed, means count-weighted)."""
    out = []
    for bs in zip(*runs):
        n = sum(b["count"] for b in bs)
        w = max(n, 1)
        out.append({"lower": bs[0]["lower"], "upper": bs[0]["upper"], "count": n,
                    "confidence": sum(b["confidence"] * b["count"] for b in bs) / w,
                    "accuracy": sum(b["accuracy"] * b["count"] for b in bs) / w})
    return out


def read_curves(paths: Sequence[Path]) -> dict[str, dict[str, list[float]]]:
    """Per-epoch mean and std over runs of every numeric summary.csv column (epochs that all
    runs reached; columns that all runs have)."""
    runs = []
    for p in paths:
        with open(p, newline="") as f:
            runs.append([{k: float(v) for k, v in r.items() if v not in ("", None)}
                         for r in csv.DictReader(f)])
    if not runs:
        return {}
    n = min(len(r) for r in runs)
    cols = [c for c in runs[0][0] if all(c in r[0] for r in runs)] if n else []
    out = {}
    for c in cols:
        a = np.asarray([[r[i][c] for i in range(n)] for r in runs])  # (runs, epochs)
        out[c] = {"mean": a.mean(0).tolist(),
                  "std": (a.std(0, ddof=1) if len(runs) > 1 else np.full(n, np.nan)).tolist()}
    return out


def _arm_row(out: Path, arm: str, seeds: Sequence[int]) -> dict[str, Any] | None:
    runs = [(s, out / "runs" / f"{arm}-s{s}") for s in seeds]
    evals = [(s, d, json.loads((d / "eval.json").read_text())) for s, d in runs
             if (d / "eval.json").is_file()]
    if not evals:
        return None
    flat = []
    for _, d, e in evals:
        f = {**{k: e[k] for k in ("top1", "top5", "nll", "ece")}, **e.get("ood", {}),
             **{f"auroc_{c}": v["auroc"] for c, v in e.get("ood", {}).get("by_label", {}).items()}}
        if (d / "train_eval.json").is_file():
            f["train_top1"] = json.loads((d / "train_eval.json").read_text())["top1"]
        flat.append(f)
    row: dict[str, Any] = {"seeds": [s for s, _, _ in evals]}
    for key, _ in SCALARS:
        if all(key in f for f in flat):
            row[key] = _mean_std([f[key] for f in flat])
    row["calibration_bins"] = _pool_bins([e["calibration_bins"] for _, _, e in evals])
    occ = [e["occlusion"] for _, _, e in evals]
    ratios = occ[0]["ratios"]
    row["occlusion"] = {"ratios": ratios, "drop": occ[0]["drop"], "samples": occ[0]["samples"]}
    nz = [j for j, r in enumerate(ratios) if r > 0]
    for mode in occ[0]["accuracy"]:
        curves = np.asarray([o["accuracy"][mode] for o in occ])  # (seeds, ratios)
        row["occlusion"][mode] = {
            "mean": curves.mean(0).tolist(),
            "std": (curves.std(0, ddof=1) if len(occ) > 1
                    else np.full(len(ratios), np.nan)).tolist(),
            "mean_occ": _mean_std(curves[:, nz].mean(1).tolist())}
    csvs = [d / "summary.csv" for _, d, _ in evals if (d / "summary.csv").is_file()]
    if len(csvs) == len(evals):
        row["curves"] = read_curves(csvs)
    return row


def _values(row: dict[str, Any], key: str) -> list[float] | None:
    if key == "occl_random":
        return row["occlusion"].get("random", {}).get("mean_occ", {}).get("values")
    return row[key]["values"] if key in row else None


def welch_tests(summary: dict[str, Any], reference: str) -> dict[str, Any]:
    """reference vs every other arm on each TESTED metric: Welch's t-test, 95% CI of the
    difference (reference - other), Holm-adjusted p within the metric's family."""
    if reference not in summary:
        return {}
    out: dict[str, Any] = {}
    for key in TESTED:
        ref = _values(summary[reference], key)
        if ref is None or len(ref) < 2:
            continue
        fam = {arm: stats.welch(ref, v) for arm, row in summary.items()
               if arm != reference and (v := _values(row, key)) is not None and len(v) >= 2}
        for (arm, r), adj in zip(fam.items(), stats.holm([r["p"] for r in fam.values()])):
            r["p_holm"] = adj
        if fam:
            out[key] = fam
    return out


def aggregate(out: Path, *, methods: Sequence[str], seeds: Sequence[int],
              reference: str | None = None, title: str = "Fashion-MNIST (8 classes)"
              ) -> dict[str, Any]:
    """Mean, sample std and 95% CI over seeds of every metric and occlusion point per arm
    (`methods`: arm names), from <out>/runs/<arm>-s<seed>/; writes summary.json, summary.md,
    occlusion.png, reliability.png and, when summary.csv files are there, curves.png (and
    alpha.png when they log PAL's alpha). Occlusion 'mean_occ' = the mean accuracy over the
    nonzero drop ratios (area under the curve / range). Calibration bins are pooled over seeds.
    Arms without any evaluated run are left out. With `reference`, summary.json gets
    "_tests" (welch_tests) and summary.md a table of them."""
    from train.evaluate import plot_curves, plot_reliability
    summary: dict[str, Any] = {}
    for arm in methods:
        row = _arm_row(out, arm, seeds)
        if row is not None:
            summary[arm] = row
    tests = welch_tests(summary, reference) if reference else {}
    text = summary_table(summary) + (tests_table(tests, reference) if tests else "")
    (out / "summary.json").write_text(json.dumps({**summary, **({"_tests": tests} if tests
                                                                 else {})}, indent=1))
    (out / "summary.md").write_text(text)
    if not summary:
        return summary
    modes = [m for m in next(iter(summary.values()))["occlusion"]
             if m not in ("ratios", "drop", "samples")]
    panels = {mode: {m: (r["occlusion"]["ratios"], [100 * v for v in r["occlusion"][mode]["mean"]],
                         [100 * v for v in r["occlusion"][mode]["std"]])
                     for m, r in summary.items()} for mode in modes}
    plot_curves(panels, out / "occlusion.png",
                title=f"{title}, top-1 vs patch-drop ratio, mean +- std over seeds")
    plot_reliability({m: r["calibration_bins"] for m, r in summary.items()},
                     out / "reliability.png", title="reliability, seeds pooled")
    _plot_epochs(summary, out, plot_curves, title)
    return summary


def _plot_epochs(summary: dict[str, Any], out: Path, plot_curves, title: str) -> None:
    with_curves = {m: r["curves"] for m, r in summary.items() if r.get("curves")}
    if not with_curves:
        return

    def line(c, col):
        x = list(range(1, len(c[col]["mean"]) + 1))
        return x, c[col]["mean"], c[col]["std"]

    for cols, name, ylabel in ((("train_loss", "eval_loss"), "curves.png", "loss"),):
        panels = {col: {m: line(c, col) for m, c in with_curves.items() if col in c}
                  for col in cols}
        plot_curves(panels, out / name, xlabel="epoch", ylabel=ylabel,
                    title=f"{title}: training / validation loss, mean +- std over seeds")
    pal_cols = ("train_pal_alpha_mean", "train_pal_alpha_std", "train_pal_lam_shift")
    pal = {m: c for m, c in with_curves.items()
           if any(k in c and np.isfinite(c[k]["mean"]).any() for k in pal_cols)}
    if pal:
        panels = {k.replace("train_pal_", ""): {m: line(c, k) for m, c in pal.items() if k in c}
                  for k in pal_cols}
        plot_curves({k: v for k, v in panels.items() if v}, out / "alpha.png", xlabel="epoch",
                    ylabel="per-epoch mean",
                    title=f"{title}: PAL alpha (mean, std) and |lam - lam_area| per epoch, "
                          "mean +- std over seeds")


def _fmt(ms: dict[str, Any] | None, scale: float = 100.0, digits: int = 2) -> str:
    if ms is None:
        return "-"
    std = "" if not np.isfinite(ms["std"]) else f" ± {scale * ms['std']:.{digits}f}"
    return f"{scale * ms['mean']:.{digits}f}{std}"


def summary_table(summary: dict[str, Any]) -> str:
    """Markdown: one row per arm, mean ± std over seeds (percent, NLL as is), then the 95% CI
    of the top-1 mean when there are >= 2 seeds."""
    if not summary:
        return "no evaluated runs yet\n"
    modes = [m for m in next(iter(summary.values()))["occlusion"]
             if m not in ("ratios", "drop", "samples")]
    scalars = [(k, t) for k, t in SCALARS if any(k in r for r in summary.values())]
    head = ["method", "seeds"] + [t for _, t in scalars] + [f"occl. {m}" for m in modes]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for method, r in summary.items():
        cells = [method, str(len(r["seeds"]))]
        for key, _ in scalars:
            cells.append(_fmt(r.get(key), 1.0, 3) if key == "nll" else _fmt(r.get(key)))
        cells += [_fmt(r["occlusion"][m]["mean_occ"]) for m in modes]
        lines.append("| " + " | ".join(cells) + " |")
    ci = [(m, r["top1"]) for m, r in summary.items() if "ci95" in r.get("top1", {})]
    if ci:
        lines += ["", "| method | top-1 mean | 95% CI (t, n-1 df) |", "|---|---|---|"]
        lines += [f"| {m} | {100 * t['mean']:.2f} | [{100 * t['ci95'][0]:.2f}, "
                  f"{100 * t['ci95'][1]:.2f}] |" for m, t in ci]
    return "\n".join(lines) + "\n"


def tests_table(tests: dict[str, Any], reference: str) -> str:
    """Markdown of welch_tests: difference (reference - other, points or nats), its 95% CI,
    Welch's t, df, p and Holm-adjusted p."""
    lines = ["", f"Welch tests, {reference} - other (percentage points; NLL in nats); Holm's "
             "correction over the comparisons of each metric:", "",
             "| metric | vs | diff | 95% CI | t | df | p | p (Holm) |", "|---" * 8 + "|"]
    for key, fam in tests.items():
        scale = 1.0 if key == "nll" else 100.0
        d = 3 if key == "nll" else 2
        for arm, r in fam.items():
            lines.append(f"| {key} | {arm} | {scale * r['diff']:+.{d}f} | "
                         f"[{scale * r['ci_low']:+.{d}f}, {scale * r['ci_high']:+.{d}f}] | "
                         f"{r['t']:.2f} | {r['df']:.1f} | {_p(r['p'])} | {_p(r['p_holm'])} |")
    return "\n".join(lines) + "\n"


def _p(p: float) -> str:
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"

