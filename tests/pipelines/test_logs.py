"""Rank-aware logging (pipelines/logs.py): rank 0 shows INFO on stdout, the other ranks only
warnings and errors (prefixed with their rank) unless asked; setting up twice adds no second
copy of a line; other libraries stay at WARNING. A real `python -m train` run:
tests/train/test_train_logs.py."""
from __future__ import annotations

import contextlib
import io
import logging

import pytest

from pipelines.logs import ALL_RANKS_ENV, PACKAGES, all_ranks_from_env, setup_logging

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


def ours() -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers if type(h).__module__ == "pipelines.logs"]


def test_setting_up_twice_adds_no_second_handler(capsys):
    setup_logging(0)
    setup_logging(0)
    setup_logging(0, level=logging.INFO)
    assert len(ours()) == 2  # one for INFO (stdout), one for WARNING and up (stderr)
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
    setup_logging(0)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        log.info("into the buffer")
    assert buf.getvalue() == "into the buffer\n" and capsys.readouterr().out == ""


def test_info_on_stderr_for_a_command_whose_stdout_is_its_result(capsys):
    setup_logging(0, info_stream="stderr")
    log.info("scan: 12 files checked")
    log.warning("cannot read a.jpg")
    assert capsys.readouterr() == ("", "scan: 12 files checked\ncannot read a.jpg\n")
    with pytest.raises(ValueError, match="info_stream must be 'stdout' or 'stderr', got 'out'"):
        setup_logging(0, info_stream="out")


def test_a_level_above_info_hides_info_on_rank0(capsys):
    setup_logging(0, level=logging.WARNING)
    log.info("progress")
    log.warning("problem")
    assert capsys.readouterr() == ("", "problem\n")
