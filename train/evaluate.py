"""python -m train.evaluate CKPT --data DIR [--ood DIR] [--json F] [--table F] [--plot F.png]

Evaluates a checkpoint of `python -m train` (a .pth or a run folder: best.pth, else last.pth) on
any class-folder tree, `path label` list or WebDataset source, with the checkpoint's own
preprocessing (image size, crop, mean/std):
  - top-1 / top-5 and NLL;
  - calibration: expected calibration error, 15 equal-width bins (train/metrics.py);
  - occlusion: accuracy vs patch-drop ratio for random / salient / non-salient patch dropping
    with the model's own class attention (train/robustness.py; Naseer et al. 2021);
  - with --ood: AUROC, AUPR-In/Out and FPR@95 of max-softmax scores, --data being in-distribution
    (the OOD source's labels are ignored).
Writes JSON (--json), a markdown table (--table, and stdout) and a PNG (--plot).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .metrics import calibration_bins, expected_calibration_error, ood_metrics
from .robustness import (DROP_KINDS, DROP_MODES, apply_pixel_drop, drop_count, drop_order,
                         forward_kept_tokens, keep_mask)

__all__ = ["load_model", "evaluate_model", "msp_scores", "ood_report", "occlusion_subset", "format_report",
           "plot_curves", "plot_reliability", "main", "DEFAULT_RATIOS"]

logger = logging.getLogger(__spec__.name)  # 'train.evaluate' also under python -m

DEFAULT_RATIOS = tuple(round(0.1 * i, 1) for i in range(10))  # 0.0 .. 0.9


def resolve_checkpoint(path: str | Path) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / "best.pth" if (p / "best.pth").is_file() else p / "last.pth"
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {str(p)!r} does not exist (give a .pth written by "
                                "python -m train, or its run folder)")
    return p


def load_model(path: str | Path, device: torch.device | str = "cpu"):
    """(model in eval mode, TrainConfig, patch size) from a `python -m train` checkpoint."""
    from .checkpoint import backbone_state, load_checkpoint
    from .config import TrainConfig
    from .main import build_model
    ck = load_checkpoint(resolve_checkpoint(path))
    if "config" not in ck or "model" not in ck:
        raise ValueError(f"{path} is not a python -m train checkpoint (no 'config'/'model'); "
                         "plain timm weights carry no preprocessing or architecture settings")
    cfg = TrainConfig.from_dict(ck["config"])
    model, patch = build_model(cfg)
    model.load_state_dict(backbone_state(ck))
    return model.to(device).eval(), cfg, patch


def occlusion_subset(total: int, n: int | None) -> set[int]:
    """n sample positions spread evenly over [0, total) (all when n is None or >= total);
    class-sorted sources thus give near class-balanced subsets."""
    if n is None or n >= total:
        return set(range(total))
    return {int(i * total // n) for i in range(n)}


def _occluded_logits(model: nn.Module, images: torch.Tensor, keep: torch.Tensor, drop: str,
                     fill: torch.Tensor) -> torch.Tensor:
    if drop == "tokens":
        return forward_kept_tokens(model, images, keep)
    return model(apply_pixel_drop(images, keep, fill))


def _occlusion_hits(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                    logits: torch.Tensor, attn: torch.Tensor | None, *, mode: str,
                    ratios: Sequence[float], patch: int, drop: str, fill: torch.Tensor,
                    generator: torch.Generator) -> torch.Tensor:
    """Correct predictions per drop ratio (len(ratios),) float64 for one batch and one mode;
    `logits` are the clean ones (ratio 0 reuses them)."""
    grid = (images.shape[2] // patch, images.shape[3] // patch)
    N = grid[0] * grid[1]
    order = drop_order(mode, attn, batch=len(labels), num_tokens=N, generator=generator)
    order = order.to(images.device)  # (B, N)
    hits = torch.zeros(len(ratios), dtype=torch.float64)
    for j, r in enumerate(ratios):
        k = drop_count(r, N)
        lg = logits if k == 0 else _occluded_logits(model, images, keep_mask(order, k, grid),
                                                    drop, fill.to(images.device))
        hits[j] = float((lg.argmax(dim=1) == labels).sum())
    return hits


@torch.no_grad()
def evaluate_model(model: nn.Module, loader: Iterable, *, patch: int, mean: Sequence[float],
                   std: Sequence[float], ratios: Sequence[float] = DEFAULT_RATIOS,
                   modes: Sequence[str] = DROP_MODES, drop: str = "pixels",
                   occlusion_index: set[int] | None = None, seed: int = 0,
                   n_bins: int = 15) -> dict[str, Any]:
    """One pass over `loader` (dicts with image (B, 3, H, W) normalized, label (B,)): clean
    metrics on every sample, occlusion curves on the samples whose position is in
    `occlusion_index` (None: all). Occlusion accuracies are fractions in [0, 1]."""
    from mixpro_dali.attention import ClsAttention
    if drop not in DROP_KINDS:
        raise ValueError(f"drop must be one of {DROP_KINDS}, got {drop!r}")
    bad = [m for m in modes if m not in DROP_MODES]
    if bad:
        raise ValueError(f"occlusion modes must be among {DROP_MODES}, got {bad}")
    model.eval()
    need_attn = any(m != "random" for m in modes)
    cls_attn = ClsAttention(model) if need_attn else None
    if cls_attn is not None and cls_attn.stride:  # occlude A's tokens (CA-Swin / CA-PVT: 32 px)
        patch = cls_attn.stride
    fill = torch.tensor([-m / s for m, s in zip(mean, std)])  # raw pixel 0, normalized (C,)
    gen = torch.Generator().manual_seed(seed)
    counts = {m: torch.zeros(len(ratios), dtype=torch.float64) for m in modes}
    conf, hit, hit5, nll, n_occ, pos = [], [], [], 0.0, 0, 0
    try:
        for batch in loader:
            images, labels = batch["image"].float(), batch["label"].long()
            logits = model(images).float()  # (B, C)
            attn = cls_attn.maps if cls_attn is not None else None  # (B, h*w)
            prob = logits.softmax(dim=1)
            conf.append(prob.max(dim=1).values.cpu())
            hit.append((logits.argmax(dim=1) == labels).cpu())
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hit5.append((top5 == labels[:, None]).any(dim=1).cpu())
            nll += float(F.cross_entropy(logits, labels, reduction="sum"))
            B = labels.numel()
            sel = [i for i in range(B) if occlusion_index is None or pos + i in occlusion_index]
            pos += B
            if not sel or not modes:
                continue
            n_occ += len(sel)
            sel_t = torch.tensor(sel, device=images.device)
            attn_sel = attn[sel_t] if attn is not None else None
            for m in modes:
                counts[m] += _occlusion_hits(model, images[sel_t], labels[sel_t],
                                             logits[sel_t], attn_sel, mode=m, ratios=ratios,
                                             patch=patch, drop=drop, fill=fill, generator=gen)
    finally:
        if cls_attn is not None:
            cls_attn.remove()
    if not hit:
        raise ValueError("the evaluation data yielded no samples")
    conf_t, hit_t = torch.cat(conf).numpy(), torch.cat(hit).numpy().astype(np.float64)
    n = int(hit_t.size)
    return {
        "num_samples": n, "top1": float(hit_t.mean()),
        "top5": float(torch.cat(hit5).double().mean()), "nll": nll / n,
        "ece": expected_calibration_error(conf_t, hit_t, n_bins),
        "mean_confidence": float(conf_t.mean()),
        "calibration_bins": calibration_bins(conf_t, hit_t, n_bins),
        "msp": conf_t,  # (n,) max softmax per sample, for OOD scores; not JSON
        "occlusion": {"drop": drop, "patch": patch, "samples": n_occ, "seed": seed,
                      "ratios": [float(r) for r in ratios],
                      "accuracy": {m: (counts[m] / max(n_occ, 1)).tolist() for m in modes}},
    }


@torch.no_grad()
def msp_scores(model: nn.Module, loader: Iterable) -> tuple[np.ndarray, np.ndarray]:
    """(maximum softmax probability (n,), label (n,)) of every sample."""
    model.eval()
    scores, labels = [], []
    for b in loader:
        scores.append(model(b["image"].float()).float().softmax(dim=1).max(dim=1).values.cpu())
        labels.append(b["label"].reshape(-1).cpu())
    return torch.cat(scores).numpy(), torch.cat(labels).numpy()


def ood_report(score_in: np.ndarray, score_out: np.ndarray,
               label_out: np.ndarray) -> dict[str, Any]:
    """ood_metrics over the whole OOD set, and per OOD label when it has several (e.g. a
    near and a far class)."""
    res = ood_metrics(score_in, score_out)
    classes = np.unique(label_out)
    if classes.size > 1:
        res["by_label"] = {str(int(c)): ood_metrics(score_in, score_out[label_out == c])
                           for c in classes}
    return res


def format_report(res: dict[str, Any]) -> str:
    """A markdown table of one evaluation (percentages)."""
    lines = ["| metric | value |", "|---|---|",
             f"| top-1 | {100 * res['top1']:.2f} |", f"| top-5 | {100 * res['top5']:.2f} |",
             f"| NLL | {res['nll']:.4f} |", f"| ECE (15 bins) | {100 * res['ece']:.2f} |"]
    if "ood" in res:
        o = res["ood"]
        lines += [f"| OOD AUROC (MSP) | {100 * o['auroc']:.2f} |",
                  f"| OOD AUPR-In / AUPR-Out | {100 * o['aupr_in']:.2f} / "
                  f"{100 * o['aupr_out']:.2f} |", f"| OOD FPR@95 | {100 * o['fpr95']:.2f} |"]
        lines += [f"| OOD AUROC, OOD label {c} only | {100 * v['auroc']:.2f} |"
                  for c, v in o.get("by_label", {}).items()]
    occ = res["occlusion"]
    if occ["accuracy"]:
        modes = list(occ["accuracy"])
        lines += ["", f"Occlusion top-1 (%), drop={occ['drop']}, {occ['samples']} images:", "",
                  "| drop ratio | " + " | ".join(modes) + " |",
                  "|---" * (len(modes) + 1) + "|"]
        for j, r in enumerate(occ["ratios"]):
            lines.append(f"| {r:.1f} | " + " | ".join(
                f"{100 * occ['accuracy'][m][j]:.2f}" for m in modes) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(panels: dict[str, dict[str, tuple]], path: str | Path, *,
                xlabel: str = "drop ratio", ylabel: str = "top-1 (%)", title: str = "") -> Path:
    """One subplot per panel, one line per label: panels[p][label] = (x, y[, yerr])."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False,
                             sharey=True)
    for ax, (name, lines) in zip(axes[0], panels.items()):
        for label, (x, y, *err) in lines.items():
            ax.plot(x, y, marker="o", markersize=3, label=label)
            if err and err[0] is not None:
                y, e = np.asarray(y), np.asarray(err[0])
                ax.fill_between(x, y - e, y + e, alpha=0.2)
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=8)
    return _save_figure(fig, path, title)


