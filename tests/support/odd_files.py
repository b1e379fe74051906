"""A corpus of real odd image files nobody here wrote: Pillow's own test images (Tests/images
of its source distribution, ~1,060 files: every format and variant Pillow has met, broken
files from fuzzers included), fetched once with pip into the repo's gitignored .cache/."""
from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import PIL

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "pillow"

# One or more of every failure class the deep scan knows, and the good files it must keep
# (the default tests scan these plus every 6th other file; `slow` scans all).
MUST = (
    "balloon_eciRGBv2_aware.jp2",          # JPEG 2000 + ICC: DALI fails, then the process dies
    "00r1_graya_la.jp2", "unknown_mode.j2k",   # "nvImageCodec failure" naming no file
    "jpeg_ff00_header.jpg", "photoshop-200dpi-broken.jpg", "truncated_jpeg.jpg",
    "hopper_bigtiff.tif",                   # good: DALI decodes it exactly
    "bmp/b/badheadersize.bmp", "bmp/g/rgb32bf.bmp",     # good for DALI, unreadable by Pillow: kept
    "12bit.cropped.tif", "12in16bit.tif",   # 16-bit with 12-bit data: black after 1/257
    "tiff_strip_planar_16bit_RGB.tiff", "tiff_tiled_planar_16bit_RGB.tiff",   # nondeterministic
    "hopper_orientation_6.webp", "exif_imagemagick_orientation.png",          # EXIF ignored
    "apng/delay.png", "hopper.Lab.tif", "bmp/q/rgb32h52.bmp", "mmap_error.bmp", "rdf.tif",
    "hopper.gif", "hopper.psd", "hopper.dds", "16_bit_binary_pgm.tiff",
    "hopper_orientation_6.jpg", "pil_sample_cmyk.jpg", "hopper_gray.jpg", "pil168.tif",
)


def pillow_images() -> Path | str:
    """Tests/images of the installed Pillow's source distribution, or why it is unavailable."""
    version = PIL.__version__
    images = CACHE / f"pillow-{version}" / "Tests" / "images"
    if (images / "hopper.jpg").exists():
        return images
    sdist = CACHE / f"pillow-{version}.tar.gz"
    if not sdist.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                 f"pillow=={version}", "-d", str(CACHE)], capture_output=True, text=True,
                timeout=600)
        except subprocess.TimeoutExpired:
            return "pip download of Pillow's sdist timed out (offline?)"
        if proc.returncode != 0 or not sdist.exists():
            return f"cannot fetch Pillow {version}'s sdist (offline?): {proc.stderr[-300:]}"
    prefix = f"pillow-{version}/Tests/images/"
    with tarfile.open(sdist) as tf:
        members = [m for m in tf.getmembers() if m.name.startswith(prefix) and m.isfile()]
        try:
            tf.extractall(CACHE, members=members, filter="data")
        except TypeError:                      # Python without tarfile filters
            tf.extractall(CACHE, members=members)
    return images


def corpus_files(images: Path, *, subset: bool) -> list[Path]:
    """Every file of the corpus, or the deterministic subset: MUST plus every 6th other."""
    files = sorted(p for p in images.rglob("*") if p.is_file())
    if not subset:
        return files
    must = {images / m for m in MUST}
    missing = [m for m in MUST if images / m not in set(files)]
    assert not missing, f"corpus lacks {missing}"
    rest = [p for p in files if p not in must]
    return sorted(must) + rest[::6]


def corpus_tree(images: Path, files: list[Path], root: Path, classes: int = 4) -> dict[str, Path]:
    """A class-folder tree of copies renamed .JPEG (as scraped data sets hold them):
    {tree path: original}."""
    made = {}
    for i, src in enumerate(files):
        name = str(src.relative_to(images)).replace("/", "__") + ".JPEG"
        dst = root / f"c{i % classes}" / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        made[str(dst)] = src
    return made
