"""Class-attention (CA) heads for timm's hierarchical models: CA-Swin and CA-PVT v2.

TransMix, and MixPro after it, read the class token's attention in the last block. Swin and PVT
v2 have no class token, so their last block is replaced by a CaiT class-attention block: a
learned class token attends to [class token, final-stage tokens] (timm's `ClassAttn`), then an
MLP; the head reads the class token. Registered with timm on import (`import mixpro_dali`):

    model = timm.create_model("ca_swin_tiny_patch4_window7_224", num_classes=1000)

No parameter overhead: the CA block takes over the replaced block's LayerNorms, projections and
MLP (q/k/v are the rows of its fused qkv / kv weights). It drops what has no meaning for one
query token (Swin's relative-position bias table, PVT v2's depthwise conv in the MLP) and adds
the class token, so each model is slightly smaller than its backbone (`PARAMS` below, measured
at 1000 classes). `pretrained=True` loads the backbone's timm weights through the same mapping
(`ca_state_dict`); `pretrained_cfg_overlay=dict(file=...)` loads a local backbone checkpoint.

Follows the papers: the last block is replaced by a CA block with no parameter overhead, the
class token attends to the final-stage tokens (TransMix's CA-Swin; MixPro Table 1), and
the map A lives on the final-stage grid (7x7 at 224 px, stride 32). The papers are silent on:
LayerScale (none here: neither backbone uses it, and CaiT's 1e-5 init would silence the reused
weights), the class-token init (zero-mean normal, std 0.02, as CaiT), whether the final norm
sees the class token (yes, as CaiT: norm(cat[cls, tokens])), PVT v2 (PVT v1 carried a class
token through its whole last stage; timm ships v2, so v2 gets the same CA head as Swin) and
the MLP's depthwise conv there (dropped: a single token has no 3x3 neighbourhood).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import nn
from timm.layers import Mlp, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.cait import ClassAttn
from timm.models.pvt_v2 import PyramidVisionTransformerV2
from timm.models.pvt_v2 import checkpoint_filter_fn as pvt_filter
from timm.models.swin_transformer import SwinTransformer
from timm.models.swin_transformer import checkpoint_filter_fn as swin_filter

__all__ = ["ClassAttnBlock", "CaSwinTransformer", "CaPyramidVisionTransformerV2",
           "ca_state_dict", "CA_MODELS", "PARAMS"]

PARAMS = {  # name: (parameters of the CA model, of its timm backbone), 1000 classes
    "ca_swin_tiny_patch4_window7_224": (28_285_066, 28_288_354),
    "ca_swin_small_patch4_window7_224": (49_602_970, 49_606_258),
    "ca_swin_base_patch4_window7_224": (87_763_840, 87_768_224),
    "ca_pvt_v2_b0": (3_656_776, 3_666_760),
    "ca_pvt_v2_b1": (13_989_032, 14_009_000),
    "ca_pvt_v2_b2": (25_342_888, 25_362_856),
    "ca_pvt_v2_b3": (45_218_728, 45_238_696),
    "ca_pvt_v2_b4": (62_536_104, 62_556_072),
    "ca_pvt_v2_b5": (81_936_040, 81_956_008),
}
"""Swin: minus the relative-position table (169 x heads), plus the class token (C); PVT v2: minus
the depthwise conv (10 x hidden), plus the class token. Checked by tests/mixpro_dali/test_ca_models.py."""


class ClassAttnBlock(nn.Module):
    """CaiT's `LayerScaleBlockClassAttn` without LayerScale, built from the replaced block's
    modules: x_cls += attn(norm1([x_cls, x])); x_cls += mlp(norm2(x_cls)). (B, 1, C)."""

    def __init__(self, norm1: nn.Module, attn: ClassAttn, norm2: nn.Module, mlp: nn.Module,
                 drop_path: nn.Module) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = norm1, attn, norm2, mlp
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor, x_cls: torch.Tensor) -> torch.Tensor:
        u = torch.cat((x_cls, x), dim=1)  # (B, 1 + N, C)
        x_cls = x_cls + self.drop_path(self.attn(self.norm1(u)))
        return x_cls + self.drop_path(self.mlp(self.norm2(x_cls)))  # (B, 1, C)


def _class_attn(dim: int, num_heads: int, qkv: nn.Linear, proj: nn.Module,
                attn_drop: nn.Dropout, proj_drop: nn.Dropout) -> ClassAttn:
    """timm ClassAttn whose q, k, v are the rows [0:C], [C:2C], [2C:3C] of a fused `qkv`."""
    attn = ClassAttn(dim, num_heads=num_heads, qkv_bias=qkv.bias is not None,
                     attn_drop=attn_drop.p, proj_drop=proj_drop.p)
    with torch.no_grad():
        for i, lin in enumerate((attn.q, attn.k, attn.v)):
            lin.weight.copy_(qkv.weight[i * dim:(i + 1) * dim])
            if qkv.bias is not None:
                lin.bias.copy_(qkv.bias[i * dim:(i + 1) * dim])
    attn.proj = proj
    return attn


def _fused_qkv(q: nn.Linear, kv: nn.Linear) -> nn.Linear:
    fused = nn.Linear(q.in_features, 3 * q.out_features, bias=q.bias is not None)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([q.weight, kv.weight]))
        if q.bias is not None:
            fused.bias.copy_(torch.cat([q.bias, kv.bias]))
    return fused


def _init_cls_token(dim: int) -> nn.Parameter:
    token = nn.Parameter(torch.zeros(1, 1, dim))
    trunc_normal_(token, std=0.02)
    return token


# --- weights ----------------------------------------------------------------------------------
def ca_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module,
                  block_prefix: str, fused: str) -> dict[str, torch.Tensor]:
    """A backbone state dict (timm names) -> the CA model's: the replaced block's weights move to
    `ca_block` (q/k/v split from `fused`, 'qkv' for Swin, 'q'+'kv' for PVT v2), tensors without a
    counterpart are dropped, and the class token (absent from backbones) keeps the model's init."""
    dim = model.num_features
    out, block = {}, {}
    for k, v in state_dict.items():
        if k.startswith(block_prefix):
            block[k[len(block_prefix):]] = v
        else:
            out[k] = v
    if block:
        qkv = block["attn.qkv.weight"] if fused == "qkv" else torch.cat(
            [block["attn.q.weight"], block["attn.kv.weight"]])
        bias = block.get("attn.qkv.bias") if fused == "qkv" else (
            torch.cat([block["attn.q.bias"], block["attn.kv.bias"]])
            if "attn.q.bias" in block else None)
        for i, name in enumerate("qkv"):
            out[f"ca_block.attn.{name}.weight"] = qkv[i * dim:(i + 1) * dim]
            if bias is not None:
                out[f"ca_block.attn.{name}.bias"] = bias[i * dim:(i + 1) * dim]
        keep = ("norm1.", "norm2.", "attn.proj.", "mlp.fc1.", "mlp.fc2.")
        out.update({f"ca_block.{k}": v for k, v in block.items() if k.startswith(keep)})
    out.setdefault("cls_token", model.cls_token.detach().clone())
    return out


