"""python -m tools.study: studies of the mixing methods on Fashion-MNIST (one command each,
resumable, safe to run twice at once).

    python -m tools.study                       # the 5-epoch study -> results/study_fmnist
    python -m tools.study --study overfit       # the pre-registered study -> results/study_overfit
    python -m tools.study --list                # the named studies

A named study (`STUDIES`) fixes the recipe, the arms (method + overrides), seeds, epochs and
the training subset; command-line options override them. Each stage skips what is done
(kill it and rerun the same command: it goes on):
  1. data: Fashion-MNIST from the Debian package (pipelines.fashion_mnist), 8 in-distribution
     classes (`ID_CLASSES`) for training and validation, the other 2 (bag, ankle boot: unseen
     in training) as the out-of-distribution set. `path label` lists under <work>/data*.
  2. train: arms x seeds with `python -m train` (one recipe, one budget for all, written to
     <work>/recipe.yaml); a killed run resumes from its last.pth (checkpoints every 20 steps).
     A per-run lock (<work>/runs/<run>.lock) lets two runners share the work: a run another
     runner holds is skipped, not trained twice.
  3. evaluate: `python -m train.evaluate` on each run's final weights (last epoch, not the best:
     the same budget for every method), JSON per run under <out>/runs; with
     `train_accuracy`, the same weights on the training list too (train_eval.json).
  4. aggregate (tools.study_report): mean, std, 95% CI per arm, Welch tests of the reference
     arm against the others (Holm), per-epoch curves -> <out>/summary.json, summary.md, plots.

Checkpoints live in <work> (git-ignored); what is worth keeping (eval JSON, per-epoch
summary.csv, resolved config.yaml, the exact command, plots) lands in <out>. The runner reads
progress and metrics from the runs' files (summary.csv, the evaluate JSON), never from the
commands' output: train.log and eval.log are kept for the user only.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from train.config import CONFIG_DIR, METHODS
from .study_report import aggregate, summary_table

__all__ = ["STUDY_RECIPE", "Study", "STUDIES", "write_recipe", "ID_CLASSES", "prepare_study_data",
           "train_command", "epoch_lines", "train_run", "evaluate_run", "run_lock", "aggregate",
           "summary_table", "main"]

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
    "mix": {"method": "mixpro", "label_variant": "paper", "mask_patch": 8, "smoothing": 0.1},
    "optim": {"lr": 2.0e-3, "lr_base_batch": None, "weight_decay": 0.05, "warmup_epochs": 0.5,
              "warmup_lr": 1.0e-5, "min_lr": 1.0e-5},
    "run": {"epochs": 5, "amp": "bf16", "log_every": 50, "ckpt_steps": 20,
            "progress": "lines", "tensorboard": False},
}
assert STUDY_RECIPE["model"]["num_classes"] == ID_CLASSES


@dataclass(frozen=True)
class Study:
    """One named study. recipe: a train config dict, or a YAML file name under train/configs;
    arms: arm name -> overrides of the recipe for that arm (dotted keys, at least
    `mix.method`; `train_per_class` picks another training subset); reference: the arm the
    others are tested against; train_accuracy: also evaluate the final weights on the
    training list (clean images, eval transform)."""
    name: str
    recipe: Mapping[str, Any] | str
    arms: Mapping[str, Mapping[str, Any]]
    seeds: tuple[int, ...]
    epochs: int
    train_per_class: int
    image_size: int = 32
    occlusion_samples: int = 400
    monitor_per_class: int = MONITOR_PER_CLASS
    reference: str | None = None
    train_accuracy: bool = False
    description: str = ""
    out: str = field(default="")
    work: str = field(default="")

    def __post_init__(self) -> None:
        for arm, over in self.arms.items():
            if over.get("mix.method") not in METHODS:
                raise ValueError(f"study {self.name!r}, arm {arm!r}: mix.method must be one of "
                                 f"{METHODS}, got {over.get('mix.method')!r}")
        if self.reference is not None and self.reference not in self.arms:
            raise ValueError(f"study {self.name!r}: reference {self.reference!r} is not an arm "
                             f"({sorted(self.arms)})")
        object.__setattr__(self, "out", self.out or f"results/study_{self.name}")
        object.__setattr__(self, "work", self.work or f"runs/study_{self.name}")

    def recipe_dict(self) -> dict[str, Any]:
        if isinstance(self.recipe, str):
            import yaml
            return yaml.safe_load((CONFIG_DIR / self.recipe).read_text())
        return json.loads(json.dumps(self.recipe))


def _methods(names: Sequence[str]) -> dict[str, dict[str, Any]]:
    return {m: {"mix.method": m} for m in names}


_OVERFIT = dict(recipe="study_overfit.yaml", image_size=28)
STUDIES: dict[str, Study] = {s.name: s for s in (
    Study("fmnist", STUDY_RECIPE, _methods(METHODS), (0, 1, 2), epochs=5,
          train_per_class=1000, reference="mixpro",
          description="5 methods x 3 seeds, 64-token ViT, 1,000 images/class, 5 epochs"),
    Study("fmnist_long", STUDY_RECIPE, _methods(("none", "mixpro", "transmix")), (0,),
          epochs=15, train_per_class=1000,
          description="3 methods x 1 seed at 3x the budget (15 epochs)"),
    Study("overfit_pilot", arms={
        f"none-n{n}-e{e}": {"mix.method": "none", "train_per_class": n, "run.epochs": e}
        for n, e in ((100, 60), (100, 40), (150, 40))}, seeds=(0,), epochs=40,
        train_per_class=150,
        description="pilot, `none` only: which subset and schedule overfit",
        train_accuracy=True, **_OVERFIT),
    Study("overfit", arms=_methods(METHODS), seeds=(0, 1, 2, 3, 4), epochs=40,
          train_per_class=100, reference="mixpro", monitor_per_class=50, occlusion_samples=200,
          description="pre-registered: 5 methods x 5 seeds where `none` overfits", **_OVERFIT),
    # 1x (7-px cells) is the overfit study's `maskmix` arm itself (same recipe and seeds)
    Study("overfit_cells", arms={
        f"maskmix-c{c}": {"mix.method": "maskmix", "mix.mask_patch": c} for c in (14,)},
        seeds=(0, 1, 2), epochs=40, train_per_class=100, monitor_per_class=50,
        occlusion_samples=200,
        description="MaskMix cells 2x the patch (1x: overfit's maskmix)", **_OVERFIT),
)}


def _log(*msg: Any) -> None:
    print(time.strftime("%H:%M:%S"), *msg, flush=True)


def prepare_study_data(work: Path, *, train_per_class: int, cache_dir: str | None = None,
                       raw_dir: str | None = None, tree_sizes: tuple[int, int] = (20000, 5000),
                       image_size: int = 32, folder: str = "data",
                       monitor_per_class: int = MONITOR_PER_CLASS, log=None) -> dict[str, Path]:
    """{'train', 'val', 'ood'} file lists (absolute paths) over the cached Fashion-MNIST tree.

    train: the first `train_per_class` images of each ID class (official training split);
    val: all 500 per ID class of the tree's test-split subset; ood: the 2 x 500 held-out ones;
    monitor: the first `monitor_per_class` of val per class, the per-epoch validation during
    training (it does not change training; the full val is evaluated afterwards)."""
    from pipelines.fashion_mnist import prepare_fashion_mnist
    from pipelines.readers import list_class_folders
    per_class = tree_sizes[0] // 10
    if not 1 <= train_per_class <= per_class:
        raise ValueError(f"--train-per-class must be in [1, {per_class}], got {train_per_class}")
    root = prepare_fashion_mnist(cache_dir, train_size=tree_sizes[0], val_size=tree_sizes[1],
                                 image_size=image_size, raw_dir=raw_dir, log=log or _log)
    data = work / folder
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
                if split == "val" and taken[y] <= monitor_per_class:
                    lines["monitor"].append(f"{f} {y}")
            elif split == "val":
                lines["ood"].append(f"{f} {y}")
        for n, ls in lines.items():
            tmp = out[n].with_suffix(".tmp")
            tmp.write_text("\n".join(ls) + "\n")
            os.replace(tmp, out[n])
    return out


def write_recipe(work: Path, recipe: Mapping[str, Any] | None = None) -> Path:
    """The recipe (default STUDY_RECIPE) as <work>/recipe.yaml, the --config of every run."""
    import yaml
    path = work / "recipe.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(dict(recipe or STUDY_RECIPE), sort_keys=False))
    return path


def train_command(method: str, seed: int, run_dir: Path, data: dict[str, Path],
                  epochs: int, recipe: Path, extra: Mapping[str, Any] | None = None
                  ) -> list[str]:
    """The exact `python -m train` command of one fresh run; extra: more dotted overrides
    (an arm's, e.g. mix.mask_patch or run.epochs; they win over `epochs`)."""
    over = {"data.train": str(data["train"]), "data.val": str(data["monitor"]),
            "mix.method": method, "run.seed": seed, "run.epochs": epochs, **(extra or {})}
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


@contextlib.contextmanager
def run_lock(work: Path, name: str) -> Iterator[bool]:
    """Hold <work>/runs/<name>.lock (flock, released when the process dies); yields False when
    another runner holds it."""
    path = work / "runs" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_EPOCH_COLUMNS = (("train_loss", "train loss", ".4f"), ("eval_loss", "val loss", ".4f"),
                  ("eval_top1", "top-1", ".2f"))


def epoch_lines(run_dir: Path, epochs: int) -> list[str]:
    """One progress line per finished epoch of the run, read from its summary.csv (columns of
    train/summary.py: epoch from 0, train_loss, eval_loss, eval_top1 in %, ...); [] before the
    first epoch has ended. E.g. "epoch 1/5: train loss 1.9190 val loss 1.7940 top-1 28.40"."""
    path = run_dir / "summary.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [f"epoch {int(r['epoch']) + 1}/{epochs}: " + " ".join(
        f"{label} {float(r[k]):{spec}}" for k, label, spec in _EPOCH_COLUMNS if r.get(k))
        for r in rows]


