"""Smoke check for an install or a container: `python -m mixpro_dali.smoke [--require-gpu]`.

Prints the versions of torch, torchvision, timm, DALI, numpy and pillow, whether CUDA is usable
and which GPU, then runs a one-batch DALI pipeline on the CPU (and on the GPU when there is one)
to prove DALI's native libraries load. Exit code 0 when everything needed works, 1 otherwise.
Without a GPU the GPU checks are reported as skipped, not failed, unless --require-gpu is given.

This is a diagnostic, not library code: DALI and torch are imported inside the functions so that
a broken install is reported line by line instead of ending in one import traceback.
"""
from __future__ import annotations

import argparse
import importlib
import platform
import sys
from typing import Callable

PACKAGES = ("torch", "torchvision", "timm", "nvidia.dali", "numpy", "PIL")


def package_versions() -> dict[str, str | None]:
    """Version of each package in PACKAGES; None where the import fails."""
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = str(importlib.import_module(name).__version__)
        except Exception:  # any import failure is what this check reports
            versions[name] = None
    return versions


def cuda_report() -> tuple[bool, str]:
    """(usable, description): torch's view of CUDA: build, device count, first GPU's name."""
    import torch

    built = torch.version.cuda or "none (CPU build)"
    if not torch.cuda.is_available():
        return False, f"torch CUDA build {built}; no usable GPU (driver missing or no --gpus?)"
    count = torch.cuda.device_count()
    name = torch.cuda.get_device_name(0)
    cap = ".".join(map(str, torch.cuda.get_device_capability(0)))
    return True, f"torch CUDA build {built}; {count} GPU(s); cuda:0 = {name} (sm {cap})"


def run_dali(device: str) -> str:
    """Build and run a tiny DALI pipeline (fn.random.uniform, batch of 2) on `device`."""
    import numpy as np
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=2, num_threads=1, device_id=0 if device == "gpu" else None, seed=0)
    def tiny():
        values = fn.random.uniform(range=(0.0, 1.0), shape=(4,))
        return values.gpu() if device == "gpu" else values

    pipe = tiny()
    pipe.build()
    (out,) = pipe.run()
    if device == "gpu":
        out = out.as_cpu()
    batch = np.asarray(out.as_tensor())  # (2, 4)
    if batch.shape != (2, 4) or not ((batch >= 0.0) & (batch < 1.0)).all():
        raise RuntimeError(f"unexpected DALI output {batch.shape}: {batch}")
    return f"batch {batch.shape} in [0, 1)"


def run_torch_gpu() -> str:
    """A small matmul on cuda:0, checked against the CPU result."""
    import torch

    a = torch.arange(16, dtype=torch.float32).reshape(4, 4)
    got = (a.cuda() @ a.cuda()).cpu()
    if not torch.equal(got, a @ a):
        raise RuntimeError("cuda:0 matmul differs from the CPU result")
    return "4x4 matmul matches CPU"


def _check(label: str, fn: Callable[[], str]) -> bool:
    try:
        print(f"  ok    {label}: {fn()}")
        return True
    except Exception as exc:  # report every failure and keep going
        print(f"  FAIL  {label}: {type(exc).__name__}: {exc}")
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mixpro_dali.smoke", description=__doc__)
    parser.add_argument(
        "--require-gpu", action="store_true", help="fail (exit 1) when no GPU is usable"
    )
    args = parser.parse_args(argv)

    print(f"python {platform.python_version()} on {platform.platform()}")
    versions = package_versions()
    for name, version in versions.items():
        print(f"  {name:<12} {version or 'IMPORT FAILED'}")
    ok = all(v is not None for v in versions.values())
    if not ok:
        print("FAIL: some packages do not import; the checks below need them")
        return 1

    gpu, description = cuda_report()
    print(f"cuda: {description}")
    ok &= _check("DALI cpu pipeline", lambda: run_dali("cpu"))
    if gpu:
        ok &= _check("torch cuda:0", run_torch_gpu)
        ok &= _check("DALI gpu pipeline", lambda: run_dali("gpu"))
    else:
        print("  skip  GPU checks (no usable GPU)")
        if args.require_gpu:
            print("FAIL: --require-gpu given and no GPU is usable")
            return 1
    print("OK" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
