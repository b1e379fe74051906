"""The training loss of each mixing method (DeiT's split: a loss that needs attention lives here).

Each method's MixConfig preset and label rule come from its row in `mixpro_dali.methods`
(none/deit/maskmix: area labels; transmix: TransMix on CutMix rows; mixpro / mixpro-official:
PAL on MaskMix rows, paper / official variant). The trainer's `mix.label_variant: official`
picks the official variant of `mix.method` (`resolve_method`).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from mixpro_dali.attention import ClsAttention
from mixpro_dali.config import MixConfig
from mixpro_dali.labels import mix_targets, soft_target_cross_entropy
from mixpro_dali.methods import METHODS, resolve_method

__all__ = ["LABEL_METHOD", "mix_config_for", "MixLoss"]


def __getattr__(name: str) -> Any:
    if name == "LABEL_METHOD":  # the old method -> mix_targets rule table, from the registry
        return {n: m.label for n, m in METHODS.items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def mix_config_for(method: str, label_variant: str | None = None, *, image_size: int,
                   patch_size: int, mask_patch: int, seed: int,
                   options: Mapping[str, Any]) -> MixConfig:
    """The MixConfig the loader's MaskMix operator draws from, for a training method (and the
    trainer's `mix.label_variant`: 'official' picks the method's official variant)."""
    name = resolve_method(method, label_variant).name
    return MixConfig.preset(name, image_size=image_size, patch_size=patch_size,
                            mask_patch=mask_patch, seed=seed, **dict(options))


class MixLoss:
    """loss(logits, batch) -> (scalar loss, MixTargets). Holds the ClsAttention hooks when the
    labels need the class attention of the forward that produced `logits`. Given the loader's
    `mix_config`, its geometry is checked against the attention grid up front (CA-Swin /
    CA-PVT: MaskMix cells must be multiples of the final-stage stride)."""

    def __init__(self, model: nn.Module, *, method: str, label_variant: str | None = None,
                 num_classes: int, smoothing: float,
                 mix_config: MixConfig | None = None) -> None:
        row = resolve_method(method, label_variant)
        self.method = row.name
        self.label_method = row.label
        self.label_variant = row.label_variant
        self.label_modes = row.attention_modes
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
                        smoothing=self.smoothing, method=self.label_method,
                        label_variant=self.label_variant, label_modes=self.label_modes)
        return soft_target_cross_entropy(logits, t.target), t

    def remove(self) -> None:
        if self.attention is not None:
            self.attention.remove()
