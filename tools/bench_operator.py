"""CPU proxies of the MaskMix operator's cost, for one source tree or two compared in one run.

    python -m tools.bench_operator [--baseline DIR --baseline-label NAME] [--rounds 3]
        [--images 200] [--share-batches 20] [--skip-share] [--out results/bench]

Three proxies (no GPU needed; what a GPU run would pay per batch in Python and in launches):
- ops: non-view torch ops dispatched per batch by the operator (its draw and its mix call),
  counted with a TorchDispatchMode, at B = 16, 64 and 256 (3x8x8 float32 CHW, patch 4, cell 4);
- time: the operator's Python time per batch at B = 256 on those small tensors, where the
  kernels' own work is negligible (wall and thread CPU, median over the timed batches), per mode;
- share: the operator's share of the CPU training pipeline's CPU time (`TrainLoader`, full DeiT
  recipe, 224 px, batch 64, 2 threads, generated ImageNet-like JPEGs), presets maskmix (every
  batch) and mixpro.
torch runs single-threaded in every measurement, as in `tools.bench_pipeline` (on a CPU pipeline the
operator shares the cores with DALI's threads). Each tree is measured in fresh subprocesses
(one for ops and time, one for the share) whose PYTHONPATH is that tree; with
--baseline the two trees alternate (A B, B A, ...) and ratios are taken within a round, since
the development machine is shared. Writes operator-cpu.json and operator-cpu.md to --out.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

if __package__:
    from pipelines.compat import shutdown_pipeline
else:   # a worker runs this file as a script inside the tree it measures, which may predate
    import importlib.util  # compat.py: load this benchmark's own tree's copy (stdlib imports)

    _spec = importlib.util.spec_from_file_location("_bench_compat",
                                                   HERE.parent / "pipelines" / "compat.py")
    _compat = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_compat)
    shutdown_pipeline = _compat.shutdown_pipeline
SCENARIOS = ("maskmix", "cutmix", "mixup", "unmixed", "never")
"""What the small-tensor proxies run: a config with one mode on every batch (maskmix, cutmix,
mixup), a mixing config whose batches draw `none` (unmixed), one that never mixes (never)."""
SMALL = dict(image_size=8, patch_size=4, mask_patch=4)


# ---------------------------------------------------------------- worker (runs in the tree)

def _instrument(op: Any, counts: dict[str, list] | None, times: dict[str, list]) -> None:
    """Record the ops (when `counts`) and the time of each `draw` / mix call of `op`, through
    the operator's public `add_hook`. A baseline tree that predates the hook gets the same
    measurement from a subclass swapped in under DALI (the only way into its `__call__`)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += not func.is_view
            return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def measured(name: str):
        mode = Count() if counts is not None else None
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            with mode if mode is not None else contextlib.nullcontext():
                yield
        finally:
            times[name].append((time.perf_counter() - t0, time.thread_time() - c0))
            if mode is not None:
                counts[name].append(mode.n)

    if hasattr(op, "add_hook"):
        op.add_hook(measured)
        return
    base = type(op)

    def wrap(method, name):
        def timed(self, *args):
            with measured(name):
                return method(self, *args)
        return timed

    op.__class__ = type("Instrumented", (base,), {"__call__": wrap(base.__call__, "mix"),
                                                  "draw": wrap(base.draw, "draw")})


def _small_pipeline(mode: str, batch: int):
    import numpy as np
    from nvidia.dali import fn, pipeline_def

    from mixpro_dali import MixConfig, mix

    # unmixed: a mixing config whose batch drew `none`; never: a config that never mixes
    probs = {"unmixed": {"maskmix": 1e-9}, "never": {}}.get(mode, {mode: 1.0})
    cfg = MixConfig(probs=probs, partner="perm", seed=1, **SMALL)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch, 3, *cfg.image_size)).astype(np.float32)
    labels = rng.integers(0, 1000, (batch, 1)).astype(np.int32)
    held = {}

    @pipeline_def(batch_size=batch, num_threads=1, device_id=None, seed=1)
    def pipe():
        x, y = fn.external_source(lambda: (images, labels), num_outputs=2, batch=True,
                                  layout=["CHW", ""])
        out = mix(x, y, cfg, layout="CHW")
        held["op"] = out.operator
        return out.images, out.labels_b, out.lam, out.token_mask, out.mode

    p = pipe()
    p.build()
    return p, held["op"]