def train_run(method: str, seed: int, work: Path, out: Path, data: dict[str, Path],
              epochs: int, threads: int | None, recipe: Path, *, arm: str | None = None,
              extra: Mapping[str, Any] | None = None) -> bool:
    """Train (or resume, or skip) run <arm>-s<seed> (arm defaults to the method); True when it
    has finished."""
    name = f"{arm or method}-s{seed}"
    run_dir = work / "runs" / name
    done = run_dir / "done.json"
    if done.is_file():
        return True
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = train_command(method, seed, run_dir, data, epochs, recipe, extra)
    if (run_dir / "last.pth").is_file():
        _log(f"{name}: resuming from {run_dir / 'last.pth'}")
        run_cmd = [sys.executable, "-m", "train", "--resume", str(run_dir)]
    else:
        _log(f"{name}: training")
        run_cmd = cmd
    t0 = time.time()
    rc = _run_logged(run_cmd, run_dir / "train.log", threads)
    for line in epoch_lines(run_dir, int((extra or {}).get("run.epochs", epochs))):
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
                 occlusion_samples: int, threads: int | None, *,
                 train_accuracy: bool = False) -> bool:
    """`python -m train.evaluate` on the run's final weights; True when its JSON exists.
    train_accuracy: also on the training list, without occlusion or OOD (train_eval.json)."""
    run_dir = work / "runs" / name
    ckpt = str(run_dir / "last.pth")
    jobs = [(out / "runs" / name / "eval.json",
             ["--data", str(data["val"]), "--ood", str(data["ood"]),
              "--occlusion-samples", str(occlusion_samples)])]
    if train_accuracy:
        jobs.append((out / "runs" / name / "train_eval.json",
                     ["--data", str(data["train"]), "--modes"]))
    for target, args in jobs:
        if target.is_file():
            continue
        cmd = [sys.executable, "-m", "train.evaluate", ckpt, *args, "--json", str(target),
               "--quiet"]
        _log(f"{name}: evaluating ({target.name})")
        rc = _run_logged(cmd, run_dir / "eval.log", threads)
        if rc != 0:
            _log(f"{name}: python -m train.evaluate exited with {rc}; see {run_dir / 'eval.log'}")
            return False
        if not target.is_file():
            _log(f"{name}: python -m train.evaluate wrote no {target}; see {run_dir / 'eval.log'}")
            return False
        res = json.loads(target.read_text())
        if "top1" in res:
            _log(f"  {name} {target.name}: top-1 {100 * res['top1']:.2f}")
    return True


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.study", description=__doc__.split("\n")[0])
    p.add_argument("--study", default="fmnist", choices=sorted(STUDIES),
                   help="named study (recipe, arms, seeds, budget); options below override it")
    p.add_argument("--list", action="store_true", help="print the named studies and exit")
    p.add_argument("--out", default=None, help="results folder (committed; default per study)")
    p.add_argument("--work", default=None, help="checkpoints (not committed; default per study)")
    p.add_argument("--methods", "--arms", dest="arms", nargs="+", default=None,
                   help="arms to run (default: all of the study's; for fmnist: method names)")
    p.add_argument("--seeds", nargs="+", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--train-per-class", type=int, default=None)
    p.add_argument("--threads", type=int, default=1,
                   help="OMP_NUM_THREADS of the train/evaluate processes (0: torch default)")
    p.add_argument("--occlusion-samples", type=int, default=None,
                   help="validation images used for the occlusion curves (class-balanced)")
    p.add_argument("--stages", nargs="+", default=["train", "evaluate", "aggregate"],
                   choices=["train", "evaluate", "aggregate"])
    p.add_argument("--cache-dir", default=None, help="Fashion-MNIST cache (default: the demo's)")
    p.add_argument("--raw-dir", default=None, help="folder with the four Fashion-MNIST .gz files")
    return p


def _arms(study: Study, names: Sequence[str] | None) -> dict[str, dict[str, Any]]:
    if names is None:
        return {a: dict(o) for a, o in study.arms.items()}
    bad = [n for n in names if n not in study.arms]
    if bad:
        raise ValueError(f"--arms {bad} not in study {study.name!r}: valid {list(study.arms)}")
    return {a: dict(study.arms[a]) for a in names}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.list:
        for s in STUDIES.values():
            print(f"{s.name:14} {s.description} -> {s.out}")
        return 0
    st = STUDIES[args.study]
    out = Path(args.out or st.out).resolve()
    work = Path(args.work or st.work).resolve()
    arms = _arms(st, args.arms)
    seeds = args.seeds if args.seeds is not None else list(st.seeds)
    epochs = args.epochs or st.epochs
    occl = args.occlusion_samples or st.occlusion_samples
    out.mkdir(parents=True, exist_ok=True)
    if {"train", "evaluate"} & set(args.stages):
        recipe = write_recipe(work, st.recipe_dict())
        datas: dict[int, dict[str, Path]] = {}
        for seed in seeds:      # seed-major: partial results cover every arm early
            for arm, arm_over in arms.items():
                over = dict(arm_over)
                n = over.pop("train_per_class", args.train_per_class or st.train_per_class)
                if n not in datas:
                    datas[n] = prepare_study_data(
                        work, train_per_class=n, cache_dir=args.cache_dir, raw_dir=args.raw_dir,
                        image_size=st.image_size, monitor_per_class=st.monitor_per_class,
                        folder="data" if n == (args.train_per_class or st.train_per_class)
                        else f"data_n{n}")
                _one_run(arm, over, seed, work, out, datas[n], epochs, args, recipe, occl,
                         st.train_accuracy)
    if "aggregate" in args.stages:
        summary = aggregate(out, methods=list(arms), seeds=seeds, reference=st.reference)
        _log(f"wrote {out / 'summary.md'}, {out / 'summary.json'} and the plots")
        print(summary_table(summary), end="")
    return 0


def _one_run(arm: str, over: dict[str, Any], seed: int, work: Path, out: Path,
             data: dict[str, Path], epochs: int, args: argparse.Namespace, recipe: Path,
             occl: int, train_accuracy: bool) -> None:
    name = f"{arm}-s{seed}"
    with run_lock(work, name) as mine:
        if not mine:
            _log(f"{name}: another runner holds {work / 'runs' / (name + '.lock')}; skipped")
            return
        method = over["mix.method"]
        extra = {k: v for k, v in over.items() if k != "mix.method"}
        if "train" in args.stages:
            ok = train_run(method, seed, work, out, data, epochs, args.threads, recipe,
                           arm=arm, extra=extra)
        else:
            ok = (work / "runs" / name / "done.json").is_file()
        if ok and "evaluate" in args.stages:
            evaluate_run(name, work, out, data, occl, args.threads,
                         train_accuracy=train_accuracy)


if __name__ == "__main__":
    sys.exit(main())
