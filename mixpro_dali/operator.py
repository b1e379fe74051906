"""The MaskMix DALI operator: `mix(...)` inserts it into a pipeline graph.

Two nodes per pipeline, one implementation for both backends:
- the draw, a CPU `fn.external_source` whose callback is `MaskMixOperator.draw`: one
  `sample_mix` per batch on the host, handed to DALI as dense numpy batches (partner, lam,
  token_mask, mode), so DALI builds those outputs in C++ (no per-sample Python) and moves them
  to the GPU itself (`.gpu()`, asynchronous); labels_b is DALI's `fn.permute_batch` of the
  labels by the partner;
- the mix, `fn.dl_tensor_python_function` (DLPack <-> torch, batch mode; `torch_python_function`
  needs CUDA even for CPU data) calling the operator with the images only. It takes the draw of
  the same batch index, gets partner and token mask to the device without a host sync
  (`stage_params`: one pinned buffer, one `non_blocking` copy) and mixes the whole batch with
  `apply_mix`: the same few torch ops at any batch size.

What DALI 2.4 allows here (its `dltensor_function.h` and `python_function.py`): in batch mode the
function gets, per input, a list of one DLPack capsule per sample and must return, per output, a
list of one capsule per sample; a single batch tensor is not accepted as an output. So one
`from_dlpack` per input sample and one `to_dlpack` per output sample is the floor, and only the
images go through Python (B + B conversions; the earlier operator made 2B + 5B). When DALI's
samples lie back to back in one buffer (as its CPU normalize and the erasing operator produce;
not yet seen on a GPU) the batch is viewed in place through the array interface, else stacked
(one copy). DALI copies the returned
samples into its own buffers (on the CPU before the call returns, so output buffers are reused;
on the GPU asynchronously on its stream, so each call allocates from torch's caching allocator
on that same stream, which orders the reuse). On the GPU the work is enqueued on DALI's stream
(a torch ExternalStream) with `synchronize_stream=False`: no host synchronization.

A config that never mixes skips both nodes: images pass through, the other outputs are DALI
constants. This is the only module of the library's data path that imports DALI (lazily, inside
the functions), so the math stays testable without DALI; the other DALI import in the package is
the install check `mixpro_dali/smoke.py` (`tests/test_layering.py` allows exactly these two).
"""
from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.dlpack import to_dlpack

from .config import MODES, MixConfig
from .masks import MixParams, apply_mix, sample_mix, stage_params

LAYOUTS = ("HWC", "CHW")
_shape = operator.attrgetter("shape")
_KEEP = 64   # draws kept for the mix; DALI's prefetch runs the draw a few batches ahead

_TYPESTR = {torch.uint8: "|u1", torch.int8: "|i1", torch.int16: "<i2", torch.int32: "<i4",
            torch.int64: "<i8", torch.float16: "<f2", torch.float32: "<f4",
            torch.float64: "<f8"}


class _Interface:
    """Exposes a raw buffer through `__array_interface__` / `__cuda_array_interface__`."""

    def __init__(self, name: str, interface: dict) -> None:
        setattr(self, name, interface)


def batch_view(samples: list[torch.Tensor], *, same_shape: bool = False) -> torch.Tensor:
    """(B, ...) tensor over `samples`: a zero-copy view when they are equally shaped (checked
    unless `same_shape`) and lie back to back in one buffer (valid while they are), else a
    stacked copy."""
    first = samples[0]
    nbytes, ptr = first.numel() * first.element_size(), first.data_ptr()
    typestr = _TYPESTR.get(first.dtype)
    if (typestr is None or not first.is_contiguous()
            or (not same_shape and len({s.shape for s in samples}) != 1)
            or list(map(torch.Tensor.data_ptr, samples)) != list(range(ptr, ptr + nbytes * len(samples),
                                                              max(nbytes, 1)))):
        return torch.stack(samples)
    iface = {"shape": (len(samples), *first.shape), "typestr": typestr, "data": (ptr, False),
             "strides": None, "version": 2}
    if first.device.type == "cuda":    # torch reads the pointer's device from the driver
        try:
            view = torch.as_tensor(_Interface("__cuda_array_interface__", iface),
                                   device=first.device)
        except (RuntimeError, TypeError, ValueError):
            return torch.stack(samples)
        return view if view.data_ptr() == ptr else torch.stack(samples)
    iface["version"] = 3
    return torch.from_numpy(np.asarray(_Interface("__array_interface__", iface)))


