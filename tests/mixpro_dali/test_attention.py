"""ClsAttention against the explicit (non-fused) softmax of the same weights, per timm family."""
import copy
import math

import pytest
import timm
import torch
from torch import nn

from mixpro_dali.attention import ClsAttention, cls_attention_row
from hook_checks import assert_hook_transparent

SMALL = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3, num_classes=10)
# name -> (timm model, kwargs, number of prefix tokens); all 4x4 = 16 patch tokens
FAMILIES = {
    "deit": ("deit_tiny_patch16_224", {}, 1),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {}, 2),
    "vit_reg4_qknorm": ("vit_small_patch16_224",
                        dict(reg_tokens=4, qk_norm=True, no_embed_class=True), 5),
    "vit_avgpool_layerscale": ("vit_small_patch16_224",
                               dict(global_pool="avg", init_values=1e-5, qkv_bias=False), 1),
    "cait": ("cait_xxs24_224", dict(depth_token_only=2), 1),
    "xcit": ("xcit_nano_12_p16_224", dict(cls_attn_layers=2), 1),
}


def make(family, **extra):
    name, kw, _ = FAMILIES[family]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **{**SMALL, **kw, **extra})
    with torch.no_grad():  # break init symmetries (zero cls token, near-zero layer scales)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def last_attn(model):
    if hasattr(model, "blocks_token_only"):
        return model.blocks_token_only[-1].attn
    if hasattr(model, "cls_attn_blocks"):
        return model.cls_attn_blocks[-1].attn
    return model.blocks[-1].attn


def explicit_maps(model, x, prefix):
    """Slow reference: a copy with fused attention off, the softmax read at its attn_drop."""
    ref = copy.deepcopy(model)
    attn = last_attn(ref)
    attn.fused_attn = False
    seen = {}
    attn.attn_drop.register_forward_hook(lambda m, i, o: seen.setdefault("p", i[0]))
    with torch.no_grad():
        ref(x)
    probs = seen["p"]  # (B, heads, N, N) or (B, heads, 1, N) for class attention
    a = probs[:, :, 0, :].mean(dim=1)[:, prefix:]
    return a / a.sum(dim=1, keepdim=True)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_maps_equal_the_non_fused_softmax(family):
    model = make(family).eval()
    x = torch.randn(5, 3, 32, 32)
    cls_attn = ClsAttention(model)
    assert last_attn(model).fused_attn  # the forward stays on the fused path
    assert cls_attn.num_prefix_tokens == FAMILIES[family][2]
    with torch.no_grad():
        model(x)
    maps = cls_attn.maps
    ref = explicit_maps(model, x, FAMILIES[family][2])
    assert maps.shape == (5, 16) and maps.dtype == torch.float32
    torch.testing.assert_close(maps, ref, atol=1e-5, rtol=0)
    assert not torch.allclose(maps, torch.full_like(maps, 1 / 16), atol=1e-3)  # not trivial
    torch.testing.assert_close(maps.sum(dim=1), torch.ones(5), atol=1e-6, rtol=0)
    assert (maps >= 0).all()


