"""One script for any CUDA machine with DALI installed: checks the GPU path, then measures it,
in steps ordered by value, each in its own process with a timeout, so a hang or crash costs
only its step and every finished step's result is on disk at once.

    python -m tools.gpu_check --out DIR [--time-limit 420] [--device cuda|cpu] [--quick]
    bash tools/gpu_check.sh [args]            # the same, into $OUT (default gpu_check_out)

Steps (``STEPS``, in this order; ``--only`` / ``--skip`` pick; see gpu_check_steps.py):
  versions      python, torch, CUDA, DALI, GPU name and nvidia-smi
  pytest_cuda   the test suite's CUDA-only tests (those skipped without a GPU)
  operator, poison, augment, loader       correctness against the CPU path and the kernels
  loader_sync   20 TrainLoader batches at B=256 under torch.cuda.set_sync_debug_mode("warn"):
                syncs and the MaskMix operator's ms per batch
  pipeline_full, pipeline_plain   python -m tools.bench_pipeline: full recipe; no RandAugment/erasing
  train_bench   python -m tools.bench_train, DeiT-S none / deit / mixpro, trimmed
  checkpoint    loader + model + optimizer round trip on the GPU, finite loss
DIR holds two files, rewritten as each step ends (a machine that returns only a few files
gets everything): gpu_check.json (every finished step's result, the benchmark tables
included) and gpu_check.log (each step's output; on a hang, faulthandler's stack dump of every
thread before the step is killed). Scratch (per-step files, benchmark outputs) goes to
``--work`` (default: the temp folder). ``--time-limit`` (seconds, default 420)
bounds the whole run: a step gets at most its own timeout and what is left, and steps that no
longer fit are recorded as skipped. ``--device cpu --quick`` runs the same steps at tiny sizes
without a GPU (GPU-only parts skipped): that is how this script is tested.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# name: (timeout s on a GPU, seconds it needs at least to be worth starting)
STEPS = {
    "versions": (40, 10), "pytest_cuda": (120, 30), "operator": (60, 20), "poison": (45, 15),
    "augment": (60, 20), "loader": (60, 20), "loader_sync": (90, 30), "pipeline_full": (60, 30),
    "pipeline_plain": (45, 25), "train_bench": (120, 45), "checkpoint": (60, 25),
}
SELFTEST = {"selftest_hang": (5, 1), "selftest_fail": (30, 1)}   # for the tests: a step that
                                              # never ends, one that fails after printing
RESERVE = 5                                   # seconds kept for the summary


def _sizes(a: argparse.Namespace) -> dict[str, int]:
    if a.quick:
        return {"size": 64, "batch": 8, "sync_batch": 8, "sync_batches": 3, "images": 32}
    return {"size": 224, "batch": 64, "sync_batch": 256, "sync_batches": 20, "images": 1024}


# ---- the steps, run in the child process ----
def _versions(a) -> dict[str, Any]:
    import platform

    import torch

    out: dict[str, Any] = {"ok": True, "python": platform.python_version(),
                           "torch": torch.__version__, "cuda": torch.version.cuda,
                           "cuda_available": torch.cuda.is_available()}
    try:
        import nvidia.dali as dali
        out["dali"] = dali.__version__
    except ImportError as e:
        out.update(ok=False, dali=f"not importable: {e}")
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["capability"] = list(torch.cuda.get_device_capability(0))
    if shutil.which("nvidia-smi"):
        p = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20)
        out["nvidia_smi"] = p.stdout[-4000:]
    if a.device == "cuda" and not torch.cuda.is_available():
        out.update(ok=False, error="--device cuda but torch sees no GPU")
    return out


def _pytest_cuda(a) -> dict[str, Any]:
    if a.device != "cuda":
        return {"ok": True, "skipped": "no GPU"}
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests"),
                                                         os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "cuda_only", "-p", "no:cacheprovider",
           str(root / "tests")]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root,
                       timeout=max(10, a.step_timeout - 10))
    return {"ok": p.returncode == 0, "rc": p.returncode, "tail": p.stdout[-3000:]}


def _bench(a, cmd: list[str], stem: str) -> dict[str, Any]:
    """Run a benchmark CLI into --work; its results table (the --out JSON <stem>.json) goes into
    the step's JSON. Its output is not read: it goes to this step's log (into gpu_check.log),
    whose tail the driver keeps in the step's result when the step failed."""
    sys.stdout.flush()
    sys.stderr.flush()
    p = subprocess.run([sys.executable, "-m", *cmd, "--out", str(a.work), "--time-limit",
                        str(int(a.step_timeout * 0.6))], timeout=max(10, a.step_timeout - 5))
    out: dict[str, Any] = {"ok": p.returncode == 0, "rc": p.returncode}
    table = a.work / f"{stem}.json"
    if table.exists():
        out["results"] = json.loads(table.read_text()).get("results")
    else:
        out["error"] = (f"python -m {cmd[0]} (exit status {p.returncode}) wrote no {table}; "
                        "its output is in gpu_check.log")
    return out


