"""Encode real image files for the tests: every JPEG flavour ImageNet holds, bad files, and the
three source layouts (class folders, `path label` list, WebDataset tars)."""
from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

FLAVOURS = ("rgb", "gray", "cmyk", "progressive", "420", "422", "444", "exif_rotated",
            "tiny", "png_as_jpg", "palette_png", "rgba_png")
BAD_KINDS = ("truncated", "zero_bytes", "text", "header_only", "no_eoi")


def smooth_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w, 3) uint8: a colour gradient plus noise (compresses like a photo, not like noise)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(0, 255, 3)
    slope = rng.uniform(-2, 2, (2, 3))
    img = base + y[..., None] * slope[0] * 100 / max(h, 1) + x[..., None] * slope[1] * 100 / max(w, 1)
    img += rng.normal(0, 12, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(arr: np.ndarray, flavour: str = "rgb", quality: int = 90) -> bytes:
    """Encode `arr` (h, w, 3) uint8 as `flavour` (see FLAVOURS)."""
    im = Image.fromarray(arr)
    buf = io.BytesIO()
    if flavour in ("rgb", "420"):
        im.save(buf, "JPEG", quality=quality, subsampling=2)
    elif flavour == "422":
        im.save(buf, "JPEG", quality=quality, subsampling=1)
    elif flavour == "444":
        im.save(buf, "JPEG", quality=quality, subsampling=0)
    elif flavour == "gray":
        im.convert("L").save(buf, "JPEG", quality=quality)
    elif flavour == "cmyk":
        im.convert("CMYK").save(buf, "JPEG", quality=quality)
    elif flavour == "progressive":
        im.save(buf, "JPEG", quality=quality, progressive=True)
    elif flavour == "exif_rotated":
        exif = Image.Exif()
        exif[0x0112] = 6                         # orientation: rotate 90 CW to display
        im.save(buf, "JPEG", quality=quality, exif=exif)
    elif flavour == "tiny":
        im.resize((3, 2)).save(buf, "JPEG", quality=quality)
    elif flavour == "png_as_jpg":
        im.save(buf, "PNG")
    elif flavour == "palette_png":
        im.convert("P").save(buf, "PNG")
    elif flavour == "rgba_png":
        im.convert("RGBA").save(buf, "PNG")
    else:
        raise ValueError(f"unknown flavour {flavour!r}; valid: {FLAVOURS}")
    return buf.getvalue()


def bad_bytes(kind: str, good: bytes) -> bytes:
    """Bytes of a broken file made from the good JPEG `good`."""
    if kind == "truncated":
        return good[: len(good) // 2]
    if kind == "zero_bytes":
        return b""
    if kind == "text":
        return b"<html>404 Not Found</html>\n" * 4
    if kind == "header_only":
        return good[:200]
    if kind == "no_eoi":
        return good[:-2]
    raise ValueError(f"unknown bad kind {kind!r}; valid: {BAD_KINDS}")


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def class_tree(root: Path, *, classes: int = 3, per_class: int = 8, size=(48, 64),
               flavours=("rgb",), seed: int = 0, ext: str = ".JPEG") -> tuple[list[str], list[int]]:
    """root/class_<k>/img_<i><ext>, flavours cycled over all files. Returns (files, labels),
    files absolute, sorted as the loaders list them."""
    rng = np.random.default_rng(seed)
    files, labels, n = [], [], 0
    for k in range(classes):
        for i in range(per_class):
            arr = smooth_image(rng, *size)
            p = write(root / f"class_{k}" / f"img_{i:03d}{ext}", encode(arr, flavours[n % len(flavours)]))
            files.append(str(p.resolve()))
            labels.append(k)
            n += 1
    return files, labels


def indexed_images(root: Path, n: int, *, size=(40, 40), seed: int = 1) -> list[str]:
    """n JPEGs, image i uniformly coloured so its index can be read back from any crop:
    R = 10 * (i % 25) + 5, G = 10 * (i // 25) + 5 (up to 625 images)."""
    assert n <= 625
    paths = []
    for i in range(n):
        arr = np.zeros((*size, 3), np.uint8)
        arr[..., 0], arr[..., 1], arr[..., 2] = 10 * (i % 25) + 5, 10 * (i // 25) + 5, 128
        paths.append(str(write(root / f"{i:04d}.jpg", encode(arr, "444", quality=95)).resolve()))
    return paths


def file_list(path: Path, files: list[str], labels: list[int], *, relative_to: Path | None = None) -> Path:
    lines = [f"{os.path.relpath(f, relative_to) if relative_to else f} {lab}" for f, lab in zip(files, labels)]
    path.write_text("\n".join(lines) + "\n")
    return path


def webdataset(root: Path, files: list[str], labels: list[int], *, per_shard: int = 8) -> list[str]:
    """Tar shards root/shard-000.tar ...: member <key>.jpg (or .png by content) + <key>.cls."""
    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for s in range(0, len(files), per_shard):
        path = root / f"shard-{s // per_shard:03d}.tar"
        with tarfile.open(path, "w") as tf:
            for i in range(s, min(s + per_shard, len(files))):
                data = Path(files[i]).read_bytes()
                ext = "png" if data.startswith(b"\x89PNG") else "jpg"
                for name, blob in ((f"{i:06d}.{ext}", data), (f"{i:06d}.cls", str(labels[i]).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    tf.addfile(info, io.BytesIO(blob))
        shards.append(str(path))
    return shards


FASHION_DIRS = ("/usr/share/datasets/fashion-mnist",)


def fashion_mnist_raw() -> Path | None:
    """Folder with Fashion-MNIST's t10k IDX files, if this machine has one (no download)."""
    cache = os.environ.get("MIXPRO_DALI_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mixpro-dali")
    for d in (*FASHION_DIRS, os.path.join(cache, "raw")):
        p = Path(d)
        if (p / "t10k-images-idx3-ubyte.gz").is_file() and (p / "t10k-labels-idx1-ubyte.gz").is_file():
            return p
    return None


def fashion_mnist_tree(root: Path, raw: Path, per_class: int = 4) -> tuple[list[str], list[int]]:
    """Class-folder PNG tree of the first `per_class` test images of each of the 10 classes."""
    with gzip.open(raw / "t10k-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(raw / "t10k-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    files, out_labels = [], []
    for k in range(10):
        for j, idx in enumerate(np.flatnonzero(labels == k)[:per_class]):
            buf = io.BytesIO()
            Image.fromarray(images[idx]).save(buf, "PNG")
            files.append(str(write(root / f"{k:02d}" / f"{j:03d}.png", buf.getvalue()).resolve()))
            out_labels.append(k)
    return files, out_labels


def write_idx(path: Path, arr: np.ndarray) -> None:
    """An IDX file (the Fashion-MNIST format), gzipped."""
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def fake_fashion_mnist(d: Path, *, train_per_class: int, test_per_class: int) -> Path:
    """Fashion-MNIST's four .gz files with 10 classes; pixel value = 20 * class + 5."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, per in (("train", train_per_class), ("t10k", test_per_class)):
        labels = rng.permutation(np.repeat(np.arange(10), per))
        images = np.zeros((len(labels), 28, 28), np.uint8)
        images[:, 4:24, 4:24] = (20 * labels + 5)[:, None, None]
        write_idx(d / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(d / f"{split}-labels-idx1-ubyte.gz", labels)
    return d