# --- CA-Swin ----------------------------------------------------------------------------------
class CaSwinTransformer(SwinTransformer):
    """Swin with its last block replaced by a class-attention block (TransMix's CA-Swin).

    forward_features: (B, 1 + h*w, C), class token first, after the final norm (h, w: the
    final-stage grid, 7x7 at 224 px). forward_head reads the class token.
    """

    def __init__(self, **kwargs: Any) -> None:
        if kwargs.pop("global_pool", "token") not in ("token", ""):
            raise ValueError("CaSwinTransformer: global_pool must be 'token' (the class token "
                             "is the pooled feature)")
        super().__init__(global_pool="", **kwargs)
        self.global_pool = "token"
        stage = self.layers[-1]
        if len(stage.blocks) < 1:
            raise ValueError("CaSwinTransformer: the last stage needs depth >= 1 (its last "
                             "block becomes the class-attention block)")
        blk = stage.blocks[-1]
        wa = blk.attn
        if wa.qkv.out_features != 3 * self.num_features:
            raise ValueError("CaSwinTransformer: head_dim must be num_features / num_heads in "
                             "the last stage (the CA block reuses its qkv weights)")
        attn = _class_attn(self.num_features, wa.num_heads, wa.qkv, wa.proj, wa.attn_drop,
                           wa.proj_drop)
        self.ca_block = ClassAttnBlock(blk.norm1, attn, blk.norm2, blk.mlp, blk.drop_path1)
        stage.blocks = stage.blocks[:-1]
        self.cls_token = _init_cls_token(self.num_features)
        self._block_prefix = f"layers.{len(self.layers) - 1}.blocks.{len(stage.blocks)}."

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        m = super().group_matcher(coarse)
        if not coarse:
            m["blocks"] = [*m["blocks"][:-1], (r"^cls_token|^ca_block", (99998,)),
                           m["blocks"][-1]]
        return m

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool not in (None, "token", ""):
            raise ValueError(f"CaSwinTransformer pools with its class token, got "
                             f"global_pool={global_pool!r}")
        super().reset_classifier(num_classes, None)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.patch_embed(x))  # (B, h, w, C)
        x = x.flatten(1, 2)  # (B, h*w, C)
        x_cls = self.ca_block(x, self.cls_token.expand(x.shape[0], -1, -1))  # (B, 1, C)
        return self.norm(torch.cat((x_cls, x), dim=1))  # (B, 1 + h*w, C)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x[:, 0], pre_logits=pre_logits)


