"""The trainer under faults, for real: runs SIGKILLed at chosen points of the commit sequence
(MIXPRO_KILL_AT) and resumed end up with the same files as an uninterrupted run; corrupted and
foreign checkpoints, bad model kwargs and devices give one-line errors before anything is built
and without touching the run folder; temp files of killed writes are removed; checkpoints are
sealed with a checksum."""
from __future__ import annotations

import os
import random
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import timm
import torch
import yaml

from train_fixtures import KWARGS, make_tree, tiny_config
from train import checkpoint as ckpt_io
from train.__main__ import main as cli_main
from devices import HAS_CUDA, needs_cuda

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def train(args, kill_at=None, timeout=300):
    env = dict(ENV)
    env.pop("MIXPRO_KILL_AT", None)
    if kill_at:
        env["MIXPRO_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "train", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def done_run(tmp_path_factory):
    """A finished 1-epoch run (mixpro) and its config file."""
    base = tmp_path_factory.mktemp("done")
    tree = make_tree(base / "tree", n_train=4, n_val=2)
    out = base / "run"
    cfg = base / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tree, out, data={"batch_size": 6})))
    proc = train(["--config", cfg])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, cfg


def flip_tensor_bytes(src: Path, dst: Path) -> None:
    """Flip a few bytes inside the largest tensor record of a torch zip checkpoint."""
    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    # local header: 30 bytes + name + extra, then the (stored, uncompressed) record
    name_len = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little")
    extra_len = int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    for k in range(3):
        data[start + info.file_size // 2 + k] ^= 0x40
    dst.write_bytes(bytes(data))


def test_checksum_round_trip_and_sealed_files(done_run):
    out, _ = done_run
    ck = torch.load(out / "last.pth", weights_only=True)  # still a plain torch file
    body = {k: v for k, v in ck.items() if k != "sha256"}
    assert ck["sha256"] == ckpt_io.digest(body) and len(ck["sha256"]) == 64
    assert ckpt_io.load_checkpoint(out, training=True)["state"]["step"] == 2
    # the digest sees one changed bit in a tensor, a value and a container type
    w = dict(body["model"])
    k = next(iter(w))
    w[k] = w[k].clone()
    w[k].view(-1).view(torch.int32)[0] ^= 1
    assert ckpt_io.digest({**body, "model": w}) != ck["sha256"]
    assert ckpt_io.digest({**body, "config": {**body["config"], "run": {}}}) != ck["sha256"]
    assert ckpt_io.digest([1, 2]) != ckpt_io.digest((1, 2))
    assert ckpt_io.digest({"a": torch.zeros(2, dtype=torch.bfloat16)}) != ckpt_io.digest(
        {"a": torch.zeros(2, dtype=torch.float16)})


@pytest.mark.parametrize("kind", ["truncated", "empty", "random", "yaml", "best_timm", "tensor",
                                  "flipped", "edited"])
def test_bad_checkpoint_is_one_line_error_before_anything_is_built(done_run, tmp_path, kind,
                                                                   capsys):
    out, cfg = done_run
    bad = tmp_path / "last.pth"
    good = (out / "last.pth").read_bytes()
    expect = {"truncated": "cannot be read as a PyTorch checkpoint",
              "empty": "is empty (0 bytes)",
              "random": "cannot be read as a PyTorch checkpoint",
              "yaml": "cannot be read as a PyTorch checkpoint",
              "best_timm": "holds bare model weights",
              "tensor": "holds a Tensor, not a training checkpoint",
              "flipped": "is corrupted: its contents do not match its sha256 checksum",
              "edited": "is corrupted: its contents do not match its sha256 checksum"}[kind]
    if kind == "truncated":
        bad.write_bytes(good[:len(good) // 2])
    elif kind == "empty":
        bad.write_bytes(b"")
    elif kind == "random":
        bad.write_bytes(random.Random(0).randbytes(4096))
    elif kind == "yaml":
        bad.write_bytes((out / "config.yaml").read_bytes())
    elif kind == "best_timm":
        bad.write_bytes((out / "best_timm.pth").read_bytes())
    elif kind == "tensor":
        torch.save(torch.ones(3), bad)
    elif kind == "flipped":
        flip_tensor_bytes(out / "last.pth", bad)
        torch.load(bad, weights_only=True)  # torch itself does not notice
    else:  # a value changed and saved again by hand, checksum left as it was
        ck = torch.load(out / "last.pth", weights_only=True)
        ck["state"]["best_top1"] = 100.0
        torch.save(ck, bad)
    # data that does not exist: had the data or model been built first, that error would show
    cfg_d = yaml.safe_load(cfg.read_text())
    cfg_d["data"].update(train=str(tmp_path / "nope"), val=str(tmp_path / "nope"))
    cfg_bad = tmp_path / "cfg.yaml"
    cfg_bad.write_text(yaml.safe_dump(cfg_d))
    before = snapshot(tmp_path)
    for argv in (["--resume", str(bad)], ["--config", str(cfg_bad), "--resume", str(bad),
                                          "--output", str(tmp_path / "out")]):
        assert cli_main(argv) == 2
        err = capsys.readouterr().err.splitlines()
        assert err[0].startswith(f"python -m train: error: checkpoint {str(bad)!r}"), err
        assert expect in err[0] and "Traceback" not in "\n".join(err)
    assert snapshot(tmp_path) == before  # nothing written, not even the output folder


def test_bad_checkpoint_in_a_subprocess_prints_no_traceback(done_run, tmp_path):
    out, _ = done_run
    bad = tmp_path / "last.pth"
    bad.write_bytes((out / "last.pth").read_bytes()[:1000])
    proc = train(["--resume", bad])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith(f"python -m train: error: checkpoint {str(bad)!r}")
    assert len(lines) == 1 and not proc.stdout, proc.stderr


def test_bad_model_kwargs_and_device_fail_up_front(tmp_path, capsys):
    missing = ["--data.train", str(tmp_path / "nope"), "--data.val", str(tmp_path / "nope"),
               "--output", str(tmp_path / "out")]
    assert cli_main([*missing, "--model.kwargs.depthh", "3"]) == 2
    err = capsys.readouterr().err
    assert "model.kwargs" in err and "unexpected keyword argument 'depthh'" in err
    assert "Traceback" not in err and "does not exist" not in err  # before the data
    assert cli_main([*missing, "--model.kwargs.img_size", "32"]) == 2
    assert "data.image_size=28 but vit_tiny_patch16_224 is built for 32x32" in \
        capsys.readouterr().err
    if not HAS_CUDA:
        assert cli_main([*missing, "--run.device", "cuda"]) == 2
        err = capsys.readouterr().err
        assert "run.device='cuda' but no CUDA device is visible" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_refused_resume_changes_nothing(done_run, capsys):
    out, _ = done_run
    before = snapshot(out)
    assert cli_main(["--resume", str(out), "--run.seed", "1"]) == 2
    err = capsys.readouterr().err
    assert "written with run.seed=3, this run has 1" in err
    assert cli_main(["--resume", str(out), "--model.kwargs.depth", "3"]) == 2
    assert "is for model.kwargs=" in capsys.readouterr().err
    assert snapshot(out) == before  # config.yaml still says seed 3


def _compare_runs(ref: Path, got: Path) -> None:
    a, b = snapshot(ref), snapshot(got)
    assert sorted(a) == sorted(b)  # same files: no temp or pending files left
    for name in ("summary.csv", "pal_alpha.json"):
        assert a[name] == b[name], name
    assert a["config.yaml"].replace(str(ref).encode(), b"") == b["config.yaml"].replace(
        str(got).encode(), b"")
    for name in [n for n in a if n.endswith(".pth") and n != "best_timm.pth"]:
        x, y = (torch.load(d / name, weights_only=True) for d in (ref, got))
        for k in x["model"]:
            assert torch.equal(x["model"][k], y["model"][k]), (name, k)
        sx, sy = x["state"], y["state"]
        for k in ("epoch", "batch", "step", "best_top1", "best_epoch", "loss_sum", "loss_count"):
            assert sx[k] == sy[k], (name, k)
        assert [h["row"] for h in sx["history"]] == [h["row"] for h in sy["history"]]
        assert [r["running"] for r in x["ranks"]] == [r["running"] for r in y["ranks"]]
    wa, wb = (torch.load(d / "best_timm.pth", weights_only=True) for d in (ref, got))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_kills_in_the_commit_sequence_resume_to_the_same_files(tmp_path):
    """3 epochs x 2 steps, last.pth every step, epoch_NNNN.pth every epoch. The killed run dies
    at five points in turn, each resume carrying on from what the last kill left."""
    tree = make_tree(tmp_path / "tree", n_train=4, n_val=2)
    sections = dict(data={"batch_size": 6}, run={"epochs": 3, "ckpt_steps": 1,
                                                  "ckpt_every": 1})
    for name in ("ref", "killed"):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(
            tiny_config(tree, tmp_path / name, **sections)))
    ref = train(["--config", tmp_path / "ref.yaml"])
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = tmp_path / "killed"

    # 1. inside the write of epoch 1's best.pth.pending (temp file complete, not renamed)
    p = train(["--config", tmp_path / "killed.yaml"], "write:best.pth.pending")
    assert p.returncode == -9, p.stderr[-3000:]
    assert list(out.glob("best.pth.pending.*.tmp")) and not (out / "summary.csv").exists()
    # 2. epoch 1 committed (last.pth), best.pth and summary.csv not yet written
    p = train(["--resume", out], "epoch_end:committed")
    assert p.returncode == -9, p.stderr[-3000:]
    assert "removed 1 temp file(s)" in p.stdout and not list(out.glob("*.tmp"))
    assert (out / "best.pth.pending").is_file() and not (out / "best.pth").exists()
    assert not (out / "summary.csv").exists()
    # 3. after epoch 2's mid-epoch checkpoint; the start completed epoch 1's outputs
    p = train(["--resume", out], "mid_epoch:committed@1")
    assert p.returncode == -9, p.stderr[-3000:]
    assert (out / "best.pth").is_file() and not (out / "best.pth.pending").exists()
    assert len((out / "summary.csv").read_text().splitlines()) == 2
    # 4. inside the write of epoch 2's last.pth: it resumes mid-epoch 2 with the sums of step 1
    p = train(["--resume", out], "write:last.pth")
    assert p.returncode == -9, p.stderr[-3000:]
    assert list(out.glob("last.pth.*.tmp"))
    # 5. inside the export of best_timm.pth, after the last epoch
    p = train(["--resume", out], "write:best_timm.pth")
    assert p.returncode == -9, p.stderr[-3000:]
    # 6. nothing left to train: export and the final table
    p = train(["--resume", out])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "final top-1 / top-5 | nan" not in p.stdout and "best top-1" in p.stdout
    _compare_runs(tmp_path / "ref", out)


def test_save_moves_state_to_cpu_in_one_wait(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append(a))
    sd = {"a": torch.ones(2), "b": [torch.zeros(1), (1, 2.5)], "c": None}
    out = ckpt_io.to_cpu(sd)
    assert not calls and out["b"][1] == (1, 2.5) and torch.equal(out["a"], sd["a"])


@needs_cuda
def test_to_cpu_syncs_once_on_cuda(monkeypatch):
    model = timm.create_model("vit_tiny_patch16_224", num_classes=3, **KWARGS).cuda()
    calls = []
    real = torch.cuda.synchronize
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: (calls.append(a), real(*a)))
    torch.cuda.set_sync_debug_mode("error")  # any implicit per-tensor sync raises
    try:
        out = ckpt_io.to_cpu(model.state_dict())
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(calls) == 1
    assert all(v.device.type == "cpu" for v in out.values())
    assert all(torch.equal(v, model.state_dict()[k].cpu()) for k, v in out.items())