def _run_small(mode: str, batch: int, batches: int, count: bool) -> dict[str, Any]:
    p, op = _small_pipeline(mode, batch)
    counts = {"mix": [], "draw": []} if count else None
    times = {"mix": [], "draw": []}
    for _ in range(3):                     # warm-up (allocations, first DLPack paths)
        p.run()
    _instrument(op, counts, times)
    for _ in range(batches):
        p.run()
    shutdown_pipeline(p)                   # python operators: shut down before collection
    n = min(len(times["mix"]) or batches, batches)
    per = [sum(times[k][i][0] for k in times if len(times[k]) > i) for i in range(n)]
    cpu = [sum(times[k][i][1] for k in times if len(times[k]) > i) for i in range(n)]
    res = {"ms_wall": 1e3 * statistics.median(per) if per else 0.0,
           "ms_cpu": 1e3 * statistics.median(cpu) if cpu else 0.0,
           "ms_call": 1e3 * statistics.median(t[0] for t in times["mix"])
           if times["mix"] else 0.0,
           "ms_draw": 1e3 * statistics.median(t[0] for t in times["draw"]) if times["draw"] else 0.0,
           "ms_call_cpu": 1e3 * statistics.median(t[1] for t in times["mix"])
           if times["mix"] else 0.0,
           "ms_call_cpu_min": 1e3 * min(t[1] for t in times["mix"]) if times["mix"] else 0.0,
           "ms_draw_cpu": 1e3 * statistics.median(t[1] for t in times["draw"])
           if times["draw"] else 0.0}
    if count:
        res["ops_call"] = max(counts["mix"], default=0)
        res["ops_draw"] = max(counts["draw"], default=0)
        res["ops"] = res["ops_call"] + res["ops_draw"]
    return res


def _run_share(preset: str, data: str, batches: int) -> dict[str, Any]:
    import torch

    from mixpro_dali import MixConfig
    from pipelines.loader import TrainLoader

    torch.set_num_threads(1)   # as tools.bench_pipeline: the main thread only collates
    mix = MixConfig.preset(preset, image_size=224, patch_size=16, mask_patch=64, seed=0)
    loader = TrainLoader(data, batch_size=64, image_size=224, device="cpu", num_threads=2, mix=mix)
    times = {"mix": [], "draw": []}
    it = iter(())

    def nxt():
        nonlocal it
        for _ in range(2):
            try:
                return next(it)
            except StopIteration:
                it = iter(loader)
        raise RuntimeError("empty loader")

    try:
        for _ in range(3):
            nxt()
        _instrument(loader.mix_operator, None, times)
        for k in times:
            times[k].clear()
        c0 = time.process_time()
        for _ in range(batches):
            nxt()
        cpu = time.process_time() - c0
    finally:
        loader.close()
    op = sum(t[1] for k in times for t in times[k])
    return {"op_cpu_share": op / cpu, "cpu_ms_per_img": 1e3 * cpu / (64 * batches),
            "op_cpu_ms_per_batch": 1e3 * op / batches}


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    if spec["kind"] == "small":
        res = {}
        for m in SCENARIOS:
            res[f"small/{m}"] = {str(b): _run_small(m, b, 4, True) for b in (16, 64, 256)}
            res[f"time/{m}"] = {"256": _run_small(m, 256, spec["batches"], False)}
        return res
    return {f"share/{p}": _run_share(p, spec["data"], spec["batches"]) for p in ("maskmix", "mixpro")}


# ---------------------------------------------------------------- driver

