"""The training pipeline (DeiT / MixPro recipe, timm's order of augmentations):

    reader (global shuffle per epoch) -> decode with random resized crop (fused ROI decode)
    -> resize to image_size (bicubic) -> horizontal flip -> RandAugment (HWC uint8)
    -> normalize to CHW float -> random erasing -> MaskMix operator -> outputs

The flip comes before RandAugment, as in timm; the other order is not equivalent: ShearY
(y' = y + f*x) is not mirror-symmetric, so in timm's order its fill wedge is always on one side
(the right), flipped afterwards on either side. The flip costs no pass of its own: a sample is
flipped inside the pass of its first applied RandAugment op (a Pillow transpose on the CPU),
and a sample no op touches inside the normalize pass (a flip commutes with doing nothing).

Normalized images travel through erasing and mixing as `pipeline_dtype(backend, dtype)` (the
loader casts to the output dtype, on the GPU the run's AMP dtype): float16 on the GPU (half the
bytes; half precision resolves 1/8 of an 8-bit level over the normalized range); on the CPU the output's own precision
(float16 if asked for, else float32), because DALI's CPU normalize writes float16 through a
software conversion at ~3x the cost of float32 (0.32 vs 0.11 ms per 224 px image), more than
the float16 saving in erasing and mixing, and a float32 output then needs no cast.
"""
from __future__ import annotations

from typing import Any

from mixpro_dali import MixConfig, MaskMixOperator, mix

from .badfiles import SampleTracker
from .decode import DTYPES, decode_random_crop, guard, normalize, resize_train
from .options import DataOptions
from .readers import Source, read

__all__ = ["TrainOptions", "TRAIN_OUTPUTS", "pipeline_dtype", "build_train_pipeline",
           "pipeline_seed", "no_mix_config"]

def pipeline_dtype(backend: str, dtype: str) -> str:
    """dtype of normalized images inside the training pipeline for output `dtype` (the loader
    casts to `dtype`): see the module docstring."""
    return "float16" if backend == "gpu" or dtype == "float16" else "float32"

TRAIN_OUTPUTS = ("image", "label_a", "label_b", "lam", "token_mask", "mode", "_checked")
"""Pipeline outputs in order; names starting with '_' are internal (not given to users)."""


TrainOptions = DataOptions
"""Former name of the training pipeline's options (kept as an alias): `DataOptions`."""


def pipeline_seed(seed: int, shard_id: int) -> int:
    """DALI seed of shard `shard_id`: shards draw independent augmentations."""
    return (seed * 1_000_003 + shard_id * 7919 + 1) % (2**31 - 1)


def no_mix_config(image_size: tuple[int, int]) -> MixConfig:
    """MixConfig that never mixes (token_mask all ones on a 16-px grid, or the largest patch
    of 14, 8, 4, 2, 1 px that divides the image)."""
    patch = next(p for p in (16, 14, 8, 4, 2, 1) if image_size[0] % p == 0 and image_size[1] % p == 0)
    return MixConfig.preset("none", image_size=image_size, patch_size=patch, mask_patch=patch)


def _augmentations(opts: DataOptions):
    """(rand_augment, random_erasing), each None when the options switch it off."""
    from .erasing import random_erasing
    from .randaugment import flip_rand_augment

    return (flip_rand_augment if opts.auto_augment else None,
            random_erasing if opts.re_prob > 0 else None)


def build_train_pipeline(source: Source, *, batch_size: int, opts: DataOptions,
                         mix_config: MixConfig, backend: str, device_id: int | None,
                         shard_id: int, num_shards: int, num_threads: int, seed: int,
                         mix_start: int = 0, checkpoint: str | None = None,
                         prefetch_queue_depth: int = 2, dtype: str = "float32"
                         ) -> tuple[Any, MaskMixOperator, SampleTracker]:
    """Build the training pipeline. Returns (pipeline, mix operator, tracker).

    dtype: the loader's output dtype (sets `pipeline_dtype`); mix_start: batch index the
    MaskMix operator starts from (resume); checkpoint: a DALI checkpoint (readers + RNG) to
    restore."""
    from nvidia.dali import fn, pipeline_def

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if tuple(mix_config.image_size) != opts.hw:
        raise ValueError(f"mix config image_size {tuple(mix_config.image_size)} must equal the "
                         f"training image_size {opts.hw}")
    rand_augment, random_erasing = _augmentations(opts)
    tracker = SampleTracker()
    held: dict[str, MaskMixOperator] = {}

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                  seed=pipeline_seed(seed, shard_id), enable_conditionals=True,
                  enable_checkpointing=True, prefetch_queue_depth=prefetch_queue_depth)
    def train_pipe():
        encoded, labels = read(source, shard_id=shard_id, num_shards=num_shards, shuffle=True,
                               seed=seed, initial_fill=opts.initial_fill)
        checked = guard(encoded, tracker)
        images = decode_random_crop(encoded, backend=backend, scale=opts.scale,
                                    ratio=opts.ratio, hw_decoder_load=opts.hw_decoder_load)
        images = resize_train(images, opts.hw, opts.interpolation, backend=backend,
                              threads=num_threads)
        mirror = fn.random.coin_flip(probability=opts.hflip) if opts.hflip > 0 else None
        if rand_augment is not None:                            # timm: flip, then RandAugment
            fill = tuple(round(255 * m) for m in opts.mean)     # timm: img_mean
            images, mirror = rand_augment(images, mirror, opts.auto_augment, fill=fill)
        images = normalize(images, mean=opts.mean, std=opts.std,
                           dtype=pipeline_dtype(backend, dtype), mirror=mirror)
        if random_erasing is not None:
            images = random_erasing(images, prob=opts.re_prob, mode="pixel")
        out = mix(images, labels, mix_config, layout="CHW", shard_id=shard_id)
        held["op"] = out.operator
        return out.images, out.labels_a, out.labels_b, out.lam, out.token_mask, out.mode, checked

    pipe = train_pipe(checkpoint=checkpoint) if checkpoint else train_pipe()
    op = held["op"]                      # the graph is traced by the call above
    op.set_batch_index(mix_start)
    pipe.build()
    return pipe, op, tracker