def _save_figure(fig, path: str | Path, title: str) -> Path:
    import matplotlib.pyplot as plt
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_reliability(bins: dict[str, list[dict[str, float]]], path: str | Path, *,
                     title: str = "") -> Path:
    """Reliability diagrams, one panel per label: accuracy per confidence bin (bars, width =
    bin) against the diagonal; bins as from train.metrics.calibration_bins."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(bins), figsize=(3.2 * len(bins), 3.4), squeeze=False,
                             sharey=True)
    for ax, (label, bs) in zip(axes[0], bins.items()):
        n = max(sum(b["count"] for b in bs), 1)
        full = [b for b in bs if b["count"]]
        ax.bar([b["lower"] for b in full], [b["accuracy"] for b in full],
               width=[b["upper"] - b["lower"] for b in full], align="edge", alpha=0.7,
               edgecolor="k", linewidth=0.5)
        ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
        ece = sum(b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in bs)
        ax.set_title(f"{label}: ECE {100 * ece:.2f}%", fontsize=9)
        ax.set_xlabel("confidence")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("accuracy")
    return _save_figure(fig, path, title)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.evaluate",
                                description="Top-1/5, calibration, occlusion and OOD metrics "
                                            "of a python -m train checkpoint.")
    p.add_argument("checkpoint", help="a .pth written by python -m train, or its run folder")
    p.add_argument("--data", required=True, help="in-distribution evaluation data (class "
                   "folders, `path label` list or WebDataset shards)")
    p.add_argument("--ood", default=None, help="out-of-distribution data (labels ignored)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--table", default=None, help="write the markdown table here")
    p.add_argument("--plot", default=None, help="write accuracy vs drop ratio here (PNG)")
    p.add_argument("--ratios", type=float, nargs="+", default=list(DEFAULT_RATIOS))
    p.add_argument("--modes", nargs="*", default=list(DROP_MODES), choices=DROP_MODES,
                   help="occlusion orders (none: skip occlusion)")
    p.add_argument("--drop", default="pixels", choices=DROP_KINDS,
                   help="pixels: zero the patches (Naseer); tokens: remove them (timm ViT)")
    p.add_argument("--occlusion-samples", type=int, default=None,
                   help="evaluate occlusion on this many evenly spread images (default: all)")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--num-threads", type=int, default=2, help="DALI CPU threads")
    p.add_argument("--seed", type=int, default=0, help="random drop order seed")
    p.add_argument("--quiet", action="store_true", help="do not print the table")
    return p


def _loader(source: str, cfg, batch_size: int, device: str, num_threads: int,
            in_distribution: bool = True):
    """The training run's validation loader (train.main.build_val_loader): its data options
    and, for the in-distribution data, its data.exclude. float32 images whatever run.amp was:
    the model is evaluated in float32, without autocast."""
    from .main import build_val_loader
    kw = {} if in_distribution else {"exclude": None}
    return build_val_loader(cfg, source, device=device, dtype="float32", batch_size=batch_size,
                            num_threads=num_threads, **kw)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from pipelines.loader import resolve_device
    bad = [r for r in args.ratios if not 0.0 <= r < 1.0]
    if bad:
        raise ValueError(f"--ratios must lie in [0, 1), got {bad}")
    if args.occlusion_samples is not None and args.occlusion_samples < 1:
        raise ValueError(f"--occlusion-samples must be >= 1, got {args.occlusion_samples}")
    dev, _, _ = resolve_device(args.device)
    ck = resolve_checkpoint(args.checkpoint)
    model, cfg, patch = load_model(ck, dev)
    t0 = time.perf_counter()
    val = _loader(args.data, cfg, args.batch_size, dev.type, args.num_threads)
    n_cls = len(val.source.classes) or (max(val.source.labels) + 1 if val.source.labels else 0)
    if n_cls > cfg.model.num_classes:
        raise ValueError(f"--data has {n_cls} classes, the model {cfg.model.num_classes}: "
                         "give the in-distribution data as --data (OOD data as --ood)")
    index = occlusion_subset(val.num_shard_samples, args.occlusion_samples)
    res = evaluate_model(model, val, patch=patch, mean=cfg.data.mean, std=cfg.data.std,
                         ratios=args.ratios, modes=args.modes, drop=args.drop,
                         occlusion_index=index, seed=args.seed)
    s_in = res.pop("msp")
    if args.ood:
        s_out, y_out = msp_scores(model, _loader(args.ood, cfg, args.batch_size, dev.type,
                                                 args.num_threads, in_distribution=False))
        res["ood"] = {**ood_report(s_in, s_out, y_out), "source": args.ood}
    res.update({"checkpoint": str(ck), "data": args.data, "model": cfg.model.name,
                "method": cfg.mix.method, "label_variant": cfg.mix.label_variant,
                "seed": cfg.run.seed, "seconds": time.perf_counter() - t0})
    return res


def main(argv: Sequence[str] | None = None) -> int:
    from .dist import env_rank
    from pipelines.logs import setup_logging
    args = _parser().parse_args(argv)
    try:
        setup_logging(env_rank())
        res = run(args)
    except (ValueError, FileNotFoundError, TypeError) as e:
        logger.error("python -m train.evaluate: error: %s", e)
        return 2
    table = format_report(res)
    if not args.quiet:
        print(table, end="")
    if args.table:
        Path(args.table).write_text(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        tmp.replace(args.json)
    occ = res["occlusion"]
    if args.plot and occ["accuracy"]:
        plot_curves({f"{res['method']} ({Path(str(res['checkpoint'])).parent.name})": {
            m: (occ["ratios"], [100 * a for a in acc]) for m, acc in occ["accuracy"].items()}},
            args.plot, title=f"occlusion, drop={occ['drop']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
