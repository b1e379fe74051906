"""The training loss of each mixing method (DeiT's split: a loss that needs attention lives here).

method   MixConfig preset               targets (mixpro_dali.mix_targets)
none     none                           smoothed one-hot of label_a (lam = 1)
deit     deit (Mixup 0.5 / CutMix 0.5)  area / blend labels
maskmix  maskmix                        area labels (exact token share)
transmix transmix                       TransMix labels on CutMix batches (class attention)
mixpro   mixpro | mixpro-official       PAL on MaskMix batches (class attention), paper|official
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from mixpro_dali.attention import ClsAttention
from mixpro_dali.config import MixConfig
from mixpro_dali.labels import mix_targets, soft_target_cross_entropy

__all__ = ["LABEL_METHOD", "mix_config_for", "MixLoss"]

LABEL_METHOD = {"none": "area", "deit": "area", "maskmix": "area", "transmix": "transmix",
                "mixpro": "mixpro"}


def mix_config_for(method: str, preset: str, *, image_size: int, patch_size: int,
                   mask_patch: int, seed: int, options: Mapping[str, Any]) -> MixConfig:
    """The MixConfig the loader's MaskMix operator draws from, for a training method."""
    name = "mixpro-official" if (method, preset) == ("mixpro", "official") else method
    return MixConfig.preset(name, image_size=image_size, patch_size=patch_size,
                            mask_patch=mask_patch, seed=seed, **dict(options))


class MixLoss:
    """loss(logits, batch) -> (scalar loss, MixTargets). Holds the ClsAttention hooks when the
    labels need the class attention of the forward that produced `logits`. Given the loader's
    `mix_config`, its geometry is checked against the attention grid up front (CA-Swin /
    CA-PVT: MaskMix cells must be multiples of the final-stage stride)."""

    def __init__(self, model: nn.Module, *, method: str, preset: str, num_classes: int,
                 smoothing: float, mix_config: MixConfig | None = None) -> None:
        self.label_method = LABEL_METHOD[method]
        self.preset = preset
        self.num_classes = num_classes
        self.smoothing = smoothing
        self.attention = ClsAttention(model) if self.label_method != "area" else None
        if self.attention is not None and mix_config is not None:
            try:
                self.attention.check_mix_config(mix_config)
            except ValueError:
                self.attention.remove()
                raise

    def __call__(self, logits: torch.Tensor, batch: Mapping[str, torch.Tensor]):
        attn = self.attention.maps if self.attention is not None else None  # (B, h*w)
        t = mix_targets(logits, batch["label_a"], batch["label_b"], batch["lam"], batch["mode"],
                        batch["token_mask"], attn, num_classes=self.num_classes,
                        smoothing=self.smoothing, method=self.label_method, preset=self.preset)
        return soft_target_cross_entropy(logits, t.target), t

    def remove(self) -> None:
        if self.attention is not None:
            self.attention.remove()
