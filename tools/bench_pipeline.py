"""Pipeline throughput (img/s) and peak memory: the DALI training pipeline without mixing, with
MaskMix, with the full MixPro policy, and torchvision + timm, same data and batch size.

    python -m tools.bench_pipeline [--device cpu|cuda] [--data DIR] [--images 500] [--batch-size 64]
        [--threads 2] [--batches 20] [--rounds 3] [--recipe full|no-ra-erasing]
        [--configs dali,dali+maskmix,dali+mixpro,torchvision+timm] [--out results/bench]

dali          TrainLoader (decode with random resized crop, bicubic resize, RandAugment
              rand-m9-mstd0.5-inc1, flip, normalize, random erasing 0.25 pixel mode), the MaskMix
              operator in the graph with the `none` preset (it stacks and copies, never mixes).
dali+maskmix  the same, every batch MaskMix (`maskmix` preset): the operator's worst case.
dali+mixpro   the same, the paper's MixPro policy (MaskMix 0.5 / Mixup 0.5).
dali+<method> any other method of the registry (mixpro_dali.methods), e.g. dali+mixpro-official.
torchvision+timm  ImageFolder + timm create_transform (same options, pixel-mode erasing, no
              colour jitter) in a DataLoader with --threads workers, timm Mixup/CutMix (0.8 / 1.0,
              switch 0.5) on each batch (on the GPU with --device cuda, after a pinned copy).
Every configuration is built once; timed windows run interleaved (A B C D, then D C B A, ...),
each after the others' prefetching has gone quiet. Ratios are the median of per-round ratios.
Peak memory: sampled while each configuration is built and warmed up (PSS of its processes;
device: the GPU's used memory, DALI's pool included), above the level before it was built.
The DALI configurations also time the MaskMix operator itself (host time per batch).
Without --data, ImageNet-like JPEGs (tools.imagenet_like) are written to a temp folder.
"""
from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator
from unittest import mock

from .bench_report import (MemorySampler, cpu_seconds, machine_info, markdown_table,
                           median_ratios, settle, write_outputs)
from pipelines.compat import shutdown_dataloader_workers
from pipelines.options import DEFAULT_AUTO_AUGMENT, DataOptions

__all__ = ["CONFIGS", "RECIPES", "bench_dali", "bench_torchvision", "run_pipeline_bench", "main"]

RECIPES = {"full": dict(auto_augment=DEFAULT_AUTO_AUGMENT, re_prob=0.25),
           "no-ra-erasing": dict(auto_augment=None, re_prob=0.0),
           "ra-only": dict(auto_augment=DEFAULT_AUTO_AUGMENT, re_prob=0.0),   # stage profile
           "erasing-only": dict(auto_augment=None, re_prob=0.25)}
CONFIGS = ("dali", "dali+maskmix", "dali+mixpro", "torchvision+timm")  # the default selection


def dali_presets() -> dict[str, str]:
    """Configuration name -> MixConfig preset: "dali" (no mixing) and "dali+<method>" for every
    method of the registry (mixpro_dali.methods)."""
    from mixpro_dali.methods import method_names
    return {"dali": "none", **{f"dali+{m}": m for m in method_names() if m != "none"}}


def __getattr__(name: str) -> Any:
    if name == "DALI_PRESETS":  # the old constant, derived from the registry
        return dali_presets()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class Runner:
    """A built configuration: `next_batch()` -> images in the batch (on the device, ready),
    `pids()` -> the processes doing its work, `op_seconds`: MaskMix operator time so far."""

    def __init__(self, batches: Iterator[int], pids: Callable[[], list[int]], sync: Callable,
                 op: Any = None, close: Callable = lambda: None, prefetched: int = 2) -> None:
        self.batches, self.pids, self.sync, self.op, self.close = batches, pids, sync, op, close
        self.prefetched = prefetched     # batches ready in queues once its workers are quiet

    @property
    def op_seconds(self) -> float:
        return getattr(self.op, "seconds", 0.0)

    @property
    def op_cpu_seconds(self) -> float:
        return getattr(self.op, "cpu_seconds", 0.0)

    def timed(self, batches: int) -> dict[str, float]:
        """img/s, CPU ms per image and operator ms per batch over the next `batches` batches.
        The batches its queues prefetched while the others ran are taken first, untimed: the
        window starts with empty queues and busy workers, as it ends (steady state)."""
        settle(self.pids())
        for _ in range(self.prefetched):
            next(self.batches)
        self.sync()
        cpu0, op0, opc0 = cpu_seconds(self.pids()), self.op_seconds, self.op_cpu_seconds
        start, seen = time.perf_counter(), 0
        for _ in range(batches):
            seen += next(self.batches)
        self.sync()
        wall, cpu = time.perf_counter() - start, cpu_seconds(self.pids()) - cpu0
        return {"img_s": seen / wall, "cpu_ms_per_img": 1000 * cpu / seen,
                "op_ms_per_batch": 1000 * (self.op_seconds - op0) / batches,
                "op_share": (self.op_seconds - op0) / wall,
                "op_cpu_share": (self.op_cpu_seconds - opc0) / max(cpu, 1e-9)}


