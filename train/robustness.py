"""Occlusion robustness by patch dropping (Naseer et al. 2021, "Intriguing Properties of Vision
Transformers", sec. 3.1; the MixPro paper's occlusion study follows it).

A fraction `ratio` of the model's patches (its own P x P token grid) is dropped, in one of three
orders, each a permutation of the h*w tokens per image:
  random       a uniformly random order per image;
  salient      the most attended first: the model's own class-token attention on the clean
               image (mixpro_dali.ClsAttention, last block, heads averaged);
  non_salient  the least attended first.
k = floor(ratio * h*w + 1e-9) tokens are dropped (Naseer: `drop_count * 196 // 10`). The same
order serves every ratio, so the dropped sets are nested (smoother curves, fewer draws).

Two ways to drop (`drop`):
  pixels  (default, Naseer's PatchDrop; works for any patch model) the patch's pixels are set
          to 0 in the raw image, i.e. to -mean/std per channel in the normalized tensor the
          model sees. Naseer draws one random set per batch; we draw one per image.
  tokens  the patch tokens are removed after patch embedding + position embedding (timm
          VisionTransformer only): the model sees fewer tokens, no black squares.
Worked example: a 2x2 grid, attention [0.1, 0.4, 0.2, 0.3], ratio 0.5 -> k = 2; salient drops
tokens 1 and 3, non_salient drops 0 and 2.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from timm.models.vision_transformer import VisionTransformer

__all__ = ["DROP_MODES", "DROP_KINDS", "drop_count", "sample_drop_order", "drop_order",
           "keep_mask", "apply_pixel_drop", "forward_kept_tokens"]

DROP_MODES = ("random", "salient", "non_salient")
DROP_KINDS = ("pixels", "tokens")


def drop_count(ratio: float, num_tokens: int) -> int:
    """floor(ratio * num_tokens): 0.3 of 64 tokens -> 19."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"drop ratio must be in [0, 1), got {ratio}")
    return int(math.floor(ratio * num_tokens + 1e-9))


def sample_drop_order(batch: int, num_tokens: int, generator: torch.Generator,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """A uniformly random drop order per image: (B, N) long (drawn on the CPU generator)."""
    return torch.rand(batch, num_tokens, generator=generator).argsort(dim=1).to(device)


def drop_order(mode: str, attn: torch.Tensor | None = None, *, batch: int | None = None,
               num_tokens: int | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, N) token indices in the order they are dropped. attn: (B, h*w) for the salient modes;
    ties keep the lower index first (stable sort)."""
    if mode == "random":
        if batch is None or num_tokens is None or generator is None:
            raise ValueError("random drop order needs batch, num_tokens and generator")
        device = attn.device if attn is not None else "cpu"
        return sample_drop_order(batch, num_tokens, generator, device)
    if mode not in DROP_MODES:
        raise ValueError(f"drop mode must be one of {DROP_MODES}, got {mode!r}")
    if attn is None:
        raise ValueError(f"drop mode {mode!r} needs the class attention map (B, h*w); this "
                         "model has none (no class token): use the 'random' mode only")
    return attn.argsort(dim=1, descending=(mode == "salient"), stable=True)


def keep_mask(order: torch.Tensor, k: int, grid: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) bool, False where one of the first k tokens of `order` sits."""
    B, N = order.shape
    assert N == grid[0] * grid[1], "order length must equal the token grid size"
    keep = torch.ones(B, N, dtype=torch.bool, device=order.device)
    keep.scatter_(1, order[:, :k], False)
    return keep.view(B, *grid)


def apply_pixel_drop(images: torch.Tensor, keep: torch.Tensor,
                     fill: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """images (B, C, H, W) with every dropped patch set to `fill` (C,) (a new tensor).
    keep: (B, h, w) bool; H, W must be multiples of h, w (the patch size)."""
    B, C, H, W = images.shape
    h, w = keep.shape[1:]
    if H % h or W % w:
        raise ValueError(f"image {H}x{W} is not a whole number of {h}x{w} patches")
    pixel_keep = keep.repeat_interleave(H // h, 1).repeat_interleave(W // w, 2)  # (B, H, W)
    fill_t = torch.as_tensor(fill, dtype=images.dtype, device=images.device).view(1, C, 1, 1)
    return torch.where(pixel_keep[:, None], images, fill_t)


def forward_kept_tokens(model: nn.Module, images: torch.Tensor,
                        keep: torch.Tensor) -> torch.Tensor:
    """Logits of a timm VisionTransformer that sees only the kept patch tokens (prefix tokens
    always kept). keep: (B, h, w) bool with the same number of kept tokens in every row."""
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"drop='tokens' needs a timm VisionTransformer, got "
                         f"{type(model).__name__}; use drop='pixels'")
    flat = keep.flatten(1)  # (B, N)
    n_keep = flat.sum(dim=1)
    if not bool((n_keep == n_keep[0]).all()):
        raise ValueError("every image must keep the same number of tokens")
    idx = flat.nonzero()[:, 1].view(flat.shape[0], -1)  # (B, n_keep), ascending
    # timm's public forward_features runs patch_embed, the position embedding, patch_drop,
    # norm_pre, blocks, norm: the selection takes patch_drop's place (an identity in eval)
    saved = model.patch_drop
    model.patch_drop = _KeepTokens(idx, model.num_prefix_tokens)
    try:
        x = model.forward_features(images)
    finally:
        model.patch_drop = saved
    return model.forward_head(x)


class _KeepTokens(nn.Module):
    """(B, P + N, C) tokens -> the P prefix tokens and the patch tokens at idx (B, n_keep)."""

    def __init__(self, idx: torch.Tensor, prefix: int) -> None:
        super().__init__()
        self.idx, self.prefix = idx, prefix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        P = self.prefix
        patches = x[:, P:].gather(1, self.idx[..., None].expand(-1, -1, x.shape[-1]))
        return torch.cat([x[:, :P], patches], dim=1)
