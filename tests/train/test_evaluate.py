"""train.metrics, train.robustness, train.evaluate: metrics against hand-computed values and slow
obvious references, patch dropping against hand examples and an independent token-drop path,
the evaluation loop against a manual loop, and the CLI end to end on real JPEGs (tiny ViT)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch import nn

import jpeg_factory as jf
from train import evaluate as ev
from train import metrics as mt
from train import robustness as rb
from train.config import TrainConfig

# -- metrics: hand values ----------------------------------------------------------------------


def test_ece_hand_example():
    conf, hit = [0.95, 0.95, 0.55, 0.25], [1, 0, 1, 0]
    # bins (14/15, 1]: acc .5 conf .95; (8/15, 9/15]: acc 1 conf .55; (3/15, 4/15]: acc 0 conf .25
    assert mt.expected_calibration_error(conf, hit) == pytest.approx(
        0.5 * 0.45 + 0.25 * 0.45 + 0.25 * 0.25)
    bins = mt.calibration_bins(conf, hit)
    assert [b["count"] for b in bins] == [0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 2]
    assert bins[14]["accuracy"] == 0.5 and bins[14]["confidence"] == pytest.approx(0.95)


def test_ece_bin_edges_and_perfect_calibration():
    # right-closed bins: 1.0 in the last bin, 0.5 in (7/15, 8/15], 1/3 in (4/15, 5/15]
    idx = [next(k for k, b in enumerate(mt.calibration_bins([c], [1], 15)) if b["count"])
           for c in (1.0, 0.5, 1 / 3, 0.0)]
    assert idx == [14, 7, 4, 0]
    assert mt.expected_calibration_error([1.0, 1.0], [1, 1]) == 0.0
    assert mt.expected_calibration_error([0.5] * 4, [1, 0, 1, 0]) == pytest.approx(0.0)
    assert mt.expected_calibration_error([0.9] * 10, [1] * 6 + [0] * 4) == pytest.approx(0.3)


def test_ece_matches_slow_reference():
    rng = np.random.default_rng(0)
    for n_bins in (1, 10, 15):
        conf = rng.uniform(0.1, 1.0, 500)
        hit = (rng.uniform(size=500) < conf ** 2).astype(float)
        ref = 0.0
        for k in range(n_bins):
            lo, hi = k / n_bins, (k + 1) / n_bins
            m = (conf > lo) & (conf <= hi)
            if m.any():
                ref += m.mean() * abs(hit[m].mean() - conf[m].mean())
        assert mt.expected_calibration_error(conf, hit, n_bins) == pytest.approx(ref)


def test_average_ranks_ties():
    assert mt.average_ranks([3, 1, 3]).tolist() == [2.5, 1.0, 2.5]
    assert mt.average_ranks([2, 2, 2, 2]).tolist() == [2.5] * 4
    assert mt.average_ranks([0.5, -1, 7, 0.5, 7]).tolist() == [2.5, 1.0, 4.5, 2.5, 4.5]


def test_ood_metrics_hand_example():
    pos, neg = [0.9, 0.8, 0.4], [0.7, 0.4, 0.1]
    # pairs won: 3 + 3 + (0 + 0.5 + 1) = 7.5 of 9
    assert mt.auroc(pos, neg) == pytest.approx(7.5 / 9)
    # thresholds .9 (P 1, R 1/3), .8 (1, 2/3), .7 (2/3, 2/3), .4 (3/5, 1), .1 (1/2, 1)
    assert mt.average_precision(pos, neg) == pytest.approx(1 / 3 + 1 / 3 + 1 / 3 * 3 / 5)
    # OOD positive with -score: -.1 (P 1, R 1/3), -.4 (tie group: TP 2 FP 1, P 2/3, R 2/3),
    # -.7 (P 3/4, R 1)
    assert mt.average_precision([-0.7, -0.4, -0.1], [-0.9, -0.8, -0.4]) == pytest.approx(
        1 / 3 * 1 + 1 / 3 * 2 / 3 + 1 / 3 * 3 / 4)
    # TPR reaches 1 >= .95 only at threshold .4, where 2 of 3 OOD are accepted (.7 and .4)
    assert mt.fpr_at_tpr(pos, neg) == pytest.approx(2 / 3)
    o = mt.ood_metrics(pos, neg)
    assert o["auroc"] == pytest.approx(7.5 / 9) and o["num_in"] == 3 and o["num_out"] == 3
    assert o["aupr_out"] == pytest.approx(1 / 3 + 2 / 9 + 1 / 4)


def test_ood_metrics_extremes():
    assert mt.auroc([2, 3], [0, 1]) == 1.0 and mt.auroc([0, 1], [2, 3]) == 0.0
    assert mt.auroc([1, 1], [1, 1, 1]) == 0.5
    assert mt.average_precision([2, 3], [0, 1]) == 1.0
    assert mt.average_precision([1, 1], [1, 1]) == 0.5  # one threshold: P = 1/2, R = 1
    assert mt.fpr_at_tpr([2, 3], [0, 1]) == 0.0 and mt.fpr_at_tpr([0, 1], [2, 3]) == 1.0


def _slow_auroc(pos, neg):
    return np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg])


def _slow_ap(pos, neg):
    scores = sorted(set(pos) | set(neg), reverse=True)
    ap, prev_r = 0.0, 0.0
    for t in scores:
        tp = sum(p >= t for p in pos)
        fp = sum(n >= t for n in neg)
        r = tp / len(pos)
        ap += (r - prev_r) * tp / (tp + fp)
        prev_r = r
    return ap


@pytest.mark.parametrize("seed", range(6))
def test_auroc_and_ap_match_slow_references(seed):
    rng = np.random.default_rng(seed)
    pos = rng.integers(0, 12, rng.integers(1, 40)).astype(float) / 4  # many ties
    neg = rng.integers(-3, 9, rng.integers(1, 40)).astype(float) / 4
    assert mt.auroc(pos, neg) == pytest.approx(_slow_auroc(pos, neg))
    assert mt.average_precision(pos, neg) == pytest.approx(_slow_ap(pos, neg))
    from scipy.stats import mannwhitneyu
    u = mannwhitneyu(pos, neg, alternative="two-sided").statistic
    assert mt.auroc(pos, neg) == pytest.approx(u / (pos.size * neg.size))


def test_metric_errors():
    with pytest.raises(ValueError, match=r"need positive and negative samples, got 2 and 0"):
        mt.auroc([1, 2], [])
    with pytest.raises(ValueError, match=r"positive scores must be finite"):
        mt.average_precision([1, float("nan")], [0])
    with pytest.raises(ValueError, match=r"confidence must lie in \[0, 1\]"):
        mt.expected_calibration_error([1.2], [1])
    with pytest.raises(ValueError, match=r"differ in length: 2 vs 1"):
        mt.expected_calibration_error([0.2, 0.3], [1])
    with pytest.raises(ValueError, match=r"n_bins must be >= 1, got 0"):
        mt.calibration_bins([0.5], [1], 0)
    with pytest.raises(ValueError, match=r"ECE of an empty set"):
        mt.expected_calibration_error([], [])


# -- robustness ------------------------------------------------------------------------------


def test_drop_count_follows_naseer():
    assert [rb.drop_count(i / 10, 196) for i in range(10)] == [i * 196 // 10 for i in range(10)]
    assert rb.drop_count(0.3, 64) == 19 and rb.drop_count(0.0, 64) == 0
    with pytest.raises(ValueError, match=r"drop ratio must be in \[0, 1\), got 1.0"):
        rb.drop_count(1.0, 64)


def test_drop_orders_worked_example():
    attn = torch.tensor([[0.1, 0.4, 0.2, 0.3]])
    sal = rb.drop_order("salient", attn)
    non = rb.drop_order("non_salient", attn)
    assert sal.tolist() == [[1, 3, 2, 0]] and non.tolist() == [[0, 2, 3, 1]]
    k = rb.drop_count(0.5, 4)
    assert rb.keep_mask(sal, k, (2, 2)).tolist() == [[[True, False], [True, False]]]
    assert rb.keep_mask(non, k, (2, 2)).tolist() == [[[False, True], [False, True]]]
    with pytest.raises(ValueError, match=r"needs the class attention map"):
        rb.drop_order("salient", None)
    with pytest.raises(ValueError, match=r"drop mode must be one of .* got 'best'"):
        rb.drop_order("best", attn)


def test_random_order_is_a_seeded_permutation_per_image():
    a = rb.drop_order("random", batch=50, num_tokens=16,
                      generator=torch.Generator().manual_seed(3))
    b = rb.drop_order("random", batch=50, num_tokens=16,
                      generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert torch.equal(a.sort(dim=1).values, torch.arange(16).expand(50, 16))
    assert len({tuple(r) for r in a.tolist()}) == 50  # a fresh draw per image
    # each token is equally likely to go first: chi-square over 16 cells, 50 * 400 draws
    g = torch.Generator().manual_seed(0)
    firsts = torch.cat([rb.drop_order("random", batch=400, num_tokens=16, generator=g)[:, 0]
                        for _ in range(50)])
    counts = torch.bincount(firsts, minlength=16).double()
    chi2 = float(((counts - 1250) ** 2 / 1250).sum())
    assert chi2 < 50  # df 15: p < 1e-5 above 45


def test_pixel_drop_hand_example():
    img = torch.arange(2 * 16, dtype=torch.float32).view(1, 2, 4, 4)
    orig = img.clone()
    keep = torch.tensor([[[True, False], [False, True]]])
    out = rb.apply_pixel_drop(img, keep, fill=(-1.0, -2.0))
    assert torch.equal(img, orig)  # input not modified in place
    assert (out[0, 0, :2, 2:] == -1).all() and (out[0, 1, 2:, :2] == -2).all()
    assert torch.equal(out[0, :, :2, :2], img[0, :, :2, :2])
    assert torch.equal(out[0, :, 2:, 2:], img[0, :, 2:, 2:])
    with pytest.raises(ValueError, match=r"image 4x4 is not a whole number of 3x3 patches"):
        rb.apply_pixel_drop(img, torch.ones(1, 3, 3, dtype=torch.bool), (0, 0))


def _tiny_vit(num_classes=3, seed=0, **kw):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes,
                             img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=2,
                             **kw).eval()


class _SelectTokens(nn.Module):
    """Reference token drop through timm's own forward: replaces model.patch_drop."""

    def __init__(self, keep):
        super().__init__()
        self.keep = keep

    def forward(self, x):  # (B, 1 + N, C)
        rows = [torch.cat([xi[:1], xi[1:][ki.flatten()]]) for xi, ki in zip(x, self.keep)]
        return torch.stack(rows)


