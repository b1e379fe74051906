"""Build everything from a TrainConfig and run the epochs (DeiT's `main`; the loop is engine.py).

Order matters for exact resume: model and loaders are built (consuming RNG), then the
checkpoint is loaded, and the RNG states are restored last, right before the loop.
"""
from __future__ import annotations

import filecmp
import json
import logging
import math
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from . import checkpoint as ckpt_io
from .config import TrainConfig, dump_yaml
from .dist import DistInfo, agree, all_gather_object, barrier, broadcast_object, cleanup, \
    init_distributed
from .engine import Engine, PalMonitor, TrainState
from .losses import MixLoss, mix_config_for
from .summary import PAL_FILE
from .optim import build_optimizer, build_scheduler, scaled_lr
from .summary import Progress, Reporter, fmt_time, format_table, write_summary

__all__ = ["run", "build_model", "resolve_data", "build_loaders", "build_val_loader"]

logger = logging.getLogger(__name__)


def build_model(cfg: TrainConfig) -> tuple[nn.Module, int]:
    """The timm model and its patch size (checked against data.image_size)."""
    m = cfg.model
    try:
        model = timm.create_model(m.name, pretrained=False, num_classes=m.num_classes,
                                  drop_path_rate=m.drop_path, drop_rate=m.drop, **m.kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ValueError(f"model.name={m.name!r} is not a timm model; list them with "
                             "`python -c \"import timm; print(timm.list_models('vit*'))\"`") from None
        raise
    except TypeError as e:
        raise TypeError(f"model.kwargs {m.kwargs} are not accepted by {m.name}: {e}") from None
    pe = getattr(model, "patch_embed", None)
    if pe is None or not hasattr(pe, "patch_size"):
        if cfg.mix.method in ("maskmix", "mixpro", "transmix"):
            raise ValueError(f"mix.method={cfg.mix.method!r} needs a patch-based model (a "
                             f"token grid); {m.name} has no patch_embed")
        return model, cfg.data.image_size
    info = getattr(model, "feature_info", None)  # the token stride (PVT v2: 4, its kernel is 7)
    patch = info[0]["reduction"] if info else pe.patch_size
    patch = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
    img = getattr(pe, "img_size", None)
    if img is not None and not getattr(pe, "dynamic_img_size", False):
        img = tuple(img) if isinstance(img, (tuple, list)) else (img, img)
        if img != (cfg.data.image_size,) * 2:
            raise ValueError(f"data.image_size={cfg.data.image_size} but {m.name} is built for "
                             f"{img[0]}x{img[1]}; set --model.kwargs.img_size "
                             f"{cfg.data.image_size} (or change data.image_size)")
    return model, patch


def resolve_data(cfg: TrainConfig, dist: DistInfo) -> tuple[str, str]:
    """(train source, val source); prepares the Fashion-MNIST demo tree on rank 0 once."""
    d = cfg.data
    if not d.use_demo:
        for name in ("train", "val"):
            src = getattr(d, name)
            if not any(c in src for c in "*?[{") and not Path(src).exists():
                raise FileNotFoundError(f"data.{name}={src!r} does not exist: give a class-"
                                        "folder root, a file list or WebDataset shards")
        return d.train, d.val
    from pipelines.fashion_mnist import prepare_fashion_mnist

    def prepare(download: bool) -> Any:
        try:
            return str(prepare_fashion_mnist(d.cache_dir, train_size=d.demo_train_size,
                                             val_size=d.demo_val_size, image_size=d.image_size,
                                             raw_dir=d.demo_raw_dir, download=download))
        except (FileNotFoundError, ValueError) as e:
            return e

    # one builder per node (local rank 0); the others then find the finished tree
    first = prepare(True) if dist.local_rank == 0 else None
    errors = [r for r in all_gather_object(first) if isinstance(r, Exception)]
    if errors:
        raise errors[0]
    root = first if dist.local_rank == 0 else prepare(False)
    if isinstance(root, Exception):
        raise root
    return str(Path(root) / "train"), str(Path(root) / "val")


def build_loaders(cfg: TrainConfig, dist: DistInfo, mix_cfg, train_src: str, val_src: str):
    from pipelines.loader import TrainLoader, image_dtype
    d = cfg.data
    dev = dist.device.type
    dtype = image_dtype(cfg.run.amp, dev)          # bf16/fp16 images under AMP on the GPU
    train = TrainLoader(train_src, batch_size=d.batch_size, options=d.data_options(),
                        mix=mix_cfg, seed=cfg.run.seed, device=dev, shard_id=dist.rank,
                        num_shards=dist.world_size, num_threads=d.num_threads, dtype=dtype,
                        exclude=d.exclude)
    val = build_val_loader(cfg, val_src, device=dev, dtype=dtype, shard_id=dist.rank,
                           num_shards=dist.world_size)
    return train, val


_CONFIG_EXCLUDE = object()     # build_val_loader's default: the config's data.exclude


def build_val_loader(cfg: TrainConfig, source: Any, *, device: str, dtype: str,
                     shard_id: int = 0, num_shards: int = 1, batch_size: int | None = None,
                     num_threads: int | None = None, exclude: Any = _CONFIG_EXCLUDE):
    """The validation loader of a run of `cfg` (the one builder: training and
    `python -m train.evaluate` use it): cfg's data options and `data.exclude`, the run's image
    `dtype` (train: `image_dtype(run.amp, device)`). batch_size / num_threads default to
    data.val_batch_size (else 2 x data.batch_size) / data.num_threads; exclude: default
    data.exclude; a list, a file or None for other data."""
    from pipelines.loader import ValLoader
    d = cfg.data
    return ValLoader(source, batch_size=batch_size or d.val_batch_size or 2 * d.batch_size,
                     options=d.data_options(), device=device, shard_id=shard_id,
                     num_shards=num_shards, num_threads=num_threads or d.num_threads,
                     dtype=dtype, exclude=d.exclude if exclude is _CONFIG_EXCLUDE else exclude)


def _check_classes(source: Any, num_classes: int) -> None:
    """Labels must index the classifier: a clear error instead of a scatter crash."""
    n = len(source.classes) if getattr(source, "classes", ()) else (
        max(source.labels) + 1 if getattr(source, "labels", ()) else 0)
    if n > num_classes:
        raise ValueError(f"the training data has {n} classes but model.num_classes="
                         f"{num_classes}; set --model.num_classes {n}")


def _output_dir(cfg: TrainConfig, output: str | None, name: str) -> Path:
    if output or cfg.run.output:
        return Path(output or cfg.run.output)
    return Path("runs") / f"{name}-{datetime.now():%Y%m%d-%H%M%S}"


RUN_FILES = ("last.pth", "best.pth", "best.pth.pending", "best_timm.pth", "summary.csv",
             "pal_alpha.json", "config.yaml")
PENDING_BEST = "best.pth.pending"


class _Saver:
    """Rank 0 writes; every rank contributes its RNG, loader state and running sums (a
    collective).

    An epoch's outputs are committed in this order, so that a kill at any point resumes to
    the same files as an uninterrupted run: (1) best.pth.pending (if a new best) and
    epoch_NNNN.pth, (2) last.pth: the commit, (3) `finish_epoch`: best.pth.pending -> best.pth,
    summary.csv and pal_alpha.json rewritten whole from the checkpoint's history. A kill before
    (2) resumes from the previous last.pth and redoes the epoch (the pending file is dropped on
    the next start); a kill after (2) is completed by `recover` on the next start."""

    def __init__(self, eng: Engine, train_loader, cfg: TrainConfig, out: Path, dist: DistInfo):
        self.eng, self.loader, self.cfg, self.out, self.dist = eng, train_loader, cfg, out, dist

    def payload(self, st: TrainState) -> bytes | None:
        """The sealed checkpoint bytes on rank 0 (None elsewhere)."""
        e = self.eng
        running = {"loss_sum": st.loss_sum, "loss_count": st.loss_count,
                   "monitor": e.monitor.state() if e.monitor is not None else None}
        ranks = all_gather_object(ckpt_io.plain_state(
            {"rng": ckpt_io.capture_rng(), "loader": self.loader.state_dict(),
             "running": running}))
        if not self.dist.is_main:
            return None
        sd = ckpt_io.to_cpu({  # one wait for all device->host copies, not one per tensor
            "version": ckpt_io.FORMAT_VERSION, "model": e.model.state_dict(),
            "optimizer": e.optimizer.state_dict(), "scheduler": e.scheduler.state_dict(),
            "scaler": e.scaler.state_dict(), "ema": e.ema.state_dict() if e.ema else None,
            "state": st.to_dict(), "ranks": ranks, "config": self.cfg.to_dict(),
        })
        if not all(bool(torch.isfinite(v).all()) for v in sd["model"].values()
                   if v.is_floating_point()):
            raise RuntimeError("model weights are not finite; not overwriting the last good "
                               "checkpoint. Lower optim.lr or set optim.clip_grad.")
        return ckpt_io.serialize(sd)

    def mid_epoch(self, st: TrainState) -> None:
        data = self.payload(st)
        if data is not None:
            ckpt_io.write_bytes_atomic(data, self.out / "last.pth")
            ckpt_io.fault_point("mid_epoch:committed")

    def epoch_end(self, st: TrainState, is_best: bool) -> None:
        data = self.payload(st)
        if data is None:
            return
        if is_best:
            ckpt_io.write_bytes_atomic(data, self.out / PENDING_BEST)
        every = self.cfg.run.ckpt_every
        if every and (st.epoch + 1) % every == 0:
            ckpt_io.write_bytes_atomic(data, self.out / f"epoch_{st.epoch + 1:04d}.pth")
        ckpt_io.fault_point("epoch_end:before_commit")
        ckpt_io.write_bytes_atomic(data, self.out / "last.pth")
        ckpt_io.fault_point("epoch_end:committed")
        finish_epoch(self.out, st.history)


def finish_epoch(out: Path, history: list[dict[str, Any]]) -> None:
    """Step (3) of the commit: idempotent, redone by `recover` after a kill."""
    pending = out / PENDING_BEST
    if pending.is_file():
        os.replace(pending, out / "best.pth")
    ckpt_io.fault_point("epoch_end:best")
    # both files hold exactly the committed history (none before the first epoch's end)
    rows = [h["row"] for h in history if "row" in h]
    if rows:
        write_summary(out / "summary.csv", rows)
    else:
        (out / "summary.csv").unlink(missing_ok=True)
    ckpt_io.fault_point("epoch_end:summary")
    hists = [h["pal_alpha_hist"] for h in history if "pal_alpha_hist" in h]
    if hists:
        write_pal_history(out / PAL_FILE, history, len(hists[0]))
    else:
        (out / PAL_FILE).unlink(missing_ok=True)


def recover(out: Path, resumed_from: Path | None, history: list[dict[str, Any]]) -> None:
    """On an accepted start: drop the temp files of killed writes; keep a pending best.pth only
    when it belongs to the committed checkpoint we resume from (same bytes), then finish that
    epoch's outputs (summary.csv, pal_alpha.json) from its history."""
    epoch_files = {p.name.split(".pth.")[0] + ".pth" for p in out.glob("epoch_*.pth.*.tmp")}
    gone = ckpt_io.clean_temp_files(out, [*RUN_FILES, *sorted(epoch_files)])
    if gone:
        logger.info("removed %s temp file(s) of an interrupted write: %s", len(gone),
                    ", ".join(p.name for p in gone))
    pending = out / PENDING_BEST
    if pending.is_file():
        if resumed_from is None or not filecmp.cmp(pending, resumed_from, shallow=False):
            pending.unlink()
    if resumed_from is not None:
        finish_epoch(out, history)


def _preflight(cfg: TrainConfig, dist: DistInfo, resume: str | None,
               out: Path) -> tuple[dict[str, Any] | None, Path | None]:
    """Everything that can be refused before data, model or loaders are built, and before the
    run folder changes: the checkpoint (readable, ours, intact, compatible), the model."""
    if not resume and (out / "last.pth").exists():
        raise ValueError(f"{out} already holds a run (last.pth): continue it with --resume "
                         f"{out}, or choose another --output")
    check_model(cfg)
    if not resume:
        return None, None
    path = Path(resume)
    path = path / "last.pth" if path.is_dir() else path
    ck = ckpt_io.load_checkpoint(path, training=True)
    where = f"checkpoint {str(path)!r}"
    ranks = ck["ranks"]
    if len(ranks) != dist.world_size:
        raise ValueError(f"{where} was written by {len(ranks)} processes, this run has "
                         f"{dist.world_size}: resume with the same number of processes")
    old = ck["config"]
    for key in ("name", "num_classes", "kwargs"):
        was, now = old.get("model", {}).get(key), getattr(cfg.model, key)
        if was != now:
            raise ValueError(f"{where} is for model.{key}={was!r}, this run has {now!r}: resume "
                             "with the same model")
    loader = ranks[dist.rank]["loader"]
    for key, now in (("seed", cfg.run.seed), ("batch_size", cfg.data.batch_size)):
        if isinstance(loader, dict) and loader.get(key) != now:
            section = "run" if key == "seed" else "data"
            raise ValueError(f"{where} was written with {section}.{key}={loader.get(key)!r}, "
                             f"this run has {now!r}: resume with the same {section}.{key}")
    return ck, path


def check_model(cfg: TrainConfig) -> None:
    """Build the model on the meta device (no memory, no RNG use) so that unknown kwargs or a
    wrong image size fail before any data is prepared."""
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            build_model(cfg)
    except (ValueError, TypeError):
        raise
    except Exception:  # noqa: BLE001 - a model that cannot be built on meta: checked later
        pass


def _apply_resume(ck: dict[str, Any], eng: Engine, train_loader, dist: DistInfo) -> TrainState:
    eng.model.load_state_dict(ck["model"])
    eng.optimizer.load_state_dict(ck["optimizer"])
    keys = ("t_initial", "warmup_t", "lr_min", "warmup_lr_init", "base_values")
    new, old = eng.scheduler.state_dict(), ck["scheduler"]
    if all(new.get(k) == old.get(k) for k in keys):
        eng.scheduler.load_state_dict(old)
    elif dist.is_main:
        logger.warning("resume: the schedule changed (run.epochs / optim.* / batch size); "
                       "continuing with the new one from step %s", ck["state"]["step"])
    if eng.scaler.is_enabled() and ck.get("scaler"):
        eng.scaler.load_state_dict(ck["scaler"])
    if eng.ema is not None:
        if ck.get("ema"):
            eng.ema.load_state_dict(ck["ema"])
        else:  # EMA switched on at resume: start it from the resumed weights
            eng.ema.set(eng.model)
    st = TrainState.from_dict(ck["state"])
    eng.scheduler.step_update(num_updates=st.step)
    mine = ck["ranks"][dist.rank]
    train_loader.load_state_dict(mine["loader"])
    running = mine["running"]  # this rank's own partial-epoch sums
    st.loss_sum, st.loss_count = float(running["loss_sum"]), int(running["loss_count"])
    if eng.monitor is not None:
        if running.get("monitor") is not None:
            eng.monitor.load_state(running["monitor"])
        else:
            eng.monitor.reset()
    ckpt_io.restore_rng(mine["rng"])
    return st


def run(cfg: TrainConfig, *, resume: str | None = None, output: str | None = None,
        name: str = "run") -> dict[str, Any]:
    """Train and evaluate; returns the final metrics. Wraps set-up and tear-down of DDP."""
    dist = init_distributed(cfg.run.device)
    try:
        return _run(cfg, dist, resume=resume, output=output, name=name)
    finally:
        cleanup()


def _build(cfg: TrainConfig, dist: DistInfo) -> tuple[Engine, Any, Any]:
    """Model (+DDP, compile), loaders, optimizer, schedule, scaler, EMA -> (engine, loaders)."""
    train_src, val_src = resolve_data(cfg, dist)
    model, patch = build_model(cfg)
    model.to(dist.device)
    mix_cfg = mix_config_for(cfg.mix.method, cfg.mix.label_variant,
                             image_size=cfg.data.image_size, patch_size=patch,
                             mask_patch=cfg.mix.mask_patch, seed=cfg.run.seed,
                             options=cfg.mix.options)
    # (the attention hooks go on before compile)
    loss_fn = MixLoss(model, method=cfg.mix.method, label_variant=cfg.mix.label_variant,
                      num_classes=cfg.model.num_classes, smoothing=cfg.mix.smoothing,
                      mix_config=mix_cfg)
    train_model: nn.Module = model
    if dist.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)
    if cfg.run.compile:
        train_model = torch.compile(train_model)
    train_loader, val_loader = build_loaders(cfg, dist, mix_cfg, train_src, val_src)
    _check_classes(train_loader.source, cfg.model.num_classes)
    o = cfg.optim
    lr = scaled_lr(o.lr, cfg.data.batch_size * dist.world_size * o.accum_steps, o.lr_base_batch)
    optimizer = build_optimizer(model, opt=o.opt, lr=lr, weight_decay=o.weight_decay,
                                betas=o.betas, eps=o.eps)
    scheduler = build_scheduler(optimizer, sched=o.sched, epochs=cfg.run.epochs,
                                updates_per_epoch=math.ceil(len(train_loader) / o.accum_steps),
                                warmup_epochs=o.warmup_epochs, warmup_lr=o.warmup_lr,
                                min_lr=o.min_lr)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=(
        dist.device.type == "cuda" and cfg.run.amp == "fp16"))
    ema = None
    if cfg.run.ema:  # after DDP built (it broadcasts rank 0's weights)
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(model, decay=cfg.run.ema_decay)
    monitor = PalMonitor(dist.device, pal=loss_fn.label_method == "mixpro")
    eng = Engine(model, train_model, optimizer, scheduler, scaler, loss_fn, dist=dist,
                 amp=cfg.run.amp, accum_steps=o.accum_steps, clip_grad=o.clip_grad, ema=ema,
                 monitor=monitor)
    return eng, train_loader, val_loader


