"""Real `python -m train` runs under the standard logging (pipelines/logs.py): rank 0's progress
lines, the epoch line and the final table still arrive on stdout, word for word as the study and
the docs read them; under torchrun with MIXPRO_LOG_ALL_RANKS=1 rank 1's lines arrive too,
prefixed with its rank. (Rank 0 alone by default: tests/train/test_train_ddp.py.)"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from train_fixtures import make_tree, tiny_config
from pipelines.logs import ALL_RANKS_ENV

REPO = Path(__file__).resolve().parents[2]


def config_file(tmp_path: Path) -> Path:
    tree = make_tree(tmp_path / "tree", n_train=4, n_val=2)  # 12 train, 6 val images
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tree, tmp_path / "run", data={"batch_size": 6},
                                              run={"progress": "lines", "log_every": 1})))
    return cfg


def run(args: list[str], **env_extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MIXPRO_KILL_AT", ALL_RANKS_ENV)}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **env_extra})
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def test_a_real_run_still_shows_its_progress_lines(tmp_path):
    proc = run(["-m", "train", "--config", str(config_file(tmp_path))])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert sum(ln.startswith("epoch 1/1 [") and " img/s ETA " in ln for ln in lines) == 2, lines
    assert any(ln.startswith("epoch 1/1: train loss ") and "(6 images)" in ln for ln in lines)
    assert any("M params, 1 x cpu, global batch 6" in ln for ln in lines), lines
    assert "| best top-1" in proc.stdout and "epoch 1/1" not in proc.stderr


@pytest.mark.slow
def test_all_ranks_under_torchrun_prefixes_the_other_ranks_lines(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = run(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                "127.0.0.1", "--master_port", str(port), "-m", "train", "--config",
                str(config_file(tmp_path))], **{ALL_RANKS_ENV: "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    # 6 train images per shard, batch 6: one step, one progress line per rank
    assert sum(ln.startswith("epoch 1/1 [1/1] loss ") for ln in lines) == 1, lines
    assert sum(ln.startswith("[rank 1] epoch 1/1 [1/1] loss ") for ln in lines) == 1, lines
    assert sum(ln.startswith("[rank 1] epoch 1/1: train loss ") for ln in lines) == 1, lines
    assert not any(ln.startswith("[rank 1] | best top-1") for ln in lines)  # rank 0's table
    assert sum(ln.startswith("| best top-1") for ln in lines) == 1
