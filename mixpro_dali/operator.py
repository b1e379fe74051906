"""The MaskMix DALI operator: `mix(...)` inserts it into a pipeline graph.

It wraps the plain-torch kernel of `masks.py` in `fn.dl_tensor_python_function` (DLPack <->
torch, batch mode), which works on both backends; `torch_python_function` needs CUDA even for
CPU data. On the GPU the kernel is enqueued on DALI's own CUDA stream (wrapped as a torch
ExternalStream) with `synchronize_stream=False`, so no host synchronization is needed and
torch's caching allocator orders reuse of the returned buffers on that same stream.

This is the only module of the library's data path that imports DALI (lazily, inside the
functions), so the math stays testable without DALI; the other DALI import in the package is
the install check `mixpro_dali/smoke.py` (`tests/test_layering.py` allows exactly these two).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.dlpack import to_dlpack

from .config import MixConfig
from .masks import mix_samples, sample_mix

LAYOUTS = ("HWC", "CHW")


class MaskMixOperator:
    """The callable DALI runs once per batch. Holds the batch counter: batch `k` of shard `s`
    is mixed by `sample_mix(config, B, k, s)`, a pure function, so resuming at batch k (via
    `set_batch_index(k)`) reproduces the uninterrupted run's batches."""

    def __init__(self, config: MixConfig, *, layout: str, shard_id: int, device: str) -> None:
        self.config = config
        self.layout = layout
        self.shard_id = shard_id
        self.device = device
        self._batch_index = 0
        self._reuse: list[torch.Tensor] = []

    @property
    def batch_index(self) -> int:
        """Index of the next batch this operator will mix (DALI prefetch runs it ahead of
        what the consumer has seen: save the consumer's count, not this)."""
        return self._batch_index

    def set_batch_index(self, index: int) -> None:
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"batch index must be a non-negative int, got {index!r}")
        self._batch_index = index

    def _buffers(self, samples: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """Output buffers reused from the previous batch on the CPU, where DALI copies an
        operator's outputs into its own memory before the call returns (a fresh 38 MB float32
        batch per call is page-faulted in each time: ~0.1 ms per image here). None on the GPU,
        where that copy is asynchronous on DALI's stream."""
        if self.device == "gpu":
            return None
        same = len(self._reuse) == len(samples) and all(
            b.shape == s.shape and b.dtype == s.dtype for b, s in zip(self._reuse, samples))
        if not same:
            self._reuse = [torch.empty_like(s) for s in samples]
        return self._reuse

    def _stream(self) -> contextlib.AbstractContextManager:
        if self.device != "gpu":
            return contextlib.nullcontext()
        from nvidia.dali.python_function_plugin import current_dali_stream

        return torch.cuda.stream(torch.cuda.ExternalStream(current_dali_stream()))

    def _check(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        spatial = (0, 1) if self.layout == "HWC" else (1, 2)
        want = tuple(self.config.image_size)
        for t in tensors:
            if t.dim() != 3 or tuple(t.shape[i] for i in spatial) != want:
                raise ValueError(
                    f"mix: every image must be {self.layout} with size {want[0]}x{want[1]} "
                    f"(MixConfig.image_size), got shape {tuple(t.shape)}; resize/crop before mix "
                    "or fix layout=/image_size="
                )
        return tensors

    def __call__(self, images: list[Any], labels: list[Any]) -> tuple[list[Any], ...]:
        with self._stream():
            samples = self._check([torch.from_dlpack(t) for t in images])
            y = torch.stack([torch.from_dlpack(t) for t in labels])    # (B, ...) as read
            params = sample_mix(self.config, len(samples), self._batch_index, self.shard_id)
            self._batch_index += 1
            # none mode hands DALI its inputs back; otherwise one tensor per sample
            mixed = mix_samples(samples, params, patch_size=self.config.patch_size,
                                layout=self.layout, out=self._buffers(samples))
            dev = y.device
            outs = (
                y,
                y.index_select(0, params.partner.to(dev)),
                params.lam.to(dev),                                    # (B,)
                params.token_mask.to(dev),                             # (B, h, w)
                torch.full((len(samples),), params.mode, dtype=torch.int32, device=dev),
            )
            return ([to_dlpack(s) for s in mixed],
                    *([to_dlpack(s) for s in t.unbind(0)] for t in outs))


@dataclass(frozen=True)
class MixOutputs:
    """DataNodes produced by `mix`, one entry per sample, plus the operator (batch counter)."""

    images: Any
    labels_a: Any
    labels_b: Any
    lam: Any
    token_mask: Any
    mode: Any
    operator: MaskMixOperator


def mix(images: Any, labels: Any, config: MixConfig, *, layout: str = "HWC", shard_id: int = 0,
        name: str | None = None) -> MixOutputs:
    """Insert the MaskMix operator into the current DALI pipeline.

    images: DataNode of dense, equally sized images, HWC (uint8 typically) or CHW
        (float/half, e.g. after normalization: mixing whole tokens commutes with it).
    labels: DataNode of integer labels (moved to the GPU when the images are there).
    shard_id: the data-parallel rank; shards draw independent random streams.
    Returns MixOutputs: images, labels_a, labels_b, lam (float32), token_mask (uint8, (h, w)),
    mode (int32: 0 none, 1 mixup, 2 cutmix, 3 maskmix), operator.
    """
    from nvidia.dali import fn
    from nvidia.dali.data_node import DataNode

    if not isinstance(config, MixConfig):
        raise TypeError(f"config must be a MixConfig, got {type(config).__name__}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if isinstance(shard_id, bool) or not isinstance(shard_id, int) or shard_id < 0:
        raise ValueError(f"shard_id must be a non-negative int, got {shard_id!r}")
    for arg, node in (("images", images), ("labels", labels)):
        if not isinstance(node, DataNode):
            raise TypeError(f"{arg} must be a DALI DataNode (call mix inside a pipeline "
                            f"definition), got {type(node).__name__}")
    device = images.device
    if device == "gpu" and labels.device == "cpu":
        labels = labels.gpu()
    op = MaskMixOperator(config, layout=layout, shard_id=shard_id, device=device)
    kwargs = {"name": name} if name else {}
    outs = fn.dl_tensor_python_function(
        images, labels, function=op, num_outputs=6, batch_processing=True, device=device,
        synchronize_stream=device == "cpu", output_layouts=[layout, "", "", "", "HW", ""],
        **kwargs,
    )
    return MixOutputs(*outs, operator=op)
