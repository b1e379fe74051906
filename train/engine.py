"""One training loop for CPU and GPU (nullcontext on CPU, autocast on GPU), and evaluation.

Gradient accumulation: the batches of an epoch are cut into groups of `accum_steps` (the last
group may be shorter); each micro-batch loss is divided by its group's size, so one optimizer
step sees the mean over the group's samples, exactly as one large batch would. DDP syncs
gradients only on a group's last micro-batch (`no_sync`). Clipping runs on unscaled gradients
(`scaler.unscale_` first) and before `optimizer.step` (two reference bugs avoided).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mixpro_dali.config import MODES
from mixpro_dali.labels import attn_lambda

from .dist import DistInfo, all_reduce_sum

__all__ = ["NonFiniteLossError", "TrainState", "Engine", "PalMonitor", "group_size",
           "topk_correct"]


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class TrainState:
    """Where the run is; saved in checkpoints and restored on --resume."""

    epoch: int = 0          # current epoch index (0-based)
    batch: int = 0          # batches of this epoch already consumed
    step: int = 0           # optimizer steps so far (all epochs)
    loss_sum: float = 0.0   # this epoch, this rank: sum of micro-batch mean losses
    loss_count: int = 0     # this epoch, this rank: number of micro-batches
    best_top1: float = -1.0
    best_epoch: int = -1
    history: list = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainState":
        return cls(**dict(d))


def group_size(batch: int, n_batches: int, accum: int) -> int:
    """Micro-batches in the accumulation group that holds batch index `batch`."""
    start = (batch // accum) * accum
    return min(accum, n_batches - start)


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> list[torch.Tensor]:
    """Number of samples whose label is in the top-k logits, for each k (k clipped to C)."""
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices  # (B, maxk)
    hit = pred.eq(target.view(-1, 1))  # (B, maxk)
    return [hit[:, :min(k, maxk)].any(dim=1).sum() for k in ks]


class PalMonitor:
    """Per-epoch PAL quantities and mode shares, summed on the device (no host sync per batch).

    Over the PAL samples of the epoch (MaskMix samples under method mixpro): mean and std of
    alpha, mean lam_attn, mean lam_area, mean |lam - lam_area| (how far PAL moved the label),
    and a histogram of alpha over [0, 1]. Over all batches: the share of batches in each mode
    (one mode per batch). The sums are this rank's; `epoch_end` sums them over the ranks.
    """

    # accumulator layout: batches, PAL samples, sum alpha, sum alpha^2, sum lam_attn,
    # sum lam_area, sum |lam - lam_area|, one count per mode code (none, mixup, cutmix,
    # maskmix, then registered modes), then the alpha histogram
    _N, _P, _A, _A2, _ATTN, _AREA, _SHIFT, _MODE = range(8)

    def __init__(self, device: torch.device, *, pal: bool, bins: int = 20) -> None:
        self.device, self.pal, self.bins = device, pal, bins
        self.mode_codes = dict(sorted(MODES.items(), key=lambda kv: kv[1]))  # registered modes
        self._codes = max(MODES.values()) + 1
        self._hist = self._MODE + self._codes
        self.acc = torch.zeros(self._hist + bins, dtype=torch.float64, device=device)
        self.last_hist: list[float] = []

    def reset(self) -> None:
        self.acc.zero_()

    @torch.no_grad()
    def update(self, batch: Mapping[str, torch.Tensor], targets: Any,
               attn: torch.Tensor | None) -> None:
        """One micro-batch: `targets` is the MixTargets of the loss, `attn` the class attention
        (B, h*w) of the same forward (None without PAL). Device ops only."""
        dev = self.device
        mode = batch["mode"].to(dev, non_blocking=True)
        parts = [torch.ones(1, dtype=torch.float64, device=dev)]
        if self.pal and attn is not None:
            alpha = targets.alpha.to(dev).double()  # NaN where PAL was not applied
            pal = torch.isfinite(alpha)
            zero = torch.zeros((), dtype=torch.float64, device=dev)

            def masked(x: torch.Tensor) -> torch.Tensor:
                return torch.where(pal, x.to(dev).double(), zero)

            a = masked(alpha)
            lam_area = batch["lam"].to(dev, non_blocking=True)
            lam_attn = masked(attn_lambda(attn, batch["token_mask"].to(dev, non_blocking=True)))
            shift = masked((targets.lam.to(dev) - lam_area.float()).abs())
            idx = (a * self.bins).long().clamp_(0, self.bins - 1)
            hist = torch.zeros(self.bins, dtype=torch.float64, device=dev).index_add_(
                0, idx, pal.double())
            parts.append(torch.stack([pal.double().sum(), a.sum(), (a * a).sum(), lam_attn.sum(),
                                      masked(lam_area).sum(), shift.sum()]))
        else:
            parts.append(torch.zeros(6, dtype=torch.float64, device=dev))
            hist = torch.zeros(self.bins, dtype=torch.float64, device=dev)
        parts.append(F.one_hot(mode[:1].long(), self._codes)[0].double())
        parts.append(hist)
        self.acc += torch.cat(parts)

    def state(self) -> list[float]:
        """This rank's sums (one host copy), for a checkpoint."""
        return self.acc.tolist()

    def load_state(self, values: list[float]) -> None:
        if len(values) != self.acc.numel():
            raise ValueError(f"PAL monitor state has {len(values)} values, expected "
                             f"{self.acc.numel()}")
        self.acc.copy_(torch.tensor(values, dtype=torch.float64))

    def epoch_end(self) -> dict[str, float]:
        """Sum over ranks, reset, and return the epoch's columns (histogram in last_hist)."""
        tot = all_reduce_sum(self.acc.clone()).tolist()
        self.reset()
        n = max(tot[self._N], 1.0)
        out = {f"mode_{m}": tot[self._MODE + c] / n for m, c in self.mode_codes.items()}
        self.last_hist = tot[self._hist:]
        if not self.pal:
            return out
        p = tot[self._P]
        nan = float("nan")
        mean = tot[self._A] / p if p else nan
        var = max(tot[self._A2] / p - mean * mean, 0.0) if p else nan
        out = {"pal_alpha_mean": mean, "pal_alpha_std": math.sqrt(var),
               "pal_lam_attn": tot[self._ATTN] / p if p else nan,
               "pal_lam_area": tot[self._AREA] / p if p else nan,
               "pal_lam_shift": tot[self._SHIFT] / p if p else nan, **out}
        return out


