"""Name the file when the image decoder takes the whole process down.

A decoder crash (SIGSEGV, or heap damage that kills the process a little later, as a JPEG 2000
with an ICC profile does) leaves no Python to explain it. So each process that runs loaders
starts one small watcher process (`python -m pipelines.crash_watch`): the in-pipeline guard
sends it the files of every batch before they reach the decoder, and Python's `faulthandler`
writes its fatal-signal report (SIGSEGV, SIGABRT, SIGBUS, SIGFPE, SIGILL) into the same pipe.
The watcher copies that report to the run's stderr, decodes the last batches again with the
training decoder in a subprocess, bisecting them (`decode_worker.find_failures`), and prints
which file kills the decoder. A normal end, an exception or a `kill -9` costs it nothing.
"""
from __future__ import annotations

import atexit
import faulthandler
import json
import logging
import os
import subprocess
import sys
import threading
from collections import deque
from typing import Sequence

__all__ = ["CrashWatch", "watch", "KEEP_BATCHES", "CRASH_TAG"]

KEEP_BATCHES = 4          # the batch being decoded and those prefetched around it
CRASH_TAG = "[pipelines] the run died in the image decoder"
_FATAL = "Fatal Python error"
_WATCHES: dict[tuple, "CrashWatch"] = {}
logger = logging.getLogger(__spec__.name)  # 'pipelines.crash_watch' also under python -m


class CrashWatch:
    """The parent side: `note(root, files)` before a batch is decoded; `close()` at the end."""

    def __init__(self, backend: str, device_id: int | None) -> None:
        cmd = [sys.executable, "-m", "pipelines.crash_watch", "--backend", backend]
        if device_id is not None:
            cmd += ["--device-id", str(device_id)]
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     text=True, env=env)
        self.lock = threading.Lock()
        self._had_faulthandler = faulthandler.is_enabled()
        faulthandler.enable(file=self.proc.stdin, all_threads=True)   # the watcher echoes it
        atexit.register(self.close)

    def note(self, root: str, files: Sequence[str]) -> None:
        with self.lock:
            if self.proc.stdin is None or self.proc.stdin.closed:
                return
            try:
                self.proc.stdin.write(json.dumps([root, list(files)]) + "\n")
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError, ValueError):
                pass

    def close(self) -> None:
        """A normal end: faulthandler back to stderr (if it was on), the watcher exits."""
        with self.lock:
            if self.proc.stdin is None or self.proc.stdin.closed:
                return
            try:
                if self._had_faulthandler:
                    faulthandler.enable(file=sys.__stderr__, all_threads=True)
                else:
                    faulthandler.disable()
            except (ValueError, OSError, AttributeError):   # stderr already closed
                faulthandler.disable()
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def watch(backend: str, device_id: int | None) -> CrashWatch:
    """The process-wide watcher for this decoder device (started on first use)."""
    key = (os.getpid(), backend, device_id)
    if key not in _WATCHES or _WATCHES[key].proc.poll() is not None:
        _WATCHES[key] = CrashWatch(backend, device_id)
    return _WATCHES[key]


def serve(backend: str, device_id: int | None) -> int:
    """Watcher loop: keep the last KEEP_BATCHES batches; after a fatal signal, find the file."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C is the run's to handle
    batches: deque = deque(maxlen=KEEP_BATCHES)
    fatal = False
    for line in sys.stdin:
        if fatal or _FATAL in line:                   # faulthandler's report: pass it on
            fatal = True
            sys.stderr.write(line)
            continue
        try:
            batches.append(json.loads(line))
        except ValueError:
            continue
    sys.stderr.flush()
    if not fatal or not batches:
        return 0
    from .badfiles import SCAN_HINT
    from .decode_worker import find_failures

    roots = {f: root for root, files in batches for f in files}
    failed = find_failures(list(roots), backend=backend, device_id=device_id)
    for path, reason in failed.items():
        logger.error("%s: cannot decode %r (%s); %s", CRASH_TAG, path, reason,
                     SCAN_HINT.format(root=roots[path]))
    if not failed:
        logger.error("%s? decoding its last %s files again in a subprocess did not crash; the "
                     "fault may lie elsewhere", CRASH_TAG, len(roots))
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pipelines.crash_watch")
    parser.add_argument("--backend", default="cpu", choices=("cpu", "gpu"))
    parser.add_argument("--device-id", type=int, default=None)
    args = parser.parse_args(argv)
    from .logs import setup_logging
    setup_logging(info_stream="stderr")           # its reports go to the run's stderr
    return serve(args.backend, args.device_id)


if __name__ == "__main__":
    sys.exit(main())
