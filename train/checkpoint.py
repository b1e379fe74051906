"""Checkpoints: written atomically, loadable with torch.load(weights_only=True), resumable exactly.

A checkpoint is a plain dict of tensors and builtins:
  model, optimizer, scheduler, scaler, ema       state dicts (model unwrapped from DDP/compile)
  epoch, batch, step                             epoch index, batches consumed in it, optimizer steps
  epoch_done                                     True when `epoch` finished (resume starts epoch+1)
  running                                        partial epoch sums (so a resumed epoch logs right)
  ranks                                          per rank: RNG states + loader state (DALI + MaskMix)
  best, metrics, config                          best top-1 so far, this epoch's metrics, the config
Files: last.pth (every epoch end, and every run.ckpt_steps steps), best.pth, epoch_NNNN.pth.
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["save_atomic", "load_checkpoint", "unwrap", "capture_rng", "restore_rng",
           "plain_state", "export_backbone", "FORMAT_VERSION"]

FORMAT_VERSION = 1


def unwrap(model: nn.Module) -> nn.Module:
    """The bare timm model under DDP / torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_atomic(obj: Any, path: str | Path) -> Path:
    """torch.save to a temp file in the same folder, fsync, then rename over `path`: a reader
    (or a kill) never sees a half-written checkpoint; the previous file stays until the rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load with weights_only=True (no arbitrary code); a run folder means its last.pth."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pth"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist (--resume takes a "
                                ".pth file or a run folder holding last.pth)")
    return torch.load(path, map_location=map_location, weights_only=True)


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