def _timed_operator_class() -> type:
    """A MaskMixOperator subclass that adds its host time per call (the mix, `__call__`, and
    the draw, DALI's external source) to `seconds` (wall) and `cpu_seconds` (its thread's CPU
    time: robust to other processes on a shared machine). Overrides only the two public entry
    points DALI calls, through super(): the operator's work is unchanged."""
    from mixpro_dali.operator import MaskMixOperator

    class TimedMaskMixOperator(MaskMixOperator):
        seconds = cpu_seconds = 0.0

        def _timed(self, call: Callable, *args: Any) -> Any:
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return call(*args)
            finally:
                self.seconds += time.perf_counter() - t0
                self.cpu_seconds += time.thread_time() - c0

        def __call__(self, images):
            return self._timed(super().__call__, images)

        def draw(self, *args):
            return self._timed(super().draw, *args)

    return TimedMaskMixOperator


@contextlib.contextmanager
def _timed_operators() -> Iterator[type]:
    """While open, `mixpro_dali.mix` (which builds its operator from the operator module's
    `MaskMixOperator`) builds the timed subclass: the pipeline holds it from construction on."""
    from mixpro_dali import operator as operator_module

    timed = _timed_operator_class()
    with mock.patch.object(operator_module, "MaskMixOperator", timed):
        yield timed


def _sync(device: str) -> Callable[[], None]:
    import torch

    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def bench_dali(data: Path, *, preset: str, batch: int, threads: int, size: int, device: str,
               mask_patch: int, recipe: str = "full") -> Runner:
    from mixpro_dali import MixConfig

    from pipelines.loader import TrainLoader

    mix = MixConfig.preset(preset, image_size=size, patch_size=16, mask_patch=mask_patch, seed=0)
    options = DataOptions(image_size=size, **RECIPES[recipe])
    with _timed_operators() as timed:
        loader = TrainLoader(data, batch_size=batch, options=options, device=device,
                             num_threads=threads, mix=mix)
    op = loader.mix_operator
    if op is not None and not isinstance(op, timed):  # mix() no longer uses the module's name
        raise RuntimeError(f"bench_pipeline: the loader's MaskMix operator is a "
                           f"{type(op).__name__}, not the timed subclass; update "
                           "_timed_operators to how mixpro_dali.mix builds its operator")

    def gen():
        while True:
            for b in loader:
                yield len(b["image"])

    return Runner(gen(), lambda: [os.getpid()], _sync(device), op, loader.close)


