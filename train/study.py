"""python -m train.study: the Fashion-MNIST study of the mixing methods (one command, resumable).

    python -m train.study                      # results/study_fmnist (README there has the table)

What it does, each stage skipping what is already done (kill it and rerun: it goes on):
  1. data: Fashion-MNIST from the Debian package (pipelines.fashion_mnist), 8 in-distribution
     classes (`ID_CLASSES`) for training and validation, the other 2 (bag, ankle boot: unseen
     in training) as the out-of-distribution set. `path label` lists under <work>/data.
  2. train: methods x seeds with `python -m train` (STUDY_RECIPE, one budget for all, written
     to <work>/recipe.yaml); a killed run resumes from its last.pth (mid-epoch checkpoints every 20 steps).
  3. evaluate: `python -m train.evaluate` on each run's final weights (last epoch, not the best:
     the same budget for every method), JSON per run under <out>/runs.
  4. aggregate: mean +- std over seeds per method -> <out>/summary.json, summary.md, PNG plots.

Checkpoints live in <work> (default runs/study_fmnist, git-ignored); what is worth keeping
(eval JSON, per-epoch summary.csv, resolved config.yaml, plots) lands in <out>.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .config import METHODS

__all__ = ["STUDY_RECIPE", "write_recipe", "ID_CLASSES", "prepare_study_data", "train_command", "train_run",
           "evaluate_run", "aggregate", "summary_table", "main"]

ID_CLASSES = 8  # classes 0..7 in distribution; 8 (bag) and 9 (ankle boot) held out as OOD
MONITOR_PER_CLASS = 125
STUDY_RECIPE: dict[str, Any] = {
    # The whole training recipe, pinned here (not taken from the packaged demo config, which
    # may be retuned): the Fashion-MNIST demo recipe of commit 7bab72b (32 px, patch 4 -> 8x8
    # tokens, 8-px MaskMix cells = 2x2 tokens, no RandAugment/erasing) with batch 64, 8 classes
    # and a half-epoch warm-up. Only method, seed, epochs and data paths vary per run.
    "data": {"image_size": 32, "batch_size": 64, "val_batch_size": 500, "num_threads": 2,
             "auto_augment": None, "re_prob": 0.0, "interpolation": "bilinear",
             "scale": [0.6, 1.0], "ratio": [0.75, 1.3333333], "hflip": 0.5, "crop_pct": 1.0,
             "mean": [0.22, 0.22, 0.22], "std": [0.33, 0.33, 0.33]},
    "model": {"name": "vit_tiny_patch16_224", "num_classes": 8, "drop_path": 0.0,
              "kwargs": {"img_size": 32, "patch_size": 4, "embed_dim": 96, "depth": 4,
                         "num_heads": 3}},
    "mix": {"method": "mixpro", "preset": "paper", "mask_patch": 8, "smoothing": 0.1},
    "optim": {"lr": 2.0e-3, "lr_base_batch": None, "weight_decay": 0.05, "warmup_epochs": 0.5,
              "warmup_lr": 1.0e-5, "min_lr": 1.0e-5},
    "run": {"epochs": 5, "amp": "bf16", "log_every": 50, "ckpt_steps": 20,
            "progress": "lines", "tensorboard": False},
}
assert STUDY_RECIPE["model"]["num_classes"] == ID_CLASSES


def _log(*msg: Any) -> None:
    print(time.strftime("%H:%M:%S"), *msg, flush=True)


def prepare_study_data(work: Path, *, train_per_class: int, cache_dir: str | None = None,
                       raw_dir: str | None = None, tree_sizes: tuple[int, int] = (20000, 5000),
                       log=None) -> dict[str, Path]:
    """{'train', 'val', 'ood'} file lists (absolute paths) over the cached Fashion-MNIST tree.

    train: the first `train_per_class` images of each ID class (official training split);
    val: all 500 per ID class of the tree's test-split subset; ood: the 2 x 500 held-out ones;
    monitor: the first MONITOR_PER_CLASS of val per class, the per-epoch validation during
    training (it does not change training; the full val is evaluated afterwards)."""
    from pipelines.fashion_mnist import prepare_fashion_mnist
    from pipelines.readers import list_class_folders
    per_class = tree_sizes[0] // 10
    if not 1 <= train_per_class <= per_class:
        raise ValueError(f"--train-per-class must be in [1, {per_class}], got {train_per_class}")
    root = prepare_fashion_mnist(cache_dir, train_size=tree_sizes[0], val_size=tree_sizes[1],
                                 image_size=32, raw_dir=raw_dir, log=log or _log)
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    out = {k: data / f"{k}.txt" for k in ("train", "val", "monitor", "ood")}
    for split, names in (("train", ("train",)), ("val", ("val", "monitor", "ood"))):
        files, labels, _ = list_class_folders(root / split)
        taken: dict[int, int] = {}
        lines: dict[str, list[str]] = {n: [] for n in names}
        for f, y in zip(files, labels):
            if y < ID_CLASSES:
                taken[y] = taken.get(y, 0) + 1
                if split == "train" and taken[y] > train_per_class:
                    continue
                lines[names[0]].append(f"{f} {y}")
                if split == "val" and taken[y] <= MONITOR_PER_CLASS:
                    lines["monitor"].append(f"{f} {y}")
            elif split == "val":
                lines["ood"].append(f"{f} {y}")
        for n, ls in lines.items():
            tmp = out[n].with_suffix(".tmp")
            tmp.write_text("\n".join(ls) + "\n")
            os.replace(tmp, out[n])
    return out


def write_recipe(work: Path) -> Path:
    """STUDY_RECIPE as <work>/recipe.yaml (the --config of every training run)."""
    import yaml
    path = work / "recipe.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(STUDY_RECIPE, sort_keys=False))
    return path


def train_command(method: str, seed: int, run_dir: Path, data: dict[str, Path],
                  epochs: int, recipe: Path) -> list[str]:
    """The exact `python -m train` command of one fresh run."""
    over = {"data.train": str(data["train"]), "data.val": str(data["monitor"]),
            "mix.method": method, "run.seed": seed, "run.epochs": epochs}
    cmd = [sys.executable, "-m", "train", "--config", str(recipe), "--output", str(run_dir)]
    for k, v in over.items():
        cmd += [f"--{k}", str(v)]
    return cmd


def _run_logged(cmd: list[str], log_file: Path, threads: int | None) -> int:
    """Run with stdout+stderr appended to log_file; threads: OMP_NUM_THREADS for torch (on a
    shared 2-core machine 1 thread runs ~2x faster than 2 oversubscribed ones)."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    with open(log_file, "a") as f:
        f.write(f"$ {'OMP_NUM_THREADS=' + str(threads) + ' ' if threads else ''}{' '.join(cmd)}\n")
        f.flush()
        return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode


