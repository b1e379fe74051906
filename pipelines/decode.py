"""Decode, geometry and normalization steps shared by the training and validation pipelines.

One code path for both backends: `backend="gpu"` decodes with device="mixed" (nvJPEG, with
`hw_decoder_load` of the batch on the hardware JPEG decoder where there is one) and every later
operator follows its input onto the GPU; `backend="cpu"` decodes with libjpeg-turbo on the
pipeline's threads. Decoding always yields RGB (grayscale and CMYK are converted) with the
EXIF orientation applied; the format is taken from the bytes, not the file name.
"""
from __future__ import annotations

from typing import Sequence

__all__ = ["INTERPOLATIONS", "BACKENDS", "IMAGENET_MEAN", "IMAGENET_STD", "DTYPES",
           "decode_random_crop", "decode", "resize_train", "resize_shorter", "normalize",
           "guard"]

INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos")
BACKENDS = ("cpu", "gpu")
DTYPES = ("float32", "float16", "bfloat16")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _interp(name: str):
    from nvidia.dali import types

    table = {"bicubic": types.INTERP_CUBIC, "bilinear": types.INTERP_LINEAR,
             "nearest": types.INTERP_NN, "lanczos": types.INTERP_LANCZOS3}
    if name not in table:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {name!r}")
    return table[name]


def _decoder_device(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return "mixed" if backend == "gpu" else "cpu"


def _gpu_args(backend: str, hw_decoder_load: float) -> dict:
    if not 0.0 <= hw_decoder_load <= 1.0:
        raise ValueError(f"hw_decoder_load must be in [0, 1], got {hw_decoder_load!r}")
    return {"hw_decoder_load": hw_decoder_load} if backend == "gpu" else {}


def decode_random_crop(encoded, *, backend: str, scale: Sequence[float], ratio: Sequence[float],
                       hw_decoder_load: float = 0.65):
    """Decode only a random region (RandomResizedCrop's area `scale` and aspect `ratio`, 10
    tries, then the whole image as fallback): HWC uint8 RGB of varying size."""
    from nvidia.dali import fn, types

    return fn.decoders.image_random_crop(
        encoded, device=_decoder_device(backend), output_type=types.RGB,
        random_area=list(scale), random_aspect_ratio=list(ratio), num_attempts=10,
        **_gpu_args(backend, hw_decoder_load))


def decode(encoded, *, backend: str, hw_decoder_load: float = 0.65):
    """Decode whole images: HWC uint8 RGB."""
    from nvidia.dali import fn, types

    return fn.decoders.image(encoded, device=_decoder_device(backend), output_type=types.RGB,
                             **_gpu_args(backend, hw_decoder_load))


def resize_train(images, size: tuple[int, int], interpolation: str):
    """Resize to exactly (H, W), antialiased when shrinking (as PIL in timm's RandomResizedCrop)."""
    from nvidia.dali import fn

    return fn.resize(images, size=list(size), interp_type=_interp(interpolation), antialias=True)


def resize_shorter(images, shorter: int, interpolation: str):
    """Resize so the shorter side is `shorter`, keeping the aspect (torchvision Resize(int))."""
    from nvidia.dali import fn

    return fn.resize(images, resize_shorter=shorter, interp_type=_interp(interpolation),
                     antialias=True)


def normalize(images, *, mean: Sequence[float], std: Sequence[float], dtype: str,
              crop: tuple[int, int] | None = None, mirror=None):
    """HWC uint8 -> CHW (x/255 - mean)/std as float32 or float16 (bfloat16: float32 here, cast
    by the loader; DALI has no bfloat16). Optional center `crop` (H, W) and `mirror` (a
    DataNode of 0/1 per sample: horizontal flip), fused into the same pass."""
    from nvidia.dali import fn, types

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    for name, v in (("mean", mean), ("std", std)):
        if len(v) != 3:
            raise ValueError(f"{name} must have 3 values (RGB, in [0, 1] units), got {v!r}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std must be positive, got {std!r}")
    kwargs = {}
    if crop is not None:
        kwargs.update(crop=list(crop), crop_pos_x=0.5, crop_pos_y=0.5)
    if mirror is not None:
        kwargs["mirror"] = mirror
    return fn.crop_mirror_normalize(
        images, dtype=types.FLOAT16 if dtype == "float16" else types.FLOAT, output_layout="CHW",
        mean=[255.0 * m for m in mean], std=[255.0 * s for s in std], **kwargs)


def guard(encoded, tracker):
    """Run `tracker` (a badfiles.SampleTracker) on the encoded batch and its source_info;
    returns its per-sample dummy output, to be kept as a pipeline output."""
    from nvidia.dali import fn

    info = fn.get_property(encoded, key="source_info")
    return fn.dl_tensor_python_function(encoded, info, function=tracker, batch_processing=True,
                                        num_outputs=1, synchronize_stream=False)
