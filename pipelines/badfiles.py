"""Bad input: the checks `python -m pipelines.scan` runs, the in-pipeline guard, and the
error a run raises when it meets a file DALI cannot decode.

DALI names some failures (a truncated JPEG: "Failed to decode sample #3 : a/b.jpg", an empty
file: "File mapping failed: a/b.jpg") but not others (a text file saved as .jpg, a broken
header: "nvImageCodec failure: '#4'"), and any of them ends the pipeline. So:
  - `check_bytes` is the scan's structural check (no decode: magic bytes, JPEG markers up to
    the first scan, the end-of-image marker, PNG's IEND), plus an optional full PIL decode
    (the deep scan, pipelines/deep_scan.py, decides with DALI's decoder instead);
  - `SampleTracker` runs inside the pipeline on every batch: it rejects data that is no image
    at all (with the file named) and remembers which files each batch held, so that when the
    decoder fails without a name `explain_failure` decodes that batch's files again with the
    training decoder in a subprocess (bisecting it) and names the bad one.
What still decodes (grayscale, CMYK, PNG inside .JPEG, progressive, EXIF-rotated) is fine.
"""
from __future__ import annotations

import io
import os
import re
import tarfile
import warnings
from collections import OrderedDict
from typing import Iterable

from .decode_worker import find_failures     # imported now: after a failed decode, every
                                              # allocation risks a damaged heap

__all__ = ["BadImageError", "sniff_format", "check_bytes", "read_source", "check_source",
           "SampleTracker", "explain_failure"]

SCAN_HINT = ("leave it out with `--data.exclude FILE` (python -m train) or `exclude=FILE` "
             "(TrainLoader/ValLoader), FILE listing one path a line; or rescan to list every "
             "such file: `python -m pipelines.scan {root} --deep --output bad.txt` "
             "(WebDataset: rewrite the shards without them)")
_TAG = "[pipelines] bad image file"

