"""`python -m train` with the packaged CA-Swin / CA-PVT configs (tiny overrides, DALI on the CPU,
real JPEGs): PAL / TransMix labels read the final-stage class attention; bad geometry is
refused before training starts."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from train.__main__ import resolve
from train.main import run

SWIN_KW = "{img_size: 64, embed_dim: 8, depths: [1, 1, 1, 2], num_heads: [1, 1, 2, 2], " \
          "window_size: 4}"
PVT_KW = "{embed_dims: [8, 16, 16, 32], depths: [1, 1, 1, 2], num_heads: [1, 1, 2, 2]}"
KWARGS = {"swin": SWIN_KW, "pvt_v2_b1": PVT_KW}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """root/{train,val}/c<k>/*.jpg, 64 px: class k is a bright square in quadrant k."""
    root = tmp_path_factory.mktemp("ca_tree")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for c in range(3):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 60, (64, 64, 3), dtype=np.uint8)
                r, q = divmod(c, 2)
                img[r * 32:(r + 1) * 32, q * 32:(q + 1) * 32] = 230
                Image.fromarray(img).save(root / split / f"c{c}" / f"{i}.jpg", quality=95)
    return root


def argv(config: str, tree: Path, out: Path, **extra: str) -> list[str]:
    family = "swin" if "swin" in config else "pvt_v2_b1"
    opts = {"data.train": str(tree / "train"), "data.val": str(tree / "val"),
            "data.image_size": "64", "data.batch_size": "8", "data.val_batch_size": "6",
            "data.num_threads": "1", "model.num_classes": "3", "model.kwargs": KWARGS[family],
            "mix.mask_patch": "32", "run.epochs": "2", "optim.warmup_epochs": "0.5",
            "optim.lr_base_batch": "null", "run.output": str(out), "run.progress": "lines",
            "run.log_every": "1000", "run.tensorboard": "false", **extra}
    return ["--config", config, *(x for k, v in opts.items() for x in (f"--{k}", v))]


@pytest.mark.parametrize("config", ["mixpro_ca_swin_tiny", "mixpro_ca_pvt_v2_b1",
                                    "transmix_ca_swin_tiny"])
def test_packaged_ca_configs_train_with_attention_labels(config, tree, tmp_path):
    cfg, _, name = resolve(argv(config, tree, tmp_path / "run"))
    assert cfg.model.name.startswith("ca_") and cfg.run.epochs == 2
    res = run(cfg, name=name)
    assert math.isfinite(res["train_loss"]) and res["history"][0]["count"] == 12
    rows = list(csv.DictReader((tmp_path / "run" / "summary.csv").open()))
    assert len(rows) == 2
    if cfg.mix.method == "mixpro":  # PAL ran on the MaskMix batches, on the final-stage map
        alphas = [float(r["train_pal_alpha_mean"]) for r in rows]
        assert any(0.0 < a <= 1.0 for a in alphas), alphas


def test_packaged_recipes():
    cfg, _, _ = resolve(["--config", "mixpro_ca_swin_tiny", "--data.train", "/x",
                         "--data.val", "/y"])
    o = cfg.optim
    assert (cfg.model.name, cfg.model.drop_path, cfg.run.epochs) == (
        "ca_swin_tiny_patch4_window7_224", 0.2, 300)
    assert (o.lr, o.lr_base_batch, o.weight_decay, o.warmup_epochs, o.clip_grad) == (
        1e-3, 1024, 0.05, 20, 5.0)
    assert cfg.mix.mask_patch % 32 == 0 and cfg.mix.method == "mixpro"
    t, _, _ = resolve(["--config", "transmix_ca_swin_tiny", "--data.train", "/x",
                       "--data.val", "/y"])
    assert t.mix.method == "transmix" and t.model == cfg.model and t.optim.lr == o.lr
    p, _, _ = resolve(["--config", "mixpro_ca_pvt_v2_b1", "--data.train", "/x",
                       "--data.val", "/y"])
    assert (p.model.name, p.model.drop_path, p.run.epochs, p.optim.lr) == (
        "ca_pvt_v2_b1", 0.1, 300, 1e-3)


def test_mask_cells_finer_than_the_final_stride_are_refused(tree, tmp_path):
    cfg, _, _ = resolve(argv("mixpro_ca_swin_tiny", tree, tmp_path / "run",
                             **{"mix.mask_patch": "16"}))
    with pytest.raises(ValueError, match=r"mask_patch=16 px is not a multiple of the final-stage "
                                         r"stride \(32 px\) of CaSwinTransformer.*use mask_patch "
                                         r"32 or 64"):
        run(cfg)
    assert not (tmp_path / "run" / "last.pth").exists()


def test_image_size_must_tile_the_final_stage_grid(tree, tmp_path):
    cfg, _, _ = resolve(argv("mixpro_ca_pvt_v2_b1", tree, tmp_path / "run",
                             **{"data.image_size": "48"}))
    with pytest.raises(ValueError, match=r"image size 48x48 is not a multiple of the final-stage "
                                         r"stride \(32 px\) of CaPyramidVisionTransformerV2"):
        run(cfg)


def test_plain_swin_with_pal_points_to_the_ca_variant(tree, tmp_path):
    cfg, _, _ = resolve(argv("mixpro_ca_swin_tiny", tree, tmp_path / "run",
                             **{"model.name": "swin_tiny_patch4_window7_224"}))
    with pytest.raises(ValueError, match=r"SwinTransformer has no class token.*method='area'.*"
                                         r"ca_swin_tiny_patch4_window7_224"):
        run(cfg)


def test_evaluate_occludes_the_final_stage_tokens_of_ca_models():
    """train.evaluate's salient occlusion orders A's tokens: 32-px patches for CA-Swin."""
    import timm
    import torch
    from train.evaluate import evaluate_model
    torch.manual_seed(0)
    model = timm.create_model("ca_swin_tiny_patch4_window7_224", num_classes=3, img_size=64,
                              embed_dim=8, depths=(1, 1, 1, 2), num_heads=(1, 1, 2, 2),
                              window_size=4)
    batch = {"image": torch.randn(5, 3, 64, 64), "label": torch.tensor([0, 1, 2, 0, 1])}
    res = evaluate_model(model, [batch], patch=4, mean=(0.5,) * 3, std=(0.5,) * 3,
                         ratios=(0.0, 0.5, 0.75))
    occ = res["occlusion"]
    assert occ["patch"] == 32 and occ["samples"] == 5
    assert all(len(v) == 3 for v in occ["accuracy"].values())
