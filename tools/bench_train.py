"""python -m tools.bench_train: training throughput (steps/s, img/s) and peak memory per mixing method,
interleaved, so the cost of attention capture and PAL shows as a ratio.

Two timings per configuration (model x method), in the same interleaved rounds:
  e2e   DALI TrainLoader (RandAugment, erasing, MaskMix operator) + forward/backward + labels
        (area / TransMix / PAL) + AdamW step: what training runs.
  step  the same step on batches taken from that loader beforehand (cycled, on the device): the
        model and the labels only. mixpro / deit here is the cost of attention capture + PAL
        (deit: the same mixing, area labels, no attention hooks).
CPU default: the demo's tiny ViT (28 px, patch 7) on small ImageNet-like JPEGs. GPU default:
DeiT-Tiny and DeiT-Small at 224 px on ImageNet-like 500x375 JPEGs, bf16. --data DIR: real
class folders (e.g. ImageNet train/) instead.

  python -m tools.bench_train                                # all methods, defaults for the device
  python -m tools.bench_train --models deit_small_patch16_224 --batch-size 256 --steps 20 --out results/bench
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from tools.bench_report import (MemorySampler, cpu_seconds, machine_info, markdown_table,
                                    median_ratios, settle, write_outputs)
from tools.imagenet_like import describe, make_imagenet_like

from mixpro_dali.methods import base_methods

from train.config import TrainConfig
from train.dist import DistInfo
from train.engine import Engine
from train.losses import MixLoss, mix_config_for
from train.main import build_loaders, build_model
from train.optim import build_optimizer, build_scheduler

TINY = {"img_size": 28, "patch_size": 7, "embed_dim": 96, "depth": 4, "num_heads": 3}  # demo
METHODS = ("none", "deit", "transmix", "mixpro")  # the default selection; any registered method


class Config:
    """One model x method, built: loader, model, loss (with its hooks), optimizer, engine."""

    def __init__(self, model_name: str, method: str, data: str, *, device: torch.device,
                 size: int, batch: int, threads: int, kwargs: dict, cached: int = 4) -> None:
        self.name, self.model_name, self.method, self.device = f"{model_name} {method}", model_name, method, device
        small = size <= 64
        cfg = TrainConfig.from_dict({
            "data": {"train": data, "val": data, "image_size": size, "batch_size": batch,
                     "num_threads": threads},
            "model": {"name": model_name, "num_classes": 10, "kwargs": kwargs},
            "mix": {"method": method, "mask_patch": kwargs.get("patch_size", 16) if small else 64},
            "run": {"device": device.type, "progress": "off"},
        })
        dist = DistInfo(0, 1, 0, device)
        model, patch = build_model(cfg)
        self.model = model.to(device).train()
        mix_cfg = mix_config_for(method, "paper", image_size=size, patch_size=patch,
                                 mask_patch=cfg.mix.mask_patch, seed=0, options={})
        self.loss_fn = MixLoss(model, method=method, label_variant="paper", num_classes=10, smoothing=0.1)
        self.loader, val = build_loaders(cfg, dist, mix_cfg, data, data)
        val.close()
        opt = build_optimizer(model, opt="adamw", lr=1e-4, weight_decay=0.05, betas=(0.9, 0.999),
                              eps=1e-8)
        sched = build_scheduler(opt, sched="cosine", epochs=1, updates_per_epoch=10**6,
                                warmup_epochs=0, warmup_lr=1e-6, min_lr=1e-6)
        self.engine = Engine(model, model, opt, sched, torch.amp.GradScaler(device.type, enabled=False),
                             self.loss_fn, dist=dist, amp="bf16")
        self.batches = self._endless()
        self.cached = [next(self.batches) for _ in range(cached)]   # for the `step` timing
        self.cycle = itertools.cycle(self.cached)
        self.batch = batch

    def _endless(self):
        while True:
            yield from self.loader

    def step(self, batch) -> None:
        self.engine.forward_backward(batch, 1, True)
        self.engine.optimizer_step()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(self, mode: str, steps: int) -> dict[str, float]:
        """Steps per second and process CPU ms per step over `steps` steps: e2e from the loader,
        step from cache (then the loaders are idle, their queues full: CPU time is the step's
        own, unaffected by other processes on a shared machine)."""
        source = self.batches if mode == "e2e" else self.cycle
        if mode == "e2e":
            settle([os.getpid()], quiet=0.2)
            next(self.batches), next(self.batches)     # prefetched while the others ran
        self.sync()
        t0, c0 = time.perf_counter(), cpu_seconds([os.getpid()])
        for _ in range(steps):
            self.step(next(source))
        self.sync()
        return {"steps_s": steps / (time.perf_counter() - t0),
                "cpu_ms_per_step": 1000 * (cpu_seconds([os.getpid()]) - c0) / steps}

    def close(self) -> None:
        self.loss_fn.remove()
        self.loader.close()


def build_all(names: list[tuple[str, str]], data: str, a, log=print) -> tuple[dict, dict]:
    configs, memory = {}, {}
    prime = Config(*names[0], data, device=torch.device(a.device), size=a.size, batch=2,
                   threads=1, kwargs=a.kwargs, cached=1)     # one-time start-up is nobody's memory
    prime.step(prime.cached[0])
    prime.close()
    del prime
    for model_name, method in names:
        if a.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            alloc0 = torch.cuda.memory_allocated()
        with MemorySampler(lambda: [os.getpid()]) as mem:
            c = Config(model_name, method, data, device=torch.device(a.device), size=a.size,
                       batch=a.batch_size, threads=a.threads, kwargs=a.kwargs)
            for _ in range(a.warmup):
                c.step(next(c.batches))
            c.sync()
        memory[c.name] = mem.result()
        if a.device == "cuda":
            memory[c.name]["peak_torch_mb"] = round((torch.cuda.max_memory_allocated() - alloc0) / 2**20, 1)
        configs[c.name] = c
        log(f"built {c.name}: {memory[c.name]}")
    return configs, memory


def run_train_bench(data: str, a, log=print) -> dict:
    names = [(m, k) for m in a.models for k in a.methods]
    configs, memory = build_all(names, data, a, log)
    rounds: list[dict[str, dict[str, float]]] = []
    deadline = a.t0 + a.time_limit if a.time_limit else None          # from the start
    try:
        for r in range(a.rounds):
            keys = list(configs) if r % 2 == 0 else list(configs)[::-1]
            rounds.append({k: {mode: configs[k].timed(mode, a.steps) for mode in a.modes} for k in keys})
            log(f"round {r + 1}: " + ", ".join(
                f"{k} " + "/".join(f"{v['steps_s']:.2f}" for v in rounds[-1][k].values())
                for k in configs) + f" steps/s ({'/'.join(a.modes)})")
            if deadline and time.monotonic() > deadline:
                log(f"time limit {a.time_limit}s reached after {r + 1} rounds")
                break
    finally:
        for c in configs.values():
            c.close()
    return summarize(rounds, memory, configs, a)


def summarize(rounds, memory, configs, a) -> dict:
    results = []
    for mode in a.modes:
        for model_name in a.models:
            keys = [f"{model_name} {m}" for m in a.methods]
            rates = [{k: r[k][mode]["steps_s"] for k in keys} for r in rounds]
            cpu = [{k: 1 / r[k][mode]["cpu_ms_per_step"] for k in keys} for r in rounds]
            ref = f"{model_name} none" if "none" in a.methods else keys[0]
            vs_none = median_ratios(rates, ref)
            vs_deit = median_ratios(rates, f"{model_name} deit") if "deit" in a.methods else {}
            cpu_vs_deit = median_ratios(cpu, f"{model_name} deit") if "deit" in a.methods else {}
            for k in keys:
                sps = statistics.median(x[k] for x in rates)
                results.append({"mode": mode, "model": model_name, "method": configs[k].method,
                                "batch": a.batch_size, "steps_s": sps, "img_s": sps * a.batch_size,
                                "steps_s_rounds": [x[k] for x in rates], "x_none": vs_none[k],
                                "x_deit": vs_deit.get(k),
                                "cpu_ms_per_step": statistics.median(1 / x[k] for x in cpu),
                                "cpu_x_deit": cpu_vs_deit.get(k), **memory[k]})
    return {"rounds": len(rounds), "results": results}


def table(payload: dict) -> str:
    rows = [(r["mode"], r["model"], r["method"], r["steps_s"], r["img_s"], r["x_none"], r["x_deit"],
             r["cpu_ms_per_step"], r["cpu_x_deit"], r["peak_host_mb"],
             r.get("peak_torch_mb", r["peak_device_mb"])) for r in payload["results"]]
    return markdown_table(["timing", "model", "method", "steps/s", "img/s", "x none", "x deit",
                           "CPU ms/step", "x deit (CPU time)", "peak host MB",
                           "peak device MB (torch)"], rows)


def parse_args(argv=None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m tools.bench_train", description=__doc__.split("\n")[0])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--models", default=None, help="default: deit_tiny/small (cuda), tiny ViT (cpu)")
    p.add_argument("--device", default="cuda" if cuda else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--modes", default="e2e,step", help="e2e and/or step (see above)")
    p.add_argument("--batch-size", type=int, default=None, help="default 128 (cuda), 64 (cpu)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per window (30 cuda, 10 cpu)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps after building")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    p.add_argument("--time-limit", type=float, default=0,
                   help="seconds from the start (data and builds included): no round starts after")
    p.add_argument("--threads", type=int, default=None, help="DALI CPU threads (cuda: all cores)")
    p.add_argument("--images", type=int, default=None, help="generated images without --data")
    p.add_argument("--data", default=None, help="class-folder tree (default: ImageNet-like JPEGs)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--out", type=Path, default=None, help="write train-<device>.json/.md/.png here")
    a = p.parse_args(argv)
    a.t0 = time.monotonic()
    gpu = a.device == "cuda"
    a.models = (a.models or ("deit_tiny_patch16_224,deit_small_patch16_224" if gpu
                             else "vit_tiny_patch16_224")).split(",")
    a.methods = a.methods.split(",")
    a.modes = a.modes.split(",")
    for name, vals, valid in (("--methods", a.methods, base_methods()),
                              ("--modes", a.modes, ("e2e", "step"))):
        if bad := [v for v in vals if v not in valid]:
            p.error(f"{name}: unknown {', '.join(bad)}; valid: {', '.join(valid)}")
    a.size = 224 if gpu else 28
    a.kwargs = TINY if a.models == ["vit_tiny_patch16_224"] and not gpu else {}
    a.batch_size = a.batch_size or (128 if gpu else 64)
    a.steps = a.steps or (30 if gpu else 10)
    a.warmup = a.warmup if a.warmup is not None else (5 if gpu else 2)
    a.threads = a.threads or (len(os.sched_getaffinity(0)) if gpu else 2)
    a.images = a.images or max(a.batch_size * 6, 100)
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.device == "cuda":
        torch.cuda.init()              # the CUDA context is not counted as a config's memory
    with tempfile.TemporaryDirectory() as tmp:
        # cpu: small photo-like JPEGs (decoding 500x375 would swamp a 28-px model's step)
        shape = None if a.size >= 128 else (a.size * 5 // 4,) * 2
        data = a.data or str(make_imagenet_like(Path(tmp) / "train", a.images, shape=shape))
        payload = {"title": f"Training throughput, {a.device}", "machine": machine_info(),
                   "settings": {k: v for k, v in vars(a).items() if k not in ("out", "t0")},
                   "data": {"path": a.data or f"generated (tools.imagenet_like, {shape or 'ImageNet shapes'})",
                            **describe(data)}}
        payload.update(run_train_bench(data, a))
    md = table(payload)
    print(md, end="")
    if a.json:
        Path(a.json).write_text(json.dumps(payload["results"], indent=1))
    if a.out:
        bars = [(f"{r['mode']} {r['model'].split('_patch')[0]} {r['method']}", r["img_s"],
                 f"img/s ({r['x_none']:.3f}x none)") for r in payload["results"]]
        for path in write_outputs(a.out, f"train-{a.device}", payload, md, bars, "img/s"):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
