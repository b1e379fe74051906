"""One script for a lent GPU machine: correctness of the GPU path, then benchmarks 1-3, all
written to --out within a time box (default 360 s).

    bash pipelines/gpu_check.sh                       # on the GPU machine (installs DALI first)
    python -m pipelines.gpu_check --out DIR [--device cuda|cpu] [--budget 360] [--quick]

Checks (each a pass/fail with details in gpu_check.json):
  operator   the MaskMix operator on DALI's GPU backend against its CPU backend and the plain
             torch kernel, same seed, every mode, HWC uint8 and CHW float16: the decisions
             (mode, lam, token_mask, labels) identical; images identical for none / CutMix /
             MaskMix, within one uint8 level (1e-2 in float16) for Mixup.
  poison     stream correctness: a GPU producer op before the MaskMix operator fills its output
             with a poison value, spins ~50 ms (torch.cuda._sleep) and only then writes the real
             image, all on DALI's stream without a host sync. A mixer that read its input on
             another stream, or before the producer finished, returns poison. The negative
             control does the slow write on a side stream and must be caught (else the check
             is reported as inconclusive: the sleep was too short to matter).
  augment    RandAugment and erasing: the GPU's DALI kernels against the CPU's Pillow / torch
             kernels, same seed: identical batches for ops both compute bitwise, the same boxes.
  loader     TrainLoader on cuda vs cpu, same seed: same labels and mixing decisions; images
             finite, normalized-range; a batch kept while 3 more run is unchanged (no reuse of
             DALI's buffers under the consumer).
Benchmarks (subprocesses with timeouts; a failure is recorded, the rest still runs):
  pipeline   python -m pipelines.bench --device cuda (dali / +maskmix / +mixpro / torchvision+timm)
  train      python -m train.bench --device cuda (DeiT-T and DeiT-S, none/deit/transmix/mixpro)
--device cpu runs the same script without a GPU (operator: CPU backend vs kernel; poison skipped;
loader: CPU twice) at tiny sizes with --quick: that is how it is tested off the GPU machine.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

B = 8
POISON = 255           # source pixels stay in [0, 250]: a 255 in the mixed output is poison

TARGETS = {  # name: (description, how to read it from the benchmark results)
    "pipeline_img_s": "DALI training pipeline (no mix) >= 10,000 img/s on the GPU",
    "maskmix_cost_gpu": "MaskMix (every batch) costs <= 1% of pipeline throughput on the GPU",
    "deit_s_mixpro": "DeiT-S MixPro training (e2e) >= 98% of no-mix speed",
    "pal_cost": "attention capture + PAL <= 2% of a training step (step: mixpro vs deit)",
}


def _images(k: int, size: tuple[int, int], layout: str, dtype) -> tuple[list, list]:
    """Batch k: smooth random images with values in [0, 250] and int32 labels, deterministic."""
    rng = np.random.default_rng(1000 + k)
    h, w = size
    base = rng.uniform(0, 250, (B, 1, 1, 3)) + np.linspace(0, 1, w)[None, None, :, None] * 40
    x = np.clip(base + rng.normal(0, 20, (B, h, w, 3)), 0, 250).round()
    x = x if layout == "HWC" else (x.transpose(0, 3, 1, 2) / 64.0)
    return list(np.ascontiguousarray(x.astype(dtype))), list(rng.integers(0, 1000, (B, 1)).astype(np.int32))


def _producer(poison: bool, side_stream: bool) -> Callable:
    """GPU op: poison the output, spin, then copy the input in (on DALI's stream, or on a side
    stream with no ordering: the negative control)."""
    import torch
    from torch.utils.dlpack import to_dlpack

    side = {}

    def produce(images):
        from nvidia.dali.python_function_plugin import current_dali_stream

        dali = torch.cuda.ExternalStream(current_dali_stream())
        with torch.cuda.stream(dali):
            x = torch.stack([torch.from_dlpack(t) for t in images])
            out = torch.full_like(x, POISON)
        if side_stream:
            s = side.setdefault("s", torch.cuda.Stream())
            s.wait_stream(dali)
            ctx = torch.cuda.stream(s)
        else:
            ctx = torch.cuda.stream(dali)
        with ctx:
            if poison:
                torch.cuda._sleep(80_000_000)                     # ~40-50 ms at 1.7-2 GHz
            out.copy_(x)
        if side_stream:
            out.record_stream(s)                 # keep the allocator from reusing it early
            x.record_stream(s)
        return [to_dlpack(t) for t in out.unbind(0)]

    return produce


def _mix_pipe(cfg, *, device: str, layout: str, dtype, produce: Callable | None = None):
    from nvidia.dali import fn, pipeline_def

    from mixpro_dali import mix

    @pipeline_def(batch_size=B, num_threads=2, device_id=0 if device == "gpu" else None, seed=1)
    def pipe():
        imgs, labels = fn.external_source(
            lambda info: _images(info.iteration, cfg.image_size, layout, dtype), num_outputs=2,
            batch=True, batch_info=True, layout=[layout, ""])
        if device == "gpu":
            imgs = imgs.gpu()
            if produce is not None:
                imgs = fn.dl_tensor_python_function(imgs, function=produce, batch_processing=True,
                                                    device="gpu", synchronize_stream=False,
                                                    output_layouts=layout)
        out = mix(imgs, labels, cfg, layout=layout)
        return out.images, out.labels_a, out.labels_b, out.lam, out.token_mask, out.mode

    p = pipe()
    p.build()
    return p


def _arrays(outs) -> list[np.ndarray]:
    return [np.array((o.as_cpu() if hasattr(o, "as_cpu") else o).as_tensor()) for o in outs]


def _reference(cfg, k: int, layout: str, dtype) -> list[np.ndarray]:
    import torch

    from mixpro_dali import apply_mix, sample_mix

    imgs, labels = _images(k, cfg.image_size, layout, dtype)
    x, y = torch.from_numpy(np.stack(imgs)), torch.from_numpy(np.stack(labels))
    p = sample_mix(cfg, B, k, 0)
    mixed = apply_mix(x, p, patch_size=cfg.patch_size, layout=layout)
    return [mixed.numpy(), y.numpy(), y[p.partner].numpy(), p.lam.numpy(), p.token_mask.numpy(),
            np.full(B, p.mode, np.int32)]


def _compare(got: list[np.ndarray], want: list[np.ndarray], mixup: bool, what: str) -> list[str]:
    names = ("image", "label_a", "label_b", "lam", "token_mask", "mode")
    errs = []
    for name, g, w in zip(names, got, want):
        g, w = g.reshape(w.shape), w
        if name == "image" and mixup:
            tol = 1.0 if w.dtype == np.uint8 else 1e-2
            diff = np.abs(g.astype(np.float32) - w.astype(np.float32)).max()
            if diff > tol:
                errs.append(f"{what} {name}: max |diff| {diff:g} > {tol}")
        elif not np.array_equal(g, w):
            errs.append(f"{what} {name}: {int((g != w).sum())} of {g.size} values differ")
    return errs


def check_operator(device: str, batches: int = 3) -> dict[str, Any]:
    from mixpro_dali import MixConfig

    errs, cases = [], 0
    backends = ["cpu", "gpu"] if device == "cuda" else ["cpu"]
    for probs in ({}, {"mixup": 1.0}, {"cutmix": 1.0}, {"maskmix": 1.0},
                  {"maskmix": 0.5, "mixup": 0.5}):
        for layout, dtype in (("HWC", np.uint8), ("CHW", np.float16)):
            cfg = MixConfig(image_size=(64, 96), patch_size=16, mask_patch=32, probs=probs, seed=3)
            pipes = {b: _mix_pipe(cfg, device=b, layout=layout, dtype=dtype) for b in backends}
            for k in range(batches):
                want = _reference(cfg, k, layout, dtype)
                mixup = int(want[5][0]) == 1
                for b, p in pipes.items():
                    errs += _compare(_arrays(p.run()), want, mixup, f"{b} {probs} {layout} batch {k}")
                    cases += 1
    return {"ok": not errs, "cases": cases, "backends": backends, "errors": errs[:20]}


def check_poison(device: str, batches: int = 3) -> dict[str, Any]:
    if device != "cuda":
        return {"ok": True, "skipped": "no GPU"}
    from mixpro_dali import MixConfig

    cfg = MixConfig(image_size=(128, 128), patch_size=16, mask_patch=32,
                    probs={"maskmix": 0.5, "cutmix": 0.5}, seed=5)
    result: dict[str, Any] = {}
    for name, side in (("dali_stream", False), ("negative_control_side_stream", True)):
        p = _mix_pipe(cfg, device="gpu", layout="HWC", dtype=np.uint8, produce=_producer(True, side))
        poisoned, errs = 0, []
        for k in range(batches):
            got = _arrays(p.run())
            poisoned += int((got[0] == POISON).sum())
            errs += _compare(got, _reference(cfg, k, "HWC", np.uint8), False, f"{name} batch {k}")
        result[name] = {"poisoned_pixels": poisoned, "errors": errs[:5]}
    caught = result["negative_control_side_stream"]["poisoned_pixels"] > 0
    result["ok"] = not result["dali_stream"]["errors"] and result["dali_stream"]["poisoned_pixels"] == 0
    result["control_caught"] = caught
    if not caught:
        result["note"] = "inconclusive: the negative control read no poison (sleep too short?)"
    return result


def _augment_pipe(augment: Callable, images: list, *, gpu: bool, layout: str):
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=len(images), num_threads=2, device_id=0 if gpu else None, seed=9,
                  enable_conditionals=True)
    def pipe():
        x = fn.external_source(source=lambda: images, batch=True, layout=layout)
        return augment(x.gpu() if gpu else x)

    p = pipe()
    p.build()
    return p


def check_augment(device: str, batches: int = 2) -> dict[str, Any]:
    """RandAugment and erasing: the kernels of ``device`` (DALI's operators on the GPU) against
    the CPU's (Pillow / torch), same seed. Ops both compute bitwise (Invert, Posterize,
    Solarize, SolarizeAdd, Equalize, with magnitude noise and the coin) must give identical
    batches; const
    erasing must erase the same boxes. Off the GPU: DALI's kernels on the CPU."""
    from .erasing import random_erasing
    from .randaugment import RandAugmentPolicy, rand_augment

    gpu = device == "cuda"
    policy = RandAugmentPolicy(magnitude=9.0, num_layers=3, prob=0.5, magnitude_std=2.0,
                               transforms=("Invert", "PosterizeIncreasing", "SolarizeIncreasing",
                                           "SolarizeAdd", "Equalize"))
    rgb = _images(0, (32, 48), "HWC", np.uint8)[0] * 4
    flat = [np.full((3, 32, 48), 5.0, np.float32)] * 32
    cases = {
        "rand_augment": (rgb, "HWC", lambda k: (lambda x: rand_augment(x, policy, seed=4, kernels=k)),
                         ("pillow", "dali")),
        "erasing": (flat, "CHW", lambda k: (lambda x: random_erasing(
            x, prob=0.5, mode="const", count=2, seed=8, kernels=k)), ("torch", "dali")),
    }
    errs, changed = [], {}
    for name, (images, layout, make, (cpu_kernels, dev_kernels)) in cases.items():
        ref = _augment_pipe(make(cpu_kernels), images, gpu=False, layout=layout)
        dut = _augment_pipe(make(dev_kernels), images, gpu=gpu, layout=layout)
        changed[name] = 0
        for k in range(batches):
            want, got = _arrays(ref.run())[0], _arrays(dut.run())[0]
            changed[name] += int(sum(not np.array_equal(w, i) for w, i in zip(want, images)))
            if not np.array_equal(want, got):
                bad = int(sum(not np.array_equal(w, g) for w, g in zip(want, got)))
                errs.append(f"{name} batch {k}: {bad} of {len(got)} samples differ "
                            f"({dev_kernels} on {device} vs {cpu_kernels} on cpu)")
    return {"ok": not errs, "changed_samples": changed, "errors": errs[:20]}