def _run(cfg: TrainConfig, dist: DistInfo, *, resume, output, name) -> dict[str, Any]:
    t_run = time.perf_counter()
    torch.manual_seed(cfg.run.seed + dist.rank)
    out = Path(broadcast_object(str(_output_dir(cfg, output, name))))
    ck, ck_path = agree(lambda: _preflight(cfg, dist, resume, out))
    eng, train_loader, val_loader = _build(cfg, dist)
    n_batches = len(train_loader)
    st = _apply_resume(ck, eng, train_loader, dist) if ck is not None else TrainState()
    del ck
    # accepted: only now does the run folder change
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        recover(out, ck_path, st.history)
        dump_yaml(cfg, out / "config.yaml")
    barrier()
    if st.batch >= n_batches:  # the checkpoint closed its epoch
        st.epoch, st.batch, st.loss_sum, st.loss_count = st.epoch + 1, 0, 0.0, 0
        if eng.monitor is not None:
            eng.monitor.reset()
    n_params = sum(p.numel() for p in eng.model.parameters())
    logger.info("%s: %.2fM params, %s x %s, global batch %s, lr %.2e, %s batches/epoch, "
                "mix %s/%s, out %s", cfg.model.name, n_params / 1e6, dist.world_size,
                dist.device.type, cfg.data.batch_size * dist.world_size * cfg.optim.accum_steps,
                _peak_lr(eng), n_batches, cfg.mix.method, cfg.mix.label_variant, out)
    if ck_path is not None:
        logger.info("resumed from %s: epoch %s, batch %s, step %s", ck_path, st.epoch + 1,
                    st.batch, st.step)
    try:
        last, samples, train_s = _epochs(cfg, dist, eng, train_loader, val_loader, st, out)
    finally:
        eng.loss_fn.remove()
    wall = time.perf_counter() - t_run
    result = {**last, "best_top1": st.best_top1, "best_epoch": st.best_epoch + 1,
              "wall_s": wall, "img_s": samples / max(train_s, 1e-9),
              "output": str(out), "history": st.history}
    if dist.is_main and (out / "best.pth").is_file():
        ckpt_io.export_backbone(out / "best.pth", out / "best_timm.pth")
        logger.info("%s", _final_table(cfg, result, out))
    barrier()
    return result


