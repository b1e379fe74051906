"""What the user sees (rank 0 only): progress, summary.csv, TensorBoard scalars, a final table.

progress: 'bar' (tqdm on a terminal), 'lines' (one log line every run.log_every steps, for logs
and CI; pipelines/logs.py routes it), 'off'; 'auto' = bar on a terminal, lines otherwise.
summary.csv has timm's columns (epoch, train_loss, eval_loss, eval_top1, eval_top5, lr) plus
eval_ema_* when EMA is on and the PAL monitor's train_pal_* / train_mode_*; it is rewritten
whole (atomically) from the checkpointed history at each epoch end, so a killed and resumed
run ends with the same file.
"""
from __future__ import annotations

import csv
import io
import logging
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["Progress", "Reporter", "format_table", "fmt_time", "write_summary", "PAL_FILE"]

logger = logging.getLogger(__name__)

PAL_FILE = "pal_alpha.json"     # PAL's alpha per epoch, rewritten at each epoch end (method mixpro)


def write_summary(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """summary.csv from all epochs' rows (timm's update_summary format: header, then one row
    per epoch), replacing the file atomically. Columns: the union in first-seen order."""
    from .checkpoint import write_bytes_atomic
    fields: dict[str, None] = {}
    for r in rows:
        fields.update(dict.fromkeys(r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), restval="", lineterminator="\r\n")
    w.writeheader()
    w.writerows(rows)
    write_bytes_atomic(buf.getvalue().encode(), path)


def fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


class Progress:
    """Per-epoch progress: loss, lr, img/s, ETA (epoch and run)."""

    def __init__(self, mode: str, *, enabled: bool, epochs: int, n_batches: int) -> None:
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        if mode == "bar":
            try:
                import tqdm  # noqa: F401
            except ImportError:
                mode = "lines"
        self.mode = mode if enabled else "off"
        self.epochs, self.n_batches = epochs, n_batches
        self.bar = None
        self.t_start = time.perf_counter()
        self.done_batches = 0  # batches run in this process (for the run ETA)

    def start_epoch(self, epoch: int, first_batch: int) -> None:
        self.epoch, self.t_epoch, self.first = epoch, time.perf_counter(), first_batch
        if self.mode == "bar":
            from tqdm import tqdm
            self.bar = tqdm(total=self.n_batches, initial=first_batch, unit="batch",
                            desc=f"epoch {epoch + 1}/{self.epochs}", dynamic_ncols=True,
                            leave=False)

    def log(self, state, info: Mapping[str, float]) -> None:
        if self.mode == "off":
            return
        run_batches = self.done_batches + state.batch - self.first
        rate = run_batches / max(time.perf_counter() - self.t_start, 1e-9)  # batches/s
        left_epoch = (self.n_batches - state.batch) / max(rate, 1e-9)
        left_run = left_epoch + (self.epochs - state.epoch - 1) * self.n_batches / max(rate, 1e-9)
        if self.bar is not None:
            self.bar.n = state.batch
            self.bar.set_postfix_str(f"loss {info['loss']:.4f} lr {info['lr']:.2e} "
                                     f"{info['img_s']:.0f} img/s run ETA {fmt_time(left_run)}")
        elif self.mode == "lines":
            logger.info("epoch %s/%s [%s/%s] loss %.4f lr %.2e %.0f img/s ETA %s (run %s)",
                        state.epoch + 1, self.epochs, state.batch, self.n_batches, info["loss"],
                        info["lr"], info["img_s"], fmt_time(left_epoch), fmt_time(left_run))

    def end_epoch(self, state) -> None:
        self.done_batches += state.batch - self.first
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Reporter:
    """TensorBoard scalars (when installed and run.tensorboard); summary.csv: write_summary."""

    def __init__(self, out_dir: Path | None, *, tensorboard: bool) -> None:
        self.out_dir = out_dir
        self.tb = None
        if out_dir is not None and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
            except ImportError:
                self.tb = None

    def epoch(self, epoch: int, train: Mapping[str, float], evals: Mapping[str, Any],
              lr: float, seconds: float, step: int) -> None:
        if self.tb is not None:
            for k, v in {**{f"train/{k}": v for k, v in train.items()},
                         **{f"eval/{k}": v for k, v in evals.items()},
                         "train/lr": lr, "train/epoch_seconds": seconds}.items():
                self.tb.add_scalar(k, v, epoch)
            self.tb.add_scalar("train/step", step, epoch)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def format_table(rows: list[tuple[str, str]]) -> str:
    """A two-column box for the final summary."""
    w = max(len(k) for k, _ in rows)
    v = max(len(x) for _, x in rows)
    line = "+" + "-" * (w + 2) + "+" + "-" * (v + 2) + "+"
    body = [f"| {k:<{w}} | {x:<{v}} |" for k, x in rows]
    return "\n".join([line, *body, line])
