"""The deep scan: decode every file with the training decoder and check its pixels.

    python -m pipelines.scan ROOT --deep [--results scan.tsv] [--output bad.txt]

Each file is decoded by DALI's decoder on the device training uses (`decode.decode`, in
`decode_worker` subprocesses, one per core, batches of `batch` files), then compared with
Pillow's decode (`pixelcheck.compare`). A batch that DALI refuses, or that kills its worker,
is bisected until the culprit stands alone, and the scan goes on. Every file gets one line
`path<TAB>status<TAB>reason` in the results file, appended as it is decided (status: ok, bad,
unverified), so a killed scan continues where it stopped when run again with the same
--results. Files the loaders' in-pipeline guard refuses (no image signature) are bad without
decoding.
"""
from __future__ import annotations

import os
import queue
import sys
import threading
import time
from typing import Callable, Iterable, Sequence

from .badfiles import sniff_format
from .decode_worker import DecodeWorker, decode_files

__all__ = ["deep_scan", "read_results", "STATUSES"]

STATUSES = ("ok", "bad", "unverified")
_GPU_WORKERS = 4


def read_results(path: str | None) -> dict[str, tuple[str, str]]:
    """{file: (status, reason)} of a results file (the last line of a file wins; a torn last
    line of a killed scan is ignored)."""
    done: dict[str, tuple[str, str]] = {}
    if not path or not os.path.exists(path):
        return done
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if line.endswith("\n") and len(parts) == 3 and parts[1] in STATUSES:
                done[parts[0]] = (parts[1], parts[2])
    return done


def _pre_check(path: str) -> str | None:
    """What the loader refuses before decoding (the in-pipeline guard), or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        return f"cannot read: {e}"
    if not head:
        return "empty file"
    fmt = sniff_format(head)
    if fmt is None:
        return f"not an image (starts with {head[:8]!r})"
    if fmt == "gif":
        return "not an image DALI decodes: GIF"
    return None


def _reason(path: str, kind: str, value: object) -> tuple[str, str]:
    if kind == "ok":
        status, reason = value
        return status, reason
    if kind == "crash":
        return "bad", str(value)
    try:
        with open(path, "rb") as f:
            fmt = sniff_format(f.read(16))
    except OSError:
        fmt = None
    return "bad", f"DALI's decoder refuses this {fmt or 'unknown'} file: {value}"


class _Progress:
    """A one-line progress indicator on stderr (a line per 10 s when stderr is no terminal)."""

    def __init__(self, total: int, done: int, stream=sys.stderr) -> None:
        self.total, self.done, self.bad, self.stream = total, done, 0, stream
        self.start = self.last = time.perf_counter()
        self.new = 0
        self.tty = stream.isatty()

    def step(self, status: str, force: bool = False) -> None:
        self.done += 1
        self.new += 1
        self.bad += status == "bad"
        now = time.perf_counter()
        if force or now - self.last >= (0.5 if self.tty else 10.0):
            self.last = now
            rate = self.new / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            line = (f"deep scan: {self.done}/{self.total} files ({100 * self.done / max(self.total, 1):.0f}%), "
                    f"{rate:.0f} files/s, {self.bad} bad, ETA {eta:.0f} s")
            self.stream.write(("\r" + line) if self.tty else line + "\n")
            self.stream.flush()

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\n")


def deep_scan(files: Sequence[str], *, results: str | None = None, workers: int | None = None,
              backend: str = "cpu", device_id: int | None = None, batch: int = 32,
              progress: bool = True,
              on_file: Callable[[str, str, str], None] | None = None) -> dict[str, tuple[str, str]]:
    """{file: (status, reason)} for every file of `files` (see the module docstring); files
    already in `results` are not scanned again, new ones are appended to it."""
    if not 1 <= batch <= 64:
        raise ValueError(f"batch must be in [1, 64], got {batch}")
    done = read_results(results)
    todo = [f for f in dict.fromkeys(files) if f not in done]
    out = open(results, "a", encoding="utf-8") if results else None
    if out is not None and out.tell() > 0:
        with open(results, "rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                out.write("\n")                   # a torn line of a killed scan
    lock = threading.Lock()
    bar = _Progress(len(files), len(files) - len(todo)) if progress else None

    def record(path: str, status: str, reason: str) -> None:
        reason = " ".join(reason.split())
        with lock:
            done[path] = (status, reason)
            if out is not None:
                out.write(f"{path}\t{status}\t{reason}\n")
                out.flush()
            if bar is not None:
                bar.step(status)
            if on_file is not None:
                on_file(path, status, reason)

    to_decode = []
    for path in todo:
        why = _pre_check(path)
        if why:
            record(path, "bad", why)
        else:
            to_decode.append(path)
    try:
        _run_workers(to_decode, record, workers=workers, backend=backend, device_id=device_id,
                     batch=batch)
    finally:
        if out is not None:
            out.close()
        if bar is not None:
            bar.finish()
    return {f: done[f] for f in files if f in done}


def _run_workers(paths: list[str], record, *, workers: int | None, backend: str,
                 device_id: int | None, batch: int) -> None:
    chunks: queue.SimpleQueue = queue.SimpleQueue()
    for i in range(0, len(paths), batch):
        chunks.put(paths[i:i + batch])
    default = os.cpu_count() or 1
    if backend == "gpu":
        default = min(default, _GPU_WORKERS)      # each worker holds a CUDA context
    n = max(1, min(workers or default, -(-len(paths) // batch) or 1))
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with DecodeWorker(backend, device_id, check=True) as worker:
                while True:
                    try:
                        chunk = chunks.get_nowait()
                    except queue.Empty:
                        return
                    decode_files(worker, chunk,
                                 lambda p, k, v: record(p, *_reason(p, k, v)))
        except BaseException as e:  # noqa: BLE001 (re-raised in the caller's thread)
            errors.append(e)

    threads = [threading.Thread(target=work, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def summarize(found: Iterable[tuple[str, str]]) -> dict[str, int]:
    """{kind: count}: the reason up to its first ':' (e.g. 'wrong pixels')."""
    counts: dict[str, int] = {}
    for _, reason in found:
        kind = reason.split(":", 1)[0].split(" (")[0]
        counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))
