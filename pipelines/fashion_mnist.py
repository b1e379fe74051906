"""The embedded default dataset: Fashion-MNIST as a cached class-folder JPEG tree.

`prepare_fashion_mnist()` finds the four IDX files, takes a class-balanced subset (the first
`train_size / 10` images of each class from the official training split, the first
`val_size / 10` of each class from the official test split), pads each 28x28 image to
`image_size` (black border, so a patch-4 ViT sees an 8x8 token grid at 32 px) and writes:

    <cache>/fashion-mnist-<train_size>-<val_size>-<image_size>px/
        train/00_t-shirt_top/000123.jpg ...      val/...      (class index = sorted folder order)

Done once: the tree is built in a temp folder beside the target and renamed into place, so an
interrupted build leaves nothing half-written and concurrent builders (DDP ranks) are safe.

Where the IDX files come from, first hit wins:
  1. `raw_dir` if given;
  2. /usr/share/datasets/fashion-mnist (Debian package `dataset-fashion-mnist`);
  3. <cache>/raw (extracted by an earlier run);
  4. `apt-get download dataset-fashion-mnist` + `dpkg-deb -x` into <cache>/raw (no root needed);
  5. the public download URL (Zalando Research's mirror).
"""
from __future__ import annotations

import gzip
import logging
import os
import shutil
import subprocess
import tempfile
import urllib.request
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

__all__ = ["CLASSES", "FILES", "default_cache_dir", "find_raw", "read_idx", "prepare_fashion_mnist"]

logger = logging.getLogger(__name__)
Log = Callable[[str], None] | None   # a caller's own log(message); None: this module's logger


def _say(log: Log, message: str, level: int = logging.INFO) -> None:
    if log is None:
        logger.log(level, message)
    else:
        log(message)

CLASSES = ("t-shirt_top", "trouser", "pullover", "dress", "coat",
           "sandal", "shirt", "sneaker", "bag", "ankle_boot")
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
DEB_PACKAGE = "dataset-fashion-mnist"
URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
HOW_TO_GET = (
    "Fashion-MNIST was not found and could not be fetched. Get it one of these ways, then rerun:\n"
    f"  sudo apt-get install {DEB_PACKAGE}      (files land in {SYSTEM_DIR})\n"
    f"  or download the four files {', '.join(FILES.values())}\n"
    f"  from {URL} into a folder and pass it as data.demo_raw_dir (--data.demo_raw_dir DIR)\n"
    "  or train on your own data: --data.train DIR --data.val DIR"
)


def default_cache_dir() -> Path:
    """$MIXPRO_DALI_CACHE, else $XDG_CACHE_HOME/mixpro-dali, else ~/.cache/mixpro-dali."""
    env = os.environ.get("MIXPRO_DALI_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mixpro-dali"


def _has_all(folder: Path) -> bool:
    return all((folder / f).is_file() for f in FILES.values())


def _from_deb(raw: Path, log: Log) -> bool:
    """apt-get download + dpkg-deb -x into raw/ (works without root); False if unavailable."""
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        return False
    with tempfile.TemporaryDirectory(dir=raw.parent) as tmp:
        _say(log, f"fetching Debian package {DEB_PACKAGE} (30 MB) ...")
        try:
            subprocess.run(["apt-get", "download", DEB_PACKAGE], cwd=tmp, check=True,
                           capture_output=True, timeout=600)
            debs = list(Path(tmp).glob("*.deb"))
            if not debs:
                return False
            subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(Path(tmp) / "x")], check=True,
                           capture_output=True, timeout=600)
        except (subprocess.SubprocessError, OSError) as e:
            _say(log, f"  apt-get download failed: {str(e).strip()[:200]}", logging.WARNING)
            return False
        src = Path(tmp) / "x" / SYSTEM_DIR.relative_to("/")
        if not _has_all(src):
            return False
        raw.mkdir(parents=True, exist_ok=True)
        for f in FILES.values():
            os.replace(src / f, raw / f)
    return True


