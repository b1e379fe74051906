"""The bad-file pre-scan: checks per flavour and per kind of damage, the CLI, WebDataset."""
import io
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

import jpeg_factory as jf
from pipelines.badfiles import check_bytes, sniff_format
from pipelines.scan import main, scan

ROOT = Path(__file__).resolve().parents[2]
GOOD = jf.encode(jf.smooth_image(np.random.default_rng(0), 40, 56), "rgb")


@pytest.mark.parametrize("flavour", jf.FLAVOURS)
@pytest.mark.parametrize("decode", [False, True])
def test_every_good_flavour_passes(flavour, decode):
    data = jf.encode(jf.smooth_image(np.random.default_rng(1), 40, 56), flavour)
    assert check_bytes(data, decode=decode) is None


@pytest.mark.parametrize("kind,reason", [
    ("truncated", "no end-of-image marker"), ("zero_bytes", "empty file"),
    ("text", "not an image"), ("header_only", "header incomplete"),
    ("no_eoi", "no end-of-image marker"),
])
def test_every_bad_kind_is_found_without_decoding(kind, reason):
    assert reason in check_bytes(jf.bad_bytes(kind, GOOD))


def test_decode_finds_corrupt_compressed_data():
    data = bytearray(jf.encode(jf.smooth_image(np.random.default_rng(2), 40, 56), "png_as_jpg"))
    idat = data.find(b"IDAT")
    data[idat + 12:idat + 60] = bytes(range(48))          # broken zlib stream, chunks intact
    assert check_bytes(bytes(data)) is None                # structure looks fine
    assert "cannot decode" in check_bytes(bytes(data), decode=True)
    # JPEG entropy damage is no error for DALI (libjpeg warns and decodes): not flagged either
    jpeg = bytearray(GOOD)
    sos = jpeg.find(b"\xff\xda")
    jpeg[sos + 20:sos + 60] = bytes(40)
    assert check_bytes(bytes(jpeg), decode=True) is None


def test_other_formats_and_gif():
    assert sniff_format(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "webp"
    assert sniff_format(b"P6\n40 56\n255\n") == "pnm"
    assert "GIF" in check_bytes(b"GIF89a" + b"\x00" * 20)
    assert "cannot decode" in check_bytes(b"BM" + b"\x00" * 30)   # BMP header, no content


def bad_tree(root: Path):
    files, _ = jf.class_tree(root, classes=2, per_class=6)
    bad = {files[1]: "truncated", files[7]: "text", files[10]: "zero_bytes"}
    for path, kind in bad.items():
        Path(path).write_bytes(jf.bad_bytes(kind, Path(path).read_bytes()))
    return files, bad


def test_cli_lists_bad_files_and_writes_exclude_list(tmp_path, capsys):
    files, bad = bad_tree(tmp_path / "data")
    out = tmp_path / "bad.txt"
    assert main([str(tmp_path / "data"), "--output", str(out)]) == 1
    printed = capsys.readouterr()
    listed = [ln.split("\t")[0] for ln in printed.out.splitlines()]
    assert sorted(listed) == sorted(bad) and out.read_text() == printed.out
    assert "12 files checked" in printed.err and "3 bad" in printed.err
    for path in bad:
        Path(path).write_bytes(GOOD)
    assert main([str(tmp_path / "data")]) == 0
    assert main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_parallel_scan_equals_serial(tmp_path, monkeypatch):
    files, bad = bad_tree(tmp_path)
    monkeypatch.setattr("pipelines.scan._SERIAL_BELOW", 0)
    assert scan(str(tmp_path), workers=2) == scan(str(tmp_path), workers=1)
    assert sorted(p for p, _ in scan(str(tmp_path), workers=2)[2]) == sorted(bad)


def test_scan_of_file_list_and_webdataset(tmp_path, indexed):
    files, bad = bad_tree(tmp_path / "data")
    listing = jf.file_list(tmp_path / "list.txt", files, [0] * len(files))
    assert sorted(p for p, _ in scan(str(listing))[2]) == sorted(bad)
    shard = tmp_path / "wds" / "shard-000.tar"
    jf.webdataset(shard.parent, files[:8], list(range(8)))
    with tarfile.open(shard, "a") as tf:                       # a sample without a label
        info = tarfile.TarInfo("999999.jpg")
        info.size = len(GOOD)
        tf.addfile(info, io.BytesIO(GOOD))
    unit, count, found = scan(str(tmp_path / "wds"))
    assert (unit, count) == ("shards", 1)
    assert sorted(r for _, r in found) == sorted(
        ["not an image (starts with b'<html>40')",
         "truncated JPEG (no end-of-image marker)", "sample without a .cls label"])
    assert scan(str(indexed.wds))[2] == []


def test_module_entry_point_runs(tmp_path):
    bad_tree(tmp_path)
    res = subprocess.run([sys.executable, "-m", "pipelines.scan", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and len(res.stdout.splitlines()) == 3


def test_deep_cli_agrees_with_the_structural_scan_on_broken_jpegs(tmp_path, capsys, indexed):
    files, bad = bad_tree(tmp_path / "data")
    out, results = tmp_path / "bad.txt", tmp_path / "scan.tsv"
    argv = [str(tmp_path / "data"), "--deep", "--device", "cpu", "--results", str(results),
            "--output", str(out), "-q"]
    assert main(argv) == 1
    printed = capsys.readouterr()
    assert sorted(ln.split("\t")[0] for ln in out.read_text().splitlines()) == sorted(bad)
    assert "12 files checked" in printed.err and "3 bad" in printed.err
    statuses = [ln.split("\t")[1] for ln in results.read_text().splitlines()]
    assert sorted(statuses) == ["bad"] * 3 + ["ok"] * 9
    assert main(argv) == 1                                  # resumed: nothing left to decode
    assert len(results.read_text().splitlines()) == 12
    assert main([str(indexed.wds), "--deep"]) == 2
    assert "--deep scans class folders and file lists" in capsys.readouterr().err


def test_deep_scan_arguments_and_torn_results(tmp_path):
    from pipelines.deep_scan import deep_scan, read_results

    with pytest.raises(ValueError, match=r"batch must be in \[1, 64\], got 65"):
        deep_scan([], batch=65)
    torn = tmp_path / "scan.tsv"
    torn.write_text("a.jpg\tok\tJPEG RGB\nb.jpg\tbad\tempty file\nc.jpg\tok\tJP")
    assert read_results(str(torn)) == {"a.jpg": ("ok", "JPEG RGB"), "b.jpg": ("bad", "empty file")}
