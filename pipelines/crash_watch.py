"""Name the file when the image decoder takes the whole process down.

A decoder crash (SIGSEGV, or heap damage that kills the process a little later, as a JPEG 2000
with an ICC profile does) leaves no Python to explain it. So each process that runs loaders
starts one small watcher process (`python -m pipelines.crash_watch`), and the in-pipeline
guard sends it the files of every batch before they reach the decoder. When the loader process
ends normally (atexit) it says so; when its end of the pipe closes without that, the watcher
decodes the last batches again with the training decoder in a subprocess, bisecting them
(`decode_worker.find_failures`), and prints which file kills the decoder, on the stderr it
shares with the run.
"""
from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import threading
from collections import deque
from typing import Sequence

__all__ = ["CrashWatch", "watch", "KEEP_BATCHES", "CRASH_TAG"]

KEEP_BATCHES = 4          # the batch being decoded and those prefetched around it
CRASH_TAG = "[pipelines] the run died in the image decoder"
_WATCHES: dict[tuple, "CrashWatch"] = {}


class CrashWatch:
    """The parent side: `note(files)` before a batch is decoded; `close()` at a normal end."""

    def __init__(self, backend: str, device_id: int | None, root: str) -> None:
        cmd = [sys.executable, "-m", "pipelines.crash_watch", "--backend", backend,
               "--root", root]
        if device_id is not None:
            cmd += ["--device-id", str(device_id)]
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     text=True, env=env)
        self.lock = threading.Lock()
        atexit.register(self.close)

    def note(self, files: Sequence[str]) -> None:
        self._send(json.dumps(list(files)))

    def _send(self, line: str) -> None:
        with self.lock:
            if self.proc.stdin is None or self.proc.stdin.closed:
                return
            try:
                self.proc.stdin.write(line + "\n")
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError, ValueError):
                pass

    def close(self) -> None:
        """A normal end: the watcher exits without decoding anything."""
        self._send('"clean"')
        with self.lock:
            if self.proc.stdin is not None and not self.proc.stdin.closed:
                try:
                    self.proc.stdin.close()
                except OSError:
                    pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def watch(backend: str, device_id: int | None, root: str) -> CrashWatch:
    """The process-wide watcher for this decoder device (started on first use)."""
    key = (os.getpid(), backend, device_id, root)
    if key not in _WATCHES or _WATCHES[key].proc.poll() is not None:
        _WATCHES[key] = CrashWatch(backend, device_id, root)
    return _WATCHES[key]


def serve(backend: str, device_id: int | None, root: str) -> int:
    """Watcher loop: keep the last KEEP_BATCHES batches; on an unclean end, find the culprit."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C ends the run, which says "clean"
    batches: deque = deque(maxlen=KEEP_BATCHES)
    for line in sys.stdin:
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if item == "clean":
            return 0
        batches.append(item)
    files = list(dict.fromkeys(f for b in batches for f in b))
    if not files:
        return 0
    from .badfiles import SCAN_HINT
    from .decode_worker import find_failures

    failed = find_failures(files, backend=backend, device_id=device_id)
    for path, reason in failed.items():
        print(f"{CRASH_TAG}: cannot decode {path!r} ({reason}); "
              f"{SCAN_HINT.format(root=root)}", file=sys.stderr, flush=True)
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pipelines.crash_watch")
    parser.add_argument("--backend", default="cpu", choices=("cpu", "gpu"))
    parser.add_argument("--device-id", type=int, default=None)
    parser.add_argument("--root", default="ROOT")
    args = parser.parse_args(argv)
    return serve(args.backend, args.device_id, args.root)


if __name__ == "__main__":
    sys.exit(main())
