"""mixpro-dali: MixPro (MaskMix + Progressive Attention Labeling) as a DALI plugin.

Image side: `MixConfig` + `mix` (a DALI python-function operator, CPU and GPU).
Label side: `ClsAttention` + `mix_targets` + `soft_target_cross_entropy`.
"""
from .attention import ClsAttention
from .config import MODES, PRESETS, MixConfig
from .labels import MixTargets, attn_lambda, mix_targets, pal_alpha, soft_target_cross_entropy
from .masks import MixParams, apply_mix, area_lambda, mix_samples, sample_mix
from .operator import MaskMixOperator, MixOutputs, mix

__all__ = [
    "MODES", "PRESETS", "MixConfig", "MixParams", "apply_mix", "area_lambda", "mix_samples",
    "sample_mix",
    "MaskMixOperator", "MixOutputs", "mix",
    "ClsAttention", "MixTargets", "attn_lambda", "mix_targets", "pal_alpha",
    "soft_target_cross_entropy",
]
__version__ = "0.1.0"
