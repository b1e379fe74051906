"""Mixed-sample targets: area/blend labels, TransMix, and Progressive Attention Labeling (PAL).

Per sample (never a batch mean; openmixup's batch mean is a bug):
  lam_attn = sum(A * m) / sum(A)                        m: token mask, 1 = token from sample a
  TransMix (CutMix samples):  lam = (lam_area + lam_attn) / 2
  PAL (MaskMix samples):
      y_area = lam_area * y_a + (1 - lam_area) * y_b    (label-smoothed one-hots)
      alpha  = cos(softmax(z), y_area)                  in [0, 1]
      lam    = alpha * lam_attn + (1 - alpha) * lam_area
  target = lam * y_a + (1 - lam) * y_b

Worked example: a 2x2 token grid, mask [[1, 0], [0, 0]] (lam_area 0.25) and A = [0.7, 0.1,
0.1, 0.1] give lam_attn 0.7; TransMix lam = 0.475; PAL with alpha 0.5 gives lam = 0.475 too.

Hierarchical models (CA-Swin, CA-PVT v2) give A on their final-stage grid (7x7 at 224 px, 32 px
per token) while the token mask is on the 4-px patch grid (56x56): m is then the mean of the
mask over each final-stage token's 8x8 patches. MaskMix cells that are multiples of 32 px keep
that 0 or 1 (each final-stage token from one image, as the paper's "each patch from one image"
needs); `ClsAttention.check_mask_patch` rejects other cell sizes. A CutMix box gives the exact
area share per final-stage token.

Label smoothing follows timm: off value s/C, on value 1 - s + s/C.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .masks import MODES

__all__ = [
    "LABEL_RULES", "LABEL_VARIANTS", "TARGET_METHODS", "TARGET_PRESETS", "MixTargets",
    "smooth_one_hot", "attn_lambda", "pal_alpha", "grid_factor", "pool_token_mask",
    "mix_targets", "soft_target_cross_entropy",
]

LABEL_RULES: dict[str, tuple[str, ...]] = {
    "mixpro": ("maskmix",),   # PAL on MaskMix rows
    "transmix": ("cutmix",),  # TransMix on CutMix rows
    "area": (),               # area / blend labels everywhere (no attention)
}
"""`mix_targets` method -> the modes whose rows it relabels with the class attention by default
(a method row of `mixpro_dali.methods` may name others: `label_modes`)."""
TARGET_METHODS = tuple(LABEL_RULES)
LABEL_VARIANTS = ("paper", "official")
"""PAL label variants (`label_variant=`; the old keyword was `preset=`)."""
TARGET_PRESETS = LABEL_VARIANTS  # the old name


@dataclass(frozen=True)
class MixTargets:
    """What `mix_targets` decided, per sample.

    target: (B, C) float32, rows sum to 1; carries a gradient only for PAL rows under the
        'official' label variant (through alpha).
    lam: (B,) float32 final weight of labels_a, in [0, 1] (detached, for logging).
    alpha: (B,) float32 PAL trust weight, NaN where PAL was not applied (detached).
    """

    target: torch.Tensor
    lam: torch.Tensor
    alpha: torch.Tensor


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """(B,) int -> (B, C) float32 with timm's smoothing: off s/C, on 1 - s + s/C."""
    off = smoothing / num_classes
    out = torch.full((labels.shape[0], num_classes), off, dtype=torch.float32,
                     device=labels.device)
    return out.scatter_(1, labels.long().unsqueeze(1), 1.0 - smoothing + off)