def _peak_lr(eng: Engine) -> float:
    return float(eng.scheduler.base_values[0])


def _epochs(cfg: TrainConfig, dist: DistInfo, eng: Engine, train_loader, val_loader,
            st: TrainState, out: Path) -> tuple[dict[str, Any], int, float]:
    """Train + evaluate + report + checkpoint, epoch after epoch, from `st`."""
    n_batches = len(train_loader)
    saver = _Saver(eng, train_loader, cfg, out, dist)
    reporter = Reporter(out if dist.is_main else None, tensorboard=cfg.run.tensorboard)
    # other ranks: progress lines (never a bar), only when their INFO is shown (all_ranks)
    mode = cfg.run.progress if dist.is_main or cfg.run.progress == "off" else "lines"
    progress = Progress(mode,
                        enabled=dist.is_main or logger.isEnabledFor(logging.INFO),
                        epochs=cfg.run.epochs, n_batches=n_batches)
    last = _last_metrics(st.history[-1]) if st.history else {}  # a resume past the end
    samples, train_s = 0, 0.0
    try:
        for epoch in range(st.epoch, cfg.run.epochs):
            st.epoch, t_ep, first = epoch, time.perf_counter(), st.batch
            progress.start_epoch(epoch, st.batch)
            train_m = eng.train_epoch(train_loader, n_batches, st, on_log=progress.log,
                                      log_every=cfg.run.log_every,
                                      on_checkpoint=saver.mid_epoch,
                                      ckpt_steps=cfg.run.ckpt_steps)
            progress.end_epoch(st)
            train_s += time.perf_counter() - t_ep
            samples += (st.batch - first) * cfg.data.batch_size * dist.world_size
            evals = eng.evaluate(eng.model, val_loader)
            if eng.ema is not None:
                evals.update({f"ema_{k}": v for k, v in
                              eng.evaluate(eng.ema.module, val_loader).items() if k != "count"})
            is_best = evals["top1"] > st.best_top1
            if is_best:
                st.best_top1, st.best_epoch = evals["top1"], epoch
            sec = time.perf_counter() - t_ep
            count = evals.pop("count")
            row = {"epoch": epoch, **{f"train_{k}": v for k, v in train_m.items()},
                   **{f"eval_{k}": v for k, v in evals.items()}, "lr": eng.lr}
            st.history.append({"epoch": epoch, "train_loss": train_m["loss"], **evals,
                               "count": count, "seconds": sec,
                               **_pal_history(train_m, eng.monitor), "row": row})
            saver.epoch_end(st, is_best)  # commits the epoch: checkpoints, summary.csv
            reporter.epoch(epoch, train_m, evals, lr=eng.lr, seconds=sec, step=st.step)
            logger.info("epoch %s/%s: train loss %.4f val loss %.4f top-1 %.2f top-5 %.2f "
                        "(%s images) %s", epoch + 1, cfg.run.epochs, train_m["loss"],
                        evals["loss"], evals["top1"], evals["top5"], count, fmt_time(sec))
            last = {**evals, "train_loss": train_m["loss"]}
            st.batch, st.loss_sum, st.loss_count = 0, 0.0, 0
    finally:
        reporter.close()
    return last, samples, train_s


