"""python -m tools.bench_train runs end to end (tiny ViT, CPU, synthetic JPEGs) and reports rates."""
from __future__ import annotations

import json

import pytest

from tools.bench_train import main


@pytest.mark.slow
def test_bench_smoke(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["--device", "cpu", "--methods", "none,mixpro", "--modes", "e2e", "--batch-size", "8",
                 "--steps", "2", "--warmup", "1", "--threads", "1", "--rounds", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["method"] for r in rows] == ["none", "mixpro"]
    assert all(r["steps_s"] > 0 and abs(r["img_s"] - 8 * r["steps_s"]) < 1e-6 * r["img_s"]
               for r in rows)
    assert "vit_tiny_patch16_224 mixpro" in capsys.readouterr().out
