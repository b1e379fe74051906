"""Behaviour fingerprint of the trainer: run before and after a refactor that must change nothing,
then compare the two files bitwise.

    python tools/fingerprint.py record before.json            # on the old code
    python tools/fingerprint.py record after.json             # on the new code
    python tools/fingerprint.py compare before.json after.json

Each case is one short `python -m train` run (in its own process) of the embedded Fashion-MNIST
demo (a 3,200-image subset: 50 optimizer steps of batch 64, one epoch, fixed seed), per mixing
method, with and without RandAugment + random erasing. Recorded per step: the loss (exact float)
and a sha256 of the whole batch the loader delivered (images, labels, lam, mode, token mask);
at the end: a sha256 of the final weights and the validation metrics. Not a pytest test: the
numbers depend on the machine (BLAS, thread count), so only two runs on one machine compare.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from pipelines.options import DEFAULT_AUTO_AUGMENT

DEMO = ["--data.demo_train_size", "3200", "--data.demo_val_size", "500", "--run.epochs", "1",
        "--run.seed", "0", "--run.tensorboard", "false", "--run.progress", "lines", "--run.log_every", "1000",
        "--optim.warmup_epochs", "0"]
HEAVY_AUG = ["--data.auto_augment", DEFAULT_AUTO_AUGMENT, "--data.re_prob", "0.25",  # the recipe
             "--data.scale", "[0.08, 1.0]", "--data.ratio", "[0.75, 1.3333333333333333]"]
CASES: dict[str, list[str]] = {
    "mixpro": [],
    "mixpro-ra-erasing": HEAVY_AUG,
    "mixpro-official": ["--mix.label_variant", "official"],
    "transmix-ra-erasing": ["--mix.method", "transmix", *HEAVY_AUG],
    "deit": ["--mix.method", "deit"],
    "maskmix": ["--mix.method", "maskmix"],
    "none": ["--mix.method", "none"],
}


def _sha(*tensors) -> str:
    import torch
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def run_case(name: str, out_json: str) -> None:
    """In this process: one training run with the engine instrumented."""
    import torch
    torch.set_num_threads(2)
    from train import __main__ as cli
    from train.engine import Engine
    steps, engines = [], []
    orig = Engine.forward_backward

    def forward_backward(self, batch, divisor, last):
        loss = orig(self, batch, divisor, last)
        engines[:] = [self]
        keys = sorted(k for k, v in batch.items() if isinstance(v, torch.Tensor))
        steps.append({"loss": float(loss).hex(), "batch": _sha(*(batch[k] for k in keys)),
                      "keys": keys})
        return loss

    Engine.forward_backward = forward_backward
    with tempfile.TemporaryDirectory() as tmp:
        cfg, _, _ = cli.resolve([*DEMO, *CASES[name]])
        from train.main import run
        result = run(cfg, output=str(Path(tmp) / "run"), name=name)
    sd = engines[0].model.state_dict()
    rec = {"case": name, "steps": steps,
           "weights": _sha(*(sd[k] for k in sorted(sd))),
           "val": {k: result.get(k) for k in ("top1", "top5", "loss", "val_loss", "val_top1")
                   if k in result}}
    Path(out_json).write_text(json.dumps(rec))


def record(path: str, cases: list[str]) -> dict:
    out = {}
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    for name in cases:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            subprocess.run([sys.executable, __file__, "_case", name, f.name], check=True, env=env,
                           stdout=subprocess.DEVNULL)
            out[name] = json.loads(Path(f.name).read_text())
        print(f"{name}: {len(out[name]['steps'])} steps, final loss "
              f"{float.fromhex(out[name]['steps'][-1]['loss']):.6f}, weights "
              f"{out[name]['weights'][:16]}", flush=True)
    Path(path).write_text(json.dumps(out, indent=1))
    return out


def compare(a_path: str, b_path: str) -> int:
    a, b = (json.loads(Path(p).read_text()) for p in (a_path, b_path))
    bad = 0
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            print(f"{name}: only in {'the first' if name in a else 'the second'} file")
            bad += 1
            continue
        x, y = a[name], b[name]
        diffs = [i for i, (s, t) in enumerate(zip(x["steps"], y["steps"]))
                 if (s["loss"], s["batch"]) != (t["loss"], t["batch"])]
        same = (not diffs and len(x["steps"]) == len(y["steps"]) and x["weights"] == y["weights"]
                and x["val"] == y["val"])
        print(f"{name}: {'identical' if same else 'DIFFERENT'} ({len(x['steps'])} steps, "
              f"weights {x['weights'][:16]} vs {y['weights'][:16]}"
              + (f", first differing step {diffs[0]}" if diffs else "") + ")")
        bad += not same
    return 1 if bad else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("out")
    r.add_argument("--cases", default=",".join(CASES), help=f"among {', '.join(CASES)}")
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    k = sub.add_parser("_case")
    k.add_argument("name")
    k.add_argument("out")
    a = p.parse_args(argv)
    if a.cmd == "record":
        record(a.out, a.cases.split(","))
        return 0
    if a.cmd == "_case":
        run_case(a.name, a.out)
        return 0
    return compare(a.a, a.b)


if __name__ == "__main__":
    sys.exit(main())
