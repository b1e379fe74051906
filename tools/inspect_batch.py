"""python -m tools.inspect_batch [--config YAML|NAME] [--section.key value ...] [--batch N]
[--images K] [--out PNG] [--device auto|cpu|cuda]

A picture of what the training pipeline makes: one batch of the configured TrainLoader (the
real DALI pipeline, MaskMix operator included) as a PNG grid. Each tile is one image,
denormalized with data.mean/std, with the model's token grid in thin grey lines and the region
taken from the partner (token_mask == 0) outlined in red; the caption gives the mode, lam,
label_a and label_b. A mixup batch has no region (its images are blends, token_mask all 1).

Worked example: a 2x2 token grid with token_mask [[1, 0], [1, 1]] outlines the top-right token
and captions it lam 0.750.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from mixpro_dali import MODES

__all__ = ["Layout", "denormalize", "render_grid", "captions_for", "load_batch", "main"]

GRID_RGB = (150, 150, 150)
REGION_RGB = (255, 0, 0)
MIN_TILE = 128          # tiles are upscaled (nearest) to at least this many pixels wide


def mode_name(code: int) -> str:
    """A mode code's name, read from the live mode table (modes registered later included)."""
    return next((name for name, c in MODES.items() if c == code), "?")


@dataclass(frozen=True)
class Layout:
    """Where things are in the PNG: tile k's image spans [x0, x0 + tile_w) x [y0, y0 + tile_h)
    with (y0, x0) = origin(k); one token is `token` pixels square."""
    cols: int
    rows: int
    scale: int
    token: int
    tile_h: int
    tile_w: int
    caption_h: int
    pad: int

    def origin(self, k: int) -> tuple[int, int]:
        r, c = divmod(k, self.cols)
        return (self.pad + r * (self.tile_h + self.caption_h + self.pad),
                self.pad + c * (self.tile_w + self.pad))

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the whole picture."""
        return (self.pad + self.cols * (self.tile_w + self.pad),
                self.pad + self.rows * (self.tile_h + self.caption_h + self.pad))


def denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(B, 3, H, W) normalized -> (B, H, W, 3) uint8: x * std + mean, clipped to [0, 1]."""
    x = images.detach().float().cpu()
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    x = (x * s + m).clamp(0, 1).mul(255).round().to(torch.uint8)   # (B, 3, H, W)
    return x.permute(0, 2, 3, 1).numpy()


def make_layout(n: int, height: int, width: int, patch: int, cols: int | None = None) -> Layout:
    cols = cols or math.ceil(math.sqrt(n))
    scale = max(1, math.ceil(MIN_TILE / width))
    return Layout(cols=cols, rows=math.ceil(n / cols), scale=scale, token=patch * scale,
                  tile_h=height * scale, tile_w=width * scale, caption_h=26, pad=6)


def _outline(draw: ImageDraw.ImageDraw, keep: np.ndarray, y0: int, x0: int, t: int) -> None:
    """Red edges around the token_mask == 0 region: every token side between a partner token
    and a kept token or the image border. keep: (h, w) bool."""
    h, w = keep.shape
    padded = np.pad(keep, 1, constant_values=True)              # (h + 2, w + 2)
    for i in range(h):
        for j in range(w):
            if keep[i, j]:
                continue
            top, left = y0 + i * t, x0 + j * t
            if padded[i, j + 1]:        # above
                draw.line([(left, top), (left + t - 1, top)], fill=REGION_RGB, width=1)
            if padded[i + 2, j + 1]:    # below
                draw.line([(left, top + t - 1), (left + t - 1, top + t - 1)], fill=REGION_RGB)
            if padded[i + 1, j]:        # left
                draw.line([(left, top), (left, top + t - 1)], fill=REGION_RGB)
            if padded[i + 1, j + 2]:    # right
                draw.line([(left + t - 1, top), (left + t - 1, top + t - 1)], fill=REGION_RGB)


