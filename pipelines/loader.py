"""PyTorch-facing loaders over the DALI pipelines: iterables of dict batches on the training
device, one pass = one epoch, with exact mid-epoch resume.

Epochs. Every shard runs `epoch_runs` = ceil(ceil(N/S)/B) pipeline iterations per epoch (DALI
pads shards to equal length). Training yields the first floor(floor(N/S)/B) of them on every
shard (drop last: full batches of real samples only, the same count on all ranks) and runs the
rest unseen; validation yields ceil(shard_size/B) batches with the padding cut off, so the
shards see every sample exactly once.

Resume. `state_dict()` holds the number of pipeline iterations consumed and DALI's checkpoint
(reader positions + RNG states), which reflects consumed iterations, not prefetched ones.
`load_state_dict` rebuilds the pipeline from that checkpoint and sets the MaskMix operator's
batch counter to the consumed count (its own counter runs ahead with DALI's prefetch).
"""
from __future__ import annotations

import os
import sys
from typing import Any, Iterable, Iterator

import torch

from mixpro_dali import MixConfig

from .badfiles import explain_failure
from .compat import shutdown_pipeline, storage_holders
from .decode import DTYPES
from .options import DataOptions
from .readers import READER_NAME, epoch_runs, resolve_source, shard_size
from .train_pipeline import TRAIN_OUTPUTS, build_train_pipeline, no_mix_config
from .val_pipeline import VAL_OUTPUTS, build_val_pipeline

__all__ = ["TrainLoader", "ValLoader", "DataOptions", "resolve_device", "image_dtype"]

STATE_VERSION = 1


def resolve_device(device: str | torch.device = "auto") -> tuple[torch.device, str, int | None]:
    """(torch device, DALI backend "cpu"|"gpu", DALI device_id) for "auto" | "cpu" | "cuda" |
    "cuda:N". auto = cuda when torch sees a GPU; cuda without an index = the current device
    (the local rank's after torch.cuda.set_device)."""
    name = str(device)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu"), "cpu", None
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but torch sees no CUDA device; use 'cpu' or 'auto'")
        dev = torch.device(name)
        index = torch.cuda.current_device() if dev.index is None else dev.index
        return torch.device("cuda", index), "gpu", index
    raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")


AMP_IMAGE_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "none": "float32"}


def image_dtype(amp: str, device: str | torch.device) -> str:
    """The loaders' image dtype for a run's mixed precision `amp` ('bf16' | 'fp16' | 'none') on
    `device`: on a GPU the autocast dtype (half the bytes of float32; autocast casts the first
    layer's input to it anyway), on the CPU float32 (there autocast is off)."""
    if amp not in AMP_IMAGE_DTYPES:
        raise ValueError(f"amp must be one of {tuple(AMP_IMAGE_DTYPES)}, got {amp!r}")
    return AMP_IMAGE_DTYPES[amp] if torch.device(device).type == "cuda" else "float32"


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


