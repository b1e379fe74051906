"""CA-Swin / CA-PVT v2 (mixpro_dali.ca_models): timm registration, weight reuse, parameter
counts, class attention read on the final-stage grid, and a short MixPro training run."""
from __future__ import annotations

import copy

import pytest
import timm
import torch

import mixpro_dali  # noqa: F401  (registers the ca_* models with timm)
from mixpro_dali import ClsAttention, MixConfig, apply_mix, mix_targets, sample_mix, \
    soft_target_cross_entropy
from mixpro_dali.ca_models import CA_MODELS, PARAMS, CaPyramidVisionTransformerV2, \
    CaSwinTransformer
from hook_checks import assert_hook_transparent

# tiny variants at 128 px: final stage 4x4 tokens (stride 32), patch grid 32x32 (stride 4)
TINY = {
    "swin": ("ca_swin_tiny_patch4_window7_224", "swin_tiny_patch4_window7_224",
             dict(img_size=128, embed_dim=8, depths=(1, 1, 1, 2), num_heads=(1, 1, 2, 2),
                  window_size=4, num_classes=5)),
    "pvt": ("ca_pvt_v2_b0", "pvt_v2_b0",
            dict(embed_dims=(8, 16, 32, 64), depths=(1, 1, 1, 2), num_heads=(1, 1, 2, 2),
                 num_classes=5)),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one intra-op thread is several times faster on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make(kind, seed=0, **extra):
    name, _, kw = TINY[kind]
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **{**kw, **extra})
    with torch.no_grad():  # break init symmetries (zero biases, equal LayerNorms)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_registered_with_timm():
    assert set(CA_MODELS) <= set(timm.list_models("ca_*"))
    assert "ca_swin_tiny_patch4_window7_224" in CA_MODELS and "ca_pvt_v2_b1" in CA_MODELS
    m = timm.create_model("ca_swin_tiny_patch4_window7_224", pretrained=False, num_classes=3,
                          img_size=64, embed_dim=8, num_heads=(1, 1, 1, 2))
    assert isinstance(m, CaSwinTransformer) and m.global_pool == "token"
    assert m.pretrained_cfg["hf_hub_id"] == "timm/swin_tiny_patch4_window7_224.ms_in1k"
    p = timm.create_model("ca_pvt_v2_b1", pretrained=False, num_classes=3)
    assert isinstance(p, CaPyramidVisionTransformerV2)
    assert p.pretrained_cfg["hf_hub_id"] == "timm/pvt_v2_b1.in1k"


@pytest.mark.parametrize("name", ["ca_swin_tiny_patch4_window7_224", "ca_pvt_v2_b0",
                                  "ca_pvt_v2_b1"])
def test_documented_parameter_count_and_no_overhead(name):
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    ca, backbone = timm.create_model(name), timm.create_model(name[3:])
    assert (count(ca), count(backbone)) == PARAMS[name]
    last = backbone.layers[-1].blocks[-1] if name.startswith("ca_swin") else \
        backbone.stages[-1].blocks[-1]
    dropped = last.attn.relative_position_bias_table.numel() if name.startswith("ca_swin") \
        else sum(p.numel() for p in last.mlp.dwconv.parameters())
    assert count(ca) == count(backbone) - dropped + ca.num_features  # + the class token


@pytest.mark.parametrize("kind", sorted(TINY))
def test_features_and_logits(kind):
    model = make(kind).eval()
    with torch.no_grad():
        x = torch.randn(3, 3, 128, 128)
        feats = model.forward_features(x)
        assert feats.shape == (3, 1 + 16, model.num_features)  # class token + 4x4 final grid
        logits = model(x)
        torch.testing.assert_close(logits, model.forward_head(feats))
        assert logits.shape == (3, 5)
        assert model.forward_head(feats, pre_logits=True).shape == (3, model.num_features)
    model.reset_classifier(7)
    assert model(x).shape == (3, 7)
    with pytest.raises(ValueError, match="pools with its class token"):
        model.reset_classifier(7, "avg")
    assert "cls_token" in model.no_weight_decay()