def _spawn(tree: Path, spec: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    out = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"worker {spec} in {tree} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _median_ratio(pairs) -> float | None:
    """Median of the rounds' current / baseline ratios; None when the baseline is always 0 (a
    config that never mixes runs no operator in either tree)."""
    ratios = [r for r in (_ratio(a, b) for a, b in pairs) if r is not None]
    return statistics.median(ratios) if ratios else None


def measure(trees: dict[str, Path], a: argparse.Namespace, log=print) -> dict[str, Any]:
    specs = [{"kind": "small", "batches": a.time_batches}]
    if not a.skip_share:
        from tools.imagenet_like import make_imagenet_like

        data = str(make_imagenet_like(Path(a.tmp) / "data", a.images, workers=2))
        specs.append({"kind": "share", "data": data, "batches": a.share_batches})
    rounds = []
    names = list(trees)
    for r in range(a.rounds):
        order = names if r % 2 == 0 else names[::-1]
        row: dict[str, dict[str, Any]] = {n: {} for n in names}
        for spec in specs:
            for n in order:
                row[n].update(_spawn(trees[n], spec))
        rounds.append(row)
        log(f"round {r + 1}/{a.rounds} done")
    return {"rounds": rounds}


def summarize(payload: dict[str, Any], names: list[str]) -> dict[str, Any]:
    rounds = payload["rounds"]
    s: dict[str, Any] = {}
    for n in names:
        d = s[n] = {}
        for m in SCENARIOS:
            small = rounds[0][n][f"small/{m}"]
            d[f"ops/{m}"] = {b: small[b]["ops"] for b in ("16", "64", "256")}
            d[f"ms_wall/{m}"] = statistics.median(r[n][f"time/{m}"]["256"]["ms_wall"] for r in rounds)
            for key in ("ms_cpu", "ms_call_cpu", "ms_call_cpu_min", "ms_draw_cpu"):
                d[f"{key}/{m}"] = statistics.median(r[n][f"time/{m}"]["256"].get(key, 0.0)
                                                    for r in rounds)
        for p in ("maskmix", "mixpro"):
            if f"share/{p}" in rounds[0][n]:
                d[f"share/{p}"] = statistics.median(r[n][f"share/{p}"]["op_cpu_share"] for r in rounds)
                d[f"cpu_ms_per_img/{p}"] = statistics.median(
                    r[n][f"share/{p}"]["cpu_ms_per_img"] for r in rounds)
    if len(names) == 2:
        base, cur = names
        ratios = {}
        for m in SCENARIOS:
            for key in ("ms_wall", "ms_cpu"):
                ratios[f"{key}/{m}"] = _median_ratio(
                    (r[cur][f"time/{m}"]["256"][key], r[base][f"time/{m}"]["256"][key])
                    for r in rounds)
        for p in ("maskmix", "mixpro"):
            if f"share/{p}" in rounds[0][cur]:
                ratios[f"cpu_ms_per_img/{p}"] = _median_ratio(
                    (r[cur][f"share/{p}"]["cpu_ms_per_img"],
                     r[base][f"share/{p}"]["cpu_ms_per_img"]) for r in rounds)
        s["ratios_current_over_baseline"] = ratios
    return s


def table(summary: dict[str, Any], names: list[str]) -> str:
    def fmt(v, pct=False):
        if v is None:
            return "-"
        return f"{100 * v:.1f}%" if pct else (f"{v:.3g}" if isinstance(v, float) else str(v))

    lines = ["| proxy | " + " | ".join(names) + (" | current / baseline |" if len(names) == 2 else " |"),
             "|---|" + "---|" * (len(names) + (len(names) == 2))]
    ratios = summary.get("ratios_current_over_baseline", {})
    for m in SCENARIOS:
        ops = [summary[n][f"ops/{m}"] for n in names]
        lines.append(f"| non-view torch ops per batch, {m}, B=16 / 64 / 256 | "
                     + " | ".join(f"{o['16']} / {o['64']} / {o['256']}" for o in ops)
                     + (" | |" if len(names) == 2 else " |"))
    for m in SCENARIOS:
        lines.append(f"| Python ms per batch at B=256, {m}: thread CPU (wall) | "
                     + " | ".join(f"{summary[n][f'ms_cpu/{m}']:.2f} ({summary[n][f'ms_wall/{m}']:.2f})"
                                  for n in names)
                     + (f" | {fmt(ratios.get(f'ms_cpu/{m}'))} ({fmt(ratios.get(f'ms_wall/{m}'))}) |"
                        if len(names) == 2 else " |"))
    for m in SCENARIOS:
        lines.append(f"| of which the mix call, {m}: CPU median (min); the draw | "
                     + " | ".join(f"{summary[n][f'ms_call_cpu/{m}']:.2f} "
                                  f"({summary[n][f'ms_call_cpu_min/{m}']:.2f}); "
                                  f"{summary[n][f'ms_draw_cpu/{m}']:.2f}" for n in names)
                     + (" | |" if len(names) == 2 else " |"))
    for p in ("maskmix", "mixpro"):
        if f"share/{p}" in summary[names[0]]:
            lines.append(f"| operator share of CPU pipeline CPU time, {p} | "
                         + " | ".join(fmt(summary[n][f"share/{p}"], pct=True) for n in names)
                         + (" | |" if len(names) == 2 else " |"))
            lines.append(f"| CPU pipeline CPU ms per image, {p} | "
                         + " | ".join(f"{summary[n][f'cpu_ms_per_img/{p}']:.2f}" for n in names)
                         + (f" | {fmt(ratios.get(f'cpu_ms_per_img/{p}'))} |" if len(names) == 2 else " |"))
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tools.bench_operator",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", type=Path, help="a second source tree to compare against")
    p.add_argument("--baseline-label", default="baseline")
    p.add_argument("--current-label", default="current")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--time-batches", type=int, default=30)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--share-batches", type=int, default=20)
    p.add_argument("--skip-share", action="store_true")
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    trees = {}
    if a.baseline:
        trees[a.baseline_label] = a.baseline.resolve()
    trees[a.current_label] = HERE.parent
    names = list(trees)
    from tools.bench_report import machine_info

    with tempfile.TemporaryDirectory() as tmp:
        a.tmp = tmp
        payload: dict[str, Any] = {
            "title": "MaskMix operator, CPU proxies", "machine": machine_info(),
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()
                         if k != "tmp"},
            "trees": {n: str(t) for n, t in trees.items()}, "small": SMALL}
        payload.update(measure(trees, a))
    payload["summary"] = summarize(payload, names)
    md = table(payload["summary"], names)
    print(md, end="")
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "operator-cpu.json").write_text(json.dumps(payload, indent=1) + "\n")
        (a.out / "operator-cpu.md").write_text(md)
        print(f"wrote {a.out / 'operator-cpu.json'}")
    return 0


if __name__ == "__main__":
    if "--worker" in sys.argv:
        sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
        print(json.dumps(worker(json.loads(sys.argv[sys.argv.index("--worker") + 1]))))
    else:
        raise SystemExit(main())