class MaskMixOperator:
    """Batch `k` of shard `s` is mixed by `sample_mix(config, B, k, s)`, a pure function, so
    resuming at batch k (`set_batch_index(k)`) reproduces the uninterrupted run's batches.
    `draw` (DALI's external source) runs first for each batch, `__call__` (the mixing python
    operator) later for the same batch: both count batches, in the same order."""

    def __init__(self, config: MixConfig, *, layout: str, shard_id: int, device: str,
                 batch_size: int) -> None:
        self.config = config
        self.layout = layout
        self.shard_id = shard_id
        self.device = device
        self.batch_size = batch_size
        self._hooks: list[Callable[[str], contextlib.AbstractContextManager]] = []
        self.set_batch_index(0)

    def add_hook(self, hook: Callable[[str], contextlib.AbstractContextManager]
                 ) -> Callable[[], None]:
        """Run every later `draw` and mix call inside `hook("draw")` / `hook("mix")`, a context
        manager (to time or count them: the benchmarks do). Returns a function that removes
        the hook. Without hooks the calls pay one truth test."""
        self._hooks.append(hook)
        return lambda: self._hooks.remove(hook)

    def _hooked(self, name: str, fn: Callable, *args: Any) -> Any:
        with contextlib.ExitStack() as stack:
            for hook in list(self._hooks):
                stack.enter_context(hook(name))
            return fn(*args)

    @property
    def batch_index(self) -> int:
        """Index of the next batch this operator will mix (DALI prefetch runs it ahead of
        what the consumer has seen: save the consumer's count, not this)."""
        return self._mix_index

    def set_batch_index(self, index: int) -> None:
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"batch index must be a non-negative int, got {index!r}")
        self._draw_index = self._mix_index = index
        self._drawn: dict[int, MixParams] = {}
        self._out: torch.Tensor | None = None

    def draw(self, _batch_info: Any = None) -> tuple[np.ndarray, ...]:
        """The next batch's decisions as dense host batches: partner (B,) int32, lam (B,)
        float32, token_mask (B, h, w) uint8, mode (B,) int32. DALI's batch info is not used:
        the counter is the operator's own (restored with `set_batch_index`)."""
        if self._hooks:
            return self._hooked("draw", self._draw)
        return self._draw()

    def _draw(self) -> tuple[np.ndarray, ...]:
        k = self._draw_index
        self._draw_index += 1
        p = sample_mix(self.config, self.batch_size, k, self.shard_id)
        self._drawn[k] = p
        self._drawn.pop(k - _KEEP, None)    # bounded even when nothing mixes (mix pruned)
        return (p.partner.numpy().astype(np.int32), p.lam.numpy(), p.token_mask.numpy(),
                np.full(self.batch_size, p.mode, dtype=np.int32))

    def _params(self, batch_size: int) -> MixParams:
        """The draw of the batch being mixed; drawn here when DALI pruned the draw node (a
        pipeline that uses none of its outputs): the same pure function, the same result."""
        k = self._mix_index
        self._mix_index += 1
        params = self._drawn.pop(k, None)
        if params is None or len(params.partner) != batch_size:
            params = sample_mix(self.config, batch_size, k, self.shard_id)
        return params

    def _stream(self) -> contextlib.AbstractContextManager:
        if self.device != "gpu":
            return contextlib.nullcontext()
        from nvidia.dali.python_function_plugin import current_dali_stream

        return torch.cuda.stream(torch.cuda.ExternalStream(current_dali_stream()))

    def _check(self, batch: torch.Tensor) -> torch.Tensor:
        spatial = (1, 2) if self.layout == "HWC" else (2, 3)
        want = tuple(self.config.image_size)
        if batch.dim() != 4 or tuple(batch.shape[i] for i in spatial) != want:
            raise ValueError(
                f"mix: every image must be {self.layout} with size {want[0]}x{want[1]} "
                f"(MixConfig.image_size), got shape {tuple(batch.shape[1:])}; resize/crop before "
                "mix or fix layout=/image_size="
            )
        return batch

    def _output(self, batch: torch.Tensor) -> torch.Tensor:
        """Reused on the CPU, where DALI copies the outputs before the call returns (a fresh
        38 MB float32 batch per call is page-faulted in each time); new on the GPU."""
        if self.device == "gpu":
            return torch.empty_like(batch)
        if self._out is None or self._out.shape != batch.shape or self._out.dtype != batch.dtype:
            self._out = torch.empty_like(batch)
        return self._out

    def __call__(self, images: list[Any]) -> list[Any]:
        """DALI's call: one DLPack capsule per image in, one per mixed image out."""
        if self._hooks:
            return self._hooked("mix", self._mix, images)
        return self._mix(images)

    def _mix(self, images: list[Any]) -> list[Any]:
        params = self._params(len(images))
        with self._stream():
            samples = list(map(torch.from_dlpack, images))
            if len(set(map(_shape, samples))) != 1:
                raise ValueError(f"mix: every image must be {self.layout} with size "
                                 f"{self.config.image_size[0]}x{self.config.image_size[1]} "
                                 f"(MixConfig.image_size), got shapes "
                                 f"{sorted({tuple(s.shape) for s in samples})}")
            batch = self._check(batch_view(samples, same_shape=True))
            if params.mode != MODES["none"]:               # none: DALI copies its inputs back
                batch = apply_mix(batch, stage_params(params, batch.device),
                                  patch_size=self.config.patch_size, layout=self.layout,
                                  out=self._output(batch))
            if self.device == "cpu":     # numpy's per-sample views and capsules: ~5x cheaper
                return [a.__dlpack__() for a in batch.numpy()]
            return list(map(to_dlpack, batch.unbind(0)))