def _pipeline(a, recipe: str) -> dict[str, Any]:
    tiny = ["--size", "64", "--batch-size", "8", "--batches", "2", "--rounds", "1",
            "--warmup", "1"] if a.quick else ["--batches", "20", "--rounds", "2"]
    stem = f"pipeline-{a.device}" + ("" if recipe == "full" else f"-{recipe}")
    return _bench(a, ["tools.bench_pipeline", "--device", a.device, "--data", str(a.data),
                      "--recipe", recipe, "--configs", "dali,dali+maskmix,dali+mixpro", *tiny],
                  stem)


def _train_bench(a) -> dict[str, Any]:
    trim = (["--batch-size", "8", "--steps", "2", "--warmup", "1", "--rounds", "1"] if a.quick
            else ["--models", "deit_small_patch16_224", "--steps", "15", "--warmup", "5",
                  "--rounds", "1"])
    return _bench(a, ["tools.bench_train", "--device", a.device, "--data", str(a.data),
                      "--methods", "none,deit,mixpro", *trim], f"train-{a.device}")


def run_step(name: str, a: argparse.Namespace) -> dict[str, Any]:
    from . import gpu_check_steps as st

    s = _sizes(a)
    light = {"auto_augment": None, "re_prob": 0.0} if a.quick else {}
    steps = {
        "versions": lambda: _versions(a),
        "pytest_cuda": lambda: _pytest_cuda(a),
        "operator": lambda: st.check_operator(a.device),
        "poison": lambda: st.check_poison(a.device),
        "augment": lambda: st.check_augment(a.device, quick=a.quick),
        "loader": lambda: st.check_loader(a.device, a.data, s["size"], s["batch"]),
        "loader_sync": lambda: st.check_loader_sync(a.device, a.data, s["size"], s["sync_batch"],
                                                    batches=s["sync_batches"], **light),
        "pipeline_full": lambda: _pipeline(a, "full"),
        "pipeline_plain": lambda: _pipeline(a, "no-ra-erasing"),
        "train_bench": lambda: _train_bench(a),
        "checkpoint": lambda: st.check_checkpoint(a.device, a.data, s["size"], s["batch"], a.work,
                                                  **light),
        "selftest_hang": lambda: time.sleep(3600) or {"ok": True},
        "selftest_fail": lambda: print("selftest_fail: why it failed") or {"ok": False},
    }
    try:
        return steps[name]()
    finally:
        st.shutdown_pipelines()


def _child(a: argparse.Namespace) -> int:
    import faulthandler
    import traceback

    import threading

    faulthandler.dump_traceback_later(max(1.0, a.step_timeout - 2), exit=True)  # to stderr

    def orphaned() -> None:                   # the driver was killed: do not outlive it
        while os.getppid() == a.parent:
            time.sleep(1)
        os._exit(3)

    threading.Thread(target=orphaned, daemon=True).start()
    t0 = time.monotonic()
    try:
        res = run_step(a.step, a)
    except Exception as e:                    # noqa: BLE001 (recorded; the next step runs)
        res = {"ok": False, "exception": repr(e), "traceback": traceback.format_exc()[-4000:]}
    res["seconds"] = round(time.monotonic() - t0, 1)
    _write(a.work / f"{a.step}.json", res)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if res.get("ok") else 1)       # no interpreter teardown: nothing left to hang


