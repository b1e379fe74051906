"""python -m train end to end on a tiny real JPEG tree (DALI on CPU): every method trains and
evaluates, checkpoints load with weights_only=True and export to plain timm weights, a killed run
resumes to the very same losses, NaN stops the run with the last checkpoint intact, missing data
gives a clear error."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import timm
import yaml
import torch
from PIL import Image

from train.__main__ import main as cli_main
from train.checkpoint import seal
from train.config import TrainConfig
from train.engine import Engine, NonFiniteLossError
from train.main import run
from train_fixtures import KWARGS, make_tree, tiny_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("tree"))


def record_losses(monkeypatch) -> list[float]:
    """Every micro-batch loss the engine computes, in order."""
    losses: list[float] = []
    original = Engine.forward_backward

    def spy(self, batch, divisor, last):
        loss = original(self, batch, divisor, last)
        losses.append(float(loss))
        return loss

    monkeypatch.setattr(Engine, "forward_backward", spy)
    return losses


@pytest.mark.parametrize("method, preset, extra", [
    ("none", "paper", {}),
    ("deit", "paper", {}),
    ("transmix", "paper", {}),
    ("maskmix", "paper", {}),
    ("mixpro", "paper", {"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25}),
    ("mixpro", "official", {}),
])
def test_two_steps_each_method(tree, tmp_path, method, preset, extra):
    d = tiny_config(tree, tmp_path / "run", method, mix={"label_variant": preset},
                    data={"batch_size": 12, **extra})  # 24 images: 2 steps
    res = run(TrainConfig.from_dict(d))
    assert res["history"][0]["count"] == 15  # every validation image once
    assert np.isfinite(res["train_loss"]) and 0 <= res["top1"] <= 100
    out = tmp_path / "run"
    assert {"config.yaml", "summary.csv", "last.pth", "best.pth", "best_timm.pth"} <= {
        p.name for p in out.iterdir()}
    ck = torch.load(out / "last.pth", weights_only=True)
    assert ck["state"]["step"] == 2 and ck["config"]["mix"]["method"] == method
    model = timm.create_model("vit_tiny_patch16_224", num_classes=3, **KWARGS)
    model.load_state_dict(torch.load(out / "best_timm.pth", weights_only=True))
    header = (out / "summary.csv").read_text().splitlines()[0].split(",")
    pal = ["train_pal_alpha_mean", "train_pal_alpha_std", "train_pal_lam_attn",
           "train_pal_lam_area", "train_pal_lam_shift"] if method == "mixpro" else []
    modes = ["train_mode_none", "train_mode_mixup", "train_mode_cutmix", "train_mode_maskmix"]
    assert header == ["epoch", "train_loss", *pal, *modes, "eval_loss", "eval_top1",
                      "eval_top5", "lr"]


@pytest.mark.slow
def test_resume_after_kill_reproduces_losses(tree, tmp_path, monkeypatch):
    """Kill -9 mid-epoch (after the step-3 checkpoint); the resumed run's next losses equal the
    uninterrupted run's, bit for bit (model, optimizer, schedule, RNG, DALI + MaskMix state)."""
    big = make_tree(tmp_path / "big", n_train=16, n_val=2)  # 48 images: 6 steps/epoch
    sections = dict(run={"epochs": 2, "ckpt_steps": 1}, data={"batch_size": 8},
                    optim={"accum_steps": 1})
    ref_losses = record_losses(monkeypatch)
    run(TrainConfig.from_dict(tiny_config(big, tmp_path / "ref", **sections)))
    assert len(ref_losses) == 12
    reference = list(ref_losses)
    killed = tmp_path / "killed"
    cfg = tiny_config(big, killed, **sections)
    cfg_file = tmp_path / "killed.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    script = textwrap.dedent(f"""
        import os, signal, torch, yaml
        torch.set_num_threads({torch.get_num_threads()})  # same float reductions as this process
        from train.config import TrainConfig
        from train.engine import Engine
        from train.main import run
        step, n = Engine.optimizer_step, [0]
        def dying(self):
            n[0] += 1
            if n[0] == 4:  # step 3's checkpoint is on disk: die inside step 4, mid-epoch
                os.kill(os.getpid(), signal.SIGKILL)
            return step(self)
        Engine.optimizer_step = dying
        run(TrainConfig.from_dict(yaml.safe_load(open({str(cfg_file)!r}))))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    ck = torch.load(killed / "last.pth", weights_only=True)
    assert (ck["state"]["epoch"], ck["state"]["batch"], ck["state"]["step"]) == (0, 3, 3)
    ref_losses.clear()
    run(TrainConfig.from_dict(cfg), resume=str(killed / "last.pth"))
    assert len(ref_losses) == 9
    assert ref_losses == reference[3:]  # exact, not approximate


