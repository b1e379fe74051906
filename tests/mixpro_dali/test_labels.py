"""mix_targets against hand-written per-sample formulas (PAL, TransMix, area), method x preset."""
import math

import pytest
import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy

from mixpro_dali.labels import (
    TARGET_METHODS, TARGET_PRESETS, attn_lambda, mix_targets, soft_target_cross_entropy,
)

C, H, W = 7, 3, 5  # a token grid the 2-D mask does not tile evenly


def make_batch(seed, B=12, scale=3.0):
    """A batch holding every mode (0 none, 1 mixup, 2 cutmix, 3 maskmix), as the loader emits it."""
    g = torch.Generator().manual_seed(seed)
    mode = torch.arange(B, dtype=torch.int32) % 4
    mask = (torch.rand(B, H, W, generator=g) < torch.rand(B, 1, 1, generator=g)).to(torch.uint8)
    mask[mode == 0] = 1
    lam = mask.flatten(1).float().mean(1)  # exact area share
    lam[mode == 1] = torch.rand(int((mode == 1).sum()), generator=g)  # Mixup blend weight
    attn = (2 * torch.randn(B, H * W, generator=g)).softmax(1)
    labels_a = torch.randint(0, C, (B,), generator=g)
    return dict(logits=scale * torch.randn(B, C, generator=g), labels_a=labels_a,
                labels_b=labels_a.flip(0), lam=lam, mode=mode, token_mask=mask, attn=attn)


def reference(b, method, preset, s):
    """Slow, obvious: python floats, one sample at a time."""
    targets, lams, alphas = [], [], []
    for i in range(len(b["mode"])):
        off, on = s / C, 1 - s + s / C
        ya = [on if c == b["labels_a"][i] else off for c in range(C)]
        yb = [on if c == b["labels_b"][i] else off for c in range(C)]
        lam_area, mode = float(b["lam"][i]), int(b["mode"][i])
        m = b["token_mask"][i].flatten().tolist()
        lam_attn = sum(a * mk for a, mk in zip(b["attn"][i].tolist(), m))
        lam, alpha = lam_area, math.nan
        if method == "transmix" and mode == 2:
            lam = (lam_area + lam_attn) / 2
        if method == "mixpro" and mode == 3:
            z = b["logits"][i].tolist()
            e = [math.exp(v - max(z)) for v in z]
            p = [v / sum(e) for v in e]
            y_area = [lam_area * u + (1 - lam_area) * v for u, v in zip(ya, yb)]
            dot = sum(u * v for u, v in zip(p, y_area))
            alpha = dot / math.sqrt(sum(u * u for u in p) * sum(v * v for v in y_area))
            lam = alpha * lam_attn + (1 - alpha) * lam_area
            if preset == "official":
                ya = [float(c == b["labels_a"][i]) for c in range(C)]
                yb = [float(c == b["labels_b"][i]) for c in range(C)]
        targets.append([lam * u + (1 - lam) * v for u, v in zip(ya, yb)])
        lams.append(lam)
        alphas.append(alpha)
    return torch.tensor(targets), torch.tensor(lams), torch.tensor(alphas)


def run(b, **kw):
    kw = {"num_classes": C, **kw}
    return mix_targets(b["logits"], b["labels_a"], b["labels_b"], b["lam"], b["mode"],
                       b["token_mask"], b["attn"], **kw)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("preset", TARGET_PRESETS)
@pytest.mark.parametrize("method", TARGET_METHODS)
def test_targets_equal_hand_written_formulas(method, preset, seed):
    b = make_batch(seed)
    smoothing = (0.1, 0.0, 0.3)[seed]
    out = run(b, method=method, label_variant=preset, smoothing=smoothing)
    target, lam, alpha = reference(b, method, preset, smoothing)
    torch.testing.assert_close(out.target, target.float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.lam, lam.float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.alpha, alpha.float(), atol=1e-6, rtol=0, equal_nan=True)
    pal = b["mode"] == 3
    assert torch.isnan(out.alpha).tolist() == (~pal if method == "mixpro" else pal | ~pal).tolist()


