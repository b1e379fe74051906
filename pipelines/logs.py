"""Rank-aware logging for the commands (`python -m train`, `train.evaluate`, `pipelines.scan`, ...).

Modules only do `logger = logging.getLogger(__name__)`; a command calls `setup_logging(rank)`
once. Rank 0 shows INFO and up as bare messages: progress and status on stdout (stderr for a
command whose stdout is its result, such as the scan's file list), warnings and errors on
stderr. Other ranks show WARNING and up, prefixed "[rank N] ", unless `all_ranks=True` or
MIXPRO_LOG_ALL_RANKS=1 (then their INFO lines too). Only the project's packages are raised to
INFO; other libraries keep Python's default (WARNING). It lives here, not in train/, so that
the data path's own commands can use it (the layering: mixpro_dali <- pipelines <- train).
"""
from __future__ import annotations

import logging
import os
import sys

__all__ = ["setup_logging", "all_ranks_from_env", "ALL_RANKS_ENV", "PACKAGES"]

ALL_RANKS_ENV = "MIXPRO_LOG_ALL_RANKS"
PACKAGES = ("mixpro_dali", "pipelines", "train", "tools")


class _StdStream(logging.StreamHandler):
    """Writes to sys.stdout or sys.stderr as they are when a record is emitted, so a stream
    redirected after setup (pytest's capsys, contextlib.redirect_stdout) is followed."""

    def __init__(self, name: str) -> None:
        logging.Handler.__init__(self)
        self._name = name

    @property
    def stream(self):  # StreamHandler writes to self.stream
        return getattr(sys, self._name)


def _below_warning(record: logging.LogRecord) -> bool:
    return record.levelno < logging.WARNING


def all_ranks_from_env() -> bool:
    """MIXPRO_LOG_ALL_RANKS: unset, '' or '0' -> False, '1' -> True."""
    value = os.environ.get(ALL_RANKS_ENV, "")
    if value not in ("", "0", "1"):
        raise ValueError(f"{ALL_RANKS_ENV}={value!r}: set it to 1 (every rank logs INFO) or 0 "
                         "(only rank 0 does)")
    return value == "1"


def setup_logging(rank: int = 0, level: int = logging.INFO, all_ranks: bool | None = None, *,
                  info_stream: str = "stdout") -> None:
    """Route the project's log records: below WARNING to `info_stream` ('stdout' | 'stderr'),
    WARNING and up to stderr.

    rank: this process's rank (`train.dist.env_rank()`); ranks > 0 prefix "[rank N] " and drop
    records below WARNING unless all_ranks (None: read MIXPRO_LOG_ALL_RANKS). Calling it again
    replaces the handlers it added before (no line shows twice)."""
    if info_stream not in ("stdout", "stderr"):
        raise ValueError(f"info_stream must be 'stdout' or 'stderr', got {info_stream!r}")
    if all_ranks is None:
        all_ranks = all_ranks_from_env()
    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, _StdStream)]:
        root.removeHandler(h)
    fmt = logging.Formatter("%(message)s" if rank == 0 else f"[rank {rank}] %(message)s")
    info, problems = _StdStream(info_stream), _StdStream("stderr")
    info.addFilter(_below_warning)
    problems.setLevel(logging.WARNING)
    for h in (info, problems):
        h.setFormatter(fmt)
        root.addHandler(h)
    shown = level if rank == 0 or all_ranks else max(level, logging.WARNING)
    for name in PACKAGES:
        logging.getLogger(name).setLevel(shown)