def test_token_drop_matches_timm_forward_with_selected_tokens():
    model = _tiny_vit()
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        all_keep = torch.ones(5, 4, 4, dtype=torch.bool)
        assert torch.allclose(rb.forward_kept_tokens(model, x, all_keep), model(x), atol=1e-5)
        order = rb.drop_order("random", batch=5, num_tokens=16,
                              generator=torch.Generator().manual_seed(0))
        keep = rb.keep_mask(order, 6, (4, 4))
        got = rb.forward_kept_tokens(model, x, keep)
        model.patch_drop = _SelectTokens(keep)
        ref = model(x)
    assert torch.allclose(got, ref, atol=1e-5)


def test_token_drop_errors():
    model = _tiny_vit()
    keep = torch.ones(2, 4, 4, dtype=torch.bool)
    keep[0, 0, 0] = False
    with pytest.raises(ValueError, match=r"every image must keep the same number of tokens"):
        rb.forward_kept_tokens(model, torch.randn(2, 3, 16, 16), keep)
    with pytest.raises(ValueError, match=r"drop='tokens' needs a timm VisionTransformer, got "
                                         r"Linear; use drop='pixels'"):
        rb.forward_kept_tokens(nn.Linear(2, 2), torch.randn(2, 3, 16, 16), keep)


