"""Two processes under torchrun (gloo on CPU): each rank reads its DALI shard, training steps stay
in lock-step, validation counts every sample exactly once across ranks, only rank 0 writes, and
the checkpoint holds both ranks' loader states."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml

from train_fixtures import make_tree, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_gloo_run(tmp_path):
    tree = make_tree(tmp_path / "tree", n_train=8, n_val=5)  # 24 train, 15 val (odd)
    out = tmp_path / "run"
    cfg = tiny_config(tree, out, "mixpro", data={"batch_size": 6}, run={"progress": "lines",
                                                                          "log_every": 1})
    cfg_file = tmp_path / "ddp.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
         "-m", "train", "--config", str(cfg_file)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout
    assert "2 x cpu, global batch 12" in log
    assert log.count("(15 images)") == 1  # rank 0 prints; 8 + 7 images counted once each
    assert log.count("epoch 1/1 [") == 2  # 2 steps: 12 images per shard / batch 6
    ck = torch.load(out / "last.pth", weights_only=True)
    assert [r["loader"]["shard_id"] for r in ck["ranks"]] == [0, 1]
    assert ck["state"]["history"][0]["count"] == 15
    rows = (out / "summary.csv").read_text().splitlines()
    assert len(rows) == 2  # header + one epoch, written once


def torchrun(args, env_extra=None, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "MIXPRO_KILL_AT"}
    env.update({"OMP_NUM_THREADS": "1", **(env_extra or {})})
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "train",
         *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_killed_ddp_run_resumes_to_the_same_summary(tmp_path):
    """Rank 0 is SIGKILLed right after the mid-epoch checkpoint; the resumed 2-rank run logs
    the same epoch row as an uninterrupted one (each rank gets its own running sums back), and
    a refused resume prints its error once."""
    tree = make_tree(tmp_path / "tree", n_train=8, n_val=2)  # 24 train: 2 steps per rank
    files = {}
    for name in ("ref", "killed"):
        cfg = tiny_config(tree, tmp_path / name, "mixpro", data={"batch_size": 6},
                          run={"ckpt_steps": 1})
        files[name] = tmp_path / f"{name}.yaml"
        files[name].write_text(yaml.safe_dump(cfg))
    ref = torchrun(["--config", files["ref"]])
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    out = tmp_path / "killed"
    killed = torchrun(["--config", files["killed"]], {"MIXPRO_KILL_AT": "mid_epoch:committed"})
    assert killed.returncode != 0
    ck = torch.load(out / "last.pth", weights_only=True)
    assert (ck["state"]["batch"], ck["state"]["step"]) == (1, 1)
    sums = [r["running"]["loss_sum"] for r in ck["ranks"]]
    assert sums[0] != sums[1]  # the ranks' partial sums differ: rank 0's alone would be wrong
    resumed = torchrun(["--resume", out])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert (out / "summary.csv").read_bytes() == (tmp_path / "ref" / "summary.csv").read_bytes()
    before = (out / "config.yaml").read_bytes()
    refused = torchrun(["--resume", out, "--run.seed", "9"])
    assert refused.returncode != 0
    assert refused.stderr.count("python -m train: error:") == 1, refused.stderr[-3000:]
    assert "written with run.seed=3, this run has 9" in refused.stderr
    assert (out / "config.yaml").read_bytes() == before
