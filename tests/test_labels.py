"""mix_targets against hand-written per-sample formulas (method.md section 3), method x preset."""
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
    out = run(b, method=method, preset=preset, smoothing=smoothing)
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
        out = run(b, method=method, preset=preset)
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
        out = run(dict(b, logits=logits), preset=preset)
        assert out.target.requires_grad == (preset == "official")
        assert not out.lam.requires_grad and not out.alpha.requires_grad
    # official: grad of the targets reaches the logits through PAL rows only
    w = torch.randn(C)
    for rows, moves in ((pal, True), (~pal, False)):
        logits = b["logits"].clone().requires_grad_(True)
        (run(dict(b, logits=logits), preset="official").target[rows] * w).sum().backward()
        assert (logits.grad[rows].abs().sum(1) > 0).all() == moves
        assert (logits.grad[~rows] == 0).all()


def test_official_loss_is_lam_weighted_hard_ce_with_grad_through_lam():
    b = make_batch(1)
    pal = b["mode"] == 3
    logits = b["logits"].clone().requires_grad_(True)
    out = run(dict(b, logits=logits), preset="official")
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
        (ValueError, r"preset must be one of \('paper', 'official'\), got 'fistyee'",
         dict(preset="fistyee")),
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
                     r"got \(12, 16\)", dict(attn=torch.zeros(12, 16))),
    ]
    for exc, msg, change in bad:
        with pytest.raises(exc, match=msg):
            run(dict(b, **change))
    with pytest.raises(ValueError, match=r"reduction must be one of \('mean', 'none'\), got 'sum'"):
        soft_target_cross_entropy(b["logits"], b["logits"], reduction="sum")
    with pytest.raises(ValueError, match=r"logits and target must have the same shape \(B, C\), "
                                         r"got \(12, 7\) and \(12, 8\)"):
        soft_target_cross_entropy(b["logits"], torch.zeros(12, 8))
