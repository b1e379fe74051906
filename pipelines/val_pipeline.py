"""The validation pipeline (timm's eval transform): reader in file order -> decode -> resize the
shorter side to floor(size / crop_pct) -> center crop `size` + normalize to CHW (one pass)."""
from __future__ import annotations

import math
from typing import Any, Sequence

from .badfiles import SampleTracker
from .decode import DEFAULT_HW_DECODER_LOAD, decode, guard, normalize, resize_shorter, resize_train
from .readers import Source, read

__all__ = ["VAL_OUTPUTS", "build_val_pipeline", "resize_size", "normalize_dtype"]

VAL_OUTPUTS = ("image", "label", "_checked")


def normalize_dtype(backend: str, dtype: str) -> str:
    """What the normalize pass writes for output `dtype` (the loader casts): half outputs on the
    GPU (float16, bfloat16 under AMP) are written as float16, half the bytes of float32 (DALI
    has no bfloat16); otherwise `dtype` itself (bfloat16 -> float32 in `normalize`)."""
    return "float16" if backend == "gpu" and dtype in ("float16", "bfloat16") else dtype


def resize_size(image_size: tuple[int, int], crop_pct: float) -> tuple[int, int]:
    """timm: floor(size / crop_pct) per side (224, 0.875 -> 256)."""
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct!r}")
    return tuple(math.floor(s / crop_pct) for s in image_size)  # type: ignore[return-value]


def build_val_pipeline(source: Source, *, batch_size: int, image_size: tuple[int, int],
                       crop_pct: float, interpolation: str, mean: Sequence[float],
                       std: Sequence[float], dtype: str, backend: str, device_id: int | None,
                       shard_id: int, num_shards: int, num_threads: int,
                       hw_decoder_load: float = DEFAULT_HW_DECODER_LOAD, prefetch_queue_depth: int = 2
                       ) -> tuple[Any, SampleTracker]:
    """Build the validation pipeline. Returns (pipeline, tracker)."""
    from nvidia.dali import pipeline_def

    scaled = resize_size(image_size, crop_pct)
    tracker = SampleTracker()

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=1,
                  prefetch_queue_depth=prefetch_queue_depth)
    def val_pipe():
        encoded, labels = read(source, shard_id=shard_id, num_shards=num_shards, shuffle=False,
                               seed=0)
        checked = guard(encoded, tracker)
        images = decode(encoded, backend=backend, hw_decoder_load=hw_decoder_load)
        if scaled[0] == scaled[1]:
            images = resize_shorter(images, scaled[0], interpolation, backend=backend,
                                    threads=num_threads)
        else:
            images = resize_train(images, scaled, interpolation, backend=backend,
                                  threads=num_threads)
        images = normalize(images, mean=mean, std=std, dtype=normalize_dtype(backend, dtype),
                           crop=image_size)
        if backend == "gpu":
            labels = labels.gpu()
        return images, labels, checked

    pipe = val_pipe()
    pipe.build()
    return pipe, tracker