# --- CA-PVT v2 --------------------------------------------------------------------------------
class CaPyramidVisionTransformerV2(PyramidVisionTransformerV2):
    """PVT v2 with its last block replaced by a class-attention block (CA-PVT).

    forward_features: (B, 1 + h*w, C), class token first, after the last stage's norm.
    """

    def __init__(self, **kwargs: Any) -> None:
        if kwargs.get("linear"):
            raise ValueError("CaPyramidVisionTransformerV2: linear=True (the '_li' variants) "
                             "pools the keys, so the class attention has no per-token map")
        if kwargs.pop("global_pool", "token") not in ("token", ""):
            raise ValueError("CaPyramidVisionTransformerV2: global_pool must be 'token'")
        super().__init__(global_pool="", **kwargs)
        self.global_pool = "token"
        stage = self.stages[-1]
        if len(stage.blocks) < 1:
            raise ValueError("CaPyramidVisionTransformerV2: the last stage needs depth >= 1")
        blk = stage.blocks[-1]
        pa = blk.attn
        if pa.sr is not None:
            raise ValueError("CaPyramidVisionTransformerV2: the last stage must have "
                             "sr_ratio 1 (the class token attends to every final-stage token)")
        attn = _class_attn(self.num_features, pa.num_heads, _fused_qkv(pa.q, pa.kv), pa.proj,
                           pa.attn_drop, pa.proj_drop)
        mlp = Mlp(self.num_features, blk.mlp.fc1.out_features, act_layer=type(blk.mlp.act),
                  drop=blk.mlp.drop.p)
        mlp.fc1, mlp.fc2 = blk.mlp.fc1, blk.mlp.fc2
        self.ca_block = ClassAttnBlock(blk.norm1, attn, blk.norm2, mlp, blk.drop_path1)
        stage.blocks = stage.blocks[:-1]
        self.cls_token = _init_cls_token(self.num_features)
        self._block_prefix = f"stages.{len(self.stages) - 1}.blocks.{len(stage.blocks)}."

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"cls_token"}

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool not in (None, "token", ""):
            raise ValueError(f"CaPyramidVisionTransformerV2 pools with its class token, got "
                             f"global_pool={global_pool!r}")
        super().reset_classifier(num_classes, None)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages[:-1](self.patch_embed(x))
        stage = self.stages[-1]  # PyramidVisionTransformerStage.forward up to its norm
        x = stage.downsample(x) if stage.downsample is not None else x  # (B, h, w, C)
        B, H, W, C = x.shape
        x = x.reshape(B, H * W, C)
        for blk in stage.blocks:
            x = blk(x, (H, W))
        x_cls = self.ca_block(x, self.cls_token.expand(B, -1, -1))  # (B, 1, C)
        return stage.norm(torch.cat((x_cls, x), dim=1))  # (B, 1 + h*w, C)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x[:, 0])
        return x if pre_logits else self.head(x)


# --- registration -----------------------------------------------------------------------------
def _filter(backbone_filter: Callable, fused: str) -> Callable:
    def fn(state_dict: dict, model: nn.Module) -> dict:
        sd = state_dict.get("model", state_dict)
        sd = sd.get("state_dict", sd)
        if fused == "qkv":  # Swin's filter resizes position tables of blocks it finds
            block = {k: v for k, v in sd.items() if k.startswith(model._block_prefix)}
            rest = backbone_filter({k: v for k, v in sd.items() if k not in block}, model)
            return ca_state_dict({**rest, **block}, model, model._block_prefix, fused)
        return ca_state_dict(backbone_filter(sd, model), model, model._block_prefix, fused)
    return fn


