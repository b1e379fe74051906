"""Random erasing with timm's semantics (``timm.data.RandomErasing``), as DALI graph ops.

Runs on normalized float images (float32 or float16, CHW or HWC, cpu or gpu DataNode) inside a
``@pipeline_def(enable_conditionals=True)``; output keeps shape, dtype, layout and device.
Per image, as timm: erase with probability ``prob``; ``k ~ U{1..count}`` boxes; each box tries up
to 10 times ``area ~ U(min_area, max_area) * H * W / k``, ``log(aspect) ~ U(log min, log max)``,
``h = round(sqrt(area * aspect))``, ``w = round(sqrt(area / aspect))`` and keeps the first with
``h < H and w < W`` (none fits: that box is skipped); ``top ~ U{0..H-h}``, ``left ~ U{0..W-w}``.
Fill: ``pixel`` N(0, 1) per pixel, ``rand`` N(0, 1) per channel, ``const`` 0; later boxes paint
over earlier ones. The 10 attempts are drawn at once and the first that fits is picked, so the
accepted-box distribution is timm's exactly (not a closed-form approximation); differences:
float32 box arithmetic (timm: float64) and round-half-up (timm: Python's round-half-even), both
only on measure-zero ties. Example: 224x224, area 0.25, aspect 1 -> a 112x112 box.
"""
from __future__ import annotations

import math

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali import math as dmath
from nvidia.dali.data_node import DataNode

from .compat import conditionals_enabled

__all__ = ["random_erasing", "ERASE_MODES", "ERASE_BACKENDS", "PixelEraser"]

ERASE_MODES = ("pixel", "rand", "const")
_ATTEMPTS = 10


def _validate(prob, mode, min_area, max_area, min_aspect, max_aspect, count, layout):
    def check(ok, message):
        if not ok:
            raise ValueError(message)

    check(0.0 <= prob <= 1.0, f"prob must be in [0, 1], got {prob}")
    check(mode in ERASE_MODES, f"mode must be one of {ERASE_MODES}, got {mode!r}")
    check(0.0 < min_area <= max_area <= 1.0,
          f"need 0 < min_area <= max_area <= 1, got min_area={min_area}, max_area={max_area}")
    check(min_aspect > 0 and max_aspect >= min_aspect,
          f"need 0 < min_aspect <= max_aspect, got min_aspect={min_aspect}, "
          f"max_aspect={max_aspect}")
    check(isinstance(count, int) and count >= 1, f"count must be an integer >= 1, got {count!r}")
    check(layout in ("CHW", "HWC"), f"layout must be 'CHW' or 'HWC', got {layout!r}")


def _seeds(seed, count):
    if seed is None:
        return iter([None] * count)
    return iter(int(s) & 0x7FFFFFFF for s in np.random.SeedSequence(seed).generate_state(count))


def sample_erase_boxes(height, width, num_boxes, *, min_area, max_area, log_aspect, seeds):
    """One box per sample, timm's 10-attempt loop: (top, left, h, w) int32, found bool."""
    area = fn.random.uniform(range=[min_area, max_area], shape=[_ATTEMPTS], seed=next(seeds))
    aspect = dmath.exp(fn.random.uniform(range=list(log_aspect), shape=[_ATTEMPTS],
                                         seed=next(seeds)))
    target = area * (height * width) / num_boxes  # (10,)
    h = dmath.floor(dmath.sqrt(target * aspect) + 0.5)  # (10,)
    w = dmath.floor(dmath.sqrt(target / aspect) + 0.5)
    fits = (h < height) & (w < width)  # (10,) bool
    iota = types.Constant(np.arange(_ATTEMPTS, dtype=np.float32))
    first = fn.reductions.min(dmath.min(iota + (fits ^ True) * 1e4, float(_ATTEMPTS)))  # ()
    pick = iota == first  # one-hot over attempts; all False when none fits
    h, w = fn.reductions.sum(h * pick), fn.reductions.sum(w * pick)
    u = fn.random.uniform(range=[0.0, 1.0], shape=[2], seed=next(seeds))
    top = dmath.min(dmath.floor(u[0] * (height - h + 1)), height - h)
    left = dmath.min(dmath.floor(u[1] * (width - w + 1)), width - w)
    as_int = [fn.cast(v, dtype=types.INT32) for v in (top, left, h, w)]
    return (*as_int, first < _ATTEMPTS)


def _paint(images, top, left, h, w, *, mode, layout, seeds):
    """Erase one box per sample (already selected samples only)."""
    hw_axes = (1, 2) if layout == "CHW" else (0, 1)
    shape = images.shape(dtype=types.INT32)  # (C, H, W) or (H, W, C)
    c = shape[0] if layout == "CHW" else shape[2]
    anchor = fn.cast(fn.stack(top, left), dtype=types.FLOAT)
    extent = fn.cast(fn.stack(h, w), dtype=types.FLOAT)
    fill = 0.0
    if mode == "rand":
        fill = fn.random.normal(shape=fn.stack(c), seed=next(seeds))  # (C,) per-channel color
    # DALI's GPU erase has no float16 (its CPU erase does): gpu images are erased as float32,
    # which the pixel mode needs for its sum anyway, so that costs one pass only in the other
    # modes, and only on the erased samples; the cast back rounds as the CPU kernel rounds its fill.
    widened = images.device == "gpu"
    data = fn.cast(images, dtype=types.FLOAT) if widened else images
    out = fn.erase(data, anchor=anchor, shape=extent, axis_names="HW", fill_value=fill)
    if mode != "pixel":
        return fn.cast_like(out, images) if widened else out
    patch_shape = fn.stack(c, h, w) if layout == "CHW" else fn.stack(h, w, c)
    noise = fn.random.normal(shape=patch_shape, seed=next(seeds), device=images.device)
    canvas = fn.slice(noise, start=fn.stack(-top, -left), shape=fn.stack(shape[hw_axes[0]],
                      shape[hw_axes[1]]), axes=list(hw_axes), out_of_bounds_policy="pad",
                      fill_values=0.0)  # noise inside the box, 0 elsewhere
    # erased box is 0, so + gives exactly the noise; float32: DALI arithmetic lacks float16
    return fn.cast_like((out if widened else fn.cast(out, dtype=types.FLOAT)) + canvas, images)


