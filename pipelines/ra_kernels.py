"""Pillow kernels of the RandAugment ops: what CPU pipelines run instead of DALI's CPU operators.

Why: at 224 px DALI's CPU operators cost 2-4x more per image than Pillow for these ops (a
bilinear ``warp_affine`` ~3.6 ms of CPU per image, Pillow's affine ~1.0 ms; blends ~2x), and
batched torch rewrites measured no better than DALI here (every uint8 <-> float pass costs as
much as Pillow's whole LUT op). So on the CPU ``rand_augment`` still draws every decision in DALI
(op, coin, magnitude, sign: the same nodes, seeds and checkpoints as the GPU path) and applies a
layer in one python operator that runs Pillow's ops, the ones timm itself runs, on a thread pool
(Pillow releases the GIL inside its kernels). On the GPU it keeps DALI's operators.

Each kernel is ``kernel(image: PIL.Image RGB, arg, fill) -> PIL.Image`` with ``arg`` the op's
argument after timm's level map (as ``randaugment`` computes it, shared with the DALI path; None
for ops without one). Outputs equal timm 1.0.31's ops for the same argument, with two
deliberate differences: geometric ops always resample bilinearly (as the DALI path; timm uses
the train interpolation), and PosterizeIncreasing at 0 bits gives a black image where Pillow 13
raises (the DeiT crash).

``equalize`` / ``TorchEqualize``: Pillow's Equalize as a plain torch kernel, which the DALI-kernel
path (gpu images) runs in the graph instead of DALI's OpenCV-style ``fn.equalize``.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

__all__ = ["RA_PILLOW_KERNELS", "RandAugmentLayer", "equalize", "TorchEqualize"]

_BILINEAR = Image.Resampling.BILINEAR


def _affine(image, matrix, fill):
    return image.transform(image.size, Image.Transform.AFFINE, matrix, _BILINEAR, fillcolor=fill)


def _posterize(image, bits, _fill):
    bits = int(bits)
    if bits <= 0:                      # timm intends black; Pillow >= 10 raises for 0 bits
        return Image.new(image.mode, image.size, 0)
    return image if bits >= 8 else ImageOps.posterize(image, bits)


def _solarize_add(image, add, _fill):  # timm: threshold 128, saturating add
    add = int(add)
    lut = [min(255, i + add) if i < 128 else i for i in range(256)]
    return image.point(lut * len(image.getbands()))


def _enhance(kind):
    return lambda image, factor, _fill: kind(image).enhance(float(factor))


def _shear(axis):
    def kernel(image, factor, fill):
        f = float(factor)
        return _affine(image, (1, f, 0, 0, 1, 0) if axis == "x" else (1, 0, 0, f, 1, 0), fill)
    return kernel


def _translate(axis):
    def kernel(image, pct, fill):  # timm: pixels = pct * img.size[axis]
        if axis == "x":
            return _affine(image, (1, 0, float(pct) * image.size[0], 0, 1, 0), fill)
        return _affine(image, (1, 0, 0, 0, 1, float(pct) * image.size[1]), fill)
    return kernel


# timm op name -> kernel(image, arg | None, fill) -> image
RA_PILLOW_KERNELS: dict[str, Callable] = {
    "AutoContrast": lambda image, _a, _f: ImageOps.autocontrast(image),
    "Equalize": lambda image, _a, _f: ImageOps.equalize(image),
    "Invert": lambda image, _a, _f: ImageOps.invert(image),
    "Rotate": lambda image, degrees, fill: image.rotate(float(degrees), resample=_BILINEAR,
                                                        fillcolor=fill),
    "Posterize": _posterize, "PosterizeIncreasing": _posterize,
    "Solarize": lambda image, threshold, _f: ImageOps.solarize(image, int(threshold)),
    "SolarizeIncreasing": lambda image, threshold, _f: ImageOps.solarize(image, int(threshold)),
    "SolarizeAdd": _solarize_add,
    "Color": _enhance(ImageEnhance.Color), "ColorIncreasing": _enhance(ImageEnhance.Color),
    "Contrast": _enhance(ImageEnhance.Contrast),
    "ContrastIncreasing": _enhance(ImageEnhance.Contrast),
    "Brightness": _enhance(ImageEnhance.Brightness),
    "BrightnessIncreasing": _enhance(ImageEnhance.Brightness),
    "Sharpness": _enhance(ImageEnhance.Sharpness),
    "SharpnessIncreasing": _enhance(ImageEnhance.Sharpness),
    "ShearX": _shear("x"), "ShearY": _shear("y"),
    "TranslateXRel": _translate("x"), "TranslateYRel": _translate("y"),
    "Desaturate": _enhance(ImageEnhance.Color),  # the level map already gives timm's factor
    "GaussianBlur": lambda image, radius, _f: image.filter(ImageFilter.GaussianBlur(float(radius))),
}


class RandAugmentLayer:
    """One RandAugment layer as a DALI batch python function (``dl_tensor_python_function``).

    Inputs per sample: the HWC uint8 RGB image and one float32 vector: the chosen op's index
    into ``names``, whether the op applies (0/1) and the signed magnitude. ``level_to_arg[i](level,
    math)`` gives op i's argument (None: an op without one), ``math`` the arithmetic backend the
    maps are written against (``randaugment._NUMPY``). Plain functions, not closures made while
    DALI traces the pipeline: autograph would wrap those and add ~20% to every call. Samples
    left alone are handed back as they came; the others run on ``pool`` (a
    ``concurrent.futures`` executor, None: in the calling thread)."""

    def __init__(self, names: Sequence[str], level_to_arg: Sequence[Callable | None], math,
                 fill: tuple[int, ...], pool=None) -> None:
        unknown = [n for n in names if n not in RA_PILLOW_KERNELS]
        if unknown:
            raise ValueError(f"no Pillow kernel for RandAugment op(s) {unknown}")
        if fill is None or len(fill) not in (1, 3):
            raise ValueError(f"the Pillow kernels need a fill of 1 or 3 ints, got {fill!r} "
                             "(fill=None, repeat the border, needs kernels='dali')")
        if len(level_to_arg) != len(names):
            raise ValueError(f"{len(level_to_arg)} level maps for {len(names)} ops")
        self.names, self.kernels = tuple(names), tuple(RA_PILLOW_KERNELS[n] for n in names)
        self.level_to_arg, self.math = tuple(level_to_arg), math
        self.fill = tuple(fill) * 3 if len(fill) == 1 else tuple(fill)  # PIL: an int is red only
        self.pool = pool

    def one(self, image: np.ndarray, op: int, level: float, flip: bool = False) -> np.ndarray:
        """Op ``op`` at signed magnitude ``level`` on one HWC uint8 RGB array, after a
        horizontal flip if ``flip`` (timm flips before RandAugment); a new array."""
        if not 0 <= op < len(self.kernels):
            raise ValueError(f"RandAugment op index {op} out of range [0, {len(self.kernels)})")
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"RandAugment expects HWC uint8 RGB images, got shape "
                             f"{image.shape} {image.dtype}")
        to_arg = self.level_to_arg[op]
        arg = None if to_arg is None else to_arg(np.float64(level), self.math)  # timm: float64
        pil = Image.fromarray(image, "RGB")
        if flip:   # Pillow's transpose: ~0.06 ms at 224 px, ~8x less than a numpy flip copy
            pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.array(self.kernels[op](pil, arg, self.fill))

    def __call__(self, images, decisions):
        """``decisions`` per sample: float32 (op index, applies 0/1, signed level[, flip 0/1]);
        a flip is only asked for together with an applied op."""
        import torch
        from torch.utils.dlpack import to_dlpack

        tensors = [torch.from_dlpack(t) for t in images]
        jobs = []
        for i, (t, d) in enumerate(zip(tensors, decisions)):
            op, on, level, *flip = torch.from_dlpack(d).tolist()
            if on:
                jobs.append((i, t.numpy(), int(op), level, bool(flip and flip[0])))
        run = (lambda job: self.one(*job[1:]))
        results = map(run, jobs) if self.pool is None else self.pool.map(run, jobs)
        for (i, *_), array in zip(jobs, results):
            tensors[i] = torch.from_numpy(array)
        return [to_dlpack(t) for t in tensors]


# ---- Equalize for the DALI-kernel path (gpu images): Pillow's formula as a torch kernel ----
def equalize(image):
    """Pillow 13's ``ImageOps.equalize`` on one HWC uint8 torch tensor, on its device, bitwise.

    Per channel: histogram h, step = (N - h[last non-empty bin]) // 255, lut[i] = (step // 2 +
    h[0] + ... + h[i-1]) // step clipped to 255 (Pillow's ``point`` clips), identity when
    step == 0 (at most one non-empty bin, or nearly so). DALI's ``fn.equalize`` follows OpenCV's
    round(255 * (cdf - cdf_min) / (N - cdf_min)) instead (see randaugment._equalize_kernel).
    No host synchronization (no ``bincount``, which reads its max back on CUDA)."""
    import torch

    h, w, c = image.shape
    offsets = torch.arange(c, device=image.device) * 256                        # (C,)
    idx = (image.reshape(-1, c).long() + offsets).reshape(-1)                   # (N*C,)
    hist = torch.zeros(c * 256, dtype=torch.int64, device=image.device)
    hist = hist.scatter_add_(0, idx, torch.ones_like(idx)).view(c, 256)        # (C, 256)
    last = 255 - (hist.flip(1) > 0).to(torch.uint8).argmax(1, keepdim=True)     # (C, 1)
    step = (hist.sum(1, keepdim=True) - hist.gather(1, last)) // 255            # (C, 1)
    safe = step.clamp(min=1)
    below = hist.cumsum(1) - hist                                               # (C, 256)
    lut = ((safe // 2 + below) // safe).clamp(max=255)
    identity = torch.arange(256, device=image.device).expand(c, 256)
    lut = torch.where(step > 0, lut, identity).to(torch.uint8).reshape(-1)      # (C*256,)
    return lut[idx].view(h, w, c)


class TorchEqualize:
    """``equalize`` as a DALI batch python function (``dl_tensor_python_function``) on cpu or
    gpu HWC uint8 images; on the gpu the kernels run on DALI's CUDA stream (as the MaskMix
    operator), so the graph needs no host synchronization (``synchronize_stream=False``)."""

    def __init__(self, device: str) -> None:
        self.device = device

    def __call__(self, images):
        import contextlib

        import torch
        from torch.utils.dlpack import to_dlpack

        stream = contextlib.nullcontext()
        if self.device == "gpu":
            from nvidia.dali.python_function_plugin import current_dali_stream

            stream = torch.cuda.stream(torch.cuda.ExternalStream(current_dali_stream()))
        with stream:
            out = []
            for t in images:
                x = torch.from_dlpack(t)
                if x.dim() != 3 or x.dtype != torch.uint8:
                    raise ValueError(f"Equalize expects HWC uint8 images, got shape "
                                     f"{tuple(x.shape)} {x.dtype}")
                out.append(to_dlpack(equalize(x)))
            return out
