"""Shared builders of the trainer tests: a tiny real JPEG tree, a tiny ViT config for it, a
tiny ViT and an Engine around it (in-memory, CPU)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image

from train.dist import DistInfo
from train.engine import Engine
from train.losses import MixLoss
from train.optim import build_optimizer, build_scheduler

KWARGS = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}
CPU = DistInfo(0, 1, 0, torch.device("cpu"))


def make_tree(root: Path, n_train: int = 8, n_val: int = 5, classes: int = 3, size: int = 16):
    """root/{train,val}/c<k>/*.jpg: class k is a bright square at a class-specific place."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in range(classes):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
                o = c * size // classes
                img[o:o + size // 3, o:o + size // 3] = 230
                Image.fromarray(img).save(root / split / f"c{c}" / f"{i}.jpg", quality=95)
    return root


def tiny_config(tree: Path, out: Path, method: str = "mixpro", **sections) -> dict:
    d = {
        "data": {"train": str(tree / "train"), "val": str(tree / "val"), "image_size": 16,
                 "batch_size": 8, "val_batch_size": 4, "num_threads": 1, "auto_augment": None,
                 "re_prob": 0.0, "crop_pct": 1.0, "interpolation": "bilinear",
                 "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
        "model": {"name": "vit_tiny_patch16_224", "num_classes": 3, "drop_path": 0.1,
                  "kwargs": dict(KWARGS)},
        "mix": {"method": method, "mask_patch": 8},
        "optim": {"lr": 1e-3, "lr_base_batch": None, "warmup_epochs": 0.5, "min_lr": 1e-5},
        "run": {"epochs": 1, "output": str(out), "progress": "off", "tensorboard": False,
                "seed": 3},
    }
    for name, values in sections.items():
        d[name].update(values)
    return d


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32,
                             depth=2, num_heads=2, num_classes=5, drop_path_rate=0.0)


def sgd(model, lr=1e-1):
    """SGD, not AdamW, for comparisons: Adam turns float noise in exactly-zero gradients (the
    key bias) into full-size updates, so two equal computations could not be compared."""
    return build_optimizer(model, opt="sgd", lr=lr, weight_decay=0.05, betas=(0.9, 0.999),
                           eps=1e-8)


def engine(model, *, accum=1, clip=None, scaler=None, lr=1e-1, epochs=1, upe=10, warmup=0.0):
    opt = sgd(model, lr)
    sch = build_scheduler(opt, sched="cosine", epochs=epochs, updates_per_epoch=upe,
                          warmup_epochs=warmup, warmup_lr=1e-6, min_lr=1e-5)
    scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
    loss = MixLoss(model, method="deit", label_variant="paper", num_classes=5, smoothing=0.1)
    return Engine(model, model, opt, sch, scaler, loss, dist=CPU, accum_steps=accum,
                  clip_grad=clip)
