"""The loop's arithmetic against slow obvious references: gradient accumulation equals one large
batch, clipping acts on unscaled gradients before the step, warm-up/cosine in steps, timm's
no-weight-decay groups, top-k counting. In-memory batches, no DALI."""
from __future__ import annotations

import copy
import math

import pytest
import timm
import torch

from train.dist import DistInfo
from train.engine import Engine, NonFiniteLossError, TrainState, group_size, topk_correct
from train.losses import MixLoss
from train.optim import build_optimizer, build_scheduler, scaled_lr
from devices import needs_cuda
from train_fixtures import CPU, engine, sgd, tiny_vit



def batches(n, b=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        y = torch.randint(0, 5, (b,), generator=g)
        out.append({"image": torch.randn(b, 3, 16, 16, generator=g), "label_a": y,
                    "label_b": y.flip(0), "lam": torch.rand(b, generator=g),
                    "token_mask": torch.ones(b, 4, 4, dtype=torch.uint8),
                    "mode": torch.full((b,), 1, dtype=torch.int32)})
    return out


def cat(bs):
    return {k: torch.cat([b[k] for b in bs]) for k in bs[0]}


def reference_step(model, opt, batch, clip=None):
    """One optimizer step on one batch: the obvious way."""
    eng = engine(model)
    logits = model(batch["image"])
    loss, _ = eng.loss_fn(logits, batch)
    opt.zero_grad()
    loss.backward()
    if clip is not None:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
        coef = min(1.0, clip / (float(norm) + 1e-6))
        for g in grads:
            g.mul_(coef)
    opt.step()


@pytest.mark.parametrize("n, accum", [(4, 2), (3, 2), (6, 3), (2, 1)])
def test_accumulation_equals_large_batch(n, accum):
    data = batches(n)
    model = tiny_vit()
    ref = copy.deepcopy(model)
    eng = engine(model, accum=accum, upe=math.ceil(n / accum))
    st = TrainState()
    eng.train_epoch(iter(data), n, st)
    assert st.step == math.ceil(n / accum) and st.batch == n
    ref_opt = sgd(ref)
    ref_sch = build_scheduler(ref_opt, sched="cosine", epochs=1, updates_per_epoch=st.step,
                              warmup_epochs=0, warmup_lr=1e-6, min_lr=1e-5)
    for k, start in enumerate(range(0, n, accum)):  # groups, the last one may be short
        reference_step(ref, ref_opt, cat(data[start:start + accum]))
        ref_sch.step_update(num_updates=k + 1)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=2e-6, msg=name)


def test_group_size():
    assert [group_size(i, 7, 3) for i in range(7)] == [3, 3, 3, 3, 3, 3, 1]
    assert [group_size(i, 4, 1) for i in range(4)] == [1, 1, 1, 1]


@pytest.mark.parametrize("use_scaler", [False, True])
def test_clipping_on_unscaled_grads_before_step(use_scaler):
    data = batches(1)
    model = tiny_vit()
    ref = copy.deepcopy(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=use_scaler)
    eng = engine(model, clip=0.05, scaler=scaler)
    eng.train_epoch(iter(data), 1, TrainState())
    ref_opt = sgd(ref)
    build_scheduler(ref_opt, sched="cosine", epochs=1, updates_per_epoch=10, warmup_epochs=0,
                    warmup_lr=1e-6, min_lr=1e-5)
    reference_step(ref, ref_opt, data[0], clip=0.05)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=2e-6)
    # and clipping really bit: without it the update differs
    free = copy.deepcopy(tiny_vit())
    engine(free).train_epoch(iter(data), 1, TrainState())
    assert not all(torch.allclose(p, q) for p, q in zip(free.parameters(), model.parameters()))


