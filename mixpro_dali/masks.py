"""MaskMix / CutMix / Mixup kernels in plain torch: one implementation for CPU and GPU.

`sample_mix` draws every random decision of one batch on the host from a pure function of
(seed, shard, batch index); the draw is O(batch x cells). `mix_samples` (the batch as its
samples, as the operator gets it) and `apply_mix` (a dense batch) are deterministic given those
parameters and run on the images' device; only there is the token mask expanded to pixels
(never materialized as int64 on the host, unlike the reference code).

Worked example: a 2x2 token grid with token_mask [[1, 0], [0, 0]] gives lam 0.25 (the sample
keeps one token of four, MixPro Eq. 3: x_mix = M * x_a + (1 - M) * x_b).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .config import MODES, MixConfig

_MODE_ORDER = ("mixup", "cutmix", "maskmix")
_MODE_NAMES = {code: name for name, code in MODES.items()}


@dataclass(frozen=True)
class MixParams:
    """Everything decided for one batch. Tensors live on the host (small)."""

    mode: int                 # 0 none, 1 mixup, 2 cutmix, 3 maskmix (one per batch)
    partner: torch.Tensor     # (B,) int64: sample i is mixed with partner[i]
    token_mask: torch.Tensor  # (B, h, w) uint8: 1 = token from the sample itself
    lam: torch.Tensor         # (B,) float32: weight of the sample's own label
    blend: float = 1.0        # Mixup blend weight of the sample itself (1.0 otherwise)


def batch_rng(seed: int, shard_id: int, batch_index: int) -> np.random.Generator:
    """Independent stream per (seed, shard, batch): resumable and never shared by shards."""
    if min(seed, shard_id, batch_index) < 0:
        raise ValueError(
            f"seed, shard_id and batch_index must be >= 0, got {seed}, {shard_id}, {batch_index}"
        )
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, shard_id, batch_index])))


def sample_mode(rng: np.random.Generator, probs: dict[str, float]) -> int:
    """One mode per batch: mixup, cutmix, maskmix take their probability mass in that order."""
    u = rng.random()
    acc = 0.0
    for name in _MODE_ORDER:
        acc += probs.get(name, 0.0)
        if u < acc:
            return MODES[name]
    return MODES["none"]


def sample_partner(rng: np.random.Generator, batch_size: int, partner: str) -> np.ndarray:
    """`flip`: i <-> B-1-i (paper Alg. 1, timm). `perm`: random permutation (official code)."""
    if partner == "flip":
        return np.arange(batch_size - 1, -1, -1)
    return rng.permutation(batch_size)


def cell_counts(tau: np.ndarray, num_cells: int, rounding: str) -> np.ndarray:
    """n = floor(S*tau) (paper) or ceil(S*tau) (official code), in [0, S]."""
    raw = tau * num_cells
    n = np.floor(raw) if rounding == "floor" else np.ceil(raw)
    return np.clip(n, 0, num_cells).astype(np.int64)


def sample_cells(
    rng: np.random.Generator, batch_size: int, cell_grid: tuple[int, int], counts: np.ndarray
) -> np.ndarray:
    """Each sample gets its own random set of counts[i] cells. Returns (B, gh, gw) uint8,
    1 = cell kept from the sample itself."""
    num_cells = cell_grid[0] * cell_grid[1]
    ranks = rng.random((batch_size, num_cells)).argsort(axis=1).argsort(axis=1)  # (B, S)
    keep = ranks < counts[:, None]                                              # (B, S)
    return keep.reshape(batch_size, *cell_grid).astype(np.uint8)


def cells_to_tokens(cells: torch.Tensor, cell_tokens: int, token_grid: tuple[int, int]) -> torch.Tensor:
    """(B, gh, gw) cell mask -> (B, h, w) token mask; the grid starts top-left, so partial
    cells sit on the bottom and right edges."""
    h, w = token_grid
    t = cells.repeat_interleave(cell_tokens, dim=1).repeat_interleave(cell_tokens, dim=2)
    return t[:, :h, :w].contiguous()


def sample_box(
    rng: np.random.Generator, token_grid: tuple[int, int], alpha: float
) -> tuple[int, int, int, int]:
    """timm-style CutMix box in token units (snapped to the token grid): the ratio from
    Beta(alpha, alpha), the side scaled by sqrt(1 - ratio), the centre uniform, clipped."""
    h, w = token_grid
    ratio = rng.beta(alpha, alpha)
    cut = math.sqrt(1.0 - ratio)
    ch, cw = int(round(h * cut)), int(round(w * cut))
    cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch - ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw - cw // 2, w)
    return y0, y1, x0, x1


def sample_mix(config: MixConfig, batch_size: int, batch_index: int, shard_id: int = 0) -> MixParams:
    """Draw one batch's mixing decisions: a pure function of (seed, shard, batch index)."""
    rng = batch_rng(config.seed, shard_id, batch_index)
    mode = sample_mode(rng, dict(config.probs))
    h, w = config.token_grid
    # drawn right after the mode, as before per-mode partners: a single rule keeps its stream
    partner = sample_partner(rng, batch_size, config.partner_for(_MODE_NAMES[mode]))
    token_mask = torch.ones(batch_size, h, w, dtype=torch.uint8)
    blend = 1.0
    if mode == MODES["maskmix"]:
        gh, gw = config.cell_grid
        tau = rng.beta(config.beta, config.beta, size=batch_size if config.per_sample_ratio else 1)
        counts = np.broadcast_to(cell_counts(tau, gh * gw, config.rounding), (batch_size,))
        cells = torch.from_numpy(sample_cells(rng, batch_size, (gh, gw), counts))
        token_mask = cells_to_tokens(cells, config.mask_patch // config.patch_size, (h, w))
    elif mode == MODES["cutmix"]:
        y0, y1, x0, x1 = sample_box(rng, (h, w), config.cutmix_alpha)
        token_mask[:, y0:y1, x0:x1] = 0
    elif mode == MODES["mixup"]:
        blend = float(rng.beta(config.mixup_alpha, config.mixup_alpha))
    lam = area_lambda(token_mask) if mode != MODES["mixup"] else torch.full((batch_size,), blend)
    if mode == MODES["none"]:
        partner = np.arange(batch_size)  # unmixed: labels_b == labels_a
    return MixParams(mode, torch.from_numpy(np.ascontiguousarray(partner)), token_mask, lam.float(), blend)


def area_lambda(token_mask: torch.Tensor) -> torch.Tensor:
    """lam_area = mean of the token mask (exact; the reference code's n/S is off by up to 0.15
    when cells do not divide the image). (B, h, w) -> (B,) float32."""
    return token_mask.flatten(1).float().mean(1)


def _select_mask(token_mask: torch.Tensor, patch_size: int, layout: str) -> torch.Tensor:
    """(B, h, w) token mask -> the bool mask `_select_tokens` broadcasts, for the whole batch at
    once: HWC (B, h, 1, w, 1, 1) over a (h, P, w, P, C) view of each sample (contiguous P*C
    runs); CHW a (B, 1, H, W) pixel mask over channels (faster on CPU than P-element runs)."""
    b, h, w = token_mask.shape
    p, keep = patch_size, token_mask.bool()
    if layout == "HWC":
        return keep.view(b, h, 1, w, 1, 1)
    return keep.view(b, h, 1, w, 1).expand(b, h, p, w, p).reshape(b, 1, h * p, w * p)


def _select_tokens(image: torch.Tensor, other: torch.Tensor, out: torch.Tensor,
                   mask: torch.Tensor, patch_size: int, layout: str) -> None:
    """out <- image where mask (one sample's `_select_mask`), else other: one pass."""
    if layout == "HWC":
        hh, ww, c = image.shape
        shape = (hh // patch_size, patch_size, ww // patch_size, patch_size, c)
        torch.where(mask, image.view(shape), other.view(shape), out=out.view(shape))
    else:
        torch.where(mask, image, other, out=out)


def mix_samples(samples: Sequence[torch.Tensor], params: MixParams, *, patch_size: int,
                layout: str = "HWC", out: Sequence[torch.Tensor] | None = None
                ) -> list[torch.Tensor]:
    """Deterministic mixing of one batch given as its B samples (DALI's buffers), on their
    device; returns B tensors (``none`` mode: the inputs themselves), each written from its two
    sources directly, into ``out[i]`` when given (same shape and dtype: reused buffers) or a new
    tensor."""
    samples = list(samples)
    if params.mode == MODES["none"]:
        return samples
    mask = _select_mask(params.token_mask.to(samples[0].device, non_blocking=True), patch_size,
                        layout)
    lam, result = params.blend, []
    for i, j in enumerate(params.partner.tolist()):
        image, other = samples[i], samples[j]
        o = torch.empty_like(image) if out is None else out[i]
        if params.mode != MODES["mixup"]:
            _select_tokens(image, other, o, mask[i], patch_size, layout)
        elif image.is_floating_point():
            torch.lerp(other, image, lam, out=o)     # other + lam * (image - other): one pass
        else:
            o.copy_(image.float().mul_(lam).add_(other.float(), alpha=1.0 - lam)
                    .round_().clamp_(0, 255))
        result.append(o)
    return result


def apply_mix(images: torch.Tensor, params: MixParams, *, patch_size: int,
              layout: str = "HWC") -> torch.Tensor:
    """`mix_samples` for a dense batch (B, H, W, C) | (B, C, H, W): a new dense tensor."""
    return torch.stack(mix_samples(images.unbind(0), params, patch_size=patch_size,
                                   layout=layout))