# ---- the driver: no torch, no DALI in this process ----
def _write(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    tmp.replace(path)


def _spawn(name: str, a: argparse.Namespace, timeout: float) -> dict[str, Any]:
    out_json, log = a.work / f"{name}.json", a.work / f"{name}.log"
    out_json.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "tools.gpu_check", "--step", name, "--out", str(a.out),
           "--work", str(a.work), "--device", a.device, "--data", str(a.data),
           "--step-timeout", str(int(timeout)), "--parent", str(os.getpid())]
    cmd += ["--quick"] if a.quick else []
    t0 = time.monotonic()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                             cwd=Path(__file__).resolve().parents[1])
        try:
            rc = p.wait(timeout=timeout + 5)      # the child's faulthandler fires at timeout - 2
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            rc = p.wait()
    if out_json.exists():
        res = json.loads(out_json.read_text())
    else:                                      # killed, hung (stack dump in the log) or crashed
        res = {"ok": False, "rc": rc, "timeout": time.monotonic() - t0 >= timeout - 3,
               "seconds": round(time.monotonic() - t0, 1),
               "log_tail": log.read_text(errors="replace")[-4000:]}
        _write(out_json, res)
    if not res.get("ok") and "log_tail" not in res:     # failed: its output's tail, for the reader
        res["log_tail"] = log.read_text(errors="replace")[-4000:]
    with open(a.out / "gpu_check.log", "a") as f:
        f.write(f"===== {name} (rc {rc}, {time.monotonic() - t0:.1f} s)\n")
        f.write(log.read_text(errors="replace")[-20000:] + "\n")
    return res


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.gpu_check",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check_out")))
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="default: cuda when nvidia-smi is on the PATH")
    p.add_argument("--time-limit", type=float, default=420, help="seconds for the whole run")
    p.add_argument("--quick", action="store_true", help="tiny sizes (the CPU test of the script)")
    steps = ", ".join(STEPS)                      # the help lists the real steps, in order
    p.add_argument("--only", default="", help=f"comma list of steps to run (default: all: {steps})")
    p.add_argument("--skip", default="", help=f"comma list of steps to leave out ({steps})")
    p.add_argument("--data", type=Path, default=None, help="JPEG tree (default: generated, kept "
                   "in the temp folder for reruns)")
    p.add_argument("--work", type=Path, default=None,
                   help="scratch folder (default: mixpro_gpu_check_work in the temp folder)")
    p.add_argument("--step", default=None, help=argparse.SUPPRESS)        # child mode
    p.add_argument("--parent", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--step-timeout", type=float, default=60, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    a.device = a.device or ("cuda" if shutil.which("nvidia-smi") else "cpu")
    a.work = a.work or Path(tempfile.gettempdir()) / "mixpro_gpu_check_work"
    a.out.mkdir(parents=True, exist_ok=True)
    a.work.mkdir(parents=True, exist_ok=True)
    if a.step:
        return _child(a)
    (a.out / "gpu_check.log").unlink(missing_ok=True)
    for old in [*a.work.glob("pipeline-*.json"), *a.work.glob("train-*.json")]:
        old.unlink()                              # the targets read this run's tables only
    t_start = time.monotonic()
    known = {**STEPS, **SELFTEST}
    chosen = [s for s in (a.only.split(",") if a.only else STEPS) if s]
    unknown = [s for s in chosen + a.skip.split(",") if s and s not in known]
    if unknown:
        raise SystemExit(f"unknown step(s) {unknown}; steps: {', '.join(STEPS)}")
    chosen = [s for s in chosen if s not in set(a.skip.split(","))]
    n = _sizes(a)["images"]
    a.data = a.data or Path(tempfile.gettempdir()) / f"mixpro_gpu_check_data_{n}"
    if not any(a.data.rglob("*.jpg")):            # generated once, kept for reruns
        from .imagenet_like import make_imagenet_like

        make_imagenet_like(a.data, n, workers=os.cpu_count() or 1)
    report: dict[str, Any] = {"device": a.device, "quick": a.quick, "time_limit": a.time_limit,
                              "steps": {}}
    for name in chosen:
        timeout, least = known[name]
        left = a.time_limit - (time.monotonic() - t_start) - RESERVE
        if a.quick and name in STEPS:
            timeout *= 3                          # a shared CPU is slower than any GPU box
        if left < least:
            report["steps"][name] = {"ok": None, "skipped": f"out of time ({left:.0f} s left)"}
        else:
            report["steps"][name] = _spawn(name, a, min(timeout, left))
        res = report["steps"][name]
        print(f"[{time.monotonic() - t_start:6.1f}s] {name}: "
              f"{'skipped' if res.get('ok') is None else 'ok' if res['ok'] else 'FAILED'}"
              f" ({res.get('seconds', 0)} s)", flush=True)
        report["seconds"] = round(time.monotonic() - t_start, 1)
        ran = [r for r in report["steps"].values() if r.get("ok") is not None]
        report["ok"] = bool(ran) and all(r["ok"] for r in ran)
        _write(a.out / "gpu_check.json", report)
    from .gpu_check_steps import evaluate_targets

    report["targets"] = evaluate_targets(a.work, a.device)
    _write(a.out / "gpu_check.json", report)
    return 0 if report.get("ok") else 1


if __name__ == "__main__":
    raise SystemExit(main())