@pytest.mark.parametrize("method", TARGET_METHODS)
@pytest.mark.parametrize("preset", TARGET_PRESETS)
def test_rows_sum_to_one_and_weights_stay_in_range(method, preset):
    for seed in range(20):
        b = make_batch(seed, B=16, scale=(0.01, 3.0, 300.0)[seed % 3])  # flat to saturated p
        out = run(b, method=method, label_variant=preset)
        torch.testing.assert_close(out.target.sum(1), torch.ones(16), atol=1e-6, rtol=0)
        assert (out.target >= 0).all() and out.target.dtype == torch.float32
        assert ((out.lam >= 0) & (out.lam <= 1)).all()
        used = out.alpha[~torch.isnan(out.alpha)]
        assert ((used >= 0) & (used <= 1)).all()


def test_official_gradient_flows_through_alpha_only():
    b = make_batch(0)
    pal = b["mode"] == 3
    for preset in TARGET_PRESETS:
        logits = b["logits"].clone().requires_grad_(True)
        out = run(dict(b, logits=logits), label_variant=preset)
        assert out.target.requires_grad == (preset == "official")
        assert not out.lam.requires_grad and not out.alpha.requires_grad
    # official: grad of the targets reaches the logits through PAL rows only
    w = torch.randn(C)
    for rows, moves in ((pal, True), (~pal, False)):
        logits = b["logits"].clone().requires_grad_(True)
        (run(dict(b, logits=logits), label_variant="official").target[rows] * w).sum().backward()
        assert (logits.grad[rows].abs().sum(1) > 0).all() == moves
        assert (logits.grad[~rows] == 0).all()


def test_official_loss_is_lam_weighted_hard_ce_with_grad_through_lam():
    b = make_batch(1)
    pal = b["mode"] == 3
    logits = b["logits"].clone().requires_grad_(True)
    out = run(dict(b, logits=logits), label_variant="official")
    loss = soft_target_cross_entropy(logits, out.target, reduction="none")
    # the same loss written out: alpha, lam and both hard CEs with autograd on
    z = b["logits"].clone().requires_grad_(True)
    off, on = 0.1 / C, 0.9 + 0.1 / C
    ya = torch.full((12, C), off).scatter_(1, b["labels_a"][:, None], on)
    yb = torch.full((12, C), off).scatter_(1, b["labels_b"][:, None], on)
    y_area = b["lam"][:, None] * ya + (1 - b["lam"][:, None]) * yb
    p = z.softmax(1)
    alpha = (p * y_area).sum(1) / (p.norm(dim=1) * y_area.norm(dim=1))
    lam_attn = (b["attn"] * b["token_mask"].flatten(1)).sum(1)
    lam = alpha * lam_attn + (1 - alpha) * b["lam"]
    hard = lam * F.cross_entropy(z, b["labels_a"], reduction="none") + \
        (1 - lam) * F.cross_entropy(z, b["labels_b"], reduction="none")
    smooth = -(y_area * z.log_softmax(1)).sum(1)  # non-PAL rows: area target with smoothing
    ref = torch.where(pal, hard, smooth)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=0)
    loss.mean().backward()
    ref.mean().backward()
    torch.testing.assert_close(logits.grad, z.grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.lam[pal], lam.detach()[pal], atol=1e-6, rtol=0)


def test_lambda_stays_per_sample():
    full = make_batch(2)
    b = {k: v[full["mode"] >= 2] for k, v in full.items()}  # the 6 masked samples
    b["mode"][:] = 3
    out = run(b)
    assert len(set(out.lam.tolist())) == 6  # never collapsed to the batch mean
    one = {k: v[:1] for k, v in b.items()}
    torch.testing.assert_close(run(one).target[0], out.target[0], atol=1e-6, rtol=0)


def test_worked_example_two_by_two():
    mask = torch.tensor([[[1, 0], [0, 0]]], dtype=torch.uint8)
    attn = torch.tensor([[0.7, 0.1, 0.1, 0.1]])
    assert attn_lambda(attn, mask).item() == pytest.approx(0.7)
    args = (torch.zeros(1, 3), torch.tensor([0]), torch.tensor([1]), torch.tensor([0.25]),
            torch.tensor([2], dtype=torch.int32), mask, attn)
    out = mix_targets(*args, num_classes=3, smoothing=0.0, method="transmix")
    assert out.lam.item() == pytest.approx(0.475)
    torch.testing.assert_close(out.target, torch.tensor([[0.475, 0.525, 0.0]]))


