"""train.checkpoint: atomic writes, weights_only loading, RNG round trip, backbone export."""
from __future__ import annotations

import random

import numpy as np
import pytest
import timm
import torch

from train import checkpoint as ck


def test_save_atomic_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "sub" / "last.pth"
    ck.save_atomic({"a": torch.ones(2)}, p)
    ck.save_atomic({"a": torch.zeros(2)}, p)
    assert torch.equal(torch.load(p, weights_only=True)["a"], torch.zeros(2))
    assert [f.name for f in p.parent.iterdir()] == ["last.pth"]


def test_failed_save_keeps_previous_file(tmp_path, monkeypatch):
    p = tmp_path / "last.pth"
    ck.save_atomic({"step": 1}, p)

    def broken(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt  # a kill while writing

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(KeyboardInterrupt):
        ck.save_atomic({"step": 2}, p)
    monkeypatch.undo()
    assert torch.load(p, weights_only=True) == {"step": 1}
    assert [f.name for f in tmp_path.iterdir()] == ["last.pth"]


def test_rng_round_trip_is_weights_only_safe(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = ck.plain_state(ck.capture_rng())
    ck.save_atomic(state, tmp_path / "rng.pth")
    expect = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ck.restore_rng(torch.load(tmp_path / "rng.pth", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1)) == expect


def test_plain_state_converts_numpy():
    out = ck.plain_state({"a": np.arange(3), "b": (np.float32(1.5), [np.int64(2)])})
    assert torch.equal(out["a"], torch.arange(3)) and out["b"] == (1.5, [2])
    assert type(out["b"][0]) is float


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist \(--resume takes a .pth file "
                                                r"or a run folder holding last.pth\)"):
        ck.load_checkpoint(tmp_path)


def test_export_strips_wrappers_and_head(tmp_path):
    model = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32,
                              depth=1, num_heads=2, num_classes=3)
    sd = {f"module._orig_mod.{k}": v for k, v in model.state_dict().items()}
    ck.save_atomic({"model": sd, "ema": None}, tmp_path / "c.pth")
    ck.export_backbone(tmp_path / "c.pth", tmp_path / "w.pth")
    fresh = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32,
                              depth=1, num_heads=2, num_classes=3)
    fresh.load_state_dict(torch.load(tmp_path / "w.pth", weights_only=True))
    with pytest.raises(ValueError, match=r"--ema: this checkpoint has no EMA weights"):
        ck.export_backbone(tmp_path / "c.pth", tmp_path / "w.pth", ema=True)
    ck.export_backbone(tmp_path / "c.pth", tmp_path / "h.pth", drop_head=True)
    assert not any(k.startswith("head.") for k in torch.load(tmp_path / "h.pth",
                                                               weights_only=True))
