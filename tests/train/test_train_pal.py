"""PAL monitoring: the per-epoch alpha / lam_attn / lam_area / |lam - lam_area| columns and mode
shares equal an obvious host-side reference over the same samples; the alpha histograms land in
pal_alpha.json; `python -m tools.pal_plot` draws Figure 2 a/b from a run folder."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mixpro_dali.config import MODES
from mixpro_dali.labels import attn_lambda
from train_fixtures import tiny_config
from train_fixtures import engine, tiny_vit
from train.config import TrainConfig
from train.engine import PalMonitor, TrainState
from train.losses import MixLoss
from train.main import run
from tools.pal_plot import main as plot_main
from devices import needs_cuda

REPO = Path(__file__).resolve().parents[2]


def mixed_batches(modes, b=6, seed=0):
    """In-memory loader batches with one mode per batch and random per-sample token masks."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for m in modes:
        y = torch.randint(0, 5, (b,), generator=g)
        mask = (torch.rand(b, 4, 4, generator=g) < torch.rand(b, 1, 1, generator=g)).to(torch.uint8)
        lam = mask.flatten(1).float().mean(1) if m == "maskmix" else torch.rand(b, generator=g)
        out.append({"image": torch.randn(b, 3, 16, 16, generator=g), "label_a": y,
                    "label_b": y.flip(0), "lam": lam, "token_mask": mask,
                    "mode": torch.full((b,), MODES[m], dtype=torch.int32)})
    return out


def test_monitor_matches_a_host_reference():
    modes = ["maskmix", "mixup", "maskmix", "maskmix", "none"]
    data = mixed_batches(modes)
    model = tiny_vit()
    eng = engine(model)
    eng.loss_fn = MixLoss(model, method="mixpro", label_variant="paper", num_classes=5, smoothing=0.1)
    eng.monitor = PalMonitor(torch.device("cpu"), pal=True, bins=10)
    seen = []  # (alpha, lam, lam_area, lam_attn) of every sample, as the loss saw them
    original = eng.loss_fn.__class__.__call__

    def spy(self, logits, batch):
        loss, t = original(self, logits, batch)
        seen.append((t.alpha.clone(), t.lam.clone(), batch["lam"].clone(),
                     attn_lambda(self.attention.maps, batch["token_mask"])))
        return loss, t

    eng.loss_fn.__class__.__call__ = spy
    try:
        m = eng.train_epoch(iter(data), len(data), TrainState())
    finally:
        eng.loss_fn.__class__.__call__ = original
    alpha, lam, area, attn = (torch.cat(x).double().numpy() for x in zip(*seen))
    pal = np.isfinite(alpha)
    assert pal.sum() == 3 * 6  # exactly the MaskMix samples
    a = alpha[pal]
    assert m["pal_alpha_mean"] == pytest.approx(a.mean(), rel=1e-9)
    assert m["pal_alpha_std"] == pytest.approx(a.std(), rel=1e-6)
    assert m["pal_lam_attn"] == pytest.approx(attn[pal].mean(), rel=1e-6)
    assert m["pal_lam_area"] == pytest.approx(area[pal].mean(), rel=1e-9)
    assert m["pal_lam_shift"] == pytest.approx(np.abs(lam - area)[pal].mean(), rel=1e-5)
    assert m["pal_lam_shift"] > 0  # PAL really moved the labels
    assert (m["mode_none"], m["mode_mixup"], m["mode_cutmix"], m["mode_maskmix"]) == (
        0.2, 0.2, 0.0, 0.6)
    hist, _ = np.histogram(a, bins=10, range=(0, 1))
    assert eng.monitor.last_hist == hist.tolist()
    assert not eng.monitor.acc.any()  # reset for the next epoch


def test_monitor_without_pal_logs_mode_shares_only():
    eng = engine(tiny_vit())  # deit: area labels
    eng.monitor = PalMonitor(torch.device("cpu"), pal=False)
    m = eng.train_epoch(iter(mixed_batches(["mixup", "cutmix", "cutmix", "none"])), 4,
                        TrainState())
    assert not any(k.startswith("pal_") for k in m)
    assert (m["mode_none"], m["mode_mixup"], m["mode_cutmix"], m["mode_maskmix"]) == (
        0.25, 0.25, 0.5, 0.0)


