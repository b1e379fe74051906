"""Cost of PAL in a training step: ClsAttention + mix_targets vs plain soft-target CE.

Not collected by pytest (no test_ prefix). Run: python tools/measure_pal_overhead.py [--help]

Both steps run forward, loss, backward and an AdamW step on the same model and batch; the PAL
step has ClsAttention attached and builds its target with mix_targets(method='mixpro') with
every sample a MaskMix sample (worst case: PAL on the whole batch). Steps run in adjacent pairs,
the order alternating per round; the reported ratio is the median of the per-round ratios (drift
in machine load cancels within a pair). On CPU the process CPU time is reported beside the wall
time: it is much less sensitive to other processes on a shared machine. A third number times
only the added work (the attention row and mix_targets) against the plain step.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mixpro_dali.attention import ClsAttention, cls_attention_row  # noqa: E402
from mixpro_dali.labels import mix_targets, soft_target_cross_entropy  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="deit_tiny_patch16_224")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (cuda: the usual setup)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    dev = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes,
                              img_size=args.img_size).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    B, C = args.batch, args.num_classes
    h, w = model.patch_embed.grid_size
    x = torch.randn(B, 3, args.img_size, args.img_size, device=dev)
    labels_a = torch.randint(0, C, (B,), device=dev)
    labels_b = labels_a.flip(0)
    token_mask = (torch.rand(B, h, w, device=dev) < 0.5).to(torch.uint8)  # (B, h, w)
    lam = token_mask.flatten(1).float().mean(1)  # (B,)
    mode = torch.full((B,), 3, dtype=torch.int32, device=dev)  # all MaskMix: PAL everywhere
    area = mix_targets(torch.zeros(B, C, device=dev), labels_a, labels_b, lam, mode, token_mask,
                       None, num_classes=C, method="area").target
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.amp)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def step(cls_attn: ClsAttention | None) -> tuple[float, float]:
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        with amp:
            logits = model(x)
        target = area
        if cls_attn is not None:
            target = mix_targets(logits, labels_a, labels_b, lam, mode, token_mask,
                                 cls_attn.maps, num_classes=C).target
        soft_target_cross_entropy(logits, target).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t0, time.process_time() - c0

    rows = []  # per round: (plain wall, plain cpu, pal wall, pal cpu)
    for r in range(args.warmup + args.rounds):
        got = {}
        for pal in ((False, True) if r % 2 == 0 else (True, False)):
            if pal:
                with ClsAttention(model) as cls_attn:
                    got[pal] = step(cls_attn)
            else:
                got[pal] = step(None)
        if r >= args.warmup:
            rows.append((*got[False], *got[True]))
    plain = statistics.median(r[0] for r in rows)
    wall = [r[2] / r[0] for r in rows]
    cpu = [r[3] / r[1] for r in rows]

    # the added work alone: the class-attention row from the last block's q, k, and mix_targets
    attn = model.blocks[-1].attn
    N, heads = h * w + model.num_prefix_tokens, attn.num_heads
    q = torch.randn(B, heads, attn.head_dim, device=dev)
    k = torch.randn(B, heads, N, attn.head_dim, device=dev)
    logits = torch.randn(B, C, device=dev)
    reps = 50
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        maps = cls_attention_row(q, k, attn.scale, model.num_prefix_tokens)
        mix_targets(logits, labels_a, labels_b, lam, mode, token_mask, maps, num_classes=C)
    sync()
    extra = (time.perf_counter() - t0) / reps

    print(f"device={dev} model={args.model} img={args.img_size} batch={B} classes={C} "
          f"amp={args.amp} threads={torch.get_num_threads()} rounds={args.rounds}")
    print(f"plain step: median wall {plain * 1e3:.1f} ms "
          f"(range {min(r[0] for r in rows) * 1e3:.1f}-{max(r[0] for r in rows) * 1e3:.1f} ms)")
    for name, ratios in (("wall", wall), ("process CPU time", cpu))[:2 if dev.type == "cpu" else 1]:
        q1, q2, q3 = statistics.quantiles(ratios, n=4)
        print(f"PAL/plain ratio ({name}): median {q2:.4f}, quartiles {q1:.4f}-{q3:.4f}")
    print(f"added work alone: {extra * 1e3:.2f} ms per step -> ratio {1 + extra / plain:.4f}")


if __name__ == "__main__":
    main()