def render_grid(images: np.ndarray, token_mask: torch.Tensor, captions: Sequence[str], *,
                patch: int, cols: int | None = None) -> tuple[Image.Image, Layout]:
    """images (B, H, W, 3) uint8, token_mask (B, h, w) with h = H / patch -> (PNG image, layout).
    Token grid lines lie on each token's first row/column (grey); region edges on the partner
    tokens' border pixels (red), drawn last."""
    b, hgt, wid, _ = images.shape
    lay = make_layout(b, hgt, wid, patch, cols)
    canvas = Image.new("RGB", lay.size, (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    keep = token_mask.detach().cpu().numpy().astype(bool)       # (B, h, w)
    for k in range(b):
        y0, x0 = lay.origin(k)
        tile = Image.fromarray(images[k]).resize((lay.tile_w, lay.tile_h), Image.NEAREST)
        canvas.paste(tile, (x0, y0))
        for g in range(1, keep.shape[1]):
            draw.line([(x0, y0 + g * lay.token), (x0 + lay.tile_w - 1, y0 + g * lay.token)],
                      fill=GRID_RGB)
        for g in range(1, keep.shape[2]):
            draw.line([(x0 + g * lay.token, y0), (x0 + g * lay.token, y0 + lay.tile_h - 1)],
                      fill=GRID_RGB)
        _outline(draw, keep[k], y0, x0, lay.token)
        draw.multiline_text((x0, y0 + lay.tile_h + 2), captions[k], fill=(0, 0, 0), font=font,
                            spacing=2)
    return canvas, lay


def captions_for(batch: dict[str, torch.Tensor], classes: Sequence[str] = ()) -> list[str]:
    """'maskmix lam 0.750' / 'a 3 b 7' (class names, shortened, when the source has them)."""
    def name(i: int) -> str:
        short = re.sub(r"^\d+[_-]", "", classes[i])[:7] if i < len(classes) else ""
        return f"{i} {short}" if short and short != str(i) else str(i)
    out = []
    for k in range(len(batch["lam"])):
        mode = mode_name(int(batch["mode"][k]))
        out.append(f"{mode} lam {float(batch['lam'][k]):.3f}\n"
                   f"a {name(int(batch['label_a'][k]))}  b {name(int(batch['label_b'][k]))}")
    return out


def load_batch(cfg, *, index: int, device: str) -> tuple[dict[str, torch.Tensor], list[str], int]:
    """Batch `index` (0-based, of epoch 0) of the TrainLoader that `python -m train` would
    build for cfg -> (batch, class names, model patch size)."""
    from train.dist import init_distributed
    from train.losses import mix_config_for
    from train.main import build_loaders, build_model, resolve_data

    dist = init_distributed(device)
    train_src, val_src = resolve_data(cfg, dist)
    _, patch = build_model(cfg)                    # the token grid the labels are made for
    mix_cfg = mix_config_for(cfg.mix.method, cfg.mix.label_variant,
                             image_size=cfg.data.image_size, patch_size=patch,
                             mask_patch=cfg.mix.mask_patch, seed=cfg.run.seed,
                             options=cfg.mix.options)
    train, val = build_loaders(cfg, dist, mix_cfg, train_src, val_src)
    val.close()
    try:
        if not 0 <= index < len(train):
            raise ValueError(f"--batch must be in [0, {len(train)}) (batches per epoch at "
                             f"data.batch_size={cfg.data.batch_size}), got {index}")
        for k, batch in enumerate(train):
            if k == index:
                return batch, list(getattr(train.source, "classes", ()) or ()), patch
    finally:
        train.close()
    raise AssertionError("unreachable: the loader yields len(loader) batches")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tools.inspect_batch",
        description="Write a PNG grid of one batch of the configured training pipeline: images "
                    "denormalized, token grid, mixed region (token_mask) outlined, mode, lam, "
                    "label_a / label_b as captions.",
        epilog="Config keys are overridden as in python -m train (--section.key value), e.g. "
               "--data.train DIR --data.val DIR --mix.method maskmix --run.seed 3.")
    p.add_argument("--config", default=None,
                   help="YAML file or packaged config name (default: the Fashion-MNIST demo)")
    p.add_argument("--batch", type=int, default=0, help="batch index in epoch 0 (default 0)")
    p.add_argument("--images", type=int, default=16,
                   help="images to show, the first of the batch (default 16, at most the batch)")
    p.add_argument("--cols", type=int, default=None, help="tiles per row (default: square)")
    p.add_argument("--out", default="batch.png", help="PNG to write (default batch.png)")
    p.add_argument("--device", default=None, choices=("auto", "cpu", "cuda"),
                   help="pipeline device (default: the config's run.device)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from pipelines.logs import setup_logging
    from train.__main__ import DEFAULT_CONFIG, parse_overrides
    from train.config import TrainConfig, apply_overrides, load_yaml, resolve_config_path

    args, rest = _parser().parse_known_args(argv)
    setup_logging()             # the demo data's preparation messages, as under python -m train
    try:
        if args.images < 1:
            raise ValueError(f"--images must be >= 1, got {args.images}")
        if args.cols is not None and args.cols < 1:
            raise ValueError(f"--cols must be >= 1, got {args.cols}")
        base = load_yaml(resolve_config_path(args.config or DEFAULT_CONFIG))
        cfg = TrainConfig.from_dict(apply_overrides(base, parse_overrides(rest)))
        batch, classes, patch = load_batch(cfg, index=args.batch,
                                           device=args.device or cfg.run.device)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"python -m tools.inspect_batch: error: {e}", file=sys.stderr)
        return 2
    n = min(args.images, len(batch["lam"]))
    part = {k: v[:n] for k, v in batch.items()}
    images = denormalize(part["image"], cfg.data.mean, cfg.data.std)     # (n, H, W, 3)
    picture, _ = render_grid(images, part["token_mask"], captions_for(part, classes),
                             patch=patch, cols=args.cols)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(out, optimize=True)
    modes = sorted({mode_name(int(m)) for m in part["mode"].reshape(-1)})
    print(f"{out}: batch {args.batch}, {n} images ({picture.width}x{picture.height} px), mode "
          f"{'/'.join(modes)}, lam mean {float(part['lam'].mean()):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