class Engine:
    """Holds what the loop needs; `train_epoch` and `evaluate` are the loop."""

    def __init__(self, model: nn.Module, train_model: nn.Module, optimizer, scheduler, scaler,
                 loss_fn: Callable, *, dist: DistInfo, amp: str = "none", accum_steps: int = 1,
                 clip_grad: float | None = None, ema=None,
                 monitor: PalMonitor | None = None) -> None:
        self.model = model              # the bare timm model (parameters, EMA, state dicts)
        self.train_model = train_model  # what runs forward: DDP and/or compiled wrapper
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.loss_fn = loss_fn
        self.dist = dist
        self.device = dist.device
        self.accum_steps = accum_steps
        self.clip_grad = clip_grad
        self.ema = ema
        self.monitor = monitor
        self.amp_dtype = None
        if self.device.type == "cuda" and amp != "none":
            self.amp_dtype = torch.bfloat16 if amp == "bf16" else torch.float16

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _no_sync(self, last: bool):
        sync = getattr(self.train_model, "no_sync", None)
        if last or sync is None:
            return contextlib.nullcontext()
        return sync()

    def forward_backward(self, batch: Mapping[str, torch.Tensor], divisor: int,
                         last: bool) -> torch.Tensor:
        """One micro-batch: forward, loss / divisor, backward. Returns the detached loss."""
        with self._no_sync(last):
            with self.autocast():
                logits = self.train_model(batch["image"])  # (B, C)
            loss, targets = self.loss_fn(logits, batch)
            if self.monitor is not None:
                att = getattr(self.loss_fn, "attention", None)
                self.monitor.update(batch, targets, att.maps if att is not None else None)
            self.scaler.scale(loss / divisor).backward()
        return loss.detach()

    def optimizer_step(self) -> torch.Tensor | None:
        """Clip (on unscaled grads) -> step -> zero grads -> schedule -> EMA."""
        grad_norm = None
        if self.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def train_epoch(self, loader: Iterable, n_batches: int, state: TrainState, *,
                    on_log: Callable | None = None, log_every: int = 50,
                    on_checkpoint: Callable | None = None,
                    ckpt_steps: int = 0) -> dict[str, float]:
        """Consume the rest of the epoch (from state.batch). on_log(state, info) every
        log_every optimizer steps; on_checkpoint(state) every ckpt_steps optimizer steps
        (mid-epoch only: the epoch end is the caller's), after the loss was checked finite."""
        self.train_model.train()
        loss_acc = torch.zeros((), dtype=torch.float64, device=self.device)
        seen, n_acc, t0 = 0, 0, time.perf_counter()
        for batch in loader:
            i = state.batch
            size = group_size(i, n_batches, self.accum_steps)
            last = (i + 1) % self.accum_steps == 0 or i + 1 == n_batches
            loss = self.forward_backward(batch, size, last)
            loss_acc += loss
            n_acc += 1
            seen += batch["image"].shape[0]
            state.batch += 1
            state.loss_count += 1
            if not last:
                continue
            self.optimizer_step()
            state.step += 1
            self.scheduler.step_update(num_updates=state.step)
            if self.ema is not None:
                self.ema.update(self.model, step=state.step)
            if on_log is not None and state.step % log_every == 0:
                interval = self._check_finite(loss_acc, state)
                state.loss_sum += interval
                dt = time.perf_counter() - t0
                on_log(state, {"loss": interval / max(n_acc, 1), "lr": self.lr,
                               "img_s": seen * self.dist.world_size / max(dt, 1e-9)})
                loss_acc.zero_()
                seen, n_acc, t0 = 0, 0, time.perf_counter()
            if (on_checkpoint is not None and ckpt_steps and state.step % ckpt_steps == 0
                    and state.batch < n_batches):
                state.loss_sum += self._check_finite(loss_acc, state)
                loss_acc.zero_()
                n_acc = 0
                on_checkpoint(state)
        if state.batch != n_batches:
            raise RuntimeError(f"the training loader yielded {state.batch} batches in epoch "
                               f"{state.epoch}, len() promised {n_batches}")
        state.loss_sum += self._check_finite(loss_acc, state)
        tot = all_reduce_sum(torch.tensor([state.loss_sum, state.loss_count],
                                          dtype=torch.float64, device=self.device))
        out = {"loss": (tot[0] / tot[1].clamp(min=1)).item()}
        if self.monitor is not None:
            out.update(self.monitor.epoch_end())
        return out

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _check_finite(self, loss_acc: torch.Tensor, state: TrainState) -> float:
        v = float(loss_acc.item())
        if not math.isfinite(v):
            raise NonFiniteLossError(
                f"training loss is {v} at epoch {state.epoch}, optimizer step {state.step}: "
                "stopping. The last checkpoint written (last.pth) is from before this and is "
                "intact; lower optim.lr, set optim.clip_grad, or use run.amp bf16, then --resume.")
        return v

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Iterable) -> dict[str, float]:
        """Top-1 / top-5 / CE loss over the whole validation set (each sample once, all ranks)."""
        was_training = model.training
        model.eval()
        acc = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss, top1, top5
        count = 0              # on the host: a per-batch host-to-device copy would sync
        for batch in loader:   # the loader's tensors are on the device (a no-op .to) or pinned
            images = batch["image"].to(self.device, non_blocking=True)
            labels = batch["label"].to(self.device, non_blocking=True).long()
            with self.autocast():
                logits = model(images)
            logits = logits.float()
            c1, c5 = topk_correct(logits, labels)
            acc += torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(),
                                c1.double(), c5.double()])
            count += labels.numel()
        model.train(was_training)
        total = torch.cat([acc, torch.tensor([float(count)], dtype=torch.float64).to(self.device)])
        loss, c1, c5, n = all_reduce_sum(total).tolist()
        n = max(n, 1.0)
        return {"loss": loss / n, "top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n,
                "count": int(n)}
