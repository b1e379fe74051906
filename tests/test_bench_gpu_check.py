"""pipelines.gpu_check: the parts that run without a GPU (operator vs kernel, loader, the whole
script at tiny sizes on the CPU), and that the comparison catches a wrong output."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipelines import gpu_check


def test_operator_check_cpu_backend_matches_kernel():
    res = gpu_check.check_operator("cpu", batches=2)
    assert res["ok"], res["errors"]
    assert res["cases"] == 5 * 2 * 2 and res["backends"] == ["cpu"]


def test_compare_catches_wrong_pixels_and_decisions():
    want = [np.zeros((2, 4, 4, 3), np.uint8), np.zeros((2, 1)), np.zeros((2, 1)),
            np.full(2, 0.5, np.float32), np.ones((2, 2, 2), np.uint8), np.full(2, 3, np.int32)]
    got = [w.copy() for w in want]
    assert gpu_check._compare(got, want, False, "x") == []
    got[0][0, 0, 0, 0] = 1
    got[3][1] = 0.25
    errs = gpu_check._compare(got, want, False, "x")
    assert any("image: 1 of 96" in e for e in errs) and any("lam" in e for e in errs)
    assert gpu_check._compare(got[:1] + want[1:], want, True, "x") == []     # mixup: 1 level ok


def test_augment_check_compares_kernel_sets_and_catches_a_difference(monkeypatch):
    res = gpu_check.check_augment("cpu", batches=1)
    assert res["ok"] and res["changed_samples"]["rand_augment"] > 0, res
    import pipelines.randaugment as ra    # a kernel set that drew other decisions must fail
    real = ra.rand_augment
    monkeypatch.setattr(ra, "rand_augment", lambda x, policy, seed, kernels: real(
        x, policy, seed=seed + (kernels == "dali"), kernels=kernels))
    bad = gpu_check.check_augment("cpu", batches=1)
    assert not bad["ok"] and "rand_augment batch 0" in bad["errors"][0]


def test_poison_check_skips_without_gpu():
    assert gpu_check.check_poison("cpu") == {"ok": True, "skipped": "no GPU"}


@pytest.mark.slow
def test_gpu_check_script_on_cpu(tmp_path):
    out = tmp_path / "out"
    rc = gpu_check.main(["--device", "cpu", "--quick", "--out", str(out), "--budget", "240",
                         "--images", "32", "--data-dir", str(tmp_path / "data")])
    report = json.loads((out / "gpu_check.json").read_text())
    assert rc == 0 and report["ok"], report
    assert set(report["checks"]) == {"operator", "poison", "augment", "loader"}
    assert {b["rc"] for b in report["benchmarks"].values()} == {0}
    names = sorted(p.name for p in out.iterdir())
    assert len(names) <= 8 and "pipeline-cpu.json" in names and "train-cpu.json" in names
    assert report["seconds"] < 240