class _DrawSource:
    """The draw node's callback. It looks `op.draw` up per call (wrappers of `op` see it) and is
    defined here, not inside `mix`: in a pipeline with `enable_conditionals=True` DALI's
    AutoGraph rewrites every function defined inside a function that the pipeline definition
    calls, and every call made from one, so a closure in `mix` ran the whole draw through
    `converted_call` (about 2 ms instead of 0.1 ms per batch at B=64 in the training loader)."""

    def __init__(self, op: MaskMixOperator) -> None:
        self.op = op

    def __call__(self, batch_info: Any) -> tuple[np.ndarray, ...]:
        return self.op.draw(batch_info)


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


def _never_mixes(config: MixConfig) -> bool:
    return not any(v > 0 for v in config.probs.values())


def _unmixed(images: Any, labels: Any, config: MixConfig, op: MaskMixOperator) -> MixOutputs:
    """No operator at all: images and labels pass through, lam 1, token_mask ones, mode 0."""
    from nvidia.dali import fn, types

    h, w = config.token_grid
    dev = images.device
    lam = fn.constant(fdata=[1.0], shape=[], dtype=types.FLOAT, device=dev)
    token_mask = fn.constant(idata=[1] * (h * w), shape=[h, w], dtype=types.UINT8, layout="HW",
                             device=dev)
    mode = fn.constant(idata=[MODES["none"]], shape=[], dtype=types.INT32, device=dev)
    return MixOutputs(images, labels, labels, lam, token_mask, mode, operator=op)


def mix(images: Any, labels: Any, config: MixConfig, *, layout: str = "HWC", shard_id: int = 0,
        name: str | None = None) -> MixOutputs:
    """Insert the MaskMix operator into the current DALI pipeline.

    images: DataNode of dense, equally sized images, HWC (uint8 typically) or CHW
        (float/half, e.g. after normalization: mixing whole tokens commutes with it).
    labels: DataNode of integer labels (moved to the GPU when the images are there).
    shard_id: the data-parallel rank; shards draw independent random streams.
    Returns MixOutputs: images, labels_a, labels_b, lam (float32), token_mask (uint8, (h, w)),
    mode (int32: 0 none, 1 mixup, 2 cutmix, 3 maskmix), operator. A config whose probs are all
    zero adds no operator (images and labels pass through).
    """
    from nvidia.dali import fn, types
    from nvidia.dali.data_node import DataNode
    from nvidia.dali.pipeline import Pipeline

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
    op = MaskMixOperator(config, layout=layout, shard_id=shard_id, device=device,
                         batch_size=Pipeline.current().max_batch_size)
    if _never_mixes(config):
        return _unmixed(images, labels, config, op)

    partner, lam, token_mask, mode = fn.external_source(
        source=_DrawSource(op), num_outputs=4, batch=True, batch_info=True,
        dtype=[types.INT32, types.FLOAT, types.UINT8, types.INT32], ndim=[0, 0, 2, 0],
        layout=["", "", "HW", ""], name=f"{name}_draw" if name else None)
    kwargs = {"name": name} if name else {}
    mixed = fn.dl_tensor_python_function(
        images, function=op, num_outputs=1, batch_processing=True, device=device,
        synchronize_stream=device == "cpu", output_layouts=[layout], **kwargs)
    labels_b = fn.permute_batch(labels, indices=partner)
    if device == "gpu":
        lam, token_mask, mode = lam.gpu(), token_mask.gpu(), mode.gpu()
    return MixOutputs(mixed, labels, labels_b, lam, token_mask, mode, operator=op)
