"""mixpro-dali: MixPro (MaskMix + Progressive Attention Labeling) as a DALI plugin.

Image side: `MixConfig` + `mix` (a DALI python-function operator, CPU and GPU).
Label side: `ClsAttention` + `mix_targets` + `soft_target_cross_entropy`.
Models: importing the package registers the class-attention variants of Swin and PVT v2 with
timm (`ca_swin_tiny_patch4_window7_224`, `ca_pvt_v2_b1`, ...; `mixpro_dali.ca_models`).
"""
from .attention import FAMILIES, ClsAttention, check_mask_patch
from .ca_models import CA_MODELS, CaPyramidVisionTransformerV2, CaSwinTransformer
from .config import MODES, PRESETS, MixConfig
from .labels import (MixTargets, attn_lambda, mix_targets, pal_alpha, pool_token_mask,
                     soft_target_cross_entropy)
from .masks import (MODE_TABLE, MixParams, Mode, apply_mix, area_lambda, mix_samples,
                    register_mode, sample_mix, stage_params, unregister_mode)
from .methods import METHODS, Method, get_method, register_method, unregister_method
from .operator import MaskMixOperator, MixOutputs, mix

__all__ = [
    "MODES", "PRESETS", "MixConfig", "METHODS", "Method", "get_method", "register_method",
    "unregister_method", "MODE_TABLE", "Mode", "register_mode", "unregister_mode",
    "MixParams", "apply_mix", "area_lambda", "stage_params",
    "mix_samples", "sample_mix",
    "MaskMixOperator", "MixOutputs", "mix",
    "ClsAttention", "FAMILIES", "check_mask_patch", "CA_MODELS", "CaSwinTransformer",
    "CaPyramidVisionTransformerV2", "MixTargets", "attn_lambda", "mix_targets", "pal_alpha",
    "pool_token_mask", "soft_target_cross_entropy",
]
__version__ = "0.1.0"
