"""ClsAttention: the attention map A of MixPro (method.md section 2), read off a stock timm model.

A is the class token's attention over the patch tokens in the model's last attention block,
averaged over heads, prefix tokens (cls, dist, registers) dropped, renormalized to sum 1, detached.
The reference code patches timm's ViT to turn fused attention off and return the full N x N
matrix; we keep fused attention and hook the tensors the forward already computes (q and k after
their norms), then compute only the class-token row: softmax(q_cls . K^T * scale), (B, heads, N).

Worked example: 1 head, 1 prefix token, scores [0, ln 2, ln 2, ln 4] give softmax
[1, 2, 2, 4] / 9; dropping the cls entry and renormalizing gives A = [0.25, 0.25, 0.5].

Supported: timm VisionTransformer family (ViT, DeiT, DeiT distilled, register tokens, qk-norm;
timm `Attention` in the last block), CaiT and XCiT (their last class-attention block).
Models without a class token (Swin, PVT, ConvNets) are refused: only area labels apply there.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from timm.layers import Attention
from timm.models.cait import Cait, ClassAttn
from timm.models.vision_transformer import VisionTransformer
from timm.models.xcit import Xcit

__all__ = ["ClsAttention", "SUPPORTED_MODELS"]

SUPPORTED_MODELS = (
    "timm VisionTransformer family (ViT, DeiT, DeiT distilled, register tokens, qk-norm), "
    "Cait, Xcit"
)


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


def _locate(model: nn.Module) -> tuple[str, nn.Module, int]:
    """(kind, attention module of the last block, number of prefix tokens) or a clear error."""
    name = type(model).__name__
    if getattr(model, "cls_token", None) is None:
        raise ValueError(
            f"ClsAttention: {name} has no class token, so it has no class attention map; "
            "only area labels (method='area') are available for it."
        )
    if isinstance(model, VisionTransformer):
        attn = getattr(_last(model.blocks), "attn", None)
        if not isinstance(attn, Attention) or type(attn).forward is not Attention.forward:
            raise _unsupported(model, f"last block attention is {type(attn).__name__}, "
                                      "not timm.layers.Attention")
        if not isinstance(model.patch_drop, nn.Identity):
            raise _unsupported(model, "patch dropout drops tokens, so A no longer lines up "
                                      "with the token mask; build it with patch_drop_rate=0")
        return "vit", attn, int(model.num_prefix_tokens)
    if isinstance(model, (Cait, Xcit)):
        blocks = model.blocks_token_only if isinstance(model, Cait) else model.cls_attn_blocks
        attn = getattr(_last(blocks), "attn", None)
        if not isinstance(attn, ClassAttn) or type(attn).forward is not ClassAttn.forward:
            raise _unsupported(model, f"last class-attention block uses {type(attn).__name__}, "
                                      "not timm's ClassAttn")
        return "class_attn", attn, 1  # the class token attends to [cls, patches]
    raise _unsupported(model, "unknown architecture")


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
        self._kind, self._attn, self.num_prefix_tokens = _locate(model)
        self._q: torch.Tensor | None = None
        self._maps: torch.Tensor | None = None
        self._problem: str | None = None
        attn = self._attn
        if self._kind == "vit":  # q_norm / k_norm outputs (Identity without qk-norm) feed SDPA
            hooks = [attn.register_forward_pre_hook(self._check_mask, with_kwargs=True),
                     attn.q_norm.register_forward_hook(self._on_q),
                     attn.k_norm.register_forward_hook(self._on_k)]
        else:  # ClassAttn: q = Linear(x[:, 0]) (B, C), k = Linear(x) (B, N, C)
            hooks = [attn.q.register_forward_hook(self._on_q),
                     attn.k.register_forward_hook(self._on_k)]
        hooks.append(model.register_forward_pre_hook(self._reset))
        self._hooks = hooks

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
        attn = self._attn
        with torch.no_grad():
            if self._kind == "vit":  # q, k: (B, heads, N, d) exactly as SDPA receives them
                assert q.ndim == 4 and k.shape == q.shape, "unexpected timm Attention layout"
                q_cls = q[:, :, 0]  # (B, heads, d)
                scale = q.shape[-1] ** -0.5 if attn.fused_attn else attn.scale  # SDPA default
            else:
                B, N, C = k.shape
                q_cls = q.reshape(B, attn.num_heads, C // attn.num_heads)  # (B, heads, d)
                k = k.reshape(B, N, attn.num_heads, C // attn.num_heads).transpose(1, 2)
                scale = q_cls.shape[-1] ** -0.5 if attn.fused_attn else attn.scale
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
