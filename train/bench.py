"""python -m train.bench: training throughput (steps/s, img/s) per mixing method, end to end
(DALI loader + MaskMix + forward/backward + PAL labels + AdamW step), one process.

CPU default: the demo's tiny ViT (28 px, patch 7) on a synthetic 28-px JPEG tree. GPU default: DeiT-Tiny
and DeiT-Small at 224 px on a synthetic 224-px JPEG tree, bf16. --data DIR uses real class
folders (e.g. ImageNet train/) instead.

  python -m train.bench                                # all methods, defaults for the device
  python -m train.bench --models deit_small_patch16_224 --batch-size 256 --steps 50
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .config import TrainConfig
from .dist import DistInfo
from .engine import Engine
from .losses import MixLoss, mix_config_for
from .main import build_loaders, build_model
from .optim import build_optimizer, build_scheduler
from .summary import format_table

TINY = {"img_size": 28, "patch_size": 7, "embed_dim": 96, "depth": 4, "num_heads": 3}  # demo


def synthetic_tree(root: Path, size: int, n: int, classes: int = 10) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c:02d}").mkdir(parents=True, exist_ok=True)
        for i in range(n // classes):
            img = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / f"c{c:02d}" / f"{i}.jpg", quality=90)
    return root


def bench_one(model_name: str, method: str, data: str, *, device: torch.device, size: int,
              batch: int, steps: int, warmup: int, threads: int, kwargs: dict) -> dict:
    cfg = TrainConfig.from_dict({
        "data": {"train": data, "val": data, "image_size": size, "batch_size": batch,
                 "num_threads": threads},
        "model": {"name": model_name, "num_classes": 10, "kwargs": kwargs},
        "mix": {"method": method, "mask_patch": 7 if size <= 64 else 64},
        "run": {"device": device.type, "progress": "off"},
    })
    dist = DistInfo(0, 1, 0, device)
    model, patch = build_model(cfg)
    model.to(device)
    mix_cfg = mix_config_for(method, "paper", image_size=size, patch_size=patch,
                             mask_patch=cfg.mix.mask_patch, seed=0, options={})
    loss_fn = MixLoss(model, method=method, preset="paper", num_classes=10, smoothing=0.1)
    loader, _ = build_loaders(cfg, dist, mix_cfg, data, data)
    opt = build_optimizer(model, opt="adamw", lr=1e-4, weight_decay=0.05, betas=(0.9, 0.999),
                          eps=1e-8)
    sched = build_scheduler(opt, sched="cosine", epochs=1, updates_per_epoch=steps + warmup,
                            warmup_epochs=0, warmup_lr=1e-6, min_lr=1e-6)
    eng = Engine(model, model, opt, sched, torch.amp.GradScaler(device.type, enabled=False),
                 loss_fn, dist=dist, amp="bf16")
    model.train()
    done, t0 = 0, None
    while done < steps + warmup:
        for b in loader:
            if done == warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            eng.forward_backward(b, 1, True)
            eng.optimizer_step()
            done += 1
            if done == steps + warmup:
                break
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    loss_fn.remove()
    return {"model": model_name, "method": method, "batch": batch, "steps": steps,
            "steps_s": steps / dt, "img_s": steps * batch / dt}


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m train.bench", description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="none,deit,transmix,mixpro")
    p.add_argument("--models", default="deit_tiny_patch16_224,deit_small_patch16_224" if cuda
                   else "vit_tiny_patch16_224")
    p.add_argument("--device", default="cuda" if cuda else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--batch-size", type=int, default=128 if cuda else 64)
    p.add_argument("--steps", type=int, default=30 if cuda else 10)
    p.add_argument("--warmup", type=int, default=5 if cuda else 2)
    p.add_argument("--threads", type=int, default=4 if cuda else 2, help="DALI CPU threads")
    p.add_argument("--data", default=None, help="class-folder tree (default: synthetic JPEGs)")
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    size = 224 if device.type == "cuda" else 28
    tiny = a.models == "vit_tiny_patch16_224" and device.type == "cpu"
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = a.data or str(synthetic_tree(Path(tmp) / "train", size,
                                            max(a.batch_size * 4, 100)))
        for model_name in a.models.split(","):
            for method in a.methods.split(","):
                r = bench_one(model_name, method, data, device=device, size=size,
                              batch=a.batch_size, steps=a.steps, warmup=a.warmup,
                              threads=a.threads, kwargs=TINY if tiny else {})
                results.append(r)
                print(f"{model_name} {method}: {r['steps_s']:.2f} steps/s "
                      f"{r['img_s']:.0f} img/s", flush=True)
    print(format_table([(f"{r['model']} {r['method']}",
                         f"{r['steps_s']:.2f} steps/s, {r['img_s']:.0f} img/s")
                        for r in results]))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