def test_monitor_state_round_trip_and_empty_epoch():
    mon = PalMonitor(torch.device("cpu"), pal=True, bins=4)
    mon.acc += torch.arange(mon.acc.numel(), dtype=torch.float64)
    other = PalMonitor(torch.device("cpu"), pal=True, bins=4)
    other.load_state(mon.state())
    assert torch.equal(other.acc, mon.acc)
    with pytest.raises(ValueError, match="expected"):
        PalMonitor(torch.device("cpu"), pal=True, bins=5).load_state(mon.state())
    m = PalMonitor(torch.device("cpu"), pal=True).epoch_end()  # no batch: NaN, not a crash
    assert math.isnan(m["pal_alpha_mean"]) and m["mode_maskmix"] == 0.0


@needs_cuda                      # the sync check
def test_monitor_update_does_not_sync_on_cuda():
    dev = torch.device("cuda")
    model = tiny_vit().to(dev)
    loss_fn = MixLoss(model, method="mixpro", label_variant="paper", num_classes=5, smoothing=0.1)
    mon = PalMonitor(dev, pal=True)
    batch = {k: v.to(dev) for k, v in mixed_batches(["maskmix"])[0].items()}
    loss, t = loss_fn(model(batch["image"]), batch)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        mon.update(batch, t, loss_fn.attention.maps)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert mon.acc[1].item() == 6


def _tree(root: Path, n: int = 4, classes: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(img).save(root / split / f"c{c}" / f"{i}.jpg")
    return root


def test_run_writes_pal_columns_and_plot(tmp_path):
    tree = _tree(tmp_path / "tree")
    out = tmp_path / "run"
    res = run(TrainConfig.from_dict(tiny_config(tree, out, "mixpro", data={"batch_size": 6},
                                                run={"epochs": 2})))
    header, *rows = (out / "summary.csv").read_text().splitlines()
    cols = header.split(",")
    for c in ("train_pal_alpha_mean", "train_pal_alpha_std", "train_pal_lam_attn",
              "train_pal_lam_area", "train_pal_lam_shift", "train_mode_none", "train_mode_mixup",
              "train_mode_cutmix", "train_mode_maskmix"):
        assert c in cols
    assert len(rows) == 2
    data = json.loads((out / "pal_alpha.json").read_text())
    assert [e["epoch"] for e in data["epochs"]] == [0, 1]
    for row, e, h in zip(rows, data["epochs"], res["history"]):
        r = dict(zip(cols, row.split(",")))
        assert float(r["train_pal_alpha_mean"]) == pytest.approx(e["alpha_mean"], nan_ok=True)
        modes = [float(r[f"train_mode_{m}"]) for m in ("none", "mixup", "cutmix", "maskmix")]
        assert sum(modes) == pytest.approx(1.0)
        # every MaskMix sample of the epoch is in the histogram (2 batches of 6 per epoch)
        assert sum(e["counts"]) == round(float(r["train_mode_maskmix"]) * 2) * 6
        assert h["pal_alpha_hist"] == e["counts"]
    png = tmp_path / "fig.png"
    proc = subprocess.run([sys.executable, "-m", "tools.pal_plot", str(out), "--output",
                           str(png)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "2 epochs" in proc.stdout
    with Image.open(png) as im:
        assert im.size[0] > im.size[1] > 100


def test_pal_plot_errors(tmp_path, capsys):
    assert plot_main([str(tmp_path)]) == 2
    assert "pal_alpha.json does not exist" in capsys.readouterr().err
    (tmp_path / "pal_alpha.json").write_text('{"bins": 3, "epochs": [{"epoch": 0, "counts": [1]}]}')
    assert plot_main([str(tmp_path)]) == 2
    assert "not a PAL history file" in capsys.readouterr().err