@pytest.mark.parametrize("kind", sorted(TINY))
def test_backbone_weights_are_reused_through_timm_pretrained(kind, tmp_path):
    """pretrained=True with a local backbone file (no network): every backbone tensor lands in the
    CA model, the last block's q/k/v are the rows of its fused projection, only tensors with no
    meaning for one query token are dropped, and the class token keeps its init."""
    name, backbone_name, kw = TINY[kind]
    kw = dict(kw, num_classes=1000)  # keep the head (timm resets it on a class-count change)
    torch.manual_seed(1)
    backbone = timm.create_model(backbone_name, pretrained=False, **kw)
    sd = backbone.state_dict()
    torch.save(sd, tmp_path / "backbone.pth")
    torch.manual_seed(2)
    ca = timm.create_model(name, pretrained=True, **kw,
                           pretrained_cfg_overlay=dict(file=str(tmp_path / "backbone.pth")))
    got = ca.state_dict()
    prefix = "layers.3.blocks.1." if kind == "swin" else "stages.3.blocks.1."
    C = ca.num_features
    if kind == "swin":
        qkv_w, qkv_b = sd[prefix + "attn.qkv.weight"], sd[prefix + "attn.qkv.bias"]
    else:
        qkv_w = torch.cat([sd[prefix + "attn.q.weight"], sd[prefix + "attn.kv.weight"]])
        qkv_b = torch.cat([sd[prefix + "attn.q.bias"], sd[prefix + "attn.kv.bias"]])
    for i, n in enumerate("qkv"):
        assert torch.equal(got[f"ca_block.attn.{n}.weight"], qkv_w[i * C:(i + 1) * C])
        assert torch.equal(got[f"ca_block.attn.{n}.bias"], qkv_b[i * C:(i + 1) * C])
    moved = {prefix + k: "ca_block." + k for k in
             ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "attn.proj.weight",
              "attn.proj.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
              "mlp.fc2.bias")}
    dropped = set()
    for k, v in sd.items():
        if k in moved:
            assert torch.equal(got[moved[k]], v), k
        elif k.startswith(prefix):
            dropped.add(k[len(prefix):])
        elif k in got:
            assert torch.equal(got[k], v), k
    expected = ({"attn.qkv.weight", "attn.qkv.bias", "attn.relative_position_bias_table"}
                if kind == "swin" else
                {"attn.q.weight", "attn.q.bias", "attn.kv.weight", "attn.kv.bias",
                 "mlp.dwconv.weight", "mlp.dwconv.bias"})
    assert dropped == expected
    assert set(got) - {moved[k] for k in moved} - {k for k in sd} == \
        {"cls_token"} | {f"ca_block.attn.{n}.{p}" for n in "qkv" for p in ("weight", "bias")}
    assert got["cls_token"].abs().max() > 0  # initialized, not zeros


def test_refuses_what_the_class_attention_block_cannot_reuse():
    with pytest.raises(ValueError, match="last stage needs depth >= 1"):
        timm.create_model("ca_swin_tiny_patch4_window7_224", img_size=64, embed_dim=8,
                          depths=(1, 1, 1, 0), num_heads=(1, 1, 1, 1))
    with pytest.raises(ValueError, match=r"linear=True \(the '_li' variants\)"):
        timm.create_model("ca_pvt_v2_b0", linear=True)
    with pytest.raises(ValueError, match="sr_ratio 1"):
        timm.create_model("ca_pvt_v2_b0", sr_ratios=(8, 4, 2, 2))
    with pytest.raises(ValueError, match="global_pool must be 'token'"):
        timm.create_model("ca_swin_tiny_patch4_window7_224", global_pool="avg")


# --- ClsAttention on the final-stage grid --------------------------------------------------------
def explicit_maps(model, x):
    """Slow reference: the CA block's class-token query against its keys over [cls, final-stage
    tokens], one head at a time, softmax written out, the cls entry dropped, renormalized."""
    block = model.ca_block
    seen = {}
    h = block.norm1.register_forward_hook(lambda m, i, o: seen.setdefault("u", o))
    with torch.no_grad():
        model(x)
    h.remove()
    u = seen["u"]  # (B, 1 + N, C): the block's normalized input
    attn = block.attn
    B, N1, C = u.shape
    d = C // attn.num_heads
    q, k = attn.q(u[:, 0]), attn.k(u)  # (B, C), (B, 1 + N, C)
    rows = torch.zeros(B, N1)
    for b in range(B):
        for hd in range(attn.num_heads):
            s = torch.stack([(q[b, hd * d:(hd + 1) * d] * k[b, n, hd * d:(hd + 1) * d]).sum()
                             for n in range(N1)]) / d ** 0.5
            e = torch.exp(s - s.max())
            rows[b] += e / e.sum() / attn.num_heads
    rows = rows[:, 1:]
    return rows / rows.sum(dim=1, keepdim=True), N1 - 1


@pytest.mark.parametrize("kind", sorted(TINY))
def test_maps_equal_explicit_softmax_on_the_final_stage_grid(kind):
    model = make(kind).eval()
    x = torch.randn(4, 3, 128, 128)
    cls_attn = ClsAttention(model)
    assert model.ca_block.attn.fused_attn  # the forward stays on the fused path
    assert cls_attn.num_prefix_tokens == 1 and cls_attn.stride == 32
    with torch.no_grad():
        model(x)
    ref, n_final = explicit_maps(model, x)
    assert n_final == 16  # 128 px / 32: 4x4 final-stage tokens, not the 32x32 patch grid
    torch.testing.assert_close(cls_attn.maps, ref, atol=1e-5, rtol=0)
    assert not torch.allclose(cls_attn.maps, torch.full_like(ref, 1 / 16), atol=1e-3)
    cls_attn.remove()


def test_swin_t_grid_is_7x7_at_224():
    model = timm.create_model("ca_swin_tiny_patch4_window7_224", num_classes=10).eval()
    with ClsAttention(model) as cls_attn, torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
        assert cls_attn.maps.shape == (1, 49) and cls_attn.stride == 32
        assert "CA-Swin" in cls_attn.family.name


