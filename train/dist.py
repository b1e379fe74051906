"""Process-group set-up for torchrun (single- and multi-node) and the few collectives we use.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them this is a single process. Backend:
NCCL when the run uses CUDA, gloo on CPU. Only rank 0 writes files and prints.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as tdist

__all__ = ["DistInfo", "init_distributed", "all_reduce_sum", "all_gather_object", "barrier",
           "cleanup", "agree", "RankError", "env_rank"]


class RankError(ValueError):
    """Another rank's up-front check failed (this rank's passed)."""


def env_rank() -> int:
    """This process's rank from torchrun's environment (0 without torchrun)."""
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    try:
        return int(v) if v is not None else default
    except ValueError:
        raise ValueError(f"environment variable {name}={v!r} must be an int") from None


def init_distributed(device: str = "auto") -> DistInfo:
    """Read torchrun's environment, pick the device, join the process group if world > 1."""
    rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("run.device='cuda' but no CUDA device is visible (torch "
                             f"{torch.__version__}, CUDA build {torch.version.cuda}); use "
                             "--run.device cpu (or auto)")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} "
                             "GPUs are visible; start at most one process per GPU")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                 device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank, world, local_rank, dev)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (returns the tensor; a no-op when not distributed)."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def all_gather_object(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...]; [obj] when not distributed."""
    if tdist.is_available() and tdist.is_initialized():
        out: list[Any] = [None] * tdist.get_world_size()
        tdist.all_gather_object(out, obj)
        return out
    return [obj]


def broadcast_object(obj: Any) -> Any:
    """Rank 0's obj on every rank."""
    if tdist.is_available() and tdist.is_initialized():
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def agree(fn: Callable[[], Any]) -> Any:
    """Run the check `fn` on every rank and fail together: if any rank raised, every rank
    raises (its own error, or RankError naming the rank that failed), so no rank is left
    waiting in a collective and rank 0 can report the error once. Returns fn()'s result."""
    err: BaseException | None = None
    result = None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
        err = e
    msgs = all_gather_object(None if err is None else f"{type(err).__name__}: {err}")
    if err is not None:
        raise err
    for r, m in enumerate(msgs):
        if m is not None:
            raise RankError(f"rank {r}: {m}")
    return result


def barrier() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()


def cleanup() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
