"""The steps of `tools.gpu_check` (each runs in its own process there): correctness of the
GPU path against the CPU path and the plain torch kernels, then loader, benchmark and
checkpoint steps. Every function returns a JSON-able dict with "ok"; `device` is "cuda" or
"cpu" (the CPU dry run: the same code at tiny sizes, GPU-only parts skipped).

  operator   the MaskMix operator on DALI's GPU backend against its CPU backend and the plain
             torch kernel, same seed, every mode, HWC uint8 and CHW float16: the decisions
             (mode, lam, token_mask, labels) identical; images identical for none / CutMix /
             MaskMix, within one uint8 level (1e-2 in float16) for Mixup.
  poison     stream correctness: a GPU producer op before the MaskMix operator fills its output
             with a poison value, spins ~50 ms (compat.cuda_spin) and only then writes the real
             image, all on DALI's stream without a host sync. A mixer that read its input on
             another stream, or before the producer finished, returns poison. The negative
             control does the slow write on a side stream and must be caught (else the check
             is reported as inconclusive: the sleep was too short to matter).
  augment    RandAugment and erasing: the GPU's DALI kernels against the CPU's Pillow / torch
             kernels, same seed: identical batches for ops both compute bitwise, the same boxes
             (float16 and float32 erasing, pixel and const modes), and within the documented
             tolerance for warp_affine with the per-channel fill, fn.filter and the enhance ops.
  loader     TrainLoader on cuda vs cpu, same seed: same labels and mixing decisions; images
             finite, normalized-range; a batch kept while 3 more run is unchanged.
  loader_sync  GPU TrainLoader batches (B=256) under torch.cuda.set_sync_debug_mode("warn"):
             the syncs torch reports and the MaskMix operator's host ms per batch.
  checkpoint a GPU loader + model + optimizer round trip: the resumed run's next batches and
             step equal the uninterrupted run's, and the training loss is finite.
Pipelines a step builds are shut down when it ends (`shutdown_pipelines`).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipelines.compat import cuda_spin, shutdown_pipeline

B = 8
_PIPES: list = []      # every pipeline a step built, shut down when the step ends
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
                cuda_spin(80_000_000)                             # ~40-50 ms at 1.7-2 GHz
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

    return _built(pipe())


def _built(p):
    p.build()
    _PIPES.append(p)
    return p


def shutdown_pipelines() -> int:
    """Shut down every pipeline built here, newest first (DALI's own teardown; left to the
    garbage collector, a pipeline with python operators can deadlock). Returns how many."""
    n = 0
    while _PIPES:
        shutdown_pipeline(_PIPES.pop())
        n += 1
    return n


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

    return _built(pipe())


_EXACT_OPS = ("Invert", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd", "Equalize")
# (ops, tolerance against Pillow) as docs of randaugment.py state; "interior": 1 px border off
_CLOSE_OPS = {
    "warp_fill": (("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"),
                  dict(frac_over_2=0.05)),                 # per-channel fill, bilinear edges
    "enhance": (("BrightnessIncreasing", "ContrastIncreasing", "ColorIncreasing"), dict(max=2)),
    "filter": (("SharpnessIncreasing",), dict(interior_max=1)),   # fn.filter
}
FILL = (124, 116, 104)


def _differs(want: np.ndarray, got: np.ndarray, tol: dict | None) -> bool:
    if tol is None:
        return not np.array_equal(want, got)
    d = np.abs(want.astype(np.int32) - got.astype(np.int32))
    if "max" in tol:
        return d.max() > tol["max"]
    if "interior_max" in tol:
        return d[1:-1, 1:-1].max() > tol["interior_max"]
    return (d > 2).mean() > tol["frac_over_2"]


def _augment_cases(quick: bool) -> dict:
    """name -> (images, layout, make(kernels) -> augment, (cpu, device) kernels, tolerance)."""
    from pipelines.erasing import random_erasing
    from pipelines.randaugment import RandAugmentPolicy, rand_augment

    def ra(ops, seed, layers=1, prob=1.0, mstd=0.5):
        policy = RandAugmentPolicy(magnitude=9.0, num_layers=layers, prob=prob,
                                   magnitude_std=mstd, transforms=ops)
        return lambda k: (lambda x: rand_augment(x, policy, seed=seed, kernels=k, fill=FILL))

    def erase(mode, seed):
        return lambda k: (lambda x: random_erasing(x, prob=0.5, mode=mode, count=2, seed=seed,
                                                    kernels=k))

    rgb = _images(0, (32, 48), "HWC", np.uint8)[0]
    noisy = [x * 4 for x in rgb]              # uint8 wraps: every level occurs (LUT ops)
    cases = {"rand_augment": (noisy, "HWC", ra(_EXACT_OPS, 4, 3, 0.5, 2.0),
                                 ("pillow", "dali"), None)}
    for name, (ops, tol) in _CLOSE_OPS.items():
        cases[name] = (rgb, "HWC", ra(ops, 5), ("pillow", "dali"), tol)
    for dtype in (np.float32, np.float16):
        flat = [np.full((3, 32, 48), 5.0, dtype)] * 16
        tag = np.dtype(dtype).name
        cases[f"erasing_const_{tag}"] = (flat, "CHW", erase("const", 8), ("torch", "dali"), None)
        cases[f"erasing_pixel_{tag}"] = (flat, "CHW", erase("pixel", 9), ("torch", "dali"),
                                         "boxes")
    return cases


def check_augment(device: str, batches: int = 2, quick: bool = False) -> dict[str, Any]:
    """RandAugment and erasing: the kernels of ``device`` (DALI's operators on the GPU) against
    the CPU's (Pillow / torch), same seed. Ops both compute bitwise (``_EXACT_OPS`` with
    magnitude noise and the coin) and const erasing must give identical batches; warp_affine
    with the per-channel fill, fn.filter (Sharpness) and the enhance ops within the tolerance
    of ``_CLOSE_OPS``; pixel erasing (float32 and float16) the same boxes, N(0, 1) inside.
    Off the GPU: DALI's kernels on the CPU."""
    gpu = device == "cuda"
    errs, changed = [], {}
    for name, (images, layout, make, (cpu_kernels, dev_kernels), tol) in _augment_cases(
            quick).items():
        ref = _augment_pipe(make(cpu_kernels), images, gpu=False, layout=layout)
        dut = _augment_pipe(make(dev_kernels), images, gpu=gpu, layout=layout)
        changed[name] = 0
        for k in range(batches):
            want, got = _arrays(ref.run())[0], _arrays(dut.run())[0]
            changed[name] += int(sum(not np.array_equal(w, i) for w, i in zip(want, images)))
            if tol == "boxes":          # noise draws differ between kernels; boxes may not
                bad = sum(not np.array_equal((w != i).any(0), (g != i).any(0))
                          for w, g, i in zip(want, got, images))
                box = np.concatenate([g[(g != i)].astype(np.float64)
                                      for g, i in zip(got, images)] or [np.zeros(1)])
                if box.size > 100 and not 0.8 < box.std() < 1.2:
                    errs.append(f"{name} batch {k}: noise std {box.std():.3f} in the boxes")
            else:
                bad = sum(_differs(w, g, tol) for w, g in zip(want, got))
            if got.dtype != want.dtype:
                errs.append(f"{name} batch {k}: dtype {got.dtype} (cpu: {want.dtype})")
            if bad:
                errs.append(f"{name} batch {k}: {int(bad)} of {len(got)} samples differ beyond "
                            f"{tol or 'equality'} ({dev_kernels} on {device} vs {cpu_kernels} on cpu)")
    return {"ok": not errs, "changed_samples": changed, "errors": errs[:20]}


