"""python -m tools.inspect_batch: the PNG shows batch N of the trainer's own TrainLoader, with
the red outline exactly on the token_mask == 0 region and the images denormalized."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import jpeg_factory as jf
from tools import inspect_batch as ib
from train.__main__ import resolve
from train.dist import init_distributed
from train.losses import mix_config_for
from train.main import build_loaders, build_model


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect") / "train"
    jf.class_tree(root, classes=3, per_class=8, size=(48, 64))
    return root


def overrides(tree, device: str) -> list[str]:
    """The demo config on a JPEG tree: 32 px images, 4x4 tokens of 8 px, MaskMix cells of
    2x2 tokens, one mask ratio per image (so lam differs within the batch)."""
    return ["--data.demo", "false", "--data.train", str(tree), "--data.val", str(tree),
            "--data.image_size", "32", "--data.batch_size", "8", "--data.val_batch_size", "8",
            "--model.num_classes", "3", "--model.kwargs.img_size", "32",
            "--model.kwargs.patch_size", "8", "--mix.method", "maskmix", "--mix.mask_patch", "16",
            "--mix.options.per_sample_ratio", "true", "--run.seed", "3", "--run.device", device]


def trainer_batch(argv: list[str], index: int) -> dict[str, torch.Tensor]:
    """Batch `index` as python -m train's own set-up builds it (not through the inspector)."""
    cfg, _, _ = resolve(argv)
    dist = init_distributed(cfg.run.device)
    _, patch = build_model(cfg)
    mix = mix_config_for(cfg.mix.method, cfg.mix.label_variant, image_size=32, patch_size=patch,
                         mask_patch=16, seed=3, options=cfg.mix.options)
    train, val = build_loaders(cfg, dist, mix, cfg.data.train, cfg.data.val)
    val.close()
    with train:
        return [b for _, b in zip(range(index + 1), train)][index]


def red(px) -> bool:
    return tuple(px) == ib.REGION_RGB


def test_png_outlines_the_token_mask_of_the_trainers_batch(tree, tmp_path, device, capsys):
    argv = overrides(tree, device)
    out = tmp_path / "grid.png"
    assert ib.main([*argv, "--batch", "1", "--images", "6", "--cols", "3", "--out", str(out)]) == 0
    assert f"{out}: batch 1, 6 images" in capsys.readouterr().out
    batch = trainer_batch(argv, 1)
    keep = batch["token_mask"][:6].cpu().numpy().astype(bool)           # (6, 4, 4)
    assert keep.shape == (6, 4, 4) and (~keep).any() and keep.any()
    assert len(set(batch["lam"][:6].tolist())) > 1                      # per-image ratios

    png = np.asarray(Image.open(out).convert("RGB"))                     # (H, W, 3)
    lay = ib.make_layout(6, 32, 32, 8, cols=3)
    assert (lay.cols, lay.rows, lay.scale, lay.token) == (3, 2, 4, 32)
    assert png.shape == (lay.size[1], lay.size[0], 3) == (326, 408, 3)
    images = ib.denormalize(batch["image"][:6], (0.286,) * 3, (0.353,) * 3)  # (6, 32, 32, 3)
    t, m = lay.token, lay.token // 2
    for k in range(6):
        y0, x0 = lay.origin(k)
        padded = np.pad(keep[k], 1, constant_values=True)
        for i in range(4):
            for j in range(4):
                top, left = y0 + i * t, x0 + j * t
                # the image itself, upscaled (nearest) by 4, at every token's centre
                assert (png[top + m, left + m] == images[k, i * 8 + 4, j * 8 + 4]).all()
                sides = {"top": (top, left + m), "bottom": (top + t - 1, left + m),
                         "left": (top + m, left), "right": (top + m, left + t - 1)}
                across = {"top": padded[i, j + 1], "bottom": padded[i + 2, j + 1],
                          "left": padded[i + 1, j], "right": padded[i + 1, j + 2]}
                for side, (y, x) in sides.items():
                    edge = not keep[k, i, j] and across[side]
                    assert red(png[y, x]) == edge, (k, i, j, side)


def test_worked_example_of_the_docstring():
    """2x2 tokens, token_mask [[1, 0], [1, 1]]: only the top-right token is outlined."""
    images = np.zeros((1, 4, 4, 3), np.uint8)
    mask = torch.tensor([[[1, 0], [1, 1]]], dtype=torch.uint8)
    pic, lay = ib.render_grid(images, mask, ["maskmix lam 0.750"], patch=2)
    px = np.asarray(pic)
    y0, x0 = lay.origin(0)
    reds = np.argwhere((px == ib.REGION_RGB).all(-1))
    t = lay.token
    assert reds[:, 0].min() == y0 and reds[:, 0].max() == y0 + t - 1
    assert reds[:, 1].min() == x0 + t and reds[:, 1].max() == x0 + 2 * t - 1
    assert len(reds) == 4 * (t - 1)                   # the four sides of one t x t square


def test_denormalize_inverts_the_pipelines_normalization():
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = torch.from_numpy(raw).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert (ib.denormalize(x.half(), mean, std).astype(int) - raw).__abs__().max() <= 1
    assert (ib.denormalize(x, mean, std) == raw).all()


def test_captions_name_mode_lam_and_both_labels():
    batch = {"lam": torch.tensor([0.75, 1.0]), "mode": torch.tensor([3, 3], dtype=torch.int32),
             "label_a": torch.tensor([2, 0]), "label_b": torch.tensor([0, 0])}
    assert ib.captions_for(batch, ["00_t-shirt_top", "01_trouser", "pullover"]) == [
        "maskmix lam 0.750\na 2 pullove  b 0 t-shirt", "maskmix lam 1.000\na 0 t-shirt  b 0 t-shirt"]
    assert ib.captions_for(batch)[0] == "maskmix lam 0.750\na 2  b 0"


@pytest.mark.parametrize("extra, message", [
    (["--batch", "3"], r"--batch must be in \[0, 3\)"),
    (["--images", "0"], "--images must be >= 1, got 0"),
    (["--mix.bogus", "1"], "bogus"),
])
def test_errors_name_the_option(tree, tmp_path, extra, message, capsys):
    out = tmp_path / "x.png"
    assert ib.main([*overrides(tree, "cpu"), *extra, "--out", str(out)]) == 2
    import re
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()


def test_mode_names_follow_the_live_mode_table(monkeypatch):
    from mixpro_dali import MODES
    assert [ib.mode_name(MODES[m]) for m in ("none", "mixup", "cutmix", "maskmix")] == [
        "none", "mixup", "cutmix", "maskmix"]
    assert ib.mode_name(98) == "?"
    monkeypatch.setitem(MODES, "toy", 98)          # a mode registered after the import
    assert ib.mode_name(98) == "toy"