def test_nan_stops_and_keeps_last_good_checkpoint(tree, tmp_path, monkeypatch):
    from train import losses as losses_mod
    original = losses_mod.MixLoss.__call__
    calls = {"n": 0}

    def poisoned(self, logits, batch):
        loss, t = original(self, logits, batch)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 2 else loss), t

    monkeypatch.setattr(losses_mod.MixLoss, "__call__", poisoned)
    out = tmp_path / "run"
    d = tiny_config(tree, out, run={"ckpt_steps": 1, "epochs": 2})
    with pytest.raises(NonFiniteLossError, match=r"training loss is nan at epoch 0, optimizer "
                                                  r"step 2.*last.pth.*intact"):
        run(TrainConfig.from_dict(d))
    ck = torch.load(out / "last.pth", weights_only=True)
    assert ck["state"]["step"] == 1
    assert all(torch.isfinite(v).all() for v in ck["model"].values())


def test_missing_data_is_a_clear_error(tmp_path, capsys):
    rc = cli_main(["--data.train", str(tmp_path / "nope"), "--data.val", str(tmp_path / "nope"),
                   "--output", str(tmp_path / "out")])
    assert rc == 2
    assert f"data.train={str(tmp_path / 'nope')!r} does not exist" in capsys.readouterr().err


def test_too_few_classes_in_model(tree, tmp_path):
    d = tiny_config(tree, tmp_path / "run", model={"num_classes": 2})
    with pytest.raises(ValueError, match=r"3 classes.*model.num_classes=2"):
        run(TrainConfig.from_dict(d))


def test_export_cli(tree, tmp_path):
    run(TrainConfig.from_dict(tiny_config(tree, tmp_path / "run", "none",
                                          run={"ema": True, "ema_decay": 0.9})))
    from train.export import main as export_main
    assert export_main([str(tmp_path / "run"), str(tmp_path / "w.pth"), "--ema",
                        "--drop-head"]) == 0
    sd = torch.load(tmp_path / "w.pth", weights_only=True)
    assert "head.weight" not in sd and "pos_embed" in sd
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, **KWARGS)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not missing and not unexpected


def test_output_folder_of_another_run_is_not_overwritten(tree, tmp_path):
    d = tiny_config(tree, tmp_path / "run", "none", data={"batch_size": 12})
    run(TrainConfig.from_dict(d))
    with pytest.raises(ValueError, match=r"already holds a run \(last.pth\): continue it with "
                                         r"--resume"):
        run(TrainConfig.from_dict(d))


def test_resume_checks_world_size(tree, tmp_path):
    d = tiny_config(tree, tmp_path / "run", "none", data={"batch_size": 12})
    run(TrainConfig.from_dict(d))
    ck = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
    ck["ranks"] = ck["ranks"] * 2
    torch.save(seal(ck), tmp_path / "two.pth")  # a consistent 2-process checkpoint
    with pytest.raises(ValueError, match=r"written by 2 processes, this run has 1: resume with "
                                         r"the same number of processes"):
        run(TrainConfig.from_dict(d), resume=str(tmp_path / "two.pth"))


def test_scan_list_excludes_bad_files(tree, tmp_path):
    """A truncated JPEG kills the run with its name; the scan's list lets training go on."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tree, data)
    bad = data / "train" / "c1" / "0.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    d = tiny_config(data, tmp_path / "run1", "mixpro", data={"batch_size": 12})
    with pytest.raises(Exception, match=r"c1/0\.jpg"):
        run(TrainConfig.from_dict(d))
    listing = tmp_path / "bad.txt"
    proc = subprocess.run([sys.executable, "-m", "pipelines.scan", str(data), "--output", str(listing)],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 1 and "0.jpg" in listing.read_text()
    d = tiny_config(data, tmp_path / "run2", "mixpro", data={"batch_size": 12, "exclude": str(listing)})
    res = run(TrainConfig.from_dict(d))
    assert np.isfinite(res["train_loss"]) and res["history"][0]["count"] == 15
