"""tools.bench_pipeline, tools.bench_report and tools.imagenet_like: the generated data looks
like ImageNet, the pipeline benchmark runs end to end on tiny sizes and writes its outputs, the
ratio and memory helpers compute what they say."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from tools import bench_pipeline as bench, bench_report
from tools.imagenet_like import describe, make_imagenet_like, natural_image


def test_imagenet_like_sizes_content_and_determinism(tmp_path):
    root = make_imagenet_like(tmp_path / "a", 12, classes=3, workers=2)
    info = describe(root)
    assert info["images"] == 12 and 60 < info["mean_kb"] < 170            # ImageNet: ~110 KB
    assert sorted(p.name for p in root.iterdir()) == ["class_00", "class_01", "class_02"]
    with Image.open(next(root.rglob("*.jpg"))) as im:
        assert im.format == "JPEG" and max(im.size) == 500 and 250 <= min(im.size) <= 500
    again = make_imagenet_like(tmp_path / "b", 12, classes=3)               # 1 process, same seed
    for f in root.rglob("*.jpg"):
        assert f.read_bytes() == (again / f.relative_to(root)).read_bytes()


def test_natural_image_is_not_noise():
    """Natural images: neighbouring pixels correlate strongly (white noise: ~0)."""
    img = natural_image(np.random.default_rng(0), 120, 160).astype(np.float32).mean(-1)
    a, b = img[:, :-1].ravel(), img[:, 1:].ravel()
    assert np.corrcoef(a, b)[0, 1] > 0.8 and img.std() > 15


def test_make_imagenet_like_rejects_empty(tmp_path):
    with pytest.raises(ValueError, match="images and classes must be >= 1"):
        make_imagenet_like(tmp_path, 0)


def test_median_ratios_per_round():
    rounds = [{"a": 100.0, "b": 50.0}, {"a": 10.0, "b": 6.0}, {"a": 80.0, "b": 40.0}]
    assert bench_report.median_ratios(rounds, "a") == {"a": 1.0, "b": 0.5}


def test_memory_sampler_sees_an_allocation():
    with bench_report.MemorySampler(lambda: [os.getpid()], period=0.01) as mem:
        # 256 MB touched: large against what the rest of the process (DALI's threads and pools
        # left by earlier tests) may free meanwhile, which once hid a 64 MB block under load
        block = np.ones(256 * 2**20 // 8)
        import time
        time.sleep(0.1)
    del block
    assert mem.result()["peak_host_mb"] > 200 and mem.result()["peak_device_mb"] is None


def test_markdown_table_formats():
    md = bench_report.markdown_table(["a", "b", "c"], [("x", 1234.5, None), ("y", 0.98765, "1%")])
    assert md.splitlines() == ["| a | b | c |", "|---|---|---|", "| x | 1,234 | - |",
                               "| y | 0.988 | 1% |"]


def test_unknown_config_is_an_error(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--configs", "dali,pil"])
    assert "unknown pil" in capsys.readouterr().err


@pytest.mark.slow
def test_pipeline_bench_end_to_end(tmp_path, capsys):
    data = make_imagenet_like(tmp_path / "data", 24, classes=3, workers=2)
    assert bench.main(["--data", str(data), "--size", "64", "--batch-size", "8", "--batches", "2",
                       "--warmup", "1", "--rounds", "2", "--threads", "1",
                       "--out", str(tmp_path / "out")]) == 0
    payload = json.loads((tmp_path / "out" / "pipeline-cpu.json").read_text())
    rows = {r["config"]: r for r in payload["results"]}
    assert list(rows) == list(bench.CONFIGS) and payload["rounds"] == 2
    assert rows["dali"]["x_dali"] == 1.0 and rows["torchvision+timm"]["x_torchvision"] == 1.0
    assert all(r["img_s"] > 0 and len(r["img_s_rounds"]) == 2 for r in rows.values())
    assert 0 < rows["dali+maskmix"]["op_share"] < 1 and rows["torchvision+timm"]["op_share"] is None
    assert payload["machine"]["cpu"] and payload["machine"]["dali"]
    assert "| dali+mixpro |" in (tmp_path / "out" / "pipeline-cpu.md").read_text()
    with Image.open(tmp_path / "out" / "pipeline-cpu.png") as im:
        assert im.format == "PNG"
    assert "x torchvision+timm" in capsys.readouterr().out


def test_operator_bench_worker_runs_as_a_script_outside_the_package(tmp_path):
    """bench_operator's workers run its file as a script inside the tree they measure (which may
    predate pipelines/compat.py); one small timing worker must run that way and report."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    spec = json.dumps({"kind": "small", "batches": 1})
    out = subprocess.run([sys.executable, str(root / "tools" / "bench_operator.py"),
                          "--worker", spec], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(root)}, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["small/maskmix"]["16"]["ops"] == res["small/maskmix"]["64"]["ops"] > 0, res


def test_operator_bench_instruments_through_the_public_hook():
    """bench_operator times and counts the operator through `add_hook` (the operator keeps its
    class), names its cases SCENARIOS (not the library's MODES), and a ratio whose baseline is
    always 0 (no operator in either tree) is None rather than a crash."""
    from mixpro_dali import MaskMixOperator
    from pipelines.compat import shutdown_pipeline
    from tools import bench_operator as bo

    assert not hasattr(bo, "MODES") and "never" in bo.SCENARIOS
    p, op = bo._small_pipeline("maskmix", 16)
    counts, times = {"mix": [], "draw": []}, {"mix": [], "draw": []}
    try:
        bo._instrument(op, counts, times)
        for _ in range(3):
            p.run()
    finally:
        shutdown_pipeline(p)
    assert type(op) is MaskMixOperator and len(op._hooks) == 1
    assert len(times["mix"]) >= 3 and len(counts["draw"]) >= 3 and max(counts["mix"]) > 0
    assert bo._median_ratio([(0.0, 0.0), (0.0, 0.0)]) is None
    assert bo._median_ratio([(1.0, 2.0), (3.0, 0.0), (3.0, 2.0)]) == 1.0