def train_run(method: str, seed: int, work: Path, out: Path, data: dict[str, Path],
              epochs: int, threads: int | None, recipe: Path) -> bool:
    """Train (or resume, or skip) one run; True when it has finished."""
    name = f"{method}-s{seed}"
    run_dir = work / "runs" / name
    done = run_dir / "done.json"
    if done.is_file():
        return True
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = train_command(method, seed, run_dir, data, epochs, recipe)
    if (run_dir / "last.pth").is_file():
        _log(f"{name}: resuming from {run_dir / 'last.pth'}")
        run_cmd = [sys.executable, "-m", "train", "--resume", str(run_dir)]
    else:
        _log(f"{name}: training")
        run_cmd = cmd
    t0 = time.time()
    rc = _run_logged(run_cmd, run_dir / "train.log", threads)
    for line in (run_dir / "train.log").read_text().splitlines():
        if line.startswith("epoch ") and ": train loss" in line:
            _log(f"  {name} {line}")
    if rc != 0:
        _log(f"{name}: python -m train exited with {rc}; see {run_dir / 'train.log'}")
        return False
    keep = out / "runs" / name
    keep.mkdir(parents=True, exist_ok=True)
    for f in ("summary.csv", "config.yaml"):
        if (run_dir / f).is_file():
            shutil.copy(run_dir / f, keep / f)
    done.write_text(json.dumps({"command": cmd, "seconds_last_session": time.time() - t0}))
    (keep / "command.txt").write_text(" ".join(cmd[1:]) + "\n")
    _log(f"{name}: done in {time.time() - t0:.0f} s")
    return True


def evaluate_run(name: str, work: Path, out: Path, data: dict[str, Path],
                 occlusion_samples: int, threads: int | None) -> bool:
    """`python -m train.evaluate` on the run's final weights; True when its JSON exists."""
    run_dir = work / "runs" / name
    target = out / "runs" / name / "eval.json"
    if target.is_file():
        return True
    cmd = [sys.executable, "-m", "train.evaluate", str(run_dir / "last.pth"),
           "--data", str(data["val"]), "--ood", str(data["ood"]),
           "--occlusion-samples", str(occlusion_samples), "--json", str(target), "--quiet"]
    _log(f"{name}: evaluating")
    rc = _run_logged(cmd, run_dir / "eval.log", threads)
    if rc != 0:
        _log(f"{name}: python -m train.evaluate exited with {rc}; see {run_dir / 'eval.log'}")
        return False
    return True


SCALARS = (("top1", "top-1"), ("top5", "top-5"), ("nll", "NLL"), ("ece", "ECE"),
           ("auroc", "OOD AUROC"), ("aupr_in", "AUPR-In"), ("aupr_out", "AUPR-Out"),
           ("fpr95", "FPR@95"), ("auroc_8", "AUROC bag only"),
           ("auroc_9", "AUROC ankle boot only"))


def _mean_std(values: list[float]) -> dict[str, Any]:
    a = np.asarray(values, dtype=np.float64)
    std = float(a.std(ddof=1)) if a.size > 1 else float("nan")
    return {"mean": float(a.mean()), "std": std, "n": int(a.size), "values": a.tolist()}


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