def _from_url(raw: Path, log: Log) -> bool:
    raw.mkdir(parents=True, exist_ok=True)
    try:
        for f in FILES.values():
            if (raw / f).is_file():
                continue
            _say(log, f"downloading {URL}{f} ...")
            tmp = raw / (f + ".part")
            with urllib.request.urlopen(URL + f, timeout=60) as r, open(tmp, "wb") as out:
                shutil.copyfileobj(r, out)
            os.replace(tmp, raw / f)
    except OSError as e:
        _say(log, f"  download failed: {e}", logging.WARNING)
        return False
    return True


def find_raw(cache_dir: Path, raw_dir: str | Path | None = None, *, download: bool = True,
             log: Log = None) -> Path:
    """The folder holding the four IDX .gz files (see the module docstring for the order)."""
    if raw_dir is not None:
        raw_dir = Path(raw_dir)
        if not _has_all(raw_dir):
            raise FileNotFoundError(
                f"data.demo_raw_dir={str(raw_dir)!r} must hold {', '.join(FILES.values())}")
        return raw_dir
    cached = Path(cache_dir) / "raw"
    for folder in (SYSTEM_DIR, cached):
        if _has_all(folder):
            return folder
    if download:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        if _from_deb(cached, log) or _from_url(cached, log):
            if _has_all(cached):
                return cached
    raise FileNotFoundError(HOW_TO_GET)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip'ed): uint8 images (N, 28, 28) or labels (N,)."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    ndim = magic & 0xFF
    if magic >> 8 != 0x08 or ndim not in (1, 3):
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {magic:#x})")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: truncated ({arr.size} bytes for shape {shape})")
    return arr.reshape(shape)


def _balanced(labels: np.ndarray, n: int) -> np.ndarray:
    """Indices of the first n/10 samples of each class (sorted): deterministic, balanced."""
    per = n // len(CLASSES)
    idx = [np.flatnonzero(labels == c)[:per] for c in range(len(CLASSES))]
    if any(len(i) < per for i in idx):
        raise ValueError(f"subset of {n} asks for {per} per class, more than the split has")
    return np.sort(np.concatenate(idx))


def _write_split(root: Path, images: np.ndarray, labels: np.ndarray, index: np.ndarray,
                 image_size: int, quality: int) -> None:
    pad = image_size - images.shape[1]
    lo = pad // 2
    for c, name in enumerate(CLASSES):
        (root / f"{c:02d}_{name}").mkdir(parents=True)
    canvas = np.zeros((image_size, image_size), np.uint8)
    for i in index:
        canvas[lo:lo + images.shape[1], lo:lo + images.shape[2]] = images[i]
        c = int(labels[i])
        Image.fromarray(canvas).save(root / f"{c:02d}_{CLASSES[c]}" / f"{i:06d}.jpg",
                                     quality=quality)


def prepare_fashion_mnist(cache_dir: str | Path | None = None, *, train_size: int = 20000,
                          val_size: int = 5000, image_size: int = 32, raw_dir=None,
                          download: bool = True, quality: int = 95, log: Log = None) -> Path:
    """Build (once) and return the root holding train/ and val/ class folders. Progress goes to
    `log(message)` when given, else to this module's logger (INFO; failed downloads: WARNING)."""
    for name, n, hi in (("train_size", train_size, 60000), ("val_size", val_size, 10000)):
        if isinstance(n, bool) or not isinstance(n, int) or not 10 <= n <= hi or n % 10:
            raise ValueError(f"{name} must be a multiple of 10 in [10, {hi}], got {n!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 28:
        raise ValueError(f"image_size must be an int >= 28 (images are padded), got {image_size!r}")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = cache_dir / f"fashion-mnist-{train_size}-{val_size}-{image_size}px"
    if (root / "train").is_dir() and (root / "val").is_dir():
        return root
    raw = find_raw(cache_dir, raw_dir, download=download, log=log)
    _say(log, f"converting Fashion-MNIST ({raw}) -> {root} "
              f"({train_size} train / {val_size} val JPEGs, {image_size} px) ...")
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=root.name + ".tmp-", dir=cache_dir))
    try:
        for split, src, n in (("train", "train", train_size), ("val", "test", val_size)):
            images = read_idx(raw / FILES[f"{src}_images"])
            labels = read_idx(raw / FILES[f"{src}_labels"])
            _write_split(tmp / split, images, labels, _balanced(labels, n), image_size, quality)
        try:
            os.rename(tmp, root)
        except OSError:  # another process finished first: keep theirs
            if not (root / "val").is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
