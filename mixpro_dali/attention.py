"""ClsAttention: the attention map A of MixPro (PAL) and TransMix, read off a stock timm model.

A is the class token's attention over the patch tokens in the model's last attention block,
averaged over heads, prefix tokens (cls, dist, registers) dropped, renormalized to sum 1, detached.
The reference code patches timm's ViT to turn fused attention off and return the full N x N
matrix; we keep fused attention and hook the tensors the forward already computes (q and k after
their norms), then compute only the class-token row: softmax(q_cls . K^T * scale), (B, heads, N).

Worked example: 1 head, 1 prefix token, scores [0, ln 2, ln 2, ln 4] give softmax
[1, 2, 2, 4] / 9; dropping the cls entry and renormalizing gives A = [0.25, 0.25, 0.5].

Supported, one `Family` adapter each (`FAMILIES`): timm VisionTransformer family (ViT, DeiT,
DeiT distilled, register tokens, qk-norm; timm `Attention` in the last block), CaiT and XCiT
(their last class-attention block), and CA-Swin / CA-PVT v2 (`mixpro_dali.ca_models`: the
class-attention block that replaces their last block). For the hierarchical two, A lives on the
final-stage grid (7x7 at 224 px, stride 32 px: `ClsAttention.stride`), coarser than the patch
grid of the token mask; `mix_targets` pools the mask onto it, and MaskMix cells must be
multiples of that stride (`check_mask_patch`). Models without a class token (plain Swin, PVT v2,
ConvNets) are refused: only area labels apply there.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import nn
from timm.layers import Attention
from timm.models.cait import Cait, ClassAttn
from timm.models.vision_transformer import VisionTransformer
from timm.models.xcit import Xcit

from .ca_models import CaPyramidVisionTransformerV2, CaSwinTransformer

__all__ = ["ClsAttention", "Family", "FAMILIES", "SUPPORTED_MODELS", "check_mask_patch",
           "cls_attention_row"]


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def cls_attention_row(q_cls: torch.Tensor, k: torch.Tensor, scale: float,
                      num_prefix_tokens: int) -> torch.Tensor:
    """A from the class query and all keys, in float32.

    q_cls: (B, heads, d); k: (B, heads, N, d) with the class token at index 0 and
    `num_prefix_tokens` prefix tokens first. Returns (B, N - num_prefix_tokens), rows sum to 1.
    """
    with _no_autocast(k.device):
        scores = torch.einsum("bhd,bhnd->bhn", q_cls.float(), k.float()) * scale  # (B, heads, N)
        attn = scores.softmax(dim=-1).mean(dim=1)[:, num_prefix_tokens:]  # (B, h*w)
        return attn / attn.sum(dim=-1, keepdim=True)


def _unsupported(model: nn.Module, what: str) -> TypeError:
    return TypeError(
        f"ClsAttention: {type(model).__name__} is not supported ({what}); supported: "
        f"{SUPPORTED_MODELS}. Only area labels (method='area') are available for it."
    )


def _last(blocks: Any) -> nn.Module | None:
    return blocks[-1] if blocks is not None and len(blocks) > 0 else None


Hook = Callable[..., Any]


class Family:
    """A model family: where its class-token query and keys are, and how to read them.

    `locate` returns the attention module of the block that holds A and the number of prefix
    tokens among its keys; `attach` hooks the tensors the forward already computes; `query_keys`
    turns them into q_cls (B, heads, d), keys (B, heads, N, d) and the softmax scale.
    """

    name: str = ""
    types: tuple[type, ...] = ()

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, self.types)

    def locate(self, model: nn.Module) -> tuple[nn.Module, int]:
        raise NotImplementedError

    def attach(self, attn: nn.Module, on_q: Hook, on_k: Hook, check: Hook) -> list:
        raise NotImplementedError

    def query_keys(self, attn: nn.Module, q: torch.Tensor, k: torch.Tensor):
        raise NotImplementedError


class TimmAttentionFamily(Family):
    """ViT/DeiT (distilled, registers, qk-norm): timm `Attention` of the last block; q and k
    are read at the outputs of q_norm / k_norm (Identity without qk-norm), as SDPA gets them."""

    name, types = "timm VisionTransformer family", (VisionTransformer,)

    def locate(self, model: nn.Module) -> tuple[nn.Module, int]:
        attn = getattr(_last(model.blocks), "attn", None)
        if not isinstance(attn, Attention) or type(attn).forward is not Attention.forward:
            raise _unsupported(model, f"last block attention is {type(attn).__name__}, "
                                      "not timm.layers.Attention")
        if not isinstance(model.patch_drop, nn.Identity):
            raise _unsupported(model, "patch dropout drops tokens, so A no longer lines up "
                                      "with the token mask; build it with patch_drop_rate=0")
        return attn, int(model.num_prefix_tokens)

    def attach(self, attn: nn.Module, on_q: Hook, on_k: Hook, check: Hook) -> list:
        return [attn.register_forward_pre_hook(check, with_kwargs=True),
                attn.q_norm.register_forward_hook(on_q),
                attn.k_norm.register_forward_hook(on_k)]

    def query_keys(self, attn: nn.Module, q: torch.Tensor, k: torch.Tensor):
        assert q.ndim == 4 and k.shape == q.shape, "unexpected timm Attention layout"
        scale = q.shape[-1] ** -0.5 if attn.fused_attn else attn.scale  # SDPA default
        return q[:, :, 0], k, scale  # (B, heads, d), (B, heads, N, d)


class ClassAttnFamily(Family):
    """Models whose A is the class token's row in a timm `ClassAttn` (CaiT's class-attention
    layers): q = Linear(x[:, 0]) (B, C), k = Linear(x) (B, N, C), keys = [cls, tokens]."""

    def __init__(self, name: str, types: tuple[type, ...], blocks: Callable) -> None:
        self.name, self.types, self._blocks = name, types, blocks

    def locate(self, model: nn.Module) -> tuple[nn.Module, int]:
        attn = getattr(_last(self._blocks(model)), "attn", None)
        if not isinstance(attn, ClassAttn) or type(attn).forward is not ClassAttn.forward:
            raise _unsupported(model, f"last class-attention block uses {type(attn).__name__}, "
                                      "not timm's ClassAttn")
        return attn, 1  # the class token attends to [cls, tokens]

    def attach(self, attn: nn.Module, on_q: Hook, on_k: Hook, check: Hook) -> list:
        return [attn.q.register_forward_hook(on_q), attn.k.register_forward_hook(on_k)]

    def query_keys(self, attn: nn.Module, q: torch.Tensor, k: torch.Tensor):
        B, N, C = k.shape
        h = attn.num_heads
        q_cls = q.reshape(B, h, C // h)  # (B, heads, d)
        k = k.reshape(B, N, h, C // h).transpose(1, 2)  # (B, heads, N, d)
        scale = (C // h) ** -0.5 if attn.fused_attn else attn.scale  # SDPA default
        return q_cls, k, scale


FAMILIES: tuple[Family, ...] = (
    ClassAttnFamily("CA-Swin / CA-PVT v2 (mixpro_dali.ca_models)",
                    (CaSwinTransformer, CaPyramidVisionTransformerV2), lambda m: [m.ca_block]),
    ClassAttnFamily("Cait", (Cait,), lambda m: m.blocks_token_only),
    ClassAttnFamily("Xcit", (Xcit,), lambda m: m.cls_attn_blocks),
    TimmAttentionFamily(),
)
"""Tried in order; the first whose `matches` is true reads the model. Adding a family is a row."""

SUPPORTED_MODELS = ", ".join(f.name for f in reversed(FAMILIES))

_CA_HINT = {  # hierarchical backbones with a class-attention variant in mixpro_dali.ca_models
    "SwinTransformer": "ca_swin_tiny_patch4_window7_224 (or ca_swin_small/base)",
    "PyramidVisionTransformerV2": "ca_pvt_v2_b0 ... ca_pvt_v2_b5",
}


def _family(model: nn.Module) -> Family:
    """The family that reads `model`, or a clear error."""
    name = type(model).__name__
    if getattr(model, "cls_token", None) is None:
        hint = _CA_HINT.get(name)
        hint = (f"; for PAL/TransMix use its class-attention variant {hint}, built by "
                "timm.create_model once mixpro_dali is imported") if hint else ""
        raise ValueError(
            f"ClsAttention: {name} has no class token, so it has no class attention map; "
            f"only area labels (method='area') are available for it{hint}."
        )
    for family in FAMILIES:
        if family.matches(model):
            return family
    raise _unsupported(model, "unknown architecture")


def check_mask_patch(mask_patch: int, stride: int, model_name: str = "the model") -> None:
    """MaskMix cells must be whole tokens of the grid A lives on (the final stage of CA-Swin /
    CA-PVT: stride 32 px), or a final-stage token would hold pixels of both images."""
    if mask_patch % stride:
        lo = max(mask_patch // stride, 1) * stride
        raise ValueError(
            f"mask_patch={mask_patch} px is not a multiple of the final-stage stride "
            f"({stride} px) of {model_name}: its class attention reads final-stage tokens, and "
            f"each must come from one image; use mask_patch {lo} or {lo + stride}"
        )


class ClsAttention:
    """Attach to a timm model; after each forward, `maps` is A: (B, h*w) float32, detached.

    Hooks only read tensors of the last attention block (fused attention stays on, outputs are
    unchanged). Use as a context manager, or keep it and call `remove()` when done:

        with ClsAttention(model) as cls_attn:
            logits = model(images)
            attn = cls_attn.maps          # (B, h*w), rows sum to 1

    `maps` holds the most recent forward of the model (including eval forwards). Attention
    dropout, if any, is not applied to A (as in the reference code). Attach before
    `torch.compile`; DDP/DataParallel wrappers are looked through.
    """

    def __init__(self, model: nn.Module) -> None:
        while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        self.model_name = type(model).__name__
        self.family = _family(model)
        self._attn, self.num_prefix_tokens = self.family.locate(model)
        info = getattr(model, "feature_info", None)
        self.stride: int | None = int(info[-1]["reduction"]) if info else None
        """Pixels per token of the grid A lives on (patch size; 32 for CA-Swin-T / CA-PVT)."""
        self._q: torch.Tensor | None = None
        self._maps: torch.Tensor | None = None
        self._problem: str | None = None
        self._hooks = self.family.attach(self._attn, self._on_q, self._on_k, self._check_mask)
        self._hooks.append(model.register_forward_pre_hook(self._reset))

    # -- hooks --------------------------------------------------------------------------------
    def _reset(self, module: nn.Module, args: Any) -> None:
        self._q, self._maps, self._problem = None, None, None

    def _check_mask(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._q, self._problem = None, None
        if len(args) > 1 or kwargs.get("attn_mask") is not None or kwargs.get("is_causal"):
            self._problem = (f"the last forward of {self.model_name} passed an attention mask "
                             "or is_causal to the last block; ClsAttention does not model masks")

    def _on_q(self, module: nn.Module, args: Any, out: torch.Tensor) -> None:
        self._q = out

    def _on_k(self, module: nn.Module, args: Any, k: torch.Tensor) -> None:
        q, self._q = self._q, None
        assert q is not None, "q hook did not fire before k hook"
        with torch.no_grad():
            q_cls, k, scale = self.family.query_keys(self._attn, q, k)
            self._maps = cls_attention_row(q_cls, k, scale, self.num_prefix_tokens)

    # -- public -------------------------------------------------------------------------------
    @property
    def maps(self) -> torch.Tensor:
        """A of the last forward: (B, h*w) float32, rows sum to 1, no gradient."""
        if self._problem is not None:
            raise RuntimeError(f"ClsAttention.maps: {self._problem}")
        if self._maps is None:
            raise RuntimeError(
                f"ClsAttention.maps: no forward pass of {self.model_name} has completed since "
                "ClsAttention was attached; call the model first"
            )
        return self._maps

    def check_mask_patch(self, mask_patch: int) -> None:
        """Raise ValueError unless MaskMix cells of `mask_patch` px are whole tokens of A's grid."""
        if self.stride is not None:
            check_mask_patch(mask_patch, self.stride, self.model_name)

    def check_mix_config(self, config: Any) -> None:
        """A MixConfig's geometry against A's grid: the image a whole number of A's tokens, and
        (when it draws MaskMix) cells that are multiples of the stride. ValueError otherwise."""
        if self.stride is None:
            return
        h, w = config.image_size
        if h % self.stride or w % self.stride:
            raise ValueError(f"image size {h}x{w} is not a multiple of the final-stage stride "
                             f"({self.stride} px) of {self.model_name}, so its class-attention "
                             f"grid does not tile the token mask; use a multiple of {self.stride}")
        if config.probs.get("maskmix", 0.0) > 0:
            self.check_mask_patch(config.mask_patch)

    @property
    def attached(self) -> bool:
        return bool(self._hooks)

    def remove(self) -> None:
        """Detach every hook from the model (idempotent). The last `maps` stays readable."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def __enter__(self) -> "ClsAttention":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "attached" if self.attached else "removed"
        return (f"ClsAttention({self.model_name}, prefix_tokens={self.num_prefix_tokens}, "
                f"{state})")