def test_no_weight_decay_groups_and_lr_scaling():
    model = tiny_vit()
    opt = build_optimizer(model, opt="adamw", lr=1e-3, weight_decay=0.05, betas=(0.9, 0.999),
                          eps=1e-8)
    names = {id(p): n for n, p in model.named_parameters()}
    no_wd = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    wd = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert {"pos_embed", "cls_token", "norm.weight", "head.bias", "blocks.0.attn.qkv.bias"} <= no_wd
    assert all(n.endswith("weight") and "norm" not in n for n in wd)
    assert type(opt).__name__ == "AdamW"
    assert scaled_lr(1e-3, 256, 1024) == 2.5e-4 and scaled_lr(1e-3, 256, None) == 1e-3


def test_warmup_and_cosine_in_steps():
    model = tiny_vit()
    opt = build_optimizer(model, opt="adamw", lr=1e-3, weight_decay=0.05, betas=(0.9, 0.999),
                          eps=1e-8)
    sch = build_scheduler(opt, sched="cosine", epochs=10, updates_per_epoch=10,
                          warmup_epochs=2, warmup_lr=1e-6, min_lr=1e-5)
    lrs = []
    for step in range(100):
        sch.step_update(num_updates=step)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(1e-6)
    assert lrs[10] == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2)  # linear warm-up over 20 steps
    # timm/DeiT: the cosine spans all steps, warm-up included (warmup_prefix=False)
    cos = [1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * t / 100)) for t in range(100)]
    assert lrs[20:] == pytest.approx(cos[20:], rel=1e-9)
    assert all(a >= b for a, b in zip(lrs[20:], lrs[21:]))  # cosine decays monotonically
    assert lrs[-1] < 2e-5


def test_topk_correct_counts():
    logits = torch.tensor([[0.0, 1, 2, 3, 4, 5, 6], [6.0, 5, 4, 3, 2, 1, 0]])
    c1, c5 = topk_correct(logits, torch.tensor([6, 1]))
    assert (int(c1), int(c5)) == (1, 2)
    c1, c5 = topk_correct(logits[:, :3], torch.tensor([2, 2]))  # 3 classes: top-5 = all
    assert (int(c1), int(c5)) == (1, 2)


def test_nan_loss_stops_with_clear_message():
    data = batches(2)
    data[1]["image"][:] = float("nan")
    eng = engine(tiny_vit())
    with pytest.raises(NonFiniteLossError, match=r"training loss is nan at epoch 0.*last.pth"):
        eng.train_epoch(iter(data), 2, TrainState())


def test_short_loader_is_an_error():
    eng = engine(tiny_vit())
    with pytest.raises(RuntimeError, match=r"yielded 1 batches in epoch 0, len\(\) promised 2"):
        eng.train_epoch(iter(batches(1)), 2, TrainState())


def val_batches(n, b, device="cpu"):
    g = torch.Generator().manual_seed(3)
    return [{"image": torch.randn(b, 3, 16, 16, generator=g).to(device),
             "label": torch.randint(0, 5, (b,), generator=g).to(device)} for _ in range(n)]


def test_evaluate_equals_one_pass_over_all_samples():
    model = tiny_vit()
    data = val_batches(3, 4) + val_batches(1, 3)          # a short last batch, as the loader
    res = engine(model).evaluate(model, data)
    with torch.no_grad():
        logits = model.eval()(torch.cat([d["image"] for d in data]))
    labels = torch.cat([d["label"] for d in data])
    top5 = logits.topk(5, dim=1).indices
    assert res["count"] == 15
    assert res["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(),
                                        rel=1e-5)
    assert res["top1"] == pytest.approx(100 * (logits.argmax(1) == labels).float().mean().item())
    assert res["top5"] == pytest.approx(100 * (top5 == labels[:, None]).any(1).float().mean().item())


@needs_cuda
def test_evaluate_on_cuda_syncs_once_not_per_batch():
    import warnings

    dev = torch.device("cuda")
    model = tiny_vit().to(dev)
    eng = Engine(model, model, sgd(model), None, None, None, dist=DistInfo(0, 1, 0, dev))
    data = val_batches(6, 8, "cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            eng.evaluate(model, data)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 2, [str(w.message) for w in syncs]    # the final .tolist(), not 6
