"""pipelines.fashion_mnist: IDX parsing, a balanced padded class-folder tree built once and
atomically, source search order, and a clear message when the data cannot be had. Synthetic IDX
files everywhere; the real Fashion-MNIST files too when this machine has them."""
from __future__ import annotations

import gzip
import logging
import os
from pathlib import Path

import jpeg_factory as jf
import numpy as np
import pytest
from PIL import Image

from pipelines import fashion_mnist as fm


@pytest.fixture
def raw(tmp_path) -> Path:
    """Fake Fashion-MNIST: 12 train / 6 test images per class, pixel value = 20 * class + 5."""
    return jf.fake_fashion_mnist(tmp_path / "raw", train_per_class=12, test_per_class=6)


def test_read_idx_round_trip(raw):
    images = fm.read_idx(raw / fm.FILES["train_images"])
    labels = fm.read_idx(raw / fm.FILES["train_labels"])
    assert images.shape == (120, 28, 28) and labels.shape == (120,)
    assert np.bincount(labels).tolist() == [12] * 10


def test_read_idx_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"\x00\x00\x0d\x03" + b"\x00" * 12)
    with pytest.raises(ValueError, match=r"not an unsigned-byte IDX file"):
        fm.read_idx(bad)
    with gzip.open(bad, "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"\x01\x02")
    with pytest.raises(ValueError, match=r"truncated \(2 bytes for shape \(10,\)\)"):
        fm.read_idx(bad)


def test_tree_is_balanced_padded_and_labelled(raw, tmp_path):
    root = fm.prepare_fashion_mnist(tmp_path / "cache", train_size=50, val_size=30,
                                    image_size=32, raw_dir=raw, log=lambda *a: None)
    assert root.name == "fashion-mnist-50-30-32px"
    for split, per in (("train", 5), ("val", 3)):
        folders = sorted(p.name for p in (root / split).iterdir())
        assert folders == [f"{c:02d}_{n}" for c, n in enumerate(fm.CLASSES)]
        for c, name in enumerate(folders):
            files = sorted((root / split / name).glob("*.jpg"))
            assert len(files) == per
            img = np.asarray(Image.open(files[0]))
            assert img.shape == (32, 32)
            assert abs(int(img[16, 16]) - (20 * c + 5)) <= 3  # JPEG, near-lossless on flats
            assert img[:2].max() <= 8 and img[:, :2].max() <= 8  # black 2-px border (padding)
    assert not [p for p in (tmp_path / "cache").iterdir() if ".tmp-" in p.name]


def test_progress_goes_to_the_module_logger_unless_a_log_is_given(raw, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pipelines.fashion_mnist")
    fm.prepare_fashion_mnist(tmp_path / "a", train_size=10, val_size=10, raw_dir=raw)
    assert [(r.name, r.levelno) for r in caplog.records] == [
        ("pipelines.fashion_mnist", logging.INFO)]
    assert caplog.records[0].getMessage().startswith(f"converting Fashion-MNIST ({raw}) -> ")
    caplog.clear()
    said: list[str] = []
    fm.prepare_fashion_mnist(tmp_path / "b", train_size=10, val_size=10, raw_dir=raw,
                             log=said.append)
    assert not caplog.records and len(said) == 1 and said[0].startswith("converting")


def test_built_once(raw, tmp_path):
    kw = dict(train_size=20, val_size=10, raw_dir=raw, log=lambda *a: None)
    root = fm.prepare_fashion_mnist(tmp_path, **kw)
    stamp = (root / "train").stat().st_mtime_ns
    os.rename(raw, tmp_path / "gone")  # a second call must not need the raw files
    assert fm.prepare_fashion_mnist(tmp_path, **kw) == root
    assert (root / "train").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("kw, match", [
    (dict(train_size=15), r"train_size must be a multiple of 10 in \[10, 60000\], got 15"),
    (dict(val_size=20000), r"val_size must be a multiple of 10 in \[10, 10000\], got 20000"),
    (dict(image_size=24), r"image_size must be an int >= 28"),
    (dict(train_size=200), r"asks for 20 per class, more than the split has"),
])
def test_bad_arguments(raw, tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        fm.prepare_fashion_mnist(tmp_path, raw_dir=raw, log=lambda *a: None,
                                 **{"train_size": 20, "val_size": 10, **kw})


def test_missing_data_explains_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "none")
    with pytest.raises(FileNotFoundError, match=r"(?s)apt-get install dataset-fashion-mnist.*"
                                                r"--data.demo_raw_dir DIR.*--data.train DIR"):
        fm.find_raw(tmp_path / "cache", download=False)
    with pytest.raises(FileNotFoundError, match=r"data.demo_raw_dir=.* must hold"):
        fm.find_raw(tmp_path / "cache", tmp_path)


def test_search_order_prefers_system_then_cache(raw, tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "SYSTEM_DIR", raw)
    assert fm.find_raw(tmp_path / "cache", download=False) == raw
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "none")
    cached = tmp_path / "cache" / "raw"
    os.makedirs(cached)
    for f in fm.FILES.values():
        (cached / f).write_bytes((raw / f).read_bytes())
    assert fm.find_raw(tmp_path / "cache", download=False) == cached


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MIXPRO_DALI_CACHE", str(tmp_path / "c"))
    assert fm.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MIXPRO_DALI_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert fm.default_cache_dir() == tmp_path / "x" / "mixpro-dali"


@pytest.mark.skipif(not all((fm.SYSTEM_DIR / f).is_file() for f in fm.FILES.values()),
                    reason="real Fashion-MNIST not installed (Debian dataset-fashion-mnist)")
def test_real_fashion_mnist(tmp_path):
    root = fm.prepare_fashion_mnist(tmp_path, train_size=100, val_size=50, log=lambda *a: None)
    assert len(list((root / "train").glob("*/*.jpg"))) == 100
    assert len(list((root / "val").glob("*/*.jpg"))) == 50
