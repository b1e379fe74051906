"""Pre-scan a data source for files the loaders cannot decode (correctly).

    python -m pipelines.scan ROOT [--output bad.txt] [--decode] [--workers N]
    python -m pipelines.scan ROOT --deep [--results scan.tsv] [--output bad.txt] [--device D]

ROOT: a class-folder tree, a `path label` file list, or WebDataset shards (as the loaders take).
Prints one `path<TAB>reason` line per bad file (WebDataset: `shard.tar:member`), a summary on
stderr, and exits 1 when it found bad files (0: clean, 2: unusable ROOT). `--output` writes the
same lines to a file that `--data.exclude` / `TrainLoader(..., exclude=FILE)` accept.

The default check is structural and reads each file once (magic bytes, JPEG markers up to the
first scan and the end-of-image marker, PNG IEND, Pillow's header parse for other formats):
it finds empty, truncated and non-image files. `--decode` also decodes every image with Pillow
to find corrupt compressed data. `--deep` decides with the training decoder instead: every
file is decoded by DALI on the training device in crash-isolated worker processes and its
pixels are compared with Pillow's (see pipelines/deep_scan.py); `--results` makes it
resumable. Class folders and file lists only.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tarfile
import time
from multiprocessing import Pool
from typing import Iterator, Sequence

from .badfiles import check_bytes, check_source
from .logs import setup_logging
from .readers import WDS_IMAGE_EXT, WDS_LABEL_EXT, resolve_source

logger = logging.getLogger(__spec__.name)  # 'pipelines.scan' also under python -m

__all__ = ["scan", "scan_files", "scan_tar", "main"]

_SERIAL_BELOW = 2000          # files; a process pool costs more than it saves below this


def _check_file(args: tuple[str, bool]) -> tuple[str, str | None]:
    path, decode = args
    return path, check_source(path, decode=decode)


def scan_files(files: Sequence[str], *, decode: bool = False, workers: int | None = None
               ) -> Iterator[tuple[str, str]]:
    """(path, reason) of every bad file among `files`, in input order."""
    jobs = [(f, decode) for f in files]
    if len(jobs) < _SERIAL_BELOW or workers == 1:
        results: Iterator = map(_check_file, jobs)
        for path, reason in results:
            if reason:
                yield path, reason
        return
    with Pool(workers or os.cpu_count() or 1) as pool:
        for path, reason in pool.imap(_check_file, jobs, chunksize=256):
            if reason:
                yield path, reason


def scan_tar(args: tuple[str, bool]) -> list[tuple[str, str]]:
    """Bad samples of one WebDataset shard: undecodable images, missing or non-integer .cls."""
    tar, decode = args
    images = tuple(WDS_IMAGE_EXT.split(";"))
    bad: list[tuple[str, str]] = []
    keys: dict[str, set[str]] = {}
    try:
        with tarfile.open(tar) as tf:
            for member in tf:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                keys.setdefault(key, set()).add(ext)
                name = f"{tar}:{member.name}"
                if ext in images:
                    reason = check_bytes(tf.extractfile(member).read(), decode=decode)
                    if reason:
                        bad.append((name, reason))
                elif ext == WDS_LABEL_EXT:
                    text = tf.extractfile(member).read().decode("ascii", "replace").strip()
                    if not text.isdigit():
                        bad.append((name, f"label is not a non-negative integer: {text[:20]!r}"))
    except (tarfile.TarError, OSError) as e:
        return [(tar, f"unreadable tar: {e}")]
    for key, exts in keys.items():
        if not exts & set(images):
            bad.append((f"{tar}:{key}", "sample without an image (.jpg/.jpeg/.png)"))
        elif WDS_LABEL_EXT not in exts:
            bad.append((f"{tar}:{key}", "sample without a .cls label"))
    return bad


def scan(root: str, *, decode: bool = False, workers: int | None = None
         ) -> tuple[str, int, list[tuple[str, str]]]:
    """(unit, number of units checked, [(path, reason), ...]) for any source the loaders
    accept; unit is "files" or "shards" (WebDataset)."""
    source = resolve_source(root)
    if source.kind == "webdataset":
        jobs = [(t, decode) for t in source.tars]
        if len(jobs) == 1 or workers == 1:
            found = [scan_tar(j) for j in jobs]
        else:
            with Pool(min(len(jobs), workers or os.cpu_count() or 1)) as pool:
                found = pool.map(scan_tar, jobs)
        return "shards", len(jobs), [b for part in found for b in part]
    return "files", len(source.files), list(scan_files(source.files, decode=decode, workers=workers))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.scan", description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="class-folder root, file list, or WebDataset shards")
    parser.add_argument("--output", "-o", help="also write the bad-file list here (exclude= file)")
    parser.add_argument("--decode", action="store_true", help="fully decode every image with Pillow")
    parser.add_argument("--deep", action="store_true",
                        help="decode every image with the training decoder and compare with Pillow")
    parser.add_argument("--results", help="--deep: append-only results file; rerun to resume")
    parser.add_argument("--device", default="auto", help="--deep: auto | cpu | cuda[:N] (as training)")
    parser.add_argument("--batch", type=int, default=32, help="--deep: files per decoder batch (1-64)")
    parser.add_argument("--quiet", "-q", action="store_true", help="--deep: no progress line")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    args = parser.parse_args(argv)
    setup_logging(info_stream="stderr")           # stdout is the bad-file list
    start = time.perf_counter()
    try:
        if args.deep:
            unit, count, bad, extra = _deep(args)
        else:
            unit, count, bad = scan(args.root, decode=args.decode, workers=args.workers)
            extra = ""
    except (FileNotFoundError, ValueError) as e:
        logger.error("scan: %s", e)
        return 2
    lines = [f"{path}\t{reason}" for path, reason in bad]
    for line in lines:
        print(line)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
    took = time.perf_counter() - start
    logger.info("scan: %s %s checked in %.1f s (%.0f/s), %s bad%s%s", count, unit, took,
                count / max(took, 1e-9), len(bad), " -> " + args.output if args.output else "",
                extra)
    return 1 if bad else 0


def _deep(args) -> tuple[str, int, list[tuple[str, str]], str]:
    from .deep_scan import deep_scan, summarize

    source = resolve_source(args.root)
    if source.kind == "webdataset":
        raise ValueError("--deep scans class folders and file lists; unpack WebDataset shards "
                         "or use the structural scan")
    backend, device_id = _backend(args.device)
    found = deep_scan(source.files, results=args.results, workers=args.workers,
                      backend=backend, device_id=device_id, batch=args.batch,
                      progress=not args.quiet)
    bad = [(p, r) for p, (s, r) in found.items() if s == "bad"]
    unverified = sum(s == "unverified" for s, _ in found.values())
    kinds = "; ".join(f"{n} {k}" for k, n in summarize(bad).items())
    return "files", len(found), bad, (f" ({kinds})" if kinds else "") + (
        f"; {unverified} kept unverified (Pillow cannot read them)" if unverified else "")


def _backend(device: str) -> tuple[str, int | None]:
    """DALI backend and device id for a training device string, as the loaders resolve it."""
    from .loader import resolve_device

    _, backend, device_id = resolve_device(device)
    return backend, device_id


if __name__ == "__main__":
    sys.exit(main())