_MAGIC = [
    (b"\xff\xd8\xff", "jpeg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"BM", "bmp"),
    (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"), (b"MM\x00+", "tiff"),                      # BigTIFF
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "jpeg2000"),
    (b"\xffO\xffQ", "jpeg2000"), (b"GIF87a", "gif"), (b"GIF89a", "gif"),
]
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


class BadImageError(RuntimeError):
    """A run met a file it cannot decode. `path` names it (None when it could not be found)."""

    def __init__(self, message: str, path: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.path = path
        self.reason = reason


def sniff_format(head: bytes) -> str | None:
    """Image format from the first 16 bytes: jpeg, png, bmp, tiff, jpeg2000, webp, pnm, gif;
    None when the bytes are no image DALI knows."""
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if len(head) >= 3 and head[:1] == b"P" and head[1:2] in b"123456" and head[2:3].isspace():
        return "pnm"
    return None


def _check_jpeg(data: bytes) -> str | None:
    i, sof, sos = 2, False, -1
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return f"corrupt JPEG header (no marker at byte {i})"
        marker = data[i + 1]
        if marker == 0xFF:                          # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker == 0xD9:
            return "JPEG ends before its image data"
        length = data[i + 2] << 8 | data[i + 3]
        if length < 2:
            return f"corrupt JPEG header (segment length {length} at byte {i})"
        if marker in _SOF:
            if i + 10 > len(data):
                break
            h, w, comps = data[i + 5] << 8 | data[i + 6], data[i + 7] << 8 | data[i + 8], data[i + 9]
            if h == 0 or w == 0 or comps not in (1, 3, 4):
                return f"unsupported JPEG frame ({w}x{h}, {comps} components)"
            sof = True
        if marker == 0xDA:
            sos = i
            break
        i += 2 + length
    if not sof or sos < 0:
        return "truncated JPEG (header incomplete)"
    if data.rfind(b"\xff\xd9") < sos:
        return "truncated JPEG (no end-of-image marker)"
    return None


def check_bytes(data: bytes, *, decode: bool = False, pil: bool = True) -> str | None:
    """Why `data` would fail in DALI's decoder, or None if it looks decodable.

    Structural checks only (fast); decode=True also decodes fully with Pillow (slower, also
    catches corrupt compressed data); pil=False: no Pillow at all (pure-Python JPEG/PNG
    checks; safe in a process whose DALI decoder has just failed)."""
    if not data:
        return "empty file"
    fmt = sniff_format(data[:16])
    if fmt is None:
        return f"not an image (starts with {data[:8]!r})"
    if fmt == "gif":
        return "GIF is not an image format DALI decodes"
    reason = None
    if fmt == "jpeg":
        reason = _check_jpeg(data)
    elif fmt == "png":
        if data[12:16] != b"IHDR":
            reason = "corrupt PNG header"
        elif data.rfind(b"IEND") < 0:
            reason = "truncated PNG (no IEND chunk)"
    if reason is None and pil and (decode or fmt not in ("jpeg", "png")):
        reason = _pil_check(data, full=decode)
    return reason


def _pil_check(data: bytes, *, full: bool) -> str | None:
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                if full:
                    im.load()
                elif im.width == 0 or im.height == 0:
                    return "image with zero size"
    except Exception as e:  # noqa: BLE001 (any Pillow failure means: not decodable)
        return f"cannot decode: {type(e).__name__}: {e}"
    return None


_TAR_INFO = re.compile(r"^(?P<tar>.+\.tar):(?P<offset>\d+):(?P<member>.+)$")


def read_source(source: str) -> bytes:
    """Bytes of a file path or of a WebDataset member named as DALI's source_info does
    ('shard.tar:OFFSET:member')."""
    m = _TAR_INFO.match(source)
    if m and not os.path.exists(source):
        with tarfile.open(m["tar"]) as tf:
            f = tf.extractfile(m["member"])
            return f.read() if f else b""
    with open(source, "rb") as f:
        return f.read()


def check_source(source: str, *, decode: bool = False) -> str | None:
    """`check_bytes` of a file path or a WebDataset source_info; an unreadable file is bad."""
    try:
        data = read_source(source)
    except (OSError, KeyError, tarfile.TarError) as e:
        return f"cannot read: {e}"
    return check_bytes(data, decode=decode)


class SampleTracker:
    """Python function run by DALI on every batch (encoded bytes, source_info): raises with
    the file named when a sample is no image at all, and keeps the file names of the last
    `keep` batches by call index (0 = first batch after the pipeline was built)."""

    def __init__(self, keep: int = 16) -> None:
        self.keep = keep
        self.watch = None              # called with the files of every batch (crash_watch)
        self.calls = 0
        self.history: OrderedDict[int, tuple[str, ...]] = OrderedDict()

    def __call__(self, encoded: list, source_info: list) -> list:
        import torch
        from torch.utils.dlpack import to_dlpack

        names = tuple(bytes(torch.from_dlpack(s).numpy()).decode("utf-8", "replace")
                      for s in source_info)
        self.history[self.calls] = names
        if self.watch is not None:
            self.watch(names)
        self.calls += 1
        while len(self.history) > self.keep:
            self.history.popitem(last=False)
        for name, sample in zip(names, encoded):
            head = bytes(torch.from_dlpack(sample)[:16].numpy())
            fmt = sniff_format(head)
            if fmt is None or fmt == "gif":
                reason = check_bytes(head) if head else "empty file"
                raise ValueError(f"{_TAG} {name!r}: {reason}")
        return [to_dlpack(torch.zeros(1, dtype=torch.uint8)) for _ in names]

    def batch_files(self, index: int) -> list[str]:
        """Files of batch `index` and of the batches recorded after it (prefetched)."""
        return [f for i, names in self.history.items() if i >= index for f in names]


_NAMED = [
    re.compile(re.escape(_TAG) + r" '(?P<path>.+?)': (?P<reason>.+)$", re.M),
    re.compile(r"Failed to decode sample #\d+ ?: (?P<path>.+?)\s*$", re.M),
    re.compile(r"File mapping failed: (?P<path>.+?)\s*$", re.M),
]
_DATA_ERROR = re.compile(r"decoders\.|readers\.|python_function|nvImageCodec|" + re.escape(_TAG))


def explain_failure(error: BaseException, candidates: Iterable[str] = (),
                    root: str = "ROOT", *, backend: str = "cpu",
                    device_id: int | None = None) -> BadImageError | None:
    """A BadImageError naming the file behind a DALI data error, or None when `error` is not
    about input data. `candidates`: files of the failing batch; when DALI's message names no
    file they are decoded again with the training decoder (`backend`, `device_id`) in a
    subprocess, bisecting the batch, until the one it fails on is found (never with Pillow:
    Pillow decoding a JPEG 2000 next to DALI's failed decode of it kills the process).
    `root`: the data source, for the scan command suggested."""
    hint = SCAN_HINT.format(root=root)
    msg = str(error)
    if not _DATA_ERROR.search(msg):
        return None
    for pattern in _NAMED:
        m = pattern.search(msg)
        if m:
            path = m["path"]
            reason = m.groupdict().get("reason") or _decoder_reason(path, backend, device_id)
            return BadImageError(f"cannot decode {path!r} ({reason}); {hint}", path, reason)
    files = list(dict.fromkeys(candidates))
    failed = find_failures(files, backend=backend, device_id=device_id) if files else {}
    for path in files:
        if path in failed:
            try:
                structural = check_bytes(read_source(path), pil=False)
            except (OSError, KeyError, tarfile.TarError):
                structural = None
            reason = f"{structural}; {failed[path]}" if structural else failed[path]
            return BadImageError(f"cannot decode {path!r} ({reason}); {hint}", path, reason)
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    after = lines[lines.index("encountered:") + 1:] if "encountered:" in lines else lines
    detail = after[0] if after else "no message"
    return BadImageError(
        f"DALI failed on input data and named no file ({detail.strip()}); decoded the "
        f"{len(files)} file(s) of the failing batch again without finding it; {hint}")


def _decoder_reason(path: str, backend: str, device_id: int | None) -> str:
    """Why the training decoder fails on `path` (asked in a subprocess)."""
    try:
        reason = check_bytes(read_source(path), pil=False)   # empty, truncated, no image
    except (OSError, KeyError, tarfile.TarError) as e:
        reason = f"cannot read: {e}"
    return reason or find_failures([path], backend=backend, device_id=device_id).get(
        path, "decode failed")
