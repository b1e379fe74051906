"""Optimizer and LR schedule, built with timm (not re-implemented).

- AdamW through `timm.optim.create_optimizer_v2`: its parameter groups put 1-D parameters
  (norms, biases) and the model's `no_weight_decay()` set (pos_embed, cls_token, dist_token)
  in a group without weight decay (the recipe: docs/method.md section 9).
- Cosine with linear warm-up, stepped per optimizer update (`step_update`), through
  `timm.scheduler.create_scheduler_v2(step_on_epochs=False)`.
"""
from __future__ import annotations

import torch
from torch import nn
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

__all__ = ["scaled_lr", "build_optimizer", "build_scheduler"]


def scaled_lr(lr: float, global_batch: int, lr_base_batch: int | None) -> float:
    """Linear scaling rule: lr * global_batch / lr_base_batch (DeiT: 5e-4 per 512)."""
    return lr if lr_base_batch is None else lr * global_batch / lr_base_batch


def build_optimizer(model: nn.Module, *, opt: str, lr: float, weight_decay: float,
                    betas: tuple[float, float], eps: float) -> torch.optim.Optimizer:
    kwargs = dict(betas=tuple(betas), eps=eps) if "adam" in opt.lower() or "lamb" in opt.lower() \
        else {}
    return create_optimizer_v2(model, opt=opt, lr=lr, weight_decay=weight_decay, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, *, sched: str, epochs: int,
                    updates_per_epoch: int, warmup_epochs: float, warmup_lr: float,
                    min_lr: float):
    """A timm scheduler stepped with `step_update(num_updates)` after every optimizer step.

    Warm-up lasts warmup_epochs * updates_per_epoch optimizer steps (linear from warmup_lr)."""
    if updates_per_epoch < 1:
        raise ValueError(f"an epoch has no optimizer step (updates_per_epoch="
                         f"{updates_per_epoch}): the training set is smaller than one batch "
                         "x optim.accum_steps x world size")
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=sched, num_epochs=epochs, warmup_epochs=warmup_epochs,
        warmup_lr=warmup_lr, min_lr=min_lr, step_on_epochs=False,
        updates_per_epoch=updates_per_epoch,
        decay_epochs=max(1, epochs // 3) if sched == "step" else None,
    )
    return scheduler