class _HostBuffers:
    """Reused host buffers for the batch copies. A float32 batch of 64 x 3 x 224 x 224 is
    38.5 MB, above glibc's 32 MB mmap ceiling: a fresh one per batch is page-faulted in from
    scratch (~25 ms here, 0.4 ms per image). A buffer is handed out as a view and reused only
    once no tensor shares its storage any more; without torch's storage use count (private
    API) every batch gets a fresh tensor."""

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self.pools: dict[tuple, list[torch.Tensor]] = {}
        self._count = storage_holders()

    def _free(self, buf: torch.Tensor) -> bool:
        return self._count(buf) <= 1                    # buf alone

    def copy(self, src: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if src.device.type != "cpu" or self._count is None:
            return src.to(dtype, copy=True)
        pool = self.pools.setdefault((tuple(src.shape), dtype), [])
        buf = next((b for b in pool if self._free(b)), None)
        if buf is None:
            buf = torch.empty(src.shape, dtype=dtype)
            if len(pool) >= self.keep:                  # the consumer holds on to many batches
                return buf.copy_(src)
            pool.append(buf)
        return buf.copy_(src).view(buf.shape)


def _dlpack(tl: Any) -> torch.Tensor:
    """A DALI TensorList (CPU or GPU) as a torch tensor sharing DALI's memory (no copy)."""
    if tl.is_dense_tensor():
        return torch.from_dlpack(tl.as_tensor())
    return torch.stack([torch.from_dlpack(tl[i]) for i in range(len(tl))])


class _DaliLoader:
    """Shared run/convert/explain loop of both loaders."""

    _names: tuple[str, ...] = ()
    _image_dtype: torch.dtype | None = None      # None: as the pipeline gives it

    def _setup(self, source: Any, *, batch_size: int, device: Any, shard_id: int,
               num_shards: int, num_threads: int, exclude: Any = None) -> None:
        _check_int("batch_size", batch_size, 1)
        _check_int("num_shards", num_shards, 1)
        _check_int("num_threads", num_threads, 1)
        if isinstance(shard_id, bool) or not isinstance(shard_id, int) or not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id must be an int in [0, num_shards={num_shards}), got {shard_id!r}")
        self.source = resolve_source(source, exclude=exclude)
        self.batch_size, self.shard_id, self.num_shards = batch_size, shard_id, num_shards
        self.num_threads = num_threads
        self.device, self.backend, self.device_id = resolve_device(device)
        self._buffers = _HostBuffers()
        self._runs = 0                 # pipeline iterations consumed since the start of training
        self._since_build = 0          # ... since this pipeline object was built
        self._generation = 0

    def _watch_crashes(self) -> None:
        """Tell a watcher process the files of every batch, so that a crash of the decoder
        that takes this process down is still pinned to its file (pipelines/crash_watch.py)."""
        from functools import partial

        from .crash_watch import watch

        self._tracker.watch = partial(watch(self.backend, self.device_id).note, self.source.root)

    def _sizes(self, pipe: Any) -> None:
        """Sample counts from the built reader (WebDataset sizes are known only then)."""
        self.num_samples = int(pipe.reader_meta(READER_NAME)["epoch_size"])
        if self.num_samples < self.num_shards:
            raise ValueError(f"{self.num_samples} samples cannot fill num_shards={self.num_shards}")
        self.epoch_runs = epoch_runs(self.num_samples, self.num_shards, self.batch_size)

    def _run(self, keep: bool = True) -> dict[str, torch.Tensor]:
        """One pipeline iteration as torch tensors (keep=False: run it, return nothing; for
        the padding and dropped tail nobody sees). A bad input file raises BadImageError."""
        if self._pipe is None:
            raise RuntimeError("this loader was closed")
        try:
            outs = self._pipe.run(self._stream())
        except RuntimeError as err:
            bad = explain_failure(err, self._tracker.batch_files(self._since_build),
                                  root=self.source.root, backend=self.backend,
                                  device_id=self.device_id)
            self.close()                                  # a failed DALI pipeline is finished
            if bad is not None:
                raise bad from err
            raise
        self._runs += 1
        self._since_build += 1
        if not keep:
            return {}
        batch = {n: _dlpack(o) for n, o in zip(self._names, outs) if not n.startswith("_")}
        image = batch.pop("image")
        out = {"image": self._buffers.copy(image, self._image_dtype or image.dtype)}
        out.update((k, v.clone()) for k, v in batch.items())    # small: labels, masks
        return out

    def _stream(self) -> torch.cuda.Stream | None:
        """On the GPU, torch's current stream: DALI binds the outputs to it (an event the stream
        waits on) instead of waiting on the host for each batch. None on the CPU."""
        return torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None

    def _skip(self) -> None:
        self._run(keep=False)

    @property
    def epoch(self) -> int:
        """Current epoch (0-based): the one the next batch belongs to."""
        return self._runs // self.epoch_runs

    def close(self) -> None:
        """Stop the DALI pipeline now (also done when the loader is garbage collected).

        DALI pipelines are reference cycles: left to the garbage collector, one may be torn
        down inside a python operator of a pipeline still running (its own, even: a deadlock).
        So every pipeline this loader built is shut down here, deterministically."""
        pipe, self._pipe = getattr(self, "_pipe", None), None
        if pipe is not None:
            shutdown_pipeline(pipe)

    def __del__(self) -> None:
        if sys.is_finalizing():   # a loader still alive at exit: imports no longer work, and
            return                # the interpreter's teardown stops DALI's threads anyway
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return self._len


class TrainLoader(_DaliLoader):
    """Training batches: dicts with image (B, 3, H, W) normalized, label_a / label_b (B,)
    int64, lam (B,) float32, token_mask (B, h, w) uint8, mode (B,) int32, on `device`.

    One `for` pass yields the rest of the current epoch (len(loader) batches from an epoch
    start, the same number on every shard). Arguments as docs/interfaces.md; pass the same
    `seed` on every rank (it seeds the one permutation the shards split; augmentations draw
    per shard). exclude: files to leave out (a list, or the file `python -m pipelines.scan ROOT
    --output bad.txt` writes). options: the augmentation and decode settings (`DataOptions`,
    default: its defaults); its fields may also be given as keywords (image_size=32,
    auto_augment=None, ...), which replace those of `options`."""

    _names = TRAIN_OUTPUTS

    def __init__(self, source: Any, batch_size: int = 64, *, options: DataOptions | None = None,
                 mix: MixConfig | None = None, device: str = "auto", shard_id: int = 0,
                 num_shards: int = 1, num_threads: int = 2, seed: int = 0,
                 dtype: str = "float32",
                 exclude: str | os.PathLike | Iterable[str] | None = None,
                 **option_fields: Any) -> None:
        _check_int("seed", seed, 0)
        self._setup(source, batch_size=batch_size, device=device, shard_id=shard_id,
                    num_shards=num_shards, num_threads=num_threads, exclude=exclude)
        self.options = DataOptions.resolve(options, option_fields, "TrainLoader")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        self.dtype = dtype
        hw = self.options.hw
        self.mix_config = mix if mix is not None else no_mix_config(hw)
        if not isinstance(self.mix_config, MixConfig):
            raise TypeError(f"mix must be a MixConfig or None, got {type(mix).__name__}")
        self.seed = seed
        self._image_dtype = getattr(torch, dtype)
        self._build()
        self._sizes(self._pipe)
        self._len = shard_size(self.num_samples, 0, self.num_shards) // batch_size
        if self._len == 0:
            raise ValueError(
                f"each of the {num_shards} shard(s) holds at least "
                f"{shard_size(self.num_samples, 0, num_shards)} of {self.num_samples} samples, "
                f"fewer than batch_size={batch_size}: no full batch to train on")

    @property
    def opts(self) -> DataOptions:
        """Former name of `options`."""
        return self.options

    def _build(self, checkpoint: str | None = None) -> None:
        self._pipe, self.mix_operator, self._tracker = build_train_pipeline(
            self.source, batch_size=self.batch_size, opts=self.options, dtype=self.dtype,
            mix_config=self.mix_config,
            backend=self.backend, device_id=self.device_id, shard_id=self.shard_id,
            num_shards=self.num_shards, num_threads=self.num_threads, seed=self.seed,
            mix_start=self._runs, checkpoint=checkpoint)
        self._watch_crashes()
        self._since_build = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        generation = self._generation
        if self._runs % self.epoch_runs >= self._len:        # only the unseen tail is left
            while self._runs % self.epoch_runs:
                self._skip()
        epoch_start = self.epoch * self.epoch_runs
        while self._runs - epoch_start < self._len:
            batch = self._run()
            for key in ("label_a", "label_b"):
                batch[key] = batch[key].reshape(-1).long()   # (B, 1) int32 -> (B,) int64
            yield batch
            if generation != self._generation:
                raise RuntimeError("load_state_dict() was called during iteration; start a new "
                                   "`for` loop over the loader")
        while self._runs - epoch_start < self.epoch_runs:
            self._skip()

    @property
    def batch_in_epoch(self) -> int:
        """Batches of the current epoch already yielded."""
        return min(self._runs % self.epoch_runs, self._len)

    def _identity(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "shard_id": self.shard_id,
                "num_shards": self.num_shards, "num_samples": self.num_samples, "seed": self.seed}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly here (plain types; store it per rank)."""
        if self._pipe is None:
            raise RuntimeError("this loader was closed: its state is gone")
        return {"version": STATE_VERSION, "runs": self._runs, "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch, "dali": self._pipe.checkpoint(),
                **self._identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`: the next batches equal those the saved run would have given."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a TrainLoader state (version {STATE_VERSION}): {type(state).__name__}")
        for key, value in self._identity().items():
            if state.get(key) != value:
                raise ValueError(f"loader state has {key}={state.get(key)!r} but this loader has "
                                 f"{key}={value!r}; resume with the same data and settings")
        self._runs = int(state["runs"])
        self._generation += 1
        self.close()
        self._build(checkpoint=state["dali"])


class ValLoader(_DaliLoader):
    """Validation batches: dicts with image (B, 3, H, W) normalized and label (B,) int64.
    Across shards every sample appears exactly once (the last batch of a shard may be smaller;
    shards may differ by one batch). `num_shard_samples`: samples this shard yields.
    options / keyword option fields as in TrainLoader (it reads image_size, crop_pct,
    interpolation, mean, std and hw_decoder_load)."""

    _names = VAL_OUTPUTS

    def __init__(self, source: Any, batch_size: int = 64, *, options: DataOptions | None = None,
                 device: str = "auto", shard_id: int = 0, num_shards: int = 1,
                 num_threads: int = 2, dtype: str = "float32",
                 exclude: str | os.PathLike | Iterable[str] | None = None,
                 **option_fields: Any) -> None:
        self._setup(source, batch_size=batch_size, device=device, shard_id=shard_id,
                    num_shards=num_shards, num_threads=num_threads, exclude=exclude)
        self.options = o = DataOptions.resolve(options, option_fields, "ValLoader")
        self.dtype = dtype
        self._image_dtype = getattr(torch, dtype) if dtype in DTYPES else None
        self._pipe, self._tracker = build_val_pipeline(
            self.source, batch_size=batch_size, image_size=o.hw, crop_pct=o.crop_pct,
            interpolation=o.interpolation, mean=o.mean, std=o.std, dtype=dtype,
            backend=self.backend, device_id=self.device_id, shard_id=shard_id,
            num_shards=num_shards, num_threads=num_threads, hw_decoder_load=o.hw_decoder_load)
        self._watch_crashes()
        self._sizes(self._pipe)
        self.num_shard_samples = shard_size(self.num_samples, shard_id, num_shards)
        self._len = -(-self.num_shard_samples // batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while self._runs % self.epoch_runs:                   # an earlier pass was cut short
            self._skip()
        left = self.num_shard_samples
        for _ in range(self._len):
            batch = self._run()
            n = min(left, self.batch_size)
            left -= n
            yield {"image": batch["image"][:n], "label": batch["label"][:n].reshape(-1).long()}
        while self._runs % self.epoch_runs:
            self._skip()