def test_unmixed_equals_torch_label_smoothing_and_timm_soft_ce():
    b = make_batch(3)
    b["mode"][:], b["lam"][:] = 0, 1.0
    for method in TARGET_METHODS:
        out = run(b, method=method, smoothing=0.1)
        loss = soft_target_cross_entropy(b["logits"], out.target)
        ref = F.cross_entropy(b["logits"], b["labels_a"], label_smoothing=0.1)
        torch.testing.assert_close(loss, ref, atol=1e-6, rtol=0)
    target = run(make_batch(4)).target
    timm_loss = SoftTargetCrossEntropy()(b["logits"], target)
    torch.testing.assert_close(soft_target_cross_entropy(b["logits"], target), timm_loss)


def test_area_needs_no_attention_and_mask_layouts_agree():
    b = make_batch(5)
    area = mix_targets(b["logits"], b["labels_a"], b["labels_b"], b["lam"], b["mode"], None,
                       None, num_classes=C, method="area")
    torch.testing.assert_close(area.target, run(b, method="area").target, atol=0, rtol=0)
    flat = run(dict(b, token_mask=b["token_mask"].flatten(1).bool()))
    torch.testing.assert_close(flat.target, run(b).target, atol=0, rtol=0)


def test_half_precision_logits_give_float32_targets():
    b = make_batch(6)
    out = run(dict(b, logits=b["logits"].bfloat16(), attn=b["attn"].half()))
    assert out.target.dtype == out.lam.dtype == out.alpha.dtype == torch.float32
    torch.testing.assert_close(out.target, run(b).target, atol=2e-2, rtol=0)
    loss = soft_target_cross_entropy(b["logits"].bfloat16(), out.target)
    assert loss.dtype == torch.float32


def test_errors_name_the_argument():
    b = make_batch(7)
    cases = [
        (ValueError, r"method must be one of \('mixpro', 'transmix', 'area'\), got 'pal'",
         dict(method="pal")),
        (ValueError, r"label_variant must be one of \('paper', 'official'\), got 'fistyee'",
         dict(label_variant="fistyee")),
        (ValueError, "num_classes must be a positive int, got 0", dict(num_classes=0)),
        (ValueError, "num_classes must be a positive int, got True", dict(num_classes=True)),
        (ValueError, r"smoothing must be in \[0, 1\), got 1.0", dict(smoothing=1.0)),
        (ValueError, r"logits must be \(B, num_classes=9\), got \(12, 7\)", dict(num_classes=9)),
    ]
    for exc, msg, kw in cases:
        with pytest.raises(exc, match=msg):
            run(b, **kw)
    bad = [
        (ValueError, r"lam must have shape \(B,\) = \(12,\) like logits, got \(12, 1\)",
         dict(lam=b["lam"][:, None])),
        (TypeError, "labels_b must be an integer tensor, got torch.float32",
         dict(labels_b=b["labels_b"].float())),
        (ValueError, r"attn is required for method='mixpro'; pass ClsAttention\(model\).maps",
         dict(attn=None)),
        (ValueError, r"token_mask is required for method='mixpro'.*or use method='area'",
         dict(token_mask=None)),
        (ValueError, r"token_mask must be \(B, h, w\) or \(B, h\*w\) with B=12, got \(12,\)",
         dict(token_mask=b["token_mask"][:, 0, 0])),
        (ValueError, r"attn must be \(B, h\*w\) = \(12, 15\) to match token_mask \(12, 3, 5\), "
                     r"or \(B, n\) on a coarser grid that tiles it.*got \(12, 16\)",
         dict(attn=torch.zeros(12, 16))),
        (ValueError, r"attn must be \(B, h\*w\) = \(12, 15\).*got \(12, 5\)",  # 3x5 / 5
         dict(attn=torch.full((12, 5), 0.2))),
        (ValueError, r"attn must be \(B, h\*w\) = \(12, 15\).*got \(12, 1, 15\)",
         dict(attn=torch.zeros(12, 1, 15))),
    ]
    for exc, msg, change in bad:
        with pytest.raises(exc, match=msg):
            run(dict(b, **change))
    with pytest.raises(ValueError, match=r"reduction must be one of \('mean', 'none'\), got 'sum'"):
        soft_target_cross_entropy(b["logits"], b["logits"], reduction="sum")
    with pytest.raises(ValueError, match=r"logits and target must have the same shape \(B, C\), "
                                         r"got \(12, 7\) and \(12, 8\)"):
        soft_target_cross_entropy(b["logits"], torch.zeros(12, 8))


