"""Decode files with the training decoder in worker subprocesses, so that a decoder crash
(SIGSEGV) or an error that names no file is pinned to its file.

A worker (`python -m pipelines.decode_worker --backend cpu`) holds one DALI pipeline:
external bytes -> `decode.decode` (the decoder and device the loaders use) and answers one JSON
line per request on stdout: {"paths": [...], "check": bool} -> {"ok": [[...per file...]]} or
{"error": "..."} when DALI raised for the batch. `check=True` also compares the decoded pixels
with Pillow's (`pixelcheck.compare`). `find_failures` bisects a batch over such workers: a
batch that raises or kills its worker is split in halves until each culprit stands alone.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from typing import Callable, Iterable, Sequence

from .compat import shutdown_pipeline

logger = logging.getLogger(__spec__.name)  # 'pipelines.decode_worker' also under python -m

__all__ = ["DecodeWorker", "find_failures", "decode_files", "crash_reason"]

_MAX_BATCH = 64
PILLOW_CRASH = ["unverified", "DALI decodes it; Pillow crashes on it (next to DALI), so its "
                "pixels are unchecked"]


def crash_reason(returncode: int | None) -> str:
    """Why a worker died: 'decoder crash (SIGSEGV)' for a signal, else its exit status."""
    import signal

    if returncode is not None and returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"decoder crash ({name}): DALI's decoder kills the process on this file"
    return f"decoder worker exited with status {returncode}"


def _first_line(msg: str) -> str:
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    if "encountered:" in lines:
        lines = lines[lines.index("encountered:") + 1:]
    keep = [ln for ln in lines if not ln.startswith(("C++ context", "Current pipeline"))]
    return (keep or lines or ["no message"])[0][:300]


class _Decoder:
    """The pipeline inside a worker; rebuilt after every failure (a failed DALI pipeline is
    finished)."""

    def __init__(self, backend: str, device_id: int | None) -> None:
        self.backend, self.device_id, self.pipe = backend, device_id, None

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        from .decode import decode

        @pipeline_def(batch_size=_MAX_BATCH, num_threads=1, device_id=self.device_id,
                      prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)
        def pipe():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            return decode(encoded, backend=self.backend)

        p = pipe()
        p.build()
        return p

    def __call__(self, blobs: list) -> list:
        import numpy as np

        if self.pipe is None:
            self.pipe = self._build()
        try:
            self.pipe.feed_input("encoded", [np.frombuffer(b, np.uint8) for b in blobs])
            (out,) = self.pipe.run()
        except Exception:
            shutdown_pipeline(self.pipe)
            self.pipe = None
            raise
        if self.backend == "gpu":
            out = out.as_cpu()
        return [np.array(out[i]) for i in range(len(blobs))]


def serve(backend: str, device_id: int | None) -> None:
    """Worker loop: one JSON request per stdin line, one JSON answer per stdout line."""
    from .badfiles import read_source

    decoder = _Decoder(backend, device_id)
    crash_on = os.environ.get("PIPELINES_TEST_CRASH_ON")   # tests: SIGSEGV on such a path
    out = sys.stdout
    sys.stdout = sys.stderr                      # DALI/Pillow chatter must not break the protocol
    for line in sys.stdin:
        req = json.loads(line)
        paths, check = req["paths"], req.get("check", False)
        if crash_on and any(crash_on in p for p in paths):
            import signal
            os.kill(os.getpid(), signal.SIGSEGV)
        blobs = []
        for p in paths:
            try:
                blobs.append(read_source(p))
            except OSError as e:                  # the parent checks readability first
                blobs.append(b"")
                logger.warning("cannot read %s: %s", p, e)
        try:
            images = decoder(blobs)
        except Exception as e:  # noqa: BLE001 (any DALI error: the parent bisects)
            _send(out, {"error": _first_line(str(e))})
            continue
        if not check:
            _send(out, {"ok": [list(im.shape) for im in images]})
            continue
        from .pixelcheck import compare

        again = _decode_again(decoder, blobs)
        _send(out, {"decoded": len(images)})      # a crash from here on is Pillow's, not DALI's
        for i, (blob, image) in enumerate(zip(blobs, images)):
            _send(out, {"r": compare(blob, image, again=again.get(i))})


def _decode_again(decoder: "_Decoder", blobs: list) -> dict:
    """{index: second decode} of the TIFFs among `blobs` (the format where DALI's decode of
    the same bytes was seen to change from run to run)."""
    from .badfiles import sniff_format

    tiffs = [i for i, b in enumerate(blobs) if sniff_format(b[:16]) == "tiff"]
    if not tiffs:
        return {}
    return dict(zip(tiffs, decoder([blobs[i] for i in tiffs])))


def _send(out, answer: dict) -> None:
    out.write(json.dumps(answer) + "\n")
    out.flush()


class DecodeWorker:
    """One worker subprocess. `run(paths)` -> ("ok", per-file answers) | ("error", message) |
    ("crash", reason); after a crash the next `run` starts a fresh process."""

    def __init__(self, backend: str = "cpu", device_id: int | None = None,
                 check: bool = False) -> None:
        self.backend, self.device_id, self.check = backend, device_id, check
        self.proc: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "pipelines.decode_worker", "--backend", self.backend]
        if self.device_id is not None:
            cmd += ["--device-id", str(self.device_id)]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
        return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, env=env)

    def run(self, paths: Sequence[str]) -> tuple[str, object]:
        if len(paths) > _MAX_BATCH:
            raise ValueError(f"at most {_MAX_BATCH} files per request, got {len(paths)}")
        if self.proc is None or self.proc.poll() is not None:
            self.proc = self._start()
        answer = self._ask({"paths": list(paths), "check": self.check})
        if answer is None:
            return "crash", self._died()
        if "error" in answer:
            return "error", answer["error"]
        if "ok" in answer:
            return "ok", answer["ok"]
        results = []                               # check=True: one answer per file follows
        for _ in range(answer["decoded"]):
            line = self._ask(None)
            if line is None:                       # Pillow died on file len(results)
                self._died()
                return "partial", results
            results.append(line["r"])
        return "ok", results

    def _ask(self, request: dict | None) -> dict | None:
        try:
            if request is not None:
                self.proc.stdin.write(json.dumps(request) + "\n")
                self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        return json.loads(line) if line else None

    def _died(self) -> str:
        code = self.proc.wait()
        self.proc = None
        return crash_reason(code)

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.stdin.close()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def decode_files(worker: DecodeWorker, paths: Sequence[str],
                 on_result: Callable[[str, str, object], None]) -> None:
    """Decode `paths` on `worker`, bisecting failed batches; calls on_result(path, kind,
    value) once per file: kind "ok" (value: the worker's answer), "error" (DALI's message) or
    "crash" (why the process died)."""
    stack = [list(paths[i:i + _MAX_BATCH]) for i in range(0, len(paths), _MAX_BATCH)][::-1]
    while stack:
        batch = stack.pop()
        kind, value = worker.run(batch)
        if kind in ("ok", "partial"):
            for path, answer in zip(batch, value):
                on_result(path, "ok", answer)
            if kind == "partial":
                done = len(value)
                on_result(batch[done], "ok", PILLOW_CRASH)
                if batch[done + 1:]:
                    stack.append(batch[done + 1:])
        elif len(batch) == 1:
            on_result(batch[0], kind, value)
        else:
            half = len(batch) // 2
            stack += [batch[half:], batch[:half]]


def find_failures(paths: Iterable[str], *, backend: str = "cpu",
                  device_id: int | None = None) -> dict[str, str]:
    """{path: reason} for every file of `paths` on which the training decoder fails or crashes
    (decoded in a subprocess: the caller survives a crash)."""
    seen = list(dict.fromkeys(paths))
    failed: dict[str, str] = {}

    def note(path: str, kind: str, value: object) -> None:
        if kind != "ok":
            failed[path] = value if kind == "crash" else f"DALI's decoder fails: {value}"

    with DecodeWorker(backend, device_id) as worker:
        decode_files(worker, seen, note)
    return failed


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pipelines.decode_worker")
    parser.add_argument("--backend", default="cpu", choices=("cpu", "gpu"))
    parser.add_argument("--device-id", type=int, default=None)
    args = parser.parse_args(argv)
    from .logs import setup_logging
    setup_logging(info_stream="stderr")           # stdout is the protocol
    serve(args.backend, (args.device_id or 0) if args.backend == "gpu" else None)


if __name__ == "__main__":
    main()