def check_loader(device: str, data: Path, size: int, batch: int) -> dict[str, Any]:
    import torch

    from mixpro_dali import MixConfig

    from .loader import TrainLoader

    def batches(dev: str, n: int = 4) -> list[dict]:
        mix = MixConfig.preset("mixpro", image_size=size, mask_patch=min(64, size), seed=0)
        with TrainLoader(data, batch_size=batch, image_size=size, device=dev, mix=mix,
                         num_threads=2, seed=0) as loader:
            it = iter(loader)
            first = next(it)
            kept = {k: v.clone() for k, v in first.items()}
            out = [first] + [next(it) for _ in range(n - 1)]
            stale = [k for k in kept if not torch.equal(kept[k], first[k])]
            return [{k: v.cpu() for k, v in b.items()} for b in out], stale

    other = "cuda" if device == "cuda" else "cpu"
    a, stale_a = batches("cpu")
    b, stale_b = batches(other)
    errs = [f"{other}: batch changed while later ones ran: {s}" for s in stale_a + stale_b]
    for i, (x, y) in enumerate(zip(a, b)):
        for key in ("label_a", "label_b", "lam", "token_mask", "mode"):
            if not torch.equal(x[key], y[key]):
                errs.append(f"batch {i}: {key} differs between cpu and {other}")
        img = y["image"].float()
        if not torch.isfinite(img).all() or img.abs().max() > 10:
            errs.append(f"batch {i}: {other} images not finite/normalized (max {img.abs().max():g})")
        d = (x["image"].float().mean() - img.mean()).abs().item()     # other crops: loose
        if d > 0.5 or img.std() < 0.1:
            errs.append(f"batch {i}: {other} images: mean {img.mean():.3f} (cpu "
                        f"{x['image'].float().mean():.3f}), std {img.std():.3f}")
    return {"ok": not errs, "compared": f"cpu vs {other}", "errors": errs[:20]}