class _RetryPosterize:
    """timm's rand-m9-mstd0.5-inc1 raises ValueError in Pillow >= 10 posterize (0 bits; about 1
    image in 2,000 on the development machine with Pillow 13, see docs/method.md section 10);
    redraw the augmentation instead of crashing the bench."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, img):
        for _ in range(10):
            try:
                return self.transform(img)
            except ValueError:
                continue
        return self.transform(img)


def bench_torchvision(data: Path, *, batch: int, workers: int, size: int, device: str,
                      recipe: str = "full") -> Runner:
    import torch
    from timm.data import Mixup, create_transform
    from torchvision.datasets import ImageFolder

    # timm adds ColorJitter(0.4) when auto_augment is None: off, to keep the recipes equal
    # and its RandomErasing defaults to mode "const": the recipe (DeiT --remode) uses "pixel"
    transform = create_transform(size, is_training=True, interpolation="bicubic", color_jitter=None,
                                 re_mode="pixel", **RECIPES[recipe])
    dataset = ImageFolder(str(data), transform=_RetryPosterize(transform))
    worker_pids = multiprocessing.Array("q", max(workers, 1))     # each worker writes its pid
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True,
                                         num_workers=workers, persistent_workers=workers > 0,
                                         pin_memory=device == "cuda",
                                         worker_init_fn=partial(_note_pid, worker_pids))
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.1,
                  num_classes=len(dataset.classes))

    def gen():
        while True:
            for x, y in loader:
                if device == "cuda":
                    x, y = x.cuda(non_blocking=True), y.cuda(non_blocking=True)
                x, y = mixup(x, y)
                yield len(x)

    def pids():
        return [os.getpid(), *(p for p in worker_pids[:] if p)]

    return Runner(gen(), pids, _sync(device), None, partial(shutdown_dataloader_workers, loader),
                  prefetched=2 * workers)


def _note_pid(pids: Any, worker_id: int) -> None:
    pids[worker_id] = os.getpid()


def build(name: str, data: Path, a: argparse.Namespace) -> Runner:
    if name in dali_presets():
        return bench_dali(data, preset=dali_presets()[name], batch=a.batch_size, threads=a.threads,
                          size=a.size, device=a.device, mask_patch=a.mask_patch, recipe=a.recipe)
    if name == "torchvision+timm":
        return bench_torchvision(data, batch=a.batch_size, workers=a.threads, size=a.size,
                                 device=a.device, recipe=a.recipe)
    raise ValueError(f"unknown configuration {name!r}; valid: "
                     f"{', '.join([*dali_presets(), 'torchvision+timm'])}")


def run_pipeline_bench(data: Path, a: argparse.Namespace, log=print) -> dict[str, Any]:
    """Build, warm up (memory sampled), run interleaved rounds; returns the results payload."""
    names = a.configs
    runners, memory = {}, {}
    if any(n in dali_presets() for n in names):   # one-time DALI/torch start-up is nobody's memory
        prime = bench_dali(data, preset="none", batch=2, threads=1, size=a.size, device=a.device,
                           mask_patch=a.mask_patch, recipe=a.recipe)
        next(prime.batches)
        prime.close()
    for name in names:
        all_pids = lambda: sorted({os.getpid(), *(p for r in runners.values() for p in r.pids())})  # noqa: E731
        with MemorySampler(all_pids) as mem:
            runners[name] = build(name, data, a)
            for _ in range(a.warmup):
                next(runners[name].batches)
            runners[name].sync()
        memory[name] = mem.result()
        log(f"built {name}: {memory[name]}")
    rounds: list[dict[str, dict[str, float]]] = []
    try:
        deadline = a.t0 + a.time_limit if a.time_limit else None      # from the start
        for r in range(a.rounds):
            order = names if r % 2 == 0 else names[::-1]
            rounds.append({n: runners[n].timed(a.batches) for n in order})
            log(f"round {r + 1}: " + ", ".join(f"{n} {rounds[-1][n]['img_s']:.0f}" for n in names))
            if deadline and time.monotonic() > deadline:
                log(f"time limit {a.time_limit}s reached after {r + 1} rounds")
                break
    finally:
        for runner in runners.values():
            runner.close()
    return summarize(rounds, memory, names)


def summarize(rounds: list[dict[str, dict[str, float]]], memory: dict, names: list[str]) -> dict:
    rates = [{n: r[n]["img_s"] for n in names} for r in rounds]
    ref = "dali" if "dali" in names else names[0]
    vs_ref = median_ratios(rates, ref)
    vs_tv = median_ratios(rates, "torchvision+timm") if "torchvision+timm" in names else {}
    results = []
    for n in names:
        med = {k: statistics.median(r[n][k] for r in rounds) for k in rounds[0][n]}
        results.append({"config": n, "img_s": med["img_s"], "img_s_rounds": [x[n] for x in rates],
                        "cpu_ms_per_img": med["cpu_ms_per_img"],
                        "op_ms_per_batch": med["op_ms_per_batch"] if n in dali_presets() else None,
                        "op_share": med["op_share"] if n in dali_presets() else None,
                        "op_cpu_share": med["op_cpu_share"] if n in dali_presets() else None,
                        f"x_{ref}": vs_ref[n], "x_torchvision": vs_tv.get(n), **memory[n]})
    return {"reference": ref, "rounds": len(rounds), "results": results}


def table(payload: dict) -> str:
    ref = payload["reference"]
    rows = [(r["config"], r["img_s"], r[f"x_{ref}"], r["x_torchvision"], r["cpu_ms_per_img"],
             _pct(r["op_share"]), _pct(r["op_cpu_share"]), r["peak_host_mb"], r["peak_device_mb"])
            for r in payload["results"]]
    return markdown_table(["config", "img/s", f"x {ref}", "x torchvision+timm", "CPU ms/img",
                           "MaskMix op: share of wall", "share of CPU", "peak host MB",
                           "peak device MB"], rows)


def _pct(v: float | None) -> str | None:
    return None if v is None else f"{100 * v:.1f}%"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.bench_pipeline", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--data", type=Path, help="class-folder tree (default: ImageNet-like JPEGs)")
    p.add_argument("--images", type=int, default=500, help="generated images without --data")
    p.add_argument("--batch-size", "--batch", dest="batch_size", type=int, default=None,
                   help="default 64 (cpu), 256 (cuda)")
    p.add_argument("--threads", type=int, default=None,
                   help="DALI threads = DataLoader workers (default 2 on cpu, all cores on cuda)")
    p.add_argument("--size", type=int, default=224, help="output image side")
    p.add_argument("--mask-patch", type=int, default=None, help="MaskMix cell (default 64, <= size)")
    p.add_argument("--batches", type=int, default=20, help="timed batches per window")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches after building")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    p.add_argument("--time-limit", type=float, default=0,
                   help="seconds from the start (data and builds included): no round starts after")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="full",
                   help="full: the DeiT recipe; no-ra-erasing: without RandAugment and erasing; "
                   "ra-only / erasing-only: one of the two (to profile their cost)")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--out", type=Path, help="write pipeline-<device>[-<recipe>].json/.md/.png here")
    a = p.parse_args(argv)
    a.t0 = time.monotonic()
    a.configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    valid = [*dali_presets(), "torchvision+timm"]
    bad = [c for c in a.configs if c not in valid]
    if bad:
        p.error(f"--configs: unknown {', '.join(bad)}; valid: {', '.join(valid)}")
    a.batch_size = a.batch_size or (256 if a.device == "cuda" else 64)
    a.threads = a.threads or (len(os.sched_getaffinity(0)) if a.device == "cuda" else 2)
    a.mask_patch = a.mask_patch or min(64, a.size - a.size % 16)
    return a


def main(argv=None) -> int:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the main process only collates/times; restored below
    try:
        return _main(parse_args(argv))
    finally:
        torch.set_num_threads(threads)


def _main(a) -> int:
    import torch

    if a.device == "cuda":
        torch.cuda.init()              # the CUDA context is not counted as a config's memory
    with tempfile.TemporaryDirectory() as tmp:
        from .imagenet_like import describe, make_imagenet_like

        data = a.data or make_imagenet_like(Path(tmp) / "data", a.images, workers=os.cpu_count() or 1)
        payload = {"title": f"Pipeline throughput, {a.device}", "machine": machine_info(),
                   "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()
                                if k != "t0"},
                   "data": {"path": str(a.data) if a.data else "generated (tools.imagenet_like)",
                            **describe(data)}}
        payload.update(run_pipeline_bench(data, a))
    md = table(payload)
    print(md, end="")
    if a.out:
        bars = [(r["config"], r["img_s"], f"img/s ({r['x_torchvision']:.2f}x tv+timm)"
                 if r["x_torchvision"] else "img/s") for r in payload["results"]]
        stem = f"pipeline-{a.device}" + ("" if a.recipe == "full" else f"-{a.recipe}")
        for path in write_outputs(a.out, stem, payload, md, bars, "img/s"):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