class PixelEraser:
    """Pixel-mode painting for cpu images, as a DALI batch python function: per sample, when
    its flag is set, a copy of the image gets N(0, 1) noise (torch's generator seeded by the
    DALI-drawn ``seed``, so checkpoints stay exact) in the box (top, left, h, w); samples left
    alone are handed back as they came. Replaces DALI's per-pixel normal draw plus three
    full-image passes (pad, add, cast), which cost ~1 ms of CPU per erased 224 px image.
    ``params`` per sample: int32 (flag, top, left, h, w, seed), one vector (one conversion)."""

    def __init__(self, layout: str) -> None:
        self.layout = layout

    def __call__(self, images, params):
        import torch
        from torch.utils.dlpack import to_dlpack

        out = []
        for image, p in zip(images, params):
            x = torch.from_dlpack(image)
            flag, top, left, h, w, seed = torch.from_dlpack(p).tolist()
            if flag:
                x = x.clone()
                box = (slice(None), slice(top, top + h), slice(left, left + w))
                if self.layout == "HWC":
                    box = box[1:] + box[:1]
                region = x[box]                   # a view: the copy below writes x
                region.copy_(torch.randn(region.shape,
                                         generator=torch.Generator().manual_seed(seed)))
            out.append(to_dlpack(x))
        return out


ERASE_BACKENDS = ("auto", "torch", "dali")


def random_erasing(images: DataNode, *, prob: float = 0.25, mode: str = "pixel",
                   min_area: float = 0.02, max_area: float = 1 / 3, min_aspect: float = 0.3,
                   max_aspect: float | None = None, count: int = 1, layout: str = "CHW",
                   seed: int | None = None, kernels: str = "auto") -> DataNode:
    """timm RandomErasing(probability=prob, mode, max_count=count) on normalized float images.

    ``images``: (C, H, W) or (H, W, C) float32/float16 per sample, cpu or gpu DataNode.
    ``max_aspect`` None -> 1 / min_aspect. ``seed`` None -> derived from the pipeline seed.
    ``kernels`` (pixel mode): "dali" paints with DALI operators in a conditional branch (DALI
    draws the noise), "torch" with ``PixelEraser`` (cpu images only), "auto" picks torch for
    cpu images and DALI for gpu images. Boxes and decisions are DALI's draws either way.
    Needs ``enable_conditionals=True``; gpu images also need DALI's default dynamic executor
    (box sizes are drawn on the CPU from the image shape).
    """
    max_aspect = 1.0 / min_aspect if max_aspect is None and min_aspect > 0 else max_aspect
    _validate(prob, mode, min_area, max_area, min_aspect, max_aspect, count, layout)
    if kernels not in ERASE_BACKENDS:
        raise ValueError(f"kernels must be one of {ERASE_BACKENDS}, got {kernels!r}")
    if not isinstance(images, DataNode):
        raise TypeError(f"images must be a DALI DataNode (inside @pipeline_def), got {type(images)}")
    if conditionals_enabled() is False:
        raise ValueError("random_erasing needs @pipeline_def(enable_conditionals=True)")
    if prob == 0:
        return images
    seeds = _seeds(seed, 2 + 5 * count)
    shape = images.shape(dtype=types.INT32)
    h_axis, w_axis = (1, 2) if layout == "CHW" else (0, 1)
    height = fn.cast(shape[h_axis], dtype=types.FLOAT)
    width = fn.cast(shape[w_axis], dtype=types.FLOAT)
    erase = fn.random.coin_flip(probability=prob, dtype=types.BOOL, seed=next(seeds))
    num_boxes = fn.random.uniform(values=[float(k) for k in range(1, count + 1)],
                                  seed=next(seeds))  # timm: randint(1, max_count)
    log_aspect = (math.log(min_aspect), math.log(max_aspect))
    use_torch = mode == "pixel" and (
        kernels == "torch" or (kernels == "auto" and images.device == "cpu"))
    if use_torch and images.device != "cpu":
        raise ValueError("kernels='torch' runs on cpu images only; use 'auto' or 'dali' for gpu")
    for slot in range(count):
        top, left, h, w, found = sample_erase_boxes(
            height, width, num_boxes, min_area=min_area, max_area=max_area,
            log_aspect=log_aspect, seeds=seeds)
        if use_torch:  # no conditional: one python operator that skips the unselected samples
            flag = fn.cast(erase & found & (num_boxes > slot), dtype=types.INT32)
            noise_seed = fn.random.uniform(range=[0, 2 ** 31 - 1], dtype=types.INT32,
                                           seed=next(seeds))
            params = fn.stack(flag, top, left, h, w, noise_seed)
            images = fn.dl_tensor_python_function(
                images, params, function=PixelEraser(layout),
                batch_processing=True, num_outputs=1, output_layouts=layout,
                synchronize_stream=False)
        elif erase & found & (num_boxes > slot):
            images = _paint(images, top, left, h, w, mode=mode, layout=layout, seeds=seeds)
    return images