def _cfg(backbone: str, **kwargs: Any) -> dict[str, Any]:
    """The backbone's weights (timm's hub); the CA block is initialized from its last block."""
    return {"hf_hub_id": f"timm/{backbone}", "num_classes": 1000, "input_size": (3, 224, 224),
            "pool_size": (7, 7), "crop_pct": 0.9, "interpolation": "bicubic",
            "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
            "first_conv": "patch_embed.proj", "license": "mit", **kwargs}


SWIN = {  # name: (embed_dim, depths, num_heads, backbone weights)
    "ca_swin_tiny_patch4_window7_224": (96, (2, 2, 6, 2), (3, 6, 12, 24),
                                        "swin_tiny_patch4_window7_224.ms_in1k"),
    "ca_swin_small_patch4_window7_224": (96, (2, 2, 18, 2), (3, 6, 12, 24),
                                         "swin_small_patch4_window7_224.ms_in1k"),
    "ca_swin_base_patch4_window7_224": (128, (2, 2, 18, 2), (4, 8, 16, 32),
                                        "swin_base_patch4_window7_224.ms_in1k"),
}
PVT = {  # name: (depths, embed_dims, mlp_ratios)
    f"ca_pvt_v2_b{i}": (d, e, r) for i, (d, e, r) in enumerate([
        ((2, 2, 2, 2), (32, 64, 160, 256), (8, 8, 4, 4)),
        ((2, 2, 2, 2), (64, 128, 320, 512), (8, 8, 4, 4)),
        ((3, 4, 6, 3), (64, 128, 320, 512), (8, 8, 4, 4)),
        ((3, 4, 18, 3), (64, 128, 320, 512), (8, 8, 4, 4)),
        ((3, 8, 27, 3), (64, 128, 320, 512), (8, 8, 4, 4)),
        ((3, 6, 40, 3), (64, 128, 320, 512), (4, 4, 4, 4)),
    ])
}
CA_MODELS = (*SWIN, *PVT)

default_cfgs = generate_default_cfgs({
    **{f"{n}.ms_in1k": _cfg(w, classifier="head.fc", fixed_input_size=True)
       for n, (*_, w) in SWIN.items()},
    **{f"{n}.in1k": _cfg(f"{n[3:]}.in1k", classifier="head", license="apache-2.0")
       for n in PVT},
})


def _feature_cfg(kwargs: dict) -> dict[str, Any]:
    """features_only=True: the stage outputs, as timm builds them for the backbones (the last
    stage's output then lacks the replaced block; the CA block is a head)."""
    return dict(flatten_sequential=True, out_indices=kwargs.pop("out_indices", (0, 1, 2, 3)))


def _swin_builder(name: str) -> Callable[..., CaSwinTransformer]:
    embed_dim, depths, num_heads, _ = SWIN[name]

    def create(pretrained: bool = False, **kwargs: Any) -> CaSwinTransformer:
        args = dict(patch_size=4, window_size=7, embed_dim=embed_dim, depths=depths,
                    num_heads=num_heads)
        return build_model_with_cfg(CaSwinTransformer, name, pretrained,
                                    pretrained_filter_fn=_filter(swin_filter, "qkv"),
                                    feature_cfg=_feature_cfg(kwargs), **{**args, **kwargs})
    create.__name__ = create.__qualname__ = name
    create.__doc__ = f"CA-Swin: {name[3:]} with a class-attention last block."
    create.__module__ = __name__
    return create


def _pvt_builder(name: str) -> Callable[..., CaPyramidVisionTransformerV2]:
    depths, embed_dims, mlp_ratios = PVT[name]

    def create(pretrained: bool = False, **kwargs: Any) -> CaPyramidVisionTransformerV2:
        args = dict(depths=depths, embed_dims=embed_dims, num_heads=(1, 2, 5, 8),
                    mlp_ratios=mlp_ratios)
        return build_model_with_cfg(CaPyramidVisionTransformerV2, name, pretrained,
                                    pretrained_filter_fn=_filter(pvt_filter, "q+kv"),
                                    feature_cfg=_feature_cfg(kwargs), **{**args, **kwargs})
    create.__name__ = create.__qualname__ = name
    create.__doc__ = f"CA-PVT: {name[3:]} with a class-attention last block."
    create.__module__ = __name__
    return create


for _name in SWIN:
    globals()[_name] = register_model(_swin_builder(_name))
for _name in PVT:
    globals()[_name] = register_model(_pvt_builder(_name))
