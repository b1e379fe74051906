"""The image, built from this checkout and run: docker/Dockerfile on a registry-free Debian base
(debootstrap), with BuildKit, then the checks a new user makes: not root, the default smoke
passes, `launch.sh --gpus none smoke` passes, and a 1-epoch demo trains with its output in a
mounted folder owned by the caller.

The engine is Debian's docker.io (installed when missing), started for this module on its own
socket and stopped by its PID. Its data root and the base tarball stay in
tests/docker_engine.CACHE, so later runs reuse the layers. Skipped, with the reason, where no
engine can start; MIXPRO_DOCKER_TEST=0 skips it on purpose. Times go to CACHE/timings.jsonl.
"""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

import docker_engine as de

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "docker" / "launch.sh"
IMAGE = "mixpro-dali:0.1.0"     # launch.sh's default (tests/docker/test_docker.py keeps them equal)
BASE = f"mixpro-test-base:{de.SUITE}-v{de.BASE_VERSION}"
LOCK = Path(tempfile.gettempdir()) / "mixpro-docker-test.lock"   # one engine per machine
pytestmark = pytest.mark.slow


def _say(request, line: str) -> None:
    """A line on the terminal even while pytest captures output (CI logs show the times)."""
    plugins = request.config.pluginmanager
    reporter, capture = plugins.getplugin("terminalreporter"), plugins.getplugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"docker image test: {line}")


def _lock(timeout: float = 1800):
    """One test engine per machine at a time: two daemons would corrupt a shared data root and
    fight over docker0."""
    f = open(LOCK, "w")
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return f
        except BlockingIOError:
            if time.monotonic() > deadline:
                f.close()
                pytest.skip(f"another test run holds {LOCK}")
            time.sleep(5)


@pytest.fixture(scope="module")
def engine(request):
    if os.environ.get("MIXPRO_DOCKER_TEST") == "0":
        pytest.skip("MIXPRO_DOCKER_TEST=0")
    lock = _lock()
    de.CACHE.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    eng = None
    try:
        t = time.monotonic()
        try:
            de.install_engine()
            times["install"] = time.monotonic() - t
            eng = de.Engine()
            t = time.monotonic()
            eng.start()
            times["start"] = time.monotonic() - t
        except de.EngineUnavailable as e:
            pytest.skip(f"no Docker engine: {e}")
        cold = not eng.has_image(BASE)
        t = time.monotonic()
        de.import_base(eng, BASE)
        times["base"] = time.monotonic() - t
        t = time.monotonic()
        log = de.CACHE / "build.log"
        result = eng.docker_run(
            ["build", "--progress=plain", "-f", "docker/Dockerfile", "--build-arg",
             f"BASE_IMAGE={BASE}", "-t", IMAGE, "."], cwd=ROOT, timeout=2400, check=False)
        log.write_text(result.stdout + result.stderr)
        times["build"] = time.monotonic() - t
        assert result.returncode == 0, f"docker build failed (log: {log}):\n{result.stderr[-4000:]}"
        size = int(eng.docker_run(["image", "inspect", "-f", "{{.Size}}", IMAGE],
                                  timeout=60).stdout)
        eng.docker_run(["image", "prune", "-f"], timeout=300)   # the previous build's final layers
        _say(request, f"{'cold' if cold else 'warm'}: " + ", ".join(
            f"{k} {v:.0f} s" for k, v in times.items()) + f", image {size / 1e9:.2f} GB")
        with open(de.CACHE / "timings.jsonl", "a") as f:
            f.write(json.dumps({"cold": cold, **times, "image_bytes": size,
                                "when": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        yield eng
    finally:
        if eng is not None:
            eng.stop()
        lock.close()


def launcher_env(eng: de.Engine, tmp_path: Path) -> dict[str, str]:
    """launch.sh calls `docker` from PATH: the engine's client, on its socket."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    link = bin_dir / "docker"
    if not link.exists():
        link.symlink_to(eng.docker)
    env = {k: v for k, v in eng.env.items() if k != "MIXPRO_IMAGE"}
    return {**env, "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}"}


def launch(eng, tmp_path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCH), *args], capture_output=True, text=True,
                          env=launcher_env(eng, tmp_path), stdin=subprocess.DEVNULL,
                          timeout=timeout)


@pytest.fixture(scope="module")
def memlock(engine, tmp_path_factory) -> tuple[str, ...]:
    """launch.sh's options for this daemon: none, or --no-memlock where the daemon refuses
    --ulimit memlock=-1 (then launch.sh must have said so, naming the option)."""
    tmp = tmp_path_factory.mktemp("probe")
    probe = launch(engine, tmp, "--gpus", "none", "shell", "--", "-c", "true", timeout=120)
    if probe.returncode == 0:
        return ()
    assert "error setting rlimit" in probe.stderr, probe.stderr
    assert "run again with --no-memlock" in probe.stderr, probe.stderr
    return ("--no-memlock",)


def test_image_user_is_not_root(engine):
    out = engine.docker_run(["run", "--rm", IMAGE, "sh", "-c", "id -u; id -un"], timeout=120)
    uid, name = out.stdout.split()
    assert uid != "0" and name == "mixpro", out.stdout


def test_default_command_is_a_passing_smoke(engine):
    out = engine.docker_run(["run", "--rm", IMAGE], timeout=300, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ok    DALI cpu pipeline" in out.stdout and out.stdout.rstrip().endswith("OK")


def test_launcher_smoke_without_gpus(engine, memlock, tmp_path):
    out = launch(engine, tmp_path, *memlock, "--gpus", "none", "smoke", timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.rstrip().endswith("OK")
    assert "--require-gpu" not in out.stdout


def test_demo_trains_one_epoch_into_a_folder_owned_by_the_caller(engine, memlock, tmp_path):
    """As root the caller is a made-up uid (4321) owning the folder; otherwise the host user,
    whom launch.sh passes by itself."""
    out_dir = tmp_path / "demo"
    out_dir.mkdir()
    user: tuple[str, ...] = ()
    uid = os.getuid()
    if uid == 0:
        uid = 4321
        os.chown(out_dir, uid, uid)
        user = ("--user", f"{uid}:{uid}")
    result = launch(engine, tmp_path, *memlock, "--gpus", "none", *user, "train", "--output", str(out_dir),
                    "--", "--run.epochs", "1", "--data.demo_train_size", "2000",
                    "--data.demo_val_size", "500", timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "epoch 1/1: train loss" in result.stdout, result.stdout[-3000:]
    written = {p.name: p for p in out_dir.iterdir()}
    assert {"config.yaml", "last.pth", "best.pth", "summary.csv"} <= set(written), sorted(written)
    assert all(p.stat().st_uid == uid for p in written.values()), \
        {n: p.stat().st_uid for n, p in written.items()}
