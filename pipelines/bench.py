"""Training-loader throughput: the DALI TrainLoader against torchvision + timm, same recipe.

    python -m pipelines.bench [--data DIR] [--images 500] [--batch 64] [--threads 2]
                              [--batches 30] [--rounds 2] [--recipe full|no-ra-erasing]

A: TrainLoader (decode with random resized crop, bicubic resize, RandAugment
   rand-m9-mstd0.5-inc1, flip, normalize, random erasing 0.25, Mixup/CutMix via the MaskMix
   operator with the `deit` preset), `--threads` DALI threads, CPU.
B: torchvision ImageFolder + timm create_transform(is_training=True, same options, re_mode
   "pixel", no colour jitter) in a
   DataLoader with `--threads` workers, timm Mixup (0.8 / 1.0, switch 0.5) on each batch.
Rounds run interleaved (A B A B ...) after a warm-up; the ratio of the medians is reported.
Without --data, `--images` synthetic 500x375 JPEGs (~80 KB, like ImageNet's average) are
written to a temporary folder. Shared machines vary run to run: compare within one run.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

__all__ = ["make_jpegs", "bench_dali", "bench_torchvision", "main"]


def make_jpegs(root: Path, n: int, *, classes: int = 10, size=(375, 500), seed: int = 0) -> Path:
    """n photo-like JPEGs (smooth colour field + texture + noise), ~80 KB each at q90."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(n):
        f = rng.uniform(0.01, 0.08, (3, 2))
        phase = rng.uniform(0, 6.3, 3)
        img = np.stack([128 + 90 * np.sin(f[c, 0] * yy + f[c, 1] * xx + phase[c]) for c in range(3)], -1)
        img += rng.normal(0, 14, (h, w, 3))
        out = root / f"class_{i % classes:02d}" / f"img_{i:05d}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(out, quality=90)
    return root


def _cpu_seconds(pids) -> float:
    """User + system CPU time of the processes `pids` (Linux /proc; 0 elsewhere)."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


def _settle(pids, quiet: float = 0.3, limit: float = 20.0) -> None:
    """Wait until the processes stop working (prefetching ahead after a timed window), so one
    loader's background work never runs inside the other's window."""
    end, last = time.monotonic() + limit, _cpu_seconds(pids)
    while time.monotonic() < end:
        time.sleep(quiet)
        now = _cpu_seconds(pids)
        if now - last < 0.05 * quiet:
            return
        last = now


def _timed(runner, batches: int) -> tuple[float, float]:
    """(img/s, CPU ms per image) over the next `batches` batches of `runner`."""
    it, pids = runner
    _settle(pids())
    cpu0, start, seen = _cpu_seconds(pids()), time.perf_counter(), 0
    for _ in range(batches):
        seen += next(it)
    wall, cpu = time.perf_counter() - start, _cpu_seconds(pids()) - cpu0
    return seen / wall, 1000 * cpu / seen


RECIPES = {"full": dict(auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25),
           "no-ra-erasing": dict(auto_augment=None, re_prob=0.0)}


def bench_dali(data: Path, *, batch: int, threads: int, recipe: str = "full"):
    """(endless iterator of batch sizes, pids doing the work) for the DALI TrainLoader."""
    from mixpro_dali import MixConfig

    from .loader import TrainLoader

    loader = TrainLoader(data, batch_size=batch, image_size=224, device="cpu", num_threads=threads,
                         mix=MixConfig.preset("deit", image_size=224, seed=0), **RECIPES[recipe])

    def gen():
        while True:
            for b in loader:
                yield len(b["image"])

    return gen(), lambda: [os.getpid()]


class _RetryPosterize:
    """timm's rand-m9-mstd0.5-inc1 raises ValueError in Pillow >= 10 posterize (about 1 image in
    2,000, see shared/docs/anchors.md); redraw the augmentation instead of crashing the bench."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, img):
        for _ in range(10):
            try:
                return self.transform(img)
            except ValueError:
                continue
        return self.transform(img)


def bench_torchvision(data: Path, *, batch: int, workers: int, recipe: str = "full"):
    """(endless iterator of batch sizes, pids doing the work) for torchvision + timm."""
    import torch
    from timm.data import Mixup, create_transform
    from torchvision.datasets import ImageFolder

    # timm adds ColorJitter(0.4) when auto_augment is None: off, to keep the recipes equal
    # and its RandomErasing defaults to mode "const": the recipe (DeiT --remode) uses "pixel"
    transform = create_transform(224, is_training=True, interpolation="bicubic", color_jitter=None,
                                 re_mode="pixel", **RECIPES[recipe])
    dataset = ImageFolder(str(data), transform=_RetryPosterize(transform))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True,
                                         num_workers=workers, persistent_workers=True)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.1,
                  num_classes=len(dataset.classes))

    def gen():
        while True:
            for x, y in loader:
                x, y = mixup(x, y)
                yield len(x)

    workers = lambda: [w.pid for w in getattr(loader._iterator, "_workers", [])]  # noqa: E731
    return gen(), lambda: [os.getpid(), *workers()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="class-folder tree (default: synthetic JPEGs)")
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="DALI threads = DataLoader workers")
    p.add_argument("--batches", type=int, default=30, help="timed batches per round")
    p.add_argument("--rounds", type=int, default=2, help="A/B pairs, interleaved")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="full",
                   help="full: the DeiT recipe; no-ra-erasing: without RandAugment and erasing")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or make_jpegs(Path(tmp), args.images)
        runs = {"dali": bench_dali(data, batch=args.batch, threads=args.threads, recipe=args.recipe),
                "torchvision+timm": bench_torchvision(data, batch=args.batch, workers=args.threads,
                                                      recipe=args.recipe)}
        for runner in runs.values():                 # warm-up: workers started, caches filled
            _timed(runner, 3)
        rates: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
        for r in range(args.rounds):
            for name, runner in runs.items():
                rates[name].append(_timed(runner, args.batches))
                ips, cpu = rates[name][-1]
                print(f"round {r + 1} {name:18s} {ips:7.1f} img/s  {cpu:6.2f} CPU ms/img", flush=True)
    a, b = ({k: statistics.median(x[i] for x in v) for k, v in rates.items()} for i in (0, 1))
    print(f"median: dali {a['dali']:.1f} img/s ({b['dali']:.2f} CPU ms/img), torchvision+timm "
          f"{a['torchvision+timm']:.1f} img/s ({b['torchvision+timm']:.2f} CPU ms/img)")
    print(f"ratio dali / torchvision+timm: {a['dali'] / a['torchvision+timm']:.2f}x img/s, "
          f"{b['torchvision+timm'] / b['dali']:.2f}x images per CPU second "
          f"(recipe {args.recipe}, batch {args.batch}, {args.threads} threads/workers)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