def check_loader(device: str, data: Path, size: int, batch: int) -> dict[str, Any]:
    import torch

    from mixpro_dali import MixConfig

    from pipelines.loader import TrainLoader

    def batches(dev: str, n: int = 4) -> list[dict]:
        mix = MixConfig.preset("mixpro", image_size=size, mask_patch=min(64, size), seed=0)
        with TrainLoader(data, batch_size=batch, options=_options(size), device=dev, mix=mix,
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


def _take(loader, n: int) -> list[dict]:
    """The next n batches of a TrainLoader, across epoch boundaries."""
    out: list[dict] = []
    while len(out) < n:
        for batch in loader:
            out.append(batch)
            if len(out) == n:
                break
    return out


def _options(size: int, **changes: Any):
    """The loader options of a check: DataOptions' defaults (the training recipe) at `size`,
    with `changes` (gpu_check --quick: auto_augment=None, re_prob=0.0), declared and validated
    there."""
    from pipelines.options import DataOptions

    return DataOptions(image_size=size).replace(**changes)


def _train_loader(device: str, data: Path, size: int, batch: int, **option_changes):
    import os

    from mixpro_dali import MixConfig

    from pipelines.loader import TrainLoader, image_dtype

    mix = MixConfig.preset("mixpro", image_size=size, mask_patch=min(64, size), seed=0)
    return TrainLoader(data, batch_size=batch, options=_options(size, **option_changes),
                       device=device, mix=mix, num_threads=max(2, min(os.cpu_count() or 2, 12)),
                       seed=0, dtype=image_dtype("bf16", device))


def check_loader_sync(device: str, data: Path, size: int, batch: int, batches: int = 20,
                      warmup: int = 3, **option_changes) -> dict[str, Any]:
    """`batches` TrainLoader batches (after `warmup`) under torch.cuda.set_sync_debug_mode
    ("warn"): the host syncs torch reports (any thread, DALI's python operators included) and
    the MaskMix operator's host time per call. Off the GPU: no sync mode, times only.
    `option_changes`: DataOptions fields changed from the recipe (`_options`)."""
    import warnings

    import torch

    calls: list[float] = []
    with _train_loader(device, data, size, batch, **option_changes) as loader:
        op = getattr(loader, "mix_operator", None)
        cls = type(op) if op is not None else None
        orig = cls.__call__ if cls is not None else None

        def timed(self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return orig(self, *args, **kwargs)
            finally:
                calls.append(time.perf_counter() - t0)

        if cls is not None:
            cls.__call__ = timed
        try:
            _take(loader, warmup)
            cuda = device == "cuda"
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("warn")
            first = len(calls)
            t0 = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                got = _take(loader, batches)
            wall = time.perf_counter() - t0
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode(0)
            if cls is not None:
                cls.__call__ = orig
        image = got[-1]["image"]
        finite = all(bool(torch.isfinite(b["image"].float()).all()) for b in got[-3:])
    syncs = [str(w.message)[:200] for w in caught if "ynchroniz" in str(w.message)]
    op_ms = [1000 * c for c in calls[first:]]
    return {"ok": finite and image.device.type == device and image.dtype == loader._image_dtype,
            "batch_size": batch, "batches": batches, "image_dtype": str(image.dtype),
            "syncs": len(syncs), "syncs_per_batch": len(syncs) / batches,
            "sync_examples": sorted(set(syncs))[:5],
            "operator_ms_per_call": round(float(np.median(op_ms)), 3) if op_ms else None,
            "operator_calls": len(op_ms), "img_s_host_wall": round(batches * batch / wall, 1)}


def check_checkpoint(device: str, data: Path, size: int, batch: int, work: Path,
                     **option_changes) -> dict[str, Any]:
    """A training round trip on `device`: 2 steps, save loader + model + optimizer, 2 more steps;
    then a fresh loader, model and optimizer from the file: the same 2 batches and losses
    (equal within 1e-3: GPU kernels may reduce in another order), all finite."""
    import timm
    import torch
    import torch.nn.functional as F

    dev = torch.device(device)

    def step(model, opt, b):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            logits = model(b["image"]).float()
        lam = b["lam"].float()
        loss = (lam * F.cross_entropy(logits, b["label_a"], reduction="none") + (1 - lam)
                * F.cross_entropy(logits, b["label_b"], reduction="none")).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    def fresh():
        torch.manual_seed(0)
        model = timm.create_model("deit_tiny_patch16_224", img_size=size, num_classes=10).to(dev)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-4)

    model, opt = fresh()
    with _train_loader(device, data, size, batch, **option_changes) as loader:
        before = [step(model, opt, b) for b in _take(loader, 2)]
        path = work / "gpu_check_ckpt.pth"
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                    "loader": loader.state_dict()}, path)
        ref = _take(loader, 2)
        ref_losses = [step(model, opt, b) for b in ref]
    ckpt = torch.load(path, map_location=dev, weights_only=False)
    model, opt = fresh()
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    with _train_loader(device, data, size, batch, **option_changes) as loader:
        loader.load_state_dict(ckpt["loader"])
        again = _take(loader, 2)
        losses = [step(model, opt, b) for b in again]
    path.unlink()
    errs = [f"resumed batch {i}: {k} differs" for i, (x, y) in enumerate(zip(ref, again))
            for k in x if not torch.equal(x[k], y[k])]
    all_losses = torch.stack(before + ref_losses + losses).float().cpu()
    if not torch.isfinite(all_losses).all():
        errs.append(f"non-finite training loss: {all_losses.tolist()}")
    if not torch.allclose(torch.stack(losses).float().cpu(), torch.stack(ref_losses).float().cpu(),
                          rtol=1e-3, atol=1e-4):
        errs.append(f"resumed losses {torch.stack(losses).tolist()} != "
                    f"{torch.stack(ref_losses).tolist()}")
    return {"ok": not errs, "losses": [round(v, 5) for v in all_losses.tolist()],
            "errors": errs[:10]}