def test_qk_norm_is_applied():
    model = make("vit_reg4_qknorm").eval()
    assert isinstance(last_attn(model).q_norm, nn.LayerNorm)
    with torch.no_grad():
        last_attn(model).q_norm.weight.mul_(3.0)
    x = torch.randn(2, 3, 32, 32)
    with ClsAttention(model) as cls_attn, torch.no_grad():
        model(x)
    torch.testing.assert_close(cls_attn.maps, explicit_maps(model, x, 5), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_outputs_and_gradients_unchanged(family):
    model = make(family).train()
    x = torch.randn(4, 3, 32, 32)
    assert_hook_transparent(model, x)


def test_float32_under_autocast():
    model = make("deit").eval()
    x = torch.randn(3, 3, 32, 32)
    with ClsAttention(model) as cls_attn, torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x)
        maps_amp = cls_attn.maps
        model(x)
    assert maps_amp.dtype == torch.float32
    torch.testing.assert_close(maps_amp.sum(dim=1), torch.ones(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(maps_amp, cls_attn.maps, atol=2e-2, rtol=0)


def test_gradient_checkpointing_gives_the_same_maps():
    model = make("deit").train()
    x = torch.randn(3, 3, 32, 32)
    with ClsAttention(model) as cls_attn:
        model(x).sum().backward()
        plain = cls_attn.maps
        model.set_grad_checkpointing(True)
        model(x).sum().backward()  # the block re-runs (and the hooks fire) during backward
        torch.testing.assert_close(cls_attn.maps, plain, atol=1e-6, rtol=0)


def test_worked_example_of_the_row():
    q_cls = torch.ones(1, 1, 1)  # (B, heads, d)
    k = torch.tensor([0.0, math.log(2), math.log(2), math.log(4)]).view(1, 1, 4, 1)
    row = cls_attention_row(q_cls, k, scale=1.0, num_prefix_tokens=1)
    torch.testing.assert_close(row, torch.tensor([[0.25, 0.25, 0.5]]))


def test_long_lived_follows_batches_and_removes():
    model = make("deit").eval()
    cls_attn = ClsAttention(model)
    with pytest.raises(RuntimeError, match="no forward pass of VisionTransformer"):
        cls_attn.maps
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
        assert cls_attn.maps.shape == (2, 16)
        model(torch.randn(7, 3, 32, 32))
        kept = cls_attn.maps
        assert kept.shape == (7, 16)
        cls_attn.remove()
        cls_attn.remove()  # idempotent
        assert not cls_attn.attached and "removed" in repr(cls_attn)
        model(torch.randn(3, 3, 32, 32))
    assert cls_attn.maps is kept  # no hook fired after remove()
    attn = last_attn(model)
    assert not model._forward_pre_hooks and not attn._forward_pre_hooks
    assert not attn.q_norm._forward_hooks and not attn.k_norm._forward_hooks


def test_context_manager_removes_and_two_can_coexist():
    model = make("cait").eval()
    x = torch.randn(2, 3, 32, 32)
    outer = ClsAttention(model)
    with ClsAttention(model) as inner, torch.no_grad():
        model(x)
        torch.testing.assert_close(inner.maps, outer.maps, atol=0, rtol=0)
    assert not inner.attached and outer.attached
    assert len(last_attn(model).k._forward_hooks) == 1
    outer.remove()


def test_looks_through_data_parallel():
    model = make("deit").eval()
    with ClsAttention(nn.DataParallel(model)) as cls_attn, torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
        assert cls_attn.model_name == "VisionTransformer" and cls_attn.maps.shape == (2, 16)


def test_attention_mask_is_reported():
    model = make("deit").eval()
    mask = torch.ones(17, 17, dtype=torch.bool)  # 1 + 16 tokens
    with ClsAttention(model) as cls_attn, torch.no_grad():
        model(torch.randn(2, 3, 32, 32), attn_mask=mask)
        with pytest.raises(RuntimeError, match="passed an attention mask"):
            cls_attn.maps
        model(torch.randn(2, 3, 32, 32))
        assert cls_attn.maps.shape == (2, 16)


NO_CLS = {
    "SwinTransformer": ("swin_tiny_patch4_window7_224",
                        dict(img_size=32, window_size=4, depths=(1, 1), num_heads=(1, 2),
                             embed_dim=16)),
    "PyramidVisionTransformerV2": ("pvt_v2_b0", dict(depths=(1, 1, 1, 1),
                                                     embed_dims=(8, 16, 16, 16),
                                                     num_heads=(1, 1, 1, 1))),
    "ResNet": ("resnet10t", {}),
    "VisionTransformer": ("vit_small_patch16_224",
                          dict(SMALL, class_token=False, global_pool="avg")),
}


@pytest.mark.parametrize("cls_name", sorted(NO_CLS))
def test_refuses_models_without_class_token(cls_name):
    name, kw = NO_CLS[cls_name]
    model = timm.create_model(name, pretrained=False, **{"num_classes": 10, **kw})
    msg = rf"{cls_name} has no class token.*only area labels \(method='area'\) are available"
    with pytest.raises(ValueError, match=msg):
        ClsAttention(model)


def test_refuses_unsupported_attention_variants():
    diff = timm.create_model("vit_small_patch16_224", pretrained=False,
                             **dict(SMALL, attn_layer="diff"))
    with pytest.raises(TypeError, match=r"VisionTransformer is not supported \(last block "
                                        r"attention is DiffAttention.*method='area'"):
        ClsAttention(diff)
    dropped = timm.create_model("vit_small_patch16_224", pretrained=False,
                                **dict(SMALL, patch_drop_rate=0.25))
    with pytest.raises(TypeError, match="patch dropout drops tokens.*patch_drop_rate=0"):
        ClsAttention(dropped)

    class WithToken(nn.Module):
        def __init__(self):
            super().__init__()
            self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))

    with pytest.raises(TypeError, match=r"WithToken is not supported \(unknown architecture\); "
                                        r"supported: timm VisionTransformer family"):
        ClsAttention(WithToken())