def _pal_history(train_m: dict[str, Any], monitor: PalMonitor | None) -> dict[str, Any]:
    """The epoch's PAL columns and its alpha histogram, kept in the history (so checkpoints
    carry them and pal_alpha.json can be rewritten whole)."""
    if monitor is None:
        return {}
    out = {k: v for k, v in train_m.items() if k.startswith(("pal_", "mode_"))}
    if monitor.pal:
        out["pal_alpha_hist"] = list(monitor.last_hist)
    return out


def write_pal_history(path: Path, history: list[dict[str, Any]], bins: int) -> None:
    """pal_alpha.json: per epoch alpha mean/std and the per-sample alpha histogram (counts of
    `bins` equal bins over [0, 1]); `python -m tools.pal_plot RUN_DIR` draws it."""
    rows = [{"epoch": h["epoch"], "alpha_mean": h.get("pal_alpha_mean"),
             "alpha_std": h.get("pal_alpha_std"),
             "counts": [int(c) for c in h["pal_alpha_hist"]]}
            for h in history if "pal_alpha_hist" in h]
    text = json.dumps({"bins": bins, "range": [0.0, 1.0], "epochs": rows}, allow_nan=True)
    ckpt_io.write_bytes_atomic(text.encode(), path)


def _last_metrics(h: dict[str, Any]) -> dict[str, Any]:
    """The final-metrics dict of a history entry (as the loop returns for its last epoch)."""
    row = h.get("row", {})
    return {**{k[5:]: v for k, v in row.items() if k.startswith("eval_")},
            "train_loss": h["train_loss"]}


def _final_table(cfg: TrainConfig, result: dict[str, Any], out: Path) -> str:
    nan = float("nan")
    return format_table([
        ("model", cfg.model.name), ("method", f"{cfg.mix.method} ({cfg.mix.label_variant})"),
        ("epochs", str(cfg.run.epochs)),
        ("final top-1 / top-5", f"{result.get('top1', nan):.2f} / {result.get('top5', nan):.2f}"),
        ("best top-1", f"{result['best_top1']:.2f} (epoch {result['best_epoch']})"),
        ("train throughput", f"{result['img_s']:.0f} img/s"),
        ("wall time", fmt_time(result["wall_s"])),
        ("output", str(out)),
        ("timm weights", str(out / "best_timm.pth")),
    ])