# --- lam_attn normalization (official formula: w_a / (w_a + w_b)) ------------------------------
def raw_rows(B, n, prefix, seed):
    """Raw class-token attention over patches only: a softmax over [prefix tokens, patches] with
    the prefix entries dropped, so rows sum to 0.92-1.00 (not renormalized)."""
    g = torch.Generator().manual_seed(seed)
    scores = 2 * torch.randn(B, prefix + n, generator=g)
    scores[:, :prefix] -= torch.linspace(0.0, 4.0, B).unsqueeze(1)  # prefix share varies
    rows = scores.softmax(dim=1)[:, prefix:]
    target_sum = torch.linspace(0.92, 1.0, B).unsqueeze(1)
    return rows / rows.sum(dim=1, keepdim=True) * target_sum


@pytest.mark.parametrize("seed", range(3))
def test_attn_lambda_normalizes_by_both_images_tokens(seed):
    B, n = 9, H * W
    attn = raw_rows(B, n, prefix=1, seed=seed)
    sums = attn.sum(dim=1)
    assert sums.min() >= 0.92 - 1e-6 and sums.max() <= 1.0 + 1e-6 and sums.min() < 0.93
    g = torch.Generator().manual_seed(100 + seed)
    mask = (torch.rand(B, H, W, generator=g) < 0.5).to(torch.uint8)
    got = attn_lambda(attn, mask)
    for i in range(B):  # TransMix / fistyee/MixPro, written out
        a, m = attn[i].tolist(), mask[i].flatten().tolist()
        w_a = sum(x * k for x, k in zip(a, m))
        w_b = sum(x * (1 - k) for x, k in zip(a, m))
        assert got[i].item() == pytest.approx(w_a / (w_a + w_b), abs=1e-6)
    plain = (attn * mask.flatten(1)).sum(dim=1)  # what assuming "rows sum to 1" gives
    assert (plain < got - 1e-4).sum() >= B - 2  # biased low wherever the mask keeps something


def test_attn_lambda_unchanged_for_cls_attention_maps():
    b = make_batch(5)  # attn rows sum to 1, as ClsAttention.maps
    expected = (b["attn"] * b["token_mask"].flatten(1).float()).sum(dim=1)
    torch.testing.assert_close(attn_lambda(b["attn"], b["token_mask"]), expected,
                               atol=1e-6, rtol=0)


