"""What the benchmarks share: machine info, interleaved timing rounds, peak-memory sampling,
and the JSON / markdown / PNG outputs. The benchmarks' bar charts are drawn with Pillow, so
they need no plotting library; matplotlib (a package dependency) is used only by the plots of
train.evaluate, tools.study and tools.pal_plot.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["machine_info", "cpu_seconds", "settle", "MemorySampler", "median_ratios",
           "write_outputs", "markdown_table", "bar_plot"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """CPU model and cores, GPU name, library versions, load at start (a shared machine)."""
    import numpy
    import PIL
    import torch

    info: dict[str, Any] = {
        "cpu": _cpu_model(), "cores_visible": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "numpy": numpy.__version__, "pillow": PIL.__version__,
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    for mod in ("torchvision", "timm", "nvidia.dali"):
        try:
            info[mod.split(".")[-1]] = __import__(mod, fromlist=["__version__"]).__version__
        except ImportError:
            info[mod.split(".")[-1]] = None
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time of the processes `pids` (Linux /proc; 0 elsewhere)."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


def settle(pids: Sequence[int], quiet: float = 0.3, limit: float = 20.0) -> None:
    """Wait until the processes stop working (a loader prefetching after its timed window), so
    one configuration's background work never runs inside another's window."""
    end, last = time.monotonic() + limit, cpu_seconds(pids)
    while time.monotonic() < end:
        time.sleep(quiet)
        now = cpu_seconds(pids)
        if now - last < 0.05 * quiet:
            return
        last = now


def _pss_mb(pid: int) -> float:
    """Proportional set size (MB): shared pages split between the processes sharing them, so
    forked DataLoader workers and threads compare fairly."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def _device_used_mb() -> float | None:
    import torch

    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**20


class MemorySampler:
    """Peak host memory (PSS summed over `pids()`) and device memory in use (whole GPU,
    DALI's pool included) above the level at `start`, sampled every `period` seconds."""

    def __init__(self, pids: Callable[[], Sequence[int]], period: float = 0.05) -> None:
        self.pids, self.period = pids, period
        self.host_peak = self.device_peak = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> tuple[float, float | None]:
        return sum(_pss_mb(p) for p in self.pids()), _device_used_mb()

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            host, dev = self._sample()
            self.host_peak = max(self.host_peak, host - self.host0)
            if dev is not None:
                self.device_peak = max(self.device_peak, dev - (self.device0 or 0.0))

    def __enter__(self) -> "MemorySampler":
        self.host0, self.device0 = self._sample()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        host, dev = self._sample()
        self.host_peak = max(self.host_peak, host - self.host0)
        if dev is not None:
            self.device_peak = max(self.device_peak, dev - (self.device0 or 0.0))

    def result(self) -> dict[str, float | None]:
        return {"peak_host_mb": round(self.host_peak, 1),
                "peak_device_mb": round(self.device_peak, 1) if self.device0 is not None else None}


def median_ratios(rounds: list[dict[str, float]], ref: str) -> dict[str, float]:
    """Median over rounds of each configuration's rate / the reference's rate in the same
    round: load drift on a shared machine cancels within a round."""
    names = rounds[0].keys()
    return {k: statistics.median(r[k] / r[ref] for r in rounds) for k in names}


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 10 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def bar_plot(path: Path, title: str, bars: Sequence[tuple[str, float, str]], unit: str) -> None:
    """Horizontal bars (label, value, annotation) as a PNG, drawn with Pillow."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=15)
        small = ImageFont.load_default(size=13)
    except TypeError:                                   # Pillow < 10.1: fixed-size bitmap font
        font = small = ImageFont.load_default()
    row, left, width = 34, 260, 460
    img = Image.new("RGB", (left + width + 260, 60 + row * len(bars) + 30), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 10), title, fill="black", font=font)
    top = max((v for _, v, _ in bars), default=1.0) or 1.0
    palette = ["#4C72B0", "#55A868", "#C44E52", "#8172B2", "#CCB974", "#64B5CD"]
    for i, (label, value, note) in enumerate(bars):
        y = 45 + i * row
        d.text((10, y + 6), label, fill="black", font=small)
        d.rectangle([left, y + 4, left + int(width * value / top), y + row - 6],
                    fill=palette[i % len(palette)])
        d.text((left + int(width * value / top) + 6, y + 6), f"{value:,.1f} {note}",
               fill="black", font=small)
    d.text((left, 45 + row * len(bars) + 5), f"{unit} (median of interleaved rounds)",
           fill="#444444", font=small)
    img.save(path)


def write_outputs(out: Path, stem: str, payload: dict[str, Any], table: str,
                  bars: Sequence[tuple[str, float, str]], unit: str) -> list[Path]:
    """out/stem.json, out/stem.md (machine line + table), out/stem.png."""
    out.mkdir(parents=True, exist_ok=True)
    m = payload["machine"]
    head = (f"Machine: {m['cpu']}, {m['cores_usable']} usable cores"
            f"{', GPU ' + m['gpu'] if m.get('gpu') else ''}; torch {m['torch']}, DALI "
            f"{m.get('dali')}, timm {m.get('timm')}; {m['date_utc']} UTC, load {m['loadavg_1m']:.1f} "
            f"at start.\n\n")
    paths = [out / f"{stem}.json", out / f"{stem}.md", out / f"{stem}.png"]
    paths[0].write_text(json.dumps(payload, indent=1) + "\n")
    paths[1].write_text(head + table)
    bar_plot(paths[2], f"{payload['title']} ({m['gpu'] or m['cpu']})", bars, unit)
    return paths
