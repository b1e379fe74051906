"""Checkpoints: sealed with a checksum, written atomically, loadable with
torch.load(weights_only=True), resumable exactly.

A checkpoint is a plain dict of tensors and builtins:
  version                                        FORMAT_VERSION
  model, optimizer, scheduler, scaler, ema       state dicts (model unwrapped from DDP/compile)
  state                                          TrainState: epoch, batch, step, loss_sum,
                                                 loss_count, best_top1, best_epoch, history
  ranks                                          per rank: RNG states, loader state (DALI +
                                                 MaskMix) and running sums (loss, PAL monitor)
  config                                         the resolved TrainConfig
  sha256                                         digest of everything else (`digest`)
Files: last.pth (every epoch end, and every run.ckpt_steps steps), best.pth (committed from
best.pth.pending after last.pth), epoch_NNNN.pth (every run.ckpt_every epochs).

`load_checkpoint` checks the file before anything is built: an unreadable, foreign or
corrupted file raises CheckpointError, one line naming the path and what is wrong.
`MIXPRO_KILL_AT=point[@n]` (a test hook) SIGKILLs the process at the n-th (default first) pass
of a named `fault_point`; `write:<file name>` points sit inside `save_atomic`, after the temp
file is complete and before the rename.
"""
from __future__ import annotations

import hashlib
import io
import os
import random
import signal
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from pipelines.compat import compiled_original

__all__ = ["save_atomic", "write_bytes_atomic", "load_checkpoint", "unwrap", "capture_rng",
           "restore_rng", "plain_state", "export_backbone", "digest", "seal", "serialize",
           "to_cpu", "fault_point", "CheckpointError", "FORMAT_VERSION", "TRAIN_KEYS"]

FORMAT_VERSION = 2
TRAIN_KEYS = ("version", "model", "optimizer", "scheduler", "state", "ranks", "config")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line naming the file."""


_fault_counts: Counter = Counter()


def fault_point(name: str) -> None:
    """Test hook: SIGKILL this process when MIXPRO_KILL_AT names this point (see module doc)."""
    spec = os.environ.get("MIXPRO_KILL_AT")
    if not spec:
        return
    point, _, nth = spec.partition("@")
    if point != name:
        return
    _fault_counts[name] += 1
    if _fault_counts[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare timm model under DDP / torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif compiled_original(model) is not model:
            model = compiled_original(model)
        else:
            return model


def write_bytes_atomic(data: bytes, path: str | Path) -> Path:
    """Write to a temp file in the same folder (<name>.<random>.tmp), fsync, rename over `path`:
    a reader (or a kill) never sees a half-written file; the previous file stays until the
    rename. A killed write leaves the temp file: `clean_temp_files` removes it on the next
    start."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        fault_point(f"write:{path.name}")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_atomic(obj: Any, path: str | Path) -> Path:
    """torch.save `obj` atomically (see write_bytes_atomic)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return write_bytes_atomic(buf.getbuffer(), path)


def clean_temp_files(folder: str | Path, names: Iterable[str]) -> list[Path]:
    """Remove the temp files that killed writes of `names` left in `folder`."""
    folder = Path(folder)
    gone = []
    for name in names:
        for p in folder.glob(f"{name}.*.tmp"):
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone


def to_cpu(obj: Any) -> Any:
    """A copy of a nested state with every tensor on the CPU: device tensors are copied
    asynchronously (into pinned memory) and waited for once, not once per tensor."""
    moved = [False]

    def walk(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            if x.device.type == "cpu":
                return x.detach()
            moved[0] = True
            return x.detach().to("cpu", non_blocking=True)
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)) and not hasattr(x, "_fields"):
            return type(x)(walk(v) for v in x)
        return x

    out = walk(obj)
    if moved[0] and torch.cuda.is_available():
        torch.cuda.synchronize()
    return out


def digest(obj: Any) -> str:
    """sha256 of a nested state: structure, keys, builtins and every tensor's dtype, shape and
    bytes. Equal after torch.save / torch.load(weights_only=True); any flipped byte in a tensor
    or value changes it."""
    h = hashlib.sha256()

    def feed(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            h.update(f"D{len(x)};".encode())
            for k, v in x.items():
                feed(k)
                feed(v)
        elif isinstance(x, (list, tuple)):
            h.update(f"{'L' if isinstance(x, list) else 'U'}{len(x)};".encode())
            for v in x:
                feed(v)
        elif isinstance(x, (bytes, bytearray)):
            h.update(f"B{len(x)};".encode())
            h.update(x)
        elif isinstance(x, str):
            b = x.encode("utf-8", "surrogatepass")
            h.update(f"S{len(b)};".encode())
            h.update(b)
        elif isinstance(x, float):
            h.update(f"F{x.hex()};".encode())
        elif x is None or isinstance(x, (bool, int)):
            h.update(f"{type(x).__name__}{x!r};".encode())
        else:
            h.update(f"O{type(x).__name__}{x!r};".encode())

    feed(obj)
    return h.hexdigest()


def seal(state: dict[str, Any]) -> dict[str, Any]:
    """`state` (CPU tensors) with its checksum under 'sha256'."""
    body = {k: v for k, v in state.items() if k != "sha256"}
    return {**body, "sha256": digest(body)}


def serialize(state: dict[str, Any]) -> bytes:
    """The sealed checkpoint's bytes (torch.save format): write them to several files at once."""
    buf = io.BytesIO()
    torch.save(seal(to_cpu(state)), buf)
    return buf.getvalue()


