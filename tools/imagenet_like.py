"""ImageNet-like JPEGs for benchmarks: realistic sizes, file sizes and content, no download.

    python -m tools.imagenet_like OUT [--images 500] [--classes 10] [--seed 0]

Why not noise: a decoder's and RandAugment's cost depend on the content (entropy coding of
white noise is ~3x the bytes of a photo; smooth fields are ~5x fewer). Each image here is a
natural-image-like field: a 1/f amplitude spectrum (the power law of natural images) with
correlated colour channels, a few soft-edged objects (ellipses and boxes) over it, a sky-like
vertical gradient and mild sensor noise, saved as baseline JPEG with 4:2:0 chroma like most of
ImageNet. Sizes follow ImageNet's most common shapes (500x375, 375x500, 500x333, 500x500 ...).
At the default quality the files average ~110 KB (ImageNet train: ~110 KB, ~400x350 mean).
Deterministic for a seed: image i depends on (seed, i) only.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

__all__ = ["SHAPES", "natural_image", "make_imagenet_like", "main"]

SHAPES = (((375, 500), 0.55), ((500, 375), 0.2), ((333, 500), 0.1), ((500, 500), 0.05),
          ((400, 500), 0.05), ((281, 500), 0.05))
"""(H, W) and share: ImageNet's common shapes, landscape first."""


def _pink_field(rng: np.random.Generator, h: int, w: int, exponent: float) -> np.ndarray:
    """(h, w, 3) float field with amplitude ~ 1/f^exponent, channels correlated like RGB of
    photos (a shared luminance plus weaker chroma), zero mean, unit-ish std."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    amp = 1.0 / np.maximum(np.hypot(fy, fx), 1.0 / max(h, w)) ** exponent   # (h, w//2+1)
    out = []
    for _ in range(3):
        phase = rng.uniform(0, 2 * np.pi, amp.shape)
        out.append(np.fft.irfft2(amp * np.exp(1j * phase), s=(h, w)))
    lum, c1, c2 = (f / (f.std() + 1e-8) for f in out)
    mix = np.array([[1.0, 0.25, 0.1], [1.0, -0.05, -0.1], [1.0, -0.2, 0.3]], np.float32)
    return np.stack([lum, c1, c2], -1).astype(np.float32) @ mix.T               # (h, w, 3)


def _objects(rng: np.random.Generator, img: np.ndarray, texture: np.ndarray, count: int) -> None:
    """Paint `count` soft-edged ellipses/boxes of textured colour onto img (h, w, 3), in place;
    texture: a (h, w, 3) zero-mean field, shifted per object."""
    h, w, _ = img.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for _ in range(count):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(0.08, 0.35) * h, rng.uniform(0.08, 0.35) * w
        if rng.random() < 0.6:
            d = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        else:
            d = np.maximum(np.abs(yy - cy) / ry, np.abs(xx - cx) / rx) ** 2
        alpha = np.clip((1.0 - d) * rng.uniform(4, 30), 0, 1)[..., None]        # (h, w, 1)
        colour = rng.uniform(20, 235, 3).astype(np.float32)
        shade = 1.0 + 0.25 * (yy - cy)[..., None] / max(ry, 1.0) * rng.uniform(-1, 1)
        own = np.roll(texture, (int(rng.integers(h)), int(rng.integers(w))), (0, 1))
        img *= 1 - alpha
        img += alpha * (colour * np.clip(shade, 0.4, 1.6) + own * rng.uniform(10, 35))


def natural_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """One (h, w, 3) uint8 photo-like image drawn from `rng`."""
    exponent = rng.uniform(0.85, 1.15)
    field = _pink_field(rng, h, w, exponent)
    base = rng.uniform(70, 180, 3).astype(np.float32)
    img = base + field * rng.uniform(30, 50)
    sky = np.linspace(1, 0, h, dtype=np.float32)[:, None, None] * rng.uniform(-40, 40, 3)
    img += sky
    _objects(rng, img, field, int(rng.integers(1, 5)))
    img += rng.normal(0, rng.uniform(1.5, 4.0), img.shape).astype(np.float32)   # sensor noise
    return np.clip(img, 0, 255).astype(np.uint8)


def _write(job: tuple) -> None:
    from PIL import Image

    out, seed, i, shape, quality = job
    rng = np.random.default_rng([seed, i])
    shapes = [s for s, _ in SHAPES]
    probs = np.array([p for _, p in SHAPES]) / sum(p for _, p in SHAPES)
    h, w = shape or shapes[rng.choice(len(shapes), p=probs)]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    Image.fromarray(natural_image(rng, h, w)).save(tmp, format="JPEG", quality=quality, subsampling=2)
    tmp.replace(out)                                       # a killed run leaves no partial JPEG


def make_imagenet_like(root: str | Path, n: int, *, classes: int = 10, seed: int = 0,
                       quality: int = 92, shape: tuple[int, int] | None = None,
                       workers: int = 1) -> Path:
    """Write n JPEGs as class folders root/class_XX/img_XXXXX.jpg; returns root. shape: one
    (H, W) for all (small images for a tiny model); default ImageNet's shapes. workers: processes
    (~60 ms per 500x375 image on one core). Files that already exist are kept (a rerun with the
    same arguments is instant)."""
    if n < 1 or classes < 1:
        raise ValueError(f"images and classes must be >= 1, got images={n}, classes={classes}")
    root = Path(root)
    jobs = [(root / f"class_{i % classes:02d}" / f"img_{i:05d}.jpg", seed, i, shape, quality)
            for i in range(n)]
    jobs = [j for j in jobs if not j[0].exists()]
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(workers) as pool:
            pool.map(_write, jobs, chunksize=8)
    else:
        for job in jobs:
            _write(job)
    return root


def describe(root: str | Path) -> dict:
    """Count, mean file size (KB) and mean pixel size of the JPEGs under root."""
    from PIL import Image

    files = sorted(Path(root).rglob("*.jp*g"))
    if not files:
        raise FileNotFoundError(f"no JPEG files under {root}")
    sizes = [f.stat().st_size / 1000 for f in files]
    dims = []
    for f in files[:200]:
        with Image.open(f) as im:
            dims.append(im.size)
    return {"images": len(files), "mean_kb": round(float(np.mean(sizes)), 1),
            "mean_wh": [round(float(np.mean([d[i] for d in dims]))) for i in (0, 1)]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.imagenet_like",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="output folder (class folders are written inside)")
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quality", type=int, default=92)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    a = p.parse_args(argv)
    make_imagenet_like(a.out, a.images, classes=a.classes, seed=a.seed, quality=a.quality,
                       workers=a.workers)
    print(describe(a.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