# --- attention on a coarser (final-stage) grid: CA-Swin / CA-PVT ---------------------------------
def coarse_reference_lam_attn(attn, mask, k):
    """Slow: for each final-stage token, the share of its k x k patches taken from sample a."""
    B, h, w = mask.shape
    out = []
    for i in range(B):
        w_a = total = 0.0
        for r in range(h // k):
            for c in range(w // k):
                share = mask[i, r * k:(r + 1) * k, c * k:(c + 1) * k].float().mean().item()
                a = attn[i, r * (w // k) + c].item()
                w_a, total = w_a + a * share, total + a
        out.append(w_a / total)
    return torch.tensor(out)


@pytest.mark.parametrize("k,grid", [(8, (7, 7)), (4, (3, 5)), (2, (2, 2))])
def test_mask_is_pooled_onto_a_coarser_attention_grid(k, grid):
    from mixpro_dali.labels import pool_token_mask
    gh, gw = grid
    b = make_batch(11)
    B = b["mode"].shape[0]
    g = torch.Generator().manual_seed(k)
    mask = (torch.rand(B, gh * k, gw * k, generator=g) < 0.4).to(torch.uint8)
    mask[b["mode"] == 0] = 1
    attn = (2 * torch.randn(B, gh * gw, generator=g)).softmax(1)
    ref = coarse_reference_lam_attn(attn, mask, k)
    torch.testing.assert_close(attn_lambda(attn, mask), ref, atol=1e-6, rtol=0)
    pooled = pool_token_mask(mask, gh * gw)
    assert pooled.shape == (B, gh * gw)
    torch.testing.assert_close(pooled.mean(dim=1), mask.flatten(1).float().mean(dim=1))
    lam = mask.flatten(1).float().mean(1)
    lam[b["mode"] == 1] = b["lam"][b["mode"] == 1]
    out = mix_targets(b["logits"], b["labels_a"], b["labels_b"], lam, b["mode"], mask, attn,
                      num_classes=C, method="transmix")
    cut = b["mode"] == 2
    torch.testing.assert_close(out.lam[cut], (lam[cut] + ref[cut]) / 2, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"must be \(B, h, w\) when attn is on a coarser grid"):
        pool_token_mask(mask.flatten(1), gh * gw)


@pytest.mark.parametrize("image_size", [224, 160, (96, 128), 256])
@pytest.mark.parametrize("mask_patch", [32, 64, 96])
def test_every_final_stage_token_comes_from_one_image(image_size, mask_patch):
    """Patch 4, final stride 32 (CA-Swin / CA-PVT): cells that are multiples of 32 px keep every
    final-stage token whole, edge cells included (224 px with 64 or 96 px cells)."""
    from mixpro_dali import MixConfig, sample_mix
    from mixpro_dali.labels import pool_token_mask
    cfg = MixConfig(image_size=image_size, patch_size=4, mask_patch=mask_patch,
                    probs={"maskmix": 1.0}, seed=mask_patch)
    h, w = cfg.token_grid
    n = (h // 8) * (w // 8)
    for batch_index in range(20):
        p = sample_mix(cfg, 6, batch_index)
        pooled = pool_token_mask(p.token_mask, n)  # (B, n)
        assert ((pooled == 0) | (pooled == 1)).all()
        torch.testing.assert_close(pooled.mean(dim=1), p.lam)


def test_other_cell_sizes_split_final_stage_tokens_and_are_refused():
    from mixpro_dali import MixConfig, sample_mix
    from mixpro_dali.attention import check_mask_patch
    from mixpro_dali.labels import pool_token_mask
    for mask_patch in (16, 48, 80):
        cfg = MixConfig(image_size=224, patch_size=4, mask_patch=mask_patch,
                        probs={"maskmix": 1.0}, seed=1)
        split = [((0 < q) & (q < 1)).any().item() for q in
                 (pool_token_mask(sample_mix(cfg, 4, i).token_mask, 49) for i in range(10))]
        assert any(split)  # why the rule exists: some final-stage token mixes both images
        with pytest.raises(ValueError, match=rf"mask_patch={mask_patch} px is not a multiple of "
                                             r"the final-stage stride \(32 px\) of CaSwin.*use "
                                             r"mask_patch \d+ or \d+"):
            check_mask_patch(mask_patch, 32, "CaSwin")
    check_mask_patch(64, 32)


def test_preset_keyword_is_a_deprecated_alias_of_label_variant():
    b = make_batch(3)
    logits = b["logits"].clone().requires_grad_(True)
    new = run(dict(b, logits=logits), label_variant="official")
    with pytest.warns(DeprecationWarning, match=r"preset=.*deprecated: use label_variant"):
        old = run(dict(b, logits=logits), preset="official")
    assert torch.equal(old.target, new.target) and old.target.requires_grad
    with pytest.warns(DeprecationWarning), pytest.raises(
            ValueError, match=r"label_variant must be one of \('paper', 'official'\), got 'x'"):
        run(b, preset="x")


def test_label_modes_pick_the_rows_that_get_the_attention_label():
    b = make_batch(5)
    for method, own in (("transmix", 2), ("mixpro", 3)):
        default = run(b, method=method)
        moved = run(b, method=method, label_modes=("mixup",))      # mode 1 rows instead
        area = run(b, method="area")
        for code in range(4):
            rows = b["mode"] == code
            relabeled = moved.lam[rows] if code == 1 else default.lam[rows]
            if code in (1, own):
                assert not torch.equal(relabeled, area.lam[rows])
            else:
                assert torch.equal(moved.lam[rows], area.lam[rows])
    with pytest.raises(ValueError, match=r"label_modes: unknown mode 'stripes'"):
        run(b, label_modes=("stripes",))