def _short(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if len(msg) <= 160 else msg[:157] + "..."


def _check_training(obj: Any, where: str) -> None:
    if not isinstance(obj, dict):
        raise CheckpointError(f"{where} holds a {type(obj).__name__}, not a training "
                              "checkpoint of python -m train (resume from a run's last.pth)")
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{where} holds bare model weights (a state dict like "
                              "best_timm.pth), not a training checkpoint: resume from the "
                              "run's last.pth")
    missing = [k for k in TRAIN_KEYS if k not in obj]
    if missing:
        raise CheckpointError(f"{where} is not a training checkpoint of python -m train "
                              f"(no {', '.join(repr(k) for k in missing)})")
    if obj["version"] != FORMAT_VERSION:
        raise CheckpointError(f"{where} has checkpoint format {obj['version']!r}; this trainer "
                              f"resumes format {FORMAT_VERSION} only")
    if "sha256" not in obj:
        raise CheckpointError(f"{where} carries no checksum, so its contents cannot be trusted")
    if not (isinstance(obj["state"], dict) and isinstance(obj["ranks"], list) and obj["ranks"]
            and all(isinstance(r, dict) and {"rng", "loader", "running"} <= r.keys()
                    for r in obj["ranks"]) and isinstance(obj["config"], dict)):
        raise CheckpointError(f"{where} has a malformed 'state', 'ranks' or 'config' entry")


def load_checkpoint(path: str | Path, map_location: Any = "cpu", *,
                    training: bool = False) -> dict[str, Any]:
    """Load with weights_only=True (no arbitrary code); a run folder means its last.pth.

    Always: a readable dict whose checksum (when it has one) matches. training=True (resume):
    also a complete training checkpoint of this format, checksum required. Problems raise
    CheckpointError (FileNotFoundError for a missing file), one line naming the path."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pth"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist (--resume takes a "
                                ".pth file or a run folder holding last.pth)")
    where = f"checkpoint {str(path)!r}"
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{where} is empty (0 bytes): an interrupted copy or write")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure of a foreign/truncated file
        raise CheckpointError(f"{where} ({size} bytes) cannot be read as a PyTorch checkpoint: "
                              f"truncated, corrupted or not a .pth file ({_short(e)})") from None
    if training:
        _check_training(obj, where)
    elif not isinstance(obj, dict):
        raise CheckpointError(f"{where} holds a {type(obj).__name__}, not a checkpoint dict")
    if "sha256" in obj:
        body = {k: v for k, v in obj.items() if k != "sha256"}
        if digest(body) != obj["sha256"]:
            raise CheckpointError(f"{where} is corrupted: its contents do not match its sha256 "
                                  "checksum (damaged on disk or edited)")
    return obj


def plain_state(obj: Any) -> Any:
    """Recursively turn numpy arrays/scalars into tensors/builtins, tuples stay tuples, so the
    result passes torch.load(weights_only=True)."""
    if isinstance(obj, dict):
        return {k: plain_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain_state(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def capture_rng() -> dict[str, Any]:
    """Python, numpy and torch (CPU + CUDA) RNG states of this process."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def backbone_state(ckpt: dict[str, Any], *, ema: bool = False,
                   drop_head: bool = False) -> dict[str, torch.Tensor]:
    """The model (or EMA) weights with timm's own key names, optionally without the classifier."""
    if ema:
        if not ckpt.get("ema"):
            raise ValueError("--ema: this checkpoint has no EMA weights (run.ema was off)")
        sd = ckpt["ema"]
    else:
        sd = ckpt["model"]
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    if drop_head:
        out = {k: v for k, v in out.items() if not k.startswith(("head.", "head_dist.", "fc."))}
    return out


def export_backbone(ckpt_path: str | Path, out_path: str | Path, *, ema: bool = False,
                    drop_head: bool = False) -> Path:
    """Write plain timm weights: `timm.create_model(name, **kwargs).load_state_dict(torch.load(
    out))` works, and detection/segmentation code that loads timm checkpoints takes it."""
    sd = backbone_state(load_checkpoint(ckpt_path), ema=ema, drop_head=drop_head)
    return save_atomic(sd, out_path)
