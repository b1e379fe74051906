"""The crash watcher: a process killed by a fatal signal in the decoder gets its file named;
a normal end, an exception or kill -9 costs nothing and says nothing."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import jpeg_factory as jf
from pipelines.crash_watch import CRASH_TAG

REPO = Path(__file__).resolve().parents[2]


def run_child(tmp_path: Path, end: str) -> subprocess.CompletedProcess:
    good = jf.encode(jf.smooth_image(np.random.default_rng(0), 24, 32), "rgb")
    files = [str(jf.write(tmp_path / f"{i}.jpg", good)) for i in range(3)]
    code = textwrap.dedent(f"""
        import os, signal, sys
        from pipelines.crash_watch import watch
        w = watch("cpu", None)
        w.note("ROOTDIR", {files!r})
        if {end!r} == "segv":
            os.kill(os.getpid(), signal.SIGSEGV)
        if {end!r} == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if {end!r} == "raise":
            raise ValueError("a plain error")
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO), PIPELINES_TEST_CRASH_ON="1.jpg")
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300), files


def test_a_fatal_signal_names_the_file_the_decoder_crashes_on(tmp_path):
    res, files = run_child(tmp_path, "segv")
    assert res.returncode == -11
    assert "Fatal Python error: Segmentation fault" in res.stderr      # faulthandler, passed on
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith(CRASH_TAG)]
    assert len(lines) == 1 and repr(files[1]) in lines[0], res.stderr
    assert "decoder crash (SIGSEGV)" in lines[0] and "--data.exclude" in lines[0]
    assert "pipelines.scan ROOTDIR --deep" in lines[0]


@pytest.mark.parametrize("end", ["normal", "raise", "kill"])
def test_other_ends_say_nothing(tmp_path, end):
    res, _ = run_child(tmp_path, end)
    assert res.returncode == {"normal": 0, "raise": 1, "kill": -9}[end]
    assert CRASH_TAG not in res.stderr and "Fatal Python error" not in res.stderr