def run_bench(cmd: list[str], timeout: float, log) -> dict[str, Any]:
    t0 = time.monotonic()
    log("$ " + " ".join(cmd))
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 5))
        out = {"rc": p.returncode, "stdout_tail": p.stdout[-3000:], "stderr_tail": p.stderr[-3000:]}
    except subprocess.TimeoutExpired as e:
        tail = (e.stdout or b"")[-3000:]
        out = {"rc": "timeout", "stdout_tail": tail.decode() if isinstance(tail, bytes) else tail}
    out["seconds"] = round(time.monotonic() - t0, 1)
    log(f"  -> rc {out['rc']} in {out['seconds']} s")
    return out


def evaluate_targets(out: Path, device: str) -> dict[str, Any]:
    """The GPU targets read off the benchmark JSONs ({} on the CPU: they are GPU targets)."""
    res: dict[str, Any] = {}
    if device != "cuda":
        return res
    pj, tj = out / f"pipeline-{device}.json", out / f"train-{device}.json"
    if pj.exists():
        rows = {r["config"]: r for r in json.loads(pj.read_text())["results"]}
        if "dali" in rows:
            res["pipeline_img_s"] = {"value": rows["dali"]["img_s"], "ok": rows["dali"]["img_s"] >= 10_000}
        if "dali+maskmix" in rows:
            x = rows["dali+maskmix"]["x_dali"]
            res["maskmix_cost_gpu"] = {"value": 1 - x, "ok": x >= 0.99}
    if tj.exists():
        for r in json.loads(tj.read_text())["results"]:
            if r["method"] != "mixpro":
                continue
            if r["mode"] == "e2e" and "small" in r["model"]:
                res["deit_s_mixpro"] = {"value": r["x_none"], "ok": r["x_none"] >= 0.98}
            if r["mode"] == "step" and r.get("x_deit"):
                pal = res.setdefault("pal_cost", {"value": 0.0, "ok": True, "per_model": {}})
                pal["per_model"][r["model"]] = 1 - r["x_deit"]
                pal["value"] = max(pal["value"], 1 - r["x_deit"])
                pal["ok"] &= r["x_deit"] >= 0.98
    return {k: {"target": TARGETS[k], **v} for k, v in res.items()}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipelines.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if seen")
    p.add_argument("--budget", type=float, default=360, help="seconds for everything")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a CPU test of the script)")
    p.add_argument("--images", type=int, default=None, help="generated JPEGs (1024; quick: 48)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="where to generate the JPEGs (default: a temp folder; kept for reruns)")
    p.add_argument("--skip", default="", help="comma list of steps to skip: "
                   "operator,poison,loader,pipeline,train")
    return p.parse_args(argv)


def main(argv=None) -> int:
    import torch

    a = parse_args(argv)
    t_start = time.monotonic()
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    a.out.mkdir(parents=True, exist_ok=True)
    logf = open(a.out / "gpu_check.log", "a")

    def log(msg: str) -> None:
        line = f"[{time.monotonic() - t_start:6.1f}s] {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    left = lambda: a.budget - (time.monotonic() - t_start)  # noqa: E731
    from .bench_report import machine_info
    from .imagenet_like import make_imagenet_like

    report: dict[str, Any] = {"device": device, "quick": a.quick, "machine": machine_info(),
                              "checks": {}, "benchmarks": {}}
    skip = set(filter(None, a.skip.split(",")))
    n = a.images or (48 if a.quick else 1024)
    data = a.data_dir or Path(tempfile.gettempdir()) / f"mixpro_gpu_check_data_{n}"  # not in --out
    make_imagenet_like(data, n, workers=os.cpu_count() or 1)
    log(f"data: {n} ImageNet-like JPEGs in {data}")
    checks = {"operator": lambda: check_operator(device),
              "poison": lambda: check_poison(device),
              "augment": lambda: check_augment(device),
              "loader": lambda: check_loader(device, data, 64 if a.quick else 224, 8 if a.quick else 64)}
    for name, fn in checks.items():
        if name in skip:
            continue
        t0 = time.monotonic()
        try:
            report["checks"][name] = fn()
        except Exception as e:                 # noqa: BLE001 (recorded; the rest still runs)
            report["checks"][name] = {"ok": False, "exception": repr(e),
                                      "traceback": traceback.format_exc()[-3000:]}
        report["checks"][name]["seconds"] = round(time.monotonic() - t0, 1)
        log(f"check {name}: {'ok' if report['checks'][name]['ok'] else 'FAILED'} "
            f"{ {k: v for k, v in report['checks'][name].items() if k not in ('traceback',)} }")
    py, out, gpu = sys.executable, str(a.out), device == "cuda"
    tiny = ["--size", "64", "--batch-size", "8", "--batches", "2", "--rounds", "1"] if a.quick else []
    configs = "dali,dali+maskmix,dali+mixpro" + (",torchvision+timm" if _has("torchvision") else "")
    benches = {
        "pipeline": ([py, "-m", "pipelines.bench", "--device", device, "--data", str(data),
                      "--out", out, "--configs", configs, "--rounds", "3",
                      "--batches", "20" if gpu else "5", *tiny], 0.40),
        "train": ([py, "-m", "train.bench", "--device", device, "--data", str(data), "--out", out,
                   "--rounds", "3", *(["--batch-size", "8", "--steps", "2", "--warmup", "1",
                                       "--rounds", "1", "--methods", "none,deit,mixpro"]
                                      if a.quick else [])], 0.95),
    }
    for name, (cmd, share) in benches.items():
        if name in skip:
            continue
        budget = left() * share if name == "pipeline" else left() - 10
        cmd += ["--time-limit", str(int(budget * 0.55))]
        report["benchmarks"][name] = run_bench(cmd, budget, log)
    report["targets"] = evaluate_targets(a.out, device)
    report["seconds"] = round(time.monotonic() - t_start, 1)
    report["ok"] = all(c["ok"] for c in report["checks"].values()) and all(
        b["rc"] == 0 for b in report["benchmarks"].values())
    (a.out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    log(f"wrote {a.out / 'gpu_check.json'}: ok={report['ok']}, targets "
        f"{ {k: v['ok'] for k, v in report['targets'].items()} }")
    return 0 if report["ok"] else 1


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    raise SystemExit(main())