def grid_factor(token_grid: tuple[int, int], n_attn: int) -> int:
    """k such that the (h, w) token grid is k x k tokens per entry of an attention grid of
    n_attn = (h/k) * (w/k) entries (1: same grid; 8: CA-Swin-T's 7x7 over 56x56 tokens)."""
    h, w = token_grid
    for k in range(1, min(h, w) + 1):
        if h % k == 0 and w % k == 0 and (h // k) * (w // k) == n_attn:
            return k
    raise ValueError(f"attn has {n_attn} tokens per sample, which is neither the token mask's "
                     f"{h}x{w} grid nor a coarser grid that tiles it (k x k tokens per entry); "
                     "pass ClsAttention(model).maps of the model that saw the batch")


def pool_token_mask(token_mask: torch.Tensor, n_attn: int) -> torch.Tensor:
    """Token mask -> the share of each attention-grid token taken from sample a, (B, n_attn).

    token_mask: (B, h, w), or (B, h*w) when attn is on the same grid. On a grid k times coarser
    (the final stage of CA-Swin / CA-PVT) each entry is the mean over its k x k tokens: exactly 0
    or 1 for MaskMix cells that are multiples of the final-stage stride, the exact area share
    per final-stage token for CutMix boxes.
    """
    B = token_mask.shape[0]
    m = token_mask.to(torch.float32)
    if m[0].numel() == n_attn:
        return m.reshape(B, n_attn)
    if m.ndim != 3:
        raise ValueError(f"token_mask {tuple(token_mask.shape)} must be (B, h, w) when attn is "
                         f"on a coarser grid ({n_attn} tokens)")
    h, w = m.shape[1:]
    k = grid_factor((h, w), n_attn)
    return m.reshape(B, h // k, k, w // k, k).mean(dim=(2, 4)).reshape(B, n_attn)  # (B, n)


def attn_lambda(attn: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """lam_attn = w_a / (w_a + w_b), w_a = sum(A * m), w_b = sum(A * (1 - m)): (B,) float32.

    attn: (B, n) on the token grid or on a coarser grid that tiles it; token_mask (B, h, w) or
    (B, h*w), 1 = token from sample a (pooled onto attn's grid, `pool_token_mask`). Normalizing
    by w_a + w_b is the official formula (TransMix, fistyee/MixPro): with `ClsAttention.maps`
    (rows sum to 1) it is sum(A * m); raw attention rows that keep prefix tokens sum to less
    than 1, and the plain sum would be biased low.
    """
    a = attn.float()  # (B, n)
    m = pool_token_mask(token_mask, a.shape[1])  # (B, n)
    w_a = (a * m).sum(dim=1)
    total = a.sum(dim=1).clamp_min(torch.finfo(torch.float32).tiny)  # w_a + w_b
    return (w_a / total).clamp(0.0, 1.0)


def pal_alpha(logits: torch.Tensor, y_area: torch.Tensor) -> torch.Tensor:
    """alpha = cos(softmax(logits), y_area) per sample, (B,) float32 in [0, 1]."""
    p = logits.float().softmax(dim=-1)  # (B, C)
    return F.cosine_similarity(p, y_area, dim=-1).clamp(0.0, 1.0)


def _mix(lam: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor) -> torch.Tensor:
    lam = lam.unsqueeze(1)  # (B, 1)
    return lam * y_a + (1.0 - lam) * y_b


def _check_choice(name: str, value: object, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{name} must be one of {valid}, got {value!r}")


def _check_inputs(logits, labels_a, labels_b, lam, mode, token_mask, attn, num_classes,
                  smoothing, method) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing!r}")
    if logits.ndim != 2 or logits.shape[1] != num_classes:
        raise ValueError(f"logits must be (B, num_classes={num_classes}), "
                         f"got {tuple(logits.shape)}")
    B = logits.shape[0]
    for name, t in (("labels_a", labels_a), ("labels_b", labels_b), ("lam", lam), ("mode", mode)):
        if tuple(t.shape) != (B,):
            raise ValueError(f"{name} must have shape (B,) = ({B},) like logits, "
                             f"got {tuple(t.shape)}")
    for name, t in (("labels_a", labels_a), ("labels_b", labels_b), ("mode", mode)):
        if t.is_floating_point() or t.is_complex():
            raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if method == "area":
        return
    if attn is None or token_mask is None:
        missing = "attn" if attn is None else "token_mask"
        raise ValueError(f"{missing} is required for method={method!r}; pass "
                         "ClsAttention(model).maps and the loader's token_mask, "
                         "or use method='area'")
    if token_mask.ndim not in (2, 3) or token_mask.shape[0] != B:
        raise ValueError(f"token_mask must be (B, h, w) or (B, h*w) with B={B}, "
                         f"got {tuple(token_mask.shape)}")
    n_tokens = token_mask[0].numel()
    coarser = False
    if attn.ndim == 2 and attn.shape[0] == B and attn.shape[1] != n_tokens and token_mask.ndim == 3:
        try:  # a coarser grid that tiles the mask's (CA-Swin / CA-PVT final stage)
            coarser = bool(grid_factor(tuple(token_mask.shape[1:]), attn.shape[1]))
        except ValueError:
            pass
    if not coarser and tuple(attn.shape) != (B, n_tokens):
        raise ValueError(f"attn must be (B, h*w) = ({B}, {n_tokens}) to match token_mask "
                         f"{tuple(token_mask.shape)}, or (B, n) on a coarser grid that tiles it "
                         f"(k x k tokens per entry), got {tuple(attn.shape)}")


def mix_targets(
    logits: torch.Tensor,
    labels_a: torch.Tensor,
    labels_b: torch.Tensor,
    lam: torch.Tensor,
    mode: torch.Tensor,
    token_mask: torch.Tensor | None,
    attn: torch.Tensor | None,
    *,
    num_classes: int,
    smoothing: float = 0.1,
    method: str = "mixpro",
    label_variant: str = "paper",
    label_modes: Sequence[str] | None = None,
    preset: str | None = None,
) -> MixTargets:
    """Soft targets for a mixed batch, per sample (PAL on MaskMix rows, TransMix on CutMix rows).

    logits: (B, C) model output of the mixed batch (only read by PAL).
    labels_a, labels_b: (B,) int; lam: (B,) exact area share / blend weight of labels_a (1 for
    unmixed); mode: (B,) int, MODES codes; token_mask: (B, h, w) or (B, h*w), 1 = from a;
    attn: (B, n) `ClsAttention.maps` (None allowed with method='area'), n = h*w, or the
    final-stage grid of CA-Swin / CA-PVT (then token_mask must be (B, h, w) and is pooled).

    method: 'mixpro' (PAL on MaskMix samples), 'transmix' (on CutMix samples), 'area' (area /
        blend labels everywhere). Other samples always get area / blend labels.
    label_variant: 'paper' (alpha detached, smoothing in the final target) or 'official'
        (parity with fistyee/MixPro: alpha keeps its gradient and PAL rows use hard labels, so
        that soft-target CE on them is lam*CE(z, y_a) + (1-lam)*CE(z, y_b) with the gradient
        flowing through lam; non-PAL rows keep smoothing). Only PAL rows depend on it.
    label_modes: the modes whose rows get the attention label (default: the method's own,
        `LABEL_RULES`; a registered mode joins them here).
    preset: deprecated name of label_variant.
    """
    _check_choice("method", method, tuple(LABEL_RULES))
    if preset is not None:
        warnings.warn("mix_targets(preset=...) is deprecated: use label_variant=...",
                      DeprecationWarning, stacklevel=2)
        label_variant = preset
    _check_choice("label_variant", label_variant, LABEL_VARIANTS)
    modes = LABEL_RULES[method] if label_modes is None else tuple(label_modes)
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ValueError(f"label_modes: unknown mode {bad[0]!r}; modes: {', '.join(MODES)}")
    _check_inputs(logits, labels_a, labels_b, lam, mode, token_mask, attn, num_classes,
                  smoothing, method)
    y_a = smooth_one_hot(labels_a, num_classes, smoothing)  # (B, C)
    y_b = smooth_one_hot(labels_b, num_classes, smoothing)  # (B, C)
    lam_area = lam.to(device=logits.device, dtype=torch.float32)  # (B,)
    alpha = torch.full_like(lam_area, float("nan"))
    if method == "area":
        return MixTargets(_mix(lam_area, y_a, y_b), lam_area, alpha)

    lam_attn = attn_lambda(attn, token_mask)  # (B,)
    if method == "transmix":
        lam_mix = torch.where(_rows(mode, modes), (lam_area + lam_attn) / 2, lam_area)
        return MixTargets(_mix(lam_mix, y_a, y_b), lam_mix, alpha)

    official = label_variant == "official"
    pal = _rows(mode, modes)  # (B,)
    a = pal_alpha(logits if official else logits.detach(), _mix(lam_area, y_a, y_b))  # (B,)
    lam_mix = torch.where(pal, a * lam_attn + (1.0 - a) * lam_area, lam_area)  # (B,)
    target = _mix(lam_mix, y_a, y_b)
    if official:  # hard labels in the PAL branch; lam keeps alpha's gradient
        hard = _mix(lam_mix, smooth_one_hot(labels_a, num_classes, 0.0),
                    smooth_one_hot(labels_b, num_classes, 0.0))
        target = torch.where(pal.unsqueeze(1), hard, target)
    alpha = torch.where(pal, a.detach(), alpha)
    return MixTargets(target, lam_mix.detach(), alpha)


def _rows(mode: torch.Tensor, modes: Sequence[str]) -> torch.Tensor:
    """(B,) bool: the rows whose mode is one of `modes`."""
    rows = torch.zeros_like(mode, dtype=torch.bool)
    for name in modes:
        rows = rows | (mode == MODES[name])
    return rows


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                              reduction: str = "mean") -> torch.Tensor:
    """-sum(target * log_softmax(logits)) per sample, in float32; 'mean' or 'none'.

    Same value as timm's SoftTargetCrossEntropy; the target is not detached, so the 'official'
    PAL label variant's gradient through alpha reaches the model.
    """
    _check_choice("reduction", reduction, ("mean", "none"))
    if logits.shape != target.shape:
        raise ValueError(f"logits and target must have the same shape (B, C), got "
                         f"{tuple(logits.shape)} and {tuple(target.shape)}")
    loss = -(target * logits.float().log_softmax(dim=-1)).sum(dim=-1)  # (B,)
    return loss.mean() if reduction == "mean" else loss