def aggregate(out: Path, *, methods: Sequence[str], seeds: Sequence[int]) -> dict[str, Any]:
    """Mean and sample std over seeds of every metric and occlusion point, per method, from
    <out>/runs/<method>-s<seed>/eval.json; writes summary.json, summary.md and occlusion.png.
    Occlusion 'mean_occ' = the mean accuracy over the nonzero drop ratios (area under the
    curve / range). Calibration bins are pooled over seeds (reliability.png). Methods without
    any evaluated run are left out."""
    from .evaluate import plot_curves, plot_reliability
    summary: dict[str, Any] = {}
    for method in methods:
        evals = [(s, json.loads(p.read_text())) for s in seeds
                 if (p := out / "runs" / f"{method}-s{s}" / "eval.json").is_file()]
        if not evals:
            continue
        flat = [{**{k: e[k] for k in ("top1", "top5", "nll", "ece")}, **e.get("ood", {}),
                 **{f"auroc_{c}": v["auroc"]
                    for c, v in e.get("ood", {}).get("by_label", {}).items()}}
                for _, e in evals]
        row: dict[str, Any] = {"seeds": [s for s, _ in evals]}
        for key, _ in SCALARS:
            if all(key in f for f in flat):
                row[key] = _mean_std([f[key] for f in flat])
        row["calibration_bins"] = _pool_bins([e["calibration_bins"] for _, e in evals])
        occ = [e["occlusion"] for _, e in evals]
        ratios = occ[0]["ratios"]
        row["occlusion"] = {"ratios": ratios, "drop": occ[0]["drop"],
                            "samples": occ[0]["samples"]}
        for mode in occ[0]["accuracy"]:
            curves = np.asarray([o["accuracy"][mode] for o in occ])  # (seeds, ratios)
            nz = [j for j, r in enumerate(ratios) if r > 0]
            row["occlusion"][mode] = {
                "mean": curves.mean(0).tolist(),
                "std": (curves.std(0, ddof=1) if len(occ) > 1
                        else np.full(len(ratios), np.nan)).tolist(),
                "mean_occ": _mean_std(curves[:, nz].mean(1).tolist())}
        summary[method] = row
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(summary_table(summary))
    if summary:
        modes = [m for m in next(iter(summary.values()))["occlusion"] if m not in
                 ("ratios", "drop", "samples")]
        panels = {mode: {m: (r["occlusion"]["ratios"],
                             [100 * v for v in r["occlusion"][mode]["mean"]],
                             [100 * v for v in r["occlusion"][mode]["std"]])
                         for m, r in summary.items()} for mode in modes}
        plot_curves(panels, out / "occlusion.png",
                    title="Fashion-MNIST (8 classes), top-1 vs patch-drop ratio, mean +- std "
                          "over seeds")
        plot_reliability({m: r["calibration_bins"] for m, r in summary.items()},
                         out / "reliability.png", title="reliability, seeds pooled")
    return summary


def _fmt(ms: dict[str, Any] | None, scale: float = 100.0, digits: int = 2) -> str:
    if ms is None:
        return "-"
    std = "" if not np.isfinite(ms["std"]) else f" ± {scale * ms['std']:.{digits}f}"
    return f"{scale * ms['mean']:.{digits}f}{std}"


def summary_table(summary: dict[str, Any]) -> str:
    """Markdown: one row per method, mean ± std over seeds (percent, NLL as is)."""
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
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.study", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="results/study_fmnist", help="results folder (committed)")
    p.add_argument("--work", default="runs/study_fmnist", help="checkpoints (not committed)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--train-per-class", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1,
                   help="OMP_NUM_THREADS of the train/evaluate processes (0: torch default)")
    p.add_argument("--occlusion-samples", type=int, default=400,
                   help="validation images used for the occlusion curves (class-balanced)")
    p.add_argument("--stages", nargs="+", default=["train", "evaluate", "aggregate"],
                   choices=["train", "evaluate", "aggregate"])
    p.add_argument("--cache-dir", default=None, help="Fashion-MNIST cache (default: the demo's)")
    p.add_argument("--raw-dir", default=None, help="folder with the four Fashion-MNIST .gz files")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out, work = Path(args.out).resolve(), Path(args.work).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if {"train", "evaluate"} & set(args.stages):
        data = prepare_study_data(work, train_per_class=args.train_per_class,
                                  cache_dir=args.cache_dir, raw_dir=args.raw_dir)
        recipe = write_recipe(work)
        for seed in args.seeds:      # seed-major: partial results cover every method early
            for method in args.methods:
                name = f"{method}-s{seed}"
                if "train" in args.stages:
                    ok = train_run(method, seed, work, out, data, args.epochs, args.threads,
                                   recipe)
                else:
                    ok = (work / "runs" / name / "done.json").is_file()
                if ok and "evaluate" in args.stages:
                    evaluate_run(name, work, out, data, args.occlusion_samples, args.threads)
    if "aggregate" in args.stages:
        summary = aggregate(out, methods=args.methods, seeds=args.seeds)
        _log(f"wrote {out / 'summary.md'}, {out / 'summary.json'}, {out / 'occlusion.png'}")
        print(summary_table(summary), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