# -- evaluate_model --------------------------------------------------------------------------


def _batches(n=37, bs=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return [{"image": x[i:i + bs], "label": y[i:i + bs]} for i in range(0, n, bs)], x, y


def _manual_occlusion(model, x, y, idx, mode, ratios, drop, mean, std, seed):
    """Slow reference: one image at a time, attention read by ClsAttention on the clean image;
    the random orders drawn in the same sequence (per batch of selected images, in order)."""
    from mixpro_dali.attention import ClsAttention
    fill = [-m / s for m, s in zip(mean, std)]
    acc = []
    with torch.no_grad(), ClsAttention(model) as ca:
        model(x)
        attn = ca.maps
    g = torch.Generator().manual_seed(seed)
    orders = {}
    for b0 in range(0, len(x), 10):  # the loader's batches
        sel = [i for i in range(b0, min(b0 + 10, len(x))) if i in idx]
        if sel:
            o = rb.drop_order(mode, attn[sel], batch=len(sel), num_tokens=16, generator=g)
            orders.update(zip(sel, o))
    for r in ratios:
        k = rb.drop_count(r, 16)
        hits = 0
        for i in sorted(idx):
            keep = torch.ones(16, dtype=torch.bool)
            keep[orders[i][:k]] = False
            keep = keep.view(1, 4, 4)
            with torch.no_grad():
                if drop == "tokens":
                    lg = rb.forward_kept_tokens(model, x[i:i + 1], keep)
                else:
                    xi = x[i:i + 1].clone()
                    for t in range(16):
                        if not keep.flatten()[t]:
                            for c in range(3):
                                xi[0, c, 4 * (t // 4):4 * (t // 4) + 4,
                                   4 * (t % 4):4 * (t % 4) + 4] = fill[c]
                    lg = model(xi)
            hits += int(lg.argmax(1).item() == y[i].item())
        acc.append(hits / len(idx))
    return acc


@pytest.mark.parametrize("mode,drop", [("salient", "pixels"), ("non_salient", "tokens"),
                                       ("random", "pixels")])
def test_evaluate_model_matches_manual_loop(mode, drop):
    model = _tiny_vit()
    batches, x, y = _batches()
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    idx = ev.occlusion_subset(37, 12)
    ratios = (0.0, 0.25, 0.5, 0.9)
    res = ev.evaluate_model(model, batches, patch=4, mean=mean, std=std, ratios=ratios,
                            modes=(mode,), drop=drop, occlusion_index=idx, seed=5)
    with torch.no_grad():
        logits = model(x)
    p = logits.softmax(1)
    assert res["num_samples"] == 37
    assert res["top1"] == pytest.approx((logits.argmax(1) == y).double().mean().item())
    top3 = (logits.topk(3, 1).indices == y[:, None]).any(1)  # 3 classes: top-5 = top-3
    assert res["top5"] == pytest.approx(top3.double().mean().item()) == 1.0
    assert res["nll"] == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-5)
    # ECE is a small difference of means of float32 probabilities (here ~1.6e-4), so the
    # batched and the whole-set forward pass agree to float32 round-off in absolute terms, not
    # relative ones (oneDNN may pick another kernel for another batch size).
    assert res["ece"] == pytest.approx(mt.expected_calibration_error(
        p.max(1).values.numpy(), (logits.argmax(1) == y).numpy()), rel=0, abs=1e-6)
    occ = res["occlusion"]
    assert occ["samples"] == 12 and occ["ratios"] == list(ratios)
    ref = _manual_occlusion(model, x, y, idx, mode, ratios, drop, mean, std, seed=5)
    assert occ["accuracy"][mode] == pytest.approx(ref)
    clean_sub = (logits.argmax(1) == y)[sorted(idx)].double().mean().item()
    assert occ["accuracy"][mode][0] == pytest.approx(clean_sub)


def test_occlusion_subset_spread():
    assert ev.occlusion_subset(10, None) == set(range(10))
    assert ev.occlusion_subset(10, 20) == set(range(10))
    assert ev.occlusion_subset(4000, 400) == set(range(0, 4000, 10))
    assert len(ev.occlusion_subset(37, 12)) == 12


def test_evaluate_model_errors():
    model = _tiny_vit()
    batches, _, _ = _batches(n=5)
    with pytest.raises(ValueError, match=r"drop must be one of \('pixels', 'tokens'\), got 'x'"):
        ev.evaluate_model(model, batches, patch=4, mean=(0,) * 3, std=(1,) * 3, drop="x")
    with pytest.raises(ValueError, match=r"occlusion modes must be among .* got \['most'\]"):
        ev.evaluate_model(model, batches, patch=4, mean=(0,) * 3, std=(1,) * 3,
                          modes=("most",))
    with pytest.raises(ValueError, match=r"the evaluation data yielded no samples"):
        ev.evaluate_model(model, [], patch=4, mean=(0,) * 3, std=(1,) * 3)


# -- the CLI on a checkpoint and real JPEGs --------------------------------------------------


@pytest.fixture(scope="module")
def ckpt_and_data(tmp_path_factory):
    base = tmp_path_factory.mktemp("evalcli")
    jf.class_tree(base / "val", classes=3, per_class=6, size=(16, 16), ext=".jpg")
    jf.class_tree(base / "ood", classes=2, per_class=5, size=(16, 16), ext=".jpg", seed=9)
    jf.class_tree(base / "four", classes=4, per_class=1, size=(16, 16), ext=".jpg")
    cfg = TrainConfig.from_dict({
        "data": {"train": str(base / "val"), "val": str(base / "val"), "image_size": 16,
                 "crop_pct": 1.0, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
        "model": {"name": "vit_tiny_patch16_224", "num_classes": 3, "drop_path": 0.0,
                  "kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 24, "depth": 2,
                             "num_heads": 2}},
        "mix": {"method": "mixpro", "mask_patch": 8}, "run": {"seed": 0}})
    model = _tiny_vit()
    run = base / "run"
    run.mkdir()
    torch.save({"config": cfg.to_dict(), "model": model.state_dict()}, run / "last.pth")
    return base, run, model


def test_cli_end_to_end(ckpt_and_data, capsys):
    from pipelines.loader import ValLoader
    base, run, model = ckpt_and_data
    out = base / "out"
    rc = ev.main([str(run), "--data", str(base / "val"), "--ood", str(base / "ood"),
                  "--json", str(out / "e.json"), "--table", str(base / "t.md"),
                  "--plot", str(out / "e.png"), "--ratios", "0", "0.5", "--batch-size", "4",
                  "--device", "cpu"])
    assert rc == 0
    res = json.loads((out / "e.json").read_text())
    printed = capsys.readouterr().out
    assert "| top-1 |" in printed and "OOD AUROC" in printed and "non_salient" in printed
    assert (base / "t.md").read_text() == printed
    assert (out / "e.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same numbers by hand over the same loader
    loader = ValLoader(str(base / "val"), batch_size=4, image_size=16, crop_pct=1.0,
                       device="cpu", mean=(0.5,) * 3, std=(0.25,) * 3)
    with torch.no_grad():
        pairs = [(model(b["image"]), b["label"]) for b in loader]
        ood = torch.cat([model(b["image"]).softmax(1).max(1).values for b in ValLoader(
            str(base / "ood"), batch_size=4, image_size=16, crop_pct=1.0, device="cpu",
            mean=(0.5,) * 3, std=(0.25,) * 3)])
    logits = torch.cat([p[0] for p in pairs])
    labels = torch.cat([p[1] for p in pairs])
    assert res["num_samples"] == 18 and res["method"] == "mixpro"
    assert res["top1"] == pytest.approx((logits.argmax(1) == labels).double().mean().item())
    msp = logits.softmax(1).max(1).values
    assert res["ood"]["auroc"] == pytest.approx(mt.auroc(msp.numpy(), ood.numpy()), rel=1e-6)
    assert res["ood"]["num_out"] == 10
    # per OOD class (class_0: 5 images, class_1: 5)
    assert sorted(res["ood"]["by_label"]) == ["0", "1"]
    assert res["ood"]["by_label"]["1"]["auroc"] == pytest.approx(
        mt.auroc(msp.numpy(), ood[5:].numpy()), rel=1e-6)
    assert "| OOD AUROC, OOD label 0 only |" in printed
    assert res["occlusion"]["accuracy"]["salient"][0] == pytest.approx(res["top1"])


def test_cli_errors(ckpt_and_data, capsys, tmp_path):
    base, run, _ = ckpt_and_data
    assert ev.main([str(tmp_path / "nope"), "--data", str(base / "val")]) == 2
    assert "checkpoint" in capsys.readouterr().err
    assert ev.main([str(run), "--data", str(base / "four"), "--device", "cpu"]) == 2
    assert "--data has 4 classes, the model 3" in capsys.readouterr().err
    assert ev.main([str(run), "--data", str(base / "val"), "--ratios", "1.0"]) == 2
    assert "--ratios must lie in [0, 1), got [1.0]" in capsys.readouterr().err
    torch.save({"model": {}}, tmp_path / "plain.pth")
    assert ev.main([str(tmp_path / "plain.pth"), "--data", str(base / "val")]) == 2
    assert "is not a python -m train checkpoint" in capsys.readouterr().err


def test_cli_honours_the_runs_exclude_list_like_training(tmp_path):
    """evaluate builds its loader with the training run's builder (train.main.build_val_loader):
    the run's data.exclude leaves a broken file and a listed good one out, and the images equal
    those of the training run's validation loader."""
    from pipelines.badfiles import BadImageError
    from train.dist import DistInfo
    from train.main import build_loaders

    files, _ = jf.class_tree(tmp_path / "val", classes=3, per_class=6, size=(16, 16), ext=".jpg")
    broken = sorted(files)[4]
    Path(broken).write_bytes(jf.bad_bytes("text", Path(broken).read_bytes()))
    listing = tmp_path / "bad.txt"
    listing.write_text(f"{broken}\tcannot decode\n{sorted(files)[9]}\n")
    data = {"train": str(tmp_path / "val"), "val": str(tmp_path / "val"), "image_size": 16,
            "crop_pct": 1.0, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
            "batch_size": 4, "val_batch_size": 4, "exclude": str(listing)}
    cfg = TrainConfig.from_dict({
        "data": data,
        "model": {"name": "vit_tiny_patch16_224", "num_classes": 3, "drop_path": 0.0,
                  "kwargs": {"img_size": 16, "patch_size": 4, "embed_dim": 24, "depth": 2,
                             "num_heads": 2}},
        "mix": {"method": "none"}, "run": {"seed": 0}})
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"config": cfg.to_dict(), "model": _tiny_vit().state_dict()}, run / "last.pth")
    out = tmp_path / "e.json"
    assert ev.main([str(run), "--data", str(tmp_path / "val"), "--ratios", "0", "--modes",
                    "--batch-size", "4", "--device", "cpu", "--json", str(out), "--quiet"]) == 0
    assert json.loads(out.read_text())["num_samples"] == 16

    val = ev._loader(str(tmp_path / "val"), cfg, 4, "cpu", 1)
    assert val.source.excluded == 2 and str(broken) not in val.source.files
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    train_loader, train_val = build_loaders(cfg, dist, None, data["train"], data["val"])
    train_loader.close()
    for a, b in zip(val, train_val, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    # without the list, the broken file stops the evaluation
    torch.save({"config": {**cfg.to_dict(), "data": {**cfg.to_dict()["data"], "exclude": None}},
                "model": _tiny_vit().state_dict()}, run / "last.pth")
    with pytest.raises(BadImageError, match=r"cannot decode '.*img_004\.jpg'"):
        ev.main([str(run), "--data", str(tmp_path / "val"), "--ratios", "0", "--modes",
                 "--batch-size", "4", "--device", "cpu", "--quiet"])