@pytest.mark.parametrize("kind", sorted(TINY))
def test_outputs_and_gradients_unchanged_by_the_hook(kind):
    model = make(kind, drop_path_rate=0.0).train()
    x = torch.randn(3, 3, 128, 128)
    assert_hook_transparent(model, x)


def test_mask_patch_must_be_a_multiple_of_the_final_stride():
    with ClsAttention(make("swin")) as cls_attn:
        cls_attn.check_mask_patch(64)
        with pytest.raises(ValueError, match=r"mask_patch=48 px is not a multiple of the "
                                             r"final-stage stride \(32 px\) of CaSwinTransformer"):
            cls_attn.check_mask_patch(48)


HIERARCHICAL = {  # refused models: name -> (timm model, kwargs, message)
    "swin": ("swin_tiny_patch4_window7_224",
             dict(img_size=64, embed_dim=8, num_heads=(1, 1, 1, 2), window_size=4),
             r"SwinTransformer has no class token.*only area labels \(method='area'\).*use its "
             r"class-attention variant ca_swin_tiny_patch4_window7_224"),
    "pvt_v2": ("pvt_v2_b0", dict(embed_dims=(8, 16, 16, 16), num_heads=(1, 1, 1, 1)),
               r"PyramidVisionTransformerV2 has no class token.*method='area'.*ca_pvt_v2_b0"),
    "twins": ("twins_svt_small", dict(embed_dims=(8, 16, 16, 16), num_heads=(1, 1, 1, 1),
                                      depths=(1, 1, 1, 1)),
              r"Twins has no class token.*only area labels \(method='area'\) are available "
              r"for it\.$"),
    "pit": ("pit_ti_224", dict(depth=(1, 1, 1), heads=(1, 1, 1)),
            r"PoolingVisionTransformer is not supported \(unknown architecture\); supported: "
            r"timm VisionTransformer family, Xcit, Cait, CA-Swin / CA-PVT v2.*method='area'"),
}


@pytest.mark.parametrize("kind", sorted(HIERARCHICAL))
def test_other_hierarchical_models_are_refused_clearly(kind):
    name, kw, msg = HIERARCHICAL[kind]
    model = timm.create_model(name, pretrained=False, num_classes=3, **kw)
    with pytest.raises((ValueError, TypeError), match=msg):
        ClsAttention(model)


# --- a short MixPro training run on the CPU -------------------------------------------------------
def class_images(n, classes, size, seed):
    """Class c: a bright square in quadrant c over noise (what a tiny model can learn fast)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    x = 0.3 * torch.randn(n, 3, size, size, generator=g)
    half = size // 2
    for i, c in enumerate(labels.tolist()):
        r, q = divmod(c, 2)
        x[i, :, r * half:(r + 1) * half, q * half:(q + 1) * half] += 1.5
    return x, labels


@pytest.mark.parametrize("kind", ["swin", "pvt"])
def test_short_mixpro_training_run_has_a_finite_falling_loss(kind):
    extra = dict(img_size=64) if kind == "swin" else {}
    model = make(kind, num_classes=4, drop_path_rate=0.0, **extra).train()
    x, y = class_images(32, 4, 64, seed=0)
    cfg = MixConfig.preset("mixpro", image_size=64, patch_size=4, mask_patch=32, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    losses, alphas = [], []
    with ClsAttention(model) as cls_attn:
        cls_attn.check_mask_patch(cfg.mask_patch)
        for step in range(40):
            idx = torch.arange(16) + 16 * (step % 2)
            p = sample_mix(cfg, 16, step)
            images = apply_mix(x[idx], p, patch_size=4, layout="CHW")
            logits = model(images)
            mode = torch.full((16,), p.mode, dtype=torch.int32)
            t = mix_targets(logits, y[idx], y[idx][p.partner], p.lam, mode, p.token_mask,
                            cls_attn.maps, num_classes=4, method="mixpro")
            loss = soft_target_cross_entropy(logits, t.target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            alphas += t.alpha[~t.alpha.isnan()].tolist()
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    assert alphas  # PAL ran on the MaskMix batches (alpha is NaN elsewhere)
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < first - 0.1, (first, last)
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc > 0.5


def test_deepcopy_and_state_dict_round_trip():
    model = make("swin").eval()
    clone = copy.deepcopy(model)
    fresh = timm.create_model(TINY["swin"][0], **TINY["swin"][2]).eval()
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))
        torch.testing.assert_close(clone(x), model(x))


@pytest.mark.parametrize("kind", sorted(TINY))
def test_features_only_gives_the_stage_outputs(kind):
    name, _, kw = TINY[kind]
    feats = timm.create_model(name, features_only=True, **kw)
    assert feats.feature_info.reduction() == [4, 8, 16, 32]
    with torch.no_grad():
        outs = feats(torch.randn(2, 3, 128, 128))
    assert len(outs) == 4 and sorted(outs[-1].shape[1:]) == [4, 4, 64]  # 4x4 grid, 64 channels
    last = timm.create_model(name, features_only=True, out_indices=(3,), **kw)
    assert len(last.feature_info.reduction()) == 1
