"""A Docker engine for tests/docker/test_docker_image.py: found or installed, started and stopped by PID,
and a registry-free base image made with debootstrap.

Everything slow is cached in CACHE (MIXPRO_DOCKER_CACHE, default ~/.cache/mixpro-dali/docker-test):
the engine's data root (its layer and build cache, so a second run rebuilds only what the checkout
changed) and the debootstrap base as a tarball. The engine gets its own socket, exec root and
PID file there, so it never meets a system daemon.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

CACHE = Path(os.environ.get("MIXPRO_DOCKER_CACHE")
             or Path.home() / ".cache" / "mixpro-dali" / "docker-test")
SUITE = "bookworm"
# The base: Debian + python3 in a venv on PATH (the official python image's role: its `python`
# and `pip`, and no PEP 668 lock on system packages). Bump BASE_VERSION when this recipe changes.
BASE_VERSION = 1
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
BASE_PATH = "/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HOST_CAS = Path("/usr/local/share/ca-certificates")


class EngineUnavailable(Exception):
    """No engine can run here; the message says why (the test is skipped with it)."""


def run(argv: list[str], *, timeout: float, env: dict[str, str] | None = None,
        check: bool = True, **kw) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                            stdin=subprocess.DEVNULL, **kw)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} ... exited {result.returncode}:\n"
                           f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def install_engine() -> None:
    """apt-get install docker.io debootstrap when dockerd or debootstrap is missing (root only)."""
    if shutil.which("dockerd") and shutil.which("debootstrap"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise EngineUnavailable("no dockerd/debootstrap, and not root on a Debian-like system "
                                "to apt-get install docker.io debootstrap")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "docker.io",
             "debootstrap"], timeout=600, env=env)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        raise EngineUnavailable(f"apt-get install docker.io debootstrap failed: {e}") from None


def client() -> str:
    """The engine's own client: Debian's docker.io client next to dockerd, else PATH's docker.
    (A newer client on PATH may lack the buildx plugin that its `docker build` requires.)"""
    for path in ("/usr/bin/docker", shutil.which("docker")):
        if path and Path(path).is_file():
            return path
    raise EngineUnavailable("dockerd is installed but no docker client")


class Engine:
    """dockerd on its own socket with its data root in CACHE; stop() ends it by its PID."""

    def __init__(self) -> None:
        self.root = CACHE / "docker-root"
        self.run_dir = Path(tempfile.mkdtemp(prefix="mixpro-dockerd-"))
        self.sock = self.run_dir / "docker.sock"
        self.log_path = CACHE / "dockerd.log"
        self.proc: subprocess.Popen | None = None
        self.docker = client()
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.sock}", "DOCKER_BUILDKIT": "1"}
        self.env.pop("DOCKER_CONTEXT", None)

    def start(self, timeout: float = 60) -> None:
        """Use an engine that already answers on the default socket (left running), else start
        dockerd (a second daemon would fight the first over docker0 and iptables)."""
        default = {k: v for k, v in self.env.items() if k != "DOCKER_HOST"}
        if run([self.docker, "version"], timeout=20, env=default, check=False).returncode == 0:
            self.env = default
            return
        if os.geteuid() != 0:
            raise EngineUnavailable("starting dockerd needs root")
        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            ["dockerd", "--data-root", str(self.root), "--exec-root", str(self.run_dir / "exec"),
             "--pidfile", str(self.run_dir / "dockerd.pid"), "--host", f"unix://{self.sock}",
             "--storage-driver", "overlay2"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if self.sock.exists() and self.docker_run(["version"], check=False,
                                                      timeout=20).returncode == 0:
                return
            time.sleep(1)
        tail = self.log_path.read_text()[-1500:]
        self.stop()
        raise EngineUnavailable(f"dockerd did not start: {tail}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def docker_run(self, args: list[str], *, timeout: float = 600, check: bool = True,
                   **kw) -> subprocess.CompletedProcess:
        return run([self.docker, *args], timeout=timeout, env=self.env, check=check, **kw)

    def has_image(self, tag: str) -> bool:
        return self.docker_run(["image", "inspect", tag], check=False, timeout=60).returncode == 0


def host_mirror() -> str:
    """The Debian mirror the host's apt uses for SUITE (deb822 or one-line sources)."""
    texts = [p.read_text() for p in [Path("/etc/apt/sources.list"),
                                      *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
             if p.is_file()]
    for text in texts:
        for stanza in text.split("\n\n"):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            suites = re.search(r"^Suites:(.*)$", stanza, re.M)
            if uris and suites and SUITE in suites.group(1).split() and "security" not in uris.group(1):
                return uris.group(1)
        for m in re.finditer(rf"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+{SUITE}\s", text, re.M):
            if "security" not in m.group(1):
                return m.group(1)
    return "http://deb.debian.org/debian"


def base_tarball() -> Path:
    """CACHE/base-bookworm-vN.tar: debootstrap minbase + python3 venv + the host's extra CAs."""
    tar = CACHE / f"base-{SUITE}-v{BASE_VERSION}.tar"
    if tar.is_file():
        return tar
    CACHE.mkdir(parents=True, exist_ok=True)
    rootfs = Path(tempfile.mkdtemp(prefix="rootfs-", dir=CACHE))
    try:
        run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", SUITE,
             str(rootfs), host_mirror()], timeout=900)
        # TLS-intercepting proxies: the host's extra CAs join the base's bundle.
        cas = sorted(HOST_CAS.glob("*.crt")) if HOST_CAS.is_dir() else []
        for ca in cas:
            shutil.copy(ca, rootfs / "usr/local/share/ca-certificates" / ca.name)
        if cas:
            run(["chroot", str(rootfs), "update-ca-certificates"], timeout=120)
        run(["chroot", str(rootfs), "python3", "-m", "venv", "/opt/venv"], timeout=300)
        shutil.rmtree(rootfs / "var/cache/apt/archives", ignore_errors=True)
        (rootfs / "var/cache/apt/archives/partial").mkdir(parents=True)
        for lists in (rootfs / "var/lib/apt/lists").glob("*_*"):
            lists.unlink()
        part = tar.with_suffix(".tmp")
        run(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(part), "."], timeout=300)
        part.rename(tar)
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)
    return tar


def import_base(engine: Engine, tag: str) -> None:
    """docker import the tarball once: re-importing would make a new image ID and so miss every
    cached layer built on the old one."""
    if engine.has_image(tag):
        return
    tar = base_tarball()
    engine.docker_run(["import", "--change", f"ENV PATH={BASE_PATH}",
                       "--change", "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt",
                       "--change", 'CMD ["python"]', str(tar), tag], timeout=600)
