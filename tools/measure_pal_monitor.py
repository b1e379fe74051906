"""Cost of the PAL monitor (train.engine.PalMonitor) per training step, on the demo config.

Not collected by pytest (no test_ prefix). Run: python tools/measure_pal_monitor.py [--help]

One Engine with the demo's model (train/configs/demo_fashion_mnist.yaml: ViT 28 px, patch 7,
dim 96, depth 4, batch 64, 10 classes), MixPro/paper loss and AdamW runs full steps (forward,
loss, backward, optimizer step) on a MaskMix batch (PAL on every sample: the worst case), with
the monitor off and on in adjacent pairs, order alternating per round. Reported: the median of
the per-round time ratios (on/off; process CPU time on CPU, which is much less sensitive to
other processes on a shared machine, and wall time), and the monitor's update alone.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mixpro_dali.config import MODES  # noqa: E402
from train.config import TrainConfig, load_yaml, resolve_config_path  # noqa: E402
from train.dist import DistInfo  # noqa: E402
from train.engine import Engine, PalMonitor  # noqa: E402
from train.losses import MixLoss  # noqa: E402
from train.main import build_model  # noqa: E402
from train.optim import build_optimizer, build_scheduler  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    cfg = TrainConfig.from_dict(load_yaml(resolve_config_path("demo_fashion_mnist")))
    torch.manual_seed(0)
    model, _ = build_model(cfg)
    model.to(dev).train()
    loss_fn = MixLoss(model, method="mixpro", label_variant="paper", num_classes=10, smoothing=0.1)
    opt = build_optimizer(model, opt="adamw", lr=1e-4, weight_decay=0.05, betas=(0.9, 0.999),
                          eps=1e-8)
    sch = build_scheduler(opt, sched="cosine", epochs=1, updates_per_epoch=10_000,
                          warmup_epochs=0, warmup_lr=1e-6, min_lr=1e-5)
    scaler = torch.amp.GradScaler(dev.type, enabled=False)
    dist = DistInfo(0, 1, 0, dev)
    eng = Engine(model, model, opt, sch, scaler, loss_fn, dist=dist, amp=cfg.run.amp)
    monitor = PalMonitor(dev, pal=True)
    b, s = cfg.data.batch_size, cfg.data.image_size
    g = torch.Generator().manual_seed(1)
    mask = (torch.rand(b, 4, 4, generator=g) < 0.5).to(torch.uint8)
    y = torch.randint(0, 10, (b,), generator=g)
    batch = {"image": torch.randn(b, 3, s, s, generator=g), "label_a": y, "label_b": y.flip(0),
             "lam": mask.flatten(1).float().mean(1), "token_mask": mask,
             "mode": torch.full((b,), MODES["maskmix"], dtype=torch.int32)}
    batch = {k: v.to(dev) for k, v in batch.items()}
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def step(mon) -> tuple[float, float]:
        eng.monitor = mon
        sync()
        w, c = time.perf_counter(), time.process_time()
        eng.forward_backward(batch, 1, True)
        eng.optimizer_step()
        sync()
        return time.perf_counter() - w, time.process_time() - c

    for _ in range(args.warmup):
        step(None), step(monitor)
    wall, cpu, base_ms = [], [], []
    for r in range(args.rounds):
        order = (None, monitor) if r % 2 == 0 else (monitor, None)
        t = {id(m): step(m) for m in order}
        off, on = t[id(None)], t[id(monitor)]
        wall.append(on[0] / off[0])
        cpu.append(on[1] / off[1])
        base_ms.append(off[0] * 1e3)
    # the update alone, on the last forward's targets
    logits = model(batch["image"])
    _, tg = loss_fn(logits, batch)
    n = 200
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        monitor.update(batch, tg, loss_fn.attention.maps)
    sync()
    upd_ms = (time.perf_counter() - t0) / n * 1e3
    print(f"device {dev}, torch threads {torch.get_num_threads()}, demo batch {b}x{s}px, "
          f"{args.rounds} rounds")
    print(f"step without monitor: median {statistics.median(base_ms):.2f} ms wall")
    print(f"ratio with/without monitor: wall median {statistics.median(wall):.4f} "
          f"(IQR {statistics.quantiles(wall, n=4)[0]:.4f}-{statistics.quantiles(wall, n=4)[2]:.4f})"
          + (f", CPU time median {statistics.median(cpu):.4f}" if dev.type == "cpu" else ""))
    print(f"monitor.update alone: {upd_ms:.3f} ms "
          f"({100 * upd_ms / statistics.median(base_ms):.2f}% of the step)")


if __name__ == "__main__":
    main()
