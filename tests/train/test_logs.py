"""Rank-aware logging (train/logs.py): rank 0 shows INFO on stdout, the other ranks only warnings
and errors (prefixed with their rank) unless asked; setting up twice adds no second copy of a
line; other libraries stay at WARNING; a real `python -m train` still shows its progress lines."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from train_fixtures import make_tree, tiny_config
from train.logs import ALL_RANKS_ENV, PACKAGES, all_ranks_from_env, setup_logging

REPO = Path(__file__).resolve().parents[2]
log = logging.getLogger("train.some_module")   # as a module of the trainer would have it


@pytest.fixture(autouse=True)
def restore_logging(monkeypatch):
    """Each test starts without MIXPRO_LOG_ALL_RANKS and leaves logging as it found it."""
    monkeypatch.delenv(ALL_RANKS_ENV, raising=False)
    root = logging.getLogger()
    handlers, levels = list(root.handlers), {n: logging.getLogger(n).level for n in PACKAGES}
    yield
    root.handlers[:] = handlers
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_rank0_shows_info_on_stdout_and_warnings_on_stderr(capsys):
    setup_logging(0)
    log.info("epoch 1/2 [3/4] loss 0.5000")
    log.warning("resume: the schedule changed")
    logging.getLogger("pipelines.fashion_mnist").info("converting Fashion-MNIST")
    out, err = capsys.readouterr()
    assert out == "epoch 1/2 [3/4] loss 0.5000\nconverting Fashion-MNIST\n"
    assert err == "resume: the schedule changed\n"


def test_other_ranks_drop_info_unless_all_ranks(capsys):
    setup_logging(1)
    log.info("epoch 1/2 [3/4] loss 0.5000")
    assert capsys.readouterr() == ("", "")
    setup_logging(1, all_ranks=True)
    log.info("epoch 1/2 [3/4] loss 0.5000")
    assert capsys.readouterr() == ("[rank 1] epoch 1/2 [3/4] loss 0.5000\n", "")


def test_all_ranks_from_the_environment(monkeypatch, capsys):
    monkeypatch.setenv(ALL_RANKS_ENV, "1")
    setup_logging(2)
    log.info("hello")
    assert capsys.readouterr().out == "[rank 2] hello\n"
    monkeypatch.setenv(ALL_RANKS_ENV, "0")
    setup_logging(2)
    log.info("hello")
    assert capsys.readouterr().out == ""
    monkeypatch.setenv(ALL_RANKS_ENV, "yes")
    with pytest.raises(ValueError, match=f"{ALL_RANKS_ENV}='yes': set it to 1 .* or 0"):
        all_ranks_from_env()


@pytest.mark.parametrize("rank", [0, 1, 3])
def test_warnings_and_errors_pass_on_every_rank(rank, capsys):
    setup_logging(rank)
    log.warning("cannot read a.jpg")
    log.error("python -m train: error: boom")
    prefix = "" if rank == 0 else f"[rank {rank}] "
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"{prefix}cannot read a.jpg\n{prefix}python -m train: error: boom\n"


def test_setting_up_twice_adds_no_second_handler(capsys):
    root = logging.getLogger()
    before = len(root.handlers)
    setup_logging(0)
    setup_logging(0)
    setup_logging(0, level=logging.INFO)
    assert len(root.handlers) == before + 2  # one for stdout, one for stderr
    log.info("once")
    log.warning("once too")
    assert capsys.readouterr() == ("once\n", "once too\n")


def test_other_libraries_stay_at_warning(capsys):
    setup_logging(0)
    other = logging.getLogger("timm.models.some_module")
    other.info("chatter")
    other.warning("a real problem")
    assert capsys.readouterr() == ("", "a real problem\n")


def test_a_redirected_stream_is_followed(capsys):
    """The handlers look sys.stdout up when they write (set up before a redirection)."""
    import contextlib
    import io

    setup_logging(0)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        log.info("into the buffer")
    assert buf.getvalue() == "into the buffer\n" and capsys.readouterr().out == ""


@pytest.mark.slow
def test_a_real_run_still_shows_its_progress_lines(tmp_path):
    tree = make_tree(tmp_path / "tree", n_train=4, n_val=2)
    out = tmp_path / "run"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tree, out, data={"batch_size": 6},
                                              run={"progress": "lines", "log_every": 1})))
    env = {k: v for k, v in os.environ.items() if k not in ("MIXPRO_KILL_AT", ALL_RANKS_ENV)}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    proc = subprocess.run([sys.executable, "-m", "train", "--config", str(cfg)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert sum(ln.startswith("epoch 1/1 [") and " img/s ETA " in ln for ln in lines) == 2, lines
    assert any(ln.startswith("epoch 1/1: train loss ") and "(6 images)" in ln for ln in lines)
    assert any("M params, 1 x cpu, global batch 6" in ln for ln in lines), lines
    assert "| best top-1" in proc.stdout and "epoch 1/1" not in proc.stderr
